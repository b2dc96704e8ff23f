"""Regenerate docs/config.md from the schema: `python -m jaxrl_vla.config_docs`."""

from pathlib import Path

from jaxrl_vla.config import schema_markdown

HEADER = """# Configuration reference

Every field of a run config, generated from `jaxrl_vla/config.py` (`python -m jaxrl_vla.config_docs`).
Configs are JSON (with `//` and `/* */` comments) or YAML, in the seed's shape:
`{"trainer": {...}, "algorithm": {"name": "ppo", "cfg": {...}}, "policy": {...}, "env": {...}}`.
Any field can be overridden on the command line: `--set algorithm.cfg.learning_rate=1e-4`.

Units: steps are env steps of one env unless said otherwise; a "transition" is one step of one env.

"""


def main() -> None:
    path = Path(__file__).resolve().parents[1] / "docs" / "config.md"
    path.write_text(HEADER + schema_markdown())
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
