"""SimMIM: "SimMIM: A Simple Framework for Masked Image Modeling" (Xie et al., CVPR 2022,
arXiv:2111.09886): replace random patches by a mask token, regress their pixels linearly."""

from __future__ import annotations

import keras
from keras import ops

from vitkit.layers.utils import between, gather_tokens
from vitkit.trainers.base import MaskedImageModeling


@keras.saving.register_keras_serializable(package="vitkit")
class SimMIM(MaskedImageModeling):
    """Pre-trains a ViT by masked image modelling, with `fit`.

    Per image, a random `masking_ratio` of the patch tokens is replaced by one learned mask
    token (plus the patch's position embedding); the encoder sees every position; a linear head
    maps each masked position's output to its pixels; the loss is the L1 distance on the masked
    patches (section 3.1 and 3.3 of the paper), divided by the number of masked patches as in
    vit-pytorch.

    `call(images)` returns each image's loss `(b,)`; `compile` takes the optimizer (no loss);
    `fit(images)` needs no labels.

    Args:
        encoder: the ViT to pre-train (`vitkit.models.vit.ViT` or a kin with patch tokens and a
            learned position table).
        masking_ratio: share of patches masked per image, in (0, 1).

    Example:
        >>> mim = SimMIM(encoder=v, masking_ratio=0.5)
        >>> mim.compile(optimizer="adam")
        >>> mim.fit(images, epochs=1)
    """

    def __init__(self, *, encoder, masking_ratio=0.5, **kwargs):
        super().__init__(**kwargs)
        self.keep_args(
            locals(),
            encoder=lambda name, value, owner: self.check_encoder(value),
            masking_ratio=between(0, 1),
        )
        self.num_masked = self.masked_count(masking_ratio)
        self.to_pixels = self.pixel_head()

    def build(self, input_shape):
        encoder = self.encoder
        if not encoder.built:
            encoder.build(input_shape)
        self.mask_token = self.add_weight(  # N(0, 1), as vit-pytorch draws it
            shape=(encoder.dim,),
            initializer=keras.initializers.RandomNormal(stddev=1.0),
            name="mask_token",
        )
        self.to_pixels.build((None, None, encoder.dim))

    def unused_encoder_layers(self):
        return [*super().unused_encoder_layers(), self.encoder.cls_token]

    def call(self, images, training=None, noise=None):
        """Each image's loss `(b,)`. `noise` `(b, n)`, if given, fixes the masking: the
        patches with the `num_masked` largest values are masked."""
        patches = self.patches(images)  # (b, n, p1*p2*c)
        if noise is None:
            noise = keras.random.uniform(ops.shape(patches)[:2], seed=self.seed_generator)
        _, masked = ops.top_k(noise, self.num_masked)  # (b, n_masked)
        n = self.encoder.num_patches
        is_masked = ops.any(ops.equal(masked[..., None], ops.arange(n)), axis=1)  # (b, n)

        tokens = self.encoder.patch_embed.embed_patches(patches)
        mask_tokens = ops.broadcast_to(ops.cast(self.mask_token, tokens.dtype), ops.shape(tokens))
        tokens = ops.where(is_masked[..., None], mask_tokens, tokens)
        tokens = tokens + ops.cast(self.patch_positions(), tokens.dtype)[None]
        encoded = self.encoder.transformer(tokens, training=training)

        predicted = self.to_pixels(gather_tokens(encoded, masked))  # (b, n_masked, pixels)
        target = gather_tokens(patches, masked)
        error = ops.abs(ops.cast(predicted, "float32") - ops.cast(target, "float32"))
        return ops.mean(error, axis=(1, 2)) / self.num_masked

    def vit_pytorch_state_map(self):
        """Our weights under the names of `vit_pytorch.simmim.SimMIM`'s state dict."""
        return {
            "encoder": self.encoder,
            "patch_to_emb": self.patch_to_emb_state_map(),
            "mask_token": self.mask_token,
            "to_pixels": self.to_pixels,
        }
