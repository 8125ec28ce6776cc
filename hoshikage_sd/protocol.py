"""The launcher protocol: what the router, the launcher and the activator agree on.

One home for each fact they share: the launch ticket's format, the health probe, the
"it serves now" datagram to the router, sd_notify's datagram, the stop escalation, the timing
constants and the model-name rule. model_unit/launch.c speaks the same protocol in C; the
contract test (tests/unit/test_launch.py) runs both forms against this module.

Built-in modules only (_socket, posix, time): the launcher imports this module on every cold
start before llama-server runs, without site-packages (`python3 -I -S`): `os`, `socket` (enum),
`re` and python-systemd's daemon (with site-packages, where it lives) would each add their
imports to that path (`python3 -I -X importtime -c 'import M'`). So the launcher speaks
sd_notify itself (notify); the activator and the router, off that path, use python-systemd.
Installed, the launcher is launch.c, which imports nothing.
"""

import _socket
import posix
import time

MAGIC = b"hoshikage-launch-1"
#: the runtime directory every unit shares (RuntimeDirectory=hoshikage, so systemd sets
#: $RUNTIME_DIRECTORY) when the environment does not name one (runtime_dir)
DEFAULT_RUNTIME = "/run/hoshikage"
#: the manifest when $HOSHIKAGE_CONFIG names none (manifest.config_path; the head start's
#: name index, which reads it before the manifest code is imported)
DEFAULT_MANIFEST = "/etc/hoshikage/models.yaml"
#: launch tickets: $RUNTIME_DIRECTORY/TICKET_DIR/NAME
TICKET_DIR = "launch"
#: the router's datagram socket in the runtime directory: a model's name sent there says
#: "it serves now", so the router need not poll /health (CPU llama-server's load wants)
ROUTER_SOCKET = "router.notify"
#: the datagram on that socket that says "read the manifest and names.json again now"
#: (`hoshikage reload`; a model's name never starts with "!")
RELOAD = b"!reload"
#: admitted records: $RUNTIME_DIRECTORY/ADMITTED_DIR/NAME.json, {"estimate": BYTES}, left with
#: the ticket by whoever admitted the model (the router, its head start, the activator):
#: the memory others count for it until its unit runs or goes (runtime.Runtime reads it)
ADMITTED_DIR = "admitted"
#: seconds a ticket stays good: one the unit did not take by then is from a start that failed
TICKET_TTL = 30.0
#: what a launcher started: $RUNTIME_DIRECTORY/LAUNCHED_DIR/NAME, "PID SPAWNED HEALTHY\n"
#: (CLOCK_MONOTONIC seconds), written once llama-server serves; the activator that adopts it
#: removes it, and a release that still finds it (a stop before the hand-over) does the
#: load's bookkeeping instead
LAUNCHED_DIR = "launched"
#: the model-name rule (manifest.NAME_RE says the same as a regular expression): a name
#: reaches paths and unit names, so nothing else gets through
NAME_MAX = 100
_NAME_FIRST = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789")
_NAME_REST = _NAME_FIRST | frozenset("._:-")
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,99}$"
#: ... and no longer, escaped, than a unit name leaves it: hoshikage-model@NAME.service in
#: systemd's 255 characters, where each '-' escapes to 4 (\x2d)
ESCAPED_NAME_MAX = 255 - len("hoshikage-model@.service")
#: the launcher's CPU priority while llama-server loads and answers first
NICE = 19
#: /health polling while llama-server loads: every ms spent here is cold-start latency
POLL = 0.005
#: seconds the launcher waits for /health itself before the activator (with its start-timeout
#: heartbeats) takes over the wait: the unit's TimeoutStartSec= must allow this much
WAIT_LIMIT = 10.0
#: llama-server counts as quiet when its threads used less than QUIET_SHARE of one CPU over
#: QUIET_WINDOW seconds; the window is longer than the router takes to forward after /health
QUIET_WINDOW = 0.05
QUIET_SHARE = 0.1
#: seconds after READY=1 that the activator waits at most for llama-server to go quiet
HANDOVER_LIMIT = 5.0
#: seconds llama-server gets to stop after SIGTERM. With a request in flight it can hang
#: there (seen: until the unit's 30 s TimeoutStopSec); a second SIGTERM makes it exit at
#: once, SIGKILL follows as long after that. Launcher and activator both do this.
STOP_GRACE = 8
#: the signals of that escalation, in order, after the first SIGTERM (signal.py would
#: import enum)
STOP_ESCALATION = (15, 9)


#: the model unit's own environment that reaches llama-server, besides PATH, LANG, LC_ALL,
#: TZ and HOME: device selection and driver settings of llama.cpp's backends (CUDA,
#: ROCm/HIP, Vulkan, SYCL/Level Zero, OpenMP, BLAS) and llama.cpp's own (GGML_*, LLAMA_*,
#: LLAMA_ARG_*), set in a drop-in or /etc/default/hoshikage. By prefix, or by whole name.
#: launch.c holds the same lists (the contract test compares them); a variable the ticket
#: (the manifest's `env:`) sets wins over the unit's.
PASSED_ENV_PREFIXES = ("AMD_", "CUDA_", "GGML_", "GPU_", "HIP_", "HSA_", "LLAMA_", "MESA_",
                       "MKL_", "NVIDIA_", "OMP_", "ONEAPI_", "OPENBLAS_", "RADV_", "ROCR_",
                       "SYCL_", "VK_", "ZES_", "ZE_")
PASSED_ENV_NAMES = ("LD_LIBRARY_PATH", "DRI_PRIME")


def passed_env(name: str) -> bool:
    """Does the model unit's variable `name` reach llama-server (PASSED_ENV_*)?"""
    return name in PASSED_ENV_NAMES or name.startswith(PASSED_ENV_PREFIXES)


def with_unit_env(env: dict[bytes, bytes], own: dict[bytes, bytes]) -> dict[bytes, bytes]:
    """`env` (a ticket's) and what of `own` (the unit's environment) passed_env lets through,
    where `env` does not set it already."""
    merged = dict(env)
    for key, value in own.items():
        if key not in merged and passed_env(key.decode("latin-1")):
            merged[key] = value
    return merged


def valid_name(name: str) -> bool:
    """NAME_PATTERN without importing re, and ESCAPED_NAME_MAX."""
    return (0 < len(name) <= NAME_MAX and name[0] in _NAME_FIRST
            and all(ch in _NAME_REST for ch in name)
            and len(name) + 3 * name.count("-") <= ESCAPED_NAME_MAX)


def runtime_dir(variable: str | None) -> str:
    """The runtime directory from $RUNTIME_DIRECTORY (`variable`, None when unset): its first
    entry, else DEFAULT_RUNTIME. The one rule (launch.c mirrors it) for the programs that run
    before a manifest is parsed (the launcher, the router's head start, the last good
    manifest's readers)."""
    return (variable or "").split(":")[0] or DEFAULT_RUNTIME


def write_file(path: str, data: bytes, mode: int | None = 0o644,
               parents: tuple[str, ...] = ()) -> None:
    """Replace the file `path` with `data`: a temporary name beside it (hidden), then a
    rename, so a reader sees the old file or the new one, never half of it; `mode` from its
    creation on (None: 0666 less the umask). `parents`: directories made first when missing
    (each on its own: the runtime directory, then its subdirectory). The one writer of such
    files: files.py's write_atomic for the rest of the code; the launcher's path (built-in
    modules only) calls it directly."""
    for directory in parents:
        try:  # noqa: SIM105 (contextlib: one more import on the launcher's path)
            posix.mkdir(directory, 0o755)
        except FileExistsError:
            pass
    slash = path.rfind("/") + 1
    temporary = f"{path[:slash]}.{path[slash:]}.tmp-{posix.getpid()}"
    fd = posix.open(temporary, posix.O_WRONLY | posix.O_CREAT | posix.O_TRUNC | posix.O_CLOEXEC
                    | posix.O_NOFOLLOW, 0o666 if mode is None else mode)
    try:
        if mode is not None:
            posix.fchmod(fd, mode)  # exactly `mode`, whatever the umask
        view = memoryview(data)
        while view:
            view = view[posix.write(fd, view):]
    except BaseException:
        posix.close(fd)
        posix.unlink(temporary)
        raise
    posix.close(fd)
    posix.rename(temporary, path)


def ticket_path(runtime_dir: str, name: str) -> str:
    return f"{runtime_dir}/{TICKET_DIR}/{name}"


def write_ticket(runtime_dir: str, name: str, socket: str, health: str,
                 env: dict[str, str], argv: list[str]) -> None:
    """Leave llama-server's command line for the unit's launcher (the router does): NUL-
    separated MAGIC, expiry (monotonic), socket, health route, KEY=VALUE environment, an
    empty field, argv. Written to a temporary name and renamed: never seen half-written."""
    fields = [MAGIC, str(time.monotonic() + TICKET_TTL).encode(), _encode(socket),
              health.encode()]
    fields += [_encode(f"{k}={v}") for k, v in env.items()]
    fields += [b"", *map(_encode, argv)]
    write_file(ticket_path(runtime_dir, name), b"\0".join(fields), 0o600,
               (runtime_dir, f"{runtime_dir}/{TICKET_DIR}"))


def admitted_path(runtime_dir: str, name: str) -> str:
    return f"{runtime_dir}/{ADMITTED_DIR}/{name}.json"


def write_admitted(runtime_dir: str, name: str, estimate: int) -> None:
    """The admitted record (see ADMITTED_DIR): others count the model's memory from now on.
    JSON as json.dumps writes it, without json's import on the head start's path."""
    write_file(admitted_path(runtime_dir, name), f'{{"estimate": {int(estimate)}}}'.encode(),
               parents=(runtime_dir, f"{runtime_dir}/{ADMITTED_DIR}"))


def launched_path(runtime_dir: str, name: str) -> str:
    return f"{runtime_dir}/{LAUNCHED_DIR}/{name}"


def write_launched(runtime_dir: str, name: str, pid: int, spawned: float,
                   healthy: float) -> None:
    """The launcher's record of llama-server serving (see LAUNCHED_DIR); never raises."""
    try:  # noqa: SIM105 (contextlib: one more import on the launcher's path)
        write_file(launched_path(runtime_dir, name), f"{pid} {spawned:.9f} {healthy:.9f}\n"
                   .encode(), parents=(runtime_dir, f"{runtime_dir}/{LAUNCHED_DIR}"))
    except OSError:
        pass  # bookkeeping only: the model serves either way


def read_launched(runtime_dir: str, name: str) -> tuple[int, float, float] | None:
    """(pid, spawned, healthy) of the launcher's record, or None."""
    try:
        with open(launched_path(runtime_dir, name), "rb") as f:
            pid, spawned, healthy = f.read().split()
        return int(pid), float(spawned), float(healthy)
    except (OSError, ValueError):
        return None


def _encode(text: str) -> bytes:
    return text.encode(errors="surrogateescape")  # os.fsencode, as paths and argv are


class Ticket:
    def __init__(self, socket: bytes, health: str, env: dict[bytes, bytes],
                 argv: list[bytes]) -> None:
        self.socket = socket
        self.health = health
        self.env = env
        self.argv = argv


def decode_ticket(data: bytes) -> Ticket:
    """The ticket in `data`; ValueError when it is not one, or stale."""
    fields = data.split(b"\0")
    if len(fields) < 5 or fields[0] != MAGIC:
        raise ValueError("not a launch ticket")
    if time.monotonic() > float(fields[1]):
        raise ValueError("stale ticket")
    end = fields.index(b"", 4)
    env = dict(f.split(b"=", 1) for f in fields[4:end])
    argv = fields[end + 1:]
    if not argv:
        raise ValueError("empty command line")
    return Ticket(fields[2], fields[3].decode(), env, argv)


def take_ticket(runtime_dir: str, name: str) -> Ticket:
    """The model's ticket, removed; ValueError when there is none to use."""
    path = ticket_path(runtime_dir, name)
    try:
        with open(path, "rb") as f:
            data = f.read()
        posix.unlink(path)
    except OSError as exc:
        raise ValueError(f"no ticket: {exc.strerror}") from None
    return decode_ticket(data)


def probe_request(route: str) -> bytes:
    return b"GET " + route.encode() + b" HTTP/1.0\r\nHost: localhost\r\n\r\n"


def status_of(head: bytes) -> int | None:
    """The status code in an HTTP response's first line, or None for anything else."""
    parts = head.split(b"\r\n", 1)[0].split()
    if len(parts) >= 2 and parts[0].startswith(b"HTTP/") and parts[1].isdigit():
        return int(parts[1])
    return None


def probe(path: str | bytes, route: str = "/health", timeout: float = 2.0) -> int | None:
    """The HTTP status of GET route on a unix socket, or None when nothing answers.

    A few lines of HTTP/1.0 on the built-in _socket: http.client (with ssl), or even
    socket.py (with enum), would cost more to import than the probe takes."""
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
    head = b""
    try:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(probe_request(route))
        while b"\r\n" not in head and len(head) < 4096:
            chunk = sock.recv(4096)
            if not chunk:
                break
            head += chunk
    except OSError:
        return None
    finally:
        sock.close()
    return status_of(head)


def router_socket(runtime_dir: str) -> str:
    return f"{runtime_dir}/{ROUTER_SOCKET}"


def tell_router(runtime_dir: str, name: str) -> bool:
    """Tell a router waiting for this model that it serves. False when none listens."""
    return send_datagram(router_socket(runtime_dir).encode(errors="surrogateescape"),
                         name.encode())


def notify(message: bytes, address: bytes) -> bool:
    """sd_notify's datagram (b"READY=1\\nSTATUS=...") to `address` ($NOTIFY_SOCKET; the
    launcher's own: python-systemd's daemon.notify costs an import it cannot afford). False
    when there is no address."""
    if not address:
        return False
    if address.startswith(b"@"):
        address = b"\0" + address[1:]
    return send_datagram(address, message)


def send_datagram(address: bytes, message: bytes) -> bool:
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_DGRAM | _socket.SOCK_CLOEXEC)
    try:
        sock.sendto(message, address)
    except OSError:
        return False
    finally:
        sock.close()
    return True
