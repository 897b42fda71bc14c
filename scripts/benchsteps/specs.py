"""The models the bench measures, as specs the runner reads without loading torch: shapes, folders, load peaks."""

from __future__ import annotations

import json
from pathlib import Path

import fetch_fixture  # scripts/fetch_fixture.py: the real fixture's path, fetched if missing (stdlib only)

MODELS = ("tiny", "gpt2", "qwen", "qwen05", "smollm2")

# Peak RSS of a load: 0.5 GiB of imports plus this many times the processed model in the load's
# dtype (processing unties embed and unembed). Measured: TransformerLens's own processing
# 3.4-3.5x the fp32 model whatever the dtype (it upcasts everything to fp32 first); the lean path
# about 1.2x. A step whose load is predicted not to fit in MemAvailable is skipped (--force runs it).
PEAK_FACTOR = {"lean": 1.5, "transformerlens": 3.6}


def _qwen2(layers: int, hidden: int, mlp: int, heads: int) -> dict:
    """A Qwen2.5 config (2 KV heads, tied embeddings, as the released models)."""
    return dict(
        vocab_size=151936,
        hidden_size=hidden,
        intermediate_size=mlp,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        tie_word_embeddings=True,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
    )


def model_spec(name: str, layers: int | None) -> dict:
    """What to build (or load) for a model name; `layers` overrides the GPT-2 and Qwen layer counts."""
    if name == "tiny":
        return {"name": "tiny", "source": "tiny-arith", "layers": 4}
    if name == "smollm2":
        return {"name": "smollm2", "source": str(fetch_fixture.fetch(quiet=True)), "layers": 30}
    if name == "gpt2":
        return {
            "name": "gpt2",
            "arch": "gpt2",
            "config": dict(n_layer=layers or 12, n_embd=768, n_head=12, n_positions=1024, vocab_size=50257),
            "layers": layers or 12,
        }
    # save_dtype: as the real checkpoints are stored.
    if name == "qwen":
        config = _qwen2(layers or 28, hidden=1536, mlp=8960, heads=12)
        return {"name": "qwen", "arch": "qwen2", "config": config, "save_dtype": "bfloat16", "layers": layers or 28}
    if name == "qwen05":
        config = _qwen2(layers or 24, hidden=896, mlp=4864, heads=14)
        return {"name": "qwen05", "arch": "qwen2", "config": config, "save_dtype": "bfloat16", "layers": layers or 24}
    raise SystemExit(f"unknown model {name!r}; choose from {', '.join(MODELS)}")


def model_folder(spec: dict, workdir: Path) -> Path:
    """Where a built model lives under `workdir`."""
    return workdir / f"{spec['name']}-{spec['layers']}L"


def is_built(spec: dict, folder: Path) -> bool:
    """Whether `folder` holds a model built from exactly `spec` (its marker file matches)."""
    marker = folder / "bench_spec.json"
    return marker.is_file() and json.loads(marker.read_text()) == json.loads(json.dumps(spec, sort_keys=True))


def predicted_peak(estimate: dict, loader: str, dtype: str = "float32") -> float:
    """The peak RSS a load is predicted to reach, from the worker's `estimate` of the model's bytes."""
    size = {"float32": 1.0, "float16": 0.5, "bfloat16": 0.5}[dtype] if loader == "lean" else 1.0
    return 0.5 * 2**30 + PEAK_FACTOR[loader] * estimate["processed_bytes"] * size
