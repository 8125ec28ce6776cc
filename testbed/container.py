"""Boot a real systemd as PID 1 of a systemd-nspawn container, for the system test tier.

Works on a host where systemd is installed but is not PID 1 (a CI VM, a container with
CAP_SYS_ADMIN), with a cgroup-v1 hybrid or a unified layout:

* the root is a tmpfs with the host's /usr bind-mounted read-only (``--volatile=yes``), so
  nothing is downloaded and a boot takes a few seconds;
* the host network is shared, so a ``.socket`` listening on 127.0.0.1:PORT inside is reachable
  from the test process directly;
* systemd-nspawn runs in a private mount namespace (its scratch files under /run/systemd go
  to a private tmpfs) and in a private child cgroup of ours in every hierarchy the container
  writes to; the cgroups are removed on stop, so parallel containers do not collide;
* PID 1 starts as a tiny shell that remounts the cgroup-v1 controllers memory, pids, cpu and
  cpuacct read-write (nspawn mounts them read-only in hybrid mode) and then execs systemd, so
  MemoryCurrent, TasksCurrent and CPU accounting work inside.

Code under test must be bind-mounted in (``binds``); bind the repository at its own path so
a virtual environment in it (whose scripts name absolute paths) works unchanged.

A container given a ``root_dir`` (a host directory, the host's /usr bound read-only into it)
keeps its root across ``reboot()``: a real ``systemctl reboot`` inside, then the same root
and binds booted again, with /run and /tmp fresh as on a machine.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

#: cgroup-v1 controllers made writable inside, and whose hierarchies get a private cgroup
RW_CONTROLLERS = ("memory", "pids", "cpu", "cpuacct")
#: read-only binds every container gets: with an empty /etc, Debian needs its alternatives
#: (awk, ...) and the CA certificates
DEFAULT_RO_BINDS = ("/etc/alternatives", "/etc/ssl", "/etc/ca-certificates")
#: host tools the harness runs
REQUIRED_TOOLS = ("systemd-nspawn", "nsenter", "unshare")
SYSTEMD = "/usr/lib/systemd/systemd"
#: systemd-nspawn's exit status when the container rebooted (no --restart policy)
REBOOTED = 133
#: .pth files of the build machine that a user's machine does not have, hidden (an empty file
#: bound over each) in containers on the host's /usr: this sandbox's CA injector imports
#: certifi in every Python start, ~35 ms of each router, activator and release start here
#: (`python3 -X importtime -c pass`: site 40 ms with it, 5 ms without)
HIDDEN_HOST_PTH = ("/usr/lib/python3/dist-packages/_sandboxing_egress_ca.pth",
                   "/usr/local/lib/python3.11/dist-packages/_sandboxing_egress_ca.pth")
#: environment of commands run inside (plus exec(env=...))
CONTAINER_ENV: Mapping[str, str] = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "HOME": "/root",
    "TERM": "dumb",
    "SYSTEMD_PAGER": "",
    "SYSTEMD_COLORS": "0",
}
HOST_ENV: Mapping[str, str] = {"PATH": CONTAINER_ENV["PATH"], "LANG": "C.UTF-8"}

_live: weakref.WeakSet[Container] = weakref.WeakSet()


class ContainerError(RuntimeError):
    """The container did not boot, or is not running."""


class ExecError(subprocess.CalledProcessError):
    """A command inside the container failed; the message carries its output."""

    def __str__(self) -> str:
        text = super().__str__()
        for label, data in (("stdout", self.stdout), ("stderr", self.stderr)):
            if data:
                text += f"\n--- {label} ---\n{str(data)[-4000:].rstrip()}"
        return text


def unavailable_reason() -> str | None:
    """Why containers cannot run on this host, or None when they can."""
    if os.geteuid() != 0:
        return "system tests need root (systemd-nspawn, nsenter, cgroups)"
    missing = [t for t in REQUIRED_TOOLS if shutil.which(t, path=HOST_ENV["PATH"]) is None]
    if missing:
        return (
            f"missing {', '.join(missing)} (apt-get install --no-install-recommends "
            "systemd-container; or run tools/bootstrap.sh)"
        )
    if not os.access(SYSTEMD, os.X_OK):
        return f"{SYSTEMD} missing (apt-get install systemd)"
    return None


def _escape_bind(path: str) -> str:
    """Escape a path for systemd-nspawn's --bind=SRC:DST syntax."""
    return path.replace("\\", "\\\\").replace(":", "\\:")


def _cgroup_mount(controllers: str) -> Path | None:
    """The host mount point of the hierarchy named by a /proc/self/cgroup controller field."""
    if controllers == "":
        for p in (Path("/sys/fs/cgroup/unified"), Path("/sys/fs/cgroup")):
            if (p / "cgroup.controllers").exists():
                return p
        return None
    name = "systemd" if controllers == "name=systemd" else controllers
    p = Path("/sys/fs/cgroup") / name
    return p if (p / "cgroup.procs").exists() else None


def _private_cgroups(tag: str) -> list[Path]:
    """Create a child cgroup ``tag`` of ours in each hierarchy the container writes to."""
    made: list[Path] = []
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        wanted = controllers in ("", "name=systemd") or bool(
            set(controllers.split(",")) & set(RW_CONTROLLERS)
        )
        mount = _cgroup_mount(controllers) if wanted else None
        if mount is None:
            continue
        d = mount / path.lstrip("/") / tag
        try:
            d.mkdir(exist_ok=True)
        except OSError:
            continue  # e.g. not delegated to us: nspawn works without it, just less tidy
        made.append(d)
    return made


def _cgroup_pids(d: Path) -> list[int]:
    pids: list[int] = []
    for sub, _, _ in os.walk(d):
        with contextlib.suppress(OSError):
            pids += [int(x) for x in Path(sub, "cgroup.procs").read_text().split()]
    return pids


def _remove_cgroup_tree(d: Path) -> bool:
    """rmdir a cgroup and its descendants, deepest first; True when it is gone."""
    if not d.exists():
        return True
    for sub, _, _ in os.walk(d, topdown=False):
        with contextlib.suppress(OSError):
            os.rmdir(sub)
    return not d.exists()


class Container:
    """A systemd-nspawn container whose PID 1 is the host's systemd, on a tmpfs root.

    ``binds`` are ``(host_path, container_path, read_only)`` triples. ``rootfs``, instead of
    the host's /usr on an empty tmpfs root, boots a full tree (e.g. a debootstrap'ed bookworm
    with systemd) under a tmpfs overlay (``--volatile=overlay``): the tree stays pristine.
    ``root_dir``, instead of the tmpfs, is a host directory (made if missing) holding the
    root, the host's /usr bound read-only as before: what is written there (/etc, /var) is
    kept across ``reboot()`` and stays after ``stop()``, the caller's to remove.
    """

    def __init__(
        self,
        name: str,
        binds: Sequence[tuple[str, str, bool]] = (),
        *,
        rootfs: str | os.PathLike[str] | None = None,
        root_dir: str | os.PathLike[str] | None = None,
        network: str | None = None,
        ip_firewall: bool = False,
    ) -> None:
        if rootfs is not None and root_dir is not None:
            raise ValueError("rootfs or root_dir, not both")
        self.name = name
        #: a network namespace (/proc/PID/ns/net) to boot in, instead of the host's network
        #: (tests/system/netns.py makes them: several "machines" on one host)
        self.network = network
        #: systemd's IPAddressAllow=/IPAddressDeny= inside: a cgroup BPF filter, which takes
        #: the unified cgroup hierarchy (nspawn makes one for the container on a hybrid host)
        #: and the bpf() system call (nspawn's filter leaves it out)
        self.ip_firewall = ip_firewall
        self.binds = [(str(h), str(c), bool(ro)) for h, c, ro in binds]
        self.rootfs = None if rootfs is None else Path(rootfs)
        self.root_dir = None if root_dir is None else Path(root_dir)
        self.nspawn_pid: int | None = None
        self.pid1: int | None = None
        self.cgroup_dirs: list[Path] = []
        self.boot_seconds: float | None = None
        self.stop_seconds: float | None = None
        #: the last reboot(): from `systemctl reboot` to the new boot's "running"
        self.reboot_seconds: float | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._state_dir: Path | None = None
        self._console_text = ""

    def __repr__(self) -> str:
        return f"<Container {self.name} pid1={self.pid1}>"

    # ---- lifecycle -----------------------------------------------------------------------

    def start(self, timeout: float = 60) -> None:
        """Boot and wait until ``systemctl is-system-running`` says running or degraded."""
        if self._proc is not None:
            raise ContainerError(f"{self.name}: already started")
        reason = unavailable_reason()
        if reason:
            raise ContainerError(reason)
        if self.rootfs is not None and not os.access(
            self.rootfs / SYSTEMD.lstrip("/"), os.X_OK, follow_symlinks=False
        ):
            raise ContainerError(f"{self.rootfs} has no {SYSTEMD}")
        for host, cont, _ in self.binds:
            if not os.path.isabs(host) or not os.path.isabs(cont):
                raise ValueError(f"bind paths must be absolute: {host!r} -> {cont!r}")
        t0 = time.monotonic()
        self._state_dir = Path(tempfile.mkdtemp(prefix=f"hoshikage-nspawn-{self.name}-"))
        _live.add(self)
        self._boot(t0 + timeout, timeout)
        self.boot_seconds = time.monotonic() - t0

    def _boot(self, deadline: float, timeout: float) -> None:
        """Spawn nspawn in fresh private cgroups and wait for the boot (stopped if it fails)."""
        assert self._state_dir is not None
        tag = self.name if self.name.startswith("hk-") else f"hk-{self.name}"
        try:
            self.cgroup_dirs = _private_cgroups(tag)
            (self._state_dir / "cgroups").write_text(
                "".join(f"{d}\n" for d in self.cgroup_dirs))
            self._spawn()
            self.pid1 = self._wait_pid1(deadline)
            state = self._wait_running(deadline)
            if state not in ("running", "degraded"):
                raise ContainerError(
                    f"{self.name}: boot did not finish in {timeout:g}s (state={state!r})"
                )
            self._write_hosts()
        except BaseException as e:
            self.stop(timeout=10)
            if isinstance(e, ContainerError):
                raise ContainerError(f"{e}\n--- console ---\n{self.console_tail()}") from None
            raise

    def reboot(self, timeout: float = 60) -> None:
        """``systemctl reboot`` inside; once nspawn has exited for it (status 133), the same
        root and binds booted again, waited for as start() waits. Takes a ``root_dir``: a
        tmpfs root would come back empty."""
        if self.root_dir is None:
            raise ContainerError(f"{self.name}: a reboot keeps only a root_dir's root")
        self._leader()
        proc = self._proc
        assert proc is not None
        t0 = time.monotonic()
        # --no-block: systemctl returns once the job is queued, before the shutdown kills it
        self.exec("systemctl", "--no-block", "reboot")
        try:
            returncode = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.stop(timeout=10)
            raise ContainerError(f"{self.name}: still up {timeout:g}s after systemctl reboot\n"
                                 f"--- console ---\n{self.console_tail()}") from None
        if returncode != REBOOTED:  # powered off or crashed: not the reboot asked for
            self.stop(timeout=10)
            raise ContainerError(f"{self.name}: systemd-nspawn exited {returncode} on reboot, "
                                 f"not {REBOOTED}\n--- console ---\n{self.console_tail()}")
        self.pid1 = None
        self._kill_leftovers()  # the old boot's cgroups go; _boot makes them again
        self._boot(t0 + timeout, timeout)
        self.reboot_seconds = time.monotonic() - t0

    def _root_args(self) -> list[str]:
        """systemd-nspawn's arguments for the root: tmpfs, a tree under an overlay, or a
        directory kept across boots."""
        host_binds = [f"--bind-ro={_escape_bind(d)}" for d in DEFAULT_RO_BINDS if os.path.isdir(d)]
        host_binds += [f"--bind-ro=/dev/null:{_escape_bind(f)}" for f in HIDDEN_HOST_PTH
                       if os.path.isfile(f)]
        if self.rootfs is not None:
            return [f"--directory={self.rootfs}", "--volatile=overlay"]
        if self.root_dir is None:  # tmpfs root, host /usr read-only, /etc nearly empty
            return ["--directory=/", "--volatile=yes", *host_binds]
        # What --volatile=yes does, on a directory that outlives the boot: an empty /usr for
        # the host's (nspawn wants one to call the tree an OS) and the host's top-level links
        # into it (/bin, /lib, ...), which nspawn makes only where the tree has /usr already.
        (self.root_dir / "usr").mkdir(parents=True, exist_ok=True)
        for top in Path("/").iterdir():
            if top.is_symlink() and os.readlink(top).startswith("usr/"):
                link = self.root_dir / top.name
                if not link.is_symlink():
                    link.symlink_to(os.readlink(top))
        return [f"--directory={self.root_dir}", "--bind-ro=/usr", *host_binds]

    def _spawn(self) -> None:
        assert self._state_dir is not None
        remount = " ".join(
            f"[ -d /sys/fs/cgroup/{c} ] && mount -o remount,bind,rw /sys/fs/cgroup/{c};"
            for c in RW_CONTROLLERS
        )
        nspawn = [
            "systemd-nspawn", "--quiet", "--register=no", "--keep-unit",
            f"--machine={self.name}", "--console=read-only", "--kill-signal=SIGRTMIN+3",
        ]  # fmt: skip
        nspawn += self._root_args()
        # nspawn's own filter lists no Landlock call (systemd 252): hoshikage.service's
        # confinement (router/landlock.c) would be refused as on a kernel without it
        nspawn.append("--system-call-filter=landlock_create_ruleset landlock_add_rule "
                      "landlock_restrict_self")
        if self.network is not None:
            # its own network is the test's to give: systemd's PrivateNetwork= (the RPC
            # worker's units) sets up a namespace's loopback with this capability
            nspawn += [f"--network-namespace-path={self.network}", "--capability=CAP_NET_ADMIN"]
        if self.ip_firewall:
            nspawn += ["--system-call-filter=bpf", "--capability=CAP_BPF"]
        for host, cont, ro in self.binds:
            opt = "--bind-ro" if ro else "--bind"
            nspawn.append(f"{opt}={_escape_bind(host)}:{_escape_bind(cont)}")
        nspawn += ["/bin/sh", "-c", f"{remount} exec {SYSTEMD} systemd.firstboot=off"]
        # The wrapper shell moves itself into the private cgroups (not us, the test process),
        # then execs, in one process: unshare (private mount namespace) -> sh (a tmpfs for
        # nspawn's scratch dirs in /run/systemd) -> systemd-nspawn.
        wrapper = (
            'n=$1; shift; while [ "$n" -gt 0 ]; do echo $$ > "$1"; shift; n=$((n-1)); done; '
            "exec unshare --mount --propagation private -- /bin/sh -c "
            "'mkdir -p /run/systemd && mount -t tmpfs -o mode=0755 hk-run /run/systemd "
            '&& exec "$@"\' sh "$@"'
        )
        procs = [str(d / "cgroup.procs") for d in self.cgroup_dirs]
        argv = ["/bin/sh", "-c", wrapper, "sh", str(len(procs)), *procs, *nspawn]
        (self._state_dir / "argv.json").write_text(json.dumps(argv))
        # appended to: a reboot's console follows the first boot's
        with open(self._state_dir / "console.log", "ab") as log:
            self._proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**HOST_ENV, **({"SYSTEMD_NSPAWN_UNIFIED_HIERARCHY": "1"}
                                    if self.ip_firewall else {})},
                start_new_session=True,  # a ^C at the terminal is for pytest, not for nspawn
            )
        self.nspawn_pid = self._proc.pid

    def _wait_pid1(self, deadline: float) -> int:
        """The container's PID 1 (as seen by the host): nspawn's child once it is systemd."""
        assert self._proc is not None
        pid = self._proc.pid
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise ContainerError(
                    f"{self.name}: systemd-nspawn exited ({self._proc.returncode})"
                )
            with contextlib.suppress(OSError, ValueError):
                for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
                    if Path(f"/proc/{child}/comm").read_text().strip() == "systemd":
                        return int(child)
            time.sleep(0.05)
        raise ContainerError(f"{self.name}: no systemd as PID 1 in time")

    def _wait_running(self, deadline: float) -> str:
        assert self._proc is not None
        state = ""
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise ContainerError(
                    f"{self.name}: systemd-nspawn exited ({self._proc.returncode})"
                )
            with contextlib.suppress(subprocess.TimeoutExpired):
                r = self.exec("systemctl", "is-system-running", check=False, timeout=5)
                state = r.stdout.strip()
                if state in ("running", "degraded"):
                    return state
            time.sleep(0.1)
        return state

    def _write_hosts(self) -> None:
        # /etc starts empty and glibc without /etc/hosts resolves "localhost" through DNS
        hosts = self.root / "etc/hosts"
        if not hosts.exists():
            hosts.write_text(f"127.0.0.1\tlocalhost\n::1\tlocalhost\n127.0.1.1\t{self.name}\n")

    def stop(self, timeout: float = 30) -> None:
        """Power off cleanly (SIGKILL after ``timeout``), remove cgroups and state. Idempotent."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        t0 = time.monotonic()
        try:
            if proc.poll() is None:
                # nspawn turns SIGTERM into --kill-signal (SIGRTMIN+3): systemd powers off
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
                    proc.wait(10)
            self._kill_leftovers()
        finally:
            self.stop_seconds = time.monotonic() - t0
            self._console_text = self._read_console()
            if self._state_dir is not None:
                shutil.rmtree(self._state_dir, ignore_errors=True)
            self._state_dir = None
            self.pid1 = None
            _live.discard(self)

    def _kill_leftovers(self) -> None:
        """SIGKILL whatever is still in our cgroups (after a SIGKILLed nspawn), then rmdir."""
        deadline = time.monotonic() + 10
        remaining = list(self.cgroup_dirs)
        while remaining and time.monotonic() < deadline:
            for d in remaining:
                for pid in _cgroup_pids(d):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            remaining = [d for d in remaining if not _remove_cgroup_tree(d)]
            if remaining:
                time.sleep(0.1)
        if remaining:
            raise ContainerError(f"{self.name}: could not remove cgroups {remaining}")

    def __enter__(self) -> Self:
        if self._proc is None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ---- using it ------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None and self.pid1 is not None

    def _leader(self) -> int:
        if self.pid1 is None or self._proc is None:
            raise ContainerError(f"{self.name}: not running")
        return self.pid1

    @property
    def root(self) -> Path:
        """The container's / seen from the host (/proc/PID1/root): write files through it."""
        return Path(f"/proc/{self._leader()}/root")

    def exec(
        self,
        *argv: str,
        check: bool = True,
        timeout: float = 60,
        input: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside (nsenter into all namespaces of PID 1); text output captured.

        The command gets CONTAINER_ENV updated with ``env``, not the test's environment. On
        timeout the whole command (nsenter forks into the PID namespace) is killed.
        """
        __tracebackhide__ = True  # pytest: report the caller's line, not this one
        cmd = ["nsenter", "-t", str(self._leader()), "-a", "--", *argv]
        full_env = {**CONTAINER_ENV, **(env or {})}
        with subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=full_env,
            start_new_session=True,
        ) as p:
            try:
                out, err = p.communicate(input, timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.communicate()
                raise
        result = subprocess.CompletedProcess(list(argv), p.returncode, out, err)
        if check and result.returncode != 0:
            raise ExecError(result.returncode, list(argv), out, err)
        return result

    def systemctl(self, *args: str, check: bool = True, timeout: float = 60) -> str:
        """``systemctl ARGS`` inside; its stdout."""
        return self.exec("systemctl", *args, check=check, timeout=timeout).stdout

    def journal(self, *args: str, sync: bool = True) -> list[dict[str, Any]]:
        """``journalctl -o json --no-pager ARGS`` inside, one dict per entry.

        With ``sync`` (default) journald first processes everything logged so far.
        """
        if sync:
            self.exec("journalctl", "--sync", check=False, timeout=30)
        out = self.exec("journalctl", "-o", "json", "--no-pager", *args).stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def _read_console(self) -> str:
        if self._state_dir is None:
            return self._console_text
        try:
            text = (self._state_dir / "console.log").read_text(errors="replace")
            return "".join(line + "\n" for line in text.splitlines() if line.strip())
        except OSError:
            return self._console_text

    def console_log(self) -> str:
        """Everything systemd wrote to the console (also after stop)."""
        return self._read_console()

    def console_tail(self, lines: int = 80) -> str:
        return "\n".join(self.console_log().splitlines()[-lines:])


@atexit.register
def _stop_all() -> None:
    for c in list(_live):
        with contextlib.suppress(Exception):
            c.stop(timeout=10)
