"""Issue 21 under real systemd: `hoshikage keys setup` seals an age identity with the
container's systemd-creds, the units get it as a credential, an encrypted model serves with
its plaintext on the RAM disk only, the release deletes it, and a wrong key, a tampered
chunk, a truncated file and a file that is not age each give a clear error, leave nothing on
the RAM disk and evict nothing."""

from __future__ import annotations

import importlib
import subprocess
from pathlib import Path

import pytest

from testbed import REPO_ROOT
from testbed.deploy import MODELS_IN_CONTAINER, Deployment, deploy
from tests.system.conftest import ContainerFactory

pytestmark = pytest.mark.system

#: a string in the secret model's GGUF metadata: where it shows, its plaintext is
SECRET = "hoshikage-secret-weights-7f3a9c"
#: where plaintext must never be (the RAM disk is the one place it may be)
NEVER_HERE = ("/var/lib/hoshikage", "/run/hoshikage", "/var/cache/hoshikage", "/tmp",
              "/var/tmp", "/etc/hoshikage", MODELS_IN_CONTAINER)


@pytest.fixture
def hk(container_factory: ContainerFactory, tmp_path: Path, tiny_gguf: Path,
       llama_server_bin: Path) -> Deployment:
    models = tmp_path / "models"
    models.mkdir()
    (models / "plain.gguf").write_bytes(tiny_gguf.read_bytes())
    text = (f"llama_server: {llama_server_bin}\nmax_loaded_models: 1\nidle_ttl: 1h\n"
            f"args: [-c, '512', -np, '1']\nsources: [{MODELS_IN_CONTAINER}]\n"
            f"models:\n  secret:\n    path: {MODELS_IN_CONTAINER}/secret.gguf.age\n"
            "    ttl: 3s\n")
    # the host key systemd-creds seals with must be on a persistent disk (the container's
    # /var is a tmpfs, where systemd-creds refuses to keep it), as on a real machine
    var_lib_systemd = tmp_path / "var-lib-systemd"
    var_lib_systemd.mkdir()
    return deploy(container_factory, models, text,
                  binds=[(str(var_lib_systemd), "/var/lib/systemd", False)])


def age(*args: str) -> None:
    subprocess.run(["age", *args], check=True, capture_output=True)


def plaintext_at(hk: Deployment) -> list[str]:
    """The files holding the secret model's plaintext, on the RAM disk and where it must
    never be (the checkout, bound in at its own path, which may be under /tmp, not searched:
    this file names the string)."""
    return hk.container.exec("grep", "-rlaF", f"--exclude-dir={REPO_ROOT.name}", SECRET,
                             "/mnt/hoshikage", *NEVER_HERE, check=False).stdout.split()


def ramdisk(hk: Deployment) -> list[str]:
    out = hk.container.exec("ls", "-A", "/mnt/hoshikage").stdout
    return sorted(n for n in out.split() if not n.endswith(".lock"))


def test_encrypted_models_decrypt_into_ram_only(hk: Deployment, tmp_path: Path) -> None:
    out = hk.hoshikage("keys", "setup")
    assert "sealed by systemd-creds" in out, out
    recipients = tmp_path / "recipients"
    recipients.write_text(hk.container.exec("cat", "/etc/hoshikage/age-recipients").stdout)
    identity = hk.container.exec("systemd-creds", "decrypt", "--name=age-identity",
                                 "/etc/hoshikage/age-identity.cred", "-").stdout
    secret_key = next(line for line in identity.splitlines()
                      if line.startswith("AGE-SECRET-KEY-"))

    make_gguf = importlib.import_module("make_gguf")
    plain = tmp_path / "secret.gguf"
    make_gguf.write_model(plain, name=SECRET, n_embd=128, n_ff=256)
    models = hk.models
    age("-R", str(recipients), "-o", str(models / "secret.gguf.age"), str(plain))
    other = tmp_path / "other.key"
    subprocess.run(["age-keygen", "-o", str(other)], check=True, capture_output=True)
    age("-e", "-i", str(other), "-o", str(models / "wrongkey.gguf.age"), str(plain))
    sealed = (models / "secret.gguf.age").read_bytes()
    tampered = bytearray(sealed)
    tampered[len(sealed) - 70_000] ^= 1  # the next-to-last chunk
    (models / "tampered.gguf.age").write_bytes(bytes(tampered))
    (models / "truncated.gguf.age").write_bytes(sealed[:-500])
    (models / "notage.gguf.age").write_bytes((models / "plain.gguf").read_bytes())
    plain.unlink()

    listing = hk.hoshikage("list")
    assert "secret" in listing and "wrongkey" in listing, listing
    status, reply = hk.chat("plain")
    assert status == 200, reply

    # every bad file: a clear error naming the model and the cause, nothing of it left, and
    # plain (max_loaded_models: 1) not stopped for it: the key, the format, the header and
    # the last chunk are checked before admission, and a chunk damaged in between when the
    # load would stop another model (every chunk authenticated first)
    for name, cause in (("wrongkey", "not encrypted to this machine's key"),
                        ("truncated", "damaged or truncated"),
                        ("notage", "it is not an age file"),
                        ("tampered", "damaged or truncated")):
        status, reply = hk.chat(name)
        message = str(reply)
        assert status >= 500 and cause in message and name in message, (name, reply)
        assert "AGE-SECRET-KEY" not in message
        assert not [n for n in ramdisk(hk) if name in n], (name, ramdisk(hk))
        assert hk.state("hoshikage-model@plain.service") == "active", name

    # the encrypted model serves; the router reads its header through its own credential
    status, reply = hk.chat("secret")
    assert status == 200, reply
    status, shown = hk.request("POST", "/api/show", {"model": "secret"})
    assert status == 200 and shown["model_info"]["general.name"] == SECRET, shown
    status, tags = hk.request("GET", "/api/tags")
    (tag,) = [m for m in tags["models"] if m["name"].startswith("secret")]
    assert tag["details"]["family"] == "llama" and tag["details"]["parameter_size"], tag
    (line,) = [p for p in hk.processes("llama-server") if "--alias secret" in p]
    assert "-m /mnt/hoshikage/secret.gguf" in line
    ready = hk.events("ready", "secret")[-1]
    assert ready["HOSHIKAGE_SERVED_FROM"] == "/mnt/hoshikage/secret.gguf"
    assert float(hk.events("staged", "secret")[-1]["HOSHIKAGE_SECONDS"]) > 0

    # its plaintext is on the RAM disk and nowhere else; the key is nowhere at all
    found = plaintext_at(hk)
    assert found == ["/mnt/hoshikage/secret.gguf"], found
    for needle in (SECRET, secret_key):
        count = hk.container.exec("sh", "-c", 'journalctl -o export --no-pager | grep -caF "$1"',
                                  "-", needle, check=False).stdout.strip()
        assert count == "0", needle[:12]
    for pid in hk.container.exec("pgrep", "-f", "hoshikage|llama-server").stdout.split():
        for what in ("cmdline", "environ"):
            seen = hk.container.exec("cat", f"/proc/{pid}/{what}", check=False).stdout
            assert secret_key not in seen and "AGE-SECRET-KEY" not in seen

    # its idle release (TTL 3 s) deletes the plaintext
    hk.wait_for("the idle release", lambda: "secret.gguf" not in ramdisk(hk))
    # the record comes after the file is gone: wait for it as well
    hk.wait_for("the released record", lambda: bool(hk.events("released", "secret")))
    found = plaintext_at(hk)
    assert found == [], found
