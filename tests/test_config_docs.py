"""docs/config.md is generated from the code: the schema, every shipped env's keyword arguments and the
model configs' fields; it must be current, and its types are worded as users say them."""

from pathlib import Path

import pytest

from jaxrl_vla import config_docs

DOC = Path(__file__).resolve().parents[1] / "docs" / "config.md"


def test_config_md_is_current():
    pytest.importorskip("metaworld")  # the generator documents Meta-World's arguments when it is installed
    assert DOC.read_text() == config_docs.document(), "docs/config.md is stale: python -m jaxrl_vla.config_docs"


def test_every_env_kwarg_and_model_field_is_documented():
    text = config_docs.document()
    import dataclasses
    import inspect

    from jaxrl_vla.models.vla.gpt_vla import VLAModelConfig

    for name, factory in config_docs.env_factories():
        for param in inspect.signature(factory).parameters:
            assert f"| `{param}` |" in text, (name, param)
    fields = [f.name for f in dataclasses.fields(VLAModelConfig)]
    assert len(fields) >= 25 and all(f"| `{f}` |" in text for f in fields)


@pytest.mark.parametrize("annotation,words", [
    ("int", "an integer"), ("float", "a number"), ("int | None", "an integer or null"), ("str", "text"),
    ("tuple[int, ...] | None", "a list or null"), ("bool", "true/false"), (float, "a number"),
])
def test_types_are_worded_as_users_say_them(annotation, words):
    assert config_docs.type_words(annotation) == words
