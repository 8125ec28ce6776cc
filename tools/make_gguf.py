#!/usr/bin/env python3
"""Write a tiny random-weight llama GGUF that llama-server loads and answers with.

The weights are random, so replies are gibberish, but the file is a real llama-architecture
model with a SentencePiece-style ("llama") vocabulary: llama-server loads it, tokenizes,
generates and streams. Byte tokens are biased away so every reply is valid UTF-8 (random
weights would otherwise emit stray bytes and llama-server answers HTTP 500).

  python tools/make_gguf.py tiny.gguf                    # ~0.6 MB, f32
  python tools/make_gguf.py big.gguf --size-preset 1g    # ~1 GiB, f16

Needs the PyPI packages ``gguf`` and ``numpy`` (the ``test`` extra).
"""

from __future__ import annotations

import argparse
import os
import string
from collections.abc import Sequence
from typing import Literal

import gguf
import numpy as np
import numpy.typing as npt

DType = Literal["f32", "f16"]

#: name -> keyword arguments of write_model()
PRESETS: dict[str, dict[str, int | str]] = {
    "tiny": {"n_embd": 64, "n_ff": 128, "n_layer": 2, "n_head": 4, "dtype": "f32"},
    # 1,032,415,040 bytes (0.96 GiB)
    "1g": {"n_embd": 2048, "n_ff": 5632, "n_layer": 10, "n_head": 16, "dtype": "f16"},
}

#: whole words added as merged SPM pieces
WORDS_TEXT = (
    "the a and to of in is it you that he was for on are with as I his they be at one have "
    "this from or had by hot word but what some we can out other were all there when up use "
    "your how said an each she which do their time if will way about many then them write "
    "would like so these her long make thing see him two has look more day could go come did "
    "number sound no most people my over know water than call first who may down side been "
    "now find hello world model server llama test"
)

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def build_vocab() -> tuple[list[str], list[float], list[int]]:
    """Tokens, scores and token types of a small SPM vocabulary with byte fallback."""
    tokens: list[str] = []
    scores: list[float] = []
    types: list[int] = []
    seen: set[str] = set()

    def add(tok: str, score: float, ttype: gguf.TokenType) -> None:
        tokens.append(tok)
        scores.append(float(score))
        types.append(int(ttype))
        seen.add(tok)

    tt = gguf.TokenType
    add("<unk>", 0.0, tt.UNKNOWN)  # id 0
    add("<s>", 0.0, tt.CONTROL)  # id 1 (BOS)
    add("</s>", 0.0, tt.CONTROL)  # id 2 (EOS)
    for b in range(256):  # byte fallback, needed by SPM ("<0x0A>" is a newline)
        add(f"<0x{b:02X}>", 0.0, tt.BYTE)
    add("\u2581", -1.0, tt.NORMAL)  # "▁", the SentencePiece space
    for i, ch in enumerate(string.ascii_letters + string.digits + string.punctuation):
        add(ch, -2.0 - i * 0.01, tt.NORMAL)
    for i, word in enumerate(WORDS_TEXT.split()):  # a few merged pieces so SPM merges are exercised
        spaced = "\u2581" + word
        if spaced not in seen:
            add(spaced, -1.5 - 0.001 * i, tt.NORMAL)
        if word not in seen:
            add(word, -3.0 - 0.001 * i, tt.NORMAL)
    return tokens, scores, types


def write_model(
    path: str | os.PathLike[str],
    *,
    n_embd: int = 64,
    n_ff: int = 128,
    n_layer: int = 2,
    n_head: int = 4,
    n_head_kv: int | None = None,
    n_ctx: int = 2048,
    dtype: DType = "f32",
    seed: int = 0,
    name: str = "tiny-random-llama",
    chat_template: bool = True,
    split_max_tensors: int = 0,
) -> int:
    """Write a random-weight llama GGUF to ``path``; return its size in bytes (of all shards).

    With ``split_max_tensors`` it is a split GGUF as llama.cpp's gguf-split writes one:
    ``path`` must end in ``-00001-of-0000N.gguf`` for N shards of that many tensors each
    (the gguf package names the shards so; ``split_count`` gives N first).

    ``dtype`` is the type of the 2-D weights (norms stay f32). The output is deterministic
    for a given set of arguments.
    """
    if dtype not in ("f32", "f16"):
        raise ValueError(f"dtype must be 'f32' or 'f16', not {dtype!r}")
    if n_embd % n_head:
        raise ValueError(f"n_embd ({n_embd}) must be divisible by n_head ({n_head})")
    kv_heads = n_head_kv or n_head
    if n_head % kv_heads:
        raise ValueError(f"n_head ({n_head}) must be a multiple of n_head_kv ({kv_heads})")
    head_dim = n_embd // n_head
    tokens, scores, types = build_vocab()
    n_vocab = len(tokens)
    rng = np.random.default_rng(seed)
    wtype = np.float16 if dtype == "f16" else np.float32

    def mat(rows: int, cols: int) -> npt.NDArray[np.floating]:
        # numpy shape (rows, cols) is GGUF ne [cols, rows]
        m = rng.standard_normal((rows, cols), dtype=np.float32)
        m *= 0.02
        return m.astype(wtype, copy=False)

    def ones(n: int) -> npt.NDArray[np.float32]:
        return np.ones(n, dtype=np.float32)

    def zero_row0(m: npt.NDArray[np.floating]) -> npt.NDArray[np.floating]:
        m[0, :] = 0
        return m

    out_path = os.fspath(path)
    # split: the writer names the shards after the name it is given, less ".gguf"
    stem = out_path.removesuffix(".gguf").rsplit("-", 3)[0] if split_max_tensors else ""
    w = gguf.GGUFWriter(stem + ".gguf" if split_max_tensors else out_path, "llama",
                        split_max_tensors=split_max_tensors)
    w.add_name(name)
    w.add_context_length(n_ctx)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(kv_heads)
    w.add_rope_dimension_count(head_dim)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if dtype == "f16" else gguf.LlamaFileType.ALL_F32)

    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    if chat_template:
        w.add_chat_template(CHAT_TEMPLATE)

    # Random weights would sample byte tokens <0x80>..<0xFF> and emit invalid UTF-8, which
    # llama-server rejects (HTTP 500). So embedding dim 0 carries a constant that no layer
    # writes to (row 0 of attn_output and ffn_down is zero), and column 0 of output.weight
    # turns it into a large negative logit for every token that must never be generated:
    # byte tokens, <unk>, <s> and </s>. Replies therefore always run to max_tokens.
    never = (int(gguf.TokenType.BYTE), int(gguf.TokenType.UNKNOWN), int(gguf.TokenType.CONTROL))
    banned = [i for i, t in enumerate(types) if t in never]
    emb = mat(n_vocab, n_embd)
    emb[:, 0] = 1.0
    out = mat(n_vocab, n_embd)
    out[:, 0] = 0.0
    out[banned, 0] = -10.0

    w.add_tensor("token_embd.weight", emb)
    for i in range(n_layer):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", ones(n_embd))
        w.add_tensor(p + "attn_q.weight", mat(n_embd, n_embd))
        w.add_tensor(p + "attn_k.weight", mat(head_dim * kv_heads, n_embd))
        w.add_tensor(p + "attn_v.weight", mat(head_dim * kv_heads, n_embd))
        w.add_tensor(p + "attn_output.weight", zero_row0(mat(n_embd, n_embd)))
        w.add_tensor(p + "ffn_norm.weight", ones(n_embd))
        w.add_tensor(p + "ffn_gate.weight", mat(n_ff, n_embd))
        w.add_tensor(p + "ffn_up.weight", mat(n_ff, n_embd))
        w.add_tensor(p + "ffn_down.weight", zero_row0(mat(n_embd, n_ff)))
    w.add_tensor("output_norm.weight", ones(n_embd))
    w.add_tensor("output.weight", out)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    if not split_max_tensors:
        return os.path.getsize(out_path)
    shards = [f for f in os.listdir(os.path.dirname(out_path) or ".")
              if f.startswith(os.path.basename(stem) + "-") and f.endswith(".gguf")]
    return sum(os.path.getsize(os.path.join(os.path.dirname(out_path), f)) for f in shards)


def split_count(n_layer: int, split_max_tensors: int) -> int:
    """How many shards write_model makes of a model of n_layer layers."""
    tensors = 3 + 9 * n_layer
    return -(-tensors // split_max_tensors)


def write_projector(path: str | os.PathLike[str], text_embd: int = 64, seed: int = 0) -> int:
    """Write a random-weight LLaVA-style (mlp) CLIP projector that llama-server loads with
    --mmproj beside a write_model model of n_embd ``text_embd``; return its size in bytes."""
    E, FF, L, H, IMG, P = 64, 128, 2, 4, 32, 16
    rng = np.random.default_rng(seed)

    def r(*shape: int, dt: type[np.floating] = np.float32) -> npt.NDArray[np.floating]:
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(dt)

    def const(n: int, value: float) -> npt.NDArray[np.float32]:
        return np.full(n, value, dtype=np.float32)

    out_path = os.fspath(path)
    w = gguf.GGUFWriter(out_path, "clip")
    w.add_name("tiny-random-mmproj")
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_clip_projector_type("mlp")
    w.add_clip_has_vision_encoder(True)
    w.add_bool("clip.has_llava_projector", True)
    w.add_vision_image_size(IMG)
    w.add_vision_patch_size(P)
    w.add_vision_embedding_length(E)
    w.add_vision_feed_forward_length(FF)
    w.add_vision_projection_dim(text_embd)
    w.add_vision_block_count(L)
    w.add_vision_head_count(H)
    w.add_vision_attention_layernorm_eps(1e-6)
    w.add_vision_image_mean([0.5, 0.5, 0.5])
    w.add_vision_image_std([0.5, 0.5, 0.5])
    w.add_vision_use_gelu(True)
    # numpy's shape is ggml's ne reversed
    w.add_tensor("v.patch_embd.weight", r(E, 3, P, P, dt=np.float16))
    w.add_tensor("v.patch_embd.bias", const(E, 0))
    w.add_tensor("v.position_embd.weight", r((IMG // P) ** 2, E))
    w.add_tensor("v.pre_ln.weight", const(E, 1))
    w.add_tensor("v.pre_ln.bias", const(E, 0))
    for i in range(L):
        p = f"v.blk.{i}."
        for n in ("attn_q", "attn_k", "attn_v", "attn_out"):
            w.add_tensor(p + n + ".weight", r(E, E))
            w.add_tensor(p + n + ".bias", const(E, 0))
        for n in ("ln1", "ln2"):
            w.add_tensor(p + n + ".weight", const(E, 1))
            w.add_tensor(p + n + ".bias", const(E, 0))
        w.add_tensor(p + "ffn_up.weight", r(FF, E))
        w.add_tensor(p + "ffn_up.bias", const(FF, 0))
        w.add_tensor(p + "ffn_down.weight", r(E, FF))
        w.add_tensor(p + "ffn_down.bias", const(E, 0))
    w.add_tensor("mm.0.weight", r(text_embd, E))
    w.add_tensor("mm.0.bias", const(text_embd, 0))
    w.add_tensor("mm.2.weight", r(text_embd, text_embd))
    w.add_tensor("mm.2.bias", const(text_embd, 0))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return os.path.getsize(out_path)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("out", help="path of the .gguf file to write")
    ap.add_argument(
        "--size-preset",
        choices=sorted(PRESETS),
        default="tiny",
        help="base shape (tiny: ~0.6 MB f32; 1g: ~1 GiB f16); the flags below override it",
    )
    ap.add_argument("--n-embd", type=int)
    ap.add_argument("--n-ff", type=int)
    ap.add_argument("--n-layer", type=int)
    ap.add_argument("--n-head", type=int)
    ap.add_argument("--n-head-kv", type=int)
    ap.add_argument("--n-ctx", type=int, default=2048, help="llama.context_length")
    ap.add_argument("--dtype", choices=("f32", "f16"), help="type of the 2-D weights")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default="tiny-random-llama", help="general.name")
    ap.add_argument("--no-chat-template", action="store_true")
    a = ap.parse_args(argv)

    preset = PRESETS[a.size_preset]

    def pick(key: str) -> int:
        value = getattr(a, key)
        return int(preset[key] if value is None else value)

    dtype: DType = "f16" if (a.dtype or preset["dtype"]) == "f16" else "f32"
    size = write_model(
        a.out,
        n_embd=pick("n_embd"),
        n_ff=pick("n_ff"),
        n_layer=pick("n_layer"),
        n_head=pick("n_head"),
        n_head_kv=a.n_head_kv,
        n_ctx=a.n_ctx,
        dtype=dtype,
        seed=a.seed,
        name=a.name,
        chat_template=not a.no_chat_template,
    )
    print(f"wrote {a.out}: {size} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
