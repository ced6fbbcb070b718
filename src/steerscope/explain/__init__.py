"""The mechanism card of a steering vector (``ss.explain``, ``steerscope explain``).

Example:
    >>> import steerscope as ss
    >>> card = ss.explain(lm, vec, prompts, alpha=6.0, quick=True)
    >>> card.to_dict()["frozen"]["ov"]["effect_retained"]
"""

from steerscope.explain.card import KEYS, Explanation, explain, load_card
from steerscope.explain.context import Settings

__all__ = ["KEYS", "Explanation", "Settings", "explain", "load_card"]
