"""Ollama's API (`/api/*`) translated onto llama-server's OpenAI-compatible endpoints.

Pure translation, no HTTP library: the router reads a request, asks `translate()` what to
send upstream (or whether the request only loads/unloads the model), sends it, and turns
llama-server's reply back into Ollama's shape with `chat_response()` / `generate_response()`
/ `embed_response()` or, when streaming, a `StreamTranslator` fed with llama-server's SSE
bytes that gives NDJSON lines. Listing endpoints (`/api/tags`, `/api/ps`, `/api/show`) are
built from `ModelFacts` (manifest name, file stat, GGUF header).

Field names follow Ollama's docs/api.md and api/types.go, checked against ollama-python 0.6's
pydantic types (which its client validates every reply with: `ShowResponse` requires
`model_info`; `/api/tags` and `/api/ps` entries are read by `model`, not `name`).

Choices (README says the same):
- `/api/chat`, and `/api/generate` unless `raw`, go to `/v1/chat/completions`, so the
  model's own chat template applies (as Ollama applies its template); `raw: true` goes to
  `/v1/completions` with the prompt as is; `suffix` (fill-in-the-middle) to llama-server's
  native `/infill`. Both OpenAI endpoints return `usage` and llama-server's `timings`
  (prompt_ms, predicted_ms), from which the counts and durations come; streams ask for
  `stream_options.include_usage` so the last chunk has them too.
- Options that llama-server takes per request are passed under its names (`num_predict` ->
  `max_tokens`, `num_keep` -> `n_keep`, the samplers as they are). Load-time options (num_gpu,
  num_thread, use_mmap, ...) are the manifest's `args`, so they are ignored, as Ollama ignores
  options it does not know. `num_ctx` is honoured when the model is served with at least
  that much context per request (nothing to do) and refused with a clear 400 when it asks for
  more (hoshikage does not reload a model per request; raise `-c` in its args).
- `format: "json"` becomes a JSON-schema constraint `{"type": "object"}` (llama-server b10068
  ignores `response_format: json_object` without a schema: measured), a schema dict becomes
  that schema.
- `think` becomes `chat_template_kwargs.enable_thinking` (and `reasoning_effort` for a level);
  llama-server's `reasoning_content` becomes `thinking`.
- Images go to llama-server as `image_url` data-URL parts; a model without a projector
  (`--mmproj`) gets a 400 up front when the caller knows it, else llama-server's own error.
- The deprecated `context` (token history) and per-request `template` are refused: llama-
  server keeps no token context to resume and its templates are Jinja, not Go.
- `keep_alive` becomes a `KeepAlive` for the router: unload after the request, a TTL for this
  load, or forever.
- Digests are not file hashes (hashing a 40 GB file per `/api/tags` is out of the question):
  sha256 over (path, size, mtime), stable while the file is unchanged.

The package, one concern a module (each imports only those above it):
- base.py: the API's constants, `OllamaError`, Go's time format, NDJSON lines
- options.py: `keep_alive`, `options`, `format`, `think`
- body.py: a request body decoded (`decode()`, `read_json()`) and its translation encoded
  (`Body.encode()`), a large one without decoding its long strings (`Long`)
- requests.py: `translate()` -> `Upstream` | `LoadOnly`
- replies.py: whole replies (`chat_response()`, ...), `error_from_upstream()`
- stream.py: `StreamTranslator`
- listings.py: `ModelFacts`, `served_context()`, /api/tags, /api/ps, /api/show, /api/version
- routes.py: the router's side, the routes served with all of the above (router/server.py
  imports it; this package does not, so the translation stays free of the router's HTTP)
Names with a leading underscore are shared between these modules, not the package's API.
"""

from hoshikage_sd.router.ollama.base import (
    ENDPOINTS,
    FOREVER_NS,
    NDJSON,
    OLLAMA_VERSION,
    UNMANAGED,
    Endpoint,
    OllamaError,
    logger,
    ndjson,
    rfc3339,
)
from hoshikage_sd.router.ollama.body import (
    Body,
    Long,
    decode,
    read_json,
)
from hoshikage_sd.router.ollama.listings import (
    Loaded,
    ModelFacts,
    details,
    human_number,
    identity_digest,
    model_facts,
    ps_body,
    resolve_name,
    served_context,
    show_body,
    tags_body,
    unmanaged,
    version_body,
)
from hoshikage_sd.router.ollama.options import (
    KeepAlive,
    map_options,
    parse_keep_alive,
)
from hoshikage_sd.router.ollama.replies import (
    chat_response,
    embed_response,
    embeddings_response,
    error_from_upstream,
    generate_response,
    load_only_response,
)
from hoshikage_sd.router.ollama.requests import (
    LoadOnly,
    Upstream,
    translate,
)
from hoshikage_sd.router.ollama.stream import (
    StreamTranslator,
)

__all__ = [
    "ENDPOINTS",
    "FOREVER_NS",
    "NDJSON",
    "OLLAMA_VERSION",
    "UNMANAGED",
    "Body",
    "Endpoint",
    "KeepAlive",
    "LoadOnly",
    "Loaded",
    "Long",
    "ModelFacts",
    "OllamaError",
    "StreamTranslator",
    "Upstream",
    "chat_response",
    "decode",
    "details",
    "embed_response",
    "embeddings_response",
    "error_from_upstream",
    "generate_response",
    "human_number",
    "identity_digest",
    "load_only_response",
    "logger",
    "map_options",
    "model_facts",
    "ndjson",
    "parse_keep_alive",
    "ps_body",
    "read_json",
    "resolve_name",
    "rfc3339",
    "served_context",
    "show_body",
    "tags_body",
    "translate",
    "unmanaged",
    "version_body",
]
