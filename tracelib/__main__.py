"""Command line: `python -m tracelib demo` (also installed as `tracelib`)."""

from __future__ import annotations

import argparse
import sys

import torch


def _demo(args: argparse.Namespace) -> int:
    import tracelib as tl

    torch.set_grad_enabled(False)
    model = tl.load_model(args.model)
    resolved = tl.resolve_answer(model, args.prompt, args.answer)
    print(f"model      {args.model}  ({model.cfg.n_layers} layers, d_model {model.cfg.d_model})")
    print(f"prompt     {resolved.typed_prompt!r} -> {resolved.prompt_str_tokens}")
    print(f"BOS        {'prepended' if resolved.prepended_bos else 'none (this tokenizer has no BOS)'}")
    print(f"answer     {resolved.typed_answer!r} -> {resolved.answer_str_tokens}")
    for note in resolved.notes:
        print(f"note       {note}")
    for step in resolved.steps:
        logits = model(step.tokens[None].to(model.cfg.device))[0, -1].float()
        probs = logits.softmax(-1)
        top = probs.topk(5)
        rank = int((logits > logits[step.target]).sum())
        predicted = model.tokenizer.decode([int(top.indices[0])])
        print(f"\nstep {step.index}: predict {step.target_str!r} after {model.tokenizer.decode(step.tokens[-3:])!r}")
        print(f"  prediction {predicted!r}; answer rank {rank}, p = {probs[step.target].item():.4f}")
        for p, i in zip(top.values.tolist(), top.indices.tolist()):
            print(f"  {model.tokenizer.decode([i])!r:>10}  p = {p:.4f}  logit = {logits[i].item():+.3f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tracelib", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="tokenise, predict and show the top 5 for one prompt")
    demo.add_argument("--model", default="tiny-arith")
    demo.add_argument("--prompt", default="what is 1 + 1")
    demo.add_argument("--answer", default=" 2")
    demo.set_defaults(func=_demo)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError) as exc:
        print(f"tracelib: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
