"""Request micro-batching for an asyncio server (the Ray reward actor is one).

Concurrent `submit` calls are merged into one call of a batch function. A batch closes when it holds
at least `max_items` items or `max_wait_s` after its first request, whichever comes first; batches
run one at a time in a worker thread, so requests that arrive while the model is busy queue up and
form the next, larger batch (the busier the server, the bigger its batches).
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
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="microbatch")

    async def submit(self, payload: P, size: int = 1) -> R:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._pending.append((payload, size, future))
        self._pending_items += size
        if self._pending_items >= self.max_items:
            self._flush()
        elif self._timer is None:
            self._timer = loop.call_later(self.max_wait_s, self._flush)
        return await future

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch, self._pending, self._pending_items = self._pending, [], 0
        if batch:
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
            return
        self.stats.batches += 1
        self.stats.requests += len(batch)
        self.stats.items += sum(size for _, size, _ in batch)
        for (_, _, future), result in zip(batch, results):
            if not future.done():
                future.set_result(result)
