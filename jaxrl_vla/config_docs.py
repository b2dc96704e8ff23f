"""Regenerate docs/config.md from the code: `python -m jaxrl_vla.config_docs`.

Three parts, each read from the code so that it cannot go stale: the run config's schema
(`jaxrl_vla.config`), the keyword arguments of every shipped env (their constructors'
signatures) and the fields of each model config (`GPTVLAModel`'s `VLAModelConfig`, the flow
expert's `FlowExpertConfig`).
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from pathlib import Path
from typing import Any

from jaxrl_vla.config import schema_markdown

HEADER = """# Configuration reference

Every field of a run config, generated from the code (`python -m jaxrl_vla.config_docs`).
Configs are JSON (with `//` and `/* */` comments) or YAML, in the seed's shape:
`{"trainer": {...}, "algorithm": {"name": "ppo", "cfg": {...}}, "policy": {...}, "env": {...}}`.
Any field can be overridden on the command line: `--set algorithm.cfg.learning_rate=1e-4`.

Units: steps are env steps of one env unless said otherwise; a "transition" is one step of one env.

"""

_WORDS = {"int": "an integer", "float": "a number", "bool": "true/false", "str": "text", "None": "null",
          "dict": "an object", "Any": "any value"}


def type_words(annotation: Any) -> str:
    """An annotation ("int | None", "tuple[int, ...]", float) as users say it ("an integer or null")."""
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    parts = [p.strip() for p in re.split(r"\|(?![^\[]*\])", text)]
    words = []
    for part in parts:
        base = part.split("[", 1)[0].strip()
        words.append("a list" if base in ("tuple", "list", "Sequence") else _WORDS.get(base, part))
    if "a number" in words and "an integer" in words:
        words.remove("an integer")
    return " or ".join(dict.fromkeys(words))


def _default(value: Any) -> str:
    if value is inspect.Parameter.empty or value is dataclasses.MISSING:
        return "required"
    if isinstance(value, str):
        return f'`"{value}"`'
    return f"`{value!r}`".replace("None", "null").replace("True", "true").replace("False", "false")


def _first_line(doc: str | None) -> str:
    return (doc or "").strip().splitlines()[0] if doc and doc.strip() else ""


def env_factories() -> list[tuple[str, Any]]:
    """(config name, constructor) of every shipped env: the registry's and Meta-World's."""
    from jaxrl_vla import envs

    out = [(name, envs._resolve(envs._REGISTRY[name])) for name in envs.available_envs()]
    try:
        from jaxrl_vla.envs.metaworld import MetaWorldEnv
    except ImportError:  # the extra is not installed: documented from its source next time
        return out
    return out + [("metaworld:<MT10|MT50|task>", MetaWorldEnv)]


def env_kwargs_markdown() -> str:
    lines = ["## Env keyword arguments", "",
             "Every key of the `env` section besides `name` (and `type`) is a keyword argument of the env's "
             "constructor; unknown keys and values of the wrong type are refused by name.", ""]
    for name, factory in env_factories():
        lines += [f"### `{name}`", "", _first_line(factory.__doc__), "",
                  "| key | type | default |", "| --- | --- | --- |"]
        for param in inspect.signature(factory).parameters.values():
            if param.kind in (param.VAR_KEYWORD, param.VAR_POSITIONAL) or param.name == "self":
                continue
            kind = type_words(param.annotation) if param.annotation is not param.empty else type_words(
                type(param.default).__name__ if param.default not in (param.empty, None) else "Any")
            lines.append(f"| `{param.name}` | {kind} | {_default(param.default)} |")
        lines.append("")
    return "\n".join(lines)


def dataclass_markdown(title: str, intro: str, cls: type) -> str:
    lines = [f"## {title}", "", intro, "", "| field | type | default |", "| --- | --- | --- |"]
    for field in dataclasses.fields(cls):
        if not field.init:
            continue
        default = field.default if field.default is not dataclasses.MISSING else (
            field.default_factory() if field.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
        lines.append(f"| `{field.name}` | {type_words(field.type)} | {_default(default)} |")
    return "\n".join(lines) + "\n"


def model_configs_markdown() -> str:
    from jaxrl_vla.models.vla.flow_expert import FlowExpertConfig
    from jaxrl_vla.models.vla.gpt_vla import VLAModelConfig

    return "\n".join([
        dataclass_markdown("`policy.vla_config.model_config` of GPTVLAModel",
                           "The built-in `bridge.vla_models.GPTVLAModel` (torch) and its Flax twin share these "
                           "fields (`jaxrl_vla/models/vla/gpt_vla.py`). Other model classes take their own "
                           "constructor arguments; decoder LMs (`policy.action_head`) a config.json-style dict.",
                           VLAModelConfig),
        dataclass_markdown("`policy.action_head.expert` (flow matching)",
                           "The flow-matching action expert; `chunk` and `action_dim` come from "
                           "`policy.action_chunk` and the env, the prefix layout from the LM.", FlowExpertConfig),
    ])


def document() -> str:
    return HEADER + schema_markdown() + "\n" + env_kwargs_markdown() + "\n" + model_configs_markdown()


def main() -> None:
    path = Path(__file__).resolve().parents[1] / "docs" / "config.md"
    path.write_text(document())
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
