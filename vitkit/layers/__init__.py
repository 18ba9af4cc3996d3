"""Shared building blocks. Papers extend these through arguments or small subclasses."""

from vitkit.layers.attention import Attention
from vitkit.layers.attention_variants import LocalitySelfAttention, TalkingHeadsAttention, mix_heads
from vitkit.layers.base import ConfigMixin, VitkitLayer
from vitkit.layers.conv import (
    ChannelLayerNorm,
    Conv2D,
    ConvNormAct,
    ConvStem,
    DepthwiseConv2D,
    MaxPool,
    map_to_tokens,
    tokens_to_map,
)
from vitkit.layers.drop_path import DropPath
from vitkit.layers.embedding import (
    ClassToken,
    LearnedPositionEmbedding,
    PatchEmbedding,
    SinCosPositionEmbedding2D,
    TokenPool,
    sincos_2d_table,
)
from vitkit.layers.feed_forward import FeedForward
from vitkit.layers.layer_scale import LayerScale, layer_scale_init
from vitkit.layers.transformer import Transformer

__all__ = [
    "Attention",
    "ChannelLayerNorm",
    "ClassToken",
    "Conv2D",
    "DepthwiseConv2D",
    "ConfigMixin",
    "ConvNormAct",
    "ConvStem",
    "DropPath",
    "FeedForward",
    "LayerScale",
    "LearnedPositionEmbedding",
    "LocalitySelfAttention",
    "MaxPool",
    "PatchEmbedding",
    "SinCosPositionEmbedding2D",
    "TalkingHeadsAttention",
    "TokenPool",
    "Transformer",
    "VitkitLayer",
    "layer_scale_init",
    "map_to_tokens",
    "mix_heads",
    "sincos_2d_table",
    "tokens_to_map",
]
