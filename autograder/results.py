"""What grading produces: per cell, per notebook, per student; and how it is written as JSON."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from .spec import LessonSpec

STUDENT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,99}$")
NOT_IN_STUDENT_ID = re.compile(r"[^A-Za-z0-9_.@-]")


@dataclass
class CellResult:
    grade_id: str
    score: float
    max_score: float
    message: str | None = None  # why points were lost


@dataclass
class NotebookResult:
    assignment: str
    notebook: str
    score: float = 0.0
    max_score: float = 0.0
    cells: list[CellResult] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    review: list[str] = field(default_factory=list)
    feedback: str | None = None
    # Every cell that raised when graded, tests or not (selfcheck requires none in solutions).
    cell_errors: list[str] = field(default_factory=list)
    # What the lesson's profile is made of (autograder.profiles): measured, not reported.
    observed: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        data = {"assignment": self.assignment, "notebook": self.notebook, "score": self.score,
                "max_score": self.max_score,
                "cells": [{k: v for k, v in vars(c).items() if v is not None} for c in self.cells],
                "errors": list(self.errors), "review": list(self.review)}
        if self.feedback is not None:
            data["feedback"] = self.feedback
        return data

    @classmethod
    def from_json(cls, data: dict) -> "NotebookResult":
        cells = [CellResult(**c) for c in data.get("cells", [])]
        return cls(data["assignment"], data["notebook"], data.get("score", 0.0), data.get("max_score", 0.0), cells,
                   list(data.get("errors", [])), list(data.get("review", [])), data.get("feedback"),
                   list(data.get("cell_errors", [])), dict(data.get("observed", {})))


def empty_result(spec: LessonSpec, error: str | None = None) -> NotebookResult:
    """Zero out of the full marks, each test listed, with the reason."""
    result = NotebookResult(spec.lesson, spec.notebook, 0.0, spec.max_score,
                            [CellResult(t.grade_id, 0.0, t.points) for t in spec.tests])
    if error:
        result.errors.append(error)
    return result



@dataclass
class StudentResult:
    student: str
    notebooks: list[NotebookResult]

    @property
    def total(self) -> float:
        return sum(nb.score for nb in self.notebooks)

    @property
    def max_total(self) -> float:
        return sum(nb.max_score for nb in self.notebooks)

    def to_json(self) -> dict:
        return {"student": self.student, "total": self.total, "max_total": self.max_total,
                "notebooks": [nb.to_json() for nb in self.notebooks]}

    @classmethod
    def from_json(cls, data: dict) -> "StudentResult":
        return cls(data["student"], [NotebookResult.from_json(nb) for nb in data["notebooks"]])


def results_file_name(student: str) -> str:
    """A JSON file name for any folder name, also one that is not a usable student id."""
    return NOT_IN_STUDENT_ID.sub("_", student) + ".json"


def validate_student_id(student: str) -> str:
    if not STUDENT_ID.match(student):
        raise ValueError(
            f"student id {student!r} is not usable: use letters, digits, '.', '_', '-' or '@', "
            "starting with a letter or digit"
        )
    return student


def write_json(result: StudentResult, path: Path) -> None:
    """Written whole or not at all (a crash never leaves half a file that --resume would trust)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".partial")
    temporary.write_text(json.dumps(result.to_json(), indent=2) + "\n")
    temporary.replace(path)
