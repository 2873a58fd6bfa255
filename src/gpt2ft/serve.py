"""An OpenAI-compatible HTTP server: /v1/chat/completions, /v1/completions, /v1/models, /health and a
browser playground at /.

    app = create_app([served_model(...)], ServeConfig(api_key="k"))   # then uvicorn.run(app)

Requests become Jobs; one background thread (the Scheduler) owns the models and drives a completion
engine per model, one token step at a time, and hands text back to the waiting requests through
their asyncio queues. Every error leaves in OpenAI's shape {"error": {message, type, param, code}}.
"""
from __future__ import annotations

import asyncio
import copy
import dataclasses
import hmac
import json
import math
import threading
import time
import uuid
from dataclasses import dataclass, field
from importlib import resources
from typing import Literal, Union

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from .data import sft
from .errors import UserError
from .generation import Completion, Engine, SamplingConfig
from .templates import TEMPLATES, Template, as_template

OPEN_PATHS = {"/", "/health"}  # everything else needs the API key when one is set
MIN_TEMPERATURE = 1e-5  # below it sampling is greedy
POLL = 0.2  # seconds between checks that the client of a non-streaming request is still there


@dataclass
class ServeConfig:
    """Limits and access of one server."""

    api_key: str | None = None
    """Bearer token every route but / and /health requires (None: open)."""
    max_batch: int = 8
    """Most completions decoded together."""
    max_queue: int = 64
    """Most completions waiting for a decode slot; past it requests get 429 with Retry-After."""
    max_tokens: int = 1024
    """Cap on a request's max_tokens (also the default, within the context)."""
    max_n: int = 8
    """Cap on a request's n (choices per prompt)."""
    max_body: int = 1 << 20
    """Largest request body in bytes (413 past it)."""
    timeout: float = 300.0
    """Seconds a request may take before it is cancelled (503)."""


@dataclass
class ServedModel:
    """One model the server answers for, chosen by the request's `model` field."""

    name: str
    model: torch.nn.Module
    tokenizer: object
    template: Template | None = None
    info: dict = field(default_factory=dict)
    created: int = field(default_factory=lambda: int(time.time()))


def served_model(name: str, model, tokenizer, template: Template | None = None, info: dict | None = None) -> ServedModel:
    info = {"context_length": model.config.block_size, "parameters": model.num_params(),
            "template": template.name if template else None, **(info or {})}
    return ServedModel(name, model, tokenizer, template, info)


def share_base(base, adapter_folder) -> tuple[torch.nn.Module, Template | None]:
    """A copy of `base` with the LoRA adapter in `adapter_folder` applied, whose base weights are the
    same tensors as base's (only the adapter's small matrices take new memory); and the adapter's
    template, if it records one."""
    from .checkpoint import attach_adapter, read_meta, resolve

    folder = resolve(adapter_folder)
    model = copy.deepcopy(base, memo={id(p): p for p in base.parameters()})  # shares base's parameters
    model.clear_cache()
    attach_adapter(model, folder)
    model.to(base.lm_head.weight.device, base.lm_head.weight.dtype).eval()
    return model, as_template(read_meta(folder).get("template"))


# ----- errors ---------------------------------------------------------------------------------
class APIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def _validation_message(err: dict) -> tuple[str, str | None]:
    loc = [str(x) for x in err.get("loc", ()) if x != "body"]
    param = ".".join(loc) or None
    got = repr(err.get("input"))
    got = got if len(got) <= 60 else got[:57] + "..."
    if err.get("type") == "json_invalid":
        return f"the request body is not valid JSON ({err.get('ctx', {}).get('error', 'parse error')})", None
    if err.get("type") == "missing":
        return f"{param}: a required field is missing", param
    return f"{param or 'body'}: {err.get('msg', 'invalid value')} (got {got})", param


# ----- requests -------------------------------------------------------------------------------
class _Request(BaseModel):
    model_config = ConfigDict(allow_inf_nan=False, extra="ignore")


class TextPart(_Request):
    type: Literal["text"]
    text: str


class Message(_Request):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart], None] = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class StreamOptions(_Request):
    include_usage: bool = False


class _Sampling(_Request):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1)
    stop: Union[str, list[str], None] = Field(None, description="up to 4 strings")
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    top_k: int = Field(-1, ge=-1, description="vLLM's extra: keep the k most likely tokens (-1 or 0: all)")
    repetition_penalty: float = Field(1.0, ge=0.01, le=10, description="vLLM's extra (1.0: off)")
    user: str | None = None


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)
    max_tokens: int | None = Field(16, ge=1)


# ----- prompts --------------------------------------------------------------------------------
def chat_prompt(template: Template | None, messages: list[Message], tokenizer) -> tuple[list[int], list[str]]:
    """The tokens a reply continues, exactly as SFT trained them (data.sft.prompt_ids: the model's
    template, earlier replies each ending with EOS), and the template's stop strings. A model
    without a template uses the built-in chat template."""
    template = template or TEMPLATES["chat"]
    msgs = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in messages]
    if template.kind == "instruction" and not any(m["role"] == "user" for m in msgs):
        raise APIError(400, f"messages: the model's {template.name!r} template needs a user message", "messages")
    return sft.prompt_ids(msgs, template, tokenizer), list(template.stop)


# ----- the scheduler: one thread drives every engine ------------------------------------------
class QueueFull(Exception):
    """No room for a request: 429 when the queue is full, 503 while the server shuts down."""

    def __init__(self, message: str, status: int = 429):
        super().__init__(message)
        self.status = status


@dataclass
class Job:
    """One choice of one request: its completion's events go to `queue` as ("text", index, piece,
    logprobs) and a final ("done", index, completion) or ("error", index, message)."""

    served: ServedModel
    prompt_ids: list[int]
    sampling: SamplingConfig
    index: int
    queue: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    completion: Completion | None = None
    sent_logprobs: int = 0
    cancelled: bool = False

    def emit(self, event: tuple) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the request's event loop is gone (server shutting down)
            self.cancelled = True


class Scheduler:
    """Admits jobs up to max_batch running + max_queue waiting, and steps the engines in a thread."""

    def __init__(self, models: dict[str, ServedModel], max_batch: int, max_queue: int, engine_factory=None):
        factory = engine_factory or (lambda s: Engine(s.model, s.tokenizer, max_batch))
        self.engines = {name: factory(s) for name, s in models.items()}
        self.max_batch, self.max_queue = max_batch, max_queue
        self.waiting: list[Job] = []
        self.running: dict[int, Job] = {}  # id(completion) -> job
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

    def submit(self, jobs: list[Job]) -> None:
        """Queue all of a request's jobs, or none (QueueFull)."""
        with self.cond:
            if self.stopping:
                raise QueueFull("the server is shutting down", 503)
            if len(self.waiting) + len(jobs) > self.max_queue + max(0, self.max_batch - len(self.running)):
                raise QueueFull(f"the server is busy ({len(self.running)} running, {len(self.waiting)} waiting)")
            self.waiting.extend(jobs)
            self.cond.notify()

    def cancel(self, jobs: list[Job]) -> None:
        with self.cond:
            for job in jobs:
                job.cancelled = True
            self.cond.notify()

    def load(self) -> dict:
        with self.cond:
            return {"running": len(self.running), "waiting": len(self.waiting)}

    def _admit(self) -> None:
        self.waiting = [j for j in self.waiting if not j.cancelled]
        while self.waiting and len(self.running) < self.max_batch:
            job = self.waiting.pop(0)
            engine = self.engines[job.served.name]
            try:
                job.completion = engine.add(job.prompt_ids, job.sampling)
            except Exception as e:  # noqa: BLE001 - the handler checked the request; never kill the thread
                job.emit(("error", job.index, f"cannot start this completion: {e}"))
                continue
            self.running[id(job.completion)] = job

    def _loop(self) -> None:
        while True:
            with self.cond:
                while not self.stopping and not self.waiting and not self.running:
                    self.cond.wait()
                if self.stopping:
                    for job in [*self.waiting, *self.running.values()]:
                        job.emit(("error", job.index, "the server is shutting down"))
                    return
                for key, job in list(self.running.items()):  # a disconnected client frees its slot
                    if job.cancelled:
                        self.engines[job.served.name].cancel(job.completion)
                        del self.running[key]
                self._admit()
            for name, engine in self.engines.items():  # one token for every row of every model
                if not engine.has_work:
                    continue
                try:
                    events = engine.step()
                except Exception as e:  # noqa: BLE001 - a bug must not kill the thread or the server
                    self._fail(name, f"generation failed: {type(e).__name__}: {e}")
                    continue
                for completion, piece in events:
                    self._deliver(completion, piece)

    def _deliver(self, completion: Completion, piece: str) -> None:
        job = self.running.get(id(completion))
        if job is None:
            return
        new_logprobs = (completion.logprobs or [])[job.sent_logprobs:]
        job.sent_logprobs += len(new_logprobs)
        if piece or new_logprobs:
            job.emit(("text", job.index, piece, new_logprobs))
        if completion.finish_reason:
            job.emit(("done", job.index, completion))
            with self.cond:
                self.running.pop(id(completion), None)

    def _fail(self, name: str, message: str) -> None:
        with self.cond:
            for key, job in list(self.running.items()):
                if job.served.name == name:
                    self.engines[name].cancel(job.completion)
                    job.emit(("error", job.index, message))
                    del self.running[key]


# ----- responses ------------------------------------------------------------------------------
def _token_text(tokenizer, token: int) -> str:
    return tokenizer.decode([token])


def chat_logprobs(tokenizer, entries) -> dict:
    def one(token, logprob):
        text = _token_text(tokenizer, token)
        return {"token": text, "logprob": logprob, "bytes": list(tokenizer.decode_bytes([token]))}

    return {"content": [{**one(t, lp), "top_logprobs": [one(a, alp) for a, alp in alts]} for t, lp, alts in entries]}


def completion_logprobs(tokenizer, entries, offset: int) -> dict:
    tokens, token_logprobs, top, offsets = [], [], [], []
    for t, lp, alts in entries:
        text = _token_text(tokenizer, t)
        tokens.append(text)
        token_logprobs.append(lp)
        top.append({_token_text(tokenizer, a): alp for a, alp in alts})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}


@torch.inference_mode()
def prompt_logprobs(served: ServedModel, ids: list[int], k: int) -> list[tuple[int, float | None, list]]:
    """Logprobs of the prompt's own tokens (for echo): the first has none."""
    model = served.model
    x = torch.tensor([ids], device=model.lm_head.weight.device)
    logp = model(x)[0, :-1].float().log_softmax(-1)
    out = [(ids[0], None, [])]
    for i, token in enumerate(ids[1:]):
        top = torch.topk(logp[i], k) if k else None
        alts = list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []
        out.append((token, float(logp[i, token]), alts))
    return out


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


# ----- the app --------------------------------------------------------------------------------
class Guard:
    """ASGI middleware: the API key on every route but OPEN_PATHS, and the body-size cap (the body
    is read here, up to the cap, and replayed to the app)."""

    def __init__(self, app, api_key: str | None, max_body: int):
        self.app, self.api_key, self.max_body = app, api_key, max_body

    @staticmethod
    async def _reject(scope, receive, send, error: APIError) -> None:
        await error.response()(scope, receive, send)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.api_key and scope["path"] not in OPEN_PATHS:
            auth = headers.get("authorization", "")
            given = auth[7:].strip() if auth[:7].lower() == "bearer " else headers.get("api-key", "")
            if not hmac.compare_digest(given.encode(), self.api_key.encode()):
                return await self._reject(scope, receive, send, APIError(
                    401, "Incorrect or missing API key: send 'Authorization: Bearer KEY' with the key given "
                    "to `gpt2ft serve --api-key`", code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"}))
        too_big = APIError(413, f"the request body is over the server's limit of {self.max_body} bytes "
                           "(gpt2ft serve --max-body)", code="request_too_large")
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body:
            return await self._reject(scope, receive, send, too_big)
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_body:
                return await self._reject(scope, receive, send, too_big)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


def create_app(models: list[ServedModel], config: ServeConfig | None = None, engine_factory=None) -> FastAPI:
    """The FastAPI app serving `models` (the first is the default shown by the playground)."""
    from contextlib import asynccontextmanager

    config = config or ServeConfig()
    by_name = {m.name: m for m in models}
    scheduler = Scheduler(by_name, config.max_batch, config.max_queue, engine_factory)

    @asynccontextmanager
    async def lifespan(app):
        scheduler.start()
        yield
        scheduler.stop()

    app = FastAPI(title="gpt2ft", version="1", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.scheduler, app.state.models, app.state.config = scheduler, by_name, config
    app.add_middleware(Guard, api_key=config.api_key, max_body=config.max_body)

    @app.exception_handler(APIError)
    async def api_error(request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc: RequestValidationError):
        message, param = _validation_message(exc.errors()[0])
        return APIError(400, message, param).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return APIError(exc.status_code, str(exc.detail), type=kind, headers=getattr(exc, "headers", None)).response()

    @app.exception_handler(Exception)
    async def unexpected(request, exc: Exception):  # a bug: answered in shape, the server stays up
        return APIError(500, f"internal error: {type(exc).__name__}", type="server_error").response()

    def model_card(m: ServedModel) -> dict:
        return {"id": m.name, "object": "model", "created": m.created, "owned_by": "gpt2ft", **m.info}

    @app.get("/health")
    async def health():
        return {"status": "ok", **scheduler.load()}

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [model_card(m) for m in models]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str):
        return model_card(lookup(model_id))

    @app.get("/", response_class=HTMLResponse)
    async def playground():
        return resources.files("gpt2ft").joinpath("assets/playground.html").read_text(encoding="utf-8")

    def lookup(name: str) -> ServedModel:
        if name not in by_name:
            raise APIError(404, f"model {name!r} is not served here; choose one of {sorted(by_name)} "
                           "(GET /v1/models)", "model", "model_not_found", type="not_found_error")
        return by_name[name]

    def sampling(req: _Sampling, served: ServedModel, prompt_len: int, max_tokens: int | None,
                 stops: list[str], param: str, logprobs: int | None) -> SamplingConfig:
        context = served.model.config.block_size
        if req.n > config.max_n:
            raise APIError(400, f"n is {req.n} but this server allows at most {config.max_n} "
                           "(gpt2ft serve --max-n)", "n")
        if prompt_len >= context:
            raise APIError(400, f"this model's maximum context length is {context} tokens, but the prompt is "
                           f"{prompt_len} tokens; shorten the {param}", param, "context_length_exceeded")
        if max_tokens is not None and max_tokens > config.max_tokens:
            raise APIError(400, f"max_tokens is {max_tokens} but this server allows at most {config.max_tokens} "
                           "(gpt2ft serve --max-tokens)", "max_tokens")
        if max_tokens is not None and prompt_len + max_tokens > context:
            raise APIError(400, f"this model's maximum context length is {context} tokens, but {prompt_len} "
                           f"prompt tokens + max_tokens {max_tokens} = {prompt_len + max_tokens}; lower max_tokens "
                           f"to {context - prompt_len} or shorten the {param}", param, "context_length_exceeded")
        user_stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(user_stops) > 4:
            raise APIError(400, f"stop: at most 4 stop strings, got {len(user_stops)}", "stop")
        seed = None if req.seed is None else req.seed % 2**63
        # float32 limits: logits / 1e-30 overflow, and a top_p below float32's range reads as 0. Both
        # extremes mean "the most likely token", so they decode as that.
        temperature = req.temperature if req.temperature >= MIN_TEMPERATURE else 0.0
        return SamplingConfig(max_new_tokens=max_tokens or min(config.max_tokens, context - prompt_len),
                              temperature=temperature, top_p=max(req.top_p, 1e-6),
                              top_k=req.top_k if req.top_k > 0 else None,
                              repetition_penalty=req.repetition_penalty, presence_penalty=req.presence_penalty,
                              frequency_penalty=req.frequency_penalty, stop=user_stops + stops, seed=seed,
                              logprobs=logprobs)

    def make_jobs(served, prompts: list[list[int]], cfg: SamplingConfig, req: _Sampling):
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        jobs = []
        for p, ids in enumerate(prompts):
            for i in range(req.n):
                seed = None if cfg.seed is None else (cfg.seed + i) % 2**63  # n choices differ
                jobs.append(Job(served, ids, dataclasses.replace(cfg, seed=seed), p * req.n + i, queue, loop))
        try:
            scheduler.submit(jobs)
        except QueueFull as e:
            if e.status == 503:
                raise APIError(503, f"{e}; retry shortly", code="unavailable", type="server_error",
                               headers={"Retry-After": "1"}) from None
            raise APIError(429, f"{e}; retry shortly", code="rate_limit_exceeded", type="rate_limit_error",
                           headers={"Retry-After": "1"}) from None
        return jobs, queue

    async def events(jobs: list[Job], queue: asyncio.Queue, request: Request | None = None):
        """The jobs' events until all are done; cancels them on timeout or when the client leaves
        (a stream notices at its next write; a plain request is checked every POLL seconds)."""
        deadline = time.monotonic() + config.timeout
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
                    event = await asyncio.wait_for(queue.get(), max(wait, 0.001))
                except asyncio.TimeoutError:
                    if time.monotonic() >= deadline:
                        raise APIError(503, f"the request took longer than the server's limit of {config.timeout:g} "
                                       "s (gpt2ft serve --timeout)", code="timeout", type="server_error",
                                       headers={"Retry-After": "1"}) from None
                    continue
                if event[0] == "error":
                    raise APIError(503, event[2], code="unavailable", type="server_error", headers={"Retry-After": "1"})
                if event[0] == "done":
                    left -= 1
                yield event
        finally:
            scheduler.cancel([j for j in jobs if not (j.completion and j.completion.finish_reason)])

    def sse(chunks):
        async def gen():
            try:
                async for chunk in chunks:
                    yield f"data: {json.dumps(chunk)}\n\n"
            except APIError as e:
                yield f"data: {json.dumps(e.body())}\n\n"
            yield "data: [DONE]\n\n"
        return StreamingResponse(gen(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest, request: Request):
        served = lookup(req.model)
        ids, stops = chat_prompt(served.template, req.messages, served.tokenizer)
        max_tokens = req.max_completion_tokens or req.max_tokens
        top = (req.top_logprobs or 0) if req.logprobs else None
        cfg = sampling(req, served, len(ids), max_tokens, stops, "messages", top)
        jobs, queue = make_jobs(served, [ids], cfg, req)
        rid, created, tok = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), served.tokenizer
        if req.stream:
            return sse(chat_chunks(req, jobs, queue, rid, created, tok))
        done = [None] * len(jobs)
        async for event in events(jobs, queue, request):
            if event[0] == "done":
                done[event[1]] = event[2]
        choices = [{"index": i, "message": {"role": "assistant", "content": c.text, "refusal": None},
                    "logprobs": chat_logprobs(tok, c.logprobs) if top is not None else None,
                    "finish_reason": c.finish_reason} for i, c in enumerate(done)]
        return {"id": rid, "object": "chat.completion", "created": created, "model": served.name,
                "system_fingerprint": None, "choices": choices,
                "usage": usage(len(ids), sum(c.completion_tokens for c in done))}

    async def chat_chunks(req, jobs, queue, rid, created, tok):
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(choices, **extra):
            out = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": req.model,
                   "system_fingerprint": None, "choices": choices}
            if include_usage:
                out["usage"] = extra.get("usage")
            return out

        for j in jobs:
            yield chunk([{"index": j.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None}])
        completion_tokens = 0
        async for event in events(jobs, queue):
            if event[0] == "text":
                _, i, piece, lps = event
                logprobs = chat_logprobs(tok, lps) if jobs[i].sampling.logprobs is not None else None
                yield chunk([{"index": i, "delta": {"content": piece}, "logprobs": logprobs, "finish_reason": None}])
            else:
                c = event[2]
                completion_tokens += c.completion_tokens
                yield chunk([{"index": event[1], "delta": {}, "logprobs": None, "finish_reason": c.finish_reason}])
        if include_usage:
            yield chunk([], usage=usage(jobs[0].completion.prompt_tokens, completion_tokens))

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        served = lookup(req.model)
        tok = served.tokenizer
        prompts = completion_prompts(req.prompt, tok, served.model.config.vocab_size)
        longest = max(prompts, key=len)
        cfg = sampling(req, served, len(longest), req.max_tokens, [], "prompt", req.logprobs)
        jobs, queue = make_jobs(served, prompts, cfg, req)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        echoes = [tok.decode(ids) if req.echo else "" for ids in prompts]
        prompt_lps = [[] for _ in prompts]
        if req.echo and req.logprobs is not None:  # one forward per prompt, off the event loop
            prompt_lps = [await asyncio.to_thread(prompt_logprobs, served, ids, req.logprobs) for ids in prompts]

        def logprobs_of(job, entries, offset):
            if req.logprobs is None:
                return None
            return completion_logprobs(tok, entries, offset)

        if req.stream:
            async def chunks():
                include_usage = bool(req.stream_options and req.stream_options.include_usage)
                base = {"id": rid, "object": "text_completion", "created": created, "model": req.model,
                        "system_fingerprint": None}
                extra = {"usage": None} if include_usage else {}
                offsets = [0] * len(jobs)
                if req.echo:
                    for j in jobs:
                        p = j.index // req.n
                        offsets[j.index] = len(echoes[p])
                        yield {**base, "choices": [{"index": j.index, "text": echoes[p], "finish_reason": None,
                                                    "logprobs": logprobs_of(j, prompt_lps[p], 0)}], **extra}
                completion_tokens = 0
                async for event in events(jobs, queue):
                    i = event[1]
                    if event[0] == "text":
                        lp = logprobs_of(jobs[i], event[3], offsets[i])
                        offsets[i] += len(event[2])
                        yield {**base, "choices": [{"index": i, "text": event[2], "logprobs": lp,
                                                    "finish_reason": None}], **extra}
                    else:
                        completion_tokens += event[2].completion_tokens
                        yield {**base, "choices": [{"index": i, "text": "", "logprobs": None,
                                                    "finish_reason": event[2].finish_reason}], **extra}
                if include_usage:
                    yield {**base, "choices": [], "usage": usage(sum(map(len, prompts)), completion_tokens)}
            return sse(chunks())
        done = [None] * len(jobs)
        async for event in events(jobs, queue, request):
            if event[0] == "done":
                done[event[1]] = event[2]
        choices = []
        for j, c in zip(jobs, done):
            p = j.index // req.n
            entries = prompt_lps[p] + (c.logprobs or [])
            choices.append({"index": j.index, "text": echoes[p] + c.text, "finish_reason": c.finish_reason,
                            "logprobs": logprobs_of(j, entries, 0)})
        return {"id": rid, "object": "text_completion", "created": created, "model": served.name,
                "system_fingerprint": None, "choices": choices,
                "usage": usage(sum(map(len, prompts)), sum(c.completion_tokens for c in done))}

    return app


def completion_prompts(prompt, tokenizer, vocab_size: int) -> list[list[int]]:
    """A completions prompt (string, strings, token ids, lists of token ids) as token-id lists.
    An empty prompt starts from <|endoftext|>, as GPT-2 does for unconditional text."""
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        prompt = [prompt]
    if not prompt:
        raise APIError(400, "prompt: give a string or a non-empty list", "prompt")
    out = []
    for p in prompt:
        ids = tokenizer.encode(p) if isinstance(p, str) else list(p)
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise APIError(400, f"prompt: token id {bad[0]} is outside the vocabulary [0, {vocab_size})", "prompt")
        out.append(ids or [tokenizer.eos_id])
    return out


def check_bind(host: str, api_key: str | None, insecure: bool) -> None:
    """Refuse a non-loopback address without an API key unless --insecure."""
    import ipaddress

    if api_key or insecure or host == "localhost":
        return
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise UserError(f"--host {host} makes the server reachable from other machines: give --api-key KEY "
                        "(or --insecure to serve without one)")


def positive(value: float, name: str) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise UserError(f"{name} must be a positive number, not {value!r}")
