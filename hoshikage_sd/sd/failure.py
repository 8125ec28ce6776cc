"""Why a unit failed, in words, from what systemd recorded (its Result and the main process's
exit): for a start that failed before hoshikage's own code could say why, e.g. a unit
directory systemd could not set up (status 239/CACHE_DIRECTORY)."""

from __future__ import annotations

import shlex

from hoshikage_sd.sd import units

#: systemd's own exit statuses: the step of a unit's setup that failed before its command
#: ran (systemd.exec(5), "Process exit codes"; as `systemd-analyze exit-status` lists them)
SETUP_STEPS = dict(enumerate([
    "CHDIR", "NICE", "FDS", "EXEC", "MEMORY", "LIMITS", "OOM_ADJUST", "SIGNAL_MASK", "STDIN",
    "STDOUT", "CHROOT", "IOPRIO", "TIMERSLACK", "SECUREBITS", "SETSCHEDULER", "CPUAFFINITY",
    "GROUP", "USER", "CAPABILITIES", "CGROUP", "SETSID", "CONFIRM", "STDERR", "-", "PAM",
    "NETWORK", "NAMESPACE", "NO_NEW_PRIVILEGES", "SECCOMP", "SELINUX_CONTEXT", "PERSONALITY",
    "APPARMOR", "ADDRESS_FAMILIES", "RUNTIME_DIRECTORY", "-", "CHOWN", "SMACK_PROCESS_LABEL",
    "KEYRING", "STATE_DIRECTORY", "CACHE_DIRECTORY", "LOGS_DIRECTORY",
    "CONFIGURATION_DIRECTORY", "NUMA_POLICY", "CREDENTIALS", "BPF"], start=200))

#: what a Result other than exit-code says
RESULTS = {
    "signal": "its process was killed by a signal",
    "core-dump": "its process crashed (core dumped)",
    "oom-kill": "the kernel's out-of-memory killer stopped it",
    "timeout": "it did not start within its TimeoutStartSec=",
    "start-limit-hit": "it was started too often (its start limit)",
    "resources": "systemd could not set it up (resources)",
    "exit-code": "its process exited with an error",
}


def words(result: str, code: str, status: str) -> str:
    """`Result`, `ExecMainCode` (1 exited, 2 killed, 3 dumped: the CLD_* numbers) and
    `ExecMainStatus` as systemctl shows them, in a sentence."""
    number = int(status) if status.isdigit() else None
    if result == "exit-code" and code in ("", "1") and number is not None:
        step = SETUP_STEPS.get(number, "-")
        if step != "-":
            return f"systemd could not set up its process: status {number}/{step}"
        return f"its process exited with status {number}"
    if result in ("signal", "core-dump") and number is not None:
        import signal

        try:
            name = signal.Signals(number).name
        except ValueError:
            name = str(number)
        return f"{RESULTS[result]} ({name})"
    return RESULTS.get(result, f"its unit failed ({result or 'unknown'})")


def why_failed(unit: str) -> str:
    """Why the unit failed, as systemd recorded it, and where to read more."""
    shown = units.show(unit, "Result", "ExecMainCode", "ExecMainStatus")
    said = words(shown.get("Result", ""), shown.get("ExecMainCode", ""),
                 shown.get("ExecMainStatus", ""))
    return f"{said} (journalctl -u {shlex.quote(unit)})"
