"""DINO: self-distillation with no labels ("Emerging Properties in Self-Supervised Vision
Transformers", Caron et al., ICCV 2021, arXiv:2104.14294): a student learns to match, on other
crops of the same images, a teacher that is the moving average of the student itself."""

from __future__ import annotations

import math

import keras
from keras import ops

from vitkit.layers.base import VitkitLayer
from vitkit.layers.utils import (
    DATA_FORMATS,
    between,
    check_pair,
    check_positive,
    integer,
    one_of,
)
from vitkit.taps import LayerTap, find_layer
from vitkit.trainers.augment import RandomApply, RandomResizedCrop, check_seed
from vitkit.trainers.base import Trainer

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def dino_loss(teacher_logits, student_logits, center, teacher_temp: float, student_temp: float):
    """Cross-entropy `(n,)` between the centred, sharpened teacher distribution
    `softmax((teacher - center) / teacher_temp)` (no gradient) and the student's
    `softmax(student / student_temp)`, row by row (Algorithm 1 of the paper)."""
    teacher_logits, student_logits, center = (
        ops.convert_to_tensor(t) for t in (teacher_logits, student_logits, center)
    )
    teacher = ops.stop_gradient(teacher_logits - center) / teacher_temp
    student = ops.log_softmax(student_logits / student_temp, axis=-1)
    return -ops.sum(ops.softmax(teacher, axis=-1) * student, axis=-1)


@keras.saving.register_keras_serializable(package="vitkit")
class ProjectionHead(VitkitLayer):
    """DINO's projection MLP on an embedding: `num_layers - 1` Linear + GELU layers of width
    `hidden_size`, L2 normalization, then a Linear layer to `output_dim` (vit-pytorch's `MLP`).

    Args:
        output_dim: outputs (K in the paper).
        num_layers: Linear layers in all, >= 1 (1: normalize the embedding, then project).
        hidden_size: width of the hidden layers.
    """

    def __init__(self, output_dim, num_layers=4, hidden_size=256, **kwargs):
        super().__init__(**kwargs)
        self.keep_args(locals(), output_dim=integer(), num_layers=integer(), hidden_size=integer())
        policy = self.dtype_policy
        self.hidden = [
            keras.layers.Dense(hidden_size, activation="gelu", dtype=policy, name=f"hidden_{i}")
            for i in range(num_layers - 1)
        ]
        self.out = keras.layers.Dense(output_dim, dtype=policy, name="out")

    def build(self, input_shape):
        width = input_shape[-1]
        for layer in self.hidden:
            layer.build((None, width))
            width = self.hidden_size
        self.out.build((None, width))

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], self.output_dim)

    def call(self, x):
        for layer in self.hidden:
            x = layer(x)
        norm = ops.sqrt(ops.sum(ops.square(x), axis=-1, keepdims=True))
        return self.out(x / ops.maximum(norm, 1e-6))  # L2 norm clamped at 1e-6, as the reference


@keras.saving.register_keras_serializable(package="vitkit")
class DinoAugment(VitkitLayer):
    """DINO's (and BYOL's) default augmentation of vit-pytorch, each image drawn on its own:
    colour jitter (probability 0.3), grayscale (0.2), horizontal flip (0.5), Gaussian blur
    (3x3, sigma in [1, 2], probability 0.2), then ImageNet normalization.

    Images are expected in [0, 1], as torchvision's transforms take them. Colour jitter,
    grayscale and the ImageNet normalization need RGB: on images with another number of
    channels (1-channel digits) they are skipped, and only flip and blur apply. Keras' colour
    jitter is not torchvision's: brightness is shifted (by up to +-0.4) rather than scaled;
    contrast (x[0.2, 1.8]), saturation (x[0.2, 1.8]) and hue (+-0.2 turn) match
    `ColorJitter(0.8, 0.8, 0.8, 0.2)`. Out of training only the normalization applies.

    Args:
        data_format: `"channels_last"` or `"channels_first"`.
        seed: seed of the draws, or None.
    """

    def __init__(self, data_format="channels_last", seed=None, **kwargs):
        super().__init__(**kwargs)
        owner = type(self).__name__
        self.data_format = one_of(*DATA_FORMATS)("data_format", data_format, owner)
        self.seed = check_seed("seed", seed, owner)
        seeds = iter([None] * 5 if seed is None else range(seed, seed + 5))
        common = dict(data_format=data_format, dtype=self.dtype_policy)
        jitter = keras.layers.RandomColorJitter(
            value_range=(0, 1),
            brightness_factor=(-0.4, 0.4),
            contrast_factor=(0.8, 0.8),  # a factor in [1 - 0.8, 1 + 0.8]
            saturation_factor=(0.2 / 1.2, 1.8 / 2.8),  # s / (1 - s): a factor in [0.2, 1.8]
            hue_factor=(0.0, 0.4),  # a shift of +-0.4 / 2 turn
            seed=next(seeds),
            **common,
        )
        self.color_jitter = RandomApply(
            jitter, rate=0.3, seed=next(seeds), dtype=self.dtype_policy, name="color_jitter"
        )
        self.grayscale = keras.layers.RandomGrayscale(0.2, seed=next(seeds), **common)
        self.flip = keras.layers.RandomFlip("horizontal", seed=next(seeds), **common)
        self.blur = keras.layers.RandomGaussianBlur(
            factor=(0.2, 0.2),
            kernel_size=3,
            sigma=(1.0, 2.0),
            value_range=(0, 1),
            seed=next(seeds),
            **common,
        )

    def build(self, input_shape):
        for layer in (self.color_jitter, self.grayscale, self.flip, self.blur):
            layer.build(input_shape)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def call(self, images, training=None):
        training = bool(training)
        axis = -1 if self.data_format == "channels_last" else 1
        rgb = images.shape[axis] == 3
        x = images
        if rgb:
            x = self.color_jitter(x, training=training)
            x = self.grayscale(x, training=training)
        x = self.flip(x, training=training)
        x = self.blur(x, training=training)
        if rgb:
            shape = (1, 1, 1, 3) if axis == -1 else (1, 3, 1, 1)
            mean = ops.reshape(ops.convert_to_tensor(IMAGENET_MEAN, x.dtype), shape)
            std = ops.reshape(ops.convert_to_tensor(IMAGENET_STD, x.dtype), shape)
            x = (x - mean) / std
        return x


class _Probe(keras.layers.Layer):
    """Runs `fn` as its `call`: called on symbolic tensors, it traces `fn` with the backend's
    placeholders, so every layer inside runs its `call` (a functional model's own symbolic pass
    would only read its layers' output specs)."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def call(self, x):
        return self.fn(x)


def symbolic_output(net, layer, images):
    """The spec of what `layer` (None: `net` itself) returns when `net` runs on the symbolic
    `images`; builds `net` if it is not built."""
    if layer is None:
        return net(images)

    def run(x):
        with LayerTap(layer) as tap:
            net(x)
        return tap.last

    return _Probe(run)(images)


def _check_image_size(name, value, owner):
    check_pair(name, value, owner=owner)
    return value


class _TeacherCatchUp(keras.callbacks.Callback):
    """Applies the teacher's moving-average update owed for the last optimizer step (see
    `Dino.update_moving_average`) wherever the teacher may be read or kept: before evaluation,
    at the end of each epoch (before checkpoints) and of training."""

    def on_test_begin(self, logs=None):
        self.model.update_moving_average()  # on JAX, reading `model` syncs its state first

    def on_epoch_end(self, epoch, logs=None):
        self.model.update_moving_average()

    def on_train_end(self, logs=None):
        self.model.update_moving_average()


@keras.saving.register_keras_serializable(package="vitkit")
class Dino(Trainer):
    """Trains an image network by DINO, with `compile` and `fit`, without labels.

    Each batch is augmented twice (`augment_fn`, `augment_fn2`; default: `DinoAugment`); each
    of the two augmented batches gives a small local crop (area fraction in
    [0.05, `local_upper_crop_scale`]) and a large global crop ([`global_lower_crop_scale`, 1]),
    all resized to `image_size`. The student (`net`, read at `hidden_layer`, and a projection
    MLP) sees the local crops, the teacher (a copy of both) the global ones, and the student
    of each view learns the teacher's distribution for the other view:

        loss = (H(t1, s2) + H(t2, s1)) / 2,   H(t, s) = -sum softmax((t - C) / teacher_temp)
                                                          * log_softmax(s / student_temp)

    as in vit-pytorch's `Dino`. Only the student is trained. After each optimizer step the
    teacher follows it, `teacher <- d * teacher + (1 - d) * student` (`d =
    moving_average_decay`, over every weight), and the centre `C` follows the teacher's mean
    output, `C <- m * C + (1 - m) * mean(t1, t2)` (`m = center_moving_average_decay`).

    How the teacher update runs after the optimizer step with `fit` only: the step that
    computes a loss marks an update as owed; the next step's `compute_loss` applies it before
    the teacher runs (the student's weights are then those the optimizer left), and `fit`
    (and `evaluate`) applies the last one through a callback, before evaluating, at the end of
    each epoch and of training. The teachers used in the losses, and the teacher after `fit`,
    are exactly those of an update after every step. In a loop of your own, call
    `update_moving_average()` after each optimizer step, as with vit-pytorch. The centre needs
    no optimizer, so the loss updates it right after using it.

    The layers of `net` after `hidden_layer` (a ViT's head) are not on the loss's path: they get
    zero gradients (on every backend) and keep their weights.

    `call(images)` returns the loss's inputs: `{"student": (2b, K) projections of the two
    local crops, "teacher_views": (2b, ...) the two global crops}`; `embed(images)` gives the
    student's projection and embedding of images as they are. `compile` takes the optimizer,
    not a loss. After training, keep `net` (`dino.net`): it is the pre-trained encoder.

    Args:
        net: the Keras model to train (a vitkit model, or any model with `get_config`); its
            images are channels-last unless `net.data_format == "channels_first"`.
        image_size: side of the crops (int, or a (height, width) pair) that `net` takes.
        hidden_layer: where to read the embedding: an index into `net.layers` (-2: a vitkit
            ViT's pooling, the token before the head), an attribute name or path
            ("pooling", "transformer.norm"), or a layer name; -1 for `net`'s output itself.
            It is flattened to `(b, features)`.
        projection_hidden_size: width of the projection MLP.
        num_classes_K: outputs of the projection (K).
        projection_layers: Linear layers of the projection MLP, >= 1.
        student_temp: student softmax temperature (> 0).
        teacher_temp: teacher softmax temperature (> 0), its sharpening.
        local_upper_crop_scale: largest area fraction of a local crop, in [0.05, 1].
        global_lower_crop_scale: smallest area fraction of a global crop, in (0, 1].
        moving_average_decay: teacher moving-average decay, in [0, 1].
        center_moving_average_decay: centre moving-average decay, in [0, 1].
        augment_fn: the first view's augmentation, any callable (best a Keras layer, so the
            trainer saves) from a batch to a batch; default `DinoAugment`.
        augment_fn2: the second view's; default `DinoAugment` (not `augment_fn`), as in
            vit-pytorch.

    Example:
        >>> learner = Dino(vit, image_size=32, hidden_layer="pooling", num_classes_K=1024)
        >>> learner.compile(optimizer=keras.optimizers.Adam(3e-4))
        >>> learner.fit(images, epochs=10)
        >>> vit.save("pretrained.keras")
    """

    layer_arguments = ("net", "augment_fn", "augment_fn2")

    def __init__(
        self,
        net,
        image_size,
        hidden_layer=-2,
        projection_hidden_size=256,
        num_classes_K=65336,
        projection_layers=4,
        student_temp=0.9,
        teacher_temp=0.04,
        local_upper_crop_scale=0.4,
        global_lower_crop_scale=0.5,
        moving_average_decay=0.9,
        center_moving_average_decay=0.9,
        augment_fn=None,
        augment_fn2=None,
        **kwargs,
    ):
        args = dict(locals())
        owner = type(self).__name__
        super().__init__(**kwargs)
        if not isinstance(net, keras.Model):
            raise ValueError(
                f"{owner}: `net` must be a Keras model mapping images to outputs; got "
                f"{type(net).__name__}."
            )
        unit = between(0.0, 1.0, low_closed=True, high_closed=True)
        self.keep_args(
            args,
            net=lambda name, value, owner: value,
            image_size=_check_image_size,
            hidden_layer=self._check_hidden_layer,
            projection_hidden_size=integer(),
            num_classes_K=integer(),
            projection_layers=integer(),
            student_temp=check_positive,
            teacher_temp=check_positive,
            local_upper_crop_scale=between(0.05, 1.0, low_closed=True, high_closed=True),
            global_lower_crop_scale=between(0.0, 1.0, high_closed=True),
            moving_average_decay=unit,
            center_moving_average_decay=unit,
            augment_fn=self._check_augment,
            augment_fn2=self._check_augment,
        )
        self.data_format = getattr(net, "data_format", "channels_last")
        policy = self.dtype_policy
        # vit-pytorch uses one default pipeline for both views (its draws differ per call)
        default = None
        if augment_fn is None or augment_fn2 is None:
            default = DinoAugment(data_format=self.data_format, dtype=policy, name="augment")
        self.augment_one = default if augment_fn is None else augment_fn
        self.augment_two = default if augment_fn2 is None else augment_fn2
        crop = dict(size=image_size, data_format=self.data_format, dtype=policy)
        self.local_crop = RandomResizedCrop(
            scale=(0.05, local_upper_crop_scale), name="local_crop", **crop
        )
        self.global_crop = RandomResizedCrop(
            scale=(global_lower_crop_scale, 1.0), name="global_crop", **crop
        )
        self.projector = ProjectionHead(
            num_classes_K,
            projection_layers,
            projection_hidden_size,
            dtype=policy,
            name="projector",
        )
        # The teacher: the same architecture, its own (frozen) weights, copied at build.
        config = keras.saving.serialize_keras_object(net)
        config.pop("build_config", None)
        config["config"] = {**config["config"], "name": f"teacher_{net.name}"}
        self.teacher_net = keras.saving.deserialize_keras_object(config)
        self.teacher_net.trainable = False
        self.teacher_projector = ProjectionHead.from_config(
            {**self.projector.get_config(), "name": "teacher_projector"}
        )
        self.teacher_projector.trainable = False

    # Argument checks -------------------------------------------------------------------------

    def _check_hidden_layer(self, name, value, owner):
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ValueError(
                f"{owner}: `{name}` must be an index into `net.layers`, or a layer's attribute "
                f"path or name; got {value!r}."
            )
        if value != -1:
            try:
                find_layer(self.net, value)
            except ValueError as err:
                raise ValueError(f"{owner}: `{name}`: {err}") from None
        return value

    @staticmethod
    def _check_augment(name, value, owner):
        if value is not None and not callable(value):
            raise ValueError(
                f"{owner}: `{name}` must be None or a callable (a Keras layer) from a batch of "
                f"images to a batch of images; got {value!r}."
            )
        return value

    # Building --------------------------------------------------------------------------------

    def _hidden_layers(self):
        """The tapped layer of the student and the teacher (None: the nets' outputs)."""
        if self.hidden_layer == -1:
            return None, None
        student = find_layer(self.net, self.hidden_layer)
        index = [id(layer) for layer in self.net._flatten_layers()].index(id(student))
        return student, list(self.teacher_net._flatten_layers())[index]

    def crop_shape(self, input_shape) -> tuple:
        """The shape of the crops of a batch of images of `input_shape`."""
        return self.local_crop.compute_output_shape(input_shape)

    def build(self, input_shape):
        input_shape = tuple(input_shape)
        # Kept past Keras' tracking: these layers belong to the nets, not to the trainer.
        object.__setattr__(self, "_hidden", self._hidden_layers())
        images = keras.KerasTensor(input_shape)
        for augment in {id(a): a for a in (self.augment_one, self.augment_two)}.values():
            if isinstance(augment, keras.layers.Layer) and not augment.built:
                augment(images)  # a symbolic pass builds it, before any trace
        crops = keras.KerasTensor(self.crop_shape(input_shape))
        widths = [
            math.prod(symbolic_output(net, hidden, crops).shape[1:])
            for net, hidden in zip((self.net, self.teacher_net), self._hidden)
        ]
        self.embedding_dim = widths[0]
        self.projector.build((None, self.embedding_dim))
        self.teacher_projector.build((None, widths[1]))
        object.__setattr__(self, "_teacher_pairs", self._pair_teacher_weights())
        self.center = self.add_weight(
            shape=(1, self.num_classes_K), initializer="zeros", trainable=False, name="center"
        )
        # 1.0 once the teacher holds a copy of the student
        self.teacher_ready = self.add_weight(
            shape=(), initializer="zeros", trainable=False, name="teacher_ready"
        )
        # 1.0 while a teacher update is owed for the last optimizer step
        self.update_owed = self.add_weight(
            shape=(), initializer="zeros", trainable=False, name="update_owed"
        )
        # The teacher starts as the student. Built by `fit` (a symbolic pass in a stateless
        # scope), the weights are only initialized afterwards and these assignments are lost:
        # then the first training step (or `update_moving_average`) makes the copy.
        for teacher, student in self._teacher_pairs:
            teacher.assign(ops.copy(student))  # a copy: JAX must not see one buffer twice
        self.teacher_ready.assign(1.0)

    def _pair_teacher_weights(self):
        pairs = []
        pieces = ((self.net, self.teacher_net), (self.projector, self.teacher_projector))
        for student, teacher in pieces:
            if len(student.weights) != len(teacher.weights):
                raise ValueError(
                    f"{type(self).__name__}: the teacher copy of {student.name!r} has "
                    f"{len(teacher.weights)} weights, the student {len(student.weights)}: "
                    "`net` must rebuild identically from its config."
                )
            for s, t in zip(student.weights, teacher.weights):
                if tuple(s.shape) != tuple(t.shape):
                    raise ValueError(
                        f"{type(self).__name__}: teacher weight {t.path} has shape {t.shape}, "
                        f"the student's {s.path} {s.shape}."
                    )
                if "float" in str(s.dtype):
                    pairs.append((t, s))
        return pairs

    def build_default(self):
        """Create every weight, for images of the crop size with `net`'s channels."""
        if not self.built:
            channels = getattr(self.net, "input_channels", None)
            if channels is None:
                raise ValueError(
                    f"{type(self).__name__}.build_default: `net` does not say its channels; "
                    "call `build((batch, height, width, channels))` instead."
                )
            height, width = check_pair("image_size", self.image_size)
            if self.data_format == "channels_last":
                self.build((None, height, width, channels))
            else:
                self.build((None, channels, height, width))
        return self

    # Forward ---------------------------------------------------------------------------------

    def _embedding(self, net, hidden, images, training):
        """`(embedding (b, features), net's output)`."""
        if hidden is None:
            output = net(images, training=training)
            embedding = output
        else:
            with LayerTap(hidden) as tap:
                output = net(images, training=training)
            embedding = tap.last
        return ops.reshape(embedding, (-1, self.embedding_dim)), output

    def embed(self, images, return_projection=True, training=False):
        """The student on `images` as they are (no augmentation, no crop): `(projection,
        embedding)`, or the embedding alone with `return_projection=False`."""
        embedding, _ = self._embedding(self.net, self._hidden[0], images, training)
        if not return_projection:
            return embedding
        return self.projector(embedding, training=training), embedding

    def views(self, images, training=None):
        """The four views of a batch: `(local crops, global crops)`, each the two augmented
        batches stacked along the batch axis, `(2b, ...)`."""
        first = self.augment_one(images, training=training)
        second = self.augment_two(images, training=training)
        local = [self.local_crop(x, training=training) for x in (first, second)]
        glob = [self.global_crop(x, training=training) for x in (first, second)]
        return ops.concatenate(local, axis=0), ops.concatenate(glob, axis=0)

    def call(self, images, training=None):
        local, glob = self.views(images, training=training)
        embedding, output = self._embedding(self.net, self._hidden[0], local, training)
        projection = self.projector(embedding, training=training)  # (2b, K)
        if self._hidden[0] is not None:
            # The layers after `hidden_layer` do not reach the loss: a zero term gives them
            # the zero gradient JAX gives, not the missing one torch and TensorFlow report.
            unused = sum(
                ops.mean(ops.cast(y, projection.dtype)) for y in keras.tree.flatten(output)
            )
            projection = projection + 0.0 * unused
        return {"student": projection, "teacher_views": glob}

    def teacher_projection(self, views):
        """The teacher's projections of `views` (inference mode), float32, no gradient."""
        embedding, _ = self._embedding(self.teacher_net, self._hidden[1], views, False)
        projection = self.teacher_projector(embedding, training=False)
        return ops.stop_gradient(ops.cast(projection, "float32"))

    # Training --------------------------------------------------------------------------------

    def update_moving_average(self):
        """Apply the teacher's moving-average update owed for the last training step, if any:
        `teacher <- d * teacher + (1 - d) * student` over every weight, the student's weights
        being those the optimizer left (or the copy of the student that starts the teacher, if
        not made yet). `fit` calls it for you; call it after each optimizer step in a loop of
        your own. (The centre is updated by the loss itself.)"""
        owed = ops.greater(self.update_owed, 0.5)
        ready = ops.greater(self.teacher_ready, 0.5)
        decay = self.moving_average_decay
        for teacher, student in self._teacher_pairs:
            current = ops.convert_to_tensor(teacher)
            target = ops.stop_gradient(ops.cast(student, teacher.dtype))
            moved = current + (1.0 - decay) * (target - current)  # exact when they agree
            teacher.assign(ops.where(ready, ops.where(owed, moved, current), target))
        self.update_owed.assign(0.0)
        self.teacher_ready.assign(1.0)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        if y_pred is None:
            y_pred = self(x, training=training)
        if training:
            self.update_moving_average()  # the update owed for the previous optimizer step
        teacher = self.teacher_projection(y_pred["teacher_views"])  # (2b, K): t1, t2
        student = ops.cast(y_pred["student"], "float32")  # (2b, K): s1, s2
        s1, s2 = ops.split(student, 2, axis=0)
        center = ops.stop_gradient(ops.convert_to_tensor(self.center))
        loss = dino_loss(
            teacher,
            ops.concatenate([s2, s1], axis=0),  # t1 teaches s2, t2 teaches s1
            center,
            self.teacher_temp,
            self.student_temp,
        )  # (2b,)
        if training:
            m = self.center_moving_average_decay
            self.center.assign(m * center + (1.0 - m) * ops.mean(teacher, axis=0, keepdims=True))
            self.update_owed.assign(1.0)
        if sample_weight is not None:
            weight = ops.cast(ops.reshape(sample_weight, (-1,)), loss.dtype)
            return ops.sum(loss * ops.concatenate([weight, weight], axis=0)) / ops.maximum(
                2.0 * ops.sum(weight), 1e-12
            )
        return ops.mean(loss)

    def _with_catch_up(self, callbacks):
        if isinstance(callbacks, keras.callbacks.CallbackList):
            return callbacks  # from `fit` to its `evaluate`: ours is in it
        callbacks = list(callbacks or [])
        if not any(isinstance(c, _TeacherCatchUp) for c in callbacks):
            callbacks.insert(0, _TeacherCatchUp())  # first: before checkpoints
        return callbacks

    def fit(
        self, x=None, y=None, batch_size=None, epochs=1, verbose="auto", callbacks=None, **kwargs
    ):
        callbacks = self._with_catch_up(callbacks)
        return super().fit(
            x=x,
            y=y,
            batch_size=batch_size,
            epochs=epochs,
            verbose=verbose,
            callbacks=callbacks,
            **kwargs,
        )

    def evaluate(
        self,
        x=None,
        y=None,
        batch_size=None,
        verbose="auto",
        sample_weight=None,
        steps=None,
        callbacks=None,
        **kwargs,
    ):
        callbacks = self._with_catch_up(callbacks)
        return super().evaluate(
            x=x,
            y=y,
            batch_size=batch_size,
            verbose=verbose,
            sample_weight=sample_weight,
            steps=steps,
            callbacks=callbacks,
            **kwargs,
        )
