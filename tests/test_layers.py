"""The package's structure: every module sits in a layer of docs/architecture.md's table, a layer imports
only from itself and below, no cycles (function-level imports included), no verb imports another, and
no function over 100 lines or module over 500."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import gpt2ft

ROOT = Path(gpt2ft.__file__).parent
ARCHITECTURE = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"
MAX_FUNCTION_LINES, MAX_MODULE_LINES = 100, 500


def _module_name(path: Path) -> str:
    parts = ["gpt2ft", *path.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def import_graph() -> dict[str, set[str]]:
    """module -> the gpt2ft modules it imports anywhere in its body."""
    modules = _modules()
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


def layer_table(text: str | None = None) -> dict[str, int]:
    """docs/architecture.md's layer table: entry (`data/` -> gpt2ft.data, `__init__` -> gpt2ft) -> layer."""
    table = {}
    for row in re.findall(r"^\| *(\d+)\. [^|]*\|([^|]*)\|", text or ARCHITECTURE.read_text(), re.M):
        for entry in re.findall(r"`([^`]+)`", row[1]):
            entry = entry.strip("/")
            table["gpt2ft" if entry == "__init__" else f"gpt2ft.{entry.replace('/', '.')}"] = int(row[0])
    return table


def layer_of(module: str, table: dict[str, int]) -> int | None:
    """The layer of the longest table entry that is the module or a package above it (`__init__`: only itself)."""
    owners = [e for e in table if module == e or (e != "gpt2ft" and module.startswith(e + "."))]
    return table[max(owners, key=len)] if owners else None


def layer_violations(graph: dict[str, set[str]], table: dict[str, int]) -> list[str]:
    unplaced = [m for m in sorted(graph) if layer_of(m, table) is None]
    if unplaced:
        return [f"{m} is in no layer: add it to the table in docs/architecture.md" for m in unplaced]
    return [f"{m} (layer {layer_of(m, table)}) imports {t} (layer {layer_of(t, table)})"
            for m in sorted(graph) for t in sorted(graph[m]) if layer_of(t, table) > layer_of(m, table)]


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


def oversized(modules: dict[str, Path]) -> list[str]:
    """Every module over MAX_MODULE_LINES lines and every function (methods, nested) over MAX_FUNCTION_LINES."""
    found = []
    for name, path in modules.items():
        text = path.read_text()
        if (lines := len(text.splitlines())) > MAX_MODULE_LINES:
            found.append(f"module {name}: {lines} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if (length := node.end_lineno - node.lineno + 1) > MAX_FUNCTION_LINES:
                    found.append(f"function {name}.{node.name} (line {node.lineno}): {length} lines")
    return found


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


def test_every_module_has_a_layer_and_imports_only_its_layer_and_below():
    problems = layer_violations(import_graph(), layer_table())
    assert not problems, "\n".join(problems)
    graph = import_graph()
    assert graph["gpt2ft.fileio"] <= {"gpt2ft.errors"} and graph["gpt2ft.lora"] <= {"gpt2ft.errors"}


def test_the_layer_table_places_the_leaves_and_the_surfaces():
    table = layer_table()
    for module in ("errors", "config", "runtime", "fileio", "argtypes", "sampling"):
        assert layer_of(f"gpt2ft.{module}", table) == 1, module
    assert layer_of("gpt2ft.data.preferences", table) == layer_of("gpt2ft.generation", table) == 4
    assert layer_of("gpt2ft.recipes", table) == layer_of("gpt2ft.train.loop", table) == 5
    for module in ("commands.sft", "chat", "serve", "cli"):
        assert layer_of(f"gpt2ft.{module}", table) == 6, module


def test_the_layer_check_names_an_unplaced_module_and_an_upward_import():
    graph, table = import_graph(), layer_table()
    assert layer_violations({**graph, "gpt2ft.newthing": set()}, table) == [
        "gpt2ft.newthing is in no layer: add it to the table in docs/architecture.md"]
    graph["gpt2ft.model"] = graph["gpt2ft.model"] | {"gpt2ft.serve"}
    assert layer_violations(graph, table) == ["gpt2ft.model (layer 2) imports gpt2ft.serve (layer 6)"]
    parsed = layer_table("| layer | modules |\n| --- | --- |\n| 1. leaves | `errors` `data/` |\n| 3. x | `__init__` |\n")
    assert parsed == {"gpt2ft.errors": 1, "gpt2ft.data": 1, "gpt2ft": 3}


def test_no_function_over_100_lines_and_no_module_over_500():
    found = oversized(_modules())
    assert not found, "over the limits:\n" + "\n".join(found)


def test_the_size_check_counts_def_and_module_lines(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES - 1))
    text = f"def fits():\n{body}\n\n\ndef over():\n{body}\n    return x0\n"
    text += "\n" * (MAX_MODULE_LINES - len(text.splitlines()))
    (tmp_path / "big.py").write_text(text)
    assert oversized({"m": tmp_path / "big.py"}) == ["function m.over (line 103): 101 lines"]
    (tmp_path / "big.py").write_text(text + "\n")
    assert oversized({"m": tmp_path / "big.py"}) == ["module m: 501 lines", "function m.over (line 103): 101 lines"]
