"""Work made ahead by threads, delivered in order: streamed tar shards decode their next batches while the
training step runs (`prefetched`), their images several at once (`ordered_map`).

Threads, not worker processes: the stream's order (and so resume) depends on reading its shards in one sequence,
and its bad samples go to the quarantine of this process. Decoding and resizing (PIL) and the step (torch) release
the GIL, so they overlap.
"""
from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor
from typing import TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")

_POLL_SECONDS = 0.1  # how often a blocked producer looks whether the consumer has gone


class _Raised:
    """An exception of the producer, carried to the consumer to be raised there, at the item that failed."""

    def __init__(self, error: BaseException):
        self.error = error


_END = object()


def prefetched(items: Iterator[Item], depth: int) -> Iterator[Item]:
    """`items` in the same order, up to `depth` of them made ahead by a thread; `depth` 0 is `items` itself.

    The producer's exceptions reach the consumer when it asks for that item. Closing the returned generator (or
    dropping it) stops the thread after the item it is making."""
    if depth < 1:
        return items
    return _prefetch(items, depth)


def _prefetch(items: Iterator[Item], depth: int) -> Iterator[Item]:
    made: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(value) -> bool:
        while not stop.is_set():
            try:
                made.put(value, timeout=_POLL_SECONDS)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(_END)
        except BaseException as error:  # noqa: BLE001 - every failure is the consumer's to see
            put(_Raised(error))

    thread = threading.Thread(target=produce, name="t2i-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            value = made.get()
            if value is _END:
                return
            if isinstance(value, _Raised):
                raise value.error
            yield value
    finally:
        stop.set()
        thread.join()


def ordered_map(function: Callable[[Item], Result], items: Iterable[Item], pool: Executor | None,
                ahead: int) -> Iterator[Result]:
    """`function(item)` for every item, in the items' order; with a `pool`, up to `ahead` + 1 calls run in its
    threads at once. A call's exception is raised when its result's turn comes."""
    if pool is None:
        yield from map(function, items)
        return
    pending: deque = deque()
    for item in items:
        pending.append(pool.submit(function, item))
        if len(pending) > ahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()
