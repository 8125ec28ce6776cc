"""`hoshikage check`'s word on models that can never load for want of memory: one whose
estimate (× safety_margin, as admission counts it) is above memory_budget, or above this
machine's RAM, is refused on every request ("cannot fit")."""

from __future__ import annotations

import math

from hoshikage_sd import fmt
from hoshikage_sd.manifest import Config


def problems(config: Config) -> list[str]:
    from hoshikage_sd.admit import needs
    from hoshikage_sd.host import memory

    total = memory()[1]
    found = []
    for model in config.models.values():
        need = math.ceil(needs.estimate(model) * config.safety_margin)  # as admission
        if not need:
            continue  # no file to estimate from: said elsewhere
        said = f"model {model.name} needs {fmt.size(need)} (its estimate × safety_margin " \
               f"{config.safety_margin:g})"
        if config.memory_budget is not None and need > config.memory_budget:
            found.append(f"{said}, more than memory_budget {fmt.size(config.memory_budget)}: "
                         "it can never load")
        elif need > total:
            found.append(f"{said}, more than this machine's RAM ({fmt.size(total)}): it can "
                         "never load (README \"Memory\")")
    return found
