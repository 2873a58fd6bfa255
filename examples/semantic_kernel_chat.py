"""A Semantic Kernel chat with conversation memory, against `gpt2ft serve` through SK's OpenAI
chat connector (pip install 'gpt2ft[sk]').

    gpt2ft serve runs/demo/sft --name sft &
    python examples/semantic_kernel_chat.py --model sft                 # interactive; Ctrl-D ends
    python examples/semantic_kernel_chat.py --model sft --say "Who is Hamlet?" --say "And his father?"

Every turn is added to SK's ChatHistory, so each request carries the whole conversation (the
server renders it with the model's chat template).
"""
from __future__ import annotations

import argparse
import asyncio
import os
import sys


async def chat(args) -> None:
    from openai import AsyncOpenAI
    from semantic_kernel import Kernel
    from semantic_kernel.connectors.ai.open_ai import OpenAIChatCompletion, OpenAIChatPromptExecutionSettings
    from semantic_kernel.contents import ChatHistory

    client = AsyncOpenAI(base_url=args.base_url, api_key=args.api_key or "none", max_retries=0)
    kernel = Kernel()
    kernel.add_service(OpenAIChatCompletion(ai_model_id=args.model, async_client=client, service_id="gpt2ft"))
    service = kernel.get_service("gpt2ft")
    settings = OpenAIChatPromptExecutionSettings(service_id="gpt2ft", max_tokens=args.max_tokens,
                                                 temperature=args.temperature, seed=args.seed)
    history = ChatHistory(system_message=args.system) if args.system else ChatHistory()

    def turns():
        if args.say:
            yield from args.say
            return
        while True:
            try:
                yield input("you> ")
            except EOFError:
                return

    for user in turns():
        history.add_user_message(user)
        print(f"you> {user}" if args.say else "", end="\n" if args.say else "")
        reply = await service.get_chat_message_content(chat_history=history, settings=settings, kernel=kernel)
        history.add_message(reply)
        print(f"assistant> {reply.content}", flush=True)
        used = reply.metadata.get("usage")
        if used is not None:
            print(f"  ({used.prompt_tokens} prompt + {used.completion_tokens} completion tokens)", flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1", help="the server's OpenAI base URL")
    p.add_argument("--api-key", default=os.environ.get("GPT2FT_API_KEY"), help="the server's --api-key")
    p.add_argument("--model", required=True, help="a model id the server lists at /v1/models")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--say", action="append", default=None, help="a user turn (repeatable); else read stdin")
    p.add_argument("--max-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--seed", type=int, default=None)
    args = p.parse_args()
    try:
        asyncio.run(chat(args))
    except ImportError as e:
        print(f"error: {e.name} is missing: pip install 'gpt2ft[sk]'", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # noqa: BLE001 - e.g. the server is not running: one line, no traceback
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
