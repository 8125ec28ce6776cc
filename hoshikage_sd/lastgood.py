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
manifest cannot say where its own runtime_dir is. It is trusted only from this user, root or
the user the runtime directory is for (the units' user, whose router writes it): it decides
which program a unit runs. Reading takes os, lightjson and fileid only (the head
start's budget, tests/unit/test_launch.py); the rest is imported where used.
"""

from __future__ import annotations

import os

from hoshikage_sd import protocol
from hoshikage_sd.fileid import identity
from hoshikage_sd.lightjson import loads

TYPE_CHECKING = False  # typing would be on the head start when nothing loaded it
if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path
    from typing import Any

    from hoshikage_sd.manifest import Config

    Section = Callable[[Config], dict[str, Any]]

NAME = "manifest.json"
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
        owner = os.fstat(f.fileno()).st_uid
        if owner not in (os.geteuid(), 0) and owner != os.stat(os.path.dirname(path())).st_uid:
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


def _write(value: dict[str, Any]) -> bool:
    import json
    import logging
    from pathlib import Path

    from hoshikage_sd.files import write_atomic

    where = path()
    data = json.dumps(value, separators=(",", ":")).encode()
    if _on_disk.get(where) == data:
        return True
    try:
        write_atomic(Path(where), data, mode=0o640)
    except OSError as exc:
        logging.getLogger("hoshikage").warning("cannot keep the last good manifest in %s: %s",
                                               where, exc.strerror)
        return False
    _on_disk[where] = data
    return True
