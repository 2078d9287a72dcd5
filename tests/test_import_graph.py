"""The package's layering, from every import statement in it (lazy ones inside functions too):

    bench, check, cli, plan, tune, fastpeft/__init__    (top)
    integrations, serving
    api                     public API: dispatch to methods and formats
    formats                 PEFT / AdapterHub files over one hardened reader/writer
    methods                 one package per method (lora, bottleneck, prompt) + shared rules
    ops                     torch ops (+ fake, autograd)
    kernels                 Triton kernels and launchers
    _version, backend, cuda_ext                   (bottom)

A module imports only from its own layer or lower ones; a method package (``methods.lora``,
``methods.bottleneck``, ``methods.prompt``) imports no other method package, and the shared
``methods`` modules import none; and no two modules import each other, directly or around
a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "fastpeft"
# Layer of a module: the first prefix that matches, lowest layer 0.
LAYERS = [
    (0, ("fastpeft._version", "fastpeft.backend", "fastpeft.cuda_ext")),
    (1, ("fastpeft.kernels",)),
    (2, ("fastpeft.ops",)),
    (3, ("fastpeft.methods",)),
    (4, ("fastpeft.formats",)),
    (5, ("fastpeft.api",)),
    (6, ("fastpeft.integrations", "fastpeft.serving")),
    (7, ("fastpeft.bench", "fastpeft.check", "fastpeft.check_cuda", "fastpeft.kernel_report", "fastpeft.cli",
         "fastpeft.plan", "fastpeft.tune")),
]
# The package root imports the public names of every layer.
ROOT_LAYER = 7
METHOD_PACKAGES = ("fastpeft.methods.lora", "fastpeft.methods.bottleneck", "fastpeft.methods.prompt")


def modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The fastpeft modules ``name`` imports (an imported name that is a module counts as that
    module, any other as its package)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("fastpeft"))
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            module = (f"{base}.{node.module}" if node.module else base) if node.level else node.module or ""
            if module == "fastpeft" or module.startswith("fastpeft."):
                for alias in node.names:
                    found.add(f"{module}.{alias.name}" if f"{module}.{alias.name}" in known else module)
    return found


def layer(name: str) -> int:
    if name == "fastpeft":
        return ROOT_LAYER
    for rank, prefixes in LAYERS:
        if any(name == p or name.startswith(f"{p}.") for p in prefixes):
            return rank
    raise AssertionError(f"{name} is in no layer: add it to LAYERS")


def method_package(name: str) -> str | None:
    return next((p for p in METHOD_PACKAGES if name == p or name.startswith(f"{p}.")), None)


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) & known.keys() for name, path in known.items()}


def test_imports_go_to_the_same_layer_or_lower():
    wrong = [f"{a} (layer {layer(a)}) imports {b} (layer {layer(b)})"
             for a, targets in graph().items() for b in targets if layer(b) > layer(a)]
    assert not wrong, "\n".join(sorted(wrong))


def test_methods_import_no_other_method():
    wrong = []
    for a, targets in graph().items():
        if not a.startswith("fastpeft.methods"):
            continue
        for b in targets:
            if method_package(b) and method_package(b) != method_package(a):
                wrong.append(f"{a} imports {b}")
    assert not wrong, "\n".join(sorted(wrong))


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
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

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    assert not _cycles(graph())


def test_the_checks_find_what_they_guard():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert layer("fastpeft.ops.lora_linear") < layer("fastpeft.methods.lora.layer") < layer("fastpeft.formats.peft")
    assert method_package("fastpeft.methods.lora.targets") == "fastpeft.methods.lora"
    assert method_package("fastpeft.methods.state") is None
    edges = graph()
    assert "fastpeft.methods.lora.layer" in edges["fastpeft.methods.lora.model"]  # a module found by name
    assert "fastpeft.formats.peft" in edges["fastpeft.api.adapters"]  # "from fastpeft.formats import peft as ..."
