"""ViT around a transformer of your choice: vit-pytorch's `efficient.ViT`, the plain ViT
front and head (Dosovitskiy et al., arXiv:2010.11929) with the encoder left open, for efficient
attention variants such as Nystromformer (Xiong et al., 2021, arXiv:2102.03902)."""

from __future__ import annotations

import keras

from vitkit.layers.utils import integer
from vitkit.models.base import ViTLayout
from vitkit.registry import register_model


def _transformer(dim, depth, heads, dim_head, mlp_dim):
    """A `vitkit.layers.Transformer` in the serialized form the registry's configs hold, so
    that every model built from them gets a fresh one."""
    config = dict(dim=dim, depth=depth, heads=heads, dim_head=dim_head, mlp_dim=mlp_dim)
    return {"class_name": "vitkit>Transformer", "config": config}


# fmt: off
@register_model(
    tiny=dict(
        image_size=(24, 20), patch_size=4, num_classes=7, dim=18,
        transformer=_transformer(dim=18, depth=2, heads=3, dim_head=5, mlp_dim=26),
    ),
    parity=[
        dict(image_size=(24, 20), patch_size=4, num_classes=7, dim=18,
             transformer=_transformer(dim=18, depth=2, heads=3, dim_head=5, mlp_dim=26)),
        dict(image_size=32, patch_size=8, num_classes=5, dim=24, pool="mean", channels=1,
             transformer=_transformer(dim=24, depth=3, heads=2, dim_head=7, mlp_dim=40)),
        dict(image_size=(18, 30), patch_size=6, num_classes=3, dim=12, channels=2,
             transformer=_transformer(dim=12, depth=1, heads=1, dim_head=12, mlp_dim=9)),
    ],
    invalid=[
        (dict(patch_size=(4, 5)), "patch_size"),
        (dict(image_size=(24, 21)), "image_size"),
        (dict(pool="max"), "pool"),
        (dict(transformer="transformer"), "transformer"),
        (dict(dim=16), "dim"),  # the transformer takes 18-wide tokens
        (dict(transformer=_transformer(dim=18, depth=0, heads=3, dim_head=5, mlp_dim=26)),
         "transformer"),
        (dict(num_classes=0), "num_classes"),
    ],
    digits=dict(image_size=8, patch_size=2, num_classes=10, dim=64, channels=1,
                transformer=_transformer(dim=64, depth=4, heads=4, dim_head=16, mlp_dim=128)),
)
# fmt: on
# vit-pytorch has many `ViT`s: the package tells Keras which one this is.
@keras.saving.register_keras_serializable(package="vitkit.efficient")
class ViT(ViTLayout):
    """ViT with the encoder passed in: patch tokens (LayerNorm, projection, LayerNorm), a
    class token and learned positions go through `transformer`; the class token (or the mean
    of all tokens) goes through LayerNorm and a linear head.

    Args:
        image_size: int or (height, width). Smaller images work too, if both sides are
            divisible by the patch; they use the first rows of the position table.
        patch_size: int (square patches, as in vit-pytorch); must divide `image_size`.
        num_classes: number of outputs.
        dim: token width.
        transformer: any Keras layer mapping tokens `(b, n, dim) -> (b, n, dim)`, or its
            serialized form (`keras.saving.serialize_keras_object`); it is saved with the
            model. A serialized layer without a dtype takes the model's dtype policy.
        pool: `"cls"` (class token) or `"mean"` (mean of all tokens, the class token too).
        channels: image channels.
        data_format: `"channels_last"` (b, h, w, c) or `"channels_first"` (b, c, h, w).

    Example:
        >>> from vitkit.layers import Transformer
        >>> v = ViT(image_size=224, patch_size=16, num_classes=1000, dim=512,
        ...         transformer=Transformer(dim=512, depth=12, heads=8, dim_head=64,
        ...                                 mlp_dim=1024))
        >>> v(np.zeros((1, 224, 224, 3))).shape
        (1, 1000)
    """

    layer_arguments = ("transformer",)  # saved serialized, rebuilt by `from_config`
    with_class_token = True  # also with pool="mean": the mean takes it in
    norm_before_head = True

    def __init__(
        self,
        *,
        image_size,
        patch_size,
        num_classes,
        dim,
        transformer,
        pool="cls",
        channels=3,
        data_format="channels_last",
        **kwargs,
    ):
        super().__init__(data_format=data_format, **kwargs)
        # square patches only, as in vit-pytorch
        self.keep_args(locals(), patch_size=integer(), transformer=self.as_layer)
        rows, cols = self.patch_grid()
        self.make_layers(rows * cols)

    def as_layer(self, name, transformer, owner):
        """`transformer`'s rule: a layer, or its config (deserialized)."""
        if isinstance(transformer, dict):
            transformer = dict(transformer, config=dict(transformer.get("config", {})))
            transformer["config"].setdefault("dtype", self.dtype_policy.name)
            try:
                transformer = keras.saving.deserialize_keras_object(transformer)
            except (TypeError, ValueError) as err:
                # Keras wraps the layer's own message in a TypeError that names no argument.
                raise ValueError(
                    f"{owner}: `{name}` is a config that does not build a layer: {err}"
                ) from None
        if not isinstance(transformer, keras.layers.Layer):
            raise ValueError(
                f"{owner}: `{name}` must be a Keras layer mapping tokens "
                f"(b, n, dim) -> (b, n, dim), or its serialized config; got {transformer!r}."
            )
        # A layer that states its token width (vitkit's `Transformer`) must take `dim`-wide
        # tokens; otherwise the first residual sum inside it would fail on a shape.
        width = getattr(transformer, "dim", None)
        if isinstance(width, int) and width != self.dim:
            raise ValueError(
                f"{owner}: `{name}` takes tokens of width {width}, but `dim` is {self.dim}; "
                "they must be equal."
            )
        return transformer

    def make_transformer(self):
        return self.transformer  # the argument

    def encode(self, x, training=None):
        y = super().encode(x, training=training)
        if tuple(y.shape[1:]) != tuple(x.shape[1:]):
            raise ValueError(
                f"{type(self).__name__}: `transformer` must map tokens (b, n, dim) to the same "
                f"shape; it turned {tuple(x.shape)} into {tuple(y.shape)}."
            )
        return y
