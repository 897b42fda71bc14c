"""resolve_answer on the bundled tokenizer and on the real GPT-2 and Qwen2.5 vocabularies."""

from __future__ import annotations

import pytest
import torch

import tracelib as tl


def test_tiny_moves_the_space_into_the_prompt(tiny):
    r = tl.resolve_answer(tiny, "what is 1 + 1", " 2")
    assert r.prompt_str_tokens == ["what", " is", " ", "1", " +", " ", "1", " "]
    assert r.answer_str_tokens == ["2"] and r.is_single_token
    assert r.prompt == "what is 1 + 1 " and r.answer == "2"
    assert r.moved_whitespace == " " and not r.prepended_bos
    assert r.token == tiny.tokenizer.convert_tokens_to_ids("2")
    assert any("moved into the prompt" in n for n in r.notes)


def test_gpt2_vocab_keeps_space_digit_as_one_token_and_adds_no_bos(gpt2):
    """GPT-2's tokenizer adds no BOS, so neither does tracelib (TransformerLens would)."""
    r = tl.resolve_answer(gpt2, "what is 1 + 1", " 2")
    assert not r.prepended_bos
    assert r.prompt_str_tokens == ["what", " is", " 1", " +", " 1"]
    assert r.answer_str_tokens == [" 2"] and r.answer_tokens == [362]
    assert r.moved_whitespace == "" and r.notes == ()


def test_qwen_vocab_splits_space_and_has_no_bos(qwen):
    r = tl.resolve_answer(qwen, "what is 1 + 1", " 2")
    assert not r.prepended_bos
    assert r.prompt_tokens.tolist() == [12555, 374, 220, 16, 488, 220, 16, 220]
    assert r.answer_str_tokens == ["2"] and r.moved_whitespace == " "


@pytest.mark.parametrize("model_name", ["tiny", "qwen"])
def test_two_digit_answers_are_teacher_forced_steps(model_name, request):
    model = request.getfixturevalue(model_name)
    r = tl.resolve_answer(model, "what is 9 + 3", " 12")
    assert r.answer_str_tokens == ["1", "2"] and not r.is_single_token
    steps = r.steps
    assert [s.target_str for s in steps] == ["1", "2"]
    assert torch.equal(steps[0].tokens, r.prompt_tokens)
    assert steps[1].tokens.tolist() == r.prompt_tokens.tolist() + [r.answer_tokens[0]]
    # Each step's context is exactly the tokenisation of the text so far.
    assert steps[1].tokens.tolist() == model.to_tokens("what is 9 + 3 1")[0].tolist()


def test_single_token_requirement_shows_the_split(tiny):
    with pytest.raises(tl.MultiTokenAnswerError) as info:
        tl.resolve_answer(tiny, "what is 9 + 3", " 12", single_token=True)
    message = str(info.value)
    assert "['1', '2']" in message and "' '" in message and ".steps" in message


def test_gpt2_multi_token_answer(gpt2):
    r = tl.resolve_answer(gpt2, "The capital of France is", " Parisianism")
    assert len(r.answer_tokens) > 1
    with pytest.raises(tl.MultiTokenAnswerError, match="Parisianism"):
        _ = r.token


def test_prompt_ending_in_whitespace_drops_the_answers_space(tiny_chat):
    prompt = tl.chat_prompt(tiny_chat, "what is 1 + 1?")
    r = tl.resolve_answer(tiny_chat, prompt, " 2")
    assert r.answer == "2" and r.answer_str_tokens == ["2"] and r.prompt == prompt
    assert any("dropped" in n for n in r.notes)


def test_chat_prompt_uses_the_template(tiny_chat, qwen):
    prompt = tl.chat_prompt(tiny_chat, "what is 1 + 1?")
    assert prompt == "<|im_start|>user\nwhat is 1 + 1?<|im_end|>\n<|im_start|>assistant\n"
    tokens = tiny_chat.to_str_tokens(prompt)
    assert tokens[0] == "<|im_start|>" and tokens.count("<|im_end|>") == 1  # special tokens stay whole
    q = tl.resolve_answer(qwen, tl.chat_prompt(qwen, "what is 1 + 1?", system="Be brief."), "2")
    assert q.prompt_tokens[0].item() == 151644  # <|im_start|>, as on the real Qwen2.5
    assert "system\nBe brief." in q.prompt


def test_chat_prompt_refuses_a_model_without_template(gpt2):
    with pytest.raises(ValueError, match="no chat template"):
        tl.chat_prompt(gpt2, "what is 1 + 1?")


@pytest.mark.parametrize("prompt, answer", [("", " 2"), ("   ", " 2"), ("what is 1 + 1", "")])
def test_empty_inputs(tiny, prompt, answer):
    with pytest.raises(tl.EmptyInputError, match="empty"):
        tl.resolve_answer(tiny, prompt, answer)


def test_non_string_inputs(tiny):
    with pytest.raises(TypeError, match="string"):
        tl.resolve_answer(tiny, "what is 1 + 1", 2)


def test_prompt_too_long(tiny):
    prompt = "what is 1 + 1 " * 40
    with pytest.raises(tl.PromptTooLongError, match=f"context of {tiny.cfg.n_ctx}"):
        tl.resolve_answer(tiny, prompt, " 2")


def test_answer_direction_is_the_unembedding_column(any_model):
    r = tl.resolve_answer(any_model, "what is 1 + 1", " 2")
    direction = tl.answer_direction(any_model, r)
    torch.testing.assert_close(direction, any_model.W_U[:, r.token])
    diff = tl.answer_direction(any_model, r, r.token + 1)
    torch.testing.assert_close(diff, any_model.W_U[:, r.token] - any_model.W_U[:, r.token + 1])


def test_answer_direction_dot_final_residual_is_the_logit(tiny):
    """The direction is what the logit reads: ln_final(resid) . dir + b_U[answer] = logit."""
    r = tl.resolve_answer(tiny, "what is 1 + 1", " 2")
    logits, cache = tiny.run_with_cache(r.prompt_tokens[None])
    # apply_ln_to_stack takes [components, batch, pos, d_model] and divides by the cached scale.
    final = cache.apply_ln_to_stack(cache["resid_post", -1][None], layer=None)[0, 0, -1]
    logit = final @ tl.answer_direction(tiny, r) + tiny.b_U[r.token]
    torch.testing.assert_close(logit, logits[0, -1, r.token], atol=1e-4, rtol=1e-5)


def test_answer_direction_refuses_multi_token_strings(tiny):
    with pytest.raises(tl.MultiTokenAnswerError, match="resolve_answer"):
        tl.answer_direction(tiny, " 12")


@pytest.mark.parametrize(
    "prompt, answer, what", [(b"what is 1 + 1", " 2", "prompt"), ("what is 1 + 1", b" 2", "answer")]
)
def test_bytes_inputs_say_to_decode(tiny, prompt, answer, what):
    with pytest.raises(TypeError, match=rf"bytes.*{what}\.decode\('utf-8'\)"):
        tl.resolve_answer(tiny, prompt, answer)


def test_byte_fragment_answer_is_refused_with_its_ids_and_bytes(tiny):
    """The bundled byte-level BPE writes 'é' as two byte tokens, each decoding to '\ufffd' alone."""
    with pytest.raises(tl.ByteFragmentError) as info:
        tl.resolve_answer(tiny, "what is 1 + 1", " é")
    assert isinstance(info.value, ValueError)
    message = str(info.value)
    ids = tiny.to_tokens("é", prepend_bos=False)[0].tolist()
    assert "byte fragments, not characters" in message and "allow_byte_fragments=True" in message
    assert all(str(i) in message for i in ids) and r"b'\xc3'" in message and r"b'\xa9'" in message


def test_byte_fragments_are_allowed_on_request_and_labelled_by_their_bytes(tiny):
    r = tl.resolve_answer(tiny, "what is 1 + 1", " é", allow_byte_fragments=True)
    assert r.answer == "é" and r.moved_whitespace == " "
    assert r.answer_str_tokens == ["<0xC3>", "<0xA9>"]
    assert [tl.answers.token_bytes(tiny, t) for t in r.answer_tokens] == [b"\xc3", b"\xa9"]
    assert any("byte fragments" in n for n in r.notes)
    # Whole characters, even multi-byte ones, are not fragments.
    assert tl.resolve_answer(tiny, "what is 1 + 1", " 2").answer_str_tokens == ["2"]


@pytest.mark.parametrize("model_name", ["gpt2", "qwen"])
def test_real_vocabularies_label_fragments_apart(model_name, request):
    model = request.getfixturevalue(model_name)
    ids = model.to_tokens("\U0001f9ec", prepend_bos=False)[0].tolist()  # a rare emoji: split into byte tokens
    assert len(ids) > 1 and all(model.tokenizer.decode([i]) == "\ufffd" for i in ids)
    labels = [tl.answers.token_str(model, i) for i in ids]
    assert all(label.startswith("<0x") for label in labels) and len(set(labels)) == len(labels)
    with pytest.raises(tl.ByteFragmentError, match="byte fragments"):
        tl.resolve_answer(model, "The DNA emoji is", " \U0001f9ec")
