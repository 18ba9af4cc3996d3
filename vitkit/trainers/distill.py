"""Knowledge distillation through a distillation token (DeiT: Touvron et al., ICML 2021,
arXiv:2012.12877, section 5): a frozen teacher of any kind teaches a `DistillableViT`."""

from __future__ import annotations

import keras
from keras import ops

from vitkit.layers.attention import layer_norm
from vitkit.models.distill import DistillableViT
from vitkit.trainers.base import Trainer


@keras.saving.register_keras_serializable(package="vitkit")
class DistillWrapper(Trainer):
    """Trains a `DistillableViT` student against labels and a frozen teacher, with `fit`.

    The student runs with a learned distillation token appended to its patch tokens; its class
    token is trained on the labels, its distillation token (through a head of its own) on the
    teacher's predictions:

        loss = (1 - alpha) * CE(class logits, labels) + alpha * distillation loss

    Soft distillation (`hard=False`): `T^2 * KL(softmax(teacher / T) || softmax(distill / T))`
    averaged over the batch, `T = temperature`. Hard distillation: `CE(distill logits,
    argmax(teacher))`. These are vit-pytorch's `DistillWrapper` losses.

    `call(images)` returns `(class logits, distillation logits)`; `compile` takes the optimizer
    and metrics (they see the class logits), not a loss: the loss is this one. After training,
    the student (`wrapper.student`, or `wrapper.student.to_vit()`) is the model to keep.

    Args:
        teacher: any Keras model mapping the student's images to `num_classes` logits (not
            probabilities), e.g. `keras.applications.ResNet50(weights=None, classes=...,
            classifier_activation=None)`. It is frozen and runs in inference mode.
        student: the `DistillableViT` to train.
        temperature: softening of both distributions in soft distillation (> 0).
        alpha: weight of the distillation loss, in [0, 1].
        hard: hard (teacher's argmax) instead of soft distillation.
        mlp_layernorm: LayerNorm before the distillation head.

    Example:
        >>> distiller = DistillWrapper(student=v, teacher=teacher, temperature=3, alpha=0.5)
        >>> distiller.compile(optimizer="adam")
        >>> distiller.fit(images, labels, epochs=1)
    """

    layer_arguments = ("teacher", "student")  # saved serialized, rebuilt by `from_config`

    def __init__(
        self,
        *,
        teacher,
        student,
        temperature=1.0,
        alpha=0.5,
        hard=False,
        mlp_layernorm=False,
        **kwargs,
    ):
        owner = type(self).__name__
        super().__init__(**kwargs)
        if not isinstance(student, DistillableViT):
            raise ValueError(
                f"{owner}: `student` must be a vitkit `DistillableViT` (it carries the "
                f"distillation token); got {type(student).__name__}."
            )
        if not isinstance(teacher, keras.layers.Layer):
            raise ValueError(
                f"{owner}: `teacher` must be a Keras model mapping images to logits; "
                f"got {type(teacher).__name__}."
            )
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
            raise ValueError(f"{owner}: `temperature` must be a number > 0; got {temperature!r}.")
        if temperature <= 0:
            raise ValueError(f"{owner}: `temperature` must be a number > 0; got {temperature}.")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
            raise ValueError(f"{owner}: `alpha` must be a number in [0, 1]; got {alpha!r}.")
        self.teacher = teacher
        self.teacher.trainable = False  # frozen: its weights are not the wrapper's to train
        self.student = student
        self.temperature = temperature
        self.alpha = alpha
        self.hard = bool(hard)
        self.mlp_layernorm = bool(mlp_layernorm)

        policy = self.dtype_policy
        self.distill_norm = layer_norm("distill_norm", policy, mlp_layernorm)
        self.distill_head = keras.layers.Dense(
            student.num_classes, dtype=policy, name="distill_head"
        )

    def build(self, input_shape):
        images = keras.KerasTensor(tuple(input_shape))
        for model in (self.student, self.teacher):
            if not model.built:
                model(images)  # one symbolic pass creates every weight
        # vit-pytorch draws the token from N(0, 1)
        self.distillation_token = self.add_weight(
            shape=(1, self.student.dim),
            initializer=keras.initializers.RandomNormal(stddev=1.0),
            name="distillation_token",
        )
        if self.distill_norm is not None:
            self.distill_norm.build((None, self.student.dim))
        self.distill_head.build((None, self.student.dim))

    def build_default(self):
        """Create every weight (the student's, the teacher's, the token and head) by building
        for a batch of the student's configured image size."""
        if not self.built:
            self.build(self.student.default_input_shape(batch=None))
        return self

    def call(self, images, training=None):
        logits, token = self.student(
            images, distill_token=self.distillation_token, training=training
        )
        if self.distill_norm is not None:
            token = self.distill_norm(token)
        return logits, self.distill_head(token)  # (b, num_classes) twice

    def teacher_logits(self, images):
        """The frozen teacher's logits, in float32, with no gradient."""
        logits = self.teacher(images, training=False)
        return ops.stop_gradient(ops.cast(logits, "float32"))

    def distillation_loss(self, distill_logits, teacher_logits):
        """Per-example distillation loss `(b,)`, soft or hard."""
        if self.hard:
            labels = ops.argmax(teacher_logits, axis=-1)
            return keras.losses.sparse_categorical_crossentropy(
                labels, distill_logits, from_logits=True
            )
        t = float(self.temperature)
        log_p = ops.log_softmax(teacher_logits / t, axis=-1)  # teacher
        log_q = ops.log_softmax(distill_logits / t, axis=-1)  # student's distillation head
        return ops.sum(ops.exp(log_p) * (log_p - log_q), axis=-1) * t**2

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        if y_pred is None:
            y_pred = self(x, training=training)
        logits, distill_logits = (ops.cast(t, "float32") for t in y_pred)
        label_loss = keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)
        distill_loss = self.distillation_loss(distill_logits, self.teacher_logits(x))
        loss = (1 - self.alpha) * label_loss + self.alpha * distill_loss  # (b,)
        if sample_weight is not None:
            loss = loss * ops.cast(ops.reshape(sample_weight, ops.shape(loss)), loss.dtype)
        return ops.mean(loss)

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        # compiled metrics see the class-token logits, the student's prediction
        return super().compute_metrics(x, y, y_pred[0], sample_weight=sample_weight)

    def vit_pytorch_state_map(self):
        """Our weights under the names of `vit_pytorch.distill.DistillWrapper`'s state dict
        (the teacher's too, when it has vit-pytorch names: a vitkit model)."""
        head = {"distill_mlp.1": self.distill_head}
        if self.distill_norm is not None:
            head["distill_mlp.0"] = self.distill_norm
        return {
            "teacher": self.teacher,
            "student": self.student,
            "distillation_token": self.distillation_token,
            **head,
        }
