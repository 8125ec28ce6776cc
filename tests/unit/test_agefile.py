"""hoshikage_sd/agefile.py reads what the real `age` (Debian's, the reference implementation)
writes: every size around the chunk boundaries, several recipients, several identities, and
each kind of damage refused with its cause."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from hoshikage_sd import agefile, evp
from hoshikage_sd.agefile import CHUNK, SEALED, AgeError, Payload, identities

pytestmark = pytest.mark.skipif(shutil.which("age") is None, reason="age is not installed")


def keygen(path: Path) -> str:
    subprocess.run(["age-keygen", "-o", str(path)], check=True, capture_output=True)
    return subprocess.run(["age-keygen", "-y", str(path)], check=True, capture_output=True,
                          text=True).stdout.strip()


def encrypt(data: bytes, out: Path, *recipients: str) -> Path:
    args = [a for r in recipients for a in ("-r", r)]
    subprocess.run(["age", *args, "-o", str(out)], input=data, check=True)
    return out


@contextmanager
def payload(path: Path, identity: Path) -> Iterator[Payload]:
    fd = os.open(path, os.O_RDONLY)
    try:
        yield Payload(fd, os.fstat(fd).st_size, identities(identity.read_text()))
    finally:
        os.close(fd)


@pytest.fixture
def key(tmp_path: Path) -> tuple[Path, str]:
    path = tmp_path / "key.txt"
    return path, keygen(path)


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK, 200_001])
def test_reads_every_size_age_writes(tmp_path: Path, key: tuple[Path, str], size: int) -> None:
    data = random.Random(size).randbytes(size)
    sealed = encrypt(data, tmp_path / "f.age", key[1])
    with payload(sealed, key[0]) as p:
        assert p.size == size
        assert p.read_at(0, size + 10) == data
        assert b"".join(p.chunk(n) for n in range(p.chunks)) == data
        rng = random.Random(1)
        for _ in range(20):
            offset = rng.randrange(0, size + 1)
            n = rng.randrange(0, 3 * CHUNK)
            assert p.read_at(offset, n) == data[offset:offset + n]


@pytest.fixture(params=["evp", "cryptography"])
def opener(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The chunk readers staging uses: OpenSSL's EVP through ctypes, and the fallback
    through python3-cryptography where libcrypto.so.3 is not loadable."""
    if request.param == "evp":
        assert evp.available(), "libcrypto.so.3 is part of Debian's python3-cryptography"
    else:
        monkeypatch.setattr(evp, "available", lambda: False)
    return str(request.param)


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 17])
def test_chunk_readers_read_what_age_writes(tmp_path: Path, key: tuple[Path, str],
                                            opener: str, size: int) -> None:
    data = random.Random(size).randbytes(size)
    sealed = encrypt(data, tmp_path / "f.age", key[1])
    for run in (1, 2, 3):
        with payload(sealed, key[0]) as p, p.reader(run) as reader:
            assert (reader.opener is not None) == (opener == "evp")
            # out of order and twice: the buffers carry nothing from one run to the next
            firsts = range(0, p.chunks, run)
            got = {n: bytes(reader.chunks(n)) for n in [*reversed(firsts), *firsts]}
            assert b"".join(got[n] for n in firsts) == data


@pytest.mark.parametrize("how", ["middle chunk", "cut inside a chunk", "appended bytes"])
def test_chunk_readers_refuse_damage(tmp_path: Path, key: tuple[Path, str], opener: str,
                                     how: str) -> None:
    data = os.urandom(5 * CHUNK + 1234)
    bad = damage(encrypt(data, tmp_path / "f.age", key[1]), how)
    with pytest.raises(AgeError, match="damaged or truncated") as err, \
            payload(bad, key[0]) as p, p.reader(2) as reader:
        for n in range(0, p.chunks, 2):
            reader.chunks(n)
    assert err.value.kind == "damaged"


def test_evp_opener_refuses_a_wrong_tag_nonce_or_key() -> None:
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

    key, nonce, data = os.urandom(32), os.urandom(12), os.urandom(1000)
    sealed = ChaCha20Poly1305(key).encrypt(nonce, data, None)
    with evp.Opener(key, 3000, 2000) as o:
        o.sealed[7:7 + len(sealed)] = sealed
        assert o.open(nonce, 7, len(sealed), 5) and bytes(o.plain[5:1005]) == data
        assert not o.open(os.urandom(12), 7, len(sealed), 5)
        assert not o.open(nonce, 8, len(sealed), 5)
        o.sealed[6 + len(sealed)] ^= 1  # the tag's last byte
        assert not o.open(nonce, 7, len(sealed), 5)
        for at, to in ((2000, 0), (0, 1001), (-1, 0)):  # past either buffer
            with pytest.raises(ValueError):
                o.open(nonce, at, len(sealed), to)
    with evp.Opener(os.urandom(32), 3000, 2000) as o:
        o.sealed[:len(sealed)] = sealed
        assert not o.open(nonce, 0, len(sealed), 0)


def test_several_recipients_and_identities(tmp_path: Path) -> None:
    keys = [tmp_path / f"k{i}" for i in range(3)]
    recipients = [keygen(k) for k in keys]
    data = os.urandom(3 * CHUNK + 5)
    sealed = encrypt(data, tmp_path / "f.age", recipients[0], recipients[1])
    for k in keys[:2]:
        with payload(sealed, k) as p:
            assert p.read_at(0, len(data)) == data
    both = tmp_path / "both"
    both.write_text(keys[2].read_text() + "\n# a comment\n\n" + keys[1].read_text())
    with payload(sealed, both) as p:  # the first identity does not match, the second does
        assert p.read_at(0, len(data)) == data
    with pytest.raises(AgeError, match="not encrypted to this machine's key") as err, \
            payload(sealed, keys[2]):
        pass
    assert err.value.kind == "key"


def damage(sealed: Path, how: str) -> Path:
    data = bytearray(sealed.read_bytes())
    header_end = data.index(b"\n---") + 1
    if how == "header MAC":
        line_end = data.index(b"\n", header_end)
        data[line_end - 2] = ord("A") if data[line_end - 2] != ord("A") else ord("B")
    elif how == "stanza":
        data[header_end - 5] ^= 0x01
    elif how == "middle chunk":
        data[len(data) - 2 * SEALED] ^= 0x01
    elif how == "cut at a chunk boundary":  # the last (short) chunk gone: 5 full ones left
        del data[len(data) - (1234 + agefile.TAG):]
    elif how == "cut inside a chunk":
        del data[len(data) - 100:]
    elif how == "appended bytes":
        data += b"more"
    out = sealed.with_name(how.replace(" ", "-"))
    out.write_bytes(bytes(data))
    return out


@pytest.mark.parametrize("how", ["header MAC", "stanza", "middle chunk",
                                 "cut at a chunk boundary", "cut inside a chunk",
                                 "appended bytes"])
def test_damage_is_refused(tmp_path: Path, key: tuple[Path, str], how: str) -> None:
    data = os.urandom(5 * CHUNK + 1234)
    bad = damage(encrypt(data, tmp_path / "f.age", key[1]), how)
    with pytest.raises(AgeError) as err, payload(bad, key[0]) as p:
        p.read_at(0, p.size + 1)
    assert err.value.kind in ("damaged", "format", "key"), err.value
    if how != "stanza":  # a flipped stanza byte may read as another key's stanza
        assert "damaged" in str(err.value) or "altered" in str(err.value), err.value


def test_not_age_and_bad_identities(tmp_path: Path, key: tuple[Path, str]) -> None:
    with pytest.raises(AgeError, match="not an age file"):
        agefile.read_header(b"GGUF" + bytes(100))
    with pytest.raises(AgeError, match="other than age's X25519"):
        identities("ssh-ed25519 AAAA...\n")
    with pytest.raises(AgeError, match="holds no identity"):
        identities("# nothing\n")
    secret = next(line for line in key[0].read_text().splitlines()
                  if line.startswith("AGE-SECRET-KEY-1"))
    broken = secret[:-1] + ("Q" if secret[-1] != "Q" else "P")
    with pytest.raises(AgeError, match="checksum"):
        identities(broken)
    with pytest.raises(AgeError, match="mixes upper and lower case"):
        identities(secret[:20] + secret[20:].lower())
    assert len(identities(f"# created by age-keygen\n{secret}\n")) == 1
