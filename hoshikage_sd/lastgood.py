"""What the router keeps of its last good manifest: one file, $RUNTIME_DIRECTORY/manifest.json,
with one writer (save, and refresh for its head-start part) and one reader (read).

Each router that loads a good manifest writes it; the programs that start often read it
instead of the manifest:

- "config": that manifest as parsed, names.json over it (manifest/codec.py). The next
  router, the model units' helpers and the idle watch take it as their Config while every
  file it was made from is as it was (load): PyYAML's import and the node-by-node parser
  would sit on the first request's cold path and beside the next model's load in a swap
  (docs/performance.md, "Kept optimisations"). When an edit breaks models.yaml, the programs
  the running router starts take it whatever changed (load_or_last_good, with a warning), so
  a broken edit never fails a start the router admitted.
- "headstart": what the next router's head start needs to find the waking request's model
  and admit it before the router's imports (router/headstart/index.py builds it and reads it).
- "files": the identity of every file the parse looked at (inputs: the manifest, names.json,
  each sources: directory, each model's file), or null. A reader that finds each as it was
  takes the file as what a parse would give; any difference and it parses.

A file changed during the parse may show a time just before it began (the kernel stamps
files from its coarse clock, up to a tick behind), so "files" is null when any of them
changed less than RACY seconds before the parse began (as git treats a racily clean index):
then only the last good manifest is kept. An edit reaches the router's reload later than
that (hoshikage-reload.path, then `hoshikage reload`), so its parse is kept whole as a rule.

The file lives in the runtime directory every unit shares (protocol.runtime_dir): a broken
manifest cannot say where its own runtime_dir is. It is trusted only from this user or root:
it decides which program a unit runs. Beside it, front.index: the same head-start part (with
the file identities and the source) in the lines hoshikage-front reads (front_lines), written
with it, from the same value. Reading takes os, json and fileid only (the head
start's budget, tests/unit/test_launch.py); the rest is imported where used.
"""

from __future__ import annotations

import os
from json import loads

from hoshikage_sd import protocol
from hoshikage_sd.fileid import identity

TYPE_CHECKING = False  # typing would be on the head start when nothing loaded it
if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path
    from typing import Any

    from hoshikage_sd.manifest import Config

    Section = Callable[[Config], dict[str, Any]]

NAME = "manifest.json"
#: the head-start part as router/headstart/front.c reads it
FRONT = "front.index"
FRONT_MAGIC = b"hoshikage-front 1"
VERSION = 2
#: seconds: a file changed this close to the parse's start may have changed during it
RACY = 0.02

#: the file as this process last wrote or read it: the same value again costs no write, and
#: refresh() rewrites it with its files as they were
_on_disk: dict[str, bytes] = {}


def path() -> str:
    return os.path.join(protocol.runtime_dir(os.environ.get("RUNTIME_DIRECTORY")), NAME)


def manifest_path() -> str:
    """manifest.config_path() as a string, without importing the manifest code."""
    return os.environ.get("HOSHIKAGE_CONFIG") or protocol.DEFAULT_MANIFEST


def inputs(config: Config) -> list[str]:
    """The files a parse of config.source (names.json over it) looked at."""
    from hoshikage_sd.manifest import model_files

    return [str(config.source), str(config.state_dir / "names.json"),
            *(str(d) for d in config.scanned),
            *(str(p) for m in config.models.values() for p in model_files(m))]


# ---- reading ----------------------------------------------------------------------------

def _open() -> tuple[dict[str, Any], bytes]:
    """The file's value and bytes; OSError, or ValueError saying why it is not usable."""
    with open(path(), "rb") as f:
        if os.fstat(f.fileno()).st_uid not in (os.geteuid(), 0):
            raise ValueError("written by another user")
        data = f.read()
    value = loads(data)
    if not isinstance(value, dict) or value.get("version") != VERSION:
        raise ValueError("written by another version")
    return value, data


def current(files: object) -> bool:
    """Is every file in `files` (path: identity) as it was?"""
    return isinstance(files, dict) and bool(files) and all(
        identity(p) == known for p, known in files.items())


def read(source: str) -> dict[str, Any] | None:
    """The kept value for the manifest `source`, while every file it was made from is as it
    was; else None (the caller parses)."""
    try:
        value, data = _open()
        if value["source"] != source or not current(value["files"]):
            return None
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None
    _on_disk[path()] = data
    return value


def load(source: Path) -> Config | None:
    """The kept Config of `source`, while every file it was made from is as it was."""
    value = read(str(source))
    return None if value is None else _config(value)


def _config(value: dict[str, Any]) -> Config | None:
    from hoshikage_sd.manifest import Config, codec

    try:
        config: Config = codec.decode(Config, value["config"])
    except (ValueError, TypeError, KeyError, AttributeError):
        return None
    return config


def load_or_last_good(source: Path | None = None) -> Config:
    """For the programs the router starts: the kept Config while current, else the manifest
    parsed (names.json over it), or, when that is broken (or gone), the last good one kept,
    with a warning that says what is wrong with the file. Raises the manifest's own error
    (with why nothing kept could stand in) when both fail."""
    from hoshikage_sd.manifest import config_path

    source = source or config_path()
    config = load(source)
    if config is not None:
        return config
    import dataclasses
    import logging
    import time

    from hoshikage_sd.errors import HoshikageError
    from hoshikage_sd.manifest import load as parse  # PyYAML: only when the file must be read
    from hoshikage_sd.manifest import names

    try:
        return names.effective(parse(source))
    except HoshikageError as err:
        broken = err
    where = path()
    try:
        value, _ = _open()
        saved = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(os.stat(where).st_mtime))
        if value.get("source") != str(source):
            reason = f"it is of another manifest ({value.get('source')})"
        else:
            config = _config(value)
            reason = "it cannot be read (written by hand?)"
    except FileNotFoundError:
        reason = "there is none"
    except OSError as exc:
        reason = str(exc.strerror)
    except ValueError as exc:
        reason = str(exc)
    if config is None:
        raise HoshikageError(f"{broken.message}; the router's last good manifest {where}: "
                             f"{reason}", hint=broken.hint, code=broken.code) from None
    warning = (f"{broken.message}: using the router's last good copy of it ({where}, "
               f"saved {saved})")
    logging.getLogger("hoshikage").warning("%s", warning)
    return dataclasses.replace(config, warnings=(*config.warnings, warning))


# ---- writing ----------------------------------------------------------------------------

def save(config: Config, began: float, section: Section | None = None) -> bool:
    """Keep `config` (config.source parsed, names.json over it, in a parse that began at
    `began`, wall clock) as the last good manifest, with `section(config)` for the head
    start when none of its files changed within RACY seconds of the parse. A file that
    cannot be written is a warning, never a failed load (`section`'s own errors pass). True
    when the file holds it whole."""
    from hoshikage_sd.manifest import codec

    files = {p: identity(p) for p in inputs(config)}
    limit = int((began - RACY) * 1e9)
    settled = not any(i is not None and i[4] >= limit for i in files.values())
    value = {"version": VERSION, "source": str(config.source),
             "files": files if settled else None,
             "headstart": section(config) if settled and section else None,
             "config": codec.encode(config)}
    return _write(value) and settled


def refresh(config: Config, section: Section) -> None:
    """Write the head start's part again, for the same files while they are as they were: a
    model's estimate, remembered once it started, lets the next head start admit it
    (router/headstart/admit.py). Never raises: that part is a shortcut."""
    last = _on_disk.get(path())
    if last is None:
        return
    value = loads(last)
    if not current(value["files"]):
        return  # the router parses again soon: its save() writes the part then
    try:
        part = section(config)
    except Exception:  # the next router resolves after its imports: never worth a failure
        part = None
    _write({**value, "headstart": part})


def front_lines(value: dict[str, Any]) -> bytes | None:
    """The head-start part of `value` as hoshikage-front (router/headstart/front.c) reads it:
    one "KEY VALUE" line each (a model's lines after its "model" line; its ticket's fields
    after the expiry, as protocol.write_ticket joins them, as "ticket LENGTH", the bytes and a
    newline), and each name's and alias's str.lower(), which the front compares an ASCII
    name with. None when there is nothing to read (no current part) or a text holds a line
    end or a NUL: the front then hands every request over."""
    index, files = value.get("headstart"), value.get("files")
    if not isinstance(index, dict) or not files:
        return None
    enc = protocol._encode
    try:
        lines = [FRONT_MAGIC, b"manifest " + enc(value["source"])]
        for where, known in files.items():
            lines.append(b"file " + (b"- " if known is None
                                     else " ".join(map(str, known)).encode() + b" ") + enc(where))
        max_body = index.get("max_body")
        lines += [b"api_keys %d" % bool(index["api_keys"]),
                  b"max_body %d" % (max_body if isinstance(max_body, int) else -1),
                  b"default " + (index["default"] or "").encode(),
                  b"runtime " + enc(index["runtime"])]
        lines += [f"route {','.join(methods)} {route}".encode()
                  for route, methods in index["routes"].items()]
        lines += [b"prefix " + p.encode() for p in index["prefixes"]]
        lines += [b"named " + p.encode() for p in index["named"]]
        tickets = []
        for model, (own, aliases, tags) in zip(index["models"], index["names"], strict=True):
            lines.append(b"model %d " % bool(model["keyed"]) + own.encode())
            lines += [b"alias " + a.encode() for a in aliases]
            lines += [b"tag " + t.encode() for t in tags]
            lines += [b"lower " + n.lower().encode() for n in (own, *aliases)]
            launch = model.get("launch")
            if launch and type(launch.get("needed")) is int:
                lines.append(b"launch %d %d %d %d" % (launch["estimate"], launch["needed"],
                                                      *launch["file"]))
                lines += [b"source " + enc(launch["source"]), b"staged " + enc(launch["staged"])]
                ticket = b"\0".join([enc(model["socket"]), model["health"].encode(),
                                     *(enc(f"{k}={v}") for k, v in launch["env"].items()), b"",
                                     *map(enc, launch["argv"])])
                tickets.append(ticket)
                lines.append(b"ticket %d" % len(ticket))
        if any(b"\n" in line or b"\0" in line for line in lines):
            return None
    except (UnicodeError, KeyError, TypeError, ValueError):
        return None
    # each ticket's bytes follow its "ticket" line
    out, at = [], 0
    for line in lines:
        out.append(line + b"\n")
        if line.startswith(b"ticket "):
            out.append(tickets[at] + b"\n")
            at += 1
    return b"".join(out) + b"end\n"


def _write(value: dict[str, Any]) -> bool:
    import json
    import logging
    from pathlib import Path

    from hoshikage_sd.files import write_atomic

    where = path()
    data = json.dumps(value, separators=(",", ":")).encode()
    if _on_disk.get(where) == data:
        return True
    front = front_lines(value)
    try:
        write_atomic(Path(where), data, mode=0o640)
        if front is not None:
            write_atomic(Path(where).with_name(FRONT), front, mode=0o640)
        else:
            Path(where).with_name(FRONT).unlink(missing_ok=True)
    except OSError as exc:
        logging.getLogger("hoshikage").warning("cannot keep the last good manifest in %s: %s",
                                               where, exc.strerror)
        return False
    _on_disk[where] = data
    return True
