"""The head's side of llama.cpp's RPC: are a model's workers there, does its split fit them.

A model with `rpc: [box2, box3]` is served by llama-server with `--rpc box2:port,box3:port`
(Config.server_argv). llama-server aborts when a worker is down, and waits for ever on one
that accepted the connection but serves another client (a ggml-rpc-server serves one at a
time). So before it is started (admission, in the model unit: admit/act.workers), every
worker is asked, with a deadline, for its version and memory (wire.ask): one that does not
answer is a refusal naming it, which the router answers with a 503, and the next request
tries again. The router never starts such a model from a ticket (admit/needs.device_use).

Each worker's share of the model is what llama.cpp gives it: a `-ts`/`--tensor-split` in the
model's args when it names one proportion per worker, else in proportion to each worker's
free memory (llama.cpp's default split). The share (× safety_margin) must fit what the
worker has free, or the `memory:` the manifest allows it, whichever is less.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from hoshikage_sd.errors import HoshikageError
from hoshikage_sd.fmt import size
from hoshikage_sd.manifest.model import Config, Model, Worker
from hoshikage_sd.rpc import wire

#: seconds for connecting to a worker: about a machine that is down or drops packets
TIMEOUT = 3.0
#: seconds for its answers once connected: a worker socket-activates its ggml-rpc-server on
#: that connection (docs/performance.md "RPC workers"), which a loaded worker machine can
#: make slow; a worker busy with another head is rare (one this head's models hold is not
#: asked: holders)
ANSWER_TIMEOUT = 10.0
#: where the head remembers each loaded model's split ($RUNTIME_DIRECTORY/workers/NAME.json)
RECORDS = "workers"


class WorkerUnavailable(HoshikageError):
    """A worker a model needs did not answer, or cannot take its share."""


@dataclass(frozen=True)
class Share:
    """One worker's part of a model: what it has, what the model will put there."""

    worker: str
    address: str
    free: int   # bytes free on the worker's devices (capped by its `memory:`)
    need: int   # the model's share × safety_margin
    version: str = ""
    holds: int = 0  # the model's share (what the worker holds once it serves)
    devices: int = 0  # how many devices the worker has (rpc/placement.py numbers them)


def tensor_split(args: Sequence[str]) -> list[float] | None:
    """The proportions of the last -ts/--tensor-split in `args` ("3,1" or "3/1")."""
    found = None
    for i, arg in enumerate(args):
        flag, eq, inline = arg.partition("=")
        if flag in ("-ts", "--tensor-split"):
            value = inline if eq else (args[i + 1] if i + 1 < len(args) else "")
            try:
                found = [float(p) for p in value.replace("/", ",").split(",")]
            except ValueError:
                continue
    return found


def shares(estimate: int, margin: float, workers: Sequence[Worker], free: Sequence[int],
           split: Sequence[float] | None = None, versions: Sequence[str] = (),
           counts: Sequence[int] = ()) -> list[Share]:
    """Each worker's share of a model of `estimate` bytes: by `split` when it has one
    proportion per worker, else in proportion to `free` (each capped by the worker's
    `memory:`). Pure: the unit tests' and the simulator's."""
    capped = [f if w.memory is None else min(f, w.memory) for w, f in zip(workers, free,
                                                                          strict=True)]
    weights = list(split) if split and len(split) == len(workers) and sum(split) > 0 \
        else [float(f) for f in free]
    total = sum(weights) or 1.0
    return [Share(w.name, w.address, c, math.ceil(estimate * margin * p / total),
                  versions[i] if i < len(versions) else "", math.ceil(estimate * p / total),
                  counts[i] if i < len(counts) else 0)
            for i, (w, c, p) in enumerate(zip(workers, capped, weights, strict=True))]


def free_of(worker: Worker, answer: wire.Answer) -> int:
    """What the worker has free on the devices the head uses there (its `devices:`), or
    WorkerUnavailable when those name a device it does not list."""
    from hoshikage_sd.rpc import placement

    try:
        chosen = placement.selected(worker, len(answer.devices))
    except placement.UnknownDevice as err:
        raise WorkerUnavailable(str(err), hint=f"on {worker.host}: journalctl -u "
                                "hoshikage-rpc-server lists its devices (Devices:), 0 "
                                "first; or give its ggml-rpc-server -d") from None
    return sum(answer.devices[i].free for i in chosen)


def short(model: str, estimate: int, margin: float, split: Iterable[Share]) -> str | None:
    """Why the split does not fit (the first worker it does not fit), or None."""
    for share in split:
        if share.need > share.free:
            return (f"worker '{share.worker}' ({share.address}) has {size(share.free)} free "
                    f"for '{model}', which needs {size(share.need)} there (its share of "
                    f"{size(estimate)} × {margin:g})")
    return None


def why_unreachable(exc: BaseException, connected: bool) -> str:
    if isinstance(exc, TimeoutError):
        if connected:
            return (f"accepted the connection but did not answer within {ANSWER_TIMEOUT:g} s: "
                    "it may serve another llama-server (a ggml-rpc-server serves one at a "
                    "time), or hang (its journal on that machine: journalctl -u "
                    "hoshikage-rpc-server.service)")
        return (f"did not answer within {TIMEOUT:g} s (down, or a firewall or its "
                "IPAddressAllow= drops this machine's packets)")
    if isinstance(exc, ConnectionRefusedError):
        return "refused the connection (is hoshikage-rpc.socket enabled and listening there?)"
    if isinstance(exc, wire.WireError):
        return str(exc)
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    return str(exc)


#: answers of this admission (asked_once), or why there was none, by worker address;
#: None outside one
_asked: dict[str, wire.Answer | WorkerUnavailable] | None = None


@contextlib.contextmanager
def asked_once() -> Iterator[None]:
    """Within: each worker is asked once and its answer reused. One admission asks twice
    otherwise: for the head's share of the split (admit/needs.split_share), then for the
    fit (admit), a few ms apart and under the admission lock; one that is down would be
    waited for twice."""
    global _asked
    outer, _asked = _asked, {} if _asked is None else _asked
    try:
        yield
    finally:
        _asked = outer


def ask(worker: Worker, timeout: float = TIMEOUT,
        answer_timeout: float = ANSWER_TIMEOUT) -> wire.Answer:
    """The worker's answer, or WorkerUnavailable saying why (by name and address)."""
    answer = _asked.get(worker.address) if _asked is not None else None
    if answer is None:
        try:
            answer = ask_anew(worker, timeout, answer_timeout)
        except WorkerUnavailable as exc:
            answer = exc  # a worker that is down is waited for once
        if _asked is not None:
            _asked[worker.address] = answer
    if isinstance(answer, WorkerUnavailable):
        raise answer
    return answer


def ask_anew(worker: Worker, timeout: float, answer_timeout: float) -> wire.Answer:
    import socket
    import time

    connected = False
    try:
        with socket.create_connection((worker.host, worker.port), timeout=timeout) as sock:
            connected = True  # refused or unreachable fails above; busy waits below
            return wire.ask_on(sock, time.monotonic() + answer_timeout)
    except (OSError, wire.WireError) as exc:
        raise WorkerUnavailable(
            f"worker '{worker.name}' ({worker.address}) is unavailable: "
            f"{why_unreachable(exc, connected)}",
            hint=f"on {worker.host}: systemctl status hoshikage-rpc.socket; "
                 "the model loads again once every worker answers") from None


def down(worker: Worker, timeout: float = TIMEOUT) -> str | None:
    """Why the worker cannot be reached (refused, unreachable, silent past `timeout`), in
    ask's words; None when it takes a connection. For a reply cut short: only the connection
    is tried, since a worker still finishing with the dead llama-server's would not answer
    HELLO at once and read as busy, not down."""
    import socket

    try:
        socket.create_connection((worker.host, worker.port), timeout=timeout).close()
    except OSError as exc:
        return (f"worker '{worker.name}' ({worker.address}) is unavailable: "
                f"{why_unreachable(exc, False)}")
    return None


def holders(config: Config, model: Model, up: Iterable[str]) -> dict[str, str]:
    """The models of this head that are up and share a worker with `model` (the worker
    serves one llama-server at a time): model -> the first worker they share."""
    out = {}
    for name in up:
        other = config.models.get(name)
        if other is not None and name != model.name:
            common = [w for w in model.rpc if w in other.rpc]
            if common:
                out[name] = common[0]
    return out


def busy_with(config: Config, model: Model, up: Iterable[str]) -> str | None:
    """Why `model` cannot have its workers now: another model of ours holds one."""
    for name, worker in holders(config, model, up).items():
        return (f"worker '{worker}' ({config.workers[worker].address}) serves '{name}' now, "
                "and a ggml-rpc-server serves one llama-server at a time")
    return None


def admit(config: Config, model: Model, estimate: int, up: Iterable[str] = ()) -> list[Share]:
    """Ask each of the model's workers, and check its share fits: the split, or
    WorkerUnavailable naming the worker and why. Records the split for status."""
    if (busy := busy_with(config, model, up)) is not None:
        raise WorkerUnavailable(f"cannot load '{model.name}': {busy}, busy or pinned",
                                hint="try again once it is idle, or give each model workers "
                                     "of its own")
    workers = [config.workers[w] for w in model.rpc]
    answers = [ask(w) for w in workers]
    free = [free_of(w, a) for w, a in zip(workers, answers, strict=True)]
    split = shares(estimate, config.safety_margin, workers, free,
                   tensor_split(model.effective_args),
                   [".".join(map(str, a.version)) for a in answers],
                   [len(a.devices) for a in answers])
    problem = short(model.name, estimate, config.safety_margin, split)
    if problem is not None:
        raise WorkerUnavailable(f"cannot load '{model.name}': {problem}",
                                hint="a worker with more memory, another split (-ts), or "
                                     "more workers in its rpc:")
    remember(config.runtime_dir, model.name, split)
    return split


# ---- what status shows ------------------------------------------------------------------

def record_path(runtime_dir: Path, name: str) -> Path:
    return runtime_dir / RECORDS / f"{name}.json"


def remember(runtime_dir: Path, name: str, split: Sequence[Share]) -> None:
    """Keep the split of a model being loaded: status and /metrics show it while it runs."""
    from hoshikage_sd.files import write_atomic

    with contextlib.suppress(OSError):
        write_atomic(record_path(runtime_dir, name),
                     json.dumps([asdict(s) for s in split]), mode=0o644)


def remembered(runtime_dir: Path, name: str) -> list[Share]:
    try:
        data = json.loads(record_path(runtime_dir, name).read_text())
        return [Share(**item) for item in data]
    except (OSError, ValueError, TypeError):
        return []


def devices_recorded(config: Config, model: Model) -> list[str]:
    """placement.for_model with the device counts the workers gave this model's admission
    (its record); UnknownDevice as there."""
    from hoshikage_sd.rpc import placement

    counts = {s.worker: s.devices for s in remembered(config.runtime_dir, model.name)}
    return placement.for_model(config, model, counts)


def status(config: Config, loaded: Iterable[str]) -> list[dict[str, Any]]:
    """Each worker of the manifest: its address, the models split over it, the loaded ones
    among them and what each holds there (admission's share, without the margin's part)."""
    loaded = set(loaded)
    out = []
    for worker in config.workers.values():
        users = [m.name for m in config.models.values() if worker.name in m.rpc]
        holds = {}
        for name in users:
            if name in loaded:
                for share in remembered(config.runtime_dir, name):
                    if share.worker == worker.name:
                        holds[name] = share.holds
        out.append({"name": worker.name, "address": worker.address,
                    "memory_bytes": worker.memory, "models": users,
                    "loaded": sorted(holds), "held_bytes": holds})
    return out


def describe(workers: Mapping[str, Worker], model: Model) -> str:
    """'box2, box3' for a model's workers (status's text)."""
    return ", ".join(f"{w} ({workers[w].address})" for w in model.rpc if w in workers)


def forget(runtime_dir: Path, name: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(record_path(runtime_dir, name))
