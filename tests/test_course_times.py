"""The course's times come from one source and are honest.

Each notebook's section tags are the source: its "**Time:** X min (core Y min)" header and its row of
`COURSE` equal their sums, README.md's table and notebook 00's course table repeat `COURSE`, and the two
90-minute lab plans add up from the sections they name. A tag is honest when it covers reading (150 words a
minute), the cells' measured full-mode run time (benchmarks/results/notebook_times.json, written by
`scripts/course_times.py --measure`) and writing the section's exercises."""

import json
import re
from pathlib import Path

import pytest

from ernie_lab.course import notebook, times

ROOT = Path(__file__).resolve().parent.parent
SOURCES = times.notebook_sources(ROOT / "notebooks")
TIMINGS = json.loads((ROOT / "benchmarks" / "results" / "notebook_times.json").read_text())["notebooks"]
LESSONS = {lesson.number: lesson for lesson in notebook.COURSE}


@pytest.mark.parametrize("number", sorted(SOURCES))
def test_every_section_is_tagged_and_the_header_is_their_sum(number):
    text = SOURCES[number].read_text()
    untagged = [s.title for s in times.sections(text)[1:] if s.tag is None and s.title not in times.UNTIMED]
    assert not untagged, f"{number}: sections without '· core, N min' or '· optional, N min': {untagged}"
    assert times.stated_time(text) == times.tagged_time(text), \
        f"{number}: the header says {times.stated_time(text)} (total, core); the section tags add up to {times.tagged_time(text)}"
    assert (LESSONS[number].minutes, LESSONS[number].core) == times.tagged_time(text), f"{number}: COURSE disagrees"


@pytest.mark.parametrize("number", sorted(SOURCES))
def test_every_tag_covers_reading_running_and_writing(number):
    text = SOURCES[number].read_text()
    for section in times.timed_sections(text):
        try:
            run = times.run_seconds(text, section, TIMINGS[number]["cells"])
        except KeyError:
            pytest.fail(f"{number} '{section.title}': a code cell changed since its run time was measured "
                        f"(python scripts/course_times.py --measure --only {number})")
        assert section.minutes >= section.honest_minutes(run), (
            f"{number} '{section.title}': tagged {section.minutes} min, but reading {section.reading_minutes():.1f} + "
            f"running {run / 60:.1f} + writing {section.writing_minutes()} min need {section.honest_minutes(run)}")


def test_readme_shows_the_course_table():
    assert notebook.course_table() in (ROOT / "README.md").read_text(), \
        "README's course table differs from notebook.course_table() (paste it from there)"


def test_notebook_00_shows_the_course_from_the_table():
    text = SOURCES["00"].read_text()
    assert "notebook.course_table()" in text and "notebook.lab_plan_text" in text
    assert not re.search(r"^# \| 0\d ", text, re.MULTILINE), "00 still has a hand-written course table"


@pytest.mark.parametrize("track", sorted(notebook.LAB_PLANS))
def test_lab_plans_fit_ninety_minutes_of_core_sections(track):
    total = 0
    for number, titles in notebook.LAB_PLANS[track]:
        found = {s.title: s for s in times.timed_sections(SOURCES[number].read_text())}
        for title in titles:
            assert title in found, f"{track} plan: notebook {number} has no section {title!r}"
            total += found[title].minutes
    assert total <= 90, f"the {track} lab plan needs {total} min"
    readme = (ROOT / "README.md").read_text()
    assert notebook.lab_plan_text(track) in readme, f"README's {track} lab plan differs from notebook.LAB_PLANS"
