"""OpenAI's response shapes: errors, and the choices of chat and text completions, whole or streamed
as server-sent events. The two endpoints differ only in their Format (how one choice, one piece and
one finish look); the envelope, the usage (from the Completions, once) and the stream are shared."""
from __future__ import annotations

import codecs
import json
import re
import time
import uuid
from contextlib import aclosing

from fastapi.responses import JSONResponse, StreamingResponse

from ..generation import Completion
from .scheduler import Piece, begun_within


class APIError(Exception):
    """An error answered in OpenAI's shape {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def unavailable(message: str, code: str = "unavailable") -> APIError:
    return APIError(503, message, code=code, type="server_error", headers={"Retry-After": "1"})


def rate_limited(message: str) -> APIError:
    return APIError(429, message, code="rate_limit_exceeded", type="rate_limit_error", headers={"Retry-After": "1"})


def usage(completions: list[Completion], n: int) -> dict:
    """Token counts of a request's completions, n choices per prompt (each prompt counted once)."""
    prompt = sum(c.prompt_tokens for c in completions[::n])
    generated = sum(c.completion_tokens for c in completions)
    out = {"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated}
    if drafted := sum(c.drafted for c in completions):  # serve --draft: OpenAI's fields for predicted tokens
        accepted = sum(c.accepted_drafts for c in completions)
        out["completion_tokens_details"] = {"accepted_prediction_tokens": accepted,
                                            "rejected_prediction_tokens": drafted - accepted}
    return out


# ----- log-probabilities ----------------------------------------------------------------------------
def chat_logprobs(tokenizer, entries) -> dict:
    def one(token, logprob):
        return {"token": tokenizer.decode([token]), "logprob": logprob, "bytes": list(tokenizer.decode_bytes([token]))}

    return {"content": [{**one(t, lp), "top_logprobs": [one(a, alp) for a, alp in alts]} for t, lp, alts in entries]}


def text_logprobs(tokenizer, entries, offset: int) -> dict:
    """The legacy completions' logprobs; text_offset: where each token's text begins in the returned text
    (characters, from `offset`): a token holding part of a character (emoji, CJK) begins at that character."""
    tokens, token_logprobs, top, offsets = [], [], [], []
    characters = codecs.getincrementaldecoder("utf-8")("replace")  # whole characters only, as they complete
    for t, lp, alts in entries:
        tokens.append(tokenizer.decode([t]))
        token_logprobs.append(lp)
        top.append({tokenizer.decode([a]): alp for a, alp in alts} if lp is not None else None)  # 1st prompt token
        offsets.append(offset)
        offset += len(characters.decode(tokenizer.decode_bytes([t])))
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}


def within(tokenizer, entries, text: str) -> list:
    """The log-probability entries of the tokens that begin inside `text`, a completion's returned text."""
    return begun_within(tokenizer, entries, 0, len(text.encode("utf-8")))[0]


# ----- a forced tool call (serve.structured) ----------------------------------------------------------
def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def tool_call(tools: tuple, text: str, id: str, cut: bool = False) -> dict | None:
    """The call a forced tool call's output makes, in OpenAI's shape. A reply cut short (`cut`: it ran out
    of tokens) is still the call as far as it got, as OpenAI returns one (finish_reason "length"): its
    arguments' JSON incomplete, with several tools its name too if the cut came before it ended. None if
    the output is no call (the grammar engine gave up on it)."""
    if len(tools) == 1:
        try:
            json.loads(text)
        except ValueError:
            if not cut:
                return None
        name, arguments = tools[0].name, text
    else:
        try:
            value = json.loads(text)
        except ValueError:
            value = None
        if isinstance(value, dict) and isinstance(value.get("name"), str) and "arguments" in value:
            name, arguments = value["name"], json.dumps(value["arguments"])
        elif cut:  # {"name": "...", "arguments": ... as far as it got (the grammar writes the name first)
            start = PARTIAL_CALL.match(text)
            name, arguments = (start["name"], text[start.end():]) if start else ("", "")
        else:
            return None
    return {"id": id, "type": "function", "function": {"name": name, "arguments": arguments}}


PARTIAL_CALL = re.compile(r'\s*\{\s*"name"\s*:\s*"(?P<name>[a-zA-Z0-9_-]*)"\s*(?:,\s*"arguments"\s*:\s*)?')


# ----- one choice, per endpoint ---------------------------------------------------------------------
class ChatFormat:
    """Choices of /v1/chat/completions. With `tools` (a forced tool call: serve.structured) each
    choice's output is a call: message.tool_calls, content null, finish_reason "tool_calls"; streamed,
    the arguments of a call to one function come as they are generated, else the call comes whole
    with the finish."""

    object, chunk_object, id_prefix = "chat.completion", "chat.completion.chunk", "chatcmpl"

    def __init__(self, tokenizer, logprobs: bool, tools: tuple = ()):
        self.tokenizer, self.logprobs, self.tools = tokenizer, logprobs, tools
        self.ids: dict[int, str] = {}  # each choice's tool call id

    def _logprobs(self, entries):
        return chat_logprobs(self.tokenizer, entries) if self.logprobs else None

    def _call(self, index: int, c: Completion):
        if not self.tools:
            return None
        return tool_call(self.tools, c.text, self.ids.setdefault(index, call_id()), c.finish_reason == "length")

    @staticmethod
    def _finish_reason(call, c: Completion) -> str:
        return "tool_calls" if call is not None and c.finish_reason == "stop" else c.finish_reason

    def opening(self, index: int) -> dict | None:
        delta = {"role": "assistant", "content": None if self.tools else ""}
        if len(self.tools) == 1:
            delta["tool_calls"] = [{"index": 0, "id": self.ids.setdefault(index, call_id()), "type": "function",
                                    "function": {"name": self.tools[0].name, "arguments": ""}}]
        return {"index": index, "delta": delta, "logprobs": None, "finish_reason": None}

    def piece(self, p: Piece) -> dict | None:
        if not self.tools:
            delta = {"content": p.text}
        elif len(self.tools) == 1:
            delta = {"tool_calls": [{"index": 0, "function": {"arguments": p.text}}]}
        elif not self.logprobs:
            return None  # the call comes whole with the finish
        else:
            delta = {}
        return {"index": p.index, "delta": delta, "logprobs": self._logprobs(p.logprobs), "finish_reason": None}

    def finish(self, index: int, c: Completion) -> dict:
        call, delta = self._call(index, c), {}
        if call is not None and len(self.tools) > 1:
            delta = {"tool_calls": [{"index": 0, **call}]}
        return {"index": index, "delta": delta, "logprobs": None, "finish_reason": self._finish_reason(call, c)}

    def choice(self, index: int, c: Completion) -> dict:
        call = self._call(index, c)
        message = {"role": "assistant", "content": c.text if call is None else None, "refusal": None}
        if call is not None:
            message["tool_calls"] = [call]
        return {"index": index, "message": message, "logprobs": self._logprobs(within(self.tokenizer, c.logprobs or [],
                                                                                      c.text)),
                "finish_reason": self._finish_reason(call, c)}


class TextFormat:
    """Choices of /v1/completions; with echo each starts with its prompt (and its log-probabilities)."""

    object = chunk_object = "text_completion"
    id_prefix = "cmpl"

    def __init__(self, tokenizer, logprobs: int | None, n: int, echoes: list[str], echo_logprobs: list[list]):
        self.tokenizer, self.logprobs, self.n = tokenizer, logprobs, n
        self.echoes, self.echo_logprobs = echoes, echo_logprobs
        self.offsets: dict[int, int] = {}  # streaming: each choice's text length so far

    def _logprobs(self, entries, offset: int):
        return text_logprobs(self.tokenizer, entries, offset) if self.logprobs is not None else None

    def opening(self, index: int) -> dict | None:
        echo = self.echoes[index // self.n]
        self.offsets[index] = len(echo)
        if not echo:
            return None
        return {"index": index, "text": echo, "finish_reason": None,
                "logprobs": self._logprobs(self.echo_logprobs[index // self.n], 0)}

    def piece(self, p: Piece) -> dict:
        offset = self.offsets.get(p.index, 0)
        self.offsets[p.index] = offset + len(p.text)
        return {"index": p.index, "text": p.text, "logprobs": self._logprobs(p.logprobs, offset), "finish_reason": None}

    def finish(self, index: int, c: Completion) -> dict:
        return {"index": index, "text": "", "logprobs": None, "finish_reason": c.finish_reason}

    def choice(self, index: int, c: Completion) -> dict:
        p = index // self.n
        generated = within(self.tokenizer, c.logprobs or [], c.text)
        return {"index": index, "text": self.echoes[p] + c.text, "finish_reason": c.finish_reason,
                "logprobs": self._logprobs(self.echo_logprobs[p] + generated, 0)}


# ----- whole responses and streams --------------------------------------------------------------------
class Reply:
    """The response to one request: its id, time and model around the Format's choices."""

    def __init__(self, fmt, model: str, n: int):
        self.fmt, self.model, self.n = fmt, model, n
        self.id, self.created = f"{fmt.id_prefix}-{uuid.uuid4().hex}", int(time.time())

    def _envelope(self, object: str, choices: list[dict]) -> dict:
        return {"id": self.id, "object": object, "created": self.created, "model": self.model,
                "system_fingerprint": None, "choices": choices}

    def whole(self, completions: list[Completion], generated: list[Completion] | None = None) -> dict:
        """The response with these choices; the usage counts `generated` (all best_of candidates)."""
        choices = [self.fmt.choice(i, c) for i, c in enumerate(completions)]
        counted = generated or completions
        return {**self._envelope(self.fmt.object, choices),
                "usage": usage(counted, len(counted) // max(1, len(completions) // self.n))}

    async def chunks(self, events, completions: list[Completion], include_usage: bool):
        """The stream's chunks, in lists of those ready together (events: lists of events): each choice's
        opening, its pieces, its finish; then the usage if asked."""
        extra = {"usage": None} if include_usage else {}

        def chunk(choice):
            return {**self._envelope(self.fmt.chunk_object, [choice]), **extra}

        def one(event):
            if isinstance(event, Piece):
                piece = self.fmt.piece(event)
                return None if piece is None else chunk(piece)
            return chunk(self.fmt.finish(event.index, event.completion))

        yield [chunk(opening) for index in range(len(completions)) if (opening := self.fmt.opening(index)) is not None]
        try:
            async with aclosing(events):  # closed with the stream, so a client that leaves cancels at once
                async for batch in events:
                    yield [c for c in map(one, batch) if c is not None]
        except APIError:  # a timeout or a failure mid-stream: the usage, then the error event (the choices
            # that did not end get no finish_reason: OpenAI's values would each say something untrue)
            if include_usage:
                yield [{**self._envelope(self.fmt.chunk_object, []), "usage": usage(completions, self.n)}]
            raise  # then the error event (sse)
        if include_usage:
            yield [{**self._envelope(self.fmt.chunk_object, []), "usage": usage(completions, self.n)}]


def sse(chunks) -> StreamingResponse:
    """Server-sent events of `chunks` (lists of chunks, each list sent in one write); an APIError
    mid-stream is sent as an error event; [DONE] last."""

    async def gen():
        try:
            async with aclosing(chunks):
                async for ready in chunks:  # one write for the chunks ready together
                    if ready:
                        yield "".join(f"data: {json.dumps(chunk)}\n\n" for chunk in ready)
        except APIError as e:
            yield f"data: {json.dumps(e.body())}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(gen(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
