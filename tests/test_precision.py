"""Low precision: fp64 reconstructs without false alarms, fp16 overflow stops the trace with a clear error."""

from __future__ import annotations

import warnings

import pytest
import torch

import tracelib as tl
from tracelib.attribution import TOLERANCE, Reconstruction, logit_precision
from tracelib.trace import build_rows, first_nonfinite, run_forward

PROMPT, ANSWER = "what is 1 + 1", " 2"


def _trace_without_warnings(model, *args, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a ReconstructionWarning fails the test
        return tl.trace(model, *args, **kw)


@pytest.mark.parametrize("convert", [False, True], ids=["loaded-fp64", "converted-to-fp64"])
def test_fp64_tiny_traces_without_a_reconstruction_warning(convert):
    model = (
        tl.load_model("tiny-arith").to(torch.float64) if convert else tl.load_model("tiny-arith", dtype=torch.float64)
    )
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    tr = _trace_without_warnings(model, [PROMPT, "what is 9 + 3"], [ANSWER, " 12"])
    rec = tr.dla.reconstruction
    assert rec.ok and rec.residual.dtype == torch.float64
    assert rec.residual.abs().max() < 1e-5  # fp32 rounding of the final norm, ~4e-7 here
    # Hugging Face's RMSNorm computes in fp32 even in an fp64 model, so its logits are fp32-exact.
    assert logit_precision(model) == torch.float32 and rec.tolerance == TOLERANCE[torch.float32]


def test_fp64_gpt2_reconstructs_to_fp64_rounding(gpt2_dir):
    """With a norm that stays in fp64 (nn.LayerNorm), nothing in the attribution path rounds to fp32."""
    model = tl.load_model(gpt2_dir, dtype=torch.float64)
    assert logit_precision(model) == torch.float64
    tr = _trace_without_warnings(model, PROMPT, ANSWER, metric="logit_diff")
    rec = tr.dla.reconstruction
    assert rec.ok and rec.tolerance == 1e-9
    assert rec.residual.abs().max() < 1e-12


def test_fp32_models_keep_their_precision(tiny, gpt2):
    assert logit_precision(tiny) == torch.float32 and logit_precision(gpt2) == torch.float32


@pytest.mark.parametrize(
    "attributed, actual",
    [(1.0, float("nan")), (float("nan"), 1.0), (float("inf"), float("inf")), (1.0, float("inf"))],
)
def test_reconstruction_with_inf_or_nan_is_not_ok(attributed, actual):
    rec = Reconstruction(torch.tensor([attributed]), torch.tensor([0.0]), torch.tensor([actual]), tolerance=1e-4)
    assert not rec.finite and not rec.ok
    assert Reconstruction(torch.tensor([1.0]), torch.tensor([0.0]), torch.tensor([1.0]), tolerance=1e-4).ok


def _fp16_tiny(scale_mlp_out: float = 1.0, scale_unembed: float = 1.0):
    model = tl.load_model("tiny-arith", dtype=torch.float16)
    with torch.no_grad():
        model.blocks[1].mlp.out.original_component.weight.mul_(scale_mlp_out)
        model.unembed.original_component.weight.mul_(scale_unembed)
    return model


def test_fp16_overflow_raises_and_names_the_first_layer():
    model = _fp16_tiny(scale_mlp_out=3000)  # layer 1's MLP output passes fp16's 65504
    calls = []
    model.hook_dict["hook_embed"].add_hook(lambda act, hook: calls.append(act.shape[0]))
    try:
        with pytest.raises(tl.NonFiniteError) as info:
            tl.trace(model, [PROMPT, "what is 12 + 13"], ANSWER)
    finally:
        model.reset_hooks()
    assert calls == [2]  # the check reads the one forward pass's cache, it does not run another
    message = str(info.value)
    for phrase in ("overflowed in float16", "blocks.1.hook_mlp_out", "layer 1's MLP output", "dtype=torch.float32"):
        assert phrase in message
    assert "bfloat16" in message
    assert isinstance(info.value, FloatingPointError)


def test_fp16_overflowing_logits_raise():
    """The reported bug: a +inf logit ranked 0, with a reconstruction said to be ok."""
    model = _fp16_tiny(scale_unembed=5000)
    with pytest.raises(tl.NonFiniteError, match="float16") as info:
        tl.trace(model, PROMPT, ANSWER)
    assert "logits" in str(info.value) and "unembedding" in str(info.value) and "float32" in str(info.value)


def test_fp16_without_overflow_still_traces():
    tr = tl.trace(_fp16_tiny(scale_mlp_out=300), PROMPT, ANSWER)  # large, but within fp16
    assert tr.dla.reconstruction.ok and int(tr.margin.rank[0]) == 0


def test_the_scan_skips_padding_and_goes_in_forward_order(tiny):
    rows = build_rows(tiny, ["what is 12 + 13", PROMPT], ANSWER)
    fwd = run_forward(tiny, rows)
    assert first_nonfinite(tiny, fwd) is None
    short = min(range(len(rows)), key=lambda r: len(rows[r].tokens))
    pad = int(fwd.lengths[short])  # first padding position of the shorter row
    fwd.full["hook_embed"][short, pad] = torch.inf  # padding: nothing traced reads it
    assert first_nonfinite(tiny, fwd) is None
    fwd.full["blocks.2.hook_mlp_out"][short, 3] = torch.nan
    fwd.full["blocks.1.attn.hook_z"][short, 2, 0, 1] = torch.nan  # earlier in the forward pass
    assert first_nonfinite(tiny, fwd) == ("blocks.1.attn.hook_z", short, 2)
    fwd.final["blocks.0.mlp.hook_post"][short, 0, 7] = torch.inf  # kept at the final position only
    assert first_nonfinite(tiny, fwd) == ("blocks.0.mlp.hook_post", short, pad - 1)
