"""The three requests of llama.cpp's RPC protocol (ggml-rpc.cpp) that hoshikage asks a worker.

A worker is llama.cpp's own `ggml-rpc-server`; hoshikage speaks no protocol of its own to it.
To know whether a worker is there and what memory it has, before llama-server is started
with `--rpc`, the head asks what llama-server itself asks first:

  request:  | command (1 byte) | payload size (u64 LE) | payload |
  answer:   | answer size (u64 LE) | answer |

* HELLO (14), payload: the client's connection capabilities (24 zero bytes: plain TCP), answer:
  the server's version (major, minor, patch, padding) and its capabilities. A server of
  protocol 4 closes the connection on any other first command, or on a HELLO of another size.
* DEVICE_COUNT (15), no payload; answer: u32.
* GET_DEVICE_MEMORY (11), payload: the device's index (u32); answer: free, total (u64 each).

Measured against the wheel's ggml-rpc-server (protocol 4.0.3, llama.cpp b10068). A server
serves one client at a time: while a llama-server holds it, a HELLO is not answered (the
connection waits in its backlog), so every read here has a deadline.
"""

from __future__ import annotations

import socket
import struct
import time
from dataclasses import dataclass

HELLO = 14
DEVICE_COUNT = 15
GET_DEVICE_MEMORY = 11
#: the protocol major version spoken here (the wheel's ggml-rpc-server: 4.0.3)
MAJOR = 4
#: RPC_CONN_CAPS_SIZE: the capabilities a client offers in HELLO; zeros ask for plain TCP
CAPS_SIZE = 24
#: devices asked about at most (a server lists its -d devices; GGML_RPC_MAX_SERVERS is 16)
MAX_DEVICES = 64


class WireError(Exception):
    """The peer is not a ggml-rpc-server of a protocol spoken here, or broke off."""


@dataclass(frozen=True)
class Device:
    free: int
    total: int


@dataclass(frozen=True)
class Answer:
    """What a worker said: its protocol version and each device's memory."""

    version: tuple[int, int, int]
    devices: tuple[Device, ...]

    @property
    def free(self) -> int:
        return sum(d.free for d in self.devices)

    @property
    def total(self) -> int:
        return sum(d.total for d in self.devices)


def request(command: int, payload: bytes = b"") -> bytes:
    return struct.pack("<BQ", command, len(payload)) + payload


def hello() -> bytes:
    return request(HELLO, bytes(CAPS_SIZE))


def parse_hello(answer: bytes) -> tuple[int, int, int]:
    if len(answer) != 4 + CAPS_SIZE:
        raise WireError(f"HELLO answer of {len(answer)} bytes, not {4 + CAPS_SIZE}: "
                        "not a ggml-rpc-server of protocol 4")
    major, minor, patch = answer[:3]
    if major != MAJOR:
        raise WireError(f"ggml-rpc-server speaks protocol {major}.{minor}.{patch}, "
                        f"not {MAJOR}.x (llama-server and the worker need the same llama.cpp)")
    return major, minor, patch


def parse_count(answer: bytes) -> int:
    if len(answer) != 4:
        raise WireError(f"DEVICE_COUNT answer of {len(answer)} bytes, not 4")
    (count,) = struct.unpack("<I", answer)
    if count > MAX_DEVICES:
        raise WireError(f"{count} devices: more than {MAX_DEVICES}")
    return int(count)


def memory_request(device: int) -> bytes:
    return request(GET_DEVICE_MEMORY, struct.pack("<I", device))


def parse_memory(answer: bytes) -> Device:
    if len(answer) != 16:
        raise WireError(f"GET_DEVICE_MEMORY answer of {len(answer)} bytes, not 16")
    free, total = struct.unpack("<QQ", answer)
    return Device(int(free), int(total))


class _Conversation:
    """One connection with one deadline for everything said on it."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock = sock
        self.deadline = deadline

    def recv_exactly(self, n: int) -> bytes:
        data = bytearray()
        while len(data) < n:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            self.sock.settimeout(left)
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise WireError("the worker closed the connection")
            data += chunk
        return bytes(data)

    def ask(self, raw: bytes, limit: int = 1 << 10) -> bytes:
        self.sock.settimeout(max(0.001, self.deadline - time.monotonic()))
        self.sock.sendall(raw)
        (size,) = struct.unpack("<Q", self.recv_exactly(8))
        if size > limit:
            raise WireError(f"an answer of {size} bytes: not a ggml-rpc-server")
        return self.recv_exactly(size)


def ask(host: str, port: int, timeout: float) -> Answer:
    """HELLO, then each device's memory, within `timeout` seconds in all. OSError (refused,
    unreachable), TimeoutError (nothing listens there, or the worker serves another client)
    or WireError."""
    deadline = time.monotonic() + timeout
    with socket.create_connection((host, port), timeout=timeout) as sock:
        return ask_on(sock, deadline)


def ask_on(sock: socket.socket, deadline: float) -> Answer:
    """ask() on a connected socket, by `deadline` (time.monotonic())."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    talk = _Conversation(sock, deadline)
    version = parse_hello(talk.ask(hello()))
    count = parse_count(talk.ask(request(DEVICE_COUNT)))
    devices = tuple(parse_memory(talk.ask(memory_request(i))) for i in range(count))
    return Answer((version[0], version[1], version[2]), devices)
