"""Find an attention module's Q/K/V/O projection weights by the names models commonly give them.

Separate projections (``q_proj``/``k_proj``/``v_proj``/``o_proj``, ``query``/``key``/``value``,
``q``/``k``/``v``/``o``, ``q_lin``/``k_lin``/``v_lin``/``out_lin``, ``out_proj``, ``dense``, ``c_proj``),
fused ones in ``[q | k | v]`` row blocks (``c_attn``, ``qkv_proj``, ``qkv``, ``Wqkv``, ``in_proj``; MQA/GQA
blocks sized by the head counts) and in GPT-NeoX's per-head interleaved layout (``query_key_value``: rows
``[H, 3, d]``), as ``nn.Linear`` or GPT-2 ``Conv1D`` (stored ``[in, out]``, transposed here). The output
projection may live in the enclosing module (BERT and ViT keep it in ``attention.output.dense``). Everything
returned is a detached view of the live parameters, in Linear layout.

Example:
    >>> from torch import nn
    >>> m = nn.Module()
    >>> m.q_proj, m.k_proj, m.v_proj = nn.Linear(8, 8), nn.Linear(8, 4), nn.Linear(8, 4)
    >>> m.o_proj = nn.Linear(8, 8)
    >>> f = ProjectionFinder(m, n_heads=2, head_dim=None)
    >>> f.found, f.head_dim, f.n_kv_heads, f.weights(2, 1, 4).w_k.shape
    (True, 4, 1, torch.Size([4, 8]))
"""

from __future__ import annotations

from torch import Tensor, nn

from thetascope.capture.records import ProjectionWeights

__all__ = ["ProjectionFinder", "linear_weight"]

_Q = ("q_proj", "query", "q", "q_lin", "wq", "to_q")
_K = ("k_proj", "key", "k", "k_lin", "wk", "to_k")
_V = ("v_proj", "value", "v", "v_lin", "wv", "to_v")
_O = ("o_proj", "out_proj", "o", "out_lin", "dense", "c_proj", "proj", "wo", "Wo", "to_out", "out")
_FUSED = ("c_attn", "qkv_proj", "qkv", "Wqkv", "in_proj", "W_pack")
_INTERLEAVED = ("query_key_value",)
_O_IN_PARENT = ("output.dense", "o_proj", "out_proj", "dense")


def linear_weight(module: object) -> Tensor | None:
    """Detached weight of ``module`` in Linear layout ``[out, in]`` (``nn.Linear`` or GPT-2 ``Conv1D``)."""
    if isinstance(module, nn.Linear):
        return module.weight.detach()
    weight = getattr(module, "weight", None)
    if type(module).__name__ == "Conv1D" and isinstance(weight, Tensor):
        return weight.detach().t()
    return None


def _child(module: nn.Module, path: str) -> nn.Module | None:
    try:
        return module.get_submodule(path)
    except AttributeError:
        return None


def _first(module: nn.Module, names: tuple[str, ...]) -> Tensor | None:
    for n in names:
        child = getattr(module, n, None)
        w = linear_weight(child) if isinstance(child, nn.Module) else None
        if w is not None:
            return w
    return None


class ProjectionFinder:
    """Locates the projections of one attention module; :attr:`found` says whether it succeeded.

    Args:
        module: the attention module.
        n_heads: query heads (from the module or its config).
        head_dim: head size when the module says it, else ``None`` (inferred from the weights).
    """

    def __init__(self, module: nn.Module, n_heads: int, head_dim: int | None) -> None:
        self.module = module
        self.n_heads = n_heads
        self._parent: nn.Module | None = None
        self.layout: str | None = None  # "separate" | "fused" | "interleaved"
        self.reason = "no q/k/v projections under the common names"
        w = self._raw()
        self.head_dim = head_dim
        self.n_kv_heads: int | None = None
        if w is None:
            return
        wq, wk = w[0], w[1]
        if self.layout == "separate":
            assert wq is not None
            assert wk is not None
            if head_dim is None and wq.shape[0] % n_heads == 0:
                self.head_dim = wq.shape[0] // n_heads
            if self.head_dim and wk.shape[0] % self.head_dim == 0:
                self.n_kv_heads = wk.shape[0] // self.head_dim
        else:
            fused = w[0]
            assert fused is not None
            if head_dim is None:
                self.head_dim = fused.shape[0] // (3 * n_heads)
            if self.head_dim:
                self.n_kv_heads = (fused.shape[0] // self.head_dim - n_heads) // 2

    def bind_parent(self, parent: nn.Module | None) -> None:
        """Where to look for an output projection the module itself lacks."""
        self._parent = parent

    def _raw(self) -> tuple[Tensor | None, ...] | None:
        m = self.module
        q, k, v = _first(m, _Q), _first(m, _K), _first(m, _V)
        if q is not None and k is not None and v is not None:
            self.layout = "separate"
            return q, k, v
        fused = _first(m, _FUSED)
        if fused is not None:
            self.layout = "fused"
            return (fused, None, None)
        fused = _first(m, _INTERLEAVED)
        if fused is not None:
            self.layout = "interleaved"
            return (fused, None, None)
        return None

    def _out(self) -> Tensor | None:
        w = _first(self.module, _O)
        if w is None and self._parent is not None:
            for path in _O_IN_PARENT:
                child = _child(self._parent, path)
                if child is not None and child is not self.module:
                    w = linear_weight(child)
                    if w is not None:
                        break
        return w

    @property
    def found(self) -> bool:
        if self.layout is None:
            return False
        if self._out() is None:
            self.reason = "no output projection under the common names"
            return False
        return True

    def weights(self, n_heads: int, n_kv_heads: int, head_dim: int) -> ProjectionWeights:
        """The matrices for the head counts the kernel uses; ``LookupError`` when they cannot be found."""
        raw = self._raw()
        w_o = self._out()
        if raw is None or w_o is None:
            raise LookupError(f"projection weights of {type(self.module).__name__} not found: {self.reason}")
        dq, dkv = n_heads * head_dim, n_kv_heads * head_dim
        if self.layout == "separate":
            w_q, w_k, w_v = raw
        elif self.layout == "fused":
            fused = raw[0]
            assert fused is not None
            w_q, w_k, w_v = fused[:dq], fused[dq : dq + dkv], fused[dq + dkv : dq + 2 * dkv]
        else:  # interleaved per head: rows [H, 3, d]
            fused = raw[0]
            assert fused is not None
            per = fused.reshape(n_heads, 3, head_dim, fused.shape[-1])
            w_q, w_k, w_v = (per[:, i].reshape(dq, -1) for i in range(3))
        assert w_q is not None
        assert w_k is not None
        assert w_v is not None
        if w_q.shape[0] != dq or w_k.shape[0] != dkv or w_v.shape[0] != dkv or w_o.shape[-1] != dq:
            raise LookupError(
                f"projection shapes of {type(self.module).__name__} do not fit {n_heads} heads of size "
                f"{head_dim} ({n_kv_heads} key/value heads)"
            )
        return ProjectionWeights(w_q, w_k, w_v, w_o, n_heads, n_kv_heads, head_dim)
