"""Speed of the app's service layer on the built-in model (the figures quoted in the README).

Drives ``webapp.backend`` exactly as the pages do, outside a browser: a new conductance map
(nothing cached), a neuron click (its gradient map and its neighbours' in one batched call), and
a revisited view (served from the cache). Prints medians over several images and layers::

    python benchmarks/bench_service.py
"""

from __future__ import annotations

import logging
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch


def main() -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # webapp/ beside app.py
    logging.getLogger("streamlit").setLevel(logging.ERROR)
    from explainer.analysis import neighbours
    from explainer.demo import sample_image_paths
    from webapp import backend
    from webapp.state import AttributionSettings, ImageEntry, ModelRef, PrepSpec

    torch.set_num_threads(2)
    lm = backend.resolve_model(ModelRef())
    prep = backend.preprocessing(PrepSpec(), lm)
    images = [
        ImageEntry.from_bytes(p.name, p.read_bytes(), source="sample") for p in sample_image_paths()
    ]
    layers = ["conv1", "block1", "block2", "block3"]
    settings = AttributionSettings()

    # Warm up imports and kernels on one image so first-call costs are not counted.
    backend.conductance(lm, images[0], prep, "block1", replace(settings, n_steps=2))
    backend.result_cache().clear()

    fresh, click, click_nb, cached = [], [], [], []
    for image in images:
        for layer in layers:
            start = time.perf_counter()
            result = backend.conductance(lm, image, prep, layer, settings)
            fresh.append(time.perf_counter() - start)

            c, y, x = strongest_neuron(result.attributions)
            start = time.perf_counter()
            backend.neuron_gradients(lm, image, prep, layer, [(c, y, x)])
            click.append(time.perf_counter() - start)

            shape = result.attributions.shape
            other = (c, (y + 1) % shape[1], x)
            start = time.perf_counter()
            backend.neuron_gradients(lm, image, prep, layer, [other, *neighbours(other, shape)])
            click_nb.append(time.perf_counter() - start)

            start = time.perf_counter()
            backend.conductance(lm, image, prep, layer, settings)
            cached.append(time.perf_counter() - start)

    def row(name: str, values: list[float], budget: float) -> None:
        med, worst = statistics.median(values), max(values)
        print(
            f"{name:<44} median {med * 1000:8.1f} ms   max {worst * 1000:8.1f} ms   "
            f"budget {budget * 1000:6.0f} ms"
        )

    print(
        f"built-in model ({lm.num_params:,} parameters), {len(images)} images x "
        f"{len(layers)} layers, n_steps={settings.n_steps}, {settings.method}, "
        f"torch {torch.__version__}, 2 threads"
    )
    row("new conductance map (nothing cached)", fresh, 1.0)
    row("neuron click -> gradient map", click, 0.3)
    row("neuron click with its neighbours (one batch)", click_nb, 0.3)
    row("revisited view (cache hit)", cached, 0.05)
    return 0


def strongest_neuron(attributions) -> tuple[int, ...]:
    """Index of the largest |conductance| in a (C, H, W) map."""
    import numpy as np

    return tuple(
        int(i) for i in np.unravel_index(np.abs(attributions).argmax(), attributions.shape)
    )


if __name__ == "__main__":
    raise SystemExit(main())
