"""Optional API keys, checked by the router before a request can start anything.

The manifest's `api_keys:` names where the keys are: a file (`/etc/hoshikage/api-keys`) or a
systemd credential (`credential:NAME`, i.e. $CREDENTIALS_DIRECTORY/NAME, which
`LoadCredential=NAME:/path` in a drop-in of hoshikage.service provides: systemd reads the
file as root, so it need not be readable by the hoshikage user). One key a line, `#` starts
a comment; `KEY: model, alias, ...` limits a key to those models (names or aliases as the
manifest and names.json give them), a bare `KEY` may use every model.

A client presents its key as `Authorization: Bearer KEY` (openai, ollama with headers) or
`x-api-key: KEY` (anthropic). Keys are compared as SHA-256 digests with
hmac.compare_digest, against every key, so neither a key's length nor its place in the
file shows in the time an answer takes. Keys never reach a log line or an error message:
errors about the file name its line, never its text.

A file that cannot be used (missing, unreadable, a malformed line) is never read as "no
keys": every request but /health's and OPTIONS' gets a 503 saying what is wrong, until the
file is fixed and the manifest is reloaded (or the file's change is noticed).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final, TypeVar

from hoshikage_sd.router import errors as api

CREDENTIAL: Final = "credential:"
#: what a key may contain: visible ASCII except the file's own syntax (':' '#' ',')
KEY_RE: Final = re.compile(r"^[!-~]+$")
SYNTAX: Final = frozenset(":#,")
#: keys shorter than this are refused: a guessable key is no key
MIN_LENGTH: Final = 8


M = TypeVar("M")


class KeysUnusable(Exception):
    """The keys file cannot be used; the message names the file (and line), never a key."""


@dataclass(frozen=True)
class Key:
    """One key: its digest, and the models it may use (None: all of them)."""

    digest: bytes
    models: frozenset[str] | None = None
    line: int = 0

    def allows(self, name: str, aliases: tuple[str, ...] = ()) -> bool:
        return self.models is None or name in self.models or any(
            a in self.models for a in aliases)


def visible(models: Mapping[str, M], grant: object) -> dict[str, M]:
    """The models a request's key may see and use: a limited key's own, all of them
    without keys or with a key for every model. The listings (/v1/models, /api/tags,
    /api/ps) show only these: a model a key may not use is not the key's business."""
    if not isinstance(grant, Key) or grant.models is None:
        return dict(models)
    return {n: m for n, m in models.items()
            if grant.allows(n, tuple(getattr(m, "aliases", ())))}


def digest(key: str) -> bytes:
    import hashlib  # with hmac: not on every router start, needed only with API keys

    return hashlib.sha256(key.encode("latin-1", errors="replace")).digest()


def source_path(spec: str, environ: Mapping[str, str] | None = None) -> Path:
    """Where the keys of `api_keys: SPEC` are: the file, or the credential's file."""
    if not spec.startswith(CREDENTIAL):
        return Path(spec)
    name = spec[len(CREDENTIAL):]
    directory = (os.environ if environ is None else environ).get("CREDENTIALS_DIRECTORY")
    if not directory:
        raise KeysUnusable(
            f"api_keys: {spec}: no systemd credentials here ($CREDENTIALS_DIRECTORY is not "
            f"set): add 'LoadCredential={name}:/path/to/keys' to hoshikage.service with "
            "`systemctl edit hoshikage.service`")
    return Path(directory) / name


def parse(text: str, where: str) -> tuple[Key, ...]:
    """The keys in a keys file's text; KeysUnusable at the first malformed line."""
    keys: list[Key] = []
    seen: set[bytes] = set()
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.partition("#")[0].strip()
        if not line:
            continue
        secret, colon, rest = line.partition(":")
        secret = secret.strip()
        if not secret or not KEY_RE.match(secret) or SYNTAX & set(secret):
            raise KeysUnusable(f"{where}:{number}: a key must be printable ASCII without "
                               "spaces, ':', '#' or ','")
        if len(secret) < MIN_LENGTH:
            raise KeysUnusable(f"{where}:{number}: a key must have at least {MIN_LENGTH} "
                               "characters")
        models = None
        if colon:
            names = [n.strip() for n in rest.split(",")]
            if not all(names):
                raise KeysUnusable(f"{where}:{number}: after ':' comes a list of models, "
                                   "'KEY: model1, model2' (a bare KEY may use every model)")
            models = frozenset(names)
        hashed = digest(secret)
        if hashed in seen:
            raise KeysUnusable(f"{where}:{number}: this key is on an earlier line too")
        seen.add(hashed)
        keys.append(Key(hashed, models, number))
    if not keys:
        raise KeysUnusable(f"{where}: no keys in it (remove api_keys: from the manifest to "
                           "serve without keys)")
    return tuple(keys)


def load(spec: str, environ: Mapping[str, str] | None = None) -> tuple[Key, ...]:
    path = source_path(spec, environ)
    where = str(path) if path == Path(spec) else f"{spec} ({path})"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise KeysUnusable(f"api_keys: {where} does not exist") from None
    except OSError as exc:
        raise KeysUnusable(f"api_keys: cannot read {where}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise KeysUnusable(f"api_keys: {where} is not UTF-8 text") from None
    return parse(text, where)


def presented(header: Callable[[str], str | None]) -> list[str]:
    """The keys a request carries: `Authorization: Bearer KEY` and `x-api-key: KEY`."""
    found = []
    authorization = header("authorization")
    if authorization is not None:
        scheme, _, value = authorization.strip().partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            found.append(value.strip())
    api_key = header("x-api-key")
    if api_key is not None and api_key.strip():
        found.append(api_key.strip())
    return found


def match(keys: tuple[Key, ...], candidates: list[str]) -> Key | None:
    """The key among `keys` that one of `candidates` is, compared in constant time: every
    candidate against every key, no early exit."""
    import hmac

    found = None
    for candidate in candidates:
        hashed = digest(candidate)
        for key in keys:
            if hmac.compare_digest(hashed, key.digest) and found is None:
                found = key
    return found


def unauthorized(sent: bool) -> api.ApiError:
    what = "the API key is not valid" if sent else (
        "an API key is required: send 'Authorization: Bearer KEY' or 'x-api-key: KEY'")
    return api.ApiError(401, what, code="invalid_api_key", retry=False)


def forbidden(model: str) -> api.ApiError:
    return api.ApiError(403, f"this API key may not use model '{model}'",
                        code="model_not_allowed", param="model", retry=False)


def unusable(reason: str, spec: str | None = None) -> api.ApiError:
    """The 503 while the keys cannot be used. A credential is the router's copy, made at its
    start (LoadCredential=): a fixed file reaches it with a restart, not a reload."""
    again = "`systemctl restart hoshikage.service`: systemd gives it the credential at its " \
        "start" if (spec or "").startswith("credential:") else "`hoshikage reload`"
    return api.ApiError(503, f"hoshikage cannot check API keys: {reason}; fix it (the router "
                        f"reads it again on {again})", code="api_keys_unusable", retry=False)


class Gate:
    """The router's keys as last loaded: none configured (open), the keys, or why they
    cannot be used (closed)."""

    def __init__(self) -> None:
        self.spec: str | None = None
        self.keys: tuple[Key, ...] = ()
        self.problem: str | None = None

    def load(self, spec: str | None, environ: Mapping[str, str] | None = None) -> None:
        self.spec = spec
        self.keys, self.problem = (), None
        if spec is None:
            return
        try:
            self.keys = load(spec, environ)
        except KeysUnusable as exc:
            self.problem = str(exc)

    def path(self) -> Path | None:
        """The file to watch for changes (None: no keys, or a credential not there)."""
        if self.spec is None:
            return None
        try:
            return source_path(self.spec)
        except KeysUnusable:
            return None

    def check(self, header: Callable[[str], str | None]) -> Key | api.ApiError | None:
        """The key the request presents (None: no keys configured, all may pass), or the
        error to answer it with."""
        if self.spec is None:
            return None
        if self.problem is not None:
            return unusable(self.problem, self.spec)
        candidates = presented(header)
        key = match(self.keys, candidates)
        return key if key is not None else unauthorized(bool(candidates))
