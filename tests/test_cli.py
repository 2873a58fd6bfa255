import re
import subprocess
import sys

import pytest

from conftest import assert_clean_error, run_cli
from gpt2ft.cli import VERBS, build_parser


HEAVY = ("torch", "numpy", "transformers", "tokenizers", "safetensors", "matplotlib", "yaml", "fastapi", "uvicorn",
         "huggingface_hub", "jinja2", "gguf", "llguidance")


def test_help_of_every_verb_imports_no_heavy_library():
    """`gpt2ft --help` and `gpt2ft VERB --help` on a fresh interpreter: the parser builds from declarations
    only (torch alone takes ~1-2 s to import), so help is instant. Checked by what got imported, not by time."""
    script = ("import sys\nfrom gpt2ft.cli import VERBS, main\n"
              "for argv in [[]] + [[v] for v in VERBS]:\n"
              "    try:\n        main(argv + ['--help'])\n    except SystemExit:\n        pass\n"
              f"print('HEAVY', sorted(m for m in {HEAVY!r} if m in sys.modules), file=sys.stderr)\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY []" in proc.stderr, proc.stderr.splitlines()[-1]
    assert all(verb in proc.stdout for verb in VERBS)
    # the installed command's path: python -m gpt2ft --help, imports traced by the interpreter itself
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "gpt2ft", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "usage: gpt2ft" in proc.stdout
    imported = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in proc.stderr.splitlines() if "|" in line}
    assert "gpt2ft" in imported and not imported & set(HEAVY), sorted(imported & set(HEAVY))


@pytest.mark.parametrize("verb", list(VERBS))
def test_every_verb_has_help(verb, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([verb, "--help"])
    assert e.value.code == 0
    assert "usage: gpt2ft " + verb in capsys.readouterr().out


def _verb_parsers():
    verbs = next(a for a in build_parser()._actions if a.dest == "verb")
    return verbs.choices


@pytest.mark.parametrize("verb", list(VERBS))
def test_help_shows_each_default_once_and_marks_required_options(verb):
    import re

    parser = _verb_parsers()[verb]
    text = " ".join(parser.format_help().split())
    assert not re.search(r"\(default: (None|True|False)\)", text)  # a switch's off, or an unset option
    assert not re.search(r"\(default: [^)]*\) \(default", text)
    assert "%" not in text.replace("%%", "")  # every % was escaped, none was lost
    usage = " ".join(parser.format_usage().split())
    for action in parser._actions:
        help_text = " ".join(parser._get_formatter()._expand_help(action).split()) if action.help else ""
        if getattr(action, "metadata_required", False):  # required: no [brackets] in usage, "(required)" in help
            name = action.option_strings[0] if action.option_strings else action.metavar  # MODEL
            assert help_text.endswith("(required)") and f"[{name} " not in usage and f"[{name}]" not in usage and name in usage
        elif isinstance(action.default, (int, float, str)) and action.default not in (True, False, "==SUPPRESS==") and \
                action.option_strings and "default" not in (action.help or ""):
            assert help_text.endswith(f"(default: {action.default})"), (action.dest, help_text)


def test_on_invalid_says_what_each_verb_does_with_the_rest():
    parsers = _verb_parsers()
    said = {verb: next(a for a in parsers[verb]._actions if a.dest == "on_invalid").help
            for verb in ("sft", "dpo", "eval", "data")}
    assert "skip: train on the rest" in said["sft"] and "skip: train on the rest" in said["dpo"]
    assert "skip: score the rest" in said["eval"] and "skip: convert the rest" in said["data"]


def test_docs_link_only_inside_the_repository():
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    for doc in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        text = doc.read_text()
        for target in re.findall(r"\]\(([^)#]+)\)", text) + re.findall(r"`(\.\./[^`]+)`", text):
            if "://" in target:
                continue
            path = (doc.parent / target).resolve()
            assert path.is_relative_to(root) and path.exists(), f"{doc.name}: {target}"


def test_generate_and_info_from_a_folder(hf_dir):
    out = run_cli("generate", hf_dir, "--prompt", "Hello", "--max-new-tokens", "5", "--temperature", "0",
                  "--device", "cpu", check=True).stdout
    assert len(out.strip()) > 0
    streamed = run_cli("generate", hf_dir, "--prompt", "Hello", "--max-new-tokens", "5", "--temperature", "0",
                       "--stream", check=True).stdout
    assert streamed == out
    drafted = run_cli("generate", hf_dir, "--prompt", "Hello", "--max-new-tokens", "5", "--temperature", "0",
                      "--stream", "--draft", "ngram", check=True)  # speculative: the same tokens, and a word on it
    assert drafted.stdout == out and "drafted tokens accepted" in drafted.stderr
    info = run_cli("info", hf_dir, check=True).stdout
    assert "parameters" in info and "n_layer=2" in info
    top = run_cli("generate", hf_dir, "--prompt", "Hello", "--top-next", "3", check=True).stdout
    assert len(top.strip().splitlines()) == 3
    for flag in (["--temperature", "0.5"], ["--json"], ["--draft", "ngram"], ["--stop", "x"]):  # nothing is sampled
        refused = run_cli("generate", hf_dir, "--prompt", "Hello", "--top-next", "3", *flag)
        assert_clean_error(refused, f"{flag[0]} has no effect with --top-next")


def test_yaml_config_fills_flags_and_flags_override(hf_dir, tmp_path):
    cfg = tmp_path / "gen.yaml"
    cfg.write_text("max-new-tokens: 3\ntemperature: 0\nprompt: Hello\n")
    a = run_cli("generate", hf_dir, "--config", cfg, check=True).stdout
    b = run_cli("generate", hf_dir, "--prompt", "Hello", "--max-new-tokens", "3", "--temperature", "0", check=True).stdout
    assert a == b
    bad = tmp_path / "bad.yaml"
    bad.write_text("max-new-tokenz: 3\n")
    assert_clean_error(run_cli("generate", hf_dir, "--prompt", "x", "--config", bad), "max_new_tokenz")


def test_config_files_are_read_strictly(hf_dir, tmp_path):
    """A key given twice, bad YAML (with its line), --config twice, a folder, a run config cut to its command
    and options (read) or with a section of its own (refused); `lora: false` is no LoRA."""
    from gpt2ft.cli import parse
    from gpt2ft.errors import UserError

    def config(text: str):
        (tmp_path / "c.yaml").write_text(text)
        return ["finetune", str(hf_dir), "--data", "t.txt", "--out", str(tmp_path / "r"), "--config",
                str(tmp_path / "c.yaml")]

    for text, said in (("max-steps: 1\nmax-steps: 3\n", "line 2: not valid YAML (key 'max-steps' is given twice)"),
                       ("max-steps: 1\nmax_steps: 3\n", "option max_steps is given twice"),
                       ("a: [1, 2\n", "line 2: not valid YAML"),
                       ("command: finetune\noptions: {}\nmine: 1\n", "unknown section(s) ['mine']"),
                       ("train: {}\nrun: {}\n", "without the command and options it was given"),
                       ("val-fraction: null\n", "val_fraction cannot be null"),
                       ("command: null\noptions: {}\n", "command: must name the verb")):
        with pytest.raises(UserError, match=re.escape(said)):
            parse(config(text))
    assert parse(config("command: finetune\noptions: {max_steps: 4, lora: false}\n")).max_steps == 4
    assert parse(config("lora: false\n")).lora is None and parse(config("lora: true\n")).lora is True
    with pytest.raises(UserError, match="is a folder, not a YAML file"):
        parse(["finetune", "--config", str(tmp_path)])
    assert_clean_error(run_cli(*config("max-steps: 1\n"), "--config", tmp_path / "c.yaml"), "--config", "given twice")


def test_user_mistakes_are_one_line_errors(hf_dir, tmp_path):
    assert_clean_error(run_cli("info", tmp_path / "missing"), "no such model folder")
    assert_clean_error(run_cli("generate", hf_dir, "--prompt", "Hi", "--top-p", "0"), "--top-p", "(0, 1]")
    assert_clean_error(run_cli("generate", hf_dir, "--prompt", "Hi", "--max-new-tokens", "500"),
                       "context of 64")
    assert_clean_error(run_cli("generate", hf_dir, "--prompt", "Hi", "--device", "cuda"), "--device cuda")
    assert_clean_error(run_cli("generate", hf_dir, "--prompt", "A", "--prompt", "B"), "--prompt", "given twice")
    import shutil

    half = shutil.copytree(hf_dir, tmp_path / "half")  # a BPE tokenizer missing one of its two files
    (half / "vocab.json").unlink()
    (half / "tokenizer.json").unlink(missing_ok=True)
    assert_clean_error(run_cli("info", half), "has merges.txt but no vocab.json")
    from gpt2ft.checkpoint import load
    from gpt2ft.errors import UserError

    for keywords, said in (({"device": "cuda"}, "device cuda: no CUDA"), ({"dtype": "fp8"}, "dtype must be")):
        with pytest.raises(UserError, match=f"^{said}"):  # the Python API names its keywords, not the flags
            load(hf_dir, **keywords)
    assert_clean_error(run_cli("eval", hf_dir, "--data", tmp_path / "missing.txt"), "missing.txt",
                       "No such file")


def test_an_option_that_needs_another_is_refused_without_it_never_ignored(hf_dir, tmp_path):
    """--lora-r without --lora, --outtype without --format gguf, --merge-lora on a model with no adapter:
    from the command line (even at the default value) or from --config, a one-line error, nothing written."""
    from gpt2ft.cli import parse

    data = tmp_path / "t.txt"
    data.write_text("some text " * 50)
    out = tmp_path / "run"
    for flags in (["--lora-r", "8"], ["--lora-targets", "c_attn"]):
        assert_clean_error(run_cli("finetune", hf_dir, "--data", data, "--out", out, *flags),
                           f"{flags[0]} takes effect only with --lora", f"drop {flags[0]}")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lora-alpha: 32\n")
    assert_clean_error(run_cli("finetune", hf_dir, "--data", data, "--out", out, "--config", cfg),
                       "--lora-alpha takes effect only with --lora")
    assert not out.exists()
    assert parse(["finetune", str(hf_dir), "--data", str(data), "--out", str(out), "--lora", "--lora-r", "4"]).lora_r == 4
    assert_clean_error(run_cli("export", hf_dir, "--out", tmp_path / "e", "--outtype", "q8_0"),
                       "--outtype takes effect only with --format gguf")
    assert_clean_error(run_cli("export", hf_dir, "--out", tmp_path / "e.gguf", "--format", "gguf", "--dtype",
                               "bfloat16"), "--dtype takes effect only with --format hf")
    assert_clean_error(run_cli("export", hf_dir, "--out", tmp_path / "e", "--merge-lora"),
                       "has no LoRA adapter to merge", "drop --merge-lora")
    assert not (tmp_path / "e").exists() and not (tmp_path / "e.gguf").exists()


@pytest.mark.parametrize("path", sorted(__import__("pathlib").Path(__file__).parent.parent.glob("configs/*.yaml")))
def test_example_configs_parse_for_their_command(path, monkeypatch):
    """Each example YAML starts with the command that uses it; that command must accept every key."""
    import shlex

    from gpt2ft.cli import parse

    monkeypatch.chdir(path.parent.parent)  # the commands are written from the repository root
    command = shlex.split(path.read_text().splitlines()[0].lstrip("# "))
    assert command[0] == "gpt2ft"
    args = parse(command[1:])
    assert args.out and args.config == f"configs/{path.name}"


def test_compare_uses_the_same_settings_and_seed_for_both(hf_dir, tmp_path):
    run_cli("compare", hf_dir, hf_dir, "--prompt", "Once upon", "--prompt", "The king", "--temperature", "1.0",
            "--top-k", "40", "--seed", "7", "--max-new-tokens", "6", "--out-md", tmp_path / "c.md",
            "--out-json", tmp_path / "c.json", check=True)
    rows = __import__("json").loads((tmp_path / "c.json").read_text())["rows"]
    assert [r["prompt"] for r in rows] == ["Once upon", "The king"]
    assert all(r["a"] == r["b"] and r["a"] for r in rows)  # same model, same seed: same text
    assert (tmp_path / "c.md").read_text().startswith("| prompt | A: ")


# ----- an explicit empty prompt is unconditional generation (from <|endoftext|>, as transformers does) -----
def _unconditional(hf_model, n: int) -> list[int]:
    """The oracle: transformers' greedy generate() without input ids (it starts from bos = <|endoftext|>)."""
    ids = hf_model.generate(do_sample=False, max_new_tokens=n, min_new_tokens=n, bos_token_id=50256,
                            pad_token_id=50256)[0, 1:].tolist()
    assert 50256 not in ids  # so that stopping at EOS cannot make ours differ
    return ids


def test_empty_prompt_on_generate_and_compare_is_unconditional(hf_dir, hf_model, tmp_path):
    from gpt2ft.tokenizer import gpt2_tokenizer

    tok = gpt2_tokenizer()
    ids = _unconditional(hf_model, 6)
    expected = tok.decode(ids)
    greedy = ["--max-new-tokens", "6", "--temperature", "0", "--device", "cpu"]
    assert run_cli("generate", hf_dir, "--prompt", "", *greedy, check=True).stdout == expected + "\n"
    assert run_cli("generate", hf_dir, "--prompt", "", "--raw", *greedy, check=True).stdout == expected + "\n"
    run_cli("compare", hf_dir, hf_dir, "--prompt", "", "--prompt", "Hello", *greedy, "--out-json",
            tmp_path / "c.json", check=True)
    rows = __import__("json").loads((tmp_path / "c.json").read_text())["rows"]
    assert rows[0] == {"prompt": "", "a": expected, "b": expected} and rows[1]["a"] != expected
    top = run_cli("generate", hf_dir, "--prompt", "", "--top-next", "1", check=True).stdout
    assert top.split(None, 1)[1].strip() == repr(tok.decode(ids[:1]))  # the most likely token after EOS


def test_empty_instruction_in_eval_records(hf_dir, hf_model, tmp_path):
    """With a bare "{instruction}" template an empty instruction is unconditional; with alpaca it is the
    template's frame around nothing."""
    import json

    from gpt2ft.templates import TEMPLATES
    from gpt2ft.tokenizer import gpt2_tokenizer

    (tmp_path / "d.jsonl").write_text(json.dumps({"instruction": "", "output": "a reply"}) + "\n")
    (tmp_path / "bare.json").write_text(json.dumps({"prompt": "{instruction}"}))
    for template, out in ((tmp_path / "bare.json", "bare"), ("alpaca", "alpaca")):
        run_cli("eval", hf_dir, "--data", tmp_path / "d.jsonl", "--template", template, "--max-new-tokens", "6",
                "--out", tmp_path / out, check=True)
    bare = json.loads((tmp_path / "bare" / "responses.jsonl").read_text())
    assert bare["prompt"] == "" and bare["output"] == gpt2_tokenizer().decode(_unconditional(hf_model, 6))
    framed = json.loads((tmp_path / "alpaca" / "responses.jsonl").read_text())
    assert framed["prompt"] == TEMPLATES["alpaca"].prompt([{"role": "user", "content": ""}])
    sft = run_cli("sft", hf_dir, "--data", tmp_path / "d.jsonl", "--out", tmp_path / "run", "--max-steps", "1")
    assert_clean_error(sft, "empty instruction")  # training still refuses it: there is nothing to answer


def test_empty_standard_input_is_an_error_naming_the_unconditional_flag(hf_dir):
    assert_clean_error(run_cli("generate", hf_dir, "--prompt", "-", input=""), '--prompt ""')
    assert_clean_error(run_cli("generate", hf_dir, "--prompt", "-", input="\n  \n"), '--prompt ""')
    proc = run_cli("generate", hf_dir, "--prompt", "-", "--max-new-tokens", "3", "--temperature", "0",
                   input="Hello", check=True)
    assert proc.stdout == run_cli("generate", hf_dir, "--prompt", "Hello", "--max-new-tokens", "3",
                                  "--temperature", "0", check=True).stdout


def test_generate_chat_and_serve_share_the_decoding_speed_flags():
    """--compile, --quantize, --draft and --draft-k: one declaration (commands.add_decoding) on all three."""
    verbs = next(a for a in build_parser()._actions if a.dest == "verb").choices
    flags = ("compile", "quantize", "draft", "draft_k")

    def seen(verb):
        return {a.dest: (a.option_strings, a.help, a.choices, a.default)
                for a in verbs[verb]._actions if a.dest in flags}

    generate = seen("generate")
    assert set(generate) == set(flags)
    for verb in ("chat", "serve"):
        assert seen(verb) == {k: v for k, v in generate.items() if k in seen(verb)} and "compile" in seen(verb)
