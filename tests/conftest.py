"""Shared fixtures: tiny random-weight models of every supported family (no download)."""

from __future__ import annotations

import os
from contextlib import contextmanager

import pytest
import torch

os.environ.setdefault("STEERSCOPE_NO_PROGRESS", "1")
PIN = hasattr(os, "sched_setaffinity")  # Linux; elsewhere workers are not pinned
ALL_CPUS = sorted(os.sched_getaffinity(0)) if PIN else list(range(os.cpu_count() or 1))  # before pinning
_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")
if _WORKER:  # `pytest -n 2` (the README's test command) on 2 cores: each worker, with its subprocesses, on its own
    # CPU share with one torch thread, so the two never contend (a vLLM engine binds its OpenMP threads to every CPU
    # it may use, and they spin-wait); TP = 2 tests widen it for their engine (every_cpu)
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    _n, _i = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")), int(_WORKER.removeprefix("gw") or 0)
    if PIN and 1 < _n <= len(ALL_CPUS):
        _share = ALL_CPUS[_i * len(ALL_CPUS) // _n:(_i + 1) * len(ALL_CPUS) // _n]
        os.sched_setaffinity(0, _share)
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(map(str, _share)))  # a TP = 1 engine's threads
else:
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
THREADS = torch.get_num_threads()


@contextmanager
def every_cpu():
    """Every CPU of the machine for this process and what it starts here (a TP = 2 engine's ranks each bind a CPU),
    without the worker's single-share vLLM binding; the worker's share and binding come back on exit. Outside
    ``pytest -n`` nothing changes.

    Example:
        >>> with every_cpu():
        ...     engine = bv.engine_for(lm, tensor_parallel_size=2)
    """
    if not PIN:
        yield
        return
    mine, bind = os.sched_getaffinity(0), os.environ.pop("VLLM_CPU_OMP_THREADS_BIND", None) if _WORKER else None
    os.sched_setaffinity(0, ALL_CPUS)
    try:
        yield
    finally:
        os.sched_setaffinity(0, mine)
        if bind is not None:
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = bind


# Under `pytest -n N` tests run in units sent whole to one worker (xdist's loadgroup): a test file (its module
# fixtures, e.g. a started engine, are built once), a documentation page (its blocks share one namespace), and
# every test that starts a vLLM engine (one engine at a time, on its worker's CPU). Units go out
# longest first, so the long ones do not start last; the order is from measured durations (the ones named below
# take minutes, the rest seconds).
VLLM_FILES = {"test_vllm_parity.py", "test_vllm_server.py", "test_vllm_conditional.py",
              "test_vllm_study_parity.py", "test_verify.py"}
LONGEST_FIRST = ["vllm", "doc:README.md", "test_explain_planted.py", "doc:docs/explain.md", "test_explain_study.py",
                 "test_refusal_study.py", "doc:docs/verify.md", "doc:docs/refusal.md", "test_parts.py",
                 "test_reasoning.py", "test_crash.py", "doc:docs/reasoning.md", "test_vllm_graph_sites.py",
                 "doc:docs/refusal-mechanisms.md", "test_freeze.py", "doc:docs/identifiability.md",
                 "doc:docs/studies.md", "test_load.py", "test_reliability_items.py", "test_circuits_gemma.py"]


def _doc_block(item: pytest.Item):
    """The documentation block a test_doc_examples case runs, or None."""
    if item.path.name != "test_doc_examples.py" or not hasattr(item, "callspec"):
        return None
    return item.callspec.params.get("block")


def _unit(item: pytest.Item, vllm_pages: set[str]) -> str:
    block = _doc_block(item)
    if block is not None:
        page = block.id.rsplit(":", 1)[0]
        return "vllm" if page in vllm_pages else f"doc:{page}"
    return "vllm" if item.path.name in VLLM_FILES else item.path.name


def pytest_configure(config: pytest.Config) -> None:
    if getattr(config.option, "numprocesses", None) and config.option.dist == "load":  # `-n N` alone
        config.option.dist = "loadgroup"
        config.option.loadscopereorder = False  # keep LONGEST_FIRST, not xdist's "most tests first"
    if getattr(config, "workerinput", {}).get("steerscope_groups"):  # the worker's side of the switch: xdist
        config.option.loadgroup = True  # names a test's group in its id only where the worker's own options say so


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node) -> None:
    """xdist (controller): tell each worker that tests run in groups (its options come from the command line)."""
    if node.config.option.dist == "loadgroup":
        node.workerinput["steerscope_groups"] = True


@pytest.hookimpl(tryfirst=True)  # before xdist's worker names each test's group from these markers
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not (os.environ.get("PYTEST_XDIST_WORKER") or getattr(config.option, "numprocesses", None)):
        return
    blocks = [b for b in map(_doc_block, items) if b is not None]
    vllm_pages = {b.id.rsplit(":", 1)[0] for b in blocks if "STEERSCOPE_VLLM_ENV" in (b.marker or "")}
    units = {id(item): _unit(item, vllm_pages) for item in items}
    for item in items:
        item.add_marker(pytest.mark.xdist_group(units[id(item)]))
    rank = {u: i for i, u in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda it: rank.get(units[id(it)], len(rank)))  # stable: file order within and after


@pytest.fixture(autouse=True)
def _threads_restored():
    """A test (or a study it runs in-process) that sets torch's thread count does not leak it to the next."""
    yield
    if torch.get_num_threads() != THREADS:
        torch.set_num_threads(THREADS)

VOCAB = 49152  # SmolLM2's tokenizer, so tiny models can share it


def tiny_config(family: str, vocab: int = VOCAB):
    """A 4-layer, d_model 64 config of ``family`` (model_type)."""
    import transformers as tr

    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                  num_attention_heads=4, max_position_embeddings=256)
    if family in ("llama", "mistral", "qwen2", "qwen3"):
        cls = {"llama": tr.LlamaConfig, "mistral": tr.MistralConfig, "qwen2": tr.Qwen2Config,
               "qwen3": tr.Qwen3Config}[family]
        kw = dict(common, num_key_value_heads=2, tie_word_embeddings=False)
        if family == "qwen3":
            kw["head_dim"] = 16
        return cls(**kw)
    if family == "gemma":
        return tr.GemmaConfig(**common, num_key_value_heads=2, head_dim=16)
    if family == "gemma2":
        return tr.Gemma2Config(**common, num_key_value_heads=2, head_dim=16, sliding_window=8,
                               query_pre_attn_scalar=16)
    if family == "gemma3_text":
        return tr.Gemma3TextConfig(**common, num_key_value_heads=2, head_dim=16, sliding_window=8,
                                   query_pre_attn_scalar=16)
    if family == "gpt2":
        return tr.GPT2Config(vocab_size=vocab, n_embd=64, n_layer=4, n_head=4, n_positions=256,
                             resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    if family == "gpt_neox":
        return tr.GPTNeoXConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                num_attention_heads=4, max_position_embeddings=256, use_parallel_residual=True,
                                rotary_pct=0.5, hidden_dropout=0.0, attention_dropout=0.0)
    raise KeyError(family)


FAMILY_NAMES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "gpt2", "gpt_neox"]


def make_tiny(family: str, seed: int = 0, tokenizer=None, vocab: int = VOCAB):
    """A tiny random LM wrapped as steerscope.LM (weights scaled up so norms matter)."""
    import transformers as tr

    import steerscope as ss

    torch.manual_seed(seed)
    cfg = tiny_config(family, vocab)
    model = tr.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # random norm weights so Gemma's (1 + w) and gamma-scaling are exercised
        for name, p in model.named_parameters():
            if "norm" in name or "ln" in name:
                p.add_(0.3 * torch.randn_like(p))
    return ss.from_hf(model.eval(), tokenizer, name=f"tiny-{family}")


@pytest.fixture(scope="session")
def smol():
    """The real embedded model (SmolLM2-135M-Instruct)."""
    import steerscope as ss

    return ss.load_model("smollm2-135m")


@pytest.fixture(scope="session")
def smol_tokenizer(smol):
    return smol.tokenizer


@pytest.fixture(scope="session")
def tiny_llama(smol_tokenizer):
    return make_tiny("llama", tokenizer=smol_tokenizer)


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory, smol_tokenizer):
    """A tiny random llama saved as a model folder (weights and the SmolLM2 tokenizer), for the CLI."""
    lm = make_tiny("llama", seed=5, tokenizer=smol_tokenizer)
    d = tmp_path_factory.mktemp("tiny")
    lm.model.save_pretrained(d)
    smol_tokenizer.save_pretrained(d)
    return d


def batch_ids(n: int = 2, length: int = 7, vocab: int = 1000, seed: int = 0, left_pad: int = 0):
    """Random token ids and a mask; the first row is left-padded by ``left_pad`` tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (n, length), generator=g)
    mask = torch.ones(n, length, dtype=torch.long)
    if left_pad:
        mask[0, :left_pad] = 0
        ids[0, :left_pad] = 0
    return {"input_ids": ids, "attention_mask": mask}
