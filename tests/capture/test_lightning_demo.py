"""The probe on ``lightning.pytorch.demos.Transformer`` (an ``nn.Transformer`` LM): discovery, blocks, theta,
residual/attention-input norms, temperature, and a real Trainer run with a probing callback."""

from __future__ import annotations

import copy
from contextlib import AbstractContextManager
from typing import Any

import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.demos.transformer import LightningTransformer, Transformer
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from tests.capture.conftest import mha_scaled_copy
from thetascope.capture import AttentionProbe
from thetascope.capture.torch_mha import mha_fastpath_disabled
from thetascope.functional.theta import balanced_mass_factor

VOCAB = 50

pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec.*")
NAMES = [
    "transformer.encoder.layers.0.self_attn",
    "transformer.encoder.layers.1.self_attn",
    "transformer.decoder.layers.0.self_attn",
    "transformer.decoder.layers.0.multihead_attn",
    "transformer.decoder.layers.1.self_attn",
    "transformer.decoder.layers.1.multihead_attn",
]


def _demo() -> Transformer:
    torch.manual_seed(0)
    return Transformer(vocab_size=VOCAB, ninp=32, nhead=2, nhid=64, nlayers=2, dropout=0.0)


def _batch() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randint(0, VOCAB, (3, 10), generator=g), torch.randint(0, VOCAB, (3, 10), generator=g)


def _record_inputs(model: nn.Module, kinds: tuple[type[nn.Module], ...]) -> tuple[dict[str, Any], list[Any]]:
    """Test-owned pre-hooks recording (args, kwargs) of every module of the given kinds."""
    seen: dict[str, Any] = {}
    handles = []
    for name, mod in model.named_modules():
        if isinstance(mod, kinds):

            def pre(mod: nn.Module, args: Any, kwargs: Any, name: str = name) -> None:
                seen[name] = (args, dict(kwargs))

            handles.append(mod.register_forward_pre_hook(pre, with_kwargs=True))
    return seen, handles


def test_discovery_blocks_and_norm_placement() -> None:
    model = _demo()
    probe = AttentionProbe(model, rows_per_head=4)
    assert [r.name for r in probe.layers] == NAMES
    # nn.Transformer: encoder self-, decoder self- and decoder cross-attention are three stacks
    assert [(r.stack, r.index, r.attention) for r in probe.layers] == [
        ("encoder", 0, "self"),
        ("encoder", 1, "self"),
        ("decoder", 0, "self"),
        ("decoder_cross", 0, "cross"),
        ("decoder", 1, "self"),
        ("decoder_cross", 1, "cross"),
    ]
    assert {r.kind for r in probe.layers} == {"torch_mha"}
    assert [r.block_name for r in probe.layers] == [n.rsplit(".", 1)[0] for n in NAMES]
    # the demo's nn.Transformer is post-LN (norm_first=False), cross-attention included
    assert [r.norm_placement for r in probe.layers] == ["post"] * 6
    assert all(r.path_length_m == 4 for r in probe.layers)


@pytest.mark.parametrize("train", [False, True])
def test_theta_and_norms_match_references(train: bool) -> None:
    model = _demo().train(train)
    inputs, target = _batch()
    seen, handles = _record_inputs(
        model, (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)
    )
    with mha_fastpath_disabled(), torch.no_grad():
        want_out = model(inputs, target)
    for h in handles:
        h.remove()
    modules = dict(model.named_modules())
    probe = AttentionProbe(model, rows_per_head=4)
    with probe.capture():
        out = model(inputs, target)
    assert torch.equal(out.detach(), want_out)
    for rec in probe.layers:
        args, kwargs = seen[rec.name]
        with torch.no_grad():
            w = modules[rec.name](*args, **{**kwargs, "need_weights": True, "average_attn_weights": False})[1]
        pos = rec.query_positions
        ref = balanced_mass_factor(
            w.gather(2, pos.unsqueeze(-1).expand(-1, -1, -1, w.shape[-1])), validate=False
        )
        torch.testing.assert_close(rec.theta.lower, ref.lower, atol=1e-5, rtol=0)
        torch.testing.assert_close(rec.theta.upper, ref.upper, atol=1e-5, rtol=0)
        # residual stream entering the block, and the attention input (query; query+memory for cross-attn)
        block_in = seen[rec.block_name][0][0]
        torch.testing.assert_close(rec.residual_max_norm, block_in.norm(dim=-1).max(), rtol=1e-6, atol=0)
        q, k = args[0], args[1]
        u = torch.cat([q, k], dim=1) if "multihead" in rec.name else q
        torch.testing.assert_close(rec.attn_input_max_norm, u.norm(dim=-1).max(), rtol=1e-6, atol=0)
    # the decoder's self-attention is causal (the demo's float -inf mask): first query row sees one key
    dec_sa = probe.layers[2]
    first = dec_sa.query_positions == 0
    assert bool((dec_sa.theta.upper[first] == 0).all())


def test_temperature_matches_scaled_copy() -> None:
    tau = 2.0
    model = _demo().eval()
    inputs, target = _batch()
    ref = mha_scaled_copy(model, tau)
    probe = AttentionProbe(model)
    probe.set_temperature(tau)
    with torch.no_grad():
        got = model(inputs, target)
        want = ref(inputs, target)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    probe.set_temperature(1.0)
    with torch.no_grad():
        assert torch.equal(model(inputs, target), copy.deepcopy(model)(inputs, target))


class _TinyLM(LightningTransformer):
    def __init__(self) -> None:
        super().__init__(vocab_size=VOCAB)
        self.model = _demo()

    def prepare_data(self) -> None:  # the demo downloads WikiText-2; use random tokens instead
        pass

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(4)
        data = torch.randint(0, VOCAB, (12, 9), generator=g)
        return DataLoader(TensorDataset(data[:, :-1], data[:, 1:]), batch_size=4)


class _ProbeCallback(Callback):
    """Temperature 2 on the first step, then 1; capture every training forward."""

    def __init__(self) -> None:
        self.probe: AttentionProbe | None = None
        self.cm: AbstractContextManager[Any] | None = None
        self.captured: list[list[float]] = []

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.probe = AttentionProbe(pl_module.model, rows_per_head=4)

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        assert self.probe is not None
        self.probe.set_temperature(2.0 if batch_idx == 0 else 1.0)
        self.cm = self.probe.capture()
        self.cm.__enter__()

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        assert self.probe is not None
        assert self.cm is not None
        self.cm.__exit__(None, None, None)
        self.captured.append([float(r.theta.upper.max()) for r in self.probe.layers if r.theta is not None])


def test_real_trainer_with_probe() -> None:
    cb = _ProbeCallback()
    trainer = Trainer(
        accelerator="cpu",
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[cb],
    )
    lm = _TinyLM()
    trainer.fit(lm)
    assert len(cb.captured) == 3
    assert all(len(step) == 6 and all(0.0 <= t <= 1.0 for t in step) for step in cb.captured)
    assert cb.probe is not None
    assert not cb.probe.is_installed
    assert torch.backends.mha.get_fastpath_enabled()
    assert trainer.global_step == 3
    assert all(bool(torch.isfinite(p).all()) for p in lm.parameters())
