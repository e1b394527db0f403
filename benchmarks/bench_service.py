"""Speed of the app's service layer on the built-in model, and the cost of the worker boundary.

Drives ``webapp.backend`` exactly as the pages do, outside a browser: a new conductance map
(nothing cached), a neuron click (its gradient map, then with its neighbours in one batched
call), and a revisited view (served from the cache). Every computation runs in the model's worker
process, as in the app. The same computations are also timed in this process, straight through
``explainer.analysis`` on a model loaded here, alternating with the worker calls, so the
difference is what the process boundary costs (sending the inputs, the job, the results back).
Prints medians over several images and layers::

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
    from explainer import analysis
    from explainer.analysis import neighbours
    from explainer.demo import sample_image_paths
    from explainer.intake import load_demo_model
    from webapp import backend
    from webapp.state import AttributionSettings, ImageEntry, ModelRef, PrepSpec

    torch.set_num_threads(2)
    start = time.perf_counter()
    lm = backend.resolve_model(ModelRef())
    started = time.perf_counter() - start
    prep = backend.preprocessing(PrepSpec(), lm)
    images = [
        ImageEntry.from_bytes(p.name, p.read_bytes(), source="sample") for p in sample_image_paths()
    ]
    layers = ["conv1", "block1", "block2", "block3"]
    settings = AttributionSettings()
    local = load_demo_model().model

    # Warm up imports and kernels on one image so first-call costs are not counted.
    backend.conductance(lm, images[0], prep, "block1", replace(settings, n_steps=2))
    backend.result_cache().clear()

    worker = {"fresh": [], "click": [], "click_nb": [], "cached": []}
    inproc = {"fresh": [], "click": [], "click_nb": []}
    for image in images:
        x = backend.input_tensor(image, prep)
        base = backend.baseline_tensor(x, prep, settings)
        for layer in layers:
            t = time.perf_counter()
            result = backend.conductance(lm, image, prep, layer, settings)
            worker["fresh"].append(time.perf_counter() - t)
            target = int(result.target)
            t = time.perf_counter()
            analysis.compute_conductance(
                local, layer, x, target, base, n_steps=settings.n_steps,
                internal_batch_size=backend.chunk_size(settings),
            )  # fmt: skip
            inproc["fresh"].append(time.perf_counter() - t)

            c, y, xx = strongest_neuron(result.attributions)
            t = time.perf_counter()
            backend.neuron_gradients(lm, image, prep, layer, [(c, y, xx)])
            worker["click"].append(time.perf_counter() - t)
            t = time.perf_counter()
            analysis.compute_neuron_gradients(local, layer, x, [(c, y, xx)])
            inproc["click"].append(time.perf_counter() - t)

            shape = result.attributions.shape
            other = (c, (y + 1) % shape[1], xx)
            batch = [other, *neighbours(other, shape)]
            t = time.perf_counter()
            backend.neuron_gradients(lm, image, prep, layer, batch)
            worker["click_nb"].append(time.perf_counter() - t)
            t = time.perf_counter()
            analysis.compute_neuron_gradients(local, layer, x, batch)
            inproc["click_nb"].append(time.perf_counter() - t)

            t = time.perf_counter()
            backend.conductance(lm, image, prep, layer, settings)
            worker["cached"].append(time.perf_counter() - t)

    def ms(values: list[float]) -> str:
        return f"{statistics.median(values) * 1000:7.1f} / {max(values) * 1000:7.1f}"

    print(
        f"built-in model ({lm.num_params:,} parameters), {len(images)} images x "
        f"{len(layers)} layers, n_steps={settings.n_steps}, {settings.method}, "
        f"torch {torch.__version__}, 2 threads; worker started and model loaded in "
        f"{started:.1f} s"
    )
    print(f"{'action':<46} {'worker median/max ms':>22} {'in-process median/max ms':>26} budget")
    rows = [
        ("new conductance map (nothing cached)", "fresh", 1.0),
        ("neuron click -> gradient map", "click", 0.3),
        ("neuron click with its neighbours (one batch)", "click_nb", 0.3),
        ("revisited view (cache hit)", "cached", 0.05),
    ]
    for name, key, budget in rows:
        local_text = ms(inproc[key]) if key in inproc else "-"
        print(f"{name:<46} {ms(worker[key]):>22} {local_text:>26} {budget * 1000:5.0f} ms")
    return 0


def strongest_neuron(attributions) -> tuple[int, ...]:
    """Index of the largest |conductance| in a (C, H, W) map."""
    import numpy as np

    return tuple(
        int(i) for i in np.unravel_index(np.abs(attributions).argmax(), attributions.shape)
    )


if __name__ == "__main__":
    raise SystemExit(main())
