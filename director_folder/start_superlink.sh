#!/usr/bin/env bash
# Start a Flower SuperLink: the director's role when the federation runs on Flower (docs/flower.md).
#
#   director_folder/start_superlink.sh [PORT] [CERT_DIR] [HOST]
#
# PORT defaults to 9093 (Flower's one port: Fleet, Control and Runtime APIs). With CERT_DIR (root_ca.crt,
# director.crt and director.key as written by `patchsvdd certs`) it serves mutual TLS (every client shows a
# certificate of root_ca.crt's authority), and admits only the SuperNodes whose keys (<site>.auth.pub) are in
# CERT_DIR: it registers them at start. Without CERT_DIR it
# serves plain HTTP on loopback only. HOST (default 127.0.0.1; 0.0.0.0 for every interface, with CERT_DIR)
# is where it listens. It runs no app code: the data scientist's process plays the ServerApp with the
# SuperExec secret this script keeps in the working folder ($PATCHSVDD_WORKDIR, else
# director_folder/superlink), superexec.secret. Uses the Flower environment (make flower-install).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$here/../scripts/common_flower.sh"

port="${1:-9093}"
certs=()
if [ -n "${2:-}" ]; then
  dir="$(realpath -m "$2")"
  patchsvdd_check_certs "$dir" director
  certs=(--certs "$dir")
fi
workdir="$(patchsvdd_workdir "$here/superlink")"
exec "$PATCHSVDD_FLOWER_PY" -m patchsvdd.federated.flower.nodes superlink --port "$port" --host "${3:-127.0.0.1}" \
  --workdir "$workdir" "${certs[@]}"
