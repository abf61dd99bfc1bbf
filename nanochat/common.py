"""Small shared helpers: device choice, distributed set-up, paths, logging, seeding, atomic writes.

Free functions rather than a framework, so every script reads top to bottom.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import random
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from nanochat.elastic import peer_failure_line, record_peers, restart_rendezvous

logger = logging.getLogger("nanochat")


class UserError(Exception):
    """A mistake in what the user asked for (bad flag, missing file); scripts print it as one line."""


def get_base_dir() -> Path:
    """Where every artifact lives: $NANOCHAT_BASE_DIR, else ~/.cache/nanochat."""
    base = os.environ.get("NANOCHAT_BASE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "nanochat")
    path = Path(base)
    path.mkdir(parents=True, exist_ok=True)
    return path


def autodetect_device_type() -> str:
    """cuda > mps > cpu."""
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def resolve_device_type(device_type: str | None) -> str:
    """Validate a `--device-type` value ('' or None means autodetect)."""
    if not device_type:
        return autodetect_device_type()
    if device_type not in ("cuda", "mps", "cpu"):
        raise UserError(f"--device-type must be cuda, mps or cpu, got {device_type!r}")
    if device_type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device-type cuda was asked for but no CUDA device is available")
    if device_type == "mps" and not (
        getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()
    ):
        raise UserError("--device-type mps was asked for but MPS is not available")
    return device_type


def is_ddp() -> bool:
    return int(os.environ.get("RANK", -1)) != -1


def get_dist_info() -> tuple[bool, int, int, int]:
    """(ddp, rank, local_rank, world_size) from the torchrun environment."""
    if is_ddp():
        return True, int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    return False, 0, 0, 1


M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's mallopt parameter numbers (malloc.h)


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed buffers for reuse, as a GPU's caching allocator does. By default a
    buffer over 32 MB is mmap'ed and handed back to the OS when freed, so every CPU training step page-faults
    its large activations in afresh: measured on the MC step's GPT pass (d4, 10k positions) 3.7 -> 2.8 s,
    the vanilla step's ~20 % (docs/log.md). False where the C library is not glibc (nothing changes)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def compute_init(device_type: str | None = None, seed: int = 42):
    """Pick the device, seed everything and join the process group when launched by torchrun.

    Returns (ddp, rank, local_rank, world_size, device). NCCL on CUDA, gloo elsewhere.
    """
    device_type = resolve_device_type(device_type)
    seed_everything(seed)
    if device_type == "cpu":
        keep_freed_memory()
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    ddp, rank, local_rank, world_size = get_dist_info()
    if ddp and not dist.is_initialized():
        if device_type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
            dist.init_process_group(backend="nccl", device_id=device, **restart_rendezvous())
        else:
            dist.init_process_group(backend="gloo", **restart_rendezvous())
        record_peers()  # so a rank that dies can be named by its peers (nanochat.elastic)
    if device_type == "cuda":
        device = torch.device("cuda", local_rank if ddp else 0)
    else:
        device = torch.device(device_type)
    return ddp, rank, local_rank, world_size, device


def compute_cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        # every rank reaches teardown before any destroys its group: a rank that tore gloo down while the
        # other still had it open aborted now and then ("terminate called without an active exception")
        dist.barrier()
        dist.destroy_process_group()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def print0(*args, **kwargs) -> None:
    """print() on rank 0 only."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)


def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temp file in the same directory, fsync, rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True))


def atomic_torch_save(obj, path: str | os.PathLike) -> None:
    """torch.save via temp + fsync + rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename durable (best effort: some filesystems refuse O_RDONLY on directories)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def run_main(main) -> None:
    """Run a script's main(); a UserError becomes one line on stderr and exit code 2, a collective that
    failed because another rank died one line naming it (nanochat.elastic) and exit code 1."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        sys.exit(130)
    except RuntimeError as e:
        line = peer_failure_line(e)
        if line is None:
            raise
        if line:
            print(f"error: {line}", file=sys.stderr, flush=True)
        sys.exit(1)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # A rank of torchrun whose work is done and saved (the process group destroyed) skips the interpreter's
        # teardown: torch's C++ statics now and then abort a finished gloo rank there ("terminate called without
        # an active exception", SIGABRT, about one run in ten on a loaded CPU), which torchrun reports as a
        # failed job and --max-restarts would answer with a restart.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
