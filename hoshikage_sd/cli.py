# PYTHON_ARGCOMPLETE_OK (argcomplete's marker: this CLI answers bash completion, complete())
"""The `hoshikage` command: unit helpers (activate, release, idle-watch, router) and the
commands people type (status, check, logs). Imports are per command: helpers sit on the cold-start
path, so `activate` never pays for the router's HTTP front, and `hoshikage router` starts
the waking request's model before it imports even argparse (router/headstart)."""

from __future__ import annotations

import sys

from hoshikage_sd import __version__

TYPE_CHECKING = False  # typing would be on the router's head start when nothing loaded it
if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable
    from pathlib import Path
    from typing import Any

    from hoshikage_sd.manifest import Config
    from hoshikage_sd.router.headstart.take import FirstRequest


def parser() -> argparse.ArgumentParser:
    import argparse

    ap = argparse.ArgumentParser(prog="hoshikage", description="local LLMs, the systemd way")
    ap.add_argument("--version", action="version", version=f"hoshikage {__version__}")
    global_options(ap, False)
    # The global options anywhere on the line: each command takes them too, defaulting to
    # nothing (SUPPRESS), so that one given before the command is not reset by the
    # command's default.
    common = argparse.ArgumentParser(add_help=False)
    global_options(common, argparse.SUPPRESS)
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND",
                            parser_class=_parser_with(common))
    p = sub.add_parser("status", help="every model, the router, RAM disk and memory")
    p.add_argument("--json", action="store_true",
                   help="machine-readable, with the metrics' counters")
    p = sub.add_parser("ps", help="the loaded models: state, llama-server's PID, memory, "
                                  "since, last request, in flight")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    sub.add_parser("metrics", help="the Prometheus metrics as text (what GET /metrics "
                                   "answers; e.g. for node_exporter's textfile collector)")
    p = sub.add_parser("check", help="validate the manifest and what it needs without "
                                     "starting anything (exit 1 on any problem)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p = sub.add_parser("list", help="the models: names, size, architecture, estimate, state")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p = sub.add_parser("alias", help="add or remove an alias (kept in /var/lib/hoshikage)")
    p.add_argument("action", choices=("add", "remove"))
    p.add_argument("names", nargs="+", metavar="NAME", help="add MODEL ALIAS | remove ALIAS")
    p = sub.add_parser("tag", help="point a tag at a model (it moves from any other)")
    p.add_argument("action", choices=("set",))
    p.add_argument("tag")
    p.add_argument("model")
    for verb, what in (("pin", "never stopped: not at its TTL, not to make room (kept in "
                                "/var/lib/hoshikage, over the manifest's pinned:)"),
                       ("unpin", "stopped at its TTL and evicted as any other again")):
        p = sub.add_parser(verb, help=f"a model {what}")
        p.add_argument("model", help="a model's name or alias")
    p = sub.add_parser("activate", help="(unit helper) stage and serve one model")
    p.add_argument("name")
    p.add_argument("--adopt", type=int, metavar="PID",
                   help="llama-server is already starting as this child (hoshikage-launch)")
    p.add_argument("--spawned", type=float, default=0.0, metavar="MONOTONIC",
                   help="when the adopted child was started (CLOCK_MONOTONIC seconds)")
    p.add_argument("--healthy", type=float, metavar="MONOTONIC",
                   help="when the adopted child's /health said 200")
    p = sub.add_parser("release", help="(unit helper) clean up after a model unit stopped")
    p.add_argument("name")
    sub.add_parser("idle-watch", help="(unit helper) stop models idle past their TTL")
    sub.add_parser("journal-read", help="(unit helper) answer one of the web panel's requests "
                                        "for hoshikage's journal records (on stdin, stdout)")
    sub.add_parser("cache-sync", help="(unit helper) copy high-ranked models to the SSD "
                                      "cache, expire unused ones")
    p = sub.add_parser("load", help="load a model now (through systemd), showing its "
                                    "progress; exit 1 with the reason if it fails")
    p.add_argument("name")
    p = sub.add_parser("unload", help="unload a model now (through systemd)")
    p.add_argument("name")
    p = sub.add_parser("logs", help="a model's journal: its unit's lines (llama-server's "
                                    "among them) and hoshikage's records about it")
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
    p = sub.add_parser("keys", help="the machine's age key for encrypted models")
    p.add_argument("action", choices=("setup",))
    p.add_argument("--plain", action="store_true",
                   help="keep the identity in a root-only file (LoadCredential=) instead of "
                        "sealing it with systemd-creds")
    p.add_argument("--force", action="store_true", help="replace an existing identity")
    p = sub.add_parser("encrypt", help="write an age-encrypted copy of a model "
                                       "(decrypted only into the RAM disk)")
    p.add_argument("source", metavar="SRC", help="the model's GGUF file")
    p.add_argument("dest", nargs="?", metavar="DST", help="where (default SRC.age)")
    p.add_argument("-R", "--recipients", metavar="FILE",
                   help="age recipients file (default /etc/hoshikage/age-recipients)")
    p.add_argument("--force", action="store_true", help="replace DST")
    p = sub.add_parser("router", help="(unit helper) the socket-activated request router")
    p.add_argument("--listen", help="HOST:PORT when not socket-activated "
                                    "(default 127.0.0.1:8080)")
    sub.add_parser("reload", help="make the running router read the manifest and names "
                                  "again now (nothing to do when none runs)")
    p = sub.add_parser("simulate", help="replay a usage scenario through the cache policy "
                                        "(no manifest needed)")
    p.add_argument("scenario", nargs="?", metavar="SCENARIO",
                   help="a built-in scenario's name or a scenario file")
    p.add_argument("--list", action="store_true", help="the built-in scenarios")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    from hoshikage_sd.rpc import cli as rpc_cli  # several machines (README)

    rpc_cli.add_parser(sub)
    return ap


def global_options(ap: argparse.ArgumentParser, default: Any) -> None:
    """--debug and --config, on the top parser (`default`: their defaults) and on each
    command (argparse.SUPPRESS: absent unless given there)."""
    ap.add_argument("--debug", action="store_true",
                    help="verbose logs, tracebacks on errors",
                    **({} if default is False else {"default": default}))
    ap.add_argument("--config", help="manifest (default $HOSHIKAGE_CONFIG or "
                                     "/etc/hoshikage/models.yaml)",
                    **({} if default is False else {"default": default}))


def _parser_with(common: argparse.ArgumentParser) -> type[argparse.ArgumentParser]:
    """The commands' parser class: each gets `common`'s options (parents=)."""
    import argparse

    class Command(argparse.ArgumentParser):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["parents"] = [*kwargs.get("parents", ()), common]
            super().__init__(*args, **kwargs)

    return Command


def logs_lines(text: str) -> str:
    from hoshikage_sd.commands.logs import lines_value

    return lines_value(text)


def model_name(name: str) -> str:
    from hoshikage_sd.errors import die
    from hoshikage_sd.manifest import NAME_RE

    # The instance name comes from a unit name: never let it reach a path unchecked.
    if not NAME_RE.match(name):
        die(f"'{name}' is not a valid model name")
    return name


def run(args: argparse.Namespace, early: FirstRequest | None = None) -> int:
    from pathlib import Path

    if args.command == "simulate":  # a what-if tool: it must work without a manifest
        from hoshikage_sd.commands import simulate

        return simulate.main(args.scenario, args.json, args.list)
    if args.command in ("keys", "encrypt"):  # no manifest needed either
        from hoshikage_sd.commands import keys

        if args.command == "keys":
            return keys.setup(args.plain, args.force)
        return keys.encrypt(Path(args.source), args.dest and Path(args.dest),
                            args.recipients and Path(args.recipients), args.force)
    if args.command == "journal-read":  # hoshikage-journal@.service: no manifest needed
        from hoshikage_sd.panel import journal

        return journal.serve()
    if args.command == "rpc-worker":  # a worker machine has no manifest
        from hoshikage_sd.rpc import cli as rpc_cli

        return rpc_cli.run(args)
    from hoshikage_sd import manifest
    from hoshikage_sd.manifest import names

    path = Path(args.config) if args.config else None
    if args.command == "check":  # a manifest that does not parse is check's finding
        from hoshikage_sd.commands import check

        return check.check_source(path, args.json)
    if args.command == "router":
        return router(path, args.listen, early)
    if args.command == "reload":
        return reload(path)
    if args.command in UNIT_HELPERS:
        helper_config = unit_helper_config(args, path)
        if helper_config is None:
            return 0
        config = helper_config
    else:
        config = names.effective(manifest.load(path))
    if args.command == "activate":
        import time

        from hoshikage_sd.model_unit import activate

        adopted = None if args.adopt is None else activate.Adopted(
            args.adopt, args.spawned or time.monotonic(), args.healthy)
        return activate.main(config, model_name(args.name), adopted)
    if args.command == "release":
        from hoshikage_sd.model_unit import release

        return release.main(config, model_name(args.name))
    if args.command == "idle-watch":
        from hoshikage_sd.watch import idle

        return idle.main(config)
    if args.command in ("alias", "tag", "pin", "unpin"):
        return edit_names(config, args)
    if args.command == "cache-sync":
        from hoshikage_sd import cache

        return cache.sync(config)
    if args.command in ("load", "unload"):
        from hoshikage_sd.commands import manual

        return manual.load(config, args.name) if args.command == "load" \
            else manual.unload(config, args.name)
    if args.command == "logs":
        from hoshikage_sd.commands import logs

        return logs.logs(config, args.name, args.follow, args.lines, args.since,
                         args.output)
    if args.command == "metrics":
        from hoshikage_sd import metrics

        sys.stdout.buffer.write(metrics.render(config.runtime_dir, config.ramdisk))
        return 0
    if args.command == "ps":
        from hoshikage_sd.commands import ps

        return ps.ps(config, args.json)
    from hoshikage_sd.commands import status

    if args.command == "list":
        return status.list_models(config, args.json)
    return status.status(config, args.json)


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


def reload(source: Path | None) -> int:
    """Tell the running router (if any) to read the manifest and names.json again."""
    from hoshikage_sd import manifest, protocol
    from hoshikage_sd.errors import HoshikageError
    from hoshikage_sd.manifest import Config

    path = source or manifest.config_path()
    try:
        runtime_dir = manifest.load(path).runtime_dir
    except HoshikageError:  # the router says what is wrong; the default place is its
        runtime_dir = Config(source=path).runtime_dir
    if protocol.send_datagram(protocol.router_socket(str(runtime_dir)).encode(),
                              protocol.RELOAD):
        print(f"router told to reload {path}")
    return 0


#: the programs the router starts (directly or through a unit): they fall back to the router's
#: last good manifest when the file is broken, so a broken edit never fails what the running
#: router admitted
UNIT_HELPERS = ("activate", "release", "idle-watch", "cache-sync")


def unit_helper_config(args: argparse.Namespace, path: Path | None) -> Config | None:
    """The manifest (or the router's last good copy of it) for a unit helper; None when
    there is neither and the helper should exit without doing anything."""
    from hoshikage_sd import log
    from hoshikage_sd.errors import HoshikageError
    from hoshikage_sd.lastgood import load_or_last_good
    from hoshikage_sd.manifest import Config, config_path

    try:
        return load_or_last_good(path)
    except HoshikageError as err:
        if args.command in ("idle-watch", "cache-sync"):
            # Exit cleanly: a failing oneshot would only add noise; the reason is the error.
            log.log.error("%s: nothing done: %s", args.command, err.message)
            return None
        if args.command == "release":
            # Clean up at the default places rather than leave a copy on the RAM disk.
            log.log.error("release %s at the default places: %s", args.name, err.message)
            return Config(source=path or config_path())
        import os
        from pathlib import Path

        from hoshikage_sd import protocol
        from hoshikage_sd.manifest import NAME_RE
        from hoshikage_sd.runtime import Runtime

        if NAME_RE.match(args.name):  # the router reads this as the reason of the failure
            shared = protocol.runtime_dir(os.environ.get("RUNTIME_DIRECTORY"))
            Runtime(Path(shared)).set_error(args.name, err.message)
        raise


def edit_names(config: Config, args: argparse.Namespace) -> int:
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


def router_main(inserted: int = 0) -> int:
    """hoshikage-router (model_unit/install.py): `hoshikage router` started without site
    (python -IS; docs/performance.md): the head start first, then site-packages, then the rest.
    `inserted`: how many directories the stub put first on the path, taken away again once
    site has set the path up (they would shadow the venv's own packages)."""
    from hoshikage_sd.router.headstart import take

    early = take.take_early()
    import site

    del sys.path[:inserted]
    site.main()
    # `hoshikage router` without argparse (before READY=1): the unit passes nothing
    return guarded("router", False, lambda: router(None, None, early))


def main(argv: list[str] | None = None, early: FirstRequest | None = None) -> int:
    if early is None and (sys.argv[1:] if argv is None else argv) == ["router"]:
        from hoshikage_sd.router.headstart import take

        early = take.take_early()
    args = helper_args(sys.argv[1:] if argv is None else argv) \
        or complete(parser()).parse_args(argv)
    return guarded(args.command, args.debug, lambda: run(args, early))


def complete(ap: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """`ap`, after bash completion's turn: the completion script
    (/usr/share/bash-completion/completions/hoshikage, register-python-argcomplete's) runs
    `hoshikage` with _ARGCOMPLETE set, and argcomplete prints the candidates and exits. Only
    then is argcomplete imported: the router and the unit helpers never pay for it."""
    import os

    if "_ARGCOMPLETE" in os.environ:
        try:
            import argcomplete
        except ImportError:  # python3-argcomplete is only recommended: no candidates
            return ap
        from hoshikage_sd.commands import completion

        completion.attach(ap)  # model names, aliases and tags where a model is asked for
        argcomplete.autocomplete(ap)
    return ap


#: the unit helpers' command lines as their units give them (positional arguments only)
HELPER_ARGV = {"release": ("name",), "idle-watch": (), "cache-sync": (), "journal-read": ()}


def helper_args(argv: list[str]) -> Any:
    """A unit helper's command line read without argparse, whose import alone is part of
    each release (beside the next model's load in a swap) and each idle watch
    (`-X importtime`, in the container): the attributes argparse would give; None for
    anything else (argparse reads it, with its errors and --help)."""
    if not argv or argv[0] not in HELPER_ARGV or any(a.startswith("-") for a in argv) \
            or len(argv) != 1 + len(HELPER_ARGV[argv[0]]):
        return None
    from types import SimpleNamespace

    fields = dict(zip(HELPER_ARGV[argv[0]], argv[1:], strict=True))
    return SimpleNamespace(command=argv[0], debug=False, config=None, **fields)


def guarded(command: str, debug: bool, body: Callable[[], int]) -> int:
    """Run a command: its errors as one clear sentence (the journal's, under systemd), a
    traceback only with --debug."""
    from hoshikage_sd import log
    from hoshikage_sd.errors import HoshikageError, report

    log.setup(f"hoshikage-{command}", debug)
    try:
        return body()
    except HoshikageError as err:
        if debug:
            raise
        if log.under_journal():
            log.log.error("%s", err)
            return err.code
        return report(err)
    except KeyboardInterrupt:
        return 130
    finally:
        log.release()  # nothing a command logged stays held back (log.hold)


if __name__ == "__main__":
    sys.exit(main())
