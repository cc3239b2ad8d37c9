"""What every ``torchhealth`` command shares: errors reported as one line with
an exit status, an argument parser that fails that way, and the one style of
progress bar."""
from __future__ import annotations

import argparse
import sys
import time

EXIT_ERROR, EXIT_USAGE = 1, 2


class CommandError(Exception):
    """A failure to report as one line (and the exit status)."""

    def __init__(self, message: str, status: int = EXIT_ERROR):
        super().__init__(message)
        self.status = status


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are a `CommandError` of one line."""

    def error(self, message: str):  # one line instead of usage + message
        raise CommandError(f"{self.prog}: {message} (see {self.prog} --help)", EXIT_USAGE)


# -- progress ----------------------------------------------------------------------------
class Progress:
    """``progress(i, total[, what])`` callback drawing one bar style for every
    command on `stream` (stderr): tqdm when it is installed, else a plain bar
    redrawn at most 10 times a second. On a stream that is not a terminal (a
    log file, a CI job) nothing is redrawn: `close` writes the final state as
    one line; `live` forces either way. Call `close` at the end."""

    def __init__(self, label: str, stream=None, *, use_tqdm: bool | None = None, width: int = 30,
                 unit: str = "step", live: bool | None = None):
        self.label, self.stream, self.width, self.unit = label, stream or sys.stderr, width, unit
        isatty = getattr(self.stream, "isatty", None)
        self.live = live if live is not None else bool(isatty and isatty())
        self._tqdm = None
        if use_tqdm is not False and self.live:
            try:
                from tqdm import tqdm
                self._tqdm = tqdm(desc=label, unit=unit, file=self.stream, leave=True)
            except ImportError:
                if use_tqdm:
                    raise
        self._t0 = time.perf_counter()
        self._drawn = 0.0
        self._last = (0, 0)

    def __call__(self, i: int, total: int, what: str = "") -> None:
        self._last = (i, total)
        if not self.live:
            return
        if self._tqdm is not None:
            self._tqdm.total = total
            self._tqdm.set_postfix_str(what[:40], refresh=False)
            self._tqdm.update(i - self._tqdm.n)
            return
        now = time.perf_counter()
        if i < total and now - self._drawn < 0.1:
            return
        self._drawn = now
        self.stream.write("\r" + self._line(i, total, now))
        self.stream.flush()

    def _line(self, i: int, total: int, now: float) -> str:
        done = int(self.width * i / total) if total else self.width
        return (f"{self.label} [{'#' * done}{'.' * (self.width - done)}] "
                f"{i}/{total} {self.unit}s {now - self._t0:5.1f} s")

    def close(self) -> None:
        if self._tqdm is not None:
            self._tqdm.close()
        elif self._last != (0, 0):
            i = self._last[0]
            self.stream.write(("\r" if self.live else "") + self._line(i, i, time.perf_counter()) + "\n")
            self.stream.flush()
