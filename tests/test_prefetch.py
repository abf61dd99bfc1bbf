"""nanochat/prefetch.py: a background iterator yields the same items in order, re-raises its producer's
errors in the consumer, and stays a bounded number of items ahead."""

import threading
import time

import pytest

from nanochat.common import UserError
from nanochat.prefetch import Prefetch


def test_items_arrive_in_order_and_the_producer_runs_in_another_thread():
    threads = []

    def produce():
        for i in range(20):
            threads.append(threading.get_ident())
            yield i

    assert list(Prefetch(produce(), depth=3)) == list(range(20))
    assert set(threads) == {threads[0]} and threads[0] != threading.get_ident()


def test_a_producer_error_is_raised_in_the_consumer_at_its_item():
    def produce():
        yield 1
        yield 2
        raise UserError("the val split has fewer than B*T+1 tokens")

    it = Prefetch(produce())
    assert [next(it), next(it)] == [1, 2]
    with pytest.raises(UserError, match="fewer than"):
        next(it)
    with pytest.raises(StopIteration):
        next(it)


def test_the_producer_stays_at_most_depth_items_ahead_and_stops_on_close():
    made = []

    def produce():
        for i in range(1000):
            made.append(i)
            yield i

    it = Prefetch(produce(), depth=2)
    assert next(it) == 0
    time.sleep(0.3)
    assert len(made) <= 1 + 2 + 1  # the consumed item, a full queue, and the one waiting to be queued
    it.close()
    n = len(made)
    time.sleep(0.2)
    assert len(made) == n and not it._thread.is_alive()
