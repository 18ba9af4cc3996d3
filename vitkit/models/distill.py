"""DeiT's distillation token: "Training data-efficient image transformers & distillation through
attention" (Touvron et al., ICML 2021, arXiv:2012.12877). The trainer that uses it is
`vitkit.trainers.distill.DistillWrapper`."""

from __future__ import annotations

import keras
from keras import ops

from vitkit.layers.utils import constructor_args
from vitkit.models.vit import ViT
from vitkit.registry import register_model


# fmt: off
@register_model(
    tiny=dict(
        image_size=(24, 20), patch_size=(4, 5), num_classes=7, dim=18, depth=2, heads=3,
        dim_head=5, mlp_dim=26,
    ),
    parity=[
        dict(image_size=(24, 20), patch_size=(4, 5), num_classes=7, dim=18, depth=2, heads=3,
             dim_head=5, mlp_dim=26),
        dict(image_size=32, patch_size=8, num_classes=5, dim=24, depth=3, heads=2, mlp_dim=40,
             pool="mean", channels=1, dim_head=7, dropout=0.1, emb_dropout=0.1),
        dict(image_size=(18, 30), patch_size=(6, 10), num_classes=3, dim=12, depth=1, heads=1,
             dim_head=12, mlp_dim=9, channels=2),
    ],
    invalid=[
        (dict(num_classes=0), "num_classes"),
        (dict(pool="max"), "pool"),
        (dict(image_size=(24, 21)), "image_size"),
        (dict(dropout=1.0), "dropout"),
    ],
    digits=dict(image_size=8, patch_size=2, num_classes=10, dim=64, depth=4, heads=4,
                dim_head=16, mlp_dim=128, channels=1),
)
# fmt: on
@keras.saving.register_keras_serializable(package="vitkit")
class DistillableViT(ViT):
    """A `ViT` that can carry DeiT's distillation token: the same arguments, the same weights,
    the same output, unless `call` is given a `distill_token`.

    `model(images, distill_token=token)` appends the `(1, dim)` token after the patch tokens
    (it gets no position embedding), runs the encoder, and returns the logits together with
    the encoded distillation token `(b, dim)`, which `DistillWrapper` sends to its own head.

    Args: those of `vitkit.models.vit.ViT`, except that `num_classes` must be at least 1.

    Example:
        >>> v = DistillableViT(image_size=256, patch_size=32, num_classes=1000, dim=1024,
        ...                    depth=6, heads=8, mlp_dim=2048, dropout=0.1, emb_dropout=0.1)
        >>> v(np.zeros((2, 256, 256, 3))).shape
        (2, 1000)
        >>> type(v.to_vit()).__name__
        'ViT'
    """

    min_classes = 1  # the distillation needs the class logits: no `num_classes=0` encoder

    def call(self, images, distill_token=None, training=None):
        x = self.embed(images)  # (b, [1 +] n, dim)
        if distill_token is None:
            return self.classify(self.encode(x, training=training))
        token = ops.cast(distill_token, x.dtype)  # (1, dim)
        tokens = ops.broadcast_to(token[None], (ops.shape(x)[0], 1, self.dim))
        x = self.encode(ops.concatenate([x, tokens], axis=1), training=training)
        return self.classify(x[:, :-1]), x[:, -1]  # (b, num_classes), (b, dim)

    def to_vit(self) -> ViT:
        """A plain `vitkit.models.vit.ViT` with this model's configuration and weights."""
        config = {arg: getattr(self, arg) for arg in constructor_args(ViT)}
        vit = ViT(**config, dtype=self.dtype_policy)
        vit.build_default()
        vit.set_weights(self.build_default().get_weights())
        return vit
