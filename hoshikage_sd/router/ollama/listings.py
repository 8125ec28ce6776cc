"""Ollama's listings (`/api/tags`, `/api/ps`, `/api/show`, `/api/version`) from `ModelFacts`,
and its answer to the model-management routes hoshikage leaves to the operator."""

from __future__ import annotations

import functools
import hashlib
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from hoshikage_sd import gguf
from hoshikage_sd.errors import HoshikageError
from hoshikage_sd.router.ollama.base import (
    FOREVER_NS,
    OLLAMA_VERSION,
    UNMANAGED,
    OllamaError,
    logger,
    rfc3339,
)

#: architectures that only embed (llama-server serves them for /v1/embeddings)
_EMBEDDING_ARCHS: Final = frozenset({"bert", "nomic-bert", "nomic-bert-moe", "jina-bert-v2",
                                     "jina-bert-v3", "t5encoder", "modern-bert", "neo-bert",
                                     "eurobert"})


@dataclass(frozen=True)
class ModelFacts:
    """What Ollama's listings say about one model, from cheap sources: the manifest, the
    source file's stat, its GGUF header (None if unreadable)."""

    name: str
    path: str
    size: int
    modified_ns: int
    info: gguf.GGUFInfo | None = None
    context_length: int | None = None        # per request as served, else the GGUF's
    accepts_images: bool = False             # served with a projector (--mmproj)
    aliases: tuple[str, ...] = ()
    parameters: Mapping[str, Any] = field(default_factory=dict)  # shown by /api/show

    @property
    def digest(self) -> str:
        return identity_digest(self.path, self.size, self.modified_ns)

    @property
    def embedding_only(self) -> bool:
        info = self.info
        return info is not None and info.architecture in _EMBEDDING_ARCHS


def identity_digest(path: str, size: int, mtime_ns: int) -> str:
    """A stable stand-in for Ollama's digest: sha256 over the file's path, size and mtime.
    It changes when the file does; it is NOT the sha256 of the file's bytes."""
    return hashlib.sha256(f"{path}\0{size}\0{mtime_ns}".encode()).hexdigest()


@functools.lru_cache(maxsize=256)
def _header(files: tuple[tuple[str, int, int], ...]) -> gguf.GGUFInfo | None:
    # keyed by the files' identities: a replaced file is read again, an unchanged one never
    try:
        return gguf.read_model_info([path for path, _, _ in files])
    except HoshikageError as err:  # not a GGUF, or an encrypted one this router cannot open
        logger.warning("listing %s without details: %s", files[0][0], err.message)
        return None


def model_facts(name: str, path: str | os.PathLike[str], *,
                shards: Sequence[str | os.PathLike[str]] = (), projector: bool = False,
                args: Sequence[str] = (), aliases: Sequence[str] = ()) -> ModelFacts:
    """Facts about a manifest model from its source files (stat + cached header read): a
    split model's over all its shards. `projector`: the manifest gives it one (mmproj:);
    `args`: its llama-server arguments, for the served context and a projector named there.
    A missing file gives size 0 and no details rather than an error: a listing names every
    model."""
    spath = os.fspath(path)
    try:
        files = tuple((p, st.st_size, st.st_mtime_ns)
                      for p in (spath, *(str(s) for s in shards)) for st in (os.stat(p),))
    except OSError:
        return ModelFacts(name, spath, 0, 0, aliases=tuple(aliases))
    info = _header(files)
    ctx = (served_context(info, args) if info is not None else None)
    if ctx is None and info is not None:
        ctx = info.context_length
    projector = projector or any(a.split("=")[0] in ("-mm", "--mmproj", "-mmu", "--mmproj-url")
                                 for a in args)
    params: dict[str, Any] = {"num_ctx": ctx} if ctx else {}
    return ModelFacts(name, spath, sum(f[1] for f in files), max(f[2] for f in files), info,
                      ctx, projector, tuple(aliases), params)


def served_context(info: gguf.GGUFInfo, args: Sequence[str]) -> int | None:
    """The context one request gets from llama-server with these args: -c split over -np
    slots, or all of it with a unified KV cache (what -np auto means), and never more than
    the model was trained for (measured with b10068: "n_ctx_slot" in its log and /props).
    None if unknown."""
    from hoshikage_sd import memory  # the memory estimate's parser of the same args

    try:
        params = memory.load_params(info, args)
    except HoshikageError:
        return None
    per_slot = params.n_ctx if params.kv_unified else params.n_ctx // max(1, params.n_parallel)
    return min(per_slot, info.context_length) if info.context_length else per_slot


def human_number(n: int) -> str:
    """Ollama's format.HumanNumber: 7615616512 -> "7.6B", 494032768 -> "494.03M"."""
    for unit, scale, decimals in (("B", 10**9, 1), ("M", 10**6, 2)):
        if n >= scale:
            value = n / scale
            return f"{value:.0f}{unit}" if value == int(value) else f"{value:.{decimals}f}{unit}"
    if n >= 1000:
        return f"{n / 1000:.0f}K"
    return str(n)


def details(facts: ModelFacts) -> dict[str, Any]:
    info = facts.info
    if info is None:
        return {"parent_model": "", "format": "gguf", "family": "", "families": None,
                "parameter_size": "", "quantization_level": ""}
    count = info.metadata.get("general.parameter_count")
    n_params = count if isinstance(count, int) and not isinstance(count, bool) \
        else info.n_params
    quant = (info.file_type or info.quantisation).removesuffix(" (guessed)")
    return {"parent_model": "", "format": "gguf", "family": info.architecture,
            "families": [info.architecture], "parameter_size": human_number(n_params),
            "quantization_level": quant}


def tags_body(models: Iterable[ModelFacts]) -> dict[str, Any]:
    """/api/tags: every model of the manifest, loaded or not. Names are the manifest's, as
    they are (no ":latest" added); `resolve_name()` strips a ":latest" a client adds."""
    return {"models": [
        {"name": m.name, "model": m.name, "modified_at": rfc3339(m.modified_ns),
         "size": m.size, "digest": m.digest, "details": details(m)} for m in models]}


@dataclass(frozen=True)
class Loaded:
    """A loaded model, for /api/ps: its memory (the admission estimate, or what it uses) and
    when it will be stopped if nobody uses it (wall-clock ns; None: kept until stopped)."""

    facts: ModelFacts
    size: int
    expires_ns: int | None
    size_vram: int = 0


def ps_body(loaded: Iterable[Loaded], *, now_ns: int | None = None) -> dict[str, Any]:
    """/api/ps, longest-lived first as Ollama sorts it."""
    now = time.time_ns() if now_ns is None else now_ns
    rows = []
    for m in loaded:
        expires = min(now + FOREVER_NS, 253402300799 * 10**9) if m.expires_ns is None \
            else m.expires_ns
        rows.append((expires, {
            "name": m.facts.name, "model": m.facts.name, "size": m.size,
            "digest": m.facts.digest, "details": details(m.facts),
            "expires_at": rfc3339(expires), "size_vram": m.size_vram,
            "context_length": m.facts.context_length or 0}))
    rows.sort(key=lambda r: -r[0])
    return {"models": [row for _, row in rows]}


def _info_value(value: object) -> object:
    return list(value) if isinstance(value, tuple) else value


def show_body(facts: ModelFacts) -> dict[str, Any]:
    """/api/show. `model_info` is the GGUF header's metadata (long arrays such as the
    vocabulary as [] like Ollama's non-verbose answer); `capabilities` from what llama-server
    can do with it."""
    info = facts.info
    model_info: dict[str, Any] = {}
    if info is not None:
        model_info = {k: _info_value(v) for k, v in info.metadata.items()}
        for key in info.array_lengths:
            model_info.setdefault(key, [])
        model_info.setdefault("general.parameter_count", info.n_params)
        model_info = dict(sorted(model_info.items()))
    if facts.embedding_only:
        capabilities = ["embedding"]
    else:
        capabilities = ["completion", "tools"] + (["vision"] if facts.accepts_images else [])
    params = "\n".join(f"{k:<30} {v}" for k, v in facts.parameters.items())
    out: dict[str, Any] = {
        "license": str(info.metadata.get("general.license", "")) if info else "",
        "modelfile": f"# served by hoshikage (llama-server) from {facts.path}\n"
                     f"FROM {facts.path}\n",
        "parameters": params,
        "template": "",
        "details": details(facts),
        "model_info": model_info,
        "capabilities": capabilities,
        "modified_at": rfc3339(facts.modified_ns),
    }
    return out


def version_body() -> dict[str, Any]:
    return {"version": OLLAMA_VERSION}


def unmanaged(path: str) -> OllamaError | None:
    """501 for Ollama's model-management routes; None for any other path."""
    base = "/api/blobs" if path.startswith("/api/blobs/") else path
    if base not in UNMANAGED:
        return None
    what = base.removeprefix("/api/")
    return OllamaError(501, f"hoshikage does not manage model files ({what} is not "
                            "available): put GGUF files in a sources: directory or name them "
                            "in /etc/hoshikage/models.yaml")


def resolve_name(name: str, known: Callable[[str], bool]) -> str:
    """The manifest name for an Ollama model name: as given if known, else without the
    ":latest" tag Ollama clients add to untagged names."""
    if known(name) or not name.endswith(":latest"):
        return name
    return name.removesuffix(":latest")
