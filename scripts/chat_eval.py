"""Evaluate a chat model on the chat tasks and summarise them as ChatCORE.

    python -m scripts.chat_eval -i sft                          # every task of the dataset, latest SFT model
    python -m scripts.chat_eval -i mid -a "ARC-Easy|GSM8K" --max-problems 200
    torchrun --standalone --nproc-per-node 8 -m scripts.chat_eval -i sft
    python -m scripts.chat_eval -i sft -a LongDoc --memory plain  # an MC model without its memory

Categorical tasks (ARC, MMLU) are scored by the model's logits over just the answer letters on offer, in
batches: no sampling, so no formatting luck. Generative tasks (GSM8K, HumanEval, SpellingBee, LongDoc, ...)
sample a completion (greedy by default) with the python tool live: a <|python_start|>...<|python_end|> call
is run in the sandbox (nanochat.execution) and its output fed back, as in chat. A problem counts as solved
when any of --num-samples completions passes the task's own check.
ChatCORE = mean over the tasks of the centered accuracy (acc - random) / (1 - random), so 0 = chance and
1 = perfect on every task (random: 1/4 for the 4-letter tasks, 0 for generative ones).

--dataset real: ARC-Easy, ARC-Challenge, MMLU, GSM8K, HumanEval (HF datasets, or local copies in the hub's
schema under --data-dir as <TASK>.jsonl/.json/.parquet), SpellingBee and LongDoc (generated). offline:
SpellingBee, Arithmetic, LongDoc, Identity (generated, no network). A checkpoint trained with --mc answers
every problem through a MegaContext session (MCSession: the checkpoint's GistNet, LensNet and the focus
allocator, the code chat_cli and chat_web run), and the focus map of the first long conversation is plotted
into the report; `--memory plain` runs its GPT on the prompt alone instead (the comparison).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist

from nanochat.checkpoint_manager import build_model, resolve_checkpoint
from nanochat.common import (
    UserError,
    atomic_write_text,
    compute_cleanup,
    compute_init,
    get_base_dir,
    print0,
    run_main,
)
from nanochat.device import autocast_ctx, pick_dtype
from nanochat.engine import Engine, ToolEngine, ToolUse, session_turn
from nanochat.progress import add_quiet_flag, progress, set_quiet
from nanochat.report import get_report
from nanochat.tasks.arc import ARC
from nanochat.tasks.common import Task
from nanochat.tasks.gsm8k import GSM8K
from nanochat.tasks.humaneval import HumanEval
from nanochat.tasks.longdoc import LongDoc
from nanochat.tasks.mmlu import MMLU
from nanochat.tasks.offline import Arithmetic, Identity
from nanochat.tasks.spellingbee import SpellingBee

REAL_TASKS = ["ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "SpellingBee", "LongDoc"]
OFFLINE_TASKS = ["SpellingBee", "Arithmetic", "LongDoc", "Identity"]
LONGDOC_REACH = 8  # LongDoc's facts lie at least this many working-context budgets before their question
LONGDOC_FACTS_WITHIN = 0.25  # ... in the first quarter of the document (LongDoc's default)
RANDOM_BASELINE = {"ARC-Easy": 0.25, "ARC-Challenge": 0.25, "MMLU": 0.25}  # 4 letters; generative: 0
HUB_TASKS = {"ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval"}


def local_files(data_dir: str | None, name: str):
    """<data_dir>/<name>.jsonl|.json|.parquet, or None to use the HF hub."""
    if not data_dir:
        return None
    for ext in (".jsonl", ".json", ".parquet"):
        path = Path(data_dir) / f"{name}{ext}"
        if path.is_file():
            return str(path)
    raise UserError(f"--data-dir {data_dir} has no {name}.jsonl, .json or .parquet")


def load_task(
    name: str, data_dir: str | None = None, longdoc_tokens: int = 1400, seed: int = 0, tokenizer=None
) -> Task:
    """The test split of a task by name."""
    files = local_files(data_dir, name) if name in HUB_TASKS else None
    if name in ("ARC-Easy", "ARC-Challenge"):
        return ARC(name, "test", data_files=files)
    makers = {
        "MMLU": lambda: MMLU("all", "test", data_files=files),
        "GSM8K": lambda: GSM8K("main", "test", data_files=files),
        "HumanEval": lambda: HumanEval("test", data_files=files),
        "SpellingBee": lambda: SpellingBee(256, "test", seed),
        "LongDoc": lambda: LongDoc(200, "test", seed, doc_size=longdoc_tokens, count=_counter(tokenizer)),
        "Arithmetic": lambda: Arithmetic(256, "test", seed),
        "Identity": lambda: Identity(32, "test", seed),
    }
    if name not in makers:
        raise UserError(
            f"unknown task {name!r}; choose from {', '.join(dict.fromkeys(REAL_TASKS + OFFLINE_TASKS))}"
        )
    return makers[name]()


def letter_ids(tokenizer, letters: list[str]) -> list[int]:
    ids = [tokenizer.encode(letter) for letter in letters]
    if any(len(i) != 1 for i in ids):
        raise UserError(f"answer letters {letters} are not single tokens in this tokenizer")
    return [i[0] for i in ids]


@torch.no_grad()
def categorical_results(model, tokenizer, task: Task, indices: list[int], batch_size: int) -> list[bool]:
    """Per problem: does the letter with the highest logit (among the problem's letters) pass?

    Prompts are right-padded: with causal attention a row's logits at its last real token do not see the
    padding after it."""
    device, bos, limit = model.wte.weight.device, tokenizer.get_bos_token_id(), model.rotary_len
    results = []
    bar = progress(total=len(indices), desc=type(task).__name__, unit="problem")
    for lo in range(0, len(indices), batch_size):
        conversations = [task[i] for i in indices[lo : lo + batch_size]]
        bar.update(len(conversations))
        prompts = [tokenizer.render_for_completion(c)[-limit:] for c in conversations]
        T = max(len(p) for p in prompts)
        ids = torch.tensor([p + [bos] * (T - len(p)) for p in prompts], device=device)
        last = torch.tensor([len(p) - 1 for p in prompts], device=device)
        logits = model(ids)[torch.arange(len(prompts), device=device), last]  # [B, V]
        for conversation, row in zip(conversations, logits):
            letters = conversation["letters"]
            choice = letters[int(row[letter_ids(tokenizer, letters)].argmax())]
            results.append(bool(task.evaluate(conversation, choice)))
    bar.close()
    return results


def generative_results(
    engine: Engine,
    task: Task,
    indices: list[int],
    batch_size: int,
    num_samples: int,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    seed: int,
) -> list[bool]:
    """Per problem: does any of num_samples completions pass task.evaluate?"""
    tokenizer, limit = engine.tokenizer, engine.model.rotary_len
    results = []
    bar = progress(total=len(indices), desc=type(task).__name__, unit="problem")
    for lo in range(0, len(indices), batch_size):
        conversations = [task[i] for i in indices[lo : lo + batch_size]]
        bar.update(len(conversations))
        keep = max(1, limit - max_new_tokens)  # prompt + completion must fit the rotary table
        prompts = [tokenizer.render_for_completion(c)[-keep:] for c in conversations]
        rows, _ = engine.generate_batch(
            prompts,
            num_samples=num_samples,
            max_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            seed=seed + lo,
        )
        for j, (conversation, prompt) in enumerate(zip(conversations, prompts)):
            samples = rows[j * num_samples : (j + 1) * num_samples]
            completions = [tokenizer.decode(r[len(prompt) :]) for r in samples]
            results.append(any(bool(task.evaluate(conversation, c)) for c in completions))
    bar.close()
    return results


def session_completion(
    session, tokenizer, max_new_tokens: int, temperature: float, top_k, seed: int
) -> list[int]:
    """Generate the assistant's turn in a MegaContext session, running python calls as ToolEngine does."""
    turn = session_turn(session, ToolUse(tokenizer), max_new_tokens, temperature, top_k, seed)
    return [token for token, _ in turn if token not in session.stop_tokens]


def mc_session_results(
    model,
    tokenizer,
    nets,
    task: Task,
    indices: list[int],
    num_samples: int,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    seed: int,
    focus_log: list[str] | None = None,
) -> list[bool]:
    """As the two above, one MegaContext session per problem and sample (full prompt ingested: the memory,
    not a truncation, bounds the context). focus_log: filled with the first session's focus map after every
    refocus (for scripts.focus_plot)."""
    from megacontext.session import MCSession
    from megacontext.telemetry import Telemetry

    cfg, gistnet, lensnet = nets
    device = model.wte.weight.device
    results = []
    for i in progress(indices, desc=f"{type(task).__name__} (MC)", unit="problem"):
        conversation = task[i]
        passed = False
        for s in range(1 if task.eval_type == "categorical" else num_samples):
            session = MCSession(model, tokenizer, gistnet, lensnet, cfg, device=device, seed=seed + i)
            record = focus_log is not None and not focus_log
            if record:
                session.telemetry = Telemetry(max_snapshots=100_000, snapshot_every=1)
            session.ingest(tokenizer.render_for_completion(conversation))
            if task.eval_type == "categorical":
                letters = conversation["letters"]
                completion = letters[int(session.logits()[letter_ids(tokenizer, letters)].argmax())]
            else:
                ids = session_completion(
                    session, tokenizer, max_new_tokens, temperature, top_k, seed + 7919 * s
                )
                completion = tokenizer.decode(ids)
            if record:
                focus_log.extend(session.telemetry.focus_maps())
            passed = bool(task.evaluate(conversation, completion))
            if passed:
                break
        results.append(passed)
    return results


def longdoc_size(meta: dict) -> int:
    """LongDoc's document length in tokens for a checkpoint: its facts lie in the first quarter of the document
    and its questions follow it, so at LONGDOC_REACH x the working-context budget (of a model trained at the
    checkpoint's length, MC or not, so an MC model and its vanilla twin read the same documents) every fact is
    at least that far back."""
    from megacontext.config import scale

    budget = (
        meta["mc"]["wc_budget"] if meta.get("mc") else scale(meta["model_config"]["sequence_len"]).wc_budget
    )
    return math.ceil(LONGDOC_REACH * budget / (1 - LONGDOC_FACTS_WITHIN))


def _counter(tokenizer):
    return None if tokenizer is None else (lambda s: len(tokenizer.encode(s)))


def chatcore(accuracies: dict[str, float]) -> float:
    """Mean centered accuracy over the tasks: 0 = random guessing, 1 = perfect."""
    centered = [
        (acc - RANDOM_BASELINE.get(name, 0.0)) / (1 - RANDOM_BASELINE.get(name, 0.0))
        for name, acc in accuracies.items()
    ]
    return sum(centered) / len(centered)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-i", "--source", required=True, choices=["base", "mid", "sft", "rl"], help="model family")
    p.add_argument("-a", "--task-name", default="", help="tasks separated by | (default: all of --dataset)")
    p.add_argument(
        "--dataset",
        default="auto",
        choices=["auto", "real", "offline"],
        help="which task set is the default (auto: offline on CPU, else real)",
    )
    p.add_argument(
        "--data-dir", default="", help="local copies of the hub tasks as <TASK>.jsonl (offline use)"
    )
    p.add_argument("--model-tag", default=None, help="checkpoint tag (default: the largest model)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("--max-problems", type=int, default=-1, help="problems per task (-1: all)")
    p.add_argument("--batch-size", type=int, default=8, help="problems per forward / per generation batch")
    p.add_argument("--num-samples", type=int, default=1, help="completions per generative problem (pass@k)")
    p.add_argument("--max-new-tokens", type=int, default=512, help="tokens generated per completion")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=50, help="sample among the k most likely tokens")
    p.add_argument(
        "--longdoc-tokens",
        type=int,
        default=0,
        help="LongDoc document length in tokens (0: every fact at least 8x the working-context budget of a model "
        "trained at this checkpoint's length before its question: megacontext.config.scale)",
    )
    p.add_argument(
        "--memory",
        default="auto",
        choices=["auto", "session", "plain"],
        help="session: every problem through the chat session's MegaContext memory (MCSession, what chat_cli and "
        "chat_web run); plain: the GPT on the prompt alone; auto (default): session for a checkpoint trained "
        "with --mc, else plain",
    )
    p.add_argument("--device-type", default="", help="cuda|cpu|mps (default: autodetect)")
    p.add_argument("--dtype", default="auto", help="auto|float32|bfloat16")
    p.add_argument("--seed", type=int, default=42, help="sampling seed")
    add_quiet_flag(p)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    set_quiet(args.quiet)
    ddp, rank, _, world_size, device = compute_init(args.device_type, args.seed)
    dtype = pick_dtype(device, args.dtype)
    ckpt_dir, step = resolve_checkpoint(args.source, args.model_tag, args.step)
    model, tokenizer, meta = build_model(ckpt_dir, step, device, phase="eval")
    nets = None
    if args.memory != "plain" and meta.get("mc"):
        from megacontext.session import load_mc_nets

        nets = load_mc_nets(ckpt_dir, step, meta, model.config.n_embd, device)
    elif args.memory == "session":
        raise UserError(f"--memory session: checkpoint {ckpt_dir} step {step} was trained without --mc")
    dataset = args.dataset if args.dataset != "auto" else ("offline" if device.type == "cpu" else "real")
    names = (
        args.task_name.split("|") if args.task_name else (REAL_TASKS if dataset == "real" else OFFLINE_TASKS)
    )
    engine = ToolEngine(model, tokenizer)
    longdoc_tokens = args.longdoc_tokens or longdoc_size(meta)

    accuracies, rows, focus_log = {}, [], []
    for name in names:
        task = load_task(name, args.data_dir or None, longdoc_tokens, args.seed, tokenizer)
        n = len(task) if args.max_problems < 0 else min(len(task), args.max_problems)
        indices = list(range(rank, n, world_size))
        t0 = time.time()
        with autocast_ctx(device, dtype):
            if nets is not None:
                results = mc_session_results(
                    model,
                    tokenizer,
                    nets,
                    task,
                    indices,
                    args.num_samples,
                    args.max_new_tokens,
                    args.temperature,
                    args.top_k,
                    args.seed,
                    focus_log if task.eval_type == "generative" else None,
                )
            elif task.eval_type == "categorical":
                results = categorical_results(model, tokenizer, task, indices, args.batch_size)
            else:
                results = generative_results(
                    engine,
                    task,
                    indices,
                    args.batch_size,
                    args.num_samples,
                    args.max_new_tokens,
                    args.temperature,
                    args.top_k,
                    args.seed,
                )
        counts = torch.tensor([sum(results), len(results)], dtype=torch.long, device=device)
        if ddp:
            dist.all_reduce(counts)
        correct, total = counts.tolist()
        accuracies[name] = correct / max(total, 1)
        rows.append((name, task.eval_type, correct, total, time.time() - t0))
        print0(f"{name}: {correct}/{total} = {accuracies[name]:.4f} ({time.time() - t0:.1f}s)")

    score = chatcore(accuracies)
    # ChatCORE is defined over the dataset's whole task list: a run of a subset (-a) reports its tasks only
    complete = set(accuracies) == set(REAL_TASKS if dataset == "real" else OFFLINE_TASKS)
    print0(f"\n{'task':<16} {'type':<12} {'correct':>8} {'total':>6} {'accuracy':>9} {'centered':>9}")
    for name, kind, correct, total, _ in rows:
        base = RANDOM_BASELINE.get(name, 0.0)
        print0(
            f"{name:<16} {kind:<12} {correct:>8} {total:>6} {accuracies[name]:>9.4f} "
            f"{(accuracies[name] - base) / (1 - base):>9.4f}"
        )
    print0(f"ChatCORE{'' if complete else ' over these tasks only'} ({len(accuracies)} tasks): {score:.4f}")

    extra = []
    if rank == 0 and focus_log:
        from scripts.focus_plot import plot_focus_maps

        stem = get_base_dir() / "report" / f"focus_{args.source}_{ckpt_dir.name}"
        atomic_write_text(stem.with_suffix(".txt"), "\n".join(focus_log) + "\n")
        plot_focus_maps(focus_log, stem.with_suffix(".png"))
        extra.append(
            f"MegaContext focus map (first long conversation, one row per refocus; dark = raw tokens, "
            f"lighter = coarser gists): ![focus map](report/{stem.name}.png)"
        )
    get_report().log(
        f"Chat evaluation {args.source}{' MC session' if nets else ''} ({ckpt_dir.name})",
        [
            {
                "checkpoint": f"{ckpt_dir} step {step}",
                "dataset": dataset,
                "max problems": args.max_problems,
                "num samples": args.num_samples,
                "temperature": args.temperature,
                "megacontext": "session" if nets is not None else ("on" if meta.get("mc") else "off"),
            },
            accuracies,
            {
                "ChatCORE" if complete else "ChatCORE (these tasks only)": score,
                "ChatCORE tasks": ", ".join(accuracies),
            },
            *extra,
        ],
    )
    compute_cleanup()


if __name__ == "__main__":
    run_main(main)
