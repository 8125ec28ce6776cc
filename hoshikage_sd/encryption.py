"""Models encrypted at rest with age (age-encryption.org/v1), decrypted only into RAM.

An encrypted model is a GGUF file encrypted with Debian's `age` to the machine's recipient
(`hoshikage encrypt`); it is recognised by its first bytes, whatever its name. The identity
(the private key) reaches the units as a systemd credential named `age-identity`
(`hoshikage keys setup` writes the drop-ins): sealed with `systemd-creds` (the host key and,
where present, the TPM2) or, on request, a root-only file. It is never in the manifest, an
environment variable, a command line or the journal: age reads it from the credential's
file (or, for root's CLI, from a memfd that `systemd-creds decrypt` filled).

Decryption is age's own (the `age` binary, its reference implementation): staging pipes its
output into the RAM disk with splice(2) (`decrypt`), while the GGUF header reader takes the
first chunks only and stops it (`open_plaintext`). Sizes come from the ciphertext alone:
age's payload is a 16-byte nonce and 64 KiB chunks each with a 16-byte tag.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

from hoshikage_sd.errors import HoshikageError

TYPE_CHECKING = False
if TYPE_CHECKING:
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
#: what the pipe from age holds: fewer wake-ups of the writer per chunk
PIPE_SIZE = 1 << 20

Progress = Callable[[int, int], None]


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


def header_length(path: Path | str) -> int:
    """Bytes of the age header (up to and with its `--- MAC` line), read without a key."""
    with open(path, "rb") as f:
        if f.read(len(MAGIC)) != MAGIC:
            raise DecryptError(path, "it is not an age-encrypted file",
                               hint="encrypt it with `hoshikage encrypt`")
        while f.tell() < MAX_HEADER:
            line = f.readline(MAX_HEADER)
            if not line.endswith(b"\n"):
                break
            if line.startswith(b"--- "):
                return f.tell()
    raise DecryptError(path, "its age header is damaged or the file is truncated")


def plaintext_size(path: Path | str) -> int:
    """The size of what `path` decrypts to, from its size alone."""
    payload = os.stat(path).st_size - header_length(path) - NONCE
    chunks = -(-payload // (CHUNK + TAG))
    if payload < TAG or payload - (chunks - 1) * (CHUNK + TAG) < TAG:
        raise DecryptError(path, "the file is truncated (no complete last chunk)")
    return payload - chunks * TAG


def content_size(path: Path | str, size: int) -> int:
    """What a file of `size` bytes stages to: itself, or its plaintext when encrypted."""
    return plaintext_size(path) if is_encrypted(path) else size


@contextlib.contextmanager
def identity() -> Iterator[tuple[str, tuple[int, ...]]]:
    """Where age reads the identity: (path, fds the child must inherit). The unit's
    credential; else, for root's CLI, the root-only file or the sealed credential decrypted
    into a memfd (never a file on a disk)."""
    directory = os.environ.get("CREDENTIALS_DIRECTORY")
    if directory and os.path.isfile(os.path.join(directory, CREDENTIAL)):
        yield os.path.join(directory, CREDENTIAL), ()
        return
    if os.access(PLAIN_IDENTITY, os.R_OK):
        yield str(PLAIN_IDENTITY), ()
        return
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
    fd = os.memfd_create(CREDENTIAL, os.MFD_CLOEXEC)
    try:
        os.write(fd, result.stdout.encode())
        yield f"/dev/fd/{fd}", (fd,)
    finally:
        os.close(fd)


def cause(stderr: str) -> tuple[str, str | None]:
    """age's complaint as a cause a reader acts on (and a hint)."""
    text = stderr.lower()
    if "no identity matched" in text:
        return ("it is not encrypted to this machine's key (no identity matches)",
                "encrypt it again with `hoshikage encrypt`, or add this machine's recipient "
                f"({RECIPIENTS}) where it was encrypted")
    if "payload chunk" in text or "unexpected eof" in text or "last chunk" in text:
        return ("the file is damaged or truncated (a chunk fails authentication)",
                "copy or encrypt it again")
    if "header" in text or "intro" in text:
        return "it is not a valid age file (its header cannot be read)", \
            "encrypt it with `hoshikage encrypt`"
    if "identity" in text or "identities" in text:
        return "the age identity cannot be read", "run `hoshikage keys setup`"
    last = stderr.strip().splitlines()[0] if stderr.strip() else "age failed"
    return last.removeprefix("age: error: "), None


def _age(path: Path | str, ident: str, fds: tuple[int, ...]) -> subprocess.Popen[bytes]:
    from hoshikage_sd import proc

    try:
        return subprocess.Popen(["age", "--decrypt", "-i", ident, "--", str(path)],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, pass_fds=fds, env=proc.minimal_env())
    except FileNotFoundError:
        raise HoshikageError("age is not installed", hint="apt install age") from None


def _failed(path: Path | str, child: subprocess.Popen[bytes]) -> DecryptError:
    assert child.stderr is not None
    stderr = child.stderr.read().decode(errors="replace")
    child.wait()
    why, hint = cause(stderr)
    return DecryptError(path, why, hint)


def decrypt(source: Path, dest: Path, size: int, progress: Progress | None = None,
            every: int = 64 << 20) -> None:
    """Decrypt `source` into the new file `dest` (on the RAM disk): age's output spliced
    straight into it, `size` (plaintext_size) bytes or an error. On error `dest` is left for
    the caller to delete (it stages to a temporary name)."""
    with identity() as (ident, fds):
        child = _age(source, ident, fds)
        assert child.stdout is not None
        pipe = child.stdout.fileno()
        with contextlib.suppress(OSError):
            import fcntl

            fcntl.fcntl(pipe, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        done, reported = 0, 0
        try:
            with open(dest, "xb") as out:
                while True:
                    n = os.splice(pipe, out.fileno(), PIPE_SIZE)
                    if n == 0:
                        break
                    done += n
                    if progress and done - reported >= every:
                        reported = done
                        progress(done, size)
        except BaseException:
            child.kill()
            child.wait()
            raise
        if child.wait() != 0:
            raise _failed(source, child)
    if done != size:
        raise DecryptError(source, f"it decrypted to {done} bytes, not {size}")
    with contextlib.suppress(OSError):  # the ciphertext's pages are not worth keeping
        fd = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
    if progress:
        progress(done, size)


class Plaintext:
    """The start of an encrypted file as a forward-only file (read, and seek ahead) for the
    GGUF header reader: age decrypts while it reads, and is stopped when it is done."""

    def __init__(self, path: Path | str, child: subprocess.Popen[bytes]) -> None:
        assert child.stdout is not None
        self.path, self.child, self.pipe, self.pos = path, child, child.stdout, 0

    def read(self, n: int) -> bytes:
        data = self.pipe.read(n)
        self.pos += len(data)
        if len(data) < n and self.child.wait() != 0:
            raise _failed(self.path, self.child)
        return data

    def seek(self, offset: int) -> int:
        if offset < self.pos:
            raise OSError(f"{self.path}: cannot seek back in a decrypting stream")
        while self.pos < offset:
            if not self.read(min(offset - self.pos, 1 << 20)):
                break
        return self.pos


@contextlib.contextmanager
def open_plaintext(path: Path | str) -> Iterator[Plaintext]:
    """The plaintext of `path` as it decrypts; only what is read is decrypted."""
    with identity() as (ident, fds):
        child = _age(path, ident, fds)
        try:
            yield Plaintext(path, child)
        finally:
            if child.poll() is None:
                child.kill()
            child.wait()
            for stream in (child.stdout, child.stderr):
                if stream is not None:
                    stream.close()


def check_readable(path: Path | str) -> None:
    """Decrypt the first chunk: a wrong key, a file that is not age or a damaged start
    fail here, before anything is evicted or staged for it."""
    with open_plaintext(path) as f:
        f.read(1)


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
    import shutil

    from hoshikage_sd.manifest import Files

    files = [(m.name, p) for m in config.models.values() for p in Files.of(m).paths
             if named_or_encrypted(p)]
    if not files:
        return []
    if shutil.which("age") is None:
        return ["encrypted models need age to decrypt them: apt install age"]
    problems = []
    for name, path in files:
        try:
            check_readable(path)
        except HoshikageError as err:
            problems.append(f"model {name}: {err.message}"
                            + (f" ({err.hint})" if err.hint else ""))
    if SEALED_IDENTITY.exists() or PLAIN_IDENTITY.exists():
        from hoshikage_sd.commands.keys import DROPIN, DROPIN_DIR, UNITS

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
