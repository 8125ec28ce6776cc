"""Preload: the models the manifest marks `preload: true` are started once a boot.

hoshikage-preload.service (enabled by the admin: `systemctl enable
hoshikage-preload.service`) starts the router at boot, as a request would through the
socket; the router starts each preload model as a request would (its fast path, its
admission, one at a time in the manifest's order, so each admission sees the ones before
it). The marker in /run/hoshikage (a tmpfs: empty after a boot) makes it once a boot: a
router started later (the socket, after an idle exit) does not load them again, and a
router that a request starts before hoshikage-preload.service does is the one that preloads.

Why the router and an opt-in unit: the router's start is hoshikage's one way to load a
model with its bookkeeping (ready, pools, the head start's index); a unit pulled in by the
socket would start a router at every boot and install even where no model is preloaded,
while an idle machine must run no hoshikage process. A preloaded model is then an ordinary
loaded model: its TTL applies unless it is also `pinned: true` (which the idle watch
honours too), and it can be unloaded by hand.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from hoshikage_sd.router.face import RouterFace

logger = logging.getLogger("hoshikage.router")

#: in the runtime directory: this boot's preload has been done (or is under way)
MARKER: Final = "preloaded"


def claim(runtime_dir: os.PathLike[str] | str) -> bool:
    """Is this the boot's first router (the marker made now)?"""
    try:
        fd = os.open(os.path.join(runtime_dir, MARKER), os.O_CREAT | os.O_EXCL | os.O_WRONLY,
                     0o640)
    except FileExistsError:
        return False
    except OSError as exc:  # no runtime directory: a test bed; nothing to preload from
        logger.debug("no preload: %s", exc)
        return False
    os.close(fd)
    return True


async def at_boot(router: RouterFace) -> list[str]:
    """Start the preload models if this is the boot's first router; the ones now serving."""
    from hoshikage_sd.router.errors import StartFailed

    if router.broken is not None:
        return []  # nothing can be started; the next router tries (the marker is not made)
    wanted = [m for m in router.config.models.values() if m.preload]
    if not claim(router.config.runtime_dir) or not wanted:
        return []
    done = []
    for model in wanted:
        logger.info("%s: preloading (preload: true)", model.name)
        try:
            await router.ensure(model)
        except StartFailed as exc:  # its unit's start-failed record says more
            logger.warning("%s: preload failed: %s", model.name, exc)
            continue
        done.append(model.name)
    logger.info("preloaded %d of %d model(s)%s", len(done), len(wanted),
                ": " + ", ".join(done) if done else "")
    return done
