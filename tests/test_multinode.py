"""Multi-node and failure handling under torchrun, on localhost with gloo.

Slow (several launches each):
* 2 "nodes" x 1 process (two torchrun agents meeting at a c10d rendezvous) train exactly as 1 process.
* A rank killed mid-run ends the job with one line naming it; the same command (--resume-from-step -2)
  continues from the last checkpoint.
* With --max-restarts, torchrun restarts the job by itself and it resumes from the last checkpoint.
Fast: nanochat.elastic's line for a dead peer, and the per-restart rendezvous prefix.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch.distributed as dist
from test_base_train import COMMON, REPO, make_corpus, read_log, run

from nanochat import elastic

LONG = [
    "--depth", "2", "--max-seq-len", "32", "--device-batch-size", "2", "--total-batch-size", "128",
    "--num-iterations", "60", "--eval-every", "-1", "--eval-tokens", "128", "--sample-every", "-1", "--save-every", "5",
    "--dtype", "float32", "--device-type", "cpu", "--resume-from-step", "-2",
]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(base: Path, launcher: list[str], args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", *launcher, "-m", "scripts.base_train", *args]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def losses_in_order(path: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, path.read_text().splitlines()) if "loss" in r]


def kill_rank(launcher_pid: int, rank: int, log: Path, after_step: int, timeout_s: float = 120) -> None:
    """SIGKILL the worker of `rank` (a child of the torchrun agent) once the log reaches `after_step`."""
    deadline = time.monotonic() + timeout_s
    while not (log.exists() and any(s >= after_step for s, _ in losses_in_order(log))):
        assert time.monotonic() < deadline, "training did not reach the step to kill at"
        time.sleep(0.05)
    for proc in Path("/proc").iterdir():
        try:
            status = (proc / "status").read_text()
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        ppid = int(re.search(r"^PPid:\s+(\d+)", status, re.M).group(1))
        if ppid == launcher_pid and f"RANK={rank}".encode() in environ:
            os.kill(int(proc.name), 9)
            return
    raise AssertionError(f"no worker of rank {rank} under torchrun pid {launcher_pid}")


def our_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


@pytest.mark.slow
def test_two_nodes_equal_one_process(tmp_path):
    make_corpus(tmp_path)
    run(tmp_path, [*COMMON, "--model-tag", "one", "--log-json", str(tmp_path / "one.jsonl")])
    rdzv = ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d"]
    rdzv += ["--rdzv-endpoint", f"localhost:{free_port()}", "--rdzv-id", "multinode-test"]
    args = [*COMMON, "--model-tag", "two", "--log-json", str(tmp_path / "two.jsonl")]
    nodes = [torchrun(tmp_path, rdzv, args) for _ in range(2)]
    outs = [node.communicate(timeout=300) for node in nodes]
    for node, (out, err) in zip(nodes, outs):
        assert node.returncode == 0, out + err
    assert any("grad accumulation: 1 micro-steps" in out for out, _ in outs)  # 2 ranks, 1 micro-step each
    one, one_bpb = read_log(tmp_path / "one.jsonl")
    two, two_bpb = read_log(tmp_path / "two.jsonl")
    assert sorted(two) == sorted(one) == list(range(6))
    for step in one:
        assert two[step] == pytest.approx(one[step], abs=1e-5)
    meta = json.loads((tmp_path / "base_checkpoints" / "two" / "meta_000006.json").read_text())
    assert meta["ranks"] == 2


@pytest.mark.slow
def test_killed_rank_is_one_line_and_the_same_command_resumes(tmp_path):
    make_corpus(tmp_path)
    log = tmp_path / "kill.jsonl"
    args = [*LONG, "--model-tag", "k", "--log-json", str(log)]
    job = torchrun(tmp_path, ["--standalone", "--nproc-per-node", "2"], args)
    kill_rank(job.pid, 1, log, after_step=12)
    out, err = job.communicate(timeout=120)
    assert job.returncode != 0
    (line,) = our_lines(err)
    assert re.fullmatch(
        r"error: rank 1 \(pid \d+ on \S+\) died; the job stops: run the same command with "
        r"--resume-from-step -2 to continue from the last checkpoint",
        line,
    ), line
    assert "scripts/base_train.py" not in err  # no worker traceback (torchrun's own summary stays)
    before = dict(losses_in_order(log))
    done = max(before)
    # the same command again: it picks up the newest checkpoint and finishes
    out = run(tmp_path, args, nproc=2).stdout
    resumed_at = int(re.search(r"resumed from \S+ step (\d+)", out).group(1))
    assert resumed_at % 5 == 0 and done - 5 < resumed_at <= done + 1
    history = losses_in_order(log)
    again = dict(history[len(before) :])
    assert sorted(again) == list(range(resumed_at, 60))
    for step in range(resumed_at, done + 1):  # steps trained twice give the same losses
        assert again[step] == pytest.approx(before[step], abs=1e-6)


@pytest.mark.slow
def test_max_restarts_resumes_from_the_last_checkpoint(tmp_path):
    make_corpus(tmp_path)
    log = tmp_path / "elastic.jsonl"
    args = [*LONG, "--model-tag", "e", "--log-json", str(log)]
    job = torchrun(tmp_path, ["--standalone", "--nproc-per-node", "2", "--max-restarts", "1"], args)
    kill_rank(job.pid, 1, log, after_step=12)
    out, err = job.communicate(timeout=300)
    assert job.returncode == 0, out + err
    (line,) = our_lines(err)
    assert re.fullmatch(
        r"error: rank 1 \(pid \d+ on \S+\) died; torchrun restarts the job \(1 restart left\).*", line
    )
    resumed_at = int(re.search(r"resumed from \S+ step (\d+)", out).group(1))
    history = losses_in_order(log)
    restart = next(
        i for i, (step, _) in enumerate(history) if i and step == resumed_at and step <= history[i - 1][0]
    )
    first, again = dict(history[:restart]), dict(history[restart:])
    assert sorted(again) == list(range(resumed_at, 60)) and resumed_at >= 10
    for step in set(first) & set(again):
        assert again[step] == pytest.approx(first[step], abs=1e-6)
    assert (tmp_path / "base_checkpoints" / "e" / "meta_000060.json").is_file()


@pytest.fixture
def peers(monkeypatch):
    """A dead pid (a finished child), this process, and torchrun's environment for a job of 3 ranks."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    host = socket.gethostname()
    monkeypatch.setattr(elastic, "DEAD_WAIT_S", 0.1)
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "0")
    handler = elastic.signal.getsignal(elastic.signal.SIGTERM)
    yield host, child.pid
    elastic.signal.signal(elastic.signal.SIGTERM, handler)  # peer_failure_line ignores SIGTERM


def test_dead_peer_is_named_by_the_lowest_survivor(peers, monkeypatch):
    host, dead = peers
    failure = dist.DistNetworkError("Connection reset by peer")
    monkeypatch.setattr(elastic, "_peers", [(host, os.getpid()), (host, dead), (host, os.getppid())])
    monkeypatch.setenv("RANK", "0")
    assert elastic.peer_failure_line(failure) == (
        f"rank 1 (pid {dead} on {host}) died; the job stops: run the same command with --resume-from-step -2 "
        "to continue from the last checkpoint"
    )
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "3")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert "died; torchrun restarts the job (2 restarts left)" in elastic.peer_failure_line(failure)
    # rank 0 died: rank 1 is the lowest survivor and speaks; rank 2 stays quiet
    monkeypatch.setattr(elastic, "_peers", [(host, dead), (host, os.getpid()), (host, os.getppid())])
    monkeypatch.setenv("RANK", "1")
    assert elastic.peer_failure_line(failure).startswith(f"rank 0 (pid {dead} on {host}) died")
    monkeypatch.setattr(elastic, "_peers", [(host, dead), (host, os.getppid()), (host, os.getpid())])
    monkeypatch.setenv("RANK", "2")
    assert elastic.peer_failure_line(failure) == ""
    # no peer died here: the peer was on another host
    monkeypatch.setattr(elastic, "_peers", [(host, os.getpid()), ("elsewhere", 1)])
    monkeypatch.setenv("RANK", "0")
    assert elastic.peer_failure_line(failure).startswith("rank 0 lost a peer rank on another host")


def test_other_errors_keep_their_traceback(peers, monkeypatch):
    host, dead = peers
    monkeypatch.setattr(elastic, "_peers", [(host, os.getpid()), (host, dead)])
    assert elastic.peer_failure_line(RuntimeError("a bug in our code")) is None  # not from torch.distributed
    assert elastic.peer_failure_line(ValueError("bad")) is None
    monkeypatch.setattr(elastic, "_peers", [])  # not under torchrun
    assert elastic.peer_failure_line(dist.DistNetworkError("reset")) is None


def test_a_restart_gets_its_own_rendezvous_keys(monkeypatch):
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)
    assert elastic.restart_rendezvous() == {}
    port = free_port()
    server = dist.TCPStore("127.0.0.1", port, 1, is_master=True)  # the agent's store
    env = {"TORCHELASTIC_RESTART_COUNT": "2", "TORCHELASTIC_USE_AGENT_STORE": "True", "RANK": "0"}
    env |= {"WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    kw = elastic.restart_rendezvous()
    assert (kw["rank"], kw["world_size"]) == (0, 1)
    kw["store"].set("rank_0", "addr")
    assert server.get("nanochat/restart2/rank_0") == b"addr" and not server.check(["rank_0"])
