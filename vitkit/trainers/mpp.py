"""Masked patch prediction: the self-supervised objective of ViT's section 4.6 and appendix B.1.2
(Dosovitskiy et al., ICLR 2021, arXiv:2010.11929), BERT's masking applied to patches."""

from __future__ import annotations

import math

import keras
import numpy as np
from keras import ops

from vitkit.convert.mapping import Reshaped
from vitkit.layers.utils import (
    between,
    check_pair,
    check_positive,
    gather_tokens,
    integer,
    optional,
)
from vitkit.trainers.base import MaskedImageModeling


def per_channel(name, value, owner):
    if not isinstance(value, (list, tuple)) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
    ):
        raise ValueError(
            f"{owner}: `{name}` must be a list of numbers, one per channel; got {value!r}."
        )
    return tuple(float(v) for v in value)


@keras.saving.register_keras_serializable(package="vitkit")
class MPP(MaskedImageModeling):
    """Pre-trains a ViT by masked patch prediction, with `fit`.

    As BERT masks words, a `mask_prob` share of the patches (rounded up) is chosen per image;
    of those, some are replaced by a patch from elsewhere in the same image
    (`random_patch_prob`), some by a learned mask patch (`replace_prob`; it wins where both
    apply), the rest are left as they are. The ViT (class token, positions, embedding dropout,
    transformer) runs on the corrupted patches, and a linear head predicts, for each chosen
    patch, its mean colour quantized to `output_channel_bits` bits per channel: one of
    `2 ** (bits * channels)` classes, trained with cross-entropy.

    `call(images)` returns each image's loss `(b,)`; `compile` takes the optimizer (no loss);
    `fit(images)` needs no labels.

    Args:
        transformer: the ViT to pre-train (`vitkit.models.vit.ViT` or a kin with a class
            token, patch tokens and a learned position table).
        patch_size: the ViT's patch size.
        dim: the ViT's token width.
        output_channel_bits: bits per channel of the predicted mean colour.
        channels: the image channels.
        max_pixel_val: the largest pixel value (the quantization's range is [0, this]).
        mask_prob: share of patches chosen per image, in (0, 1].
        replace_prob: chance that a chosen patch becomes the mask patch, in [0, 1).
        random_patch_prob: chance that a chosen patch becomes another patch of the image.
        mean, std: per-channel statistics the images were normalized with; the targets are
            computed on the un-normalized pixels.

    Example:
        >>> mpp = MPP(transformer=v, patch_size=32, dim=1024, mask_prob=0.15)
        >>> mpp.compile(optimizer="adam")
        >>> mpp.fit(images, epochs=1)
    """

    layer_arguments = ("transformer",)
    encoder_argument = "transformer"

    def __init__(
        self,
        transformer,
        patch_size,
        dim,
        output_channel_bits=3,
        channels=3,
        max_pixel_val=1.0,
        mask_prob=0.15,
        replace_prob=0.5,
        random_patch_prob=0.5,
        mean=None,
        std=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.keep_args(
            locals(),
            transformer=lambda name, value, owner: self.check_encoder(value),
            patch_size=lambda name, value, owner: check_pair(name, value, owner=owner),
            dim=integer(),
            output_channel_bits=integer(),
            channels=integer(),
            max_pixel_val=lambda name, value, owner: check_positive(name, value, owner),
            mask_prob=between(0, 1, high_closed=True),
            replace_prob=between(0, 1, low_closed=True),
            random_patch_prob=between(0, 1, low_closed=True, high_closed=True),
            mean=optional(per_channel),
            std=optional(per_channel),
        )
        self.check_matches_transformer()
        n = transformer.num_patches
        self.num_chosen = math.ceil(mask_prob * n)
        self.classes = 2 ** (output_channel_bits * channels)
        policy = self.dtype_policy
        self.to_bits = keras.layers.Dense(self.classes, dtype=policy, name="to_bits")

    def check_matches_transformer(self):
        t, owner = self.transformer, type(self).__name__
        given = {
            "patch_size": (self.patch_size, tuple(t.patch_hw)),
            "dim": (self.dim, t.dim),
            "channels": (self.channels, t.input_channels),
        }
        for name, (ours, theirs) in given.items():
            if ours != theirs:
                raise ValueError(
                    f"{owner}: `{name}` {ours} differs from the transformer's {theirs}."
                )
        if t.cls_token is None:
            raise ValueError(f"{owner}: the transformer needs a class token (`pool='cls'`).")
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is not None and len(value) != self.channels:
                raise ValueError(
                    f"{owner}: `{name}` needs one value per channel ({self.channels}); "
                    f"got {len(value)}."
                )
        if (self.mean is None) != (self.std is None):
            raise ValueError(f"{owner}: give both `mean` and `std`, or neither.")

    def build(self, input_shape):
        if not self.transformer.built:
            self.transformer.build(input_shape)
        self.mask_token = self.add_weight(  # a whole patch of pixels, N(0, 1) as vit-pytorch
            shape=(self.patch_pixels(),),
            initializer=keras.initializers.RandomNormal(stddev=1.0),
            name="mask_token",
        )
        self.to_bits.build((None, None, self.dim))

    # The masking (BERT's 80/10/10, with these probabilities) ----------------------------------

    def draw_masking(self, batch):
        """The random choices for a batch: `(chosen, randomized, sources, replaced)`, where
        `chosen` (b, n) marks the patches to predict, `randomized` (b, n) those replaced by the
        patch at `sources` (b, n), and `replaced` (b, n) those replaced by the mask patch."""
        n, seed = self.transformer.num_patches, self.seed_generator
        _, picked = ops.top_k(keras.random.uniform((batch, n), seed=seed), self.num_chosen)
        chosen = ops.any(ops.equal(picked[..., None], ops.arange(n)), axis=1)
        # vit-pytorch's share among the chosen patches that keep no mask patch
        randomized_share = self.random_patch_prob / (1 - self.replace_prob)
        randomized = chosen & (keras.random.uniform((batch, n), seed=seed) < randomized_share)
        sources = keras.random.randint((batch, n), 0, n, seed=seed)
        replaced = chosen & (keras.random.uniform((batch, n), seed=seed) < self.replace_prob)
        return chosen, randomized, sources, replaced

    def corrupt(self, patches, randomized, sources, replaced):
        """The patches the ViT sees."""
        if self.random_patch_prob > 0:
            patches = ops.where(randomized[..., None], gather_tokens(patches, sources), patches)
        mask_patch = ops.cast(self.mask_token, patches.dtype)
        return ops.where(replaced[..., None], mask_patch, patches)

    # The targets ------------------------------------------------------------------------------

    def target_classes(self, patches):
        """Each patch's mean colour, quantized: `(b, n)` classes in [0, 2 ** (bits * c))."""
        c, bits, top = self.channels, self.output_channel_bits, float(self.max_pixel_val)
        pixels = ops.cast(patches, "float32")
        pixels = ops.reshape(pixels, (*ops.shape(pixels)[:2], -1, c))  # (b, n, p1*p2, c)
        if self.mean is not None:  # back to the pixels the images were normalized from
            std, mean = (ops.convert_to_tensor(v, "float32") for v in (self.std, self.mean))
            pixels = pixels * std + mean
        colour = ops.mean(ops.minimum(pixels, top), axis=2)  # (b, n, c)
        # bin k holds (edge[k-1], edge[k]]: the number of edges below the colour
        edges = np.arange(top / 2**bits, top, top / 2**bits, dtype="float32")
        above = ops.greater(colour[..., None], ops.convert_to_tensor(edges))
        level = ops.sum(ops.cast(above, "int32"), axis=-1)  # (b, n, c)
        weights = ops.convert_to_tensor((2**bits) ** np.arange(c), "int32")  # base 2 ** bits
        return ops.sum(level * weights, axis=-1)

    def call(self, images, training=None):
        """Each image's loss `(b,)`: cross-entropy over its chosen patches."""
        patches = self.patches(images)  # (b, n, p1*p2*c)
        chosen, randomized, sources, replaced = self.draw_masking(ops.shape(patches)[0])
        t = self.transformer
        tokens = t.patch_embed.embed_patches(self.corrupt(patches, randomized, sources, replaced))
        tokens = t.pos_embedding(t.cls_token(tokens))
        tokens = t.embedding_dropout(tokens, training=training)
        logits = self.to_bits(t.transformer(tokens, training=training)[:, 1:])
        labels = ops.stop_gradient(self.target_classes(patches))
        loss = keras.losses.sparse_categorical_crossentropy(
            labels, ops.cast(logits, "float32"), from_logits=True
        )  # (b, n)
        chosen = ops.cast(chosen, loss.dtype)
        return ops.sum(loss * chosen, axis=1) / ops.sum(chosen, axis=1)

    def vit_pytorch_state_map(self):
        """Our weights under the names of `vit_pytorch.mpp.MPP`'s state dict."""
        return {
            "transformer": self.transformer,
            # a slice of the ViT's `to_patch_embedding` in a Sequential: its indices kept
            "patch_to_emb": {"0": self.transformer.patch_embed.vit_pytorch_state_map()},
            "to_bits": self.to_bits,
            "mask_token": Reshaped(self.mask_token, (1, 1, self.patch_pixels())),
        }
