"""Every command the README and docs/ show exists: each `drop-jobs …` subcommand answers --help,
each `make …` target is in the Makefile, each `python -m …` module can be imported. Docs that
name a command that is gone fail here, not in front of the on-call engineer."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from monitoring.cli import main

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TEXT = "\n".join(p.read_text() for p in DOCS)
# Inline code and the lines of fenced blocks.
SNIPPETS = re.findall(r"`([^`\n]+)`", TEXT) + [
    line.strip().lstrip("$ ") for block in re.findall(r"```[a-z]*\n(.*?)```", TEXT, flags=re.S)
    for line in block.splitlines()
]


def subcommand_path(snippet: str) -> tuple[str, ...]:
    """`drop-jobs dlq replay <id> --all` → ('dlq', 'replay'): the words before the arguments."""
    words = []
    for word in snippet.split()[1:]:
        if not re.fullmatch(r"[a-z][a-z-]*", word):
            break
        words.append(word)
    return tuple(words[:2])


CLI = sorted({subcommand_path(s) for s in SNIPPETS if s.startswith("drop-jobs")} - {()})
MAKE = sorted({s.split()[1] for s in SNIPPETS if re.match(r"make [a-z-]+", s)})
MODULES = sorted({s.split()[2] for s in SNIPPETS if re.match(r"python -m [a-z_.]+", s)})


def test_the_docs_show_commands():
    assert ("status",) in CLI and ("dlq", "replay") in CLI and "test" in MAKE and "worker.pool" in MODULES


@pytest.mark.parametrize("path", CLI, ids=" ".join)
def test_each_documented_cli_command_exists(path, capsys):
    if path[0] == "dlq" and len(path) > 1 and "/" in path[1]:
        pytest.skip("a list of subcommands")
    with pytest.raises(SystemExit) as done:
        main([*path, "--help"])
    assert done.value.code == 0, capsys.readouterr().err


@pytest.mark.parametrize("target", MAKE)
def test_each_documented_make_target_exists(target):
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(rf"^{re.escape(target)}:", makefile, flags=re.M), f"make {target} is not a target"


@pytest.mark.parametrize("module", MODULES)
def test_each_documented_module_can_be_run(module):
    assert importlib.util.find_spec(module) is not None, f"python -m {module}: no such module"
