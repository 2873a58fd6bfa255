"""The chat REPL's /commands. The sampling commands, their /help lines and /settings are derived from
the one sampling schema (gpt2ft.sampling.OPTIONS: every option with a `command`), so an option added
there appears here with its range and help. No command error ends a chat: `Commands.handle` turns
any error into one line and puts the conversation back as it was before the command.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from . import sampling
from .errors import UserError

MAX_CONVERSATION_BYTES = 2**20  # /load: a conversation file of at most 1 MB (far more than any context holds)
MAX_SCHEMA_BYTES = 2**20  # /json FILE: a JSON schema of at most 1 MB (as generate --json-schema)
OTHER_COMMANDS = ("system", "undo", "retry", "save", "load", "json", "info", "settings", "memory", "refine",
                  "multi", "help")
NO_ARGUMENT = ("reset", "undo", "retry", "info", "settings", "memory", "help")  # an argument is a mistake
HELP = """commands:
  /quit, /exit         leave (also Ctrl-D, or Ctrl-C at the prompt)
  /reset               forget the conversation (the system prompt stays)
  /system [TEXT|none]  show, set or clear the system prompt
  /undo                remove the last exchange;  /retry  answer the last message again
  /save FILE  /load FILE   the conversation as `messages` JSON (trainable with `gpt2ft sft`; /load: at most 1 MB)
  /json [FILE|off]     every reply any JSON object, or valid against the JSON schema in FILE (at most 1 MB);
                       off: free text again
  /info  /settings  /memory   the model; sampling settings; what the conversation holds
  /refine [HOW]        ask the model to improve its last answer, and replace it
  /multi N TASK        a plan of N steps, then an answer to each step
  /help                this list
sampling (a command without a value shows it):
{sampling}
Ctrl-C stops a reply (it is kept, marked as cut). A message that starts with / is sent as //message."""


# ----- derived from the sampling schema ---------------------------------------------------------
def sampling_commands() -> dict[str, sampling.Option]:
    """REPL command -> schema option, for every option that has a command."""
    return {opt.command: opt for opt in sampling.OPTIONS.values() if opt.command}


def commands() -> tuple[str, ...]:
    return ("quit", "exit", "reset", *sampling_commands(), *OTHER_COMMANDS)


def shown(opt: sampling.Option, value) -> str:
    return opt.none if value is None and opt.none else str(value)


def help_text() -> str:
    rows = []
    for command, opt in sampling_commands().items():
        usage = f"/{command} {'N' if opt.kind is int else 'X'}" + (f"|{opt.none}" if opt.none else "")
        rows.append(f"  {usage:<20} {opt.name}: {opt.accepts}; {opt.help}")
    return HELP.format(sampling="\n".join(rows))


def describe_settings(settings) -> str:
    """One line: every option that has a command, with its value (and any --stop strings)."""
    parts = [f"{opt.name} {shown(opt, getattr(settings, opt.name, opt.default))}"
             for opt in sampling_commands().values()]
    if getattr(settings, "stop", None):
        parts.append(f"stop {settings.stop!r}")
    parts.append(f"output {describe_grammar(getattr(settings, 'grammar', None))}")
    return ", ".join(parts)


def describe_grammar(spec: sampling.GrammarSpec | None, width: int = 60) -> str:
    """What replies must match, in a few words: "free text", "any JSON object", "JSON schema {...}"."""
    if spec is None:
        return "free text"
    if spec.kind == "json":
        return "any JSON object"
    source = " ".join(spec.source.split())
    source = source if len(source) <= width else source[:width - 3] + "..."
    return {"json_schema": "JSON schema ", "regex": "regex ", "choice": "one of "}.get(spec.kind, f"{spec.kind} grammar ") \
        + source


def command_settings(settings) -> dict:
    """The values of the options a command sets (what a transcript records with each reply)."""
    return {opt.name: getattr(settings, opt.name, opt.default) for opt in sampling_commands().values()}


# ----- the commands -----------------------------------------------------------------------------
class Commands:
    """The /commands of Chat (a mixin: it uses the conversation's fields and its say/respond)."""

    def handle(self, line: str) -> bool:
        """One input line (a message or a /command); False when the user leaves. An error becomes
        one line and the conversation is what it was before the line."""
        if not line.strip():
            return True
        before = self.state()
        try:
            return self.dispatch(line)
        except Exception as e:  # noqa: BLE001 - no bad value, file or message ends the chat
            self.restore(before)
            what = str(e) if isinstance(e, (UserError, OSError)) else f"{type(e).__name__}: {e}"
            self.note(f"{what.splitlines()[0] if what else type(e).__name__}; nothing changed")
            return True

    def dispatch(self, line: str) -> bool:
        if not line.startswith("/") or line.startswith("//"):
            self.say(line[1:] if line.startswith("//") else line)  # // sends a message starting with /
            return True
        name, _, arg = line[1:].partition(" ")
        name, arg = name.lower(), arg.strip()
        if name in ("quit", "exit"):
            return False
        if name in sampling_commands():
            self.set_option(name, arg)
        elif name in NO_ARGUMENT and arg:
            self.note(f"/{name} takes no argument, not {arg!r} (nothing changed): type /{name} alone")
        elif name in commands():
            getattr(self, f"cmd_{name}")(arg)
        else:
            self.note(f"unknown command /{name} (nothing changed); commands: "
                      + " ".join("/" + c for c in commands()))
        return True

    def state(self) -> tuple:
        return ([dict(m) for m in self.messages], list(self.dropped), self.system)

    def restore(self, state: tuple) -> None:
        self.messages, self.dropped, self.system = state

    def set_option(self, command: str, arg: str) -> None:
        """/temp 0.5: the value checked by the schema (Option.parse_text); /tokens also against the context."""
        opt = sampling_commands()[command]
        if not arg:
            self.note(f"{opt.name} = {shown(opt, getattr(self.settings, opt.name, opt.default))}")
            return
        try:
            value = opt.parse_text(arg)
        except UserError as e:
            raise UserError(f"/{command}: {e}") from None
        if opt.name == "max_new_tokens" and value >= self.context:
            raise UserError(f"/{command}: max_new_tokens must be at most {self.context - 1} here (the model's "
                            f"context is {self.context} tokens and the prompt needs one), not {arg!r}")
        setattr(self.settings, opt.name, value)
        self.note(f"{opt.name} = {shown(opt, value)}")

    def cmd_help(self, arg: str) -> None:
        self.note(help_text())

    def cmd_settings(self, arg: str) -> None:
        self.note(describe_settings(self.settings))

    def cmd_reset(self, arg: str) -> None:
        self.messages, self.dropped = [], []
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
            if self.messages.pop()["role"] == "user":
                break
        self.note(f"(removed the last exchange; {len(self.messages)} messages left)")

    def cmd_retry(self, arg: str) -> None:
        if not self.messages:
            self.note("nothing to retry: send a message first")
            return
        if self.messages[-1]["role"] == "assistant":
            self.messages.pop()
        self.respond()

    def cmd_save(self, arg: str) -> None:
        """The conversation as a `messages` record, through the guarded writer: never over a file gpt2ft
        did not write, nor into a model or run folder; a file this chat saved earlier is replaced."""
        from .fileio import write_user_file

        if not arg:
            self.note("/save needs a file name, e.g. /save chat.json")
            return
        # every turn, those dropped from the context too; a cut reply stays as context but is not trained on
        head = [{"role": "system", "content": self.system}] if self.system else []
        convo = head + [{"role": m["role"], "content": m["content"], **({"weight": 0} if m.get("cut") else {})}
                        for m in self.dropped + self.messages]
        while convo and (convo[-1]["role"] != "assistant" or not convo[-1]["content"].strip() or "weight" in convo[-1]):
            convo.pop()  # sft trains on records that end with a whole reply that says something
        if not any(m["role"] == "assistant" for m in convo):
            self.note("nothing to save yet: no reply with text in the conversation")
            return
        row = {"messages": convo}
        path = Path(arg).expanduser()
        text = json.dumps(row, ensure_ascii=False) + "\n" if path.suffix == ".jsonl" else \
            json.dumps([row], ensure_ascii=False, indent=1) + "\n"
        try:
            write_user_file(path, text, overwrite=path.absolute() in self.saved, what="conversation",
                            overwrite_hint="remove it first (only a file this chat saved is replaced)")
        except UserError as e:
            raise UserError(f"/save: {e}") from None
        self.saved.add(path.absolute())
        self.note(f"(saved {len(convo)} messages to {path}; train on it with `gpt2ft sft MODEL --data {path}`)")

    def cmd_load(self, arg: str) -> None:
        if not arg:
            self.note("/load needs a file name, e.g. /load chat.json")
            return
        try:
            messages = read_conversation(Path(arg).expanduser())
        except UserError as e:
            raise UserError(f"/load: {e}") from None
        systems = [m["content"] for m in messages if m["role"] == "system"]
        self.system = "\n\n".join(systems) if systems else self.system
        self.messages = [m for m in messages if m["role"] != "system"]
        self.dropped = []
        self.note(f"(loaded {len(messages)} messages from {arg})")

    def cmd_json(self, arg: str) -> None:
        """/json: replies are any JSON object; /json FILE: valid against that schema; /json off: free text.
        The schema is read and compiled here, so a bad file is one line and changes nothing."""
        if arg.lower() == "off":
            self.settings.grammar = None
            self.note("(replies are free text)")
            return
        spec = sampling.GrammarSpec("json") if not arg else read_schema(Path(arg).expanduser())
        try:
            from .grammar import compile_grammar

            compile_grammar(spec, self.tokenizer, self.model.config.vocab_size)
        except UserError as e:
            raise UserError(f"/json: {arg + ': ' if arg else ''}{e}") from None
        self.settings.grammar = spec
        self.note(f"(every reply is {describe_grammar(spec)}; /json off for free text)")

    def cmd_info(self, arg: str) -> None:
        m, info = self.model, self.model_info
        p = m.lm_head.weight
        template = self.template.name + (" (the model has no saved template)" if self.untuned else "")
        rows = [("model", info.get("source", "?")), ("kind", info.get("kind", "?")),
                ("chosen", info.get("reason", "given on the command line")),
                ("parameters", f"{m.num_params():,} ({m.num_params() / 1e6:.1f}M)"),
                ("context", f"{self.context} tokens"), ("template", template),
                ("device", str(p.device)), ("dtype", str(p.dtype).removeprefix("torch."))]
        if info.get("lora"):
            rows.append(("lora", info["lora"]))
        self.note("\n".join(f"{k:<11}{v}" for k, v in rows))

    def cmd_memory(self, arg: str) -> None:
        ids, _ = self.render(self.conversation())
        turns = sum(m["role"] == "user" for m in self.messages)
        lines = [f"{turns} turns ({len(self.messages)} messages), {len(ids)} of {self.context} context tokens used "
                 f"(+ up to {self.settings.max_new_tokens} for the next reply)"
                 + ("; more than the context holds: the oldest turns are dropped at the next message"
                    if len(ids) + self.settings.max_new_tokens > self.context else ""),
                 f"system prompt: {self.system!r}" if self.system else "no system prompt"]
        if self.dropped:
            ends = self.dropped[:1] + self.dropped[1:][-1:]
            lines.append(f"dropped to fit the context: {len(self.dropped)} messages, from "
                         + " ... to ".join(_gist(m) for m in ends))
        else:
            lines.append("nothing dropped")
        if self.messages:
            lines.append("summary: " + " | ".join(_gist(m, 6) + (" (cut)" if m.get("cut") else "")
                                                 for m in self.messages))
        self.note("\n".join(lines))

    def cmd_refine(self, arg: str) -> None:
        if not self.messages or self.messages[-1]["role"] != "assistant":
            self.note("nothing to refine: /refine improves the last answer")
            return
        ask = "Improve your last answer" + (f": {arg}" if arg else ": make it clearer, more accurate and complete")
        reply = self.respond(extra=[{"role": "user", "content": ask}], keep=False)
        if reply is not None and reply.text.strip():
            self.messages[-1] = {"role": "assistant", "content": reply.text}  # whole: no longer cut
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
    found = [m.group(1).strip() for m in re.finditer(r"^\s*\d+\s*[.):-]\s*(\S.*)$", plan, re.M)]
    return (found + [f"step {i + 1} of the task" for i in range(len(found), n)])[:n]


def _gist(m: dict, words: int = 8) -> str:
    parts = m["content"].split()
    return f"{m['role']}: " + " ".join(parts[:words]) + (" ..." if len(parts) > words else "")


def read_schema(path: Path) -> sampling.GrammarSpec:
    """/json FILE: the JSON schema in FILE (at most MAX_SCHEMA_BYTES), as a grammar of the file's own text
    (the property order is the file's, as with `generate --json-schema`)."""
    from .fileio import read_user_text

    try:
        text = read_user_text(path, "JSON schema", MAX_SCHEMA_BYTES)
        schema = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"/json: {path}:{e.lineno}: malformed JSON schema ({e.msg})") from None
    except UserError as e:
        raise UserError(f"/json: {e}") from None
    if not isinstance(schema, (dict, bool)):
        raise UserError(f"/json: {path}: a JSON schema is an object such as {{\"type\": \"object\"}}, "
                        f"not a {type(schema).__name__}")
    return sampling.GrammarSpec("json_schema", text)


def read_conversation(path: Path) -> list[dict]:
    """The messages of a conversation file (at most MAX_CONVERSATION_BYTES): `[{"messages": [...]}]`,
    `{"messages": [...]}` or one JSONL row."""
    from .fileio import read_user_text

    text = read_user_text(path, "conversation", MAX_CONVERSATION_BYTES)
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
