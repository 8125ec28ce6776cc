"""sd/wire.py against jeepney (the marshalling it replaced on the head start's path): what
it writes jeepney reads as meant, what jeepney writes it reads back exactly."""

from __future__ import annotations

import pytest
from jeepney import DBusAddress, Parser, new_error, new_method_call, new_method_return
from jeepney.low_level import HeaderFields, MessageType

from hoshikage_sd.sd import bus, wire

CALLS = [("StartUnit", "ss", ("hoshikage-model@a.service", "replace")),
         ("ListUnitsByPatterns", "asas", (["active", "activating"],
                                          ["hoshikage-model@*.service"])),
         ("ListUnitsByPatterns", "asas", ([], ["x@*.service"])),
         ("ListUnitsByNames", "as", (["a.service", "b\\x2dc.service"],)),
         ("ResetFailedUnit", "s", ("ünïcode@x.service",)),
         ("GetDefaultTarget", "", ())]


@pytest.mark.parametrize(("member", "signature", "body"), CALLS)
def test_a_call_reads_in_jeepney_as_meant(member: str, signature: str,
                                          body: tuple[object, ...]) -> None:
    data = wire.method_call(7, *bus.MANAGER, member, signature, body)
    assert wire.message_size(data) == len(data)
    parser = Parser()
    parser.add_data(data)
    message = parser.get_next_message()
    assert message is not None and parser.get_next_message() is None
    fields = message.header.fields
    assert message.header.message_type is MessageType.method_call
    assert message.header.serial == 7
    assert (fields[HeaderFields.destination], fields[HeaderFields.path],
            fields[HeaderFields.interface], fields[HeaderFields.member]) == (*bus.MANAGER, member)
    assert fields.get(HeaderFields.signature, "") == signature
    assert message.body == body


def jeepney_call() -> object:
    address = DBusAddress(bus.MANAGER[1], bus_name=bus.MANAGER[0], interface=bus.MANAGER[2])
    call = new_method_call(address, "ListUnitsByPatterns", "asas", ([], ["x"]))
    call.header.serial = 41
    return call


ROWS = [("hoshikage-model@a.service", "hoshikage model a", "loaded", "active", "running", "",
         "/org/freedesktop/systemd1/unit/hoshikage_2dmodel_40a_2eservice", 0, "", "/"),
        ("hoshikage-model@b\\x2dc.service", "ünï", "loaded", "deactivating", "stop-sigterm", "",
         "/org/freedesktop/systemd1/unit/b", 4294967295, "stop", "/org/freedesktop/systemd1/job/9")]


@pytest.mark.parametrize(("signature", "body"), [
    ("a(ssssssouso)", (ROWS,)), ("a(ssssssouso)", ([],)), ("o", ("/org/freedesktop/job/1",)),
    ("s", (":1.42",)), ("", ()), ("aay", ([b"ab", b""],)), ("a{sv}", ({"A": ("u", 3)},)),
    ("(ibtxd)", ((-5, True, 2**40, -2**40, 0.5),))])
def test_a_reply_from_jeepney_reads_back_exactly(signature: str,
                                                 body: tuple[object, ...]) -> None:
    reply = new_method_return(jeepney_call(), signature, body)
    data = reply.serialise(serial=42)
    assert wire.message_size(data) == len(data)
    message = wire.read_message(data)
    assert (message.kind, message.serial) == (wire.METHOD_RETURN, 42)
    assert message.fields[wire.REPLY_SERIAL] == 41
    expected = {"a(ssssssouso)": lambda b: ([tuple(r) for r in b[0]],),
                "aay": lambda b: ([list(x) for x in b[0]],),
                "a{sv}": lambda b: ([("A", 3)],)}.get(signature, lambda b: b)(body)
    got = {"aay": lambda b: ([list(x.encode("latin-1")) if isinstance(x, str) else list(x)
                              for x in b[0]],)}.get(signature, lambda b: b)(message.body)
    assert got == expected


def test_an_error_reply_reads_with_its_name() -> None:
    error = new_error(jeepney_call(), "org.freedesktop.systemd1.NoSuchUnit", "s", ("gone",))
    message = wire.read_message(error.serialise(serial=3))
    assert message.kind == wire.ERROR
    assert message.fields[wire.ERROR_NAME] == "org.freedesktop.systemd1.NoSuchUnit"
    assert message.body == ("gone",)


def test_sizes_and_garbage() -> None:
    data = wire.method_call(1, *bus.DAEMON, "Hello")
    assert wire.message_size(data[:15]) is None
    assert wire.message_size(data[:16]) == len(data)
    with pytest.raises(wire.WireError):
        wire.message_size(b"X" + data[1:])
    with pytest.raises(wire.WireError):
        wire.read_message(data[:20] + b"\xff" * (len(data) - 20))
