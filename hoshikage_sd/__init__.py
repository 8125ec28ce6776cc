"""hoshikage: local LLMs served the systemd way."""

__version__ = "0.2.0"
