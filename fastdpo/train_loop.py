"""The running part of ``fastdpo train``: a run's state, its optimizer step, evaluation, checkpoints and records.

One optimizer step (:meth:`Run.optimizer_step`) accumulates ``--grad-accum`` micro-batches of ``--batch-size`` pairs
per process; each micro-batch's loss (a pair mean) is scaled by ``loss_scale(local, global) / grad_accum``
(:mod:`fastdpo.train_parallel`), so the gradient is that of the mean over every pair of the step, as one process on
the whole batch would compute it. Metrics are pair-weighted means. A non-finite loss (on any process) skips the
backward on every process, a non-finite gradient norm the update (under ``--dtype float16`` the loss scaler's own
overflow handling skips it instead); either is reported to the caller, which stops or goes on (``--on-nonfinite``).
Evaluation (:func:`evaluate`) runs under ``torch.no_grad`` and leaves the training RNG stream untouched; checkpoints
(:meth:`Run.save_checkpoint`) hold everything :meth:`Run.restore` needs to continue bit for bit and are never written
from non-finite weights. :class:`Reporter` sends each record to ``metrics.jsonl``, TensorBoard and the console.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fastdpo import train_parallel as tp
from fastdpo.cli import UsageError, first_line
from fastdpo.run_state import (
    CHECKPOINT_NAME,
    LOG_NAME,
    PREVIOUS_CHECKPOINT_NAME,
    DataOrder,
    MetricsLog,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from fastdpo.train_args import uses_lora
from fastdpo.train_setup import Optimization, load_trainable_state, trainable_state

if TYPE_CHECKING:
    from fastdpo.collator import PreferenceCollator
    from fastdpo.engine import DPOEngine

__all__ = ["EVAL_SHOW", "SHOW", "NonFiniteError", "Reporter", "Run", "evaluate", "format_record"]

SHOW = ("loss", "rewards/accuracies", "rewards/margins")  # the metrics of a printed training line
EVAL_SHOW = ("eval_loss", "eval_rewards/accuracies", "eval_rewards/margins")  # ... and of an evaluation line


class NonFiniteError(RuntimeError):
    """Training produced a non-finite loss, gradient or weight: the run stops (exit code 1) without writing it."""


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _scalar(value: Any) -> float:
    return float(value.detach().float().item()) if isinstance(value, torch.Tensor) else float(value)


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def _nonfinite(model: torch.nn.Module) -> list[str]:
    """Names of ``model``'s parameters holding NaN or infinity."""
    return [name for name, p in model.named_parameters() if not bool(torch.isfinite(p.detach()).all())]


def format_record(record: dict[str, Any], keys: Sequence[str]) -> str:
    """``"step N | key value | ..."`` of the ``keys`` present in ``record`` (4 decimals)."""
    parts = [f"step {record['step']}"]
    for k in keys:
        if k in record:
            parts.append(f"{k} {record[k]:.4f}")
    return " | ".join(parts)


def evaluate(
    engine,
    model: torch.nn.Module,
    collator,
    rows: list[dict[str, Any]],
    batch_size: int,
    device: torch.device,
    max_batches: int | None = None,
    autocast: torch.dtype | None = None,
    world: Any = None,
) -> dict[str, float]:
    """Held-out metrics: every engine metric (rewards/accuracies, rewards/margins, ...) and the loss, averaged over
    pairs (each batch weighted by its pair count). Runs under ``torch.no_grad`` with the model in eval mode (and
    under ``torch.autocast(dtype=autocast)`` when given). With a multi-process ``world``
    (:mod:`fastdpo.train_parallel`) each process evaluates its contiguous share of ``rows`` (``max_batches`` per
    process) and the sums are added over the processes; with fewer rows than processes every process evaluates all.
    Token-level metrics (``logits/*``, ``entropy``, ``mean_token_accuracy``) are token means per batch, so, as across
    batches, their held-out value is the pair-weighted mean of those batch means."""
    if world is not None and world.distributed and len(rows) >= world.size:
        rows = tp.shard(rows, world)
    else:
        world = None
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
                with _autocast(device, autocast):
                    loss, metrics = engine.step(_to_device(collator(chunk), device))
                n = len(chunk)
                seen += n
                totals["loss"] = totals.get("loss", 0.0) + _scalar(loss) * n
                for key, value in metrics.items():
                    totals[key] = totals.get(key, 0.0) + _scalar(value) * n
    finally:
        model.train(was_training)
    if world is not None:
        keys = list(totals)  # the same order on every process (same engine, same metrics)
        summed = tp.all_sum(
            torch.tensor([totals[k] for k in keys] + [float(seen)], dtype=torch.float64, device=device), world
        ).tolist()
        totals, seen = dict(zip(keys, summed[:-1])), int(summed[-1])
    return {f"eval_{k}": v / max(seen, 1) for k, v in totals.items()}


@dataclass
class Run:
    """A set-up ``fastdpo train`` run (:mod:`fastdpo.train_setup` builds its parts): ``step`` optimizer steps done,
    the last checkpoint written at ``saved_step`` (-1: none by this invocation and none resumed from)."""

    args: argparse.Namespace
    device: torch.device
    world: tp.World
    policy: torch.nn.Module
    reference: str  # "model" (a frozen copy) or "adapter" (the LoRA base with the adapter disabled)
    tokenizer: Any
    engine: DPOEngine
    collator: PreferenceCollator
    train_rows: list[dict[str, Any]]
    eval_rows: list[dict[str, Any]]
    optim: Optimization
    order: DataOrder
    step: int = 0
    saved_step: int = -1
    ddp: torch.nn.Module | None = None
    gathers: dict[str, Any] = field(default_factory=dict)

    @property
    def out(self) -> Path:
        return Path(self.args.output_dir)

    @property
    def lora(self) -> bool:
        return uses_lora(self.args)

    @property
    def amp(self) -> torch.dtype | None:
        """float16 under ``--dtype float16``: fp32 master weights + autocast + loss scaling."""
        return torch.float16 if self.args.dtype == "float16" else None

    @property
    def checkpoint_path(self) -> Path:
        return self.out / CHECKPOINT_NAME

    def restore(self, checkpoint: dict[str, Any]) -> None:
        """Continue from ``checkpoint`` (:func:`fastdpo.run_state.find_checkpoint`): data order, weights, optimizer,
        schedule, loss scale, step and RNG states; a checkpoint that does not fit this run is a usage error."""
        try:
            self.order.load_state_dict(checkpoint["data_order"])
            load_trainable_state(self.policy, checkpoint["model"], self.lora)
            self.optim.optimizer.load_state_dict(checkpoint["optimizer"])
        except (ValueError, RuntimeError, KeyError) as exc:
            raise UsageError(
                f"--resume: the checkpoint does not fit this run ({first_line(exc)}; same "
                "--data, --batch-size and number of processes?)"
            ) from None
        self.optim.scheduler.load_state_dict(checkpoint["scheduler"])
        if self.optim.scaler is not None and checkpoint.get("scaler") is not None:
            self.optim.scaler.load_state_dict(checkpoint["scaler"])
        self.step = self.saved_step = int(checkpoint["step"])
        set_rng_state(checkpoint["rng"])

    def wrap_distributed(self) -> None:
        """Under ``torchrun``: the policy in ``DistributedDataParallel`` and the engine's cross-process gather."""
        if not self.world.distributed:
            return
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [self.device.index] if self.device.type == "cuda" else None
        self.ddp = DistributedDataParallel(self.policy, device_ids=device_ids)
        self.gathers = {"gather": lambda t: tp.gather_cat(t, self.world)}

    def save_checkpoint(self) -> None:
        """Write ``checkpoint.pt`` (the main process; the one before it kept as ``checkpoint.prev.pt``);
        :class:`NonFiniteError` instead when the policy holds a non-finite value."""
        bad = _nonfinite(self.policy)
        if bad:  # the guarded step never applies a non-finite update; whatever the cause, never write such weights
            raise NonFiniteError(
                f"the policy holds non-finite values at step {self.step} ({bad[0]}, ...); no checkpoint or model "
                "written"
            )
        if self.world.main:
            state = {
                "model": trainable_state(self.policy, self.lora),
                "optimizer": self.optim.optimizer.state_dict(),
                "scheduler": self.optim.scheduler.state_dict(),
                "data_order": self.order.state_dict(),
                "step": self.step,
                "rng": rng_state(),
                "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(self.args).items()},
            }
            if self.optim.scaler is not None:
                state["scaler"] = self.optim.scaler.state_dict()
            save_checkpoint(self.checkpoint_path, state, previous=self.out / PREVIOUS_CHECKPOINT_NAME)
        tp.barrier(self.world)
        self.saved_step = self.step

    def evaluate(self) -> dict[str, Any]:
        """The held-out record of the current step (:func:`evaluate`), the training RNG stream left as it was."""
        rng = rng_state()
        args = self.args
        metrics = evaluate(
            self.engine,
            self.policy,
            self.collator,
            self.eval_rows,
            args.eval_batch_size,
            self.device,
            args.eval_batches,
            autocast=self.amp,
            world=self.world,
        )
        set_rng_state(rng)
        return {"step": self.step, **metrics}

    def _micro_batches(self, totals: dict[str, float]) -> tuple[int, tuple[str, float] | None]:
        """Forward and backward of ``--grad-accum`` micro-batches, metrics summed (pair-weighted) into ``totals``;
        ``(pairs seen, ("loss", value) when a loss was non-finite on some process)``."""
        world, grad_accum = self.world, self.args.grad_accum
        pairs_seen = 0
        for micro in range(grad_accum):
            rows = self.order.next_batch()
            while len(rows) < world.size:  # an epoch's tail too small to give every process a pair
                rows = self.order.next_batch()
            mine = [self.train_rows[i] for i in tp.shard(rows, world)]
            batch = _to_device(self.collator(mine), self.device)
            last = micro == grad_accum - 1
            sync = contextlib.nullcontext() if self.ddp is None or last else self.ddp.no_sync()
            with sync:
                with _autocast(self.device, self.amp):
                    loss, metrics = self.engine.step(batch, self.ddp, **self.gathers)
                finite = math.isfinite(_scalar(loss))
                if tp.any_true(not finite, world, self.device):  # every process skips the backward together
                    return pairs_seen, ("loss", _scalar(loss))
                scaled = loss * (tp.loss_scale(len(mine), len(rows), world) / grad_accum)
                (self.optim.scaler.scale(scaled) if self.optim.scaler is not None else scaled).backward()
            pair_loss = float(tp.all_sum(loss.detach().float().reshape(1) * len(mine), world)) / len(rows)
            totals["loss"] = totals.get("loss", 0.0) + pair_loss * len(rows)
            for key, value in metrics.items():
                totals[key] = totals.get(key, 0.0) + _scalar(value) * len(rows)
            pairs_seen += len(rows)
        return pairs_seen, None

    def optimizer_step(self) -> tuple[dict[str, Any], str | None]:
        """One optimizer step (``step`` advances by one, whether or not the update was applied): its record
        (``loss``, ``lr``, metrics, ``grad_norm``, ``loss_scale``, ``"skipped": true`` for a skipped update) and what
        was non-finite (``"loss"``, ``"gradient"``, or ``None``)."""
        totals: dict[str, float] = {}
        pairs_seen, bad_loss = self._micro_batches(totals)
        bad = None if bad_loss is None else bad_loss[0]
        loss_value = totals["loss"] / pairs_seen if bad_loss is None else bad_loss[1]
        grad_norm = None
        skipped = False
        optim = self.optim
        scaler = optim.scaler
        if bad is None:
            if scaler is not None:
                scaler.unscale_(optim.optimizer)
            max_norm = self.args.max_grad_norm if self.args.max_grad_norm > 0 else float("inf")
            grad_norm = float(torch.nn.utils.clip_grad_norm_(optim.params, max_norm))
            if not math.isfinite(grad_norm) and scaler is None:
                bad = "gradient"
        lr = optim.scheduler.get_last_lr()[0]
        if bad is None:
            if scaler is not None:  # an fp16 overflow makes the scaler skip the step and lower the scale
                scale = scaler.get_scale()
                scaler.step(optim.optimizer)
                scaler.update()
                skipped = scaler.get_scale() < scale
            else:
                optim.optimizer.step()
            if not skipped:
                optim.scheduler.step()
        optim.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        order = self.order
        entry = {
            "step": self.step,
            "epoch": order.epoch + order.cursor / order.num_rows,
            "loss": loss_value,
            "lr": lr,
            **({k: v / pairs_seen for k, v in totals.items() if k != "loss"} if bad is None else {}),
        }
        if grad_norm is not None:
            entry["grad_norm"] = grad_norm
        if scaler is not None:
            entry["loss_scale"] = scaler.get_scale()
        if bad is not None or skipped:
            entry["skipped"] = True
        return entry, bad


class Reporter:
    """Where a run's records go: ``metrics.jsonl`` and (``--report-to tensorboard``) TensorBoard scalars under
    ``runs/`` on the main process, resumed at ``resume_step`` (``None``: a fresh run); lines on the main process's
    console, through the progress bar while it is shown."""

    def __init__(self, args: argparse.Namespace, out: Path, world: tp.World, resume_step: int | None) -> None:
        self.world = world
        self.log = MetricsLog(out / LOG_NAME, resume_step) if world.main else None
        self.board = None
        if args.report_to == "tensorboard" and world.main:
            from torch.utils.tensorboard import SummaryWriter

            purge = resume_step + 1 if resume_step is not None else None
            self.board = SummaryWriter(log_dir=str(out / "runs"), purge_step=purge)
        self.bar = None
        self.write = print

    def record(self, entry: dict[str, Any]) -> None:
        """Append ``entry`` to the log and its finite numbers to TensorBoard (``train/<key>``, ``eval/<key>``)."""
        if self.log is not None:
            self.log.write(entry)
        if self.board is not None:
            for key, value in entry.items():
                if key not in ("step", "skipped") and isinstance(value, (int, float)) and math.isfinite(value):
                    tag = key.replace("eval_", "eval/", 1) if key.startswith("eval_") else f"train/{key}"
                    self.board.add_scalar(tag, value, entry["step"])
            self.board.flush()

    def say(self, text: str) -> None:
        if self.world.main:
            self.write(text)

    def open_bar(self, total: int, initial: int) -> None:
        """Show a progress bar on stderr (main process); lines are written through it from now on."""
        if not self.world.main:
            return
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, initial=initial, desc="fastdpo train", dynamic_ncols=True, file=sys.stderr)
        self.write = self.bar.write

    def advance(self, entry: dict[str, Any]) -> None:
        """One step more on the progress bar, with its loss and accuracy."""
        if self.bar is not None:
            self.bar.update(1)
            accuracy = entry.get("rewards/accuracies", float("nan"))
            self.bar.set_postfix(loss=f"{entry['loss']:.4f}", acc=f"{accuracy:.2f}")

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def close(self) -> None:
        if self.log is not None:
            self.log.close()
        if self.board is not None:
            self.board.close()
