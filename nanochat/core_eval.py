"""CORE: in-context-learning tasks scored by the base model's own losses (the DCLM paper's metric).

Three task types, all answered without sampling:
* multiple_choice: one shared question, several candidate continuations; the model picks the choice
  with the lowest mean loss over its tokens.  Item: {"query", "choices": [...], "gold": int}
* schema: several candidate contexts, one shared continuation; the model picks the context under
  which the continuation has the lowest mean loss.  Item: {"context_options": [...], "continuation", "gold"}
* language_modeling: correct only if greedy argmax reproduces every continuation token.
  Item: {"context", "continuation"}
Few-shot examples are drawn from the same task (never the item itself) with a per-item seed, so a
score is reproducible and independent of the number of ranks. Accuracy is centered against the
random baseline, (acc - b) / (1 - b), and CORE is the mean centered accuracy over tasks.

The eval bundle (core.yaml + eval_meta_data.csv + eval_data/*.jsonl) is downloaded once and cached
under $NANOCHAT_BASE_DIR/eval_bundle.
"""

from __future__ import annotations

import csv
import json
import os
import random
import shutil
import tempfile
import urllib.request
import zipfile
from pathlib import Path

import torch
import torch.distributed as dist

from nanochat.common import UserError, fsync_dir, get_base_dir

EVAL_BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
TASK_TYPES = ("multiple_choice", "schema", "language_modeling")
FEWSHOT_SEED = 1234


# -----------------------------------------------------------------------------
# The bundle


def bundle_url() -> str:
    return os.environ.get("NANOCHAT_EVAL_BUNDLE_URL") or EVAL_BUNDLE_URL


def get_eval_bundle(url: str | None = None) -> Path:
    """Directory holding core.yaml; downloads and unpacks the bundle on first use.

    The unpacked tree is moved into place with one rename, so an interrupted download leaves
    nothing that a later run would mistake for a complete bundle.
    """
    final = get_base_dir() / "eval_bundle"
    if (final / "core.yaml").is_file():
        return final
    url = url or bundle_url()
    with tempfile.TemporaryDirectory(dir=get_base_dir(), prefix=".eval_bundle.") as tmp:
        zip_path = Path(tmp) / "bundle.zip"
        try:
            with urllib.request.urlopen(url, timeout=60) as response, open(zip_path, "wb") as f:
                shutil.copyfileobj(response, f)
        except OSError as e:
            raise UserError(
                f"could not download the CORE eval bundle from {url} ({e}); "
                "set NANOCHAT_EVAL_BUNDLE_URL or unpack it into " + str(final)
            ) from e
        try:
            with zipfile.ZipFile(zip_path) as zf:
                zf.extractall(Path(tmp) / "unpacked")
        except zipfile.BadZipFile as e:
            raise UserError(f"the eval bundle at {url} is not a valid zip file") from e
        found = sorted((Path(tmp) / "unpacked").rglob("core.yaml"), key=lambda p: len(p.parts))
        if not found:
            raise UserError(f"the eval bundle at {url} has no core.yaml")
        if final.exists():  # a partial directory without core.yaml: replace it
            shutil.rmtree(final)
        os.replace(found[0].parent, final)
        fsync_dir(final.parent)
    return final


def load_tasks(bundle_dir: Path) -> list[dict]:
    """Task list from core.yaml, each with label, type, data path, num_fewshot, delimiter, baseline (0..1)."""
    import yaml  # only CORE needs YAML

    config = yaml.safe_load((bundle_dir / "core.yaml").read_text(encoding="utf-8"))
    baselines = {}
    meta_csv = bundle_dir / "eval_meta_data.csv"
    if meta_csv.is_file():
        with open(meta_csv, newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                baselines[row["Eval Task"]] = float(row["Random baseline"]) / 100.0
    tasks = []
    for entry in config["icl_tasks"]:
        label, task_type = entry["label"], entry["icl_task_type"]
        if task_type not in TASK_TYPES:
            raise UserError(
                f"core.yaml task {label!r} has unknown type {task_type!r}; known: {', '.join(TASK_TYPES)}"
            )
        shots = entry.get("num_fewshot", [0])
        tasks.append(
            {
                "label": label,
                "type": task_type,
                "data": bundle_dir / "eval_data" / entry["dataset_uri"],
                "num_fewshot": int(shots[0] if isinstance(shots, list) else shots),
                "delimiter": entry.get("continuation_delimiter", " "),
                "baseline": baselines.get(label, 0.0),
            }
        )
    return tasks


def load_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# -----------------------------------------------------------------------------
# Prompts: few-shot examples (each with its gold answer) separated by blank lines, then the item.


def render_prompts(item: dict, task_type: str, delim: str, fewshot: list[dict]) -> list[str]:
    """The full texts to score: one per choice (multiple_choice, schema); for language_modeling
    two, the context alone and the context with its continuation."""
    if task_type == "multiple_choice":
        shots = "".join(f"{ex['query']}{delim}{ex['choices'][ex['gold']]}\n\n" for ex in fewshot)
        return [f"{shots}{item['query']}{delim}{choice}" for choice in item["choices"]]
    if task_type == "schema":
        shots = "".join(
            f"{ex['context_options'][ex['gold']]}{delim}{ex['continuation']}\n\n" for ex in fewshot
        )
        return [f"{shots}{ctx}{delim}{item['continuation']}" for ctx in item["context_options"]]
    shots = "".join(f"{ex['context'].strip()}{delim}{ex['continuation']}\n\n" for ex in fewshot)
    context = f"{shots}{item['context'].strip()}{delim}"
    return [context, context + item["continuation"]]


def _common_prefix(seqs: list[list[int]]) -> int:
    n = min(len(s) for s in seqs)
    for i in range(n):
        if any(s[i] != seqs[0][i] for s in seqs):
            return i
    return n


def _common_suffix(seqs: list[list[int]]) -> int:
    return _common_prefix([s[::-1] for s in seqs])


def continuation_spans(seqs: list[list[int]], task_type: str) -> list[tuple[int, int]]:
    """[start, end) of the scored tokens in each sequence.

    The shared part is found on the token ids, not the strings, so a BPE merge across the
    question/answer boundary cannot shift the span.
    """
    if task_type == "multiple_choice":
        start = _common_prefix(seqs)
        return [(start, len(s)) for s in seqs]
    if task_type == "schema":
        suffix = _common_suffix(seqs)
        return [(len(s) - suffix, len(s)) for s in seqs]
    start = _common_prefix(seqs)  # language_modeling: score only the sequence with the continuation
    return [(start, len(seqs[1]))]


# -----------------------------------------------------------------------------
# Scoring


@torch.no_grad()
def evaluate_example(
    model, tokenizer, item: dict, task_type: str, delim: str, fewshot: list[dict], device
) -> bool:
    prompts = render_prompts(item, task_type, delim, fewshot)
    bos = tokenizer.get_bos_token_id()
    seqs = tokenizer.encode(prompts, prepend=bos)
    spans = continuation_spans(seqs, task_type)
    if task_type == "language_modeling":
        seqs = seqs[1:]
    max_len = getattr(getattr(model, "config", None), "sequence_len", None)
    if max_len is not None:  # keep the end (the part being scored); drop the oldest few-shot text
        cropped = []
        for i, s in enumerate(seqs):
            cut = max(0, len(s) - max_len)
            cropped.append(s[cut:])
            spans[i] = (max(1, spans[i][0] - cut), spans[i][1] - cut)
        seqs = cropped
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), bos, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    ids = ids.to(device)
    logits = model(ids)  # [N, width, V]; right padding never influences earlier positions (causal)
    losses = torch.nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2).float(), ids[:, 1:], reduction="none"
    )  # losses[i, t] = loss of token t+1
    preds = logits[:, :-1].argmax(dim=-1)
    if task_type == "language_modeling":
        start, end = spans[0]
        return bool((preds[0, start - 1 : end - 1] == ids[0, start:end]).all())
    mean_losses = [losses[i, start - 1 : end - 1].mean().item() for i, (start, end) in enumerate(spans)]
    return mean_losses.index(min(mean_losses)) == item["gold"]


def evaluate_task(
    model, tokenizer, data: list[dict], task: dict, device, max_examples: int | None = None
) -> float:
    """Accuracy on one task; items are split across ranks and the counts summed."""
    if max_examples is not None and len(data) > max_examples:
        data = random.Random(1337).sample(data, max_examples)  # a fixed subset, same on every rank
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    rank = dist.get_rank() if world > 1 else 0
    correct = torch.zeros(2, dtype=torch.long)
    for idx in range(rank, len(data), world):
        fewshot = []
        if task["num_fewshot"] > 0:
            # k distinct other items: sample from the n-1 indices that skip idx (no O(n) list per item)
            k = min(task["num_fewshot"], len(data) - 1)
            picks = random.Random(FEWSHOT_SEED + idx).sample(range(len(data) - 1), k)
            fewshot = [data[i + (i >= idx)] for i in picks]
        ok = evaluate_example(model, tokenizer, data[idx], task["type"], task["delimiter"], fewshot, device)
        correct += torch.tensor([int(ok), 1])
    if world > 1:
        correct = correct.to(device)
        dist.all_reduce(correct)
        correct = correct.cpu()
    return correct[0].item() / max(1, correct[1].item())


def centered(accuracy: float, baseline: float) -> float:
    """Rescale so the random baseline scores 0 and a perfect model 1."""
    return (accuracy - baseline) / (1.0 - baseline)


def evaluate_core(
    model, tokenizer, device, bundle_dir: Path | None = None, max_per_task: int | None = None
) -> dict:
    """{"results": {label: accuracy}, "centered": {label: centered accuracy}, "CORE": mean centered}."""
    bundle_dir = bundle_dir or get_eval_bundle()
    results, centered_results = {}, {}
    for task in load_tasks(bundle_dir):
        if not task["data"].is_file():
            raise UserError(
                f"eval bundle is missing {task['data']}; delete {bundle_dir} to download it again"
            )
        acc = evaluate_task(model, tokenizer, load_jsonl(task["data"]), task, device, max_per_task)
        results[task["label"]] = acc
        centered_results[task["label"]] = centered(acc, task["baseline"])
    core = sum(centered_results.values()) / max(1, len(centered_results))
    return {"results": results, "centered": centered_results, "CORE": core}
