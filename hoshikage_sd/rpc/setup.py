"""The drop-ins that put a worker on the network and let the head's model units reach it.

On a worker machine, `hoshikage rpc-worker setup --listen ADDR:PORT --allow HEAD` writes
hoshikage-rpc.socket's address and allow list (a socket's addresses cannot come from an
environment file, so a drop-in) and /etc/hoshikage/rpc-worker.conf (the server's path, its
arguments, the idle time), then enables and restarts the socket.

On the head, the model unit has no IP at all (RestrictAddressFamilies=AF_UNIX,
IPAddressDeny=any): `hoshikage rpc-worker head-setup` gives it IPv4 and IPv6 and allows
exactly the manifest's workers' addresses (names resolved now), nothing else.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from hoshikage_sd.errors import die
from hoshikage_sd.manifest.model import Worker

UNIT_DIR = Path("/etc/systemd/system")
SOCKET_DROPIN = "hoshikage-rpc.socket.d/hoshikage.conf"
HEAD_DROPIN = "hoshikage-model@.service.d/rpc-workers.conf"
WORKER_CONF = Path("/etc/hoshikage/rpc-worker.conf")
SOCKET = "hoshikage-rpc.socket"


def listen_address(text: str) -> str:
    """ADDR:PORT as ListenStream= takes it (an IPv6 address in brackets)."""
    host, colon, port = text.rpartition(":")
    if not colon or not port.isdigit() or not 0 < int(port) < 65536:
        die(f"--listen {text}: not ADDRESS:PORT", hint="e.g. --listen 10.0.0.2:50052")
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        die(f"--listen {text}: {host} is not an IP address (the socket binds one address: "
            "the private network's or WireGuard's)")
    return f"[{address}]:{port}" if address.version == 6 else f"{address}:{port}"


def allowed(entries: Iterable[str]) -> list[str]:
    """--allow's addresses or networks (10.0.0.1, 10.0.0.0/24), as IPAddressAllow= takes."""
    out = []
    for entry in entries:
        try:
            out.append(str(ipaddress.ip_network(entry, strict=False)))
        except ValueError:
            die(f"--allow {entry}: not an IP address or network",
                hint="the head's address on the private network (or WireGuard)")
    if not out:
        die("name the head(s) that may connect: --allow ADDRESS",
            hint="RPC has no authentication: only the heads' addresses may reach it")
    return out


def socket_dropin(listen: str, allow: Sequence[str]) -> str:
    return ("# Written by `hoshikage rpc-worker setup`: where the worker listens and who may\n"
            "# connect (the unit's IPAddressDeny=any drops everyone else's packets).\n"
            "[Socket]\nListenStream=\n"
            f"ListenStream={listen}\n"
            + "".join(f"IPAddressAllow={a}\n" for a in allow))


def server_problem(server: str) -> str | None:
    """Why the worker's unit would not run `server`, or None: not an executable file, or in
    a /tmp the unit does not see (DynamicUser= gives it a /tmp and /var/tmp of its own)."""
    real = os.path.realpath(server)
    for hidden in ("/tmp", "/var/tmp"):
        if real == hidden or real.startswith(hidden + "/"):
            return (f"{server} is in {hidden}, which hoshikage-rpc-server.service does not "
                    "see (it has its own): put the server elsewhere (e.g. /usr/local/bin)")
    if not os.access(server, os.X_OK):
        return (f"{server} is not an executable file here: the worker's unit will fail until "
                "it is (--server PATH)")
    return None


def worker_conf(server: str, args: str, idle: str) -> str:
    return ("# Written by `hoshikage rpc-worker setup` (hoshikage-rpc*.service read it).\n"
            f"HOSHIKAGE_RPC_SERVER={server}\n"
            f"HOSHIKAGE_RPC_ARGS={args}\n"
            f"HOSHIKAGE_RPC_IDLE={idle}\n")


def resolve(workers: Iterable[Worker]) -> dict[str, list[str]]:
    """Each worker's addresses, by name (getaddrinfo: a name may have several)."""
    out: dict[str, list[str]] = {}
    for worker in workers:
        try:
            infos = socket.getaddrinfo(worker.host, worker.port, type=socket.SOCK_STREAM)
        except OSError as exc:
            die(f"worker '{worker.name}': cannot resolve {worker.host}: {exc}")
        out[worker.name] = sorted({str(info[4][0]) for info in infos})
    return out


def head_dropin(addresses: Mapping[str, Sequence[str]]) -> str:
    lines = ["# Written by `hoshikage rpc-worker head-setup`: llama-server's --rpc reaches the",
             "# manifest's workers, and only them.", "[Service]",
             "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6"]
    for name, found in sorted(addresses.items()):
        lines += [f"# {name}"] + [f"IPAddressAllow={a}" for a in found]
    return "\n".join(lines) + "\n"


def ip_filter_note() -> str | None:
    """IPAddressAllow=/IPAddressDeny= are a cgroup BPF filter: only on the unified cgroup
    hierarchy (cgroup v2, Debian's default since 11). Elsewhere systemd ignores them."""
    if Path("/sys/fs/cgroup/cgroup.controllers").exists():
        return None
    return ("this machine does not run the unified cgroup hierarchy (cgroup v2): systemd "
            "ignores IPAddressAllow=/IPAddressDeny= here, so the allow list is not enforced; "
            "boot with systemd.unified_cgroup_hierarchy=1, or filter the port with nftables")


def write(path: Path, text: str) -> None:
    from hoshikage_sd.files import write_atomic

    write_atomic(path, text, mode=0o644)
    print(f"wrote {path}")
