"""The router's HTTP/1.1 request parser (router/proxy/parsing.py, router/http1.py) is strict
where a lenient one lets two readers of one stream frame it apart (issue 23): each vector
below is a 400 (or the status named) from the parser, from the router's front before its
handler (which is what starts models) sees anything, and no head start (router/headstart)
for it. tests/unit/test_http_fuzz.py fuzzes the parser against h11."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hoshikage_sd import protocol
from hoshikage_sd.router import server
from hoshikage_sd.router.config import load_config
from hoshikage_sd.router.headstart import request as waking
from hoshikage_sd.router.headstart import take
from hoshikage_sd.router.proxy import BadRequest, Proxy, Request, RequestParser, Response
from hoshikage_sd.sd import units

HEAD = b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n"
BODY = b'{"model": "tiny"}'
CHUNKED = HEAD + b"Transfer-Encoding: chunked\r\n\r\n"


def chunked(size_line: bytes, trailers: bytes = b"") -> bytes:
    """A chunked request whose one chunk has `size_line` for 0x11 bytes (len(BODY))."""
    return CHUNKED + size_line + b"\r\n" + BODY + b"\r\n0\r\n" + trailers + b"\r\n"


def field(line: bytes) -> bytes:
    """A request with the header line `line` and a Content-Length body."""
    return HEAD + line + b"\r\nContent-Length: %d\r\n\r\n" % len(BODY) + BODY


#: (request bytes, status): each must be refused, whole, before a handler sees it
VECTORS: dict[str, tuple[bytes, int]] = {
    # chunk sizes that int(size, 16) takes
    "chunk size 0x11": (chunked(b"0x11"), 400),
    "chunk size +11": (chunked(b"+11"), 400),
    "chunk size 1_1": (chunked(b"1_1"), 400),
    "chunk size SP 11": (chunked(b" 11"), 400),
    "chunk size 11 SP": (chunked(b"11 "), 400),
    "chunk size HTAB 11": (chunked(b"\t11"), 400),
    "chunk size 11 VT": (chunked(b"11\x0b"), 400),
    "chunk size -0": (chunked(b"-0"), 400),
    "chunk size empty": (chunked(b""), 400),
    "chunk size 17 digits": (chunked(b"0" * 15 + b"11"), 400),
    "chunk size overflowing": (chunked(b"f" * 16), 413),
    "chunk size full-width digit": (chunked("１１".encode()), 400),
    # chunk extensions: ext-name, then "=" token or quoted-string, nothing else
    "chunk ext empty": (chunked(b"11;"), 400),
    "chunk ext NUL": (chunked(b"11;a=\x00"), 400),
    "chunk ext bare CR": (chunked(b"11;a\rb"), 400),
    "chunk ext bare LF": (chunked(b"11;a\nb"), 400),
    "chunk ext SP": (chunked(b"11;a b"), 400),
    "chunk ext BWS": (chunked(b"11 ;a"), 400),
    "chunk ext open quote": (chunked(b'11;a="b'), 400),
    "chunk ext DEL": (chunked(b"11;a=\x7f"), 400),
    "chunk ext no name": (chunked(b"11;=b"), 400),
    # chunk data not followed by CRLF
    "chunk data overlong": (CHUNKED + b"1\r\nab\r\n0\r\n\r\n", 400),
    # trailers: field lines, no framing fields
    "trailer NUL": (chunked(b"11", b"A: \x00\r\n"), 400),
    "trailer bare CR": (chunked(b"11", b"A: b\rc\r\n"), 400),
    "trailer no colon": (chunked(b"11", b"garbage\r\n"), 400),
    "trailer folded": (chunked(b"11", b"A: b\r\n c\r\n"), 400),
    "trailer space before colon": (chunked(b"11", b"A : b\r\n"), 400),
    "trailer Content-Length": (chunked(b"11", b"Content-Length: 5\r\n"), 400),
    "trailer Transfer-Encoding": (chunked(b"11", b"Transfer-Encoding: chunked\r\n"), 400),
    # Transfer-Encoding
    "TE VT chunked": (HEAD + b"Transfer-Encoding: \x0bchunked\r\n\r\n11\r\n" + BODY
                      + b"\r\n0\r\n\r\n", 400),
    "TE chunked FF": (HEAD + b"Transfer-Encoding: chunked\x0c\r\n\r\n11\r\n" + BODY
                      + b"\r\n0\r\n\r\n", 400),
    "TE chunked, identity": (HEAD + b"Transfer-Encoding: chunked, identity\r\n\r\n", 501),
    "TE twice": (HEAD + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
                 501),
    "TE in HTTP/1.0": (b"POST /v1/chat/completions HTTP/1.0\r\nTransfer-Encoding: chunked"
                       b"\r\n\r\n11\r\n" + BODY + b"\r\n0\r\n\r\n", 400),
    "CL.TE": (HEAD + b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    "TE.CL": (HEAD + b"Transfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n", 400),
    # Content-Length
    "CL +17": (HEAD + b"Content-Length: +17\r\n\r\n" + BODY, 400),
    "CL -17": (HEAD + b"Content-Length: -17\r\n\r\n" + BODY, 400),
    "CL 1_7": (HEAD + b"Content-Length: 1_7\r\n\r\n" + BODY, 400),
    "CL VT 17": (HEAD + b"Content-Length: \x0b17\r\n\r\n" + BODY, 400),
    "CL 17 FF": (HEAD + b"Content-Length: 17\x0c\r\n\r\n" + BODY, 400),
    "CL 0x11": (HEAD + b"Content-Length: 0x11\r\n\r\n" + BODY, 400),
    "CL 17, 17": (HEAD + b"Content-Length: 17, 17\r\n\r\n" + BODY, 400),
    "CL 17 and 017": (HEAD + b"Content-Length: 17\r\nContent-Length: 017\r\n\r\n" + BODY, 400),
    "CL 17 and 18": (HEAD + b"Content-Length: 17\r\nContent-Length: 18\r\n\r\n" + BODY, 400),
    "CL empty": (HEAD + b"Content-Length: \r\n\r\n" + BODY, 400),
    "CL Arabic-Indic digits": (HEAD + "Content-Length: ١٧\r\n\r\n".encode() + BODY, 400),
    "CL overflowing": (HEAD + b"Content-Length: " + b"9" * 5000 + b"\r\n\r\n" + BODY, 413),
    # CR, LF, NUL (RFC 9110 §5.5) and the other controls in names and values
    "value NUL": (field(b"X-A: a\x00b"), 400),
    "value bare CR": (field(b"X-A: a\rb"), 400),
    "value bare LF": (field(b"X-A: a\nb"), 400),
    "value ends in bare LF": (HEAD + b"X-A: a\nContent-Length: 17\r\n\r\n" + BODY, 400),
    "value VT": (field(b"X-A: a\x0bb"), 400),
    "value ESC": (field(b"X-A: a\x1bb"), 400),
    "value DEL": (field(b"X-A: a\x7fb"), 400),
    "name NUL": (field(b"X-\x00A: a"), 400),
    "name bare CR": (field(b"X-\rA: a"), 400),
    "name bare LF": (field(b"X-\nA: a"), 400),
    # names are tokens (RFC 9110 §5.6.2)
    "name space before colon": (field(b"X-A : a"), 400),
    "name HTAB before colon": (field(b"X-A\t: a"), 400),
    "name with space": (field(b"X A: a"), 400),
    "name empty": (field(b": a"), 400),
    "name obs-text": (field(b"X-\xe9: a"), 400),
    "name separator": (field(b"X-(A): a"), 400),
    "name no colon": (field(b"X-A a"), 400),
    "obs-fold": (field(b"X-A: a\r\n b"), 400),
    "Host twice": (field(b"Host: y"), 400),
    # the request line: method SP target SP HTTP/1.x, one SP each
    "request line leading CRLF": (b"\r\n" + field(b"X-A: a"), 400),
    "request line two SP": (b"POST  /x HTTP/1.1\r\nHost: localhost\r\n\r\n", 400),
    "request line HTAB": (b"POST\t/x HTTP/1.1\r\nHost: localhost\r\n\r\n", 400),
    "request line trailing SP": (b"POST /x HTTP/1.1 \r\nHost: localhost\r\n\r\n", 400),
    "request line bare LF in target": (b"POST /x\nA: b HTTP/1.1\r\nHost: localhost\r\n\r\n", 400),
    "request line NUL in target": (b"POST /x\x00 HTTP/1.1\r\nHost: localhost\r\n\r\n", 400),
    "request line VT in target": (b"GET /x\x0by HTTP/1.1\r\nHost: localhost\r\n\r\n", 400),
    "request line method separator": (b"GE(T /x HTTP/1.1\r\nHost: localhost\r\n\r\n", 400),
    "request line lower version": (b"GET /x http/1.1\r\nHost: localhost\r\n\r\n", 400),
    "request line HTTP/1.2": (b"GET /x HTTP/1.2\r\nHost: localhost\r\n\r\n", 400),
    "request line HTTP/2": (b"GET /x HTTP/2\r\nHost: localhost\r\n\r\n", 400),
    "request line no version": (b"GET /x\r\nHost: localhost\r\n\r\n", 400),
}


def feed(data: bytes, max_body: int = 1 << 20) -> list[Request]:
    got: list[Request] = []
    RequestParser(got.append, max_body=max_body).feed(data)
    return got


@pytest.mark.parametrize("name", list(VECTORS))
def test_the_parser_refuses(name: str) -> None:
    data, status = VECTORS[name]
    with pytest.raises(BadRequest) as caught:
        got = feed(data)
        pytest.fail(f"taken: {got}")
    assert caught.value.status == status, caught.value
    # the head start takes none of them (it takes no chunked body in any case)
    assert waking.parse(data) is None


@pytest.mark.parametrize(("data", "body"), [
    (chunked(b"11"), BODY),
    (chunked(b"00011"), BODY),
    (chunked(b"11;a"), BODY),
    (chunked(b'11;a=b;c="d \\" \xe9"'), BODY),
    (chunked(b"11", b"X-T: b c\r\nY: \xe9\r\n"), BODY),
    (HEAD + b"Transfer-Encoding:  Chunked \t\r\n\r\n11\r\n" + BODY + b"\r\n0\r\n\r\n", BODY),
    (HEAD + b"Content-Length: \t17 \r\n\r\n" + BODY, BODY),
    (HEAD + b"Content-Length: 017\r\nContent-Length: 017\r\n\r\n" + BODY, BODY),
    (field(b"X-A: caf\xe9 \t au lait"), BODY),  # obs-text, SP and HTAB inside a value
    (field(b"X-A:"), BODY),
    (field(b"!#$%&'*+-.^_`|~09azAZ: a"), BODY),
    (b"GET /?model=caf\xc3\xa9 HTTP/1.1\r\nHost: localhost\r\n\r\n", b""),  # raw UTF-8 target
    (b"GET /x HTTP/1.1\r\n\r\n", b""),  # no Host: taken (http1.Framing says why)
])
def test_the_parser_takes(data: bytes, body: bytes) -> None:
    got = feed(data)
    assert len(got) == 1 and got[0].body == body


@pytest.mark.parametrize(("target", "path", "host"), [
    (b"http://127.0.0.1:8080/v1/chat/completions?x=1", "/v1/chat/completions?x=1",
     b"127.0.0.1:8080"),
    (b"HTTPS://localhost/health", "/health", b"localhost"),
    (b"http://localhost", "/", b"localhost"),
    (b"http://localhost?model=a", "/?model=a", b"localhost"),
    (b"/v1/models", "/v1/models", b"evil.example"),  # origin form: as it came
])
def test_an_absolute_target_is_taken_with_its_authority_as_the_host(
        target: bytes, path: str, host: bytes) -> None:
    """RFC 9112 §3.2.2: a server takes the absolute form, and then its authority is the
    Host, whatever the field said (it was a 404: no route 'http://...')."""
    (request,) = feed(b"GET " + target + b" HTTP/1.1\r\nHost: evil.example\r\n\r\n")
    assert request.target == path
    assert request.header("host") == host.decode()
    assert [n for n, _ in request.headers].count(b"Host") == 1


def test_values_lose_only_sp_and_htab() -> None:
    (request,) = feed(field(b"X-A: \t a b \t"))
    assert (b"X-A", b"a b") in request.headers


def test_trailers_are_bounded() -> None:
    parser = RequestParser(lambda r: None)
    parser.feed(CHUNKED + b"0\r\n")
    with pytest.raises(BadRequest) as caught:
        for _ in range(10_000):
            parser.feed(b"X-T: " + b"a" * 100 + b"\r\n")
    assert caught.value.status == 431


def test_a_request_split_anywhere_is_read_the_same() -> None:
    data = (chunked(b'11;a="b"', b"X-T: c\r\n") + field(b"X-A: b")
            + b"GET /x HTTP/1.1\r\nHost: localhost\r\n\r\n")
    whole = [(r.method, r.target, r.headers, r.body) for r in feed(data)]
    assert len(whole) == 3
    for at in range(1, len(data)):
        got: list[Request] = []
        parser = RequestParser(got.append)
        parser.feed(data[:at])
        parser.feed(data[at:])
        assert [(r.method, r.target, r.headers, r.body) for r in got] == whole, at


# -- the router's front: refused before its handler, so nothing starts --------------------
MANIFEST = """\
ramdisk: {tmp}/rd
runtime_dir: {tmp}/run
state_dir: {tmp}/state
llama_server: /bin/true
models:
  tiny:
    path: {tmp}/tiny.gguf
"""


@pytest.fixture
def router(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[server.Router]:
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(tmp_path / "units-runtime"))
    path = tmp_path / "models.yaml"
    path.write_text(MANIFEST.format(tmp=tmp_path))
    starts: list[str] = []
    monkeypatch.setattr(units, "start_unit",
                        lambda unit, *a, **k: starts.append(unit))
    yield server.Router(load_config(path))
    assert starts == []


def exchange(router: server.Router, requests: list[bytes]) -> tuple[list[bytes], int]:
    """Each of `requests` on its own connection to a front on the router: the answers,
    and how many requests reached the router's handler."""
    handled: list[Request] = []

    async def handler(request: Request) -> object:
        handled.append(request)
        if request.header("x-boom"):
            raise RuntimeError("a bug in a handler")
        if request.path == "/v1/chat/completions":  # would start tiny: the test says so
            return Response(299)
        return await router.handle(request)

    async def scenario() -> list[bytes]:
        front = Proxy(handler, server.limits(router.config),  # type: ignore[arg-type]
                      error=router.answers.render_error)
        sock = socket.create_server(("127.0.0.1", 0))
        listening = await front.listen(sock)
        answers = []
        for data in requests:
            reader, writer = await asyncio.open_connection(*sock.getsockname()[:2])
            writer.write(data)
            await writer.drain()
            answers.append(await asyncio.wait_for(reader.read(), 5))
            writer.close()
        front.close()
        listening.close()
        return answers

    return asyncio.run(scenario()), len(handled)


def test_the_router_answers_each_vector_400_and_its_handler_sees_none(
        router: server.Router) -> None:
    names = [n for n, (_, status) in VECTORS.items() if status == 400]
    answers, handled = exchange(router, [VECTORS[n][0] for n in names])
    assert handled == 0
    for name, answer in zip(names, answers, strict=True):
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400 "), (name, answer)
        assert json.loads(body)["error"]["code"] == "invalid_request", (name, answer)
    # a framing it does not implement: a 501 that says so
    (answer,), handled = exchange(router, [VECTORS["TE chunked, identity"][0]])
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 501 ") and handled == 0, answer
    assert json.loads(body)["error"]["code"] == "not_implemented", answer
    # the same front takes a well-formed one
    answers, handled = exchange(router, [field(b"Connection: close"), chunked(b"11").replace(
        b"Host: localhost", b"Connection: close")])
    assert handled == 2 and all(a.startswith(b"HTTP/1.1 299 ") for a in answers)


def test_a_body_too_large_is_answered_with_a_request_id(router: server.Router) -> None:
    """Refused before the router's handler (which gives every request its id): the 413
    carries one too, the client's own where it sent one."""
    requests = [b"POST " + path + b" HTTP/1.1\r\nHost: localhost\r\nX-Request-Id: mine-1\r\n"
                b"Content-Length: 10000000000\r\n\r\n" for path in (b"/v1/messages",
                                                                  b"/v1/chat/completions")]
    answers, handled = exchange(router, requests)
    assert handled == 0
    for answer in answers:
        head = answer.partition(b"\r\n\r\n")[0]
        assert head.startswith(b"HTTP/1.1 413 ") and b"\r\nx-request-id: mine-1" in head.lower()
    assert json.loads(answers[0].partition(b"\r\n\r\n")[2])["request_id"] == "mine-1"


def test_a_handler_s_bug_is_a_500_in_the_request_s_api_shape(router: server.Router) -> None:
    body = b'{"model": "tiny"}'
    requests = [b"POST " + path + b" HTTP/1.1\r\nHost: localhost\r\nX-Boom: 1\r\nContent-Length: %d"
                b"\r\n\r\n" % len(body) + body for path in (b"/api/chat", b"/v1/messages",
                                                             b"/v1/chat/completions")]
    answers, handled = exchange(router, requests)
    assert handled == 3
    bodies = [json.loads(a.partition(b"\r\n\r\n")[2]) for a in answers]
    assert all(a.startswith(b"HTTP/1.1 500 ") for a in answers), answers
    assert bodies[0] == {"error": "internal error in the router"}  # Ollama's
    assert bodies[1]["type"] == "error" and bodies[1]["error"]["type"] == "api_error"
    assert bodies[2]["error"]["type"] == "server_error"


def test_no_head_start_for_a_vector(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """headstart.take.take_early, with a current name index naming tiny: the well-formed
    request starts it; with a CR, LF or NUL in a field, or a malformed length, nothing."""
    from hoshikage_sd import lastgood
    from hoshikage_sd.sd import daemon

    monkeypatch.setenv("RUNTIME_DIRECTORY", str(tmp_path / "shared"))
    (tmp_path / "shared").mkdir()
    path = tmp_path / "models.yaml"
    path.write_text(MANIFEST.format(tmp=tmp_path))
    monkeypatch.setenv("HOSHIKAGE_CONFIG", str(path))
    monkeypatch.setattr(lastgood, "RACY", 0.0)  # the manifest counts as settled already
    load_config(path)  # keeps the manifest, with the name index
    monkeypatch.setattr(protocol, "probe", lambda *_a, **_k: None)

    def early(data: bytes) -> list[str]:
        listener = socket.create_server(("127.0.0.1", 0))
        client = socket.create_connection(listener.getsockname()[:2])
        client.sendall(data)
        fd = listener.detach()
        monkeypatch.setattr(daemon, "listen_fds", lambda: [fd])
        started: list[str] = []

        def start(unit: str, *_: object) -> bool:
            started.append(unit)
            return True

        monkeypatch.setattr(take, "start", start)
        first = take.take_early()
        client.close()
        for s in (first.raw_connection, *first.raw_sockets):
            if s is not None:
                s.close()
        return started

    assert early(field(b"X-A: a")) == ["hoshikage-model@tiny.service"]
    for name in ("value NUL", "value bare CR", "value bare LF", "value ends in bare LF",
                 "name NUL", "name bare CR", "name space before colon", "CL +17", "CL 1_7",
                 "CL VT 17", "CL 17 and 017", "request line bare LF in target", "Host twice"):
        assert early(VECTORS[name][0]) == [], name


@pytest.mark.parametrize(("fields", "version", "keep"), [
    (b"", b"1.1", True),
    (b"", b"1.0", False),
    (b"Connection: keep-alive\r\n", b"1.0", True),
    (b"Connection: close\r\n", b"1.1", False),
    (b"Connection: close\r\nConnection: keep-alive\r\n", b"1.1", False),  # a fuzzing find
    (b"Connection: keep-alive\r\nConnection: close\r\n", b"1.0", False),
    (b"Connection: Keep-Alive, Close\r\n", b"1.1", False),
    (b"Connection: x, keep-alive\r\n", b"1.0", True),
])
def test_close_in_any_connection_field_wins(fields: bytes, version: bytes, keep: bool) -> None:
    (request,) = feed(b"GET / HTTP/" + version + b"\r\nHost: localhost\r\n" + fields + b"\r\n")
    assert request.keep_alive is keep


class _Collect:
    """A response parser's sink that keeps what it was given."""

    def __init__(self) -> None:
        self.body, self.ended, self.length = b"", False, -2

    def on_head(self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]],
                length: int, chunked: bool) -> None:
        self.length = length

    def on_body(self, data: bytes) -> None:
        self.body += data

    def on_end(self) -> None:
        self.ended = True

    def on_error(self, exc: BaseException, got_bytes: bool) -> None:
        raise exc


CHUNKED_HEAD = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"


@pytest.mark.parametrize("size", [b"0x5", b"+5", b"5_", b" 5", b"-0", b"", b"1" * 17])
def test_an_upstream_chunk_size_is_read_as_strictly_as_a_clients(size: bytes) -> None:
    """llama-server is not trusted to frame for the router: a response's chunk sizes and
    Content-Length take 1*HEXDIG and 1*DIGIT only (the upstream pool drops the connection
    on the ValueError)."""
    from hoshikage_sd.router.proxy.parsing import ResponseParser

    good = ResponseParser(_Collect())
    good.feed(CHUNKED_HEAD + b"5\r\nhello\r\n0\r\n\r\n")
    assert good.done and good.sink.body == b"hello"  # type: ignore[attr-defined]
    with pytest.raises(ValueError):
        ResponseParser(_Collect()).feed(CHUNKED_HEAD + size + b"\r\nhello\r\n0\r\n\r\n")


@pytest.mark.parametrize("value", [b"+5", b" 5x", b"5_0", b"\xd9\xa5", b"0x5"])
def test_an_upstream_content_length_is_digits_only(value: bytes) -> None:
    from hoshikage_sd.router.proxy.parsing import ResponseParser

    with pytest.raises(ValueError):
        ResponseParser(_Collect()).feed(b"HTTP/1.1 200 OK\r\nContent-Length: " + value +
                                        b"\r\n\r\nhello")
    two = ResponseParser(_Collect())
    with pytest.raises(ValueError, match="two different"):
        two.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello")


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(st.dictionaries(st.text(min_size=1, max_size=8), st.text(max_size=12), max_size=4))
def test_a_query_is_read_as_urlencode_wrote_it(query: dict[str, str]) -> None:
    """?model=gemma3%3A1b is the model gemma3:1b, as the panel and /v1/models/{id} read
    their names: every query value is percent-decoded once, as UTF-8, '+' a space."""
    from urllib.parse import urlencode

    from hoshikage_sd.router.http1 import query_of

    target = "/health?" + urlencode(query)
    assert query_of(target.encode().decode("latin-1")) == query
    assert query_of("/x?model=a%zz&model=second&b=%41%") == {"model": "a%zz", "b": "A%"}


def test_every_status_the_router_sends_has_its_reason_phrase() -> None:
    """(The panel's load answered "202 Unknown", its /panel redirect "308 Unknown".)"""
    import http

    from hoshikage_sd.router.proxy import REASONS
    from hoshikage_sd.router.proxy.messages import response_bytes

    for status in (202, 308):
        head = response_bytes(Response(status), False).split(b"\r\n")[0]
        assert head == f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}".encode()
    assert all(http.HTTPStatus(code).phrase == phrase or code == 413
               for code, phrase in REASONS.items())
