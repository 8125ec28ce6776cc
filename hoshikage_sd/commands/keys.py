"""`hoshikage keys setup` and `hoshikage encrypt`: the machine's age key and encrypted copies
of models (README "Encrypted models").

The identity is made by `age-keygen` into this process's memory and goes straight to
`systemd-creds encrypt` (sealed to the host key, and the TPM2 where there is one) or, with
--plain, to a root-only file; the units get it as the credential `age-identity` through
drop-ins written here. Its public key goes to /etc/hoshikage/age-recipients, which
`hoshikage encrypt` encrypts to, with any backup key an admin adds to that file.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

from hoshikage_sd import encryption, fmt, proc
from hoshikage_sd.errors import die
from hoshikage_sd.files import write_atomic

#: marks this machine's own line in the recipients file (other lines: backup keys)
MARK = "# this machine (hoshikage keys setup)"
READ_BLOCK = 4 << 20
#: seconds between two draws of the progress line (a GiB is 256 blocks)
REDRAW_EVERY = 0.1


def dropin(plain: bool) -> str:
    line = (f"LoadCredential={encryption.CREDENTIAL}:{encryption.PLAIN_IDENTITY}" if plain
            else f"LoadCredentialEncrypted={encryption.CREDENTIAL}:"
                 f"{encryption.SEALED_IDENTITY}")
    return ("# hoshikage keys setup: the age identity of encrypted models, as a credential\n"
            f"[Service]\n{line}\n")


def recipients_text(existing: str, public: str) -> str:
    """The recipients file with this machine's key `public` (replacing the one an earlier
    setup wrote) and every other line kept."""
    lines, skip = [], False
    for line in existing.splitlines():
        if skip:
            skip = False
            continue
        if line == MARK:
            skip = True
            continue
        lines.append(line)
    return "\n".join([MARK, public, *lines]) + "\n"


def setup(plain: bool = False, force: bool = False, root: Path = Path("/")) -> int:
    """Make the machine's age identity, seal it, and give it to the units."""
    if os.geteuid() != 0:
        die("hoshikage keys setup writes /etc: run it as root")
    sealed, key = (root / str(p).lstrip("/") for p in (encryption.SEALED_IDENTITY,
                                                        encryption.PLAIN_IDENTITY))
    present = [p for p in (sealed, key) if p.exists()]
    if present and not force:
        die(f"there is an age identity already: {present[0]}",
            hint="models encrypted to it need it; --force makes a new one (encrypt those "
                 "models again with the new key first)")
    identity = proc.run(["age-keygen"]).stdout
    public = proc.run(["age-keygen", "-y"], input=identity).stdout.strip()
    sealed.parent.mkdir(parents=True, exist_ok=True)
    if plain:
        write_atomic(key, identity, mode=0o600)
        sealed.unlink(missing_ok=True)
    else:
        tmp = sealed.with_name(f".{sealed.name}.tmp-{os.getpid()}")
        try:
            sealing = proc.run(["systemd-creds", "encrypt", f"--name={encryption.CREDENTIAL}",
                                "-", str(tmp)], input=identity, check=False)
            if sealing.returncode != 0:
                why = (sealing.stderr or "").strip().splitlines()
                die(f"systemd-creds cannot seal the identity: {why[-1] if why else 'failed'}",
                    hint="`hoshikage keys setup --plain` keeps it in a root-only file instead "
                         "(LoadCredential=)")
            os.chmod(tmp, 0o600)
            os.rename(tmp, sealed)
        finally:
            tmp.unlink(missing_ok=True)
        key.unlink(missing_ok=True)
    recipients = root / str(encryption.RECIPIENTS).lstrip("/")
    existing = recipients.read_text() if recipients.exists() else ""
    write_atomic(recipients, recipients_text(existing, public), mode=0o644)
    units = root / str(encryption.DROPIN_DIR).lstrip("/")
    for unit in encryption.UNITS:
        write_atomic(units / f"{unit}.d" / encryption.DROPIN, dropin(plain), mode=0o644)
    if root == Path("/") and Path("/run/systemd/system").is_dir():
        proc.run(["systemctl", "daemon-reload"])
    where = key if plain else f"{sealed} (sealed by systemd-creds to this machine)"
    print(f"age identity: {where}\n"
          f"recipient:    {public} (in {recipients}; add a backup key as a line there)\n"
          f"units:        {', '.join(encryption.UNITS)} get it as the credential "
          f"'{encryption.CREDENTIAL}'\n"
          "next:         hoshikage encrypt MODEL.gguf   (then point the manifest at "
          "MODEL.gguf.age)\n"
          "a router running now has no key yet (its listings of encrypted models lack "
          "details): systemctl restart hoshikage.service")
    return 0


def encrypt(source: Path, dest: Path | None, recipients: Path | None,
            force: bool = False) -> int:
    """Write an encrypted copy of the model `source` (DEST, else SOURCE.age) with progress:
    a temporary name renamed into place once age has finished."""
    from hoshikage_sd import gguf

    recipients = recipients or encryption.RECIPIENTS
    if not recipients.is_file():
        die(f"no recipients file {recipients}",
            hint="run `hoshikage keys setup` (as root), or name one with --recipients")
    if encryption.is_encrypted(source):
        die(f"{source} is encrypted already")
    from hoshikage_sd.manifest.sources import SPLIT_RE

    split = SPLIT_RE.match(source.name)
    if not split or int(split["no"]) == 1:  # a later shard has no header of its own
        gguf.read_model_info([source])  # a clear error for what is not a model
    dest = dest or source.with_name(source.name + ".age")
    if os.path.realpath(dest) == os.path.realpath(source):
        die(f"{dest} is the model itself: the encrypted copy goes beside it",
            hint="name another file, or none (SOURCE.age)")
    if dest.exists() and not force:
        die(f"{dest} exists", hint="--force replaces it")
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    size, start = source.stat().st_size, time.monotonic()
    child = subprocess.Popen(["age", "--encrypt", "-R", str(recipients), "-o", str(tmp)],
                             stdin=subprocess.PIPE, stderr=subprocess.PIPE,
                             env=proc.minimal_env())
    assert child.stdin is not None and child.stderr is not None
    done, shown = 0, 0.0
    try:
        with open(source, "rb") as f:
            while block := f.read(READ_BLOCK):
                try:
                    child.stdin.write(block)
                except BrokenPipeError:
                    break  # age stopped (a bad recipient, no room, no such directory)
                done += len(block)
                if time.monotonic() - shown >= REDRAW_EVERY or done == size:
                    shown = time.monotonic()
                    show(done, size, start)
        with contextlib.suppress(BrokenPipeError):
            child.stdin.close()
        if child.wait() != 0:
            said = child.stderr.read().decode(errors="replace").strip().splitlines()
            why = said[0] if said else "it failed"
            die(f"age could not encrypt {source}: {why}",
                hint=f"is every line of {recipients} an age recipient (age1...)?"
                if "recipient" in why.lower() else None)
        os.rename(tmp, dest)
    except BaseException:
        child.kill()
        child.wait()
        with contextlib.suppress(OSError):  # age may have made none (a read-only directory)
            tmp.unlink(missing_ok=True)
        raise
    seconds = time.monotonic() - start
    redraw = "\r\033[K" if sys.stderr.isatty() else ""  # over the progress line
    print(f"{redraw}encrypted {source} -> {dest}: {fmt.size(size)} in {seconds:.1f} s "
          f"({fmt.size(size / max(seconds, 1e-6))}/s)", file=sys.stderr)
    print(f"{source} is still there in plaintext: delete it once {dest} serves")
    return 0


def show(done: int, total: int, start: float) -> None:
    """One progress line on a terminal (redrawn), nothing elsewhere."""
    if not sys.stderr.isatty():
        return
    rate = done / max(time.monotonic() - start, 1e-6)
    pct = 100 * done // max(total, 1)
    bar = "#" * (pct // 4)
    print(f"\r[{bar:<25}] {pct:3d}% {fmt.size(done)} of {fmt.size(total)} "
          f"{fmt.size(rate)}/s", end="", file=sys.stderr, flush=True)
