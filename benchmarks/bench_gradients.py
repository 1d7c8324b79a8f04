"""Per-layer gradient norms: one fused ``torch._foreach_norm`` against a ``.item()`` per parameter.

Parameter list shaped like GPT-2 small (12 layers x d=768: 148 tensors, 124M parameters with the tied
embedding). Both sides compute the same per-layer and global norms in the same run.
"""

from __future__ import annotations

import torch
from torch import nn

from benchmarks._timing import time_call
from thetascope.functional.gradients import grad_norms_by_group, group_parameters_by_layer


def gpt2_small_like(
    device: torch.device, n_layers: int = 12, d: int = 768, vocab: int = 50257
) -> list[tuple[str, nn.Parameter]]:
    shapes: list[tuple[str, tuple[int, ...]]] = [
        ("transformer.wte.weight", (vocab, d)),
        ("transformer.wpe.weight", (1024, d)),
    ]
    for i in range(n_layers):
        p = f"transformer.h.{i}."
        shapes += [
            (p + "ln_1.weight", (d,)),
            (p + "ln_1.bias", (d,)),
            (p + "attn.c_attn.weight", (d, 3 * d)),
            (p + "attn.c_attn.bias", (3 * d,)),
            (p + "attn.c_proj.weight", (d, d)),
            (p + "attn.c_proj.bias", (d,)),
            (p + "ln_2.weight", (d,)),
            (p + "ln_2.bias", (d,)),
            (p + "mlp.c_fc.weight", (d, 4 * d)),
            (p + "mlp.c_fc.bias", (4 * d,)),
            (p + "mlp.c_proj.weight", (4 * d, d)),
            (p + "mlp.c_proj.bias", (d,)),
        ]
    shapes += [("transformer.ln_f.weight", (d,)), ("transformer.ln_f.bias", (d,))]
    named: list[tuple[str, nn.Parameter]] = []
    for name, shape in shapes:
        param = nn.Parameter(torch.empty(shape, device=device))
        param.grad = torch.randn(shape, device=device) * 1e-3
        named.append((name, param))
    return named


def main() -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    named = gpt2_small_like(device)
    ids, groups, other = group_parameters_by_layer(named)

    def fused() -> object:
        return grad_norms_by_group(groups, other=other)

    def per_item() -> tuple[list[float], float]:
        # what a straightforward callback does: one host read per parameter
        per = []
        for group in groups:
            per.append(sum(p.grad.norm().item() ** 2 for p in group if p.grad is not None) ** 0.5)
        rest = sum(p.grad.norm().item() ** 2 for p in other if p.grad is not None)
        return per, (sum(x * x for x in per) + rest) ** 0.5

    per_f, total_f = grad_norms_by_group(groups, other=other)
    per_i, total_i = per_item()
    diff = max(abs(a - b) / b for a, b in zip(per_f.tolist(), per_i))
    t_fused, t_item = time_call(fused), time_call(per_item)
    n_params = sum(p.numel() for _, p in named)
    print(f"{len(named)} gradient tensors, {n_params / 1e6:.0f}M values, {len(ids)} layers, on {device}")
    print(f"{'method':<52}{'ms':>10}")
    print(f"{'grad_norms_by_group (one torch._foreach_norm)':<52}{t_fused * 1e3:>10.2f}")
    print(f"{'.item() per parameter':<52}{t_item * 1e3:>10.2f}")
    print(
        f"ratio (.item / fused): {t_item / t_fused:.1f}x; largest relative difference of per-layer norms "
        f"{diff:.1e}; global {float(total_f):.4f} vs {total_i:.4f}"
    )


if __name__ == "__main__":
    main()
