#!/usr/bin/env bash
# Start the director with mutual TLS.
#
#   director_folder/start_director_with_tls.sh [CONFIG] [CERT_DIR]
#
# CERT_DIR (default: director_folder/certs) holds root_ca.crt, director.crt and
# director.key, as written by `patchsvdd certs`. Only nodes with certificates
# from the same root authority are let in.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$here/../scripts/common.sh"

config="$(realpath -m "${1:-$here/director_config.yaml}")"
certs="$(realpath -m "${2:-$here/certs}")"
patchsvdd_check_config director "$config"
patchsvdd_check_certs "$certs" director
patchsvdd_enter_workdir "$here" "$config"
exec "$(patchsvdd_fx)" director start -c "$PATCHSVDD_CONFIG" \
  -rc "$certs/root_ca.crt" -pk "$certs/director.key" -oc "$certs/director.crt"
