"""Every shell command and JSON block in the README (and every ``capplug`` command in docs/) is
valid as written.

The Python snippets run in ``tests/integration/test_readme.py``; here each ``capplug`` command of
a ``bash`` block is parsed by the real command-line parser (so a renamed option or a missing
argument fails), each ``make`` target exists in the Makefile, each JSON block parses, and every
top-level folder the layout block names exists.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from capplug.cli.main import build_parser

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text(encoding="utf-8")
BLOCKS = re.findall(r"^```(\w*)\n(.*?)^```", README, re.S | re.M)


def _commands(block: str) -> list[str]:
    """The block's commands: continuation lines joined, comments and blank lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", block)
    lines = [line.split(" # ")[0].split("  #")[0].strip() for line in joined.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def _variants(command: str) -> list[list[str]]:
    """``capplug store list | show ID`` is two commands; ``[--opt value]`` is written out."""
    words = shlex.split(command.replace("[", " ").replace("]", " "))
    if ">" in words:  # a redirection is the shell's, not the command's
        words = words[: words.index(">")]
    head, rest = words[:2], words[2:]
    if "|" not in rest:
        return [words]
    alternatives, current = [], []
    for word in rest:
        if word == "|":
            alternatives.append(current)
            current = []
        else:
            current.append(word)
    return [head + alternative for alternative in [*alternatives, current]]


SHELL = [c for lang, block in BLOCKS if lang in ("bash", "sh") for c in _commands(block)]
DOCS = [
    c
    for page in sorted((ROOT / "docs").glob("*.md"))
    for lang, block in re.findall(r"^```(\w*)\n(.*?)^```", page.read_text("utf-8"), re.S | re.M)
    if lang in ("bash", "sh")
    for c in _commands(block)
]
CAPPLUG = [c for c in SHELL if c.startswith("capplug ")]
DOCUMENTED = CAPPLUG + [c for c in DOCS if c.startswith("capplug ") and c not in CAPPLUG]


def test_the_readme_has_the_commands_a_newcomer_runs() -> None:
    assert "make demo" in SHELL and "make test" in SHELL
    assert len(CAPPLUG) >= 12  # the rest of each command family is in docs/ (parsed below too)


@pytest.mark.parametrize("command", DOCUMENTED, ids=[c[:50] for c in DOCUMENTED])
def test_a_documented_command_parses_as_written(command: str) -> None:
    parser = build_parser()
    for words in _variants(command):
        # argparse exits with status 2 on an unknown option or a missing argument.
        args = parser.parse_args(words[1:])
        assert callable(getattr(args, "run", None)), f"{' '.join(words)} names no command"


def test_every_make_target_in_the_readme_exists() -> None:
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    targets = {m.group(1) for m in re.finditer(r"^([a-z][\w-]*):", makefile, re.M)}
    used = {c.split()[1] for c in SHELL if c.startswith("make ")}
    assert used and used <= targets


def test_every_json_block_parses() -> None:
    blocks = [block for lang, block in BLOCKS if lang == "json"]
    assert blocks
    for block in blocks:
        json.loads(block)


def test_every_top_level_folder_of_the_layout_exists() -> None:
    (layout,) = [block for lang, block in BLOCKS if lang == "" and "src/capplug/" in block]
    folders = re.findall(r"^([a-z][\w./-]*/)\s", layout, re.M)
    assert "src/capplug/" in folders and "tests/" in folders
    for folder in folders:
        assert (ROOT / folder).is_dir(), folder
