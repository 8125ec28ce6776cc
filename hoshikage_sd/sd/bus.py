"""systemd's manager API over D-Bus, without forking systemctl.

Forking `systemctl start` from the router cost about 50 ms of every cold start. As root,
systemctl itself does not go through dbus-daemon: it talks to PID 1 on its private socket,
peer to peer. So do we: jeepney marshals the messages, and each call is a connect, an EXTERNAL
authentication and one round trip (about a millisecond). Any other user (the units run as
the service user hoshikage) is refused there and goes through the system bus instead
(dbus-daemon, where systemd asks polkit about each start and stop). Callers fall back to
systemctl when neither answers (not systemd, no bus).
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any

from jeepney import DBusAddress, MessageType, Parser, new_method_call
from jeepney.low_level import HeaderFields

PRIVATE_SOCKET = "/run/systemd/private"
SYSTEM_BUS = "/run/dbus/system_bus_socket"
DAEMON = DBusAddress("/org/freedesktop/DBus", bus_name="org.freedesktop.DBus",
                     interface="org.freedesktop.DBus")
MANAGER = DBusAddress("/org/freedesktop/systemd1", bus_name="org.freedesktop.systemd1",
                      interface="org.freedesktop.systemd1.Manager")


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
    (with inspect) cost the router's head start ~5 ms (first_request.take_early)."""

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


def call(method: str, signature: str | None = None, body: tuple[Any, ...] = (),
         timeout: float = 10.0, path: str | None = None,
         hello: bool | None = None) -> tuple[Any, ...]:
    """One method call on org.freedesktop.systemd1.Manager; its reply's body.

    By default root talks to PID 1 directly, anyone else through the system bus. `hello`:
    the peer is a bus daemon, which wants Hello() first (default: path is the system bus)."""
    if path is None:
        path = PRIVATE_SOCKET if os.geteuid() == 0 else SYSTEM_BUS
    if hello is None:
        hello = path == SYSTEM_BUS
    deadline = time.monotonic() + timeout
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(path)
        except OSError as exc:
            raise BusUnavailable(exc.errno, f"{path}: {exc.strerror}") from exc
        # Authentication and BEGIN in one write, the call only after the OK: sd-bus (252) does
        # not dispatch a message that arrived in the same read as BEGIN until more data comes.
        uid = str(os.getuid()).encode().hex().encode()
        sock.sendall(b"\0AUTH EXTERNAL " + uid + b"\r\nBEGIN\r\n")
        buffer = b""
        while b"\r\n" not in buffer:
            buffer += _recv(sock, deadline, "while authenticating")
        answer, _, rest = buffer.partition(b"\r\n")
        if not answer.startswith(b"OK "):
            refusal = answer.decode(errors="replace").strip()
            raise BusUnavailable(f"{path} refused authentication: {refusal}")
        # A bus daemon takes Hello() and the call in one write; ours is the last serial.
        serial = 2 if hello else 1
        request = new_method_call(MANAGER, method, signature, body).serialise(serial=serial)
        if hello:
            request = new_method_call(DAEMON, "Hello").serialise(serial=1) + request
        sock.sendall(request)
        # PID 1 sends its signals to every private connection, from the OK on, and the bus
        # daemon answers Hello() and sends NameAcquired first: skip all of that.
        parser = Parser()
        parser.add_data(rest)
        while True:
            message = parser.get_next_message()
            if message is None:
                parser.add_data(_recv(sock, deadline, "before answering"))
            elif (message.header.message_type in (MessageType.method_return,
                                                  MessageType.error)
                  and message.header.fields.get(HeaderFields.reply_serial) == serial):
                break
    finally:
        sock.close()
    if message.header.message_type is MessageType.error:
        name = message.header.fields.get(HeaderFields.error_name, "error")
        raise BusError(name, str(message.body[0]) if message.body else "")
    return tuple(message.body)


def _recv(sock: socket.socket, deadline: float, when: str) -> bytes:
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


def start_unit(unit: str, mode: str = "replace") -> str:
    """Queue a start job and return at once (like `systemctl start --no-block`)."""
    return str(call("StartUnit", "ss", (unit, mode))[0])


def reset_failed_unit(unit: str) -> None:
    """Clear a unit's failed state and its start limit (`systemctl reset-failed UNIT`)."""
    call("ResetFailedUnit", "s", (unit,))


def _states(rows: list[tuple[Any, ...]]) -> list[UnitState]:
    # a(ssssssouso): name, description, load, active, sub, following, path, job id, ...
    return [UnitState(r[0], r[2], r[3], r[4], int(r[7])) for r in rows]


def units(names: list[str]) -> list[UnitState]:
    """The state of these units, loaded or not (ListUnitsByNames)."""
    return _states(call("ListUnitsByNames", "as", (names,))[0])


def list_units(patterns: list[str], states: list[str] | None = None) -> list[UnitState]:
    """Loaded units matching the glob patterns, in one of `states` (all when empty)."""
    return _states(call("ListUnitsByPatterns", "asas", (states or [], patterns))[0])
