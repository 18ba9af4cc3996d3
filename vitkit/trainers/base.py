"""What every vitkit trainer shares: a Keras model whose loss is its own (`compile` takes the
optimizer and metrics, `fit` trains), and for masked image modelling, the declared interface
through which a trainer reaches into the ViT it pre-trains."""

from __future__ import annotations

import keras
from keras import ops

from vitkit.layers.base import ConfigMixin
from vitkit.layers.embedding import LearnedPositionEmbedding, PatchEmbedding
from vitkit.layers.utils import reject_unknown_kwargs


class Trainer(ConfigMixin, keras.Model):
    """A `keras.Model` that wraps the network it trains and computes its own loss.

    `compile(optimizer=..., metrics=...)` takes no `loss`; `fit`, `evaluate` and saving work on
    every backend, because subclasses override only `call` and `compute_loss`.
    """

    def __init__(self, **kwargs):
        reject_unknown_kwargs(type(self).__name__, kwargs)
        super().__init__(**kwargs)

    def compile(self, optimizer="rmsprop", loss=None, **kwargs):
        if loss is not None:
            raise ValueError(
                f"{type(self).__name__}.compile: no `loss`: the trainer's loss is built in "
                "(its constructor's arguments set it)."
            )
        super().compile(optimizer=optimizer, **kwargs)

    def compile_from_config(self, config):
        # Keras skips this for an overridden `compile`; ours only refuses a loss.
        self.compile(**keras.saving.deserialize_keras_object(config))
        if self.built:
            self.optimizer.build(self.trainable_variables)


class MaskedImageModeling(Trainer):
    """Base of the trainers that hide patches of an image from a ViT and make it predict them
    (MAE, SimMIM, MPP). `call(images)` returns the loss of each image `(b,)`; `compute_loss`
    averages it (weighted by `sample_weight`, if `fit` has one).

    The encoder is reached through a declared interface, the one `ViTLayout` models have:
    `patch_embed` (a `PatchEmbedding`: `patchify`, then `embed_patches`), `pos_embedding` (a
    `LearnedPositionEmbedding`), `transformer`, `num_patches` and `with_class_token`.
    Weights of the encoder that the pre-training task never reaches (its head; the class token
    where the task drops it) are left out of training, so no optimizer touches them
    (`unused_encoder_layers`).
    """

    layer_arguments = ("encoder",)
    encoder_argument = "encoder"  # the constructor argument that holds the ViT

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.seed_generator = keras.random.SeedGenerator(name="masking_seed")

    def check_encoder(self, encoder):
        owner, arg = type(self).__name__, self.encoder_argument
        if not isinstance(encoder, keras.Model):
            raise ValueError(
                f"{owner}: `{arg}` must be a vitkit ViT; got {type(encoder).__name__}."
            )
        missing = [
            name
            for name, kind in (
                ("patch_embed", PatchEmbedding),
                ("pos_embedding", LearnedPositionEmbedding),
                ("transformer", keras.layers.Layer),
            )
            if not isinstance(getattr(encoder, name, None), kind)
        ]
        if missing:
            raise ValueError(
                f"{owner}: `{arg}` must be a ViT with patch tokens and a learned position table "
                f"(vitkit.models.vit.ViT and its kin); {type(encoder).__name__} lacks "
                f"{', '.join(missing)}."
            )
        return encoder

    @property
    def encoder_model(self):
        return getattr(self, self.encoder_argument)

    # The pieces of the encoder --------------------------------------------------------------

    def patches(self, images):
        """Images -> raw patch vectors `(b, n, p1*p2*c)`, what the model reconstructs."""
        encoder = self.encoder_model
        patches = encoder.patch_embed.patchify(encoder.check_images(images))
        if patches.shape[1] is not None and patches.shape[1] != encoder.num_patches:
            encoder.bad_input(
                f"images of exactly {tuple(encoder.image_hw)} pixels for pre-training",
                f"{patches.shape[1]} patches instead of {encoder.num_patches}",
            )
        return patches

    def patch_positions(self):
        """The encoder's position table rows of the patch tokens `(n, dim)` (after the class
        token's row, if it has one)."""
        encoder = self.encoder_model
        first = int(encoder.with_class_token)
        table = encoder.pos_embedding.embedding
        return table[first : first + encoder.num_patches]

    def embed(self, patches):
        """Raw patches -> position-embedded tokens `(b, n, dim)`."""
        tokens = self.encoder_model.patch_embed.embed_patches(patches)
        return tokens + ops.cast(self.patch_positions(), tokens.dtype)[None]

    def random_order(self, batch, seed_generator):
        """A random permutation of the patch indices per image, `(b, n)`."""
        noise = keras.random.uniform((batch, self.encoder_model.num_patches), seed=seed_generator)
        return ops.argsort(noise, axis=-1)

    def masked_count(self, ratio: float) -> int:
        """`int(ratio * n)` patches of the encoder's n, checked to hide one and keep one."""
        n = self.encoder_model.num_patches
        count = int(ratio * n)
        if not 0 < count < n:
            raise ValueError(
                f"{type(self).__name__}: `masking_ratio` {ratio} of {n} patches masks {count}: "
                "at least one patch must be masked and one left visible."
            )
        return count

    def patch_pixels(self) -> int:
        """Values per raw patch: `p1 * p2 * channels`."""
        encoder = self.encoder_model
        return encoder.patch_hw[0] * encoder.patch_hw[1] * encoder.input_channels

    def pixel_head(self):
        """The linear layer from a token to a patch's pixels (MAE's and SimMIM's `to_pixels`)."""
        return keras.layers.Dense(self.patch_pixels(), dtype=self.dtype_policy, name="to_pixels")

    def patch_to_emb_state_map(self):
        """vit-pytorch's trainers hold the encoder's patch LayerNorm, Linear and LayerNorm a
        second time, as `patch_to_emb.0-2`: the same weights."""
        embedding = self.encoder_model.patch_embed.vit_pytorch_state_map()
        return {str(int(key) - 1): layer for key, layer in embedding.items()}

    # Training --------------------------------------------------------------------------------

    def unused_encoder_layers(self):
        """Sublayers of the encoder that this task never runs (their weights are not trained)."""
        encoder = self.encoder_model
        return [getattr(encoder, name, None) for name in ("head", "head_norm")]

    @property
    def trainable_weights(self):
        unused = {
            id(w)
            for layer in self.unused_encoder_layers()
            if layer is not None
            for w in layer.weights
        }
        return [w for w in super().trainable_weights if id(w) not in unused]

    def build_default(self):
        """Create every weight for images of the encoder's configured size."""
        if not self.built:
            self.build(self.encoder_model.default_input_shape(batch=None))
        return self

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        if y_pred is None:
            y_pred = self(x, training=training)
        loss = ops.cast(y_pred, "float32")  # (b,): each image's loss
        if sample_weight is not None:
            loss = loss * ops.cast(ops.reshape(sample_weight, ops.shape(loss)), loss.dtype)
        return ops.mean(loss)  # Keras' "sum over batch size" reduction
