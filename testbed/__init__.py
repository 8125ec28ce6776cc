"""The test bed shared by tests/, bench/ and tools/demo: real systemd as PID 1 in
systemd-nspawn (container.py), hoshikage deployed into it (deploy.py), and an HTTP client
for unix sockets (unixhttp.py). Not shipped: the package is hoshikage_sd/ alone."""

from pathlib import Path

#: the repository root (bind it at this same path into containers: .venv names it)
REPO_ROOT = Path(__file__).resolve().parent.parent
