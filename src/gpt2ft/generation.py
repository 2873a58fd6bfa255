"""Text generation: logits processors -> sample_next() -> generate_ids() (batched, KV cache) ->
TextStream (one prompt, streaming text for the CLI, chat and server) and generate() (many prompts)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import torch

from .errors import UserError
from .model import GPT
from .tokenizer import StreamDecoder, Tokenizer


@dataclass
class SamplingConfig:
    """How to pick each next token."""

    max_new_tokens: int = 100
    """Most tokens to generate per prompt."""
    temperature: float = 0.8
    """Softmax temperature; 0 means greedy (argmax)."""
    top_k: int | None = None
    """Keep only the k most likely tokens (None or 0: all)."""
    top_p: float = 1.0
    """Keep the smallest set of tokens whose probability mass reaches p (1.0: all)."""
    repetition_penalty: float = 1.0
    """Divide positive / multiply negative logits of tokens already in the context (1.0: off)."""
    stop: list[str] = field(default_factory=list)
    """Strings that end the generation; the output stops before them."""
    seed: int | None = None
    """Seed for sampling (None: a fresh random seed)."""
    stop_at_eos: bool = True
    """End a row at <|endoftext|>."""

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise UserError(f"max_new_tokens must be a positive integer, not {self.max_new_tokens!r}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise UserError(f"temperature must be a finite number >= 0, not {self.temperature!r}")
        if self.top_k is not None and self.top_k < 0:
            raise UserError(f"top_k must be >= 0, not {self.top_k}")
        if not (0 < self.top_p <= 1) or math.isnan(self.top_p):
            raise UserError(f"top_p must be in (0, 1], not {self.top_p}")
        if not math.isfinite(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise UserError(f"repetition_penalty must be > 0, not {self.repetition_penalty}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in self.stop if s]

    @classmethod
    def from_kwargs(cls, **kwargs) -> "SamplingConfig":
        names = {f.name for f in fields(cls)}
        unknown = set(kwargs) - names
        if unknown:
            raise TypeError(f"unknown sampling option(s): {sorted(unknown)}")
        return cls(**kwargs)


# ----- logits processors (pure functions on (B, V) float logits) ------------------------------
def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty as transformers applies it: seen tokens' logits / penalty if > 0, else * penalty."""
    if penalty == 1.0:
        return logits
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def top_k_filter(logits: torch.Tensor, k: int | None) -> torch.Tensor:
    if not k or k >= logits.size(-1):
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability mass reaches p."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # mass of the strictly more likely tokens
    drop_sorted = mass_before >= p  # the set already reached p without this token
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample_next(logits: torch.Tensor, cfg: SamplingConfig, seen: torch.Tensor | None,
                generator: torch.Generator | None) -> torch.Tensor:
    """(B, V) logits -> (B,) next token ids."""
    logits = logits.float()
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, cfg.repetition_penalty)
    if cfg.temperature == 0:
        return logits.argmax(dim=-1)
    logits = top_p_filter(top_k_filter(logits / cfg.temperature, cfg.top_k), cfg.top_p)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


# ----- token generation -----------------------------------------------------------------------
def check_context(prompt_len: int, max_new_tokens: int, context: int) -> None:
    if prompt_len == 0:
        raise UserError("the prompt is empty")
    if prompt_len >= context:
        raise UserError(f"the prompt is {prompt_len} tokens but the model's context is {context}: shorten the prompt")
    if prompt_len + max_new_tokens > context:
        raise UserError(f"the prompt is {prompt_len} tokens and max_new_tokens is {max_new_tokens}: "
                        f"{prompt_len + max_new_tokens} positions exceed the model's context of {context}; "
                        f"lower max_new_tokens to {context - prompt_len} or shorten the prompt")


def _decode_step(model: GPT, tok, position_ids, input_pos, attention_mask, static: bool):
    return model(tok, position_ids=position_ids, attention_mask=attention_mask, input_pos=input_pos,
                 static_cache=static, logits_at="last")


_compiled_steps: dict[int, object] = {}


@torch.inference_mode()
def generate_ids(model: GPT, prompts: list[list[int]], cfg: SamplingConfig, *, use_cache: bool = True,
                 compile: bool = False, eos_id: int | None = None):
    """Yield the next token of every row, (B,) per step, until all rows end or max_new_tokens.

    Prompts of different lengths are left-padded; positions then count real tokens only, so each
    row generates exactly what it would alone. Finished rows keep yielding eos_id.
    """
    device = model.lm_head.weight.device
    eos_id = model.config.eos_token_id if eos_id is None else eos_id
    B, P = len(prompts), max(len(p) for p in prompts)
    for p in prompts:
        check_context(len(p), cfg.max_new_tokens, model.config.block_size)
    total = P + cfg.max_new_tokens
    idx = torch.full((B, P), eos_id, dtype=torch.long, device=device)
    mask = torch.ones(B, total, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        idx[i, P - len(p):] = torch.tensor(p, dtype=torch.long, device=device)
        mask[i, :P - len(p)] = 0
    padded = bool((mask == 0).any())
    positions = (mask.cumsum(1) - 1).clamp(min=0)  # (B, total)
    seen = None
    if cfg.repetition_penalty != 1.0:
        seen = torch.zeros(B, model.config.vocab_size, dtype=torch.bool, device=device)
        seen.scatter_(1, idx, mask[:, :P].bool())
    generator = None
    if cfg.temperature > 0:
        generator = torch.Generator(device=device)
        generator.manual_seed(cfg.seed if cfg.seed is not None else torch.seed())

    static = compile
    step = _decode_step
    if use_cache:
        model.setup_cache(B, total)
        if compile:
            step = _compiled_steps.setdefault(id(model), torch.compile(_decode_step, dynamic=False))
        logits = model(idx, position_ids=positions[:, :P], attention_mask=mask[:, :P] if padded else None,
                       input_pos=torch.arange(P, device=device), logits_at="last")
    else:
        logits = model(idx, position_ids=positions[:, :P], attention_mask=mask[:, :P] if padded else None,
                       logits_at="last")
    done = torch.zeros(B, dtype=torch.bool, device=device)
    seq = idx
    for t in range(cfg.max_new_tokens):
        tok = sample_next(logits, cfg, seen, generator)
        tok = torch.where(done, torch.full_like(tok, eos_id), tok)
        yield tok
        if cfg.stop_at_eos:
            done |= tok == eos_id
            if bool(done.all()):
                return
        if t == cfg.max_new_tokens - 1:
            return
        if seen is not None:
            seen.scatter_(1, tok[:, None], True)
        cur = P + t
        if use_cache:
            attn = mask if static else (mask[:, :cur + 1] if padded else None)
            logits = step(model, tok[:, None], positions[:, cur:cur + 1],
                          torch.tensor([cur], device=device), attn, static)
        else:
            seq = torch.cat([seq, tok[:, None]], dim=1)
            logits = model(seq, position_ids=positions[:, :cur + 1],
                           attention_mask=mask[:, :cur + 1] if padded else None, logits_at="last")


def _find_stop(text: str, stops: list[str]) -> int:
    """Index of the earliest stop string in text, or -1."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else -1


def _held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters could still be the start of a stop string."""
    longest = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if s.startswith(text[-n:]):
                longest = max(longest, n)
                break
    return longest


class TextStream:
    """Iterate over the text of one completion as it is generated.

    After the loop: .text (the whole completion), .finish_reason ("stop" or "length"),
    .prompt_tokens and .completion_tokens. Pieces never split a UTF-8 character, and text that
    may begin a stop string is held back until it is known not to.
    """

    def __init__(self, model: GPT, tokenizer: Tokenizer, prompt: str | list[int], cfg: SamplingConfig,
                 compile: bool = False):
        self.prompt_ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        self.model, self.tokenizer, self.cfg, self.compile = model, tokenizer, cfg, compile
        self.prompt_tokens = len(self.prompt_ids)
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self.text = ""

    def __iter__(self):
        decoder, stops, emitted = StreamDecoder(self.tokenizer), self.cfg.stop, 0
        eos = self.tokenizer.eos_id
        self.finish_reason = "length"
        for tok in generate_ids(self.model, [self.prompt_ids], self.cfg, compile=self.compile, eos_id=eos):
            token = int(tok[0])
            self.completion_tokens += 1
            if token == eos and self.cfg.stop_at_eos:
                self.finish_reason = "stop"
                break
            self.text += decoder.push(token)
            cut = _find_stop(self.text, stops)
            if cut >= 0:
                self.text, self.finish_reason = self.text[:cut], "stop"
                break
            safe = len(self.text) - _held_back(self.text, stops)
            if safe > emitted:
                yield self.text[emitted:safe]
                emitted = safe
        else:
            self.text += decoder.flush()
        if len(self.text) > emitted:
            yield self.text[emitted:]


def stream(model: GPT, tokenizer: Tokenizer, prompt: str, **sampling) -> TextStream:
    """Stream the completion of one prompt: `for piece in stream(model, tok, "Hi"): print(piece, end="")`."""
    return TextStream(model, tokenizer, prompt, SamplingConfig.from_kwargs(**sampling))


def generate_batch(model: GPT, tokenizer: Tokenizer, prompts: list[str], cfg: SamplingConfig,
                   batch_size: int = 8) -> list[str]:
    """Completions of many prompts, batched with left padding; each cut at EOS or a stop string."""
    outputs: list[str] = []
    eos = tokenizer.eos_id
    for start in range(0, len(prompts), batch_size):
        chunk = [tokenizer.encode(p) for p in prompts[start:start + batch_size]]
        rows: list[list[int]] = [[] for _ in chunk]
        stopped = [False] * len(chunk)
        for tok in generate_ids(model, chunk, cfg, eos_id=eos):
            for i, t in enumerate(tok.tolist()):
                if stopped[i]:
                    continue
                if t == eos and cfg.stop_at_eos:
                    stopped[i] = True
                    continue
                rows[i].append(t)
                if cfg.stop and _find_stop(tokenizer.decode(rows[i][-64:]), cfg.stop) >= 0:
                    stopped[i] = True
            if all(stopped):
                break
        for ids in rows:
            text = tokenizer.decode(ids)
            cut = _find_stop(text, cfg.stop)
            outputs.append(text[:cut] if cut >= 0 else text)
    return outputs


def generate(model: GPT, tokenizer: Tokenizer, prompt: str | list[str], **sampling) -> str | list[str]:
    """The completion of a prompt (or a list of completions for a list of prompts)."""
    cfg = SamplingConfig.from_kwargs(**sampling)
    if isinstance(prompt, str):
        return generate_batch(model, tokenizer, [prompt], cfg)[0]
    return generate_batch(model, tokenizer, list(prompt), cfg)


@torch.inference_mode()
def predict_next_token(model: GPT, tokenizer: Tokenizer, text: str, k: int = 5) -> list[tuple[str, float]]:
    """The k most likely next tokens after `text`, with their probabilities."""
    ids = tokenizer.encode(text)
    check_context(len(ids), 1, model.config.block_size)
    x = torch.tensor([ids], device=model.lm_head.weight.device)
    probs = model(x, logits_at="last")[0].float().softmax(-1)
    top = torch.topk(probs, k)
    return [(tokenizer.decode([i]), float(p)) for p, i in zip(top.values.tolist(), top.indices.tolist())]
