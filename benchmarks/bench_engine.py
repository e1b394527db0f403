"""Side-by-side benchmark of the attribution engine against Captum.

Every measurement runs in a fresh Python process (so peak memory is not hidden by what an
earlier case left behind); implementations alternate so that drift in machine load hits both.
Prints one table of medians and the explainer/Captum ratios. Usage::

    python benchmarks/bench_engine.py            # all cases, 3 repeats
    python benchmarks/bench_engine.py --repeats 5 --cases lc_layer2

Captum is a test-only dependency (``pip install -e ".[test]"``); the explainer package never
imports it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

CASES = {
    "floor": "one no-grad forward of the (n_steps+1)-image path batch",
    "lc_layer2": "LayerConductance on layer2",
    "lc_list": "LayerConductance on [layer1, layer2, layer3, layer4] (Captum: 4 calls)",
    "ng_neuron": "NeuronGradient on one layer1 neuron",
    "ng_64": "NeuronGradient on the 64 channels of layer1 at one position (Captum: 64 calls)",
}
N_STEPS = 50
TARGET = 3


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def _reset_peak() -> None:
    # Writing 5 to clear_refs resets the peak resident set size (VmHWM) of this process.
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def run_case(case: str, impl: str, threads: int) -> dict[str, float]:
    import torch
    import torchvision

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 224, 224)
    layers = [model.layer1, model.layer2, model.layer3, model.layer4]
    position = (0, 10, 10)

    if impl == "captum":
        from captum.attr import LayerConductance, NeuronGradient
    else:
        from explainer import LayerConductance, NeuronGradient

    if case == "floor":

        def call():
            with torch.no_grad():
                model(x.expand(N_STEPS + 1, -1, -1, -1).contiguous())
    elif case == "lc_layer2":

        def call():
            LayerConductance(model, model.layer2).attribute(x, target=TARGET, n_steps=N_STEPS)
    elif case == "lc_list":
        if impl == "captum":

            def call():
                for layer in layers:
                    LayerConductance(model, layer).attribute(x, target=TARGET, n_steps=N_STEPS)
        else:

            def call():
                LayerConductance(model, layers).attribute(x, target=TARGET, n_steps=N_STEPS)
    elif case == "ng_neuron":

        def call():
            NeuronGradient(model, model.layer1).attribute(x, position)
    elif case == "ng_64":
        selectors = [(c, position[1], position[2]) for c in range(64)]
        if impl == "captum":

            def call():
                for sel in selectors:
                    NeuronGradient(model, model.layer1).attribute(x, sel)
        else:

            def call():
                NeuronGradient(model, model.layer1).attribute(x, selectors)
    else:
        raise SystemExit(f"unknown case {case}")

    # Warm up lazily initialised kernels on a small problem, then measure the real call twice:
    # the first call in the fresh process gives the peak memory and the first-call time (it
    # includes building oneDNN kernels for the new shapes), the second the steady-state time.
    small = torch.randn(1, 3, 64, 64)
    LayerConductance(model, model.layer2).attribute(small, target=TARGET, n_steps=2)
    NeuronGradient(model, model.layer1).attribute(small, (0, 1, 1))
    _reset_peak()
    before = _rss_kib("VmRSS")
    start = time.perf_counter()
    call()
    first = time.perf_counter() - start
    peak = _rss_kib("VmHWM") - before
    start = time.perf_counter()
    call()
    warm = time.perf_counter() - start
    return {"seconds": warm, "first_seconds": first, "peak_mib": peak / 1024}


def _spawn(case: str, impl: str, threads: int) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, __file__, "--child", case, impl, "--threads", str(threads)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cases", nargs="*", default=list(CASES))
    parser.add_argument("--child", nargs=2, metavar=("CASE", "IMPL"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        print(json.dumps(run_case(args.child[0], args.child[1], args.threads)))
        return 0

    import torch

    print(
        f"torch {torch.__version__}, {args.threads} threads, {os.cpu_count()} CPUs; resnet18 "
        f"(random weights), one 224x224 image, n_steps={N_STEPS}, target={TARGET}; "
        f"medians of {args.repeats} fresh processes"
    )
    rows = []
    for case in args.cases:
        impls = ["explainer"] if case == "floor" else ["captum", "explainer"]
        samples: dict[str, list[dict[str, float]]] = {impl: [] for impl in impls}
        for _ in range(args.repeats):
            for impl in impls:
                samples[impl].append(_spawn(case, impl, args.threads))
        med = {
            impl: {
                k: statistics.median(s[k] for s in samples[impl])
                for k in ("seconds", "first_seconds", "peak_mib")
            }
            for impl in impls
        }
        rows.append((case, med))

    head = ("case", "captum s", "ours s", "time", "1st call", "captum MiB", "ours MiB", "mem")
    print("{:<10} {:>9} {:>8} {:>6} {:>9} {:>11} {:>9} {:>6}".format(*head))
    for case, med in rows:
        ours = med["explainer"]
        ref = med.get("captum")
        if ref is None:
            print(
                f"{case:<10} {'':>9} {ours['seconds']:8.3f} {'':>6} {'':>9} {'':>11} "
                f"{ours['peak_mib']:9.0f}"
            )
            continue
        print(
            f"{case:<10} {ref['seconds']:9.3f} {ours['seconds']:8.3f} "
            f"{ours['seconds'] / ref['seconds']:6.2f} "
            f"{ours['first_seconds'] / ref['first_seconds']:9.2f} {ref['peak_mib']:11.0f} "
            f"{ours['peak_mib']:9.0f} {ours['peak_mib'] / max(ref['peak_mib'], 1e-9):6.2f}"
        )
    print("time: steady-state ratio (second call); 1st call: ratio of first calls; mem: ratio of")
    print("peak resident memory above the level before the first call")
    for case, text in CASES.items():
        if case in args.cases:
            print(f"  {case}: {text}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
