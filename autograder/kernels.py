"""Jupyter kernels of lessons that have their own environment (course.toml `kernel`).

The autograder runs in the main environment; nbgrader and bench start each notebook's kernel
by the name in its kernelspec. A lesson with its own environment (lesson 09, PySyft) names a
kernel that `make` registers in the main environment. When it is missing, grading that lesson
would crash inside nbclient with NoSuchKernel: these say instead what is missing and how to
make it.
"""

from __future__ import annotations

from pathlib import Path

import nbformat

from .course import Course, Lesson

MAKE_HINT = ("run `make setup` (or `make test`, `make grade`, `make lab`) from the course repository: "
             "it creates that lesson's environment and registers its kernel")


def kernel_name_of(path) -> str:
    nb = nbformat.read(path, as_version=4)
    return nb.metadata.get("kernelspec", {}).get("name") or "python3"


def installed_kernels() -> dict[str, str]:
    """Kernel name -> the program it starts, for every kernel this environment's Jupyter finds."""
    from jupyter_client.kernelspec import KernelSpecManager

    manager = KernelSpecManager()
    kernels = {}
    for name in manager.find_kernel_specs():
        try:
            argv = manager.get_kernel_spec(name).argv
        except Exception:  # an unreadable kernel.json counts as missing
            continue
        kernels[name] = argv[0] if argv else ""
    return kernels


def missing_kernel(course: Course, lesson: Lesson, notebook: str) -> str | None:
    """Why a notebook cannot run here (its kernel is not installed), or None when it can."""
    name = kernel_name_of(course.source_notebook(lesson, notebook))
    kernels = installed_kernels()
    where = f" (lesson {lesson.id}'s own environment, from {lesson.requirements})" if lesson.own_environment else ""
    if name not in kernels:
        return (f"{lesson.id}/{notebook}.ipynb runs in the Jupyter kernel {name!r}{where}, which is not "
                f"installed here, so it was not run: {MAKE_HINT}")
    program = Path(kernels[name])
    if program.is_absolute() and not program.exists():
        return (f"{lesson.id}/{notebook}.ipynb runs in the Jupyter kernel {name!r}{where}, whose Python "
                f"{program} no longer exists, so it was not run: {MAKE_HINT}")
    return None
