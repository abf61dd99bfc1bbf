"""Chat training: loss masks, conversation packing, mid-training/SFT/RL on a tiny model from a tiny base.

The masking test finds the assistant's tokens from the special-token layout of the rendered ids (not from
the renderer's own mask), so it checks the mask rather than restating it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megacontext import training
from nanochat.chat_data import ConversationLoader, targets_from_mask
from nanochat.checkpoint_manager import load_checkpoint, load_mc_state, save_checkpoint, tokenizer_id
from nanochat.common import UserError
from nanochat.gpt import GPT, GPTConfig
from nanochat.tasks.common import Task
from nanochat.tasks.offline import offline_mixture
from nanochat.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]
T = 128
TINY = [
    "--device-type",
    "cpu",
    "--dtype",
    "float32",
    "--max-seq-len",
    str(T),
    "--device-batch-size",
    "2",
    "--total-batch-size",
    str(4 * T),
    "--eval-tokens",
    str(2 * T),
    "--offline-size",
    "40",
    "--longdoc-chars",
    "300",
]
MC = ["--mc", "--mc-block-size", "8", "--mc-wc-budget", "32"]

TOOL_CHAT = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 6*7?"},
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Let me compute."},
                {"type": "python", "text": "6*7"},
                {"type": "python_output", "text": "42"},
                {"type": "text", "text": "It is 42."},
            ],
        },
        {"role": "user", "content": "Thanks!"},
        {"role": "assistant", "content": "You are welcome."},
    ]
}


class ListTask(Task):
    def __init__(self, conversations):
        super().__init__()
        self.conversations = conversations

    @property
    def eval_type(self):
        return "generative"

    def num_examples(self):
        return len(self.conversations)

    def get_example(self, index):
        return self.conversations[index]


@pytest.fixture(scope="module")
def tokenizer():
    texts = []
    for conversation in offline_mixture("train", 40, 0, longdoc_size=300):
        for m in conversation["messages"]:
            c = m["content"]
            texts.append(c if isinstance(c, str) else "".join(p["text"] for p in c))
    return Tokenizer.train_from_iterator(texts, 512)


@pytest.fixture
def base(tmp_path, monkeypatch, tokenizer):
    """A base dir with the tokenizer and a tiny base checkpoint d2 (step 10)."""
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    tokenizer.save(tmp_path / "tokenizer")
    torch.manual_seed(0)
    config = GPTConfig(
        sequence_len=T, vocab_size=tokenizer.get_vocab_size(), n_layer=2, n_head=2, n_kv_head=2, n_embd=64
    )
    model = GPT(config)
    model.init_weights()
    meta = {"model_config": config.to_dict(), "tokenizer_id": tokenizer_id(tmp_path / "tokenizer")}
    save_checkpoint(tmp_path / "base_checkpoints" / "d2", 10, model.state_dict(), None, meta)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: threads only add overhead on a shared 2-core machine
    yield tmp_path
    torch.set_num_threads(threads)


def assistant_positions(ids: list[int], tok) -> set[int]:
    """Indices the assistant must produce, from the layout: after <|assistant_start|> up to and including
    <|assistant_end|>, minus <|output_start|> ... <|output_end|> (the tool wrote those)."""
    s = tok.encode_special
    inside, in_output, out = False, False, set()
    for i, t in enumerate(ids):
        if t == s("<|assistant_start|>"):
            inside = True
            continue
        if inside and t == s("<|output_start|>"):
            in_output = True
        if inside and not in_output:
            out.add(i)
        if t == s("<|output_end|>"):
            in_output = False
        if t == s("<|assistant_end|>"):
            inside = False
    return out


def test_targets_only_on_assistant_tokens_tool_output_excluded(tokenizer):
    ids, mask = tokenizer.render_conversation(TOOL_CHAT)
    loader = ConversationLoader(tokenizer, ListTask([TOOL_CHAT]), B=1, T=len(ids) + 9)
    x, targets = next(loader)
    x, targets = x[0].tolist(), targets[0].tolist()
    assert x[: len(ids)] == ids and len(targets) == len(x) - 1
    trained = assistant_positions(ids, tokenizer)
    for t in range(len(targets)):
        expected = x[t + 1] if t + 1 in trained else -1
        assert targets[t] == expected, (t, tokenizer.decode([x[t + 1]]))
    # spot checks in words: the answer, the call and the stop are labels; the tool output, the user turn,
    # <|assistant_start|> and the padding are not
    labelled = tokenizer.decode([y for y in targets if y >= 0])
    assert "It is 42." in labelled and "6*7" in labelled and "You are welcome." in labelled
    assert "<|python_start|>" in labelled and "<|assistant_end|>" in labelled
    for text in (
        "<|output_start|>",
        "<|output_end|>",
        "What is",
        "Thanks",
        "Be brief",
        "<|assistant_start|>",
    ):
        assert text not in labelled
    assert targets[len(ids) - 1 :] == [-1] * (len(targets) - len(ids) + 1)  # padding carries no label
    assert targets_from_mask([1, 2, 3], [0, 1, 0]) == [2, -1]


def test_packing_whole_conversations_resume_and_ranks(tokenizer):
    task = offline_mixture("train", 24, 3, longdoc_size=150)
    rendered = [tokenizer.render_conversation(c, max_tokens=T + 1)[0] for c in task]
    loader = ConversationLoader(tokenizer, task, B=2, T=T)
    stream = []
    while loader.epoch == 0:
        x, _ = next(loader)
        for row in x.tolist():
            assert row[0] == tokenizer.get_bos_token_id()  # every row opens a conversation
            stream.append(row)
    # each row holds whole conversations, in order, then padding (BOS); one epoch uses each exactly once
    bos, k = tokenizer.get_bos_token_id(), 0
    for row in stream:
        pos = 0
        while row[pos : pos + len(rendered[k % len(rendered)])] == rendered[k % len(rendered)]:
            pos += len(rendered[k % len(rendered)])
            k += 1
        assert pos > 0 and set(row[pos:]) <= {bos}
    assert k >= len(rendered) and k - len(rendered) < 2 * 2  # the last batch may run into the next epoch

    # resume: a loader restored from state gives exactly the batches the original gives next
    a = ConversationLoader(tokenizer, task, B=2, T=T)
    next(a)
    b = ConversationLoader(tokenizer, task, B=2, T=T, state=a.state_dict())
    for _ in range(3):
        (xa, ya), (xb, yb) = next(a), next(b)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)

    # two ranks read disjoint, interleaved conversations
    r0 = ConversationLoader(tokenizer, task, B=1, T=T, rank=0, world_size=2)
    r1 = ConversationLoader(tokenizer, task, B=1, T=T, rank=1, world_size=2)
    assert r0.per_rank == r1.per_rank == 12
    assert r0._render(0)[0] == rendered[0] and r1._render(0)[0] == rendered[1]

    # end-aligned rows (MegaContext): padding first, the row ends on an assistant's <|assistant_end|>
    end = ConversationLoader(tokenizer, task, B=4, T=2 * T, align="end")
    assert all(len(tokenizer.render_conversation(c)[0]) <= 2 * T + 1 for c in task)  # none truncated
    x, y = next(end)
    assert (x[:, -1] == tokenizer.encode_special("<|assistant_end|>")).all() and (y[:, -1] >= 0).all()


def test_overlong_conversations_are_cut_and_counted(tokenizer):
    long = {
        "messages": [{"role": "user", "content": "tell me " * 80}, {"role": "assistant", "content": "ok"}]
    }
    short = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    loader = ConversationLoader(tokenizer, ListTask([long, short]), B=1, T=40)
    x, y = next(loader)  # the long one fills a row by itself, cut at 41 tokens: its answer is lost
    assert x[0].tolist() == tokenizer.render_conversation(long)[0][:41] and (y == -1).all()
    next(loader)  # the short one, then padding (the long one does not fit behind it)
    assert (loader.rendered, loader.truncated) == (2, 1)


def run_stage(module: str, argv: list[str]) -> None:
    __import__(f"scripts.{module}", fromlist=["main"]).main(argv)


def read_log(path: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, path.read_text().splitlines()) if "loss" in r}


def test_mid_then_sft_resume_matches_uninterrupted(base):
    run_stage(
        "mid_train",
        [
            *TINY,
            "--num-iterations",
            "4",
            "--eval-every",
            "2",
            "--save-every",
            "2",
            "--log-json",
            str(base / "a.jsonl"),
        ],
    )
    ckpt = base / "mid_checkpoints" / "d2"
    _, _, meta = load_checkpoint(ckpt, 4, "cpu")
    assert meta["source"]["family"] == "base" and meta["source"]["step"] == 10 and "mc" not in meta
    losses = read_log(base / "a.jsonl")
    assert sorted(losses) == [0, 1, 2, 3] and losses[3] < losses[0]  # it learns

    # resume from step 2: steps 2 and 3 see the same data and weights, so the same losses
    run_stage(
        "mid_train",
        [
            *TINY,
            "--num-iterations",
            "4",
            "--eval-every",
            "-1",
            "--resume-from-step",
            "2",
            "--log-json",
            str(base / "b.jsonl"),
        ],
    )
    resumed = read_log(base / "b.jsonl")
    assert sorted(resumed) == [2, 3]
    for s in (2, 3):
        assert resumed[s] == pytest.approx(losses[s], rel=1e-5)

    run_stage("chat_sft", [*TINY, "--num-iterations", "2", "--eval-every", "-1"])
    _, _, meta = load_checkpoint(base / "chatsft_checkpoints" / "d2", 2, "cpu")
    assert meta["source"]["family"] == "mid" and meta["source"]["step"] == 4
    sections = {p.name for p in (base / "report").glob("*.md")}
    assert {"midtraining-d2.md", "chat-sft-d2.md"} <= sections
    assert "val_bpb" in (base / "report" / "chat-sft-d2.md").read_text()


def budgets(path: Path) -> list[float]:
    return [r["mc/wc_budget"] for r in map(json.loads, path.read_text().splitlines()) if "mc/wc_budget" in r]


def test_mc_nets_trained_saved_and_carried_into_sft(base):
    mid_log, sft_log = base / "mid.jsonl", base / "sft.jsonl"
    run_stage(
        "mid_train", [*TINY, *MC, "--num-iterations", "2", "--eval-every", "-1", "--log-json", str(mid_log)]
    )
    ckpt = base / "mid_checkpoints" / "d2"
    _, _, meta = load_checkpoint(ckpt, 2, "cpu")
    assert meta["mc"]["block_size"] == 8 and meta["mc"]["wc_budget"] == 32
    assert budgets(mid_log)[0] > 32  # fresh nets: the budget curriculum starts wide
    mid_state = load_mc_state(ckpt, 2, "cpu")
    # the lens head starts at exactly 0 (lensnet.init_weights); training must have moved it
    assert mid_state["lensnet"]["out.weight"].abs().sum() > 0

    # no --mc: a source with MC nets keeps training them, with its own config (recorded again)
    run_stage("chat_sft", [*TINY, "--num-iterations", "2", "--eval-every", "-1", "--log-json", str(sft_log)])
    assert budgets(sft_log) == [32.0, 32.0]  # nets past their curriculum start at the target budget
    sft = base / "chatsft_checkpoints" / "d2"
    _, _, sft_meta = load_checkpoint(sft, 2, "cpu")
    assert meta["mc"]["recent"] == 8 and sft_meta["mc"] == meta["mc"]
    sft_state = load_mc_state(sft, 2, "cpu")
    assert not torch.equal(sft_state["lensnet"]["out.weight"], mid_state["lensnet"]["out.weight"])
    assert "- megacontext: on" in (base / "report" / "chat-sft-d2.md").read_text()


def test_chat_stages_weigh_the_mc_loss_below_the_chat_loss():
    """At full weight the MC loss wore the chat skills away (Identity 2/32); the chat stages weigh it down."""
    from scripts.mid_train import CHAT_MC_WEIGHT, chat_loss

    assert 0 < CHAT_MC_WEIGHT < 1
    chat, mc = torch.tensor(1.0, requires_grad=True), torch.tensor(10.0, requires_grad=True)
    chat_loss(chat, mc, 0.0).backward()
    assert chat.grad == 1.0 and mc.grad == CHAT_MC_WEIGHT


def test_chat_stages_run_the_full_row_once_for_the_same_objective():
    """The MC step's full-row term is the chat loss again: the stage skips it and weighs the chat loss up, so
    the GPT runs each row's positions once fewer for the same loss and gradients as chat + weight x (the whole MC loss)."""
    from dataclasses import replace

    from test_mc_step_speed import chat_targets, grads, nets, rows

    from scripts.mid_train import CHAT_MC_WEIGHT, chat_loss

    model, gistnet, lensnet, cfg = nets(256, dtype=torch.float64)
    x = rows(2, 256, seed=3)
    targets = chat_targets(x, seed=4)
    calls = []  # GPT positions per call (the MC step packs the full rows after its working contexts)
    model.register_forward_pre_hook(
        lambda m, a, kw: calls.append((a[0] if a else kw["embeds"]).shape[:2].numel()), with_kwargs=True
    )
    out = []
    for step_cfg, combine in (
        (cfg, lambda chat, mc: chat + CHAT_MC_WEIGHT * mc),
        (replace(cfg, full_weight=0.0), lambda chat, mc: chat_loss(chat, mc, cfg.full_weight)),
    ):
        for m in (model, gistnet, lensnet):
            m.zero_grad(set_to_none=True)
        calls.clear()
        chat = model(x[:, :-1], targets, loss_reduction="sum") / (targets >= 0).sum()
        mc, _ = training.mc_train_step(model, gistnet, lensnet, x, step_cfg, 1.0, 7, targets=targets)
        loss = combine(chat, mc)
        loss.backward()
        out.append((loss.detach(), grads(model, gistnet, lensnet), sum(calls)))
    (loss_a, grads_a, full_a), (loss_b, grads_b, full_b) = out
    assert cfg.full_weight > 0 and full_a - full_b == x.shape[0] * (x.shape[1] - 1)  # the full rows, once
    # the GPT's cross-entropy runs in float32: (1 + w) x chat and chat + w x chat round differently there
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-6, atol=1e-8)
    for name, g in grads_a.items():
        torch.testing.assert_close(grads_b[name], g, rtol=1e-6, atol=1e-8, msg=name)


def test_epoch_mode_and_user_errors(base):
    run_stage("mid_train", [*TINY, "--num-iterations", "-1", "--eval-every", "-1", "--offline-size", "8"])
    ckpt = base / "mid_checkpoints" / "d2"
    (meta_file,) = ckpt.glob("meta_*.json")
    meta = json.loads(meta_file.read_text())
    lanes = meta["loader_state"]["lanes"]
    assert max(lane["epoch"] for lane in lanes) >= 1 and meta["step"] >= 1  # stopped after one epoch
    with pytest.raises(UserError, match="multiple of the MC block size"):
        run_stage("mid_train", [*TINY, *MC, "--mc-block-size", "12", "--num-iterations", "1"])
    with pytest.raises(UserError, match="no checkpoints"):
        run_stage("chat_sft", [*TINY, "--source", "rl", "--num-iterations", "1"])


def test_rl_policy_gradient_direction_and_masking():
    from scripts.chat_rl import group_advantages, pg_batch, pg_loss

    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=16, vocab_size=32, n_layer=1, n_head=2, n_kv_head=2, n_embd=16))
    model.init_weights()
    assert group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0])).tolist() == [0.5, -0.5, -0.5, 0.5]
    prompt = [1, 5, 6]
    good = (prompt + [7, 20, 21, 9], [0, 0, 0, 1, 0, 0, 1], 0.5)  # 20, 21: forced (a tool's output)
    bad = (prompt + [8, 9], [0, 0, 0, 1, 1], -0.5)
    inputs, targets, adv = pg_batch([good, bad], pad_id=2, device="cpu")
    assert targets.tolist() == [[-1, -1, 7, -1, -1, 9], [-1, -1, 8, 9, -1, -1]]
    assert inputs[1].tolist() == [1, 5, 6, 8, 2, 2]

    def logp(token: int) -> float:
        with torch.no_grad():
            return torch.log_softmax(model(torch.tensor([prompt]))[0, -1], -1)[token].item()

    before = (logp(7), logp(8))
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    pg_loss(model, inputs, targets, adv, num_tokens=4.0).backward()
    opt.step()
    assert logp(7) > before[0] and logp(8) < before[1]  # rewarded up, punished down


def test_rl_two_steps_from_sft(base, tmp_path, monkeypatch):
    # An untrained model never writes "#### 3", so every reward would be 0, every advantage 0 and the policy
    # would (rightly) not move. A scorer that passes even-length completions gives the loop a signal.
    import scripts.chat_rl

    monkeypatch.setattr(
        scripts.chat_rl.GSM8K, "evaluate", lambda self, conv, completion: len(completion) % 2 == 0
    )
    gsm = [
        {"question": f"What is {a} + {b}?", "answer": f"{a} + {b} = <<{a}+{b}={a + b}>>{a + b}\n#### {a + b}"}
        for a, b in [(1, 2), (3, 4), (5, 6), (7, 8)]
    ]
    data = tmp_path / "gsm"
    data.mkdir()
    for name in ("GSM8K-train", "GSM8K"):
        (data / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in gsm))
    shutil.copytree(base / "base_checkpoints", base / "chatsft_checkpoints")  # a "chat model" to start from
    run_stage(
        "chat_rl",
        [
            "--device-type",
            "cpu",
            "--dtype",
            "float32",
            "--dataset",
            "real",
            "--data-dir",
            str(data),
            "--num-iterations",
            "2",
            "--examples-per-step",
            "2",
            "--num-samples",
            "3",
            "--max-new-tokens",
            "12",
            "--eval-every",
            "1",
            "--eval-examples",
            "2",
            "--device-batch-size",
            "4",
            "--log-json",
            str(base / "rl.jsonl"),
        ],
    )
    state, _, meta = load_checkpoint(base / "chatrl_checkpoints" / "d2", 2, "cpu")
    assert [h["step"] for h in meta["history"]] == [0, 1, 2]
    start, _, _ = load_checkpoint(base / "chatsft_checkpoints" / "d2", 10, "cpu")
    assert any(not torch.equal(state[k], start[k]) for k in state)  # the policy moved
    rewards = [json.loads(line)["reward"] for line in (base / "rl.jsonl").read_text().splitlines()]
    assert len(rewards) == 2 and all(0.0 < r < 1.0 for r in rewards)


@pytest.mark.slow
def test_mid_train_under_torchrun_gloo(base):
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        "-m",
        "scripts.mid_train",
        *TINY,
        "--num-iterations",
        "2",
        "--eval-every",
        "1",
    ]
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    _, _, meta = load_checkpoint(base / "mid_checkpoints" / "d2", 2, "cpu")
    assert (
        meta["ranks"] == 2
        and len(meta["loader_state"]["lanes"])
        == meta["user_config"]["total_batch_size"] // meta["max_seq_len"]
    )
