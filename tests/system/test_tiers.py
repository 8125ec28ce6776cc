"""The tiered store under real systemd: HDD source → served → copied to the SSD cache in the
background, an old model expired to make room, each step in the journal."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import pytest

from hoshikage_sd.staging import Identity, record
from testbed.deploy import deploy, hoshikage_bin, manifest
from tests.system.conftest import ContainerFactory

pytestmark = pytest.mark.system
CACHE = "/var/cache/hoshikage"


@pytest.fixture
def hdd(tmp_path: Path) -> Path:
    from make_gguf import write_model

    directory = tmp_path / "hdd"
    directory.mkdir()
    write_model(directory / "old.gguf", seed=1)
    write_model(directory / "new.gguf", seed=2)
    return directory


def test_hdd_model_is_served_then_cached_and_an_old_one_expires(
        container_factory: ContainerFactory, hdd: Path, llama_server_bin: Path) -> None:
    size = (hdd / "new.gguf").stat().st_size
    text = manifest(llama_server_bin, {"old": "ttl: 1h", "new": "ttl: 1h"},
                    min_reload_seconds="0s")
    text = text.replace("models:\n", f"cache:\n  dir: {CACHE}\n  max_size: {size + size // 2}\n"
                                     "models:\n", 1)
    hk = deploy(container_factory, hdd, text)
    root = hk.container.root
    # "old" sits in the cache already, unused for 40 days.
    cache = root / CACHE.lstrip("/")
    cache.mkdir(parents=True)
    (cache / "old.gguf").write_bytes((hdd / "old.gguf").read_bytes())
    ident = Identity.of(hdd / "old.gguf")
    (cache / ".old.source.json").write_text(record(
        [replace(ident, path="/srv/models/old.gguf")], [cache / "old.gguf"]))
    hk.container.exec("chown", "-R", "hoshikage:hoshikage", CACHE)  # README: the user owns it
    stats = root / "var/lib/hoshikage/stats.json"
    stats.parent.mkdir(parents=True, exist_ok=True)
    long_ago = time.time() - 40 * 86400
    stats.write_text(json.dumps({"version": 1, "models": {"old": {
        "uses": [{"at": long_ago, "runtime": 600}], "total_uses": 1, "total_runtime": 600,
        "last_load_seconds": 0.1}}}))

    status, body = hk.chat("new")
    assert status == 200, body
    hk.wait_for("the copy alongside", lambda: bool(hk.events("staged", "new")))
    (staged,) = hk.events("staged", "new")
    assert staged["HOSHIKAGE_SOURCE"] == "/srv/models/new.gguf"  # served straight from "HDD"
    hk.wait_for("the cache copy", lambda: any(
        e["HOSHIKAGE_PHASE"] == "done" for e in hk.events("cache-copy", "new")))
    (expired,) = hk.events("cache-expire", "old")
    assert "makes room for new" in expired["MESSAGE"] and float(expired["HOSHIKAGE_RANK"]) < 0
    assert expired["PRIORITY"] == "4"  # a warning
    assert not (cache / "old.gguf").exists()
    assert (cache / "new.gguf").read_bytes() == (hdd / "new.gguf").read_bytes()
    assert not list(cache.glob(".new.gguf.tmp-*"))
    events = hk.container.journal("HOSHIKAGE_MODEL=new", "+", "HOSHIKAGE_MODEL=old")
    order = [(e["HOSHIKAGE_EVENT"], e.get("HOSHIKAGE_PHASE", "")) for e in events
             if e["HOSHIKAGE_EVENT"] != "admission"]
    # Ready first (served from the source), then the RAM-disk copy and the SSD cache's
    # work side by side: expire to make room, then the copy.
    assert order[0] == ("ready", ""), order
    assert sorted(order[1:5]) == sorted([("staged", ""), ("cache-expire", ""),
                                         ("cache-copy", "start"), ("cache-copy", "done")])
    cache_work = [e for e in order[1:5] if e[0] != "staged"]
    assert cache_work == [("cache-expire", ""), ("cache-copy", "start"),
                          ("cache-copy", "done")], order
    assert (hdd / "new.gguf").stat().st_mtime_ns == Identity.of(hdd / "new.gguf").mtime_ns

    # Unloaded and loaded again by hand, "new" now comes from the SSD copy.
    cli = str(hoshikage_bin())
    assert "new unloaded" in hk.container.exec(cli, "unload", "new").stdout
    assert "new loaded" in hk.container.exec(cli, "load", "new").stdout
    hk.wait_for("the second copy", lambda: len(hk.events("staged", "new")) == 2)
    staged_again = hk.events("staged", "new")[-1]
    assert staged_again["HOSHIKAGE_SOURCE"] == f"{CACHE}/new.gguf"
    listing = hk.container.exec(cli, "list").stdout
    assert any(line.startswith("new ") and "loaded cached" in line
               for line in listing.splitlines()), listing


def test_load_refuses_to_flap(container_factory: ContainerFactory, hdd: Path,
                              llama_server_bin: Path) -> None:
    hk = deploy(container_factory, hdd, manifest(llama_server_bin, {"new": "ttl: 1h"},
                                                 min_reload_seconds="30s"))
    cli = str(hoshikage_bin())
    assert "new loaded" in hk.container.exec(cli, "load", "new").stdout
    hk.container.exec(cli, "unload", "new")
    again = hk.container.exec(cli, "load", "new", check=False)
    assert again.returncode == 3 and "too soon, wait" in again.stderr, again.stderr
    assert hk.state("hoshikage-model@new.service") == "inactive"


def test_a_bad_cache_copy_fails_one_start_not_every_one(
        container_factory: ContainerFactory, hdd: Path, llama_server_bin: Path) -> None:
    """The SSD cache's copy rotted (its record still current): the start that read it fails,
    and drops it; the next start reads the source and serves."""
    text = manifest(llama_server_bin, {"new": "ttl: 1h"}, min_reload_seconds="0s")
    text = text.replace("models:\n", f"cache:\n  dir: {CACHE}\nmodels:\n", 1)
    hk = deploy(container_factory, hdd, text)
    cache = hk.container.root / CACHE.lstrip("/")
    cache.mkdir(parents=True)
    rotten = bytearray((hdd / "new.gguf").read_bytes())
    rotten[:4] = b"XXXX"  # not a GGUF any more, the same size
    (cache / "new.gguf").write_bytes(rotten)
    ident = Identity.of(hdd / "new.gguf")
    (cache / ".new.source.json").write_text(record(
        [replace(ident, path="/srv/models/new.gguf")], [cache / "new.gguf"]))
    hk.container.exec("chown", "-R", "hoshikage:hoshikage", CACHE)
    status, body = hk.chat("new")
    assert status == 503, body
    assert not (cache / "new.gguf").exists()  # dropped by the start that failed on it
    status, body = hk.chat("new")
    assert status == 200, body
