"""Installing hoshikage-launch, the model unit's first process: compiled from launch.c when
there is a C compiler (sooner per cold start than Python's interpreter start:
docs/performance.md), else a Python stub that imports model_unit/launch.py (whose bytecode
Python caches; it would compile a script on every run). And hoshikage-router, the router's
entry, which starts Python without site, and hoshikage-landlock, which confines it
(router/landlock.c). The package build, tools/bootstrap.sh, tools/install and tests call this.
"""

import contextlib
import os
import shutil
import sys
from pathlib import Path

from hoshikage_sd import proc
from hoshikage_sd.files import write_atomic

STUB = """#!/usr/bin/python3 -IS
# hoshikage-launch, written by hoshikage's installer: runs hoshikage_sd/model_unit/launch.py
# as a module, whose bytecode Python caches (it compiles a script on every run).
import sys
sys.path.insert(0, (__file__.rpartition("/")[0] or ".") + "/{site}")
from hoshikage_sd.model_unit.launch import main
main(sys.argv)
"""


ROUTER_STUB = """#!{python} -IS
# hoshikage-router, written by hoshikage's installer: `hoshikage router` as hoshikage.service
# runs it. Without site (-S) the interpreter starts sooner: the head start (the waking
# request's model unit started) comes first, site-packages after it (cli.router_main).
import sys
sys.path[:0] = {paths!r}
from hoshikage_sd.cli import router_main
raise SystemExit(router_main({count}))
"""


LANDLOCK_STUB = """#!{python} -IS
# hoshikage-landlock, written by hoshikage's installer without a C compiler: it runs the
# router without the file-system confinement router/landlock.c gives it, and says so.
import os, sys
args = sys.argv[1:]
while args[:1] == ["--read"]:
    args = args[2:]
if args == ["--probe"]:
    print("none: hoshikage-landlock was installed without a C compiler")
    raise SystemExit(1)
print(f"hoshikage-landlock: installed without a C compiler: {{args[0]}} runs without its "
      "file-system confinement", file=sys.stderr)
os.execv(args[0], args)
"""

HERE = os.path.dirname(os.path.abspath(__file__))
LAUNCH_C = os.path.join(HERE, "launch.c")
LANDLOCK_C = os.path.join(os.path.dirname(HERE), "router", "landlock.c")


def install_router(path: str, python: str | None = None, paths: list[str] | None = None,
                   root: str = "") -> str:
    """hoshikage-router at `path`: `python` (default: this interpreter) with the directory
    that holds hoshikage_sd (the head start imports nothing else that site would add;
    default: where this interpreter finds it, less the staging `root` it is installed
    under) put first on its path."""
    if paths is None:
        import hoshikage_sd

        found = os.path.dirname(os.path.dirname(os.path.abspath(str(hoshikage_sd.__file__))))
        paths = [found.removeprefix(root) if root else found]
    python = python or sys.executable.removeprefix(root)
    text = ROUTER_STUB.format(python=python, paths=paths, count=len(paths))
    write_atomic(Path(path), text.encode())
    os.chmod(path, 0o755)
    return f"{path}: {python} -IS, site-packages after the head start"


def write_stub(path: str, site: str) -> None:
    """Write the hoshikage-launch stub at `path` for the hoshikage_sd package in `site`."""
    relative = os.path.relpath(os.path.abspath(site), os.path.dirname(os.path.abspath(path)))
    write_atomic(Path(path), STUB.format(site=relative).encode())
    os.chmod(path, 0o755)


def build_native(path: str, source: str = LAUNCH_C) -> str | None:
    """Compile `source` (launch.c: the same launcher without an interpreter to start, less
    per cold start) to `path`, atomically; None when done, else why it could not be."""
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        return "no C compiler (cc)"
    if not os.path.exists(source):
        return f"{source} is missing"
    temporary = f"{path}.tmp-{os.getpid()}"
    result = proc.run([compiler, "-O2", "-Wall", "-Wextra", "-o", temporary, source],
                      check=False)
    if result.returncode != 0:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        return f"{compiler} failed: {result.stderr.strip()[-500:]}"
    os.replace(temporary, path)
    return None


def install_launcher(path: str, site: str) -> str:
    """hoshikage-launch at `path`: compiled when a C compiler is there, else the stub for the
    hoshikage_sd package in `site`. Says which, for the installer to print."""
    why = build_native(path)
    if why is None:
        return f"{path}: compiled from launch.c"
    write_stub(path, site)
    return f"{path}: Python stub ({why}; the compiled launcher starts sooner)"




def install_landlock(path: str, python: str | None = None) -> str:
    """hoshikage-landlock at `path`: compiled from router/landlock.c when a C compiler is
    there, else a stub that confines nothing and says so at each start (`hoshikage check`
    too). Says which, for the installer to print."""
    why = build_native(path, LANDLOCK_C)
    if why is None:
        return f"{path}: compiled from router/landlock.c"
    text = LANDLOCK_STUB.format(python=python or sys.executable)
    write_atomic(Path(path), text.encode())
    os.chmod(path, 0o755)
    return f"{path}: a stub ({why}): the router runs without its file-system confinement"
