"""Imports run one way: model <- data <- engine/train <- inference/serve/evaluate <- bench <- commands.

Every module of crossvlm/ is parsed (nothing is imported) and every import in it is read, those inside
functions and under `if TYPE_CHECKING` included: a lazy import is still a dependency. A module may
import from its own layer or a lower one, never a higher one, and no chain of imports may come back
to where it started, between modules or between packages.
"""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "crossvlm"

LAYERS = (
    # 0, below the chain: what every layer may use. Errors, and the shipped stage YAMLs
    # (found by name; the train config reads them); sources.py, which says what a folder or id is.
    ("crossvlm.errors", "crossvlm.configs", "crossvlm.sources"),
    ("crossvlm.model",),
    # The readers, rendering, collation; `crossvlm data` (data/cli.py) and its loader benchmark
    # (data/bench.py) use only the data layer and the model's processor, so they stay here.
    ("crossvlm.data",),
    ("crossvlm.engine", "crossvlm.train"),
    # The product on top of the engine and the loop: the Python API (crossvlm.load in the package's
    # __init__, inference.py), the server, evaluation; the random base models (make_model.py, built
    # through train's constructors, used by the demo, the benchmarks and `crossvlm init`); the CPU demo
    # and the tiles learning check (tiles_check.py, built like the demo); the lmms-eval model (it wraps
    # inference and evaluate).
    ("crossvlm", "crossvlm.inference", "crossvlm.serve", "crossvlm.evaluate", "crossvlm.make_model",
     "crossvlm.demo", "crossvlm.tiles_check", "crossvlm.integrations"),
    ("crossvlm.bench",),
    # The console script and one module per subcommand: they may import anything.
    ("crossvlm.commands", "crossvlm.cli"),
)
"""The layers, lowest first; each names the packages and top-level modules in it."""


def module_files(package: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file under `package` (a package is its __init__)."""
    out = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, int]]:
    """(module imported, line) for every import in the file of the package's own modules.

    `from a.b import c` imports the module `a.b.c` when there is one, else (a name defined in `a.b`)
    `a.b`; relative imports are resolved against the file's package.
    """
    root = next(iter(modules)).split(".")[0]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                found.append((sub if sub in modules else base, node.lineno))
    return sorted({(m, line) for m, line in found if m == root or m.startswith(root + ".")}, key=lambda x: x[1])


def dynamic_importers(modules: dict[str, Path]) -> list[str]:
    """Modules that import by a computed name (`importlib.import_module`, `__import__`), which the
    walk cannot follow."""
    out = []
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call):
                f = node.func
                called = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", None)
                if called in ("import_module", "__import__"):
                    out.append(name)
                    break
    return out


def group_of(module: str, layers) -> str:
    """The entry of `layers` a module belongs to: the longest one that is it or a package above it
    (the root package's entry holds only its __init__, so a new top-level module must be placed)."""
    entries = [e for layer in layers for e in layer
               if module == e or ("." in e and module.startswith(e + "."))]
    if not entries:
        raise KeyError(module)
    return max(entries, key=len)


def check(package: Path, layers) -> list[str]:
    """Every problem with the package's imports against `layers`: modules in no layer, upward imports,
    circles among modules, circles among the layers' packages."""
    rank = {entry: i for i, layer in enumerate(layers) for entry in layer}
    modules = module_files(package)
    problems, module_graph, group_graph = [], {}, {}
    for name in modules:
        try:
            group_of(name, layers)
        except KeyError:
            problems.append(f"{name} is in no layer: add it to the table")
    for name, path in modules.items():
        module_graph[name] = set()
        for target, line in imports_of(name, path, modules):
            if target == name:
                continue
            module_graph[name].add(target)
            try:
                src, dst = group_of(name, layers), group_of(target, layers)
            except KeyError:
                continue  # reported above (or not a module of the package: the import itself fails)
            if rank[dst] > rank[src]:
                problems.append(f"{path.relative_to(package.parent)}:{line} imports {target} (layer {rank[dst]}, "
                                f"{dst}) from layer {rank[src]} ({src}): imports must run down the layers")
            if dst != src:
                group_graph.setdefault(src, set()).add(dst)
    for what, graph in (("modules", module_graph), ("packages", group_graph)):
        problems += [f"an import circle among {what}: {' -> '.join(c)}" for c in circles(graph)]
    return problems


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Import circles (each a list of names, every one importing the next, the first again last), one
    per edge that breaks it: found by graphlib, the last edge cut, until none is left."""
    graph = {k: set(v) for k, v in graph.items()}
    found = []
    while True:
        try:
            graphlib.TopologicalSorter(graph).prepare()
            return found
        except graphlib.CycleError as err:
            # graphlib lists a node before the one that depends on it: reversed, each imports the next
            cycle = list(reversed(err.args[1]))
            found.append(cycle)
            graph[cycle[-2]].discard(cycle[-1])


def test_crossvlm_imports_run_down_the_layers_without_circles():
    problems = check(PACKAGE, LAYERS)
    assert not problems, "\n".join(problems)


def test_only_the_console_script_imports_by_computed_name():
    """The walk cannot follow `importlib.import_module(name)`; the one place that does it is the top."""
    assert dynamic_importers(module_files(PACKAGE)) == ["crossvlm.cli"]
    assert group_of("crossvlm.cli", LAYERS) in LAYERS[-1]


def _write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "pkg"


TOY_LAYERS = (("pkg.low",), ("pkg.mid", "pkg.side"), ("pkg", "pkg.top"))
TOY = {"pkg/__init__.py": "", "pkg/low/__init__.py": "from pkg.low.a import A\n", "pkg/low/a.py": "A = 1\n",
       "pkg/low/b.py": "", "pkg/mid/__init__.py": "", "pkg/mid/x.py": "from pkg.low import A\nfrom ..low import b\n",
       "pkg/mid/w.py": "", "pkg/side/__init__.py": "", "pkg/side/y.py": "import pkg.mid.x\n", "pkg/side/z.py": "",
       "pkg/top.py": "def f():\n    from pkg.side import y\n"}


def test_the_check_passes_a_clean_package(tmp_path):
    assert check(_write(tmp_path, TOY), TOY_LAYERS) == []


@pytest.mark.parametrize("files, expected", [
    # an upward import inside a function, by absolute and by relative name, and one for type checkers only
    ({"pkg/low/a.py": "def f():\n    from pkg.top import f\n"}, "pkg/low/a.py:2 imports pkg.top (layer 2"),
    ({"pkg/low/b.py": "from .. import top\n"}, "pkg/low/b.py:1 imports pkg.top (layer 2"),
    ({"pkg/low/b.py": "import typing\nif typing.TYPE_CHECKING:\n    from pkg.mid import w\n"},
     "pkg/low/b.py:3 imports pkg.mid.w (layer 1"),
    # two modules of one package importing each other; two packages of one layer doing so through
    # different modules
    ({"pkg/low/b.py": "from pkg.low import a\n", "pkg/low/a.py": "def f():\n    import pkg.low.b\n"},
     "an import circle among modules: pkg.low."),
    ({"pkg/side/z.py": "", "pkg/mid/w.py": "from pkg.side import z\n"}, "an import circle among packages: pkg."),
    # a module nobody placed
    ({"pkg/new.py": ""}, "pkg.new is in no layer"),
])
def test_the_check_catches_each_kind_of_problem(tmp_path, files, expected):
    problems = check(_write(tmp_path, {**TOY, **files}), TOY_LAYERS)
    assert any(expected in p for p in problems), problems  # (an upward import closes circles too)
