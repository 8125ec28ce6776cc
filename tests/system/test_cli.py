"""The commands an admin types, under real systemd (issue 23): `check`'s exit status, `load`'s
progress and its failure with the reason, `ps`, and the facts `status` adds (llama-server's
PID, the socket's address, the router's state, the RAM disk's mount)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from testbed.deploy import Deployment, deploy, hoshikage_bin, manifest
from tests.system.conftest import ContainerFactory

pytestmark = pytest.mark.system


@pytest.fixture
def hk(container_factory: ContainerFactory, tmp_path: Path, tiny_gguf: Path,
       llama_server_bin: Path) -> Deployment:
    models = tmp_path / "models"
    models.mkdir()
    shutil.copyfile(tiny_gguf, models / "tiny.gguf")  # gone.gguf is missing
    text = manifest(llama_server_bin, {"tiny": "ttl: 1h", "gone": "ttl: 1h"},
                    min_reload_seconds="0")
    return deploy(container_factory, models, text)


def run(hk: Deployment, *args: str) -> subprocess.CompletedProcess[str]:
    return hk.container.exec(str(hoshikage_bin()), *args, check=False)


def test_check_load_ps_and_status(hk: Deployment) -> None:
    # check: a missing model file is a problem, exit 1, in JSON too
    checked = run(hk, "check")
    assert checked.returncode == 1, checked
    assert "warning:" in checked.stdout and "gone" in checked.stdout, checked.stdout
    facts = json.loads(run(hk, "check", "--json").stdout)
    assert facts["ok"] is False and any("gone" in w for w in facts["warnings"]), facts
    # and 0 where nothing is wrong (notes are no problems): the same without that model
    good = hk.container.root / "etc/hoshikage/good.yaml"
    good.write_text((hk.container.root / "etc/hoshikage/models.yaml").read_text()
                    .replace("  gone:\n    path: /srv/models/gone.gguf\n    ttl: 1h\n", ""))
    checked = run(hk, "check", "--config", "/etc/hoshikage/good.yaml")
    assert checked.returncode == 0 and "1 model(s): tiny" in checked.stdout, checked

    # status before anything ran: the socket's address, no router, no RAM disk (its mount
    # point is a plain directory: not mounted, whatever its filesystem's usage)
    hk.container.exec("mkdir", "-p", "/mnt/hoshikage")
    out = run(hk, "status").stdout
    assert f"router: not running (the socket starts it on the first request), listening " \
           f"on 127.0.0.1:{hk.port}" in out, out
    assert "RAM disk /mnt/hoshikage: not mounted" in out, out

    # load: plain progress lines off a terminal, then llama-server's PID; global options
    # after the command
    loaded = run(hk, "load", "tiny", "--config", "/etc/hoshikage/models.yaml")
    assert loaded.returncode == 0, loaded
    lines = loaded.stdout.splitlines()
    # a first load: llama-server reads the source (the unit's memory grows), and the
    # RAM-disk copy is made once it serves
    # (a line per phase seen: a tiny model may be loaded before a look finds it loading,
    # and its copy alongside made before a look finds it staging: "staged tiny: SIZE")
    assert lines[0] == "starting tiny", lines
    assert all(line.startswith(("loading tiny (llama-server)", "tiny: ", "staged tiny: "))
               for line in lines[1:-1]), lines
    done = re.fullmatch(r"tiny loaded in [0-9.]+ s, llama-server pid (\d+) \(from its "
                        r"source; its RAM-disk copy is made alongside\)", lines[-1])
    assert done, lines
    pid = int(done[1])
    main_pid = hk.container.systemctl("show", "-P", "MainPID",
                                      "hoshikage-model@tiny.service").strip()
    assert str(pid) in hk.container.exec("pgrep", "-x", "llama-server").stdout.split()
    assert str(pid) != main_pid  # the activator's is the unit's main PID

    # ps: the loaded model only, with llama-server's PID
    (row,) = json.loads(run(hk, "ps", "--json").stdout)
    assert (row["name"], row["state"], row["pid"]) == ("tiny", "serving", pid), row
    assert row["memory_bytes"] > 0 and row["since"] is not None
    table = run(hk, "ps").stdout.splitlines()
    assert len(table) == 2 and table[1].split()[:3] == ["tiny", "serving", str(pid)], table

    # a request through the socket starts the router: status says it runs, and where
    status, body = hk.chat("tiny")
    assert status == 200, body
    router_pid = hk.container.systemctl("show", "-P", "MainPID", "hoshikage.service").strip()
    state = json.loads(run(hk, "--debug", "status", "--json").stdout)
    assert state["router"] == {"state": "active", "running": True, "pid": int(router_pid),
                               "socket_state": "active", "listen": [f"127.0.0.1:{hk.port}"]}
    assert state["ramdisk"]["mounted"] is True
    (tiny,) = [m for m in state["models"] if m["name"] == "tiny"]
    assert tiny["llama_server_pid"] == pid and tiny["status_text"]  # the unit's STATUS=
    out = run(hk, "status").stdout
    tiny_row = next(line for line in out.splitlines() if line.startswith("tiny "))
    assert tiny_row.split()[1:3] == ["serving", str(pid)], out
    assert f"router: running (pid {router_pid}), listening on 127.0.0.1:{hk.port}" in out
    assert re.search(r"RAM disk /mnt/hoshikage: [0-9.]+ \w+ used of", out), out
    (row,) = json.loads(run(hk, "ps", "--json").stdout)
    assert row["in_flight"] == 0  # the running router's count

    # a load that fails: exit 1 and the activator's reason
    failed = run(hk, "load", "gone")
    assert failed.returncode == 1, failed
    assert "gone did not start: " in failed.stderr and "/srv/models/gone.gguf" in \
        failed.stderr, failed.stderr
    assert "hoshikage logs gone" in failed.stderr

    # on a terminal: one line redrawn, and the result in colour
    run(hk, "unload", "tiny")
    hk.wait_for("the unload", lambda: hk.state("hoshikage-model@tiny.service") == "inactive")
    # (cat -v: the carriage returns as ^M, which text mode would read as line ends)
    tty = hk.container.exec("sh", "-c", f"script -qec '{hoshikage_bin()} load tiny' "
                            "/dev/null | cat -v").stdout
    # the first line redrawn by the next (from its kept RAM copy the load may be over before
    # a "loading" look: which lines come between is the machine's pace)
    assert tty.startswith("^Mstarting tiny^M"), tty
    assert "^[[32mtiny loaded in" in tty, tty
    plain = hk.container.exec("script", "-qec", f"NO_COLOR=1 {hoshikage_bin()} ps",
                              "/dev/null").stdout
    assert "\033[" not in plain and "serving" in plain, repr(plain)


def test_load_of_a_model_that_gets_no_ram_disk_copy_says_so(
        container_factory: ContainerFactory, tmp_path: Path, tiny_gguf: Path,
        llama_server_bin: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    shutil.copyfile(tiny_gguf, models / "plain.gguf")
    text = manifest(llama_server_bin, {"plain": "ttl: 1h\nstage: never"})
    hk = deploy(container_factory, models, text)
    loaded = run(hk, "load", "plain")
    assert loaded.returncode == 0, loaded
    assert re.fullmatch(r"plain loaded in [0-9.]+ s, llama-server pid \d+ \(from its source; "
                        r"stage: never, no RAM-disk copy\)", loaded.stdout.splitlines()[-1]), \
        loaded.stdout
    assert hk.container.exec("sh", "-c", "ls /mnt/hoshikage").stdout.split() == []


def test_a_start_stopped_while_it_loads_is_said_so(
        container_factory: ContainerFactory, tmp_path: Path, tiny_gguf: Path,
        llama_server_bin: Path) -> None:
    """The request waiting for a model whose unit is stopped by hand before it serves: a
    503 that says so, not 'failed to start'."""
    import threading

    models = tmp_path / "models"
    models.mkdir()
    shutil.copyfile(tiny_gguf, models / "slow.gguf")
    text = manifest(llama_server_bin, {  # a server that never says it serves
        "slow": 'backend: command\ncommand: [/bin/sleep, "300"]\nttl: 1h'})
    hk = deploy(container_factory, models, text)
    answer: list[tuple[int, object]] = []
    waiting = threading.Thread(target=lambda: answer.append(hk.chat("slow")))
    waiting.start()
    unit = "hoshikage-model@slow.service"
    hk.wait_for("the unit to start", lambda: hk.state(unit) == "activating")
    hk.container.systemctl("stop", unit)
    waiting.join(60)
    ((status, body),) = answer
    assert status == 503, body
    assert "was stopped before it served" in body["error"]["message"], body  # type: ignore[index]


def test_a_failed_load_says_what_llama_server_said(
        container_factory: ContainerFactory, tmp_path: Path, tiny_gguf: Path,
        llama_server_bin: Path) -> None:
    """A model whose llama-server exits at its start (an argument it does not know): the
    503 carries llama-server's own error line, which the router asks of the journal's
    reader (it may not read the journal itself)."""
    models = tmp_path / "models"
    models.mkdir()
    shutil.copyfile(tiny_gguf, models / "bad.gguf")
    text = manifest(llama_server_bin, {"bad": 'ttl: 1h\nargs: ["--no-such-flag"]'})
    hk = deploy(container_factory, models, text)
    status, body = hk.chat("bad")
    assert status == 503, body
    message = body["error"]["message"]
    assert "llama-server exited with status 1" in message, message
    assert "(llama-server said: " in message and "--no-such-flag" in message, message


def test_a_unit_systemd_could_not_set_up_says_which_step(
        container_factory: ContainerFactory, tmp_path: Path, tiny_gguf: Path,
        llama_server_bin: Path) -> None:
    """A model unit that fails before hoshikage's own code runs (its CacheDirectory= is a
    file: systemd cannot set it up): the 503, `status` and `load` name systemd's step, not
    just "failed"."""
    models = tmp_path / "models"
    models.mkdir()
    shutil.copyfile(tiny_gguf, models / "tiny.gguf")
    hk = deploy(container_factory, models, manifest(llama_server_bin, {"tiny": "ttl: 1h"}))
    hk.container.exec("sh", "-c", "rm -rf /var/cache/hoshikage && touch /var/cache/hoshikage")
    step = "systemd could not set up its process: status 239/CACHE_DIRECTORY"
    status, body = hk.chat("tiny")
    assert status == 503, body
    assert step in body["error"]["message"], body
    shown = {m["name"]: m for m in json.loads(hk.hoshikage("status", "--json"))["models"]}
    assert shown["tiny"]["phase"] == "failed"
    assert shown["tiny"]["error"] == f"{step} (journalctl -u hoshikage-model@tiny.service)"
    loaded = run(hk, "load", "tiny")
    assert loaded.returncode == 1 and f"tiny did not start: {step}" in loaded.stderr, loaded


def test_status_says_a_running_model_s_settings_changed_since_its_start(
        container_factory: ContainerFactory, tmp_path: Path, tiny_gguf: Path,
        llama_server_bin: Path) -> None:
    """The manifest edited under a serving model (its args here): it keeps serving as it
    started, and status says so, with what applies the change."""
    models = tmp_path / "models"
    models.mkdir()
    shutil.copyfile(tiny_gguf, models / "tiny.gguf")
    hk = deploy(container_factory, models, manifest(llama_server_bin, {"tiny": "ttl: 1h"}))
    status, body = hk.chat("tiny")
    assert status == 200, body
    note = "tiny runs the settings it started with"
    hk.wait_for("the running record", lambda: (
        hk.container.root / "run/hoshikage/running/tiny.json").exists())
    assert note not in run(hk, "status").stdout
    path = hk.container.root / "etc/hoshikage/models.yaml"
    path.write_text(path.read_text().replace("ttl: 1h", 'ttl: 1h\n    args: ["-c", "512"]'))
    assert note in run(hk, "status").stdout
    shown = {m["name"]: m for m in json.loads(hk.hoshikage("status", "--json"))["models"]}
    assert shown["tiny"]["outdated"] is True
