#!/usr/bin/env bash
# Start one OpenFL envoy holding an MVTec AD shard (no TLS; see start_envoy_with_tls.sh).
#
#   envoy_folder/start_envoy.sh NAME CONFIG [DIRECTOR_HOST] [DIRECTOR_PORT]
#
# NAME: this envoy's unique name. CONFIG: its shard config (e.g. shard_config.yaml);
# a relative data_folder inside it is taken relative to CONFIG's folder.
# DIRECTOR_HOST defaults to localhost, DIRECTOR_PORT to 50050. The data and the
# director's address are checked before the envoy registers. Working folder: $PATCHSVDD_WORKDIR if set,
# else this folder (experiments are unpacked there).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$here/../scripts/common.sh"

if [ $# -lt 2 ]; then
  echo "usage: $0 NAME CONFIG [DIRECTOR_HOST] [DIRECTOR_PORT]" >&2
  exit 2
fi
name="$1"
config="$(realpath -m "$2")"
host="${3:-localhost}"
port="${4:-50050}"
patchsvdd_check_config envoy "$config"
"$(patchsvdd_python)" -m patchsvdd.tls reach "$host" "$port" || exit 2
export PATCHSVDD_ENVOY_CONFIG_DIR="$(dirname "$config")"
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"
patchsvdd_enter_workdir "$here" "$config"
patchsvdd_run_envoy "$name" "$host" "$port" --disable-tls -ec "$PATCHSVDD_CONFIG"
