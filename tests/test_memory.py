"""``fastdpo memory``: the estimator's arithmetic against hand-computed byte counts, published parameter counts, and
deterministic counts of the bytes autograd saves (``saved_tensors_hooks``) on tiny HF models and log-prob heads."""
from __future__ import annotations

import json

import pytest
import torch

from fastdpo import memory as M

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
    pre = M.estimate(shape, M.StepConfig(pairs=1, prompt_len=3, completion_len=5, dtype="fp32", optimizer="sgd",
                                         reference="precomputed"), "naive")
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
    return dict(M.PRESETS[name], vocab_size=997, hidden_size=64, intermediate_size=96, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, num_hidden_layers=2)


def _saved_bytes(fn, exclude: set[int]) -> int:
    """Bytes of distinct storages autograd saves while ``fn`` runs, excluding the storages in ``exclude``."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(nbytes for ptr, nbytes in seen.items() if ptr not in exclude)


@pytest.mark.parametrize("name", ["Llama-3.2-1B", "Qwen2.5-0.5B", "Gemma-2-2B"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_activations_and_params_match_tiny_hf_model(name, dtype):
    from transformers import AutoModelForCausalLM

    cfg = _tiny_config(name)
    shape = M.shape_from_config(cfg, name)
    config = M.hf_config(cfg, None, dtype)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, M.TORCH_DTYPES[dtype]),
                                             attn_implementation="eager" if shape.eager_attention else "sdpa")
    assert sum(p.numel() for p in model.parameters()) == M.param_counts(shape)["total"]
    step = M.StepConfig(pairs=2, prompt_len=7, completion_len=12, dtype=dtype, device="cpu")
    ids = torch.randint(0, 997, (step.rows, step.seq_len))
    exclude = {p.untyped_storage().data_ptr() for p in model.parameters()} | {ids.untyped_storage().data_ptr()}
    saved = _saved_bytes(lambda: model.model(input_ids=ids), exclude)
    est = M.activation_bytes(shape, step)
    if shape.eager_attention:  # a few scalars (normalizer, 1 + weight) not modelled
        assert est == pytest.approx(saved, rel=0.01)
    else:
        assert est == saved


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

    def naive() -> torch.Tensor:
        logits = hidden @ weight.T
        lp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return (lp * (tgt != -100)).sum(-1)

    def trl() -> torch.Tensor:
        h = hidden[:, :-1].reshape(-1, 48)
        lp = ChunkedLogProbFunction.apply(h, weight, None, tgt.clamp(min=0).reshape(-1), 1.0, M.TRL_VOCAB_TILE,
                                          None, 1.0, ("log_probs",))[0]
        return (lp.view(r, seq - 1) * (tgt != -100)).sum(-1)

    exclude = {weight.untyped_storage().data_ptr()}
    saved = _saved_bytes(naive if variant == "naive" else trl, exclude)
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
    assert M.main(["--model", str(tmp_path), "--pairs", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model"]["vocab_size"] == 151936 and report["step"]["pairs"] == 2
    assert set(report["estimates"]) == set(M.VARIANTS) and report["measured"] == {}
    for e in report["estimates"].values():
        assert e["peak"] == max(e["phases"].values())
        assert e["params"] == PUBLISHED_PARAMS["Qwen2.5-0.5B"]
    assert M.main(["--model", "Gemma-2-2B", "--variants", "fastdpo"]) == 0
    assert "Gemma-2-2B" in capsys.readouterr().out


def test_bad_arguments():
    with pytest.raises(SystemExit, match="neither a preset"):
        M.main(["--model", "no-such-model"])
    with pytest.raises(SystemExit, match="pairs must be positive"):
        M.main(["--pairs", "0"])
    with pytest.raises(SystemExit, match="unknown variant"):
        M.main(["--variants", "naive,magic"])
    with pytest.raises(ValueError, match="lacks 'num_attention_heads'"):
        M.shape_from_config({"hidden_size": 8})
    with pytest.raises(ValueError, match="variant"):
        M.head_bytes("nope", M.load_model("Qwen2.5-0.5B")[0], M.StepConfig())
