"""The only place where vitkit asks which backend it runs on. Each entry says why."""

import keras

# `flash_attention` for `keras.ops.dot_product_attention`.
# torch: with `None`, Keras probes eligibility through `torch.backends.cuda.SDPAParams`, a
# pybind object that torch.compile cannot trace (a graph break in every attention layer).
# `False` skips the probe only: torch's own scaled_dot_product_attention still dispatches to
# its flash / memory-efficient kernels whenever the inputs allow.
# JAX and TensorFlow: `None` lets JAX pick cuDNN's fused kernel on GPUs; TF ignores it.
FLASH_ATTENTION = False if keras.config.backend() == "torch" else None


def _gelu_via_erf(x):
    return 0.5 * x * (1.0 + keras.ops.erf(x * 0.7071067811865476))


# The exact (erf) GELU of every feed-forward block and of LeViT's attention output.
# tensorflow: tf.nn.gelu(approximate=False) lowers to the Erfc op, which tf2onnx cannot convert
# (ONNX has Erf, not Erfc), and ONNX export from every backend goes through TensorFlow. The erf
# form is the same function. Other backends keep Keras' gelu, which maps to their fused kernel.
GELU = _gelu_via_erf if keras.config.backend() == "tensorflow" else keras.activations.gelu


def _bias_add_nchw(x, bias):
    import tensorflow as tf

    return tf.nn.bias_add(x, tf.cast(bias, x.dtype), data_format="NCHW")


def _broadcast_add_nchw(x, bias):
    return keras.ops.add(x, keras.ops.reshape(keras.ops.cast(bias, x.dtype), (1, -1, 1, 1)))


# A per-channel bias on a `(b, c, h, w)` map.
# tensorflow: Keras 3.15's `ops.add` turns a bias-shaped addend into `tf.nn.bias_add` and picks
# NHWC whenever the last axis has the bias' length, so a `(1, c, 1, 1)` bias lands on the width
# axis when `w == c` (every channels_first `Conv2D` with as many filters as output columns gave
# wrong numbers). `tf.nn.bias_add` told NCHW is right, and exports to ONNX.
add_channels_first_bias = (
    _bias_add_nchw if keras.config.backend() == "tensorflow" else _broadcast_add_nchw
)
