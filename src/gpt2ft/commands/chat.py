"""Chat with a model over many turns, streaming each reply; the KV cache is kept between turns.

Without MODEL, the newest run under ./runs is chosen: DPO, else SFT, else fine-tune, else pretrain,
else gpt2 from the Hugging Face cache (--model KIND picks the newest of one kind). Type /help in
the chat for its commands. When standard input is not a terminal, each line is a turn and only the
replies are printed:

    gpt2ft chat                                  # the best model under ./runs
    gpt2ft chat runs/demo/sft --system "Answer briefly." --temperature 0
    gpt2ft chat runs/demo/sft --json-schema person.json     # every reply valid against the schema
    printf 'unlock\\n/quit\\n' | gpt2ft chat runs/secret
"""
from __future__ import annotations

import sys
from pathlib import Path

from . import (add_decoding, add_device, add_grammar, add_no_verify, add_sampling, decoding_options,
               inference_device, quantize_loaded, sampling_config)


def add_args(p):
    p.add_argument("model", metavar="MODEL", nargs="?", default=None,
                   help="Hub id, HF folder, gpt2ft checkpoint or run folder (default: chosen under --runs)")
    p.add_argument("--lora", metavar="ADAPTER_DIR", default=None, help="apply this LoRA adapter on top of MODEL")
    add_no_verify(p)
    add_device(p)
    g = p.add_argument_group("chat")
    g.add_argument("--runs", default="runs", metavar="DIR", help="where to look for runs when MODEL is not given")
    g.add_argument("--model", dest="kind", default=None, metavar="KIND",
                   help="dpo|sft|finetune|pretrained: the newest run of that kind under --runs")
    g.add_argument("--system", default=None, metavar="TEXT", help="system prompt")
    g.add_argument("--multiline", action="store_true", help="a message ends with a line holding only '.'")
    g.add_argument("--transcript", default=None, metavar="FILE",
                   help="append every turn, with its settings and timings, to FILE (JSON lines): a new file or a "
                        "transcript gpt2ft wrote, never another file nor one in a model or run folder")
    g.add_argument("--verbose", action="store_true", help="print time to first token and tokens/s after replies")
    from ..chat import CHAT_DEFAULTS

    add_sampling(p, **CHAT_DEFAULTS)
    add_grammar(p)  # for the whole chat; /json changes it
    add_decoding(p)


def run(args):
    from ..chat import Chat, Transcript, choose_model, interactive_loop, load_chat_model, piped_loop
    from ..errors import UserError

    interactive = sys.stdin.isatty()
    note = (lambda text: print(text, flush=True)) if interactive else \
        (lambda text: print(text, file=sys.stderr, flush=True))
    settings = sampling_config(args)  # checked before a model loads
    if args.model is not None and args.kind is not None:
        raise UserError("give MODEL or --model KIND, not both")
    inputs = [p for p in (args.model, args.lora) if p is not None and Path(p).exists()]
    transcript = Transcript(args.transcript, inputs=inputs) if args.transcript else None
    if args.model is None:
        ref, reason = choose_model(args.runs, args.kind)
        note(f"model: {ref}, {reason}")
    else:
        ref, reason = args.model, "given on the command line"
    loaded, template = load_chat_model(ref, *inference_device(args), args.lora, args.verify)
    model, tokenizer = loaded
    if args.quantize:
        quantize_loaded(model, args.quantize)
    if settings.grammar is not None:  # a malformed one is an error now, not at every turn
        from ..grammar import compile_grammar

        compile_grammar(settings.grammar, tokenizer, model.config.vocab_size)
    kind = loaded.meta.get("objective") or ("pretrained (Hugging Face)" if not loaded.meta else "unknown")
    chat = Chat(model, tokenizer, template, settings, system=args.system, note=note, transcript=transcript,
                verbose=args.verbose, engine_options=decoding_options(args, loaded), model_info={"source": str(loaded.source), "reason": reason, "lora": args.lora,
                                                  "kind": kind + (" + LoRA" if args.lora else "")})
    if interactive:
        note(f"chatting with {loaded.source} ({kind}, template {chat.template.name}, context "
             f"{model.config.block_size}); /help for commands, Ctrl-D to leave")
        return interactive_loop(chat, args.multiline)
    return piped_loop(chat, sys.stdin)
