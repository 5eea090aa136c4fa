#!/usr/bin/env bash
# Start the study's MLflow tracking server on the Ray head; the cluster YAMLs run it after
# `ray start --head`. Idempotent: a healthy server is left alone, so re-running `ray up` is safe.
#
#   setup_head.sh ARTIFACT_ROOT     shared storage for artifacts: /shared/... (NFS) or s3://bucket/prefix
#
# Environment (all optional):
#   MLFLOW_HOST     bind address (default 127.0.0.1). The only MLflow client is the Tune driver,
#                   which `ray job submit` runs on this head, so loopback is enough; the UI is
#                   reached through an ssh tunnel. Set it to the head's private IP only if a client
#                   elsewhere in the cluster must log, and keep the port closed outside the cluster.
#   MLFLOW_PORT     default 5000
#   MLFLOW_HOME     where the sqlite store, log and pid file live (default ~/mlflow, the head's
#                   local disk: sqlite's locking is not safe on NFS/EFS)
#   MLFLOW_WORKERS  server worker processes (default 2)
set -euo pipefail

die() { echo "setup_head.sh: $*" >&2; exit 2; }

[ $# -eq 1 ] || die "usage: setup_head.sh ARTIFACT_ROOT (e.g. /shared/segdist/mlflow-artifacts or s3://BUCKET/segdist/mlflow-artifacts)"
artifacts=$1
host=${MLFLOW_HOST:-127.0.0.1}
port=${MLFLOW_PORT:-5000}
home=${MLFLOW_HOME:-$HOME/mlflow}
workers=${MLFLOW_WORKERS:-2}

case "$host" in
  0.0.0.0 | "::" | "[::]" | "*" | "")
    die "refusing to bind MLflow to all interfaces ('$host'): use 127.0.0.1 or the head's private IP" ;;
esac
case "$artifacts" in
  *REPLACE_*) die "artifact root '$artifacts' is a placeholder: edit it in the cluster YAML" ;;
  s3://* | gs://* | /*) ;;
  *) die "artifact root '$artifacts' must be an absolute shared path or an s3:// URI" ;;
esac

url="http://$host:$port"
healthy() { python3 -c "import urllib.request,sys; urllib.request.urlopen(sys.argv[1] + '/health', timeout=3)" "$url" 2>/dev/null; }

if healthy; then
  echo "MLflow already serving at $url"
  exit 0
fi

mkdir -p "$home"
if [[ "$artifacts" == /* ]]; then
  mkdir -p "$artifacts" || die "cannot create $artifacts: is the shared storage mounted on the head?"
fi

# setsid + nohup: the server must outlive the launcher's ssh session.
setsid nohup mlflow server --host "$host" --port "$port" --workers "$workers" \
  --backend-store-uri "sqlite:///$home/mlflow.db" \
  --artifacts-destination "$artifacts" \
  >"$home/server.log" 2>&1 </dev/null &
echo $! >"$home/server.pid"

for _ in $(seq 1 120); do
  if healthy; then
    echo "MLflow serving at $url (store sqlite:///$home/mlflow.db, artifacts $artifacts)"
    exit 0
  fi
  if ! kill -0 "$(cat "$home/server.pid")" 2>/dev/null; then
    break
  fi
  sleep 1
done
echo "setup_head.sh: MLflow did not come up at $url; last lines of $home/server.log:" >&2
tail -n 20 "$home/server.log" >&2 || true
exit 1
