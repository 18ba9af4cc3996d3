"""The DINO trainer: `fit` on every backend trains the student, the teacher follows it by the
moving average after every optimizer step, the centre moves; the encoder then classifies, saves
and loads. Its loss and projection head against vit-pytorch's; its crops; its argument checks."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import torch
from keras import ops

from backends_tests.helpers import as_numpy, rel_err
from vitkit.models.vit import ViT
from vitkit.trainers.augment import RandomApply, RandomResizedCrop
from vitkit.trainers.dino import Dino, DinoAugment, ProjectionHead, dino_loss

NET = dict(
    image_size=16, patch_size=4, num_classes=5, dim=16, depth=1, heads=2, dim_head=8, mlp_dim=24
)
SMALL = dict(projection_hidden_size=12, num_classes_K=10, projection_layers=2)


def values(variables):
    return [as_numpy(v) for v in variables]


def unit_images(shape, seed=0):
    """Images in [0, 1], as the default augmentation expects."""
    return np.random.default_rng(seed).uniform(size=shape).astype("float32")


class RecordStudent(keras.callbacks.Callback):
    """The student's weights after every optimizer step (on JAX, reading `model` syncs them)."""

    def __init__(self):
        super().__init__()
        self.steps = []

    def on_train_batch_end(self, batch, logs=None):
        self.steps.append(values(s for _, s in self.model._teacher_pairs))


def test_fit_trains_the_student_and_the_teacher_follows_by_moving_average(tmp_path):
    net = ViT(**NET)
    decay = 0.8
    learner = Dino(net, image_size=16, moving_average_decay=decay, **SMALL)
    learner.build_default()
    assert not learner.teacher_net.trainable_weights and not learner.teacher_projector.trainable
    assert {id(w) for w in learner.trainable_weights} == {
        *(id(w) for w in net.trainable_weights),
        *(id(w) for w in learner.projector.trainable_weights),
    }
    pairs = learner._teacher_pairs
    teacher_start = values(t for t, _ in pairs)
    for a, (_, s) in zip(teacher_start, pairs):
        np.testing.assert_array_equal(a, as_numpy(s))  # the teacher starts as the student

    x = unit_images((16, 20, 20, 3))  # crops resize them to 16 x 16
    recorder = RecordStudent()
    learner.compile(optimizer=keras.optimizers.Adam(1e-2))
    history = learner.fit(x, batch_size=8, epochs=4, verbose=0, callbacks=[recorder])
    losses = history.history["loss"]
    assert np.all(np.isfinite(losses)) and losses[-1] < 0.8 * losses[0], losses

    # Every weight on the loss's path moved; the head after `hidden_layer` got zero gradients.
    student_start = teacher_start
    student_end = values(s for _, s in pairs)
    head = {id(w) for w in net.head.weights}
    for (_, s), before, after in zip(pairs, student_start, student_end):
        if id(s) in head:
            np.testing.assert_array_equal(before, after)
        else:
            assert not np.array_equal(before, after), f"{s.path} did not move"

    # The teacher is the moving average of the student after every optimizer step, exactly.
    assert len(recorder.steps) == 8
    expected = teacher_start
    for student in recorder.steps:
        expected = [t + (1 - decay) * (s - t) for t, s in zip(expected, student)]
    teacher_end = values(t for t, _ in pairs)
    for (t, _), got, want in zip(pairs, teacher_end, expected):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=t.path)
    moved = [not np.array_equal(a, b) for a, b in zip(teacher_start, teacher_end)]
    differ = [not np.array_equal(a, b) for a, b in zip(teacher_end, student_end)]
    on_path = [id(s) not in head for _, s in pairs]
    assert moved == on_path and differ == on_path
    assert as_numpy(learner.update_owed) == 0  # no update left owed after `fit`
    center = as_numpy(learner.center)
    assert center.shape == (1, 10) and np.all(np.isfinite(center)) and np.any(center != 0)

    # The encoder alone classifies, and saves and loads.
    images = unit_images((3, 16, 16, 3), seed=1)
    logits = as_numpy(net(images))
    assert logits.shape == (3, 5) and np.all(np.isfinite(logits))
    net.save(tmp_path / "encoder.keras")
    loaded = keras.saving.load_model(tmp_path / "encoder.keras")
    assert type(loaded) is ViT
    np.testing.assert_array_equal(as_numpy(loaded(images)), logits)


def test_one_channel_channels_first_images_with_a_named_hidden_layer():
    net = ViT(**{**NET, "image_size": 8, "channels": 1}, data_format="channels_first")
    # decay 1: the teacher keeps the copy of the student it starts as
    learner = Dino(net, image_size=8, hidden_layer="pooling", moving_average_decay=1.0, **SMALL)
    x = unit_images((8, 1, 12, 12))  # digits-like: one channel, larger than the crops
    local, glob = learner.views(keras.KerasTensor(x.shape), training=True)
    assert tuple(local.shape) == tuple(glob.shape) == (16, 1, 8, 8)
    learner.compile(optimizer=keras.optimizers.Adam(1e-2))
    start = keras.callbacks.LambdaCallback(
        on_train_begin=lambda logs: start.__dict__.update(student=values(net.weights))
    )
    # unbuilt: `fit` builds it symbolically, and the first step copies the student
    history = learner.fit(
        x, batch_size=8, epochs=2, verbose=0, validation_data=(x,), callbacks=[start]
    )
    assert np.all(np.isfinite(history.history["loss"] + history.history["val_loss"]))
    head = {id(w) for w in net.head.weights}  # after the hidden layer: not trained
    for w, a, b in zip(net.weights, start.student, values(net.weights)):
        assert np.array_equal(a, b) == (id(w) in head), w.path
    teacher = values(learner.teacher_net.weights)
    for a, b in zip(start.student, teacher):
        np.testing.assert_array_equal(a, b)
    # evaluating (no augmentation: the views are the resized images) moves nothing
    state = values([learner.center, *(t for t, _ in learner._teacher_pairs)])
    assert np.isfinite(learner.evaluate(x, batch_size=8, verbose=0))
    for a, b in zip(state, values([learner.center, *(t for t, _ in learner._teacher_pairs)])):
        np.testing.assert_array_equal(a, b)


def small_cnn(name="cnn"):
    """Any Keras model will do: a small functional CNN (`hidden_layer=-2`: its pooling)."""
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(6, 3, strides=2, activation="relu")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(5)(x), name=name)


def test_a_loop_of_ones_own_updates_the_teacher_after_the_optimizer_step(tmp_path):
    identity = dict(augment_fn=keras.layers.Identity(), augment_fn2=keras.layers.Identity())
    learner = Dino(small_cnn(), 16, moving_average_decay=0.7, **identity, **SMALL)
    learner.build((None, 16, 16, 3))
    assert learner.embedding_dim == 6
    m = learner.center_moving_average_decay
    x = unit_images((4, 16, 16, 3))
    y_pred = learner(x, training=True)
    assert tuple(y_pred["student"].shape) == (8, 10)
    assert tuple(y_pred["teacher_views"].shape) == (8, 16, 16, 3)
    teacher_outputs = as_numpy(learner.teacher_projection(y_pred["teacher_views"]))
    loss = learner.compute_loss(x, y_pred=y_pred, training=True)
    assert np.isfinite(as_numpy(loss))
    # the centre follows the teacher's mean output right away; a teacher update is owed
    np.testing.assert_allclose(
        as_numpy(learner.center), (1 - m) * teacher_outputs.mean(0, keepdims=True), atol=1e-6
    )
    assert as_numpy(learner.update_owed) == 1
    teacher = values(t for t, _ in learner._teacher_pairs)
    for _, s in learner._teacher_pairs:  # an optimizer step, by hand
        s.assign(s + 0.1)
    learner.update_moving_average()
    for (t, s), before in zip(learner._teacher_pairs, teacher):
        np.testing.assert_allclose(as_numpy(t), before + 0.3 * (as_numpy(s) - before), atol=1e-6)
    assert as_numpy(learner.update_owed) == 0
    updated = values(t for t, _ in learner._teacher_pairs)
    learner.update_moving_average()  # nothing owed: no change
    for a, b in zip(updated, values(t for t, _ in learner._teacher_pairs)):
        np.testing.assert_array_equal(a, b)

    # The trainer saves and loads with its teacher and centre.
    learner.compile(optimizer="adam")
    learner.optimizer.build(learner.trainable_variables)
    learner.save(tmp_path / "dino.keras")
    loaded = keras.saving.load_model(tmp_path / "dino.keras")
    assert type(loaded) is Dino and loaded.get_config() == learner.get_config()
    assert [w.path for w in loaded.weights] == [w.path for w in learner.weights]
    for a, b in zip(loaded.weights, learner.weights):
        np.testing.assert_array_equal(as_numpy(a), as_numpy(b))
    for a, b in zip(loaded.embed(x), learner.embed(x)):
        np.testing.assert_array_equal(as_numpy(a), as_numpy(b))


def reference_loss_and_head():
    from vit_pytorch import dino

    return dino.loss_fn, dino.MLP


@pytest.mark.parametrize("num_layers", [1, 3])
def test_projection_head_matches_vit_pytorch(num_layers):
    _, Reference = reference_loss_and_head()
    torch.manual_seed(0)
    ref = Reference(12, 7, num_layers, hidden_size=12).eval()  # 1 layer: needs dim == hidden
    ours = ProjectionHead(7, num_layers=num_layers, hidden_size=12)
    ours.build((None, 12))
    linears = [m for m in ref.net if isinstance(m, torch.nn.Linear)]
    for layer, linear in zip([*ours.hidden, ours.out], linears, strict=True):
        layer.set_weights([linear.weight.detach().numpy().T, linear.bias.detach().numpy()])
    x = np.random.default_rng(0).normal(size=(5, 12)).astype("float32")
    with torch.no_grad():
        expected = ref(torch.from_numpy(x)).numpy()
    assert rel_err(as_numpy(ours(x)), expected) < 1e-5


def test_loss_matches_vit_pytorch():
    loss_fn, _ = reference_loss_and_head()
    rng = np.random.default_rng(0)
    teacher, student = rng.normal(size=(2, 6, 11)).astype("float32")
    center = rng.normal(size=(1, 11)).astype("float32") * 0.1
    expected = loss_fn(
        torch.from_numpy(teacher), torch.from_numpy(student), 0.04, 0.9, torch.from_numpy(center)
    ).item()
    got = ops.mean(dino_loss(teacher, student, center, teacher_temp=0.04, student_temp=0.9))
    assert rel_err(as_numpy(got), expected) < 1e-5


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
def test_random_resized_crop(data_format):
    crop = RandomResizedCrop((6, 5), scale=(0.1, 0.5), data_format=data_format, seed=3)
    images = np.random.default_rng(0).normal(size=(4, 9, 11, 2)).astype("float32")
    if data_format == "channels_first":
        images = images.transpose(0, 3, 1, 2)
    out = as_numpy(crop(images, training=True))
    assert out.shape == crop.compute_output_shape(images.shape)
    assert out.shape == ((4, 6, 5, 2) if data_format == "channels_last" else (4, 2, 6, 5))
    assert np.all(np.isfinite(out))
    assert not np.allclose(out[0], out[1:]), "each image should get its own window"
    assert not np.allclose(out, as_numpy(crop(images, training=True))), "draws change per call"
    # Values are bilinear blends of the image's: inside its range.
    assert images.min() - 1e-5 <= out.min() and out.max() <= images.max() + 1e-5
    # Out of training: the whole image, resized (bilinear, half-pixel centres).
    same = RandomResizedCrop((9, 11), data_format=data_format)
    np.testing.assert_allclose(as_numpy(same(images)), images, rtol=1e-6, atol=1e-6)
    larger = RandomResizedCrop((18, 22), data_format=data_format)
    expected = ops.image.resize(
        images, (18, 22), interpolation="bilinear", antialias=False, data_format=data_format
    )
    np.testing.assert_allclose(as_numpy(larger(images)), as_numpy(expected), atol=1e-5)


def test_random_resized_crop_of_the_whole_image_is_the_identity_in_training():
    crop = RandomResizedCrop(8, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    images = np.random.default_rng(0).normal(size=(3, 8, 8, 1)).astype("float32")
    np.testing.assert_allclose(as_numpy(crop(images, training=True)), images, atol=1e-6)


def test_augmentations_apply_per_image_in_training_only():
    images = unit_images((64, 8, 8, 3))
    augment = DinoAugment(seed=1)
    out = as_numpy(augment(images, training=True))
    normalized = (images - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    np.testing.assert_allclose(as_numpy(augment(images)), normalized, atol=1e-5)
    untouched = np.all(np.isclose(out, normalized, atol=1e-5), axis=(1, 2, 3))
    assert 0 < untouched.sum() < 64  # some images changed, some not
    gray = as_numpy(DinoAugment(seed=2)(unit_images((4, 8, 8, 1)), training=True))
    assert gray.shape == (4, 8, 8, 1) and gray.min() >= 0 and gray.max() <= 1  # no normalizing
    always = RandomApply(keras.layers.RandomFlip("horizontal_and_vertical", seed=0), rate=0.0)
    np.testing.assert_array_equal(as_numpy(always(images, training=True)), images)


INVALID = [
    (dict(net="vit"), "net"),
    (dict(image_size=0), "image_size"),
    (dict(hidden_layer="to_latent"), "hidden_layer"),
    (dict(hidden_layer=9), "hidden_layer"),
    (dict(projection_hidden_size=0), "projection_hidden_size"),
    (dict(num_classes_K=0), "num_classes_K"),
    (dict(projection_layers=0), "projection_layers"),
    (dict(student_temp=0), "student_temp"),
    (dict(teacher_temp=-0.1), "teacher_temp"),
    (dict(local_upper_crop_scale=0.01), "local_upper_crop_scale"),
    (dict(local_upper_crop_scale=1.5), "local_upper_crop_scale"),
    (dict(global_lower_crop_scale=0), "global_lower_crop_scale"),
    (dict(moving_average_decay=1.1), "moving_average_decay"),
    (dict(center_moving_average_decay=-0.1), "center_moving_average_decay"),
    (dict(augment_fn="flip"), "augment_fn"),
    (dict(augment_fn2=3), "augment_fn2"),
]


def test_invalid_arguments_name_the_parameter():
    net = ViT(**NET)  # one session for all cases: each test's fresh Keras session costs time
    for overrides, parameter in INVALID:
        with pytest.raises(ValueError, match=f"`{parameter}`"):
            Dino(**{"net": net, "image_size": 16, **overrides})


def test_unknown_arguments_and_a_loss_are_refused():
    with pytest.raises(TypeError, match="projection_dim"):
        Dino(ViT(**NET), image_size=16, projection_dim=8)
    learner = Dino(ViT(**NET), image_size=16, **SMALL)
    with pytest.raises(ValueError, match="loss"):
        learner.compile(optimizer="adam", loss="mse")
    with pytest.raises(ValueError, match="`scale`"):
        RandomResizedCrop(8, scale=(0.5, 0.2))
