"""scripts/recall_eval.py: far-recall rows scored under a checkpoint's own attention and with the window alone."""

import json
import math
import random
import sys

import pytest
import torch
from test_base_train import make_corpus
from test_recall_warmup import GEOMETRY, run_train

from nanochat.common import run_main
from nanochat.tasks import recall_warmup as rw
from scripts import recall_eval

V = 50


def test_target_nll_of_an_oracle_and_of_a_uniform_model():
    targets = torch.tensor([-1, 3, 7, -1, 1])
    oracle = torch.full((5, V), -30.0)
    oracle[torch.arange(5), targets.clamp(min=0)] = 30.0
    nll, exact = recall_eval.target_nll(oracle, targets)
    assert nll < 1e-6 and exact
    nll, exact = recall_eval.target_nll(torch.zeros(5, V), targets)
    assert nll == pytest.approx(math.log(V)) and not exact


def test_score_reads_the_whole_row_with_the_model_and_only_the_tail_with_the_gpt():
    """The model sees the whole row and knows the answers; the GPT sees just the last `tail` tokens and is
    uniform: nll ~ 0 and 100 % exact against tail_nll = ln V, per task."""
    tail, seen = 8, []

    def oracle(x):
        out = torch.full((1, x.shape[1], V), -30.0)
        out[0, torch.arange(x.shape[1]), x[0].roll(-1) % V] = 30.0  # the next input id is the target
        return out

    def uniform(x):
        seen.append(x.shape[1])
        return torch.zeros(1, x.shape[1], V)

    rows = []
    for kind in ("passkey", "mqar"):
        row = torch.randint(0, V, (33,))
        targets = torch.full((32,), -1)
        targets[-3:-1] = row[-3:-1]  # targets[i] = row[i + 1]: the next input id, as the oracle predicts
        rows.append((kind, row, targets))
    out = recall_eval.score(oracle, uniform, rows, tail, "cpu")
    assert set(out) == {"passkey", "mqar"} and seen == [tail, tail]
    for r in out.values():
        assert r["n"] == 1 and r["nll"] < 1e-4 and r["exact_pct"] == 100.0
        assert r["tail_nll"] == pytest.approx(math.log(V), abs=1e-4)


def test_task_rows_cycle_through_the_tasks_and_are_seeded():
    from nanochat.tasks.longctx import training_documents
    from nanochat.tokenizer import Tokenizer

    tok = Tokenizer.train_from_iterator(training_documents(20, seed=0), 512)
    rows = recall_eval.make_rows(6, rw.MIN_LENGTH, tok, seed=3)
    assert [k for k, _, _ in rows] == sorted(rw.TASK_KWARGS) * 2
    again = recall_eval.make_rows(6, rw.MIN_LENGTH, tok, seed=3)
    assert all(torch.equal(a[1], b[1]) for a, b in zip(rows, again))
    other = recall_eval.make_rows(6, rw.MIN_LENGTH, tok, seed=4)
    assert not all(torch.equal(a[1], b[1]) for a, b in zip(rows, other))
    with pytest.raises(ValueError, match="task rows are one of"):
        rw.task_row(random.Random(0), tok, rw.MIN_LENGTH, task="sudoku")


def test_recall_eval_scores_a_mega_checkpoint_end_to_end(tmp_path, monkeypatch, capsys):
    make_corpus(tmp_path)
    mega = ["--attention", "mega", "--mega-window", "16", "--mega-block-size", "8"]
    flags = ["--num-iterations", "2", "--recall-warmup-steps", "2"]
    run_train(tmp_path, monkeypatch, *GEOMETRY, *flags, *mega, "--model-tag", "m")
    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", ["recall_eval", "--model-tag", "m", "--n", "3", "--device-type", "cpu"])
    run_main(recall_eval.main)
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["checkpoint"] == "m@2" and line["attention"] == "mega" and line["tail"] == 16
    assert line["seq_len"] == rw.MIN_LENGTH
    for task in rw.TASK_KWARGS:
        r = line[task]
        assert (
            r["n"] == 1
            and math.isfinite(r["nll"])
            and math.isfinite(r["tail_nll"])
            and r["exact_pct"] in (0, 100)
        )
    # a row shorter than a recall row is a one-line error
    monkeypatch.setattr(
        sys, "argv", ["recall_eval", "--model-tag", "m", "--seq-len", "64", "--device-type", "cpu"]
    )
    with pytest.raises(SystemExit) as exc:
        run_main(recall_eval.main)
    assert exc.value.code == 2
    assert f"error: recall rows need at least {rw.MIN_LENGTH} tokens" in capsys.readouterr().err
