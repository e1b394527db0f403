"""``explainer batch`` and ``explainer top``: dataset mode on the command line.

``explainer batch`` explains every image of a folder with the local compute workers (one
sandboxed process per model, as in the app) or on a Ray cluster (``--ray ADDRESS``, or ``--ray
local`` to start one), and writes the results to a store that a second run resumes.
``explainer top`` reads a store: the images that drive one channel of a layer hardest.

Exit status: 0 when the run finished (bad images are recorded, not fatal), 1 for an error
that stopped it (the message says what to change), 2 for a usage error, 130 when stopped by
Ctrl-C (what was finished is kept).
"""

from __future__ import annotations

import argparse
import io
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from explainer.baselines import BASELINE_KINDS
from explainer.errors import ExplainerError
from explainer.integration import METHODS

__all__ = ["add_batch_parser", "add_top_parser", "model_source", "run_batch_command",
           "run_top_command"]  # fmt: skip

_INTERRUPTED = 130


def _steps(text: str) -> int | str:
    if text.strip().lower() == "auto":
        return "auto"
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number or auto, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected 1 or more steps, got {value}")
    return value


def _target(text: str) -> int | str:
    text = text.strip().lower()
    if text in ("predicted", "true"):
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected predicted, true or a class index, got {text!r}"
        ) from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"a class index is 0 or more, got {value}")
    return value


def _layers(text: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in text.split(",") if name.strip())


def _positive(kind: type) -> Any:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
        return value

    return parse


def add_batch_parser(commands: Any) -> argparse.ArgumentParser:
    """The ``batch`` subcommand's arguments."""
    parser = commands.add_parser(
        "batch",
        help="explain every image of a folder into a results store",
        description=(
            "Explain every image of a folder: prediction, true label, conductance total of each "
            "channel of each layer (optionally the full maps), completeness delta and each "
            "channel's activation summary, into a SQLite store. Run it again to resume."
        ),
    )
    model = parser.add_argument_group("model (default: the built-in demo model)")
    model.add_argument("--model", metavar="FILE",
                       help="a model file: .pt2 program, state_dict or safetensors (with --arch "
                            "when its architecture is not recognised)")  # fmt: skip
    model.add_argument("--arch", metavar="NAME",
                       help="an architecture (see explainer.list_architectures()); alone, it "
                            "runs with random weights (seed 0) unless --pretrained")  # fmt: skip
    model.add_argument(
        "--weights", metavar="FILE", help="weights for --arch: a state_dict or safetensors file"
    )
    model.add_argument("--pretrained", action="store_true",
                       help="with --arch alone: torchvision's weights from the local torch hub "
                            "cache (nothing is downloaded)")  # fmt: skip
    model.add_argument("--num-classes", type=int, metavar="N", help="number of classes")

    data = parser.add_argument_group("images and results")
    data.add_argument(
        "--images", required=True, metavar="DIR", help="folder of images, searched recursively"
    )
    data.add_argument(
        "--labels-from-folders",
        action="store_true",
        help="class folders give the true labels, as in torchvision's ImageFolder",
    )
    data.add_argument(
        "--out",
        required=True,
        metavar="PATH",
        help="the results store (a SQLite file); an existing one is resumed",
    )
    data.add_argument(
        "--maps", action="store_true", help="also keep each layer's full conductance map per image"
    )

    what = parser.add_argument_group("attribution")
    what.add_argument(
        "--layers",
        type=_layers,
        default=(),
        metavar="a,b,c",
        help="layer names, comma-separated (default: the model's suggested layers)",
    )
    what.add_argument("--target", type=_target, default="predicted",
                      metavar="predicted|true|INT",
                      help="the class to explain (default: predicted)")  # fmt: skip
    what.add_argument(
        "--method",
        choices=METHODS,
        default="gausslegendre",
        help="integration rule (default: gausslegendre)",
    )
    what.add_argument(
        "--n-steps",
        type=_steps,
        default=50,
        metavar="N|auto",
        help="integration steps, or auto with --tolerance (default: 50)",
    )
    what.add_argument(
        "--tolerance",
        type=_positive(float),
        metavar="T",
        help="relative completeness delta for --n-steps auto",
    )
    what.add_argument(
        "--baseline",
        choices=BASELINE_KINDS,
        default="black",
        help="reference input (default: black)",
    )
    what.add_argument(
        "--baseline-value",
        type=float,
        default=0.5,
        metavar="V",
        help="grey level of the constant baseline, 0 to 1 (default: 0.5)",
    )
    what.add_argument(
        "--blur-sigma",
        type=_positive(float),
        default=5.0,
        metavar="S",
        help="sigma in pixels of the blur baseline (default: 5)",
    )
    what.add_argument(
        "--noise-seed",
        type=int,
        default=0,
        metavar="SEED",
        help="seed of the noise baseline (default: 0)",
    )

    run = parser.add_argument_group("where it runs")
    run.add_argument("--ray", metavar="ADDRESS",
                     help="run on a Ray cluster (e.g. 127.0.0.1:6379 or ray://host:10001), or "
                          "'local' to start one on this machine; needs pip install "
                          "'layer-explainer[ray]'")  # fmt: skip
    run.add_argument("--workers", type=_positive(int), metavar="N",
                     help="local worker processes (default 1), or Ray actors (default: one per "
                          "--cpus-per-worker CPUs of the cluster)")  # fmt: skip
    run.add_argument(
        "--cpus-per-worker",
        type=_positive(float),
        default=1.0,
        metavar="C",
        help="CPUs each Ray actor reserves (and torch threads it runs; default 1)",
    )
    run.add_argument("--worker-memory-mb", type=_positive(int), metavar="MB",
                     help="memory limit of each worker or actor (default: "
                          "EXPLAINER_WORKER_MEMORY_MB)")  # fmt: skip
    run.add_argument(
        "--chunk", type=_positive(int), default=1, metavar="N", help="images per job (default 1)"
    )
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(handler=run_batch_command)
    return parser


def add_top_parser(commands: Any) -> argparse.ArgumentParser:
    """The ``top`` subcommand's arguments."""
    parser = commands.add_parser(
        "top",
        help="the images of a results store that drive one channel hardest",
        description="Rank the images of a results store by one channel of one layer.",
    )
    parser.add_argument("store", metavar="PATH", help="a store written by explainer batch")
    parser.add_argument("--layer", required=True, help="layer name")
    parser.add_argument("--channel", required=True, type=int, help="channel index")
    parser.add_argument("-k", type=_positive(int), default=10, help="how many (default 10)")
    parser.add_argument(
        "--by",
        choices=("act_max", "act_mean", "conductance"),
        default="act_max",
        help="ranking value (default: act_max)",
    )
    parser.set_defaults(handler=run_top_command)
    return parser


def _arch_bytes(arch: str, num_classes: int | None, pretrained: bool) -> tuple[bytes, str]:
    """An architecture built here (random weights from a fixed seed, or cached pretrained
    ones) as state_dict bytes, so that workers load it through the usual intake checks."""
    import torch

    from explainer.intake import build_model

    loaded = build_model(arch, num_classes=num_classes, pretrained=pretrained)
    buffer = io.BytesIO()
    torch.save(loaded.model.state_dict(), buffer)
    return buffer.getvalue(), loaded.arch


def model_source(
    model: str | None = None,
    arch: str | None = None,
    weights: str | None = None,
    *,
    num_classes: int | None = None,
    pretrained: bool = False,
) -> Any:
    """The :class:`~explainer.compute.jobs.ModelSource` the model options describe.

    A file (``--model`` or ``--weights``) is read within the upload limit and loaded by the
    workers with every intake check; ``--arch`` alone is built here; nothing at all is the
    built-in demo model.
    """
    from explainer.compute.jobs import ModelSource
    from explainer.errors import ModelLoadError
    from explainer.intake import DEMO_ARCH
    from explainer.intake.sources import read_source

    if model and weights:
        raise ModelLoadError("Give the model file either as --model or as --weights, not both.")
    if weights and not arch:
        raise ModelLoadError("--weights holds weights only: name the architecture with --arch.")
    if pretrained and (model or weights):
        raise ModelLoadError("--pretrained is for --arch alone; a file brings its own weights.")
    path = model or weights
    if path:
        data, _ = read_source(path, None, "model file")
        return ModelSource("file", data, Path(path).name, arch=arch, num_classes=num_classes)
    if arch is None or (arch == DEMO_ARCH and pretrained and num_classes is None):
        if num_classes is not None:
            raise ModelLoadError("--num-classes needs --model, --weights or --arch.")
        return ModelSource("builtin")
    data, name = _arch_bytes(arch, num_classes, pretrained)
    suffix = "pretrained" if pretrained else "random"
    return ModelSource("file", data, f"{name}-{suffix}.pt", arch=name, num_classes=num_classes)


def _executors(args: argparse.Namespace) -> list[Any]:
    memory = None if args.worker_memory_mb is None else args.worker_memory_mb * 2**20
    if args.ray:
        from explainer.compute.ray_executor import RayExecutor

        return [
            RayExecutor(
                args.ray,
                actors=args.workers,
                cpus_per_actor=args.cpus_per_worker,
                memory_bytes=memory,
            )
        ]
    from explainer.compute.local import LocalExecutor

    count = args.workers or 1
    if count > 1 and "OMP_NUM_THREADS" not in os.environ:
        # Workers inherit it: share the cores instead of each taking all of them.
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // count))
    return [LocalExecutor(max_workers=1, memory_bytes=memory) for _ in range(count)]


def _settings(args: argparse.Namespace) -> Any:
    from explainer.batch.runner import BatchSettings

    return BatchSettings(
        layers=tuple(args.layers),
        target=args.target,
        method=args.method,
        n_steps=args.n_steps,
        tolerance=args.tolerance,
        baseline=args.baseline,
        baseline_value=args.baseline_value,
        blur_sigma=args.blur_sigma,
        noise_seed=args.noise_seed,
        labels_from_folders=args.labels_from_folders,
        maps=args.maps,
        chunk=args.chunk,
    )


class _CtrlC:
    """First Ctrl-C: stop cleanly (keep what is done); the second: stop at once."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.previous: Any = None

    def __enter__(self) -> _CtrlC:
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.stop.is_set():
            raise KeyboardInterrupt
        self.stop.set()
        print("\nStopping after the images in flight (Ctrl-C again to stop at once)...",
              file=sys.stderr, flush=True)  # fmt: skip

    def __exit__(self, *exc: Any) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def run_batch_command(args: argparse.Namespace) -> int:
    """Run ``explainer batch``; return the exit status."""
    from explainer.batch.runner import run_batch

    settings = _settings(args)
    settings.check()  # before a model is built or a cluster contacted
    source = model_source(args.model, args.arch, args.weights, num_classes=args.num_classes,
                          pretrained=args.pretrained)  # fmt: skip
    executors = _executors(args)
    try:
        with _CtrlC() as ctrl_c:
            summary = run_batch(
                source, args.images, args.out, settings, executors,
                progress=not args.no_progress, stop=ctrl_c.stop,
            )  # fmt: skip
    except KeyboardInterrupt:
        print(f"Stopped at once; what was finished is in {args.out}. Run the same command "
              "again to resume.", file=sys.stderr)  # fmt: skip
        return _INTERRUPTED
    finally:
        for executor in executors:
            executor.shutdown()
    counts = f"{summary.ok} explained, {summary.bad} bad, {summary.failed} failed"
    skipped = f", {summary.skipped} already done" if summary.skipped else ""
    rate = summary.computed / summary.seconds if summary.seconds > 0 else 0.0
    if summary.interrupted:
        print(f"Stopped: {counts}{skipped}; kept in {args.out}. Run the same command again to "
              "resume.", file=sys.stderr)  # fmt: skip
        return _INTERRUPTED
    print(f"Done: {summary.total} images ({counts}{skipped}) in {summary.seconds:.1f} s "
          f"({rate:.2f} images/s); results in {args.out}.", file=sys.stderr)  # fmt: skip
    if summary.bad or summary.failed:
        print("Reasons are in the store's images table (status 'bad' or 'failed'); failed ones "
              "are tried again when the run resumes.", file=sys.stderr)  # fmt: skip
    return 0


def run_top_command(args: argparse.Namespace) -> int:
    """Run ``explainer top``; print one ``rank value path`` line per image."""
    from explainer.batch.store import ResultsStore

    with ResultsStore(args.store, readonly=True) as store:
        ranked = store.top_images(args.layer, args.channel, k=args.k, by=args.by)
    for rank, (path, value) in enumerate(ranked, start=1):
        print(f"{rank}\t{value:.6g}\t{path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``explainer batch ...`` and ``explainer top ...``: parse, run, turn errors into messages."""
    parser = argparse.ArgumentParser(
        prog="explainer",
        description="Layer conductance and neuron gradients for PyTorch image models.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_batch_parser(commands)
    add_top_parser(commands)
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args))
    except ExplainerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("Stopped.", file=sys.stderr)
        return _INTERRUPTED
