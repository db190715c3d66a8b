"""How long each notebook takes, honestly: the one place where a section's minutes are checked.

A notebook states its time twice, and both come from its own section headings::

    # ## 3 · Causal grouped-query attention · core, 25 min

Every `## ` heading carries a tag, *core* (the lab needs it) or *optional*, and its minutes; the
header's "**Time:** X min (core Y min)" is their sum, and `COURSE` in `notebook.py` (hence README.md,
notebook 00 and the course map) repeats those two sums. `tests/test_course_times.py` checks all of
them against each other.

The minutes are honest when each section's tag covers at least

    reading  = the words of its markdown and code / 150 words a minute (technical prose),
    running  = its cells' run time in full mode on a 2-core laptop, measured by
               `scripts/course_times.py --measure` into benchmarks/results/notebook_times.json,
    writing  = 10 minutes per "write the function" exercise, 3 per "give a number" one.

`scripts/course_times.py` prints that table; the test fails a section whose tag is below it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

WORDS_PER_MINUTE = 150
MINUTES_PER_FUNCTION_EXERCISE = 10
MINUTES_PER_VALUE_EXERCISE = 3
UNTIMED = ("Key takeaways", "What we built", "Further reading")   # short wrap-up sections, no tag
HEADING = re.compile(r"^# ## (?P<title>.+?)(?: · (?P<tag>core|optional), (?P<minutes>\d+) min)?\s*$")
HEADER_TIME = re.compile(r"\*\*Time:\*\* (?P<total>\d+) min \(core (?P<core>\d+) min\)")
EXERCISE = re.compile(r"""exercises\.(?:check|use)\(\s*["'](?P<name>\d\d\.\w+)["']\s*,\s*(?P<answer>\w+)""")


@dataclass
class Section:
    title: str
    tag: str | None                  # "core", "optional", or None for an untimed wrap-up
    minutes: int
    words: int = 0
    cells: list[int] = field(default_factory=list)          # indices of its cells in the notebook
    exercises: dict[str, str] = field(default_factory=dict)  # name -> "function" or "value"

    def reading_minutes(self) -> float:
        return self.words / WORDS_PER_MINUTE

    def writing_minutes(self) -> int:
        return sum(MINUTES_PER_FUNCTION_EXERCISE if kind == "function" else MINUTES_PER_VALUE_EXERCISE
                   for kind in self.exercises.values())

    def honest_minutes(self, run_seconds: float) -> int:
        """The least a student needs: reading + running + writing, rounded up to a whole minute."""
        return math.ceil(self.reading_minutes() + run_seconds / 60 + self.writing_minutes())


def cells(source: str) -> list[tuple[str, str]]:
    """(kind, text) of every cell of a jupytext py:percent source, in order (the YAML header dropped)."""
    parts = re.split(r"^# %%(.*)$", source, flags=re.MULTILINE)
    out = []
    for marker, body in zip(parts[1::2], parts[2::2]):
        out.append(("markdown" if "[markdown]" in marker else "code", body.strip("\n")))
    return out


def sections(source: str) -> list[Section]:
    """The notebook's sections in order, as headed. The cells before the first heading (title, set-up)
    form an untagged "Introduction"; `timed_sections` counts untagged ones into a tagged neighbour."""
    found = [Section("Introduction", None, 0)]
    functions = set(re.findall(r"^(?:def|class) (\w+)\b", source, flags=re.MULTILINE))   # what the student writes
    for index, (kind, text) in enumerate(cells(source)):
        for line in text.splitlines() if kind == "markdown" else ():
            heading = HEADING.match(line)
            if heading:
                found.append(Section(heading["title"].strip(), heading["tag"], int(heading["minutes"] or 0)))
        section = found[-1]
        section.cells.append(index)
        section.words += len(re.findall(r"[A-Za-z0-9_]+", text))
        for match in EXERCISE.finditer(text) if kind == "code" else ():
            section.exercises.setdefault(match["name"], "function" if match["answer"] in functions else "value")
    return found


def timed_sections(source: str) -> list[Section]:
    """The tagged sections, each also carrying the untagged ones around it: the introduction goes to the
    first tagged section, a wrap-up (takeaways, what we built, further reading) to the one before it."""
    timed: list[Section] = []
    pending: list[Section] = []
    for section in sections(source):
        if section.tag is None:
            if timed:
                _absorb(timed[-1], section)
            else:
                pending.append(section)
            continue
        for early in pending:
            _absorb(section, early)
        pending = []
        timed.append(section)
    return timed


def _absorb(into: Section, other: Section) -> None:
    into.words += other.words
    into.cells = sorted(into.cells + other.cells)
    into.exercises.update(other.exercises)


def stated_time(source: str) -> tuple[int, int] | None:
    """(total, core) minutes from the header's "**Time:** X min (core Y min)", or None."""
    match = HEADER_TIME.search(source.replace("\n# ", " "))
    return (int(match["total"]), int(match["core"])) if match else None


def tagged_time(source: str) -> tuple[int, int]:
    """(total, core) minutes: the sums of the section tags."""
    timed = timed_sections(source)
    return sum(s.minutes for s in timed), sum(s.minutes for s in timed if s.tag == "core")


def cell_key(text: str) -> str:
    """A code cell's identity in the timings file: a hash of its source (markdown edits never make timings stale)."""
    import hashlib

    return hashlib.sha1(text.strip().encode()).hexdigest()[:16]


def run_seconds(source: str, section: Section, timings: dict[str, float]) -> float:
    """A section's measured run time: the seconds recorded for each of its code cells (KeyError: not measured)."""
    all_cells = cells(source)
    return sum(timings[cell_key(all_cells[i][1])] for i in section.cells if all_cells[i][0] == "code")


def notebook_sources(folder: Path) -> dict[str, Path]:
    """{"01": notebooks/01_dense_decoder_from_scratch.py, ...}"""
    return {path.name[:2]: path for path in sorted(folder.glob("[0-9][0-9]_*.py"))}
