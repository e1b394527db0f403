"""Dataset mode throughput: images per second and peak memory per worker, local and on Ray.

    python benchmarks/bench_batch.py                    # everything (needs pip install ".[ray]")
    python benchmarks/bench_batch.py --models demo --no-ray

For each model (the built-in ``demo_cnn`` on 64x64 images, torchvision's ``resnet18`` with random
weights on 224x224 images) it explains the same generated folder with ``run_batch`` on:

- ``local``: the local compute workers (one sandboxed worker process, all cores);
- ``local x2``: two local workers, one torch thread each;
- ``ray 1 node``: a Ray cluster of one node (``ray start --head``, all cores), one actor per CPU;
- ``ray 2 nodes``: a head and a second node (as ``ray start --address`` adds one), one CPU each,
  on this machine, one actor per node.

Clusters run on loopback only (every node has the address 127.0.0.1, see
``explainer.compute.ray_connect``) in a private folder and are stopped afterwards (only their
own processes). Each configuration writes a new store. "rate" counts the images after the
first wave (one per worker), from the end of that wave to the last result (steady state: models
loaded, actors placed, kernels warm); "wall" is the whole run, start-up included;
"peak/worker" is the largest peak resident memory of one worker process (or actor). Results
are printed as a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from explainer.batch.cli import model_source  # noqa: E402
from explainer.batch.runner import BatchSettings, run_batch  # noqa: E402
from explainer.compute import LocalExecutor, ModelSource  # noqa: E402
from explainer.compute.ray_connect import LOOPBACK  # noqa: E402
from explainer.demo import DEMO_LABELS, render_sample  # noqa: E402

MODELS = {
    "demo": {"layers": ("block1", "block2", "block3"), "size": 64},
    "resnet18": {"layers": ("layer1", "layer2", "layer3", "layer4"), "size": 256},
}


def make_images(folder: Path, count: int, size: int) -> Path:
    """``count`` shape images (the demo's generator), saved at ``size`` x ``size`` pixels."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        label = DEMO_LABELS[i % len(DEMO_LABELS)]
        image = Image.fromarray(render_sample(label, rng))
        if size != image.width:
            image = image.resize((size, size), Image.BILINEAR)
        image.save(folder / f"{i:04d}_{label}.png")
    return folder


# --------------------------------------------------------------------------- clusters


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Cluster:
    """A Ray cluster on this machine, on loopback only, stopped with only its processes.

    Every node has the address 127.0.0.1, so Ray binds its servers to loopback (any other
    address, 127.0.0.2 included, binds them to every interface). The head starts with
    ``ray start --head``, every further node with ``explainer.compute.ray_connect``'s ``node``
    command (``ray start --address`` refuses to add a node on 127.0.0.1). This process keeps
    127.0.0.1 as a driver too: the variables the cluster needs (token authentication,
    ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``) are set in its environment, before Ray is imported.
    """

    def __init__(self, cpus: list[int], token: Path) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="explainer-ray-bench."))
        # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER is read as Ray is imported: on Linux Ray replaces
        # 127.0.0.1 by the outward address unless it is 0.
        os.environ.update(
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN_PATH=str(token),
            RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        )
        self.env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0",
                    "EXPLAINER_RAY_BENCH": str(self.folder)}  # fmt: skip
        port = _free_port()
        self.address = f"{LOOPBACK}:{port}"
        try:
            for i, count in enumerate(cpus):
                folder = str(self.folder / f"node{i}")
                if i == 0:
                    command = [
                        "ray", "start", "--head", f"--node-ip-address={LOOPBACK}",
                        f"--port={port}", f"--num-cpus={count}", "--include-dashboard=false",
                        f"--dashboard-host={LOOPBACK}", "--disable-usage-stats",
                        f"--temp-dir={folder}", f"--dashboard-agent-listen-port={_free_port()}",
                        f"--metrics-export-port={_free_port()}",
                    ]  # fmt: skip
                else:
                    command = [
                        sys.executable, "-m", "explainer.compute.ray_connect", "node",
                        self.address, folder, f"--num-cpus={count}",
                        f"--agent-port={_free_port()}", f"--metrics-port={_free_port()}",
                    ]  # fmt: skip
                done = subprocess.run(
                    command, env=self.env, cwd=REPO, capture_output=True, text=True, timeout=300
                )
                if done.returncode != 0:
                    raise RuntimeError(
                        f"Ray node {i} did not start ({' '.join(command[:4])} ...): "
                        f"{(done.stderr or done.stdout)[-2000:]}"
                    )
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """TERM, then KILL, every process of this cluster and the processes below them."""
        folder = str(self.folder).encode()
        mark = b"EXPLAINER_RAY_BENCH=" + folder
        table: dict[int, tuple[int, bool]] = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            try:
                with open(f"/proc/{entry}/stat", "rb") as stat:
                    parent = int(stat.read().rsplit(b")", 1)[1].split()[1])
                with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                    named = folder in cmdline.read()
                with open(f"/proc/{entry}/environ", "rb") as environ:
                    named = named or mark in environ.read().split(b"\0")
            except (OSError, IndexError, ValueError):
                continue
            table[int(entry)] = (parent, named)
        chosen = {pid for pid, (_, named) in table.items() if named}
        grown = True
        while grown:
            grown = False
            for pid, (parent, _) in table.items():
                if parent in chosen and pid not in chosen and pid != os.getpid():
                    chosen.add(pid)
                    grown = True
        for how, wait in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
            for pid in chosen:
                try:
                    os.kill(pid, how)
                except OSError:
                    pass
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and any(_running(p) for p in chosen):
                time.sleep(0.2)
        shutil.rmtree(self.folder, ignore_errors=True)


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


# --------------------------------------------------------------------------- runs


def measure(
    name: str,
    source: ModelSource,
    images: Path,
    layers: tuple[str, ...],
    steps: int,
    make_executors: Callable[[], list],
    out: Path,
) -> dict:
    stamps: list[float] = []
    started = time.monotonic()
    executors = make_executors()
    try:
        summary = run_batch(
            source, images, out, BatchSettings(layers=layers, n_steps=steps), executors,
            on_record=lambda _: stamps.append(time.monotonic()),
        )  # fmt: skip
        wall = time.monotonic() - started
        peaks = [w.peak_rss_bytes for e in executors for w in e.workers()]
    finally:
        for executor in executors:
            executor.shutdown()
    if summary.ok != summary.total:
        raise RuntimeError(f"{name}: {summary}")
    # After the first wave (one image per worker, which also pays for warming up), to the end.
    wave = max(1, sum(max(1, int(getattr(e, "parallelism", 1))) for e in executors))
    done_after = len(stamps) - wave
    steady = done_after / (stamps[-1] - stamps[wave - 1]) if done_after > 0 else float("nan")
    return {"config": name, "images": summary.ok, "rate": steady, "wall": wall,
            "peak": max(peaks) / 2**20 if peaks else float("nan")}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="demo,resnet18")
    parser.add_argument("--demo-images", type=int, default=64)
    parser.add_argument("--resnet-images", type=int, default=8)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--no-ray", action="store_true")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    work = Path(tempfile.mkdtemp(prefix="explainer-bench-batch."))
    token = work / "auth_token"  # one for every cluster: a Ray driver reads it once
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    rows = []
    try:
        for model in args.models.split(","):
            spec = MODELS[model]
            count = args.demo_images if model == "demo" else args.resnet_images
            images = make_images(work / model, count, spec["size"])
            source = ModelSource("builtin") if model == "demo" else model_source(arch=model)
            configs: list[tuple[str, Callable[[], list] | None, list[int] | None]] = [
                ("local", lambda: [LocalExecutor(max_workers=1)], None),
                ("local x2", lambda source=source: _two_local(source), None),
            ]
            if not args.no_ray:
                configs += [("ray 1 node", None, [cores]), ("ray 2 nodes", None, [1] * 2)]
            for name, make, nodes in configs:
                cluster = None
                if nodes is not None:
                    cluster = Cluster(nodes, token)
                    make = _ray_factory(cluster.address)
                try:
                    out = work / f"{model}-{name.replace(' ', '-')}.sqlite"
                    row = measure(name, source, images, spec["layers"], args.steps, make, out)
                finally:
                    if cluster is not None:
                        cluster.stop()
                row["model"] = model
                rows.append(row)
                line = f"{model:9} {name:12} {row['rate']:7.2f} img/s  wall {row['wall']:6.1f} s"
                print(f"{line}  peak/worker {row['peak']:6.0f} MiB", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n{cores} CPU cores, n_steps={args.steps}\n")
    print("| model | images | run on | images/s (steady) | wall (with start-up) | peak/worker |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['model']} | {row['images']} | {row['config']} | {row['rate']:.2f} | "
              f"{row['wall']:.1f} s | {row['peak']:.0f} MiB |")  # fmt: skip


def _two_local(source: ModelSource) -> list:
    os.environ["OMP_NUM_THREADS"] = "1"  # read by the workers as they start
    try:
        executors = [LocalExecutor(max_workers=1) for _ in range(2)]
        for executor in executors:  # start both now, while the variable is set
            executor.submit(source, "info").result(timeout=300)
        return executors
    finally:
        del os.environ["OMP_NUM_THREADS"]


def _ray_factory(address: str) -> Callable[[], list]:
    def make() -> list:
        from explainer.compute.ray_executor import RayExecutor

        return [RayExecutor(address)]

    return make


if __name__ == "__main__":
    main()
