"""ScalableViT: "ScalableViT: Rethinking the Context-oriented Generalization of Vision
Transformer" (Yang et al., ECCV 2022, arXiv:2203.10790)."""

from __future__ import annotations

import keras
from keras import ops

from vitkit.convert import OutputSlice, as_feature_map, channel_norm
from vitkit.layers import (
    PEG,
    Attention,
    FeedForward,
    SpatialReductionAttention,
    VitkitLayer,
    WindowAttention,
)
from vitkit.layers.attention import LN_EPSILON
from vitkit.layers.backend_quirks import stored_gradient
from vitkit.layers.conv import ConvNormAct, conv_output_size
from vitkit.layers.utils import (
    check_int,
    check_rate,
    per_stage,
    smallest_side,
    to_channels_last,
)
from vitkit.models.base import VitkitModel
from vitkit.registry import register_model


def _separate_key_value_names(attention) -> dict:
    """vit-pytorch's separate `to_k` and `to_v` are the two halves of our `to_kv`."""
    keys = attention.inner_dim
    names = Attention.vit_pytorch_state_map(attention)
    to_kv = names.pop("to_kv")
    names["to_k"] = OutputSlice(to_kv, 0, keys)
    names["to_v"] = OutputSlice(to_kv, keys, keys + attention.value_dim)
    return names


@keras.saving.register_keras_serializable(package="vitkit")
class InteractiveWindowedAttention(WindowAttention):
    """Interactive windowed self-attention (IWSA, sec. 3.2): attention inside windows of the
    map (`window_size=None`: the whole map), plus the local interactive module, a 3x3
    convolution over the values of the whole map, so that neighbouring windows exchange
    information; its output joins the attention's before the output projection."""

    def __init__(
        self, dim, window_size=None, heads=8, dim_key=32, dim_value=32, dropout=0.0, **kwargs
    ):
        super().__init__(
            dim,
            window_size,
            heads=heads,
            dim_head=check_int("dim_key", dim_key, owner=type(self).__name__),
            dim_value=dim_value,
            dropout=dropout,
            separate_kv=True,
            **kwargs,
        )
        self.dim_key = dim_key
        self.local_interactive_module = keras.layers.Conv2D(
            self.value_dim,
            3,
            padding="same",
            dtype=self.dtype_policy,
            name="local_interactive_module",
        )

    def build(self, input_shape):
        super().build(input_shape)
        self.local_interactive_module.build((*input_shape[:-1], self.value_dim))

    def call(self, x, training=None):
        windows = self.partition(x)  # (b * windows, n, c)
        n = ops.shape(windows)[1]
        q, k, v = self.queries_keys_values(self.norm_layer(windows))
        out = self.attend(q, k, v, training=training)  # (b * windows, n, heads, dim_value)
        out = self.merge(ops.reshape(out, (-1, n, self.value_dim)), x)
        values = self.merge(ops.reshape(v, (-1, n, self.value_dim)), x)
        out = out + self.local_interactive_module(values)
        return self.out_dropout(self.to_out(out), training=training)

    def vit_pytorch_state_map(self):
        names = as_feature_map(_separate_key_value_names(self))
        names["local_interactive_module"] = self.local_interactive_module
        return names


@keras.saving.register_keras_serializable(package="vitkit")
class ScalableTransformer(VitkitLayer):
    """`depth` ScalableViT blocks on a map `(b, h, w, dim)`: scalable self-attention (SSA:
    keys and values pooled by a `ssa_reduction_factor` strided convolution), a feed-forward,
    in the first block a position encoding generator, a feed-forward and interactive windowed
    attention, each residual; then a channel LayerNorm if `norm_output`. (vit-pytorch lists
    the modules as SSA, FF, PEG, FF, IWSA and runs them in that order.)"""

    def __init__(
        self,
        dim,
        depth,
        heads=8,
        ff_expansion_factor=4,
        dropout=0.0,
        ssa_dim_key=32,
        ssa_dim_value=32,
        ssa_reduction_factor=1,
        iwsa_dim_key=32,
        iwsa_dim_value=32,
        iwsa_window_size=None,
        norm_output=True,
        **kwargs,
    ):
        super().__init__(**kwargs)
        owner = type(self).__name__
        self.dim = check_int("dim", dim, owner=owner)
        self.depth = check_int("depth", depth, minimum=0, owner=owner)
        self.heads = check_int("heads", heads, owner=owner)
        self.ff_expansion_factor = check_int(
            "ff_expansion_factor", ff_expansion_factor, owner=owner
        )
        self.dropout = check_rate("dropout", dropout, owner=owner)
        self.ssa_dim_key = ssa_dim_key
        self.ssa_dim_value = ssa_dim_value
        self.ssa_reduction_factor = ssa_reduction_factor
        self.iwsa_dim_key = iwsa_dim_key
        self.iwsa_dim_value = iwsa_dim_value
        self.iwsa_window_size = iwsa_window_size
        self.norm_output = norm_output

        policy = self.dtype_policy

        def feed_forward(name):
            return FeedForward(dim, dim * ff_expansion_factor, dropout, dtype=policy, name=name)

        self.blocks = []  # per block: [SSA, FF, PEG or None, FF, IWSA]
        for i in range(depth):
            self.blocks.append(
                [
                    SpatialReductionAttention(
                        dim,
                        ssa_reduction_factor,
                        heads=heads,
                        dim_head=ssa_dim_key,
                        dim_value=ssa_dim_value,
                        dropout=dropout,
                        dtype=policy,
                        name=f"ssa_{i}",
                    ),
                    feed_forward(f"ssa_feed_forward_{i}"),
                    PEG(dtype=policy, name=f"peg_{i}") if i == 0 else None,
                    feed_forward(f"iwsa_feed_forward_{i}"),
                    InteractiveWindowedAttention(
                        dim,
                        iwsa_window_size,
                        heads=heads,
                        dim_key=iwsa_dim_key,
                        dim_value=iwsa_dim_value,
                        dropout=dropout,
                        dtype=policy,
                        name=f"iwsa_{i}",
                    ),
                ]
            )
        self.norm = (
            keras.layers.LayerNormalization(epsilon=LN_EPSILON, dtype=policy, name="norm")
            if norm_output
            else None
        )

    def build(self, input_shape):
        for block in self.blocks:
            for layer in block:
                if layer is not None:
                    layer.build(input_shape)
        if self.norm is not None:
            self.norm.build(input_shape)

    def call(self, x, training=None):
        for ssa, ff1, peg, ff2, iwsa in self.blocks:
            x = stored_gradient(x)  # see backend_quirks.stored_gradient
            x = ssa(x, training=training) + x
            x = ff1(x, training=training) + x
            if peg is not None:
                x = peg(x)
            x = ff2(x, training=training) + x
            x = iwsa(x, training=training) + x
        return self.norm(x) if self.norm is not None else x

    def vit_pytorch_state_map(self):
        names = {}
        for i, (ssa, ff1, peg, ff2, iwsa) in enumerate(self.blocks):
            names[f"layers.{i}.0"] = as_feature_map(_separate_key_value_names(ssa))
            names[f"layers.{i}.1"] = as_feature_map(ff1.vit_pytorch_state_map())
            if peg is not None:
                names[f"layers.{i}.2"] = peg
            names[f"layers.{i}.3"] = as_feature_map(ff2.vit_pytorch_state_map())
            names[f"layers.{i}.4"] = iwsa
        if self.norm is not None:
            names["norm"] = channel_norm(self.norm)
        return names


# fmt: off
@register_model(
    # the smallest image (13 x 13) gives maps of 4 and 2: every attention sees 2 x 2 keys
    tiny=dict(
        num_classes=5, dim=8, depth=(1, 1), heads=(2, 1), reduction_factor=(2, 1),
        window_size=(4, None), iwsa_dim_key=3, iwsa_dim_value=5, ssa_dim_key=(6, 4),
        ssa_dim_value=7, ff_expansion_factor=2,
    ),
    invalid_size=(17, 13),  # 14 to 16 rows embed to the same maps as 13; 17 do not fit windows
    parity=[
        dict(num_classes=5, dim=8, depth=(1, 2), heads=(2, 1), reduction_factor=(2, 1),
             window_size=(4, None), iwsa_dim_key=3, iwsa_dim_value=5, ssa_dim_key=(6, 4),
             ssa_dim_value=7, ff_expansion_factor=2),
        dict(num_classes=3, dim=8, depth=(0, 1, 1, 0), heads=(1, 2, 2, 4),
             ssa_dim_key=(10, 10, 10, 8), reduction_factor=(4, 2, 2, 1),
             window_size=(4, 2, None, None), iwsa_dim_key=6, iwsa_dim_value=6, ssa_dim_value=6),
        dict(num_classes=4, dim=6, depth=(2,), heads=2, reduction_factor=1, channels=1,
             iwsa_dim_key=5, iwsa_dim_value=3, ssa_dim_key=4, ssa_dim_value=9, dropout=0.1),
    ],
    parity_sizes=[(32, 16), (32, 64), (12, 20)],
    presets={
        # ScalableViT-S, as in vit-tensorflow's README
        "scalable_vit_small": dict(
            num_classes=1000, dim=64, heads=(2, 4, 8, 16), depth=(2, 2, 20, 2),
            ssa_dim_key=(40, 40, 40, 32), reduction_factor=(8, 4, 2, 1),
            window_size=(64, 32, None, None),
        ),
    },
    invalid=[
        (dict(depth=2), "depth"),
        (dict(depth=(1, -1)), "depth"),
        (dict(heads=(2, 1, 1)), "heads"),
        (dict(reduction_factor=0), "reduction_factor"),
        (dict(window_size=(2, 0)), "window_size"),
        (dict(ssa_dim_key=0), "ssa_dim_key"),
        (dict(iwsa_dim_value=0), "iwsa_dim_value"),
        (dict(dropout=1.0), "dropout"),
        (dict(num_classes=0), "num_classes"),
    ],
    digits=dict(
        num_classes=10, dim=32, depth=(1, 1), heads=(2, 4), reduction_factor=(2, 1),
        window_size=(2, None), channels=1, ssa_dim_key=16, ssa_dim_value=16, iwsa_dim_key=16,
        iwsa_dim_value=16,
    ),
)
# fmt: on
@keras.saving.register_keras_serializable(package="vitkit")
class ScalableViT(VitkitModel):
    """ScalableViT: a 7x7 convolution of stride 4 embeds the image; `len(depth)` stages
    follow, the channels doubling after each (a 3x3 convolution of stride 2 shrinks the map),
    each stage `depth[i]` blocks of scalable self-attention (keys and values pooled by a
    `reduction_factor` strided convolution, keys `ssa_dim_key` wide) and interactive windowed
    attention (windows of `window_size`, `None` for the whole map, plus a 3x3 convolution over
    the values). Global average pooling, a LayerNorm and a linear head close it.

    Per-stage arguments take one value for every stage or a tuple with one per stage.

    Args:
        num_classes: number of outputs.
        dim: channels of the first stage (doubled at each stage after it).
        depth: a tuple, blocks per stage; its length is the number of stages.
        heads: attention heads.
        reduction_factor: kernel and stride of SSA's key/value convolution (the stage's map
            must be at least this large).
        window_size: IWSA window side (must divide the stage's map) or `None`.
        iwsa_dim_key, iwsa_dim_value: IWSA's query/key and value widths per head.
        ssa_dim_key, ssa_dim_value: SSA's query/key and value widths per head.
        ff_expansion_factor: feed-forward hidden width over the stage's channels.
        channels: image channels.
        dropout: dropout in attention and feed-forward blocks.
        data_format: `"channels_last"` (b, h, w, c) or `"channels_first"` (b, c, h, w).

    Example:
        >>> model = ScalableViT(num_classes=1000, dim=64, heads=(2, 4, 8, 16),
        ...                     depth=(2, 2, 20, 2), ssa_dim_key=(40, 40, 40, 32),
        ...                     reduction_factor=(8, 4, 2, 1), window_size=(64, 32, None, None),
        ...                     dropout=0.1)
        >>> model(np.zeros((1, 256, 256, 3))).shape
        (1, 1000)
    """

    def __init__(
        self,
        *,
        num_classes,
        dim,
        depth,
        heads,
        reduction_factor,
        window_size=None,
        iwsa_dim_key=32,
        iwsa_dim_value=32,
        ssa_dim_key=32,
        ssa_dim_value=32,
        ff_expansion_factor=4,
        channels=3,
        dropout=0.0,
        data_format="channels_last",
        **kwargs,
    ):
        super().__init__(data_format=data_format, **kwargs)
        owner = type(self).__name__
        self.num_classes = check_int("num_classes", num_classes, owner=owner)
        self.dim = check_int("dim", dim, owner=owner)
        if not isinstance(depth, (tuple, list)) or not depth:
            raise ValueError(
                f"{owner}: `depth` must be a tuple of the number of blocks at each stage; "
                f"got {depth!r}."
            )
        self.depth = depth
        depths = tuple(check_int("depth", d, minimum=0, owner=owner) for d in depth)
        stages = len(depths)
        self.heads = heads
        self.reduction_factor = reduction_factor
        self.window_size = window_size
        self.iwsa_dim_key = iwsa_dim_key
        self.iwsa_dim_value = iwsa_dim_value
        self.ssa_dim_key = ssa_dim_key
        self.ssa_dim_value = ssa_dim_value
        self.ff_expansion_factor = check_int("ff_expansion_factor", ff_expansion_factor,
                                             owner=owner)
        self.channels = check_int("channels", channels, owner=owner)
        self.dropout = check_rate("dropout", dropout, owner=owner)

        stage_values = {}
        for arg in ("heads", "reduction_factor", "window_size", "iwsa_dim_key",
                    "iwsa_dim_value", "ssa_dim_key", "ssa_dim_value"):
            values = per_stage(arg, getattr(self, arg), stages, owner, counted_by="depth")
            stage_values[arg] = tuple(
                None if v is None and arg == "window_size" else check_int(arg, v, owner=owner)
                for v in values
            )
        self.stage_windows = stage_values["window_size"]
        self.stage_reductions = stage_values["reduction_factor"]

        policy = self.dtype_policy
        self.to_patches = ConvNormAct(dim, 7, 4, 3, dtype=policy, name="to_patches")
        self.transformers, self.downsamples = [], []
        for i in range(stages):
            width, last = dim * 2**i, i == stages - 1
            self.transformers.append(
                ScalableTransformer(
                    width,
                    depths[i],
                    heads=stage_values["heads"][i],
                    ff_expansion_factor=ff_expansion_factor,
                    dropout=dropout,
                    ssa_dim_key=stage_values["ssa_dim_key"][i],
                    ssa_dim_value=stage_values["ssa_dim_value"][i],
                    ssa_reduction_factor=stage_values["reduction_factor"][i],
                    iwsa_dim_key=stage_values["iwsa_dim_key"][i],
                    iwsa_dim_value=stage_values["iwsa_dim_value"][i],
                    iwsa_window_size=stage_values["window_size"][i],
                    norm_output=not last,
                    dtype=policy,
                    name=f"transformer_{i}",
                )
            )
            self.downsamples.append(
                None
                if last
                else ConvNormAct(2 * width, 3, 2, 1, dtype=policy, name=f"downsample_{i}")
            )
        self.head_norm = keras.layers.LayerNormalization(
            epsilon=LN_EPSILON, dtype=policy, name="head_norm"
        )
        self.head = keras.layers.Dense(num_classes, dtype=policy, name="head")
        side = smallest_side(self.accepts_side, owner, "`window_size` and `reduction_factor`")
        self.image_hw = (side, side)  # the smallest image it takes

    size_rule = (
        "height and width whose maps every stage's `window_size` divides and no smaller than "
        "its `reduction_factor`"
    )

    def accepts_side(self, side: int) -> bool:
        """Whether an image side suits every stage (vit-pytorch's rules): each stage's
        window divides its map, which is at least `reduction_factor` large."""
        side = conv_output_size(side, 7, 4, 3)
        for i, (window, reduction) in enumerate(zip(self.stage_windows, self.stage_reductions)):
            if i:
                side = conv_output_size(side, 3, 2, 1)
            if side < reduction or (window is not None and side % window):
                return False
        return True


    def call(self, images, training=None):
        x = self.to_patches(to_channels_last(self.check_images(images), self.data_format))
        for transformer, downsample in zip(self.transformers, self.downsamples):
            x = transformer(x, training=training)
            if downsample is not None:
                x = downsample(x)
        return self.head(self.head_norm(ops.mean(x, axis=(1, 2))))

    def vit_pytorch_state_map(self):
        """Our weights under the names of `vit_pytorch.scalable_vit.ScalableViT`'s state
        dict."""
        names = {"to_patches": self.to_patches.conv, "mlp_head.1": self.head_norm,
                 "mlp_head.2": self.head}
        for i, (transformer, downsample) in enumerate(zip(self.transformers, self.downsamples)):
            names[f"layers.{i}.0"] = transformer
            if downsample is not None:
                names[f"layers.{i}.1.conv"] = downsample.conv
        return names
