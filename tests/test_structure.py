"""The package's shape: layers whose imports point one way, with nothing hidden inside functions.

Read with `ast`, not by importing, so an import placed inside a function counts as much as one at
the top of a module (that is where import cycles hide).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "tracelib"

# Each layer imports only from layers below it. Within the base layer modules may use each other
# (acyclically); a step imports no other step; a use of traces imports no other use (a package's
# own modules excepted). See STYLE.md's layout section.
LAYERS = {
    "base": {
        "_version",
        "alignment",
        "answers",
        "batching",
        "folders",
        "formats",
        "forward",
        "identity",
        "lean_processing",
        "models",
        "notebook",
        "plotting",
        "projections",
        "reference_format",
        "rows",
        "smollm2",
        "stats",
        "tiny_arith",
    },
    "steps": {"margin", "lens", "attribution", "heads", "positions"},
    "trace": {"trace"},
    "uses": {"reference", "compare", "ood", "patching", "routes"},
    "studies": {"studies"},  # many traces at once: runs uses of traces over prompt sets
    "top": {"shortcuts", "widgets", "__main__"},
    "package": {""},  # tracelib/__init__.py gathers the public API from every layer
}
RANK = {layer: i for i, layer in enumerate(LAYERS)}
# Third-party imports that may wait inside a function: optional extras (circuitsvis, playwright,
# accelerate, gguf, Colab), and the libraries whose import alone takes seconds (TransformerLens,
# transformers, the Hub, tokenizers), so `import tracelib` and `python -m tracelib --help` stay quick.
LAZY_OK = {
    "accelerate",
    "circuitsvis",
    "fcntl",
    "gguf",
    "google",
    "huggingface_hub",
    "playwright",
    "tokenizers",
    "transformer_lens",
    "transformers",
}
MAX_LINES = 850


def modules() -> dict[str, Path]:
    """'' for the package itself, 'patching' for a subpackage, 'patching.exact' for its modules."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = modules()


def top(name: str) -> str:
    """The top-level module a (sub)module belongs to: `patching.exact` -> `patching`."""
    return name.split(".")[0]


def imports(path: Path) -> list[tuple[str, bool, int]]:
    """(imported module, inside a function?, line) for every import in the file."""
    tree = ast.parse(path.read_text())
    inside: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            inside.update(id(sub) for sub in ast.walk(node) if sub is not node)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, id(node) in inside, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.module, id(node) in inside, node.lineno))
            if node.module == "tracelib":  # from tracelib import plotting
                found += [(f"tracelib.{alias.name}", id(node) in inside, node.lineno) for alias in node.names]
    return found


def internal_edges() -> dict[str, set[str]]:
    """module -> the tracelib modules it imports (anywhere in the file)."""
    edges: dict[str, set[str]] = {}
    for name, path in MODULES.items():
        targets = set()
        for module, _, _ in imports(path):
            if module.startswith("tracelib."):
                target = module.removeprefix("tracelib.")
                if target in MODULES and target != name:
                    targets.add(target)
        edges[name] = targets
    return edges


def layer_of(name: str) -> str:
    for layer, members in LAYERS.items():
        if top(name) in members:
            return layer
    raise AssertionError(f"tracelib/{name} is in no layer: add it to LAYERS (and to STYLE.md's layout)")


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
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

    for v in edges:
        if v not in index:
            visit(v)
    return found


def test_there_is_no_import_cycle_counting_imports_inside_functions():
    assert cycles(internal_edges()) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize("name", sorted(MODULES))
def test_every_import_points_down_a_layer(name):
    mine = layer_of(name)
    for target in internal_edges()[name]:
        theirs = layer_of(target)
        same_package = top(target) == top(name)
        ok = RANK[theirs] < RANK[mine] or same_package or (mine == theirs == "base")
        assert ok, f"tracelib/{name} ({mine}) imports tracelib/{target} ({theirs}), which is not below it"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_inside_functions_are_only_optional_or_slow_third_party_ones(name):
    for module, inside, line in imports(MODULES[name]):
        if not inside:
            continue
        assert not module.startswith("tracelib"), f"tracelib/{name}:{line} imports {module} inside a function"
        assert module.split(".")[0] in LAZY_OK, (
            f"tracelib/{name}:{line} imports {module} inside a function; import it at the top of the module"
        )


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_module_is_much_over_800_lines(name):
    n = len(MODULES[name].read_text().splitlines())
    assert n <= MAX_LINES, f"tracelib/{name} is {n} lines; split it by job"


def test_no_module_is_named_for_nothing():
    assert not {"utils", "helpers", "misc", "common"} & {top(name) for name in MODULES}
