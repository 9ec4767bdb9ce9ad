"""Where a student's kernel runs: a bubblewrap sandbox with resource limits.

The kernel (the only process that runs student code) is started by `GuardedKernelManager`
inside `bwrap` with:

- its own user, pid, network, IPC and UTS namespaces and no capabilities: no network at all
  (only its own loopback), no view of the grader's processes, and everything it starts dies
  with it (`--die-with-parent`; the pid namespace ends when the kernel does);
- a file system made of read-only pieces: the system's libraries, the Python installation and
  the kernel's environment, the course package `fedcourse` (not the repository: no
  `solutions/`, no hidden tests, no other student), plus size-limited in-memory scratch space
  for its working folder and /tmp. The grader's workspace and gradebook are not visible;
- rlimits (address space, file size, CPU time, open files) set with `prlimit`, and a watchdog
  in the grader that counts its processes and resident memory and stops it, with a sentence
  saying which limit was hit.

The kernel talks to the grader over Unix sockets (Jupyter's `ipc` transport) in a private
runtime folder, which is the only host folder it can write to.

Without bubblewrap (macOS, a machine without user namespaces) grading still works, with a
loud warning, unless `--require-sandbox` is given; the guard inside the kernel
(autograder/guard.py) runs either way.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from jupyter_client.manager import AsyncKernelManager
from jupyter_client.utils import run_sync
from traitlets import Dict as DictTrait
from traitlets import Unicode

GUARD_FILE = Path(__file__).with_name("guard.py")
INSTALL_HINT = ("install bubblewrap (Debian/Ubuntu: `apt-get install bubblewrap`; `make setup` does it when "
                "it runs as root)")


@dataclass(frozen=True)
class Limits:
    """What one student's kernel may use."""

    memory_mib: int = 4096  # resident memory of all its processes together
    processes: int = 256  # processes and threads
    file_mib: int = 256  # largest file it may write
    scratch_mib: int = 512  # its working folder and /tmp together (in memory)
    open_files: int = 1024
    cpu_seconds: int = 3600  # CPU time of the kernel process

    def to_json(self) -> dict:
        return asdict(self)


@functools.cache
def bwrap_path() -> str | None:
    return shutil.which("bwrap")


@functools.cache
def sandbox_problem() -> str | None:
    """Why kernels cannot be sandboxed here, or None when they can (checked once per process)."""
    if not sys.platform.startswith("linux"):
        return f"bubblewrap sandboxes need Linux; this is {sys.platform}"
    bwrap = bwrap_path()
    if bwrap is None:
        return "bubblewrap (bwrap) is not installed: " + INSTALL_HINT
    probe = [bwrap, "--unshare-all", "--unshare-user", "--uid", "65534", "--gid", "65534", "--cap-drop", "ALL",
             "--die-with-parent", "--ro-bind", "/", "/", "--proc", "/proc", "--dev", "/dev", "true"]
    try:
        result = subprocess.run(probe, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"bubblewrap does not run here: {exc}"
    if result.returncode != 0:
        reason = (result.stderr.strip().splitlines() or ["no message"])[-1]
        return f"bubblewrap cannot create a sandbox here (user namespaces disabled?): {reason}"
    return None


def _python_roots(python: str) -> list[Path]:
    """Folders a Python interpreter needs: its environment and the installation it was made from."""
    query = ("import sys, sysconfig, json; print(json.dumps([sys.prefix, sys.base_prefix, sys.exec_prefix, "
             "sys.base_exec_prefix] + sorted({p for p in sys.path if p})))")
    try:
        clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
        out = subprocess.run([python, "-c", query], capture_output=True, text=True, timeout=60, check=True,
                             env=clean).stdout
        import json

        paths = [Path(p) for p in json.loads(out)]
    except (OSError, subprocess.SubprocessError, ValueError):
        paths = [Path(sys.prefix), Path(sys.base_prefix)]
    roots: list[Path] = []
    for path in paths + [Path(python).resolve().parent.parent]:
        if path.exists() and not any(path == r or r in path.parents for r in roots):
            roots = [r for r in roots if path not in r.parents] + [path]
    return roots


@functools.cache
def python_roots(python: str) -> tuple[Path, ...]:
    return tuple(_python_roots(python))


SYSTEM_DIRS = ("/usr", "/lib", "/lib64", "/lib32", "/bin", "/sbin", "/opt/conda")
SYSTEM_ETC = ("ld.so.cache", "ld.so.conf", "ld.so.conf.d", "nsswitch.conf", "passwd", "group", "hosts",
              "localtime", "ssl", "ca-certificates", "fonts", "mime.types", "alternatives", "os-release",
              "matplotlibrc", "timezone")


def sandbox_command(kernel_argv: list[str], *, cwd: str, runtime_dir: str, course_package: Path,
                    matplotlib_cache: str | None, limits: Limits, env: dict[str, str]) -> list[str]:
    """The command that runs `kernel_argv` inside the sandbox (see the module docstring)."""
    bwrap = bwrap_path()
    assert bwrap is not None
    python = kernel_argv[0]
    args = [bwrap, "--unshare-all", "--unshare-user", "--uid", "65534", "--gid", "65534", "--cap-drop", "ALL",
            "--die-with-parent", "--new-session", "--hostname", "sandbox",
            "--proc", "/proc", "--dev", "/dev", "--size", str(limits.scratch_mib * 2**20), "--tmpfs", "/tmp"]
    for folder in SYSTEM_DIRS:
        if os.path.isdir(folder):
            args += ["--ro-bind", folder, folder]
    for name in SYSTEM_ETC:
        path = os.path.join("/etc", name)
        if os.path.exists(path):
            args += ["--ro-bind", path, path]
    bound = []
    for root in python_roots(python):
        if not any(str(root) == b or str(root).startswith(b + os.sep) for b in bound):
            args += ["--ro-bind", str(root), str(root)]
            bound.append(str(root))
    args += ["--ro-bind", str(course_package), str(course_package)]
    if matplotlib_cache and os.path.isdir(matplotlib_cache):
        args += ["--ro-bind", matplotlib_cache, "/var/cache/autograder-matplotlib"]
    # The working folder is empty scratch space at the path nbgrader asked for.
    args += ["--size", str(limits.scratch_mib * 2**20), "--tmpfs", cwd, "--chdir", cwd]
    args += ["--bind", runtime_dir, runtime_dir]
    args += ["--clearenv"]
    for key, value in sorted(env.items()):
        args += ["--setenv", key, value]
    rlimits = ["prlimit", f"--as={max(limits.memory_mib * 4, 16384) * 2**20}",
               f"--fsize={limits.file_mib * 2**20}", f"--cpu={limits.cpu_seconds}",
               f"--nofile={limits.open_files}", f"--core=0", "--"]
    return rlimits + args + ["--", *kernel_argv]


def kernel_environment(runtime_dir: str, home: str = "/tmp/home") -> dict[str, str]:
    """The whole environment a sandboxed kernel gets: nothing of the grader's."""
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": home,
        "TMPDIR": "/tmp",
        "LANG": "C.UTF-8",
        "MPLBACKEND": "module://matplotlib_inline.backend_inline",
        "MPLCONFIGDIR": "/tmp/home/.matplotlib",
        "XDG_CACHE_HOME": "/tmp/home/.cache",
        "JUPYTER_RUNTIME_DIR": runtime_dir,
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONHASHSEED": "0",
        "FEDCOURSE_DEVICE": "cpu",
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
        "MKL_NUM_THREADS": os.environ.get("MKL_NUM_THREADS", "1"),
        "TQDM_MININTERVAL": "5",
    }


class GuardedKernelManager(AsyncKernelManager):
    """Starts the kernel with the guard as its main program, inside the sandbox when enabled.

    Configured per grading job by autograder.execute (the traits below)."""

    guard_config = Unicode("", help="path of the guard's configuration file (read once, then deleted)").tag(config=True)
    sandbox = DictTrait({}, help="empty: no sandbox; else runtime_dir, course_package, matplotlib_cache, limits").tag(
        config=True)

    async def _async_pre_start_kernel(self, **kw):
        # The connection file and Unix sockets live in the private runtime folder, the one host
        # folder the sandbox shares: it has no network to reach TCP ports.
        runtime_dir = self.sandbox.get("runtime_dir") or os.environ.get("JUPYTER_RUNTIME_DIR") or tempfile.mkdtemp()
        self.transport = "ipc"
        self.connection_file = os.path.join(runtime_dir, "kernel.json")
        self.ip = os.path.join(runtime_dir, "kernel")
        return await super()._async_pre_start_kernel(**kw)

    def format_kernel_cmd(self, extra_arguments: list[str] | None = None) -> list[str]:
        cmd = super().format_kernel_cmd(extra_arguments)
        # `python -m ipykernel_launcher -f FILE` -> `python guard.py -f FILE`
        if "-m" in cmd and cmd[cmd.index("-m") + 1] in ("ipykernel_launcher", "ipykernel"):
            at = cmd.index("-m")
            cmd = cmd[:at] + [str(self._guard_path())] + cmd[at + 2:]
        else:
            raise RuntimeError(f"cannot guard a kernel started as {cmd!r}: expected `python -m ipykernel_launcher`")
        if not self.sandbox:
            return cmd
        runtime_dir = self.sandbox["runtime_dir"]
        env = kernel_environment(runtime_dir)
        env["AUTOGRADER_GUARD_CONFIG"] = self.guard_config
        # The course package the grader itself uses (a worktree's, say), ahead of any installed one;
        # only the package folder is visible there, not the rest of its repository.
        env["PYTHONPATH"] = str(Path(self.sandbox["course_package"]).parent)
        cwd = self._launch_args.get("cwd") or os.getcwd()
        return sandbox_command(cmd, cwd=str(cwd), runtime_dir=runtime_dir,
                               course_package=Path(self.sandbox["course_package"]),
                               matplotlib_cache=self.sandbox.get("matplotlib_cache"),
                               limits=Limits(**self.sandbox.get("limits", {})), env=env)

    async def _async_interrupt_kernel(self) -> None:
        # A signal from here cannot reach the kernel across the sandbox's own session and pid
        # namespace: ask the kernel, on its control channel, to interrupt itself.
        if not self.has_kernel:
            return await super()._async_interrupt_kernel()
        self._connect_control_socket()
        self.session.send(self._control_socket, self.session.msg("interrupt_request", content={}))

    interrupt_kernel = run_sync(_async_interrupt_kernel)

    def _guard_path(self) -> Path:
        if not self.sandbox:
            return GUARD_FILE
        # Inside the sandbox the course's autograder package is not visible: use a copy.
        copy = Path(self.sandbox["runtime_dir"]) / "guard.py"
        if not copy.exists():
            shutil.copyfile(GUARD_FILE, copy)
        return copy

    async def _async_launch_kernel(self, kernel_cmd: list[str], **kw) -> None:
        # What the kernel prints outside the notebook (its own log) is not the grader's to show.
        kw["stdout"] = kw["stderr"] = subprocess.DEVNULL
        if not self.sandbox:
            env = dict(kw.get("env") or os.environ)
            env["AUTOGRADER_GUARD_CONFIG"] = self.guard_config
            kw["env"] = env
        await super()._async_launch_kernel(kernel_cmd, **kw)


class Watchdog:
    """Counts a kernel's processes and memory from outside; stops it when a limit is passed.

    A thread looks every ``interval`` seconds while a cell runs; the grader also calls
    ``check()`` after every cell, so that what a cell left behind (say, hundreds of processes
    started in a fraction of a second) stops the kernel before the next cell runs, whatever the
    timing of the poll."""

    def __init__(self, pid: int, limits: Limits, runtime_dir: Path | None = None, interval: float = 0.25):
        self.pid, self.limits, self.interval = pid, limits, interval
        # The one host folder the kernel may write to (its sockets live there): watched for size.
        self.runtime_dir = Path(runtime_dir) if runtime_dir else None
        self.reason: str | None = None
        self.peak_mib = 0.0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> "Watchdog":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            if self.check() is not None:
                return

    def check(self) -> str | None:
        """Measure now; past a limit, kill the kernel's processes. Returns why it was stopped
        (now or earlier), or None."""
        import psutil

        with self._lock:
            if self.reason:
                return self.reason
            try:
                root = psutil.Process(self.pid)
                procs = [root] + root.children(recursive=True)
            except psutil.Error:
                return None
            rss = 0
            threads = 0
            for proc in procs:
                try:
                    rss += proc.memory_info().rss
                    threads += proc.num_threads()
                except psutil.Error:
                    continue
            mib = rss / 2**20
            self.peak_mib = max(self.peak_mib, mib)
            if mib > self.limits.memory_mib:
                self.reason = (f"the kernel used {mib:.0f} MiB of memory, more than the {self.limits.memory_mib} MiB "
                               "limit, and was stopped")
            elif threads > self.limits.processes:
                self.reason = (f"the kernel ran {threads} processes and threads, more than the "
                               f"{self.limits.processes} allowed, and was stopped")
            elif self.runtime_dir is not None and _folder_mib(self.runtime_dir) > RUNTIME_FOLDER_MIB:
                self.reason = (f"the kernel wrote more than {RUNTIME_FOLDER_MIB} MiB into the grader's runtime folder "
                               "and was stopped")
            if self.reason:
                for proc in reversed(procs):
                    try:
                        proc.kill()
                    except psutil.Error:
                        pass
            return self.reason


RUNTIME_FOLDER_MIB = 32


def _folder_mib(folder: Path) -> float:
    total = 0
    try:
        with os.scandir(folder) as entries:
            for entry in entries:
                try:
                    if entry.is_file(follow_symlinks=False):
                        total += entry.stat(follow_symlinks=False).st_size
                    elif entry.is_dir(follow_symlinks=False):
                        total += _folder_mib(Path(entry.path)) * 2**20
                except OSError:
                    continue
    except OSError:
        return 0.0
    return total / 2**20


def matplotlib_cache_dir() -> str | None:
    """The grader's matplotlib cache (its font list), so that kernels need not rebuild it."""
    try:
        import matplotlib

        return matplotlib.get_cachedir()
    except Exception:
        return None


def course_package_dir() -> Path:
    import fedcourse

    return Path(fedcourse.__file__).resolve().parent


__all__ = ["Limits", "GuardedKernelManager", "Watchdog", "sandbox_problem", "sandbox_command",
           "kernel_environment", "matplotlib_cache_dir", "course_package_dir", "sysconfig", "time"]
