"""What a trace explains: the logit difference by default, heads with their own value biases, and the
tokens the model's own tokenizer makes (a BOS only where it adds one).

Each test compares with an independent computation: the raw Hugging Face model run with PyTorch
hooks, TransformerLens's own DLA, or the raw-logit trace the difference is built from.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import tracelib as tl
from tracelib import models

PROMPT, ANSWER = "what is 1 + 1", " 2"


def _folder(name, request) -> str:
    return str(models._bundled_dir("tiny-arith")) if name == "tiny" else str(request.getfixturevalue(f"{name}_dir"))


@pytest.fixture(params=["tiny", "gpt2", "qwen"], scope="module")
def hf_and_bridge(request):
    """(raw transformers model, its tokenizer, the tracelib model) for each model family."""
    folder = _folder(request.param, request)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return hf, AutoTokenizer.from_pretrained(folder), request.getfixturevalue(request.param)


def test_the_default_metric_is_the_logit_difference(tiny):
    tr = tl.trace(tiny, PROMPT, ANSWER)
    assert tr.dla.metric == "logit_diff"
    torch.testing.assert_close(tr.dla.reconstruction.actual, tr.margin.logit_diff, rtol=1e-5, atol=1e-5)
    assert "'2' - mean('1', '3')" in tr.dla.plot().layout.title.text
    assert "'2' - mean('1', '3')" in tr.dla.plot("head").layout.title.text
    assert "'2' - mean('1', '3')" in tr.heads.plot().layout.title.text
    assert "'2' - mean('1', '3')" in tr.positions.plot().layout.title.text
    raw = tl.trace(tiny, PROMPT, ANSWER, metric="logit")
    assert "includes what lifts every candidate alike" in raw.dla.plot().layout.title.text
    with pytest.raises(ValueError, match="metric must be 'logit_diff'"):
        tl.trace(tiny, PROMPT, ANSWER, metric="prob")


def test_the_difference_is_the_answers_attribution_minus_the_distractors_mean(any_model):
    """Every unit, at every position: DLA(diff) = DLA(answer) - mean over distractors of DLA(distractor)."""
    diff = tl.trace(any_model, PROMPT, ANSWER)
    raw = tl.trace(any_model, PROMPT, ANSWER, metric="logit")
    prompt = diff.rows[0].prompt
    rivals = [tl.trace(any_model, prompt, s, metric="logit") for s in diff.margin.distractor_strs[0]]

    def check(get):
        expected = get(raw) - torch.stack([get(r) for r in rivals]).mean(0)
        scale = max(1.0, get(raw).abs().max().item())
        torch.testing.assert_close(get(diff), expected, rtol=1e-4, atol=1e-5 * scale)

    check(lambda t: t.dla.components)
    check(lambda t: t.dla.heads)
    check(lambda t: t.dla.neurons)
    check(lambda t: t.heads.sources)
    check(lambda t: t.positions.values[0])


def _head_writes_by_hf(hf, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every head's write to the residual stream at the last position, from the raw model's own o_proj.

    Returns `[layer, head, d_model]` writes, the final residual `[d_model]` before the final norm, and
    the final norm's module.
    """
    inner = hf.model if hasattr(hf, "model") else hf.transformer
    blocks = inner.layers if hasattr(inner, "layers") else inner.h
    cfg = hf.config
    n_heads = cfg.num_attention_heads
    d_head = cfg.hidden_size // n_heads
    seen = {}

    def grab(layer):
        def hook(module, args):
            seen[layer] = args[0][0, -1].detach()  # the heads' outputs, concatenated, before o_proj

        return hook

    handles = []
    for layer, block in enumerate(blocks):
        attn = block.self_attn if hasattr(block, "self_attn") else block.attn
        proj = attn.o_proj if hasattr(attn, "o_proj") else attn.c_proj
        handles.append(proj.register_forward_pre_hook(grab(layer)))
    try:
        with torch.no_grad():
            out = hf(torch.tensor([ids]), output_hidden_states=True)
    finally:
        for h in handles:
            h.remove()
    writes = []
    for layer, block in enumerate(blocks):
        attn = block.self_attn if hasattr(block, "self_attn") else block.attn
        x = seen[layer].reshape(n_heads, d_head)
        if hasattr(attn, "o_proj"):  # Linear: weight [d_model, n_heads * d_head]
            w = attn.o_proj.weight.reshape(cfg.hidden_size, n_heads, d_head).permute(1, 2, 0)
        else:  # GPT-2's Conv1D: weight [n_heads * d_head, d_model]
            w = attn.c_proj.weight.reshape(n_heads, d_head, cfg.hidden_size)
        writes.append(torch.einsum("he,hem->hm", x, w))
    final_norm = inner.norm if hasattr(inner, "norm") else inner.ln_f
    # hidden_states[-1] is after the final norm in transformers; rebuild the input from the last block.
    return torch.stack(writes), final_norm, out


def test_heads_own_their_value_biases_as_the_raw_model_computes_them(hf_and_bridge):
    """Each head's DLA equals its own output (value bias included) read through the final norm, from HF alone."""
    hf, tokenizer, model = hf_and_bridge
    tr = tl.trace(model, PROMPT, ANSWER)
    assert tr.dla.value_biases == "heads"
    ids = tr.rows[0].tokens.tolist()
    writes, norm, _ = _head_writes_by_hf(hf, ids)
    inner = hf.model if hasattr(hf, "model") else hf.transformer
    final_in = {}
    handle = norm.register_forward_pre_hook(lambda module, args: final_in.update(x=args[0][0, -1].detach()))
    try:
        with torch.no_grad():
            hf(torch.tensor([ids]))
    finally:
        handle.remove()
    x = final_in["x"]
    W = hf.get_output_embeddings().weight  # [vocab, d_model]
    target, rivals = tr.rows[0].target, tr.distractors[0]
    direction = (W[target] - W[rivals].mean(0)) * norm.weight
    if isinstance(norm, torch.nn.LayerNorm):  # centres, then divides by the std
        writes = writes - writes.mean(-1, keepdim=True)
        scale = (x - x.mean()).pow(2).mean().add(norm.eps).sqrt()
    else:  # RMSNorm
        scale = x.pow(2).mean().add(norm.variance_epsilon if hasattr(norm, "variance_epsilon") else norm.eps).sqrt()
    by_hf = (writes / scale) @ direction  # [layer, head]
    got = tr.dla.heads[:, :, 0]
    torch.testing.assert_close(got, by_hf.float(), rtol=1e-4, atol=1e-5 * max(1.0, by_hf.abs().max().item()))
    del inner


def test_folded_value_biases_equal_transformer_lens(any_model, request):
    """With fold_value_biases=True the heads are TransformerLens's `"head"` unit; each layer's total is unchanged."""
    from transformer_lens.tools.analysis import direct_logit_attribution

    name = next(n for n in ("tiny", "gpt2", "qwen") if request.getfixturevalue(n) is any_model)
    folded_model = tl.load_model("tiny-arith" if name == "tiny" else _folder(name, request), fold_value_biases=True)
    assert models.value_bias_convention(folded_model) == "folded"
    own = tl.trace(any_model, PROMPT, ANSWER, metric="logit")
    folded = tl.trace(folded_model, PROMPT, ANSWER, metric="logit")
    assert folded.dla.value_biases == "folded"
    tokens = folded.rows[0].tokens[None]
    ref = direct_logit_attribution(folded_model, tokens, answer_tokens=folded.rows[0].target, unit="head")
    n = folded_model.cfg.n_layers * folded_model.cfg.n_heads
    tol = dict(rtol=1e-4, atol=1e-5 * max(1.0, folded.dla.heads.abs().max().item()))
    torch.testing.assert_close(folded.dla.heads[:, :, 0].flatten(), ref.attribution[:n, 0].float().cpu(), **tol)
    layer_total = lambda t: t.dla.heads[:, :, 0].sum(1) + t.dla.head_bias[:, 0]  # noqa: E731
    torch.testing.assert_close(layer_total(own), layer_total(folded), **tol)
    # The difference between the conventions is exactly the heads' own value-bias writes, moved into the bias line.
    moved = own.dla.heads[:, :, 0] - folded.dla.heads[:, :, 0]
    torch.testing.assert_close(moved.sum(1), folded.dla.head_bias[:, 0] - own.dla.head_bias[:, 0], **tol)


def test_sources_split_the_value_bias_by_attention_and_still_sum_to_the_head(any_model):
    tr = tl.trace(any_model, PROMPT, ANSWER)
    torch.testing.assert_close(tr.heads.sources.sum(2), tr.dla.heads, rtol=1e-5, atol=1e-5)


def test_tokens_follow_the_models_own_tokenizer(hf_and_bridge):
    """The traced prompt is `tokenizer(prompt).input_ids`, and the traced top-1 is the raw model's."""
    hf, tokenizer, model = hf_and_bridge
    tr = tl.trace(model, PROMPT, ANSWER)
    prompt = tr.rows[0].prompt
    ids = tokenizer(prompt)["input_ids"]
    assert tr.rows[0].tokens.tolist() == ids
    with torch.no_grad():
        logits = hf(torch.tensor([ids])).logits[0, -1]
    # The raw model's top-1, up to a rival that ties it to rounding (two computations of the logits).
    assert logits[int(tr.margin.top_ids[0, 0])] >= logits.max() - 1e-5 * logits.abs().max()


def test_prepend_bos_overrides_the_tokenizer(gpt2):
    """GPT-2's tokenizer adds no BOS, so none by default; prepend_bos=True puts one in front, everywhere."""
    bos = gpt2.tokenizer.bos_token_id
    plain = tl.trace(gpt2, PROMPT, ANSWER)
    assert plain.rows[0].tokens.tolist() == gpt2.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    with_bos = tl.trace(gpt2, PROMPT, ANSWER, prepend_bos=True)
    assert with_bos.rows[0].tokens.tolist() == [bos] + plain.rows[0].tokens.tolist()
    assert tl.resolve_answer(gpt2, PROMPT, ANSWER, prepend_bos=True).prepended_bos
    injected = tl.inject(gpt2, PROMPT, "junk", "before", n=1, seed=0, answer=ANSWER, prepend_bos=True)
    assert injected.tokens[0] == bos and injected.clean_tokens.tolist() == with_bos.rows[0].tokens.tolist()


def test_prepend_bos_takes_only_a_bool_or_none(tiny):
    with pytest.raises(TypeError, match="prepend_bos must be True, False or None"):
        tl.resolve_answer(tiny, PROMPT, ANSWER, prepend_bos="yes")


def test_patching_follows_the_same_bos_rule(gpt2):
    """patch() resolves both prompts as trace() does; prepend_bos=True adds one position at the front."""
    clean, corrupted = "what is 1 + 1", "what is 3 + 1"
    plain = tl.patch(gpt2, clean, corrupted, ANSWER, min_effect=0)
    assert plain.str_tokens == tl.trace(gpt2, corrupted, ANSWER).rows[0].str_tokens
    with_bos = tl.patch(gpt2, clean, corrupted, ANSWER, min_effect=0, prepend_bos=True)
    assert with_bos.str_tokens == tl.trace(gpt2, corrupted, ANSWER, prepend_bos=True).rows[0].str_tokens
    assert len(with_bos.str_tokens) == len(plain.str_tokens) + 1
    estimate = tl.attribution_patch(gpt2, clean, corrupted, ANSWER, min_effect=0, prepend_bos=True)
    assert estimate.str_tokens == with_bos.str_tokens


def test_every_trace_figure_names_the_distractors(tiny):
    tr = tl.trace(tiny, PROMPT, ANSWER)
    (layer, head), _ = tr.heads.strongest()
    figures = {
        "margin": tr.margin.plot(),
        "lens": tr.lens.plot(),
        "dla": tr.dla.plot(),
        "heads": tr.heads.plot(),
        "sources": tr.heads.source(layer, head).plot(),
        "positions": tr.positions.plot(),
        "neurons": tr.dla.plot("neuron"),
    }
    for name, fig in figures.items():
        title = fig.layout.title.text
        assert "'1'" in title and "'3'" in title, (name, title)
