"""``fastdpo train``: DPO training from a local model (or a tiny model built in-process) on a local preference file.

Examples::

    fastdpo train                                   # tiny Llama + in-process tokenizer on the bundled demo set
    fastdpo train --model ./my-model --data prefs.jsonl --eval-data held_out.jsonl --output-dir runs/a
    fastdpo train --output-dir runs/a --resume      # continue an interrupted run exactly where it stopped

Outputs under ``--output-dir``: ``metrics.jsonl`` (one JSON record per optimizer step and per evaluation),
``checkpoint.pt`` (model, optimizer, scheduler, RNG states, step and data order; replaced atomically), ``reference/``
(the frozen reference model and tokenizer; for a tiny model it is the initial weights) and ``model/`` (the final
model and tokenizer, ``save_pretrained`` format). The last line printed says where the model was written.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import signal
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_NAME = "checkpoint.pt"
LOG_NAME = "metrics.jsonl"
TINY_ARCHS = ("llama", "qwen2", "gemma2")
_PAIR_KEYS = ("prompt", "chosen", "rejected")
_TOKENIZED_KEYS = ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")


# ----------------------------------------------------------------------------------------------------------- data
def demo_data_files() -> tuple[Path, Path]:
    """Paths of the bundled demo set: ``(train, held_out)`` JSONL files (see ``fastdpo/data/make_demo.py``)."""
    root = resources.files("fastdpo") / "data"
    return Path(str(root / "demo_train.jsonl")), Path(str(root / "demo_eval.jsonl"))


def load_preference_file(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read preference rows from a ``.json`` / ``.jsonl`` / ``.parquet`` file.

    Each row needs ``prompt``, ``chosen`` and ``rejected`` (strings or chat message lists), or the pre-tokenized
    ``prompt_input_ids``, ``chosen_input_ids`` and ``rejected_input_ids``. A ``.json`` file holds a list of rows
    (or an object with a ``"data"`` / ``"train"`` list). Other keys are dropped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"preference file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
    elif suffix == ".json":
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
        if isinstance(obj, dict):
            obj = obj.get("data", obj.get("train"))
        if not isinstance(obj, list):
            raise ValueError(f"{path}: a .json preference file must hold a list of rows (or {{'data': [...]}})")
        rows = obj
    elif suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as exc:  # pragma: no cover - pyarrow ships with datasets
            raise ImportError("reading .parquet preference files needs pyarrow (pip install pyarrow)") from exc
        rows = pq.read_table(path).to_pylist()
    else:
        raise ValueError(f"unsupported preference file type {suffix!r} for {path}: use .json, .jsonl or .parquet")
    if not rows:
        raise ValueError(f"{path} holds no preference rows")
    keys = _TOKENIZED_KEYS if all(k in rows[0] for k in _TOKENIZED_KEYS) else _PAIR_KEYS
    cleaned = []
    for i, row in enumerate(rows):
        missing = [k for k in keys if k not in row]
        if missing:
            raise ValueError(f"{path}: row {i} lacks {missing}; every row needs {list(keys)}")
        cleaned.append({k: row[k] for k in keys})
    return cleaned


def _row_texts(row: dict[str, Any]) -> Iterator[str]:
    for key in _PAIR_KEYS:
        value = row.get(key)
        if isinstance(value, str):
            yield value
        elif isinstance(value, list):  # chat messages
            for message in value:
                if isinstance(message, dict) and isinstance(message.get("content"), str):
                    yield message["content"]


# ------------------------------------------------------------------------------------------- tiny model + tokenizer
_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}<eos>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def train_tokenizer(texts: Sequence[str], vocab_size: int = 512):
    """Train a byte-level BPE tokenizer in-process on ``texts`` (no download).

    Special tokens: ``<pad>`` (id 0), ``<eos>``, ``<bos>`` and the chat roles; a minimal chat template is set so
    conversational rows work too. Returns a ``transformers.PreTrainedTokenizerFast``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<bos>", "<|system|>", "<|user|>", "<|assistant|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", padding_side="right"
    )
    fast.chat_template = _CHAT_TEMPLATE
    return fast


def build_tiny_model(tokenizer, arch: str = "llama", *, hidden_size: int = 64, num_layers: int = 2, seed: int = 0):
    """A small randomly initialized causal LM (``arch`` in llama/qwen2/gemma2) sized to ``tokenizer``, fp32, eager
    attention. The same seed gives the same weights."""
    from transformers import (
        AutoModelForCausalLM,
        Gemma2Config,
        LlamaConfig,
        Qwen2Config,
    )

    if arch not in TINY_ARCHS:
        raise ValueError(f"arch must be one of {TINY_ARCHS}, got {arch!r}")
    if hidden_size % 16:
        raise ValueError(f"hidden_size must be a multiple of 16 (4 heads of even size), got {hidden_size}")
    common = {
        "vocab_size": len(tokenizer),
        "hidden_size": hidden_size,
        "intermediate_size": 2 * hidden_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "tie_word_embeddings": True,
    }
    if arch == "llama":
        config = LlamaConfig(**common)
    elif arch == "qwen2":
        config = Qwen2Config(**common)
    else:
        config = Gemma2Config(**common, head_dim=hidden_size // 4, query_pre_attn_scalar=hidden_size // 4,
                              sliding_window=64)
    config._attn_implementation = "eager"
    with _fork_rng(seed):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model


@contextlib.contextmanager
def _fork_rng(seed: int) -> Iterator[None]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


# ------------------------------------------------------------------------------------------------ RNG + checkpoint
def rng_state() -> dict[str, Any]:
    """Python, NumPy, torch CPU (and CUDA when present) RNG states."""
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    with contextlib.suppress(ImportError):
        import numpy as np

        state["numpy"] = np.random.get_state()
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """``torch.save(state)`` to a temporary file in the same folder, fsync, then ``os.replace`` (atomic): a crash
    mid-save leaves the previous checkpoint intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


class DataOrder:
    """Deterministic epoch-wise shuffling that can be saved and resumed mid-epoch.

    Epoch ``e`` visits the rows in ``torch.randperm(n, generator=seed + e)`` order, in batches of ``batch_size``
    (the last batch of an epoch may be smaller).
    """

    def __init__(self, num_rows: int, batch_size: int, seed: int) -> None:
        if num_rows <= 0:
            raise ValueError(f"num_rows must be positive, got {num_rows}")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.num_rows, self.batch_size, self.seed = num_rows, batch_size, seed
        self.epoch, self.cursor = 0, 0
        self.order = self._permutation(0)

    @property
    def batches_per_epoch(self) -> int:
        return math.ceil(self.num_rows / self.batch_size)

    def _permutation(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.num_rows, generator=g).tolist()

    def next_batch(self) -> list[int]:
        """Row indices of the next batch (advances the cursor, rolling over to a fresh epoch)."""
        if self.cursor >= self.num_rows:
            self.epoch += 1
            self.cursor = 0
            self.order = self._permutation(self.epoch)
        batch = self.order[self.cursor : self.cursor + self.batch_size]
        self.cursor += len(batch)
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"num_rows": self.num_rows, "batch_size": self.batch_size, "seed": self.seed, "epoch": self.epoch,
                "cursor": self.cursor, "order": list(self.order)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if (state["num_rows"], state["batch_size"]) != (self.num_rows, self.batch_size):
            raise ValueError(
                f"checkpoint data order is for {state['num_rows']} rows in batches of {state['batch_size']}, but this "
                f"run has {self.num_rows} rows in batches of {self.batch_size}: resume with the same --data and "
                "--batch-size"
            )
        self.seed, self.epoch, self.cursor, self.order = state["seed"], state["epoch"], state["cursor"], state["order"]


# ---------------------------------------------------------------------------------------------------- training
def pretokenize(collator, rows: list[dict[str, Any]]) -> list[dict[str, list[int]]]:
    """Rows tokenized once with ``collator.tokenize_row`` (EOS/BOS/chat template applied) as pre-tokenized rows
    ``{"prompt_input_ids", "chosen_input_ids", "rejected_input_ids"}``, which the collator uses verbatim."""
    return [dict(zip(_TOKENIZED_KEYS, collator.tokenize_row(row, i))) for i, row in enumerate(rows)]


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _scalar(value: Any) -> float:
    return float(value.detach().float().item()) if isinstance(value, torch.Tensor) else float(value)


def evaluate(engine, model: torch.nn.Module, collator, rows: list[dict[str, Any]], batch_size: int,
             device: torch.device, max_batches: int | None = None) -> dict[str, float]:
    """Held-out metrics: every engine metric (rewards/accuracies, rewards/margins, ...) and the loss, averaged over
    pairs (each batch weighted by its pair count). Runs under ``torch.no_grad`` with the model in eval mode."""
    was_training = model.training
    model.eval()
    totals: dict[str, float] = {}
    seen = 0
    try:
        with torch.no_grad():
            for b, start in enumerate(range(0, len(rows), batch_size)):
                if max_batches is not None and b >= max_batches:
                    break
                chunk = rows[start : start + batch_size]
                loss, metrics = engine.step(_to_device(collator(chunk), device))
                n = len(chunk)
                seen += n
                totals["loss"] = totals.get("loss", 0.0) + _scalar(loss) * n
                for key, value in metrics.items():
                    totals[key] = totals.get(key, 0.0) + _scalar(value) * n
    finally:
        model.train(was_training)
    return {f"eval_{k}": v / max(seen, 1) for k, v in totals.items()}


def _lr_lambda(schedule: str, warmup: int, total: int):
    def fn(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))  # cosine

    return fn


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fastdpo train",
        description="Train a causal LM with DPO on a local preference file (JSON/JSONL/Parquet) or the bundled "
        "demo set, with fastdpo's engine (fused LM head, packing, reference modes).",
    )
    g = p.add_argument_group("model")
    g.add_argument("--model", help="local model folder (save_pretrained format). Default: a tiny model built from a "
                   "config, with a tokenizer trained in-process on the data")
    g.add_argument("--arch", choices=TINY_ARCHS, default="llama", help="tiny model architecture (no --model)")
    g.add_argument("--hidden-size", type=int, default=64, help="tiny model width (no --model)")
    g.add_argument("--layers", type=int, default=2, help="tiny model depth (no --model)")
    g.add_argument("--vocab-size", type=int, default=512, help="in-process tokenizer vocabulary (no --model)")
    g.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    g.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    g.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    g = p.add_argument_group("data")
    g.add_argument("--data", help="training preference file (.json/.jsonl/.parquet). Default: bundled demo set")
    g.add_argument("--eval-data", help="held-out preference file. Default: the demo's held-out split with the demo "
                   "set, else --eval-fraction of --data")
    g.add_argument("--eval-fraction", type=float, default=0.1, help="held-out share of --data without --eval-data")
    g.add_argument("--max-length", type=int, default=None, help="truncate prompt+completion to this many tokens")
    g.add_argument("--packing", choices=("pad", "padding_free", "prefix_shared"), default="pad")
    g = p.add_argument_group("DPO")
    g.add_argument("--loss-type", nargs="+", default=["sigmoid"], help="one or more TRL loss types")
    g.add_argument("--loss-weights", type=float, nargs="+", default=None)
    g.add_argument("--beta", type=float, default=0.1)
    g.add_argument("--label-smoothing", type=float, default=0.0)
    g = p.add_argument_group("optimization")
    g.add_argument("--steps", type=int, default=300, help="optimizer steps")
    g.add_argument("--batch-size", type=int, default=16, help="preference pairs per step")
    g.add_argument("--lr", type=float, default=None,
                   help="peak learning rate (default: 3e-3 for the tiny in-process model, 1e-6 with --model)")
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--warmup-steps", type=int, default=10)
    g.add_argument("--lr-schedule", choices=("constant", "linear", "cosine"), default="linear")
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="0 disables clipping")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("logging, evaluation, checkpoints")
    g.add_argument("--output-dir", default="fastdpo-output")
    g.add_argument("--eval-every", type=int, default=50, help="evaluate every N steps (0: only before and after)")
    g.add_argument("--eval-batch-size", type=int, default=32)
    g.add_argument("--eval-batches", type=int, default=None, help="cap on held-out batches per evaluation")
    g.add_argument("--save-every", type=int, default=50, help="checkpoint every N steps (0: only at the end)")
    g.add_argument("--log-every", type=int, default=10, help="print a metrics line every N steps")
    g.add_argument("--resume", action="store_true", help="continue from --output-dir/checkpoint.pt")
    g.add_argument("--stop-after", type=int, default=None,
                   help="checkpoint and exit after N steps of this invocation (time-sliced jobs; resume later)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _split_rows(rows: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"--eval-fraction must be in (0, 1), got {fraction}")
    n_eval = max(1, round(len(rows) * fraction))
    if n_eval >= len(rows):
        raise ValueError(f"--data has {len(rows)} rows: too few to hold out {fraction:.0%} for evaluation")
    perm = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed + 10_007)).tolist()
    return [rows[i] for i in perm[n_eval:]], [rows[i] for i in perm[:n_eval]]


class _LogWriter:
    """Append-only JSONL metrics log; on resume, records past the checkpoint's step are dropped first so the log
    reads like an uninterrupted run."""

    def __init__(self, path: Path, resume_step: int | None) -> None:
        self.path = path
        if resume_step is None:
            path.write_text("")
        elif path.exists():
            kept = []
            for line in path.read_text().splitlines():
                if line.strip() and json.loads(line).get("step", 0) <= resume_step:
                    kept.append(line)
            path.write_text("".join(line + "\n" for line in kept))
        self._f = open(path, "a", encoding="utf-8")  # noqa: SIM115 - kept open for the whole run, closed by close()

    def write(self, record: dict[str, Any]) -> None:
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def _format(record: dict[str, Any], keys: Sequence[str]) -> str:
    parts = [f"step {record['step']}"]
    for k in keys:
        if k in record:
            parts.append(f"{k} {record[k]:.4f}")
    return " | ".join(parts)


def _load_data(args: argparse.Namespace) -> tuple[list[dict], list[dict], str]:
    """(train rows, held-out rows, description) from --data/--eval-data/--eval-fraction or the demo set."""
    if args.data is None:
        train_file, eval_file = demo_data_files()
        train_rows = load_preference_file(train_file)
        eval_rows = load_preference_file(args.eval_data or eval_file)
        data_desc = f"bundled demo set ({len(train_rows)} train / {len(eval_rows)} held-out pairs)"
    else:
        train_rows = load_preference_file(args.data)
        if args.eval_data:
            eval_rows = load_preference_file(args.eval_data)
        else:
            train_rows, eval_rows = _split_rows(train_rows, args.eval_fraction, args.seed)
        data_desc = f"{args.data} ({len(train_rows)} train / {len(eval_rows)} held-out pairs)"

    return train_rows, eval_rows, data_desc


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``fastdpo train``; returns the process exit code (0 done, 130 interrupted, 2 usage error)."""
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    for name in ("steps", "batch_size", "eval_batch_size"):
        if getattr(args, name) <= 0:
            print(f"fastdpo train: --{name.replace('_', '-')} must be positive", file=sys.stderr)
            return 2
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from fastdpo.collator import PreferenceCollator
    from fastdpo.engine import DPOEngine

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / CHECKPOINT_NAME
    ref_dir = out / "reference"
    checkpoint = None
    if args.resume:
        if not ckpt_path.is_file():
            print(f"fastdpo train: --resume given but {ckpt_path} does not exist", file=sys.stderr)
            return 2
        checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        if checkpoint["args"]["steps"] != args.steps or checkpoint["args"]["seed"] != args.seed:
            print("fastdpo train: --resume needs the same --steps and --seed as the interrupted run "
                  f"(checkpoint: steps={checkpoint['args']['steps']} seed={checkpoint['args']['seed']})",
                  file=sys.stderr)
            return 2

    device = _resolve_device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    hf_logging.disable_progress_bar()  # no per-load "Loading weights" bars: one progress bar, ours
    dtype = getattr(torch, args.dtype)
    random.seed(args.seed)
    torch.manual_seed(args.seed)

    # data
    try:
        train_rows, eval_rows, data_desc = _load_data(args)
    except (FileNotFoundError, ValueError, TypeError) as exc:
        print(f"fastdpo train: {exc}", file=sys.stderr)
        return 2

    # model, reference, tokenizer: the reference is the initial policy (for a tiny model, its initial weights are
    # saved under reference/ so that --resume rebuilds the very same reference)
    if args.model is not None:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        ref_source = args.model
    elif args.resume and (ref_dir / "config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(ref_dir)
        ref_source = str(ref_dir)
    else:
        if "prompt_input_ids" in train_rows[0]:
            print("fastdpo train: pre-tokenized rows need --model (its tokenizer produced the ids)", file=sys.stderr)
            return 2
        tokenizer = train_tokenizer([t for r in train_rows for t in _row_texts(r)], vocab_size=args.vocab_size)
        init = build_tiny_model(tokenizer, args.arch, hidden_size=args.hidden_size, num_layers=args.layers,
                                seed=args.seed)
        init.save_pretrained(ref_dir)
        tokenizer.save_pretrained(ref_dir)
        ref_source = str(ref_dir)
        del init
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    policy = AutoModelForCausalLM.from_pretrained(ref_source, dtype=dtype).to(device)
    ref_model = AutoModelForCausalLM.from_pretrained(ref_source, dtype=dtype).to(device)
    ref_model.eval().requires_grad_(False)
    policy.train()
    for module in list(policy.modules()) + list(ref_model.modules()):  # like TRL's disable_dropout default
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0

    engine_kwargs: dict[str, Any] = {"loss_type": args.loss_type if len(args.loss_type) > 1 else args.loss_type[0],
                                         "beta": args.beta, "label_smoothing": args.label_smoothing}
    if args.loss_weights is not None:
        engine_kwargs["loss_weights"] = args.loss_weights
    try:
        engine = DPOEngine(policy, ref_model, reference="model", **engine_kwargs)
    except (ValueError, TypeError) as exc:  # e.g. an unknown --loss-type, exo_pair without --label-smoothing
        print(f"fastdpo train: {exc}", file=sys.stderr)
        return 2
    collator = PreferenceCollator(tokenizer, max_length=args.max_length, packing=args.packing)
    # tokenize once up front (collating pre-tokenized rows gives the same batches, minus per-step tokenization)
    train_rows = pretokenize(collator, train_rows)
    eval_rows = pretokenize(collator, eval_rows)

    lr = args.lr if args.lr is not None else (1e-6 if args.model is not None else 3e-3)
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(args.lr_schedule, args.warmup_steps,
                                                                        args.steps))
    order = DataOrder(len(train_rows), args.batch_size, args.seed)
    step = 0
    if checkpoint is not None:
        policy.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        order.load_state_dict(checkpoint["data_order"])
        step = int(checkpoint["step"])
        set_rng_state(checkpoint["rng"])

    def checkpoint_now() -> None:
        save_checkpoint(ckpt_path, {
            "model": policy.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "data_order": order.state_dict(), "step": step, "rng": rng_state(), "args": vars(args),
        })

    log = _LogWriter(out / LOG_NAME, step if checkpoint is not None else None)
    show = ("loss", "rewards/accuracies", "rewards/margins")
    eval_show = ("eval_loss", "eval_rewards/accuracies", "eval_rewards/margins")
    print(f"fastdpo train: {type(policy).__name__} ({sum(p.numel() for p in policy.parameters()) / 1e6:.2f}M "
          f"params) on {device}, {data_desc}, loss {args.loss_type}, beta {args.beta}, packing {args.packing}, "
          f"{args.steps} steps of {args.batch_size} pairs" + (f", resuming at step {step}" if step else ""))

    def run_eval() -> dict[str, Any]:
        rng = rng_state()  # evaluation must not perturb the training RNG stream
        record = {"step": step, **evaluate(engine, policy, collator, eval_rows, args.eval_batch_size, device,
                                           args.eval_batches)}
        set_rng_state(rng)
        log.write(record)
        return record

    if step == 0:
        first_eval = run_eval()
        print(_format(first_eval, eval_show))

    interrupted = False

    def on_signal(signum, frame):
        nonlocal interrupted
        if interrupted:  # a second Ctrl-C: stop now, without the checkpoint
            raise KeyboardInterrupt
        interrupted = True

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)} \
        if _is_main_thread() else {}
    bar = None
    if not args.no_progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=args.steps, initial=step, desc="fastdpo train", dynamic_ncols=True, file=sys.stderr)
    write = bar.write if bar is not None else print
    start_step, t0 = step, time.perf_counter()
    last_eval: dict[str, Any] | None = None
    try:
        while step < args.steps:
            batch_rows = [train_rows[i] for i in order.next_batch()]
            batch = _to_device(collator(batch_rows), device)
            loss, metrics = engine.step(batch)
            loss.backward()
            grad_norm = None
            if args.max_grad_norm > 0:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm))
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            record = {"step": step, "epoch": order.epoch + order.cursor / order.num_rows, "loss": _scalar(loss),
                      "lr": lr, **{k: _scalar(v) for k, v in metrics.items()}}
            if grad_norm is not None:
                record["grad_norm"] = grad_norm
            log.write(record)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4f}",
                                acc=f"{record.get('rewards/accuracies', float('nan')):.2f}")
            if args.log_every and step % args.log_every == 0:
                write(_format(record, show))
            if args.eval_every and step % args.eval_every == 0 and step < args.steps:
                last_eval = run_eval()
                write(_format(last_eval, eval_show))
            stop_now = interrupted or (args.stop_after is not None and step - start_step >= args.stop_after)
            if (args.save_every and step % args.save_every == 0) or stop_now:
                checkpoint_now()
            if stop_now:
                break
    finally:
        if bar is not None:
            bar.close()
        for s, handler in previous.items():
            signal.signal(s, handler)

    if step < args.steps:
        log.close()
        why = "interrupted" if interrupted else f"stopped after {args.stop_after} steps"
        print(f"{why} at step {step}/{args.steps}; checkpoint written to {ckpt_path} (continue with --resume)")
        return 130 if interrupted else 0

    checkpoint_now()
    last_eval = run_eval()
    log.close()
    elapsed = time.perf_counter() - t0
    print(_format(last_eval, eval_show) + f" | {step - start_step} steps in {elapsed:.1f}s")
    first_eval_acc = _first_eval_accuracy(out / LOG_NAME)
    if first_eval_acc is not None:
        print(f"held-out rewards/accuracies: {first_eval_acc:.3f} before training -> "
              f"{last_eval.get('eval_rewards/accuracies', float('nan')):.3f} after (chance: 0.5; before training "
              "policy == reference, rewards are ~0 and ties count as wrong, as in TRL)")
    model_dir = out / "model"
    policy.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    print(f"model written to {model_dir.resolve()}")
    return 0


def _first_eval_accuracy(log_path: Path) -> float | None:
    with open(log_path, encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            if "eval_rewards/accuracies" in record:
                return float(record["eval_rewards/accuracies"])
    return None


def _is_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


if __name__ == "__main__":
    raise SystemExit(main())
