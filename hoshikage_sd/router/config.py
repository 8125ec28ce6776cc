"""The manifest as the router reads it, at start (before its HTTP front is imported: the
head start waits on this) and on every reload."""

from __future__ import annotations

from pathlib import Path

from hoshikage_sd.manifest import Config, names, snapshot


def load_config(source: Path) -> Config:
    """The manifest with the CLI's names over it; HoshikageError (file:line, what is wrong)
    when the manifest cannot be used. A good one becomes the last good copy that the units
    the router starts fall back to (manifest/snapshot.py). A names.json of the wrong shape
    is reported and what is usable of it applies (names.effective): it never stops the
    router."""
    return names.effective(snapshot.load_and_save(source))
