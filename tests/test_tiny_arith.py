"""The bundled model: its split, and its held-out accuracy through the product's own load path."""

from __future__ import annotations

import json

import pytest

import tracelib as tl
from tracelib import tiny_arith
from tracelib.tiny_arith import PHRASINGS, split_examples


def test_split_holds_out_phrasing_by_operand_pairs():
    train, held = split_examples()
    assert not set(train) & set(held)
    assert 0.1 < len(held) / (len(train) + len(held)) < 0.3
    # Every phrasing and every operand pair is seen in training in some other combination.
    assert {e.phrasing for e in train} == set(range(len(PHRASINGS)))
    assert {(e.a, e.op, e.b) for e in held} <= {(e.a, e.op, e.b) for e in train}
    assert tiny_arith.Example(0, 1, "+", 1) in train


def test_data_covers_the_tutorial_phrasings_and_two_token_answers():
    prompts = {e.prompt for e in tiny_arith.all_examples()}
    for p in ["what is 1 + 1", "what is 1 + 1 =", "what is 1 + 1?", "Q: what is 1 + 1? A:", "1 plus 1 equals"]:
        assert p in prompts
    answers = {e.answer for e in tiny_arith.all_examples()}
    assert {str(n) for n in range(19)} == answers


@pytest.mark.parametrize("name, chat", [("tiny-arith", False), ("tiny-arith-chat", True)])
def test_held_out_accuracy_is_at_least_99_percent(name, chat, request):
    model = request.getfixturevalue("tiny_chat" if chat else "tiny")
    _, held = split_examples()

    def logits(ids, mask):
        # Right padding never affects earlier positions under causal attention.
        return model(ids)

    acc = tiny_arith.teacher_forced_accuracy(logits, model.tokenizer, held, chat)
    assert acc >= 0.99, f"{name}: held-out accuracy {acc:.4f}"


def test_model_card_reports_the_accuracy():
    for name in tl.BUNDLED_MODELS:
        metrics = json.loads((tiny_arith.WEIGHTS_DIR / name / "metrics.json").read_text())
        card = (tiny_arith.WEIGHTS_DIR / name / "README.md").read_text()
        assert metrics["acc"] >= 0.99
        assert f"{metrics['acc']:.2%}" in card


def test_training_is_reproducible_in_miniature(tmp_path):
    """Two short seeded runs give identical weights (the full run is `make model`)."""
    import torch

    tok = tiny_arith.train_tokenizer()
    train, _ = split_examples()
    encoded = tiny_arith.encode(tok, train[:64], False)
    weights = []
    for _ in range(2):
        torch.use_deterministic_algorithms(True)
        model = tiny_arith.build_model(len(tok), seed=0)
        tiny_arith._train(model, encoded, tok.pad_token_id, 5, 1e-3, 8, 0, lambda s: None)
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(weights[0], weights[1])


def test_bundled_tokenizer_matches_the_one_training_builds(tiny):
    """The shipped tokenizer is exactly what `make model` would rebuild."""
    tok = tiny_arith.train_tokenizer()
    text = "Q: what is 7 - 3? A: 4<|endoftext|>"
    assert tok(text).input_ids == tiny.tokenizer(text).input_ids
