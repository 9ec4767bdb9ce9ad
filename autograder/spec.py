"""What the grader reads out of a lesson's source notebook, once per lesson.

- the graded test cells (grade_id, points, full source with hidden tests), in notebook order;
- the code of every provided cell (locked, or plain cells a student may run unchanged), so the
  guard can recognise them when they run;
- which names the tests use that provided cells imported (`check_close` from
  `fedcourse.checks`, `torch`, ...): a test cell re-imports them before it runs, so that a student
  who rebinds `check_close` in the notebook's namespace changes nothing;
- which modules the guard watches for monkeypatching;
- the lines of the hidden tests, which must never reach a report.
"""

from __future__ import annotations

import ast
import hashlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import nbformat

HIDDEN_BEGIN, HIDDEN_END = "### BEGIN HIDDEN TESTS", "### END HIDDEN TESTS"
# Always watched for replaced attributes: what every test relies on.
BASE_WATCH = ("builtins", "math", "operator", "functools", "numpy", "torch", "torch.nn", "torch.nn.functional",
              "fedcourse", "fedcourse.checks")
WATCH_CLASSES = ("torch.Tensor", "torch.nn.Module", "torch.nn.Parameter", "torch.optim.Optimizer",
                 "torch.utils.data.Dataset", "torch.utils.data.TensorDataset", "numpy.ndarray")
PASS_EVENT = "autograder.test_passed"


@dataclass
class TestCell:
    grade_id: str
    points: float
    source: str  # with hidden tests


@dataclass
class LessonSpec:
    lesson: str
    notebook: str
    tests: list[TestCell]
    provided: list[str]  # sources of locked and plain code cells, as the source has them
    rebind: dict[str, list]  # name -> [module, attribute or None]
    watch: list[str]
    watch_classes: list[str]
    hidden_lines: list[str] = field(default_factory=list)
    cell_keys: list[str] = field(default_factory=list)  # a key per source code cell (see cell_key)

    @property
    def max_score(self) -> float:
        return sum(test.points for test in self.tests)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "LessonSpec":
        data = dict(data)
        data["tests"] = [TestCell(**t) for t in data["tests"]]
        return cls(**data)


def nbgrader_meta(cell) -> dict:
    meta = cell.get("metadata", {}).get("nbgrader", {})
    return meta if isinstance(meta, dict) else {}


def cell_key(cell) -> str:
    """How a cell is recognised across the source and a submission: its grade_id, or its code."""
    grade_id = nbgrader_meta(cell).get("grade_id")
    if grade_id:
        return f"id:{grade_id}"
    return "src:" + hashlib.sha256(str(cell.get("source", "")).strip().encode()).hexdigest()[:16]


def _imported_names(source: str) -> dict[str, list]:
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return {}
    names: dict[str, list] = {}
    for node in tree.body:
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname:
                    names[alias.asname] = [alias.name, None]
                else:
                    top = alias.name.split(".")[0]
                    names[top] = [top, None]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            for alias in node.names:
                if alias.name != "*":
                    names[alias.asname or alias.name] = [node.module, alias.name]
    return names


def _modules_of(source: str) -> set[str]:
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return set()
    modules = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules.add(node.module)
    return modules


def names_read(source: str) -> set[str]:
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return set()
    return {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}


def hidden_lines(source: str) -> list[str]:
    lines, inside = [], False
    for line in source.splitlines():
        if line.strip() == HIDDEN_BEGIN:
            inside = True
        elif line.strip() == HIDDEN_END:
            inside = False
        elif inside and line.strip():
            lines.append(line.strip())
    return lines


def strip_hidden(source: str, placeholder: str = "# (hidden tests are not shown)") -> str:
    """The source with each hidden-tests region replaced by one comment line."""
    out, inside = [], False
    for line in source.splitlines():
        if line.strip() == HIDDEN_BEGIN:
            inside = True
            out.append(line[: len(line) - len(line.lstrip())] + placeholder)
        elif line.strip() == HIDDEN_END:
            inside = False
        elif not inside:
            out.append(line)
    return "\n".join(out)


def read_spec(lesson: str, path: Path) -> LessonSpec:
    nb = nbformat.read(path, as_version=4)
    tests, provided, keys = [], [], []
    imports: dict[str, list] = {}
    modules: set[str] = set()
    hidden: list[str] = []
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        keys.append(cell_key(cell))
        meta = nbgrader_meta(cell)
        source = cell.source
        modules |= _modules_of(source)
        if meta.get("grade") and not meta.get("solution"):
            tests.append(TestCell(meta["grade_id"], float(meta.get("points", 0)), source))
            hidden += hidden_lines(source)
        if not meta.get("solution"):
            provided.append(source)
            for name, target in _imported_names(source).items():
                imports.setdefault(name, target)
    used = set().union(*(names_read(t.source) for t in tests)) if tests else set()
    rebind = {name: target for name, target in sorted(imports.items()) if name in used}
    watch = sorted(set(BASE_WATCH) | {m for m in modules if m.split(".")[0] == "fedcourse"})
    return LessonSpec(lesson=lesson, notebook=path.stem, tests=tests, provided=provided, rebind=rebind,
                      watch=watch, watch_classes=list(WATCH_CLASSES), hidden_lines=sorted(set(hidden)),
                      cell_keys=keys)


def wrap_test(source: str, grade_id: str, rebind: dict[str, list]) -> str:
    """A test cell as the grader runs it: one block that re-imports the names the test uses, runs
    the test, and, only if it got to the end, raises the audit event the guard is waiting for."""
    tree = ast.parse(source)
    used = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
    imports: list[ast.stmt] = []
    for name in sorted(used & set(rebind)):
        module, attribute = rebind[name]
        if attribute is None:
            imports.append(ast.Import(names=[ast.alias(name=module, asname=None if name == module else name)]))
        else:
            imports.append(ast.ImportFrom(module=module, names=[ast.alias(name=attribute, asname=name)], level=0))
    signal = ast.parse(f"__import__('sys').audit({PASS_EVENT!r}, {grade_id!r})").body
    block = ast.If(test=ast.Constant(True), body=imports + tree.body + signal, orelse=[])
    return ast.unparse(ast.fix_missing_locations(ast.Module(body=[block], type_ignores=[])))
