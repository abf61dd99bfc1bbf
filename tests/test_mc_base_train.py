"""base_train --mc end to end: DDP agrees with one process, checkpoints carry the MC nets and config, the
long-context evaluation loads them with no flags."""

from __future__ import annotations

import json
import subprocess
import sys

import torch
from test_base_train import COMMON, REPO, make_corpus, read_log, run

from megacontext.config import MCConfig, build_nets
from nanochat.checkpoint_manager import build_model, load_mc_state, resolve_checkpoint

# the recipe at a tiny geometry: the two scale flags; no copy warm-up, so every step is an MC step
MC = [
    "--mc",
    "--mc-block-size",
    "4",
    "--mc-wc-budget",
    "24",
    "--mc-eval-rows",
    "2",
    "--copy-warmup-steps",
    "0",
]


def test_mc_torchrun_two_ranks_match_one_process(tmp_path):
    base = tmp_path / "nc"
    make_corpus(base)
    short = [
        *COMMON,
        "--num-iterations",
        "2",
        "--save-every",
        "-1",
        "--sample-every",
        "-1",
        "--eval-every",
        "-1",
    ]
    run(base, [*short, *MC, "--model-tag", "one", "--log-json", str(tmp_path / "one.jsonl")])
    run(base, [*short, *MC, "--model-tag", "two", "--log-json", str(tmp_path / "two.jsonl")], nproc=2)
    one, _ = read_log(tmp_path / "one.jsonl")
    two, _ = read_log(tmp_path / "two.jsonl")
    assert abs(one[0] - two[0]) < 1e-4, (one, two)


def test_mc_checkpoint_round_trips_and_needs_no_flags(tmp_path, monkeypatch):
    base = tmp_path / "nc"
    make_corpus(base)
    out = run(base, [*COMMON, *MC, "--model-tag", "mc", "--log-json", str(tmp_path / "mc.jsonl")])
    records = [json.loads(line) for line in (tmp_path / "mc.jsonl").read_text().splitlines()]
    train = [r for r in records if "mc/token_loss" in r]
    assert train and all("mc/lens_rank_agreement" in r and "mc/time_controller_ms" in r for r in train)
    views = [r for r in records if "bpb/mc-lens" in r]
    assert views and {"bpb/window", "bpb/mc-nolens", "bpb/mc-attn", "dnll/mc-lens"} <= set(views[-1])
    assert "token_loss" in out.stdout  # the mc/* metrics are on the step log line
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    ckpt_dir, step = resolve_checkpoint("base", "mc", None)
    model, _, meta = build_model(ckpt_dir, step, "cpu", phase="eval")
    cfg = MCConfig.from_dict(meta["mc"])
    assert (cfg.block_size, cfg.wc_budget, cfg.recent, cfg.horizon) == (4, 24, 6, 2)
    gistnet, lensnet = build_nets(cfg, model.config.n_embd)
    state = load_mc_state(ckpt_dir, step, "cpu")
    gistnet.load_state_dict(state["gistnet"])  # strict: every parameter is in the checkpoint
    lensnet.load_state_dict(state["lensnet"])
    fresh, _ = build_nets(cfg, model.config.n_embd)
    trained = dict(gistnet.named_parameters())
    assert any(not torch.equal(p, trained[n]) for n, p in fresh.named_parameters())  # it was trained
    # the long-context suite loads the nets from the checkpoint alone
    env = {"NANOCHAT_BASE_DIR": str(base), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    res = subprocess.run(
        [sys.executable, "-m", "scripts.mc_eval", "--task", "passkey", "--n", "2", "--distances", "1,4",
         "--model-tag", "mc", "--device-type", "cpu"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    lines = [json.loads(x) for x in res.stdout.splitlines() if x.startswith("{")]
    assert lines[0]["task"].startswith("passkey") and lines[0]["wc_budget"] == 24
    got = {(r["view"], r["distance_x"]) for r in lines[0]["results"]}
    assert ("mc-lens", 4) in got and ("window", 1) in got
    assert not any(v == "mc-attn" for v, _ in got)  # the costly diagnostic runs only when named
    # every view that ran reports the answer's absolute NLL next to its ΔNLL vs full
    ran = [r for r in lines[0]["results"] if r["n"]]
    assert all(r["nll"] > 0 for r in ran)
    full = {r["distance_x"]: r["nll"] for r in ran if r["view"] == "full"}
    assert all(
        abs(r["dnll"] - (r["nll"] - full[r["distance_x"]])) < 1e-9 for r in ran if r["dnll"] is not None
    )
    assert "| task | view |" in res.stdout
    # base_loss prints bpb and ΔNLL@H under the five views, MC nets loaded from the checkpoint alone
    res = subprocess.run(
        [sys.executable, "-m", "scripts.base_loss", "--model-tag", "mc", "--split-tokens", "128",
         "--device-batch-size", "2", "--device-type", "cpu", "--dtype", "float32", "--max-new-tokens", "2"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    for view in ("full", "window", "mc-nolens", "mc-attn", "mc-lens"):
        assert f"| {view} | " in res.stdout


def test_bench_train_mc_reports_the_ratio_and_controller_time():
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    res = subprocess.run(
        [sys.executable, "-m", "scripts.bench_train", "--mc", "--depth", "1", "--steps", "1",
         "--warmup-steps", "1", "--device-batch-size", "1", "--vocab-size", "512", "--decode-tokens", "4",
         "--device-type", "cpu", "--dtype", "float32"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["mc_vs_vanilla_tokens_per_s"] > 0 and out["mc_time_controller_ms"] > 0
    assert out["mc_gpt_positions_per_token"] > 1  # N+2 working contexts per row actually ran
    ratio, per_token = out["mc_vs_vanilla_tokens_per_s"], out["mc_gpt_positions_per_token"]
    assert abs(out["mc_efficiency"] - ratio * per_token) < 2e-3
    # dispatched ops of one forward + backward at 1 row and at the device batch, MC and vanilla; no host sync
    assert set(out["mc_aten_ops_per_step"]) == set(out["aten_ops_per_step"]) == {"1"}
    assert out["mc_aten_ops_per_step"]["1"] > out["aten_ops_per_step"]["1"] > 100
    assert out["mc_host_syncs_per_step"] == 0


def test_copy_warmup_with_smear_trains_the_plain_gpt_then_mc(tmp_path, monkeypatch):
    """The warm-up steps (short copy rows) run the plain GPT, the later ones the MC step; the smear (on by
    default) is saved."""
    base = tmp_path / "nc"
    make_corpus(base)
    flags = [
        *COMMON,
        *MC,
        "--num-iterations",
        "4",
        "--copy-warmup-steps",
        "2",
        "--eval-every",
        "-1",
    ]
    run(base, [*flags, "--model-tag", "sw", "--log-json", str(tmp_path / "sw.jsonl")])
    records = [json.loads(line) for line in (tmp_path / "sw.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r and "step" in r]
    assert [("mc/token_loss" in r) for r in steps] == [False, False, True, True], steps
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    model, _, _ = build_model(*resolve_checkpoint("base", "sw", None), "cpu", phase="eval")
    assert model.config.smear and model.smear.abs().sum() > 0  # trained, and loaded with no flag
    assert model.config.smear_width == 4 and model.smear_back.abs().sum() > 0  # the recipe's width


def test_mc_eval_rejects_a_negative_threshold_in_one_line():
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    res = subprocess.run(
        [sys.executable, "-m", "scripts.mc_eval", "--tau-collapse", "-0.5"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert res.returncode == 2 and res.stderr.strip() == "error: --tau-collapse must be >= 0, got -0.5"
