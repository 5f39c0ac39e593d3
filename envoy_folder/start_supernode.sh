#!/usr/bin/env bash
# Start one site on Flower: a SuperNode and the process beside it that runs this project's app, and
# refuses any other (docs/flower.md).
#
#   envoy_folder/start_supernode.sh NAME CONFIG [SUPERLINK_HOST] [SUPERLINK_PORT] [CERT_DIR]
#
# NAME: this site's name. CONFIG: its shard config, the same YAML an OpenFL envoy reads (a relative
# data_folder is taken relative to CONFIG's folder). The SuperLink defaults to localhost:9093. With CERT_DIR
# (root_ca.crt, NAME.crt, NAME.key and NAME.auth, as written by `patchsvdd certs`) the SuperNode checks the
# SuperLink's certificate, shows its own (mutual TLS) and signs in with NAME.auth, whose public half the
# director must have registered; without it,
# plain HTTP (loopback only). The data are checked and decoded before the SuperNode connects. Working
# folder: $PATCHSVDD_WORKDIR if set, else envoy_folder/supernode_NAME. Uses the Flower environment
# (make flower-install). PATCHSVDD_LINK_TIMEOUT: seconds to keep trying to reach the SuperLink (default 600).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$here/../scripts/common_flower.sh"

if [ $# -lt 2 ]; then
  echo "usage: $0 NAME CONFIG [SUPERLINK_HOST] [SUPERLINK_PORT] [CERT_DIR]" >&2
  exit 2
fi
name="$1"
config="$(realpath -m "$2")"
"$PATCHSVDD_FLOWER_PY" -m patchsvdd.system.configs envoy "$config" flower || exit 2
certs=()
if [ -n "${5:-}" ]; then
  dir="$(realpath -m "$5")"
  for f in root_ca.crt "$name.crt" "$name.key" "$name.auth"; do
    if [ ! -f "$dir/$f" ]; then
      echo "TLS: $dir/$f not found (create it with: patchsvdd certs --out $dir ...)" >&2
      exit 2
    fi
  done
  certs=(--certs "$dir")
fi
workdir="$(patchsvdd_workdir "$here/supernode_$name")"
exec "$PATCHSVDD_FLOWER_PY" -m patchsvdd.federated.flower.nodes supernode --name "$name" --config "$config" \
  --superlink "${3:-localhost}:${4:-9093}" --workdir "$workdir" --link-timeout "${PATCHSVDD_LINK_TIMEOUT:-600}" \
  "${certs[@]}"
