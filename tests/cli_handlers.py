"""Handlers loaded by the CLI tests as ``tests.cli_handlers:NAME``."""

import os


def whoami(flow, addr):
    flow.write(b"%d %s\n" % (os.getpid(), str(addr).encode()))
    while flow.read():
        pass


not_callable = 42
