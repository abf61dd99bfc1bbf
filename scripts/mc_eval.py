"""The long-context suite: passkey, multi-query associative recall and variable tracking, with the evidence
placed 1x..64x the working-context budget before the question (so a recent window of the budget's size
cannot see it), scored under the views of the same history (megacontext/views.py) and the mc-oracle diagnostic.
mc-attn (the allocator led by the GPT's own attention) runs only when named: it scored 0 wherever it was
measured and took about a third of the suite's time.

Accuracy is greedy exact match of the whole answer (teacher-forced argmax at every answer token, which is
exactly what greedy decoding would produce), with a 95 % Wilson interval; nll is the answer's mean NLL under
the view (nats per token), dnll the same minus under full attention. Prints one JSON line per task and a
Markdown table, and appends the table to the report.

    python -m scripts.mc_eval --task all --n 50 --source base
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

from megacontext.attention_modes import attention_model
from megacontext.config import MCConfig
from megacontext.session import load_mc_nets
from megacontext.views import ORACLE, VIEWS, build_tree, horizon_logits, horizon_nll
from nanochat.checkpoint_manager import build_model, resolve_checkpoint
from nanochat.common import UserError, compute_init, print0, run_main
from nanochat.progress import add_quiet_flag, progress, set_quiet
from nanochat.tasks import longctx

DEFAULT_VIEWS = tuple(v for v in (*VIEWS, ORACLE) if v != "mc-attn")
LEAD = 3  # label tokens before the answer that must be raw with it (answer_raw): the GPT's look-up key

SUITES = {
    # name: (generator task, keyword arguments); passkey mixes digit and UUID keys, with distractors
    "passkey": [("passkey", {"key_kind": "digits", "n_distractors": 3}), ("passkey", {"key_kind": "uuid"})],
    "mqar": [("mqar", {"n_pairs": 8}), ("mqar", {"n_pairs": 16})],
    "vartrack": [("vartrack", {"n_hops": 3})],
}


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of k successes out of n."""
    if n == 0:
        return 0.0, 0.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def token_at(tokenizer, prompt: str, char: int) -> int:
    """Index in BOS + encode(prompt) of the token that starts at prompt[char]."""
    return len(tokenizer.encode(prompt[:char])) + 1


def occurrences(tokenizer, prompt: str, value: str, lo: int, hi: int) -> list[tuple[int, int]]:
    """Token spans [start, end) in BOS + encode(prompt) of every occurrence of `value` inside prompt[lo:hi],
    each with the LEAD tokens before it (the end of the label that names it)."""
    spans, at = [], prompt.find(value, lo)
    while 0 <= at and at + len(value) <= hi:
        spans.append(
            (max(0, token_at(tokenizer, prompt, at) - LEAD), token_at(tokenizer, prompt, at + len(value)))
        )
        at = prompt.find(value, at + len(value))
    return spans


def answer_tokens(tokenizer, prompt: str, answer: str, chars: tuple[int, int]) -> list[tuple[int, int]]:
    """The answer's occurrences inside the evidence (a passkey's evidence states the key twice, and the GPT
    can copy either); the whole evidence span (evidence_tokens) where it does not occur there literally."""
    spans = occurrences(tokenizer, prompt, answer.strip(), *chars)
    return spans or [evidence_tokens(tokenizer, prompt, chars)]


def decoy_tokens(tokenizer, prompt: str, decoys: list[str], before: int) -> list[tuple[int, int]]:
    """The occurrences before char `before` (the question) of every look-alike answer: another lock's key,
    the distractor chain's value."""
    return [span for value in decoys for span in occurrences(tokenizer, prompt, value, 0, before)]


def raw_in(wc, span: tuple[int, int]) -> bool:
    """Whether every token of span is raw (LOD0) in the working context."""
    raw = [(e.start, e.end) for e in wc.entries if e.level == 0]
    return all(any(s <= t < e for s, e in raw) for t in range(*span))


def evidence_tokens(tokenizer, prompt: str, chars: tuple[int, int]) -> tuple[int, int]:
    """Token span [start, end) of prompt[chars] in BOS + encode(prompt), one token wider on each side: a
    prefix may tokenize one token differently at its cut."""
    a, b = token_at(tokenizer, prompt, chars[0]), token_at(tokenizer, prompt, chars[1])
    return max(0, a - 1), b + 1


@torch.no_grad()
def evaluate(
    examples, tokenizer, model, gistnet, lensnet, cfg: MCConfig, views, device, desc: str = ""
) -> dict:
    """Per view: correct count, summed answer NLL, WC sizes and edits over the examples, and (mc views) how
    often an occurrence of the answer in the evidence was raw in the working context, with the LEAD tokens
    before it: what separates the scorer's misses (not raw) from the GPT's (raw, yet answered wrong); and how
    often a look-alike's answer was (the scorer opened a distractor: the lock next door, the other chain)."""
    keys = ("correct", "nll", "n", "wc", "edits", "raw", "raw_correct", "decoyed", "decoy")
    out = {v: dict.fromkeys(keys, 0) for v in views}
    full_nll = []
    for ex in progress(examples, desc=desc, unit="example"):
        prompt = tokenizer.encode(ex["prompt"], prepend=tokenizer.get_bos_token_id())
        answer = tokenizer.encode(ex["answer"])
        ids = prompt + answer
        h = len(answer)
        tree = build_tree(ids[:-1], model, gistnet, cfg, device) if gistnet is not None else None
        evidence = evidence_tokens(tokenizer, ex["prompt"], ex["evidence_chars"])
        key_spans = answer_tokens(tokenizer, ex["prompt"], ex["answer"], ex["evidence_chars"])
        q_start = ex["evidence_chars"][1] + ex["distance_chars"]
        decoy_spans = decoy_tokens(tokenizer, ex["prompt"], ex["decoys"], q_start)
        nll_full = None
        for v in views:
            if v.startswith("mc") and gistnet is None:
                continue
            logits, info = horizon_logits(
                v, ids, h, model, gistnet, lensnet, cfg, device, tree=tree, evidence=evidence
            )
            if logits is None:
                continue
            nll = float(horizon_nll(logits, answer).mean())
            if v == "full":
                nll_full = nll
            r = out[v]
            correct = logits.argmax(dim=-1).tolist() == answer
            r["correct"] += int(correct)
            wc = info.get("wc")  # None: a view without a working context
            if wc is not None and any(raw_in(wc, span) for span in key_spans):
                r["raw"] += 1
                r["raw_correct"] += int(correct)
            if wc is not None and decoy_spans:
                r["decoyed"] += 1
                r["decoy"] += any(raw_in(wc, span) for span in decoy_spans)
            r["nll"] += nll
            r["n"] += 1
            r["wc"] += info["wc_size"]
            r["edits"] += info["edits"]
        full_nll.append(nll_full)
    out["_full_nll"] = full_nll
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--task", default="all", choices=[*SUITES, "all"], help="which suite to run")
    parser.add_argument("--n", type=int, default=50, help="examples per (task, distance)")
    parser.add_argument("--distances", default="1,4,8,16,64", help="evidence distances, x the WC budget")
    parser.add_argument(
        "--views",
        default=",".join(DEFAULT_VIEWS),
        help=f"comma-separated subset of {','.join((*VIEWS, ORACLE))} ({ORACLE}: the evidence blocks raw, a "
        "diagnostic upper bound for any scorer)",
    )
    parser.add_argument("--source", default="base", choices=["base", "mid", "sft", "rl"])
    parser.add_argument("--model-tag", default=None)
    parser.add_argument("--step", type=int, default=None)
    parser.add_argument("--wc-budget", type=int, default=None, help="override the checkpoint's W_max")
    parser.add_argument(
        "--tau-expand", type=float, default=None, help="override the allocator's expand threshold (mc views)"
    )
    parser.add_argument(
        "--tau-collapse",
        type=float,
        default=None,
        help="override the allocator's collapse threshold (mc views)",
    )
    parser.add_argument(
        "--no-lookahead",
        action="store_true",
        help="refocus on the entries' own scores only (no look-ahead into LOD2+ gists: MCConfig.lookahead)",
    )
    parser.add_argument(
        "--no-flank",
        action="store_true",
        help="do not score the blocks beside an opened raw block as that block (MCConfig.flank)",
    )
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--device-type", default="", help="cuda|cpu|mps (default: autodetect)")
    parser.add_argument("--json-out", default=None, help="also write the JSON lines to this file")
    add_quiet_flag(parser)
    args = parser.parse_args()
    set_quiet(args.quiet)
    views = [v for v in args.views.split(",") if v]
    for flag in ("tau_expand", "tau_collapse"):
        if getattr(args, flag) is not None and getattr(args, flag) < 0:
            raise UserError(f"--{flag.replace('_', '-')} must be >= 0, got {getattr(args, flag)}")
    if bad := [v for v in views if v not in (*VIEWS, ORACLE)]:
        raise UserError(f"unknown view(s) {bad}; choose from {', '.join((*VIEWS, ORACLE))}")
    try:
        distances = [int(x) for x in args.distances.split(",") if x]
    except ValueError:
        raise UserError(f"--distances must be comma-separated integers, got {args.distances!r}") from None
    if args.n < 1:
        raise UserError(f"--n must be >= 1, got {args.n}")

    _, _, _, _, device = compute_init(args.device_type)
    ckpt_dir, step = resolve_checkpoint(args.source, args.model_tag, args.step)
    model, tokenizer, meta = build_model(ckpt_dir, step, device, phase="eval")
    model = attention_model(model, ckpt_dir, step, meta, device)  # full view: the checkpoint's own attention
    nets = load_mc_nets(ckpt_dir, step, meta, model.config.n_embd, device)
    cfg, gistnet, lensnet = nets if nets is not None else (MCConfig(), None, None)
    if nets is None:
        views = [v for v in views if not v.startswith("mc")]
        print0("checkpoint has no MegaContext nets: running the full and window views only")
    if args.wc_budget:
        cfg.wc_budget = args.wc_budget
    cfg.lookahead = cfg.lookahead and not args.no_lookahead
    cfg.flank = cfg.flank and not args.no_flank
    for name in ("tau_expand", "tau_collapse"):  # allocator thresholds of the mc views
        if getattr(args, name) is not None:
            setattr(cfg, name, getattr(args, name))
    label = f"{args.source}/{ckpt_dir.name}@{step}"
    suites = list(SUITES) if args.task == "all" else [args.task]
    lines, table = [], []
    t0 = time.time()
    for suite in suites:
        for task, kw in SUITES[suite]:
            name = f"{task}:{','.join(f'{k}={v}' for k, v in kw.items())}"
            results = []
            for dx in distances:
                examples = longctx.make_examples(
                    task,
                    args.n,
                    dx * cfg.wc_budget,
                    seed=args.seed + dx,
                    prefix=cfg.wc_budget // 2,
                    count=lambda s: len(tokenizer.encode(s)),
                    **kw,
                )
                r = evaluate(
                    examples, tokenizer, model, gistnet, lensnet, cfg, views, device, f"{name} {dx}x"
                )
                full_nll = r.pop("_full_nll")
                for v in views:
                    s = r[v]
                    if s["n"] == 0:
                        results.append({"view": v, "distance_x": dx, "n": 0, "accuracy": None})
                        continue
                    lo, hi = wilson(s["correct"], s["n"])
                    dnll = None
                    if all(x is not None for x in full_nll):
                        dnll = s["nll"] / s["n"] - sum(full_nll) / len(full_nll)
                    results.append(
                        {
                            "view": v,
                            "distance_x": dx,
                            "n": s["n"],
                            "accuracy": s["correct"] / s["n"],
                            "ci95_low": lo,
                            "ci95_high": hi,
                            "dnll": dnll,
                            "nll": s["nll"] / s["n"],  # the answer's mean NLL under this view (nats/token)
                            "wc_size": s["wc"] / s["n"],
                            "edits": s["edits"] / s["n"],
                            # mc views: the answer raw in the WC, and exact match among those
                            "answer_raw": s["raw"] / s["n"] if v.startswith("mc") else None,
                            "accuracy_if_raw": s["raw_correct"] / s["raw"] if s["raw"] else None,
                            "decoy_raw": s["decoy"] / s["decoyed"] if s["decoyed"] else None,
                        }
                    )
                    table.append((name, dx, v, results[-1]))
            line = {"task": name, "wc_budget": cfg.wc_budget, "checkpoint": label, "results": results}
            lines.append(line)
            print(json.dumps(line), flush=True)
    md = markdown_table(table, distances, views)
    print0(md)
    print0("\nanswer NLL (nats/token):\n" + markdown_table(table, distances, views, metric="nll"))
    if any(v.startswith("mc") for v in views):
        print0(
            "\nanswer raw in the working context, % (exact match among those, %; a look-alike's answer raw, %):\n"
            + markdown_table(table, distances, [v for v in views if v.startswith("mc")], metric="answer_raw")
        )
    print0(f"mc_eval took {time.time() - t0:.1f}s")
    if args.json_out:
        with open(args.json_out, "w") as f:
            f.write("\n".join(json.dumps(x) for x in lines) + "\n")
    try:
        from nanochat.report import get_report

        get_report().log(
            section=f"Long-context eval {args.source} ({ckpt_dir.name})",
            data=[{"checkpoint": label, **headline(table, distances)}, md],
        )
    except ImportError:
        pass


def headline(rows, distances) -> dict:
    """One number per task family for the report's results table: mean accuracy at 4x the budget (else the
    nearest distance run) in the model's own memory view at that budget: mc-lens for an MC model, the recent
    window for a vanilla one, so MC and vanilla compare at equal working-context size."""
    ran = {v for _, _, v, _ in rows}
    view = "mc-lens" if "mc-lens" in ran else "window"
    dx = min(distances, key=lambda d: abs(d - 4))
    out: dict = {"headline view": f"{view} at {dx}x the budget"}
    for family in dict.fromkeys(name.split(":")[0] for name, _, _, _ in rows):
        accs = [
            r["accuracy"]
            for name, d, v, r in rows
            if name.split(":")[0] == family and d == dx and v == view and r.get("accuracy") is not None
        ]
        if accs:
            out[family] = round(sum(accs) / len(accs), 4)
    return out


def markdown_table(rows, distances, views, metric: str = "accuracy") -> str:
    """One row per (task, view), one column per distance: accuracy % [95 % interval]; with metric="nll" the
    answer's mean NLL (nats/token), which still separates views where every exact match is 0; with
    "answer_raw" (mc views) how often the answer was raw in the WC, the exact match among those, and how often
    a look-alike's answer was raw (tasks with look-alikes)."""
    head = "| task | view | " + " | ".join(f"{d}x" for d in distances) + " |"
    sep = "|" + "---|" * (2 + len(distances))
    cells: dict[tuple[str, str], dict[int, str]] = {}
    for name, dx, v, r in rows:
        acc = r.get("accuracy")
        if acc is None:
            text = "–"
        elif metric == "nll":
            text = f"{r['nll']:.3f}"
        elif metric == "answer_raw":
            if r.get("answer_raw") is None:
                continue
            if_raw, decoy = r["accuracy_if_raw"], r.get("decoy_raw")
            text = f"{100 * r['answer_raw']:.0f} ({'–' if if_raw is None else f'{100 * if_raw:.0f}'})"
            text += "" if decoy is None else f"; {100 * decoy:.0f}"
        else:
            text = f"{100 * acc:.0f} [{100 * r['ci95_low']:.0f}-{100 * r['ci95_high']:.0f}]"
        cells.setdefault((name, v), {})[dx] = text
    body = [
        f"| {name} | {v} | " + " | ".join(c.get(d, "–") for d in distances) + " |"
        for (name, v), c in cells.items()
    ]
    return "\n".join([head, sep, *body])


if __name__ == "__main__":
    run_main(main)
