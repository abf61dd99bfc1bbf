"""Progress bars: drawn on a terminal, absent from pipes and CI logs, under --quiet and on other ranks."""

from __future__ import annotations

import fcntl
import io
import os
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

from nanochat import progress as P

REPO = Path(__file__).resolve().parents[1]
BAR = "%|"  # tqdm's percentage and the bar's left edge


def openpty() -> tuple[int, int]:
    """A pseudo-terminal of 24 x 100 (a fresh one is 0 x 0, and a bar fitted to 0 columns draws nothing)."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    return master, slave


@pytest.fixture
def tty():
    """A pseudo-terminal: (writable end as a text file, fd to read what was written)."""
    master, slave = openpty()
    stream = os.fdopen(slave, "w")
    yield stream, master
    stream.close()
    os.close(master)


def read_all(fd: int, until_closed: bool = True) -> str:
    """What was written to the terminal: until every writer closed it, or (False) what is there now."""
    os.set_blocking(fd, until_closed)
    out = b""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: every writer has closed the terminal; EAGAIN: nothing more for now
            break
        if not chunk:
            break
        out += chunk
    return out.decode("utf-8", "replace")


def test_enabled_only_where_someone_watches(tty, monkeypatch):
    stream, _ = tty
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    assert P.enabled(stream) and not P.enabled(io.StringIO())
    monkeypatch.setenv("CI", "true")
    assert not P.enabled(stream)
    monkeypatch.delenv("CI")
    monkeypatch.setenv("RANK", "1")  # torchrun: only rank 0 draws
    assert not P.enabled(stream)
    monkeypatch.setenv("RANK", "0")
    P.set_quiet(True)
    try:
        assert not P.enabled(stream)
    finally:
        P.set_quiet(False)
    assert P.enabled(stream)


def test_ingest_callback_draws_one_bar_per_ingest(tty, monkeypatch):
    stream, master = tty
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setattr(sys, "stderr", stream)
    update = P.ingest_callback("paste", delay=0)
    for done in (4096, 8192, 10000):  # MCSession.ingest's (done, total) after each chunk
        update(done, 10000)
    update(50, 100)  # the next ingest opens a new bar
    update(100, 100)
    stream.flush()
    text = read_all(master, until_closed=False)
    # two bars (updates faster than tqdm's 0.1 s redraw interval only show at the start)
    assert "paste:   0%" in text and "/10.0k [" in text and "/100 [" in text
    update = P.ingest_callback("short")  # the default: no bar for an ingest shorter than half a second
    update(10, 10)
    stream.flush()
    assert "short" not in read_all(master, until_closed=False)


def run(cmd: list[str], base: Path, terminal: bool, **env: str) -> tuple[int, str]:
    """Run a program with stdout and stderr on a pseudo-terminal or on pipes; (exit code, what it wrote)."""
    full_env = {k: v for k, v in os.environ.items() if k not in ("CI", "RANK")}
    full_env |= {"NANOCHAT_BASE_DIR": str(base), "OMP_NUM_THREADS": "1", "COLUMNS": "100", **env}
    if not terminal:
        out = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=120)
        return out.returncode, out.stdout + out.stderr
    master, slave = openpty()
    proc = subprocess.Popen(cmd, cwd=REPO, env=full_env, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave)
    os.close(slave)
    text = read_all(master)
    os.close(master)
    return proc.wait(timeout=120), text


def test_recipe_stages_draw_bars_on_a_terminal_only(tmp_path):
    """The first stages of runcpu.sh (offline corpus, tokenizer) in a terminal and in a CI log."""
    docs = tmp_path / "docs"
    docs.mkdir()
    words = "river stone cloud paper ember frost lumen quartz alpha beta gamma delta".split()
    for i in range(40):
        (docs / f"note{i:02d}.txt").write_text(" ".join(words[(i + j) % len(words)] for j in range(60)))
    corpus = [sys.executable, "-m", "nanochat.dataset", "--local", str(docs), "--shard-chars", "3000"]
    code, text = run(corpus, tmp_path, terminal=True)
    assert code == 0 and "writing shards" in text and BAR in text, text
    tok = [sys.executable, "-m", "scripts.tok_train", "--vocab-size", "300"]
    code, text = run(tok, tmp_path, terminal=True)
    assert code == 0 and "tokenizer: reading" in text and BAR in text, text
    # a CI log (pipes): the same lines, no bar and no carriage return ($CI and --quiet: the unit test above)
    code, log = run(tok, tmp_path, terminal=False)
    assert code == 0 and "trained on 32 documents" in log and "trained on 32 documents" in text
    assert BAR not in log and "tokenizer: reading" not in log and "\r" not in log
