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
    # Names this test assigns that other cells read: copied to the notebook's namespace after it.
    shared: list[str] = field(default_factory=list)
    # Names it reads from the notebook's namespace before assigning them: they stay global.
    global_names: list[str] = field(default_factory=list)


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
    """Every hidden-test line as written, without its comment, and as the grader re-prints it
    (ast.unparse), so that none of them can leave through a message in any of these forms."""
    lines, inside, region = [], False, []
    for line in source.splitlines() + [""]:
        if line.strip() == HIDDEN_BEGIN:
            inside, region = True, []
        elif line.strip() == HIDDEN_END:
            inside = False
            try:
                import textwrap

                lines += ast.unparse(ast.parse(textwrap.dedent("\n".join(region)))).splitlines()
            except SyntaxError:
                pass
        elif inside and line.strip():
            region.append(line)
            lines.append(line.strip())
            code = line.split("#", 1)[0].strip()
            if code:
                lines.append(code)
    return sorted({line.strip() for line in lines if line.strip()})


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


def _assigned_names(source: str) -> set[str]:
    """Names a cell binds at its top level (what would become a function's locals)."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return set()
    names: set[str] = set()

    class Binder(ast.NodeVisitor):
        def visit_Name(self, node):
            if isinstance(node.ctx, (ast.Store, ast.Del)):
                names.add(node.id)

        def visit_FunctionDef(self, node):
            names.add(node.name)  # its body has a scope of its own

        visit_AsyncFunctionDef = visit_ClassDef = visit_FunctionDef

        def visit_Lambda(self, node):
            pass

        def visit_Import(self, node):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)

        visit_ImportFrom = visit_Import

        def visit_ExceptHandler(self, node):
            if node.name:
                names.add(node.name)
            self.generic_visit(node)

        def _comprehension(self, node):
            pass  # comprehensions have their own scope

        visit_ListComp = visit_SetComp = visit_DictComp = visit_GeneratorExp = _comprehension

    Binder().visit(tree)
    return names


class _TopLevelOrder(ast.NodeVisitor):
    """In evaluation order, the reads and writes of names in a cell's own (top-level) scope."""

    def __init__(self):
        self.events: list[tuple[str, str]] = []  # (name, "load" | "store")
        self.nested_loads: set[str] = set()  # names read inside functions, lambdas, comprehensions
        self.nested_bound: set[str] = set()  # names those nested scopes bind themselves

    def visit_Name(self, node):
        self.events.append((node.id, "load" if isinstance(node.ctx, ast.Load) else "store"))

    def visit_Assign(self, node):
        self.visit(node.value)
        for target in node.targets:
            self.visit(target)

    def visit_AnnAssign(self, node):
        if node.value is not None:
            self.visit(node.value)
        self.visit(node.target)

    def visit_AugAssign(self, node):
        if isinstance(node.target, ast.Name):
            self.events.append((node.target.id, "load"))
        self.visit(node.value)
        self.visit(node.target)

    def visit_NamedExpr(self, node):
        self.visit(node.value)
        self.visit(node.target)

    def visit_Import(self, node):
        for alias in node.names:
            self.events.append(((alias.asname or alias.name).split(".")[0], "store"))

    visit_ImportFrom = visit_Import

    def visit_ExceptHandler(self, node):
        if node.type is not None:
            self.visit(node.type)
        if node.name:
            self.events.append((node.name, "store"))
        for statement in node.body:
            self.visit(statement)

    def _nested(self, node):
        for child in ast.walk(node):
            if isinstance(child, ast.Name):
                (self.nested_loads if isinstance(child.ctx, ast.Load) else self.nested_bound).add(child.id)
            elif isinstance(child, ast.arg):
                self.nested_bound.add(child.arg)

    def visit_FunctionDef(self, node):
        for decorator in node.decorator_list:
            self.visit(decorator)
        for default in node.args.defaults + [d for d in node.args.kw_defaults if d is not None]:
            self.visit(default)
        self._nested(node)
        self.events.append((node.name, "store"))

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_ClassDef(self, node):
        for base in node.bases:
            self.visit(base)
        self._nested(node)
        self.events.append((node.name, "store"))

    def visit_Lambda(self, node):
        self._nested(node)

    def _comprehension(self, node):
        self.visit(node.generators[0].iter)  # evaluated in the enclosing scope
        self._nested(node)

    visit_ListComp = visit_SetComp = visit_DictComp = visit_GeneratorExp = _comprehension


def _free_names(source: str) -> set[str]:
    """Names a cell reads from the namespace it runs in: read at its top level before it
    assigns them (or without ever assigning them), or read by functions it defines without
    being bound anywhere in the cell."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return set()
    order = _TopLevelOrder()
    for statement in tree.body:
        order.visit(statement)
    first: dict[str, str] = {}
    for name, kind in order.events:
        first.setdefault(name, kind)
    free = {name for name, kind in first.items() if kind == "load"}
    bound = set(first) - free
    return free | (order.nested_loads - bound - order.nested_bound)


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
    code_cells = [c.source for c in nb.cells if c.cell_type == "code"]
    for test in tests:
        needed = set().union(set(), *(_free_names(c) for c in code_cells if c != test.source))
        test.global_names = sorted(_assigned_names(test.source) & _free_names(test.source))
        test.shared = sorted(_assigned_names(test.source) & needed - set(test.global_names))
    used = set().union(*(names_read(t.source) for t in tests)) if tests else set()
    rebind = {name: target for name, target in sorted(imports.items()) if name in used}
    watch = sorted(set(BASE_WATCH) | {m for m in modules if m.split(".")[0] == "fedcourse"})
    return LessonSpec(lesson=lesson, notebook=path.stem, tests=tests, provided=provided, rebind=rebind,
                      watch=watch, watch_classes=list(WATCH_CLASSES), hidden_lines=sorted(set(hidden)),
                      cell_keys=keys)


TEST_FUNCTION = "__autograder_test__"
SHARED, SHARED_ARGUMENT = "__autograder_shared__", "__shared__"


def wrap_test(source: str, grade_id: str, rebind: dict[str, list], shared: list[str] = (),
              global_names: list[str] = ()) -> str:
    """A test cell as the grader runs it.

    The test becomes the body of a function that the cell defines and calls at once: its
    variables (a hidden test's `expected`, say) are then local to that call, out of reach of
    the student's code except through frame introspection, which the guard reports. The names
    the test imports from the course (`check_close`, ...) are imported again as locals at its
    start, so rebinding them in the notebook's namespace changes nothing. The names other
    cells read from this one (`shared`) are copied into the notebook's namespace when it ends,
    passed or failed, as if they had been global all along. Only if the body gets to its last
    line does it raise the audit event that the guard turns into a pass."""
    tree = ast.parse(source)
    used = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
    imports: list[ast.stmt] = []
    for name in sorted(used & set(rebind) - set(global_names)):
        module, attribute = rebind[name]
        if attribute is None:
            imports.append(ast.Import(names=[ast.alias(name=module, asname=None if name == module else name)]))
        else:
            imports.append(ast.ImportFrom(module=module, names=[ast.alias(name=attribute, asname=name)], level=0))
    signal = ast.parse(f"__import__('sys').audit({PASS_EVENT!r}, {grade_id!r})").body
    declare = [ast.Global(names=sorted(global_names))] if global_names else []
    export = ast.parse(f"{SHARED_ARGUMENT}.update((k, v) for k, v in locals().items() if k in {sorted(shared)!r})").body
    body = declare + [ast.Try(body=imports + tree.body + signal, handlers=[], orelse=[], finalbody=export)]
    function = ast.parse(f"def {TEST_FUNCTION}({SHARED_ARGUMENT}): pass").body[0]
    function.body = body
    run = ast.parse(f"{SHARED}= {{}}\ntry:\n    {TEST_FUNCTION}({SHARED})\nfinally:\n    globals().update({SHARED})"
                    ).body
    block = ast.If(test=ast.Constant(True), body=[function] + run, orelse=[])
    return ast.unparse(ast.fix_missing_locations(ast.Module(body=[block], type_ignores=[])))
