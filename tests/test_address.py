"""greenserve.address: the address types and parse_address."""

from __future__ import annotations

import dataclasses
import os
import socket

import pytest
from hypothesis import given
from hypothesis import strategies as st

from greenserve import Tcp, Udp, Unix, parse_address
from greenserve.address import Fd, from_sockaddr


@pytest.mark.parametrize(
    ("addr", "text"),
    [
        (Tcp("127.0.0.1", 8080), "tcp:127.0.0.1:8080"),
        (Tcp("::1", 8080), "tcp:[::1]:8080"),
        (Unix("/run/x.sock"), "unix:/run/x.sock"),
        (Udp("127.0.0.1", 53), "udp:127.0.0.1:53"),
        (Udp("::1", 53), "udp:[::1]:53"),
        (Fd(3), "fd://3"),
    ],
)
def test_str_is_canonical_and_parses_back(addr: object, text: str) -> None:
    assert str(addr) == text
    assert parse_address(text) == addr


def test_addresses_are_frozen_and_hashable() -> None:
    a = Tcp("127.0.0.1", 1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.port = 2  # type: ignore[misc]
    assert {a, Tcp("127.0.0.1", 1)} == {a}
    assert Tcp("h", 1) != Udp("h", 1)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (8080, Tcp("127.0.0.1", 8080)),
        ("8080", Tcp("127.0.0.1", 8080)),
        (":8080", Tcp("127.0.0.1", 8080)),
        ("localhost:80", Tcp("localhost", 80)),
        ("0.0.0.0:0", Tcp("0.0.0.0", 0)),
        ("[::1]:9", Tcp("::1", 9)),
        ("[fe80::1%eth0]:9", Tcp("fe80::1%eth0", 9)),
        ("tcp://example.org:443", Tcp("example.org", 443)),
        ("TCP://[::]:1", Tcp("::", 1)),
        ("udp://127.0.0.1:53", Udp("127.0.0.1", 53)),
        ("udp://:53", Udp("127.0.0.1", 53)),
        ("unix:/tmp/a.sock", Unix("/tmp/a.sock")),
        ("unix:///tmp/a.sock", Unix("/tmp/a.sock")),
        ("unix:relative.sock", Unix("relative.sock")),
        ("unix:\0abstract", Unix("\0abstract")),
        ("fd://3", Fd(3)),
        (("10.0.0.1", 5), Tcp("10.0.0.1", 5)),
        (("", 5), Tcp("0.0.0.0", 5)),
        (("::1", 5, 0, 0), Tcp("::1", 5)),
        ("  127.0.0.1:7 ", Tcp("127.0.0.1", 7)),
    ],
)
def test_parse_address_forms(value: object, expected: object) -> None:
    assert parse_address(value) == expected


def test_default_host_is_used_when_missing() -> None:
    assert parse_address(":80", default_host="0.0.0.0") == Tcp("0.0.0.0", 80)
    assert parse_address(80, default_host="::") == Tcp("::", 80)


def test_address_objects_are_returned_as_is() -> None:
    for a in (Tcp("h", 1), Udp("h", 1), Unix("/p"), Fd(0)):
        assert parse_address(a) is a


@pytest.mark.parametrize(
    "text",
    ["", "   ", "host", "host:", "host:port", "host:70000", "-1", "70000", "[::1]", "[]:80",
     "a:b:c", "unix:", "unix://", "fd://", "fd://x", "fd://-1", "/tmp/x.sock",
     "tcp://", "tcp://host", "udp://h:99999", "http://h:80x"],
)
def test_garbage_is_a_value_error_naming_the_text(text: str) -> None:
    with pytest.raises(ValueError, match=r"address|port|path|fd|host"):
        parse_address(text)


@pytest.mark.parametrize("value", [None, 1.5, b"127.0.0.1:80", True, [1, 2], ("h",)])
def test_wrong_types(value: object) -> None:
    with pytest.raises((TypeError, ValueError), match="address"):
        parse_address(value)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: Tcp("", 1), "host"),
        (lambda: Tcp("h", -1), "port"),
        (lambda: Tcp("h", 65536), "port"),
        (lambda: Tcp("h", "80"), "port"),  # type: ignore[arg-type]
        (lambda: Tcp("h", True), "port"),
        (lambda: Udp(1, 2), "host"),  # type: ignore[arg-type]
        (lambda: Unix(""), "path"),
        (lambda: Unix("/" + "x" * 200), "path"),
        (lambda: Unix("/" + "x" * 108), "path"),      # 109 bytes: more than sun_path
        (lambda: Unix("\0" + "x" * 108), "path"),
        (lambda: Unix(b"/a\0b"), "path"),           # the kernel would cut it at the NUL
        (lambda: Unix("\ud800"), "path"),           # a surrogate that escapes no byte
        (lambda: Unix(bytearray(b"/x")), "path"),  # type: ignore[arg-type]
        (lambda: Fd(-1), "fd"),
    ],
)
def test_constructors_validate_naming_the_field(make: object, message: str) -> None:
    with pytest.raises((TypeError, ValueError), match=message):
        make()  # type: ignore[operator]


def test_family_and_sockaddr() -> None:
    assert Tcp("127.0.0.1", 1).family == socket.AF_INET
    assert Tcp("::1", 1).family == socket.AF_INET6
    assert Tcp("::1", 1).sockaddr == ("::1", 1)
    assert Unix("/x").family == socket.AF_UNIX
    assert Unix("\0x").abstract and not Unix("/x").abstract


def test_from_sockaddr() -> None:
    assert from_sockaddr(socket.AF_INET, ("1.2.3.4", 5)) == Tcp("1.2.3.4", 5)
    assert from_sockaddr(socket.AF_INET6, ("::1", 5, 0, 0)) == Tcp("::1", 5)
    assert from_sockaddr(socket.AF_INET, ("1.2.3.4", 5), datagram=True) == Udp("1.2.3.4", 5)
    assert from_sockaddr(socket.AF_UNIX, "/p") == Unix("/p")
    assert str(from_sockaddr(socket.AF_UNIX, "")) == "unix:"


def test_from_sockaddr_builds_complete_frozen_addresses() -> None:
    # Built without __init__ (no validation of what the kernel returned): it must still be
    # the same value as the checked constructor's, hashable, printable and frozen.
    made = from_sockaddr(socket.AF_INET6, ("fe80::1%lo", 80, 0, 1))
    assert type(made) is Tcp
    assert made == Tcp("fe80::1%lo", 80) and hash(made) == hash(Tcp("fe80::1%lo", 80))
    assert str(made) == "tcp:[fe80::1%lo]:80" and repr(made) == "Tcp(host='fe80::1%lo', port=80)"
    assert parse_address(str(made)) == made
    with pytest.raises(AttributeError):
        made.port = 81  # type: ignore[misc]


hosts = st.one_of(
    st.ip_addresses().map(str),
    st.from_regex(r"[a-z][a-z0-9-]{0,20}(\.[a-z][a-z0-9-]{0,20}){0,3}", fullmatch=True),
)
ports = st.integers(0, 65535)


@given(st.one_of(
    st.builds(Tcp, hosts, ports),
    st.builds(Udp, hosts, ports),
    st.builds(Unix, st.from_regex(r"/[a-zA-Z0-9_./-]{1,60}", fullmatch=True)),
    st.builds(Fd, st.integers(0, 10_000)),
))
def test_round_trip_through_text(addr: object) -> None:
    assert parse_address(str(addr)) == addr


@given(st.text(max_size=40))
def test_parse_never_raises_anything_else(text: str) -> None:
    try:
        parse_address(text)
    except (ValueError, TypeError):
        pass


# -- unix names that are not plain text ------------------------------------------------------


def test_unix_path_is_text_when_it_can_be_and_bytes_otherwise() -> None:
    assert Unix(b"/run/x.sock") == Unix("/run/x.sock")
    assert type(Unix(b"/run/x.sock").path) is str
    odd = Unix(b"/tmp/c\xff")
    assert odd.path == b"/tmp/c\xff" and odd.sockaddr == b"/tmp/c\xff"
    # what the socket module gives for that name: the same address, the same hash
    assert Unix(os.fsdecode(b"/tmp/c\xff")) == odd
    assert hash(Unix("/tmp/c\udcff")) == hash(odd)
    assert Unix(b"\0name") == Unix("\0name") and Unix(b"\0\xff").abstract


def test_unix_length_limits_are_the_kernels() -> None:
    # sun_path is 108 bytes; Linux takes all of them, for an abstract name (its NUL
    # included) and for a file path (stored without a terminating NUL).
    assert len(Unix(b"\0" + b"\xfe" * 107).sockaddr) == 108
    assert len(Unix("/" + "x" * 107).sockaddr) == 108
    assert Unix("\0").abstract  # the empty abstract name is a name too


@pytest.mark.parametrize(
    ("path", "text"),
    [
        ("/run/ü.sock", "unix:/run/ü.sock"),
        ("a\\b", "unix:a\\b"),  # no escapes in the plain form
        ("//x", "unix:////x"),
        ("\0name", 'unix:"\\x00name"'),
        (b"/tmp/c\xff", 'unix:"/tmp/c\\xff"'),
        ("x\ny", 'unix:"x\\x0ay"'),  # a name cannot forge a log line
        (" a ", 'unix:" a "'),  # parse_address strips outside the quotes only
        ('"q', 'unix:"\\"q"'),
        ('"\\', r'unix:"\"\\"'),  # a quote, a backslash
        ("\u2028", 'unix:"\\xe2\\x80\\xa8"'),  # unprintable: escaped byte by byte
    ],
)
def test_unix_text_is_plain_when_safe_and_quoted_otherwise(path: str | bytes,
                                                           text: str) -> None:
    assert str(Unix(path)) == text
    assert parse_address(text) == Unix(path)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('unix:"/run/x.sock"', "/run/x.sock"),
        ('UNIX:"\\x00abs"', "\0abs"),
        ('  unix:"\\xC3\\xA9"  ', "é"),  # upper-case hex; a UTF-8 name is text
        ("unix:\0abstract", "\0abstract"),  # the unquoted NUL is still taken
    ],
)
def test_parse_quoted_unix_paths(text: str, expected: str) -> None:
    assert parse_address(text) == Unix(expected)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('unix:"/x', "must end with"),
        ('unix:"', "must end with"),
        ('unix:""', "empty unix path"),
        ('unix:"a\\qb"', "write"),
        ('unix:"a"b"', "write"),
        ('unix:"\\x4"', "write"),
        ('unix:"/a\\x00b"', "NUL"),
        ('unix:"\ud800"', "surrogate"),
        ('unix:"\\x00' + "x" * 108 + '"', "108 bytes"),
    ],
)
def test_bad_quoted_unix_paths_name_the_text(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        parse_address(text)
    assert repr(text) in str(info.value)


def test_from_sockaddr_takes_every_unix_form_the_kernel_gives() -> None:
    unnamed = from_sockaddr(socket.AF_UNIX, "")
    assert from_sockaddr(socket.AF_UNIX, None, datagram=True) is unnamed  # recvfrom
    assert from_sockaddr(socket.AF_UNIX, b"") is unnamed
    full = b"\0" + b"\xfe" * 107
    assert from_sockaddr(socket.AF_UNIX, full) == Unix(full)
    assert from_sockaddr(socket.AF_UNIX, "/tmp/c\udcff") == Unix(b"/tmp/c\xff")
    assert from_sockaddr(socket.AF_UNIX, "/" + "y" * 107) == Unix("/" + "y" * 107)


# Every name a unix socket can have: a file path (any bytes but NUL) or an abstract one.
file_names = st.binary(min_size=1, max_size=108).map(
    lambda b: b.replace(b"\0", b"")).filter(bool)
abstract_names = st.binary(max_size=107).map(lambda b: b"\0" + b)


@given(st.one_of(file_names, abstract_names))
def test_every_unix_name_round_trips_and_prints(name: bytes) -> None:
    # What the socket module returns for it: bytes for an abstract name, surrogate-
    # escaped text for a file path.
    kernel = name if name[:1] == b"\0" else os.fsdecode(name)
    addr = from_sockaddr(socket.AF_UNIX, kernel)
    assert addr == Unix(name) == Unix(kernel)
    assert os.fsencode(addr.path) == name
    text = str(addr)
    assert text.isprintable()  # printable: safe for any log or terminal
    assert parse_address(text) == addr
    assert eval(repr(addr), {"Unix": Unix}) == addr


@given(st.text(max_size=40))
def test_parse_of_any_unix_text_raises_only_value_error(text: str) -> None:
    for candidate in (f"unix:{text}", f'unix:"{text}"'):
        try:
            addr = parse_address(candidate)
        except ValueError:
            continue
        assert parse_address(str(addr)) == addr


def test_accepted_peers_of_one_host_share_the_host_string() -> None:
    # Memory per connection: many connections from one client (or proxy) hold one string.
    a = from_sockaddr(socket.AF_INET, ("".join(["127.0.0.", "1"]), 40000))
    b = from_sockaddr(socket.AF_INET, ("".join(["127.0.", "0.1"]), 40001))
    assert a.host == b.host == "127.0.0.1" and a.host is b.host
