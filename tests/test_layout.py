"""The package's layout: one folder per audience, every import arrow pointing down, no circle.

Every ``import`` in ``ernie_lab/`` (at the top of a module or inside a function: a lazy import is an arrow
too) is read with ``ast``, resolved to the module it names, and checked against the layer order below.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "ernie_lab"

# Bottom to top: a module may import from its own layer and the layers below it, never from above.
# The first layer is three modules at the package root that every folder may use.
LAYERS = [("errors", "atomic", "heap"), "model", "quant", "io", "train", "tiny", "analysis", "course"]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def resolve(importer: str, node: ast.ImportFrom) -> str:
    """The absolute module an ``ImportFrom`` reads from."""
    if node.level == 0:
        return node.module or ""
    is_package = MODULES[importer].name == "__init__.py"
    base = importer.split(".")
    base = base[: len(base) - node.level + (1 if is_package else 0)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(name: str) -> set[str]:
    """The ernie_lab modules that module ``name`` imports (``from pkg import submodule`` names the submodule)."""
    found = set()
    for node in ast.walk(ast.parse(MODULES[name].read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            source = resolve(name, node)
            for alias in node.names:
                found.add(f"{source}.{alias.name}" if f"{source}.{alias.name}" in MODULES else source)
    return {m for m in found if m == "ernie_lab" or m.startswith("ernie_lab.")}


GRAPH = {name: imports_of(name) for name in MODULES}


def layer(name: str) -> int:
    """The layer of a module: the folder (or top-level module) right under ernie_lab/."""
    top = name.split(".")[1]
    return next(i for i, entry in enumerate(LAYERS) if top == entry or top in entry)


def test_every_module_belongs_to_a_layer():
    names = {n for entry in LAYERS for n in ((entry,) if isinstance(entry, str) else entry)}
    outside = [m for m in MODULES if m != "ernie_lab" and m.split(".")[1] not in names]
    assert not outside, f"modules outside the layers {LAYERS}: {outside}"


def test_no_module_imports_the_top_level_package():
    """ernie_lab/__init__.py is the front door for users; inside the package every import names its module."""
    offenders = sorted(name for name, targets in GRAPH.items() if name != "ernie_lab" and "ernie_lab" in targets)
    assert not offenders, f"these import ernie_lab itself instead of the module they need: {offenders}"


@pytest.mark.parametrize("importer", sorted(m for m in MODULES if m != "ernie_lab"))
def test_every_import_points_down(importer):
    upward = sorted(t for t in GRAPH[importer] if t != "ernie_lab" and layer(t) > layer(importer))
    assert not upward, (f"{importer} (layer {LAYERS[layer(importer)]!r}) imports from a higher layer: "
                        f"{[(t, LAYERS[layer(t)]) for t in upward]}; the order is {LAYERS}")


def test_no_import_circle():
    """Depth-first search over the module graph; a back edge is a circle."""
    WHITE, GREY, BLACK = 0, 1, 2
    colour = dict.fromkeys(GRAPH, WHITE)
    circles = []

    def visit(name, path):
        colour[name] = GREY
        for target in sorted(GRAPH[name]):
            if target not in colour:
                continue
            if colour[target] == GREY:
                circles.append(path[path.index(target):] + [target])
            elif colour[target] == WHITE:
                visit(target, path + [target])
        colour[name] = BLACK

    for name in sorted(GRAPH):
        if colour[name] == WHITE:
            visit(name, [name])
    assert not circles, "import circles: " + "; ".join(" -> ".join(c) for c in circles)


def test_the_checker_sees_lazy_and_relative_imports():
    """The graph is not empty by accident: known arrows, lazy ones included, are found."""
    assert "ernie_lab.model.rope" in GRAPH["ernie_lab.model.attention"]
    assert "ernie_lab.io.processor" in GRAPH["ernie_lab.io.chat"]  # imported inside render_prompt
    assert "ernie_lab.quant" in GRAPH["ernie_lab.io.loading"]      # `from .. import quant`
    assert layer("ernie_lab.model.moe") < layer("ernie_lab.analysis.routing")
