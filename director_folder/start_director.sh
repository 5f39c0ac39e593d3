#!/usr/bin/env bash
# Start the OpenFL director of the Patch SVDD federation (no TLS; see start_director_with_tls.sh).
#
#   director_folder/start_director.sh [CONFIG]
#
# CONFIG defaults to director_config.yaml beside this script. Works from any
# current folder. The director keeps experiment archives and logs in its working
# folder: $PATCHSVDD_WORKDIR if set, else this folder.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$here/../scripts/common.sh"

config="$(realpath -m "${1:-$here/director_config.yaml}")"
patchsvdd_check_config director "$config"
patchsvdd_enter_workdir "$here" "$config"
exec "$(patchsvdd_fx)" director start --disable-tls -c "$PATCHSVDD_CONFIG"
