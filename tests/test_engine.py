"""DPOEngine against a naive full-logits oracle: log-probs for every packing and architecture, metrics, gradients of a
training step, reference modes (separate model, PEFT adapter, precomputed cache, bitsandbytes 8/4-bit), options."""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn.functional as F
from helpers import TRL_STEP_METRICS

from fastdpo.collator import PreferenceCollator
from fastdpo.engine import DPOEngine
from fastdpo.ref_cache import RefLogpCache, dataset_fingerprint, model_fingerprint, pair_keys
from fastdpo.reference import naive_dpo_loss
from fastdpo.tiny import ARCHS, make_model, make_tokenizer, preference_rows

PACKINGS = ("pad", "padding_free", "prefix_shared")


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def _model(arch: str, tok, seed: int = 0) -> torch.nn.Module:
    # Gemma-2's attention-logit softcapping has no SDPA path in transformers: eager attention there
    return make_model(arch, tok, attn_implementation="eager" if arch == "gemma2" else "sdpa", seed=seed)


def _rows(n: int = 5, seed: int = 3) -> list[dict]:
    return preference_rows(n, seed=seed)


def _batch(tok, rows, packing: str, **kw) -> dict:
    return PreferenceCollator(tok, packing=packing, **kw)(rows)


# ------------------------------------------------------------------------------------------------ naive oracle
def _naive_token_stats(model: torch.nn.Module, pad_batch: dict) -> list[dict]:
    """Per sequence (0..2P-1), from the model's full forward on that sequence alone (no padding, no packing):
    completion token log-probs, entropies, vocabulary-mean logits and argmax hits, all from [T, V] logits."""
    out: list[dict] = [{} for _ in range(2 * pad_batch["num_pairs"])]
    for r in range(pad_batch["input_ids"].shape[0]):
        real = pad_batch["attention_mask"][r].bool()
        ids = pad_batch["input_ids"][r][real]
        role = pad_batch["token_role"][r][real]
        s = int(pad_batch["token_seq"][r][real][0])
        logits = model(input_ids=ids[None]).logits[0].float()  # [T, V], the model's own head (softcap etc.)
        pred = logits[:-1]
        scored = role[1:] > 0
        targets = ids[1:]
        logp = pred.log_softmax(-1)
        out[s] = {
            "logps": logp.gather(-1, targets[:, None])[:, 0][scored],
            "entropy": -(logp.exp() * logp).sum(-1)[scored].detach(),
            "mean_logit": pred.mean(-1)[scored].detach(),
            "hit": (pred.argmax(-1) == targets)[scored],
            "log_sum_p2": torch.logsumexp(2 * logp, -1)[scored].detach(),
        }
    return out


def _naive_seq_logps(stats: list[dict]) -> torch.Tensor:
    return torch.stack([st["logps"].sum() for st in stats])


# ------------------------------------------------------------------------------------------------ log-probs
@pytest.mark.parametrize("arch", ARCHS)
def test_logps_all_packings_match_naive(arch: str, tok) -> None:
    policy, ref = _model(arch, tok, seed=0), _model(arch, tok, seed=1)
    rows = _rows()
    engine = DPOEngine(policy, ref)
    pad = _batch(tok, rows, "pad")
    with torch.no_grad():
        naive_pol = _naive_seq_logps(_naive_token_stats(policy, pad))
        naive_ref = _naive_seq_logps(_naive_token_stats(ref, pad))
    assert (naive_pol - naive_ref).abs().max() > 1.0  # policy and reference differ: the checks can fail
    p = len(rows)
    for packing, kw in [
        ("pad", {}),
        ("padding_free", {}),
        ("prefix_shared", {}),
        ("padding_free", {"max_tokens_per_row": 40}),
        ("prefix_shared", {"max_tokens_per_row": 60}),
    ]:
        batch = _batch(tok, rows, packing, **kw)
        assert pair_keys(batch) == pair_keys(pad)  # same pairs, same tokens
        out = engine.compute_logps(policy, batch, with_grad=True)
        got_pol = torch.cat([out["chosen_logps"], out["rejected_logps"]])
        got_ref = torch.cat(engine.reference_logps(batch))
        assert got_pol.dtype == torch.float32 and got_pol.shape == (2 * p,)
        torch.testing.assert_close(got_pol.detach(), naive_pol, rtol=1e-5, atol=1e-5, msg=f"policy {packing} {kw}")
        torch.testing.assert_close(got_ref, naive_ref, rtol=1e-5, atol=1e-5, msg=f"reference {packing} {kw}")


def test_empty_completions_are_legal(tok) -> None:
    policy, ref = _model("llama", tok), _model("llama", tok, seed=1)
    ids = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    rows = [
        {
            "prompt_input_ids": ids("What color is the sky?"),
            "chosen_input_ids": ids(" Blue."),
            "rejected_input_ids": [],
        },
        {"prompt_input_ids": ids("Tell me a joke"), "chosen_input_ids": [], "rejected_input_ids": []},
        {"prompt_input_ids": ids("Hello!"), "chosen_input_ids": ids(" Hi there"), "rejected_input_ids": ids(" No")},
    ]
    engine = DPOEngine(policy, ref)
    pad = _batch(tok, rows, "pad")
    naive = _naive_seq_logps(_naive_token_stats(policy, pad)).detach()
    for packing in PACKINGS:
        batch = _batch(tok, rows, packing)
        out = engine.compute_logps(policy, batch, with_grad=False)
        got = torch.cat([out["chosen_logps"], out["rejected_logps"]])
        assert got[3] == 0 and got[1] == 0 and got[4] == 0
        torch.testing.assert_close(got, naive, rtol=1e-5, atol=1e-5)
        policy.zero_grad()
        loss, _ = engine.step(batch)
        loss.backward()
        assert torch.isfinite(loss) and all(
            torch.isfinite(p.grad).all() for p in policy.parameters() if p.grad is not None
        )


# ------------------------------------------------------------------------------------------------ metrics
@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_metrics_match_naive(arch: str, tok) -> None:
    policy, ref = _model(arch, tok), _model(arch, tok, seed=1)
    # one pair whose chosen completion is the policy's greedy continuation: argmax hits are then not all zero
    prompt = tok("The quick brown fox")["input_ids"]
    greedy = list(prompt)
    with torch.no_grad():
        for _ in range(4):
            greedy.append(int(policy(input_ids=torch.tensor([greedy])).logits[0, -1].argmax()))
    rows = _rows(3, seed=5) + [
        {
            "prompt_input_ids": prompt,
            "chosen_input_ids": greedy[len(prompt) :],
            "rejected_input_ids": tok(" lazy dog", add_special_tokens=False)["input_ids"],
        }
    ]
    beta = 0.3
    engine = DPOEngine(policy, ref, beta=beta)
    pad = _batch(tok, rows, "pad")
    with torch.no_grad():
        st = _naive_token_stats(policy, pad)
        ref_logps = _naive_seq_logps(_naive_token_stats(ref, pad))
    pol_logps = _naive_seq_logps(st).detach()
    p = len(rows)
    chosen, rejected = st[:p], st[p:]
    cat = lambda parts, key: torch.cat([x[key] for x in parts]).double()  # noqa: E731
    c_r, r_r = beta * (pol_logps[:p] - ref_logps[:p]), beta * (pol_logps[p:] - ref_logps[p:])
    expected = {
        "logits/chosen": cat(chosen, "mean_logit").mean(),
        "logits/rejected": cat(rejected, "mean_logit").mean(),
        "entropy": cat(st, "entropy").mean(),
        "mean_token_accuracy": cat(chosen, "hit").mean(),
        "rewards/chosen": c_r.mean(),
        "rewards/rejected": r_r.mean(),
        "rewards/margins": (c_r - r_r).mean(),
        "rewards/accuracies": (c_r > r_r).double().mean(),
        "logps/chosen": pol_logps[:p].mean(),
        "logps/rejected": pol_logps[p:].mean(),
    }
    assert cat(chosen, "hit").sum() > 0  # some argmax hits: the accuracy check is not trivially 0 == 0
    for packing in PACKINGS:
        _, metrics = engine.step(_batch(tok, rows, packing))
        assert set(expected) <= set(metrics)
        for key, value in expected.items():
            got = metrics[key]
            assert isinstance(got, torch.Tensor) and got.dim() == 0 and not got.requires_grad
            assert float(got) == pytest.approx(float(value), rel=1e-5, abs=1e-5), (packing, key)


# ------------------------------------------------------------------------------------------------ training step
@pytest.mark.parametrize("arch", ARCHS)
def test_train_step_gradients_match_naive(arch: str, tok) -> None:
    rows = _rows(4, seed=7)
    beta = 0.5
    naive_model, ref = _model(arch, tok), _model(arch, tok, seed=1)
    pad = _batch(tok, rows, "pad")
    with torch.no_grad():
        ref_logps = _naive_seq_logps(_naive_token_stats(ref, pad))
    naive_loss = naive_dpo_loss(_naive_seq_logps(_naive_token_stats(naive_model, pad)), ref_logps, beta)
    naive_loss.backward()
    naive_grads = {n: p.grad.clone() for n, p in naive_model.named_parameters()}
    assert sum(g.abs().sum() for g in naive_grads.values()) > 0

    for packing in ("pad", "prefix_shared"):
        policy = _model(arch, tok)
        engine = DPOEngine(policy, ref, beta=beta)
        loss, _ = engine.step(_batch(tok, rows, packing))
        assert float(loss) == pytest.approx(float(naive_loss), rel=1e-5)
        loss.backward()
        for name, param in policy.named_parameters():
            scale = naive_grads[name].abs().max().clamp(min=1e-8)
            torch.testing.assert_close(
                param.grad, naive_grads[name], rtol=1e-4, atol=1e-4 * float(scale), msg=f"{packing}: grad of {name}"
            )
        before = {n: p.detach().clone() for n, p in policy.named_parameters()}
        torch.optim.SGD(policy.parameters(), lr=0.1).step()
        changed = [n for n, p in policy.named_parameters() if not torch.equal(p, before[n])]
        assert len(changed) == len(before)  # every parameter moved (lm_head, embeddings, every layer)
        new_loss, _ = engine.step(_batch(tok, rows, packing))
        assert float(new_loss) < float(loss)  # a gradient step with a small lr lowers the loss


def test_gradient_checkpointing_gives_same_gradients(tok) -> None:
    rows = _rows(3, seed=11)
    ref = _model("qwen2", tok, seed=1)
    grads = []
    for gc in (False, True):
        policy = _model("qwen2", tok).train()
        engine = DPOEngine(policy, ref, gradient_checkpointing=gc)
        assert all(layer.gradient_checkpointing == gc for layer in policy.model.layers)
        loss, _ = engine.step(_batch(tok, rows, "prefix_shared"))
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in policy.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "loss_type, options",
    [
        ("sigmoid", {}),
        (["sigmoid", "sft"], {}),
        (["aot", "ipo"], {}),
        ("sigmoid", {"use_weighting": True}),
        (["sigmoid", "sft"], {"ld_alpha": 0.3}),  # sft reads the plain (un-LD-weighted) NLL sums
        (["hinge", "sft"], {"ld_alpha": 0.5, "use_weighting": True}),  # one batch group with stats
    ],
    ids=["sigmoid", "sigmoid+sft", "aot+ipo", "wpo", "ld+sft", "ld+wpo+sft"],
)
def test_grad_in_forward_matches_autograd_path(loss_type, options, tok) -> None:
    rows = _rows(4, seed=13)
    ref = _model("gemma2", tok, seed=1)
    results = []
    for gif in (False, True):
        policy = _model("gemma2", tok)
        engine = DPOEngine(policy, ref, loss_type=loss_type, beta=0.2, grad_in_forward=gif, **options)
        loss, metrics = engine.step(_batch(tok, rows, "prefix_shared"))
        loss.backward()
        results.append((loss.detach(), metrics, {n: p.grad.clone() for n, p in policy.named_parameters()}))
    (l0, m0, g0), (l1, m1, g1) = results
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-6)
    for key in ("rewards/margins", "logps/chosen", "logps/rejected"):
        torch.testing.assert_close(m1[key], m0[key], rtol=1e-5, atol=1e-5)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-4, atol=1e-4 * float(g0[name].abs().max()) + 1e-9)


# ------------------------------------------------------------------------------------------------ loss options
def _naive_ld(stats: list[dict], p: int, alpha: float) -> torch.Tensor:
    out = []
    for s, st in enumerate(stats):
        i = s % p
        shared = min(len(stats[i]["logps"]), len(stats[p + i]["logps"]))
        lp = st["logps"].double()
        out.append(lp[:shared].sum() + alpha * lp[shared:].sum())
    return torch.stack(out)


def test_ld_wpo_sft_and_mixtures_match_naive(tok) -> None:
    rows = _rows(4, seed=17)
    policy, ref = _model("llama", tok), _model("llama", tok, seed=1)
    pad = _batch(tok, rows, "pad")
    with torch.no_grad():
        st = _naive_token_stats(policy, pad)
        st_ref = _naive_token_stats(ref, pad)
    p, beta = len(rows), 0.25
    pol = _naive_seq_logps(st).double().detach()
    rfl = _naive_seq_logps(st_ref).double()
    lengths = torch.tensor([len(x["logps"]) for x in st], dtype=torch.float64)
    assert (lengths[:p] != lengths[p:]).any()  # LD-DPO has something to cut

    def sig(pc, pr, rc, rr):
        return -F.logsigmoid(beta * ((pc - rc) - (pr - rr)))

    # LD-DPO (alpha 0.3), policy and reference alike
    ld_p, ld_r = _naive_ld(st, p, 0.3).detach(), _naive_ld(st_ref, p, 0.3)
    expected_ld = sig(ld_p[:p], ld_p[p:], ld_r[:p], ld_r[p:]).mean()
    # WPO: weight w_c * w_r with w = exp(mean_t(log p_t - log sum_v p_v^2))
    w = torch.stack([torch.exp((x["logps"].double() - x["log_sum_p2"].double()).mean()) for x in st])
    expected_wpo = (sig(pol[:p], pol[p:], rfl[:p], rfl[p:]) * w[:p] * w[p:]).mean()
    # sigmoid + 0.5 * sft (token-mean NLL over all chosen tokens)
    nll = -torch.cat([x["logps"].double() for x in st[:p]]).mean()
    expected_mix = sig(pol[:p], pol[p:], rfl[:p], rfl[p:]).mean() + 0.5 * nll
    # temperature 2 on both models
    cases = [
        (dict(ld_alpha=0.3), expected_ld),
        (dict(use_weighting=True), expected_wpo),
        (dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5]), expected_mix),
    ]
    for packing in ("padding_free", "prefix_shared"):
        batch = _batch(tok, rows, packing)
        for kwargs, expected in cases:
            engine = DPOEngine(policy, ref, beta=beta, **kwargs)
            loss, _ = engine.step(batch)
            assert float(loss) == pytest.approx(float(expected), rel=2e-5), (packing, kwargs)


def test_temperature_scales_logits(tok) -> None:
    rows = _rows(3, seed=19)
    policy, ref = _model("qwen2", tok), _model("qwen2", tok, seed=1)
    pad = _batch(tok, rows, "pad")
    engine = DPOEngine(policy, ref, temperature=2.0)
    out = engine.compute_logps(policy, _batch(tok, rows, "prefix_shared"), with_grad=False)
    expected = []
    for r in range(pad["input_ids"].shape[0]):
        real = pad["attention_mask"][r].bool()
        ids, role = pad["input_ids"][r][real], pad["token_role"][r][real]
        with torch.no_grad():
            logp = (policy(input_ids=ids[None]).logits[0, :-1] / 2.0).log_softmax(-1)
        expected.append(logp.gather(-1, ids[1:, None])[:, 0][role[1:] > 0].sum())
    torch.testing.assert_close(
        torch.cat([out["chosen_logps"], out["rejected_logps"]]), torch.stack(expected), rtol=1e-5, atol=1e-5
    )


# ------------------------------------------------------------------------------------------------ reference modes
def test_reference_modes_give_the_same_loss(tok, tmp_path) -> None:
    peft = pytest.importorskip("peft")
    rows = _rows(5, seed=23)
    base = _model("llama", tok)
    ref_copy = copy.deepcopy(base)
    policy = peft.get_peft_model(
        base,
        peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "lm_head"], lora_dropout=0.0, init_lora_weights=False),
    )
    batches = [_batch(tok, rows[:3], "prefix_shared"), _batch(tok, rows[3:], "prefix_shared")]

    model_engine = DPOEngine(policy, ref_copy, reference="model")
    adapter_engine = DPOEngine(policy, reference="adapter")
    path = tmp_path / "sub" / "ref.pt"
    model_engine.precompute_reference(batches, path)
    assert sorted(os.listdir(path.parent)) == ["ref.pt"]  # atomic write left no temporary file
    cache_engine = DPOEngine(policy, reference="precomputed", ref_cache=path, ref_model=ref_copy)
    adapter_cache = adapter_engine.precompute_reference(batches)
    # the PEFT base under disable_adapter() is the same reference as the plain copy: same fingerprint
    assert adapter_cache.model_hash == model_fingerprint(ref_copy)

    for batch in batches + [_batch(tok, rows[:3], "pad")]:  # the cache is packing-independent
        l_model, m_model = model_engine.step(batch)
        l_adapter, m_adapter = adapter_engine.step(batch)
        l_cache, m_cache = cache_engine.step(batch)
        ref_c, ref_r = adapter_cache.lookup(batch)
        column_batch = dict(batch, ref_chosen_logps=ref_c, ref_rejected_logps=ref_r)
        l_column, _ = DPOEngine(policy, reference="precomputed").step(column_batch)
        assert float(m_model["rewards/margins"]) != 0
        for other in (l_adapter, l_cache, l_column):
            torch.testing.assert_close(other, l_model, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(m_adapter["rewards/chosen"], m_model["rewards/chosen"], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(m_cache["rewards/rejected"], m_model["rewards/rejected"], rtol=1e-6, atol=1e-7)

    # gradients: adapter mode == model mode (the reference never receives gradient)
    grads = []
    for engine in (model_engine, adapter_engine, cache_engine):
        policy.zero_grad()
        engine.step(batches[0])[0].backward()
        grads.append({n: p.grad.clone() for n, p in policy.named_parameters() if p.requires_grad})
    for g in grads[1:]:
        for name in grads[0]:
            torch.testing.assert_close(g[name], grads[0][name], rtol=1e-5, atol=1e-8)
    assert not any(p.grad is not None for p in ref_copy.parameters())


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_reference_equal_to_policy_gives_exactly_zero_rewards(arch: str, tok) -> None:
    """Policy and reference with equal weights (TRL's step 0; every fresh LoRA run): the reference pass takes the
    same fused-head path as the policy (same token statistics requested), so the log-probs are bitwise equal, every
    reward is exactly 0 and ``rewards/accuracies`` is 0 (as TRL logs) — not ties broken by fp32 rounding."""
    policy = _model(arch, tok, seed=4)
    ref = copy.deepcopy(policy)
    rows = _rows(5, seed=29)
    for packing in PACKINGS:
        batch = _batch(tok, rows, packing)
        for kw in ({}, {"use_weighting": True}, {"compute_token_metrics": False}):
            engine = DPOEngine(policy, ref, **kw)
            pol = engine.compute_logps(policy, batch, with_grad=False, token_stats=engine.policy_token_stats)
            ref_c, ref_r = engine.reference_logps(batch)
            assert torch.equal(ref_c, pol["chosen_logps"]) and torch.equal(ref_r, pol["rejected_logps"]), (packing, kw)
            loss, metrics = engine.step(batch)
            for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
                assert float(metrics[name]) == 0.0, (packing, kw, name, float(metrics[name]))
            if not kw.get("use_weighting"):  # WPO scales the per-pair terms by weights < 1
                assert float(loss) == pytest.approx(float(torch.log(torch.tensor(2.0))), rel=1e-6)  # -log sigmoid(0)
    peft = pytest.importorskip("peft")
    lora = peft.get_peft_model(
        copy.deepcopy(policy), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    )  # B = 0: adapter is a no-op
    _, metrics = DPOEngine(lora, reference="adapter").step(_batch(tok, rows, "prefix_shared"))
    assert float(metrics["rewards/margins"]) == 0.0 and float(metrics["rewards/accuracies"]) == 0.0


def test_ref_cache_refuses_other_model_dataset_or_settings(tok, tmp_path) -> None:
    rows = _rows(4, seed=29)
    policy, ref = _model("qwen2", tok), _model("qwen2", tok, seed=1)
    batches = [_batch(tok, rows, "padding_free")]
    engine = DPOEngine(policy, ref)
    path = tmp_path / "ref.pt"
    cache = engine.precompute_reference(batches, path)
    assert len(cache) == 4
    loaded = RefLogpCache.load(path, model=ref, batches=batches, settings=engine.ref_settings)
    assert loaded.keys == cache.keys and torch.equal(loaded.values, cache.values)
    assert loaded.data_hash == dataset_fingerprint(pair_keys(batches[0]))

    with pytest.raises(ValueError, match="another model"):
        RefLogpCache.load(path, model=policy)
    with pytest.raises(ValueError, match="another model"):
        DPOEngine(policy, reference="precomputed", ref_cache=path, ref_model=policy)
    other_rows = _rows(4, seed=31)
    with pytest.raises(ValueError, match="another dataset"):
        RefLogpCache.load(path, batches=[_batch(tok, other_rows, "pad")])
    with pytest.raises(ValueError, match="settings"):
        DPOEngine(policy, reference="precomputed", ref_cache=path, ld_alpha=0.5)
    cache_engine = DPOEngine(policy, reference="precomputed", ref_cache=path)
    with pytest.raises(ValueError, match="not in the reference cache"):
        cache_engine.step(_batch(tok, other_rows[:2], "pad"))
    # truncation changes the tokens, hence the keys
    with pytest.raises(ValueError, match="not in the reference cache"):
        cache_engine.step(_batch(tok, rows, "pad", max_length=12))

    # overwriting is atomic and the new content wins
    cache2 = DPOEngine(policy, ref, ld_alpha=0.5).precompute_reference(batches, path)
    assert sorted(os.listdir(tmp_path)) == ["ref.pt"]
    again = RefLogpCache.load(path, settings={"ld_alpha": 0.5, "temperature": 1.0})
    assert torch.equal(again.values, cache2.values) and not torch.equal(again.values, cache.values)
    (tmp_path / "junk.pt").write_bytes(b"not a cache")
    with pytest.raises(ValueError, match="not a fastdpo reference cache"):
        RefLogpCache.load(tmp_path / "junk.pt")


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_reference(bits: int, tok) -> None:
    """bitsandbytes 0.50 runs Linear8bitLt / Linear4bit on CPU, so the quantized reference is tested for real. The
    dequantized oracle is taken before the quantized reference first runs (on AVX512-BF16 CPUs bitsandbytes would
    otherwise repack a 4-bit weight in place on that call; quantize_model turns that off, checked here too)."""
    pytest.importorskip("bitsandbytes")
    from test_models import dequantized_copy

    from fastdpo.models import quantize_model
    from fastdpo.ref_cache import model_fingerprint

    rows = _rows(4, seed=37)
    beta = 0.1
    policy, ref = _model("llama", tok), _model("llama", tok, seed=1)
    qref = quantize_model(ref, bits)
    deq = dequantized_copy(ref, qref)
    fingerprint = model_fingerprint(qref)
    batch = _batch(tok, rows, "prefix_shared")
    loss_fp, _ = DPOEngine(policy, ref, beta=beta).step(batch)
    engine_q = DPOEngine(policy, qref, beta=beta)
    loss_q, _ = engine_q.step(batch)
    ref_fp = torch.cat(DPOEngine(policy, ref).reference_logps(batch))
    ref_q = torch.cat(engine_q.reference_logps(batch))
    assert model_fingerprint(qref) == fingerprint  # running the reference did not change it
    assert (ref_q - ref_fp).abs().max() > 1e-4  # the reference really is quantized
    if bits == 4:  # 4-bit computes exactly with the dequantized weights
        loss_deq, _ = DPOEngine(policy, deq, beta=beta).step(batch)
        torch.testing.assert_close(loss_q, loss_deq, rtol=1e-5, atol=1e-6)
    else:
        assert ((ref_q - ref_fp).abs() / ref_fp.abs()).max() < 0.05
    # -logsigmoid is 1-Lipschitz: the loss moves by at most beta * mean |d ref_c - d ref_r|
    p = len(rows)
    d = ref_q - ref_fp
    bound = beta * (d[:p] - d[p:]).abs().mean()
    assert (loss_q - loss_fp).abs() <= bound + 1e-6
    # the engine can build the quantized copy itself
    built = DPOEngine(policy, ref, beta=beta, ref_quantization=bits)
    torch.testing.assert_close(built.step(batch)[0], loss_q, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------------------------ bad input
def test_bad_arguments(tok) -> None:
    policy, ref = _model("llama", tok), _model("llama", tok, seed=1)
    with pytest.raises(ValueError, match="reference"):
        DPOEngine(policy, ref, reference="frozen")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="ref_model"):
        DPOEngine(policy)
    with pytest.raises(ValueError, match="separate"):
        DPOEngine(policy, policy)
    with pytest.raises(ValueError, match="PEFT"):
        DPOEngine(policy, reference="adapter")
    with pytest.raises(ValueError, match="loss_type"):
        DPOEngine(policy, ref, loss_type="nope")
    with pytest.raises(ValueError, match="ld_alpha"):
        DPOEngine(policy, ref, ld_alpha=2.0)
    with pytest.raises(TypeError, match="ref_cache"):
        DPOEngine(policy, reference="precomputed", ref_cache=123)  # type: ignore[arg-type]
    engine = DPOEngine(policy, ref)
    with pytest.raises(ValueError, match="missing"):
        engine.step({"input_ids": torch.zeros(1, 3, dtype=torch.long)})
    with pytest.raises(ValueError, match="ref_chosen_logps"):
        DPOEngine(policy, reference="precomputed").step(_batch(tok, _rows(2), "pad"))


# ------------------------------------------------------------------------------------------------ TRL parity
def test_loss_and_metrics_match_trl_dpo_trainer(tmp_path) -> None:
    """Same weights, same token ids: DPOEngine (prefix sharing, fused head) reproduces TRL 1.16 DPOTrainer's loss,
    gradients and logged metrics (this is also the benchmark's set-up, benchmarks/engine_step.py)."""
    pytest.importorskip("trl")
    import argparse

    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from fastdpo.benchmarks.engine_step import make_models, make_rows
    from fastdpo.benchmarks.engine_step import make_tokenizer as make_id_tokenizer

    args = argparse.Namespace(
        pairs=3, prompt_len=21, completion_len=7, jitter=0.5, vocab=211, hidden=32, layers=1, heads=4, seed=5
    )
    rows = make_rows(args)
    tok = make_id_tokenizer(args.vocab)
    policy, ref = make_models(args)
    trl_policy = copy.deepcopy(policy)
    config = DPOConfig(
        output_dir=str(tmp_path),
        report_to="none",
        per_device_train_batch_size=args.pairs,
        max_length=None,
        beta=0.2,
        use_cpu=True,
        bf16=False,
        save_strategy="no",
        logging_strategy="no",
    )
    trainer = DPOTrainer(
        model=trl_policy,
        ref_model=ref,
        args=config,
        processing_class=tok,
        train_dataset=Dataset.from_list([{"prompt": "t3", "chosen": " t4", "rejected": " t5"}]),
    )
    trl_batch = trainer.data_collator(
        [
            {
                "prompt_ids": r["prompt_input_ids"],
                "chosen_ids": r["chosen_input_ids"],
                "rejected_ids": r["rejected_input_ids"],
            }
            for r in rows
        ]
    )
    trl_loss = trainer.compute_loss(trainer.model, trl_batch)
    trl_loss.backward()
    trl_metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    engine = DPOEngine(policy, ref, beta=0.2)
    loss, metrics = engine.step(PreferenceCollator(tok, packing="prefix_shared")(rows))
    loss.backward()
    assert float(loss) == pytest.approx(float(trl_loss), rel=1e-5)
    for key in TRL_STEP_METRICS:
        assert float(metrics[key]) == pytest.approx(trl_metrics[key], rel=1e-4, abs=1e-5), key
    trl_params = dict(trl_policy.named_parameters())
    for name, param in policy.named_parameters():
        expected = trl_params[name].grad
        torch.testing.assert_close(param.grad, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()) + 1e-9)
