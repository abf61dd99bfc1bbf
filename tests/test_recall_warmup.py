"""Task rows (nanochat/tasks/recall_warmup.py) and the data schedule that places them (nanochat/tasks/schedule.py):
base_train's --recall-warmup-steps / --recall-frac and the defaults each objective brings."""

import random
import re
import sys

import pytest
import torch
from test_base_train import make_corpus
from test_longctx import UUID_RE

from nanochat.common import run_main
from nanochat.tasks import recall_warmup as rw
from nanochat.tasks.schedule import default_schedule


@pytest.mark.parametrize("frac", [0.1, 0.25, 0.5, 1.0])
def test_recall_steps_are_an_even_share_after_the_warmups(frac):
    sched = default_schedule("mega", 400, 512, copy_warmup=3, recall_warmup=5, recall_frac=frac)
    kinds = [sched.kind(s) for s in range(208)]
    assert kinds[:3] == ["copy"] * 3 and kinds[3:8] == ["recall"] * 5
    picked = [s for s in range(8, 208) if kinds[s] == "recall"]
    assert len(picked) == round(200 * frac)
    gaps = {b - a for a, b in zip(picked, picked[1:])}
    assert not gaps or max(gaps) - min(gaps) <= 1  # evenly spread
    assert set(kinds[8:]) <= {"recall", "text"}


def test_each_objective_brings_its_measured_schedule():
    """dense / mc: the copy warm-up then text (mc with half long-context rows); window / mega: no copy warm-up,
    54 % task-row steps from scratch, then 30 % (the MegaAttention recipe: 700 of 1300 steps)."""
    dense, mc = default_schedule("dense", 500, 512), default_schedule("mc", 500, 512)
    assert (dense.copy_warmup, dense.recall_warmup, dense.recall_frac, dense.longctx_frac) == (
        150,
        0,
        0.0,
        0.0,
    )
    assert (mc.copy_warmup, mc.recall_warmup, mc.recall_frac, mc.longctx_frac) == (150, 0, 0.0, 0.5)
    mega = default_schedule("mega", 1300, 256)
    assert (mega.copy_warmup, mega.recall_warmup, mega.recall_frac, mega.longctx_frac) == (0, 702, 0.3, 0.5)
    assert default_schedule("window", 1300, 256) == mega  # the twin trains on the same rows
    assert default_schedule("dense", 30, 512).copy_warmup == 10  # a third of a short run at most
    short = default_schedule("mega", 100, 128)  # task rows do not fit: none by default
    assert (short.recall_warmup, short.recall_frac) == (0, 0.0)


@pytest.fixture(scope="module")
def tokenizer():
    from nanochat.tasks.longctx import training_documents
    from nanochat.tokenizer import Tokenizer

    return Tokenizer.train_from_iterator(training_documents(40, seed=0), 1024)  # ~4 chars per token


@pytest.mark.parametrize("length", [rw.MIN_LENGTH, 512])
def test_task_row_asks_a_long_context_task_with_its_evidence_in_the_band(tokenizer, length):
    seen = set()
    for seed in range(24):
        rng = random.Random(seed)
        row, targets = rw.task_row(rng, tokenizer, length)
        assert row.shape == (length,) and targets.shape == (length - 1,)
        text = tokenizer.decode(row.tolist())
        kind = "pass key" if "pass key" in text else rw.MQAR_CUE if rw.MQAR_CUE in text else "VAR"
        # the answer's tokens end the row; the other targets are the values an MQAR question repeats
        t = targets.tolist()
        n = next(i for i, v in enumerate(reversed(t)) if v < 0)
        answer_ids = t[length - 1 - n :]
        assert n >= 1 and answer_ids == row[length - n :].tolist()
        answer = tokenizer.decode(answer_ids)
        uuid = (
            re.fullmatch(UUID_RE, answer.strip()) is not None
        )  # passkeys of both kinds (the zoom reads UUIDs)
        assert (answer.strip().isdigit() or (uuid and kind == "pass key")) and text.endswith(answer)
        seen.add(kind + " uuid" * uuid)
        repeated = [i for i, v in enumerate(t[: length - 1 - n]) if v >= 0]
        if kind == rw.MQAR_CUE:
            cue = len(tokenizer.encode(text[: text.rindex(rw.MQAR_CUE)]))
            assert repeated and min(repeated) >= cue - 2 and len(repeated) <= 2 * text.count(":")
            assert all(tokenizer.decode([t[i]]).strip().isdigit() and t[i] == row[i + 1] for i in repeated)
        else:
            assert not repeated
        # the answer's first mention (in the evidence) lies beyond a window of a fifth of the row, and after
        # its middle less a passkey statement (the BAND holds the evidence's end; a UUID's states it twice)
        first = len(tokenizer.encode(text[: text.index(answer.strip())]))
        statement = 40 + 2 * len(answer_ids) * uuid
        assert length * rw.BAND[0] - statement <= first and length - first >= length / 5, (kind, first)
    assert seen == {"pass key", "pass key uuid", rw.MQAR_CUE, "VAR"}


def test_recall_batch_replaces_every_row_by_a_task_row_seeded_by_content(tokenizer):
    rows = torch.randint(300, 1024, (6, 257), generator=torch.Generator().manual_seed(0))
    x, y = rw.recall_batch(rows[:, :-1], rows[:, 1:], 1, tokenizer)
    assert x.shape == y.shape == (6, 256) and ((y >= 0).sum(1) >= 1).all()  # answer-only targets
    assert ((y >= 0).sum(1) < 64).all()
    x2, _ = rw.recall_batch(rows[:, :-1], rows[:, 1:], 1, tokenizer)
    x3, _ = rw.recall_batch(rows[:, :-1], rows[:, 1:], 2, tokenizer)
    assert torch.equal(x, x2) and not torch.equal(x, x3)


def run_train(base, monkeypatch, *argv):
    from scripts import base_train

    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    monkeypatch.setattr(sys, "argv", ["base_train", *argv])
    run_main(base_train.main)


GEOMETRY = [
    "--depth", "2", "--max-seq-len", "256", "--device-batch-size", "1", "--total-batch-size", "256",
    "--eval-every", "-1", "--eval-tokens", "256", "--sample-every", "-1", "--save-every", "-1", "--dtype", "float32",
    "--device-type", "cpu",
]  # fmt: skip


def test_base_train_runs_recall_steps_after_the_copy_warmup_then_a_share(tmp_path, monkeypatch):
    """Steps 0-1 copy rows, 2-3 whole batches of task rows, then every second step a task-row step."""
    from nanochat.tasks import schedule

    make_corpus(tmp_path)
    calls = []

    def spy(x, y, seed, tokenizer):
        calls.append(x.shape[0])
        return rw.recall_batch(x, y, seed, tokenizer)

    monkeypatch.setattr(schedule, "recall_batch", spy)
    flags = ["--num-iterations", "8", "--copy-warmup-steps", "2", "--recall-warmup-steps", "2"]
    run_train(tmp_path, monkeypatch, *GEOMETRY, *flags, "--recall-frac", "0.5",
              "--attention", "window", "--mega-window", "16")  # fmt: skip
    assert calls == [1] * 4  # steps 2, 3, then 5 and 7 (the share, whole steps)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--mc", "--recall-warmup-steps", "2"], "error: --recall-warmup-steps / --recall-frac train attention"),
        (["--max-seq-len", "64", "--recall-frac", "0.1"], f"error: task-row steps need --max-seq-len >= {rw.MIN_LENGTH}"),
        (["--recall-frac", "1.5"], "error: warm-up steps must be >= 0 and --recall-frac / --longctx-frac in [0, 1]"),
    ],
)  # fmt: skip
def test_base_train_rejects_bad_recall_flags_in_one_line(tmp_path, monkeypatch, capsys, extra, message):
    make_corpus(tmp_path)
    with pytest.raises(SystemExit) as exc:
        run_train(tmp_path, monkeypatch, *GEOMETRY, "--num-iterations", "1", *extra)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith(message) and err.count("\n") == 1, err
