"""The ViT layout that several of vit-pytorch's variants keep and change in one or two places:
DeepViT (re-attention), Parallel ViT (parallel branches) and the ViT for small datasets (shifted
patch tokens, locality self-attention). Not an architecture of its own: nothing registers it.
"""

from __future__ import annotations

from vitkit.models.vit import ViT


class ClassicViT(ViT):
    """`ViT`'s arguments and pipeline, as vit-pytorch's older variants lay it out: a class
    token always prepended (`pool="mean"` averages it too), a transformer without a closing
    LayerNorm, then pooling, LayerNorm and a linear head; `num_classes` >= 1.

    Subclasses say which transformer runs over the tokens (`make_transformer`, usually through
    `make_stack`) and may change how images become tokens (`make_patch_embedding`).
    """

    min_classes = 1
    with_class_token = True
    norm_before_head = True
    batched_reference_tables = True  # (1, n, dim) tables

    def make_transformer(self):
        """The encoder, `(b, n, dim) -> (b, n, dim)`; subclasses use `make_stack`."""
        raise NotImplementedError(f"{type(self).__name__} must define make_transformer()")

    def make_stack(self, cls, **options):
        """A `Transformer` class `cls` with this model's sizes and dropout and no closing
        LayerNorm (the head has it); `options` add constructor arguments."""
        return cls(
            self.dim,
            self.depth,
            self.heads,
            self.dim_head,
            self.mlp_dim,
            dropout=self.dropout,
            final_norm=False,
            dtype=self.dtype_policy,
            name="transformer",
            **options,
        )
