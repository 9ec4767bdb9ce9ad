"""The course's autograder: `python -m autograder {generate,grade,grade-all,selfcheck,bench}`.

It drives the real nbgrader (generate_assignment, autograde, generate_feedback, gradebook)
in throw-away course directories; see autograder/workspace.py.
"""
