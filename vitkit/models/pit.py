"""PiT: "Rethinking Spatial Dimensions of Vision Transformers" (Heo et al., 2021,
arXiv:2103.16302)."""

from __future__ import annotations

import keras
from keras import ops

from vitkit.convert.mapping import Pointwise, Reshaped, Transformed
from vitkit.layers import (
    ClassToken,
    ConvNormAct,
    LearnedPositionEmbedding,
    Transformer,
    map_to_tokens,
    tokens_to_map,
)
from vitkit.layers.attention import LN_EPSILON
from vitkit.layers.base import VitkitLayer
from vitkit.layers.conv import Conv2D, conv_output_size
from vitkit.layers.utils import (
    DATA_FORMATS,
    check_choice,
    check_divisible,
    check_int,
    check_int_tuple,
    check_pair,
    check_rate,
)
from vitkit.models.base import VitkitModel
from vitkit.registry import register_model


@keras.saving.register_keras_serializable(package="vitkit")
class PoolingLayer(VitkitLayer):
    """PiT's pooling between stages (Sec. 3.2): the patch tokens, laid out on their grid, go
    through a depth-wise convolution (kernel 3, stride 2, two outputs per channel) and a
    point-wise projection, which halves the grid and doubles the width; the class token gets a
    linear layer to the new width. `(b, 1 + h * w, dim) -> (b, 1 + ceil(h/2) * ceil(w/2), 2 dim)`.

    Args:
        dim: token width in (out: `2 * dim`).
        data_format: layout the convolution runs in.
    """

    def __init__(self, dim, data_format="channels_last", **kwargs):
        super().__init__(**kwargs)
        owner = type(self).__name__
        self.dim = check_int("dim", dim, owner=owner)
        self.data_format = check_choice("data_format", data_format, DATA_FORMATS, owner)
        policy = self.dtype_policy
        self.cls_ff = keras.layers.Dense(2 * dim, dtype=policy, name="cls_ff")
        self.depthwise = ConvNormAct(
            depth_multiplier=2,
            kernel_size=3,
            strides=2,
            padding=1,
            data_format=data_format,
            dtype=policy,
            name="depthwise",
        )
        self.pointwise = keras.layers.Dense(2 * dim, dtype=policy, name="pointwise")

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        return self.depthwise.output_size(height, width)

    def build(self, input_shape):
        self.cls_ff.build((None, 1, self.dim))
        if self.data_format == "channels_last":
            self.depthwise.build((None, None, None, self.dim))
        else:
            self.depthwise.build((None, self.dim, None, None))
        self.pointwise.build((None, None, 2 * self.dim))

    def call(self, x, size):
        cls_token, tokens = x[:, :1], x[:, 1:]
        fmap = self.depthwise(tokens_to_map(tokens, size, self.data_format))
        tokens = self.pointwise(map_to_tokens(fmap, self.data_format))
        return ops.concatenate([self.cls_ff(cls_token), tokens], axis=1)

    def vit_pytorch_state_map(self):
        return {
            "cls_ff": self.cls_ff,
            "downsample.net.0": self.depthwise.conv,
            "downsample.net.1": Pointwise(self.pointwise),
        }


def _unfolded_linear(kernel_shape):
    """torch `Unfold` + `Linear` weight `(dim, C * kh * kw)`, patches flattened in (c, kh, kw)
    order, -> the Keras `Conv2D` kernel `(kh, kw, C, dim)` that computes the same."""
    kh, kw, c, dim = kernel_shape

    def transform(array):
        return array.reshape(dim, c, kh, kw).transpose(2, 3, 1, 0)

    return transform


# fmt: off
@register_model(
    tiny=dict(
        image_size=(24, 16), patch_size=4, num_classes=7, dim=8, depth=(1, 1), heads=(1, 2),
        dim_head=6, mlp_dim=20,
    ),
    parity=[
        dict(image_size=24, patch_size=4, num_classes=7, dim=8, depth=(1, 2), heads=2,
             dim_head=6, mlp_dim=20),
        dict(image_size=28, patch_size=7, num_classes=5, dim=6, depth=(1, 1, 1),
             heads=(1, 2, 3), dim_head=6, mlp_dim=9, channels=2),
        dict(image_size=16, patch_size=2, num_classes=3, dim=10, depth=(2,), heads=3,
             dim_head=4, mlp_dim=12, dropout=0.1, emb_dropout=0.1, channels=1),
    ],
    invalid=[
        (dict(depth=3), "depth"),
        (dict(heads=(1, 2, 3)), "heads"),
        (dict(depth=(1,)), "depth"),  # two `heads` given
        (dict(patch_size=1), "patch_size"),
        (dict(image_size=(24, 18)), "image_size"),
        (dict(emb_dropout=1.0), "emb_dropout"),
    ],
    invalid_size=(26, 16),  # one more row of patches (24 + 2, the patch stride)
    digits=dict(image_size=8, patch_size=2, num_classes=10, dim=32, depth=(2, 2), heads=(2, 4),
                dim_head=16, mlp_dim=64, channels=1),
)
# fmt: on
@keras.saving.register_keras_serializable(package="vitkit")
class PiT(VitkitModel):
    """The Pooling-based Vision Transformer: ViT whose token grid shrinks between stages, as a
    CNN's does. Overlapping patches (stride half the patch) are embedded, a class token and
    learned positions are added, and each stage's transformer is followed by a depth-wise
    convolution that halves the grid and doubles the width (the class token follows through a
    linear layer). LayerNorm and a linear head on the class token.

    Args:
        image_size: int or (height, width). Smaller images whose patch grid fits in the
            configured one work too (they use the first positions).
        patch_size: int or (height, width), at least 2; must divide `image_size`. The patches
            overlap: their stride is half their size.
        num_classes: outputs.
        dim: token width of the first stage (doubled at every pooling).
        depth: a tuple, the blocks of each stage.
        heads: attention heads, one for all stages or a tuple with one per stage.
        mlp_dim: feed-forward width (the same in every stage).
        dim_head: width of each attention head.
        dropout: dropout inside the transformer.
        emb_dropout: dropout on the embedded tokens.
        channels: image channels.
        data_format: `"channels_last"` (b, h, w, c) or `"channels_first"` (b, c, h, w).

    Example:
        >>> model = PiT(image_size=32, patch_size=4, num_classes=10, dim=32, depth=(1, 1),
        ...             heads=2, mlp_dim=64)
        >>> model(np.zeros((1, 32, 32, 3))).shape
        (1, 10)
    """

    def __init__(
        self,
        *,
        image_size,
        patch_size,
        num_classes,
        dim,
        depth,
        heads,
        mlp_dim,
        dim_head=64,
        dropout=0.0,
        emb_dropout=0.0,
        channels=3,
        data_format="channels_last",
        **kwargs,
    ):
        super().__init__(data_format=data_format, **kwargs)
        owner = type(self).__name__
        self.image_size = image_size
        self.patch_size = patch_size
        self.num_classes = check_int("num_classes", num_classes, owner=owner)
        self.dim = check_int("dim", dim, owner=owner)
        self.depth = check_int_tuple("depth", depth, owner=owner)
        stages = len(self.depth)
        if isinstance(heads, (tuple, list)):
            self.heads = check_int_tuple(
                "heads", heads, owner=owner, length=stages, counted_by="depth"
            )
        else:
            self.heads = check_int("heads", heads, owner=owner)
        self.mlp_dim = check_int("mlp_dim", mlp_dim, owner=owner)
        self.dim_head = check_int("dim_head", dim_head, owner=owner)
        self.dropout = check_rate("dropout", dropout, owner)
        self.emb_dropout = check_rate("emb_dropout", emb_dropout, owner)
        self.channels = check_int("channels", channels, owner=owner)
        self.image_hw = check_pair("image_size", image_size, owner=owner)
        self.patch_hw = check_pair("patch_size", patch_size, minimum=2, owner=owner)
        check_divisible(self.image_hw, self.patch_hw, owner)
        self.stride_hw = (self.patch_hw[0] // 2, self.patch_hw[1] // 2)
        self.grid = self.patch_grid(*self.image_hw)
        stage_heads = self.heads if isinstance(self.heads, tuple) else (self.heads,) * stages

        policy = self.dtype_policy
        # Unfold(patch, stride patch // 2) + Linear is a strided convolution.
        self.patch_embed = Conv2D(
            dim, self.patch_hw, self.stride_hw, data_format=data_format, dtype=policy,
            name="patch_embed",
        )
        self.cls_token = ClassToken(dtype=policy, name="cls_token")
        self.pos_embedding = LearnedPositionEmbedding(
            self.grid[0] * self.grid[1] + 1, dtype=policy, name="pos_embedding"
        )
        self.embedding_dropout = keras.layers.Dropout(emb_dropout, dtype=policy)
        self.stages, self.poolings = [], []
        width = dim
        for i, (stage_depth, n_heads) in enumerate(zip(self.depth, stage_heads)):
            self.stages.append(Transformer(
                width, stage_depth, n_heads, dim_head, mlp_dim, dropout, final_norm=False,
                dtype=policy, name=f"transformer_{i}",
            ))
            if i < stages - 1:
                self.poolings.append(PoolingLayer(width, data_format, dtype=policy,
                                                  name=f"pool_{i}"))
                width *= 2
        self.norm = keras.layers.LayerNormalization(epsilon=LN_EPSILON, dtype=policy,
                                                    name="norm")
        self.head = keras.layers.Dense(num_classes, dtype=policy, name="head")

    def patch_grid(self, height, width) -> tuple[int, int]:
        """(rows, cols) of the overlapping patches of an image."""
        return tuple(
            conv_output_size(n, p, s)
            for n, p, s in zip((height, width), self.patch_hw, self.stride_hw)
        )

    def check_spatial(self, height, width):
        rows, cols = self.patch_grid(height, width)
        if not (1 <= rows <= self.grid[0] and 1 <= cols <= self.grid[1]):
            self.bad_input(
                f"at least `patch_size` {self.patch_hw} and at most the {self.grid[0]}x"
                f"{self.grid[1]} patches of `image_size` {self.image_hw}",
                f"{height}x{width} images ({rows}x{cols} patches)",
            )

    def call(self, images, training=None):
        x = self.patch_embed(self.check_images(images))
        size = x.shape[1:3] if self.data_format == "channels_last" else x.shape[2:4]
        x = self.cls_token(map_to_tokens(x, self.data_format))  # (b, 1 + h * w, dim)
        x = self.embedding_dropout(self.pos_embedding(x), training=training)
        for i, stage in enumerate(self.stages):
            x = stage(x, training=training)
            if i < len(self.poolings):
                x = self.poolings[i](x, size=size)
                size = self.poolings[i].output_size(*size)
        return self.head(self.norm(x[:, 0]))

    def vit_pytorch_state_map(self):
        """Our weights under the names of `vit_pytorch.pit.PiT`'s state dict."""
        kernel = self.patch_embed.kernel
        kh, kw, c, dim = kernel.shape
        layers = {}
        for i, stage in enumerate(self.stages):
            layers[f"{2 * i}"] = stage
            if i < len(self.poolings):
                layers[f"{2 * i + 1}"] = self.poolings[i]
        return {
            "to_patch_embedding.2": {
                "weight": Transformed(kernel, (dim, c * kh * kw), _unfolded_linear(kernel.shape)),
                "bias": self.patch_embed.bias,
            },
            "cls_token": Reshaped(self.cls_token.token, (1, 1, dim)),
            "pos_embedding": Reshaped(self.pos_embedding.embedding,
                                      (1, *self.pos_embedding.embedding.shape)),
            "layers": layers,
            "mlp_head.0": self.norm,
            "mlp_head.1": self.head,
        }
