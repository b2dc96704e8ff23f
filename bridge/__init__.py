"""torch / TensorDict interop for jaxrl_vla.

This is the only package that imports torch. Names are resolved lazily so that
`import bridge` stays cheap and the error for a missing torch install is clear.

    from bridge import td_to_jax, jax_to_td            # TensorDict <-> JAX pytrees
    from bridge import load_vla_model, export_to_torch # torch VLA checkpoints <-> Flax
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "td_to_jax": "bridge.convert",
    "jax_to_td": "bridge.convert",
    "ConversionStats": "bridge.convert",
    "load_vla_model": "bridge.vla_loading",
    "export_to_torch": "bridge.vla_loading",
    "register_twin": "bridge.vla_loading",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'bridge' has no attribute {name!r}")
    try:
        module = importlib.import_module(_EXPORTS[name])
    except ModuleNotFoundError as err:
        if err.name in ("torch", "tensordict", "safetensors", "transformers"):
            raise ModuleNotFoundError(
                f"bridge.{name} needs the torch extra: pip install torch==2.13.0 && "
                f"pip install -e '.[torch]' (missing: {err.name})"
            ) from err
        raise
    return getattr(module, name)
