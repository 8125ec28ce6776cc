"""The devices llama-server can offload to (GPUs, iGPUs, RPC servers) and their memory.

The source is llama-server itself: `llama-server --list-devices` prints every device its
backends found (CUDA, ROCm/HIP, Vulkan, SYCL, Metal, RPC; never the CPU), in the order and
under the names (`CUDA0`, `Vulkan1`, ...) that `--device`, `--tensor-split` and `--main-gpu`
use, so it works for every backend llama.cpp has, as the service user sees them:

    Available devices:
      Vulkan0: llvmpipe (LLVM 15.0.6, 256 bits) (2048 MiB, 2048 MiB free)
      CUDA0: NVIDIA GeForce RTX 4090 (24080 MiB, 23664 MiB free)

What it lists depends on the build (which backends it has) and on the environment it runs
with: CUDA_VISIBLE_DEVICES, HIP_VISIBLE_DEVICES, GGML_VK_VISIBLE_DEVICES (the Vulkan backend
skips CPU-type devices such as Mesa's lavapipe unless they are named there), ... Run it with
exactly the environment llama-server will get.

Listing costs a backend's initialisation (seconds for CUDA on some machines), so the listing is
cached in the runtime directory (`devices.json`), keyed by the llama-server build (the identity
of the binary and of the ggml backend libraries beside it) and the environment it ran with: a
new build or a changed CUDA_VISIBLE_DEVICES lists again; a reboot clears /run.

Free memory: the cache keeps what each device has in total. What is free changes with every
model that loads, and `--list-devices` shows only what the driver reports at that moment,
which for some drivers (lavapipe, many Vulkan drivers without VK_EXT_memory_budget) is
always the total. So hoshikage takes a device's free memory as its total minus what
hoshikage's own loaded models are estimated to use there (`available()`, with the per-device
estimates of hoshikage_sd.offload.device_estimate()); other processes' use of the device is
not seen. NVML or sysfs (amdgpu's mem_info_vram_used) could see it, per vendor; they are not
used: nothing here has measured them to be better for hoshikage's own models.
"""

from __future__ import annotations

import contextlib
import grp
import hashlib
import json
import os
import re
import stat
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from hoshikage_sd import proc
from hoshikage_sd.errors import die
from hoshikage_sd.files import write_atomic

MiB = 1 << 20

#: the runtime directory's file that keeps the last listing
CACHE_NAME = "devices.json"
CACHE_VERSION = 1
#: listings kept in it (builds x environments: one per distinct model env, typically one)
CACHE_KEEP = 16
#: --list-devices initialises every backend; CUDA on a machine with many GPUs takes seconds
LIST_TIMEOUT = 60.0

#: "  NAME: DESCRIPTION (TOTAL MiB, FREE MiB free)"; the description may hold parentheses
_LINE = re.compile(r"^\s+(?P<name>\S+): (?P<desc>.*) "
                   r"\((?P<total>\d+) MiB, (?P<free>\d+) MiB free\)\s*$")


@dataclass(frozen=True)
class Device:
    """One device as llama-server lists it."""

    name: str           # "Vulkan0", "CUDA1", "ROCm0": what --device takes
    description: str    # "NVIDIA GeForce RTX 4090", "llvmpipe (LLVM 15.0.6, 256 bits)"
    total: int          # bytes
    free: int           # bytes, as the driver said when listed (a cached listing keeps
                        # that moment's): use available() for what hoshikage counts free


def parse_list_devices(text: str) -> list[Device]:
    """The devices in `llama-server --list-devices` output (stdout), in its order. Lines that
    are not a device (the "Available devices:" header, backend chatter) are skipped."""
    devices = []
    for line in text.splitlines():
        match = _LINE.match(line)
        if match:
            devices.append(Device(match["name"], match["desc"], int(match["total"]) * MiB,
                                  int(match["free"]) * MiB))
    return devices


def _run_list(argv: Sequence[str], env: Mapping[str, str], timeout: float) -> list[Device]:
    result = proc.run(argv, check=False, timeout=timeout, env=env)
    if result.returncode != 0 or "Available devices" not in result.stdout:
        detail = (result.stderr or "").strip().splitlines()
        what = f"failed (exit {result.returncode})" if result.returncode else \
            "printed no device list"
        die(f"{' '.join(argv)} {what}" + (f": {detail[-1]}" if detail else ""),
            hint="is it a llama-server build with --list-devices (llama.cpp b4000 or later)?")
    return parse_list_devices(result.stdout)


def build_identity(llama_server: Path) -> list[object]:
    """What changes when the llama-server build does: the binary's and the ggml backend
    libraries' (libggml-*.so beside it, or in ../lib) path, inode, size and mtime."""
    binary = Path(os.path.realpath(llama_server))
    paths = [binary]
    for folder in (binary.parent, binary.parent.parent / "lib"):
        try:
            paths += sorted(p for p in folder.iterdir() if p.name.startswith("libggml"))
        except OSError:
            continue
    ident: list[object] = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            continue
        ident.append([str(path), st.st_ino, st.st_size, st.st_mtime_ns])
    return ident


def cache_key(llama_server: Path, env: Mapping[str, str]) -> str:
    """The build's identity and the environment, as one hash (what devices.json is valid
    for). The whole environment: which of its variables select devices differs by backend
    and driver, and listing again costs little."""
    data = json.dumps([build_identity(llama_server), sorted(env.items())])
    return hashlib.sha256(data.encode()).hexdigest()


def _read_cache(path: Path) -> dict[str, object]:
    """The cached listings by key; {} when absent, of another version or mangled."""
    try:
        data = json.loads(path.read_text())
        if data.get("version") == CACHE_VERSION and isinstance(data.get("listings"), dict):
            return dict(data["listings"])
    except (OSError, ValueError, AttributeError):
        pass
    return {}


def _cached(listings: Mapping[str, object], key: str) -> list[Device] | None:
    try:
        entry = listings[key]
        if not isinstance(entry, dict):
            return None
        return [Device(str(d["name"]), str(d["description"]), int(d["total"]),
                       int(d["free"])) for d in entry["devices"]]
    except (KeyError, TypeError, ValueError):
        return None  # not listed for this key, or mangled: list again


def list_devices(llama_server: Path, env: Mapping[str, str], timeout: float = LIST_TIMEOUT,
                 *, cache_dir: Path | None = None,
                 runner: Sequence[str] = ()) -> list[Device]:
    """The devices `llama_server` sees with `env` (passed to it as is, over proc.py's
    minimal environment), from `cache_dir`/devices.json when it holds a listing for this
    build and environment, else by running `llama_server --list-devices` (and adding the
    listing to the cache where `cache_dir` is given and writable; the last CACHE_KEEP
    builds and environments are kept). `runner` goes before the command: e.g. setpriv's argv
    to run it as the service user (`as_user`). A HoshikageError when it cannot run or
    fails."""
    argv = [*runner, str(llama_server), "--list-devices"]
    key = cache_key(llama_server, {**env, "\0runner": " ".join(runner)})
    path = cache_dir / CACHE_NAME if cache_dir is not None else None
    listings = _read_cache(path) if path is not None else {}
    cached = _cached(listings, key)
    if cached is not None:
        return cached
    devices = _run_list(argv, env, timeout)
    if path is not None:
        listings.pop(key, None)
        # the environment only as part of the key: it may hold secrets (LLAMA_ARG_API_KEY)
        listings[key] = {"llama_server": str(llama_server),
                         "devices": [asdict(d) for d in devices]}
        kept = dict(list(listings.items())[-CACHE_KEEP:])
        # a read-only or foreign runtime directory: list again next time
        with contextlib.suppress(OSError):
            write_atomic(path, json.dumps({"version": CACHE_VERSION, "listings": kept},
                                          indent=1) + "\n", mode=0o640)
    return devices


def as_user(uid: int, gid: int, groups: Iterable[int]) -> list[str]:
    """setpriv's argv that runs a command with this uid, gid and exactly these supplementary
    groups (what systemd gives a unit's User=, Group= and SupplementaryGroups=)."""
    listed = ",".join(str(g) for g in sorted(set(groups))) or "-"
    argv = ["setpriv", f"--reuid={uid}", f"--regid={gid}"]
    argv += ["--clear-groups"] if listed == "-" else [f"--groups={listed}"]
    return [*argv, "--"]


def available(devices: Sequence[Device], used: Mapping[str, int]) -> dict[str, int]:
    """Each device's free memory as hoshikage counts it: its total minus what hoshikage's own
    loaded models are estimated to use there (`used`, by device name); never below 0."""
    return {d.name: max(0, d.total - used.get(d.name, 0)) for d in devices}


def by_name(devices: Sequence[Device], name: str) -> Device:
    """The device `name` (as --device takes it: llama.cpp compares case-insensitively)."""
    for device in devices:
        if device.name.lower() == name.lower():
            return device
    die(f"llama-server has no device {name!r}",
        hint="devices: " + (", ".join(d.name for d in devices) or "none"))



#: GPU device nodes: DRM render and card nodes (AMD, Intel, Vulkan), ROCm's kfd, NVIDIA's
_NODE_GLOBS = ("dri/renderD*", "dri/card*", "kfd", "nvidia*")


def node_problems(user: str, uid: int, gids: Collection[int],
                  dev: Path = Path("/dev")) -> list[str]:
    """Why `user` (uid, all its groups) cannot use this machine's GPU device nodes, with the
    fix; [] where it can or there are none. Mode bits only, as a unit without DeviceAllow=
    sees them (ACLs that logind gives a desktop's seat user do not apply to a service)."""
    refused: dict[str, list[str]] = {}
    for pattern in _NODE_GLOBS:
        for node in sorted(dev.glob(pattern)):
            try:
                st = node.stat()
            except OSError:
                continue
            if stat.S_ISDIR(st.st_mode) or uid == 0:  # /dev/dri/by-path, /dev/nvidia-caps
                continue
            mode = stat.S_IMODE(st.st_mode)
            shift = 6 if st.st_uid == uid else 3 if st.st_gid in gids else 0
            if (mode >> shift) & 6 != 6:
                try:
                    group = grp.getgrgid(st.st_gid).gr_name
                except KeyError:
                    group = str(st.st_gid)
                refused.setdefault(group, []).append(str(node))
    problems = [f"{user} may not open {', '.join(nodes)} (group {group}): give the model units "
                f"the group: systemctl edit hoshikage-model@.service, then [Service] "
                f"SupplementaryGroups={group}" for group, nodes in refused.items()]
    if any(dev.glob("nvidia[0-9]*")) and not (dev / "nvidia-uvm").exists():
        problems.append(f"{dev / 'nvidia-uvm'} is missing (CUDA needs it): the CUDA library "
                        "makes it with the setuid nvidia-modprobe, which the units "
                        "(NoNewPrivileges=) cannot run: make it as root before the models, "
                        "with README's nvidia-uvm.service (nvidia-modprobe -u -c=0; "
                        "Wants= and After= it in hoshikage-model@.service)")
    return problems


def has_nodes(dev: Path = Path("/dev")) -> bool:
    """Does the machine have any GPU device node (/dev/dri, /dev/kfd, /dev/nvidia*)?"""
    return any(any(dev.glob(pattern)) for pattern in _NODE_GLOBS)
