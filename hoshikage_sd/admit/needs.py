"""What a model will hold once it serves: RAM (its estimate) and each GPU device's memory.

Both are computed from the model's GGUF header and arguments and remembered in the runtime
directory for the model's files and arguments as they are (a large vocabulary makes the
header slow to read, and this sits on every cold start)."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING, Any

from hoshikage_sd.errors import HoshikageError
from hoshikage_sd.manifest import Config, Model
from hoshikage_sd.runtime import Runtime, estimate_key

if TYPE_CHECKING:
    from hoshikage_sd.devices import Device
    from hoshikage_sd.gguf import GGUFInfo
    from hoshikage_sd.memory import LoadParams
    from hoshikage_sd.offload import DeviceEstimate, Offload

logger = logging.getLogger("hoshikage")


def estimate(model: Model, runtime: Runtime | None = None) -> int:
    """Bytes the model will hold once serving: from its GGUF header, else its file size.

    With a runtime, the figure is remembered until the file or its arguments change. A model
    on GPU devices is counted as if it ran on the CPU (offload.DeviceEstimate): too high for
    one offloaded, never too low, also where a device's memory is the host's (lavapipe, an
    integrated GPU).
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
        value = memory.estimate(info, memory.load_params(info, model.effective_args)).worst_case
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


def device_use(config: Config, model: Model, runtime: Runtime, listing: bool = True,
               up: Collection[str] = ()) -> DeviceUse | None:
    """What `model` takes on each GPU device, and the devices' totals. A model on no
    device: ({}, {}).

    With `listing`, the model unit's (its environment is llama-server's, and so are the
    devices it sees): listed_use. Without, the router's (whose environment is not the model
    unit's): remembered_use, or None when the model unit has to judge. `up`: the models up,
    whose RPC workers are not asked (head_share)."""
    if model.backend != "llama-server":
        return {}, {}
    if not listing:
        return remembered_use(model, runtime)
    return listed_use(config, model, runtime, up)


def files_key(model: Model) -> list[Any] | None:
    """What a remembered figure of `model` was computed from (its files and arguments as
    they are); None when its file is not there."""
    try:
        return estimate_key(model, model.path.stat())
    except OSError:
        return None


def remembered_use(model: Model, runtime: Runtime) -> DeviceUse | None:
    """The router's: the figures the model unit remembered for the model's files and
    arguments as they are; ({}, {}) where llama-server would see no device (deviceless);
    else None."""
    if model.rpc:
        return None  # its workers are asked in its unit, before llama-server (rpc/workers.py)
    key = files_key(model)
    if key is None:
        return {}, {}
    known = runtime.devices(model.name)
    if known and known[0][:1] == [key]:
        # one from before an edit of the unit's environment: its unit lists them again
        return None if unit_env_changed(runtime, model.name) else (known[1], known[2])
    return ({}, {}) if deviceless(model) else None


#: where an admin changes the model unit's environment (README "GPUs"): a device it selects
#: (GGML_VK_VISIBLE_DEVICES, CUDA_VISIBLE_DEVICES) is not in the record's key as the router
#: reads it, which is the manifest's (the unit's keys it: listed_use)
UNIT_ENV_SOURCES = ("/etc/default/hoshikage", "/etc/systemd/system/hoshikage-model@.service.d",
                    "/run/systemd/system/hoshikage-model@.service.d")


def unit_env_changed(runtime: Runtime, name: str) -> bool:
    """Has the unit's environment been edited since the model's device record was written?
    Then its unit lists the devices again and judges (it counted no GPU for a model started
    on one after GGML_VK_VISIBLE_DEVICES was set: a few stat calls, no D-Bus)."""
    try:
        written = runtime.devices_path(name).stat().st_mtime
    except OSError:
        return True
    for source in UNIT_ENV_SOURCES:
        try:
            if os.stat(source).st_mtime >= written:
                return True
        except OSError:
            continue
    return False


def listed_use(config: Config, model: Model, runtime: Runtime, up: Collection[str]
               ) -> DeviceUse:
    """The model unit's: the devices `llama-server --list-devices` shows (devices.py,
    cached) and what the model's header and arguments put on each (placed_use), remembered
    for its files, arguments and llama-server's environment. A model split over RPC workers
    is computed anew each time: its head's share follows the workers' free memory. Its
    record stays what status and the next admission count it to hold."""
    from hoshikage_sd import devices, proc

    key = files_key(model)
    if key is None:
        return {}, {}
    env = proc.server_env(model.environment)
    full_key = [key, devices.cache_key(config.llama_server, env)]
    known = runtime.devices(model.name)
    if known and known[0] == full_key and not model.rpc:
        if unit_env_changed(runtime, model.name):
            # an edit that left its variables as they were: written again, so that the
            # router takes the record as current (remembered_use)
            runtime.set_devices(model.name, full_key, known[1], known[2],
                                runtime.fully_offloaded(model.name))
        return known[1], known[2]
    try:
        listed = devices.list_devices(config.llama_server, env, cache_dir=config.runtime_dir)
    except HoshikageError as err:
        logger.warning("cannot list the devices llama-server sees (%s): GPU memory is not "
                       "counted for %s", err.message, model.name)
        return {}, {}
    use, full = placed_use(config, model, listed, up) if listed else ({}, False)
    total = {d.name: d.total for d in listed}
    runtime.set_devices(model.name, full_key, use, total, full)
    return use, total


def placed_use(config: Config, model: Model, listed: Sequence[Device], up: Collection[str]
               ) -> tuple[dict[str, int], bool]:
    """Bytes the model puts on each of the `listed` devices it uses (offload.device_estimate,
    head_share), and whether every layer is on one; nothing where its header cannot be
    read (that must not block admission)."""
    from hoshikage_sd import gguf, memory, offload

    try:
        info = gguf.read_model_info((model.path, *model.shards))
        params = memory.load_params(info, model.effective_args)
        placed = head_share(config, model, info, params,
                            offload.offload_params(model.effective_args), listed, up)
    except Exception as exc:
        logger.warning("cannot estimate %s's GPU memory (%s): not counted", model.name, exc)
        return {}, False
    use = {d: b for d, b in placed.used.items() if b}
    return use, bool(use) and placed.gpu_layers >= placed.n_layers


def head_share(config: Config, model: Model, info: GGUFInfo, params: LoadParams,
               offload: Offload, listed: Sequence[Device], up: Collection[str]
               ) -> DeviceEstimate:
    """What `model` puts on the head's own devices (`listed`): split over RPC workers, the
    layers llama.cpp leaves the head (split_share); else, or where that is not known, every
    offloaded layer (too high for a split model, never too low)."""
    from hoshikage_sd.offload import device_estimate

    split = split_share(config, model, info, params, offload, listed, up) if model.rpc \
        else None
    return split if split is not None else device_estimate(info, params, offload, listed)


def split_share(config: Config, model: Model, info: GGUFInfo, params: LoadParams,
                offload: Offload, listed: Sequence[Device], up: Collection[str]
                ) -> DeviceEstimate | None:
    """The head's share of a model split over its workers, from each worker's answer
    (rpc/placement.head_estimate); None when a worker does not answer, lacks a device its
    `devices:` names, or is held by another model of `up`."""
    from hoshikage_sd.rpc import placement, workers

    if workers.holders(config, model, up):
        return None  # it serves one client at a time: the ask would wait out its timeout
    chosen = [config.workers[w] for w in model.rpc]
    try:
        answers = [workers.ask(w) for w in chosen]
        return placement.head_estimate(info, params, offload, listed, chosen, answers)
    except (workers.WorkerUnavailable, placement.UnknownDevice) as err:
        # admission's own ask (admit/act.workers) refuses the load, naming the worker
        logger.debug("%s's share of its split is not known (%s): its head is counted with "
                     "every offloaded layer", model.name, err)
        return None


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

    if devices.has_nodes() or any(a.startswith("--rpc") for a in model.effective_args):
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


class DevicesUnknown(HoshikageError):
    """The router cannot say what a model takes on GPU devices: its unit must judge."""

    def __init__(self, name: str) -> None:
        super().__init__(f"{name}'s use of GPU devices is not known yet")
