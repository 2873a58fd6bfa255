"""The multi-turn chat behind `gpt2ft chat`: which model, the conversation, the REPL (its /commands
are in chat_commands).

A conversation is a list of {"role", "content"} messages (the `messages` format `sft` trains on),
rendered with the model's template on every turn (a model without one gets templates.pick_template's
fallback, as in the server). The completion engine keeps the conversation's KV cache between turns,
so a turn prefills only what changed since the last one.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from .chat_commands import Commands, command_settings, parse_steps, read_conversation  # noqa: F401
from .errors import UserError
from .sampling import SamplingConfig
from .templates import pick_template

KINDS = ("dpo", "sft", "finetune", "pretrain")  # preference order of auto-selection
KIND_NAMES = {"pretrained": "pretrain", **{k: k for k in KINDS}}
HUB_FALLBACK = "gpt2"
CUT_MARK = " [cut]"
EMPTY_MARK = "(the model ended its reply at once)"  # an empty reply, which would show as a blank line


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
CHAT_DEFAULTS = {"temperature": 0.7, "top_k": 40, "top_p": 0.9, "max_new_tokens": 150}  # chat's own defaults


def chat_settings(**values) -> SamplingConfig:
    """Chat's sampling settings: the schema's SamplingConfig with chat's defaults (CHAT_DEFAULTS)."""
    return SamplingConfig(**{**CHAT_DEFAULTS, **values})


def load_chat_model(ref: str, device, dtype, lora: str | None, verify: bool = True):
    """(loaded model, saved template or None): the checkpoint's template, or the adapter's with --lora."""
    from .checkpoint import load, read_meta, resolve
    from .templates import as_template

    loaded = load(ref, device=device, dtype=dtype, lora=lora, verify=verify)
    template = as_template(read_meta(resolve(lora, verify)).get("template")) if lora else None
    return loaded, template or loaded.template


def render(template, messages: list[dict], tokenizer) -> tuple[list[int], list[str]]:
    """Token ids of the conversation followed by the assistant's cue, and the stop strings: exactly the
    tokens SFT trains on (every reply ends with EOS), so the ids of earlier turns do not change when a
    turn is added and the kept cache stays valid."""
    from .data.sft import prompt_ids

    return prompt_ids(messages, template, tokenizer), list(template.stop)


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


class Transcript:
    """--transcript FILE: one JSON line per turn, appended to a new file or to a transcript gpt2ft wrote
    (its ledger entry is updated after each line); any other file, a folder, a model or run folder is
    refused when the chat starts. The file is created with the first line."""

    def __init__(self, path: str | Path, inputs=()):
        from .fileio import check_writable

        self.path = Path(path).expanduser()
        try:
            check_writable(self.path, overwrite=True, inputs=inputs, what="transcript")
        except UserError as e:
            raise UserError(f"--transcript: {e}") from None
        if self.path.is_file() and self.path.stat().st_size:
            with open(self.path, "rb") as f:
                first = f.readline()
            try:
                row = json.loads(first)
                ok = isinstance(row, dict) and "role" in row and "time" in row
            except ValueError:
                ok = False
            if not ok:
                raise UserError(f"--transcript {self.path} exists and is not a chat transcript; choose a new file")

    def write(self, row: dict) -> None:
        from .fileio import record_written, write_user_file

        line = json.dumps(row, ensure_ascii=False) + "\n"
        if not self.path.exists():
            write_user_file(self.path, line, what="transcript")
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line)
        record_written(self.path)


# ----- the conversation -----------------------------------------------------------------------
@dataclass
class Chat(Commands):
    """A conversation with one model: history, settings, commands (chat_commands) and replies.

    write(text) prints reply text; note(text) prints everything else (messages, command output).
    settings.stop holds the user's stop strings (--stop), used besides the template's.
    """

    model: object
    tokenizer: object
    template: object = None  # None: the model has no saved template (templates.pick_template's fallback)
    settings: SamplingConfig = field(default_factory=chat_settings)
    system: str | None = None
    write: object = None
    note: object = None
    transcript: Transcript | None = None
    verbose: bool = False
    model_info: dict = field(default_factory=dict)
    engine_options: dict = field(default_factory=dict)  # generation.Engine's speed options (compile, draft)
    # user/assistant turns (the system prompt is apart); a reply stopped with Ctrl-C carries "cut": True
    messages: list[dict] = field(default_factory=list)
    dropped: list[dict] = field(default_factory=list)  # turns that no longer fit the context
    last_reply: Reply | None = None

    def __post_init__(self):
        from .generation import Session
        from .speculative import make_engine

        self.write = self.write or (lambda text: print(text, end="", flush=True))
        self.note = self.note or (lambda text: print(text, flush=True))
        self.untuned = self.template is None
        self.template = pick_template(None, self.template)
        # keeps the conversation's KV cache
        self.engine = Session(self.model, self.tokenizer, make_engine(self.model, self.tokenizer, 1, **self.engine_options))
        self.context = self.model.config.block_size
        self.saved: set[Path] = set()  # files /save wrote in this chat (a later /save may replace them)
        self._told_dropping = False
        if self.settings.max_new_tokens >= self.context:  # e.g. the default 150 on a tiny model
            tokens = max(1, self.context // 2)
            self.note(f"(tokens per reply lowered from {self.settings.max_new_tokens} to {tokens}: the model's "
                      f"context is {self.context})")
            self.settings.max_new_tokens = tokens

    # ----- turns ------------------------------------------------------------------------------
    def render(self, messages: list[dict]) -> tuple[list[int], list[str]]:
        return render(self.template, messages, self.tokenizer)

    def conversation(self, start: int = 0) -> list[dict]:
        """The messages to render: the system prompt, then the turns (from turn `start`)."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + [{"role": m["role"], "content": m["content"]} for m in self.messages[start:]]

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
            self.messages.append({"role": "assistant", "content": reply.text,
                                  **({"cut": True} if reply.finish_reason == "cut" else {})})
        return reply

    def fit(self, extra: list[dict]):
        """(prompt ids, stops, max new tokens) with the fewest oldest turns dropped (whole exchanges)
        for the reply to fit; None (and a message) when even the system prompt and the newest message
        do not fit. The search renders from the newest turns back, so a long loaded conversation costs
        a few renders, not one per dropped turn."""
        keep = 2 if extra else 1  # the newest exchange (or user message) always stays
        starts, i = [0], 0  # where the kept turns may begin, oldest first; the last keeps only `keep`
        while len(self.messages) - i > keep:
            i += 2 if len(self.messages) - i - keep >= 2 and self.messages[i]["role"] == "user" else 1
            starts.append(i)
        rendered = {}

        def room(j: int) -> int:
            if j not in rendered:
                rendered[j] = self.render(self.conversation(starts[j]) + extra)
            return self.context - len(rendered[j][0])

        want, last = self.settings.max_new_tokens, len(starts) - 1
        if room(last) <= 0:  # refuse before dropping anything
            self.note(f"that message needs {self.context - room(last)} tokens with the conversation's template "
                      f"but the model's context is {self.context}: send a shorter one"
                      + (" or shorten the system prompt" if self.system else ""))
            return None
        if room(0) >= want or room(last) < want:  # nothing to drop; or answer as much as fits
            j = 0 if room(0) >= want else last
        else:  # room(lo) < want <= room(hi): gallop back from the newest turns, then bisect
            lo, hi, step = 0, last, 1
            while hi - step > lo:
                if room(hi - step) < want:
                    lo = hi - step
                    break
                hi, step = hi - step, step * 2
            while hi - lo > 1:
                mid = (lo + hi) // 2
                lo, hi = (lo, mid) if room(mid) >= want else (mid, hi)
            j = hi
        if starts[j]:
            self.drop(starts[j])
        ids, stops = rendered[j]
        return ids, stops, min(want, self.context - len(ids))

    def drop(self, n: int) -> None:
        """Move the n oldest turns to `dropped` (they no longer fit the context)."""
        self.dropped += self.messages[:n]
        del self.messages[:n]
        if not self._told_dropping:
            self._told_dropping = True
            self.note(f"(the conversation no longer fits the model's context of {self.context} tokens: "
                      "the oldest turns are dropped from now on; /memory lists them)")

    def generate(self, prompt_ids: list[int], stops: list[str], max_new: int) -> Reply:
        """Stream one reply to write(); Ctrl-C stops it and keeps what was written."""
        cfg = replace(self.settings, max_new_tokens=max_new, template_stop=stops)
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
        self.write((CUT_MARK if finish == "cut" else EMPTY_MARK if not text.strip() else "") + "\n")
        reply = Reply(text, finish or stream.finish_reason, len(prompt_ids), stream.completion_tokens,
                      stream.completion.cached_tokens, ttft, seconds, list(stream.completion.token_ids))
        if finish != "cut" and stream.completion.unmatched:
            self.note(f"(the reply reached its {max_new} tokens before its structured output was complete: "
                      "/tokens N raises the limit)")
        if self.verbose:
            ttft_text = f"{reply.ttft:.3f} s" if reply.ttft is not None else "-"
            c = stream.completion
            drafts = f", {c.accepted_drafts} of {c.drafted} drafted tokens accepted" if c.drafted else ""
            self.note(f"(time to first token {ttft_text}, {reply.tokens_per_s:.1f} tokens/s, "
                      f"{reply.completion_tokens} tokens, prompt {reply.prompt_tokens} tokens of which "
                      f"{reply.cached_tokens} cached{drafts}, {reply.finish_reason})")
        self.log({"role": "assistant", "content": reply.text, "finish_reason": reply.finish_reason,
                  "settings": command_settings(self.settings), "prompt_tokens": reply.prompt_tokens,
                  "completion_tokens": reply.completion_tokens, "cached_tokens": reply.cached_tokens,
                  "time_to_first_token_s": reply.ttft, "seconds": round(seconds, 4),
                  "tokens_per_s": round(reply.tokens_per_s, 2)})
        return reply

    def log(self, row: dict) -> None:
        """Append a turn to the transcript; a failed write stops the transcript, not the chat."""
        if self.transcript is None:
            return
        try:
            self.transcript.write({"time": round(time.time(), 3), **row})
        except (OSError, UserError) as e:
            self.note(f"(could not append to the transcript {self.transcript.path}: {e}; "
                      "the chat goes on without it)")
            self.transcript = None


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
