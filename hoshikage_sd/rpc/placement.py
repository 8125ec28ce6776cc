"""Which devices a model split over RPC workers uses, under llama-server's names.

The head's llama-server names a worker's devices `RPC0`, `RPC1`, ... numbered across the
workers in `--rpc` order, each worker's in its own order (llama.cpp's
ggml_backend_rpc_add_server: a worker with two devices then one with one are RPC0, RPC1 and
RPC2). `--device` takes those names with the head's own (`Vulkan0`, `CUDA1`) and uses only
the devices it names, in its order. So a worker's `devices:` in the manifest (indices in its
own list, since the protocol tells the head how many devices a worker has, never their
names) becomes a `--device` list that names every device the model uses: the selected ones
of each worker, every device of a worker that selects none, then the head's own (those the
model's own `--device` names, else every one llama-server lists here). The workers come
first, as in llama.cpp's order without `--device`, so `-ts` proportions keep their meaning.

The device counts are the workers' answers at admission (rpc/workers.admit records them
with the split), so the list is made in the model unit, after admission, before spawning.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from hoshikage_sd.manifest.model import Config, Model, Worker

if TYPE_CHECKING:
    from hoshikage_sd.devices import Device
    from hoshikage_sd.gguf import GGUFInfo
    from hoshikage_sd.memory import LoadParams
    from hoshikage_sd.offload import DeviceEstimate, Offload
    from hoshikage_sd.rpc.wire import Answer


class UnknownDevice(ValueError):
    """A worker's `devices:` names an index its ggml-rpc-server does not list."""


def selected(worker: Worker, count: int) -> list[int]:
    """The indices of `worker`'s devices the model uses, of the `count` it has."""
    if worker.devices is None:
        return list(range(count))
    missing = [i for i in worker.devices if i >= count]
    if missing:
        listed = ", ".join(map(str, range(count))) or "none"
        raise UnknownDevice(
            f"worker '{worker.name}' ({worker.address}) has {count} device"
            f"{'' if count == 1 else 's'} ({listed}): its devices: names "
            f"{', '.join(map(str, missing))}")
    return list(worker.devices)


def rpc_names(workers: Sequence[Worker], counts: Sequence[int]) -> list[str]:
    """llama-server's names of the workers' devices the model uses, in --rpc order."""
    names = []
    first = 0
    for worker, count in zip(workers, counts, strict=True):
        names += [f"RPC{first + i}" for i in selected(worker, count)]
        first += count
    return names


def device_list(workers: Sequence[Worker], counts: Sequence[int],
                local: Sequence[str]) -> list[str]:
    """llama-server's --device list: the workers' devices, then the head's `local` ones.
    Empty when no worker selects devices (llama-server then uses every device it has, as
    without workers). `local`: the model's own --device names, else every device listed
    on the head."""
    if all(w.devices is None for w in workers):
        return []
    return rpc_names(workers, counts) + list(local)


def local_devices(config: Config, model: Model) -> list[str]:
    """The head's own devices for `model`: its own --device list ('none': none), else
    every device llama-server lists with the model's environment (devices.json's cache)."""
    from hoshikage_sd import devices, proc
    from hoshikage_sd.offload import offload_params

    chosen = offload_params(model.effective_args).devices
    if chosen is not None:
        return list(chosen)
    env = proc.server_env(model.environment)
    return [d.name for d in devices.list_devices(config.llama_server, env,
                                                 cache_dir=config.runtime_dir)]


def for_model(config: Config, model: Model, counts: Mapping[str, int]) -> list[str]:
    """The --device list the model unit gives llama-server ([]: none needed), from the
    device counts its workers gave at admission. UnknownDevice for a worker whose
    `devices:` names one it does not have, or whose count is not known."""
    workers = [config.workers[w] for w in model.rpc]
    if all(w.devices is None for w in workers):
        return []
    for w in workers:
        if w.name not in counts:
            raise UnknownDevice(f"worker '{w.name}' ({w.address}): its device count is not "
                                "known (admission did not record its answer)")
    return device_list(workers, [counts[w.name] for w in workers],
                       local_devices(config, model))


def rpc_devices(workers: Sequence[Worker], answers: Sequence[Answer]) -> list[Device]:
    """The workers' devices the model uses, as llama-server lists them with --rpc (`RPC<n>`,
    the worker's address, its memory as the worker said)."""
    from hoshikage_sd.devices import Device

    out = []
    first = 0
    for worker, answer in zip(workers, answers, strict=True):
        for i in selected(worker, len(answer.devices)):
            device = answer.devices[i]
            out.append(Device(f"RPC{first + i}", worker.address, device.total, device.free))
        first += len(answer.devices)
    return out


def head_estimate(info: GGUFInfo, params: LoadParams, offload: Offload,
                  local: Sequence[Device], workers: Sequence[Worker],
                  answers: Sequence[Answer]) -> DeviceEstimate:
    """What a model split over `workers` puts on each of the head's own devices (`local`,
    as llama-server lists them here): the layers are placed over the workers' devices and
    the head's alike (llama.cpp: the workers' first, split by free memory or -ts), and
    only the head's share is kept. Without this the head's devices would be counted as
    holding every offloaded layer. Pure: `answers` are the workers' (wire.ask)."""
    from hoshikage_sd.offload import device_estimate

    remote = rpc_devices(workers, answers)
    mine = [d.name for d in local] if offload.devices is None else list(offload.devices)
    placed = device_estimate(info, params,
                             replace(offload, devices=(*(d.name for d in remote), *mine)),
                             [*remote, *local])
    names = {d.name for d in remote}
    return replace(placed, devices={n: u for n, u in placed.devices.items()
                                    if n not in names})
