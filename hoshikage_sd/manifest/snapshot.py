"""The router's last good manifest, for the units it starts.

The router keeps serving with the last good manifest when an edit breaks models.yaml; the
programs it starts (the model unit's activator and release, the idle watch, the cache
service) each read the manifest again. Without this copy, an edit that breaks the file fails
every start that the running router has admitted. So the router saves the text of each
manifest it loads, and those programs fall back to that copy, with a warning, when the file
is broken.

The copy lives in the runtime directory every unit shares ($RUNTIME_DIRECTORY, set by
systemd from RuntimeDirectory=hoshikage; /run/hoshikage otherwise): a broken manifest cannot
say where its runtime_dir is, so the copy's place must not depend on it. It is gone at boot,
like the router that wrote it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path

from hoshikage_sd import protocol
from hoshikage_sd.errors import HoshikageError
from hoshikage_sd.files import write_atomic
from hoshikage_sd.manifest.model import Config, config_path

NAME = "manifest.yaml"
HEADER = "# hoshikage: the router's last good copy of "

logger = logging.getLogger("hoshikage")

#: what this process last wrote, per snapshot file: an unchanged manifest costs no I/O
_written: dict[Path, bytes] = {}


def default_dir() -> Path:
    return Path(protocol.runtime_dir(os.environ.get("RUNTIME_DIRECTORY")))


def snapshot_path(runtime_dir: Path | None = None) -> Path:
    return (runtime_dir or default_dir()) / NAME


def save(manifest: str | Path, runtime_dir: Path | None = None,
         source: Path | None = None) -> bool:
    """Keep `manifest` (the text that parsed, or the file) as the last good one.

    Call it with the text just parsed, so an edit made since cannot slip in; `source` is the
    file that text came from (default: a path given as `manifest`, else config_path()).
    Cheap: the same text again costs a comparison in memory, a new one a write of the
    file's size (temp + rename). Never raises: a copy that cannot be written is a warning,
    not a failed reload. True when the copy holds this text."""
    if isinstance(manifest, Path):
        source = source or manifest
        try:
            text = manifest.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            logger.warning("cannot keep a copy of %s: %s", manifest, exc)
            return False
    else:
        text = manifest
    source = source or config_path()
    data = f"{HEADER}{source}\n{text}".encode()
    path = snapshot_path(runtime_dir)
    if _written.get(path) == data:
        return True
    try:
        write_atomic(path, data, mode=0o640)
    except OSError as exc:
        logger.warning("cannot keep a copy of %s in %s: %s", source, path, exc.strerror)
        return False
    _written[path] = data
    return True


def load_and_save(path: Path | None = None, runtime_dir: Path | None = None) -> Config:
    """For the router: the manifest, parsed; when it is good, it is the new last good copy.
    Raises as manifest.load does (the copy stays as it was)."""
    from hoshikage_sd.manifest.parse import load, parse

    path = path or config_path()
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError):
        load(path)  # raises the error an operator knows for this file
        raise
    config = parse(text, path)
    save(text, runtime_dir, path)
    return config


def load_or_last_good(path: Path | None = None, runtime_dir: Path | None = None) -> Config:
    """For the programs the router starts: the manifest, or, when it is broken (or gone),
    the router's last good copy of it, with a warning that says what is wrong with the file.
    Raises the manifest's own error (with where no copy was found) when both fail."""
    from hoshikage_sd.manifest.parse import load, parse

    path = path or config_path()
    try:
        return load(path)
    except HoshikageError as err:
        broken = err
    copy = snapshot_path(runtime_dir)
    try:
        text = copy.read_text()
        saved = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(copy.stat().st_mtime))
    except (OSError, UnicodeDecodeError) as exc:
        reason = "there is none" if isinstance(exc, FileNotFoundError) else str(exc)
        raise HoshikageError(f"{broken.message}; the router's last good copy {copy}: {reason}",
                             hint=broken.hint, code=broken.code) from None
    first, _, body = text.partition("\n")
    if first != f"{HEADER}{path}":
        raise HoshikageError(f"{broken.message}; the copy {copy} is of another file "
                             f"({first.removeprefix(HEADER)})", hint=broken.hint,
                             code=broken.code)
    try:
        config = parse(body, path)
    except HoshikageError as err:  # written by another version, or by hand
        raise HoshikageError(f"{broken.message}; the router's last good copy {copy} does "
                             f"not parse either: {err.message}", hint=broken.hint,
                             code=broken.code) from None
    warning = (f"{broken.message}: using the router's last good copy of it ({copy}, "
               f"saved {saved})")
    logger.warning("%s", warning)
    return dataclasses.replace(config, warnings=(*config.warnings, warning))
