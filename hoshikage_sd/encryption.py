"""Models encrypted at rest with age (age-encryption.org/v1), decrypted only into RAM.

An encrypted model is a GGUF file encrypted with Debian's `age` to the machine's recipient
(`hoshikage encrypt`); it is recognised by its first bytes, whatever its name. The identity
(the private key) reaches the units as a systemd credential named `age-identity`
(`hoshikage keys setup` writes the drop-ins): sealed with `systemd-creds` (the host key and,
where present, the TPM2) or, on request, a root-only file. It is never in the manifest, an
environment variable, a command line or the journal: it is read from the credential's file
(or, for root's CLI, from `systemd-creds decrypt`'s output) into this process's memory.

Decryption is agefile.py's (python3-cryptography): staging decrypts into the RAM disk on
every core (`decrypt`), the GGUF header reader decrypts only the chunks it reads
(`open_plaintext`), and the check before admission opens the first and the last chunk
(`check_readable`). Sizes come from the ciphertext alone: age's payload is a 16-byte nonce
and 64 KiB chunks each with a 16-byte tag.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from hoshikage_sd.errors import HoshikageError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    from hoshikage_sd.agefile import Payload
    from hoshikage_sd.manifest import Config

MAGIC = b"age-encryption.org/v1\n"
#: the payload: a nonce, then chunks of CHUNK plaintext bytes each sealed with a TAG
NONCE, CHUNK, TAG = 16, 64 << 10, 16
#: a header longer than this is not one we made (one stanza per recipient, ~100 bytes each)
MAX_HEADER = 1 << 20
#: the credential's name in $CREDENTIALS_DIRECTORY (the units' drop-ins name it)
CREDENTIAL = "age-identity"
KEY_DIR = Path("/etc/hoshikage")
#: the identity sealed by `systemd-creds encrypt` (LoadCredentialEncrypted=)
SEALED_IDENTITY = KEY_DIR / "age-identity.cred"
#: the identity as a root-only file (LoadCredential=), for machines that want that
PLAIN_IDENTITY = KEY_DIR / "age-identity.key"
#: the public keys `hoshikage encrypt` encrypts to, one per line (a backup key: a line more)
RECIPIENTS = KEY_DIR / "age-recipients"
#: the units that read encrypted models (the model units stage, the router reads headers),
#: and the drop-in `hoshikage keys setup` gives each of them the credential with
UNITS = ("hoshikage-model@.service", "hoshikage.service")
DROPIN_DIR = Path("/etc/systemd/system")
DROPIN = "50-age-identity.conf"
#: chunks decrypted per task when staging: 1 MiB of plaintext per pread and pwrite
BATCH = 16
#: decrypting threads when staging (ctypes lets go of the GIL in each OpenSSL call):
#: one per core, up to four (docs/performance.md, "Encrypted models")
THREADS = min(4, os.cpu_count() or 1)

Progress = Callable[[int, int], None]

#: what age's failures mean to an operator: AgeError.kind -> hint
HINTS = {
    "key": "encrypt it again with `hoshikage encrypt`, or add this machine's recipient "
           f"({RECIPIENTS}) where it was encrypted",
    "damaged": "copy or encrypt it again",
    "format": "encrypt it with `hoshikage encrypt`",
    "identity": "run `hoshikage keys setup` (as root)",
}


class DecryptError(HoshikageError):
    """A file that cannot be decrypted: names the file and the cause, never the key."""

    def __init__(self, path: Path | str, cause: str, hint: str | None = None) -> None:
        super().__init__(f"cannot decrypt {path}: {cause}",
                         hint=hint or "journalctl -t hoshikage says what to do; "
                                      "README \"Encrypted models\"")
        self.path, self.cause = str(path), cause


def is_encrypted(path: Path | str) -> bool:
    """Does the file start as an age file does? (False when it cannot be read.)"""
    try:
        with open(path, "rb", buffering=0) as f:
            return f.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


def named_or_encrypted(path: Path | str) -> bool:
    """Encrypted, or named as if it were (a *.age file that is not age is an error to say,
    not a GGUF to try)."""
    return str(path).endswith(".age") or is_encrypted(path)


@contextlib.contextmanager
def _failure(path: Path | str) -> Iterator[None]:
    """agefile's errors as DecryptError naming `path`."""
    from hoshikage_sd.agefile import AgeError

    try:
        yield
    except AgeError as err:
        raise DecryptError(path, str(err), HINTS.get(err.kind)) from None


def plaintext_size(path: Path | str) -> int:
    """The size of what `path` decrypts to, from its size and header alone (no key)."""
    from hoshikage_sd.agefile import read_header

    with open(path, "rb", buffering=0) as f, _failure(path):
        size = os.fstat(f.fileno()).st_size
        header = read_header(os.pread(f.fileno(), min(size, MAX_HEADER), 0))
    payload = size - header.length - NONCE
    chunks = max(1, -(-payload // (CHUNK + TAG)))
    last = payload - (chunks - 1) * (CHUNK + TAG)
    if last < TAG or (last == TAG and chunks > 1):
        raise DecryptError(path, "the file is damaged or truncated (no complete last chunk)",
                           HINTS["damaged"])
    return payload - chunks * TAG


def content_size(path: Path | str, size: int) -> int:
    """What a file of `size` bytes stages to: itself, or its plaintext when encrypted."""
    return plaintext_size(path) if is_encrypted(path) else size


def identity_text() -> str:
    """The age identity file's text: the unit's credential; else, for root's CLI, the
    root-only file or the sealed credential as `systemd-creds decrypt` gives it."""
    directory = os.environ.get("CREDENTIALS_DIRECTORY")
    for path in ([Path(directory) / CREDENTIAL] if directory else []) + [PLAIN_IDENTITY]:
        with contextlib.suppress(FileNotFoundError, NotADirectoryError, PermissionError):
            return path.read_text()
    if not os.access(SEALED_IDENTITY, os.R_OK):
        raise HoshikageError(
            "no age identity: this process has no credential 'age-identity'",
            hint="run `hoshikage keys setup` (as root), then `systemctl daemon-reload`")
    from hoshikage_sd import proc

    result = proc.run(["systemd-creds", "decrypt", f"--name={CREDENTIAL}",
                       str(SEALED_IDENTITY), "-"], check=False)
    if result.returncode != 0:
        raise HoshikageError(f"cannot unseal {SEALED_IDENTITY}: "
                             f"{(result.stderr or '').strip() or 'systemd-creds failed'}",
                             hint="was it sealed on this machine? `hoshikage keys setup` "
                                  "makes a new one")
    return result.stdout


@functools.lru_cache(maxsize=1)
def _keys() -> list[X25519PrivateKey]:
    """This process's identities, read once: root's CLI unseals the credential with a
    systemd-creds run, not one per encrypted file it looks at. (A unit's credential does not
    change while it runs.)"""
    from hoshikage_sd.agefile import AgeError, identities

    try:
        return identities(identity_text())
    except AgeError as err:
        raise HoshikageError(f"the age identity cannot be used: {err}",
                             hint=HINTS["identity"]) from None


@contextlib.contextmanager
def opened(path: Path | str) -> Iterator[Payload]:
    """The encrypted file `path`, its header read and its file key unwrapped."""
    from hoshikage_sd.agefile import Payload

    keys = _keys()
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        with _failure(path):
            yield Payload(fd, os.fstat(fd).st_size, keys)
    finally:
        os.close(fd)


def decrypt(source: Path, dest: Path, size: int, progress: Progress | None = None,
            every: int = 64 << 20) -> None:
    """Decrypt `source` into the new file `dest` (on the RAM disk): `size` (plaintext_size)
    bytes or an error. On error `dest` is left for the caller to delete (it stages to a
    temporary name)."""
    out = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)

    def write(first: int, view: memoryview) -> int:
        offset, written = first * CHUNK, 0
        while view:
            n = os.pwrite(out, view, offset)
            view, offset, written = view[n:], offset + n, written + n
        return written

    try:
        _each_run(source, size, write, progress, every, forget=True)
    finally:
        os.close(out)


def verify(source: Path, size: int) -> None:
    """Authenticate every chunk of `source` without keeping a byte of its plaintext: what a
    load that evicts other models checks first (a chunk damaged in the middle would
    otherwise show only while it decrypts, after the evictions)."""
    _each_run(source, size, lambda first, view: len(view))


def _each_run(source: Path, size: int, consume: Callable[[int, memoryview], int],
              progress: Progress | None = None, every: int = 64 << 20,
              forget: bool = False) -> None:
    """Decrypt `source` run by run: THREADS threads take BATCH chunks at a time, in the
    file's order (its readahead stays useful), each run read and decrypted through two
    buffers per thread that are reused, then handed to `consume(first chunk, plaintext)`,
    which says how many bytes it took; with `forget`, the ciphertext's pages leave the page
    cache after (once decrypted into RAM they are not worth keeping)."""
    from concurrent.futures import Future, ThreadPoolExecutor

    with opened(source) as payload:
        if payload.size != size:
            raise DecryptError(source, f"it decrypts to {payload.size} bytes, not {size}")
        os.posix_fadvise(payload.fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        local, readers = threading.local(), []

        def part(first: int) -> int:
            if (reader := getattr(local, "reader", None)) is None:
                reader = local.reader = payload.reader(BATCH)
                readers.append(reader)
            return consume(first, reader.chunks(first))

        done, reported = 0, 0
        try:
            with ThreadPoolExecutor(THREADS, thread_name_prefix="decrypt") as pool, \
                    _failure(source):
                pending: list[Future[int]] = []
                for first in range(0, payload.chunks, BATCH):
                    pending.append(pool.submit(part, first))
                    if len(pending) >= 2 * THREADS:  # the order of the file, give or take
                        done += pending.pop(0).result()
                        if progress and done - reported >= every:
                            reported = done
                            progress(done, size)
                for future in pending:
                    done += future.result()
        finally:
            for reader in readers:
                reader.close()
        if forget:
            with contextlib.suppress(OSError):
                os.posix_fadvise(payload.fd, 0, 0, os.POSIX_FADV_DONTNEED)
    if done != size:
        raise DecryptError(source, f"it decrypted to {done} bytes, not {size}")
    if progress:
        progress(done, size)


class Plaintext:
    """An encrypted file's plaintext as a file to read (and seek in) for the GGUF header
    reader: only the chunks it reads are decrypted."""

    def __init__(self, payload: Payload) -> None:
        self.payload, self.pos = payload, 0

    def read(self, n: int) -> bytes:
        data = self.payload.read_at(self.pos, n)
        self.pos += len(data)
        return data

    def seek(self, offset: int) -> int:
        self.pos = offset
        return offset


@contextlib.contextmanager
def open_plaintext(path: Path | str) -> Iterator[Plaintext]:
    """The plaintext of `path`; only what is read is decrypted."""
    with opened(path) as payload, _failure(path):
        yield Plaintext(payload)


def check_readable(path: Path | str) -> None:
    """Open the file and decrypt its first and last chunks: a wrong key, a file that is not
    age, an altered header or a truncated file fail here, before anything is evicted or
    staged for it (a chunk damaged in between shows while it decrypts)."""
    with opened(path) as payload:
        payload.chunk(0)
        payload.chunk(payload.chunks - 1)


def swap_risk(swaps: str | None = None, ramdisk_options: str | None = None,
              sys_block: Path = Path("/sys/block")) -> str | None:
    """Where the RAM disk's pages could be written to a disk in plaintext: the first swap
    that is neither zram nor dm-crypt, unless the RAM disk is mounted `noswap`; None when
    there is none."""
    if ramdisk_options is not None and "noswap" in ramdisk_options.split(","):
        return None
    if swaps is None:
        try:
            swaps = Path("/proc/swaps").read_text()
        except OSError:
            return None
    for line in swaps.splitlines()[1:]:
        fields = line.split()
        if not fields:
            continue
        device = fields[0].replace("\\040", " ")
        base = os.path.basename(device)
        if fields[1:2] == ["partition"] and base.startswith("zram"):
            continue
        if base.startswith("dm-") or device.startswith("/dev/mapper/"):
            with contextlib.suppress(OSError):
                dm = base if base.startswith("dm-") else \
                    os.path.basename(os.path.realpath(device))
                if (sys_block / dm / "dm" / "uuid").read_text().startswith("CRYPT-"):
                    continue
        return device
    return None


def mount_options(mountpoint: Path) -> str | None:
    """The options `mountpoint` is mounted with, the last mount's (None: not a mount point)."""
    found = None
    with contextlib.suppress(OSError), open("/proc/self/mounts") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 3 and fields[1].replace("\\040", " ") == str(mountpoint):
                found = fields[3]
    return found


def check_problems(config: Config) -> list[str]:
    """`hoshikage check`'s findings on the encrypted models: age missing, no key or one that
    does not open a model (its first chunk decrypted), the units without the credential,
    swap that would make the units refuse them."""
    from hoshikage_sd.manifest import Files

    files = [(m.name, p) for m in config.models.values() for p in Files.of(m).paths
             if named_or_encrypted(p)]
    if not files:
        return []
    problems = []
    for name, path in files:
        try:
            check_readable(path)
        except HoshikageError as err:
            problems.append(f"model {name}: {err.message}"
                            + (f" ({err.hint})" if err.hint else ""))
    if SEALED_IDENTITY.exists() or PLAIN_IDENTITY.exists():
        for unit in UNITS:
            if not (DROPIN_DIR / f"{unit}.d" / DROPIN).exists():
                problems.append(f"{unit} does not get the age identity (no "
                                f"{DROPIN_DIR}/{unit}.d/{DROPIN}): run `hoshikage keys setup "
                                "--force` or write the drop-in (README \"Encrypted models\")")
    risk = swap_risk(ramdisk_options=mount_options(config.ramdisk))
    if risk and not config.allow_plaintext_swap:
        problems.append(f"swap on {risk} is not encrypted: encrypted models are refused "
                        "(README \"Encrypted models\": Swap)")
    return problems
