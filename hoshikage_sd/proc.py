"""The one subprocess wrapper: argv lists, never a shell, checked, minimal environment."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping, Sequence

from hoshikage_sd.errors import die

# What a child may inherit. Everything else (LISTEN_FDS, NOTIFY_SOCKET, ...) is ours alone.
_KEEP = ("PATH", "LANG", "LC_ALL", "TZ", "HOME", "SYSTEMD_LOG_LEVEL")
#: the Debian package of a program hoshikage runs that a system may lack (the hint)
PACKAGES = {"age": "age", "age-keygen": "age", "systemd-creds": "systemd",
            "journalctl": "systemd", "systemctl": "systemd"}


def minimal_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: os.environ[k] for k in _KEEP if k in os.environ}
    env.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    if extra:
        env.update(extra)
    return env


def server_env(manifest_env: Mapping[str, str]) -> dict[str, str]:
    """llama-server's environment, when this process (the model unit's) starts it:
    minimal_env, the unit's variables that protocol.passed_env lets through (a GPU's
    selection and drivers), and the manifest's `env:` over both. The launcher does the same
    with the router's ticket (minimal_env and the manifest's env) and its own environment."""
    from hoshikage_sd.protocol import passed_env

    env = minimal_env()
    env.update((k, v) for k, v in os.environ.items() if passed_env(k))
    env.update(manifest_env)
    return env


def run(
    argv: Sequence[str],
    *,
    check: bool = True,
    capture: bool = True,
    timeout: float | None = None,
    env: Mapping[str, str] | None = None,
    input: str | None = None,
) -> subprocess.CompletedProcess[str]:
    try:
        result = subprocess.run(
            list(argv),
            input=input,
            check=False,
            text=True,
            capture_output=capture,
            timeout=timeout,
            env=minimal_env(env),
        )
    except FileNotFoundError:
        package = PACKAGES.get(os.path.basename(argv[0]))
        die(f"{argv[0]} is not installed or not on PATH",
            hint=f"apt install {package}" if package else None)
    except subprocess.TimeoutExpired:
        die(f"{' '.join(argv)} did not finish within {timeout} s")
    if check and result.returncode != 0:
        detail = (result.stderr or "").strip().splitlines()
        die(f"{' '.join(argv)} failed (exit {result.returncode})"
            + (f": {detail[-1]}" if detail else ""))
    return result
