"""`hoshikage activate NAME`: the main process of hoshikage-model@NAME.service (Type=notify).

Admit the model, stage it into the RAM disk, start llama-server on the staged file listening
on a unix socket, and report READY=1 only once /health answers 200 (llama-server answers 503
while it loads). Then supervise: forward SIGTERM, exit with llama-server's status.

The unit runs it through hoshikage-launch (launch.py): when the router has admitted the model
and checked its copy already, llama-server is running before this module is even imported,
and `--adopt PID` makes it the one to wait for.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from types import FrameType

from hoshikage_sd import cache, encryption, fmt, log, metrics, proc, protocol
from hoshikage_sd.admit import act, gather, needs
from hoshikage_sd.errors import HoshikageError, die
from hoshikage_sd.manifest import Config, Files, Model
from hoshikage_sd.model_unit import encrypted, giveway, launch, release
from hoshikage_sd.model_unit.child import Adopted, Child, Stopped, crash_hint, exit_reason
from hoshikage_sd.policy import admission
from hoshikage_sd.runtime import Running, Runtime
from hoshikage_sd.sd import daemon
from hoshikage_sd.staging import Identity, Progress, Staged, Store, log_staged
from hoshikage_sd.stats import StatsFile

EXTEND_USEC = 30_000_000  # each heartbeat buys this much start time; sent every few seconds
HEARTBEAT = 5.0
#: seconds between the journal's lines on a decryption's progress
PROGRESS_EVERY = 5.0


class Activator:
    def __init__(self, config: Config, model: Model) -> None:
        self.config = config
        self.model = model
        self.store = Store(config.ramdisk)
        self.runtime = Runtime(config.runtime_dir)
        self.socket = config.socket_path(model.name)
        self.source = cache.source_for(config, model)  # the SSD cache copy, when current
        self.child: Child | None = None
        self.stopping = False
        self._escalated = 0
        self.deadline = time.monotonic() + config.start_timeout
        self._last_beat = 0.0
        #: llama-server serves from the source; its RAM-disk copy is made once it serves
        self.copy_later = False
        self.last_staged: Staged | None = None  # this start's copy, when it made one
        #: seconds spent in admission and staging (metrics: the load's phases)
        self.phases: dict[str, float] = {}
        #: what this start counted; written once it served or failed, not on its way
        self.counts = metrics.Tally()

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        began = time.monotonic()
        try:
            yield
        finally:
            self.phases[name] = self.phases.get(name, 0.0) + time.monotonic() - began

    # -- signals --------------------------------------------------------------------------
    def on_signal(self, signum: int, _frame: FrameType | None) -> None:
        first = not self.stopping
        self.stopping = True
        if self.child and self.child.poll() is None:
            self.child.send_signal(signum)
            if first:
                signal.signal(signal.SIGALRM, self.on_stop_timeout)
                signal.alarm(protocol.STOP_GRACE)
        elif self.child is None:
            raise Stopped

    def on_stop_timeout(self, _signum: int, _frame: FrameType | None) -> None:
        """llama-server did not stop within protocol.STOP_GRACE: SIGTERM again, then SIGKILL."""
        if self.child is None or self.child.poll() is not None:
            return
        self._escalated += 1
        self.child.send_signal(signal.SIGTERM if self._escalated == 1 else signal.SIGKILL)
        logging.getLogger("hoshikage").warning(
            "llama-server (pid %d) did not stop within %d s: %s", self.child.pid,
            protocol.STOP_GRACE * self._escalated,
            "SIGTERM again" if self._escalated == 1 else "SIGKILL")
        if self._escalated == 1:
            signal.alarm(protocol.STOP_GRACE)

    @property
    def program(self) -> str:
        """What serves the model, as its exit is told: llama-server, or a command's program."""
        return "llama-server" if self.model.backend == "llama-server" else \
            f"its command ({os.path.basename(self.model.command[0])})"

    def heartbeat(self, status: str, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._last_beat >= HEARTBEAT:
            self._last_beat = now
            daemon.notify(STATUS=status, EXTEND_TIMEOUT_USEC=EXTEND_USEC)

    def full_priority(self) -> None:
        """Undo the launcher's nice (protocol.NICE): it lasts only until READY=1 and its record."""
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, 0, 0)

    # -- steps ----------------------------------------------------------------------------
    def stage(self, force: bool = False, pace: Progress | None = None) -> Staged:
        """Copy the model into the RAM disk (reusing a current copy). `pace`: a copy in the
        background's (giveway.GiveWay, which waits there), called between its chunks; it
        leaves the source's pages in the page cache (staging.copy_file)."""
        name = self.model.name
        verb = "decrypting" if self.encrypted else "staging"
        # an encrypted model's first request waits for all of it: the journal says how far
        logged = [time.monotonic()] if self.encrypted else None

        def progress(done: int, total: int) -> None:
            if pace is not None and total:
                pace(done, total)
            if total == 0:
                self.heartbeat(f"waiting for another copy of {name}")
                return
            line = f"{verb} {name}: {fmt.size(done)} of {fmt.size(total)} " \
                   f"({100 * done // total}%)"
            self.heartbeat(line)
            if logged and time.monotonic() - logged[0] >= PROGRESS_EVERY and done < total:
                logged[0] = time.monotonic()
                logging.getLogger("hoshikage").info("%s", line)

        self.heartbeat(f"{verb} {name} from {self.source.main}", force=True)
        if self.encrypted:
            logging.getLogger("hoshikage").info(
                "decrypting %s from %s into the RAM disk (%s)", name, self.source.main,
                fmt.size(self.source.size()))
        with self.phase("staging"):
            staged = self.store.stage(name, self.source, progress, force=force,
                                      drop_behind=pace is None)
        log_staged(name, staged, self.source, " (decrypted)" if self.encrypted else "")
        self.last_staged = staged
        return staged

    def serve_from(self) -> tuple[Files, bool]:
        """The file llama-server starts on, and whether its RAM-disk copy is still to make.

        A current staged copy is used as it is. Otherwise llama-server starts on the source
        (or its SSD cache copy) at once and the copy is made alongside once it serves
        (copy_alongside): the first request waits for one read of the file, not a copy and
        then a load, and the copy reads what the load left in the page cache. A model that
        is not staged (`stage:`, staged()) serves from its source, always; an encrypted one
        from its decrypted copy, always (the first request waits for the decryption)."""
        try:
            for path in self.source.paths:
                Identity.of(path)
        except OSError:
            if not self.staged():
                die(f"model '{self.model.name}': cannot read {self.source.main}",
                    hint="fix 'path:' in the manifest or mount the disk that holds it")
            return self.staged_files(self.stage()), False  # says what is wrong with the source
        current = self.store.current(self.model.name, self.source)
        if current:
            return current, False
        if self.encrypted:
            return self.staged_files(self.stage()), False
        return self.source, self.staged()

    def staged(self) -> bool:
        """Does this model get a RAM-disk copy (`stage:`)? auto: unless all its layers were
        on GPU devices when its unit last judged it (llama-server then reads the file once,
        into the devices, and a copy in RAM would only make the next load faster). An
        encrypted model always: llama-server reads its plaintext from the RAM disk only."""
        return self.encrypted or self.model.staged(self.runtime.fully_offloaded(self.model.name))

    def staged_files(self, staged: Staged) -> Files:
        return staged.files or self.store.staged_files(self.model.name, self.source)

    def copy_alongside(self) -> threading.Thread:
        """Stage the model into the RAM disk at the lowest CPU priority while it serves from
        its source: the next start of this model starts from RAM. The copy waits while
        another model loads (giveway.py), here and when it is finished at the stop."""
        def copy() -> None:
            giveway.lowest_priority()
            try:
                self.make_room(self.source.size())
                self.stage(pace=giveway.GiveWay(self.runtime, self.model.name,
                                                lambda: self.runtime.wanted(self.model.name)))
            except (OSError, HoshikageError) as exc:  # it serves either way
                logging.getLogger("hoshikage").warning(
                    "%s serves from %s; no RAM-disk copy: %s", self.model.name, self.source.main,
                    getattr(exc, "message", exc))
            finally:  # the copy's progress was the unit's status: it serves, as before
                daemon.notify(STATUS=f"serving {self.model.name} on {self.socket}")

        thread = threading.Thread(target=copy, name="stage", daemon=True)
        thread.start()
        return thread

    def make_room(self, size: int) -> None:
        release.make_room(self.config, self.runtime, self.store, self.model.name, size)

    def spawn(self, staged: Files) -> Child:
        with contextlib.suppress(FileNotFoundError):
            self.socket.unlink()  # llama-server does not remove a stale socket itself
        self.socket.parent.mkdir(parents=True, exist_ok=True)
        argv = self.config.server_argv(self.model, staged, self.rpc_devices())
        logging.getLogger("hoshikage").debug("starting %s", argv)
        try:
            self.child = Child(launch.spawn(argv, proc.server_env(self.model.environment)))
        except OSError as exc:
            die(f"cannot run {argv[0]}: {exc.strerror}",
                hint="set 'llama_server:' (or the model's 'command:') in the manifest")
        return self.child

    def rpc_devices(self) -> list[str]:
        """llama-server's --device list when a worker of the model selects devices."""
        if not self.model.rpc:
            return []
        from hoshikage_sd.rpc import placement, workers

        try:
            return workers.devices_recorded(self.config, self.model)
        except placement.UnknownDevice as err:
            die(f"cannot load '{self.model.name}': {err}")

    def wait_healthy(self, child: Child) -> bool:
        """True once /health is 200; False if llama-server exits first."""
        while True:
            if child.poll() is not None:
                return False
            if protocol.probe(str(self.socket), self.model.health, timeout=5.0) == 200:
                return True
            if time.monotonic() > self.deadline:
                child.kill()
                child.wait()
                die(f"model '{self.model.name}' did not become ready within "
                    f"{self.config.start_timeout:.0f} s",
                    hint="raise 'start_timeout:' in the manifest for very large models")
            self.heartbeat(f"loading {self.model.name}")
            time.sleep(protocol.POLL)

    @functools.cached_property
    def encrypted(self) -> bool:
        """Is a file of the model age-encrypted (or named so: *.age)?"""
        return any(encryption.named_or_encrypted(p) for p in self.source.paths)

    def check_encrypted(self) -> None:
        """Checked before admission, so that nothing is evicted for a load that would fail
        (encrypted.check)."""
        encrypted.check(self.config, self.model.name, self.source.paths)

    def verify_encrypted(self) -> None:
        """Before models are stopped for it (encrypted.verify)."""
        self.heartbeat(f"verifying {self.model.name} before stopping others for it",
                       force=True)
        encrypted.verify(self.model.name, self.source.paths)

    def admit(self) -> None:
        """Make room before staging: evict idle models, wait for busy ones, or refuse. Kept
        copies of stopped models go before any model that runs."""
        with self.phase("admission"):
            self._admit()

    def _admit(self) -> None:
        name = self.model.name
        if self.runtime.names("kept"):
            self.make_room(needs.estimate(self.model, self.runtime))
        wait_until = time.monotonic() + self.config.admission_wait
        announced, verified = False, not self.encrypted
        while True:
            with self.runtime.locked("admission"), act.asking_workers_once(self.model):
                snapshot, request = gather.inputs(self.config, self.model, self.runtime)
                decision = admission.decide(snapshot, request)
                verdict = decision.verdict
                # an encrypted model is verified before anyone is stopped for it, then
                # decided again (the machine may have changed while it read)
                unverified = bool(decision.victims) and not verified
                if (verdict is not admission.Verdict.WAIT or not announced) and not unverified:
                    act.record(name, decision, self.counts)
                if verdict is admission.Verdict.REJECT:
                    die(decision.message)
                if verdict is not admission.Verdict.WAIT and not unverified:
                    self.runtime.set_admitted(name, request.estimate)  # others count it now
                    if decision.victims:
                        self.heartbeat("stopping " + ", ".join(v.name for v in
                                       decision.victims) + " to make room", force=True)
                    # by count, the memory is free already: load while they stop
                    act.evict(name, decision, self.runtime, self.counts,
                              wait=not decision.by_count)
                    act.workers(self.config, self.model, request.estimate, decision, snapshot)
                    return
            if unverified:
                self.verify_encrypted()  # outside the lock: it reads the whole file
                verified = True
                continue
            announced = True
            if time.monotonic() > wait_until:
                self.counts.count("hoshikage_refusals_total", model=name,
                                  reason="wait_timeout")
                die(f"no room for '{name}' yet: {decision.message}",
                    hint="the busy models will go idle; try again shortly")
            self.heartbeat(f"waiting for room: {decision.message}")
            time.sleep(1.0)

    def start(self, adopted: Adopted | None = None) -> Child:
        """Serve the model; when `adopted`, the router admitted it and the launcher started
        llama-server on the staged copy already: wait for that one."""
        name = self.model.name
        if adopted is None:
            if self.encrypted:
                self.check_encrypted()
            self.admit()
            files, self.copy_later = self.serve_from()
            load_start = time.monotonic()
            child = self.spawn(files)
            healthy_at = None
        else:
            files, self.copy_later = self.serve_from()
            load_start, healthy_at = adopted.spawned, adopted.healthy
            child = self.child = Child(adopted.pid)
        staged = self.last_staged or Staged(files.main, files.size(), False, 0.0, files)
        if not self.wait_healthy(child):
            if self.stopping:
                raise Stopped
            code = child.returncode
            self.child = None
            if self.copy_later or not self.staged() or \
                    self.store.matches_source(name, self.source):
                die(f"{exit_reason(code, self.program)} while loading '{name}' "
                    f"({self.source.main})",
                    hint=crash_hint(self.config, self.model.name, code))
            log.event("restaged", name, f"staged copy of {name} does not match "
                      f"{self.source.main}; copying it again", level=logging.WARNING,
                      exit_status=code)
            if adopted is not None:  # the router's admission may have gone with the copy
                self.full_priority()
                self.admit()
            staged = self.stage(force=True)
            self.copy_later = False
            load_start, healthy_at = time.monotonic(), None
            child = self.spawn(self.staged_files(staged))
            if not self.wait_healthy(child):
                if self.stopping:
                    raise Stopped
                die(f"{exit_reason(child.returncode, self.program)} while loading '{name}' "
                    "even after a fresh copy",
                    hint=crash_hint(self.config, self.model.name, child.returncode))
        load = (healthy_at or time.monotonic()) - load_start
        how = ("copied" if staged.copied else
               "from the source, copying alongside" if self.copy_later else "reused")
        self.runtime.set_running(name, Running.now(child.pid, staged.path, self.model, healthy_at))
        # adopted: this start's bookkeeping is ours now, not its release's (LAUNCHED_DIR)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(protocol.launched_path(str(self.config.runtime_dir), name))
        if healthy_at is None:  # else the launcher has told the router already
            protocol.tell_router(str(self.config.runtime_dir), name)
        daemon.notify(READY=1, STATUS=f"serving {name} on {self.socket}")
        log.event("ready", name, f"{name} ready: llama-server pid {child.pid}, "
                  f"load {load:.2f} s, staging {staged.seconds:.2f} s ({how})",
                  pid=child.pid, load_seconds=f"{load:.3f}",
                  stage_seconds=f"{staged.seconds:.3f}", copied=int(staged.copied),
                  launched=int(adopted is not None), spawned_at=f"{load_start:.6f}",
                  served_from=files.main)
        self.runtime.clear("kept", name)  # a kept copy serves again: no longer kept
        self.after_ready(load, launched=adopted is not None)
        return child

    def after_ready(self, load_seconds: float, launched: bool = False) -> None:
        """Bookkeeping that must never fail a start: metrics, usage statistics, the SSD
        cache."""
        name = self.model.name
        self.counts.count("hoshikage_loads_total", model=name,
                          path="launcher" if launched else "activator")
        for phase, seconds in (*self.phases.items(), ("llama_server", load_seconds)):
            self.counts.observe("hoshikage_load_phase_seconds", seconds, model=name,
                                phase=phase)
        try:
            StatsFile(self.config.state_dir).record_load(self.model.name, load_seconds)
            if cache.wants_sync(self.config, self.model):
                cache.trigger()
        except (OSError, HoshikageError) as exc:
            logging.getLogger("hoshikage").warning("after %s became ready: %s",
                                                   self.model.name, exc)

    def run(self, adopted: Adopted | None = None) -> int:
        signal.signal(signal.SIGTERM, self.on_signal)
        signal.signal(signal.SIGINT, self.on_signal)
        if adopted is not None:
            self.child = Child(adopted.pid)  # a SIGTERM from here on reaches llama-server
        # the launcher blocked them for the hand-over: one that came meanwhile arrives now
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})
        self.runtime.clear("error", self.model.name)
        try:
            child = self.start(adopted)
        except Stopped:
            return 0
        except HoshikageError as err:
            self.drop_cache_copy(err)
            self.counts.count("hoshikage_load_failures_total", model=self.model.name)
            self.runtime.set_error(self.model.name, err.message)
            daemon.notify(STATUS=f"failed: {err.message}")
            log.event("start-failed", self.model.name, f"cannot start {self.model.name}: {err}",
                      level=logging.ERROR, reason=err.message)
            return err.code
        finally:  # served (READY=1 sent), failed or stopped: now the counts may cost a write
            metrics.commit(self.config.runtime_dir, self.counts)
        if adopted is not None:
            self.full_priority()
        if self.copy_later:
            # one still under way at the stop is left there: the release asks
            # hoshikage-keep@ for the copy when it is to be kept (release.py), so that the
            # stop, and a request waiting for it, never wait for a copy
            self.copy_alongside()
        code = child.wait()
        if not self.stopping:
            # it died serving (a crash, the OOM killer, an RPC worker gone): the record says
            # why, to the router for a reply it cut short (router/cut.py) and to status
            reason = f"{exit_reason(code, self.program)} while serving"
            logging.getLogger("hoshikage").error("%s: %s", self.model.name, reason)
            with contextlib.suppress(OSError):  # the unit's exit status says it too
                self.runtime.set_error(self.model.name, reason)
        if self.stopping and (code in (0, -signal.SIGTERM, -signal.SIGINT) or self._escalated):
            return 0  # a stop asked for; forced or not, nothing failed
        return 128 - code if code < 0 else code


    def drop_cache_copy(self, err: HoshikageError) -> None:
        """A start from the SSD cache's copy that failed after its admission: the copy may
        be what is bad (bit rot, failing every start): the next start reads the source."""
        if self.config.cache is None or self.source == Files.of(self.model) \
                or self.runtime.admitted(self.model.name) is None:
            return
        freed = Store(self.config.cache.dir, plaintext=False).remove(self.model.name)
        logging.getLogger("hoshikage").warning("%s: its start from the SSD cache's copy "
                                               "failed (%s): the copy is dropped (%s)",
                                               self.model.name, err.message, fmt.size(freed))


def main(config: Config, name: str, adopted: Adopted | None = None) -> int:
    model = config.models.get(name)
    if model is None:
        Runtime(config.runtime_dir).set_error(name, f"'{name}' is not in {config.source}")
        die(f"model '{name}' is not in {config.source}",
            hint="known: " + ", ".join(config.models) if config.models else None)
    os.umask(0o022)
    return Activator(config, model).run(adopted)
