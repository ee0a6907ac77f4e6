"""The package's layering, read from the source (ast; nothing is imported or run): no import circle
in melama_mcore, and no import from a lower layer to a higher one. The layers are declared once,
here; the README's "Architecture" section describes them, and names and explains each allowed
exception (ALLOWED_UPWARD)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "melama_mcore"

# Lowest first. A room is a file or a folder of melama_mcore; a file may import from its own layer
# and the layers below it.
LAYERS = [
    ("foundation", ["__init__.py", "errors.py", "logs.py", "output_paths.py", "kernels"]),
    ("config", ["config"]),
    ("infrastructure", ["distributed", "data", "components", "cli.py"]),
    ("models", ["models"]),
    ("strategies", ["strategies"]),
    ("checkpoint", ["checkpoint"]),
    ("runtime", ["startup.py", "step.py"]),
    ("ready model", ["ready_model.py"]),
    ("programs", ["train.py", "eval", "logits.py", "report"]),
    ("commands", ["commands", "demo"]),
]
# (importing file, imported module): upward imports the README's Architecture section explains.
ALLOWED_UPWARD: set[tuple[str, str]] = set()


def rel(path: Path) -> str:
    return path.relative_to(PACKAGE).as_posix()


def layer_of(path: str) -> int:
    for index, (_, rooms) in enumerate(LAYERS):
        if any(path == room or path.startswith(room + "/") for room in rooms):
            return index
    raise AssertionError(f"melama_mcore/{path} is in no layer: add its room to LAYERS (and to the README)")


def module_file(module: str) -> str | None:
    """The package file a module name stands for (None: not a melama_mcore module)."""
    parts = module.split(".")
    if parts[0] != "melama_mcore":
        return None
    base = PACKAGE.joinpath(*parts[1:])
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return rel(candidate)
    return None


def imports(path: Path) -> set[str]:
    """The package files a file imports, at any depth (functions and TYPE_CHECKING blocks included):
    `from a.b import c` is a.b.c when that is a module, else a.b."""
    package = ".".join(("melama_mcore", *path.relative_to(PACKAGE).parent.parts))
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:  # relative: from the importing file's package
                module = ".".join([*package.split(".")[: len(package.split(".")) - node.level + 1], module]).strip(".")
            names = [f"{module}.{alias.name}" if module_file(f"{module}.{alias.name}") else module
                     for alias in node.names]
        else:
            continue
        found.update(f for f in map(module_file, names) if f is not None)
    found.discard(rel(path))
    return found


def graph() -> dict[str, set[str]]:
    return {rel(p): imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


def test_no_import_from_a_lower_layer_to_a_higher_one():
    upward = []
    for importer, imported in graph().items():
        for target in sorted(imported):
            if layer_of(target) > layer_of(importer) and (importer, target) not in ALLOWED_UPWARD:
                upward.append(f"{importer} ({LAYERS[layer_of(importer)][0]}) imports {target} "
                              f"({LAYERS[layer_of(target)][0]})")
    assert not upward, "imports against the layering:\n" + "\n".join(upward)


def test_no_import_circle():
    edges = graph()
    circles, state = [], {}  # state: 1 on the current path, 2 done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                circles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not circles, "import circles:\n" + "\n".join(circles)


def test_the_check_sees_imports():
    """The reader finds what a file imports, so that the tests above can fail."""
    edges = graph()
    assert "models/llama/lora_tensors.py" in edges["strategies/lora.py"]
    assert "models/llama/lora.py" in edges["strategies/lora.py"]  # imported inside a function
    assert "checkpoint/convert.py" in edges["eval/model_source.py"]
    assert layer_of("commands/convert.py") > layer_of("checkpoint/convert.py") > layer_of("strategies/full.py")
