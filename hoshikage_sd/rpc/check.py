"""`hoshikage check` on a head: workers that do not answer, or that its model units may not
reach."""

from __future__ import annotations

from hoshikage_sd.errors import HoshikageError
from hoshikage_sd.manifest.model import Config
from hoshikage_sd.rpc import setup, workers


def allowed_by_dropin() -> set[str] | None:
    """The addresses head-setup's drop-in lets the model units reach; None: no drop-in."""
    try:
        text = (setup.UNIT_DIR / setup.HEAD_DROPIN).read_text()
    except OSError:
        return None
    return {line.split("=", 1)[1].strip() for line in text.splitlines()
            if line.startswith("IPAddressAllow=")}


def in_use() -> set[str]:
    """The models whose units are up (a worker serving one of them answers nobody else)."""
    from hoshikage_sd.sd import units

    try:
        return set(units.active_model_units())
    except HoshikageError:
        return set()


def problems(config: Config) -> list[str]:
    """A line per worker that does not answer (but for one serving a loaded model of ours)
    and per worker the model units may not reach."""
    used = {w for m in config.models.values() for w in m.rpc}
    if not used:
        return []
    out = []
    up = in_use()
    busy = {w for name in up if name in config.models for w in config.models[name].rpc}
    for name in sorted(used - busy):
        try:
            workers.ask(config.workers[name])
        except workers.WorkerUnavailable as err:
            out.append(f"{err.message} (models split over it do not load until it answers)")
    allowed = allowed_by_dropin()
    if allowed is None:
        out.append(f"the model units have no IP (IPAddressDeny=any): llama-server cannot "
                   f"reach the workers {', '.join(sorted(used))}; run 'sudo hoshikage "
                   "rpc-worker head-setup'")
        return out
    try:
        addresses = setup.resolve(config.workers[w] for w in sorted(used))
    except HoshikageError as err:
        return [*out, err.message]
    for name, found in addresses.items():
        if not set(found) <= allowed:
            out.append(f"worker '{name}' ({', '.join(found)}) is not in "
                       f"{setup.UNIT_DIR / setup.HEAD_DROPIN}: run 'sudo hoshikage "
                       "rpc-worker head-setup' again")
    return out
