"""Small helpers every block and model shares: argument checks, image layout, patchify."""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Sequence

from keras import ops

DATA_FORMATS = ("channels_last", "channels_first")
# Keyword arguments that every Keras layer or model accepts besides its own.
KERAS_BASE_KWARGS = frozenset({"name", "dtype", "trainable"})


def pair(value, name: str = "value") -> tuple[int, int]:
    """`7 -> (7, 7)`, `(7, 5) -> (7, 5)`; lists (from JSON configs) count as tuples."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"`{name}` must be an int or a pair (height, width); got {value!r}.")
        return tuple(value)
    return (value, value)


def check_int(name: str, value, minimum: int = 1, owner: str = "") -> int:
    """A Python int >= `minimum` (bools refused), else a ValueError naming `name`."""
    where = f"{owner}: " if owner else ""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{where}`{name}` must be an integer >= {minimum}; got {value!r}.")
    if value < minimum:
        raise ValueError(f"{where}`{name}` must be an integer >= {minimum}; got {value}.")
    return value


def check_pair(name: str, value, minimum: int = 1, owner: str = "") -> tuple[int, int]:
    """An int or (height, width) pair of ints >= `minimum`."""
    where = f"{owner}: " if owner else ""
    try:
        h, w = pair(value, name)
    except ValueError as err:
        raise ValueError(f"{where}{err}") from None
    for v in (h, w):
        check_int(name, v, minimum, owner)
    return (h, w)


def check_rate(name: str, value, owner: str = "") -> float:
    """A probability in [0, 1)."""
    where = f"{owner}: " if owner else ""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{where}`{name}` must be a number in [0, 1); got {value!r}.")
    return float(value)


def check_choice(name: str, value, choices: Iterable[str], owner: str = "") -> str:
    where = f"{owner}: " if owner else ""
    choices = tuple(choices)
    if value not in choices:
        options = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{where}`{name}` must be one of {options}; got {value!r}.")
    return value


def check_divisible(
    image_size, patch_size, owner: str = "", patch_name: str = "patch_size"
) -> tuple[int, int]:
    """The patch grid (rows, cols) of an image; a ValueError if the patch does not tile it
    (`patch_name`: the argument that gave the patch size, for the message)."""
    (ih, iw), (ph, pw) = image_size, patch_size
    if ih % ph or iw % pw:
        where = f"{owner}: " if owner else ""
        raise ValueError(
            f"{where}`image_size` {tuple(image_size)} must be divisible by `{patch_name}` "
            f"{tuple(patch_size)} in both height and width."
        )
    return ih // ph, iw // pw


# Rules for `keep_args`: `rule(name, value, owner)` checks one constructor argument and returns
# the value to keep, or raises a ValueError naming it.


def integer(minimum: int = 1):
    """Rule: a Python int >= `minimum`."""

    def rule(name, value, owner):
        return check_int(name, value, minimum, owner)

    return rule


def rate(name, value, owner) -> float:
    """Rule: a probability in [0, 1)."""
    return check_rate(name, value, owner)


def between(low: float, high: float, *, low_closed: bool = False, high_closed: bool = False):
    """Rule: a real number in the interval from `low` to `high` (open ends unless closed)."""
    text = f"{'[' if low_closed else '('}{low}, {high}{']' if high_closed else ')'}"

    def rule(name, value, owner):
        inside = isinstance(value, (int, float)) and not isinstance(value, bool)
        if inside:
            inside = (low <= value if low_closed else low < value) and (
                value <= high if high_closed else value < high
            )
        if not inside:
            where = f"{owner}: " if owner else ""
            raise ValueError(f"{where}`{name}` must be a number in {text}; got {value!r}.")
        return float(value)

    return rule


def one_of(*choices: str):
    """Rule: one of `choices`."""

    def rule(name, value, owner):
        return check_choice(name, value, choices, owner)

    return rule


def optional(rule):
    """Rule: `None`, or a value that `rule` accepts."""

    def optional_rule(name, value, owner):
        return None if value is None else rule(name, value, owner)

    return optional_rule


def as_given(name, value, owner):
    """Rule: kept as given (checked elsewhere, e.g. `image_size` by `VitkitModel.patch_grid`)."""
    return value


# The rule of each argument that several blocks and models take under the same name.
ARG_RULES = {
    **dict.fromkeys(
        ("num_classes", "dim", "depth", "heads", "mlp_dim", "dim_head", "channels"), integer()
    ),
    **dict.fromkeys(("dropout", "emb_dropout", "layer_dropout"), rate),
    "pool": one_of("cls", "mean"),
    "data_format": one_of(*DATA_FORMATS),
    "image_size": as_given,
    "patch_size": as_given,
    "hidden_dim": integer(),
    # the blocks' switches, kept as given
    **dict.fromkeys(
        ("project_out", "out_bias", "qkv_bias", "norm", "separate_kv", "final_norm")
        + ("layer_scale", "activation"),
        as_given,
    ),
}


def reject_unknown_kwargs(owner: str, kwargs: dict) -> None:
    """Unknown keyword arguments are a TypeError that names every one of them."""
    unknown = sorted(set(kwargs) - KERAS_BASE_KWARGS)
    if unknown:
        names = ", ".join(repr(k) for k in unknown)
        raise TypeError(f"{owner}() got unexpected keyword argument(s): {names}.")


def constructor_args(cls) -> list[str]:
    """Names of the keyword arguments `cls.__init__` declares (not `self`, not `**kwargs`)."""
    params = inspect.signature(cls.__init__).parameters.values()
    return [
        p.name
        for p in params
        if p.name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
    ]


def plain(value):
    """Tuples to lists, recursively: what a config looks like after a JSON round trip."""
    if isinstance(value, (tuple, list)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


def image_shape(images, data_format: str) -> tuple:
    """(height, width, channels) of a batch of images, static dims as ints (None if unknown)."""
    _, a, b, c = images.shape
    return (a, b, c) if data_format == "channels_last" else (b, c, a)


def to_channels_last(images, data_format: str):
    """(b, c, h, w) -> (b, h, w, c) for channels_first; unchanged otherwise."""
    if data_format == "channels_first":
        return ops.transpose(images, (0, 2, 3, 1))
    return images


def patchify(images, patch_size: Sequence[int], data_format: str = "channels_last"):
    """Cut images into non-overlapping patches, flattened in (p1 p2 c) order.

    `(b, h*p1, w*p2, c) -> (b, h*w, p1*p2*c)` for channels_last, the same result from
    `(b, c, h*p1, w*p2)` for channels_first: one reshape, one transpose, one reshape.
    """
    p1, p2 = patch_size
    shape = ops.shape(images)
    if data_format == "channels_last":
        b, hh, ww, c = shape
        x = ops.reshape(images, (b, hh // p1, p1, ww // p2, p2, c))
        x = ops.transpose(x, (0, 1, 3, 2, 4, 5))  # b h w p1 p2 c
    else:
        b, c, hh, ww = shape
        x = ops.reshape(images, (b, c, hh // p1, p1, ww // p2, p2))
        x = ops.transpose(x, (0, 2, 4, 3, 5, 1))  # b h w p1 p2 c
    return ops.reshape(x, (b, (hh // p1) * (ww // p2), p1 * p2 * c))


def patches_to_channels(x, patch_size: Sequence[int]):
    """Fold each patch of a channels-last map into the channels, channels outermost:
    `(b, h*p1, w*p2, c) -> (b, h, w, c*p1*p2)` in `(c, p1, p2)` order, as vit-pytorch's
    convolutional models write `b c (h p1) (w p2) -> b (c p1 p2) h w`."""
    p1, p2 = patch_size
    _, hh, ww, c = ops.shape(x)
    x = ops.reshape(x, (-1, hh // p1, p1, ww // p2, p2, c))
    x = ops.transpose(x, (0, 1, 3, 5, 2, 4))  # b h w c p1 p2
    return ops.reshape(x, (-1, hh // p1, ww // p2, c * p1 * p2))


def per_stage(
    name: str, value, stages: int, owner: str = "", counted_by: str | None = None
) -> tuple:
    """vit-pytorch's `cast_tuple` for the per-stage arguments of pyramid models: one value
    for all `stages` stages, or a tuple (a list, from a JSON config) with one per stage. A
    ValueError names `name` if the tuple's length is not `stages` (`counted_by`: the argument
    that sets the number of stages, for the message)."""
    values = tuple(value) if isinstance(value, (tuple, list)) else (value,) * stages
    if len(values) != stages:
        where = f"{owner}: " if owner else ""
        counted = f" (as many as `{counted_by}` has)" if counted_by else ""
        raise ValueError(
            f"{where}`{name}` must be one value or a tuple of {stages}, one per "
            f"stage{counted}; got {value!r}."
        )
    return values


def smallest_side(accepts, owner: str = "", arguments: str = "", limit: int = 4096) -> int:
    """The smallest image side `n >= 1` for which `accepts(n)` holds: the default input size
    of models that take many sizes. A ValueError naming `arguments` (the constructor
    arguments that decide it) if none up to `limit` does."""
    for side in range(1, limit + 1):
        if accepts(side):
            return side
    where = f"{owner}: " if owner else ""
    raise ValueError(
        f"{where}no image side up to {limit} pixels suits {arguments or 'this configuration'}."
    )


def check_positive(name: str, value, owner: str = "") -> float:
    """A real number > 0 (bools refused), else a ValueError naming `name`."""
    where = f"{owner}: " if owner else ""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{where}`{name}` must be a number > 0; got {value!r}.")
    return value


def check_int_tuple(
    name: str, value, minimum: int = 1, owner: str = "", length=None, counted_by=None
) -> tuple:
    """A tuple (or list, as JSON gives it back) of ints >= `minimum`; of `length` items if
    given (an int or a `range` of allowed lengths; `counted_by`: the argument that sets it,
    named in the message too)."""
    where = f"{owner}: " if owner else ""
    allowed = range(length, length + 1) if isinstance(length, int) else length
    if (
        not isinstance(value, (tuple, list))
        or not value
        or (allowed is not None and len(value) not in allowed)
    ):
        size = "" if allowed is None else f" of {_lengths(allowed)} integers"
        if counted_by and allowed is not None:
            size += f" (`{counted_by}` sets how many)"
        raise ValueError(f"{where}`{name}` must be a tuple{size} >= {minimum}; got {value!r}.")
    for v in value:
        check_int(name, v, minimum, owner)
    return tuple(value)


def _lengths(allowed: range) -> str:
    if len(allowed) == 1:
        return str(allowed[0])
    return f"{allowed[0]} to {allowed[-1]}"


def gather_tokens(x, ids):
    """`x` (b, n, ...) at positions `ids` (b, m) along axis 1 -> (b, m, ...): a `take` on the
    flattened `(b * n, ...)` rows. `ops.take_along_axis` gives the same, but torch.compile
    (torch 2.13) fixes the batch size of `torch.take_along_dim` to the first one it sees."""
    batch, n = ops.shape(x)[0], ops.shape(x)[1]
    rest = tuple(x.shape[2:])
    rows = ops.cast(ids, "int32") + ops.arange(batch, dtype="int32")[:, None] * n
    taken = ops.take(ops.reshape(x, (-1, *rest)), ops.reshape(rows, (-1,)), axis=0)
    return ops.reshape(taken, (*ops.shape(ids), *rest))


def zero_pad(x, axis: int, before: int = 0, after: int = 0, value: float = 0.0):
    """`x` with `before` and `after` zeros (or `value`s: `-inf` for torch's max pooling) along
    `axis`.

    Concatenated blocks rather than `ops.pad`: under torch.compile(fullgraph=True), a Keras
    layer called after `ops.pad` breaks the graph ("mapping proxy affected by dictionary
    mutation", torch 2.13 with Keras 3.15).
    """

    def block(count):  # (no `ops.repeat`: Keras 3.15's fails on torch's meta device)
        zeros = ops.zeros_like(ops.take(x, [0] * count, axis=axis))
        return zeros + ops.cast(value, x.dtype) if value else zeros

    parts = [block(before)] if before else []
    parts.append(x)
    if after:
        parts.append(block(after))
    return ops.concatenate(parts, axis=axis) if len(parts) > 1 else x


def unfold(images, kernel_size: Sequence[int], stride: Sequence[int], padding: Sequence[int]):
    """`torch.nn.Unfold` for channels-last images: every (kh, kw) window, zero padding.

    `(b, h, w, c) -> (b, oh, ow, c * kh * kw)` with each window's values in torch's
    `(c, kh, kw)` order, so the weights that follow load unchanged. One strided slice per
    kernel offset: static shapes, no gather, no patch-extraction convolution.
    """
    (kh, kw), (sh, sw), (ph, pw) = kernel_size, stride, padding
    x = zero_pad(zero_pad(images, 1, ph, ph), 2, pw, pw)
    _, hh, ww, c = x.shape
    oh, ow = (hh - kh) // sh + 1, (ww - kw) // sw + 1
    windows = [
        x[:, i : i + sh * (oh - 1) + 1 : sh, j : j + sw * (ow - 1) + 1 : sw, :]
        for i in range(kh)
        for j in range(kw)
    ]
    x = ops.stack(windows, axis=-1)  # (b, oh, ow, c, kh * kw)
    return ops.reshape(x, (-1, oh, ow, c * kh * kw))
