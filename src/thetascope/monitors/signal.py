"""SignalPropagationCore: a transformer's APJN depth profile, its criticality verdict, and DyT/Derf state.

Framework-free (no Lightning import): a plain loop, Fabric or the Lightning callback
:class:`~thetascope.callbacks.SignalPropagationMonitor` drive it the same way.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn

from thetascope._validation import check_layers_arg, check_positive_int, check_prefix, select_layers
from thetascope.functional.apjn import apjn_profile
from thetascope.functional.depth_fit import DepthFit, fit_depth_profile
from thetascope.keys import DEFAULT_PREFIX, SIGNAL_CARD_KEY, SIGNAL_FIT_FIELDS, layer_key
from thetascope.monitors._collective import AllGather, PackedValues, local_all_gather, reduce_packed
from thetascope.monitors._guard import FailureGuard
from thetascope.nn.dynamic import is_tanh_like

__all__ = ["DEFAULT_SATURATION_THRESHOLD", "SignalPropagationCore", "find_blocks"]

#: ``|alpha * x (+ shift)|`` above which a DyT/Derf pre-activation counts as saturated: there ``tanh'`` has
#: fallen to 7% of its peak (``erf'`` to 2%), so the element passes almost no gradient.
DEFAULT_SATURATION_THRESHOLD = 2.0


def find_blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of ``model``: the longest ``nn.ModuleList`` whose children share one class.

    Example:
        >>> from thetascope.demo.model import GPT, GPTConfig
        >>> len(find_blocks(GPT(GPTConfig(n_layer=3, n_embd=16, n_head=2))))
        3
    """
    best: list[nn.Module] = []
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > len(best):
            children = list(module)
            if len({type(c) for c in children}) == 1 and any(True for _ in children[0].parameters()):
                best = children
    if not best:
        raise ValueError(
            f"SignalPropagationCore: no list of transformer blocks found in {type(model).__name__} (an "
            "nn.ModuleList of modules of one class); pass blocks=[...] explicitly"
        )
    return best


def _first_tensor(out: Any) -> Tensor | None:
    if isinstance(out, Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    return None


class SignalPropagationCore:
    """The APJN from the input of the first block to the output of every block, fitted over depth.

    ``measure(forward)`` runs ``forward()`` (one forward of the model on a small held batch) once and gives
    per-rank device tensors; ``reduce`` combines ranks with one collective and returns the values to log:

    * ``{prefix}apjn/layer_XX``: ``J_l = ||d h_l / d h_0||_F^2 / n_out``, ``h_0`` the input of block 0 and
      ``h_l`` the output of block ``l`` (depth ``l + 1``), averaged over the held samples; Hutchinson
      estimate from ``n_probes`` vector-Jacobian products per block (no forward-mode AD, so fused attention
      kernels are fine). ``{prefix}apjn_stderr/layer_XX`` is its standard error.
    * ``{prefix}signal/power_exponent``, ``.../power_r2``: ``J ~ l**zeta`` fit; ``{prefix}signal/
      stretched_beta``, ``.../stretched_rate``, ``.../stretched_r2``: ``J ~ exp(c l**beta)`` fit;
      ``{prefix}signal/rmse_ratio`` and ``{prefix}signal/verdict`` (-1 subcritical, 0 critical,
      1 supercritical; rules in :func:`~thetascope.functional.depth_fit.fit_depth_profile`), with at least 4
      blocks. ``{prefix}card/signal_verdict`` repeats the verdict for the architecture card.
    * For every tanh-like normaliser (:class:`~thetascope.nn.DyT`, :class:`~thetascope.nn.Derf`, or a class
      named like them with a parameter ``alpha``): ``{prefix}norm_alpha/{name}/layer_XX`` (its mean ``alpha``)
      and ``{prefix}norm_saturation/{name}/layer_XX``, the fraction of its input elements with
      ``|alpha * x (+ shift)| > saturation_threshold``; ``{name}`` is the module's path inside block ``XX``
      (e.g. ``ln_1``), or the full path for modules outside the blocks. ``{prefix}signal/norm_saturation`` is
      the fraction over all of them.

    A measurement leaves training untouched: the model runs in eval mode (every module's mode is restored
    afterwards), the global RNG state is forked, the probes come from a private generator, and only the
    detached block input receives gradients (parameter ``.grad`` fields are never written).

    Args:
        model: the model (its blocks are found by :func:`find_blocks` unless ``blocks`` is given).
        blocks: the blocks in depth order; block 0's first positional argument (or ``hidden_states``) is
            ``h_0``, and each block's output (or its first element) is ``h_l``.
        n_probes: probes per block, >= 2.
        saturation_threshold: see above (> 0).
        layers: per-layer keys to log (``"all"``/``None``, ``"auto"``, or indices); the fit uses every block.
        prefix: key prefix.
        strict: raise on a failed measurement instead of warning once and disabling it.
        seed: seed of the probe generator (measurement ``k`` uses ``seed + k``).

    Example:
        >>> from thetascope.demo.model import GPT, GPTConfig
        >>> model = GPT(GPTConfig(n_layer=4, n_embd=16, n_head=2, block_size=8, norm="dyt"))
        >>> core = SignalPropagationCore(model)
        >>> idx = torch.randint(0, 256, (2, 8))
        >>> logged = core.reduce(core.measure(lambda: model(idx)))
        >>> sorted(k for k in logged if "layer_00" in k)[:3]
        ['stability/apjn/layer_00', 'stability/apjn_stderr/layer_00', 'stability/norm_alpha/ln_1/layer_00']
        >>> logged["stability/norm_alpha/ln_1/layer_00"]
        0.5
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        blocks: Sequence[nn.Module] | None = None,
        n_probes: int = 4,
        saturation_threshold: float = DEFAULT_SATURATION_THRESHOLD,
        layers: str | list[int] | None = None,
        prefix: str = DEFAULT_PREFIX,
        strict: bool = False,
        seed: int = 0,
    ) -> None:
        self.n_probes = check_positive_int("n_probes", n_probes, minimum=2)
        if (
            isinstance(saturation_threshold, bool)
            or not isinstance(saturation_threshold, (int, float))
            or not math.isfinite(saturation_threshold)
            or saturation_threshold <= 0
        ):
            raise ValueError(
                f"saturation_threshold must be a finite number > 0, got {saturation_threshold!r}"
            )
        self.saturation_threshold = float(saturation_threshold)
        self.layers = check_layers_arg(layers)
        self.prefix = check_prefix(prefix)
        if not isinstance(strict, bool):
            raise ValueError(f"strict must be True or False, got {strict!r}")
        self.seed = check_positive_int("seed", seed, minimum=0)
        self.model = model
        self.blocks = list(blocks) if blocks is not None else find_blocks(model)
        if not self.blocks:
            raise ValueError("blocks must name at least one block")
        self._shown = select_layers(self.layers, len(self.blocks))
        self.norm_names, self.norms = self._find_norms()
        self.guard = FailureGuard("SignalPropagationCore", strict)
        self.measurements = 0
        self.init_fit: DepthFit | None = None
        self.last_fit: DepthFit | None = None
        self.last_profile: list[float] = []

    def _find_norms(self) -> tuple[list[str], list[nn.Module]]:
        """Key names (``{field}/{name}/layer_XX`` pieces) and modules of the tanh-like normalisers."""
        where: dict[int, tuple[int, str]] = {}
        for i, block in enumerate(self.blocks):
            for name, m in block.named_modules():
                if name and is_tanh_like(m):
                    where.setdefault(id(m), (i, name))
        names: list[str] = []
        mods: list[nn.Module] = []
        for name, m in self.model.named_modules():
            if not is_tanh_like(m):
                continue
            if id(m) in where:
                i, local = where.pop(id(m))
                names.append(f"{local}/layer_{i:02d}")
            elif name:
                names.append(name)
            else:
                continue
            mods.append(m)
        return names, mods

    # ---------------------------------------------------------------------------------------------- measure
    @contextlib.contextmanager
    def _isolated(self, device: torch.device | None) -> Iterator[None]:
        """Eval mode and a forked RNG for the duration; every module's mode is restored afterwards."""
        modes = [(m, m.training) for m in self.model.modules()]
        devices = [device] if device is not None and device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices):
                self.model.eval()
                yield
        finally:
            for m, mode in modes:
                m.training = mode

    def measure(self, forward: Callable[[], Any]) -> dict[str, Tensor]:
        """Run ``forward()`` once (the model on the held batch) and measure; per-rank device tensors.

        Returns ``apjn [L]``, ``apjn_se2 [L]`` (squared standard errors), ``alpha [K]``, ``saturated [K]``,
        ``elements [K]`` and ``failed`` (1 when this rank's measurement failed). Empty once a failure has
        disabled the measurement on every rank. No host sync.
        """
        if not self.guard.active("signal"):
            return {}
        self.measurements += 1
        n_blocks, n_norms = len(self.blocks), len(self.norms)
        param = next(self.model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        try:
            apjn, se, alpha, sat, total = self._measure(forward, device)
            failed = torch.zeros((), device=apjn.device)
        except Exception as err:
            self.guard.fail("signal", err)
            nan_l = torch.full((n_blocks,), math.nan, device=device)
            nan_k = torch.full((n_norms,), math.nan, device=device)
            apjn, se, alpha, sat, total = nan_l, nan_l, nan_k, nan_k, nan_k
            failed = torch.ones((), device=device)
        return {
            "apjn": apjn,
            "apjn_se2": se.square(),
            "alpha": alpha,
            "saturated": sat,
            "elements": total,
            "failed": failed,
        }

    def _measure(self, forward: Callable[[], Any], device: torch.device) -> tuple[Tensor, ...]:
        h0: list[Tensor] = []
        outs: dict[int, Tensor] = {}
        n_norms = len(self.norms)
        sat = torch.zeros(n_norms, device=device)
        total = torch.zeros(n_norms, device=device)
        thr = self.saturation_threshold

        def take_input(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            if h0:  # the block is called again (weight sharing): keep the first input
                return None
            if args and isinstance(args[0], Tensor) and args[0].is_floating_point():
                x = args[0].detach().requires_grad_(True)
                h0.append(x)
                return (x, *args[1:]), kwargs
            hidden = kwargs.get("hidden_states")
            if isinstance(hidden, Tensor) and hidden.is_floating_point():
                x = hidden.detach().requires_grad_(True)
                h0.append(x)
                return args, {**kwargs, "hidden_states": x}
            return None

        def keep_output(i: int) -> Callable[..., None]:
            def hook(_m: nn.Module, _args: Any, out: Any) -> None:
                t = _first_tensor(out)
                if t is not None and h0:
                    outs[i] = t

            return hook

        def count(k: int, m: nn.Module) -> Callable[..., None]:
            def hook(_m: nn.Module, args: tuple[Any, ...]) -> None:
                if not args or not isinstance(args[0], Tensor):
                    return
                with torch.no_grad():
                    x = args[0].detach()
                    pre = getattr(m, "pre_activation", None)
                    if callable(pre):
                        z = pre(x)
                    else:
                        z = m.alpha * x  # type: ignore[operator]
                        shift = getattr(m, "shift", None)
                        if isinstance(shift, Tensor):
                            z = z + shift
                    sat[k] += (z.abs() > thr).sum().to(sat.device, sat.dtype)
                    total[k] += float(z.numel())

            return hook

        handles = [self.blocks[0].register_forward_pre_hook(take_input, with_kwargs=True)]
        handles += [b.register_forward_hook(keep_output(i)) for i, b in enumerate(self.blocks)]
        handles += [m.register_forward_pre_hook(count(k, m)) for k, m in enumerate(self.norms)]
        gen = torch.Generator().manual_seed(self.seed + self.measurements - 1)
        try:
            with self._isolated(device), torch.enable_grad():
                forward()
                if not h0:
                    raise RuntimeError("the first block received no floating-point hidden state")
                missing = [i for i in range(len(self.blocks)) if i not in outs]
                if missing:
                    raise RuntimeError(f"block(s) {missing} produced no tensor output in the forward")
                apjn, se = apjn_profile(
                    [outs[i] for i in range(len(self.blocks))], h0[0], n_probes=self.n_probes, generator=gen
                )
        finally:
            for h in handles:
                h.remove()
            outs.clear()
            h0.clear()
        alphas = [cast(Tensor, m.alpha).detach().float().mean() for m in self.norms]
        alpha = torch.stack(alphas) if alphas else sat
        return apjn.float(), se.float(), alpha.to(device), sat, total

    # ----------------------------------------------------------------------------------------------- reduce
    def reduce(
        self, values: Mapping[str, Tensor], all_gather: AllGather = local_all_gather
    ) -> dict[str, float]:
        """Combine ranks with ONE collective and return the values to log (never NaN); empty when disabled.

        APJN values are means over ranks (equal held-batch sizes make it the mean over all samples); their
        standard errors combine as ``sqrt(sum se^2) / world``; saturation is counted, then divided.
        """
        if not values:
            return {}
        packed = PackedValues()
        packed.add("apjn", values["apjn"], "mean")
        packed.add("apjn_se2", values["apjn_se2"], "mean")
        packed.add("alpha", values["alpha"], "mean")
        packed.add("saturated", values["saturated"], "sum")
        packed.add("elements", values["elements"], "sum")
        packed.add("world", torch.ones((), device=values["apjn"].device), "sum")
        packed.add("failed", values["failed"], "max")
        red = packed.unpack(reduce_packed(packed, all_gather))
        if float(red["failed"]) > 0:
            self.guard.disable_agreed(["signal"])
            return {}
        try:
            return self._keys(red)
        except Exception as err:  # host arithmetic after the collective: nothing to agree on
            self.guard.warn("signal fit", err)
            return {}

    def _keys(self, red: Mapping[str, Tensor]) -> dict[str, float]:
        p = self.prefix
        out: dict[str, float] = {}
        world = float(red["world"])
        apjn = red["apjn"].double().tolist()
        se = (red["apjn_se2"].double() * world).sqrt().div(world).tolist()  # mean(se^2)*W = sum(se^2)
        shown = set(self._shown)
        for i, (v, e) in enumerate(zip(apjn, se)):
            if i in shown and math.isfinite(v):
                out[layer_key(p, "apjn", i)] = v
                if math.isfinite(e):
                    out[layer_key(p, "apjn_stderr", i)] = e
        self.last_profile = apjn
        if apjn and math.isfinite(apjn[-1]):
            out[f"{p}signal/apjn_last"] = apjn[-1]
        finite = [v for v in apjn if math.isfinite(v) and v > 0]
        if len(finite) >= 4:
            fit = fit_depth_profile(apjn)
            self.last_fit = fit
            if self.init_fit is None:
                self.init_fit = fit
            for field in SIGNAL_FIT_FIELDS:
                v = float(getattr(fit, field))
                if math.isfinite(v):
                    out[f"{p}signal/{field}"] = v
            out[f"{p}signal/verdict"] = fit.verdict_code
            out[p + SIGNAL_CARD_KEY] = fit.verdict_code
        sat_all = float(red["saturated"].sum()) if self.norms else 0.0
        tot_all = float(red["elements"].sum()) if self.norms else 0.0
        for name, a, s, t in zip(
            self.norm_names, red["alpha"].tolist(), red["saturated"].tolist(), red["elements"].tolist()
        ):
            if math.isfinite(a):
                out[f"{p}norm_alpha/{name}"] = a
            if t > 0 and math.isfinite(s):
                out[f"{p}norm_saturation/{name}"] = s / t
        if tot_all > 0 and math.isfinite(sat_all):
            out[f"{p}signal/norm_saturation"] = sat_all / tot_all
        return out

    def headline(self, reduced: Mapping[str, float]) -> dict[str, float]:
        """The run-level keys only (fits, verdict, overall saturation)."""
        return {k: v for k, v in reduced.items() if k.startswith(f"{self.prefix}signal/")}

    def card_line(self) -> str | None:
        """One line for the architecture card: the verdict at the first measurement (initialisation)."""
        fit = self.init_fit
        return None if fit is None else f"signal propagation at init: {fit.summary()}"

    # ------------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Measurement count (the probe seeds continue from it) and the initial fit."""
        return {
            "measurements": self.measurements,
            "init_fit": self.init_fit.as_dict() if self.init_fit is not None else None,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved."""
        self.measurements = int(state.get("measurements", 0))
        init = state.get("init_fit")
        self.init_fit = DepthFit(**init) if isinstance(init, Mapping) else None
