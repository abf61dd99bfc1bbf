"""Run model-written Python: the chat model's calculator tool and HumanEval's unit tests.

Each call runs the code in a fresh `python -I -S` subprocess (isolated: no user site, no PYTHON* env,
no site-packages) in its own session, with a temp directory as cwd, HOME and TMPDIR and a minimal
environment. Before the code runs, a guard prelude in the child
  * sets resource limits: address space / data (memory_mb), CPU seconds, file size, no new processes
    (RLIMIT_NPROC, ignored for root), no core dumps, few open files;
  * replaces process spawning (os.system, fork, exec*, spawn*, posix_spawn, popen, kill, setsid), socket
    creation and name lookup with functions that raise PermissionError;
  * refuses writes outside the temp directory (open/io.open in a writing mode, os.open with write flags,
    remove/rename/mkdir/chmod/... on paths that resolve outside it);
  * refuses to import modules that spawn processes or reach raw memory (subprocess, multiprocessing, pty,
    ctypes, ...).
The parent waits with a wall-clock timeout and then kills the child's whole process group; stdout and
stderr go to files (capped by RLIMIT_FSIZE) so a flood of output cannot grow the parent's memory.

Honest scope: this keeps a small model's *mistakes* (an infinite loop, a huge list, a stray
`os.remove`) from hurting the host, which is what a calculator tool and a HumanEval run need. It is NOT
a security boundary against a determined attacker: the originals stay reachable from Python (closures,
gc, `_io.FileIO`), reads are not restricted, and the process runs as the caller's user. On macOS the
kernel ignores the address-space limit, so the memory cap is best effort there. Run genuinely hostile
code in a container or VM.
"""

from __future__ import annotations

import ast
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

EXIT_ERROR = 1  # the code raised
EXIT_MEMORY = 86  # the code raised MemoryError (the address-space limit was hit)
FILE_SIZE_LIMIT = 16 * 1024 * 1024  # any file the child writes, stdout/stderr included

# The child's runner. It reads the code first, then locks itself down, then runs the code.
# Written to a file verbatim, after the two EXIT_* constants.
RUNNER = r'''
import builtins, io, _io, os, posix, resource, signal, sys, traceback, linecache, socket, _socket

code_path, work, memory_mb, cpu_s, fsize = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
with open(code_path, encoding="utf-8") as f:
    source = f.read()
work = os.path.realpath(work)
_exit = os._exit

def _limit(kind, value):
    soft, hard = resource.getrlimit(kind)
    if hard != resource.RLIM_INFINITY:
        value = min(value, hard)
    try:
        resource.setrlimit(kind, (value, value))  # soft == hard: the code cannot raise them again
    except (ValueError, OSError):
        if sys.platform.startswith("linux"):
            raise
        # macOS refuses some limits (RLIMIT_AS notably): there the memory cap is best effort.

mem = memory_mb * 1024 * 1024
_limit(resource.RLIMIT_AS, mem)
_limit(resource.RLIMIT_DATA, mem)
_limit(resource.RLIMIT_CPU, cpu_s)
_limit(resource.RLIMIT_FSIZE, fsize)
_limit(resource.RLIMIT_CORE, 0)
_limit(resource.RLIMIT_NOFILE, 64)
_limit(resource.RLIMIT_NPROC, 0)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an oversized write raises OSError instead of killing

def _refuse(what):
    def refused(*args, **kwargs):
        raise PermissionError(what + " is disabled in the sandbox")
    return refused

def _patch(modules, names, make):
    for name in names:
        for mod in modules:
            if hasattr(mod, name):
                setattr(mod, name, make(name, getattr(mod, name)))

# Processes: no spawning, no signalling other processes, no leaving the process group we kill.
SPAWN = """system popen fork forkpty execv execve execl execle execlp execlpe execvp execvpe spawnv spawnve
spawnvp spawnvpe spawnl spawnle spawnlp spawnlpe posix_spawn posix_spawnp kill killpg pidfd_open setsid
setpgid setpgrp""".split()
_patch((os, posix), SPAWN, lambda name, f: _refuse("os." + name))

# Network: sockets and name lookups raise.
NET = """socket SocketType socketpair fromfd create_connection create_server getaddrinfo gethostbyname
gethostbyname_ex gethostbyaddr getnameinfo""".split()
_patch((socket, _socket), NET, lambda name, f: _refuse("network access (socket." + name + ")"))

# Files: writes only inside the work directory.
def _inside(path):
    if isinstance(path, int):
        return True  # a descriptor, opened through the guards
    path = os.path.realpath(os.fsdecode(os.fspath(path)))
    return path == work or path.startswith(work + os.sep)

def _check(path):
    if not _inside(path):
        raise PermissionError("writing outside the sandbox directory is disabled: " + repr(path))

_real_open = builtins.open
def _open(file, mode="r", *args, **kwargs):
    if isinstance(mode, str) and any(c in mode for c in "wax+"):
        _check(file)
    return _real_open(file, mode, *args, **kwargs)
builtins.open = io.open = _io.open = _open

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
def _guard_os_open(name, real):
    def guarded(path, flags, *args, **kwargs):
        if flags & WRITE_FLAGS:
            if kwargs.get("dir_fd") is not None:
                raise PermissionError("os.open with dir_fd for writing is disabled in the sandbox")
            _check(path)
        return real(path, flags, *args, **kwargs)
    return guarded
_patch((os, posix), ["open"], _guard_os_open)

def _guard_paths(n_paths):
    def make(name, real):
        def guarded(*args, **kwargs):
            if kwargs.get("dir_fd") is not None or kwargs.get("src_dir_fd") is not None:
                raise PermissionError("os." + name + " with dir_fd is disabled in the sandbox")
            for path in args[:n_paths]:
                _check(path)
            return real(*args, **kwargs)
        return guarded
    return make
ONE_PATH = """remove unlink rmdir mkdir chmod lchmod chown lchown truncate utime mkfifo mknod chroot chflags
lchflags setxattr removexattr""".split()
_patch((os, posix), ONE_PATH, _guard_paths(1))
_patch((os, posix), ["rename", "replace", "link"], _guard_paths(2))
def _guard_symlink(name, real):
    def guarded(src, dst, *args, **kwargs):
        if kwargs.get("dir_fd") is not None:
            raise PermissionError("os.symlink with dir_fd is disabled in the sandbox")
        _check(dst)  # only the new link is written; writes through it are checked where they land
        return real(src, dst, *args, **kwargs)
    return guarded
_patch((os, posix), ["symlink"], _guard_symlink)

# Modules that spawn processes or reach raw memory cannot be imported at all.
BLOCKED = {"subprocess", "_posixsubprocess", "multiprocessing", "_multiprocessing", "pty", "ctypes",
           "_ctypes", "cffi", "_xxsubinterpreters", "_ssl", "ssl"}
class _ImportBlocker:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ImportError("import of " + repr(name) + " is disabled in the sandbox")
        return None
for name in list(sys.modules):
    if name.partition(".")[0] in BLOCKED:
        del sys.modules[name]
sys.meta_path.insert(0, _ImportBlocker)

os.chdir(work)
linecache.cache["<code>"] = (len(source), None, source.splitlines(True), "<code>")  # source in tracebacks
namespace = {"__name__": "__main__", "__builtins__": builtins}
reserve = bytearray(1 << 20)  # freed on MemoryError so the report itself has room
try:
    exec(compile(source, "<code>", "exec"), namespace)
except MemoryError:
    namespace.clear()
    del reserve
    sys.stderr.write("MemoryError: the code used more than " + str(memory_mb) + " MB of memory\n")
    sys.stderr.flush()
    _exit(EXIT_MEMORY)
except SystemExit as e:
    if e.code not in (None, 0):
        sys.stderr.write("SystemExit: " + str(e.code) + "\n")
        sys.stderr.flush()
        _exit(EXIT_ERROR)
except BaseException as e:
    tb = e.__traceback__.tb_next if e.__traceback__ is not None else None  # hide the runner's frame
    traceback.print_exception(type(e), e, tb)
    sys.stderr.flush()
    _exit(EXIT_ERROR)
sys.stdout.flush()
sys.stderr.flush()
_exit(0)
'''


def _runner_source() -> str:
    return f"EXIT_ERROR = {EXIT_ERROR}\nEXIT_MEMORY = {EXIT_MEMORY}\n" + RUNNER


@dataclass
class ExecResult:
    """What a run did. ok: the code finished without raising. error: one line saying what went wrong."""

    ok: bool
    stdout: str
    stderr: str
    error: str | None = None
    timed_out: bool = False
    memory_exceeded: bool = False


def _read_head(path: str, limit: int) -> str:
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    text = data[:limit].decode("utf-8", errors="replace")
    return text + "\n[output truncated]" if len(data) > limit else text


def _wait_unreaped(pid: int, deadline: float) -> bool:
    """Wait until the child exits or the deadline passes, WITHOUT reaping it (WNOWAIT): while it is an
    unreaped zombie its pid, and so its process-group id, cannot be reused, so killpg stays safe."""
    pause = 0.001
    while True:
        if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(min(pause, max(0.0, deadline - time.monotonic())))
        pause = min(pause * 2, 0.02)


def run_python(
    code: str, timeout_s: float = 5.0, memory_mb: int = 256, max_output_bytes: int = 1 << 20
) -> ExecResult:
    """Run `code` in a guarded subprocess; never raises for anything the code does."""
    if not timeout_s > 0 or memory_mb <= 0 or max_output_bytes <= 0:
        raise ValueError("timeout_s, memory_mb and max_output_bytes must be positive")
    with tempfile.TemporaryDirectory(prefix="nanochat-exec-") as outer:
        work = os.path.join(outer, "work")
        os.mkdir(work)
        paths = {name: os.path.join(outer, name) for name in ("runner.py", "code.py", "stdout", "stderr")}
        with open(paths["runner.py"], "w", encoding="utf-8") as f:
            f.write(_runner_source())
        with open(paths["code.py"], "w", encoding="utf-8") as f:
            f.write(code)
        cpu_s = math.ceil(timeout_s) + 1  # a backstop: the wall-clock kill below normally comes first
        argv = [sys.executable, "-I", "-S", "-B", "-u", paths["runner.py"], paths["code.py"], work]
        argv += [str(memory_mb), str(cpu_s), str(FILE_SIZE_LIMIT)]
        env = {"PATH": os.defpath, "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
        with open(paths["stdout"], "wb") as out, open(paths["stderr"], "wb") as err:
            proc = subprocess.Popen(
                argv,
                cwd=work,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,  # its own process group, so one killpg ends everything it made
                close_fds=True,
            )
            if hasattr(os, "waitid"):
                finished = _wait_unreaped(proc.pid, time.monotonic() + timeout_s)
                kill = True  # also any stragglers of a finished run: the group id is still ours
            else:  # macOS has no waitid: wait reaps, so only kill a group whose leader still runs
                try:
                    proc.wait(timeout=timeout_s)
                    finished = True
                except subprocess.TimeoutExpired:
                    finished = False
                kill = not finished
            if kill:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)  # the code, and anything it managed to start
                except (ProcessLookupError, PermissionError):
                    pass
            rc = proc.wait()
        stdout = _read_head(paths["stdout"], max_output_bytes)
        stderr = _read_head(paths["stderr"], max_output_bytes)
    if not finished:
        return ExecResult(False, stdout, stderr, f"timed out after {timeout_s:g} s", timed_out=True)
    if rc == 0:
        return ExecResult(True, stdout, stderr)
    last_line = next((line for line in reversed(stderr.splitlines()) if line.strip()), "")
    if rc == EXIT_MEMORY and last_line.startswith("MemoryError"):
        return ExecResult(False, stdout, stderr, last_line, memory_exceeded=True)
    if rc < 0:
        sig = signal.Signals(-rc)
        if sig in (signal.SIGXCPU, signal.SIGKILL):
            return ExecResult(False, stdout, stderr, f"CPU time limit ({cpu_s} s) exceeded", timed_out=True)
        memory = "MemoryError" in stderr or sig in (signal.SIGSEGV, signal.SIGBUS, signal.SIGABRT)
        return ExecResult(False, stdout, stderr, f"killed by {sig.name}", memory_exceeded=memory)
    return ExecResult(False, stdout, stderr, last_line or f"exit status {rc}")


def python_tool(code: str, timeout_s: float = 3.0, memory_mb: int = 256, max_chars: int = 2000) -> str:
    """The calculator tool: what goes between <|output_start|> and <|output_end|> for a python call.

    A single expression is printed (`12*7` -> `84`, like a REPL but with str()); a program yields its
    stdout. A failure yields `Error: <one line>`. Output is capped at max_chars (it is fed back as context).
    """
    try:
        ast.parse(code, mode="eval")
        program = f"print((\n{code}\n))"  # newlines: a trailing comment in `code` cannot eat the ")"
    except SyntaxError:
        program = code
    result = run_python(program, timeout_s=timeout_s, memory_mb=memory_mb, max_output_bytes=max_chars)
    text = result.stdout.strip() if result.ok else f"Error: {result.error}"
    return text[:max_chars]
