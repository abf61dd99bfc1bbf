"""When a rank of a torchrun job dies: one line that says which, and how the run continues.

A rank that is killed (the OOM killer, SIGKILL, a lost node) cannot speak for itself. Its peers notice:
a collective fails under them (gloo: "Connection reset by peer"), each prints a traceback, and torchrun
prints a long failure summary. compute_init records every rank's host and pid (one all_gather at
start-up); when a collective fails, run_main asks this module which peers are gone, and the lowest
surviving rank on each host prints one line: which rank died, and whether torchrun restarts the job
(--max-restarts; the command needs --resume-from-step -2 to continue from the last checkpoint) or it
stops (rerun it with --resume-from-step -2). The other survivors exit quietly.

Only failures that come out of torch.distributed are treated so; any other exception keeps its
traceback. A rank that hangs in a collective (NCCL) instead of failing is stopped by torchrun's SIGTERM
and prints nothing: torchrun's summary names the rank that failed first.

Restarts: torchrun (torch 2.13) hands a restarted round the same agent store as the first, whose keys
still hold the dead round's addresses, so the new process group connects to them and fails ("Gloo
connectFullMesh failed ... Connection refused"; NCCL likewise). restart_rendezvous() gives each restart
its own key prefix in that store.
"""

from __future__ import annotations

import datetime
import os
import signal
import socket
import time
from pathlib import Path

import torch.distributed as dist

_peers: list[tuple[str, int]] = []  # (host, pid) of every rank, by rank
DEAD_WAIT_S = 2.0  # a peer that crashed may still be printing its traceback when our collective fails


def restart_rendezvous() -> dict:
    """init_process_group's store/rank/world_size on a torchrun restart (TORCHELASTIC_RESTART_COUNT > 0):
    the run's store under a prefix of its own; {} otherwise (the env:// default)."""
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))
    if attempt == 0:
        return {}
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    agent_hosts = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"  # else rank 0 hosts it
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world_size,
        is_master=not agent_hosts and rank == 0,
        timeout=datetime.timedelta(minutes=10),
    )
    return {
        "store": dist.PrefixStore(f"nanochat/restart{attempt}", store),
        "rank": rank,
        "world_size": world_size,
    }


def record_peers() -> None:
    """Every rank's (host, pid); call once after init_process_group (a collective)."""
    global _peers
    peers: list = [None] * dist.get_world_size()
    dist.all_gather_object(peers, (socket.gethostname(), os.getpid()))
    _peers = [tuple(p) for p in peers]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")  # a zombie has exited; its parent just has not reaped it yet
    except FileNotFoundError:
        return False
    except OSError:  # no /proc (not Linux): ask the kernel whether the pid exists
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


def dead_peers() -> list[int]:
    """Ranks on this host whose process has exited (ranks elsewhere cannot be checked from here)."""
    host = socket.gethostname()
    return [r for r, (h, pid) in enumerate(_peers) if h == host and pid != os.getpid() and not _alive(pid)]


def _from_torch_distributed(e: BaseException) -> bool:
    if isinstance(e, getattr(dist, "DistError", ())):
        return True
    tb = e.__traceback__
    while tb is not None:
        if f"torch{os.sep}distributed{os.sep}" in tb.tb_frame.f_code.co_filename:
            return True
        tb = tb.tb_next
    return False


def peer_failure_line(e: BaseException) -> str | None:
    """The one line for a collective that failed because a peer rank died: None when `e` is not that
    (the caller re-raises it), "" when another surviving rank prints the line."""
    if not _peers or not isinstance(e, RuntimeError) or not _from_torch_distributed(e):
        return None
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # torchrun is stopping us too: say it first
    rank = int(os.environ.get("RANK", 0))
    deadline = time.monotonic() + DEAD_WAIT_S
    dead = dead_peers()
    while not dead and time.monotonic() < deadline:
        time.sleep(0.05)
        dead = dead_peers()
    host = socket.gethostname()
    here = [r for r, (h, _) in enumerate(_peers) if h == host and r not in dead]
    if rank != min(here):
        return ""  # the lowest surviving rank of this host speaks for it
    left = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", 0)) - int(
        os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)
    )
    if left > 0:
        then = (
            f"torchrun restarts the job ({left} restart{'s' if left > 1 else ''} left), which continues from "
            "the last checkpoint if its command has --resume-from-step -2"
        )
    else:
        then = "the job stops: run the same command with --resume-from-step -2 to continue from the last checkpoint"
    if dead:
        who = ", ".join(f"rank {r} (pid {_peers[r][1]} on {_peers[r][0]})" for r in dead)
        return f"{who} died; {then}"
    detail = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
    return f"rank {rank} lost a peer rank on another host ({detail}); {then}"
