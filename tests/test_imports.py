"""The package's import graph has no circle (module-level and function-level imports alike).

Built from the source with ``ast`` (nothing is imported): an edge A -> B for every ``import B``
/ ``from B import …`` / ``from . import B`` anywhere in A, except inside ``if TYPE_CHECKING:``.
``kernels`` must import nothing of ``clap_fast`` or ``export``, and ``clap_fast`` nothing of
``export``.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("clap_fast", "kernels", "export")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST, module: str, is_pkg: bool, known: set[str]) -> set[str]:
    """Modules of ours that ``module`` imports (resolved to the longest known name)."""
    found: set[str] = set()
    package = module if is_pkg else module.rpartition(".")[0]

    def resolve(name: str) -> str | None:
        while name and name not in known:
            name = name.rpartition(".")[0]
        return name or None

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*up, base] if base else up)
            # ``from pkg import sub`` is an edge to pkg.sub; ``from mod import name`` to mod
            subs = [f"{base}.{a.name}" for a in node.names]
            targets = [t if t in known else base for t in subs]
        else:
            targets = []
        for t in targets:
            r = resolve(t)
            if r is not None and r != module:
                found.add(r)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def import_graph() -> dict[str, set[str]]:
    files = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")]
    known = {_module_name(p) for p in files}
    graph = {}
    for p in files:
        name = _module_name(p)
        tree = ast.parse(p.read_text(), filename=str(p))
        graph[name] = _imports(tree, name, p.name == "__init__.py", known)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as a list of modules (first repeated at the end), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            # a package's __init__ importing its own submodules is not a circle: importing the
            # submodule runs the package first by design; skip edges submodule -> its package
            if n.startswith(m + "."):
                continue
            if state.get(m) == 1:
                return stack[stack.index(m) :] + [m]
            if m not in state and (found := dfs(m)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (found := dfs(n)):
            return found
    return None


# On-demand plugin loads: ``engines.select`` loads the runtime layer (exported ONNX / OpenVINO /
# int8 engines, which sit above ``export``) only when a caller asks for such an engine. The
# edge is real but one-way at import time; it is the only way into the runtime layer from the
# core (checked in test_layering). Known wart: engine selection could move above the model.
PLUGIN_EDGES = {("clap_fast.engines", "clap_fast.engine_runtimes")}


def test_no_import_circle():
    graph = import_graph()
    for a, b in PLUGIN_EDGES:
        graph[a].discard(b)
    cycle = _cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


# Modules that run exported graphs (the Triton server's engines, the CPU engines) sit above
# ``export``, which builds on the model; the rest of clap_fast must not import ``export``.
RUNTIME_LAYER = {"clap_fast.serve_models", "clap_fast.engine_runtimes"}


def test_layering():
    graph = import_graph()
    for mod, deps in graph.items():
        top = mod.split(".")[0]
        tops = {d.split(".")[0] for d in deps}
        if top == "kernels":
            assert tops <= {"kernels"}, f"{mod} imports {sorted(deps)}"
        if top == "clap_fast" and mod not in RUNTIME_LAYER:
            assert "export" not in tops, f"{mod} imports {sorted(deps)}"
        for dep in deps & RUNTIME_LAYER:
            assert (
                (mod, dep) in PLUGIN_EDGES
                or mod in RUNTIME_LAYER
                or top != "clap_fast"
                or (mod.startswith("clap_fast.serve"))
            ), f"{mod} imports the runtime layer ({dep}) outside the plugin edges"


def test_the_checker_finds_a_circle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
    graph = import_graph()
    assert "clap_fast.ops" in graph["clap_fast.htsat"]  # the graph sees real edges
    assert "kernels.mel_ref" in graph["clap_fast.ops"]
