"""``fastdpo memory``: the estimator's arithmetic against hand-computed byte counts, published parameter counts, and
deterministic counts of the bytes autograd saves (``saved_tensors_hooks``) on tiny HF models and log-prob heads."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import measure_matches_estimate, measured_prefix_shared_step, saved_bytes

from fastdpo import memory as M
from fastdpo import memory_cli
from fastdpo.benchmarks.memory_measure import build_models
from fastdpo.reference import naive_sequence_logprobs
from fastdpo.tiny import id_tokenizer

PUBLISHED_PARAMS = {  # model cards / HF safetensors index totals
    "Llama-3-8B": 8_030_261_248,
    "Llama-3.2-1B": 1_235_814_400,
    "Qwen2.5-0.5B": 494_032_768,
    "Gemma-2-2B": 2_614_341_888,
}


@pytest.mark.parametrize("name", list(PUBLISHED_PARAMS))
def test_preset_param_counts_match_published(name):
    shape, _ = M.load_model(name)
    assert M.param_counts(shape)["total"] == PUBLISHED_PARAMS[name]


def test_resident_parts_hand_computed():
    shape, _ = M.load_model("llama-3-8b")  # case-insensitive preset lookup
    step = M.StepConfig(pairs=1, prompt_len=3, completion_len=5, dtype="bf16", device="cuda")
    e = M.estimate(shape, step, "fastdpo")
    p = 8_030_261_248
    assert (e["weights"], e["grads"], e["optimizer"], e["reference"]) == (2 * p, 2 * p, 4 * p, 2 * p)
    pre = M.estimate(
        shape,
        M.StepConfig(pairs=1, prompt_len=3, completion_len=5, dtype="fp32", optimizer="sgd", reference="precomputed"),
        "naive",
    )
    assert (pre["weights"], pre["grads"], pre["optimizer"], pre["reference"]) == (4 * p, 4 * p, 0, 0)


def test_activation_bytes_hand_computed():
    """Llama-3.2-1B, 1 pair of 3 + 5 tokens in bf16: 2 rows x 8 = 16 tokens, 16 layers (D 2048, I 8192, 32 heads,
    8 kv heads of 64)."""
    shape, _ = M.load_model("Llama-3.2-1B")
    step = M.StepConfig(pairs=1, prompt_len=3, completion_len=5, dtype="bf16")
    norm = 4 * 2048 + 2 * 2 * 2048 + 4  # fp32 input, bf16 normalized + weighted output, fp32 rsqrt
    attn = 2 * (2 * 2048 + 2 * 512) + 4 * 32  # q, k (rotated), v, sdpa output in bf16; fp32 lse per head
    mlp = 4 * 2 * 8192
    expected = 16 * 16 * (2 * norm + attn + mlp) + 16 * (norm - 2 * 2048) + 2 * 8 * 64 * 2
    assert M.activation_bytes(shape, step) == expected == 28_020_800


def test_naive_head_hand_computed():
    shape, _ = M.load_model("Qwen2.5-0.5B")
    step = M.StepConfig(pairs=2, prompt_len=10, completion_len=20, dtype="fp32", device="cpu")
    h = M.head_bytes("naive", shape, step)
    n, n1, v, d = 4 * 30, 4 * 29, 151936, 896
    assert h["saved"] == 4 * n1 * v + 4 * n * d
    assert h["fwd_peak"] == 4 * n * v + 4 * n1 * v + h["saved"]  # logits, contiguous shifted copy, saved
    lm_head_backward = 4 * n * d + 4 * n * v + 4 * v * d  # saved input, logits grad, weight grad
    assert h["bwd_peak"] == max(h["saved"] + 8 * n1 * v, lm_head_backward)


def _tiny_config(name: str) -> dict:
    return dict(
        M.PRESETS[name],
        vocab_size=997,
        hidden_size=64,
        intermediate_size=96,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_hidden_layers=2,
    )


@pytest.mark.parametrize("name", ["Llama-3.2-1B", "Qwen2.5-0.5B", "Gemma-2-2B"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_activations_and_params_match_tiny_hf_model(name, dtype):

    cfg = _tiny_config(name)
    shape = M.shape_from_config(cfg, name)
    torch.manual_seed(0)
    _, model, _ = build_models({"dtype": dtype, "reference": "precomputed"}, cfg, None)
    assert sum(p.numel() for p in model.parameters()) == M.param_counts(shape)["total"]
    step = M.StepConfig(pairs=2, prompt_len=7, completion_len=12, dtype=dtype, device="cpu")
    ids = torch.randint(0, 997, (step.rows, step.seq_len))
    exclude = {p.untyped_storage().data_ptr() for p in model.parameters()} | {ids.untyped_storage().data_ptr()}
    saved = saved_bytes(lambda: model.model(input_ids=ids), exclude)
    _assert_matches_saved(shape, step, saved)


def _assert_matches_saved(shape: M.ModelShape, step: M.StepConfig, saved: int) -> None:
    est = M.activation_bytes(shape, step)
    if shape.eager_attention:  # a few scalars (normalizer, 1 + weight) not modelled
        assert est == pytest.approx(saved, rel=0.01)
    else:
        assert est == saved


def test_prefix_shared_activation_bytes_hand_computed():
    """Llama-3.2-1B, 1 pair of 3 + 5 tokens in bf16 packed as one [prompt, chosen, rejected] row of 13 tokens: k and v
    are repeated to all 32 heads (masked SDPA), each of the 16 layers saves a bf16 copy of the [1, 1, 13, 13] mask,
    the rotary tables are per row."""
    shape, _ = M.load_model("Llama-3.2-1B")
    step = M.StepConfig(pairs=1, prompt_len=3, completion_len=5, dtype="bf16", packing="prefix_shared")
    assert (step.rows, step.seq_len, step.scored_tokens) == (1, 13, 10)
    norm = 4 * 2048 + 2 * 2 * 2048 + 4
    attn = 2 * 4 * 2048 + 4 * 32  # q, repeated k and v, sdpa output in bf16; fp32 lse per head
    mlp = 4 * 2 * 8192
    expected = 16 * (13 * (2 * norm + attn + mlp) + 13 * 13 * 2) + 13 * (norm - 2 * 2048) + 2 * 1 * 13 * 64 * 2
    assert M.activation_bytes(shape, step) == expected == 24_051_924
    assert M.mask_bytes(shape, step) == 13 * 13  # the engine's bool mask, alive during the forwards
    phases = M.estimate(shape, step, "fastdpo")["phases"]
    resident = (2 + 4 + 2) * 1_235_814_400  # bf16 weights, AdamW states, reference
    assert phases["policy forward"] - phases["reference forward"] == 24_051_924 + (
        M.head_bytes("fastdpo", shape, step)["fwd_peak"] - M.head_bytes("fastdpo", shape, step)["ref_peak"]
    )
    assert phases["reference forward"] == resident + 13 * 13 + M.head_bytes("fastdpo", shape, step)["ref_peak"]
    padded = M.StepConfig(pairs=3, prompt_len=3, completion_len=5, packing="prefix_shared", pairs_per_row=2)
    assert (padded.rows, padded.seq_len) == (2, 26)  # the collator's greedy rows: 2 pairs, then 1 pair + padding


@pytest.mark.parametrize("name", ["Llama-3.2-1B", "Qwen2.5-0.5B", "Gemma-2-2B"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("prompt_len,pairs_per_row", [(7, 1), (0, 2)])
def test_prefix_shared_activations_match_engine_forward(name, dtype, prompt_len, pairs_per_row, one_thread):
    """prefix_shared through the engine's own forward (PreferenceCollator rows, build_attention_kwargs' mask, the
    model forward with the head restricted to zero positions): the saved bytes, the mask bytes, the rows and the
    scored tokens are the estimator's. 3 pairs of 2 per row leave a padded last row."""

    from fastdpo.attention import build_attention_kwargs
    from fastdpo.collator import PreferenceCollator
    from fastdpo.models import resolve_lm

    cfg = _tiny_config(name)
    shape = M.shape_from_config(cfg, name)
    torch.manual_seed(0)
    _, model, _ = build_models({"dtype": dtype, "reference": "precomputed"}, cfg, None)
    step = M.StepConfig(
        pairs=3,
        prompt_len=prompt_len,
        completion_len=12,
        dtype=dtype,
        device="cpu",
        packing="prefix_shared",
        pairs_per_row=pairs_per_row,
    )

    def ids(n: int) -> list[int]:
        return torch.randint(0, 997, (n,)).tolist()

    rows = [
        {"prompt_input_ids": ids(prompt_len), "chosen_input_ids": ids(12), "rejected_input_ids": ids(12)}
        for _ in range(step.pairs)
    ]
    collator = PreferenceCollator(
        id_tokenizer(997), packing="prefix_shared", max_tokens_per_row=pairs_per_row * (prompt_len + 2 * 12)
    )
    batch = collator(rows)
    assert tuple(batch["input_ids"].shape) == (step.rows, step.seq_len)
    assert batch["logp_index"].numel() == step.scored_tokens == M.head_bytes("fastdpo", shape, step)["positions"]
    kwargs = build_attention_kwargs(batch, model)
    mask = kwargs["attention_mask"]
    masks = list(mask.values()) if isinstance(mask, dict) else [mask]
    assert sum(m.untyped_storage().nbytes() for m in masks) == M.mask_bytes(shape, step)
    exclude = {p.untyped_storage().data_ptr() for p in model.parameters()}
    exclude |= {t.untyped_storage().data_ptr() for t in (*batch.values(), *masks) if isinstance(t, torch.Tensor)}
    saved = saved_bytes(lambda: resolve_lm(model).forward(batch["input_ids"], **kwargs), exclude)
    _assert_matches_saved(shape, step, saved)


def test_prefix_shared_saves_the_second_prompt_pass():
    """Against padding_free (2 unmasked rows per pair), Llama-3-8B in bf16: prefix_shared drops one prompt copy per
    pair and pays for the mask (a b-byte copy per layer, repeated k/v, per-row rotary tables). With no prompt only the
    price is left (the engine's rows then hold [chosen, rejected], the same tokens, still masked: see
    test_prefix_shared_activations_match_engine_forward's prompt_len=0 cases). naive and TRL ignore the packing."""
    shape, _ = M.load_model("Llama-3-8B")
    layers, q, kv, b, hd, pairs, c = 32, 4096, 1024, 2, 128, 8, 256
    norm = 4 * 4096 + 2 * b * 4096 + 4
    per_token = layers * (2 * norm + b * (2 * q + 2 * kv) + 4 * 32 + 4 * b * 14336) + norm - b * 4096
    for prompt_len in (0, 1024):
        pf = M.StepConfig(pairs=pairs, prompt_len=prompt_len, completion_len=c, dtype="bf16")
        ps = M.StepConfig(pairs=pairs, prompt_len=prompt_len, completion_len=c, dtype="bf16", packing="prefix_shared")
        row = prompt_len + 2 * c
        price = layers * (pairs * row * row * b + pairs * row * 2 * b * (q - kv)) + 2 * hd * b * (
            pairs * row - (prompt_len + c)
        )
        saving = pairs * prompt_len * per_token
        assert M.activation_bytes(shape, pf) - M.activation_bytes(shape, ps) == saving - price
        e_pf, e_ps = M.estimate(shape, pf, "fastdpo"), M.estimate(shape, ps, "fastdpo")
        assert e_ps["head_positions"] == e_pf["head_positions"] == 2 * pairs * (c - (prompt_len == 0))
        assert e_pf["phases"]["backward start"] - e_ps["phases"]["backward start"] == saving - price
        assert e_pf["phases"]["policy forward"] - e_ps["phases"]["policy forward"] == saving - price - pairs * row**2
        for variant in ("naive", "trl"):
            assert M.estimate(shape, ps, variant) == M.estimate(shape, pf, variant)
        if prompt_len == 0:
            assert e_ps["activations"] > e_pf["activations"]
        else:
            assert saving > price and e_ps["peak"] < e_pf["peak"]


def test_prefix_shared_measured_engine_step(monkeypatch):
    """``--measure`` for prefix_shared runs the real engine step (collator, DPOEngine.step, backward, optimizer) in
    its own process; its peak RSS over the baseline matches the estimate (a ~210 MiB step: 2 layers, V 32000)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    step = measured_prefix_shared_step(pairs=4, prompt_len=192, completion_len=64)
    measure_matches_estimate(step, ["fastdpo"], rel=0.1)


@pytest.mark.parametrize("variant", ["naive", "trl"])
def test_head_saved_bytes_deterministic(variant):
    """The log-prob part: bytes saved for backward by the naive head and TRL's fused head match head_bytes()."""
    from trl.kernels import ChunkedLogProbFunction

    shape = M.shape_from_config(dict(_tiny_config("Llama-3.2-1B"), vocab_size=5003, hidden_size=48), "tiny")
    step = M.StepConfig(pairs=2, prompt_len=9, completion_len=22, dtype="fp32", device="cpu")
    r, seq = step.rows, step.seq_len
    torch.manual_seed(1)
    hidden = torch.randn(r, seq, 48, requires_grad=True)
    weight = (torch.randn(5003, 48) / 7).requires_grad_()
    labels = torch.randint(0, 5003, (r, seq))
    labels[:, : step.prompt_len] = -100
    tgt = labels[:, 1:]

    def naive() -> torch.Tensor:  # what `fastdpo memory --measure` runs for the naive variant
        return naive_sequence_logprobs((hidden @ weight.T)[:, :-1].float(), tgt)

    def trl() -> torch.Tensor:
        h = hidden[:, :-1].reshape(-1, 48)
        lp = ChunkedLogProbFunction.apply(
            h, weight, None, tgt.clamp(min=0).reshape(-1), 1.0, M.TRL_VOCAB_TILE, None, 1.0, ("log_probs",)
        )[0]
        return (lp.view(r, seq - 1) * (tgt != -100)).sum(-1)

    exclude = {weight.untyped_storage().data_ptr()}
    saved = saved_bytes(naive if variant == "naive" else trl, exclude)
    est = M.head_bytes(variant, shape, step)["saved"]
    # beyond the model: the gather index / label mask (int64 / bool per position) autograd also keeps
    assert est == pytest.approx(saved, rel=0.02)
    assert est <= saved


def test_fastdpo_head_is_leaner_at_real_sizes():
    shape, _ = M.load_model("Llama-3-8B")
    step = M.StepConfig(pairs=8, prompt_len=1024, completion_len=1024, dtype="bf16")
    naive, fast = M.estimate(shape, step, "naive"), M.estimate(shape, step, "fastdpo")
    assert fast["head_positions"] == 16 * 1024 and naive["head_positions"] == 16 * 2048
    assert fast["logits"] < naive["logits"] / 4
    assert fast["peak"] < naive["peak"]


def test_config_json_and_cli(tmp_path, capsys):
    cfg = dict(M.PRESETS["Qwen2.5-0.5B"])
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert memory_cli.main(["--model", str(tmp_path), "--pairs", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model"]["vocab_size"] == 151936 and report["step"]["pairs"] == 2
    assert set(report["estimates"]) == set(M.VARIANTS) and report["measured"] == {}
    for e in report["estimates"].values():
        assert e["peak"] == max(e["phases"].values())
        assert e["params"] == PUBLISHED_PARAMS["Qwen2.5-0.5B"]
    assert memory_cli.main(["--model", "Gemma-2-2B", "--variants", "fastdpo"]) == 0
    assert "Gemma-2-2B" in capsys.readouterr().out


def test_cli_packing(capsys):
    assert (
        memory_cli.main(
            ["--model", "Llama-3.2-1B", "--packing", "prefix_shared", "--pairs-per-row", "2", "--pairs", "3", "--json"]
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert report["step"]["packing"] == "prefix_shared" and report["step"]["pairs_per_row"] == 2
    shape, _ = M.load_model("Llama-3.2-1B")
    packed = M.StepConfig(pairs=3, packing="prefix_shared", pairs_per_row=2)
    fast = report["estimates"]["fastdpo"]
    assert fast["activations"] == M.activation_bytes(shape, packed)
    assert fast["attention_mask"] == 2 * 3072**2  # 2 rows of 2 x (512 + 2 x 512) tokens, bool
    assert report["estimates"]["naive"]["activations"] == M.activation_bytes(shape, M.StepConfig(pairs=3))
    assert memory_cli.main(["--packing", "prefix_shared", "--variants", "fastdpo"]) == 0
    assert "prefix_shared (1 pair per row)" in capsys.readouterr().out


def test_bad_arguments():
    with pytest.raises(SystemExit, match="neither a preset"):
        memory_cli.main(["--model", "no-such-model"])
    with pytest.raises(SystemExit, match="pairs must be positive"):
        memory_cli.main(["--pairs", "0"])
    with pytest.raises(SystemExit, match="unknown variant"):
        memory_cli.main(["--variants", "naive,magic"])
    with pytest.raises(SystemExit, match="pairs_per_row applies to packing='prefix_shared' only"):
        memory_cli.main(["--pairs-per-row", "2"])
    with pytest.raises(SystemExit, match="pairs_per_row must be positive"):
        memory_cli.main(["--packing", "prefix_shared", "--pairs-per-row", "0"])
    with pytest.raises(ValueError, match="packing must be one of"):
        M.StepConfig(packing="pad")
    with pytest.raises(ValueError, match="lacks 'num_attention_heads'"):
        M.shape_from_config({"hidden_size": 8})
    with pytest.raises(ValueError, match="variant"):
        M.head_bytes("nope", M.load_model("Qwen2.5-0.5B")[0], M.StepConfig())


@pytest.mark.parametrize("bad", [0, 2.0, "2", True])
def test_step_config_refuses_a_bad_sequence_parallel_without_torch(bad: object) -> None:
    """``sequence_parallel`` must be a positive int (``ValueError``, as the other fields); the estimator stays
    torch-free: configuring a step in a fresh interpreter imports no torch."""
    import subprocess
    import sys

    with pytest.raises(ValueError, match="sequence_parallel must be a positive int"):
        M.StepConfig(pairs=1, prompt_len=3, completion_len=5, sequence_parallel=bad)
    code = (
        "import sys; from fastdpo import memory as M; "
        "M.StepConfig(pairs=1, prompt_len=3, completion_len=5, sequence_parallel=2); "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/")
    assert out.stdout.strip() == "False"
