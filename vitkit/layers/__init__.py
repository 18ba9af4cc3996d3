"""Shared building blocks. Papers extend these through arguments or small subclasses."""

from vitkit.layers.attention import Attention
from vitkit.layers.attention_variants import LocalitySelfAttention, TalkingHeadsAttention, mix_heads
from vitkit.layers.base import ConfigMixin, VitkitLayer
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
    "ClassToken",
    "ConfigMixin",
    "FeedForward",
    "LayerScale",
    "LearnedPositionEmbedding",
    "LocalitySelfAttention",
    "PatchEmbedding",
    "SinCosPositionEmbedding2D",
    "TalkingHeadsAttention",
    "TokenPool",
    "Transformer",
    "VitkitLayer",
    "layer_scale_init",
    "mix_heads",
    "sincos_2d_table",
]
