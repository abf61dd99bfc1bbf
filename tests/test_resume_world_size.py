"""Resume at any number of ranks: the loader's lanes re-split across ranks, the checkpoint is one state.

Fast: the lanes in-process (ranks are loaders built with rank r of w) for pretraining and conversation
data. Slow: base_train under torchrun, 2 ranks -> 1 and 1 -> 2, against an uninterrupted single process.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys

import pytest
import torch
from test_base_train import COMMON, make_corpus, read_log, run
from test_chat_train import REPO as repo
from test_chat_train import (
    TINY,
    base,  # noqa: F401 (the fixture: a base dir with a tiny base checkpoint)
    run_stage,
    tokenizer,  # noqa: F401 (the fixture it needs)
)
from test_chat_train import read_log as read_losses

from nanochat import dataset
from nanochat.chat_data import ConversationLoader
from nanochat.checkpoint_manager import load_checkpoint, resume_step, save_checkpoint
from nanochat.common import UserError
from nanochat.dataloader import (
    LaneLoader,
    check_lane_state,
    gather_state,
    merge_lane_states,
    pretraining_loader,
)
from nanochat.gpt import GPT, GPTConfig
from nanochat.optim import setup_optimizers
from nanochat.tasks.common import Task
from nanochat.tokenizer import Tokenizer

WORDS = "alpha beta gamma delta river stone cloud paper ember frost lumen quartz".split()
B, T, ROWS = 2, 16, 8  # 8 rows (lanes) per step: 4 micro-batches on 1 rank, 2 on 2, 1 on 4


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """3 shards (2 train + val) of 5 row groups x 2 documents: lanes wrap into new epochs within a test."""
    data_dir = tmp_path_factory.mktemp("base_data")
    rng = random.Random(0)
    docs = []
    for s in range(3):
        shard = [f"doc-{s}-{i}: " + " ".join(rng.choices(WORDS, k=rng.randint(3, 30))) for i in range(10)]
        dataset.write_shard(data_dir / dataset.shard_name(s), shard, row_group_docs=2)
        docs += shard
    return data_dir, Tokenizer.train_from_iterator(docs * 3, vocab_size=400)


def step_rows(loaders: list[LaneLoader]) -> torch.Tensor:
    """One optimizer step of every rank (rank order), as the [ROWS, ...] rows it trained on."""
    batches = [next(dl) for dl in loaders for _ in range(dl.accum)]
    return torch.cat([torch.cat([x, y], dim=1) for x, y in batches])


def ranks(make, world: int, state: dict | None) -> list[LaneLoader]:
    return [make(r, world, state) for r in range(world)]


def state_of(loaders: list[LaneLoader]) -> dict:
    """What gather_state gives under torchrun: every rank's lanes, merged, through JSON (the meta file)."""
    return json.loads(json.dumps(merge_lane_states([dl.state_dict() for dl in loaders], ROWS)))


@pytest.mark.parametrize("first,second", [(2, 1), (1, 2), (4, 2)])
def test_pretraining_lanes_resplit_across_world_sizes(corpus, first, second):
    data_dir, tok = corpus

    def make(rank, world, state):
        return pretraining_loader(tok, B, T, ROWS, "cpu", rank, world, state, data_dir=data_dir)

    reference = ranks(make, 1, None)
    want = [step_rows(reference) for _ in range(12)]  # crosses lanes' epochs
    before = ranks(make, first, None)
    got = [step_rows(before) for _ in range(5)]
    after = ranks(make, second, state_of(before))
    got += [step_rows(after) for _ in range(7)]
    for step, (a, b) in enumerate(zip(want, got)):
        assert torch.equal(a, b), f"step {step} differs after resuming {first} ranks on {second}"
    # every row once: the resumed lanes stand exactly where the uninterrupted ones do
    assert state_of(after) == state_of(reference)


class Chats(Task):
    def __init__(self, n: int):
        super().__init__()
        rng = random.Random(1)
        self.rows = [
            {
                "messages": [
                    {"role": "user", "content": f"q{i} " + " ".join(rng.choices(WORDS, k=rng.randint(1, 6)))},
                    {"role": "assistant", "content": " ".join(rng.choices(WORDS, k=rng.randint(1, 6)))},
                ]
            }
            for i in range(n)
        ]

    @property
    def eval_type(self):
        return "generative"

    def num_examples(self):
        return len(self.rows)

    def get_example(self, index):
        return self.rows[index]


@pytest.mark.parametrize("first,second", [(2, 1), (1, 4)])
def test_conversation_lanes_resplit_across_world_sizes(corpus, first, second):
    """mid_train / chat_sft: lane j is a one-row ConversationLoader over conversations j, j+ROWS, ..."""
    _, tok = corpus
    task = Chats(40)

    def make(rank, world, state):
        lane = lambda j, s: ConversationLoader(tok, task, 1, 2 * T, "cpu", j, ROWS, s)
        return LaneLoader(lane, ROWS, B, "cpu", rank, world, state)

    reference = ranks(make, 1, None)
    want = [step_rows(reference) for _ in range(9)]
    before = ranks(make, first, None)
    got = [step_rows(before) for _ in range(4)]
    after = ranks(make, second, state_of(before))
    got += [step_rows(after) for _ in range(5)]
    assert all(torch.equal(a, b) for a, b in zip(want, got))
    assert state_of(after) == state_of(reference)
    assert max(dl.progress for dl in after) == reference[0].progress > 1  # lanes ran into a second epoch


def test_lane_errors_are_one_line(corpus):
    data_dir, tok = corpus
    dl = pretraining_loader(tok, B, T, ROWS, "cpu", data_dir=data_dir)
    assert gather_state(dl) == merge_lane_states([dl.state_dict()], ROWS)  # one process: no collective
    next(dl)
    with pytest.raises(RuntimeError, match="1 micro-batches into a step of 4"):
        dl.state_dict()  # only between optimizer steps
    with pytest.raises(UserError, match="written before lanes"):
        check_lane_state({"version": 1, "rank": 0}, ROWS)
    with pytest.raises(UserError, match="has 8 lanes .* and this run 16: resume with the same"):
        check_lane_state(state_of([pretraining_loader(tok, B, T, ROWS, "cpu", data_dir=data_dir)]), 16)
    with pytest.raises(UserError, match="does not split into micro-batches of 2 rows on 3 ranks"):
        pretraining_loader(tok, B, T, ROWS, "cpu", 0, 3, data_dir=data_dir)
    with pytest.raises(UserError, match="train split has 10 row groups"):
        pretraining_loader(tok, B, T, 12, "cpu", data_dir=data_dir)


def test_resume_step_and_one_optimizer_file(tmp_path):
    ckpt = tmp_path / "ckpt"
    assert resume_step(ckpt, -1) is None and resume_step(ckpt, -2) is None  # -2 and nothing yet: fresh
    with pytest.raises(UserError, match="-1 \\(none\\) or -2 \\(latest\\)"):
        resume_step(ckpt, -3)
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=8, vocab_size=32, n_layer=1, n_head=1, n_kv_head=1, n_embd=16))
    model.init_weights()
    optimizers = setup_optimizers(model)
    model(torch.zeros(1, 8, dtype=torch.long), targets=torch.ones(1, 8, dtype=torch.long)).backward()
    for opt in optimizers:
        opt.step()
    states = [opt.state_dict() for opt in optimizers]
    for step in (2, 4):
        save_checkpoint(ckpt, step, model.state_dict(), states, {"model_config": model.config.to_dict()})
    assert resume_step(ckpt, -2) == 4 and resume_step(ckpt, 2) == 2
    assert sorted(p.name for p in ckpt.glob("optim_*")) == ["optim_000002.pt", "optim_000004.pt"]
    # a checkpoint from before: one optimizer file per rank (all alike); rank 0's is the state
    (ckpt / "optim_000004.pt").rename(ckpt / "optim_000004_rank0.pt")
    _, loaded, _ = load_checkpoint(ckpt, 4, "cpu", load_optimizer=True)
    assert torch.equal(loaded[0]["state"][0]["exp_avg"], states[0]["state"][0]["exp_avg"])


# -----------------------------------------------------------------------------
# base_train under torchrun (slow): 2 ranks -> 1 and 1 -> 2 continue the uninterrupted loss curve


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted single-process run (tag ref, 6 steps, checkpoints at 3 and 6)."""
    root = tmp_path_factory.mktemp("nanochat")
    make_corpus(root)
    run(root, [*COMMON, "--model-tag", "ref", "--log-json", str(root / "ref.jsonl")])
    return root


@pytest.mark.slow
@pytest.mark.parametrize("first,second", [(2, 1), (1, 2)])
def test_base_train_resumes_on_another_world_size(reference, first, second):
    root = reference
    src = root / "base_checkpoints" / "ref"
    if first != 1:  # the same 6 steps on `first` ranks: its step-3 checkpoint is where we stop
        run(root, [*COMMON, "--model-tag", f"w{first}"], nproc=first)
        src = root / "base_checkpoints" / f"w{first}"
    tag = f"w{first}to{second}"
    dst = root / "base_checkpoints" / tag
    dst.mkdir()
    for path in src.glob("*_000003*"):  # the run stopped right after committing step 3
        shutil.copy(path, dst / path.name)
    log = root / f"{tag}.jsonl"
    out = run(root, [*COMMON, "--model-tag", tag, "--resume-from-step", "-2", "--log-json", str(log)], second)
    assert f"step 3 (written by {first} ranks, now {second})" in out.stdout
    full, _ = read_log(root / "ref.jsonl")
    resumed, _ = read_log(log)
    assert sorted(resumed) == [3, 4, 5]
    for step in resumed:
        assert resumed[step] == pytest.approx(full[step], abs=1e-5)
    ref_meta = json.loads((src.parent / "ref" / "meta_000006.json").read_text())
    meta = json.loads((dst / "meta_000006.json").read_text())
    assert meta["loader_state"] == ref_meta["loader_state"]  # every row once, none skipped
    final = torch.load(dst / "model_000006.pt", weights_only=True)["model"]
    want = torch.load(src.parent / "ref" / "model_000006.pt", weights_only=True)["model"]
    for key in want:
        torch.testing.assert_close(final[key], want[key], rtol=0, atol=1e-5)


@pytest.mark.slow
def test_mid_train_resumes_two_ranks_on_one(base):  # noqa: F811 (the fixture imported above)
    """mid_train (chat_sft is the same program): 2 ranks save at step 2, one process continues; the losses
    are those of the 2-rank run, which lanes make the same as a single process's."""
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base), "OMP_NUM_THREADS": "1"}
    args = [*TINY, "--num-iterations", "4", "--eval-every", "-1", "--save-every", "2"]
    two = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    out = subprocess.run(
        [*two, "-m", "scripts.mid_train", *args, "--log-json", str(base / "two.jsonl")],
        cwd=repo, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    ckpt = base / "mid_checkpoints" / "d2"
    for path in ckpt.glob("*_000004*"):  # as if the 2-rank job died right after committing step 2
        path.unlink()
    run_stage("mid_train", [*args, "--resume-from-step", "-2", "--log-json", str(base / "one.jsonl")])
    full, resumed = read_losses(base / "two.jsonl"), read_losses(base / "one.jsonl")
    assert sorted(resumed) == [2, 3]
    for step in resumed:
        assert resumed[step] == pytest.approx(full[step], abs=1e-5)
    meta = json.loads((ckpt / "meta_000004.json").read_text())
    assert meta["ranks"] == 1 and len(meta["loader_state"]["lanes"]) == 4
