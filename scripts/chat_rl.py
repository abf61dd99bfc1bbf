"""Reinforcement learning on GSM8K, in nanochat's simplified GRPO style.

    python -m scripts.chat_rl --dataset offline --num-iterations 20       # CPU: calculator arithmetic
    torchrun --standalone --nproc-per-node 8 -m scripts.chat_rl           # GPU: GSM8K train

Each step samples --num-samples completions per problem from the current model (on-policy, python tool
live), rewards each with the task's own check (1 = correct final answer, else 0), and takes one
policy-gradient step: advantage = reward - mean reward of the problem's group, loss = -(advantage x log
prob) over the sampled tokens only (prompt and tool outputs are not the policy's doing). No KL penalty,
no reference model, no ratio clipping (one step per batch of samples, so the policy is never stale).
Starts from the latest SFT checkpoint, saves to chatrl_checkpoints/<same tag>/. MegaContext nets of the
source are carried over unchanged: RL trains the GPT's answers, not the memory.
--data-dir: local GSM8K in the hub's schema as GSM8K-train.jsonl (training) and GSM8K.jsonl (evaluation).
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from nanochat.checkpoint_manager import (
    build_model,
    load_checkpoint,
    load_mc_state,
    resolve_checkpoint,
    save_checkpoint,
)
from nanochat.common import UserError, compute_cleanup, compute_init, get_base_dir, print0, run_main
from nanochat.device import autocast_ctx, pick_dtype
from nanochat.optim import optimizer_params, setup_optimizers, sync_gradients
from nanochat.report import get_report
from nanochat.tasks.gsm8k import GSM8K
from nanochat.tasks.offline import Arithmetic
from scripts.chat_eval import ToolEngine, generative_results, local_files


def sample_group(engine, prompt: list[int], k: int, max_tokens: int, temperature: float, top_k, seed: int):
    """k completions of one prompt: per row (ids = prompt + completion, mask: 1 = sampled by the policy).
    Unlike Engine.generate_batch, a row keeps its stop token: learning when to stop is part of the policy."""
    ids = [list(prompt) for _ in range(k)]
    mask = [[0] * len(prompt) for _ in range(k)]
    done = [False] * k
    for column, masks in engine.generate(prompt, k, max_tokens, temperature, top_k, seed):
        for i, (token, m) in enumerate(zip(column, masks)):
            if not done[i]:
                ids[i].append(token)
                mask[i].append(m)
                done[i] = token in engine.stop_tokens
    return ids, mask


def group_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """GRPO without the std division (nanochat): reward minus the group's mean."""
    return rewards - rewards.mean()


def pg_batch(rows: list[tuple[list[int], list[int], float]], pad_id: int, device):
    """(inputs [N, T], targets [N, T] with -1 where the token was not sampled, advantages [N])."""
    T = max(len(ids) for ids, _, _ in rows) - 1
    inputs = torch.full((len(rows), T), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), T), -1, dtype=torch.long)
    for r, (ids, mask, _) in enumerate(rows):
        inputs[r, : len(ids) - 1] = torch.tensor(ids[:-1])
        targets[r, : len(ids) - 1] = torch.tensor([t if m else -1 for t, m in zip(ids[1:], mask[1:])])
    adv = torch.tensor([a for _, _, a in rows], dtype=torch.float32)
    return inputs.to(device), targets.to(device), adv.to(device)


def pg_loss(model, inputs, targets, adv, num_tokens: float) -> torch.Tensor:
    """-(sum over sampled tokens of advantage x log prob) / num_tokens."""
    logits = model(inputs)
    logp = -F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1, reduction="none")
    return -(logp.view_as(targets) * adv[:, None]).sum() / num_tokens


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-i", "--source", default="sft", help="checkpoint family to start from: mid|sft|rl")
    p.add_argument("--model-tag", default=None, help="source tag, also the output tag (default: largest)")
    p.add_argument("--model-step", type=int, default=None, help="source step (default: the latest)")
    p.add_argument(
        "--dataset",
        default="auto",
        choices=["auto", "real", "offline"],
        help="real: GSM8K; offline: calculator arithmetic; auto: offline on CPU, else real",
    )
    p.add_argument("--data-dir", default="", help="local GSM8K-train.jsonl / GSM8K.jsonl (offline use)")
    p.add_argument("--num-iterations", type=int, default=-1, help="optimizer steps (-1: one epoch)")
    p.add_argument("--examples-per-step", type=int, default=16, help="problems per step, over all ranks")
    p.add_argument("--num-samples", type=int, default=16, help="completions per problem (the group)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="tokens per completion")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    p.add_argument("--top-k", type=int, default=50, help="sample among the k most likely tokens")
    p.add_argument("--device-batch-size", type=int, default=8, help="rows per forward/backward")
    p.add_argument("--embedding-lr", type=float, default=0.2, help="AdamW lr of the token embedding")
    p.add_argument("--unembedding-lr", type=float, default=0.004, help="AdamW lr of the LM head")
    p.add_argument("--matrix-lr", type=float, default=0.02, help="Muon lr of the block matrices")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    p.add_argument("--init-lr-frac", type=float, default=0.05, help="lr scale; decays linearly to 0")
    p.add_argument("--eval-every", type=int, default=60, help="greedy pass@1 every N steps (and at the end)")
    p.add_argument("--eval-examples", type=int, default=400, help="test problems per evaluation")
    p.add_argument("--save-every", type=int, default=60, help="checkpoint every N steps (always at the end)")
    p.add_argument("--resume-from-step", type=int, default=-1, help="resume from this step of chatrl")
    p.add_argument("--log-json", default="", help="also append one JSON object per step to this file")
    p.add_argument("--device-type", default="", help="cuda|cpu|mps (default: autodetect)")
    p.add_argument("--dtype", default="auto", help="auto|float32|bfloat16")
    p.add_argument("--seed", type=int, default=42, help="sampling seed")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    user_config = vars(args).copy()
    ddp, rank, _, world_size, device = compute_init(args.device_type, args.seed)
    dtype = pick_dtype(device, args.dtype)
    dataset = args.dataset if args.dataset != "auto" else ("offline" if device.type == "cpu" else "real")
    if args.examples_per_step % world_size:
        raise UserError(
            f"--examples-per-step {args.examples_per_step} must be a multiple of the {world_size} ranks"
        )
    src_dir, src_step = resolve_checkpoint(args.source, args.model_tag, args.model_step)
    model, tokenizer, src_meta = build_model(src_dir, src_step, device, phase="train")
    ckpt_dir = get_base_dir() / "chatrl_checkpoints" / src_dir.name
    mc_state = load_mc_state(src_dir, src_step, device) if src_meta.get("mc") else None
    if dataset == "real":
        data_dir = args.data_dir or None
        train_task = GSM8K("main", "train", data_files=local_files(data_dir, "GSM8K-train"))
        test_task = GSM8K("main", "test", data_files=local_files(data_dir, "GSM8K"))
    else:
        train_task, test_task = Arithmetic(5000, "train", args.seed), Arithmetic(500, "test", args.seed)
    num_iterations = (
        args.num_iterations if args.num_iterations > 0 else len(train_task) // args.examples_per_step
    )
    if num_iterations < 1:
        raise UserError(
            f"{len(train_task)} problems make no step of --examples-per-step {args.examples_per_step}"
        )
    print0(
        f"source: {src_dir} step {src_step} | {dataset} data: {len(train_task):,} problems | "
        f"{num_iterations} steps of {args.examples_per_step} x {args.num_samples} samples"
    )

    lrs = (args.unembedding_lr, args.embedding_lr, args.matrix_lr, args.weight_decay)
    optimizers = setup_optimizers(model, *lrs)
    sync_params = optimizer_params(optimizers)
    step, history = 0, []
    if args.resume_from_step >= 0:
        state, optim_states, meta = load_checkpoint(ckpt_dir, args.resume_from_step, device, True)
        model.load_state_dict(state)
        for opt, s in zip(optimizers, optim_states):
            opt.load_state_dict(s)
        step, history = meta["step"], meta["history"]
        print0(f"resumed from {ckpt_dir} step {step}")
    engine = ToolEngine(model, tokenizer)
    pad_id = tokenizer.encode_special("<|assistant_end|>")
    log_file = None
    if args.log_json and rank == 0:
        log_file = open(args.log_json, "a", encoding="utf-8")  # noqa: SIM115 (closed at the end)

    def evaluate() -> float:
        n = min(args.eval_examples, len(test_task))
        model.eval()
        with autocast_ctx(device, dtype):
            results = generative_results(
                engine,
                test_task,
                list(range(rank, n, world_size)),
                8,
                1,
                args.max_new_tokens,
                0.0,
                None,
                args.seed,
            )
        model.train()
        counts = torch.tensor([sum(results), len(results)], dtype=torch.long, device=device)
        if ddp:
            dist.all_reduce(counts)
        return counts[0].item() / max(1, counts[1].item())

    pass1 = float("nan")
    while True:
        last_step = step == num_iterations
        if last_step or (args.eval_every > 0 and step % args.eval_every == 0):
            pass1 = evaluate()
            print0(f"step {step:05d} | test pass@1 {pass1:.4f}")
            history.append({"step": step, "pass@1": pass1})
        if last_step or (args.save_every > 0 and step % args.save_every == 0 and step > 0):
            meta = {
                "model_config": model.config.to_dict(),
                "tokenizer_id": src_meta.get("tokenizer_id"),
                "source": {"family": args.source, "dir": str(src_dir), "step": src_step},
                "user_config": user_config,
                "history": history,
            }
            if mc_state is not None:  # the source's MC nets and config, unchanged
                meta["mc"] = src_meta["mc"]
            model_state = model.state_dict() if rank == 0 else None
            save_checkpoint(
                ckpt_dir, step, model_state, [o.state_dict() for o in optimizers], meta, rank, mc_state
            )
            print0(f"saved checkpoint {ckpt_dir} step {step}")
        if last_step:
            break

        # ---- on-policy rollouts: this rank's share of the step's problems
        t0 = time.perf_counter()
        model.eval()
        rows, rewards = [], []
        for j in range(rank, args.examples_per_step, world_size):
            index = (step * args.examples_per_step + j) % len(train_task)
            conversation = train_task[index]
            prompt = tokenizer.render_for_completion(conversation)
            with autocast_ctx(device, dtype):
                ids, masks = sample_group(
                    engine,
                    prompt,
                    args.num_samples,
                    args.max_new_tokens,
                    args.temperature,
                    args.top_k,
                    args.seed + 1000 * step + j,
                )
            r = torch.tensor(
                [float(train_task.evaluate(conversation, tokenizer.decode(s[len(prompt) :]))) for s in ids]
            )
            rewards.append(r)
            rows += [(s, m, a) for s, m, a in zip(ids, masks, group_advantages(r).tolist())]
        model.train()

        # ---- one policy-gradient step, normalised by the sampled tokens of all ranks
        num_tokens = torch.tensor(float(sum(sum(m) for _, m, _ in rows)), device=device)
        if ddp:
            dist.all_reduce(num_tokens)
        for lo in range(0, len(rows), args.device_batch_size):
            inputs, targets, adv = pg_batch(rows[lo : lo + args.device_batch_size], pad_id, device)
            with autocast_ctx(device, dtype):
                loss = pg_loss(model, inputs, targets, adv, float(num_tokens.clamp(min=1))) * world_size
            loss.backward()
        sync_gradients(sync_params, world_size)
        lrm = args.init_lr_frac * (1 - step / num_iterations)
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * lrm
            opt.step()
        model.zero_grad(set_to_none=True)
        stats = torch.tensor(
            [torch.cat(rewards).sum().item(), float(len(rows)), float(num_tokens)], device=device
        )
        if ddp:
            dist.all_reduce(stats[:2])
        mean_reward = (stats[0] / stats[1]).item()
        dt = time.perf_counter() - t0
        print0(
            f"step {step:05d}/{num_iterations:05d} | reward {mean_reward:.4f} | sampled tokens "
            f"{int(stats[2])} | lrm {lrm:.3f} | dt {dt:.1f}s"
        )
        if log_file is not None:
            log_file.write(json.dumps({"step": step, "reward": mean_reward, "lrm": lrm, "dt": dt}) + "\n")
            log_file.flush()
        if not math.isfinite(mean_reward):
            raise UserError(f"RL step {step} produced no rewards")
        step += 1

    get_report().log(
        f"Chat RL ({src_dir.name})",
        [
            user_config,
            {
                "checkpoint": f"{ckpt_dir} step {step}",
                "source": f"{src_dir} step {src_step}",
                "dataset": dataset,
            },
            {
                "final test pass@1": pass1,
                "pass@1 by step": ", ".join(f"{h['step']}: {h['pass@1']:.4f}" for h in history),
            },
        ],
    )
    if log_file is not None:
        log_file.close()
    compute_cleanup()


if __name__ == "__main__":
    run_main(main)
