"""The sink interface: something that receives every Report it is given."""
from __future__ import annotations

from ..report import Report


class Sink:
    """Receives Reports. A sink is callable, so it can be passed wherever a
    report callback is taken (``on_report=sink``), and is a context manager
    that closes it."""

    def write(self, report: Report) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Flush and release what the sink holds; writing after close is an error."""

    def __call__(self, report: Report) -> None:
        self.write(report)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def scalars(report: Report, per_tensor: bool = True) -> dict[str, float]:
    """The Report as flat named numbers for metric loggers: totals under
    ``health/`` (``grad_norm`` is NaN or inf on a step with non-finite gradients,
    as PyTorch, Lightning and the Trainer log it; ``finite_grad_norm`` is the norm
    of the finite values), and per tensor ``<role>_norm/<name>``, ``<role>_absmax/<name>``
    and ``<role>_nonfinite/<name>``."""
    out = {"health/grad_norm": report.grad_norm, "health/finite_grad_norm": report.finite_grad_norm,
           "health/param_norm": report.param_norm,
           "health/nonfinite": float(report.nonfinite()),
           "health/findings": float(len(report.findings)),
           "health/skipped": float(report.skipped)}
    if per_tensor:
        for r in report.rows:
            out[f"{r.role}_norm/{r.name}"] = r.l2norm
            out[f"{r.role}_absmax/{r.name}"] = r.absmax
            out[f"{r.role}_nonfinite/{r.name}"] = float(r.nonfinite)
    return out


USER = "user"  # the group (TensorBoard section, W&B panel) of the user's own scalars


def logged(report: Report) -> dict[str, float]:
    """The user's scalars of the Report (`HealthMonitor.log`) as ``user/<name>``,
    non-finite ones included. Kept apart from `scalars`, so that a framework
    callback that already logs the loss does not log it twice."""
    return {f"{USER}/{k}": v for k, v in report.scalars.items()}


def findings_text(report: Report) -> str:
    """The Report's findings as Markdown, one paragraph each (empty if none)."""
    return "\n\n".join(f"**{f.severity}** {f.check}: {f.message}" for f in report.findings)
