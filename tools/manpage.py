#!/usr/bin/env python3
"""hoshikage(1), written from the CLI's own argparse parser (hoshikage_sd/cli.py parser()).

    PYTHONPATH=. python3 tools/manpage.py > hoshikage.1

The package build runs it (packaging/debian/rules), so the page always says what the
command in the same package takes: every command, its arguments and their help, as --help
shows them. The rest (what hoshikage is, files, environment) is the page's own text below.
Debian's argparse-manpage (1.2 in bookworm) has no sections of a page's own, hence this.
The date is SOURCE_DATE_EPOCH's when set (dpkg-buildpackage sets it from the changelog):
the same source makes the same page.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Iterator

#: the manual's section and the footer's middle
SECTION = "1"
MANUAL = "hoshikage manual"
#: a command whose help starts so is run by the units, not by people: its own section
HELPER_MARK = "(unit helper)"
DESCRIPTION = """\
hoshikage serves local LLMs the systemd way. hoshikage.socket listens on 127.0.0.1:8080 with
no process behind it; the first request for a model starts the router (hoshikage.service),
which starts the model's unit (hoshikage-model@NAME.service): it stages the GGUF file into
the RAM disk and runs llama-server on it. Models idle past their TTL are stopped, and the
router exits once nothing is loaded.

This command is how an administrator looks at it and acts on it: what is loaded, what the
manifest says, loading and unloading by hand, a model's journal. Every command takes -h or
--help."""
FILES = (
    ("/etc/hoshikage/models.yaml", "the manifest: models, the RAM disk, limits (a conffile)"),
    ("/etc/default/hoshikage", "environment for every unit (optional)"),
    ("/var/lib/hoshikage", "state: names.json (aliases, tags, pins), usage statistics"),
    ("/run/hoshikage", "runtime state: the models' sockets, the router's datagram socket"),
    ("/mnt/hoshikage", "the RAM disk (mnt-hoshikage.mount), the staged model copies"),
    ("/usr/libexec/hoshikage", "the units' helpers: hoshikage-router, hoshikage-launch"),
)
ENVIRONMENT = (
    ("HOSHIKAGE_CONFIG", "the manifest when --config is not given"),
    ("NO_COLOR", "set (to anything): no colour, even on a terminal"),
)
SEE_ALSO = ("systemctl(1)", "journalctl(1)", "systemd.unit(5)", "systemd.exec(5)")


def escape(text: str) -> str:
    """`text` as roff prose: backslashes, a leading dot or quote, and non-ASCII characters
    (as \\[uXXXX], whatever the reader's locale) cannot mean anything to troff."""
    out = []
    for line in text.replace("\\", "\\e").splitlines():
        if line.startswith((".", "'")):
            line = "\\&" + line
        out.append("".join(c if ord(c) < 128 else f"\\[u{ord(c):04X}]" for c in line))
    return "\n".join(out)


def option(text: str) -> str:
    """An option or usage as roff: its hyphens are minus signs (what one types)."""
    return escape(text).replace("-", "\\-")


def formatter(parser: argparse.ArgumentParser) -> argparse.HelpFormatter:
    """argparse's formatter for `parser`, wide enough that nothing wraps (man does)."""
    return argparse.HelpFormatter(parser.prog, max_help_position=100_000, width=100_000)


def shared(action: argparse.Action, common: frozenset[str]) -> bool:
    """Whether `action` is -h or one of hoshikage's own options repeated on a subcommand:
    the page lists those once, under OPTIONS."""
    return isinstance(action, argparse._HelpAction) or bool(
        common.intersection(action.option_strings))


def usage(parser: argparse.ArgumentParser, common: frozenset[str] = frozenset()) -> str:
    """`parser`'s usage line as --help shows it, less -h and the `common` options."""
    shown = [a for a in parser._actions if not shared(a, common)]
    f = formatter(parser)
    f.add_usage(parser.usage, shown, parser._mutually_exclusive_groups, prefix="")
    return " ".join(f.format_help().split())


def arguments(parser: argparse.ArgumentParser,
              common: frozenset[str] = frozenset()) -> Iterator[tuple[str, str]]:
    """(how it is written, its help) for each argument of `parser` that --help lists, less
    -h, the `common` options and the subcommands (those have their own part)."""
    f = formatter(parser)
    for action in parser._actions:
        if action.help == argparse.SUPPRESS or shared(action, common) or isinstance(
                action, argparse._SubParsersAction):
            continue
        yield f._format_action_invocation(action), f._expand_help(action) if action.help else ""


def subcommands(parser: argparse.ArgumentParser) -> Iterator[tuple[str, str,
                                                                  argparse.ArgumentParser]]:
    """(name, help, parser) of each subcommand of `parser`, in the order --help lists them."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:
                if choice.help != argparse.SUPPRESS:
                    yield choice.dest, choice.help or "", action.choices[choice.dest]


def command(name: str, help_text: str, parser: argparse.ArgumentParser,
            common: frozenset[str]) -> Iterator[str]:
    """One command's part of the page: its usage as the heading, its help, its arguments;
    then its own subcommands, each the same way."""
    heading = option(usage(parser, common)).replace('"', "\\(dq")  # a macro's quoted argument
    yield f'.SS "{heading}"'
    if help_text:
        text = help_text.removeprefix(HELPER_MARK).strip()
        yield escape(text[:1].upper() + text[1:] + ("" if text.endswith(".") else "."))
    yield from argument_list(parser, common)
    for sub, sub_help, sub_parser in subcommands(parser):
        yield from command(f"{name} {sub}", sub_help, sub_parser, common)


def argument_list(parser: argparse.ArgumentParser,
                  common: frozenset[str] = frozenset()) -> Iterator[str]:
    for written, help_text in arguments(parser, common):
        if help_text:  # one without help is in the usage above, with nothing to add
            yield ".TP"
            yield f"\\fB{option(written)}\\fR"
            yield escape(help_text)


def page(parser: argparse.ArgumentParser, version: str, date: str) -> str:
    """The whole manual page of `parser`'s program, in roff (man macros)."""
    name = parser.prog
    commands = list(subcommands(parser))
    people = [c for c in commands if not c[1].startswith(HELPER_MARK)]
    helpers = [c for c in commands if c[1].startswith(HELPER_MARK)]
    common = frozenset(s for a in parser._actions for s in a.option_strings)
    lines = [
        f'.TH {name.upper()} {SECTION} "{date}" "{escape(name)} {escape(version)}" '
        f'"{escape(MANUAL)}"',
        ".SH NAME",
        f"{escape(name)} \\- {escape(parser.description or '')}",
        ".SH SYNOPSIS",
        f"\\fB{escape(name)}\\fR [\\fIOPTIONS\\fR] \\fICOMMAND\\fR [\\fIARGUMENTS\\fR]",
        ".SH DESCRIPTION",
    ]
    lines += [".PP" if not p.strip() else escape(p) for p in DESCRIPTION.splitlines()]
    lines += [".SH OPTIONS", "Options of hoshikage itself, for every command."]
    lines += [".TP", "\\fB\\-h\\fR, \\fB\\-\\-help\\fR", "Show the command's help and exit."]
    lines += list(argument_list(parser))
    lines += [".SH COMMANDS"]
    for sub, sub_help, sub_parser in people:
        lines += command(f"{name} {sub}", sub_help, sub_parser, common)
    if helpers:
        lines += [".SH UNIT HELPERS", "Run by hoshikage's units, not typed by people; here "
                  "for completeness."]
        for sub, sub_help, sub_parser in helpers:
            lines += command(f"{name} {sub}", sub_help, sub_parser, common)
    lines += [".SH EXIT STATUS", "0 when the command did what it was asked; otherwise "
              "non-zero, with the reason on standard error: 1 a failure (check: any problem), "
              "2 a manifest that does not parse, 3 a load refused as too soon "
              "(min_reload_seconds)."]
    lines += [".SH FILES"]
    for path, what in FILES:
        lines += [".TP", f"\\fI{escape(path)}\\fR", escape(what)]
    lines += [".SH ENVIRONMENT"]
    for variable, what in ENVIRONMENT:
        lines += [".TP", f"\\fB{escape(variable)}\\fR", escape(what)]
    lines += [".SH SEE ALSO", ", ".join(
        f"\\fB{escape(ref.partition('(')[0])}\\fR({ref.partition('(')[2]}" for ref in SEE_ALSO)
        + "; README.md in /usr/share/doc/hoshikage"]
    return "\n".join(lines) + "\n"


def build_date() -> str:
    """The page's date: SOURCE_DATE_EPOCH's (reproducible builds), else today, in UTC."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    return time.strftime("%Y-%m-%d", time.gmtime(int(epoch) if epoch else None))


def main() -> int:
    from hoshikage_sd import __version__
    from hoshikage_sd.cli import parser

    sys.stdout.write(page(parser(), __version__, build_date()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
