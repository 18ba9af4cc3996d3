"""The `vitkit` command: train, evaluate, predict, export, list.

    vitkit train simple_vit --dataset digits
    vitkit pretrain mae vit --dataset digits      (then: vitkit train vit --init FILE)
    vitkit evaluate runs/simple_vit/model.keras --dataset digits
    vitkit predict runs/simple_vit/model.keras image.png
    vitkit export runs/simple_vit/model.keras --format onnx --out model.onnx
    vitkit attention runs/vit/model.keras image.png --out attn.png
    vitkit bench --workload vit_s16
    vitkit list

Runs on whatever `KERAS_BACKEND` names. Errors are one line on stderr and a non-zero exit;
set `VITKIT_DEBUG=1` for the traceback.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import sys
import time
from pathlib import Path

IMAGE_SIZE_KEYS = ("image_size", "img_size")
CHANNEL_KEYS = ("channels", "n_input_channels")
DEFAULT_FOLDER_SIZE = 32


class CLIError(Exception):
    """A problem with the command's arguments or inputs: reported as one line."""


# Model configuration ------------------------------------------------------------------------


def _parse_sets(pairs):
    """`["dim=128", "pool='mean'"]` -> {"dim": 128, "pool": "mean"}."""
    overrides = {}
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CLIError(f"--set takes KEY=VALUE; got {pair!r}")
        try:
            overrides[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            overrides[key] = value  # a bare word: a string
    return overrides


def model_config(name, num_classes, channels, image_size=None, overrides=None):
    """Constructor keywords for `name` (an architecture or a preset) sized for a dataset."""
    from vitkit.layers.utils import constructor_args
    from vitkit.registry import get_spec

    try:
        spec = get_spec(name)
    except ValueError as err:
        raise CLIError(str(err)) from None
    config = dict(spec.presets.get(name, spec.digits or spec.tiny))
    args = set(constructor_args(spec.cls))
    if "num_classes" in args:
        config["num_classes"] = num_classes
    for key in CHANNEL_KEYS:  # only where the argument is the image channels
        if key in args and isinstance(config.get(key, 3), int):
            config[key] = channels
    if image_size is not None:
        for key in IMAGE_SIZE_KEYS:
            if key in args:
                config[key] = image_size
    config.update(overrides or {})
    return spec, config


def fit_data_to_model(x, model):
    """Resize and re-channel channels-last images to what `model` takes."""
    import numpy as np

    from vitkit.data import resize

    x = resize(x, model.default_image_hw)
    want = model.input_channels
    if x.shape[-1] != want:
        if x.shape[-1] == 1:
            x = np.repeat(x, want, axis=-1)
        elif want == 1:
            x = x.mean(axis=-1, keepdims=True)
        else:
            raise CLIError(f"the model takes {want} channels; the images have {x.shape[-1]}")
    if model.data_format == "channels_first":
        x = x.transpose(0, 3, 1, 2)
    return x.astype("float32")


def load_dataset(dataset, image_size, channels, seed):
    from vitkit import data

    if dataset == "digits":
        return data.load_digits(seed=seed)
    size = (image_size, image_size) if isinstance(image_size, int) else image_size
    return data.load_folder(dataset, size or (DEFAULT_FOLDER_SIZE,) * 2, channels, seed=seed)


def load_model(path):
    """A `.keras` file, loaded in safe mode; one clear line for anything else."""
    from vitkit.saving import CheckpointError
    from vitkit.saving import load_model as load_safely

    try:
        return load_safely(path)
    except CheckpointError as err:
        raise CLIError(str(err)) from None


# Commands -------------------------------------------------------------------------------


def cmd_list(args):
    from vitkit.registry import get_spec, list_models

    for name in list_models():
        spec = get_spec(name)
        presets = ", ".join(sorted(spec.presets)) or "-"
        print(f"{name:24s} {spec.cls.__module__}.{spec.cls.__name__:20s} presets: {presets}")


def save_curves(history, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = range(1, len(history["loss"]) + 1)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for key, axis in (("loss", left), ("accuracy", right)):
        axis.plot(epochs, history[key], label="train")
        if f"val_{key}" in history:
            axis.plot(epochs, history[f"val_{key}"], label="validation")
        axis.set_xlabel("epoch")
        axis.set_ylabel(key)
        axis.legend()
        axis.grid(alpha=0.3)
    fig.suptitle("vitkit training curves")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def dataset_and_model(args, name):
    """The dataset `args` name and the model `name` built for it (`--set` applied, weights
    drawn after seeding): `(data, config, model)`. Everything a user can get wrong is checked
    before the backend starts computing."""
    import keras

    data = load_dataset(args.dataset, args.image_size, 1 if args.grayscale else 3, args.seed)
    spec, config = model_config(
        name, len(data.class_names), data.channels, args.image_size, _parse_sets(args.set)
    )
    try:
        spec.cls(**config)  # a bad configuration is refused before anything else starts
    except (TypeError, ValueError) as err:
        raise CLIError(f"cannot build {name}: {err}") from None
    # The seed goes before the model is constructed: its dropout layers take their seeds
    # then, its weights when built.
    keras.utils.set_random_seed(args.seed)
    model = spec.cls(**config)
    model.build_default()
    return data, config, model


def cmd_train(args):
    import keras
    import numpy as np

    from vitkit.data import augmented_batches

    shards = use_distribution(args)  # before any weight exists: they are created sharded
    data, config, model = dataset_and_model(args, args.model)
    if args.init:
        print(initialize_from(model, args.init))
    if args.limit:
        data.x_train, data.y_train = data.x_train[: args.limit], data.y_train[: args.limit]
        data.x_test, data.y_test = data.x_test[: args.limit], data.y_test[: args.limit]
    if shards > 1:  # every batch, the last one too, must split evenly over the batch axis
        dropped = len(data.x_train) % shards + len(data.x_test) % shards
        for split in ("train", "test"):
            x, y = getattr(data, f"x_{split}"), getattr(data, f"y_{split}")
            keep = len(x) - len(x) % shards
            setattr(data, f"x_{split}", x[:keep])
            setattr(data, f"y_{split}", y[:keep])
        if dropped:
            print(f"{dropped} images left out: each split must divide by the {shards} shards")
    x_train = fit_data_to_model(data.x_train, model)
    x_test = fit_data_to_model(data.x_test, model)
    for split, x in (("training", x_train), ("test", x_test)):
        bad = int(np.size(x) - np.count_nonzero(np.isfinite(x)))
        if bad:
            raise CLIError(f"the {split} images hold {bad} NaN or Inf values: fix the data")

    out = Path(args.out or Path("runs") / args.model)
    out.mkdir(parents=True, exist_ok=True)
    callbacks = fault_tolerance(out)
    steps = args.epochs * -(-(len(x_train) - len(x_train[::10])) // args.batch_size)
    schedule = keras.optimizers.schedules.CosineDecay(
        0.0, steps, warmup_target=args.lr, warmup_steps=max(1, steps // 10)
    )
    model.compile(
        optimizer=keras.optimizers.AdamW(schedule, weight_decay=args.weight_decay),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
        jit_compile="auto" if args.jit else False,
    )
    print(
        f"training {type(model).__name__} ({args.model}) on {args.dataset}: "
        f"{len(x_train)} train / {len(x_test)} test images, {model.count_params():,} parameters, "
        f"backend {keras.config.backend()}"
    )
    # 10 % of the training images for validation; the test split stays unseen until the end.
    x_val, y_val = x_train[::10], data.y_train[::10]
    keep = np.ones(len(x_train), bool)
    keep[::10] = False
    x_fit, y_fit = x_train[keep], data.y_train[keep]
    if args.augment:
        # random translations of up to 1/8 of the image side (1 pixel on 8x8 digits)
        shift = max(1, model.default_image_hw[0] // 8)
        batches = augmented_batches(
            x_fit,
            y_fit,
            args.batch_size,
            shift,
            args.seed,
            channels_first=model.data_format == "channels_first",
        )
        fit_args = dict(x=batches)
    else:
        fit_args = dict(x=x_fit, y=y_fit, batch_size=args.batch_size)
    start = time.time()
    model.fit(
        **fit_args,
        validation_data=(x_val, y_val),
        epochs=args.epochs,
        verbose=args.verbose,
        callbacks=callbacks,
    )
    seconds = time.time() - start
    stop = callbacks[0]
    if stop.stopped_at is not None:
        epoch, batch = stop.stopped_at
        raise CLIError(
            f"training stopped at epoch {epoch + 1}, batch {batch + 1}: the loss became NaN or "
            f"Inf (a learning rate too high?); nothing saved, the last good epoch's backup "
            f"stays in {out / 'backup'}"
        )
    test = model.evaluate(x_test, data.y_test, verbose=0, return_dict=True)

    model.save(out / "model.keras")
    (out / "classes.json").write_text(json.dumps(data.class_names))
    rows = read_epoch_log(out / "history.jsonl")  # every epoch, those before a resume too
    history = {k: [row[k] for row in rows] for k in rows[0] if k != "epoch"}
    (out / "history.json").write_text(json.dumps(history, indent=1))
    metrics = {
        "model": args.model,
        "backend": keras.config.backend(),
        "test_accuracy": float(test["accuracy"]),
        "test_loss": float(test["loss"]),
        "train_seconds": round(seconds, 1),
        "epochs": args.epochs,
        "config": config,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1, default=str))
    save_curves(history, out / "training_curves.png")
    print(f"test accuracy: {test['accuracy']:.4f} (loss {test['loss']:.4f}) in {seconds:.0f} s")
    print(f"saved {out / 'model.keras'} and {out / 'training_curves.png'}")


def fault_tolerance(out):
    """The callbacks that make `vitkit train` survive faults: training stops at the first NaN
    or Inf loss (`stopped_at` of the first callback says where); after every epoch, its
    metrics are appended to `out/history.jsonl`, then the weights, the optimizer and the epoch
    are backed up to `out/backup` (twice over: a kill during the write leaves the previous
    backup), from which the same command resumes; the backup goes when training ends."""
    import keras

    class StopOnNaN(keras.callbacks.TerminateOnNaN):
        """Keras' TerminateOnNaN, remembering where it stopped: `(epoch, batch)`."""

        stopped_at = None
        epoch = 0

        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch

        def on_batch_end(self, batch, logs=None):
            super().on_batch_end(batch, logs)
            if self.model.stop_training and self.stopped_at is None:
                self.stopped_at = (self.epoch, batch)

    class EpochLog(keras.callbacks.Callback):
        """One JSON line of metrics per epoch, kept across a resume: the first epoch this run
        trains (0, or the one after the backup's) drops any line from that epoch on, written
        by an interrupted run after its last backup."""

        def __init__(self, path):
            super().__init__()
            self.path, self.started = path, False

        def on_epoch_begin(self, epoch, logs=None):
            if self.started:
                return
            self.started = True
            kept = [row for row in read_epoch_log(self.path) if row["epoch"] < epoch]
            self.path.write_text("".join(json.dumps(row) + "\n" for row in kept))
            if epoch:
                print(f"resuming from epoch {epoch + 1}: the backup in {self.path.parent}")

        def on_epoch_end(self, epoch, logs=None):
            row = {"epoch": epoch, **{k: float(v) for k, v in (logs or {}).items()}}
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")

    return [
        StopOnNaN(),
        EpochLog(out / "history.jsonl"),  # before the backup: a kill between the two repeats
        keras.callbacks.BackupAndRestore(str(out / "backup"), double_checkpoint=True),
    ]


def read_epoch_log(path) -> list[dict]:
    """The rows `EpochLog` wrote, in order ([] without a file)."""
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def use_distribution(args) -> int:
    """Set the global Keras distribution that `--distribute` names (JAX); the number of
    shards each batch is split into (1 without one)."""
    if not args.distribute:
        return 1
    import keras

    from vitkit.distribution import BATCH_AXIS, distribution_for

    try:
        distribution = distribution_for(args.distribute, args.model_size)
    except ValueError as err:
        raise CLIError(f"--distribute {args.distribute}: {err}") from None
    mesh = distribution.device_mesh
    shards = mesh.shape[list(mesh.axis_names).index(BATCH_AXIS)]
    if args.batch_size % shards:
        raise CLIError(
            f"--batch-size {args.batch_size} must divide by the {shards} devices on the "
            "batch axis of the device mesh"
        )
    keras.distribution.set_distribution(distribution)
    print(
        f"distributed ({args.distribute} parallel) over {math.prod(mesh.shape)} devices, "
        f"mesh {dict(zip(mesh.axis_names, mesh.shape))}"
    )
    return shards


def initialize_from(model, path) -> str:
    """Copy the weights of the model saved at `path` (a pre-trained encoder) into `model`,
    wherever a weight of the same place and shape exists (a head for another number of classes
    stays as initialized). Returns a one-line report."""
    saved = load_model(path)
    if type(saved) is not type(model):
        raise CLIError(
            f"--init {path} holds a {type(saved).__name__}, not a {type(model).__name__}: "
            "pre-train the same architecture"
        )

    def by_place(m):  # paths without the model's own (auto-generated) name
        return {v.path.split("/", 1)[-1]: v for v in m.weights}

    source, skipped, copied = by_place(saved), [], 0
    for place, variable in by_place(model).items():
        if place in source and tuple(source[place].shape) == tuple(variable.shape):
            variable.assign(source[place])
            copied += 1
        else:
            skipped.append(place)
    if not copied:
        raise CLIError(f"--init {path}: no weight of the saved model fits this one")
    rest = f" (kept as initialized: {', '.join(skipped)})" if skipped else ""
    return f"initialized {copied} of {len(model.weights)} weights from {path}{rest}"


PRETRAINERS = ("mae", "simmim", "dino")


def make_pretrainer(method, encoder, overrides):
    """The trainer of `method` around `encoder`, sized for small images; `overrides` set any
    of its constructor arguments."""
    from vitkit.trainers.dino import Dino
    from vitkit.trainers.mae import MAE
    from vitkit.trainers.simmim import SimMIM

    if method == "mae":
        width = max(16, getattr(encoder, "dim", 32) // 2)  # the encoder's, halved
        config = dict(decoder_dim=width, decoder_depth=1, decoder_heads=4)
        cls, config = MAE, dict(config, decoder_dim_head=width // 4, encoder=encoder)
    elif method == "simmim":
        cls, config = SimMIM, dict(encoder=encoder)
    else:
        config = dict(projection_hidden_size=128, num_classes_K=256, projection_layers=3)
        cls, config = Dino, dict(config, net=encoder, image_size=encoder.default_image_hw)
    try:
        return cls(**{**config, **overrides})
    except (TypeError, ValueError) as err:
        raise CLIError(
            f"cannot build {cls.__name__} around {type(encoder).__name__}: {err}"
        ) from None


def cmd_pretrain(args):
    import keras

    data, config, encoder = dataset_and_model(args, args.encoder)
    trainer = make_pretrainer(args.method, encoder, _parse_sets(args.trainer_set))
    trainer.build_default()
    # Pre-training sees the training images only, without their labels.
    images = data.x_train[: args.limit] if args.limit else data.x_train
    images = fit_data_to_model(images, encoder)
    trainer.compile(
        optimizer=keras.optimizers.AdamW(args.lr, weight_decay=args.weight_decay),
        jit_compile="auto" if args.jit else False,
    )
    print(
        f"pre-training {type(encoder).__name__} ({args.encoder}) with {type(trainer).__name__} "
        f"on {len(images)} unlabelled {args.dataset} images, backend {keras.config.backend()}"
    )
    start = time.time()
    history = trainer.fit(
        images, batch_size=args.batch_size, epochs=args.epochs, verbose=args.verbose
    ).history
    seconds = time.time() - start
    out = Path(args.out or Path("runs") / f"{args.method}_{args.encoder}")
    out.mkdir(parents=True, exist_ok=True)
    encoder.save(out / "encoder.keras")
    losses = [float(v) for v in history["loss"]]
    metrics = {
        "method": args.method,
        "encoder": args.encoder,
        "backend": keras.config.backend(),
        "loss": losses,
        "train_seconds": round(seconds, 1),
        "config": config,
    }
    (out / "pretrain.json").write_text(json.dumps(metrics, indent=1, default=str))
    print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f} in {seconds:.0f} s")
    print(
        f"saved {out / 'encoder.keras'}; fine-tune it: vitkit train {args.encoder} --init "
        f"{out / 'encoder.keras'}"
    )


def cmd_evaluate(args):
    model = load_model(args.model_file)
    data = load_dataset(args.dataset, model.default_image_hw, model.input_channels, args.seed)
    x_test = fit_data_to_model(data.x_test, model)
    import keras

    logits = keras.ops.convert_to_numpy(model.predict(x_test, verbose=0))
    accuracy = float((logits.argmax(-1) == data.y_test).mean())
    print(f"test accuracy: {accuracy:.4f} on {len(x_test)} images")


def cmd_predict(args):
    import keras
    import numpy as np

    from vitkit.data import read_image

    model = load_model(args.model_file)
    names_file = Path(args.model_file).with_name("classes.json")
    names = json.loads(names_file.read_text()) if names_file.is_file() else None
    for image in args.images:
        if not Path(image).is_file():
            raise CLIError(f"image {image} does not exist")
        x = read_image(image, model.default_image_hw, model.input_channels)[None]
        logits = keras.ops.convert_to_numpy(model(fit_data_to_model(x, model)))
        logits = np.asarray(logits[0] if logits.ndim == 2 else logits, "float64")
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        best = int(probs.argmax())
        label = names[best] if names and best < len(names) else str(best)
        print(f"{image}: {label} ({probs[best]:.3f})")


def cmd_export(args):
    from vitkit.exporting import export

    model = load_model(args.model_file)
    path = export(model, args.out, format=args.format)
    print(f"exported {type(model).__name__} to {path} ({args.format})")


def cmd_attention(args):
    from vitkit.attention_map import attention_heatmap, read_picture, save_overlay
    from vitkit.data import read_image

    model = load_model(args.model_file)
    if not Path(args.image).is_file():
        raise CLIError(f"image {args.image} does not exist")
    x = read_image(args.image, model.default_image_hw, model.input_channels)[None]
    try:
        heat = attention_heatmap(model, fit_data_to_model(x, model))
    except ValueError as err:
        raise CLIError(f"cannot picture the attention of {args.model_file}: {err}") from None
    title = f"{type(model).__name__}: attention rollout"
    save_overlay(read_picture(args.image), heat[0], args.out, title=title)
    print(f"saved the attention map of {args.image} to {args.out}")


# Entry point ------------------------------------------------------------------------------


def build_parser():
    parser = argparse.ArgumentParser(
        prog="vitkit", description="Vision transformers on JAX, PyTorch and TensorFlow."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    commands.add_parser("list", help="list architectures and presets").set_defaults(run=cmd_list)

    train = commands.add_parser("train", help="train a model with model.fit")
    train.add_argument("model", help="architecture (e.g. simple_vit) or preset name")
    train.add_argument(
        "--dataset",
        default="digits",
        help="'digits' (bundled 8x8 digits) or a folder with a sub-folder per class",
    )
    train.add_argument("--epochs", type=int, default=30)
    train.add_argument("--batch-size", type=int, default=64)
    train.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    train.add_argument("--weight-decay", type=float, default=0.05)
    train.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="resize images to this size (default: the model's configured size, "
        f"{DEFAULT_FOLDER_SIZE} for folders)",
    )
    train.add_argument(
        "--augment",
        action="store_true",
        help="randomly translate the training images (by up to 1/8 of a side)",
    )
    train.add_argument("--grayscale", action="store_true", help="read folder images as 1 channel")
    train.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a constructor argument, e.g. --set dim=128 (repeatable)",
    )
    train.add_argument("--out", default=None, help="output folder (default runs/MODEL)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument(
        "--limit",
        type=int,
        default=None,
        help="use at most this many training (and test) images: a quick check",
    )
    train.add_argument(
        "--no-jit",
        dest="jit",
        action="store_false",
        help="run eagerly instead of compiling with XLA (JAX, TensorFlow)",
    )
    train.add_argument(
        "--verbose",
        type=int,
        default=1,
        choices=(0, 1, 2),
        help="Keras' fit verbosity (1: progress bar)",
    )
    train.add_argument(
        "--init",
        default=None,
        metavar="FILE",
        help="start from the weights of this .keras file (e.g. a pre-trained encoder)",
    )
    train.add_argument(
        "--distribute",
        choices=("data", "model"),
        default=None,
        help="train over all devices with keras.distribution (JAX): 'data' replicates the "
        "weights and splits batches, 'model' also splits the attention and MLP kernels",
    )
    train.add_argument(
        "--model-size",
        type=int,
        default=None,
        help="with --distribute model: devices on the model axis (default: all)",
    )
    train.set_defaults(run=cmd_train)

    pretrain = commands.add_parser(
        "pretrain", help="self-supervised pre-training of an encoder (MAE, SimMIM, DINO)"
    )
    pretrain.add_argument("method", choices=PRETRAINERS)
    pretrain.add_argument("encoder", help="architecture (e.g. vit) or preset name")
    pretrain.add_argument("--dataset", default="digits", help="as for train; labels unused")
    pretrain.add_argument("--epochs", type=int, default=10)
    pretrain.add_argument("--batch-size", type=int, default=64)
    pretrain.add_argument("--lr", type=float, default=1e-3)
    pretrain.add_argument("--weight-decay", type=float, default=0.05)
    pretrain.add_argument("--image-size", type=int, default=None)
    pretrain.add_argument("--grayscale", action="store_true")
    pretrain.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="an encoder argument (repeatable)"
    )
    pretrain.add_argument(
        "--trainer-set",
        action="append",
        metavar="KEY=VALUE",
        help="a trainer argument, e.g. --trainer-set masking_ratio=0.5 (repeatable)",
    )
    pretrain.add_argument("--out", default=None, help="output folder (default runs/METHOD_ENCODER)")
    pretrain.add_argument("--seed", type=int, default=0)
    pretrain.add_argument("--limit", type=int, default=None, help="use at most this many images")
    pretrain.add_argument("--no-jit", dest="jit", action="store_false")
    pretrain.add_argument("--verbose", type=int, default=1, choices=(0, 1, 2))
    pretrain.set_defaults(run=cmd_pretrain)

    evaluate = commands.add_parser("evaluate", help="accuracy on a dataset's held-out split")
    evaluate.add_argument("model_file")
    evaluate.add_argument("--dataset", default="digits")
    evaluate.add_argument("--seed", type=int, default=0, help="the split's seed (as in train)")
    evaluate.set_defaults(run=cmd_evaluate)

    predict = commands.add_parser("predict", help="classify image files")
    predict.add_argument("model_file")
    predict.add_argument("images", nargs="+", metavar="IMAGE")
    predict.set_defaults(run=cmd_predict)

    export = commands.add_parser("export", help="export to a TF SavedModel or ONNX")
    export.add_argument("model_file")
    export.add_argument("--format", choices=("tf_saved_model", "onnx"), default="onnx")
    export.add_argument("--out", required=True)
    export.set_defaults(run=cmd_export)

    # listed for --help; `main` hands `vitkit bench ...` to vitkit.bench before parsing
    commands.add_parser(
        "bench", help="time vitkit on every backend against vit-pytorch (vitkit bench --help)"
    )

    attention = commands.add_parser(
        "attention", help="picture where a ViT looks: class-token attention rollout"
    )
    attention.add_argument("model_file")
    attention.add_argument("image")
    attention.add_argument("--out", default="attention.png", help="the picture to write")
    attention.set_defaults(run=cmd_attention)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    if argv[:1] == ["bench"]:  # its own options: argparse's REMAINDER drops leading flags
        from vitkit import bench

        return bench.main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except KeyboardInterrupt:
        print("vitkit: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if os.environ.get("VITKIT_DEBUG"):
            raise
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        hint = "" if isinstance(err, CLIError) else " (VITKIT_DEBUG=1 shows the traceback)"
        print(f"vitkit: error: {message}{hint}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
