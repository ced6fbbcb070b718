"""The README's two set-up commands are the ones CI runs, verbatim."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    return [b.strip() for b in blocks[:2]]


def test_ci_runs_the_readme_install_and_test_commands_in_order():
    install, test = _readme_commands()
    ci = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()
          if ln.strip() and not ln.lstrip().startswith("#")]
    assert install in ci and test in ci
    assert ci.index(install) < ci.index(test)
    assert "torch==2.13.0" in install and "steerscope demo" in install
    assert test.startswith("python -m pytest")
