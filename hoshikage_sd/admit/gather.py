"""Admission's inputs, read from this machine once: the models up (what each holds, how long
idle, pinned, its rank, its devices and RPC workers), MemAvailable, and the newcomer's needs.

The policy (policy/admission.decide) takes these as values and reads nothing itself."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence

from hoshikage_sd.admit import needs
from hoshikage_sd.errors import HoshikageError
from hoshikage_sd.host import memory
from hoshikage_sd.manifest import Config, Model
from hoshikage_sd.policy.admission import Limits, Request, Resident, Snapshot
from hoshikage_sd.runtime import Runtime
from hoshikage_sd.sd import units
from hoshikage_sd.stats import StatsFile

logger = logging.getLogger("hoshikage")


def residents(config: Config, runtime: Runtime) -> list[Resident]:
    """Every model unit that serves or was admitted and is coming up.

    A unit still waiting for admission holds nothing and promises nothing: counting it would
    let three waiting starts block each other for good.
    """
    now = time.time()
    try:
        active = units.active_model_units(queued=True)
    except HoshikageError as err:
        logger.warning("cannot ask systemd which models are up (%s): trusting the runtime "
                       "records", err.message)
        active = runtime.recorded()
    ranks = StatsFile(config.state_dir).ranks(now, config.weights, active)
    out = []
    for name in active:
        running = runtime.running(name)
        admitted = runtime.admitted(name)
        if running is None and admitted is None:
            continue
        model = config.models.get(name)
        held = admitted if admitted is not None else \
            needs.estimate(model, runtime) if model else 0
        activity = runtime.activity(name)
        idle = runtime.idle_seconds(name, now)  # a unit still starting is busy: no victim
        last = max(activity.last_end if activity else 0.0,
                   running.started if running else 0.0) or now
        on_devices = runtime.devices(name)
        out.append(Resident(name, held, idle, bool(model and model.pinned), last,
                            starting=running is None and activity is None,
                            rank=ranks.get(name, 0.0),
                            devices=on_devices[1] if on_devices else {},
                            workers=frozenset(model.rpc) if model else frozenset()))
    return out


def limits(config: Config) -> Limits:
    return Limits(config.safety_margin, config.max_loaded_models, config.evict_floor,
                  config.memory_budget)


def snapshot(config: Config, runtime: Runtime, devices: Mapping[str, int] | None = None,
             present: Sequence[Resident] | None = None) -> Snapshot:
    """The machine now; `devices`: the GPU devices' totals as the newcomer's llama-server
    sees them; `present`: the residents when read already."""
    if present is None:
        present = residents(config, runtime)
    return Snapshot(tuple(present), memory()[0], dict(devices or {}), limits(config))


def inputs(config: Config, model: Model, runtime: Runtime, listing: bool = True
           ) -> tuple[Snapshot, Request]:
    """Everything admission decides `model` on: the machine, and what `model` will hold in
    RAM, on each GPU device (needs.device_use: `listing` in the model unit only) and on
    which RPC workers. DevicesUnknown when the router cannot judge the model's devices."""
    # a split model's workers are asked for its head's share, but not one a model up holds
    present = residents(config, runtime) if listing and model.rpc else None
    on_devices = needs.device_use(config, model, runtime, listing,
                                  up=[r.name for r in present or ()])
    if on_devices is None:
        raise needs.DevicesUnknown(model.name)
    use, total = on_devices
    request = Request(model.name, needs.estimate(model, runtime), use, frozenset(model.rpc))
    return snapshot(config, runtime, total, present), request
