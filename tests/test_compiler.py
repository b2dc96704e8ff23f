"""training.compiler: the framework's programs compile with XLA:CPU options that keep convolutions in XLA."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jaxrl_vla.training import compiler


def stem(x, w):
    """The tiny VLA's ResNet stem: 7x7 stride-2 convolution, NHWC / HWIO as flax passes them."""
    return lax.conv_general_dilated(x, w, (2, 2), ((3, 3), (3, 3)), dimension_numbers=("NHWC", "HWIO", "NHWC"))


@pytest.fixture
def stem_inputs():
    # the example VLA's stem on 8 images (smaller convolutions XLA keeps out of YNNPACK by itself)
    x = jax.random.normal(jax.random.PRNGKey(0), (8, 64, 64, 3))
    w = jax.random.normal(jax.random.PRNGKey(1), (7, 7, 3, 32))
    return x, w


def test_cpu_programs_keep_convolutions_out_of_ynnpack(stem_inputs):
    assert jax.default_backend() == "cpu"
    assert compiler.compiler_options() == compiler.CPU_OPTIONS
    compiled = compiler.jit(stem).lower(*stem_inputs).compile()
    text = compiled.as_text()
    assert "convolution(" in text
    assert "__ynn_fusion" not in text  # XLA's own convolution, not a YNNPACK library fusion
    reference = jax.jit(stem).lower(*stem_inputs).compile()
    assert "__ynn_fusion" in reference.as_text()  # what XLA:CPU does without the options
    np.testing.assert_allclose(np.asarray(compiled(*stem_inputs)), np.asarray(reference(*stem_inputs)),
                               rtol=1e-5, atol=1e-5)


def test_jit_passes_its_arguments_through():
    double = compiler.jit(lambda x, n: x * n, static_argnums=1, donate_argnums=0)
    assert float(double(jnp.ones(()), 3)) == 3.0


def test_a_user_setting_in_xla_flags_wins(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT")
    assert compiler.compiler_options() is None


def test_an_option_this_jaxlib_rejects_falls_back_to_xla_defaults(monkeypatch, stem_inputs):
    monkeypatch.setattr(compiler, "CPU_OPTIONS", {"xla_cpu_experimental_ynn_fusion_type": "NOT_A_FUSION_TYPE"})
    compiler._cpu_options_accepted.cache_clear()
    try:
        assert compiler.compiler_options() is None
        assert compiler.jit(stem)(*stem_inputs).shape == (8, 32, 32, 32)  # still compiles and runs
    finally:
        compiler._cpu_options_accepted.cache_clear()
