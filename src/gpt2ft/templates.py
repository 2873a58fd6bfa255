"""Prompt templates: how a conversation becomes text. SFT and DPO train on `render`, and generate, eval,
chat and serve continue `prompt`, so training and inference formats cannot drift. An instruction-tuned
checkpoint stores its template (`to_dict`) in gpt2ft.json.

Messages are {"role": "system"|"user"|"assistant"|"tool", "content": str}; a user message may also carry an
"input" (Alpaca's context), which templates with an {input} slot place in it and others append to the
content as "content\\n\\ninput" (`message_text`).

Two kinds, stated explicitly:
- "chat": every turn in its own format (`system`/`user` with {content}, an `assistant` header, and
  `tool` with {content} for a tool's result; a template without one shows tool results as user turns).
- "instruction": single-turn `prompt` ({instruction}, optionally {input}); in a conversation the
  system text comes first, then each user (or tool) turn as a prompt followed by its reply.
In both, the trained segments are exactly the assistant replies (EOS follows each at tokenisation).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

from .errors import UserError

KINDS = ("instruction", "chat")
ROLES = ("system", "user", "assistant")  # of training data
RENDER_ROLES = (*ROLES, "tool")  # also a tool's result (the server's role "tool" messages)


class Segment(NamedTuple):
    text: str
    trained: bool  # an assistant reply: tokenised on its own, an EOS after it, the loss on both ...
    weight: float = 1.0  # ... unless its message has OpenAI's "weight": 0 (the reply stays in the context)


@dataclass(frozen=True)
class Template:
    name: str
    kind: str  # "instruction" | "chat"
    prompt_input: str = ""  # instruction kind: with {instruction} and {input}
    prompt_no_input: str = ""  # instruction kind: with {instruction}
    system: str = ""  # chat kind: with {content}
    user: str = ""  # chat kind: with {content}
    assistant: str = ""  # chat kind: the header before each reply
    tool: str = ""  # chat kind: a tool's result, with {content} ("": shown with the user format)
    stop: tuple[str, ...] = ()  # generation ends at any of these (as well as at EOS)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise UserError(f"template {self.name!r}: kind must be one of {', '.join(KINDS)}, not {self.kind!r}")
        need = {"instruction": {"prompt_no_input": "{instruction}"},
                "chat": {"system": "{content}", "user": "{content}"}}[self.kind]
        for key, slot in need.items():
            if not isinstance(getattr(self, key), str) or slot not in getattr(self, key):
                raise UserError(f"template {self.name!r}: a {self.kind} template needs a {key!r} string "
                                f"containing {slot}")
        if not isinstance(self.assistant, str):
            raise UserError(f"template {self.name!r}: 'assistant' must be a string (the header before a reply)")
        if not isinstance(self.tool, str) or (self.tool and "{content}" not in self.tool):
            raise UserError(f"template {self.name!r}: 'tool' must be a string containing {{content}}")
        object.__setattr__(self, "stop", tuple(self.stop))

    # ----- rendering -------------------------------------------------------------------------
    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> list[Segment]:
        """The conversation as text segments; the trained ones are exactly the assistant replies.
        Adjacent untrained text is one segment (tokenised as a whole, as at generation time).
        add_generation_prompt appends what precedes the next reply (a chat template's header)."""
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in RENDER_ROLES or not isinstance(m.get("content"), str):
                raise UserError(f"messages[{i}] needs a role in {RENDER_ROLES} and a string content")
        parts: list[Segment] = []
        if self.kind == "chat":
            for m in messages:
                if m["role"] == "assistant":
                    parts += [Segment(self.assistant, False), Segment(m["content"], True, m.get("weight", 1.0))]
                else:
                    parts.append(Segment(_fill(self._format(m["role"]), content=message_text(m)), False))
            if add_generation_prompt:
                parts.append(Segment(self.assistant, False))
        else:
            system = "".join(m["content"] + "\n\n" for m in messages if m["role"] == "system")
            parts.append(Segment(system, False))
            for m in messages:
                if m["role"] in ("user", "tool"):
                    parts.append(Segment(self.format_instruction(m["content"], m.get("input") or ""), False))
                elif m["role"] == "assistant":
                    parts.append(Segment(m["content"], True, m.get("weight", 1.0)))
        return _merge(parts)

    def _format(self, role: str) -> str:
        """A chat template's format of a system, user or tool turn."""
        return (self.tool or self.user) if role == "tool" else getattr(self, role)

    def prompt(self, messages: list[dict]) -> str:
        """The text a reply continues. With earlier replies, those are followed by EOS in training:
        tokenise with data.sft.prompt_ids to get exactly the training tokens."""
        return "".join(s.text for s in self.render(messages, add_generation_prompt=True))

    def format_instruction(self, instruction: str, input: str = "") -> str:
        """An instruction template's prompt for one user turn."""
        if input and self.prompt_input:
            return _fill(self.prompt_input, instruction=instruction, input=input)
        # no input slot: the input follows the instruction (an {input} slot left unused is emptied)
        return _fill(self.prompt_no_input, instruction=f"{instruction}\n\n{input}" if input else instruction, input="")

    def to_jinja(self) -> str:
        """The template as a Jinja chat template (Hugging Face's `chat_template`, llama.cpp's
        `tokenizer.chat_template`): over string contents it renders exactly what render() does, with
        `eos_token` after each reply, as SFT trained."""
        def lit(text: str) -> str:
            return json.dumps(text)  # a JSON string is a valid Jinja string literal

        def around(fmt: str, slot: str, expr: str) -> str:
            before, _, after = _fill(fmt, input="").partition("{" + slot + "}") if slot != "content" \
                else fmt.partition("{content}")
            return f"{{{{ {lit(before)} + {expr} + {lit(after)} }}}}"

        reply = "{{ message['content'] + eos_token }}"
        if self.kind == "chat":
            turns = {"system": around(self.system, "content", "message['content']"),
                     "user": around(self.user, "content", "message['content']"),
                     "assistant": f"{{{{ {lit(self.assistant)} }}}}{reply}",
                     "tool": around(self._format("tool"), "content", "message['content']")}
            body = "".join(f"{{%- {'if' if i == 0 else 'elif'} message['role'] == '{role}' -%}}{out}"
                           for i, (role, out) in enumerate(turns.items()))
            return (f"{{%- for message in messages -%}}{body}{{%- endif -%}}{{%- endfor -%}}"
                    f"{{%- if add_generation_prompt -%}}{{{{ {lit(self.assistant)} }}}}{{%- endif -%}}")
        system = "{%- for message in messages if message['role'] == 'system' -%}" \
                 "{{ message['content'] + '\\n\\n' }}{%- endfor -%}"
        user = around(self.prompt_no_input, "instruction", "message['content']")
        return (f"{system}{{%- for message in messages -%}}{{%- if message['role'] in ('user', 'tool') -%}}{user}"
                f"{{%- elif message['role'] == 'assistant' -%}}{reply}{{%- endif -%}}{{%- endfor -%}}")

    # ----- storage ---------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """The fields of this kind, as stored in gpt2ft.json (readable by older versions too)."""
        if self.kind == "chat":
            fields = {"system": self.system, "user": self.user, "assistant": self.assistant,
                      **({"tool": self.tool} if self.tool else {})}
        else:
            fields = {"prompt": self.prompt_input or self.prompt_no_input, "prompt_no_input": self.prompt_no_input}
        return {"name": self.name, "kind": self.kind, **fields, "stop": list(self.stop)}

    @classmethod
    def from_dict(cls, d: dict, default_name: str = "custom") -> "Template":
        """From to_dict()'s output, a template file, or a dict saved by earlier versions (no "kind":
        those with a "user" format were chat templates)."""
        if not isinstance(d, dict):
            raise UserError(f"a template must be a mapping, not {type(d).__name__}")
        kind = d.get("kind") or ("chat" if "user" in d else "instruction")
        stop = d.get("stop") or []
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
            raise UserError(f"template {d.get('name', default_name)!r}: 'stop' must be a list of strings")
        common = {"name": str(d.get("name") or default_name), "kind": kind, "stop": tuple(stop)}
        if kind != "instruction":  # chat (an unknown kind is refused by the constructor)
            t = cls(**common, system=d.get("system", "{content}\n\n"), user=d.get("user"),
                    assistant=d.get("assistant", ""), tool=d.get("tool", ""))
            builtin = TEMPLATES.get(t.name)
            if "tool" not in d and builtin is not None and replace(builtin, tool="") == t:
                return builtin  # saved before templates had a tool turn: the built-in's
            return t
        prompt = d.get("prompt")
        if not isinstance(prompt, str) or "{instruction}" not in prompt:
            raise UserError(f"template {common['name']!r}: an instruction template needs a 'prompt' string "
                            "containing {instruction}")
        return cls(**common, prompt_input=prompt if "{input}" in prompt else "",
                   prompt_no_input=d.get("prompt_no_input", prompt))


def message_text(message: dict) -> str:
    """A message's content as plain text, a user message's "input" appended after a blank line."""
    extra = message.get("input") or ""
    return f"{message['content']}\n\n{extra}" if extra else message["content"]


def _fill(fmt: str, **values: str) -> str:
    """Replace {name} slots in one pass (a value that itself contains "{input}" stays as it is)."""
    return re.sub(r"\{(" + "|".join(values) + r")\}", lambda m: values[m.group(1)], fmt)


def _merge(parts: list[Segment]) -> list[Segment]:
    out: list[Segment] = []
    for s in parts:
        if out and out[-1].trained == s.trained and not s.trained:
            out[-1] = Segment(out[-1].text + s.text, False)
        elif s.text or s.trained:
            out.append(s)
    return out


ALPACA_INTRO = "Below is an instruction that describes a task"
TEMPLATES: dict[str, Template] = {
    "alpaca": Template(
        "alpaca", "instruction",
        prompt_input=(f"{ALPACA_INTRO}, paired with an input that provides further context. Write a response "
                      "that appropriately completes the request.\n\n"
                      "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"),
        prompt_no_input=(f"{ALPACA_INTRO}. Write a response that appropriately completes the request.\n\n"
                         "### Instruction:\n{instruction}\n\n### Response:\n"),
        stop=("\n### Instruction:", "\n### Input:")),
    "instruction-response": Template(
        "instruction-response", "instruction",
        prompt_input="### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n",
        prompt_no_input="### Instruction:\n{instruction}\n\n### Response:\n",
        stop=("\n### Instruction:",)),
    # Chat turns as plain text (GPT-2 has no chat special tokens); each assistant turn ends with EOS.
    "chat": Template(
        "chat", "chat", system="### System:\n{content}\n\n", user="### User:\n{content}\n\n",
        assistant="### Assistant:\n", tool="### Tool:\n{content}\n\n", stop=("\n### User:", "\n### System:")),
    # What chat and serve give a model tuned without a template (a base GPT-2): a plain transcript.
    "plain": Template(
        "plain", "chat", system="{content}\n\n", user="User: {content}\n", assistant="Assistant:",
        tool="Tool: {content}\n",
        stop=("\nUser:", "\nAssistant:")),
}


# the keys Template.from_dict reads: any other key in a template file is a typo, not ignored
TEMPLATE_KEYS = {"name", "kind", "stop", "prompt", "prompt_no_input", "system", "user", "assistant", "tool"}


def get_template(name_or_path: str) -> Template:
    """A built-in template by name, or a custom one from a JSON/YAML file: `prompt` ({instruction},
    optionally {input}), optional `prompt_no_input`, `stop`, `name`; or `kind: chat` with `system`,
    `user` ({content}) and `assistant` formats."""
    if name_or_path in TEMPLATES:
        return TEMPLATES[name_or_path]
    path = Path(name_or_path)
    if not path.is_file():
        raise UserError(f"--template {name_or_path!r}: not one of {', '.join(TEMPLATES)} nor a file")
    try:
        text = path.read_text(encoding="utf-8-sig")  # a BOM is no part of the template
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as e:  # noqa: BLE001 - any parse error is the user's file
        raise UserError(f"{path}: cannot read template ({str(e).splitlines()[0]})") from None
    if isinstance(data, dict) and "kind" not in data:
        data = {**data, "kind": "instruction"}  # a file without a kind is an instruction template
    if isinstance(data, dict) and (unknown := sorted(map(str, set(data) - TEMPLATE_KEYS))):
        raise UserError(f"{path}: unknown template key(s) {', '.join(unknown)} (a template has "
                        f"{', '.join(sorted(TEMPLATE_KEYS))})")
    try:
        return Template.from_dict(data, default_name=path.stem)
    except UserError as e:
        raise UserError(f"{path}: {e}") from None


def as_template(value) -> Template | None:
    """A Template from what a checkpoint's metadata holds (a dict, old or new format), or None."""
    if value is None or isinstance(value, Template):
        return value
    return Template.from_dict(value)


def pick_template(name: str | None = None, saved: Template | dict | None = None,
                  conversations: list[list[dict]] | None = None) -> Template:
    """The one template picker of sft, dpo, eval, chat and serve: `--template NAME|FILE`; else the
    template the model was tuned with; else, for training data, `chat` when any conversation is
    multi-turn or has a system prompt and `alpaca` otherwise; else (talking to an untuned model)
    `plain`, a User:/Assistant: transcript."""
    if name:
        return get_template(name)
    if (template := as_template(saved)) is not None:
        return template
    if conversations is not None:
        multi_turn = any(len(c) > 2 or (c and c[0].get("role") == "system") for c in conversations)
        return TEMPLATES["chat" if multi_turn else "alpaca"]
    return TEMPLATES["plain"]


def prompt_for_generation(meta: dict | None, prompt: str, raw: bool = False) -> tuple[str, list[str]]:
    """Apply the checkpoint's template (if any, and not raw) to a user prompt; return it and its stops."""
    template = as_template((meta or {}).get("template"))
    if raw or template is None:
        return prompt, []
    return template.prompt([{"role": "user", "content": prompt}]), list(template.stop)


TEMPLATE_KEY = "gpt2ft_template"  # tokenizer_config.json's copy of the template (transformers ignores it)


def exported_template(folder: Path) -> dict | None:
    """The prompt template an exported folder's tokenizer_config.json records (ours, or a chat_template that
    is exactly one of gpt2ft's built-in templates'), for a folder without gpt2ft.json."""
    try:  # a bad file: the tokenizer's own reader names what is wrong with it
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if not isinstance(config, dict):
        return None
    if isinstance(config.get(TEMPLATE_KEY), dict):
        return config[TEMPLATE_KEY]
    jinja = config.get("chat_template")
    return next((t.to_dict() for t in TEMPLATES.values() if jinja and t.to_jinja() == jinja), None)
