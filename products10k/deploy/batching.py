"""Dynamic batching for products10k-serve: concurrent requests' images run through the model together."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from products10k.deploy.runtime import ExportedModel


class Batcher:
    """Runs the model on batches gathered from concurrent requests.

    ``submit(inputs)`` queues a request's images; a single worker takes what is queued, waits up to
    ``wait_s`` for more while the batch is under ``max_batch``, runs one onnxruntime call on a
    dedicated thread (onnxruntime uses its own intra-op threads) and hands each request its rows.
    """

    def __init__(self, model: ExportedModel, max_batch: int, wait_s: float):
        self.model, self.max_batch, self.wait_s = model, max_batch, wait_s
        self.queue: asyncio.Queue | None = None
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="onnx")
        self.task: asyncio.Task | None = None
        self.batches = 0  # counters for /healthz: how well requests were merged
        self.images = 0

    async def start(self) -> None:
        self.queue = asyncio.Queue()
        self.task = asyncio.create_task(self._work())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
        self.executor.shutdown(wait=False, cancel_futures=True)

    async def submit(self, inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((inputs, future))
        return await future

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            pending = [await self.queue.get()]
            size = len(pending[0][0])
            deadline = loop.time() + self.wait_s
            while size < self.max_batch:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    item = await asyncio.wait_for(self.queue.get(), remaining)
                except TimeoutError:
                    break
                pending.append(item)
                size += len(item[0])
            batch = np.concatenate([inputs for inputs, _ in pending])
            try:
                logits, embedding = await loop.run_in_executor(self.executor, self.model.run, batch)
            except Exception as exc:  # noqa: BLE001 - every waiting request gets the error, the loop lives
                for _, future in pending:
                    if not future.done():
                        future.set_exception(exc)
                continue
            self.batches += 1
            self.images += len(batch)
            start = 0
            for inputs, future in pending:
                stop = start + len(inputs)
                if not future.done():  # a client gone away cancels its future
                    future.set_result((logits[start:stop], embedding[start:stop]))
                start = stop
