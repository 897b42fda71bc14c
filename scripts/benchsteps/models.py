"""Building, loading and sizing the models, inside worker processes (the 28-layer Qwen shape is 6 GB of fp32 weights).

Models are built from configs (random init) with the real GPT-2 / Qwen2.5 tokenizers, using the
helpers in tests/conftest.py, so nothing is downloaded.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

import tracelib as tl
from benchsteps import memory
from tracelib.models import _resolve_source, estimate_parameters

REPO = Path(__file__).resolve().parents[2]


def _conftest():
    sys.path.insert(0, str(REPO / "tests"))
    import conftest  # tests/ is no package: its helpers are reachable only by path

    return conftest


def build(spec: dict, folder: Path) -> None:
    """Random-init model from `spec`, saved with its real tokenizer (tests/conftest.py helpers)."""
    conftest = _conftest()
    torch.manual_seed(0)
    if spec["arch"] == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        tokenizer = conftest.gpt2_tokenizer(folder)
        model = GPT2LMHeadModel(GPT2Config(**spec["config"])).eval()
    else:
        from transformers import Qwen2Config, Qwen2ForCausalLM

        tokenizer = conftest.qwen_tokenizer()
        model = Qwen2ForCausalLM(Qwen2Config(**spec["config"])).eval()
    conftest._randomise_norms_and_biases(model)
    if spec.get("save_dtype"):
        model = model.to(getattr(torch, spec["save_dtype"]))
    # Small shards: serialising a shard holds a second copy of it in memory.
    model.save_pretrained(folder, max_shard_size="1GB")
    tokenizer.save_pretrained(folder)
    (folder / "bench_spec.json").write_text(json.dumps(spec, sort_keys=True))


def load(source: str, loader: str = "lean", dtype: str = "float32"):
    """`tl.load_model` on the bench's device; `loader` "lean" or "transformerlens" (`lean=False`)."""
    lean = {"lean": True, "transformerlens": False}[loader]
    return tl.load_model(source, dtype=getattr(torch, dtype), lean=lean, device=memory.DEVICE)


def weight_bytes(source: str, dtype: str = "float32") -> int:
    """Bytes of the checkpoint's parameters in `dtype` (tied embeddings counted once)."""
    return torch.empty((), dtype=getattr(torch, dtype)).element_size() * estimate_parameters(_resolve_source(source)[0])


def measure_estimate(source: str) -> dict:
    """fp32 bytes of the checkpoint, and of the processed model (processing unties embed/unembed)."""
    config = AutoConfig.from_pretrained(_resolve_source(source)[0])
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    weights = 4 * sum(p.numel() for p in model.parameters())
    out = model.get_output_embeddings()
    tied = out is not None and out.weight is model.get_input_embeddings().weight
    return {"weights_bytes": weights, "processed_bytes": weights + (4 * out.weight.numel() if tied else 0)}


def resident_param_bytes(model) -> int:
    """Bytes of the distinct tensors the loaded model holds (processing unties embed/unembed)."""
    seen, total = set(), 0
    tensors = list(model.original_model.parameters()) + list(model.original_model.buffers())
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.device.type == "cpu":
            key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
            if key not in seen:
                seen.add(key)
                total += key[1]
    return total
