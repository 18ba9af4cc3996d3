"""CvT: "CvT: Introducing Convolutions to Vision Transformers" (Wu et al., 2021,
arXiv:2103.15808)."""

from __future__ import annotations

import keras

from vitkit.convert.mapping import as_feature_map
from vitkit.layers import Attention, ConvNormAct, Transformer, map_to_tokens, tokens_to_map
from vitkit.layers.backend_quirks import call_sublayer, stored_gradient
from vitkit.layers.conv import spatial_size
from vitkit.layers.utils import DATA_FORMATS, check_choice, check_int, check_rate
from vitkit.models.base import VitkitModel
from vitkit.registry import register_model

STAGES = ("s1", "s2", "s3")
# The stage arguments, in vit-pytorch's order, and the defaults of its three stages (CvT-13).
STAGE_ARGS = (
    "emb_dim",
    "emb_kernel",
    "emb_stride",
    "proj_kernel",
    "kv_proj_stride",
    "heads",
    "depth",
    "mlp_mult",
)
DEFAULTS = {
    "s1": (64, 7, 4, 3, 2, 1, 1, 4),
    "s2": (192, 3, 2, 3, 2, 3, 2, 4),
    "s3": (384, 3, 2, 3, 2, 6, 10, 4),
}
DIM_HEAD = 64  # vit-pytorch's CvT keeps every head 64 wide, as the paper does


@keras.saving.register_keras_serializable(package="vitkit")
class ConvProjectionAttention(Attention):
    """Attention with convolutional projections (Sec. 3.2): the normed tokens, laid out as a
    feature map, go through a depth-wise convolution and BatchNorm before the point-wise
    projections to queries (stride 1) and to keys and values (stride `kv_proj_stride`, fewer
    keys than queries). Called on tokens `(b, h * w, dim)` with their grid `size=(h, w)`.

    Args:
        dim, heads, dim_head, dropout: as in `Attention`.
        proj_kernel: the depth-wise kernel (odd: padded to keep the grid).
        kv_proj_stride: stride of the key / value convolution.
        data_format: layout the convolutions run in.
    """

    fusable = True

    def __init__(
        self,
        dim,
        heads=1,
        dim_head=DIM_HEAD,
        dropout=0.0,
        proj_kernel=3,
        kv_proj_stride=2,
        data_format="channels_last",
        **kwargs,
    ):
        owner = type(self).__name__
        self.proj_kernel = check_int("proj_kernel", proj_kernel, owner=owner)
        self.kv_proj_stride = check_int("kv_proj_stride", kv_proj_stride, owner=owner)
        self.data_format = check_choice("data_format", data_format, DATA_FORMATS, owner)
        super().__init__(
            dim, heads, dim_head, dropout, project_out=True, separate_kv=True, **kwargs
        )

    def make_projections(self):
        conv = dict(
            depth_multiplier=1,
            kernel_size=self.proj_kernel,
            padding=self.proj_kernel // 2,
            use_bias=False,
            norm="batch",
            data_format=self.data_format,
            dtype=self.dtype_policy,
        )
        self.q_conv = ConvNormAct(strides=1, name="q_conv", **conv)
        self.kv_conv = ConvNormAct(strides=self.kv_proj_stride, name="kv_conv", **conv)
        super().make_projections()  # the point-wise `to_q`, `to_kv`

    def build_projections(self, input_shape):
        if self.data_format == "channels_last":
            map_shape = (None, None, None, self.dim)
        else:
            map_shape = (None, self.dim, None, None)
        self.q_conv.build(map_shape)
        self.kv_conv.build(map_shape)
        super().build_projections(input_shape)

    def call(self, x, size, training=None):
        fmap = tokens_to_map(call_sublayer(self.norm_layer, x), size, self.data_format)
        q = call_sublayer(self.q_conv, fmap, training=training)
        kv = call_sublayer(self.kv_conv, fmap, training=training)
        q = call_sublayer(self.to_q, map_to_tokens(q, self.data_format))
        kv = call_sublayer(self.to_kv, map_to_tokens(kv, self.data_format))
        (q,) = self.split_heads(q, 1)
        k, v = self.split_heads(kv, 2)
        return self.project(self.attend(q, k, v, training=training), training=training)

    def vit_pytorch_state_map(self, out="to_out.0"):
        """vit-pytorch's CvT `Attention`: `to_q.net` / `to_kv.net` are (depth-wise conv,
        BatchNorm, point-wise conv)."""
        return {
            "norm": self.norm_layer,
            "to_q": {
                "net.0": self.q_conv.conv,
                "net.1": self.q_conv.norm_layer,
                "net.2": self.to_q,
            },
            "to_kv": {
                "net.0": self.kv_conv.conv,
                "net.1": self.kv_conv.norm_layer,
                "net.2": self.to_kv,
            },
            out: self.to_out,
        }


@keras.saving.register_keras_serializable(package="vitkit")
class CvTTransformer(Transformer):
    """One CvT stage's blocks over a feature map: `x += attention(x); x += feed_forward(x)`
    (both pre-norm, no closing norm), the attention with convolutional projections.

    Args:
        dim, depth, heads: as in `Transformer` (heads are 64 wide).
        mlp_mult: feed-forward width over `dim`.
        proj_kernel, kv_proj_stride: as in `ConvProjectionAttention`.
        dropout: dropout inside the blocks.
        data_format: layout of the feature maps.
    """

    def __init__(
        self,
        dim,
        depth,
        heads,
        mlp_mult=4,
        proj_kernel=3,
        kv_proj_stride=2,
        dropout=0.0,
        data_format="channels_last",
        **kwargs,
    ):
        owner = type(self).__name__
        self.mlp_mult = check_int("mlp_mult", mlp_mult, owner=owner)
        self.proj_kernel = proj_kernel
        self.kv_proj_stride = kv_proj_stride
        self.data_format = check_choice("data_format", data_format, DATA_FORMATS, owner)
        super().__init__(
            dim, depth, heads, DIM_HEAD, dim * mlp_mult, dropout, final_norm=False, **kwargs
        )

    def make_attention(self, index):
        return ConvProjectionAttention(
            self.dim,
            self.heads,
            self.dim_head,
            self.dropout,
            self.proj_kernel,
            self.kv_proj_stride,
            self.data_format,
            dtype=self.dtype_policy,
            name=f"attention_{index}",
        )

    def build(self, input_shape):
        super().build((None, None, self.dim))  # the blocks see tokens

    def call(self, x, training=None):
        size = spatial_size(x, self.data_format)
        x = map_to_tokens(x, self.data_format)
        for attention, feed_forward in zip(self.attentions, self.feed_forwards):
            x = stored_gradient(x)  # see backend_quirks.stored_gradient
            x = call_sublayer(attention, x, size=size, training=training) + x
            x = call_sublayer(feed_forward, x, training=training) + x
        return tokens_to_map(x, size, self.data_format)

    def vit_pytorch_state_map(self):
        return as_feature_map(super().vit_pytorch_state_map())


def _stage_kwargs(prefix: str, values) -> dict:
    return {f"{prefix}_{arg}": value for arg, value in zip(STAGE_ARGS, values)}


# fmt: off
@register_model(
    tiny=dict(
        num_classes=7, s1_emb_dim=8, s1_emb_kernel=3, s1_emb_stride=2, s1_heads=1, s1_depth=1,
        s1_mlp_mult=2, s2_emb_dim=12, s2_heads=2, s2_depth=1, s2_mlp_mult=2, s3_emb_dim=16,
        s3_heads=2, s3_depth=1, s3_mlp_mult=2, s3_kv_proj_stride=1,
    ),
    parity=[
        dict(num_classes=7, s1_emb_dim=8, s1_emb_kernel=3, s1_emb_stride=2, s1_heads=1,
             s1_depth=1, s1_mlp_mult=2, s2_emb_dim=12, s2_heads=2, s2_depth=1, s2_mlp_mult=2,
             s3_emb_dim=16, s3_heads=2, s3_depth=1, s3_mlp_mult=2, s3_kv_proj_stride=1),
        dict(num_classes=5, channels=1, s1_emb_dim=6, s1_proj_kernel=5, s1_kv_proj_stride=3,
             s2_emb_dim=10, s2_emb_kernel=4, s2_heads=1, s2_depth=2, s2_mlp_mult=1,
             s3_emb_dim=14, s3_emb_stride=1, s3_heads=3, s3_depth=1, s3_mlp_mult=3,
             dropout=0.1),
        dict(num_classes=3, channels=2, s1_emb_dim=4, s1_emb_kernel=5, s1_emb_stride=3,
             s1_proj_kernel=1, s1_kv_proj_stride=1, s2_emb_dim=9, s2_emb_stride=1,
             s2_depth=1, s2_heads=2, s3_emb_dim=5, s3_depth=2, s3_heads=1, s3_proj_kernel=5),
    ],
    presets={
        "cvt_13": dict(num_classes=1000),
        "cvt_21": dict(num_classes=1000, s2_depth=4, s3_depth=16),
        "cvt_w24": dict(num_classes=1000, s1_emb_dim=192, s1_heads=3, s1_depth=2,
                        s2_emb_dim=768, s2_heads=12, s2_depth=2, s3_emb_dim=1024, s3_heads=16,
                        s3_depth=20),
    },
    invalid=[
        (dict(s2_proj_kernel=4), "s2_proj_kernel"),
        (dict(s1_emb_dim=0), "s1_emb_dim"),
        (dict(s3_kv_proj_stride=0), "s3_kv_proj_stride"),
        (dict(dropout=-0.1), "dropout"),
        (dict(num_classes=0), "num_classes"),
    ],
    digits=dict(num_classes=10, channels=1, s1_emb_dim=32, s1_emb_kernel=3, s1_emb_stride=1,
                s1_heads=1, s1_depth=1, s2_emb_dim=64, s2_heads=2, s2_depth=1, s3_emb_dim=96,
                s3_heads=2, s3_depth=1),
    input_size=(36, 20),
    any_size=True,
)
# fmt: on
@keras.saving.register_keras_serializable(package="vitkit")
class CvT(VitkitModel):
    """The Convolutional vision Transformer: three stages, each a strided convolution that
    embeds (and downsamples) the feature map, a channel LayerNorm, and transformer blocks whose
    queries, keys and values come from depth-wise convolutions; global average pooling and a
    linear head. It has no position embedding and takes images of any size.

    Args:
        num_classes: outputs.
        s{1,2,3}_emb_dim: channels of each stage.
        s{1,2,3}_emb_kernel, s{1,2,3}_emb_stride: its embedding convolution (padded by half
            the kernel).
        s{1,2,3}_proj_kernel: the depth-wise projection kernel (odd).
        s{1,2,3}_kv_proj_stride: stride of the key / value projection.
        s{1,2,3}_heads: attention heads (each 64 wide).
        s{1,2,3}_depth: blocks.
        s{1,2,3}_mlp_mult: feed-forward width over the stage's channels.
        dropout: dropout inside the blocks.
        channels: image channels.
        data_format: `"channels_last"` (b, h, w, c) or `"channels_first"` (b, c, h, w).

    Example:
        >>> model = CvT(num_classes=10, s1_emb_dim=32, s2_emb_dim=64, s3_emb_dim=96, s3_depth=2)
        >>> model(np.zeros((1, 64, 64, 3))).shape
        (1, 10)
    """

    def __init__(
        self,
        *,
        num_classes,
        s1_emb_dim=64,
        s1_emb_kernel=7,
        s1_emb_stride=4,
        s1_proj_kernel=3,
        s1_kv_proj_stride=2,
        s1_heads=1,
        s1_depth=1,
        s1_mlp_mult=4,
        s2_emb_dim=192,
        s2_emb_kernel=3,
        s2_emb_stride=2,
        s2_proj_kernel=3,
        s2_kv_proj_stride=2,
        s2_heads=3,
        s2_depth=2,
        s2_mlp_mult=4,
        s3_emb_dim=384,
        s3_emb_kernel=3,
        s3_emb_stride=2,
        s3_proj_kernel=3,
        s3_kv_proj_stride=2,
        s3_heads=6,
        s3_depth=10,
        s3_mlp_mult=4,
        dropout=0.0,
        channels=3,
        data_format="channels_last",
        **kwargs,
    ):
        super().__init__(data_format=data_format, **kwargs)
        owner = type(self).__name__
        given = dict(locals())
        self.num_classes = check_int("num_classes", num_classes, owner=owner)
        self.dropout = check_rate("dropout", dropout, owner)
        self.channels = check_int("channels", channels, owner=owner)
        self.stage_args = {}
        for prefix in STAGES:
            args = {arg: given[f"{prefix}_{arg}"] for arg in STAGE_ARGS}
            for arg, value in args.items():
                setattr(self, f"{prefix}_{arg}", check_int(f"{prefix}_{arg}", value, owner=owner))
            if args["proj_kernel"] % 2 == 0:
                raise ValueError(f"{owner}: `{prefix}_proj_kernel` must be odd (the projections "
                                 f"keep the grid); got {args['proj_kernel']}.")
            self.stage_args[prefix] = args
        self.image_hw = None  # any size

        policy = self.dtype_policy
        self.embeddings, self.stages = [], []
        for prefix in STAGES:
            args = self.stage_args[prefix]
            self.embeddings.append(ConvNormAct(
                args["emb_dim"], args["emb_kernel"], args["emb_stride"], args["emb_kernel"] // 2,
                norm="layer", data_format=data_format, dtype=policy, name=f"{prefix}_embedding",
            ))
            self.stages.append(CvTTransformer(
                args["emb_dim"], args["depth"], args["heads"], args["mlp_mult"],
                args["proj_kernel"], args["kv_proj_stride"], dropout, data_format,
                dtype=policy, name=f"{prefix}_transformer",
            ))
        self.pooling = keras.layers.GlobalAveragePooling2D(data_format=data_format, dtype=policy)
        self.head = keras.layers.Dense(num_classes, dtype=policy, name="head")

    @property
    def default_image_hw(self) -> tuple[int, int]:
        # CvT has no configured size and its weights do not depend on it: build, export and
        # feed the CLI's data at 32x32 unless told otherwise.
        return (32, 32)

    def check_spatial(self, height, width):
        pass  # the padded embeddings give at least one position for every size

    def call(self, images, training=None):
        x = self.check_images(images)
        for embedding, stage in zip(self.embeddings, self.stages):
            x = embedding(x, training=training)  # conv + channel LayerNorm
            x = stage(x, training=training)
        return self.head(self.pooling(x))

    def vit_pytorch_state_map(self):
        """Our weights under the names of `vit_pytorch.cvt.CvT`'s state dict."""
        layers = {}
        for i, (embedding, stage) in enumerate(zip(self.embeddings, self.stages)):
            layers[f"{i}"] = {**embedding.vit_pytorch_state_map(conv="0", norm="1"),
                              "2": stage}
        return {"layers": layers, "to_logits.2": self.head}
