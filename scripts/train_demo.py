"""Train the built-in demo model on generated shape images and write its assets.

Everything is generated here (no downloads) and seeded, and training uses deterministic algorithms
on a fixed number of threads, so a re-run with the same arguments on the same machine writes the
same weights, byte for byte. Other machines or torch versions may differ in the last bits of the
arithmetic, which moves the held-out accuracy by a fraction of a percent at most.

Usage::

    python scripts/train_demo.py                      # the shipped assets/demo and assets/samples
    python scripts/train_demo.py --epochs 1 --train-size 256 --val-size 128 \\
        --out /tmp/demo --samples-out /tmp/samples --min-accuracy 0

Writes, in ``--out``: ``demo_cnn.safetensors`` (float32 weights), ``labels.txt``, ``card.json``
and ``card.md``; in ``--samples-out``: one PNG per class named like ``01_circle.png``.
Exits with status 1 (writing nothing) when the held-out accuracy is below ``--min-accuracy``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import re
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    # Use the package next to this script, whose generator matches the assets being written.
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import save as save_safetensors  # noqa: E402

from explainer.demo import (  # noqa: E402
    ARCH_NAME,
    CARD_FILENAME,
    DEMO_INPUT_SIZE,
    DEMO_LABELS,
    DEMO_MEAN,
    DEMO_STD,
    LABELS_FILENAME,
    WEIGHTS_FILENAME,
    build_demo_model,
    make_dataset,
    render_sample,
    sample_image_paths,
    sample_label,
)
from explainer.intake import load_demo_model  # noqa: E402

MAX_WEIGHTS_BYTES = 5 * 1024 * 1024
_SAMPLE_FILE = re.compile(r"^\d+_[a-z]+\.png$")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Train the built-in demo CNN on generated shape images and write its assets."
    )
    parser.add_argument("--epochs", type=int, default=6, help="passes over the training set")
    parser.add_argument("--train-size", type=int, default=6000, help="generated training images")
    parser.add_argument("--val-size", type=int, default=2000, help="generated held-out images")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    parser.add_argument("--seed", type=int, default=0, help="seed of data, weights and order")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument(
        "--out", type=Path, default=REPO_ROOT / "assets" / "demo", help="folder for weights/card"
    )
    parser.add_argument(
        "--samples-out",
        type=Path,
        default=REPO_ROOT / "assets" / "samples",
        help="folder for the sample PNGs",
    )
    parser.add_argument(
        "--min-accuracy",
        type=float,
        default=0.95,
        help="fail (exit 1, write nothing) below this held-out accuracy",
    )
    args = parser.parse_args(argv)
    for name in ("epochs", "train_size", "val_size", "batch_size", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.lr <= 0:
        parser.error("--lr must be positive")
    if args.seed < 0:
        parser.error("--seed must be non-negative")
    return args


def derive_seeds(seed: int) -> dict[str, int]:
    """Independent seeds for the training set, the held-out set, the samples and torch."""
    state = np.random.SeedSequence(seed).generate_state(4)
    return {
        "train": int(state[0]),
        "val": int(state[1]),
        "samples": int(state[2]),
        "torch": int(state[3]),
    }


def normalise(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> float32, scaled to [0, 1] and normalised per channel."""
    mean = torch.tensor(DEMO_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(DEMO_STD, dtype=torch.float32).view(1, 3, 1, 1)
    return (images.to(torch.float32) / 255.0 - mean) / std


@torch.no_grad()
def predict(model: torch.nn.Module, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Predicted class indices for uint8 images; the model must already be in eval mode."""
    out = [
        model(normalise(images[i : i + batch_size])).argmax(dim=1)
        for i in range(0, len(images), batch_size)
    ]
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


def train(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    generator: torch.Generator,
) -> list[dict[str, float]]:
    """Train with AdamW, warm-up and cosine decay; returns one log entry per epoch."""
    steps_per_epoch = (len(images) + batch_size - 1) // batch_size
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    total_steps = epochs * steps_per_epoch
    warmup = max(1, total_steps // 5)

    def factor(step: int) -> float:
        # Linear warm-up over the first fifth, then cosine decay towards zero.
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total_steps - warmup)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, factor)
    history = []
    model.to(memory_format=torch.channels_last)
    model.train()
    for epoch in range(epochs):
        start = time.perf_counter()
        order = torch.randperm(len(images), generator=generator)
        total_loss, correct = 0.0, 0
        for i in range(0, len(images), batch_size):
            idx = order[i : i + batch_size]
            # channels_last makes the CPU convolutions markedly faster; the maths is unchanged.
            x = normalise(images[idx]).contiguous(memory_format=torch.channels_last)
            # Random horizontal flips: every class is mirror-symmetric as a class.
            flip = torch.rand(len(idx), generator=generator) < 0.5
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
            y = labels[idx]
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
            total_loss += float(loss.detach()) * len(idx)
            correct += int((logits.argmax(dim=1) == y).sum())
        entry = {
            "epoch": epoch + 1,
            "loss": total_loss / len(images),
            "train_accuracy": correct / len(images),
            "seconds": time.perf_counter() - start,
        }
        history.append(entry)
        print(
            f"epoch {epoch + 1}/{epochs}: loss {entry['loss']:.4f}, "
            f"train accuracy {entry['train_accuracy']:.2%}, {entry['seconds']:.1f} s",
            flush=True,
        )
    model.to(memory_format=torch.contiguous_format)
    return history


def _write_bytes(path: Path, data: bytes) -> None:
    """Write a file whole or not at all (temp file + rename)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_samples(folder: Path, seed: int) -> list[Path]:
    """Render one sample per class with its own seed; replaces earlier sample PNGs in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.iterdir():
        if old.is_file() and _SAMPLE_FILE.match(old.name):
            old.unlink()
    rng = np.random.default_rng(seed)
    paths = []
    for index, name in enumerate(DEMO_LABELS):
        path = folder / f"{index + 1:02d}_{name}.png"
        Image.fromarray(render_sample(index, rng)).save(path, optimize=True)
        paths.append(path)
    return paths


def model_card_markdown(card: dict) -> str:
    """A short human-readable model card from the JSON card."""
    per_class = "\n".join(
        f"| {name} | {acc:.1%} |" for name, acc in card["per_class_accuracy"].items()
    )
    c, h, w = card["input_size"]
    return f"""# Demo CNN (shapes)

The built-in model of the explorer: a small convolutional network that names the shape in a
{h}x{w} RGB image. It exists to be taken apart: its stages are few and named, and the task is
visual enough that its neurons' gradients and conductance show recognisable edges, corners
and curves.

## Task and data

Classes ({len(card["labels"])}): {", ".join(card["labels"])}.
The class is the shape only, never the colour.

Every image is generated by `explainer.demo.render_sample` (nothing is downloaded): one shape,
about 20 to 46 pixels across, at a random position, rotation and slight stretch, in one of nine
jittered colours, over a random background colour with a gradient, a soft blob, up to three thin
distractor lines and pixel noise. The shape colour is kept clearly apart from the background.

- Training set: {card["train_size"]} images (seed {card["seeds"]["train"]}), random h-flips.
- Held-out set: {card["val_size"]} images from a separately seeded generator
  (seed {card["seeds"]["val"]}), never seen in training.
- Samples in `assets/samples/`: one per class, from a third seed ({card["seeds"]["samples"]}).

## Architecture (`{card["arch"]}`, {card["num_params"]:,} parameters)

| stage | layers | output |
|---|---|---|
| `conv1` | conv 3x3, batch norm, ReLU, max pool 2 | 16 x {h // 2} x {w // 2} |
| `block1` | conv 3x3, batch norm, ReLU, max pool 2 | 32 x {h // 4} x {w // 4} |
| `block2` | conv 3x3, batch norm, ReLU, max pool 2 | 64 x {h // 8} x {w // 8} |
| `block3` | conv 3x3, batch norm, ReLU | 64 x {h // 8} x {w // 8} |
| `pool` | global max pool | 64 x 1 x 1 |
| `classifier` | linear | {len(card["labels"])} |

Input: {c}x{h}x{w}, pixel values in [0, 1] normalised with mean {list(card["mean"])} and
std {list(card["std"])}.

## Training

AdamW (weight decay 1e-4); the learning rate warms up over the first fifth of the steps to
{card["lr"]}, then decays along a cosine; batch size {card["batch_size"]}, {card["epochs"]} epochs,
seed {card["seed"]}, {card["threads"]} CPU threads, deterministic algorithms.
Training took {card["training_seconds"]:.0f} s of wall time ({card["training_cpu_seconds"]:.0f} s of
CPU time), plus {card["data_seconds"]:.0f} s generating data, with torch {card["torch_version"]}.

Reproduce with `python scripts/train_demo.py` (defaults give these assets).

## Results

Held-out accuracy: **{card["heldout_accuracy"]:.2%}** on {card["val_size"]} images.

| class | held-out accuracy |
|---|---|
{per_class}

## Limits

The model has only seen synthetic images of one flat-coloured shape on a simple background.
It will say something confident about any photograph; those answers mean nothing. Use it to
learn how the explorer's methods behave, not as a classifier.

Weights: `{WEIGHTS_FILENAME}` ({card["weights_bytes"]:,} bytes, float32, sha256
`{card["weights_sha256"]}`).
"""


def main(argv: list[str] | None = None) -> int:
    """Train, evaluate, and write the demo assets; returns the process exit status.

    Torch's thread count, deterministic-algorithms flag and global random state are set for the
    run and restored afterwards, so calling this from another program leaves torch as it was.
    """
    args = parse_args(argv)
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.set_num_threads(args.threads)
            torch.use_deterministic_algorithms(True)
            return run(args)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)


def run(args: argparse.Namespace) -> int:
    """The body of :func:`main`, with torch already set up for a deterministic run."""
    seeds = derive_seeds(args.seed)
    torch.manual_seed(seeds["torch"])
    generator = torch.Generator().manual_seed(seeds["torch"])

    start = time.perf_counter()
    train_x, train_y = make_dataset(args.train_size, seeds["train"])
    val_x, val_y = make_dataset(args.val_size, seeds["val"])
    data_seconds = time.perf_counter() - start
    print(
        f"generated {args.train_size} training and {args.val_size} held-out images "
        f"in {data_seconds:.1f} s",
        flush=True,
    )

    model = build_demo_model(len(DEMO_LABELS))
    start, start_cpu = time.perf_counter(), time.process_time()
    history = train(
        model,
        train_x,
        train_y,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        generator=generator,
    )
    training_seconds = time.perf_counter() - start
    training_cpu_seconds = time.process_time() - start_cpu

    model.eval()
    predicted = predict(model, val_x)
    accuracy = float((predicted == val_y).float().mean())
    per_class = {
        name: float((predicted[val_y == i] == i).float().mean()) if (val_y == i).any() else 0.0
        for i, name in enumerate(DEMO_LABELS)
    }
    print(f"held-out accuracy: {accuracy:.4f} ({args.val_size} images)", flush=True)
    if accuracy < args.min_accuracy:
        print(
            f"error: held-out accuracy {accuracy:.4f} is below --min-accuracy "
            f"{args.min_accuracy}; nothing was written.",
            file=sys.stderr,
        )
        return 1

    state = {
        k: v.detach().to(torch.float32 if v.is_floating_point() else v.dtype).contiguous()
        for k, v in model.state_dict().items()
    }
    # One metadata key only: safetensors does not fix the order of several, and the file bytes
    # (and so their sha256) must be the same on every re-run.
    weights = save_safetensors(state, metadata={"arch": ARCH_NAME})
    if len(weights) > MAX_WEIGHTS_BYTES:
        print(f"error: weights are {len(weights)} bytes, over the 5 MB limit.", file=sys.stderr)
        return 1

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    _write_bytes(out / WEIGHTS_FILENAME, weights)
    _write_bytes(out / LABELS_FILENAME, ("\n".join(DEMO_LABELS) + "\n").encode("utf-8"))
    card = {
        "name": "Demo CNN (shapes)",
        "arch": ARCH_NAME,
        "input_size": list(DEMO_INPUT_SIZE),
        "mean": list(DEMO_MEAN),
        "std": list(DEMO_STD),
        "labels": list(DEMO_LABELS),
        "num_params": sum(p.numel() for p in model.parameters()),
        "train_size": args.train_size,
        "val_size": args.val_size,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "seed": args.seed,
        "seeds": seeds,
        "threads": args.threads,
        "heldout_accuracy": round(accuracy, 6),
        "per_class_accuracy": {k: round(v, 6) for k, v in per_class.items()},
        "history": [{k: round(v, 6) for k, v in h.items()} for h in history],
        "data_seconds": round(data_seconds, 1),
        "training_seconds": round(training_seconds, 1),
        "training_cpu_seconds": round(training_cpu_seconds, 1),
        "torch_version": torch.__version__,
        "numpy_version": np.__version__,
        "python_version": platform.python_version(),
        "weights_file": WEIGHTS_FILENAME,
        "weights_bytes": len(weights),
        "weights_sha256": hashlib.sha256(weights).hexdigest(),
    }
    _write_bytes(out / CARD_FILENAME, (json.dumps(card, indent=2) + "\n").encode("utf-8"))
    _write_bytes(out / "card.md", model_card_markdown(card).encode("utf-8"))

    write_samples(args.samples_out, seeds["samples"])

    # Read everything back the way the app will, and check the samples.
    loaded = load_demo_model(out)
    samples = sample_image_paths(args.samples_out)
    images = torch.stack(
        [torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1) for p in samples]
    )
    sample_pred = predict(loaded.model, images)
    right = 0
    for path, p in zip(samples, sample_pred.tolist(), strict=True):
        truth = sample_label(path)
        right += loaded.labels[p] == truth
        print(f"sample {path.name}: predicted {loaded.labels[p]}")
    print(f"samples correct: {right}/{len(samples)}")
    print(
        f"wrote {out} ({len(weights)} bytes of weights) and {len(samples)} samples to "
        f"{args.samples_out}"
    )
    print(f"held-out accuracy {accuracy:.2%}; training {training_seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
