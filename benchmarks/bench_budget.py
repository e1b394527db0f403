"""Peak memory and time of layer conductance under several memory budgets.

Each measurement runs in a fresh process: torchvision's resnet18 (random weights), one 224x224
image, ``n_steps=50``, target 3, 2 threads. The peak is the process's resident set above its
level before the call (including what it reached before the engine reset it to measure a
pass). "live" runs with glibc's ``MALLOC_MMAP_THRESHOLD_`` fixed, so that every
freed tensor goes back to the system at once and the resident set follows live tensors; the
default allocator keeps freed memory for reuse ("resident"). Where the two runs differ in
passes, both are shown (live / resident); a call refused because even its smallest pass exceeds
the budget shows the passes it ran and the size of that pass.

Usage: ``python benchmarks/bench_budget.py [--layers layer1 layer4] [--budgets 64 256 2048]``
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_CHILD = """
import json, os, sys, time
import torch, torchvision
from explainer import AttributionError, LayerConductance

torch.set_num_threads(2)
torch.manual_seed(0)
model = torchvision.models.resnet18().eval()
layer = model.get_submodule(sys.argv[1])
x = torch.randn(1, 3, 224, 224)

def status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024

# The engine resets the peak when it measures a pass: keep what the peak had reached by then.
import explainer.memory as memory
reached = []
if hasattr(memory, "_ProcessPeak"):
    reset = memory._ProcessPeak.start.__func__
    def keeping(cls):
        reached.append(status("VmHWM"))
        return reset(cls)
    memory._ProcessPeak.start = classmethod(keeping)

try:
    LayerConductance(model, layer).attribute(x, target=3, n_steps=2)  # warm up
except AttributionError:
    pass  # refused under this budget: the measured call below says so
passes = []
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
reached.clear()
base = status("VmRSS")
start = time.perf_counter()
refused = None
try:
    LayerConductance(model, layer).attribute(
        x, target=3, n_steps=50, progress=lambda done, total: passes.append(done)
    )
except AttributionError as exc:  # even the smallest pass exceeds the budget
    refused = str(exc)
seconds = time.perf_counter() - start
peak = (max([*reached, status("VmHWM")]) - base) / 2**20
print(json.dumps({"peak": peak, "seconds": seconds, "passes": len(passes), "refused": refused}))
"""


def measure(layer: str, budget: str, live: bool) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "EXPLAINER_MEMORY_BUDGET_MB": budget}
    if live:
        env["MALLOC_MMAP_THRESHOLD_"] = "131072"
    else:
        env.pop("MALLOC_MMAP_THRESHOLD_", None)
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, layer],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def _passes(run: dict) -> str:
    """Passes of a run, or how many ran before it was refused and the size it was refused at."""
    if not run["refused"]:
        return str(run["passes"])
    needs = re.search(r"needs about (\S+ \S+) per pass", run["refused"])
    return f"refused after {run['passes']} (needs {needs[1] if needs else '?'})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", nargs="+", default=["conv1", "layer2", "layer4"])
    parser.add_argument("--budgets", nargs="+", default=["64", "256", "2048"])
    args = parser.parse_args()
    print("| layer | budget | passes | peak live | peak resident | time |")
    print("|---|---|---|---|---|---|")
    for layer in args.layers:
        for budget in args.budgets:
            live = measure(layer, budget, live=True)
            resident = measure(layer, budget, live=False)
            passes = " / ".join(dict.fromkeys(_passes(run) for run in (live, resident)))
            print(
                f"| `{layer}` | {budget} MiB | {passes} | {live['peak']:.0f} MiB | "
                f"{resident['peak']:.0f} MiB | {resident['seconds']:.2f} s |",
                flush=True,
            )


if __name__ == "__main__":
    main()
