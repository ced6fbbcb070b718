"""benchmarks/gpu_check.py runs on the CPU with tiny configs, so the prepared GPU check cannot rot."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gpu_check_runs_every_section_on_tiny_configs_on_the_cpu(tmp_path):
    out = tmp_path / "check.json"
    res = _gpu_check().main(["--tiny", "--device", "cpu", "--tokens", "4", "--rounds", "1", "--batches", "1,2",
                             "--out", str(out)])
    assert out.is_file() and '"parity"' in out.read_text()
    for name, per_dtype in res["parity"].items():
        fp32, bf16 = per_dtype["float32"], per_dtype["bfloat16"]
        assert fp32["steered_logits_rel"] < 1e-5 and fp32["steering_delta_rel"] < 1e-5, name
        assert bf16["steering_delta_rel"] < 0.05, name  # bf16 rounding, not a different computation
        assert fp32["state_restored"] and bf16["state_restored"], name
    assert set(res["shapes"]) == {"tiny-llama", "tiny-gemma2"}
    for name, shape in res["shapes"].items():
        assert not any(isinstance(v, dict) and "error" in v for v in shape.values()), (name, shape)
        for b in ("batch_1", "batch_2"):
            g = shape["generation"][b]
            assert g["new_tokens"] == 4 and g["steered_tokens_differ"], (name, g)
            assert g["ratio_steered_median"] > 0
        e = shape["eap_ig"]
        assert e["edges_finite"] and e["scored_positions"] > 0
        # completeness of the s node's score (midpoint rule, T = 10): close to the metric gap
        assert math.isclose(e["s_node_score"], e["metric_gap"], rel_tol=0.2), e
        assert shape["frozen"]["path"] == "fast" and shape["frozen"]["ratio_qk"] > 0
    for name, c in res["circuits_parity"].items():  # the same computation on the same device: identical
        assert c["scored_positions"] > 0, name
        assert max(c[k] for k in ("eap_ig_edges_rel", "exact_edges_rel", "exact_nodes_rel", "circuit_metric_rel")) < 1e-6
    lib = res["library"]  # the everyday paths on the "device" (the CPU here) vs the CPU
    assert lib["extract"]["cosine"] > 0.9999 and lib["generate"]["identical"] == lib["generate"]["n"]
    assert lib["ablation"]["changed"] and lib["ablation"]["state_restored"]
    assert lib["explain"]["claims"] > 0 and "error" not in lib["explain"]
