"""A GGUF model from its header alone, for memory estimates and `hoshikage status`: its
architecture, hyperparameters, file type, quantisation and size (GGUFInfo), over every shard
of a split model (read_model_info). ggufheader.py reads the header, every claim bounded.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Final

from hoshikage_sd.ggufheader import (
    DEFAULT_ALIGNMENT,
    GGUFError,
    Reader,
    TensorInfo,
    opened,
    read_counts,
    read_metadata,
    read_tensors,
    sized_tensors,
)

__all__ = ["FILE_TYPES", "GGUFError", "GGUFInfo", "TensorInfo", "read_info", "read_model_info"]

#: general.file_type (llama_ftype) -> the name llama.cpp's quantize tool uses
FILE_TYPES: Final[Mapping[int, str]] = MappingProxyType({
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 4: "Q4_1_SOME_F16", 7: "Q8_0", 8: "Q5_0",
    9: "Q5_1", 10: "Q2_K", 11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S",
    15: "Q4_K_M", 16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K", 19: "IQ2_XXS", 20: "IQ2_XS",
    21: "Q2_K_S", 22: "IQ3_XS", 23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL", 26: "IQ3_S",
    27: "IQ3_M", 28: "IQ2_S", 29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16",
    33: "Q4_0_4_4", 34: "Q4_0_4_8", 35: "Q4_0_8_8", 36: "TQ1_0", 37: "TQ2_0",
    38: "MXFP4_MOE", 39: "NVFP4", 40: "Q1_0",
})
_FILE_TYPE_GUESSED: Final = 1024


@dataclass(frozen=True)
class GGUFInfo:
    path: str
    file_size: int
    version: int
    architecture: str
    name: str | None
    file_type: str | None            # e.g. "F16", "Q4_K_M" from general.file_type
    context_length: int | None
    block_count: int
    embedding_length: int
    head_count: int                  # max over layers where the key is a per-layer array
    head_count_kv: int               # max over layers; 0 for models without attention
    key_length: int                  # per-head dims (default embedding_length // head_count)
    value_length: int
    feed_forward_length: int | None
    vocab_size: int | None
    n_params: int                    # sum over tensors of the product of dims
    tensor_bytes: int                # bytes of tensor data (file_size - data_offset)
    quantisation: str                # most common tensor type by bytes, e.g. "F16", "Q4_K"
    metadata: Mapping[str, object]   # scalars, short strings, short numeric arrays (tuples)
    data_offset: int = 0
    alignment: int = DEFAULT_ALIGNMENT
    array_lengths: Mapping[str, int] = field(default_factory=dict)  # every array key
    tensors: tuple[TensorInfo, ...] = ()

    def per_layer(self, key: str, default: int) -> tuple[int, ...]:
        """An '{arch}.KEY' hyperparameter for each layer (it may be one int or an array)."""
        value = self.metadata.get(f"{self.architecture}.{key}")
        if isinstance(value, tuple) and len(value) == self.block_count:
            return tuple(int(v) for v in value)
        if isinstance(value, int) and not isinstance(value, bool):
            return (value,) * self.block_count
        return (default,) * self.block_count

    def bytes_by_type(self) -> dict[str, int]:
        out: Counter[str] = Counter()
        for t in self.tensors:
            out[t.type_name] += t.nbytes
        return dict(out)


def _as_int(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, tuple) and value and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        return max(int(v) for v in value)  # per-layer array: the largest layer
    return None


def read_info(path: str | os.PathLike[str]) -> GGUFInfo:
    """Read a GGUF file's header; raise GGUFError if it is not a complete, sane GGUF (and
    encryption.DecryptError if it is encrypted and cannot be decrypted)."""
    with opened(os.fspath(path)) as r:
        return _parse(r)


def architecture(path: str | os.PathLike[str]) -> str:
    """A GGUF file's general.architecture ("clip" for a projector: read_info reads models
    only); GGUFError if it is no GGUF or has none."""
    with opened(os.fspath(path)) as r:
        _, _, n_kv = read_counts(r)
        arch = read_metadata(r, n_kv)[0].get("general.architecture")
        if not isinstance(arch, str):
            raise r.fail("no general.architecture")
        return arch


def read_model_info(paths: Sequence[str | os.PathLike[str]]) -> GGUFInfo:
    """A model's header over all its files: the first shard's (or the only file's), with the
    other shards' tensors, sizes and tensor data added (split GGUFs carry the metadata in
    the first shard only)."""
    info = read_info(paths[0])
    if len(paths) == 1:
        return info
    tensors, size, tensor_bytes = list(info.tensors), info.file_size, info.tensor_bytes
    for path in paths[1:]:
        with opened(os.fspath(path)) as r:
            _, n_tensors, n_kv = read_counts(r)
            read_metadata(r, n_kv)  # read past: the first shard has what counts
            raw = read_tensors(r, n_tensors)
            data_offset = -(-r.offset // info.alignment) * info.alignment
            if data_offset > r.size:
                raise r.fail("truncated before its tensor data")
            tensors += sized_tensors(r, raw, r.size - data_offset, info.alignment)
            size, tensor_bytes = size + r.size, tensor_bytes + r.size - data_offset
    return replace(info, file_size=size, tensor_bytes=tensor_bytes, tensors=tuple(tensors),
                   n_params=sum(t.n_elements for t in tensors))


def _parse(r: Reader) -> GGUFInfo:
    version, n_tensors, n_kv = read_counts(r)
    metadata, array_lengths = read_metadata(r, n_kv)
    tensors = read_tensors(r, n_tensors)
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment <= 0 \
            or alignment & (alignment - 1):
        raise r.fail(f"general.alignment must be a power of two, not {alignment!r}")
    data_offset = -(-r.offset // alignment) * alignment
    if data_offset > r.size:
        raise r.fail(f"truncated: tensor data would start at offset {data_offset} "
                     f"but the file has {r.size} bytes")
    tensor_bytes = r.size - data_offset
    infos = sized_tensors(r, tensors, tensor_bytes, alignment)
    return _info(r, version, metadata, array_lengths, infos, data_offset, tensor_bytes,
                 alignment)


def _info(r: Reader, version: int, metadata: dict[str, object],
          array_lengths: dict[str, int], tensors: tuple[TensorInfo, ...],
          data_offset: int, tensor_bytes: int, alignment: int) -> GGUFInfo:
    arch = metadata.get("general.architecture")
    if not isinstance(arch, str) or not arch:
        raise r.fail("no general.architecture: not a model file")

    def hparam(key: str, required: bool = False) -> int | None:
        full = f"{arch}.{key}"
        value = _as_int(metadata.get(full))
        if value is None and required:
            raise r.fail(f"no {full} (is this a language model, not an adapter or projector?)")
        if value is not None and value < 0:
            raise r.fail(f"{full} is negative ({value})")
        return value

    block_count = hparam("block_count", required=True) or 0
    embedding_length = hparam("embedding_length", required=True) or 0
    head_count = hparam("attention.head_count") or 0
    head_count_kv = hparam("attention.head_count_kv")
    if head_count_kv is None:
        head_count_kv = head_count
    per_head = embedding_length // head_count if head_count else 0
    key_length = hparam("attention.key_length")
    value_length = hparam("attention.value_length")
    vocab_size = hparam("vocab_size")
    if vocab_size is None:
        vocab_size = array_lengths.get("tokenizer.ggml.tokens")

    ftype = metadata.get("general.file_type")
    file_type = None
    if isinstance(ftype, int) and not isinstance(ftype, bool):
        base = ftype & ~_FILE_TYPE_GUESSED
        file_type = FILE_TYPES.get(base, f"FTYPE_{base}")
        if ftype & _FILE_TYPE_GUESSED:
            file_type += " (guessed)"
    name = metadata.get("general.name")

    by_type: Counter[str] = Counter()
    for t in tensors:
        by_type[t.type_name] += t.nbytes
    quantisation = max(by_type.items(), key=lambda kv: (kv[1], kv[0]))[0] if by_type else "none"

    return GGUFInfo(
        path=r.path, file_size=r.size, version=version, architecture=arch,
        name=name if isinstance(name, str) else None, file_type=file_type,
        context_length=hparam("context_length"), block_count=block_count,
        embedding_length=embedding_length, head_count=head_count, head_count_kv=head_count_kv,
        key_length=per_head if key_length is None else key_length,
        value_length=per_head if value_length is None else value_length,
        feed_forward_length=hparam("feed_forward_length"), vocab_size=vocab_size,
        n_params=sum(t.n_elements for t in tensors), tensor_bytes=tensor_bytes,
        quantisation=quantisation, metadata=MappingProxyType(metadata),
        data_offset=data_offset, alignment=alignment,
        array_lengths=MappingProxyType(array_lengths), tensors=tensors,
    )
