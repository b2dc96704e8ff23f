"""Hardening of the torch door: damaged or hostile checkpoints, non-finite weights, td_to_jax's bad inputs,
BatchNorm counters through export.

Every bad input must end in one VLALoadingError (a ValueError, which build_vla_policy turns into a
ConfigError: exit 2) whose single line names the file and, where there is one, the tensor.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import struct

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")
pytest.importorskip("transformers")

from safetensors.torch import save_file  # noqa: E402

from bridge import load_vla_model  # noqa: E402
from bridge.vla_loading import (  # noqa: E402
    CorruptCheckpointError,
    DtypeMismatchError,
    NonFiniteWeightsError,
    NotACheckpointError,
    UnsafeCheckpointError,
    VLALoadingError,
    read_checkpoint,
)
from bridge.vla_models import GPTVLAModel as TorchGPTVLA  # noqa: E402
from jaxrl_vla.config import ConfigError  # noqa: E402
from jaxrl_vla.models.vla_policy import build_vla_policy  # noqa: E402

pytestmark = pytest.mark.torch

CLASS = "bridge.vla_models.GPTVLAModel"
CONFIG = dict(
    vision_encoder="tiny", language_model="tiny", vocab_size=40, n_positions=12, max_instruction_length=4,
    proprio_dim=3, action_dim=2, image_size=24, value_hidden_dim=16,
)


@pytest.fixture(scope="module")
def state_dict() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return TorchGPTVLA(CONFIG).state_dict()


def _one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message, message
    return message


def _write_safetensors(path, header: object, data: bytes = b"") -> None:
    """A .safetensors file with an arbitrary (possibly malformed) JSON header."""
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


# ----------------------------------------------------------------------------- .pth files


def test_zero_byte_pth_is_an_empty_file_not_an_unsafe_pickle(tmp_path):
    path = tmp_path / "empty.pth"
    path.write_bytes(b"")
    with pytest.raises(CorruptCheckpointError) as err:
        read_checkpoint(path)
    assert "empty.pth" in _one_line(err) and "empty" in str(err.value)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize("keep", [0.5, 0.98, 100])
def test_truncated_pth_says_truncated_or_damaged(state_dict, tmp_path, legacy, keep):
    buf = io.BytesIO()
    torch.save(state_dict, buf, _use_new_zipfile_serialization=not legacy)
    data = buf.getvalue()
    path = tmp_path / "cut.pth"
    path.write_bytes(data[: keep if isinstance(keep, int) else int(len(data) * keep)])
    with pytest.raises(CorruptCheckpointError) as err:
        read_checkpoint(path)
    message = _one_line(err)
    assert "cut.pth" in message and "truncated or damaged" in message
    assert "could run code" not in message


@pytest.mark.parametrize(
    "content",
    [bytes(range(256)) * 8, np.random.default_rng(0).bytes(4096), b"hello, this is a text file\n" * 20, b'{"a": 1}',
     pickle.dumps({"a": 1}, protocol=4)],
    ids=["byte-ramp", "random", "text", "json", "plain-pickle-protocol-4"],
)
def test_foreign_bytes_in_a_pth_say_what_the_file_is_not(tmp_path, content):
    path = tmp_path / "noise.pth"
    path.write_bytes(content)
    with pytest.raises(NotACheckpointError) as err:
        read_checkpoint(path)
    message = _one_line(err)
    assert "noise.pth is not a torch checkpoint" in message
    assert "could run code" not in message and "unsafe" not in message.lower()


class _System:
    """Unpickling this calls os.system (it never should)."""

    def __reduce__(self):
        return (os.system, ("true",))


@pytest.mark.parametrize("zipped", [True, False], ids=["zip", "raw-pickle"])
def test_unsafe_pickle_message_keeps_torchs_line_naming_the_global(tmp_path, zipped):
    path = tmp_path / "evil.pth"
    if zipped:
        torch.save({"w": torch.zeros(2), "x": _System()}, path)
    else:
        path.write_bytes(pickle.dumps(_System(), protocol=2))
    with pytest.raises(UnsafeCheckpointError) as err:
        read_checkpoint(path)
    message = _one_line(err)
    assert "evil.pth" in message and "could run code" in message
    assert f"{os.system.__module__}.system" in message  # posix.system (nt.system on Windows)


def test_pickled_module_names_its_class(tmp_path):
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pt")
    with pytest.raises(UnsafeCheckpointError, match=r"GLOBAL torch\.nn\.modules\.linear\.Linear") as err:
        read_checkpoint(tmp_path / "module.pt")
    _one_line(err)


# ----------------------------------------------------------------------------- .safetensors files

_ENTRY = {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}


@pytest.mark.parametrize(
    "header, data, error, needle",
    [
        ([1, 2, 3], b"", NotACheckpointError, "JSON list, not an object"),
        ("text", b"", NotACheckpointError, "JSON str, not an object"),
        ({"w": {"dtype": "F32", "shape": [2, 3]}}, bytes(24), CorruptCheckpointError, "'w'.*lacks data_offsets"),
        ({"w": {**_ENTRY, "data_offsets": [0]}}, bytes(24), CorruptCheckpointError, "'w'.*lacks data_offsets"),
        ({"w": {**_ENTRY, "data_offsets": ["0", 24]}}, bytes(24), CorruptCheckpointError, "'w'.*data_offsets"),
        ({"w": {**_ENTRY, "shape": "2x3"}}, bytes(24), CorruptCheckpointError, "'w'.*lacks a shape"),
        ({"w": {**_ENTRY, "shape": [2, -3]}}, bytes(24), CorruptCheckpointError, "'w'.*lacks a shape"),
        ({"w": {**_ENTRY, "shape": [4, 3]}}, bytes(24), CorruptCheckpointError, r"'w'.*\[4, 3\].*48 bytes.*span 24"),
        ({"w": {**_ENTRY, "dtype": "F16"}}, bytes(24), CorruptCheckpointError, r"'w'.*F16 needs 12 bytes"),
        ({"w": _ENTRY}, bytes(10), CorruptCheckpointError, "'w' lies outside the file"),
        ({"w": [0, 24]}, bytes(24), CorruptCheckpointError, "'w'.*not an object"),
        ({"w": {**_ENTRY, "dtype": "C64"}}, bytes(24), VLALoadingError, "'w' has unsupported dtype"),
    ],
    ids=["list", "string", "no-offsets", "one-offset", "str-offset", "str-shape", "negative-dim", "shape-vs-bytes",
         "dtype-vs-bytes", "truncated", "entry-not-object", "dtype"],
)
def test_malformed_safetensors_header_names_file_and_tensor(tmp_path, header, data, error, needle):
    path = tmp_path / "bad.safetensors"
    _write_safetensors(path, header, data)
    with pytest.raises(error, match=needle) as err:
        read_checkpoint(path)
    assert "bad.safetensors" in _one_line(err)


def test_empty_and_truncated_safetensors(state_dict, tmp_path):
    (tmp_path / "empty.safetensors").write_bytes(b"")
    with pytest.raises(CorruptCheckpointError, match="empty"):
        read_checkpoint(tmp_path / "empty.safetensors")
    full = tmp_path / "full.safetensors"
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(full))
    data = full.read_bytes()
    for cut in (4, 40, len(data) - 7):
        (tmp_path / "cut.safetensors").write_bytes(data[:cut])
        with pytest.raises(VLALoadingError, match="cut.safetensors") as err:
            read_checkpoint(tmp_path / "cut.safetensors")
        _one_line(err)
    assert set(read_checkpoint(full)) == set(state_dict)  # the untouched file still reads


# ----------------------------------------------------------------------------- tensor kinds and values


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_integer_tensor_for_a_float_parameter_names_key_and_both_dtypes(state_dict, tmp_path, fmt):
    key = "action_mean.weight"
    bad = {**state_dict, key: torch.ones_like(state_dict[key], dtype=torch.int32)}
    path = tmp_path / f"int.{fmt}"
    if fmt == "pt":
        torch.save(bad, path)
    else:
        save_file({k: v.contiguous() for k, v in bad.items()}, str(path))
    with pytest.raises(DtypeMismatchError) as err:
        load_vla_model(path, CLASS, CONFIG)
    assert "'action_mean.weight': checkpoint dtype int32 vs model dtype float32" in _one_line(err)


def test_half_precision_is_not_a_dtype_mismatch(state_dict, tmp_path):
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in state_dict.items()}, tmp_path / "half.pt")
    _, variables = load_vla_model(tmp_path / "half.pt", CLASS, CONFIG)
    assert variables["params"]["log_std"].dtype == np.float16


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_non_finite_weights_are_refused_naming_the_first_key(state_dict, tmp_path, value, dtype):
    keys = list(state_dict)
    first, later = keys[len(keys) // 2], keys[-3]
    bad = {k: v.to(dtype) if v.is_floating_point() else v.clone() for k, v in state_dict.items()}
    for key in (later, first):  # two bad tensors: the error names the one the checkpoint holds first
        assert bad[key].is_floating_point(), key
        bad[key].view(-1)[-1] = value
    torch.save(bad, tmp_path / "nan.pt")
    with pytest.raises(NonFiniteWeightsError) as err:
        load_vla_model(tmp_path / "nan.pt", CLASS, CONFIG)
    message = _one_line(err)
    assert f"tensor {first!r} holds non-finite weights (1 of {bad[first].numel()} entries" in message
    assert later not in message and "nan.pt" in message


def test_loading_errors_reach_the_cli_as_config_errors(tmp_path):
    """build_vla_policy turns each into a ConfigError (exit 2) naming policy.vla_config and the file."""
    (tmp_path / "noise.pth").write_bytes(np.random.default_rng(1).bytes(512))

    class Env:
        from jaxrl_vla.envs.base import Box

        action_space = Box(-1.0, 1.0, (2,))

    cfg = {"name": "vla", "action_chunk": 1, "action_dim": None, "dtype": "float32", "freeze": [],
           "vla_config": {"model_path": str(tmp_path / "noise.pth"), "model_class": CLASS,
                          "model_config": dict(CONFIG), "make_checkpoint": None}}
    with pytest.raises(ConfigError, match=r"^policy\.vla_config: .*noise\.pth is not a torch checkpoint"):
        build_vla_policy(cfg, Env())


# ----------------------------------------------------------------------------- td_to_jax's bad inputs


def _tokenizer():
    from jaxrl_vla.tokenizer import WordTokenizer

    return WordTokenizer(["go", "left", "right"], 4)


@pytest.mark.parametrize(
    "tree, needle",
    [
        ({"rgb": torch.zeros(4, 3), "instr": ["go", "left"]}, r"'instr': strings of batch shape \(2,\) next to "
                                                               r"tensors of batch shape \(4,\)"),
        ({"obs": {"rgb": torch.zeros(4, 3)}, "task": {"instr": ["go"] * 5}}, r"'task/instr': strings of batch "
                                                                              r"shape \(5,\)"),
        ({"a": torch.zeros(4), "b": torch.zeros(3), "instr": ["go"] * 4}, r"'instr': 4 strings, but the tensors "
                                                                          r"beside them disagree .*\[3, 4\]"),
    ],
    ids=["flat", "nested", "tensors-disagree"],
)
def test_td_to_jax_strings_whose_batch_differs_from_the_tensors(tree, needle):
    from bridge import td_to_jax

    with pytest.raises(ValueError, match=needle):
        td_to_jax(tree, tokenizer=_tokenizer())


def test_td_to_jax_strings_that_match_the_batch_still_convert():
    from tensordict import NonTensorData, TensorDict

    from bridge import td_to_jax

    out = td_to_jax({"rgb": torch.zeros(2, 3), "instr": ["go left", "right"], "scalar": torch.tensor(1.0),
                     "one": "go"}, tokenizer=_tokenizer())
    assert out["instr"].shape == (2, 4) and out["one"].shape == (4,)
    td = TensorDict({"rgb": torch.zeros(3, 2), "instr": NonTensorData("go", batch_size=[3])}, batch_size=[3])
    assert td_to_jax(td, tokenizer=_tokenizer())["instr_mask"].shape == (3, 4)


@pytest.mark.parametrize(
    "make, needle",
    [
        (lambda: torch.zeros(2, 3, device="meta"), "a meta tensor"),
        (lambda: torch.eye(3).to_sparse(), "sparse_coo tensors"),
        (lambda: torch.eye(3).to_sparse_csr(), "sparse_csr tensors"),
    ],
    ids=["meta", "sparse-coo", "sparse-csr"],
)
def test_td_to_jax_meta_and_sparse_tensors_name_the_key(make, needle):
    from tensordict import TensorDict

    from bridge import td_to_jax

    with pytest.raises(TypeError, match=rf"leaf 'obs/weird': {needle}"):
        td_to_jax({"obs": {"ok": torch.zeros(2), "weird": make()}})
    if needle == "a meta tensor":  # a TensorDict holding it says the same
        with pytest.raises(TypeError, match="leaf 'weird': a meta tensor"):
            td_to_jax(TensorDict({"weird": make()}, batch_size=[2]))


@pytest.mark.parametrize("literal_first", [True, False])
def test_td_to_jax_literal_slash_key_colliding_with_a_nested_key(literal_first):
    from bridge import td_to_jax

    items = [("a/b", torch.zeros(3)), ("a", {"b": torch.ones(3)})]
    tree = dict(items if literal_first else items[::-1])
    with pytest.raises(ValueError, match=r"leaf 'a/b': keys .* both name it") as err:
        td_to_jax(tree)
    assert "'a/b'" in str(err.value) and "'a' -> 'b'" in str(err.value)
    # a slash key that collides with nothing is still a plain key
    assert set(td_to_jax({"a/b": torch.zeros(3), "a": {"c": torch.ones(3)}})) == {"a/b", "a"}
    with pytest.raises(ValueError, match="'x/instr_mask'"):  # a tokenised entry's mask collides too
        td_to_jax({"x/instr_mask": torch.zeros(1, 4), "x": {"instr": ["go"]}}, tokenizer=_tokenizer())


# ----------------------------------------------------------------------------- BatchNorm counters through export


@pytest.fixture(scope="module")
def trained_bn_checkpoint(tmp_path_factory):
    """A torch VLA whose BatchNorm layers really trained: moved statistics and counters (3 and more)."""
    torch.manual_seed(3)
    model = TorchGPTVLA(CONFIG)
    model.vision.train()
    with torch.no_grad():
        for steps, mod in enumerate(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
            mod.num_batches_tracked.fill_(2**40 + 17 * steps)  # distinct per layer, beyond float32's exact integers
        for _ in range(3):  # and a few real training-mode passes on top
            model.vision(pixel_values=torch.rand(4, 3, CONFIG["image_size"], CONFIG["image_size"]))
    model.eval()
    path = tmp_path_factory.mktemp("bn") / "trained_bn.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path, model.state_dict()


@pytest.mark.parametrize("as_mapping", [False, True], ids=["path", "state_dict"])
def test_export_keeps_the_source_batchnorm_counters_bit_exact(trained_bn_checkpoint, tmp_path, as_mapping):
    from safetensors.torch import load_file

    from bridge import export_to_torch

    path, state = trained_bn_checkpoint
    counters = [k for k in state if k.endswith("num_batches_tracked")]
    assert counters and all(int(state[k]) > 2**40 for k in counters)
    _, variables = load_vla_model(path, CLASS, CONFIG)
    out = export_to_torch(variables, CLASS, CONFIG, tmp_path / "out.safetensors",
                          source=state if as_mapping else path)
    exported = load_file(str(out))
    assert set(exported) == set(state)
    for key, tensor in state.items():
        assert exported[key].dtype == tensor.dtype and torch.equal(exported[key], tensor), key
    # and a second round trip from the export is exact too
    _, again = load_vla_model(out, CLASS, CONFIG)
    export_to_torch(again, CLASS, CONFIG, tmp_path / "again.safetensors", source=out)
    assert all(torch.equal(load_file(str(tmp_path / "again.safetensors"))[k], v) for k, v in state.items())


def test_export_without_source_writes_zero_counters_and_a_wrong_source_is_named(trained_bn_checkpoint, tmp_path):
    from safetensors.torch import load_file

    from bridge import export_to_torch
    from bridge.vla_loading import ShapeMismatchError

    path, state = trained_bn_checkpoint
    _, variables = load_vla_model(path, CLASS, CONFIG)
    exported = load_file(str(export_to_torch(variables, CLASS, CONFIG, tmp_path / "zero.safetensors")))
    assert all(int(v) == 0 for k, v in exported.items() if k.endswith("num_batches_tracked"))
    key = next(k for k in state if k.endswith("num_batches_tracked"))
    with pytest.raises(ShapeMismatchError, match=rf"source '{key}'"):
        export_to_torch(variables, CLASS, CONFIG, tmp_path / "bad.safetensors", source={**state, key: torch.zeros(2)})
    assert not (tmp_path / "bad.safetensors").exists()
    legacy = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}  # counters absent: 0
    exported = load_file(str(export_to_torch(variables, CLASS, CONFIG, tmp_path / "legacy.safetensors", source=legacy)))
    assert int(exported[key]) == 0


@pytest.mark.skipif(os.geteuid() == 0 if hasattr(os, "geteuid") else True, reason="root reads any file")
@pytest.mark.parametrize("name", ["locked.pth", "locked.safetensors"])
def test_unreadable_checkpoint_is_one_line(tmp_path, name):
    from bridge.vla_loading import CheckpointReadError

    path = tmp_path / name
    path.write_bytes(b"PK\x03\x04" + bytes(64))
    path.chmod(0)
    with pytest.raises(CheckpointReadError, match=f"cannot read checkpoint .*{name}: Permission denied") as err:
        read_checkpoint(path)
    _one_line(err)


def test_os_errors_while_reading_are_named(tmp_path, monkeypatch):
    """Whatever the OS refuses (here: an I/O error injected into the reader) ends as one named line."""
    from bridge import vla_loading

    def failing(path):
        raise OSError(5, "Input/output error")

    (tmp_path / "disk.safetensors").write_bytes(b"x" * 16)
    monkeypatch.setattr(vla_loading, "read_safetensors", failing)
    with pytest.raises(vla_loading.CheckpointReadError, match=r"cannot read checkpoint .*disk\.safetensors: "
                                                               r"Input/output error"):
        read_checkpoint(tmp_path / "disk.safetensors")
