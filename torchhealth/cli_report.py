"""``torchhealth report RUN.jsonl``: the HTML report of a JSON Lines log.

    torchhealth report RUN.jsonl [-o OUT.html] [--partial] [--run N]
                       [--heatmaps N | --heatmap PATTERN ...]
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .cli_support import EXIT_USAGE, CommandError


def add_parser(sub) -> argparse.ArgumentParser:
    """Adds the ``report`` command to `sub` (the subparsers of ``torchhealth``)."""
    r = sub.add_parser("report", help="write the HTML report of a JSON Lines log",
                       prog="torchhealth report")
    r.add_argument("log", metavar="RUN.jsonl", help="a log written by JsonlSink (.jsonl or .jsonl.gz)")
    r.add_argument("-o", "--output", metavar="OUT.html",
                   help="where to write the report (default: next to the log, ending in .html)")
    r.add_argument("--partial", action="store_true",
                   help="report the complete records of a truncated or damaged log instead of "
                   "failing (the skipped lines are listed on stderr)")
    r.add_argument("--run", type=int, default=-1, metavar="N",
                   help="which run of a log that holds several (each opening of JsonlSink starts "
                   "one): 1 for the first, -1 (default) for the latest")
    which = r.add_mutually_exclusive_group()
    which.add_argument("--heatmaps", type=int, default=None, metavar="N",
                       help="histogram heatmaps for the N worst parameters (default: 4; 0 for none)")
    which.add_argument("--heatmap", action="append", metavar="PATTERN",
                       help="a heatmap for each parameter this name or glob pattern matches "
                       "(quote it: 'layers.*.weight'); repeat it for more, drawn in that order")
    return r


def run(args) -> int:
    from .html_report import match_names, write_report
    from .sinks.jsonl import TruncatedLogError, read_jsonl
    log = Path(args.log)
    if not log.is_file():
        raise CommandError(f"torchhealth report: {log}: no such file" if not log.exists()
                           else f"torchhealth report: {log} is not a file")
    if args.heatmaps is not None and args.heatmaps < 0:
        raise CommandError(f"torchhealth report: --heatmaps {args.heatmaps}: give a number >= 0", EXIT_USAGE)
    out = Path(args.output) if args.output else log.with_name(
        log.name.removesuffix(".gz").removesuffix(".jsonl") + ".html")
    if out.resolve() == log.resolve() or (out.exists() and os.path.samefile(out, log)):
        raise CommandError(f"torchhealth report: the output {out} is the log itself; "
                           "choose another -o", EXIT_USAGE)
    try:
        records = read_jsonl(log, errors="skip" if args.partial else "raise")
    except TruncatedLogError as e:
        raise CommandError(f"torchhealth report: {e} (add --partial to report the "
                           f"{len(e.reports)} complete records)") from e
    except ValueError as e:
        raise CommandError(f"torchhealth report: {e} (add --partial to skip damaged lines)") from e
    except OSError as e:
        raise CommandError(f"torchhealth report: {e}") from e
    if records.damage:
        print(_damage_note(log, records.damage), file=sys.stderr)
    runs = records.runs
    if not runs:
        raise CommandError(f"torchhealth report: {log} holds no record")
    if not -len(runs) <= args.run <= len(runs) or args.run == 0:
        raise CommandError(f"torchhealth report: --run {args.run}: the log holds {len(runs)} run(s), "
                           f"1 to {len(runs)} (or -1 for the latest)", EXIT_USAGE)
    k = args.run - 1 if args.run > 0 else len(runs) + args.run
    reports = runs[k].reports
    which = f"run {k + 1} of {len(runs)} in {log}" if len(runs) > 1 else str(log)
    heatmaps = args.heatmap or (4 if args.heatmaps is None else args.heatmaps)
    if args.heatmap:  # a pattern that matches nothing is a mistake in the command: say so before drawing
        try:
            match_names((r.name for rep in reports for r in rep.rows), args.heatmap)
        except ValueError as e:
            raise CommandError(f"torchhealth report: --heatmap: {e}", EXIT_USAGE) from e
    try:
        write_report(reports, out, source=which, heatmaps=heatmaps)
    except OSError as e:
        raise CommandError(f"torchhealth report: cannot write {out}: {e}") from e
    print(f"{out} ({len(reports)} records, steps {reports[0].step}-{reports[-1].step}"
          f"{f'; run {k + 1} of {len(runs)}, --run N shows another' if len(runs) > 1 else ''})")
    return 0


def _damage_note(log, damage) -> str:
    """One line saying which lines of `log` a partial read skipped."""
    shown = "; ".join(str(d) for d in damage[:3])
    more = f"; and {len(damage) - 3} more" if len(damage) > 3 else ""
    return f"torchhealth report: {log}: skipped {len(damage)} damaged line(s): {shown}{more}"
