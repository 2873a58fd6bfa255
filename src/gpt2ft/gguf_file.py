"""GGUF out: one file that llama.cpp, Ollama and LM Studio run, and transformers loads
(`from_pretrained(folder, gguf_file=...)`), written with the `gguf` package llama.cpp publishes.

Layout as llama.cpp's own converter writes GPT-2: architecture "gpt2", tensors named token_embd /
position_embd / blk.N.{attn_norm, attn_qkv, attn_output, ffn_norm, ffn_up, ffn_down} / output_norm /
output, linear weights as (out, in) — nn.Linear's layout, which ours already is — and the byte-level
BPE vocabulary with its merges. 1-D tensors (norms, biases) stay float32 in every outtype.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .errors import UserError
from .model import GPT
from .templates import Template
from .tokenizer import EOT, BPETokenizer, Tokenizer

OUTTYPES = ("f32", "f16", "bf16", "q8_0")
# our names (after "transformer.") -> llama.cpp's, per block
BLOCK_NAMES = {"ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "ln_2": "ffn_norm",
               "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}
TOP_NAMES = {"transformer.wte.weight": "token_embd.weight", "transformer.wpe.weight": "position_embd.weight",
             "transformer.ln_f.weight": "output_norm.weight", "transformer.ln_f.bias": "output_norm.bias"}


def _gguf():
    try:
        import gguf
    except ImportError:
        raise UserError("GGUF export needs the `gguf` package: pip install gguf") from None
    return gguf


def gguf_name(name: str) -> str:
    """Our parameter name -> llama.cpp's GGUF tensor name."""
    if name in TOP_NAMES:
        return TOP_NAMES[name]
    parts = name.split(".")  # transformer.h.N.<module...>.<weight|bias>
    if parts[:2] != ["transformer", "h"]:
        raise KeyError(name)
    module = ".".join(parts[3:-1])
    return f"blk.{parts[2]}.{BLOCK_NAMES[module]}.{parts[-1]}"


def _tensor_data(gguf, tensor: torch.Tensor, outtype: str):
    """(numpy data, raw dtype or None) for one tensor in the chosen outtype."""
    x = tensor.detach().float().cpu().contiguous()
    if x.dim() == 1 or outtype == "f32":
        return x.numpy(), None
    if outtype == "f16":
        return x.half().numpy(), None
    kind = {"bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}[outtype]
    if outtype == "q8_0" and x.shape[-1] % 32:  # Q8_0 packs rows in blocks of 32: keep such rows exact
        return x.half().numpy(), None
    return gguf.quants.quantize(x.numpy(), kind), kind


def _vocabulary(tokenizer: Tokenizer, n_vocab: int) -> tuple[list[str], list[int], list[str]]:
    """(tokens by id, their types, merges "a b") of a byte-level BPE tokenizer, padded to the model's rows."""
    if not isinstance(tokenizer, BPETokenizer):
        raise UserError(f"GGUF export needs a byte-level BPE tokenizer; this model has a {tokenizer.kind} "
                        "tokenizer, which llama.cpp cannot run (train one with `gpt2ft tokenizer --kind bpe`)")
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    types = [5] * n_vocab  # UNUSED, until a vocabulary entry fills the id
    for text, i in tokenizer.vocab.items():
        if i >= n_vocab:
            raise UserError(f"the tokenizer has token id {i} but the model only {n_vocab} embedding rows")
        tokens[i], types[i] = text, (3 if text == EOT else 1)  # CONTROL for <|endoftext|>, else NORMAL
    return tokens, types, [f"{a} {b}" for a, b in tokenizer.merges]


def write_gguf(path: str | Path, model: GPT, tokenizer: Tokenizer, template: Template | None = None,
               outtype: str = "f32", name: str = "gpt2ft") -> Path:
    """Write `model` (LoRA already merged) with its tokenizer and chat template as one GGUF file."""
    gguf = _gguf()
    if outtype not in OUTTYPES:
        raise UserError(f"--outtype must be one of {', '.join(OUTTYPES)}, not {outtype!r}")
    if model.lora_config is not None:
        raise UserError("merge the LoRA adapter before writing GGUF (export --merge-lora)")
    cfg = model.config
    tokens, types, merges = _vocabulary(tokenizer, cfg.vocab_size)
    path = Path(path)
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_name(name)
    writer.add_context_length(cfg.block_size)
    writer.add_embedding_length(cfg.n_embd)
    writer.add_feed_forward_length(4 * cfg.n_embd)
    writer.add_block_count(cfg.n_layer)
    writer.add_head_count(cfg.n_head)
    writer.add_layer_norm_eps(1e-5)
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype])
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for setter in (writer.add_bos_token_id, writer.add_eos_token_id, writer.add_pad_token_id):
        setter(tokenizer.eos_id)
    writer.add_add_bos_token(False)  # gpt2ft (and transformers) never prepend <|endoftext|> to a prompt
    if template is not None:
        writer.add_chat_template(template.to_jinja())
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight" and not k.endswith(".attn.bias")}
    for key, tensor in state.items():
        data, raw = _tensor_data(gguf, tensor, outtype)
        writer.add_tensor(gguf_name(key), data, raw_dtype=raw)
    data, raw = _tensor_data(gguf, model.lm_head.weight, outtype)  # tied: written again, as llama.cpp does
    writer.add_tensor("output.weight", data, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def modelfile_text(gguf_name_: str, template: Template | None, temperature: float = 0.7, top_k: int = 40,
                   top_p: float = 0.9) -> str:
    """An Ollama Modelfile for the GGUF file beside it: its prompt template (Go template syntax),
    stop strings and default sampling."""
    lines = [f"FROM ./{gguf_name_}"]
    if template is not None:
        lines.append(f'TEMPLATE """{_ollama_template(template)}"""')
        for stop in (*template.stop, EOT):
            lines.append(f"PARAMETER stop {_quote(stop)}")
    else:
        lines.append(f"PARAMETER stop {_quote(EOT)}")
    lines += [f"PARAMETER temperature {temperature:g}", f"PARAMETER top_k {top_k}", f"PARAMETER top_p {top_p:g}"]
    return "\n".join(lines) + "\n"


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _ollama_template(t: Template) -> str:
    """Ollama's Go template over .Messages (and .System), the same text as Template.render, with <|endoftext|>
    after each reply. No `{{-`: it would trim the newlines that end a turn's text."""
    if t.kind == "chat":
        turns = {role: t._format(role).replace("{content}", "{{ .Content }}") for role in ("system", "user", "tool")}
        body = "".join(f'{{{{ {"if" if i == 0 else "else if"} eq .Role "{role}" }}}}{text}'
                       for i, (role, text) in enumerate(turns.items()))
        return ("{{ range .Messages }}" + body + '{{ else if eq .Role "assistant" }}' + t.assistant
                + "{{ .Content }}" + EOT + "{{ end }}{{ end }}" + t.assistant)
    prompt = t.format_instruction("{{ .Content }}")
    return ("{{ if .System }}{{ .System }}\n\n{{ end }}{{ range .Messages }}"
            '{{ if or (eq .Role "user") (eq .Role "tool") }}' + prompt
            + '{{ else if eq .Role "assistant" }}{{ .Content }}' + EOT + "{{ end }}{{ end }}")
