"""Shared building blocks. Papers extend these through arguments or small subclasses."""

from vitkit.layers.attention import Attention
from vitkit.layers.attention_variants import LocalitySelfAttention, TalkingHeadsAttention, mix_heads
from vitkit.layers.base import ConfigMixin, VitkitLayer
from vitkit.layers.conv import (
    PEG,
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
from vitkit.layers.position_bias import (
    DynamicPositionBias,
    RelativePositionBias,
    relative_position_index,
)
from vitkit.layers.transformer import Transformer
from vitkit.layers.windows import (
    SpatialReductionAttention,
    WindowAttention,
    window_merge,
    window_partition,
)

__all__ = [
    "PEG",
    "Attention",
    "ChannelLayerNorm",
    "ClassToken",
    "Conv2D",
    "DepthwiseConv2D",
    "ConfigMixin",
    "ConvNormAct",
    "ConvStem",
    "DropPath",
    "DynamicPositionBias",
    "FeedForward",
    "LayerScale",
    "LearnedPositionEmbedding",
    "LocalitySelfAttention",
    "MaxPool",
    "PatchEmbedding",
    "RelativePositionBias",
    "SinCosPositionEmbedding2D",
    "SpatialReductionAttention",
    "TalkingHeadsAttention",
    "TokenPool",
    "Transformer",
    "VitkitLayer",
    "WindowAttention",
    "layer_scale_init",
    "map_to_tokens",
    "mix_heads",
    "relative_position_index",
    "sincos_2d_table",
    "tokens_to_map",
    "window_merge",
    "window_partition",
]
