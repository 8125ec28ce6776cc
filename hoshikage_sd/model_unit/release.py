"""`hoshikage release NAME`: ExecStopPost of hoshikage-model@NAME.service.

Idempotent and safe after a failed or half-finished start: clear the RAM-disk copy (and any
partial copy), the socket and the runtime state, then write one `released` journal record.
"""

from __future__ import annotations

import contextlib
import os

from hoshikage_sd import fmt, log, protocol
from hoshikage_sd.manifest import Config
from hoshikage_sd.policy.stats import StatsFile
from hoshikage_sd.runtime import Runtime
from hoshikage_sd.staging import Store


def reason_for(stop_reason: str | None, result: str | None, code: str | None,
               status: str | None) -> str:
    """Why the unit went away, from the idle watch's marker and systemd's $SERVICE_RESULT."""
    if result and result != "success":
        return f"failure: {result}" + (f" ({code}={status})" if code else "")
    return stop_reason or "manual stop"


def main(config: Config, name: str) -> int:
    runtime = Runtime(config.runtime_dir)
    running = runtime.running(name)
    activity = runtime.activity(name)
    freed = Store(config.ramdisk).remove(name) if config.ramdisk.is_dir() else 0
    with contextlib.suppress(FileNotFoundError):
        config.socket_path(name).unlink()
    result, code, status = (os.environ.get(k) for k in ("SERVICE_RESULT", "EXIT_CODE",
                                                        "EXIT_STATUS"))
    reason = reason_for(runtime.stop_reason(name), result, code, status)
    for kind in ("running", "activity", "stop", "admitted", "ttl"):
        runtime.clear(kind, name)
    # A ticket written while this unit was still stopping must not outlive its copy.
    with contextlib.suppress(FileNotFoundError):
        os.unlink(protocol.ticket_path(str(config.runtime_dir), name))
    pid = running.pid if running else None
    if running is not None:
        try:
            StatsFile(config.state_dir).record_stop(name, activity.last_end if activity else None)
        except OSError as exc:
            log.log.warning("cannot record %s's runtime: %s", name, exc)
    log.event("released", name,
              f"released {name}: {reason}; freed {fmt.size(freed)} of RAM disk"
              + (f"; llama-server pid was {pid}" if pid else ""),
              pid=pid, reason=reason, bytes_freed=freed, service_result=result,
              exit_code=code, exit_status=status)
    return 0
