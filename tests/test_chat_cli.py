"""chat_cli: one-shot and interactive chat from a checkpoint, with and without MegaContext, resuming --session."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_session import tiny_cfg, tiny_model, tiny_nets, tiny_tokenizer

from megacontext.session import MCSession, model_fingerprint
from megacontext.tree import MegaContextTree
from nanochat.checkpoint_manager import save_checkpoint
from nanochat.common import UserError
from nanochat.engine import Engine
from scripts import chat_cli

REPO = Path(__file__).resolve().parents[1]
GREEDY = ["--temperature", "0", "--max-tokens", "16", "--device-type", "cpu"]


@pytest.fixture(scope="module")
def parts():
    tok = tiny_tokenizer()
    model = tiny_model(tok.get_vocab_size())
    cfg = tiny_cfg()
    gistnet, lensnet = tiny_nets(cfg)
    return tok, model, cfg, gistnet, lensnet


@pytest.fixture
def base_dir(tmp_path, monkeypatch, parts):
    """An sft checkpoint trained with MC and a base checkpoint without, under $NANOCHAT_BASE_DIR."""
    tok, model, cfg, gistnet, lensnet = parts
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    tok.save(tmp_path / "tokenizer")
    meta = {"model_config": model.config.to_dict()}
    mc_state = {"gistnet": gistnet.state_dict(), "lensnet": lensnet.state_dict()}
    save_checkpoint(
        tmp_path / "chatsft_checkpoints" / "d2",
        7,
        model.state_dict(),
        None,
        {**meta, "mc": cfg.to_dict()},
        mc_state=mc_state,
    )
    save_checkpoint(tmp_path / "base_checkpoints" / "d2", 3, model.state_dict(), None, meta)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tmp_path
    torch.set_num_threads(threads)


def greedy_reply(session, text: str) -> str:
    session.add_user_message(text)
    return session.tokenizer.decode(list(session.reply(16, temperature=0.0)))


def test_prompt_mode_with_mc_prints_the_sessions_greedy_reply(base_dir, parts, capsys):
    tok, model, cfg, gistnet, lensnet = parts
    chat_cli.main(["-p", "hello memory", *GREEDY])
    expected = greedy_reply(MCSession(model, tok, gistnet, lensnet, cfg), "hello memory")
    assert capsys.readouterr().out == expected + "\n" and expected


def test_session_dir_resumes_the_conversation(base_dir, parts, capsys):
    tok, model, cfg, gistnet, lensnet = parts
    d = base_dir / "chat"
    chat_cli.main(["-p", "first turn", "--session", str(d), *GREEDY])
    chat_cli.main(["-p", "second turn", "--session", str(d), *GREEDY])
    out = capsys.readouterr().out
    # the same conversation in one process, with the disk tree's fp16 gists
    tree = MegaContextTree.in_memory(cfg.block_size, 32, model_fingerprint(model, gistnet), dtype="fp16")
    ref = MCSession(model, tok, gistnet, lensnet, cfg, tree=tree)
    assert out == greedy_reply(ref, "first turn") + "\n" + greedy_reply(ref, "second turn") + "\n"
    saved = json.loads((d / "session.json").read_text())
    assert [m["content"] for m in saved["messages"][::2]] == ["first turn", "second turn"]
    assert saved["num_tokens"] == ref.tree.num_tokens


def test_interactive_memory_clear_and_quit(base_dir, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello there\n/memory\n/clear\n/memory\n\n/quit\n"))
    chat_cli.main(GREEDY)
    out = capsys.readouterr().out
    assert "MegaContext on (W_max 64)" in out and "Assistant: " in out
    first, second = out.split("(memory cleared)")
    assert (
        "working context: " in first
        and re.search(r"\n\[L\d 0:\d+\]", first)
        and "tree: 0 tokens" not in first
    )
    assert "tree: 0 tokens" in second


def test_plain_chat_without_mc(base_dir, parts, capsys):
    tok, model, *_ = parts
    chat_cli.main(["--source", "base", "-p", "hi", *GREEDY])  # no MC in this checkpoint: plain context
    prompt = [
        tok.get_bos_token_id(),
        tok.encode_special("<|user_start|>"),
        *tok.encode("hi"),
        tok.encode_special("<|user_end|>"),
        tok.encode_special("<|assistant_start|>"),
    ]
    ids = Engine(model, tok).generate_batch(prompt, max_tokens=16, temperature=0.0)[0][0][len(prompt) :]
    assert capsys.readouterr().out == tok.decode(ids) + "\n"
    with pytest.raises(UserError, match="trained without MegaContext"):
        chat_cli.main(["--source", "base", "--mc", "-p", "hi", *GREEDY])
    with pytest.raises(UserError, match="--session keeps a MegaContext memory"):
        chat_cli.main(["--no-mc", "--session", str(base_dir / "s"), "-p", "hi", *GREEDY])


def test_user_mistakes_print_one_line_and_exit_2(base_dir):
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base_dir), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    r = subprocess.run(
        [sys.executable, "-m", "scripts.chat_cli", "--source", "mid", "-p", "hi"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=120,
    )
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith("error: no checkpoints")


def test_clear_in_a_session_dir_starts_a_new_tree(base_dir, capsys, monkeypatch):
    d = base_dir / "chat"
    chat_cli.main(["-p", "remember this", "--session", str(d), *GREEDY])
    old_tree = json.loads((d / "session.json").read_text())["tree"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("/clear\n/quit\n"))
    chat_cli.main(["--session", str(d), *GREEDY])
    assert "(resumed a session of 2 messages" in capsys.readouterr().out
    saved = json.loads((d / "session.json").read_text())
    assert saved["messages"] == [] and saved["num_tokens"] == 0 and saved["tree"] != old_tree
    assert [p.name for p in d.glob("tree-*")] == [saved["tree"]]
