"""What a lesson's own solution does when graded: its measured profile (autograder/profiles.json).

`python -m autograder calibrate` grades every solution with the guard in calibration mode and
records, per notebook:
- `cell_seconds`: how long each cell took (by grade_id, or by a hash of its code), from which
  each cell's time limit is derived: `max(FLOOR, FACTOR x measured)`, scaled up when more jobs
  than cores share the machine. A busy machine therefore never reports a correct submission's
  slow training cell as an endless loop, and a real hang is still cut short;
- `allowed_events`, `allowed_findings`, `allowed_changes`: what the solution itself does that
  the guard or the static review would otherwise report (lesson 01's solution patches torch's
  classes: that is the exercise). Reported tampering is what goes beyond them.

selfcheck fails when a solution is reported for review, so a profile that has fallen behind
its lesson is noticed; then run `calibrate` again.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

PROFILES = Path(__file__).with_name("profiles.json")
FLOOR_SECONDS = 30.0
FACTOR = 6.0
UNKNOWN_CELL_SECONDS = 120.0  # a cell the solution does not have (added by the student)
AFTER_TIMEOUT_SECONDS = 10.0


def load_profiles(path: Path = PROFILES) -> dict:
    if not path.is_file():
        return {}
    return json.loads(path.read_text())


def profile_for(profiles: dict, lesson: str, notebook: str) -> dict:
    return profiles.get(lesson, {}).get(notebook, {})


MAX_SLOWDOWN = 8.0  # however busy the machine looks, a hang still costs bounded time


def machine_slowdown(jobs: int, load: float | None = None, cores: int | None = None) -> float:
    """How much slower a cell may run than when it was measured (alone, on an idle machine).

    The class's own jobs and whatever else keeps the machine busy (the load average when the
    class starts) share the cores: with twice as many runnable processes as cores, each runs
    about half as fast."""
    cores = cores or os.cpu_count() or 1
    if load is None:
        try:
            load = os.getloadavg()[0]
        except OSError:  # not available on this system
            load = 0.0
    return min(MAX_SLOWDOWN, max(1.0, (max(load, 0.0) + jobs) / cores))


def cell_limits(profile: dict, slowdown: float, fixed: float | None = None) -> tuple[dict[str, float], float, float]:
    """(limit per cell key, limit for unknown cells, limit for the notebook in all)."""
    measured = profile.get("cell_seconds", {})
    if fixed is not None:
        limits = {key: float(fixed) for key in measured}
        unknown = float(fixed)
    else:
        limits = {key: round(max(FLOOR_SECONDS, FACTOR * seconds) * slowdown, 1) for key, seconds in measured.items()}
        unknown = UNKNOWN_CELL_SECONDS * slowdown
    notebook = sum(limits.values()) + 2 * unknown
    return limits, unknown, notebook


def write_profiles(profiles: dict, path: Path = PROFILES) -> None:
    path.write_text(json.dumps(profiles, indent=1, sort_keys=True) + "\n")
