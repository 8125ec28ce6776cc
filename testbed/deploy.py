"""Install hoshikage into a booted container the way the Debian package lays it out.

The units are the repository's own, with /usr/bin/hoshikage and the helpers in
/usr/libexec/hoshikage pointed at the repository's virtual environment (bound into the
container at the same path), and two test-only drop-ins: the socket's port, and an idle
timer that fires every second.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from testbed import REPO_ROOT
from testbed.container import Container

MODELS_IN_CONTAINER = "/srv/models"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def hoshikage_bin() -> Path:
    return Path(sys.executable).parent / "hoshikage"


def install_files(root: Path, manifest: str, port: int, timer_every: str | None) -> None:
    """Write units, tmpfiles, the manifest and the test drop-ins into a root directory."""
    launcher = hoshikage_bin().with_name("hoshikage-launch")
    assert os.access(launcher, os.X_OK), f"{launcher} is missing: run tools/bootstrap.sh"
    for helper in ("hoshikage-router", "hoshikage-landlock"):
        path = hoshikage_bin().with_name(helper)
        assert os.access(path, os.X_OK), f"{path} is missing: run tools/bootstrap.sh"
    unit_dir = root / "etc/systemd/system"
    unit_dir.mkdir(parents=True, exist_ok=True)
    # a tmpfs root has no /mnt until the RAM disk's mount makes it, after the router's start:
    # the router's Landlock rules cover the directories in / when it starts (router/landlock.c),
    # and every installed system has /mnt (base-files)
    (root / "mnt").mkdir(exist_ok=True)
    for unit in sorted((REPO_ROOT / "units").iterdir()):
        # the package's helpers (/usr/libexec/hoshikage) sit beside the venv's hoshikage here
        text = unit.read_text().replace("/usr/libexec/hoshikage/", f"{hoshikage_bin().parent}/")
        text = text.replace("/usr/bin/hoshikage", str(hoshikage_bin()))
        (unit_dir / unit.name).write_text(text)
    if REPO_ROOT.is_relative_to("/tmp") or REPO_ROOT.is_relative_to("/var/tmp"):
        # PrivateTmp= would hide a checkout (and its .venv) that lives under /tmp, and so
        # would the router's Landlock rules (router/landlock.c: --read lets it read the
        # checkout); an installed hoshikage lives in /usr and keeps the units as shipped.
        for unit in unit_dir.glob("hoshikage*.service"):
            (unit_dir / f"{unit.name}.d").mkdir(exist_ok=True)
            text = "[Service]\nPrivateTmp=no\n"
            if unit.name == "hoshikage.service":
                bin_dir = hoshikage_bin().parent
                text += (f"ExecStart=\nExecStart={bin_dir}/hoshikage-landlock --read "
                         f"{REPO_ROOT} {bin_dir}/hoshikage-router\n")
            (unit_dir / f"{unit.name}.d" / "checkout-in-tmp.conf").write_text(text)
    dropin = unit_dir / "hoshikage.socket.d"
    dropin.mkdir(exist_ok=True)
    (dropin / "port.conf").write_text(f"[Socket]\nListenStream=\nListenStream=127.0.0.1:{port}\n")
    if timer_every:
        dropin = unit_dir / "hoshikage-idle.timer.d"
        dropin.mkdir(exist_ok=True)
        (dropin / "fast.conf").write_text(
            # An empty assignment resets every trigger of the timer, so only one, first.
            f"[Timer]\nOnActiveSec=\nOnActiveSec={timer_every}\n"
            f"OnUnitActiveSec={timer_every}\nAccuracySec=100ms\n")
        # a run a second is past systemd's default start limit (5 in 10 s): the watch's
        # unit would be refused ("start-limit-hit") and a TTL's stop come late
        service = unit_dir / "hoshikage-idle.service.d"
        service.mkdir(exist_ok=True)
        (service / "fast.conf").write_text("[Unit]\nStartLimitIntervalSec=0\n")
    (root / "etc/tmpfiles.d").mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO_ROOT / "tmpfiles.d/hoshikage.conf", root / "etc/tmpfiles.d/hoshikage.conf")
    # The service user and what it may do, as the package installs them (its /usr paths are
    # the host's, read-only here, so the /etc equivalents).
    (root / "etc/sysusers.d").mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO_ROOT / "sysusers.d/hoshikage.conf", root / "etc/sysusers.d/hoshikage.conf")
    rules = root / "etc/polkit-1/rules.d"
    rules.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO_ROOT / "polkit/hoshikage.rules", rules / "hoshikage.rules")
    (root / "etc/hoshikage").mkdir(parents=True, exist_ok=True)
    (root / "etc/hoshikage/models.yaml").write_text(manifest)


@dataclass
class Deployment:
    container: Container
    port: int
    models: Path  # on the host; /srv/models inside, read-only

    def request(self, method: str, path: str, body: object = None,
                timeout: float = 120) -> tuple[int, dict[str, Any]]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        data = json.dumps(body).encode() if body is not None else None
        conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        raw = response.read()
        conn.close()
        return response.status, json.loads(raw)

    def chat(self, model: str, content: str = "hello", max_tokens: int = 4) -> tuple[int, Any]:
        return self.request("POST", "/v1/chat/completions", {
            "model": model, "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": content}]})

    def events(self, kind: str, model: str | None = None) -> list[dict[str, Any]]:
        match = [f"HOSHIKAGE_EVENT={kind}"] + ([f"HOSHIKAGE_MODEL={model}"] if model else [])
        return self.container.journal(*match)

    def state(self, unit: str) -> str:
        return self.container.systemctl("is-active", unit, check=False).strip()

    def processes(self, name: str) -> list[str]:
        out = self.container.exec("pgrep", "-a", "-f", name, check=False).stdout
        return [line for line in out.splitlines() if "pgrep" not in line]

    def hoshikage(self, *args: str) -> str:
        """`hoshikage ARGS` inside the container (the CLI the units run), its output."""
        return self.container.exec(str(hoshikage_bin()), *args).stdout

    def wait_for(self, what: str, check: Callable[[], bool], timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if check():
                return
            time.sleep(0.2)
        raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def manifest(llama_server: Path, models: dict[str, str], **settings: str) -> str:
    """models: name → extra YAML lines (indented 4) after path: /srv/models/NAME.gguf."""
    lines = [f"llama_server: {llama_server}"]
    lines += [f"{key}: {value}" for key, value in settings.items()]
    lines.append("models:")
    for name, extra in models.items():
        lines += [f"  {name}:", f"    path: {MODELS_IN_CONTAINER}/{name}.gguf"]
        lines += [f"    {line}" for line in extra.splitlines() if line.strip()]
    return "\n".join(lines) + "\n"


def deploy(make: Callable[..., Container], models_dir: Path, manifest_text: str,
           timer_every: str | None = "1s",
           binds: Sequence[tuple[str, str, bool]] = ()) -> Deployment:
    port = free_port()
    container = make(binds=[(str(REPO_ROOT), str(REPO_ROOT), True),
                            (str(models_dir), MODELS_IN_CONTAINER, True), *binds])
    install_files(container.root, manifest_text, port, timer_every)
    container.exec("systemd-sysusers", "/etc/sysusers.d/hoshikage.conf")
    container.exec("systemd-tmpfiles", "--create", "/etc/tmpfiles.d/hoshikage.conf")
    container.systemctl("daemon-reload")
    container.systemctl("enable", "--now", "hoshikage.socket")
    return Deployment(container, port, models_dir)
