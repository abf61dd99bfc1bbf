"""What a block of code asks of the device: ATen ops dispatched and host synchronisations.

On a GPU every dispatched op is about one kernel launch, and a small model's training step is mostly launch
overhead, so the op count of a step is its cost in a unit that does not depend on the machine it was counted
on (bench_train reports it). A host synchronisation is a device value read back to Python (.item(), float(t),
.tolist(), .cpu(), a boolean mask's nonzero...): the host stops queueing work until the device has caught up,
so a step with one inside runs at the speed of its slowest kernel queue. On CUDA
torch.cuda.set_sync_debug_mode catches them; this also catches them on a CPU, where nothing actually waits.

    with OpCount() as c:
        loss = model(x, y); loss.backward()
    c.ops, c.syncs  # ops dispatched, ["Tensor.item", "aten.nonzero", ...]
    with OpCount(forbid_syncs=True): ...  # raises HostSyncError at the first sync instead
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Python-level reads of a device value (each one a host sync on a GPU).
HOST_READS = ("item", "tolist", "__float__", "__int__", "__bool__", "cpu", "numpy")
# ATen ops whose result size or value the host must see before it can go on.
SYNC_OPS = {
    "_local_scalar_dense",
    "nonzero",
    "masked_select",
    "is_nonzero",
    "equal",
    "_unique2",
    "unique_dim",
}
BOOL_INDEX_OPS = {"index", "index_put", "index_put_", "_index_put_impl_"}


class HostSyncError(RuntimeError):
    """A host synchronisation happened where none is allowed."""


class _Dispatch(TorchDispatchMode):
    def __init__(self, owner: OpCount):
        super().__init__()
        self.owner = owner

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.owner.ops += 1
        name = func.overloadpacket.__name__
        if self.owner._in_read == 0 and _syncs(name, args, kwargs):
            self.owner._sync(f"aten.{name}")
        return func(*args, **kwargs)


def _syncs(name: str, args, kwargs) -> bool:
    if name in SYNC_OPS:
        return True
    if name in BOOL_INDEX_OPS:  # a boolean mask index becomes nonzero: its size is read back
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        return any(
            isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ()
        )
    if name == "_to_copy":  # device -> host copy
        src, device = args[0], kwargs.get("device")
        return device is not None and torch.device(device).type == "cpu" and src.device.type != "cpu"
    if name == "copy_":
        dst, src = args[0], args[1]
        return dst.device.type == "cpu" and src.device.type != "cpu"
    return False


class OpCount:
    """Counts ops and host syncs in a `with` block (this thread, autograd's backward included)."""

    def __init__(self, forbid_syncs: bool = False):
        self.forbid_syncs = forbid_syncs
        self.ops = 0
        self.syncs: list[str] = []
        self._in_read = 0
        self._saved: dict = {}

    def _sync(self, what: str) -> None:
        self.syncs.append(what)
        if self.forbid_syncs:
            raise HostSyncError(f"host synchronisation inside a sync-free block: {what}")

    def _wrap(self, name: str, original):
        def read(tensor, *args, **kwargs):
            if self._in_read == 0:
                self._sync(f"Tensor.{name}")
            self._in_read += 1
            try:
                return original(tensor, *args, **kwargs)
            finally:
                self._in_read -= 1

        return read

    def __enter__(self) -> OpCount:
        for name in HOST_READS:
            self._saved[name] = getattr(torch.Tensor, name)
            setattr(torch.Tensor, name, self._wrap(name, self._saved[name]))
        self._mode = _Dispatch(self)
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)
        self._saved.clear()
