"""ChaCha20-Poly1305 opening into the caller's buffers, through OpenSSL's EVP interface
(libcrypto.so.3, the library python3-cryptography itself uses on Debian), for staging an
encrypted model.

Why not only python3-cryptography's ChaCha20Poly1305 (which agefile.py uses for everything
else): for each 64 KiB chunk it sets up a new cipher context, allocates and zeroes an output
buffer and copies the result into a new bytes object, which halves OpenSSL's speed on this
cipher and holds the GIL for much of it. Here one context per thread is kept, the nonce alone
changes per chunk, and the plaintext lands in a buffer that is reused for every chunk. The
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
    reads a sealed chunk (ciphertext, then the 16-byte tag) into `sealed`, and `open`
    authenticates it and decrypts it into `plain`. Not for sharing between threads."""

    TAG = 16

    def __init__(self, key: bytes, size: int) -> None:
        if len(key) != 32:
            raise ValueError("a ChaCha20-Poly1305 key is 32 bytes")
        self._lib = lib = _lib()
        #: where the caller puts a sealed chunk of at most `size` plaintext bytes
        self.sealed = bytearray(size + self.TAG)
        self.plain = bytearray(size)
        self._view = memoryview(self.plain)
        self._src = (ctypes.c_char * len(self.sealed)).from_buffer(self.sealed)
        self._dst = (ctypes.c_char * size).from_buffer(self.plain)
        self._n = ctypes.c_int()
        self._ctx = lib.EVP_CIPHER_CTX_new()
        if not self._ctx or lib.EVP_DecryptInit_ex(
                self._ctx, lib.EVP_chacha20_poly1305(), None, key, None) != 1:
            self.close()
            raise MemoryError("EVP_DecryptInit_ex failed")

    def open(self, nonce: bytes, length: int) -> memoryview | None:
        """The plaintext of `sealed[:length]` (a view of `plain`, valid until the next call),
        or None when it does not authenticate."""
        body = length - self.TAG
        if len(nonce) != 12 or not 0 <= body <= len(self.plain):
            raise ValueError("a nonce is 12 bytes and a sealed chunk fits the buffers")
        lib, ctx, n = self._lib, self._ctx, ctypes.byref(self._n)
        tag = ctypes.addressof(self._src) + body
        end = ctypes.addressof(self._dst) + body
        if (lib.EVP_DecryptInit_ex(ctx, None, None, None, nonce) == 1
                and lib.EVP_DecryptUpdate(ctx, self._dst, n, self._src, body) == 1
                and lib.EVP_CIPHER_CTX_ctrl(ctx, _SET_TAG, self.TAG, tag) == 1
                and lib.EVP_DecryptFinal_ex(ctx, end, n) == 1):
            return self._view[:body]
        return None

    def close(self) -> None:
        if self._ctx:
            self._lib.EVP_CIPHER_CTX_free(self._ctx)
            self._ctx = None

    def __enter__(self) -> Opener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
