"""How much memory llama-server (CPU backend) will use for a model: the admission estimate
(what it puts on GPU devices: offload.py).

    total = weights + kv_cache + compute + overhead

- weights: the file size in whole 2 MiB pages (the tmpfs is mounted huge=always). The staged
  copy lives in the tmpfs and llama-server mmaps it, so its pages are paid once. Plus an
  anonymous copy of what llama-server does not use through the mmap: without mmap (--no-mmap,
  -lm none/mlock/dio) all tensor data; otherwise the matrices the CPU backend repacks into
  interleaved layouts (Q4_0, Q4_K, IQ4_NL, Q2_K, MXFP4 on x86-64; --no-repack turns that
  off), which then cost twice.
- kv_cache: cells x sum over layers of (K row + V row) bytes, a row being key_length (or
  value_length) x head_count_kv of that layer in the cache type (f16: 2 bytes per value).
  Cells: n_ctx rounded up to 256 when the cache is unified (the default with -np auto,
  which means 4 slots), else n_parallel streams of (n_ctx / n_parallel) rounded up to 256.
- compute: ggml's graph buffer for one micro-batch of u = min(n_ubatch, n_batch, n_ctx)
  tokens: u x 4 bytes x the widest step of the graph (attention: 5 x n_embd + the K/V width;
  feed-forward: 4 x n_embd + 2 or 3 x n_ff), plus the f16 attention mask of u x (cells per
  stream) x 2 bytes; without flash attention the f32 scores (n_head x cells per stream x u)
  take the place of the mask, and the CPU backend's work buffer holds an f16 copy of them.
- overhead: what llama-server allocates that its log does not print: the process itself,
  the vocabulary and the per-slot samplers (per token of the vocabulary), the logits and the
  CPU backend's work buffer (the activations converted for f16/quantised matmuls).

The constants were measured, not guessed: bench/memory_estimate.py runs real llama-server
processes on generated models in a hugepage tmpfs and compares; docs/memory.md has the table.

Not in `total`, reported separately: `prompt_cache`, the bound on what llama-server's prompt
cache (--cache-ram, default 8192 MiB) can grow to while the model serves requests: every idle
slot's KV state is copied into it when a new task starts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from hoshikage_sd.errors import die
from hoshikage_sd.gguf import GGUFInfo
from hoshikage_sd.ggufheader import row_size

MiB = 1 << 20

#: llama-server defaults (b10068 and b10434 agree)
AUTO_PARALLEL = 4            # -np -1 (the default): 4 slots sharing one unified KV cache
DEFAULT_BATCH = 2048
DEFAULT_UBATCH = 512
DEFAULT_CACHE_RAM_MIB = 8192
KV_PAD = 256                 # llama.cpp rounds n_ctx and each stream's cells up to this

#: tensor types the CPU backend repacks on x86-64 (measured: "CPU_REPACK model buffer size")
REPACKED_TYPES = frozenset({"Q4_0", "Q4_K", "IQ4_NL", "Q2_K", "MXFP4"})

#: the tmpfs is mounted huge=always: a file occupies whole 2 MiB pages
TMPFS_PAGE = 2 * MiB

#: overhead (measured, see docs/memory.md): the process itself, per vocabulary token, per slot
#: and vocabulary token (a sampler's candidate array and the logits)
BASE_OVERHEAD = 8 * MiB
PER_VOCAB_TOKEN = 160
PER_SLOT_VOCAB_TOKEN = 16
#: per BPE merge (a std::map node with two strings); derived from the data structure, since
#: the generated test models have SentencePiece vocabularies without merges
PER_MERGE = 128

CACHE_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1")
_FA_ON = {"on", "1", "true", "enabled", "yes"}
_FA_OFF = {"off", "0", "false", "disabled", "no"}
_FA_VALUES = _FA_ON | _FA_OFF | {"auto"}
_MMAP_MODES = {"auto", "mmap", "mmap+mlock"}   # -lm none, mlock and dio read into RAM


@dataclass(frozen=True)
class LoadParams:
    n_ctx: int                       # total context (all slots) as llama-server is given it
    n_parallel: int                  # slots
    cache_type_k: str = "f16"
    cache_type_v: str = "f16"
    kv_unified: bool = False         # one KV buffer shared by all slots
    n_batch: int = DEFAULT_BATCH
    n_ubatch: int = DEFAULT_UBATCH
    flash_attn: bool = True          # auto is on for the CPU backend
    mmap: bool = True
    repack: bool = True
    cache_ram_mib: int = DEFAULT_CACHE_RAM_MIB   # prompt cache limit; 0 off, -1 no size limit


@dataclass(frozen=True)
class Estimate:
    weights: int
    kv_cache: int
    compute: int
    overhead: int
    prompt_cache: int = 0            # what the prompt cache may grow to later; not in total

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.compute + self.overhead

    @property
    def worst_case(self) -> int:
        """total plus a full prompt cache: what a long-running server may reach."""
        return self.total + self.prompt_cache


def _pad(n: int, to: int = KV_PAD) -> int:
    return -(-n // to) * to


def int_arg(flag: str, value: str | None) -> int:
    """An integer argument as llama-server reads it (std::stoi: leading blanks, a sign, the
    digits, and whatever follows ignored: -ngl 99.5 is 99)."""
    if value is None:
        die(f"llama-server argument {flag} needs a number")
    text = value.lstrip(" \t\n\v\f\r")
    sign = text[:1] if text[:1] in ("+", "-") else ""
    digits = len(text) - len(sign) - len(text[len(sign):].lstrip("0123456789"))
    if not digits:
        die(f"llama-server argument {flag} needs a number, not {value!r}")
    return int(text[:len(sign) + digits])


def _cache_type(flag: str, value: str | None) -> str:
    if value is None or value.lower() not in CACHE_TYPES:
        die(f"llama-server argument {flag} needs a KV cache type, not {value!r}",
            hint=f"one of: {', '.join(CACHE_TYPES)}")
    return value.lower()


def flag_at(items: Sequence[str], i: int) -> tuple[str, str | None, bool]:
    """The flag at items[i], its value ("--flag=V" or the next item), and whether that value
    is the next item (then the next item is consumed when the flag takes a value)."""
    arg = items[i]
    flag, eq, inline = arg.partition("=") if arg.startswith("--") else (arg, "", "")
    return flag, inline if eq else (items[i + 1] if i + 1 < len(items) else None), not eq


def load_params(info: GGUFInfo, args: Sequence[str]) -> LoadParams:
    """What llama-server will use, from its command-line arguments (the manifest's args)."""
    # ~60 lines on purpose: one flat table of llama-server's flags, read top to bottom
    n_ctx = 0
    n_parallel = -1
    kw: dict[str, Any] = {}
    unified: bool | None = None
    items = list(args)
    i = 0
    while i < len(items):
        flag, value, takes = flag_at(items, i)  # takes: its value is the next item
        if flag in ("-c", "--ctx-size"):
            n_ctx = int_arg(flag, value)
        elif flag in ("-np", "--parallel"):
            n_parallel = int_arg(flag, value)
        elif flag in ("-ctk", "--cache-type-k"):
            kw["cache_type_k"] = _cache_type(flag, value)
        elif flag in ("-ctv", "--cache-type-v"):
            kw["cache_type_v"] = _cache_type(flag, value)
        elif flag in ("-b", "--batch-size"):
            kw["n_batch"] = int_arg(flag, value)
        elif flag in ("-ub", "--ubatch-size"):
            kw["n_ubatch"] = int_arg(flag, value)
        elif flag in ("-cram", "--cache-ram"):
            kw["cache_ram_mib"] = int_arg(flag, value)
        elif flag in ("-lm", "--load-mode"):
            if value is None:
                die(f"llama-server argument {flag} needs a mode")
            kw["mmap"] = value.lower() in _MMAP_MODES
        elif flag in ("-fa", "--flash-attn"):
            if not takes or (value is not None and value.lower() in _FA_VALUES):
                kw["flash_attn"] = (value or "").lower() not in _FA_OFF
            else:  # older builds: a bare flag
                kw["flash_attn"] = True
                takes = False
        else:
            takes = False
            if flag in ("-kvu", "--kv-unified"):
                unified = True
            elif flag in ("-no-kvu", "--no-kv-unified"):
                unified = False
            elif flag in ("--no-mmap", "-dio", "--direct-io"):
                kw["mmap"] = False
            elif flag == "--mmap":
                kw["mmap"] = True
            elif flag in ("-nr", "--no-repack"):
                kw["repack"] = False
            elif flag == "--repack":
                kw["repack"] = True
        i += 2 if takes else 1

    if n_ctx <= 0:
        if not info.context_length:
            die(f"{info.path} does not say its context length",
                hint="give the model '-c N' in its args in the manifest")
        n_ctx = info.context_length
    if n_parallel < 0:  # llama-server: "n_parallel is set to auto, using 4 and kv_unified"
        n_parallel, unified = AUTO_PARALLEL, True
    return LoadParams(n_ctx=n_ctx, n_parallel=max(1, n_parallel), kv_unified=bool(unified),
                      **kw)


def kv_cells(params: LoadParams) -> tuple[int, int]:
    """(streams, cells per stream) of llama.cpp's KV cache."""
    n_ctx = _pad(params.n_ctx)
    if params.kv_unified or params.n_parallel == 1:
        return 1, n_ctx
    return params.n_parallel, _pad(n_ctx // params.n_parallel)


def kv_bytes_per_cell(info: GGUFInfo, params: LoadParams) -> int:
    """K and V bytes of one token over all layers."""
    heads_kv = info.per_layer("attention.head_count_kv", info.head_count_kv)
    return sum(row_size(params.cache_type_k, info.key_length * h)
               + row_size(params.cache_type_v, info.value_length * h) for h in heads_kv)


def kv_cache_bytes(info: GGUFInfo, params: LoadParams) -> int:
    streams, cells = kv_cells(params)
    return streams * cells * kv_bytes_per_cell(info, params)


def ubatch(params: LoadParams) -> int:
    return max(1, min(params.n_ubatch, params.n_batch, params.n_ctx))


def compute_bytes(info: GGUFInfo, params: LoadParams) -> int:
    u = ubatch(params)
    _, n_kv = kv_cells(params)
    e = info.embedding_length
    f = info.feed_forward_length or 4 * e
    kv_width = max(info.key_length, info.value_length) * info.head_count_kv
    attn = 5 * e + kv_width + (f if f < e else 0)
    # the last layer runs its feed-forward on the output rows only: one layer has no FFN peak
    ffn = 4 * e + 2 * f + (f if f > 2 * e else 0) if info.block_count > 1 else 0
    if params.flash_attn:
        return u * 4 * max(attn, ffn) + u * n_kv * 2
    scores = info.head_count * n_kv + n_kv + 7 * e  # f32 KQ, f32 mask, the rest
    # plus the CPU backend's work buffer: KQ converted to f16 for the KQ x V matmul
    return u * 4 * max(scores, ffn + n_kv) + u * info.head_count * n_kv * 2


def repacked_bytes(info: GGUFInfo) -> int:
    """Matrices the CPU backend copies into its interleaved layouts (CPU_REPACK buffer)."""
    return sum(t.nbytes for t in info.tensors
               if t.type_name in REPACKED_TYPES and len(t.dims) >= 2 and t.dims[1] % 8 == 0
               and not t.name.startswith("token_embd"))


def weights_bytes(info: GGUFInfo, params: LoadParams) -> int:
    staged = _pad(info.file_size, TMPFS_PAGE)
    if not params.mmap:
        return staged + info.tensor_bytes
    return staged + (repacked_bytes(info) if params.repack else 0)


def overhead_bytes(info: GGUFInfo, params: LoadParams) -> int:
    vocab = info.vocab_size or 0
    merges = info.array_lengths.get("tokenizer.ggml.merges", 0)
    e = info.embedding_length
    f = info.feed_forward_length or 4 * e
    work = ubatch(params) * max(e, f) * 2  # activations converted to f16 for the matmuls
    return (BASE_OVERHEAD + vocab * PER_VOCAB_TOKEN + merges * PER_MERGE
            + params.n_parallel * vocab * PER_SLOT_VOCAB_TOKEN + work)


def prompt_cache_bytes(info: GGUFInfo, params: LoadParams) -> int:
    if params.cache_ram_mib > 0:
        return params.cache_ram_mib * MiB
    if params.cache_ram_mib < 0:  # no size limit: llama-server then keeps n_ctx tokens
        return params.n_ctx * kv_bytes_per_cell(info, params)
    return 0


def projector_bytes(file_size: int) -> int:
    """A multimodal projector (--mmproj): its copy on the RAM disk and the tensors that
    llama-server's clip loader reads into its own buffers (not an mmap). Its compute buffer
    for an image is not counted: unmeasured here (no real projector in the test bed)."""
    return _pad(file_size, TMPFS_PAGE) + file_size


def estimate(info: GGUFInfo, params: LoadParams) -> Estimate:
    return Estimate(
        weights=weights_bytes(info, params),
        kv_cache=kv_cache_bytes(info, params),
        compute=compute_bytes(info, params),
        overhead=overhead_bytes(info, params),
        prompt_cache=prompt_cache_bytes(info, params),
    )
