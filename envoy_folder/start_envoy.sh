#!/usr/bin/env bash
# Start one OpenFL envoy holding an MVTec AD shard.
#
#   envoy_folder/start_envoy.sh NAME CONFIG [DIRECTOR_HOST] [DIRECTOR_PORT] [CERT_DIR]
#
# NAME: this envoy's unique name. CONFIG: its shard config (e.g. shard_config.yaml);
# a relative data_folder inside it is taken relative to CONFIG's folder.
# DIRECTOR_HOST defaults to localhost, DIRECTOR_PORT to 50050. With CERT_DIR
# (holding root_ca.crt, NAME.crt and NAME.key, as written by `patchsvdd certs`;
# the certificate's common name must be NAME) the envoy talks mutual TLS.
# The data and the director's address (and, with TLS, one handshake, so that a
# refused certificate reads as a sentence) are checked before the envoy
# registers. Working folder: $PATCHSVDD_WORKDIR if set, else this folder.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$here/../scripts/common.sh"

if [ $# -lt 2 ]; then
  echo "usage: $0 NAME CONFIG [DIRECTOR_HOST] [DIRECTOR_PORT] [CERT_DIR]" >&2
  exit 2
fi
name="$1"
config="$(realpath -m "$2")"
host="${3:-localhost}"
port="${4:-50050}"
patchsvdd_check_config envoy "$config"
tls=(--disable-tls)
if [ -n "${5:-}" ]; then
  certs="$(realpath -m "$5")"
  patchsvdd_check_certs "$certs" "$name"
  "$(patchsvdd_python)" -m patchsvdd.system.tls check "$host" "$port" "$certs/root_ca.crt" "$certs/$name.crt" "$certs/$name.key" || exit 2
  tls=(-rc "$certs/root_ca.crt" -pk "$certs/$name.key" -oc "$certs/$name.crt")
else
  "$(patchsvdd_python)" -m patchsvdd.system.tls reach "$host" "$port" || exit 2
fi
export PATCHSVDD_ENVOY_CONFIG_DIR="$(dirname "$config")"
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"
patchsvdd_enter_workdir "$here" "$config"
patchsvdd_run_envoy "$name" "$host" "$port" -ec "$PATCHSVDD_CONFIG" "${tls[@]}"
