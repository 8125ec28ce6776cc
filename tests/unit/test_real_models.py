"""Issue 19's manifest: defaults for every model (args, env), sources as people keep models
(recursive, Hugging Face's cache), split GGUFs and projectors found and named as one model."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

from hoshikage_sd import lastgood, manifest, proc
from hoshikage_sd.manifest import ConfigError, Files
from hoshikage_sd.manifest.sources import hf_model_name, shards_of
from hoshikage_sd.staging import Store


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "models.yaml"
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def touch(*paths: Path) -> None:
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"GGUF" + bytes(28))


def test_args_and_env_layer_top_then_source_then_model(tmp_path: Path) -> None:
    touch(tmp_path / "gpu" / "big.gguf", tmp_path / "gpu" / "small.gguf",
          tmp_path / "cpu" / "cpu-only.gguf")
    config = manifest.load(write(tmp_path, f"""
        args: [-ngl, "99", -c, "4096"]
        env: {{GGML_VK_VISIBLE_DEVICES: "0", OMP_NUM_THREADS: 4}}
        sources:
          - dir: {tmp_path}/gpu
            args: [--device, Vulkan0]
            env: {{CUDA_VISIBLE_DEVICES: "0,1"}}
          - {tmp_path}/cpu
        models:
          small:
            args: [-ngl, "0"]
            env: {{CUDA_VISIBLE_DEVICES: "1", LLAMA_ARG_FLASH_ATTN: "on"}}
    """))
    assert config.args == ("-ngl", "99", "-c", "4096")
    big, small, cpu = (config.models[n] for n in ("big", "small", "cpu-only"))
    assert big.args == ("-ngl", "99", "-c", "4096", "--device", "Vulkan0")
    assert big.environment == {"GGML_VK_VISIBLE_DEVICES": "0", "OMP_NUM_THREADS": "4",
                               "CUDA_VISIBLE_DEVICES": "0,1"}
    # found in a source and named in models: the source's settings, then its own; an
    # option a later layer gives takes the earlier one's place (llama-server warns of one
    # given twice)
    assert small.args == ("-c", "4096", "--device", "Vulkan0", "-ngl", "0")
    assert small.environment["CUDA_VISIBLE_DEVICES"] == "1"
    assert small.environment["LLAMA_ARG_FLASH_ATTN"] == "on"
    assert cpu.args == ("-ngl", "99", "-c", "4096")
    assert "CUDA_VISIBLE_DEVICES" not in cpu.environment
    # the command line llama-server gets carries them, each option once
    argv = config.server_argv(small, Files.of(small))
    assert argv[argv.index("--device") + 1] == "Vulkan0" and argv[-6:-4] == ["-ngl", "0"]
    assert argv.count("-ngl") == 1
    from hoshikage_sd.manifest.parse import layered

    assert layered([("-ngl", "99", "--jinja", "-mg", "-1", "-c=4096"),
                    ("--jinja", "-c", "512", "-mg", "1"), ("-ngl", "-1")]) == \
        ("--jinja", "-c", "512", "-mg", "1", "-ngl", "-1")


def test_an_explicit_path_gets_the_top_levels_defaults_only(tmp_path: Path) -> None:
    touch(tmp_path / "a.gguf")
    config = manifest.load(write(tmp_path, f"""
        args: [-ngl, "99"]
        env: {{VK_ICD_FILENAMES: /usr/share/vulkan/icd.d/lvp_icd.x86_64.json}}
        models:
          a: {{path: {tmp_path}/a.gguf, args: [-c, "512"]}}
    """))
    a = config.models["a"]
    assert a.args == ("-ngl", "99", "-c", "512")
    assert a.environment == {"VK_ICD_FILENAMES": "/usr/share/vulkan/icd.d/lvp_icd.x86_64.json"}


@pytest.mark.parametrize(("text", "needle", "words"), [
    ("env: {'A-B': x}", "A-B", ("not an environment variable",)),
    ("env: {A: [x]}", "env:", ("must be a string",)),
    ("env: [A=x]", "env:", ("mapping",)),
    ("env: {A: \"x\\0y\"}", "env:", ("NUL",)),
    ("sources: [{recursive: true}]", "recursive", ("needs 'dir:'",)),
    ("sources: [{dir: rel}]", "dir", ("absolute",)),
    ("sources: [{dir: /x, depth: 3}]", "depth", ("unknown key 'depth'",)),
])
def test_bad_defaults_and_sources_are_named_with_their_line(
        tmp_path: Path, text: str, needle: str, words: tuple[str, ...]) -> None:
    path = write(tmp_path, f"models: {{}}\n{text}\n")
    with pytest.raises(ConfigError) as info:
        manifest.load(path)
    assert info.value.line == 2, info.value.message
    for word in words:
        assert word in info.value.message


def test_server_env_passes_the_units_gpu_variables_and_the_manifests_over_them(
        monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        monkeypatch.delenv(key)
    monkeypatch.setenv("PATH", "/usr/bin")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    monkeypatch.setenv("HSA_OVERRIDE_GFX_VERSION", "10.3.0")
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/systemd/notify")
    monkeypatch.setenv("LISTEN_FDS", "1")
    env = proc.server_env({"CUDA_VISIBLE_DEVICES": "1", "MY_SETTING": "x"})
    assert env == {"PATH": "/usr/bin", "CUDA_VISIBLE_DEVICES": "1",
                   "HSA_OVERRIDE_GFX_VERSION": "10.3.0", "MY_SETTING": "x"}


# -- sources: as people keep models ---------------------------------------------------------

def hf_repo(hub: Path, repo: str, files: list[str], revision: str = "0123abc") -> Path:
    """A Hugging Face cache repository as huggingface_hub lays it out: blobs, a snapshot of
    symlinks into them, refs/main naming the snapshot."""
    root = hub / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(revision)
    for i, name in enumerate(files):
        blob = root / "blobs" / f"{i:040x}"
        touch(blob)
        link = root / "snapshots" / revision / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return root


def test_huggingface_cache_layout_is_found_and_named(tmp_path: Path) -> None:
    hub = tmp_path / "hub"
    hf_repo(hub, "Qwen/Qwen3-8B-GGUF", ["Qwen3-8B-Q4_K_M.gguf", "Qwen3-8B-Q8_0.gguf"])
    hf_repo(hub, "someone/Llama-3.2-1B-Instruct-GGUF", ["model-q4_k_m.gguf"])
    hf_repo(hub, "ggml-org/gemma-3-4b-it-GGUF",
            ["gemma-3-4b-it-Q4_K_M.gguf", "mmproj-model-f16.gguf"])
    big = hf_repo(hub, "unsloth/Big-GGUF", [f"Q4_K_M/Big-Q4_K_M-{i:05d}-of-00003.gguf"
                                             for i in (1, 2, 3)])
    # an older snapshot that refs/main no longer names is not a model
    touch(hub / "models--Qwen--Qwen3-8B-GGUF" / "snapshots" / "old" / "Qwen3-8B-F16.gguf")
    config = manifest.load(write(tmp_path, f"sources: [{hub}]\n"))
    assert sorted(config.models) == ["Big-Q4_K_M", "Llama-3.2-1B-Instruct-q4_k_m",
                                     "Qwen3-8B-Q4_K_M", "Qwen3-8B-Q8_0",
                                     "gemma-3-4b-it-Q4_K_M"]
    qwen = config.models["Qwen3-8B-Q4_K_M"]
    assert qwen.path.is_symlink() and qwen.path.parent.name == "0123abc"
    assert config.models["gemma-3-4b-it-Q4_K_M"].mmproj is not None
    assert config.models["gemma-3-4b-it-Q4_K_M"].mmproj.name == "mmproj-model-f16.gguf"
    split = config.models["Big-Q4_K_M"]
    assert split.path.name == "Big-Q4_K_M-00001-of-00003.gguf"
    assert [p.name for p in split.shards] == ["Big-Q4_K_M-00002-of-00003.gguf",
                                              "Big-Q4_K_M-00003-of-00003.gguf"]
    assert split.path.parent == big / "snapshots" / "0123abc" / "Q4_K_M"
    assert not config.warnings
    # a repository directory named directly works too
    direct = manifest.load(write(tmp_path, f"sources: [{big}]\n"))
    assert list(direct.models) == ["Big-Q4_K_M"]


@pytest.mark.parametrize(("repo", "file", "name"), [
    ("models--Qwen--Qwen3-8B-GGUF", "Qwen3-8B-Q4_K_M.gguf", "Qwen3-8B-Q4_K_M"),
    ("models--x--Llama-3.2-1B-GGUF", "model-Q4_K_M.gguf", "Llama-3.2-1B-Q4_K_M"),
    ("models--x--Phi_gguf", "ggml-model-f16.gguf", "Phi-f16"),
    ("models--x--Tiny", "weights.gguf", "Tiny-weights"),
])
def test_hf_names_say_the_repository_and_the_quantisation(repo: str, file: str,
                                                           name: str) -> None:
    assert hf_model_name(repo, Path(file)) == name


def test_recursive_sources_and_split_models_and_projectors(tmp_path: Path) -> None:
    models = tmp_path / "models"
    touch(models / "top.gguf", models / "vision" / "llava-7b-Q4_K_M.gguf",
          models / "vision" / "mmproj-llava-7b-f16.gguf",
          models / "vision" / "mmproj-other-f32.gguf",
          *(models / "deep" / "a" / "b" / f"huge-{i:05d}-of-00002.gguf" for i in (1, 2)),
          *(models / "broken-{}-of-00003.gguf".format(f"{i:05d}") for i in (1, 3)),
          models / ".hidden" / "secret.gguf")
    flat = manifest.load(write(tmp_path, f"sources: [{models}]\n"))
    assert sorted(flat.models) == ["top"]  # not recursive; the broken split is a warning
    assert any("broken-00002-of-00003.gguf" in w for w in flat.warnings), flat.warnings
    deep = manifest.load(write(tmp_path, f"sources: [{{dir: {models}, recursive: true}}]\n"))
    assert sorted(deep.models) == ["huge", "llava-7b-Q4_K_M", "top"]
    assert deep.models["llava-7b-Q4_K_M"].mmproj == models / "vision" / \
        "mmproj-llava-7b-f16.gguf"
    assert deep.models["top"].mmproj is None  # projectors stay in their directory
    assert [p.name for p in deep.models["huge"].shards] == ["huge-00002-of-00002.gguf"]
    assert models / "deep" / "a" / "b" in deep.scanned  # lastgood.py watches each


def test_a_projector_goes_only_to_the_models_it_names(tmp_path: Path) -> None:
    """llama-server refuses a model with another model's projector (their widths differ):
    in a folder of several models a projector goes to the one its name names; one that
    names none, only where every model beside it is of one family."""
    shared, hub = tmp_path / "shared", tmp_path / "hub"
    touch(shared / "llava-7b-Q4_K_M.gguf", shared / "llava-7b-mmproj-f16.gguf",
          shared / "qwen-Q4_K_M.gguf", shared / "mmproj-model-f16.gguf")
    hf_repo(hub, "org/Vis-GGUF", ["Vis-Q4_K_M.gguf", "Vis-Q8_0.gguf", "mmproj-Vis-q8_0.gguf",
                                  "mmproj/mmproj-Vis-f16.gguf"])
    hf_repo(hub, "org/Two-GGUF", ["Two-A-Q4_K_M.gguf", "Two-B-Q4_K_M.gguf",
                                  "mmproj-Two-B-f16.gguf"])
    hf_repo(hub, "unsloth/gemma-3-4b-it-GGUF", ["gemma-3-4b-it-Q4_K_M.gguf",
                                                "gemma-3-4b-it-Q8_0.gguf", "mmproj-F16.gguf"])
    hf_repo(hub, "bartowski/google_gemma-3-12b-it-GGUF",
            ["google_gemma-3-12b-it-Q4_K_M.gguf", "mmproj-gemma-3-12b-it-f16.gguf"])
    config = manifest.load(write(tmp_path, f"sources: [{shared}, {hub}]\n"))
    mmproj = {name: m.mmproj.name if m.mmproj else None for name, m in config.models.items()}
    assert mmproj == {
        "llava-7b-Q4_K_M": "llava-7b-mmproj-f16.gguf",
        "qwen-Q4_K_M": None,  # llava's is not its, nor is the generic one beside two models
        "Vis-Q4_K_M": "mmproj-Vis-f16.gguf",  # f16 first, from a folder of the snapshot
        "Vis-Q8_0": "mmproj-Vis-f16.gguf",
        "Two-A-Q4_K_M": None, "Two-B-Q4_K_M": "mmproj-Two-B-f16.gguf",
        "gemma-3-4b-it-Q4_K_M": "mmproj-F16.gguf", "gemma-3-4b-it-Q8_0": "mmproj-F16.gguf",
        "google_gemma-3-12b-it-Q4_K_M": "mmproj-gemma-3-12b-it-f16.gguf",
    }


def test_quantisations_in_folders_of_one_file_name_are_models_of_their_own(
        tmp_path: Path) -> None:
    hub = tmp_path / "hub"
    hf_repo(hub, "org/Gen-GGUF", [f"{q}/model-{i:05d}-of-00002.gguf"
                                  for q in ("Q4_K_M", "Q8_0") for i in (1, 2)])
    hf_repo(hub, "org/Gen2-GGUF", ["Q4_K_M/model.gguf", "Q8_0/model.gguf"])
    config = manifest.load(write(tmp_path, f"sources: [{hub}]\n"))
    assert sorted(config.models) == ["Gen-Q4_K_M", "Gen-Q8_0", "Gen2-Q4_K_M", "Gen2-Q8_0"]
    assert config.models["Gen-Q8_0"].path.parent.name == "Q8_0"
    assert not config.warnings


def test_what_the_sources_leave_out_is_said(tmp_path: Path) -> None:
    """Two files of one name, a split model without its first shard, a link to nothing (a
    download not finished), a repository that cannot be read: each a warning."""
    hub, plain = tmp_path / "hub", tmp_path / "plain"
    hf_repo(hub, "Qwen/Qwen3-8B-GGUF", ["Qwen3-8B-Q4_K_M.gguf"])
    hf_repo(hub, "unsloth/Qwen3-8B-GGUF", ["Qwen3-8B-Q4_K_M.gguf", "Qwen3-8B-Q8_0.gguf"])
    (hub / "models--unsloth--Qwen3-8B-GGUF" / "blobs" / f"{1:040x}").unlink()
    broken = hub / "models--org--Broken-GGUF"
    (broken / "refs").mkdir(parents=True)
    (broken / "snapshots").write_text("not a directory")
    touch(plain / "dup name.gguf", plain / "dup-name.gguf",
          plain / "orphan-00002-of-00003.gguf", plain / "orphan-00003-of-00003.gguf")
    config = manifest.load(write(tmp_path, f"sources: [{hub}, {plain}]\n"))
    assert sorted(config.models) == ["Qwen3-8B-Q4_K_M", "dup-name"]
    assert config.models["Qwen3-8B-Q4_K_M"].path.parts[-4] == "models--Qwen--Qwen3-8B-GGUF"
    said = "\n".join(config.warnings)
    assert "unsloth--Qwen3-8B-GGUF/snapshots/0123abc/Qwen3-8B-Q4_K_M.gguf is named " \
           "'Qwen3-8B-Q4_K_M' as " in said
    assert "Qwen3-8B-Q8_0.gguf is a link to nothing" in said
    assert f"{broken} cannot be read" in said
    assert "dup name.gguf is named 'dup-name'" in said or "dup-name.gguf is named" in said
    assert said.count("first shard orphan-00001-of-00003.gguf is missing") == 2, said


def test_a_found_model_named_as_an_alias_is_said(tmp_path: Path) -> None:
    models = tmp_path / "models"
    touch(models / "Foo-Q4_K_M.gguf", tmp_path / "mine.gguf")
    config = manifest.load(write(tmp_path, f"""
        sources: [{models}]
        models:
          mine: {{path: {tmp_path}/mine.gguf, aliases: [Foo-Q4_K_M]}}
    """))
    assert list(config.models) == ["mine"]
    assert any("Foo-Q4_K_M.gguf is named 'Foo-Q4_K_M', an alias of 'mine'" in w
               for w in config.warnings), config.warnings


def test_the_kept_parse_sees_a_new_revision_and_a_directory_opened(tmp_path: Path) -> None:
    hub = tmp_path / "hub"
    repo = hf_repo(hub, "org/Upd-GGUF", ["Upd-Q4_K_M.gguf"])
    closed = tmp_path / "plain" / "closed"
    config = manifest.load(write(tmp_path, f"sources: [{hub}, {closed}]\n"))
    watched = lastgood.inputs(config)
    for path in (repo / "refs" / "main", repo / "snapshots", closed):
        assert str(path) in watched, path


def test_unreadable_source_directory_is_a_warning_not_silence(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    config = manifest.load(write(tmp_path, f"sources: [{missing}]\nmodels: {{}}\n"))
    assert any(str(missing) in w and "cannot be read" in w for w in config.warnings)


def test_explicit_split_path_and_mmproj(tmp_path: Path) -> None:
    touch(*(tmp_path / f"m-{i:05d}-of-00002.gguf" for i in (1, 2)), tmp_path / "proj.gguf")
    config = manifest.load(write(tmp_path, f"""
        models:
          m: {{path: {tmp_path}/m-00001-of-00002.gguf, mmproj: {tmp_path}/proj.gguf}}
          second: {{path: {tmp_path}/m-00002-of-00002.gguf}}
          gone: {{path: {tmp_path}/m-00001-of-00002.gguf, mmproj: {tmp_path}/nope.gguf}}
    """))
    m = config.models["m"]
    assert m.shards == (tmp_path / "m-00002-of-00002.gguf",) and m.mmproj == tmp_path / \
        "proj.gguf"
    assert any("not the first shard" in w for w in config.warnings)
    assert any("nope.gguf does not exist" in w for w in config.warnings)
    assert manifest.model_files(m) == (m.path, *m.shards, tmp_path / "proj.gguf")


def test_shards_of_a_single_file_is_nothing(tmp_path: Path) -> None:
    assert shards_of(tmp_path / "x.gguf") == ((), None)


def test_the_kept_parse_watches_shards_projectors_and_scanned_directories(
        tmp_path: Path) -> None:
    models = tmp_path / "models"
    touch(*(models / "sub" / f"s-{i:05d}-of-00002.gguf" for i in (1, 2)),
          models / "sub" / "mmproj-s.gguf")
    config = manifest.load(write(tmp_path, f"sources: [{{dir: {models}, recursive: true}}]\n"))
    watched = lastgood.inputs(config)
    for path in (models, models / "sub", models / "sub" / "s-00002-of-00002.gguf",
                 models / "sub" / "mmproj-s.gguf"):
        assert str(path) in watched


# -- a model of several files on the RAM disk ----------------------------------------------

def split_sources(tmp_path: Path, mmproj: bool = True) -> Files:
    src = tmp_path / "ssd"
    src.mkdir(exist_ok=True)
    shards = tuple(src / f"Big-Q4_K_M-{k:05d}-of-00003.gguf" for k in (1, 2, 3))
    for k, path in enumerate(shards):
        path.write_bytes(bytes([k + 1]) * (1000 + 100 * k))
    proj = src / "mmproj-big-f16.gguf" if mmproj else None
    if proj:
        proj.write_bytes(b"P" * 777)
    return Files(shards, proj)


def test_a_split_model_and_its_projector_stage_under_names_llama_cpp_finds(
        tmp_path: Path) -> None:
    ramdisk = tmp_path / "ram"
    ramdisk.mkdir()
    source = split_sources(tmp_path)
    seen: list[tuple[int, int]] = []
    staged = Store(ramdisk).stage("big", source, lambda done, total: seen.append((done, total)))
    assert staged.copied and staged.size == 1000 + 1100 + 1200 + 777
    assert staged.path == ramdisk / "big-00001-of-00003.gguf"
    assert staged.files is not None and staged.files.mmproj == ramdisk / "big.mmproj.gguf"
    names = sorted(p.name for p in ramdisk.iterdir() if not p.name.startswith("."))
    assert names == ["big-00001-of-00003.gguf", "big-00002-of-00003.gguf",
                     "big-00003-of-00003.gguf", "big.mmproj.gguf"]
    for copy, original in zip(staged.files.paths, source.paths, strict=True):
        assert copy.read_bytes() == original.read_bytes()
    assert seen[-1] == (staged.size, staged.size)  # one progress over all the files
    assert all(total == staged.size for _, total in seen)
    store = Store(ramdisk)
    assert store.reusable("big", source) and store.copy_size("big") == staged.size
    assert store.current("big", source) == staged.files
    assert not store.stage("big", source).copied
    # one shard changed: the whole copy is stale
    source.shards[1].write_bytes(b"x" * 1100)
    assert not store.reusable("big", source)
    assert store.current("big", source) is None
    assert store.remove("big") > 0
    assert sorted(p.name for p in ramdisk.iterdir()) == [".big.lock"]


def test_a_copy_that_fails_half_way_leaves_no_shard_and_no_record(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ramdisk = tmp_path / "ram"
    ramdisk.mkdir()
    source = split_sources(tmp_path)
    from hoshikage_sd import staging

    real = staging.copy_file
    calls = []

    def failing(src: Path, dest: Path, size: int, progress: object = None,
                drop_behind: bool = True) -> None:
        calls.append(src)
        if len(calls) == 3:
            raise OSError(5, "I/O error")
        real(src, dest, size, None, drop_behind)

    monkeypatch.setattr(staging, "copy_file", failing)
    with pytest.raises(OSError):
        Store(ramdisk).stage("big", source)
    assert sorted(p.name for p in ramdisk.iterdir()) == [".big.lock"]
    assert Store(ramdisk).copy_size("big") is None


def test_remove_takes_only_this_models_files(tmp_path: Path) -> None:
    ramdisk = tmp_path / "ram"
    ramdisk.mkdir()
    Store(ramdisk).stage("big", split_sources(tmp_path))
    other = ramdisk / "big-extra-00001-of-00002.gguf"  # model "big-extra"'s shard
    other.write_bytes(b"keep")
    (ramdisk / "big-extra.gguf").write_bytes(b"keep")
    Store(ramdisk).remove("big")
    assert other.exists() and (ramdisk / "big-extra.gguf").exists()


def test_argv_names_the_first_shard_and_the_projector(tmp_path: Path) -> None:
    source = split_sources(tmp_path)
    model = manifest.Model("big", source.main, shards=source.shards[1:], mmproj=source.mmproj)
    config = manifest.Config(source=tmp_path / "m.yaml", models={"big": model})
    staged = Store(tmp_path).staged_files("big", Files.of(model))
    argv = config.server_argv(model, staged)
    assert argv[argv.index("-m") + 1] == str(tmp_path / "big-00001-of-00003.gguf")
    assert argv[argv.index("--mmproj") + 1] == str(tmp_path / "big.mmproj.gguf")
    plain = manifest.Model("one", source.main)
    assert "--mmproj" not in config.server_argv(plain, Files.of(plain))


def test_the_estimate_reads_every_shard_and_counts_the_projector(tmp_path: Path) -> None:

    import make_gguf  # tools/, on the path by tests/conftest.py

    from hoshikage_sd import gguf, memory
    from hoshikage_sd.admit import needs

    count = make_gguf.split_count(2, 8)
    first = tmp_path / f"x-00001-of-{count:05d}.gguf"
    make_gguf.write_model(first, split_max_tensors=8)
    make_gguf.write_model(tmp_path / "single.gguf")
    shards, problem = shards_of(first)
    assert problem is None and len(shards) == count - 1
    split = gguf.read_model_info((first, *shards))
    single = gguf.read_info(tmp_path / "single.gguf")
    assert (split.n_params, split.tensor_bytes, len(split.tensors)) == \
        (single.n_params, single.tensor_bytes, len(single.tensors))
    assert gguf.read_info(first).tensor_bytes < split.tensor_bytes  # the first alone is less
    proj = tmp_path / "mmproj.gguf"
    make_gguf.write_projector(proj)
    with_proj = needs.estimate(manifest.Model("x", first, shards=shards, mmproj=proj))
    without = needs.estimate(manifest.Model("x", first, shards=shards))
    assert with_proj - without == memory.projector_bytes(proj.stat().st_size)
    assert abs(without - needs.estimate(manifest.Model("s", tmp_path / "single.gguf"))) \
        <= memory.TMPFS_PAGE * count  # the same model, in pages of several files


def test_a_split_model_is_listed_whole_and_its_projector_takes_images(
        tmp_path: Path) -> None:
    """`hoshikage list` and Ollama's /api/tags, /api/show: size and parameters over every
    shard; a projector from the manifest (mmproj:, or found beside it) takes images."""

    import make_gguf  # tools/, on the path by tests/conftest.py

    from hoshikage_sd.commands import status
    from hoshikage_sd.router import ollama

    count = make_gguf.split_count(2, 8)
    first = tmp_path / "m" / f"Big-Q4_K_M-00001-of-{count:05d}.gguf"
    first.parent.mkdir()
    make_gguf.write_model(first, split_max_tensors=8)
    make_gguf.write_model(tmp_path / "single.gguf")
    make_gguf.write_projector(first.parent / "mmproj-Big-f16.gguf")
    config = manifest.load(write(tmp_path, f"""
        runtime_dir: {tmp_path}/run
        ramdisk: {tmp_path}/ram
        state_dir: {tmp_path}/state
        sources: [{first.parent}]
    """))
    big = config.models["Big-Q4_K_M"]
    files = (big.path, *big.shards)
    single = ollama.model_facts("single", tmp_path / "single.gguf")
    facts = ollama.model_facts(big.name, big.path, shards=big.shards,
                               projector=big.mmproj is not None)
    assert facts.size == sum(p.stat().st_size for p in files) and facts.accepts_images
    assert ollama.details(facts)["parameter_size"] == ollama.details(single)["parameter_size"]
    listing = status.describe(config, big, set(), {}, {})
    assert listing.size == facts.size and listing.parameters == single.info.n_params  # type: ignore[union-attr]
    assert listing.mmproj == str(first.parent / "mmproj-Big-f16.gguf")
    assert listing.shards == [str(p) for p in big.shards]


def test_mmproj_false_gives_a_found_model_none(tmp_path: Path) -> None:
    models = tmp_path / "models"
    touch(models / "vis-Q4_K_M.gguf", models / "mmproj-vis-f16.gguf")
    config = manifest.load(write(tmp_path, f"""
        sources: [{models}]
        models:
          vis-Q4_K_M: {{mmproj: false}}
          dir: {{path: {models}/vis-Q4_K_M.gguf, mmproj: {models}}}
    """))
    assert config.models["vis-Q4_K_M"].mmproj is None
    assert any(f"mmproj {models} is a directory, not a file" in w for w in config.warnings)
    with pytest.raises(ConfigError, match="must be a projector's absolute path, or false"):
        manifest.load(write(tmp_path, f"models:\n  v: {{path: {models}/v.gguf, mmproj: "
                                      "yes}\n"))


def test_llama_arg_variables_in_env_count_as_their_options(tmp_path: Path) -> None:
    """LLAMA_ARG_CTX_SIZE=131072 in a model's env: is llama-server's -c 131072 (README
    "GPUs"): every estimate reads it so, and an argument still wins over its variable."""

    import make_gguf  # tools/, on the path by tests/conftest.py

    from hoshikage_sd.admit import needs

    path = tmp_path / "m.gguf"
    make_gguf.write_model(path)
    by_env = manifest.Model("e", path, env=("LLAMA_ARG_CTX_SIZE=8192",
                                            "LLAMA_ARG_KV_OFFLOAD=off", "LLAMA_ARG_CACHE_RAM=64"))
    by_args = manifest.Model("a", path, args=("-c", "8192", "-nkvo", "-cram", "64"))
    plain = manifest.Model("p", path)
    assert needs.estimate(by_env) == needs.estimate(by_args) != needs.estimate(plain)
    assert by_env.effective_args[:6] == ("-c", "8192", "-nkvo", "-cram", "64", "--threads-http")
    assert "--cache-ram" not in by_env.server_args  # the variable's 64 MiB, not ours
    over = manifest.Model("o", path, env=("LLAMA_ARG_CTX_SIZE=8192",), args=("-c", "1024"))
    assert needs.estimate(over) == needs.estimate(manifest.Model("c", path, args=("-c", "1024")))


# -- `hoshikage check` on llama-server's environment ----------------------------------------

def test_check_says_what_reaches_llama_server_and_what_does_not(tmp_path: Path) -> None:
    from hoshikage_sd.commands.environment import environment_file, report

    defaults = tmp_path / "default"
    defaults.write_text('# comment\nexport HIP_VISIBLE_DEVICES="1"\nFOO=bar baz\n\n')
    unit_env = {**environment_file(defaults), "CUDA_VISIBLE_DEVICES": "0", "PATH": "/bin"}
    assert unit_env["HIP_VISIBLE_DEVICES"] == "1" and unit_env["FOO"] == "bar baz"
    touch(tmp_path / "a.gguf", tmp_path / "b.gguf")
    config = manifest.load(write(tmp_path, f"""
        models:
          a: {{path: {tmp_path}/a.gguf, env: {{CUDA_VISIBLE_DEVICES: "1"}}}}
          b: {{path: {tmp_path}/b.gguf}}
    """))
    lines = report(config, unit_env)
    assert lines[0] == ("llama-server gets from the model unit: CUDA_VISIBLE_DEVICES=0, "
                        "HIP_VISIBLE_DEVICES=1")
    assert lines[1].startswith("not passed to llama-server") and lines[1].endswith(": FOO")
    assert lines[2] == ("manifest env for a: CUDA_VISIBLE_DEVICES=1 "
                        "(over the unit's CUDA_VISIBLE_DEVICES)")
    assert "systemd does not know" in report(config, None)[0]
    assert environment_file(tmp_path / "missing") == {}


def test_the_units_environment_is_its_files_then_its_words(tmp_path: Path) -> None:
    """Environment= over EnvironmentFile=s, as systemd applies them (a missing optional file
    adds nothing), whether systemd was asked over D-Bus or through `systemctl show`."""
    from hoshikage_sd.commands.environment import environment

    defaults = tmp_path / "default"
    defaults.write_text("A=file\nB=file\n")
    assert environment(["B=word", "C=word", "junk"], [str(defaults), str(tmp_path / "no")]) \
        == {"A": "file", "B": "word", "C": "word"}


# -- stage: always | never | auto -----------------------------------------------------------

def test_stage_is_layered_like_args_and_checked(tmp_path: Path) -> None:
    touch(tmp_path / "gpu" / "g.gguf", tmp_path / "x.gguf", tmp_path / "y.gguf")
    config = manifest.load(write(tmp_path, f"""
        stage: always
        sources: [{{dir: {tmp_path}/gpu, stage: never}}]
        models:
          x: {{path: {tmp_path}/x.gguf}}
          y: {{path: {tmp_path}/y.gguf, stage: auto}}
    """))
    assert [config.models[n].stage for n in ("g", "x", "y")] == ["never", "always", "auto"]
    assert manifest.load(write(tmp_path, f"models: {{x: {{path: {tmp_path}/x.gguf}}}}\n")
                         ).models["x"].stage == "auto"
    with pytest.raises(ConfigError) as info:
        manifest.load(write(tmp_path, "models: {}\nstage: sometimes\n"))
    assert info.value.line == 2 and "always" in info.value.message


@pytest.mark.parametrize(("stage", "full", "staged"), [
    ("always", True, True), ("never", False, False), ("auto", False, True),
    ("auto", True, False)])
def test_which_models_get_a_ram_disk_copy(tmp_path: Path, stage: str, full: bool,
                                          staged: bool) -> None:
    from hoshikage_sd.model_unit import activate
    from hoshikage_sd.runtime import Runtime

    touch(tmp_path / "m.gguf")
    model = manifest.Model("m", tmp_path / "m.gguf", stage=stage)
    config = manifest.Config(source=tmp_path / "x.yaml", runtime_dir=tmp_path / "run",
                             ramdisk=tmp_path / "ram", models={"m": model})
    (tmp_path / "ram").mkdir()
    Runtime(config.runtime_dir).set_devices("m", ["k"], {"Vulkan0": 1} if full else {},
                                            {"Vulkan0": 2}, full)
    activator = activate.Activator(config, model)
    assert activator.staged() is staged
    files, copy_later = activator.serve_from()
    assert files == Files.of(model) and copy_later is staged  # from the source first


def test_the_router_knows_a_machine_without_gpus_needs_no_unit_to_judge_devices(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from hoshikage_sd import devices
    from hoshikage_sd.admit import needs
    from hoshikage_sd.commands import environment

    unit_env: dict[str, str] | None = {"CUDA_VISIBLE_DEVICES": "0"}
    nodes = False
    monkeypatch.setattr(devices, "has_nodes", lambda: nodes)
    monkeypatch.setattr(environment, "unit_environment", lambda: unit_env)
    model = manifest.Model("m", tmp_path / "m.gguf")

    def fresh(m: manifest.Model) -> bool:
        monkeypatch.setattr(needs, "_unit_env", (-1e9, None))
        return needs.deviceless(m)

    assert fresh(model)
    assert not fresh(manifest.Model("m", model.path, args=("--rpc", "10.0.0.2:50052")))
    assert not fresh(manifest.Model("m", model.path, env=("GGML_VK_VISIBLE_DEVICES=0",)))
    unit_env = {"GGML_VK_VISIBLE_DEVICES": "0"}  # lavapipe, named in a drop-in
    assert not fresh(model)
    unit_env = None  # systemd cannot say
    assert not fresh(model)
    unit_env, nodes = {}, True  # /dev/dri, /dev/nvidia0, ...
    assert not fresh(model)
