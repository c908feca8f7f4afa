"""PNG encoding, atomic writing and manifest records, in a thread beside the sampling loop.

The queue is short, so the loop runs at most a couple of batches ahead of the disk; what is still queued when
the process is killed was never written, and so is never counted as done.
"""
from __future__ import annotations

import queue
import threading
from pathlib import Path

from t2i.errors import T2IError
from t2i.jobs import outputs
from t2i.jobs.items import ImageTask
from t2i.jobs.parameters import format_parameters

QUEUED_BATCHES = 2


class ImageWriter:
    def __init__(self, out: Path, shard: str, model: dict):
        self.out = out
        self.model = model
        self.manifest = outputs.ManifestShard(out / shard)
        self._queue: queue.Queue = queue.Queue(maxsize=QUEUED_BATCHES)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._drain, name="t2i-image-writer", daemon=True)
        self._thread.start()

    def record(self, task: ImageTask) -> dict:
        """The manifest record of `task`, all but its file's sha256 and size."""
        return {"id": task.id, "k": task.k, "file": task.file, "seed": task.seed, "prompt": task.prompt,
                "negative_prompt": task.negative_prompt, "steps": task.steps, "guidance": task.guidance,
                "sampler": task.sampler, "height": task.height, "width": task.width,
                "model": self.model["name"], "model_hash": self.model["hash"]}

    def record_existing(self, task: ImageTask, path: Path) -> None:
        data = path.read_bytes()
        self.manifest.append({**self.record(task), "sha256": outputs.sha256_of(data), "bytes": len(data)})

    def submit(self, tasks: list[ImageTask], images: list) -> None:
        self._raise_if_failed()
        self._queue.put((tasks, images))

    def close(self) -> None:
        """Write everything queued, then stop; re-raises an error the thread met."""
        self._queue.put(None)
        self._thread.join()
        try:
            self.manifest.close()
        except T2IError as error:  # the thread's own error, if any, came first and says more
            self._error = self._error or error
        self._raise_if_failed()

    def _drain(self) -> None:
        while (work := self._queue.get()) is not None:
            if self._error is not None:
                continue
            try:
                for task, image in zip(*work):
                    self._write(task, image)
            except BaseException as error:  # handed to the main thread by submit() or close()
                self._error = error

    def _write(self, task: ImageTask, image) -> None:
        data = outputs.png_bytes(image, format_parameters(task, self.model["name"], self.model["hash"]))
        outputs.write_atomically(self.out / task.file, data)
        self.manifest.append({**self.record(task), "sha256": outputs.sha256_of(data), "bytes": len(data)})

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error
