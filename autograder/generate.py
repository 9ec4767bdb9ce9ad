"""`generate`: the student version in lessons/, from the one source in solutions/.

Three things follow from course.toml and solutions/, and nothing else writes them:
- each solution notebook's Colab badge cell and setup cell (tagged `course:badge` and
  `course:setup`), so that a classroom fork changes its repository URL once, and its last
  cell, "What comes next" (tagged `course:next`), which names the next lesson that exists and
  the ones before it that are still to come, so that no lesson points at one that is not there;
- the lesson table in README.md, between its BEGIN/END LESSON TABLE markers;
- lessons/, produced by nbgrader generate_assignment.

`drift()` answers, without writing anything, where the repository differs from what
`generate` would write.
"""

from __future__ import annotations

import filecmp
import shutil
import tempfile
import re
import textwrap
from pathlib import Path

import nbformat

from .course import Course, Lesson, requirement_lines, requirement_name
from .workspace import Templates

BADGE_TAG = "course:badge"
SETUP_TAG = "course:setup"
NEXT_TAG = "course:next"
NEXT_HEADING = "## What comes next"
TABLE_BEGIN = "<!-- BEGIN LESSON TABLE (written by `python -m autograder generate`) -->"
TABLE_END = "<!-- END LESSON TABLE -->"

# How every setup cell installs packages in Colab: pip's own output and the repository tried
# are what a student (and the instructor they ask) need when it fails, not a bare
# CalledProcessError. The usual cause is a course.toml still naming a repository that does not
# exist or is private, and git then asks for a password it cannot get.
PIP_INSTALL_SNIPPET = '''\
COURSE_PACKAGE = "{pip_spec}"


def pip_install(*requirements):
    \"\"\"pip install into this kernel; if that fails, show pip's output and what was tried.\"\"\"
    print("pip install", *requirements, flush=True)
    pip = subprocess.run([sys.executable, "-m", "pip", "install", *requirements], text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         env={{**os.environ, "GIT_TERMINAL_PROMPT": "0"}})  # never wait for a password
    if pip.returncode != 0:
        print(pip.stdout[-6000:])
        raise RuntimeError(
            f"pip could not install {{' '.join(requirements)}} (its output is above). If git could not "
            "read the course repository in that address ('could not read Username', 'Repository not "
            "found') or find the branch or tag after its last @, the repository does not exist, is "
            "private or lacks that branch or tag: the instructor sets `repository` and `ref` in "
            "course.toml to the course's public GitHub repository, then runs `make generate`. If pip "
            "could not reach the network at all, this runtime has no internet.")
'''

# Pieces of code the setup cells share (format templates, like the cells).
_IMPORT_FEDCOURSE = '''try:
    import fedcourse
except ModuleNotFoundError:
    raise ModuleNotFoundError(
        "The course package fedcourse is not installed in this kernel. Start Jupyter with "
        f"`make lab` from the course repository, or run: pip install \\"{{COURSE_PACKAGE}}\\"") from None
'''
_INSTALLED = '''
def installed(name):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None
'''


SETUP_TEMPLATE = '''\
# Setup: run this cell first. It works locally and in Google Colab.
# In Colab it installs the course package (fedcourse) from the course repository;
# locally, `make lab` has installed it already.
import os, subprocess, sys

{pip_install}

if "google.colab" in sys.modules or "COLAB_RELEASE_TAG" in os.environ:
    pip_install(COURSE_PACKAGE)

''' + _IMPORT_FEDCOURSE + '''print(f"fedcourse {{fedcourse.__version__}} is ready")'''


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
{pip_install}
''' + _INSTALLED + '''

RESTART = ("Now restart the runtime ONCE (Colab: Runtime -> Restart session), then run the "
           "notebook again from the top: packages that Python had already loaded were replaced.")
if IN_COLAB and installed("syft") != "{syft_version}":
    pip_install(*LESSON_REQUIREMENTS, COURSE_PACKAGE)
    raise SystemExit("The lesson's packages are installed. " + RESTART)
if "numpy" in sys.modules and sys.modules["numpy"].__version__ != installed("numpy"):
    raise SystemExit(f"numpy {{sys.modules['numpy'].__version__}} is loaded, but the lesson needs numpy "
                     f"{{installed('numpy')}}. " + RESTART)
if installed("syft") != "{syft_version}":
    raise ModuleNotFoundError(
        "This lesson runs in its own kernel, '{display_name}', with syft=={syft_version}; "
        f"this kernel has syft {{installed('syft')}}. Choose that kernel under Kernel -> Change kernel; "
        "`make lab` from the course repository creates it ({requirements}).")

''' + _IMPORT_FEDCOURSE + '''print(f"fedcourse {{fedcourse.__version__}}, syft {{installed('syft')}} and numpy {{installed('numpy')}} are ready")'''


# Lesson 11 (TensorFlow Federated and Flower). TFF 0.87, its last release, installs on Python 3.11
# (Linux x86-64) only, so Colab (Python 3.12) gets `colab_requirements` (Flower) and no TFF: the
# notebook skips its TFF sections there (HAVE_TFF) and runs the rest.
TFF_SETUP_TEMPLATE = '''\
# Setup: run this cell first. It works locally and in Google Colab.
# This lesson has its own environment ({requirements}): TensorFlow Federated {tff_version}, its last
# release, needs Python 3.11 and an older numpy than the rest of the course; Flower and the
# course's torch are installed beside it. Locally, `make lab` has created it as the Jupyter kernel
# "{display_name}": choose it under Kernel -> Change kernel.
# In Colab (Python 3.12) TensorFlow Federated does not install: this cell installs Flower, and
# the TFF sections print that they are skipped; the Flower sections run.
import os, subprocess, sys
from importlib import metadata

COLAB_REQUIREMENTS = [
{requirement_list}
]
IN_COLAB = "google.colab" in sys.modules or "COLAB_RELEASE_TAG" in os.environ
{pip_install}
''' + _INSTALLED + '''

if IN_COLAB and installed("flwr") is None:
    pip_install(*COLAB_REQUIREMENTS, COURSE_PACKAGE)
HAVE_TFF = installed("tensorflow-federated") == "{tff_version}"
if not IN_COLAB and not HAVE_TFF:
    raise ModuleNotFoundError(
        "This lesson runs in its own kernel, '{display_name}', with tensorflow-federated=={tff_version}; "
        f"this kernel has tensorflow-federated {{installed('tensorflow-federated')}}. Choose that kernel under "
        "Kernel -> Change kernel; `make lab` from the course repository creates it ({requirements}).")

''' + _IMPORT_FEDCOURSE + '''if HAVE_TFF:
    print(f"fedcourse {{fedcourse.__version__}}, TensorFlow Federated {{installed('tensorflow-federated')}} and "
          f"Flower {{installed('flwr')}} are ready")
else:
    print(f"fedcourse {{fedcourse.__version__}} and Flower {{installed('flwr')}} are ready. TensorFlow Federated "
          "does not install on this Python (it needs 3.11): the TFF sections will be skipped.")'''


def badge_markdown(course: Course, lesson: Lesson, notebook: str) -> str:
    return (f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
            f"({course.colab_url(lesson.id, notebook)})")


def pip_install_snippet(course: Course) -> str:
    """Defines COURSE_PACKAGE, what pip installs from the course repository, and pip_install()."""
    return PIP_INSTALL_SNIPPET.format(pip_spec=course.pip_spec())


def setup_source(course: Course, lesson: Lesson | None = None) -> str:
    if lesson is None or not lesson.own_environment:
        return SETUP_TEMPLATE.format(pip_install=pip_install_snippet(course))
    lines = requirement_lines(course, lesson)
    skip = {requirement_name(name) for name in lesson.colab_skip}
    for_colab = [line for line in (lines if lesson.colab_requirements is None else lesson.colab_requirements)
                 if requirement_name(line) not in skip]
    pins = {requirement_name(line): line.split("==", 1)[1].split(";")[0].strip() for line in lines if "==" in line}
    if "tensorflow-federated" in pins:
        return TFF_SETUP_TEMPLATE.format(
            pip_install=pip_install_snippet(course), display_name=lesson.kernel_display_name,
            requirements=lesson.requirements, tff_version=pins["tensorflow-federated"],
            requirement_list="\n".join(f"    {line!r}," for line in for_colab))
    if "syft" not in pins:
        raise SystemExit(f"{lesson.requirements} must pin syft exactly (syft==...): the setup cell checks it")
    return OWN_ENVIRONMENT_SETUP_TEMPLATE.format(
        pip_install=pip_install_snippet(course), display_name=lesson.kernel_display_name, requirements=lesson.requirements,
        syft_version=pins["syft"], requirement_list="\n".join(f"    {line!r}," for line in for_colab))


def kernelspec(lesson: Lesson) -> dict | None:
    """The kernelspec a lesson's notebooks must carry (None: leave the notebook's own)."""
    if not lesson.kernel:
        return None
    return {"display_name": lesson.kernel_display_name, "language": "python", "name": lesson.kernel}


def _number(lesson: Lesson) -> str:
    return lesson.id.split("-", 1)[0]


def _names(lessons: list[Lesson]) -> str:
    """`lesson 04 (Communication compression) and lesson 05 (Gradient leakage)`"""
    names = [f"lesson {_number(lesson)} ({lesson.title})" for lesson in lessons]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _paragraph(text: str) -> str:
    return textwrap.fill(text, width=96, break_long_words=False, break_on_hyphens=False)


def next_source(course: Course, lesson: Lesson) -> str:
    """The "What comes next" cell of `lesson`: the next lesson that exists, linked, with its teaser
    from course.toml; the lessons before it that do not exist yet, as coming soon."""
    later = course.lessons[[entry.id for entry in course.lessons].index(lesson.id) + 1:]
    following = next((entry for entry in later if entry.built), None)
    to_come = later[:later.index(following)] if following else later
    parts = [NEXT_HEADING]
    if following is not None:
        name = f"lesson {_number(following)}, {following.title}"
        if len(following.notebooks) == 1:
            (nb,) = following.notebooks
            parts.append(f"**Next: [{name}](../{following.id}/{nb}.ipynb)** {badge_markdown(course, following, nb)}")
        else:
            parts.append(f"**Next: {name}:** " + ", ".join(
                f"[{nb}](../{following.id}/{nb}.ipynb) {badge_markdown(course, following, nb)}"
                for nb in following.notebooks))
        parts.append(_paragraph(following.teaser))
        if to_come:
            parts.append(_paragraph(f"Coming soon, between this lesson and lesson {_number(following)}: "
                                    f"{_names(to_come)}."))
    elif to_come:
        first, rest = to_come[0], to_come[1:]
        parts.append(f"**Coming soon: lesson {_number(first)}, {first.title}.**")
        parts.append(_paragraph(first.teaser))
        table = f"https://github.com/{course.github_path}/blob/{course.ref}/README.md#lessons"
        after = f"After it, also coming soon: {_names(rest)}. " if rest else ""
        parts.append(_paragraph(f"{after}The [lesson table]({table}) shows each lesson as it is released."))
    else:
        parts.append("This is the last lesson of the course; the exercises above are where to go from here.")
    return "\n\n".join(parts)


def _next_cell(nb: nbformat.NotebookNode, path: Path) -> tuple[nbformat.NotebookNode, str | None]:
    """The notebook's `course:next` cell. A notebook without one gets it, taking over a
    hand-written "What comes next" section that ends a markdown cell; returns why it changed."""
    tagged = _tagged(nb, NEXT_TAG)
    if len(tagged) > 1:
        raise SystemExit(f"{path}: needs at most one cell tagged {NEXT_TAG!r}, found {len(tagged)}")
    if tagged:
        return tagged[0], None
    heading = re.compile(rf"^{re.escape(NEXT_HEADING)}[ \t]*$", re.MULTILINE)
    sections = [(i, match) for i, cell in enumerate(nb.cells) if cell.cell_type == "markdown"
                for match in heading.finditer(cell.source)]
    if len(sections) > 1:
        raise SystemExit(f"{path}: has {len(sections)} {NEXT_HEADING!r} headings; keep one, at the end")
    why = f"its last cell {NEXT_HEADING!r} is written from course.toml (a new cell tagged {NEXT_TAG!r})"
    if sections:
        index, match = sections[0]
        section = nb.cells[index].source[match.start():]
        if re.search(r"^#{1,2} ", section[match.end() - match.start():], re.MULTILINE):
            raise SystemExit(f"{path}: its {NEXT_HEADING!r} section must end its cell (the generated "
                             f"cell replaces it); move what follows it into another cell")
        before = nb.cells[index].source[:match.start()].rstrip()
        if not before:  # the section is a cell of its own: it becomes the generated cell
            cell = nb.cells[index]
            cell.metadata.setdefault("tags", []).append(NEXT_TAG)
            return cell, why
        nb.cells[index].source = before
        position = index + 1
    else:
        position = len(nb.cells)
    cell = nbformat.v4.new_markdown_cell(NEXT_HEADING, id="what_comes_next", metadata={
        "nbgrader": {"grade": False, "grade_id": "what_comes_next", "locked": True, "schema_version": 3,
                     "solution": False, "task": False},
        "tags": [NEXT_TAG]})
    nb.cells.insert(position, cell)
    return cell, why


def _tagged(nb: nbformat.NotebookNode, tag: str) -> list[nbformat.NotebookNode]:
    return [cell for cell in nb.cells if tag in cell.get("metadata", {}).get("tags", [])]


def sync_notebook(course: Course, lesson: Lesson, notebook: str, write: bool) -> list[str]:
    """Render the badge, setup and "What comes next" cells of one solution notebook; return what was stale."""
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
    cell, why = _next_cell(nb, path)
    if why:
        stale.append(f"{path.relative_to(course.root)}: {why}")
    text = next_source(course, lesson)
    if cell.source != text:
        cell.source = text
        if not why:
            stale.append(f"{path.relative_to(course.root)}: cell {NEXT_TAG!r} is out of date with course.toml "
                         "and the lessons in solutions/")
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
    """Badges, setup and "What comes next" cells of every solution, and the README table (see module docstring)."""
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
    """Bring badges, setup and "What comes next" cells, the README table and lessons/ in step; return what changed."""
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
