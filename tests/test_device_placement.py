"""Device placement without a GPU: every tensor fastdpo builds during a step lands on the batch's / model's device.

On a CUDA machine a factory call without ``device=`` (``torch.arange(R)``, ``torch.tensor([n])``, ``torch.zeros(...)``)
builds a CPU tensor that then meets CUDA batch tensors -- a crash at the first step that a CPU-only suite never sees,
because there the default device *is* the batch's device. :class:`StrayFactoriesToMeta` restores the asymmetry on a
CPU machine: factory calls made *from fastdpo's own source files* without a device land on ``meta`` instead of the CPU.
The batch and model stay real CPU tensors (so data-dependent steps like ``nonzero`` and ``int(max)`` still run), and
any such stray tensor then either fails to mix with the CPU batch ("not on the expected device") or surfaces as a
``meta`` tensor in the outputs -- exactly where on a GPU it would be a CPU tensor among CUDA ones. (A batch on the
``meta`` device would be the mirror image, but the flash-varlen kwargs and the packed masks need real values.)

Host-side bookkeeping that is CPU by design is listed in :data:`HOST_SIDE` (reviewed: those tensors only feed Python
ints, they never meet the batch). The collator is host-side by contract (:data:`HOST_FILES`: it has no device; batches
are moved with ``.to(device)`` by the caller or the trainer's data loader).
"""

from __future__ import annotations

import copy
import os
import sys
import types
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from helpers import dpo_config, tiny_trainer
from torch.overrides import TorchFunctionMode
from torch.utils._device import _device_constructors

import fastdpo
from fastdpo import DPOEngine, PreferenceCollator
from fastdpo.attention import build_attention_kwargs
from fastdpo.tiny import make_model, make_tokenizer, preference_rows

pytestmark = pytest.mark.usefixtures("one_thread")

_FASTDPO_DIR = os.path.dirname(os.path.abspath(fastdpo.__file__))
_FACTORIES = _device_constructors()
#: (file name, function) of fastdpo code whose device-less tensors are host-side on purpose (they only feed Python
#: ints: the grad-in-forward group bookkeeping turns segment ids into lists before any tensor meets the batch).
HOST_SIDE = {("grad_in_forward.py", "_plan_groups"), ("grad_in_forward.py", "_chunk_rows")}
#: files that are host-side by contract: the collator builds CPU batches (the trainer's data loader calls it)
HOST_FILES = {"collator.py"}


class StrayFactoriesToMeta(TorchFunctionMode):
    """Put every tensor that fastdpo's source builds without ``device=`` on ``meta`` (see the module docstring).

    ``hits`` lists ``file:line function factory`` of each redirected call (the first failure points at one)."""

    def __init__(self) -> None:
        super().__init__()
        self.hits: list[str] = []

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = dict(kwargs or {})
        if (
            func in _FACTORIES
            and kwargs.get("device") is None
            and "out" not in kwargs
            and not any(isinstance(a, torch.Tensor) for a in args)
        ):  # torch.as_tensor(t) keeps t's device
            frame = sys._getframe(1)  # the Python line that called the factory
            path = os.path.abspath(frame.f_code.co_filename)
            func_frame = frame
            while func_frame.f_code.co_name.startswith("<") and func_frame.f_back is not None:
                func_frame = func_frame.f_back  # a comprehension / lambda: name the enclosing function
            site = (os.path.basename(path), func_frame.f_code.co_name)
            if path.startswith(_FASTDPO_DIR + os.sep) and site not in HOST_SIDE and site[0] not in HOST_FILES:
                kwargs["device"] = "meta"
                self.hits.append(f"{site[0]}:{frame.f_lineno} {site[1]} torch.{func.__name__}")
        return func(*args, **kwargs)


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def _assert_all_on(obj: Any, device: torch.device, hits: list[str]) -> None:
    found = list(_tensors(obj))
    assert found, "nothing to check"
    bad = [t.device for t in found if t.device != device]
    assert not bad, f"tensors on {bad} instead of {device}; device-less factories: {hits}"


def test_redirect_catches_a_device_less_factory() -> None:
    """The probe itself: a device-less ``torch.arange`` in fastdpo's source ends up on meta and fails to mix with a
    CPU tensor (what the unfixed flash-varlen kwargs did); one with ``device=`` passes untouched."""
    code = compile(
        "def stray(x):\n    return torch.arange(x.shape[0])[:, None] + x\n"
        "def placed(x):\n    return torch.arange(x.shape[0], device=x.device)[:, None] + x\n",
        os.path.join(_FASTDPO_DIR, "_probe.py"),
        "exec",
    )
    ns: dict[str, Any] = {"torch": torch}
    exec(code, ns)
    x = torch.ones(3, 2)
    with StrayFactoriesToMeta() as mode:
        with pytest.raises(RuntimeError, match="device"):
            ns["stray"](x)
        assert mode.hits == ["_probe.py:2 stray torch.arange"]
        assert ns["placed"](x).device == x.device


class _AttnStub(torch.nn.Module):
    """What build_attention_kwargs reads from a model: ``config`` and a parameter (device and dtype)."""

    def __init__(self, attn: str, window: int | None = None) -> None:
        super().__init__()
        layer_types = None if window is None else ["full_attention", "sliding_attention"]
        self.config = types.SimpleNamespace(_attn_implementation=attn, layer_types=layer_types, sliding_window=window)
        self.w = torch.nn.Parameter(torch.zeros(1))


# (flash + prefix_shared is a ValueError, tested in test_attention)
ATTN_CASES = [
    (p, a, w)
    for p in ("pad", "padding_free", "prefix_shared")
    for a, w in (("flash_attention_2", None), ("sdpa", None), ("eager", None), ("eager", 3), ("sdpa", 3))
    if not (a.startswith("flash") and p == "prefix_shared")
]


@pytest.mark.parametrize("packing,attn,window", ATTN_CASES)
def test_attention_kwargs_built_on_the_model_device(packing: str, attn: str, window: int | None) -> None:
    """Regression (issue 19.1): the flash varlen ``cu_seq_lens`` were built from ``torch.arange(R)`` and
    ``torch.tensor([R * L])`` on the CPU, so every flash-attention model with padding_free failed at step 1 on GPU."""
    tok = make_tokenizer()
    batch = PreferenceCollator(
        tok, packing=packing, max_tokens_per_row=60 if packing != "pad" else None, pad_to_multiple_of=8
    )(preference_rows(4, seed=3))
    model = _AttnStub(attn, window)
    want = build_attention_kwargs(batch, model)
    with StrayFactoriesToMeta() as mode:
        got = build_attention_kwargs(batch, model)
    _assert_all_on(got, torch.device("cpu"), mode.hits)
    assert mode.hits == []
    # and the same values as without the probe
    assert got.keys() == want.keys()
    for key in want:
        a, b = want[key], got[key]
        if isinstance(a, dict):
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        elif isinstance(a, torch.Tensor):
            assert torch.equal(a, b), key
        else:
            assert a == b, key


ENGINE_CASES = {
    "plain": {},
    "grad_in_forward": {"grad_in_forward": True},
    "ld_wpo": {"use_weighting": True, "ld_alpha": 0.5},
    "ld_wpo_gif": {"grad_in_forward": True, "use_weighting": True, "ld_alpha": 0.5},
    "batch_coupled_gif": {"grad_in_forward": True, "loss_type": ["sigmoid", "aot", "sft"]},
}


@pytest.fixture(scope="module")
def engine_parts() -> tuple[Any, torch.nn.Module, torch.nn.Module]:
    tok = make_tokenizer()
    return (
        tok,
        make_model("llama", tok, attn_implementation="eager", seed=0),
        make_model("llama", tok, attn_implementation="eager", seed=1),
    )


@pytest.mark.parametrize("packing", ["pad", "padding_free", "prefix_shared"])
@pytest.mark.parametrize("case", list(ENGINE_CASES))
def test_engine_step_builds_nothing_off_device(engine_parts: Any, packing: str, case: str) -> None:
    """A full ``DPOEngine.step`` + backward (reference and policy forwards, fused head, preference loss, metrics) makes
    no device-less tensor in fastdpo's code, for every packing and the grad-in-forward / LD / WPO paths."""
    tok, policy, ref = engine_parts
    batch = PreferenceCollator(tok, packing=packing)(preference_rows(3, seed=5))
    engine = DPOEngine(copy.deepcopy(policy), ref, **ENGINE_CASES[case])
    with StrayFactoriesToMeta() as mode:
        loss, metrics = engine.step(batch)
        loss.backward()
    _assert_all_on({"loss": loss, **metrics}, torch.device("cpu"), mode.hits)
    assert mode.hits == []
    assert torch.isfinite(loss)
    grads = [p.grad for p in engine.model.parameters() if p.grad is not None]
    assert grads and all(g.device.type == "cpu" for g in grads)


def test_engine_precomputed_reference_on_the_batch_device(engine_parts: Any) -> None:
    """Reference log-probs read from the batch (TRL-style precomputed columns) are put on the batch's device."""
    tok, policy, _ = engine_parts
    rows = [dict(r, ref_chosen_logps=-3.0 - i, ref_rejected_logps=-4.0 - i) for i, r in enumerate(preference_rows(3))]
    batch = PreferenceCollator(tok, packing="padding_free")(rows)
    engine = DPOEngine(copy.deepcopy(policy), reference="precomputed")
    with StrayFactoriesToMeta() as mode:
        ref_c, ref_r = engine.reference_logps(batch)
        loss, metrics = engine.step(batch)
    _assert_all_on([ref_c, ref_r, loss, metrics], torch.device("cpu"), mode.hits)
    assert ref_c.tolist() == [-3.0, -4.0, -5.0] and ref_r.tolist() == [-4.0, -5.0, -6.0]


def test_fast_dpo_trainer_step_builds_nothing_off_device(tmp_path: Any) -> None:
    """One ``FastDPOTrainer`` optimizer step (TRL's loop, the engine inside, metrics gathered) under the probe."""
    pytest.importorskip("datasets")
    pytest.importorskip("trl")
    trainer = tiny_trainer(dpo_config(tmp_path, max_steps=1, padding_free=True), rows_seed=2)
    with StrayFactoriesToMeta() as mode:
        trainer.train()
    assert mode.hits == []
    logged = trainer.state.log_history[0]
    assert torch.isfinite(torch.tensor(logged["loss"])) and "rewards/margins" in logged
