"""Convolutions for XLA:CPU training loops: im2col (strided slices + one matmul).

Why this exists: XLA:CPU emits the *kernel gradient* of a convolution that
sits inside a while loop -- `ppo.update`'s nested `lax.scan`, where every
backward pass of the policy runs -- in a non-canonical layout
(`dim_labels=f01b_i01o->01bf`) as a generic loop nest instead of the Eigen
convolution kernel (jax-ml/jax#12868, open). The ResNet's PPO update ran ~10x
slower than torch eager because of it. Writing the convolution as patch
extraction plus a matmul leaves XLA only slices, pads and a `dot_general`,
which it runs at full speed inside loops too.

Two functions, both drop-in replacements for `jax.lax.conv_general_dilated`
(same signature; the subset flax's `nn.Conv(conv_general_dilated=...)` uses):

- `conv_general_dilated_im2col`: the whole convolution as im2col; forward and
  (by autodiff) both gradients are slices/pads + matmuls.
- `conv_general_dilated_cpu`: forward is `lax.conv_general_dilated` itself
  (bit-identical outputs; XLA's forward convolution is not affected by the
  loop problem and was measured 2-3x faster than im2col's on the tiny VLA's
  ResNet, in and out of `lax.scan`), the backward pass is the VJP of
  `conv_general_dilated_im2col`. This is the one the ResNet uses on CPU
  (`ResNetConfig.conv_impl`): training gets the im2col backward, rollouts and
  evaluation keep XLA's forward. (Full im2col was ~15% faster in the PPO
  update itself, not enough to pay for the slower forward everywhere else.)
  Forward-mode autodiff (`jax.jvp`) is not available through it (a
  `custom_vjp`); reverse mode, jit and vmap are.

Supported: channels-last layouts only (NHWC / HWIO / NHWC and their 1-d and
3-d analogues, i.e. what flax passes), any strides, padding as "SAME",
"SAME_LOWER", "VALID" or explicit (low, high) pairs (negative pairs crop, as in
lax). Not supported (raise NotImplementedError): input or kernel dilation != 1,
feature_group_count != 1, batch_group_count != 1.

Patch extraction uses strided `lax.slice`s, one per kernel offset,
concatenated on the feature axis in (kernel spatial..., in-channel) order --
the order of an HWIO kernel reshaped to [K, O]. `lax.conv_general_dilated_patches`
was measured 1.5x slower inside a scan (it is itself a grouped convolution
whose transpose XLA:CPU also runs slowly).
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["conv_general_dilated_cpu", "conv_general_dilated_im2col", "im2col_patches"]

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
            f"im2col convolution supports channels-last layouts only (NH..WC, H..WIO, NH..WC as flax passes), "
            f"got {dimension_numbers!r}"
        )
    for name, dilation in (("lhs_dilation", lhs_dilation), ("rhs_dilation", rhs_dilation)):
        if dilation is not None and any(d != 1 for d in dilation):
            raise NotImplementedError(f"im2col convolution supports {name}=1 only, got {tuple(dilation)}")
    if feature_group_count != 1 or batch_group_count != 1:
        raise NotImplementedError(
            f"im2col convolution supports feature_group_count=1 and batch_group_count=1 only, "
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


def im2col_patches(x: jax.Array, window: Sequence[int], strides: Sequence[int], pads: Pads) -> jax.Array:
    """[N, *spatial, C] -> [N, *out_spatial, prod(window) * C], features in (window..., C) order.

    `pads` are explicit (low, high) pairs (negative values crop, like lax.pad).
    """
    x = lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0),) + tuple((lo, hi, 0) for lo, hi in pads) + ((0, 0, 0),))
    out = tuple((size - k) // s + 1 for size, k, s in zip(x.shape[1:-1], window, strides))
    if any(o < 1 for o in out):
        return jnp.zeros((x.shape[0],) + tuple(max(o, 0) for o in out) + (math.prod(window) * x.shape[-1],), x.dtype)
    cols = []
    for offset in itertools.product(*(range(k) for k in window)):
        start = (0,) + offset + (0,)
        limit = (x.shape[0],) + tuple(o + (n - 1) * s + 1 for o, n, s in zip(offset, out, strides)) + (x.shape[-1],)
        cols.append(lax.slice(x, start, limit, (1,) + tuple(strides) + (1,)))
    return cols[0] if len(cols) == 1 else jnp.concatenate(cols, axis=-1)


def _im2col_conv(lhs, rhs, strides: tuple[int, ...], pads: Pads, precision, preferred_element_type) -> jax.Array:
    """The convolution as patches @ kernel.reshape(K, O), on already validated arguments."""
    nd = lhs.ndim - 2
    patches = im2col_patches(lhs, rhs.shape[:nd], strides, pads)
    kernel = rhs.reshape(-1, rhs.shape[-1])
    return lax.dot_general(
        patches,
        kernel,
        (((nd + 1,), (0,)), ((), ())),
        precision=precision,
        preferred_element_type=preferred_element_type,
    )


def _xla_conv(lhs, rhs, strides: tuple[int, ...], pads: Pads, precision, preferred_element_type) -> jax.Array:
    io_spec, kernel_spec = _channels_last_spec(lhs.ndim - 2)
    return lax.conv_general_dilated(
        lhs,
        rhs,
        strides,
        pads,
        dimension_numbers=lax.ConvDimensionNumbers(io_spec, kernel_spec, io_spec),
        precision=precision,
        preferred_element_type=preferred_element_type,
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _xla_forward_im2col_backward(lhs, rhs, strides, pads, precision, preferred_element_type):
    return _xla_conv(lhs, rhs, strides, pads, precision, preferred_element_type)


def _forward(lhs, rhs, strides, pads, precision, preferred_element_type):
    return _xla_conv(lhs, rhs, strides, pads, precision, preferred_element_type), (lhs, rhs)


def _backward(strides, pads, precision, preferred_element_type, residuals, cotangent):
    # The patches are rebuilt here rather than saved by the forward: they are
    # prod(window) times the input, and are needed only for this layer's backward.
    lhs, rhs = residuals
    _, vjp = jax.vjp(
        functools.partial(
            _im2col_conv, strides=strides, pads=pads, precision=precision,
            preferred_element_type=preferred_element_type,
        ),
        lhs,
        rhs,
    )
    return vjp(cotangent)


_xla_forward_im2col_backward.defvjp(_forward, _backward)


ConvCore = Callable[[jax.Array, jax.Array, tuple[int, ...], Pads, Any, Any], jax.Array]


def _with_lax_signature(core: ConvCore, name: str, doc: str) -> Callable[..., jax.Array]:
    """A drop-in for `lax.conv_general_dilated` (the signature flax's `nn.Conv` calls it with)
    that validates its arguments and runs `core(lhs, rhs, strides, pads, precision,
    preferred_element_type)`: one front end for both public convolutions."""

    def conv(
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
        strides, pads = _canonicalize(
            lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
            feature_group_count, batch_group_count,
        )
        if isinstance(precision, list):
            precision = tuple(precision)  # custom_vjp's static arguments must be hashable
        return core(lhs, rhs, strides, pads, precision, preferred_element_type)

    conv.__name__ = conv.__qualname__ = name
    conv.__doc__ = doc
    return conv


conv_general_dilated_im2col = _with_lax_signature(
    _im2col_conv,
    "conv_general_dilated_im2col",
    "`lax.conv_general_dilated` as im2col + matmul (channels-last, no dilation, no groups).",
)
conv_general_dilated_cpu = _with_lax_signature(
    _xla_forward_im2col_backward,
    "conv_general_dilated_cpu",
    "`lax.conv_general_dilated` forward, im2col backward (see the module docstring for why).",
)
