"""Shared building blocks. Papers extend these through arguments or small subclasses."""

from vitkit.layers.attention import Attention
from vitkit.layers.attention_variants import LocalitySelfAttention, TalkingHeadsAttention, mix_heads
from vitkit.layers.base import ConfigMixin, VitkitLayer
from vitkit.layers.conv import PEG, ZeroPaddedConv2D
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
    "ClassToken",
    "ConfigMixin",
    "DynamicPositionBias",
    "FeedForward",
    "LayerScale",
    "LearnedPositionEmbedding",
    "LocalitySelfAttention",
    "PatchEmbedding",
    "RelativePositionBias",
    "SinCosPositionEmbedding2D",
    "SpatialReductionAttention",
    "TalkingHeadsAttention",
    "TokenPool",
    "Transformer",
    "VitkitLayer",
    "WindowAttention",
    "ZeroPaddedConv2D",
    "layer_scale_init",
    "mix_heads",
    "relative_position_index",
    "sincos_2d_table",
    "window_merge",
    "window_partition",
]
