"""The name index: the head start's part of what the router keeps of its manifest.

From zero processes, what the request waits for before its model's unit starts is the
router's start: the interpreter, then the CLI, then the manifest (PyYAML and the model
checks) and only then the name resolution. So each router that keeps a good manifest
(hoshikage_sd/lastgood.py, manifest.json) keeps beside it what resolving a name takes (build):
the manifest's own name table (Config.name_table, which naming.matches reads for the
manifest and here alike), the default model, each model's socket, health route and unit,
and for a model that can start from its source the ticket and the least MemAvailable at
which the policy admits it with nothing else up (admit.py). The next router's head start
reads it (read: lastgood.read, which checks every file the manifest was made from) and starts
the unit before it imports argparse, PyYAML or the manifest code.

Any doubt (nothing kept, another manifest path, a file changed since, another version, a
name with several partial matches, whose winner is the usage ranks' to pick) means no
answer: the router then resolves the request the usual way, after its imports.

Reading: os, lightjson and naming only (the head start's budget). Building: the router, lazily
importing what it needs.
"""

from __future__ import annotations

import os

from hoshikage_sd import lastgood, naming

TYPE_CHECKING = False  # typing would be on the head start when nothing loaded it
if TYPE_CHECKING:
    from typing import Any

    from hoshikage_sd.manifest import Config, Model

#: MemAvailable beyond any model, for the policy's answer on everything but MemAvailable
UNBOUNDED = 1 << 62


def build(config: Config) -> dict[str, Any]:
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


def read() -> dict[str, Any] | None:
    """The index, when what the router kept is current for this manifest and names.json
    (and every other file the manifest was made from); else None."""
    value = lastgood.read(lastgood.manifest_path())
    index = value.get("headstart") if value is not None else None
    return index if isinstance(index, dict) and isinstance(index.get("models"), list) else None


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
