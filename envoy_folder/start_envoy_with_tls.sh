#!/usr/bin/env bash
# Start one envoy with mutual TLS.
#
#   envoy_folder/start_envoy_with_tls.sh NAME CONFIG [DIRECTOR_HOST] [DIRECTOR_PORT] [CERT_DIR]
#
# CERT_DIR (default: envoy_folder/certs) holds root_ca.crt, NAME.crt and NAME.key,
# as written by `patchsvdd certs`; the certificate's common name must be NAME.
# Before starting, the director is contacted once over TLS so that a refused or
# untrusted certificate is reported in one sentence.
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
certs="$(realpath -m "${5:-$here/certs}")"
patchsvdd_check_config envoy "$config"
patchsvdd_check_certs "$certs" "$name"
"$(patchsvdd_python)" -m patchsvdd.tls check "$host" "$port" "$certs/root_ca.crt" "$certs/$name.crt" "$certs/$name.key" || exit 2
export PATCHSVDD_ENVOY_CONFIG_DIR="$(dirname "$config")"
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"
patchsvdd_enter_workdir "$here" "$config"
patchsvdd_run_envoy "$name" "$host" "$port" -ec "$PATCHSVDD_CONFIG" \
  -rc "$certs/root_ca.crt" -pk "$certs/$name.key" -oc "$certs/$name.crt"
