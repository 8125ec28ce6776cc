"""A model's own llama-server key, checked by the router before it starts the model.

llama-server asks for a key when its arguments carry `--api-key KEY` (several: commas),
`--api-key-file FILE` (a key a line) or its environment `LLAMA_API_KEY` (common/arg.cpp's
set_env). It checks the key only once it runs: an unauthenticated request would start the
model's unit, evicting others for it, and only then get llama-server's 401. The router
reads the same key from the manifest (the model's args and env:, the router's own
environment for LLAMA_API_KEY, which /etc/default/hoshikage gives every unit) and answers
a request without it 401 before anything starts (Router.may_start).

The keys are compared as SHA-256 digests in constant time (router/auth.match) and never
reach a log line or an error message.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Final

from hoshikage_sd.manifest import Model
from hoshikage_sd.router import auth
from hoshikage_sd.router import errors as api

KEY_FLAG: Final = "--api-key"
FILE_FLAG: Final = "--api-key-file"
ENV: Final = "LLAMA_API_KEY"
#: llama-server's routes that need no key (its health check): forwarded without one to a
#: model that serves already (`/health?model=`), where they start nothing
PUBLIC: Final = frozenset({"/health", "/v1/health"})


class KeyFileUnusable(Exception):
    """The model's --api-key-file cannot be read (its message names the file, no key)."""


def flag_values(args: tuple[str, ...], flag: str) -> list[str]:
    """Every value `args` give `flag` (`--flag VALUE` or `--flag=VALUE`)."""
    out = []
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            out.append(args[i + 1])
        elif arg.startswith(flag + "="):
            out.append(arg[len(flag) + 1:])
    return out


def keys_of(model: Model, environ: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """The keys llama-server will ask the model's clients for (none: it asks for none).
    KeyFileUnusable when an --api-key-file cannot be read."""
    if model.backend != "llama-server":
        return ()
    keys = [k.strip() for v in flag_values(model.args, KEY_FLAG) for k in v.split(",")]
    for name in flag_values(model.args, FILE_FLAG):
        try:
            with open(name, encoding="utf-8") as file:
                keys += [line.strip() for line in file]
        except (OSError, UnicodeDecodeError) as exc:
            why = getattr(exc, "strerror", None) or "not UTF-8 text"
            raise KeyFileUnusable(f"model '{model.name}': cannot read its {FILE_FLAG} "
                                  f"{name}: {why}") from None
    if not keys:  # an argument wins over its variable
        env = model.environment.get(ENV)
        if env is None:
            env = (os.environ if environ is None else environ).get(ENV)
        keys += [k.strip() for k in (env or "").split(",")]
    return tuple(k for k in keys if k)


def check(model: Model, header: Callable[[str], str | None]) -> api.ApiError | None:
    """None when the request may start (and use) the model: it asks for no key of its
    own, or the request carries one of them; else the 401 (or the 503 of a key file that
    cannot be read: that never opens the door)."""
    try:
        keys = keys_of(model)
    except KeyFileUnusable as exc:
        return api.ApiError(503, f"hoshikage cannot check the model's own key: {exc}",
                            code="api_keys_unusable", retry=False)
    if not keys:
        return None
    candidates = auth.presented(header)
    hashed = tuple(auth.Key(auth.digest(k)) for k in keys)
    if auth.match(hashed, candidates) is not None:
        return None
    sent = "the API key is not valid for" if candidates else "an API key is required by"
    return api.ApiError(401, f"{sent} model '{model.name}' (its llama-server's --api-key): "
                        "send 'Authorization: Bearer KEY' or 'x-api-key: KEY'",
                        code="invalid_api_key", retry=False)


def problems(model: Model) -> list[str]:
    """`hoshikage check`'s word on the model's own key."""
    try:
        keys = keys_of(model)
    except KeyFileUnusable as exc:
        return [f"{exc} (the router refuses every request for it with a 503 until it can)"]
    short = [k for k in keys if len(k) < auth.MIN_LENGTH]
    if short:
        return [f"model '{model.name}': its --api-key has a key shorter than "
                f"{auth.MIN_LENGTH} characters (a guessable key is no key)"]
    return []
