"""What tests that check which aten ops a computation runs share: a dispatch mode that records them."""

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class OpLog(TorchDispatchMode):
    """Inside ``with OpLog() as log:``, ``log.seen`` collects (aten op name, shape of its first tensor argument or ())
    for every op dispatched, the backward's included."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        first = args[0] if args else None
        self.seen.append((str(func), tuple(first.shape) if isinstance(first, torch.Tensor) else ()))
        return func(*args, **(kwargs or {}))
