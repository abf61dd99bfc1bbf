"""What one base-training micro-step runs, for the objective `scripts/base_train.py` chooses once: the plain
GPT (dense), an attention mode (window / mega: megacontext.attention_modes) or MegaContext
(megacontext.training). The script keeps the loop; the branches between objectives live here, so the loop
reads the same whichever trains: host batches in, (loss, auxiliary loss, metrics) out, one log line.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch

from megacontext.attention_modes import AttentionModel
from megacontext.batch_plan import BatchPlan
from megacontext.config import MCConfig
from megacontext.training import mc_train_step, plan_batch

MC_LOG_KEYS = ("mc/token_loss", "mc/baseline_loss", "mc/adv_delta_mean", "mc/lens_loss", "mc/lens_rank_agreement",
               "mc/lens_top1", "mc/residency", "mc/time_controller_ms")  # fmt: skip

# (kind, x, y, step, plan) -> (loss, auxiliary loss or None, metrics) of one micro-batch
Objective = Callable[
    [str, torch.Tensor, torch.Tensor, int, BatchPlan | None], tuple[torch.Tensor, torch.Tensor | None, dict]
]


def make_objective(
    model,
    attn: AttentionModel | None,
    mc_nets: list,
    mc_cfg: MCConfig | None,
    device: torch.device,
    num_iterations: int,
) -> Objective:
    """The micro-batch loss of the chosen objective. Copy rows (the schedule's warm-up) always train the plain
    GPT: short copy rows teach the GPT itself to copy. The auxiliary loss (MegaPrediction's) trains but stays
    out of the logged loss, so losses compare across objectives."""
    if mc_cfg is not None:
        # compiled where the vanilla step is: the MC step's shapes are static (megacontext/batch_plan.py)
        mc_gist, mc_lens = (torch.compile(n, dynamic=False) if device.type == "cuda" else n for n in mc_nets)

        def step_loss(x, y, step: int, plan):
            """MegaContext: one bounded call (docs/design.md §4) on rows planned ahead (host_batches)."""
            row = torch.cat([x, y[:, -1:]], dim=1)
            loss, m = mc_train_step(
                model, mc_gist, mc_lens, row, mc_cfg, step / num_iterations, step, plan=plan
            )
            return loss, None, m

    elif attn is not None:  # window / mega: MegaPrediction's loss trains, unlogged as loss
        step_loss = lambda x, y, step, plan: attn.train_loss(x, y, step / num_iterations)  # noqa: E731
    else:
        step_loss = lambda x, y, step, plan: (model(x, y), None, {})  # noqa: E731

    def objective(kind: str, x, y, step: int, plan):
        if kind == "copy":
            return model(x, y), None, {}
        return step_loss(x, y, step, plan)

    return objective


def host_batches(
    step: int,
    num_iterations: int,
    grad_accum_steps: int,
    schedule,
    train_loader,
    mc_cfg: MCConfig | None,
    seed: int,
    vocab_size: int,
    tokenizer,
    pin: bool,
) -> Iterator[tuple]:
    """Each micro-step's inputs, made on the host in a prefetch thread while the device runs the step before:
    the loader's rows, the schedule's replacements (copy, task, long-context rows), the MC step's plan, and
    the loader's resume point after them. pin: the copy to the device overlaps compute (CUDA)."""
    while step < num_iterations:  # nothing past the last step: no rows read or made for nothing
        kind = schedule.kind(step)
        for micro in range(grad_accum_steps):
            x, y = next(train_loader)
            x, y = schedule.batch(kind, x, y, seed, vocab_size, tokenizer)
            plan = None
            if mc_cfg is not None and kind != "copy":
                row = torch.cat([x, y[:, -1:]], dim=1)
                plan = plan_batch(row, mc_cfg, step / num_iterations, step, pin=pin)
            if pin:
                x, y = x.pin_memory(), y.pin_memory()
            last = micro == grad_accum_steps - 1  # lane states exist between steps only
            yield kind, x, y, plan, train_loader.state_dict() if last else None
        step += 1


def mc_step_flops(
    gpt, gistnet, cfg: MCConfig, num_params: int, gpt_positions: float, step_tokens: int
) -> float:
    """Training FLOPs of an MC step: the GPT over every working-context slot that ran (attention at the
    budget's length), plus GistNet over every training token. LensNet is small and left out."""
    c = gpt.config
    per_pos = 6 * (num_params - gpt.wte.weight.numel()) + 12 * c.n_layer * c.n_embd * cfg.wc_budget
    gist_params = sum(p.numel() for p in gistnet.parameters())
    return gpt_positions * per_pos + 6 * gist_params * step_tokens


def metrics_line(metrics: dict, mc_step: bool, attention_mode: bool) -> str:
    """The objective's part of the step's log line: MC's fixed keys, or MegaPrediction's (mp/lod1_cos, ...)."""
    line = ""
    if mc_step:
        line = " | " + " ".join(f"{k[3:]} {metrics.get(k, math.nan):.4g}" for k in MC_LOG_KEYS)
    if attention_mode and metrics:
        line = " | " + " ".join(f"{k} {v:.4g}" for k, v in sorted(metrics.items()))
    return line
