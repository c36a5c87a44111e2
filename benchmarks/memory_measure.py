"""``fastdpo memory --measure``: each variant's real DPO step on CPU, in its own process, and its peak resident set.

:func:`measure` runs :func:`measure_worker` once per variant (``python -m fastdpo.benchmarks.memory_measure _worker
SPEC OUT``), :func:`measure_sharded` runs :func:`shard_measure_worker` on ``world`` ``torchrun`` ranks (gloo), and
:func:`measure_sequence_parallel` the sequence-parallel engine step on ``k`` processes (:func:`sp_measure_worker`);
all with a fixed glibc mmap threshold (:data:`MALLOC_ENV`), so a freed tensor leaves the resident set at once. Every
worker measures by :func:`step_peak`: the step first runs on a tiny model of the same architecture (library
initialisation is not charged to the step), the resident set is then the baseline, the real model's step runs once as a
warm-up (the optimizer state exists from there on, as in training), the high-water mark is reset and the measured step
runs; its peak is ``VmHWM`` over the baseline.

The variants and the step's shapes are :mod:`fastdpo.memory`'s (:class:`fastdpo.memory.StepConfig`); ``fastdpo
memory`` imports this module only for ``--measure``.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastdpo.benchmarks.measure import MALLOC_ENV, proc_status_kb, reset_peak_rss, start_ranks
from fastdpo.memory import TORCH_DTYPES, TRL_VOCAB_TILE, StepConfig
from fastdpo.reference import naive_dpo_loss, naive_sequence_logprobs
from fastdpo.tiny import id_tokenizer

#: What a measured config's tiny copy (the baseline step's model) overrides: 997 tokens, hidden 64, 4 heads.
TINY_OVERRIDES = {
    "vocab_size": 997,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
}


def hf_config(cfg: dict[str, Any], layers: int | None, dtype: str) -> Any:
    """An HF ``PretrainedConfig`` from a config dict (``layers`` overrides ``num_hidden_layers``)."""
    from transformers import AutoConfig

    cfg = {k: v for k, v in cfg.get("text_config", cfg).items() if k not in ("architectures", "auto_map")}
    model_type = cfg.pop("model_type", "llama")
    if layers is not None:
        cfg["num_hidden_layers"] = layers
        cfg.pop("layer_types", None)
    config = AutoConfig.for_model(model_type, **cfg)
    config.use_cache = False
    config.torch_dtype = TORCH_DTYPES[dtype]
    return config


def step_peak(
    build: Callable[[dict[str, Any], int | None], tuple[Any, ...]],
    run_step: Callable[..., None],
    cfg: dict[str, Any],
    layers: int | None,
    *,
    barrier: Callable[[], None] | None = None,
) -> dict[str, int]:
    """``{"peak", "resident_after_setup"}`` (bytes over the baseline) of ``run_step(*build(cfg, layers))``.

    ``build(cfg, layers)`` makes a step's parts (model, optimizer, ...) from a config dict, ``run_step(*parts)`` runs
    one training step. The baseline is the resident set after ``run_step`` ran on a tiny copy of ``cfg``
    (:data:`TINY_OVERRIDES`, one layer); the real parts then take one warm-up step, ``barrier`` (if given) runs, the
    high-water mark is reset and the measured step runs.
    """
    tiny = dict(cfg.get("text_config", cfg), **TINY_OVERRIDES)
    run_step(*build(tiny, 1))
    gc.collect()
    rss0 = proc_status_kb("VmRSS") * 1024
    parts = build(cfg, layers)
    run_step(*parts)  # warm-up: optimizer state exists from here on, as in training
    gc.collect()
    if barrier is not None:
        barrier()
    reset_peak_rss()
    setup = proc_status_kb("VmRSS") * 1024 - rss0
    run_step(*parts)
    return {"peak": proc_status_kb("VmHWM") * 1024 - rss0, "resident_after_setup": setup}


def build_models(spec: dict[str, Any], cfg: dict[str, Any], layers: int | None) -> tuple[Any, Any, Any]:
    """``(config, policy, reference)`` of a measured step: the policy from ``cfg`` (:func:`hf_config`, random
    weights, ``spec["dtype"]``, train mode; eager attention for Gemma 2, else SDPA) and, for ``spec["reference"] ==
    "model"``, a frozen reference of the same config (else ``None``)."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, TORCH_DTYPES[spec["dtype"]])
    config = hf_config(cfg, layers, spec["dtype"])
    attn = "eager" if config.model_type == "gemma2" else "sdpa"
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn).train()
    ref = None
    if spec["reference"] == "model":
        ref = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn).eval()
        ref.requires_grad_(False)
    return config, model, ref


def make_optimizer(spec: dict[str, Any], model: Any) -> Any:
    """``spec["optimizer"]`` (``"adamw"`` or SGD) over the model's parameters, per-parameter (``foreach=False``)."""
    import torch

    opt_cls = torch.optim.AdamW if spec["optimizer"] == "adamw" else torch.optim.SGD
    return opt_cls(model.parameters(), lr=1e-6, foreach=False)


def engine_collator(spec: dict[str, Any]) -> Any:
    """The engine step's :class:`fastdpo.PreferenceCollator` over :func:`fastdpo.tiny.id_tokenizer` ids (a vocabulary
    covering the tiny and the measured model): ``prefix_shared`` rows of ``pairs_per_row`` pairs, or for
    ``padding_free`` the ``pad`` layout with equal-length rows (2 rows per pair, no padding, so no mask)."""
    from fastdpo.collator import PreferenceCollator

    tokenizer = id_tokenizer(max(997, int(spec["config"].get("text_config", spec["config"])["vocab_size"])))
    if spec.get("packing", "padding_free") == "prefix_shared":
        return PreferenceCollator(
            tokenizer,
            packing="prefix_shared",
            max_tokens_per_row=spec.get("pairs_per_row", 1) * (spec["prompt_len"] + 2 * spec["completion_len"]),
        )
    return PreferenceCollator(tokenizer, packing="pad")


def random_pairs(spec: dict[str, Any], vocab_size: int, generator: Any = None) -> list[dict[str, Any]]:
    """``spec["pairs"]`` pre-tokenized pairs of random ids below ``vocab_size`` (``prompt_len`` / ``completion_len``
    tokens), with zero reference log-probs when ``spec["reference"]`` is not ``"model"`` (a precomputed cache)."""
    import torch

    def ids(n: int) -> list[int]:
        return torch.randint(0, vocab_size, (n,), generator=generator).tolist()

    precomputed = {} if spec["reference"] == "model" else {"ref_chosen_logps": 0.0, "ref_rejected_logps": 0.0}
    p_len, c_len = spec["prompt_len"], spec["completion_len"]
    return [
        {
            "prompt_input_ids": ids(p_len),
            "chosen_input_ids": ids(c_len),
            "rejected_input_ids": ids(c_len),
            **precomputed,
        }
        for _ in range(spec["pairs"])
    ]


def measure_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one variant's DPO step and return its peak RSS over the process's baseline (bytes).

    The baseline is taken after the same step ran once on a tiny model of the same architecture (so library
    initialisation — kernels, thread pools, lazily imported modules — is not charged to the step); the measured step
    follows one warm-up step that allocates the optimizer state, as in training. The fastdpo variant with
    ``packing="prefix_shared"`` (or ``grad_in_forward``) collates random pre-tokenized pairs with
    :class:`fastdpo.PreferenceCollator` (``pairs_per_row`` pairs per row; ``pad`` rows without padding for
    ``grad_in_forward`` alone) and runs :meth:`fastdpo.DPOEngine.step`; the other variants run their heads on
    ``2·pairs`` unmasked rows."""
    import torch

    variant = spec["variant"]
    prefix_shared = spec.get("packing", "padding_free") == "prefix_shared"
    engine_step = variant == "fastdpo" and (prefix_shared or spec.get("grad_in_forward", False))
    if engine_step:
        from fastdpo.engine import DPOEngine
    elif variant == "fastdpo":
        from fastdpo.linear_logprobs import linear_sequence_logprobs
    if variant == "trl":
        from trl.kernels import ChunkedLogProbFunction
    pairs, p_len, c_len = spec["pairs"], spec["prompt_len"], spec["completion_len"]
    rows, seq = 2 * pairs, p_len + c_len
    if engine_step:  # built before the baseline: its vocabulary covers the tiny and the measured model
        collator = engine_collator(spec)

    def build(cfg: dict[str, Any], layers: int | None) -> tuple[Any, Any, Any, Any]:
        config, model, ref = build_models(spec, cfg, layers)
        return config, model, ref, make_optimizer(spec, model)

    def engine_loss(config: Any, model: Any, ref: Any) -> torch.Tensor:
        batch = collator(random_pairs(spec, config.vocab_size))
        engine = DPOEngine(model, ref, reference=spec["reference"], grad_in_forward=spec.get("grad_in_forward", False))
        return engine.step(batch)[0]

    def run_step(config: Any, model: Any, ref: Any, opt: Any) -> None:
        if engine_step:
            engine_loss(config, model, ref).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return
        ids = torch.randint(0, config.vocab_size, (rows, seq))
        labels = ids.clone()
        labels[:, :p_len] = -100
        softcap = getattr(config, "final_logit_softcapping", None)

        def seq_logps(lm: Any) -> torch.Tensor:
            if variant == "naive":
                return naive_sequence_logprobs(lm(input_ids=ids).logits[:, :-1].float(), labels[:, 1:])
            hidden = lm.model(input_ids=ids).last_hidden_state
            weight = lm.get_output_embeddings().weight
            if variant == "trl":
                h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
                tgt = labels[:, 1:]
                lp = ChunkedLogProbFunction.apply(
                    h, weight, None, tgt.clamp(min=0).reshape(-1), 1.0, TRL_VOCAB_TILE, softcap, 1.0, ("log_probs",)
                )[0]
                return (lp.view(rows, seq - 1) * (tgt != -100)).sum(-1)
            first = max(p_len - 1, 0)  # an empty prompt's first completion token has no predictor
            return linear_sequence_logprobs(hidden[:, first : seq - 1], weight, ids[:, first + 1 :], softcap=softcap)

        with torch.no_grad():
            ref_lp = seq_logps(ref) if ref is not None else torch.zeros(rows)
        pol = seq_logps(model)
        naive_dpo_loss(pol, ref_lp, beta=0.1).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    torch.manual_seed(0)
    return {"variant": variant, **step_peak(build, run_step, spec["config"], spec.get("layers"))}


def _zero3_config(m_hidden: int, optimizer: str) -> dict[str, Any]:
    """The DeepSpeed ZeRO-3 config the sharded measurement runs: transformers' ``"auto"`` bucket sizes for the
    model's hidden size (``reduce_bucket_size = D²``, ``stage3_prefetch_bucket_size = 0.9·D²``,
    ``stage3_param_persistence_threshold = 10·D``), no clipping, the client torch optimizer."""
    d2 = m_hidden * m_hidden
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**12,
        "wall_clock_breakdown": False,
        "zero_optimization": {
            "stage": 3,
            "reduce_bucket_size": d2,
            "stage3_prefetch_bucket_size": int(0.9 * d2),
            "stage3_param_persistence_threshold": 10 * m_hidden,
        },
    }


def _fsdp2_shard(model: Any, mesh: Any, *, root_only: bool = False) -> Any:
    """FSDP2 layout of accelerate's ``fsdp_version: 2``: every decoder layer, the input embedding (untied) and the
    ``[final norm, lm_head]`` tail (kept unsharded from forward to backward) as their own groups, then the root.
    ``root_only``: one group (TRL's ``prepare_fsdp`` of the reference model)."""
    from torch.distributed.fsdp import fully_shard

    if not root_only:
        from fastdpo.models import _find_backbone

        backbone = _find_backbone(model)
        for layer in backbone.layers:
            fully_shard(layer, mesh=mesh)
        embed, head = model.get_input_embeddings(), model.get_output_embeddings()
        tied = embed.weight is head.weight
        if not tied:
            fully_shard(embed, mesh=mesh)
        fully_shard([backbone.norm, *((embed,) if tied else ()), head], mesh=mesh, reshard_after_forward=False)
    fully_shard(model, mesh=mesh)
    return model


def shard_measure_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One rank of the sharded measurement (``torchrun``): the fastdpo engine's DPO step with the policy (and a
    reference model) sharded by ``spec["shard"]`` (``zero3``: ``deepspeed.initialize``, the reference a ZeRO-3
    inference engine as TRL prepares it; ``fsdp2``: :func:`_fsdp2_shard`), measured like :func:`measure_worker`:
    peak RSS of the second step over the process's baseline after the same step on a tiny model. ``pairs`` are this
    rank's pairs (a per-device batch)."""
    import torch
    import torch.distributed as dist

    from fastdpo.engine import DPOEngine

    torch.set_num_threads(1)
    shard = spec["shard"]
    if shard == "zero3":
        import deepspeed

        deepspeed.init_distributed("gloo", verbose=False)
    else:
        dist.init_process_group("gloo")
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (dist.get_world_size(),)) if shard == "fsdp2" else None
    collator = engine_collator(spec)

    def build(cfg: dict[str, Any], layers: int | None) -> tuple[Any, Any, Any, Any]:
        config, model, ref = build_models(spec, cfg, layers)
        if shard == "zero3":
            import deepspeed

            ds_config = _zero3_config(config.hidden_size, spec["optimizer"])
            wrapped, opt, *_ = deepspeed.initialize(
                model=model, config=ds_config, optimizer=make_optimizer(spec, model)
            )
            if ref is not None:
                ref, *_ = deepspeed.initialize(model=ref, config=ds_config)
        else:
            wrapped = _fsdp2_shard(model, mesh)
            opt = make_optimizer(spec, model)
            if ref is not None:
                ref = _fsdp2_shard(ref, mesh, root_only=True)
        engine = DPOEngine(model, ref, reference=spec["reference"])
        return config, wrapped, engine, opt

    def run_step(config: Any, wrapped: Any, engine: Any, opt: Any) -> None:
        batch = collator(random_pairs(spec, config.vocab_size))
        loss = engine.step(batch, wrapped if shard == "zero3" else None)[0]
        if shard == "zero3":
            wrapped.backward(loss)
            wrapped.step()
        else:
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    torch.manual_seed(dist.get_rank())
    result = {
        "variant": "fastdpo",
        **step_peak(build, run_step, spec["config"], spec.get("layers")),
        "rank": dist.get_rank(),
    }
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, result)
    dist.destroy_process_group()
    return {"variant": "fastdpo", "peak": max(r["peak"] for r in everyone), "per_rank": everyone}


def _step_spec(cfg: dict[str, Any], step: StepConfig, layers: int | None, **extra: Any) -> dict[str, Any]:
    """The JSON spec a measuring process reads: the model config, the layer override, ``step``'s shape, dtype,
    reference, optimizer and packing, and the ``extra`` fields of that worker."""
    return {
        "config": cfg,
        "layers": layers,
        "dtype": step.dtype,
        "pairs": step.pairs,
        "prompt_len": step.prompt_len,
        "completion_len": step.completion_len,
        "reference": step.reference,
        "optimizer": step.optimizer,
        "packing": step.packing,
        "pairs_per_row": step.pairs_per_row,
        **extra,
    }


def measure_sharded(
    cfg: dict[str, Any], step: StepConfig, world: int, shard: str, layers: int | None, timeout: float = 1800.0
) -> dict[str, dict[str, Any]]:
    """Run :func:`shard_measure_worker` on ``world`` CPU processes (``torchrun``, gloo); ``{"fastdpo": result}``
    with the largest per-rank peak (``per_rank``: each rank's), or ``{"fastdpo": {"error": ...}}``."""
    spec = _step_spec(cfg, step, layers, shard=shard)
    with tempfile.TemporaryDirectory(prefix="fastdpo-mem-") as tmp:
        spec_path, res_path = os.path.join(tmp, "spec.json"), os.path.join(tmp, "out.json")
        Path(spec_path).write_text(json.dumps(spec))
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={world}",
            "-m",
            "fastdpo.benchmarks.memory_measure",
            "_shard_worker",
            spec_path,
            res_path,
        ]
        env = {**os.environ, **MALLOC_ENV, "OMP_NUM_THREADS": "1"}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode == 0 and os.path.exists(res_path):
            return {"fastdpo": json.loads(Path(res_path).read_text())}
        lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if "Error" in ln] or [f"exit {proc.returncode}"]
        return {"fastdpo": {"variant": "fastdpo", "error": lines[-1][:300]}}


def measure(
    cfg: dict[str, Any], step: StepConfig, variants: list[str], layers: int | None, timeout: float = 900.0
) -> dict[str, dict[str, Any]]:
    """Run :func:`measure_worker` for each variant in a fresh process (fixed glibc mmap threshold, so freed tensors
    leave the resident set); ``{variant: result or {"error": ...}}``."""
    out: dict[str, dict[str, Any]] = {}
    for variant in variants:
        vstep = step.for_variant(variant)
        if vstep.sequence_parallel > 1:  # fastdpo over k processes: the peak rank
            out[variant] = measure_sequence_parallel(cfg, vstep, layers, timeout)
            continue
        variant_name = "fastdpo" if variant.startswith("fastdpo") else variant
        spec = _step_spec(cfg, vstep, layers, variant=variant_name, grad_in_forward=vstep.grad_in_forward)
        with tempfile.TemporaryDirectory(prefix="fastdpo-mem-") as tmp:
            spec_path, res_path = os.path.join(tmp, "spec.json"), os.path.join(tmp, "out.json")
            Path(spec_path).write_text(json.dumps(spec))
            cmd = [sys.executable, "-m", "fastdpo.benchmarks.memory_measure", "_worker", spec_path, res_path]
            proc = subprocess.run(
                cmd, env={**os.environ, **MALLOC_ENV}, capture_output=True, text=True, timeout=timeout
            )
            if proc.returncode == 0 and os.path.exists(res_path):
                out[variant] = json.loads(Path(res_path).read_text())
            else:
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
                out[variant] = {"variant": variant, "error": tail[0][:300]}
    return out


def sp_measure_worker(spec: dict[str, Any], rank: int, init_file: str) -> dict[str, Any]:
    """One rank's :class:`fastdpo.DPOEngine` step with ``sequence_parallel_size=k`` (``k = 1``: the plain engine on
    the same rows, one process); peak RSS over the process's
    baseline (:func:`step_peak`; the ranks meet before the high-water mark is reset)."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    from fastdpo.engine import DPOEngine

    k = spec["sequence_parallel"]
    if k > 1:
        dist.init_process_group(
            "gloo", init_method=f"file://{init_file}", rank=rank, world_size=k, timeout=timedelta(seconds=300)
        )
    collator = engine_collator(spec)

    def build(cfg: dict[str, Any], layers: int | None) -> tuple[Any, Any, Any, Any]:
        config, model, ref = build_models(spec, cfg, layers)
        engine = DPOEngine(model, ref, reference=spec["reference"], sequence_parallel_size=k)
        return config, model, engine, make_optimizer(spec, model)

    def run_step(config: Any, model: Any, engine: Any, opt: Any) -> None:
        gen = torch.Generator().manual_seed(0)  # the same batch on every rank of the group
        batch = collator(random_pairs(spec, config.vocab_size, gen))
        engine.step(batch)[0].backward()
        engine.reduce_sequence_parallel_gradients()
        opt.step()
        opt.zero_grad(set_to_none=True)

    try:
        torch.manual_seed(0)
        result = step_peak(build, run_step, spec["config"], spec.get("layers"), barrier=dist.barrier if k > 1 else None)
    finally:
        if k > 1:
            dist.destroy_process_group()
    return {"rank": rank, **result}


def measure_sequence_parallel(
    cfg: dict[str, Any], step: Any, layers: int | None, timeout: float = 900.0
) -> dict[str, Any]:
    """Run :func:`sp_measure_worker` on ``k >= 1`` CPU processes; ``{"variant": "fastdpo", "peak": max over ranks,
    "rank_peaks": [...], ...}`` or ``{"variant": "fastdpo", "error": ...}``."""
    k = step.sequence_parallel
    spec = _step_spec(cfg, step, layers, sequence_parallel=k)
    with tempfile.TemporaryDirectory(prefix="fastdpo-spmem-") as tmp:
        spec_path = os.path.join(tmp, "spec.json")
        Path(spec_path).write_text(json.dumps(spec))
        env = {**os.environ, **MALLOC_ENV, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        procs = start_ranks(
            "fastdpo.benchmarks.memory_measure",
            lambda r: ["_sp_worker", spec_path, str(r), os.path.join(tmp, "init"), os.path.join(tmp, f"out{r}.json")],
            k,
            env,
        )
        results, errors = [], []
        for r, proc in enumerate(procs):
            try:
                output, _ = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                for p in procs:
                    p.kill()
                return {"variant": "fastdpo", "error": f"rank {r} did not finish within {timeout:.0f}s"}
            path = os.path.join(tmp, f"out{r}.json")
            if proc.returncode == 0 and os.path.exists(path):
                results.append(json.loads(Path(path).read_text()))
            else:
                tail = output.strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
                errors.append(f"rank {r}: {tail[0][:300]}")
    if errors:
        return {"variant": "fastdpo", "error": "; ".join(errors)}
    peaks = [res["peak"] for res in results]
    return {
        "variant": "fastdpo",
        "peak": max(peaks),
        "rank_peaks": peaks,
        "resident_after_setup": max(res["resident_after_setup"] for res in results),
    }


def main(argv: list[str] | None = None) -> int:
    """The workers' process entry: ``_worker SPEC OUT`` (one variant of :func:`measure`), ``_shard_worker SPEC
    OUT`` (one rank of :func:`measure_sharded`; rank 0 writes OUT) or ``_sp_worker SPEC RANK INIT_FILE OUT`` (one
    rank of :func:`measure_sequence_parallel`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) == 5 and argv[0] == "_sp_worker":
        spec = json.loads(Path(argv[1]).read_text())
        Path(argv[4]).write_text(json.dumps(sp_measure_worker(spec, int(argv[2]), argv[3])))
        return 0
    if len(argv) != 3 or argv[0] not in ("_worker", "_shard_worker"):
        raise SystemExit(
            "usage: python -m fastdpo.benchmarks.memory_measure {_worker,_shard_worker} SPEC OUT | "
            "_sp_worker SPEC RANK INIT_FILE OUT"
        )
    spec = json.loads(Path(argv[1]).read_text())
    if argv[0] == "_worker":
        Path(argv[2]).write_text(json.dumps(measure_worker(spec)))
    else:
        result = shard_measure_worker(spec)
        if int(os.environ.get("RANK", "0")) == 0:
            Path(argv[2]).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
