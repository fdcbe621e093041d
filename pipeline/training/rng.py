"""Random numbers of one training, owned by that training: nothing reads or writes torch's global RNG.

Trainings run side by side -- threads of one flow process, Dask worker processes, or one after the
other -- and must give the same weights in every arrangement. Torch's global generator is shared by
every thread of a process, so a training that drew from it (head initialisation, dropout) would
depend on what the other threads drew in between. Hence:

* :func:`training_seed` derives a seed from ``(train.seed, fold, model)`` (stable across processes and
  machines: SHA-256, not Python's salted ``hash``), so every training has its own stream;
* :func:`build_seeded` builds the network under :class:`GeneratorMode`, a thread-local
  ``TorchFunctionMode`` that hands the training's generator to every random op that would otherwise
  draw from the global RNG (``nn.init.*``, ``Tensor.uniform_``, ``torch.rand``, ...): the initialisers
  in ``model/`` and ``torch.nn`` stay as they are, and no other thread can move their draws;
* :func:`use_generator` replaces every ``nn.Dropout*`` module of the network by a
  :class:`GeneratorDropout` that draws its mask from the training's own :class:`torch.Generator`
  (the same zero-out-and-rescale rule; dropout modules hold no parameters, so the state dict is unchanged).

The generator's state goes into the resumable training state (``pipeline.training.state``), so a resumed
run draws the same masks as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

_RANDOM_OPS = frozenset({"uniform_", "normal_", "bernoulli_", "random_", "exponential_", "geometric_", "cauchy_",
                         "log_normal_", "rand", "randn", "randint", "randperm", "normal", "bernoulli", "multinomial",
                         "poisson"})
_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)


def training_seed(seed: int, fold: int | None, model_name: str) -> int:
    """The seed of training ``(fold, model_name)`` under ``train.seed = seed``: an int in ``[0, 2**63)``.

    ``fold=None`` is the production model. Pure function of its arguments (same value in every process).
    """
    digest = hashlib.sha256(f"lerenet-train:{int(seed)}:{fold}:{model_name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A fresh :class:`torch.Generator` on ``device`` seeded with ``seed``."""
    return torch.Generator(device=torch.device(device)).manual_seed(int(seed))


class GeneratorMode(TorchFunctionMode):
    """Inside ``with GeneratorMode(g):`` (this thread only) every random torch op called without a
    generator draws from ``g`` instead of torch's global generator."""

    def __init__(self, generator: torch.Generator) -> None:
        super().__init__()
        self.generator = generator

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = dict(kwargs or {})
        if kwargs.get("generator", 0) is None or (
                "generator" not in kwargs and getattr(func, "__name__", "") in _RANDOM_OPS):
            kwargs["generator"] = self.generator
        return func(*args, **kwargs)


def build_seeded(build: Callable[[], nn.Module], seed: int) -> nn.Module:
    """``build()`` with every random initialisation drawn from a CPU generator seeded with ``seed``
    (:class:`GeneratorMode`); torch's global RNG is neither read nor moved."""
    with GeneratorMode(make_generator(seed)):
        return build()


class GeneratorDropout(nn.Module):
    """Dropout drawing its mask from a given generator (in training mode; identity in eval mode).

    ``channelwise=True`` (``Dropout1d/2d/3d``): one keep/drop draw per ``(sample, channel)`` for input
    ``(N, C, ...)``; else one per element. Kept values are scaled by ``1 / (1 - p)``.
    The generator must live on the input's device.
    """

    def __init__(self, p: float, channelwise: bool, generator: torch.Generator) -> None:
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"dropout probability must be in [0, 1], got {p}")
        self.p, self.channelwise, self.generator = float(p), channelwise, generator

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` with dropped entries zeroed and the rest scaled (same shape and dtype)."""
        if not self.training or self.p == 0.0:
            return x
        if self.p == 1.0:
            return x * 0
        shape = (*x.shape[:2], *([1] * (x.dim() - 2))) if self.channelwise and x.dim() > 2 else x.shape
        keep = torch.empty(shape, dtype=x.dtype, device=x.device).bernoulli_(1.0 - self.p, generator=self.generator)
        return x * keep / (1.0 - self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}, channelwise={self.channelwise}"


def use_generator(net: nn.Module, generator: torch.Generator) -> int:
    """Replace every ``nn.Dropout*`` in ``net`` (in place) by a :class:`GeneratorDropout` on ``generator``.

    Returns the number of modules replaced. Parameters and buffers (the state dict) are untouched.
    """
    swaps = [(parent, name, child) for parent in net.modules() for name, child in parent.named_children()
             if isinstance(child, _DROPOUTS)]
    for parent, name, child in swaps:
        setattr(parent, name, GeneratorDropout(child.p, not isinstance(child, nn.Dropout), generator))
    return len(swaps)
