"""nanochat/op_count.py: it sees every kind of host read it is meant to catch, and counts dispatched ops."""

import pytest
import torch

from nanochat.op_count import HostSyncError, OpCount

READS = {
    "Tensor.item": lambda t: t.sum().item(),
    "Tensor.__float__": lambda t: float(t.sum()),
    "Tensor.__int__": lambda t: int(t.sum()),
    "Tensor.__bool__": lambda t: bool(t.sum() > 0),
    "Tensor.tolist": lambda t: t.tolist(),
    "Tensor.cpu": lambda t: t.cpu(),
    "Tensor.numpy": lambda t: t.numpy(),
    "aten.nonzero": lambda t: torch.nonzero(t > 0),
    "aten.index": lambda t: t[t > 0],  # a boolean mask: its size is read back
    "aten.masked_select": lambda t: torch.masked_select(t, t > 0),
}


@pytest.mark.parametrize("what", sorted(READS))
def test_every_host_read_is_seen_and_can_be_forbidden(what):
    t = torch.randn(8)
    with OpCount() as c:
        READS[what](t)
    assert c.syncs == [what]  # once, however the read is implemented underneath
    with pytest.raises(HostSyncError, match=what.replace(".", r"\.")), OpCount(forbid_syncs=True):
        READS[what](t)
    t.tolist()  # the patches are gone after the block


def test_ops_are_counted_forward_and_backward_and_sync_free_code_passes():
    w = torch.randn(4, 4, requires_grad=True)
    with OpCount(forbid_syncs=True) as c:
        (w @ w).relu().sum()
    forward = c.ops
    with OpCount(forbid_syncs=True) as c:
        (w @ w).relu().sum().backward()
    assert forward >= 3 and c.ops > forward and c.syncs == []
