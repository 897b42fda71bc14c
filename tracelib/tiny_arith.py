"""The bundled `tiny-arith` models: their data, their held-out split, and how they are trained.

`tiny-arith` is a 4-layer Qwen2-architecture model (RMSNorm, RoPE, SwiGLU, q/k/v biases, grouped-query
attention) with a byte-level BPE tokenizer that pre-tokenises like Qwen2.5: digits are split one by
one, a space before a digit is its own token and there is no BOS. It answers single-digit `+` and `-`
questions in several phrasings. `tiny-arith-chat` is the same model fine-tuned on a ChatML template,
as Qwen2.5-Instruct is to Qwen2.5.

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
    width = max(len(ids) for ids, _ in encoded)
    ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    labels = torch.full((len(encoded), width), -100, dtype=torch.long)
    for i, (seq, start) in enumerate(encoded):
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
        labels[i, start : len(seq)] = torch.tensor(seq[start:])
    return ids, mask, labels


def teacher_forced_accuracy(logits_fn, tokenizer, examples: list[Example], chat: bool) -> float:
    """Fraction of answer tokens (the space, every digit) predicted top-1 under teacher forcing.

    The end marker is not counted: it is not part of the answer a reader asks about.
    """
    encoded = encode(tokenizer, examples, chat)
    ids, mask, labels = _batch(encoded, tokenizer.pad_token_id)
    end_id = tokenizer.convert_tokens_to_ids("<|im_end|>" if chat else "<|endoftext|>")
    with torch.no_grad():
        logits = logits_fn(ids, mask)
    pred = logits[:, :-1].argmax(-1)
    target = labels[:, 1:]
    counted = (target != -100) & (target != end_id)
    return ((pred == target) & counted).sum().item() / counted.sum().item()


def _train(model, encoded, pad_id: int, steps: int, lr: float, batch_size: int, seed: int, log):
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))),
    )
    model.train()
    with torch.enable_grad():  # a notebook may have turned gradients off globally
        _steps(model, opt, sched, encoded, pad_id, steps, batch_size, gen, log)
    model.eval()


def _steps(model, opt, sched, encoded, pad_id, steps, batch_size, gen, log) -> None:
    for step in range(steps):
        idx = torch.randint(len(encoded), (batch_size,), generator=gen).tolist()
        ids, mask, labels = _batch([encoded[i] for i in idx], pad_id)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 250 == 0 or step == steps - 1:
            log(f"  step {step:5d}  loss {loss.item():.4f}")


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
| training | {steps} steps, seed {seed}, {seconds:.0f} s on {threads} CPU threads |

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
    base_steps = 2500
    log(f"{BASE_NAME}: {len(train)} train / {len(held)} held-out questions, vocab {len(tokenizer)}")
    _train(model, encode(tokenizer, train, False), tokenizer.pad_token_id, base_steps, 3e-3, 64, seed, log)
    base_seconds = time.time() - start
    results[BASE_NAME] = _card(model, tokenizer, train, held, False, base_steps, seed, base_seconds, threads)
    log(f"{BASE_NAME}: held-out accuracy {results[BASE_NAME]['acc']:.4f}")
    _save(model, tokenizer, BASE_NAME, results[BASE_NAME], out_dir)

    start = time.time()
    chat_steps = 2000
    # The chat markers were never seen in pre-training: start them at the mean embedding, as is
    # usual for new tokens, rather than where weight decay left them.
    embed = model.get_input_embeddings().weight
    new = [tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS[1:]]
    with torch.no_grad():
        embed[new] = embed[[i for i in range(embed.shape[0]) if i not in new]].mean(0)
    # Chat data only: mixing in plain prompts halved how fast the template was learned (62% held-out
    # after 1000 mixed steps). The chat model then answers plain prompts poorly; the card says so.
    log(f"{CHAT_NAME}: fine-tuning on the chat template")
    _train(model, encode(tokenizer, train, True), tokenizer.pad_token_id, chat_steps, 2e-3, 64, seed + 1, log)
    chat_seconds = time.time() - start
    results[CHAT_NAME] = _card(model, tokenizer, train, held, True, chat_steps, seed, chat_seconds, threads)
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
        "acc": teacher_forced_accuracy(_hf_logits(model), tokenizer, held, chat),
        "train_acc": teacher_forced_accuracy(_hf_logits(model), tokenizer, train, chat),
        "plain_acc": teacher_forced_accuracy(_hf_logits(model), tokenizer, held, False),
        "n_held": len(held),
        "steps": steps,
        "seed": seed,
        "seconds": seconds,
        "threads": threads,
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
