"""MAE: "Masked Autoencoders Are Scalable Vision Learners" (He et al., CVPR 2022,
arXiv:2111.06377): hide most patches, encode the rest, reconstruct the hidden pixels."""

from __future__ import annotations

import keras
from keras import ops

from vitkit.layers import Transformer
from vitkit.layers.utils import between, gather_tokens, integer
from vitkit.trainers.base import MaskedImageModeling


@keras.saving.register_keras_serializable(package="vitkit")
class MAE(MaskedImageModeling):
    """Pre-trains a ViT as the encoder of a masked autoencoder, with `fit`.

    Per image, a random `masking_ratio` of the patches is hidden (section 3: random sampling
    without replacement). The encoder embeds and encodes only the visible ones (no mask tokens,
    no class token); a small decoder sees the encoded visible tokens and one learned mask token
    per hidden patch, each with a decoder position embedding, and predicts the hidden patches'
    pixels. The loss is the mean squared error over the hidden patches (section 3,
    "Reconstruction target", without per-patch normalization, as vit-pytorch).

    `call(images)` returns each image's reconstruction loss `(b,)`; `compile` takes the
    optimizer (no loss); `fit(images)` needs no labels. Keep the encoder afterwards.

    Args:
        encoder: the ViT to pre-train (`vitkit.models.vit.ViT` or a kin with patch tokens and a
            learned position table).
        decoder_dim: width of the decoder's tokens.
        masking_ratio: share of patches hidden per image, in (0, 1).
        decoder_depth, decoder_heads, decoder_dim_head: the decoder transformer's size (its
            feed-forward is `4 * decoder_dim` wide).

    Example:
        >>> mae = MAE(encoder=v, masking_ratio=0.75, decoder_dim=512, decoder_depth=6)
        >>> mae.compile(optimizer="adam")
        >>> mae.fit(images, epochs=1)
    """

    def __init__(
        self,
        *,
        encoder,
        decoder_dim,
        masking_ratio=0.75,
        decoder_depth=1,
        decoder_heads=8,
        decoder_dim_head=64,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.keep_args(
            locals(),
            encoder=lambda name, value, owner: self.check_encoder(value),
            decoder_dim=integer(),
            masking_ratio=between(0, 1),
            decoder_depth=integer(),
            decoder_heads=integer(),
            decoder_dim_head=integer(),
        )
        self.num_masked = self.masked_count(masking_ratio)
        policy = self.dtype_policy
        self.enc_to_dec = (
            keras.layers.Dense(decoder_dim, dtype=policy, name="enc_to_dec")
            if encoder.dim != decoder_dim
            else None
        )
        self.decoder = Transformer(
            decoder_dim,
            decoder_depth,
            decoder_heads,
            decoder_dim_head,
            decoder_dim * 4,
            dtype=policy,
            name="decoder",
        )
        self.to_pixels = self.pixel_head()

    def build(self, input_shape):
        encoder = self.encoder
        if not encoder.built:
            encoder.build(input_shape)
        d = self.decoder_dim
        # vit-pytorch draws the mask token and the position table (nn.Embedding) from N(0, 1)
        self.mask_token = self.add_weight(
            shape=(d,), initializer=keras.initializers.RandomNormal(stddev=1.0), name="mask_token"
        )
        # One row per row of the encoder's position table, as in vit-pytorch (whose checkpoints
        # then load): the class token's row, where there is one, goes unused.
        self.decoder_pos_emb = self.add_weight(
            shape=(encoder.pos_embedding.length, d),
            initializer=keras.initializers.RandomNormal(stddev=1.0),
            name="decoder_pos_emb",
        )
        if self.enc_to_dec is not None:
            self.enc_to_dec.build((None, None, encoder.dim))
        self.decoder.build((None, None, d))
        self.to_pixels.build((None, None, d))

    def unused_encoder_layers(self):
        return [*super().unused_encoder_layers(), self.encoder.cls_token]

    def call(self, images, training=None, noise=None):
        """Each image's reconstruction loss `(b,)`. `noise` `(b, n)`, if given, fixes the
        masking: the patches with the `num_masked` smallest values are hidden."""
        patches = self.patches(images)  # (b, n, p1*p2*c)
        batch = ops.shape(patches)[0]
        order = (
            ops.argsort(noise, axis=-1)
            if noise is not None
            else self.random_order(batch, self.seed_generator)
        )
        masked, visible = order[:, : self.num_masked], order[:, self.num_masked :]

        tokens = gather_tokens(self.embed(patches), visible)  # (b, n_visible, dim)
        encoded = self.encoder.transformer(tokens, training=training)
        if self.enc_to_dec is not None:
            encoded = self.enc_to_dec(encoded)
        positions = ops.cast(self.decoder_pos_emb, encoded.dtype)
        visible_tokens = encoded + ops.take(positions, visible, axis=0)
        mask_tokens = ops.cast(self.mask_token, encoded.dtype) + ops.take(positions, masked, axis=0)
        # The decoder has no notion of order beyond its position embeddings (attention and the
        # feed-forward are permutation-equivariant), so the hidden patches' tokens can simply
        # follow the visible ones instead of being put back in grid order.
        decoded = self.decoder(
            ops.concatenate([visible_tokens, mask_tokens], axis=1), training=training
        )
        predicted = self.to_pixels(decoded[:, -self.num_masked :])  # (b, n_masked, pixels)
        target = gather_tokens(patches, masked)
        error = ops.square(ops.cast(predicted, "float32") - ops.cast(target, "float32"))
        return ops.mean(error, axis=(1, 2))

    def vit_pytorch_state_map(self):
        """Our weights under the names of `vit_pytorch.mae.MAE`'s state dict."""
        names = {
            "encoder": self.encoder,
            "patch_to_emb": self.patch_to_emb_state_map(),
            "mask_token": self.mask_token,
            "decoder": self.decoder,
            "decoder_pos_emb": {"weight": self.decoder_pos_emb},
            "to_pixels": self.to_pixels,
        }
        if self.enc_to_dec is not None:
            names["enc_to_dec"] = self.enc_to_dec
        return names
