"""hoshikage's journal records for the panel: its lifecycle events (log.MESSAGE_IDS:
admissions with their numbers, evictions, releases, refusals), newest first, and one model's
unit lines (llama-server's own) as `hoshikage logs NAME` shows them.

The router does not read the journal itself (it would need the group systemd-journal, and
with it every record on the machine). It asks hoshikage-journal.socket, one line a
connection ("events LINES [MODEL]" or "unit LINES MODEL"); each connection starts
hoshikage-journal@.service (Accept=yes), the one unit in that group, which runs `hoshikage
journal-read` (serve): the line checked, then journalctl in JSON with this module's matches
and nothing else, its output the connection. So a router taken over could read only
hoshikage's own records.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from hoshikage_sd import log

TIMEOUT = 5.0
#: in the runtime directory: hoshikage-journal.socket's (units/hoshikage-journal.socket);
#: a model's socket there is NAME.sock, and a name begins with a letter or a digit
SOCKET = ".journal.sock"
#: the longest request line the reader takes
MAX_REQUEST = 256
#: the most lines a request may ask (the panel's guard.lines allows fewer)
MAX_LINES = 1000
#: the reader's last line when journalctl failed: why, in a field no record can have (the
#: journal keeps names beginning with "_" for its own)
PROBLEM = "__HOSHIKAGE_PROBLEM"


@dataclass(frozen=True)
class Record:
    time: float           # Unix time
    message: str
    event: str | None     # HOSHIKAGE_EVENT (None: a unit's own line)
    model: str | None     # HOSHIKAGE_MODEL
    priority: int         # syslog's: 3 error, 4 warning, 6 info
    unit: str | None


def text_of(value: object) -> str:
    """A journal field as JSON output gives it: a string, or an array of bytes where it is
    not UTF-8 text."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(b, int) for b in value):
        return bytes(b & 0xFF for b in value).decode("utf-8", errors="replace")
    return "" if value is None else str(value)


def parse(output: str) -> tuple[list[Record], str | None]:
    """journalctl -o json's lines, as records (a line it cannot read is skipped), and the
    reader's problem line, if any."""
    records, problem = [], None
    for line in output.splitlines():
        try:
            entry = json.loads(line)
            stamp = int(entry.get("__REALTIME_TIMESTAMP", "0")) / 1e6
        except (ValueError, TypeError, AttributeError):
            continue
        if not isinstance(entry, dict):
            continue
        if PROBLEM in entry:
            problem = text_of(entry[PROBLEM])
            continue
        priority = text_of(entry.get("PRIORITY"))
        records.append(Record(
            stamp, text_of(entry.get("MESSAGE")),
            text_of(entry.get("HOSHIKAGE_EVENT")) or None,
            text_of(entry.get("HOSHIKAGE_MODEL")) or None,
            int(priority) if priority.isdigit() else 6,
            text_of(entry.get("_SYSTEMD_UNIT")) or None))
    return records, problem


def events_argv(model: str | None, lines: int) -> list[str]:
    """hoshikage's event records (any kind), newest first; one model's with `model`."""
    matches = [f"MESSAGE_ID={mid}" for mid in log.MESSAGE_IDS.values()]
    if model is not None:
        matches.append(f"HOSHIKAGE_MODEL={model}")
    return ["journalctl", "--output=json", f"--lines={lines}", "--reverse", "--quiet",
            "--no-pager", *matches]


def unit_argv(model: str, lines: int) -> list[str]:
    """The model's unit lines and records, as `hoshikage logs MODEL` (newest first)."""
    from hoshikage_sd.commands import logs

    return ["journalctl", "--output=json", f"--lines={lines}", "--reverse", "--quiet",
            "--no-pager", *logs.matches(model)]


def request_line(kind: str, model: str | None, lines: int) -> bytes:
    """What the router sends the reader: events (every model's, or one's) or a model's unit
    lines, the newest `lines` of them."""
    return f"{kind} {lines}{'' if model is None else ' ' + model}\n".encode()


def argv_for(line: str) -> list[str] | None:
    """The reader's journalctl command line for a request line, or None for anything that
    is not a request: a kind, a number of lines and a model name as the manifest's rule
    allows (so no match of the caller's making reaches journalctl)."""
    from hoshikage_sd import protocol  # the name rule without the manifest's imports

    words = line.split()
    if len(words) not in (2, 3) or words[0] not in ("events", "unit"):
        return None
    count, model = words[1], words[2] if len(words) == 3 else None
    if not count.isascii() or not count.isdigit() or not 1 <= int(count) <= MAX_LINES:
        return None
    if model is not None and not protocol.valid_name(model):
        return None
    if words[0] == "unit":
        return None if model is None else unit_argv(model, int(count))
    return events_argv(model, int(count))


def serve() -> int:
    """`hoshikage journal-read`, hoshikage-journal@.service's program: its connection is
    stdin and stdout. One request line, checked; then journalctl, its records to the router,
    and, when it fails (a journal this unit may not read: no records, and journalctl exits
    1), a last line saying why, for the panel. Exit 2 for a bad line."""
    data = b""
    while b"\n" not in data and len(data) <= MAX_REQUEST:
        chunk = os.read(0, MAX_REQUEST)
        if not chunk:
            break
        data += chunk
    argv = argv_for(data.partition(b"\n")[0].decode("ascii", errors="replace"))
    if argv is None or len(data) > MAX_REQUEST:
        log.log.error("journal-read: not a request: %r", data[:80])
        return 2
    from hoshikage_sd import proc

    result = proc.run(argv, check=False)
    out = result.stdout.encode()
    if result.returncode != 0:
        said = " ".join(result.stderr.split()) or f"exit status {result.returncode}"
        log.log.error("journal-read: journalctl failed: %s", said)
        out += json.dumps({PROBLEM: f"hoshikage-journal@.service cannot read the journal: "
                                    f"{said}"}).encode() + b"\n"
    while out:
        out = out[os.write(1, out):]
    return 0


def read(runtime_dir: Path, kind: str, model: str | None, lines: int
         ) -> tuple[list[Record], str | None]:
    """The records the reader sends, and what kept them from coming (None: nothing)."""
    deadline = time.monotonic() + TIMEOUT
    chunks = []
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(TIMEOUT)
            conn.connect(str(runtime_dir / SOCKET))
            conn.sendall(request_line(kind, model, lines))
            conn.shutdown(socket.SHUT_WR)
            while chunk := conn.recv(65536):
                chunks.append(chunk)
                conn.settimeout(max(0.01, deadline - time.monotonic()))
    except OSError as exc:
        return [], (f"cannot read the journal through {runtime_dir / SOCKET} "
                    f"(hoshikage-journal.socket): {exc.strerror or exc}")
    return parse(b"".join(chunks).decode("utf-8", errors="replace"))


#: how many of a model unit's newest journal lines are looked through for llama-server's
#: own words on a failed load
SAID_LINES = 60


def errors_said(runtime_dir: Path, model: str, since: float) -> str | None:
    """What llama-server said of an error in the model's unit since `since` (Unix time):
    its last error lines, newest last ("error: invalid argument: --no-such-flag"), or None.
    For a failed load's answer, which else says only that it exited."""
    from hoshikage_sd.sd import units

    found, _ = read(runtime_dir, "unit", model, SAID_LINES)
    unit = units.model_unit(model)
    lines = [r.message.strip() for r in found
             if r.unit == unit and r.event is None and r.time >= since
             and "error" in r.message.lower()]
    said = list(dict.fromkeys(reversed(lines[:2])))  # records come newest first
    return "; ".join(said)[:400] or None
