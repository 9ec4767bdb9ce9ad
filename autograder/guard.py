"""The grader's guard inside a student's kernel: it decides, from inside, whether a test cell ran.

This file is the kernel's main program when the autograder grades a notebook (it starts
ipykernel itself). It uses only the standard library and ipykernel, so that it runs in every
lesson's environment, and it is copied into the sandbox rather than imported from the course.

Why it exists. nbgrader scores a test cell by the absence of an error in its output, and the
output is whatever the kernel sends: code in a student's cell can register IPython hooks,
rewrite cells before they run, swallow exceptions or print a partial-credit number. The guard
gives the grader a verdict that such code cannot forge:

- It installs a Python audit hook before any notebook code runs. Audit hooks cannot be
  removed, and CPython calls them for `exec` of every code object, for frame introspection
  (`sys._getframe`, `tb_frame`, ...), for `gc`, `ctypes`, `sys.settrace` and more.
- The grader sends each test cell wrapped in one block that ends by raising the audit event
  `autograder.test_passed` (see `autograder.execute.wrap_test`). The guard accepts that
  event only from the frame of a code object whose fingerprint it computed itself from the
  test's source (so the cell ran as written, not rewritten by a transformer), whose globals
  are the notebook's own, and only when the helpers the tests rely on (builtins, torch,
  numpy, fedcourse's checks and references, `sys.modules`) are still the objects it saw at
  start-up. Anything that unwinds the block, an exception or a skipped assertion, never
  reaches the event: a test counts as passed only if its last line ran.
- Every verdict and every suspicious action of student code is written as a numbered,
  HMAC-signed record into a FIFO that only the grader reads. The key arrives in a file that
  the guard deletes before any notebook code runs; records that are forged, replayed or
  missing are detected by the grader (autograder.channel).

What it does not do: it cannot make a compromised interpreter honest. Code that obtains the
key (through memory access the audit hook reports) or rewrites the interpreter from C can
forge records; every route the guard knows to such power is reported as tampering, and the
README states this limit.
"""

import ast
import hashlib
import hmac
import json
import os
import sys
import threading
import types

CONFIG_ENV = "AUTOGRADER_GUARD_CONFIG"
PASS_EVENT = "autograder.test_passed"

# IPython sets these builtins while a cell runs and restores them after: not tampering.
IPYTHON_BUILTINS = frozenset({"exit", "quit", "get_ipython", "display", "__IPYTHON__", "_", "__", "___", "input"})
# Events that let code read frames (and with them a test's expected values) or code objects.
FRAME_EVENTS = frozenset({"sys._getframe"})
FRAME_ATTRIBUTES = frozenset({"tb_frame", "gi_frame", "cr_frame", "ag_frame", "f_code", "__code__"})
# Events that give power over the interpreter, the guard included: they zero the tests after them.
COMPROMISING = {
    "gc.get_objects": "walked every object in memory (gc.get_objects)",
    "gc.get_referrers": "searched memory for references (gc.get_referrers)",
    "gc.get_referents": "searched memory for references (gc.get_referents)",
    "sys.settrace": "installed a trace function (sys.settrace), which can skip a test's lines",
    "sys.setprofile": "installed a profile function (sys.setprofile)",
    "sys.addaudithook": "installed an audit hook (sys.addaudithook)",
    "sys._setprofileallthreads": "installed a profile function in every thread",
    "sys._settraceallthreads": "installed a trace function in every thread",
    "cpython.PyInterpreterState_Clear": "cleared the interpreter",
    "sys._current_frames": "read every thread's frames (sys._current_frames), the grader's own included",
    "sys._current_exceptions": "read every thread's exceptions (sys._current_exceptions), the grader's own included",
}
REVIEWED = {
    "exec": "ran generated code (exec/eval)",
    "compile": "compiled generated code (compile)",
    "code.__new__": "built a code object by hand",
    "function.__new__": "built a function from a code object",
    "marshal.loads": "loaded marshalled code",
    "os.system": "ran a shell command",
    "subprocess.Popen": "started a program",
    "os.exec": "replaced the process with a program",
    "os.posix_spawn": "started a program",
    "os.spawn": "started a program",
    "os.fork": "forked the process",
    "os.forkpty": "forked the process",
    "os.kill": "sent a signal to a process",
    "socket.connect": "opened a network connection",
    "socket.bind": "opened a network socket",
    "builtins.input": "asked for input",
    "sys.unraisablehook": "replaced sys.unraisablehook",
    "sys.excepthook": "replaced sys.excepthook",
}
# Frames of these modules pass a request on for their caller (inspect.currentframe() is
# sys._getframe(1)); the caller is the one who asked.
TRANSPARENT_MODULES = ("inspect", "traceback", "operator", "functools", "importlib", "runpy", "types", "codeop")
MAX_EVENTS_PER_KIND = 3
CodeType, FunctionType = types.CodeType, types.FunctionType


def _fingerprint_code(code, digest):
    digest.update(code.co_code)
    digest.update(code.co_exceptiontable if hasattr(code, "co_exceptiontable") else b"")
    digest.update(repr((code.co_name, code.co_names, code.co_varnames, code.co_freevars, code.co_cellvars,
                        code.co_argcount, code.co_posonlyargcount, code.co_kwonlyargcount)).encode())
    for constant in code.co_consts:
        if type(constant) is CodeType:
            _fingerprint_code(constant, digest)
        else:
            digest.update(_canonical_constant(constant))


def _canonical_constant(value):
    kind = type(value)
    if kind in (int, float, complex, bool, str, bytes) or value is None or value is Ellipsis:
        return (kind.__name__ + ":" + repr(value)).encode()
    if kind in (tuple, frozenset):
        items = sorted(_canonical_constant(v) for v in value) if kind is frozenset else \
            [_canonical_constant(v) for v in value]
        return kind.__name__.encode() + b"(" + b",".join(items) + b")"
    return b"?" + kind.__name__.encode()


def fingerprint(code):
    """What a code object does, without where it came from (file name and line numbers)."""
    digest = hashlib.sha256()
    _fingerprint_code(code, digest)
    return digest.hexdigest()


def fingerprint_source(source):
    return fingerprint(compile(ast.parse(source), "<autograder>", "exec", dont_inherit=True))


def statement_fingerprints(source):
    """Fingerprints of a cell's statements as IPython compiles them: one at a time, the last
    one in 'single' mode when it is an expression (so that its value is displayed)."""
    try:
        body = ast.parse(source).body
    except SyntaxError:
        return set()
    prints = set()
    for index, node in enumerate(body):
        prints.add(fingerprint(compile(ast.Module([node], []), "<autograder>", "exec", dont_inherit=True)))
        if index == len(body) - 1 and isinstance(node, ast.Expr):
            prints.add(fingerprint(compile(ast.Interactive([node]), "<autograder>", "single", dont_inherit=True)))
    return prints


class Channel:
    """Numbered, signed records into the grader's FIFO (written whole: each is under PIPE_BUF)."""

    def __init__(self, path, key):
        self._fd = os.open(path, os.O_WRONLY)
        self._key = key
        self._seq = 0
        self._lock = threading.Lock()

    def send(self, record):
        with self._lock:
            self._seq += 1
            record = dict(record, seq=self._seq)
            body = json.dumps(record, sort_keys=True, default=str)
            if len(body) > 3000:
                record["detail"] = str(record.get("detail", ""))[:200] + " [cut]"
                body = json.dumps(record, sort_keys=True, default=str)[:3000]
            mac = hmac.new(self._key, body.encode(), hashlib.sha256).hexdigest()
            line = (body + "\t" + mac + "\n").encode()
            try:
                os.write(self._fd, line)
            except OSError:
                pass


def main():
    # The guard's state (its channel and key, the snapshots) lives only in the closures of the
    # audit hook, never in a frame that stays on a stack while the notebook runs: a student's
    # code that walks frames finds nothing of it.
    app = _install()
    app.start()


def _install():
    """Install the audit hook, start the kernel application and take the snapshots; the app."""
    config_path = os.environ.pop(CONFIG_ENV)
    if os.environ.get("HOME"):
        os.makedirs(os.environ["HOME"], exist_ok=True)
    with open(config_path) as f:
        config = json.load(f)
    os.unlink(config_path)
    channel = Channel(config["channel"], bytes.fromhex(config["key"]))
    del config["key"]

    from ipykernel import compiler

    os.environ.pop("IPYKERNEL_CELL_NAME", None)  # cell files are named after their code, as usual
    expected_tests = {fingerprint_source(source): grade_id for grade_id, source in config["tests"].items()}
    # Provided cells (locked, or given code a student may leave as it is), by the name ipykernel
    # gives their file: the hash of their code. A cell counts as provided only while every
    # statement it runs is one of that code's statements.
    provided = {}
    for source in config["locked"]:
        name = str(compiler.murmur2_x86(source, compiler.get_tmp_hash_seed())) + ".py"
        provided.setdefault(name, set()).update(statement_fingerprints(source))
    tainted = set()
    allowed_changes = set(config.get("allowed_changes", ()))
    calibrating = bool(config.get("calibrate"))  # report what changed instead of refusing
    cell_directory = []  # ipykernel's folder of cell files, known once it has started
    state = {"user_ns": None, "running": None, "compromised": None, "tampered_functions": set(), "counts": {}}
    local = threading.local()  # per thread: is the hook already running (its own events are not watched)
    verified = {}  # grade_id -> the code object of the test as it started running
    trusted_files = set()  # cell files of locked cells (tests and provided code)
    snapshots = []  # (name, module, {key: value}) taken before any notebook code ran
    class_snapshots = []  # (qualified name, class, {key: value})

    def is_cell_file(filename):
        # ipykernel names a cell's file <temp folder>/ipykernel_<pid>/<hash of its code>.py; the temp
        # folder can change while the notebook runs (lesson 09 moves it), the rest cannot.
        return (bool(cell_directory) and type(filename) is str and filename.endswith(".py")
                and os.path.basename(os.path.dirname(filename)) == cell_directory[0])

    def student_frame(frame):
        """The frame that asked for this event, if it is code from a student's cell."""
        depth = 0
        while frame is not None and depth < 12:
            filename = frame.f_code.co_filename
            if is_cell_file(filename):
                return frame if filename not in trusted_files else None
            module = frame.f_globals.get("__name__", "") if type(frame.f_globals) is dict else ""
            if type(module) is not str or not module.split(".")[0] in TRANSPARENT_MODULES:
                return None
            frame = frame.f_back
            depth += 1
        return None

    def note(kind, what, frame, severity):
        key = (kind, frame.f_code.co_filename if frame is not None else "")
        count = state["counts"].get(key, 0)
        state["counts"][key] = count + 1
        if count >= MAX_EVENTS_PER_KIND:
            return
        cell = os.path.basename(frame.f_code.co_filename) if frame is not None else None
        line = frame.f_lineno if frame is not None else None
        channel.send({"kind": "event", "severity": severity, "event": kind, "what": what, "cell": cell,
                      "line": line, "during": state["running"]})
        if severity == "compromise" and state["compromised"] is None:
            state["compromised"] = what

    modules = sys.modules  # the interpreter's own table, even if `sys.modules` is rebound

    def integrity_problems():
        problems, reviews = [], []
        for name, module, values in snapshots:
            if dict.get(modules, name) is not module:
                problems.append(f"sys.modules[{name!r}] was replaced")
                continue
            current = type(sys).__dict__["__dict__"].__get__(module)
            for key, value in values.items():
                if current.get(key, value) is not value and f"{name}.{key}" not in allowed_changes:
                    if not (name == "builtins" and key in IPYTHON_BUILTINS):
                        problems.append(f"{name}.{key}")
        for qualified, cls, values in class_snapshots:
            current = type.__dict__["__dict__"].__get__(cls)
            for key, value in values.items():
                if current.get(key, value) is not value and f"{qualified}.{key}" not in allowed_changes:
                    reviews.append(f"{qualified}.{key}")
        for qualified in sorted(state["tampered_functions"]):
            problems.append(f"{qualified}.__code__")
        return problems, reviews

    def own_code(grade_id, frame):
        """Whether `frame` runs the body of test `grade_id`, called by the cell's own code."""
        cell = verified.get(grade_id)
        if cell is None or frame.f_back is None or frame.f_back.f_code is not cell:
            return False
        return any(constant is frame.f_code for constant in cell.co_consts)

    def on_test_passed(args):
        grade_id = args[0] if len(args) == 1 and type(args[0]) is str else None
        frame = sys._getframe(2)  # 0: this function, 1: the hook, 2: the test's own frame
        if grade_id is None or not own_code(grade_id, frame):
            channel.send({"kind": "fail", "test": grade_id if grade_id else "?",
                          "reason": "the pass signal did not come from the test's own code"})
            return
        if frame.f_globals is not state["user_ns"]:
            channel.send({"kind": "fail", "test": grade_id, "reason": "the test ran with someone else's globals"})
            return
        if state["compromised"]:
            channel.send({"kind": "fail", "test": grade_id,
                          "reason": "not counted: earlier, code in the notebook " + state["compromised"]})
            return
        problems, reviews = integrity_problems()
        if calibrating:
            channel.send({"kind": "pass", "test": grade_id, "reviews": [], "changes": problems + reviews})
            return
        if problems:
            channel.send({"kind": "fail", "test": grade_id,
                          "reason": "not counted: before this test ran, the notebook's code replaced "
                          + ", ".join(problems[:5]) + (" ..." if len(problems) > 5 else "")})
            return
        channel.send({"kind": "pass", "test": grade_id,
                      "reviews": ["the notebook's code replaced " + ", ".join(reviews[:5])] if reviews else []})

    def on_exec(args):
        code = args[0] if args else None
        if type(code) is not CodeType or code.co_name != "<module>" or not is_cell_file(code.co_filename):
            return
        print_ = fingerprint(code)
        name = os.path.basename(code.co_filename)
        grade_id = expected_tests.get(print_)
        if grade_id is not None:
            verified[grade_id] = code
            trusted_files.add(code.co_filename)
        elif name in provided and name not in tainted and print_ in provided[name]:
            trusted_files.add(code.co_filename)
        else:
            tainted.add(name)
            trusted_files.discard(code.co_filename)
        if name != state["running"] or grade_id is not None:
            state["running"] = name
            channel.send({"kind": "exec", "cell": name, "test": grade_id,
                          "provided": code.co_filename in trusted_files})

    def classify(event, args, frame):
        if event in FRAME_EVENTS:
            note(event, "read a frame of the running code (" + event + "): it can see a test's variables",
                 frame, "review")
        elif event == "object.__getattr__":
            if len(args) == 2 and type(args[1]) is str and args[1] in FRAME_ATTRIBUTES:
                note("read " + args[1], "read " + args[1] + " (frame or code introspection)", frame, "review")
        elif event == "object.__setattr__":
            if len(args) >= 2 and type(args[1]) is str and args[1] in ("__code__", "__defaults__", "__kwdefaults__"):
                target = args[0]
                code = target.__code__ if type(target) is FunctionType else None
                library = code is not None and not is_cell_file(code.co_filename)
                if library:
                    module = target.__globals__.get("__name__", "?") if type(target.__globals__) is dict else "?"
                    state["tampered_functions"].add(str(module) + "." + code.co_qualname)
                what = "rewrote " + args[1] + " of a function" + (" of the course or a library" if library else "")
                note("set " + args[1], what, frame, "compromise" if library else "review")
        elif event == "open":
            path = args[0] if args and type(args[0]) is str else ""
            if path.startswith("/proc/") and path.endswith("/mem"):
                note("open", "opened the process's memory (" + path + ")", frame, "compromise")
        elif event.startswith("ctypes."):
            note("ctypes", "used ctypes (" + event + "), which can rewrite any memory", frame, "compromise")
        elif event in COMPROMISING:
            note(event, COMPROMISING[event], frame, "compromise")
        elif event in REVIEWED:
            note(event, REVIEWED[event], frame, "review")

    def hook(event, args):
        if getattr(local, "inside", False):
            return
        if event == PASS_EVENT:
            local.inside = True
            try:
                on_test_passed(args)
            finally:
                local.inside = False
            return
        if not (event in FRAME_EVENTS or event in COMPROMISING or event in REVIEWED or event.startswith("ctypes.")
                or event in ("object.__getattr__", "object.__setattr__", "open")):
            return
        local.inside = True
        try:
            if event == "exec":
                on_exec(args)
            if cell_directory:
                frame = student_frame(sys._getframe(1))
                if frame is not None:
                    classify(event, args, frame)
        except Exception:  # the guard must never break the kernel it watches
            pass
        finally:
            local.inside = False

    sys.addaudithook(hook)

    # Start the kernel: the same steps as ipykernel_launcher, keeping the app to find its namespace.
    if sys.path and sys.path[0] in ("", os.getcwd()):
        del sys.path[0]
    from ipykernel import kernelapp

    app = kernelapp.IPKernelApp.instance()
    app.initialize(sys.argv[1:])
    cell_directory.append(os.path.basename(compiler.get_tmp_directory()))
    state["user_ns"] = app.shell.user_ns
    # The notebook's folder must not shadow installed modules (a fedcourse.py next to it).
    sys.path[:] = [p for p in sys.path if p not in ("", os.getcwd())]

    _preload(config, snapshots, class_snapshots)
    channel.send({"kind": "ready", "cells": cell_directory[0], "snapshots": len(snapshots)})
    return app


def _preload(config, snapshots, class_snapshots):
    """Import the modules the tests rely on and remember what they held, before any notebook code."""
    cache = config.get("matplotlib_cache")
    target = os.environ.get("MPLCONFIGDIR")
    if cache and target and os.path.isdir(cache):
        os.makedirs(target, exist_ok=True)
        for name in os.listdir(cache):
            if name.startswith("fontlist") and name.endswith(".json"):
                with open(os.path.join(cache, name), "rb") as src, open(os.path.join(target, name), "wb") as dst:
                    dst.write(src.read())
    import importlib

    modules = []
    for name in config.get("watch", ()):
        try:
            modules.append((name, importlib.import_module(name)))
        except Exception:
            continue
    if "torch" in sys.modules:
        # torch imports its compiler lazily (the first torch.optim step does), and that import
        # wraps torch.manual_seed: imported now, the wrapper is what the snapshots remember, and
        # an honest notebook that steps an optimizer changes nothing the tests rely on.
        try:
            importlib.import_module("torch._dynamo")
        except Exception:
            pass
    for name, module in modules:
        snapshots.append((name, module, dict(module.__dict__)))
    for qualified in config.get("watch_classes", ()):
        module_name, _, class_name = qualified.rpartition(".")
        module = sys.modules.get(module_name)
        cls = getattr(module, class_name, None) if module is not None else None
        if isinstance(cls, type):
            class_snapshots.append((qualified, cls, dict(type.__dict__["__dict__"].__get__(cls))))


if __name__ == "__main__":
    main()
