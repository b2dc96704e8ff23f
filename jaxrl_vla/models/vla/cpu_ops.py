"""Convolution and max pooling whose backward passes XLA:CPU runs at full speed inside loops.

Why this exists: PPO's update is a nested `lax.scan`, so every backward pass of
the policy runs inside an XLA while loop, and there XLA:CPU handles two
ResNet gradients badly:

- the *kernel gradient* of a convolution (and, for stride 1, the input
  gradient) that `jax.vjp` emits stays in a non-canonical layout
  (`dim_labels=f01b_i01o->01bf`) and runs as a generic loop nest instead of
  the convolution library (jax-ml/jax#12868, open): measured 35-170x slower
  than outside a loop on the tiny VLA's layers;
- max pooling's gradient (`select_and_scatter`) is expanded into a variadic
  arg-max `reduce_window` over four index arrays plus a scatter.

Outside a loop XLA rewrites the kernel gradient itself into a canonical
forward convolution (batch and feature axes swapped, the output gradient as a
dilated kernel); inside one it does not. So the backward passes here *are*
written as those canonical forward convolutions, which XLA runs in its
convolution library (YNNPACK/Eigen) in and out of loops:

- `conv_general_dilated_cpu`, a drop-in for `lax.conv_general_dilated` (the
  signature and channels-last layouts flax's `nn.Conv` uses): the forward is
  XLA's own convolution (bit-identical outputs), the backward is
      d_kernel = conv(x as [C_in, *spatial, N], dy as a [*out, N, C_out] kernel
                      dilated by the strides),
      d_input  = conv(dy dilated by the strides, the kernel flipped in space
                      with in/out channels swapped),
  both with stride 1 and the padding that gives back the operand's shape.
  Measured in the PPO update of the tiny VLA: 2x faster than the previous
  im2col (slices + matmul) backward, 10x faster than XLA's own.
- `max_pool_cpu`: `reduce_window` max forward (exactly what `nn.max_pool`
  does); the backward routes each output gradient to the *first* maximal
  element of its window (the rule of torch's `MaxPool2d` and of XLA's
  `select_and_scatter`) with elementwise compares, selects and pads: half
  the time of XLA's expansion inside a loop.

Forward-mode autodiff (`jax.jvp`) is not available through them (they are
`custom_vjp`s); reverse mode, jit and vmap are.

Supported convolutions: channels-last layouts only (NHWC / HWIO / NHWC and
their 1-d and 3-d analogues, i.e. what flax passes), any strides, padding as
"SAME", "SAME_LOWER", "VALID" or explicit (low, high) pairs (negative pairs
crop, as in lax). Not supported (raise NotImplementedError): input or kernel
dilation != 1, feature_group_count != 1, batch_group_count != 1.
"""

from __future__ import annotations

import functools
import itertools
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["conv_general_dilated_cpu", "max_pool_cpu"]

Pads = tuple[tuple[int, int], ...]


def _channels_last_spec(nd: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(lhs/out spec, rhs spec) of NH..WC / H..WIO as lax.ConvDimensionNumbers tuples."""
    spatial = tuple(range(1, nd + 1))
    return (0, nd + 1) + spatial, (nd + 1, nd) + tuple(range(nd))


def _canonicalize(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int],
    padding: str | Sequence[tuple[int, int]],
    lhs_dilation: Sequence[int] | None,
    rhs_dilation: Sequence[int] | None,
    dimension_numbers: Any,
    feature_group_count: int,
    batch_group_count: int,
) -> tuple[tuple[int, ...], Pads]:
    """Validate the arguments this module supports; returns (strides, explicit (low, high) pads)."""
    nd = lhs.ndim - 2
    if nd < 1 or rhs.ndim != lhs.ndim:
        raise ValueError(f"lhs {lhs.shape} and rhs {rhs.shape} must have the same rank >= 3")
    dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    io_spec, kernel_spec = _channels_last_spec(nd)
    if tuple(dn.lhs_spec) != io_spec or tuple(dn.rhs_spec) != kernel_spec or tuple(dn.out_spec) != io_spec:
        raise NotImplementedError(
            f"conv_general_dilated_cpu supports channels-last layouts only (NH..WC, H..WIO, NH..WC as flax passes), "
            f"got {dimension_numbers!r}"
        )
    for name, dilation in (("lhs_dilation", lhs_dilation), ("rhs_dilation", rhs_dilation)):
        if dilation is not None and any(d != 1 for d in dilation):
            raise NotImplementedError(f"conv_general_dilated_cpu supports {name}=1 only, got {tuple(dilation)}")
    if feature_group_count != 1 or batch_group_count != 1:
        raise NotImplementedError(
            f"conv_general_dilated_cpu supports feature_group_count=1 and batch_group_count=1 only, "
            f"got {feature_group_count} and {batch_group_count}"
        )
    if lhs.shape[-1] != rhs.shape[-2]:
        raise ValueError(f"lhs has {lhs.shape[-1]} input channels but the kernel {rhs.shape} expects {rhs.shape[-2]}")
    strides = tuple(int(s) for s in window_strides)
    if len(strides) != nd or any(s < 1 for s in strides):
        raise ValueError(f"window_strides must be {nd} positive integers, got {tuple(window_strides)}")
    window = rhs.shape[:nd]
    if isinstance(padding, str):
        pads = lax.padtype_to_pads(lhs.shape[1:-1], window, strides, padding)
    else:
        pads = list(padding)
    pads = tuple((int(lo), int(hi)) for lo, hi in pads)
    if len(pads) != nd:
        raise ValueError(f"padding must give {nd} (low, high) pairs, got {padding!r}")
    return strides, pads


def _dimension_numbers(nd: int) -> lax.ConvDimensionNumbers:
    io_spec, kernel_spec = _channels_last_spec(nd)
    return lax.ConvDimensionNumbers(io_spec, kernel_spec, io_spec)


def _xla_conv(lhs, rhs, strides, pads, precision, preferred_element_type, lhs_dilation=None, rhs_dilation=None):
    """`lax.conv_general_dilated` in the channels-last layout (NH..WC, H..WIO, NH..WC)."""
    return lax.conv_general_dilated(
        lhs,
        rhs,
        strides,
        pads,
        lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation,
        dimension_numbers=_dimension_numbers(lhs.ndim - 2),
        precision=precision,
        preferred_element_type=preferred_element_type,
    )


def _kernel_gradient(x, dy, window, strides, pads, precision, preferred_element_type) -> jax.Array:
    """d kernel [*window, C_in, C_out] of a strided convolution, as one canonical forward convolution.

    dK[k, c, o] = sum_{n, i} x_padded[n, s*i + k, c] * dy[n, i, o]: a convolution
    whose batch axis is C_in, whose contracted feature axis is N, and whose
    kernel is dy with its spatial taps dilated by the strides.
    """
    nd = x.ndim - 2
    spatial = tuple(range(1, nd + 1))
    high = tuple(
        (n_out - 1) * s + k - n_in - lo for (lo, _), n_out, s, k, n_in in zip(pads, dy.shape[1:-1], strides, window, x.shape[1:-1])
    )
    grad = _xla_conv(
        jnp.transpose(x, (nd + 1,) + spatial + (0,)),  # [C_in, *spatial, N]
        jnp.transpose(dy, spatial + (0, nd + 1)),  # [*out, N, C_out]
        (1,) * nd,
        tuple((lo, hi) for (lo, _), hi in zip(pads, high)),
        precision,
        preferred_element_type,
        rhs_dilation=strides,
    )  # [C_in, *window, C_out]
    return jnp.transpose(grad, spatial + (0, nd + 1))


def _input_gradient(dy, kernel, in_spatial, strides, pads, precision, preferred_element_type) -> jax.Array:
    """d input [N, *spatial, C_in]: dy dilated by the strides, convolved with the flipped, in/out-swapped kernel."""
    nd = dy.ndim - 2
    window = kernel.shape[:nd]
    flipped = jnp.swapaxes(lax.rev(kernel, tuple(range(nd))), nd, nd + 1)  # [*window, C_out, C_in]
    low = tuple(k - 1 - lo for (lo, _), k in zip(pads, window))
    high = tuple(
        n_in + k - 2 - (n_out - 1) * s - lo for lo, k, n_out, s, n_in in zip(low, window, dy.shape[1:-1], strides, in_spatial)
    )
    return _xla_conv(
        dy, flipped, (1,) * nd, tuple(zip(low, high)), precision, preferred_element_type, lhs_dilation=strides
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _conv_canonical_backward(lhs, rhs, strides, pads, precision, preferred_element_type):
    return _xla_conv(lhs, rhs, strides, pads, precision, preferred_element_type)


def _conv_forward(lhs, rhs, strides, pads, precision, preferred_element_type):
    return _xla_conv(lhs, rhs, strides, pads, precision, preferred_element_type), (lhs, rhs)


def _conv_backward(strides, pads, precision, preferred_element_type, residuals, cotangent):
    lhs, rhs = residuals
    nd = lhs.ndim - 2
    d_input = _input_gradient(cotangent, rhs, lhs.shape[1:-1], strides, pads, precision, preferred_element_type)
    d_kernel = _kernel_gradient(lhs, cotangent, rhs.shape[:nd], strides, pads, precision, preferred_element_type)
    return d_input.astype(lhs.dtype), d_kernel.astype(rhs.dtype)


_conv_canonical_backward.defvjp(_conv_forward, _conv_backward)


def conv_general_dilated_cpu(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int],
    padding: str | Sequence[tuple[int, int]],
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision: Any = None,
    preferred_element_type: Any = None,
) -> jax.Array:
    """`lax.conv_general_dilated` (forward bit-identical) with a loop-friendly backward; see the module docstring."""
    strides, pads = _canonicalize(
        lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
        feature_group_count, batch_group_count,
    )
    if isinstance(precision, list):
        precision = tuple(precision)  # custom_vjp's static arguments must be hashable
    return _conv_canonical_backward(lhs, rhs, strides, pads, precision, preferred_element_type)


# ============================================================================ max pooling


def _window_views(
    padded: jax.Array, window: tuple[int, ...], strides: tuple[int, ...], out: tuple[int, ...]
) -> Iterator[tuple[tuple[int, ...], jax.Array]]:
    """(offset, strided slice [N, *out, C]) for each window offset, in row-major (scan) order."""
    for offset in itertools.product(*(range(k) for k in window)):
        start = (0,) + offset + (0,)
        limit = (padded.shape[0],) + tuple(o + (n - 1) * s + 1 for o, n, s in zip(offset, out, strides))
        yield offset, lax.slice(padded, start, limit + (padded.shape[-1],), (1,) + strides + (1,))


def _reduce_window_max(x, window, strides, pads):
    return lax.reduce_window(
        x, jnp.asarray(-jnp.inf, x.dtype), lax.max, (1,) + window + (1,), (1,) + strides + (1,),
        ((0, 0),) + pads + ((0, 0),),
    )


_max_pool = jax.custom_vjp(_reduce_window_max, nondiff_argnums=(1, 2, 3))


def _max_pool_forward(x, window, strides, pads):
    y = _reduce_window_max(x, window, strides, pads)
    return y, (x, y)


def _max_pool_backward(window, strides, pads, residuals, cotangent):
    """Each window's gradient to its first maximal element: compares, selects and strided pads, no scatter."""
    x, y = residuals
    padded = lax.pad(x, jnp.asarray(-jnp.inf, x.dtype), ((0, 0, 0),) + tuple((lo, hi, 0) for lo, hi in pads) + ((0, 0, 0),))
    zero = jnp.zeros((), cotangent.dtype)
    taken = jnp.zeros(y.shape, bool)
    d_padded = jnp.zeros(padded.shape, cotangent.dtype)
    for offset, view in _window_views(padded, window, strides, y.shape[1:-1]):
        first_max = (view == y) & ~taken
        taken = taken | first_max
        # The transpose of the strided slice: interior padding puts each value back where it was read.
        spread = tuple(
            (o, size - (o + (n - 1) * s + 1), s - 1) for o, n, s, size in zip(offset, y.shape[1:-1], strides, padded.shape[1:-1])
        )
        d_padded = d_padded + lax.pad(jnp.where(first_max, cotangent, zero), zero, ((0, 0, 0),) + spread + ((0, 0, 0),))
    start = (0,) + tuple(lo for lo, _ in pads) + (0,)
    return (lax.slice(d_padded, start, tuple(a + n for a, n in zip(start, x.shape))),)


_max_pool.defvjp(_max_pool_forward, _max_pool_backward)


def max_pool_cpu(
    x: jax.Array, window_shape: Sequence[int], strides: Sequence[int], padding: Sequence[tuple[int, int]]
) -> jax.Array:
    """`nn.max_pool(x, window_shape, strides, padding)` (channels-last, explicit -inf padding) with the
    first-maximum backward of the module docstring."""
    nd = x.ndim - 2
    window, steps = tuple(int(k) for k in window_shape), tuple(int(s) for s in strides)
    pads = tuple((int(lo), int(hi)) for lo, hi in padding)
    if not (len(window) == len(steps) == len(pads) == nd):
        raise ValueError(f"window_shape, strides and padding must each have {nd} entries for input {x.shape}")
    if any(lo < 0 or hi < 0 for lo, hi in pads):
        raise ValueError(f"max_pool_cpu padding must be non-negative, got {pads}")
    return _max_pool(x, window, steps, pads)
