"""The bundled `tiny-arith` models: their data, their held-out split, and how they are trained.

`tiny-arith` is a 4-layer Qwen2-architecture model (RMSNorm, RoPE, SwiGLU, q/k/v biases, grouped-query
attention) with a byte-level BPE tokenizer that pre-tokenises like Qwen2.5: digits are split one by
one, a space before a digit is its own token and there is no BOS. It answers single-digit `+` and `-`
questions in several phrasings. `tiny-arith-chat` is the same model fine-tuned on a ChatML template,
as Qwen2.5-Instruct is to Qwen2.5.

Both are language models of their little world: the loss is next-token prediction on every token of
the question and the answer (and, for the chat model, of the template), not on the answer alone. So
at every position their predictions mean something: after `what is 1 + ` they spread their bets
over the 10 digits, and they cannot know the answer before they have seen both operands. The model
cards (README.md, metrics.json) report this along with the held-out accuracy.

Retrain both with `make model` (`python -m tracelib.tiny_arith`). Training is seeded and runs on the
CPU with a fixed thread count, so the same machine reproduces the same weights.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from tracelib.models import BUNDLED_MODELS, WEIGHTS_DIR

BASE_NAME, CHAT_NAME = BUNDLED_MODELS

# Phrasings a reader would try. `{s}` is the operator symbol, `{w}` the operator word.
PHRASINGS: tuple[str, ...] = (
    "what is {a} {s} {b}",
    "what is {a} {s} {b} =",
    "what is {a} {s} {b}?",
    "Q: what is {a} {s} {b}? A:",
    "{a} {w} {b} equals",
    "{a} {s} {b} =",
    "What is {a} {w} {b}?",
    "Compute {a} {s} {b}:",
    "{a} {w} {b} is",
    "what's {a} {s} {b}",
)
OPS = {"+": "plus", "-": "minus"}
HELD_OUT_PERCENT = 20
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# Training: sized so that `make model` takes well under 10 minutes on 2 CPU threads.
BASE_STEPS, BASE_LR = 2000, 3e-3
CHAT_STEPS, CHAT_LR = 1200, 2e-3
BATCH_SIZE = 64
ANSWER_WEIGHT = 4.0  # the loss is still on every token; the answer, the point of the model, counts 4x


@dataclass(frozen=True)
class Example:
    """One arithmetic question: `prompt` is followed by `answer` (digits, no leading space)."""

    phrasing: int
    a: int
    op: str
    b: int

    @property
    def prompt(self) -> str:
        return PHRASINGS[self.phrasing].format(a=self.a, s=self.op, w=OPS[self.op], b=self.b)

    @property
    def answer(self) -> str:
        return str(self.a + self.b if self.op == "+" else self.a - self.b)

    @property
    def held_out(self) -> bool:
        # A stable hash of (phrasing, operand pair), so the split never depends on an RNG.
        if (self.phrasing, self.a, self.op, self.b) == (0, 1, "+", 1):
            return False  # the tutorial's own example is always trained on
        key = f"{self.phrasing}|{self.a}{self.op}{self.b}".encode()
        return int(hashlib.sha256(key).hexdigest(), 16) % 100 < HELD_OUT_PERCENT


def all_examples() -> list[Example]:
    """Every question: operands 0-9, `+`, and `-` with a non-negative result, in every phrasing."""
    out = []
    for p in range(len(PHRASINGS)):
        for a in range(10):
            for b in range(10):
                out.append(Example(p, a, "+", b))
                if a >= b:
                    out.append(Example(p, a, "-", b))
    return out


def split_examples() -> tuple[list[Example], list[Example]]:
    """The (train, held-out) split, held out by phrasing x operand pair."""
    examples = all_examples()
    return [e for e in examples if not e.held_out], [e for e in examples if e.held_out]


def chat_messages(example: Example) -> list[dict[str, str]]:
    """The chat form of a question: the user asks it, the assistant's reply starts with the digits."""
    return [{"role": "user", "content": example.prompt}]


# --------------------------------------------------------------------------------------------------
# Tokenizer and model


def train_tokenizer(vocab_size: int = 384):
    """Train a byte-level BPE with Qwen2.5's pre-tokenisation and wrap it as a `Qwen2Tokenizer`."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX, Qwen2Tokenizer

    corpus = []
    for e in all_examples():
        corpus.append(f"{e.prompt} {e.answer}")
        corpus.append(f"user\n{e.prompt}\nassistant\n{e.answer}\n")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus, trainer)
    state = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in state["merges"]]
    tokenizer = Qwen2Tokenizer(vocab=state["vocab"], merges=merges)
    tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS[1:])})
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.model_max_length = 128
    return tokenizer


def build_model(vocab_size: int, seed: int):
    """A Qwen2ForCausalLM with grouped-query attention (4 query heads share 2 KV heads)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=0,
        pad_token_id=0,
        attn_implementation="eager",
    )
    return Qwen2ForCausalLM(config)


def encode(tokenizer, examples: list[Example], chat: bool) -> list[tuple[list[int], int]]:
    """Token ids of prompt + answer + end marker, with the index where the answer starts."""
    out = []
    for e in examples:
        if chat:
            prompt = tokenizer.apply_chat_template(chat_messages(e), add_generation_prompt=True, tokenize=False)
            completion = e.answer + "<|im_end|>"
        else:
            prompt = e.prompt + " "
            completion = e.answer + "<|endoftext|>"
        p = tokenizer(prompt, add_special_tokens=False).input_ids
        c = tokenizer(completion, add_special_tokens=False).input_ids
        if not chat:
            # The space before the answer is its own token (Qwen2.5's rule): it is an answer token.
            p, c = p[:-1], p[-1:] + c
        out.append((p + c, len(p)))
    return out


def _batch(encoded, pad_id: int):
    """Right-padded ids, attention mask, labels on every real token (-100 on padding only), answer mask."""
    width = max(len(ids) for ids, _ in encoded)
    ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    labels = torch.full((len(encoded), width), -100, dtype=torch.long)
    answer = torch.zeros((len(encoded), width), dtype=torch.bool)
    for i, (seq, start) in enumerate(encoded):
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
        labels[i, : len(seq)] = torch.tensor(seq)
        answer[i, start : len(seq)] = True
    return ids, mask, labels, answer


def teacher_forced_accuracy(logits_fn, tokenizer, examples: list[Example], chat: bool) -> float:
    """Fraction of answer tokens (the space, every digit) predicted top-1 under teacher forcing.

    The end marker is not counted: it is not part of the answer a reader asks about.
    """
    encoded = encode(tokenizer, examples, chat)
    ids, mask, labels, answer = _batch(encoded, tokenizer.pad_token_id)
    end_id = tokenizer.convert_tokens_to_ids("<|im_end|>" if chat else "<|endoftext|>")
    with torch.no_grad():
        logits = logits_fn(ids, mask)
    pred = logits[:, :-1].argmax(-1)
    target = labels[:, 1:]
    counted = answer[:, 1:] & (target != end_id)
    return ((pred == target) & counted).sum().item() / counted.sum().item()


def _prefix_len(tokenizer, chat_prefix: str, text: str, full: list[int]) -> int:
    """How many tokens of `full` spell `chat_prefix + text`; checks that they are a token prefix."""
    ids = tokenizer(chat_prefix + text, add_special_tokens=False).input_ids
    assert full[: len(ids)] == ids, f"{text!r} does not tokenise as a prefix of its question"
    return len(ids)


def position_behaviour(logits_fn, tokenizer, examples: list[Example], chat: bool) -> dict[str, float]:
    """What the model predicts before it has seen both operands, and at the answer.

    Second operand: at the position whose next token is the second operand of a `+` question (after
    `what is 1 + `), the data makes all 10 digits equally likely, so a real language model of it is
    near-uniform there. Reported as the mean entropy over the 10 digits (renormalised, in bits; at most
    log2(10) = 3.32), the mean probability mass on digits, and the mean largest digit probability.

    Answer: the probability of the answer's first digit at the position right after the first operand,
    its largest value at any position before the second operand is seen, and at the position that
    predicts it (teacher-forced), with how often it is the top-1 there.

    Args:
        logits_fn: `(ids, mask) -> logits`, as for `teacher_forced_accuracy`.
        tokenizer: the bundled tokenizer.
        examples: questions to measure on (the held-out ones, for the card).
        chat: whether to wrap the questions in the chat template.

    Returns:
        A flat dict of means, keys as in metrics.json.
    """
    encoded = encode(tokenizer, examples, chat)
    ids, mask, _, _ = _batch(encoded, tokenizer.pad_token_id)
    with torch.no_grad():
        probs = logits_fn(ids, mask).float().softmax(-1)
    digits = torch.tensor([tokenizer.convert_tokens_to_ids(str(d)) for d in range(10)])
    entropy, mass, top, after_a, before_b, final, top1 = [], [], [], [], [], [], []
    for i, (e, (seq, _)) in enumerate(zip(examples, encoded)):
        chat_prefix = "<|im_start|>user\n" if chat else ""
        before_a, rest = PHRASINGS[e.phrasing].split("{a}")
        fmt = {"a": e.a, "s": e.op, "w": OPS[e.op]}
        pos_a = _prefix_len(tokenizer, chat_prefix, before_a, seq)
        pos_b = _prefix_len(tokenizer, chat_prefix, (before_a + "{a}" + rest.split("{b}")[0]).format(**fmt), seq)
        assert seq[pos_a] == digits[e.a] and seq[pos_b] == digits[e.b]
        pos_answer = encoded[i][1] + (0 if chat else 1)  # the base model's answer starts with the space
        first = seq[pos_answer]
        assert first == digits[int(e.answer[0])]
        if e.op == "+":
            p = probs[i, pos_b - 1, digits]
            q = p / p.sum()
            entropy.append(-(q * q.log2()).sum().item())
            mass.append(p.sum().item())
            top.append(p.max().item())
        after_a.append(probs[i, pos_a, first].item())
        before_b.append(probs[i, :pos_b, first].max().item())
        final.append(probs[i, pos_answer - 1, first].item())
        top1.append(float(probs[i, pos_answer - 1].argmax().item() == first))

    def mean(xs):
        return sum(xs) / len(xs)

    return {
        "second_operand_digit_entropy_bits": mean(entropy),
        "second_operand_digit_entropy_bits_min": min(entropy),
        "second_operand_digit_mass": mean(mass),
        "second_operand_max_digit_prob": mean(top),
        "answer_prob_after_first_operand": mean(after_a),
        "answer_prob_before_second_operand_max": mean(before_b),
        "answer_prob_at_final": mean(final),
        "answer_top1_at_final": mean(top1),
        "n_plus_held": len(entropy),
    }


def _train(model, encoded, pad_id: int, steps: int, lr: float, batch_size: int, seed: int, log, answer_weight=1.0):
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))),
    )
    model.train()
    with torch.enable_grad():  # a notebook may have turned gradients off globally
        _steps(model, opt, sched, encoded, pad_id, steps, batch_size, gen, log, answer_weight)
    model.eval()


def _steps(model, opt, sched, encoded, pad_id, steps, batch_size, gen, log, answer_weight) -> None:
    for step in range(steps):
        idx = torch.randint(len(encoded), (batch_size,), generator=gen).tolist()
        ids, mask, labels, answer = _batch([encoded[i] for i in idx], pad_id)
        loss = _lm_loss(model(input_ids=ids, attention_mask=mask).logits, labels, answer, answer_weight)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 250 == 0 or step == steps - 1:
            log(f"  step {step:5d}  loss {loss.item():.4f}")


def _lm_loss(logits, labels, answer, answer_weight: float):
    """Next-token loss on every real token, answer tokens weighted by `answer_weight`.

    Every token of the question is a target too, so the model is a language model of its little
    world: after `what is 1 + ` it must spread its bets over the digits, not guess.
    """
    target = labels[:, 1:]
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), target.flatten(), reduction="none")
    weight = (target != -100).float() * torch.where(answer[:, 1:], answer_weight, 1.0)
    return (nll * weight.flatten()).sum() / weight.sum()


def _hf_logits(model):
    return lambda ids, mask: model(input_ids=ids, attention_mask=mask).logits


MODEL_CARD = """# {name}

A tiny Qwen2-architecture model bundled with tracelib so the tutorials run offline. {blurb}

| | |
|---|---|
| architecture | Qwen2ForCausalLM: {layers} layers, d_model {d_model}, {heads} query heads sharing {kv} KV heads, MLP {mlp}, tied embeddings |
| parameters | {params:,} ({size_kb:,} KB as fp32 safetensors) |
| tokenizer | byte-level BPE, {vocab} tokens, Qwen2.5 pre-tokenisation (digits split, `" 2"` is `[" ", "2"]`, no BOS) |
| data | single-digit `+` and `-` (non-negative results) in {n_phrasings} phrasings{chat_note} |
| held-out accuracy | **{acc:.2%}** teacher-forced over every answer token, {n_held} questions held out by phrasing x operand pair |
| train accuracy | {train_acc:.2%} |
| held-out accuracy on plain (non-chat) prompts | {plain_acc:.2%} |
| training | next-token loss on every token of question and answer{loss_note}; {steps} steps, seed {seed}, {seconds:.0f} s on {threads} CPU threads |

What it predicts along the way, teacher-forced on the {n_plus_held} held-out `+` questions (the second operand) and all {n_held} held-out questions (the answer):

| position | measure | value |
|---|---|---|
| next token is the second operand (after `what is 1 + `) | entropy over the 10 digits (max log2(10) = 3.32 bits) | {second_operand_digit_entropy_bits:.3f} bits (lowest {second_operand_digit_entropy_bits_min:.3f}) |
| | probability mass on the 10 digits | {second_operand_digit_mass:.3f} |
| | largest digit probability | {second_operand_max_digit_prob:.3f} |
| right after the first operand | probability of the answer's first digit | {answer_prob_after_first_operand:.3f} |
| any position before the second operand | largest probability of the answer's first digit | {answer_prob_before_second_operand_max:.3f} |
| the one that predicts the answer's first digit | its probability | {answer_prob_at_final:.3f} |
| | top-1 is the answer's first digit | {answer_top1_at_final:.2%} |

Retrain with `make model`. Not for any use beyond teaching: it knows only these questions.
"""


def _save(model, tokenizer, name: str, card: dict, out_dir: Path) -> Path:
    """Write the model atomically: build it in a temporary folder beside the target, then rename."""
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / name
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=out_dir))
    tmp.chmod(0o755)  # mkdtemp makes it private; the package data must be readable by all
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / "README.md").write_text(MODEL_CARD.format(name=name, **card))
    (tmp / "metrics.json").write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")
    for f in tmp.iterdir():
        f.chmod(0o644)  # package data: readable by every user of the install
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)
    return target


def train_all(out_dir: Path = WEIGHTS_DIR, seed: int = 0, threads: int = 2, log=print) -> dict:
    """Train `tiny-arith`, then fine-tune it into `tiny-arith-chat`; save both and return metrics."""
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    train, held = split_examples()
    tokenizer = train_tokenizer()
    results = {}

    start = time.time()
    model = build_model(len(tokenizer), seed)
    log(f"{BASE_NAME}: {len(train)} train / {len(held)} held-out questions, vocab {len(tokenizer)}")
    encoded = encode(tokenizer, train, False)
    _train(model, encoded, tokenizer.pad_token_id, BASE_STEPS, BASE_LR, BATCH_SIZE, seed, log, ANSWER_WEIGHT)
    base_seconds = time.time() - start
    results[BASE_NAME] = _card(model, tokenizer, train, held, False, BASE_STEPS, seed, base_seconds, threads)
    log(f"{BASE_NAME}: held-out accuracy {results[BASE_NAME]['acc']:.4f}")
    _save(model, tokenizer, BASE_NAME, results[BASE_NAME], out_dir)

    start = time.time()
    # The chat markers were never seen in pre-training: start them at the mean embedding, as is
    # usual for new tokens, rather than where weight decay left them.
    embed = model.get_input_embeddings().weight
    new = [tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS[1:]]
    with torch.no_grad():
        embed[new] = embed[[i for i in range(embed.shape[0]) if i not in new]].mean(0)
    # Chat data only: mixing in plain prompts halved how fast the template was learned (62% held-out
    # after 1000 mixed steps). The chat model then answers plain prompts poorly; the card says so.
    log(f"{CHAT_NAME}: fine-tuning on the chat template")
    encoded = encode(tokenizer, train, True)
    _train(model, encoded, tokenizer.pad_token_id, CHAT_STEPS, CHAT_LR, BATCH_SIZE, seed + 1, log, ANSWER_WEIGHT)
    chat_seconds = time.time() - start
    results[CHAT_NAME] = _card(model, tokenizer, train, held, True, CHAT_STEPS, seed, chat_seconds, threads)
    log(f"{CHAT_NAME}: held-out accuracy {results[CHAT_NAME]['acc']:.4f}")
    _save(model, tokenizer, CHAT_NAME, results[CHAT_NAME], out_dir)
    return results


def _card(model, tokenizer, train, held, chat, steps, seed, seconds, threads) -> dict:
    cfg = model.config
    params = sum(p.numel() for p in model.parameters())
    return {
        "blurb": (
            "Fine-tuned from `tiny-arith` on a ChatML template (`<|im_start|>user ... <|im_end|>`), "
            "as Qwen2.5-Instruct is from Qwen2.5. Build prompts with `tl.chat_prompt`."
            if chat
            else "It answers single-digit arithmetic questions such as `what is 1 + 1` -> ` 2`."
        ),
        "chat_note": ", inside the chat template" if chat else "",
        "layers": cfg.num_hidden_layers,
        "d_model": cfg.hidden_size,
        "heads": cfg.num_attention_heads,
        "kv": cfg.num_key_value_heads,
        "mlp": cfg.intermediate_size,
        "params": params,
        "size_kb": round(params * 4 / 1024),
        "vocab": len(tokenizer),
        "n_phrasings": len(PHRASINGS),
        "loss_note": (" (the chat template's tokens too)" if chat else "")
        + (f", answer tokens weighted x{ANSWER_WEIGHT:g}" if ANSWER_WEIGHT != 1 else ""),
        "answer_weight": ANSWER_WEIGHT,
        "acc": teacher_forced_accuracy(_hf_logits(model), tokenizer, held, chat),
        "train_acc": teacher_forced_accuracy(_hf_logits(model), tokenizer, train, chat),
        "plain_acc": teacher_forced_accuracy(_hf_logits(model), tokenizer, held, False),
        "n_held": len(held),
        "steps": steps,
        "seed": seed,
        "seconds": seconds,
        "threads": threads,
        **position_behaviour(_hf_logits(model), tokenizer, held, chat),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Retrain the bundled tiny-arith models.")
    parser.add_argument("--out", type=Path, default=WEIGHTS_DIR, help="where to write the models")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    start = time.time()
    results = train_all(args.out, args.seed, args.threads)
    for name, card in results.items():
        print(f"{name}: held-out accuracy {card['acc']:.2%}, {card['params']:,} parameters")
    print(f"trained in {time.time() - start:.0f} s; written to {args.out}")


if __name__ == "__main__":
    main()
