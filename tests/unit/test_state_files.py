"""State files of the wrong shape (issue 14): each is reported with the file's name and what
is wrong, never crashes a reader, and what is good in it survives; a bad stats entry is kept
aside rather than dropped."""

from __future__ import annotations

import json
import logging
import re
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from hoshikage_sd import statefile
from hoshikage_sd.errors import HoshikageError
from hoshikage_sd.manifest import Config, names
from hoshikage_sd.manifest.parse import parse
from hoshikage_sd.policy.rank import ModelStats, Use
from hoshikage_sd.resolve import resolve
from hoshikage_sd.runtime import Activity, Running, Runtime
from hoshikage_sd.stats import StatsFile

GOOD_ENTRY = {"uses": [{"at": 1000.0, "runtime": 60.0}], "total_uses": 1,
              "total_runtime": 60.0, "last_load_seconds": 0.5}


@pytest.fixture(autouse=True)
def fresh_reports() -> None:
    statefile._reported.clear()  # each test sees its own warnings


def warnings_about(caplog: pytest.LogCaptureFixture, path: Path) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and str(path) in r.getMessage()]


# -- stats.json -------------------------------------------------------------------------------

WHOLE_FILE_BAD = [
    ("[]", "expected an object with 'models', found a list"),
    ('{"models": [1]}', "'models' is a list, not an object"),
    ('"text"', "found a string"),
    ("{not json", "not valid JSON"),
    (b"\xff\xfe{}", "not UTF-8"),
]


@pytest.mark.parametrize(("content", "problem"), WHOLE_FILE_BAD)
def test_a_stats_file_of_the_wrong_shape_reads_as_empty_and_is_reported(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, content: str | bytes,
        problem: str) -> None:
    stats = StatsFile(tmp_path)
    raw = content.encode() if isinstance(content, str) else content
    stats.path.write_bytes(raw)
    assert stats.read() == {}
    assert stats.ranks() == {}
    (warning,) = warnings_about(caplog, stats.path)
    assert problem in warning
    stats.read()  # the same file again: not reported again
    assert len(warnings_about(caplog, stats.path)) == 1


@pytest.mark.parametrize(("content", "problem"), WHOLE_FILE_BAD)
def test_a_writer_keeps_a_bad_stats_file_aside_before_writing(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, content: str | bytes,
        problem: str) -> None:
    stats = StatsFile(tmp_path)
    raw = content.encode() if isinstance(content, str) else content
    stats.path.write_bytes(raw)
    stats.record_load("qwen", 1.5)
    (aside,) = tmp_path.glob("stats.json.bad-*")
    assert aside.read_bytes() == raw
    assert list(stats.read()) == ["qwen"]
    assert any(aside.name in w and problem in w for w in warnings_about(caplog, stats.path))


BAD_ENTRIES: list[tuple[Any, str]] = [
    ([1, 2], "expected an object, found a list"),
    ({"uses": "yesterday"}, "'uses' is a string, not a list"),
    ({"uses": [5]}, "use 1 is a number, not an object"),
    ({"uses": [{"runtime": 3}]}, "use 1: 'at' is null"),
    ({"uses": [{"at": "noon"}]}, "use 1: 'at' is a string ('noon')"),
    ({"uses": [{"at": 1.0, "runtime": -4}]}, "use 1: 'runtime' is a number (-4)"),
    ({"uses": [{"at": float("nan")}]}, "use 1: 'at' is a number (nan)"),
    ({"total_uses": "many"}, "'total_uses' is a string"),
    ({"total_uses": True}, "'total_uses' is a boolean"),
    ({"total_runtime": None}, "'total_runtime' is null"),
    ({"last_load_seconds": [1]}, "'last_load_seconds' is a list"),
]


@pytest.mark.parametrize(("entry", "problem"), BAD_ENTRIES)
def test_a_bad_stats_entry_is_reported_and_kept_aside_the_good_survive(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, entry: Any, problem: str) -> None:
    stats = StatsFile(tmp_path)
    stats.path.write_text(json.dumps({"version": 1, "models": {"good": GOOD_ENTRY,
                                                               "bad": entry}}))
    read = stats.read()
    assert list(read) == ["good"]
    assert read["good"] == ModelStats((Use(1000.0, 60.0),), 1, 60.0, 0.5)
    (warning,) = warnings_about(caplog, stats.path)
    assert "model 'bad'" in warning and problem in warning, warning
    stats.record_stop("good", 2000.0)  # a writer: the bad entry goes aside, not away
    (aside,) = tmp_path.glob("stats.json.bad-*")
    assert json.loads(aside.read_text(), parse_constant=str)["models"] == \
        json.loads(json.dumps({"bad": entry}), parse_constant=str)
    written = json.loads(stats.path.read_text())
    assert list(written["models"]) == ["good"]
    assert any(aside.name in w for w in warnings_about(caplog, stats.path))
    stats.record_load("good")  # the file is good now: nothing more goes aside
    assert len(list(tmp_path.glob("stats.json.bad-*"))) == 1


def test_stats_written_by_this_version_read_back(tmp_path: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    stats = StatsFile(tmp_path)
    stats.record_load("a", 2.0)
    stats.record_stop("a", None)
    stats.record_load("a")
    (a,) = stats.read().values()
    assert a.total_uses == 2 and a.uses[0].runtime is not None and a.uses[1].runtime is None
    assert not list(tmp_path.glob("stats.json.bad-*"))
    assert warnings_about(caplog, stats.path) == []


def test_a_partial_name_resolves_with_a_bad_stats_file(tmp_path: Path) -> None:
    """The AttributeError behind issue 14's 503s: ranks come from stats.json (for a name
    that matches several models here, for admission on every cold start)."""
    config = parse(textwrap.dedent(f"""
        state_dir: {tmp_path}
        models:
          qwen3-8b:
            path: /m/a.gguf
          qwen3-14b:
            path: /m/b.gguf
    """), tmp_path / "models.yaml")
    StatsFile(tmp_path).path.write_text("[]")
    assert resolve(config, "qwen3").name == "qwen3-8b"  # type: ignore[union-attr]


# -- names.json -------------------------------------------------------------------------------

@pytest.fixture
def config(tmp_path: Path) -> Config:
    return parse(textwrap.dedent(f"""
        state_dir: {tmp_path}
        models:
          qwen:
            path: /m/q.gguf
          gemma:
            path: /m/g.gguf
    """), tmp_path / "models.yaml")


NAMES_BAD: list[tuple[Any, str, dict[str, str]]] = [
    ([], "expected an object, found a list", {}),
    ({"aliases": "abc"}, "'aliases' is a string, not an object", {}),
    ({"aliases": {"g": "gemma", "x": 3}}, "'aliases': 'x' is a number", {"g": "gemma"}),
    ({"aliases": {"g": "gemma"}, "tags": [1]}, "'tags' is a list", {"g": "gemma"}),
    ({"aliases": {"g": "gemma"}, "removed": "q"}, "'removed' is a string", {"g": "gemma"}),
    ({"aliases": {"g": "gemma"}, "removed": [None]}, "'removed' holds something", {"g": "gemma"}),
    ("{not json", "not valid JSON", {}),
]


@pytest.mark.parametrize(("content", "problem", "aliases"), NAMES_BAD)
def test_a_names_file_of_the_wrong_shape_is_reported_the_rest_applies(
        config: Config, caplog: pytest.LogCaptureFixture, content: Any, problem: str,
        aliases: dict[str, str]) -> None:
    path = names.path(config)
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    effective = names.effective(config)
    assert effective.models.keys() == config.models.keys()
    for alias, target in aliases.items():
        assert resolve(effective, alias).name == target  # type: ignore[union-attr]
    (warning,) = warnings_about(caplog, path)
    assert problem in warning, warning
    assert any(problem in w and str(path) in w for w in effective.warnings)
    names.effective(config)  # per request in the router: reported once
    assert len(warnings_about(caplog, path)) == 1


@pytest.mark.parametrize(("content", "problem", "aliases"), NAMES_BAD)
def test_a_names_file_of_the_wrong_shape_is_not_written_over(
        config: Config, content: Any, problem: str, aliases: dict[str, str]) -> None:
    path = names.path(config)
    raw = content if isinstance(content, str) else json.dumps(content)
    path.write_text(raw)
    with pytest.raises(HoshikageError, match=re.escape(problem)):
        names.set_tag(config, "fast", "qwen")
    assert path.read_text() == raw


# -- runtime records --------------------------------------------------------------------------

RECORDS: list[tuple[str, Any, str]] = [
    ("activity", [], "expected an object, found a list"),
    ("activity", {"in_flight": "2", "last_end": 1.0}, "'in_flight' is a string"),
    ("activity", {"in_flight": 1, "last_end": "late"}, "'last_end' is a string"),
    ("activity", {"in_flight": -1, "last_end": 1.0}, "below zero"),
    ("activity", {"last_end": 1.0}, "'in_flight' is missing"),
    ("activity", {"in_flight": 0, "last_end": 1.0, "x": 1}, "unknown key 'x'"),
    ("running", {"pid": "abc", "staged": "/x", "started": 1.0}, "'pid' is a string"),
    ("running", {"pid": 0, "staged": "/x", "started": 1.0}, "below zero"),
    ("running", {"pid": 12, "staged": None, "started": 1.0}, "'staged' is null"),
    ("running", "{half", "not valid JSON"),
    ("error", {"reason": ["x"]}, "'reason' is a list"),
    ("admitted", {"estimate": True}, "'estimate' is a boolean"),
    ("estimate", {"key": "k", "bytes": 3}, "'key' is a string"),
    ("caching", {"done": 1}, "'total' is missing"),
    ("stop", 7, "found a number"),
]


@pytest.mark.parametrize(("kind", "content", "problem"), RECORDS)
def test_a_runtime_record_of_the_wrong_shape_reads_as_none_and_is_reported(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, kind: str, content: Any,
        problem: str) -> None:
    runtime = Runtime(tmp_path)
    path = tmp_path / kind / "m.json"
    path.parent.mkdir()
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    if kind == "running":
        (tmp_path / "activity").mkdir()
        runtime.set_activity("m", Activity(0, 1.0))
    read = {"activity": runtime.activity, "running": runtime.running, "error": runtime.error,
            "admitted": runtime.admitted, "estimate": runtime.estimate,
            "caching": runtime.caching, "stop": runtime.stop_reason}[kind]
    assert read("m") is None
    # What the router, the idle watch and status ask: never a crash.
    assert runtime.serving("m") is False or kind != "running"
    # (a bad running record beside a good activity record: it served a request ended at 1.0)
    assert runtime.idle_seconds("m", 2.0) == (1.0 if kind == "running" else None) \
        or kind == "activity"
    (warning,) = warnings_about(caplog, path)
    assert problem in warning, warning


def test_runtime_records_written_by_this_version_read_back(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    runtime = Runtime(tmp_path)
    runtime.set_activity("m", Activity(1, 5.0, 42))
    runtime.set_running("m", Running(42, "/mnt/m.gguf", 3.0))
    runtime.set_error("m", "no room")
    runtime.set_admitted("m", 7)
    runtime.set_estimate("m", ["a", 1], 9)
    runtime.set_caching("m", 1, 2)
    runtime.set_stop_reason("m", "idle")
    assert runtime.activity("m") == Activity(1, 5.0, 42)
    assert runtime.running("m") == Running(42, "/mnt/m.gguf", 3.0)
    assert (runtime.error("m"), runtime.admitted("m"), runtime.estimate("m"),
            runtime.caching("m"), runtime.stop_reason("m")) == \
        ("no room", 7, (["a", 1], 9), (1, 2), "idle")
    assert caplog.records == []


def test_an_integral_number_reads_as_a_float_field(tmp_path: Path) -> None:
    """JSON writes 5.0 as 5 in some writers: still a float field's value."""
    value, problem = statefile.record(Activity, {"in_flight": 0, "last_end": 5})
    assert problem is None and value == Activity(0, 5.0) and \
        isinstance(value.last_end, float)  # type: ignore[union-attr]


# -- the manifest's model paths ----------------------------------------------------------------

def test_a_model_path_the_reader_may_not_look_at_is_a_warning_not_a_crash(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A model in a directory the service user may not search took every reader of the
    manifest down with a PermissionError (the router, the units, the CLI)."""
    real = Path.is_file

    def is_file(path: Path) -> bool:
        if path.parent.name == "private":
            raise PermissionError(13, "Permission denied")
        return real(path)
    monkeypatch.setattr(Path, "is_file", is_file)
    (tmp_path / "open").mkdir()
    (tmp_path / "open" / "b.gguf").write_bytes(b"GGUF")
    (tmp_path / "private").mkdir()
    (tmp_path / "private" / "c.gguf").write_bytes(b"GGUF")
    config = parse(textwrap.dedent(f"""
        sources: [{tmp_path / 'open'}, {tmp_path / 'private'}]
        models:
          a:
            path: {tmp_path / 'private' / 'a.gguf'}
    """), tmp_path / "models.yaml")
    assert sorted(config.models) == ["a", "b"]
    assert any("a.gguf cannot be looked at: Permission denied" in w for w in config.warnings)


def test_the_runtime_directory_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    """One rule (protocol.runtime_dir; launch.c mirrors it and tests/unit/test_launch.py runs
    both launchers with a RUNTIME_DIRECTORY of two entries): the first entry, else
    /run/hoshikage."""
    from hoshikage_sd import lastgood, protocol

    monkeypatch.setenv("RUNTIME_DIRECTORY", "/run/a:/run/b")
    assert protocol.runtime_dir("/run/a:/run/b") == "/run/a"
    assert lastgood.path() == "/run/a/manifest.json"
    monkeypatch.delenv("RUNTIME_DIRECTORY")
    assert lastgood.path() == "/run/hoshikage/manifest.json"
    assert protocol.DEFAULT_RUNTIME == "/run/hoshikage"
    assert protocol.runtime_dir(None) == protocol.runtime_dir("") == protocol.DEFAULT_RUNTIME


def test_a_model_its_launcher_started_serves_before_its_activator_adopts_it(
        tmp_path: Path) -> None:
    """/v1/models and /api/ps right after a first answer: the launcher's record says its
    llama-server serves; the running record comes ~0.2 s later, with the adoption."""
    import os

    from hoshikage_sd import protocol

    runtime = Runtime(tmp_path)
    assert not runtime.serving("m")
    protocol.write_launched(str(tmp_path), "m", os.getpid(), 1.0, 1.5)
    assert runtime.serving("m")
    protocol.write_launched(str(tmp_path), "m", 2**22 + 1, 1.0, 1.5)  # no such process
    assert not runtime.serving("m")


@pytest.mark.parametrize("step", [+7200.0, -7200.0])
def test_idle_times_and_kept_copies_do_not_move_with_a_step_of_the_wall_clock(
        tmp_path: Path, step: float) -> None:
    """Records keep both clocks; what is measured (idle, a kept copy's end) is on the boot
    clock. A step of the wall clock (date -s, NTP) after they were written: a forward one
    stopped every model at once, a backward one kept them for as long as the step."""
    import os

    from hoshikage_sd.runtime import boot_clock

    runtime = Runtime(tmp_path)
    now, boot = time.time(), boot_clock()
    # written 5 s ago, before the wall clock stepped by `step`
    runtime.set_running("m", Running(os.getpid(), "/rd/m.gguf", now - step - 30, boot - 30))
    runtime.set_activity("m", Activity(0, now - step - 5, os.getpid(), boot - 5))
    assert runtime.idle_seconds("m", time.time()) == pytest.approx(5, abs=0.5)
    assert runtime.idle_seconds("m", time.time() + 60) == pytest.approx(65, abs=0.5)
    # an older writer's records (no boot clock): the wall clock, as before
    runtime.set_activity("m", Activity(0, time.time() - 5, os.getpid()))
    runtime.set_running("m", Running(os.getpid(), "/rd/m.gguf", time.time() - 30))
    assert runtime.idle_seconds("m", time.time()) == pytest.approx(5, abs=0.5)
    # a kept copy's end: 10 s from now on the boot clock, whatever its wall time says
    runtime.set_kept("k", time.time() + 10)
    record = runtime.dir / "kept" / "k.json"
    kept = json.loads(record.read_text())
    record.write_text(json.dumps({**kept, "until": kept["until"] - step}))
    assert runtime.kept_until("k") == pytest.approx(time.time() + 10, abs=0.5)
