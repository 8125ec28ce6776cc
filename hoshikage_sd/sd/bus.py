"""systemd's manager API over D-Bus, without forking systemctl.

Forking `systemctl start` from the router cost every cold start a process (docs/performance.md).
As root,
systemctl itself does not go through dbus-daemon: it talks to PID 1 on its private socket,
peer to peer. So do we: wire.py marshals the messages; a Connection is a connect and an
EXTERNAL authentication, then one round trip per call. Any other
user (the units run as the service user hoshikage) is refused there and goes through the
system bus instead (dbus-daemon, where systemd asks polkit about each start and stop).
Callers fall back to systemctl when neither answers (not systemd, no bus). Built-in modules
only, as wire.py: the router's head start starts a unit through here before its imports.
"""

from __future__ import annotations

import _socket
import posix
import time

from hoshikage_sd.sd import wire

TYPE_CHECKING = False  # typing (which imports re) would be on the head start's path
if TYPE_CHECKING:
    from typing import Any

PRIVATE_SOCKET = "/run/systemd/private"
SYSTEM_BUS = "/run/dbus/system_bus_socket"
MANAGER = ("org.freedesktop.systemd1", "/org/freedesktop/systemd1",
           "org.freedesktop.systemd1.Manager")
DAEMON = ("org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus")
UNIT_PREFIX = "/org/freedesktop/systemd1/unit/"
PROPERTIES = "org.freedesktop.DBus.Properties"


class BusUnavailable(OSError):
    """PID 1's private socket cannot be reached: use systemctl instead."""


class BusError(Exception):
    """systemd answered a call with a D-Bus error."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(f"{name}: {message}")
        self.name = name
        self.message = message


class UnitState:
    """A unit as ListUnitsByNames reports it. A plain class, not a dataclass: dataclasses
    (with inspect) would be on the router's head start (router/headstart)."""

    __slots__ = ("active", "job", "load", "name", "sub")

    def __init__(self, name: str, load: str, active: str, sub: str, job: int) -> None:
        self.name = name
        self.load = load  # loaded, not-found, ...
        self.active = active  # active, activating, failed, inactive, ...
        self.sub = sub
        self.job = job  # 0: no job pending

    def _fields(self) -> tuple[str, str, str, str, int]:
        return self.name, self.load, self.active, self.sub, self.job

    def __eq__(self, other: object) -> bool:
        return isinstance(other, UnitState) and self._fields() == other._fields()

    def __hash__(self) -> int:
        return hash(self._fields())

    def __repr__(self) -> str:
        return "UnitState(name={!r}, load={!r}, active={!r}, sub={!r}, job={!r})".format(
            *self._fields())


class Connection:
    """A connection to PID 1 (root) or the system bus (anyone else) for one or more calls: the
    head start lists the model units and starts one over the same connection (a connect, an
    authentication and a Hello() less).

    `hello`: the peer is a bus daemon, which wants Hello() first (default: path is the
    system bus). `timeout`: for the authentication, then for each call. Connected on the
    first call, which raises what connecting raises (BusUnavailable)."""

    def __init__(self, path: str | None = None, hello: bool | None = None,
                 timeout: float = 10.0) -> None:
        self.path = path or (PRIVATE_SOCKET if posix.geteuid() == 0 else SYSTEM_BUS)
        self.hello = self.path == SYSTEM_BUS if hello is None else hello
        self.timeout = timeout
        self.serial = 0
        self.buffer = bytearray()
        self.sock: _socket.socket | None = None

    def _connect(self) -> _socket.socket:
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
        try:
            self._authenticate(sock, time.monotonic() + self.timeout)
        except BaseException:
            sock.close()
            raise
        self.sock = sock
        return sock

    def _authenticate(self, sock: _socket.socket, deadline: float) -> None:
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.path)
        except OSError as exc:
            raise BusUnavailable(exc.errno, f"{self.path}: {exc.strerror}") from exc
        # Authentication and BEGIN in one write, the call only after the OK: sd-bus (252) does
        # not dispatch a message that arrived in the same read as BEGIN until more data comes.
        uid = str(posix.getuid()).encode().hex().encode()
        sock.sendall(b"\0AUTH EXTERNAL " + uid + b"\r\nBEGIN\r\n")
        while b"\r\n" not in self.buffer:
            self.buffer += _recv(sock, deadline, "while authenticating")
        answer, _, rest = bytes(self.buffer).partition(b"\r\n")
        if not answer.startswith(b"OK "):
            refusal = answer.decode(errors="replace").strip()
            raise BusUnavailable(f"{self.path} refused authentication: {refusal}")
        self.buffer = bytearray(rest)

    def call(self, method: str, signature: str | None = None,
             body: tuple[Any, ...] = (), target: tuple[str, str, str] = MANAGER
             ) -> tuple[Any, ...]:
        """A method call on org.freedesktop.systemd1.Manager (or `target`: destination,
        object path, interface); its reply's body."""
        sock = self.sock or self._connect()
        deadline = time.monotonic() + self.timeout
        request = b""
        if self.hello and self.serial == 0:  # a bus daemon takes Hello() and the call at once
            self.serial = 1
            request = wire.method_call(1, *DAEMON, "Hello")
        self.serial += 1
        request += wire.method_call(self.serial, *target, method, signature or "", body)
        sock.sendall(request)
        message = self._reply(sock, self.serial, deadline)
        if message.kind == wire.ERROR:
            name = str(message.fields.get(wire.ERROR_NAME, "error"))
            raise BusError(name, str(message.body[0]) if message.body else "")
        return message.body

    def _reply(self, sock: _socket.socket, serial: int, deadline: float) -> wire.Message:
        """The reply to `serial`. PID 1 sends its signals to every private connection, from
        the OK on, and the bus daemon answers Hello() and sends NameAcquired first: all
        skipped."""
        while True:
            try:
                size = wire.message_size(self.buffer)
            except wire.WireError as exc:
                raise BusUnavailable(f"systemd's answer is not D-Bus: {exc}") from None
            if size is None or len(self.buffer) < size:
                self.buffer += _recv(sock, deadline, "before answering")
                continue
            head, self.buffer = self.buffer[:size], self.buffer[size:]
            if head[1] not in (wire.METHOD_RETURN, wire.ERROR):
                continue
            try:
                message = wire.read_message(head)
            except wire.WireError as exc:
                raise BusUnavailable(str(exc)) from None
            if message.fields.get(wire.REPLY_SERIAL) == serial:
                return message

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def call(method: str, signature: str | None = None, body: tuple[Any, ...] = (),
         timeout: float = 10.0, path: str | None = None,
         hello: bool | None = None, conn: Connection | None = None) -> tuple[Any, ...]:
    """One method call on org.freedesktop.systemd1.Manager, over `conn` or a connection of
    its own (root to PID 1 directly, anyone else through the system bus); its reply's body."""
    if conn is not None:
        return conn.call(method, signature, body)
    with Connection(path, hello, timeout) as own:
        return own.call(method, signature, body)


def unit_path(unit: str) -> str:
    """The unit's object path (sd_bus_path_encode: every byte but [A-Za-z0-9] as _xx)."""
    encoded = "".join(chr(b) if chr(b).isascii() and chr(b).isalnum() else f"_{b:02x}"
                      for b in unit.encode())
    return UNIT_PREFIX + (encoded or "_")


def unit_properties(unit: str, wanted: dict[str, str], conn: Connection | None = None
                    ) -> dict[str, str]:
    """The unit's properties (`wanted`: each name's interface, as org.freedesktop.systemd1.
    Service for MainPID) as `systemctl show` prints them, over one connection: no process
    (the web panel asks for the loaded models' every second). An unset number (the maximum
    of its type, e.g. MemoryCurrent without accounting) is ""."""
    if conn is None:
        with Connection() as own:
            return unit_properties(unit, wanted, own)
    target = (MANAGER[0], unit_path(unit), PROPERTIES)
    out = {}
    for name, interface in wanted.items():
        (value,) = conn.call("Get", "ss", (interface, name), target)
        out[name] = "" if isinstance(value, int) and value in (2**64 - 1, 2**32 - 1) \
            else str(value)
    return out


def _recv(sock: _socket.socket, deadline: float, when: str) -> bytes:
    """More bytes, by the deadline: a stream of signals must not keep a call waiting."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise BusUnavailable(f"systemd did not answer in time ({when})")
    sock.settimeout(left)
    try:
        data = sock.recv(65536)
    except TimeoutError:
        raise BusUnavailable(f"systemd did not answer in time ({when})") from None
    if not data:
        raise BusUnavailable(f"systemd closed the connection {when}")
    return data


def start_unit(unit: str, mode: str = "replace", conn: Connection | None = None) -> str:
    """Queue a start job and return at once (like `systemctl start --no-block`)."""
    return str(call("StartUnit", "ss", (unit, mode), conn=conn)[0])


def reset_failed_unit(unit: str, conn: Connection | None = None) -> None:
    """Clear a unit's failed state and its start limit (`systemctl reset-failed UNIT`)."""
    call("ResetFailedUnit", "s", (unit,), conn=conn)


def _states(rows: list[tuple[Any, ...]]) -> list[UnitState]:
    # a(ssssssouso): name, description, load, active, sub, following, path, job id, ...
    return [UnitState(r[0], r[2], r[3], r[4], int(r[7])) for r in rows]


def units(names: list[str], conn: Connection | None = None) -> list[UnitState]:
    """The state of these units, loaded or not (ListUnitsByNames)."""
    return _states(call("ListUnitsByNames", "as", (names,), conn=conn)[0])


def list_units(patterns: list[str], states: list[str] | None = None,
               conn: Connection | None = None) -> list[UnitState]:
    """Loaded units matching the glob patterns, in one of `states` (all when empty)."""
    return _states(call("ListUnitsByPatterns", "asas", (states or [], patterns), conn=conn)[0])
