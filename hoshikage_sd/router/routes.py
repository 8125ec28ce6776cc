"""Which requests the router answers itself, which it forwards to a model, which it refuses.

Only a route that serves a model may start one: the OpenAI and Anthropic inference routes and
llama-server's own (its server.cpp, b10068 and later: completion, embeddings, rerank,
tokenize, infill, templates, slots, props, LoRA adapters), and llama-server's /health and
/metrics when a model is named (`?model=`). Anything else is the router's own 404, so a
typo'd path or an API the model does not speak loads nothing. Ollama's API (`/api/*`) is
translated by the router (router/ollama).

Pure and cheap: the head start (headstart/request.py) imports it before the router's own
imports, so a route is a plain string: enum's import would be on the head start
(`python3 -IS -X importtime`).
"""

from __future__ import annotations


class Route:
    """What the router does with a request: classify()'s answers."""

    FORWARD = "forward"          # to the model the request names
    MODELS = "models"            # GET /v1/models
    MODEL = "model"              # GET /v1/models/{id}
    HEALTH = "health"            # the router's own health
    METRICS = "metrics"          # the router's metrics (Prometheus)
    OPTIONS = "options"          # CORS preflight and OPTIONS *
    OLLAMA_VERSION = "ollama-version"
    OLLAMA_TAGS = "ollama-tags"
    OLLAMA_PS = "ollama-ps"
    OLLAMA_SHOW = "ollama-show"
    OLLAMA_INFER = "ollama-infer"  # /api/chat, /api/generate, /api/embed, /api/embeddings
    OLLAMA_UNMANAGED = "ollama-unmanaged"  # /api/pull and the like: 501
    PANEL = "panel"              # the web panel, /panel/ and /panel/api/* (hoshikage_sd/panel)
    CONTROL = "control"          # POST /models/load, /models/unload (router/control.py)
    NOT_ALLOWED = "not-allowed"  # a known route, another method: 405
    NOT_FOUND = "not-found"


POST = frozenset({"POST"})
GET_POST = frozenset({"GET", "POST", "HEAD"})

#: the model-serving routes and the methods they take (llama-server's server.cpp)
MODEL_ROUTES: dict[str, frozenset[str]] = {
    **dict.fromkeys((
        # OpenAI
        "/v1/chat/completions", "/chat/completions", "/v1/completions", "/completions",
        "/v1/embeddings", "/embeddings", "/v1/responses", "/responses",
        "/v1/audio/transcriptions", "/audio/transcriptions",
        "/v1/chat/completions/input_tokens", "/chat/completions/input_tokens",
        "/v1/responses/input_tokens", "/responses/input_tokens",
        # Anthropic
        "/v1/messages", "/v1/messages/count_tokens",
        # llama-server's own
        "/completion", "/embedding", "/infill", "/rerank", "/reranking", "/v1/rerank",
        "/v1/reranking", "/tokenize", "/detokenize", "/apply-template"), POST),
    **dict.fromkeys(("/props", "/slots", "/lora-adapters"), GET_POST),
}
#: prefixes of model routes with a parameter (POST /slots/:id_slot)
MODEL_PREFIXES = ("/slots/",)
#: llama-server's routes that are the router's own unless a model is named (?model=)
NAMED_ONLY = frozenset({"/health", "/v1/health", "/metrics"})
HEALTH = frozenset({"/", "/health", "/v1/health", "/hoshikage/health"})
MODELS = frozenset({"/v1/models", "/models"})
MODEL_PREFIX = "/v1/models/"
#: llama.cpp's router's load and unload (router/control.py)
CONTROL = frozenset({"/models/load", "/models/unload"})
PANEL = "/panel"

OLLAMA_GET = {"/api/version": Route.OLLAMA_VERSION, "/api/tags": Route.OLLAMA_TAGS,
              "/api/ps": Route.OLLAMA_PS}
OLLAMA_POST = {"/api/show": Route.OLLAMA_SHOW, "/api/chat": Route.OLLAMA_INFER,
               "/api/generate": Route.OLLAMA_INFER, "/api/embed": Route.OLLAMA_INFER,
               "/api/embeddings": Route.OLLAMA_INFER}
#: Ollama's model management: hoshikage does not download, create or delete models
OLLAMA_UNMANAGED = frozenset({"/api/pull", "/api/push", "/api/create", "/api/delete",
                              "/api/copy", "/api/blobs"})


def classify(method: str, path: str, query: dict[str, str]) -> str:
    """What the router does with a request."""
    if method == "OPTIONS":
        return Route.OPTIONS
    allowed = MODEL_ROUTES.get(path)
    if allowed is not None or path.startswith(MODEL_PREFIXES):
        return Route.FORWARD if method in (allowed or POST) else Route.NOT_ALLOWED
    if path in NAMED_ONLY and "model" in query:
        return Route.FORWARD
    if path in HEALTH:
        return Route.HEALTH if method in ("GET", "HEAD") else Route.NOT_ALLOWED
    if path == "/metrics":
        return Route.METRICS if method in ("GET", "HEAD") else Route.NOT_ALLOWED
    if path in CONTROL:
        return Route.CONTROL if method == "POST" else Route.NOT_ALLOWED
    if path in MODELS or path.startswith(MODEL_PREFIX):
        if method not in ("GET", "HEAD"):
            return Route.NOT_ALLOWED
        return Route.MODELS if path in MODELS else Route.MODEL
    if path.startswith("/api/"):
        return ollama_route(method, path)
    if path == PANEL or path.startswith(PANEL + "/"):
        return Route.PANEL
    return Route.NOT_FOUND


def ollama_route(method: str, path: str) -> str:
    base = "/api/blobs" if path.startswith("/api/blobs/") else path
    if base in OLLAMA_UNMANAGED:
        return Route.OLLAMA_UNMANAGED
    if path in OLLAMA_GET:
        return OLLAMA_GET[path] if method in ("GET", "HEAD") else Route.NOT_ALLOWED
    if path in OLLAMA_POST:
        return OLLAMA_POST[path] if method == "POST" else Route.NOT_ALLOWED
    return Route.NOT_FOUND


def allowed_methods(path: str) -> str:
    """The Allow header of a 405 on `path`."""
    if path in MODEL_ROUTES:
        return ", ".join(sorted(MODEL_ROUTES[path]))
    if path.startswith(MODEL_PREFIXES) or path in OLLAMA_POST or path in CONTROL:
        return "POST"
    return "GET, HEAD"
