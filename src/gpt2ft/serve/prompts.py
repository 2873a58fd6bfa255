"""Requests -> prompt token ids: messages through the model's template (as SFT trained it, or the plain
transcript chat uses for an untuned model), a completions prompt as given; and the prompt's own
log-probabilities for `echo`. Lengths and token ids are the engine's to check (Engine.add)."""
from __future__ import annotations

import torch

from ..data import sft
from ..templates import Template, pick_template
from .responses import APIError


def chat_prompt(template: Template | None, messages: list, tokenizer) -> tuple[list[int], list[str]]:
    """The tokens a reply continues, exactly as SFT trained them (data.sft.prompt_ids: earlier replies
    each end with EOS), with the template templates.pick_template gives chat too (the model's own, else
    the plain User:/Assistant: transcript); and the template's stop strings."""
    template = pick_template(None, template)
    msgs = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in messages]
    if template.kind == "instruction" and not any(m["role"] == "user" for m in msgs):
        raise APIError(400, f"messages: the model's {template.name!r} template needs a user message", "messages")
    if template.kind == "instruction" and msgs[-1]["role"] == "assistant":  # no header opens another reply
        raise APIError(400, f"messages: the model's {template.name!r} template answers an instruction, so the "
                       "conversation must end with a user (or tool) message, not an assistant one", "messages")
    return sft.prompt_ids(msgs, template, tokenizer), list(template.stop)


def completion_prompts(prompt, tokenizer) -> list[list[int]]:
    """A completions prompt (a string, strings, token ids, lists of token ids) as token-id lists. An
    empty prompt ("" or []) stays empty: the engine starts it from <|endoftext|>."""
    if isinstance(prompt, str) or not prompt or isinstance(prompt[0], int):
        prompt = [prompt]
    return [tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompt]


def check_prompts(prompts: list[list[int]], config) -> None:
    """Prompts scored without generating (echo, max_tokens 0): within the context and the vocabulary."""
    for ids in prompts:
        if len(ids) > config.block_size:
            raise APIError(400, f"the prompt is {len(ids)} tokens but the model's context is {config.block_size}: "
                           "shorten the prompt", "prompt", "context_length_exceeded")
        if bad := [t for t in ids if not 0 <= t < config.vocab_size]:
            raise APIError(400, f"prompt token {bad[0]} is not a token id of this model (0 to "
                           f"{config.vocab_size - 1})", "prompt")


@torch.inference_mode()
def prompt_logprobs(model, ids: list[int], k: int) -> list[tuple[int, float | None, list]]:
    """Log-probabilities of the prompt's own tokens (for echo); the first token has none."""
    if not ids:
        return []
    x = torch.tensor([ids], device=model.lm_head.weight.device)
    logp = model(x)[0, :-1].float().log_softmax(-1)
    out = [(ids[0], None, [])]
    for i, token in enumerate(ids[1:]):
        top = torch.topk(logp[i], k) if k else None
        alts = list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []
        out.append((token, float(logp[i, token]), alts))
    return out
