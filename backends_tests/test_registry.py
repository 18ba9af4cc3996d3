"""The registry, presets and the published parameter counts."""

from __future__ import annotations

import keras
import numpy as np
import pytest

import vitkit
from backends_tests.helpers import plain_kwargs, reference_class

# Published parameter counts at 1000 classes (timm's ViT/DeiT reference implementation).
# vit-pytorch's layout differs slightly (no q/k/v bias, two LayerNorms in the patch embedding),
# so its counts agree with these to within 0.1 %; the exact number is checked against it.
PUBLISHED = {
    "vit_tiny_patch16_224": 5_717_416,
    "vit_small_patch16_224": 22_050_664,
    "vit_base_patch16_224": 86_567_656,
    "vit_large_patch16_224": 304_326_632,
}


def test_architecture_names_are_the_reference_module_names():
    models = vitkit.list_models()
    assert {"vit", "simple_vit"} <= set(models)
    assert models == sorted(models)
    for name in models:
        spec = vitkit.get_spec(name)
        assert spec.cls.__module__ == f"vitkit.models.{name}"
        assert spec.reference.startswith(f"{name}.")


def test_presets_are_listed_and_belong_to_their_architecture():
    presets = vitkit.list_presets()
    for size in ("tiny", "small", "base", "large"):
        assert f"vit_{size}_patch16_224" in presets
        assert f"simple_vit_{size}_patch16_224" in presets
    assert vitkit.list_presets("vit") == [p for p in presets if p.startswith("vit_")]


def test_create_model_from_preset_with_override():
    model = vitkit.create_model("vit_tiny_patch16_224", num_classes=10)
    assert model.num_classes == 10 and model.dim == 192 and model.depth == 12


def test_create_model_from_architecture_name():
    spec = vitkit.get_spec("simple_vit")
    model = vitkit.create_model("simple_vit", **spec.tiny)
    assert model.get_config()["dim"] == spec.tiny["dim"]


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown model or preset 'vitt'.*simple_vit"):
        vitkit.create_model("vitt")


@pytest.mark.parametrize("preset", sorted(PUBLISHED))
def test_parameter_counts_match_the_published_ones(preset):
    model = vitkit.create_model(preset)
    # Count from shapes, without allocating: build symbolically.
    model.build((None, 224, 224, 3))
    count = model.count_params()
    assert abs(count - PUBLISHED[preset]) / PUBLISHED[preset] < 1e-3, count


@pytest.mark.parametrize("arch", ["vit", "simple_vit"])
def test_parameter_counts_equal_vit_pytorch(arch):
    """Base size, exact count, against the reference implementation itself."""
    preset = f"{arch}_base_patch16_224"
    spec = vitkit.get_spec(preset)
    model = vitkit.create_model(preset)
    model.build((None, 224, 224, 3))
    ref = reference_class(spec)(**plain_kwargs(spec.presets[preset]))
    assert model.count_params() == sum(p.numel() for p in ref.parameters())


def test_seed_example_and_faq_shapes():
    from vitkit.models.vit import ViT

    v = ViT(
        image_size=256,
        patch_size=32,
        num_classes=1000,
        dim=1024,
        depth=6,
        heads=16,
        mlp_dim=2048,
        dropout=0.1,
        emb_dropout=0.1,
    )
    assert tuple(v(np.zeros((1, 256, 256, 3), "float32")).shape) == (1, 1000)
    # FAQ: non-square images up to image_size
    assert tuple(v(np.zeros((1, 256, 128, 3), "float32")).shape) == (1, 1000)
    # FAQ: non-square patches
    v = ViT(
        image_size=(256, 128),
        patch_size=(32, 16),
        num_classes=1000,
        dim=1024,
        depth=6,
        heads=16,
        mlp_dim=2048,
        dropout=0.1,
        emb_dropout=0.1,
    )
    assert tuple(v(np.zeros((1, 256, 128, 3), "float32")).shape) == (1, 1000)
    keras.utils.clear_session()


def test_import_needs_no_other_backend():
    """`import vitkit` and building a model load no backend that Keras itself did not load
    (Keras imports jax when it is installed, whatever the backend): with only the session's
    backend installed, nothing changes."""
    import subprocess
    import sys

    others = sorted({"jax", "torch", "tensorflow"} - {keras.config.backend()})
    code = (
        "import sys, numpy as np, keras\n"
        "before = set(sys.modules)\n"
        "import vitkit\n"
        "model = vitkit.create_model('vit', **vitkit.get_spec('vit').tiny)\n"
        "model(np.zeros((1, 24, 20, 3), 'float32'))\n"
        "print(vitkit.list_models())\n"
        f"print(sorted(m for m in {others!r} if m in set(sys.modules) - before))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    models, loaded = out.stdout.strip().splitlines()[-2:]
    assert "'vit'" in models
    assert loaded == "[]", f"importing vitkit loaded {loaded}"


def test_two_models_under_one_keras_name_are_refused():
    """Keras loads a class by its registered "package>Name": vit-pytorch's many `ViT`s must
    register under packages of their own, or one would load as another."""
    from vitkit import registry
    from vitkit.models import VitkitModel

    def clash():
        @keras.saving.register_keras_serializable(package="vitkit_tests")
        class Clash(VitkitModel):
            pass

        return Clash

    try:
        registry.register_model(tiny={}, name="clash_one")(clash())
        with pytest.raises(ValueError, match="'vitkit_tests>Clash'.*package="):
            registry.register_model(tiny={}, name="clash_two")(clash())
    finally:
        for name in ("clash_one", "clash_two"):
            registry._MODELS.pop(name, None)
        registry._KERAS_NAMES.pop("vitkit_tests>Clash", None)
