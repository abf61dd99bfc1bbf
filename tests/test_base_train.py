"""base_train end to end on a tiny corpus: DDP equals one process, resume equals no interruption.

A step of 4 rows takes row j from lane j (nanochat.dataloader), whatever the number of ranks, so one
process with 2 accumulation micro-steps and two ranks with one each see the same rows per optimizer
step, hence the same losses. The corpus: a byte-level tokenizer (no merges, one token per character),
one document of 2T-1 characters per row group (a row group is then 2T tokens with its BOS).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from nanochat.common import UserError
from nanochat.tokenizer import MIN_VOCAB_SIZE, Tokenizer

REPO = Path(__file__).resolve().parents[1]
T, B = 32, 2
WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly box jolly jugs of milk".split()
COMMON = [
    "--depth", "2", "--max-seq-len", str(T), "--device-batch-size", str(B), "--total-batch-size", str(4 * T),
    "--num-iterations", "6", "--eval-every", "3", "--eval-tokens", str(4 * T), "--sample-every", "3",
    "--save-every", "3", "--dtype", "float32", "--device-type", "cpu",
]  # fmt: skip


def make_corpus(base: Path, train_docs: int = 40, val_docs: int = 8) -> None:
    rng = random.Random(0)

    def doc() -> str:
        text = ""
        while len(text) < 2 * T:
            text += rng.choice(WORDS) + " "
        return text[: 2 * T - 1]

    (base / "base_data").mkdir(parents=True)
    for i, n in enumerate([train_docs, val_docs]):
        table = pa.table({"text": [doc() for _ in range(n)]})
        pq.write_table(table, base / "base_data" / f"shard_{i:05d}.parquet", row_group_size=1)
    tok = Tokenizer.train_from_iterator([doc() for _ in range(20)], MIN_VOCAB_SIZE)  # bytes only
    tok.save(base / "tokenizer")
    assert len(tok.encode(doc(), prepend="<|bos|>")) == B * T


def run(base: Path, args: list[str], nproc: int = 1) -> subprocess.CompletedProcess:
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base), "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    out = subprocess.run(
        [*launcher, "-m", "scripts.base_train", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    return out


def read_log(path: Path) -> tuple[dict[int, float], dict[int, float]]:
    """(train loss by step, val bpb by step) from a --log-json file."""
    losses, bpb = {}, {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            losses[record["step"]] = record["loss"]
        if "val_bpb" in record:
            bpb[record["step"]] = record["val_bpb"]
    return losses, bpb


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One uninterrupted single-process run (tag a) that saved at steps 3 and 6."""
    base = tmp_path_factory.mktemp("nanochat")
    make_corpus(base)
    out = run(base, [*COMMON, "--model-tag", "a", "--log-json", str(base / "a.jsonl")])
    return base, out


def test_single_process_run_learns_logs_and_checkpoints(trained):
    base, out = trained
    losses, bpb = read_log(base / "a.jsonl")
    assert sorted(losses) == list(range(6)) and sorted(bpb) == [0, 3, 6]
    assert losses[5] < losses[0] - 1.0  # it learns the tiny corpus
    assert bpb[6] < bpb[0]
    assert "grad accumulation: 2 micro-steps" in out.stdout
    assert "sample:" in out.stdout
    line = next(s for s in out.stdout.splitlines() if s.startswith("step 00005/00006"))
    for field in ("loss", "(raw", "lrm", "dt", "tok/s", "mfu"):
        assert field in line
    ckpt = base / "base_checkpoints" / "a"
    assert {p.name for p in ckpt.iterdir()} == {
        f"{kind}_{s:06d}{ext}"
        for s in (3, 6)
        for kind, ext in [("model", ".pt"), ("meta", ".json"), ("optim", ".pt")]
    }
    meta = json.loads((ckpt / "meta_000006.json").read_text())
    assert (
        meta["step"] == 6
        and meta["model_config"]["n_layer"] == 2
        and meta["model_config"]["vocab_size"] == 265
    )
    assert meta["user_config"]["total_batch_size"] == 4 * T and len(meta["loader_state"]["lanes"]) == 4
    (report_file,) = (base / "report").glob("base-model-training-*.md")
    report = report_file.read_text()
    assert "- val_bpb: " in report and "- parameters: " in report


def test_torchrun_two_ranks_match_one_process(trained):
    base, _ = trained
    out = run(base, [*COMMON, "--model-tag", "ddp", "--log-json", str(base / "ddp.jsonl")], nproc=2)
    assert "grad accumulation: 1 micro-steps" in out.stdout
    single_loss, single_bpb = read_log(base / "a.jsonl")
    ddp_loss, ddp_bpb = read_log(base / "ddp.jsonl")
    assert sorted(ddp_loss) == sorted(single_loss)
    for step in single_loss:
        assert ddp_loss[step] == pytest.approx(single_loss[step], abs=1e-4)
    for step in single_bpb:
        assert ddp_bpb[step] == pytest.approx(single_bpb[step], abs=1e-4)
    ckpt = base / "base_checkpoints" / "ddp"
    # one optimizer file (the state is replicated), and the same loader state as the single process's
    assert (ckpt / "optim_000006.pt").is_file() and not list(ckpt.glob("optim_*_rank*.pt"))
    meta = json.loads((ckpt / "meta_000006.json").read_text())
    single = json.loads((base / "base_checkpoints" / "a" / "meta_000006.json").read_text())
    assert meta["loader_state"] == single["loader_state"] and meta["ranks"] == 2


def test_resume_continues_exactly(trained):
    """A run stopped after its step-3 checkpoint and resumed gives the uninterrupted run's losses.

    The stopped run's directory is the step-3 files alone (as if the process died right after
    committing step 3); the resumed run must reproduce steps 3..5, the final bpb and the final weights.
    """
    base, _ = trained
    src, dst = base / "base_checkpoints" / "a", base / "base_checkpoints" / "b"
    dst.mkdir()
    for path in src.glob("*_000003*"):
        shutil.copy(path, dst / path.name)
    out = run(
        base, [*COMMON, "--model-tag", "b", "--resume-from-step", "3", "--log-json", str(base / "b.jsonl")]
    )
    assert "resumed from" in out.stdout
    full_loss, full_bpb = read_log(base / "a.jsonl")
    resumed_loss, resumed_bpb = read_log(base / "b.jsonl")
    assert sorted(resumed_loss) == [3, 4, 5]
    for step in (3, 4, 5):
        assert resumed_loss[step] == pytest.approx(full_loss[step], abs=1e-6)
    assert resumed_bpb[6] == pytest.approx(full_bpb[6], abs=1e-6)
    full = torch.load(src / "model_000006.pt", weights_only=True)["model"]
    resumed = torch.load(dst / "model_000006.pt", weights_only=True)["model"]
    for key in full:
        torch.testing.assert_close(resumed[key], full[key], rtol=0, atol=1e-6)


def test_resume_with_dtype_auto_continues_in_the_checkpoints_dtype(trained):
    """--dtype auto on resume keeps the dtype the checkpoint was trained in (float32 here), whatever the CPU
    probe would pick today (bf16 on a machine with fast bf16 matmuls): the run stays exact."""
    base, _ = trained
    src, dst = base / "base_checkpoints" / "a", base / "base_checkpoints" / "c"
    dst.mkdir()
    for path in src.glob("*_000003*"):
        shutil.copy(path, dst / path.name)
    auto = ["auto" if a == "float32" else a for a in COMMON]
    out = run(
        base, [*auto, "--model-tag", "c", "--resume-from-step", "3", "--log-json", str(base / "c.jsonl")]
    )
    assert "-> bfloat16" not in out.stdout or "resuming in float32" in out.stdout
    full_loss, _ = read_log(base / "a.jsonl")
    resumed_loss, _ = read_log(base / "c.jsonl")
    for step in (3, 4, 5):
        assert resumed_loss[step] == pytest.approx(full_loss[step], abs=1e-6)


def test_base_loss_reproduces_final_val_bpb(trained):
    base, _ = trained
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base), "OMP_NUM_THREADS": "1"}
    args = f"--model-tag a --split-tokens {4 * T} --device-batch-size {B} --dtype float32".split()
    out = subprocess.run(
        [sys.executable, "-m", "scripts.base_loss", *args, "--device-type", "cpu"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    _, bpb = read_log(base / "a.jsonl")
    val = float(next(s for s in out.stdout.splitlines() if s.startswith("val bpb:")).split()[-1])
    # the same val tokens and the same model as the training run's last evaluation
    assert val == pytest.approx(bpb[6], abs=1e-5)
    assert "- train_bpb: " in next((base / "report").glob("base-model-loss-*.md")).read_text()


def test_indivisible_batch_is_a_one_line_user_error(trained, monkeypatch, capsys):
    """The script's own entry point (run_main(main)), in-process to skip a Python start-up."""
    from nanochat.common import run_main
    from scripts import base_train

    base, _ = trained
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    monkeypatch.setattr(sys, "argv", ["base_train", *COMMON, "--total-batch-size", str(3 * T)])
    with pytest.raises(SystemExit) as exc:
        run_main(base_train.main)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --total-batch-size 96 must be a multiple of") and err.count("\n") == 1


def test_a_token_shift_of_no_width_is_a_one_line_user_error(trained, monkeypatch, capsys):
    from nanochat.common import run_main
    from scripts import base_train

    base, _ = trained
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    monkeypatch.setattr(sys, "argv", ["base_train", *COMMON, "--smear-width", "0"])
    with pytest.raises(SystemExit) as exc:
        run_main(base_train.main)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err == "error: --smear-width must be >= 1, got 0\n"


def test_bench_train_prints_one_json_line():
    args = "--depth 1 --max-seq-len 32 --device-batch-size 2 --vocab-size 512 --warmup-steps 1 --steps 2"
    args += " --decode-tokens 8 --dtype float32 --device-type cpu"
    out = subprocess.run(
        [sys.executable, "-m", "scripts.bench_train", *args.split()],
        cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert result["tokens_per_s"] > 0 and result["decode_tokens_per_s"] > 0
    assert result["mfu"] == pytest.approx(result["model_flops_per_s"] / result["peak_flops_per_s"])
    # model FLOPs are the FLOPs per token of the model that ran times the tokens that ran per second
    assert result["model_flops_per_s"] == pytest.approx(
        result["config"]["flops_per_token"] * result["tokens_per_s"], rel=1e-3
    )
    assert result["config"]["n_layer"] == 1 and result["config"]["dtype"] == "float32"


def test_cpu_dtype_probe(capsys):
    from nanochat.device import pick_dtype

    cpu = torch.device("cpu")
    assert pick_dtype(cpu, "float32") == torch.float32 and pick_dtype(cpu, "bfloat16") == torch.bfloat16
    choice = pick_dtype(cpu, "auto")
    assert choice in (torch.float32, torch.bfloat16)
    assert "cpu dtype probe: fp32" in capsys.readouterr().out
    with pytest.raises(UserError, match="--dtype must be auto, float32 or bfloat16"):
        pick_dtype(cpu, "fp16")


def test_a_torchrun_rank_skips_the_interpreter_teardown_once_its_work_is_done(monkeypatch):
    """Under torchrun (WORLD_SIZE > 1) run_main ends a finished rank with os._exit(0): torch's C++ teardown
    aborted a finished gloo rank now and then, failing the job. A failing main still raises; one process
    ends as usual."""
    from nanochat import common

    done, exits = [], []
    monkeypatch.setattr(common.os, "_exit", exits.append)
    monkeypatch.setenv("WORLD_SIZE", "2")
    common.run_main(lambda: done.append(1))
    assert done == [1] and exits == [0]

    def broken():
        raise ValueError("a bug")

    with pytest.raises(ValueError):
        common.run_main(broken)
    monkeypatch.setenv("WORLD_SIZE", "1")
    common.run_main(lambda: done.append(2))
    assert done == [1, 2] and exits == [0]
