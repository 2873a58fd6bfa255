"""GGUF export: the file loads in transformers (gguf_file=) with our logits, its chat template renders
our tokens, and a word-level tokenizer is refused."""
from __future__ import annotations

import pytest
import torch

from gpt2ft.errors import UserError
from gpt2ft.templates import TEMPLATES

pytest.importorskip("gguf")

TOL = {"f32": 1e-4, "f16": 5e-2, "bf16": 2e-1, "q8_0": 2e-1}


@pytest.fixture(scope="module")
def ids():
    return torch.tensor([[464, 3290, 318, 257, 922, 1110, 11, 290, 340]])


@pytest.fixture(scope="module")
def gguf_config(tiny_model, tmp_path_factory):
    """transformers' config read from our GGUF metadata (once: parsing a file's 50257-token vocabulary takes
    seconds, and every outtype writes the same metadata)."""
    from transformers import AutoConfig

    from gpt2ft.gguf_file import write_gguf

    model, tok = tiny_model
    folder = tmp_path_factory.mktemp("gguf_config")
    write_gguf(folder / "m.gguf", model, tok, TEMPLATES["chat"], outtype="f32")
    # transformers reads gpt2.context_length into n_ctx, not n_positions: a context other than 1024 is named
    config = AutoConfig.from_pretrained(folder, gguf_file="m.gguf", n_positions=model.config.block_size)
    assert (config.n_layer, config.n_embd, config.n_head) == (model.config.n_layer, model.config.n_embd,
                                                              model.config.n_head)
    return config


@pytest.mark.parametrize("outtype", ["f32", "f16", "bf16", "q8_0"])
def test_gguf_loads_in_transformers_with_our_logits(tiny_model, gguf_config, tmp_path, ids, outtype):
    from transformers import AutoModelForCausalLM

    from gpt2ft.gguf_file import write_gguf

    model, tok = tiny_model
    write_gguf(tmp_path / "m.gguf", model, tok, TEMPLATES["chat"], outtype=outtype)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", config=gguf_config).eval()
    with torch.no_grad():
        ours, theirs = model(ids), hf(ids).logits
    assert theirs.shape == ours.shape
    diff = (ours - theirs).abs().max().item()
    assert diff <= TOL[outtype], diff
    if outtype == "f32":  # the same greedy continuation
        assert ours[0].argmax(-1).tolist() == theirs[0].argmax(-1).tolist()


def test_gguf_tokenizer_and_chat_template_match_ours(tiny_model, tmp_path):
    from transformers import AutoTokenizer

    from gpt2ft.data.sft import prompt_ids
    from gpt2ft.gguf_file import write_gguf

    model, tok = tiny_model
    template = TEMPLATES["chat"]
    write_gguf(tmp_path / "m.gguf", model, tok, template)
    hf_tok = AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    text = "Hello world, what's the plot of Macbeth? Ünïcödé 🎭"
    assert hf_tok.encode(text) == tok.encode(text)
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Who is Lear?"},
                {"role": "assistant", "content": "A king."}, {"role": "user", "content": "And Hamlet?"}]
    hf_ids = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert hf_ids == prompt_ids(messages, template, tok)


def test_word_level_tokenizer_is_refused(tiny_model, tmp_path):
    from gpt2ft.gguf_file import write_gguf
    from gpt2ft.tokenizer import WordTokenizer

    model, _ = tiny_model
    words = WordTokenizer.train(["to be or not to be"], vocab_size=20)
    with pytest.raises(UserError, match="byte-level BPE"):
        write_gguf(tmp_path / "m.gguf", model, words)
    assert not (tmp_path / "m.gguf").exists()


def test_llama_cpp_runs_the_gguf_with_our_greedy_tokens(tmp_path):
    """llama.cpp itself (llama-cpp-python, built from its PyPI sdist; skipped where it is not installed)
    loads the file and decodes the same greedy tokens as gpt2ft. A 1024-context model, as llama.cpp
    sizes its position table from the file."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install "
                                                          "llama-cpp-python builds llama.cpp from source)")
    from gpt2ft.config import GPTConfig
    from gpt2ft.generation import generate
    from gpt2ft.gguf_file import write_gguf
    from gpt2ft.model import GPT
    from gpt2ft.tokenizer import gpt2_tokenizer

    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=1024)).eval()
    with torch.no_grad():  # sharper logits than a fresh init, so greedy ties cannot flip on rounding
        model.lm_head.weight.mul_(20)
    tok = gpt2_tokenizer()
    write_gguf(tmp_path / "m.gguf", model, tok, TEMPLATES["chat"])
    llm = llama_cpp.Llama(str(tmp_path / "m.gguf"), n_ctx=128, verbose=False, n_threads=2, logits_all=True)
    prompt = "The quick brown fox jumps over the lazy dog"
    assert llm.tokenize(prompt.encode(), add_bos=False, special=False) == tok.encode(prompt)
    ours = tok.encode(generate(model, tok, prompt, max_new_tokens=12, temperature=0.0, ignore_eos=True))
    theirs = []
    llm.eval(tok.encode(prompt))
    for _ in range(12):
        nxt = int(torch.tensor(llm.scores[llm.n_tokens - 1]).argmax())
        theirs.append(nxt)
        llm.eval([nxt])
    first = torch.tensor(llm.scores[len(tok.encode(prompt)) - 1])
    llm.close()
    assert theirs == ours
    with torch.no_grad():
        assert torch.allclose(first, model(torch.tensor([tok.encode(prompt)]))[0, -1], atol=1e-3)


def test_export_format_gguf_through_the_cli(hf_dir, tmp_path):
    """`gpt2ft export --format gguf`: a file transformers loads, a Modelfile beside it, and a user's file
    of the same name never replaced."""
    from transformers import AutoModelForCausalLM

    from conftest import assert_clean_error, run_cli

    out = tmp_path / "new" / "tiny.gguf"  # its folder is made, as for every output file
    said = run_cli("export", hf_dir, "--format", "gguf", "--outtype", "f32", "--out", out, check=True).stdout
    assert 'gguf_file="tiny.gguf", n_positions=64' in said  # the call that loads it, printed
    assert AutoModelForCausalLM.from_pretrained(out.parent, gguf_file="tiny.gguf", n_positions=64) is not None
    modelfile = out.with_suffix(".Modelfile").read_text()
    assert modelfile.startswith("FROM ./tiny.gguf") and "PARAMETER stop" in modelfile
    run_cli("export", hf_dir, "--format", "gguf", "--out", out.with_name("other.gguf"), check=True)  # same folder
    assert out.with_name("other.Modelfile").read_text().startswith("FROM ./other.gguf")
    mine = tmp_path / "mine.gguf"
    mine.write_bytes(b"my own file")
    proc = run_cli("export", hf_dir, "--format", "gguf", "--out", mine, "--overwrite")
    assert_clean_error(proc, "mine.gguf")
    assert mine.read_bytes() == b"my own file"


def go_template(source: str, data: dict) -> str:
    """Go's text/template for the subset an Ollama TEMPLATE uses (range, if / else if / end, eq, or, fields;
    `{{-` and `-}}` trim the white space beside them), written from Go's documentation: the test's oracle."""
    import re

    items = []  # ("text", s) and ("act", body)
    pos = 0
    for m in re.finditer(r"\{\{(- )?(.*?)( -)?\}\}", source, re.S):
        text = source[pos:m.start()]
        if m.group(1):
            text = text.rstrip(" \t\r\n")
        if items and items[-1][0] == "trim":
            items.pop()
            text = text.lstrip(" \t\r\n")
        items += [("text", text), ("act", m.group(2).strip())] + ([("trim", "")] if m.group(3) else [])
        pos = m.end()
    tail = source[pos:]
    if items and items[-1][0] == "trim":
        items.pop()
        tail = tail.lstrip(" \t\r\n")
    items.append(("text", tail))

    def value(expr, dot):
        args = re.findall(r'\((?:[^()]|\([^()]*\))*\)|"[^"]*"|\S+', expr)
        if args[0] == "eq":
            return value(args[1], dot) == value(args[2], dot)
        if args[0] == "or":
            return any(value(a, dot) for a in args[1:])
        if args[0].startswith("("):
            return value(args[0][1:-1], dot)
        if args[0].startswith('"'):
            return args[0][1:-1]
        return dot.get(args[0][1:], "")

    def block(i):  # -> (nodes, index after the closing action, that action)
        nodes = []
        while i < len(items):
            kind, body = items[i]
            i += 1
            if kind == "text":
                nodes.append(("text", body))
            elif body == "end" or body.startswith("else"):
                return nodes, i, body
            elif body.startswith(("if ", "range ")):
                branches, word, closing = [], body, None
                while True:
                    inner, i, closing = block(i)
                    branches.append((word, inner))
                    if closing == "end":
                        break
                    word = "if " + closing[len("else if "):] if closing.startswith("else if") else "if true"
                nodes.append(("control", branches))
            else:
                nodes.append(("value", body))
        return nodes, i, None

    def run(nodes, dot):
        out = ""
        for kind, node in nodes:
            if kind == "text":
                out += node
            elif kind == "value":
                out += str(value(node, dot))
            else:
                word, inner = node[0]
                if word.startswith("range "):
                    out += "".join(run(inner, item) for item in value(word[6:], dot))
                    continue
                for word, inner in node:
                    if word == "if true" or value(word[3:], dot):
                        out += run(inner, dot)
                        break
        return out

    return run(block(0)[0], data)


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_the_modelfile_template_renders_the_training_prompt(name):
    """Ollama renders the Modelfile's TEMPLATE into the text gpt2ft trains on and prompts with: each turn's
    own newlines kept, <|endoftext|> after each reply, the reply's header at the end."""
    from gpt2ft.gguf_file import _ollama_template

    template = TEMPLATES[name]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is Macbeth?"},
                {"role": "assistant", "content": "A tragedy."}, {"role": "user", "content": "Who wrote it?"}]
    expected = "".join(s.text + ("<|endoftext|>" if s.trained else "")
                       for s in template.render(messages, add_generation_prompt=True))
    system = "".join(m["content"] for m in messages if m["role"] == "system")
    data = {"System": system, "Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages]}
    assert go_template(_ollama_template(template), data) == expected  # Ollama keeps system messages in .Messages
