"""hoshikage_sd.memory: llama-server's arguments, and the estimate on known numbers.

The "known numbers" are what llama-server b10434 printed for generated models ("KV buffer
size", "compute buffer size"); tests/integration/test_memory_estimate.py checks real memory.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from hoshikage_sd import memory
from hoshikage_sd.errors import HoshikageError
from hoshikage_sd.gguf import GGUFInfo, TensorInfo
from hoshikage_sd.memory import Estimate, LoadParams, estimate, load_params
from testbed.estimate import within

MiB = 1 << 20


def model(**kw: Any) -> GGUFInfo:
    """A llama-shaped GGUFInfo without a file (defaults: tools/make_gguf.py's tiny model)."""
    base: dict[str, Any] = dict(
        path="/models/x.gguf", file_size=631_744, version=3, architecture="llama",
        name="x", file_type="F32", context_length=2048, block_count=2, embedding_length=64,
        head_count=4, head_count_kv=4, key_length=16, value_length=16,
        feed_forward_length=128, vocab_size=564, n_params=154_432, tensor_bytes=617_728,
        quantisation="F32", metadata={})
    base.update(kw)
    return GGUFInfo(**base)


def shape(n_embd: int, n_ff: int, n_layer: int, n_head: int, n_head_kv: int | None = None,
          **kw: Any) -> GGUFInfo:
    kv = n_head_kv or n_head
    return model(embedding_length=n_embd, feed_forward_length=n_ff, block_count=n_layer,
                 head_count=n_head, head_count_kv=kv, key_length=n_embd // n_head,
                 value_length=n_embd // n_head, **kw)


M46 = shape(512, 1408, 8, 8, 2, context_length=16384)      # the bench's m46-f16-gqa
G1 = shape(2048, 5632, 10, 16, context_length=16384)       # tools/make_gguf.py --size-preset 1g


# -- load_params ---------------------------------------------------------------------------


def test_defaults_are_llama_servers() -> None:
    p = load_params(M46, [])
    assert p == LoadParams(n_ctx=16384, n_parallel=4, kv_unified=True)
    assert (p.cache_type_k, p.cache_type_v, p.n_batch, p.n_ubatch) == ("f16", "f16", 2048, 512)
    assert p.flash_attn and p.mmap and p.repack and p.cache_ram_mib == 8192


@pytest.mark.parametrize(("args", "expected"), [
    (["-c", "4096"], dict(n_ctx=4096, n_parallel=4, kv_unified=True)),
    (["-c", "0"], dict(n_ctx=16384)),
    (["--ctx-size", "8192", "-np", "2"], dict(n_ctx=8192, n_parallel=2, kv_unified=False)),
    (["--ctx-size=8192", "--parallel=3", "-kvu"], dict(n_parallel=3, kv_unified=True)),
    (["-np", "-1", "-no-kvu"], dict(n_parallel=4, kv_unified=True)),  # auto forces unified
    (["-np", "1"], dict(n_parallel=1, kv_unified=False)),
    (["-ctk", "q8_0", "--cache-type-v", "Q4_0"], dict(cache_type_k="q8_0", cache_type_v="q4_0")),
    (["-b", "256", "--ubatch-size", "128"], dict(n_batch=256, n_ubatch=128)),
    (["-fa", "off"], dict(flash_attn=False)),
    (["--flash-attn=on"], dict(flash_attn=True)),
    (["-fa", "-c", "1024"], dict(flash_attn=True, n_ctx=1024)),   # older builds: a bare flag
    (["--no-mmap"], dict(mmap=False)),
    (["-lm", "none"], dict(mmap=False)),
    (["-lm", "mlock"], dict(mmap=False)),                        # measured: all in RssAnon
    (["--direct-io"], dict(mmap=False)),
    (["--load-mode", "mmap+mlock"], dict(mmap=True)),
    (["-nr"], dict(repack=False)),
    (["-cram", "0"], dict(cache_ram_mib=0)),
    (["--temp", "0.7", "--jinja", "-ngl", "99", "-c", "512"], dict(n_ctx=512)),  # others pass
])
def test_arguments(args: list[str], expected: dict[str, Any]) -> None:
    p = load_params(M46, args)
    for key, value in expected.items():
        assert getattr(p, key) == value, key


@pytest.mark.parametrize("args", [["-c", "lots"], ["-np"], ["-ctk", "f8"], ["-ub", "x1"]])
def test_bad_arguments_are_operator_errors(args: list[str]) -> None:
    with pytest.raises(HoshikageError, match=args[0]):
        load_params(M46, args)


def test_a_model_without_a_context_length_needs_c() -> None:
    info = replace(M46, context_length=None)
    with pytest.raises(HoshikageError, match="context length"):
        load_params(info, [])
    assert load_params(info, ["-c", "2048"]).n_ctx == 2048


# -- the KV cache --------------------------------------------------------------------------


@pytest.mark.parametrize(("info", "args", "mib"), [
    # llama-server b10434's "KV buffer size" for these models and arguments
    (model(), [], 1.0),
    (model(), ["-c", "512"], 0.25),
    (shape(256, 512, 2, 4), ["-c", "100"], 0.5),        # rounded up to 256 cells
    (M46, ["-c", "16384"], 64.0),
    (M46, ["-c", "4096", "-np", "3"], 18.0),            # 3 streams of 1536 cells
    (M46, ["-c", "8192", "-np", "3", "-ub", "256"], 33.0),
    (shape(256, 512, 2, 4), ["-c", "4096", "-np", "8"], 8.0),  # 8 streams of 512 cells
    (shape(256, 512, 2, 4), ["-c", "4096", "-np", "8", "-kvu"], 8.0),
    (M46, ["-c", "4096", "-ctk", "q8_0", "-ctv", "q8_0"], 8.5),
    (M46, ["-c", "4096", "-ctk", "q4_0"], 10.25),
    (shape(256, 512, 2, 4), ["-c", "513", "-np", "2"], 2.0),  # 768 / 2 = 384 -> 512 cells
    (G1, ["-c", "4096"], 320.0),
    (G1, ["-c", "16384", "-np", "2"], 1280.0),
])
def test_kv_cache_matches_llama_server(info: GGUFInfo, args: list[str], mib: float) -> None:
    assert memory.kv_cache_bytes(info, load_params(info, args)) == mib * MiB


def test_kv_formula_by_hand() -> None:
    # layers x cells x (K + V) x head_count_kv x head dim x 2 bytes (f16)
    info = shape(4096, 14336, 32, 32, 8, context_length=131072)   # a Llama-3-8B shape
    p = load_params(info, ["-c", "8192", "-np", "1"])
    assert memory.kv_cache_bytes(info, p) == 32 * 8192 * 2 * 8 * 128 * 2 == 1024 * MiB


def test_gqa_shrinks_the_kv_cache() -> None:
    args = ["-c", "4096"]
    full = memory.kv_cache_bytes(shape(512, 1408, 8, 8), load_params(M46, args))
    gqa = memory.kv_cache_bytes(shape(512, 1408, 8, 8, 2), load_params(M46, args))
    mqa = memory.kv_cache_bytes(shape(512, 1408, 8, 8, 1), load_params(M46, args))
    assert full == 4 * gqa == 8 * mqa
    e_full = estimate(shape(512, 1408, 8, 8), load_params(M46, args))
    e_gqa = estimate(shape(512, 1408, 8, 8, 2), load_params(M46, args))
    assert e_gqa.total < e_full.total


def test_per_layer_kv_heads_are_summed() -> None:
    # hybrid models give head_count_kv per layer; 0 marks a layer without attention
    info = replace(shape(512, 1408, 4, 8, 8),
                   metadata={"llama.attention.head_count_kv": (0, 8, 0, 2)})
    p = load_params(info, ["-c", "1024"])
    per_cell = (8 + 2) * 64 * 2 * 2
    assert memory.kv_cache_bytes(info, p) == 1024 * per_cell


# -- compute buffers, weights, overhead ----------------------------------------------------


@pytest.mark.parametrize(("info", "args", "mib"), [
    # llama-server b10434's "CPU compute buffer size"
    (model(), [], 3.01),
    (model(), ["-c", "512"], 1.51),
    (M46, ["-c", "4096"], 16.26),
    (M46, ["-c", "16384"], 28.26),
    (M46, ["-c", "4096", "-np", "3"], 13.79),
    (M46, ["-c", "4096", "-ub", "256"], 8.13),
    (shape(256, 2048, 2, 4), ["-c", "4096"], 18.01),
    (shape(1024, 4096, 2, 8), ["-c", "4096", "-ub", "128"], 9.0),
    (shape(256, 512, 2, 4), ["-c", "300"], 2.64),        # the micro-batch shrinks to n_ctx
    (G1, ["-c", "4096"], 53.0),
])
def test_compute_buffer_matches_llama_server(info: GGUFInfo, args: list[str],
                                             mib: float) -> None:
    got = memory.compute_bytes(info, load_params(info, args)) / MiB
    assert got == pytest.approx(mib, rel=0.05, abs=0.1)


def test_without_flash_attention_the_scores_dominate() -> None:
    info = shape(1024, 256, 2, 16)
    with_fa = memory.compute_bytes(info, load_params(info, ["-c", "4096"]))
    without = memory.compute_bytes(info, load_params(info, ["-c", "4096", "-fa", "off"]))
    # logged 150.01 MiB, plus the f16 copy of the scores in the CPU backend's work buffer
    assert without / MiB == pytest.approx(150 + 64, rel=0.05)
    assert without > 10 * with_fa


def q4k_model() -> GGUFInfo:
    tensors = (
        TensorInfo("token_embd.weight", (4096, 32000), 12, 0, 73_728_000),       # not repacked
        TensorInfo("blk.0.attn_q.weight", (4096, 4096), 12, 73_728_000, 9_437_184),
        TensorInfo("blk.0.ffn_down.weight", (14336, 4096), 14, 83_165_184, 48_168_960),  # Q6_K
        TensorInfo("output.weight", (4096, 32001), 12, 131_334_144, 73_730_304),  # 32001 % 8
    )
    return replace(shape(4096, 14336, 1, 32, 8), file_size=205_100_000,
                   tensor_bytes=205_064_448, quantisation="Q4_K", tensors=tensors)


def test_repacked_weights_cost_twice() -> None:
    info = q4k_model()
    assert memory.repacked_bytes(info) == 9_437_184
    pad = memory._pad(info.file_size, memory.TMPFS_PAGE)
    assert memory.weights_bytes(info, load_params(info, ["-c", "512"])) == pad + 9_437_184
    assert memory.weights_bytes(info, load_params(info, ["-c", "512", "-nr"])) == pad
    no_mmap = load_params(info, ["-c", "512", "--no-mmap"])
    assert memory.weights_bytes(info, no_mmap) == pad + info.tensor_bytes


def test_weights_are_the_file_in_whole_huge_pages() -> None:
    assert memory.weights_bytes(model(), load_params(model(), [])) == 2 * MiB
    info = replace(G1, file_size=1_032_415_040)
    assert memory.weights_bytes(info, load_params(info, [])) == 986 * MiB


def test_overhead_grows_with_the_vocabulary_and_merges() -> None:
    small = memory.overhead_bytes(M46, load_params(M46, []))
    big = replace(M46, vocab_size=151_936,
                  array_lengths={"tokenizer.ggml.merges": 151_387})
    grown = memory.overhead_bytes(big, load_params(big, [])) - small
    per_token = memory.PER_VOCAB_TOKEN + 4 * memory.PER_SLOT_VOCAB_TOKEN
    assert grown == (151_936 - 564) * per_token + 151_387 * memory.PER_MERGE
    assert 8 * MiB <= small <= 16 * MiB


# -- the estimate --------------------------------------------------------------------------


def test_estimate_adds_up_and_knows_the_prompt_cache() -> None:
    p = load_params(G1, ["-c", "4096"])
    e = estimate(replace(G1, file_size=1_032_415_040), p)
    assert e.total == e.weights + e.kv_cache + e.compute + e.overhead
    assert e.kv_cache == 320 * MiB
    assert e.prompt_cache == 8192 * MiB and e.worst_case == e.total + 8192 * MiB
    assert estimate(G1, load_params(G1, ["-c", "4096", "-cram", "0"])).prompt_cache == 0
    unlimited = estimate(G1, load_params(G1, ["-c", "4096", "-cram", "-1"]))
    assert unlimited.prompt_cache == e.kv_cache  # then llama-server keeps n_ctx tokens
    # measured for this case: 1365.8 MiB (docs/memory.md)
    assert within(e.total, int(1365.8 * MiB))


def test_within() -> None:
    assert within(110 * MiB, 100 * MiB, floor=0)
    assert not within(112 * MiB, 100 * MiB, floor=0)
    assert within(1 * MiB, 60 * MiB)          # small models: the absolute floor
    assert not within(2000 * MiB, 1700 * MiB)
    assert Estimate(1, 2, 3, 4).total == 10
