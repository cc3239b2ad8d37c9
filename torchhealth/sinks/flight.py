"""A flight recorder: dense history around a fault, sparse logging otherwise."""
from __future__ import annotations

from collections import deque

from ..report import Report
from .base import Sink


class FlightRecorder(Sink):
    """Keeps the last `capacity` checks in memory and passes to `sink` only
    every `every`-th step, until a check fires (a finding of severity warning
    or error): then the checks kept since the last one written go out, in step
    order, ending with the one that fired. The log then shows what led up to a
    fault even when it is written every 100 steps.

    Two ways to feed it, once per check:

    - ``record(result)`` with the `CheckResult` that ``HealthMonitor.check``
      returns (None between checks is ignored). Nothing is read from the
      device for it: the result keeps its statistics where they are (on a
      GPU, a copy in flight to pinned memory) and a Report is built only for
      the checks that get written. The recorder looks at a result once its
      copy has landed (``result.ready``) and never waits for one, except in
      `flush` and `close`. Here a check fires when ``result.fired`` (a check
      whose policy is not "ignore") and its Report has a warning or error.
    - ``write(report)`` / ``recorder(report)`` with Reports, e.g.
      ``monitor.on_report(recorder)``: simpler, but every check then becomes a
      host-side Report.
    """

    def __init__(self, sink: Sink, *, capacity: int = 32, every: int = 1):
        if capacity < 1 or every < 1:
            raise ValueError(f"FlightRecorder: capacity and every must be >= 1, "
                             f"got {capacity} and {every}")
        self.sink = sink
        self.every = every
        self._recent: deque[list] = deque(maxlen=capacity)  # [report or result, written, seen]

    @property
    def recent(self) -> list[Report]:
        """The checks in memory as Reports, oldest first (builds them)."""
        return [_report(e[0]) for e in self._recent]

    def write(self, report: Report) -> None:
        self._recent.append([report, False, False])
        self._scan(block=True)

    def record(self, result) -> None:
        """Keeps a `CheckResult` (or ignores None, a step that was not checked)."""
        if result is not None:
            self._recent.append([result, False, False])
            self._scan(block=False)

    def flush(self) -> None:
        """Looks at every check kept so far, waiting for results still in flight."""
        self._scan(block=True)

    def close(self) -> None:
        self.flush()
        self.sink.close()

    def _scan(self, block: bool) -> None:
        # In order: a result still in flight holds back the ones after it.
        for i, e in enumerate(self._recent):
            if e[2]:
                continue
            item = e[0]
            if not (block or isinstance(item, Report) or item.ready):
                return
            e[2] = True
            fired = not item.ok if isinstance(item, Report) else (item.fired and not item.report().ok)
            if fired:  # what came after the last check written, so the log stays in step order
                due = []
                for back in reversed(list(self._recent)[:i + 1]):
                    if back[1]:
                        break
                    due.insert(0, back)
            else:
                due = [e] if item.step % self.every == 0 else []
            for d in due:
                self.sink.write(_report(d[0]))
                d[1] = True


def _report(item) -> Report:
    return item if isinstance(item, Report) else item.report()
