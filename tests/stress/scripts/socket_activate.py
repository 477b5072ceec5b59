"""Start ``greenserve`` the way systemd's socket activation does (run by
tests/stress/test_activation.py).

``python socket_activate.py FD [FD ...] -- CLI-ARGS``: the inherited FDs are moved to
3, 4, ... (sd_listen_fds' numbering), ``LISTEN_FDS`` is their count and ``LISTEN_PID``
this process; then the CLI runs with CLI-ARGS.
"""

import fcntl
import os
import sys

split = sys.argv.index("--")
inherited = [int(a) for a in sys.argv[1:split]]
# Park them above the target range first: moving one onto 3 must not clobber another.
parked = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in inherited]
for fd in inherited:
    os.close(fd)
for i, fd in enumerate(parked):
    os.dup2(fd, 3 + i)  # inheritable, as systemd passes them
    os.close(fd)
os.environ["LISTEN_FDS"] = str(len(parked))
os.environ["LISTEN_PID"] = str(os.getpid())

from greenserve.cli import main  # noqa: E402  (after the fds are in place)

sys.exit(main(sys.argv[split + 1:]))
