"""The package's layers import downward only: no import cycle between maskgen's top-level parts, and the
models load without the training engine or the evaluations."""
import ast
import subprocess
import sys

from conftest import REPO

PACKAGE = REPO / "maskgen"
TOP = {"cli", "api", "demo", "__main__"}  # the top of the house may import anything


def import_graph() -> dict[str, set[str]]:
    """part -> the maskgen parts it imports (every import statement, inside functions too)."""
    parts = {p.stem for p in PACKAGE.iterdir() if p.suffix == ".py" or (p / "__init__.py").is_file()} - {"__init__"}
    graph: dict[str, set[str]] = {}
    for f in PACKAGE.rglob("*.py"):
        rel = f.relative_to(PACKAGE).with_suffix("").parts
        if rel[0] == "__init__":
            continue
        pkg = ["maskgen", *rel[:-1]]
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = pkg[: len(pkg) - node.level + 1] if node.level else []
                mods = [".".join(base + ([node.module] if node.module else [a.name for a in node.names][:1]))]
                if node.level and not node.module:
                    mods = [".".join(base + [a.name]) for a in node.names]
            elif isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            else:
                continue
            for m in mods:
                p = m.split(".")
                if p[0] == "maskgen" and len(p) > 1 and p[1] in parts and p[1] != rel[0]:
                    graph.setdefault(rel[0], set()).add(p[1])
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}

    def visit(u, path):
        state[u] = 1
        for v in sorted(graph.get(u, ())):
            if state.get(v) == 1:
                return path[path.index(v):] + [v] if v in path else [u, v]
            if v not in state:
                found = visit(v, path + [v])
                if found:
                    return found
        state[u] = 2
        return None

    for u in sorted(graph):
        if u not in state:
            found = visit(u, [u])
            if found:
                return found
    return None


def test_no_import_cycle_between_parts():
    graph = {u: {v for v in vs if v not in TOP} for u, vs in import_graph().items() if u not in TOP}
    assert graph["engine"] and "methods" not in graph["engine"]  # the graph is read, and the engine knows no method
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_models_import_without_engine_and_eval():
    code = "import sys, maskgen.models; print(sorted(m for m in sys.modules if m.startswith('maskgen.')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True).stdout
    loaded = {m.split(".")[1] for m in eval(out)}
    assert "models" in loaded and not loaded & {"engine", "eval", "methods", "config", "data", "cli", "api"}
