"""Encrypted models (hoshikage_sd/encryption.py) with Debian's real `age`: sizes from the
ciphertext, decryption into a store, header reads from the first chunks, each failure's cause,
the swap rule, and `hoshikage keys setup` / `hoshikage encrypt`."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from hoshikage_sd import encryption, gguf
from hoshikage_sd.commands import keys
from hoshikage_sd.errors import HoshikageError
from hoshikage_sd.manifest import Files
from hoshikage_sd.manifest.model import Source
from hoshikage_sd.manifest.sources import scan
from hoshikage_sd.staging import Store

pytestmark = pytest.mark.skipif(shutil.which("age") is None, reason="age is not installed")


def make_model(path: Path, n_embd: int = 64) -> Path:
    import make_gguf  # tools/make_gguf.py (tests/conftest.py puts tools/ on the path)

    make_gguf.write_model(path, n_embd=n_embd, n_ff=2 * n_embd)
    return path


def keygen(path: Path) -> str:
    """An identity file at `path`; its recipient."""
    subprocess.run(["age-keygen", "-o", str(path)], check=True, capture_output=True)
    return subprocess.run(["age-keygen", "-y", str(path)], check=True, capture_output=True,
                          text=True).stdout.strip()


def seal(plain: Path, recipient: str, out: Path | None = None) -> Path:
    out = out or plain.with_name(plain.name + ".age")
    subprocess.run(["age", "-r", recipient, "-o", str(out), str(plain)], check=True)
    return out


@pytest.fixture
def key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """This process's credential (as a unit gets it); the recipient."""
    creds = tmp_path / "credentials"
    creds.mkdir()
    recipient = keygen(creds / encryption.CREDENTIAL)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    return recipient


@pytest.mark.parametrize("size", [0, 1, 65535, 65536, 65537, 3 * 65536, 200_001])
def test_plaintext_size_from_the_ciphertext_alone(tmp_path: Path, size: int) -> None:
    plain = tmp_path / "p"
    plain.write_bytes(os.urandom(size))
    sealed = seal(plain, keygen(tmp_path / "k"))
    assert encryption.is_encrypted(sealed) and not encryption.is_encrypted(plain)
    assert encryption.plaintext_size(sealed) == size


def test_not_age_and_truncated_headers(tmp_path: Path) -> None:
    other = tmp_path / "x.gguf"
    other.write_bytes(b"GGUF" + bytes(100))
    with pytest.raises(encryption.DecryptError, match="it is not an age file"):
        encryption.plaintext_size(other)
    half = tmp_path / "half.age"
    half.write_bytes(encryption.MAGIC + b"-> X25519 abc\n")
    with pytest.raises(encryption.DecryptError, match="damaged or truncated"):
        encryption.plaintext_size(half)


def test_decrypts_into_a_store_and_reuses_the_copy(tmp_path: Path, key: str) -> None:
    model = make_model(tmp_path / "m.gguf")
    sealed = seal(model, key)
    ram = tmp_path / "ram"
    ram.mkdir()
    store = Store(ram)
    seen: list[tuple[int, int]] = []
    staged = store.stage("m", sealed, lambda d, t: seen.append((d, t)))
    assert staged.copied and staged.size == model.stat().st_size
    assert (ram / "m.gguf").read_bytes() == model.read_bytes()
    assert seen[-1] == (staged.size, staged.size)
    assert store.reusable("m", sealed)
    assert not store.stage("m", sealed).copied
    assert not list(ram.glob(".m.gguf.tmp-*"))


def test_the_ssd_cache_keeps_ciphertext(tmp_path: Path, key: str) -> None:
    sealed = seal(make_model(tmp_path / "m.gguf"), key)
    cache = tmp_path / "cache"
    cache.mkdir()
    store = Store(cache, plaintext=False)
    store.stage("m", sealed)
    assert (cache / "m.gguf").read_bytes() == sealed.read_bytes()
    assert store.reusable("m", sealed)


def damaged(sealed: Path, how: str) -> Path:
    data = bytearray(sealed.read_bytes())
    if how == "tampered":
        data[len(data) // 2] ^= 0xFF
    elif how == "truncated":
        del data[len(data) - 1000:]
    out = sealed.with_name(f"{how}.gguf.age")
    out.write_bytes(bytes(data))
    return out


@pytest.mark.parametrize(("how", "cause"), [
    ("tampered", "damaged or truncated"),
    ("truncated", "damaged or truncated"),
    ("wrong key", "not encrypted to this machine's key"),
])
def test_each_failure_names_its_cause_and_leaves_nothing(tmp_path: Path, key: str, how: str,
                                                         cause: str) -> None:
    model = make_model(tmp_path / "m.gguf", n_embd=256)  # several chunks
    if how == "wrong key":
        bad = seal(model, keygen(tmp_path / "other"))
    else:
        bad = damaged(seal(model, key), how)
    ram = tmp_path / "ram"
    ram.mkdir()
    with pytest.raises(encryption.DecryptError, match=cause) as err:
        Store(ram).stage("m", bad)
    assert str(bad) in err.value.message and "AGE-SECRET-KEY" not in str(err.value)
    assert list(ram.iterdir()) == [ram / ".m.lock"]


def test_verify_finds_a_chunk_damaged_in_the_middle(tmp_path: Path, key: str) -> None:
    model = make_model(tmp_path / "m.gguf", n_embd=256)  # several chunks
    sealed = seal(model, key)
    size = encryption.plaintext_size(sealed)
    encryption.verify(sealed, size)
    bad = damaged(sealed, "tampered")
    encryption.check_readable(bad)  # its first and last chunks are whole
    with pytest.raises(encryption.DecryptError, match="damaged or truncated"):
        encryption.verify(bad, size)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["credentials", "m.gguf", sealed.name, bad.name])  # nothing written


def test_no_identity_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sealed = seal(make_model(tmp_path / "m.gguf"), keygen(tmp_path / "k"))
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path / "none"))
    monkeypatch.setattr(encryption, "PLAIN_IDENTITY", tmp_path / "none.key")
    monkeypatch.setattr(encryption, "SEALED_IDENTITY", tmp_path / "none.cred")
    with pytest.raises(HoshikageError, match="no age identity") as err:
        encryption.check_readable(sealed)
    assert err.value.hint and "keys setup" in err.value.hint


def test_the_header_is_read_from_the_first_chunks_only(tmp_path: Path, key: str,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    model = make_model(tmp_path / "m.gguf", n_embd=512)  # megabytes of tensor data
    sealed = seal(model, key)
    read: list[int] = []
    original = encryption.Plaintext.read

    def counted(self: encryption.Plaintext, n: int) -> bytes:
        data = original(self, n)
        read.append(len(data))
        return data

    monkeypatch.setattr(encryption.Plaintext, "read", counted)
    plain, enc = gguf.read_info(model), gguf.read_info(sealed)
    assert enc == plain.__class__(**{**plain.__dict__, "path": str(sealed)})
    assert sum(read) <= plain.data_offset + (1 << 20) < model.stat().st_size / 2


def test_swap_rule(tmp_path: Path) -> None:
    head = "Filename\tType\tSize\tUsed\tPriority\n"
    sys_block = tmp_path / "block"
    (sys_block / "dm-0" / "dm").mkdir(parents=True)
    (sys_block / "dm-0" / "dm" / "uuid").write_text("CRYPT-LUKS2-abc-swap\n")
    (sys_block / "dm-1" / "dm").mkdir(parents=True)
    (sys_block / "dm-1" / "dm" / "uuid").write_text("LVM-abc\n")
    risk = encryption.swap_risk
    assert risk(head, "rw,size=1g", sys_block) is None
    assert risk(head + "/dev/zram0 partition 1 0 100\n", "rw", sys_block) is None
    assert risk(head + "/dev/dm-0 partition 1 0 -2\n", "rw", sys_block) is None
    assert risk(head + "/dev/dm-1 partition 1 0 -2\n", "rw", sys_block) == "/dev/dm-1"
    assert risk(head + "/swapfile file 1 0 -2\n", "rw,size=1g", sys_block) == "/swapfile"
    assert risk(head + "/swapfile file 1 0 -2\n", "rw,noswap,size=1g", sys_block) is None


def test_sources_list_encrypted_models_by_their_gguf_name(tmp_path: Path) -> None:
    for name in ("plain.gguf", "secret.gguf.age", "big-00001-of-00002.gguf.age",
                 "big-00002-of-00002.gguf.age"):
        (tmp_path / name).write_bytes(b"x")
    found = scan((Source(tmp_path),)).found
    assert sorted(found) == ["big", "plain", "secret"]
    assert found["big"].shards == (tmp_path / "big-00002-of-00002.gguf.age",)


def test_recipients_file_keeps_backup_keys() -> None:
    first = keys.recipients_text("", "age1machine")
    assert first.splitlines() == [keys.MARK, "age1machine"]
    edited = first + "# backup\nage1backup\n"
    again = keys.recipients_text(edited, "age1new")
    assert again.splitlines() == [keys.MARK, "age1new", "# backup", "age1backup"]


@pytest.mark.skipif(os.geteuid() != 0, reason="keys setup is root's")
@pytest.mark.parametrize("plain", [True, False])
def test_keys_setup_then_encrypt_then_read(tmp_path: Path, plain: bool,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    if not plain and shutil.which("systemd-creds") is None:
        pytest.skip("no systemd-creds")
    root = tmp_path / "root"
    assert keys.setup(plain=plain, root=root) == 0
    etc = root / "etc/hoshikage"
    secret = etc / ("age-identity.key" if plain else "age-identity.cred")
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert not (etc / ("age-identity.cred" if plain else "age-identity.key")).exists()
    for unit in encryption.UNITS:
        dropin = (root / "etc/systemd/system" / f"{unit}.d" / encryption.DROPIN).read_text()
        assert f"{encryption.CREDENTIAL}:/etc/hoshikage/{secret.name}" in dropin
    with pytest.raises(HoshikageError, match="there is an age identity already"):
        keys.setup(plain=plain, root=root)
    model = make_model(tmp_path / "m.gguf")
    assert keys.encrypt(model, None, etc / "age-recipients") == 0
    sealed = tmp_path / "m.gguf.age"
    assert encryption.is_encrypted(sealed)
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    monkeypatch.setattr(encryption, "PLAIN_IDENTITY", etc / "age-identity.key")
    monkeypatch.setattr(encryption, "SEALED_IDENTITY", etc / "age-identity.cred")
    assert gguf.read_info(sealed).n_params == gguf.read_info(model).n_params
    with pytest.raises(HoshikageError, match="exists"):
        keys.encrypt(model, None, etc / "age-recipients")
    with pytest.raises(HoshikageError, match="encrypted already"):
        keys.encrypt(sealed, tmp_path / "x.age", etc / "age-recipients")
    assert not list(tmp_path.glob(".*.tmp-*"))


def test_encrypt_never_replaces_its_model_and_says_what_age_said(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--force onto the model itself turned it into ciphertext; age stopping (a directory
    that is not there, a full disk, a bad recipient) broke the pipe into a traceback."""
    model = make_model(tmp_path / "m.gguf")
    before = model.read_bytes()
    recipients = tmp_path / "recipients"
    recipients.write_text(keygen(tmp_path / "identity") + "\n")
    with pytest.raises(HoshikageError, match="is the model itself"):
        keys.encrypt(model, model, recipients, force=True)
    with pytest.raises(HoshikageError, match="is the model itself"):
        keys.encrypt(model, tmp_path / "." / "m.gguf", recipients, force=True)
    assert model.read_bytes() == before
    with pytest.raises(HoshikageError, match=r"age could not encrypt .*m\.gguf: ") as err:
        keys.encrypt(model, tmp_path / "nowhere" / "m.gguf.age", recipients)
    assert err.value.hint is None  # not the recipients' fault
    recipients.write_text("not a recipient\n")
    with pytest.raises(HoshikageError, match="age could not encrypt") as err:
        keys.encrypt(model, None, recipients)
    assert err.value.hint is not None and "age recipient" in err.value.hint
    assert not list(tmp_path.rglob(".*.tmp-*")) and model.read_bytes() == before


def test_every_shard_of_a_split_model_encrypts(tmp_path: Path) -> None:
    """A later shard has no header of its own: it was refused as 'not a model file'."""
    import make_gguf  # tools/, on the path by tests/conftest.py

    count = make_gguf.split_count(2, 8)
    first = tmp_path / f"s-00001-of-{count:05d}.gguf"
    make_gguf.write_model(first, split_max_tensors=8)
    recipients = tmp_path / "recipients"
    recipients.write_text(keygen(tmp_path / "identity") + "\n")
    for no in range(1, count + 1):
        shard = tmp_path / f"s-{no:05d}-of-{count:05d}.gguf"
        assert keys.encrypt(shard, None, recipients) == 0
        assert encryption.is_encrypted(shard.with_name(shard.name + ".age"))


def test_files_of_an_encrypted_model(tmp_path: Path, key: str) -> None:
    sealed = seal(make_model(tmp_path / "m.gguf"), key)
    assert Files.one(sealed).main == sealed


@pytest.mark.parametrize("allowed", [False, True])
def test_the_unit_refuses_plaintext_swap_unless_allowed(tmp_path: Path, key: str,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        allowed: bool) -> None:
    from hoshikage_sd import manifest
    from hoshikage_sd.model_unit import activate

    sealed = seal(make_model(tmp_path / "m.gguf"), key)
    model = manifest.Model("m", sealed, stage="never")
    ram = tmp_path / "ram"
    ram.mkdir()
    config = manifest.Config(source=tmp_path / "x.yaml", runtime_dir=tmp_path / "run",
                             ramdisk=ram, models={"m": model}, allow_plaintext_swap=allowed)
    monkeypatch.setattr(encryption, "swap_risk", lambda **_: "/dev/sda2")
    activator = activate.Activator(config, model)
    assert activator.encrypted and activator.staged()  # stage: never does not apply
    if not allowed:
        with pytest.raises(HoshikageError, match="swap on /dev/sda2 is not") as err:
            activator.check_encrypted()
        assert err.value.hint and "allow_plaintext_swap" in err.value.hint
        return
    activator.check_encrypted()
    files, copy_later = activator.serve_from()  # decrypted first, never served from source
    assert files.main == ram / "m.gguf" and not copy_later
    assert (ram / "m.gguf").read_bytes() == (tmp_path / "m.gguf").read_bytes()


def test_check_reports_what_keeps_encrypted_models_from_loading(
        tmp_path: Path, key: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from hoshikage_sd import manifest

    good = seal(make_model(tmp_path / "m.gguf"), key)
    other = seal(tmp_path / "m.gguf", keygen(tmp_path / "k2"), tmp_path / "other.gguf.age")
    models = {"good": manifest.Model("good", good), "other": manifest.Model("other", other)}
    config = manifest.Config(source=tmp_path / "x.yaml", ramdisk=tmp_path, models=models)
    monkeypatch.setattr(encryption, "swap_risk", lambda **_: None)
    monkeypatch.setattr(encryption, "SEALED_IDENTITY", tmp_path / "none.cred")
    monkeypatch.setattr(encryption, "PLAIN_IDENTITY", tmp_path / "none.key")
    (problem,) = encryption.check_problems(config)
    assert problem.startswith("model other: cannot decrypt") and "this machine's key" in problem
    monkeypatch.setattr(encryption, "swap_risk", lambda **_: "/dev/sdb1")
    assert "swap on /dev/sdb1" in encryption.check_problems(config)[-1]
    plain = manifest.Config(source=tmp_path / "x.yaml", ramdisk=tmp_path,
                            models={"p": manifest.Model("p", tmp_path / "m.gguf")})
    assert encryption.check_problems(plain) == []


def test_a_listing_without_the_key_names_the_model_without_details(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from hoshikage_sd.router.ollama import listings

    sealed = seal(make_model(tmp_path / "m.gguf"), keygen(tmp_path / "k"))
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path / "none"))
    monkeypatch.setattr(encryption, "PLAIN_IDENTITY", tmp_path / "none.key")
    monkeypatch.setattr(encryption, "SEALED_IDENTITY", tmp_path / "none.cred")
    facts = listings.model_facts("m", sealed)
    assert facts.info is None and facts.size == sealed.stat().st_size
