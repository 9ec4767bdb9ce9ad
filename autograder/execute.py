"""nbgrader's Execute step, guarded: how one notebook's cells run when it is graded.

`GuardedExecute` replaces nbgrader's `Execute` preprocessor in `nbgrader autograde` (see
autograder/runjob.py). It runs the same cells in the same kernel, and adds:

- the kernel is `GuardedKernelManager`'s: the guard is its main program, in the sandbox when
  enabled (autograder/sandbox.py);
- each test cell is sent wrapped (autograder/spec.py `wrap_test`), without storing it in the
  kernel's input history, and its verdict comes from the guard's signed records
  (autograder/channel.py);
- a cell's time limit comes from the lesson's measured profile; once a cell has timed out,
  every later cell gets a short limit, so a hanging submission costs bounded time;
- a kernel that dies, hangs past an interrupt or passes a resource limit stops the notebook,
  the cells that already ran keep their results, and the rest are marked "not run" with why;
- outputs are capped in bytes.

Everything it learns is written to a JSON file (`report_file`) for the score stage.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from nbclient.exceptions import CellTimeoutError, DeadKernelError
from nbformat import NotebookNode
from nbgrader.preprocessors import Execute
from traitlets import Dict as DictTrait
from traitlets import Unicode

from .channel import GuardChannel
from .sandbox import GuardedKernelManager, Limits, Watchdog
from .spec import LessonSpec, cell_key, nbgrader_meta, wrap_test

NOT_RUN = "NotRun"


def error_output(ename: str, evalue: str) -> NotebookNode:
    return NotebookNode(output_type="error", ename=ename, evalue=evalue, traceback=[f"{ename}: {evalue}"])


class GuardedExecute(Execute):
    job_file = Unicode("", help="the grading job's JSON (autograder.runjob)").tag(config=True)
    report_file = Unicode("", help="where to write what happened while the notebook ran").tag(config=True)
    job = DictTrait({})

    def preprocess(self, nb, resources=None, km=None):
        from nbclient.client import NotebookClient

        self.job = json.loads(Path(self.job_file).read_text())
        spec = LessonSpec.from_json(self.job["spec"])
        runtime = Path(self.job["runtime_dir"])
        channel = GuardChannel(runtime)
        tests = {t.grade_id: wrap_test(t.source, t.grade_id, spec.rebind, t.shared, t.global_names) for t in spec.tests}
        config_path = channel.write_config({
            "tests": tests, "locked": spec.provided, "watch": spec.watch, "watch_classes": spec.watch_classes,
            "allowed_changes": self.job.get("allowed_changes", []), "calibrate": self.job.get("calibrate", False),
            "matplotlib_cache": "/var/cache/autograder-matplotlib" if self.job.get("sandbox") else
            (self.job.get("matplotlib_cache") or ""),
        })
        self.kernel_manager_class = GuardedKernelManager
        self.shutdown_kernel = "immediate"  # nothing of the kernel is kept: no graceful goodbye
        self.config.GuardedKernelManager.guard_config = str(config_path)
        self.config.GuardedKernelManager.sandbox = (dict(self.job["sandbox"], runtime_dir=str(runtime))
                                                    if self.job.get("sandbox") else {})

        NotebookClient.__init__(self, nb, km)
        self.reset_execution_trackers()
        self._check_assign_resources(resources)
        self._output_bytes = 0
        self._cell_bytes = 0
        self._output_capped = False
        report = {"cells": [], "records": [], "channel_problems": [], "stopped": None, "limit": None,
                  "kernel_started": False, "peak_mib": None}
        started = time.monotonic()
        limits = Limits(**(self.job.get("sandbox") or {}).get("limits", {})) if self.job.get("sandbox") else Limits()
        watchdog = None
        try:
            with self.setup_kernel():
                assert self.kc is not None
                info = self.wait_for_reply(self.kc.kernel_info())
                if info:
                    self.nb.metadata["language_info"] = info["content"]["language_info"]
                report["kernel_started"] = self._wait_for_ready(channel)
                pid = getattr(getattr(self.km, "provisioner", None), "pid", None) or \
                    getattr(getattr(getattr(self.km, "provisioner", None), "process", None), "pid", None)
                if pid:
                    watchdog = Watchdog(pid, limits, runtime).start()
                self._run_cells(spec, tests, channel, report, watchdog, started)
        except Exception as exc:  # the kernel could not be started or torn down: say so, keep results
            report["stopped"] = report["stopped"] or f"{type(exc).__name__}: {exc}"
            ran = {entry["index"] for entry in report["cells"]}
            for index, cell in enumerate(self.nb.cells):
                if cell.cell_type == "code" and index not in ran:
                    cell.outputs = [error_output(NOT_RUN, f"not run: {report['stopped']}")]
        finally:
            if watchdog is not None:
                watchdog.stop()
                report["peak_mib"] = round(watchdog.peak_mib, 1)
                if watchdog.reason and not report["limit"]:
                    report["limit"] = watchdog.reason
            channel.close()
            report["records"] = channel.records
            report["channel_problems"] = channel.problems
            report["seconds"] = round(time.monotonic() - started, 2)
            Path(self.report_file).write_text(json.dumps(report, indent=1))
        self.set_widgets_metadata()
        return self.nb, self.resources

    def _wait_for_ready(self, channel: GuardChannel, timeout: float = 120) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(r.get("kind") == "ready" for r in channel.drain()):
                return True
            time.sleep(0.05)
        return False

    def _limit_for(self, cell, timed_out_before: bool) -> float:
        limits = self.job.get("cell_limits", {})
        limit = float(limits.get(cell_key(cell), self.job.get("default_cell_limit", 120)))
        if timed_out_before:  # a hanging submission costs bounded time
            return min(limit, float(self.job.get("after_timeout_limit", 10)))
        return limit

    def _run_cells(self, spec: LessonSpec, tests: dict[str, str], channel: GuardChannel, report: dict,
                   watchdog: Watchdog | None, started: float) -> None:
        notebook_limit = float(self.job.get("notebook_limit", 900))
        timed_out = False
        stop_reason: str | None = None
        for index, cell in enumerate(self.nb.cells):
            if cell.cell_type != "code" or not str(cell.source).strip():
                continue
            meta = nbgrader_meta(cell)
            grade_id = meta.get("grade_id")
            entry = {"index": index, "key": cell_key(cell), "grade_id": grade_id,
                     "test": grade_id in tests, "seconds": 0.0, "timed_out": False}
            report["cells"].append(entry)
            if stop_reason is None and time.monotonic() - started > notebook_limit:
                stop_reason = (f"the notebook ran past its {notebook_limit:.0f} s limit in all; the rest was not run")
            if stop_reason is not None:
                cell.outputs = [error_output(NOT_RUN, stop_reason)]
                entry["not_run"] = True
                continue
            limit = self._limit_for(cell, timed_out)
            entry["limit"] = limit
            self.timeout = max(1, int(round(limit)))
            # what an interrupted cell shows (nbgrader's default says nothing in its message)
            why = (f"the cell ran past its time limit of {self.timeout} s and was interrupted "
                   + ("(an earlier cell had already run out of time, so later cells get a short limit)" if timed_out
                      else "(an endless loop, or work far slower than the lesson's own solution?)"))
            self.error_on_timeout = {"ename": "CellTimeoutError", "evalue": why, "traceback": [f"CellTimeoutError: {why}"]}
            original = cell.source
            if grade_id in tests:
                cell.source = tests[grade_id]
            self._cell_bytes = 0
            begin = time.monotonic()
            try:
                self.execute_cell(cell, index, store_history=grade_id not in tests)
            except DeadKernelError:
                why = (watchdog.reason if watchdog and watchdog.reason else
                       "the kernel died while running this cell (os._exit, a crash, or running out of memory?)")
                cell.outputs.append(error_output("DeadKernelError", why))
                stop_reason = f"not run: the kernel died in an earlier cell ({why})"
                report["stopped"] = why
            except CellTimeoutError:
                why = (f"timed out after {limit:.0f} s and did not stop when interrupted "
                       "(an endless loop that catches KeyboardInterrupt?)")
                cell.outputs.append(error_output("CellTimeoutError", why))
                stop_reason = "not run: an earlier cell hung and the kernel had to be stopped"
                report["stopped"] = why
                self._kill_kernel()
            finally:
                cell.source = original
            entry["seconds"] = round(time.monotonic() - begin, 3)
            if any(o.get("output_type") == "error" and o.get("ename") == "CellTimeoutError" for o in cell.outputs):
                entry["timed_out"] = True
                timed_out = True
            if self._output_capped:
                cell.outputs.append(error_output("OutputLimitExceeded", self._output_cap_message()))
                self._output_capped = False
            if watchdog is not None and watchdog.check() and stop_reason is None:
                cell.outputs.append(error_output("ResourceLimit", watchdog.reason))
                report["limit"] = watchdog.reason
                stop_reason = f"not run: {watchdog.reason}"
                self._kill_kernel()
            channel.drain()

    def _kill_kernel(self) -> None:
        try:
            self.km.shutdown_kernel(now=True)
        except Exception:
            pass

    # --- output caps ------------------------------------------------------------------------
    def _output_cap_message(self) -> str:
        cell_cap = int(self.job.get("cell_output_limit", 2 * 2**20))
        total_cap = int(self.job.get("output_limit", 20 * 2**20))
        return (f"the cell's output passed the limit ({cell_cap // 2**20} MiB per cell, {total_cap // 2**20} MiB per "
                "notebook); the rest of it was dropped")

    def output(self, outs, msg, display_id, cell_index):
        size = len(json.dumps(msg.get("content", {}), default=str))
        cell_cap = int(self.job.get("cell_output_limit", 2 * 2**20))
        total_cap = int(self.job.get("output_limit", 20 * 2**20))
        if self._cell_bytes + size > cell_cap or self._output_bytes + size > total_cap:
            self._output_capped = True
            return None
        self._cell_bytes += size
        self._output_bytes += size
        return super().output(outs, msg, display_id, cell_index)
