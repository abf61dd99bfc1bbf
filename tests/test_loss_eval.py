"""evaluate_bpb on cases whose answer is worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from nanochat.common import UserError
from nanochat.loss_eval import bpb_by_position, bpb_of, evaluate_bpb, position_edges, position_totals


class FixedLogits(torch.nn.Module):
    """The same logits at every position, whatever the input."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits

    def forward(self, x, y, loss_reduction="mean"):
        logits = self.logits.expand(*x.shape, -1)
        return F.cross_entropy(
            logits.reshape(-1, logits.size(-1)), y.reshape(-1), ignore_index=-1, reduction=loss_reduction
        )


def test_uniform_model_by_hand():
    """Uniform over V=4: every token costs ln 4 = 2 bits. Token 0 is a special (0 bytes), tokens 1..3
    stand for 1, 2 and 3 bytes; targets -1 are ignored.

    targets [[1, 2, 0], [3, -1, 1]]: counted tokens 1, 2, 3, 1 -> 4 tokens, 1+2+3+1 = 7 bytes.
    bpb = 4 * 2 bits / 7 bytes.
    """
    token_bytes = torch.tensor([0, 1, 2, 3])
    model = FixedLogits(torch.zeros(4))
    x = torch.zeros(2, 3, dtype=torch.long)
    y = torch.tensor([[1, 2, 0], [3, -1, 1]])
    assert evaluate_bpb(model, [(x, y)], 1, token_bytes) == pytest.approx(8 / 7)


def test_skewed_model_sums_nats_over_bytes():
    """p(token 1) = 1/2, p(token 2) = p(token 3) = 1/4: token 1 costs 1 bit, tokens 2 and 3 cost 2 bits.
    Two batches: targets [1, 1] then [2, 3] -> bits 1+1+2+2 = 6; bytes 1+1+2+3 = 7."""
    token_bytes = torch.tensor([0, 1, 2, 3])
    logits = torch.log(torch.tensor([1e-30, 0.5, 0.25, 0.25]))
    model = FixedLogits(logits)
    x = torch.zeros(1, 2, dtype=torch.long)
    batches = [(x, torch.tensor([[1, 1]])), (x, torch.tensor([[2, 3]]))]
    assert evaluate_bpb(model, iter(batches), 2, token_bytes) == pytest.approx(6 / 7, rel=1e-6)
    # only the first `steps` batches count
    assert evaluate_bpb(model, iter(batches), 1, token_bytes) == pytest.approx(2 / 2, rel=1e-6)


def test_bpb_is_tokenizer_invariant_for_the_same_text_cost():
    """Merging two 1-byte tokens into one 2-byte token of the same total probability leaves bpb alone."""
    split = FixedLogits(torch.log(torch.tensor([1e-30, 0.5, 0.5])))  # 'a' = 1 bit, 1 byte
    merged = FixedLogits(torch.log(torch.tensor([1e-30, 0.25, 0.75])))  # 'aa' = 2 bits, 2 bytes
    bpb_split = evaluate_bpb(
        split, [(torch.zeros(1, 2, dtype=torch.long), torch.tensor([[1, 1]]))], 1, torch.tensor([0, 1, 1])
    )
    bpb_merged = evaluate_bpb(
        merged, [(torch.zeros(1, 1, dtype=torch.long), torch.tensor([[1]]))], 1, torch.tensor([0, 2, 1])
    )
    assert bpb_split == pytest.approx(1.0) and bpb_merged == pytest.approx(1.0)


def test_running_out_of_batches_is_a_user_error():
    model = FixedLogits(torch.zeros(4))
    batch = (torch.zeros(1, 2, dtype=torch.long), torch.tensor([[1, 2]]))
    with pytest.raises(UserError, match="ran out 2 batches short of 3"):
        evaluate_bpb(model, [batch], 3, torch.tensor([0, 1, 2, 3]))


def test_only_specials_gives_inf():
    model = FixedLogits(torch.zeros(4))
    batch = (torch.zeros(1, 2, dtype=torch.long), torch.tensor([[0, -1]]))
    assert math.isinf(evaluate_bpb(model, [batch], 1, torch.tensor([0, 1, 2, 3])))


class PositionCost(torch.nn.Module):
    """Uniform over V=4 (2 bits a token) in the first half of a row, certain of the target in the second."""

    def forward(self, x, y, loss_reduction="mean"):
        T = x.size(1)
        logits = torch.zeros(*x.shape, 4)
        late = torch.arange(T) >= T // 2
        logits[:, late] = F.one_hot(y.clamp(min=0), 4).float()[:, late] * 100
        return F.cross_entropy(
            logits.reshape(-1, 4), y.reshape(-1), ignore_index=-1, reduction=loss_reduction
        )


def test_bpb_by_position_splits_the_same_sums_by_where_the_target_sits():
    """Rows of 8 targets, 1 byte each: positions 0-3 cost 2 bits, 4-7 nothing. The buckets say so, their
    bytes-weighted mean is the whole bpb, and a bucket with no bytes (only BOS targets) is inf."""
    token_bytes = torch.tensor([0, 1, 1, 1])
    x = torch.zeros(3, 8, dtype=torch.long)
    y = torch.tensor([[1, 2, 3, 1, 2, 3, 1, 2]] * 3)
    totals = position_totals(PositionCost(), [(x, y)], 1, token_bytes)
    assert totals.shape == (2, 8) and totals[1].tolist() == [3.0] * 8
    assert bpb_of(totals) == pytest.approx(1.0)
    assert evaluate_bpb(PositionCost(), [(x, y)], 1, token_bytes) == pytest.approx(1.0)
    assert bpb_by_position(totals, [0, 2, 4, 8]) == pytest.approx([2.0, 2.0, 0.0], abs=1e-6)
    y0 = y.clone()
    y0[:, 0] = 0  # BOS targets: no bytes
    by_position = bpb_by_position(position_totals(PositionCost(), [(x, y0)], 1, token_bytes), [0, 1, 8])
    assert math.isinf(by_position[0]) and by_position[1] == pytest.approx(6 / 7, abs=1e-6)
    assert position_edges(256) == [0, 8, 32, 64, 128, 256]
    assert position_edges(16) == [0, 2, 4, 8, 16]
