"""The names a request may give in its Host field when it reached this machine on a loopback
address: localhost, an IP address, this machine's name, or one the manifest allows
(`allowed_hosts:`). Any other name on a loopback connection is a DNS rebinding: a page on
evil.example whose name now resolves to 127.0.0.1 is, to the browser, its own origin, so
without this it could drive the panel and read the API's answers. A connection to another
address (the socket opened to the network) is not checked: its clients name it as they
like, and API keys guard it. Built-in modules only: the head start asks it too.
"""

from __future__ import annotations

import _socket

TYPE_CHECKING = False  # typing would be on the head start
if TYPE_CHECKING:
    from collections.abc import Sequence


def loopback(address: str) -> bool:
    """127.0.0.0/8, ::1 and 127.x mapped into IPv6 (a socket's own address, as the kernel
    writes it)."""
    address = address.partition("%")[0].lower().removeprefix("::ffff:")
    return address.startswith("127.") or address == "::1"


def name_of(host: str) -> str:
    """The name in a Host field, without its port, lower case."""
    host = host.strip()
    if host.startswith("["):
        return host[1:host.find("]")].lower() if "]" in host else host.lower()
    name, colon, port = host.rpartition(":")
    return (name if colon and port.isdigit() else host).rstrip(".").lower()


def ip_literal(name: str) -> bool:
    for family in (_socket.AF_INET, _socket.AF_INET6):
        try:
            _socket.inet_pton(family, name)
            return True
        except OSError:
            pass
    return False


def allowed(host: str | None, local: str, names: Sequence[str] = ()) -> bool:
    """May a request with this Host field, to the local address `local`, be answered?"""
    if host is None or not loopback(local):
        return True
    name = name_of(host)
    if not name or name == "localhost" or name.endswith(".localhost") or ip_literal(name):
        return True
    return name in machine_names() or name in (name_of(n) for n in names)


_machine: frozenset[str] | None = None


def machine_names() -> frozenset[str]:
    """This machine's names: its hostname, NAME.local, and every name /etc/hosts gives a
    loopback address (Debian's installer writes `127.0.1.1 box.example.com box`): read
    once a process."""
    global _machine
    if _machine is None:
        machine = _socket.gethostname().lower()
        found = {machine, f"{machine}.local"}
        try:
            with open("/etc/hosts", encoding="utf-8", errors="replace") as f:
                for line in f:
                    fields = line.partition("#")[0].split()
                    if len(fields) > 1 and loopback(fields[0]):
                        found.update(n.rstrip(".").lower() for n in fields[1:])
        except OSError:
            pass
        _machine = frozenset(found)
    return _machine
