"""Staging a model from its source (SSD/HDD) into the RAM disk.

The copy goes to a hidden temporary name and is renamed into place only when complete, so a
half-copied model is never visible. A per-model flock makes concurrent starts copy once. The
source is only ever opened for reading.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from hoshikage_sd import fmt
from hoshikage_sd.errors import die
from hoshikage_sd.files import write_atomic

CHUNK = 64 << 20
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
    path: Path
    size: int
    copied: bool
    seconds: float


class Store:
    def __init__(self, ramdisk: Path) -> None:
        self.ramdisk = ramdisk

    def staged(self, name: str) -> Path:
        return self.ramdisk / f"{name}.gguf"

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

    def reusable(self, name: str, ident: Identity) -> bool:
        try:
            recorded = json.loads(self._meta(name).read_text())
            return bool(recorded == asdict(ident)
                        and self.staged(name).stat().st_size == ident.size)
        except (OSError, ValueError):
            return False

    def has_copy(self, name: str) -> bool:
        """Is there a complete staged copy (with its source record) of the model?"""
        return self.staged(name).is_file() and self._meta(name).is_file()

    @staticmethod
    def size_of(path: Path) -> int:
        try:
            return path.stat().st_size
        except OSError:
            return 0

    def free_bytes(self) -> int:
        st = os.statvfs(self.ramdisk)
        return st.f_bavail * st.f_frsize

    def stage(self, name: str, source: Path, progress: Progress | None = None,
              force: bool = False) -> Staged:
        """Make ramdisk/NAME.gguf an exact copy of source; reuse one that already is."""
        start = time.monotonic()
        try:
            ident = Identity.of(source)
        except FileNotFoundError:
            die(f"model '{name}': source file {source} does not exist",
                hint="fix 'path:' in the manifest or mount the disk that holds it")
        except PermissionError:
            die(f"model '{name}': source file {source} is not readable")
        if not self.ramdisk.is_dir():
            die(f"RAM disk {self.ramdisk} does not exist", hint="is mnt-hoshikage.mount active?")
        with self.locked(name, progress):
            if not force and self.reusable(name, ident):
                return Staged(self.staged(name), ident.size, False, time.monotonic() - start)
            self.remove(name)
            free = self.free_bytes()
            if free < ident.size:
                die(f"model '{name}' needs {fmt.size(ident.size)} on the RAM disk {self.ramdisk} "
                    f"but only {fmt.size(free)} is free",
                    hint="stop another model, or give the tmpfs more room (size= in "
                         "mnt-hoshikage.mount)")
            tmp = self.ramdisk / f".{name}.gguf.tmp-{os.getpid()}"
            try:
                copy_file(source, tmp, ident.size, progress)
                write_atomic(self._meta(name), json.dumps(asdict(ident)))
                os.rename(tmp, self.staged(name))
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
                raise
        return Staged(self.staged(name), ident.size, True, time.monotonic() - start)

    def remove(self, name: str) -> int:
        """Delete the staged copy, its record and any partial copies; return bytes freed."""
        freed = 0
        for path in [self.staged(name), self._meta(name),
                     *self.ramdisk.glob(f".{name}.gguf.tmp-*")]:
            try:
                freed += path.stat().st_blocks * 512
                path.unlink()
            except FileNotFoundError:
                pass
        return freed

    def matches_source(self, name: str, source: Path) -> bool:
        """Size first (cheap), then content: is the staged copy really the source?"""
        staged = self.staged(name)
        try:
            if staged.stat().st_size != source.stat().st_size:
                return False
        except FileNotFoundError:
            return False
        return file_digest(staged) == file_digest(source)


def copy_file(source: Path, dest: Path, size: int, progress: Progress | None = None) -> None:
    """In-kernel copy (copy_file_range, else sendfile) with progress every CHUNK bytes."""
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
            os.posix_fadvise(src.fileno(), done, n, os.POSIX_FADV_DONTNEED)
            done += n
            if progress:
                progress(done, size)


def file_digest(path: Path) -> str:
    import hashlib  # only on the rare corruption check: it costs a cold start ~10 ms

    with open(path, "rb") as f:
        return hashlib.file_digest(f, "blake2b").hexdigest()

