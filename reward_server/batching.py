"""Request micro-batching for an asyncio server (the Ray reward actor is one).

Concurrent `submit` calls are merged into one call of a batch function, one batch at a time (in a worker thread,
so the event loop keeps taking requests). While the function is idle, a batch starts when the waiting requests
hold `max_items` items or `max_wait_s` after the first of them, whichever comes first. While it is busy, requests
simply wait, and the moment it is done the next batch starts with everything waiting (up to `max_items`): the
busier the server, the bigger its batches, and no request waits behind a queue of small ones.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

P = TypeVar("P")
R = TypeVar("R")


@dataclass
class BatchStats:
    batches: int = 0
    items: int = 0
    requests: int = 0

    @property
    def mean_batch_items(self) -> float:
        return self.items / self.batches if self.batches else 0.0


class MicroBatcher(Generic[P, R]):
    def __init__(self, fn: Callable[[list[P]], list[R]], max_items: int, max_wait_s: float):
        """`fn` maps a list of request payloads to one result per payload, in order."""
        self.fn, self.max_items, self.max_wait_s = fn, max_items, max_wait_s
        self.stats = BatchStats()
        self._pending: list[tuple[P, int, asyncio.Future]] = []
        self._pending_items = 0
        self._timer: asyncio.TimerHandle | None = None
        self._busy = False  # a batch is in the worker thread
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="microbatch")

    async def submit(self, payload: P, size: int = 1) -> R:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._pending.append((payload, size, future))
        self._pending_items += size
        if not self._busy:  # when busy, the running batch starts the next one as it ends
            if self._pending_items >= self.max_items:
                self._start_batch()
            elif self._timer is None:
                self._timer = loop.call_later(self.max_wait_s, self._start_batch)
        return await future

    def _start_batch(self) -> None:
        """Hand the waiting requests, in order, up to the first that brings the batch to max_items, to the worker."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._busy or not self._pending:
            return
        taken, items = 0, 0
        while taken < len(self._pending) and items < self.max_items:
            items += self._pending[taken][1]
            taken += 1
        batch, self._pending = self._pending[:taken], self._pending[taken:]
        self._pending_items -= items
        self._busy = True
        asyncio.get_running_loop().create_task(self._run(batch))

    async def _run(self, batch: list[tuple[P, int, asyncio.Future]]) -> None:
        loop = asyncio.get_running_loop()
        try:
            results: list[Any] = await loop.run_in_executor(self._executor, self.fn, [p for p, _, _ in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"batch function returned {len(results)} results for {len(batch)} requests")
        except Exception as err:  # every waiting request learns what went wrong
            for _, _, future in batch:
                if not future.done():
                    future.set_exception(err)
        else:
            self.stats.batches += 1
            self.stats.requests += len(batch)
            self.stats.items += sum(size for _, size, _ in batch)
            for (_, _, future), result in zip(batch, results):
                if not future.done():
                    future.set_result(result)
        finally:
            self._busy = False
            self._start_batch()  # what arrived meanwhile goes at once: it has waited a whole batch already
