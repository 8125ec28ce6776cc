"""access.refusal: what the service user may read and run, judged from permission bits."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from hoshikage_sd.commands.access import User, refusal

ROOT = User("root", 0, frozenset({0}))
OTHER = User("hoshikage", 4343, frozenset({4343}))


@pytest.fixture
def directory() -> Iterator[Path]:
    """A directory every user can reach (pytest's tmp_path sits in a 0700 one)."""
    path = Path(tempfile.mkdtemp(prefix="hoshikage-access-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


def group_member(path: Path) -> User:
    return User("hoshikage", 4242, frozenset({path.stat().st_gid}))


def test_read_run_and_enter(directory: Path) -> None:
    model = directory / "m.gguf"
    model.write_bytes(b"GGUF")
    model.chmod(0o640)
    assert refusal(group_member(model), model, 4) is None
    assert refusal(OTHER, model, 4) == f"hoshikage may not read {model}"
    assert refusal(ROOT, model, 4) is None
    model.chmod(0o644)
    assert refusal(OTHER, model, 4) is None
    assert refusal(OTHER, model, 5) == f"hoshikage may not run {model}"
    directory.chmod(0o750)
    assert refusal(OTHER, model, 4) == f"hoshikage may not enter {directory}"
    assert refusal(group_member(model), model, 4) is None
    directory.chmod(0o755)
    assert "No such file" in str(refusal(OTHER, directory / "absent", 4))


def test_owner_bits_decide_for_the_owner(directory: Path) -> None:
    server = directory / "llama-server"
    server.write_text("#!/bin/sh\n")
    server.chmod(0o055)  # the owner itself may not: the kernel does not fall through to group
    owner = User("hoshikage", server.stat().st_uid or 4242, frozenset({4242}))
    if server.stat().st_uid == 0:
        os.chown(server, owner.uid, -1)
    assert refusal(owner, server, 5) == f"hoshikage may not run {server}"
    assert refusal(OTHER, server, 5) is None


def test_a_snapshot_link_is_judged_through_its_target_too(directory: Path) -> None:
    """A Hugging Face snapshot's file is a symlink into blobs/: a blobs/ the user may not
    enter keeps it out, though the snapshot's folders are open."""
    blobs, snapshot = directory / "blobs", directory / "snapshots" / "rev"
    blobs.mkdir()
    snapshot.mkdir(parents=True)
    (blobs / "0a1b").write_bytes(b"GGUF")
    (blobs / "0a1b").chmod(0o644)
    link = snapshot / "m.gguf"
    link.symlink_to("../../blobs/0a1b")
    assert refusal(OTHER, link, 4) is None
    blobs.chmod(0o700)
    assert refusal(OTHER, link, 4) == f"hoshikage may not enter {blobs}"
