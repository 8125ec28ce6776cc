"""`hoshikage simulate SCENARIO`: replay a scenario through the real rank and cache policy.

A scenario is a small YAML file: models with sizes and usage given as offsets from the
scenario's t=0, the cache's limits, and the times ("steps") at which the policy runs. Each step
builds the same `Candidate`s that `hoshikage cache-sync` builds and hands them to
`rank.rank` and `rank.plan_cache`, so what it prints is what the machine would decide. Nothing
of the policy lives here.

Each step applies its decisions before the next: copy puts the model in the cache (disk_free
shrinks), expire takes it out (disk_free grows); copies finish at once. A step in `expect:`
must match exactly: an action that is not listed is expected for no model, and a model in no
list is expected to get no decision. A step that differs makes the command exit 1, which is
what makes the built-in scenarios (hoshikage_sd/commands/scenarios/*.yaml) tests.

scenario.py reads the scenario file; this module replays it and prints what happens.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TextIO, TypeVar

from hoshikage_sd import fmt
from hoshikage_sd.commands.scenario import (
    ACTIONS,
    DEFAULT_RUNTIME,
    MAX_REPEAT,
    MODEL_KEYS,
    TOP_KEYS,
    UNLIMITED,
    USE_KEYS,
    Scenario,
    ScenarioError,
    SimModel,
    SimUse,
    Step,
    builtin_names,
    builtins,
    load,
    parse,
    parse_offset,
    scenario_dir,
    span,
)
from hoshikage_sd.errors import HoshikageError
from hoshikage_sd.policy.cacheplan import Action, Decision, Holding, cache_state, plan_cache
from hoshikage_sd.policy.rank import ModelStats

T = TypeVar("T")

# t=0 on the wall clock. plan_cache reads "never used" as last used at 0.0, the Unix epoch;
# with a real date for t=0 that means decades unused, as on the machine, not "used at t=0".
EPOCH = 1_750_000_000.0

_COLOURS = {Action.KEEP: "32", Action.COPY: "33", Action.EXPIRE: "31", Action.SKIP: "2"}
_DIM, _RED = "2", "31"


@dataclass(frozen=True)
class StepResult:
    step: Step
    used: int                        # bytes in the cache when the policy ran
    free: int                        # bytes free on its disk then
    decisions: tuple[Decision, ...]
    ranks: Mapping[str, float]       # every model's rank, decided on or not
    busy: frozenset[str]
    checked: bool                    # the step is in expect:
    mismatches: tuple[str, ...]


# -- replaying --------------------------------------------------------------------------------
def stats_at(model: SimModel, now: float) -> tuple[ModelStats, bool]:
    """The stats file's record of the model at `now`, and whether the model is loaded then.

    Built with the same with_load/with_stop the units call, so the 100-use window and the
    "no runtime while running" convention are the real ones.
    """
    stats, busy = ModelStats(), False
    for use in model.uses:
        start = EPOCH + use.at
        if start > now:
            break
        stats = stats.with_load(start)
        if start + use.runtime > now:
            busy = True
        elif not use.crashed:
            stats = stats.with_stop(start + use.runtime)
    return stats, busy


def replay(scenario: Scenario) -> list[StepResult]:
    cached = {m.name for m in scenario.models if m.cached}
    free = scenario.disk_free
    results = []
    for step in scenario.steps:
        now = EPOCH + step.at
        stats, busy = {}, set()
        for model in scenario.models:
            stats[model.name], loaded = stats_at(model, now)
            if loaded:
                busy.add(model.name)
        state = cache_state((Holding(m.name, m.size, m.name in cached, m.fast, m.pinned)
                             for m in scenario.models), stats, busy, free, now,
                            scenario.weights)
        decisions = tuple(plan_cache(state, scenario.policy, now))
        ranks = {c.name: c.rank for c in state.candidates}
        expected = scenario.expect.get(step.at)
        results.append(StepResult(step, state.used, free, decisions, ranks, frozenset(busy),
                                  expected is not None, compare(expected, decisions)))
        for d in decisions:
            if d.action is Action.COPY:
                cached.add(d.name)
                free -= d.size
            elif d.action is Action.EXPIRE:
                cached.discard(d.name)
                free += d.size
    return results


def compare(expected: Mapping[str, frozenset[str]] | None,
            decisions: Sequence[Decision]) -> tuple[str, ...]:
    if expected is None:
        return ()
    out = []
    for action in ACTIONS:
        want = expected.get(action, frozenset())
        got = [d.name for d in decisions if d.action.value == action]
        if want != set(got):
            out.append(f"{action}: expected [{', '.join(sorted(want))}], "
                       f"got [{', '.join(got)}]")
    return tuple(out)


# -- output -----------------------------------------------------------------------------------
def _limit(n: int) -> str:
    return "unlimited" if n >= UNLIMITED else fmt.size(n)


def render_text(scenario: Scenario, results: Sequence[StepResult], colour: bool) -> str:
    p = scenario.policy
    lines = [f"{scenario.name}: {scenario.description}" if scenario.description
             else scenario.name,
             f"cache: max size {_limit(p.max_size) if p.max_size is not None else 'unlimited'}, "
             f"min free {fmt.size(p.min_free)}, expire after {span(p.expire_after)}, "
             f"min rank {p.min_rank:.1f}"]
    width = max((len(m.name) for m in scenario.models), default=0)
    pinned = {m.name for m in scenario.models if m.pinned}
    for r in results:
        lines += ["", f"step {r.step.label}: the cache holds {fmt.size(r.used)}; "
                      f"free on its disk: {_limit(r.free)}"]
        decided = set()
        for d in r.decisions:
            decided.add(d.name)
            word = fmt.paint(f"{d.action.value:<6}", _COLOURS[d.action], colour)
            # Why a low-ranked model stays: the flags plan_cache was given.
            tags = "".join(f" [{t}]" for t, on in (("loaded", d.name in r.busy),
                                                   ("pinned", d.name in pinned)) if on)
            lines.append(f"  {word}  {d.name:<{width}}  {fmt.size(d.size):>10}  "
                         f"rank {d.rank:7.1f}  {d.reason}{tags}")
        for m in scenario.models:
            if m.name not in decided:
                facts = ["loaded" if m.name in r.busy else "",
                         "source on the cache's disk" if m.fast else "not cached"]
                line = (f"  {'-':<6}  {m.name:<{width}}  {fmt.size(m.size):>10}  "
                        f"rank {r.ranks[m.name]:7.1f}  no decision "
                        f"({', '.join(f for f in facts if f)})")
                lines.append(fmt.paint(line, _DIM, colour))
        lines += [fmt.paint(f"  differs from expect: {m}", _RED, colour) for m in r.mismatches]
    checked = [r for r in results if r.checked]
    if checked:
        bad = sum(1 for r in checked if r.mismatches)
        lines += ["", fmt.paint(f"expect: {bad} of {len(checked)} checked step(s) differ", _RED,
                             colour) if bad
                  else f"expect: all {len(checked)} checked step(s) match"]
    return "\n".join(lines) + "\n"


def render_json(scenario: Scenario, results: Sequence[StepResult]) -> str:
    doc = {
        "scenario": scenario.name,
        "description": scenario.description,
        "ok": not any(r.mismatches for r in results),
        "steps": [{
            "at": r.step.label,
            "seconds": r.step.at,
            "cache_used": r.used,
            "disk_free": None if r.free >= UNLIMITED else r.free,
            "decisions": [{"action": d.action.value, "name": d.name, "rank": d.rank,
                           "size": d.size, "reason": d.reason} for d in r.decisions],
            "ranks": dict(r.ranks),
            "loaded": sorted(r.busy),
            "checked": r.checked,
            "mismatches": list(r.mismatches),
        } for r in results],
    }
    return json.dumps(doc, indent=2) + "\n"


def main(spec: str | None, as_json: bool = False, list_only: bool = False,
         out: TextIO | None = None) -> int:
    out = out or sys.stdout
    if list_only:
        found = builtins()
        if as_json:
            out.write(json.dumps(found, indent=2) + "\n")
        else:
            width = max(map(len, found), default=0)
            out.writelines(f"{name:<{width}}  {text}\n" for name, text in found.items())
        return 0
    if not spec:
        raise HoshikageError("simulate needs a SCENARIO: a built-in name or a file",
                             hint="'hoshikage simulate --list' names the built-ins", code=2)
    scenario = load(spec)
    results = replay(scenario)
    out.write(render_json(scenario, results) if as_json
              else render_text(scenario, results, fmt.use_colour(out)))
    out.flush()
    bad = [r for r in results if r.mismatches]
    if bad:
        raise HoshikageError(f"scenario {scenario.name} differs from its expect: "
                             + "; ".join(f"step {r.step.label}: {', '.join(r.mismatches)}"
                                         for r in bad))
    return 0


# simulate.X keeps working for every X it had before scenario.py was split out
__all__ = [
    "ACTIONS",
    "DEFAULT_RUNTIME",
    "EPOCH",
    "MAX_REPEAT",
    "MODEL_KEYS",
    "TOP_KEYS",
    "UNLIMITED",
    "USE_KEYS",
    "Scenario",
    "ScenarioError",
    "SimModel",
    "SimUse",
    "Step",
    "StepResult",
    "T",
    "builtin_names",
    "builtins",
    "compare",
    "load",
    "main",
    "parse",
    "parse_offset",
    "render_json",
    "render_text",
    "replay",
    "scenario_dir",
    "span",
    "stats_at",
]
