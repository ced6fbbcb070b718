"""Names the command line needs before any model is loaded, in a module that imports nothing heavy.

``steerscope --help``, ``vectors`` and ``inspect`` must not pay for torch and transformers, so the
choices their parsers show live here; each is the single source of its table's keys, and
``tests/test_cli_startup.py`` checks they agree with the tables themselves:

- :data:`DEFAULT_MODEL` -- the model a command loads when none is named (``models.load``).
- :data:`ALIAS_NAMES` -- the keys of ``models.load.ALIASES``.
- :data:`METHOD_NAMES` -- the keys of ``extract.aggregate.METHODS``.
- :data:`TRAIT_NAMES` -- the traits of ``metrics.classifiers`` (``TRAITS``).

Example:
    >>> from steerscope.data.names import DEFAULT_MODEL
    >>> DEFAULT_MODEL
    'smollm2-135m'
"""

from __future__ import annotations

DEFAULT_MODEL = "smollm2-135m"
ALIAS_NAMES = ("smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b", "smollm2-135m-safe")
METHOD_NAMES = ("dim", "caa", "pca", "pca_diff", "pca_center", "pca_paper", "probe", "actadd")
TRAIT_NAMES = ("formality", "sentiment", "politeness")
