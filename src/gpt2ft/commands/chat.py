"""Chat with a model over many turns, streaming each reply; the KV cache is kept between turns.

Without MODEL, the newest run under ./runs is chosen: DPO, else SFT, else fine-tune, else pretrain,
else gpt2 from the Hugging Face cache (--model KIND picks the newest of one kind). Type /help in
the chat for its commands. When standard input is not a terminal, each line is a turn and only the
replies are printed:

    gpt2ft chat                                  # the best model under ./runs
    gpt2ft chat runs/demo/sft --system "Answer briefly." --temperature 0
    printf 'unlock\\n/quit\\n' | gpt2ft chat runs/secret
"""
from __future__ import annotations

import sys

from . import add_device, add_no_verify, add_sampling


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
                   help="append every turn, with its settings and timings, to FILE (JSON lines)")
    g.add_argument("--verbose", action="store_true", help="print time to first token and tokens/s after replies")
    add_sampling(p, temperature=0.7, max_new_tokens=150)
    p.set_defaults(top_k=40, top_p=0.9)


def run(args):
    from ..chat import Chat, Settings, choose_model, interactive_loop, load_chat_model, piped_loop
    from ..errors import UserError
    from ..generation import SamplingConfig

    interactive = sys.stdin.isatty()
    note = (lambda text: print(text, flush=True)) if interactive else \
        (lambda text: print(text, file=sys.stderr, flush=True))
    # check the sampling flags before a model loads
    SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                   top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed)
    if args.model is not None and args.kind is not None:
        raise UserError("give MODEL or --model KIND, not both")
    if args.model is None:
        ref, reason = choose_model(args.runs, args.kind)
        note(f"model: {ref}, {reason}")
    else:
        ref, reason = args.model, "given on the command line"
    loaded, template = load_chat_model(ref, args.device, args.dtype, args.lora, args.verify)
    model, tokenizer = loaded
    kind = loaded.meta.get("objective") or ("pretrained (Hugging Face)" if not loaded.meta else "unknown")
    settings = Settings(args.temperature, args.top_k or 0, args.top_p, args.max_new_tokens,
                        args.repetition_penalty, args.seed)
    transcript = open(args.transcript, "a", encoding="utf-8") if args.transcript else None
    try:
        chat = Chat(model, tokenizer, template, settings, system=args.system, stop=list(args.stop or []),
                    note=note, transcript=transcript,
                    verbose=args.verbose,
                    model_info={"source": str(loaded.source), "kind": kind + (" + LoRA" if args.lora else ""),
                                "reason": reason, "lora": args.lora})
        if interactive:
            name = template.name if template is not None else "none"
            note(f"chatting with {loaded.source} ({kind}, template {name}, context "
                 f"{model.config.block_size}); /help for commands, Ctrl-D to leave")
            return interactive_loop(chat, args.multiline)
        return piped_loop(chat, sys.stdin)
    finally:
        if transcript is not None:
            transcript.close()
