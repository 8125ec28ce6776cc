"""bus.call's framing against a scripted peer: authentication, PID 1's unsolicited signals
before and between replies, errors, and a deadline that a stream of signals cannot stretch.
The real PID 1 is the system tier's (every model start goes through it)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from jeepney import DBusAddress, Parser, new_error, new_method_return, new_signal

from hoshikage_sd.sd import bus

UNIT_PATH = DBusAddress("/org/freedesktop/systemd1/unit/x",
                        interface="org.freedesktop.DBus.Properties")


def signal_bytes(serial: int) -> bytes:
    return new_signal(UNIT_PATH, "PropertiesChanged", "s", ("noise",)).serialise(serial=serial)


Script = Callable[[socket.socket], None]


@pytest.fixture
def peer(tmp_path: Path) -> Iterator[Callable[[Script], str]]:
    """A one-connection server on a unix socket that runs a script: its path."""
    threads: list[threading.Thread] = []
    failures: list[BaseException] = []

    def serve(script: Script) -> str:
        path = str(tmp_path / "private")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        listener.listen(1)

        def run() -> None:
            try:
                conn, _ = listener.accept()
                with conn, listener:
                    line = b""
                    while b"BEGIN\r\n" not in line:
                        line += conn.recv(256)
                    assert line.startswith(b"\0AUTH EXTERNAL ")
                    script(conn)
            except BaseException as exc:  # the test fails with it, below, not this thread
                failures.append(exc)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        threads.append(thread)
        return path

    yield serve
    for thread in threads:
        thread.join(5)
        assert not thread.is_alive(), "the peer's script did not finish"
    if failures:
        raise failures[0]


def read_call(conn: socket.socket) -> Any:
    parser = Parser()
    while (message := parser.get_next_message()) is None:
        parser.add_data(conn.recv(65536))
    return message


def test_reply_found_among_signals(peer: Callable[[Script], str]) -> None:
    def script(conn: socket.socket) -> None:
        conn.sendall(b"OK 0123456789abcdef\r\n" + signal_bytes(1))  # signals right after OK
        call = read_call(conn)
        assert call.header.fields[3] == "StartUnit" and call.body == ("x.service", "replace")
        reply = new_method_return(call, "o", ("/org/freedesktop/systemd1/job/7",))
        conn.sendall(signal_bytes(2) + signal_bytes(3) + reply.serialise(serial=4))

    path = peer(script)
    assert bus.call("StartUnit", "ss", ("x.service", "replace"), path=path) == \
        ("/org/freedesktop/systemd1/job/7",)


def test_error_reply_raises_bus_error(peer: Callable[[Script], str]) -> None:
    def script(conn: socket.socket) -> None:
        conn.sendall(b"OK 0123456789abcdef\r\n")
        call = read_call(conn)
        error = new_error(call, "org.freedesktop.systemd1.NoSuchUnit", "s",
                          ("Unit x not found.",))
        conn.sendall(error.serialise(serial=2))

    path = peer(script)
    with pytest.raises(bus.BusError) as exc:
        bus.call("StartUnit", "ss", ("x.service", "replace"), path=path)
    assert exc.value.name == "org.freedesktop.systemd1.NoSuchUnit"
    assert exc.value.message == "Unit x not found."


def test_endless_signals_do_not_stretch_the_deadline(peer: Callable[[Script], str]) -> None:
    def script(conn: socket.socket) -> None:
        conn.sendall(b"OK 0123456789abcdef\r\n")
        read_call(conn)
        with pytest.raises(OSError):
            for serial in range(2, 10_000):
                conn.sendall(signal_bytes(serial))
                time.sleep(0.01)

    path = peer(script)
    start = time.monotonic()
    with pytest.raises(bus.BusUnavailable, match="did not answer in time"):
        bus.call("StartUnit", "ss", ("x.service", "replace"), timeout=0.5, path=path)
    assert time.monotonic() - start < 2


def test_refused_authentication_and_no_socket(peer: Callable[[Script], str],
                                              tmp_path: Path) -> None:
    path = peer(lambda conn: conn.sendall(b"REJECTED EXTERNAL\r\n"))
    with pytest.raises(bus.BusUnavailable, match="refused authentication"):
        bus.call("GetDefaultTarget", path=path)
    with pytest.raises(bus.BusUnavailable):
        bus.call("GetDefaultTarget", path=str(tmp_path / "absent"))


def test_through_a_bus_daemon_hello_comes_first(peer: Callable[[Script], str]) -> None:
    # What the service user does: dbus-daemon wants Hello() before anything else, answers
    # it, sends NameAcquired, and only then the reply to the call (matched by its serial).
    def script(conn: socket.socket) -> None:
        conn.sendall(b"OK 0123456789abcdef\r\n")
        parser = Parser()
        messages: list[Any] = []
        while len(messages) < 2:
            parser.add_data(conn.recv(65536))
            while (message := parser.get_next_message()) is not None:
                messages.append(message)
        hello, call = messages
        assert hello.header.fields[3] == "Hello"
        assert hello.header.fields[6] == "org.freedesktop.DBus"  # destination
        assert call.header.fields[6] == "org.freedesktop.systemd1"
        daemon = DBusAddress("/org/freedesktop/DBus", interface="org.freedesktop.DBus")
        acquired = new_signal(daemon, "NameAcquired", "s", (":1.42",))
        reply = new_method_return(call, "o", ("/org/freedesktop/systemd1/job/9",))
        conn.sendall(new_method_return(hello, "s", (":1.42",)).serialise(serial=1)
                     + acquired.serialise(serial=2) + signal_bytes(3) + reply.serialise(serial=4))

    path = peer(script)
    assert bus.call("StartUnit", "ss", ("x.service", "replace"), path=path, hello=True) == \
        ("/org/freedesktop/systemd1/job/9",)


def test_root_talks_to_pid1_anyone_else_to_the_bus(monkeypatch: pytest.MonkeyPatch,
                                                   tmp_path: Path) -> None:
    private, system = str(tmp_path / "private"), str(tmp_path / "system_bus")
    monkeypatch.setattr(bus, "PRIVATE_SOCKET", private)
    monkeypatch.setattr(bus, "SYSTEM_BUS", system)
    for uid, path in ((0, private), (999, system)):
        monkeypatch.setattr(bus.posix, "geteuid", lambda uid=uid: uid)
        with pytest.raises(bus.BusUnavailable, match=path):  # neither is there
            bus.call("GetDefaultTarget")


def test_one_connection_carries_several_calls(peer: Callable[[Script], str]) -> None:
    """The head start lists the model units and starts one over the same connection: one
    authentication, one Hello(), serials counting on; the peer takes one connection only."""
    rows = [("hoshikage-model@a.service", "", "loaded", "failed", "failed", "", "/u/a", 0,
             "", "/")]

    def script(conn: socket.socket) -> None:
        parser = Parser()

        def next_message() -> Any:
            while (message := parser.get_next_message()) is None:
                parser.add_data(conn.recv(65536))
            return message

        conn.sendall(b"OK 0123456789abcdef\r\n")
        hello, listing = next_message(), next_message()
        assert (hello.header.serial, hello.header.fields[3]) == (1, "Hello")
        assert (listing.header.serial, listing.header.fields[3]) == (2, "ListUnitsByPatterns")
        conn.sendall(new_method_return(hello, "s", (":1.7",)).serialise(serial=1)
                     + signal_bytes(2)
                     + new_method_return(listing, "a(ssssssouso)", (rows,)).serialise(serial=3))
        start = next_message()
        assert (start.header.serial, start.body) == (3, ("hoshikage-model@a.service",
                                                         "replace"))
        conn.sendall(new_method_return(start, "o", ("/job/5",)).serialise(serial=4))

    path = peer(script)
    with bus.Connection(path, hello=True) as conn:
        (state,) = bus.list_units(["hoshikage-model@*.service"], conn=conn)
        assert (state.name, state.active) == ("hoshikage-model@a.service", "failed")
        assert bus.start_unit("hoshikage-model@a.service", conn=conn) == "/job/5"


def test_unit_properties_as_systemctl_show_prints_them(peer: Callable[[Script], str]) -> None:
    """The panel's per-poll look at a loaded model: Properties.Get on the unit's object path
    (escaped as sd-bus does), one connection; an unset number reads as systemctl's "" does."""
    unit = "hoshikage-model@tiny.service"
    answers = {"ActiveState": ("s", "active"), "MainPID": ("u", 4242),
               "MemoryCurrent": ("t", 2**64 - 1)}

    def script(conn: socket.socket) -> None:
        conn.sendall(b"OK 0123456789abcdef\r\n")
        for _ in answers:
            call = read_call(conn)
            fields = call.header.fields
            assert fields[1] == "/org/freedesktop/systemd1/unit/hoshikage_2dmodel_40tiny_2eservice"
            assert (fields[2], fields[3]) == ("org.freedesktop.DBus.Properties", "Get")
            interface, name = call.body
            assert interface == ("org.freedesktop.systemd1.Unit" if name == "ActiveState"
                                 else "org.freedesktop.systemd1.Service")
            conn.sendall(signal_bytes(9) + new_method_return(call, "v", (answers[name],))
                         .serialise(serial=10))

    path = peer(script)
    with bus.Connection(path, hello=False) as conn:
        assert bus.unit_properties(unit, {
            "ActiveState": "org.freedesktop.systemd1.Unit",
            "MainPID": "org.freedesktop.systemd1.Service",
            "MemoryCurrent": "org.freedesktop.systemd1.Service"}, conn) == {
            "ActiveState": "active", "MainPID": "4242", "MemoryCurrent": ""}
