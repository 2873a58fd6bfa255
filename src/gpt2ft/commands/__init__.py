"""One module per CLI verb: add_args(parser) declares its flags, run(args) does the work.

Helpers here hold the flags that several verbs share, so every verb spells them the same way.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import typing


def required(action: argparse.Action) -> argparse.Action:
    """Mark an option as required after --config is applied: `required(p.add_argument("--out"))`."""
    action.metadata_required = True
    return action


def path_option(action: argparse.Action, keywords=(), model: bool = False) -> argparse.Action:
    """Mark an option whose value may name a file or folder (`keywords`: values that name none, e.g. a
    built-in template): a run's config.yaml records such a value as an absolute path, never one relative
    to the folder the command ran in; `model`: a model folder, recorded as the checkpoint it resolves to
    (a run folder or RUN/latest moves on as that run trains)."""
    action.path_keywords, action.names_model = tuple(keywords), model
    return action


def only_with(action: argparse.Action, dest: str, value=None) -> argparse.Action:
    """Mark an option that means something only beside another (`dest` set, or set to `value`; marked
    twice, it needs both): given without it, on the command line or in --config, it is an error rather
    than silently ignored."""
    action.only_with = [*getattr(action, "only_with", ()), (dest, value)]
    return action


def refuse_given(args, dests, where: str) -> None:
    """Options among `dests` that the user gave (flags or --config) but that mean nothing `where` (known
    only once the input is read, e.g. "for plain text"): an error naming the first, not silently ignored."""
    from ..errors import UserError

    for action in args._parser._actions:
        if action.dest in dests and action.dest in getattr(args, "_given", ()):
            raise UserError(f"{action.option_strings[0]} has no effect {where}: drop it")


# argument groups that verbs refer to as a whole (group_dests): add_sampling's, add_grammar's, add_decoding's
SAMPLING, STRUCTURED_OUTPUT, DECODING_SPEED = "sampling", "structured output", "decoding speed"


def group_dests(parser: argparse.ArgumentParser, *titles: str) -> set[str]:
    """The dests of the options in the argument groups with these titles (e.g. add_sampling's "sampling"; a
    title's words in parentheses left out)."""
    return {a.dest for g in parser._action_groups if (g.title or "").split(" (")[0] in titles
            for a in g._group_actions}


def add_keyword(p) -> None:
    """--keyword for the verbs that score generated answers (eval, sft's evaluations), declared once."""
    def word(text: str) -> str:
        if not text.strip():
            raise argparse.ArgumentTypeError("an empty keyword is in every output: give a word")
        return text

    p.add_argument("--keyword", action="append", default=None, type=word, metavar="WORD",
                   help="a word every answer should contain, case-insensitive (repeatable: an answer counts when "
                        "it holds all of them; keyword_rate is the share that does)")


def add_common(p: argparse.ArgumentParser, model: bool = True, adapter_flag: bool = True) -> None:
    """MODEL positional, --lora ADAPTER_DIR, --no-verify, --device, --dtype (--config is on every verb)."""
    if model:  # optional to argparse: --config may name it (cli._apply_config requires it)
        path_option(required(p.add_argument(
            "model", metavar="MODEL", nargs="?", default=None,
            help="Hub id (gpt2, openai-community/gpt2), HF folder, gpt2ft checkpoint or run folder")), model=True)
    if model and adapter_flag:
        path_option(p.add_argument("--lora", metavar="ADAPTER_DIR", default=None,
                                   help="apply this LoRA adapter on top of MODEL"), model=True)
    if model:
        add_no_verify(p)
    add_device(p)


def add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto|cpu|cuda|mps (auto: cuda > mps > cpu)")
    p.add_argument("--dtype", default="auto",
                   help="auto|float32|bfloat16|float16 (auto: bfloat16 where this machine multiplies it in hardware, "
                        "a GPU or a CPU with AMX-BF16 or AVX512-BF16, else float32; float32 compares bit for bit)")


def add_no_verify(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip the sha256 check of a gpt2ft checkpoint's files (sizes are still checked)")


def add_sampling(p: argparse.ArgumentParser, **defaults) -> None:
    """Every sampling option that has a flag, from the one schema (gpt2ft.sampling.OPTIONS): its type,
    range and help; `defaults` are this verb's own defaults (e.g. temperature=0.0 for eval)."""
    from ..sampling import OPTIONS

    g = p.add_argument_group(SAMPLING)
    for opt in OPTIONS.values():
        if opt.flag is None:
            continue
        default = defaults.pop(opt.name, opt.default)
        if opt.kind is list:
            g.add_argument(opt.flag, action="append", default=None, metavar="S", help=opt.help + " (repeatable)")
            continue
        if opt.kind is bool:
            g.add_argument(opt.flag, action="store_true", default=default, help=opt.help)
            continue
        if opt.kind is dict:
            g.add_argument(opt.flag, action="append", default=None, metavar="ID=BIAS", type=_option_type(opt),
                           help=f"{opt.help} (repeatable)")
            continue
        g.add_argument(opt.flag, type=_option_type(opt), default=default, help=f"{opt.help}; {opt.accepts}")
    if defaults:
        raise TypeError(f"not sampling options: {sorted(defaults)}")


def _option_type(opt):
    """argparse `type=` for a schema option: its one check (gpt2ft.sampling.check), as argparse reports it."""
    from ..argtypes import argparse_type
    from ..errors import UserError

    return argparse_type(opt.parse_text, opt.kind, (UserError,))


def add_grammar(p: argparse.ArgumentParser) -> None:
    """Constrained decoding (gpt2ft.grammar): at most one of --json-schema, --json, --regex, --choice, --grammar."""
    g = p.add_argument_group(f"{STRUCTURED_OUTPUT} (the output always matches)").add_mutually_exclusive_group()
    g.add_argument("--json-schema", metavar="FILE", help="a JSON Schema file the output must validate against")
    g.add_argument("--json", action="store_true", help="any JSON object")
    g.add_argument("--regex", metavar="RE", help="a regular expression the whole output must match")
    g.add_argument("--choice", nargs="+", metavar="TEXT", help="exactly one of these strings")
    g.add_argument("--grammar", metavar="FILE", help="a Lark or GBNF grammar file (llguidance's syntax)")


def grammar_spec(args):
    """The GrammarSpec of add_grammar's flags, or None; files are read bounded, with one-line errors."""
    from ..fileio import read_user_text
    from ..sampling import GrammarSpec

    # `is not None`: an empty --regex '' is an error of GrammarSpec's, not the flag left out
    if getattr(args, "json_schema", None) is not None:
        return GrammarSpec("json_schema", read_user_text(args.json_schema, "JSON schema", 2**20))
    if getattr(args, "json", False):
        return GrammarSpec("json")
    if getattr(args, "regex", None) is not None:
        return GrammarSpec("regex", args.regex)
    if getattr(args, "choice", None) is not None:
        return GrammarSpec.choice(args.choice)
    if getattr(args, "grammar", None) is not None:
        return GrammarSpec("gbnf", read_user_text(args.grammar, "grammar", 2**20))  # llguidance reads Lark too
    return None


def sampling_config(args, template_stop: list[str] | None = None):
    """The SamplingConfig of a verb's sampling flags (add_sampling), and the model template's stop strings."""
    from ..sampling import OPTIONS, SamplingConfig

    values = {name: getattr(args, name) for name, opt in OPTIONS.items() if opt.flag and hasattr(args, name)}
    if values.get("temperature") == 0:  # the API takes them quietly, as OpenAI's does; a flag is a mistake
        refuse_given(args, {name for name, opt in OPTIONS.items() if opt.sampled_only}, "with --temperature 0 "
                     "(greedy decoding takes the most likely token; sampling needs --temperature > 0)")
    values["stop"], values["template_stop"] = list(values.get("stop") or []), list(template_stop or [])
    values["logit_bias"] = {k: v for entry in values.get("logit_bias") or [] for k, v in entry.items()}
    values["grammar"] = grammar_spec(args)
    return SamplingConfig(**values)  # an OptionError names the options by their flags (cli.main)


def add_decoding(p: argparse.ArgumentParser) -> None:
    """How fast a model decodes, for the verbs that serve it (generate, chat, serve): --compile, --quantize,
    --draft and --draft-k, declared here once."""
    from ..argtypes import ranged

    g = p.add_argument_group(DECODING_SPEED)
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step (inductor's C++ kernels on a CPU, CUDA graphs on a GPU): "
                        "compiling takes a while once per process (the time is reported), then each step is "
                        "faster; greedy tokens are unchanged")
    g.add_argument("--quantize", choices=("int8",), default=None,
                   help="int8: weight-only int8 linears at load time (half bf16's memory; a LoRA adapter is "
                        "merged first)")
    g.add_argument("--draft", metavar="MODEL|ngram", default=None,
                   help="a smaller model with the same tokenizer drafts tokens that MODEL verifies in one forward "
                        "(greedy output unchanged, sampling keeps MODEL's distribution; rows with penalties, a "
                        "grammar or logprobs decode without drafts); ngram: drafts copied from earlier text "
                        "(prompt lookup, no second model)")
    only_with(g.add_argument("--draft-k", type=ranged(int, 1, 8), default=4,
                             help="tokens drafted per step at first (adapts)"), "draft")


def decoding_options(args, loaded) -> dict:
    """speculative.make_engine's keywords from add_decoding's flags: compile, and the draft: "ngram", or a model
    loaded like MODEL (its device and dtype, quantized alike), which must share MODEL's tokenizer."""
    from ..errors import UserError

    options = {"compile": bool(getattr(args, "compile", False))}
    if not getattr(args, "draft", None):
        return options
    if options["compile"]:
        raise UserError("--compile does not combine with --draft (the verifying forward takes several tokens a "
                        "row): use one of them")
    options.update(draft="ngram", draft_k=args.draft_k)
    if args.draft != "ngram":
        from ..checkpoint import load

        w = loaded.model.lm_head.weight
        draft = load(args.draft, device=w.device, dtype=w.dtype, verify=getattr(args, "verify", True))
        if draft.tokenizer.fingerprint() != loaded.tokenizer.fingerprint():
            raise UserError(f"--draft {args.draft} has another tokenizer than {args.model}: drafts must share it")
        if args.quantize:
            quantize_loaded(draft.model, args.quantize)
        options["draft"] = draft.model
    return options


def inference_device(args):
    """(device, dtype) of a verb that runs a model without training it: --device, and --dtype with auto
    resolved by runtime.inference_dtype; auto's pick is said in one line on stderr."""
    import sys

    from ..runtime import inference_dtype, resolve_device

    device = resolve_device(args.device)
    dtype, why = inference_dtype(args.dtype, device)
    if why:
        print(f"dtype: {str(dtype).removeprefix('torch.')} ({why}; --dtype float32 to compare bit for bit)",
              file=sys.stderr, flush=True)
    return device, dtype


def load_model(args):
    """The MODEL of a verb (a checkpoint.LoadedModel: unpacks as model, tokenizer) in its inference dtype,
    quantized as --quantize asks."""
    from ..checkpoint import load

    device, dtype = inference_device(args)
    loaded = load(args.model, device=device, dtype=dtype, lora=getattr(args, "lora", None),
                  verify=getattr(args, "verify", True))
    if getattr(args, "quantize", None):
        quantize_loaded(loaded.model, args.quantize)
    return loaded


def quantize_loaded(model, method: str) -> None:
    """--quantize on a loaded model: a LoRA adapter is merged into the weights first."""
    from ..lora import merge_lora
    from ..quantize import quantize_model

    if model.lora_config is not None:
        merge_lora(model)
    quantize_model(model, method)


def add_dataclass_args(p: argparse.ArgumentParser, cls, title: str, skip: tuple[str, ...] = (),
                       helps: dict[str, str] | None = None) -> None:
    """Flags from a config dataclass: --field-name, typed, help from the field's metadata (or `helps`)."""
    g = p.add_argument_group(title)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or f.metadata.get("cli") is False:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kind = hints[f.name]
        help_text = (helps or {}).get(f.name) or f.metadata.get("help", "")
        if kind is bool:
            g.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
            continue
        if f.metadata.get("required"):  # checked once --config is applied (cli._apply_config)
            action = required(g.add_argument(flag, type=str, default=None, help=help_text))
            if f.metadata.get("path"):
                path_option(action)
            continue
        base = next((t for t in typing.get_args(kind) if t is not type(None)), kind)
        if typing.get_origin(base) is list:
            g.add_argument(flag, nargs="+", type=typing.get_args(base)[0], default=default, help=help_text)
        else:
            check = f.metadata.get("check")
            g.add_argument(flag, type=base if check is None else _in_range(base, check, f.metadata.get("help", "")),
                           default=default, help=help_text)


def _in_range(base, check, help_text: str):
    """A flag's type that also applies the field's range check, so a value out of range is refused where it
    is parsed, naming its flag or its --config file (cli._yaml_value)."""
    def parse(text: str):
        value = base(text)
        if not check(value):
            raise argparse.ArgumentTypeError(f"{value!r} is out of range: {help_text}")
        return value

    parse.kind = base  # what cli._yaml_value checks a YAML value's type against
    parse.__name__ = base.__name__  # argparse names the type in its "invalid int value" errors
    return parse


def recipe_config(cls, args, **overrides):
    """A recipe's typed config (gpt2ft.recipes) from a verb's parsed flags: each field from the flag of its
    name; nested configs (TrainConfig, the starting model, the preference loss) filled the same way;
    `overrides` (values the verb parsed further, e.g. --columns) win."""
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        if f.name in overrides:
            values[f.name] = overrides[f.name]
        elif dataclasses.is_dataclass(hints[f.name]):
            values[f.name] = recipe_config(hints[f.name], args)
        elif hasattr(args, f.name):
            values[f.name] = getattr(args, f.name)
    return cls(**values)


def train_plan(plan, args) -> int:
    """Train a recipe's plan, recording the command as given (the verb and every option the flags or
    --config set; paths absolute; a local MODEL, --lora or --reference folder as the checkpoint it resolves
    to) in the run's config.yaml, which `gpt2ft VERB --config` then reads back."""
    from ..train.config import RUN_CONTROL  # a rerun through --config neither resumes nor deletes

    actions = {a.dest: a for a in args._parser._actions}
    options = {dest: _recorded(actions[dest], getattr(args, dest)) for dest in sorted(args._given)
               if dest not in (*RUN_CONTROL, "config")}
    plan.command = {"verb": args.verb, "options": options, "rerun_of": getattr(args, "_rerun_of", None)}
    plan.train()
    return 0


def _recorded(action: argparse.Action, value):
    """An option's value as config.yaml records it: lists as lists, paths (path_option) absolute."""
    if isinstance(value, (list, tuple)):
        return [_recorded(action, v) for v in value]
    keywords = getattr(action, "path_keywords", None)
    if keywords is None or not isinstance(value, str) or value in keywords or not os.path.exists(
            os.path.expanduser(value)):
        return value
    if action.names_model and os.path.isdir(os.path.expanduser(value)):
        from ..checkpoint import resolve

        return os.path.realpath(resolve(value, verify=False))
    return os.path.abspath(os.path.expanduser(value))


def add_training(p: argparse.ArgumentParser, verb: str, **defaults) -> None:
    """Every TrainConfig flag (--out, --max-steps, --batch-size, ... --resume); --epochs, --lr, --warmup-steps
    and --eval-every left unset are derived at the start of the run (gpt2ft.train.defaults, whose table
    for `verb` their help quotes); `defaults` are the verb's own fixed values (batch size, dropout)."""
    from ..train.config import TrainConfig  # not ..train: that imports torch, and --help must not
    from ..train.defaults import help_texts

    add_dataclass_args(p, TrainConfig, "training", skip=("device", "dtype"), helps=help_texts(verb))
    p.set_defaults(**defaults)
    p.add_argument("--sample-prompt", action="append", default=None, metavar="TEXT",
                   help="prompt to sample from at each evaluation (repeatable)")


def add_lora(p: argparse.ArgumentParser) -> None:
    """Training verbs: --lora trains a new adapter (--lora DIR continues that one) instead of all weights."""
    g = p.add_argument_group("LoRA")
    path_option(g.add_argument("--lora", nargs="?", const=True, default=None, metavar="ADAPTER_DIR",
                               help="train a LoRA adapter only (optionally continuing the one in ADAPTER_DIR)"),
                model=True)
    for action in (
            g.add_argument("--lora-r", type=int, default=8, help="adapter rank"),
            g.add_argument("--lora-alpha", type=float, default=16.0, help="scaling numerator (scale = alpha / r)"),
            g.add_argument("--lora-dropout", type=float, default=0.05, help="dropout on the adapter input"),
            g.add_argument("--lora-targets", default="c_attn,c_proj",
                           help="comma-separated module names (PEFT rule: name or suffix), e.g. c_attn,c_proj,mlp.c_fc")):
        only_with(action, "lora", True)  # a new adapter's settings: a continued one keeps its own


# ----- instruction data flags (sft, eval, data) ------------------------------------------------------
def add_instruction_data_args(p, skip: str) -> None:
    """--data, --format, --split, --columns, --template, --on-invalid; `skip` says what the verb does with
    the valid records under --on-invalid skip ("train on the rest", "score the rest")."""
    path_option(required(p.add_argument("--data", help="instruction data file (.json, .jsonl, .csv) or hf:DATASET_ID")))
    from ..data.formats import FORMATS

    p.add_argument("--format", default="auto", help="|".join(FORMATS))
    add_columns_args(p)
    add_template(p, "data")
    add_on_invalid(p, "records", skip)


def add_template(p, multi_turn: str) -> None:
    """--template NAME|FILE (sft, dpo, eval, data); unset: templates.pick_template's choice."""
    from ..templates import TEMPLATES

    path_option(p.add_argument("--template", default=None,
                               help=f"{'|'.join(TEMPLATES)}|FILE (default: the model's saved template, else chat for "
                                    f"multi-turn {multi_turn} and alpaca otherwise)"), TEMPLATES)


def add_on_invalid(p, rows: str, skip: str) -> None:
    p.add_argument("--on-invalid", choices=("error", "skip"), default="error",
                   help=f"error: stop before loading the model and list the bad {rows}; skip: {skip} (the rejected "
                        "ones and their reasons are reported)")


def add_text_field(p) -> None:
    """--text-field: the field of a .jsonl record that holds its text (prepare, finetune on text)."""
    p.add_argument("--text-field", default="text", help="field holding the text in .jsonl files")


def add_columns_args(p) -> None:
    p.add_argument("--split", default="train", help="split of an hf: dataset (default: train)")
    p.add_argument("--columns", default=None, metavar="MAP",
                   help="rename fields (CSV headers, dataset columns, JSON keys), "
                        "e.g. instruction=question,output=answer")


def parse_columns(text: str | None) -> dict[str, str]:
    """'instruction=question,output=answer' -> {'question': 'instruction', 'answer': 'output'}."""
    from ..errors import UserError

    mapping = {}
    for pair in filter(None, (text or "").split(",")):
        if "=" not in pair:
            raise UserError(f"--columns expects FIELD=HEADER pairs, got {pair!r}")
        ours, theirs = (s.strip() for s in pair.split("=", 1))
        if ours in mapping.values() or theirs in mapping:
            twice = f"{ours!r} is mapped twice" if ours in mapping.values() else f"{theirs!r} is mapped twice"
            raise UserError(f"--columns {text}: {twice}: map each field from one column")
        mapping[theirs] = ours
    return mapping
