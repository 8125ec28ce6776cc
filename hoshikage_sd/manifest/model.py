"""What the manifest says, as frozen dataclasses: the models, their names, the policy knobs.

manifest/parse.py builds these from /etc/hoshikage/models.yaml; names.py lays the CLI's
aliases and tags over them; resolve.py turns a request's model name into one of them.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from hoshikage_sd import naming
from hoshikage_sd.errors import HoshikageError
from hoshikage_sd.manifest.llamaargs import env_args
from hoshikage_sd.protocol import DEFAULT_MANIFEST, DEFAULT_RUNTIME, NAME_PATTERN

NAME_RE = re.compile(NAME_PATTERN)
#: sockaddr_un's sun_path, its terminating NUL included
SUN_PATH_MAX = 108
DEFAULT_PATH = Path(DEFAULT_MANIFEST)


BACKENDS = ("llama-server", "command")
#: `stage:` — when a model gets a copy on the RAM disk (README "GPUs"): always; never (it
#: serves from its source, or the SSD cache's copy); auto: unless all its layers are on
#: GPU devices (llama-server then reads the file once, into the devices)
STAGE_MODES = ("auto", "always", "never")
# Placeholders a `command:` backend's argv may use.
COMMAND_FIELDS = ("name", "path", "socket")
#: llama-server's HTTP threads (--threads-http), passed explicitly. cpp-httplib gives each
#: connection one thread until it closes or idles 5 s, and parks the rest in its accept
#: queue: the router's upstream pool must stay below this (HTTP_THREADS - 1 connections,
#: one thread left for health probes, /slots, /metrics). 8 keeps the 4 slots of -np auto
#: busy with 3 more requests queued inside llama-server (a freed slot is refilled without a
#: round trip through the router); an idle thread costs only its stack. Left to itself
#: llama-server takes max(slots + 2, cores - 1), which changes with the machine.
HTTP_THREADS = 8
#: upstream connections to a `command` backend (its concurrency is unknown)
COMMAND_POOL = 4


def _int_flag(args: tuple[str, ...], flags: tuple[str, ...]) -> int | None:
    """The last integer value given to one of `flags` ("--flag N" or "--flag=N")."""
    found = None
    for i, arg in enumerate(args):
        flag, eq, inline = arg.partition("=")
        if flag in flags:
            value = inline if eq else (args[i + 1] if i + 1 < len(args) else "")
            try:
                found = int(value)
            except ValueError:
                continue
    return found


def environment(entries: tuple[str, ...]) -> dict[str, str]:
    """An `env:` as the manifest keeps it ("KEY=VALUE" entries) as a mapping."""
    return dict(entry.split("=", 1) for entry in entries)


@dataclass(frozen=True)
class Source:
    """A `sources:` entry: a directory scanned for models (its subdirectories too when
    recursive, and Hugging Face's cache layout always), and what the models found get."""

    dir: Path
    recursive: bool = False
    args: tuple[str, ...] = ()
    env: tuple[str, ...] = ()
    stage: str | None = None


@dataclass(frozen=True)
class Model:
    name: str
    path: Path  # the GGUF, or the first shard of a split one
    aliases: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    ttl: float = 3600.0
    args: tuple[str, ...] = ()
    pinned: bool = False
    #: started when the router first runs after a boot (router/preload.py)
    preload: bool = False
    backend: str = "llama-server"
    command: tuple[str, ...] = ()  # argv template of the `command` backend
    health: str = "/health"
    #: llama-server's environment from the manifest ("KEY=VALUE"; the top level's `env:`,
    #: the source's, the model's, later ones winning), over the unit's (protocol.passed_env)
    env: tuple[str, ...] = ()
    #: a split GGUF's shards after the first (`path`), in order
    shards: tuple[Path, ...] = ()
    #: a multimodal model's projector (llama-server's --mmproj)
    mmproj: Path | None = None
    stage: str = "auto"  # STAGE_MODES
    #: the `workers:` this model is split over (llama-server's --rpc), in order
    rpc: tuple[str, ...] = ()

    @property
    def environment(self) -> dict[str, str]:
        return environment(self.env)

    @property
    def settings(self) -> str:
        """A digest of what its llama-server is started with (files, arguments, environment,
        backend, stage, workers): a running model whose digest differs from its manifest's
        runs older settings (status says so)."""
        import hashlib

        env = (f"{k}={v}" for k, v in sorted(self.environment.items()))  # as it takes effect
        key = (str(self.path), *map(str, self.shards), str(self.mmproj), self.backend,
               *self.command, self.health, *env, *self.args, self.stage, *self.rpc)
        return hashlib.sha256("\0".join(key).encode(errors="surrogateescape")).hexdigest()[:16]

    def staged(self, fully_offloaded: bool) -> bool:
        """Does the model get a RAM-disk copy (`stage:`)? auto: unless all its layers are on
        GPU devices (`fully_offloaded`: its unit's last judgement)."""
        return self.stage == "always" or (self.stage == "auto" and not fully_offloaded)

    @property
    def server_args(self) -> tuple[str, ...]:
        """The extra arguments llama-server really gets. Its prompt cache (--cache-ram,
        8 GiB by default) grows per request outside any estimate, so it is off unless the
        manifest asks for it; admission then counts what was asked. Its HTTP threads are
        given (http_threads) so that the router's pool fits them."""
        if self.backend != "llama-server":
            return self.args
        args, given = self.args, (*env_args(self.environment), *self.args)
        if not any(a.split("=")[0] in ("-cram", "--cache-ram") for a in given):
            args = (*args, "--cache-ram", "0")
        if (_int_flag(given, ("--threads-http",)) or 0) <= 0:
            args = (*args, "--threads-http", str(self.http_threads))
        return args

    @property
    def effective_args(self) -> tuple[str, ...]:
        """The options llama-server acts on, as every estimate reads them: those the
        manifest env's LLAMA_ARG_* variables stand for, then its args (an argument wins
        over its variable, and the last value of an option counts)."""
        if self.backend != "llama-server":
            return self.args
        return (*env_args(self.environment), *self.server_args)

    @property
    def own_key(self) -> bool:
        """Does llama-server ask this model's clients for a key of its own (`--api-key`,
        `--api-key-file`, `LLAMA_API_KEY` in env:)? The router checks it before a start
        (router/model_keys.py), so the head start never starts such a model."""
        return self.backend == "llama-server" and (
            any(a.split("=")[0] in ("--api-key", "--api-key-file") for a in self.args)
            or any(e.startswith("LLAMA_API_KEY=") for e in self.env))

    @property
    def http_threads(self) -> int | None:
        """llama-server's HTTP threads: the args' --threads-http, else HTTP_THREADS, or
        slots + 2 where -np asks for more slots than that serves. None: not llama-server."""
        if self.backend != "llama-server":
            return None
        given = _int_flag(self.args, ("--threads-http",)) or 0
        if given > 0:
            return given
        slots = _int_flag(self.args, ("-np", "--parallel")) or 0
        return max(HTTP_THREADS, slots + 2)

    @property
    def upstream_pool(self) -> int:
        """Connections the router keeps to the model at most: one HTTP thread less than
        llama-server has (HTTP_THREADS), COMMAND_POOL for a command backend."""
        threads = self.http_threads
        return COMMAND_POOL if threads is None else max(1, threads - 1)


@dataclass(frozen=True)
class Files:
    """A model's files: its GGUF (or every shard, in order) and its projector."""

    shards: tuple[Path, ...]
    mmproj: Path | None = None

    @classmethod
    def of(cls, model: Model) -> Files:
        return cls((model.path, *model.shards), model.mmproj)

    @classmethod
    def one(cls, source: Files | Path) -> Files:
        """`source` as Files: a Path is a model of one file."""
        return source if isinstance(source, Files) else cls((source,))

    @property
    def main(self) -> Path:
        """What llama-server's -m names: the GGUF or the first shard."""
        return self.shards[0]

    @property
    def paths(self) -> tuple[Path, ...]:
        return (*self.shards, *((self.mmproj,) if self.mmproj else ()))

    def size(self) -> int:
        """Bytes of all the files (0 for one that cannot be looked at)."""
        total = 0
        for path in self.paths:
            with contextlib.suppress(OSError):
                total += path.stat().st_size
        return total


def model_files(model: Model) -> tuple[Path, ...]:
    """Every file a model is made of: its GGUF (or first shard), other shards, projector."""
    return Files.of(model).paths


DAY = 86400.0


@dataclass(frozen=True)
class Weights:
    """rank = week × uses in 7 days + month × uses in 30 days + total × all uses
    + recent bonus if used within 7 days − age × days since last use
    + runtime × hours in use in the last 30 days (load to last request, not the idle tail
    before the idle stop, so a long TTL earns nothing)."""

    week: float = 10.0
    month: float = 3.0
    total: float = 0.5
    recent_bonus: float = 20.0
    age: float = 2.0
    runtime: float = 15.0


DEFAULT_WEIGHTS = Weights()


@dataclass(frozen=True)
class CachePolicy:
    """The SSD cache's limits, as the policy (policy/cacheplan.py) and the simulator see them."""

    max_size: int | None = None  # bytes the cache may hold
    min_free: int = 0            # bytes to leave free on the cache's disk
    expire_after: float = 7 * DAY
    min_rank: float = 1.0        # rank a model needs to earn a place


@dataclass(frozen=True, kw_only=True)
class Cache(CachePolicy):
    """The SSD cache tier of a manifest: its policy and where its copies go."""

    dir: Path


#: ggml-rpc-server's default port (its -p), the worker socket's (units/hoshikage-rpc.socket)
RPC_PORT = 50052


@dataclass(frozen=True)
class Worker:
    """A `workers:` entry: a machine whose hoshikage-rpc.socket starts llama.cpp's
    ggml-rpc-server on demand (README "Several machines")."""

    name: str
    host: str  # a name or an IPv4 address: llama.cpp's --rpc parses HOST:PORT at the first ':'
    port: int = RPC_PORT
    #: the most of the worker's memory a model may count on (None: what the worker says
    #: is free), for a worker that does other work too
    memory: int | None = None
    #: which of the worker's devices the head's llama-server uses, by their index in the
    #: worker's own list (its ggml-rpc-server's `Devices:`, 0 first); None: every one
    devices: tuple[int, ...] | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


class AmbiguousModel(HoshikageError):
    def __init__(self, name: str, candidates: list[str]) -> None:
        super().__init__(f"model '{name}' is ambiguous: it matches {', '.join(candidates)}",
                         hint="name one of them exactly", code=2)
        self.candidates = candidates


@dataclass(frozen=True)
class Config:
    source: Path
    ramdisk: Path = Path("/mnt/hoshikage")
    runtime_dir: Path = Path(DEFAULT_RUNTIME)
    llama_server: Path = Path("/usr/bin/llama-server")
    idle_ttl: float = 3600.0
    router_idle_exit: float = 300.0
    start_timeout: float = 600.0
    default_model: str | None = None
    sources: tuple[Source, ...] = ()
    #: every directory the scan of `sources:` looked into (kept.inputs: the kept manifest's)
    scanned: tuple[Path, ...] = ()
    state_dir: Path = Path("/var/lib/hoshikage")
    strict_names: bool = False
    memory_budget: int | None = None
    safety_margin: float = 1.2
    max_loaded_models: int | None = None
    evict_floor: int = 0
    admission_wait: float = 60.0
    pressure_warn: float = 0.7
    pressure_critical: float = 0.9
    min_reload_seconds: float = 30.0
    cache: Cache | None = None
    #: origins a browser may call the API from (CORS; "*": any); none by default
    cors_origins: tuple[str, ...] = ()
    #: names besides localhost and this machine's a loopback request may give (router/hosts)
    allowed_hosts: tuple[str, ...] = ()
    #: what clients may hold of the router (router/proxy.py Limits; README "Operating")
    max_connections: int = 1000
    client_header_timeout: float = 30.0
    client_idle_timeout: float = 75.0
    max_body: int = 256 << 20
    large_body: int = 1 << 20
    body_memory: int = 256 << 20
    #: how long a stopping router lets requests in flight finish
    stop_grace: float = 10.0
    #: where the API keys are (router/auth.py): an absolute path, or "credential:NAME"
    api_keys: str | None = None
    #: stage encrypted models although swap that is not encrypted could take their
    #: plaintext from the RAM disk to a disk (encryption.swap_risk; README "Encrypted models")
    allow_plaintext_swap: bool = False
    #: what every model gets before its source's and its own (`args:`, `env:` at the top)
    args: tuple[str, ...] = ()
    env: tuple[str, ...] = ()
    stage: str = "auto"
    weights: Weights = field(default_factory=Weights)
    models: Mapping[str, Model] = field(default_factory=dict)
    #: llama.cpp RPC workers by name (`workers:`), which models name in `rpc:`
    workers: Mapping[str, Worker] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()

    def default(self) -> Model | None:
        """The model for a request that names none: default_model, or the only model."""
        if self.default_model:
            return self.models[self.default_model]
        return next(iter(self.models.values())) if len(self.models) == 1 else None

    def name_table(self) -> list[tuple[str, tuple[str, ...], tuple[str, ...]]]:
        """Each model's (name, aliases, tags): the table naming.matches reads, which the
        head start's name index keeps as it is."""
        return [(m.name, m.aliases, m.tags) for m in self.models.values()]

    def matches(self, name: str) -> list[Model]:
        """The models `name` can mean (naming.matches: exact name, alias, tag, then partial
        matches, several only in that last case). resolve.py decides between several."""
        models = list(self.models.values())
        return [models[i] for i in naming.matches(name, self.name_table())]

    def socket_path(self, name: str) -> Path:
        """NAME.sock in the runtime directory; where that would not fit a unix socket's
        address (108 bytes), a hash of the name ('_' first: no name begins so)."""
        path = self.runtime_dir / f"{name}.sock"
        if len(os.fsencode(path)) < SUN_PATH_MAX:
            return path
        import hashlib

        return self.runtime_dir / f"_{hashlib.sha256(name.encode()).hexdigest()[:32]}.sock"

    def server_argv(self, model: Model, files: Files,
                    devices: Sequence[str] = ()) -> list[str]:
        """The command line that serves `model` from `files` (its staged copy or its
        source) on its unix socket; with `devices`, llama-server's --device list last (it
        takes an option's last value): rpc/placement.py's, when a worker selects devices."""
        socket = str(self.socket_path(model.name))
        if model.backend == "command":
            fields = {"name": model.name, "path": str(files.main), "socket": socket}
            return [arg.format_map(fields) for arg in model.command] + list(model.args)
        mmproj = ["--mmproj", str(files.mmproj)] if files.mmproj else []
        return [str(self.llama_server), "-m", str(files.main), "--host", socket,
                "--alias", model.name, *mmproj, *self.rpc_args(model), *model.server_args,
                *(["--device", ",".join(devices)] if devices else [])]

    def rpc_args(self, model: Model) -> list[str]:
        """llama-server's --rpc for the workers `model` is split over (none: [])."""
        if not model.rpc:
            return []
        return ["--rpc", ",".join(self.workers[w].address for w in model.rpc)]


def config_path() -> Path:
    """The manifest: $HOSHIKAGE_CONFIG, else DEFAULT_PATH."""
    return Path(os.environ.get("HOSHIKAGE_CONFIG") or DEFAULT_PATH)
