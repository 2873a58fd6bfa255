"""Continue a prompt with a model. Instruction-tuned checkpoints format the prompt with the template
they were trained with, unless --raw is given.

    gpt2ft generate gpt2 --prompt "The meaning of life is" --max-new-tokens 40 --stream
"""
from __future__ import annotations

import sys

from ..argtypes import ranged
from ..errors import UserError
from . import add_common, add_grammar, add_quantize, add_sampling, load_model, required, sampling_config


def add_args(p):
    add_common(p)
    required(p.add_argument("--prompt", help="the text to continue ('-' reads standard input); "
                                            '--prompt "" generates unconditionally (from <|endoftext|>) '
                                            "unless the checkpoint's template frames it"))
    p.add_argument("--raw", action="store_true", help="use the prompt as is, without the checkpoint's template")
    p.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    p.add_argument("--top-next", type=ranged(int, 0), default=0, metavar="K",
                   help="instead of generating, list the K most likely next tokens with probabilities "
                        "(1 .. the vocabulary size; 0: generate)")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step (static cache; GPUs)")
    add_sampling(p)
    add_grammar(p)
    add_quantize(p)
    g = p.add_argument_group("speculative decoding")
    g.add_argument("--draft", metavar="MODEL|ngram", default=None,
                   help="a smaller model with the same tokenizer drafts tokens that MODEL verifies in one forward "
                        "(greedy output unchanged, sampling keeps MODEL's distribution); ngram: drafts copied "
                        "from earlier text (prompt lookup, no second model)")
    g.add_argument("--draft-k", type=ranged(int, 1, 8), default=4, help="tokens drafted per step at first (adapts)")


def run(args):
    from ..generation import predict_next_token, stream
    from ..templates import prompt_for_generation

    prompt = read_stdin_prompt() if args.prompt == "-" else args.prompt
    loaded = load_model(args)
    model, tokenizer = loaded
    text, stops = prompt_for_generation(loaded.meta, prompt, raw=args.raw)
    if args.top_next:
        vocab = model.config.vocab_size
        if args.top_next > vocab:
            raise UserError(f"--top-next {args.top_next} exceeds the vocabulary of {vocab} tokens; use 1 .. {vocab}")
        for token, prob in predict_next_token(model, tokenizer, text, args.top_next):
            print(f"{prob:8.4f}  {token!r}")
        return 0
    cfg = sampling_config(args, stops)
    if args.draft:
        return _speculative(args, model, tokenizer, text, cfg)
    completion = stream(model, tokenizer, text, cfg, compile=args.compile)
    if args.stream:
        for piece in completion:
            print(piece, end="", flush=True)
        print()
    else:
        for _ in completion:
            pass
        print(completion.text)
    return 0


def _speculative(args, model, tokenizer, text: str, cfg) -> int:
    from ..checkpoint import load
    from ..speculative import speculative_generate

    draft = "ngram" if args.draft == "ngram" else load(args.draft, device=model.lm_head.weight.device,
                                                       dtype=model.lm_head.weight.dtype, verify=args.verify)
    if draft != "ngram" and draft.tokenizer.fingerprint() != tokenizer.fingerprint():
        raise UserError(f"--draft {args.draft} has another tokenizer than {args.model}: drafts must share it")
    pieces = speculative_generate(model, tokenizer, tokenizer.encode(text), cfg,
                                  draft if draft == "ngram" else draft.model, args.draft_k)
    try:
        while True:
            piece = next(pieces)
            if args.stream:
                print(piece, end="", flush=True)
    except StopIteration as done:
        completion, stats = done.value
    print("" if args.stream else completion.text)
    print(f"(speculative: {stats.accepted} of {stats.proposed} drafted tokens accepted "
          f"({stats.acceptance:.0%}), {stats.target_forwards} target forwards for "
          f"{completion.completion_tokens} tokens)", file=sys.stderr)
    return 0


def read_stdin_prompt() -> str:
    """The prompt behind --prompt -: standard input as UTF-8 text, which may not be empty (an empty
    input is more likely a broken pipe than a wish for unconditional text, which --prompt "" asks for)."""
    from ..fileio import MAX_USER_FILE

    raw = sys.stdin.buffer.read(MAX_USER_FILE + 1)
    if len(raw) > MAX_USER_FILE:
        raise UserError(f"--prompt -: standard input is over the {MAX_USER_FILE // 2**20} MB limit for a prompt")
    if b"\0" in raw:
        raise UserError("--prompt -: standard input is binary data, not a prompt")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(f"--prompt -: standard input is not UTF-8 text (byte {e.start})") from None
    if not text.strip():
        raise UserError('--prompt -: standard input is empty; pass --prompt "" for unconditional text')
    return text
