"""HTTP/1.1 request-head syntax (RFC 9110 §5, RFC 9112 §3, §5), in one place for the two
readers of a request: the router's parser (proxy/parsing.py) and the head start that peeks
at the request that woke the router (headstart/request.py). The head start starts a model, so it
must not take a request that the router's parser would refuse: both split heads here.

Built-in types only, no imports: the head start runs before the router's imports (`re` among
them, tests/unit/test_launch.py). Bytes are checked with bytes.translate(None, allowed),
which deletes the allowed ones in C: what is left is what is not allowed."""

from __future__ import annotations

#: tchar (RFC 9110 §5.6.2): a field name, a method, a chunk extension's name
TCHAR = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
#: a field line's bytes: SP, HTAB, VCHAR and obs-text. NUL, the other controls and DEL are
#: in no production of a head (RFC 9110 §5.5 names CR, LF and NUL, a recipient's to refuse
#: or to replace: refused, so what is forwarded is what was read)
VALUE_BYTES = b"\t" + bytes(range(0x20, 0x7F)) + bytes(range(0x80, 0x100))
VERSIONS = (b"HTTP/1.1", b"HTTP/1.0")
#: methods known to be tokens (the others are checked)
METHODS = frozenset((b"GET", b"POST", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"PATCH"))

#: a size beyond any body limit, for numbers too long to be worth converting
TOO_LARGE = 1 << 62

Fields = list[tuple[bytes, bytes]]


class Refused(ValueError):
    """A request this reader does not take, with the status to answer it with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def split_head(head: bytes) -> tuple[bytes, bytes, bytes, Fields]:
    """(method, target, version, [(name, value), ...]) of a request head (without its final
    CRLF CRLF); Refused, saying what, where it is not RFC 9112's. Values lose their OWS
    (SP and HTAB only: bytes.strip() would take \\x0b and \\x0c too, which a parser that
    takes them as part of the value reads differently)."""
    lines = head.split(b"\r\n")
    # What is not a field line's byte must be the CRLFs between lines, nothing else: no
    # control character, and CR and LF only as a pair, the line end (a bare one is a line
    # end to some parsers, h11 and others take a bare LF, and part of a line to others).
    # One pass: translate() deletes the allowed bytes and leaves the rest.
    if head.translate(None, VALUE_BYTES) != b"\r\n" * (len(lines) - 1):
        raise Refused("control character, or bare CR or LF, in the request head")
    first = lines[0].split(b" ")
    # method SP request-target SP HTTP-version, one SP each. The target may hold obs-text,
    # which RFC 3986 does not (h11 refuses it): a client may send a model's name in ?model=
    # as raw UTF-8, and a byte above 0x7F ends no token and no line: no reader frames a
    # request otherwise for it. (The head's check above leaves HTAB the only byte to refuse.)
    if (len(first) != 3 or first[2] not in VERSIONS or not first[1] or b"\t" in first[1]
            or (first[0] not in METHODS and (not first[0] or first[0].translate(None, TCHAR)))):
        raise Refused("malformed request line")
    fields: Fields = []
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not name:
            raise Refused("malformed header line")
        fields.append((name, value.strip(b" \t")))
    # a name is a token: no whitespace before the colon (RFC 9112 §5.1), no obs-fold (a line
    # starting with whitespace), nothing that another reader would cut elsewhere. All names
    # at once: one translate() (its table is built per call) in place of one a field.
    if fields and b"".join([name for name, _ in fields]).translate(None, TCHAR):
        raise Refused("malformed header line")
    return first[0], first[1], first[2], fields


def framing(fields: Fields, version: bytes) -> tuple[int | None, bool, bool, bool]:
    """What a head's fields say of its message (RFC 9112 §6): (the body's length, None when
    none is given; chunked; whether the connection is kept; whether a 100 Continue is
    asked). Refused where they do not say it once and plainly."""
    length: int | None = None
    given: bytes | None = None
    chunked = False
    host = False
    close = keep = False
    expect = False
    for name, value in fields:
        key = name.lower()
        if key == b"content-length":
            length = content_length(value, given)
            given = value
        elif key == b"transfer-encoding":
            if value.lower() != b"chunked" or chunked:
                raise Refused("only one 'Transfer-Encoding: chunked' is taken", 501)
            if version == b"HTTP/1.0":
                # RFC 9112 §6.1: an HTTP/1.0 message with Transfer-Encoding has a
                # faulty framing (a 1.0 reader does not know chunked)
                raise Refused("Transfer-Encoding in an HTTP/1.0 request")
            chunked = True
        elif key == b"connection":
            # "close" in any of them wins (RFC 9112 §9.6), whatever comes after it
            # (the last one won: a fuzzing find, tests/unit/test_http_fuzz.py)
            tokens = {t.strip(b" \t") for t in value.lower().split(b",")}
            close = close or b"close" in tokens
            keep = keep or b"keep-alive" in tokens
        elif key == b"expect":
            # an HTTP/1.0 request's is ignored (RFC 9110 §10.1.1): no 1.1 interim answer
            expect = value.lower() == b"100-continue" and version != b"HTTP/1.0"
        elif key == b"host":
            # RFC 9112 §3.2: two are a 400 (which one would a check of it read?). None
            # is taken, against the RFC's 400 for HTTP/1.1: the router sends its own Host
            # upstream, and simple tools (and this project's tests) send none.
            if host:
                raise Refused("more than one Host")
            host = True
    if chunked and length is not None:
        raise Refused("both Content-Length and Transfer-Encoding")
    return length, chunked, not close and (keep or version == b"HTTP/1.1"), expect


def origin_form(target: bytes, fields: Fields) -> tuple[bytes, Fields]:
    """A target in absolute form (`http://host:port/path?q`, as a proxy sends it) as the
    origin form the routes know, its authority as the Host (RFC 9112 §3.2.2: a server
    takes both forms and then ignores the Host field sent)."""
    scheme, sep, rest = target.partition(b"://")
    if not sep or scheme.lower() not in (b"http", b"https"):
        return target, fields
    cut = min((i for i in (rest.find(b"/"), rest.find(b"?")) if i >= 0), default=len(rest))
    path = rest[cut:]
    return (path if path.startswith(b"/") else b"/" + path,
            [f for f in fields if f[0].lower() != b"host"] + [(b"Host", rest[:cut])])


def content_length(value: bytes, previous: bytes | None) -> int:
    """A Content-Length's value: 1*DIGIT, nothing else (int() would take '+5', ' 5', '5_0'
    and '٥'). A second one must be the same bytes: Refused otherwise."""
    # bytes.isdigit() is ASCII's 0-9 only (str.isdigit() would take '٥')
    if not value.isdigit() or (previous is not None and value != previous):
        raise Refused("bad Content-Length")
    digits = value.lstrip(b"0")
    # past 18 digits it is past any body limit (the caller's 413): TOO_LARGE stands for it.
    # int() itself would raise past 4300 digits (sys.int_max_str_digits).
    return int(digits or b"0") if len(digits) <= 18 else TOO_LARGE


HEX = frozenset("0123456789abcdefABCDEF")


def query_of(target: str) -> dict[str, str]:
    """A request target's query (the target as read, latin-1), each key's first value,
    percent-decoded as UTF-8 with '+' a space, as a form or urlencode writes it."""
    out: dict[str, str] = {}
    for pair in filter(None, target.partition("?")[2].split("&")):
        key, _, value = pair.partition("=")
        out.setdefault(unquote(key), unquote(value))
    return out


def unquote(text: str) -> str:
    """urllib.parse.unquote_plus without its import; a '%' without two hex digits stays."""
    if "%" not in text and "+" not in text:
        return text
    first, *rest = text.replace("+", " ").split("%")
    out = bytearray(first.encode("latin-1"))
    for part in rest:
        if len(part) >= 2 and part[0] in HEX and part[1] in HEX:
            out.append(int(part[:2], 16))
            out += part[2:].encode("latin-1")
        else:
            out += b"%" + part.encode("latin-1")
    return out.decode("utf-8", errors="replace")
