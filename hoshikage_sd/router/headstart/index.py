"""The name index: what the next router's head start needs of the manifest, kept by this one.

From zero processes, what the request waits for before its model's unit starts is the
router's start: the interpreter, then the CLI, then the manifest (PyYAML and the model
checks) and only then the name resolution. So each router that loads a good manifest also
writes what resolving a name takes into the runtime directory, with the identity (stat) of
the manifest and names.json it was made from: the manifest's own name table
(Config.name_table, which naming.matches reads for the manifest and here alike), the
default model, each model's socket, health route and unit, and for a model that can start
from its source the ticket and the least MemAvailable at which the policy admits it with
nothing else up (admit.py). The next router's head start reads it with built-in modules
only, checks those identities, and starts the unit before it imports argparse, PyYAML or
the manifest code.

Any doubt (no index, another manifest path, a file changed since, another version, a name
with several partial matches, whose winner is the usage ranks' to pick) means no answer:
the router then resolves the request the usual way, after its imports.

Reading: os, json and naming only (the head start's budget). Writing: the router, lazily
importing what it needs.
"""

from __future__ import annotations

import os
from json import loads

from hoshikage_sd import naming, protocol
from hoshikage_sd.fileid import identity

TYPE_CHECKING = False  # typing would be on the head start when nothing loaded it
if TYPE_CHECKING:
    from typing import Any

    from hoshikage_sd.manifest import Config, Model

NAME = "names.index.json"
VERSION = 5
#: MemAvailable beyond any model, for the policy's answer on everything but MemAvailable
UNBOUNDED = 1 << 62

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
    return os.environ.get("HOSHIKAGE_CONFIG") or protocol.DEFAULT_MANIFEST


def build(config: Config, identities: dict[str, list[int] | None]) -> dict[str, Any]:
    """The index of `config` (the manifest with names.json over it), with what the head
    start's admission (admit.py) needs."""
    from hoshikage_sd import encryption, proc
    from hoshikage_sd.admit import gather, needs
    from hoshikage_sd.manifest import Files
    from hoshikage_sd.policy import admission
    from hoshikage_sd.runtime import Runtime
    from hoshikage_sd.sd.units import model_unit
    from hoshikage_sd.staging import Store

    runtime, store = Runtime(config.runtime_dir), Store(config.ramdisk)

    def launch(m: Model) -> dict[str, Any] | None:
        """The model's ticket, when it starts from its source: not with an SSD cache (the
        cache's copy may be the one to read), not before an estimate was remembered, not
        for an encrypted model (its unit decrypts it into the RAM disk first), not when
        the policy would not load it with nothing else up (its GPU devices, the count,
        the budget). With it the least MemAvailable at which the policy loads it then."""
        files = Files.of(m)
        if any(map(encryption.named_or_encrypted, files.paths)):
            return None
        known = runtime.remembered_estimate(m) if config.cache is None else None
        on_devices = needs.device_use(config, m, runtime, listing=False)
        if known is None or on_devices is None:
            return None  # the router's, or its unit's, to judge
        st, estimate = known
        # nothing up, MemAvailable unbounded: what is left to decide is MemAvailable itself
        decision = admission.decide(
            admission.Snapshot(mem_available=UNBOUNDED, devices=on_devices[1],
                               limits=gather.limits(config)),
            admission.Request(m.name, estimate, on_devices[0], frozenset(m.rpc)))
        if decision.verdict is not admission.Verdict.LOAD:
            return None
        return {"argv": config.server_argv(m, files), "env": proc.minimal_env(m.environment),
                "source": str(m.path),
                "file": [st.st_size, st.st_mtime_ns], "estimate": estimate,
                "needed": decision.needed, "staged": str(store.staged_files(m.name, files).main)}

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
        "names": config.name_table(),  # models[i]'s names, as naming.matches reads them
        "models": [{"name": m.name, "socket": str(config.socket_path(m.name)), "health": m.health,
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
    admit it (admit.py). Never raises, as write()."""
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
    """The model `name` means, by resolve.resolve's rules (naming.matches over the
    manifest's name table), or None when none matches; Ambiguous when several partial
    matches do."""
    models: list[dict[str, Any]] = index["models"]
    if not name:
        default = index.get("default")
        return next((m for m in models if m["name"] == default), None) if default else None
    found = naming.matches(name, index["names"])
    if len(found) > 1:
        raise Ambiguous(name)
    return models[found[0]] if found else None
