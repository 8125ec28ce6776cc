"""hoshikage_sd.store: staging a model copy into the RAM disk, atomically and once."""

from __future__ import annotations

import multiprocessing
import os
import shutil
import time
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier
from pathlib import Path

import pytest

from hoshikage_sd import fmt
from hoshikage_sd import staging as store
from hoshikage_sd.errors import HoshikageError
from hoshikage_sd.staging import Store

NAME = "tiny"


def pattern(size: int, seed: int = 0) -> bytes:
    """Deterministic, non-repeating-per-chunk content, so misplaced bytes are caught."""
    block = bytes((i * 31 + seed) % 251 for i in range(251))
    return (block * (size // len(block) + 1))[:size]


def make_source(tmp_path: Path, size: int, seed: int = 0) -> Path:
    src_dir = tmp_path / "ssd"
    src_dir.mkdir(exist_ok=True)
    source = src_dir / "tiny-q4.gguf"
    source.write_bytes(pattern(size, seed))
    return source


@pytest.fixture
def ramdisk(tmp_path: Path) -> Path:
    path = tmp_path / "ram"
    path.mkdir()
    return path


def leftovers(ramdisk: Path) -> list[str]:
    """Files in the RAM disk other than the per-model lock file."""
    return sorted(p.name for p in ramdisk.iterdir() if p.name != f".{NAME}.lock")


# -- copy and reuse ------------------------------------------------------------------------

def test_stage_copies_byte_identical_and_leaves_source_untouched(tmp_path: Path,
                                                                 ramdisk: Path) -> None:
    source = make_source(tmp_path, 300_000)
    before = source.stat()
    content = source.read_bytes()
    staged = Store(ramdisk).stage(NAME, source)
    assert staged.copied is True
    assert staged.path == ramdisk / f"{NAME}.gguf"
    assert staged.size == len(content)
    assert staged.seconds >= 0
    assert staged.path.read_bytes() == content
    after = source.stat()
    assert (after.st_mtime_ns, after.st_size, after.st_ino) == \
        (before.st_mtime_ns, before.st_size, before.st_ino)
    assert source.read_bytes() == content
    assert sorted(p.name for p in source.parent.iterdir()) == [source.name]
    assert leftovers(ramdisk) == [f".{NAME}.source.json", f"{NAME}.gguf"]


def cached_bytes(path: Path) -> int:
    """The file's bytes in the page cache (util-linux fincore)."""
    import subprocess

    return int(subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES",
                               str(path)], check=True, capture_output=True, text=True).stdout)


@pytest.mark.skipif(not shutil.which("fincore"), reason="needs util-linux's fincore")
@pytest.mark.parametrize("drop_behind", [True, False])
def test_a_copy_in_the_background_leaves_the_source_in_the_page_cache(
        tmp_path: Path, ramdisk: Path, drop_behind: bool) -> None:
    """A copy given up half-way (giveway.py) must not have dropped the pages that the load
    of the request waiting for it reads; a staging before a load drops them behind it."""
    source = make_source(tmp_path, 4 << 20)
    with open(source, "rb") as f:
        os.fsync(f.fileno())  # clean pages: dirty ones cannot be dropped
        f.read()
    if cached_bytes(source) < 4 << 20:
        pytest.skip(f"{tmp_path}'s file system does not keep pages cached")
    Store(ramdisk).stage(NAME, source, drop_behind=drop_behind)
    assert cached_bytes(source) == (0 if drop_behind else 4 << 20)


def test_second_stage_reuses_without_rewriting(tmp_path: Path, ramdisk: Path) -> None:
    source = make_source(tmp_path, 100_000)
    st = Store(ramdisk)
    first = st.stage(NAME, source)
    inode, mtime = first.path.stat().st_ino, first.path.stat().st_mtime_ns
    second = st.stage(NAME, source)
    assert second.copied is False
    assert second.path == first.path
    assert second.size == 100_000
    assert second.path.stat().st_ino == inode
    assert second.path.stat().st_mtime_ns == mtime


def test_changed_source_is_copied_again(tmp_path: Path, ramdisk: Path) -> None:
    source = make_source(tmp_path, 100_000)
    st = Store(ramdisk)
    st.stage(NAME, source)
    new = pattern(100_000, seed=7)  # same size, different bytes
    source.write_bytes(new)
    stat = source.stat()
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
    again = st.stage(NAME, source)
    assert again.copied is True
    assert again.path.read_bytes() == new


def test_replaced_source_of_other_size_is_copied_again(tmp_path: Path, ramdisk: Path) -> None:
    source = make_source(tmp_path, 100_000)
    st = Store(ramdisk)
    st.stage(NAME, source)
    replacement = source.with_name("new.gguf")
    replacement.write_bytes(pattern(50_000, seed=3))
    os.replace(replacement, source)
    again = st.stage(NAME, source)
    assert again.copied is True
    assert again.size == 50_000
    assert again.path.read_bytes() == source.read_bytes()


def test_force_copies_again(tmp_path: Path, ramdisk: Path) -> None:
    source = make_source(tmp_path, 100_000)
    st = Store(ramdisk)
    staged = st.stage(NAME, source).path
    with open(staged, "rb") as old:
        assert st.stage(NAME, source).copied is False
        assert os.fstat(old.fileno()).st_nlink == 1  # reused: still the same file
        forced = st.stage(NAME, source, force=True)
        assert forced.copied is True
        assert os.fstat(old.fileno()).st_nlink == 0  # the old copy was replaced
    assert forced.path.read_bytes() == source.read_bytes()


def test_staged_copy_with_wrong_size_is_not_reused(tmp_path: Path, ramdisk: Path) -> None:
    source = make_source(tmp_path, 100_000)
    st = Store(ramdisk)
    staged = st.stage(NAME, source).path
    with open(staged, "r+b") as f:
        f.truncate(10)
    again = st.stage(NAME, source)
    assert again.copied is True
    assert staged.read_bytes() == source.read_bytes()


def test_empty_source(tmp_path: Path, ramdisk: Path) -> None:
    source = make_source(tmp_path, 0)
    staged = Store(ramdisk).stage(NAME, source)
    assert staged.copied is True
    assert staged.path.read_bytes() == b""


# -- atomicity: temp name, then rename ------------------------------------------------------

def test_no_final_name_until_the_copy_is_complete(tmp_path: Path, ramdisk: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store, "CHUNK", 4096)
    size = 10 * 4096 + 123
    source = make_source(tmp_path, size)
    seen: list[tuple[int, int, bool, list[str]]] = []

    def progress(done: int, total: int) -> None:
        temps = [p.name for p in ramdisk.glob(f".{NAME}.gguf.tmp-*")]
        seen.append((done, total, (ramdisk / f"{NAME}.gguf").exists(), temps))

    staged = Store(ramdisk).stage(NAME, source, progress)
    assert staged.copied is True
    assert len(seen) == 11
    assert [s[0] for s in seen] == [min(4096 * i, size) for i in range(1, 12)]
    assert all(total == size for _, total, _, _ in seen)
    assert not any(final for _, _, final, _ in seen), "NAME.gguf visible before complete"
    assert all(temps == [f".{NAME}.gguf.tmp-{os.getpid()}-0"] for *_, temps in seen)
    assert staged.path.read_bytes() == source.read_bytes()
    assert not list(ramdisk.glob(f".{NAME}.gguf.tmp-*"))


def test_failure_mid_copy_leaves_nothing(tmp_path: Path, ramdisk: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store, "CHUNK", 4096)
    source = make_source(tmp_path, 20 * 4096)

    class Interrupted(Exception):
        pass

    calls: list[int] = []

    def progress(done: int, total: int) -> None:
        calls.append(done)
        if len(calls) == 3:
            assert list(ramdisk.glob(f".{NAME}.gguf.tmp-*")), "copy goes to a temp file"
            raise Interrupted

    st = Store(ramdisk)
    with pytest.raises(Interrupted):
        st.stage(NAME, source, progress)
    assert len(calls) == 3
    assert leftovers(ramdisk) == []
    # and the next start copies from scratch
    again = st.stage(NAME, source)
    assert again.copied is True
    assert again.path.read_bytes() == source.read_bytes()


def test_failure_while_replacing_removes_the_old_copy_too(tmp_path: Path, ramdisk: Path,
                                                          monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    monkeypatch.setattr(store, "CHUNK", 4096)
    source = make_source(tmp_path, 8 * 4096)
    st = Store(ramdisk)
    st.stage(NAME, source)

    def fail(done: int, total: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        st.stage(NAME, source, fail, force=True)
    assert leftovers(ramdisk) == []


# -- errors --------------------------------------------------------------------------------

def test_not_enough_free_space(tmp_path: Path, ramdisk: Path,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    source = make_source(tmp_path, 10 * 1024)
    monkeypatch.setattr(Store, "free_bytes", lambda self: 1024)
    with pytest.raises(HoshikageError) as info:
        Store(ramdisk).stage(NAME, source)
    message = info.value.message
    assert f"'{NAME}'" in message
    assert "10.0 KiB" in message  # needed
    assert "1.0 KiB" in message  # free
    assert str(ramdisk) in message
    assert info.value.hint
    assert leftovers(ramdisk) == []


def test_free_bytes_is_the_filesystems(ramdisk: Path) -> None:
    st = os.statvfs(ramdisk)
    free = Store(ramdisk).free_bytes()
    assert free > 0
    assert abs(free - st.f_bavail * st.f_frsize) < 64 << 20


def test_missing_source(tmp_path: Path, ramdisk: Path) -> None:
    missing = tmp_path / "ssd" / "gone.gguf"
    with pytest.raises(HoshikageError) as info:
        Store(ramdisk).stage(NAME, missing)
    assert str(missing) in info.value.message
    assert f"'{NAME}'" in info.value.message
    assert list(ramdisk.iterdir()) == []


def test_missing_ramdisk(tmp_path: Path) -> None:
    source = make_source(tmp_path, 100)
    with pytest.raises(HoshikageError) as info:
        Store(tmp_path / "no-ram").stage(NAME, source)
    assert str(tmp_path / "no-ram") in info.value.message


# -- verification --------------------------------------------------------------------------

def test_matches_source(tmp_path: Path, ramdisk: Path) -> None:
    source = make_source(tmp_path, 200_000)
    st = Store(ramdisk)
    assert st.matches_source(NAME, source) is False  # nothing staged yet
    st.stage(NAME, source)
    assert st.matches_source(NAME, source) is True


def test_matches_source_detects_a_flipped_byte(tmp_path: Path, ramdisk: Path) -> None:
    source = make_source(tmp_path, 200_000)
    st = Store(ramdisk)
    staged = st.stage(NAME, source).path
    with open(staged, "r+b") as f:
        f.seek(150_001)
        byte = f.read(1)
        f.seek(150_001)
        f.write(bytes([byte[0] ^ 0x01]))
    assert staged.stat().st_size == source.stat().st_size
    assert st.matches_source(NAME, source) is False


def test_matches_source_detects_truncation(tmp_path: Path, ramdisk: Path) -> None:
    source = make_source(tmp_path, 200_000)
    st = Store(ramdisk)
    staged = st.stage(NAME, source).path
    with open(staged, "r+b") as f:
        f.truncate(199_999)
    assert st.matches_source(NAME, source) is False


# -- remove --------------------------------------------------------------------------------

def test_remove_is_idempotent_and_counts_bytes(tmp_path: Path, ramdisk: Path) -> None:
    source = make_source(tmp_path, 300_000)
    st = Store(ramdisk)
    st.stage(NAME, source)
    stray = ramdisk / f".{NAME}.gguf.tmp-99999"
    stray.write_bytes(pattern(50_000))
    other = ramdisk / "other.gguf"
    other.write_bytes(b"x")
    other_tmp = ramdisk / ".other.gguf.tmp-1"
    other_tmp.write_bytes(b"x")
    held = st.held_bytes(NAME)
    freed = st.remove(NAME)
    assert freed >= 350_000 and held == freed  # what make_room counts a kept copy to free
    assert not (ramdisk / f"{NAME}.gguf").exists()
    assert not stray.exists()
    assert not (ramdisk / f".{NAME}.source.json").exists()
    assert other.exists() and other_tmp.exists(), "another model's files are not touched"
    assert st.remove(NAME) == 0
    assert Store(ramdisk).stage(NAME, source).copied is True


def test_remove_when_nothing_was_staged(ramdisk: Path) -> None:
    assert Store(ramdisk).remove(NAME) == 0


# -- two processes racing for one model ----------------------------------------------------

RACE_SIZE = 4 << 20
RACE_CHUNK = 256 << 10


def race_worker(ramdisk: str, source: str, barrier: Barrier,
                results: Queue[tuple[int, bool, bool]]) -> None:
    """One activator: wait for the other, then stage; report (pid, copied, waited)."""
    store.CHUNK = RACE_CHUNK  # spawned: the parent's monkeypatch does not reach us
    waited = False

    def progress(done: int, total: int) -> None:
        nonlocal waited
        if total == 0:
            waited = True
        else:
            time.sleep(0.02)  # a slow disk, so that the copies would overlap

    barrier.wait(timeout=30)
    staged = Store(Path(ramdisk)).stage(NAME, Path(source), progress)
    results.put((os.getpid(), staged.copied, waited))


def test_two_processes_racing_copy_once(tmp_path: Path, ramdisk: Path) -> None:
    source = make_source(tmp_path, RACE_SIZE)
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    results: Queue[tuple[int, bool, bool]] = ctx.Queue()
    procs = [ctx.Process(target=race_worker, args=(str(ramdisk), str(source), barrier, results))
             for _ in range(2)]
    for p in procs:
        p.start()
    try:
        outcome = [results.get(timeout=60) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    assert [p.exitcode for p in procs] == [0, 0]
    copied = sorted(c for _, c, _ in outcome)
    assert copied == [False, True], outcome
    loser = next(o for o in outcome if not o[1])
    assert loser[2], "the second process waited on the lock while the first copied"
    assert (ramdisk / f"{NAME}.gguf").read_bytes() == source.read_bytes()
    assert leftovers(ramdisk) == [f".{NAME}.source.json", f"{NAME}.gguf"]


# -- human() -------------------------------------------------------------------------------

@pytest.mark.parametrize(("n", "text"), [
    (0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (1536, "1.5 KiB"),
    (5 << 20, "5.0 MiB"), (3 << 30, "3.0 GiB"), (2 << 40, "2.0 TiB"), (5000 << 40, "5000.0 TiB"),
])
def test_human(n: int, text: str) -> None:
    assert fmt.size(n) == text
