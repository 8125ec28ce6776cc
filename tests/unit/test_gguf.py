"""hoshikage_sd.gguf: header-only GGUF reading, cross-checked against the gguf package.

The product must not depend on PyPI gguf (Debian does not ship it); the tests use it as the
reference: every field of read_info() is compared with gguf.GGUFReader on generated models.
"""

from __future__ import annotations

import importlib
import io
import os
import shutil
import struct
import tracemalloc
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from hoshikage_sd import gguf as hg
from hoshikage_sd import ggufheader as header
from hoshikage_sd.errors import HoshikageError
from hoshikage_sd.gguf import GGUFError, GGUFInfo, read_info
from tests.support import unavailable

MiB = 1 << 20


class Reads:
    """What read_info read of its files, counted (not timed): bytes and read(2) calls."""

    def __init__(self) -> None:
        self.bytes = self.calls = 0


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> Reads:
    """Every file hoshikage_sd.gguf opens from here on is counted in the Reads returned."""
    counted = Reads()

    class Counting(io.FileIO):
        def read(self, size: int | None = -1, /) -> bytes:
            data = super().read(size) or b""
            counted.bytes += len(data)
            counted.calls += 1
            return data

    def counting_open(path: str, mode: str = "rb", buffering: int = 0) -> io.FileIO:
        assert mode == "rb" and buffering == 0, (mode, buffering)
        return Counting(path, "rb")

    monkeypatch.setattr(header, "open", counting_open, raising=False)  # shadows the builtin
    return counted


@pytest.fixture(scope="module")
def gguf() -> Any:
    try:
        return importlib.import_module("gguf")
    except ImportError:
        unavailable("the gguf package is missing (pip install -e '.[test]')")


@pytest.fixture(scope="module")
def make_gguf(gguf: Any) -> Any:
    return importlib.import_module("make_gguf")  # tools/make_gguf.py, via tests/conftest.py


SHAPES: dict[str, dict[str, Any]] = {
    "tiny-f32": {},
    "gqa-f16": dict(n_embd=128, n_ff=352, n_layer=3, n_head=8, n_head_kv=2, dtype="f16",
                    n_ctx=16384),
    "one-layer-f32": dict(n_embd=96, n_ff=64, n_layer=1, n_head=3, chat_template=False,
                          n_ctx=512),
    "mqa-f16": dict(n_embd=256, n_ff=1024, n_layer=4, n_head=8, n_head_kv=1, dtype="f16"),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory, make_gguf: Any) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gguf-models")
    out = {}
    for name, kwargs in SHAPES.items():
        out[name] = root / f"{name}.gguf"
        make_gguf.write_model(out[name], name=name, **kwargs)
    return out


# -- the reference -------------------------------------------------------------------------


def reference(gguf: Any, path: Path) -> dict[str, Any]:
    """What GGUFReader says about a file, in read_info()'s terms."""
    r = gguf.GGUFReader(path)
    v = gguf.GGUFValueType
    scalars: dict[str, Any] = {}
    strings: dict[str, str] = {}
    arrays: dict[str, tuple[Any, int]] = {}
    for key, f in r.fields.items():
        if key.startswith("GGUF."):
            continue
        if f.types[0] == v.ARRAY:
            arrays[key] = (f.types[1], int(f.parts[4][0]))  # parts: klen, key, type, etype, n
            if f.types[1] not in (v.STRING, v.ARRAY) and len(f.data) <= header.KEEP_ARRAY:
                scalars[key] = tuple(f.contents())
        elif f.types[0] == v.STRING:
            strings[key] = f.contents()
        else:
            scalars[key] = f.contents()
    arch = strings["general.architecture"]

    def hp(key: str) -> Any:
        value = scalars.get(f"{arch}.{key}")
        return max(value) if isinstance(value, tuple) else value

    ftype = scalars.get("general.file_type")
    by_type: Counter[str] = Counter()
    for t in r.tensors:
        by_type[t.tensor_type.name] += int(t.n_bytes)
    head_count = hp("attention.head_count")
    return {
        "version": int(r.fields["GGUF.version"].contents()),
        "architecture": arch,
        "name": strings.get("general.name"),
        "file_type": (gguf.LlamaFileType(ftype).name.removeprefix("MOSTLY_")
                      .removeprefix("ALL_") if ftype is not None else None),
        "context_length": hp("context_length"),
        "block_count": hp("block_count"),
        "embedding_length": hp("embedding_length"),
        "head_count": head_count,
        "head_count_kv": hp("attention.head_count_kv") or head_count,
        "key_length": hp("attention.key_length") or hp("embedding_length") // head_count,
        "value_length": hp("attention.value_length") or hp("embedding_length") // head_count,
        "feed_forward_length": hp("feed_forward_length"),
        "vocab_size": hp("vocab_size") or arrays.get("tokenizer.ggml.tokens", (None, None))[1],
        "n_params": sum(int(t.n_elements) for t in r.tensors),
        "tensor_bytes": os.path.getsize(path) - r.data_offset,
        "data_offset": r.data_offset,
        "alignment": r.alignment,
        "quantisation": max(by_type.items(), key=lambda kv: (kv[1], kv[0]))[0],
        "tensors": [(t.name, tuple(int(d) for d in t.shape), t.tensor_type.name,
                     int(t.data_offset) - r.data_offset, int(t.n_bytes)) for t in r.tensors],
        "scalars": scalars,
        "strings": strings,
        "array_lengths": {k: n for k, (_, n) in arrays.items()},
    }


def assert_matches(info: GGUFInfo, ref: dict[str, Any], path: Path) -> None:
    assert info.path == str(path)
    assert info.file_size == path.stat().st_size
    for key in ("version", "architecture", "name", "file_type", "context_length",
                "block_count", "embedding_length", "head_count", "head_count_kv", "key_length",
                "value_length", "feed_forward_length", "vocab_size", "n_params",
                "tensor_bytes", "data_offset", "alignment", "quantisation"):
        assert getattr(info, key) == ref[key], key
    assert [(t.name, t.dims, t.type_name, t.offset, t.nbytes) for t in info.tensors] \
        == ref["tensors"]
    for key, value in ref["scalars"].items():
        assert info.metadata[key] == value, key
    for key, value in ref["strings"].items():
        if len(value.encode()) <= header.KEEP_STRING:
            assert info.metadata[key] == value, key
        else:
            assert key not in info.metadata, key
    assert dict(info.array_lengths) == ref["array_lengths"]
    assert set(info.metadata) <= set(ref["scalars"]) | set(ref["strings"])
    assert info.bytes_by_type() == _sum_by_type(ref["tensors"])


def _sum_by_type(tensors: list[tuple[str, tuple[int, ...], str, int, int]]) -> dict[str, int]:
    out: Counter[str] = Counter()
    for _, _, tname, _, nbytes in tensors:
        out[tname] += nbytes
    return dict(out)


# -- generated models ----------------------------------------------------------------------


@pytest.mark.parametrize("shape", list(SHAPES))
def test_every_field_matches_the_gguf_package(gguf: Any, models: dict[str, Path],
                                              shape: str) -> None:
    path = models[shape]
    info = read_info(path)
    assert_matches(info, reference(gguf, path), path)
    kwargs = {**{"n_embd": 64, "n_ff": 128, "n_layer": 2, "n_head": 4, "n_ctx": 2048,
                 "dtype": "f32"}, **SHAPES[shape]}
    # and against what the generator was asked for
    assert info.architecture == "llama"
    assert info.name == shape
    assert info.block_count == kwargs["n_layer"]
    assert info.embedding_length == kwargs["n_embd"]
    assert info.head_count == kwargs["n_head"]
    assert info.head_count_kv == (kwargs.get("n_head_kv") or kwargs["n_head"])
    assert info.key_length == info.value_length == kwargs["n_embd"] // kwargs["n_head"]
    assert info.context_length == kwargs["n_ctx"]
    assert info.file_type == kwargs["dtype"].upper()
    assert info.quantisation == kwargs["dtype"].upper()
    assert "tokenizer.ggml.tokens" not in info.metadata  # counted, not kept
    assert info.vocab_size == info.array_lengths["tokenizer.ggml.tokens"] > 256


def test_quantised_tensors_and_every_value_type(gguf: Any, tmp_path: Path) -> None:
    np = importlib.import_module("numpy")
    q = gguf.GGMLQuantizationType
    path = tmp_path / "kinds.gguf"
    w = gguf.GGUFWriter(path, "testarch")
    w.add_custom_alignment(64)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0)
    w.add_uint32("testarch.block_count", 4)
    w.add_uint32("testarch.embedding_length", 256)
    w.add_uint32("testarch.attention.head_count", 8)
    w.add_array("testarch.attention.head_count_kv", [0, 8, 2, 2])   # per layer: max is 8
    w.add_array("testarch.feed_forward_length", [512, 1024, 512, 768])
    w.add_uint32("testarch.attention.key_length", 64)
    w.add_uint64("testarch.context_length", 131072)
    w.add_uint8("x.u8", 255)
    w.add_int8("x.i8", -128)
    w.add_uint16("x.u16", 65535)
    w.add_int16("x.i16", -32768)
    w.add_uint32("x.u32", 2**32 - 1)
    w.add_int32("x.i32", -(2**31))
    w.add_float32("x.f32", 0.5)
    w.add_uint64("x.u64", 2**64 - 1)
    w.add_int64("x.i64", -(2**63))
    w.add_float64("x.f64", 1e300)
    w.add_bool("x.bool", True)
    w.add_string("x.utf8", "星影 ✨")
    w.add_string("x.long", "y" * (header.KEEP_STRING + 1))
    w.add_array("x.strings", ["a", "bb", ""])
    w.add_array("x.nested", [[1, 2], [3, 4, 5]])
    w.add_array("x.floats", [0.25, -1.5])
    w.add_array("x.bools", [True, False, True])
    w.add_array("x.big", list(range(header.KEEP_ARRAY + 1)))
    rng = np.random.default_rng(0)
    for name, qtype, shape in [("a.weight", q.Q4_0, (64, 256)), ("b.weight", q.Q8_0, (32, 256)),
                               ("c.weight", q.F16, (16, 256)), ("d.bias", q.F32, (256,)),
                               ("e.weight", q.BF16, (8, 256))]:
        data = rng.standard_normal(shape, dtype=np.float32)
        if qtype == q.F16:
            w.add_tensor(name, data.astype(np.float16))
        elif qtype == q.F32:
            w.add_tensor(name, data)
        else:
            w.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    info = read_info(path)
    assert_matches(info, reference(gguf, path), path)
    assert info.alignment == 64 and info.data_offset % 64 == 0
    assert info.head_count_kv == 8 and info.per_layer("attention.head_count_kv", 0) == (0, 8, 2, 2)
    assert info.feed_forward_length == 1024
    assert info.key_length == 64 and info.value_length == 256 // 8
    assert info.quantisation == "Q4_0" and info.file_type == "Q4_0"
    assert info.context_length == 131072
    assert info.metadata["x.u64"] == 2**64 - 1 and info.metadata["x.i64"] == -(2**63)
    assert info.metadata["x.bool"] is True and info.metadata["x.utf8"] == "星影 ✨"
    assert info.metadata["x.bools"] == (True, False, True)
    assert "x.long" not in info.metadata and "x.big" not in info.metadata
    assert info.array_lengths["x.big"] == header.KEEP_ARRAY + 1
    assert info.array_lengths["x.nested"] == 2 and info.array_lengths["x.strings"] == 3
    assert info.vocab_size is None
    assert info.bytes_by_type() == {"Q4_0": 64 * 256 // 32 * 18, "Q8_0": 32 * 256 // 32 * 34,
                                    "F16": 16 * 256 * 2, "F32": 256 * 4, "BF16": 8 * 256 * 2}


def test_type_tables_agree_with_the_gguf_package(gguf: Any) -> None:
    for t in gguf.GGMLQuantizationType:
        name, block, size = header.GGML_TYPES[t.value]
        assert (name, (block, size)) == (t.name, gguf.GGML_QUANT_SIZES[t]), t
    for ft in gguf.LlamaFileType:
        if ft.name != "GUESSED":
            assert hg.FILE_TYPES[ft.value] == ft.name.removeprefix("MOSTLY_") \
                .removeprefix("ALL_"), ft


def test_row_size() -> None:
    assert header.row_size("f16", 1024) == 2048
    assert header.row_size("F32", 3) == 12
    assert header.row_size("q8_0", 128) == 4 * 34
    assert header.row_size("q4_0", 128) == 4 * 18
    with pytest.raises(ValueError):
        header.row_size("f8", 1)


def test_gguf_v2_is_read(gguf: Any, models: dict[str, Path], tmp_path: Path) -> None:
    path = tmp_path / "v2.gguf"
    shutil.copyfile(models["tiny-f32"], path)
    with open(path, "r+b") as f:  # v2 and v3 share the layout (v3 allowed big-endian files)
        f.seek(4)
        f.write(struct.pack("<I", 2))
    info = read_info(path)
    assert info.version == 2
    assert_matches(info, reference(gguf, path), path)


def test_large_vocabulary_is_counted_not_kept(gguf: Any, tmp_path: Path, reads: Reads) -> None:
    path = tmp_path / "vocab.gguf"
    n = 150_000
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(1)
    w.add_embedding_length(8)
    w.add_head_count(2)
    w.add_token_list([f"tok{i:06d}-{'x' * (i % 13)}" for i in range(n)])
    w.add_token_scores([float(-i) for i in range(n)])
    w.add_token_types([1] * n)
    w.add_token_merges([f"t{i} o{i}" for i in range(n)])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    size = path.stat().st_size
    info = read_info(path)
    assert info.vocab_size == n
    assert info.array_lengths["tokenizer.ggml.merges"] == n
    assert not any(k.startswith("tokenizer.ggml.") for k in info.metadata)
    assert info.n_params == 0 and info.tensors == () and info.quantisation == "none"
    # walked once through the read-ahead buffer: no byte read twice, no read(2) a token
    assert 0 < reads.bytes <= size, f"read {reads.bytes} bytes of a {size}-byte file"
    assert reads.calls <= size // header._CHUNK + 2, f"{reads.calls} reads of {size} bytes"


# -- only the header is read ---------------------------------------------------------------


def test_a_sparse_gigabyte_reads_only_its_header(gguf: Any, tmp_path: Path,
                                                 reads: Reads) -> None:
    path = tmp_path / "sparse.gguf"
    np = importlib.import_module("numpy")
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(1)
    w.add_embedding_length(4096)
    w.add_head_count(32)
    w.add_context_length(8192)
    shape = (65536, 4096)   # numpy order; 1 GiB of f32
    w.add_tensor_info("blk.0.ffn_up.weight", shape, np.dtype(np.float32), 65536 * 4096 * 4)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    header = path.stat().st_size
    data_offset = -(-header // 32) * 32
    os.truncate(path, data_offset + (1 << 30))   # a hole: no blocks behind the data
    assert path.stat().st_blocks * 512 < 1 << 20

    info = read_info(path)
    assert info.tensor_bytes == 1 << 30 and info.n_params == 1 << 28
    assert info.tensors[0].dims == (4096, 65536) and info.quantisation == "F32"
    assert info.data_offset == gguf.GGUFReader(path).data_offset
    assert 0 < reads.bytes < 1 << 20, f"read {reads.bytes} bytes of a {header}-byte header"


# -- broken and hostile files --------------------------------------------------------------


def test_truncated_at_every_kind_of_cut_point(models: dict[str, Path], tmp_path: Path) -> None:
    source = models["gqa-f16"]
    info = read_info(source)
    size = info.file_size
    cuts = sorted({*range(0, info.data_offset + 64, 37), info.data_offset - 1,
                   info.data_offset, info.data_offset + 1, size // 2, size - 4096, size - 1})
    path = tmp_path / "cut.gguf"
    shutil.copyfile(source, path)
    for cut in reversed(cuts):  # shrink one copy step by step
        os.truncate(path, cut)
        with pytest.raises(GGUFError) as err:
            read_info(path)
        assert str(path) in str(err.value), cut
        assert isinstance(err.value, HoshikageError)
    assert len(cuts) > 100


def test_not_a_gguf(tmp_path: Path, models: dict[str, Path]) -> None:
    bad = tmp_path / "bad.gguf"
    data = bytearray(models["tiny-f32"].read_bytes())
    data[:4] = b"GGML"
    bad.write_bytes(bytes(data))
    with pytest.raises(GGUFError, match="not a GGUF file"):
        read_info(bad)
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(GGUFError, match="too small"):
        read_info(empty)
    with pytest.raises(GGUFError, match="no such file"):
        read_info(tmp_path / "missing.gguf")
    with pytest.raises(GGUFError, match="directory"):
        read_info(tmp_path)


# A tiny GGUF encoder for files the gguf package refuses to write.

def s(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def kv_u32(key: str, value: int) -> bytes:
    return s(key) + struct.pack("<II", 4, value)


def kv_str(key: str, value: str) -> bytes:
    return s(key) + struct.pack("<I", 8) + s(value)


MODEL_KVS = [kv_str("general.architecture", "llama"), kv_u32("llama.block_count", 1),
             kv_u32("llama.embedding_length", 32)]


def encode(kvs: Sequence[bytes], tensors: Sequence[bytes] = (), version: int = 3,
           n_kv: int | None = None, n_tensors: int | None = None, tail: bytes = b"") -> bytes:
    head = b"GGUF" + struct.pack("<IQQ", version, len(tensors) if n_tensors is None else n_tensors,
                                 len(kvs) if n_kv is None else n_kv)
    body = head + b"".join(kvs) + b"".join(tensors)
    return body + b"\0" * (-len(body) % 32) + tail


def tensor(name: str, dims: tuple[int, ...], ttype: int = 0, offset: int = 0,
           n_dims: int | None = None) -> bytes:
    return (s(name) + struct.pack("<I", len(dims) if n_dims is None else n_dims)
            + b"".join(struct.pack("<Q", d) for d in dims) + struct.pack("<IQ", ttype, offset))


def test_a_minimal_hand_encoded_file_is_read(tmp_path: Path) -> None:
    path = tmp_path / "ok.gguf"
    path.write_bytes(encode(MODEL_KVS, [tensor("w", (8, 4))], tail=b"\0" * 128))
    info = read_info(path)
    assert info.n_params == 32 and info.tensors[0].nbytes == 128 and info.head_count == 0
    assert info.tensor_bytes == 128 and info.key_length == 0


HOSTILE: dict[str, tuple[Callable[[], bytes], str]] = {
    "kv count 2**60": (lambda: encode([], n_kv=2**60), "key/value pairs"),
    "tensor count 2**40": (lambda: encode([], n_tensors=2**40), "tensors"),
    "counts beyond the file": (lambda: encode(MODEL_KVS, n_kv=5000), "truncated"),
    "key length 2**40": (lambda: encode([struct.pack("<Q", 2**40) + b"k" * 64]), "limit"),
    "string value 2**40": (lambda: encode([s("k") + struct.pack("<IQ", 8, 2**40) + b"x" * 64]),
                           "truncated"),
    "array of 2**60 u8": (lambda: encode([s("k") + struct.pack("<IIQ", 9, 0, 2**60)]),
                          "truncated"),
    "array of 2**40 strings": (lambda: encode([s("k") + struct.pack("<IIQ", 9, 8, 2**40)]),
                               "limit"),
    "array of 2**21 strings": (lambda: encode([s("k") + struct.pack("<IIQ", 9, 8, 2**21)]),
                               "truncated"),
    "arrays nested 100 deep": (lambda: encode([s("k") + struct.pack("<I", 9)
                                               + struct.pack("<IQ", 9, 1) * 100]), "nested"),
    "unknown value type": (lambda: encode([s("k") + struct.pack("<I", 99) + b"\0" * 16]),
                           "unknown value type"),
    "unknown array type": (lambda: encode([s("k") + struct.pack("<IIQ", 9, 42, 1) + b"\0" * 8]),
                           "unknown array element type"),
    "duplicate key": (lambda: encode([kv_u32("a", 1), kv_u32("a", 2)]), "duplicate key"),
    "n_dims 2**31": (lambda: encode(MODEL_KVS, [tensor("w", (), n_dims=2**31) + b"\0" * 64]),
                     "dimensions"),
    "tensor beyond the data": (lambda: encode(MODEL_KVS, [tensor("w", (2**20, 2**20))],
                                              tail=b"\0" * 64), "truncated"),
    "tensor offset 2**63": (lambda: encode(MODEL_KVS, [tensor("w", (8,), offset=2**63)]),
                            "truncated"),
    "misaligned tensor": (lambda: encode(MODEL_KVS, [tensor("w", (8,), offset=3)],
                                         tail=b"\0" * 64), "alignment"),
    "duplicate tensor": (lambda: encode(MODEL_KVS, [tensor("w", (8,)), tensor("w", (8,))],
                                        tail=b"\0" * 64), "duplicate tensor"),
    "row not a block multiple": (lambda: encode(MODEL_KVS, [tensor("w", (33, 1), ttype=2)],
                                                tail=b"\0" * 64), "block size"),
    "alignment 3": (lambda: encode([*MODEL_KVS, kv_u32("general.alignment", 3)]), "power of two"),
    "no architecture": (lambda: encode([kv_u32("x", 1)]), "general.architecture"),
    "no block_count": (lambda: encode([kv_str("general.architecture", "llama")]),
                       "llama.block_count"),
    "version 1": (lambda: encode([], version=1), "version 1"),
    "version 4": (lambda: encode([], version=4), "unsupported GGUF version 4"),
    "big-endian": (lambda: encode([], version=3 << 24), "big-endian"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_headers_fail_on_what_the_file_holds_in_little_memory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reads: Reads, case: str) -> None:
    """A claim (a count, a length, an offset) is checked against the file before anything is
    walked or allocated: the reader fails having walked no more elements than the file has
    bytes, read no byte past it, in little memory, whatever the header claims."""
    build, message = HOSTILE[case]
    path = tmp_path / "hostile.gguf"
    path.write_bytes(build())
    size = path.stat().st_size
    readers: list[header.Reader] = []
    fail = header.Reader.fail

    def failing(self: header.Reader, message: str) -> GGUFError:
        readers.append(self)
        return fail(self, message)

    monkeypatch.setattr(header.Reader, "fail", failing)
    tracemalloc.start()
    try:
        with pytest.raises(GGUFError, match=message) as err:
            read_info(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert str(path) in str(err.value)
    assert peak < 2 * MiB, f"{case}: peak {peak} bytes"
    assert 0 < reads.bytes <= size, f"{case}: read {reads.bytes} bytes of a {size}-byte file"
    walked = [r.walked for r in readers]
    assert walked and all(w <= size for w in walked), f"{case}: walked {walked}"


def test_walked_elements_have_a_budget_for_the_whole_header(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    strings = struct.pack("<IIQ", 9, 8, 60) + s("x") * 60
    path = tmp_path / "walk.gguf"
    path.write_bytes(encode([*MODEL_KVS, s("a") + strings, s("b") + strings]))
    assert read_info(path).array_lengths == {"a": 60, "b": 60}
    monkeypatch.setattr(header, "MAX_WALKED_TOTAL", 100)
    with pytest.raises(GGUFError, match="in all"):
        read_info(path)


def test_tensor_of_an_unknown_type_runs_to_the_next_one(tmp_path: Path) -> None:
    path = tmp_path / "future.gguf"
    path.write_bytes(encode(MODEL_KVS, [tensor("a", (16,), ttype=200, offset=0),
                                        tensor("b", (16,), ttype=0, offset=64)],
                            tail=b"\0" * 128))
    info = read_info(path)
    assert [(t.type_name, t.nbytes) for t in info.tensors] == [("TYPE_200", 64), ("F32", 64)]
