"""The bundled models: their split, their loss, and their held-out behaviour through the product's load path."""

from __future__ import annotations

import json

import pytest
import torch

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


@pytest.mark.parametrize("name, chat", [("tiny-arith", False), ("tiny-arith-chat", True)])
def test_model_is_unsure_until_it_has_seen_both_operands(name, chat, request):
    """A language model of its data, not an answer-only model: false for models trained on answers only.

    After `what is 1 + ` every digit is equally likely in the data, so the model spreads its bets over
    the 10 digits; it cannot know the answer before the second operand, and it does at the end.
    """
    model = request.getfixturevalue("tiny_chat" if chat else "tiny")
    _, held = split_examples()
    got = tiny_arith.position_behaviour(lambda ids, mask: model(ids), model.tokenizer, held, chat)
    assert got["second_operand_digit_entropy_bits"] > 3.0, got  # log2(10) = 3.32 is uniform
    assert got["second_operand_digit_entropy_bits_min"] > 2.5, got
    assert got["second_operand_digit_mass"] > 0.9, got
    assert got["second_operand_max_digit_prob"] < 0.3, got
    assert got["answer_prob_after_first_operand"] < 0.1, got
    assert got["answer_prob_before_second_operand_max"] < 0.4, got
    assert got["answer_top1_at_final"] == 1.0, got
    assert got["answer_prob_at_final"] > 0.9, got
    # The card's numbers are these, recomputed (the product's load path differs only in float error).
    metrics = json.loads((tiny_arith.WEIGHTS_DIR / name / "metrics.json").read_text())
    for key, value in got.items():
        assert metrics[key] == pytest.approx(value, abs=5e-3), key


def test_every_token_but_padding_is_a_target():
    tok = tiny_arith.train_tokenizer()
    train, _ = split_examples()
    for chat in (False, True):
        short, long = min(train, key=lambda e: len(e.prompt)), max(train, key=lambda e: len(e.prompt))
        encoded = tiny_arith.encode(tok, [short, long], chat)
        ids, mask, labels, answer = tiny_arith._batch(encoded, tok.pad_token_id)
        assert mask[0].sum() != mask[1].sum()  # one row is padded
        assert torch.equal(labels != -100, mask.bool())
        assert torch.equal(labels[mask.bool()], ids[mask.bool()])
        assert answer.sum() < mask.sum()  # the answer is only part of what is learned


def test_model_card_reports_the_accuracy_and_positions():
    for name in tl.BUNDLED_MODELS:
        metrics = json.loads((tiny_arith.WEIGHTS_DIR / name / "metrics.json").read_text())
        card = (tiny_arith.WEIGHTS_DIR / name / "README.md").read_text()
        assert metrics["acc"] >= 0.99
        assert f"{metrics['acc']:.2%}" in card
        assert f"{metrics['second_operand_digit_entropy_bits']:.3f} bits" in card
        assert f"{metrics['answer_prob_at_final']:.3f}" in card
        assert (tiny_arith.WEIGHTS_DIR / name / "model.safetensors").stat().st_size <= 5 * 2**20


def test_training_is_reproducible_in_miniature(tmp_path):
    """Two short seeded runs give identical weights (the full run is `make model`)."""
    tok = tiny_arith.train_tokenizer()
    train, _ = split_examples()
    encoded = tiny_arith.encode(tok, train[:64], False)
    weights = []
    # As `make model` trains; put the process-wide switch back after, for the tests that follow.
    was, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        for _ in range(2):
            model = tiny_arith.build_model(len(tok), seed=0)
            tiny_arith._train(model, encoded, tok.pad_token_id, 5, 1e-3, 8, 0, lambda s: None)
            weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    finally:
        torch.use_deterministic_algorithms(was, warn_only=warn_only)
    # The same code on the same inputs and machine, twice: bit for bit.
    assert torch.equal(weights[0], weights[1])


def test_bundled_tokenizer_matches_the_one_training_builds(tiny):
    """The shipped tokenizer is exactly what `make model` would rebuild."""
    tok = tiny_arith.train_tokenizer()
    text = "Q: what is 7 - 3? A: 4<|endoftext|>"
    assert tok(text).input_ids == tiny.tokenizer(text).input_ids
