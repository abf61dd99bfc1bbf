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


def tool_model(tok, code: str):
    """A GPT wired into a bigram table (one-hot embeddings, blocks that add nothing, an LM head that maps each
    token to its successor) whose reply is the python call `code` and then, after the tool's output, the end:
    <|assistant_start|> -> <|python_start|> -> code -> <|python_end|> -> <|assistant_end|>, <|output_end|> ->
    <|assistant_end|>. The code's tokens must be distinct (a bigram chain)."""
    from nanochat.gpt import GPT, GPTConfig

    s = tok.encode_special
    chain = [s("<|assistant_start|>"), s("<|python_start|>"), *tok.encode(code), s("<|python_end|>")]
    assert len(set(chain)) == len(chain), "a bigram chain needs distinct tokens"
    pairs = list(zip(chain, chain[1:])) + [(chain[-1], s("<|assistant_end|>"))]
    pairs.append((s("<|output_end|>"), s("<|assistant_end|>")))
    V = tok.get_vocab_size()
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=64, vocab_size=V, n_layer=1, n_head=2, n_kv_head=2, n_embd=272))
    model.init_weights()  # zero output projections: the blocks add nothing
    with torch.no_grad():
        model.wte.weight.zero_()
        model.wte.weight[:, :V] = torch.eye(V)
        model.lm_head.weight.zero_()
        for prev, token in pairs:
            model.lm_head.weight[token, prev] = 1.0
    return model.eval()


@pytest.fixture
def tool_dir(tmp_path, monkeypatch):
    """Checkpoints of the tool-calling model: sft with MC weights, base without."""
    from megacontext.config import MCConfig, build_nets
    from nanochat.tokenizer import MIN_VOCAB_SIZE, Tokenizer

    tok = Tokenizer.train_from_iterator(["bytes only"], MIN_VOCAB_SIZE)
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    tok.save(tmp_path / "tokenizer")
    model = tool_model(tok, "6*7")
    cfg = MCConfig(block_size=8, wc_budget=32, recent=16, horizon=8)
    gistnet, lensnet = build_nets(cfg, model.config.n_embd)
    meta = {"model_config": model.config.to_dict()}
    mc_state = {"gistnet": gistnet.state_dict(), "lensnet": lensnet.state_dict()}
    sft = tmp_path / "chatsft_checkpoints" / "d1"
    save_checkpoint(sft, 1, model.state_dict(), None, {**meta, "mc": cfg.to_dict()}, mc_state=mc_state)
    save_checkpoint(tmp_path / "base_checkpoints" / "d1", 1, model.state_dict(), None, meta)
    return tmp_path


@pytest.mark.parametrize("source", ["sft", "base"])  # through a memory session, and plain context
def test_a_tool_call_in_a_reply_is_run_and_its_output_shown(tool_dir, source, capsys):
    chat_cli.main(["--source", source, "-p", "what is six times seven?", *GREEDY])
    out = capsys.readouterr().out
    # the sandbox computed 42 (the model never says it: its table has no entry for "4" or "2")
    assert out == "```python\n6*7\n```\n```output\n42\n```\n\n"
    assert "<|" not in out


def test_a_resumed_session_remembers_the_tool_output(tool_dir, capsys):
    d = tool_dir / "chat"
    chat_cli.main(["-p", "six times seven?", "--session", str(d), *GREEDY])
    saved = json.loads((d / "session.json").read_text())
    assert saved["messages"][1] == {
        "role": "assistant",
        "content": "```python\n6*7\n```\n```output\n42\n```\n",
    }
    from nanochat.tokenizer import Tokenizer

    tree = MegaContextTree.open(d / saved["tree"])
    history = Tokenizer.from_directory(tool_dir / "tokenizer").decode(
        tree.tokens(0, tree.num_tokens).tolist()
    )
    tree.close()
    # the model's memory holds the call and the tool's output as the model will read them next turn
    assert history.endswith(
        "<|python_start|>6*7<|python_end|><|output_start|>42<|output_end|><|assistant_end|>"
    )


def test_a_long_paste_reports_its_reading_progress(base_dir, parts, capsys):
    tok = parts[0]
    paste = " ".join(["the lens decides which old turns to zoom into again"] * 1200)
    n = 4 + len(tok.encode(paste))  # BOS, <|user_start|>, the text, <|user_end|>, <|assistant_start|>
    assert n > 8192  # more than one ingest chunk
    chat_cli.main(["-p", paste, *GREEDY])
    err = capsys.readouterr().err
    assert "(read 8,192 of " in err and f"(read {n:,} of {n:,} tokens into memory)\n" in err


def test_a_mega_zoom_checkpoint_chats_under_its_own_attention(base_dir, parts, capsys):
    """chat_cli runs a MegaAttention checkpoint through the mode's forward over the whole conversation (what
    mc_eval's full view scores), not through the plain GPT's KV cache, which would see every token raw."""
    from megacontext.attention_modes import AttentionConfig, AttentionModel
    from nanochat.engine import RecomputeEngine, chat_engine

    tok, model, *_ = parts
    cfg = AttentionConfig(mode="mega", window=8, block_size=4, levels=2, zoom_k=2)
    torch.manual_seed(3)
    attn = AttentionModel(model, cfg).eval()
    save_checkpoint(
        base_dir / "base_checkpoints" / "mega",
        5,
        model.state_dict(),
        None,
        {"model_config": model.config.to_dict(), "attention": cfg.to_dict()},
        mc_state=attn.aux_state(),
    )
    text = "the code is 4711, remember it while we talk about other things for a while"
    chat_cli.main(["--source", "base", "--model-tag", "mega", "-p", text, *GREEDY])
    ids = [
        tok.get_bos_token_id(),
        tok.encode_special("<|user_start|>"),
        *tok.encode(text),
        tok.encode_special("<|user_end|>"),
        tok.encode_special("<|assistant_start|>"),
    ]
    assert len(ids) > cfg.window + 2 * cfg.block_size  # nodes and zoom chunks exist beyond the window
    with torch.no_grad():
        x = torch.tensor([ids])
        assert not torch.allclose(attn(x)[0, -1], model(x)[0, -1], atol=1e-3)  # the KV-cached GPT differs
        reply, stops = [], Engine(model, tok).stop_tokens
        for _ in range(16):
            token = int(attn(torch.tensor([ids + reply]))[0, -1].argmax())
            if token in stops:
                break
            reply.append(token)
    assert capsys.readouterr().out.split("\n")[-2] == tok.decode(reply)
    assert isinstance(chat_engine(attn, tok), RecomputeEngine) and not isinstance(
        chat_engine(model, tok), RecomputeEngine
    )
