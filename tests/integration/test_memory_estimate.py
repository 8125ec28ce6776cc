"""The memory estimate against a real llama-server's real memory.

Each case generates a model into a tmpfs (/dev/shm, as hoshikage stages into its tmpfs),
starts llama-server on it, waits for /health 200, runs one completion whose prompt fills a
micro-batch, and measures what the model costs: the file (tmpfs pages, shared with the mmap)
plus llama-server's anonymous memory (RssAnon). The estimate must be within the product's
tolerance (±10 % or ±64 MiB) and, so that a wrong formula fails here and not only on big
models, within ±10 % or ±12 MiB; the KV and compute buffers must be exactly what
llama-server's own log prints.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hoshikage_sd import gguf, memory
from testbed.estimate import within
from testbed.unixhttp import UnixHTTPConnection
from tests.support import eventually, unavailable

from .conftest import stop

pytestmark = pytest.mark.integration

MiB = 1 << 20
TIGHT = 12 * MiB

CASES: dict[str, tuple[dict[str, Any], list[str]]] = {
    # name: (tools/make_gguf.py write_model arguments, llama-server arguments)
    "tiny-auto": ({}, []),                                        # -c 0, -np auto
    "kv-heavy-2-slots": (dict(n_embd=256, n_ff=768, n_layer=8, n_head=4, n_ctx=8192,
                              dtype="f16"), ["-c", "8192", "-np", "2"]),
    "gqa-16k-2-slots": (dict(n_embd=512, n_ff=1408, n_layer=8, n_head=8, n_head_kv=2, n_ctx=16384,
                     dtype="f16"), ["-c", "16384", "-np", "2", "-ub", "256"]),
}


@pytest.fixture(scope="module")
def shm() -> Iterator[Path]:
    """A directory on a tmpfs: model pages there are shared with llama-server's mmap."""
    base = Path("/dev/shm")
    parent = base if base.is_dir() and shutil.disk_usage(base).free > 256 * MiB else None
    path = Path(tempfile.mkdtemp(prefix="hoshikage-memtest-", dir=parent))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def call(sock: Path, method: str, route: str, body: object = None,
         timeout: float = 60.0) -> tuple[int | None, bytes]:
    conn = UnixHTTPConnection(str(sock), timeout=timeout)
    try:
        conn.request(method, route, body=None if body is None else json.dumps(body),
                     headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, response.read()
    except OSError:
        return None, b""
    finally:
        conn.close()


def rss_anon(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        line = next(line for line in f if line.startswith("RssAnon:"))
    return int(line.split()[1]) * 1024


@contextlib.contextmanager
def server(binary: Path, model: Path, args: list[str], workdir: Path) -> Iterator[
        tuple[subprocess.Popen[bytes], Path, Path]]:
    sock, log = workdir / f"{model.stem}.sock", workdir / f"{model.stem}.log"
    sock.unlink(missing_ok=True)
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(binary), "-m", str(model), "--host", str(sock),
                                 "-lv", "4", *args], stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while call(sock, "GET", "/health", timeout=2)[0] != 200:
            assert proc.poll() is None, log.read_text(errors="replace")[-2000:]
            assert time.monotonic() < deadline, "llama-server not ready within 60 s"
            time.sleep(0.02)
        yield proc, sock, log
    finally:
        stop(proc)


def logged_mib(log: str, what: str) -> float:
    match = re.search(rf"CPU {what} buffer size =\s+([\d.]+) MiB", log)
    assert match, f"no '{what} buffer size' in llama-server's log"
    return float(match.group(1))


@pytest.mark.parametrize("case", list(CASES))
def test_estimate_within_tolerance_of_measured(case: str, llama_server_bin: Path,
                                               shm: Path) -> None:
    try:
        make_gguf = importlib.import_module("make_gguf")  # tools/make_gguf.py
    except ImportError as e:  # gguf or numpy missing
        unavailable(f"cannot generate a GGUF: {e} (pip install -e '.[test]')")
    kwargs, args = CASES[case]
    path = shm / f"{case}.gguf"
    make_gguf.write_model(path, **kwargs)
    info = gguf.read_info(path)
    params = memory.load_params(info, args)
    est = memory.estimate(info, params)

    with server(llama_server_bin, path, args, shm) as (proc, sock, log_path):
        # llama-server logs from a worker thread: /health can say 200 before the lines are out
        log = eventually(lambda: log_path.read_text(errors="replace"),
                         lambda text: "n_ctx_slot" in text)
        slots = re.search(r"n_ctx_slot = (\d+)", log)
        assert slots, "no 'n_ctx_slot' in llama-server's log"
        slot_ctx = int(slots.group(1))
        n_prompt = min(memory.ubatch(params), slot_ctx - 16)
        prompt = [1] + [300 + i % 200 for i in range(n_prompt - 1)]
        status, body = call(sock, "POST", "/completion", {"prompt": prompt, "n_predict": 4})
        assert status == 200, body[:500]
        anon = rss_anon(proc.pid)

    tmpfs_bytes = path.stat().st_blocks * 512
    measured = tmpfs_bytes + anon
    report = (f"{case}: estimate {est.total / MiB:.1f} MiB (weights {est.weights / MiB:.1f} "
              f"kv {est.kv_cache / MiB:.1f} compute {est.compute / MiB:.1f} overhead "
              f"{est.overhead / MiB:.1f}), measured {measured / MiB:.1f} MiB "
              f"(file {tmpfs_bytes / MiB:.1f} + anon {anon / MiB:.1f})")
    print(report)
    assert est.kv_cache / MiB == pytest.approx(logged_mib(log, "KV"), abs=0.01), report
    assert est.compute / MiB == pytest.approx(logged_mib(log, "compute"), rel=0.02), report
    assert within(est.total, measured), report
    assert within(est.total, measured, rel=0.10, floor=TIGHT), report
