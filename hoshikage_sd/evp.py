"""ChaCha20-Poly1305 opening in place of buffers that are reused, through OpenSSL's EVP interface
(libcrypto.so.3, the library python3-cryptography itself uses on Debian), for staging an
encrypted model.

Why not only python3-cryptography's ChaCha20Poly1305 (which agefile.py uses for everything
else): for each 64 KiB chunk it sets up a new cipher context, allocates and zeroes an output
buffer and copies the result into a new bytes object, which halves OpenSSL's speed on this
cipher and holds the GIL for much of it. Here one context per thread is kept, the nonce alone
changes per chunk, and a run of chunks is read, opened and written through two buffers
that are reused (one pread and one pwrite per run: two threads then fill the RAM disk side by
side). The
paired measurement that keeps it is in docs/performance.md ("Encrypted models");
tests/unit/test_agefile.py checks it against python3-cryptography on every chunk shape.

ctypes lets go of the GIL for each foreign call, so threads decrypt side by side.
"""

from __future__ import annotations

import ctypes
import functools

_SET_TAG = 0x11  # EVP_CTRL_AEAD_SET_TAG


class Unavailable(Exception):
    """libcrypto cannot be loaded here (a wheel that bundles its own OpenSSL, say)."""


@functools.cache
def _lib() -> ctypes.CDLL:
    try:  # by its soname, as the dynamic loader finds it (find_library would run ldconfig)
        lib = ctypes.CDLL("libcrypto.so.3")
    except OSError as err:
        raise Unavailable(str(err)) from None
    vp, cp, ip = ctypes.c_void_p, ctypes.c_char_p, ctypes.POINTER(ctypes.c_int)
    for fn, res, args in (
            ("EVP_CIPHER_CTX_new", vp, []),
            ("EVP_CIPHER_CTX_free", None, [vp]),
            ("EVP_chacha20_poly1305", vp, []),
            ("EVP_DecryptInit_ex", ctypes.c_int, [vp, vp, vp, cp, cp]),
            ("EVP_DecryptUpdate", ctypes.c_int, [vp, vp, ip, vp, ctypes.c_int]),
            ("EVP_DecryptFinal_ex", ctypes.c_int, [vp, vp, ip]),
            ("EVP_CIPHER_CTX_ctrl", ctypes.c_int, [vp, ctypes.c_int, ctypes.c_int, vp])):
        getattr(lib, fn).restype = res
        getattr(lib, fn).argtypes = args
    return lib


def available() -> bool:
    try:
        _lib()
    except (Unavailable, AttributeError):
        return False
    return True


class Opener:
    """One thread's ChaCha20-Poly1305 context for one key, with its two buffers: the caller
    reads sealed chunks (each its ciphertext, then a 16-byte tag) into `sealed`, and `open`
    authenticates one and decrypts it into `plain`. Not for sharing between threads."""

    TAG = 16

    def __init__(self, key: bytes, sealed: int, plain: int) -> None:
        if len(key) != 32:
            raise ValueError("a ChaCha20-Poly1305 key is 32 bytes")
        self._lib = lib = _lib()
        self.sealed, self.plain = bytearray(sealed), bytearray(plain)
        self._src = ctypes.addressof((ctypes.c_char * sealed).from_buffer(self.sealed))
        self._dst = ctypes.addressof((ctypes.c_char * plain).from_buffer(self.plain))
        self._n = ctypes.c_int()
        self._ctx = lib.EVP_CIPHER_CTX_new()
        if not self._ctx or lib.EVP_DecryptInit_ex(
                self._ctx, lib.EVP_chacha20_poly1305(), None, key, None) != 1:
            self.close()
            raise MemoryError("EVP_DecryptInit_ex failed")

    def open(self, nonce: bytes, at: int, length: int, to: int) -> bool:
        """Decrypt the chunk of `length` bytes (tag included) at `sealed[at:]` into
        `plain[to:]`; False when it does not authenticate."""
        body = length - self.TAG
        if (len(nonce) != 12 or body < 0 or at < 0 or to < 0
                or at + length > len(self.sealed) or to + body > len(self.plain)):
            raise ValueError("a nonce is 12 bytes and a chunk lies within the buffers")
        lib, ctx, n = self._lib, self._ctx, ctypes.byref(self._n)
        src, dst = self._src + at, self._dst + to
        return bool(lib.EVP_DecryptInit_ex(ctx, None, None, None, nonce) == 1
                and lib.EVP_DecryptUpdate(ctx, dst, n, src, body) == 1
                and lib.EVP_CIPHER_CTX_ctrl(ctx, _SET_TAG, self.TAG, src + body) == 1
                and lib.EVP_DecryptFinal_ex(ctx, dst + body, n) == 1)

    def close(self) -> None:
        if self._ctx:
            self._lib.EVP_CIPHER_CTX_free(self._ctx)
            self._ctx = None

    def __enter__(self) -> Opener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
