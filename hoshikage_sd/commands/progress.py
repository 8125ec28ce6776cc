"""What `hoshikage load` shows while a model loads: a bar on a terminal, plain lines
otherwise (a log, a pipe). Pure: manual.load samples the unit and hands the samples here."""

from __future__ import annotations

import shutil
import time
from collections import deque
from dataclasses import dataclass
from typing import TextIO

from hoshikage_sd import fmt

#: how far back the rate looks (a copy's speed varies with the page cache)
RATE_WINDOW = 2.0
#: plain lines while staging: at most one a this many seconds
PLAIN_EVERY = 1.0
BAR_WIDTH = 24


@dataclass(frozen=True)
class Step:
    """One look at the load: its phase ("waiting", "staging", "loading") and, staging,
    the bytes copied so far of `total` (None: unknown); loading, the unit's memory (what
    llama-server has read of the model shows there: its pages are charged to the unit)."""

    phase: str
    done: int = 0
    total: int | None = None
    detail: str = ""   # the unit's STATUS= while waiting (admission, another copy)


class Rate:
    """Bytes a second over the last RATE_WINDOW seconds of samples."""

    def __init__(self) -> None:
        self.samples: deque[tuple[float, int]] = deque()

    def add(self, at: float, done: int) -> float | None:
        if self.samples and done < self.samples[-1][1]:
            self.samples.clear()  # a new copy (restaged)
        self.samples.append((at, done))
        while len(self.samples) > 2 and at - self.samples[1][0] >= RATE_WINDOW:
            self.samples.popleft()
        (t0, d0), (t1, d1) = self.samples[0], self.samples[-1]
        return (d1 - d0) / (t1 - t0) if t1 > t0 else None


def bar(done: int, total: int, width: int = BAR_WIDTH) -> str:
    filled = width * min(done, total) // max(total, 1)
    return "[" + "#" * filled + "." * (width - filled) + "]"


def describe(name: str, step: Step, rate: float | None) -> str:
    """The step as words: 'staging tiny: 1.2 GiB of 4.0 GiB (30%), 850.0 MiB/s'."""
    if step.phase == "staging":
        of = f" of {fmt.size(step.total)} ({100 * min(step.done, step.total) // step.total}%)" \
            if step.total else ""
        speed = f", {fmt.size(rate)}/s" if rate else ""
        return f"staging {name}: {fmt.size(step.done)}{of}{speed}"
    if step.phase == "loading":
        return f"loading {name} (llama-server)" + \
            (f": {fmt.size(step.done)} in memory" if step.done else "")
    # the unit's own words: "waiting for room: ...", "stopping a, b" (evicting for it)
    return f"{name}: {step.detail}" if step.detail else f"starting {name}"


class Display:
    """Writes the steps to `out`: on a terminal one line redrawn (a bar while staging);
    elsewhere a line per phase, and while staging at most one a PLAIN_EVERY."""

    def __init__(self, name: str, out: TextIO, tty: bool, colour: bool = False) -> None:
        self.name, self.out, self.tty, self.colour = name, out, tty, colour
        self.rate = Rate()
        self.last: Step | None = None
        self.last_plain = 0.0
        self.width = 0
        # a line wider than the terminal wraps, and \r then redraws only its last part
        self.columns = shutil.get_terminal_size().columns - 1 if tty else 0

    def show(self, step: Step, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        rate = self.rate.add(now, step.done) if step.phase == "staging" else None
        previous, self.last = self.last, step
        text = describe(self.name, step, rate)
        if self.tty:
            if step.phase == "staging" and step.total:
                text = f"{bar(step.done, step.total)} {text}"
            self._redraw(text)
            return
        changed = previous is None or step.phase != previous.phase or \
            step.detail != previous.detail
        moved = previous is not None and step.done != previous.done
        if changed or (moved and now - self.last_plain >= PLAIN_EVERY):
            self.last_plain = now
            print(text, file=self.out, flush=True)

    def finish(self, text: str | None) -> None:
        """The end: a terminal's progress line cleared, then `text` (loaded; None when it
        failed: the error follows on stderr)."""
        if self.tty and self.width:
            self._redraw("")
            self.out.write("\r")
            self.width = 0
        if text:
            print(fmt.paint(text, "32", self.colour), file=self.out, flush=True)

    def _redraw(self, text: str) -> None:
        text = text[: self.columns] if self.columns > 0 else text
        pad = max(0, self.width - len(text))
        self.out.write("\r" + text + " " * pad)
        self.out.flush()
        self.width = len(text)
