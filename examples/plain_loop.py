"""DPO in a plain PyTorch loop with fastdpo's ``DPOEngine`` -- runs offline on CPU in about a minute.

What it shows, step by step:

1. a tokenizer trained in-process and a tiny Llama built from a config (no download; swap in
   ``AutoModelForCausalLM.from_pretrained(path)`` / ``AutoTokenizer.from_pretrained(path)`` for a real model);
2. a frozen copy of the initial policy as the reference model;
3. ``PreferenceCollator`` turning ``{"prompt", "chosen", "rejected"}`` rows into a batch (``packing="prefix_shared"``
   computes each prompt once per pair; ``"pad"`` is TRL's layout);
4. ``DPOEngine.step(batch) -> (loss, metrics)``: reference forward (no grad), policy forward through the fused LM
   head (no ``[tokens, vocab]`` logits), the preference loss and TRL-named metrics. ``backward`` and the optimizer
   stay yours, like any PyTorch loss;
5. held-out evaluation (``rewards/accuracies``: share of pairs whose chosen reward beats the rejected one).

Run::

    python examples/plain_loop.py                # 150 steps on the bundled demo set
    python examples/plain_loop.py --steps 20     # a quick smoke run
"""

from __future__ import annotations

import argparse

import torch

from fastdpo import DPOEngine, PreferenceCollator
from fastdpo.data import demo_data_files, load_preference_file
from fastdpo.tiny import build_tiny_model, train_tokenizer


def held_out_metrics(
    engine: DPOEngine, collator: PreferenceCollator, rows: list[dict], batch_size: int = 64
) -> dict[str, float]:
    """Pair-weighted mean of the engine's metrics over ``rows``, without gradients."""
    engine.model.eval()
    sums: dict[str, float] = {}
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            loss, metrics = engine.step(collator(chunk))
            for key, value in {"loss": loss, **metrics}.items():
                sums[key] = sums.get(key, 0.0) + float(value) * len(chunk)
    engine.model.train()
    return {key: total / len(rows) for key, total in sums.items()}


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--packing", choices=("pad", "padding_free", "prefix_shared"), default="prefix_shared")
    parser.add_argument("--eval-pairs", type=int, default=128)
    args = parser.parse_args(argv)
    torch.manual_seed(0)

    train_file, eval_file = demo_data_files()
    train_rows, eval_rows = load_preference_file(train_file), load_preference_file(eval_file)[: args.eval_pairs]

    # 1-2. tokenizer, policy and a frozen reference (the same initial weights: same seed)
    tokenizer = train_tokenizer([r[k] for r in train_rows for k in ("prompt", "chosen", "rejected")])
    policy = build_tiny_model(tokenizer, "llama", seed=0)
    reference = build_tiny_model(tokenizer, "llama", seed=0)

    # 3-4. collator and engine (the engine freezes the reference and disables dropout, like TRL)
    collator = PreferenceCollator(tokenizer, packing=args.packing)
    engine = DPOEngine(policy, reference, reference="model", loss_type="sigmoid", beta=args.beta)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.lr)

    before = held_out_metrics(engine, collator, eval_rows)
    policy.train()
    generator = torch.Generator().manual_seed(0)
    for step in range(1, args.steps + 1):
        idx = torch.randint(len(train_rows), (args.batch_size,), generator=generator).tolist()
        loss, metrics = engine.step(collator([train_rows[i] for i in idx]))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 25 == 0 or step == args.steps:
            accuracy, margin = float(metrics["rewards/accuracies"]), float(metrics["rewards/margins"])
            print(
                f"step {step:4d}  loss {loss.item():.4f}  rewards/accuracies {accuracy:.3f}  "
                f"rewards/margins {margin:.4f}"
            )

    # 5. held-out evaluation
    after = held_out_metrics(engine, collator, eval_rows)
    print(
        f"held-out rewards/accuracies {before['rewards/accuracies']:.3f} -> {after['rewards/accuracies']:.3f} "
        f"(loss {before['loss']:.4f} -> {after['loss']:.4f})"
    )
    return after


if __name__ == "__main__":
    main()
