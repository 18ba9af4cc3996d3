"""Taps: read what a layer takes or returns while a model runs, without changing the model.

torch modules have forward hooks; Keras layers do not. A tap replaces one method of one layer
*instance* for as long as it is open and puts the original back when it closes, so the model's
class, weights and config never change. What a tap records is whatever the method saw: concrete
tensors when the model runs eagerly, the traced ones while `fit` or `jit` traces the call (used
inside that same trace, as the trainers do, that is what they need).

    with LayerTap(model.transformer) as tap:
        logits = model(images)
    tokens = tap.last            # (b, n, dim)
"""

from __future__ import annotations

import contextlib

import keras


@contextlib.contextmanager
def instance_attribute(obj, name: str, value):
    """Within the block, `obj.<name>` is `value` on this instance alone (a class attribute
    such as `Attention.fusable` is shadowed, not changed); the instance's own attribute, or
    its absence, comes back however the block ends."""
    # The instance's __dict__ itself: past Keras' and torch's attribute tracking, and a
    # mutation that torch.compile traces (it cannot trace `object.__delattr__`).
    own = vars(obj)
    had_own = name in own
    previous = own.get(name)
    own[name] = value
    try:
        yield obj
    finally:
        if had_own:
            own[name] = previous
        else:
            own.pop(name)


@contextlib.contextmanager
def wrapped_method(obj, name: str, wrapper):
    """Within the block, `obj.<name>(*a, **k)` runs `wrapper(original, *a, **k)`; only this
    instance changes, and the original comes back however the block ends."""
    original = getattr(obj, name)

    def call(*args, **kwargs):
        return wrapper(original, *args, **kwargs)

    with instance_attribute(obj, name, call):
        yield obj


def find_layer(model, layer):
    """`layer` itself, or the sublayer of `model` it names: an attribute name ("transformer"),
    a dotted path of attributes ("transformer.norm"), a Keras layer name, or an index into
    `model.layers` (-2: the last but one)."""
    if isinstance(layer, keras.layers.Layer):
        return layer
    owner = type(model).__name__
    if isinstance(layer, int) and not isinstance(layer, bool):
        children = model.layers
        if not -len(children) <= layer < len(children):
            raise ValueError(
                f"layer index {layer} is out of range: {owner} has {len(children)} direct "
                f"sublayers ({', '.join(c.name for c in children)})."
            )
        return children[layer]
    if isinstance(layer, str):
        found = model
        for part in layer.split("."):
            found = getattr(found, part, None)
            if found is None:
                break
        if isinstance(found, keras.layers.Layer):
            return found
        for sub in model._flatten_layers(include_self=False):
            if sub.name == layer:
                return sub
        raise ValueError(
            f"{owner} has no layer {layer!r} (neither an attribute nor a layer name); its "
            f"direct sublayers are: {', '.join(c.name for c in model.layers)}."
        )
    raise ValueError(f"`layer` must be a Keras layer, a name or an index; got {layer!r}.")


class LayerTap:
    """Records the input (first positional argument) or the output of `layer.call` each time
    it runs while the tap is open: `tap.values` in call order, `tap.last` the last one."""

    def __init__(self, layer, save_input: bool = False):
        self.layer = layer
        self.save_input = save_input
        self.values = []
        self._context = None

    def _record(self, original, *args, **kwargs):
        output = original(*args, **kwargs)
        self.values.append(args[0] if self.save_input else output)
        return output

    def __enter__(self):
        self.values = []
        self._context = wrapped_method(self.layer, "call", self._record)
        self._context.__enter__()
        return self

    def __exit__(self, *exc):
        self._context.__exit__(*exc)
        self._context = None
        return False

    @property
    def last(self):
        if not self.values:
            raise ValueError(
                f"layer {self.layer.name!r} ({type(self.layer).__name__}) did not run during "
                "the call, so there is nothing to read: tap a layer on the model's path."
            )
        return self.values[-1]
