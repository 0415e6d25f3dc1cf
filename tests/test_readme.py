"""The README's Python examples run as written."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_examples_run(tmp_path, monkeypatch):
    """Each block runs alone, in a namespace of its own, as a reader would paste just that one (in order: a block
    may read a file an earlier one wrote, as a reader following the README would have it)."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks
    monkeypatch.chdir(tmp_path)  # examples may write files
    for i, block in enumerate(blocks):
        exec(compile(block, f"{README} (python block {i})", "exec"), {})


def test_ci_runs_the_readme_test_command():
    ci = (README.parent / ".ci" / "run").read_text()
    command = 'pip install -e ".[test]" && python -m pytest -q -n 2 --dist loadfile\n'
    assert command in README.read_text() and command in ci
