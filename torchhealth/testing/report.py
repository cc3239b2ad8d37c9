"""`SanityReport`: the outcome of a sanity suite, one `CheckResult` per check.

A check either passed, failed (with the evidence and the names of the
parameters, modules or fields at fault) or was not applicable (with the reason,
e.g. ``output_range=`` not given). ``str(report)`` is a table meant for a
pytest failure; `SanityReport.raise_if_failed` raises an `AssertionError` that
lists every failure.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

PASSED, FAILED, NOT_APPLICABLE = "passed", "failed", "not applicable"


class Status(str, Enum):
    PASSED = PASSED
    FAILED = FAILED
    NOT_APPLICABLE = NOT_APPLICABLE


@dataclass(frozen=True)
class CheckResult:
    """One check's verdict.

    ``message`` is a sentence: what was checked and, on failure, what is wrong
    and the likely bug. ``names`` are the parameters, modules or fields at
    fault (empty when the check passed). ``evidence`` holds the numbers the
    verdict rests on (e.g. the loss before and after), JSON-friendly.
    """

    name: str
    status: Status
    message: str
    names: tuple[str, ...] = ()
    evidence: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.status is Status.PASSED

    @property
    def failed(self) -> bool:
        return self.status is Status.FAILED

    def __str__(self) -> str:
        text = f"[{self.status.value}] {self.name}: {self.message}"
        if self.names:
            text += "\n    at: " + ", ".join(self.names)
        return text


def passed(name: str, message: str, **evidence: Any) -> CheckResult:
    return CheckResult(name, Status.PASSED, message, (), evidence)


def failed(name: str, message: str, names=(), **evidence: Any) -> CheckResult:
    return CheckResult(name, Status.FAILED, message, tuple(names), evidence)


def not_applicable(name: str, reason: str) -> CheckResult:
    return CheckResult(name, Status.NOT_APPLICABLE, reason)


@dataclass(frozen=True)
class SanityReport:
    """The results of a sanity suite, in the order the checks ran.

    ``subject`` says what was checked (a model's class name, "batch",
    "loader"). Index by check name: ``report["connected"]``.
    """

    results: tuple[CheckResult, ...]
    subject: str = ""

    @property
    def ok(self) -> bool:
        """True when no check failed (not-applicable checks do not count)."""
        return not self.failures

    @property
    def failures(self) -> list[CheckResult]:
        return [r for r in self.results if r.failed]

    def __getitem__(self, name: str) -> CheckResult:
        for r in self.results:
            if r.name == name:
                return r
        raise KeyError(f"SanityReport has no check named {name!r}; it has "
                       f"{[r.name for r in self.results]}")

    def __contains__(self, name: str) -> bool:
        return any(r.name == name for r in self.results)

    def __iter__(self):
        return iter(self.results)

    def __len__(self) -> int:
        return len(self.results)

    def __add__(self, other: SanityReport) -> SanityReport:
        return SanityReport(self.results + other.results, self.subject or other.subject)

    def __str__(self) -> str:
        counts = {s: sum(r.status is s for r in self.results) for s in Status}
        head = (f"SanityReport{' of ' + self.subject if self.subject else ''}: "
                f"{counts[Status.FAILED]} failed, {counts[Status.PASSED]} passed, "
                f"{counts[Status.NOT_APPLICABLE]} not applicable")
        order = {Status.FAILED: 0, Status.PASSED: 1, Status.NOT_APPLICABLE: 2}
        body = [str(r) for r in sorted(self.results, key=lambda r: order[r.status])]
        return "\n".join([head] + ["  " + line for text in body for line in text.split("\n")])

    def to_dict(self) -> dict[str, Any]:
        return {"subject": self.subject,
                "results": [{"name": r.name, "status": r.status.value, "message": r.message,
                             "names": list(r.names), "evidence": dict(r.evidence)}
                            for r in self.results]}

    def raise_if_failed(self) -> SanityReport:
        """Raise an `AssertionError` listing every failed check; else return self."""
        if self.failures:
            names = ", ".join(r.name for r in self.failures)
            raise AssertionError(f"{len(self.failures)} sanity check(s) failed"
                                 f"{' for ' + self.subject if self.subject else ''} ({names}):\n"
                                 f"{self}")
        return self
