"""Far-recall warm-up rows (nanochat/tasks/recall_warmup.py) and base_train's --recall-warmup-steps/--recall-frac."""

import random
import sys

import pytest
import torch
from test_base_train import make_corpus

from nanochat.common import run_main
from nanochat.tasks import recall_warmup as rw
from nanochat.tasks.copy_warmup import COPY_WARMUP_IDS, copy_ids


def bindings(row: list[int], keys_hi: int) -> dict[int, list[list[int]]]:
    """Every occurrence of a key id with the VALUE_LEN ids after it: key -> [values, ...]."""
    out = {}
    for i, t in enumerate(row[: len(row) - rw.VALUE_LEN]):
        if t < keys_hi:
            out.setdefault(t, []).append(row[i + 1 : i + 1 + rw.VALUE_LEN])
    return out


@pytest.mark.parametrize("length", [rw.MIN_LENGTH, 257, 513, 4097])
def test_recall_row_asks_each_early_binding_again_at_the_end(length):
    lo, hi = COPY_WARMUP_IDS
    keys_hi = lo + rw.KEY_IDS
    for seed in range(20):
        row, targets = rw.recall_row(torch.Generator().manual_seed(seed), length, (lo, hi))
        assert row.shape == (length,) and targets.shape == (length - 1,)
        assert int(row.min()) >= lo and int(row.max()) < hi
        r, t = row.tolist(), targets.tolist()
        found = bindings(r, keys_hi)
        assert len(found) == rw.BINDINGS and all(len(v) == 2 and v[0] == v[1] for v in found.values())
        tail = rw.BINDINGS * (1 + rw.VALUE_LEN)
        firsts = [r.index(k) for k in found]
        assert (
            min(firsts) >= int(length * rw.BAND[0]) and max(firsts) < length * rw.BAND[1]
        )  # bound early ...
        assert all(r.index(k, f + 1) >= length - tail for k, f in zip(found, firsts))  # ... asked at the end
        values = {v for vs in found.values() for v in vs[0]}
        assert all(keys_hi <= v < keys_hi + rw.VALUE_IDS for v in values)
        # the targets are exactly the values of the final listing, in the shifted (next-token) frame
        want = [-1] * (length - 1)
        for k in found:
            q = r.index(k, r.index(k) + 1)
            want[q : q + rw.VALUE_LEN] = found[k][1]
        assert t == want and sum(x >= 0 for x in t) == rw.BINDINGS * rw.VALUE_LEN


def test_recall_row_refuses_a_row_too_short():
    with pytest.raises(ValueError, match=f"at least {rw.MIN_LENGTH} tokens"):
        rw.recall_row(torch.Generator().manual_seed(0), rw.MIN_LENGTH - 1, COPY_WARMUP_IDS)


def test_recall_batch_is_seeded_by_content():
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(1000, 4096, (50, 257), generator=g)  # ids outside COPY_WARMUP_IDS
    x, y = rw.recall_batch(rows[:, :-1], rows[:, 1:], seed=1)
    assert x.shape == y.shape == (50, 256) and ((y >= 0).sum(1) == rw.BINDINGS * rw.VALUE_LEN).all()
    assert (x < COPY_WARMUP_IDS[1]).all()  # every row replaced
    x2, _ = rw.recall_batch(rows[:, :-1], rows[:, 1:], seed=1)
    x3, _ = rw.recall_batch(rows[:, :-1], rows[:, 1:], seed=2)
    assert torch.equal(x, x2) and not torch.equal(x, x3)
    with pytest.raises(ValueError, match="recall rows are one of ids, tasks, mixed"):
        rw.recall_batch(rows[:, :-1], rows[:, 1:], seed=1, kind="words")


@pytest.mark.parametrize("frac", [0.1, 0.25, 0.5, 1.0])
def test_recall_steps_are_an_even_share(frac):
    picked = [s for s in range(200) if rw.is_recall_step(s, frac)]
    assert len(picked) == round(200 * frac)
    gaps = {b - a for a, b in zip(picked, picked[1:])}
    assert max(gaps) - min(gaps) <= 1  # evenly spread
    assert not any(rw.is_recall_step(s, 0.0) for s in range(200))


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
        seen.add(kind)
        # the answer's tokens end the row; the other targets are the values an MQAR question repeats
        t = targets.tolist()
        n = next(i for i, v in enumerate(reversed(t)) if v < 0)
        answer_ids = t[length - 1 - n :]
        assert n >= 1 and answer_ids == row[length - n :].tolist()
        answer = tokenizer.decode(answer_ids)
        assert answer.strip().isdigit() and text.endswith(answer)
        repeated = [i for i, v in enumerate(t[: length - 1 - n]) if v >= 0]
        if kind == rw.MQAR_CUE:
            cue = len(tokenizer.encode(text[: text.rindex(rw.MQAR_CUE)]))
            assert repeated and min(repeated) >= cue - 2 and len(repeated) <= 2 * text.count(":")
            assert all(tokenizer.decode([t[i]]).strip().isdigit() and t[i] == row[i + 1] for i in repeated)
        else:
            assert not repeated
        # the answer's first mention (in the evidence) lies beyond a window of a fifth of the row, and after
        # its middle less a passkey statement (the BAND holds the evidence's end)
        first = len(tokenizer.encode(text[: text.index(answer.strip())]))
        assert length * rw.BAND[0] - 40 <= first and length - first >= length / 5, (kind, first)
    assert seen == {"pass key", rw.MQAR_CUE, "VAR"}


def test_mixed_recall_batch_holds_both_kinds(tokenizer):
    rows = torch.randint(300, 1024, (20, 513), generator=torch.Generator().manual_seed(0))
    x, _ = rw.recall_batch(rows[:, :-1], rows[:, 1:], 0, vocab_size=1024, kind="mixed", tokenizer=tokenizer)
    lo, hi = copy_ids(1024)
    planted = ((x >= lo) & (x < hi)).all(1)  # an ids row is made of copy ids only, a task row of text
    assert 5 <= planted.sum() <= 15


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
    """Steps 0-1 copy rows, 2-3 whole batches of recall rows, then every second step a recall step."""
    from scripts import base_train

    make_corpus(tmp_path)
    calls = []

    def spy(x, y, seed, vocab_size=None, kind="ids", tokenizer=None):
        calls.append((x.shape[0], kind))
        return rw.recall_batch(x, y, seed, vocab_size, kind, tokenizer)

    monkeypatch.setattr(base_train, "recall_batch", spy)
    flags = ["--num-iterations", "8", "--copy-warmup-steps", "2", "--recall-warmup-steps", "2"]
    run_train(tmp_path, monkeypatch, *GEOMETRY, *flags, "--recall-frac", "0.5", "--recall-kind", "ids,tasks",
              "--attention", "window", "--mega-window", "16")  # fmt: skip
    # steps 2, 3 (the warm-up's kind), then 5 and 7 (the share, whole steps, of the later kind)
    assert calls == [(1, "ids")] * 2 + [(1, "tasks")] * 2


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--mc", "--recall-warmup-steps", "2"], "error: --recall-warmup-steps / --recall-frac train attention"),
        (["--max-seq-len", "64", "--recall-frac", "0.1"], f"error: recall rows need --max-seq-len >= {rw.MIN_LENGTH}"),
        (["--recall-frac", "1.5"], "error: --recall-warmup-steps must be >= 0 and --recall-frac in [0, 1]"),
        (["--recall-kind", "ids,words"], "error: --recall-kind takes KIND or WARMUP,LATER of ids, tasks, mixed"),
    ],
)  # fmt: skip
def test_base_train_rejects_bad_recall_flags_in_one_line(tmp_path, monkeypatch, capsys, extra, message):
    make_corpus(tmp_path)
    with pytest.raises(SystemExit) as exc:
        run_train(tmp_path, monkeypatch, *GEOMETRY, "--num-iterations", "1", *extra)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith(message) and err.count("\n") == 1, err
