"""What an encrypted model's load checks before it may stop anyone: that its key opens it
and swap cannot take its plaintext to a disk (before admission), and, when the load would
stop other models, every chunk (the check before admission reads only the first and the
last: a load that fails on a chunk further in must not have evicted anyone)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from hoshikage_sd import encryption
from hoshikage_sd.errors import HoshikageError, die
from hoshikage_sd.manifest import Config


def check(config: Config, name: str, paths: Iterable[Path]) -> None:
    """Die with the reason when model `name`'s load cannot succeed."""
    risk = encryption.swap_risk(ramdisk_options=encryption.mount_options(config.ramdisk))
    if risk and not config.allow_plaintext_swap:
        die(f"model '{name}' is encrypted and swap on {risk} is not: its plaintext on "
            "the RAM disk could be swapped out to a disk",
            hint="encrypt the swap (or use zram), mount the RAM disk with noswap, or set "
                 "'allow_plaintext_swap: true' in the manifest (README \"Encrypted models\")")
    for path in paths:
        if encryption.named_or_encrypted(path):
            try:
                encryption.check_readable(path)
            except HoshikageError as err:
                die(f"model '{name}': {err.message}", hint=err.hint)


def verify(name: str, paths: Iterable[Path]) -> None:
    """Authenticate every chunk of model `name`'s encrypted files; die with the reason."""
    for path in paths:
        if encryption.named_or_encrypted(path):
            try:
                encryption.verify(path, encryption.plaintext_size(path))
            except HoshikageError as err:
                die(f"model '{name}': {err.message}", hint=err.hint)
