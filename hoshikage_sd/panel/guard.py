"""The panel's pure checks: cross-site requests, who may act without keys, and its input.

Cross-site requests (CSRF): a page on another origin must not make the panel load or unload
anything. An action must be a POST with a JSON body and the panel's own header
(X-Hoshikage-Panel), which no HTML form can send and which makes any cross-origin fetch ask
a CORS preflight first; Origin and Sec-Fetch-Site, where the browser sends them, must say the
request comes from the panel's own origin (a preflight granted by a broad `cors_origins:`
still does not let another origin act).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from hoshikage_sd import lightjson
from hoshikage_sd.manifest import NAME_RE

#: the header the panel's script sends with every action
HEADER: Final = "x-hoshikage-panel"
#: Sec-Fetch-Site values of a request the panel's own page (or a person typing a URL) makes
SAME_SITE: Final = frozenset({"same-origin", "none"})
#: actions a POST may name: /panel/api/ACTION
ACTIONS: Final = frozenset({"load", "unload", "pin"})
#: the most journal lines a request may ask for
MAX_LINES: Final = 500


@dataclass(frozen=True)
class Refusal:
    """Why a panel request is refused: an HTTP status and a sentence for the page."""

    status: int
    message: str
    code: str


def cross_site(header: Callable[[str], str | None]) -> Refusal | None:
    """None when an action request comes from the panel's own page, else why not."""
    media = (header("content-type") or "").partition(";")[0].strip().lower()
    if media != "application/json":
        return Refusal(415, "a panel action is a JSON body (Content-Type: application/json)",
                       "unsupported_media_type")
    if header(HEADER) is None:
        return Refusal(403, f"a panel action needs the {HEADER} header (sent by the panel's "
                       "own page)", "cross_site")
    site = header("sec-fetch-site")
    if site is not None and site.strip().lower() not in SAME_SITE:
        return Refusal(403, f"a panel action from another site ({site}) is refused",
                       "cross_site")
    origin = header("origin")
    host = header("host")
    if origin is not None and (host is None or origin.rstrip("/").lower() not in (
            f"http://{host}".lower(), f"https://{host}".lower())):
        return Refusal(403, f"a panel action from another origin ({origin}) is refused",
                       "cross_site")
    return None


def loopback(peer: str) -> bool:
    """Is the client on this machine? (IPv4-mapped IPv6 addresses count as IPv4.)"""
    try:
        address = ipaddress.ip_address(peer.partition("%")[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def model_name(value: object) -> str | Refusal:
    """A model's name as a request gives it: a string of the manifest's name characters."""
    if not isinstance(value, str) or not value:
        return Refusal(400, "'model' must name a model", "invalid_model")
    if len(value) > 255 or not NAME_RE.match(value):
        return Refusal(400, "'model' is not a model name (letters, digits, '.', '_', ':', "
                       "'-')", "invalid_model")
    return value


@dataclass(frozen=True)
class Action:
    """An action's body, validated: {"model": NAME} (pin: and "pinned": true|false)."""

    kind: str
    model: str
    pinned: bool | None = None


def action(kind: str, body: bytes) -> Action | Refusal:
    if kind not in ACTIONS:
        return Refusal(404, f"no panel action '{kind}' (load, unload, pin)", "not_found")
    try:
        data = lightjson.loads(body or b"null")
    except (ValueError, UnicodeDecodeError):
        return Refusal(400, "the body is not JSON", "invalid_json")
    if not isinstance(data, dict):
        return Refusal(400, 'the body must be a JSON object: {"model": "NAME"}',
                       "invalid_json")
    unknown = set(data) - {"model", "pinned"}
    if unknown:
        return Refusal(400, f"unknown field(s): {', '.join(sorted(unknown))}", "invalid_field")
    name = model_name(data.get("model"))
    if isinstance(name, Refusal):
        return name
    pinned = data.get("pinned")
    if kind == "pin":
        if not isinstance(pinned, bool):
            return Refusal(400, "'pinned' must be true or false", "invalid_field")
        return Action(kind, name, pinned)
    if pinned is not None:
        return Refusal(400, f"'pinned' is for pin, not {kind}", "invalid_field")
    return Action(kind, name)


def lines(value: str | None, default: int = 50) -> int | Refusal:
    """A journal request's ?lines=N."""
    if value is None:
        return default
    if not value.isascii() or not value.isdigit() or not 1 <= int(value) <= MAX_LINES:
        return Refusal(400, f"'lines' must be a number from 1 to {MAX_LINES}", "invalid_lines")
    return int(value)
