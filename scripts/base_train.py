"""Pretrain the base GPT on the parquet shards (next-token prediction).

    python -m scripts.base_train --depth 4 --max-seq-len 512 --device-batch-size 8 --total-batch-size 8192
    torchrun --nproc-per-node 8 -m scripts.base_train --depth 20

`--depth` is the one dial: width, heads and (with --num-iterations -1) the training horizon follow
from it; `--max-seq-len` sets the memory's geometry (megacontext.config.scale). The objective is chosen once:
the plain GPT (dense), an attention mode (`--attention window|mega`) or MegaContext (`--mc`); each brings its
measured recipe, data schedule included (nanochat/tasks/schedule.py), so `--mc` alone trains the recipe.
Checkpoints go to $NANOCHAT_BASE_DIR/base_checkpoints/<model-tag>/.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch
import torch.distributed as dist

from megacontext.attention_modes import (
    AttentionConfig,
    AttentionModel,
    add_attention_args,
    attention_config_from_args,
    describe,
)
from megacontext.config import MCConfig, add_mc_args, build_nets, mc_config_from_args
from megacontext.train_step import host_batches, make_objective, mc_step_flops, metrics_line
from megacontext.training import accumulate_metrics, auto_device_batch, mean_metrics
from megacontext.views import val_rows, view_bpb
from nanochat.checkpoint_manager import load_checkpoint, load_mc_state, resume_step, save_checkpoint
from nanochat.common import UserError, compute_cleanup, compute_init, get_base_dir, print0, run_main
from nanochat.dataloader import DataLoader, check_lane_state, merge_lane_states, pretraining_loader
from nanochat.device import autocast_ctx, peak_flops, pick_dtype, sync
from nanochat.engine import Engine
from nanochat.gpt import GPT, GPTConfig, config_for_depth
from nanochat.loss_eval import evaluate_bpb
from nanochat.optim import Muon, optimizer_params, setup_optimizers, sync_gradients
from nanochat.prefetch import Prefetch
from nanochat.report import get_report
from nanochat.tasks.schedule import default_schedule
from nanochat.tokenizer import get_token_bytes, get_tokenizer
from nanochat.train_flags import add_optim_flags, add_run_flags

SMEAR_WIDTH = 4  # the token shift's reach (--smear-width), every objective: docs/log.md
SAMPLE_PROMPTS = [
    "The capital of France is",
    "The chemical symbol of gold is",
    "If yesterday was Friday, then",
]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # model and horizon
    p.add_argument("--depth", type=int, default=20, help="transformer layers; width = 64 * depth")
    p.add_argument("--max-seq-len", type=int, default=2048, help="training sequence length (tokens)")
    p.add_argument("--num-iterations", type=int, default=-1, help="optimizer steps (-1: from the data ratio)")
    p.add_argument(
        "--target-param-data-ratio",
        type=float,
        default=20,
        help="tokens per parameter when -1 (Chinchilla: 20)",
    )
    # batch
    p.add_argument("--device-batch-size", type=int, default=32, help="sequences per forward per rank")
    p.add_argument(
        "--total-batch-size",
        type=int,
        default=524288,
        help="tokens per optimizer step (grad accumulation fills it)",
    )
    # optimization
    add_optim_flags(p)
    p.add_argument("--warmup-ratio", type=float, default=0.0, help="fraction of steps of linear lr warm-up")
    # evaluation, sampling, checkpoints, logging, device
    add_run_flags(p, eval_every=250)
    p.add_argument("--sample-every", type=int, default=2000, help="print samples every N steps; -1 = never")
    p.add_argument("--model-tag", type=str, default="", help="checkpoint directory name (default d<depth>)")
    p.add_argument("--seed", type=int, default=42, help="seed of the initial weights")
    # data schedule (nanochat/tasks/schedule.py): the defaults are the objective's measured recipe
    p.add_argument(
        "--longctx-frac",
        type=float,
        default=None,
        help="share of rows replaced by synthetic long-context rows whose answer ends the row "
        "(default 0.5 with --mc or --attention window|mega, else 0)",
    )
    p.add_argument(
        "--copy-warmup-steps",
        type=int,
        default=None,
        help="first N steps train the plain GPT on short rows of repeated random segments "
        "(default min(150, iterations/3); 0 with --attention window|mega)",
    )
    p.add_argument(
        "--recall-warmup-steps",
        type=int,
        default=None,
        help="then N steps of long-context task rows (default 54%% of the iterations with --attention "
        "window|mega, else 0)",
    )
    p.add_argument(
        "--recall-frac",
        type=float,
        default=None,
        help="then this share of the steps are task-row steps (default 0.3 with --attention window|mega)",
    )
    p.add_argument(
        "--smear",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="token shift in the GPT input (GPTConfig.smear; measured: val bpb 1.93 -> 1.81 at d4, and with "
        "the copy warm-up the GPT learns to copy; docs/training.md)",
    )
    p.add_argument(
        "--smear-width",
        type=int,
        default=SMEAR_WIDTH,
        help=f"previous inputs the token shift mixes into each position (default {SMEAR_WIDTH}: at d4 the GPT "
        "then looks values up by multi-token keys, dense or under --attention mega; docs/log.md)",
    )
    p.add_argument(
        "--mc-eval-rows", type=int, default=8, help="val rows scored under the five views (with --mc)"
    )
    add_attention_args(p)
    add_mc_args(p)
    return p.parse_args(argv)


def main() -> None:
    args = parse_args()
    user_config = vars(args).copy()
    ddp, rank, _, world_size, device = compute_init(args.device_type, args.seed)
    master = rank == 0
    dtype = pick_dtype(device, args.dtype)
    autocast = lambda: autocast_ctx(device, dtype)  # a fresh context per use

    # ---- tokenizer and model (built on the meta device, then materialised and initialised in place)
    tokenizer = get_tokenizer()
    token_bytes = get_token_bytes(device)
    config = config_for_depth(args.depth, tokenizer.get_vocab_size(), args.max_seq_len)
    attn_cfg = attention_config_from_args(args, args.max_seq_len)
    config.smear = args.smear
    config.smear_width = args.smear_width
    if config.smear_width < 1:
        raise UserError(f"--smear-width must be >= 1, got {args.smear_width}")
    with torch.device("meta"):
        orig_model = GPT(config)
    orig_model.to_empty(device=device)
    orig_model.init_weights()
    # orig_model: the plain module (checkpoints, sampling); model: what the training step calls
    model = torch.compile(orig_model, dynamic=False) if device.type == "cuda" else orig_model
    # window/mega: the plain module under the mode's mask (+ GistNet and MegaPrediction for mega); dense: None
    attn = AttentionModel(orig_model, attn_cfg) if attn_cfg.mode != "dense" else None
    print0(f"attention: {describe(attn_cfg)}")
    mc_cfg: MCConfig | None = mc_config_from_args(args, args.max_seq_len)
    objective = "mc" if mc_cfg is not None else attn_cfg.mode
    gistnet = lensnet = None
    if mc_cfg is not None:
        if args.max_seq_len % mc_cfg.block_size:
            raise UserError(
                f"--max-seq-len {args.max_seq_len} must be a multiple of the MC block size {mc_cfg.block_size}"
            )
        gistnet, lensnet = build_nets(mc_cfg, config.n_embd)
        gistnet.to(device)
        lensnet.to(device)
        print0(f"MegaContext: {json.dumps(mc_cfg.to_dict())}")
    num_params = orig_model.num_params()
    flops_per_token = orig_model.estimate_flops() if attn is None else attn.flops_per_token(args.max_seq_len)
    print0(f"model config: {json.dumps(config.to_dict())}")
    print0(f"parameters: {num_params:,} | training FLOPs per token: {flops_per_token:.3e}")

    # ---- batch geometry and horizon
    B, T = args.device_batch_size, args.max_seq_len
    if mc_cfg is not None:  # an MC row runs several working contexts: fewer rows per micro-batch
        B = auto_device_batch(B, T, mc_cfg)
        while args.total_batch_size % (B * T * world_size):  # keep the total batch reachable
            B -= 1
        print0(f"MegaContext: device batch {args.device_batch_size} -> {B} (the same tokens per step)")
    tokens_per_fwdbwd = B * T * world_size
    if args.total_batch_size % tokens_per_fwdbwd:
        raise UserError(
            f"--total-batch-size {args.total_batch_size} must be a multiple of device-batch-size x seq-len x ranks "
            f"= {B} x {T} x {world_size} = {tokens_per_fwdbwd}"
        )
    grad_accum_steps = args.total_batch_size // tokens_per_fwdbwd
    if args.num_iterations > 0:
        num_iterations = args.num_iterations
    elif args.target_param_data_ratio > 0:
        num_iterations = max(1, round(args.target_param_data_ratio * num_params / args.total_batch_size))
    else:
        raise UserError("give --num-iterations > 0 or --target-param-data-ratio > 0")
    total_tokens = args.total_batch_size * num_iterations
    schedule = default_schedule(
        objective, num_iterations, T, args.copy_warmup_steps, args.recall_warmup_steps, args.recall_frac,
        args.longctx_frac,
    )  # fmt: skip
    print0(f"data schedule: {schedule}")
    print0(f"grad accumulation: {grad_accum_steps} micro-steps of {tokens_per_fwdbwd:,} tokens")
    print0(
        f"iterations: {num_iterations:,} | tokens: {total_tokens:,} | tokens:params {total_tokens / num_params:.2f}"
    )

    def lr_multiplier(it: int) -> float:
        warmup = round(args.warmup_ratio * num_iterations)
        warmdown = round(args.warmdown_ratio * num_iterations)
        if it < warmup:
            return (it + 1) / warmup
        if it <= num_iterations - warmdown:
            return 1.0
        progress = (num_iterations - it) / warmdown
        return progress + (1 - progress) * args.final_lr_frac

    def muon_momentum(it: int) -> float:
        frac = min(it / 300, 1.0)  # nanochat: ramp 0.85 -> 0.95 over the first 300 steps
        return (1 - frac) * 0.85 + frac * 0.95

    # ---- optimizers, data, resume
    mc_nets = [gistnet, lensnet] if mc_cfg is not None else attn.aux_modules() if attn is not None else []
    optimizers = setup_optimizers(
        orig_model,
        args.unembedding_lr,
        args.embedding_lr,
        args.matrix_lr,
        args.weight_decay,
        extra_modules=mc_nets,
        extra_lr=0.002,
    )
    sync_params = optimizer_params(optimizers)
    model_tag = args.model_tag or f"d{args.depth}"
    ckpt_dir = get_base_dir() / "base_checkpoints" / model_tag
    step, loader_state = 0, None
    loop = {"smooth_loss": 0.0, "train_time": 0.0, "timed_tokens": 0, "min_val_bpb": float("inf")}
    # Exact resume needs model, optimizer and loader state only: training draws no random numbers
    # (no dropout) and the schedules are functions of the step. All three are independent of the number
    # of ranks (nanochat.checkpoint_manager, nanochat.dataloader's lanes): resume on any that divides
    # the step's rows. --resume-from-step -2: the latest checkpoint, if any (elastic restarts).
    resume_from = resume_step(ckpt_dir, args.resume_from_step)
    if resume_from is not None:
        model_state, optim_states, meta = load_checkpoint(ckpt_dir, resume_from, device, load_optimizer=True)
        if GPTConfig(**meta["model_config"]).to_dict() != config.to_dict():  # fields added since: defaults
            raise UserError(
                f"checkpoint model config {meta['model_config']} differs from this run's {config.to_dict()}"
            )
        saved = AttentionConfig.from_dict(meta.get("attention"))  # no key: a dense checkpoint
        if saved.mode != attn_cfg.mode or (attn is not None and saved != attn_cfg):
            raise UserError(
                f"checkpoint attention ({describe(saved)}) differs from this run's ({describe(attn_cfg)})"
            )
        check_lane_state(meta.get("loader_state"), args.total_batch_size // T)
        orig_model.load_state_dict(model_state)
        if attn is not None and attn.aux_modules():
            attn.load_aux_state(load_mc_state(ckpt_dir, resume_from, device))
        if mc_cfg is not None:
            mc_state = load_mc_state(ckpt_dir, resume_from, device)
            gistnet.load_state_dict(mc_state["gistnet"])
            lensnet.load_state_dict(mc_state["lensnet"])
        for opt, state in zip(optimizers, optim_states):
            opt.load_state_dict(state)
        step, loader_state, loop = meta["step"], meta["loader_state"], meta["loop_state"]
        print0(
            f"resumed from {ckpt_dir} step {step} (written by {meta.get('ranks', '?')} ranks, now {world_size})"
        )
        trained_in = meta.get("dtype")
        if args.dtype == "auto" and trained_in and trained_in != str(dtype).removeprefix("torch."):
            dtype = getattr(torch, trained_in)  # the CPU probe may pick otherwise today: keep the run exact
            print0(f"resuming in {trained_in}, the dtype the checkpoint was trained in (--dtype changes it)")
    # row j of every step comes from lane j, whatever the number of ranks; host batches: the prefetch thread
    # below makes each micro-step's rows (and MC plan) one batch ahead
    train_loader = pretraining_loader(
        tokenizer, B, T, args.total_batch_size // T, "cpu", rank, world_size, loader_state
    )
    loader_state = train_loader.state_dict()  # the resume point: after the last micro-batch the loop took
    eval_steps = max(1, args.eval_tokens // tokens_per_fwdbwd)

    wandb_run = None
    if args.run != "dummy" and master:
        import wandb  # only when asked for: a plain run needs no wandb

        mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
        wandb_run = wandb.init(
            project="nanochat", name=args.run, config=user_config, mode=mode, dir=get_base_dir()
        )
    log_file = open(args.log_json, "a", encoding="utf-8") if args.log_json and master else None  # noqa: SIM115

    def log(record: dict) -> None:
        if log_file is not None:
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()
        if wandb_run is not None:
            wandb_run.log(record, step=record["step"])

    def gather_lanes(state: dict) -> dict:
        """The lane states of every rank (a collective): the world-size independent resume point."""
        parts = [state]
        if ddp:
            parts = [None] * world_size
            dist.all_gather_object(parts, state)
        return merge_lane_states(parts, train_loader.lanes)

    def save(step: int) -> None:
        meta = {
            "step": step,
            "model_config": config.to_dict(),
            "user_config": user_config,
            "device_batch_size": B,
            "max_seq_len": T,
            "ranks": world_size,
            "loader_state": gather_lanes(loader_state),  # every lane's position after the last step taken
            "loop_state": loop,
            "dtype": str(dtype).removeprefix("torch."),  # a resume with --dtype auto continues in it
            "mc": mc_cfg.to_dict() if mc_cfg is not None else None,
            "attention": attn_cfg.to_dict(),  # loaders rebuild the mode without flags
        }
        # rank 0 writes the model and the (replicated) optimizer state, then (after a barrier inside
        # save_checkpoint) the meta file that commits the step
        model_state = orig_model.state_dict() if master else None
        optim_states = [opt.state_dict() for opt in optimizers]
        mc_state = None
        if mc_cfg is not None and master:
            mc_state = {"gistnet": gistnet.state_dict(), "lensnet": lensnet.state_dict()}
        if attn is not None and attn.aux_modules() and master:
            mc_state = attn.aux_state()
        save_checkpoint(ckpt_dir, step, model_state, optim_states, meta, rank=rank, mc_state=mc_state)
        print0(f"saved checkpoint {ckpt_dir} step {step}")

    # ---- the loop: step = optimizer steps done so far
    peak, peak_source = peak_flops(device, dtype)
    print0(f"peak FLOP/s for MFU: {peak:.3e} per rank ({peak_source})")
    start_step, val_bpb = step, float("nan")
    mc_metrics: dict = {}
    mc_sums: dict = {}  # per-metric sums over the step's micro-batches (0-dim tensors: no sync until the log)
    mc_counts: dict = {}  # micro-batches that measured each metric

    def mc_views_eval(gpt, gist, lens, cfg) -> dict:
        """bpb / ΔNLL@H of the last H tokens of val rows (the training length) under the five views."""
        for m in (gist, lens):
            m.eval()
        rows = val_rows(tokenizer, T, args.mc_eval_rows, device)
        with autocast():
            out = view_bpb(rows, cfg.horizon, gpt, gist, lens, cfg, token_bytes, device)
        for m in (gist, lens):
            m.train()
        return out

    # ---- the objective, chosen once (megacontext/train_step.py): (loss, auxiliary loss or None, metrics) of one
    # micro-batch; its rows (and MC plan) are made one micro-step ahead in a prefetch thread
    objective = make_objective(model, attn, mc_nets, mc_cfg, device, num_iterations)
    micro_inputs = host_batches(step, num_iterations, grad_accum_steps, schedule, train_loader, mc_cfg, args.seed,
                                config.vocab_size, tokenizer, pin=device.type == "cuda")  # fmt: skip
    batches = Prefetch(micro_inputs, depth=2)

    ema_beta = 0.9
    while True:
        last_step = step == num_iterations
        if last_step or (args.eval_every > 0 and step % args.eval_every == 0):
            model.eval()
            val_loader = DataLoader(tokenizer, B, T, "val", device, rank=rank, world_size=world_size)
            with autocast():
                val_bpb = evaluate_bpb(model if attn is None else attn, val_loader, eval_steps, token_bytes)
                mp_eval = {}  # MegaPrediction's ΔNLL per level on the first val batch (2 extra forwards)
                if attn is not None and attn.predictor is not None and master:
                    mp_eval = attn.mp_delta_nll(*next(DataLoader(tokenizer, B, T, "val", device)))
            loop["min_val_bpb"] = min(loop["min_val_bpb"], val_bpb)
            print0(
                f"step {step:05d} | val bpb {val_bpb:.6f}"
                + "".join(f" | {k} {v:.4f}" for k, v in mp_eval.items())
            )
            log({"step": step, "val_bpb": val_bpb, **mp_eval})
            if mc_cfg is not None and master and args.mc_eval_rows > 0:
                views_out = mc_views_eval(orig_model, gistnet, lensnet, mc_cfg)
                print0(f"step {step:05d} | " + " ".join(f"{k} {v:.4f}" for k, v in views_out.items()))
                log({"step": step, **views_out})
            model.train()
        if master and args.sample_every > 0 and (last_step or (step > 0 and step % args.sample_every == 0)):
            orig_model.eval()
            engine = Engine(orig_model, tokenizer)
            prompts = [tokenizer.encode(p, prepend=tokenizer.get_bos_token_id()) for p in SAMPLE_PROMPTS]
            with autocast():
                for prompt in prompts:
                    results, _ = engine.generate_batch(prompt, num_samples=1, max_tokens=16, temperature=0.0)
                    print0(f"sample: {tokenizer.decode(results[0][1:])!r}")  # without BOS
            orig_model.train()
        if last_step or (args.save_every > 0 and step != start_step and step % args.save_every == 0):
            save(step)
        if last_step:
            break

        # one optimizer step over total-batch-size tokens: the schedule says what the rows are
        sync(device)
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        for _ in range(grad_accum_steps):
            kind, x, y, plan, state = next(batches)
            loader_state = state or loader_state
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            plan = None if plan is None else plan.to(device, non_blocking=True)
            with autocast():
                loss, aux, m = objective(kind, x, y, step, plan)
            accumulate_metrics(mc_sums, mc_counts, m)  # mean over the micro-batches that measured it
            loss_sum += loss.detach()
            if aux is not None:
                loss = loss + aux
            (loss / grad_accum_steps).backward()
        sync_gradients(sync_params, world_size)
        lrm = lr_multiplier(step)
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * lrm
                if isinstance(opt, Muon):
                    group["momentum"] = muon_momentum(step)
        for opt in optimizers:
            opt.step()
        orig_model.zero_grad(set_to_none=True)
        for net in mc_nets:
            net.zero_grad(set_to_none=True)
        train_loss = loss_sum / grad_accum_steps
        if ddp:  # the logged loss is the mean over all ranks, as a single process would see it
            dist.all_reduce(train_loss, op=dist.ReduceOp.SUM)
            train_loss /= world_size
        raw_loss = train_loss.item()  # also syncs the device, so dt below is the real step time
        dt = time.perf_counter() - t0
        mc_metrics = mean_metrics(mc_sums, mc_counts)  # the step's metrics, read from the device once
        mc_sums.clear()
        mc_counts.clear()

        loop["smooth_loss"] = ema_beta * loop["smooth_loss"] + (1 - ema_beta) * raw_loss
        debiased = loop["smooth_loss"] / (1 - ema_beta ** (step + 1))
        if step > start_step + 1:  # the first steps include one-off warm-up (compile, allocation)
            loop["train_time"] += dt
            loop["timed_tokens"] += args.total_batch_size
        tok_per_s = args.total_batch_size / dt
        step_flops = flops_per_token * args.total_batch_size
        mc_step = mc_cfg is not None and kind != "copy"
        if mc_step:  # MFU counts the forwards that ran: every working context + GistNet
            gpt_positions = mc_metrics["mc/gpt_positions"] * grad_accum_steps * world_size
            step_flops = mc_step_flops(
                orig_model, gistnet, mc_cfg, num_params, gpt_positions, args.total_batch_size
            )
        mfu = step_flops / dt / (peak * world_size)
        mc_line = metrics_line(mc_metrics, mc_step, attention_mode=attn is not None)
        print0(
            f"step {step:05d}/{num_iterations:05d} | loss {debiased:.6f} (raw {raw_loss:.6f}) | lrm {lrm:.3f} "
            f"| dt {dt * 1000:.1f}ms | tok/s {tok_per_s:,.0f} | mfu {100 * mfu:.2f}%{mc_line}"
        )
        log({"step": step, "loss": raw_loss, "smooth_loss": debiased, "lrm": lrm, "dt": dt, "tok_per_s": tok_per_s,
             "mfu": mfu, **mc_metrics})  # fmt: skip
        mc_metrics.clear()
        if not math.isfinite(raw_loss):
            raise UserError(f"training diverged at step {step} (loss {raw_loss}); try a lower learning rate")
        step += 1

    # ---- wrap up
    batches.close()  # the prefetch thread stops after the item it is making
    mean_mfu = flops_per_token * loop["timed_tokens"] / max(loop["train_time"], 1e-9) / (peak * world_size)
    print0(f"min val bpb {loop['min_val_bpb']:.6f} | training time {loop['train_time'] / 60:.2f} min")
    get_report().log(
        f"Base model training ({model_tag})",
        [
            user_config,
            {
                "parameters": num_params,
                "FLOPs per token": f"{flops_per_token:.3e}",
                "iterations": num_iterations,
                "training tokens": total_tokens,
                "tokens:params": total_tokens / num_params,
                "ranks": world_size,
                "grad accumulation steps": grad_accum_steps,
                "dtype": str(dtype).removeprefix("torch."),
                "peak FLOP/s per rank": f"{peak:.3e} ({peak_source})",
            },
            {
                "val_bpb": val_bpb,
                "min val bpb": loop["min_val_bpb"],
                "final train loss (smoothed)": loop["smooth_loss"] / (1 - ema_beta ** max(1, step)),
                "MFU % (mean after warm-up)": round(100 * mean_mfu, 2),
                "training time (min)": round(loop["train_time"] / 60, 2),
            },
            {"peak GPU memory (MiB)": round(torch.cuda.max_memory_allocated(device) / 2**20)}
            if device.type == "cuda"
            else {},
        ],
    )
    if log_file is not None:
        log_file.close()
    if wandb_run is not None:
        wandb_run.finish()
    compute_cleanup()


if __name__ == "__main__":
    run_main(main)
