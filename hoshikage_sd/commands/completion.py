"""Bash completion's candidates beyond argparse's own: the manifest's model names, aliases and
tags for the arguments that take a model. Imported only while completing (cli.complete): the
manifest is read on each TAB, never on a normal start."""

from __future__ import annotations

import argparse
from pathlib import Path

#: command -> the dest of its argument that names a model (as `hoshikage load` takes one)
MODEL_ARGUMENTS = {"load": "name", "unload": "name", "logs": "name", "tag": "model",
                   "pin": "model", "unpin": "model", "alias": "names"}


def model_names(config: str | None = None) -> list[str]:
    """Every name a model answers to in the manifest (`config`, else the default one):
    names, aliases and tags; none when it cannot be read (completion must not fail)."""
    from hoshikage_sd import manifest
    from hoshikage_sd.errors import HoshikageError
    from hoshikage_sd.manifest import names

    try:
        loaded = names.effective(manifest.load(Path(config) if config else None))
    except (HoshikageError, OSError):
        return []
    return sorted({n for m in loaded.models.values() for n in (m.name, *m.aliases, *m.tags)})


def complete_model(prefix: str, parsed_args: argparse.Namespace | None = None,
                   **_: object) -> list[str]:
    """argcomplete's completer (it passes the word so far and what is parsed of the line:
    --config among it)."""
    config = getattr(parsed_args, "config", None)
    return [n for n in model_names(config) if n.startswith(prefix)]


def attach(parser: argparse.ArgumentParser) -> None:
    """Give the model arguments of `parser`'s commands the model-name completer."""
    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        for command, dest in MODEL_ARGUMENTS.items():
            sub = action.choices.get(command)
            for argument in sub._actions if sub is not None else ():
                if argument.dest == dest:
                    argument.completer = complete_model  # argcomplete reads it
