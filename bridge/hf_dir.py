"""Hugging Face model directories in and out, read shard by shard without torch.

A directory as `save_pretrained` leaves it: `config.json` plus either
`model.safetensors` or shards `model-0000k-of-0000n.safetensors` listed in
`model.safetensors.index.json` (`weight_map`: key -> shard file). The
architecture comes from config.json (`architectures[0]`, else `model_type`) and
picks an entry of a registry:

    from bridge.hf_dir import HFArchitecture, NameRule, register_hf_architecture

    register_hf_architecture("LlamaModel", HFArchitecture(
        factory=lambda cfg: (DecoderLM(DecoderConfig.from_hf_dict(cfg)), jnp.zeros((1, 1), jnp.int32)),
        rules=(NameRule(r"norm\\.weight$", "weight", "scale"), *LINEAR_EMBED_RULES),
        ignore_keys=(r"^lm_head\\.weight$",),   # optional: checkpoint keys the twin does not hold
    ))

The name map needs no torch module tree: an HF key `a.b.3.c.weight` names the
Flax module path `a/b_3/c` (list indices folded in, as `flax_module_path`
does) and the first `NameRule` whose regex matches the *whole key* says which
Flax leaf the tensor `weight` becomes and how its layout changes (Linear
[out, in] -> Dense kernel [in, out], Conv2d OIHW -> HWIO). Export inverts it:
a Flax leaf `a/b_3/c/kernel` goes back to `a.b.3.c.<hf leaf>` by the first rule
with that Flax leaf name whose regex matches the rebuilt key (and which is the
first rule for that key). `strip_prefixes` drops key prefixes older
checkpoints carry (SigLIP's `vision_model.`); `renames` / `save_renames` map an
on-disk layout that differs from the module tree (PaliGemma's
`language_model.model.*`) both ways; `tied_head_key` is the head transformers
leaves off the disk when `is_tied(config)`.

Registered: SiglipVisionModel, {Llama,Qwen2,Gemma}{Model,ForCausalLM},
SmolVLM{Model,ForConditionalGeneration}, Idefics3{...} (SmolVLM's twin), PaliGemma{Model,ForConditionalGeneration}.

Memory. Tensors are read one at a time straight from the file into a numpy
buffer (bf16 as `ml_dtypes.bfloat16`, which numpy lacks natively), changed in
layout, handed to JAX and dropped, so the peak beyond the final weights is
about one tensor (benchmarks/hf_convert.py measures it). Export writes the same
layout into a temporary sibling directory and renames it into place: a
reader never sees a half-written directory.

Nothing is downloaded: a path that does not exist but looks like a hub id
(`org/name`) is an error that says to download it first.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxrl_vla.config import ConfigError

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

# ----------------------------------------------------------------------------- errors


class HFDirError(ConfigError):
    """A model directory that cannot become a Flax twin (a ConfigError: the CLI exits 2)."""


class UnsupportedArchitectureError(HFDirError):
    """config.json names an architecture with no registered twin."""


class MissingShardError(HFDirError):
    """The index names a shard file that is not in the directory."""


class TensorShapeError(HFDirError):
    """A checkpoint tensor whose shape differs from the twin's parameter."""


class TensorKeyError(HFDirError):
    """Checkpoint keys the twin has no place for, or twin parameters the checkpoint lacks."""


# ----------------------------------------------------------------------------- name map

Layout = Callable[[np.ndarray], np.ndarray]


def _same(a: np.ndarray) -> np.ndarray:
    return a


def _t2d(a: np.ndarray) -> np.ndarray:
    return a.T


def _oihw_to_hwio(a: np.ndarray) -> np.ndarray:
    return a.transpose(2, 3, 1, 0)


def _hwio_to_oihw(a: np.ndarray) -> np.ndarray:
    return a.transpose(3, 2, 0, 1)


@dataclasses.dataclass(frozen=True)
class NameRule:
    """Keys matching `pattern` (re.search on the whole HF key) whose last part is `hf_leaf` become `flax_leaf`."""

    pattern: str
    hf_leaf: str
    flax_leaf: str
    to_flax: Layout = _same
    to_hf: Layout = _same
    collection: str = "params"

    def matches(self, key: str) -> bool:
        return key.rsplit(".", 1)[-1] == self.hf_leaf and re.search(self.pattern, key) is not None


# The torch module types of the rule table, as name rules: Linear, Conv2d, LayerNorm, Embedding.
def linear_rules(pattern: str = r"") -> tuple[NameRule, ...]:
    return (NameRule(pattern, "weight", "kernel", _t2d, _t2d), NameRule(pattern, "bias", "bias"))


def conv_rules(pattern: str) -> tuple[NameRule, ...]:
    return (NameRule(pattern, "weight", "kernel", _oihw_to_hwio, _hwio_to_oihw), NameRule(pattern, "bias", "bias"))


def norm_rules(pattern: str) -> tuple[NameRule, ...]:
    return (NameRule(pattern, "weight", "scale"), NameRule(pattern, "bias", "bias"))


def embedding_rules(pattern: str) -> tuple[NameRule, ...]:
    return (NameRule(pattern, "weight", "embedding"),)


def _module_path(hf_module: str) -> tuple[str, ...]:
    out: list[str] = []
    for part in hf_module.split(".") if hf_module else []:
        if part.isdigit() and out:
            out[-1] = f"{out[-1]}_{part}"
        else:
            out.append(part)
    return tuple(out)


def _hf_module(path: tuple[str, ...]) -> str:
    return ".".join(re.sub(r"_(\d+)$", r".\1", p) for p in path)


@dataclasses.dataclass(frozen=True)
class HFArchitecture:
    """How one `architectures` entry becomes a twin: factory(config dict) -> (module, example input), names."""

    factory: Callable[[dict[str, Any]], tuple[Any, Any]]
    rules: tuple[NameRule, ...]
    strip_prefixes: tuple[str, ...] = ()
    ignore_keys: tuple[str, ...] = ()
    # (regex, replacement) applied once each, in order, to every key read: the on-disk layout
    # (PaliGemma's `language_model.model.`, what transformers writes) mapped onto the module tree.
    renames: tuple[tuple[str, str], ...] = ()
    # The same on export, module tree -> on-disk layout (so the directory matches save_pretrained's).
    save_renames: tuple[tuple[str, str], ...] = ()
    # A tied output head: its HF key, absent on disk (save_pretrained drops it) and skipped if present,
    # when `is_tied(config)`; the twin holds the embedding once.
    tied_head_key: str | None = None
    is_tied: Callable[[Mapping[str, Any]], bool] = lambda config: False

    def rule_for(self, key: str) -> NameRule | None:
        return next((r for r in self.rules if r.matches(key)), None)

    def flax_target(self, key: str) -> tuple[tuple[str, ...], NameRule] | None:
        """(collection + Flax path, rule) of an HF key (prefix already stripped), or None."""
        rule = self.rule_for(key)
        if rule is None:
            return None
        module, _, _ = key.rpartition(".")
        return (rule.collection,) + _module_path(module) + (rule.flax_leaf,), rule

    def hf_key(self, flax_path: tuple[str, ...]) -> tuple[str, NameRule]:
        """The HF key and rule of a Flax leaf (collection first): the inverse of `flax_target`."""
        collection, *module, leaf = flax_path
        for rule in self.rules:
            if rule.flax_leaf != leaf or rule.collection != collection:
                continue
            key = ".".join(p for p in (_hf_module(tuple(module)), rule.hf_leaf) if p)
            if self.rule_for(key) is rule:
                return key, rule
        raise TensorKeyError(f"Flax variable {'/'.join(flax_path)!r} has no Hugging Face name in this architecture")


_ARCHITECTURES: dict[str, HFArchitecture] = {}


def register_hf_architecture(name: str, arch: HFArchitecture) -> None:
    """Map a config.json `architectures` name (or a `model_type`) to its twin; a second call replaces it."""
    _ARCHITECTURES[name] = arch


def supported_architectures() -> list[str]:
    return sorted(_ARCHITECTURES)


# ----------------------------------------------------------------------------- reading

_DTYPES: dict[str, Any] = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": jnp.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}  # fmt: skip
_DTYPE_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}


def resolve_dir(path: str | os.PathLike) -> Path:
    """The directory, or an error that says what was expected (never downloads)."""
    p = Path(path)
    if not p.exists():
        if _HUB_ID.match(str(path)) and not str(path).startswith(("./", "../")):
            raise HFDirError(
                f"{path!r} is not a directory here; it looks like a Hugging Face hub id. Nothing is downloaded: "
                f"download it first (huggingface-cli download {path} --local-dir DIR) and pass DIR"
            )
        raise HFDirError(f"model directory {p} does not exist")
    if not p.is_dir():
        raise HFDirError(f"{p} is not a directory: expected a Hugging Face model directory ({CONFIG_FILE} + safetensors)")
    if not (p / CONFIG_FILE).is_file():
        raise HFDirError(
            f"{p} has no {CONFIG_FILE}: expected a Hugging Face model directory with {CONFIG_FILE} and "
            f"{SINGLE_FILE} (or shards listed in {INDEX_FILE})"
        )
    return p


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    p = resolve_dir(path) / CONFIG_FILE
    try:
        config = json.loads(p.read_text())
    except ValueError as err:
        raise HFDirError(f"{p}: not JSON ({err})") from None
    if not isinstance(config, dict):
        raise HFDirError(f"{p}: expected a JSON object")
    return config


def architecture_of(config: Mapping[str, Any]) -> tuple[str, HFArchitecture]:
    """The registered (name, architecture) config.json names (`architectures` first, then `model_type`)."""
    names = list(config.get("architectures") or []) + [config.get("model_type")]
    for name in names:
        if name in _ARCHITECTURES:
            return name, _ARCHITECTURES[name]
    shown = [n for n in names if n]
    raise UnsupportedArchitectureError(
        f"config.json architecture {shown} has no Flax twin; supported: {supported_architectures()}"
    )


def shard_files(path: str | os.PathLike) -> list[Path]:
    """The safetensors files of a directory, in index order; a shard the index names but the dir lacks is named."""
    d = resolve_dir(path)
    index = d / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as err:
            raise HFDirError(f"{index}: not a safetensors index with a weight_map ({err!r})") from None
        files = list(dict.fromkeys(weight_map.values()))
        missing = [f for f in files if not (d / f).is_file()]
        if missing:
            raise MissingShardError(f"{index} lists shard(s) missing from {d}: {missing}")
        return [d / f for f in files]
    if (d / SINGLE_FILE).is_file():
        return [d / SINGLE_FILE]
    raise HFDirError(f"{d} has neither {SINGLE_FILE} nor {INDEX_FILE}")


def _header(f: Any, path: Path) -> tuple[dict[str, Any], int]:
    size = path.stat().st_size
    n = int.from_bytes(f.read(8), "little")
    if not 2 <= n <= size - 8:
        raise HFDirError(f"{path}: not a safetensors file (bad header length {n})")
    try:
        header = json.loads(f.read(n))
    except ValueError as err:
        raise HFDirError(f"{path}: not a safetensors file ({err})") from None
    header.pop("__metadata__", None)
    return header, 8 + n


def iter_safetensors(path: Path) -> Any:
    """Yield (key, numpy array) one tensor at a time, each read into its own buffer (no torch, no mmap)."""
    with open(path, "rb", buffering=0) as f:
        header, base = _header(f, path)
        for key, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            if info["dtype"] not in _DTYPES:
                raise HFDirError(f"{path}: tensor {key!r} has unsupported dtype {info['dtype']}")
            begin, end = info["data_offsets"]
            dtype = np.dtype(_DTYPES[info["dtype"]])
            shape = tuple(info["shape"])
            if end - begin != math.prod(shape) * dtype.itemsize:
                raise HFDirError(f"{path}: tensor {key!r} of shape {shape} {info['dtype']} has {end - begin} bytes")
            buf = np.empty(shape, dtype)
            f.seek(base + begin)
            if f.readinto(memoryview(buf.reshape(-1).view(np.uint8))) != end - begin:
                raise HFDirError(f"{path}: truncated inside tensor {key!r}")
            yield key, buf


def _set_in(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for part in path[:-1]:
        tree = tree.setdefault(part, {})
    tree[path[-1]] = value


def _flatten(tree: Mapping, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    out: dict[tuple[str, ...], Any] = {}
    for k, v in tree.items():
        out.update(_flatten(v, prefix + (k,)) if isinstance(v, Mapping) else {prefix + (k,): v})
    return out


def load_hf_dir(path: str | os.PathLike, *, param_dtype: Any = None) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """(Flax twin, variables, config dict) from a Hugging Face model directory.

    Every checkpoint tensor must fill a twin parameter of the same shape and
    every parameter must be filled (the errors name the key and both shapes).
    `param_dtype` casts floating leaves (None keeps the stored dtypes).
    """
    config = read_config(path)
    name, arch = architecture_of(config)
    module, example = arch.factory(config)
    abstract = _flatten(jax.eval_shape(module.init, jax.random.PRNGKey(0), example))
    ignore = [re.compile(p) for p in arch.ignore_keys]
    tied = arch.tied_head_key is not None and arch.is_tied(config)
    variables: dict[str, Any] = {}
    filled: set[tuple[str, ...]] = set()
    unexpected: list[str] = []
    for shard in shard_files(path):
        for raw_key, array in iter_safetensors(shard):
            key = raw_key
            for prefix in arch.strip_prefixes:
                if key.startswith(prefix):
                    key = key[len(prefix) :]
            for pattern, replacement in arch.renames:
                key = re.sub(pattern, replacement, key, count=1)
            if any(p.search(key) for p in ignore) or (tied and key == arch.tied_head_key):
                continue
            target = arch.flax_target(key)
            if target is None or target[0] not in abstract:
                unexpected.append(raw_key)
                continue
            flax_path, rule = target
            value = rule.to_flax(array)
            want = abstract[flax_path]
            if tuple(value.shape) != tuple(want.shape):
                raise TensorShapeError(
                    f"{shard.name}: tensor {raw_key!r} has shape {tuple(array.shape)} (as Flax {tuple(value.shape)}), "
                    f"the {name} twin's {'/'.join(flax_path)} needs {tuple(want.shape)}"
                )
            if param_dtype is not None and jnp.issubdtype(value.dtype, jnp.floating):
                value = value.astype(param_dtype)
            _set_in(variables, flax_path, jnp.asarray(value))
            filled.add(flax_path)
            del array, value
    if unexpected:
        raise TensorKeyError(f"{path}: tensors the {name} twin has no place for: {sorted(unexpected)}")
    missing = sorted("/".join(p) for p in abstract if p not in filled)
    if missing:
        raise TensorKeyError(f"{path}: the {name} twin's parameters missing from the checkpoint: {missing}")
    return module, variables, config


# ----------------------------------------------------------------------------- writing


def _safetensors_bytes(tensors: list[tuple[str, np.ndarray]]) -> tuple[bytes, int]:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key, a in tensors:
        header[key] = {"dtype": _DTYPE_NAMES[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw, offset


def _write_shard(path: Path, tensors: list[tuple[str, np.ndarray]]) -> None:
    head, _ = _safetensors_bytes(tensors)
    with open(path, "wb") as f:
        f.write(head)
        for _, a in tensors:
            f.write(memoryview(np.ascontiguousarray(a).reshape(-1).view(np.uint8)))
        f.flush()
        os.fsync(f.fileno())


def _hf_tensors(arch: HFArchitecture, variables: Mapping[str, Any], prefix: str) -> list[tuple[str, Any, NameRule]]:
    out = []
    for flax_path, leaf in _flatten(variables).items():
        key, rule = arch.hf_key(flax_path)
        for pattern, replacement in arch.save_renames:
            key = re.sub(pattern, replacement, key, count=1)
        out.append((prefix + key, leaf, rule))
    return sorted(out, key=lambda t: t[0])


def save_hf_dir(
    path: str | os.PathLike,
    config: Mapping[str, Any],
    variables: Mapping[str, Any],
    *,
    max_shard_bytes: int = 5 * 2**30,
    overwrite: bool = False,
    key_prefix: str = "",
) -> Path:
    """Write config.json and the weights as `save_pretrained` lays them out, atomically.

    Shards hold at most `max_shard_bytes` (a larger single tensor gets its own
    shard); more than one shard adds model.safetensors.index.json with
    `weight_map` and `metadata.total_size`. The directory is built beside its
    target and renamed into place, so it is whole or absent.
    """
    target = Path(path)
    if target.exists() and not overwrite:
        raise HFDirError(f"{target} exists; pass overwrite=True to replace it")
    _, arch = architecture_of(config)
    entries = _hf_tensors(arch, variables, key_prefix)
    shards: list[list[tuple[str, Any, NameRule]]] = [[]]
    size = 0
    for entry in entries:
        n = int(np.prod(entry[1].shape)) * np.dtype(entry[1].dtype).itemsize
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += n
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        (tmp / CONFIG_FILE).write_text(json.dumps(dict(config), indent=2, sort_keys=True, default=str) + "\n")
        weight_map: dict[str, str] = {}
        total = 0
        for i, shard in enumerate(shards, 1):
            name = SINGLE_FILE if len(shards) == 1 else f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            arrays = [(key, np.ascontiguousarray(rule.to_hf(np.asarray(jax.device_get(leaf))))) for key, leaf, rule in shard]
            _write_shard(tmp / name, arrays)
            for key, a in arrays:
                weight_map[key] = name
                total += a.nbytes
            del arrays
        if len(shards) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.rename(target, old)
            os.rename(tmp, target)
            shutil.rmtree(old)
        else:
            os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


# ----------------------------------------------------------------------------- SigLIP


def _siglip_factory(config: dict[str, Any]) -> tuple[Any, Any]:
    from jaxrl_vla.models.vla.siglip import SiglipVisionConfig, SiglipVisionModel, dummy_pixels

    cfg = SiglipVisionConfig.from_hf_dict(config)
    return SiglipVisionModel(cfg), dummy_pixels(cfg)


SIGLIP_RULES: tuple[NameRule, ...] = (
    *conv_rules(r"patch_embedding\.\w+$"),
    *embedding_rules(r"position_embedding\.weight$"),
    *norm_rules(r"(layer_norm\d|post_layernorm|layernorm)\.\w+$"),
    NameRule(r"attention\.in_proj_weight$", "in_proj_weight", "in_proj_kernel", _t2d, _t2d),
    NameRule(r"attention\.in_proj_bias$", "in_proj_bias", "in_proj_bias"),
    NameRule(r"(^|\.)probe$", "probe", "probe"),
    *linear_rules(r"(_proj|fc\d)\.\w+$"),
)

register_hf_architecture(
    "SiglipVisionModel", HFArchitecture(_siglip_factory, SIGLIP_RULES, strip_prefixes=("vision_model.",))
)


# ----------------------------------------------------------------------------- decoders and composite VLMs
#
# Name maps only: HF keys and the twins' Flax paths already agree module by module
# (`model.layers.3.self_attn.q_proj.weight` <-> `model/layers_3/self_attn/q_proj/kernel`), so each
# architecture is its factory, the leaf rules of the module types it holds, and its tied head.

DECODER_RULES: tuple[NameRule, ...] = (
    *embedding_rules(r"embed_tokens\.weight$"),
    NameRule(r"((^|\.)norm|layernorm)\.weight$", "weight", "scale"),  # RMSNorm weight -> scale
    *linear_rules(r"(_proj|(^|\.)lm_head)\.\w+$"),
)
# SigLIP tower + decoder + the connector / projector Linears (SmolVLM `modality_projection.proj`,
# PaliGemma `multi_modal_projector.linear`).
VLM_RULES: tuple[NameRule, ...] = (
    *SIGLIP_RULES,
    *DECODER_RULES,
    *linear_rules(r"(modality_projection\.proj|multi_modal_projector\.linear)\.\w+$"),
)


def _decoder_factory(causal_lm: bool) -> Callable[[dict[str, Any]], tuple[Any, Any]]:
    def factory(config: dict[str, Any]) -> tuple[Any, Any]:
        from jaxrl_vla.models.vla.llama import DecoderConfig, DecoderForCausalLM, DecoderLM

        cls = DecoderForCausalLM if causal_lm else DecoderLM
        return cls(DecoderConfig.from_hf_dict(config)), jnp.zeros((1, 1), jnp.int32)

    return factory


def _vlm_factory(family: str, conditional: bool) -> Callable[[dict[str, Any]], tuple[Any, Any]]:
    def factory(config: dict[str, Any]) -> tuple[Any, Any]:
        if family == "smolvlm":
            from jaxrl_vla.models.vla import smolvlm as mod

            cfg, base = mod.SmolVLMConfig.from_hf_dict(config), mod.SmolVLMModel
            top = mod.SmolVLMForConditionalGeneration
        else:
            from jaxrl_vla.models.vla import paligemma as mod

            cfg, base = mod.PaliGemmaConfig.from_hf_dict(config), mod.PaliGemmaModel
            top = mod.PaliGemmaForConditionalGeneration
        return (top if conditional else base)(cfg), jnp.zeros((1, 1), jnp.int32)

    return factory


def _tie_flag(default: bool) -> Callable[[Mapping[str, Any]], bool]:
    return lambda config: bool(config.get("tie_word_embeddings", default))


# architectures name -> (factory, tied by default). Decoders: the text config's own flag; composites:
# the top-level flag (transformers ties `lm_head` to the text embedding by it).
for _name, _tie_default in (("Llama", False), ("Qwen2", False), ("Gemma", True)):
    register_hf_architecture(f"{_name}Model", HFArchitecture(_decoder_factory(False), DECODER_RULES))
    register_hf_architecture(
        f"{_name}ForCausalLM",
        HFArchitecture(_decoder_factory(True), DECODER_RULES, tied_head_key="lm_head.weight",
                       is_tied=_tie_flag(_tie_default)),
    )

# PaliGemma on disk: transformers (4 and 5 alike) writes `language_model.model.*`, `language_model.lm_head`,
# `vision_tower.*` (transformers 4 also `vision_tower.vision_model.*`), `multi_modal_projector.*`, while the
# module tree (and the twin) nests them under `model.`.
_PALIGEMMA_READ = (
    (r"^language_model\.model\.", "model.language_model."),
    (r"^language_model\.lm_head\.", "lm_head."),
    (r"^vision_tower\.vision_model\.", "model.vision_tower."),
    (r"^vision_tower\.", "model.vision_tower."),
    (r"^multi_modal_projector\.", "model.multi_modal_projector."),
)
_PALIGEMMA_WRITE = (
    (r"^model\.language_model\.", "language_model.model."),
    (r"^lm_head\.", "language_model.lm_head."),
    (r"^model\.vision_tower\.", "vision_tower."),
    (r"^model\.multi_modal_projector\.", "multi_modal_projector."),
)
# (architecture, factory, read renames, write renames, tied by default or None for no head)
_VLM_ARCHITECTURES = (
    ("SmolVLMModel", _vlm_factory("smolvlm", False), (), (), None),
    ("SmolVLMForConditionalGeneration", _vlm_factory("smolvlm", True), (), (), False),
    ("Idefics3Model", _vlm_factory("smolvlm", False), (), (), None),  # SmolVLM's twin (same modules and forward)
    ("Idefics3ForConditionalGeneration", _vlm_factory("smolvlm", True), (), (), False),
    ("PaliGemmaModel", _vlm_factory("paligemma", False),
     ((r"^language_model\.model\.", "language_model."), (r"^vision_tower\.vision_model\.", "vision_tower.")),
     ((r"^language_model\.", "language_model.model."),), None),
    ("PaliGemmaForConditionalGeneration", _vlm_factory("paligemma", True), _PALIGEMMA_READ, _PALIGEMMA_WRITE, True),
)  # fmt: skip
for _arch, _factory, _read, _write, _tie_default in _VLM_ARCHITECTURES:
    _head = {} if _tie_default is None else dict(tied_head_key="lm_head.weight", is_tied=_tie_flag(_tie_default))
    register_hf_architecture(_arch, HFArchitecture(_factory, VLM_RULES, renames=_read, save_renames=_write, **_head))
