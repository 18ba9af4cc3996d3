"""The masked-image-modelling trainers MAE, SimMIM and MPP: `fit` pre-trains the encoder on every
backend, the encoder classifies and saves afterwards, the losses match vit-pytorch's."""

from __future__ import annotations

from unittest import mock

import keras
import numpy as np
import pytest
import torch

from backends_tests.helpers import as_numpy, randomize_torch, rel_err, template_task
from vitkit.convert import from_vit_pytorch
from vitkit.models.deepvit import DeepViT
from vitkit.models.vit import ViT
from vitkit.trainers.mae import MAE
from vitkit.trainers.mpp import MPP
from vitkit.trainers.simmim import SimMIM

# sizes that differ from each other, so a swapped axis fails
ENCODER = dict(
    image_size=(16, 12), patch_size=4, num_classes=5, dim=12, depth=2, heads=2, dim_head=6,
    mlp_dim=20,
)  # fmt: skip
SQUARE = dict(ENCODER, image_size=16)  # vit-pytorch's DeepViT takes square images only


def make_trainer(kind, encoder):
    if kind == "mae":
        return MAE(
            encoder=encoder, decoder_dim=10, masking_ratio=0.6, decoder_depth=2,
            decoder_heads=3, decoder_dim_head=5,
        )  # fmt: skip
    if kind == "simmim":
        return SimMIM(encoder=encoder, masking_ratio=0.4)
    return MPP(
        transformer=encoder, patch_size=4, dim=12, output_channel_bits=2, mask_prob=0.3,
        max_pixel_val=3.0,
    )  # fmt: skip


def weights(layer):
    return {w.path: as_numpy(w) for w in layer.weights}


@pytest.mark.parametrize("kind", ["mae", "simmim", "mpp"])
def test_fit_pretrains_the_encoder_which_then_classifies_and_saves(kind, tmp_path):
    encoder = ViT(**ENCODER)
    trainer = make_trainer(kind, encoder)
    images, _ = template_task(encoder, 3, samples=48)
    trainer.compile(optimizer=keras.optimizers.Adam(5e-3))
    trainer.build_default()
    before = weights(encoder)

    losses = trainer.fit(images, batch_size=12, epochs=6, verbose=0).history["loss"]
    assert np.all(np.isfinite(losses)) and losses[-1] < 0.95 * losses[0], losses

    # What the task runs moved; what it never reaches (the head, and the class token where the
    # task drops it) is not trained at all.
    untouched = {w.path for w in encoder.head.weights}
    if kind != "mpp":
        untouched |= {w.path for w in encoder.cls_token.weights}
    after = weights(encoder)
    for path, value in before.items():
        moved = not np.array_equal(value, after[path])
        assert moved == (path not in untouched), path

    logits = as_numpy(encoder(images[:4]))
    assert logits.shape == (4, 5) and np.all(np.isfinite(logits))
    encoder.save(tmp_path / "encoder.keras")
    loaded = keras.saving.load_model(tmp_path / "encoder.keras")
    np.testing.assert_allclose(as_numpy(loaded(images[:4])), logits, rtol=1e-5, atol=1e-5)


def test_mae_saves_and_loads_whole(tmp_path):
    trainer = make_trainer("mae", ViT(**ENCODER)).build_default()
    images, _ = template_task(trainer.encoder, 3, samples=4)
    noise = np.random.default_rng(0).uniform(size=(4, 12)).astype("float32")
    trainer.save(tmp_path / "mae.keras")
    loaded = keras.saving.load_model(tmp_path / "mae.keras")
    assert type(loaded) is MAE and loaded.get_config() == trainer.get_config()
    np.testing.assert_allclose(
        as_numpy(loaded(images, noise=noise)), as_numpy(trainer(images, noise=noise)), rtol=1e-6
    )


def test_channels_first_encoder_gives_the_same_losses():
    last = make_trainer("mae", ViT(**ENCODER)).build_default()
    first = make_trainer("mae", ViT(**ENCODER, data_format="channels_first")).build_default()
    first.set_weights(last.get_weights())
    images, _ = template_task(last.encoder, 3, samples=3)
    noise = np.random.default_rng(1).uniform(size=(3, 12)).astype("float32")
    np.testing.assert_allclose(
        as_numpy(first(images.transpose(0, 3, 1, 2), noise=noise)),
        as_numpy(last(images, noise=noise)),
        rtol=1e-5,
    )


# Parity with vit-pytorch: the same weights and the same random draws give the same loss.
# (vit-pytorch 1.26.11's MAE and SimMIM index `pos_embedding[:, 1:n + 1]`, which fits the
# (1, n + 1, dim) tables of DeepViT and kin; its vit.ViT keeps a 2-D table there, so its MAE
# runs on a vit.ViT only with pool="mean", and its SimMIM not at all.)


def reference_pair(kind, config, reference_encoder, our_encoder, **options):
    import vit_pytorch.mae
    import vit_pytorch.simmim

    reference_trainer = {"mae": vit_pytorch.mae.MAE, "simmim": vit_pytorch.simmim.SimMIM}[kind]
    ours = {"mae": MAE, "simmim": SimMIM}[kind]
    ref = randomize_torch(reference_trainer(encoder=reference_encoder(**config), **options))
    mine = from_vit_pytorch(ours(encoder=our_encoder(**config), **options), ref.state_dict())
    return ref.eval(), mine


def reference_loss(ref, x, noise):
    with mock.patch("torch.rand", lambda *a, **k: noise.clone()), torch.no_grad():
        return ref(torch.from_numpy(x)).item()


MAE_OPTIONS = dict(decoder_dim=10, masking_ratio=0.6, decoder_depth=2, decoder_heads=3)


@pytest.mark.parametrize(
    "encoder, config, options",
    [
        ("deepvit", SQUARE, dict(MAE_OPTIONS, decoder_dim_head=5)),
        ("vit", dict(ENCODER, pool="mean"), dict(MAE_OPTIONS, decoder_dim=12, masking_ratio=0.3)),
    ],
)
def test_mae_loss_matches_vit_pytorch(encoder, config, options):
    from vit_pytorch.deepvit import DeepViT as RefDeepViT
    from vit_pytorch.vit import ViT as RefViT

    classes = {"deepvit": (RefDeepViT, DeepViT), "vit": (RefViT, ViT)}[encoder]
    ref, ours = reference_pair("mae", config, *classes, **options)
    n = ours.encoder.num_patches
    x = np.random.default_rng(2).normal(size=(3, 3, *ours.encoder.image_hw)).astype("float32")
    noise = torch.rand(3, n, generator=torch.Generator().manual_seed(0))
    expected = reference_loss(ref, x, noise)
    got = float(as_numpy(ours(x.transpose(0, 2, 3, 1), noise=noise.numpy())).mean())
    assert rel_err(got, expected) < 1e-4, (got, expected)


def test_simmim_loss_matches_vit_pytorch():
    from vit_pytorch.deepvit import DeepViT as RefDeepViT

    ref, ours = reference_pair("simmim", SQUARE, RefDeepViT, DeepViT, masking_ratio=0.4)
    x = np.random.default_rng(3).normal(size=(3, 3, 16, 16)).astype("float32")
    noise = torch.rand(3, 16, generator=torch.Generator().manual_seed(1))
    expected = reference_loss(ref, x, noise)
    got = float(as_numpy(ours(x.transpose(0, 2, 3, 1), noise=noise.numpy())).mean())
    assert rel_err(got, expected) < 1e-4, (got, expected)


def test_mpp_loss_matches_vit_pytorch():
    """vit-pytorch's MPP on a DeepViT, with its four random draws replaced by ours."""
    import vit_pytorch.mpp
    from vit_pytorch.deepvit import DeepViT as RefDeepViT

    options = dict(
        patch_size=4, dim=12, output_channel_bits=2, channels=3, max_pixel_val=2.0,
        mask_prob=0.3, replace_prob=0.4, random_patch_prob=0.3,
        mean=[0.5, 0.2, 0.1], std=[0.9, 1.1, 0.7],
    )  # fmt: skip
    ref = randomize_torch(vit_pytorch.mpp.MPP(transformer=RefDeepViT(**SQUARE), **options)).eval()
    ours = from_vit_pytorch(MPP(transformer=DeepViT(**SQUARE), **options), ref.state_dict())
    b, n = 3, 16
    rng = np.random.default_rng(4)
    x = rng.normal(size=(b, 3, 16, 16)).astype("float32")
    chosen = np.zeros((b, n), bool)
    chosen[:, :5] = True
    chosen = np.stack([rng.permutation(row) for row in chosen])
    randomized, replaced = rng.uniform(size=(2, b, n)) < 0.5
    sources = rng.integers(0, n, size=(b, n))

    draws = iter([torch.from_numpy(randomized), torch.from_numpy(replaced)])
    subset = mock.patch.object(
        vit_pytorch.mpp, "get_mask_subset_with_prob", lambda *a: torch.from_numpy(chosen)
    )
    with (
        subset,
        mock.patch.object(vit_pytorch.mpp, "prob_mask_like", lambda *a: next(draws)),
        mock.patch("torch.randint", lambda *a, **k: torch.from_numpy(sources)),
        torch.no_grad(),
    ):
        expected = ref(torch.from_numpy(x)).item()
    # ours combines the draws as the reference does: `randomized` and `replaced` only among
    # the chosen patches
    ours.draw_masking = lambda batch: (chosen, chosen & randomized, sources, chosen & replaced)
    got = float(as_numpy(ours(x.transpose(0, 2, 3, 1))).mean())
    assert rel_err(got, expected) < 1e-4, (got, expected)


def test_mpp_targets_quantize_the_mean_colour():
    mpp = make_trainer("mpp", ViT(**dict(ENCODER, image_size=8, patch_size=4)))
    # one 8x8 image, 4 patches of constant colour; 2 bits on [0, 3]: bins of 0.75
    colours = np.array([[0.0, 0.7, 3.5], [0.76, 1.5, 1.51], [2.25, 2.26, 0.75], [3.0, 0.1, 1.0]])
    image = np.zeros((1, 8, 8, 3), "float32")
    for k, (r, c) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        image[0, 4 * r : 4 * r + 4, 4 * c : 4 * c + 4] = colours[k]
    levels = np.array([[0, 0, 3], [1, 1, 2], [2, 3, 0], [3, 0, 1]])
    expected = (levels * 4 ** np.arange(3)).sum(-1)
    got = as_numpy(mpp.target_classes(mpp.patches(image)))[0]
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda v: MAE(encoder=v, decoder_dim=8, masking_ratio=1.0), "masking_ratio"),
        (lambda v: MAE(encoder=v, decoder_dim=8, masking_ratio=0.01), "masking_ratio"),
        (lambda v: MAE(encoder=v, decoder_dim=0), "decoder_dim"),
        (lambda v: SimMIM(encoder=v, masking_ratio=0), "masking_ratio"),
        (lambda v: SimMIM(encoder=keras.layers.Dense(3)), "encoder"),
        (lambda v: MPP(transformer=v, patch_size=4, dim=16), "dim"),
        (lambda v: MPP(transformer=v, patch_size=2, dim=12), "patch_size"),
        (lambda v: MPP(transformer=v, patch_size=4, dim=12, replace_prob=1.0), "replace_prob"),
        (lambda v: MPP(transformer=v, patch_size=4, dim=12, mean=[0.5]), "mean"),
    ],
)
def test_bad_arguments_name_the_parameter(make, match):
    with pytest.raises(ValueError, match=match):
        make(ViT(**ENCODER))


def test_encoders_without_the_interface_are_refused_by_name():
    from vitkit.models.cvt import CvT
    from vitkit.registry import get_spec

    with pytest.raises(ValueError, match="CvT lacks patch_embed, pos_embedding, transformer"):
        SimMIM(encoder=CvT(**get_spec("cvt").tiny))


def test_compile_refuses_a_loss_and_wrong_images_are_named():
    trainer = make_trainer("simmim", ViT(**ENCODER))
    with pytest.raises(ValueError, match="no `loss`"):
        trainer.compile(optimizer="adam", loss="mse")
    with pytest.raises(ValueError, match=r"exactly \(16, 12\) pixels"):
        trainer(np.zeros((2, 8, 12, 3), "float32"))
