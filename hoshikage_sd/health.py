"""The activator's readiness probe: GET a path on a unix socket, read the status code.

A few lines of HTTP/1.0 on a plain socket: it sits on the cold-start path, where importing
http.client (and with it ssl) would cost more than the probe itself.
"""

from __future__ import annotations

import socket


def probe(path: str, route: str = "/health", timeout: float = 2.0) -> int | None:
    """The HTTP status of GET route, or None when nothing answers."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(timeout)
            sock.connect(path)
            sock.sendall(f"GET {route} HTTP/1.0\r\nHost: localhost\r\n\r\n".encode())
            head = b""
            while b"\r\n" not in head and len(head) < 4096:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                head += chunk
    except OSError:
        return None
    parts = head.split(b"\r\n", 1)[0].split()
    if len(parts) >= 2 and parts[0].startswith(b"HTTP/") and parts[1].isdigit():
        return int(parts[1])
    return None

