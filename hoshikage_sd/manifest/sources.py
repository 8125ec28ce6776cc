"""Models found in `sources:` directories, where people keep them.

- `*.gguf` files in the directory (and its subdirectories when the entry says `recursive:`),
  and `*.gguf.age`, models encrypted at rest (encryption.py), named as their GGUF would be;
- Hugging Face's cache layout, wherever it appears (`models--ORG--NAME/snapshots/REV/...`,
  files being symlinks into `blobs/`): the revision `refs/main` names, else the newest
  snapshot; such a model is named after its file, or after the repository and the
  quantisation when the file's name does not say which repository it is;
- split GGUFs (`NAME-00001-of-00003.gguf`): one model named NAME, its first shard the path,
  the others its shards; a split model with a shard missing is a warning, not a model;
- projectors (`mmproj*.gguf`, `*mmproj*.gguf`): never models; a model gets the projector
  beside it (in an HF snapshot: anywhere in the snapshot), the closest by name when several.

Symlinked files are followed; symlinked directories are not walked (no loops). A directory
that cannot be read is a warning naming it, never silence.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from hoshikage_sd.manifest.model import NAME_RE, Source

#: a split GGUF's shard, as llama.cpp's llama_split_path writes it
SPLIT_RE = re.compile(
    r"^(?P<prefix>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})(?P<suffix>\.gguf(?:\.age)?)$")
#: what a model's file is named: a GGUF, or a GGUF encrypted with age
SUFFIXES = (".gguf", ".gguf.age")
#: the quantisation at the end of a file's stem: Q4_K_M, IQ3_XXS, Q8_0, F16, BF16, ...
QUANT_RE = re.compile(r"(?i)(?:^|[-_.])((?:I?Q\d(?:_[A-Z0-9]+)*)|BF16|F16|F32)$")
HF_REPO_PREFIX = "models--"
#: how deep a recursive entry is walked
MAX_DEPTH = 8


@dataclass(frozen=True)
class Found:
    path: Path                       # the GGUF, or a split model's first shard
    source: Source
    shards: tuple[Path, ...] = ()    # a split model's other shards, in order
    mmproj: Path | None = None


@dataclass
class Scan:
    found: dict[str, Found] = field(default_factory=dict)
    scanned: list[Path] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def model_name_for(path: Path) -> str | None:
    """The model name a file gets: its stem (a split model's: without the shard suffix),
    with characters we refuse made '-'."""
    split = SPLIT_RE.match(path.name)
    stem = split["prefix"] if split else \
        path.name.removesuffix(".gguf.age") if path.name.endswith(".gguf.age") else path.stem
    name = re.sub(r"[^A-Za-z0-9._:-]+", "-", stem).strip("-._:")[:100]
    return name if NAME_RE.match(name) else None


def is_projector(path: Path) -> bool:
    return "mmproj" in path.name.lower()


def shards_of(first: Path) -> tuple[tuple[Path, ...], str | None]:
    """A split GGUF's other shards, named after `first` (…-00001-of-0000N.gguf), and what is
    wrong when one is missing or `first` is not the first; ((), None) for a single file."""
    split = SPLIT_RE.match(first.name)
    if not split:
        return (), None
    count = int(split["count"])
    if int(split["no"]) != 1 or count < 1:
        return (), f"{first} is not the first shard of a split model (-00001-of-…)"
    others = tuple(first.with_name(f"{split['prefix']}-{no:05d}-of-{count:05d}"
                                   f"{split['suffix']}")
                   for no in range(2, count + 1))
    missing = [p.name for p in others if not _is_file(p)]
    if missing:
        return others, f"{first}: split model's shard(s) missing: {', '.join(missing)}"
    return others, None


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:
        return False


def hf_snapshot(repo: Path) -> Path | None:
    """The snapshot of a Hugging Face cache repository directory that refs/main names,
    else the newest one."""
    try:
        revision = (repo / "refs" / "main").read_text().strip()
        if revision and "/" not in revision and (repo / "snapshots" / revision).is_dir():
            return repo / "snapshots" / revision
    except OSError:
        pass
    try:
        snapshots = [p for p in (repo / "snapshots").iterdir() if p.is_dir()]
    except OSError:
        return None
    return max(snapshots, key=lambda p: p.stat().st_mtime, default=None)


def hf_model_name(repo: str, path: Path) -> str | None:
    """A model found in Hugging Face repository `repo` (its cache directory's name): its
    file's name when that says the repository, else REPO-QUANT (REPO without -GGUF)."""
    base = re.sub(r"(?i)[-_.]gguf$", "", repo.split("--")[-1])
    name = model_name_for(path)
    if name is None or base.lower() in name.lower():
        return name
    quant = QUANT_RE.search(name)
    return model_name_for(Path(f"{base}-{quant[1] if quant else name}.gguf"))


class _Scanner:
    def __init__(self) -> None:
        self.scan = Scan()

    def listing(self, directory: Path) -> list[os.DirEntry[str]] | None:
        try:
            with os.scandir(directory) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            self.scan.warnings.append(f"sources: {directory} cannot be read: "
                                      f"{exc.strerror} (its models are left out)")
            return None
        self.scan.scanned.append(directory)
        return entries

    def walk(self, source: Source, directory: Path, depth: int, repo: str | None = None,
             projectors: tuple[Path, ...] = ()) -> None:
        entries = self.listing(directory)
        if entries is None:
            return
        files = [Path(e.path) for e in entries if e.name.endswith(SUFFIXES)
                 and not e.name.startswith(".") and _is_file(Path(e.path))]
        here = tuple(p for p in files if is_projector(p)) or projectors
        for path in files:
            if not is_projector(path):
                self.add(source, path, repo, here)
        for entry in entries:
            if entry.name.startswith(".") or not entry.is_dir(follow_symlinks=False):
                continue
            if entry.name.startswith(HF_REPO_PREFIX) and repo is None:
                snapshot = hf_snapshot(Path(entry.path))
                if snapshot is not None:
                    self.scan.scanned.append(Path(entry.path))
                    self.walk(source, snapshot, MAX_DEPTH - 1, entry.name, ())
            elif (source.recursive or repo is not None) and depth < MAX_DEPTH:
                self.walk(source, Path(entry.path), depth + 1, repo,
                          here if repo is not None else ())

    def add(self, source: Source, path: Path, repo: str | None,
            projectors: tuple[Path, ...]) -> None:
        split = SPLIT_RE.match(path.name)
        if split and int(split["no"]) != 1:
            return  # the first shard stands for the model
        name = hf_model_name(repo, path) if repo else model_name_for(path)
        if not name or name in self.scan.found:
            return
        shards, problem = shards_of(path)
        if problem:
            self.scan.warnings.append(f"sources: {problem} (left out)")
            return
        self.scan.found[name] = Found(path, source, shards, closest(path, projectors))


def closest(path: Path, projectors: tuple[Path, ...]) -> Path | None:
    """The projector for the model `path`: the one whose name shares the longest start with
    the model's (f16 first among equals)."""
    def score(p: Path) -> tuple[int, bool, str]:
        stem = p.name.lower().replace("mmproj", "").strip("-_.")
        name = path.name.lower()
        common = next((i for i, (a, b) in enumerate(zip(stem, name, strict=False)) if a != b),
                      min(len(stem), len(name)))
        return (common, "f16" in p.name.lower(), p.name)

    return max(projectors, key=score, default=None)


def scan(sources: tuple[Source, ...]) -> Scan:
    """Models in the source directories, earlier entries first."""
    scanner = _Scanner()
    for source in sources:
        if source.dir.name.startswith(HF_REPO_PREFIX):  # a repository named directly
            snapshot = hf_snapshot(source.dir)
            if snapshot is not None:
                scanner.scan.scanned.append(source.dir)
                scanner.walk(source, snapshot, 0, source.dir.name)
                continue
        scanner.walk(source, source.dir, 0)
    return scanner.scan

