"""Twins-SVT: "Twins: Revisiting the Design of Spatial Attention in Vision Transformers"
(Chu et al., NeurIPS 2021, arXiv:2104.13840)."""

from __future__ import annotations

import keras
from keras import ops

from vitkit.convert import Pointwise, as_feature_map, channel_norm
from vitkit.layers import (
    PEG,
    FeedForward,
    SpatialReductionAttention,
    VitkitLayer,
    WindowAttention,
)
from vitkit.layers.attention import LN_EPSILON
from vitkit.layers.backend_quirks import stored_gradient
from vitkit.layers.utils import (
    check_int,
    check_rate,
    patches_to_channels,
    smallest_side,
    to_channels_last,
)
from vitkit.models.base import VitkitModel
from vitkit.registry import register_model

STAGES = ("s1", "s2", "s3", "s4")
STAGE_ARGS = ("emb_dim", "patch_size", "local_patch_size", "global_k", "depth")
HEADS, DIM_HEAD, MLP_MULT = 8, 64, 4  # fixed in vit-pytorch's TwinsSVT


@keras.saving.register_keras_serializable(package="vitkit")
class TwinsPatchMerging(VitkitLayer):
    """Each `patch_size x patch_size` patch of a map becomes one pixel of `dim` channels:
    `(b, h*p, w*p, c) -> (b, h, w, dim)` through LayerNorm, a per-pixel Dense, LayerNorm."""

    def __init__(self, dim, patch_size, **kwargs):
        super().__init__(**kwargs)
        owner = type(self).__name__
        self.dim = check_int("dim", dim, owner=owner)
        self.patch_size = check_int("patch_size", patch_size, owner=owner)
        policy = self.dtype_policy
        self.patch_norm = keras.layers.LayerNormalization(
            epsilon=LN_EPSILON, dtype=policy, name="patch_norm"
        )
        self.proj = keras.layers.Dense(dim, dtype=policy, name="proj")
        self.norm = keras.layers.LayerNormalization(epsilon=LN_EPSILON, dtype=policy, name="norm")

    def build(self, input_shape):
        patch_dim = input_shape[-1] * self.patch_size**2
        self.patch_norm.build((None, patch_dim))
        self.proj.build((None, patch_dim))
        self.norm.build((None, self.dim))

    def call(self, x):
        p = self.patch_size
        x = patches_to_channels(x, (p, p))  # (b, h, w, c*p*p), vit-pytorch's (c p1 p2) order
        return self.norm(self.proj(self.patch_norm(x)))

    def vit_pytorch_state_map(self):
        return {
            "proj.0": channel_norm(self.patch_norm),
            "proj.1": Pointwise(self.proj),
            "proj.2": channel_norm(self.norm),
        }


@keras.saving.register_keras_serializable(package="vitkit")
class TwinsTransformer(VitkitLayer):
    """`depth` Twins-SVT blocks on a map `(b, h, w, dim)` (sec. 3.2): locally-grouped
    self-attention (LSA, inside `local_patch_size` windows) and a feed-forward, then global
    sub-sampled attention (GSA, against keys and values pooled by a `global_k` strided
    convolution) and a feed-forward, each residual. `has_local=False` keeps only the global
    half (the last stage)."""

    def __init__(
        self, dim, depth, local_patch_size, global_k, dropout=0.0, has_local=True, **kwargs
    ):
        super().__init__(**kwargs)
        owner = type(self).__name__
        self.dim = check_int("dim", dim, owner=owner)
        self.depth = check_int("depth", depth, minimum=0, owner=owner)
        self.local_patch_size = check_int("local_patch_size", local_patch_size, owner=owner)
        self.global_k = check_int("global_k", global_k, owner=owner)
        self.dropout = check_rate("dropout", dropout, owner=owner)
        self.has_local = has_local

        policy = self.dtype_policy

        def feed_forward(name):
            return FeedForward(dim, dim * MLP_MULT, dropout, dtype=policy, name=name)

        # LSA has no dropout on its attention weights in vit-pytorch, only on its output.
        self.local_attentions = (
            [
                WindowAttention(
                    dim,
                    local_patch_size,
                    heads=HEADS,
                    dim_head=DIM_HEAD,
                    separate_kv=True,
                    output_dropout=dropout,
                    dtype=policy,
                    name=f"local_attention_{i}",
                )
                for i in range(depth)
            ]
            if has_local
            else []
        )
        self.local_feed_forwards = (
            [feed_forward(f"local_feed_forward_{i}") for i in range(depth)] if has_local else []
        )
        self.global_attentions = [
            SpatialReductionAttention(
                dim,
                global_k,
                heads=HEADS,
                dim_head=DIM_HEAD,
                dropout=dropout,
                dtype=policy,
                name=f"global_attention_{i}",
            )
            for i in range(depth)
        ]
        self.global_feed_forwards = [feed_forward(f"global_feed_forward_{i}") for i in range(depth)]

    def build(self, input_shape):
        for layer in (
            *self.local_attentions,
            *self.local_feed_forwards,
            *self.global_attentions,
            *self.global_feed_forwards,
        ):
            layer.build(input_shape)

    def call(self, x, training=None):
        for i in range(self.depth):
            x = stored_gradient(x)  # see backend_quirks.stored_gradient
            if self.has_local:
                x = self.local_attentions[i](x, training=training) + x
                x = self.local_feed_forwards[i](x, training=training) + x
            x = self.global_attentions[i](x, training=training) + x
            x = self.global_feed_forwards[i](x, training=training) + x
        return x

    def vit_pytorch_state_map(self):
        """vit-pytorch's `Transformer`: `layers.i.0` to `layers.i.3`, each a `Residual`."""
        names = {}
        for i in range(self.depth):
            blocks = [
                self.global_attentions[i].vit_pytorch_state_map(),
                self.global_feed_forwards[i],
            ]
            if self.has_local:
                blocks = [
                    self.local_attentions[i].vit_pytorch_state_map(),
                    self.local_feed_forwards[i],
                    *blocks,
                ]
            first = 0 if self.has_local else 2
            for j, block in enumerate(blocks, start=first):
                names[f"layers.{i}.{j}.fn"] = block
        return as_feature_map(names)


# fmt: off
@register_model(
    # the smallest image (8 x 8) leaves every attention at least 2 x 2 keys
    tiny=dict(
        num_classes=5,
        s1_emb_dim=8, s1_patch_size=2, s1_local_patch_size=2, s1_global_k=2, s1_depth=0,
        s2_emb_dim=12, s2_patch_size=2, s2_local_patch_size=2, s2_global_k=1, s2_depth=0,
        s3_emb_dim=10, s3_patch_size=1, s3_local_patch_size=2, s3_global_k=1, s3_depth=0,
        s4_emb_dim=14, s4_patch_size=1, s4_global_k=1, s4_depth=0,
    ),
    parity=[
        dict(num_classes=5,
             s1_emb_dim=8, s1_patch_size=2, s1_local_patch_size=2, s1_global_k=2, s1_depth=0,
             s2_emb_dim=12, s2_patch_size=2, s2_local_patch_size=2, s2_global_k=2, s2_depth=2,
             s3_emb_dim=10, s3_patch_size=2, s3_local_patch_size=2, s3_global_k=1, s3_depth=0,
             s4_emb_dim=14, s4_patch_size=2, s4_global_k=1, s4_depth=1),
        dict(num_classes=3,
             s1_emb_dim=6, s1_patch_size=4, s1_local_patch_size=3, s1_global_k=3, s1_depth=1,
             s2_emb_dim=10, s2_patch_size=2, s2_local_patch_size=3, s2_global_k=3, s2_depth=0,
             s3_emb_dim=12, s3_patch_size=2, s3_local_patch_size=3, s3_global_k=2, s3_depth=0,
             s4_emb_dim=16, s4_patch_size=1, s4_local_patch_size=5, s4_global_k=3, s4_depth=0,
             peg_kernel_size=5, dropout=0.1),
        dict(num_classes=7,  # global_k that does not divide the map: the pooling drops a row
             s1_emb_dim=9, s1_patch_size=2, s1_local_patch_size=4, s1_global_k=3, s1_depth=0,
             s2_emb_dim=7, s2_patch_size=2, s2_local_patch_size=2, s2_global_k=3, s2_depth=0,
             s3_emb_dim=11, s3_patch_size=1, s3_local_patch_size=1, s3_global_k=1, s3_depth=1,
             s4_emb_dim=13, s4_patch_size=2, s4_global_k=2, s4_depth=0, peg_kernel_size=1),
    ],
    parity_sizes=[(32, 16), (48, 96), (16, 32)],
    invalid=[
        (dict(s2_emb_dim=0), "s2_emb_dim"),
        (dict(s1_patch_size=0), "s1_patch_size"),
        (dict(s3_global_k=0), "s3_global_k"),
        (dict(s4_depth=-1), "s4_depth"),
        (dict(peg_kernel_size=4), "peg_kernel_size"),
        (dict(dropout=-0.1), "dropout"),
        (dict(num_classes=0), "num_classes"),
    ],
    digits=dict(
        num_classes=10,
        s1_emb_dim=32, s1_patch_size=2, s1_local_patch_size=2, s1_global_k=2, s1_depth=0,
        s2_emb_dim=64, s2_patch_size=2, s2_local_patch_size=2, s2_global_k=2, s2_depth=0,
        s3_emb_dim=96, s3_patch_size=2, s3_local_patch_size=1, s3_global_k=1, s3_depth=0,
        s4_emb_dim=128, s4_patch_size=1, s4_global_k=1, s4_depth=0,
    ),
)
# fmt: on
@keras.saving.register_keras_serializable(package="vitkit")
class TwinsSVT(VitkitModel):
    """Twins-SVT: four stages, each a patch merging (the map shrinks by `sN_patch_size`), one
    block of locally-grouped + global sub-sampled attention, a position encoding generator
    (a depth-wise convolution, CPVT), then `sN_depth` more blocks; the last stage keeps only
    global attention. Global average pooling and a linear head close it. No class token and
    no position embedding, so any image size works whose maps the windows tile.

    Attention uses 8 heads of width 64 in every stage and the feed-forwards 4x the width, as
    in vit-pytorch. Images have 3 channels.

    Args:
        num_classes: number of outputs.
        s1_emb_dim ... s4_emb_dim: channels of each stage.
        s1_patch_size ... s4_patch_size: how much each stage's patch merging shrinks the map;
            the map must be divisible by it.
        s1_local_patch_size ... s3_local_patch_size: window side of locally-grouped attention
            (must divide the stage's map); `s4_local_patch_size` is accepted and unused, as in
            vit-pytorch.
        s1_global_k ... s4_global_k: kernel and stride of the convolution that pools keys and
            values for global attention (the map must be at least this large).
        s1_depth ... s4_depth: blocks after the position encoding generator.
        peg_kernel_size: odd kernel side of the position encoding generator.
        dropout: dropout in attention and feed-forward blocks.
        data_format: `"channels_last"` (b, h, w, c) or `"channels_first"` (b, c, h, w).

    Example:
        >>> model = TwinsSVT(num_classes=1000)
        >>> model(np.zeros((1, 224, 224, 3))).shape
        (1, 1000)
    """

    def __init__(
        self,
        *,
        num_classes,
        s1_emb_dim=64,
        s1_patch_size=4,
        s1_local_patch_size=7,
        s1_global_k=7,
        s1_depth=1,
        s2_emb_dim=128,
        s2_patch_size=2,
        s2_local_patch_size=7,
        s2_global_k=7,
        s2_depth=1,
        s3_emb_dim=256,
        s3_patch_size=2,
        s3_local_patch_size=7,
        s3_global_k=7,
        s3_depth=5,
        s4_emb_dim=512,
        s4_patch_size=2,
        s4_local_patch_size=7,
        s4_global_k=7,
        s4_depth=4,
        peg_kernel_size=3,
        dropout=0.0,
        data_format="channels_last",
        **kwargs,
    ):
        super().__init__(data_format=data_format, **kwargs)
        owner = type(self).__name__
        given = locals()
        self.num_classes = check_int("num_classes", num_classes, owner=owner)
        self.stages = []  # per stage: {emb_dim, patch_size, ...}
        for stage in STAGES:
            config = {}
            for arg in STAGE_ARGS:
                value = check_int(
                    f"{stage}_{arg}", given[f"{stage}_{arg}"], minimum=int(arg != "depth"),
                    owner=owner,
                )
                setattr(self, f"{stage}_{arg}", value)
                config[arg] = value
            self.stages.append(config)
        self.peg_kernel_size = check_int("peg_kernel_size", peg_kernel_size, owner=owner)
        if peg_kernel_size % 2 == 0:
            raise ValueError(
                f"{owner}: `peg_kernel_size` must be odd so the position encoding generator "
                f"keeps the map's size; got {peg_kernel_size}."
            )
        self.dropout = check_rate("dropout", dropout, owner=owner)
        self.channels = 3
        side = smallest_side(
            self.accepts_side, owner, "`sN_patch_size`, `sN_local_patch_size` and `sN_global_k`"
        )
        self.image_hw = (side, side)  # the smallest image it takes

        policy = self.dtype_policy
        self.patch_mergings, self.first_blocks, self.pegs, self.blocks = [], [], [], []
        for i, stage in enumerate(self.stages):
            dim, has_local = stage["emb_dim"], i < len(STAGES) - 1
            self.patch_mergings.append(
                TwinsPatchMerging(dim, stage["patch_size"], dtype=policy, name=f"merge_{i}")
            )
            for blocks, depth, name in (
                (self.first_blocks, 1, f"first_block_{i}"),
                (self.blocks, stage["depth"], f"blocks_{i}"),
            ):
                blocks.append(
                    TwinsTransformer(
                        dim, depth, stage["local_patch_size"], stage["global_k"], dropout,
                        has_local=has_local, dtype=policy, name=name,
                    )
                )
            self.pegs.append(PEG(peg_kernel_size, dtype=policy, name=f"peg_{i}"))
        self.head = keras.layers.Dense(num_classes, dtype=policy, name="head")

    size_rule = (
        "height and width that every stage's patch size and local window divide, and whose "
        "maps are no smaller than `global_k`"
    )

    def accepts_side(self, side: int) -> bool:
        """Whether an image side of `side` pixels suits every stage (vit-pytorch's rules)."""
        for i, stage in enumerate(self.stages):
            if side % stage["patch_size"]:
                return False
            side //= stage["patch_size"]
            if i < len(STAGES) - 1 and side % stage["local_patch_size"]:
                return False
            if side < stage["global_k"]:
                return False
        return True


    def call(self, images, training=None):
        x = to_channels_last(self.check_images(images), self.data_format)
        for merge, first, peg, blocks in zip(
            self.patch_mergings, self.first_blocks, self.pegs, self.blocks
        ):
            x = merge(x)  # (b, h / p, w / p, emb_dim)
            x = peg(first(x, training=training))
            x = blocks(x, training=training)
        return self.head(ops.mean(x, axis=(1, 2)))

    def vit_pytorch_state_map(self):
        """Our weights under the names of `vit_pytorch.twins_svt.TwinsSVT`'s state dict:
        `layers.i` is stage i (patch embedding, transformer, PEG, transformer), `layers.6`
        the head."""
        names = {}
        for i, (merge, first, peg, blocks) in enumerate(
            zip(self.patch_mergings, self.first_blocks, self.pegs, self.blocks)
        ):
            names[f"layers.{i}.0"] = merge
            names[f"layers.{i}.1"] = first
            names[f"layers.{i}.2"] = peg.vit_pytorch_state_map(proj="proj.fn")
            names[f"layers.{i}.3"] = blocks
        names[f"layers.{len(STAGES) + 2}"] = self.head
        return names
