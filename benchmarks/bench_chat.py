"""Chat: time to first token at the 10th turn of a long conversation, with the KV cache kept between
turns vs prefilling the whole history. GPT-2 124M architecture (random weights), GPT-2 tokenizer,
the chat template; the first 9 turns are played through gpt2ft.chat.Chat (replies generated), then
the 10th turn is timed both ways, alternating, with a different user message each round.

    python -m benchmarks.bench_chat [--rounds 7] [--reply-tokens 50]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.common import machine
from gpt2ft.chat import Chat, chat_settings, render
from gpt2ft.config import preset
from gpt2ft.generation import SamplingConfig
from gpt2ft.model import GPT
from gpt2ft.templates import get_template
from gpt2ft.tokenizer import gpt2_tokenizer

TOPICS = ["the history of the printing press", "how tides work", "why bread rises", "the rules of chess",
          "how a bicycle stays upright", "what makes a good cup of tea", "how volcanoes form",
          "the life of honey bees", "how to plan a garden", "why the sky is blue", "how compilers work",
          "the migration of birds", "how to learn a language", "what a black hole is"]


def message(topic: str) -> str:
    return (f"Could you tell me about {topic}? I would like a short, clear explanation with one example, "
            "and please mention anything that people often get wrong about it.")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--turns", type=int, default=10, help="the turn whose time to first token is measured")
    p.add_argument("--reply-tokens", type=int, default=50, help="tokens per reply in the earlier turns")
    args = p.parse_args()
    torch.manual_seed(0)
    model = GPT(preset("gpt2", dropout=0.0)).eval()
    tokenizer = gpt2_tokenizer()
    chat = Chat(model, tokenizer, get_template("chat"), chat_settings(temperature=0, max_new_tokens=args.reply_tokens),
                system="You are a helpful assistant.", write=lambda text: None, note=print)
    start = time.perf_counter()
    for i in range(args.turns - 1):
        chat.say(message(TOPICS[i]))
    print(f"played {args.turns - 1} turns in {time.perf_counter() - start:.1f} s")
    cfg = SamplingConfig(max_new_tokens=1, temperature=0)  # time to first token = time of a 1-token reply

    def ttft(topic: str, keep: bool) -> tuple[float, int, int]:
        ids, stops = render(chat.template, chat.conversation() + [{"role": "user", "content": message(topic)}],
                            tokenizer)
        if not keep:
            chat.engine.reset()
        t = time.perf_counter()
        stream = chat.engine.complete(ids, SamplingConfig(**{**vars(cfg), "stop": stops}))
        for _ in stream:  # one token: the prefill and the first pick
            pass
        return time.perf_counter() - t, len(ids), stream.completion.cached_tokens

    ttft(TOPICS[-1], keep=True)  # warm-up
    results = {"kept cache": [], "no cache": []}
    for r in range(args.rounds):
        topic = TOPICS[args.turns - 1 + r % (len(TOPICS) - args.turns)]
        for name in results:
            seconds, prompt, cached = ttft(topic, keep=name == "kept cache")
            results[name].append(seconds)
            if r == 0:
                print(f"turn {args.turns}, {name}: prompt of {prompt} tokens, {cached} of them cached")
    print(f"\nchat, time to first token at turn {args.turns}, GPT-2 124M, float32 ({machine()})")
    for name, values in results.items():
        print(f"  {name:<10}  best {min(values) * 1000:8.1f} ms  median {statistics.median(values) * 1000:8.1f} ms  "
              f"(runs: {', '.join(f'{v * 1000:.0f}' for v in values)})")
    best = min(results["no cache"]) / min(results["kept cache"])
    median = statistics.median(results["no cache"]) / statistics.median(results["kept cache"])
    print(f"  speed-up: {best:.1f}x best, {median:.1f}x median (goal >= 5x)")


if __name__ == "__main__":
    main()
