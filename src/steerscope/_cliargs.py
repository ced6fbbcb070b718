"""Argument types, output checks and the last-resort error handler of the command line.

Every argparse ``type=`` here validates its value and raises ``argparse.ArgumentTypeError`` with a
fix-it message; :class:`Parser` turns any argparse error into one ``error:`` line and exit 2. Text
printed from files goes through :func:`safe` so a file cannot forge lines or drive the terminal.
"""

from __future__ import annotations

import argparse
import ipaddress
import math
import os
import re
import shlex
import signal
import sys
import tempfile
import threading
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable, NoReturn, Sequence

from steerscope.errors import ArgError as ArgError  # defined in errors.py; re-exported
from steerscope.errors import SteerscopeError

_CTRL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def safe(text: object) -> str:
    """``text`` with control characters (ANSI/OSC escapes, newlines, bidi overrides) shown as ``\\xNN``."""
    return _CTRL.sub(lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 256 else f"\\u{ord(m.group()):04x}",
                     str(text))


_NUMBER = r"-?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?"
_NEGATIVE_NUMBERS = re.compile(rf"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?(,{_NUMBER})*,?$")


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one ``error:`` line and exit 2 (no usage block), and which reads
    a negative number or a comma list starting with one (``--positions -3,-2,-1``, ``--alpha -4,4``) as a
    value, not as an option (subcommand parsers are built from this class too)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = _NEGATIVE_NUMBERS

    takes_vector = False  # set by add_vector: the subcommand names one vector, as --vector V or positionally

    def error(self, message: str) -> NoReturn:
        raise ArgError(f"{self.prog}: {message} (see {self.prog} --help)")

    def parse_known_args(self, args: Sequence[str] | None = None,  # type: ignore[override]
                         namespace: argparse.Namespace | None = None) -> tuple[argparse.Namespace, list[str]]:
        ns, rest = super().parse_known_args(args, namespace)
        if self.takes_vector:  # one vector, from --vector or (the older spelling) the positional VECTOR
            option, positional = getattr(ns, "vector", None), vars(ns).pop("vector_positional", None)
            if option is not None and positional is not None:
                self.error("the vector is given twice, as VECTOR and as --vector; give it once, as --vector V")
            if option is None and positional is None:
                self.error("a vector is required: give --vector V (a file, a shipped name or a .gguf)")
            ns.vector = option if option is not None else positional
        return ns, rest


DTYPES = ("float32", "float16", "bfloat16")  # --dtype wherever a model loads (models.load.load_model)
DTYPE_HELP = "weights dtype"  # the option adds its choices and default

VECTOR_HELP = "a .safetensors file, a shipped name (see `steerscope vectors`) or a llama.cpp control-vector .gguf"


def add_vector(p: argparse.ArgumentParser, help: str = VECTOR_HELP) -> None:
    """``--vector V``, the one way every subcommand names its vector (as ``generate`` does); the positional
    ``VECTOR`` of older command lines still works, and giving both, or neither, is one ``error:`` line."""
    if not isinstance(p, Parser):
        raise TypeError("add_vector needs a steerscope _cliargs.Parser")
    p.takes_vector = True
    p.add_argument("--vector", default=None, help=f"{help} (required)")
    p.add_argument("vector_positional", nargs="?", default=None, metavar="VECTOR",
                   help="the same as --vector (the older spelling; give one or the other)")


def int_range(minimum: int | None = None, maximum: int | None = None) -> Callable[[str], int]:
    """An argument type: a whole number in [minimum, maximum] (either bound may be None), so a count such
    as ``--n-cov-prompts 0`` is refused by the parser, before anything loads.

    Example:
        >>> parser.add_argument("--n-prompts", type=int_range(1, 40))
    """
    want = " and ".join(x for x in (f">= {minimum}" if minimum is not None else "",
                                    f"<= {maximum}" if maximum is not None else "") if x) or "(any)"

    def parse(s: str) -> int:
        try:
            n = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number {want}, got {s!r}") from None
        if minimum is not None and n < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {n}")
        if maximum is not None and n > maximum:
            raise argparse.ArgumentTypeError(f"must be at most {maximum}, got {n}")
        return n
    parse.__name__ = f"int_range({minimum}, {maximum})"
    return parse


positive_int = int_range(1)  # a count: at least 1
nonnegative_int = int_range(0)  # a layer index, or a count where 0 means off


def probability(s: str) -> float:
    """A number in (0, 1]."""
    try:
        x = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {s!r}") from None
    if not 0 < x <= 1:
        raise argparse.ArgumentTypeError(f"must be greater than 0 and at most 1, got {s!r}")
    return x


def finite_float(s: str) -> float:
    """A finite number (NaN and inf refused)."""
    try:
        x = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None
    if not math.isfinite(x):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {s!r}")
    return x


def positive_float(s: str) -> float:
    """A finite number > 0."""
    x = finite_float(s)
    if x <= 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {s!r}")
    return x


def name_list(choices: Sequence[str]) -> Callable[[str], list[str]]:
    """An argument type: comma-separated names, each one of ``choices``, at least one."""
    def parse(s: str) -> list[str]:
        names = [x.strip() for x in s.split(",") if x.strip()]
        bad = [n for n in names if n not in choices]
        if not names or bad:
            raise argparse.ArgumentTypeError(f"unknown name {(bad or [s])[0]!r}; choose from {','.join(choices)}")
        return names
    return parse


def layer_list(s: str) -> list[int]:
    """Comma-separated non-negative block indices, at least one: ``10,12``."""
    parts = [x.strip() for x in s.split(",") if x.strip()]
    if not parts or not all(p.isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices such as 10,12, got {s!r}")
    return [int(p) for p in parts]


def int_positions(s: str) -> list[int]:
    """Comma-separated token positions (negative from the end), at least one: ``-1`` or ``-3,-2,-1``."""
    parts = [x.strip() for x in s.split(",") if x.strip()]
    if not parts or not all(re.fullmatch(r"-?\d+", p) for p in parts):
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as -1 or -3,-2,-1, got {s!r}")
    return [int(p) for p in parts]


def steer_positions(s: str) -> str | list[int]:
    """Where to steer: all, prompt, generated, last-K, or comma-separated integers."""
    if s in ("all", "prompt", "generated") or re.fullmatch(r"last-\d+", s):
        return s
    try:
        return int_positions(s)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected all, prompt, generated, last-K or integers, got {s!r}") from None


def device(s: str) -> str:
    """cpu, auto, cuda, cuda:N or mps."""
    if not re.fullmatch(r"cpu|auto|mps|cuda(:\d+)?", s):
        raise argparse.ArgumentTypeError(f"expected cpu, auto, cuda, cuda:N or mps, got {s!r}")
    return s


_HOSTNAME = re.compile(r"(?=.{1,253}$)(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*\.?")


def port(s: str) -> int:
    """A TCP port, 1..65535."""
    try:
        n = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number 1..65535, got {s!r}") from None
    if not 1 <= n <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 1..65535, got {n}")
    return n


def host(s: str) -> str:
    """An IP address or a host name (syntax only; nothing is resolved)."""
    try:
        ipaddress.ip_address(s)
        return s
    except ValueError:
        pass
    if not _HOSTNAME.fullmatch(s):
        raise argparse.ArgumentTypeError(f"expected an IP address or a host name such as 127.0.0.1, 0.0.0.0 or "
                                         f"localhost, got {s!r}")
    return s


def shell_words(s: str) -> list[str]:
    """A string split as a shell would (``'--max-model-len 2048'``); unbalanced quotes refused."""
    try:
        return shlex.split(s)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"cannot split {s!r} into arguments ({e}); check the quotes") from None


def check_numbers(a: argparse.Namespace) -> None:
    """Refuse NaN/inf in any numeric option, including comma lists such as ``--alphas nan``."""
    for key, val in vars(a).items():
        vals = val.split(",") if isinstance(val, str) else [val] if isinstance(val, float) else []
        nums = []
        for v in vals:
            try:
                nums.append(float(v))
            except (TypeError, ValueError):
                break
        else:
            if nums and not all(math.isfinite(x) for x in nums):
                raise ArgError(f"--{key.replace('_', '-')} must be finite numbers, got {val!r}")


def check_out_file(path: str, suffixes: tuple[str, ...] = ()) -> Path:
    """Check before any work that ``path`` can be written as a file (not a folder, parent writable)."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise ArgError(f"--out {path} is a folder; give a file name such as {p / 'vector.safetensors'}")
    if suffixes and p.suffix not in suffixes:
        raise ArgError(f"--out {path} must end in {' or '.join(suffixes)}")
    _check_writable(path, p.parent, "location")
    return p


def check_out_folder(path: str) -> Path:
    """Check before any work that ``path`` is (or can become) a writable folder."""
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise ArgError(f"--out {path} is a file, not a folder; give a folder path")
    _check_writable(path, p if p.exists() else p.parent, "folder")
    return p


def _check_writable(path: str, parent: Path, kind: str) -> None:
    """ArgError unless a file can be created in ``parent`` or, when it is missing, its nearest existing
    ancestor (tried with a temporary file: permission bits alone pass root in /proc)."""
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ArgError(f"--out {path}: cannot write in {parent}; choose a writable {kind}")
    try:
        tempfile.TemporaryFile(dir=parent).close()
    except OSError as e:
        raise ArgError(f"--out {path}: cannot write in {parent} ({e.strerror}); choose a writable {kind}") from None


def _one_line_warnings() -> Callable[..., None]:
    """A ``warnings.showwarning`` printing each warning as one ``warning:`` line, each text at most once
    (the same warning raised from several places, e.g. a vector checked by the CLI and again by steering)."""
    seen: set[tuple[type[Warning], str]] = set()

    def show(message: Any, category: type[Warning], filename: str, lineno: int, file: Any = None,
             line: str | None = None) -> None:
        key = (category, str(message))
        if key not in seen:
            seen.add(key)
            print(f"warning: {safe(message)}", file=sys.stderr)
    return show


class Terminated(BaseException):
    """SIGTERM during a command (raised by :func:`run_guarded`'s handler, so ``finally`` blocks run: an
    atomic write in progress removes its temp file, a run folder releases its lock)."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Terminated


def run_guarded(fn: Callable[[], None], debug: bool = False) -> int:
    """Run a command: one ``error:`` line for anything that escapes (exit 2 for user and file errors,
    1 for anything else), the traceback only with ``debug``; warnings as one ``warning:`` line each, once.
    Ctrl-C exits 130 and SIGTERM 143, each after the ``finally`` blocks of the command have run."""
    old = warnings.showwarning
    main_thread = threading.current_thread() is threading.main_thread()
    old_term = signal.signal(signal.SIGTERM, _on_sigterm) if main_thread else None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            warnings.showwarning = _one_line_warnings()
            fn()
    except SteerscopeError as e:
        return _fail(e, 2, debug)
    except KeyboardInterrupt:
        print("interrupted; finished steps are saved", file=sys.stderr)
        return 130
    except Terminated:
        print("terminated; finished steps are saved", file=sys.stderr)
        return 143
    except (OSError, UnicodeError) as e:  # files the user named: missing, unreadable, not writable, not text
        return _fail(e, 2, debug, f"{type(e).__name__}: ")
    except MemoryError:
        print("error: out of memory; use a smaller batch, fewer prompts or a smaller model", file=sys.stderr)
        return 1
    except Exception as e:  # a bug: still one line, the traceback on request
        return _fail(e, 1, debug, f"internal error ({type(e).__name__}): ", " (rerun with --debug for the traceback)")
    finally:
        warnings.showwarning = old
        if main_thread:
            signal.signal(signal.SIGTERM, old_term if old_term is not None else signal.SIG_DFL)
    return 0


def _fail(e: BaseException, code: int, debug: bool, prefix: str = "", suffix: str = "") -> int:
    if debug:
        traceback.print_exception(e)
    msg = " ".join(str(e).split()) or type(e).__name__
    print(f"error: {prefix}{safe(msg)[:500]}{suffix}", file=sys.stderr)
    return code


EXAMPLES_HELP = ("examples file: .txt one a line, .jsonl/.json (strings, or records with a \"text\" or \"prompt\" "
                 "key), .csv")
PAIRS_HELP = ("instead of --positive/--negative: a JSONL file of records {\"positive\": ..., \"negative\": ...}, "
              "such as the shipped src/steerscope/data/traits/formality.jsonl")


def contrast(a: argparse.Namespace, command: str) -> tuple[list[Any], list[Any]]:
    """The positive and negative examples of ``command``: ``--pairs`` (records with "positive" and "negative"),
    or ``--positive`` and ``--negative``; an :class:`ArgError` names what is missing or mixed.

    Example:
        >>> pos, neg = contrast(argparse.Namespace(pairs="pairs.jsonl", positive=None, negative=None), "tune")
    """
    from steerscope.data import load_examples, read_jsonl

    if a.pairs is None:
        if a.positive is None or a.negative is None:
            raise ArgError(f"{command} needs --pairs FILE, or both --positive and --negative")
        return load_examples(a.positive), load_examples(a.negative)
    if a.positive is not None or a.negative is not None:
        raise ArgError("--pairs replaces --positive/--negative; give one or the other")
    rows = read_jsonl(a.pairs)
    bad = [i for i, r in enumerate(rows, 1) if not isinstance(r, dict) or not {"positive", "negative"} <= set(r)]
    if bad or not rows:
        raise ArgError(f"--pairs {a.pairs}: record {bad[0] if bad else 1} lacks a \"positive\" or \"negative\" key "
                       "(expected JSONL records such as {\"positive\": \"...\", \"negative\": \"...\"})")
    return [r["positive"] for r in rows], [r["negative"] for r in rows]
