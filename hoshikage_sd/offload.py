"""What llama-server puts on each GPU device for a model, and what it keeps in host memory
beside them: the per-device estimate, beside memory.py's RAM estimate.

Where llama-server (b10068) puts a model when it has devices (llama.cpp's load_tensors and
common_fit_params), and what each device then holds. Measured on the Vulkan backend
(lavapipe) against the buffer sizes llama-server logs; docs/memory.md ("Devices").

Layers: the model's n_layer repeating layers (blk.N.*) plus the output layer (output_norm,
output; token_embd again where the model ties them) make n_layer + 1 offloadable layers.
-ngl N puts the *last* N of them on devices (-ngl 1: the output layer only); the input layer
(token_embd) always stays on the CPU. Offloaded layers go to the devices in proportion to
--tensor-split (default: the devices' free memory): layer i (counted from the first
offloaded one) goes to the first device whose cumulative share exceeds i / offloaded.
-ngl auto (the default) is every layer, unless --fit (on by default) finds that the devices
would keep less than --fit-target (1024 MiB) free: then it lowers the context (when -c is
not given, not below --fit-ctx 4096), and then the number of layers, until they would.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from hoshikage_sd.errors import die
from hoshikage_sd.gguf import GGUFInfo
from hoshikage_sd.ggufheader import row_size
from hoshikage_sd.memory import (
    KV_PAD,
    LoadParams,
    MiB,
    compute_bytes,
    flag_at,
    int_arg,
    kv_cells,
    ubatch,
)

if TYPE_CHECKING:  # devices (subprocess, json, hashlib) and re only where devices are used
    from hoshikage_sd.devices import Device

#: -ngl auto; any value below it means "all"
GPU_LAYERS_AUTO = -1
GPU_LAYERS_ALL = -2
DEFAULT_FIT_TARGET = 1024 * MiB
DEFAULT_FIT_CTX = 4096
#: ggml offloads a matmul whose weight is in host memory to the first device at this batch
OP_OFFLOAD_MIN_BATCH = 32
_SPLIT_MODES = ("none", "layer", "row", "tensor")


@dataclass(frozen=True)
class Offload:
    """llama-server's offload arguments (offload_params())."""

    gpu_layers: int = GPU_LAYERS_AUTO        # -ngl: N, -1 auto, <= -2 all
    devices: tuple[str, ...] | None = None   # --device: None = every device; () = none
    split_mode: str = "layer"                # -sm none | layer | row | tensor
    tensor_split: tuple[float, ...] = ()     # -ts 3,1
    main_gpu: int = 0                        # -mg
    kv_offload: bool = True                  # -nkvo: the KV cache stays in host memory
    op_offload: bool = True                  # --no-op-offload
    fit: bool = True                         # -fit on|off
    fit_target: tuple[int, ...] = (DEFAULT_FIT_TARGET,)  # -fitt MiB per device, bytes
    fit_ctx: int = DEFAULT_FIT_CTX           # -fitc
    ctx_given: bool = False                  # -c N (N > 0): --fit leaves the context alone
    #: -ot PATTERN=BUFFER, --cpu-moe, --n-cpu-moe N: tensors (by regex) kept on a device
    #: ("CPU" = host memory); first match wins, as in llama.cpp
    overrides: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class DeviceUse:
    weights: int = 0
    kv_cache: int = 0
    compute: int = 0

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.compute


@dataclass(frozen=True)
class DeviceEstimate:
    """What a model puts on each device, and what of it stays in host memory.

    `host.weights` are the tensors read through the mmap of the staged file (already paid in
    the RAM estimate's weights); `host.kv_cache` the KV cache of the layers kept on the CPU
    (or all of it with -nkvo); `host.compute` the CPU's (pinned) graph buffer. The RAM
    estimate (memory.estimate()) counts a model as if it ran on the CPU and stays an upper bound.
    """

    devices: Mapping[str, DeviceUse]   # by device name, every device the model uses
    host: DeviceUse
    gpu_layers: int                    # layers on devices (llama-server: "offloaded N/M")
    n_layers: int                      # repeating layers + the output layer
    n_ctx: int                         # the context, after --fit

    @property
    def used(self) -> dict[str, int]:
        """Bytes by device name."""
        return {name: use.total for name, use in self.devices.items()}

    @property
    def device_total(self) -> int:
        return sum(use.total for use in self.devices.values())

    def fits(self, free: Mapping[str, int]) -> bool:
        """Does every device have room (`free`: bytes by name; a device not named has none)?"""
        return all(use.total <= free.get(name, 0) for name, use in self.devices.items())


def _split_floats(flag: str, value: str | None) -> tuple[float, ...]:
    import re

    if not value:
        die(f"llama-server argument {flag} needs a list of numbers")
    try:
        return tuple(float(v) for v in re.split(r"[,/]+", value) if v)
    except ValueError:
        die(f"llama-server argument {flag} needs numbers such as 3,1, not {value!r}")


def offload_params(args: Sequence[str]) -> Offload:
    """llama-server's offload arguments, as memory.load_params() reads the rest."""
    kw: dict[str, Any] = {}
    overrides: list[tuple[str, str]] = []
    items = list(args)
    i = 0
    while i < len(items):
        flag, value, takes = flag_at(items, i)
        if flag in ("-ngl", "--gpu-layers", "--n-gpu-layers"):
            low = (value or "").lower()
            kw["gpu_layers"] = (GPU_LAYERS_AUTO if low == "auto" else
                                GPU_LAYERS_ALL if low == "all" else int_arg(flag, value))
        elif flag in ("-dev", "--device"):
            if not value:
                die(f"llama-server argument {flag} needs a device list (or none)")
            names = tuple(v.strip() for v in value.split(",") if v.strip())
            kw["devices"] = () if names == ("none",) else names
        elif flag in ("-sm", "--split-mode"):
            if value is None or value.lower() not in _SPLIT_MODES:
                die(f"llama-server argument {flag} needs one of {', '.join(_SPLIT_MODES)}, "
                    f"not {value!r}")
            kw["split_mode"] = value.lower()
        elif flag in ("-ts", "--tensor-split"):
            kw["tensor_split"] = _split_floats(flag, value)
        elif flag in ("-mg", "--main-gpu"):
            kw["main_gpu"] = int_arg(flag, value)
        elif flag in ("-fit", "--fit"):
            if not takes or (value is not None and value.lower() in ("on", "off")):
                kw["fit"] = (value or "").lower() != "off"
            else:
                kw["fit"], takes = True, False
        elif flag in ("-fitt", "--fit-target"):
            kw["fit_target"] = tuple(int(v * MiB) for v in _split_floats(flag, value))
        elif flag in ("-fitc", "--fit-ctx"):
            kw["fit_ctx"] = int_arg(flag, value)
        elif flag in ("-c", "--ctx-size"):
            kw["ctx_given"] = int_arg(flag, value) > 0
        elif flag in ("-ot", "--override-tensor"):
            for spec in (value or "").split(","):
                pattern, sep, buffer = spec.rpartition("=")
                if not sep or not pattern:
                    die(f"llama-server argument {flag} needs PATTERN=BUFFER, not {spec!r}")
                overrides.append((pattern, buffer))
        elif flag in ("-ncmoe", "--n-cpu-moe"):
            n = int_arg(flag, value)
            overrides += [(rf"blk\.{il}\.ffn_(up|down|gate|gate_up)_(ch|)exps", "CPU")
                          for il in range(n)]
        else:
            takes = False
            if flag in ("-nkvo", "--no-kv-offload"):
                kw["kv_offload"] = False
            elif flag in ("-kvo", "--kv-offload"):
                kw["kv_offload"] = True
            elif flag == "--no-op-offload":
                kw["op_offload"] = False
            elif flag == "--op-offload":
                kw["op_offload"] = True
            elif flag in ("-cmoe", "--cpu-moe"):
                overrides.append((r"\.ffn_(up|down|gate|gate_up)_(ch|)exps", "CPU"))
        i += 2 if takes else 1
    return Offload(overrides=tuple(overrides), **kw)


def _layer_of(name: str, n_layer: int) -> int:
    """The offload layer a tensor belongs to: N for blk.N.*, n_layer for the output layer,
    -1 for the input layer (token_embd and the rest, which stay on the CPU)."""
    if name.startswith("blk."):
        head = name[4:].partition(".")[0]
        if head.isdigit():
            return int(head)
    if name.startswith(("output", "cls")):
        return n_layer
    return -1


def _device_order(devices: Sequence[Device], offload: Offload) -> list[Device]:
    """The devices the model uses, in llama.cpp's order: --device's, else every one listed
    with the RPC servers first; -sm none keeps only the -mg one."""
    from hoshikage_sd.devices import by_name

    if offload.devices is None:
        chosen = sorted(devices, key=lambda d: not _is_rpc(d))
    else:
        chosen = [by_name(devices, name) for name in offload.devices]
    if offload.split_mode == "none" and chosen:
        if offload.main_gpu < 0:
            return []
        if offload.main_gpu >= len(chosen):
            die(f"llama-server argument -mg {offload.main_gpu}: there are only "
                f"{len(chosen)} devices ({', '.join(d.name for d in chosen)})")
        return [chosen[offload.main_gpu]]
    return chosen


def _is_rpc(device: Device) -> bool:
    return device.name.startswith("RPC")


def _shares(devices: Sequence[Device], offload: Offload,
            free: Mapping[str, int] | None) -> list[float]:
    """Cumulative fractions of the layers per device (llama.cpp's split points)."""
    if any(offload.tensor_split[: len(devices)]):
        raw = [offload.tensor_split[i] if i < len(offload.tensor_split) else 0.0
               for i in range(len(devices))]
    else:  # by free memory
        raw = [float(free.get(d.name, d.free) if free is not None else d.free) or 1.0
               for d in devices]
    total = sum(raw) or 1.0
    out, acc = [], 0.0
    for r in raw:
        acc += r
        out.append(acc / total)
    return out


def _placement(n_layers: int, ngl: int, devices: Sequence[Device],
               splits: Sequence[float]) -> list[int]:
    """For each of the n_layers (repeating + output) offload layers the index of its
    device, or -1 for the CPU (llama.cpp's get_layer_buft_list)."""
    ngl = n_layers if ngl < 0 else ngl
    start = max(n_layers - ngl, 0)
    active = 0 if not devices else min(ngl, n_layers)
    out = []
    for il in range(n_layers):
        if il < start or il - start >= active:
            out.append(-1)
            continue
        x = (il - start) / active
        out.append(min(bisect.bisect_right(splits, x), len(devices) - 1))
    return out


def _device_compute(info: GGUFInfo, params: LoadParams) -> int:
    """A device's graph buffer for its layers (Vulkan backend, measured): one micro-batch
    of u tokens in f32 over the widest step (feed-forward 2 n_embd + 3 n_ff, or attention
    3 n_embd + 2 K/V widths) plus the f16 attention mask; without flash attention the f32
    attention scores (n_head x cells) and an f32 mask instead."""
    u = ubatch(params)
    _, n_kv = kv_cells(params)
    e = info.embedding_length
    f = info.feed_forward_length or 4 * e
    kv_width = max(info.key_length, info.value_length) * info.head_count_kv
    widest = max(2 * e + 3 * f, 3 * e + 2 * kv_width)
    if params.flash_attn:
        return u * 4 * widest + u * n_kv * 2
    return u * 4 * max(widest, info.head_count * n_kv + n_kv + 3 * e)


def _host_compute(info: GGUFInfo, params: LoadParams) -> int:
    """The CPU's (pinned host) graph buffer beside a device: the input embeddings and their
    copy (u x n_embd x 2 in f32) and the attention mask (f16; f32 without flash attention)."""
    u = ubatch(params)
    _, n_kv = kv_cells(params)
    return u * info.embedding_length * 8 + u * n_kv * (2 if params.flash_attn else 4)


def _place_weights(info: GGUFInfo, offload: Offload, chosen: Sequence[Device],
                   place: Sequence[int], slices: Sequence[float] | None
                   ) -> tuple[list[int], int, int]:
    """(weight bytes per device, on the host, the largest matrix on the host) for tensors
    placed by layer (`place`), -ot overrides first; with `slices` (row/tensor split) each
    offloaded matrix is cut across all devices in those shares."""
    import re

    n = info.block_count
    weights = [0] * len(chosen)
    host = largest = 0
    patterns = [(re.compile(p), b) for p, b in offload.overrides]
    for t in info.tensors:
        il = _layer_of(t.name, n)
        where = place[il] if 0 <= il <= n else -1
        for pattern, buffer in patterns:
            if pattern.search(t.name):
                where = -1 if buffer.upper().startswith("CPU") else next(
                    (i for i, d in enumerate(chosen) if d.name.lower() == buffer.lower()),
                    where)
                break
        if where < 0:
            host += t.nbytes
            if il >= 0 and len(t.dims) >= 2:  # token_embd is read by row, not multiplied
                largest = max(largest, t.nbytes)
        elif slices is not None and len(t.dims) >= 2:
            for i, share in enumerate(slices):
                weights[i] += int(t.nbytes * share)
        else:
            weights[where] += t.nbytes
    names = {t.name: t for t in info.tensors}
    if "output.weight" not in names and "token_embd.weight" in names and place[n] >= 0:
        weights[place[n]] += names["token_embd.weight"].nbytes  # tied: loaded again
    return weights, host, largest


def _place_kv(info: GGUFInfo, params: LoadParams, offload: Offload, n_devices: int,
              place: Sequence[int]) -> tuple[list[int], int, int]:
    """(KV bytes per device, on the host, the largest host layer's K+V of one stream)."""
    streams, cells = kv_cells(params)
    heads_kv = info.per_layer("attention.head_count_kv", info.head_count_kv)
    kv = [0] * n_devices
    host = largest = 0
    for il in range(info.block_count):
        h = heads_kv[il] if il < len(heads_kv) else info.head_count_kv
        per_cell = (row_size(params.cache_type_k, info.key_length * h)
                    + row_size(params.cache_type_v, info.value_length * h))
        if place[il] >= 0 and offload.kv_offload:
            kv[place[il]] += streams * cells * per_cell
        else:
            host += streams * cells * per_cell
            if place[il] < 0:
                largest = max(largest, cells * per_cell)
    return kv, host, largest


def _estimate_at(info: GGUFInfo, params: LoadParams, offload: Offload,
                 chosen: Sequence[Device], splits: Sequence[float], ngl: int
                 ) -> DeviceEstimate:
    n = info.block_count
    # layer split: layers to devices by splits; row/tensor split: every layer to the main
    # device, its matrices cut across all devices (not measured: no such device here)
    row = offload.split_mode in ("row", "tensor") and len(chosen) > 1
    place = _placement(n + 1, ngl, chosen, splits)
    if row:
        main = min(max(offload.main_gpu, 0), len(chosen) - 1)
        place = [main if p >= 0 else -1 for p in place]
    weights, host_weights, host_matrix = _place_weights(
        info, offload, chosen, place, _slices(splits) if row else None)
    kv, host_kv, host_layer_kv = _place_kv(info, params, offload, len(chosen), place)
    compute = [0] * len(chosen)
    u = ubatch(params)
    partial = any(p < 0 for p in place) or host_matrix > 0
    if chosen:
        per_device = _device_compute(info, params)
        for i in {p for p in place[:n] if p >= 0}:  # an output layer alone needs ~nothing
            compute[i] = per_device
            if not offload.kv_offload:
                compute[i] += u * 4 * 2 * info.embedding_length  # attention's copies
        host_compute = _host_compute(info, params)
        if partial and offload.op_offload and u >= OP_OFFLOAD_MIN_BATCH:
            # the first device (RPC servers do not take them) also runs the host layers'
            # big matmuls and attention, their weight or K/V copied in: the larger of the
            # two on top of its own graph
            first = next((i for i, d in enumerate(chosen) if not _is_rpc(d)), 0)
            compute[first] = per_device + max(host_matrix, host_layer_kv)
            host_compute += u * info.embedding_length * 4
        elif partial:
            host_compute = compute_bytes(info, params)  # the CPU runs its layers itself
    else:
        host_compute = compute_bytes(info, params)
    used = {d.name: DeviceUse(weights[i], kv[i], compute[i]) for i, d in enumerate(chosen)
            if weights[i] or kv[i] or compute[i]}
    return DeviceEstimate(devices=used, host=DeviceUse(host_weights, host_kv, host_compute),
                          gpu_layers=sum(1 for p in place if p >= 0), n_layers=n + 1,
                          n_ctx=params.n_ctx)


def _slices(splits: Sequence[float]) -> list[float]:
    return [b - a for a, b in zip([0.0, *splits[:-1]], splits, strict=True)]


def _fit_target(offload: Offload, index: int) -> int:
    targets = offload.fit_target or (DEFAULT_FIT_TARGET,)
    return targets[index] if index < len(targets) else targets[-1]


def device_estimate(info: GGUFInfo, params: LoadParams, offload: Offload,
                    devices: Sequence[Device], free: Mapping[str, int] | None = None
                    ) -> DeviceEstimate:
    """Bytes per device (and in host memory) that llama-server will allocate for the model,
    with `devices` as llama-server lists them (hoshikage_sd.devices.list_devices).

    `free` (bytes by device name; default: each device's listed free memory) is what the
    devices will have free when it loads: the default tensor split follows it, and so does
    --fit when -ngl is auto: it then lowers the context (-c not given) and the number of
    layers until every device keeps --fit-target free, as llama-server does.
    """
    chosen = _device_order(devices, offload)
    splits = _shares(chosen, offload, free)
    n_layers = info.block_count + 1
    ngl = n_layers if offload.gpu_layers < 0 else offload.gpu_layers
    est = _estimate_at(info, params, offload, chosen, splits, ngl)
    if not (offload.fit and chosen):
        return est
    room = {d.name: (free.get(d.name, d.free) if free is not None else d.free)
            - _fit_target(offload, i) for i, d in enumerate(chosen)}

    def over(e: DeviceEstimate) -> int:
        return max([use.total - room[name] for name, use in e.devices.items()] + [0])

    excess = over(est)
    if excess and not offload.ctx_given and params.n_ctx > offload.fit_ctx:
        # a shorter context, by what it saves per token; not below --fit-ctx. The step is
        # one padding of every stream's cache: a smaller one saves nothing with -np 4
        step = KV_PAD * (1 if params.kv_unified else params.n_parallel)
        shorter = _estimate_at(info, replace(params, n_ctx=max(1, params.n_ctx - step)),
                               offload, chosen, splits, ngl)
        per_ctx = max(1, (est.device_total - shorter.device_total) // step)
        params = replace(params, n_ctx=max(offload.fit_ctx,
                                           params.n_ctx - -(-excess // per_ctx)))
        est = _estimate_at(info, params, offload, chosen, splits, ngl)
    if offload.gpu_layers != GPU_LAYERS_AUTO:
        return est  # llama-server lowers only what it was not given
    while ngl > 0 and over(est):
        ngl -= 1
        est = _estimate_at(info, params, offload, chosen, splits, ngl)
    return est
