# Start and stop a two-node Ray cluster for the dataset-mode tests (sourced by scripts/test).
#
# The cluster: a head node (`ray start --head`) and a second node on this machine, both with the
# node address 127.0.0.1, with token authentication and a private temporary folder. Its address
# is exported as EXPLAINER_TEST_RAY_ADDRESS, its folder as EXPLAINER_TEST_RAY_DIR.
# stop_ray_cluster stops only the processes of this cluster.
#
# Loopback only. Ray's servers (GCS, raylets with their object managers, workers, dashboard
# agent, metrics export) listen on 127.0.0.1 when the node's address is a loopback name (Ray's
# is_localhost: 127.0.0.1, ::1, localhost) and on every interface (0.0.0.0) for any other
# address, 127.0.0.2 included; Ray has no setting for the address they bind. On Linux Ray also
# replaces 127.0.0.1, in --node-ip-address and in the cluster's address, by the machine's
# outward address, unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (exported here, so the tests'
# drivers keep 127.0.0.1 too). With it, `ray start --address` refuses to add a node, so the
# second node starts from Python as `ray start --address` does
# (explainer.compute.ray_connect.start_node, shared with benchmarks/bench_batch.py). The
# dashboard is off and its host is 127.0.0.1 anyway.

RAY_CLUSTER_REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

free_port() {
  python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

stop_ray_cluster() {
  # Every process whose command line names this cluster's folder or whose environment holds
  # its EXPLAINER_RAY_CI mark, and every process below those (Ray renames its workers, which hides both), found before any is
  # stopped: TERM, then KILL what is left after 15 s.
  [[ -n ${RAY_CI_DIR:-} && -d ${RAY_CI_DIR:-} ]] || return 0
  python - "$RAY_CI_DIR" "$$" <<'PY' || true
import os, signal, sys, time

folder, shell = sys.argv[1].encode(), int(sys.argv[2])
marker = b"EXPLAINER_RAY_CI=" + folder
mine = {os.getpid(), os.getppid(), shell}
table = {}
for entry in os.listdir("/proc"):
    if not entry.isdigit():
        continue
    pid = int(entry)
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            parent = int(stat.read().rsplit(b")", 1)[1].split()[1])
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            named = folder in cmdline.read()
        try:
            with open(f"/proc/{pid}/environ", "rb") as environ:
                named = named or marker in environ.read().split(b"\0")
        except OSError:
            pass
    except (OSError, IndexError, ValueError):
        continue
    table[pid] = (parent, named)
chosen = {pid for pid, (_, named) in table.items() if named and pid not in mine}
grown = True
while grown:
    grown = False
    for pid, (parent, _) in table.items():
        if parent in chosen and pid not in chosen and pid not in mine:
            chosen.add(pid)
            grown = True
for how, wait in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
    alive = [p for p in chosen if os.path.exists(f"/proc/{p}")]
    for pid in alive:
        try:
            os.kill(pid, how)
        except OSError:
            pass
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        left = []
        for pid in chosen:
            try:
                with open(f"/proc/{pid}/stat", "rb") as stat:
                    if stat.read().rsplit(b")", 1)[1].split()[0] != b"Z":
                        left.append(pid)
            except OSError:
                pass
        if not left:
            break
        time.sleep(0.2)
print(f"Ray cluster stopped ({len(chosen)} processes).", file=sys.stderr)
PY
  rm -rf "$RAY_CI_DIR"
}

start_ray_cluster() {
  RAY_CI_DIR=$(mktemp -d /tmp/explainer-ray-ci.XXXXXX)
  trap stop_ray_cluster EXIT
  trap 'exit 130' INT TERM
  export RAY_USAGE_STATS_ENABLED=0
  export RAY_AUTH_MODE=token
  export RAY_AUTH_TOKEN_PATH="$RAY_CI_DIR/auth_token"
  export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
  python -c 'import secrets; print(secrets.token_hex(32))' > "$RAY_AUTH_TOKEN_PATH"
  chmod 600 "$RAY_AUTH_TOKEN_PATH"
  local port
  port=$(free_port)
  # EXPLAINER_RAY_CI marks the cluster's processes for stop_ray_cluster.
  EXPLAINER_RAY_CI="$RAY_CI_DIR" timeout 180 ray start --head \
    --node-ip-address=127.0.0.1 --port="$port" --num-cpus=1 \
    --include-dashboard=false --dashboard-host=127.0.0.1 --disable-usage-stats \
    --temp-dir="$RAY_CI_DIR/head" \
    --dashboard-agent-listen-port="$(free_port)" --metrics-export-port="$(free_port)" \
    > "$RAY_CI_DIR/head.log" 2>&1 || { cat "$RAY_CI_DIR/head.log"; return 1; }
  # The package's own tree (cwd first on sys.path for python -m), whatever is installed.
  (cd "$RAY_CLUSTER_REPO" && EXPLAINER_RAY_CI="$RAY_CI_DIR" timeout 180 \
    python -m explainer.compute.ray_connect node "127.0.0.1:$port" "$RAY_CI_DIR/node2" \
    --num-cpus=1 --agent-port="$(free_port)" --metrics-port="$(free_port)" \
    > "$RAY_CI_DIR/node2.log" 2>&1) || { cat "$RAY_CI_DIR/node2.log"; return 1; }
  export EXPLAINER_TEST_RAY_ADDRESS="127.0.0.1:$port"
  export EXPLAINER_TEST_RAY_NODES=2
  export EXPLAINER_TEST_RAY_DIR="$RAY_CI_DIR"
  echo "Ray cluster of 2 nodes at $EXPLAINER_TEST_RAY_ADDRESS (folder $RAY_CI_DIR)." >&2
}
