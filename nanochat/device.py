"""Device helpers every training and evaluation script shares: the compute dtype (bf16 on CUDA, on CPU only
where it is measurably faster), autocast, a device sync for honest timings, and the peak FLOP/s that MFU is
measured against (a datasheet figure for known GPUs, else a large matmul measured here in the same dtype)."""

from __future__ import annotations

import contextlib
import time

import torch

from nanochat.common import UserError, print0

# Dense bf16 tensor-core peaks from the vendor datasheets (no sparsity).
GPU_PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def measure_matmul_flops(
    device: torch.device, dtype: torch.dtype, n: int = 1024, seconds: float = 0.3
) -> float:
    """FLOP/s of an n×n @ n×n matmul in `dtype`, the best rate a dense model could hope for here."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):  # warm-up: first calls pick kernels and allocate
        a @ b
    sync(device)
    reps, t0 = 0, time.perf_counter()
    while True:
        a @ b
        reps += 1
        sync(device)
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds:
            return 2 * n**3 * reps / elapsed


def peak_flops(device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    """(peak FLOP/s, where it came from): the datasheet bf16 peak of a known GPU, else measured."""
    if device.type == "cuda" and dtype == torch.bfloat16:
        name = torch.cuda.get_device_name(device)
        for key, flops in GPU_PEAK_BF16.items():
            if key in name:
                return flops, f"{name} datasheet"
    n = 4096 if device.type == "cuda" else 1024
    return measure_matmul_flops(
        device, dtype, n=n
    ), f"measured {n}x{n} {str(dtype).removeprefix('torch.')} matmul"


def pick_dtype(device: torch.device, requested: str) -> torch.dtype:
    """Compute dtype: bf16 autocast on CUDA; on CPU `auto` uses bf16 only if it is measurably faster."""
    if requested == "float32":
        return torch.float32
    if requested == "bfloat16":
        return torch.bfloat16
    if requested != "auto":
        raise UserError(f"--dtype must be auto, float32 or bfloat16, got {requested!r}")
    if device.type == "cuda":
        return torch.bfloat16
    if device.type != "cpu":
        return torch.float32
    # Without AMX/AVX512-BF16 a CPU emulates bf16 matmuls and is slower than fp32; with them it is faster.
    fp32 = measure_matmul_flops(device, torch.float32, n=512, seconds=0.2)
    bf16 = measure_matmul_flops(device, torch.bfloat16, n=512, seconds=0.2)
    choice = torch.bfloat16 if bf16 > fp32 else torch.float32
    print0(
        f"cpu dtype probe: fp32 {fp32 / 1e9:.1f} GFLOP/s, bf16 {bf16 / 1e9:.1f} GFLOP/s "
        f"-> {str(choice).removeprefix('torch.')}"
    )
    return choice


def autocast_ctx(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.amp.autocast(device_type=device.type, dtype=dtype)
