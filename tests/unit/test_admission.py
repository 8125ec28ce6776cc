"""The admission decision: a pure function of a snapshot of the machine and a request."""

from __future__ import annotations

import ast
from collections.abc import Mapping, Sequence
from pathlib import Path

from hoshikage_sd.policy import admission
from hoshikage_sd.policy.admission import (
    Decision,
    Limits,
    Request,
    Resident,
    Snapshot,
    Verdict,
)

GiB = 1 << 30
POLICY = Path(admission.__file__).parent


def gib(x: float) -> int:
    return int(x * GiB)


def decide(name: str, estimate: int, available: int, residents: Sequence[Resident] = (), *,
           margin: float = 1.2, max_loaded: int | None = None, floor: int = 0,
           budget: int | None = None, device_need: Mapping[str, int] | None = None,
           device_total: Mapping[str, int] | None = None,
           workers: frozenset[str] = frozenset()) -> Decision:
    """The decision for `name` on a machine with `available` bytes of MemAvailable."""
    snapshot = Snapshot(tuple(residents), available, device_total or {},
                        Limits(margin, max_loaded, floor, budget))
    return admission.decide(snapshot, Request(name, estimate, device_need or {}, workers))


def test_case_1_nothing_loaded_small_model_loads() -> None:
    d = decide("gemma", gib(1.4), gib(25.5), [])
    assert d.verdict is Verdict.LOAD and d.victims == ()
    assert d.needed == gib(1.68)


def test_case_2_both_fit() -> None:
    d = decide("qwen", gib(9.0), gib(25.5), [Resident("gemma", gib(2.0), idle=30.0)])
    assert d.verdict is Verdict.LOAD and d.victims == ()


def test_case_3_idle_model_is_stopped_first() -> None:
    loaded = Resident("qwen3-8b", gib(5.7), idle=14 * 60)
    d = decide("big", gib(19.0), gib(18.0), [loaded])
    assert d.verdict is Verdict.EVICT
    assert d.victims == (loaded,)
    assert d.message == ("available 18.0 GiB < needed 22.8 GiB (19.0 GiB × 1.2): "
                         "stopping qwen3-8b (5.7 GiB, idle 14 min)")


def test_busy_model_is_never_a_victim_the_request_waits() -> None:
    busy = Resident("qwen3-8b", gib(5.7), idle=None)
    d = decide("big", gib(19.0), gib(18.0), [busy])
    assert d.verdict is Verdict.WAIT and d.victims == ()
    assert "waiting for busy qwen3-8b" in d.message


def test_pinned_model_survives_and_the_request_is_rejected() -> None:
    pinned = Resident("tool", gib(5.7), idle=3600, pinned=True)
    d = decide("big", gib(19.0), gib(18.0), [pinned])
    assert d.verdict is Verdict.REJECT
    assert "tool pinned" in d.message


def test_a_model_that_can_never_fit_is_rejected() -> None:
    d = decide("huge", gib(40.0), gib(18.0), [Resident("a", gib(5.0), idle=10)])
    assert d.verdict is Verdict.REJECT
    assert "huge cannot fit: needed 48.0 GiB (40.0 GiB × 1.2), but at most 23.0 GiB" in d.message


def test_victims_least_recently_used_first_and_only_as_many_as_needed() -> None:
    old = Resident("old", gib(4.0), idle=600, last_used=100.0)
    new = Resident("new", gib(4.0), idle=5, last_used=900.0)
    d = decide("x", gib(10.0), gib(9.0), [new, old])
    assert d.verdict is Verdict.EVICT and d.victims == (old,)
    d = decide("x", gib(13.0), gib(9.0), [new, old])
    assert d.victims == (old, new)


def test_equal_use_cheaper_to_reload_goes_first() -> None:
    small = Resident("small", gib(2.0), idle=60, last_used=100.0)
    large = Resident("large", gib(8.0), idle=60, last_used=100.0)
    d = decide("x", gib(5.0), gib(5.0), [large, small])
    assert d.victims == (small,)


def test_max_loaded_models_evicts_to_make_a_slot() -> None:
    a = Resident("a", gib(1.0), idle=60, last_used=1.0)
    b = Resident("b", gib(1.0), idle=60, last_used=2.0)
    d = decide("c", gib(1.0), gib(100.0), [a, b], max_loaded=2)
    assert d.verdict is Verdict.EVICT and d.victims == (a,)
    assert "2 models loaded, max_loaded_models is 2" in d.message


def test_floor_protects_small_models() -> None:
    tiny = Resident("tiny", gib(0.3), idle=9999)
    d = decide("x", gib(10.0), gib(12.0) - 1, [tiny], floor=gib(0.5))
    assert d.verdict is Verdict.REJECT and "tiny pinned or below evict_floor" in d.message


def test_restarting_model_does_not_count_itself() -> None:
    d = decide("a", gib(1.0), gib(2.0), [Resident("a", gib(1.0), idle=None)], max_loaded=1)
    assert d.verdict is Verdict.LOAD


# -- GPU devices: a model that does not fit a device makes room there as in RAM --------------

def on_gpu(name: str, gpu: float, idle: float | None = 60.0, ram: float = 0.1,
           **kw: object) -> Resident:
    return Resident(name, gib(ram), idle, devices={"Vulkan0": gib(gpu)}, **kw)  # type: ignore[arg-type]


def device_decide(residents: list[Resident], need: float, total: float = 2.0,
                  **kw: object) -> Decision:
    return decide("new", gib(0.1), gib(20), residents, margin=1.0,
                  device_need={"Vulkan0": gib(need)},
                  device_total={"Vulkan0": gib(total)}, **kw)  # type: ignore[arg-type]


def test_a_model_that_fits_the_device_loads() -> None:
    d = device_decide([on_gpu("a", 0.8)], need=0.8)
    assert d.verdict is Verdict.LOAD and "Vulkan0 free 1.2 GiB" in d.message


def test_a_device_full_of_an_idle_model_evicts_it_though_ram_is_plentiful() -> None:
    d = device_decide([on_gpu("a", 1.5), Resident("cpu-only", gib(4), 900.0)], need=0.9)
    assert d.verdict is Verdict.EVICT
    assert [v.name for v in d.victims] == ["a"]  # not the CPU model, which frees no VRAM
    assert d.devices_short == ("Vulkan0",) and "Vulkan0 free 512.0 MiB < needed" in d.message


def test_a_busy_model_on_the_device_makes_it_wait() -> None:
    d = device_decide([on_gpu("a", 1.5, idle=None)], need=0.9)
    assert d.verdict is Verdict.WAIT and "waiting for busy a" in d.message


def test_a_pinned_model_on_the_device_makes_it_a_refusal_with_the_numbers() -> None:
    d = device_decide([on_gpu("a", 1.5, pinned=True)], need=0.9)
    assert d.verdict is Verdict.REJECT
    assert "needed 921.6 MiB on Vulkan0, but at most 512.0 MiB can be freed" in d.message
    assert "a pinned" in d.message


def test_a_model_larger_than_the_device_is_refused_at_once() -> None:
    d = device_decide([], need=2.5)
    assert d.verdict is Verdict.REJECT
    assert "needed 2.5 GiB on Vulkan0, which has 2.0 GiB in all" in d.message


def test_the_margin_applies_to_devices_too() -> None:
    residents = [on_gpu("a", 0.9)]

    def verdict(margin: float) -> Verdict:
        return decide("new", gib(0.1), gib(20), residents, margin=margin,
                      device_need={"Vulkan0": gib(1.0)},
                      device_total={"Vulkan0": gib(2)}).verdict

    assert verdict(1.0) is Verdict.LOAD   # 1.0 GiB of 1.1 free
    assert verdict(1.2) is Verdict.EVICT  # 1.2 GiB of 1.1 free


def test_a_device_refusal_counts_as_memory() -> None:
    assert device_decide([], need=2.5).refusal == "memory"
    assert device_decide([on_gpu("a", 1.5, pinned=True)], need=0.9).refusal == "memory"


# -- what is free: MemAvailable less what starting models will take, within memory_budget ----

def test_a_starting_model_promised_memory_is_not_free() -> None:
    starting = Resident("coming", gib(4.0), idle=None, starting=True)
    d = decide("x", gib(5.0), gib(10.0), [starting], margin=1.0)
    assert d.available == gib(6.0) and d.verdict is Verdict.LOAD
    d = decide("x", gib(7.0), gib(10.0), [starting], margin=1.0)
    assert d.verdict is Verdict.WAIT and "waiting for busy coming" in d.message


def test_memory_budget_caps_what_all_models_hold() -> None:
    loaded = Resident("a", gib(6.0), idle=60)
    d = decide("x", gib(3.0), gib(100.0), [loaded], margin=1.0, budget=gib(8.0))
    assert d.available == gib(2.0)
    assert d.verdict is Verdict.EVICT and d.victims == (loaded,)
    assert not d.by_count  # its memory is what x needs: x waits for it to stop


def test_only_a_place_lacking_evicts_by_count() -> None:
    a = Resident("a", gib(1.0), idle=60)
    d = decide("b", gib(1.0), gib(100.0), [a], max_loaded=1)
    assert d.verdict is Verdict.EVICT and d.by_count and d.refusal is None
    d = decide("b", gib(1.0), gib(1.0), [a], max_loaded=1)
    assert d.verdict is Verdict.EVICT and not d.by_count


def test_a_refusal_says_why_in_one_word() -> None:
    assert decide("huge", gib(40.0), gib(18.0)).refusal == "memory"
    pinned = Resident("p", gib(1.0), idle=60, pinned=True)
    by_count = decide("c", gib(1.0), gib(100.0), [pinned], max_loaded=1)
    assert by_count.refusal == "max_loaded_models"
    assert by_count.message == ("c cannot load: max_loaded_models is reached by models that "
                                "stay (p pinned or below evict_floor)")  # not "cannot fit"
    assert decide("c", gib(1.0), gib(100.0)).refusal is None


# -- RPC workers: a worker serves one llama-server at a time ----------------------------------

W2 = frozenset({"w2"})


def test_an_idle_model_on_a_worker_it_needs_is_stopped_though_ram_is_plentiful() -> None:
    holder = Resident("split", gib(1.0), idle=60, workers=W2)
    other = Resident("other", gib(1.0), idle=600, last_used=0.0)
    d = decide("new", gib(1.0), gib(100.0), [other, holder], workers=frozenset({"w2", "w3"}))
    assert d.verdict is Verdict.EVICT and d.victims == (holder,)  # not `other`
    assert not d.by_count  # the worker is free only once it has stopped: wait for it
    assert "worker 'w2' serves 'split' now: stopping split" in d.message


def test_a_busy_model_on_the_worker_makes_it_wait() -> None:
    d = decide("new", gib(1.0), gib(100.0), [Resident("split", gib(1.0), None, workers=W2)],
               workers=W2)
    assert d.verdict is Verdict.WAIT and "waiting for busy split" in d.message


def test_a_pinned_model_on_the_worker_is_a_refusal_naming_both() -> None:
    pinned = Resident("split", gib(1.0), idle=60, pinned=True, workers=W2)
    d = decide("new", gib(1.0), gib(100.0), [pinned], workers=W2)
    assert d.verdict is Verdict.REJECT and d.refusal == "rpc_worker"
    assert d.message == "new cannot load: worker 'w2' serves 'split' now (split pinned or " \
                        "below evict_floor)"


def test_models_on_other_workers_stay() -> None:
    d = decide("new", gib(1.0), gib(100.0), [Resident("a", gib(1.0), 60, workers=W2)],
               workers=frozenset({"w3"}))
    assert d.verdict is Verdict.LOAD


# -- pure: nothing in the decision reads or writes the machine --------------------------------

#: what policy/'s modules may import: the standard library's plain data modules, numbers'
#: formatting, the manifest's dataclasses, and each other
MAY_IMPORT = {"__future__", "math", "collections.abc", "dataclasses", "enum",
              "hoshikage_sd.fmt", "hoshikage_sd.manifest.model", "hoshikage_sd.policy.rank",
              "hoshikage_sd.policy.admission"}


def test_the_decisions_import_nothing_that_reads_the_machine() -> None:
    for path in POLICY.glob("*.py"):
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                found.add(node.module if node.module != "hoshikage_sd"
                          else f"hoshikage_sd.{node.names[0].name}")
        assert found <= MAY_IMPORT, (path.name, found - MAY_IMPORT)
