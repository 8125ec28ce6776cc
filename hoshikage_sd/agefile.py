"""Reading age files (age-encryption.org/v1) with X25519 identities, through
python3-cryptography: the header, the file key, and the payload's chunks by number.

Why not only the `age` binary (which writes every encrypted model: `hoshikage encrypt`):
its one thread decrypts and writes in turn, and it reads a file only from the start. Here
a chunk is decrypted where it lies: staging decrypts on both cores into the RAM disk with
pread/pwrite, the header reader decrypts only the chunks it reads, and the check before
admission opens the first and the last chunk (a truncated file fails there, before anything
is evicted for it). The measurement that keeps it is in docs/performance.md ("Encrypted
models"); tests/unit/test_agefile.py reads what the real `age` writes.

The format (https://age-encryption.org/v1): a text header (the intro line, one stanza per
recipient, `--- ` and the header's HMAC), then a 16-byte nonce and chunks of 64 KiB of
plaintext sealed with ChaCha20-Poly1305 (a 16-byte tag each), the chunk's nonce its number
(11 bytes, big-endian) and a last-chunk flag.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from hoshikage_sd import evp

INTRO = b"age-encryption.org/v1\n"
CHUNK, TAG, NONCE = 64 << 10, 16, 16
SEALED = CHUNK + TAG
#: a header longer than this is not one age wrote for a handful of recipients
MAX_HEADER = 1 << 20
SECRET_PREFIX = "AGE-SECRET-KEY-1"
_BECH32 = "qpzry9x8gf2tvdw0s3jn54khce6mua7l"
_GEN = (0x3B6A57B2, 0x26508E6D, 0x1EA119FA, 0x3D4233DD, 0x2A1462B3)


class AgeError(Exception):
    """What is wrong with an age file or an identity, as a cause a reader acts on."""

    def __init__(self, cause: str, kind: str) -> None:
        super().__init__(cause)
        #: "key" (not for this identity), "damaged", "format", "identity"
        self.kind = kind


def _polymod(values: list[int]) -> int:
    check = 1
    for value in values:
        top = check >> 25
        check = (check & 0x1FFFFFF) << 5 ^ value
        for i, gen in enumerate(_GEN):
            if (top >> i) & 1:
                check ^= gen
    return check


def bech32_decode(text: str) -> tuple[str, bytes]:
    """BIP 173's Bech32, as age encodes its keys (no length limit): (human part, data)."""
    if text.lower() != text and text.upper() != text:
        raise AgeError("an identity mixes upper and lower case", "identity")
    text = text.lower()
    hrp, sep, data = text.rpartition("1")
    if not sep or not hrp or len(data) < 6 or any(c not in _BECH32 for c in data):
        raise AgeError("an identity is not Bech32", "identity")
    values = [_BECH32.index(c) for c in data]
    expanded = [ord(c) >> 5 for c in hrp] + [0] + [ord(c) & 31 for c in hrp]
    if _polymod(expanded + values) != 1:
        raise AgeError("an identity's checksum is wrong", "identity")
    acc = bits = 0
    out = bytearray()
    for value in values[:-6]:
        acc, bits = (acc << 5) | value, bits + 5
        if bits >= 8:
            bits -= 8
            out.append((acc >> bits) & 0xFF)
    if bits >= 5 or acc & ((1 << bits) - 1):
        raise AgeError("an identity has stray bits", "identity")
    return hrp, bytes(out)


def identities(text: str) -> list[X25519PrivateKey]:
    """The X25519 identities of an age identity file (`age-keygen`'s: comments, blank
    lines, AGE-SECRET-KEY-1... lines). Anything else is an error: no plugin, no SSH key."""
    keys = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if not line.startswith(SECRET_PREFIX):
            raise AgeError("the identity file holds something other than age's X25519 "
                           "identities (AGE-SECRET-KEY-1...)", "identity")
        hrp, secret = bech32_decode(line)
        if hrp != "age-secret-key-" or len(secret) != 32:
            raise AgeError("an identity is not an age X25519 secret key", "identity")
        keys.append(X25519PrivateKey.from_private_bytes(secret))
    if not keys:
        raise AgeError("the identity file holds no identity", "identity")
    return keys


def _b64(text: bytes) -> bytes:
    """age's base64: standard alphabet, no padding, canonical."""
    if b"=" in text or len(text) % 4 == 1:
        raise AgeError("it is not a valid age file (malformed base64)", "format")
    try:
        data = base64.b64decode(text + b"=" * (-len(text) % 4), validate=True)
    except ValueError:
        raise AgeError("it is not a valid age file (malformed base64)", "format") from None
    if base64.b64encode(data).rstrip(b"=") != text:
        raise AgeError("it is not a valid age file (non-canonical base64)", "format")
    return data


def _hkdf(key: bytes, salt: bytes | None, info: bytes) -> bytes:
    return HKDF(hashes.SHA256(), 32, salt, info).derive(key)


@dataclass(frozen=True)
class Header:
    stanzas: tuple[tuple[tuple[bytes, ...], bytes], ...]  # (type and arguments, body)
    mac: bytes
    signed: bytes  # what the MAC covers: the header up to and with "---"
    length: int    # bytes of the header, the payload's nonce starts here


def read_header(data: bytes) -> Header:
    """The header at the start of `data` (the file's first bytes, up to MAX_HEADER)."""
    if not data.startswith(INTRO):
        raise AgeError("it is not an age file (no age-encryption.org/v1 intro)", "format")
    pos = len(INTRO)
    stanzas: list[tuple[tuple[bytes, ...], bytes]] = []
    while True:
        end = data.find(b"\n", pos)
        if end < 0:
            raise AgeError("the file is damaged or truncated (its header is cut off)", "damaged")
        line = data[pos:end]
        if line.startswith(b"--- "):
            return Header(tuple(stanzas), _b64(line[4:]), data[:pos + 3], end + 1)
        if not line.startswith(b"-> "):
            raise AgeError("it is not a valid age file (a malformed stanza)", "format")
        args = tuple(line[3:].split(b" "))
        pos, body = end + 1, b""
        while True:  # body lines of 64 characters, the last one shorter (maybe empty)
            end = data.find(b"\n", pos)
            if end < 0:
                raise AgeError("the file is damaged or truncated (its header is cut off)",
                               "damaged")
            if end - pos > 64:
                raise AgeError("it is not a valid age file (a malformed stanza body)", "format")
            body += data[pos:end]
            pos, full = end + 1, end - pos == 64
            if not full:
                break
        stanzas.append((args, _b64(body)))


def file_key(header: Header, keys: list[X25519PrivateKey]) -> bytes:
    """The file key, unwrapped by one of `keys`, with the header's MAC checked."""
    for key in keys:
        ours = key.public_key().public_bytes(serialization.Encoding.Raw,
                                             serialization.PublicFormat.Raw)
        for args, body in header.stanzas:
            if args[0] != b"X25519" or len(args) != 2 or len(body) != 32:
                continue
            share = _b64(args[1])
            if len(share) != 32:
                raise AgeError("it is not a valid age file (a malformed X25519 stanza)", "format")
            try:
                shared = key.exchange(X25519PublicKey.from_public_bytes(share))
            except ValueError:
                shared = bytes(32)  # cryptography refuses an all-zero secret itself
            if not any(shared):
                raise AgeError("the file is damaged (a low-order X25519 share)", "damaged")
            wrap = _hkdf(shared, share + ours, b"age-encryption.org/v1/X25519")
            try:
                found = ChaCha20Poly1305(wrap).decrypt(bytes(12), body, None)
            except InvalidTag:
                continue
            mac = hmac.new(_hkdf(found, None, b"header"), header.signed, hashlib.sha256)
            if not hmac.compare_digest(mac.digest(), header.mac):
                raise AgeError("the file is damaged or was altered (its header's MAC does "
                               "not match)", "damaged")
            return found
    raise AgeError("it is not encrypted to this machine's key (no identity matches)", "key")


class Payload:
    """An opened age file: its chunks decrypted by number (any thread, any order)."""

    def __init__(self, fd: int, size: int, keys: list[X25519PrivateKey]) -> None:
        head = os.pread(fd, min(size, MAX_HEADER), 0)
        header = read_header(head)
        key = file_key(header, keys)
        nonce = head[header.length:header.length + NONCE]
        if len(nonce) < NONCE:
            raise AgeError("the file is damaged or truncated (no payload)", "damaged")
        self.fd, self.start = fd, header.length + NONCE
        self._key = _hkdf(key, nonce, b"payload")
        self.aead = ChaCha20Poly1305(self._key)
        payload = size - self.start
        self.chunks = max(1, -(-payload // SEALED))
        last = payload - (self.chunks - 1) * SEALED
        if last < TAG or (last == TAG and self.chunks > 1):
            raise AgeError("the file is damaged or truncated (no complete last chunk)", "damaged")
        #: the plaintext's size
        self.size = payload - self.chunks * TAG

    def chunk(self, number: int, sealed: bytes | None = None) -> bytes:
        """The plaintext of chunk `number` (read from the file unless `sealed` is given)."""
        if sealed is None:
            sealed = os.pread(self.fd, SEALED, self.start + number * SEALED)
        try:
            return self.aead.decrypt(self.nonce(number), sealed, None)
        except InvalidTag:
            raise _damaged(number) from None

    def nonce(self, number: int) -> bytes:
        return number.to_bytes(11, "big") + (b"\1" if number == self.chunks - 1 else b"\0")

    def sealed_length(self, number: int) -> int:
        """The bytes chunk `number` takes in the file (the last one may be shorter)."""
        if number < self.chunks - 1:
            return SEALED
        return self.size - (self.chunks - 1) * CHUNK + TAG

    def reader(self, run: int = 1) -> ChunkReader:
        """A reader of runs of chunks for one thread (staging decrypts on several)."""
        return ChunkReader(self, run)

    def read_at(self, offset: int, n: int) -> bytes:
        """Up to `n` plaintext bytes from `offset` (fewer only at the end)."""
        out = []
        while n > 0 and offset < self.size:
            number, skip = divmod(offset, CHUNK)
            data = self.chunk(number)[skip:skip + n]
            out.append(data)
            offset, n = offset + len(data), n - len(data)
        return b"".join(out)


class ChunkReader:
    """One thread's way through a payload: runs of up to `run` chunks, each run read with
    one pread into a buffer that is reused and opened through OpenSSL's EVP (evp.py) where
    libcrypto.so.3 is loadable, through python3-cryptography elsewhere."""

    def __init__(self, payload: Payload, run: int) -> None:
        self.payload, self.run = payload, run
        self.opener: evp.Opener | None = None
        if evp.available():
            self.opener = evp.Opener(payload._key, run * SEALED, run * CHUNK)
            self.sealed, self.plain = self.opener.sealed, self.opener.plain
        else:
            self.sealed, self.plain = bytearray(run * SEALED), bytearray(run * CHUNK)

    def chunks(self, first: int) -> memoryview:
        """The plaintext of chunks `first` to `first + run` (fewer at the end): a view of
        the reader's buffer, valid until its next call."""
        p = self.payload
        numbers = range(first, min(first + self.run, p.chunks))
        lengths = [p.sealed_length(n) for n in numbers]
        got = os.preadv(p.fd, [memoryview(self.sealed)[:sum(lengths)]],
                        p.start + first * SEALED)
        if got != sum(lengths):
            raise AgeError(f"the file is damaged or truncated (chunk {first} onwards is cut "
                           "short)", "damaged")
        at = to = 0
        for number, length in zip(numbers, lengths, strict=True):
            if self.opener is None:
                body = p.chunk(number, bytes(self.sealed[at:at + length]))
                self.plain[to:to + len(body)] = body
            elif not self.opener.open(p.nonce(number), at, length, to):
                raise _damaged(number)
            at, to = at + length, to + length - TAG
        return memoryview(self.plain)[:to]

    def close(self) -> None:
        if self.opener is not None:
            self.opener.close()

    def __enter__(self) -> ChunkReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _damaged(number: int) -> AgeError:
    return AgeError(f"the file is damaged or truncated (chunk {number} fails authentication)",
                    "damaged")
