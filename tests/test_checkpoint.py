"""Checkpoints: round trip, damaged files, wrong config/tokenizer, crash-safety, picking the latest."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nanochat.checkpoint_manager import (
    CheckpointError,
    build_model,
    find_last_step,
    load_checkpoint,
    load_mc_state,
    load_model,
    model_path,
    resolve_checkpoint,
    save_checkpoint,
    tokenizer_id,
)
from nanochat.common import UserError
from nanochat.gpt import GPT, GPTConfig
from nanochat.optim import setup_optimizers
from nanochat.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained_tokenizer():
    texts = [f"checkpoint {i} saves the model and the optimizer, step {i * 7}" for i in range(200)]
    return Tokenizer.train_from_iterator(texts, vocab_size=300)


@pytest.fixture
def base_dir(tmp_path, monkeypatch, trained_tokenizer):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    trained_tokenizer.save(tmp_path / "tokenizer")
    return tmp_path


def make_model(vocab_size: int, n_embd: int = 32, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(
        GPTConfig(sequence_len=16, vocab_size=vocab_size, n_layer=2, n_head=2, n_kv_head=2, n_embd=n_embd)
    )
    model.init_weights()
    return model


def train_a_step(model, optimizers):
    idx = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    model(idx[:, :-1], targets=idx[:, 1:]).backward()
    for opt in optimizers:
        opt.step()
    model.zero_grad(set_to_none=True)


def save_step(ckpt_dir, step, model, optimizers=None, mc_state=None, **meta_extra):
    meta = {"model_config": model.config.to_dict(), "tokenizer_id": tokenizer_id(), **meta_extra}
    states = [opt.state_dict() for opt in optimizers] if optimizers else None
    save_checkpoint(ckpt_dir, step, model.state_dict(), states, meta, mc_state=mc_state)


def assert_one_line(err: Exception, *fragments: str):
    msg = str(err)
    assert "\n" not in msg and msg
    for f in fragments:
        assert f in msg, msg


def test_round_trip_model_optimizer_meta_and_mc(base_dir, trained_tokenizer):
    vocab = trained_tokenizer.get_vocab_size()
    model = make_model(vocab)
    optimizers = setup_optimizers(model)
    train_a_step(model, optimizers)
    gist = torch.nn.Linear(4, 4)
    ckpt_dir = base_dir / "base_checkpoints" / "d2"
    loader_state = {"shard": 3, "row_group": 1, "offset": 17}
    save_step(
        ckpt_dir,
        5,
        model,
        optimizers,
        mc_state={"gistnet": gist.state_dict()},
        dataloader=loader_state,
        user_config={"depth": 2},
        mc={"K": 32},
    )
    assert sorted(p.name for p in ckpt_dir.iterdir()) == [
        "meta_000005.json",
        "model_000005.pt",
        "optim_000005.pt",
    ]

    model_state, optim_states, meta = load_checkpoint(ckpt_dir, 5, "cpu", load_optimizer=True)
    assert meta["step"] == 5 and meta["dataloader"] == loader_state and meta["mc"] == {"K": 32}
    assert meta["user_config"] == {"depth": 2} and meta["model_config"] == model.config.to_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(model_state[k], v)
    torch.testing.assert_close(load_mc_state(ckpt_dir, 5, "cpu")["gistnet"], gist.state_dict())

    # Resume: a fresh model + optimizers loaded from the checkpoint step exactly like the originals
    resumed = make_model(vocab, seed=1)
    resumed.load_state_dict(model_state)
    resumed_opts = setup_optimizers(resumed)
    for opt, state in zip(resumed_opts, optim_states):
        opt.load_state_dict(state)
    train_a_step(model, optimizers)
    train_a_step(resumed, resumed_opts)
    for (k, a), b in zip(model.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k

    built, tok, meta2 = build_model(ckpt_dir, 5, "cpu", phase="eval")
    assert not built.training and tok.get_vocab_size() == vocab and meta2 == meta
    idx = torch.randint(0, vocab, (1, 8))
    ref = make_model(vocab, seed=3)
    ref.load_state_dict(model_state)
    torch.testing.assert_close(built(idx), ref(idx), rtol=0, atol=0)
    assert build_model(ckpt_dir, 5, "cpu", phase="train")[0].training


def test_latest_step_and_largest_tag_are_picked(base_dir, trained_tokenizer):
    vocab = trained_tokenizer.get_vocab_size()
    root = base_dir / "base_checkpoints"
    for tag, steps in (("d2", [10, 300]), ("d10", [20, 100]), ("scratch", [999])):
        for step in steps:
            save_step(root / tag, step, make_model(vocab, seed=step))
    assert find_last_step(root / "d10") == 100
    assert resolve_checkpoint("base") == (root / "d10", 100)  # d10 > d2 by depth, not by string order
    model, _, meta = load_model("base", "cpu")
    assert meta["step"] == 100
    torch.testing.assert_close(model.lm_head.weight, make_model(vocab, seed=100).lm_head.weight)
    assert load_model("base", "cpu", model_tag="d2", step=10)[2]["step"] == 10


def test_no_checkpoints_is_a_clear_error(base_dir):
    with pytest.raises(CheckpointError) as e:
        load_model("sft", "cpu")
    assert_one_line(e.value, "no checkpoints found", "chatsft_checkpoints")
    (base_dir / "mid_checkpoints" / "d4").mkdir(parents=True)
    with pytest.raises(CheckpointError):
        load_model("mid", "cpu")
    with pytest.raises(CheckpointError) as e:
        load_model("nope", "cpu")
    assert_one_line(e.value, "unknown checkpoint source")
    assert isinstance(e.value, UserError)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_model_file(base_dir, trained_tokenizer, damage):
    ckpt_dir = base_dir / "base_checkpoints" / "d2"
    save_step(ckpt_dir, 1, make_model(trained_tokenizer.get_vocab_size()))
    save_step(ckpt_dir, 2, make_model(trained_tokenizer.get_vocab_size()))
    path = model_path(ckpt_dir, 2)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncate" else os.urandom(len(data)))
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(ckpt_dir, 2, "cpu")
    assert_one_line(e.value, str(path), "corrupt or truncated")
    assert find_last_step(ckpt_dir) == 1  # a damaged step is never picked by default
    assert load_model("base", "cpu")[2]["step"] == 1


def test_state_from_another_config_names_the_key(base_dir, trained_tokenizer):
    vocab = trained_tokenizer.get_vocab_size()
    ckpt_dir = base_dir / "base_checkpoints" / "d2"
    model = make_model(vocab, n_embd=32)
    other = make_model(vocab, n_embd=64).config.to_dict()
    save_checkpoint(ckpt_dir, 1, model.state_dict(), None, {"model_config": other})
    with pytest.raises(CheckpointError) as e:
        build_model(ckpt_dir, 1, "cpu")
    assert_one_line(e.value, "wte.weight", f"({vocab}, 32) in the file", f"({vocab}, 64) in the model")


def test_tokenizer_mismatches(base_dir, trained_tokenizer):
    ckpt_dir = base_dir / "base_checkpoints" / "d2"
    save_step(ckpt_dir, 1, make_model(trained_tokenizer.get_vocab_size() + 5))
    with pytest.raises(CheckpointError) as e:
        build_model(ckpt_dir, 1, "cpu")
    assert_one_line(e.value, "tokenizer has", "restore the tokenizer")

    save_step(ckpt_dir, 2, make_model(trained_tokenizer.get_vocab_size()))
    meta_file = ckpt_dir / "meta_000002.json"
    meta_file.write_text(meta_file.read_text().replace(tokenizer_id(), "0123456789abcdef"))
    with pytest.raises(CheckpointError) as e:
        build_model(ckpt_dir, 2, "cpu")
    assert_one_line(e.value, "0123456789abcdef")

    (base_dir / "tokenizer" / "tokenizer.json").unlink()
    with pytest.raises(UserError) as e:
        build_model(ckpt_dir, 2, "cpu")
    assert_one_line(e.value, "no tokenizer")


def test_exception_during_save_leaves_previous_step(base_dir, trained_tokenizer, monkeypatch):
    vocab = trained_tokenizer.get_vocab_size()
    ckpt_dir = base_dir / "base_checkpoints" / "d2"
    save_step(ckpt_dir, 1, make_model(vocab))

    def half_write_then_fail(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", half_write_then_fail)
    with pytest.raises(OSError):
        save_step(ckpt_dir, 2, make_model(vocab))
    monkeypatch.undo()
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["meta_000001.json", "model_000001.pt"]
    assert find_last_step(ckpt_dir) == 1


CRASH_SCRIPT = """
import os, sys, torch
import nanochat.checkpoint_manager as cm
from nanochat.gpt import GPT, GPTConfig
where = sys.argv[2]
def die(*args, **kwargs):
    if where == "torch_save":  # a torn write: some bytes reach the temp file, then the process dies
        args[1].write(b"PK\\x03\\x04 torn"); args[1].flush()
    os._exit(9)
if where == "torch_save":
    torch.save = die
else:
    cm.atomic_write_json = die  # the model and optimizer files are complete, the meta never comes
torch.manual_seed(0)
model = GPT(GPTConfig(sequence_len=16, vocab_size=int(sys.argv[3]), n_layer=2, n_head=2, n_kv_head=2, n_embd=32))
cm.save_checkpoint(sys.argv[1], 2, model.state_dict(), [{}], {"model_config": model.config.to_dict()})
"""


@pytest.mark.parametrize("where", ["torch_save", "meta"])
def test_process_killed_mid_save_never_yields_a_half_step(base_dir, trained_tokenizer, where):
    vocab = trained_tokenizer.get_vocab_size()
    ckpt_dir = base_dir / "base_checkpoints" / "d2"
    save_step(ckpt_dir, 1, make_model(vocab))
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base_dir)}
    proc = subprocess.run(
        [sys.executable, "-c", CRASH_SCRIPT, str(ckpt_dir), where, str(vocab)], env=env, cwd=REPO, timeout=120
    )
    assert proc.returncode == 9
    names = {p.name for p in ckpt_dir.iterdir()}
    assert "meta_000002.json" not in names
    if where == "meta":
        assert "model_000002.pt" in names  # the crash really came between model and meta
    else:
        assert any(n.endswith(".tmp") for n in names) and "model_000002.pt" not in names
    assert find_last_step(ckpt_dir) == 1
    assert load_model("base", "cpu")[2]["step"] == 1
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(ckpt_dir, 2, "cpu")
    assert_one_line(e.value, "no checkpoint for step 2")
