"""gpt2ft: GPT-2 from raw weights to a tuned, evaluated, chatting and served model.

    from gpt2ft import load, generate
    model, tokenizer = load("gpt2")                       # hub id, HF folder or gpt2ft run
    print(generate(model, tokenizer, "Hello, I am", max_new_tokens=20))
"""
from .errors import UserError

__version__ = "0.1.0"
__all__ = ["UserError", "load", "generate", "stream", "GPT", "GPTConfig"]


def __getattr__(name):  # lazy: `import gpt2ft` stays cheap for the CLI's --help
    if name == "load":
        from .checkpoint import load
        return load
    if name in ("generate", "stream"):
        from . import generation
        return getattr(generation, name)
    if name == "GPT":
        from .model import GPT
        return GPT
    if name == "GPTConfig":
        from .config import GPTConfig
        return GPTConfig
    raise AttributeError(name)
