"""base_train --attention dense|window|mega and MegaPrediction: the default stays the vanilla GPT bit for bit,
window and mega learn, a checkpoint reloads under its own mode with no flags (base_train's eval, base_loss and
mc_eval agree), MegaPrediction's heads learn, and bad flag combinations are one-line errors.

Training runs in-process through the scripts' own entry point (run_main(main)) on test_base_train's tiny
byte-level corpus: T = 32, so mega uses K = 4, W = 8 (two node levels) to have nodes at all.
"""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch
from test_base_train import COMMON, T, make_corpus, read_log

from megacontext.attention_modes import (
    AttentionConfig,
    AttentionModel,
    attention_config_from_args,
    attention_model,
    node_cos,
)
from megacontext.mega_attention import build_mega_layout
from nanochat.checkpoint_manager import build_model, load_mc_state, resolve_checkpoint
from nanochat.common import run_main
from nanochat.gpt import GPT, GPTConfig

SHORT = [*COMMON, "--save-every", "-1", "--sample-every", "-1"]
# MegaPrediction is off by default; the shared run switches it on to check what it logs
MEGA = ["--attention", "mega", "--mega-window", "8", "--mega-block-size", "4", "--mp-alpha1", "0.02,0.05",
        "--mp-alpha2", "0.01,0.03"]  # fmt: skip
WINDOW = ["--attention", "window", "--mega-window", "8"]


def train(base, monkeypatch, tag: str, *extra: str) -> tuple[dict, dict]:
    """Run base_train in-process; (train loss by step, val bpb by step) from its JSON log."""
    from scripts import base_train

    log = base / f"{tag}.jsonl"
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    monkeypatch.setattr(
        sys, "argv", ["base_train", *SHORT, "--model-tag", tag, "--log-json", str(log), *extra]
    )
    run_main(base_train.main)
    return read_log(log)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    base = tmp_path_factory.mktemp("attn")
    make_corpus(base)
    return base


@pytest.fixture(scope="module")
def mega_run(base):
    with pytest.MonkeyPatch.context() as mp:
        return train(base, mp, "mega", *MEGA)


def test_default_is_the_vanilla_gpt(base, mega_run, monkeypatch):
    """No flag and --attention dense give the same losses and weights bit for bit, and so do window and mega
    when their window covers the whole sequence (no mask, no node: the GPT runs as is). The checkpoint of a
    dense run holds the GPT alone. Each objective brings its own data schedule and token-shift width, so the
    runs name them; a mega run's own default width is the one its recipe was measured with (1)."""
    runs = {
        "none": (),
        "dense": ("--attention", "dense"),
        "wide-window": ("--attention", "window", "--mega-window", str(T)),
        "wide-mega": ("--attention", "mega", "--mega-window", str(T)),
    }
    same_rows = ("--copy-warmup-steps", "2", "--longctx-frac", "0", "--smear-width", "4")
    logs = {tag: train(base, monkeypatch, tag, *args, *same_rows) for tag, args in runs.items()}
    for tag in runs:
        assert logs[tag] == logs["none"], tag  # == on floats: bit for bit
    ref = torch.load(base / "base_checkpoints/none/model_000006.pt", weights_only=True)
    dense = torch.load(base / "base_checkpoints/dense/model_000006.pt", weights_only=True)
    assert set(ref) == {"model"} and all(
        torch.equal(ref["model"][k], dense["model"][k]) for k in ref["model"]
    )
    meta = json.loads((base / "base_checkpoints/none/meta_000006.json").read_text())
    assert meta["attention"]["mode"] == "dense"
    default = json.loads(
        (base / "base_checkpoints/mega/meta_000006.json").read_text()
    )  # (the mega_run fixture)
    assert default["model_config"]["smear_width"] == 4  # one default for every objective


def test_window_and_mega_learn_and_log(base, mega_run, monkeypatch, capsys):
    losses, bpb = train(base, monkeypatch, "window", *WINDOW)
    assert losses[5] < losses[0] - 1.0 and bpb[6] < bpb[0]
    losses, bpb = mega_run
    assert losses[5] < losses[0] - 1.0 and bpb[6] < bpb[0]
    records = [json.loads(line) for line in (base / "mega.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "loss" in r]
    assert all({"mp/lod1_cos", "mp/lod2_cos", "mp/loss", "mp/node_cos"} <= set(r) for r in train_records)
    assert all(-1 <= r["mp/node_cos"] <= 1 for r in train_records)
    assert train_records[-1]["mp/lod1_cos"] > train_records[0]["mp/lod1_cos"]
    assert any("mp/lod1_dnll" in r for r in records if "val_bpb" in r)  # ΔNLL at evaluation
    meta = json.loads((base / "base_checkpoints/mega/meta_000006.json").read_text())
    assert meta["attention"] | {"mp_alpha1": None, "mp_alpha2": None} == {
        "mode": "mega", "window": 8, "block_size": 4, "levels": 2, "gistnet_layers": 2, "gistnet_heads": 4,
        "mp_alpha1": None, "mp_alpha2": None, "zoom_k": 4, "zoom_frame": "chunk",
    }  # fmt: skip
    assert set(load_mc_state(base / "base_checkpoints/mega", 6, "cpu")) == {"mega_gistnet", "mega_prediction"}


def test_checkpoint_reloads_under_its_mode_with_no_flags(base, mega_run, monkeypatch, capsys):
    """base_loss (no attention flag) reproduces the training run's final val bpb; the plain GPT would not."""
    from scripts import base_loss

    _, bpb = mega_run
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    capsys.readouterr()
    argv = ["base_loss", "--model-tag", "mega", "--split-tokens", str(4 * T), "--device-batch-size", "2"]
    monkeypatch.setattr(
        sys, "argv", [*argv, "--dtype", "float32", "--device-type", "cpu", "--view-rows", "1"]
    )
    run_main(base_loss.main)
    out = capsys.readouterr().out
    val = float(next(s for s in out.splitlines() if s.startswith("val bpb:")).split()[-1])
    assert "attention: mega" in out
    assert val == pytest.approx(bpb[6], abs=1e-5)
    # the same weights under plain causal attention score differently: the mode is what base_loss ran
    ckpt_dir, step = resolve_checkpoint("base", "mega", None)
    gpt, _, meta = build_model(ckpt_dir, step, "cpu")
    model = attention_model(gpt, ckpt_dir, step, meta, "cpu")
    x = torch.randint(0, gpt.config.vocab_size, (1, 3 * T))
    assert isinstance(model, AttentionModel) and model.layout(3 * T).levels == 2
    assert not torch.allclose(model(x), gpt(x), atol=1e-4)
    torch.testing.assert_close(model(x[:, :9]), gpt(x[:, :9]), rtol=0, atol=0)  # within W + K: same


def test_mc_eval_full_view_runs_the_checkpoint_mode(base, mega_run, monkeypatch, capsys):
    """mc_eval loads the checkpoint's mode, and the `full` view (views.horizon_logits) scores with it."""
    from megacontext.config import MCConfig
    from megacontext.views import horizon_logits
    from scripts import mc_eval

    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    argv = ["mc_eval", "--task", "passkey", "--n", "1", "--distances", "1", "--wc-budget", "16"]
    monkeypatch.setattr(
        sys, "argv", [*argv, "--model-tag", "mega", "--views", "full", "--device-type", "cpu"]
    )
    run_main(mc_eval.main)
    assert "attention: mega W=8 K=4 levels=2" in capsys.readouterr().out
    ckpt_dir, step = resolve_checkpoint("base", "mega", None)
    gpt, _, meta = build_model(ckpt_dir, step, "cpu")
    model = attention_model(gpt, ckpt_dir, step, meta, "cpu")
    ids = torch.randint(0, gpt.config.vocab_size, (4 * T,)).tolist()
    logits, _ = horizon_logits("full", ids, 4, model, None, None, MCConfig(), "cpu")
    torch.testing.assert_close(logits, model(torch.tensor([ids[:-1]]))[0, -4:])
    assert not torch.allclose(logits, gpt(torch.tensor([ids[:-1]]))[0, -4:], atol=1e-4)


def test_resume_refuses_another_mode(base, mega_run, monkeypatch, capsys):
    from scripts import base_train

    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    argv = [*SHORT, "--model-tag", "mega", "--resume-from-step", "6", *WINDOW]
    monkeypatch.setattr(sys, "argv", ["base_train", *argv])
    with pytest.raises(SystemExit) as exc:
        run_main(base_train.main)
    err = capsys.readouterr().err
    assert (
        exc.value.code == 2
        and err.startswith("error: checkpoint attention (mega W=8")
        and err.count("\n") == 1
    )


def test_defaults_are_the_recipe_and_old_meta_loads_as_trained():
    """W and K follow the training length (scale: W 32, K 16 at T 256), MegaPrediction is off, the zoom on. Meta
    from before the zoom (no key) loads with top-k 0, as trained; meta from before the sink was removed loads when
    it had none and is refused with one line when it had one."""
    import argparse

    from megacontext.attention_modes import ZOOM_K, add_attention_args
    from nanochat.common import UserError

    parser = argparse.ArgumentParser()
    add_attention_args(parser)
    parse = lambda T, *argv: attention_config_from_args(parser.parse_args(argv), T)
    cfg = parse(256, "--attention", "mega")
    assert (cfg.window, cfg.block_size, cfg.levels, cfg.zoom_k) == (32, 16, 1, ZOOM_K) and not cfg.prediction
    assert (
        parse(256, "--attention", "window").window == 32 and parse(256, "--attention", "window").zoom_k == 0
    )
    assert (parse(2048, "--attention", "mega").window, parse(2048, "--attention", "mega").block_size) == (
        256,
        32,
    )
    assert parse(256, "--attention", "mega", "--mega-zoom-k", "0").zoom_k == 0
    assert parse(256, "--attention", "mega", "--mp-alpha1", "0.02,0.05").prediction
    assert AttentionConfig.from_dict(cfg.to_dict()) == cfg
    old = {"mode": "mega", "window": 8, "block_size": 4, "levels": 2, "mp_alpha1": [0.02, 0.05]}
    assert AttentionConfig.from_dict(old).zoom_k == 0
    assert AttentionConfig.from_dict(old).zoom_frame == "chunk"  # no zoom: nothing to refuse
    with pytest.raises(UserError, match=r"'real' frame, which this version removed .*retrain"):
        AttentionConfig.from_dict(old | {"zoom_k": 4})  # a zoom trained before the chunk frame
    assert AttentionConfig.from_dict(old | {"sink": False}) == AttentionConfig.from_dict(old)
    with pytest.raises(UserError, match=r"sink=True, a setting this version removed .*retrain") as e:
        AttentionConfig.from_dict(old | {"sink": True})
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="unknown attention config keys"):
        AttentionConfig.from_dict(old | {"gist_sink": 1})


def test_node_cos_measures_collapse():
    same = torch.randn(1, 1, 16).expand(2, 5, 16)
    assert node_cos(same) == pytest.approx(1.0, abs=1e-6)
    assert node_cos(torch.eye(8)[None].repeat(3, 1, 1)) == pytest.approx(0.0, abs=1e-7)
    pair = torch.tensor([[[1.0, 0.0], [-2.0, 0.0]]])
    assert node_cos(pair) == pytest.approx(-1.0)
    many = torch.randn(2, 1000, 32, generator=torch.Generator().manual_seed(0))
    assert abs(node_cos(many)) < 0.05 and abs(node_cos(many + 10)) > 0.9  # a shared offset: collapse
    long = many[:, :300]  # a long row: evenly spaced nodes stand in for all of them
    assert node_cos(long, max_nodes=7) == node_cos(long[:, torch.linspace(0, 299, 7).long()])


def tiny_mega(N: int = 64):
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(sequence_len=N, vocab_size=97, n_layer=2, n_head=2, n_kv_head=2, n_embd=64))
    gpt.init_weights()
    cfg = AttentionConfig(
        mode="mega", window=8, block_size=4, levels=2, mp_alpha1=(0.02, 0.05), mp_alpha2=(0.01, 0.03)
    )
    return gpt, AttentionModel(gpt, cfg), torch.randint(0, 97, (2, N + 1))


def test_mega_prediction_gets_gradients_and_learns():
    gpt, model, row = tiny_mega()
    x, y = row[:, :-1], row[:, 1:]
    _, aux, metrics = model.train_loss(x, y, progress=0.0)
    assert {"mp/lod1_cos", "mp/lod2_cos", "mp/node_cos"} <= set(metrics)
    aux.backward()
    for head in model.predictor.heads:  # both levels; the residual head's output projection moves first
        assert head.proj.weight.grad is not None and head.proj.weight.grad.abs().sum() > 0
    assert gpt.blocks[0].attn.c_proj.weight.grad.abs().sum() > 0  # the GPT learns through the node states
    # GistNet learns through the nodes it feeds the GPT, never through the targets (no_grad)
    assert any(p.grad is not None for p in model.gistnet.parameters())
    model.zero_grad(set_to_none=True)
    _, lay, nodes, hidden = model.run(x, y, capture=True)
    sum((1 - c).sum() for c in model.predictor.cosines(hidden.detach(), nodes, lay).values()).backward()
    assert all(p.grad is None for p in model.gistnet.parameters())
    # on a fixed batch, MegaPrediction's loss alone pushes the agreement up at both levels
    opt = torch.optim.Adam(model.predictor.parameters(), lr=3e-3)
    first = None
    for _ in range(40):
        opt.zero_grad()
        _, aux, metrics = model.train_loss(x, y, progress=1.0)
        aux.backward()
        opt.step()
        first = first or metrics
    for lv in (1, 2):
        assert metrics[f"mp/lod{lv}_cos"] > first[f"mp/lod{lv}_cos"] + 0.05, (first, metrics)
    dnll = model.mp_delta_nll(x, y)
    assert set(dnll) == {"mp/lod1_dnll", "mp/lod2_dnll"} and all(map(math.isfinite, dnll.values()))


@pytest.mark.parametrize("width", [1, 3])
@pytest.mark.parametrize("mode", ["mega", "window"])
def test_smear_under_mega_and_window_is_causal_and_zero_is_exact(mode, width):
    """GPTConfig.smear shifts raw tokens only: a node never takes the packed slot before it (the last raw
    token, or a node of a later span), so no position reads a future token; smear 0 = no smear exactly."""
    torch.manual_seed(0)
    N = 64
    plain = GPT(GPTConfig(sequence_len=N, vocab_size=97, n_layer=2, n_head=2, n_kv_head=2, n_embd=64))
    plain.init_weights()
    smeared = GPT(GPTConfig(N, 97, 2, 2, 2, 64, smear=True, smear_width=width))
    zeros = {"smear": torch.zeros(64)} | ({"smear_back": torch.zeros(width - 1, 64)} if width > 1 else {})
    smeared.load_state_dict(plain.state_dict() | zeros)
    cfg = AttentionConfig(mode=mode, window=8, block_size=4, levels=2)
    a, b = AttentionModel(plain, cfg), AttentionModel(smeared, cfg)
    b.load_state_dict(a.state_dict() | {f"gpt.{k}": v for k, v in zeros.items()})
    x = torch.randint(0, 97, (1, N))
    with torch.no_grad():
        torch.testing.assert_close(b(x), a(x), rtol=0, atol=0)
        torch.nn.init.normal_(smeared.smear, std=1.0)
        for p in smeared.parameters():  # the init zeroes output projections: make every layer matter
            if p.dim() == 2:
                torch.nn.init.normal_(p, std=0.3)
        ref = b(x)
        for j in (5, 30, 47, 63):
            y = x.clone()
            y[0, j] = (y[0, j] + 1) % 97
            out = b(y)
            torch.testing.assert_close(out[:, :j], ref[:, :j], rtol=0, atol=1e-5)
            assert not torch.allclose(out[:, j:], ref[:, j:])


def test_mega_loss_covers_raw_positions_only():
    """Per-position losses are the raw positions' (flat [B * N] as the vanilla forward), logits too."""
    _, model, row = tiny_mega()
    x, y = row[:, :-1], row[:, 1:]
    assert model.layout(64) == build_mega_layout(64, 4, 8, 2)
    with torch.no_grad():
        per_pos, mean = model(x, y, loss_reduction="none"), model(x, y)
    assert per_pos.shape == (2 * 64,)
    assert float(per_pos.mean()) == pytest.approx(float(mean), abs=1e-5)
    assert model(x).shape == (2, 64, 97)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--attention", "mega", "--mc"], "error: --attention mega cannot be combined with --mc"),
        (["--attention", "window", "--mc"], "error: --attention window cannot be combined with --mc"),
        (["--mega-window", "64"], "error: --mega-window does not apply to --attention dense"),
        (
            ["--attention", "window", "--mp-alpha1", "0.1"],
            "error: --mp-alpha1 does not apply to --attention window",
        ),
        (["--attention", "window", "--mega-block-size", "8"], "error: --mega-block-size does not apply"),
        (["--attention", "mega", "--mp-alpha2", "x"], "error: --mp-alpha2 takes START[,END]"),
        (["--attention", "mega", "--mp-alpha1", "0.1,-1"], "error: --mp-alpha1 takes START[,END]"),
        (["--attention", "mega", "--mega-window", "0"], "error: --mega-window must be >= 1"),
        (["--attention", "mega", "--mega-block-size", "1"], "error: --mega-block-size must be >= 2"),
        (
            ["--attention", "window", "--mega-zoom-k", "2"],
            "error: --mega-zoom-k does not apply to --attention window",
        ),
        (["--attention", "mega", "--mega-zoom-k", "-1"], "error: --mega-zoom-k must be >= 0"),
    ],
)
def test_bad_flag_combinations_are_one_line_errors(base, monkeypatch, capsys, args, message):
    from scripts import base_train

    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    monkeypatch.setattr(sys, "argv", ["base_train", *SHORT, *args])
    with pytest.raises(SystemExit) as exc:
        run_main(base_train.main)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith(message) and err.count("\n") == 1, err
