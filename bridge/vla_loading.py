"""Load torch VLA checkpoints into Flax twins, and export Flax weights back to torch.

A *twin* is a Flax module with the same maths as a torch module, whose
variables are laid out so that a torch state_dict converts leaf by leaf:

- a torch key `a.b.3.c.weight` names module `a.b.3.c` and tensor `weight`;
  the Flax path is the module path with list indices folded into names
  (`a/b_3/c`, which is what Flax `setup` gives a list attribute `b`) followed
  by the leaf the conversion rule of that module's *type* names (`kernel`);
- the rule table `RULES` maps each torch module type to its leaves: the Flax
  collection, the Flax leaf name and the layout change (e.g. Linear weight
  [out, in] -> Dense kernel [in, out]). A tensor held directly by a module type
  with no rule (a bare `nn.Parameter`, like a `log_std`) is copied as is.

The registry maps torch classes to twins:

    from bridge import register_twin, load_vla_model, export_to_torch

    class FlaxMLPPolicy(flax.linen.Module):          # twin of torch MLPPolicy below
        hidden: int
        action_dim: int
        def setup(self):
            self.net = [nn.Dense(self.hidden), nn.Dense(self.action_dim)]   # -> net_0, net_1
            self.value = nn.Dense(1)
            self.log_std = self.param("log_std", nn.initializers.zeros, (self.action_dim,))
        def __call__(self, obs):
            h = jnp.tanh(self.net[0](obs))
            return DiagGaussian(self.net[1](h), self.log_std), self.value(h)[:, 0]

    # torch: class MLPPolicy(nn.Module): self.net = nn.ModuleList([Linear(obs_dim, hidden), Linear(hidden, action_dim)]);
    #        self.value = Linear(hidden, 1); self.log_std = Parameter(torch.zeros(action_dim))
    register_twin(
        "my_pkg.policies.MLPPolicy",                     # or the class itself
        lambda cfg: (FlaxMLPPolicy(cfg["hidden"], cfg["action_dim"]), jnp.zeros((1, cfg["obs_dim"]))),
    )
    module, variables = load_vla_model("mlp.pt", "my_pkg.policies.MLPPolicy",
                                       {"obs_dim": 4, "hidden": 32, "action_dim": 2})

(`nn.Sequential(Linear, ReLU, Linear)` gives keys `net.0`, `net.2`: a Flax list
`[Dense, relu, Dense]` in `setup` is named `net_0`, `net_2` the same way.)
Module types the table does not know get a rule with `register_rule`; a twin
whose layout is not rule-shaped passes its own `convert_fn` / `export_fn`.

Tensors enter JAX through DLPack (zero-copy on CPU for contiguous, aligned
float32/16, bfloat16, int32, uint8 and bool tensors) when the layout allows,
and through numpy otherwise. Arrays imported zero-copy share memory with the
torch tensors they came from: do not mutate those tensors in place afterwards.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
import pickle
import re
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import torch
from torch import nn

Variables = dict[str, Any]  # {"params": {...}, "batch_stats": {...}}
FlaxFactory = Callable[[dict[str, Any]], tuple[Any, Any]]  # model_config -> (flax module, example input)
ConvertFn = Callable[[nn.Module, Mapping[str, torch.Tensor]], Variables]
ExportFn = Callable[[nn.Module, Variables], dict[str, torch.Tensor]]
TorchFactory = Callable[[type, dict[str, Any]], nn.Module]


# ----------------------------------------------------------------------------- errors


class VLALoadingError(ValueError):
    """Base class: a checkpoint, class or config that cannot become a Flax twin."""


class UnknownModelClassError(VLALoadingError):
    """`model_class` names no importable torch module class."""


class NoTwinRegisteredError(VLALoadingError):
    """The torch class has no Flax twin in the registry."""


class CheckpointNotFoundError(FileNotFoundError):
    """The checkpoint path does not exist (or is not a file)."""


class UnsafeCheckpointError(VLALoadingError):
    """The checkpoint is a pickle that needs more than weights (it could run code); refused unread."""


class UnsupportedCheckpointError(VLALoadingError):
    """The file is not a recognised checkpoint format or holds no state_dict."""


class UnexpectedKeysError(VLALoadingError):
    """Tensors that nothing consumes (checkpoint keys without a parameter, or leaves without a target)."""


class MissingKeysError(VLALoadingError):
    """Parameters that nothing fills (in the torch model or in the Flax twin)."""


class ShapeMismatchError(VLALoadingError):
    """A tensor whose shape differs from the parameter it should fill."""


class CorruptCheckpointError(UnsupportedCheckpointError):
    """The file has a checkpoint's format but cannot be read: empty, truncated or damaged."""


class NotACheckpointError(UnsupportedCheckpointError):
    """The file is none of the formats its suffix promises (e.g. random bytes in a .pth)."""


class CheckpointReadError(VLALoadingError):
    """The operating system would not give the checkpoint's bytes (permissions, I/O error)."""


class DtypeMismatchError(VLALoadingError):
    """A tensor whose kind (floating, integer, bool) differs from the parameter it should fill."""


class NonFiniteWeightsError(VLALoadingError):
    """A floating tensor holding NaN or infinity: a run from it would train to NaN."""


# ----------------------------------------------------------------------------- rule table


@dataclasses.dataclass(frozen=True)
class LeafRule:
    """How one torch tensor of a module becomes one Flax leaf, and back."""

    torch_name: str
    flax_name: str
    collection: str = "params"
    to_flax: Callable[[torch.Tensor], torch.Tensor] = lambda t: t
    to_torch: Callable[[torch.Tensor], torch.Tensor] = lambda t: t


def _transpose_2d(t: torch.Tensor) -> torch.Tensor:
    """Linear [out, in] <-> Dense [in, out] (its own inverse)."""
    return t.t()


def _oihw_to_hwio(t: torch.Tensor) -> torch.Tensor:
    """Conv2d weight [O, I, H, W] -> Flax Conv kernel [H, W, I, O]."""
    return t.permute(2, 3, 1, 0)


def _hwio_to_oihw(t: torch.Tensor) -> torch.Tensor:
    """Flax Conv kernel [H, W, I, O] -> Conv2d weight [O, I, H, W]."""
    return t.permute(3, 2, 0, 1)


_BIAS = LeafRule("bias", "bias")

# Module type -> its leaves. Looked up along the MRO, so subclasses inherit a rule.
RULES: dict[type, tuple[LeafRule, ...]] = {
    nn.Linear: (LeafRule("weight", "kernel", to_flax=_transpose_2d, to_torch=_transpose_2d), _BIAS),
    nn.Conv2d: (LeafRule("weight", "kernel", to_flax=_oihw_to_hwio, to_torch=_hwio_to_oihw), _BIAS),
    nn.LayerNorm: (LeafRule("weight", "scale"), _BIAS),
    nn.modules.batchnorm._BatchNorm: (
        LeafRule("weight", "scale"),
        _BIAS,
        LeafRule("running_mean", "mean", collection="batch_stats"),
        LeafRule("running_var", "var", collection="batch_stats"),
    ),
    nn.Embedding: (LeafRule("weight", "embedding"),),
}

# Tensors deliberately not converted. num_batches_tracked only matters for BatchNorm with
# momentum=None in train mode, and the twins keep BN frozen; export_to_torch copies it from its
# `source` checkpoint (0 without one).
IGNORED_LEAVES: dict[type, frozenset[str]] = {nn.modules.batchnorm._BatchNorm: frozenset({"num_batches_tracked"})}

# Checkpoint keys older transformers versions saved for GPT-2 (causal-mask buffers); dropped if the
# model has no such key.
_LEGACY_KEY = re.compile(r"(^|\.)attn\.(masked_)?bias$")


def _register_gpt2_conv1d() -> None:
    """GPT-2's Conv1D stores [in, out], already a Dense kernel: no transpose (if transformers is here)."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is optional for user models
        return
    RULES.setdefault(Conv1D, (LeafRule("weight", "kernel"), _BIAS))


_register_gpt2_conv1d()


def register_rule(module_type: type, leaves: tuple[LeafRule, ...], ignored: frozenset[str] = frozenset()) -> None:
    """Teach the converter a torch module type: its leaves (and tensors to skip)."""
    RULES[module_type] = tuple(leaves)
    if ignored:
        IGNORED_LEAVES[module_type] = frozenset(ignored)


def _lookup(table: Mapping[type, Any], module: nn.Module) -> Any:
    """The entry for the most specific class of `module` in `table`, or None."""
    for klass in type(module).__mro__:
        if klass in table:
            return table[klass]
    return None


def flax_module_path(torch_module_path: str) -> tuple[str, ...]:
    """'encoder.stages.0.layers.1' -> ('encoder', 'stages_0', 'layers_1'): how Flax names list items."""
    out: list[str] = []
    for part in torch_module_path.split(".") if torch_module_path else []:
        if part.isdigit() and out:
            out[-1] = f"{out[-1]}_{part}"
        else:
            out.append(part)
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class Target:
    """Where one torch state_dict key lives in the Flax variables."""

    collection: str
    path: tuple[str, ...]
    rule: LeafRule

    @property
    def name(self) -> str:
        return "/".join((self.collection,) + self.path)


def conversion_plan(model: nn.Module) -> tuple[dict[str, Target], set[str]]:
    """(state_dict key -> Flax target, keys deliberately ignored) for every tensor of `model`.

    Raises VLALoadingError for a tensor of a ruled module type that its rule does
    not cover (a rule would silently drop it otherwise).
    """
    state_keys = set(model.state_dict().keys())
    plan: dict[str, Target] = {}
    ignored: set[str] = set()
    for mod_path, module in model.named_modules(remove_duplicate=False):
        rules = _lookup(RULES, module)
        skip = _lookup(IGNORED_LEAVES, module) or frozenset()
        by_name = {r.torch_name: r for r in rules} if rules is not None else {}
        own = [n for n, _ in module.named_parameters(recurse=False)] + [
            n for n, _ in module.named_buffers(recurse=False)
        ]
        for leaf in own:
            key = f"{mod_path}.{leaf}" if mod_path else leaf
            if key not in state_keys:  # non-persistent buffer
                continue
            if leaf in skip:
                ignored.add(key)
            elif leaf in by_name:
                rule = by_name[leaf]
                plan[key] = Target(rule.collection, flax_module_path(mod_path) + (rule.flax_name,), rule)
            elif rules is None and isinstance(getattr(module, leaf), nn.Parameter):
                plan[key] = Target("params", flax_module_path(mod_path) + (leaf,), LeafRule(leaf, leaf))
            else:
                raise VLALoadingError(
                    f"no conversion rule for tensor {key!r} of module type {type(module).__name__}; "
                    f"add one with bridge.vla_loading.register_rule"
                )
    return plan, ignored


# ----------------------------------------------------------------------------- tensor transfer

_DLPACK_DTYPES = frozenset(
    {torch.float32, torch.float16, torch.bfloat16, torch.int32, torch.int8, torch.uint8, torch.bool}
)


def tensor_to_jax(t: torch.Tensor) -> jax.Array:
    """A torch tensor as a JAX array: DLPack (zero-copy when aligned) if contiguous, numpy otherwise."""
    t = t.detach()
    if t.dtype in _DLPACK_DTYPES and (t.is_contiguous() or t.dtype == torch.bfloat16):
        return jax.dlpack.from_dlpack(t.contiguous())
    return jnp.asarray(np.ascontiguousarray(t.cpu().numpy()))


def jax_to_tensor(x: Any) -> torch.Tensor:
    """A JAX (or numpy) array as a CPU torch tensor that owns its memory (safe to save or mutate).

    DLPack first; arrays torch cannot import that way (e.g. on an accelerator a
    CPU-only torch does not know) go through host numpy, bfloat16 as raw bits.
    """
    try:
        return torch.from_dlpack(x).cpu().clone()
    except (TypeError, RuntimeError, BufferError):
        host = np.asarray(jax.device_get(x))
        if host.dtype == jnp.bfloat16:
            return torch.from_numpy(host.view(np.uint16).copy()).view(torch.bfloat16)
        return torch.from_numpy(host.copy())


def _set_in(tree: dict, path: tuple[str, ...], value: Any) -> None:
    """tree[p0][p1]...[pn] = value, creating dicts on the way."""
    for part in path[:-1]:
        tree = tree.setdefault(part, {})
    tree[path[-1]] = value


def _get_in(tree: Mapping, path: tuple[str, ...]) -> Any:
    """tree[p0]...[pn], or None if any step is missing."""
    for part in path:
        if not isinstance(tree, Mapping) or part not in tree:
            return None
        tree = tree[part]
    return tree


def _flatten(tree: Mapping, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    """{path tuple: leaf} of a nested mapping."""
    out: dict[tuple[str, ...], Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, prefix + (str(key),)))
        else:
            out[prefix + (str(key),)] = value
    return out


def torch_to_flax(model: nn.Module, tensors: Mapping[str, torch.Tensor], strict: bool = True) -> Variables:
    """Convert tensors keyed like `model.state_dict()` (weights, or their gradients) into Flax variables.

    With `strict`, every key must be convertible; with `strict=False`, keys
    without a target are skipped (e.g. converting only the gradients of trainable
    parameters). Ignored leaves (num_batches_tracked) are always skipped.
    Contiguous tensors are imported zero-copy: the arrays share their memory,
    so pass copies if the torch tensors will be modified in place later.
    """
    plan, ignored = conversion_plan(model)
    unexpected = sorted(k for k in tensors if k not in plan and k not in ignored)
    if unexpected and strict:
        raise UnexpectedKeysError(f"tensors with no conversion target in {type(model).__name__}: {unexpected}")
    out: Variables = {}
    for key, tensor in tensors.items():
        if key in plan:
            target = plan[key]
            _set_in(out, (target.collection,) + target.path, tensor_to_jax(target.rule.to_flax(tensor)))
    return out


def flax_to_torch(model: nn.Module, variables: Variables) -> dict[str, torch.Tensor]:
    """The state_dict of `model` filled from Flax variables (inverse of `torch_to_flax`).

    Every Flax leaf must be used and every torch key filled (ignored leaves are
    re-created from the model, e.g. num_batches_tracked = 0).
    """
    plan, ignored = conversion_plan(model)
    expected = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    used: set[tuple[str, ...]] = set()
    for key, template in expected.items():
        if key in ignored:
            out[key] = torch.zeros(template.shape, dtype=template.dtype)
            continue
        target = plan[key]
        full = (target.collection,) + target.path
        leaf = _get_in(variables, full)
        if leaf is None:
            raise MissingKeysError(f"torch key {key!r} needs Flax variable {target.name!r}, which is missing")
        tensor = target.rule.to_torch(jax_to_tensor(leaf)).contiguous()
        if tuple(tensor.shape) != tuple(template.shape):
            raise ShapeMismatchError(
                f"{key!r} (from Flax {target.name!r}): Flax gives shape {tuple(tensor.shape)}, "
                f"torch expects {tuple(template.shape)}"
            )
        out[key] = tensor
        used.add(full)
    unused = sorted("/".join(p) for p in _flatten(variables) if p not in used)
    if unused:
        raise UnexpectedKeysError(f"Flax variables that no torch parameter of {type(model).__name__} takes: {unused}")
    return out


# ----------------------------------------------------------------------------- registry


@dataclasses.dataclass(frozen=True)
class TwinSpec:
    """A torch class's Flax twin: how to build it and how weights cross over."""

    flax_factory: FlaxFactory
    convert_fn: ConvertFn = torch_to_flax
    export_fn: ExportFn = flax_to_torch
    torch_factory: TorchFactory = lambda cls, cfg: cls(**cfg)
    value_head: tuple[str, ...] = ()  # torch module prefixes of the critic: optional in a checkpoint for GRPO


_REGISTRY: dict[str | type, TwinSpec] = {}


def register_twin(
    torch_class: str | type,
    flax_factory: FlaxFactory,
    convert_fn: ConvertFn | None = None,
    *,
    export_fn: ExportFn | None = None,
    torch_factory: TorchFactory | None = None,
    value_head: tuple[str, ...] = (),
) -> None:
    """Map a torch model class to its Flax twin (see the module docstring for an example).

    torch_class: the class, or its import path "package.module.Class" (resolved lazily).
    flax_factory(model_config) -> (flax module, example input for `module.init`).
    convert_fn(torch_model, state_dict) -> Flax variables; default: the rule table.
    export_fn(torch_model, variables) -> state_dict; default: the rule table inverted.
    torch_factory(cls, model_config) -> torch model; default: `cls(**model_config)`.
    A complete, tested example (a torch policy, its twin, training from a config, export):
    bridge/examples/tiny_vla.py and docs/bring_your_own_vla.md.
    value_head: the torch module names of the critic (e.g. ("value_fc", "value_out")): a checkpoint
    without them (a behaviour-cloned policy) still loads for critic-free training (GRPO), the
    twin's freshly initialised value head in their place.
    Registering the same class again replaces its entry.
    """
    spec = TwinSpec(flax_factory, value_head=tuple(value_head))
    spec = dataclasses.replace(
        spec,
        **{k: v for k, v in dict(convert_fn=convert_fn, export_fn=export_fn, torch_factory=torch_factory).items() if v},
    )
    _REGISTRY[torch_class] = spec


def _class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def find_twin(cls: type) -> TwinSpec:
    """The registered twin of `cls` (by class, canonical path or a path that imports to it)."""
    if cls in _REGISTRY:
        return _REGISTRY[cls]
    path = _class_path(cls)
    if path in _REGISTRY:
        return _REGISTRY[path]
    for key, spec in _REGISTRY.items():
        if isinstance(key, str):
            try:
                if _import_class(key) is cls:
                    return spec
            except (ImportError, AttributeError):
                continue
    known = sorted(k if isinstance(k, str) else _class_path(k) for k in _REGISTRY)
    raise NoTwinRegisteredError(
        f"no Flax twin registered for {path}; register one with bridge.register_twin (registered: {known})"
    )


def _gpt_vla_twin(model_config: dict[str, Any]) -> tuple[Any, Any]:
    """Built-in twin of bridge.vla_models.GPTVLAModel."""
    from jaxrl_vla.models.vla import GPTVLAModel, VLAModelConfig, dummy_obs

    cfg = VLAModelConfig.from_dict(model_config)
    return GPTVLAModel(cfg), dummy_obs(cfg, batch=1)


register_twin("bridge.vla_models.gpt_vla.GPTVLAModel", _gpt_vla_twin, value_head=("value_fc", "value_out"))

# The seed's configs name the class "vla_models.GPTVLAModel"; used only if no such module exists.
_CLASS_ALIASES = {"vla_models.GPTVLAModel": "bridge.vla_models.GPTVLAModel"}


# ----------------------------------------------------------------------------- class, file, model


def _import_class(path: str) -> Any:
    module_name, _, attr = path.rpartition(".")
    return getattr(importlib.import_module(module_name), attr)


def resolve_model_class(model_class: str | type) -> type:
    """The torch.nn.Module subclass named by "package.module.Class" (or given directly)."""
    if isinstance(model_class, type):
        cls = model_class
    else:
        module_name, _, attr = str(model_class).rpartition(".")
        if not module_name or not attr:
            raise UnknownModelClassError(f"model_class must look like 'package.module.Class', got {model_class!r}")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            missing_is_target = err.name is not None and (module_name + ".").startswith(err.name + ".")
            if not missing_is_target:
                raise  # the module exists but one of its own imports failed: show that error
            if model_class in _CLASS_ALIASES:
                return resolve_model_class(_CLASS_ALIASES[model_class])
            raise UnknownModelClassError(
                f"model_class {model_class!r}: cannot import module {module_name!r} (no module named {err.name!r})"
            ) from err
        if not hasattr(module, attr):
            raise UnknownModelClassError(
                f"model_class {model_class!r}: module {module_name!r} has no attribute {attr!r}"
            )
        cls = getattr(module, attr)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise UnknownModelClassError(f"model_class {model_class!r} is not a torch.nn.Module subclass")
    return cls


_PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


def read_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state_dict from .safetensors, or .pt/.pth/.bin/.ckpt read with `torch.load(weights_only=True)`.

    A pickle that needs anything beyond tensors and containers (a pickled
    module, an object with a custom `__reduce__`) is refused before any of its
    code runs. A {"state_dict": ...} / {"model_state_dict": ...} wrapper is unwrapped.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointNotFoundError(f"checkpoint not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        obj: Any = _readable(read_safetensors, path)
    elif suffix in _PICKLE_SUFFIXES:
        obj = _readable(_torch_load_weights, path)
    else:
        raise UnsupportedCheckpointError(
            f"{path}: unknown checkpoint format {suffix!r}; use .safetensors or one of {_PICKLE_SUFFIXES}"
        )
    return _unwrap_state_dict(obj, path)


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Read a .safetensors file into 64-byte-aligned tensors, one plain read each.

    Why not `safetensors.torch.load_file`: it returns views of a memory map at
    the file's own offsets, which are not 64-byte aligned, so JAX's DLPack
    import copies every tensor while the mapped pages stay resident: about 2x
    the checkpoint in peak memory (measured in benchmarks/vla_convert.py).
    Aligned buffers let DLPack share them: about 1.1x.
    """
    from bridge.convert import aligned_empty

    tensors: dict[str, torch.Tensor] = {}
    size = path.stat().st_size
    if size == 0:
        raise CorruptCheckpointError(f"{path} is empty (0 bytes): not a checkpoint (an interrupted save?)")
    with open(path, "rb", buffering=0) as f:
        header_len = int.from_bytes(f.read(8), "little")
        if not 2 <= header_len <= size - 8:
            raise NotACheckpointError(f"{path}: not a safetensors file (bad header length {header_len})")
        try:
            header = json.loads(f.read(header_len))
        except ValueError as err:
            raise NotACheckpointError(f"{path}: not a safetensors file (header is not JSON: {err})") from None
        if not isinstance(header, dict):
            raise NotACheckpointError(
                f"{path}: not a safetensors file (its header is a JSON {type(header).__name__}, not an object)"
            )
        base = 8 + header_len
        for key, info in header.items():
            if key == "__metadata__":
                continue
            dtype, shape, (begin, end) = _safetensors_entry(path, key, info, size - base)
            buf = aligned_empty((end - begin,), torch.uint8)
            view, done = memoryview(buf.numpy()), 0
            f.seek(base + begin)
            while done < end - begin:
                got = f.readinto(view[done:])
                if not got:
                    raise UnsupportedCheckpointError(f"{path}: file ends inside tensor {key!r}")
                done += got
            tensors[key] = buf.view(dtype).reshape(shape)
    return tensors


def _safetensors_entry(path: Path, key: str, info: Any, data_size: int) -> tuple[torch.dtype, list[int], list[int]]:
    """(dtype, shape, [begin, end]) of one header entry, checked against the file before any byte is read.

    The safetensors format promises nothing about a file it did not write, so each
    field is validated here: a wrong one would otherwise surface as a KeyError or a
    reshape error from deep inside torch, naming neither the file nor the tensor.
    """
    where = f"{path}: tensor {key!r}"
    if not isinstance(info, dict):
        raise CorruptCheckpointError(f"{where}: header entry is a JSON {type(info).__name__}, not an object")
    if info.get("dtype") not in _SAFETENSORS_DTYPES:
        raise UnsupportedCheckpointError(f"{where} has unsupported dtype {info.get('dtype')!r}")
    dtype = _SAFETENSORS_DTYPES[info["dtype"]]
    offsets, shape = info.get("data_offsets"), info.get("shape")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
        raise CorruptCheckpointError(f"{where}: header entry lacks data_offsets [begin, end] (got {offsets!r})")
    if not (isinstance(shape, list) and all(_is_count(d) for d in shape)):
        raise CorruptCheckpointError(f"{where}: header entry lacks a shape (a list of sizes; got {shape!r})")
    begin, end = offsets
    if not begin <= end <= data_size:
        raise CorruptCheckpointError(
            f"{where} lies outside the file (bytes {begin}..{end} of a {data_size}-byte data section: truncated?)"
        )
    needed = math.prod(shape) * torch.empty((), dtype=dtype).element_size()  # exact: no int64 overflow
    if needed != end - begin:
        raise CorruptCheckpointError(
            f"{where}: shape {shape} of {info['dtype']} needs {needed} bytes, but its data_offsets span {end - begin}"
        )
    return dtype, shape, offsets


def _is_count(value: Any) -> bool:
    """A non-negative JSON integer (booleans are not sizes)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _readable(reader: Callable[[Path], Any], path: Path) -> Any:
    """`reader(path)`, with an operating-system error (permissions, a vanished file, EIO) as one named line."""
    try:
        return reader(path)
    except OSError as err:
        raise CheckpointReadError(f"cannot read checkpoint {path}: {err.strerror or err}") from None


# How a file torch.save wrote begins: a zip archive (torch >= 1.6), or the legacy format's pickled magic
# number (protocol 2, LONG1 of 10 bytes).
_ZIP_MAGIC = b"PK\x03\x04"
_LEGACY_TORCH_MAGIC = b"\x80\x02\x8a\x0a"
_REFUSED_GLOBAL = re.compile(r"GLOBAL\s+[\w.]+")


def _torch_load_weights(path: Path) -> Any:
    """`torch.load(weights_only=True)`, with each way a file can fail told apart in one line.

    A refused *global* means the file is a real pickle asking to import code: that is
    the unsafe case, reported with torch's line naming the global. Anything else the
    weights-only reader stops at (an unknown opcode in random bytes, a truncated
    archive) says the file is damaged or not a checkpoint at all; calling it "unsafe"
    would send the user looking for the wrong problem.
    """
    size = path.stat().st_size
    if size == 0:
        raise CorruptCheckpointError(f"{path} is empty (0 bytes): not a checkpoint (an interrupted save?)")
    with open(path, "rb") as f:
        head = f.read(len(_ZIP_MAGIC))
    kind = ("a torch.save zip archive" if head == _ZIP_MAGIC else
            "a legacy torch.save file" if head == _LEGACY_TORCH_MAGIC else None)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        refused = _unpickler_reason(err)
        if refused is not None:
            raise UnsafeCheckpointError(
                f"refusing {path}: it is a pickle that needs more than weights (loading it could run code). "
                f"Save a plain state_dict (torch.save(model.state_dict(), ...)) or a .safetensors file. "
                f"({refused})"
            ) from None
        reason = _first_line(err, skip="Weights only load failed")
        if kind is not None:
            raise CorruptCheckpointError(f"{path}: {kind} that cannot be read (truncated or damaged?): {reason}") from None
        raise NotACheckpointError(
            f"{path} is not a torch checkpoint: neither a torch.save zip archive nor a pickle of tensors "
            f"(it starts with bytes {head.hex(' ')}; the weights-only reader stopped at: {reason})"
        ) from None
    except OSError:
        raise  # the file could not be read at all: read_checkpoint names that
    except Exception as err:  # EOFError, RuntimeError (zip reader), KeyError, ... from a damaged or foreign file
        reason = _first_line(err)
        if kind is not None:
            raise CorruptCheckpointError(f"{path}: {kind} that cannot be read (truncated or damaged?): {reason}") from None
        raise NotACheckpointError(
            f"{path} is not a torch checkpoint: neither a torch.save zip archive nor a pickle of tensors "
            f"(it starts with bytes {head.hex(' ')}; torch.load: {type(err).__name__}: {reason})"
        ) from None


def _first_line(err: BaseException, skip: str | None = None) -> str:
    """The first informative line of an exception's message (ANSI colours removed), cut at its first sentence."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(err).splitlines()]
    lines = [line.removeprefix("Please file an issue with the following so that we can make `weights_only=True` "
                               "compatible with your use case:").strip() for line in lines]
    lines = [line for line in lines if line and line != "WeightsUnpickler error:" and not (skip and line.startswith(skip))
             and not line.startswith("Check the documentation")]
    line = lines[0] if lines else repr(err)
    return line.split(". This is an internal")[0].split(". Please use")[0]


def _unpickler_reason(err: Exception) -> str | None:
    """The line of torch's weights-only refusal that names the refused global (e.g. posix.system), or None
    when the refusal names no global (the bytes are not a pickle that imports anything)."""
    for line in str(err).splitlines():
        line = re.sub(r"\x1b\[[0-9;]*m", "", line).strip()
        if _REFUSED_GLOBAL.search(line):
            return line.split("WeightsUnpickler error:")[-1].strip().split(". Please use")[0]
    return None


def _unwrap_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """The flat {key: tensor} inside a loaded checkpoint object."""
    if isinstance(obj, Mapping) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in ("state_dict", "model_state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                return _unwrap_state_dict(obj[key], path)
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UnsupportedCheckpointError(f"{path} does not hold a state_dict (a mapping of names to tensors)")
    return {str(k): v for k, v in obj.items()}


def _build_torch_model(spec: TwinSpec, cls: type, model_config: dict[str, Any]) -> nn.Module:
    """The torch model without allocating or initialising weights (meta device), if it allows."""
    try:
        with torch.device("meta"):
            return spec.torch_factory(cls, model_config)
    except Exception:  # constructors that compute on tensor values; a real error repeats below
        return spec.torch_factory(cls, model_config)


def check_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state_dict` completed for `model` (ignored leaves filled), or a named error.

    Extra keys, missing keys and shape mismatches are reported with the keys
    (and both shapes) before torch sees them.
    """
    expected = model.state_dict()
    _, ignored = conversion_plan(model)
    sd = {k: v for k, v in state_dict.items() if not (k not in expected and _LEGACY_KEY.search(k))}
    for key in ignored - set(sd):
        sd[key] = torch.zeros(expected[key].shape, dtype=expected[key].dtype)
    unexpected, missing = sorted(set(sd) - set(expected)), sorted(set(expected) - set(sd))
    name = type(model).__name__
    if unexpected:
        extra = f"; the model also lacks {missing}" if missing else ""
        raise UnexpectedKeysError(f"checkpoint keys that no parameter of {name} consumes: {unexpected}{extra}")
    if missing:
        raise MissingKeysError(f"parameters of {name} that the checkpoint does not fill: {missing}")
    mismatched = [
        f"{key!r}: checkpoint shape {tuple(sd[key].shape)} vs model shape {tuple(template.shape)}"
        for key, template in expected.items()
        if tuple(sd[key].shape) != tuple(template.shape)
    ]
    if mismatched:
        raise ShapeMismatchError("; ".join(mismatched))
    wrong_kind = [
        f"{key!r}: checkpoint dtype {str(sd[key].dtype).removeprefix('torch.')} vs model dtype "
        f"{str(template.dtype).removeprefix('torch.')}"
        for key, template in expected.items()
        if _dtype_kind(sd[key].dtype) != _dtype_kind(template.dtype)
    ]
    if wrong_kind:  # an int tensor would be assigned as is and train as integers (or fail deep in XLA)
        raise DtypeMismatchError("tensors of the wrong kind (floating vs integer vs bool): " + "; ".join(wrong_kind))
    return sd


def _dtype_kind(dtype: torch.dtype) -> str:
    """"float", "complex", "bool" or "int": precision may differ between checkpoint and model, the kind not."""
    if dtype.is_floating_point:
        return "float"
    if dtype.is_complex:
        return "complex"
    return "bool" if dtype == torch.bool else "int"


def check_finite(state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike) -> None:
    """NonFiniteWeightsError naming the first tensor (in checkpoint order) that holds NaN or infinity.

    Such a checkpoint loads and then trains every loss to NaN while the run "succeeds";
    refusing it at load names the culprit instead. Checked in slices so that a large
    tensor does not need a second full-size boolean copy.
    """
    for key, tensor in state_dict.items():
        if not (tensor.dtype.is_floating_point or tensor.dtype.is_complex) or tensor.device.type == "meta":
            continue
        flat = tensor.reshape(-1)
        for start in range(0, flat.numel(), 1 << 22):
            chunk = flat[start:start + (1 << 22)]
            finite = torch.isfinite(chunk)
            if not bool(finite.all()):
                bad = chunk[~finite][0].item()
                count = int((~torch.isfinite(flat)).sum())
                raise NonFiniteWeightsError(
                    f"{path}: tensor {key!r} holds non-finite weights ({count} of {flat.numel()} entries, e.g. {bad}); "
                    f"refusing a checkpoint that would train to NaN"
                )


def _abstract_variables(module: Any, example_input: Any) -> Variables:
    """The twin's variable shapes (no computation, no memory)."""
    return jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), example_input))


def check_against_twin(variables: Variables, abstract: Variables) -> None:
    """Every twin variable filled with the right shape, and no converted leaf left over."""
    got, want = _flatten(variables), _flatten(abstract)
    missing = sorted("/".join(p) for p in want if p not in got)
    if missing:
        raise MissingKeysError(f"Flax parameters of the twin that nothing filled: {missing}")
    extra = sorted("/".join(p) for p in got if p not in want)
    if extra:
        raise UnexpectedKeysError(f"converted tensors that the Flax twin has no parameter for: {extra}")
    mismatched = [
        f"Flax parameter {'/'.join(path)!r}: converted shape {tuple(got[path].shape)} vs twin shape "
        f"{tuple(want[path].shape)}"
        for path in sorted(got)
        if tuple(got[path].shape) != tuple(want[path].shape)
    ]
    if mismatched:
        raise ShapeMismatchError("; ".join(mismatched))


def load_vla_model(
    model_path: str | os.PathLike,
    model_class: str | type,
    model_config: Mapping[str, Any] | None = None,
    *,
    param_dtype: Any = None,
    value_head_optional: bool = False,
) -> tuple[Any, Variables]:
    """Load a torch VLA checkpoint as (Flax twin module, Flax variables).

    The checkpoint is first loaded into the torch class (strictly, built on the
    meta device so no weights are initialised) so it is validated against the
    model its authors ship, then every tensor is converted into the twin and the
    result checked against the twin's own variable shapes. `param_dtype`
    (e.g. jnp.float32) casts floating leaves; None keeps the checkpoint's dtypes.
    The returned arrays are JAX-owned (not views of torch memory), so a trainer
    may donate them.

    `value_head_optional` (critic-free training, GRPO): a checkpoint that lacks the
    twin's value head (`register_twin(value_head=...)`) loads, with the twin's own
    fresh initialisation in its place; all of it or none of it must be there.
    """
    config = dict(model_config or {})
    cls = resolve_model_class(model_class)
    spec = find_twin(cls)
    state_dict = read_checkpoint(model_path)
    torch_model = _build_torch_model(spec, cls, config)
    absent_head = _absent_value_head(spec, torch_model, state_dict) if value_head_optional else []
    for key in absent_head:  # placeholders, replaced below by the twin's initialisation
        template = torch_model.state_dict()[key]
        state_dict = {**state_dict, key: torch.zeros(template.shape, dtype=template.dtype)}
    state_dict = check_state_dict(torch_model, state_dict)
    check_finite(state_dict, model_path)
    torch_model.load_state_dict(state_dict, strict=True, assign=True)
    plan = conversion_plan(torch_model)[0] if absent_head else {}
    variables = spec.convert_fn(torch_model, torch_model.state_dict())
    del torch_model, state_dict
    module, example_input = spec.flax_factory(config)
    check_against_twin(variables, _abstract_variables(module, example_input))
    if absent_head:
        fresh = module.init(jax.random.PRNGKey(0), example_input)
        for key in absent_head:
            target = plan[key]
            _set_in(variables, (target.collection,) + target.path,
                    _get_in(fresh, (target.collection,) + target.path))
    leaves, treedef = jax.tree_util.tree_flatten(variables)
    del variables
    return module, jax.tree_util.tree_unflatten(treedef, _owned_leaves(leaves, param_dtype))


def _absent_value_head(spec: TwinSpec, torch_model: nn.Module, state_dict: Mapping[str, Any]) -> list[str]:
    """The value-head keys of `torch_model` that `state_dict` lacks: all of them or none (else a named error)."""
    if not spec.value_head:
        return []
    head = [k for k in torch_model.state_dict() if any(k.startswith(p + ".") for p in spec.value_head)]
    absent = [k for k in head if k not in state_dict]
    if absent and len(absent) != len(head):
        raise MissingKeysError(f"the checkpoint holds part of the value head ({sorted(set(head) - set(absent))}) "
                               f"but lacks {absent}: give all of it or none")
    return absent


def _owned_leaves(leaves: list, param_dtype: Any) -> list:
    """Replace DLPack-borrowed arrays by JAX-owned ones on the default device, one at a time.

    Borrowed arrays share torch's memory: donating them (the Trainer donates its
    state) would let XLA write into or free torch's buffers. Copying leaf by
    leaf and dropping each borrowed array at once keeps the peak near one
    checkpoint instead of two. Placing them on the default device matters on a
    GPU machine, or jitted calls would silently run on the host.
    """
    device = jax.devices()[0]
    for i, leaf in enumerate(leaves):
        if param_dtype is not None and jnp.issubdtype(leaf.dtype, jnp.floating):
            leaf = leaf.astype(param_dtype)
        leaves[i] = jnp.copy(jax.device_put(leaf, device))
        del leaf
        leaves[i].block_until_ready()  # the borrowed buffer is released before the next copy starts
    return leaves


def ignored_keys(model: nn.Module) -> set[str]:
    """State_dict keys of `model` that no twin holds (IGNORED_LEAVES, e.g. BatchNorm's num_batches_tracked)."""
    keys = set(model.state_dict())
    out: set[str] = set()
    for mod_path, module in model.named_modules(remove_duplicate=False):
        for leaf in _lookup(IGNORED_LEAVES, module) or ():
            key = f"{mod_path}.{leaf}" if mod_path else leaf
            if key in keys:
                out.add(key)
    return out


def _keep_ignored_leaves(
    model: nn.Module, state_dict: dict[str, torch.Tensor], source: str | os.PathLike | Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """`state_dict` with its ignored leaves taken from `source` where it has them (shape and dtype checked)."""
    reference = read_checkpoint(source) if isinstance(source, (str, os.PathLike)) else source
    out = dict(state_dict)
    for key in sorted(ignored_keys(model)):
        if key not in reference:  # a checkpoint saved without counters: torch's default, 0, stays
            continue
        kept, template = reference[key], out[key]
        if tuple(kept.shape) != tuple(template.shape) or _dtype_kind(kept.dtype) != _dtype_kind(template.dtype):
            raise ShapeMismatchError(
                f"source {key!r}: shape {tuple(kept.shape)} {kept.dtype} vs model {tuple(template.shape)} {template.dtype}"
            )
        out[key] = kept.detach().to(template.dtype).clone()
    return out


def _atomic_save_safetensors(state_dict: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Write to a temporary file beside `path`, then rename: readers never see a partial file."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(state_dict, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def export_to_torch(
    flax_variables: Variables,
    model_class: str | type,
    model_config: Mapping[str, Any] | None,
    path: str | os.PathLike,
    *,
    source: str | os.PathLike | Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Save Flax variables as a .safetensors state_dict that `model_class` loads with strict=True.

    `flax_variables` is {"params": ..., "batch_stats": ...} (a bare params tree
    is accepted too). The state_dict is checked by loading it into the torch
    class before anything is written; the write is atomic.

    `source`: the checkpoint the weights were loaded from (a path, or its state_dict).
    The tensors the twin does not hold (IGNORED_LEAVES: BatchNorm's
    num_batches_tracked) are copied from it, so load -> export is bit-exact for a
    trained BatchNorm too; the twins keep BatchNorm frozen, so the source's counters
    are still the right ones after fine-tuning. Without `source` they are written as 0.
    """
    config = dict(model_config or {})
    cls = resolve_model_class(model_class)
    spec = find_twin(cls)
    variables = dict(flax_variables)
    if "params" not in variables:
        variables = {"params": variables}
    torch_model = _build_torch_model(spec, cls, config)
    state_dict = spec.export_fn(torch_model, variables)
    if source is not None:
        state_dict = _keep_ignored_leaves(torch_model, state_dict, source)
    torch_model.load_state_dict(state_dict, strict=True, assign=True)
    path = Path(path)
    metadata = {"format": "pt", "model_class": _class_path(cls), "model_config": json.dumps(config, default=str)}
    _atomic_save_safetensors(state_dict, path, metadata)
    return path


# Twins of transformers' decoder language models (Llama, Qwen2, Gemma): rules and registrations.
import bridge.hf_families  # noqa: E402,F401  (after the names it imports from this module)
import bridge.hf_siglip  # noqa: E402,F401  (SigLIP vision tower twin)
