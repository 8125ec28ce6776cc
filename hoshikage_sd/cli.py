# PYTHON_ARGCOMPLETE_OK (argcomplete's marker: this CLI answers bash completion, complete())
"""The `hoshikage` command: unit helpers (activate, release, idle-watch, router) and the
commands people type (status, check, logs), each in commands/verbs.py (its arguments, what
it runs on, what runs it); here the parser, the manifest each gets, completion and errors.
Imports are per command: helpers sit on the cold-start path, so `activate` never pays for
the router's HTTP front, and `hoshikage router` starts the waking request's model before it
imports even argparse (router/headstart)."""

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
    """The command line: the global options, and each of commands/verbs.py's COMMANDS with
    its arguments."""
    import argparse

    from hoshikage_sd.commands.verbs import COMMANDS

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
    for name, command in COMMANDS.items():
        p = sub.add_parser(name, help=command.help)
        if command.arguments is not None:
            command.arguments(p)
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


def run(args: argparse.Namespace, early: FirstRequest | None = None) -> int:
    """The command through COMMANDS, on what it needs: nothing, the manifest's path, or
    the manifest (a unit helper's: or the router's last good copy of it)."""
    from pathlib import Path

    from hoshikage_sd.commands import verbs

    command = verbs.COMMANDS[args.command]
    if command.needs == verbs.NOTHING:
        return command.run(args)
    path = Path(args.config) if args.config else None
    if command.needs == verbs.PATH:
        return command.run(args, path, early)
    if command.needs == verbs.HELPER:
        config = unit_helper_config(args, path)
        return 0 if config is None else command.run(args, config)
    from hoshikage_sd.lastgood import load_or_last_good

    # a broken edit: the router serves its last good manifest, and so these commands see
    # what runs (with a warning saying what is wrong), rather than refuse to look
    return command.run(args, load_or_last_good(path))


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
        if args.command in ("idle-watch", "cache-sync", "keep"):
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
        from hoshikage_sd.runtime import Runtime

        if protocol.valid_name(args.name):  # the router reads this as the reason of the failure
            shared = protocol.runtime_dir(os.environ.get("RUNTIME_DIRECTORY"))
            Runtime(Path(shared)).set_error(args.name, err.message)
        raise


#: what the router imports before READY=1 (take.import_beside_load)
ROUTER_MODULES = ("hoshikage_sd.commands.verbs", "hoshikage_sd.router.config",
                  "hoshikage_sd.router.server", "uvloop")


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
    take.import_beside_load(early, ROUTER_MODULES)
    from hoshikage_sd.commands.verbs import router

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
HELPER_ARGV = {"release": ("name",), "keep": ("name",), "idle-watch": (), "cache-sync": (),
               "journal-read": ()}


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
        try:
            return body()
        except PermissionError as exc:  # a command run as a user without the right
            if debug:
                raise
            import re

            # files.write_atomic's temporary name (.NAME.tmp-PID) as the file it stands for
            name = re.sub(r"/\.([^/]+)\.tmp-\d+$", r"/\1", str(exc.filename or "a file"))
            raise HoshikageError(
                f"{command}: {name}: {exc.strerror or exc}",
                hint="run it as root (sudo hoshikage ...), or as a member of group "
                     "hoshikage where the files allow it") from None
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
