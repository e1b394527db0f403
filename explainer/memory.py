"""How much memory one pass of an attribution holds, measured on the pass itself.

The engine runs its first pass at the smallest size it can (one path point, or one neuron copy,
for every example) and meters it: the tensors autograd saves for the backward pass (counted once
per storage, the model's own weights left out), the layer's activations and gradients, the
inputs and the output. Dividing by the rows of that pass gives the bytes one more row costs,
which fixes how many rows the later passes may hold within the operator's memory budget
(:func:`explainer.limits.memory_budget_bytes`).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor
from torch.autograd.graph import saved_tensors_hooks
from torch.nn import Module
from torch.nn.modules.module import register_module_forward_hook

__all__ = ["HEADROOM", "PassMeter", "format_mib"]

# What the meter cannot see: the allocator's and the math libraries' own buffers, and memory the
# allocator keeps after tensors are freed. Measured on resnet18 (peak resident memory against the
# metered bytes, budgets of 32 MiB to 512 MiB, conductance of conv1 to layer4): 1.0x to 1.6x.
HEADROOM = 1.5


def _storage_key(t: Tensor) -> tuple[int, int] | None:
    """Identity and size of the memory behind ``t``; ``None`` for tensors without storage."""
    try:
        storage = t.untyped_storage()
    except (RuntimeError, NotImplementedError):  # sparse, nested and other layouts
        return None
    return storage.data_ptr(), storage.nbytes()


def _nbytes(t: Tensor) -> int:
    return t.nelement() * t.element_size()


@dataclass
class PassMeter:
    """Bytes held by one metered pass.

    Use :meth:`saving` around the forward pass, then :meth:`add` for the tensors the engine
    itself holds (inputs, layer values, output) and :meth:`add_transient` for those that exist
    only during the backward pass (gradients of the layer or of the inputs).
    """

    fixed: set[int] = field(default_factory=set)
    held: int = 0
    largest: int = 0
    transient: int = 0
    outputs: int = 0
    blind: bool = False
    _seen: set[tuple[int, int]] = field(default_factory=set)

    @classmethod
    def for_model(cls, model: object) -> PassMeter:
        """A meter that leaves out the weights and buffers of ``model`` (when it is a module):
        they are held once, whatever the size of a pass."""
        fixed: set[int] = set()
        if isinstance(model, Module):
            for t in (*model.parameters(), *model.buffers()):
                key = _storage_key(t)
                if key is not None:
                    fixed.add(key[0])
        return cls(fixed=fixed)

    def add(self, tensors: Iterable[Tensor]) -> None:
        """Count tensors held during the pass, each storage once."""
        for t in tensors:
            key = _storage_key(t)
            if key is None:
                size = _nbytes(t)
            elif key[0] in self.fixed or key in self._seen:
                continue
            else:
                self._seen.add(key)
                size = key[1]
            self.held += size
            self.largest = max(self.largest, size)

    def add_transient(self, nbytes: int) -> None:
        """Count memory that exists only while the backward pass runs."""
        self.transient += int(nbytes)

    def see(self, value: Any) -> None:
        """Note the size of a passing activation (held or not) as a candidate for the largest."""
        if isinstance(value, Tensor):
            key = _storage_key(value)
            if key is not None and key[0] not in self.fixed:
                self.largest = max(self.largest, key[1])
                self.outputs += key[1]
        elif isinstance(value, (tuple, list)):
            for v in value:
                self.see(v)

    @contextmanager
    def saving(self) -> Iterator[None]:
        """While the block runs, count what autograd saves for the backward pass, and see the
        output of every module the calling thread runs (also those run without gradients,
        whose outputs are freed at once but still need room while the next layer runs)."""
        owner = threading.get_ident()

        def pack(t: Tensor) -> Tensor:
            self.add((t,))
            return t

        def unpack(t: Tensor) -> Tensor:
            return t

        def seen(module: Module, args: Any, output: Any) -> None:
            if threading.get_ident() == owner:
                self.see(output)

        handle = register_module_forward_hook(seen)
        saving = saved_tensors_hooks(pack, unpack)
        try:
            try:
                saving.__enter__()
            except RuntimeError:  # saved-tensor hooks are switched off (e.g. inside torch.func)
                self.blind = True
                yield
            else:
                try:
                    yield
                finally:
                    saving.__exit__(None, None, None)
        finally:
            handle.remove()

    def bytes_per_row(self, rows: int) -> int:
        """Bytes one example row of a pass costs: what the pass held, plus room for the input and
        output of the largest layer while it runs, divided by the rows of the pass."""
        total = self.held + self.transient + 2 * self.largest
        if self.blind:  # what autograd saved is unknown: assume every module output was kept
            total += self.outputs
        total *= HEADROOM
        return max(1, int(-(-total // max(rows, 1))))


def format_mib(nbytes: int) -> str:
    """A byte count for people: ``"12.3 MiB"``, or KiB / GiB where MiB reads badly."""
    if nbytes >= 2**30:
        return f"{nbytes / 2**30:,.1f} GiB"
    if nbytes >= 2**20 // 10:
        return f"{nbytes / 2**20:,.1f} MiB"
    return f"{nbytes / 2**10:,.1f} KiB"
