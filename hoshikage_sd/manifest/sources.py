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
  beside it (in an HF snapshot: anywhere in the snapshot) whose name names it, or one that
  names no model where the models beside it are of one family (projector_for);
- two files of one name: the first found is the model, the other a warning.

Symlinked files are followed; symlinked directories are not walked (no loops). A directory
or a file that cannot be read, and a link to nothing, is a warning naming it, never silence.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from hoshikage_sd.manifest.model import Source
from hoshikage_sd.protocol import NAME_MAX, valid_name

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
    name = re.sub(r"[^A-Za-z0-9._:-]+", "-", stem).strip("-._:")[:NAME_MAX]
    while name and not valid_name(name):  # too long once escaped: shorter
        name = name[:-1].rstrip("-._:")
    return name or None


def is_projector(path: Path) -> bool:
    return "mmproj" in path.name.lower()


def name_key(stem: str) -> tuple[str, ...]:
    """What a model and its projector share in their names: the words of `stem` without
    its quantisation (or a projector's precision), "mmproj" and llama.cpp's generic "model"
    (`mmproj-model-f16.gguf`)."""
    words = re.split(r"[-_. ]+", QUANT_RE.sub("", stem.lower()))
    return tuple(w for w in words if w and w not in ("mmproj", "model"))


def shared_run(a: tuple[str, ...], b: tuple[str, ...]) -> int | None:
    """How many words the shorter of two name keys has, when it is a run of the other's
    (`gemma-3-4b-it` in `google_gemma-3-4b-it`); None when neither is in the other."""
    short, long = sorted((a, b), key=len)
    if not short:
        return None
    runs = (long[i:i + len(short)] for i in range(len(long) - len(short) + 1))
    return len(short) if short in runs else None


#: a projector's precision, the first preferred among projectors of one model
PRECISIONS = ("f16", "bf16", "f32", "q8_0")


def projector_for(key: tuple[str, ...], projectors: list[Path], one_family: bool
                  ) -> Path | None:
    """The projector of the model whose name key is `key`: one whose name names the model
    (the most words in common; f16 first among equals), or, where every model beside it is
    of one family, one whose name names none (`mmproj-F16.gguf` in a repository of one
    model's quantisations). Another model's projector never: llama-server refuses to load a
    model with a projector of another width."""
    ranked = []
    for projector in projectors:
        own = name_key(projector.name.removesuffix(".gguf"))
        common = shared_run(own, key) if own else 0 if one_family else None
        if common is None:
            continue
        quant = QUANT_RE.search(projector.name.removesuffix(".gguf"))
        precision = quant[1].lower() if quant else ""
        preferred = len(PRECISIONS) - PRECISIONS.index(precision) \
            if precision in PRECISIONS else 0
        ranked.append((-common, -preferred, projector.name, projector))
    return min(ranked)[-1] if ranked else None


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


def hf_snapshot(repo: Path) -> tuple[Path | None, str | None]:
    """The snapshot of a Hugging Face cache repository directory that refs/main names, else
    the newest one; and what kept it from being read (None: nothing)."""
    try:
        revision = (repo / "refs" / "main").read_text().strip()
        if revision and "/" not in revision and (repo / "snapshots" / revision).is_dir():
            return repo / "snapshots" / revision, None
    except OSError:
        pass  # no refs/main: the newest snapshot
    try:
        snapshots = [p for p in (repo / "snapshots").iterdir() if p.is_dir()]
    except FileNotFoundError:
        return None, None  # not a repository: a directory named like one
    except OSError as exc:
        return None, (f"sources: {repo} cannot be read: {exc.strerror} (its models are "
                      "left out)")
    return max(snapshots, key=lambda p: p.stat().st_mtime, default=None), None


def hf_model_name(repo: str, path: Path, folder: str = "") -> str | None:
    """A model found in Hugging Face repository `repo` (its cache directory's name): its
    file's name when that says the repository, else REPO-QUANT (REPO without -GGUF). The
    quantisation is the file's, or its folder's (`Q4_K_M/model-00001-of-00002.gguf`)."""
    base = re.sub(r"(?i)[-_.]gguf$", "", repo.split("--")[-1])
    name = model_name_for(path)
    if name is None:
        return None
    own = QUANT_RE.search(name)
    quant = own or QUANT_RE.search(folder)
    if base.lower() in name.lower():
        return name if own or not quant else model_name_for(Path(f"{name}-{quant[1]}.gguf"))
    return model_name_for(Path(f"{base}-{quant[1] if quant else name}.gguf"))


def file_problem(path: Path) -> str | None:
    """Why a model's file found in a directory is not one (a link to nothing, a file that
    cannot be looked at), or None: a file, or not a file at all (a directory)."""
    try:
        path.stat()
    except FileNotFoundError:
        return (f"{path} is a link to nothing ({os.readlink(path)}): a download not finished, "
                "or its file removed") if path.is_symlink() else None
    except OSError as exc:
        return f"{path} cannot be read: {exc.strerror}"
    return None


@dataclass
class _Scope:
    """The models and projectors that may go together: a directory's, or a Hugging Face
    snapshot's (all its folders)."""
    models: list[tuple[str, Found]] = field(default_factory=list)
    projectors: list[Path] = field(default_factory=list)


class _Scanner:
    def __init__(self) -> None:
        self.scan = Scan()
        #: the file each found name came from (two files of one name: the first wins)
        self.taken: dict[str, Path] = {}
        self.warned: set[str] = set()

    def warn(self, message: str) -> None:
        if message not in self.warned:
            self.warned.add(message)
            self.scan.warnings.append(f"sources: {message}")

    def listing(self, directory: Path) -> list[os.DirEntry[str]] | None:
        # looked at even when it cannot be read: a chmod that opens it changes its ctime,
        # and with it the kept manifest's inputs (lastgood.py)
        self.scan.scanned.append(directory)
        try:
            with os.scandir(directory) as it:
                return sorted(it, key=lambda e: e.name)
        except OSError as exc:
            self.warn(f"{directory} cannot be read: {exc.strerror} (its models are left out)")
            return None

    def walk(self, source: Source, directory: Path, depth: int, repo: str | None = None,
             scope: _Scope | None = None, snapshot: Path | None = None) -> None:
        """`scope`: the snapshot's, when walking one (its folders share it); else each
        directory has its own."""
        entries = self.listing(directory)
        if entries is None:
            return
        own = scope if scope is not None else _Scope()
        for entry in entries:
            path = Path(entry.path)
            if not entry.name.endswith(SUFFIXES) or entry.name.startswith("."):
                continue
            if (problem := file_problem(path)) is not None:
                self.warn(f"{problem} (left out)")
            elif not _is_file(path):
                continue
            elif is_projector(path):
                own.projectors.append(path)
            else:
                folder = path.parent.name if snapshot and path.parent != snapshot else ""
                self.add(source, path, repo, own, folder)
        for entry in entries:
            if entry.name.startswith(".") or not entry.is_dir(follow_symlinks=False):
                continue
            if entry.name.startswith(HF_REPO_PREFIX) and repo is None \
                    and self.repository(source, Path(entry.path)):
                continue
            if (source.recursive or repo is not None) and depth < MAX_DEPTH:
                self.walk(source, Path(entry.path), depth + 1, repo, scope, snapshot)
        if scope is None:
            self.assign(own)

    def repository(self, source: Source, repo: Path) -> bool:
        """Walk a Hugging Face cache repository's snapshot; False when `repo` is none."""
        snapshot, problem = hf_snapshot(repo)
        if problem is not None:
            self.scan.scanned.append(repo)
            self.warn(problem)
            return True
        if snapshot is None:
            return False
        # a new revision (refs/main, snapshots/) changes what the repository gives
        self.scan.scanned += [repo, repo / "refs" / "main", repo / "snapshots"]
        scope = _Scope()
        self.walk(source, snapshot, 0, repo.name, scope, snapshot)
        self.assign(scope)
        return True

    def add(self, source: Source, path: Path, repo: str | None, scope: _Scope,
            folder: str) -> None:
        split = SPLIT_RE.match(path.name)
        if split and int(split["no"]) != 1:
            first = path.with_name(f"{split['prefix']}-00001-of-{split['count']}"
                                   f"{split['suffix']}")
            if not _is_file(first):
                self.warn(f"{path}: split model's first shard {first.name} is missing "
                          "(left out)")
            return  # the first shard stands for the model
        name = hf_model_name(repo, path, folder) if repo else model_name_for(path)
        if not name:
            return
        if name in self.taken:
            self.warn(f"{path} is named '{name}' as {self.taken[name]} is: left out (a "
                      "models: entry with its own path: gives it a name of its own)")
            return
        shards, problem = shards_of(path)
        if problem:
            self.warn(f"{problem} (left out)")
            return
        self.taken[name] = path
        scope.models.append((name, Found(path, source, shards)))

    def assign(self, scope: _Scope) -> None:
        """The scope's models found, each with its projector (projector_for)."""
        keys = {name: name_key(name) for name, _ in scope.models}
        one_family = len(set(keys.values())) == 1
        for name, found in scope.models:
            mmproj = projector_for(keys[name], scope.projectors, one_family)
            self.scan.found[name] = dataclasses.replace(found, mmproj=mmproj)


def scan(sources: tuple[Source, ...]) -> Scan:
    """Models in the source directories, earlier entries first."""
    scanner = _Scanner()
    for source in sources:
        if source.dir.name.startswith(HF_REPO_PREFIX) \
                and scanner.repository(source, source.dir):  # a repository named directly
            continue
        scanner.walk(source, source.dir, 0)
    return scanner.scan


def scan_sources(sources: tuple[Source, ...]) -> dict[str, Path]:
    """The files the `sources:` entries give, by model name (what `check` lists)."""
    return {name: found.path for name, found in scan(sources).found.items()}
