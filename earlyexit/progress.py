"""Progress for long jobs: a bar on a terminal, one-line reports everywhere else.

A training run or a demo writes to a terminal when a person watches it, and to a log file, a
pipe, CI or a notebook otherwise. A progress bar is useless in the second case (tqdm either
prints nothing useful or floods the log with carriage returns), and silence for half an hour
is worse. :class:`Progress` shows a tqdm bar when standard error is a terminal and otherwise
logs one line every ``every_s`` seconds (and at the first and last update): what runs, the
count, the rate, an ETA, and whatever the caller adds (loss, tokens/s).

``EARLYEXIT_PROGRESS_EVERY`` (seconds) overrides the default interval of 30 s, which keeps
a log line at least every minute without flooding it.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable

DEFAULT_EVERY_S = 30.0


def _every_s() -> float:
    try:
        return max(0.0, float(os.environ.get("EARLYEXIT_PROGRESS_EVERY", DEFAULT_EVERY_S)))
    except ValueError:
        return DEFAULT_EVERY_S


def fmt_seconds(s: float) -> str:
    """``42 s``, ``3.5 min``, ``1.2 h``: the unit a person reads fastest."""
    if s >= 5400:
        return f"{s / 3600:.1f} h"
    return f"{s / 60:.1f} min" if s >= 90 else f"{s:.0f} s"


class Progress:
    """Progress of ``total`` units of work named ``desc``.

    Args:
        total: units of work (steps, runs).
        desc: what runs, as it should read at the start of each line.
        log: where one-line reports go (default: standard error).
        unit: the unit's name (``step``).
        initial: units already done (a resumed run).
        tty: force the bar (True) or the lines (False); default: whether stderr is a terminal.
        every_s: seconds between lines (default ``EARLYEXIT_PROGRESS_EVERY`` or 30).
    """

    def __init__(
        self,
        total: int,
        desc: str,
        log: Callable[[str], None] | None = None,
        unit: str = "step",
        initial: int = 0,
        tty: bool | None = None,
        every_s: float | None = None,
    ) -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.n = self.start_n = initial
        self.log = log or (lambda m: print(m, file=sys.stderr, flush=True))
        self.every_s = _every_s() if every_s is None else every_s
        self.t0 = self.last = time.perf_counter()
        self.post: dict[str, str] = {}
        self.bar = None
        if sys.stderr.isatty() if tty is None else tty:
            from tqdm import tqdm

            self.bar = tqdm(
                total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, leave=False
            )

    def rate(self) -> float:
        """Units per second since this object started (resumed units excluded)."""
        return (self.n - self.start_n) / max(time.perf_counter() - self.t0, 1e-9)

    def eta_s(self) -> float | None:
        r = self.rate()
        return (self.total - self.n) / r if r > 0 else None

    def update(self, n: int = 1, **postfix) -> None:
        """``n`` more units done; ``postfix`` values are shown beside the count."""
        self.n += n
        self.post.update({k: str(v) for k, v in postfix.items()})
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix(self.post, refresh=False)
            return
        now = time.perf_counter()
        first = self.n - n == self.start_n
        if first or self.n >= self.total or now - self.last >= self.every_s:
            self.last = now
            self.log(self.line())

    def line(self) -> str:
        """The one-line report: ``desc: 40/200 steps (20%), loss 3.1, 1.5 step/s, ETA 2 min``."""
        pct = f" ({self.n / self.total:.0%})" if self.total else ""
        parts = [f"{self.desc}: {self.n}/{self.total} {self.unit}s{pct}"]
        parts += [f"{k} {v}" for k, v in self.post.items()]
        r = self.rate()
        if r > 0:
            parts.append(f"{r:.2f} {self.unit}/s" if r >= 0.1 else f"{1 / r:.1f} s/{self.unit}")
        eta = self.eta_s()
        if eta is not None and self.n < self.total:
            parts.append(f"ETA {fmt_seconds(eta)}")
        return ", ".join(parts)

    def write(self, message: str) -> None:
        """A message that does not break the bar."""
        if self.bar is not None:
            self.bar.write(message, file=sys.stderr)
        else:
            self.log(message)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class NoProgress:
    """The same interface, silent (``--no-progress``, ``--json``, non-main ranks)."""

    n = 0

    def update(self, n: int = 1, **postfix) -> None:
        pass

    def write(self, message: str) -> None:
        pass

    def close(self) -> None:
        pass


def progress(on: bool, *args, **kwargs) -> Progress | NoProgress:
    """:class:`Progress` when ``on``, else a silent stand-in."""
    return Progress(*args, **kwargs) if on else NoProgress()
