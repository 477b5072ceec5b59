"""Production-hardening tests (issue #7): overload, fd exhaustion, leaks, hostile clients,
PROXY protocol and TLS end to end, graceful shutdown, unix socket safety, socket
activation and exact stats. Loopback only; each test is bounded by a timeout and waits
on conditions with deadlines, never on guessed sleeps. Run by the normal
``python -m pytest``; ``support.py`` holds what the files share."""
