"""Section ``dpo`` of the one-shot GPU run: one DPO training step, fastdpo ``DPOEngine`` vs TRL 1.16 ``DPOTrainer``.

Model: a Llama-3.2-1B-shaped ``LlamaForCausalLM`` with random weights (hidden 2048, 16 layers, 32 heads, 8 KV heads,
intermediate 8192, vocabulary 128256, tied embeddings; 1.24 B parameters), bf16, built on the device; the reference
is a second copy, the policy = reference + N(0, 0.002^2) noise (so the loss is not exactly log 2). Attention: sdpa,
and flash_attention_2 when ``flash_attn`` imports (fastdpo then runs padding_free through the varlen kernels;
prefix_shared needs a mask flash attention cannot express and is skipped there).

Data: 8 pairs, prompt ~512 and completions ~256 tokens (lengths drawn in mean*(1 +- 0.5)), the same token ids for
everyone (``fastdpo.benchmarks.engine_step.make_rows``). A step = reference forward (no grad) + policy forward + the
sigmoid DPO loss (beta 0.1) + backward, no optimizer; the policy's gradients are set to None before each step (they
are allocated inside it, for everyone). Implementations:

* ``prefix_shared`` / ``padding_free`` — ``DPOEngine`` on a ``PreferenceCollator`` batch of that packing (about one
  pair per packed row, as ``engine_step``);
* ``trl`` — ``DPOTrainer.compute_loss`` + ``backward`` on a batch of TRL's own collator (padded; TRL's fused LM head),
  no gradient checkpointing, no mixed precision (the models are bf16).

tokens/s = the batch's DPO tokens (each pair counted as prompt+chosen and prompt+rejected, identical for everyone,
whatever layout an implementation computes) / median step time; peak = ``torch.cuda.max_memory_allocated`` during the
timed steps (both models, gradients and activations: the same resident weights for everyone).

Correctness: the policy's summed log-probs of the chosen and rejected completions of the shortest pair, as each
implementation computes them on its own batch (``DPOEngine.compute_logps``; TRL's ``compute_ref_log_probs`` run on the
policy), against a float64 copy of the policy on the CPU; naive = the plain bf16 model forward of each sequence alone
on the device, ``log_softmax`` in fp32.

Time estimate (H100): FLOPs ~ 8 * 1.24e9 * tokens each implementation feeds the model (policy forward + backward +
reference forward), at an assumed 40% of 790 TFLOP/s: ~0.55 s per TRL step (16 padded rows of ~1100 tokens), ~0.26 s
prefix_shared, ~0.4 s padding_free; plus the models (~5 s), TRL's trainer (~5 s) and the float64 CPU forward of the
checked pair (2 * 1.24e9 FLOPs per token at ~100 GFLOP/s: ~20 s for ~800 tokens).
"""

from __future__ import annotations

import copy
import types
from typing import Any

import torch

from fastdpo.benchmarks.gpu_accuracy import HEAD_REL_TOL, check, summarize
from fastdpo.benchmarks.gpu_measure import H100, Context, free_memory, time_passes
from fastdpo.benchmarks.gpu_peers import skip_reason

SECTION = "dpo"
DTYPE = torch.bfloat16
IMPLS = ("prefix_shared", "padding_free", "trl")
MFU = 0.4  # assumed fraction of the GEMM ceiling a whole training step reaches (estimates only)
NOISE = 2e-3
CASE_OVERHEAD_S = 2.0
TRL_INIT_S = 5.0
MODEL_BUILD_S = 5.0


def dims(dry_run: bool) -> dict[str, int]:
    if dry_run:
        return {
            "vocab_size": 300,
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "intermediate_size": 128,
        }
    return {
        "vocab_size": 128256,
        "hidden_size": 2048,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "intermediate_size": 8192,
    }


def data_args(dry_run: bool) -> types.SimpleNamespace:
    """What ``engine_step.make_rows`` reads."""
    pairs, prompt, completion = (2, 12, 6) if dry_run else (8, 512, 256)
    return types.SimpleNamespace(
        pairs=pairs, prompt_len=prompt, completion_len=completion, jitter=0.5, vocab=dims(dry_run)["vocab_size"], seed=0
    )


def num_params(d: dict[str, int]) -> int:
    h, i, layers = d["hidden_size"], d["intermediate_size"], d["num_hidden_layers"]
    kv = h // d["num_attention_heads"] * d["num_key_value_heads"]
    return d["vocab_size"] * h + layers * (2 * h * h + 2 * h * kv + 3 * h * i + 2 * h) + h  # tied head


def _lengths(rows: list[dict[str, list[int]]]) -> list[tuple[int, int, int]]:
    return [(len(r["prompt_input_ids"]), len(r["chosen_input_ids"]), len(r["rejected_input_ids"])) for r in rows]


def estimates(dry_run: bool, calls: int) -> dict[str, float]:
    """Seconds per case of one attention implementation: ``setup`` (models, references) and each implementation
    (``calls`` = warm-up + timed steps)."""
    from fastdpo.benchmarks.engine_step import make_rows

    d = dims(dry_run)
    lens = _lengths(make_rows(data_args(dry_run)))
    step_flops_per_token = 8.0 * num_params(d)
    rate = MFU * H100.bf16_tflops * 1e12
    fed = {
        "prefix_shared": sum(p + c + r for p, c, r in lens),
        "padding_free": sum(2 * p + c + r for p, c, r in lens),
        "trl": 2 * len(lens) * max(p + max(c, r) for p, c, r in lens),
    }
    p, c, r = min(lens, key=sum)
    out = {
        "setup": MODEL_BUILD_S
        + 2.0 * num_params(d) * (2 * p + c + r) / (H100.cpu_fp64_gflops * 1e9)
        + 10.0 * num_params(d) / (H100.cpu_gbps * 1e9)
        + CASE_OVERHEAD_S
    }
    for name, tokens in fed.items():
        out[name] = (
            calls * step_flops_per_token * tokens / rate + CASE_OVERHEAD_S + (TRL_INIT_S if name == "trl" else 0.0)
        )
    return out


def attn_impls(ctx: Context) -> list[tuple[str, str | None]]:
    """``(attention implementation, skip reason or None)``."""
    flash = skip_reason("flash_attention_2", ctx.peers)
    if flash is None and ctx.device.type != "cuda":
        flash = "skipped: flash_attention_2 needs CUDA"
    return [("sdpa", None), ("flash_attention_2", flash)]


def plan(dry_run: bool, calls: int, peers: dict[str, str]) -> dict[str, Any]:
    """Case count, parameters and the estimated seconds (``calls`` = warm-up + timed steps per case)."""
    n_attn = 1 + (skip_reason("flash_attention_2", peers) is None and not dry_run)
    return {
        "cases": n_attn * (len(IMPLS) + 1),
        "params": num_params(dims(dry_run)),
        "estimate_s": round(n_attn * sum(estimates(dry_run, calls).values()), 1),
    }


def run(ctx: Context) -> None:
    from fastdpo.benchmarks.engine_step import make_rows, make_tokenizer

    d, args = dims(ctx.dry_run), data_args(ctx.dry_run)
    rows = make_rows(args)
    lens = _lengths(rows)
    pick = min(range(len(rows)), key=lambda k: sum(lens[k]))
    state: dict[str, Any] = {
        "rows": rows,
        "tok": make_tokenizer(d["vocab_size"]),
        "pick": pick,
        "tokens": sum(2 * p + c + r for p, c, r in lens),
    }
    est = estimates(ctx.dry_run, ctx.warmup + ctx.repeats)
    for attn, reason in attn_impls(ctx):
        base = {
            "section": SECTION,
            "attn": attn,
            "dtype": "bfloat16",
            "D": d["hidden_size"],
            "V": d["vocab_size"],
            "pairs": len(rows),
            "tokens": state["tokens"],
        }
        if reason is not None:
            for name in IMPLS:
                ctx.skip({**base, "impl": name}, reason)
            continue
        ctx.run_case({**base, "impl": "setup"}, est["setup"], lambda attn=attn: _setup_case(ctx, attn, d, state))
        for name in IMPLS:
            skip = skip_reason(name, ctx.peers)
            if skip is None and name == "prefix_shared" and attn.startswith("flash"):
                skip = "skipped: prefix_shared needs a custom mask that flash attention cannot express"
            if skip is None and "models" not in state:
                skip = "skipped: the models could not be built (see the setup row)"
            if skip is not None:
                ctx.skip({**base, "impl": name}, skip)
                continue
            ctx.run_case({**base, "impl": name}, est[name], lambda name=name: _step_case(ctx, name, state))
        state.pop("models", None)
        free_memory(ctx.device)  # this attention's models, before the next one builds its own


def _sequences(state: dict[str, Any]) -> list[tuple[list[int], int]]:
    """The checked pair's two sequences as ``(token ids, prompt length)``."""
    r = state["rows"][state["pick"]]
    p = r["prompt_input_ids"]
    return [(p + r["chosen_input_ids"], len(p)), (p + r["rejected_input_ids"], len(p))]


def _completion_logps(model: torch.nn.Module, state: dict[str, Any], device: torch.device) -> torch.Tensor:
    """``[2]`` summed log-probs of the checked pair's completions, each sequence alone (no padding, no packing);
    log_softmax in fp32 for a bf16 model, in float64 for a float64 one."""
    out = []
    with torch.no_grad():
        for ids, n_prompt in _sequences(state):
            x = torch.tensor([ids], device=device)
            logits = model(input_ids=x, use_cache=False).logits[0, n_prompt - 1 : -1]
            logp = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), -1)
            out.append(logp.gather(-1, x[0, n_prompt:, None]).sum())
    return torch.stack(out).to("cpu", torch.float64)


def _setup_case(ctx: Context, attn: str, d: dict[str, int], state: dict[str, Any]) -> dict[str, Any]:
    """Build reference and policy; the float64 reference log-probs (once) and the naive bf16 ones (per attention)."""
    from fastdpo.benchmarks.engine_step import llama_config, perturbed_pair

    device = ctx.device
    config = llama_config(**d, tie_word_embeddings=True, max_position_embeddings=4096)
    policy, ref = perturbed_pair(config, seed=1234, noise=NOISE, attn=attn, dtype=DTYPE, device=device)
    with torch.no_grad():
        fingerprint = sum(p.double().sum().item() for p in policy.parameters())
    rec: dict[str, Any] = {"params": sum(p.numel() for p in policy.parameters()), "weights_fingerprint": fingerprint}
    if "ref64" not in state:
        m64 = copy.deepcopy(policy).to(device="cpu", dtype=torch.float64)
        state["ref64"] = _completion_logps(m64, state, torch.device("cpu"))
        state["ref64_fingerprint"] = fingerprint
        del m64
    state["naive"] = _completion_logps(policy, state, device)
    state["models"] = (policy, ref)
    rec["ref64_logps"] = state["ref64"].tolist()
    rec["naive_logps"] = state["naive"].tolist()
    rec["same_weights_as_ref64"] = fingerprint == state["ref64_fingerprint"]
    state["same_weights"] = rec["same_weights_as_ref64"]
    return rec


def _to(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _step_case(ctx: Context, name: str, state: dict[str, Any]) -> dict[str, Any]:
    from fastdpo.benchmarks.engine_step import make_trl_trainer, trl_examples

    policy, ref = state["models"]
    device, rows, pick = ctx.device, state["rows"], state["pick"]
    extra: dict[str, Any] = {}
    if name == "trl":
        trainer = make_trl_trainer(policy, ref, state["tok"], len(rows), use_cpu=device.type != "cuda")
        batch = _to(trainer.data_collator(trl_examples(rows)), device)
        model = trainer.model
        model.train()
        # transformers 5.x renamed the flag (the old name warns); compute_loss alone never turns it on
        flag = getattr(model, "is_activation_checkpointing", None)
        extra["gradient_checkpointing"] = bool(
            getattr(model, "is_gradient_checkpointing", False) if flag is None else flag
        )

        def fwd() -> torch.Tensor:
            return trainer.compute_loss(model, batch)

        def logps() -> tuple[torch.Tensor, torch.Tensor]:
            return trainer.compute_ref_log_probs(model, batch)  # TRL's log-prob path, run on the policy
    else:
        from fastdpo.collator import PreferenceCollator
        from fastdpo.engine import DPOEngine

        args = data_args(ctx.dry_run)
        collator = PreferenceCollator(
            state["tok"], packing=name, max_tokens_per_row=args.prompt_len + 2 * args.completion_len
        )
        batch = _to(collator(rows), device)
        engine = DPOEngine(policy, ref, reference="model", loss_type="sigmoid", beta=0.1)
        model = policy

        def fwd() -> torch.Tensor:
            return engine.step(batch)[0]

        def logps() -> tuple[torch.Tensor, torch.Tensor]:
            out = engine.compute_logps(policy, batch, with_grad=False)
            return out["chosen_logps"], out["rejected_logps"]

    passes, loss, _ = time_passes(
        fwd,
        lambda loss: loss.backward(),
        device=device,
        warmup=ctx.warmup,
        repeats=ctx.repeats,
        before=lambda: model.zero_grad(set_to_none=True),
    )
    model.zero_grad(set_to_none=True)
    step_s = passes.step_ms / 1e3
    rec: dict[str, Any] = {
        **passes.as_record(),
        **extra,
        "loss": float(loss.detach()),
        "fed_tokens": int(batch["input_ids"].numel()),
        "tokens_per_s": state["tokens"] / step_s,
        "pairs_per_s": len(rows) / step_s,
    }
    with torch.no_grad():
        chosen, rejected = logps()
    got = torch.stack([chosen[pick], rejected[pick]]).to("cpu", torch.float64)
    rec["logps"] = got.tolist()
    if not state.get("same_weights", False):
        return {**rec, "check": "n/a", "errors": "policy weights differ from the float64 copy's"}
    rec.update(summarize([check("policy_logps", got, state["naive"], state["ref64"], HEAD_REL_TOL[DTYPE])]))
    return rec
