"""tracelib on a real trained model: SmolLM2-135M-Instruct (Llama, GQA 9/3, 30 layers), from its GGUF file.

Every check is against an independent computation, never a stored number: the raw transformers
model of the same dequantized checkpoint, read with PyTorch hooks and recomputed by hand, or
TransformerLens's own tools. `make fixture` fetches the file; the `smollm2` fixture loads it once.

TransformerLens's compatibility mode folds the final RMSNorm's weight into `W_U` and centres `W_U`
over the vocabulary, so the bridge's logit is the raw logit minus the mean logit over the vocabulary
(the same shift for every token: probabilities and logit differences are unchanged). DLA of the
`"logit"` metric therefore reads the residual along `w_norm * (W_U[answer] - mean_v W_U[v])`; the
`"logit_diff"` direction loses the mean anyway. RMSNorm models get no centring of writing weights,
so each head's and neuron's output vector is the raw model's, and both metrics compare directly.
"""

from __future__ import annotations

import pytest
import torch

import tracelib as tl

PROMPT, ANSWER = "what is 1 + 1 = ", "2"
DISTRACTORS = ["1", "3"]
# The corruption really changes the answer: "1 + 2 = " -> "3". Patching scores "2" against "3".
CORRUPTED, RIVAL = "what is 1 + 2 = ", "3"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread for this module: its many small forward passes gain little from a second, and on
    a shared 2-core machine two threads wait on each other whenever another process holds a core
    (measured: the patching test took 20 s alone and 5 minutes beside another test run)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _close(actual, expected, rtol=1e-4, atol_rel=1e-5, msg=""):
    """assert_close with an absolute tolerance scaled to the values' magnitude (fp32, deep model)."""
    expected = torch.as_tensor(expected, dtype=torch.float64)
    atol = atol_rel * max(1.0, expected.abs().max().item())
    torch.testing.assert_close(torch.as_tensor(actual, dtype=torch.float64), expected, rtol=rtol, atol=atol, msg=msg)


def _token_id(tokenizer, text: str) -> int:
    (token,) = tokenizer(text, add_special_tokens=False).input_ids
    return token


@pytest.fixture(scope="module")
def hf_run(smollm2, smollm2_hf):
    """The raw model's final-position pieces on the tokens tracelib traces, captured with forward hooks.

    The tokens come from tracelib, so the DLA checks hold whatever BOS convention the tokenizer
    follows (test_tokens_follow_the_tokenizer checks that separately).
    """
    hf, _ = smollm2_hf
    tokens = tl.resolve_answer(smollm2, PROMPT, ANSWER).prompt_tokens[None].cpu()
    seen: dict = {}

    def keep(key, kind):
        def hook(module, args, output=None):
            value = args[0] if kind == "input" else output[0] if isinstance(output, tuple) else output
            seen[key] = value[0, -1].detach().double()

        return hook

    inner = hf.model
    handles = [inner.embed_tokens.register_forward_hook(keep("embed", "output"))]
    handles.append(inner.norm.register_forward_pre_hook(keep("resid_final", "input")))
    for i, layer in enumerate(inner.layers):
        handles += [
            layer.self_attn.o_proj.register_forward_pre_hook(keep(("z", i), "input")),  # heads' weighted values
            layer.self_attn.register_forward_hook(keep(("attn_out", i), "output")),
            layer.mlp.down_proj.register_forward_pre_hook(keep(("post", i), "input")),  # neuron activations
            layer.mlp.register_forward_hook(keep(("mlp_out", i), "output")),
        ]
    try:
        with torch.no_grad():
            seen["logits"] = hf(tokens).logits[0, -1].double()
    finally:
        for handle in handles:
            handle.remove()
    return hf, tokens, seen


def _hf_dla(hf, seen, direction):
    """DLA from the raw model by hand: each unit's output vector, projected on `direction` through the final norm.

    Returns per-component `[1 + 2 * layer]` (embed, then attn and mlp per layer), `[layer, head]`
    and `[layer, neuron]` attributions, and the per-layer attention and MLP output biases.
    """
    cfg = hf.config
    n_heads, d_head = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    d_head = getattr(cfg, "head_dim", None) or d_head
    norm = hf.model.norm
    resid = seen["resid_final"]
    scale = (resid.pow(2).mean() + norm.variance_epsilon).sqrt()  # RMSNorm's, at the final position
    u = norm.weight.double() * direction.double() / scale
    components, heads, neurons, head_bias, neuron_bias = [seen["embed"] @ u], [], [], [], []
    for i, layer in enumerate(hf.model.layers):
        o_proj, down = layer.self_attn.o_proj, layer.mlp.down_proj
        z = seen[("z", i)].view(n_heads, d_head)
        W_O = o_proj.weight.double().view(-1, n_heads, d_head)  # [d_model, head, d_head]
        head_out = torch.einsum("mhe,he->hm", W_O, z)  # each head's write into the residual stream
        heads.append(head_out @ u)
        head_bias.append(0.0 if o_proj.bias is None else o_proj.bias.double() @ u)
        neuron_out = down.weight.double() * seen[("post", i)]  # [d_model, neuron]: act x down_proj column
        neurons.append(neuron_out.T @ u)
        neuron_bias.append(0.0 if down.bias is None else down.bias.double() @ u)
        components += [seen[("attn_out", i)] @ u, seen[("mlp_out", i)] @ u]
    return {
        "components": torch.stack(components),
        "heads": torch.stack(heads),
        "neurons": torch.stack(neurons),
        "head_bias": torch.tensor(head_bias, dtype=torch.float64),
        "neuron_bias": torch.tensor(neuron_bias, dtype=torch.float64),
    }


def _direction(hf, tokenizer, metric):
    W = hf.lm_head.weight.detach().double()  # [vocab, d_model], the raw unembedding
    answer = W[_token_id(tokenizer, ANSWER)]
    if metric == "logit":
        return answer - W.mean(0)  # compatibility mode's centred unembedding (see the module docstring)
    return answer - torch.stack([W[_token_id(tokenizer, d)] for d in DISTRACTORS]).mean(0)


def test_hooks_see_the_whole_residual_stream(hf_run):
    # The recomputation below is only as good as its decomposition: the pieces must add up.
    hf, _, seen = hf_run
    layers = range(hf.config.num_hidden_layers)
    total = seen["embed"] + sum(seen[("attn_out", i)] + seen[("mlp_out", i)] for i in layers)
    _close(total, seen["resid_final"], rtol=1e-5, atol_rel=1e-5)


def test_unembedding_is_centred_in_compatibility_mode(smollm2):
    # The "logit" direction above assumes it (TransformerLens's center_unembed).
    W_U = smollm2.W_U.detach()
    assert W_U.mean(-1).abs().max().item() < 1e-5 * W_U.abs().max().item()


@pytest.mark.parametrize("metric", ["logit", "logit_diff"])
def test_dla_matches_the_raw_model(smollm2, smollm2_hf, hf_run, metric):
    hf, tokenizer = smollm2_hf
    _, tokens, seen = hf_run
    tr = tl.trace(smollm2, PROMPT, ANSWER, distractors=DISTRACTORS, metric=metric)
    assert tr.rows[0].tokens.tolist() == tokens[0].tolist()
    assert tr.rows[0].target == _token_id(tokenizer, ANSWER)
    assert sorted(tr.distractors[0]) == sorted(_token_id(tokenizer, d) for d in DISTRACTORS)
    want = _hf_dla(hf, seen, _direction(hf, tokenizer, metric))
    dla = tr.dla
    n_layers = hf.config.num_hidden_layers
    expected_labels = ["embed"] + [f"{i}_{kind}" for i in range(n_layers) for kind in ("attn_out", "mlp_out")]
    assert dla.component_labels == expected_labels
    _close(dla.components[:, 0], want["components"], msg=f"components ({metric})")
    _close(dla.heads[:, :, 0], want["heads"], msg=f"heads ({metric})")
    _close(dla.head_bias[:, 0], want["head_bias"], msg=f"head bias ({metric})")
    _close(dla.neurons[:, :, 0], want["neurons"], msg=f"neurons ({metric})")
    _close(dla.neuron_bias[:, 0], want["neuron_bias"], msg=f"neuron bias ({metric})")
    # The model's own value: the raw logit (centred for "logit", as the bridge's is) or logit difference.
    logits = seen["logits"]
    if metric == "logit":
        value = logits[tr.rows[0].target] - logits.mean()
    else:
        value = logits[tr.rows[0].target] - logits[tr.distractors[0]].mean()
    _close(want["components"].sum(), value, rtol=1e-5, atol_rel=1e-5)
    _close(dla.reconstruction.actual[0], value, rtol=1e-5, atol_rel=1e-5)


@pytest.mark.parametrize("metric", ["logit", "logit_diff"])
def test_reconstruction_is_ok(smollm2, metric):
    rec = tl.trace(smollm2, PROMPT, ANSWER, distractors=DISTRACTORS, metric=metric).dla.reconstruction
    assert rec.ok, rec
    assert abs(rec.residual[0].item()) <= 1e-5 * max(1.0, abs(rec.actual[0].item())), rec
    assert rec.bias[0].item() == 0.0  # SmolLM2 has no unembedding bias


def test_lens_ends_at_the_model_logits(smollm2, smollm2_hf, hf_run):
    _, tokenizer = smollm2_hf
    _, tokens, seen = hf_run
    tr = tl.trace(smollm2, PROMPT, ANSWER, distractors=DISTRACTORS, metric="logit_diff")
    target, rivals = tr.rows[0].target, tr.distractors[0]
    with torch.no_grad():
        bridge = smollm2(tokens.to(smollm2.cfg.device))[0, -1].double().cpu()  # TransformerLens's forward
    raw = seen["logits"]
    for name in ("standard", "dla"):
        curve = getattr(tr.lens, name)
        _close(curve.logit[-1, 0], bridge[target], rtol=1e-5, msg=f"{name} lens logit vs the bridge")
        _close(curve.logit[-1, 0], raw[target] - raw.mean(), rtol=1e-5, msg=f"{name} lens logit vs the raw model")
        _close(curve.logit_diff[-1, 0], raw[target] - raw[rivals].mean(), rtol=1e-5, msg=f"{name} lens logit diff")
    _close(tr.margin.logit[0], bridge[target], rtol=1e-5)


def test_resid_pre_patching_equals_transformer_lens(smollm2):
    """tl.patch's resid_pre sweep against TransformerLens's get_act_patch_resid_pre, the same metric.

    TransformerLens runs one forward pass per cell (300 here, minutes on 2 CPU cores), so it is
    asked for a subset through its own `index_df`: every layer at the changed operand and at the
    final position (where the effect is), and every position at the first and last layer.
    """
    import pandas as pd
    from transformer_lens import patching as tl_patching

    result = tl.patch(smollm2, PROMPT, CORRUPTED, ANSWER, what="resid_pre", distractors=[RIVAL])
    device = smollm2.cfg.device
    clean = tl.resolve_answer(smollm2, PROMPT, ANSWER).prompt_tokens[None].to(device)
    corrupted = tl.resolve_answer(smollm2, CORRUPTED, ANSWER).prompt_tokens[None].to(device)
    answer = tl.resolve_answer(smollm2, PROMPT, ANSWER).token
    rival = tl.resolve_answer(smollm2, CORRUPTED, RIVAL).token

    def diff(logits):
        return logits[0, -1, answer].double() - logits[0, -1, rival].double()

    with torch.no_grad():
        _, cache = smollm2.run_with_cache(clean)
        clean_diff, corrupted_diff = diff(smollm2(clean)), diff(smollm2(corrupted))
    # A corruption that really flips the answer: "3" beats "2" on the corrupted prompt.
    assert clean_diff > 1 and corrupted_diff < -1, (clean_diff, corrupted_diff)
    assert not result.weak_effect

    def metric(logits):
        return (diff(logits) - corrupted_diff) / (clean_diff - corrupted_diff)

    n_layers, n_pos = smollm2.cfg.n_layers, clean.shape[1]
    assert result.values.shape == (n_layers, n_pos)
    (changed,) = (clean[0] != corrupted[0]).nonzero()[:, 0].tolist()
    cells = sorted(
        {(layer, pos) for layer in range(n_layers) for pos in (changed, n_pos - 1)}
        | {(layer, pos) for layer in (0, n_layers - 1) for pos in range(n_pos)}
    )
    index = pd.DataFrame(cells, columns=["layer", "pos"])
    theirs = tl_patching.get_act_patch_resid_pre(
        smollm2, corrupted, cache, metric, index_axis_names=None, index_df=index
    )
    ours = result.values[index["layer"].tolist(), index["pos"].tolist()]
    torch.testing.assert_close(ours.double(), theirs.double().cpu(), atol=1e-4, rtol=0)
    assert theirs.abs().max() > 0.5  # the subset holds the cells that matter, not just zeros
    _close(result.clean_metric, clean_diff, rtol=1e-5)
    _close(result.corrupted_metric, corrupted_diff, rtol=1e-5)


def test_tokens_follow_the_tokenizer(smollm2, smollm2_hf):
    """The prompt tracelib explains is the one the model sees: `tokenizer(prompt)`, no extra BOS."""
    hf, tokenizer = smollm2_hf
    expected = tokenizer(PROMPT).input_ids
    tr = tl.trace(smollm2, PROMPT, ANSWER, distractors=DISTRACTORS, metric="logit_diff")
    assert tr.rows[0].tokens.tolist() == expected
    with torch.no_grad():
        logits = hf(torch.tensor([expected])).logits[0, -1]
    top = tr.margin.top_ids[0, 0].item()
    # The raw model's top-1 (up to a rival tied to rounding: the two logits are computed differently).
    assert logits[top] >= logits.max() - 1e-5 * logits.abs().max()
    assert tokenizer.decode([top]) == ANSWER


def test_the_fixture_is_dequantized_once(smollm2, smollm2_file, monkeypatch):
    """Loading the GGUF file again reads the cached folder: nothing is dequantized a second time."""
    import json

    from tracelib import models
    from tracelib import smollm2 as fixture

    def must_not_run(*args):
        raise AssertionError("the fixture was dequantized again")

    monkeypatch.setattr(models, "dequantize_gguf", must_not_run)
    folder = models.gguf_folder(smollm2_file)
    marker = json.loads((folder / models.GGUF_MARKER).read_text())
    assert marker["sha256"] == fixture.SHA256
    assert folder.name == marker["sha256"][:16] and folder.parent == models.cache_dir() / "gguf"
    # The converter loaded the saved folder back and compared its logits with the GGUF model's (0.0 measured).
    assert marker["probe_max_abs_diff"] < 1e-3
