"""GGUF's header, read with every claim bounded: the key/value pairs and the tensor infos
(gguf.py sums a model up from them), and ggml's tensor types.

Only the header is read (typically a few MB even for a 40 GB model), through one small
read-ahead buffer: no mmap, no tensor data. Every count and length in the file is checked
against a cap and against the bytes the file really has before anything is allocated, so a
truncated or hostile file ends in a GGUFError that names the file and the problem, never in a
crash or a huge allocation. Large arrays (the tokenizer's ~150k tokens, scores and merges) are
walked or skipped and only their length is kept.

Format (little-endian, GGUF v2 and v3): magic "GGUF", u32 version, u64 tensor count, u64 kv
count; kv pairs (string key, u32 value type, value); tensor infos (string name, u32 n_dims,
u64 dims[n_dims], u32 ggml type, u64 offset); padding to general.alignment (default 32);
tensor data. A string is a u64 length and UTF-8 bytes; an array is a u32 element type, a u64
count and the elements.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import os
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final

from hoshikage_sd import encryption
from hoshikage_sd.errors import HoshikageError

MAGIC: Final = b"GGUF"
SUPPORTED_VERSIONS: Final = (2, 3)
DEFAULT_ALIGNMENT: Final = 32

#: caps on what a header may claim; real models stay far below every one of them
MAX_KV: Final = 1 << 16              # real models: ~20-60 pairs
MAX_TENSORS: Final = 1 << 17         # real models: ~100-3000 tensors
MAX_N_DIMS: Final = 8                # ggml has 4
MAX_NAME: Final = 1 << 16            # key and tensor-name length (ggml names are < 64 bytes)
MAX_WALKED_ARRAY: Final = 1 << 22    # string/array elements walked one by one (vocab ~150k-260k)
MAX_WALKED_TOTAL: Final = 1 << 24    # ... in the whole header (tokens + merges: ~0.3-0.6M)
MAX_ARRAY_DEPTH: Final = 4

#: what is kept in GGUFInfo.metadata
KEEP_STRING: Final = 1024            # strings up to this many bytes (chat templates are skipped)
KEEP_ARRAY: Final = 1024             # numeric/bool arrays up to this many elements, as tuples

_CHUNK: Final = 1 << 18

# GGUF value types
_UINT8, _INT8, _UINT16, _INT16, _UINT32, _INT32, _FLOAT32, _BOOL = range(8)
_STRING, _ARRAY, _UINT64, _INT64, _FLOAT64 = range(8, 13)
_SCALAR: Final[dict[int, struct.Struct]] = {
    _UINT8: struct.Struct("<B"), _INT8: struct.Struct("<b"),
    _UINT16: struct.Struct("<H"), _INT16: struct.Struct("<h"),
    _UINT32: struct.Struct("<I"), _INT32: struct.Struct("<i"),
    _FLOAT32: struct.Struct("<f"), _BOOL: struct.Struct("<?"),
    _UINT64: struct.Struct("<Q"), _INT64: struct.Struct("<q"),
    _FLOAT64: struct.Struct("<d"),
}
_VALUE_TYPE_NAMES: Final = ("uint8", "int8", "uint16", "int16", "uint32", "int32", "float32",
                            "bool", "string", "array", "uint64", "int64", "float64")
_U32: Final = struct.Struct("<I")
_U64: Final = struct.Struct("<Q")

#: ggml tensor types: id -> (name, elements per block, bytes per block)
GGML_TYPES: Final[Mapping[int, tuple[str, int, int]]] = MappingProxyType({
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 40),
    10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50), 20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136), 24: ("I8", 1, 1), 25: ("I16", 1, 2),
    26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8), 29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2),
    # interleaved types that older files carry (removed from ggml in 2024)
    31: ("Q4_0_4_4", 32, 18), 32: ("Q4_0_4_8", 32, 18), 33: ("Q4_0_8_8", 32, 18),
    34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66),
    36: ("IQ4_NL_4_4", 32, 18), 37: ("IQ4_NL_4_8", 32, 18), 38: ("IQ4_NL_8_8", 32, 18),
    39: ("MXFP4", 32, 17), 40: ("NVFP4", 64, 36), 41: ("Q1_0", 128, 18),
})


class GGUFError(HoshikageError):
    """A file that is not a readable GGUF model: names the file and what is wrong."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}",
                         hint="is this a complete GGUF model file? copy or download it again")
        self.path = path


def type_name(ggml_type: int) -> str:
    known = GGML_TYPES.get(ggml_type)
    return known[0] if known else f"TYPE_{ggml_type}"


def row_size(ggml_type: str, n: int) -> int:
    """Bytes of n elements of a ggml type given by name (ggml_row_size), e.g. a KV cache row."""
    for name, block, size in GGML_TYPES.values():
        if name.lower() == ggml_type.lower():
            return -(-n // block) * size
    raise ValueError(f"unknown ggml type {ggml_type!r}")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dims: tuple[int, ...]            # ggml order: dims[0] is the row length
    type: int                        # ggml type id
    offset: int                      # from the start of the data section
    nbytes: int                      # from the type's block size, else up to the next tensor

    @property
    def type_name(self) -> str:
        return type_name(self.type)

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.dims:
            n *= d
        return n


class Reader:
    """Sequential reads with bounds checks through one read-ahead buffer."""

    def __init__(self, f: io.FileIO | encryption.Plaintext, path: str, size: int) -> None:
        self.f = f
        self.path = path
        self.size = size
        self.buf = b""
        self.base = 0   # file offset of buf[0]
        self.pos = 0    # read position within buf
        self.fpos = 0   # the file's own position
        self.walked = 0  # array elements walked one by one so far

    def fail(self, message: str) -> GGUFError:
        return GGUFError(self.path, message)

    @property
    def offset(self) -> int:
        return self.base + self.pos

    def _fill(self, n: int, what: str) -> None:
        """Make buf hold at least n bytes from the current offset."""
        start = self.offset
        if start + n > self.size:
            raise self.fail(f"truncated: {what} needs {n} bytes at offset {start} "
                            f"but the file has {self.size} bytes")
        if self.fpos == self.base + len(self.buf):
            rest = self.buf[self.pos:]
        else:
            self.fpos = self.f.seek(start)
            rest = b""
        want = max(n, _CHUNK) - len(rest)
        data = (self.f.read(want) or b"") if want > 0 else b""
        self.fpos += len(data)
        self.buf = rest + data
        self.base, self.pos = start, 0
        if len(self.buf) < n:
            raise self.fail(f"truncated: {what} needs {n} bytes at offset {start} "
                            f"but only {len(self.buf)} could be read")

    def starts_with(self, magic: bytes) -> bool:
        """Does the file start with `magic`? (Read into the buffer the parse starts from.)"""
        if self.size < len(magic):
            return False
        self._fill(len(magic), "magic")
        return self.buf.startswith(magic)

    def read(self, n: int, what: str) -> bytes:
        if self.pos + n > len(self.buf):
            self._fill(n, what)
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def unpack(self, st: struct.Struct, what: str) -> int | float | bool:
        if self.pos + st.size > len(self.buf):
            self._fill(st.size, what)
        (value,) = st.unpack_from(self.buf, self.pos)
        self.pos += st.size
        return value  # type: ignore[no-any-return]

    def u32(self, what: str) -> int:
        return int(self.unpack(_U32, what))

    def u64(self, what: str) -> int:
        return int(self.unpack(_U64, what))

    def skip(self, n: int, what: str) -> None:
        if self.offset + n > self.size:
            raise self.fail(f"truncated: {what} needs {n} bytes at offset {self.offset} "
                            f"but the file has {self.size} bytes")
        if self.pos + n <= len(self.buf):
            self.pos += n
        else:  # beyond the buffer: drop it, the next read seeks
            self.base, self.buf, self.pos = self.offset + n, b"", 0

    def string_length(self, what: str, cap: int | None = None) -> int:
        n = self.u64(f"length of {what}")
        if cap is not None and n > cap:
            raise self.fail(f"{what} claims {n} bytes (the limit is {cap})")
        if self.offset + n > self.size:
            raise self.fail(f"truncated: {what} claims {n} bytes at offset {self.offset} "
                            f"but the file has {self.size} bytes")
        return n

    def string(self, what: str, cap: int) -> str:
        n = self.string_length(what, cap)
        return self.read(n, what).decode("utf-8", errors="replace")

    def unique_name(self, what: str, kind: str, seen: set[str]) -> str:
        """A key's or a tensor's name, not one of those `seen` (to which it is added)."""
        name = self.string(what, MAX_NAME)
        if name in seen:
            raise self.fail(f"duplicate {kind} {name!r}")
        seen.add(name)
        return name

    def skip_strings(self, count: int, what: str) -> None:
        """Walk count length-prefixed strings without keeping them (the fast path for vocabs)."""
        buf, pos, unpack = self.buf, self.pos, _U64.unpack_from
        for _ in range(count):
            if pos + 8 <= len(buf):
                (n,) = unpack(buf, pos)
                if pos + 8 + n <= len(buf):
                    pos += 8 + n
                    continue
            self.pos = pos
            self.skip(self.string_length(what), what)
            buf, pos = self.buf, self.pos
        self.pos = pos


def _value(r: Reader, vtype: int, key: str, depth: int = 0) -> tuple[object, int | None]:
    """Read (or skip) one value: (what to keep or None, array length or None)."""
    if vtype in _SCALAR:
        return r.unpack(_SCALAR[vtype], f"value of {key}"), None
    if vtype == _STRING:
        n = r.string_length(f"string value of {key}")
        if n <= KEEP_STRING:
            return r.read(n, f"string value of {key}").decode("utf-8", errors="replace"), None
        r.skip(n, f"string value of {key}")
        return None, None
    if vtype == _ARRAY:
        if depth >= MAX_ARRAY_DEPTH:
            raise r.fail(f"{key}: arrays nested deeper than {MAX_ARRAY_DEPTH}")
        etype = r.u32(f"element type of {key}")
        count = r.u64(f"length of array {key}")
        remaining = r.size - r.offset
        if etype in _SCALAR:
            size = _SCALAR[etype].size
            if count * size > remaining:
                raise r.fail(f"truncated: array {key} claims {count} elements of "
                             f"{_VALUE_TYPE_NAMES[etype]} but only {remaining} bytes remain")
            if count <= KEEP_ARRAY:
                raw = r.read(count * size, f"array {key}")
                fmt = f"<{count}{_SCALAR[etype].format[1:]}"
                return tuple(struct.unpack(fmt, raw)), count
            r.skip(count * size, f"array {key}")
            return None, count
        if etype not in (_STRING, _ARRAY):
            raise r.fail(f"{key}: unknown array element type {etype}")
        if count > MAX_WALKED_ARRAY:
            raise r.fail(f"array {key} claims {count} elements (the limit is {MAX_WALKED_ARRAY})")
        min_size = 8 if etype == _STRING else 12
        if count * min_size > remaining:
            raise r.fail(f"truncated: array {key} claims {count} elements but only "
                         f"{remaining} bytes remain")
        r.walked += count
        if r.walked > MAX_WALKED_TOTAL:
            raise r.fail(f"arrays of strings or arrays hold more than {MAX_WALKED_TOTAL} "
                         f"elements in all (at {key})")
        if etype == _STRING:
            r.skip_strings(count, f"element of {key}")
        else:
            for _ in range(count):
                _value(r, _ARRAY, key, depth + 1)
        return None, count
    raise r.fail(f"{key}: unknown value type {vtype}")


@contextlib.contextmanager
def opened(spath: str) -> Iterator[Reader]:
    """A reader of the file's GGUF bytes: the file's own, or, when it is age-encrypted, its
    plaintext as it decrypts (only the header's chunks are decrypted)."""
    try:
        with open(spath, "rb", buffering=0) as f:
            r = Reader(f, spath, os.fstat(f.fileno()).st_size)
            if not r.starts_with(encryption.MAGIC):
                yield r
                return
        with encryption.open_plaintext(spath) as plain:
            yield Reader(plain, spath, encryption.plaintext_size(spath))
    except FileNotFoundError:
        raise GGUFError(spath, "no such file") from None
    except IsADirectoryError:
        raise GGUFError(spath, "is a directory, not a GGUF file") from None
    except OSError as exc:
        raise GGUFError(spath, f"cannot read: {exc.strerror or exc}") from None


def read_counts(r: Reader) -> tuple[int, int, int]:
    """Magic, version, tensor and kv counts, each checked before anything is allocated."""
    if r.size < 24:
        raise r.fail(f"too small to be a GGUF file ({r.size} bytes)")
    magic = r.read(4, "magic")
    if magic != MAGIC:
        raise r.fail(f"not a GGUF file (starts with {magic!r}, not {MAGIC!r})")
    version = r.u32("version")
    if version not in SUPPORTED_VERSIONS:
        if version and version & 0xFFFF == 0:
            raise r.fail("big-endian GGUF files are not supported")
        if version == 1:
            raise r.fail("GGUF version 1 is too old (convert it again)")
        raise r.fail(f"unsupported GGUF version {version} (supported: 2, 3)")
    n_tensors = r.u64("tensor count")
    n_kv = r.u64("kv count")
    if n_kv > MAX_KV:
        raise r.fail(f"header claims {n_kv} key/value pairs (the limit is {MAX_KV})")
    if n_tensors > MAX_TENSORS:
        raise r.fail(f"header claims {n_tensors} tensors (the limit is {MAX_TENSORS})")
    if n_kv * 13 + n_tensors * 24 > r.size - r.offset:  # the smallest possible encodings
        raise r.fail(f"truncated: header claims {n_kv} key/value pairs and {n_tensors} "
                     f"tensors but the file has only {r.size} bytes")
    return version, n_tensors, n_kv


def read_metadata(r: Reader, n_kv: int) -> tuple[dict[str, object], dict[str, int]]:
    """The key/value pairs: the values kept, and the length of every array."""
    metadata: dict[str, object] = {}
    seen: set[str] = set()
    array_lengths: dict[str, int] = {}
    for i in range(n_kv):
        key = r.unique_name(f"key #{i}", "key", seen)
        vtype = r.u32(f"value type of {key}")
        value, length = _value(r, vtype, key)
        if length is not None:
            array_lengths[key] = length
        if value is not None:
            metadata[key] = value
    return metadata, array_lengths


def read_tensors(r: Reader, n_tensors: int) -> list[tuple[str, tuple[int, ...], int, int]]:
    """The tensor infos as written: (name, dims, ggml type, offset)."""
    tensors: list[tuple[str, tuple[int, ...], int, int]] = []
    names: set[str] = set()
    for i in range(n_tensors):
        name = r.unique_name(f"name of tensor #{i}", "tensor", names)
        n_dims = r.u32(f"n_dims of tensor {name}")
        if n_dims > MAX_N_DIMS:
            raise r.fail(f"tensor {name} claims {n_dims} dimensions (the limit is {MAX_N_DIMS})")
        dims = tuple(r.u64(f"dims of tensor {name}") for _ in range(n_dims))
        ttype = r.u32(f"type of tensor {name}")
        offset = r.u64(f"offset of tensor {name}")
        tensors.append((name, dims, ttype, offset))
    return tensors


def sized_tensors(r: Reader, raw: list[tuple[str, tuple[int, ...], int, int]],
                  tensor_bytes: int, alignment: int) -> tuple[TensorInfo, ...]:
    ends = sorted({offset for _, _, _, offset in raw} | {tensor_bytes})
    next_offset = dict(itertools.pairwise(ends))
    out = []
    for name, dims, ttype, offset in raw:
        if offset % alignment:
            raise r.fail(f"tensor {name}: offset {offset} is not a multiple of the "
                         f"alignment {alignment}")
        n = 1
        for d in dims:
            n *= d
        known = GGML_TYPES.get(ttype)
        if known:
            tname, block, bsize = known
            if dims and dims[0] % block:
                raise r.fail(f"tensor {name}: row length {dims[0]} is not a multiple of "
                             f"the {tname} block size {block}")
            nbytes = n // block * bsize
        else:  # a type newer than this table: it runs up to the next tensor
            nbytes = next_offset.get(offset, tensor_bytes) - offset
        if offset + nbytes > tensor_bytes:
            raise r.fail(f"truncated: tensor {name} needs bytes {offset}..{offset + nbytes} "
                         f"of the data section but it has {tensor_bytes}")
        out.append(TensorInfo(name, dims, ttype, offset, nbytes))
    return tuple(out)
