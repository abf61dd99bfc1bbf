"""Optimizers: Muon for the transformer's matrices, AdamW for embeddings, head and the rest.

Muon (Keller Jordan, 2024) is SGD with Nesterov momentum whose update is replaced by the nearest
semi-orthogonal matrix (computed by a quintic Newton–Schulz iteration), so every direction of a weight
matrix moves at the same rate. It is for hidden 2-D matrices only; the token embedding and the LM head
(lookup tables and a classifier, not linear maps between hidden spaces) use AdamW, as in nanochat.

Distributed training (the design): nothing is wrapped in torch DDP. The training script calls
`sync_gradients(params, world_size)` once per optimizer step, after the last micro-batch's backward and
before `opt.step()`. It averages every gradient over ranks exactly once (flattened buckets, one
all-reduce each), so every rank then runs the same deterministic optimizer step on the same gradients
and optimizer states stay identical across ranks without ever being communicated. The price is that
each rank repeats the Newton–Schulz work (nanochat's DistMuon shards it); at our model sizes that is
small next to forward/backward. Works with NCCL and with gloo on CPU.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

# Quintic Newton–Schulz coefficients from the Muon paper/blog: they maximise the slope at zero so that
# small singular values grow fast; singular values end up in roughly [0.7, 1.2], not exactly 1 — a
# deliberate trade (5 cheap steps) that training does not mind.
NS_COEFFS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5
ADAMW_BETAS = (0.8, 0.95)
ADAMW_EPS = 1e-10


def zeropower_via_newtonschulz5(G: torch.Tensor, steps: int = NS_STEPS) -> torch.Tensor:
    """Approximately U·Vᵀ for G = U·S·Vᵀ (G: 2-D). bf16 on CUDA (fast, stable enough), fp32 elsewhere."""
    assert G.ndim == 2, "Newton–Schulz orthogonalisation takes a matrix"
    a, b, c = NS_COEFFS
    X = G.bfloat16() if G.is_cuda else G.float()
    transposed = X.size(0) > X.size(1)
    if transposed:  # iterate on the short side: X·Xᵀ is then the smaller Gram matrix
        X = X.T
    X = X / (X.norm() + 1e-7)  # spectral norm ≤ Frobenius norm ≤ 1: inside the iteration's basin
    for _ in range(steps):
        A = X @ X.T
        B = b * A + c * A @ A
        X = a * X + B @ X
    if transposed:
        X = X.T
    return X


class Muon(torch.optim.Optimizer):
    """Momentum SGD with an orthogonalised update, for 2-D parameters only.

    update = NS5(nesterov(momentum buffer)) · max(1, rows/cols)^0.5 — the scale keeps the per-element
    update size comparable between wide and tall matrices (e.g. the MLP's 4d×d input projection).
    """

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True):
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov))
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"Muon takes 2-D parameters only, got shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None):
        assert closure is None, "Muon does not support closures"
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(g)
                buf = state["momentum_buffer"]
                buf.lerp_(g, 1 - momentum)  # EMA of gradients
                g = g.lerp(buf, momentum) if group["nesterov"] else buf  # Nesterov look-ahead
                update = zeropower_via_newtonschulz5(g)
                scale = max(1.0, p.size(0) / p.size(1)) ** 0.5
                p.add_(update.to(p.dtype), alpha=-lr * scale)


def _is_matrix(p: torch.Tensor) -> bool:
    # A [1, d] "matrix" is really a vector (e.g. a learned query): its orthogonalisation would just
    # normalise it, so only true matrices go to Muon.
    return p.ndim == 2 and min(p.shape) > 1


def setup_optimizers(
    model: nn.Module,
    unembedding_lr: float = 0.004,
    embedding_lr: float = 0.2,
    matrix_lr: float = 0.02,
    weight_decay: float = 0.0,
    extra_modules: Sequence[nn.Module] = (),
    extra_lr: float = 0.004,
    smear_lr: float = 0.02,
) -> list[torch.optim.Optimizer]:
    """[AdamW, Muon] for a GPT plus optional extra modules (MegaContext's GistNet, LensNet).

    GPT: lm_head (unembedding_lr), wte (embedding_lr) and the token-shift vector of GPTConfig.smear
    (smear_lr, unscaled) -> AdamW; every 2-D matrix in the blocks -> Muon (matrix_lr). The lm_head and
    wte lrs are scaled by (n_embd/768)^-0.5: they were tuned at width 768 and a wider model needs smaller
    steps. Extra modules: their true matrices, except embedding tables,
    -> Muon at matrix_lr (Muon's update size is width-free); everything else (vectors, embedding tables)
    -> AdamW at extra_lr (scaled like the other AdamW lrs). Parameters an extra module shares with the
    model (e.g. a reference to wte) are optimised once, in the model's group. weight_decay applies to
    AdamW only, as in nanochat. Each group keeps `initial_lr` for schedules.
    """
    dmodel_lr_scale = (model.config.n_embd / 768) ** -0.5
    block_params = list(model.blocks.parameters())
    for p in block_params:
        if p.ndim != 2:
            raise ValueError(f"a transformer block has a non-matrix parameter of shape {tuple(p.shape)}")
    adam_groups = [
        dict(name="lm_head", params=list(model.lm_head.parameters()), lr=unembedding_lr * dmodel_lr_scale),
        dict(name="wte", params=list(model.wte.parameters()), lr=embedding_lr * dmodel_lr_scale),
    ]
    if getattr(model, "smear", None) is not None:  # the token-shift vector (GPTConfig.smear)
        back = [model.smear_back] if getattr(model, "smear_back", None) is not None else []
        adam_groups.append(dict(name="smear", params=[model.smear, *back], lr=smear_lr))
    muon_groups = [dict(name="blocks", params=block_params, lr=matrix_lr)]

    model_ids = {id(p) for p in model.parameters()}
    extra_matrix, extra_other, seen = [], [], set(model_ids)
    for module in extra_modules:
        embedding_ids = {id(m.weight) for m in module.modules() if isinstance(m, nn.Embedding)}
        for p in module.parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            (extra_matrix if _is_matrix(p) and id(p) not in embedding_ids else extra_other).append(p)
    if extra_other:
        adam_groups.append(dict(name="extra", params=extra_other, lr=extra_lr * dmodel_lr_scale))
    if extra_matrix:
        muon_groups.append(dict(name="extra_matrices", params=extra_matrix, lr=matrix_lr))

    # Every trainable parameter in exactly one group: the seed implementation left its auxiliary nets
    # out of every optimizer, and nothing noticed.
    grouped = [id(p) for g in adam_groups + muon_groups for p in g["params"]]
    assert len(grouped) == len(set(grouped)), "a parameter is in two optimizer groups"
    assert set(grouped) == seen, "a parameter is in no optimizer group"

    device = next(model.parameters()).device
    adamw = torch.optim.AdamW(
        adam_groups,
        betas=ADAMW_BETAS,
        eps=ADAMW_EPS,
        weight_decay=weight_decay,
        fused=device.type == "cuda",
    )
    muon = Muon(muon_groups, lr=matrix_lr, momentum=0.95)
    optimizers = [adamw, muon]
    for opt in optimizers:
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]
    return optimizers


def optimizer_params(optimizers: Iterable[torch.optim.Optimizer]) -> list[torch.Tensor]:
    """All parameters of the optimizers, in a fixed order (the same on every rank)."""
    return [p for opt in optimizers for g in opt.param_groups for p in g["params"]]


@torch.no_grad()
def sync_gradients(params: Sequence[torch.Tensor], world_size: int, bucket_numel: int = 2**24) -> None:
    """Average gradients over all ranks, once: call after the last backward, before opt.step().

    `params` must be the same list, in the same order, on every rank (use `optimizer_params`). A
    parameter that got no gradient on some rank counts as a zero gradient there; one that got none on
    any rank keeps grad None everywhere, so every rank's optimizer skips or steps it alike.
    """
    if world_size <= 1:
        return
    params = list(params)
    device = params[0].device
    has_grad = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=device)
    dist.all_reduce(has_grad, op=dist.ReduceOp.MAX)
    active = [p for p, h in zip(params, has_grad.tolist()) if h]
    for p in active:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    # Bucket by dtype so each flat buffer has one dtype; cap bucket size to bound the extra memory.
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for p in active:
        by_dtype.setdefault(p.grad.dtype, []).append(p)
    for group in by_dtype.values():
        buckets, current, numel = [], [], 0
        for p in group:
            if current and numel + p.numel() > bucket_numel:
                buckets.append(current)
                current, numel = [], 0
            current.append(p)
            numel += p.numel()
        buckets.append(current)
        for bucket in buckets:
            flat = torch.cat([p.grad.reshape(-1) for p in bucket])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)  # gloo has no AVG
            flat /= world_size
            offset = 0
            for p in bucket:
                p.grad.copy_(flat[offset : offset + p.numel()].view_as(p.grad))
                offset += p.numel()
