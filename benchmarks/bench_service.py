"""Speed of the app's service layer on the built-in model, and the cost of the worker boundary.

Drives ``webapp.backend`` exactly as the pages do, outside a browser: a new conductance map
(nothing cached), a neuron click (its gradient map, then with its neighbours in one batched
call), and a revisited view (served from the cache). Every computation runs in the model's worker
process, as in the app. The same computations are also timed in this process, straight through
``explainer.analysis`` on a model loaded here, alternating with the worker calls, so the
difference is what the process boundary costs (sending the inputs, the job, the results back).
Prints medians over several images and layers::

    python benchmarks/bench_service.py

With ``--real``, it times what the conductance page does on real model sizes instead (torchvision's
resnet50, convnext_tiny and vit_b_16 with random weights, uploaded as weights files and loaded by
their worker like any upload): the asked-for map (50 Gauss-Legendre steps) starts as a
background job; after ``EXPLAINER_FIRST_LOOK_AFTER_S`` (0.25 s), or at once when the model's
previous first look took longer than that wait, the page computes a first look (4 steps) on the
model's other worker, which pauses the background job meanwhile, then waits for the refined map.
Both times are counted from the request. Each model's workers are started and warmed up before
the clock runs::

    python benchmarks/bench_service.py --real [--models resnet50,vit_b_16] [--images 3]
"""

from __future__ import annotations

import argparse
import io
import logging
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real", action="store_true", help="time real model sizes instead")
    parser.add_argument("--models", default=",".join(REAL_MODELS), help="with --real")
    parser.add_argument("--images", type=int, default=3, help="images per model, with --real")
    options = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # webapp/ beside app.py
    if options.real:
        return real_sizes(options.models.split(","), options.images)
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


REAL_MODELS = {
    # architecture: (layer timed, the layer's place in the network)
    "resnet50": ("layer3", "mid"),
    "convnext_tiny": ("features.5", "mid"),
    "vit_b_16": ("encoder.layers.encoder_layer_5", "mid"),
}


def real_sizes(names: list[str], count: int) -> int:
    """First look and refined map on real model sizes, through the local workers (the page's
    sequence, see the module's docstring)."""
    import numpy as np
    import torchvision

    from explainer.compute import LocalExecutor, ModelSource
    from explainer.limits import first_look_after_s

    unknown = [n for n in names if n not in REAL_MODELS]
    if unknown:
        print(f"unknown models {unknown}; choose from {list(REAL_MODELS)}")
        return 2
    torch.manual_seed(0)
    wait_s = first_look_after_s()
    pool = LocalExecutor(max_workers=2)
    print(
        f"real model sizes, random weights, 1 image of 224x224 at a time, {count} images each; "
        f"asked-for map: 50 Gauss-Legendre steps; first look: 4 steps after {wait_s} s; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads per worker"
    )
    print(
        f"{'model':<15} {'layer':<32} {'first look s':>13} {'refined s':>10} "
        f"{'alone: 4 steps s':>17} {'alone: 50 steps s':>18}"
    )
    try:
        for name in names:
            layer, _where = REAL_MODELS[name]
            model = torchvision.models.get_model(name, weights=None, num_classes=1000).eval()
            buffer = io.BytesIO()
            torch.save(model.state_dict(), buffer)
            source = ModelSource("file", buffer.getvalue(), f"{name}.pth", arch=name)
            del model
            images = [torch.rand(1, 3, 224, 224).numpy() for _ in range(count + 1)]

            def args(x: np.ndarray, target: int, n_steps: int, layer: str = layer) -> dict:
                return {
                    "layer": layer,
                    "x": x,
                    "target": target,
                    "baseline": np.zeros_like(x),
                    "method": "gausslegendre",
                    "n_steps": n_steps,
                    "internal_batch_size": -(-n_steps // 8),
                }

            def target_of(x: np.ndarray, source: ModelSource = source) -> int:
                scores = pool.submit(source, "scores", {"x": x}).result(timeout=600)
                return int(np.argmax(np.asarray(scores).reshape(-1)))

            # Start both workers and warm them up (model load, first kernels) off the clock.
            target = target_of(images[0])
            pool.submit(source, "conductance", args(images[0], target, 2)).result(timeout=600)
            pool.submit(source, "conductance", args(images[0], target, 2), background=True).result(
                timeout=600
            )
            rows: dict[str, list[float]] = {"first": [], "refined": [], "alone4": [], "alone50": []}
            first_look_s = 0.0  # as the page: no wait once a first look took longer than it
            for x in images[1:]:
                target = target_of(x)
                start = time.perf_counter()
                full = pool.submit(source, "conductance", args(x, target, 50), background=True)
                if first_look_s < wait_s:
                    time.sleep(wait_s)
                if not full.done():
                    t = time.perf_counter()
                    pool.submit(source, "conductance", args(x, target, 4)).result(timeout=600)
                    first_look_s = time.perf_counter() - t
                rows["first"].append(time.perf_counter() - start)
                full.result(timeout=1200)
                rows["refined"].append(time.perf_counter() - start)
                for key, steps in (("alone4", 4), ("alone50", 50)):
                    t = time.perf_counter()
                    pool.submit(source, "conductance", args(x, target, steps)).result(timeout=1200)
                    rows[key].append(time.perf_counter() - t)
            med = {k: statistics.median(v) for k, v in rows.items()}
            print(
                f"{name:<15} {layer:<32} {med['first']:>13.2f} {med['refined']:>10.2f} "
                f"{med['alone4']:>17.2f} {med['alone50']:>18.2f}"
            )
    finally:
        pool.shutdown()
    return 0


def strongest_neuron(attributions) -> tuple[int, ...]:
    """Index of the largest |conductance| in a (C, H, W) map."""
    import numpy as np

    return tuple(
        int(i) for i in np.unravel_index(np.abs(attributions).argmax(), attributions.shape)
    )


if __name__ == "__main__":
    raise SystemExit(main())
