"""Continue a prompt with a model. Instruction-tuned checkpoints format the prompt with the template
they were trained with, unless --raw is given.

    gpt2ft generate gpt2 --prompt "The meaning of life is" --max-new-tokens 40 --stream
"""
from __future__ import annotations

import sys

from ..argtypes import Once, ranged
from ..errors import UserError
from . import (DECODING_SPEED, SAMPLING, STRUCTURED_OUTPUT, add_common, add_decoding, add_grammar, add_sampling,
               decoding_options, group_dests, load_model, refuse_given, required, sampling_config)


def add_args(p):
    add_common(p)
    required(p.add_argument("--prompt", action=Once, help="the text to continue ('-' reads standard input); "
                                            '--prompt "" generates unconditionally (from <|endoftext|>) '
                                            "unless the checkpoint's template frames it"))
    p.add_argument("--raw", action="store_true", help="use the prompt as is, without the checkpoint's template")
    p.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    p.add_argument("--top-next", type=ranged(int, 0), default=0, metavar="K",
                   help="instead of generating, list the K most likely next tokens with probabilities "
                        "(1 .. the vocabulary size; 0: generate)")
    add_sampling(p)
    add_grammar(p)
    add_decoding(p)


def run(args):
    from ..generation import Stream, predict_next_token
    from ..speculative import check_speculative, make_engine
    from ..templates import prompt_for_generation

    prompt = read_stdin_prompt() if args.prompt == "-" else args.prompt
    loaded = load_model(args)
    model, tokenizer = loaded
    text, stops = prompt_for_generation(loaded.meta, prompt, raw=args.raw)
    if args.top_next:
        refuse_given(args, group_dests(args._parser, SAMPLING, STRUCTURED_OUTPUT, DECODING_SPEED) - {"quantize"},
                     "with --top-next (it lists the model's own next-token probabilities: nothing is sampled)")
        vocab = model.config.vocab_size
        if args.top_next > vocab:
            raise UserError(f"--top-next {args.top_next} exceeds the vocabulary of {vocab} tokens; use 1 .. {vocab}")
        for token, prob in predict_next_token(model, tokenizer, text, args.top_next):
            print(f"{prob:8.4f}  {token!r}")
        return 0
    cfg = sampling_config(args, stops)
    if args.draft:
        check_speculative(cfg)
    engine = make_engine(model, tokenizer, 1, **decoding_options(args, loaded))
    completion = Stream(engine, engine.add(tokenizer.encode(text), cfg))
    for piece in completion:
        if args.stream:
            print(piece, end="", flush=True)
    print() if args.stream else print(completion.text)
    if completion.completion.unmatched:  # name the structured-output flag given (add_grammar's: one at most)
        constraints = group_dests(args._parser, STRUCTURED_OUTPUT)
        flag = next(a.option_strings[0] for a in args._parser._actions
                    if a.dest in constraints and getattr(args, a.dest) not in (None, False))
        raise UserError(f"the output reached --max-new-tokens {cfg.max_new_tokens} before it matched {flag}: "
                        "raise --max-new-tokens")
    if args.draft:
        c = completion.completion
        rate = c.accepted_drafts / c.drafted if c.drafted else 0.0
        print(f"(speculative: {c.accepted_drafts} of {c.drafted} drafted tokens accepted ({rate:.0%}), "
              f"{engine.target_forwards} target forwards for {c.completion_tokens} tokens)", file=sys.stderr)
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
