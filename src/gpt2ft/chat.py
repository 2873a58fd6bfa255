"""The multi-turn chat behind `gpt2ft chat`: which model, the conversation, its commands, the REPL.

A conversation is a list of {"role", "content"} messages (the `messages` format `sft` trains on),
rendered with the model's template on every turn. The completion engine keeps the conversation's
KV cache between turns, so a turn prefills only what changed since the last one.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UserError
from .generation import SamplingConfig, Session

KINDS = ("dpo", "sft", "finetune", "pretrain")  # preference order of auto-selection
KIND_NAMES = {"pretrained": "pretrain", **{k: k for k in KINDS}}
HUB_FALLBACK = "gpt2"
CUT_MARK = " [cut]"


# ----- which model ----------------------------------------------------------------------------
@dataclass
class Run:
    folder: Path
    kind: str
    time: float  # when its newest complete checkpoint was written


def run_kind(folder: Path, checkpoint: Path) -> str | None:
    """A run's objective: `run.objective` in config.yaml, else `objective` in its checkpoint's gpt2ft.json."""
    import yaml

    try:
        config = yaml.safe_load((folder / "config.yaml").read_text()) or {}
        kind = (config.get("run") or {}).get("objective")
    except (OSError, yaml.YAMLError, AttributeError):
        kind = None
    if kind is None:
        try:
            kind = json.loads((checkpoint / "gpt2ft.json").read_text()).get("objective")
        except (OSError, json.JSONDecodeError, AttributeError):
            kind = None
    return kind if kind in KINDS else None


def find_runs(root: Path, depth: int = 3) -> list[Run]:
    """Run folders (with a complete checkpoint and a known objective) under root, newest first."""
    from .checkpoint import COMPLETE, run_checkpoints

    runs, folders = [], [root]
    for _ in range(depth):
        children = []
        for folder in folders:
            try:
                subdirs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
            except OSError:
                continue
            for sub in subdirs:
                if (sub / "checkpoints").is_dir():
                    found = run_checkpoints(sub)
                    kind = run_kind(sub, found[0]) if found else None
                    if kind:
                        runs.append(Run(sub, kind, (found[0] / COMPLETE).stat().st_mtime))
                elif sub.name != "checkpoints":
                    children.append(sub)
        folders = children
    return sorted(runs, key=lambda r: r.time, reverse=True)


def hub_model_cached(repo_id: str = HUB_FALLBACK) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


def choose_model(runs_dir: str | Path = "runs", kind: str | None = None) -> tuple[str, str]:
    """(model reference, why it was chosen): the newest run of the most tuned kind, else gpt2."""
    root = Path(runs_dir)
    if kind is not None and kind not in KIND_NAMES:
        raise UserError(f"--model must be one of dpo, sft, finetune, pretrained, not {kind!r}")
    runs = find_runs(root) if root.is_dir() else []
    counts = ", ".join(f"{sum(r.kind == k for r in runs)} {k}" for k in KINDS)
    if kind is not None:
        wanted = KIND_NAMES[kind]
        match = [r for r in runs if r.kind == wanted]
        if not match:
            raise UserError(f"--model {kind}: no {wanted} run with a complete checkpoint under {root} "
                            f"({counts} runs); {how_to_make(wanted)}, or pass MODEL")
        return str(match[0].folder), f"the newest {wanted} run under {root} (--model {kind}; {counts} runs)"
    for k in KINDS:
        match = [r for r in runs if r.kind == k]
        if match:
            better = [b for b in KINDS[:KINDS.index(k)]]
            why = f"no {'/'.join(better)} run, " if better else ""
            return str(match[0].folder), f"the newest {k} run under {root} ({why}{counts} runs)"
    if hub_model_cached():
        return HUB_FALLBACK, f"no run under {root}; {HUB_FALLBACK} from the Hugging Face cache"
    raise UserError(f"no model to chat with: no run under {root} and {HUB_FALLBACK} is not in the Hugging Face "
                    f"cache; make one with `gpt2ft demo --out {root}/demo` (or `gpt2ft sft gpt2 --data FILE "
                    f"--out {root}/sft`), or pass MODEL (a run folder, checkpoint, HF folder or Hub id)")


def how_to_make(kind: str) -> str:
    return {"dpo": "train one with `gpt2ft dpo MODEL --data PAIRS --out runs/NAME`",
            "sft": "train one with `gpt2ft sft MODEL --data FILE --out runs/NAME`",
            "finetune": "train one with `gpt2ft finetune MODEL --data TEXT --out runs/NAME`",
            "pretrain": "train one with `gpt2ft pretrain --data DATA --out runs/NAME`"}[kind]


# ----- model and prompt ----------------------------------------------------------------------
def load_chat_model(ref: str, device: str, dtype: str, lora: str | None, verify: bool = True):
    """(loaded model, template): the checkpoint's template, or the adapter's with --lora."""
    from .checkpoint import load, read_meta, resolve
    from .templates import as_template

    loaded = load(ref, device=device, dtype=dtype, lora=lora, verify=verify)
    template = as_template(read_meta(resolve(lora, verify)).get("template")) if lora else None
    return loaded, template or loaded.template


def render(template, messages: list[dict], tokenizer) -> tuple[list[int], list[str]]:
    """Token ids of the conversation followed by the assistant's cue, and the stop strings.

    With a template, exactly the tokens SFT trained on (every reply ends with EOS), so the ids of
    earlier turns do not change when a turn is added and the kept cache stays valid. A model
    without a template (a base model) sees a plain User:/Assistant: transcript.
    """
    if template is not None:
        from .data.sft import prompt_ids

        return prompt_ids(messages, template, tokenizer), list(template.stop)
    text = "".join(m["content"] + "\n\n" if m["role"] == "system" else f"{m['role'].capitalize()}: {m['content']}\n"
                   for m in messages)
    return tokenizer.encode(text + "Assistant:"), ["\nUser:", "\nAssistant:"]


# ----- the conversation -----------------------------------------------------------------------
@dataclass
class Settings:
    temperature: float = 0.7
    top_k: int = 40
    top_p: float = 0.9
    max_new_tokens: int = 150
    repetition_penalty: float = 1.0
    seed: int | None = None

    def describe(self) -> str:
        return (f"temperature {self.temperature:g}, top-k {self.top_k or 'off'}, top-p {self.top_p:g}, "
                f"tokens {self.max_new_tokens}, penalty {self.repetition_penalty:g}, "
                f"seed {'random' if self.seed is None else self.seed}")


def _number(kind, check, what):
    def parse(text: str):
        value = kind(text)
        if not check(value):
            raise ValueError
        return value
    parse.what = what
    return parse


def _seed(text: str):
    if text.lower() in ("random", "none", "off"):
        return None
    value = int(text)
    if value < 0:
        raise ValueError
    return value


_seed.what = "an integer >= 0, or 'random'"

# command -> (Settings field, parser); /tokens is checked against the context separately
SETTING_COMMANDS = {
    "temp": ("temperature", _number(float, lambda v: math.isfinite(v) and v >= 0, "a number >= 0 (0: greedy)")),
    "topk": ("top_k", _number(int, lambda v: v >= 0, "an integer >= 0 (0: off)")),
    "topp": ("top_p", _number(float, lambda v: 0 < v <= 1, "a number in (0, 1]")),
    "tokens": ("max_new_tokens", _number(int, lambda v: v >= 1, "an integer >= 1")),
    "penalty": ("repetition_penalty", _number(float, lambda v: math.isfinite(v) and v > 0, "a number > 0 (1: off)")),
    "seed": ("seed", _seed),
}

HELP = """commands:
  /quit, /exit         leave (also Ctrl-D, or Ctrl-C at the prompt)
  /reset               forget the conversation (the system prompt stays)
  /temp X  /topk N  /topp X  /tokens N  /penalty X  /seed N|random   sampling (no value: show it)
  /system [TEXT|none]  show, set or clear the system prompt
  /undo                remove the last exchange;  /retry  answer the last message again
  /save FILE  /load FILE   the conversation as `messages` JSON (trainable with `gpt2ft sft`)
  /info  /settings  /memory   the model; sampling settings; what the conversation holds
  /refine [HOW]        ask the model to improve its last answer, and replace it
  /multi N TASK        a plan of N steps, then an answer to each step
  /help                this list
Ctrl-C stops a reply (it is kept, marked as cut). A message that starts with / is sent as //message."""

COMMANDS = ("quit", "exit", "reset", *SETTING_COMMANDS, "system", "undo", "retry", "save", "load", "info",
            "settings", "memory", "refine", "multi", "help")


@dataclass
class Reply:
    text: str
    finish_reason: str  # "stop", "length" or "cut"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    ttft: float | None = None
    seconds: float = 0.0
    token_ids: list[int] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        decode = self.seconds - (self.ttft or 0.0)
        return (self.completion_tokens - 1) / decode if decode > 0 and self.completion_tokens > 1 else 0.0


@dataclass
class Chat:
    """A conversation with one model: history, settings, commands and replies.

    write(text) prints reply text; note(text) prints everything else (messages, command output).
    """

    model: object
    tokenizer: object
    template: object = None
    settings: Settings = field(default_factory=Settings)
    system: str | None = None
    stop: list[str] = field(default_factory=list)  # stop strings besides the template's (--stop)
    write: object = None
    note: object = None
    transcript: object = None  # an open text file: one JSON line per turn
    verbose: bool = False
    model_info: dict = field(default_factory=dict)
    messages: list[dict] = field(default_factory=list)  # user/assistant turns (the system prompt is apart)
    dropped: list[dict] = field(default_factory=list)  # turns that no longer fit the context
    cut: set = field(default_factory=set)  # indices of replies stopped with Ctrl-C
    last_reply: Reply | None = None

    def __post_init__(self):
        self.write = self.write or (lambda text: print(text, end="", flush=True))
        self.note = self.note or (lambda text: print(text, flush=True))
        self.engine = Session(self.model, self.tokenizer)  # keeps the conversation's KV cache
        self.context = self.model.config.block_size
        self._told_dropping = False
        if self.settings.max_new_tokens >= self.context:  # e.g. the default 150 on a tiny model
            tokens = max(1, self.context // 2)
            self.note(f"(tokens per reply lowered from {self.settings.max_new_tokens} to {tokens}: the model's "
                      f"context is {self.context})")
            self.settings.max_new_tokens = tokens

    # ----- turns ------------------------------------------------------------------------------
    def conversation(self) -> list[dict]:
        """The messages to render: the system prompt, then the turns."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + [{"role": m["role"], "content": m["content"]} for m in self.messages]

    def say(self, text: str) -> Reply | None:
        """A user turn: add it, answer it, keep the answer."""
        self.messages.append({"role": "user", "content": text})
        self.log({"role": "user", "content": text})
        reply = self.respond()
        if reply is None:
            self.messages.pop()
        return reply

    def respond(self, extra: list[dict] | None = None, keep: bool = True) -> Reply | None:
        """Generate the assistant's answer to the conversation (+ extra messages, not kept)."""
        fitted = self.fit(extra or [])
        if fitted is None:
            return None
        prompt_ids, stops, max_new = fitted
        reply = self.last_reply = self.generate(prompt_ids, stops, max_new)
        if keep:
            self.messages.append({"role": "assistant", "content": reply.text})
            if reply.finish_reason == "cut":
                self.cut.add(len(self.messages) - 1)
        return reply

    def fit(self, extra: list[dict]):
        """(prompt ids, stops, max new tokens) with the oldest turns dropped until the reply fits;
        None (and a message) when even the system prompt and the newest message do not fit."""
        keep = 2 if extra else 1  # the newest exchange (or user message) always stays
        head = self.conversation()[:1] if self.system else []
        needed = len(render(self.template, head + self.messages[-keep:] + extra, self.tokenizer)[0])
        if needed >= self.context:  # refuse before dropping anything
            self.note(f"that message needs {needed} tokens with the conversation's template but the model's "
                      f"context is {self.context}: send a shorter one"
                      + (" or shorten the system prompt" if self.system else ""))
            return None
        while True:
            ids, stops = render(self.template, self.conversation() + extra, self.tokenizer)
            room = self.context - len(ids)
            if room >= self.settings.max_new_tokens:
                return ids, stops, self.settings.max_new_tokens
            droppable = len(self.messages) - keep
            if droppable <= 0:  # only the newest message is left: answer as much as fits
                return ids, stops, room
            n = 2 if droppable >= 2 and self.messages[0]["role"] == "user" else 1  # a whole exchange
            self.dropped += self.messages[:n]
            del self.messages[:n]
            self.cut = {i - n for i in self.cut if i >= n}
            if not self._told_dropping:
                self._told_dropping = True
                self.note(f"(the conversation no longer fits the model's context of {self.context} tokens: "
                          "the oldest turns are dropped from now on; /memory lists them)")

    def generate(self, prompt_ids: list[int], stops: list[str], max_new: int) -> Reply:
        """Stream one reply to write(); Ctrl-C stops it and keeps what was written."""
        s = self.settings
        cfg = SamplingConfig(max_new_tokens=max_new, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                             repetition_penalty=s.repetition_penalty, stop=stops + self.stop, seed=s.seed)
        start = time.perf_counter()
        stream = self.engine.complete(prompt_ids, cfg)
        shown, ttft, finish = [], None, None
        try:
            for piece in stream:
                if ttft is None:
                    ttft = time.perf_counter() - start
                shown.append(piece)
                self.write(piece)
        except KeyboardInterrupt:
            finish = "cut"  # the engine keeps in cache only what was fully computed
        seconds = time.perf_counter() - start
        text = "".join(shown) if finish == "cut" else stream.text
        self.write((CUT_MARK if finish == "cut" else "") + "\n")
        reply = Reply(text, finish or stream.finish_reason, len(prompt_ids), stream.completion_tokens,
                      stream.completion.cached_tokens, ttft, seconds, list(stream.completion.token_ids))
        if self.verbose:
            ttft_text = f"{reply.ttft:.3f} s" if reply.ttft is not None else "-"
            self.note(f"(time to first token {ttft_text}, {reply.tokens_per_s:.1f} tokens/s, "
                      f"{reply.completion_tokens} tokens, prompt {reply.prompt_tokens} tokens of which "
                      f"{reply.cached_tokens} cached, {reply.finish_reason})")
        self.log({"role": "assistant", "content": reply.text, "finish_reason": reply.finish_reason,
                  "settings": vars(self.settings).copy(), "prompt_tokens": reply.prompt_tokens,
                  "completion_tokens": reply.completion_tokens, "cached_tokens": reply.cached_tokens,
                  "time_to_first_token_s": reply.ttft, "seconds": round(seconds, 4),
                  "tokens_per_s": round(reply.tokens_per_s, 2)})
        return reply

    def log(self, row: dict) -> None:
        if self.transcript is not None:
            self.transcript.write(json.dumps({"time": round(time.time(), 3), **row}, ensure_ascii=False) + "\n")
            self.transcript.flush()

    # ----- commands ---------------------------------------------------------------------------
    def handle(self, line: str) -> bool:
        """One input line (a message or a /command); False when the user leaves."""
        if not line.strip():
            return True
        if not line.startswith("/") or line.startswith("//"):
            self.say(line[1:] if line.startswith("//") else line)  # // sends a message starting with /
            return True
        name, _, arg = line[1:].partition(" ")
        name, arg = name.lower(), arg.strip()
        if name in ("quit", "exit"):
            return False
        if name not in COMMANDS:
            self.note(f"unknown command /{name} (nothing changed); commands: " + " ".join("/" + c for c in COMMANDS))
            return True
        if name in SETTING_COMMANDS:
            self.set_option(name, arg)
        else:
            getattr(self, f"cmd_{name}")(arg)
        return True

    def set_option(self, name: str, arg: str) -> None:
        key, parse = SETTING_COMMANDS[name]
        if not arg:
            self.note(f"{key} = {getattr(self.settings, key)}")
            return
        try:
            value = parse(arg)
            if name == "tokens" and value >= self.context:
                raise ValueError
        except ValueError:
            what = parse.what if name != "tokens" else f"an integer from 1 to {self.context - 1} (the context)"
            self.note(f"/{name} needs {what}, not {arg!r}; nothing changed")
            return
        setattr(self.settings, key, value)
        self.note(f"{key} = {value}")

    def cmd_help(self, arg: str) -> None:
        self.note(HELP)

    def cmd_reset(self, arg: str) -> None:
        self.messages, self.dropped, self.cut = [], [], set()
        self.note("(conversation cleared" + (", system prompt kept)" if self.system else ")"))

    def cmd_system(self, arg: str) -> None:
        if not arg:
            self.note(f"system prompt: {self.system!r}" if self.system else "no system prompt")
            return
        self.system = None if arg.lower() == "none" else arg
        self.note("(system prompt cleared)" if self.system is None else "(system prompt set)")

    def cmd_undo(self, arg: str) -> None:
        if not self.messages:
            self.note("nothing to undo")
            return
        while self.messages:  # back to before the last user message
            self.cut.discard(len(self.messages) - 1)
            if self.messages.pop()["role"] == "user":
                break
        self.note(f"(removed the last exchange; {len(self.messages)} messages left)")

    def cmd_retry(self, arg: str) -> None:
        if not self.messages:
            self.note("nothing to retry: send a message first")
            return
        if self.messages[-1]["role"] == "assistant":
            self.cut.discard(len(self.messages) - 1)
            self.messages.pop()
        self.respond()

    def cmd_save(self, arg: str) -> None:
        from .checkpoint import atomic_write_text

        if not arg:
            self.note("/save needs a file name, e.g. /save chat.json")
            return
        convo = self.conversation()
        if not any(m["role"] == "assistant" for m in convo):
            self.note("nothing to save yet: no reply in the conversation")
            return
        while convo[-1]["role"] != "assistant":  # sft trains on records that end with a reply
            convo.pop()
        row = {"messages": convo}
        path = Path(arg).expanduser()
        text = json.dumps(row, ensure_ascii=False) + "\n" if path.suffix == ".jsonl" else \
            json.dumps([row], ensure_ascii=False, indent=1) + "\n"
        try:
            atomic_write_text(path, text)
        except UserError as e:
            self.note(str(e))
            return
        self.note(f"(saved {len(convo)} messages to {path}; train on it with `gpt2ft sft MODEL --data {path}`)")

    def cmd_load(self, arg: str) -> None:
        if not arg:
            self.note("/load needs a file name, e.g. /load chat.json")
            return
        try:
            messages = read_conversation(Path(arg).expanduser())
        except UserError as e:
            self.note(f"{e}; nothing changed")
            return
        systems = [m["content"] for m in messages if m["role"] == "system"]
        self.system = "\n\n".join(systems) if systems else self.system
        self.messages = [m for m in messages if m["role"] != "system"]
        self.dropped, self.cut = [], set()
        self.note(f"(loaded {len(messages)} messages from {arg})")

    def cmd_info(self, arg: str) -> None:
        m, info = self.model, self.model_info
        p = m.lm_head.weight
        template = getattr(self.template, "name", None)
        rows = [("model", info.get("source", "?")), ("kind", info.get("kind", "?")),
                ("chosen", info.get("reason", "given on the command line")),
                ("parameters", f"{m.num_params():,} ({m.num_params() / 1e6:.1f}M)"),
                ("context", f"{self.context} tokens"), ("template", template or "none (plain User:/Assistant: text)"),
                ("device", str(p.device)), ("dtype", str(p.dtype).removeprefix("torch."))]
        if info.get("lora"):
            rows.append(("lora", info["lora"]))
        self.note("\n".join(f"{k:<11}{v}" for k, v in rows))

    def cmd_settings(self, arg: str) -> None:
        self.note(self.settings.describe())

    def cmd_memory(self, arg: str) -> None:
        ids, _ = render(self.template, self.conversation(), self.tokenizer)
        turns = sum(m["role"] == "user" for m in self.messages)
        lines = [f"{turns} turns ({len(self.messages)} messages), {len(ids)} of {self.context} context tokens used "
                 f"(+ up to {self.settings.max_new_tokens} for the next reply)",
                 f"system prompt: {self.system!r}" if self.system else "no system prompt"]
        if self.dropped:
            ends = self.dropped[:1] + self.dropped[1:][-1:]
            lines.append(f"dropped to fit the context: {len(self.dropped)} messages, from "
                         + " ... to ".join(_gist(m) for m in ends))
        else:
            lines.append("nothing dropped")
        if self.messages:
            lines.append("summary: " + " | ".join(_gist(m, 6) + (" (cut)" if i in self.cut else "")
                                                 for i, m in enumerate(self.messages)))
        self.note("\n".join(lines))

    def cmd_refine(self, arg: str) -> None:
        if not self.messages or self.messages[-1]["role"] != "assistant":
            self.note("nothing to refine: /refine improves the last answer")
            return
        ask = "Improve your last answer" + (f": {arg}" if arg else ": make it clearer, more accurate and complete")
        reply = self.respond(extra=[{"role": "user", "content": ask}], keep=False)
        if reply is not None and reply.text.strip():
            self.messages[-1]["content"] = reply.text
            self.cut.discard(len(self.messages) - 1)
            self.note("(the last answer was replaced)")

    def cmd_multi(self, arg: str) -> None:
        n, _, task = arg.partition(" ")
        if not n.isdigit() or not 1 <= int(n) <= 10 or not task.strip():
            self.note(f"/multi needs a number of steps from 1 to 10 and a task, e.g. /multi 3 plan a picnic; "
                      f"not {arg!r}; nothing changed")
            return
        n = int(n)
        self.note(f"(plan in {n} steps)")
        plan = self.say(f"Write a plan of exactly {n} numbered steps for this task: {task.strip()}")
        if plan is None or plan.finish_reason == "cut":
            return
        steps = parse_steps(plan.text, n)
        for i, step in enumerate(steps, 1):
            self.note(f"(step {i} of {n}: {step})")
            reply = self.say(f"Do step {i} of the plan: {step}")
            if reply is None or reply.finish_reason == "cut":
                return


def parse_steps(plan: str, n: int) -> list[str]:
    """The first n numbered lines of a plan ("1. ...", "2) ..."); missing steps are named generically."""
    import re

    found = [m.group(1).strip() for m in re.finditer(r"^\s*\d+\s*[.):-]\s*(\S.*)$", plan, re.M)]
    return (found + [f"step {i + 1} of the task" for i in range(len(found), n)])[:n]


def _gist(m: dict, words: int = 8) -> str:
    parts = m["content"].split()
    return f"{m['role']}: " + " ".join(parts[:words]) + (" ..." if len(parts) > words else "")


def read_conversation(path: Path) -> list[dict]:
    """The messages of a conversation file: `[{"messages": [...]}]`, `{"messages": [...]}` or one JSONL row."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as e:
        raise UserError(f"{path}: {e.strerror}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        try:  # JSON Lines: the first row
            data = json.loads(next(line for line in text.splitlines() if line.strip()))
        except (json.JSONDecodeError, StopIteration) as e:
            raise UserError(f"{path}: not a JSON conversation ({e})") from None
    if isinstance(data, list) and data and isinstance(data[0], dict) and "messages" in data[0]:
        data = data[0]
    messages = data.get("messages") if isinstance(data, dict) else data
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{path}: expected {{\"messages\": [...]}} with at least one message")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") \
                or not isinstance(m.get("content"), str):
            raise UserError(f"{path}: messages[{i}] needs a role (system, user, assistant) and a string content")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


# ----- the loop -------------------------------------------------------------------------------
def read_message(multiline: bool, prompt: str = ">>> ") -> str:
    """One message from the terminal; with multiline, lines until a line holding only '.'."""
    first = input(prompt)
    if not multiline or first.startswith("/"):
        return first
    lines = [first]
    while lines[-1].strip() != ".":
        try:
            lines.append(input("... "))
        except EOFError:
            break
    return "\n".join(lines[:-1] if lines[-1].strip() == "." else lines).strip("\n")


def interactive_loop(chat: Chat, multiline: bool = False) -> int:
    """The terminal REPL with readline editing and history. Ctrl-C stops a reply, clears a typed line,
    and at an empty prompt leaves, as Ctrl-D does."""
    try:
        import readline  # line editing and input history for input()
    except ImportError:
        readline = None
    while True:
        try:
            line = read_message(multiline)
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:
            print()
            if readline is not None and readline.get_line_buffer():
                continue  # a typed line is discarded, as in a shell
            return 0
        try:
            if not chat.handle(line):
                return 0
        except KeyboardInterrupt:  # outside a reply (e.g. while a prompt is rendered)
            print()


def piped_loop(chat: Chat, lines) -> int:
    """Each input line is a turn (commands included); only replies go to stdout."""
    for line in lines:
        if not chat.handle(line.rstrip("\r\n")):
            break
    return 0
