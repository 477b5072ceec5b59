"""A raw TCP handler for tests/test_gunicorn.py: ``gunicorn -k greenserve.gunicorn.TCPWorker
tcp_echo:echo`` echoes every byte back until the client closes."""

from __future__ import annotations

from typing import Any

from greenserve import Flow


def echo(flow: Flow, addr: Any) -> None:
    while data := flow.read():
        flow.write(data)
