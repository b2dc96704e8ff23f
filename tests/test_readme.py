"""The README as a user reads it: its Python blocks run as written, and every file it names exists."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
PY_BLOCKS = re.findall(r"```python\n(.*?)```", README, flags=re.DOTALL)
PATH = re.compile(r"(?<![\w/.-])((?:configs|docs|benchmarks|bridge|jaxrl_vla|tests)/[\w/.-]*\w)")


def test_readme_has_python_blocks():
    assert len(PY_BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(PY_BLOCKS)))
def test_readme_python_block_runs(index, tmp_path, monkeypatch):
    if "import torch" in PY_BLOCKS[index]:
        pytest.importorskip("torch")
        pytest.importorskip("tensordict")
    monkeypatch.chdir(tmp_path)  # outputs ("runs") land in a temporary directory
    exec(compile(PY_BLOCKS[index], f"README.md python block {index}", "exec"), {"__name__": "__readme__"})


def test_every_linked_or_named_file_exists():
    links = [t for t in re.findall(r"\]\(([^)#\s]+)", README) if not t.startswith(("http://", "https://"))]
    named = [m for m in PATH.findall(README) if "<" not in m]
    missing = sorted({p for p in links + named if not (ROOT / p).exists()})
    assert not missing, f"README names files that do not exist: {missing}"


def test_readme_is_a_guide_not_a_log():
    assert len(README.splitlines()) < 250
