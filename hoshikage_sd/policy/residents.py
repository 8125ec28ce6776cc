"""The numbers admission decides on, read from this machine: who holds memory, and how much
is free for a newcomer."""

from __future__ import annotations

import logging
import time

from hoshikage_sd import log, metrics
from hoshikage_sd.errors import HoshikageError
from hoshikage_sd.host import memory
from hoshikage_sd.manifest import Config, Model
from hoshikage_sd.policy import admission
from hoshikage_sd.policy.admission import Decision, Resident, Verdict
from hoshikage_sd.policy.stats import StatsFile
from hoshikage_sd.runtime import Runtime, estimate_key
from hoshikage_sd.sd import units as systemd

logger = logging.getLogger("hoshikage")


def estimate(model: Model, runtime: Runtime | None = None) -> int:
    """Bytes the model will hold once serving: from its GGUF header, else its file size.

    With a runtime, the figure is remembered until the file or its arguments change: a large
    vocabulary makes the header slow to read, and this sits on every cold start.
    """
    try:
        st = model.path.stat()
        key = estimate_key(model, st)
    except OSError:
        return 0
    if runtime is not None:
        cached = runtime.estimate(model.name)
        if cached is not None and cached[0] == key:
            return cached[1]
    from hoshikage_sd import gguf, memory

    try:
        info = gguf.read_model_info((model.path, *model.shards))
        value = memory.estimate(info, memory.load_params(info, model.server_args)).worst_case
        if model.mmproj is not None:
            value += memory.projector_bytes(model.mmproj.stat().st_size)
    except Exception as exc:  # a header we cannot read must not block admission
        logger.warning("cannot estimate %s from its header (%s); using its size", model.name,
                       exc)
        return st.st_size
    if runtime is not None:
        runtime.set_estimate(model.name, key, value)
    return value


#: a model's use of GPU devices: (bytes on each device, each listed device's total)
DeviceUse = tuple[dict[str, int], dict[str, int]]


def device_use(config: Config, model: Model, runtime: Runtime, listing: bool = True
               ) -> DeviceUse | None:
    """What `model` takes on each GPU device, and the devices' totals.

    With `listing` (the model unit: its environment is llama-server's, and so are the
    devices it sees), computed from `llama-server --list-devices` (devices.py, cached) and
    the model's header and arguments (memory.device_estimate), and remembered. Without (the
    router, whose environment is not the model unit's), the remembered figures when they
    are for the model's files and arguments as they are; None when there are none: the
    model unit has to judge. A model on no device: ({}, {})."""
    if model.backend != "llama-server":
        return {}, {}
    if model.rpc and not listing:
        return None  # its workers are asked in its unit, before llama-server (rpc/workers.py)
    try:
        key = estimate_key(model, model.path.stat())
    except OSError:
        return {}, {}
    known = runtime.devices(model.name)
    if not listing:
        if known and known[0][:1] == [key]:
            return known[1], known[2]
        return ({}, {}) if deviceless(model) else None
    from hoshikage_sd import devices, proc

    env = proc.server_env(model.environment)
    full_key = [key, devices.cache_key(config.llama_server, env)]
    if known and known[0] == full_key:
        return known[1], known[2]
    try:
        listed = devices.list_devices(config.llama_server, env, cache_dir=config.runtime_dir)
    except HoshikageError as err:
        logger.warning("cannot list the devices llama-server sees (%s): GPU memory is not "
                       "counted for %s", err.message, model.name)
        return {}, {}
    use: dict[str, int] = {}
    full = False
    if listed:
        from hoshikage_sd import gguf, memory

        try:
            info = gguf.read_model_info((model.path, *model.shards))
            params = memory.load_params(info, model.server_args)
            offload = memory.offload_params(model.server_args)
            placed = memory.device_estimate(info, params, offload, listed)
            use = {d: b for d, b in placed.used.items() if b}
            full = bool(use) and placed.gpu_layers >= placed.n_layers
        except Exception as exc:  # a header we cannot read must not block admission
            logger.warning("cannot estimate %s's GPU memory (%s): not counted", model.name,
                           exc)
    total = {d.name: d.total for d in listed}
    runtime.set_devices(model.name, full_key, use, total, full)
    return use, total


#: the model unit's environment as systemd has it, and when it was asked (monotonic)
_unit_env: tuple[float, dict[str, str] | None] = (-1e9, None)
UNIT_ENV_FOR = 60.0


def deviceless(model: Model) -> bool:
    """Can the router tell, without the model unit, that llama-server would see no device
    for `model`? Where there is no GPU device node (CUDA, ROCm, hardware Vulkan and SYCL
    all need one), nothing names a software Vulkan device (GGML_VK_VISIBLE_DEVICES: lavapipe
    is listed only then) and nothing names RPC workers. The unit's environment is asked of
    systemd at most once a minute."""
    global _unit_env
    from hoshikage_sd import devices

    if devices.has_nodes() or any(a.startswith("--rpc") for a in model.args):
        return False
    if time.monotonic() - _unit_env[0] > UNIT_ENV_FOR:
        from hoshikage_sd.commands.environment import unit_environment

        try:
            _unit_env = (time.monotonic(), unit_environment())
        except HoshikageError:
            _unit_env = (time.monotonic(), None)
    if _unit_env[1] is None:
        return False
    env = {**_unit_env[1], **model.environment}
    return not any(k in env for k in ("GGML_VK_VISIBLE_DEVICES", "LLAMA_ARG_RPC"))


def residents(config: Config, runtime: Runtime, exclude: str = "") -> list[Resident]:
    """Every model unit that serves or was admitted and is coming up, but `exclude`.

    A unit still waiting for admission holds nothing and promises nothing: counting it would
    let three waiting starts block each other for good.
    """
    now = time.time()
    try:
        active = systemd.active_model_units()
    except HoshikageError as err:
        logger.warning("cannot ask systemd which models are up (%s): trusting the runtime "
                       "records", err.message)
        active = runtime.recorded()
    ranks = StatsFile(config.state_dir).ranks(now, config.weights, active)
    out = []
    for name in active:
        if name == exclude:
            continue
        running = runtime.running(name)
        admitted = runtime.admitted(name)
        if running is None and admitted is None:
            continue
        model = config.models.get(name)
        memory = admitted if admitted is not None else estimate(model, runtime) if model else 0
        activity = runtime.activity(name)
        idle = runtime.idle_seconds(name, now)  # a unit still starting is busy: no victim
        last = max(activity.last_end if activity else 0.0,
                   running.started if running else 0.0) or now
        on_devices = runtime.devices(name)
        out.append(Resident(name, memory, idle, bool(model and model.pinned), last,
                            starting=running is None and activity is None,
                            rank=ranks.get(name, 0.0),
                            devices=on_devices[1] if on_devices else {}))
    return out


def available(config: Config, others: list[Resident]) -> int:
    """Free for a newcomer: MemAvailable less what starting models are about to take, and
    no more than memory_budget less what every model holds."""
    free = memory()[0] - sum(r.memory for r in others if r.starting)
    if config.memory_budget is not None:
        free = min(free, config.memory_budget - sum(r.memory for r in others))
    return max(0, free)


def judge(config: Config, model: Model, runtime: Runtime, listing: bool = True
          ) -> tuple[Decision, int]:
    """Admission's verdict for `model` now, and its estimate, over RAM and each GPU device
    (device_use: `listing` in the model unit only). Hold the admission lock. DevicesUnknown
    when the router cannot judge the model's devices."""
    on_devices = device_use(config, model, runtime, listing)
    if on_devices is None:
        raise DevicesUnknown(model.name)
    need, total = on_devices
    others = residents(config, runtime, exclude=model.name)
    held = {d: sum(r.devices.get(d, 0) for r in others) for d in total}
    estimate_bytes = estimate(model, runtime)
    if model.rpc:  # every worker answers and takes its share, or a refusal naming it
        from hoshikage_sd.rpc import workers

        others = free_workers(config, model, runtime, others) if listing else others
        workers.admit(config, model, estimate_bytes, [r.name for r in others])
    elif config.workers:  # no split to show from an earlier load with rpc:
        from hoshikage_sd.rpc import workers

        workers.forget(config.runtime_dir, model.name)
    decision = admission.decide(
        model.name, estimate_bytes, available(config, others), others,
        margin=config.safety_margin, max_loaded=config.max_loaded_models,
        floor=config.evict_floor, device_need=need,
        device_free={d: total[d] - held[d] for d in total}, device_total=total)
    return decision, estimate_bytes


def free_workers(config: Config, model: Model, runtime: Runtime,
                 others: list[Resident]) -> list[Resident]:
    """Stop the idle models (not pinned) that hold an RPC worker `model` needs: a worker
    serves one llama-server at a time. Waits for them to stop (their worker's connection
    closes with them); a busy or pinned one stays, and admission names it. The residents
    left."""
    from hoshikage_sd.rpc import workers

    holding = workers.holders(config, model, [r.name for r in others])
    stopped = []
    for r in others:
        if r.name in holding and r.idle is not None and not r.pinned and not r.starting:
            log.event("admission", model.name, f"stopping {r.name} (idle {r.idle:.0f} s): it "
                      f"holds worker '{holding[r.name]}', which {model.name} needs",
                      verdict="evict", victims=r.name)
            runtime.set_stop_reason(r.name, f"evicted for {model.name} (RPC worker "
                                            f"{holding[r.name]})")
            systemd.systemctl("stop", systemd.model_unit(r.name), check=False)
            stopped.append(r.name)
    return [r for r in others if r.name not in stopped]


class DevicesUnknown(HoshikageError):
    """The router cannot say what a model takes on GPU devices: its unit must judge."""

    def __init__(self, name: str) -> None:
        super().__init__(f"{name}'s use of GPU devices is not known yet")


def record(name: str, decision: Decision, counts: metrics.Counts | None = None) -> None:
    """The journal's 'admission' record of a decision, with its numbers; counted into
    `counts` too (the verdict, and a refusal's reason), which its caller writes later: this
    runs under the admission lock, on the way to a cold start."""
    verdict = decision.verdict
    log.event("admission", name, decision.message,
              level=logging.INFO if verdict in (Verdict.LOAD, Verdict.EVICT)
              else logging.WARNING,
              verdict=verdict.value, needed=decision.needed, available=decision.available,
              victims=",".join(v.name for v in decision.victims) or None)
    if counts is not None:
        counts.count("hoshikage_admission_decisions_total", model=name, verdict=verdict.value)
        if verdict is Verdict.REJECT:
            counts.count("hoshikage_refusals_total", model=name,
                         reason=refusal_reason(decision))


def by_count(decision: Decision) -> bool:
    """Does the decision evict for max_loaded_models only, the memory being free already?
    Then the newcomer need not wait for its victims to stop, and their staged copies may
    stay (model_unit/release.py keeps them while RAM is plentiful)."""
    return decision.verdict is Verdict.EVICT and decision.available >= decision.needed \
        and not decision.devices_short


def evict(name: str, decision: Decision, runtime: Runtime, counts: metrics.Counts,
          wait: bool) -> None:
    """Stop the decision's victims for `name` (hold the admission lock); with `wait`, return
    once they are down (their memory is what `name` needs)."""
    for victim in decision.victims:
        counts.count("hoshikage_evictions_total", model=victim.name, reason="admission")
        runtime.set_stop_reason(victim.name, f"evicted for {name}")
        if by_count(decision):
            runtime.set_keep_copy(victim.name)
        unit = systemd.model_unit(victim.name)
        if wait:
            systemd.systemctl("stop", unit, check=False)
        else:
            systemd.stop_unit(unit)


def refusal_reason(decision: Decision) -> str:
    """Why a model can never load: not enough memory, or (with enough) max_loaded_models."""
    return "memory" if decision.available < decision.needed else "max_loaded_models"
