"""The package's layers: no import circles, and no import that climbs to a higher layer.

Every module under ``earlyexit/`` is parsed (not imported) and every ``import`` in it is
read, at module level and inside functions alike (a function-level import is still a
dependency; it only moves the failure to run time). The layer table below is the rule
docs/architecture.md draws; CONTRIBUTING.md points here.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "earlyexit"

# Lowest first: (rank, layer, modules, why). ``earlyexit.models.*`` is the package and every
# module in it; a name without ``*`` is that one module. A module may import its own layer
# and any layer of a lower rank; layers of the same rank are siblings and may not import
# each other. Every module must be in the table, so a new one gets a place on purpose.
LAYERS = [
    (
        0,
        "base",
        [
            "earlyexit.errors",
            "earlyexit.strict",
            "earlyexit.datafiles",
            "earlyexit.files",
            "earlyexit.plan",
            "earlyexit.config",
            "earlyexit.dtypes",
            "earlyexit.device",
            "earlyexit.progress",
            "earlyexit.tokenizer",
            "earlyexit.chat",
        ],
        "configs, the plan, errors, home() and atomic writes: what every layer shares",
    ),
    (
        1,
        "models",
        ["earlyexit.models.*"],
        "pure compute over a plan: knows config and torch, never a file format, strategy, "
        "request or training run",
    ),
    (
        2,
        "io",
        ["earlyexit.io.*"],
        "file formats build models from files and write them back, so they sit on models",
    ),
    (
        2,
        "decoding",
        ["earlyexit.decoding.*"],
        "strategies decide which rows run which steps of a model; they never read files",
    ),
    (
        3,
        "engine",
        ["earlyexit.engine.*"],
        "schedules requests over decoding's rules; no files, no training, no HTTP",
    ),
    (
        3,
        "training",
        ["earlyexit.training.*"],
        "trains models read and written through io (drafts decode through decoding); never serves",
    ),
    (
        4,
        "api",
        ["earlyexit", "earlyexit.api", "earlyexit.drafts"],
        "earlyexit.load: files, model, strategy and the draft that belongs to it, for callers",
    ),
    (
        5,
        "serve",
        ["earlyexit.serve.*"],
        "HTTP over the engine and earlyexit.load",
    ),
    (
        5,
        "evaluation",
        ["earlyexit.evaluation.*"],
        "measures what the library produces (quality metrics live here, benchmarks reuse them)",
    ),
    (6, "bench", ["earlyexit.bench.*"], "benchmarks measure everything below and write rows"),
    (7, "demo", ["earlyexit.demo.*"], "the main job: trains, benchmarks and reports"),
    (8, "cli", ["earlyexit.cli.*", "earlyexit.__main__"], "the commands a user types: the top"),
]


def modules(package: Path = PACKAGE) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package."""
    out = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package modules ``name`` imports anywhere in its file."""
    is_package = path.name == "__init__.py"
    here = name.split(".") if is_package else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # ``from earlyexit.io import registry`` imports the module earlyexit.io.registry
            targets = [
                f"{module}.{a.name}" if f"{module}.{a.name}" in known else module
                for a in node.names
            ]
        for target in targets:
            while target and target not in known:  # ``import a.b.c`` of a package's name
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    mods = modules(package)
    return {name: imports(name, path, set(mods)) for name, path in mods.items()}


def layer_of(module: str) -> tuple[int, str] | None:
    best = None
    for rank, layer, members, _ in LAYERS:
        for m in members:
            prefix = m.removesuffix(".*")
            hit = module == prefix or (m.endswith(".*") and module.startswith(prefix + "."))
            if hit and (best is None or len(prefix) > best[0]):
                best = (len(prefix), rank, layer)
    return None if best is None else best[1:]


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """One circle per strongly connected component of more than one module (Tarjan), as
    ``[a, b, ..., a]``."""
    index, low, stack, on_stack, sccs = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(g.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                sccs.append(comp)

    for v in sorted(g):
        if v not in index:
            visit(v)
    return [_circle(g, comp) for comp in sccs]


def _circle(g: dict[str, set[str]], comp: set[str]) -> list[str]:
    """A shortest way from the component's first module back to itself (breadth first)."""
    start = min(comp)
    came_from: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(g[v] & comp):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(came_from[path[-1]])
                    return [*path[::-1], start]
                if w not in came_from:
                    came_from[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no circle in {sorted(comp)}")


def upward(g: dict[str, set[str]]) -> list[str]:
    """Every import of a higher layer or of a sibling layer, as one line each."""
    out = []
    for src in sorted(g):
        s_rank, s_layer = layer_of(src)
        for dst in sorted(g[src]):
            d_rank, d_layer = layer_of(dst)
            if d_rank > s_rank or (d_rank == s_rank and d_layer != s_layer):
                out.append(f"{src} ({s_layer}) imports {dst} ({d_layer})")
    return out


def test_every_module_has_a_layer():
    missing = [m for m in modules() if layer_of(m) is None]
    assert not missing, f"not in tests/test_layering.py LAYERS: {missing}"


def test_no_import_circles():
    found = cycles(graph())
    assert not found, "import circles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_no_import_climbs_a_layer():
    found = upward(graph())
    assert not found, "imports against the layer order (tests/test_layering.py LAYERS):\n" + (
        "\n".join(found)
    )


def test_the_checks_see_a_circle_and_an_upward_import():
    """A compute module reaching for a file format (what issue 30 found) is both."""
    g = graph()
    assert "earlyexit.io.checkpoint" in g["earlyexit.io.registry"]  # imports are read
    assert "earlyexit.models.decoder" in g["earlyexit.io.checkpoint"]
    g["earlyexit.models.layers"] = g["earlyexit.models.layers"] | {"earlyexit.io.registry"}
    (circle,) = cycles(g)
    assert circle[0] == circle[-1] and "earlyexit.io.registry" in circle
    assert upward(g) == ["earlyexit.models.layers (models) imports earlyexit.io.registry (io)"]


def test_function_level_and_relative_imports_count(tmp_path):
    pkg = tmp_path / "earlyexit"
    (pkg / "models").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "models" / "__init__.py").write_text("")
    (pkg / "models" / "a.py").write_text("def f():\n    from earlyexit.io import b\n")
    (pkg / "models" / "c.py").write_text("from . import a\nfrom ..io.b import x\n")
    (pkg / "io").mkdir()
    (pkg / "io" / "__init__.py").write_text("")
    (pkg / "io" / "b.py").write_text("import earlyexit.models.a\n")
    g = graph(pkg)
    assert g["earlyexit.models.a"] == {"earlyexit.io.b"}
    assert g["earlyexit.models.c"] == {"earlyexit.models.a", "earlyexit.io.b"}
    assert g["earlyexit.io.b"] == {"earlyexit.models.a"}
    assert cycles(g) == [["earlyexit.io.b", "earlyexit.models.a", "earlyexit.io.b"]]
