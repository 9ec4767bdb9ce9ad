"""`bench`: run every solution notebook from a fresh kernel; wall time and peak memory.

Each notebook runs in its own Python process (which starts the kernel), in a temporary copy
of its lesson folder, so the kernel's peak resident memory is that process's
RUSAGE_CHILDREN maximum and nothing is written into the repository.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .course import Course
from .kernels import missing_kernel

BUDGET_SECONDS = 90.0


@dataclass
class BenchResult:
    notebook: str
    seconds: float
    peak_mib: float
    error: str | None

    def verdict(self, budget: float) -> str:
        if self.error:
            return "FAILED"
        return "ok" if self.seconds <= budget else "OVER BUDGET"


def run_notebook(path: Path, timeout: float) -> dict:
    """Execute one notebook from a fresh kernel (called in a child process)."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=timeout, kernel_name=nb.metadata.get("kernelspec", {}).get("name", "python3"),
                            resources={"metadata": {"path": str(path.parent)}})
    error = None
    start = time.perf_counter()
    try:
        client.execute()
    except CellExecutionError as exc:
        error = str(exc).strip().splitlines()[-1] if str(exc).strip() else "a cell raised an error"
    except Exception as exc:  # timeouts, dead kernels
        error = f"{type(exc).__name__}: {exc}".splitlines()[0]
    seconds = time.perf_counter() - start
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {"seconds": seconds, "peak_mib": peak_kib / 1024, "error": error}


def bench(course: Course, lesson_ids: list[str] | None = None, cell_timeout: float = 600) -> list[BenchResult]:
    results = []
    for lesson in course.built_lessons:
        if lesson_ids and lesson.id not in lesson_ids:
            continue
        for notebook in lesson.notebooks:
            problem = missing_kernel(course, lesson, notebook)
            if problem:
                results.append(BenchResult(f"{lesson.id}/{notebook}.ipynb", float("nan"), float("nan"), problem))
                continue
            with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
                folder = Path(tmp) / lesson.id
                shutil.copytree(course.solutions_dir / lesson.id, folder)
                proc = subprocess.run(
                    [sys.executable, "-m", "autograder.bench", str(folder / f"{notebook}.ipynb"), str(cell_timeout)],
                    capture_output=True, text=True, cwd=folder)
                try:
                    data = json.loads(proc.stdout.strip().splitlines()[-1])
                except (ValueError, IndexError):
                    data = {"seconds": float("nan"), "peak_mib": float("nan"),
                            "error": (proc.stderr.strip().splitlines() or ["the runner crashed"])[-1]}
                results.append(BenchResult(f"{lesson.id}/{notebook}.ipynb", **data))
    return results


def bench_grading(course: Course, students: int, jobs: int, say=print) -> str:
    """Grade a synthetic class (copies of the example lesson-00 submission) with --jobs 1 and
    --jobs N, and print notebooks per minute for each: the figures the README quotes."""
    from .pool import ClassRun, Options, Student, sandbox_choice

    example = course.root / "examples" / "submissions" / "alice"
    sandbox = bool(sandbox_choice(False, say))
    lines = [f"grading {students} lesson-00 submissions on {os.cpu_count()} cores "
             f"({'sandboxed' if sandbox else 'NOT sandboxed'}):"]
    times = {}
    with tempfile.TemporaryDirectory(prefix="bench-grading-") as tmp:
        for k in range(students):
            shutil.copytree(example, Path(tmp) / f"student{k:02d}")
        class_ = [Student(f"student{k:02d}", Path(tmp) / f"student{k:02d}") for k in range(students)]
        for n in sorted({1, jobs}):
            with ClassRun(course, Options(jobs=n, sandbox=sandbox, progress=False), say) as run:
                start = time.perf_counter()
                results = run.grade(class_)
                times[n] = time.perf_counter() - start
            scores = sorted({r.total for r in results})
            lines.append(f"  --jobs {n}: {times[n]:6.1f} s, {students / times[n] * 60:5.1f} notebooks per minute "
                         f"(scores {', '.join(f'{s:g}' for s in scores)})")
    if len(times) > 1:
        lines.append(f"  speed-up with --jobs {jobs}: {times[1] / times[jobs]:.2f}x")
    return "\n".join(lines)


def table(results: list[BenchResult], budget: float = BUDGET_SECONDS) -> str:
    width = max([len("notebook"), *(len(r.notebook) for r in results)]) + 2
    lines = [f"{'notebook':<{width}}{'wall s':>9}{'peak MiB':>10}  budget {budget:g} s",]
    for r in results:
        lines.append(f"{r.notebook:<{width}}{r.seconds:>9.1f}{r.peak_mib:>10.0f}  {r.verdict(budget)}"
                     + (f": {r.error}" if r.error else ""))
    return "\n".join(lines)


if __name__ == "__main__":
    print(json.dumps(run_notebook(Path(sys.argv[1]), float(sys.argv[2]))))
