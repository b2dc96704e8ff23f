"""How the framework's programs are compiled: `jit` = `jax.jit` plus per-backend XLA options.

Why this exists: on the CPU backend, XLA (jaxlib 0.10) hands convolutions, alone
or fused with their elementwise neighbours, to YNNPACK by default, and for the
convolutions of a small VLA's ResNet that is slower than XLA's own (Eigen)
convolution: the tiny VLA's 7x7 stride-2 stem on 64 images of 64x64 takes
9.0 ms inside a `lax.scan` through YNNPACK and 4.1 ms without it, and the VLA
example model's PPO update 423 -> 280 ms (2 cores; torch eager takes 313 ms for
the same update, BENCHMARKS.md#vla_convert). YNNPACK stays on for what it does
well here (dots and reductions): `CPU_OPTIONS` lists exactly those library
fusion types, i.e. convolution and elementwise fusions go back to XLA.

The options are passed per program (`jax.jit(..., compiler_options=...)`), so
importing jaxrl_vla changes nothing else in the process, and a user who sets
`xla_cpu_experimental_ynn_fusion_type` in XLA_FLAGS keeps their choice. A jaxlib
that does not know the option (renamed or removed) compiles without it.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp

CPU_OPTIONS: dict[str, str] = {
    "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE",
}


@functools.cache
def _cpu_options_accepted() -> bool:
    """Whether this jaxlib compiles with CPU_OPTIONS (probed once on a one-op program)."""
    try:
        jax.jit(jnp.negative, compiler_options=CPU_OPTIONS).lower(jnp.zeros(1)).compile()
    except Exception:  # noqa: BLE001 - an unknown option or enum value: fall back to XLA's defaults
        return False
    return True


def compiler_options() -> dict[str, str] | None:
    """The XLA options for programs on the default backend (None: XLA's defaults)."""
    if jax.default_backend() != "cpu":
        return None
    user_flags = os.environ.get("XLA_FLAGS", "")
    options = {k: v for k, v in CPU_OPTIONS.items() if k not in user_flags}
    if not options or not _cpu_options_accepted():
        return None
    return options


def jit(fun: Callable, **kwargs: Any) -> Any:
    """`jax.jit(fun, **kwargs)` compiled with `compiler_options()`."""
    return jax.jit(fun, compiler_options=compiler_options(), **kwargs)
