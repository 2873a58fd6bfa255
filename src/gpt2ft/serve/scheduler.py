"""The scheduler: one background thread steps every model's completion engine, one token at a time,
and hands each completion's text to the request waiting for it.

A request's completions go straight into their engine's queue (Engine.add, which checks the prompt
against the context and the vocabulary): that queue is the only admission queue; the scheduler only
bounds how many completions may wait in it (max_queue) and routes the engines' events.
"""
from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass
from typing import NamedTuple, Union

from ..generation import Completion, SamplingConfig, TokenLogprob


class Piece(NamedTuple):
    """New text of choice `index` (possibly empty when only log-probabilities are new)."""

    index: int
    text: str
    logprobs: list[TokenLogprob]


class Done(NamedTuple):
    """Choice `index` ended; its completion holds the text, finish_reason and usage."""

    index: int
    completion: Completion


class Failed(NamedTuple):
    """Choice `index` could not finish (the server stopped, or the engine failed)."""

    index: int
    message: str


Event = Union[Piece, Done, Failed]


class Busy(Exception):
    """No room for a request: 429 when the queue is full, 503 while the server shuts down."""

    def __init__(self, message: str, status: int = 429):
        super().__init__(message)
        self.status = status


class Inbox:
    """A request's events: put() from the scheduler's thread, get() in the request's event loop."""

    def __init__(self):
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Event] = asyncio.Queue()

    def put(self, event: Event) -> bool:
        return _post(self.loop, [(self.queue, event)])


def _post(loop: asyncio.AbstractEventLoop, items: list[tuple[asyncio.Queue, Event]]) -> bool:
    """Put each event in its queue from the scheduler's thread, in one wake-up of `loop`; False if the
    loop is gone (the server is shutting down)."""
    try:
        loop.call_soon_threadsafe(_put_all, items)
        return True
    except RuntimeError:
        return False


def _put_all(items: list[tuple[asyncio.Queue, Event]]) -> None:
    for queue, event in items:
        queue.put_nowait(event)


@dataclass
class Job:
    """One choice of one request: its completion in model `model`'s engine."""

    model: str
    index: int
    completion: Completion
    inbox: Inbox
    sent_logprobs: int = 0
    sent_bytes: int = 0  # UTF-8 bytes of the text sent so far
    next_token_at: int = 0  # where the next unsent token's text starts, in those bytes


def begun_within(tokenizer, entries: list, start: int, end: int) -> tuple[list, int]:
    """Of log-probability entries whose first token's text starts at byte `start` of a completion's text,
    those whose token begins before byte `end` (none of a stop string cut from the text, nor the EOS after
    it); and where the next token's text starts."""
    kept = []
    for entry in entries:
        if start >= end:
            break
        kept.append(entry)
        start += len(tokenizer.decode_bytes([entry[0]]))
    return kept, start


class Scheduler:
    """Admits completions while at most max_queue of them wait for one of a model's max_batch decode
    slots, and steps the engines in a thread."""

    def __init__(self, engines: dict, max_batch: int, max_queue: int):
        self.engines, self.max_batch, self.max_queue = engines, max_batch, max_queue
        self.jobs: dict[int, Job] = {}  # id(completion) -> job, for every completion not yet ended
        self.cond = threading.Condition()
        self.stopping = False
        self.thread = threading.Thread(target=self._loop, name="gpt2ft-scheduler", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify()
        self.thread.join(timeout=10)

    def load(self) -> dict:
        """Completions decoding and waiting, over all models."""
        with self.cond:
            counts = [self._count(name) for name in self.engines]
        return {"running": sum(min(n, self.max_batch) for n in counts),
                "waiting": sum(max(0, n - self.max_batch) for n in counts)}

    @property
    def capacity(self) -> int:
        """The most completions one request may hold: on an idle server it decodes max_batch of them and
        queues the rest; a bigger one could never be admitted (a 400, not a 429 to retry)."""
        return self.max_batch + self.max_queue

    def submit(self, model: str, requests: list[tuple[list[int], SamplingConfig]], inbox: Inbox) -> list[Job]:
        """Queue all of a request's completions, or none: Busy, or the engine's UserError (a prompt
        too long for the context or with a token id outside the vocabulary)."""
        with self.cond:
            if self.stopping:
                raise Busy("the server is shutting down", 503)
            counts = {name: self._count(name) for name in self.engines}
            waiting = sum(max(0, n - self.max_batch) for n in counts.values())
            added = max(0, counts[model] + len(requests) - self.max_batch) - max(0, counts[model] - self.max_batch)
            if waiting + added > self.max_queue:
                load = sum(counts.values()) - waiting
                raise Busy(f"the server is busy ({load} running, {waiting} waiting)")
            engine, jobs = self.engines[model], []
            try:
                for index, (ids, sampling) in enumerate(requests):
                    jobs.append(Job(model, index, engine.add(ids, sampling), inbox))
            except BaseException:
                for job in jobs:
                    engine.cancel(job.completion)
                raise
            # registered while holding the lock, so a step that already decoded them delivers after this
            self.jobs.update((id(job.completion), job) for job in jobs)
            self.cond.notify()
        return jobs

    def cancel(self, jobs: list[Job]) -> None:
        """End these jobs' completions (a client left, a timeout); their slots free at the next step."""
        with self.cond:
            for job in jobs:
                if self.jobs.pop(id(job.completion), None) is not None:
                    self.engines[job.model].cancel(job.completion)
            self.cond.notify()

    def _count(self, model: str) -> int:
        return sum(job.model == model for job in self.jobs.values())

    def _loop(self) -> None:
        while True:
            with self.cond:
                while not self.stopping and not any(e.has_work for e in self.engines.values()):
                    self.cond.wait()
                if self.stopping:
                    for job in self.jobs.values():
                        job.inbox.put(Failed(job.index, "the server is shutting down"))
                    self.jobs.clear()
                    return
            for name, engine in self.engines.items():  # one token for every row of every model
                if not engine.has_work:
                    continue
                try:
                    events = engine.step()
                except Exception as e:  # noqa: BLE001 - a bug must not kill the thread or the server
                    self._fail(name, f"generation failed: {type(e).__name__}: {e}")
                    continue
                with self.cond:
                    outbox: list[tuple[Job, Event]] = []
                    for completion, piece in events:
                        self._deliver(completion, piece, outbox, getattr(engine, "tokenizer", None))
                self._send(outbox)

    def _deliver(self, completion: Completion, piece: str, outbox: list[tuple[Job, Event]], tokenizer=None) -> None:
        job = self.jobs.get(id(completion))
        if job is None:  # cancelled
            return
        # text held back (it may be a stop string) holds back its tokens' log-probabilities
        job.sent_bytes += len(piece.encode("utf-8"))
        new_logprobs = (completion.logprobs or [])[job.sent_logprobs:]
        if tokenizer is not None:
            new_logprobs, job.next_token_at = begun_within(tokenizer, new_logprobs, job.next_token_at, job.sent_bytes)
        job.sent_logprobs += len(new_logprobs)
        if piece or new_logprobs:
            outbox.append((job, Piece(job.index, piece, new_logprobs)))
        if completion.finished:
            del self.jobs[id(completion)]
            outbox.append((job, Done(job.index, completion)))

    def _send(self, outbox: list[tuple[Job, Event]]) -> None:
        """A step's events, one wake-up of each event loop for all of them (not one per token); the jobs
        whose loop is gone (the server is shutting down) are cancelled."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Job, Event]]] = {}
        for job, event in outbox:
            by_loop.setdefault(job.inbox.loop, []).append((job, event))
        for loop, items in by_loop.items():
            if not _post(loop, [(job.inbox.queue, event) for job, event in items]):  # nobody waits for them
                self.cancel([job for job, _ in items])

    def _fail(self, model: str, message: str) -> None:
        with self.cond:
            for key, job in list(self.jobs.items()):
                if job.model == model:
                    self.engines[model].cancel(job.completion)
                    job.inbox.put(Failed(job.index, message))
                    del self.jobs[key]
