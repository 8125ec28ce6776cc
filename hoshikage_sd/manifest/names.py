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

from hoshikage_sd import statefile
from hoshikage_sd.errors import die
from hoshikage_sd.files import write_atomic
from hoshikage_sd.manifest import NAME_RE, Config, Model

VERSION = 1


@dataclass
class Names:
    aliases: dict[str, str] = field(default_factory=dict)  # alias → model
    removed: list[str] = field(default_factory=list)       # manifest aliases taken away
    tags: dict[str, str] = field(default_factory=dict)     # tag → model
    pinned: dict[str, bool] = field(default_factory=dict)  # model → pinned (the panel's)


def path(config: Config) -> Path:
    return config.state_dir / "names.json"


def _mapping(data: dict[str, object], key: str, problems: list[str]) -> dict[str, str]:
    value = data.get(key, {})
    if not isinstance(value, dict):
        problems.append(f"'{key}' is {statefile.kind_of(value)}, not an object")
        return {}
    out = {}
    for name, target in value.items():
        if isinstance(target, str):
            out[name] = target
        else:
            problems.append(f"'{key}': '{name}' is {statefile.kind_of(target)}, "
                            "not a model name")
    return out


def parse(data: object) -> tuple[Names, list[str]]:
    """The decoded file: what is usable of it, and what is wrong with the rest."""
    if not isinstance(data, dict):
        return Names(), [f"expected an object, found {statefile.kind_of(data)}"]
    problems: list[str] = []
    aliases = _mapping(data, "aliases", problems)
    tags = _mapping(data, "tags", problems)
    pinned = data.get("pinned", {})
    if not isinstance(pinned, dict) or not all(isinstance(v, bool) for v in pinned.values()):
        problems.append("'pinned' is not an object of true/false")
        pinned = {}
    removed = data.get("removed", [])
    if not isinstance(removed, list):
        problems.append(f"'removed' is {statefile.kind_of(removed)}, not a list")
        removed = []
    elif not all(isinstance(r, str) for r in removed):
        problems.append("'removed' holds something other than names")
        removed = [r for r in removed if isinstance(r, str)]
    return Names(aliases=aliases, removed=removed, tags=tags, pinned=pinned), problems


def read(config: Config) -> tuple[Names, list[str]]:
    """The names file, validated: what is usable of it, and each problem as a sentence
    that names the file. A reader never fails on it."""
    data, problem = statefile.read_json(path(config))
    if problem is not None:
        return Names(), [f"cannot read {path(config)}: {problem}"]
    if data is None:
        return Names(), []
    names, problems = parse(data)
    return names, [f"{path(config)}: {p}; ignored" for p in problems]


def load(config: Config) -> Names:
    """For a change to the file: one with problems is not written over (it would lose what
    it holds); the operator fixes or removes it first."""
    names, problems = read(config)
    if problems:
        die("; ".join(problems), hint=f"fix or remove {path(config)}")
    return names


def save(config: Config, names: Names) -> None:
    config.state_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(path(config), json.dumps({"version": VERSION, **dataclasses.asdict(names)},
                                          indent=2, sort_keys=True) + "\n")


def apply(config: Config, names: Names) -> Config:
    """The manifest with the CLI's names laid over it."""
    models = dict(config.models)
    warnings = list(config.warnings)

    def update(name: str, **changes: tuple[str, ...]) -> None:
        models[name] = dataclasses.replace(models[name], **changes)  # type: ignore[arg-type]

    for alias in names.removed:
        for model in list(models.values()):
            if alias in model.aliases:
                update(model.name, aliases=tuple(a for a in model.aliases if a != alias))
    taken = {a for m in models.values() for a in m.aliases} | set(models)
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
    for name, pinned in names.pinned.items():
        if name in models:  # a model gone from the manifest: its pin waits for it
            models[name] = dataclasses.replace(models[name], pinned=pinned)
    return dataclasses.replace(config, models=models, warnings=tuple(warnings))


def effective(config: Config) -> Config:
    """What every command and the router use: the manifest, with the CLI's names over it.
    A names file of the wrong shape is reported (once per version) and what is usable of it
    applies: it never takes a reader down."""
    names, problems = read(config)
    for problem in problems:
        statefile.report(path(config), problem)
    applied = apply(config, names)
    return dataclasses.replace(applied, warnings=(*applied.warnings, *problems))


def _model(config: Config, name: str) -> Model:
    """The model `name` means, as a request's name is matched (name, alias, tag, a part of
    one); a part that several share is refused: a change that stays must name one."""
    found = config.matches(name)
    if not found:
        die(f"no model named {name!r}", hint="hoshikage list shows the names")
    if len(found) > 1:
        die(f"'{name}' is a part of several names: {', '.join(m.name for m in found)}",
            hint="name one of them")
    return found[0]


def _valid(kind: str, name: str) -> None:
    if not NAME_RE.match(name):
        die(f"'{name}' is not a valid {kind} (letters, digits, '.', '_', ':', '-')")


def taken(config: Config, word: str, but: Model | None = None) -> str | None:
    """What `word` names already, but for case (a name or an alias of a model other than
    `but`, or a tag), as a sentence's end; None when nothing. A request is resolved by name,
    then alias, then tag, then in part and in any case: a word that is one of these already
    would take a request from it, or never be reached."""
    low = word.lower()
    for model in config.models.values():
        if model is but:
            continue
        if model.name.lower() == low:
            return f"the name of model '{model.name}'"
        alias = next((a for a in model.aliases if a.lower() == low), None)
        if alias is not None:
            return f"an alias ('{alias}') of '{model.name}'"
    for model in config.models.values():
        tag = next((t for t in model.tags if t.lower() == low), None)
        if tag is not None:
            return f"the tag '{tag}' (on '{model.name}')"
    return None


def add_alias(config: Config, model_name: str, alias: str) -> str:
    _valid("alias", alias)
    model = _model(config, model_name)
    if (what := taken(config, alias, but=model)) is not None or alias == model.name:
        die(f"'{alias}' is already {what or 'its name'}",
            hint="an alias that names another model, or a tag, would take its requests")
    if alias in model.aliases:
        return f"alias '{alias}' → {model.name} (already)"
    names = load(config)
    if alias in names.removed and _manifest_owner(config, alias) == model.name:
        names.removed.remove(alias)  # the manifest's own, given back
    else:
        names.aliases[alias] = model.name
    save(config, names)
    return f"alias '{alias}' → {model.name}"


def _manifest_owner(config: Config, alias: str) -> str | None:
    """The model the manifest itself gives `alias` (names.json's removals aside)."""
    from hoshikage_sd.manifest import load as load_manifest

    return next((m.name for m in load_manifest(config.source).models.values()
                 if alias in m.aliases), None)


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
    what = taken(config, tag)
    if what is not None and not what.startswith("the tag "):  # a tag moves; a name stays
        die(f"'{tag}' is already {what}",
            hint="a name or an alias comes before a tag: a tag of that name would never apply")
    names = load(config)
    names.tags[tag] = model.name  # one write: the tag moves atomically
    save(config, names)
    return f"tag '{tag}' → {model.name}"


def set_pinned(config: Config, model_name: str, pinned: bool) -> str:
    """Pin or unpin a model over the manifest's `pinned:` (the panel's pin)."""
    model = _model(config, model_name)
    names = load(config)
    names.pinned[model.name] = pinned
    save(config, names)
    return f"{model.name} {'pinned' if pinned else 'unpinned'}"
