"""Sandbox for the python tool: limits hold, guards refuse, and the parent process is unharmed."""

from __future__ import annotations

import os
import resource
import signal
import socket
import uuid
from pathlib import Path

import pytest

from nanochat.execution import ExecResult, python_tool, run_python


def test_arithmetic_prints_the_answer():
    r = run_python("x = 12 * 7\nprint(x)\nprint(sum(range(101)))")
    assert isinstance(r, ExecResult)
    assert r.ok and r.error is None and not r.timed_out and not r.memory_exceeded
    assert r.stdout.split() == ["84", "5050"]


def test_python_tool_output():
    assert python_tool("12*7") == "84"
    assert python_tool("84/7") == "12.0"
    assert python_tool("'strawberry'.count('r')  # a trailing comment") == "3"
    assert python_tool("x = 3\nprint(x * 2)") == "6"
    assert python_tool("1/0") == "Error: ZeroDivisionError: division by zero"


def test_exceptions_and_exits_are_reported():
    r = run_python("def f(:\n  pass")
    assert not r.ok and r.error.startswith("SyntaxError")
    r = run_python("raise ValueError('bad value')")
    assert not r.ok and r.error == "ValueError: bad value" and '<code>", line 1' in r.stderr
    assert run_python("import sys; print('x'); sys.exit(0)").ok
    assert run_python("import sys; sys.exit(3)").error == "SystemExit: 3"
    assert run_python("input()").error.startswith("EOFError")  # stdin is empty, never the parent's


def test_infinite_loop_times_out_and_the_process_is_gone():
    r = run_python("import os\nprint(os.getpid(), flush=True)\nwhile True:\n    pass", timeout_s=1.0)
    assert r.timed_out and not r.ok and "timed out" in r.error
    pid = int(r.stdout.split()[0])
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


@pytest.mark.parametrize(
    "code",
    ["x = bytearray(10**10)", "chunks = []\nwhile True:\n    chunks.append(bytearray(10**6))"],
    ids=["one-huge-allocation", "gradual-growth"],
)
def test_memory_bomb_is_stopped_with_a_clear_error(code):
    r = run_python(code, memory_mb=128)
    assert not r.ok and r.memory_exceeded and not r.timed_out
    assert r.error == "MemoryError: the code used more than 128 MB of memory"


def test_output_flood_is_capped():
    r = run_python("while True:\n    print('x' * 10000)", timeout_s=5.0, max_output_bytes=5000)
    assert not r.ok  # the file-size limit stops the writes
    assert r.stdout.endswith("[output truncated]") and len(r.stdout) < 5100


def test_network_is_refused():
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.3)
    port = server.getsockname()[1]
    try:
        for code in [
            f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)",
            f"import socket\ns = socket.socket()\ns.connect(('127.0.0.1', {port}))",
            f"import _socket\n_socket.socket().connect(('127.0.0.1', {port}))",
            "import socket\nsocket.getaddrinfo('example.com', 80)",
        ]:
            r = run_python(code)
            assert not r.ok and "network access" in r.error, (code, r.error)
        with pytest.raises(TimeoutError):
            server.accept()  # nothing ever connected
    finally:
        server.close()


def test_writes_outside_the_sandbox_are_refused():
    home = Path(os.path.expanduser("~"))  # the real home of the test process
    target = home / f"nanochat_sandbox_probe_{uuid.uuid4().hex}.txt"
    attempts = [
        f"open({str(target)!r}, 'w').write('x')",
        f"open({str(target)!r}, 'a').write('x')",
        f"import pathlib\npathlib.Path({str(target)!r}).write_text('x')",
        f"import os\nos.open({str(target)!r}, os.O_WRONLY | os.O_CREAT)",
        f"import os\nos.mkdir({str(target)!r})",
        f"import os\nos.symlink('/etc', {str(target)!r})",
        # a symlink inside the sandbox that points out of it does not help
        f"import os\nos.symlink({str(home)!r}, 'out')\nopen('out/{target.name}', 'w').write('x')",
        f"import os\nos.chdir({str(home)!r})\nopen({target.name!r}, 'w').write('x')",
    ]
    for code in attempts:
        r = run_python(code)
        assert not r.ok and r.error.startswith("PermissionError"), (code, r.error)
        assert not target.exists() and not target.is_symlink()
    # Inside the sandbox directory (the cwd, also $HOME and $TMPDIR there) writing is allowed.
    r = run_python(
        "import os, tempfile\nopen('a.txt', 'w').write('hi')\nos.rename('a.txt', 'b.txt')\n"
        "print(open('b.txt').read(), os.path.expanduser('~') == os.getcwd())\n"
        "with tempfile.NamedTemporaryFile() as f:\n    f.write(b'x')"
    )
    assert r.ok and r.stdout.split() == ["hi", "True"], r.stderr


def test_process_spawning_is_refused(tmp_path):
    marker = tmp_path / "spawned"
    attempts = [
        f"import os\nos.system('touch {marker}')",
        f"import os\nos.popen('touch {marker}')",
        f"import posix\nposix.system('touch {marker}')",
        "import os\nos.fork()",
        f"import os\nos.execv('/usr/bin/touch', ['touch', '{marker}'])",
        f"import os\nos.posix_spawn('/usr/bin/touch', ['touch', '{marker}'], {{}})",
        f"import os\nos.spawnl(os.P_WAIT, '/usr/bin/touch', 'touch', '{marker}')",
        f"import subprocess\nsubprocess.run(['touch', '{marker}'])",
        "import importlib\nimportlib.import_module('multiprocessing')",
        "import pty",
        "import ctypes",
        "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)",  # the parent must survive this
        "import os\nos.setsid()",
    ]
    for code in attempts:
        r = run_python(code)
        assert not r.ok and r.error.split(":")[0] in ("PermissionError", "ImportError"), (code, r.error)
    assert not marker.exists()


def test_the_parent_is_unharmed(tmp_path):
    cwd, env = os.getcwd(), dict(os.environ)
    limits = {
        k: resource.getrlimit(k) for k in (resource.RLIMIT_AS, resource.RLIMIT_CPU, resource.RLIMIT_NPROC)
    }
    handler = signal.getsignal(signal.SIGXFSZ)
    for code in [
        "import os\nos.chdir('/')",
        "import os\nos.environ['PATH'] = ''",
        "import resource\nresource.setrlimit(resource.RLIMIT_AS, (1, 1))",
        "x = bytearray(10**10)",
        "import os\nos._exit(7)",
    ]:
        run_python(code, timeout_s=2.0)
    assert os.getcwd() == cwd and dict(os.environ) == env
    assert {k: resource.getrlimit(k) for k in limits} == limits
    assert signal.getsignal(signal.SIGXFSZ) == handler
    big = bytearray(300 * 1024 * 1024)  # more than the child's limit: the parent's memory is not capped
    assert len(big) == 300 * 1024 * 1024
    del big
    assert run_python("print(6 * 7)").stdout.strip() == "42"


def test_without_waitid(monkeypatch):
    """macOS has no os.waitid: the plain wait-then-kill path must still time out and report."""
    monkeypatch.delattr(os, "waitid")
    assert run_python("print(1 + 1)").stdout.strip() == "2"
    r = run_python("import os\nprint(os.getpid(), flush=True)\nwhile True:\n    pass", timeout_s=0.5)
    assert r.timed_out
    with pytest.raises(ProcessLookupError):
        os.kill(int(r.stdout.split()[0]), 0)
