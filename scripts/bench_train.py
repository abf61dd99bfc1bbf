"""Training and decoding throughput of the GPT on this machine, as one JSON line.

    python -m scripts.bench_train                       # depth 4, seq 512, batch 8, vocab 8192
    python -m scripts.bench_train --depth 12 --max-seq-len 2048 --device-batch-size 16

Random token data and no tokenizer, so it runs on a bare checkout. A timed step is the FULL optimizer
step (forward + backward + optimizer), after warm-up steps that absorb compilation and allocator
growth. MFU = model FLOPs of the tokens that ran / (time · peak), where the peak is a large matmul
measured here in the same dtype (so a CPU figure is against what this CPU can actually do).
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import torch

from nanochat.common import UserError, compute_init, resolve_device_type, run_main
from nanochat.device import autocast_ctx, peak_flops, pick_dtype, sync
from nanochat.op_count import OpCount


class _NoStopTokens:
    """Engine asks its tokenizer for BOS and stop ids. Random data has no tokenizer, so the ids given are
    outside the vocab: the model can never emit them, every decode runs its full length, and BOS is
    never fed in (a single prompt needs no left padding)."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def get_bos_token_id(self) -> int:
        return self.vocab_size

    def encode_special(self, name: str) -> int:
        return self.vocab_size + 1


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--depth", type=int, default=4, help="model depth (width = 64 * depth)")
    parser.add_argument("--max-seq-len", type=int, default=512, help="sequence length")
    parser.add_argument("--device-batch-size", type=int, default=8, help="sequences per step")
    parser.add_argument("--vocab-size", type=int, default=8192, help="vocab size of the random data")
    parser.add_argument("--warmup-steps", type=int, default=3, help="untimed steps first")
    parser.add_argument("--steps", type=int, default=5, help="timed optimizer steps")
    parser.add_argument("--decode-tokens", type=int, default=64, help="tokens generated for decode speed")
    parser.add_argument("--device-type", type=str, default="", help="cuda|cpu|mps (default: autodetect)")
    parser.add_argument("--dtype", type=str, default="auto", help="auto|float32|bfloat16")
    parser.add_argument("--compile", type=int, default=-1, help="torch.compile: 1/0 (default: on for CUDA)")
    parser.add_argument(
        "--mc",
        action="store_true",
        help="also time the MegaContext step at equal tokens (the default recipe at --max-seq-len, as "
        "base_train --mc trains it) and report the MC/vanilla tokens/s ratio, the GPT positions per token, "
        "their product mc_efficiency (1.0 = no overhead beyond the GPT's arithmetic), the ATen ops dispatched "
        "per forward + backward (MC and vanilla, at 1 row and at --device-batch-size rows) and host syncs",
    )
    return parser.parse_args()


def count_step(step, rows: int) -> tuple[int, int]:
    """(ATen ops dispatched, host syncs) of one forward + backward of `step(rows)` (nanochat/op_count.py)."""
    with OpCount() as c:
        step(rows)
    return c.ops, len(c.syncs)


def bench_mc(args, model, train_model, device, dtype, vanilla_step) -> dict:
    """The MC training step on the same model and the same training tokens per step (rows of T+1), its rows
    made and planned one batch ahead in a background thread as base_train does (nanochat/prefetch.py).

    Timed steps alternate with vanilla ones (`vanilla_step`, the full optimizer step timed above), and the
    ratio is taken between the two sums: on a shared machine the load then weighs on both alike."""
    from megacontext.config import MCConfig, build_nets
    from megacontext.training import mc_train_step, plan_batch
    from nanochat.optim import setup_optimizers
    from nanochat.prefetch import Prefetch

    T, B = args.max_seq_len, args.device_batch_size
    cfg = MCConfig.for_seq_len(T)  # the recipe base_train --mc trains at this length
    gistnet, lensnet = build_nets(cfg, model.config.n_embd)
    gistnet.to(device)
    lensnet.to(device)
    optimizers = setup_optimizers(model, extra_modules=[gistnet, lensnet])
    gen = torch.Generator(device="cpu").manual_seed(1)
    pin = device.type == "cuda"

    def batches(rows: int):
        for i in itertools.count():
            x = torch.randint(0, args.vocab_size, (rows, T + 1), generator=gen)
            yield i, (x.pin_memory() if pin else x), plan_batch(x, cfg, 1.0, seed=i, pin=pin)

    # compiled like the vanilla step where it is (static shapes: batch_plan); counted eager, as the vanilla one
    compiled = train_model is not model
    nets = [torch.compile(n, dynamic=False) if compiled else n for n in (gistnet, lensnet)]

    def forward_backward(item, eager: bool = False) -> dict:
        i, x, plan = item
        x, plan = x.to(device, non_blocking=True), plan.to(device, non_blocking=True)
        gpt, gist, lens = (model, gistnet, lensnet) if eager else (train_model, *nets)
        with autocast_ctx(device, dtype):
            loss, m = mc_train_step(gpt, gist, lens, x, cfg, 1.0, i, plan=plan)
        loss.backward()
        return m

    def step(item) -> dict:
        m = forward_backward(item)
        for opt in optimizers:
            opt.step()
        for net in (model, gistnet, lensnet):
            net.zero_grad(set_to_none=True)
        return m

    def timed(fn):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        return time.perf_counter() - t0, out

    ahead = Prefetch(batches(B), depth=2)
    for _ in range(args.warmup_steps):
        step(next(ahead))
    ctrl_ms, positions, dt, dt_vanilla = [], [], 0.0, 0.0
    for _ in range(args.steps):
        dt_vanilla += timed(vanilla_step)[0]
        t, m = timed(lambda: step(next(ahead)))
        dt += t
        ctrl_ms.append(m["mc/time_controller_ms"])
        positions.append(m["mc/gpt_positions"])
    ahead.close()
    mc_tokens_per_s = args.steps * B * T / dt
    ratio = dt_vanilla / dt
    per_token = sum(positions) / (args.steps * B * T)
    ops = {}
    for rows in sorted({1, B}):  # eager, one micro-step each: the count does not depend on the values
        item = next(batches(rows))
        ops[rows] = count_step(lambda _, item=item: forward_backward(item, eager=True), rows)
        for net in (model, gistnet, lensnet):
            net.zero_grad(set_to_none=True)
    return {
        "mc_tokens_per_s": round(mc_tokens_per_s, 1),
        "mc_vs_vanilla_tokens_per_s": round(ratio, 3),
        "mc_gpt_positions_per_token": round(per_token, 3),
        "mc_efficiency": round(ratio * per_token, 3),
        "mc_aten_ops_per_step": {str(r): n for r, (n, _) in ops.items()},
        "mc_host_syncs_per_step": max(s for _, s in ops.values()),
        "mc_time_controller_ms": round(sum(ctrl_ms) / len(ctrl_ms), 2),
        "mc_controller_share": round(sum(ctrl_ms) / 1000 / dt, 4),
        "mc_config": cfg.to_dict(),
    }


def main() -> None:
    from nanochat.engine import Engine
    from nanochat.gpt import GPT, config_for_depth
    from nanochat.optim import setup_optimizers

    args = parse_args()
    if min(args.depth, args.max_seq_len, args.device_batch_size, args.steps) < 1:
        raise UserError("--depth, --max-seq-len, --device-batch-size and --steps must be positive")
    _, _, _, _, device = compute_init(resolve_device_type(args.device_type), seed=0)
    dtype = pick_dtype(device, args.dtype)
    config = config_for_depth(args.depth, args.vocab_size, args.max_seq_len)
    model = GPT(config).to(device)
    model.init_weights()
    use_compile = args.compile == 1 or (args.compile == -1 and device.type == "cuda")
    train_model = torch.compile(model, dynamic=False) if use_compile else model
    optimizers = setup_optimizers(model)
    B, T = args.device_batch_size, args.max_seq_len
    gen = torch.Generator(device="cpu").manual_seed(0)

    def train_step() -> None:
        x = torch.randint(0, args.vocab_size, (B, T + 1), generator=gen).to(device)
        with autocast_ctx(device, dtype):
            loss = train_model(x[:, :-1], x[:, 1:])
        loss.backward()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)

    for _ in range(args.warmup_steps):
        train_step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        train_step()
    sync(device)
    train_time = time.perf_counter() - t0
    tokens_per_s = args.steps * B * T / train_time
    model_flops_per_s = model.estimate_flops() * tokens_per_s
    peak, peak_source = peak_flops(device, dtype)

    # Decode: one prompt, tokens generated one at a time through the KV cache.
    prompt = torch.randint(0, args.vocab_size, (16,), generator=gen).tolist()
    engine = Engine(model, _NoStopTokens(args.vocab_size))
    model.eval()
    with autocast_ctx(device, dtype):
        for _ in engine.generate(prompt, max_tokens=4, temperature=0.0):  # warm-up
            pass
        sync(device)
        t0 = time.perf_counter()
        decoded = sum(1 for _ in engine.generate(prompt, max_tokens=args.decode_tokens, temperature=0.0))
        sync(device)
    decode_tokens_per_s = decoded / (time.perf_counter() - t0)

    vanilla_ops = {}
    if (
        args.mc
    ):  # dispatched ops of the vanilla forward + backward at the row counts the MC step is counted at

        def vanilla_step(rows: int) -> None:
            x = torch.randint(0, args.vocab_size, (rows, T + 1), generator=gen).to(device)
            with autocast_ctx(device, dtype):
                model(x[:, :-1], x[:, 1:]).backward()
            model.zero_grad(set_to_none=True)

        vanilla_ops = {str(r): count_step(vanilla_step, r)[0] for r in sorted({1, B})}
    model.train()
    mc_result = bench_mc(args, model, train_model, device, dtype, train_step) if args.mc else {}
    if args.mc:
        mc_result["aten_ops_per_step"] = vanilla_ops
    result = {
        **mc_result,
        "tokens_per_s": round(tokens_per_s, 1),
        "model_flops_per_s": model_flops_per_s,
        "peak_flops_per_s": peak,
        "mfu": model_flops_per_s / peak,
        "decode_tokens_per_s": round(decode_tokens_per_s, 1),
        "config": {
            **config.to_dict(),
            "device_batch_size": B,
            "device": str(device),
            "dtype": str(dtype).removeprefix("torch."),
            "compile": use_compile,
            "timed_steps": args.steps,
            "num_params": model.num_params(),
            "flops_per_token": model.estimate_flops(),
            "peak_source": peak_source,
        },
    }
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    run_main(main)
