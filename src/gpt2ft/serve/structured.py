"""Structured outputs: the request fields that constrain a reply (OpenAI's response_format and forced
tool calls, vLLM's guided_* and structured_outputs) as one GrammarSpec for the engine; and a forced
tool call's output as OpenAI's message.tool_calls.

A forced call to one function generates its arguments, constrained to the function's `parameters`
schema. "required" with several tools generates {"name": ..., "arguments": ...}, an anyOf with one
branch per tool (the name a const, the arguments that tool's schema), so the arguments always
validate against the chosen tool's schema. A reply makes at most one call.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from ..errors import UserError
from ..grammar import GrammarState, compile_grammar, new_bitmask
from ..sampling import GrammarSpec
from .responses import APIError

NO_ARGUMENTS = {"type": "object", "properties": {}, "additionalProperties": False}  # OpenAI: no `parameters`


@dataclass(frozen=True)
class Constraint:
    """What a request's reply must match: the grammar, the field that asked for it (named in errors),
    and for a forced tool call the functions it may call."""

    field: str
    spec: GrammarSpec | None  # None: nothing constrains the reply, but `checks` are still checked
    tools: tuple = ()
    checks: tuple = ()  # (field, spec) of schemas the request gives that must be valid too (every tool's)

    def check(self, tokenizer, vocab_size: int) -> None:
        """Compile the grammars now and compute a first mask, so a malformed (or too complex) schema,
        regex or grammar is a 400 naming its field, not a failure of the whole decoding batch."""
        for field, spec in ((self.field, self.spec), *self.checks):
            if spec is None:
                continue
            try:
                compile_grammar(spec, tokenizer, vocab_size)
                GrammarState(spec, tokenizer, vocab_size).fill_mask(new_bitmask(1, vocab_size), 0)
            except UserError as e:
                raise APIError(400, f"{field}: {e}", field) from None


def _spec(field: str, build, *args) -> tuple[str, GrammarSpec]:
    try:
        return field, build(*args)
    except UserError as e:
        raise APIError(400, f"{field}: {e}", field) from None


def _grammar(text: str) -> GrammarSpec:
    """vLLM's guided_grammar: GBNF when it has GBNF's `::=`, else Lark (vLLM tells them apart so too)."""
    return GrammarSpec("gbnf" if "::=" in text else "lark", text)


def _requested(req) -> list[tuple[str, GrammarSpec]]:
    """(field, grammar) for every field of the request that constrains the reply."""
    out = []
    fmt = req.response_format
    if fmt is not None and fmt.type == "json_object":
        out.append(_spec("response_format", GrammarSpec, "json"))
    elif fmt is not None and fmt.type == "json_schema":
        schema = fmt.json_schema.schema_
        out.append(_spec("response_format.json_schema.schema", GrammarSpec.json_schema, schema) if schema is not None
                   else _spec("response_format", GrammarSpec, "json"))
    so = req.structured_outputs
    for field, value, build in (
            ("guided_json", req.guided_json, GrammarSpec.json_schema),
            ("guided_regex", req.guided_regex, lambda v: GrammarSpec("regex", v)),
            ("guided_choice", req.guided_choice, GrammarSpec.choice),
            ("guided_grammar", req.guided_grammar, _grammar),
            ("structured_outputs.json", so and so.json_, GrammarSpec.json_schema),
            ("structured_outputs.regex", so and so.regex, lambda v: GrammarSpec("regex", v)),
            ("structured_outputs.choice", so and so.choice, GrammarSpec.choice),
            ("structured_outputs.grammar", so and so.grammar, _grammar),
            ("structured_outputs.json_object", so and so.json_object or None, lambda v: GrammarSpec("json"))):
        if value is not None:
            out.append(_spec(field, build, value))
    return out


def constraint(req, template_name: str) -> Constraint | None:
    """The one constraint of a request (a 400 naming the fields when it has several), or None."""
    found = [Constraint(field, spec) for field, spec in _requested(req)]
    tool = _tool_constraint(req, template_name)
    if tool is not None and tool.spec is not None:
        found.append(tool)
    if len(found) > 1:
        fields = [c.field for c in found]
        if len({f.split(".")[0] for f in fields}) == len(fields):  # the top-level names tell them apart
            fields = [f.split(".")[0] for f in fields]
        raise APIError(400, f"{' and '.join(fields)} each constrain the reply: send at most one of them",
                       found[1].field)
    if tool is not None and tool.spec is None:  # tool_choice "none": the tools are still checked
        return replace(found[0], checks=tool.checks) if found else tool
    return found[0] if found else None


def _tool_constraint(req, template_name: str) -> Constraint | None:
    tools = getattr(req, "tools", None) or []
    choice = getattr(req, "tool_choice", None)
    if not tools:
        if choice not in (None, "none"):
            raise APIError(400, "tool_choice needs `tools`: the functions the reply may call", "tool_choice")
        return None
    names = [t.function.name for t in tools]
    if len(set(names)) < len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise APIError(400, f"tools: the function name {dup!r} is given twice", "tools")
    checks = tuple(_spec(f"tools[{i}].function.parameters", GrammarSpec.json_schema, _parameters(t.function))
                   for i, t in enumerate(tools))
    choice = choice or "auto"  # OpenAI's default with tools
    if choice == "none":
        return Constraint("tools", None, checks=checks)
    if choice == "auto":
        raise APIError(400, f"tool_choice \"auto\": the model's template ({template_name}) defines no tool-call "
                       "format, so a call cannot be told from text; send tool_choice \"required\", "
                       "{\"type\": \"function\", \"function\": {\"name\": ...}} or \"none\"", "tool_choice")
    chosen = [t.function for t in tools]
    if choice != "required":
        chosen = [f for f in chosen if f.name == choice.function.name]
        if not chosen:
            raise APIError(400, f"tool_choice names the function {choice.function.name!r}, which is not in "
                           f"tools ({', '.join(names)})", "tool_choice")
    if len(chosen) == 1:
        return Constraint("tools", _spec("tools", GrammarSpec.json_schema, _parameters(chosen[0]))[1], tuple(chosen),
                          checks)
    branches = [{"type": "object", "required": ["name", "arguments"], "additionalProperties": False,
                 "properties": {"name": {"const": f.name},
                                "arguments": _moved(_parameters(f), f"/anyOf/{i}/properties/arguments")}}
                for i, f in enumerate(chosen)]
    schema = {"anyOf": branches}
    return Constraint("tools", _spec("tools", GrammarSpec.json_schema, schema)[1], tuple(chosen), checks)


def _moved(schema, path: str):
    """A schema placed at JSON pointer `path` of another: its own local references ("#/$defs/X", "#")
    made to point where they now are."""
    if isinstance(schema, list):
        return [_moved(v, path) for v in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _moved(v, path) for k, v in schema.items()}
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#"):
        out["$ref"] = "#" + path + ref[1:]
    return out


def _parameters(function) -> dict:
    return function.parameters if function.parameters is not None else NO_ARGUMENTS
