"""Every fenced Python and shell example of README.md and docs/*.md runs as written (issue 26).

One test per block, named ``file:line`` (the line of the opening fence). A Python block runs in a fresh
interpreter; a shell block runs in bash (``set -euo pipefail``) with a ``steerscope`` on the ``PATH`` that runs
``python -m steerscope.cli``, so each command is its own process, as on a reader's terminal. Both run with
``PYTHONPATH=src`` (this checkout), offline (``HF_HUB_OFFLINE``), one thread, in a temporary folder
that holds symlinks to the checkout's ``src/`` and ``benchmarks/`` (the README's commands are run from
the checkout). The blocks of one page share that folder and run in page order, as a reader runs
them: a block may read a file an earlier block wrote (selecting one block with ``-k`` runs the earlier
blocks of its page first).

A block too expensive for the test suite (a whole study, a GPU, the hub, an install command)
carries an HTML comment on the line right before its fence::

    <!-- doc-test: skip (runs the whole study, ~15 min) -->

A block that needs an engine installed outside the package (the vLLM venv) names the environment
variable that points at it; it runs when the variable names an existing path (as in CI) and skips
otherwise::

    <!-- doc-test: needs STEERSCOPE_VLLM_ENV (starts a vLLM engine) -->

A whole study or card is run at tiny sizes: ``shrink`` runs the block as written, except that each ``steerscope``
command whose subcommand is in :data:`SHRINK` gets that entry's options appended (argparse keeps an option's
last value, so they override the block's own sizes, model and device; ``{tiny}`` is a tiny random llama saved
with SmolLM2's tokenizer, ``{tiny_vectors}`` a folder of two random vectors for it). It checks the sequence of
commands a page gives (and that each configuration has a run folder of its own), at a cost of seconds to a
minute or two per block::

    <!-- doc-test: shrink (whole studies; tiny sizes here) -->

The reason in parentheses is required; a marker without one, a marker not followed by a runnable fence,
and a fence without a language (an example could hide there untested) fail. Blocks that are not
examples say so by their language: ``text`` for a command synopsis, ``json`` for an output sample.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUNNABLE = {"python": "python", "py": "python", "bash": "shell", "sh": "shell", "console": "shell", "shell": "shell"}
MARKER = re.compile(r"^\s*<!--\s*doc-test:\s*(?P<body>.*?)\s*-->\s*$")
SKIP = re.compile(r"^skip\s*\((?P<reason>.*\S.*)\)$")
NEEDS = re.compile(r"^needs\s+(?P<var>[A-Z][A-Z0-9_]*)\s*\((?P<reason>.*\S.*)\)$")
SHRINK_RE = re.compile(r"^shrink\s*\((?P<reason>.*\S.*)\)$")
# options appended to a ``shrink`` block's commands, by subcommand (the longest match wins)
SHRINK: dict[str, str] = {
    "explain": "--sections lens",
    "tune": "--layers 12 --n-alphas 2",
    # verify on the HF path alone: its vLLM and llama.cpp paths are tests/test_verify.py's (an engine start each)
    "verify": "--backends hf --max-new-tokens 8",
    # the shipped vectors (no NTP / PO training; tests/test_refusal_study.py runs the study that trains them)
    "study refusal": "--n-train 16 --n-val 4 --layers 16,18 --n-test 4 --max-new-tokens 8 --n-trained 8 "
                     "--trained-epochs 1 --gen-batch 16 --device cpu --shipped-vectors",
    "study refusal-mechanisms": "--model {tiny} --vector-dir {tiny_vectors} --quick --device cpu",
    "study reasoning": "--model {tiny} --steps 1 --prompts-per-step 1 --k 2 --n-test 2 --eval-samples 1 --seeds 1 "
                       "--max-new-tokens 4 --no-sae --shots 1 --device cpu",  # 1 worked example fits 256 positions
    "study identifiability": "--model {tiny} --traits formality --alphas 2 --seeds 0 --n-prompts 2 --max-new-tokens 4 "
                             "--ks 1 --n-k-prompts 1 --n-shift-prompts 3 --n-cov-prompts 4 --n-jac-prompts 1 "
                             "--device cpu",
}
FENCE = re.compile(r"^(?P<ticks>```+)(?P<lang>[^`\s]*)\s*$")
TIMEOUT_S = 600  # one block; the whole file is budgeted at a few minutes (see the module docstring)
SHELL_PRELUDE = "set -euo pipefail\n"


@dataclass(frozen=True)
class Block:
    """One fenced block: where it opens, its language, its text and the marker line above it (if any)."""

    page: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    marker: str | None  # the text after "doc-test:" on the line right above the fence

    @property
    def id(self) -> str:
        page = self.page.relative_to(ROOT) if self.page.is_relative_to(ROOT) else self.page.name
        return f"{page}:{self.line}"

    @property
    def kind(self) -> str | None:
        return RUNNABLE.get(self.lang.lower())

    @property
    def shrunk(self) -> bool:
        """Whether the block runs at the test's tiny sizes (a ``shrink`` marker)."""
        return SHRINK_RE.match(self.marker or "") is not None

    @property
    def skip_reason(self) -> str | None:
        """Why this block does not run here: its ``skip`` reason, or the missing engine of a ``needs``."""
        m = SKIP.match(self.marker or "")
        if m:
            return m.group("reason").strip()
        n = NEEDS.match(self.marker or "")
        if n and not Path(os.environ.get(n.group("var"), "/nonexistent")).exists():
            return f"${n.group('var')} is not set to an existing path ({n.group('reason').strip()})"
        return None

    @property
    def runs(self) -> bool:
        """Whether the block runs in this environment (no marker, a ``shrink``, or a ``needs`` that is met)."""
        return self.marker is None or self.shrunk or (NEEDS.match(self.marker) is not None and self.skip_reason is None)


def parse(page: Path) -> list[Block]:
    """The fenced blocks of a markdown page, in page order."""
    lines = page.read_text().split("\n")
    out, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        close = next((j for j in range(i + 1, len(lines)) if lines[j].startswith(m.group("ticks"))
                      and not lines[j].strip("`").strip()), None)
        if close is None:
            raise AssertionError(f"{page.relative_to(ROOT)}:{i + 1}: fence never closed")
        above = MARKER.match(lines[i - 1]) if i else None
        out.append(Block(page, i + 1, m.group("lang"), "\n".join(lines[i + 1:close]) + "\n",
                         above.group("body") if above else None))
        i = close + 1
    return out


BLOCKS = [b for page in PAGES for b in parse(page)]
EXAMPLES = [b for b in BLOCKS if b.kind]


def _markers(page: Path) -> list[tuple[int, str]]:
    return [(n, m.group("body")) for n, ln in enumerate(page.read_text().split("\n"), 1) if (m := MARKER.match(ln))]


def test_every_fence_names_its_language():
    bare = [b.id for b in BLOCKS if not b.lang]
    assert not bare, f"fences without a language (python/bash for examples, text/json for the rest): {bare}"


def test_every_doc_test_marker_gives_a_reason_and_sits_on_a_runnable_fence():
    bad = []
    for page in PAGES:
        fences = {b.line: b for b in parse(page)}
        for n, body in _markers(page):
            block = fences.get(n + 1)
            where = f"{page.relative_to(ROOT)}:{n}"
            if not (SKIP.match(body) or NEEDS.match(body) or SHRINK_RE.match(body)):
                bad.append(f"{where}: {body!r} is not 'skip (reason)', 'shrink (reason)' or 'needs VAR (reason)' "
                           "(a reason is required)")
            elif block is None or block.kind is None:
                bad.append(f"{where}: the marker is not on the line right above a python or shell fence")
    assert not bad, "\n".join(bad)


def test_the_examples_were_found():
    assert len(EXAMPLES) >= 20 and any(b.page.name == "README.md" and b.kind == "python" for b in EXAMPLES)


class _Page:
    """The shared working folder of one page and which of its blocks already ran."""

    def __init__(self, folder: Path):
        self.folder, self.done, self.failed = folder, set[int](), set[int]()


@pytest.fixture(scope="module")
def pages(tmp_path_factory: pytest.TempPathFactory) -> dict[Path, _Page]:
    out = {}
    for page in PAGES:
        folder = tmp_path_factory.mktemp(page.stem)
        for name in ("src", "benchmarks"):
            (folder / name).symlink_to(ROOT / name, target_is_directory=True)
        out[page] = _Page(folder)
    return out


@pytest.fixture(scope="module")
def bin_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ``steerscope`` command for this checkout (the installed entry point may belong to another one)."""
    folder = tmp_path_factory.mktemp("bin")
    exe = folder / "steerscope"
    exe.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m steerscope.cli "$@"\n')
    exe.chmod(0o755)
    return folder


@pytest.fixture(scope="module")
def shrink_bin(tmp_path_factory: pytest.TempPathFactory, tiny_folder: Path) -> Path:
    """A ``steerscope`` that appends :data:`SHRINK`'s options for its subcommand (for ``shrink`` blocks);
    ``{tiny_vectors}`` holds a DIM and a PO vector of the tiny model (random directions) for the studies."""
    import torch

    import steerscope as ss

    folder = tmp_path_factory.mktemp("bin-shrink")
    vectors = tmp_path_factory.mktemp("tiny-vectors")
    d_model = ss.load_model(str(tiny_folder)).d_model
    for seed, name in ((1, "dim"), (2, "po")):
        g = torch.Generator().manual_seed(seed)
        ss.SteeringVector({1: 2.0 * torch.randn(d_model, generator=g)}).save(vectors / f"refusal-{name}.safetensors")
    exe = folder / "steerscope"
    table = {k: v.format(tiny=tiny_folder, tiny_vectors=vectors).split() for k, v in SHRINK.items()}
    exe.write_text(f"#!{sys.executable}\nimport os, sys\nTABLE = {table!r}\n"
                   "argv = sys.argv[1:]\n"
                   "keys = [k for k in sorted(TABLE, key=len, reverse=True) if argv[:len(k.split())] == k.split()]\n"
                   "argv += TABLE[keys[0]] if keys else []\n"
                   "os.execv(sys.executable, [sys.executable, '-m', 'steerscope.cli', *argv])\n")
    exe.chmod(0o755)
    return folder


def _env(bin_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(PYTHONPATH=str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", ""),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", STEERSCOPE_NO_PROGRESS="1", OMP_NUM_THREADS="1",
               MKL_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    env["PATH"] = os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def _run(block: Block, folder: Path, bin_dir: Path, shrink_dir: Path) -> None:
    """Run one block in ``folder``; fail with its output when it raises or exits non-zero."""
    if block.shrunk:
        bin_dir = shrink_dir
    if block.kind == "python":
        script = folder / f"block_{block.line}.py"
        script.write_text(block.code)
        cmd = [sys.executable, script.name]
    else:
        script = folder / f"block_{block.line}.sh"
        script.write_text(SHELL_PRELUDE + block.code)
        cmd = ["bash", script.name]
    try:
        r = subprocess.run(cmd, cwd=folder, env=_env(bin_dir), capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{block.id} did not finish in {TIMEOUT_S} s")
    if r.returncode != 0:
        pytest.fail(f"{block.id} exited with {r.returncode}:\n--- code\n{block.code}--- output (tail)\n"
                    f"{(r.stdout + r.stderr)[-4000:]}")


@pytest.mark.slow
@pytest.mark.parametrize("block", EXAMPLES, ids=[b.id for b in EXAMPLES])
def test_doc_example_runs_as_written(block: Block, pages: dict[Path, _Page], bin_dir: Path, shrink_bin: Path):
    if not block.runs:
        reason = block.skip_reason
        assert reason, f"{block.id}: the doc-test marker {block.marker!r} needs a reason: skip (why)"
        pytest.skip(reason)
    page = pages[block.page]
    for earlier in [b for b in EXAMPLES if b.page == block.page and b.line < block.line and b.runs]:
        if earlier.line in page.failed:
            pytest.fail(f"{block.id} comes after {earlier.id} on its page, which failed")
        if earlier.line not in page.done:  # a reader runs the page in order
            page.failed.add(earlier.line)
            _run(earlier, page.folder, bin_dir, shrink_bin)
            page.failed.discard(earlier.line)
            page.done.add(earlier.line)
    page.failed.add(block.line)
    _run(block, page.folder, bin_dir, shrink_bin)
    page.failed.discard(block.line)
    page.done.add(block.line)


def test_a_needs_marker_runs_only_where_its_environment_exists(tmp_path, monkeypatch):
    page = tmp_path / "page.md"
    page.write_text("<!-- doc-test: needs SS_TEST_ENGINE (an engine) -->\n```python\nprint(1)\n```\n"
                    "<!-- doc-test: skip (too slow) -->\n```bash\ntrue\n```\n")
    needs, skip = parse(page)
    monkeypatch.delenv("SS_TEST_ENGINE", raising=False)
    assert not needs.runs and "SS_TEST_ENGINE" in (needs.skip_reason or "")
    monkeypatch.setenv("SS_TEST_ENGINE", str(tmp_path / "missing"))
    assert not needs.runs
    monkeypatch.setenv("SS_TEST_ENGINE", str(tmp_path))
    assert needs.runs and needs.skip_reason is None
    assert not skip.runs and skip.skip_reason == "too slow"
    page.write_text("<!-- doc-test: shrink (a study) -->\n```bash\ntrue\n```\n")
    (shrunk,) = parse(page)
    assert shrunk.shrunk and shrunk.runs and shrunk.skip_reason is None
    assert not needs.shrunk and not skip.shrunk


# --- blocks that do not run here are still checked: every command parses, every name exists -----------------

def _commands(code: str) -> list[list[str]]:
    """The simple commands of a shell block (continuations joined, comments dropped, split at ``&&``/``|``/``;``)."""
    import shlex

    lex = shlex.shlex(re.sub(r"\\\n", " ", code), posix=True, punctuation_chars=True)
    lex.whitespace_split, lex.commenters = True, "#"
    out: list[list[str]] = [[]]
    for tok in lex:
        if tok in ("&&", "||", "|", ";", "&", "\n") or set(tok) <= set("&|;"):
            out.append([])
        else:
            out[-1].append(tok)
    return [c for c in out if c]


def _steerscope_argv(cmd: list[str]) -> list[str] | None:
    """The arguments of a ``steerscope`` command (after ``nice``/``env`` prefixes), or None for other commands."""
    return cmd[cmd.index("steerscope") + 1:] if "steerscope" in cmd else None


def _check_shell(block: Block) -> list[str]:
    import contextlib
    import importlib.util
    import io

    from steerscope.cli import build_parser
    from steerscope.errors import ArgError

    bad, lines = [], []
    for ln in re.sub(r"\\\n", " ", block.code).split("\n") + [""]:  # one command per line (a quote may span lines)
        lines.append(ln)
        try:
            cmds = _commands("\n".join(lines))
        except ValueError:  # an open quote: the command goes on on the next line
            continue
        lines = []
        for cmd in cmds:
            argv = _steerscope_argv(cmd)
            if argv is not None:
                err = io.StringIO()
                try:
                    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                        build_parser().parse_args(argv)
                except ArgError as e:
                    bad.append(f"{block.id}: `steerscope {' '.join(argv)}`: {e}")
                except SystemExit as e:  # --help exits 0
                    if e.code:
                        bad.append(f"{block.id}: `steerscope {' '.join(argv)}`: {err.getvalue().strip()}")
            elif cmd[:2] == ["python", "-m"] and cmd[2].startswith("steerscope"):
                if importlib.util.find_spec(cmd[2]) is None:
                    bad.append(f"{block.id}: no module {cmd[2]}")
    return bad


def _check_python(block: Block) -> list[str]:
    """Compiles, and every ``ss.<name>`` / ``from steerscope... import <name>`` it uses exists."""
    import ast
    import importlib

    tree = ast.parse(block.code, filename=block.id)  # a SyntaxError fails the test with its line
    bad, ss = [], importlib.import_module("steerscope")
    aliases = {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names
               if a.name == "steerscope"}
    for n in ast.walk(tree):
        if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id in aliases \
                and not hasattr(ss, n.attr):
            bad.append(f"{block.id}: steerscope has no attribute {n.attr!r}")
        if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("steerscope"):
            mod = importlib.import_module(n.module or "")
            bad += [f"{block.id}: {n.module} has no {a.name!r}" for a in n.names
                    if not hasattr(mod, a.name) and importlib.util.find_spec(f"{n.module}.{a.name}") is None]
    return bad


def test_examples_that_do_not_run_here_still_parse_and_name_what_exists():
    """A skipped block is not unchecked: its ``steerscope`` commands parse with today's CLI (no removed flag such
    as the old ``--trained-tokens``, no unknown preset) and its Python compiles and names existing API."""
    checked = [b for b in EXAMPLES if not b.runs]
    assert checked, "no skipped examples found (the check would be vacuous)"
    bad = [msg for b in checked for msg in (_check_shell(b) if b.kind == "shell" else _check_python(b))]
    assert not bad, "\n".join(bad)


def test_the_skipped_block_check_can_fail(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("<!-- doc-test: skip (slow) -->\n```bash\nnice -n 5 steerscope study refusal \\\n"
                    "  --trained-tokens 4   # gone\nsteerscope study reasoning --preset tiny && echo ok\n```\n"
                    "<!-- doc-test: skip (slow) -->\n```python\nimport steerscope as ss\nss.no_such_fn()\n"
                    "from steerscope import steering, nothing_here\n```\n")
    shell, py = parse(page)
    assert len(_check_shell(shell)) == 1 and "--trained-tokens" in _check_shell(shell)[0]
    assert sorted(m.split(": ", 1)[1] for m in _check_python(py)) == [
        "steerscope has no 'nothing_here'", "steerscope has no attribute 'no_such_fn'"]
