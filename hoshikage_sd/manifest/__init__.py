"""The manifest: what models there are, what they are called, and the policy's knobs.

model.py holds the dataclasses, parse.py reads models.yaml into them (nodes.py: node-by-node
YAML with line numbers), names.py lays the CLI's aliases and tags (names.json) over them.
"""

from hoshikage_sd.manifest.model import (
    NAME_RE,
    AmbiguousModel,
    Cache,
    CachePolicy,
    Config,
    Model,
    Weights,
)
from hoshikage_sd.manifest.nodes import parse_duration, parse_size
from hoshikage_sd.manifest.parse import (
    DEFAULT_PATH,
    ConfigError,
    config_path,
    load,
    model_name_for,
    parse,
    scan_sources,
)

__all__ = [
    "DEFAULT_PATH", "NAME_RE", "AmbiguousModel", "Cache", "CachePolicy", "Config",
    "ConfigError", "Model", "Weights", "config_path", "load", "model_name_for", "parse",
    "parse_duration", "parse_size", "scan_sources",
]
