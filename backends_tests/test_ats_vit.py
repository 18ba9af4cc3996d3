"""ATS beyond the harness: the sampled token ids, the training-mode sampler against
vit-pytorch's given the same noise, and static shapes under jit for several batch sizes."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import torch

import vitkit
from backends_tests.helpers import (
    as_numpy,
    compiled_forward,
    random_images,
    randomize_torch,
    rel_err,
)
from backends_tests.reference import ats_forward, ats_noise, reference_kwargs
from vitkit.convert import from_vit_pytorch
from vitkit.models.ats_vit import ViT

SPEC = vitkit.get_spec("ats_vit")


def reference_and_ours(index, **overrides):
    from vit_pytorch.ats_vit import ViT as Reference

    config = {**SPEC.parity[index], **overrides}
    torch.manual_seed(0)
    ref = randomize_torch(Reference(**reference_kwargs(config))).eval()
    return config, ref, from_vit_pytorch(ViT(**config), ref.state_dict())


def images_for(config, batch, seed=0):
    """Random images in the reference's layout (b, c, h, w)."""
    return random_images(config, batch, seed=seed, data_format="channels_first")


@pytest.mark.parametrize("index", range(len(SPEC.parity)))
def test_sampled_token_ids_match_the_reference(index):
    config, ref, ours = reference_and_ours(index)
    x = images_for(config, 3, seed=index)
    logits, ids = ours(x.transpose(0, 2, 3, 1), return_sampled_token_ids=True)
    logits, ids = as_numpy(logits), as_numpy(ids).astype(int)
    with torch.no_grad():
        expected = ats_forward(ref, ours, x, return_sampled_token_ids=True)
    assert rel_err(logits, np.concatenate([y.numpy() for y, _ in expected])) < 1e-4
    for i, (_, ref_ids) in enumerate(expected):
        m = ref_ids.shape[1]  # the reference pads to its batch's longest: ours = its, then -1
        np.testing.assert_array_equal(ids[i, :m], ref_ids[0].numpy())
        assert np.all(ids[i, m:] == -1)


def test_sampled_token_ids_are_sorted_unique_patches_padded_with_minus_one():
    model = ViT(**SPEC.tiny)
    x = random_images(model, 4)
    _, ids = model(x, return_sampled_token_ids=True)
    ids = as_numpy(ids).astype(int)
    patches = (24 // 4) * (20 // 5)
    assert ids.shape == (4, SPEC.tiny["max_tokens_per_depth"][-1])
    for row in ids:
        real = row[row >= 0]
        assert np.all(row[len(real) :] == -1), row  # padding only at the end
        assert len(real) >= 1 and np.all(np.diff(real) > 0) and real[-1] < patches, row


def test_training_samples_as_the_reference_given_the_same_noise():
    """In training our sampler draws its own uniform noise, image by image; with the
    reference given the same noise, the logits agree."""
    config, ref, ours = reference_and_ours(0)
    x = images_for(config, 2, seed=5)
    rng = np.random.default_rng(7)
    noise = {}  # block -> uniform noise (b, K, n)
    for index, attention in enumerate(ours.transformer.attentions):
        sampler = attention.sampler
        if sampler is not None:
            u = rng.random((2, sampler.output_num_tokens, sampler.num_tokens), dtype="float32")
            noise[index] = u
            sampler.uniform_noise = lambda batch, n, training=None, u=u: u[:, :, :n]
    got = as_numpy(ours(x.transpose(0, 2, 3, 1), training=True))

    ref.train()  # no dropout in this config: train mode differs only by the noise
    expected = []
    for i in range(len(x)):
        with ats_noise(ref, {k: u[i : i + 1] for k, u in noise.items()}), torch.no_grad():
            expected.append(ref(torch.from_numpy(x[i : i + 1])).numpy())
    assert rel_err(got, np.concatenate(expected)) < 1e-4


def test_training_draws_fresh_noise_and_inference_is_fixed():
    model = ViT(**SPEC.tiny)
    x = random_images(model, 8)
    train = [as_numpy(model(x, training=True, return_sampled_token_ids=True)[1]) for _ in "ab"]
    assert not np.array_equal(*train)
    infer = [as_numpy(model(x, return_sampled_token_ids=True)[1]) for _ in "ab"]
    np.testing.assert_array_equal(*infer)


@pytest.mark.parametrize("batch", [1, 4])
def test_compiled_sampling_keeps_static_shapes(batch):
    model = ViT(**SPEC.tiny)
    x = random_images(model, batch, seed=batch)
    logits, ids = model(x, return_sampled_token_ids=True)
    compiled = compiled_forward(model, x, return_sampled_token_ids=True)
    np.testing.assert_allclose(as_numpy(compiled[0]), as_numpy(logits), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(as_numpy(compiled[1]), as_numpy(ids))


def test_smaller_images_sample_fewer_tokens():
    model = ViT(**SPEC.tiny)  # 24 patches, K = (16, 9)
    x = random_images(model, 2, size=(16, 15))  # 12 patches: the first block keeps all
    logits, ids = model(x, return_sampled_token_ids=True)
    assert tuple(logits.shape) == (2, 7) and tuple(ids.shape) == (2, 9)
    real = as_numpy(ids)[as_numpy(ids) >= 0]
    assert real.max() < 12


def test_noise_is_saved_with_the_model(tmp_path):
    model = ViT(**SPEC.tiny).build_default()
    sampler = model.transformer.attentions[0].sampler
    sampler.inference_noise.assign(np.full(sampler.inference_noise.shape, 0.5, "float32"))
    model.save(tmp_path / "ats.keras")
    loaded = keras.saving.load_model(tmp_path / "ats.keras")
    noise = as_numpy(loaded.transformer.attentions[0].sampler.inference_noise)
    np.testing.assert_array_equal(noise, 0.5)
