"""The package layers point one way: a module imports only from its own layer or below."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "dcjax"

# Lower number = lower layer. Packages of one layer do not import each other, except
# models -> clustering (the embeddings' L2 normalisation).
LAYERS = {
    "core": 0,
    "data": 1,
    "clustering": 1,
    "models": 1,
    "evaluation": 1,
    "methods": 2,
    "training": 3,
    "analysis": 4,
}
SAME_LAYER_ALLOWED = {("models", "clustering")}


def _dcjax_imports(path: pathlib.Path) -> set[str]:
    """The dcjax packages a module imports, at any depth (late imports count too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "dcjax" and len(parts) > 1 and parts[1] in LAYERS:
                found.add(parts[1])
    return found


@pytest.mark.parametrize("package", sorted(LAYERS))
def test_package_imports_only_its_layer_or_below(package):
    bad = []
    for path in sorted((ROOT / package).glob("*.py")):
        for target in _dcjax_imports(path) - {package}:
            lower = LAYERS[target] < LAYERS[package]
            if not lower and (package, target) not in SAME_LAYER_ALLOWED:
                bad.append(f"{path.relative_to(ROOT.parent)} imports dcjax.{target}")
    assert not bad, "imports against the layers:\n" + "\n".join(bad)


def test_every_package_has_a_layer():
    packages = {p.name for p in ROOT.iterdir() if (p / "__init__.py").exists()}
    assert packages == set(LAYERS)
