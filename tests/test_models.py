"""Model glue: backbone + head split reproduces each model's own logits (softcap, logit scale, tied weights, PEFT),
and the bitsandbytes reference copy."""

from __future__ import annotations

import pytest
import torch
import transformers

from fastdpo.models import (
    disable_dropout,
    enable_gradient_checkpointing,
    head_weight_bias,
    max_logit_error,
    quantize_model,
    resolve_lm,
)
from fastdpo.tiny import ARCHS, make_model

V = 101  # odd vocabulary


def _model(arch: str, **kw) -> torch.nn.Module:
    # Gemma-2's attention-logit softcapping has no SDPA path in transformers: eager attention there
    return make_model(arch, vocab_size=V, attn_implementation="eager" if arch == "gemma2" else "sdpa", **kw)


def _ids(b: int = 2, t: int = 11, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, V, (b, t), generator=torch.Generator().manual_seed(seed))


def _extra_model(kind: str) -> torch.nn.Module:
    common = dict(
        vocab_size=V,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    if kind == "cohere":
        config = transformers.CohereConfig(**common, logit_scale=0.37)
    elif kind == "granite":
        config = transformers.GraniteConfig(**common, logits_scaling=3.5)
    elif kind == "qwen2_tied":
        config = transformers.Qwen2Config(**common, tie_word_embeddings=True)
    else:
        raise ValueError(kind)
    torch.manual_seed(1)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.normal_(0, 0.2)
    return model.eval()


@pytest.mark.parametrize("arch", ARCHS)
def test_split_matches_model_logits(arch: str) -> None:
    model = _model(arch)
    parts = resolve_lm(model)
    assert parts.backbone is model.model
    weight, bias = parts.head_weight_bias()
    assert weight is model.lm_head.weight and bias is None
    assert parts.softcap == (30.0 if arch == "gemma2" else None)
    assert parts.logit_scale == 1.0
    logits = model(_ids()).logits
    assert logits.abs().max() > 1.0  # the check below can fail
    assert max_logit_error(model, _ids()) <= 1e-5


@pytest.mark.parametrize("kind,scale", [("cohere", 0.37), ("granite", 1 / 3.5), ("qwen2_tied", 1.0)])
def test_logit_scale_and_tied_weights(kind: str, scale: float) -> None:
    model = _extra_model(kind)
    parts = resolve_lm(model)
    assert parts.logit_scale == pytest.approx(scale)
    assert max_logit_error(model, _ids(seed=3)) <= 1e-5
    if kind == "qwen2_tied":
        assert parts.head_weight_bias()[0] is model.get_input_embeddings().weight


def test_head_bias_and_gradient_reaches_tied_embedding() -> None:
    model = _extra_model("qwen2_tied")
    parts = resolve_lm(model)
    hidden = parts.hidden_states(_ids(1, 5))
    parts.logits(hidden).logsumexp(-1).sum().backward()
    emb = model.get_input_embeddings().weight
    assert emb.grad is not None and emb.grad.abs().sum() > 0
    lin = torch.nn.Linear(7, 13)
    w, b = head_weight_bias(lin)
    assert w is lin.weight and b is lin.bias


def test_peft_lora_backbone_and_head_fold() -> None:
    peft = pytest.importorskip("peft")
    model = _model("llama")
    cfg = peft.LoraConfig(
        r=4, target_modules=["q_proj", "v_proj", "lm_head"], lora_dropout=0.0, init_lora_weights=False
    )
    pm = peft.get_peft_model(model, cfg)
    parts = resolve_lm(pm)
    assert parts.hf_model is pm.get_base_model()
    ids = _ids(seed=5)
    assert max_logit_error(pm, ids) <= 1e-5
    w_on, _ = parts.head_weight_bias()
    with pm.disable_adapter():
        assert max_logit_error(pm, ids) <= 1e-5
        w_off, _ = parts.head_weight_bias()
    assert (w_on - w_off).abs().max() > 1e-3  # the adapter on the head really is folded in
    # gradient of the folded head reaches the LoRA factors
    h = parts.hidden_states(ids)
    parts.logits(h).logsumexp(-1).sum().backward()
    lora_b = pm.get_base_model().lm_head.lora_B["default"].weight
    assert lora_b.grad is not None and lora_b.grad.abs().sum() > 0


def test_peft_modules_to_save_head() -> None:
    peft = pytest.importorskip("peft")
    pm = peft.get_peft_model(
        _model("qwen2"), peft.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"])
    )
    head = pm.get_base_model().lm_head
    with torch.no_grad():
        head.modules_to_save["default"].weight.add_(0.5)
    parts = resolve_lm(pm)
    assert parts.head_weight_bias()[0] is head.modules_to_save["default"].weight
    assert max_logit_error(pm, _ids()) <= 1e-5
    with pm.disable_adapter():
        assert parts.head_weight_bias()[0] is head.original_module.weight
        assert max_logit_error(pm, _ids()) <= 1e-5


def test_lora_dropout_on_head_in_training_is_refused() -> None:
    peft = pytest.importorskip("peft")
    pm = peft.get_peft_model(_model("llama"), peft.LoraConfig(r=2, target_modules=["lm_head"], lora_dropout=0.1))
    pm.train()
    with pytest.raises(ValueError, match="lora_dropout"):
        resolve_lm(pm).head_weight_bias()
    disable_dropout(pm)
    resolve_lm(pm).head_weight_bias()


def test_bad_models() -> None:
    with pytest.raises(TypeError, match="nn.Module"):
        resolve_lm("llama")  # type: ignore[arg-type]
    base = _model("llama").model  # a backbone has no LM head
    with pytest.raises(TypeError, match="output embedding"):
        resolve_lm(base)
    with pytest.raises(TypeError, match="2-D weight"):
        head_weight_bias(torch.nn.ReLU())


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_through_model_keeps_no_logits(arch: str) -> None:
    """``LMParts.forward`` runs the model's own forward (so wrapper hooks fire) with the head on zero positions: the
    captured hidden states equal the backbone's bitwise, the head's output is empty. An unwrapped model gets no anchor
    (it would cost a dense zero lm_head gradient); where one is needed (FSDP2) it is exactly 0 and carries the model
    output's autograd edge."""
    import dataclasses

    model = _model(arch).train()
    parts = resolve_lm(model)
    assert parts.through_model and not parts.needs_anchor
    ids = _ids(3, 13, seed=5)
    head_outputs: list[torch.Tensor] = []
    handle = model.lm_head.register_forward_hook(lambda m, a, out: head_outputs.append(out))
    try:
        assert parts.forward(ids)[1] is None
        hidden, anchor = dataclasses.replace(parts, needs_anchor=True).forward(ids)
    finally:
        handle.remove()
    assert [tuple(o.shape) for o in head_outputs] == [(3, 0, V)] * 2
    assert anchor is not None and anchor.requires_grad and float(anchor.detach()) == 0.0
    with torch.no_grad():
        direct = model.model(input_ids=ids, use_cache=False).last_hidden_state
    assert torch.equal(hidden.detach(), direct)
    (hidden.square().mean() + anchor).backward()
    assert model.model.embed_tokens.weight.grad is not None


class _NoKeepLM(torch.nn.Module):
    """A causal LM whose forward has no ``logits_to_keep`` (the backbone is then called directly)."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = _model("llama")
        self.model = self.inner.model
        self.lm_head = self.inner.lm_head
        self.config = self.inner.config

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.lm_head

    def get_decoder(self) -> torch.nn.Module:
        return self.model

    def forward(self, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.lm_head(self.model(input_ids=input_ids, **kwargs).last_hidden_state)


def test_resolve_lm_unwraps_ddp_and_refuses_wrapped_models_without_logits_to_keep(tmp_path) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("needs torch.distributed with gloo")
    plain = _NoKeepLM()
    parts = resolve_lm(plain)
    assert not parts.through_model
    hidden, anchor = parts.forward(_ids())
    assert anchor is None and torch.equal(hidden, plain.model(input_ids=_ids()).last_hidden_state)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        model = _model("llama")
        wrapped = DistributedDataParallel(model)
        parts = resolve_lm(wrapped)
        assert parts.model is wrapped and parts.hf_model is model and parts.backbone is model.model
        assert parts.through_model
        with pytest.raises(ValueError, match="logits_to_keep"):
            resolve_lm(DistributedDataParallel(_NoKeepLM()))
    finally:
        dist.destroy_process_group()


def test_gradient_checkpointing_flag() -> None:
    model = _model("llama")
    enable_gradient_checkpointing(model)
    assert all(layer.gradient_checkpointing for layer in model.model.layers)
    with pytest.raises(TypeError, match="gradient checkpointing"):
        enable_gradient_checkpointing(torch.nn.Linear(2, 2))


def dequantized_copy(model: torch.nn.Module, quantized: torch.nn.Module) -> torch.nn.Module:
    """An fp32 copy of ``model`` carrying the weights ``quantized`` (from quantize_model) actually represents."""
    import copy

    import bitsandbytes as bnb

    out = copy.deepcopy(model)
    for name, mod in quantized.named_modules():
        if isinstance(mod, bnb.nn.Linear4bit):
            weight = bnb.functional.dequantize_4bit(mod.weight.data, mod.weight.quant_state)
        elif isinstance(mod, bnb.nn.Linear8bitLt):
            scb = mod.weight.SCB if getattr(mod.weight, "SCB", None) is not None else mod.state.SCB  # moved on use
            weight = mod.weight.data.float() * scb.float()[:, None] / 127
        else:
            continue
        out.get_submodule(name).weight.data.copy_(weight)
    return out


@pytest.mark.parametrize("bits", [8, 4])
def test_quantize_model_cpu(bits: int) -> None:
    """bitsandbytes 0.50 runs 8-bit (LLM.int8) and 4-bit (nf4) Linear layers on CPU: the copy computes with the
    quantized weights (4-bit: exactly the dequantized-weight model; 8-bit: plus int8 activation rounding).

    The oracle is built from the quantized weights *before* the copy runs, and the copy's weights must be the same
    bytes after it ran: on CPUs with AVX512-BF16 (Intel Xeon since Cooper Lake, AMD Zen 4) bitsandbytes >= 0.49
    repacks a 4-bit weight in place on its first inference call and then computes in bf16, which quantize_model
    switches off (a dequantized oracle read after the call would read the repacked bytes)."""
    bnb = pytest.importorskip("bitsandbytes")
    model = _model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    q = quantize_model(model, bits)
    qtype = bnb.nn.Linear8bitLt if bits == 8 else bnb.nn.Linear4bit
    assert isinstance(q.model.layers[0].self_attn.q_proj, qtype)
    assert type(q.lm_head) is torch.nn.Linear  # the fused head needs a dense weight
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # original untouched
    assert not any(p.requires_grad for p in q.parameters())
    ids = _ids(seed=7)
    deq_model = dequantized_copy(model, q)
    q_bytes = {n: p.detach().clone() for n, p in q.named_parameters()}
    with torch.no_grad():
        full = model(ids).logits
        out = q(ids).logits
        out_again = q(ids).logits
        deq = deq_model(ids).logits
    for name, p in q.named_parameters():  # the quantized weights are not rewritten by a forward
        assert p.shape == q_bytes[name].shape and torch.equal(p, q_bytes[name]), name
    assert torch.equal(out, out_again)
    scale = full.abs().max().item()
    assert (out - full).abs().max() > 1e-4  # really quantized
    if bits == 4:
        assert (out - deq).abs().max() <= 1e-5 * scale
        assert (out - full).abs().max() < scale
    else:
        assert (out - full).abs().max() < 0.1 * scale
        assert (out - deq).abs().max() < 0.1 * scale
    with pytest.raises(ValueError, match="bits"):
        quantize_model(model, 3)  # type: ignore[arg-type]
