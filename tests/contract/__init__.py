"""The contract suite: every face x every transport it offers x the behaviours users rely on.

Run the way anyio runs its tests over backends: one test function per behaviour,
parametrized over (face, transport[, stop mode]). Its purpose is to catch the bugs that
live *between* a face and a transport (a TLS-only stall in one face's writer, a stop
path that breaks only while a handshake is running, a unix peer name that one layer
cannot represent).

- ``handlers.py``: the one handler contract every face runs (a request line with a
  command: ``peer``, ``echo``, ``big N``, ``hold``), adapted to each face's handler
  signature; also imported by the subprocess faces (``tests.contract.handlers:serve``).
- ``faces.py``: the transports (how to listen, how a client connects: PROXY header,
  TLS) and the face drivers (start a face on a transport, give its addresses, stop it
  gracefully with a deadline / abort it / cancel it, read its stats and logs).
- ``test_contract.py``: the behaviours.

Faces in this process run under the autouse leak check of ``tests/conftest.py`` (no fd,
no greenlet left behind); the subprocess faces (gunicorn's ``TCPWorker``, the command)
are checked by their exit status, their log and how long their stop takes.
"""
