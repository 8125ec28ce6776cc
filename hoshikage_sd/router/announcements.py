"""The router's datagram socket on which model units say "it serves now"."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Callable
from pathlib import Path

from hoshikage_sd import protocol

logger = logging.getLogger("hoshikage.router")


class Announcements:
    """Model units saying "it serves now" (protocol.tell_router: the model's name in a datagram
    on a socket in the runtime directory). While a model loads the router waits for that
    instead of probing its /health every START_POLL: the probes cost CPU per cold start
    (docs/performance.md), CPU that llama-server's load and first answer want.

    The same socket takes protocol.RELOAD (`hoshikage reload`): `on_reload` is called."""

    def __init__(self, runtime_dir: Path, on_reload: Callable[[], None] | None = None) -> None:
        self.path = Path(protocol.router_socket(str(runtime_dir)))
        self.events: dict[str, asyncio.Event] = {}
        self.sock: socket.socket | None = None
        self.on_reload = on_reload

    @property
    def listening(self) -> bool:
        return self.sock is not None

    def open(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()  # a router before this one's
            umask = os.umask(0o177)  # only its user and root (units, `hoshikage reload`)
            try:
                sock.bind(str(self.path))
            finally:
                os.umask(umask)
        except OSError as exc:
            sock.close()
            logger.warning("probing starting models instead: cannot listen on %s: %s",
                           self.path, exc.strerror)
            return
        sock.setblocking(False)
        asyncio.get_running_loop().add_reader(sock.fileno(), self._receive)
        self.sock = sock

    def _receive(self) -> None:
        assert self.sock is not None
        while True:
            try:
                name = self.sock.recv(256)
            except OSError:  # BlockingIOError: all read
                return
            if name == protocol.RELOAD:
                if self.on_reload is not None:
                    self.on_reload()
                continue
            event = self.events.get(name.decode(errors="replace"))
            if event is not None:
                event.set()

    def expect(self, name: str) -> asyncio.Event:
        """The event a start of `name` waits on: a new one, so none is left set by an
        earlier start."""
        event = self.events[name] = asyncio.Event()
        return event

    def close(self) -> None:
        if self.sock is not None:
            asyncio.get_running_loop().remove_reader(self.sock.fileno())
            self.sock.close()
            self.sock = None
            with contextlib.suppress(OSError):
                self.path.unlink()
