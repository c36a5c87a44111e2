"""Helpers several test files share (``from helpers import ...``; tests/ is on sys.path through conftest.py)."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import torch

if TYPE_CHECKING:
    from fastdpo.memory import StepConfig

#: every optional token statistic of the fused head (``linear_token_logprobs`` and its naive oracle)
STAT_FLAGS: dict[str, bool] = {
    "return_entropy": True,
    "return_log_sum_p2": True,
    "return_mean_logit": True,
    "return_argmax_hit": True,
}

#: the per-step metrics TRL 1.16's ``DPOTrainer`` logs for a sigmoid-loss step besides ``loss`` and ``num_tokens``
#: (written out here, independently of :mod:`fastdpo.losses.metrics`)
TRL_STEP_METRICS: tuple[str, ...] = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "logits/chosen",
    "logits/rejected",
    "entropy",
    "mean_token_accuracy",
)

#: TRL ``DPOConfig`` arguments of the tiny offline training runs: CPU, fp32, plain SGD at a constant rate, a log entry
#: every step, nothing saved or reported
TINY_DPO_ARGS: dict[str, Any] = dict(
    per_device_train_batch_size=4,
    max_steps=3,
    logging_steps=1,
    optim="sgd",
    learning_rate=0.02,
    lr_scheduler_type="constant",
    seed=0,
    report_to="none",
    save_strategy="no",
    disable_tqdm=True,
    use_cpu=True,
    bf16=False,
    fp16=False,
    dataloader_num_workers=0,
    beta=0.5,
)


def dpo_config(output_dir: Path | str, **overrides: Any) -> Any:
    """TRL's ``DPOConfig`` of :data:`TINY_DPO_ARGS` writing to ``output_dir``, with ``overrides`` on top."""
    from trl import DPOConfig

    return DPOConfig(output_dir=str(output_dir), **{**TINY_DPO_ARGS, **overrides})


def dpo_trainer(cls: Any, tok: Any, model: Any, ref: Any, args: Any, train: Any, evals: Any = None, **kw: Any) -> Any:
    """``cls`` (TRL's ``DPOTrainer`` or a subclass such as ``FastDPOTrainer``) of ``model`` against ``ref`` with
    ``args``, training on the dataset ``train`` (evaluating on ``evals``), tokenized by ``tok``; ``kw``: the trainer's
    other keywords."""
    return cls(
        model=model, ref_model=ref, args=args, train_dataset=train, eval_dataset=evals, processing_class=tok, **kw
    )


def tiny_trainer(args: Any, rows_seed: int, **kw: Any) -> Any:
    """``FastDPOTrainer`` (:func:`dpo_trainer`) of :mod:`fastdpo.tiny`'s eager Llama policy (seed 0) against a
    reference of another draw (seed 1), on 4 preference rows drawn with ``rows_seed``."""
    import datasets

    from fastdpo.integrations.trl import FastDPOTrainer
    from fastdpo.tiny import make_model, make_tokenizer, preference_rows

    tok = make_tokenizer()
    policy, ref = (make_model("llama", tok, attn_implementation="eager", seed=seed) for seed in (0, 1))
    rows = datasets.Dataset.from_list(preference_rows(4, seed=rows_seed))
    return dpo_trainer(FastDPOTrainer, tok, policy, ref, args, rows, **kw)


def json_rows(path: Path | str, cache_dir: Path | str) -> Any:
    """The ``datasets.Dataset`` of the JSON-lines preference file ``path`` (its cache in ``cache_dir``)."""
    import datasets

    return datasets.load_dataset("json", data_files=str(path), split="train", cache_dir=str(cache_dir))


def scaled_llama() -> dict[str, Any]:
    """Llama-3.2-1B scaled down so that ``memory --measure`` of one step takes a few hundred MiB on CPU: 2 layers,
    hidden 256, 4 heads (2 KV), vocabulary 32000."""
    from fastdpo import memory as M

    return dict(
        M.PRESETS["Llama-3.2-1B"],
        vocab_size=32000,
        hidden_size=256,
        intermediate_size=1024,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        num_hidden_layers=2,
    )


def measured_prefix_shared_step(**shape: Any) -> StepConfig:
    """The ``StepConfig`` of a measured CPU ``prefix_shared`` engine step (fp32, SGD, precomputed reference) with the
    sizes in ``shape`` (``pairs``, ``prompt_len``, ``completion_len``, ``sequence_parallel``, ...)."""
    from fastdpo import memory as M

    common = dict(dtype="fp32", optimizer="sgd", reference="precomputed", device="cpu", packing="prefix_shared")
    return M.StepConfig(**common, **shape)


def measure_matches_estimate(step: StepConfig, variants: list[str], rel: float) -> dict[str, dict[str, Any]]:
    """Measure ``variants`` of ``step`` on :func:`scaled_llama` (each in its own process) and assert that every one
    ran and that its peak RSS over the baseline is within ``rel`` of :func:`fastdpo.memory.estimate`'s peak; the
    measurements by variant."""
    from fastdpo import memory as M
    from fastdpo.benchmarks.memory_measure import measure

    cfg = scaled_llama()
    measured = measure(cfg, step, variants, None)
    shape = M.shape_from_config(cfg)
    for v in variants:
        assert "error" not in measured[v], measured[v]
        assert M.estimate(shape, step, v)["peak"] == pytest.approx(measured[v]["peak"], rel=rel), v
    return measured


def explicit_logits(
    h: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor | None = None,
    *,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """The documented logit transform written out in ``h``'s dtype (the oracles' logits, independent of the library):
    ``x = h @ w.T (+ b)``, ``z = softcap * tanh(x * logit_scale / softcap) / temperature`` (without ``softcap``:
    ``x * logit_scale / temperature``). ``h [..., D]``, ``w [V, D]``, ``b [V]`` -> ``[..., V]``, differentiable."""
    z = h @ w.T
    if b is not None:
        z = z + b
    z = z * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z / temperature


def packed_logits_case(
    seed: int, n: int, v: int, num_ids: int, scale: float, ignore_every: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Generator]:
    """A packed log-prob case drawn from ``torch.Generator().manual_seed(seed)``: fp32 logits ``[n, v]`` of std
    ``scale``, labels ``[n]`` in ``[0, v)`` with every ``ignore_every``-th one ``-100``, unsorted segment ids ``[n]`` in
    ``[0, num_ids)``; and the generator, for the caller's further draws."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, v, generator=g) * scale
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::ignore_every] = -100
    ids = torch.randint(0, num_ids, (n,), generator=g)
    return logits, labels, ids, g


def ref_scores(lr: torch.Tensor, fdiv: str, alpha: float, fp16: bool = False) -> torch.Tensor:
    """The f-DPO score ``f'(t)`` at ``t = pi / ref = exp(lr)`` of TRL 1.16's f-divergences, written out from the
    derivatives (the loss oracles' own, independent of :mod:`fastdpo.losses`): ``reverse_kl`` ``lr``;
    ``forward_kl`` ``1 - 1/t``; ``js_divergence`` ``log(2t / (t + 1))``; ``alpha_divergence`` ``(t^(alpha-1) - 1) /
    (alpha - 1)`` (``lr`` at ``alpha = 1``) with the exponent clamped at 80 (11 for float16 inputs, ``fp16``)."""
    if fdiv == "reverse_kl":
        return lr
    if fdiv == "forward_kl":
        return 1 - 1 / torch.exp(lr)  # f'(t) = 1 - 1/t, t = pi/ref
    if fdiv == "js_divergence":
        t = torch.exp(lr)
        return torch.log(2 * t / (t + 1))  # f'(t) = log(2t/(t+1))
    if fdiv == "alpha_divergence":
        if abs(alpha - 1) < 1e-6:
            return lr
        e = torch.clamp((alpha - 1) * lr, max=11.0 if fp16 else 80.0)
        return (torch.exp(e) - 1) / (alpha - 1)
    raise AssertionError(fdiv)


def saved_bytes(fn: Callable[[], Any], exclude: set[int]) -> int:
    """Bytes of distinct storages autograd saves while ``fn`` runs, excluding the storages whose ``data_ptr`` is in
    ``exclude`` (parameters, inputs)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(nbytes for ptr, nbytes in seen.items() if ptr not in exclude)


def perturbed_reference(policy: torch.nn.Module, seed: int) -> torch.nn.Module:
    """A frozen reference model near ``policy``: a deep copy in eval mode, each parameter plus ``0.02 * N(0, 1)`` noise
    drawn from a generator seeded with ``seed`` (so the DPO rewards are not all zero)."""
    ref = copy.deepcopy(policy)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=gen))
    return ref.eval().requires_grad_(False)


def metrics_records(out_dir: Path) -> list[dict[str, Any]]:
    """The records of ``fastdpo train``'s ``metrics.jsonl`` in ``out_dir``, one dict a line."""
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
