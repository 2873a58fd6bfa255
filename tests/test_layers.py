"""The package's import graph: no cycles (function-level imports included), and no verb imports another."""
from __future__ import annotations

import ast
from pathlib import Path

import gpt2ft

ROOT = Path(gpt2ft.__file__).parent


def _module_name(path: Path) -> str:
    parts = ["gpt2ft", *path.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the gpt2ft modules it imports anywhere in its body."""
    modules = {_module_name(p): p for p in ROOT.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = package
                for _ in range(max(node.level - 1, 0)):
                    base = base.rpartition(".")[0]
                base = ".".join(filter(None, [base if node.level else "", node.module or ""]))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            edges |= {t for t in targets if t in modules and t != name}
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path + [node, nxt]
            if nxt not in state and (found := visit(nxt, path + [node])):
                return found
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node, [])):
            return found[found.index(found[-1]):]
    return None


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle)


def test_the_cycle_check_finds_a_planted_cycle():
    graph = import_graph()
    graph["gpt2ft.fileio"] = graph["gpt2ft.fileio"] | {"gpt2ft.checkpoint"}  # checkpoint imports fileio
    assert find_cycle(graph) is not None


def test_no_verb_imports_another_verb_or_the_cli():
    graph = import_graph()
    verbs = {m for m in graph if m.startswith("gpt2ft.commands.")}
    for verb in verbs:
        assert not (graph[verb] & (verbs - {verb})), f"{verb} imports {graph[verb] & verbs}"
        assert "gpt2ft.cli" not in graph[verb], f"{verb} imports gpt2ft.cli"


def test_lower_layers_never_import_surfaces_or_recipes():
    graph = import_graph()
    high = {m for m in graph if m.startswith(("gpt2ft.commands", "gpt2ft.train", "gpt2ft.cli", "gpt2ft.chat",
                                               "gpt2ft.serve"))} | {"gpt2ft.objectives", "gpt2ft.evaluate"}
    for low in ("gpt2ft.fileio", "gpt2ft.errors", "gpt2ft.config", "gpt2ft.model", "gpt2ft.tokenizer",
                "gpt2ft.lora", "gpt2ft.losses", "gpt2ft.checkpoint", "gpt2ft.templates", "gpt2ft.generation"):
        assert not (graph[low] & high), f"{low} imports {graph[low] & high}"
    assert graph["gpt2ft.fileio"] <= {"gpt2ft.errors"} and graph["gpt2ft.lora"] <= {"gpt2ft.errors"}
