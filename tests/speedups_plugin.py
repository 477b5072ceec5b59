"""A pytest plugin: the whole run with greenserve.speedups installed in the test process.

    python -m pytest -p tests.speedups_plugin

Fails the run at its start if the accelerator cannot be installed (a run meant to test
it must not silently test without it); says in the header and the summary that it was
on, and how many frame-stack slots it handed out.
"""

from __future__ import annotations

import pytest

from greenserve import speedups


def pytest_configure(config: pytest.Config) -> None:
    if not speedups.install():
        raise pytest.UsageError(f"greenserve.speedups could not be installed: "
                                f"{speedups.reason()}")


def pytest_report_header(config: pytest.Config) -> str:
    return f"greenserve.speedups: installed ({speedups.stats().mode})"


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    s = speedups.stats()
    terminalreporter.write_line(
        f"greenserve.speedups: {s.mode}, {s.slots_handed_out:,} slots handed out, "
        f"{s.slots_in_use} in use, {s.bytes_returned / 2**20:.1f} MiB returned to the OS")
