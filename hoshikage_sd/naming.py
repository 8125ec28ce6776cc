"""What a model name can mean among a table of names: the one rule for the manifest
(manifest.Config.matches, which resolve.py decides with), the CLI, and the head start's
name index (router/headstart/index.py), which keeps the table this module reads.

Built-in types only: the head start imports it before the router's own imports.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing would be on the head start when nothing loaded it
if TYPE_CHECKING:
    from collections.abc import Sequence

    #: a model's names: (name, aliases, tags)
    Entry = tuple[str, Sequence[str], Sequence[str]]


def matches(name: str, table: Sequence[Entry]) -> list[int]:
    """The positions in `table` of the models `name` can mean, by the first rule that
    matches any: exact name, alias, tag, then partial matches of a name or an alias,
    case-insensitive, by a part with a letter or a digit in it (several only in that last
    case; resolve.py decides between them)."""
    for i, (own, _, _) in enumerate(table):
        if own == name:
            return [i]
    for field in (1, 2):  # aliases, then tags
        for i, entry in enumerate(table):
            if name in entry[field]:
                return [i]
    needle = name.lower()
    if not any(ch.isalnum() for ch in needle):
        return []  # "-" or "." is in most names: a part of one says which
    return [i for i, (own, aliases, _) in enumerate(table)
            if any(needle in n.lower() for n in (own, *aliases))]
