"""`hoshikage check`'s router side (router/checks.py): the keys file, a model's own key,
the limits against hoshikage.service's, preload against its unit."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from hoshikage_sd.manifest import Config, Model
from hoshikage_sd.router import checks


def config(tmp_path: Path, **fields: object) -> Config:
    return dataclasses.replace(Config(source=tmp_path / "models.yaml"), **fields)


def test_the_keys_file_is_read_as_the_router_reads_it(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    assert checks.keys_problems(config(tmp_path)) == []
    assert "does not exist" in checks.keys_problems(config(tmp_path, api_keys=str(keys)))[0]
    keys.write_text("short\n")
    said = checks.keys_problems(config(tmp_path, api_keys=str(keys)))
    assert f"{keys}:1" in said[0] and "503" in said[0] and "short\n" not in said[0]
    keys.write_text("a-good-long-key\n")
    assert checks.keys_problems(config(tmp_path, api_keys=str(keys))) == []
    # a credential: the file hoshikage.service's LoadCredential= names
    cred = config(tmp_path, api_keys="credential:api-keys")
    assert checks.keys_problems(cred, f"other:/x api-keys:{keys}") == []
    assert "LoadCredential=api-keys" in checks.keys_problems(cred, "")[0]
    # what `systemctl cat` shows: the unit, then drop-ins; an empty assignment resets
    shown = ("# /lib/systemd/system/hoshikage.service\n[Service]\nLoadCredential=x:/a\n"
             "# /etc/systemd/system/hoshikage.service.d/k.conf\n[Service]\nLoadCredential=\n"
             f"LoadCredential=api-keys:{keys}\nLoadCredentialEncrypted=age-identity:/c\n")
    assert checks.load_credentials(shown) == f"api-keys:{keys}"


def test_a_models_own_key_file_that_cannot_be_read_is_named(tmp_path: Path) -> None:
    model = Model("m", tmp_path / "m.gguf", args=("--api-key-file", str(tmp_path / "none")))
    said = checks.model_keys.problems(model)
    assert "model 'm'" in said[0] and "--api-key-file" in said[0]


def test_the_limits_are_checked_against_the_units(tmp_path: Path) -> None:
    default = config(tmp_path, models={"m": Model("m", tmp_path / "m.gguf")})
    assert checks.limit_problems(default, "4096", str(2 << 30)) == []
    assert checks.limit_problems(default, "infinity", "infinity") == []
    many = dataclasses.replace(default, max_connections=100_000)
    [said] = checks.limit_problems(many, "4096", str(2 << 30))
    assert "LimitNOFILE=4096" in said and "max_connections 100000" in said
    big = dataclasses.replace(default, body_memory=1 << 30)
    [said] = checks.limit_problems(big, "4096", str(2 << 30))
    assert "MemoryMax=2.0 GiB" in said and "body_memory 1.0 GiB" in said, said


def test_preload_wants_its_unit_enabled(tmp_path: Path) -> None:
    models = {"a": Model("a", tmp_path / "a.gguf", preload=True),
              "b": Model("b", tmp_path / "b.gguf")}
    cfg = config(tmp_path, models=models)
    [said] = checks.preload_problems(cfg, "disabled")
    assert said.startswith("a: preload: true") and "systemctl enable" in said
    assert checks.preload_problems(cfg, "enabled") == []
    assert checks.preload_problems(config(tmp_path), "disabled") == []
