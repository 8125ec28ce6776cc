"""A request's (or the CLI's) model name to one model: the one resolution everybody uses.

Exact name, alias, tag, then a partial match; several partial matches: the highest-ranked
model wins (ranks from the usage statistics, the same the eviction order uses; ties by
name), or AmbiguousModel with strict_names. The router and the CLI call resolve(); the
router's head start for the waking request looks the name up in its index
(router/headstart/index.py) with the same rule (naming.matches) over the manifest's own name
table, so one name never means two models.
"""

from __future__ import annotations

from hoshikage_sd.manifest import AmbiguousModel, Config, Model


def resolve(config: Config, name: str | None) -> Model | None:
    """The model `name` means (None or "": the default model), or None when none matches."""
    if not name:
        return config.default()
    candidates = config.matches(name)
    if len(candidates) <= 1:
        return candidates[0] if candidates else None
    if config.strict_names:
        raise AmbiguousModel(name, sorted(m.name for m in candidates))
    from hoshikage_sd.stats import StatsFile  # only here: not on the router's start

    ranks = StatsFile(config.state_dir).ranks(w=config.weights)
    return max(candidates, key=lambda m: (ranks.get(m.name, 0.0), m.name))
