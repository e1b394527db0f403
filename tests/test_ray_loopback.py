"""Ray's servers listen on loopback only: every listening socket of the test cluster's processes
(GCS, raylets, agents, the actors' workers, this driver) and of a Ray that ``--ray local``
starts is bound to 127.0.0.0/8 or ::1, never to 0.0.0.0, :: or an outward address.

The cluster comes from ``scripts/ray_cluster.sh`` (see ``tests/test_ray_executor.py``: skipped
without it, failed under ``CI=true``); its processes are found by the mark that script puts in
their environment (``EXPLAINER_TEST_RAY_DIR``), or else by their names.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_ray_executor import BUILTIN, WAIT_S, cluster_address

REPO = Path(__file__).resolve().parents[1]
DIR_ENV = "EXPLAINER_TEST_RAY_DIR"
_LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp*


def _address(hex_address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """A local address of /proc/net/tcp or tcp6 (hex, in the host's byte order per 32 bits)."""
    raw = bytes.fromhex(hex_address)
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    return ipaddress.ip_address(words)


def listening_sockets() -> dict[int, tuple[str, int]]:
    """Every listening TCP socket of this network namespace: inode -> (address, port)."""
    found = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 10 or fields[3] != _LISTEN:
                continue
            host, port = fields[1].split(":")
            found[int(fields[9])] = (str(_address(host)), int(port, 16))
    return found


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def _processes() -> dict[int, tuple[int, bytes, bytes]]:
    """pid -> (parent pid, command line, environment) of every process that can be read."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_bytes()
            parent = int(stat.rsplit(b")", 1)[1].split()[1])
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            try:
                environ = Path(f"/proc/{entry}/environ").read_bytes()
            except OSError:
                environ = b""
        except (OSError, IndexError, ValueError):
            continue
        table[int(entry)] = (parent, cmdline, environ)
    return table


def _with_descendants(chosen: set[int], table: dict[int, tuple[int, bytes, bytes]]) -> set[int]:
    chosen = set(chosen)
    grown = True
    while grown:
        grown = False
        for pid, (parent, _, _) in table.items():
            if parent in chosen and pid not in chosen:
                chosen.add(pid)
                grown = True
    return chosen


def cluster_processes() -> set[int]:
    """The test cluster's processes (and those below them): by the mark of
    ``scripts/ray_cluster.sh``, else every Ray process of the machine."""
    table = _processes()
    folder = os.environ.get(DIR_ENV, "").strip()
    if folder:
        marker = b"EXPLAINER_RAY_CI=" + folder.encode()
        chosen = {
            pid
            for pid, (_, cmdline, environ) in table.items()
            if folder.encode() in cmdline or marker in environ.split(b"\0")
        }
    else:
        import ray

        package = str(Path(ray.__file__).parent).encode()
        chosen = {
            pid
            for pid, (_, cmdline, _) in table.items()
            if cmdline.startswith(b"ray::") or package in cmdline
        }
    return _with_descendants(chosen, table)


def sockets_of(pids: set[int]) -> dict[int, list[tuple[str, int]]]:
    """pid -> the listening sockets it holds (address, port)."""
    listening = listening_sockets()
    held: dict[int, list[tuple[str, int]]] = {}
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inode = int(target[len("socket:[") : -1])
                if inode in listening:
                    held.setdefault(pid, []).append(listening[inode])
    return held


def _outside(held: dict[int, list[tuple[str, int]]]) -> list[str]:
    return [
        f"pid {pid} ({_name(pid)}) on {address}:{port}"
        for pid, sockets in sorted(held.items())
        for address, port in sockets
        if not is_loopback(address)
    ]


def _name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()[-60:]
    except OSError:
        return "?"


def test_the_sockets_are_read_right():
    assert _address("0100007F") == ipaddress.ip_address("127.0.0.1")
    assert _address("00000000") == ipaddress.ip_address("0.0.0.0")
    assert _address("0000000000000000FFFF00000100007F") == ipaddress.ip_address("::ffff:127.0.0.1")
    assert is_loopback("127.0.0.2") and is_loopback("::1") and is_loopback("::ffff:127.0.0.1")
    assert not is_loopback("0.0.0.0") and not is_loopback("::") and not is_loopback("10.1.2.3")


def test_every_server_of_the_cluster_listens_on_loopback_only():
    from explainer.compute.ray_executor import RayExecutor

    address = cluster_address()
    executor = RayExecutor(address, actors=2, timeout_s=WAIT_S)
    try:
        assert executor.submit(BUILTIN, "score_shape").result(timeout=WAIT_S) == (8,)
        actors = {status.pid for status in executor.workers()}
        pids = cluster_processes() | {os.getpid()}  # this driver's own server too
        held = sockets_of(pids)
    finally:
        executor.shutdown()
    assert len(actors) == 2 and actors <= set(held), "each actor's worker serves (gRPC)"
    ports = {port for sockets in held.values() for _, port in sockets}
    assert int(address.rsplit(":", 1)[1]) in ports  # the GCS is among them
    assert sum(len(sockets) for sockets in held.values()) >= 7  # GCS, 2 raylets x 2, 2 actors
    outside = _outside(held)
    assert outside == [], "listening beyond loopback: " + "; ".join(outside)


_LOCAL_RUN = """
import json, os
from explainer.compute import ModelSource
from explainer.compute.ray_executor import RayExecutor
from test_ray_loopback import _outside, _processes, _with_descendants, sockets_of
executor = RayExecutor("local", actors=1, timeout_s={wait})
try:
    shape = executor.submit(ModelSource("builtin"), "score_shape").result(timeout={wait})
    pids = _with_descendants({{os.getpid()}}, _processes())
    held = sockets_of(pids)
    count, outside = sum(map(len, held.values())), _outside(held)
finally:
    executor.shutdown()
print(json.dumps({{"shape": list(shape), "count": count, "outside": outside}}))
"""


def _needs_ray() -> None:
    if importlib.util.find_spec("ray") is None:
        why = 'ray is not installed (pip install -e ".[ray]")'
        if os.environ.get("CI", "").strip().lower() in ("1", "true", "yes"):
            pytest.fail(f"CI runs the Ray tests, but {why}.")
        pytest.skip(why)


def test_a_local_ray_listens_on_loopback_only():
    _needs_ray()
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_ADDRESS")}  # fmt: skip
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO), str(REPO / "tests"), *filter(None, [env.get("PYTHONPATH")])]
    )
    done = subprocess.run(
        [sys.executable, "-c", _LOCAL_RUN.format(wait=WAIT_S)], cwd=REPO, env=env,
        capture_output=True, text=True, timeout=2 * WAIT_S,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["shape"] == [8]
    assert report["count"] >= 4  # the GCS, the raylet's two servers, the actor's worker
    assert report["outside"] == [], "listening beyond loopback: " + "; ".join(report["outside"])


def test_a_node_on_loopback_needs_the_single_machine_mode(tmp_path):
    """Without RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 Ray would read 127.0.0.1 as the machine's
    outward address: the node command refuses, with a sentence and no traceback."""
    _needs_ray()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    folder = tmp_path / "node"
    done = subprocess.run(
        [sys.executable, "-m", "explainer.compute.ray_connect", "node", "127.0.0.1:9", str(folder)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=WAIT_S,
    )  # fmt: skip
    assert done.returncode == 1
    assert "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0" in done.stderr
    assert "Traceback" not in done.stderr and not folder.exists()
