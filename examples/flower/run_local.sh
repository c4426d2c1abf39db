#!/usr/bin/env bash
# run_local.sh: edgellm's split federated fine-tuning on Flower's *deployment* engine, every part of it on this
# machine, every Flower connection over TLS. What examples/flower/README.md does on several machines:
#
#   1. a local CA and a server certificate for 127.0.0.1/localhost (openssl), into a temporary folder;
#   2. without --topology: a tiny random llama (4 layers, the test suite's) and a topology for it, the device and
#      one edge server, whose link also uses TLS and a shared token;
#   3. the topology's edge servers (`edgellm node --topology T --name NAME`);
#   4. a SuperLink (`flower-superlink` with --ssl-ca-certfile/--ssl-certfile/--ssl-keyfile);
#   5. one SuperNode per device (`flower-supernode --root-certificates CA --node-config "partition-id=K ..."`);
#   6. the run config (`edgellm finetune --engine flower --print-run-config ...`) and `flwr run examples/flower`
#      on a Flower connection with the CA's certificate;
#   7. waits until the run finishes, checks that each training device wrote OUTPUT/client-K/adapter, prints a
#      summary of OUTPUT/flower/events.jsonl, and stops everything it started (also on failure or Ctrl-C).
#
# Usage: examples/flower/run_local.sh [--topology T.toml] [--output DIR] [--clients N] [--keep]
#                                     [-- EDGELLM_FINETUNE_ARGS...]
#
#   --topology T.toml  a split deployment whose nodes all listen on this machine (e.g. examples/local-3node.toml,
#                      after `make model`); default: the tiny model, built in the temporary folder (seconds)
#   --output DIR       the run folder (default: runs/flower-deploy-DATE-TIME)
#   --clients N        devices, one SuperNode each (default: 2)
#   --keep             keep the temporary folder (certificates, Flower home, run config, tiny model) and say where
#   -- ARGS            more `edgellm finetune` options, after the defaults (--task dates --steps 4
#                      --aggregate-every 2 --share per-client, and small batches for the tiny model): later wins
#
# Needs: `make setup` (the .venv with edgellm, Flower 1.42 and the test helpers the tiny model is built with)
# and openssl. Logs of every process: OUTPUT/deploy-logs/. Exit status 0 only when the run completed and wrote
# its adapters. Flower's telemetry and update check are off (FLWR_TELEMETRY_ENABLED=0,
# FLWR_DISABLE_UPDATE_CHECK=1); FLWR_HOME is the temporary folder, so ~/.flwr is left alone.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
VENV=${VENV:-$ROOT/.venv}

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'; }

TOPOLOGY="" OUTPUT="" CLIENTS=2 KEEP=0 EXTRA=()
while (($#)); do
  case $1 in
    --topology) TOPOLOGY=$(realpath "$2"); shift 2 ;;
    --output) OUTPUT=$2; shift 2 ;;
    --clients) CLIENTS=$2; shift 2 ;;
    --keep) KEEP=1; shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) echo "run_local.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
[[ -x $VENV/bin/edgellm && -x $VENV/bin/flower-superlink ]] || {
  echo "run_local.sh: no edgellm/Flower in $VENV: run \`make setup\` first (or set VENV)" >&2; exit 2; }
command -v openssl >/dev/null || { echo "run_local.sh: openssl is needed for the certificates" >&2; exit 2; }

# Flower starts its SuperExec, ServerApp and ClientApp processes by name: the venv's bin must be on PATH.
export PATH="$VENV/bin:$PATH" FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1
PY=$VENV/bin/python
OUTPUT=$(realpath -m "${OUTPUT:-runs/flower-deploy-$(date +%Y%m%d-%H%M%S)}")
LOGS=$OUTPUT/deploy-logs
mkdir -p "$LOGS"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/edgellm-flower.XXXXXX")
export FLWR_HOME=$WORK/flwr-home
PIDS=()

say() { printf '[run_local] %s\n' "$*" >&2; }

stop_all() {  # the processes started here, then what they started (Flower's SuperExec and app processes)
  local pid kids=() child
  for pid in "${PIDS[@]}"; do
    kids+=($(pgrep -P "$pid" || true))
    for child in $(pgrep -P "$pid" || true); do kids+=($(pgrep -P "$child" || true)); done
  done
  for pid in "${PIDS[@]}" "${kids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for _ in $(seq 50); do
    local alive=0
    for pid in "${PIDS[@]}" "${kids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    ((alive)) || break
    sleep 0.2
  done
  for pid in "${PIDS[@]}" "${kids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
}
cleanup() {
  local status=$?
  trap - EXIT INT TERM
  ((${#PIDS[@]})) && { say "stopping ${#PIDS[@]} processes"; stop_all; }
  if ((KEEP)); then say "kept $WORK"; else rm -rf "$WORK"; fi
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

start() {  # start NAME COMMAND...: in the background, output to LOGS/NAME.log
  local name=$1; shift
  "$@" >"$LOGS/$name.log" 2>&1 &
  PIDS+=($!)
}
wait_for() {  # wait_for NAME PATTERN SECONDS: until LOGS/NAME.log matches (the process must stay alive)
  local name=$1 pattern=$2 limit=$3 pid=${PIDS[-1]} t=0
  until grep -q -- "$pattern" "$LOGS/$name.log" 2>/dev/null; do
    if ! kill -0 "$pid" 2>/dev/null; then say "$name exited early; its log:"; tail -20 "$LOGS/$name.log" >&2; exit 1; fi
    ((t++ < limit * 5)) || { say "$name not ready after ${limit}s; its log:"; tail -20 "$LOGS/$name.log" >&2; exit 1; }
    sleep 0.2
  done
}
free_ports() {  # free_ports N: N distinct TCP ports on 127.0.0.1 that were free a moment ago
  "$PY" - "$1" <<'EOF'
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}

# 1. Certificates: a local CA, and the SuperLink's certificate (signed by it) for 127.0.0.1 and localhost.
CERTS=$WORK/certs
mkdir -p "$CERTS"
(
  cd "$CERTS"
  openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj "/CN=edgellm-flower-local-ca" \
    -keyout ca.key -out ca.crt 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" -keyout server.key -out server.csr 2>/dev/null
  printf '%s\n' "subjectAltName=IP:127.0.0.1,DNS:localhost" "basicConstraints=CA:FALSE" \
    "keyUsage=digitalSignature,keyEncipherment" "extendedKeyUsage=serverAuth" >server.ext
  openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 1 -extfile server.ext \
    -out server.crt 2>/dev/null
)
say "certificates in $CERTS (CA: ca.crt; SuperLink: server.crt/server.key, SAN 127.0.0.1, localhost)"

# 2. The tiny model and its topology (device + edge1; the edge link over TLS with a shared token).
DEFAULTS=(--task dates --steps 4 --aggregate-every 2 --share per-client)
if [[ -z $TOPOLOGY ]]; then
  say "building the tiny model in $WORK/model"
  read -r EDGE_PORT < <(free_ports 1)
  "$PY" - "$ROOT/tests" "$WORK" <<'EOF'
import sys
from pathlib import Path

sys.path.insert(0, sys.argv[1])
from conftest import make_tiny_chat_model, make_tiny_tokenizer  # the test suite's tiny llama and tokenizer

work = Path(sys.argv[2])
(work / "tokenizer").mkdir()
(work / "model").mkdir()
make_tiny_chat_model(work / "model", make_tiny_tokenizer(work / "tokenizer"))
EOF
  TOPOLOGY=$WORK/topology.toml
  cat >"$TOPOLOGY" <<EOF
# The tiny model split between the device (embedding, layer 0, head) and edge1 (layers 1-3).
[model]
name = "$WORK/model"
cuts = [1]
head = "device"

[deployment]
route = ["phone", "edge1"]
mode = "chain"
deadline_s = 30.0
token_env = "EDGELLM_TOKEN"

[deployment.tls]
cert = "certs/server.crt"
key = "certs/server.key"
ca = "certs/ca.crt"

[[nodes]]
name = "phone"
role = "device"

[[nodes]]
name = "edge1"
role = "edge"
address = "127.0.0.1:$EDGE_PORT"

[[links]]
between = ["phone", "edge1"]
profile = "6g"
codec = "none"
EOF
  DEFAULTS+=(--task-examples 200 --batch-size 2 --seq-len 64 --lr 5e-3 --lora-rank 4)
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fi

# The topology's servers, and the variable its nodes read their shared token from (a fresh one when unset).
read -r TOKEN_ENV SERVERS < <("$PY" - "$TOPOLOGY" <<'EOF'
import sys
from edgellm.deploy.topology import load_topology

t = load_topology(sys.argv[1])
token = t.security.token
names = [n.name for n in t.servers] + [n.name for n in t.nodes if n.replica_of is not None]
print(token.value if token is not None and token.kind == "env" else "-", *names)
EOF
)
if [[ $TOKEN_ENV != - && -z ${!TOKEN_ENV:-} ]]; then
  export "$TOKEN_ENV=$("$PY" -c 'import secrets; print(secrets.token_hex(16))')"
  say "$TOKEN_ENV is not set: the edge servers and the devices share a fresh random token"
fi

# 3. The run config first: a bad option fails here, before anything starts.
"$VENV/bin/edgellm" finetune --engine flower --print-run-config --no-launch --topology "$TOPOLOGY" \
  --output "$OUTPUT" --clients "$CLIENTS" "${DEFAULTS[@]}" "${EXTRA[@]}" >"$WORK/run-config.toml"
say "run config: $WORK/run-config.toml (run folder $OUTPUT)"

# 4. The edge servers.
for name in $SERVERS; do
  start "$name" edgellm node --topology "$TOPOLOGY" --name "$name" --checkpoint-dir "$OUTPUT/checkpoints"
  wait_for "$name" '"event": "ready"' 300
  say "edge server $name ready"
done

# 5. The SuperLink: Fleet, Control and Runtime APIs on one HTTPS port. No `uv sync` of the app's dependencies
#    (edgellm and Flower are installed already; this machine may be offline).
read -r LINK_PORT NODE_PORTS < <(free_ports $((CLIENTS + 1)))
start superlink flower-superlink --ssl-ca-certfile "$CERTS/ca.crt" --ssl-certfile "$CERTS/server.crt" \
  --ssl-keyfile "$CERTS/server.key" --host 127.0.0.1 --port "$LINK_PORT" --disable-runtime-dependency-installation
wait_for superlink "Uvicorn running on https://" 60
say "SuperLink on https://127.0.0.1:$LINK_PORT"

# 6. One SuperNode per device: partition-id K is device K. Each serves its own ClientApp runtime API (--port).
k=0
for port in $NODE_PORTS; do
  start "supernode-$k" flower-supernode --superlink "127.0.0.1:$LINK_PORT" --root-certificates "$CERTS/ca.crt" \
    --port "$port" --node-config "partition-id=$k num-partitions=$CLIENTS"
  wait_for "supernode-$k" "SuperNode ID" 60
  k=$((k + 1))
done
say "$CLIENTS SuperNodes connected"

# 7. The Flower connection (FLWR_HOME/config.toml) and the run.
mkdir -p "$FLWR_HOME"
cat >"$FLWR_HOME/config.toml" <<EOF
[superlink]
default = "local-tls"

[superlink.local-tls]
address = "127.0.0.1:$LINK_PORT"
root-certificates = "$CERTS/ca.crt"
EOF
START=$SECONDS
RUN_ID=$(flwr run "$HERE" local-tls --run-config "$WORK/run-config.toml" --format json |
  "$PY" -c 'import json, sys; r = json.load(sys.stdin); print(r["run-id"] if r.get("success") else "")')
[[ -n $RUN_ID ]] || { say "flwr run did not start the run"; exit 1; }
say "run $RUN_ID started; waiting for it (flwr ls local-tls --run-id $RUN_ID)"
STATUS=""
until [[ $STATUS == finished* ]]; do
  sleep 3
  STATUS=$(flwr ls local-tls --run-id "$RUN_ID" --format json |
    "$PY" -c 'import json, sys; print(json.load(sys.stdin)["runs"][0]["status"])')
  ((SECONDS - START < 1800)) || { say "run not finished after 30 min"; exit 1; }
done
say "run $RUN_ID: $STATUS after $((SECONDS - START)) s"
flwr log "$RUN_ID" local-tls --show >"$LOGS/serverapp.log" 2>&1 || true

# 8. The result.
"$PY" - "$OUTPUT" "$STATUS" <<'EOF'
import json, sys
from pathlib import Path

out, status = Path(sys.argv[1]), sys.argv[2]
path = out / "flower" / "events.jsonl"
events = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
losses = {}
for e in events:
    if e["event"] == "step":
        losses.setdefault(e["client"], []).append(e["loss"])
rounds = [e for e in events if e["event"] == "round"]
print(f"events: {path} ({len(events)})")
for e in rounds:
    print(f"  round {e['round']}: devices {e['clients']} of {e['sampled']} sampled, {e['wall_s']:.1f} s, "
          f"{e['adapter_bytes']} adapter bytes")
for client, values in sorted(losses.items()):
    print(f"  device {client}: {len(values)} steps, loss {values[0]:.4f} -> {values[-1]:.4f}")
for e in events:
    if e["event"] == "dropped":
        print(f"  device {e['client']} dropped in round {e['round']}: {e['error']}")
adapters = [e["adapter"] for e in events if e["event"] == "done" and e.get("adapter")]
missing = [a for a in adapters if not (Path(a) / "adapter_model.safetensors").exists()]
for a in adapters:
    print(f"  adapter: {a}")
ok = status == "finished:completed" and rounds and adapters and not missing
print("OK: the run completed and wrote its adapters" if ok else f"FAILED: status {status}, adapters {adapters}, "
      f"missing {missing}; see {out / 'deploy-logs'}")
sys.exit(0 if ok else 1)
EOF
