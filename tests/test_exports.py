"""The public surface (docs/index.md and the pages it links): every name is importable
from ``greenserve`` and is the object of its home module; ``import greenserve`` imports
no gunicorn and monkey-patches nothing (checked in a fresh interpreter)."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

import greenserve

ROOT = Path(__file__).parent.parent

# Every public name (and every error class of docs/errors.md), with the module each lives in.
EXPORTS = {
    "Switch": "greenserve.switch",
    "Tcp": "greenserve.address",
    "Unix": "greenserve.address",
    "Udp": "greenserve.address",
    "parse_address": "greenserve.address",
    "Flow": "greenserve.flow",
    "ListeningSocket": "greenserve.flow",
    "DatagramSocket": "greenserve.flow",
    "Reader": "greenserve.stream",
    "Writer": "greenserve.stream",
    "StreamServer": "greenserve.server",
    "NetError": "greenserve.errors",
    "ConnectionFailure": "greenserve.errors",
    "Refused": "greenserve.errors",
    "ConnectTimeout": "greenserve.errors",
    "NoMatchingAddresses": "greenserve.errors",
    "ConnectInterrupted": "greenserve.errors",
    "AddressLookupFailed": "greenserve.errors",
    "ConnectionReset": "greenserve.errors",
    "WriterBufferAgeExceeded": "greenserve.errors",
    "IncompleteRead": "greenserve.errors",
    "LineTooLong": "greenserve.errors",
    "Cancelled": "greenserve.errors",
}
MODULES = {"net": "greenserve.net", "tcp": "greenserve.tcp"}


@pytest.mark.parametrize("name", sorted(EXPORTS))
def test_name_is_exported_and_is_its_home_modules_object(name: str) -> None:
    home = importlib.import_module(EXPORTS[name])
    assert getattr(greenserve, name) is getattr(home, name)
    assert name in greenserve.__all__


@pytest.mark.parametrize("name", sorted(MODULES))
def test_submodule_is_exported(name: str) -> None:
    assert getattr(greenserve, name) is importlib.import_module(MODULES[name])
    assert name in greenserve.__all__


def test_every_error_class_is_exported() -> None:
    from greenserve import errors

    for name in errors.__all__:
        assert getattr(greenserve, name) is getattr(errors, name), name


def test_star_import_gives_every_name_of_all() -> None:
    namespace: dict[str, object] = {}
    exec("from greenserve import *", namespace)
    assert set(EXPORTS) | set(MODULES) <= set(namespace)
    assert all(namespace[name] is getattr(greenserve, name) for name in greenserve.__all__)


def test_tcp_hands_out_the_same_reader_and_writer() -> None:
    assert greenserve.tcp.Reader is greenserve.Reader
    assert greenserve.tcp.Writer is greenserve.Writer


CHECK_IMPORT = """
import select, socket, ssl, sys, threading, time
before = (socket.socket, socket.create_connection, select.select, ssl.SSLContext,
          threading.Thread, threading.Lock, time.sleep)
import greenserve
import gevent.monkey
after = (socket.socket, socket.create_connection, select.select, ssl.SSLContext,
         threading.Thread, threading.Lock, time.sleep)
assert "gunicorn" not in sys.modules, "gunicorn imported"
assert "greenserve.gunicorn" not in sys.modules, "greenserve.gunicorn imported"
assert not gevent.monkey.is_anything_patched(), "something is monkey-patched"
assert before == after, "a stdlib object was replaced"
assert socket.socket.__module__ == "socket", socket.socket
print("clean")
"""


def test_import_greenserve_neither_imports_gunicorn_nor_patches() -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    proc = subprocess.run([sys.executable, "-c", CHECK_IMPORT], capture_output=True,
                          text=True, timeout=30, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "clean"
