"""`generate`: the student version in lessons/, from the one source in solutions/.

Three things follow from course.toml and solutions/, and nothing else writes them:
- each solution notebook's Colab badge cell and setup cell (tagged `course:badge` and
  `course:setup`), so that a classroom fork changes its repository URL once;
- the lesson table in README.md, between its BEGIN/END LESSON TABLE markers;
- lessons/, produced by nbgrader generate_assignment.

`drift()` answers, without writing anything, where the repository differs from what
`generate` would write.
"""

from __future__ import annotations

import filecmp
import shutil
import tempfile
from pathlib import Path

import nbformat

from .course import Course, Lesson, requirement_lines, requirement_name
from .workspace import Templates

BADGE_TAG = "course:badge"
SETUP_TAG = "course:setup"
TABLE_BEGIN = "<!-- BEGIN LESSON TABLE (written by `python -m autograder generate`) -->"
TABLE_END = "<!-- END LESSON TABLE -->"

SETUP_TEMPLATE = '''\
# Setup: run this cell first. It works locally and in Google Colab.
# In Colab it installs the course package (fedcourse) from the course repository;
# locally, `make lab` has installed it already.
import os, subprocess, sys

if "google.colab" in sys.modules or "COLAB_RELEASE_TAG" in os.environ:
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet",
                    "{pip_spec}"], check=True)

try:
    import fedcourse
except ModuleNotFoundError:
    raise ModuleNotFoundError(
        "The course package fedcourse is not installed in this kernel. Start Jupyter with "
        "`make lab` from the course repository, or run: pip install \\"{pip_spec}\\"") from None
print(f"fedcourse {{fedcourse.__version__}} is ready")'''


# A lesson with its own environment (course.toml: kernel, requirements). Colab has one
# runtime, so the cell installs the lesson's pins there, and numpy, already loaded by Colab
# at another version, takes effect only after one restart of the runtime.
OWN_ENVIRONMENT_SETUP_TEMPLATE = '''\
# Setup: run this cell first. It works locally and in Google Colab.
# This lesson has its own environment ({requirements}): syft {syft_version} needs an older
# numpy than the rest of the course. Locally, `make lab` has created it as the Jupyter kernel
# "{display_name}": choose it under Kernel -> Change kernel.
# In Colab this cell installs those versions, then asks you to restart the runtime ONCE.
import os, subprocess, sys
from importlib import metadata

LESSON_REQUIREMENTS = [
{requirement_list}
]
IN_COLAB = "google.colab" in sys.modules or "COLAB_RELEASE_TAG" in os.environ


def installed(name):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


RESTART = ("Now restart the runtime ONCE (Colab: Runtime -> Restart session), then run the "
           "notebook again from the top: packages that Python had already loaded were replaced.")
if IN_COLAB and installed("syft") != "{syft_version}":
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", *LESSON_REQUIREMENTS,
                    "{pip_spec}"], check=True)
    raise SystemExit("The lesson's packages are installed. " + RESTART)
if "numpy" in sys.modules and sys.modules["numpy"].__version__ != installed("numpy"):
    raise SystemExit(f"numpy {{sys.modules['numpy'].__version__}} is loaded, but the lesson needs numpy "
                     f"{{installed('numpy')}}. " + RESTART)
if installed("syft") != "{syft_version}":
    raise ModuleNotFoundError(
        "This lesson runs in its own kernel, '{display_name}', with syft=={syft_version}; "
        f"this kernel has syft {{installed('syft')}}. Choose that kernel under Kernel -> Change kernel; "
        "`make lab` from the course repository creates it ({requirements}).")

try:
    import fedcourse
except ModuleNotFoundError:
    raise ModuleNotFoundError(
        "The course package fedcourse is not installed in this kernel. Start Jupyter with "
        "`make lab` from the course repository, or run: pip install \\"{pip_spec}\\"") from None
print(f"fedcourse {{fedcourse.__version__}}, syft {{installed('syft')}} and numpy {{installed('numpy')}} are ready")'''


def badge_markdown(course: Course, lesson: Lesson, notebook: str) -> str:
    return (f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
            f"({course.colab_url(lesson.id, notebook)})")


def setup_source(course: Course, lesson: Lesson | None = None) -> str:
    if lesson is None or not lesson.own_environment:
        return SETUP_TEMPLATE.format(pip_spec=course.pip_spec())
    lines = requirement_lines(course, lesson)
    skip = {requirement_name(name) for name in lesson.colab_skip}
    for_colab = [line for line in lines if requirement_name(line) not in skip]
    pins = {requirement_name(line): line.split("==", 1)[1].split(";")[0].strip() for line in lines if "==" in line}
    if "syft" not in pins:
        raise SystemExit(f"{lesson.requirements} must pin syft exactly (syft==...): the setup cell checks it")
    return OWN_ENVIRONMENT_SETUP_TEMPLATE.format(
        pip_spec=course.pip_spec(), display_name=lesson.kernel_display_name, requirements=lesson.requirements,
        syft_version=pins["syft"], requirement_list="\n".join(f"    {line!r}," for line in for_colab))


def kernelspec(lesson: Lesson) -> dict | None:
    """The kernelspec a lesson's notebooks must carry (None: leave the notebook's own)."""
    if not lesson.kernel:
        return None
    return {"display_name": lesson.kernel_display_name, "language": "python", "name": lesson.kernel}


def _tagged(nb: nbformat.NotebookNode, tag: str) -> list[nbformat.NotebookNode]:
    return [cell for cell in nb.cells if tag in cell.get("metadata", {}).get("tags", [])]


def sync_notebook(course: Course, lesson: Lesson, notebook: str, write: bool) -> list[str]:
    """Render the badge and setup cells of one solution notebook; return what was stale."""
    path = course.source_notebook(lesson, notebook)
    nb = nbformat.read(path, as_version=4)
    stale = []
    spec = kernelspec(lesson)
    if spec is not None and dict(nb.metadata.get("kernelspec", {})) != spec:
        nb.metadata["kernelspec"] = spec
        stale.append(f"{path.relative_to(course.root)}: its kernelspec is not the kernel course.toml names "
                     f"({lesson.kernel!r})")
    for tag, text in ((BADGE_TAG, badge_markdown(course, lesson, notebook)), (SETUP_TAG, setup_source(course, lesson))):
        cells = _tagged(nb, tag)
        if len(cells) != 1:
            raise SystemExit(f"{path}: needs exactly one cell tagged {tag!r}, found {len(cells)}")
        if cells[0].source != text:
            cells[0].source = text
            stale.append(f"{path.relative_to(course.root)}: cell {tag!r} is out of date with course.toml")
    if stale and write:
        nbformat.write(nb, path)
    return stale


def lesson_table(course: Course) -> str:
    rows = ["| # | lesson | what you build | open |", "|---|---|---|---|"]
    for lesson in course.lessons:
        number = lesson.id.split("-", 1)[0]
        if lesson.built:
            links = " ".join(
                f"[{nb}.ipynb](lessons/{lesson.id}/{nb}.ipynb) {badge_markdown(course, lesson, nb)}"
                for nb in lesson.notebooks)
            rows.append(f"| {number} | **{lesson.title}** | {lesson.builds} | {links} |")
        else:
            rows.append(f"| {number} | {lesson.title} | {lesson.builds} | coming soon |")
    return "\n".join(rows)


def sync_readme(course: Course, write: bool) -> list[str]:
    text = course.readme.read_text()
    if TABLE_BEGIN not in text or TABLE_END not in text:
        raise SystemExit(f"README.md must contain the lesson table markers:\n{TABLE_BEGIN}\n{TABLE_END}")
    head, rest = text.split(TABLE_BEGIN, 1)
    _, tail = rest.split(TABLE_END, 1)
    new = f"{head}{TABLE_BEGIN}\n{lesson_table(course)}\n{TABLE_END}{tail}"
    if new == text:
        return []
    if write:
        course.readme.write_text(new)
    return ["README.md: the lesson table is out of date with course.toml and solutions/"]


def build_release(course: Course, out_dir: Path, lesson_ids: list[str] | None = None) -> None:
    """nbgrader generate_assignment for every built lesson (or those named); releases copied to
    out_dir/<id>/."""
    with Templates(course) as templates:
        for lesson in course.built_lessons:
            if not lesson_ids or lesson.id in lesson_ids:
                shutil.copytree(templates.get(lesson).release_dir, out_dir / lesson.id)


def _tree_differences(expected: Path, actual: Path, prefix: str = "lessons/") -> list[str]:
    differences = []
    expected_files = {p.relative_to(expected) for p in expected.rglob("*") if p.is_file()}
    actual_files = {p.relative_to(actual) for p in actual.rglob("*") if p.is_file()
                    } if actual.is_dir() else set()
    for rel in sorted(expected_files - actual_files):
        differences.append(f"{prefix}{rel} is missing")
    for rel in sorted(actual_files - expected_files):
        differences.append(f"{prefix}{rel} is not generated from solutions/")
    for rel in sorted(expected_files & actual_files):
        if not filecmp.cmp(expected / rel, actual / rel, shallow=False):
            differences.append(f"{prefix}{rel} differs from what solutions/ generates")
    return differences


def sync_sources(course: Course, write: bool) -> list[str]:
    """Badges and setup cells of every solution, and the README table (see module docstring)."""
    stale = []
    for lesson in course.built_lessons:
        for notebook in lesson.notebooks:
            stale += sync_notebook(course, lesson, notebook, write)
    if course.readme.exists():
        stale += sync_readme(course, write)
    return stale


def drift(course: Course, lesson_ids: list[str] | None = None) -> list[str]:
    """Everything `generate` would change, as sentences; empty when all is in step. With
    `lesson_ids`, only those lessons' releases are rebuilt and compared."""
    problems = sync_sources(course, write=False)
    with tempfile.TemporaryDirectory(prefix="release-") as tmp:
        # Generate from synced copies of the sources, as `generate` would, touching nothing here.
        copy = Path(tmp) / "repo"
        copy.mkdir()
        shutil.copy(course.config_path, copy / "course.toml")
        for lesson in course.lessons:  # a lesson's own requirements shape its setup cell
            if lesson.requirements and (course.root / lesson.requirements).is_file():
                shutil.copy(course.root / lesson.requirements, copy / lesson.requirements)
        shutil.copytree(course.solutions_dir, copy / "solutions",
                        ignore=shutil.ignore_patterns(".ipynb_checkpoints", "__pycache__"))
        fresh = Course(copy)
        sync_sources(fresh, write=True)
        build_release(fresh, Path(tmp) / "lessons", lesson_ids)
        if lesson_ids:
            for lesson_id in lesson_ids:
                problems += _tree_differences(Path(tmp) / "lessons" / lesson_id, course.lessons_dir / lesson_id,
                                              f"lessons/{lesson_id}/")
        else:
            problems += _tree_differences(Path(tmp) / "lessons", course.lessons_dir)
    return problems


def generate(course: Course) -> list[str]:
    """Bring badges, setup cells, the README table and lessons/ in step; return what changed."""
    changed = sync_sources(course, write=True)
    with tempfile.TemporaryDirectory(prefix="release-") as tmp:
        build_release(course, Path(tmp))
        differences = _tree_differences(Path(tmp), course.lessons_dir)
        if differences:
            if course.lessons_dir.exists():
                shutil.rmtree(course.lessons_dir)
            shutil.copytree(Path(tmp), course.lessons_dir)
        changed += differences
    return changed
