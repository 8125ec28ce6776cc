"""Names given from the CLI (`hoshikage alias …`, `hoshikage tag …`), kept apart from the
manifest the operator writes: /var/lib/hoshikage/names.json, replaced atomically.

They lay over the manifest: an added alias or a moved tag wins; a name that would clash with
the manifest's is refused when given, and skipped with a warning if the manifest changed since.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from hoshikage_sd.errors import HoshikageError, die
from hoshikage_sd.files import write_atomic
from hoshikage_sd.manifest import NAME_RE, Config, Model

VERSION = 1


@dataclass
class Names:
    aliases: dict[str, str] = field(default_factory=dict)  # alias → model
    removed: list[str] = field(default_factory=list)       # manifest aliases taken away
    tags: dict[str, str] = field(default_factory=dict)     # tag → model


def path(config: Config) -> Path:
    return config.state_dir / "names.json"


def load(config: Config) -> Names:
    """The CLI's names; HoshikageError (file, line where JSON says, what is wrong) for a
    file that is not JSON or not of this shape."""
    where = path(config)
    try:
        data = json.loads(where.read_text())
    except FileNotFoundError:
        return Names()
    except json.JSONDecodeError as exc:
        die(f"{where}:{exc.lineno}: not valid JSON: {exc.msg}", hint="fix or remove the file")
    except (OSError, ValueError) as exc:
        die(f"cannot read {where}: {exc}", hint="fix or remove the file")
    if not isinstance(data, dict):
        die(f"{where}: must be a JSON object, not {type(data).__name__}",
            hint="fix or remove the file")
    mappings = {}
    for key in ("aliases", "tags"):
        value = data.get(key, {})
        if not isinstance(value, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
            die(f"{where}: '{key}' must be an object of names to model names",
                hint="fix or remove the file")
        mappings[key] = dict(value)
    removed = data.get("removed", [])
    if not isinstance(removed, list) or not all(isinstance(r, str) for r in removed):
        die(f"{where}: 'removed' must be a list of names", hint="fix or remove the file")
    return Names(aliases=mappings["aliases"], removed=list(removed), tags=mappings["tags"])


def save(config: Config, names: Names) -> None:
    config.state_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(path(config), json.dumps({"version": VERSION, **dataclasses.asdict(names)},
                                          indent=2, sort_keys=True) + "\n")


def apply(config: Config, names: Names) -> Config:
    """The manifest with the CLI's names laid over it."""
    models = dict(config.models)
    warnings = list(config.warnings)
    taken = {a for m in models.values() for a in m.aliases} | set(models)

    def update(name: str, **changes: tuple[str, ...]) -> None:
        models[name] = dataclasses.replace(models[name], **changes)  # type: ignore[arg-type]

    for alias in names.removed:
        for model in list(models.values()):
            if alias in model.aliases:
                update(model.name, aliases=tuple(a for a in model.aliases if a != alias))
    for alias, target in names.aliases.items():
        if target not in models or alias in taken:
            warnings.append(f"{path(config)}: alias '{alias}' for '{target}' skipped: "
                            + ("no such model" if target not in models else "name taken"))
            continue
        update(target, aliases=(*models[target].aliases, alias))
        taken.add(alias)
    for tag, target in names.tags.items():
        if target not in models:
            warnings.append(f"{path(config)}: tag '{tag}' for '{target}' skipped: no such model")
            continue
        for model in list(models.values()):
            if tag in model.tags:
                update(model.name, tags=tuple(t for t in model.tags if t != tag))
        update(target, tags=(*models[target].tags, tag))
    return dataclasses.replace(config, models=models, warnings=tuple(warnings))


def effective(config: Config) -> Config:
    """What every command and the router use: the manifest, with the CLI's names over it."""
    try:
        return apply(config, load(config))
    except HoshikageError as err:
        return dataclasses.replace(config, warnings=(*config.warnings, err.message))


def _model(config: Config, name: str) -> Model:
    model = config.models.get(name) or next(
        (m for m in config.models.values() if name in m.aliases), None)
    if model is None:
        die(f"no model named '{name}'", hint="hoshikage list shows the names")
    return model


def _valid(kind: str, name: str) -> None:
    if not NAME_RE.match(name):
        die(f"'{name}' is not a valid {kind} (letters, digits, '.', '_', ':', '-')")


def add_alias(config: Config, model_name: str, alias: str) -> str:
    _valid("alias", alias)
    model = _model(config, model_name)
    if alias in config.models or any(alias in m.aliases for m in config.models.values()):
        die(f"'{alias}' already names a model")
    names = load(config)
    names.aliases[alias] = model.name
    if alias in names.removed:
        names.removed.remove(alias)
    save(config, names)
    return f"alias '{alias}' → {model.name}"


def remove_alias(config: Config, alias: str) -> str:
    owner = next((m for m in config.models.values() if alias in m.aliases), None)
    if owner is None:
        die(f"'{alias}' is not an alias")
    names = load(config)
    if names.aliases.pop(alias, None) is None:
        names.removed.append(alias)  # the manifest's own: hide it
    save(config, names)
    return f"alias '{alias}' removed from {owner.name}"


def set_tag(config: Config, tag: str, model_name: str) -> str:
    _valid("tag", tag)
    model = _model(config, model_name)
    names = load(config)
    names.tags[tag] = model.name  # one write: the tag moves atomically
    save(config, names)
    return f"tag '{tag}' → {model.name}"
