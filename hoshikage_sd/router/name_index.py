"""The router's compact index of the manifest's names, for the head start of the next router.

From zero processes, what the request waits for before its model's unit starts is the
router's start: the interpreter, then the CLI, then the manifest (PyYAML and the model
checks) and only then the name resolution. So each router that loads a good manifest also
writes what resolving a name takes (names, aliases, tags, the default model, strict_names,
each model's socket, health route and unit) into the runtime directory, with the identity
(stat) of the manifest and names.json it was made from. The next router's head start
(first_request.take_early) reads it with built-in modules only, checks those identities,
and starts the unit before it imports argparse, PyYAML or the manifest code.

Any doubt (no index, another manifest path, a file changed since, another version, a name
with several partial matches, whose winner is the usage ranks' to pick) means no answer:
the router then resolves the request the usual way, after its imports.

Reading: os and jsonload only (the head start's budget). Writing: the router, lazily importing
what it needs.
"""

from __future__ import annotations

import os

from hoshikage_sd import protocol
from hoshikage_sd.fileid import identity
from hoshikage_sd.router.jsonload import loads

TYPE_CHECKING = False  # typing would be on the head start when nothing loaded it
if TYPE_CHECKING:
    from typing import Any

    from hoshikage_sd.manifest import Config, Model

NAME = "names.index.json"
VERSION = 4
#: manifest/model.py's DEFAULT_PATH (a unit test keeps them equal: model imports dataclasses)
DEFAULT_MANIFEST = "/etc/hoshikage/models.yaml"

#: what this process last wrote, per index file: an unchanged manifest costs no I/O
_written: dict[str, bytes] = {}


def runtime_dir() -> str:
    """Where the index lives: the runtime directory every unit shares (like the manifest's
    last good copy, manifest/snapshot.py: a manifest must be parsed to say its own)."""
    return protocol.runtime_dir(os.environ.get("RUNTIME_DIRECTORY"))


def index_path(runtime: str | None = None) -> str:
    return os.path.join(runtime or runtime_dir(), NAME)


def manifest_path() -> str:
    """manifest.config_path() as a string, without importing the manifest code."""
    return os.environ.get("HOSHIKAGE_CONFIG") or DEFAULT_MANIFEST


def build(config: Config, identities: dict[str, list[int] | None]) -> dict[str, Any]:
    """The index of `config` (the manifest with names.json over it), with what the head
    start's admission (early_admission) needs."""
    from hoshikage_sd import encryption, proc
    from hoshikage_sd.manifest import Files
    from hoshikage_sd.policy import residents
    from hoshikage_sd.runtime import Runtime
    from hoshikage_sd.sd.units import model_unit
    from hoshikage_sd.staging import Store

    runtime, store = Runtime(config.runtime_dir), Store(config.ramdisk)

    def launch(m: Model) -> dict[str, Any] | None:
        """The model's ticket, when it starts from its source: not with an SSD cache (the
        cache's copy may be the one to read), not before an estimate was remembered, not
        for an encrypted model (its unit decrypts it into the RAM disk first)."""
        files = Files.of(m)
        if any(map(encryption.named_or_encrypted, files.paths)):
            return None
        known = runtime.remembered_estimate(m) if config.cache is None else None
        on_devices = residents.device_use(config, m, runtime, listing=False)
        if known is None or on_devices is None or any(
                b * config.safety_margin > on_devices[1].get(d, 0)
                for d, b in on_devices[0].items()):
            return None  # the router's, or its unit's, to judge
        st, estimate = known
        return {"argv": config.server_argv(m, files), "env": proc.minimal_env(m.environment),
                "source": str(m.path),
                "file": [st.st_size, st.st_mtime_ns], "estimate": estimate,
                "staged": str(store.staged_files(m.name, files).main)}

    default = config.default()
    return {
        "version": VERSION,
        "source": str(config.source),
        "files": identities,
        "default": default.name if default else None,
        "strict_names": config.strict_names,
        # with API keys, the key is checked before a start: no head start (router/auth.py)
        "api_keys": config.api_keys is not None,
        # a body over it gets a 413 from the router: the head start must not start for it
        "max_body": config.max_body,
        "runtime": str(config.runtime_dir),
        "admission": {"margin": config.safety_margin, "budget": config.memory_budget,
                      "max_loaded": config.max_loaded_models},
        "models": [{"name": m.name, "aliases": list(m.aliases), "tags": list(m.tags),
                    "socket": str(config.socket_path(m.name)), "health": m.health,
                    "unit": model_unit(m.name), "launch": launch(m),
                    # its own llama-server key: checked by the router before a start
                    "keyed": m.own_key or bool(os.environ.get("LLAMA_API_KEY"))}
                   for m in config.models.values()],
    }


def write(config: Config, identities: dict[str, list[int] | None],
          runtime: str | None = None) -> bool:
    """Keep the index of `config`, made from the files whose identities were taken before
    they were read and found the same after. Never raises: without an index the next router
    only starts the unit later. True when the index holds this config."""
    import json
    from pathlib import Path

    from hoshikage_sd.files import write_atomic

    path = index_path(runtime)
    data = json.dumps(build(config, identities), separators=(",", ":")).encode()
    if _written.get(path) == data:
        return True
    try:
        write_atomic(Path(path), data, mode=0o640)
    except OSError:
        return False
    _written[path] = data
    return True


def refresh(config: Config, runtime: str | None = None) -> None:
    """Write the index of `config` again, made from the same files (when they are still as
    they were): a model's estimate, remembered once it started, lets the next head start
    admit it (early_admission). Never raises, as write()."""
    path = index_path(runtime)
    last = _written.get(path)
    if last is None:
        return
    files = loads(last)["files"]
    if all(identity(p) == known for p, known in files.items()):
        try:
            write(config, files, runtime)
        except Exception:  # an index is a head start's shortcut, never worth a failure
            remove(runtime)


def adopt(runtime: str | None = None) -> bool:
    """Take the index on disk as this process's own write (refresh() rewrites it), when it
    is current; False when it is not (the caller writes one)."""
    path = index_path(runtime)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return False
    if current(data) is None:
        return False
    _written[path] = data
    return True


def remove(runtime: str | None = None) -> None:
    """No index (the files changed while read): the next router resolves after its imports."""
    import contextlib

    path = index_path(runtime)
    _written.pop(path, None)
    with contextlib.suppress(OSError):
        os.unlink(path)


def read(runtime: str | None = None) -> dict[str, Any] | None:
    """The index, when it is current for this manifest and names.json; else None."""
    try:
        with open(index_path(runtime), "rb") as f:
            return current(f.read())
    except OSError:
        return None


def current(data: bytes) -> dict[str, Any] | None:
    """The index in `data`, when it is current for this manifest and names.json."""
    try:
        index = loads(data)
        if index.get("version") != VERSION or index.get("source") != manifest_path():
            return None
        files = index["files"]
        if not isinstance(files, dict) or not files:
            return None
        for path, known in files.items():
            if identity(path) != known:
                return None
        return index if isinstance(index.get("models"), list) else None
    except (ValueError, TypeError, KeyError, AttributeError):
        return None


class Ambiguous(Exception):
    """Several partial matches: strict_names refuses the name, and otherwise the winner is
    the usage ranks' to pick (resolve.py), which the head start leaves to the router."""


def lookup(index: dict[str, Any], name: str | None) -> dict[str, Any] | None:
    """The model `name` means, by resolve.resolve's rules (manifest.Config.matches), or
    None when none matches; Ambiguous when several partial matches do."""
    models: list[dict[str, Any]] = index["models"]
    if not name:
        default = index.get("default")
        return next((m for m in models if m["name"] == default), None) if default else None
    for model in models:
        if model["name"] == name:
            return model
    for key in ("aliases", "tags"):
        for model in models:
            if name in model[key]:
                return model
    needle = name.lower()
    found = [m for m in models if any(needle in n.lower() for n in (m["name"], *m["aliases"]))]
    if len(found) > 1:
        raise Ambiguous(name)
    return found[0] if found else None
