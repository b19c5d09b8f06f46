"""Batching of concurrent sample requests into shared forward passes.

Requests (``n`` samples conditioned on one site, with a hashable ``key`` naming how they are
sampled: the server's sampler, spacing and step count) wait in an asyncio queue. One worker
takes the first, then collects more for up to ``max_wait_s`` or until ``max_batch`` samples,
and runs ONE call of ``run(site_ids, key)`` in a worker thread for the concatenated condition
ids of every request with the same key (the network
takes a per-sample condition, so many sites share each forward pass). The result is split
back, in order, to the waiting requests. While a batch runs, new requests queue up and form
the next batch. With ``batching=False`` each request runs alone (the naive server the bench
compares against).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["BatchInfo", "Batcher"]

log = logging.getLogger(__name__)

RunFn = Callable[[Tensor, Hashable], Tensor]
"""``run(site_ids [N] long, key) -> [N, ...]`` (one row per sample), in a worker thread."""


@dataclass
class _Request:
    site: str
    site_index: int
    n: int
    key: Hashable
    future: asyncio.Future[Tensor] = field(repr=False)


@dataclass(frozen=True)
class BatchInfo:
    """What one shared forward-pass batch did (for metrics)."""

    sizes: dict[str, int]  # site -> samples in this batch
    key: Hashable
    seconds: float

    @property
    def total(self) -> int:
        return sum(self.sizes.values())


class Batcher:
    """Collects requests and runs them in shared batches (see the module docstring)."""

    def __init__(
        self,
        run: RunFn,
        *,
        max_batch: int = 256,
        max_wait_s: float = 0.01,
        batching: bool = True,
        on_batch: Callable[[BatchInfo], None] | None = None,
    ) -> None:
        if max_batch < 1 or max_wait_s < 0:
            raise ValueError(
                f"max_batch ({max_batch}) must be >= 1 and max_wait_s ({max_wait_s}) >= 0"
            )
        self.run, self.max_batch, self.max_wait_s = run, max_batch, max_wait_s
        self.batching, self.on_batch = batching, on_batch
        self._queue: asyncio.Queue[_Request] = asyncio.Queue()
        self._carry: _Request | None = None
        self._task: asyncio.Task[None] | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batcher")

    async def start(self) -> None:
        self._task = asyncio.create_task(self._work(), name="batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._executor.shutdown(wait=True, cancel_futures=True)

    async def submit(self, site: str, site_index: int, n: int, key: Hashable) -> Tensor:
        """Queue ``n`` samples for ``site`` sampled as ``key`` says; returns their rows of
        ``run``'s output ``[n, ...]``."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        future: asyncio.Future[Tensor] = asyncio.get_running_loop().create_future()
        await self._queue.put(_Request(site, site_index, n, key, future))
        return await future

    @property
    def queued(self) -> int:
        return self._queue.qsize() + (self._carry is not None)

    async def _collect(self) -> list[_Request]:
        """The next batch: the first request, then more until full or the wait is over."""
        first = self._carry or await self._queue.get()
        self._carry = None
        batch, total = [first], first.n
        if not self.batching:
            return batch
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait_s
        while total < self.max_batch:
            timeout = deadline - loop.time()
            try:
                item = (
                    self._queue.get_nowait()
                    if timeout <= 0
                    else await asyncio.wait_for(self._queue.get(), timeout)
                )
            except (asyncio.QueueEmpty, TimeoutError):
                break
            if total + item.n > self.max_batch:
                self._carry = item  # first in the next batch
                break
            batch.append(item)
            total += item.n
        return batch

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            groups: dict[Hashable, list[_Request]] = {}
            for req in batch:
                if not req.future.done():  # the caller may have gone away
                    groups.setdefault(req.key, []).append(req)
            for key, reqs in groups.items():
                ids = torch.cat([torch.full((r.n,), r.site_index, dtype=torch.long) for r in reqs])
                start = time.perf_counter()
                try:
                    out = await loop.run_in_executor(self._executor, self.run, ids, key)
                except Exception as exc:  # hand the failure to every caller of the batch
                    log.exception("sample batch failed")
                    for r in reqs:
                        if not r.future.done():
                            r.future.set_exception(exc)
                    continue
                seconds = time.perf_counter() - start
                offset = 0
                sizes: dict[str, int] = {}
                for r in reqs:
                    if not r.future.done():
                        r.future.set_result(out[offset : offset + r.n])
                    offset += r.n
                    sizes[r.site] = sizes.get(r.site, 0) + r.n
                if self.on_batch is not None:
                    self.on_batch(BatchInfo(sizes, key, seconds))
