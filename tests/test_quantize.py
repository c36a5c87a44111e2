"""bitsandbytes reference copies (:func:`fastdpo.quantize.quantize_model`): what they hold, where they are quantized,
and that the 4-bit CPU forward computes the same thing on every CPU family.

Root cause of the Intel/AMD-Zen-4 failure (issue 13, item 13): bitsandbytes >= 0.49 registers a fused 4-bit CPU kernel
when the CPU has AVX512-BF16; ``Linear4bit.forward`` then (eval mode, input without grad) rewrites the layer's weight
in place into that kernel's layout (``_convert_weight_packed_for_cpu``: other nibble order, absmax transposed to
bf16) and computes in bf16 from then on, and fails outright on layers whose sizes are not multiples of 32 / the block
size. quantize_model switches that path off on its layers and checks the CPU forward once per process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")

from fastdpo import quantize
from fastdpo.quantize import four_bit_forward_problem, quantize_model, quantized_linear


def _odd_llama(hidden: int = 48, intermediate: int = 72, layers: int = 1, vocab: int = 53) -> torch.nn.Module:
    """A Llama whose projection sizes are not multiples of 32 (k/v: 24 rows, MLP: 72) nor of the 64-block size."""
    from transformers import LlamaForCausalLM

    from fastdpo.tiny import tiny_config

    # fastdpo.tiny's 4 heads / 2 KV heads; LlamaConfig's own special ids (no pad id); an MLP width of our choosing
    config = tiny_config(
        "llama", vocab, hidden_size=hidden, num_layers=layers, special_ids=(None, 1, 2), tie_word_embeddings=False
    )
    config.intermediate_size = intermediate
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        model = LlamaForCausalLM(config)
        with torch.no_grad():
            for p in model.parameters():
                if p.ndim >= 2:
                    p.normal_(0, 0.1)
    return model.eval()


def _needs_avx512bf16() -> None:
    from bitsandbytes.functional import has_avx512bf16

    if not has_avx512bf16():
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes' fused 4-bit CPU path does not exist here")


def _dequantized(lin: torch.nn.Module) -> torch.Tensor:
    return bnb.functional.dequantize_4bit(lin.weight.data, lin.weight.quant_state).double()


def test_four_bit_odd_shapes_match_dequantized_weights() -> None:
    """Layers of 24 / 72 rows and 48 / 72 columns (the shapes the fused AVX512-BF16 path rejects with an
    AssertionError / RuntimeError) compute x @ dequantize(W).T at fp32 precision, and keep their bytes."""
    model = _odd_llama()
    q = quantize_model(model, 4)
    ids = torch.randint(0, 53, (2, 9), generator=torch.Generator().manual_seed(1))
    inputs: dict[str, torch.Tensor] = {}
    outputs: dict[str, torch.Tensor] = {}

    def record(name: str):
        def hook(module: torch.nn.Module, args: tuple, out: torch.Tensor) -> None:
            inputs[name], outputs[name] = args[0].detach().clone(), out.detach().clone()

        return hook

    hooks = [m.register_forward_hook(record(n)) for n, m in q.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    weights = {n: p.detach().clone() for n, p in q.named_parameters()}
    with torch.no_grad():
        q(ids)
    for h in hooks:
        h.remove()
    assert len(outputs) == 7  # q, k, v, o, gate, up, down
    for name, out in outputs.items():
        lin = q.get_submodule(name)
        x = inputs[name].double()
        expected = x @ _dequantized(lin).T
        err = (out.double() - expected).abs().max() / expected.abs().max()
        assert err < 1e-6, (name, err.item())
    for name, p in q.named_parameters():
        assert torch.equal(p, weights[name]), name


def test_four_bit_probe_detects_bitsandbytes_repacking() -> None:
    """four_bit_forward_problem flags the real bitsandbytes AVX512-BF16 path (weight rewritten, bf16 compute) and
    passes quantize_model's layers."""
    _needs_avx512bf16()
    torch.manual_seed(0)
    x = torch.randn(5, 64)
    ours = quantized_linear(torch.nn.Linear(64, 64), 4, device="cpu")
    assert four_bit_forward_problem(ours, x) is None
    theirs = quantized_linear(torch.nn.Linear(64, 64), 4, device="cpu")
    theirs.support_avx512bf16_for_cpu = True  # what a plain bnb.nn.Linear4bit does on this CPU
    problem = four_bit_forward_problem(theirs, x)
    assert problem is not None and "rewrote the layer's weight" in problem
    odd = quantized_linear(torch.nn.Linear(64, 48), 4, device="cpu")
    odd.support_avx512bf16_for_cpu = True
    problem = four_bit_forward_problem(odd, x)
    assert problem is not None and "fails" in problem and "AssertionError" in problem


def test_quantize_model_refuses_a_wrong_four_bit_cpu_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """If the layers quantize_model builds would take bitsandbytes' repacking bf16 path, it raises instead of
    returning a reference that computes something else (the real bitsandbytes path, re-enabled)."""
    _needs_avx512bf16()
    real = quantize.quantized_linear

    def bnb_default(*args, **kwargs):
        layer = real(*args, **kwargs)
        if isinstance(layer, bnb.nn.Linear4bit):
            layer.support_avx512bf16_for_cpu = True
        return layer

    monkeypatch.setattr(quantize, "quantized_linear", bnb_default)
    quantize._cpu_4bit_problem.cache_clear()
    try:
        with pytest.raises(RuntimeError, match="refusing a 4-bit reference on CPU: bitsandbytes"):
            quantize_model(_odd_llama(hidden=64, intermediate=128), 4)
    finally:
        quantize._cpu_4bit_problem.cache_clear()


def _reachable_bytes(module: torch.nn.Module) -> dict[str, int]:
    """Bytes of every distinct storage reachable from ``module``: parameters, buffers, and the tensors bitsandbytes
    keeps beside them (Int8Params CB/SCB, Linear8bitLt state CB/SCB, 4-bit quant_state absmax/code/nested stats),
    split into float ("fp") and integer ("int") storages."""
    seen: dict[int, torch.Tensor] = {}

    def add(t: object) -> None:
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            seen.setdefault(t.untyped_storage().data_ptr(), t)

    for m in module.modules():
        for t in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False)):
            add(t)
            add(getattr(t, "CB", None))
            add(getattr(t, "SCB", None))
            qs = getattr(t, "quant_state", None)
            if qs is not None:
                add(qs.absmax)
                add(qs.code)
                if qs.nested:
                    add(qs.offset)
                    add(qs.state2.absmax)
                    add(qs.state2.code)
        state = getattr(m, "state", None)
        if state is not None:
            add(getattr(state, "CB", None))
            add(getattr(state, "SCB", None))
    out = {"fp": 0, "int": 0}
    for t in seen.values():
        out["fp" if t.is_floating_point() else "int"] += t.untyped_storage().nbytes()
    return out


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_copy_holds_no_full_precision_weights(bits: int) -> None:
    """Every tensor reachable from the copy, bitsandbytes' side tensors included: the backbone Linear weights exist
    only quantized (int8 + one fp32 scale per row; packed 4-bit + block statistics), before and after a forward; the
    rest of the model (embeddings, norms, dense head) is the original size."""
    model = _odd_llama(hidden=64, intermediate=160, layers=2, vocab=97)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    linear_elems = sum(m.weight.numel() for m in linears.values())
    rows = sum(m.out_features for m in linears.values())
    dense_bytes = sum(p.numel() * 4 for n, p in model.named_parameters() if n.rsplit(".", 1)[0] not in linears)
    dense_bytes += sum(b.untyped_storage().nbytes() for b in model.buffers())  # rotary tables
    q = quantize_model(model, bits)
    for name, lin in linears.items():
        layer = q.get_submodule(name)
        assert layer.weight.dtype == (torch.int8 if bits == 8 else torch.uint8), name
        assert layer.weight.numel() == (lin.weight.numel() if bits == 8 else lin.weight.numel() // 2), name
    ids = torch.randint(0, 97, (2, 7))
    for when in ("built", "after a forward"):
        got = _reachable_bytes(q)
        if bits == 8:
            assert got["int"] == linear_elems, when  # CB, shared by weight.data and CB/state.CB
            assert got["fp"] == dense_bytes + 4 * rows, when  # + the fp32 SCB row scales
        else:
            assert got["int"] == linear_elems // 2 + sum(-(-m.weight.numel() // 64) for m in linears.values()), when
            extra = got["fp"] - dense_bytes  # block statistics and code books; an fp16 weight copy is 2 bytes/element
            assert 0 < extra < linear_elems // 2, when
        with torch.no_grad():
            q(ids)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantization_happens_from_cpu_data(bits: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """bitsandbytes quantizes a parameter in ``.to(device)``, and ``Int8Params.to`` does so only when the data is on
    the CPU (from GPU data it keeps the full-precision copy on the GPU until the first forward). quantized_linear hands
    bitsandbytes CPU data for every layer, whatever device the model is on: recorded at each ``.to`` of an
    unquantized parameter (the real method runs)."""
    param_cls = bnb.nn.Int8Params if bits == 8 else bnb.nn.Params4bit
    real_to = param_cls.to
    calls: list[tuple[str, torch.dtype]] = []

    def recording_to(self, *args, **kwargs):
        quantized = self.data.dtype == torch.int8 if bits == 8 else self.bnb_quantized
        if not quantized:
            calls.append((self.data.device.type, self.data.dtype))
        out = real_to(self, *args, **kwargs)
        return out

    quantize_model(_odd_llama(), bits)  # runs the cached 4-bit CPU probe now, so only the 7 layers' moves are recorded
    monkeypatch.setattr(param_cls, "to", recording_to)
    model = _odd_llama()
    q = quantize_model(model, bits)
    assert len(calls) == 7
    assert all(device == "cpu" for device, _ in calls), calls
    for name, lin in model.named_modules():
        if isinstance(lin, torch.nn.Linear) and name != "lm_head":
            w = q.get_submodule(name).weight
            if bits == 8:  # exactly bitsandbytes' LLM.int8 row-wise quantization of the fp16 weight
                cb, scb, _ = bnb.functional.int8_vectorwise_quant(lin.weight.detach().half())
                assert torch.equal(w.data, cb) and torch.equal(w.SCB, scb), name
            else:
                assert w.bnb_quantized and w.quant_state is not None, name


_PEAK_CHILD = textwrap.dedent(
    """
    import json, sys, torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from fastdpo.benchmarks.measure import proc_status_kb as kb, reset_peak_rss
    from fastdpo.quantize import quantize_model

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=1024, intermediate_size=2048, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=64)
    model = LlamaForCausalLM(config).eval()
    linear_bytes = sum(m.weight.numel() * 4 for n, m in model.named_modules()
                       if isinstance(m, torch.nn.Linear) and n != "lm_head")
    quantize_model(model, 4)  # warm-up: imports, the 4-bit CPU probe
    out = {"linear_bytes": linear_bytes}
    for bits in (8, 4):
        reset_peak_rss()
        base = kb("VmRSS")
        q = quantize_model(model, bits)
        out[bits] = (kb("VmHWM") - base) * 1024
        del q
    print(json.dumps(out))
    """
)


def test_quantize_model_peak_memory() -> None:
    """Peak resident memory of quantize_model over the model (CPU, glibc returning freed blocks at once): the
    quantized layers' full-precision weights are never duplicated (no deep copy of them, one layer's fp16 transient at
    a time), so the peak stays well below their size (80 MB of fp32 Linear weights here; a whole-model deep copy
    needs all of it). Same code path on a GPU model, where the duplicate would sit in GPU memory."""
    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("needs Linux /proc/self/clear_refs to reset the peak RSS")
    from fastdpo.benchmarks.measure import MALLOC_ENV

    env = {**os.environ, **MALLOC_ENV, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", _PEAK_CHILD],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=os.path.dirname(__file__),
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    linear_bytes = res["linear_bytes"]
    assert linear_bytes > 60 * 2**20
    assert res["8"] < 0.5 * linear_bytes, res
    assert res["4"] < 0.5 * linear_bytes, res
