"""Prompt templates. An instruction-tuned checkpoint stores its template in gpt2ft.json so that
generate, eval, chat and serve format prompts exactly as in training."""
from __future__ import annotations

import json
from pathlib import Path

from .errors import UserError

ALPACA_INTRO = "Below is an instruction that describes a task"
TEMPLATES: dict[str, dict] = {
    "alpaca": {
        "name": "alpaca",
        "prompt": (f"{ALPACA_INTRO}, paired with an input that provides further context. Write a response "
                   "that appropriately completes the request.\n\n"
                   "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"),
        "prompt_no_input": (f"{ALPACA_INTRO}. Write a response that appropriately completes the request.\n\n"
                            "### Instruction:\n{instruction}\n\n### Response:\n"),
        "stop": ["\n### Instruction:", "\n### Input:"],
    },
    "instruction-response": {
        "name": "instruction-response",
        "prompt": "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n",
        "prompt_no_input": "### Instruction:\n{instruction}\n\n### Response:\n",
        "stop": ["\n### Instruction:"],
    },
    # Chat turns as plain text (GPT-2 has no chat special tokens); each assistant turn ends with EOS.
    "chat": {
        "name": "chat",
        "system": "### System:\n{content}\n\n",
        "user": "### User:\n{content}\n\n",
        "assistant": "### Assistant:\n",
        "stop": ["\n### User:", "\n### System:"],
    },
}


def get_template(name_or_path: str) -> dict:
    """A built-in template by name, or a custom one from a JSON/YAML file with a `prompt` field
    ({instruction} and optionally {input} placeholders), optional `prompt_no_input` and `stop`."""
    if name_or_path in TEMPLATES:
        return dict(TEMPLATES[name_or_path])
    path = Path(name_or_path)
    if not path.exists():
        raise UserError(f"--template {name_or_path!r}: not one of {', '.join(TEMPLATES)} nor a file")
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix in (".yaml", ".yml"):
            import yaml

            tpl = yaml.safe_load(text)
        else:
            tpl = json.loads(text)
    except Exception as e:  # noqa: BLE001 - any parse error is the user's file
        raise UserError(f"{path}: cannot read template ({str(e).splitlines()[0]})") from None
    if not isinstance(tpl, dict) or "{instruction}" not in str(tpl.get("prompt", "")):
        raise UserError(f"{path}: a template needs a 'prompt' string containing {{instruction}}")
    tpl.setdefault("prompt_no_input", tpl["prompt"])
    tpl.setdefault("stop", [])
    tpl["name"] = tpl.get("name", path.stem)
    return tpl


def format_prompt(tpl: dict, instruction: str, input: str = "") -> str:
    """The text the model sees before its response."""
    if "user" in tpl:  # chat template: one user turn
        return tpl["user"].format(content=instruction if not input else f"{instruction}\n\n{input}") + tpl["assistant"]
    if input and "{input}" in tpl["prompt"]:
        return tpl["prompt"].replace("{instruction}", instruction).replace("{input}", input)
    text = tpl["prompt_no_input"].replace("{instruction}", instruction)
    return text + (f"\n{input}" if input and "{input}" not in tpl["prompt_no_input"] else "")


def prompt_for_generation(meta: dict, prompt: str, raw: bool = False) -> tuple[str, list[str]]:
    """Apply the checkpoint's template (if any, and not raw) to a user prompt; return it and its stops."""
    tpl = meta.get("template") if meta else None
    if raw or not tpl:
        return prompt, []
    return format_prompt(tpl, prompt), list(tpl.get("stop", []))
