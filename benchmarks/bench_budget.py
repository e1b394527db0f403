"""Peak memory and time of layer conductance under several memory budgets.

Each measurement runs in a fresh process: torchvision's resnet18 (random weights), one 224x224
image, ``n_steps=50``, target 3, 2 threads. The peak is the process's resident set above its
level before the call. "live" runs with glibc's ``MALLOC_MMAP_THRESHOLD_`` fixed, so that every
freed tensor goes back to the system at once and the resident set follows live tensors; the
default allocator keeps freed memory for reuse ("resident").

Usage: ``python benchmarks/bench_budget.py [--layers layer1 layer4] [--budgets 64 256 2048]``
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_CHILD = """
import json, os, sys, time
import torch, torchvision
from explainer import LayerConductance

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

LayerConductance(model, layer).attribute(x, target=3, n_steps=2)  # warm up
passes = []
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
base = status("VmRSS")
start = time.perf_counter()
LayerConductance(model, layer).attribute(
    x, target=3, n_steps=50, progress=lambda done, total: passes.append(done)
)
seconds = time.perf_counter() - start
peak = (status("VmHWM") - base) / 2**20
print(json.dumps({"peak": peak, "seconds": seconds, "passes": len(passes)}))
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
            print(
                f"| `{layer}` | {budget} MiB | {live['passes']} | {live['peak']:.0f} MiB | "
                f"{resident['peak']:.0f} MiB | {resident['seconds']:.2f} s |",
                flush=True,
            )


if __name__ == "__main__":
    main()
