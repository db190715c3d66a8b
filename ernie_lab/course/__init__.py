"""The course: what the notebooks need and nothing else uses.

    exercises       the exercise checker (check, exercise, Mismatch, ...)
    exercise_sets   each notebook's checks, one module per notebook
    notebook        notebook helpers and the course table (COURSE)

May import anything in ``ernie_lab``; nothing in ``ernie_lab`` imports it.
"""
