"""Card section ``verdict``: a short paragraph generated from the numbers by fixed rules (no model).

Thresholds: a path "carries" the effect when cutting it keeps < 0.5 of it, and is "not needed"
when cutting it keeps >= 0.8; sparse = under 20 % of dimensions for 90 % of the effect;
"not identifiable" = s + v_perp keeps >= 0.8 of the effect with a CI that includes 1.
"""

from __future__ import annotations

import math
from typing import Any

NAMES = {"qk": "freezing attention patterns (QK)", "ov": "freezing attention values (OV)",
         "svv": "removing the steering value vectors", "mlp": "removing s from the MLP inputs"}


def _f(x: Any) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.2f}"


def _dose(d: dict[str, Any]) -> str:
    if d.get("range"):
        lo, hi = d["range"]
        return (f"Recommended alpha from {_f(lo)} (half the maximum effect) to {_f(hi)} (KL of the worst "
                f"{100 * (1 - d['quantile']):.0f} % of neutral positions within {_f(d['kl_budget'])} nat).")
    if d.get("alpha_kl_max") is None:
        return f"Every alpha tried exceeds the KL budget of {_f(d['kl_budget'])} nat on neutral prompts."
    return "No alpha within the KL budget reaches half the maximum effect."


def _frozen(fr: dict[str, Any]) -> list[str]:
    out = []
    vals = {m: fr[m]["effect_retained"] for m in NAMES if m in fr}
    carry = [m for m, v in vals.items() if math.isfinite(v) and v < 0.5]
    spare = [m for m, v in vals.items() if math.isfinite(v) and v >= 0.8]
    if carry:
        out.append("The effect depends on " + ", ".join(f"{m.upper()} ({_f(vals[m])} kept when cut)" for m in carry)
                   + ".")
    if spare:
        out.append("It survives " + ", ".join(f"{NAMES[m]} ({_f(vals[m])} kept)" for m in spare) + ".")
    if "qk" in vals and "ov" in vals and vals["ov"] < vals["qk"] - 0.2:
        out.append("As in paper A, the vector acts mainly through what heads move (values), not where they look.")
    return out


def verdict(card: dict[str, Any]) -> str:
    """The paragraph for a card dict (sections absent from it are skipped)."""
    parts: list[str] = []
    if "dose" in card:
        parts.append(_dose(card["dose"]))
    if "lens" in card:
        parts.append("Logit lens of the added vector: " + ", ".join(repr(t) for t in card["lens"]["top_positive"]
                                                                    ["raw"][:5]) + ".")
    if "attribution" in card:
        sh = card["attribution"]["share"]
        main = max(("heads", "mlp", "direct"), key=lambda k: abs(sh[k]) if math.isfinite(sh[k]) else -1)
        parts.append(f"EAP-IG: {_f(sh['heads'])} of the steering node's effect enters through attention heads "
                     f"({_f(sh['v'])} via values), {_f(sh['mlp'])} through MLPs and {_f(sh['direct'])} directly "
                     f"to the logits; the largest path is {main}.")
    if "frozen" in card:
        parts += _frozen(card["frozen"])
    if "circuit" in card:
        c = card["circuit"]
        if c["reached_threshold"]:
            parts.append(f"A circuit of {100 * c['edge_fraction']:.1f} % of the edges reproduces "
                         f"{c['threshold']:.0%} of the effect (complement {_f(c['controls']['complement'])}).")
        else:
            parts.append(f"No circuit up to {100 * c['edge_fraction']:.1f} % of the edges reaches "
                         f"{c['threshold']:.0%} faithfulness.")
    if "sparsity" in card:
        sp = card["sparsity"]
        word = "Sparse: " if sp["fraction_needed"] < 0.2 else ""
        parts.append(f"{word}{100 * sp['fraction_needed']:.1f} % of the vector's dimensions keep "
                     f"{sp['target']:.0%} of the effect (|IE| rule).")
    if "identifiability" in card:
        i = card["identifiability"]
        vp, po = i["v_plus_perp"], i["perp_only"]
        lo, hi = vp["ci95"]
        same = vp["effect_relative"] >= 0.8 and lo <= 1 <= hi
        parts.append(("Not identifiable: " if same else "Direction-specific: ")
                     + f"s + a random orthogonal vector keeps {_f(vp['effect_relative'])} of the effect "
                     f"(95 % CI {_f(lo)} to {_f(hi)}), the orthogonal vector alone {_f(po['effect_relative'])}; "
                     f"null-space fraction at the layer {_f(i['null_fraction'])}.")
    if card.get("unsupported"):
        parts.append("Not computed for this model: " + ", ".join(card["unsupported"]) + ".")
    return " ".join(parts)
