"""CurvatureCore against dense Hessians, and proof that a measurement leaves training untouched."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from tests.helpers.hessian import dense_hessian, tiny_gpt, tiny_mlp
from thetascope.keys import CURVATURE_SUBLAYER_TYPES, layer_key, trace_type_key
from thetascope.monitors.curvature import CurvatureCore, parameter_segments, sublayer_type

P = "stability/"


def _reference_blocks(model: nn.Module) -> tuple[list[int], list[str]]:
    """Per element of the flat parameter vector: its block (-1 outside) and sublayer type, written out by hand
    for the demo GPT (independent of ``parameter_segments``)."""
    layer: list[int] = []
    kind: list[str] = []
    for name, p in model.named_parameters():
        parts = name.split(".")
        blk = int(parts[2]) if parts[1] == "h" else -1
        if "c_attn" in name:  # W_Q; W_K; W_V stacked along dim 0
            third = p.numel() // 3
            for k in ("attn_q", "attn_k", "attn_v"):
                layer += [blk] * third
                kind += [k] * third
            continue
        k = (
            "embedding"
            if parts[1] in ("wte", "wpe")
            else "norm"
            if parts[-2].startswith("ln")
            else "attn_o"
            if "attn.c_proj" in name
            else "ffn"
        )
        layer += [blk] * p.numel()
        kind += [k] * p.numel()
    return layer, kind


@pytest.fixture(scope="module")
def gpt64():  # type: ignore[no-untyped-def]
    model, loss = tiny_gpt()
    return model, loss, dense_hessian(model, loss)


def test_sharpness_and_traces_per_block_and_type_match_dense(gpt64) -> None:  # type: ignore[no-untyped-def]
    model, loss, h = gpt64
    core = CurvatureCore(model, iters=40, trace_samples=64)
    out = core.reduce(core.measure(loss))
    assert core.backend == "math_sdpa"  # the CPU flash kernel of SDPA has no double backward
    ref = float(torch.linalg.eigvalsh(h)[-1])
    assert abs(out[f"{P}curvature/sharpness"] - ref) <= 1e-4 * abs(ref)
    layer, kind = _reference_blocks(model)
    diag = torch.diag(h)
    layer_t, kind_i = torch.tensor(layer), torch.tensor([CURVATURE_SUBLAYER_TYPES.index(k) for k in kind])
    for blk in (0, 1):
        dense = float(diag[layer_t == blk].sum())
        est, se = out[layer_key(P, "curvature/trace", blk)], out[layer_key(P, "curvature/trace_stderr", blk)]
        assert abs(est - dense) <= 3 * se, (blk, est, dense, se)
    for k in ("attn_q", "attn_k", "attn_v", "attn_o", "ffn", "norm", "embedding"):
        dense = float(diag[kind_i == CURVATURE_SUBLAYER_TYPES.index(k)].sum())
        est, se = out[trace_type_key(P, k)], out[trace_type_key(P, k, stderr=True)]
        assert abs(est - dense) <= 3 * se + 1e-9, (k, est, dense, se)
    assert trace_type_key(P, "head") not in out  # tied to the embedding: counted once, there
    assert abs(out[f"{P}curvature/trace"] - float(diag.sum())) <= 3 * out[f"{P}curvature/trace_stderr"]


def test_adam_preconditioned_sharpness_matches_dense(gpt64) -> None:  # type: ignore[no-untyped-def]
    model, loss, _ = gpt64
    model = copy.deepcopy(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, betas=(0.8, 0.9), eps=1e-6)
    for _ in range(3):
        opt.zero_grad()
        loss(model).backward()
        opt.step()
    core = CurvatureCore(model, iters=60, trace_samples=0)
    before = copy.deepcopy(model)  # θ_t
    opt.zero_grad()
    loss(model).backward()
    core.snapshot(opt)
    opt.step()
    out = core.reduce(core.measure(lambda: loss(model), opt))
    h = dense_hessian(before, lambda: loss(before))
    v_hat = torch.cat(
        [
            (opt.state[p]["exp_avg_sq"] / (1 - 0.9 ** float(opt.state[p]["step"]))).reshape(-1)
            for p in model.parameters()
        ]
    )
    d = (v_hat.sqrt() + 1e-6).rsqrt()
    ref = float(torch.linalg.eigvalsh(d[:, None] * h * d[None, :])[-1])
    assert abs(out[f"{P}curvature/precond_sharpness"] - ref) <= 1e-4 * abs(ref)
    assert abs(out[f"{P}curvature/sharpness"] - float(torch.linalg.eigvalsh(h)[-1])) <= 1e-4 * abs(ref)
    thr = (2 + 2 * 0.8) / ((1 - 0.8) * 1e-2)
    assert out[f"{P}curvature/threshold"] == pytest.approx(thr)
    assert out[f"{P}curvature/stability_ratio"] == pytest.approx(ref / thr, rel=1e-4)


def test_taylor_check_second_order_beats_first() -> None:
    model, loss = tiny_gpt()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    core = CurvatureCore(model, iters=5, trace_samples=0, backend="math_sdpa")
    opt.zero_grad()
    loss().backward()
    core.snapshot(opt)
    opt.step()
    out = core.reduce(core.measure(loss, opt))
    obs, first, second = (out[f"{P}curvature/{k}"] for k in ("loss_change", "taylor_first", "taylor_second"))
    assert obs < 0
    assert abs(second - obs) < 0.5 * abs(first - obs)
    assert out[f"{P}curvature/taylor_ratio"] == pytest.approx(obs / second)
    assert out[f"{P}curvature/threshold"] == pytest.approx(2 / 1e-3)


def _state(model: nn.Module, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> dict[str, object]:
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "grads": [p.grad.clone() for p in model.parameters()],
        "versions": None,
        "buffers": [b.clone() for b in model.buffers()],
        "modes": [m.training for m in model.modules()],
        "opt": copy.deepcopy(opt.state_dict()),
        "rng": torch.get_rng_state(),
        "scaler": copy.deepcopy(scaler.state_dict()),
    }


def _equal(a: object, b: object) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))  # type: ignore[arg-type]
    return a == b


@pytest.mark.parametrize(("backend", "train_mode"), [("double_backward", False), ("finite_difference", True)])
def test_measurement_leaves_training_state_bitwise(backend: str, train_mode: bool) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Dropout(0.3), nn.Linear(8, 1))
    x, y = torch.randn(16, 3), torch.randn(16, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)

    def step(measure: CurvatureCore | None) -> None:
        opt.zero_grad()
        scaler.scale(((model(x) - y) ** 2).mean()).backward()
        scaler.unscale_(opt)
        if measure is not None:
            measure.snapshot(opt)
        scaler.step(opt)
        scaler.update()

    for _ in range(2):
        step(None)
    model.train()
    model[1].eval()  # a mixed mode pattern must come back as it was
    core = CurvatureCore(model, iters=4, trace_samples=2, backend=backend, train_mode=train_mode)
    step(core)
    twin = (copy.deepcopy(model), copy.deepcopy(opt.state_dict()), torch.get_rng_state())
    before = _state(model, opt, scaler)
    out = core.reduce(core.measure(lambda: ((model(x) - y) ** 2).mean(), opt))
    assert f"{P}curvature/sharpness" in out
    assert f"{P}curvature/taylor_second" in out
    after = _state(model, opt, scaler)
    for key in before:
        assert _equal(before[key], after[key]), key
    # and training goes on exactly as without the measurement (dropout masks included)
    steps_a = []
    for _ in range(2):
        step(None)
        steps_a.append([p.detach().clone() for p in model.parameters()])
    model_b, opt_state, rng = twin
    opt_b = torch.optim.AdamW(model_b.parameters(), lr=1e-2)
    opt_b.load_state_dict(opt_state)
    torch.set_rng_state(rng)
    scaler_b = torch.amp.GradScaler("cpu", init_scale=4.0)
    scaler_b.load_state_dict(before["scaler"])  # type: ignore[arg-type]
    model, opt, scaler = model_b, opt_b, scaler_b
    for ref in steps_a:
        step(None)
        assert all(torch.equal(p, r) for p, r in zip(model.parameters(), ref))


def test_finite_difference_backend_agrees_float32() -> None:
    model, loss = tiny_gpt(torch.float32)
    exact = CurvatureCore(model, iters=30, trace_samples=0, seed=3)
    fd = CurvatureCore(model, iters=30, trace_samples=0, backend="finite_difference", seed=3)
    a = exact.reduce(exact.measure(loss))[f"{P}curvature/sharpness"]
    b = fd.reduce(fd.measure(loss))[f"{P}curvature/sharpness"]
    assert abs(a - b) <= 1e-3 * abs(a)


def test_state_dict_restores_warm_start() -> None:
    model, loss = tiny_mlp()
    core = CurvatureCore(model, iters=30, trace_samples=0)
    ref = core.reduce(core.measure(loss))[f"{P}curvature/sharpness"]
    state = core.state_dict()
    assert state["count"] == 1
    assert state["backend"] == "double_backward"
    warm = CurvatureCore(model, iters=2, trace_samples=0)
    warm.load_state_dict(state)
    assert torch.equal(warm.vectors["sharpness"], core.vectors["sharpness"])
    cold = CurvatureCore(model, iters=2, trace_samples=0)
    w = warm.reduce(warm.measure(loss))
    c = cold.reduce(cold.measure(loss))
    assert abs(w[f"{P}curvature/sharpness"] - ref) <= 1e-6 * ref
    assert w[f"{P}curvature/sharpness_residual"] < 1e-3 < c[f"{P}curvature/sharpness_residual"]


def test_sublayer_names() -> None:
    lin = nn.Linear(2, 2)
    cases = {
        "model.layers.0.self_attn.q_proj.weight": "attn_q",
        "model.layers.0.self_attn.k_proj.weight": "attn_k",
        "model.layers.0.self_attn.v_proj.weight": "attn_v",
        "model.layers.0.self_attn.o_proj.weight": "attn_o",
        "encoder.layer.1.attention.self.query.weight": "attn_q",
        "encoder.layer.1.attention.output.dense.weight": "attn_o",
        "encoder.layer.1.intermediate.dense.weight": "ffn",
        "encoder.layer.1.output.dense.weight": "ffn",
        "gpt_neox.layers.0.attention.query_key_value.weight": "attn_qkv",
        "lm_head.weight": "head",
    }
    for name, kind in cases.items():
        assert sublayer_type(name, lin) == kind, name
    mha = nn.MultiheadAttention(4, 2)
    lengths, layers, kinds = parameter_segments(["layers.2.attn.in_proj_weight"], [mha.in_proj_weight], [mha])
    assert (lengths, layers, kinds) == ([16, 16, 16], [2, 2, 2], ["attn_q", "attn_k", "attn_v"])


def test_sharded_parameters_and_bad_arguments_refused() -> None:
    fake_dtensor = type("DTensor", (nn.Parameter,), {})
    model = nn.Linear(2, 2)
    model.weight = fake_dtensor(torch.ones(2, 2))
    with pytest.raises(RuntimeError, match="FSDP2"):
        CurvatureCore(model)
    for kwargs in (
        {"method": "svd"},
        {"backend": "x"},
        {"iters": 0},
        {"trace_samples": -1},
        {"fd_step": 2.0},
    ):
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            CurvatureCore(nn.Linear(2, 2), **kwargs)  # type: ignore[arg-type]


def test_failure_is_reported_once_and_disables() -> None:
    model, _ = tiny_mlp()
    core = CurvatureCore(model)

    def broken() -> torch.Tensor:
        raise RuntimeError("boom")

    with pytest.warns(RuntimeWarning, match="boom"):
        out = core.reduce(core.measure(broken))
    assert out == {}
    assert not core.guard.active("curvature")
    assert core.reduce(core.measure(broken)) == {}


def test_snapshot_and_measure_read_nothing_back_to_the_host() -> None:
    from tests.helpers.sync import SyncSpy

    model, loss = tiny_gpt(torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss().backward()
    opt.step()
    core = CurvatureCore(model, iters=3, trace_samples=2)
    core.reduce(core.measure(loss, opt))  # resolves the backend (its probe may raise and be caught)
    opt.zero_grad()
    loss().backward()
    with SyncSpy() as spy:
        core.snapshot(opt)
    opt.step()  # AdamW itself reads its step counts
    with SyncSpy() as spy2:
        values = core.measure(loss, opt)
    assert spy.calls + spy2.calls == []
    assert f"{P}curvature/precond_sharpness" in core.reduce(values)  # reduce is where the host reads
