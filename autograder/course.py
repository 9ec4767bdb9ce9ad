"""Where the course's pieces live, and its one configuration file (course.toml)."""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from urllib.parse import urlparse


def find_root() -> Path:
    """The repository root: the folder holding course.toml.

    The autograder is installed editable, so its own location finds the repository even when
    the command runs from a sub-folder; COURSE_ROOT overrides both (used by tests on a copy).
    """
    override = os.environ.get("COURSE_ROOT")
    candidates = [Path(override)] if override else []
    candidates += [Path(__file__).resolve().parent.parent, Path.cwd()]
    for candidate in candidates:
        if (candidate / "course.toml").is_file():
            return candidate.resolve()
    raise SystemExit(
        "autograder: cannot find the course repository (no course.toml). "
        "Run `python -m autograder` from the repository root, or set COURSE_ROOT."
    )


@dataclass(frozen=True)
class Lesson:
    """One assignment: `solutions/<id>/<notebook>.ipynb` and its release in `lessons/`."""

    id: str
    title: str
    builds: str
    notebooks: tuple[str, ...]  # notebook names without .ipynb; empty when not built yet
    # A lesson with its own environment (course.toml: kernel, requirements) runs in this
    # Jupyter kernel; None means the main environment's default kernel.
    kernel: str | None = None
    kernel_display_name: str | None = None
    requirements: str | None = None  # pip requirements file of its environment, from the root
    colab_skip: tuple[str, ...] = ()  # packages of `requirements` that Colab keeps its own of
    # What Colab installs instead of `requirements`, when those cannot install there at all
    # (lesson 11: TensorFlow Federated needs Python 3.11, Colab runs 3.12). None: `requirements`.
    colab_requirements: tuple[str, ...] | None = None
    # What the lesson before it says about this lesson under "What comes next" (course.toml).
    teaser: str = ""

    @property
    def built(self) -> bool:
        return bool(self.notebooks)

    @property
    def own_environment(self) -> bool:
        return self.requirements is not None


class Course:
    def __init__(self, root: Path | None = None):
        self.root = (root or find_root()).resolve()
        self.config_path = self.root / "course.toml"
        with open(self.config_path, "rb") as f:
            self.config = tomllib.load(f)
        missing = [key for key in ("id", "repository", "ref", "package") if key not in self.config.get("course", {})]
        if missing:
            raise SystemExit(f"{self.config_path}: the [course] table needs {', '.join(missing)}")

    # --- layout ---------------------------------------------------------------------------
    @property
    def solutions_dir(self) -> Path:
        return self.root / "solutions"

    @property
    def lessons_dir(self) -> Path:
        return self.root / "lessons"

    @property
    def readme(self) -> Path:
        return self.root / "README.md"

    # --- configuration --------------------------------------------------------------------
    @property
    def course_id(self) -> str:
        return self.config["course"]["id"]

    @property
    def repository(self) -> str:
        return self.config["course"]["repository"].rstrip("/")

    @property
    def ref(self) -> str:
        return self.config["course"]["ref"]

    @property
    def package(self) -> str:
        return self.config["course"]["package"]

    @property
    def github_path(self) -> str:
        """`owner/name` of the repository, as Colab's GitHub URLs want it."""
        parsed = urlparse(self.repository)
        path = parsed.path.strip("/")
        if parsed.netloc != "github.com" or path.count("/") != 1:
            raise SystemExit(
                f"course.toml: repository must be https://github.com/OWNER/NAME, got {self.repository!r}"
            )
        return path.removesuffix(".git")

    def colab_url(self, lesson_id: str, notebook: str) -> str:
        return (
            f"https://colab.research.google.com/github/{self.github_path}/blob/{self.ref}"
            f"/lessons/{lesson_id}/{notebook}.ipynb"
        )

    def pip_spec(self) -> str:
        return f"{self.package} @ git+{self.repository}@{self.ref}"

    # --- lessons --------------------------------------------------------------------------
    @cached_property
    def lessons(self) -> list[Lesson]:
        """The curriculum from course.toml, each with the notebooks found in solutions/."""
        lessons = []
        known = set()
        for position, entry in enumerate(self.config.get("lessons", [])):
            folder = self.solutions_dir / entry["id"]
            notebooks = tuple(sorted(p.stem for p in folder.glob("*.ipynb"))) if folder.is_dir() else ()
            own = [key for key in ("kernel", "kernel_display_name", "requirements") if key in entry]
            if own and len(own) != 3:
                raise SystemExit(f"{self.config_path}: lesson {entry['id']} needs all of kernel, "
                                 "kernel_display_name and requirements, or none of them")
            if position > 0 and not entry.get("teaser", "").strip():
                raise SystemExit(f"{self.config_path}: lesson {entry['id']} needs a `teaser`: what the "
                                 "lesson before it says about it under \"What comes next\"")
            lessons.append(Lesson(entry["id"], entry["title"], entry.get("builds", ""), notebooks,
                                  kernel=entry.get("kernel"), kernel_display_name=entry.get("kernel_display_name"),
                                  requirements=entry.get("requirements"),
                                  colab_skip=tuple(entry.get("colab_skip", ())),
                                  colab_requirements=(tuple(entry["colab_requirements"])
                                                      if "colab_requirements" in entry else None),
                                  teaser=" ".join(entry.get("teaser", "").split())))
            known.add(entry["id"])
        strays = sorted(p.name for p in self.solutions_dir.iterdir() if p.is_dir() and p.name not in known) \
            if self.solutions_dir.is_dir() else []
        if strays:
            raise SystemExit(f"solutions/ has folders that course.toml does not list: {', '.join(strays)}")
        return lessons

    @property
    def built_lessons(self) -> list[Lesson]:
        return [lesson for lesson in self.lessons if lesson.built]

    def unknown_lessons(self, lesson_ids: list[str] | None) -> list[str]:
        """The ids among `lesson_ids` that name no built lesson (a typo, or a lesson to come)."""
        return sorted(set(lesson_ids or []) - {lesson.id for lesson in self.built_lessons})

    def lesson(self, lesson_id: str) -> Lesson | None:
        return next((lesson for lesson in self.built_lessons if lesson.id == lesson_id), None)

    def lesson_for_notebook(self, notebook: str) -> Lesson | None:
        """The built lesson that owns a notebook name (names are unique across the course)."""
        return next((lesson for lesson in self.built_lessons if notebook in lesson.notebooks), None)

    def source_notebook(self, lesson: Lesson, notebook: str) -> Path:
        return self.solutions_dir / lesson.id / f"{notebook}.ipynb"

    def release_notebook(self, lesson: Lesson, notebook: str) -> Path:
        return self.lessons_dir / lesson.id / f"{notebook}.ipynb"


def requirement_lines(course: Course, lesson: Lesson) -> list[str]:
    """The requirement specifiers of a lesson's own environment, comments and blanks dropped."""
    if not lesson.requirements:
        return []
    path = course.root / lesson.requirements
    if not path.is_file():
        raise SystemExit(f"course.toml: lesson {lesson.id} names {lesson.requirements}, which does not exist")
    lines = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            lines.append(line)
    return lines


def requirement_name(line: str) -> str:
    """The normalised distribution name of a requirement line (`numpy==1.24.4; ...` -> numpy)."""
    import re

    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", line)
    if not match:
        raise ValueError(f"not a requirement: {line!r}")
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()
