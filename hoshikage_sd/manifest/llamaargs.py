"""llama-server's arguments as the manifest gives them: each level's over the one before it
(layered: the top level, a source, a model), and the options its LLAMA_ARG_* variables stand
for (env_args: what every estimate, and hoshikage's own defaults, read of a model's env:)."""

from __future__ import annotations

import re
from collections.abc import Mapping

#: llama-server's options that its LLAMA_ARG_* variables stand for (`llama-server --help`:
#: "(env: ...)"), those an estimate or hoshikage's own defaults read
ENV_OPTIONS = {
    "LLAMA_ARG_CTX_SIZE": "-c", "LLAMA_ARG_N_PARALLEL": "-np", "LLAMA_ARG_BATCH": "-b",
    "LLAMA_ARG_UBATCH": "-ub", "LLAMA_ARG_FLASH_ATTN": "-fa", "LLAMA_ARG_CACHE_TYPE_K": "-ctk",
    "LLAMA_ARG_CACHE_TYPE_V": "-ctv", "LLAMA_ARG_N_GPU_LAYERS": "-ngl",
    "LLAMA_ARG_DEVICE": "-dev", "LLAMA_ARG_SPLIT_MODE": "-sm", "LLAMA_ARG_TENSOR_SPLIT": "-ts",
    "LLAMA_ARG_MAIN_GPU": "-mg", "LLAMA_ARG_FIT": "-fit", "LLAMA_ARG_FIT_TARGET": "-fitt",
    "LLAMA_ARG_FIT_CTX": "-fitc", "LLAMA_ARG_N_CPU_MOE": "-ncmoe",
    "LLAMA_ARG_OVERRIDE_TENSOR": "-ot", "LLAMA_ARG_CACHE_RAM": "-cram",
    "LLAMA_ARG_THREADS_HTTP": "--threads-http", "LLAMA_ARG_RPC": "--rpc",
}
#: ... and the flags, on and off by their variable's value (llama.cpp's is_truthy, is_falsey)
ENV_FLAGS = {
    "LLAMA_ARG_KV_OFFLOAD": ("-kvo", "-nkvo"), "LLAMA_ARG_KV_UNIFIED": ("-kvu", "-no-kvu"),
    "LLAMA_ARG_MMAP": ("--mmap", "--no-mmap"), "LLAMA_ARG_SWA_FULL": ("--swa-full", None),
    "LLAMA_ARG_CPU_MOE": ("-cmoe", None),
}
_TRUTHY, _FALSEY = ("on", "enabled", "true", "1"), ("off", "disabled", "false", "0")


def env_args(env: Mapping[str, str]) -> tuple[str, ...]:
    """The options an environment's LLAMA_ARG_* variables stand for, as arguments."""
    out: list[str] = []
    for key, value in env.items():
        if key in ENV_OPTIONS:
            out += [ENV_OPTIONS[key], value]
        elif key in ENV_FLAGS:
            on, off = ENV_FLAGS[key]
            flag = on if value in _TRUTHY else off if value in _FALSEY else None
            out += [flag] if flag else []
    return tuple(out)


#: a negative number: an option's value, not an option (-ngl -1)
_NUMBER = re.compile(r"^-\d")


def layered(layers: list[tuple[str, ...]]) -> tuple[str, ...]:
    """Each layer's arguments over those before it: an option a later layer gives takes
    the earlier layers' place (llama-server takes the last value, and warns of an option
    given twice: "DEPRECATED: argument specified multiple times"). llama-server has no
    positional arguments, so what follows an option up to the next one is its value."""
    kept: list[list[str]] = []
    for args in layers:
        groups: list[list[str]] = []
        for arg in args:
            if not groups or (arg.startswith("-") and not _NUMBER.match(arg)):
                groups.append([arg])
            else:
                groups[-1].append(arg)
        given = {g[0].split("=")[0] for g in groups}
        kept = [g for g in kept if g[0].split("=")[0] not in given] + groups
    return tuple(arg for group in kept for arg in group)
