"""House rules that keep the shape of the code: the core never imports the studies, the studies never
import each other, and hooks.py is the only place that registers PyTorch hooks."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src" / "steerscope"


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
