"""The manifest: what models there are, what they are called, and the policy's knobs.

model.py holds the dataclasses, parse.py reads models.yaml into them (nodes.py: node-by-node
YAML with line numbers), names.py lays the CLI's aliases and tags (names.json) over them,
codec.py turns a Config into JSON and back (for hoshikage_sd/lastgood.py: the router's last
good manifest, kept for the programs that start often).

The parser (and PyYAML with it) is imported on first use of one of its names: a program that
finds the router's last good manifest current (lastgood.py) never needs it. (The parse
function is manifest.parse.parse: `manifest.parse` is that module.)
"""

from typing import TYPE_CHECKING, Any

from hoshikage_sd.manifest.model import (
    DEFAULT_PATH,
    NAME_RE,
    AmbiguousModel,
    Cache,
    CachePolicy,
    Config,
    Files,
    Model,
    Source,
    Weights,
    Worker,
    config_path,
    model_files,
)

if TYPE_CHECKING:
    from hoshikage_sd.manifest.nodes import parse_duration, parse_size
    from hoshikage_sd.manifest.parse import ConfigError, load
    from hoshikage_sd.manifest.sources import model_name_for, scan_sources

_LAZY = {"parse_duration": "nodes", "parse_size": "nodes", "ConfigError": "parse",
         "load": "parse", "model_name_for": "sources",
         "scan_sources": "sources"}

__all__ = [
    "DEFAULT_PATH", "NAME_RE", "AmbiguousModel", "Cache", "CachePolicy", "Config",
    "ConfigError", "Files", "Model", "Source", "Weights", "Worker", "config_path", "load",
    "model_files",
    "model_name_for", "parse_duration", "parse_size", "scan_sources",
]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
