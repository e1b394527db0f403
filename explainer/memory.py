"""How much memory one pass of an attribution holds, measured on the pass itself.

The engine runs its first pass at the smallest size it can (one path point, or one neuron copy,
for every example) and meters it in two ways:

* **Estimate.** The tensors autograd saves for the backward pass (counted once per storage, the
  model's own weights left out), the layer's activations and gradients, the inputs, the output
  and the largest module output on the way, times :data:`HEADROOM`. It cannot see memory that a
  module allocates and frees inside its own ``forward`` (a large temporary reduced to a small
  output), nor the buffers of the math libraries.
* **Measured peak.** The real peak of the pass above the level before it, read from the device
  the pass runs on: on a CUDA device from ``torch.cuda`` memory statistics
  (``reset_peak_memory_stats`` before the pass, ``max_memory_allocated`` after it); on the CPU
  under Linux from the process's peak resident set (``VmHWM`` in ``/proc/self/status``, reset
  by writing ``5`` to ``/proc/self/clear_refs``). It sees every temporary, but it is
  process-wide (see :meth:`PassMeter.measuring` for how other threads are accounted for).

The larger of the two is the cost of the pass. Dividing it by the rows of that pass gives the
bytes one more row costs, which fixes how many rows the later passes may hold within the
operator's memory budget (:func:`explainer.limits.memory_budget_bytes`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.autograd.graph import saved_tensors_hooks
from torch.nn import Module
from torch.nn.modules.module import register_module_forward_hook

from explainer.hooks import thread_bound

__all__ = [
    "HEADROOM",
    "FreedMemory",
    "PassMeter",
    "format_mib",
    "heap_reuse_enabled",
    "peak_measurable",
    "reusing_freed_memory",
]

# What the estimate cannot see: the allocator's and the math libraries' own buffers, and memory
# the allocator keeps after tensors are freed. Measured on resnet18 (peak resident memory against
# the estimated bytes, budgets of 32 MiB to 512 MiB, conductance of conv1 to layer4): 1.0x to
# 1.6x. The measured peak of a pass is taken as it is: it already includes all of these.
HEADROOM = 1.5

# After the peak is reset it must equal the resident set; a larger gap means the reset did not
# take (or memory was returned meanwhile), and the measured peak would not be the pass's own.
_RESET_SLACK = 16 * 2**20

# One measurement at a time in the process: the peak statistics are process-wide (per device on
# CUDA), and a reset by one pass would hide the peak of another pass measured at the same time.
_PEAK_LOCK = threading.RLock()
_peak_depth = 0  # measurements open in the thread holding the lock (a nested one never resets)


def _storage_key(t: Tensor) -> tuple[int, int] | None:
    """Identity and size of the memory behind ``t``; ``None`` for tensors without storage."""
    try:
        storage = t.untyped_storage()
    except (RuntimeError, NotImplementedError):  # sparse, nested and other layouts
        return None
    return storage.data_ptr(), storage.nbytes()


def _nbytes(t: Tensor) -> int:
    return t.nelement() * t.element_size()


# ------------------------------------------------------------------------------ measured peaks


def _load_glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc, or ``None`` (musl, macOS, Windows: their ``mallopt``
    may be a stub and they have no ``malloc_trim``)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.gnu_get_libc_version  # noqa: B018 - present in glibc only
    except (OSError, AttributeError):
        return None
    return libc


def _glibc_function(name: str, argtypes: list[Any]) -> Callable[..., int] | None:
    """glibc's function ``name`` taking ``argtypes`` and returning an int, or ``None``."""
    if _GLIBC is None:
        return None
    try:
        function = getattr(_GLIBC, name)
    except AttributeError:
        return None
    function.argtypes = argtypes
    function.restype = ctypes.c_int
    return function


_GLIBC = _load_glibc()
_malloc_trim = _glibc_function("malloc_trim", [ctypes.c_size_t])


class _ProcessPeak:
    """Resident memory of this process from Linux ``/proc``, with a resettable peak."""

    def __init__(self) -> None:
        self._page = os.sysconf("SC_PAGE_SIZE")
        self._statm = os.open("/proc/self/statm", os.O_RDONLY)

    @classmethod
    def start(cls) -> _ProcessPeak | None:
        """Reset the process's peak to its current resident set; ``None`` when it cannot be
        reset (not Linux, ``/proc/self/clear_refs`` not writable, or the reset did not take)."""
        # glibc keeps freed memory for reuse: a pass reusing it would not grow the resident set.
        # Trimming returns it to the system first, so that everything the pass touches counts.
        try:
            with open("/proc/self/clear_refs", "w") as f:
                if _malloc_trim is not None:
                    _malloc_trim(0)
                f.write("5")  # peak resident set (VmHWM) := resident set now
            probe = cls()
        except OSError:
            return None
        try:
            status = _status_fields("VmHWM", "VmRSS")
        except OSError:
            status = {}
        hwm, rss = status.get("VmHWM"), status.get("VmRSS")
        if hwm is None or rss is None or hwm > rss + _RESET_SLACK:
            probe.close()
            return None
        return probe

    def current(self) -> int:
        """Resident bytes now (cheap enough to call after every module)."""
        return int(os.pread(self._statm, 128, 0).split()[1]) * self._page

    def peak(self) -> int | None:
        """The largest resident size since the reset."""
        try:
            return _status_fields("VmHWM").get("VmHWM")
        except OSError:
            return None

    def close(self) -> None:
        os.close(self._statm)


def _status_fields(*names: str) -> dict[str, int]:
    """Sizes in bytes from ``/proc/self/status`` (given there in kB)."""
    found: dict[str, int] = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in names:
                found[key] = int(rest.split()[0]) * 1024
    return found


class _CudaPeak:
    """Memory allocated by PyTorch on one CUDA device, with its peak statistic."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    @classmethod
    def start(cls, device: torch.device) -> _CudaPeak | None:
        """Reset the device's peak statistic; ``None`` where the allocator keeps no statistics
        (no CUDA runtime, a device it cannot reach, a pluggable allocator without them)."""
        probe = cls(device)
        try:
            torch.cuda.reset_peak_memory_stats(device)
            probe.current()
        except (RuntimeError, AssertionError):
            return None
        return probe

    def current(self) -> int:
        return torch.cuda.memory_allocated(self.device)

    def peak(self) -> int | None:
        return torch.cuda.max_memory_allocated(self.device)

    def close(self) -> None:
        pass


def _start_probe(device: torch.device | str | None, reset: bool) -> _ProcessPeak | _CudaPeak | None:
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            return None
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        return _CudaPeak.start(dev) if reset else _CudaPeak(dev)
    if dev.type == "cpu":
        if reset:
            return _ProcessPeak.start()
        try:
            return _ProcessPeak()
        except OSError:
            return None
    return None  # other devices (mps, xpu, meta): the estimate alone


def peak_measurable(device: torch.device | str | None = None) -> bool:
    """Whether the real peak of a pass on ``device`` can be measured here.

    ``False`` means passes on that device are sized from the estimate alone: on the CPU outside
    Linux, or where ``/proc/self/clear_refs`` cannot be written (for example a container that
    mounts ``/proc`` read-only); on devices other than the CPU and CUDA. Finding out resets the
    peak statistic of that device, as a measurement does.
    """
    with _PEAK_LOCK:
        if _peak_depth:
            return True
        probe = _start_probe(device, reset=True)
        if probe is None:
            return False
        probe.close()
        return True


# ------------------------------------------------------------------------------------ the meter


@dataclass
class PassMeter:
    """Bytes held by one metered pass.

    Use :meth:`measuring` around the whole pass (forward and backward) and :meth:`saving`
    around its forward pass, then :meth:`add` for the tensors the engine itself holds (inputs,
    layer values, output) and :meth:`add_transient` for those that exist only during the
    backward pass (gradients of the layer or of the inputs).
    """

    fixed: set[int] = field(default_factory=set)
    held: int = 0
    largest: int = 0
    transient: int = 0
    outputs: int = 0
    blind: bool = False
    measured: int | None = None
    """Real peak of the measured block above the level before it, in bytes; ``None`` when it
    could not be measured (see :func:`peak_measurable`)."""
    _seen: set[tuple[int, int]] = field(default_factory=set)
    _sample: Callable[[], None] | None = None

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

    def forget(self) -> None:
        """Drop what was counted so far (a pass that starts again); the measurement of the
        enclosing :meth:`measuring` block goes on."""
        self.held = self.largest = self.transient = self.outputs = 0
        self.blind = False
        self._seen.clear()

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
    def measuring(self, device: torch.device | str | None = None) -> Iterator[None]:
        """Measure the real peak of the block on ``device`` into :attr:`measured`.

        On a CUDA device the peak of ``torch.cuda.max_memory_allocated`` after
        ``torch.cuda.reset_peak_memory_stats`` (which resets that statistic for the whole
        process). On the CPU under Linux the peak resident set of the process: glibc's cached
        free memory is first returned to the system (``malloc_trim``), so that memory the block
        reuses counts as it is touched, then the peak is reset through ``/proc/self/clear_refs``
        and read back from ``/proc/self/status``. Where that file cannot be written (not Linux,
        no permission) and on other devices, :attr:`measured` stays ``None`` and the estimate
        alone sizes the passes.

        The statistics are process-wide, so what other threads do meanwhile counts too. Memory
        they allocate is counted against this block: an overestimate, which makes later passes
        smaller than they could be (at worst the call is refused). Memory they free would hide
        part of this block's growth, so the level the peak is measured from is the lowest seen:
        before the block, after each module's forward (with :meth:`saving`) and at the end. One
        block is measured at a time in the process: a second thread waits here for the first
        to finish, since its reset would hide the first one's peak.
        """
        global _peak_depth
        _PEAK_LOCK.acquire()
        try:
            probe = _start_probe(device, reset=_peak_depth == 0)
        except BaseException:
            _PEAK_LOCK.release()
            raise
        if probe is None:  # nothing to measure: no reason to keep other threads waiting
            _PEAK_LOCK.release()
            yield
            return
        floor = probe.current()

        def sample() -> None:
            nonlocal floor
            floor = min(floor, probe.current())

        _peak_depth += 1
        self._sample = sample
        try:
            yield
            sample()
            peak = probe.peak()
            if peak is not None:
                self.measured = max(self.measured or 0, peak - floor, 0)
        finally:
            self._sample = None
            _peak_depth -= 1
            probe.close()
            _PEAK_LOCK.release()

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
                if self._sample is not None:
                    self._sample()

        handle = register_module_forward_hook(thread_bound(seen))
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

    def estimate(self) -> int:
        """Bytes the pass holds by the count of its tensors, with :data:`HEADROOM`: what it
        held, plus room for the input and output of the largest layer while it runs."""
        total = self.held + self.transient + 2 * self.largest
        if self.blind:  # what autograd saved is unknown: assume every module output was kept
            total += self.outputs
        return int(total * HEADROOM)

    def bytes_per_row(self, rows: int, *, measured: bool = True) -> int:
        """Bytes one example row of a pass costs: the larger of the estimate and the measured
        peak of the pass (the estimate alone with ``measured=False``), divided by the rows of
        the pass."""
        total = max(self.estimate(), (self.measured or 0) if measured else 0)
        return max(1, -(-total // max(rows, 1)))


def format_mib(nbytes: int) -> str:
    """A byte count for people: ``"12.3 MiB"``, or KiB / GiB where MiB reads badly."""
    if nbytes >= 2**30:
        return f"{nbytes / 2**30:,.1f} GiB"
    if nbytes >= 2**20 // 10:
        return f"{nbytes / 2**20:,.1f} MiB"
    return f"{nbytes / 2**10:,.1f} KiB"


# ------------------------------------------------------------------------- reused working memory

# glibc's mallopt parameters (malloc.h) and the values its own dynamic thresholds settle at on
# 64-bit Linux once a large block has been freed: blocks of 32 MiB and more are mapped on their
# own, and free memory above 64 MiB at the top of the heap is returned to the system.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4
_SETTLED_MMAP_THRESHOLD = 32 * 2**20
_SETTLED_TRIM_THRESHOLD = 64 * 2**20
_DEFAULT_MMAP_MAX = 65536
_INT_MAX = 2**31 - 1
# Resident growth over a call below which freed memory is not worth returning between passes.
_KEPT_SLACK = 64 * 2**20


_mallopt = _glibc_function("mallopt", [ctypes.c_int, ctypes.c_int])
_HEAP_LOCK = threading.Lock()
_heap_users = 0


def heap_reuse_enabled() -> bool:
    """Whether :func:`reusing_freed_memory` changes anything here: glibc, and not switched off
    with ``EXPLAINER_REUSE_MEMORY=0``."""
    return _mallopt is not None and os.environ.get("EXPLAINER_REUSE_MEMORY", "1") != "0"


class FreedMemory:
    """What one :func:`reusing_freed_memory` block keeps, checked between the passes of a call.

    Memory freed by one pass and kept for the next costs resident memory while it waits, and a
    later pass of another size may not fit in the freed blocks: the heap then grows past them
    (a pass of two rows after passes of one row reached twice the resident peak of the same
    pass with large blocks mapped on their own). So memory is kept within a pass only: before
    each pass (:meth:`next_pass`) free memory is returned to the system (``malloc_trim``)
    once the process holds more than :data:`_KEPT_SLACK` above where the block started. When
    the heap's address space (``VmData``, what ``RLIMIT_DATA`` limits) has grown by more than
    two budgets, the call stops keeping memory: large blocks are mapped on their own again.
    """

    def __init__(self, budget: int | None) -> None:
        self.budget = budget
        self.active = False
        self._rss = self._data = 0

    def _enter(self) -> None:
        global _heap_users
        with _HEAP_LOCK:
            if _heap_users == 0:
                _mallopt(_M_MMAP_MAX, 0)
                _mallopt(_M_TRIM_THRESHOLD, _INT_MAX)
            _heap_users += 1
        self.active = True
        if self.budget is not None:
            self._rss, self._data = _resident_and_data()

    def _leave(self) -> None:
        global _heap_users
        if not self.active:
            return
        self.active = False
        with _HEAP_LOCK:
            _heap_users -= 1
            if _heap_users == 0:
                _mallopt(_M_MMAP_THRESHOLD, _SETTLED_MMAP_THRESHOLD)
                _mallopt(_M_TRIM_THRESHOLD, _SETTLED_TRIM_THRESHOLD)
                _mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)

    def next_pass(self) -> None:
        """Before a pass: return the memory the last one freed; stop keeping memory once the
        heap has grown by two budgets."""
        if not self.active or self.budget is None:
            return
        rss, data = _resident_and_data()
        if data - self._data > 2 * self.budget:
            self._leave()
        elif rss - self._rss <= _KEPT_SLACK:
            return
        if _malloc_trim is not None:
            _malloc_trim(0)


def _resident_and_data() -> tuple[int, int]:
    """Resident bytes and data-segment bytes of this process (0 where ``/proc`` cannot tell)."""
    try:
        fields = _status_fields("VmRSS", "VmData")
    except OSError:
        return 0, 0
    return fields.get("VmRSS", 0), fields.get("VmData", 0)


@contextmanager
def reusing_freed_memory(budget: int | None = None) -> Iterator[FreedMemory]:
    """While the block runs, memory freed in the process stays with it for the next tensor.

    glibc maps every block of 32 MiB or more afresh and unmaps it when freed, and it returns
    free memory at the top of its heap to the system: a pass over a batch of large activations
    (an efficientnet_b0 block at 17 x 96 x 112 x 112 floats is 82 MiB) then faults in every
    page of every such tensor again, at about a microsecond per 4 KiB page, which cost about a
    quarter of the time of a call on small CNNs. Inside the block, large blocks come from the
    heap (``M_MMAP_MAX`` 0) and the heap is not trimmed (``M_TRIM_THRESHOLD`` at its maximum),
    so freed activations are reused by the next operator without faults. With a ``budget`` (the
    memory budget of a pass, in bytes), what is kept between passes is bounded by it: see
    :class:`FreedMemory`, which the block yields.

    Afterwards the thresholds are fixed at the values glibc's own adjustment settles at
    (32 MiB, 64 MiB) and mapping is allowed again. The settings are process-wide: other
    threads allocate the same way meanwhile. Calls may nest and overlap across threads; the
    last one to leave restores the settings. Does nothing with another C library or with
    ``EXPLAINER_REUSE_MEMORY=0``.
    """
    kept = FreedMemory(budget)
    if not heap_reuse_enabled():
        yield kept
        return
    kept._enter()
    try:
        yield kept
    finally:
        kept._leave()
