"""Staging a model from its source (SSD/HDD) into the RAM disk.

The copy goes to a hidden temporary name and is renamed into place only when complete, so a
half-copied model is never visible. A per-model flock makes concurrent starts copy once. The
source is only ever opened for reading.

A model may be several files (Files): a split GGUF's shards are staged as
NAME-0000k-of-0000N.gguf (llama.cpp finds the other shards by the first one's name), a
projector as NAME.mmproj.gguf; one lock, one identity record for them all, and the record
is written only once every file is in place.

An age-encrypted source (encryption.py) is decrypted on its way in: the RAM disk is the only
place its plaintext exists.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from hoshikage_sd import encryption, fmt
from hoshikage_sd.errors import HoshikageError, die
from hoshikage_sd.files import write_atomic
from hoshikage_sd.manifest.model import Files

#: bytes per sendfile: also how often a copy looks whether it should give way (giveway.py)
CHUNK = 16 << 20
#: what follows NAME in a staged shard's name
SHARD_RE = re.compile(r"-\d{5}-of-\d{5}\.gguf")
# Progress callback: (bytes done, bytes total). Also called while waiting for another copy.
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class Identity:
    """What makes a staged copy reusable: the same source file, unchanged."""

    path: str
    dev: int
    ino: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, path: Path) -> Identity:
        st = os.stat(path)
        return cls(str(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


@dataclass(frozen=True)
class Staged:
    path: Path  # the main file (Files.main)
    size: int   # of all the files
    copied: bool
    seconds: float
    files: Files | None = None


class Store:
    """Copies of models in one directory: the RAM disk's (`plaintext`: an encrypted source is
    decrypted on its way in), or the SSD cache's (encrypted sources stay ciphertext)."""

    def __init__(self, ramdisk: Path, plaintext: bool = True) -> None:
        self.ramdisk = ramdisk
        self.plaintext = plaintext

    def content_size(self, ident: Identity) -> int:
        """What the file `ident` is copied to here: its bytes, or its plaintext's."""
        return encryption.content_size(ident.path, ident.size) if self.plaintext \
            else ident.size

    def staged(self, name: str) -> Path:
        return self.ramdisk / f"{name}.gguf"

    def staged_files(self, name: str, files: Files) -> Files:
        """Where the store keeps a model of `files`' shape."""
        count = len(files.shards)
        shards = (self.staged(name),) if count == 1 else tuple(
            self.ramdisk / f"{name}-{k:05d}-of-{count:05d}.gguf" for k in range(1, count + 1))
        return Files(shards, self.ramdisk / f"{name}.mmproj.gguf" if files.mmproj else None)

    def _meta(self, name: str) -> Path:
        return self.ramdisk / f".{name}.source.json"

    def _lock(self, name: str) -> Path:
        return self.ramdisk / f".{name}.lock"

    @contextlib.contextmanager
    def locked(self, name: str, progress: Progress | None = None) -> Iterator[None]:
        fd = os.open(self._lock(name), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if progress:
                        progress(0, 0)
                    time.sleep(0.05)
            yield
        finally:
            os.close(fd)

    def reusable(self, name: str, files: Files | Path) -> bool:
        """Is the store's copy of the model exactly `files` as they are now?"""
        files = Files.one(files)
        try:
            idents = [Identity.of(p) for p in files.paths]
            recorded = json.loads(self._meta(name).read_text())["files"]
            staged = self.staged_files(name, files).paths
            return bool(recorded == [asdict(i) for i in idents]
                        and all(p.stat().st_size == self.content_size(i)
                                for p, i in zip(staged, idents, strict=True)))
        except (OSError, ValueError, KeyError, TypeError, HoshikageError):
            return False

    def current(self, name: str, files: Files) -> Files | None:
        """The store's copy of `files`, when it is current."""
        return self.staged_files(name, files) if self.reusable(name, files) else None

    def has_copy(self, name: str) -> bool:
        """Is there a complete staged copy (with its source record) of the model?"""
        return self.copy_size(name) is not None

    def copy_size(self, name: str) -> int | None:
        """Bytes of the complete staged copy of the model, None when there is none."""
        try:
            staged = json.loads(self._meta(name).read_text())["staged"]
            return sum((self.ramdisk / str(n)).stat().st_size for n in staged)
        except (OSError, ValueError, KeyError, TypeError):
            return None

    @staticmethod
    def size_of(path: Path) -> int:
        try:
            return path.stat().st_size
        except OSError:
            return 0

    def free_bytes(self) -> int:
        st = os.statvfs(self.ramdisk)
        return st.f_bavail * st.f_frsize

    def stage(self, name: str, source: Files | Path, progress: Progress | None = None,
              force: bool = False, drop_behind: bool = True) -> Staged:
        """Make the store's copy of the model an exact copy of `source`; reuse one that
        already is. `drop_behind`: see copy_file."""
        start = time.monotonic()
        source = Files.one(source)
        idents = []
        for path in source.paths:
            try:
                idents.append(Identity.of(path))
            except FileNotFoundError:
                die(f"model '{name}': source file {path} does not exist",
                    hint="fix 'path:' in the manifest or mount the disk that holds it")
            except PermissionError:
                die(f"model '{name}': source file {path} is not readable")
        sizes = [self.content_size(i) for i in idents]
        total = sum(sizes)
        staged = self.staged_files(name, source)
        if not self.ramdisk.is_dir():
            die(f"RAM disk {self.ramdisk} does not exist", hint="is mnt-hoshikage.mount active?")
        with self.locked(name, progress):
            if not force and self.reusable(name, source):
                return Staged(staged.main, total, False, time.monotonic() - start, staged)
            self.remove(name)
            free = self.free_bytes()
            if free < total:
                die(f"model '{name}' needs {fmt.size(total)} on the RAM disk {self.ramdisk} "
                    f"but only {fmt.size(free)} is free",
                    hint="stop another model, or give the tmpfs more room (size= in "
                         "mnt-hoshikage.mount)")
            temporaries = [self.ramdisk / f".{name}.gguf.tmp-{os.getpid()}-{k}"
                           for k in range(len(idents))]
            try:
                done = 0
                for src, tmp, size in zip(source.paths, temporaries, sizes, strict=True):
                    def part(n: int, _size: int, before: int = done) -> None:
                        if progress:
                            progress(before + n, total)
                    if self.plaintext and encryption.is_encrypted(src):
                        encryption.decrypt(src, tmp, size, part if progress else None)
                    else:
                        copy_file(src, tmp, size, part if progress else None, drop_behind)
                    done += size
                for tmp, dest in zip(temporaries, staged.paths, strict=True):
                    os.rename(tmp, dest)
                # last: a copy without its record is never taken for current
                write_atomic(self._meta(name), record(idents, staged.paths))
            except BaseException:
                for tmp in temporaries:
                    with contextlib.suppress(FileNotFoundError):
                        tmp.unlink()
                raise
        return Staged(staged.main, total, True, time.monotonic() - start, staged)

    def _files(self, name: str) -> list[Path]:
        """Every file of the model's copy: its record, its files, partial copies."""
        return [self._meta(name), self.staged(name), self.ramdisk / f"{name}.mmproj.gguf",
                *(p for p in self.ramdisk.glob(f"{name}-*-of-*.gguf")
                  if SHARD_RE.fullmatch(p.name[len(name):])),
                *self.ramdisk.glob(f".{name}.gguf.tmp-*")]

    def held_bytes(self, name: str) -> int:
        """Bytes the model's copy holds here (what remove() frees)."""
        held = 0
        for path in self._files(name):
            with contextlib.suppress(FileNotFoundError):
                held += path.stat().st_blocks * 512
        return held

    def remove(self, name: str) -> int:
        """Delete the staged copy (every file of it), its record and any partial copies;
        return bytes freed."""
        freed = 0
        for path in self._files(name):
            try:
                freed += path.stat().st_blocks * 512
                path.unlink()
            except FileNotFoundError:
                pass
        return freed

    def matches_source(self, name: str, source: Files | Path) -> bool:
        """Size first (cheap), then content: is the staged copy really the source?"""
        source = Files.one(source)
        pairs = list(zip(self.staged_files(name, source).paths, source.paths, strict=True))
        try:
            if any(s.stat().st_size != p.stat().st_size for s, p in pairs):
                return False
        except FileNotFoundError:
            return False
        return all(file_digest(s) == file_digest(p) for s, p in pairs)


def log_staged(name: str, staged: Staged, source: Files, how: str = "") -> None:
    """The journal's `staged` record of a copy made (nothing for one reused)."""
    if not staged.copied:
        return
    from hoshikage_sd import log

    rate = staged.size / max(staged.seconds, 1e-6)
    log.event("staged", name,
              f"staged {name}: {fmt.size(staged.size)} from {source.main} in "
              f"{staged.seconds:.2f} s ({fmt.size(rate)}/s){how}",
              bytes=staged.size, seconds=f"{staged.seconds:.3f}", source=source.main,
              staged_path=staged.path, files=len(source.paths))


def record(idents: Sequence[Identity], staged: Sequence[Path]) -> str:
    """A copy's identity record (.NAME.source.json): the files it was copied from, as they
    were, and its own files' names."""
    return json.dumps({"files": [asdict(i) for i in idents], "staged": [p.name for p in staged]})


def copy_file(source: Path, dest: Path, size: int, progress: Progress | None = None,
              drop_behind: bool = True) -> None:
    """In-kernel copy (copy_file_range, else sendfile) with progress every CHUNK bytes.

    `drop_behind`: drop the source's pages from the page cache behind the copy. Not for a
    copy made in the background (giveway.py): one given up half-way for a request that
    waits for the model would have dropped the pages that request's load then reads."""
    with open(source, "rb") as src, \
            open(dest, "xb") as dst:
        os.posix_fadvise(src.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
        done = 0
        use_cfr = True
        while done < size:
            want = min(CHUNK, size - done)
            try:
                if use_cfr:
                    n = os.copy_file_range(src.fileno(), dst.fileno(), want)
                else:
                    n = os.sendfile(dst.fileno(), src.fileno(), done, want)
            except OSError as exc:
                if use_cfr and exc.errno in (errno.EXDEV, errno.EINVAL, errno.ENOSYS,
                                             errno.EOPNOTSUPP):
                    use_cfr = False
                    continue
                if exc.errno == errno.ENOSPC:
                    die(f"the RAM disk filled up while copying {source}")
                raise
            if n == 0:
                die(f"{source} shrank while it was being copied ({done} of {size} bytes)")
            # The copy is the cache now: holding the source's pages too would cost the model's
            # size twice in RAM (and time, on a VM that charges for touching fresh memory).
            if drop_behind:
                os.posix_fadvise(src.fileno(), done, n, os.POSIX_FADV_DONTNEED)
            done += n
            if progress:
                progress(done, size)


def file_digest(path: Path) -> str:
    import hashlib  # only on the rare corruption check: not on every cold start

    with open(path, "rb") as f:
        return hashlib.file_digest(f, "blake2b").hexdigest()

