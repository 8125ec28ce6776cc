"""Speaking to systemd: units.py (hoshikage's units, through bus.py: PID 1 over D-Bus) and
daemon.py (sd_notify and socket activation). Journal records go through python-systemd's
JournalHandler (log.py)."""
