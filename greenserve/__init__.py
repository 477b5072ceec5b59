"""greenserve: servers and connections for gevent.

Layers, bottom up:

- ``errors``, ``address``: what goes wrong and where things are.
- ``switch``: structured concurrency; the owner of every fiber and socket.
- ``flow``: the socket wrappers users hold (Flow, ListeningSocket, DatagramSocket).
- ``_acceptor``: THE engine — batched accepts on the hub, the exact connection limit,
  drop-incoming, EMFILE back-off; every server face runs on it.
- Faces: ``net`` (Eio's Net), ``tcp`` (Async's Tcp), ``server.StreamServer``
  (gevent's), ``gunicorn`` (workers, imported explicitly) and the ``greenserve`` command.

``import greenserve`` never monkey-patches and never imports gunicorn.
"""

from __future__ import annotations

from . import net as net
from . import tcp as tcp
from ._version import __version__ as __version__
from .address import Tcp as Tcp
from .address import Udp as Udp
from .address import Unix as Unix
from .address import parse_address as parse_address
from .errors import AddressLookupFailed as AddressLookupFailed
from .errors import Cancelled as Cancelled
from .errors import ConnectInterrupted as ConnectInterrupted
from .errors import ConnectionFailure as ConnectionFailure
from .errors import ConnectionReset as ConnectionReset
from .errors import ConnectTimeout as ConnectTimeout
from .errors import IncompleteRead as IncompleteRead
from .errors import LineTooLong as LineTooLong
from .errors import NetError as NetError
from .errors import NoMatchingAddresses as NoMatchingAddresses
from .errors import Refused as Refused
from .errors import WriterBufferAgeExceeded as WriterBufferAgeExceeded
from .flow import DatagramSocket as DatagramSocket
from .flow import Flow as Flow
from .flow import ListeningSocket as ListeningSocket
from .server import StreamServer as StreamServer
from .stream import Reader as Reader
from .stream import Writer as Writer
from .switch import Switch as Switch

__all__ = [
    "AddressLookupFailed", "Cancelled", "ConnectInterrupted", "ConnectTimeout",
    "ConnectionFailure", "ConnectionReset", "DatagramSocket", "Flow", "IncompleteRead",
    "LineTooLong", "ListeningSocket", "NetError", "NoMatchingAddresses", "Reader", "Refused",
    "StreamServer",
    "Switch", "Tcp", "Udp", "Unix", "Writer", "WriterBufferAgeExceeded", "net",
    "parse_address", "tcp",
]
