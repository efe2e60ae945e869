"""Dynamic batching: requests' images, whatever their adapters, run as one pass of the backbone.

Three kinds of work, each on its own bounded executor so that none starves another: the event loop
reads requests, a pool of `decode_workers` threads decodes and preprocesses images, and one model
thread runs one batch at a time (torch uses every core inside it). The first request of a batch waits
up to `max_wait_ms` for others, and on for images that are being decoded (they are seconds away at
most, and will fit): under load, as clients whose answers just left send their next images, batches
fill up to `max_batch` instead of splitting the clients into two half batches that take turns -- on
this CPU a batch of 16 costs ~10% more per image than one of 32 (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import torch

from .limits import HTTPError
from .metrics import Metrics
from .multi import MultiAdapterModel

DECODE_WAIT = 0.25  # seconds a batch may wait on for images in the decode pool (a batch of 32 photos: ~0.1)


@dataclass
class _Item:
    x: torch.Tensor  # (n, C, H, W) one request's preprocessed images
    adapter: str
    future: asyncio.Future


class Batcher:
    """Collects requests for up to `max_wait_ms` (or `max_batch` images) and runs them as one batch."""

    def __init__(self, model: MultiAdapterModel, max_batch: int = 32, max_wait_ms: float = 5.0,
                 decode_workers: int = 0, metrics: Metrics | None = None) -> None:
        self.model = model
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000
        self.metrics = metrics
        self.stats = {"requests": 0, "batches": 0, "largest_batch": 0}
        self.queued_images = 0
        self.decoding_images = 0  # admitted, body read, in the decode pool: about to be queued
        self.seconds_per_image = 0.05  # running estimate, for Retry-After
        self._queue: deque[_Item] = deque()
        self._arrived: asyncio.Event | None = None
        self._last_arrival = 0.0  # loop time an image last entered the decode pool or the queue
        self._model_thread = ThreadPoolExecutor(1, thread_name_prefix="pv-model")
        self._decoders = ThreadPoolExecutor(decode_workers or os.cpu_count() or 1, thread_name_prefix="pv-decode")

    # ------------------------------------------------------------------------- the handlers' side

    async def decode(self, prepare: Callable[[], torch.Tensor], images: int) -> torch.Tensor:
        """Run `prepare` (decode + preprocess `images` images) in the decode pool."""
        self.decoding_images += images
        self._last_arrival = asyncio.get_running_loop().time()
        try:
            return await asyncio.get_running_loop().run_in_executor(self._decoders, prepare)
        finally:
            self.decoding_images -= images
            if self._arrived is not None:
                self._arrived.set()  # a failed decode may end the batcher's wait for it

    async def submit(self, x: torch.Tensor, adapter: str) -> torch.Tensor:
        """(n, classes of `adapter`) probabilities of the (n, C, H, W) images `x`, once their batch has run."""
        if not self.running:
            raise HTTPError(503, "the server is starting or stopping", headers={"Retry-After": "1"})
        future = asyncio.get_running_loop().create_future()
        self._queue.append(_Item(x, adapter, future))
        self.queued_images += x.shape[0]
        self._last_arrival = asyncio.get_running_loop().time()
        self._arrived.set()
        return await future

    @property
    def running(self) -> bool:
        return self._arrived is not None

    def wait_estimate(self) -> float:
        """Seconds the images now queued need to clear (Retry-After)."""
        return (self.queued_images + self.max_batch) * self.seconds_per_image

    # ------------------------------------------------------------------------- the loop

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self._arrived = asyncio.Event()
        try:
            while True:
                while not self._queue:
                    self._arrived.clear()
                    await self._arrived.wait()
                first = loop.time()
                cap = first + self.max_wait + DECODE_WAIT
                while self.queued_images < self.max_batch:
                    # on while images keep arriving, or are being decoded; never past the cap
                    quiet = max(first, self._last_arrival) + self.max_wait
                    left = (cap if self.decoding_images else min(cap, quiet)) - loop.time()
                    if left <= 0:
                        break
                    self._arrived.clear()
                    try:
                        await asyncio.wait_for(self._arrived.wait(), left)
                    except asyncio.TimeoutError:
                        break
                await self._run_batch(self._take())
                await asyncio.sleep(0)  # let the answers go out before the next batch starts waiting
        finally:
            self._arrived = None
            for item in self._queue:
                if not item.future.done():
                    item.future.set_exception(HTTPError(503, "the server is stopping"))

    def _take(self) -> list[_Item]:
        """Requests from the front of the queue, as many as fit in `max_batch` images (at least one)."""
        batch, images = [], 0
        while self._queue and (not batch or images + self._queue[0].x.shape[0] <= self.max_batch):
            item = self._queue.popleft()
            self.queued_images -= item.x.shape[0]
            if not item.future.done():  # a request cancelled while it waited
                batch.append(item)
                images += item.x.shape[0]
        return batch

    async def _run_batch(self, batch: list[_Item]) -> None:
        live = []
        for item in batch:  # an adapter removed while its request waited fails that request only
            if item.adapter in self.model:
                live.append(item)
            else:
                item.future.set_exception(HTTPError(404, "the adapter was removed while the request waited"))
        if not live:
            return
        start = time.perf_counter()
        try:
            results = await asyncio.get_running_loop().run_in_executor(self._model_thread, self._forward, live)
        except Exception as e:  # noqa: BLE001 -- a failed batch fails its requests, not the server
            for item in live:
                if not item.future.done():
                    item.future.set_exception(e)
            return
        seconds, images = time.perf_counter() - start, sum(item.x.shape[0] for item in live)
        self.seconds_per_image = 0.8 * self.seconds_per_image + 0.2 * seconds / images
        self.stats["requests"] += len(live)
        self.stats["batches"] += 1
        self.stats["largest_batch"] = max(self.stats["largest_batch"], images)
        if self.metrics is not None:
            self.metrics.batch_size.observe(images)
            self.metrics.batch_seconds.observe(seconds)
        for item, result in zip(live, results):
            if not item.future.done():
                item.future.set_result(result)

    def _forward(self, items: list[_Item]) -> list[torch.Tensor]:
        """In the model thread: one pass over every item's images; each item's probabilities over its
        adapter's own classes."""
        x = items[0].x if len(items) == 1 else torch.cat([item.x for item in items])
        names = [item.adapter for item in items for _ in range(item.x.shape[0])]
        probs = self.model.probabilities(x, names)
        out, row = [], 0
        for item in items:
            n = item.x.shape[0]
            out.append(probs[row : row + n, : self.model.num_classes(item.adapter)])
            row += n
        return out

    def close(self) -> None:
        self._decoders.shutdown(wait=False, cancel_futures=True)
        self._model_thread.shutdown(wait=False, cancel_futures=True)
