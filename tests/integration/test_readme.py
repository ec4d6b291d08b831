"""Every Python snippet in the README runs as written, with the packaged models.

A snippet that needs a running server says so in an HTML comment on the line above it
(``<!-- snippet not run by tests: ... -->``) and is only compiled; every other one is executed
in a fresh namespace, in a temporary working folder.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

README = Path(__file__).resolve().parents[2] / "README.md"
_BLOCK = re.compile(r"(<!-- snippet not run by tests: [^>]*-->\n)?```python\n(.*?)```", re.S)
SNIPPETS = [(bool(m.group(1)), m.group(2)) for m in _BLOCK.finditer(README.read_text())]


def test_the_readme_has_snippets_and_most_of_them_run() -> None:
    assert len(SNIPPETS) >= 5
    assert sum(not skipped for skipped, _ in SNIPPETS) >= 3


@pytest.mark.parametrize(
    ("skipped", "code"),
    SNIPPETS,
    ids=[f"snippet-{i}-{c.splitlines()[0][:30]}" for i, (_, c) in enumerate(SNIPPETS)],
)
def test_a_readme_snippet_runs_as_written(
    skipped: bool, code: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    compiled = compile(code, "README.md snippet", "exec")  # every snippet is valid Python
    if skipped:
        return
    monkeypatch.chdir(tmp_path)  # snippets that write files write them here
    exec(compiled, {"__name__": "readme_snippet"})
