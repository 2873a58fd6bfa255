"""An OpenAI-compatible HTTP server: /v1/chat/completions, /v1/completions, /v1/models, /v1/sampling,
/health and a browser playground at /.

    app = create_app([served_model(...)], ServeConfig(api_key="k"))   # then uvicorn.run(app)

In parts, each over the one below it:
  schema     request bodies; their sampling fields derived from gpt2ft.sampling.OPTIONS
  structured response_format, vLLM's guided_*/structured_outputs and forced tool calls -> one grammar
  prompts    messages (the model's template, as chat picks it) or a prompt -> token ids
  scheduler  one thread steps every model's engine; typed events (Piece, Done, Failed) to each request
  responses  OpenAI's shapes: errors, chat and text choices, whole or streamed (usage from Completions)
  service    request -> SamplingConfigs -> jobs (the engine's checks as 400s) -> events
  app        the access guard, error handlers and thin routes
"""
from __future__ import annotations

import importlib

from .config import ServeConfig, ServedModel, check_api_key, check_bind, check_origin, served_model, share_base

# the parts that need fastapi/pydantic load on first use, so the CLI can check its flags without them
_LAZY = {"create_app": "app", "chat_prompt": "prompts", "completion_prompts": "prompts", "APIError": "responses",
         "ChatRequest": "schema", "CompletionRequest": "schema", "Message": "schema"}
__all__ = ["ServeConfig", "ServedModel", "check_api_key", "check_bind", "check_origin", "served_model", "share_base", *_LAZY]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
