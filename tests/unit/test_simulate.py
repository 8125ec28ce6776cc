"""hoshikage_sd.commands.simulate: scenarios replayed through the real rank and cache policy."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from hoshikage_sd import cli
from hoshikage_sd.commands import simulate
from hoshikage_sd.commands.simulate import ScenarioError
from hoshikage_sd.errors import HoshikageError
from testbed import REPO_ROOT

BUILTINS = simulate.builtin_names()
ESC = "\033["


class Tty(io.StringIO):
    """A stdout that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def write(tmp_path: Path, text: str, name: str = "scenario.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "JOURNAL_STREAM")}
    env["HOSHIKAGE_CONFIG"] = str(cwd / "no" / "such" / "models.yaml")
    return subprocess.run([sys.executable, "-m", "hoshikage_sd", "simulate", *args], cwd=cwd,
                          env=env, text=True, capture_output=True, timeout=60, check=False)


SMALL = """
    description: one model wants in, one is old
    cache: {max_size: 8G}
    models:
      old: {size: 8G, cached: true, uses: [-30d]}
      new: {size: 8G, uses: [-1d, -1h]}
    steps: [0s]
    """


def test_the_built_ins_are_there_with_descriptions() -> None:
    assert {"old-vs-new", "full-ssd", "pinned", "once-long-ago", "runtime-weighting",
            "loaded-model"} <= set(BUILTINS)
    found = simulate.builtins()
    assert all(found[name] for name in BUILTINS)


@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_scenario_matches_its_expect(name: str) -> None:
    scenario = simulate.load(name)
    assert scenario.expect, f"{name} has no expect: it would test nothing"
    out = io.StringIO()
    assert simulate.main(name, out=out) == 0  # the CLI's path: raises when a step differs
    results = simulate.replay(scenario)
    assert all(r.checked for r in results), "every step of a built-in is checked"
    assert not [m for r in results for m in r.mismatches]
    assert "differs" not in out.getvalue()


def test_decisions_come_from_the_real_policy() -> None:
    """Spot-check one step by hand against the formula in rank.Weights."""
    results = simulate.replay(simulate.load("pinned"))
    first = {d.name: d for d in results[0].decisions}
    assert first["pinned-old"].action.value == "keep"
    # one use 90 days ago: total 0.5 − age 2 × 90 days, plus a minute of runtime long ago
    assert first["pinned-old"].rank == pytest.approx(0.5 - 2 * (90 - 60 / 86400))
    assert "makes room for new" in first["unpinned-old"].reason


def test_copies_and_expiries_carry_over_to_the_next_step(tmp_path: Path) -> None:
    path = write(tmp_path, SMALL.replace("steps: [0s]", "steps: [0s, 1d]"))
    first, second = simulate.replay(simulate.load(str(path)))
    assert [(d.action.value, d.name) for d in first.decisions] == \
        [("expire", "old"), ("copy", "new")]
    assert [(d.action.value, d.name) for d in second.decisions] == [("keep", "new")]
    assert second.used == 8 << 30


def test_future_uses_count_once_their_time_comes_and_running_ones_are_loaded(
        tmp_path: Path) -> None:
    path = write(tmp_path, """
        cache: {max_size: 8G}
        models:
          later: {size: 8G, cached: true, uses: [{at: 2d, runtime: 1d}]}
        steps: [0s, 2d12h, 4d]
        """)
    before, during, after = simulate.replay(simulate.load(str(path)))
    assert before.ranks["later"] == 0.0 and not before.busy
    assert during.busy == {"later"} and during.ranks["later"] > 0
    assert not after.busy


def test_json_output_parses_and_carries_each_decisions_rank() -> None:
    out = Tty()  # --json never colours, even on a terminal
    assert simulate.main("old-vs-new", as_json=True, out=out) == 0
    assert ESC not in out.getvalue()
    doc = json.loads(out.getvalue())
    assert doc["scenario"] == "old-vs-new" and doc["ok"] is True
    decisions = doc["steps"][0]["decisions"]
    assert {d["action"] for d in decisions} == {"expire", "copy"}
    for d in decisions:
        assert set(d) == {"action", "name", "rank", "size", "reason"}
        assert isinstance(d["rank"], float) and d["rank"] == doc["steps"][0]["ranks"][d["name"]]
    assert doc["steps"][1]["at"] == "7d"


def test_text_output_shows_action_model_size_rank_and_reason() -> None:
    out = io.StringIO()
    simulate.main("runtime-weighting", out=out)
    line = next(x for x in out.getvalue().splitlines() if x.strip().startswith("copy"))
    assert "long-runner" in line and "8.0 GiB" in line and "earns a place" in line
    assert "rank   427.8" in line  # one decimal


def test_colour_only_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NO_COLOR", raising=False)
    plain = io.StringIO()
    simulate.main("full-ssd", out=plain)
    assert ESC not in plain.getvalue()
    tty = Tty()
    simulate.main("full-ssd", out=tty)
    text = tty.getvalue()
    assert "\033[32mkeep" in text and "\033[33mcopy" in text and "\033[31mexpire" in text
    assert "\033[2mskip" in text


def test_no_color_turns_colour_off_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NO_COLOR", "1")
    tty = Tty()
    simulate.main("full-ssd", out=tty)
    assert ESC not in tty.getvalue()


def test_the_cli_path_uses_sys_stdout_and_its_isatty(monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    assert cli.run(cli.parser().parse_args(["simulate", "pinned"])) == 0
    assert "\033[32mkeep" in capsys.readouterr().out


@pytest.mark.parametrize(("text", "message"), [
    ("models:\n  a: {size: 8G, uses: [-2x]}\n", "'-2x' is not an offset"),
    ("models:\n  a: {size: lots}\n", "model 'a': size: 'lots' is not a size"),
    ("models:\n  a: {uses: [-1d]}\n", "model 'a' needs 'size:'"),
    ("models:\n  a: {size: 1G}\nsteps: [1d, 0s]\n", "steps must go forward in time"),
    ("models:\n  a: {size: 1G}\nexpect:\n  3d: {keep: [a]}\n", "'3d' is not one of the steps"),
    ("models:\n  a: {size: 1G}\nexpect:\n  0s: {keep: [b]}\n", "'b' is not one of the models"),
    ("models:\n  a: {size: 1G}\nexpect:\n  0s: {evict: [a]}\n", "unknown key 'evict'"),
    ("models:\n  a: {size: 1G, uses: [{at: -1d, runtime: 2d}, -1h]}\n", "uses overlap"),
    ("models:\n  a: {size: 1G, uses: [{at: -9d, count: 3}]}\n", "needs 'every:'"),
    ("models:\n  a: {size: 1G}\ncache: {max_size: 1G, expire: 7d}\n", "unknown key 'expire'"),
    ("modles: {}\n", "unknown key 'modles'"),
    ("models: [\n", "not valid YAML"),
    ("", "the scenario must be a mapping"),
])
def test_a_broken_scenario_file_names_the_file_and_what_is_wrong(
        tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text(text)
    with pytest.raises(ScenarioError) as info:
        simulate.load(str(path))
    assert str(path) in str(info.value) and message in str(info.value)
    assert info.value.code == 2


def test_an_error_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, """
        cache: {max_size: 8G}
        models:
          a: {size: 1G}
          b: {size: 1G, cached: maybe}
        """)
    with pytest.raises(ScenarioError, match=rf"{path}:4: model 'b': cached must be true"):
        simulate.load(str(path))


def test_sizes_past_any_disk_are_refused(tmp_path: Path) -> None:
    """(One of 10**29 GB read as a disk without a limit's sentinel in a reason.)"""
    path = write(tmp_path, """
        models:
          a: {size: 99999999999999999999999999999G, uses: [-1d]}
        """)
    with pytest.raises(ScenarioError, match=rf"{path}:2: model 'a': size .* is more than "
                                            "1024.0 TiB"):
        simulate.load(str(path))
    path = write(tmp_path, """
        disk_free: 2000T
        models:
          a: {size: 1G}
        """)
    with pytest.raises(ScenarioError, match="leave it out for a disk without a limit"):
        simulate.load(str(path))


def test_an_unknown_scenario_says_so() -> None:
    with pytest.raises(ScenarioError, match="no built-in scenario of that name"):
        simulate.load("no-such-scenario")


def test_offsets_are_signed_durations() -> None:
    assert simulate.parse_offset("-60d") == -60 * 86400
    assert simulate.parse_offset("+1h") == simulate.parse_offset("1h") == 3600
    assert simulate.parse_offset("1d12h") == 36 * 3600
    assert simulate.parse_offset(-30) == -30.0
    for bad in ("-", "soon", True, "1d-"):
        with pytest.raises(ValueError):
            simulate.parse_offset(bad)


def test_a_crashed_use_keeps_no_stop_record(tmp_path: Path) -> None:
    path = write(tmp_path, """
        models:
          a: {size: 1G, uses: [{at: -2d, runtime: 1h, crashed: true}]}
          b: {size: 1G, uses: [{at: -2d, runtime: 1h}]}
        """)
    scenario = simulate.load(str(path))
    crashed, stopped = (simulate.stats_at(m, simulate.EPOCH)[0] for m in scenario.models)
    assert crashed.uses[-1].runtime is None and stopped.uses[-1].runtime == 3600


def test_cli_runs_a_builtin_without_any_manifest(tmp_path: Path) -> None:
    result = run_cli("once-long-ago", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "expire" in result.stdout and "once-cached" in result.stdout
    assert ESC not in result.stdout  # a pipe is no terminal
    listed = run_cli("--list", cwd=tmp_path)
    assert listed.returncode == 0 and "full-ssd" in listed.stdout


def test_cli_json_parses(tmp_path: Path) -> None:
    result = run_cli("pinned", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["steps"][0]["decisions"]


def test_cli_fails_when_a_step_differs_from_expect(tmp_path: Path) -> None:
    path = write(tmp_path, SMALL + """
    expect:
      0s: {keep: [old], skip: [new]}
    """)
    result = run_cli(str(path), cwd=tmp_path)
    assert result.returncode == 1
    assert "differs from its expect" in result.stderr and "step 0s" in result.stderr
    assert "keep: expected [old], got []" in result.stderr
    assert "differs from expect" in result.stdout  # the step's own report says so too
    ok = write(tmp_path, SMALL + """
    expect:
      0s: {expire: [old], copy: [new]}
    """, name="ok.yaml")
    assert run_cli(str(ok), cwd=tmp_path).returncode == 0


def test_cli_reports_a_broken_file_without_a_traceback(tmp_path: Path) -> None:
    path = write(tmp_path, "models:\n  a: {size: 8G, uses: [yesterday]}\n")
    result = run_cli(str(path), cwd=tmp_path)
    assert result.returncode == 2
    assert f"{path}:2:" in result.stderr and "Traceback" not in result.stderr


def test_simulate_needs_a_scenario_or_list() -> None:
    with pytest.raises(HoshikageError, match="needs a SCENARIO"):
        simulate.main(None)


def test_the_example_in_the_docs_runs_and_matches_its_expect(tmp_path: Path) -> None:
    text = (REPO_ROOT / "docs" / "simulate.md").read_text()
    example = text.split("```yaml\n", 1)[1].split("```", 1)[0]
    path = tmp_path / "example.yaml"
    path.write_text(example)
    assert simulate.main(str(path), out=io.StringIO()) == 0
