"""Several "machines" on one host: network namespaces the test makes, joined by a bridge.

Each namespace is held by a `sleep` of ours (unshare --net) and named by /proc/PID/ns/net,
so nothing is registered on the host (no /run/netns) and everything goes when the sleeps
are killed. The bridge lives in a namespace of its own (the "switch"); each machine gets a
veth pair, one end on the bridge, the other its eth0 with 10.77.0.N/24. The host's network
is never touched, and no address outside 10.77.0.0/24 and loopback exists in them.
"""

from __future__ import annotations

import os
import subprocess
import time
from types import TracebackType
from typing import Self

SUBNET = "10.77.0"


def _ns_of(pid: int) -> str:
    return os.readlink(f"/proc/{pid}/ns/net")


class Lan:
    def __init__(self) -> None:
        self.holders: list[subprocess.Popen[bytes]] = []
        self.switch = self._namespace()
        self.ip(self.switch, "link", "add", "br0", "type", "bridge")
        self.ip(self.switch, "link", "set", "br0", "up")

    def _namespace(self) -> int:
        """A new network namespace with its loopback up: the PID that holds it."""
        holder = subprocess.Popen(["unshare", "--net", "--", "sleep", "infinity"],
                                  start_new_session=True)
        self.holders.append(holder)
        mine = _ns_of(os.getpid())
        deadline = time.monotonic() + 5
        while _ns_of(holder.pid) == mine:
            if time.monotonic() > deadline:
                raise RuntimeError("unshare --net did not make a namespace")
            time.sleep(0.005)
        self.ip(holder.pid, "link", "set", "lo", "up")
        return holder.pid

    @staticmethod
    def ip(pid: int, *args: str) -> None:
        subprocess.run(["nsenter", f"--net=/proc/{pid}/ns/net", "ip", *args], check=True,
                       capture_output=True)

    def machine(self, n: int) -> str:
        """A machine's namespace with eth0 at SUBNET.n on the bridge: its /proc path."""
        pid = self._namespace()
        self.ip(self.switch, "link", "add", f"vh{n}", "type", "veth", "peer", "name", "eth0",
                "netns", str(pid))
        self.ip(self.switch, "link", "set", f"vh{n}", "master", "br0", "up")
        self.ip(pid, "addr", "add", f"{SUBNET}.{n}/24", "dev", "eth0")
        self.ip(pid, "link", "set", "eth0", "up")
        return f"/proc/{pid}/ns/net"

    def close(self) -> None:
        for holder in self.holders:
            holder.kill()
            holder.wait()
        self.holders.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
