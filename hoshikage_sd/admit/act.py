"""A Decision carried out: its journal record and counts, the evictions, the RPC workers
asked. Hold the admission lock."""

from __future__ import annotations

import contextlib
import logging

from hoshikage_sd import log, metrics
from hoshikage_sd.manifest import Config, Model
from hoshikage_sd.policy.admission import Decision, Snapshot, Verdict
from hoshikage_sd.runtime import Runtime
from hoshikage_sd.sd import units


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
        if decision.refusal is not None:
            counts.count("hoshikage_refusals_total", model=name, reason=decision.refusal)


def evict(name: str, decision: Decision, runtime: Runtime, counts: metrics.Counts,
          wait: bool) -> None:
    """Stop the decision's victims for `name`; with `wait`, return once they are down (their
    memory, or their RPC worker, is what `name` needs)."""
    for victim in decision.victims:
        counts.count("hoshikage_evictions_total", model=victim.name, reason="admission")
        runtime.set_stop_reason(victim.name, f"evicted for {name}")
        if decision.by_count:
            runtime.set_keep_copy(victim.name)
        unit = units.model_unit(victim.name)
        if wait:
            units.systemctl("stop", unit, check=False)
        else:
            units.stop_unit(unit)


def asking_workers_once(model: Model) -> contextlib.AbstractContextManager[None]:
    """Around one admission of `model`: a model split over RPC workers asks each of them
    once (rpc/workers.asked_once)."""
    if not model.rpc:
        return contextlib.nullcontext()
    from hoshikage_sd.rpc import workers

    return workers.asked_once()


def workers(config: Config, model: Model, estimate: int, decision: Decision,
            snapshot: Snapshot) -> None:
    """A model split over RPC workers: ask each (rpc/workers.admit), once the models that
    held one have stopped; WorkerUnavailable names one that does not answer or lacks room.
    Any other model: no split to show from an earlier load with rpc:."""
    if not (model.rpc or config.workers):
        return
    from hoshikage_sd.rpc import workers

    if not model.rpc:
        workers.forget(config.runtime_dir, model.name)
        return
    stopped = {v.name for v in decision.victims}
    up = [r.name for r in snapshot.residents if r.name not in stopped]
    workers.admit(config, model, estimate, up)
