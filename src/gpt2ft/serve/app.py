"""The FastAPI app: the access guard, OpenAI-shaped errors for everything that goes wrong, and thin
routes (a route turns its request into prompts and a Format; the Service does the rest)."""
from __future__ import annotations

import hmac
import json
from contextlib import asynccontextmanager
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..generation import Engine
from .config import ServeConfig, ServedModel
from ..templates import pick_template
from .prompts import chat_prompt, completion_prompts, prompt_logprobs
from .responses import APIError, ChatFormat, TextFormat
from .scheduler import Scheduler
from .schema import ChatRequest, CompletionRequest, api_options, validation_message
from .service import Service
from .structured import constraint

OPEN_PATHS = {"/", "/health"}  # everything else needs the API key when one is set
REQUESTS = {"/v1/chat/completions": ChatRequest, "/v1/completions": CompletionRequest}


class Guard:
    """ASGI middleware: the API key on every route but OPEN_PATHS, and the body-size cap (the body
    is read here, up to the cap, and replayed to the app)."""

    def __init__(self, app, api_key: str | None, max_body: int):
        self.app, self.api_key, self.max_body = app, api_key, max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.api_key and scope["path"] not in OPEN_PATHS:
            auth = headers.get("authorization", "")
            given = auth[7:].strip() if auth[:7].lower() == "bearer " else headers.get("api-key", "")
            if not hmac.compare_digest(given.encode("latin-1"), self.api_key.encode()):
                return await APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer KEY' with the "
                                      "key given to `gpt2ft serve --api-key`", code="invalid_api_key",
                                      headers={"WWW-Authenticate": "Bearer"}).response()(scope, receive, send)
        too_big = APIError(413, f"the request body is over the server's limit of {self.max_body} bytes "
                           "(gpt2ft serve --max-body)", code="request_too_large")
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body:
            return await too_big.response()(scope, receive, send)
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_body:
                return await too_big.response()(scope, receive, send)
        if scope["path"] in REQUESTS and (twice := _key_given_twice(body)):
            return await APIError(400, f"the request body gives {twice!r} twice in one object: give it once",
                                  twice).response()(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


def _key_given_twice(body: bytes) -> str | None:
    """A key that some JSON object of the body holds twice (json.loads keeps the last one silently), or None
    (also for a body that is not JSON: the request's own parsing says what is wrong with it)."""
    twice = []

    def pairs(items):
        keys = [k for k, _ in items]
        twice.extend(k for i, k in enumerate(keys) if k in keys[:i])
        return dict(items)

    try:
        json.loads(body, object_pairs_hook=pairs)
    except (ValueError, RecursionError):
        return None
    return twice[0] if twice else None


def _errors(app: FastAPI) -> None:
    """Every error in OpenAI's shape; a bug is a 500 in that shape and the server stays up."""

    @app.exception_handler(APIError)
    async def api_error(request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc: RequestValidationError):
        fields = getattr(REQUESTS.get(request.url.path), "FIELDS", {})
        message, param = validation_message(exc.errors()[0], fields)
        return APIError(400, message, param).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return APIError(exc.status_code, str(exc.detail), type=kind, headers=getattr(exc, "headers", None)).response()

    @app.exception_handler(Exception)
    async def unexpected(request, exc: Exception):
        return APIError(500, f"internal error: {type(exc).__name__}", type="server_error").response()


def create_app(models: list[ServedModel], config: ServeConfig | None = None, engine_factory=None) -> FastAPI:
    """The FastAPI app serving `models` (the first is the default shown by the playground)."""
    config = config or ServeConfig()
    by_name = {m.name: m for m in models}
    factory = engine_factory or (lambda s: Engine(s.model, s.tokenizer, config.max_batch))
    scheduler = Scheduler({name: factory(s) for name, s in by_name.items()}, config.max_batch, config.max_queue)
    service = Service(by_name, scheduler, config)

    @asynccontextmanager
    async def lifespan(app):
        scheduler.start()
        yield
        scheduler.stop()

    app = FastAPI(title="gpt2ft", version="1", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.scheduler, app.state.models, app.state.config = scheduler, by_name, config
    app.add_middleware(Guard, api_key=config.api_key, max_body=config.max_body)
    if config.allowed_origins:  # outside Guard: a browser's preflight carries no API key, and errors get the headers
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(config.allowed_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type", "api-key"], max_age=600)
    _errors(app)

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
        return model_card(service.lookup(model_id))

    @app.get("/v1/sampling")
    async def sampling_options():
        """The sampling options a request may set: name, type, bounds, default, help (the playground's inputs)."""
        return api_options()

    @app.get("/", response_class=HTMLResponse)
    async def playground():
        return resources.files("gpt2ft").joinpath("assets/playground.html").read_text(encoding="utf-8")

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest, request: Request):
        served = service.lookup(req.model)
        template = pick_template(None, served.template)
        rule = constraint(req, template.name)
        ids, stops = chat_prompt(served.template, req.messages, served.tokenizer)
        jobs, inbox = await service.start(req, served, [ids], stops, "messages", rule)
        fmt = ChatFormat(served.tokenizer, req.logprobs, rule.tools if rule else ())
        return await service.respond(req, request, served, jobs, inbox, fmt)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        served = service.lookup(req.model)
        tok = served.tokenizer
        prompts = completion_prompts(req.prompt, tok)
        rule = constraint(req, "")
        if req.max_tokens == 0 and req.echo:  # score the prompt only: nothing is generated
            service.check_scoring(req, served, prompts, rule)
            jobs, inbox = [], None
        else:
            jobs, inbox = await service.start(req, served, prompts, [], "prompt", rule)
        try:
            echoes = [tok.decode(ids) if req.echo else "" for ids in prompts]
            echo_logprobs = [[] for _ in prompts]
            if req.echo and req.logprobs is not None:  # one forward per prompt, off the event loop, bounded
                echo_logprobs = await service.score(request, prompts,
                                                    lambda ids: prompt_logprobs(served.model, ids, req.logprobs))
        except BaseException:
            scheduler.cancel(jobs)
            raise
        fmt = TextFormat(tok, req.logprobs, req.n, echoes, echo_logprobs)
        if not jobs:
            return service.scored(req, served, prompts, fmt)
        return await service.respond(req, request, served, jobs, inbox, fmt)

    return app
