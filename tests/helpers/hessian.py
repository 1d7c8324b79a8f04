"""Dense reference Hessians of small models (float64), independent of thetascope's HVP code."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from thetascope.demo.model import GPT, GPTConfig

__all__ = ["dense_hessian", "tiny_gpt", "tiny_mlp"]


def dense_hessian(model: nn.Module, loss_of_model: Callable[[], Tensor]) -> Tensor:
    """``[n, n]`` Hessian of ``loss_of_model()`` w.r.t. the model's trainable parameters (in their order).

    Built with ``torch.autograd.functional.hessian`` on a flat vector put back through ``functional_call``
    (``torch.nn.utils.stateless``; the model's own parameters are not touched). SDPA runs its math kernel
    (the only one with a double backward on CPU).
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    named = [(k, p) for k, p in model.named_parameters() if p.requires_grad]
    shapes = [p.shape for _, p in named]
    sizes = [p.numel() for _, p in named]
    flat0 = torch.cat([p.detach().reshape(-1) for _, p in named])
    buffers = dict(model.named_buffers())

    def f(flat: Tensor) -> Tensor:
        parts = [c.view(s) for c, s in zip(flat.split(sizes), shapes)]
        params = {k: v for (k, _), v in zip(named, parts)}
        with _patched_forward(model, params | buffers):
            return loss_of_model()

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # module-scoped fixtures run before the single-thread fixture
    try:
        with sdpa_kernel(SDPBackend.MATH):
            return torch.autograd.functional.hessian(f, flat0, vectorize=True)
    finally:
        torch.set_num_threads(threads)


class _patched_forward:
    """Reparametrise ``model`` in place for the duration (``torch.nn.utils.stateless``)."""

    def __init__(self, model: nn.Module, params: dict[str, Tensor]) -> None:
        from torch.nn.utils.stateless import _reparametrize_module

        self._ctx = _reparametrize_module(model, params, tie_weights=True)

    def __enter__(self) -> None:
        self._ctx.__enter__()

    def __exit__(self, *exc: object) -> None:
        self._ctx.__exit__(*exc)


def tiny_mlp(dtype: torch.dtype = torch.float64, seed: int = 0) -> tuple[nn.Module, Callable[[], Tensor]]:
    """A 4-6-3 tanh MLP with an MSE loss on 16 fixed points (51 parameters)."""
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(dtype)
    x = torch.randn(16, 4, generator=g, dtype=dtype)
    y = torch.randn(16, 3, generator=g, dtype=dtype)
    return model, lambda: ((model(x) - y) ** 2).mean()


def tiny_gpt(
    dtype: torch.dtype = torch.float64, seed: int = 0, norm: str = "pre"
) -> tuple[GPT, Callable[..., Tensor]]:
    """A 2-layer demo GPT (d=4, 2 heads, vocab 7, L=4; about 400 parameters) with a next-token loss.

    The loss closure takes an optional model (a copy of the same shape) to evaluate instead.
    """
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=7, block_size=4, n_layer=2, n_head=2, n_embd=4, norm=norm))  # type: ignore[arg-type]
    model = model.to(dtype)
    g = torch.Generator().manual_seed(seed + 1)
    idx = torch.randint(0, 7, (3, 4), generator=g)
    tgt = torch.randint(0, 7, (3, 4), generator=g)
    return model, lambda m=None: (m if m is not None else model).loss(idx, tgt)
