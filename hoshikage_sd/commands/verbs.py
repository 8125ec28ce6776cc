"""Every `hoshikage` command: the arguments it takes, what it runs on and what runs it.

cli.py builds its parser from COMMANDS, in their order here (hoshikage(1) lists them so),
and runs the one given through its entry. A command's own modules are imported only when it
runs: the unit helpers sit on the cold-start path, so `activate` pays for argparse and this
table, never for the router's HTTP front or `status`'s facts."""

from __future__ import annotations

import sys

TYPE_CHECKING = False  # typing would be on the unit helpers' path (see cli.py)
if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable
    from pathlib import Path

    from hoshikage_sd.manifest import Config
    from hoshikage_sd.router.headstart.take import FirstRequest

#: what a command runs on: nothing (no manifest needed: run(args)); the manifest's path (it
#: reads the file itself: run(args, path, early), `early` the router's waking request); the
#: manifest (run(args, config)), with names.json laid over it, or, for a unit helper (the
#: programs the router starts, directly or through a unit), the router's last good manifest
#: when the file is broken (cli.unit_helper_config): a broken edit never fails what the
#: running router admitted
NOTHING, PATH, HELPER, MANIFEST = "nothing", "path", "helper", "manifest"


class Command:
    """One command: its help line, what it runs on, what runs it, and its arguments."""

    __slots__ = ("arguments", "help", "needs", "run")

    def __init__(self, help: str, needs: str, run: Callable[..., int],
                 arguments: Callable[[argparse.ArgumentParser], None] | None = None) -> None:
        self.help, self.needs, self.run, self.arguments = help, needs, run, arguments


# --- arguments ---------------------------------------------------------------------------------

def json_flag(p: argparse.ArgumentParser, help: str = "machine-readable output") -> None:
    p.add_argument("--json", action="store_true", help=help)


def status_arguments(p: argparse.ArgumentParser) -> None:
    json_flag(p, "machine-readable, with the metrics' counters")


def alias_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=("add", "remove"))
    p.add_argument("names", nargs="+", metavar="NAME", help="add MODEL ALIAS | remove ALIAS")


def tag_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=("set",))
    p.add_argument("tag", help="the tag (a name that means one model at a time)")
    p.add_argument("model", help="the model it points at now (a name, alias or part of one)")


def model_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a model's name or alias")


def name_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("name")


def activate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name")
    p.add_argument("--adopt", type=int, metavar="PID",
                   help="llama-server is already starting as this child (hoshikage-launch)")
    p.add_argument("--spawned", type=float, default=0.0, metavar="MONOTONIC",
                   help="when the adopted child was started (CLOCK_MONOTONIC seconds)")
    p.add_argument("--healthy", type=float, metavar="MONOTONIC",
                   help="when the adopted child's /health said 200")


def logs_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", help="a model's name, alias or tag (as `hoshikage load` takes)")
    p.add_argument("-f", "--follow", action="store_true", help="show new lines as they come")
    p.add_argument("-n", "--lines", type=logs_lines, metavar="N",
                   help="the last N lines (+N: the first N; all)")
    p.add_argument("--since", metavar="WHEN",
                   help="from WHEN on (journalctl's time: '1h ago', today, 09:00)")
    p.add_argument("-o", "--output", metavar="FORMAT",
                   help="journalctl's output format (short, cat, verbose: with hoshikage's "
                        "fields, json, ...)")
    p.add_argument("--json", action="store_const", const="json", dest="output",
                   help="one JSON object a line (-o json)")


def logs_lines(text: str) -> str:
    from hoshikage_sd.commands.logs import lines_value

    return lines_value(text)


def keys_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=("setup",))
    p.add_argument("--plain", action="store_true",
                   help="keep the identity in a root-only file (LoadCredential=) instead of "
                        "sealing it with systemd-creds")
    p.add_argument("--force", action="store_true", help="replace an existing identity")


def encrypt_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", metavar="SRC", help="the model's GGUF file")
    p.add_argument("dest", nargs="?", metavar="DST", help="where (default SRC.age)")
    p.add_argument("-R", "--recipients", metavar="FILE",
                   help="age recipients file (default /etc/hoshikage/age-recipients)")
    p.add_argument("--force", action="store_true", help="replace DST")


def router_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--listen", help="HOST:PORT when not socket-activated "
                                    "(default 127.0.0.1:8080)")


def simulate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("scenario", nargs="?", metavar="SCENARIO",
                   help="a built-in scenario's name or a scenario file")
    p.add_argument("--list", action="store_true", help="the built-in scenarios")
    json_flag(p)


def rpc_worker_arguments(p: argparse.ArgumentParser) -> None:
    from hoshikage_sd.rpc import cli as rpc_cli  # several machines (README)

    rpc_cli.arguments(p)


# --- what runs each ----------------------------------------------------------------------------

def status(args: argparse.Namespace, config: Config) -> int:
    from hoshikage_sd.commands import status

    return status.status(config, args.json)


def list_models(args: argparse.Namespace, config: Config) -> int:
    from hoshikage_sd.commands import status

    return status.list_models(config, args.json)


def ps(args: argparse.Namespace, config: Config) -> int:
    from hoshikage_sd.commands import ps

    return ps.ps(config, args.json)


def metrics(args: argparse.Namespace, config: Config) -> int:
    from hoshikage_sd import metrics

    sys.stdout.buffer.write(metrics.render(config.runtime_dir, config.ramdisk))
    return 0


def check(args: argparse.Namespace, path: Path | None, early: FirstRequest | None) -> int:
    """A manifest that does not parse is check's finding."""
    from hoshikage_sd.commands import check

    return check.check_source(path, args.json)


def edit_names(args: argparse.Namespace, config: Config) -> int:
    from hoshikage_sd.errors import die
    from hoshikage_sd.manifest import names

    if args.command in ("pin", "unpin"):
        print(names.set_pinned(config, args.model, args.command == "pin"))
    elif args.command == "tag":
        print(names.set_tag(config, args.tag, args.model))
    elif args.action == "add":
        if len(args.names) != 2:
            die("usage: hoshikage alias add MODEL ALIAS")
        print(names.add_alias(config, *args.names))
    else:
        if len(args.names) != 1:
            die("usage: hoshikage alias remove ALIAS")
        print(names.remove_alias(config, args.names[0]))
    return 0


def model_name(name: str) -> str:
    from hoshikage_sd.errors import die
    from hoshikage_sd.manifest import NAME_RE

    # The instance name comes from a unit name: never let it reach a path unchecked.
    if not NAME_RE.match(name):
        die(f"'{name}' is not a valid model name")
    return name


def activate(args: argparse.Namespace, config: Config) -> int:
    import time

    from hoshikage_sd.model_unit import activate
    from hoshikage_sd.model_unit.child import Adopted

    adopted = None if args.adopt is None else Adopted(
        args.adopt, args.spawned or time.monotonic(), args.healthy)
    return activate.main(config, model_name(args.name), adopted)


def release(args: argparse.Namespace, config: Config) -> int:
    from hoshikage_sd.model_unit import release

    return release.main(config, model_name(args.name))


def keep(args: argparse.Namespace, config: Config) -> int:
    from hoshikage_sd.model_unit import release

    return release.keep(config, model_name(args.name))


def idle_watch(args: argparse.Namespace, config: Config) -> int:
    from hoshikage_sd.watch import idle

    return idle.main(config)


def journal_read(args: argparse.Namespace) -> int:
    """hoshikage-journal@.service: no manifest needed."""
    from hoshikage_sd.panel import journal

    return journal.serve()


def cache_sync(args: argparse.Namespace, config: Config) -> int:
    from hoshikage_sd import cache

    return cache.sync(config)


def load(args: argparse.Namespace, config: Config) -> int:
    from hoshikage_sd.commands import manual

    return manual.load(config, args.name)


def unload(args: argparse.Namespace, config: Config) -> int:
    from hoshikage_sd.commands import manual

    return manual.unload(config, args.name)


def logs(args: argparse.Namespace, config: Config) -> int:
    from hoshikage_sd.commands import logs

    return logs.logs(config, args.name, args.follow, args.lines, args.since, args.output)


def keys(args: argparse.Namespace) -> int:
    from hoshikage_sd.commands import keys

    return keys.setup(args.plain, args.force)


def encrypt(args: argparse.Namespace) -> int:
    from pathlib import Path

    from hoshikage_sd.commands import keys

    return keys.encrypt(Path(args.source), args.dest and Path(args.dest),
                        args.recipients and Path(args.recipients), args.force)


def router(source: Path | None, listen: str | None, early: FirstRequest | None = None) -> int:
    """The router starts whatever the manifest says: a broken one gets every model request
    a 503 with the reason until it is fixed (a router that exited instead would be started
    again for the same connection until the socket's start limit takes the port down)."""
    from hoshikage_sd import log, manifest
    from hoshikage_sd.errors import HoshikageError
    from hoshikage_sd.manifest import Config
    from hoshikage_sd.router.config import load_config
    from hoshikage_sd.router.headstart import take

    log.hold()  # until READY=1 (router.server.after_ready): the journal's imports can wait
    path = source or manifest.config_path()
    config: Config | None = None
    broken = None
    try:
        config = load_config(path)
    except HoshikageError as err:
        broken = err.message
    first = take.take(config, early)  # before the router's own imports
    from hoshikage_sd.router import server

    return server.main(config or Config(source=path), listen, first, broken)


def run_router(args: argparse.Namespace, path: Path | None, early: FirstRequest | None) -> int:
    return router(path, args.listen, early)


def reload(args: argparse.Namespace, source: Path | None, early: FirstRequest | None) -> int:
    """Tell the running router (if any) to read the manifest and names.json again."""
    from hoshikage_sd import manifest, protocol
    from hoshikage_sd.errors import HoshikageError
    from hoshikage_sd.manifest import Config

    path = source or manifest.config_path()
    try:
        runtime_dir = manifest.load(path).runtime_dir
    except HoshikageError as err:  # the default place is the router's
        print(f"warning: {err.message}: the router keeps serving its last good manifest",
              file=sys.stderr)
        runtime_dir = Config(source=path).runtime_dir
    if protocol.send_datagram(protocol.router_socket(str(runtime_dir)).encode(),
                              protocol.RELOAD):
        print(f"router told to reload {path}")
    return 0


def simulate(args: argparse.Namespace) -> int:
    """A what-if tool: it must work without a manifest."""
    from hoshikage_sd.commands import simulate

    return simulate.main(args.scenario, args.json, args.list)


def rpc_worker(args: argparse.Namespace) -> int:
    """A worker machine has no manifest."""
    from hoshikage_sd.rpc import cli as rpc_cli

    return rpc_cli.run(args)


COMMANDS: dict[str, Command] = {
    "status": Command("every model, the router, RAM disk and memory", MANIFEST, status,
                      status_arguments),
    "ps": Command("the loaded models: state, llama-server's PID, memory, since, last request, "
                  "in flight", MANIFEST, ps, json_flag),
    "metrics": Command("the Prometheus metrics as text (what GET /metrics answers; e.g. for "
                       "node_exporter's textfile collector)", MANIFEST, metrics),
    "check": Command("validate the manifest and what it needs without starting anything "
                     "(exit 1 on any problem, 2 when the manifest does not parse)", PATH,
                     check, json_flag),
    "list": Command("the models: names, size, architecture, estimate, state", MANIFEST,
                    list_models, json_flag),
    "alias": Command("add or remove an alias (kept in /var/lib/hoshikage)", MANIFEST,
                     edit_names, alias_arguments),
    "tag": Command("point a tag at a model (it moves from any other)", MANIFEST, edit_names,
                   tag_arguments),
    "pin": Command("a model never stopped: not at its TTL, not to make room (kept in "
                   "/var/lib/hoshikage, over the manifest's pinned:)", MANIFEST, edit_names,
                   model_argument),
    "unpin": Command("a model stopped at its TTL and evicted as any other again", MANIFEST,
                     edit_names, model_argument),
    "activate": Command("(unit helper) stage and serve one model", HELPER, activate,
                        activate_arguments),
    "release": Command("(unit helper) clean up after a model unit stopped", HELPER, release,
                       name_argument),
    "keep": Command("(unit helper) make a stopped model's RAM-disk copy to keep", HELPER,
                    keep, name_argument),
    "idle-watch": Command("(unit helper) stop models idle past their TTL", HELPER,
                          idle_watch),
    "journal-read": Command("(unit helper) answer one of the web panel's requests for "
                            "hoshikage's journal records (on stdin, stdout)", NOTHING,
                            journal_read),
    "cache-sync": Command("(unit helper) copy high-ranked models to the SSD cache, expire "
                          "unused ones", HELPER, cache_sync),
    "load": Command("load a model now (through systemd), showing its progress; exit 1 with "
                    "the reason if it fails", MANIFEST, load, name_argument),
    "unload": Command("unload a model now (through systemd)", MANIFEST, unload,
                      name_argument),
    "logs": Command("a model's journal: its unit's lines (llama-server's among them) and "
                    "hoshikage's records about it", MANIFEST, logs, logs_arguments),
    "keys": Command("the machine's age key for encrypted models", NOTHING, keys,
                    keys_arguments),
    "encrypt": Command("write an age-encrypted copy of a model (decrypted only into the RAM "
                       "disk)", NOTHING, encrypt, encrypt_arguments),
    "router": Command("(unit helper) the socket-activated request router", PATH, run_router,
                      router_arguments),
    "reload": Command("make the running router read the manifest and names again now "
                      "(nothing to do when none runs)", PATH, reload),
    "simulate": Command("replay a usage scenario through the cache policy (no manifest "
                        "needed)", NOTHING, simulate, simulate_arguments),
    "rpc-worker": Command("several machines: set up a llama.cpp RPC worker here, or let this "
                          "head's models reach its workers", NOTHING, rpc_worker,
                          rpc_worker_arguments),
}
