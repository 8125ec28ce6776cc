"""`hoshikage ps [--json]`: the loaded models only (their units up), from facts.gather:
one model of state with `status`, `status --json` and the panel."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Mapping
from typing import Any

from hoshikage_sd import fmt
from hoshikage_sd.commands import status
from hoshikage_sd.commands.facts import gather
from hoshikage_sd.manifest import Config
from hoshikage_sd.runtime import Runtime
from hoshikage_sd.sd.units import UP_STATES

#: how long ps waits for the router's count of requests in flight
METRICS_TIMEOUT = 1.0


def loaded(facts: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The models whose units are up (starting, serving or stopping), as ps shows them."""
    return [{"name": m["name"], "state": m["phase"], "unit_state": m["state"],
             "pid": m["llama_server_pid"], "unit_pid": m["pid"],
             "memory_bytes": m["memory_bytes"], "resident_bytes": m["resident_bytes"],
             "since": m["since"], "last_request_end": m["last_request_end"],
             "in_flight": m["in_flight"], "busy": m["busy"],
             "ttl_left_seconds": m["ttl_left_seconds"], "status_text": m["status_text"]}
            for m in facts["models"] if m["state"] in UP_STATES]


def in_flight_counts(text: str) -> dict[str, int]:
    """hoshikage_in_flight_requests{model="NAME"} N from the router's /metrics text."""
    counts = {}
    prefix = 'hoshikage_in_flight_requests{model="'
    for line in text.splitlines():
        if line.startswith(prefix):
            labels, _, value = line[len(prefix):].rpartition("} ")
            name = labels.removesuffix('"').replace('\\"', '"').replace("\\\\", "\\")
            try:
                counts[name] = int(float(value))
            except ValueError:
                continue
    return counts


def router_in_flight(config: Config, router: Mapping[str, Any]) -> dict[str, int] | None:
    """The running router's requests in flight per model (its /metrics), None where it
    cannot be asked without side effects: no router running (ps must not wake one), or
    keys configured (an unauthorised scrape is a refusal it counts)."""
    import http.client

    if not router["running"] or config.api_keys or not router["listen"]:
        return None
    host, _, port = router["listen"][0].rpartition(":")
    if not port.isdigit():
        return None
    host = host.strip("[]")
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    conn = http.client.HTTPConnection(host, int(port), timeout=METRICS_TIMEOUT)
    try:
        conn.request("GET", "/metrics")
        reply = conn.getresponse()
        if reply.status != 200:
            return None
        return in_flight_counts(reply.read().decode("utf-8", "replace"))
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()


def ps(config: Config, as_json: bool = False) -> int:
    facts = gather(config)
    rows = loaded(facts)
    counts = router_in_flight(config, facts["router"]) if rows else None
    runtime = Runtime(config.runtime_dir)
    for row in rows:
        if counts is not None:
            row["in_flight"] = counts.get(row["name"], 0)
        elif row["state"] == "serving":
            # without the router's count: its busy lock says whether any is in flight
            row["busy"] = runtime.busy(row["name"])
    if as_json:
        print(json.dumps(rows, indent=2))
        return 0
    colour = fmt.use_colour(sys.stdout)
    now = time.time()
    status.table(("MODEL", "STATE", "PID", "MEMORY", "SINCE", "LAST REQUEST", "IN FLIGHT"),
                 [(r["name"], r["state"], status.pid_text(r["pid"]), memory_text(r),
                   fmt.ago(now - r["since"]) if r["since"] else "-",
                   fmt.ago(now - r["last_request_end"]) + " ago"
                   if r["last_request_end"] else "never", in_flight_text(r))
                  for r in rows], {1: lambda text: fmt.state(text, colour)})
    if not rows:
        print("no model loaded", file=sys.stderr)
    return 0


def memory_text(row: Mapping[str, Any]) -> str:
    """The unit's memory (its cgroup: the RAM-disk copy's pages included), else
    llama-server's RSS."""
    n = row["memory_bytes"] if row["memory_bytes"] is not None else row["resident_bytes"]
    return fmt.size(n) if n is not None else "-"


def in_flight_text(row: Mapping[str, Any]) -> str:
    if row["in_flight"] is not None:
        return str(row["in_flight"])
    return "yes" if row["busy"] else "-" if row["state"] != "serving" else "0"
