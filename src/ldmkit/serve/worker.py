"""One worker thread runs the server's jobs (generations, model loads) in order, from a bounded queue.

    request ─check─> Job ─submit─> queue (at most N waiting; full → QueueFull → 503 + Retry-After)
                                     └─> worker thread: job.fn(worker) ─> its Future ─> the waiting request

A job reports each sampler step (`step`), which feeds GET /progress (progress, eta, the preview image);
`interrupt()` makes the next `step` of the running job raise `Interrupted`, so it stops at the next step.
A job whose request went away while it waited (its Future cancelled) is skipped; one that is running
finishes and its result is dropped, so a client that disconnects never stops or breaks the worker.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from ldmkit import generation


class Interrupted(generation.Interrupted):
    """Raised inside a job at its next step after POST /interrupt; `generate` returns what it has."""


class QueueFull(Exception):
    def __init__(self, retry_after: int):
        super().__init__(f"the queue is full; retry in {retry_after} s")
        self.retry_after = retry_after


@dataclass
class Job:
    fn: Callable[["Worker"], Any]
    steps: int = 1  # sampler steps the job will run in all (for progress and eta)
    what: str = "generation"
    future: Future = field(default_factory=Future)


class Worker:
    def __init__(self, queue_size: int = 8, preview_every: int = 5):
        self.queue: queue.Queue[Job] = queue.Queue(maxsize=queue_size)
        self.preview_every = preview_every  # steps between preview decodes (0: none)
        self._lock = threading.Lock()
        self._interrupt = threading.Event()
        self._stop = threading.Event()
        self._durations: deque[float] = deque(maxlen=20)
        self._job: Job | None = None
        self._started = 0.0
        self._done = 0
        self._image: str | None = None  # base64 PNG of the current preview
        self._text: str | None = None
        self._thread = threading.Thread(target=self._loop, name="ldmkit-serve-worker", daemon=True)
        self.completed = 0  # jobs finished, for tests and the page

    # --- the request side ------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop after the running job's next step; jobs still waiting are cancelled."""
        self._stop.set()
        self._interrupt.set()
        while True:
            try:
                self.queue.get_nowait().future.cancel()
            except queue.Empty:
                break
        if self._thread.is_alive():
            self._thread.join(timeout)

    def submit(self, job: Job) -> Future:
        """Queue `job`; QueueFull (with a retry time) when N jobs already wait."""
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            raise QueueFull(self.retry_after()) from None
        return job.future

    def retry_after(self) -> int:
        """Seconds until a place frees, from the recent jobs' duration (1 when none ran yet)."""
        mean = sum(self._durations) / len(self._durations) if self._durations else 1.0
        return max(1, math.ceil(mean))

    def interrupt(self, job: Job | None = None) -> None:
        """Stop the running job (only if it is `job`, when given) at its next step."""
        with self._lock:
            if self._job is not None and (job is None or self._job is job):
                self._interrupt.set()

    def progress(self, skip_current_image: bool = False) -> dict:
        """GET /sdapi/v1/progress: A1111's ProgressResponse."""
        with self._lock:
            job, done, started, image, text = self._job, self._done, self._started, self._image, self._text
            waiting = self.queue.qsize()
        if job is None:
            return {"progress": 0.0, "eta_relative": 0.0, "current_image": None, "textinfo": None,
                    "state": {"skipped": False, "interrupted": False, "job": "", "job_count": waiting,
                              "job_timestamp": "0", "job_no": 0, "sampling_step": 0, "sampling_steps": 0,
                              "queued": waiting}}
        frac = min(1.0, done / max(job.steps, 1))
        elapsed = time.time() - started
        eta = elapsed / frac - elapsed if frac > 0 else 0.0
        return {"progress": frac, "eta_relative": eta, "current_image": None if skip_current_image else image,
                "textinfo": text,
                "state": {"skipped": False, "interrupted": self._interrupt.is_set(), "job": job.what,
                          "job_count": waiting + 1, "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(started)),
                          "job_no": 0, "sampling_step": done, "sampling_steps": job.steps, "queued": waiting}}

    # --- the job side ----------------------------------------------------------------------------
    def step(self, done: int, preview: Callable[[], str | None] | None = None, text: str | None = None) -> None:
        """A job has run `done` of its steps; `preview()` (called every `preview_every` steps) gives the
        current image as base64 PNG. Raises Interrupted after POST /interrupt."""
        image = None
        if preview is not None and self.preview_every and done % self.preview_every == 0:
            image = preview()
        with self._lock:
            self._done = done
            if image is not None:
                self._image = image
            if text is not None:
                self._text = text
        if self._interrupt.is_set():
            raise Interrupted

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                job = self.queue.get(timeout=0.2)
            except queue.Empty:
                continue
            if not job.future.set_running_or_notify_cancel():
                continue  # its client went away while it waited
            with self._lock:
                self._job, self._started, self._done, self._image, self._text = job, time.time(), 0, None, None
                self._interrupt.clear()
            t0 = time.perf_counter()
            try:
                result = job.fn(self)
            except BaseException as e:  # noqa: BLE001 - the job's error goes to its request, never kills the worker
                job.future.set_exception(e)
            else:
                job.future.set_result(result)
            finally:
                self._durations.append(time.perf_counter() - t0)
                with self._lock:
                    self._job, self._image, self._text = None, None, None
                    self._interrupt.clear()
                    self.completed += 1
