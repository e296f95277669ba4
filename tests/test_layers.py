"""Architecture rules of ``shusheng``, read from the source with ``ast`` (nothing is imported).

The rules and the layer table are those of design.md (``shared/design.md``), section "Layers":

* a module imports only from its own layer or below (every import counts: module-level, function-local,
  under ``TYPE_CHECKING``, ``importlib.import_module("shusheng.x")`` and string tables of module names such
  as the CLI's ``name -> (module, help)`` table);
* no import cycles between shusheng modules; only imports that run when a module is imported count (module
  level or class bodies, not inside functions and not under ``if TYPE_CHECKING:``), since function-local
  imports are how the package stays lazy;
* ``bench/`` and ``demos/`` use public APIs only: they never import ``shusheng.train``;
* command modules (any ``cli.py``, and the ``*_cli.py`` shims) are entry points, layer 6 wherever they live,
  and leaves: only the command table and modules of their own package import them;
* every top-level ``shusheng.*`` module or package is classified in ``LAYERS``: a new one fails here until it
  is added deliberately.

Module granularity: ``shusheng/a/b.py`` is ``shusheng.a.b``; importing a package means its ``__init__``;
``from shusheng.a import b`` means ``shusheng.a.b`` when that module exists, else ``shusheng.a``.
"""

from __future__ import annotations

import ast
import textwrap
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "shusheng"
SCRIPT_DIRS = ("bench", "demos")  # outside the package, layer 6; scanned when present

# The layer table of design.md (shared/design.md, "Layers", bottom to top), keyed by top-level module or
# package of shusheng. Keep it in step with design.md. `shusheng/__init__.py` itself is layer 1 (and stays
# light: tests/test_import_light.py).
LAYERS: dict[int, tuple[str, tuple[str, ...]]] = {
    1: ("base", ("ops", "data", "_config", "_deps", "_cache", "weights")),
    2: ("building blocks", ("backbone", "modeling", "text_encoders")),
    3: ("models", ("miniclip", "uniperceiver", "detection", "llm", "generation")),
    4: ("pipelines", ("pipelines", "runtimes")),
    5: ("applications", ("retrieval_index", "deploy")),
    6: ("entry points", ("cli", "apps", "train", "__main__")),
}
PACKAGE_LAYER = 1  # shusheng/__init__.py
FAMILY_LAYER = 3  # model families: each family's `pipelines.py` sits in PIPELINES_LAYER
PIPELINES_LAYER = 4
# Command modules (`cli.py`, and the `*_cli.py` shims the command table points at) are entry points wherever
# they live (`shusheng/ops/cli.py`, `shusheng/uniperceiver/cli.py`, ...).
ENTRY_POINT_LAYER = 6
# A command module is a leaf: only the command table (and shims in its own package) import it. Helpers that
# others need belong in the package proper, not in its cli.py.
COMMAND_TABLES = ("shusheng.cli", "shusheng.__main__")
SCRIPTS_MUST_NOT_IMPORT = ("shusheng.train",)

TOP_LAYER = {name: layer for layer, (_, names) in LAYERS.items() for name in names}


@dataclass(frozen=True)
class Import:
    file: str  # path relative to the scanned root
    line: int
    source: str | None  # importing module (None for bench/ and demos/ scripts)
    target: str  # imported shusheng module
    kind: str  # "module-level", "function-local", "TYPE_CHECKING", "string"
    call: str = ""  # "import_module" for importlib.import_module/__import__ calls

    @property
    def runtime(self) -> bool:
        """Runs when the importing module is imported (counts for cycles)."""
        return self.kind == "module-level"

    def describe(self) -> str:
        how = f"{self.kind} {self.call}".strip() if self.call else self.kind
        return f"{self.file}:{self.line} imports {self.target} ({how})"


@dataclass(frozen=True)
class Violation:
    rule: str  # "unknown", "cycle", "layer", "scripts", "entry-point"
    file: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: [{self.rule}] {self.message}"


# ------------------------------------------------------------------------------------------------------------
# Reading imports
# ------------------------------------------------------------------------------------------------------------

def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _py_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*.py") if "__pycache__" not in p.parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _is_import_module_call(node: ast.Call) -> bool:
    f = node.func
    return (isinstance(f, ast.Attribute) and f.attr == "import_module"
            and isinstance(f.value, ast.Name) and f.value.id == "importlib") or (
        isinstance(f, ast.Name) and f.id in ("import_module", "__import__"))


class _Collector(ast.NodeVisitor):
    def __init__(self, file: str, source: str | None, package: str | None, modules: set[str]):
        self.file, self.source, self.package, self.modules = file, source, package, modules
        self.deferred = 0  # inside a function body
        self.type_only = 0  # inside `if TYPE_CHECKING:`
        self.found: list[Import] = []

    # --- context --------------------------------------------------------------------------------------------
    def _kind(self) -> str:
        if self.deferred:
            return "function-local"
        return "TYPE_CHECKING" if self.type_only else "module-level"

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        for expr in [*node.decorator_list, node.args, node.returns]:  # evaluated at definition time
            if expr is not None:
                self.visit(expr)
        self.deferred += 1
        for stmt in node.body:
            self.visit(stmt)
        self.deferred -= 1

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Lambda(self, node: ast.Lambda) -> None:
        self.visit(node.args)
        self.deferred += 1
        self.visit(node.body)
        self.deferred -= 1

    def visit_If(self, node: ast.If) -> None:
        if not _is_type_checking(node.test):
            self.generic_visit(node)
            return
        self.type_only += 1
        for stmt in node.body:
            self.visit(stmt)
        self.type_only -= 1
        for stmt in node.orelse:  # the `else:` of `if TYPE_CHECKING:` runs
            self.visit(stmt)

    # --- imports --------------------------------------------------------------------------------------------
    def _add(self, node: ast.AST, target: str | None, *, kind: str | None = None, call: str = "") -> None:
        if target is None or not (target == PACKAGE or target.startswith(PACKAGE + ".")):
            return
        imp = Import(self.file, node.lineno, self.source, target, kind or self._kind(), call)
        if imp not in self.found:  # `from x import a, b` is one import of x
            self.found.append(imp)

    def _relative(self, level: int, name: str | None, package: str | None = None) -> str | None:
        """``from .name import ...`` (``level`` dots) resolved against the importing module's package."""
        package = package or self.package
        if package is None:  # relative imports in bench/ and demos/ scripts do not reach shusheng
            return None
        parts = package.split(".")
        if level - 1 >= len(parts):
            return None
        base = ".".join(parts[: len(parts) - (level - 1)])
        return f"{base}.{name}" if name else base

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(node, alias.name)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = self._relative(node.level, node.module) if node.level else node.module
        if base is None:
            return
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            self._add(node, sub if sub in self.modules else base)

    def visit_Call(self, node: ast.Call) -> None:
        first = node.args[0] if node.args else None
        if not (_is_import_module_call(node) and isinstance(first, ast.Constant)
                and isinstance(first.value, str)):
            self.generic_visit(node)
            return
        name = first.value
        if name.startswith("."):  # importlib.import_module(".x", package=...)
            pkg = node.args[1] if len(node.args) > 1 else next(
                (k.value for k in node.keywords if k.arg == "package"), None)
            package = None
            if isinstance(pkg, ast.Constant) and isinstance(pkg.value, str):
                package = pkg.value
            elif isinstance(pkg, ast.Name) and pkg.id in ("__package__", "__name__"):
                package = self.package if pkg.id == "__package__" else self.source
            level = len(name) - len(name.lstrip("."))
            name = self._relative(level, name[level:] or None, package) if package else None
        self._add(node, name, call="import_module")
        for child in [node.func, *node.args[1:], *node.keywords]:  # not the name: no "string" duplicate
            self.visit(child)

    def visit_Constant(self, node: ast.Constant) -> None:
        # string tables of module names (CLI commands, lazy exports, backend modules) are imports by
        # another name
        value = node.value
        if isinstance(value, str) and value.startswith(PACKAGE + ".") and value in self.modules:
            self._add(node, value, kind="string")


def scan(root: Path, script_dirs: Iterable[str] = SCRIPT_DIRS) -> tuple[dict[str, str], list[Import]]:
    """All shusheng imports under ``root``: ({module: file}, [Import])."""
    pkg_files = _py_files(root / PACKAGE)
    modules = {module_name(p, root): p.relative_to(root).as_posix() for p in pkg_files}
    files: list[tuple[Path, str | None, str | None]] = []
    for p in pkg_files:
        mod = module_name(p, root)
        files.append((p, mod, mod if p.name == "__init__.py" else mod.rpartition(".")[0]))
    for d in script_dirs:
        if (root / d).is_dir():
            files += [(p, None, None) for p in _py_files(root / d)]
    imports: list[Import] = []
    for path, mod, pkg in files:
        rel = path.relative_to(root).as_posix()
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=rel)
        collector = _Collector(rel, mod, pkg, set(modules))
        collector.visit(tree)
        imports += collector.found
    return modules, imports


# ------------------------------------------------------------------------------------------------------------
# Rules
# ------------------------------------------------------------------------------------------------------------

def layer_of(module: str) -> int | None:
    """Layer of a shusheng module name; None for an unclassified top-level module."""
    parts = module.split(".")
    if parts == [PACKAGE]:
        return PACKAGE_LAYER
    layer = TOP_LAYER.get(parts[1])
    if layer is None:
        return None
    if is_command_module(module):
        return ENTRY_POINT_LAYER
    if layer == FAMILY_LAYER and len(parts) > 2 and parts[2] == "pipelines":
        return PIPELINES_LAYER
    return layer


def is_command_module(module: str) -> bool:
    leaf = module.rpartition(".")[2]
    return leaf == "cli" or leaf.endswith("_cli")


def _layer_label(layer: int) -> str:
    return f"layer {layer} {LAYERS[layer][0]}"


def _same_family(source: str, target: str) -> bool:
    s, t = source.split("."), target.split(".")
    return (len(s) > 1 and len(t) > 1 and s[1] == t[1] and TOP_LAYER.get(s[1]) == FAMILY_LAYER
            and layer_of(target) != ENTRY_POINT_LAYER)


def _cycles(imports: list[Import], modules: dict[str, str]) -> list[Violation]:
    edges: dict[str, dict[str, Import]] = {m: {} for m in modules}
    for imp in imports:
        if imp.runtime and imp.source is not None and imp.target in modules and imp.target != imp.source:
            edges[imp.source].setdefault(imp.target, imp)

    # Tarjan's strongly connected components (the graph is small: recursion is fine)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                components.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)

    out = []
    for comp in components:
        members = set(comp)
        start = comp[0]
        # shortest cycle through `start` inside the component (BFS)
        prev: dict[str, str] = {}
        frontier, seen, end = [start], {start}, None
        while frontier and end is None:
            nxt = []
            for v in frontier:
                for w in sorted(edges[v]):
                    if w == start:
                        end = v
                        break
                    if w in members and w not in seen:
                        seen.add(w)
                        prev[w] = v
                        nxt.append(w)
                if end is not None:
                    break
            frontier = nxt
        path = [end]
        while path[-1] != start:
            path.append(prev[path[-1]])
        path.reverse()
        path.append(start)
        steps = [edges[a][b] for a, b in pairwise(path)]
        first = steps[0]
        detail = "".join(f"\n      {s.describe()}" for s in steps)
        extra = f" (strongly connected: {', '.join(comp)})" if len(comp) > len(path) - 1 else ""
        out.append(Violation("cycle", first.file, first.line,
                             f"import cycle {' -> '.join(path)}{extra}; module-level imports:{detail}"))
    return out


def check(root: Path, script_dirs: Iterable[str] = SCRIPT_DIRS) -> list[Violation]:
    """Every broken rule under ``root``: a checkout holding ``shusheng/`` and maybe ``bench/``, ``demos/``."""
    modules, imports = scan(root, script_dirs=script_dirs)
    out: list[Violation] = []
    for mod, file in sorted(modules.items()):
        if layer_of(mod) is None:
            out.append(Violation("unknown", file, 1,
                                 f"{mod}: top-level shusheng module not in the layer table; classify it in "
                                 "LAYERS (tests/test_layers.py) as in design.md"))
    for imp in imports:
        target_layer = layer_of(imp.target)
        if target_layer is None:
            out.append(Violation("unknown", imp.file, imp.line,
                                 f"imports {imp.target}: top-level shusheng module not in the layer table"))
            continue
        if imp.source is None:  # bench/, demos/
            if any(imp.target == f or imp.target.startswith(f + ".") for f in SCRIPTS_MUST_NOT_IMPORT):
                out.append(Violation("scripts", imp.file, imp.line,
                                     f"imports {imp.target} ({imp.kind}): bench/ and demos/ use public APIs "
                                     "only, never shusheng.train"))
            continue
        source_layer = layer_of(imp.source)
        if source_layer is None:
            continue  # already reported as unknown
        own_package = imp.target.rpartition(".")[0] in (imp.source, imp.source.rpartition(".")[0])
        if is_command_module(imp.target) and imp.source not in COMMAND_TABLES and not own_package:
            out.append(Violation(
                "entry-point", imp.file, imp.line,
                f"{imp.source} imports the command module {imp.target} [{imp.kind}]: only the command table "
                f"({', '.join(COMMAND_TABLES[:1])}) imports command modules; move what is shared out of it"))
        if target_layer > source_layer and not _same_family(imp.source, imp.target):
            out.append(Violation(
                "layer", imp.file, imp.line,
                f"{imp.source} ({_layer_label(source_layer)}) imports {imp.target} "
                f"({_layer_label(target_layer)}, above it) [{imp.kind}{' ' + imp.call if imp.call else ''}]"))
    out += _cycles(imports, modules)
    return sorted(out, key=lambda v: (v.rule, v.file, v.line))


# ------------------------------------------------------------------------------------------------------------
# The package itself
# ------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def violations() -> list[Violation]:
    modules, imports = scan(ROOT)
    # guard against a vacuous pass (wrong root, parser that finds nothing)
    assert {"shusheng", "shusheng.ops", "shusheng.backbone"} <= set(modules)
    assert sum(imp.target.startswith("shusheng.ops") for imp in imports) >= 5
    return check(ROOT)


@pytest.mark.parametrize("rule", ["unknown", "cycle", "layer", "scripts", "entry-point"])
def test_package_rules(violations: list[Violation], rule: str) -> None:
    broken = [v for v in violations if v.rule == rule]
    assert not broken, f"{len(broken)} broken '{rule}' rule(s) (see design.md, Layers):\n" + "\n".join(
        map(str, broken))


def test_layer_table_is_consistent() -> None:
    names = [n for _, ns in LAYERS.values() for n in ns]
    assert len(names) == len(set(names)), "a module is listed in two layers"
    assert sorted(LAYERS) == list(range(1, len(LAYERS) + 1))


# ------------------------------------------------------------------------------------------------------------
# The checker on small fake checkouts
# ------------------------------------------------------------------------------------------------------------

def _write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return root


CLEAN = {
    "shusheng/__init__.py": '__version__ = "0"\n',
    "shusheng/ops/__init__.py": "from shusheng.ops.core import f\n",
    "shusheng/ops/core.py": """
        from typing import TYPE_CHECKING

        if TYPE_CHECKING:  # type-only: closes no cycle
            from shusheng.ops import f


        def g():
            import shusheng.ops  # function-local: closes no cycle

            return shusheng.ops
        """,
    "shusheng/ops/cli.py": """
        import importlib

        def run(args):
            from shusheng.apps import demo  # a cli.py is an entry point (layer 6)

            return importlib.import_module("shusheng.retrieval_index.store")
        """,
    "shusheng/backbone/__init__.py": "from . import net\n",
    "shusheng/backbone/net.py": "from ..ops import core\nfrom shusheng import ops\n",
    "shusheng/uniperceiver/__init__.py": 'EXPORTS = {"CaptionPipeline": "shusheng.uniperceiver.pipelines"}\n',
    "shusheng/uniperceiver/model.py": "from shusheng.backbone.net import core\n",
    "shusheng/uniperceiver/pipelines.py": "from shusheng.uniperceiver import model\nimport shusheng.data\n",
    "shusheng/data/__init__.py": "",
    "shusheng/retrieval_index/__init__.py": "",
    "shusheng/retrieval_index/store.py": "from shusheng.uniperceiver.pipelines import model\n",
    "shusheng/apps/__init__.py": "",
    "shusheng/apps/demo.py": "from shusheng.retrieval_index import store\n",
    "bench/speed.py": "from shusheng.retrieval_index import store\n",
}


def test_checker_passes_clean_package(tmp_path: Path) -> None:
    root = _write(tmp_path, CLEAN)
    modules, imports = scan(root)
    assert "shusheng.uniperceiver.pipelines" in modules
    kinds = {(i.file, i.line, i.target): i.kind for i in imports}
    assert kinds["shusheng/ops/core.py", 4, "shusheng.ops"] == "TYPE_CHECKING"
    assert kinds["shusheng/ops/core.py", 8, "shusheng.ops"] == "function-local"
    # relative: `from . import net`
    assert kinds["shusheng/backbone/__init__.py", 1, "shusheng.backbone.net"] == "module-level"
    assert kinds["shusheng/backbone/net.py", 1, "shusheng.ops.core"] == "module-level"  # `from ..ops import`
    assert kinds["shusheng/uniperceiver/__init__.py", 1, "shusheng.uniperceiver.pipelines"] == "string"
    assert any(i.call == "import_module" and i.target == "shusheng.retrieval_index.store" for i in imports)
    assert layer_of("shusheng.uniperceiver.pipelines") == 4 and layer_of("shusheng.ops.cli") == 6
    assert check(root) == []


def test_checker_reports_cycle_and_upward_import(tmp_path: Path) -> None:
    root = _write(tmp_path, {
        **CLEAN,
        # one cycle: data.a -> data.b -> data.a (module level)
        "shusheng/data/a.py": "from shusheng.data.b import x\ny = 1\n",
        "shusheng/data/b.py": "x = 1\nfrom . import a\n",
        # one upward import, function-local: layer 1 -> layer 5
        "shusheng/data/c.py": "def load():\n    from shusheng.retrieval_index import store\n",
    })
    found = check(root)
    assert [(v.rule, v.file, v.line) for v in found] == [
        ("cycle", "shusheng/data/a.py", 1),
        ("layer", "shusheng/data/c.py", 2),
    ], "\n".join(map(str, found))
    assert "shusheng.data.a -> shusheng.data.b -> shusheng.data.a" in found[0].message
    assert "shusheng/data/b.py:2 imports shusheng.data.a" in found[0].message
    assert "layer 1 base" in found[1].message and "layer 5 applications" in found[1].message


def test_checker_reports_other_rules(tmp_path: Path) -> None:
    root = _write(tmp_path, {
        **CLEAN,
        "shusheng/widgets/__init__.py": "",  # not in the layer table
        "shusheng/detection/__init__.py": "import importlib\n"
                                          "M = importlib.import_module('shusheng.apps.demo')\n",  # 3 -> 6
        "shusheng/miniclip/model.py": 'COMMANDS = {"x": "shusheng.ops.cli"}\n',  # string table, 3 -> 6
        # a family's own cli.py is still an entry point
        "shusheng/uniperceiver/model.py": "def f():\n    from shusheng.uniperceiver import cli\n",
        "shusheng/uniperceiver/cli.py": "",
        "shusheng/deploy/__init__.py": "class A:\n    import shusheng.deploy.x\n",  # class body runs
        "shusheng/deploy/x.py": "from shusheng import deploy\n",
        "demos/qa/run.py": "def main():\n    from shusheng.train import loop\n",
        "shusheng/retrieval_index/cli.py": "",
        "shusheng/apps/demo.py": "def f():\n    from shusheng.retrieval_index.cli import resolve\n",
    })
    found = {(v.rule, v.file, v.line) for v in check(root)}
    assert found == {
        ("unknown", "shusheng/widgets/__init__.py", 1),
        ("layer", "shusheng/detection/__init__.py", 2),
        ("layer", "shusheng/miniclip/model.py", 1),
        ("layer", "shusheng/uniperceiver/model.py", 2),
        ("cycle", "shusheng/deploy/__init__.py", 2),
        ("scripts", "demos/qa/run.py", 2),
        ("entry-point", "shusheng/apps/demo.py", 2),
        ("entry-point", "shusheng/miniclip/model.py", 1),  # and a layer violation, above
    }, found
