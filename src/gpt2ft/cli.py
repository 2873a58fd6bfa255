"""The `gpt2ft` command: one table, verb -> (arguments, function). Verbs live in gpt2ft.commands."""
from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys

from .argtypes import Once
from .errors import OptionError, UserError

# verb: (module in gpt2ft.commands, one-line help). Each module has add_args(parser) and run(args).
VERBS = {
    "generate": ("generate", "continue a prompt (streams with --stream)"),
    "chat": ("chat", "chat over many turns with a model (the best one under ./runs by default)"),
    "info": ("info", "show a model's config, parameter count, dtype and tokenizer"),
    "export": ("export", "write a plain Hugging Face folder (optionally merging LoRA)"),
    "tokenizer": ("tokenizer", "train a word-level or BPE tokenizer for from-scratch models"),
    "prepare": ("prepare", "tokenize text files into train.bin/val.bin memmaps"),
    "pretrain": ("pretrain", "train a GPT-2 from scratch on prepared text"),
    "finetune": ("finetune", "continue training a model on raw text (style/domain adaptation)"),
    "sft": ("sft", "instruction-tune a model with loss on response tokens only"),
    "dpo": ("dpo", "preference-tune a model on chosen/rejected pairs (DPO, IPO, SimPO, ORPO)"),
    "eval": ("evaluate", "score a model: exact match, BLEU, ROUGE, keywords, perplexity"),
    "serve": ("serve", "serve a model over the OpenAI API, with a browser playground at /"),
    "compare": ("compare", "generate from two models side by side with the same settings"),
    "plot": ("plot", "plot a run's losses and metrics to PNG/PDF"),
    "data": ("data", "convert instruction data between formats"),
    "demo": ("demo", "the end-to-end quickstart: pretrain, SFT, eval, plots, samples"),
}


class UsageError(UserError):
    """A flag argparse refused (unknown, missing, wrong type or out of range), for `prog`."""

    def __init__(self, prog: str, message: str):
        super().__init__(f"{message} (see {prog} --help)")
        self.prog = prog


class Parser(argparse.ArgumentParser):
    """Flag errors are one line (`gpt2ft VERB: error: ...`), not usage plus error, like every other mistake."""

    def error(self, message):
        raise UsageError(self.prog, message)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keep the examples in each verb's docstring as written; show each option's default once, where it
    says something (not None, not a switch's off), and mark the options a verb requires (they may come
    from --config, so argparse itself does not require them)."""

    def _get_help_string(self, action):
        text = (action.help or "").replace(" (default: %(default)s)", "")  # Python 3.11's BooleanOptionalAction
        if getattr(action, "metadata_required", False):
            return text + " (required)"
        shown = _default_text(action)
        return text if shown is None else f"{text} (default: {shown.replace('%', '%%')})"

    def _format_args(self, action, default_metavar):
        if getattr(action, "metadata_required", False) and action.nargs == "?" and not action.option_strings:
            return self._metavar_formatter(action, default_metavar)(1)[0]  # MODEL, not [MODEL]
        return super()._format_args(action, default_metavar)

    def _format_usage(self, usage, actions, groups, prefix):
        marked = [a for a in actions if getattr(a, "metadata_required", False) and not a.required]
        for a in marked:  # shown without [brackets]
            a.required = True
        try:
            return super()._format_usage(usage, actions, groups, prefix)
        finally:
            for a in marked:
                a.required = False


def _default_text(action) -> str | None:
    """An option's default as --help shows it, or None where the help text says it already, the option
    is off or unset by default, or it is a plain switch."""
    default, text = action.default, action.help or ""
    if default is None or default is argparse.SUPPRESS or not action.option_strings or "default" in text:
        return None
    if action.nargs == 0:  # --x/--no-x shows the one in force; a plain switch is off unless given
        names = action.option_strings
        return (names[0] if default else names[-1]) if isinstance(action, argparse.BooleanOptionalAction) else None
    return " ".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)


def _load_yaml(path: str, verb: str) -> tuple[dict, dict | None]:
    """--config's options: a flat mapping of option: value, or a run's config.yaml (its `options:`, the
    command as given, which must be this verb's); and for a run's, what the rerun is checked against
    ({"config": path, "data": the fingerprint of the data it trained on}), else None."""
    import yaml

    if os.path.isdir(path):
        hint = f": a run's options are in {os.path.join(path, 'config.yaml')}" if os.path.isfile(
            os.path.join(path, "config.yaml")) else ""
        raise UserError(f"--config {path} is a folder, not a YAML file{hint}")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.load(f, Loader=_unique_key_loader()) or {}
    except OSError as e:
        raise UserError(f"--config {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        raise UserError(f"--config {path}: {where}not valid YAML ({getattr(e, 'problem', None) or str(e).splitlines()[0]})") \
            from None
    except UnicodeDecodeError:
        raise UserError(f"--config {path}: not UTF-8 text (is it a YAML file?)") from None
    if not isinstance(data, dict):
        raise UserError(f"--config {path}: expected a mapping of option: value")
    if "options" in data or ("train" in data and "run" in data):  # a run's config.yaml (train.loop._config_yaml)
        if not isinstance(data.get("options"), dict) or "command" not in data:
            raise UserError(f"--config {path}: a run's config.yaml without the command and options it was given "
                            "(written by an older gpt2ft or through the Python API): copy the ones you want into a "
                            "flat YAML of option: value")
        if extra := sorted(set(data) - RUN_CONFIG_KEYS, key=str):
            raise UserError(f"--config {path}: unknown section(s) {extra} in a run's config.yaml (it has "
                            f"{', '.join(sorted(RUN_CONFIG_KEYS))}; only options: is read)")
        if not isinstance(data["command"], str):
            raise UserError(f"--config {path}: command: must name the verb the options are for, e.g. command: {verb}")
        if data["command"] != verb:
            raise UserError(f"--config {path}: the options of a `gpt2ft {data['command']}` run, not `gpt2ft "
                            f"{verb}`: run `gpt2ft {data['command']} --config {path}`")
        run = data.get("run") if isinstance(data.get("run"), dict) else {}
        rerun_of = {"config": path, "data": run.get("data_fingerprint")} if run.get("data_fingerprint") else None
        data = _where_the_run_is(data["options"], path)
    else:
        rerun_of = None
    if bad := [k for k in data if not isinstance(k, str)]:
        raise UserError(f"--config {path}: option names must be text, not {bad[0]!r}")
    values = {k.replace("-", "_"): v for k, v in data.items()}
    if len(values) < len(data):
        twice = next(k for k in values if sum(n.replace("-", "_") == k for n in data) > 1)
        raise UserError(f"--config {path}: option {twice} is given twice (as {twice} and {twice.replace('_', '-')})")
    return values, rerun_of


def _where_the_run_is(options: dict, path: str) -> dict:
    """A run's options with `out` the folder its config.yaml is in, when the run has moved since (so that
    --resume auto continues it there, not afresh at the old place); a rerun's --out flag overrides it."""
    here, out = os.path.dirname(os.path.abspath(path)), options.get("out")
    if isinstance(out, str) and os.path.isdir(os.path.join(here, "checkpoints")) and \
            os.path.realpath(out) != os.path.realpath(here):
        print(f"note: --config {path}: the run was at {out} and is at {here} now: --out {here}", file=sys.stderr)
        return {**options, "out": here}
    return options


RUN_CONFIG_KEYS = {"command", "options", "resumes", "train", "run"}  # the sections train.loop._config_yaml writes


def _unique_key_loader():
    import yaml

    class Loader(yaml.SafeLoader):
        """YAML whose mappings refuse a key given twice (PyYAML keeps the last one silently)."""

        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if key in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice",
                                                            key_node.start_mark)
                seen.add(key)
            return super().construct_mapping(node, deep)

    return Loader


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="gpt2ft", description="GPT-2 post-training toolkit.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for verb, (module, help_text) in VERBS.items():
        mod = importlib.import_module(f"gpt2ft.commands.{module}")
        p = sub.add_parser(verb, help=help_text, description=(mod.__doc__ or help_text).strip(),
                           formatter_class=HelpFormatter)
        mod.add_args(p)
        p.add_argument("--config", metavar="FILE.yaml", default=None, action=Once,
                       help="read options from YAML (a flat option: value mapping, or a run's config.yaml); flags "
                            "override it")
        p.set_defaults(_run=mod.run, _parser=p, _main=main)  # _main: for a verb that runs others (demo)
    return parser


def _version() -> str:
    from . import __version__

    return __version__


def _yaml_value(parser: argparse.ArgumentParser, dest: str, value, config: str):
    """A YAML value checked as its flag would be: the type (a YAML 42 is not a prompt, `true` not a
    rate), the flag's range converter and its choices. Training keys are typed by TrainConfig too."""
    action = next(a for a in parser._actions if a.dest == dest)
    flag = "/".join(action.option_strings) or dest
    where = f"--config {config}: {dest}"
    if action.nargs == 0:  # store_true, store_false, --x/--no-x
        if not isinstance(value, bool):
            raise UserError(f"{where} must be true or false, not {value!r} ({flag})")
        return value
    if action.nargs == "?" and isinstance(value, bool) and action.const is not None:  # `lora: true`: a bare --lora
        return action.const if value else None  # `lora: false`: not given
    many = action.nargs in ("+", "*") or isinstance(action, argparse._AppendAction)
    if value is None:  # null: the option unset, where unset means something (its default is None)
        if action.default is not None and not many:
            raise UserError(f"{where} cannot be null: give a value, or leave it out for its default "
                            f"{action.default!r} ({flag})")
        return None
    if many and not isinstance(value, list):
        value = [value]
    items = value if many else [value]
    kind = getattr(action.type, "kind", action.type) or str
    checked = []
    for item in items:
        ok = (isinstance(item, str) or (kind in (int, float) and isinstance(item, int) and not isinstance(item, bool))
              or (kind is float and isinstance(item, float)))
        if not ok:
            wanted = {int: "an integer", float: "a number"}.get(kind, "text (quote it in YAML)")
            raise UserError(f"{where} must be {wanted}, not {item!r} ({flag})")
        if action.type is not None:
            try:
                item = action.type(item if isinstance(item, str) else str(item))
            except (argparse.ArgumentTypeError, ValueError, TypeError) as e:
                raise UserError(f"{where} {item!r}: {e} ({flag})") from None
        if action.choices is not None and item not in action.choices:
            raise UserError(f"{where} {item!r} is not one of {', '.join(map(str, action.choices))} ({flag})")
        checked.append(item)
    return checked if many else checked[0]


def parse(argv: list[str]) -> argparse.Namespace:
    """Parse argv; values from --config FILE.yaml fill in whatever the flags leave at their defaults."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verb is None:
        parser.print_help()
        raise SystemExit(0)
    try:
        return _apply_config(parser, args, argv)
    except UserError as e:
        e.prog = getattr(e, "prog", args._parser.prog)  # the message names the verb
        raise


def _apply_config(parser, args, argv):
    config = getattr(args, "config", None)
    if config:
        values, rerun_of = _load_yaml(config, args.verb)
        options = {a.dest for a in args._parser._actions} - {"help", "config"}
        unknown = sorted(set(values) - options)
        if unknown:
            raise UserError(f"--config {config}: unknown option(s) {unknown} for `gpt2ft {args.verb}`")
        args._parser.set_defaults(**{k: _yaml_value(args._parser, k, v, config) for k, v in values.items()})
        args = parser.parse_args(argv)
        args._rerun_of = rerun_of
    for action in args._parser._actions:  # required options may come from the YAML, so check here
        if getattr(action, "metadata_required", False) and getattr(args, action.dest) is None:
            name = "/".join(action.option_strings) or action.metavar
            raise UserError(f"{name} is required (on the command line or in --config)")
    args._given = _given(args._parser, argv[argv.index(args.verb) + 1:]) | set(values if config else ())
    _check_only_with(args, args._given)
    return args


def _given(sub: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The options argv sets itself (a value equal to the default included): argparse fills in a default
    only where the namespace lacks the attribute, so every one starts as a marker."""
    marker = object()
    growing = (argparse._AppendAction, argparse._CountAction)  # they add to what is there: start them empty
    start = {a.dest: None if isinstance(a, growing) else marker for a in sub._actions if a.dest != "help"}
    ns = argparse.Namespace(**start)
    sub.parse_args(argv, namespace=ns)
    return {dest for dest, first in start.items() if getattr(ns, dest) is not first}


def _check_only_with(args, given: set[str]) -> None:
    """An option marked only_with (gpt2ft.commands) given without what it needs is an error, not ignored."""
    for action in args._parser._actions:
        if action.dest not in given or not hasattr(action, "only_with"):
            continue
        for dest, value in action.only_with:
            have = getattr(args, dest)
            if (value is None and have in (None, False)) or (value is not None and have != value):
                other = next(a for a in args._parser._actions if a.dest == dest)
                if not other.option_strings:  # a positional: the action word of a verb (`data pairs`)
                    raise UserError(f"{action.option_strings[0]} takes effect only in `gpt2ft {args.verb} {value}`: "
                                    f"drop {action.option_strings[0]}")
                if value is True and have not in (None, False):  # e.g. --lora-r beside --lora ADAPTER_DIR
                    flag, other_flag = action.option_strings[0], other.option_strings[0]
                    raise UserError(f"{flag} takes effect only with a bare {other_flag} (a new one); {other_flag} "
                                    f"{have} keeps its own settings: drop {flag}")
                need = other.option_strings[0] + ("" if value is None else f" {value}")
                raise UserError(f"{action.option_strings[0]} takes effect only with {need}: add {need} or drop "
                                f"{action.option_strings[0]}")


def flag_namer(parser: argparse.ArgumentParser):
    """Option name (a keyword of the Python API, the flag's dest) -> the verb's flag for it (the name where the
    verb has none)."""
    flags = {a.dest: a.option_strings[0] for a in parser._actions if a.option_strings}
    return lambda name: flags.get(name, name)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    verb, args = "gpt2ft", None
    try:
        args = parse(argv)
        verb = f"gpt2ft {args.verb}"
        result = args._run(args)
        return int(result or 0)
    except UserError as e:
        message = e.say(flag_namer(args._parser)) if isinstance(e, OptionError) and args else str(e)
        print(f"{getattr(e, 'prog', verb)}: error: {message}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"{verb}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except OSError as e:
        if e.filename is None:
            raise
        print(f"{verb}: error: {e.filename}: {e.strerror}", file=sys.stderr)  # a path the user gave (too long,
        return 1  # missing, a loop of links, not allowed)
    except RuntimeError as e:  # pathlib's resolve() on a loop of symbolic links (an OSError from Python 3.13)
        if not str(e).startswith("Symlink loop"):
            raise
        print(f"{verb}: error: {str(e).replace('Symlink loop from', 'a loop of symbolic links at')}", file=sys.stderr)
        return 1
    finally:  # a Ctrl-C while the interpreter shuts down ends it quietly (exit status: killed by SIGINT)
        signal.signal(signal.SIGINT, signal.SIG_DFL)


if __name__ == "__main__":
    raise SystemExit(main())
