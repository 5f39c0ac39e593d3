#!/usr/bin/env bash
# Start the OpenFL director of the Patch SVDD federation.
#
#   director_folder/start_director.sh [CONFIG] [CERT_DIR]
#
# CONFIG defaults to director_config.yaml beside this script. With CERT_DIR
# (holding root_ca.crt, director.crt and director.key, as written by
# `patchsvdd certs`) every connection is mutual TLS and only nodes with
# certificates from the same root authority are let in; without it, no TLS.
# Works from any current folder. The director keeps experiment archives and
# logs in its working folder: $PATCHSVDD_WORKDIR if set, else this folder.
# It runs OpenFL's fx through patchsvdd.federated.openfl.fx, which cuts OpenFL's fixed
# 10-second waits in the director process to 1 s (see that module).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$here/../scripts/common.sh"

config="$(realpath -m "${1:-$here/director_config.yaml}")"
patchsvdd_check_config director "$config"
tls=(--disable-tls)
if [ -n "${2:-}" ]; then
  certs="$(realpath -m "$2")"
  patchsvdd_check_certs "$certs" director
  tls=(-rc "$certs/root_ca.crt" -pk "$certs/director.key" -oc "$certs/director.crt")
fi
patchsvdd_enter_workdir "$here" "$config"
exec "$(patchsvdd_python)" -m patchsvdd.federated.openfl.fx director start -c "$PATCHSVDD_CONFIG" "${tls[@]}"
