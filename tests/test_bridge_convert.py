"""Tests for bridge.convert: zero-copy where promised, one counted copy elsewhere.

Zero-copy is asserted by pointer equality (``unsafe_buffer_pointer() ==
data_ptr()``), not by timing: only the pointer proves that no byte moved.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
tensordict = pytest.importorskip("tensordict")

from tensordict import LazyStackedTensorDict, NonTensorData, TensorDict  # noqa: E402

from bridge.convert import (  # noqa: E402
    ALIGNMENT,
    ConversionStats,
    HFTokenizerAdapter,
    aligned_empty,
    is_dlpack_compact,
    jax_to_td,
    plan_leaf,
    td_to_jax,
)
from jaxrl_vla.tokenizer import WordTokenizer  # noqa: E402

ALL_DTYPES = [
    torch.bool,
    torch.uint8,
    torch.int32,
    torch.int64,
    torch.float16,
    torch.bfloat16,
    torch.float32,
    torch.float64,
]
ZERO_COPY = {torch.bool, torch.uint8, torch.int32, torch.float16, torch.bfloat16, torch.float32}
EXPECTED = {torch.int64: torch.int32, torch.float64: torch.float32}
SHAPES = [(), (0,), (5,), (3, 4), (2, 0, 3), (2, 3, 4)]
VOCAB = ["pick", "up", "the", "red", "cube", "open", "drawer"]


# ------------------------------------------------------------------- helpers


def _filled(shape: tuple[int, ...], dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """Deterministic non-trivial values of ``dtype`` written into ``out``."""
    out = aligned_empty(shape, dtype) if out is None else out
    vals = torch.arange(out.numel(), dtype=torch.float64).reshape(shape) % 7 - 3
    out.copy_(vals > 0 if dtype == torch.bool else vals.to(dtype))
    return out


def _unaligned(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A contiguous tensor whose data pointer is one element past a 64-byte boundary."""
    numel = int(np.prod(shape, dtype=np.int64))
    base = aligned_empty((numel + 1,), dtype)
    view = base[1 : numel + 1].view(shape)
    assert view.data_ptr() % ALIGNMENT != 0
    return _filled(shape, dtype, view)


def _np(t: torch.Tensor) -> np.ndarray:
    """Tensor values as numpy (bfloat16 via float32, which holds it exactly)."""
    return (t.float() if t.dtype == torch.bfloat16 else t).detach().numpy()


def _jnp_np(a: jax.Array) -> np.ndarray:
    return np.asarray(a.astype(jnp.float32) if a.dtype == jnp.bfloat16 else a)


def _same_memory(a: jax.Array, t: torch.Tensor) -> bool:
    return a.unsafe_buffer_pointer() == t.data_ptr()


# ------------------------------------------------------------ layout helpers


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_aligned_empty_is_aligned(dtype):
    for shape in [(), (1,), (3, 5), (7, 3, 2)]:
        assert aligned_empty(shape, dtype).data_ptr() % ALIGNMENT == 0


def test_is_dlpack_compact():
    x = torch.zeros(4, 6)
    assert is_dlpack_compact(x.shape, x.stride())
    assert is_dlpack_compact(x.T.shape, x.T.stride())
    assert not is_dlpack_compact(x[::2].shape, x[::2].stride())
    assert not is_dlpack_compact(x[:, 1:].shape, x[:, 1:].stride())
    e = torch.zeros(1, 6).expand(4, 6)
    assert not is_dlpack_compact(e.shape, e.stride())
    assert is_dlpack_compact((4, 1), (1, 7))  # size-1 dims: any stride
    assert is_dlpack_compact((0, 3), (0, 1))


# --------------------------------------------------------------- round trips


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_round_trip_every_dtype_and_shape(dtype, shape):
    t = _filled(shape, dtype)
    stats = ConversionStats()
    out = td_to_jax({"x": t}, stats=stats)
    a = out["x"]
    want = EXPECTED.get(dtype, dtype)
    assert a.shape == shape
    assert str(a.dtype) == str(want).removeprefix("torch.")
    np.testing.assert_array_equal(_jnp_np(a), _np(t.to(want)))
    if dtype in ZERO_COPY:
        assert (stats.zero_copy, stats.copied, stats.cast) == (1, 0, 0)
        if t.numel():
            assert _same_memory(a, t)
    else:
        assert (stats.zero_copy, stats.copied, stats.cast) == (0, 0, 1)
        assert stats.events == [("x", f"dtype cast {str(dtype)[6:]}->{str(want)[6:]}")]
    back = jax_to_td({"x": a}, batch_size=[])["x"]
    assert back.dtype == want and tuple(back.shape) == shape
    np.testing.assert_array_equal(_np(back), _np(t.to(want)))


def test_nested_tensordict_keeps_structure():
    b = 3
    td = TensorDict(
        {
            "obs": {"rgb": _filled((b, 4, 4, 3), torch.uint8), "state": {"q": _filled((b, 7), torch.float32)}},
            "action": _filled((b, 2), torch.float32),
            "done": _filled((b,), torch.bool),
        },
        batch_size=[b],
    )
    out = td_to_jax(td)
    assert set(out) == {"obs", "action", "done"}
    assert set(out["obs"]) == {"rgb", "state"} and set(out["obs"]["state"]) == {"q"}
    assert _same_memory(out["obs"]["state"]["q"], td["obs", "state", "q"])
    assert td_to_jax.last_stats.zero_copy == 4
    back = jax_to_td(out)
    assert back.batch_size == torch.Size([b])
    assert set(back.keys(include_nested=True, leaves_only=True)) == set(td.keys(include_nested=True, leaves_only=True))
    assert torch.equal(back["obs", "state", "q"], td["obs", "state", "q"])
    assert jax.tree_util.tree_structure(out).num_leaves == 4  # a valid pytree


def test_plain_nested_dict_input():
    out = td_to_jax({"a": {"b": _filled((2,), torch.int32)}})
    assert out["a"]["b"].dtype == jnp.int32


def test_zero_d_and_permuted_layouts_are_zero_copy():
    scalar = torch.tensor(3.5)
    x = _filled((4, 6), torch.float32)
    img = _filled((2, 3, 5, 5), torch.float32).to(memory_format=torch.channels_last)
    stats = ConversionStats()
    out = td_to_jax({"s": scalar, "xt": x.T, "img": img}, stats=stats)
    assert stats.zero_copy == 3 and stats.copies == 0
    assert out["s"].shape == () and float(out["s"]) == 3.5 and _same_memory(out["s"], scalar)
    assert _same_memory(out["xt"], x.T) and np.array_equal(np.asarray(out["xt"]), x.T.numpy())
    assert _same_memory(out["img"], img) and np.array_equal(np.asarray(out["img"]), img.numpy())


# -------------------------------------------------------- copies are counted


@pytest.mark.parametrize("dtype", sorted(ZERO_COPY, key=str))
def test_unaligned_is_copied_once_and_counted(dtype):
    t = _unaligned((5, 3), dtype)
    stats = ConversionStats()
    a = td_to_jax({"obs": {"x": t}}, stats=stats)["obs"]["x"]
    assert (stats.zero_copy, stats.copied, stats.cast) == (0, 1, 0)
    assert stats.bytes_copied == t.numel() * t.element_size()
    (key, reason), = stats.events
    assert key == "obs/x" and reason.startswith("unaligned")
    assert not _same_memory(a, t) and a.unsafe_buffer_pointer() % ALIGNMENT == 0
    np.testing.assert_array_equal(_jnp_np(a), _np(t))


def test_batch_slice_of_odd_row_size_is_unaligned():
    """td[1:] of rows that are not a multiple of 64 bytes: the common trap."""
    td = TensorDict({"p": _filled((4, 3), torch.float32)}, batch_size=[4])
    stats = ConversionStats()
    td_to_jax(td[1:], stats=stats)
    assert stats.copied == 1 and "unaligned" in stats.events[0][1]


@pytest.mark.parametrize(
    "make",
    [lambda x: x[::2], lambda x: x[:, 1:], lambda x: x[:1].expand(4, 6)],
    ids=["step", "column-slice", "expand"],
)
def test_strided_view_is_copied_and_counted(make):
    v = make(_filled((4, 6), torch.float32))
    stats = ConversionStats()
    a = td_to_jax({"v": v}, stats=stats)["v"]
    assert stats.copied == 1 and stats.zero_copy == 0
    assert "non-contiguous/strided" in stats.events[0][1]
    np.testing.assert_array_equal(np.asarray(a), v.numpy())


def test_neg_bit_view_is_resolved_by_the_copy():
    """DLPack would export the raw buffer, i.e. the un-negated values."""
    t = _filled((4,), torch.float32)._neg_view()
    stats = ConversionStats()
    a = td_to_jax({"n": t}, stats=stats)["n"]
    assert stats.copied == 1
    np.testing.assert_array_equal(np.asarray(a), t.resolve_neg().numpy())


def test_lazy_stack_counted_as_copy():
    lazy = LazyStackedTensorDict.lazy_stack([TensorDict({"x": torch.zeros(3)}, []) for _ in range(2)])
    stats = ConversionStats()
    out = td_to_jax(lazy, stats=stats)
    assert out["x"].shape == (2, 3) and stats.copied == 1 and "lazy" in stats.events[0][1]


def test_copy_true_gives_an_owned_array():
    t = _filled((8,), torch.float32)
    stats = ConversionStats()
    a = td_to_jax({"x": t}, copy=True, stats=stats)["x"]
    assert stats.copied == 1 and not _same_memory(a, t)
    before = np.asarray(a).copy()
    t.add_(100)  # a collector overwriting its buffer
    np.testing.assert_array_equal(np.asarray(a), before)


def test_borrowed_array_sees_producer_writes():
    """Why copy=True exists: without it the JAX array aliases the buffer."""
    t = _filled((8,), torch.float32)
    a = td_to_jax({"x": t})["x"]
    t.fill_(7.0)
    assert np.all(np.asarray(a) == 7.0)


def test_requires_grad_is_detached_not_copied():
    t = _filled((3, 2), torch.float32).requires_grad_(True)
    stats = ConversionStats()
    a = td_to_jax({"w": t}, stats=stats)["w"]
    assert stats.zero_copy == 1 and _same_memory(a, t)


def test_stats_accumulate_and_last_stats():
    stats = ConversionStats()
    td_to_jax({"x": torch.zeros(2)}, stats=stats)
    td_to_jax({"x": torch.zeros(2), "y": torch.zeros(2, dtype=torch.int64)}, stats=stats)
    assert (stats.zero_copy, stats.cast) == (2, 1)
    assert td_to_jax.last_stats is stats
    td_to_jax({"x": torch.zeros(2)})
    assert td_to_jax.last_stats is not stats and td_to_jax.last_stats.zero_copy == 1


# --------------------------------------------------------- strict and errors


@pytest.mark.parametrize(
    "leaf, reason",
    [
        (lambda: _unaligned((4, 3), torch.float32), "unaligned"),
        (lambda: _filled((4, 6), torch.float32)[:, ::2], "non-contiguous/strided"),
        (lambda: _filled((4,), torch.int64), "dtype cast int64->int32"),
        (lambda: _filled((4,), torch.float64), "dtype cast float64->float32"),
    ],
    ids=["unaligned", "strided", "int64", "float64"],
)
def test_strict_names_key_and_reason(leaf, reason):
    td = TensorDict({"obs": {"rgb": leaf()}, "ok": torch.zeros(4)}, batch_size=[4])
    with pytest.raises(ValueError, match=reason) as err:
        td_to_jax(td, strict=True)
    assert "'obs/rgb'" in str(err.value)


def test_strict_accepts_zero_copy_batch():
    td = TensorDict({"a": _filled((4, 3), torch.float32), "g": torch.ones(4, requires_grad=True)}, [4])
    out = td_to_jax(td, strict=True)
    assert _same_memory(out["a"], td["a"])


def test_strict_and_copy_are_exclusive():
    with pytest.raises(ValueError, match="strict"):
        td_to_jax({"x": torch.zeros(1)}, strict=True, copy=True)


def test_int64_overflow_names_key():
    t = torch.tensor([0, 2**40], dtype=torch.int64)
    with pytest.raises(ValueError, match="'obs/ids'.*int32"):
        td_to_jax({"obs": {"ids": t}})


def test_int64_option_needs_x64_and_is_zero_copy_with_it():
    t = _filled((6,), torch.int64)
    with pytest.raises(ValueError, match="jax_enable_x64"):
        td_to_jax({"i": t}, int64="int64")
    with jax.enable_x64(True):
        stats = ConversionStats()
        a = td_to_jax({"i": t}, int64="int64", stats=stats)["i"]
        assert a.dtype == jnp.int64 and stats.zero_copy == 1 and _same_memory(a, t)


def test_float64_target_is_configurable():
    a = td_to_jax({"f": _filled((3,), torch.float64)}, float64="bfloat16")["f"]
    assert a.dtype == jnp.bfloat16


def test_unsupported_dtype_names_key():
    with pytest.raises(TypeError, match="'u'.*x64"):
        td_to_jax({"u": torch.zeros(2, dtype=torch.uint64)})


def test_tuple_keys_rejected():
    with pytest.raises(TypeError, match="tuple"):
        td_to_jax({("a", "b"): torch.zeros(1)})


def test_device_plan_without_gpu():
    """The CUDA branch, checked on metadata (this machine has no GPU)."""

    class FakeCuda:
        shape, dtype, device = torch.Size([2, 3]), torch.float32, torch.device("cuda", 0)

        def stride(self):
            return (3, 1)

        def is_neg(self):
            return False

        def is_conj(self):
            return False

        def numel(self):
            return 6

        def data_ptr(self):
            return 4  # unaligned: must not matter on GPU

    no_gpu = plan_leaf(FakeCuda(), jax_has_gpu=False)
    assert no_gpu.kind == "copied" and no_gpu.device.type == "cpu" and "device transfer" in no_gpu.reason
    assert plan_leaf(FakeCuda(), jax_has_gpu=True).kind == "zero_copy"


# ------------------------------------------------------------------ language


def test_non_tensor_data_and_stack_are_tokenized():
    tok = WordTokenizer(VOCAB, max_length=6)
    same = TensorDict({"x": torch.zeros(3, 2)}, batch_size=[3])
    same["instruction"] = "pick up the red cube"
    per_env = torch.stack(
        [TensorDict({"x": torch.zeros(2), "task": NonTensorData(s)}, []) for s in ["open the drawer", "pick up", "zebra"]]
    )
    stats = ConversionStats()
    a = td_to_jax(same, tokenizer=tok, stats=stats)
    b = td_to_jax(per_env, tokenizer=tok, stats=stats)
    assert stats.tokenized == 2
    assert a["instruction"].shape == (3, 6) and a["instruction"].dtype == jnp.int32
    assert a["instruction_mask"].dtype == jnp.bool_
    assert tok.decode(np.asarray(a["instruction"]), np.asarray(a["instruction_mask"])) == ["pick up the red cube"] * 3
    assert tok.decode(np.asarray(b["task"]), np.asarray(b["task_mask"])) == ["open the drawer", "pick up", "<unk>"]


def test_nested_strings_in_plain_dict():
    tok = WordTokenizer(VOCAB, max_length=4)
    out = td_to_jax({"obs": {"lang": ["pick up", "open drawer"]}}, tokenizer=tok)
    assert out["obs"]["lang"].shape == (2, 4) and out["obs"]["lang_mask"].sum() == 4


def test_strings_without_tokenizer_name_the_key():
    td = TensorDict({"x": torch.zeros(2)}, batch_size=[2])
    td["instruction"] = "pick up"
    with pytest.raises(ValueError, match="'instruction'.*tokenizer"):
        td_to_jax(td)


def test_language_keys_select_and_skip():
    td = TensorDict({"x": torch.zeros(2)}, batch_size=[2])
    td["instruction"] = "pick up"
    td["episode_name"] = "run-7"
    stats = ConversionStats()
    out = td_to_jax(td, tokenizer=WordTokenizer(VOCAB, 3), language_keys=["instruction"], stats=stats)
    assert set(out) == {"x", "instruction", "instruction_mask"}
    assert ("episode_name", "skipped: non-tensor entry not in language_keys") in stats.events


def test_mask_key_collision():
    with pytest.raises(ValueError, match="lang_mask"):
        td_to_jax({"lang": ["pick"], "lang_mask": torch.zeros(1)}, tokenizer=WordTokenizer(VOCAB, 2))


def test_hf_tokenizer_adapter_offline():
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(VOCAB)}}
    core = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]")
    adapter = HFTokenizerAdapter(hf, max_length=5)
    ids, mask = adapter.encode(["pick up the cube", "open"])
    assert ids.dtype == np.int32 and mask.dtype == bool and ids.shape == mask.shape == (2, 5)
    assert ids[0, :4].tolist() == [2, 3, 4, 6] and mask.sum(1).tolist() == [4, 1]
    out = td_to_jax({"lang": ["open the drawer"]}, tokenizer=adapter)
    assert out["lang"].shape == (1, 5)


# ------------------------------------------------------------- back direction


def test_jax_to_td_shares_memory():
    a = jnp.arange(6, dtype=jnp.float32).reshape(2, 3) + 0
    td = jax_to_td({"a": a})
    assert td["a"].data_ptr() == a.unsafe_buffer_pointer()
    td["a"].add_(1)  # visible through the "immutable" jax array
    np.testing.assert_array_equal(np.asarray(a), np.arange(1, 7, dtype=np.float32).reshape(2, 3))


def test_jax_to_td_copy_is_private():
    a = jnp.arange(6, dtype=jnp.float32) + 0
    td = jax_to_td({"a": a}, copy=True)
    assert td["a"].data_ptr() != a.unsafe_buffer_pointer()
    td["a"].add_(1)
    np.testing.assert_array_equal(np.asarray(a), np.arange(6, dtype=np.float32))


def test_jax_to_td_batch_size_inference():
    assert jax_to_td({"a": jnp.zeros((4, 2)), "b": {"c": jnp.zeros((4,))}}).batch_size == torch.Size([4])
    assert jax_to_td({"a": jnp.zeros((4, 2)), "b": jnp.zeros((3,))}).batch_size == torch.Size([])
    assert jax_to_td({"a": jnp.zeros(()), "b": jnp.zeros((3,))}).batch_size == torch.Size([])
    assert jax_to_td({"a": jnp.zeros((4, 2, 5))}, batch_size=[4, 2]).batch_size == torch.Size([4, 2])
