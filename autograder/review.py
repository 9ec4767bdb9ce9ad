"""Reading a submission's own code for ways to fool its tests (static review).

Part of the score stage. The guard in the kernel (autograder/guard.py) sees what code does
when it runs; this reads what the student wrote, before anything runs, for constructs that
an honest solution has no use for and that tampering needs: IPython's machinery, frame and
code introspection, the interpreter's internals, monkeypatching a module, objects that lie
about equality, names that only a test defines, processes and sockets.

A finding is a reason for an instructor to look, not a verdict: it costs no points by
itself. Whatever the lesson's own solution does is not reported (the lesson's profile lists
it), so a lesson that teaches monkeypatching (lesson 01's hook) does not flag its students
for doing the exercise.
"""

from __future__ import annotations

import ast
import builtins
import re
from dataclasses import dataclass

from .spec import LessonSpec, nbgrader_meta

INTROSPECTION_CALLS = {
    "sys._getframe": "frames", "sys._current_frames": "frames", "sys.exc_info": "frames",
    "inspect.currentframe": "frames", "inspect.stack": "frames", "inspect.trace": "frames",
    "inspect.getouterframes": "frames", "inspect.getinnerframes": "frames", "inspect.getframeinfo": "frames",
    "traceback.walk_stack": "frames", "traceback.extract_stack": "frames", "traceback.walk_tb": "frames",
    "sys.settrace": "interpreter", "sys.setprofile": "interpreter", "sys.addaudithook": "interpreter",
    "sys.audit": "interpreter", "threading.settrace": "interpreter", "gc.get_objects": "interpreter",
    "gc.get_referrers": "interpreter", "gc.get_referents": "interpreter",
    "importlib.import_module": "imports", "importlib.reload": "imports", "importlib.util.spec_from_file_location": "imports",
    "os.system": "processes", "os.popen": "processes", "os.fork": "processes", "os.kill": "processes",
    "os.execv": "processes", "os.execvp": "processes", "os._exit": "processes", "pty.spawn": "processes",
}
CALLED_BUILTINS = {"exec": "code", "eval": "code", "compile": "code", "__import__": "imports",
                   "globals": "namespace", "vars": "namespace", "locals": "namespace",
                   "get_ipython": "ipython", "breakpoint": "interpreter"}
SUSPECT_MODULES = {"ctypes": "interpreter", "gc": "interpreter", "inspect": "frames", "linecache": "namespace",
                   "importlib": "imports", "builtins": "interpreter", "__main__": "namespace", "IPython": "ipython",
                   "ipykernel": "ipython", "marshal": "code", "atexit": "interpreter", "signal": "interpreter",
                   "faulthandler": "interpreter", "subprocess": "processes", "multiprocessing": "processes",
                   "socket": "processes", "urllib": "processes", "http": "processes", "requests": "processes",
                   "pty": "processes", "dis": "code", "types": "code", "sysconfig": "interpreter",
                   "traceback": "frames"}
SUSPECT_ATTRIBUTES = {"f_back": "frames", "f_locals": "frames", "f_globals": "frames", "f_code": "frames",
                      "tb_frame": "frames", "tb_next": "frames", "gi_frame": "frames", "cr_frame": "frames",
                      "__code__": "code", "co_consts": "code", "co_code": "code", "__globals__": "namespace",
                      "__closure__": "code", "__builtins__": "interpreter", "__dict__": "namespace",
                      "__subclasses__": "interpreter", "__mro__": "interpreter", "__bases__": "interpreter",
                      "user_ns": "ipython", "input_transformers_post": "ipython", "input_transformers_cleanup": "ipython",
                      "ast_transformers": "ipython"}
# Attributes of sys that change how Python finds modules or reports errors.
SYS_ATTRIBUTES = {"modules": "imports", "meta_path": "imports", "path_hooks": "imports", "path": "imports",
                  "displayhook": "ipython", "excepthook": "interpreter", "stdout": "interpreter", "stderr": "interpreter",
                  "audit": "interpreter", "addaudithook": "interpreter", "settrace": "interpreter",
                  "setprofile": "interpreter", "_getframe": "frames"}
# Methods that decide what comparisons, truth tests and conversions say about an object.
LYING_DUNDERS = {"__eq__", "__ne__", "__lt__", "__le__", "__gt__", "__ge__", "__bool__", "__len__", "__float__",
                 "__int__", "__index__", "__complex__", "__abs__", "__round__", "__hash__", "__torch_function__",
                 "__torch_dispatch__", "__array__", "__array_function__", "__array_ufunc__", "__instancecheck__",
                 "__subclasscheck__", "__getattribute__", "__getattr__", "__class_getitem__"}
IPYTHON_HISTORY = re.compile(r"^(In|Out|_ih|_oh|_dh|_i{1,3}\d*|_\d+|__+|_)$")
WHY = {
    "ipython": "uses IPython's own machinery (get_ipython, magics, hooks), which can change how test cells run",
    "frames": "reads frames of running code (which can see a test's expected values)",
    "code": "builds, runs or reads code objects (exec, eval, compile, __code__)",
    "namespace": "reads the notebook's namespace or input history directly",
    "interpreter": "reaches into the interpreter (gc, ctypes, sys hooks, builtins)",
    "imports": "imports modules by computed names or edits the import system",
    "processes": "starts programs, signals or network connections",
    "monkeypatch": "replaces an attribute of a module or class it did not write",
    "lying": "defines methods that decide what comparisons and conversions say",
    "test-names": "reads a variable that only a test cell defines",
    "files": "writes a Python file, which could shadow a module",
    "reference": "imports the course's reference implementation of a lesson",
}


@dataclass(frozen=True)
class Finding:
    key: str  # what, precisely (e.g. "frames:sys._getframe"); the lesson's profile allows keys
    cell: int  # index of the cell in the submitted notebook
    detail: str

    @property
    def family(self) -> str:
        return self.key.split(":", 1)[0]

    def sentence(self) -> str:
        return f"cell {self.cell + 1} {WHY.get(self.family, self.family)}: {self.detail}"


def _dotted(node: ast.AST) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return None


def _python_source(source: str) -> tuple[str, bool]:
    """The cell as Python (IPython magics turned into calls), and whether it had magics."""
    try:
        ast.parse(source)
        return source, False
    except SyntaxError:
        pass
    try:
        from IPython.core.inputtransformer2 import TransformerManager

        transformed = TransformerManager().transform_cell(source)
        return transformed, transformed.strip() != source.strip()
    except Exception:
        return source, False


def _bound_names(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
            names.add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, ast.arg):
            names.add(node.arg)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            names.add(node.name)
    return names


def _module_names(trees: list[ast.AST]) -> set[str]:
    """Names bound to modules by `import` statements anywhere in the notebook."""
    names = set()
    for tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names |= {(a.asname or a.name).split(".")[0] for a in node.names}
    return names


class _Reader(ast.NodeVisitor):
    def __init__(self, cell: int, modules: set[str], test_only: set[str]):
        self.cell, self.modules, self.test_only = cell, modules, test_only
        self.findings: list[Finding] = []
        self.function_depth = 0

    def add(self, key: str, detail: str) -> None:
        self.findings.append(Finding(key, self.cell, detail))

    def _reference(self, module: str) -> None:
        from fedcourse.checks import TOOLBOX_MODULES

        if module.split(".")[0] == "fedcourse" and module not in TOOLBOX_MODULES:
            self.add(f"reference:{module}", f"imports {module}")

    def visit_Import(self, node):
        for alias in node.names:
            top = alias.name.split(".")[0]
            if top in SUSPECT_MODULES:
                self.add(f"{SUSPECT_MODULES[top]}:import {alias.name}", f"import {alias.name}")
            self._reference(alias.name)
        self.generic_visit(node)

    def visit_ImportFrom(self, node):
        if node.module and node.level == 0:
            self._reference(node.module)
            if node.module == "fedcourse":
                for alias in node.names:
                    self._reference(f"fedcourse.{alias.name}")
        top = (node.module or "").split(".")[0]
        if top in SUSPECT_MODULES:
            names = ", ".join(a.name for a in node.names)
            self.add(f"{SUSPECT_MODULES[top]}:from {node.module} import {names}", f"from {node.module} import {names}")
        if node.module == "sys":
            for alias in node.names:
                call = f"sys.{alias.name}"
                if call in INTROSPECTION_CALLS or alias.name in SUSPECT_ATTRIBUTES:
                    self.add(f"{INTROSPECTION_CALLS.get(call, SUSPECT_ATTRIBUTES.get(alias.name))}:{call}",
                             f"from sys import {alias.name}")
        self.generic_visit(node)

    def visit_Call(self, node):
        name = _dotted(node.func)
        if name in INTROSPECTION_CALLS:
            self.add(f"{INTROSPECTION_CALLS[name]}:{name}", f"calls {name}()")
        elif isinstance(node.func, ast.Name) and node.func.id in CALLED_BUILTINS:
            if not (node.func.id == "vars" and node.args):
                self.add(f"{CALLED_BUILTINS[node.func.id]}:{node.func.id}", f"calls {node.func.id}()")
        if isinstance(node.func, ast.Name) and node.func.id in ("setattr", "delattr") and node.args:
            target = _dotted(node.args[0])
            if target and target.split(".")[0] in self.modules:
                attribute = node.args[1].value if len(node.args) > 1 and isinstance(node.args[1], ast.Constant) else "?"
                self.add(f"monkeypatch:{target}.{attribute}", f"{node.func.id}({target}, {attribute!r}, ...)")
        if name and name.split(".")[-1] == "open" and any(
                isinstance(a, ast.Constant) and isinstance(a.value, str) and a.value.endswith(".py") for a in node.args):
            self.add("files:open .py", "opens a .py file")
        self.generic_visit(node)

    def visit_Attribute(self, node):
        if node.attr in SUSPECT_ATTRIBUTES:
            self.add(f"{SUSPECT_ATTRIBUTES[node.attr]}:.{node.attr}", f"uses .{node.attr}")
        elif isinstance(node.value, ast.Name) and node.value.id == "sys" and node.attr in SYS_ATTRIBUTES:
            self.add(f"{SYS_ATTRIBUTES[node.attr]}:sys.{node.attr}", f"uses sys.{node.attr}")
        self.generic_visit(node)

    def _assigned(self, target):
        if isinstance(target, ast.Attribute):
            name = _dotted(target)
            if name and name.split(".")[0] in self.modules:
                self.add(f"monkeypatch:{name}", f"assigns {name}")
        elif isinstance(target, ast.Subscript):
            base = _dotted(target.value)
            if base and (base.endswith("__dict__") or base.split(".")[0] in self.modules and "modules" in base):
                self.add(f"monkeypatch:{base}[...]", f"assigns into {base}[...]")
        elif isinstance(target, (ast.Tuple, ast.List)):
            for element in target.elts:
                self._assigned(element)

    def visit_Assign(self, node):
        for target in node.targets:
            self._assigned(target)
        self.generic_visit(node)

    def visit_AugAssign(self, node):
        self._assigned(node.target)
        self.generic_visit(node)

    def visit_ClassDef(self, node):
        for item in node.body:
            if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and item.name in LYING_DUNDERS:
                self.add(f"lying:{item.name}", f"class {node.name} defines {item.name}")
            if isinstance(item, ast.Assign):
                for target in item.targets:
                    if isinstance(target, ast.Name) and target.id in LYING_DUNDERS | {"__class__"}:
                        self.add(f"lying:{target.id}", f"class {node.name} sets {target.id}")
        for keyword in node.keywords:
            if keyword.arg == "metaclass":
                self.add("lying:metaclass", f"class {node.name} has a metaclass")
        self.generic_visit(node)

    def _function(self, node):
        self.function_depth += 1
        self.generic_visit(node)
        self.function_depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def visit_Name(self, node):
        if isinstance(node.ctx, ast.Load):
            if node.id in self.test_only:
                self.add(f"test-names:{node.id}", f"reads `{node.id}`, which only a test cell defines")
            elif IPYTHON_HISTORY.match(node.id) and node.id != "_":
                self.add(f"namespace:{node.id}", f"reads `{node.id}` (IPython's input/output history)")
            elif node.id in ("__builtins__", "__main__", "__loader__", "__spec__"):
                self.add(f"interpreter:{node.id}", f"uses {node.id}")


def review_notebook(submitted, spec: LessonSpec, source_cells: list[str]) -> list[Finding]:
    """Findings in the cells a student wrote or changed (cells equal to the lesson's own are skipped)."""
    lesson_code = {s.strip() for s in source_cells}
    test_sources = [t.source for t in spec.tests]
    trees, student = [], []
    for index, cell in enumerate(submitted.cells):
        if cell.get("cell_type") != "code":
            continue
        source = str(cell.get("source", ""))
        python, magics = _python_source(source)
        try:
            tree = ast.parse(python)
        except SyntaxError:
            continue
        trees.append(tree)
        meta = nbgrader_meta(cell)
        if source.strip() in lesson_code or (meta.get("locked") and not meta.get("solution")):
            continue
        student.append((index, tree, magics))
    provided_trees = []
    for source in source_cells:
        try:
            provided_trees.append(ast.parse(source))
        except SyntaxError:
            continue
    test_bound = set().union(*(_bound_names(ast.parse(s)) for s in test_sources)) if test_sources else set()
    other_bound = set().union(*(_bound_names(t) for _, t, _ in student), set())
    for tree in provided_trees:
        if ast.unparse(tree).strip() not in {ast.unparse(ast.parse(s)).strip() for s in test_sources}:
            other_bound |= _bound_names(tree)
    test_only = test_bound - other_bound - set(dir(builtins))
    modules = _module_names(trees + provided_trees)
    findings: list[Finding] = []
    for index, tree, magics in student:
        reader = _Reader(index, modules, test_only)
        reader.visit(tree)
        if magics:
            reader.add("ipython:magic", "uses IPython magics (% or ! lines)")
        findings += reader.findings
    unique: dict[tuple[str, int], Finding] = {}
    for finding in findings:
        unique.setdefault((finding.key, finding.cell), finding)
    return list(unique.values())
