"""Generator of fastdpo's bundled demo preference set (``fastdpo/data/demo_{train,eval}.jsonl``).

The set carries a real, learnable preference signal on tasks a two-layer model picks up in a few hundred CPU steps:
every ``chosen`` completion is the correct answer and every ``rejected`` one is wrong.

Tasks on 3 to 6 random digits (whitespace-separated, so each digit is one token for any byte-level tokenizer):

- ``copy 4 0 7 =`` → ``4 0 7``
- ``reverse 4 0 7 =`` → ``7 0 4``
- ``sort 4 0 7 =`` → ``0 4 7``

The rejected completion is the correct answer with one digit (a quarter of the time two) replaced by a digit that
does not occur in the prompt, so it is wrong for every task. The held-out split uses prompts that never occur in the
training split, so rising held-out ``rewards/accuracies`` means the preference generalizes (answers are made of the
prompt's digits) rather than being memorized.

Regenerate (deterministic for a given seed) with::

    python fastdpo/data/make_demo.py            # writes demo_train.jsonl and demo_eval.jsonl next to this file
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

TASKS: tuple[str, ...] = ("copy", "reverse", "sort")
DIGITS: tuple[str, ...] = tuple(str(d) for d in range(10))


def answer_for(task: str, digits: list[str]) -> list[str]:
    """The correct completion (as digit tokens) of ``task`` on ``digits``."""
    if task == "copy":
        return list(digits)
    if task == "reverse":
        return list(reversed(digits))
    if task == "sort":
        return sorted(digits)
    raise ValueError(f"task must be one of {TASKS}, got {task!r}")


def make_pair(rng: random.Random, task: str, digits: list[str]) -> dict[str, str]:
    """One preference row ``{"prompt", "chosen", "rejected", "task"}`` for ``task`` on ``digits``.

    Completions start with a space so that the prompt's tokens are a prefix of the prompt+completion tokens.
    """
    answer = answer_for(task, digits)
    absent = [d for d in DIGITS if d not in digits]
    if not absent:
        raise ValueError(f"digits must leave at least one digit unused, got {digits}")
    rejected = list(answer)
    n_wrong = 2 if len(answer) > 3 and rng.random() < 0.25 else 1
    for pos in rng.sample(range(len(answer)), n_wrong):
        rejected[pos] = rng.choice(absent)
    prompt = f"{task} {' '.join(digits)} ="
    return {"prompt": prompt, "chosen": " " + " ".join(answer), "rejected": " " + " ".join(rejected), "task": task}


def generate(n_train: int = 2000, n_eval: int = 256, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Build the train and held-out splits (tasks in equal shares, held-out prompts disjoint from training ones)."""
    if n_train <= 0 or n_eval <= 0:
        raise ValueError(f"n_train and n_eval must be positive, got {n_train} and {n_eval}")
    rng = random.Random(seed)
    train_prompts: set[str] = set()

    def draw(split: str, n: int) -> list[dict]:
        rows: list[dict] = []
        while len(rows) < n:
            task = TASKS[len(rows) % len(TASKS)]
            digits = [rng.choice(DIGITS) for _ in range(rng.randint(3, 6))]
            row = make_pair(rng, task, digits)
            if split == "eval" and row["prompt"] in train_prompts:
                continue
            if split == "train":
                train_prompts.add(row["prompt"])
            rows.append(row)
        return rows

    train = draw("train", n_train)
    held_out = draw("eval", n_eval)
    return train, held_out


def write_jsonl(rows: list[dict], path: Path) -> None:
    """Write ``rows`` as JSON lines (UTF-8, one object per line)."""
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent)
    parser.add_argument("--n-train", type=int, default=2000)
    parser.add_argument("--n-eval", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    train, held_out = generate(args.n_train, args.n_eval, args.seed)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(train, args.out_dir / "demo_train.jsonl")
    write_jsonl(held_out, args.out_dir / "demo_eval.jsonl")
    print(f"wrote {len(train)} train and {len(held_out)} held-out pairs to {args.out_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
