"""hoshikage-landlock (router/landlock.c), compiled and run here: what a program it confines
may read, write and run. The unit it serves is checked under systemd in
tests/system/test_serving.py."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from hoshikage_sd.model_unit import install
from testbed import REPO_ROOT
from tests.support import unavailable


@pytest.fixture(scope="module")
def landlock(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("landlock") / "hoshikage-landlock"
    why = install.build_native(str(path), install.LANDLOCK_C)
    if why is not None:
        unavailable(f"cannot build hoshikage-landlock: {why}")
    probe = subprocess.run([path, "--probe"], capture_output=True, text=True, check=False)
    if probe.returncode != 0:
        unavailable(f"this kernel has no Landlock: {probe.stdout.strip()}")
    return path


@pytest.fixture
def base() -> Iterator[Path]:
    """A directory outside /tmp (which the confinement hides)."""
    path = Path(tempfile.mkdtemp(prefix=".landlock-", dir=REPO_ROOT))
    (path / "state").mkdir()
    (path / "run").mkdir()
    (path / "other").mkdir()
    (path / "other" / "model.gguf").write_text("GGUF")
    yield path
    shutil.rmtree(path)


def confined(landlock: Path, base: Path, script: str) -> subprocess.CompletedProcess[str]:
    """`script` in sh under hoshikage-landlock, with the unit's directories as systemd sets
    them (two runtime directories, as RuntimeDirectory= with two names would) and `base`
    readable (it may sit under /tmp on a CI machine)."""
    env = {"PATH": "/usr/bin:/bin", "STATE_DIRECTORY": f"{base}/state",
           "RUNTIME_DIRECTORY": f"{base}/run:{base}/missing"}
    return subprocess.run([landlock, "--read", str(base), "/bin/sh", "-c", script],
                          capture_output=True, text=True, env=env, check=False)


def test_it_writes_only_beneath_the_units_directories(landlock: Path, base: Path) -> None:
    done = confined(landlock, base, 'echo s > "$STATE_DIRECTORY/f" && echo STATE; '
                    f'echo r > {base}/run/f && echo RUN; echo x > {base}/other/new; '
                    f'echo x >> {base}/other/model.gguf; rm {base}/other/model.gguf; '
                    f'mkdir {base}/other/d; true')
    assert done.stdout.split() == ["STATE", "RUN"], done
    assert (base / "state" / "f").read_text() == "s\n"
    assert sorted(p.name for p in (base / "other").iterdir()) == ["model.gguf"]
    assert (base / "other" / "model.gguf").read_text() == "GGUF"
    assert done.stderr.count("Permission denied") == 4, done.stderr


def test_it_reads_and_runs_everywhere_but_dev_and_tmp(landlock: Path, base: Path) -> None:
    done = confined(landlock, base, f'cat {base}/other/model.gguf; echo; '
                    'test -r /etc/passwd && echo ETC; /bin/true && echo EXEC; '
                    'echo > /dev/null && echo NULL; head -c 8 /dev/urandom | wc -c; '
                    'ls /tmp; ls /var/tmp; ls /dev; true')
    assert done.stdout.split() == ["GGUF", "ETC", "EXEC", "NULL", "8"], done
    assert done.stderr.count("Permission denied") == 3, done.stderr


def test_its_children_stay_confined(landlock: Path, base: Path) -> None:
    done = confined(landlock, base, f"sh -c 'echo x > {base}/other/child' || echo REFUSED")
    assert "REFUSED" in done.stdout, done
    assert not (base / "other" / "child").exists()


def test_probe_usage_and_a_missing_program(landlock: Path) -> None:
    probe = subprocess.run([landlock, "--probe"], capture_output=True, text=True, check=True)
    assert int(probe.stdout) >= 1
    for argv in ([], ["--read"], ["--read", "/srv"]):
        usage = subprocess.run([landlock, *argv], capture_output=True, text=True, check=False)
        assert usage.returncode == 2 and "usage:" in usage.stderr, usage
    missing = subprocess.run([landlock, "/nonexistent/router"], capture_output=True,
                             text=True, check=False)
    assert missing.returncode == 127, missing
    assert "cannot run /nonexistent/router" in missing.stderr


def test_without_a_compiler_the_stub_runs_it_and_says_so(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CC", "/nonexistent/cc")
    path = tmp_path / "hoshikage-landlock"
    said = install.install_landlock(str(path))
    assert "stub" in said and "without its file-system confinement" in said, said
    probe = subprocess.run([path, "--probe"], capture_output=True, text=True, check=False)
    assert probe.returncode == 1 and probe.stdout.startswith("none:"), probe
    ran = subprocess.run([path, "--read", "/srv", "/bin/echo", "hi"], capture_output=True,
                         text=True, check=False)
    assert ran.stdout == "hi\n", ran
    assert "runs without its file-system confinement" in ran.stderr


def test_check_says_when_the_router_runs_unconfined(landlock: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from hoshikage_sd.router.checks import confinement_problems

    def shown(program: Path) -> str:  # systemctl show -p ExecStart's form
        return (f"{{ path={program} ; argv[]={program} /usr/libexec/hoshikage/hoshikage-router "
                "; ignore_errors=no ; start_time=[n/a] ; stop_time=[n/a] ; pid=0 }}")

    assert confinement_problems(shown(landlock)) == []
    monkeypatch.setenv("CC", "/nonexistent/cc")
    stub = tmp_path / "hoshikage-landlock"
    install.install_landlock(str(stub))
    [said] = confinement_problems(shown(stub))
    assert "without its file-system confinement" in said and "without a C compiler" in said
    [said] = confinement_problems(shown(Path("/usr/libexec/hoshikage/hoshikage-router")))
    assert "does not start hoshikage-landlock" in said
    [said] = confinement_problems(shown(tmp_path / "gone" / "hoshikage-landlock"))
    assert "cannot start" in said
    # a drop-in that gave it a mount namespace again: confined that way
    assert confinement_problems(shown(stub), "strict") == []
