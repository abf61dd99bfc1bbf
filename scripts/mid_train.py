"""Mid-training: teach a base model the chat format, multiple choice, tool use and long documents.

    python -m scripts.mid_train --dataset offline --num-iterations 200     # CPU: the offline mixture
    torchrun --standalone --nproc-per-node 8 -m scripts.mid_train          # GPU: the real mixture
    torchrun --standalone --nproc-per-node 8 -m scripts.mid_train --mc     # ... with MegaContext

Loads the latest base checkpoint (--source/--model-tag/--model-step), trains on rendered conversations with
the loss on assistant tokens only (nanochat.chat_data), and saves to mid_checkpoints/<same tag>/.
Real mixture: SmolTalk, MMLU auxiliary_train, GSM8K (calculator tool calls), SpellingBee, identity and
long-document Q&A (downloaded once through HF datasets). Offline mixture: generated identity, spelling,
calculator arithmetic and long-document conversations (nanochat.tasks.offline). --num-iterations -1
trains one epoch of the mixture. chat_sft.py runs this same program with SFT data and defaults.

MegaContext: a source checkpoint trained with --mc keeps training its GistNet and LensNet (their config
comes from the checkpoint); --mc on a vanilla source starts fresh nets from the --mc-* flags.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from dataclasses import replace

import torch
import torch.distributed as dist

from megacontext.config import add_mc_args, build_nets, mc_config_from_args
from megacontext.session import load_mc_nets
from megacontext.training import auto_device_batch, mc_train_step
from nanochat.chat_data import ConversationLoader, chat_mixtures, input_target_pairs
from nanochat.checkpoint_manager import (
    SOURCE_DIRS,
    build_model,
    load_checkpoint,
    load_mc_state,
    resolve_checkpoint,
    resume_step,
    save_checkpoint,
)
from nanochat.common import UserError, compute_cleanup, compute_init, get_base_dir, print0, run_main
from nanochat.dataloader import LaneLoader, check_lane_state, gather_state
from nanochat.device import autocast_ctx, pick_dtype, sync
from nanochat.loss_eval import evaluate_bpb
from nanochat.optim import optimizer_params, setup_optimizers, sync_gradients
from nanochat.report import get_report
from nanochat.tokenizer import get_token_bytes
from nanochat.train_flags import add_optim_flags, add_run_flags

TITLES = {"mid": "Midtraining", "sft": "Chat SFT"}  # report section per stage
MC_SHOWN = ("mc/loss", "mc/token_loss", "mc/lens_loss", "mc/lens_rank_agreement", "mc/wc_budget")
# The MC loss's weight beside the chat loss. With LongDoc's old bare-value answers, weight 1 taught the memory
# (LongDoc 21/50 after mid-training) and wore the other skills away (Identity 2/32: "Who are you?" -> a bare
# name); 0.3 measured 17/50 and 11/32. With sentence answers 0.3 keeps both (SFT: LongDoc 20/50 and 18/50,
# Identity 32/32 on two seeds) and 1 is worse on both (15/50, 27/32): docs/log.md, "The chat stages: memory
# against skills" and "LongDoc answers in sentences".
CHAT_MC_WEIGHT = 0.3


def chat_loss(chat: torch.Tensor, mc: torch.Tensor, full_weight: float) -> torch.Tensor:
    """A chat stage's objective for an MC model: the full-detail chat loss plus the weighted MC loss.

    The MC loss's own full-row term (MCConfig.full_weight) is the chat loss again, the same GPT pass over the
    same tokens, so the stage runs the MC step without it (`replace(cfg, full_weight=0)`) and the chat loss
    carries its weight: one GPT forward and backward fewer per row, the same objective."""
    return (1 + CHAT_MC_WEIGHT * full_weight) * chat + CHAT_MC_WEIGHT * mc


def build_parser(description: str = __doc__) -> argparse.ArgumentParser:
    """The flags of a conversation-training stage, with mid-training's defaults (chat_sft overrides some)."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", default="base", help="checkpoint family to start from: base|mid|sft|rl")
    p.add_argument("--model-tag", default=None, help="source tag, also the output tag (default: largest)")
    p.add_argument("--model-step", type=int, default=None, help="source step (default: the latest)")
    p.add_argument(
        "--dataset",
        default="auto",
        choices=["auto", "real", "offline"],
        help="real: HF datasets; offline: generated conversations; auto: offline on CPU, else real",
    )
    p.add_argument("--offline-size", type=int, default=4000, help="offline: training conversations")
    p.add_argument(
        "--longdoc-chars",
        type=int,
        default=-1,
        help="long-document length in chars (-1: 3 x seq len, ~0.7 of a row in tokens: the facts lie far beyond "
        "the working-context budget and the conversation still fits the row)",
    )
    p.add_argument("--max-seq-len", type=int, default=2048, help="tokens per row (conversations are packed)")
    p.add_argument("--device-batch-size", type=int, default=32, help="rows per forward per rank")
    p.add_argument("--total-batch-size", type=int, default=524288, help="tokens per optimizer step")
    p.add_argument(
        "--num-iterations", type=int, default=-1, help="optimizer steps (-1: one epoch of the data)"
    )
    add_optim_flags(p)
    p.add_argument("--init-lr-frac", type=float, default=1.0, help="every lr is scaled by this")
    add_run_flags(p, eval_every=150)
    p.add_argument("--seed", type=int, default=42, help="seed of the MC variant sampling and fresh MC nets")
    add_mc_args(p)
    return p


def train(args, stage: str) -> None:
    """The training program of a conversation stage: "mid" or "sft" (their data: nanochat.chat_data)."""
    user_config = vars(args).copy()
    ddp, rank, _, world_size, device = compute_init(args.device_type, args.seed)
    master = rank == 0
    dtype = pick_dtype(device, args.dtype)
    autocast = lambda: autocast_ctx(device, dtype)  # a fresh context per use
    if args.dataset == "auto":
        args.dataset = "offline" if device.type == "cpu" else "real"

    # ---- the source model; the output keeps its tag
    src_dir, src_step = resolve_checkpoint(args.source, args.model_tag, args.model_step)
    orig_model, tokenizer, src_meta = build_model(src_dir, src_step, device, phase="train")
    model_tag = src_dir.name
    ckpt_dir = get_base_dir() / SOURCE_DIRS[stage] / model_tag
    config = orig_model.config
    B, T = args.device_batch_size, args.max_seq_len
    if T + 1 > orig_model.rotary_len:
        raise UserError(f"--max-seq-len {T} exceeds the model's rotary table ({orig_model.rotary_len - 1})")
    print0(f"source: {src_dir} step {src_step} | model config: {json.dumps(config.to_dict())}")

    # ---- MegaContext: the source's nets if it has them, else fresh ones with --mc
    mc_cfg, nets, fresh_nets = None, [], False
    if src_meta.get("mc"):
        mc_cfg, gistnet, lensnet = load_mc_nets(src_dir, src_step, src_meta, config.n_embd, device)
        nets = [gistnet.train(), lensnet.train()]
        print0(f"MegaContext: continuing the source's GistNet and LensNet ({json.dumps(mc_cfg.to_dict())})")
        if args.mc_wc_budget is not None or args.mc_block_size is not None:  # the nets were built for it
            print0("MegaContext: ignoring --mc-wc-budget / --mc-block-size: the source's config wins")
    elif args.mc:
        mc_cfg = mc_config_from_args(args, T)
        nets = [net.to(device).train() for net in build_nets(mc_cfg, config.n_embd)]
        print0("MegaContext: the source has no MC nets; training fresh ones (the recipe at this length)")
        fresh_nets = True
    if mc_cfg is not None:
        if T % mc_cfg.block_size:
            raise UserError(f"--max-seq-len {T} must be a multiple of the MC block size {mc_cfg.block_size}")
        B = auto_device_batch(B, T, mc_cfg)  # an MC row runs several working contexts
        while args.total_batch_size % (B * T * world_size):
            B -= 1
        print0(f"MegaContext: device batch {args.device_batch_size} -> {B} (the same tokens per step)")
    # the MC step without its full-row term: chat_loss carries it (the chat loss is that same pass)
    step_cfg = None if mc_cfg is None else replace(mc_cfg, full_weight=0.0)
    # MC steps feed embeddings of varying length: only the vanilla path is compiled
    compile_ok = device.type == "cuda" and mc_cfg is None
    model = torch.compile(orig_model, dynamic=False) if compile_ok else orig_model

    tokens_per_fwdbwd = B * T * world_size
    if args.total_batch_size % tokens_per_fwdbwd:
        raise UserError(
            f"--total-batch-size {args.total_batch_size} must be a multiple of device-batch-size x seq-len x "
            f"ranks = {B} x {T} x {world_size} = {tokens_per_fwdbwd}"
        )
    grad_accum_steps = args.total_batch_size // tokens_per_fwdbwd
    chars = args.longdoc_chars if args.longdoc_chars > 0 else 3 * T
    train_task, val_task = chat_mixtures(stage, args.dataset, chars, args.offline_size, args.seed)
    print0(f"{args.dataset} data: {len(train_task):,} train / {len(val_task):,} val conversations")
    print0(f"grad accumulation: {grad_accum_steps} micro-steps of {tokens_per_fwdbwd:,} tokens")

    lrs = (args.unembedding_lr, args.embedding_lr, args.matrix_lr, args.weight_decay)
    optimizers = setup_optimizers(orig_model, *lrs, extra_modules=nets)
    sync_params = optimizer_params(optimizers)
    step, loader_state, loop = 0, None, {"smooth_loss": 0.0, "train_time": 0.0, "min_val_bpb": float("inf")}
    resume_from = resume_step(ckpt_dir, args.resume_from_step)  # -2: the latest checkpoint, if any
    rows = args.total_batch_size // T  # row j of every step comes from lane j, whatever the ranks
    if resume_from is not None:
        model_state, optim_states, meta = load_checkpoint(ckpt_dir, resume_from, device, load_optimizer=True)
        check_lane_state(meta.get("loader_state"), rows)
        if bool(meta.get("mc")) != (mc_cfg is not None):
            raise UserError(f"checkpoint {ckpt_dir} step {resume_from} does not match this run's --mc")
        orig_model.load_state_dict(model_state)
        if mc_cfg is not None:
            mc_state = load_mc_state(ckpt_dir, resume_from, device)
            nets[0].load_state_dict(mc_state["gistnet"])
            nets[1].load_state_dict(mc_state["lensnet"])
        for opt, state in zip(optimizers, optim_states):
            opt.load_state_dict(state)
        step, loader_state, loop = meta["step"], meta["loader_state"], meta["loop_state"]
        print0(
            f"resumed from {ckpt_dir} step {step} (written by {meta.get('ranks', '?')} ranks, now {world_size})"
        )
    align = "end" if mc_cfg is not None else "start"  # MC: the horizon (row tail) holds the final answer
    if len(train_task) < rows:
        raise UserError(
            f"a step takes {rows} rows, each from its own lane, but there are {len(train_task)} conversations"
        )
    lane = lambda j, state: ConversationLoader(tokenizer, train_task, 1, T, "cpu", j, rows, state, align)
    loader = LaneLoader(lane, rows, B, device, rank, world_size, loader_state)
    token_bytes = get_token_bytes(device)
    eval_steps = max(1, args.eval_tokens // tokens_per_fwdbwd)
    mc_rng = random.Random(args.seed * 1000 + rank * 100_003 + step)  # resumed runs draw new variants

    wandb_run = None
    if args.run != "dummy" and master:
        import wandb  # only when asked for: a plain run needs no wandb

        mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
        wandb_run = wandb.init(
            project=f"nanochat-{stage}", name=args.run, config=user_config, mode=mode, dir=get_base_dir()
        )
    log_file = None
    if args.log_json and master:
        log_file = open(args.log_json, "a", encoding="utf-8")  # noqa: SIM115 (closed at the end)

    def log(record: dict) -> None:
        if log_file is not None:
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()
        if wandb_run is not None:
            wandb_run.log(record, step=record["step"])

    def global_progress() -> float:
        """Share of training done, the same on every rank (the lr schedule must not differ between them)."""
        if args.num_iterations > 0:
            return step / args.num_iterations
        p = torch.tensor([loader.progress], device=device, dtype=torch.float64)
        if ddp:
            dist.all_reduce(p, op=dist.ReduceOp.MAX)
        return float(p)

    def lr_multiplier(progress: float) -> float:
        lrm = 1.0
        if args.warmdown_ratio > 0 and progress > 1 - args.warmdown_ratio:
            frac = max(0.0, (1 - progress) / args.warmdown_ratio)
            lrm = frac + (1 - frac) * args.final_lr_frac
        return args.init_lr_frac * lrm

    def save(step: int) -> None:
        meta = {
            "model_config": config.to_dict(),
            "tokenizer_id": src_meta.get("tokenizer_id"),
            "source": {"family": args.source, "dir": str(src_dir), "step": src_step},
            "user_config": user_config,
            "device_batch_size": B,
            "max_seq_len": T,
            "ranks": world_size,
            "loader_state": gather_state(loader),  # every lane's position (a collective)
            "loop_state": loop,
        }
        mc_state = None
        if mc_cfg is not None:
            meta["mc"] = mc_cfg.to_dict()
            mc_state = {"gistnet": nets[0].state_dict(), "lensnet": nets[1].state_dict()}
        model_state = orig_model.state_dict() if master else None
        optim_states = [opt.state_dict() for opt in optimizers]
        save_checkpoint(ckpt_dir, step, model_state, optim_states, meta, rank=rank, mc_state=mc_state)
        print0(f"saved checkpoint {ckpt_dir} step {step}")

    # ---- the loop: step = optimizer steps done so far
    start_step, val_bpb, ema_beta = step, float("nan"), 0.9
    while True:
        progress = global_progress()
        last_step = step == args.num_iterations if args.num_iterations > 0 else progress >= 1.0
        if last_step or (args.eval_every > 0 and step % args.eval_every == 0):
            model.eval()
            val_loader = ConversationLoader(tokenizer, val_task, B, T, device, rank, world_size)
            with autocast():
                val_bpb = evaluate_bpb(model, input_target_pairs(val_loader), eval_steps, token_bytes)
            loop["min_val_bpb"] = min(loop["min_val_bpb"], val_bpb)
            print0(f"step {step:05d} | val bpb {val_bpb:.6f}")
            log({"step": step, "val_bpb": val_bpb})
            model.train()
        if last_step or (args.save_every > 0 and step != start_step and step % args.save_every == 0):
            save(step)
        if last_step:
            break

        sync(device)
        t0 = time.perf_counter()
        batches = [next(loader) for _ in range(grad_accum_steps)]
        # One token-weighted mean over the whole step on all ranks, so a micro-batch with few assistant
        # tokens does not weigh as much as a full one (and one with none cannot give NaN).
        counts = torch.tensor(float(sum(int((y >= 0).sum()) for _, y in batches)), device=device)
        if ddp:
            dist.all_reduce(counts)
        loss_sum, mc_sum, mc_metrics = torch.zeros((), device=device), torch.zeros((), device=device), {}
        for x, targets in batches:
            with autocast():
                # Full detail (the all-raw working context) on every assistant token: the chat skills. MC's
                # step trains on the horizon only (docs/design.md §4), a few % of a row, so it is added, not swapped.
                loss = model(x[:, :-1], targets, loss_reduction="sum") / counts.clamp(min=1)
                loss_sum += loss.detach()
                loss = loss * world_size  # sync_gradients averages over ranks
                if mc_cfg is not None:
                    # nets trained in the base stage are past their curriculum: the budget starts at the target
                    mc_progress = progress if fresh_nets else 1.0
                    mc_loss, mc_metrics = mc_train_step(
                        orig_model, nets[0], nets[1], x, step_cfg, mc_progress, mc_rng, targets=targets
                    )
                    mc_sum += mc_loss.detach() / grad_accum_steps
                    loss = chat_loss(loss, mc_loss / grad_accum_steps, mc_cfg.full_weight)
            loss.backward()
        sync_gradients(sync_params, world_size)
        lrm = lr_multiplier(progress)
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * lrm
            opt.step()
        orig_model.zero_grad(set_to_none=True)
        for net in nets:
            net.zero_grad(set_to_none=True)
        if ddp:
            dist.all_reduce(loss_sum)
            dist.all_reduce(mc_sum)
            mc_sum /= world_size
        raw_loss = loss_sum.item()  # also syncs the device, so dt is the real step time
        if mc_cfg is not None:
            # the step's metrics are 0-dim tensors: read them from the device once, here
            mc_metrics = {k: float(v) for k, v in mc_metrics.items()}
            mc_metrics["mc/loss"] = mc_sum.item()
        dt = time.perf_counter() - t0
        loop["smooth_loss"] = ema_beta * loop["smooth_loss"] + (1 - ema_beta) * raw_loss
        debiased = loop["smooth_loss"] / (1 - ema_beta ** (step + 1))
        if step > start_step + 1:  # the first steps include one-off warm-up
            loop["train_time"] += dt
        mc_line = " | ".join(f"{k[3:]} {v:.4g}" for k, v in mc_metrics.items() if k in MC_SHOWN)
        print0(
            f"step {step:05d} | loss {debiased:.6f} (raw {raw_loss:.6f}) | lrm {lrm:.3f} | progress "
            f"{100 * progress:.1f}% | dt {dt * 1000:.0f}ms" + (f" | {mc_line}" if mc_line else "")
        )
        log({"step": step, "loss": raw_loss, "smooth_loss": debiased, "lrm": lrm, "dt": dt, **mc_metrics})
        if not math.isfinite(raw_loss):
            raise UserError(f"training diverged at step {step} (loss {raw_loss}); try a lower --init-lr-frac")
        step += 1

    if loader.truncated:
        print0(
            f"warning: {loader.truncated} of {loader.rendered} conversations were longer than --max-seq-len "
            f"{T} + 1 and lost their end (raise --max-seq-len or shorten --longdoc-chars)"
        )
    get_report().log(f"{TITLES[stage]} ({model_tag})", [
        user_config,
        {"checkpoint": f"{ckpt_dir} step {step}", "source": f"{src_dir} step {src_step}",
         "megacontext": "on" if mc_cfg is not None else "off"},
        {"iterations": step, "ranks": world_size, "grad accumulation steps": grad_accum_steps,
         "train conversations": len(train_task), "dtype": str(dtype).removeprefix("torch."),
         "conversations cut to the row length (rank 0's lanes)": f"{loader.truncated} of {loader.rendered}"},
        {"val_bpb": val_bpb, "min val bpb": loop["min_val_bpb"],
         "final train loss (smoothed)": loop["smooth_loss"] / (1 - ema_beta ** max(1, step)),
         "training time (min)": round(loop["train_time"] / 60, 2)},
    ])  # fmt: skip
    if log_file is not None:
        log_file.close()
    if wandb_run is not None:
        wandb_run.finish()
    compute_cleanup()


def main(argv=None) -> None:
    train(build_parser().parse_args(argv), "mid")


if __name__ == "__main__":
    run_main(main)
