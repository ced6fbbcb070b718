"""House rules that keep the shape of the code: the core never imports the studies, the studies never
import each other, hooks.py is the only place that registers PyTorch hooks, few top-level modules, one
error hierarchy, no import cycle, no private cross-imports, no global seeding in the library, and no function
longer than 60 lines."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src" / "steerscope"
ENGINE = SRC / "backends" / "engine"  # engine-side code: runs in vLLM's environment, never imports steerscope


def _imports(path: Path) -> set[str]:
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
    return out


def test_core_never_imports_the_studies():
    offenders = []
    for py in SRC.rglob("*.py"):
        rel = py.relative_to(SRC)
        if rel.parts[0] == "studies" or rel.name == "cli.py":  # the CLI is the front end over both
            continue
        bad = [m for m in _imports(py) if m.startswith("steerscope.studies")]
        if bad:
            offenders.append(f"{rel}: {bad}")
    assert not offenders, offenders


def test_studies_never_import_each_other():
    studies = [d.name for d in (SRC / "studies").iterdir() if (d / "__init__.py").is_file()]
    assert len(studies) >= 4, studies
    offenders = []
    for study in studies:
        for py in (SRC / "studies" / study).rglob("*.py"):
            bad = [m for m in _imports(py) if m.startswith("steerscope.studies.") and m.split(".")[2] in studies
                   and m.split(".")[2] != study]
            if bad:
                offenders.append(f"{py.relative_to(SRC)}: {bad}")
    assert not offenders, offenders


def test_only_hooks_module_registers_hooks():
    calls = ("register_forward_hook", "register_forward_pre_hook", "register_full_backward_hook")
    # The other places: the vLLM engine adapter and its graph-sites plugin run inside the engine's own
    # environment, where steerscope itself is not importable (docs/vllm.md), so they cannot use steerscope.hooks.
    engine_side = {SRC / "backends" / "engine" / f for f in ("steerscope_vllm_adapter.py", "steerscope_vllm_plugin.py")}
    offenders = [str(py.relative_to(SRC)) for py in SRC.rglob("*.py")
                 if py.name != "hooks.py" and py not in engine_side and any(c in py.read_text() for c in calls)]
    assert not offenders, offenders


def test_engine_side_code_never_imports_steerscope():
    engine = [py for py in (SRC / "backends" / "engine").rglob("*.py")]
    assert engine
    offenders = [str(py.relative_to(SRC)) for py in engine if any(m == "steerscope" or m.startswith("steerscope.") for m in _imports(py))]
    assert not offenders, offenders


def test_nothing_is_unpickled():
    unpickling = ("torch." + "load(", "import pickle")  # spelled apart so repo-wide greps don't match this test
    offenders = [str(py.relative_to(SRC)) for py in SRC.rglob("*.py")
                 if any(u in py.read_text() for u in unpickling)]
    assert not offenders, offenders


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else ""


def test_the_package_never_seeds_the_global_rng():
    """Randomness comes from ``seed`` arguments and local ``torch.Generator`` s (tests may seed; the package may not)."""
    seeding = {"torch.manual_seed", "torch.seed", "torch.random.manual_seed", "torch.random.seed",
               "torch.cuda.manual_seed", "torch.cuda.manual_seed_all", "np.random.seed", "numpy.random.seed",
               "random.seed"}
    offenders = [f"{py.relative_to(SRC)}:{node.lineno}" for py in SRC.rglob("*.py")
                 for node in ast.walk(ast.parse(py.read_text()))
                 if isinstance(node, ast.Call) and _dotted(node.func) in seeding]
    assert not offenders, offenders


# -- top-level modules -----------------------------------------------------------------------------

# Counted: every ``.py`` file directly in src/steerscope/, ``__init__.py`` and the private ``_cliargs.py`` /
# ``_files.py`` included. Not counted: subpackages (``analyses/``, ``explain/``, ...), which are where
# modules go instead.
MAX_TOP_LEVEL = 14


def _top_level_modules(root: Path) -> list[str]:
    return sorted(py.name for py in root.glob("*.py"))


def test_at_most_fourteen_top_level_modules():
    """Mechanisms live in analyses/, the card in explain/, recording beside the interventions in steer.py:
    the top level stays small."""
    mods = _top_level_modules(SRC)
    assert len(mods) <= MAX_TOP_LEVEL, f"{len(mods)} modules in src/steerscope/ (at most {MAX_TOP_LEVEL}): {mods}"


def test_top_level_rule_can_fail(tmp_path):
    for i in range(MAX_TOP_LEVEL + 1):
        (tmp_path / f"m{i}.py").write_text("")
    assert len(_top_level_modules(tmp_path)) > MAX_TOP_LEVEL


# -- short functions -------------------------------------------------------------------------------

MAX_FUNCTION_LINES = 60


def _long_functions(root: Path, limit: int) -> list[str]:
    """``path:line name (n lines)`` for every function or method under ``root`` longer than ``limit`` lines.

    A function's length is ``end_lineno - lineno + 1`` of its ``def``: from the ``def`` line (decorators not
    counted) to its last line, docstring, comments, blank lines and nested functions included. Every file
    counts, the studies and the engine-side code too."""
    out = []
    for py in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(py.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = (node.end_lineno or node.lineno) - node.lineno + 1
                if n > limit:
                    out.append(f"{py.relative_to(root).as_posix()}:{node.lineno} {node.name} ({n} lines)")
    return out


def test_no_function_is_longer_than_sixty_lines():
    """Split a long function at a real seam (a step, a section, a check) into named helpers."""
    offenders = _long_functions(SRC, MAX_FUNCTION_LINES)
    assert not offenders, offenders


def test_long_function_rule_can_fail(tmp_path):
    body = "".join(f"    x{i} = {i}\n" for i in range(MAX_FUNCTION_LINES - 2))
    (tmp_path / "m.py").write_text(f"@decorator\ndef ok():\n    \"\"\"Doc.\"\"\"\n{body}\n"
                                   f"class C:\n    async def long(self):\n        \"\"\"Doc.\"\"\"\n{body.replace('    ', '        ')}"
                                   "        return 0\n")
    assert _long_functions(tmp_path, MAX_FUNCTION_LINES) == [f"m.py:{MAX_FUNCTION_LINES + 4} long ({MAX_FUNCTION_LINES + 1} lines)"]


# -- one error hierarchy ---------------------------------------------------------------------------

# Private control-flow exceptions that never leave their module (not errors a user sees).
CONTROL_FLOW_EXCEPTIONS = {("extract/contrast.py", "_Stop"),  # a hook ends a forward pass early
                           ("_cliargs.py", "Terminated")}  # SIGTERM unwinds a command through its finally blocks


def _exception_classes(root: Path) -> list[tuple[str, str]]:
    """(path relative to ``root``, class name) of every exception class outside errors.py and engine-side
    code: a class named ``*Error`` / ``*Warning``, or one with a base named ``*Error`` / ``*Exception`` /
    ``*Warning`` (or ``BaseException``)."""
    out = []
    for py in sorted(root.rglob("*.py")):
        rel = py.relative_to(root)
        if rel.as_posix() == "errors.py" or rel.parts[:2] == ("backends", "engine"):
            continue
        for node in ast.walk(ast.parse(py.read_text())):
            if not isinstance(node, ast.ClassDef):
                continue
            bases = [b.id if isinstance(b, ast.Name) else b.attr if isinstance(b, ast.Attribute) else "" for b in node.bases]
            if node.name.endswith(("Error", "Warning")) or any(b.endswith(("Error", "Exception", "Warning")) for b in bases):
                out.append((rel.as_posix(), node.name))
    return out


def test_every_exception_class_is_defined_in_errors_py():
    """errors.py is the one hierarchy: the CLI's one-line errors and the docs list it. Modules that raise
    an error import it from there (and may re-export it, e.g. ``steerscope.analyses.sae.SAEError``)."""
    offenders = [f"{rel}: {name}" for rel, name in _exception_classes(SRC) if (rel, name) not in CONTROL_FLOW_EXCEPTIONS]
    assert not offenders, offenders


def test_error_rule_can_fail(tmp_path):
    (tmp_path / "errors.py").write_text("class SteerscopeError(Exception): ...\n")
    (tmp_path / "m.py").write_text("from errors import SteerscopeError\nclass BadInput(SteerscopeError): ...\n"
                                   "class OddWarning(UserWarning): ...\n")
    assert _exception_classes(tmp_path) == [("m.py", "BadInput"), ("m.py", "OddWarning")]


# -- no import cycle -------------------------------------------------------------------------------

# Lazy (function-level) imports that close a cycle, as (importer, imported). Only ever shrinks: delete an
# entry when its import is gone. An entry must never be a module-level import.
LAZY_CYCLE_EDGES = {
    # write_card imports the card type and the section list inside the function; card.py and
    # sections.py import html at module level (Explanation.write, each Section's render).
    ("steerscope.explain.html", "steerscope.explain.card"),
    ("steerscope.explain.html", "steerscope.explain.sections"),
    # the engine factory picks its implementation by name at call time; the engines import the seam's
    # request types at module level (backends.base -> backends.hf / backends.vllm are function-level)
    ("steerscope.backends.base", "steerscope.backends.hf"),
    ("steerscope.backends.base", "steerscope.backends.vllm"),
}


def _module_name(py: Path, root: Path) -> str:
    parts = list(py.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _import_edges(root: Path) -> dict[str, dict[str, bool]]:
    """module -> {imported module: imported at module level?} over ``root`` (engine side left out).

    Every ``import`` / ``from ... import`` counts, at any depth (inside functions too), absolute or
    relative; ``from pkg import name`` is an edge to ``pkg.name`` when that is a module, else to ``pkg``.
    Blocks under ``if TYPE_CHECKING:`` never run and do not count. A parent package's ``__init__`` (which
    Python runs first) is not an edge: only the named module is."""
    mods = {_module_name(py, root): py for py in root.rglob("*.py")
            if py.relative_to(root).parts[:2] != ("backends", "engine")}
    graph: dict[str, dict[str, bool]] = {}
    for me, py in mods.items():
        pkg = me if py.name == "__init__.py" else me.rpartition(".")[0]
        edges: dict[str, bool] = {}

        def add(target: str, top: bool, me: str = me, edges: dict[str, bool] = edges) -> None:
            if target in mods and target != me:
                edges[target] = edges.get(target, False) or top

        def visit(node: ast.AST, top: bool, pkg: str = pkg, add=add) -> None:
            if isinstance(node, ast.If) and _is_type_checking(node):
                children: list[ast.AST] = list(node.orelse)
            else:
                children = list(ast.iter_child_nodes(node))
            if isinstance(node, ast.Import):
                for a in node.names:
                    add(a.name, top)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                for a in node.names:
                    add(f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base, top)
            inner = top and not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            for child in children:
                visit(child, inner)

        visit(ast.parse(py.read_text()), True)
        graph[me] = edges
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None when the graph is acyclic."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def dfs(v: str) -> list[str] | None:
        state[v] = 1
        path.append(v)
        for w in sorted(graph.get(v, ())):
            if state.get(w) == 1:
                return path[path.index(w):] + [w]
            if w not in state and (found := dfs(w)):
                return found
        state[v] = 2
        path.pop()
        return None

    for v in sorted(graph):
        if v not in state and (found := dfs(v)):
            return found
    return None


def test_no_import_cycle_among_steerscope_modules():
    """One direction between any two modules (vector <- control_vectors, never both), counting lazy
    imports inside functions; the only exceptions are the documented LAZY_CYCLE_EDGES."""
    graph = _import_edges(SRC)
    eager = [f"{a} -> {b}" for a, b in LAZY_CYCLE_EDGES if graph.get(a, {}).get(b)]
    assert not eager, f"allowlisted as lazy but imported at module level: {eager}"
    pruned = {m: {t for t in edges if (m, t) not in LAZY_CYCLE_EDGES} for m, edges in graph.items()}
    cycle = _cycle(pruned)
    assert cycle is None, " -> ".join(cycle or [])


def test_cycle_rule_can_fail(tmp_path):
    root = tmp_path / "steerscope"
    root.mkdir()
    (root / "__init__.py").write_text("")
    (root / "a.py").write_text("from steerscope.b import f\n")
    (root / "b.py").write_text("def f():\n    from steerscope import a  # lazy still counts\n")
    (root / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from steerscope.a import x\n")
    graph = _import_edges(root)
    assert graph["steerscope.a"] == {"steerscope.b": True} and graph["steerscope.b"] == {"steerscope.a": False}
    assert graph["steerscope.c"] == {}
    assert _cycle({m: set(e) for m, e in graph.items()}) == ["steerscope.a", "steerscope.b", "steerscope.a"]


# -- no private cross-imports ----------------------------------------------------------------------


def _private_imports(root: Path) -> list[str]:
    """Imports that reach into another module's privates, over ``root`` (engine side left out).

    The rule, for every ``import`` / ``from ... import`` of a steerscope module, at any depth:
    1. a name that starts with ``_`` (a function, class or constant) is never imported from another module;
       a module whose file name starts with ``_`` may be imported as a module (``from steerscope import
       _cliargs as T``), under rule 2;
    2. a private module (``steerscope._files``, ``steerscope.circuits._suffix``) is imported, as a module or
       for its public names, only from inside the package that holds it (``_files`` from anywhere in
       steerscope, ``circuits._suffix`` only from ``steerscope.circuits.*``).
    Aliases (``import x as _x``) are the importer's own business and allowed."""
    mods = {_module_name(py, root) for py in root.rglob("*.py")}
    offenders = []
    for py in root.rglob("*.py"):
        rel = py.relative_to(root)
        if rel.parts[:2] == ("backends", "engine"):
            continue
        me = _module_name(py, root)
        pkg = me if py.name == "__init__.py" else me.rpartition(".")[0]

        def outside_owner(module: str, pkg: str = pkg) -> bool:
            parts = module.split(".")
            for i, part in enumerate(parts):
                if part.startswith("_") and not part.startswith("__"):
                    owner = ".".join(parts[:i])
                    if not (pkg == owner or pkg.startswith(owner + ".")):
                        return True
            return False

        for node in ast.walk(ast.parse(py.read_text())):
            if isinstance(node, ast.Import):
                bad = [a.name for a in node.names if a.name.split(".")[0] == root.name and outside_owner(a.name)]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(pkg.split(".")[: len(pkg.split(".")) - node.level + 1] + ([node.module] if node.module else []))
                if base.split(".")[0] != root.name:
                    continue
                bad = []
                for a in node.names:
                    full = f"{base}.{a.name}"
                    if full in mods:
                        bad += [full] if outside_owner(full) else []
                    elif (a.name.startswith("_") and not a.name.startswith("__")) or outside_owner(base):
                        bad.append(full)
            else:
                continue
            offenders += [f"{rel}:{node.lineno}: {b}" for b in bad]
    return offenders


def test_no_import_of_another_modules_private_names():
    offenders = _private_imports(SRC)
    assert not offenders, offenders


def test_private_import_rule_can_fail(tmp_path):
    root = tmp_path / "steerscope"
    for d in ("", "models", "studies"):
        (root / d).mkdir(exist_ok=True)
        (root / d / "__init__.py").write_text("")
    (root / "_files.py").write_text("def dumps(): ...\n")
    (root / "models" / "_source.py").write_text("def check(): ...\n")
    (root / "models" / "load.py").write_text("from steerscope.models._source import check\n_x = 1\n")
    (root / "cli.py").write_text("from steerscope import _files as F\nfrom steerscope._files import dumps\n")
    (root / "studies" / "s.py").write_text("from steerscope.models.load import _x\n"
                                           "from steerscope.models._source import check\n")
    assert sorted(_private_imports(root)) == ["studies/s.py:1: steerscope.models.load._x",
                                              "studies/s.py:2: steerscope.models._source.check"]


def test_mypy_is_strict_on_the_analyses_and_the_card():
    import tomllib

    cfg = tomllib.loads((SRC.parents[1] / "pyproject.toml").read_text())
    strict = {m for o in cfg["tool"]["mypy"]["overrides"] if o.get("strict") for m in o["module"]}
    assert {"steerscope.explain.*", "steerscope.analyses.*"} <= strict


RECORD_STUDIES = ("identifiability", "reasoning", "refusal", "refusal_mechanisms")  # studies whose steps return typed records (issue 21)


def _untyped_returns(root: Path, studies: tuple[str, ...]) -> list[str]:
    """Functions of the studies' steps/pipeline/report modules annotated ``-> dict[str, Any]``, except the
    ``run`` entry point and ``summary`` (the ``--json`` output is a JSON object)."""
    out = []
    for study in studies:
        for name in ("steps.py", "pipeline.py", "report.py"):
            py = root / "studies" / study / name
            if not py.is_file():
                continue
            for node in ast.walk(ast.parse(py.read_text())):
                if (isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.returns is not None
                        and node.name not in ("run", "summary")
                        and ast.unparse(node.returns) in ("dict[str, Any]", "list[dict[str, Any]]")):
                    out.append(f"studies/{study}/{name}:{node.lineno}: {node.name}")
    return out


def test_converted_studies_return_records_not_dicts():
    assert not _untyped_returns(SRC, RECORD_STUDIES)


def test_every_study_returns_records():
    """A new study package joins RECORD_STUDIES (typed step records, strict mypy) from its first commit."""
    studies = {d.name for d in (SRC / "studies").iterdir() if (d / "pipeline.py").is_file()}
    assert studies and studies == set(RECORD_STUDIES)


def test_untyped_return_rule_can_fail(tmp_path):
    (tmp_path / "studies" / "s").mkdir(parents=True)
    (tmp_path / "studies" / "s" / "steps.py").write_text(
        "from typing import Any\ndef step() -> dict[str, Any]:\n    return {}\n"
        "def run() -> dict[str, Any]:\n    return {}\ndef rows() -> list[dict[str, Any]]:\n    return []\n")
    assert _untyped_returns(tmp_path, ("s",)) == ["studies/s/steps.py:2: step", "studies/s/steps.py:6: rows"]


def test_mypy_is_strict_on_the_studies_that_return_records():
    import tomllib

    cfg = tomllib.loads((SRC.parents[1] / "pyproject.toml").read_text())
    strict = {m for o in cfg["tool"]["mypy"]["overrides"] if o.get("strict") for m in o["module"]}
    assert {f"steerscope.studies.{s}.*" for s in RECORD_STUDIES} <= strict


def _store_branches(root: Path) -> list[str]:
    """``isinstance(x, Run)`` / ``isinstance(x, MemoryRun)`` calls: code that branches on which run store it has."""
    out = []
    for py in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(py.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "isinstance" and len(node.args) == 2:
                names = {n.id if isinstance(n, ast.Name) else getattr(n, "attr", "") for n in ast.walk(node.args[1])}
                if names & {"Run", "MemoryRun", "_Store"}:
                    out.append(f"{py.relative_to(root).as_posix()}:{node.lineno}")
    return out


def test_no_code_branches_on_the_run_store():
    """The folder store and the in-memory store share one interface (records, tensors, vectors, close): no caller
    asks which one it holds (issue 21)."""
    assert not _store_branches(SRC)


def test_store_branch_rule_can_fail(tmp_path):
    (tmp_path / "m.py").write_text("def f(run):\n    if isinstance(run, MemoryRun):\n        return 1\n"
                                   "    return isinstance(run, (int, runs.Run))\n")
    assert _store_branches(tmp_path) == ["m.py:2", "m.py:4"]


NOT_RECORDS = {  # dataclasses of analyses/ that are not JSON result records, and why
    "SAEConfig": "training settings", "SAEFit": "holds tensors and the trained SAE", "PlantedCase": "a surgery recipe",
    "Candidate": "scored in place during the search", "Selection": "holds the chosen SteeringVector",
    "LensRow": "holds a graph Node (has its own to_dict)", "Record": "the base class",
}


def _non_record_dataclasses(root: Path) -> list[str]:
    out = []
    for py in sorted((root / "analyses").glob("*.py")):
        for node in ast.walk(ast.parse(py.read_text())):
            if isinstance(node, ast.ClassDef) and any("dataclass" in ast.unparse(d) for d in node.decorator_list):
                frozen = any("frozen=True" in ast.unparse(d) for d in node.decorator_list)
                is_record = any(ast.unparse(b) == "Record" for b in node.bases)
                if not (frozen and is_record) and node.name not in NOT_RECORDS:
                    out.append(f"analyses/{py.name}:{node.lineno} {node.name}")
    return out


def test_analysis_results_are_frozen_records():
    """Every result dataclass of analyses/ is a frozen Record (JSON round trip), or is listed with its reason."""
    assert not _non_record_dataclasses(SRC)


def test_analysis_result_records_round_trip():
    from steerscope.analyses.identifiability import LogitAgreement
    from steerscope.analyses.lens import LensTop
    from steerscope.analyses.sparsity import Agreement, NullTest

    for rec in (Agreement(0.9, 0.5, 1e-3, 0.05), NullTest(0.5, 0.3, 0.45, 0.05, 19), LensTop(["a"], [1], [0.5]),
                LogitAgreement(0.1, 1.0, 0.8, 10)):
        assert type(rec).from_dict(rec.to_dict()) == rec


def test_non_record_rule_can_fail(tmp_path):
    (tmp_path / "analyses").mkdir()
    (tmp_path / "analyses" / "m.py").write_text("from dataclasses import dataclass\n@dataclass\nclass A:\n    x: int\n"
                                                "@dataclass(frozen=True)\nclass B(Record):\n    x: int\n")
    assert _non_record_dataclasses(tmp_path) == ["analyses/m.py:3 A"]
