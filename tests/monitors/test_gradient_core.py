"""GradientFlowCore from a plain loop: values against per-parameter references, sums of squares that add up
across shards, stack-aware layer keys, no host sync or collective between measurements, state round trip."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from tests.helpers.sync import SyncSpy
from thetascope.demo.model import GPT, GPTConfig
from thetascope.monitors import GradientFlowCore
from thetascope.monitors._collective import local_all_gather


def _gpt(n_layer: int = 3) -> GPT:
    return GPT(GPTConfig(vocab_size=32, block_size=8, n_layer=n_layer, n_head=2, n_embd=16))


def _backward(model: nn.Module, seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 32, (2, 8), generator=g)
    loss = nn.functional.cross_entropy(model(x).reshape(-1, 32), x.reshape(-1))
    loss.backward()
    return loss.detach()


def _reference(model: nn.Module, layer_of: Any) -> tuple[dict[Any, float], float]:
    """Per-layer and global norms from one float64 ``vector_norm`` per parameter."""
    sq: dict[Any, float] = {}
    total = 0.0
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        v = float(torch.linalg.vector_norm(p.grad.double())) ** 2
        total += v
        key = layer_of(name)
        if key is not None:
            sq[key] = sq.get(key, 0.0) + v
    return {k: math.sqrt(v) for k, v in sq.items()}, math.sqrt(total)


def test_plain_loop_values_match_reference() -> None:
    model = _gpt()
    core = GradientFlowCore(model, strict=True)
    _backward(model)
    core.observe_step()
    out = core.reduce(core.measure())
    layers, total = _reference(model, lambda n: int(n.split(".")[2]) if ".h." in n else None)
    assert out["stability/grad_norm/global"] == pytest.approx(total, rel=1e-5)
    assert out["stability/grad_norm_global"] == out["stability/grad_norm/global"]
    for i in range(3):
        assert out[f"stability/grad_norm/layer_{i:02d}"] == pytest.approx(layers[i], rel=1e-5)
    assert out["stability/grad/min_max_ratio"] == pytest.approx(min(layers.values()) / max(layers.values()))
    assert out["stability/grad/spike"] == 0.0
    assert out["stability/grad/nonfinite"] == 0.0
    assert core.layer_norms == pytest.approx([layers[i] for i in range(3)], rel=1e-5)


def test_measure_returns_sums_of_squares_that_shards_can_add() -> None:
    """Two "ranks" each hold half of every gradient (the other half zero): added sums of squares are exact."""
    model = _gpt(2)
    _backward(model)
    layers, total = _reference(model, lambda n: int(n.split(".")[2]) if ".h." in n else None)
    full = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    per_rank = []
    for rank in range(2):
        for n, p in model.named_parameters():
            flat = full[n].flatten()
            mask = (torch.arange(flat.numel()) % 2 == rank).to(flat.dtype)
            p.grad = (flat * mask).reshape(full[n].shape)
        values = GradientFlowCore(model).measure()
        per_rank.append(values)
    v0 = per_rank[0]
    assert v0["grad_sq"].shape == (2,)
    # a rank's value is a sum of squares (of its half), not a norm
    half = sum(float(full[n].flatten()[0::2].double().square().sum()) for n in full)
    assert float(v0["global_sq"]) == pytest.approx(half, rel=1e-5)

    core = GradientFlowCore(model, strict=True)
    core.replicated = False
    order = list(per_rank[0])

    def gather(vec: Tensor) -> Tensor:
        # what an all_gather over the two ranks returns: each rank packed its own values in the same layout
        other = torch.cat([per_rank[1][k].detach().reshape(-1).float() for k in order])
        return torch.stack([vec, other])

    out = core.reduce(per_rank[0], gather)
    assert out["stability/grad_norm/global"] == pytest.approx(total, rel=1e-5)  # sqrt(sum), not sum of norms
    for i in range(2):
        assert out[f"stability/grad_norm/layer_{i:02d}"] == pytest.approx(layers[i], rel=1e-5)


def test_unmeasured_steps_neither_sync_nor_communicate(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch.distributed as dist

    collectives: list[str] = []
    for name in ("all_gather", "all_reduce", "broadcast", "all_gather_into_tensor", "barrier"):
        monkeypatch.setattr(dist, name, lambda *a, __n=name, **k: collectives.append(__n))
    model = _gpt()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    core = GradientFlowCore(model, spike_window=8)
    for step in range(6):
        loss = _backward(model, seed=step)
        with SyncSpy() as spy:
            core.observe_loss(loss)
            core.observe_step(opt)
        assert spy.calls == [], (step, spy.calls)
        opt.step()
        opt.zero_grad()
    assert collectives == []
    assert int(core.grad_detector.n_seen) == 6
    assert int(core.loss_detector.n_seen) == 6
    # the measurement is the only place that reads values back
    with SyncSpy() as spy:
        core.reduce(core.measure(opt))
    assert spy.calls


def test_an_unmeasured_step_runs_a_dozen_device_operations() -> None:
    # kernel launches on a GPU: one fused norm (3 operations) and two deferred detector pushes (one copy each,
    # plus a settlement and a baseline every 10th step); eager detector updates would add about 60
    from benchmarks._ops import OpCounter

    model = _gpt(4)
    core = GradientFlowCore(model)
    counts = []
    for step in range(60):
        loss = _backward(model, seed=step)
        with OpCounter() as ops:
            core.observe_step()
            core.observe_loss(loss)
        counts.append(ops.n)
        model.zero_grad()
    steady = counts[30:]
    assert sum(steady) / len(steady) < 15
    assert min(steady) <= 5


def test_spike_counts_since_previous_measurement_and_state_round_trip() -> None:
    model = _gpt(2)
    core = GradientFlowCore(model, spike_window=10, strict=True)
    logged = []
    for step in range(16):
        loss = torch.tensor(1.0 + 0.01 * (step % 3)) * (1e4 if step == 12 else 1.0)
        core.observe_loss(loss)
        if step % 5 == 0:
            logged.append(core.reduce(core.measure(torch.optim.SGD(model.parameters(), lr=0.1))))
    assert [v["stability/grad/spike"] for v in logged] == [0.0, 0.0, 0.0, 1.0]
    assert logged[-1]["stability/loss/spike_count"] == 1.0
    state = core.state_dict()
    fresh = GradientFlowCore(model, spike_window=10)
    fresh.load_state_dict(state)
    assert fresh.state_dict()["loss_detector"]["n_spikes"] == 1
    assert fresh.state_dict()["loss_spikes_since"] == state["loss_spikes_since"] == 0
    torch.testing.assert_close(fresh.loss_detector.buffer, core.loss_detector.buffer)
    with pytest.raises((KeyError, ValueError)):
        fresh.load_state_dict({"grad_detector": state["grad_detector"]})
    assert fresh.state_dict()["loss_detector"]["n_spikes"] == 1  # a bad layout changed nothing


def test_nonfinite_gradients_are_counted_and_left_out() -> None:
    model = _gpt(2)
    core = GradientFlowCore(model, strict=True)
    _backward(model)
    next(model.parameters()).grad.fill_(math.nan)  # type: ignore[union-attr]
    core.observe_step()
    out = core.reduce(core.measure())
    assert out["stability/grad/nonfinite"] == 1.0
    assert out["stability/grad/spike"] == 1.0
    assert "stability/grad_norm/global" not in out
    assert all(math.isfinite(v) for v in out.values())


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"spike_window": 2}, "spike_window"),
        ({"spike_threshold": math.inf}, "spike_threshold"),
        ({"vanishing_fraction": 0.0}, "vanishing_fraction"),
        ({"layers": "first"}, "layers"),
        ({"prefix": 3}, "prefix"),
        ({"strict": 1}, "strict"),
    ],
)
def test_validation(kwargs: dict[str, Any], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        GradientFlowCore(None, **kwargs)
    with pytest.raises(ValueError, match="layers"):
        GradientFlowCore(_gpt(2), layers=[5])


# ----------------------------------------------------------------------------------------- stacks
def _stack_keys(model: nn.Module, loss: Tensor) -> dict[str, float]:
    core = GradientFlowCore(model, strict=True)
    loss.backward()
    return core.reduce(core.measure(), local_all_gather)


def _check_stacks(model: nn.Module, out: dict[str, float], n_enc: int, n_dec: int, pattern: str) -> None:
    import re

    regex = re.compile(pattern)

    def layer_of(name: str) -> tuple[str, int] | None:
        m = regex.search(name)
        return (m.group(1), int(m.group(2))) if m else None

    ref, total = _reference(model, layer_of)
    want = {f"stability/grad_norm/{s}/layer_{i:02d}": v for (s, i), v in ref.items()}
    got = {k: v for k, v in out.items() if "/layer_" in k}
    assert set(got) == set(want)
    assert len(want) == n_enc + n_dec
    for k, v in want.items():
        assert got[k] == pytest.approx(v, rel=1e-5), k
    assert out["stability/grad_norm/global"] == pytest.approx(total, rel=1e-5)


def test_torch_transformer_keeps_encoder_and_decoder_apart() -> None:
    model = nn.Transformer(
        d_model=8, nhead=2, num_encoder_layers=2, num_decoder_layers=3, dim_feedforward=16, batch_first=True
    )
    src, tgt = torch.randn(2, 5, 8), torch.randn(2, 4, 8)
    out = _stack_keys(model, model(src, tgt).square().mean())
    _check_stacks(model, out, 2, 3, r"^(encoder|decoder)\.layers\.(\d+)\.")


def test_hf_bart_and_t5_keep_stacks_apart() -> None:
    transformers = pytest.importorskip("transformers")
    bart = transformers.BartForConditionalGeneration(
        transformers.BartConfig(
            vocab_size=64,
            d_model=16,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            encoder_ffn_dim=32,
            decoder_ffn_dim=32,
            max_position_embeddings=32,
        )
    )
    ids = torch.randint(4, 64, (2, 6))
    out = _stack_keys(bart, bart(input_ids=ids, labels=ids).loss)
    _check_stacks(bart, out, 2, 2, r"(encoder|decoder)\.layers\.(\d+)\.")

    t5 = transformers.T5ForConditionalGeneration(
        transformers.T5Config(
            vocab_size=64,
            d_model=16,
            d_kv=8,
            d_ff=32,
            num_layers=2,
            num_decoder_layers=3,
            num_heads=2,
            decoder_start_token_id=0,
            pad_token_id=0,
        )
    )
    out = _stack_keys(t5, t5(input_ids=ids, labels=ids).loss)
    _check_stacks(t5, out, 2, 3, r"(encoder|decoder)\.block\.(\d+)\.")


def test_single_stack_models_keep_plain_keys() -> None:
    transformers = pytest.importorskip("transformers")
    bert = transformers.BertModel(
        transformers.BertConfig(
            vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32
        )
    )
    out = _stack_keys(bert, bert(input_ids=torch.randint(0, 64, (2, 6))).last_hidden_state.square().mean())
    assert sorted(k for k in out if "/layer_" in k) == [
        "stability/grad_norm/layer_00",
        "stability/grad_norm/layer_01",
    ]


def test_a_detector_that_cannot_be_read_at_a_measurement_warns_and_logs_no_nan() -> None:
    from thetascope.functional.spikes import SpikeDetector

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
    core = GradientFlowCore(model)
    model(torch.ones(2, 4)).sum().backward()
    core.observe_step()

    def unreadable(self: SpikeDetector) -> None:
        raise RuntimeError("settling failed")

    core.grad_detector._settle = unreadable.__get__(core.grad_detector)  # type: ignore[method-assign]
    with pytest.warns(RuntimeWarning, match="settling failed"):
        logged = core.reduce(core.measure())
    assert all(math.isfinite(v) for v in logged.values())
    assert "stability/grad/spike" in logged
