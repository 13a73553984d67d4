"""The import graph of ``jaxrlhf/models`` (read from the source with ``ast``, nothing is imported).

* no cycle among the modules of ``jaxrlhf.models`` (every ``import`` statement counts, also function-local
  ones, so a circle cannot hide behind a deferred import);
* ``tensors.py`` and ``layers.py`` import no model family; the families import no ``hf.py``;
* ``hf.py`` imports the families at module top;
* nothing in the repository imports a private name (``_x``) from a ``jaxrlhf.models`` module.
"""

import ast
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
MODELS = REPO / "jaxrlhf" / "models"
PKG = "jaxrlhf.models"
FAMILIES = {"llama", "gpt2", "bert"}


def _modules() -> dict[str, pathlib.Path]:
    return {p.stem: p for p in sorted(MODELS.glob("*.py"))}


def _imports(path: pathlib.Path, names: set[str]) -> list[tuple[str, list[str], bool]]:
    """``(module, imported names, at module top)`` for every import of a ``jaxrlhf.models`` module in
    ``path``; ``module`` is a file stem of ``jaxrlhf/models`` (``__init__`` for the package itself)."""
    tree = ast.parse(path.read_text(), str(path))
    top = {id(n) for n in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            aliases = [a.name for a in node.names]
            if node.module == PKG:  # from jaxrlhf.models import llama / ModelConfig
                for a in aliases:
                    out.append((a if a in names else "__init__", [a], id(node) in top))
            elif node.module.startswith(PKG + "."):
                out.append((node.module.split(".")[2], aliases, id(node) in top))
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name == PKG:
                    out.append(("__init__", [], id(node) in top))
                elif a.name.startswith(PKG + "."):
                    out.append((a.name.split(".")[2], [], id(node) in top))
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {m: {dep for dep, _, _ in _imports(p, set(mods)) if dep != m} for m, p in mods.items()}


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle as a list of modules (first == last), or None; iterative three-colour DFS."""
    state: dict[str, int] = {}
    for root in graph:
        if state.get(root):
            continue
        stack = [(root, iter(sorted(graph[root])))]
        path = [root]
        state[root] = 1
        while stack:
            node, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                state[node] = 2
                stack.pop()
                path.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                stack.append((nxt, iter(sorted(graph.get(nxt, ())))))
                path.append(nxt)
    return None


def test_cycle_finder_finds_a_planted_cycle():
    """The checker itself: an independent hand-made graph with one known cycle, and one without."""
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) in (
        ["a", "b", "c", "a"], ["b", "c", "a", "b"], ["c", "a", "b", "c"])
    assert _find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_models_import_graph_is_acyclic():
    graph = _graph()
    assert {"hf", "tensors", "layers", "llama", "gpt2", "bert"} <= set(graph)
    assert _find_cycle(graph) is None, f"import cycle in jaxrlhf/models: {_find_cycle(graph)}"


@pytest.mark.parametrize("module", ["tensors", "layers", "config"])
def test_shared_modules_import_no_family(module):
    deps = _graph()[module]
    assert not deps & (FAMILIES | {"hf", "hub", "gguf", "reward_model", "__init__"}), deps


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_families_do_not_import_hf(family):
    deps = _graph()[family]
    assert "hf" not in deps and not deps & (FAMILIES - {family}), deps


def test_hf_imports_the_families_at_module_top():
    mods = _modules()
    imports = _imports(mods["hf"], set(mods))
    at_top = {m for m, _, top in imports if top}
    assert FAMILIES <= at_top, at_top
    local = [m for m, _, top in imports if not top]
    assert not local, f"function-local imports of jaxrlhf.models modules in hf.py: {local}"


def test_no_private_names_imported_from_models():
    mods = set(_modules())
    bad = []
    for path in sorted(p for d in ("jaxrlhf", "tests", "bench", "experiments") for p in (REPO / d).glob("**/*.py")):
        for module, names, _ in _imports(path, mods):
            bad += [f"{path.relative_to(REPO)}: {module}.{n}" for n in names if n.startswith("_")]
    assert not bad, bad
