"""The metric families hoshikage exports: names, help, label names, buckets."""

from __future__ import annotations

import logging
import math
from typing import NamedTuple

logger = logging.getLogger("hoshikage")


CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
FLUSH_INTERVAL = 1.0  # seconds: how stale the file may be behind a busy router
#: label sets kept per family: a guard against a client inventing names (the router is to
#: pass resolved model names and route_label()s, but the file is rewritten every second)
MAX_SERIES = 2000
FORMAT = 1

REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                   120.0, 300.0)
LOAD_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
                300.0, 600.0)


# NamedTuples and plain classes, not dataclasses: this module is on the activator's cold
# path, where dataclasses' import (with inspect) costs more than these.
class Family(NamedTuple):
    name: str
    kind: str  # counter | histogram | gauge
    help: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()


def _families(*items: Family) -> dict[str, Family]:
    return {f.name: f for f in items}


#: Counted by the processes above and kept in the counter file.
COUNTED = _families(
    Family("hoshikage_requests_total", "counter",
           "Requests the router answered, by model, route and HTTP status.",
           ("model", "route", "status")),
    Family("hoshikage_request_duration_seconds", "histogram",
           "Time from a request's arrival to the end of its reply (model start included).",
           ("model", "route"), REQUEST_BUCKETS),
    Family("hoshikage_time_to_first_byte_seconds", "histogram",
           "Time from a request's arrival to the first byte of its reply's body.",
           ("model", "route"), REQUEST_BUCKETS),
    Family("hoshikage_loads_total", "counter",
           "Models loaded (llama-server answered /health), by how: path=launcher when the "
           "router admitted it and the unit's launcher started llama-server at once, "
           "path=activator when the activator admitted and staged it first.",
           ("model", "path")),
    Family("hoshikage_load_phase_seconds", "histogram",
           "Seconds a load spent per phase: admission (deciding, evicting, waiting for "
           "room), staging (copying into the RAM disk or checking the copy), llama_server "
           "(from its start to /health 200). A load by the launcher path has only "
           "llama_server (the router admitted it; the copy was current).",
           ("model", "phase"), LOAD_BUCKETS),
    Family("hoshikage_load_failures_total", "counter",
           "Model unit starts that failed before the model served (refusals included).",
           ("model",)),
    Family("hoshikage_admission_decisions_total", "counter",
           "Admission verdicts (load, evict, wait, reject) for a model about to load.",
           ("model", "verdict")),
    Family("hoshikage_evictions_total", "counter",
           "Models stopped by hoshikage, by reason: admission (to make room for another "
           "model), pressure (memory pressure), idle (idle past its TTL).",
           ("model", "reason")),
    Family("hoshikage_refusals_total", "counter",
           "Loads refused, by reason: memory (can never fit), max_loaded_models, "
           "wait_timeout (busy models did not go idle within admission_wait).",
           ("model", "reason")),
)

#: Read at scrape time.
GAUGES = _families(
    Family("hoshikage_in_flight_requests", "gauge",
           "Requests the router is answering now.", ("model",)),
    Family("hoshikage_models_loaded", "gauge",
           "Models whose llama-server runs (from the runtime records)."),
    Family("hoshikage_model_resident_bytes", "gauge",
           "Resident memory of a loaded model's llama-server (RSS, the mapped staged copy "
           "included).", ("model",)),
    Family("hoshikage_model_idle_seconds", "gauge",
           "Seconds since a loaded model's last request ended (absent while busy).",
           ("model",)),
    Family("hoshikage_model_device_bytes", "gauge",
           "Estimated bytes a loaded model holds on a GPU device (llama.cpp's name for it).",
           ("model", "device")),
    Family("hoshikage_model_worker_bytes", "gauge",
           "Estimated bytes a loaded model holds on an RPC worker (its share of the split).",
           ("model", "worker", "address")),
    Family("hoshikage_device_total_bytes", "gauge",
           "Memory of a GPU device a loaded model uses, as llama-server lists it.",
           ("device",)),
    Family("hoshikage_ramdisk_used_bytes", "gauge", "Bytes used on the RAM disk."),
    Family("hoshikage_ramdisk_size_bytes", "gauge", "Size of the RAM disk."),
    Family("hoshikage_memory_available_bytes", "gauge", "MemAvailable from /proc/meminfo."),
    Family("hoshikage_memory_total_bytes", "gauge", "MemTotal from /proc/meminfo."),
    Family("hoshikage_counters_start_time_seconds", "gauge",
           "When the counters started (Unix time): the first count since boot."),
    Family("hoshikage_build_info", "gauge", "hoshikage's version.", ("version",)),
)

#: route_label's known routes; every other path is "other" (a label per path would let
#: any client grow the counter file)
ROUTES = frozenset((
    "/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/messages",
    "/v1/messages/count_tokens", "/v1/models", "/v1/rerank", "/v1/responses",
    "/completion", "/completions", "/chat/completions", "/embedding", "/embeddings",
    "/infill", "/rerank", "/reranking", "/tokenize", "/detokenize", "/apply-template",
    "/health", "/props", "/slots", "/metrics",
    "/api/chat", "/api/generate", "/api/embed", "/api/embeddings", "/api/tags", "/api/ps",
    "/api/show", "/api/version", "/api/pull", "/api/push", "/api/create", "/api/delete",
    "/api/copy", "/models/load", "/models/unload", "/models", "/v1/health", "/responses",
    "/v1/reranking", "/lora-adapters",
))


def route_label(path: str) -> str:
    """A request path as a bounded label: a known route, /v1/models/{id}, the panel's
    page or API, or "other"."""
    path = path.split("?", 1)[0]
    if len(path) > 1:
        path = path.rstrip("/")
    if path in ROUTES:
        return path
    if path.startswith("/v1/models/"):
        return "/v1/models/{id}"
    if path.startswith("/slots/"):
        return "/slots/{id}"
    if path.startswith("/api/blobs/"):
        return "/api/blobs/{digest}"
    if path == "/panel" or path.startswith("/panel/"):
        return "/panel/api/*" if path.startswith("/panel/api/") else "/panel"
    return "other"


Labels = tuple[str, ...]


def bucket_bound(bound: float) -> str:
    """A histogram bucket's bound as the text format writes it."""
    return "+Inf" if math.isinf(bound) else repr(float(bound))
