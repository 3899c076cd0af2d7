"""Keep docs/benchmarks.md as sections that each benchmark script rewrites on its own."""

from __future__ import annotations

import re
from pathlib import Path

HEADER = "# Benchmarks\n\nEvery number here is written by a script in `benchmarks/`; rerun it to refresh its section.\n"


def replace_section(path: Path, key: str, title: str, body: str) -> None:
    """Replace (or append) the text between the markers of section `key`."""
    text = path.read_text() if path.is_file() else HEADER
    block = f"<!-- {key}:start -->\n## {title}\n\n{body.strip()}\n<!-- {key}:end -->"
    pattern = re.compile(rf"<!-- {re.escape(key)}:start -->.*?<!-- {re.escape(key)}:end -->", re.DOTALL)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
