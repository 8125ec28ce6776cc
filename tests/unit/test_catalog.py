"""The journal's catalog (catalog/hoshikage.catalog): an entry for every MESSAGE_ID that
log.py sends, in systemd's format, so that `journalctl -x` explains hoshikage's records."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from hoshikage_sd.log import MESSAGE_IDS

CATALOG = Path(__file__).resolve().parents[2] / "catalog" / "hoshikage.catalog"
ENTRY = re.compile(r"^-- ([0-9a-f]{32})$")


def entries(text: str) -> dict[str, list[str]]:
    """Each entry's lines (headers, blank line, body) by its ID, as systemd's catalog.c
    reads the file: '#' lines are comments, '-- ID' starts an entry."""
    out: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        match = ENTRY.match(line)
        if match:
            assert match[1] not in out, f"{match[1]} twice"
            current = out[match[1]] = []
        elif current is not None:
            current.append(line)
        else:
            assert not line.strip(), f"text before the first entry: {line!r}"
    return out


def test_every_message_id_is_fresh_and_distinct() -> None:
    ids = list(MESSAGE_IDS.values())
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
    # random IDs: not a series that differs in its last bytes
    assert len({i[:16] for i in ids}) == len(ids)
    # version 4 (random) UUIDs, as systemd-id128 new makes them
    assert all(i[12] == "4" and i[16] in "89ab" for i in ids)


def test_every_message_id_has_a_catalog_entry_in_systemd_s_format() -> None:
    found = entries(CATALOG.read_text())
    assert set(found) == set(MESSAGE_IDS.values())
    for mid, lines in found.items():
        blank = lines.index("")
        headers = dict(h.split(": ", 1) for h in lines[:blank])
        assert {"Subject", "Defined-By"} <= set(headers), mid
        assert headers["Defined-By"] == "hoshikage"
        body = "\n".join(lines[blank + 1 :]).strip()
        assert body, f"{mid} has no text"


@pytest.mark.skipif(shutil.which("journalctl") is None, reason="no journalctl")
def test_journalctl_reads_the_catalog(tmp_path: Path) -> None:
    """journalctl builds its index from the file, as the package's trigger does, on a root of
    the test's own, and lists every entry with its subject."""
    catalog = tmp_path / "usr/lib/systemd/catalog"
    catalog.mkdir(parents=True)
    (tmp_path / "var/lib/systemd/catalog").mkdir(parents=True)
    shutil.copy(CATALOG, catalog)
    done = subprocess.run(["journalctl", f"--root={tmp_path}", "--update-catalog"],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0 and not done.stderr, done.stderr
    listed = subprocess.run(["journalctl", f"--root={tmp_path}", "--list-catalog"],
                            capture_output=True, text=True, check=True).stdout
    subjects = dict(line.split(" ", 1) for line in listed.splitlines())
    for kind, mid in MESSAGE_IDS.items():
        assert subjects.get(mid, "").startswith("hoshikage: "), kind
