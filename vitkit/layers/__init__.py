"""Shared building blocks. Papers extend these through arguments or small subclasses."""

from vitkit.layers.attention import Attention
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
from vitkit.layers.transformer import Transformer

__all__ = [
    "Attention",
    "ClassToken",
    "ConfigMixin",
    "FeedForward",
    "LearnedPositionEmbedding",
    "PatchEmbedding",
    "SinCosPositionEmbedding2D",
    "TokenPool",
    "Transformer",
    "VitkitLayer",
    "sincos_2d_table",
]
