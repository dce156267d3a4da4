"""The GroupNorm implementations the sweep compares, each behind F.group_norm's signature.

A provider that cannot run here (package absent, unsupported dtype/layout) says why instead of
being timed; the sweep prints the reason and records it in the CSV.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

GroupNormFn = Callable[[torch.Tensor, int, torch.Tensor, torch.Tensor, float], torch.Tensor]


@dataclass
class Provider:
    name: str
    fn: GroupNormFn | None
    why_not: str = ""  # empty when available

    def unsupported(self, x: torch.Tensor) -> str:
        """A reason this provider cannot run on x, or ''."""
        if self.fn is None:
            return self.why_not
        if self.name == "apex_nhwc" and not x.is_contiguous(memory_format=torch.channels_last):
            return "apex's GroupNorm is NHWC-only"
        if self.name == "apex_nhwc" and x.dtype not in (torch.float16, torch.bfloat16):
            return "apex's GroupNorm takes fp16/bf16 only"
        return ""


def _gn_triton() -> Provider:
    import gn_triton

    return Provider("gn_triton", gn_triton.group_norm)


def _torch_compile() -> Provider:
    """torch.compile(F.group_norm), static shapes but for the batch: one compile per shape for batch 1
    and one for every other batch size (as a user with varying batches gets), not one per batch."""
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 512)
    compiled = torch.compile(F.group_norm, dynamic=False)

    def group_norm(x, g, w, b, eps):
        if x.shape[0] > 1:  # a size-1 dimension is always specialised, so batch 1 compiles apart
            torch._dynamo.mark_dynamic(x, 0)
        return compiled(x, g, w, b, eps)

    return Provider("torch_compile", group_norm)


def _liger() -> Provider:
    from liger_kernel.ops.group_norm import LigerGroupNormFunction

    def liger(x, num_groups, weight, bias, eps):
        return LigerGroupNormFunction.apply(x, weight, bias, x.shape[1], num_groups, eps)

    return Provider("liger", liger)


def _apex() -> Provider:
    from apex.contrib.group_norm import GroupNorm as ApexGroupNorm

    modules: dict[tuple, torch.nn.Module] = {}

    def apex(x, num_groups, weight, bias, eps):
        # apex's GroupNorm is a module: one per (G, C, dtype, device), loaded with the caller's values.
        key = (num_groups, x.shape[1], weight.dtype, x.device, eps)
        if key not in modules:
            modules[key] = ApexGroupNorm(num_groups, x.shape[1], eps, device=x.device, dtype=weight.dtype)
        module = modules[key]
        if getattr(module, "loaded_from", None) != (weight.data_ptr(), bias.data_ptr()):
            with torch.no_grad():  # its own parameters (their gradients stay in the module)
                module.weight.copy_(weight)
                module.bias.copy_(bias)
            module.loaded_from = (weight.data_ptr(), bias.data_ptr())
        return module(x)

    return Provider("apex_nhwc", apex)


def with_activation(provider: Provider, activation: str | None) -> Provider:
    """act(GroupNorm(x)): fused in gn_triton; GroupNorm then torch's activation for the others."""
    if activation is None or provider.fn is None:
        return provider
    if provider.name == "gn_triton":
        import gn_triton

        return Provider(
            provider.name, lambda x, g, w, b, eps: gn_triton.group_norm(x, g, w, b, eps, activation=activation)
        )
    if provider.name == "apex_nhwc":
        return Provider(provider.name, None, "not timed with an activation here")
    from gn_triton.functional import TORCH_ACTIVATIONS

    fn, act = provider.fn, TORCH_ACTIVATIONS[activation]
    return Provider(provider.name, lambda x, g, w, b, eps: act(fn(x, g, w, b, eps)))


def providers(names: list[str], functional: bool, activation: str | None = None) -> list[Provider]:
    """Providers by name; in a functional (interpreter) run only gn_triton and torch eager run."""
    makers = {
        "gn_triton": _gn_triton,
        "torch_eager": lambda: Provider("torch_eager", F.group_norm),
        "torch_compile": _torch_compile,
        "liger": _liger,
        "apex_nhwc": _apex,
    }
    out = []
    for name in names:
        if functional and name not in ("gn_triton", "torch_eager"):
            out.append(Provider(name, None, "functional CPU run: only gn_triton and torch eager"))
            continue
        try:
            out.append(with_activation(makers[name](), activation))
        except Exception as exc:  # a peer that fails to import is not available here, with the reason
            out.append(
                Provider(name, None, f"{PACKAGES.get(name, name)} not importable ({type(exc).__name__}: {exc})"[:160])
            )
    return out


ALL = ["gn_triton", "torch_eager", "torch_compile", "liger", "apex_nhwc"]
PACKAGES = {"liger": "Liger-Kernel", "apex_nhwc": "apex contrib GroupNorm"}
