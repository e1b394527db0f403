"""Path points chosen to a tolerance against the smallest Gauss-Legendre run that reaches it.

For every model, layer and image: Captum's ``LayerConductance`` with ``method="gausslegendre"``
runs at n = 4, 8, 16, ... 256 until ``|delta| <= tolerance * |F(x) - F(baseline)|``; the
smallest such n is the reference. ``explainer`` then runs once with ``n_steps="auto"`` at the
same tolerance. The table gives path evaluations (points of the path run through the model:
n + 1 for the reference, ``last_steps`` for auto; the two extra forward passes Captum spends on
the delta are not counted), the time of each call, and the ratios. Targets are the predicted
classes, baselines zeros (the mean colour after normalisation), one image per call. Usage::

    python benchmarks/bench_steps.py                      # built-in model, resnet18, resnet50
    python benchmarks/bench_steps.py --models demo --tolerance 0.01

Captum is a test-only dependency (``pip install -e ".[test]"``).
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

GL_STEPS = (4, 8, 16, 32, 64, 128, 256)
LAYERS = {
    "demo": ("block2", "block3"),
    "resnet18": ("layer2", "layer4"),
    "resnet50": ("layer3", "layer4"),
}


def _model(name: str):
    """(model, images of shape (8, 3, H, W)) with the built-in samples as images."""
    import torchvision
    from PIL import Image

    from explainer.demo import sample_image_paths

    paths = sample_image_paths()[:8]
    if name == "demo":
        from explainer.images import Preprocessing, preprocess
        from explainer.intake import load_demo_model

        lm = load_demo_model()
        prep = Preprocessing(
            mean=tuple(lm.mean), std=tuple(lm.std), size=tuple(lm.input_size[-2:]), resize=None
        )
        images = torch.cat([preprocess(Image.open(p).convert("RGB"), prep) for p in paths])
        return lm.model.eval(), images
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)().eval()
    mean = torch.tensor([0.485, 0.456, 0.406]).reshape(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).reshape(3, 1, 1)
    images = []
    for p in paths:
        img = Image.open(p).convert("RGB").resize((224, 224), Image.BILINEAR)
        t = torch.from_numpy(__import__("numpy").asarray(img).copy()).permute(2, 0, 1) / 255.0
        images.append(((t - mean) / std).unsqueeze(0))
    return model, torch.cat(images)


def _timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def run(models: list[str], tolerance: float, count: int) -> list[dict]:
    from captum.attr import LayerConductance as CaptumLC

    from explainer import LayerConductance

    rows = []
    for name in models:
        model, images = _model(name)
        for layer_name in LAYERS[name]:
            layer = model.get_submodule(layer_name)
            # Warm up kernels for both libraries on the first image.
            x0 = images[:1]
            t0 = int(model(x0).argmax())
            CaptumLC(model, layer).attribute(x0, target=t0, n_steps=4)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                LayerConductance(model, layer).attribute(x0, target=t0, n_steps="auto")
            for i in range(min(count, images.shape[0])):
                x = images[i : i + 1]
                with torch.no_grad():
                    out = model(x)
                    target = int(out.argmax())
                    change = float(out[0, target] - model(torch.zeros_like(x))[0, target])
                ref_n, ref_time = None, None
                for n in GL_STEPS:
                    (_, delta), seconds = _timed(
                        CaptumLC(model, layer).attribute,
                        x,
                        target=target,
                        n_steps=n,
                        method="gausslegendre",
                        return_convergence_delta=True,
                    )
                    if abs(float(delta)) <= tolerance * abs(change):
                        ref_n, ref_time = n, seconds
                        break
                lc = LayerConductance(model, layer)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    (_, delta), seconds = _timed(
                        lc.attribute,
                        x,
                        target=target,
                        n_steps="auto",
                        tolerance=tolerance,
                        return_convergence_delta=True,
                    )
                rows.append(
                    dict(
                        model=name,
                        layer=layer_name,
                        image=i,
                        ref_n=ref_n,
                        ref_points=None if ref_n is None else ref_n + 1,
                        ref_s=ref_time,
                        auto_points=lc.last_steps[0],
                        auto_status=lc.last_status[0],
                        auto_delta=abs(float(delta)) / max(abs(change), 1e-30),
                        auto_s=seconds,
                    )
                )
                r = rows[-1]
                print(
                    f"{name:<9} {layer_name:<7} img {i}  GL n={ref_n}  "
                    f"points {r['ref_points']} vs {r['auto_points']} ({r['auto_status']}, "
                    f"delta {r['auto_delta']:.4f})  "
                    f"time {ref_time if ref_time is None else round(ref_time, 3)} vs "
                    f"{seconds:.3f}",
                    flush=True,
                )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=list(LAYERS), choices=list(LAYERS))
    parser.add_argument("--tolerance", type=float, default=0.01)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {args.threads} threads; tolerance {args.tolerance}; "
        "random weights for torchvision models; one image per call"
    )
    rows = run(args.models, args.tolerance, args.images)
    print()
    print(
        "| model | layer | images | GL n (median) | points: GL / auto (median ratio) | "
        "time ratio auto/GL (median) | goal met (points, time) |"
    )
    print("|---|---|---|---|---|---|---|")
    for name in args.models:
        for layer in LAYERS[name]:
            group = [r for r in rows if r["model"] == name and r["layer"] == layer]
            scored = [r for r in group if r["ref_n"] is not None]
            if not scored:
                print(f"| {name} | {layer} | {len(group)} | >256 | | | |")
                continue
            pts = [r["auto_points"] / r["ref_points"] for r in scored]
            tms = [r["auto_s"] / r["ref_s"] for r in scored]
            met_p = sum(p <= 0.5 for p in pts)
            met_t = sum(t <= 0.5 for t in tms)
            print(
                f"| {name} | {layer} | {len(group)} | "
                f"{statistics.median(r['ref_n'] for r in scored):g} | "
                f"{statistics.median(r['ref_points'] for r in scored):g} / "
                f"{statistics.median(r['auto_points'] for r in scored):g} "
                f"({statistics.median(pts):.2f}) | {statistics.median(tms):.2f} | "
                f"{met_p}/{len(scored)}, {met_t}/{len(scored)} |"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
