"""What both completion endpoints do with a request once it has prompts: its SamplingConfigs (from the
request's schema-derived fields and the server's caps), its jobs in the scheduler (the engine checks
each prompt; its UserError becomes a 400 naming the field), and the events they send until done."""
from __future__ import annotations

import asyncio
import time

from fastapi import Request

from ..errors import UserError
from ..generation import SamplingConfig, fits_context
from ..sampling import OPTIONS
from .config import ServeConfig, ServedModel
from .responses import APIError, Reply, sse, unavailable
from .scheduler import Busy, Done, Failed, Inbox, Job, Scheduler

POLL = 0.2  # seconds between checks that the client of a non-streaming request is still there
SEEDS = 2**64  # seeds are in [0, 2^64 - 1] (the sampling schema); choice i of a request uses seed + i


class Service:
    def __init__(self, models: dict[str, ServedModel], scheduler: Scheduler, config: ServeConfig):
        self.models, self.scheduler, self.config = models, scheduler, config

    def lookup(self, name: str) -> ServedModel:
        if name not in self.models:
            raise APIError(404, f"model {name!r} is not served here; choose one of {sorted(self.models)} "
                           "(GET /v1/models)", "model", "model_not_found", type="not_found_error")
        return self.models[name]

    def sampling(self, req, served: ServedModel, prompts: list[list[int]], stops: list[str]) -> list[SamplingConfig]:
        """One SamplingConfig per choice (prompt-major, n per prompt): the request's options, the
        server's caps and defaults, the template's stop strings."""
        if req.n > self.config.max_n:
            raise APIError(400, f"n is {req.n} but this server allows at most {self.config.max_n} "
                           "(gpt2ft serve --max-n)", "n")
        options = req.options()
        limit, cap = options.pop("max_new_tokens"), self.config.max_tokens
        if limit is not None and limit > cap:
            raise APIError(400, f"max_tokens is {limit} but this server allows at most {cap} "
                           "(gpt2ft serve --max-tokens)", "max_tokens")
        context = served.model.config.block_size
        configs = []
        for ids in prompts:
            # no max_tokens: what the context leaves (an empty prompt is one <|endoftext|>), at least 1 so
            # that a prompt filling the context gets the engine's error
            max_new = limit or max(1, min(cap, context - max(len(ids), 1)))
            for i in range(req.n):
                seed = None if options["seed"] is None else (options["seed"] + i) % SEEDS  # n choices differ
                try:
                    configs.append(SamplingConfig(**{**options, "max_new_tokens": max_new, "seed": seed,
                                                     "stop": options["stop"] + stops}))
                except UserError as e:  # the request's fields were checked; the template's stops were not
                    raise APIError(400, f"stop: with the {len(stops)} stop strings of this model's template "
                                   f"({e})", "stop") from None
        return configs

    def start(self, req, served: ServedModel, prompts: list[list[int]], stops: list[str], param: str):
        """The request's jobs, queued (429/503 when there is no room), and the inbox of their events."""
        configs = self.sampling(req, served, prompts, stops)
        specs = [(ids, cfg) for ids, cfg in zip((p for p in prompts for _ in range(req.n)), configs)]
        inbox = Inbox()
        try:
            return self.scheduler.submit(served.name, specs, inbox), inbox
        except Busy as e:
            if e.status == 503:
                raise unavailable(f"{e}; retry shortly") from None
            raise APIError(429, f"{e}; retry shortly", code="rate_limit_exceeded", type="rate_limit_error",
                           headers={"Retry-After": "1"}) from None
        except UserError as e:  # the engine's checks of the prompt: context length, token ids
            context = served.model.config.block_size
            too_long = any(not fits_context(ids, cfg.max_new_tokens, context) for ids, cfg in specs)
            message = str(e).replace("max_new_tokens", OPTIONS["max_new_tokens"].api)
            raise APIError(400, message, param, "context_length_exceeded" if too_long else None) from None

    async def respond(self, req, request: Request, served: ServedModel, jobs: list[Job], inbox: Inbox, fmt):
        """The whole response, or its stream of chunks."""
        reply = Reply(fmt, served.name, req.n)
        completions = [job.completion for job in jobs]
        if req.stream:
            return sse(reply.chunks(self.events(jobs, inbox), completions, req.include_usage))
        async for _ in self.events(jobs, inbox, request):
            pass
        return reply.whole(completions)

    async def events(self, jobs: list[Job], inbox: Inbox, request: Request | None = None):
        """The jobs' Piece and Done events until all are done; cancels them on a timeout, on an error or
        when the client leaves (a stream notices at its next write; a plain request every POLL seconds)."""
        timeout = self.config.timeout
        deadline = time.monotonic() + timeout
        check = time.monotonic() + POLL
        left = len(jobs)
        try:
            while left:
                now = time.monotonic()
                if request is not None and now >= check:
                    check = now + POLL
                    if await request.is_disconnected():
                        raise APIError(499, "the client closed the connection", code="client_closed")
                try:
                    wait = min(deadline, check if request is not None else deadline) - now
                    event = await asyncio.wait_for(inbox.queue.get(), max(wait, 0.001))
                except asyncio.TimeoutError:
                    if time.monotonic() >= deadline:
                        raise unavailable(f"the request took longer than the server's limit of {timeout:g} s "
                                          "(gpt2ft serve --timeout)", "timeout") from None
                    continue
                if isinstance(event, Failed):
                    raise unavailable(event.message)
                left -= isinstance(event, Done)
                yield event
        finally:
            self.scheduler.cancel(jobs)  # those still running; a no-op for the finished ones
