"""DLA invariants on the bundled model, a GPT-2-shaped model (b_U != 0) and a Qwen2-shaped GQA model."""

from __future__ import annotations

import pytest
import torch
from transformer_lens.tools.analysis import direct_logit_attribution

import tracelib as tl

PROMPT, ANSWER = "what is 1 + 1", " 2"


def _layer_rows(attr, kind):
    return attr.components[[attr.component_labels.index(f"{layer}_{kind}") for layer in range(attr.n_layers)]]


def test_components_sum_to_logit_minus_b_U(traced):
    model, tr, r = traced
    logits = model(r.prompt_tokens[None])[0, -1]
    attributed = tr.dla.components[:, 0].sum()
    expected = logits[r.token] - model.b_U[r.token]
    torch.testing.assert_close(attributed, expected.cpu(), rtol=1e-5, atol=1e-5 * max(1, expected.abs().item()))
    assert tr.dla.reconstruction.ok


def test_gpt2_b_U_is_not_zero_and_is_reported(gpt2):
    """GPT-2 folds ln_final's bias into b_U, so the sum is logit - b_U, not the logit."""
    tr = tl.trace(gpt2, PROMPT, ANSWER)
    rec = tr.dla.reconstruction
    assert abs(rec.bias[0].item()) > 1e-3
    torch.testing.assert_close(rec.attributed + rec.bias, rec.actual, rtol=1e-5, atol=1e-5)


def test_heads_plus_bias_sum_to_attn_out(traced):
    _, tr, _ = traced
    dla = tr.dla
    torch.testing.assert_close(dla.heads.sum(1) + dla.head_bias, _layer_rows(dla, "attn_out"), rtol=1e-5, atol=1e-5)


def test_neurons_plus_b_out_sum_to_mlp_out(traced):
    _, tr, _ = traced
    dla = tr.dla
    torch.testing.assert_close(dla.neurons.sum(1) + dla.neuron_bias, _layer_rows(dla, "mlp_out"), rtol=1e-5, atol=1e-4)


def test_layers_sum_components(traced):
    _, tr, _ = traced
    labels, values = tr.dla.by_layer()
    assert labels[0] == "embed" and len(labels) == tr.dla.n_layers + 1
    torch.testing.assert_close(values.sum(0), tr.dla.components.sum(0))


@pytest.mark.parametrize("metric", ["logit", "logit_diff"])
def test_components_match_transformer_lens(traced, metric):
    model, _, r = traced
    tr = tl.trace(model, PROMPT, ANSWER, metric=metric)
    kwargs = {}
    if metric == "logit_diff":
        (rival,) = tr.distractors[0][:1]
        tr = tl.trace(model, PROMPT, ANSWER, distractors=[rival], metric=metric)
        kwargs["incorrect_tokens"] = rival
    ref = direct_logit_attribution(model, r.prompt_tokens[None], answer_tokens=r.token, unit="component", **kwargs)
    assert ref.labels == tr.dla.component_labels
    torch.testing.assert_close(tr.dla.components[:, 0], ref.attribution[:, 0].cpu().float(), rtol=1e-4, atol=1e-4)


def test_heads_match_transformer_lens(traced):
    model, tr, r = traced
    ref = direct_logit_attribution(model, r.prompt_tokens[None], answer_tokens=r.token, unit="head")
    n = model.cfg.n_layers * model.cfg.n_heads
    assert ref.labels[:n] == [f"L{layer}H{h}" for layer in range(model.cfg.n_layers) for h in range(model.cfg.n_heads)]
    torch.testing.assert_close(
        tr.dla.heads[:, :, 0].flatten(), ref.attribution[:n, 0].cpu().float(), rtol=1e-4, atol=1e-4
    )


def test_neurons_match_the_full_decomposition(traced):
    """Projection-first neuron DLA equals TL's expanded stack (built here only because it is tiny)."""
    model, tr, r = traced
    _, cache = model.run_with_cache(r.prompt_tokens[None])
    layer = model.cfg.n_layers - 1
    stack = cache.get_neuron_results(layer, pos_slice=-1)  # [batch, neuron, d_model]
    ref = cache.logit_attrs(stack[0], tokens=r.token, pos_slice=-1, has_batch_dim=False)
    torch.testing.assert_close(tr.dla.neurons[layer, :, 0], ref.cpu().float(), rtol=1e-4, atol=1e-5)


def test_top_keeps_signs_and_orders_by_magnitude(traced):
    _, tr, _ = traced
    top = tr.dla.top(4, "head")
    assert list(top["value"].abs()) == sorted(top["value"].abs(), reverse=True)
    # Heads compete with the per-layer bias remainders, which are listed beside them.
    flat = torch.cat([tr.dla.heads[:, :, 0].flatten(), tr.dla.head_bias[:, 0]])
    assert top["value"].iloc[0] == pytest.approx(flat[flat.abs().argmax()].item())
    neurons = tr.dla.top_neurons(2)
    assert set(neurons["sign"]) == {"+", "-"} and len(neurons) == 4 * tr.dla.n_layers


def test_reconstruction_out_of_tolerance_warns(tiny, monkeypatch):
    """When the sums do not add up (fp16/bf16 weights, say) the user is told, not misled."""
    import tracelib.attribution as attribution
    from tracelib.attribution import Reconstruction

    rec = Reconstruction(torch.tensor([1.0]), torch.tensor([0.0]), torch.tensor([1.5]), tolerance=1e-4)
    assert not rec.ok and rec.residual.item() == pytest.approx(0.5)
    assert tl.trace(tiny, PROMPT, ANSWER).dla.reconstruction.ok
    monkeypatch.setitem(attribution.TOLERANCE, torch.float32, -1.0)  # nothing can pass now
    with pytest.warns(tl.ReconstructionWarning, match="dtype=torch.float32"):
        tl.trace(tiny, PROMPT, ANSWER)


def test_bf16_model_reconstructs_within_its_tolerance():
    model = tl.load_model("tiny-arith", dtype=torch.bfloat16)
    tr = tl.trace(model, PROMPT, ANSWER)
    rec = tr.dla.reconstruction
    assert rec.tolerance == 5e-2 and rec.ok
    assert abs(rec.residual[0].item()) > 1e-6  # bf16 really is inexact: the residual is visible


def test_result_frames_and_plots(traced):
    _, tr, _ = traced
    frame = tr.dla.to_frame("head")
    assert len(frame) == tr.dla.heads[:, :, 0].numel() + tr.dla.n_layers
    fig = tr.dla.plot("head")
    assert fig.data[0].type == "heatmap" and fig.data[0].zmid == 0 and fig.data[0].colorscale
    assert tr.dla.plot("component").layout.yaxis.title.text
    assert "residual" in repr(tr.dla)


def test_top_labels_match_the_frame_for_heads_and_neurons(tiny):
    """`top` labels only the units it returns; they are the labels `to_frame` gives the same values."""
    dla = tl.trace(tiny, "what is 1 + 1", " 2").dla
    for unit in ("head", "neuron"):
        frame = dla.to_frame(unit)
        by_label = dict(zip(frame[unit], frame["value"]))
        assert len(by_label) == len(frame)  # labels are unique
        top = dla.top(7, unit)
        assert list(top["value"].abs()) == sorted(frame["value"].abs(), reverse=True)[:7]
        for label, value in zip(top[unit], top["value"]):
            assert by_label[label] == value
