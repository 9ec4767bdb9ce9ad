"""Run PySyft 0.2's tutorial notebooks cell by cell on ``fedcourse.syft_compat`` (a developer check).

The tutorials are not part of the course: get them from OpenMined's PySyft repository (branch
``syft_0.2.x``, folder ``examples/tutorials/``) and pass their folder::

    python tools/run_pysyft_tutorials.py /tmp/pysyft-tutorials
    python tools/run_pysyft_tutorials.py /tmp/pysyft-tutorials --reference /tmp/with-outputs -v

Each notebook runs in a fresh Python process, its code cells in order in one namespace, as
Jupyter would (the value of a cell's last expression is shown like Jupyter shows it). The only
changes made to a cell are:

- its ``syft`` imports point at the course's module: ``import syft as sy`` becomes
  ``from fedcourse import syft_compat as sy``, ``import syft`` becomes
  ``import fedcourse.syft_compat as syft`` and ``from syft.a.b import c`` becomes
  ``from fedcourse.syft_compat.a.b import c``;
- data substitution: ``from torchvision import ...`` reads from
  ``fedcourse.syft_compat.torchvision`` (MNIST from the embedded sample, never a download);
- IPython cell magics (``%%time``) and line magics are dropped (they only time or configure
  the notebook), and ``--set name=value`` (e.g. ``--set epochs=1``) replaces a top-level
  assignment ``name = ...`` in a cell that holds only that assignment: this changes the
  tutorial, so the report lists it.

The report gives, per notebook, how many code cells ran without an exception, and per cell
``ok`` or the exception. With ``--reference`` (a folder of the same notebooks with stored
outputs, e.g. an older commit of the same files), cells whose code is unchanged are compared
with the stored output after masking PySyft's random 10-11 digit ids and collapsing whitespace; ``same`` or ``differs``
is shown (with -v, the two texts), so that a reader can judge which differences are random
initialisation and which are wrong values.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

DEFAULT_PARTS = ("Part 01", "Part 02", "Part 03", "Part 04", "Part 06", "Part 07")

_IMPORT_RULES = [
    (re.compile(r"^(\s*)import syft as (\w+)\s*(#.*)?$"), r"\1from fedcourse import syft_compat as \2"),
    (re.compile(r"^(\s*)import syft\s*(#.*)?$"), r"\1import fedcourse.syft_compat as syft"),
    (re.compile(r"^(\s*)from syft((?:\.\w+)*) import "), r"\1from fedcourse.syft_compat\2 import "),
]
_DATA_RULES = [
    (re.compile(r"^(\s*)from torchvision import "), r"\1from fedcourse.syft_compat.torchvision import "),
    (re.compile(r"^(\s*)import torchvision\s*$"), r"\1import fedcourse.syft_compat.torchvision as torchvision"),
]
_ID = re.compile(r"\b\d{10,11}\b")


def rewrite(source: str, settings: dict[str, str]) -> tuple[str, list[str]]:
    """The cell as the runner executes it, and what was changed."""
    changes, lines = [], []
    body = source.splitlines()
    if body and body[0].startswith("%%"):
        changes.append(f"dropped cell magic {body[0].split()[0]}")
        body = body[1:]
    for line in body:
        new = line
        if line.lstrip().startswith("%") or line.lstrip().startswith("!"):
            changes.append(f"dropped {line.strip()}")
            continue
        for pattern, replacement in _IMPORT_RULES + _DATA_RULES:
            if pattern.match(new):
                new = pattern.sub(replacement, new)
                break
        if new != line:
            changes.append(f"{line.strip()}  ->  {new.strip()}")
        lines.append(new)
    text = "\n".join(lines)
    stripped = text.strip()
    for name, value in settings.items():
        if re.fullmatch(rf"{re.escape(name)}\s*=\s*[^\n]+", stripped):
            changes.append(f"SET {stripped}  ->  {name} = {value}")
            text = f"{name} = {value}"
    return text, changes


def code_cells(path: Path) -> list[str]:
    notebook = json.loads(path.read_text())
    return ["".join(cell["source"]) for cell in notebook["cells"]
            if cell["cell_type"] == "code" and "".join(cell["source"]).strip()]


def stored_outputs(path: Path, sources: list[str]) -> list[str | None]:
    """For each of `sources`, the text its cell printed or displayed in the notebook at `path`
    (a version with stored outputs), or None where that notebook has no cell with the same code.
    The two lists of cells are aligned in order (difflib), so repeated cells such as
    ``bob._objects`` are matched with the right occurrence."""
    notebook = json.loads(path.read_text())
    codes, outputs = [], []
    for cell in notebook["cells"]:
        if cell["cell_type"] != "code" or not "".join(cell["source"]).strip():
            continue
        texts = []
        for output in cell.get("outputs", []):
            if output.get("output_type") == "stream" and output.get("name") == "stdout":
                texts.append("".join(output["text"]))
            elif output.get("output_type") in ("execute_result", "display_data"):
                texts.append("".join(output.get("data", {}).get("text/plain", "")) + "\n")
        codes.append("".join(cell["source"]).strip())
        outputs.append("".join(texts))
    found: list[str | None] = [None] * len(sources)
    matcher = difflib.SequenceMatcher(a=[s.strip() for s in sources], b=codes, autojunk=False)
    for block in matcher.get_matching_blocks():
        for k in range(block.size):
            found[block.a + k] = outputs[block.b + k]
    return found


_CHILD = r'''
import sys


def _run_cells(cells):
    # The runner's own names live here, not in __main__, so that a tutorial cannot overwrite them.
    import ast, contextlib, io, time, traceback
    namespace = sys.modules["__main__"].__dict__  # as in Jupyter: classes defined in a cell live in __main__
    results = []
    for source in cells:
        out = io.StringIO()
        started = time.perf_counter()
        error = None
        try:
            tree = ast.parse(source)
            last = None
            if tree.body and isinstance(tree.body[-1], ast.Expr):
                last = ast.Expression(tree.body.pop().value)
            with contextlib.redirect_stdout(out):
                exec(compile(tree, "<cell>", "exec"), namespace)
                if last is not None:
                    value = eval(compile(last, "<cell>", "eval"), namespace)
                    if value is not None:
                        print(repr(value))
        except BaseException as exc:
            error = "".join(traceback.format_exception_only(type(exc), exc)).strip()
            where = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename == "<cell>"]
            if where:
                error += f" (cell line {where[-1].lineno})"
        results.append({"stdout": out.getvalue(), "error": error, "seconds": time.perf_counter() - started})
    return results


import json as _json
print("\n@@RESULTS@@" + _json.dumps(_run_cells(_json.loads(sys.stdin.read()))))
'''


def _masked(text: str) -> str:
    """Ids masked and whitespace collapsed (IPython's pretty printer wraps long dicts; repr does not)."""
    return " ".join(_ID.sub("<id>", text).split())


def _shorten(text: str, head: int = 12, tail: int = 6) -> str:
    lines = text.strip().splitlines()
    if len(lines) <= head + tail:
        return "\n".join(lines)
    return "\n".join(lines[:head] + [f"... ({len(lines) - head - tail} lines) ..."] + lines[-tail:])


def run_notebook(cells: list[str], timeout: float) -> list[dict]:
    process = subprocess.run([sys.executable, "-c", _CHILD], input=json.dumps(cells), capture_output=True,
                             text=True, timeout=timeout, env=dict(os.environ, MPLBACKEND="Agg"))
    marker = process.stdout.rfind("@@RESULTS@@")
    if marker < 0:
        raise RuntimeError(f"the notebook process died (exit {process.returncode}):\n{process.stderr[-2000:]}")
    return json.loads(process.stdout[marker + len("@@RESULTS@@"):])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("tutorials", type=Path, help="folder holding the PySyft 0.2 tutorial notebooks")
    parser.add_argument("--parts", nargs="*", default=list(DEFAULT_PARTS), help="file name prefixes to run")
    parser.add_argument("--reference", type=Path, help="folder of the same notebooks with stored outputs")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="replace a one-line parameter cell NAME = ... (reported as a change)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per notebook")
    parser.add_argument("-v", "--verbose", action="store_true", help="show outputs and differences")
    args = parser.parse_args(argv)
    settings = dict(item.split("=", 1) for item in args.set)

    total_ok = total = 0
    for part in args.parts:
        matches = sorted(args.tutorials.glob(f"{part}*.ipynb"))
        if not matches:
            print(f"{part}: no notebook in {args.tutorials}")
            continue
        path = matches[0]
        sources = code_cells(path)
        rewritten = [rewrite(source, settings) for source in sources]
        reference = [None] * len(sources)
        if args.reference is not None:
            candidates = sorted(args.reference.glob(f"{part}*.ipynb"))
            if candidates:
                reference = stored_outputs(candidates[0], sources)
        results = run_notebook([code for code, _ in rewritten], args.timeout)
        ok = sum(result["error"] is None for result in results)
        total_ok, total = total_ok + ok, total + len(results)
        print(f"\n=== {path.name}: {ok} of {len(results)} code cells ran")
        for number, (stored, (_, changes), result) in enumerate(zip(reference, rewritten, results), 1):
            status = "ok" if result["error"] is None else f"FAILED {result['error']}"
            comparison = ""
            if stored is not None and stored.strip() and result["error"] is None:
                same = _masked(stored) == _masked(result["stdout"])
                comparison = " | stored output: same" if same else " | stored output: differs"
            print(f"[{number:2d}] {status} ({result['seconds']:.1f} s){comparison}")
            for change in changes:
                print(f"      changed: {change}")
            if args.verbose:
                if result["stdout"].strip():
                    print("      printed: " + _shorten(result["stdout"]).replace("\n", "\n               "))
                if comparison.endswith("differs"):
                    print("      stored:  " + _shorten(stored).replace("\n", "\n               "))
    print(f"\nin all: {total_ok} of {total} code cells ran")
    return 0 if total_ok == total else 1


if __name__ == "__main__":
    sys.exit(main())
