"""`hoshikage logs NAME [-f] [-n N] [--since WHEN] [-o FORMAT]`: one model's journal, by any
of its names.

What its unit wrote (the activator, llama-server's own lines, the release after it, and
PID 1's lines about the unit: what `journalctl -u UNIT` shows), or'ed with hoshikage's
records about the model from its other units (the router's admissions and start failures,
the idle watch's stops, the cache's copies: HOSHIKAGE_MODEL=NAME). journalctl has no way to
or `-u` with a field match (`journalctl -u UNIT + FIELD=V`: '"+" can only be used between
terms'; without the `+` the two are and'ed), so the unit's part is spelled out as the matches
`-u` makes itself (systemd's add_matches_for_unit). journalctl replaces this process: `-f`
follows until Ctrl-C, and its pager and colours are its own.
"""

from __future__ import annotations

import os
import sys

from hoshikage_sd.errors import die
from hoshikage_sd.manifest import Config
from hoshikage_sd.sd import units

JOURNALCTL = "journalctl"
#: systemd-coredump's records (journalctl -u shows the unit's core dumps too)
COREDUMP_MESSAGE_ID = "fc2e22bc6ee647b6b90729ab34a250b1"


def matches(name: str) -> list[str]:
    """journalctl's matches for one model (its canonical name): its unit, as `-u` matches a
    unit, or any record of hoshikage's about it."""
    unit = units.model_unit(name)
    return [f"_SYSTEMD_UNIT={unit}",
            "+", f"UNIT={unit}", "_PID=1",
            "+", f"COREDUMP_UNIT={unit}", f"MESSAGE_ID={COREDUMP_MESSAGE_ID}", "_UID=0",
            "+", f"OBJECT_SYSTEMD_UNIT={unit}", "_UID=0",
            "+", f"HOSHIKAGE_MODEL={name}"]


def logs_argv(name: str, follow: bool = False, lines: str | None = None,
              since: str | None = None, output: str | None = None) -> list[str]:
    """The journalctl command line (an argv: no shell reads it) for `hoshikage logs`."""
    argv = [JOURNALCTL]
    if follow:
        argv.append("--follow")
    if lines is not None:
        argv.append(f"--lines={lines}")
    if since is not None:
        argv.append(f"--since={since}")
    if output is not None:
        argv.append(f"--output={output}")
    return [*argv, *matches(name)]


def lines_value(text: str) -> str:
    """-n's argument as journalctl takes it: N, +N (the oldest N) or all."""
    digits = text[1:] if text.startswith("+") else text
    if text != "all" and not (digits.isascii() and digits.isdigit()):
        import argparse

        raise argparse.ArgumentTypeError(f"'{text}' is not a number of lines (N, +N or all)")
    return text


def logs(config: Config, name: str, follow: bool = False, lines: str | None = None,
         since: str | None = None, output: str | None = None) -> int:
    """Resolve NAME as `hoshikage load` does (aliases, tags, partial names) and become
    journalctl; returns only when journalctl cannot be started."""
    from hoshikage_sd.commands.manual import find

    argv = logs_argv(find(config, name).name, follow, lines, since, output)
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execvp(argv[0], argv)
    except OSError as err:
        die(f"cannot run {argv[0]}: {err.strerror}",
            hint="the model's unit logs to the journal: install systemd's journalctl")
