"""What both completion endpoints do with a request once it has prompts: its SamplingConfigs (from the
request's schema-derived fields and the server's caps), its jobs in the scheduler (the engine checks
each prompt; its UserError becomes a 400 naming the field), and the events they send until done."""
from __future__ import annotations

import asyncio
import hashlib
import time
from typing import NamedTuple

from fastapi import Request

from ..errors import UserError
from ..generation import SamplingConfig, fits_context
from ..sampling import OptionError
from .config import ServeConfig, ServedModel
from .prompts import check_prompts
from .responses import APIError, Reply, rate_limited, sse, unavailable
from .scheduler import Busy, Done, Failed, Inbox, Job, Scheduler
from .structured import Constraint

POLL = 0.2  # seconds between checks that the client of a non-streaming request is still there
SEEDS = 2**64  # seeds are in [0, 2^64 - 1] (the sampling schema)


def choice_seed(seed: int | None, i: int) -> int | None:
    """Choice i's seed: the request's own for choice 0 (so n=1 equals `gpt2ft generate --seed`), for the others
    one derived from (seed, i), so that choice 1 of seed 7 is not choice 0 of seed 8."""
    if seed is None or i == 0:
        return seed
    return int.from_bytes(hashlib.blake2b(f"{seed}:{i}".encode(), digest_size=8).digest(), "big") % SEEDS


class Scored(NamedTuple):
    """A prompt scored without generating: an empty completion, as the response shapes read one."""

    prompt_tokens: int
    completion_tokens: int = 0
    text: str = ""
    finish_reason: str = "length"
    logprobs: tuple = ()
    drafted: int = 0
    accepted_drafts: int = 0


def best(completions: list, candidates: int, n: int) -> list:
    """best_of: of each prompt's candidates, the n with the highest cumulative log-probability."""
    out = []
    for start in range(0, len(completions), candidates):
        group = completions[start:start + candidates]
        out += sorted(group, key=lambda c: -sum(lp.logprob for lp in c.logprobs or []))[:n]
    return out


def check_message(i: int, m, calls: set[str]) -> None:
    """A 400 naming the field of messages[i] that the conversation cannot hold; `calls` collects the tool
    call ids of the assistant turns so far (a tool message answers one of them)."""
    def refuse(field: str, why: str):
        raise APIError(400, f"messages[{i}].{field} {why}", f"messages.{i}.{field}")

    if m.name is not None:
        refuse("name", "is not supported: the prompt templates have no place for a speaker's name (drop it, or "
                       "put it in the content)")
    for field in ("tool_calls", "refusal"):
        if getattr(m, field) is not None and m.role != "assistant":
            refuse(field, f"belongs to an assistant message, not a {m.role} one")
    if m.content is None and not (m.role == "assistant" and (m.tool_calls or m.refusal is not None)):
        refuse("content", f"is required for a{'n' if m.role == 'assistant' else ''} {m.role} message (only an "
                          "assistant's may be null, beside its tool_calls or refusal)")
    calls.update(c.id for c in m.tool_calls or ())
    if m.role != "tool" and m.tool_call_id is not None:
        refuse("tool_call_id", f"belongs to a tool message, not a {m.role} one")
    if m.role == "tool" and m.tool_call_id is None:
        refuse("tool_call_id", "is required: the id of the assistant's tool call this result answers")
    if m.role == "tool" and m.tool_call_id not in calls:
        refuse("tool_call_id", f"is {m.tool_call_id!r}, which no earlier assistant message's tool_calls has")


def client_left() -> APIError:
    return APIError(499, "the client closed the connection", code="client_closed")


class Service:
    def __init__(self, models: dict[str, ServedModel], scheduler: Scheduler, config: ServeConfig):
        self.models, self.scheduler, self.config = models, scheduler, config
        self.scoring_waiting = 0  # prompt-scoring requests queued behind the one scoring (one at a time)
        self._scoring: asyncio.Lock | None = None  # made in the event loop, on first use

    def lookup(self, name: str) -> ServedModel:
        if name not in self.models:
            raise APIError(404, f"model {name!r} is not served here; choose one of {sorted(self.models)} "
                           "(GET /v1/models)", "model", "model_not_found")  # OpenAI's type for it
        return self.models[name]

    def refuse(self, req) -> None:
        """The 400s of fields that are valid alone but not together, or not served."""
        if getattr(req, "suffix", None) is not None:
            raise APIError(400, "suffix is not supported: this server only continues a prompt (send the text "
                           "before the insertion as the prompt)", "suffix")
        if getattr(req, "top_logprobs", None) is not None and not getattr(req, "logprobs", True):
            raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        for field, value in (("n", req.n), ("best_of", req.candidates)):
            if value > self.config.max_n:
                raise APIError(400, f"{field} is {value} but this server allows at most {self.config.max_n} "
                               "(gpt2ft serve --max-n)", field)
        if req.candidates < req.n:
            raise APIError(400, f"best_of ({req.candidates}) must be at least n ({req.n})", "best_of")
        if req.candidates > req.n and req.stream:
            raise APIError(400, "best_of cannot be streamed: the best choices are known only at the end", "best_of")
        both = (getattr(req, "max_completion_tokens", None), getattr(req, "max_tokens", None))
        if None not in both and both[0] != both[1]:
            raise APIError(400, f"max_completion_tokens ({both[0]}) and max_tokens ({both[1]}) disagree: send one "
                           "(max_tokens is the older name of max_completion_tokens)", "max_tokens")
        if req.stream_options is not None and not req.stream:
            raise APIError(400, "stream_options is only allowed with stream: true", "stream_options")
        calls: set[str] = set()  # the ids of the tool calls made so far in the conversation
        for i, message in enumerate(getattr(req, "messages", ())):
            check_message(i, message, calls)
        if getattr(req, "max_tokens", None) == 0 and not getattr(req, "echo", False):
            raise APIError(400, "max_tokens must be an integer >= 1, not 0 (0 only with echo: the prompt scored, "
                           "nothing generated)", "max_tokens")

    def sampling(self, req, served: ServedModel, prompts: list[list[int]], stops: list[str],
                 grammar=None) -> list[SamplingConfig]:
        """One SamplingConfig per completion (prompt-major, req.candidates per prompt): the request's
        options, the server's caps and defaults, the template's stop strings, the grammar."""
        self.refuse(req)
        options = req.options()
        limit, cap, limit_field = options.pop("max_new_tokens"), self.config.max_tokens, req.limit_field
        if limit is not None and limit > cap:
            raise APIError(400, f"{limit_field} is {limit} but this server allows at most {cap} "
                           "(gpt2ft serve --max-tokens)", limit_field)
        if req.candidates > req.n and options["logprobs"] is None:
            options["logprobs"] = 0  # best_of ranks by them
        context = served.model.config.block_size
        configs = []
        for ids in prompts:
            # no max_tokens: what the context leaves (an empty prompt is one <|endoftext|>), at least 1 so
            # that a prompt filling the context gets the engine's error
            max_new = limit or max(1, min(cap, context - max(len(ids), 1)))
            if options["min_tokens"] > max_new:
                raise APIError(400, f"min_tokens ({options['min_tokens']}) is more than the {max_new} tokens "
                               f"this reply may have ({req.limit_field}, or what the context leaves)", "min_tokens")
            for i in range(req.candidates):
                seed = choice_seed(options["seed"], i)  # n choices differ
                try:
                    configs.append(SamplingConfig(**{**options, "max_new_tokens": max_new, "seed": seed,
                                                     "template_stop": stops, "grammar": grammar}))
                except OptionError as e:  # options refused together (e.g. stop with a constraint)
                    raise APIError(400, e.say(req.field_of), req.field_of(e.option)) from None
        return configs

    async def start(self, req, served: ServedModel, prompts: list[list[int]], stops: list[str], param: str,
                    constraint: Constraint | None = None):
        """The request's jobs, queued (429/503 when there is no room), and the inbox of their events."""
        if constraint is not None:  # compiling a large grammar takes a while: off the event loop
            await asyncio.to_thread(constraint.check, served.tokenizer, served.model.config.vocab_size)
        configs = self.sampling(req, served, prompts, stops, constraint and constraint.spec)
        specs = [(ids, cfg) for ids, cfg in zip((p for p in prompts for _ in range(req.candidates)), configs)]
        if len(specs) > self.scheduler.capacity:
            per_prompt = "best_of" if req.candidates > req.n else "n"
            raise self._over_capacity(f"asks for {len(specs)} completions ({len(prompts)} prompt(s) x "
                                      f"{req.candidates})", f"fewer prompts or a smaller {per_prompt}",
                                      param if len(prompts) > 1 else per_prompt)
        inbox = Inbox()
        try:
            return self.scheduler.submit(served.name, specs, inbox), inbox
        except Busy as e:
            raise (unavailable if e.status == 503 else rate_limited)(f"{e}; retry shortly") from None
        except UserError as e:  # the engine's checks of the prompt: context length, token ids
            context = served.model.config.block_size
            too_long = any(not fits_context(ids, cfg.max_new_tokens, context) for ids, cfg in specs)
            message = str(e).replace("max_new_tokens", req.limit_field)
            field = "logit_bias" if message.startswith("logit_bias") else param  # else: the prompt's
            raise APIError(400, message, field, "context_length_exceeded" if too_long else None) from None

    async def respond(self, req, request: Request, served: ServedModel, jobs: list[Job], inbox: Inbox, fmt):
        """The whole response, or its stream of chunks."""
        reply = Reply(fmt, served.name, req.n)
        completions = [job.completion for job in jobs]
        if req.stream:
            return sse(reply.chunks(self.events(jobs, inbox), completions, req.include_usage))
        async for _ in self.events(jobs, inbox, request):
            pass
        if req.candidates > req.n:
            return reply.whole(best(completions, req.candidates, req.n), completions)
        return reply.whole(completions)

    def check_scoring(self, req, served: ServedModel, prompts: list[list[int]], rule: Constraint | None) -> None:
        """echo with max_tokens 0 generates nothing: a field that shapes generated text would have nothing
        to act on (a 400 naming it); the others are checked as a generating request's are."""
        shaping = [("best_of", req.candidates > req.n), ("min_tokens", bool(req.min_tokens)),
                   ("logit_bias", bool(req.logit_bias)), ("ignore_eos", bool(req.ignore_eos)),
                   ("stop", bool(req.stop)), (rule.field if rule else "", rule is not None and rule.spec is not None)]
        for field, given in shaping:
            if given:
                raise APIError(400, f"{field} shapes generated text, but echo with max_tokens 0 generates none "
                               "(it scores the prompt): drop it, or ask for tokens with max_tokens", field)
        self.sampling(req, served, prompts, [])  # every other field's checks
        check_prompts(prompts, served.model.config)

    async def score(self, request: Request, prompts: list[list[int]], score_one) -> list:
        """`score_one(ids)` for each prompt (a forward each, off the event loop), under the limits a generating
        request has: at most the server's capacity of prompts, one scoring request at a time with at most
        --max-queue waiting (else 429), the --timeout (503), and stopped when the client leaves."""
        if len(prompts) > self.scheduler.capacity:
            raise self._over_capacity(f"scores {len(prompts)} prompts", "fewer", "prompt")
        if self._scoring is None:
            self._scoring = asyncio.Lock()
        if self._scoring.locked() and self.scoring_waiting >= self.config.max_queue:
            raise rate_limited(f"the server is busy scoring ({self.scoring_waiting} waiting); retry shortly")
        deadline = time.monotonic() + self.config.timeout
        self.scoring_waiting += 1
        acquired = False
        try:
            async with self._scoring:
                self.scoring_waiting, acquired = self.scoring_waiting - 1, True
                out = []
                for ids in prompts:
                    if time.monotonic() > deadline:
                        raise self._timed_out()
                    if await request.is_disconnected():
                        raise client_left()
                    out.append(await asyncio.to_thread(score_one, ids))
                return out
        finally:
            if not acquired:  # refused or cancelled while waiting
                self.scoring_waiting -= 1

    def _over_capacity(self, asks: str, send: str, param: str) -> APIError:
        """A request bigger than the server ever holds: a 400 (a 429 would be retried forever)."""
        return APIError(400, f"this request {asks}, more than the {self.scheduler.capacity} this server holds at "
                        f"once (gpt2ft serve --max-batch + --max-queue): send {send}", param)

    def _timed_out(self) -> APIError:
        return unavailable(f"the request took longer than the server's limit of {self.config.timeout:g} s "
                           "(gpt2ft serve --timeout)", "timeout")

    def scored(self, req, served: ServedModel, prompts: list[list[int]], fmt):
        """echo with max_tokens 0: each prompt (with its log-probabilities, in fmt), nothing generated."""
        reply = Reply(fmt, served.name, req.n)
        # an empty prompt reads one <|endoftext|>, as generating from it does (Engine.add): counted alike
        done = [Scored(max(len(ids), 1)) for ids in prompts for _ in range(req.n)]
        if not req.stream:
            return reply.whole(done)

        async def events():
            yield [Done(index, c) for index, c in enumerate(done)]

        return sse(reply.chunks(events(), done, req.include_usage))

    async def events(self, jobs: list[Job], inbox: Inbox, request: Request | None = None):
        """The jobs' Piece and Done events until all are done, in lists (all that arrived together: a
        stream writes them at once); cancels them on a timeout, on an error or when the client leaves (a
        stream notices at its next write; a plain request every POLL seconds)."""
        deadline = time.monotonic() + self.config.timeout
        check = time.monotonic() + POLL
        left = len(jobs)
        try:
            while left:
                now = time.monotonic()
                if request is not None and now >= check:
                    check = now + POLL
                    if await request.is_disconnected():
                        raise client_left()
                try:
                    wait = min(deadline, check if request is not None else deadline) - now
                    batch = [await asyncio.wait_for(inbox.queue.get(), max(wait, 0.001))]
                except asyncio.TimeoutError:
                    if time.monotonic() >= deadline:
                        raise self._timed_out() from None
                    continue
                while not inbox.queue.empty():
                    batch.append(inbox.queue.get_nowait())
                for event in batch:
                    if isinstance(event, Failed):
                        raise unavailable(event.message)
                    if isinstance(event, Done) and event.completion.finish_reason == "error":  # not OpenAI's
                        raise APIError(400, "the structured output could not go on (the grammar engine: "
                                       f"{event.completion.stop_reason}); simplify the schema or grammar",
                                       code="grammar_error")
                    left -= isinstance(event, Done)
                yield batch
        finally:
            self.scheduler.cancel(jobs)  # those still running; a no-op for the finished ones
