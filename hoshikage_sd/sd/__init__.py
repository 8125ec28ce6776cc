"""Speaking to systemd: units.py (hoshikage's units, through bus.py: PID 1 over D-Bus),
daemon.py (sd_notify and socket activation) and journal.py (structured records)."""
