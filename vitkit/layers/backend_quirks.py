"""The only place where vitkit asks which backend it runs on. Each entry says why."""

import keras

# `flash_attention` for `keras.ops.dot_product_attention`.
# torch: with `None`, Keras probes eligibility through `torch.backends.cuda.SDPAParams`, a
# pybind object that torch.compile cannot trace (a graph break in every attention layer).
# `False` skips the probe only: torch's own scaled_dot_product_attention still dispatches to
# its flash / memory-efficient kernels whenever the inputs allow.
# JAX and TensorFlow: `None` lets JAX pick cuDNN's fused kernel on GPUs; TF ignores it.
FLASH_ATTENTION = False if keras.config.backend() == "torch" else None
