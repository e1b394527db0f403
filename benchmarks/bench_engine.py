"""Side-by-side benchmark of the attribution engine against Captum.

Every measurement runs in a fresh Python process (so peak memory is not hidden by what an
earlier case left behind); implementations alternate so that drift in machine load hits both.
Prints one table of medians and the explainer/Captum ratios. Usage::

    python benchmarks/bench_engine.py            # all resnet18 cases, 3 repeats
    python benchmarks/bench_engine.py --repeats 5 --cases lc_layer2
    python benchmarks/bench_engine.py --archs                      # architecture table
    python benchmarks/bench_engine.py --archs resnet50 vit_small --repeats 5
    python benchmarks/bench_engine.py --check                      # float64 agreement
    python benchmarks/bench_engine.py --archs --max-other 0.3      # on a shared machine

``--archs [NAME ...]`` (all of :data:`ARCHS` when no name is given) times LayerConductance on
one mid layer of each architecture: torchvision models with random weights (no download), one
image, ``n_steps=16``, the second call in the process timed. Per architecture it prints the
Captum and explainer seconds, their ratio, the floor (one no-grad forward of the
``n_steps + 1`` image path batch, also a second call) and explainer/floor, and the steady ratio:
the medians of the three calls after the second. The ``demo`` row is
the built-in demo CNN, whose forward takes milliseconds: it shows fixed per-call overhead.

``--check [NAME ...]`` compares both implementations in float64 (smaller images where the
architecture allows, ``n_steps=16``) and prints max |explainer - Captum| / max |Captum| per
architecture; it fails (exit status 1) above ``1e-4``.

Each child also reports how many CPUs other processes kept busy while it was timed (from
``/proc/stat``, Linux only): the ``other`` column. On a shared machine ``--max-other F`` waits
(two minutes at most) until other processes use at most ``F`` CPUs before each sample, and runs
a sample again (3 tries at most) when they used more while it was timed. ``--json PATH`` also
writes every sample of the architecture table to ``PATH``.

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
    "nc_neuron": "NeuronConductance on one layer2 neuron",
    "nc_16": "NeuronConductance on 16 layer2 channels at one position (ours: one call with a "
    "list of selectors; Captum: 16 calls); one timed call after a one-neuron warm-up call",
    "nc_demo": "NeuronConductance on one block2 neuron of the built-in demo CNN (64x64 image); "
    "median of 20 calls",
}
NC_NEURON = (5, 10, 10)
NC_CHANNELS = range(16)
# Cases timed once after a warm-up at the real size (16 reference calls take minutes).
TIMED_ONCE = {"nc_16"}
N_STEPS = 50
TARGET = 3

# Architecture table: name -> (layer, image size for timing, image size for the float64 check,
# what the model is). Every model is built with random weights; nothing is downloaded.
ARCHS = {
    "resnet50": ("layer3", 224, 64, "torchvision resnet50"),
    "convnext_tiny": ("features.4", 224, 64, "torchvision convnext_tiny"),
    "efficientnet_b0": ("features.4", 224, 64, "torchvision efficientnet_b0"),
    "mobilenet_v3_large": ("features.7", 224, 64, "torchvision mobilenet_v3_large"),
    "densenet121": ("features.denseblock2", 160, 64, "torchvision densenet121"),
    "swin_t": ("features.3", 224, 64, "torchvision swin_t"),
    "vit_small": (
        "encoder.layers.encoder_layer_3",
        64,
        64,
        "VisionTransformer(image_size=64, patch_size=8, 6 layers, hidden 384, mlp 1536, 6 heads)",
    ),
    "vit_b_16": ("encoder.layers.encoder_layer_5", 224, 64, "torchvision vit_b_16"),
    "demo": ("block2", 64, 64, "the built-in demo CNN (explainer.intake.load_demo_model)"),
}
ARCH_STEPS = 16
# Calls timed after the second one in each architecture process; their median is the steady
# state (a worker of the app serves many calls on one model).
STEADY_CALLS = 3
CHECK_TOLERANCE = 1e-4


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


class _OtherLoad:
    """CPUs kept busy by other processes while a block runs: all busy time in ``/proc/stat``
    less this process's own CPU time, over the wall time. ``None`` where it cannot be read."""

    def __enter__(self) -> _OtherLoad:
        self.value: float | None = None
        self._start = (self._busy(), os.times(), time.perf_counter())
        return self

    def __exit__(self, *exc: object) -> None:
        busy0, times0, wall0 = self._start
        busy1, times1, wall1 = self._busy(), os.times(), time.perf_counter()
        if busy0 is None or busy1 is None or wall1 <= wall0:
            return
        own = sum(b - a for a, b in zip(times0[:4], times1[:4], strict=True))
        self.value = max(0.0, (busy1 - busy0 - own) / (wall1 - wall0))

    @staticmethod
    def _busy() -> float | None:
        try:
            with open("/proc/stat") as fh:
                fields = [int(v) for v in fh.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        # user nice system idle iowait irq softirq steal: everything but idle and iowait.
        busy = sum(fields[:8]) - fields[3] - fields[4]
        return busy / os.sysconf("SC_CLK_TCK")


def _build_arch(name: str, size: int | None = None):
    """The model of architecture ``name`` (random weights, eval mode), its layer, image size."""
    import torch
    import torchvision

    layer_name, px, _, _ = ARCHS[name]
    px = size or px
    if name == "demo":
        from explainer.intake import load_demo_model

        model = load_demo_model().model
    elif name == "vit_small":
        from torchvision.models.vision_transformer import VisionTransformer

        model = VisionTransformer(
            image_size=px, patch_size=8, num_layers=6, num_heads=6, hidden_dim=384, mlp_dim=1536
        )
    elif name == "vit_b_16":
        model = torchvision.models.vit_b_16(weights=None, image_size=px)
    else:
        model = getattr(torchvision.models, name)(weights=None)
    if name.startswith("vit"):
        # torchvision starts a ViT's head at zero: every score, and so every attribution, would
        # be zero whatever the input. Random head weights give the attributions some size.
        torch.nn.init.normal_(model.heads.head.weight, std=0.02)
    torch.manual_seed(0)  # the same image for every implementation
    return model.eval(), model.get_submodule(layer_name), px


def run_arch(name: str, impl: str, threads: int) -> dict[str, float]:
    """Time one implementation on one architecture: the second call (the table's main column)
    and, as the steady state, the median of the :data:`STEADY_CALLS` calls after it."""
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model, layer, px = _build_arch(name)
    x = torch.randn(1, 3, px, px)
    if impl == "floor":
        batch = x.expand(ARCH_STEPS + 1, -1, -1, -1).contiguous()

        def call():
            with torch.no_grad():
                model(batch)
    else:
        if impl == "captum":
            from captum.attr import LayerConductance
        else:
            from explainer import LayerConductance

        def call():
            LayerConductance(model, layer).attribute(x, target=TARGET, n_steps=ARCH_STEPS)

    _reset_peak()
    before = _rss_kib("VmRSS")
    start = time.perf_counter()
    call()
    first = time.perf_counter() - start
    peak = _rss_kib("VmHWM") - before
    times = []
    with _OtherLoad() as load:
        for _ in range(1 + STEADY_CALLS):
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
    return {
        "seconds": times[0],
        "steady_seconds": statistics.median(times[1:]),
        "first_seconds": first,
        "peak_mib": peak / 1024,
        "other_cpus": -1.0 if load.value is None else load.value,
    }


def check_arch(name: str, threads: int) -> dict[str, float]:
    """Max |explainer - Captum| / max |Captum| of LayerConductance in float64."""
    import torch
    from captum.attr import LayerConductance as Reference

    from explainer import LayerConductance

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model, layer, px = _build_arch(name, ARCHS[name][2])
    model = model.double()
    x = torch.randn(1, 3, px, px, dtype=torch.float64)
    start = time.perf_counter()
    ref = Reference(model, layer).attribute(x, target=TARGET, n_steps=ARCH_STEPS)
    ours = LayerConductance(model, layer).attribute(x, target=TARGET, n_steps=ARCH_STEPS)
    scale = ref.abs().max().item()
    diff = (ours - ref).abs().max().item()
    return {
        "rel_diff": diff / scale if scale > 0 else diff,
        "max_abs": scale,
        "px": px,
        "shape": list(ref.shape),
        "seconds": time.perf_counter() - start,
    }


def _nc_setup(case: str, dtype=None, px: int | None = None):
    """Model, layer, image and selectors of a NeuronConductance case (random weights)."""
    import torch
    import torchvision

    torch.manual_seed(0)
    if case == "nc_demo":
        from explainer.intake import load_demo_model

        model = load_demo_model().model.eval()
        layer, px, selectors = model.block2, px or 64, [(5, 4, 4)]
    else:
        model = torchvision.models.resnet18().eval()
        layer, px = model.layer2, px or 224
        if case == "nc_16":
            selectors = [(c, NC_NEURON[1], NC_NEURON[2]) for c in NC_CHANNELS]
        else:
            selectors = [NC_NEURON]
    if dtype is not None:
        model = model.to(dtype)
    torch.manual_seed(0)
    x = torch.randn(1, 3, px, px, dtype=dtype or torch.float32)
    return model, layer, x, selectors


def run_nc_case(case: str, impl: str, threads: int) -> dict[str, float]:
    """Time NeuronConductance (``impl`` "captum" or "explainer") on one ``nc_*`` case."""
    import torch

    torch.set_num_threads(threads)
    model, layer, x, selectors = _nc_setup(case)
    if impl == "captum":
        from captum.attr import NeuronConductance

        def call():
            for sel in selectors:
                NeuronConductance(model, layer).attribute(x, sel, target=TARGET, n_steps=N_STEPS)
    else:
        from explainer import NeuronConductance

        many = selectors if len(selectors) > 1 else selectors[0]

        def call():
            NeuronConductance(model, layer).attribute(x, many, target=TARGET, n_steps=N_STEPS)

    # Warm up lazily initialised kernels on a small problem first.
    small = torch.randn(1, 3, 32, 32) if case == "nc_demo" else torch.randn(1, 3, 64, 64)
    if impl == "captum":
        from captum.attr import NeuronConductance as Warm
    else:
        from explainer import NeuronConductance as Warm
    Warm(model, layer).attribute(small, (0, 1, 1), target=TARGET, n_steps=2)
    if case in TIMED_ONCE:
        # One one-neuron call at the real size builds the kernels; then one timed call.
        Warm(model, layer).attribute(x, selectors[0], target=TARGET, n_steps=N_STEPS)
        _reset_peak()
        before = _rss_kib("VmRSS")
        with _OtherLoad() as load:
            start = time.perf_counter()
            call()
            seconds = time.perf_counter() - start
        peak = _rss_kib("VmHWM") - before
        first = seconds
    else:
        _reset_peak()
        before = _rss_kib("VmRSS")
        start = time.perf_counter()
        call()
        first = time.perf_counter() - start
        peak = _rss_kib("VmHWM") - before
        repeats = 20 if case == "nc_demo" else 1
        times = []
        with _OtherLoad() as load:
            for _ in range(repeats):
                start = time.perf_counter()
                call()
                times.append(time.perf_counter() - start)
        seconds = statistics.median(times)
    return {
        "seconds": seconds,
        "first_seconds": first,
        "peak_mib": peak / 1024,
        "other_cpus": -1.0 if load.value is None else load.value,
    }


def check_neuron(threads: int) -> dict[str, dict[str, float]]:
    """Max |explainer - Captum| / max |Captum| of NeuronConductance in float64, per case."""
    import torch
    from captum.attr import NeuronConductance as Reference

    from explainer import NeuronConductance

    torch.set_num_threads(threads)
    out = {}
    for case in ("nc_neuron", "nc_16", "nc_demo"):
        model, layer, x, selectors = _nc_setup(
            case, torch.float64, 64 if case != "nc_demo" else None
        )
        if case != "nc_demo":
            selectors = [(c, 2, 3) for c, _, _ in selectors]  # inside the 8x8 map of 64px
        ref = torch.stack(
            [
                Reference(model, layer).attribute(x, s, target=TARGET, n_steps=ARCH_STEPS)
                for s in selectors
            ]
        )
        many = selectors if len(selectors) > 1 else selectors[0]
        ours = NeuronConductance(model, layer).attribute(x, many, target=TARGET, n_steps=ARCH_STEPS)
        ours = ours if len(selectors) > 1 else ours.unsqueeze(0)
        scale = ref.abs().max().item()
        diff = (ours - ref).abs().max().item()
        out[case] = {"rel_diff": diff / scale if scale > 0 else diff, "max_abs": scale}
    return out


def _check_neuron_table(threads: int) -> int:
    print(
        f"float64 agreement with Captum: NeuronConductance, n_steps={ARCH_STEPS}, "
        f"tolerance {CHECK_TOLERANCE:g} (max |ours - captum| / max |captum|)"
    )
    res = _spawn("check-neuron", "both", threads)
    failed = 0
    print("{:<10} {:>11} {:>10} {:>4}".format("case", "rel diff", "max |attr|", "ok"))
    for case, r in res.items():
        ok = r["rel_diff"] <= CHECK_TOLERANCE
        failed += not ok
        print(f"{case:<10} {r['rel_diff']:11.2e} {r['max_abs']:10.3e} {'yes' if ok else 'NO':>4}")
    return 1 if failed else 0


def run_case(case: str, impl: str, threads: int) -> dict[str, float]:
    import torch
    import torchvision

    if case.startswith("nc_"):
        return run_nc_case(case, impl, threads)

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
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        raise SystemExit(f"{case} ({impl}) failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _wait_quiet(max_other: float, patience: float = 120.0) -> None:
    """Wait (``patience`` seconds at most) until other processes use at most ``max_other``
    CPUs over half a second; this process is idle meanwhile, so all busy time is theirs."""
    deadline = time.monotonic() + patience
    while time.monotonic() < deadline:
        with _OtherLoad() as load:
            time.sleep(0.5)
        if load.value is None or load.value <= max_other:
            return


def _sample(case: str, impl: str, threads: int, max_other: float | None) -> dict[str, float]:
    for _ in range(3):
        if max_other is not None:
            _wait_quiet(max_other)
        result = _spawn(case, impl, threads)
        if max_other is None or result.get("other_cpus", 0.0) <= max_other:
            break
    return result


def _arch_table(
    names: list[str],
    repeats: int,
    threads: int,
    max_other: float | None,
    json_path: str | None = None,
) -> int:
    import torch

    print(
        f"torch {torch.__version__}, {threads} threads, {os.cpu_count()} CPUs; LayerConductance, "
        f"random weights, one image, n_steps={ARCH_STEPS}, target={TARGET}; second call timed, "
        f"then {STEADY_CALLS} more (steady); medians of {repeats} fresh processes per "
        "implementation"
    )
    head = ("architecture", "layer", "captum s", "ours s", "ratio", "floor s", "ours/floor")
    head2 = ("steady", "1st call", "captum MiB", "ours MiB", "other")
    fmt = "{:<19} {:<37} {:>9} {:>8} {:>6} {:>8} {:>10} {:>6} {:>8} {:>10} {:>8} {:>5}"
    print(fmt.format(*head, *head2))
    impls = ("captum", "explainer", "floor")
    raw: dict[str, dict[str, list[dict[str, float]]]] = {}
    for name in names:
        samples: dict[str, list[dict[str, float]]] = {impl: [] for impl in impls}
        for r in range(repeats):
            # Alternate, and reverse the order every other repeat: drift hits all alike.
            for impl in impls if r % 2 == 0 else impls[::-1]:
                samples[impl].append(_sample(f"arch:{name}", impl, threads, max_other))
        raw[name] = samples
        if json_path:
            with open(json_path, "w") as fh:
                json.dump(raw, fh, indent=1)
        med = {
            impl: {k: statistics.median(s[k] for s in samples[impl]) for k in samples[impl][0]}
            for impl in impls
        }
        ref, ours, floor = med["captum"], med["explainer"], med["floor"]
        layer = f"{ARCHS[name][0]} ({ARCHS[name][1]}px)"
        other = max(s["other_cpus"] for impl in impls for s in samples[impl])
        print(
            f"{name:<19} {layer:<37} {ref['seconds']:9.3f} {ours['seconds']:8.3f} "
            f"{ours['seconds'] / ref['seconds']:6.2f} {floor['seconds']:8.3f} "
            f"{ours['seconds'] / floor['seconds']:10.2f} "
            f"{ours['steady_seconds'] / ref['steady_seconds']:6.2f} "
            f"{ours['first_seconds'] / ref['first_seconds']:8.2f} {ref['peak_mib']:10.0f} "
            f"{ours['peak_mib']:8.0f} {other:5.1f}",
            flush=True,
        )
    print("ratio: explainer / Captum (second calls); floor: one no-grad forward of the")
    print(f"{ARCH_STEPS + 1}-image path batch; steady: ratio of the medians of calls 3 to")
    print(f"{2 + STEADY_CALLS}; 1st call: ratio of first calls in the process;")
    print("MiB: peak resident memory of the first call above the level before it; other: the")
    print("most CPUs other processes used during a timed call (-1: unknown)")
    for name in names:
        print(f"  {name}: {ARCHS[name][3]}")
    return 0


def _check_table(names: list[str], threads: int) -> int:
    print(
        f"float64 agreement with Captum: LayerConductance, n_steps={ARCH_STEPS}, "
        f"tolerance {CHECK_TOLERANCE:g} (max |ours - captum| / max |captum|)"
    )
    print(
        "{:<19} {:<31} {:>6} {:>11} {:>10} {:>6}".format(
            "architecture", "layer", "image", "rel diff", "max |attr|", "ok"
        )
    )
    failed = 0
    for name in names:
        res = _spawn(f"check:{name}", "both", threads)
        ok = res["rel_diff"] <= CHECK_TOLERANCE
        failed += not ok
        print(
            f"{name:<19} {ARCHS[name][0]:<31} {res['px']:>4}px {res['rel_diff']:11.2e} "
            f"{res['max_abs']:10.3e} {'yes' if ok else 'NO':>6}",
            flush=True,
        )
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cases", nargs="*", default=list(CASES))
    parser.add_argument(
        "--archs",
        nargs="*",
        choices=list(ARCHS),
        metavar="NAME",
        help=f"print the architecture table instead (all when no name is given: {list(ARCHS)})",
    )
    parser.add_argument(
        "--check",
        nargs="*",
        choices=list(ARCHS),
        metavar="NAME",
        help="check float64 agreement with Captum per architecture (all when no name is given)",
    )
    parser.add_argument(
        "--max-other",
        type=float,
        default=None,
        metavar="CPUS",
        help="wait for other processes to use at most CPUS before each sample, and redo it (3 "
        "tries at most) when they used more while it was timed",
    )
    parser.add_argument(
        "--json", metavar="PATH", help="with --archs: also write every sample to PATH as JSON"
    )
    parser.add_argument(
        "--check-neuron",
        action="store_true",
        help="check float64 agreement of NeuronConductance with Captum (one neuron and a list "
        "of 16 on resnet18, one neuron on the demo CNN)",
    )
    parser.add_argument("--child", nargs=2, metavar=("CASE", "IMPL"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        case, impl = args.child
        if case == "check-neuron":
            result = check_neuron(args.threads)
        elif case.startswith("check:"):
            result = check_arch(case[len("check:") :], args.threads)
        elif case.startswith("arch:"):
            result = run_arch(case[len("arch:") :], impl, args.threads)
        else:
            result = run_case(case, impl, args.threads)
        print(json.dumps(result))
        return 0
    if args.check_neuron:
        return _check_neuron_table(args.threads)
    if args.check is not None:
        return _check_table(args.check or list(ARCHS), args.threads)
    if args.archs is not None:
        return _arch_table(
            args.archs or list(ARCHS), args.repeats, args.threads, args.max_other, args.json
        )

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
        for r in range(args.repeats):
            # Alternate, and reverse the order every other repeat: drift hits both alike.
            for impl in impls if r % 2 == 0 else impls[::-1]:
                samples[impl].append(_sample(case, impl, args.threads, args.max_other))
        med = {
            impl: {
                k: statistics.median(s[k] for s in samples[impl])
                for k in ("seconds", "first_seconds", "peak_mib")
            }
            for impl in impls
        }
        other = max(s.get("other_cpus", -1.0) for impl in impls for s in samples[impl])
        rows.append((case, med, other))

    head = ("case", "captum s", "ours s", "time", "1st call", "captum MiB", "ours MiB", "mem")
    print("{:<10} {:>9} {:>8} {:>6} {:>9} {:>11} {:>9} {:>6} {:>5}".format(*head, "other"))
    for case, med, other in rows:
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
            f"{ours['peak_mib']:9.0f} {ours['peak_mib'] / max(ref['peak_mib'], 1e-9):6.2f} "
            f"{other:5.1f}"
        )
    print("time: steady-state ratio (second call); 1st call: ratio of first calls; mem: ratio of")
    print("peak resident memory above the level before the first call; other: the most CPUs")
    print("other processes used during a timed call (-1: unknown or not measured)")
    for case, text in CASES.items():
        if case in args.cases:
            print(f"  {case}: {text}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
