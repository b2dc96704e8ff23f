"""TensorDict <-> JAX pytree conversion with explicit copy accounting.

Why this module exists: a torch collector (TorchRL, a VLA's data pipeline) fills
TensorDicts, and the JAX learner wants a pytree of ``jax.Array``. DLPack can
hand the same memory from one to the other without a copy, but only under
conditions that JAX checks *silently* (an unaligned buffer is copied without a
word). Here every leaf either goes through DLPack zero-copy, or is copied
exactly once into a fresh 64-byte-aligned buffer, and every copy is counted in
a :class:`ConversionStats` with its key and reason. ``strict=True`` turns any
copy into an error, so a pipeline can assert that it is zero-copy.

What happens to each kind of leaf in :func:`td_to_jax` (CPU, jax 0.10, torch 2.13;
"zero-copy" means ``arr.unsafe_buffer_pointer() == t.data_ptr()``):

=====================  =============================================  ==========================
case                   what happens                                   counted as
=====================  =============================================  ==========================
bool, uint8, int8,     DLPack import, same memory                     ``zero_copy``
int16, int32, uint16,
uint32, float16,
bfloat16, float32,
complex64 (aligned,
compact layout)
int64                  one copy cast to ``int64=`` (default int32);   ``cast`` (strict: error)
                       a value outside int32 raises naming the key.
                       ``int64="int64"`` (needs jax_enable_x64) keeps
                       it and imports zero-copy
float64                one copy cast to ``float64=`` (default         ``cast`` (strict: error)
                       float32; out-of-range values become inf)
uint64, complex128     TypeError unless jax_enable_x64 (then          ``zero_copy``
                       zero-copy)
data_ptr % 64 != 0     one copy into an aligned buffer (JAX would     ``copied`` (strict: error)
(e.g. ``td[1:]`` of a  copy silently anyway)
batch, a row slice)
contiguous, or a       zero-copy: XLA accepts any permutation of a    ``zero_copy``
permutation (``.T``,   dense layout; size-1 dims may have any stride
channels_last)
strided / overlapping  one copy (DLPack import is refused)            ``copied`` (strict: error)
(``x[::2]``,
``x[:, 1:]``,
``expand``)
neg / conj bit set     one copy that resolves the bit (DLPack would   ``copied`` (strict: error)
                       export the raw, un-negated values)
requires_grad          ``.detach()`` (no copy, same memory)           ``zero_copy``
0-d tensor             like any other tensor (0-d slices of a         as above
                       bigger tensor are usually unaligned -> copy)
empty tensor           zero-copy (no data; data_ptr is 0)             ``zero_copy``
nested TensorDict /    nested dict with the same keys                 per leaf
nested dict
lazy-stacked           ``LazyStackedTensorDict`` materialises every   ``copied`` (strict: error)
TensorDict             leaf with ``torch.stack``; that is the one
                       copy, the stacked tensor is then imported
NonTensorData /        tokenised: ``{key: int32 ids [*batch, L],       ``tokenized``
NonTensorStack /       key + "_mask": bool [*batch, L]}``; no
str / list[str]        tokenizer -> ValueError naming the key
other non-tensor data  TypeError naming the key (or skipped when not   -
                       listed in ``language_keys``)
CUDA tensor, jax has   DLPack import onto the same GPU (torch's       ``zero_copy``
a GPU                  stream is synchronised by the protocol); if
                       XLA refuses (alignment, layout) one on-device
                       copy
CUDA / MPS tensor,     one device->host copy into an aligned CPU      ``copied`` (strict: error)
CPU-only jax           buffer, reason "device transfer ..."; chosen
                       over an error so that the stats/strict
                       mechanism is the single place to police copies
``copy=True``          every leaf copied once into an owned buffer    ``copied``
=====================  =============================================  ==========================

CPU tensors always become arrays on the JAX CPU device, even when JAX's
default backend is a GPU: the host->device transfer is then ``jax.device_put``'s
job, done once and explicitly by the caller.

Ownership. A zero-copy array *borrows* the torch tensor's memory (the DLPack
capsule keeps the storage alive, so it cannot dangle, but it can change).
JAX assumes arrays are immutable, so:

* pass ``copy=True`` to :func:`td_to_jax` when the producer reuses its storage:
  a collector writing each step into the same preallocated TensorDict, a
  replay/rollout buffer written in place, pinned staging buffers, anything
  whose tensors are modified after the call while the JAX array is still in
  use (e.g. held in a list of trajectories or used by an async dispatch);
* never donate a borrowed array (``jit(..., donate_argnums=...)``);
* :func:`jax_to_td` shares memory the other way: a torch in-place op on the
  result (``add_``, ``copy_``, optimizer steps) mutates the JAX array too.
  Use ``jax_to_td(..., copy=True)`` when torch will write into the result.

Measured facts this module relies on (re-verified on torch 2.13 CPU, jax 0.10.2):
``jax.dlpack.from_dlpack(t, copy=False)`` raises for unaligned and strided
tensors but *not* for int64/float64/uint64/complex128, which JAX converts to a
32-bit copy silently (hence the explicit cast path); ``copy=True`` is not
honoured on CPU (the result still shares memory); a tensor with the neg bit
is exported with wrong (un-negated) values; conj-bit and requires_grad tensors
are refused by torch's ``__dlpack__``.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import torch
from tensordict import LazyStackedTensorDict, TensorDict, TensorDictBase, is_non_tensor

__all__ = [
    "ALIGNMENT",
    "ConversionStats",
    "HFTokenizerAdapter",
    "LeafPlan",
    "Tokenizer",
    "aligned_empty",
    "is_aligned",
    "is_dlpack_compact",
    "jax_to_td",
    "plan_leaf",
    "td_to_jax",
]

ALIGNMENT = 64
"""Byte alignment XLA:CPU requires to alias an external buffer."""

# dtypes that JAX imports as-is without x64 (verified zero-copy when aligned).
_ZERO_COPY_DTYPES = frozenset(
    {
        torch.bool,
        torch.uint8,
        torch.int8,
        torch.int16,
        torch.int32,
        torch.uint16,
        torch.uint32,
        torch.float16,
        torch.bfloat16,
        torch.float32,
        torch.complex64,
    }
)
# 64-bit dtypes that JAX keeps only with jax_enable_x64.
_X64_DTYPES = frozenset({torch.int64, torch.float64, torch.uint64, torch.complex128})
_INT64_TARGETS = {"int32": torch.int32, "int64": torch.int64}
_FLOAT64_TARGETS = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1


# --------------------------------------------------------------------------- stats


@dataclass
class ConversionStats:
    """Counts of what :func:`td_to_jax` did, leaf by leaf.

    Every tensor leaf increments exactly one of ``zero_copy``, ``copied`` or
    ``cast`` (a cast is a copy that also changes the dtype); every text entry
    increments ``tokenized``. ``events`` holds one ``(key, reason)`` per copy,
    cast or skipped entry, so a pipeline can log *why* it is not zero-copy.
    The same object can be passed to several calls to accumulate.
    """

    zero_copy: int = 0
    copied: int = 0
    cast: int = 0
    tokenized: int = 0
    bytes_copied: int = 0
    events: list[tuple[str, str]] = field(default_factory=list)

    @property
    def copies(self) -> int:
        """Leaves that cost a copy, casts included."""
        return self.copied + self.cast

    def record(self, key: str, kind: str, reason: str = "", nbytes: int = 0) -> None:
        """Count one leaf; ``kind`` is zero_copy, copied, cast, tokenized or skipped."""
        if kind in ("zero_copy", "copied", "cast", "tokenized"):
            setattr(self, kind, getattr(self, kind) + 1)
        elif kind != "skipped":
            raise ValueError(f"unknown conversion kind {kind!r}")
        if kind in ("copied", "cast"):
            self.bytes_copied += nbytes
        if reason:
            self.events.append((key, reason))

    def summary(self) -> str:
        """One line for logs."""
        return (
            f"zero_copy={self.zero_copy} copied={self.copied} cast={self.cast} "
            f"tokenized={self.tokenized} bytes_copied={self.bytes_copied}"
        )


# --------------------------------------------------------------------- tokenizers


class Tokenizer(Protocol):
    """Anything that maps a batch of strings to ``(ids [B, L], mask [B, L])``.

    ``jaxrl_vla.tokenizer.WordTokenizer`` and :class:`HFTokenizerAdapter` fit.
    """

    def encode(self, texts: Sequence[str]) -> tuple[Any, Any]: ...


class HFTokenizerAdapter:
    """Wraps a Hugging Face tokenizer into the :class:`Tokenizer` protocol.

    Pads and truncates to a fixed ``max_length`` so that every batch has the
    same shape (a new shape would recompile every jitted consumer). Nothing
    is downloaded here: build or load the HF tokenizer yourself.
    """

    def __init__(self, hf_tokenizer: Any, max_length: int):
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        if getattr(hf_tokenizer, "pad_token", None) is None:
            raise ValueError(
                "the HF tokenizer has no pad_token; fixed-length batches need one "
                "(e.g. tokenizer.pad_token = tokenizer.eos_token)"
            )
        self.tokenizer = hf_tokenizer
        self.max_length = max_length

    def encode(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Token ids ``[B, max_length]`` int32 and attention mask ``[B, max_length]`` bool."""
        if len(texts) == 0:
            return np.zeros((0, self.max_length), np.int32), np.zeros((0, self.max_length), bool)
        enc = self.tokenizer(
            list(texts),
            padding="max_length",
            truncation=True,
            max_length=self.max_length,
            return_attention_mask=True,
        )
        ids = np.asarray(enc["input_ids"], dtype=np.int64)
        if ids.size and (ids.max() > _INT32_MAX or ids.min() < _INT32_MIN):
            raise ValueError("token ids do not fit in int32")
        return ids.astype(np.int32), np.asarray(enc["attention_mask"], dtype=bool)


# ------------------------------------------------------------ layout predicates


def is_aligned(t: torch.Tensor, alignment: int = ALIGNMENT) -> bool:
    """True when the tensor's first byte sits on an ``alignment`` boundary.

    Empty tensors count as aligned: there is no data to alias.
    """
    return t.numel() == 0 or t.data_ptr() % alignment == 0


def is_dlpack_compact(shape: Sequence[int], strides: Sequence[int]) -> bool:
    """True when the strides are a permutation of a dense, non-overlapping layout.

    That is what XLA accepts from DLPack ("trivial (compact) striding ... a
    transposition"): C-contiguous, ``.T``, ``permute`` and channels_last pass;
    ``x[::2]``, ``x[:, 1:]`` and ``expand`` do not. Size-1 dims carry no
    layout information and are ignored (verified: XLA accepts any stride there).
    """
    if any(size == 0 for size in shape):
        return True
    dims = sorted((stride, size) for size, stride in zip(shape, strides) if size != 1)
    expected = 1
    for stride, size in dims:
        if stride != expected:
            return False
        expected *= size
    return True


def aligned_empty(
    shape: Sequence[int],
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    alignment: int = ALIGNMENT,
) -> torch.Tensor:
    """An uninitialised contiguous tensor whose data pointer is ``alignment``-aligned.

    torch's CPU allocator already returns 64-byte-aligned blocks, so this is
    normally a plain ``torch.empty``; otherwise it over-allocates a byte buffer
    and views an aligned window of it. Use it to preallocate collector buffers
    that :func:`td_to_jax` can import zero-copy.
    """
    shape = tuple(int(s) for s in shape)
    out = torch.empty(shape, dtype=dtype, device=device)
    if out.numel() == 0 or out.data_ptr() % alignment == 0:
        return out
    nbytes = out.numel() * out.element_size()
    raw = torch.empty(nbytes + alignment, dtype=torch.uint8, device=device)
    offset = (-raw.data_ptr()) % alignment
    return raw[offset : offset + nbytes].view(dtype).view(shape)


@functools.lru_cache(maxsize=None)
def _jax_has_gpu() -> bool:
    """Whether JAX has a CUDA/ROCm backend (cached: backends do not change)."""
    try:
        return len(jax.devices("gpu")) > 0
    except RuntimeError:
        return False


# --------------------------------------------------------------------- planning


@dataclass(frozen=True)
class LeafPlan:
    """How one tensor will be converted: ``kind`` plus the copy's target.

    ``kind`` is "zero_copy", "copied" or "cast"; ``reasons`` is empty exactly
    when ``kind == "zero_copy"``.
    """

    kind: str
    dtype: torch.dtype
    device: torch.device
    reasons: tuple[str, ...] = ()

    @property
    def reason(self) -> str:
        return "; ".join(self.reasons)


def _target_dtype(dtype: torch.dtype, int64: torch.dtype, float64: torch.dtype, x64: bool) -> torch.dtype:
    """The dtype a leaf of ``dtype`` becomes in JAX (raises for unsupported ones)."""
    if dtype in _ZERO_COPY_DTYPES:
        return dtype
    if dtype == torch.int64:
        return int64
    if dtype == torch.float64:
        return float64
    if dtype in _X64_DTYPES and x64:
        return dtype
    raise TypeError(f"dtype {dtype} is not supported" + (" without jax_enable_x64" if dtype in _X64_DTYPES else ""))


def plan_leaf(
    t: torch.Tensor,
    *,
    int64: torch.dtype = torch.int32,
    float64: torch.dtype = torch.float32,
    force_copy: bool = False,
    x64: bool | None = None,
    jax_has_gpu: bool | None = None,
) -> LeafPlan:
    """Decide, from metadata only, whether ``t`` can be imported zero-copy.

    A pure function of the tensor's dtype, layout, pointer and device (plus
    the JAX configuration, injectable for tests) so the decision is testable
    without a GPU. Every reason that forces the copy is listed.
    """
    x64 = bool(jax.config.jax_enable_x64) if x64 is None else x64
    has_gpu = _jax_has_gpu() if jax_has_gpu is None else jax_has_gpu
    dtype = _target_dtype(t.dtype, int64, float64, x64)
    reasons: list[str] = []
    device = t.device
    if device.type == "cuda" and not has_gpu:
        device = torch.device("cpu")
        reasons.append(f"device transfer {t.device} -> cpu (jax has no GPU backend)")
    elif device.type not in ("cpu", "cuda"):
        device = torch.device("cpu")
        reasons.append(f"device transfer {t.device} -> cpu (no DLPack path into jax)")
    if dtype != t.dtype:
        reasons.append(f"dtype cast {_name(t.dtype)}->{_name(dtype)}")
    if not is_dlpack_compact(t.shape, t.stride()):
        reasons.append(f"non-contiguous/strided: shape {tuple(t.shape)} strides {tuple(t.stride())}")
    if t.is_neg() or t.is_conj():
        reasons.append("neg/conj bit set (DLPack would export unresolved values)")
    # XLA:CPU needs 64-byte alignment; on GPU the import itself is the judge.
    if t.device.type == "cpu" and not is_aligned(t):
        reasons.append(f"unaligned: data_ptr % {ALIGNMENT} = {t.data_ptr() % ALIGNMENT}")
    if force_copy and not reasons:
        reasons.append("copy=True (owned copy requested)")
    if not reasons:
        return LeafPlan("zero_copy", dtype, device)
    kind = "cast" if dtype != t.dtype else "copied"
    return LeafPlan(kind, dtype, device, tuple(reasons))


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ------------------------------------------------------------------- conversion


@dataclass
class _Ctx:
    """Options threaded through the recursive walk."""

    strict: bool
    copy: bool
    stats: ConversionStats
    tokenizer: Tokenizer | None
    language_keys: frozenset[str] | None
    int64: torch.dtype
    float64: torch.dtype
    x64: bool


def _one_copy(t: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Exactly one pass over the data: gather strides, cast, resolve bits, move."""
    dst = aligned_empty(t.shape, dtype, device)
    dst.copy_(t)
    return dst


def _strict_error(path: str, reason: str) -> ValueError:
    return ValueError(f"td_to_jax(strict=True): leaf {path!r} would be copied: {reason}")


def _check_int32_range(t: torch.Tensor, path: str) -> None:
    """Refuse an int64 -> int32 cast that would wrap around silently."""
    if t.numel() == 0:
        return
    lo, hi = torch.aminmax(t)
    if lo.item() < _INT32_MIN or hi.item() > _INT32_MAX:
        raise ValueError(
            f"leaf {path!r}: int64 values in [{lo.item()}, {hi.item()}] do not fit int32; "
            "pass int64='int64' with jax_enable_x64, or reduce them first"
        )


def _convert_tensor(t: torch.Tensor, path: str, ctx: _Ctx, materialised: bool) -> jax.Array:
    """One tensor leaf -> jax.Array, recorded in ``ctx.stats``."""
    if t.is_meta:
        raise TypeError(f"leaf {path!r}: a meta tensor (shape {tuple(t.shape)}, no data) cannot become an array; "
                        "materialise it first (e.g. model.to_empty(device='cpu') and load its weights)")
    if t.layout != torch.strided:
        raise TypeError(f"leaf {path!r}: {str(t.layout).removeprefix('torch.')} tensors have no dense buffer to "
                        "share; convert it with .to_dense() first")
    t = t.detach()  # shares memory; torch refuses to export grad-tracking tensors
    try:
        plan = plan_leaf(t, int64=ctx.int64, float64=ctx.float64, force_copy=ctx.copy, x64=ctx.x64)
    except TypeError as err:
        raise TypeError(f"leaf {path!r}: {err}") from None
    nbytes = t.numel() * t.element_size()
    if plan.kind == "zero_copy" and materialised:
        # torch.stack already made the one copy; importing it is free.
        plan = LeafPlan("copied", plan.dtype, plan.device, ("lazy-stacked TensorDict materialised by torch.stack",))
        if ctx.strict:
            raise _strict_error(path, plan.reason)
        arr = _import_zero_copy(t, path, ctx, nbytes)
        ctx.stats.record(path, "copied", plan.reason, nbytes)
        return arr
    if plan.kind != "zero_copy" and ctx.strict:
        raise _strict_error(path, plan.reason)
    if plan.kind == "zero_copy":
        return _import_zero_copy(t, path, ctx, nbytes)
    if t.dtype == torch.int64 and plan.dtype == torch.int32:
        _check_int32_range(t, path)
    arr = jax.dlpack.from_dlpack(_one_copy(t, plan.dtype, plan.device), copy=False)
    ctx.stats.record(path, plan.kind, plan.reason, nbytes)
    return arr


def _import_zero_copy(t: torch.Tensor, path: str, ctx: _Ctx, nbytes: int) -> jax.Array:
    """DLPack import with ``copy=False``; if XLA still refuses, one copy (counted)."""
    try:
        arr = jax.dlpack.from_dlpack(t, copy=False)
    except (ValueError, BufferError, RuntimeError) as err:
        reason = f"dlpack refused: {str(err).splitlines()[0][:200]}"
        if ctx.strict:
            raise _strict_error(path, reason) from err
        arr = jax.dlpack.from_dlpack(_one_copy(t, t.dtype, t.device), copy=False)
        ctx.stats.record(path, "copied", reason, nbytes)
        return arr
    ctx.stats.record(path, "zero_copy")
    return arr


def _text_batch(value: Any) -> tuple[list[str], tuple[int, ...]] | None:
    """Flatten a string entry into (strings, batch_shape); None when not text.

    NonTensorData holding one string repeated over the batch and
    NonTensorStack both answer ``tolist()`` with nested lists in batch shape.
    """
    data = value.tolist() if is_non_tensor(value) else value
    if isinstance(data, str):
        return [data], ()
    if not isinstance(data, (list, tuple)):
        return None
    flat: list[str] = []
    shape = _nested_shape(data)
    if shape is None:
        return None
    _flatten_into(data, flat)
    if not all(isinstance(s, str) for s in flat):
        return None
    return flat, shape


def _nested_shape(data: Any) -> tuple[int, ...] | None:
    """Shape of a rectangular nested list; None when ragged."""
    if not isinstance(data, (list, tuple)):
        return ()
    if len(data) == 0:
        return (0,)
    inner = [_nested_shape(d) for d in data]
    if any(s is None or s != inner[0] for s in inner):
        return None
    return (len(data), *inner[0])


def _flatten_into(data: Any, out: list) -> None:
    if isinstance(data, (list, tuple)):
        for d in data:
            _flatten_into(d, out)
    else:
        out.append(data)


def _tokenize(texts: list[str], shape: tuple[int, ...], path: str, ctx: _Ctx) -> tuple[jax.Array, jax.Array]:
    """Strings -> (int32 ids [*shape, L], bool mask [*shape, L])."""
    if ctx.tokenizer is None:
        raise ValueError(
            f"leaf {path!r} holds strings but no tokenizer was given: pass "
            "tokenizer=WordTokenizer(...) (or HFTokenizerAdapter) or exclude the key"
        )
    ids, mask = ctx.tokenizer.encode(texts)
    ids, mask = np.asarray(ids), np.asarray(mask)
    if ids.ndim != 2 or ids.shape != mask.shape or ids.shape[0] != len(texts):
        raise ValueError(f"leaf {path!r}: tokenizer returned ids {ids.shape} / mask {mask.shape} for {len(texts)} texts")
    length = ids.shape[1]
    ctx.stats.record(path, "tokenized")
    return (
        jnp.asarray(ids.astype(np.int32, copy=False).reshape(*shape, length)),
        jnp.asarray(mask.astype(bool, copy=False).reshape(*shape, length)),
    )


def _items(node: Any) -> Iterator[tuple[str, Any]]:
    """Direct children of a TensorDict or mapping, non-tensor entries included."""
    for key, value in node.items():
        if not isinstance(key, str):
            raise TypeError(f"keys must be str, got {key!r} (a tuple key? use nested dicts)")
        yield key, value


def _walk(node: Any, prefix: str, ctx: _Ctx, batch: _Batch = None, seen: dict[str, str] | None = None) -> dict:
    """Recursive conversion of one level; nested levels become nested dicts.

    `batch` is the batch shape string entries must have (a TensorDict's batch_size,
    or the first dim all tensors of a plain mapping share; see `_plain_batch`);
    `seen` maps each "/"-joined path already taken to the key chain that took it.
    """
    out: dict[str, Any] = {}
    materialised = isinstance(node, LazyStackedTensorDict)
    if isinstance(node, TensorDictBase) and len(node.batch_size):
        batch = tuple(node.batch_size)
    seen = {} if seen is None else seen
    children = list(_items(node))
    names = {k for k, _ in children}
    for key, value in children:
        path = f"{prefix}/{key}" if prefix else key
        _claim(path, key, prefix, seen)
        if isinstance(value, torch.Tensor):
            out[key] = _convert_tensor(value, path, ctx, materialised)
        elif is_non_tensor(value) or isinstance(value, (str, list, tuple)):
            if ctx.language_keys is not None and path not in ctx.language_keys:
                ctx.stats.record(path, "skipped", "skipped: non-tensor entry not in language_keys")
                continue
            text = _text_batch(value)
            if text is None:
                raise TypeError(f"leaf {path!r}: non-tensor data that is not a (batch of) string(s)")
            _check_text_batch(path, text[1], batch)
            mask_key = key + "_mask"
            if mask_key in names:
                raise ValueError(f"leaf {path!r}: cannot add {mask_key!r}, the key already exists")
            _claim(f"{path}_mask", mask_key, prefix, seen)
            out[key], out[mask_key] = _tokenize(*text, path, ctx)
        elif isinstance(value, (TensorDictBase, Mapping)):
            out[key] = _walk(value, path, ctx, batch, seen)
        else:
            raise TypeError(f"leaf {path!r}: unsupported type {type(value).__name__}")
    return out


# The batch shape string entries must match: a shape, None (nothing to match), or the set of first dims
# on which a plain mapping's tensors disagree (then no batch can be told, and strings are an error).
_Batch = tuple[int, ...] | frozenset[int] | None


def _claim(path: str, key: str, prefix: str, seen: dict[str, str]) -> None:
    """Refuse a second leaf under the same "/"-joined path (a literal "a/b" key beside a nested a -> b).

    Stats, errors and `language_keys` name leaves by that path, so two leaves
    sharing it could not be told apart (one would be tokenised or skipped for the other).
    """
    chain = f"{seen.get(prefix, prefix)!s} -> {key!r}" if prefix else repr(key)
    if path in seen:
        raise ValueError(f"leaf {path!r}: keys {seen[path]} and {chain} both name it; "
                         "a key must not contain '/' where that collides with a nested key")
    seen[path] = chain


def _plain_batch(tree: Mapping[str, Any]) -> _Batch:
    """The first dim every tensor of a plain mapping has (its batch), outside nested TensorDicts."""
    firsts: set[int] = set()

    def visit(node: Mapping[str, Any]) -> None:
        for value in node.values():
            if isinstance(value, torch.Tensor) and value.ndim:
                firsts.add(int(value.shape[0]))
            elif isinstance(value, Mapping) and not isinstance(value, TensorDictBase):
                visit(value)

    visit(tree)
    if not firsts:
        return None
    return (firsts.pop(),) if len(firsts) == 1 else frozenset(firsts)


def _check_text_batch(path: str, shape: tuple[int, ...], batch: _Batch) -> None:
    """A batch of strings must have as many rows as the tensors beside it (one string is broadcast)."""
    if not shape or batch is None:
        return
    if isinstance(batch, frozenset):
        raise ValueError(f"leaf {path!r}: {shape[0]} strings, but the tensors beside them disagree on the batch "
                         f"size (first dims {sorted(batch)})")
    if shape[: len(batch)] != batch:
        raise ValueError(f"leaf {path!r}: strings of batch shape {shape} next to tensors of batch shape {batch}")


def _dtype_option(value: str, table: dict[str, torch.dtype], name: str, x64: bool) -> torch.dtype:
    if value not in table:
        raise ValueError(f"{name}={value!r}: expected one of {sorted(table)}")
    dtype = table[value]
    if dtype in _X64_DTYPES and not x64:
        raise ValueError(f"{name}={value!r} needs jax.config.update('jax_enable_x64', True)")
    return dtype


def td_to_jax(
    td: TensorDictBase | Mapping[str, Any],
    *,
    strict: bool = False,
    stats: ConversionStats | None = None,
    tokenizer: Tokenizer | None = None,
    language_keys: Iterable[str] | None = None,
    int64: str = "int32",
    float64: str = "float32",
    copy: bool = False,
) -> dict[str, Any]:
    """TensorDict (or nested dict of tensors) -> nested dict of ``jax.Array``.

    Keys and nesting are kept (nested TensorDicts become nested dicts: a dict
    with "/"-paths or tuple keys would not be a usable pytree). Each tensor is
    imported zero-copy through DLPack when legal, else copied exactly once
    into an aligned buffer; see the module docstring for the full table.

    Args:
      strict: raise ``ValueError`` naming the "/"-joined key and the reason
        instead of making any copy (casts included).
      stats: a :class:`ConversionStats` to fill (accumulates across calls).
        When omitted a fresh one is made; either way it is also left on
        ``td_to_jax.last_stats`` (a convenience, not thread-safe: concurrent
        callers should pass their own).
      tokenizer: turns string entries into ids + mask (``encode(list[str])``).
      language_keys: "/"-joined paths of the string entries to tokenise; other
        non-tensor entries are then skipped (and logged in ``stats.events``).
        ``None`` tokenises every string entry.
      int64, float64: target dtypes of the deliberate 64-bit casts.
      copy: force one owned copy of every leaf. Needed when the producer
        reuses its storage (a collector writing into the same TensorDict
        every step, an in-place rollout buffer): a borrowed array would
        change under JAX's feet. Exclusive with ``strict``.
    """
    if strict and copy:
        raise ValueError("strict=True forbids copies, copy=True forces them: pick one")
    if not isinstance(td, (TensorDictBase, Mapping)):
        raise TypeError(f"td_to_jax expects a TensorDict or a mapping, got {type(td).__name__}")
    x64 = bool(jax.config.jax_enable_x64)
    stats = ConversionStats() if stats is None else stats
    td_to_jax.last_stats = stats  # type: ignore[attr-defined]
    ctx = _Ctx(
        strict=strict,
        copy=copy,
        stats=stats,
        tokenizer=tokenizer,
        language_keys=None if language_keys is None else frozenset(language_keys),
        int64=_dtype_option(int64, _INT64_TARGETS, "int64", x64),
        float64=_dtype_option(float64, _FLOAT64_TARGETS, "float64", x64),
        x64=x64,
    )
    return _walk(td, "", ctx, None if isinstance(td, TensorDictBase) else _plain_batch(td))


td_to_jax.last_stats = None  # type: ignore[attr-defined]


# ---------------------------------------------------------------- back direction


def _to_torch(leaf: Any, path: str, copy: bool) -> torch.Tensor:
    """One leaf -> torch tensor sharing its memory (or a clone when ``copy``)."""
    if isinstance(leaf, jax.Array):
        t = torch.from_dlpack(leaf)
    elif isinstance(leaf, np.ndarray):
        # from_numpy shares; a read-only array cannot be shared writable.
        t = torch.from_numpy(leaf if leaf.flags.writeable else leaf.copy())
    elif isinstance(leaf, (bool, int, float, np.generic)):
        t = torch.as_tensor(leaf)
    elif isinstance(leaf, torch.Tensor):
        t = leaf
    else:
        raise TypeError(f"leaf {path!r}: cannot convert {type(leaf).__name__} to a tensor")
    return t.clone() if copy else t


def _tree_to_torch(tree: Mapping[str, Any], prefix: str, copy: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in _items(tree):
        path = f"{prefix}/{key}" if prefix else key
        out[key] = _tree_to_torch(value, path, copy) if isinstance(value, Mapping) else _to_torch(value, path, copy)
    return out


def _leaf_shapes(tree: Mapping[str, Any]) -> Iterator[tuple[int, ...]]:
    for value in tree.values():
        if isinstance(value, Mapping):
            yield from _leaf_shapes(value)
        else:
            yield tuple(value.shape)


def _infer_batch_size(tree: Mapping[str, Any]) -> list[int]:
    """``[B]`` when every leaf has a first dim and they agree, else ``[]``.

    Only the first dim: the longest common prefix would turn an all-image
    tree ``[B, 224, 224, C]`` into a batch of pixels.
    """
    shapes = list(_leaf_shapes(tree))
    if not shapes or any(len(s) == 0 for s in shapes):
        return []
    firsts = {s[0] for s in shapes}
    return [firsts.pop()] if len(firsts) == 1 else []


def jax_to_td(
    tree: Mapping[str, Any],
    batch_size: Sequence[int] | None = None,
    *,
    copy: bool = False,
) -> TensorDict:
    """Nested dict of ``jax.Array`` -> TensorDict, via ``torch.from_dlpack``.

    The result SHARES memory with the JAX arrays (same device, same dtype,
    keys and nesting kept): a torch in-place op (``add_``, ``copy_``,
    ``zero_``, an optimizer step) would mutate the supposedly immutable JAX
    array, and any jitted function or cache holding it. Pass ``copy=True`` to
    clone every leaf when torch will write into the result or keep it after
    the JAX side is donated or deleted.

    ``batch_size`` defaults to the leaves' common first dim (``[]`` when they
    disagree or one is 0-d).
    """
    if not isinstance(tree, Mapping):
        raise TypeError(f"jax_to_td expects a mapping, got {type(tree).__name__}")
    tensors = _tree_to_torch(tree, "", copy)
    if batch_size is None:
        batch_size = _infer_batch_size(tensors)
    return TensorDict(tensors, batch_size=list(batch_size))
