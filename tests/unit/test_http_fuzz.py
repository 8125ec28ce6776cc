"""The router's request parser (router/proxy/parsing.py) fuzzed against h11, the reference
(issue 23): where the two would read one byte stream into different requests, one reader in
front of the other would be desynchronised (request smuggling).

Two properties, with Hypothesis:

- well-formed pipelines (RFC 9112's grammar, bodies by length or chunked, extensions,
  trailers, OWS, obs-text) are taken by both alike: the same requests, heads and bodies;
- the same pipelines with a few bytes inserted, replaced or removed (CR, LF, NUL, VT, signs,
  framing fields, ...): every request our parser takes, h11 takes, with the same head and
  body, ending at the same byte. Refusing what h11 takes is allowed (a refusal closes the
  connection, so nothing after it is read by anyone).

Both also hold whether the parser gets the stream whole or cut in pieces, and the head start
(headstart/request.parse) takes nothing that the parser reads otherwise.

h11 is given the router's deliberate differences first (h11_as_the_router): it takes obs-text
in a target and HTTP/1.1 without Host (router/http1.py says why), and reads on after an
HTTP/1.0 request (it closes there; the router keeps a 1.0 connection that asks for it).

Bounded for the unit tier: a fixed number of examples, derandomized (the same ones every
run), no example database."""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from typing import Any

import pytest

from hoshikage_sd.router.headstart import request as waking
from hoshikage_sd.router.http1 import TCHAR
from hoshikage_sd.router.proxy import BadRequest, Request, RequestParser
from tests.support import in_ci

try:
    import h11
    from h11 import _events as h11_events
    from h11 import _readers
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover
    if in_ci():
        raise
    pytest.skip("python3-h11 and python3-hypothesis are not installed (tools/bootstrap.sh)",
                allow_module_level=True)

#: HOSHIKAGE_FUZZ_EXAMPLES=20000 for a longer, random (not derandomized) run by hand
DEEP = int(os.environ.get("HOSHIKAGE_FUZZ_EXAMPLES", "0"))
FUZZ = settings(max_examples=DEEP or 100, derandomize=not DEEP, database=None, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
NO_HOST = b"h11-fuzz-no-host"
#: h11's readers, which h11_as_the_router patches (not its API: typed loosely)
h11_readers: Any = _readers

#: (method, target, version, headers, body, keep_alive) of one request
Read = tuple[bytes, bytes, bytes, list[tuple[bytes, bytes]], bytes, bool]


# -- the two readers -----------------------------------------------------------------------
def normal(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """Headers as both readers report them: h11 lower-cases Transfer-Encoding's value."""
    return [(n, v.lower() if n.lower() == b"transfer-encoding" else v) for n, v in headers
            if v != NO_HOST]


def ours(data: bytes, cuts: list[int]) -> tuple[list[Read], int | None, bool]:
    """The requests our parser reads from `data` fed in pieces cut at `cuts`, the status
    it refused with (None: none), and whether it waits for more of a request."""
    got: list[Request] = []
    parser = RequestParser(got.append, max_body=1 << 20)
    status = None
    at = 0
    try:
        for cut in [*sorted(cuts), len(data)]:
            if cut > at:
                parser.feed(data[at:cut])
                at = cut
    except BadRequest as exc:
        status = exc.status
    reads = [(r.method.encode(), r.target.encode("latin-1"), b"HTTP/" + r.version.encode(),
              normal(r.headers), bytes(r.body), r.keep_alive) for r in got]
    return reads, status, not parser.idle or bool(parser.buf)


@contextlib.contextmanager
def h11_as_the_router() -> Iterator[None]:
    """h11 with the router's deliberate differences: obs-text in a target, and no Host
    (a Host with the NO_HOST value stands for none, normal() drops it)."""
    line, target, make = (h11_readers.request_line_re, h11_events.request_target_re,
                          h11_readers.Request)
    obs = rb"[\x21-\x7e\x80-\xff]+"
    h11_readers.request_line_re = re.compile(line.pattern.replace(
        rb"(?P<target>[\x21-\x7e]+)", rb"(?P<target>" + obs + rb")"))
    h11_events.request_target_re = re.compile(obs)
    assert h11_readers.request_line_re.pattern != line.pattern

    def request(**kw: Any) -> Any:
        if kw["http_version"] == b"1.1" and not any(n.lower() == b"host"
                                                     for n, _ in kw["headers"]):
            kw["headers"] = [*kw["headers"], (b"Host", NO_HOST)]
        return make(**kw)

    h11_readers.Request = request
    try:
        yield
    finally:
        h11_readers.request_line_re, h11_events.request_target_re = line, target
        h11_readers.Request = make


def reference(data: bytes) -> tuple[list[Read], str | None]:
    """The requests h11 reads from `data`, and its error (None: none; it may still wait
    for more). After a request that closes the connection it goes on with a fresh one."""
    reads: list[Read] = []
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=1 << 20)
    conn.receive_data(data)
    head: Any = None
    body = b""
    try:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return reads, None
            if isinstance(event, h11.Request):
                head, body = event, b""
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                conn.send(h11.Response(status_code=200, headers=[("Content-Length", "0")]))
                conn.send(h11.EndOfMessage())
                keep = conn.our_state is h11.DONE and conn.their_state is h11.DONE
                reads.append((head.method, head.target, b"HTTP/" + head.http_version,
                              normal(list(head.headers.raw_items())), body, keep))
                if keep:
                    conn.start_next_cycle()
                else:
                    rest = conn.trailing_data[0]
                    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=1 << 20)
                    if not rest:  # (b"" would say the client closed)
                        return reads, None
                    conn.receive_data(rest)
            else:
                raise AssertionError(f"h11 said {event!r}")
    except AssertionError:
        raise
    except Exception as exc:  # RemoteProtocolError, or int()'s ValueError past 4300 digits
        return reads, f"{type(exc).__name__}: {exc}"


def check(data: bytes, cuts: list[int], well_formed: bool) -> None:
    mine, status, waiting = ours(data, cuts)
    assert ours(data, []) == (mine, status, waiting), "the parser reads pieces otherwise"
    with h11_as_the_router():
        ref, error = reference(data)
    for i, request in enumerate(mine):
        assert i < len(ref), f"h11 does not take request {i} ({error}): {request!r}"
        # keep-alive in HTTP/1.0: the router's, not h11's
        n = 5 if request[2] == b"HTTP/1.0" else 6
        assert request[:n] == ref[i][:n], f"request {i} read otherwise"
    early = waking.parse(data)
    if early is not None:
        assert mine, "the head start took a request the parser refuses"
        method, path, _, body = early
        assert (method.encode(), path, body) == (
            mine[0][0], mine[0][1].decode("latin-1").partition("?")[0], mine[0][4])
    if well_formed:
        assert status is None and error is None and not waiting, (status, error)
        assert len(mine) == len(ref)


# -- well-formed pipelines -----------------------------------------------------------------
def text(alphabet: bytes, min_size: int = 0, max_size: int = 8) -> st.SearchStrategy[bytes]:
    return st.text(alphabet=alphabet.decode("latin-1"), min_size=min_size,
                   max_size=max_size).map(lambda s: s.encode("latin-1"))


VCHAR = bytes(range(0x21, 0x7F))
FIELD_VCHAR = VCHAR + b"\x80\xa0\xe9\xff"
token = text(TCHAR, 1, 8)
ows = st.sampled_from([b"", b" ", b"\t", b" \t "])
value = st.lists(text(FIELD_VCHAR, 1, 6), max_size=3).flatmap(
    lambda words: st.lists(st.sampled_from([b" ", b"\t", b"  "]), min_size=len(words),
                           max_size=len(words)).map(
        lambda seps: b"".join(s + w for s, w in zip(seps, words, strict=True)).lstrip(b" \t")))
FRAMING = {b"content-length", b"transfer-encoding", b"host", b"connection", b"upgrade",
           b"expect"}
header = st.tuples(token.filter(lambda n: n.lower() not in FRAMING), ows, value, ows).map(
    lambda t: t[0] + b":" + t[1] + t[2] + t[3] + b"\r\n")
quoted = text(b"\t !#[]~\x80\xff" + bytes(range(0x23, 0x5B)), 0, 6).map(
    lambda s: b'"' + s + b'"')
extension = st.tuples(token, st.one_of(st.just(b""), token.map(lambda t: b"=" + t),
                                       quoted.map(lambda q: b"=" + q))).map(
    lambda t: b";" + t[0] + t[1])


@st.composite
def chunked_body(draw: st.DrawFn, body: bytes) -> bytes:
    out = []
    at = 0
    while at < len(body):
        n = draw(st.integers(1, len(body) - at))
        size = draw(st.sampled_from([b"%x", b"%X", b"0%x", b"000%x"])) % n
        out.append(size + b"".join(draw(st.lists(extension, max_size=2))) + b"\r\n"
                   + body[at:at + n] + b"\r\n")
        at += n
    out.append(draw(st.sampled_from([b"0", b"000"]))
               + b"".join(draw(st.lists(extension, max_size=1))) + b"\r\n")
    out += draw(st.lists(header, max_size=2))
    return b"".join(out) + b"\r\n"


@st.composite
def request(draw: st.DrawFn) -> bytes:
    method = draw(st.one_of(st.sampled_from([b"GET", b"POST", b"PUT", b"DELETE", b"OPTIONS",
                                             b"PATCH", b"HEAD"]), token))
    target = b"/" + draw(text(VCHAR + b"\xc3\xa9", 0, 12))
    version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.0"]))
    fields = draw(st.lists(header, max_size=3))
    if version == b"HTTP/1.1" or draw(st.booleans()):
        fields.insert(draw(st.integers(0, len(fields))), b"Host: " + draw(token) + b"\r\n")
    connection = draw(st.sampled_from([b"", b"", b"keep-alive", b"close", b"Keep-Alive, x"]))
    if connection:
        fields.append(b"Connection: " + connection + b"\r\n")
    body = draw(st.binary(max_size=40))
    framing = draw(st.sampled_from(["none", "length", "chunked"] if version == b"HTTP/1.1"
                                   else ["none", "length"]))
    if framing == "none":
        body = b""
    elif framing == "length":
        fields.append(b"Content-Length: " + draw(ows) + b"%d" % len(body) + draw(ows)
                      + b"\r\n")
    else:
        fields.append(b"Transfer-Encoding: " + draw(st.sampled_from([b"chunked", b"Chunked"]))
                      + b"\r\n")
        body = draw(chunked_body(body))
    fields = draw(st.permutations(fields))
    return method + b" " + target + b" " + version + b"\r\n" + b"".join(fields) + b"\r\n" + body


pipeline = st.lists(request(), min_size=1, max_size=3).map(b"".join)


def cuts_of(data: bytes) -> st.SearchStrategy[list[int]]:
    return st.lists(st.integers(0, len(data)), max_size=4)


@FUZZ
@given(st.data())
def test_well_formed_pipelines_are_read_as_h11_reads_them(data: st.DataObject) -> None:
    stream = data.draw(pipeline)
    check(stream, data.draw(cuts_of(stream)), well_formed=True)


# -- mutated ones --------------------------------------------------------------------------
PIECES = [b"\r", b"\n", b"\r\n", b"\r\n\r\n", b"\x00", b"\x0b", b"\x0c", b"\x7f", b"\x80",
          b"\xff", b" ", b"\t", b"0", b"1", b"a", b"x", b"0x", b"+", b"-", b"_", b";", b":",
          b",", b"=", b'"', b"\\", b"/", b"HTTP/1.1", b"chunked", b"0\r\n\r\n",
          b"Content-Length: 0\r\n", b"Content-Length: 5\r\n",
          b"Transfer-Encoding: chunked\r\n", b"Transfer-Encoding: identity\r\n",
          b"Host: y\r\n", b"Connection: close\r\n", b" x\r\n",
          b"GET / HTTP/1.1\r\nHost: z\r\n\r\n"]


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    stream = bytearray(draw(pipeline))
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(stream)))
        piece = draw(st.sampled_from(PIECES))
        how = draw(st.sampled_from(["insert", "replace", "delete"]))
        if how == "insert":
            stream[at:at] = piece
        elif how == "replace":
            stream[at:at + len(piece)] = piece
        else:
            del stream[at:at + draw(st.integers(1, 4))]
    return bytes(stream)


@FUZZ
@given(st.data())
def test_what_the_parser_takes_from_a_mutated_pipeline_h11_takes_alike(
        data: st.DataObject) -> None:
    stream = data.draw(mutated())
    check(stream, data.draw(cuts_of(stream)), well_formed=False)


def test_the_reference_is_h11_with_the_routers_differences_only() -> None:
    """The patches in h11_as_the_router take what they should, nothing more."""
    with h11_as_the_router():
        assert reference(b"GET /caf\xc3\xa9 HTTP/1.1\r\n\r\n")[0][0][1] == b"/caf\xc3\xa9"
        assert reference(b"GET /a\x00 HTTP/1.1\r\nHost: localhost\r\n\r\n")[1] is not None
        assert reference(b"GET / HTTP/1.1\r\nHost: localhost\r\nHost: y\r\n\r\n")[1] is not None
    assert reference(b"GET /caf\xc3\xa9 HTTP/1.1\r\nHost: localhost\r\n\r\n")[1] is not None
    assert reference(b"GET / HTTP/1.1\r\n\r\n")[1] is not None
