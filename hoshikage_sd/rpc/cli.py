"""`hoshikage rpc-worker setup` (on a worker machine) and `head-setup` (on the head)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hoshikage_sd.rpc import setup


def arguments(p: argparse.ArgumentParser) -> None:
    """`hoshikage rpc-worker`'s arguments (commands/verbs.py has its help line)."""
    p.add_argument("action", choices=("setup", "head-setup"),
                   help="setup: this machine is a worker (hoshikage-rpc.socket); head-setup: "
                        "the model units may reach the manifest's workers")
    p.add_argument("--listen", metavar="ADDR:PORT",
                   help="setup: the worker's address on the private network (port 50052 is "
                        "ggml-rpc-server's usual)")
    p.add_argument("--allow", action="append", default=[], metavar="ADDRESS",
                   help="setup: a head that may connect (an address or network; repeat)")
    p.add_argument("--server", default="/usr/bin/ggml-rpc-server", metavar="PATH",
                   help="setup: llama.cpp's ggml-rpc-server (the same llama.cpp as the "
                        "head's llama-server)")
    p.add_argument("--server-args", default="", metavar="ARGS",
                   help="setup: its arguments, e.g. '-d Vulkan0 -t 8' (devices, threads)")
    p.add_argument("--idle", default="1min", metavar="TIME",
                   help="setup: stop the server after this long without a connection")
    p.add_argument("--no-start", action="store_true",
                   help="write the files only (no systemctl)")


def run(args: argparse.Namespace) -> int:
    from hoshikage_sd.sd.units import systemctl

    if args.action == "setup":
        if not args.listen:
            from hoshikage_sd.errors import die

            die("setup needs --listen ADDR:PORT", hint="the worker's private address")
        listen = setup.listen_address(args.listen)
        allow = setup.allowed(args.allow)
        problem = setup.server_problem(args.server)
        if problem:
            print(f"hoshikage: warning: {problem}", file=sys.stderr)
        setup.write(setup.UNIT_DIR / setup.SOCKET_DROPIN, setup.socket_dropin(listen, allow))
        setup.write(setup.WORKER_CONF, setup.worker_conf(args.server, args.server_args,
                                                         args.idle))
        if not args.no_start:
            systemctl("daemon-reload")
            systemctl("enable", setup.SOCKET)
            systemctl("restart", setup.SOCKET)  # a new address takes a new socket
            print(f"{setup.SOCKET} listens on {listen} for {', '.join(allow)}")
        note = setup.ip_filter_note()
        if note:
            print(f"hoshikage: warning: {note}", file=sys.stderr)
    else:
        from hoshikage_sd import manifest

        config = manifest.load(Path(args.config) if args.config else None)
        if not config.workers:
            from hoshikage_sd.errors import die

            die(f"{config.source} names no workers (its workers: section)",
                hint="README \"Several machines\"")
        addresses = setup.resolve(config.workers.values())
        setup.write(setup.UNIT_DIR / setup.HEAD_DROPIN, setup.head_dropin(addresses))
        if not args.no_start:
            systemctl("daemon-reload")
            print("model units started from now on may reach: "
                  + ", ".join(f"{n} ({', '.join(a)})" for n, a in sorted(addresses.items())))
    return 0
