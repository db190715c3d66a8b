"""Measure how long the notebooks run, and print the honest time of every section.

    python scripts/course_times.py --measure [--only 01 02]   # full mode, writes benchmarks/results/notebook_times.json
    python scripts/course_times.py                             # the table, from the committed timings
    python scripts/course_times.py --fix                       # raise every tag below its honest minimum

Measuring runs each notebook once in FULL mode (ERNIE_LAB_FAST unset), with as many threads as the machine
has, and records every cell's wall time (nbclient's execution timestamps). Run it on an otherwise idle
machine: the figures are meant to be what a student's 2-core laptop does.
The table puts each section's tag beside reading (words / 150 a minute), running and writing the exercises
(`ernie_lab/course/times.py`), and marks a tag that is below their sum.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from ernie_lab.course import times  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "notebook_times.json"


def cell_seconds(nb) -> list[float]:
    """Wall seconds of every cell, from the timestamps nbclient records (0 for markdown)."""
    out = []
    for cell in nb.cells:
        stamps = cell.get("metadata", {}).get("execution", {})
        start, end = stamps.get("iopub.execute_input"), stamps.get("shell.execute_reply")
        if cell.cell_type != "code" or not (start and end):
            out.append(0.0)
            continue
        parse = lambda s: datetime.fromisoformat(s.replace("Z", "+00:00"))  # noqa: E731
        out.append(round((parse(end) - parse(start)).total_seconds(), 2))
    return out


def measure(numbers: list[str]) -> dict:
    sys.path.insert(0, str(ROOT / "scripts"))
    from build_html import execute, read_notebook

    os.environ.pop("ERNIE_LAB_FAST", None)                   # full mode: what a student runs
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"notebooks": {}}
    for number, source in times.notebook_sources(ROOT / "notebooks").items():
        if numbers and number not in numbers:
            continue
        nb = read_notebook(source)
        expected = len(times.cells(source.read_text()))
        if len(nb.cells) != expected:
            raise SystemExit(f"{source.name}: jupytext read {len(nb.cells)} cells, the parser {expected}")
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="course-times-") as work:
            execute(nb, Path(work), timeout=3600)
        seconds = cell_seconds(nb)
        by_cell = {times.cell_key(text): s for (kind, text), s in zip(times.cells(source.read_text()), seconds)
                   if kind == "code"}
        results["notebooks"][number] = {"cells": by_cell, "total_s": round(time.perf_counter() - start, 1)}
        print(f"{source.name}: {sum(seconds):.0f} s in cells", flush=True)
    results.update(machine=f"{platform.machine()}, {os.cpu_count()} cores, torch threads default",
                   measured=datetime.now(timezone.utc).strftime("%Y-%m-%d"),
                   note="full mode (ERNIE_LAB_FAST unset), one run per notebook, wall seconds per cell")
    RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    return results


def table(results: dict) -> list[str]:
    lines = []
    for number, source in times.notebook_sources(ROOT / "notebooks").items():
        text = source.read_text()
        timings = results.get("notebooks", {}).get(number, {}).get("cells", {})
        lines.append(f"\n{source.name}: stated {times.stated_time(text)}, tags {times.tagged_time(text)} (total, core)")
        for section in times.timed_sections(text):
            try:
                run = times.run_seconds(text, section, timings)
            except KeyError:
                run = float("nan")                                   # a cell changed since it was measured
            honest = section.honest_minutes(run) if run == run else -1
            flag = "" if section.minutes >= honest else "   <-- below the honest minimum"
            lines.append(f"  {section.tag:8} {section.minutes:3} min | read {section.reading_minutes():5.1f} run "
                         f"{run / 60:5.1f} write {section.writing_minutes():3} = {honest:3} | {section.title[:50]}{flag}")
    return lines


def fix(results: dict) -> None:
    """Raise each section tag below its honest minimum to that minimum, and rewrite the header's
    "**Time:** X min (core Y min)" as the sums; print the COURSE rows to paste. Only markdown changes."""
    import re

    for number, source in times.notebook_sources(ROOT / "notebooks").items():
        text = source.read_text()
        timings = results.get("notebooks", {}).get(number, {}).get("cells")
        if timings is None:
            print(f"{source.name}: not measured, left as it is")
            continue
        for section in times.timed_sections(text):
            honest = section.honest_minutes(times.run_seconds(text, section, timings))
            if section.minutes < honest:
                heading = re.compile(rf"^(# ## {re.escape(section.title)} · {section.tag}, ){section.minutes}( min)\s*$",
                                     re.MULTILINE)
                text, count = heading.subn(rf"\g<1>{honest}\g<2>", text)
                assert count == 1, (source.name, section.title)
        total, core = times.tagged_time(text)
        text, count = times.HEADER_TIME.subn(f"**Time:** {total} min (core {core} min)", text.replace(
            "**Time:**\n# ", "**Time:** "), count=1)
        if count != 1:
            print(f"{source.name}: no '**Time:** X min (core Y min)' on one line; write it as {total} / {core}")
        source.write_text(text)
        print(f'    Lesson("{number}", ..., {total}, {core}, ...)')


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--measure", action="store_true", help="run the notebooks in full mode and record cell times")
    parser.add_argument("--fix", action="store_true", help="raise tags below the honest minimum; rewrite the headers")
    parser.add_argument("--only", nargs="*", default=[], help="notebook numbers, e.g. 01 05")
    args = parser.parse_args(argv)
    results = measure(args.only) if args.measure else (json.loads(RESULTS.read_text()) if RESULTS.exists() else {})
    if args.fix:
        fix(results)
    print("\n".join(table(results)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
