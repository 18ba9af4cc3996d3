"""DistillableViT and the DistillWrapper trainer: the distillation token, `to_vit`, `fit` on
every backend with a frozen teacher, and the loss against vit-pytorch's DistillWrapper."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import torch

from backends_tests.helpers import as_numpy, randomize_torch, rel_err, template_task
from vitkit.convert import from_vit_pytorch
from vitkit.models.distill import DistillableViT
from vitkit.models.vit import ViT
from vitkit.trainers.distill import DistillWrapper

STUDENT = dict(
    image_size=(16, 12),
    patch_size=4,
    num_classes=5,
    dim=12,
    depth=2,
    heads=2,
    dim_head=6,
    mlp_dim=20,
)
TEACHER = dict(
    image_size=(16, 12),
    patch_size=(8, 6),
    num_classes=5,
    dim=10,
    depth=1,
    heads=2,
    dim_head=5,
    mlp_dim=14,
    pool="mean",
)


def small_cnn_teacher():
    """Any Keras model will do as a teacher: here a small functional CNN giving logits."""
    inputs = keras.Input((16, 12, 3))
    x = keras.layers.Conv2D(8, 3, strides=2, activation="relu")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(5)(x), name="cnn_teacher")


def weights(model):
    return [as_numpy(w) for w in model.weights]


@pytest.mark.parametrize("hard", [False, True])
def test_fit_trains_the_student_and_leaves_the_teacher(hard):
    student = DistillableViT(**STUDENT)
    teacher = small_cnn_teacher()
    distiller = DistillWrapper(
        student=student, teacher=teacher, temperature=3.0, alpha=0.5, hard=hard
    )
    x, y = template_task(student, 5, samples=64)
    distiller.compile(optimizer=keras.optimizers.Adam(3e-3), metrics=["accuracy"])
    distiller.build_default()
    assert teacher.trainable_weights == [] and teacher.weights
    assert {id(w) for w in distiller.trainable_weights} == {
        *(id(w) for w in student.trainable_weights),
        id(distiller.distillation_token),
        *(id(w) for w in distiller.distill_head.trainable_weights),
    }
    teacher_before, student_before = weights(teacher), weights(student)
    before = distiller.evaluate(x, y, verbose=0, return_dict=True)
    distiller.fit(x, y, batch_size=16, epochs=5, verbose=0)
    after = distiller.evaluate(x, y, verbose=0, return_dict=True)
    assert after["loss"] < 0.7 * before["loss"], (before, after)
    assert after["accuracy"] > before["accuracy"]
    for a, b in zip(teacher_before, weights(teacher)):
        np.testing.assert_array_equal(a, b)
    changed = [not np.array_equal(a, b) for a, b in zip(student_before, weights(student))]
    assert all(changed), "every student weight should have moved"


def test_soft_and_hard_distillation_give_different_losses():
    student, teacher = DistillableViT(**STUDENT), small_cnn_teacher()
    x, y = template_task(student, 5, samples=8)
    losses = []
    for hard in (False, True):
        distiller = DistillWrapper(student=student, teacher=teacher, temperature=2.0, hard=hard)
        distiller.build_default()
        losses.append(float(as_numpy(distiller.compute_loss(x, y, distiller(x), training=False))))
    assert np.all(np.isfinite(losses)) and abs(losses[0] - losses[1]) > 1e-3, losses


def reference_distiller(hard, mlp_layernorm, temperature, alpha):
    from vit_pytorch.distill import DistillableViT as RefStudent
    from vit_pytorch.distill import DistillWrapper as RefWrapper
    from vit_pytorch.vit import ViT as RefViT

    torch.manual_seed(0)
    ref = RefWrapper(
        student=RefStudent(**STUDENT),
        teacher=RefViT(**TEACHER),
        temperature=temperature,
        alpha=alpha,
        hard=hard,
        mlp_layernorm=mlp_layernorm,
    )
    return randomize_torch(ref, scale=0.5).eval()


@pytest.mark.parametrize(
    "hard, mlp_layernorm, temperature, alpha",
    [(False, False, 3.0, 0.5), (False, True, 0.7, 0.8), (True, True, 1.0, 0.3)],
)
def test_loss_matches_vit_pytorch(hard, mlp_layernorm, temperature, alpha):
    ref = reference_distiller(hard, mlp_layernorm, temperature, alpha)
    ours = DistillWrapper(
        student=DistillableViT(**STUDENT),
        teacher=ViT(**TEACHER),
        temperature=temperature,
        alpha=alpha,
        hard=hard,
        mlp_layernorm=mlp_layernorm,
    )
    from_vit_pytorch(ours, ref.state_dict())
    rng = np.random.default_rng(3)
    x = rng.normal(size=(4, 3, 16, 12)).astype("float32")
    y = rng.integers(0, 5, size=4)
    with torch.no_grad():
        expected = ref(torch.from_numpy(x), torch.from_numpy(y)).item()
    images = x.transpose(0, 2, 3, 1)
    got = as_numpy(ours.compute_loss(images, y, ours(images, training=False), training=False))
    assert rel_err(got, expected) < 1e-4, (got, expected)


def test_distill_token_output_matches_vit_pytorch():
    from vit_pytorch.distill import DistillableViT as Reference

    ref = randomize_torch(Reference(**STUDENT)).eval()
    ours = from_vit_pytorch(DistillableViT(**STUDENT), ref.state_dict())
    token = np.random.default_rng(0).normal(size=(1, 12)).astype("float32")
    x = np.random.default_rng(1).normal(size=(2, 3, 16, 12)).astype("float32")
    with torch.no_grad():
        ref_logits, ref_token = ref(torch.from_numpy(x), distill_token=torch.from_numpy(token))
    logits, out = ours(x.transpose(0, 2, 3, 1), distill_token=token)
    assert rel_err(as_numpy(logits), ref_logits.numpy()) < 1e-4
    assert rel_err(as_numpy(out), ref_token.numpy()) < 1e-4


def test_to_vit_is_a_vit_with_the_same_weights_and_outputs():
    student = DistillableViT(**STUDENT, dtype="float32")
    x = np.random.default_rng(0).normal(size=(3, 16, 12, 3)).astype("float32")
    vit = student.to_vit()
    assert type(vit) is ViT
    assert {k: v for k, v in vit.get_config().items() if k != "name"} == {
        k: v for k, v in student.get_config().items() if k != "name"
    }
    np.testing.assert_array_equal(as_numpy(vit(x)), as_numpy(student(x)))
    for a, b in zip(weights(vit), weights(student)):
        np.testing.assert_array_equal(a, b)


def test_wrapper_saves_and_loads(tmp_path):
    distiller = DistillWrapper(
        student=DistillableViT(**STUDENT),
        teacher=ViT(**TEACHER),
        temperature=2.0,
        alpha=0.25,
        hard=True,
        mlp_layernorm=True,
    )
    x = np.random.default_rng(0).normal(size=(2, 16, 12, 3)).astype("float32")
    expected = [as_numpy(y) for y in distiller(x)]
    distiller.compile(optimizer="adam")
    distiller.save(tmp_path / "distiller.keras")
    loaded = keras.saving.load_model(tmp_path / "distiller.keras")
    assert type(loaded.student) is DistillableViT and type(loaded.teacher) is ViT
    assert loaded.get_config() == distiller.get_config()
    assert not loaded.teacher.trainable
    for a, b in zip(loaded(x), expected):
        np.testing.assert_array_equal(as_numpy(a), b)


@pytest.mark.parametrize(
    "overrides, parameter",
    [
        (dict(student="vit"), "student"),
        (dict(teacher="resnet"), "teacher"),
        (dict(temperature=0), "temperature"),
        (dict(alpha=1.5), "alpha"),
    ],
)
def test_invalid_arguments_name_the_parameter(overrides, parameter):
    kwargs = {"student": DistillableViT(**STUDENT), "teacher": small_cnn_teacher(), **overrides}
    with pytest.raises(ValueError, match=f"`{parameter}`"):
        DistillWrapper(**kwargs)


def test_compile_refuses_a_loss():
    distiller = DistillWrapper(student=DistillableViT(**STUDENT), teacher=small_cnn_teacher())
    with pytest.raises(ValueError, match="loss"):
        distiller.compile(optimizer="adam", loss="mse")
