"""Code shown in the docs is the code that runs."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_worked_example_is_strategies_fedprox_line_for_line() -> None:
    doc = (ROOT / "docs" / "architecture.md").read_text()
    section = doc.split("### Adding a strategy: a worked example", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, flags=re.DOTALL)
    assert match, "docs/architecture.md: no python block in the worked example"
    assert match.group(1) == (ROOT / "strategies" / "fedprox.py").read_text()
