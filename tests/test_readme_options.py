"""README's detector option tables say what the code does: every option, its default, its description."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from detectors.base import registry

README = Path(__file__).resolve().parents[1] / "README.md"


def options_table(cls) -> list[str]:
    """The table rows README should hold for a detector class (paste them when this test fails)."""
    return [f"| `{key}` | `{f.default!r}` | {f.description} |" for key, f in cls.Options.model_fields.items()]


@pytest.mark.parametrize("name", list(registry()))
def test_readme_option_table_matches_the_detector(name: str) -> None:
    text = README.read_text(encoding="utf-8")
    m = re.search(rf"#### `{name}` options\n\n\| key \| default \| meaning \|\n\| --- \| --- \| --- \|\n((?:\|.*\n)*)",
                  text)
    assert m, f"README.md: no '#### `{name}` options' table"
    expected = options_table(registry()[name])
    assert m.group(1).splitlines() == expected, "README.md: `{}` options table is stale; it should read:\n{}".format(
        name, "\n".join(expected))
