"""The import graph: no cycles (deferred imports inside functions count too), and the layers
of the design hold: backends/ knows arrays and devices and never imports the library above
it; core/ (the math) imports neither training nor sweeps; importing xpmlp imports no GPU,
cluster or peer library."""
import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def module_files():
    """Dotted module name (as installed: backends/ is xpmlp.backends) -> path."""
    found = {}
    for root, package in ((REPO / "xpmlp", "xpmlp"), (REPO / "backends", "xpmlp.backends")):
        for path in root.rglob("*.py"):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


def import_graph():
    """Module -> the project's modules it imports, anywhere in its body."""
    modules = module_files()
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                edges.update(a.name for a in node.names if a.name in modules)
            elif isinstance(node, ast.ImportFrom):
                base = package.split(".")
                base = base[:len(base) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    edges.add(sub if sub in modules else target)
        graph[name] = {e for e in edges if e in modules and e != name}
    return graph


def cycles(graph):
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_graph_sees_the_imports_it_should():
    graph = import_graph()
    assert "xpmlp.training.loop" in graph["xpmlp.training.train"]
    assert "xpmlp.rundir" in graph["xpmlp.training.train"]  # from .. import rundir
    assert "xpmlp.backends.numpy_step" in graph["xpmlp.backends.numpy_backend"]  # a deferred import


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_cycles_are_found():
    """The checker itself: a deferred import back makes a cycle."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_layers_point_one_way():
    graph = import_graph()
    for name, edges in graph.items():
        if name.startswith("xpmlp.backends"):
            assert all(e.startswith("xpmlp.backends") for e in edges), (name, edges)
        if name.startswith("xpmlp.core"):
            assert not any(e.startswith(("xpmlp.training", "xpmlp.sweep", "xpmlp.cli")) for e in edges), (name, edges)
        if name.startswith("xpmlp.training"):
            assert not any(e.startswith(("xpmlp.sweep", "xpmlp.cli")) for e in edges), (name, edges)
    assert not any(e.startswith("xpmlp.sweep") for e in graph["xpmlp.cli"] - {"xpmlp.sweep"}), \
        "the CLI reaches the sweep only through its package's interface"


def test_importing_xpmlp_imports_no_gpu_cluster_or_peer_library(tmp_path):
    code = ("import sys, xpmlp, xpmlp.cli, xpmlp.sweep, xpmlp.training.train, xpmlp.training.stack\n"
            "print(sorted(m for m in ('cupy', 'torch', 'ray', 'jax', 'array_api_compat', 'sklearn')\n"
            "             if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
