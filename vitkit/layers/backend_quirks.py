"""The only place where vitkit asks which backend it runs on. Each entry says why."""

import contextlib
import functools

import keras

_JAX = keras.config.backend() == "jax"
_TENSORFLOW = keras.config.backend() == "tensorflow"

# `flash_attention` for `keras.ops.dot_product_attention`.
# torch: with `None`, Keras probes eligibility through `torch.backends.cuda.SDPAParams`, a
# pybind object that torch.compile cannot trace (a graph break in every attention layer).
# `False` skips the probe only: torch's own scaled_dot_product_attention still dispatches to
# its flash / memory-efficient kernels whenever the inputs allow.
# JAX and TensorFlow: `None` lets JAX pick cuDNN's fused kernel on GPUs; TF ignores it.
FLASH_ATTENTION = False if keras.config.backend() == "torch" else None


def softmax(x, axis=-1):
    """`keras.ops.softmax`. jax: with JAX's newer gradient rule (`jax.softmax_custom_jvp`,
    off by default in JAX 0.10), `y * (dy - sum(y * dy))` from the saved output, where the
    default differentiates through `exp(x - max) / sum` and keeps the unnormalised
    exponentials and their sum for the backward pass: one ViT-S/16 gradient at batch 8 on a
    2-core CPU took 1683 -> 1615 ms, CvT-13's (3136 x 784 scores in its first stage) 2295 ->
    2069 ms. Same forward numbers."""
    if _JAX:
        import jax

        with jax.softmax_custom_jvp(True):
            return keras.ops.softmax(x, axis=axis)
    return keras.ops.softmax(x, axis=axis)


def _attention_heads_first(q, k, v, bias, scale):
    """Softmax attention on `(b, h, n, d)` blocks; `scale` multiplies the queries, not the
    `(b, h, n_q, n_k)` scores: XLA:CPU handed the scores' product to YNNPACK with the scale
    as a stored tensor of the scores' size, written and read in every layer, forward and
    backward (ViT-S/16's training step at batch 8, 2-vCPU AMD EPYC: 831-851 -> 796-831 ms).
    The same numbers within float32 rounding (exactly, for a power-of-two scale)."""
    ops = keras.ops
    q, k, v = (ops.transpose(t, (0, 2, 1, 3)) for t in (q, k, v))
    scores = ops.matmul(q * ops.cast(scale, q.dtype), ops.transpose(k, (0, 1, 3, 2)))
    if bias is not None:
        scores = scores + ops.cast(bias, scores.dtype)
    attn = ops.cast(softmax(ops.cast(scores, "float32"), axis=-1), v.dtype)
    return ops.transpose(ops.matmul(attn, v), (0, 2, 1, 3))


# Query-chunked attention (JAX on a CPU): above CHUNK_ABOVE bytes of float32 scores, the
# queries go through in chunks of about CHUNK_SCORES bytes of scores each.
CHUNK_ABOVE = 12 * 2**20
CHUNK_SCORES = 3 * 2**20


def attention_in_query_chunks(q, k, v, scale, chunk):
    """`_attention_heads_first` without bias, `chunk` queries at a time, each chunk recomputed
    in the backward pass (`keras.remat`): the same numbers (every query's softmax is its own
    row), but a chunk's scores stay in the CPU's cache instead of the whole `(b, h, n_q, n_k)`
    tensor going out to memory and back, forward and backward. The queries are zero-padded
    to a multiple of `chunk`; the padding's rows are cut off."""
    ops = keras.ops
    batch, queries, heads, depth = q.shape
    padding = -queries % chunk
    if padding:
        q = ops.pad(q, ((0, 0), (0, padding), (0, 0), (0, 0)))
    chunks = ops.reshape(q, (batch, (queries + padding) // chunk, chunk, heads, depth))

    # k and v go in as arguments: TensorFlow's recompute_grad differentiates only those
    attend = keras.remat(lambda part, k, v: _attention_heads_first(part, k, v, None, scale))
    out = ops.map(lambda part: attend(part, k, v), ops.moveaxis(chunks, 1, 0))
    out = ops.reshape(ops.moveaxis(out, 0, 1), (batch, queries + padding, heads, -1))
    return out[:, :queries] if padding else out


def query_chunk(batch, queries, heads, keys):
    """The chunk of queries for `attention_in_query_chunks`, or None where the scores are
    small enough to stay whole (measured on a 2-vCPU AMD EPYC, one attention's gradient:
    CvT-13's stage 1, 8 x 3136 x 784 scores, 163 -> 78 ms; its stage 2, 8 x 3 x 784 x 196,
    28 -> 19 ms; ViT-S/16's 8 x 6 x 196 x 196 (7 MiB) got slower, 10.7 -> 13.1 ms)."""
    if not all(isinstance(n, int) for n in (batch, queries, heads, keys)):
        return None  # unknown or symbolic (an export's dynamic batch): keep it whole
    row = 4 * batch * heads * keys  # one query's scores, float32
    if row * queries <= CHUNK_ABOVE:
        return None
    chunks = -(-row * queries // CHUNK_SCORES)
    return -(-queries // chunks)


def dot_product_attention(q, k, v, bias=None, mask=None, scale=None):
    """`keras.ops.dot_product_attention` on `(b, n, h, d)` queries, keys and values.

    jax on CPU: `jax.nn.dot_product_attention` contracts the `(b, n, h, d)` operands in
    place (batch axes b and h on both sides of the sequence axis), and XLA:CPU runs those
    batched products slowly. Moving the heads first and multiplying `(b, h, n, d)` blocks,
    as Keras' TensorFlow backend does, gives the same numbers (softmax in float32) faster:
    one ViT-S/16 attention layer at batch 8 took 23 -> 17 ms forward and 74 -> 59 ms for
    its gradient (the queries are scaled, see `_attention_heads_first`). Masks and half
    precision (whose scores JAX accumulates in float32) keep Keras' call. Above
    `CHUNK_ABOVE` bytes of scores and without a bias, the queries go through in chunks
    (`attention_in_query_chunks`): CvT-13's first stage, 8 x 3136 x 784 scores, took 68 ->
    22 ms forward and 163 -> 78 ms for its gradient.

    jax on a GPU: Keras picks cuDNN's fused kernel where it applies, but cuDNN differentiates
    it only for even sequence lengths, and a ViT's are odd (196 patches and a class token):
    the training step's trace fails and Keras falls back to XLA's unfused attention (seen on
    an H100, ViT-S/16 in mixed bfloat16). There, half-precision attention without mask or
    bias pads the sequences to even lengths and tells cuDNN the true lengths, which masks the
    padding (`_jax_attention_padded_to_even`); elsewhere GPUs keep Keras' choice.
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if _JAX and mask is None:
        dtype = keras.backend.standardize_dtype(q.dtype)
        if dtype == "float32" and _jax_on_cpu():
            chunk = None if bias is not None else query_chunk(*q.shape[:3], k.shape[1])
            if chunk is not None:
                return attention_in_query_chunks(q, k, v, scale, chunk)
            return _attention_heads_first(q, k, v, bias, scale)
        odd = q.shape[1] % 2 or k.shape[1] % 2
        if dtype in ("bfloat16", "float16") and bias is None and odd and _jax_on_gpu():
            try:
                return _jax_attention_padded_to_even(q, k, v, scale, "cudnn")
            except (NotImplementedError, RuntimeError, ValueError):
                pass  # no usable cuDNN here: Keras' call picks XLA's attention
    return keras.ops.dot_product_attention(
        q, k, v, bias=bias, mask=mask, scale=scale, flash_attention=FLASH_ATTENTION
    )


def _jax_on_cpu():
    import jax

    return jax.default_backend() == "cpu"


def _jax_on_gpu():
    import jax

    return jax.default_backend() == "gpu"


def _jax_attention_padded_to_even(q, k, v, scale, implementation):
    """`jax.nn.dot_product_attention` on `(b, n, h, d)` inputs padded by one position where
    a sequence length is odd; the true lengths mask the padded keys (and zero the padded
    queries' rows, which are cut off)."""
    import jax
    import jax.numpy as jnp

    batch, queries, keys = q.shape[0], q.shape[1], k.shape[1]

    def pad(t, length):
        return jnp.pad(t, ((0, 0), (0, length % 2), (0, 0), (0, 0)))

    out = jax.nn.dot_product_attention(
        pad(q, queries),
        pad(k, keys),
        pad(v, keys),
        scale=scale,
        query_seq_lengths=jnp.full((batch,), queries, "int32"),
        key_value_seq_lengths=jnp.full((batch,), keys, "int32"),
        implementation=implementation,
    )
    return out[:, :queries]


def _gelu_via_erf(x):
    return 0.5 * x * (1.0 + keras.ops.erf(x * 0.7071067811865476))


# float32 erf as a ratio of two odd/even polynomials in x on [-4, 4] (the rational form XLA and
# Eigen expand `erf` into for float32; |error| < 5e-7 against the exact erf, like `lax.erf`'s).
_ERF_NUMERATOR = (
    -2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06,
    -5.69250639462346e-05, -7.34990630326855e-04, -2.95459980854025e-03,
    -1.60960333262415e-02,
)  # fmt: skip
_ERF_DENOMINATOR = (
    -1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03,
    -7.37332916720468e-03, -1.42647390514189e-02,
)  # fmt: skip


def _erf_rational(x):
    x = keras.ops.clip(x, -4.0, 4.0)
    x2 = x * x
    numerator = denominator = 0.0
    for c in _ERF_NUMERATOR:
        numerator = numerator * x2 + c
    for c in _ERF_DENOMINATOR:
        denominator = denominator * x2 + c
    return x * numerator / denominator


_JAX_GELU = None


def _jax_gelu(x):
    """The exact GELU on JAX. `jax.nn.gelu(approximate=False)` computes `x * erfc(-x / sqrt 2)
    / 2`, and XLA:CPU's erfc is slow (2.65 ms on ViT-S/16's hidden activations at batch 8, 12
    of them a forward pass); `lax.erf` would take 0.75 ms but serialises as a StableHLO
    composite that TensorFlow 2.21 cannot read back (the SavedModel export of JAX models
    broke). So float32 takes erf's own rational form, written out in plain ops, with the
    derivative `Phi(x) + x phi(x)` as its JVP (one exp, not the polynomial's chain rule).
    Within 2e-6 of torch's GELU, values and gradient. Other dtypes, GPUs and JAX run op by op
    (where each of the form's twenty operations would be a dispatch) keep Keras' gelu."""
    global _JAX_GELU
    if keras.backend.standardize_dtype(x.dtype) != "float32" or not _jax_traced_on_cpu(x):
        return keras.activations.gelu(x)
    if _JAX_GELU is None:
        import jax
        import jax.numpy as jnp

        @jax.custom_jvp
        def gelu(x):
            return 0.5 * x * (1.0 + _erf_rational(x * 0.7071067811865476))

        @gelu.defjvp
        def _(primals, tangents):
            (x,), (dx,) = primals, tangents
            cdf = 0.5 * (1.0 + _erf_rational(x * 0.7071067811865476))
            slope = cdf + x * (0.3989422804014327 * jnp.exp(-0.5 * x * x))
            return x * cdf, slope * dx

        _JAX_GELU = gelu
    return _JAX_GELU(x)


_JAX_STORED_GRADIENT = None


def stored_gradient(x):
    """`x`, whose gradient XLA:CPU computes once and stores, on JAX on a CPU.

    The gradient of a transformer's residual stream is a running sum, one term per residual
    branch. XLA:CPU fuses that chain of additions into every operation that reads it, so each
    block's backward pass adds up again the terms of all the blocks above it: in ViT-S/16's
    compiled training step the first blocks' gradient fusions took up to 58 operands, and
    the 45 fusions of more than 8 operands cost 42 ms of an 850 ms step (2-vCPU AMD EPYC,
    jax 0.10.2). Passing the gradient through a conditional, across which XLA does not fuse,
    makes it a stored tensor at each block input: no fusion of more than 8 operands, and
    the step 854-905 -> 812-846 ms (A/B, same hour). `jax.lax.optimization_barrier` would
    say this directly, but XLA:CPU turns it into control dependencies before fusing (it is
    gone from the optimized program, whose fusions stayed the same).

    The condition is `e == e` for one element `e` of `x` (false only for NaN, when the
    gradient is NaN anyway); both branches return the tangent, the second adding `0.0` so
    that JAX keeps two branches. Values and gradients are unchanged; other backends, GPUs,
    JAX run op by op, and `keras.distribution` layouts (where reading one element of a
    sharded tensor would be a transfer between devices at every block) get `x` as it is."""
    global _JAX_STORED_GRADIENT
    if not _JAX or not _jax_traced_on_cpu(x) or keras.distribution.distribution() is not None:
        return x
    if any(size == 0 for size in x.shape):
        return x  # no element to test
    if _JAX_STORED_GRADIENT is None:
        import jax

        @jax.custom_jvp
        def stored(x):
            return x

        @stored.defjvp
        def _(primals, tangents):
            (x,), (dx,) = primals, tangents
            element = x[(0,) * x.ndim]
            keep = jax.lax.cond(element == element, lambda t: t, lambda t: t + 0.0, dx)
            return x, keep

        _JAX_STORED_GRADIENT = stored
    return _JAX_STORED_GRADIENT(x)


# The exact (erf) GELU of every feed-forward block and of LeViT's attention output.
# tensorflow: tf.nn.gelu(approximate=False) lowers to the Erfc op, which tf2onnx cannot convert
# (ONNX has Erf, not Erfc), and ONNX export from every backend goes through TensorFlow. The erf
# form is the same function. jax: see `_jax_gelu`. torch keeps Keras' gelu (its fused kernel).
GELU = {"tensorflow": _gelu_via_erf, "jax": _jax_gelu}.get(
    keras.config.backend(), keras.activations.gelu
)


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


def cpuinfo_field(name):
    """A field of the first CPU in /proc/cpuinfo (Linux: "vendor_id", "model name"), else "":
    matrix kernels rank differently on different CPUs."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.split(":", 1)[0].strip() == name:
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def _same_padding(size, kernel, stride, dilation):
    """Keras' (TensorFlow's) "same" padding of one spatial axis: (before, after)."""
    out = -(-size // stride)
    total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


def _strided_slice(x, start, stop, step):
    """`x[start:stop:step]` on every axis (jax: as `lax.slice`; its indexing would gather)."""
    if _JAX:
        import jax

        return jax.lax.slice(x, start, stop, step)
    return x[tuple(slice(*bounds) for bounds in zip(start, stop, step))]


def _shifted_windows(shape, kernel_size, out, strides, dilation_rate, spatial):
    """(i, j, start, stop, step) of each kernel position (i, j): the strided window of a padded
    map of `shape` that it multiplies, one row per output position."""
    for i in range(kernel_size[0]):
        for j in range(kernel_size[1]):
            start = [0] * len(shape)
            start[spatial[0]], start[spatial[1]] = i * dilation_rate[0], j * dilation_rate[1]
            stop, step = list(shape), [1] * len(shape)
            for axis, n, s in zip(spatial, out, strides):
                stop[axis] = start[axis] + (n - 1) * s + 1
                step[axis] = s
            yield i, j, start, stop, step


def _sum_of_windows(x, weights, geometry):
    """sum over (i, j) of window (i, j) of the padded map `x` times `weights[i, j]` (per
    channel). `geometry`: (output size, strides, dilation, spatial axes)."""
    y = None
    for i, j, start, stop, step in _shifted_windows(x.shape, weights.shape[:2], *geometry):
        term = _strided_slice(x, start, stop, step) * weights[i, j]
        y = term if y is None else y + term
    return y


def _dilated(x, strides, spatial):
    """`x` with `s - 1` zeros between neighbours along each spatial axis of stride `s`."""
    ops = keras.ops
    for axis, s in zip(spatial, strides):
        if s > 1:
            n = x.shape[axis]
            x = ops.expand_dims(x, axis + 1)
            pads = [(0, 0)] * len(x.shape)
            pads[axis + 1] = (0, s - 1)
            shape = [-1 if size is None else size for size in x.shape]
            shape[axis : axis + 2] = [n * s]
            x = ops.reshape(ops.pad(x, pads), shape)
            start, stop = [0] * len(shape), list(x.shape)
            stop[axis] = (n - 1) * s + 1
            x = _strided_slice(x, start, stop, [1] * len(shape))
    return x


def _windows_gradients(x, weights, grad, geometry, sums_as_products=False):
    """The gradients of `_sum_of_windows(x, weights, geometry)` (input and weights) for the
    output's gradient `grad`, written out for XLA:CPU. Differentiated as it stands, the
    input's gradient is `kh * kw` zero-padded windows of the output's gradient added up (a
    pad per term, each element bounds-checked in every one): the profile of CvT-13's
    training step on JAX put about a fifth of its op time in the depth-wise projections.
    Here the output's gradient is dilated by the strides and padded once, and the input's
    gradient is the sum of its windows times the flipped kernel: the forward pass's own
    form. The weights' gradient is each window of the input times the output's gradient,
    summed over all but the channels, as before. CvT-13's gradient at batch 8 (AMD EPYC, A/B
    in one process, median of 8): JAX 1206 -> 1139 ms, TensorFlow inside `jit_compile=True`
    1030 -> 907 ms.

    `sums_as_products` (channels last only): those sums as one matrix product per kernel row,
    a row of ones times the row's `kw` window products side by side, `(1, n) x (n, kw * c)`
    (see `_tf_sum_of_windows`)."""
    ops = keras.ops
    out, strides, dilation_rate, spatial = geometry
    kernel_size = tuple(weights.shape[:2])
    channels = next(a for a in range(1, len(x.shape)) if a not in spatial)
    others = tuple(a for a in range(len(x.shape)) if a != channels)
    dilated = _dilated(grad, strides, spatial)
    pads = [(0, 0)] * len(x.shape)
    for axis, k, d in zip(spatial, kernel_size, dilation_rate):
        pads[axis] = ((k - 1) * d, x.shape[axis] - dilated.shape[axis])
    padded = ops.pad(dilated, pads)
    sums_as_products = sums_as_products and channels == len(x.shape) - 1
    ones, kernel_row = None, []
    x_grad, weights_grad = None, []
    for i, j, start, stop, step in _shifted_windows(
        x.shape, kernel_size, out, strides, dilation_rate, spatial
    ):
        window = _strided_slice(x, start, stop, step)
        if not sums_as_products:
            weights_grad.append(ops.sum(window * grad, axis=others))
        else:
            kernel_row.append(ops.reshape(window * grad, (-1, x.shape[-1])))
            if ones is None:  # one per output position (the batch may be unknown)
                ones = ops.ones((1, ops.shape(kernel_row[0])[0]), grad.dtype)
            if j == kernel_size[1] - 1:
                weights_grad.append(ops.matmul(ones, ops.concatenate(kernel_row, axis=1)))
                kernel_row = []
        # x[p] met grad[(p - start) / s] through weights[i, j]: padded[p + (k-1) d - start]
        first, last = [0] * len(x.shape), list(x.shape)
        for axis, k, d in zip(spatial, kernel_size, dilation_rate):
            first[axis] = (k - 1) * d - start[axis]
            last[axis] = first[axis] + x.shape[axis]
        term = _strided_slice(padded, first, last, [1] * len(first)) * weights[i, j]
        x_grad = term if x_grad is None else x_grad + term
    return x_grad, ops.reshape(ops.stack(weights_grad), weights.shape)


@functools.cache
def _jax_sum_of_windows():
    """`_sum_of_windows` differentiated by `_windows_gradients` (a `jax.custom_vjp`: no
    forward-mode derivative; reverse mode to any order)."""
    import jax

    @functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
    def sum_of_windows(x, weights, geometry):
        return _sum_of_windows(x, weights, geometry)

    def forward(x, weights, geometry):
        return _sum_of_windows(x, weights, geometry), (x, weights)

    def backward(geometry, residuals, grad):
        return _windows_gradients(*residuals, grad, geometry)

    sum_of_windows.defvjp(forward, backward)
    return sum_of_windows


def _tf_sum_of_windows(x, weights, geometry):
    """`_sum_of_windows` differentiated by `_windows_gradients` (`tf.custom_gradient`).

    The weights' gradient sums each window product over all but the channels, and
    TensorFlow's XLA:CPU runs such a reduction at about one element per nanosecond: the
    weights' gradient of a 3x3 depth-wise convolution of an (8, 56, 56, 64) map took 12 ms
    against 1.4 ms for the input's (2-vCPU AMD EPYC; JAX's XLA, 3.6 ms for both). Summed by
    matrix products instead (`sums_as_products`, one per kernel row), CvT-13's training step
    at batch 8 took 886-922 -> 776-844 ms (A/B in one process, three rounds). All nine
    windows in one product were as fast, with three times the memory; one product per window
    was slower (958-981 -> 1025 ms), and the reduction's other forms (batch first, rows
    first, channels first) no faster (11-12 ms for the map above). Channels-first maps keep
    the reduction."""
    import tensorflow as tf

    @tf.custom_gradient
    def sum_of_windows(x, weights):
        def gradients(grad):
            return _windows_gradients(x, weights, grad, geometry, sums_as_products=True)

        return _sum_of_windows(x, weights, geometry), gradients

    return sum_of_windows(x, weights)


def _depthwise_conv_as_shifts(x, kernel, strides, padding, dilation_rate, data_format):
    """`keras.ops.depthwise_conv` written as `kh * kw` strided windows of the map, each
    scaled per channel and summed; products and sums in at least float32."""
    ops = keras.ops
    height, width, channels, multiplier = kernel.shape
    spatial = (1, 2) if data_format == "channels_last" else (2, 3)
    dtype = x.dtype
    x = ops.cast(x, keras.backend.result_type(dtype, "float32"))
    kernel = ops.cast(kernel, x.dtype)
    if padding == "same":
        pads = [(0, 0)] * 4
        for axis, k, s, d in zip(spatial, (height, width), strides, dilation_rate):
            pads[axis] = _same_padding(x.shape[axis], k, s, d)
        x = ops.pad(x, pads)
    out = tuple(
        (x.shape[axis] - (k - 1) * d - 1) // s + 1
        for axis, k, s, d in zip(spatial, (height, width), strides, dilation_rate)
    )
    if multiplier > 1:  # output channel c * multiplier + m reads input channel c
        axis = 3 if data_format == "channels_last" else 1
        x = ops.repeat(x, multiplier, axis=axis)
    weights = ops.reshape(kernel, (height, width, channels * multiplier))
    if data_format == "channels_first":
        weights = ops.reshape(weights, (height, width, -1, 1, 1))
    geometry = (out, tuple(strides), tuple(dilation_rate), spatial)
    if _JAX:
        y = _jax_sum_of_windows()(x, weights, geometry)
    elif _TENSORFLOW:
        y = _tf_sum_of_windows(x, weights, geometry)
    else:
        y = _sum_of_windows(x, weights, geometry)
    return ops.cast(y, dtype)


# XLA compiling for a CPU (JAX under `jax.jit`, TensorFlow inside `jit_compile=True`):
# XLA:CPU runs a depth-wise convolution (a convolution with one feature group per channel)
# far slower than the same sum written out as `kh * kw` shifted, per-channel scaled windows
# of the map, which it fuses into one loop (and whose gradient is as simple). CvT-13 at
# batch 8, 224 px, on a 2-core CPU: JAX forward 871 -> 549 ms and gradient 3350 -> 2391 ms;
# TensorFlow with XLA forward 1011 -> 500 ms and gradient 3430 -> 3189 ms. TensorFlow
# without XLA keeps its own kernel (the shifted form took it from 579 to 765 ms), as do
# GPUs (cuDNN) and eager JAX (op by op, each window would be its own small program,
# compiled per shape: the eager test suite ran CvT and MobileViT 1.5x slower). Products
# and sums run in at least float32, like the convolution's accumulator (results within
# float32 rounding of it). `DEPTHWISE_AS_SHIFTS = False` turns it off.
DEPTHWISE_AS_SHIFTS = True


def _jax_traced_on_cpu(x):
    """Whether JAX is tracing `x` (under `jax.jit`, a gradient, Keras' compiled steps) for
    its CPU backend, rather than running it op by op."""
    import jax

    return isinstance(x, jax.core.Tracer) and _jax_on_cpu()


def _tf_xla_on_cpu():
    """Whether TensorFlow is tracing for XLA (`tf.function(jit_compile=True)`, Keras'
    `jit_compile`) on a machine without GPUs. TensorFlow's own test for it is internal
    (`control_flow_util.GraphOrParentsInXlaContext`, what tf.keras used); if it moves,
    TensorFlow keeps its convolution."""
    import tensorflow as tf

    try:
        from tensorflow.python.ops.control_flow_util import GraphOrParentsInXlaContext
    except ImportError:  # pragma: no cover - a TensorFlow without it
        return False
    return GraphOrParentsInXlaContext(
        tf.compat.v1.get_default_graph()
    ) and not tf.config.list_logical_devices("GPU")


def depthwise_conv(x, kernel, strides, padding, dilation_rate, data_format):
    """`keras.ops.depthwise_conv`, as shifted windows where XLA compiles it for a CPU (see
    `DEPTHWISE_AS_SHIFTS`)."""
    if (
        DEPTHWISE_AS_SHIFTS
        and ((_JAX and _jax_traced_on_cpu(x)) or (_TENSORFLOW and _tf_xla_on_cpu()))
        and len(kernel.shape) == 4
        and padding in ("valid", "same")
        and None not in tuple(x.shape)[1:]
    ):
        return _depthwise_conv_as_shifts(
            x, kernel, tuple(strides), padding, tuple(dilation_rate), data_format
        )
    return keras.ops.depthwise_conv(
        x,
        kernel,
        strides=strides,
        padding=padding,
        dilation_rate=dilation_rate,
        data_format=data_format,
    )


# Calling a sublayer from inside a vitkit layer's `call`.
# torch: eager torch pays Keras' `Layer.__call__` machinery (input conversion, name scopes,
# autocast scopes, call-context plumbing, nn.Module's hook dispatch) on every Dense,
# LayerNormalization and Dropout, a Python cost as large as the ops of a small model at
# batch 1 (ViT-S/16: 0.83x of vit-pytorch). Where none of that machinery can change the
# result, call the layer's math directly. JAX and TensorFlow trace the call once, so the
# overhead is not paid per step there: they keep the plain call.
# Mixed precision (`mixed_bfloat16`, `mixed_float16`) takes the shortcut too, where Keras'
# call would only cast: inside a mixed model the autocast scope of the compute dtype is open
# and the tensors between sublayers are already in it (ViT-S/16 in mixed bfloat16 on eager
# torch, a 32-pixel input: 37 ms per forward through Keras' calls, most of it per-call
# Python work; on an H100 that made vitkit-torch 0.13x of vit-pytorch at batch 1).
# `FAST_TORCH_CALLS = False` turns the shortcut off (for A/B timing and debugging).
_TORCH = keras.config.backend() == "torch"
FAST_TORCH_CALLS = True
# The 2-D convolution classes the shortcut runs as `torch.nn.functional.conv2d`, each with
# whether it is depth-wise; `vitkit.layers.conv` adds its own (same call, same weights).
TORCH_CONVS = {keras.layers.Conv2D: False, keras.layers.DepthwiseConv2D: True}


def _plain_layer_norm(layer, x, kwargs):
    """A LayerNormalization over the last axis without RMS scaling or call arguments: the
    form the eager-torch and JAX shortcuts compute themselves."""
    return (
        type(layer) is keras.layers.LayerNormalization
        and not kwargs
        and not layer.rms_scaling
        and list(layer.axis) in ([-1], [len(x.shape) - 1])
    )


if _TORCH:
    import torch
    import torch.nn.functional as torch_functional
    from keras.src.backend.common import global_state
    from keras.src.backend.common.variables import AutocastScope, get_autocast_scope
    from torch.nn.modules import module as torch_module

    def _torch_hooks_active(layer):
        return bool(
            layer._forward_hooks
            or layer._forward_pre_hooks
            or torch_module._global_forward_hooks
            or torch_module._global_forward_pre_hooks
        )

    _MIXED = {"mixed_bfloat16": torch.bfloat16, "mixed_float16": torch.float16}

    def _dtypes_as_keras_would_leave_them(layer, x, kwargs):
        """Whether Keras' `__call__` would not cast `x` and the shortcut reads the variables
        as Keras would: float32 everywhere with no autocast scope, or a mixed policy whose
        scope is already open (variables then read in the compute dtype) with `x` already in
        the compute dtype. Keras' LayerNormalization does not autocast (its call runs with
        the scope closed, variables in float32); the shortcut's own layer norm does the same."""
        policy, scope = layer.dtype_policy.name, get_autocast_scope()
        if policy == "float32":
            return x.dtype is torch.float32 and scope is None
        return (
            policy in _MIXED
            and x.dtype is _MIXED[policy]
            and scope is not None
            and scope.dtype == layer.compute_dtype
            and (layer.autocast or _plain_layer_norm(layer, x, kwargs))
        )

    def _plain_torch_conv(layer):
        """A 2-D convolution `_torch_conv2d` computes as Keras' call would. Not under
        torch.compile: there the per-call host cost is gone anyway, and Inductor (torch
        2.13) fails to order the strides of a permuted view with dynamic shapes
        ("cannot determine truth value of Relational")."""
        padding_ok = layer.padding == "valid" or (
            layer.padding == "same" and tuple(layer.strides) == (1, 1)
        )
        return (
            padding_ok
            and not getattr(layer, "lora_enabled", False)
            and not torch.compiler.is_compiling()
        )

    def _torch_conv2d(layer, x, depthwise, padding=None):
        # Keras' torch conv copies a channels_last input to NCHW and back to channels_last
        # memory on every call; a permuted view is already channels_last memory, which
        # torch's convolutions take as it is (as do their outputs, permuted back).
        kernel = layer.kernel.value
        if depthwise:  # (kh, kw, in, multiplier) -> (in * multiplier, 1, kh, kw)
            height, width, channels, multiplier = kernel.shape
            weight = kernel.reshape(height, width, 1, channels * multiplier)
            groups = channels
        else:  # (kh, kw, in / groups, out) -> (out, in / groups, kh, kw)
            weight, groups = kernel, layer.groups
        channels_last = layer.data_format == "channels_last"
        if channels_last:
            x = x.permute(0, 3, 1, 2)
        y = torch_functional.conv2d(
            x,
            weight.permute(3, 2, 0, 1),
            None if layer.bias is None else layer.bias.value,
            tuple(layer.strides),
            padding or (0 if layer.padding == "valid" else "same"),
            tuple(layer.dilation_rate),
            groups,
        )
        if channels_last:
            y = y.permute(0, 2, 3, 1)
        return y if layer.activation is None else layer.activation(y)

    def _plain_batch_norm(layer):
        """A BatchNormalization `_torch_batch_norm` computes as Keras' inference call would
        (eagerly: under torch.compile Inductor fuses Keras' ops itself)."""
        return (
            not layer.renorm and isinstance(layer.axis, int) and not torch.compiler.is_compiling()
        )

    def _torch_batch_norm(layer, x):
        # Keras' inference call is five elementwise ops (five kernels on a GPU); torch's
        # batch_norm is one. Statistics in at least float32, the result in the compute dtype.
        wide = x.to(torch.promote_types(x.dtype, torch.float32))
        axis = layer.axis % x.ndim
        if axis != 1:
            wide = wide.movedim(axis, 1)
        weights = [  # Keras makes them all without autocast: float32 in any scope
            None if w is None else w.value.to(wide.dtype)
            for w in (layer.moving_mean, layer.moving_variance, layer.gamma, layer.beta)
        ]
        y = torch_functional.batch_norm(wide, *weights, False, 0.0, layer.epsilon)
        if axis != 1:
            y = y.movedim(1, axis)
        return y.to(getattr(torch, layer.compute_dtype))

    # Eager torch's float32 Dense on an AMD CPU: torch's `addmm` / `mm` go to MKL, whose
    # float32 GEMM runs about half as fast there as oneDNN's (the library under torch's CPU
    # convolutions, which picks its kernels by instruction set, not vendor). On a 2-core AMD
    # EPYC Zen 5, ViT-S/16's `(1576, 384) x (384, 1536)` feed-forward product took 8.8 ms through
    # `addmm` and 3.8 ms through oneDNN's inner product (`torch.ops.mkldnn._linear_pointwise`,
    # the op Inductor uses for its own oneDNN linears), 2.2-2.3x at every ViT-S/16 and CvT-13
    # size down to batch 1; forward and backward together (the backward also through oneDNN)
    # 1.3-1.7x. On a Zen 4 the same product took 9.8 against 8.7 ms: oneDNN still leads, by
    # 5-15 %. On an Intel CPU MKL is at home: it keeps `addmm`. `ONEDNN_DENSE = False` turns
    # it off, `True` on.
    _LINEAR_POINTWISE = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)
    ONEDNN_DENSE = (
        _LINEAR_POINTWISE is not None
        and torch.backends.mkldnn.is_available()
        and cpuinfo_field("vendor_id") == "AuthenticAMD"
    )

    if _LINEAR_POINTWISE is not None:  # (the test forces ONEDNN_DENSE on any CPU)
        # A torch custom op, so that torch.compile keeps it: Inductor lowers `addmm` to MKL's
        # product (and fails on the bare oneDNN op), but calls an opaque custom op as it is.
        # AMD EPYC, `jit_compile=True` training step at batch 8: ViT-S/16 1189 -> 782 ms,
        # CvT-13 1290 -> 869 ms; batch-8 inference 382 -> 201 and 407 -> 267 ms.
        @torch.library.custom_op("vitkit::onednn_linear", mutates_args=())
        def _onednn_linear(
            rows: torch.Tensor, kernel: torch.Tensor, bias: torch.Tensor | None
        ) -> torch.Tensor:
            """`rows @ kernel + bias` for 2-D float32 CPU tensors, through oneDNN. Its
            gradients are this op again, so higher derivatives (`create_graph`) work as
            through `F.linear`."""
            return _LINEAR_POINTWISE(rows, kernel.T, bias, "none", [], "")

        @_onednn_linear.register_fake
        def _(rows, kernel, bias):
            return rows.new_empty((rows.shape[0], kernel.shape[1]))

        def _onednn_linear_context(ctx, inputs, output):
            rows, kernel, bias = inputs
            ctx.save_for_backward(rows, kernel)

        def _onednn_linear_backward(ctx, grad):
            rows, kernel = ctx.saved_tensors
            # A broadcast gradient (that of a sum: zero strides) took oneDNN 2.3 s for a
            # `(1568, 384)` kernel gradient, against 3 ms once laid out.
            grad = grad.contiguous()
            need_rows, need_kernel, need_bias = ctx.needs_input_grad
            return (
                _onednn_linear(grad, kernel.T, None) if need_rows else None,
                _onednn_linear(rows.T, grad, None) if need_kernel else None,
                grad.sum(0) if need_bias else None,
            )

        _onednn_linear.register_autograd(
            _onednn_linear_backward, setup_context=_onednn_linear_context
        )

    def _torch_dense(layer, x):
        kernel = layer.kernel.value
        bias = None if layer.bias is None else layer.bias.value
        if (
            ONEDNN_DENSE
            and x.device.type == "cpu"
            and x.dtype is kernel.dtype is torch.float32
            and x.numel() > 0
        ):
            rows = x.reshape(-1, x.shape[-1]).contiguous()  # (see the backward)
            if torch.compiler.is_compiling() or (
                torch.is_grad_enabled()
                and any(t is not None and t.requires_grad for t in (rows, kernel, bias))
            ):
                rows = _onednn_linear(rows, kernel, bias)
            else:  # eagerly, without autograd: the op itself (no custom-op dispatch)
                rows = _LINEAR_POINTWISE(rows, kernel.T, bias, "none", [], "")
            y = rows.reshape(*x.shape[:-1], kernel.shape[1])
        else:
            y = torch_functional.linear(x, kernel.T, bias)
        return y if layer.activation is None else layer.activation(y)

    def _can_skip_call(layer, x, kwargs):
        """Whether `layer.__call__(x, **kwargs)` would do nothing beyond `layer.call`."""
        return (
            layer.built
            and type(x) is torch.Tensor
            and x.device.type != "meta"  # compute_output_spec's symbolic run
            # a `keras...device_scope`: Keras' ops move their inputs into it, torch's don't
            and global_state.get_global_attribute("torch_device") is None
            and getattr(x, "_keras_mask", None) is None
            and _dtypes_as_keras_would_leave_them(layer, x, kwargs)
            and "call" not in vars(layer)  # a tap (vitkit.taps) or other instance patch
            and getattr(layer, "quantization_mode", None) is None
            and layer._remat_mode is None
            and layer.activity_regularizer is None
            and keras.distribution.distribution() is None
            and not _torch_hooks_active(layer)
            and layer._call_context_args == {"training"}
        )


# jax: XLA:CPU differentiates a Dense layer on `(b, n, d)` tokens (a dot_general with two
# free axes on one side) far slower than the same matmul on `(b * n, d)` rows: ViT-S/16's
# feed-forward blocks took 1.8x as long in the backward pass, and the whole training step
# took 3.5 s against TensorFlow's 1.35 s (2.0 s with this change). On JAX a Dense layer
# called through `call_sublayer` sees its tokens as rows (same numbers; Keras' own call, so
# dtype policies, LoRA and quantization still apply). Not under a `keras.distribution`
# layout, whose sharding the reshape would have to carry through. `FLAT_JAX_DENSE = False`
# turns it off.
FLAT_JAX_DENSE = True


def _dense_on_rows(layer, x):
    shape = tuple(x.shape)
    inner = shape[1:-1]
    if (
        len(shape) <= 2
        or None in inner
        or shape[-1] is None
        or keras.distribution.distribution() is not None
    ):
        return layer(x)
    y = layer(keras.ops.reshape(x, (-1, shape[-1])))
    return keras.ops.reshape(y, (-1, *inner, y.shape[-1]))


# jax: Keras' layer normalization folds gamma into the inverse standard deviation
# (`x * (rsqrt(var + eps) * gamma) + (beta - mean * ...)`), so forward and backward pass
# carry two full-size `(b, n, d)` scale and shift tensors, which XLA:CPU materialises and
# reads back; ViT-S/16's training step spent about 100 ms of 1.6 s on them on a 2-core CPU.
# On JAX a plain LayerNormalization called through `call_sublayer` computes
# `(x - mean) * rsqrt(var + eps) * gamma + beta` instead (torch's order of operations; Keras'
# dtype rule: statistics in at least float32, the result in the compute dtype); whenever
# Keras' `__call__` could do more than that (a tap, remat, a regulariser, a distribution)
# the layer is called as usual. TensorFlow's XLA runs Keras' form faster (its training step
# got 6 % slower with this one), so it keeps it. `JAX_LAYER_NORM = False` turns it off.
JAX_LAYER_NORM = True


def _jax_plain_layer_norm(layer, x, kwargs):
    """A built LayerNormalization over the last axis whose Keras call would do no more than
    `_jax_layer_norm`."""
    return (
        _plain_layer_norm(layer, x, kwargs)
        and layer.built
        and "call" not in vars(layer)  # a tap (vitkit.taps) or other instance patch
        and layer._remat_mode is None
        and layer.activity_regularizer is None
        and keras.distribution.distribution() is None
    )


def _jax_layer_norm(layer, x):
    ops = keras.ops
    # Keras' call leaves the input as it is (this layer does not autocast) and computes in
    # at least float32.
    wide = ops.cast(x, keras.backend.result_type(x.dtype, "float32"))
    mean = ops.mean(wide, axis=-1, keepdims=True)
    centered = wide - mean
    variance = ops.mean(ops.square(centered), axis=-1, keepdims=True)
    y = centered * ops.rsqrt(variance + layer.epsilon)
    if layer.scale:
        y = y * ops.cast(layer.gamma.value, y.dtype)
    if layer.center:
        y = y + ops.cast(layer.beta.value, y.dtype)
    return ops.cast(y, layer.compute_dtype)


def call_zero_padded_conv(conv, x, padding, pad):
    """`call_sublayer(conv, pad(x))` for a "valid" convolution, where `pad` zero-pads both
    sides of each spatial axis by `padding = (ph, pw)`. eager torch: vitkit pads by
    concatenation (see `vitkit.layers.utils.zero_pad`), a dozen Keras ops per padded map;
    where the shortcut applies, torch's conv2d pads instead (the same zeros, one call)."""
    if (
        _TORCH
        and FAST_TORCH_CALLS
        and type(conv) in TORCH_CONVS
        and conv.padding == "valid"
        and _plain_torch_conv(conv)
        and global_state.get_global_attribute("current_call_ctx") is not None
        and _can_skip_call(conv, x, {})
    ):
        return _torch_conv2d(conv, x, TORCH_CONVS[type(conv)], tuple(padding))
    return call_sublayer(conv, pad(x))


def call_sublayer(layer, x, **kwargs):
    """`layer(x, **kwargs)`, called from inside another layer's `call`; on eager torch,
    without Keras' per-call machinery when it cannot matter (see `FAST_TORCH_CALLS`); on
    JAX, a Dense layer's tokens as rows (see `FLAT_JAX_DENSE`) and LayerNormalization in
    torch's form (see `JAX_LAYER_NORM`)."""
    if _JAX and FLAT_JAX_DENSE and type(layer) is keras.layers.Dense and not kwargs:
        return _dense_on_rows(layer, x)
    if _JAX and JAX_LAYER_NORM and _jax_plain_layer_norm(layer, x, kwargs):
        return _jax_layer_norm(layer, x)
    if not (_TORCH and FAST_TORCH_CALLS):
        return layer(x, **kwargs)
    context = global_state.get_global_attribute("current_call_ctx")
    if context is None or not _can_skip_call(layer, x, kwargs):
        return layer(x, **kwargs)
    # Keras' training value: the argument, else the enclosing call's, else call()'s default;
    # Keras leaves it in the call context for the layers called after this one.
    training = kwargs.pop("training", None)
    if training is None:
        training = context.get_value("training")
    context.set_value("training", training)
    kind = type(layer)
    if kind is keras.layers.Dense and not kwargs and not layer.lora_enabled:
        return _torch_dense(layer, x)
    if _plain_layer_norm(layer, x, kwargs):
        # Keras normalises in at least float32 and returns the compute dtype; without
        # autocast (Keras' default for this layer) gamma and beta are read in float32.
        with AutocastScope(None) if not layer.autocast else contextlib.nullcontext():
            gamma = layer.gamma.value if layer.scale else None
            beta = layer.beta.value if layer.center else None
        y = torch_functional.layer_norm(
            x.float(),
            x.shape[-1:],
            None if gamma is None else gamma.float(),
            None if beta is None else beta.float(),
            layer.epsilon,
        )
        return y.to(x.dtype)
    if kind is keras.layers.Dropout and not kwargs and (not training or layer.rate == 0):
        return x
    if kind in TORCH_CONVS and not kwargs and _plain_torch_conv(layer):
        return _torch_conv2d(layer, x, depthwise=TORCH_CONVS[kind])
    if kind is keras.layers.BatchNormalization and not training and _plain_batch_norm(layer):
        return _torch_batch_norm(layer, x)
    if training is not None and layer._call_has_context_arg.get("training", False):
        kwargs["training"] = training
    return layer.call(x, **kwargs)
