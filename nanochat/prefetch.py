"""Run an iterator in a background thread, a few items ahead of its consumer.

A training step should find its batch ready: reading and tokenizing shards, building synthetic rows and
planning MegaContext's working contexts are host work that can overlap the device's step instead of
preceding it. The producer thread only runs the iterator; an exception it raises is re-raised in the consumer
at the item where it happened, so a user error (say, a split too small for one batch) still reads as one line.

    batches = Prefetch(make_batches(), depth=2)
    for x, y in batches: ...
    batches.close()  # or let the process end: the thread is a daemon
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator

_END = object()


class _Raised:
    def __init__(self, error: BaseException):
        self.error = error


class Prefetch:
    """Iterates `items` in a daemon thread, at most `depth` items ahead of the consumer."""

    def __init__(self, items: Iterable, depth: int = 2):
        if depth < 1:
            raise ValueError(f"prefetch depth must be >= 1, got {depth}")
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._done = False
        self._thread = threading.Thread(target=self._run, args=(iter(items),), daemon=True, name="prefetch")
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, items: Iterator) -> None:
        try:
            for item in items:
                if not self._put(item):
                    return
            self._put(_END)
        except BaseException as e:  # handed to the consumer, raised there
            self._put(_Raised(e))

    def __iter__(self) -> Prefetch:
        return self

    def __next__(self):
        if self._done:
            raise StopIteration
        item = self._queue.get()
        if item is _END:
            self._done = True
            raise StopIteration
        if isinstance(item, _Raised):
            self._done = True
            raise item.error
        return item

    def close(self) -> None:
        """Stop the producer (it finishes the item it is making) and wait for it."""
        self._stop.set()
        self._thread.join(timeout=10)
