"""hoshikage: local LLMs served the systemd way."""

__version__ = "0.1.0"
