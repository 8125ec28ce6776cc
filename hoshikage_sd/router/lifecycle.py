"""The router's models, from its side: each one's start (admitted here when it fits, else
the activator's), whether it serves, its upstream pool, its stop; and the requests in flight
to each (busy locks, activity records, the TTL a request set). router/server.py's Router
holds one Lifecycle and answers through it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shlex
import time
from collections.abc import Awaitable, Callable

from hoshikage_sd import log, metrics, proc, protocol
from hoshikage_sd.errors import HoshikageError
from hoshikage_sd.manifest import Config, Model
from hoshikage_sd.router import proxy
from hoshikage_sd.router.activity import ActivityRecords, BusyLocks
from hoshikage_sd.router.announcements import Announcements
from hoshikage_sd.router.config import refresh_index
from hoshikage_sd.router.errors import StartFailed
from hoshikage_sd.runtime import Runtime
from hoshikage_sd.sd import units

logger = logging.getLogger("hoshikage.router")

START_POLL = 0.005  # while a model starts and nobody will say when it serves: probe this often
UNIT_POLL = 0.25  # ... and how often to ask systemd whether its unit failed
PROBE_TIMEOUT = 2.0
#: seconds after start-up during which a start of the model the head start started is that
#: start (its request comes at once; one whose client went away must not block a later one)
EARLY_START_VALID = 30.0
#: seconds an unload (Ollama's keep_alive 0, /models/unload) waits for the unit to be down
UNLOAD_WAIT = 5.0
#: seconds the name index's refresh after a start waits for the model's first answers
INDEX_REFRESH_WAIT = 300.0


class Lifecycle:
    """What this router knows and does about its models' lives: which serve (`ready`), which
    start (`starting`), their pools, their requests in flight. `config`: the manifest in
    use now (a reload replaces it)."""

    def __init__(self, config: Callable[[], Config], runtime: Runtime,
                 announcements: Announcements, counts: metrics.Metrics,
                 started: str | None = None) -> None:
        self._config = config
        self.runtime = runtime
        self.announcements = announcements
        self.metrics = counts
        #: the model whose unit the head start started before this router could read requests
        self.started_early = started
        self._created = time.monotonic()
        self.pools: dict[str, proxy.Upstream] = {}
        self._pools_for = config()
        self.starting: dict[str, asyncio.Task[None]] = {}
        #: name index refreshes waiting for a started model's first answers, and the events
        #: that tell them (set when the model's last request in flight ends)
        self.refreshing: set[asyncio.Task[None]] = set()
        self.answered: dict[str, asyncio.Event] = {}
        self.ready: set[str] = set()
        self.in_flight: dict[str, int] = {}
        self.last_activity = time.monotonic()
        #: each model's busy lock while requests are in flight: the activity record is
        #: written once per request, at its end
        self.busy = BusyLocks(runtime)
        self.activity = ActivityRecords(runtime, os.getpid())
        #: each loaded model's TTL override (keep_alive), as last read or written
        self.ttl_override: dict[str, float | None] = {}

    @property
    def config(self) -> Config:
        return self._config()

    async def serving(self, model: Model) -> bool:
        """Does the model's llama-server answer its health route with 200 (not 503
        'loading')? Raw HTTP/1.0 on a fresh connection: without Announcements it is asked
        every START_POLL while the model loads."""
        path = self.config.socket_path(model.name)
        if not path.exists():
            return False
        writer = None
        try:
            async with asyncio.timeout(PROBE_TIMEOUT):
                reader, writer = await asyncio.open_unix_connection(str(path))
                writer.write(protocol.probe_request(model.health))
                return protocol.status_of(await reader.readline()) == 200
        except (OSError, TimeoutError, ValueError):
            return False
        finally:
            if writer is not None:
                writer.close()

    def prepare(self, model: Model, start: Callable[[], None]) -> list[str] | None:
        """The fast path of a cold start: when the model fits now, or once others stop for
        max_loaded_models only (their memory is not needed: they stop while it loads), admit
        it here, leave the unit's launcher a ticket (so that llama-server starts as the
        unit's first act) and `start` the unit, then stop the others. Returns the models
        stopped for it, or None (not started): anything else (memory to free, a wait) is
        the activator's to do.

        The start goes before the stops and the records: a stop queued first kept PID 1
        and polkit busy while the start waited (a swap step's request -> unit starting
        later when the stop was queued first: bench/peers.py's breakdown, docs/performance.md)."""
        from hoshikage_sd import cache, encryption
        from hoshikage_sd.admit import act, gather, needs
        from hoshikage_sd.policy.admission import Verdict, decide
        from hoshikage_sd.staging import Store

        config, name = self.config, model.name
        store = Store(config.ramdisk)
        started = False
        try:
            # A current staged copy, else the source: its RAM-disk copy is made alongside
            # once it serves (model_unit/activate.py copy_alongside).
            source = cache.source_for(config, model)
            files = store.current(name, source) or source
            if files is source and any(map(encryption.named_or_encrypted, source.paths)):
                return None  # its unit decrypts it into the RAM disk first
            with self.runtime.locked("admission"):
                snapshot, request = gather.inputs(config, model, self.runtime, listing=False)
                decision = decide(snapshot, request)
                if decision.verdict is not Verdict.LOAD and not decision.by_count:
                    return None
                self.runtime.set_admitted(name, request.estimate)
                protocol.write_ticket(str(config.runtime_dir), name,
                                      str(config.socket_path(name)), model.health,
                                      proc.minimal_env(model.environment),
                                      config.server_argv(model, files))
                start()
                started = True
                act.record(name, decision, counts=self.metrics)
                act.evict(name, decision, self.runtime, self.metrics, wait=False)
                act.workers(config, model, request.estimate, decision, snapshot)
        except needs.DevicesUnknown:
            return None  # its first start: the unit lists the devices and judges
        except (OSError, HoshikageError) as exc:
            if started:
                logger.warning("%s started, but stopping the models it replaces failed: %s",
                               name, exc)
                return []
            logger.warning("starting %s the slow way: %s", name, exc)
            return None
        return [victim.name for victim in decision.victims]

    def record_early_admission(self, name: str, estimate: int, available: int) -> None:
        """The journal's admission record (and its count) for the model the head start
        admitted with nothing else up (headstart/admit.py): the decision the policy makes."""
        from hoshikage_sd.admit import act
        from hoshikage_sd.policy import admission

        model = self.config.models.get(name)
        if model is None:
            return
        # nothing else up: the machine is its MemAvailable within memory_budget (available)
        limits = admission.Limits(self.config.safety_margin, self.config.max_loaded_models)
        decision = admission.decide(admission.Snapshot(mem_available=available, limits=limits),
                                    admission.Request(name, estimate))
        act.record(name, decision, counts=self.metrics)

    async def _start(self, model: Model) -> None:
        early = self.early_start(model.name)
        # A router started afresh finds a model still loaded: no systemd round trip. Not one
        # whose stop is under way (evicted, idle): it answers until its unit is down.
        if self.runtime.stop_reason(model.name) is None and await self.serving(model):
            self.ready.add(model.name)
            return
        unit = units.model_unit(model.name)
        began = time.monotonic()
        self.ttl_override.pop(model.name, None)
        announced = self.announcements.expect(model.name)
        if not early:
            await self.queue(model, unit)
        # Forward once the unit says it serves (before its READY=1 and the job's end); probe
        # only now and then, in case nobody says so (a unit started before this router).
        poll = UNIT_POLL if self.announcements.listening else START_POLL
        checked = time.monotonic()
        while not await self.serving(model):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(announced.wait(), poll)
                break
            if time.monotonic() - checked >= UNIT_POLL:
                checked = time.monotonic()
                state, pending = await asyncio.to_thread(units.unit_state, unit)
                if state == "failed" or (state == "inactive" and not pending):
                    reason = self.runtime.error(model.name)
                    # the activator recorded why; only "no room yet" can change by itself
                    if reason is None and state == "inactive" and early and \
                            await asyncio.to_thread(self.came_and_went, model.name):
                        # the head start's unit served and went (its client gone, then an
                        # idle stop, say): this request's own start
                        early = False
                        await self.queue(model, unit)
                        continue
                    if reason is None and state == "inactive":  # stopped, not failed
                        raise StartFailed(f"{shlex.quote(unit)} was stopped before it "
                                          "served (a stop while it loaded)")
                    if reason is None:  # before the activator could say why
                        from hoshikage_sd.sd import failure

                        why = await asyncio.to_thread(failure.why_failed, unit)
                        raise StartFailed(f"{shlex.quote(unit)} failed to start: {why}")
                    if reason.startswith("llama-server "):  # it exited: its own words
                        from hoshikage_sd.panel import journal  # a failure's path only

                        said = await asyncio.to_thread(
                            journal.errors_said, self.config.runtime_dir, model.name,
                            time.time() - (time.monotonic() - began) - 1.0)
                        reason += f" (llama-server said: {said})" if said else ""
                    raise StartFailed(reason, permanent=not reason.startswith("no room for"))
        logger.info("%s serves after %.3f s (%s)", model.name, time.monotonic() - began,
                    "announced by its unit" if announced.is_set() else "probed")
        self.ready.add(model.name)
        refresh = asyncio.create_task(self.refresh_index_after(model.name))
        self.refreshing.add(refresh)  # a reference, until it is done
        refresh.add_done_callback(self.refreshing.discard)

    async def refresh_index_after(self, name: str) -> None:
        """The model's estimate is remembered now: the next router's head start may admit
        it, once the name index is written again. Not before the requests that wait for
        it are answered: building the index asks systemd for the model unit's environment
        (a systemctl, PID 1, D-Bus), and that took a core from the first answer on a
        2-core machine (docs/performance.md, "At ~2 GiB")."""
        await asyncio.sleep(0.05)  # the request that started it is in flight by then
        if self.in_flight.get(name):
            answered = self.answered.setdefault(name, asyncio.Event())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(answered.wait(), INDEX_REFRESH_WAIT)
        await asyncio.to_thread(refresh_index, self.config)

    async def queue(self, model: Model, unit: str) -> None:
        """Admit the model and queue its unit's start (begin), the models it evicted gone."""
        try:
            evicted = await asyncio.to_thread(self.begin, model, unit)
        except HoshikageError as err:
            raise StartFailed(err.message) from None
        for name in evicted:
            self.gone(name)

    def came_and_went(self, name: str) -> bool:
        """Did the model serve and stop since this router began (its usage record: a load,
        then its stop)? Not when it was stopped while it loaded: that start's request gets
        that answer."""
        from hoshikage_sd.stats import StatsFile

        usage = StatsFile(self.config.state_dir).read().get(name)
        last = usage.uses[-1] if usage and usage.uses else None
        return last is not None and last.runtime is not None and \
            last.at > time.time() - (time.monotonic() - self._created) - 1.0

    def early_start(self, name: str) -> bool:
        """Is the model's unit the head start's, on its way? For this router's first start
        of the model only, whether it serves already or not: a later one (after a stop)
        needs a start of its own."""
        if name != self.started_early:
            return False
        self.started_early = None
        return time.monotonic() - self._created < EARLY_START_VALID

    def begin(self, model: Model, unit: str) -> list[str]:
        """Admit the model if it can go the fast way, and queue its unit's start. Returns
        the models stopped to make room for it. (Not for the head start's unit: it is on
        its way already, or has failed, which _start reports; a ticket now would be left
        unused, a second start would fail twice.)"""
        # A unit still stopping (evicted a moment ago) goes down first: its release removes
        # the ticket and the admission record of a start prepared before. A copy it is
        # making to keep is given up: this request waits for it (Runtime.wanted).
        waited: list[bool] = []

        def wanted() -> None:
            self.runtime.set_wanted(model.name)
            waited.append(True)

        state = units.wait_down(unit, wanted)
        if waited:
            self.runtime.set_wanted(model.name, False)
        started: list[bool] = []

        def start() -> None:
            try:
                units.start_unit(unit, state)
            except HoshikageError as err:  # the start's failure, not the fast path's
                raise StartFailed(err.message) from None
            started.append(True)

        evicted = self.prepare(model, start)
        if not started:  # the activator's start
            start()
        return evicted or []

    async def ensure(self, model: Model) -> None:
        """Return once the model serves; concurrent callers share one start."""
        if model.name in self.ready:
            return
        task = self.starting.get(model.name)
        if task is None:
            task = asyncio.create_task(self._start(model))
            self.starting[model.name] = task
            task.add_done_callback(lambda _t: self.starting.pop(model.name, None))
        await asyncio.shield(task)

    def pool(self, model: Model) -> proxy.Upstream:
        pool = self.pools.get(model.name)
        if pool is not None and self._pools_for is self.config:
            return pool
        if self._pools_for is not self.config:  # a reload may have moved or resized them
            self._pools_for = self.config
            for name in [n for n in self.pools if n != model.name]:
                self.pools.pop(name).close()
        path, size = str(self.config.socket_path(model.name)), model.upstream_pool
        if pool is None or pool.path != path or pool.size != size:
            if pool is not None:
                pool.close()
            pool = self.pools[model.name] = proxy.Upstream(path, size)
        return pool

    def gone(self, name: str) -> None:
        """The model's llama-server went away (stopped, or being stopped)."""
        self.ready.discard(name)
        self.ttl_override.pop(name, None)  # its release clears the override
        pool = self.pools.pop(name, None)
        if pool is not None:
            pool.close()

    async def unload(self, model: Model, reason: str) -> None:
        """Stop the model's unit now (Ollama's keep_alive 0, /models/unload) and return
        once it is down (its memory free: README, "An unload answers once the unit is
        down"), or UNLOAD_WAIT has passed."""
        unit = units.model_unit(model.name)
        self.gone(model.name)
        self.runtime.set_stop_reason(model.name, reason)
        try:
            await asyncio.to_thread(units.stop_unit, unit)
        except HoshikageError as err:
            logger.warning("cannot unload %s: %s", model.name, err.message)
            return
        deadline = time.monotonic() + UNLOAD_WAIT
        while time.monotonic() < deadline:
            state, _ = await asyncio.to_thread(units.unit_state, unit)
            if state in ("inactive", "failed"):
                return
            await asyncio.sleep(0.02)

    def unload_once_answered(self, model: Model, reason: str) -> None:
        """Unload the model once no request is in flight to it, in the background (Ollama's
        keep_alive 0 beside another client's request: that one is answered whole first, as
        Ollama lets it; it was cut mid-reply)."""
        async def drained() -> None:
            while self.in_flight.get(model.name, 0) > 0:
                await self.answered.setdefault(model.name, asyncio.Event()).wait()
            await self.unload(model, reason)

        task = asyncio.get_running_loop().create_task(drained())
        self.refreshing.add(task)
        task.add_done_callback(self.refreshing.discard)

    # -- requests in flight ---------------------------------------------------------------
    def effective_ttl(self, model: Model) -> float:
        """The model's TTL for this load: a request's keep_alive, else the manifest's."""
        if model.name not in self.ttl_override:
            self.ttl_override[model.name] = self.runtime.ttl(model.name)
        return self.ttl_override[model.name] or model.ttl

    def request_began(self, model: Model) -> None:
        """A request to the model starts: from the first in flight, it is busy (no idle
        stop, no eviction) for the idle watch and admission."""
        name = model.name
        count = self.in_flight.get(name, 0) + 1
        self.in_flight[name] = count
        self.last_activity = time.monotonic()
        self.metrics.in_flight(name, +1)
        if count == 1 and not self.busy.hold(name):
            # no lock to be had (a reader holds it this very moment, or no runtime
            # directory): say so in the record, as the router always did
            self.activity.write(name, count, time.time())

    def request_ended(self, name: str) -> None:
        count = self.in_flight.get(name, 0) - 1
        self.in_flight[name] = max(0, count)
        self.last_activity = time.monotonic()
        self.metrics.in_flight(name, -1)
        if count > 0:
            return
        self.activity.write(name, 0, time.time())
        self.busy.release(name)  # after the record: never idle with an old last_end
        answered = self.answered.pop(name, None)
        if answered is not None:
            answered.set()

    # -- idle exit ------------------------------------------------------------------------
    async def watch_idle(self, done: asyncio.Event,
                         listed: Callable[[], Awaitable[set[str]]]) -> None:
        """Set `done` once nothing is loaded (asked of systemd, else `listed`, the runtime
        records) and nothing was asked for `router_idle_exit`: the router exits."""
        while True:
            period = max(0.2, min(5.0, self.config.router_idle_exit / 4))
            await asyncio.sleep(period)
            if any(self.in_flight.values()):
                continue
            if time.monotonic() - self.last_activity < self.config.router_idle_exit:
                continue
            try:
                loaded = set(await asyncio.to_thread(units.active_model_units))
            except HoshikageError as err:  # no systemd to ask (a test bed): the records
                logger.debug("asking the runtime records what is loaded: %s", err.message)
                loaded = await listed()
            self.ready.intersection_update(loaded)
            if loaded:
                continue
            log.event("router-exit", "", "router exits: nothing loaded and idle for "
                      f"{self.config.router_idle_exit:.0f} s")
            done.set()
            return

    def close(self) -> None:
        for pool in self.pools.values():
            pool.close()
        self.busy.close()
