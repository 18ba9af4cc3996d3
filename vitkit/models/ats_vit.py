"""ATS: "Adaptive Token Sampling For Efficient Vision Transformers" (Fayyaz et al., ECCV 2022,
arXiv:2111.15667), as vit-pytorch samples: Gumbel-max draws from the class token's attention."""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

from vitkit.layers import Attention, Transformer, VitkitLayer
from vitkit.layers.backend_quirks import stored_gradient
from vitkit.layers.utils import as_given, gather_tokens, integer
from vitkit.models.base import ViTLayout
from vitkit.registry import register_model

# A masked token's pseudo-logit: vit-pytorch's -finfo(float32).max / 2, never drawn.
MASKED_LOGIT = -1.7014117331926443e38


def first_argmax(x, positions):
    """`argmax` over the last axis of `x` (first index on ties), with `positions` the int32
    `arange` of that axis. Written with amax and amin: TensorFlow's float `argmax` lowers to
    a `Bitcast` that ONNX has no operator for, and `ops.max` breaks torch.compile."""
    at_max = x == ops.amax(x, axis=-1, keepdims=True)
    return ops.amin(ops.where(at_max, positions, x.shape[-1]), axis=-1)


@keras.saving.register_keras_serializable(package="vitkit")
class AdaptiveTokenSampling(VitkitLayer):
    """Chooses which tokens go on (the paper's section 3.2, with vit-pytorch's sampler).

    Each token's significance is the class token's attention to it, weighted by the norm of
    its value and summed over heads, normalized to a distribution `p`. `output_num_tokens` (K)
    tokens are drawn from `p` with replacement by the Gumbel-max trick,
    `argmax(log p + g)`, `g = -log(-log u)`, `u ~ U(0, 1)`; duplicates count once. An image with
    no more than K tokens left keeps them all.

    Shapes stay static, as jit needs: the kept positions come out sorted, padded on the right
    to K with position 0 (the class token) and a mask that is False there.

    The only randomness is `u`. In training it is drawn afresh for every image and step. In
    inference it is `inference_noise`, one fixed `(K, num_tokens)` draw (numpy's PCG64 from
    `seed`, kept as a non-trainable weight) shared by every image, so predictions are
    deterministic, the same on every backend and after saving. (vit-pytorch draws `u` afresh
    in eval mode too; given the same `u`, the two agree.)

    Args:
        output_num_tokens: K, the number of draws, so the most tokens kept.
        num_tokens: the most tokens (the class token aside) this layer is given.
        eps: vit-pytorch's guard inside the logarithms.
        seed: seed of `inference_noise`.
    """

    def __init__(self, output_num_tokens, num_tokens, eps=1e-6, seed=0, **kwargs):
        super().__init__(**kwargs)
        self.keep_args(
            locals(), output_num_tokens=integer(), num_tokens=integer(), eps=as_given, seed=as_given
        )
        self.seed_generator = keras.random.SeedGenerator(name="gumbel_seed")

    def build(self, attn_shape, values_shape=None, token_mask_shape=None):
        def draw(shape, dtype=None):
            return np.random.default_rng(self.seed).random(shape, dtype="float32")

        # a fixed buffer, as BatchNorm's statistics: saved with the model, never trained
        self.inference_noise = self.add_weight(
            shape=(self.output_num_tokens, self.num_tokens),
            initializer=draw,
            trainable=False,
            name="inference_noise",
        )

    def uniform_noise(self, batch, tokens, training=None):
        """`u` for `(batch, K, tokens)` draws (in inference, `(1, K, tokens)`, broadcast)."""
        if training:
            shape = (batch, self.output_num_tokens, tokens)
            return keras.random.uniform(shape, seed=self.seed_generator)
        return ops.convert_to_tensor(self.inference_noise)[None, :, :tokens]

    def call(self, attn, values, token_mask=None, training=None):
        """Attention weights `(b, h, n, n)`, values `(b, n, h, d)` and the mask of real
        tokens `(b, n)` (None: all) -> the positions to keep `(b, 1 + K)`, class token first,
        and their mask `(b, 1 + K)`."""
        k, eps = self.output_num_tokens, self.eps
        tokens = attn.shape[-1] - 1
        attn, values = ops.cast(attn, "float32"), ops.cast(values, "float32")
        batch = ops.shape(attn)[0]
        valid = ops.ones((batch, tokens), "bool") if token_mask is None else token_mask[:, 1:]

        # significance: class-token attention times value norms, summed over heads
        value_norms = ops.norm(values[:, 1:], axis=-1)  # (b, n - 1, h)
        scores = ops.einsum("bhn,bnh->bn", attn[:, :, 0, 1:], value_norms)
        scores = scores / (ops.sum(scores, axis=-1, keepdims=True) + eps)
        logits = ops.where(valid, ops.log(scores + eps), MASKED_LOGIT)

        # K Gumbel-max draws, positions 0..n-2 among the patch tokens
        u = ops.cast(self.uniform_noise(batch, tokens, training=training), "float32")
        gumbel = -ops.log(-ops.log(u + eps) + eps)
        positions = ops.arange(tokens, dtype="int32")
        draws = first_argmax(logits[:, None, :] + gumbel, positions)  # (b, K)
        drawn = ops.any(ops.expand_dims(draws, -1) == positions, axis=1)  # (b, n - 1)
        fits = ops.sum(ops.cast(valid, "int32"), axis=-1, keepdims=True) <= k
        drawn = ops.where(fits, valid, drawn)

        # the drawn positions in order, then the others: the first K, padding masked out
        order = ops.argsort(ops.where(drawn, positions, positions + tokens), axis=-1)[:, :k]
        order = ops.cast(order, "int32")
        kept = gather_tokens(drawn, order)
        ids = ops.where(kept, order + 1, 0)  # +1: past the class token; 0 pads
        ids = ops.concatenate([ops.zeros((batch, 1), "int32"), ids], axis=1)
        kept = ops.concatenate([ops.ones((batch, 1), "bool"), kept], axis=1)
        return ids, kept


@keras.saving.register_keras_serializable(package="vitkit")
class AdaptiveTokenSamplingAttention(Attention):
    """Attention whose class-token row also decides which tokens go on.

    `call(x, key_mask)` is plain (masked) attention. `call(x, key_mask, sample=True)` also runs
    `AdaptiveTokenSampling` on the attention weights and values, and returns
    `(out (b, n, dim), ids (b, 1 + K), mask (b, 1 + K))`; the caller keeps the rows `ids` of
    `out` and of its residual, as vit-pytorch keeps those rows of the attention matrix.

    Args:
        dim, heads, dim_head, dropout: as `Attention` (the output is always projected).
        output_num_tokens: K, or None for a layer that never samples.
        num_tokens: the most tokens (the class token aside) this layer is given.
        seed: seed of the sampler's inference noise.
    """

    def __init__(
        self,
        dim,
        output_num_tokens=None,
        num_tokens=None,
        heads=8,
        dim_head=64,
        dropout=0.0,
        seed=0,
        **kwargs,
    ):
        super().__init__(
            dim, heads=heads, dim_head=dim_head, dropout=dropout, project_out=True, **kwargs
        )
        self.output_num_tokens = output_num_tokens
        self.num_tokens = num_tokens
        self.seed = seed
        samples = output_num_tokens is not None and num_tokens > output_num_tokens
        self.sampler = (
            AdaptiveTokenSampling(
                output_num_tokens, num_tokens, seed=seed, dtype=self.dtype_policy, name="ats"
            )
            if samples
            else None
        )

    def build(self, input_shape):
        super().build(input_shape)
        if self.sampler is not None:  # its noise is sized by `num_tokens`, not by the input
            self.sampler.build((None, self.heads, self.num_tokens + 1, self.num_tokens + 1))

    def samples(self, n) -> bool:
        """Whether this layer samples a sequence of `n` tokens (class token included): as in
        vit-pytorch, when the patch tokens outnumber K."""
        return self.sampler is not None and n - 1 > self.output_num_tokens

    def call(self, x, key_mask=None, sample=False, training=None):
        if not sample:
            return super().call(x, key_mask=key_mask, training=training)
        q, k, v = self.queries_keys_values(self.norm_layer(x))
        attn = self.attention_weights(q, k, training=training, key_mask=key_mask)
        out = self.project(ops.einsum("bhqk,bkhd->bqhd", attn, v), training=training)
        ids, key_mask = self.sampler(attn, v, key_mask, training=training)
        return out, ids, key_mask


@keras.saving.register_keras_serializable(package="vitkit")
class AdaptiveTokenSamplingTransformer(Transformer):
    """The ViT encoder whose block `i` keeps at most `max_tokens_per_depth[i]` patch tokens.

    Shapes are static: after a sampling block, the sequence is `1 + K` long, padded, with a
    mask that the later blocks' attention applies to the keys. `call` returns the tokens and
    the original position of each `(b, 1 + K)` (0, the class token's, for padding).

    Args:
        dim, depth, heads, dim_head, mlp_dim, dropout: as `Transformer`.
        max_tokens_per_depth: K of each block, non-increasing.
        num_tokens: patch tokens of the largest image (sizes the inference noise).
    """

    def __init__(
        self,
        dim,
        depth,
        max_tokens_per_depth,
        heads,
        dim_head,
        mlp_dim,
        dropout=0.0,
        num_tokens=1,
        **kwargs,
    ):
        # make_attention, called by Transformer.__init__, reads these two
        self.max_tokens_per_depth = tuple(max_tokens_per_depth)
        self.num_tokens = num_tokens
        super().__init__(dim, depth, heads, dim_head, mlp_dim, dropout, final_norm=False, **kwargs)

    def make_attention(self, index):
        # the longest sequence block `index` can get: the patches, or an earlier block's K
        longest = min((self.num_tokens, *self.max_tokens_per_depth[:index]))
        return AdaptiveTokenSamplingAttention(
            self.dim,
            output_num_tokens=self.max_tokens_per_depth[index],
            num_tokens=longest,
            heads=self.heads,
            dim_head=self.dim_head,
            dropout=self.dropout,
            seed=index,
            dtype=self.dtype_policy,
            name=f"attention_{index}",
        )

    def call(self, x, training=None):
        batch, n = ops.shape(x)[0], x.shape[1]
        mask = None  # every token is real until a block samples
        token_ids = ops.broadcast_to(ops.arange(n, dtype="int32")[None], (batch, n))
        for attention, feed_forward in zip(self.attentions, self.feed_forwards):
            x = stored_gradient(x)  # see backend_quirks.stored_gradient
            if attention.samples(x.shape[1]):
                out, ids, mask = attention(x, key_mask=mask, sample=True, training=training)
                x, out = gather_tokens(x, ids), gather_tokens(out, ids)
                token_ids = gather_tokens(token_ids, ids)
            else:
                out = attention(x, key_mask=mask, training=training)
            x = x + out
            x = feed_forward(x, training=training) + x
        return x, token_ids


# fmt: off
@register_model(
    tiny=dict(
        image_size=(24, 20), patch_size=(4, 5), num_classes=7, dim=18, depth=2,
        max_tokens_per_depth=(16, 9), heads=3, dim_head=5, mlp_dim=26,
    ),
    parity=[
        dict(image_size=(24, 20), patch_size=(4, 5), num_classes=7, dim=18, depth=3,
             max_tokens_per_depth=(16, 9, 9), heads=3, dim_head=5, mlp_dim=26),
        dict(image_size=32, patch_size=4, num_classes=5, dim=24, depth=4,
             max_tokens_per_depth=(64, 40, 12, 5), heads=2, mlp_dim=40, channels=1,
             dim_head=7, dropout=0.1, emb_dropout=0.1),
        dict(image_size=(18, 30), patch_size=(3, 5), num_classes=3, dim=12, depth=2,
             max_tokens_per_depth=(20, 3), heads=1, dim_head=12, mlp_dim=9, channels=2),
    ],
    invalid=[
        (dict(max_tokens_per_depth=(16, 9, 9)), "max_tokens_per_depth"),
        (dict(max_tokens_per_depth=(9, 16)), "max_tokens_per_depth"),
        (dict(max_tokens_per_depth=(16, 0)), "max_tokens_per_depth"),
        (dict(max_tokens_per_depth=16), "max_tokens_per_depth"),
        (dict(image_size=(24, 21)), "image_size"),
        (dict(heads=0), "heads"),
        (dict(num_classes=0), "num_classes"),
    ],
    digits=dict(image_size=8, patch_size=2, num_classes=10, dim=64, depth=4,
                max_tokens_per_depth=(12, 8, 8, 6), heads=4, dim_head=16, mlp_dim=128,
                channels=1),
)
# fmt: on
# vit-pytorch has many `ViT`s: the package tells Keras which one this is.
@keras.saving.register_keras_serializable(package="vitkit.ats_vit")
class ViT(ViTLayout):
    """ViT that drops unimportant tokens as it goes: block `i` keeps at most
    `max_tokens_per_depth[i]` patch tokens, sampled by their significance to the class token
    (see `AdaptiveTokenSampling`). Runs under jit: sequences are padded to the static maximum
    and masked.

    `model(images, return_sampled_token_ids=True)` returns `(logits, ids)`: for each image, the
    original index (0-based, row-major over the patch grid) of each patch token left after the
    last block, padded with -1 to the last sampling block's K.

    Sampling is random in training and deterministic in inference (a fixed draw of the noise;
    vit-pytorch draws it afresh on every call).

    Args:
        max_tokens_per_depth: the most patch tokens each block keeps: `depth` integers >= 1,
            non-increasing. A block samples when it is given more.
        Everything else as `vitkit.models.vit.ViT` (no `pool`: the class token is classified;
        `num_classes` >= 1): `image_size`, `patch_size`, `num_classes`, `dim`, `depth`,
        `heads`, `mlp_dim`, `channels=3`, `dim_head=64`, `dropout=0.0`, `emb_dropout=0.0`,
        `data_format="channels_last"`.

    Example:
        >>> v = ViT(image_size=256, patch_size=16, num_classes=1000, dim=1024, depth=6,
        ...         max_tokens_per_depth=(256, 128, 64, 32, 16, 8), heads=16, mlp_dim=2048)
        >>> preds, ids = v(np.zeros((4, 256, 256, 3)), return_sampled_token_ids=True)
        >>> preds.shape, ids.shape
        ((4, 1000), (4, 8))
    """

    with_class_token = True  # sampling follows the class token's attention
    norm_before_head = True

    def __init__(
        self,
        *,
        image_size,
        patch_size,
        num_classes,
        dim,
        depth,
        max_tokens_per_depth,
        heads,
        mlp_dim,
        channels=3,
        dim_head=64,
        dropout=0.0,
        emb_dropout=0.0,
        data_format="channels_last",
        **kwargs,
    ):
        super().__init__(data_format=data_format, **kwargs)
        self.keep_args(locals(), max_tokens_per_depth=self.check_max_tokens)
        rows, cols = self.patch_grid()
        self.make_layers(rows * cols)

    def make_transformer(self):
        return AdaptiveTokenSamplingTransformer(
            self.dim, self.depth, self.max_tokens_per_depth, self.heads, self.dim_head,
            self.mlp_dim, self.dropout, num_tokens=self.num_patches, dtype=self.dtype_policy,
            name="transformer",
        )  # fmt: skip

    def check_max_tokens(self, name, max_tokens, owner):
        """`max_tokens_per_depth`'s rule (`depth` is kept before it)."""
        depth = self.depth
        counts = list(max_tokens) if isinstance(max_tokens, (list, tuple)) else None
        if (
            counts is None
            or len(counts) != depth
            or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in counts)
            or counts != sorted(counts, reverse=True)
        ):
            raise ValueError(
                f"{owner}: `{name}` must hold `depth` = {depth} "
                f"integers >= 1, non-increasing; got {max_tokens!r}."
            )
        return max_tokens

    def call(self, images, training=None, return_sampled_token_ids=False):
        x = self.embed(images, training=training)  # (b, 1 + n, dim)
        x, token_ids = self.encode(x, training=training)  # (b, 1 + K, dim), (b, 1 + K)
        logits = self.classify(x)  # from the class token
        if return_sampled_token_ids:
            return logits, token_ids[:, 1:] - 1  # patch indices, -1 for padding
        return logits
