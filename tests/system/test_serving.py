"""hoshikage end to end under real systemd (PID 1 in systemd-nspawn), driven over loopback."""

from __future__ import annotations

import concurrent.futures
import time
from dataclasses import replace
from pathlib import Path

import pytest

from hoshikage_sd import fmt
from hoshikage_sd.log import MESSAGE_IDS
from hoshikage_sd.memory import TMPFS_PAGE
from hoshikage_sd.staging import Identity, record
from testbed.deploy import Deployment, deploy, hoshikage_bin, manifest
from tests.support import eventually
from tests.system.conftest import ContainerFactory

pytestmark = pytest.mark.system
UNIT = "hoshikage-model@tiny.service"


@pytest.fixture
def hk(container_factory: ContainerFactory, tiny_models: Path,
       llama_server_bin: Path) -> Deployment:
    text = manifest(llama_server_bin, {"tiny": "aliases: [small]\nttl: 3s",
                                       "ghost": "ttl: 1h"},
                    router_idle_exit="2s")
    return deploy(container_factory, tiny_models, text)


def test_socket_listens_and_nothing_runs(hk: Deployment) -> None:
    assert hk.state("hoshikage.socket") == "active"
    assert hk.state("hoshikage.service") == "inactive"
    assert hk.state(UNIT) == "inactive"
    assert hk.processes("llama-server") == []
    assert hk.processes("hoshikage") == []
    listening = hk.container.exec("ss", "-Hltn", f"sport = :{hk.port}").stdout
    assert f"127.0.0.1:{hk.port}" in listening


def test_first_request_is_served_from_the_source_and_staged_alongside(
        hk: Deployment, tiny_models: Path) -> None:
    """The first start reads the file once: llama-server loads from the source and the
    RAM-disk copy is made alongside (from the page cache the load filled), for later starts."""
    status, body = hk.chat("small")
    assert status == 200, body
    assert body["choices"][0]["message"]["content"]
    assert hk.state(UNIT) == "active"
    assert hk.state("mnt-hoshikage.mount") == "active"
    mount = hk.container.exec("findmnt", "-n", "-o", "FSTYPE,OPTIONS", "/mnt/hoshikage").stdout
    assert mount.startswith("tmpfs") and "huge=always" in mount, mount
    (llama,) = hk.processes("llama-server")
    assert "-m /srv/models/tiny.gguf" in llama and "/run/hoshikage/tiny.sock" in llama
    hk.wait_for("the ready record", lambda: bool(hk.events("ready", "tiny")))
    ready = hk.events("ready", "tiny")
    assert len(ready) == 1 and ready[0]["HOSHIKAGE_SERVED_FROM"] == "/srv/models/tiny.gguf"
    hk.wait_for("the copy alongside", lambda: bool(hk.events("staged", "tiny")))
    staged = hk.container.root / "mnt/hoshikage/tiny.gguf"
    assert staged.read_bytes() == (tiny_models / "tiny.gguf").read_bytes()
    assert ready[0]["HOSHIKAGE_LAUNCHED"] == "0"  # nothing staged: the activator did it all
    # The router queued the model unit's start for the request that woke it before its own
    # imports were done, i.e. before it sent READY=1.
    router_ready = int(hk.container.systemctl("show", "hoshikage.service", "--value", "-p",
                                              "ActiveEnterTimestampMonotonic"))
    # (held back until READY=1 like every record before it: log.hold; it says when it was made)
    head_start = [int(e.get("HOSHIKAGE_HELD_USEC") or e["__MONOTONIC_TIMESTAMP"])
                  for e in hk.container.journal("-u", "hoshikage.service")
                  if "started tiny for the request that woke the router" in str(e.get("MESSAGE"))]
    assert len(head_start) == 1 and head_start[0] < router_ready, (head_start, router_ready)


def test_status_shows_the_loaded_model(hk: Deployment, tiny_models: Path) -> None:
    status, _ = hk.chat("tiny")
    assert status == 200
    hk.wait_for("the copy alongside", lambda: bool(hk.events("staged", "tiny")))
    out = hk.hoshikage("status")
    row = next(line for line in out.splitlines() if line.startswith("tiny "))
    size = fmt.size((tiny_models / "tiny.gguf").stat().st_size)
    assert " serving " in row and size in row, out
    assert "RAM disk /mnt/hoshikage:" in out and "MemAvailable:" in out


def test_twenty_concurrent_first_requests_load_once(hk: Deployment) -> None:
    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        results = list(pool.map(lambda _i: hk.chat("small"), range(20)))
    assert [status for status, _ in results] == [200] * 20, results
    hk.wait_for("the copy alongside", lambda: bool(hk.events("staged", "tiny")))
    assert len(hk.events("staged", "tiny")) == 1
    assert len(hk.events("ready", "tiny")) == 1
    assert len(hk.processes("llama-server")) == 1


def test_idle_stop_releases_and_next_request_works(hk: Deployment, tiny_models: Path) -> None:
    status, _ = hk.chat("tiny")
    assert status == 200
    hk.wait_for("the idle stop", lambda: hk.state(UNIT) == "inactive", timeout=30)
    assert not (hk.container.root / "mnt/hoshikage/tiny.gguf").exists()
    assert hk.processes("llama-server") == []
    (idle,) = hk.events("idle-stop", "tiny")
    assert float(idle["HOSHIKAGE_IDLE_SECONDS"]) >= 3.0
    (released,) = hk.events("released", "tiny")
    assert released["MESSAGE_ID"] == MESSAGE_IDS["released"]
    assert released["HOSHIKAGE_REASON"] == "idle"
    # Freed: the tmpfs pages the copy and its record held (2 MiB pages: huge=always).
    size = (tiny_models / "tiny.gguf").stat().st_size
    assert size <= int(released["HOSHIKAGE_BYTES_FREED"]) <= size + 2 * TMPFS_PAGE
    assert int(released["HOSHIKAGE_PID"]) > 0
    assert released["HOSHIKAGE_SERVICE_RESULT"] == "success"
    # The router goes too, once nothing is loaded: zero hoshikage processes.
    hk.wait_for("the router to exit", lambda: hk.state("hoshikage.service") == "inactive")
    hk.wait_for("the idle timer to stop with the last model",
                lambda: hk.state("hoshikage-idle.timer") == "inactive")
    # (a watch the timer started just before ends its run: nothing is left to look at)
    hk.wait_for("no hoshikage process", lambda: hk.processes("hoshikage") == [], timeout=10)
    assert hk.state("hoshikage.socket") == "active"
    status, body = hk.chat("tiny")
    assert status == 200, body
    hk.wait_for("the second copy", lambda: len(hk.events("staged", "tiny")) == 2)


def test_a_short_ttl_is_kept_with_the_shipped_one_minute_timer(
        container_factory: ContainerFactory, tiny_models: Path, llama_server_bin: Path) -> None:
    """The idle timer ticks once a minute, but a model with a 3 s TTL stops after about 3 s
    (the watch waits for the next model due before its next tick), not after 60-90 s."""
    hk = deploy(container_factory, tiny_models,
                manifest(llama_server_bin, {"tiny": "ttl: 3s"}), timer_every=None)
    status, _ = hk.chat("tiny")
    assert status == 200
    hk.wait_for("the idle stop", lambda: hk.state(UNIT) == "inactive", timeout=30)
    (idle,) = hk.events("idle-stop", "tiny")
    assert 3.0 <= float(idle["HOSHIKAGE_IDLE_SECONDS"]) < 30.0


def stage_inside(hk: Deployment, source: Path, data: bytes) -> Path:
    """A staged copy of `source` on the RAM disk with the record the store keeps."""
    hk.container.systemctl("start", "mnt-hoshikage.mount")
    staged = hk.container.root / "mnt/hoshikage/tiny.gguf"
    staged.write_bytes(data)
    ident = replace(Identity.of(source), path="/srv/models/tiny.gguf")  # as seen inside
    (hk.container.root / "mnt/hoshikage/.tiny.source.json").write_text(
        record([ident], [staged]))
    return staged


def test_staged_model_starts_from_the_routers_ticket(hk: Deployment, tiny_models: Path) -> None:
    """Router up, copy staged: the router admits the model and the unit's launcher starts
    llama-server before any of the activator is imported; the activator adopts it."""
    status, _ = hk.chat("ghost")  # brings the router up without loading anything
    assert status == 503
    source = tiny_models / "tiny.gguf"
    stage_inside(hk, source, source.read_bytes())
    status, body = hk.chat("tiny")
    assert status == 200, body
    # The router forwards when the launcher says /health is 200; the activator's record follows.
    hk.wait_for("the ready record", lambda: bool(hk.events("ready", "tiny")))
    (ready,) = hk.events("ready", "tiny")
    assert ready["HOSHIKAGE_LAUNCHED"] == "1" and ready["HOSHIKAGE_COPIED"] == "0"
    (admitted,) = hk.events("admission", "tiny")
    assert admitted["SYSLOG_IDENTIFIER"] == "hoshikage-router"
    assert admitted["HOSHIKAGE_VERDICT"] == "load"
    assert hk.events("staged", "tiny") == []
    # ... on the launcher's word, not by polling llama-server's /health
    said = [e["MESSAGE"] for e in hk.container.journal("SYSLOG_IDENTIFIER=hoshikage-router")
            if str(e.get("MESSAGE", "")).startswith("tiny serves after")]
    assert said and said[-1].endswith("(announced by its unit)"), said
    main_pid = hk.container.systemctl("show", "-P", "MainPID", UNIT).strip()
    cmdline = (hk.container.root / f"proc/{main_pid}/cmdline").read_bytes().split(b"\0")
    assert b"--adopt" in cmdline, cmdline
    assert not (hk.container.root / "run/hoshikage/launch/tiny").exists()


def test_corrupted_staged_copy_is_detected_and_restaged(hk: Deployment,
                                                        tiny_models: Path) -> None:
    source = tiny_models / "tiny.gguf"
    data = bytearray(source.read_bytes())
    data[0:4] = b"XXXX"  # a same-size copy that no longer loads
    staged = stage_inside(hk, source, bytes(data))
    status, body = hk.chat("tiny")
    assert status == 200, body
    (restaged,) = hk.events("restaged", "tiny")
    assert "does not match" in restaged["MESSAGE"]
    assert staged.read_bytes() == source.read_bytes()


def test_missing_source_gives_503_and_a_journal_line(hk: Deployment) -> None:
    status, body = hk.chat("ghost")
    assert status == 503, body
    message = body["error"]["message"]
    assert "/srv/models/ghost.gguf does not exist" in message, message
    (failed,) = hk.events("start-failed", "ghost")
    assert "/srv/models/ghost.gguf" in failed["MESSAGE"]
    assert hk.state("hoshikage-model@ghost.service") in ("inactive", "failed")
    status, _ = hk.chat("tiny")  # the router still serves the others
    assert status == 200


def test_router_starts_again_and_again_without_tripping_a_limit(hk: Deployment) -> None:
    """The router exits whenever it is idle and the socket starts it again: many starts in a
    short time are normal use, not a crash loop that should take the socket down."""
    assert hk.chat("tiny")[0] == 200
    started = time.monotonic()
    for _ in range(8):  # systemd's default limit is 5 starts in 10 s
        hk.container.systemctl("stop", "hoshikage.service")
        status, body = hk.chat("tiny")
        assert status == 200, body
    assert time.monotonic() - started < 10  # within one default StartLimitIntervalSec
    assert hk.state("hoshikage.socket") == "active"


def test_the_router_runs_without_any_privilege(hk: Deployment) -> None:
    """What hoshikage.service leaves out (the options that make a mount namespace: its unit
    file says why) rests on this: the router runs as hoshikage with no capability in any set
    and no_new_privs, so the kernel lets it write no tunable, load no module, read no kernel
    log; and hoshikage-landlock confines its file system: writes only to its own
    directories, no /tmp, no /dev but /dev/null."""
    assert hk.chat("tiny")[0] == 200
    pid = hk.container.systemctl("show", "-P", "MainPID", "hoshikage.service").strip()
    lines = hk.container.exec("cat", f"/proc/{pid}/status").stdout.splitlines()
    status = dict(line.split(":\t", 1) for line in lines if ":\t" in line)
    uid = hk.container.exec("id", "-u", "hoshikage").stdout.strip()
    assert status["Uid"].split() == [uid] * 4, status["Uid"]
    for kind in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(status[kind], 16) == 0, (kind, status[kind])
    assert status["NoNewPrivs"].strip() == "1"
    # the router runs confined: hoshikage-landlock first, the router its program ...
    shown = hk.container.systemctl("show", "-p", "ExecStart", "hoshikage.service")
    argv = shown.split("argv[]=", 1)[1].split(" ;", 1)[0].split()
    assert argv[0].endswith("/hoshikage-landlock") and argv[-1].endswith("/hoshikage-router")
    cmdline = hk.container.exec("cat", f"/proc/{pid}/cmdline").stdout.split("\0")
    assert argv[-1] in cmdline and not any("landlock" in a for a in cmdline), cmdline
    # ... and the same unit with a probe for its program: what that confinement allows
    script = ("touch /var/lib/hoshikage/.p && rm /var/lib/hoshikage/.p && echo STATE-OK; "
              "touch /run/hoshikage/.p && rm /run/hoshikage/.p && echo RUN-OK; "
              "for d in /etc /usr /srv/models /var/tmp /tmp /home; do "
              "touch $$d/hoshikage-probe 2>/dev/null && echo WROTE-$$d; done; "
              "ls /tmp >/dev/null 2>&1 && echo LISTED-tmp; "
              "ls /dev >/dev/null 2>&1 && echo LISTED-dev; "
              "head -c 4 /srv/models/tiny.gguf >/dev/null && echo READ-OK; "
              "ls /mnt/hoshikage >/dev/null && echo RAMDISK-OK; echo PROBE-END")
    dropin = hk.container.root / "etc/systemd/system/hoshikage.service.d/zz-probe.conf"
    dropin.parent.mkdir(exist_ok=True)
    dropin.write_text("[Service]\nType=exec\nExecStart=\nExecStart="
                      + " ".join(argv[:-1]) + f' /bin/sh -c "{script}"\n')
    try:
        hk.container.systemctl("stop", "hoshikage.service")
        hk.container.systemctl("daemon-reload")
        since = hk.container.exec("date", "+%Y-%m-%d %H:%M:%S").stdout.strip()
        hk.container.systemctl("start", "hoshikage.service")
        said = eventually(lambda: [str(e.get("MESSAGE")) for e in hk.container.journal(
            "-u", "hoshikage.service", "--since", since)], lambda m: "PROBE-END" in m)
    finally:
        dropin.unlink()
        hk.container.systemctl("daemon-reload")
        hk.container.systemctl("stop", "hoshikage.service")
    probe = [m for m in said if m.isupper() or m.startswith(("WROTE", "LISTED"))]
    assert probe == ["STATE-OK", "RUN-OK", "READ-OK", "RAMDISK-OK", "PROBE-END"], said
    assert hk.chat("tiny")[0] == 200  # the router as shipped again


def test_from_zero_a_model_started_before_is_admitted_by_the_head_start(
        hk: Deployment) -> None:
    """Once a model has started (its estimate remembered), the next router's head start
    admits it (nothing else up) and leaves its ticket: llama-server starts before any of
    the activator is imported, from zero processes too."""
    assert hk.chat("tiny")[0] == 200
    hk.wait_for("the idle stop and the router's exit", lambda: hk.state(UNIT) == "inactive"
                and hk.state("hoshikage.service") == "inactive", timeout=60)
    assert hk.chat("tiny")[0] == 200
    hk.wait_for("the second ready record", lambda: len(hk.events("ready", "tiny")) == 2)
    first, second = hk.events("ready", "tiny")
    assert first["HOSHIKAGE_LAUNCHED"] == "0" and second["HOSHIKAGE_LAUNCHED"] == "1", second
    assert second["HOSHIKAGE_SERVED_FROM"] == "/srv/models/tiny.gguf"
    admission = hk.events("admission", "tiny")[-1]
    assert admission["SYSLOG_IDENTIFIER"] == "hoshikage-router", admission
    assert admission["HOSHIKAGE_VERDICT"] == "load"
    notes = [str(e.get("MESSAGE")) for e in hk.container.journal("-u", "hoshikage.service")]
    assert any("to admit it and leave its ticket" in n for n in notes), notes
    # its imports gave way to the load (a thread at nice 10); it serves at nice 0
    assert any("the router's imports ran at nice 10 beside the load of tiny" in n
               for n in notes), notes
    pid = hk.container.systemctl("show", "-P", "MainPID", "hoshikage.service").strip()
    stat = hk.container.exec("cat", f"/proc/{pid}/stat").stdout
    assert stat.rsplit(")", 1)[1].split()[16] == "0", stat  # field 19: nice
    # stopped by hand at once, with the same router up: the next request starts it again
    # (the head start's unit counted for the router's first start only: this was a 503)
    hk.container.systemctl("stop", UNIT)
    status, body = hk.chat("tiny")
    assert status == 200, body


def test_a_start_after_the_waking_clients_model_came_and_went_is_its_own(
        container_factory: ContainerFactory, tiny_models: Path,
        llama_server_bin: Path) -> None:
    """The request that woke the router goes away while its model loads; the model loads,
    serves nobody and stops at its TTL, all within the router's first 30 s: the next request
    starts the model again (it got a 503, 'stopped before it served', taken for the head
    start's own start)."""
    import socket

    hk = deploy(container_factory, tiny_models,
                manifest(llama_server_bin, {"tiny": "ttl: 2s"}, router_idle_exit="1h"))
    body = b'{"model": "tiny", "stream": true, "messages": [{"role": "user", "content": "hi"}]}'
    with socket.create_connection(("127.0.0.1", hk.port)) as gone:
        gone.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: "
                     b"application/json\r\nX-Hoshikage-Progress: 1\r\nContent-Length: "
                     + str(len(body)).encode() + b"\r\n\r\n" + body)
        time.sleep(0.15)
    hk.wait_for("the idle stop", lambda: hk.events("released", "tiny") != [], timeout=30)
    assert hk.state("hoshikage.service") == "active"  # the same router, within its 30 s
    status, answer = hk.chat("tiny")
    assert status == 200, answer


def test_a_kept_copy_goes_when_its_ttl_runs_out(
        container_factory: ContainerFactory, tiny_models: Path, tiny_gguf: Path,
        llama_server_bin: Path) -> None:
    """A model unloaded by hand keeps its RAM-disk copy for its TTL; the idle watch (its
    unit as shipped: ProtectSystem=strict) deletes it then, and stays well (it failed on
    the read-only RAM disk, every run, and the copy stayed)."""
    import shutil

    shutil.copyfile(tiny_gguf, tiny_models / "other.gguf")
    hk = deploy(container_factory, tiny_models,
                manifest(llama_server_bin, {"tiny": "ttl: 1h", "other": "ttl: 3s"},
                         router_idle_exit="1h"))
    for name in ("tiny", "other"):
        status, body = hk.chat(name)
        assert status == 200, body
    hk.wait_for("other's copy", lambda: hk.events("staged", "other") != [], timeout=30)
    hk.hoshikage("unload", "other")
    copy = hk.container.root / "mnt/hoshikage/other.gguf"
    assert copy.exists()
    hk.wait_for("the kept copy's release", lambda: any(
        "kept copy: its TTL ran out" in e["MESSAGE"] for e in hk.events("released", "other")),
        timeout=30)
    assert not copy.exists()
    assert hk.state("hoshikage-idle.service") != "failed"
    assert "ReadWritePaths" not in hk.container.exec(
        str(hoshikage_bin()), "check", check=False).stdout


def test_a_model_whose_records_were_deleted_still_stops_at_its_ttl(
        container_factory: ContainerFactory, tiny_models: Path,
        llama_server_bin: Path) -> None:
    """An admin deletes a loaded model's running and activity records under /run: the idle
    watch measures it from its unit's start, as systemd says (it stayed loaded for good)."""
    hk = deploy(container_factory, tiny_models,
                manifest(llama_server_bin, {"tiny": "ttl: 3s"}, router_idle_exit="1h"))
    status, body = hk.chat("tiny")
    assert status == 200, body
    run = hk.container.root / "run/hoshikage"
    hk.wait_for("the records", lambda: (run / "running/tiny.json").exists()
                and (run / "activity/tiny.json").exists())
    (run / "running/tiny.json").unlink()
    (run / "activity/tiny.json").unlink()
    hk.wait_for("the idle stop", lambda: hk.state(UNIT) == "inactive", timeout=30)
    (stopped,) = hk.events("idle-stop", "tiny")
    assert float(stopped["HOSHIKAGE_IDLE_SECONDS"]) >= 3.0


def test_a_model_taken_out_of_the_manifest_goes_within_seconds(
        container_factory: ContainerFactory, tiny_models: Path, tiny_gguf: Path,
        llama_server_bin: Path) -> None:
    """The idle watch waiting for tiny (due in 20 s) reads the manifest again as it waits:
    tiny, taken out meanwhile, goes as no longer in it (it went at its old TTL, as idle)."""
    import shutil

    shutil.copyfile(tiny_gguf, tiny_models / "other.gguf")
    hk = deploy(container_factory, tiny_models,
                manifest(llama_server_bin, {"tiny": "ttl: 20s", "other": "ttl: 1h"},
                         router_idle_exit="1h"))
    status, body = hk.chat("tiny")
    assert status == 200, body
    hk.wait_for("the idle watch to wait for tiny",
                lambda: hk.state("hoshikage-idle.service") == "activating", timeout=20)
    time.sleep(3)  # its manifest read, its first sweep made: it sleeps until tiny is due
    assert hk.state("hoshikage-idle.service") == "activating"
    path = hk.container.root / "etc/hoshikage/models.yaml"
    path.write_text(manifest(llama_server_bin, {"other": "ttl: 1h"}, router_idle_exit="1h"))
    hk.hoshikage("reload")
    began = time.monotonic()
    hk.wait_for("tiny's stop", lambda: hk.events("idle-stop", "tiny") != [], timeout=30)
    (stopped,) = hk.events("idle-stop", "tiny")
    assert "no longer in the manifest" in stopped["MESSAGE"], stopped["MESSAGE"]
    assert time.monotonic() - began < 15
