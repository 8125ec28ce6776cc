"""The manifest as the router reads it, at start (before its HTTP front is imported) and on
every reload."""

from __future__ import annotations

import time
from pathlib import Path

from hoshikage_sd.fileid import identity
from hoshikage_sd.manifest import Config, compiled, names, snapshot
from hoshikage_sd.router.headstart import index as name_index


def load_config(source: Path) -> Config:
    """The manifest with the CLI's names over it; HoshikageError (file:line, what is wrong)
    when the manifest cannot be used. A good one becomes the last good copy that the units
    the router starts fall back to (manifest/snapshot.py), the kept parse that they and the
    next router read instead of parsing (manifest/compiled.py), and the index of its names
    that the next router's head start resolves the waking request with (headstart/index.py). A
    names.json of the wrong shape is reported and what is usable of it applies
    (names.effective): it never stops the router."""
    kept = compiled.load(source, snapshot.default_dir())
    if kept is not None and name_index.adopt():
        return kept  # all three are as a parse of these same files would leave them
    began = time.time()
    before = identity(str(source))
    parsed = snapshot.load_and_save(source)
    names_file = str(names.path(parsed))
    names_before = identity(names_file)
    config = names.effective(parsed)
    # Identities taken before the reads and found the same after: the index describes
    # exactly these files (an edit in between leaves no index rather than a wrong one).
    files = {str(source): before, names_file: names_before}
    if before is not None and all(identity(p) == i for p, i in files.items()):
        name_index.write(config, files)
    else:
        name_index.remove()
    compiled.save(config, snapshot.default_dir(), began)
    return config
