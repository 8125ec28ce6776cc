"""`hoshikage check`: what is wrong or missing in the manifest and around it (llama-server,
the service user's access, encryption keys, the RAM disk's mount, RPC workers, the router's
keys and limits), and the GPU devices as the model units see them."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from hoshikage_sd import fmt
from hoshikage_sd.errors import HoshikageError
from hoshikage_sd.manifest import Config
from hoshikage_sd.sd import units

TYPE_CHECKING = False
if TYPE_CHECKING:
    from hoshikage_sd.devices import Device


def service_user_problems(config: Config) -> list[str]:
    """What the units' user (not the caller, often root) cannot run or read."""
    from hoshikage_sd.commands import access

    user = access.service_user()
    if user is None:
        return []
    problems = []
    if os.access(config.llama_server, os.X_OK):
        why = access.refusal(user, config.llama_server, 5)
        if why:
            problems.append(f"llama_server: {why} (the units run as {user.name})")
    from hoshikage_sd.manifest import model_files

    for model in config.models.values():
        for path in model_files(model):
            why = access.refusal(user, path, 4) if path.exists() else None
            if why:
                problems.append(f"model {model.name}: {why} (give it the group: chgrp "
                                f"{user.name} FILE and chmod g+r FILE, g+x on directories)")
                break
    return problems


def check(config: Config, as_json: bool = False) -> int:
    """The manifest parsed already (errors raised: check_source); report what is wrong or
    missing. Exit 1 on any problem, a warning too (a missing llama-server or model file
    fails every load that needs it); notes are facts, not problems."""
    found = findings(config)
    if as_json:
        print(json.dumps({"config": str(config.source), "ok": not found["warnings"],
                          "models": list(config.models), **found}, indent=2))
        return 1 if found["warnings"] else 0
    colour = fmt.use_colour(sys.stdout)
    for line in found["warnings"]:
        print(fmt.paint("warning:", "33", colour), line)
    print(f"{config.source}: {len(config.models)} model(s): "
          + ", ".join(m.name + (f" ({', '.join(m.aliases)})" if m.aliases else "")
                      for m in config.models.values()))
    for line in found["notes"]:
        print(f"note: {line}")
    for line in found["devices"]:
        print(line)
    if found["warnings"]:
        print(f"{len(found['warnings'])} problem(s)", file=sys.stderr)
        return 1
    return 0


def check_source(path: Path | None, as_json: bool) -> int:
    """`hoshikage check [--json]`: a manifest that does not parse is its one problem (as
    JSON too, with --json: a script reads the reason, not a traceback)."""
    from hoshikage_sd import manifest
    from hoshikage_sd.manifest import names

    try:
        config = names.effective(manifest.load(path))
    except HoshikageError as err:
        if not as_json:
            if isinstance(err, manifest.ConfigError):
                err.hint = None  # "run 'hoshikage check' after editing": this is it
            raise
        print(json.dumps({"config": str(path or manifest.config_path()), "ok": False,
                          "models": [], "errors": [err.message], "warnings": [],
                          "notes": [], "devices": [], "gpus": []}, indent=2))
        return err.code
    return check(config, as_json)


def findings(config: Config) -> dict[str, list[Any]]:
    """check's findings: "warnings" (problems: the exit status), "notes", and "devices"
    (device_report's lines, its warnings also among the warnings)."""
    problems = list(config.warnings)
    if not os.access(config.llama_server, os.X_OK):
        problems.append(f"{config.source}: llama_server {config.llama_server} is not an "
                        "executable file")
    problems += service_user_problems(config)
    from hoshikage_sd import encryption

    problems += encryption.check_problems(config)
    from hoshikage_sd.commands import mounts

    problems += mounts.problems(config)  # the model unit waits for the ramdisk's mount
    from hoshikage_sd.rpc import check as rpc_check

    problems += rpc_check.problems(config)  # RPC workers down or out of the units' reach
    from hoshikage_sd.router import checks

    problems += checks.problems(config)  # API keys, models' own keys, limits, preload
    from hoshikage_sd import cache
    from hoshikage_sd.commands import fits

    problems += cache.check_problems(config) + fits.problems(config)
    notes = []
    if not os.path.ismount(config.ramdisk):
        notes.append(f"RAM disk {config.ramdisk} is not mounted now (mnt-hoshikage.mount "
                     "mounts it on first use)")
    from hoshikage_sd.commands import environment

    notes += environment.report(config, environment.unit_environment())
    seen: dict[str, list[Device]] = {}
    devices = device_report(config, seen)
    problems += [line.removeprefix("warning: ") for line in devices
                 if line.startswith("warning: ")]
    problems += argument_problems(config, seen)
    listed: dict[str, dict[str, Any]] = {}
    for name, found in seen.items():
        for d in found:
            entry = listed.setdefault(d.name, {"name": d.name, "description": d.description,
                                               "total_bytes": d.total, "free_bytes": d.free,
                                               "models": []})
            entry["models"].append(name)
    return {"errors": [], "warnings": problems, "notes": notes,
            "devices": [line for line in devices if not line.startswith("warning: ")],
            "gpus": list(listed.values())}


def argument_problems(config: Config, seen: dict[str, list[Device]]) -> list[str]:
    """What llama-server would refuse in each model's file and arguments, found as the
    estimates read them: a file that is no GGUF, a bad number, a device `--device` names
    that llama-server does not list for it (`seen`: the devices listed for each model), a
    bad `--tensor-split`. Encrypted models are encryption.check_problems'."""
    from hoshikage_sd import gguf, memory, offload
    from hoshikage_sd.encryption import named_or_encrypted
    from hoshikage_sd.manifest import model_files

    problems = []
    for model in config.models.values():
        files = (model.path, *model.shards)
        if model.backend != "llama-server" or named_or_encrypted(model.path) \
                or not all(p.is_file() for p in model_files(model)):
            continue  # a missing file is the manifest's warning already
        try:
            info = gguf.read_model_info(files)
            if model.mmproj is not None and \
                    (arch := gguf.architecture(model.mmproj)) != "clip":
                problems.append(f"model {model.name}: mmproj {model.mmproj} is a model "
                                f"({arch}), not a projector (clip)")
            params = memory.load_params(info, model.effective_args)
            placed = offload.offload_params(model.effective_args)
            if model.name in seen:
                offload.device_estimate(info, params, placed, seen[model.name])
        except HoshikageError as err:
            problems.append(f"model {model.name}: {err.message}")
    return problems


def device_report(config: Config, seen: dict[str, list[Device]] | None = None) -> list[str]:
    """`check`'s lines on the devices llama-server can offload to: `llama-server
    --list-devices` run as the model units' user (uid, Group=, its groups and the unit's
    SupplementaryGroups=) with the environment the units give it (the model unit's passed
    variables and each model's env:); where it sees none but the machine has GPU device
    nodes, what keeps that user from them and the fix. `seen`: filled with the devices
    listed for each model."""
    import grp

    from hoshikage_sd import devices
    from hoshikage_sd.commands import access, environment
    from hoshikage_sd.protocol import passed_env

    if not os.access(config.llama_server, os.X_OK):
        return []
    try:
        shown = units.show(environment.PROBE_UNIT, "SupplementaryGroups")
        unit_env = environment.unit_environment() or {}
    except HoshikageError:  # no systemctl here
        shown, unit_env = {}, {}
    base = {k: v for k, v in unit_env.items() if passed_env(k)}
    envs: dict[tuple[tuple[str, str], ...], list[str]] = {}
    for model in config.models.values():
        envs.setdefault(tuple(sorted({**base, **model.environment}.items())),
                        []).append(model.name)
    user = access.service_user()
    gids = set(user.gids) if user else set()
    lines = []
    for name in shown.get("SupplementaryGroups", "").split():
        try:
            gids.add(grp.getgrnam(name).gr_gid)
        except KeyError:
            lines.append(f"warning: {environment.PROBE_UNIT}'s SupplementaryGroups= names "
                         f"group '{name}', which this machine does not have: every model "
                         "unit fails to start (status=216/GROUP); create it, or take it out "
                         "of the drop-in (systemctl edit hoshikage-model@.service)")
    runner: list[str] = []
    if user is not None and os.geteuid() == 0:
        try:
            gid = grp.getgrnam(access.SERVICE_USER).gr_gid  # the units' Group=
        except KeyError:
            gid = min(user.gids)
        runner, who = devices.as_user(user.uid, gid, gids), user.name
    else:
        who = "this user"
        lines.append(f"note: devices are listed as this user, not {user.name}: run "
                     "`hoshikage check` as root to see what the model units see"
                     if user is not None else
                     f"note: there is no user {access.SERVICE_USER} here (the package makes "
                     "it): devices are listed as this user, not as the model units' user")
    for env, names in (envs or {tuple(sorted(base.items())): []}).items():
        label = f" for {', '.join(names)}" if len(envs) > 1 else ""
        try:
            found = devices.list_devices(config.llama_server, dict(env), runner=runner)
        except HoshikageError as err:
            lines.append(f"warning: llama-server --list-devices{label}: {err.message}"
                         + (f" ({err.hint})" if err.hint else ""))
            continue
        lines += [f"device {d.name}{label}: {d.description}, {fmt.size(d.total)} "
                  f"({fmt.size(d.free)} free)" for d in found]
        if seen is not None:
            seen.update((name, found) for name in names)
        if found:
            continue
        lines.append(f"note: llama-server (as {who}) sees no GPU{label}: its models run on "
                     "the CPU")
        if user is not None and devices.has_nodes():
            lines += [f"warning: {p}" for p in devices.node_problems(user.name, user.uid, gids)]
    return lines
