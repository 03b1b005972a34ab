"""Every ```python block of README.md and docs/*.md runs as written.

A file's blocks run in order in one namespace (later blocks use the imports and variables of earlier
ones), inside a fresh working directory. A block that cannot run here (a checkpoint on disk, a GPU,
a signature listing) carries `<!-- doctest: skip (reason) -->` on the line just before its fence.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SKIP = re.compile(r"^\s*<!--\s*doctest:\s*skip\s*\((?P<reason>.*\S.*)\)\s*-->\s*$")


def python_blocks(path: Path) -> list[tuple[int, str, str | None]]:
    """(first code line, source, skip reason or None) of each python block, in file order."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].lstrip().startswith("<!--") and "doctest" in lines[i]:
            assert SKIP.match(lines[i]), f"{path.name}:{i + 1}: write the marker as <!-- doctest: skip (reason) -->"
            assert i + 1 < len(lines) and lines[i + 1].strip() == "```python", \
                f"{path.name}:{i + 1}: a skip marker must be on the line just before a ```python fence"
        if lines[i].strip() != "```python":
            i += 1
            continue
        end = i + 1
        while end < len(lines) and lines[end].strip() != "```":
            end += 1
        assert end < len(lines), f"{path.name}:{i + 1}: unclosed ```python block"
        marker = SKIP.match(lines[i - 1]) if i > 0 else None
        blocks.append((i + 2, "\n".join(lines[i + 1:end]), marker["reason"].strip() if marker else None))
        i = end + 1
    return blocks


WITH_PYTHON = [p for p in DOCS if "```python" in p.read_text(encoding="utf-8")]


@pytest.fixture
def two_threads():
    # The examples are sized for the 2-core CI machine; a many-core host would only add thread start-up.
    prev = torch.get_num_threads()
    torch.set_num_threads(min(prev, 2))
    yield
    torch.set_num_threads(prev)


@pytest.mark.parametrize("path", WITH_PYTHON, ids=lambda p: p.name)
def test_doc_examples_run(path, tmp_path, monkeypatch, two_threads):
    # Examples write files (fusion.md saves a stat.pt); they must not land in the checkout.
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    blocks = python_blocks(path)
    runnable = [b for b in blocks if b[2] is None]
    if not runnable:
        pytest.skip(f"every python block of {path.name} is marked skip")
    namespace = {"__name__": "__main__"}
    for first_line, source, _ in runnable:
        # Padding makes traceback line numbers those of the markdown file.
        code = compile("\n" * (first_line - 1) + source, str(path), "exec")
        exec(code, namespace)


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_skip_markers_sit_on_python_blocks(path):
    # A marker that drifted away from its block would silently skip nothing (or the wrong block).
    python_blocks(path)
