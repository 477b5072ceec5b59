"""Every runnable snippet of README.md and docs/*.md runs and prints what it says.

The convention (docs/index.md, "Snippets"): a block fenced with ```python is a complete
program: pasted into a file, it runs, and its ``# prints: ...`` comments, in order, are
exactly the lines it prints on stdout. A block fenced with ```py is a fragment (a
signature, a sketch with names left to the reader, a server that runs until Ctrl-C) and
is not run. In a ``# prints:`` line, ``*`` stands for any text (a port the OS chose, an
object's id). Each snippet runs in its own interpreter (a fresh process: some install
signal handlers or monkey-patch), from an empty directory, with a timeout.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from gevent import subprocess

ROOT = Path(__file__).parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# A snippet is a few lines of loopback traffic: seconds at most, even on a loaded machine.
SNIPPET_TIMEOUT = 30
# ```python (runnable) or ```py (a fragment), up to the closing fence.
FENCE = re.compile(r"^```(python|py)\n(.*?)^```$", re.M | re.S)
PRINTS = re.compile(r"^\s*# prints: ?(.*)$", re.M)

pytestmark = pytest.mark.no_leak_check  # each snippet runs in a child process


@dataclass(frozen=True)
class Snippet:
    path: Path
    line: int
    code: str

    @property
    def name(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"

    @property
    def expected(self) -> list[str]:
        return PRINTS.findall(self.code)


def snippets(kind: str) -> list[Snippet]:
    found = []
    for path in DOCS:
        text = path.read_text()
        for match in FENCE.finditer(text):
            if match.group(1) == kind:
                line = text.count("\n", 0, match.start()) + 2  # the block's first line
                found.append(Snippet(path, line, match.group(2)))
    return found


RUNNABLE = snippets("python")


def test_the_docs_have_runnable_snippets() -> None:
    # Guards the extraction itself: a changed fence style would silently run nothing.
    assert len(RUNNABLE) >= 30
    assert {s.path.name for s in RUNNABLE} >= {"README.md", "net.md", "cli.md", "server.md"}


@pytest.mark.parametrize("snippet", RUNNABLE, ids=lambda s: s.name)
def test_snippet_runs_and_prints_what_it_says(snippet: Snippet, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    proc = subprocess.run([sys.executable, "-c", snippet.code], cwd=tmp_path, env=env,
                          capture_output=True, timeout=SNIPPET_TIMEOUT)
    out, err = proc.stdout.decode(), proc.stderr.decode()
    assert proc.returncode == 0, f"{snippet.name} failed:\n{err}"
    if snippet.expected:
        lines = out.splitlines()
        assert len(lines) == len(snippet.expected) and all(
            matches(want, got) for want, got in zip(snippet.expected, lines, strict=True)
        ), f"{snippet.name} printed:\n{out}\nexpected:\n" + "\n".join(snippet.expected)


def matches(expected: str, line: str) -> bool:
    """``line`` is ``expected``, where each ``*`` of ``expected`` stands for any text."""
    pattern = ".*".join(re.escape(part) for part in expected.split("*"))
    return re.fullmatch(pattern, line) is not None


def test_matches() -> None:
    assert matches("['connecting to tcp:127.0.0.1:*']", "['connecting to tcp:127.0.0.1:80']")
    assert matches("b'hello'", "b'hello'")
    assert not matches("b'hello'", "b'hello' ")
    assert not matches("port *", "host 1")


def test_prints_comments_are_only_in_runnable_snippets() -> None:
    # A "# prints:" in a fragment would be a promise nobody checks.
    unchecked = [s.name for s in snippets("py") if s.expected]
    assert not unchecked, unchecked
