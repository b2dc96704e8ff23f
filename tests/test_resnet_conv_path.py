"""The ResNet twin's CPU path (jaxrl_vla/models/vla/cpu_ops.py) against lax's convolution and nn.max_pool.

XLA:CPU runs a convolution's kernel gradient and max pooling's gradient slowly
inside `lax.scan` (jax-ml/jax#12868), so on CPU the ResNet computes those
backward passes its own way. These tests check that this changes nothing but
speed: same forward, same gradients (to fp32 rounding; the pool's against a
NumPy loop with torch's first-maximum rule), same parameter tree.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jaxrl_vla.models.vla import ResNetModel, resnet_config
from jaxrl_vla.models.vla.cpu_ops import conv_general_dilated_cpu, max_pool_cpu
from jaxrl_vla.models.vla.resnet import conv_function, max_pool_function

# What flax's nn.Conv passes for 2-d inputs (flax.linen.linear._conv_dimension_numbers).
FLAX_DN = lax.ConvDimensionNumbers((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))

# (input NHWC, kernel, stride, padding)
CASES = {
    "stem-7x7-s2": ((2, 32, 32, 3), 7, 2, ((3, 3), (3, 3))),
    "3x3-s1": ((2, 9, 9, 8), 3, 1, ((1, 1), (1, 1))),
    "3x3-s2": ((2, 10, 10, 8), 3, 2, ((1, 1), (1, 1))),
    "3x3-s2-odd": ((2, 9, 11, 4), 3, 2, ((1, 1), (1, 1))),
    "shortcut-1x1-s2-valid": ((2, 10, 10, 8), 1, 2, "VALID"),
    "bottleneck-1x1-s1": ((2, 6, 6, 8), 1, 1, ((0, 0), (0, 0))),
    "same-s2-odd": ((2, 9, 11, 4), 3, 2, "SAME"),
    "same-lower-4x4-s3": ((2, 11, 10, 4), 4, 3, "SAME_LOWER"),
    "valid-3x3-s1": ((2, 8, 8, 4), 3, 1, "VALID"),
    "negative-pad": ((2, 9, 9, 4), 3, 1, ((-1, 2), (0, 1))),
}


def _operands(shape, k, out_channels=6, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32)
    w = (rng.standard_normal((k, k, shape[-1], out_channels)) / np.sqrt(k * k * shape[-1])).astype(np.float32)
    return jnp.asarray(x), jnp.asarray(w)


@pytest.mark.parametrize("case", sorted(CASES))
def test_conv_matches_lax_forward_and_gradients(case):
    shape, k, s, padding = CASES[case]
    x, w = _operands(shape, k)
    fn = conv_general_dilated_cpu
    ref = lambda x, w: lax.conv_general_dilated(x, w, (s, s), padding, dimension_numbers=FLAX_DN)  # noqa: E731
    got = lambda x, w: fn(x, w, (s, s), padding, dimension_numbers=FLAX_DN)  # noqa: E731

    y_ref, vjp_ref = jax.vjp(ref, x, w)
    y, vjp = jax.vjp(got, x, w)
    assert y.shape == y_ref.shape and y.dtype == y_ref.dtype
    np.testing.assert_array_equal(y, y_ref)  # XLA's own forward
    cotangent = jnp.asarray(np.random.default_rng(1).standard_normal(y.shape).astype(np.float32))
    for name, a, b in zip(("d_input", "d_kernel"), vjp(cotangent), vjp_ref(cotangent)):
        assert a.shape == b.shape, name
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4, err_msg=name)


def test_conv_accepts_string_dimension_numbers_and_other_ranks():
    fn = conv_general_dilated_cpu
    x, w = _operands((2, 9, 9, 4), 3)
    np.testing.assert_allclose(
        fn(x, w, (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")),
        lax.conv_general_dilated(x, w, (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")),
        rtol=1e-5, atol=1e-5,
    )
    rng = np.random.default_rng(0)
    x1 = jnp.asarray(rng.standard_normal((2, 13, 4)).astype(np.float32))
    w1 = jnp.asarray(rng.standard_normal((3, 4, 5)).astype(np.float32))
    dn1 = ("NWC", "WIO", "NWC")
    np.testing.assert_allclose(
        fn(x1, w1, (2,), ((1, 1),), dimension_numbers=dn1),
        lax.conv_general_dilated(x1, w1, (2,), ((1, 1),), dimension_numbers=dn1),
        rtol=1e-5, atol=1e-5,
    )


def test_conv_rejects_what_it_does_not_implement():
    fn = conv_general_dilated_cpu
    x, w = _operands((2, 8, 8, 4), 3)
    pads = ((1, 1), (1, 1))
    with pytest.raises(NotImplementedError, match="feature_group_count"):
        fn(x, w[:, :, :2], (1, 1), pads, dimension_numbers=FLAX_DN, feature_group_count=2)
    with pytest.raises(NotImplementedError, match="rhs_dilation"):
        fn(x, w, (1, 1), pads, rhs_dilation=(2, 2), dimension_numbers=FLAX_DN)
    with pytest.raises(NotImplementedError, match="lhs_dilation"):
        fn(x, w, (1, 1), pads, lhs_dilation=(2, 2), dimension_numbers=FLAX_DN)
    with pytest.raises(NotImplementedError, match="channels-last"):
        fn(x, w, (1, 1), pads, dimension_numbers=("NCHW", "OIHW", "NCHW"))
    with pytest.raises(NotImplementedError, match="channels-last"):
        fn(x, w, (1, 1), pads)  # lax's default layout is NCHW / OIHW


def test_nn_conv_with_cpu_path_keeps_params_and_matches_inside_scan():
    """Through flax's nn.Conv, gradients taken inside lax.scan (where XLA:CPU's conv backward is slow)."""
    x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 2, 12, 12, 3)).astype(np.float32))

    def make(conv_fn):
        return nn.Conv(5, (3, 3), strides=(2, 2), padding="SAME", use_bias=False, conv_general_dilated=conv_fn)

    ref_conv, cpu_conv = make(None), make(conv_general_dilated_cpu)
    params = ref_conv.init(jax.random.PRNGKey(0), x[0])
    other = cpu_conv.init(jax.random.PRNGKey(0), x[0])
    assert jax.tree_util.tree_map(jnp.shape, params) == jax.tree_util.tree_map(jnp.shape, other)

    def train(module):
        def step(p, xb):
            g = jax.grad(lambda p: jnp.sum(jnp.tanh(module.apply(p, xb)) ** 2))(p)
            return jax.tree_util.tree_map(lambda a, b: a - 0.1 * b, p, g), None

        return jax.jit(lambda p, xs: lax.scan(step, p, xs)[0])

    got, want = train(cpu_conv)(params, x), train(ref_conv)(params, x)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5)  # 3 SGD steps of fp32 rounding


def _numpy_max_pool_2d(x, g, k, s, pad):
    """Forward and backward of a -inf-padded 2-d max pool, loop by loop: each window's gradient goes to its
    first maximal element in row-major order (torch's MaxPool2d and XLA's select_and_scatter rule)."""
    n, h, w, c = x.shape
    xp = np.full((n, h + 2 * pad, w + 2 * pad, c), -np.inf, np.float64)
    xp[:, pad:pad + h, pad:pad + w] = x
    ho, wo = (h + 2 * pad - k) // s + 1, (w + 2 * pad - k) // s + 1
    y = np.empty((n, ho, wo, c))
    dxp = np.zeros_like(xp)
    for b in range(n):
        for i in range(ho):
            for j in range(wo):
                for ch in range(c):
                    window = xp[b, i * s:i * s + k, j * s:j * s + k, ch]
                    first = np.argmax(window)  # first occurrence of the maximum, row-major
                    y[b, i, j, ch] = window.flat[first]
                    di, dj = divmod(first, k)
                    dxp[b, i * s + di, j * s + dj, ch] += g[b, i, j, ch]
    return y, dxp[:, pad:pad + h, pad:pad + w]


@pytest.mark.parametrize("shape", [(2, 8, 8, 3), (2, 9, 7, 2)])
def test_max_pool_matches_a_numpy_loop_with_ties(shape):
    """Forward equal to nn.max_pool; gradients to the first maximum of each window, also when values tie
    (post-ReLU zeros, repeated values) and when windows overlap."""
    rng = np.random.default_rng(0)
    x = np.maximum(rng.integers(-2, 3, shape), 0).astype(np.float32)  # many ties, zeros as after a ReLU
    pool = lambda v: max_pool_cpu(v, (3, 3), (2, 2), ((1, 1), (1, 1)))  # noqa: E731
    y, vjp = jax.vjp(pool, jnp.asarray(x))
    g = rng.standard_normal(y.shape).astype(np.float32)
    want_y, want_dx = _numpy_max_pool_2d(x, g, 3, 2, 1)
    np.testing.assert_array_equal(y, nn.max_pool(jnp.asarray(x), (3, 3), strides=(2, 2), padding=((1, 1), (1, 1))))
    np.testing.assert_array_equal(y, want_y)
    np.testing.assert_allclose(vjp(jnp.asarray(g))[0], want_dx, rtol=1e-6, atol=1e-6)


def test_max_pool_gradient_matches_xla_inside_scan():
    """Distinct values (no ties): the same gradient as nn.max_pool's select_and_scatter, taken inside lax.scan."""
    xs = jnp.asarray(np.random.default_rng(1).standard_normal((2, 3, 10, 10, 4)).astype(np.float32))

    def grads(pool):
        def step(carry, x):
            return carry, jax.grad(lambda v: jnp.sum(jnp.sin(pool(v, (3, 3), (2, 2), ((1, 1), (1, 1))))))(x)

        return jax.jit(lambda xs: lax.scan(step, 0.0, xs)[1])(xs)

    np.testing.assert_allclose(grads(max_pool_function("cpu")), grads(max_pool_function("xla")), rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="entries"):
        max_pool_cpu(xs[0], (3,), (2, 2), ((1, 1), (1, 1)))


# ----------------------------------------------------------------------------- the ResNet twin


def test_conv_impl_selection():
    assert conv_function("xla") is lax.conv_general_dilated
    assert conv_function("cpu") is conv_general_dilated_cpu
    assert max_pool_function("cpu") is max_pool_cpu
    expected = conv_general_dilated_cpu if jax.default_backend() == "cpu" else lax.conv_general_dilated
    assert conv_function("auto") is expected
    assert (max_pool_function("auto") is max_pool_cpu) == (jax.default_backend() == "cpu")
    assert resnet_config("tiny").conv_impl == "auto"
    assert "conv_impl" not in resnet_config("tiny").to_hf_kwargs()  # torch's ResNetConfig has no such field
    with pytest.raises(ValueError, match="conv_impl"):
        resnet_config("tiny", conv_impl="cudnn")
    with pytest.raises(ValueError, match="conv_impl"):
        conv_function("cudnn")


@pytest.mark.parametrize("layer_type", ["basic", "bottleneck"])
def test_resnet_conv_impls_agree(layer_type):
    """Same parameter tree, identical forward, gradients equal to fp32 rounding (stem, 3x3/1x1, shortcuts)."""
    overrides = dict(hidden_sizes=(16, 32), depths=(1, 2)) if layer_type == "bottleneck" else {}
    cfg_xla = resnet_config("tiny", layer_type=layer_type, conv_impl="xla", **overrides)
    cfg_cpu = resnet_config("tiny", layer_type=layer_type, conv_impl="cpu", **overrides)
    pixels = jnp.asarray(np.random.default_rng(0).random((2, 32, 32, 3), dtype=np.float32))
    variables = ResNetModel(cfg_xla).init(jax.random.PRNGKey(0), pixels)
    other = ResNetModel(cfg_cpu).init(jax.random.PRNGKey(0), pixels)
    assert jax.tree_util.tree_map(jnp.shape, variables) == jax.tree_util.tree_map(jnp.shape, other)

    def loss_and_grad(cfg):
        def loss(params):
            pooled, hidden = ResNetModel(cfg).apply({**variables, "params": params}, pixels)
            return jnp.sum(pooled**2) + jnp.mean(jnp.tanh(hidden))

        return jax.jit(jax.value_and_grad(loss))(variables["params"])

    (loss_xla, grads_xla), (loss_cpu, grads_cpu) = loss_and_grad(cfg_xla), loss_and_grad(cfg_cpu)
    assert float(loss_xla) == float(loss_cpu)  # the forward is XLA's convolution in both
    flat_xla = jax.tree_util.tree_leaves_with_path(grads_xla)
    flat_cpu = jax.tree_util.tree_leaves(grads_cpu)
    for (path, a), b in zip(flat_xla, flat_cpu):
        scale = float(jnp.max(jnp.abs(a))) + 1e-12
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5 * scale, err_msg=jax.tree_util.keystr(path))
