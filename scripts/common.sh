# Helpers shared by the director and envoy start scripts (sourced, not run).

# Find OpenFL's fx once, in the sourcing shell itself (so that a missing fx stops the script here with one
# line, not later in a $(...) subshell): this project's virtual environment first, else the one on PATH.
patchsvdd_require_fx() {
  local repo
  repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  if [ -x "$repo/.venv/bin/fx" ]; then PATCHSVDD_FX="$repo/.venv/bin/fx"
  elif command -v fx >/dev/null 2>&1; then PATCHSVDD_FX="$(command -v fx)"
  else echo "fx (OpenFL) not found: run 'make install' or activate the environment that has openfl==1.7.1" >&2; exit 2
  fi
  PATCHSVDD_PY="$(dirname "$PATCHSVDD_FX")/python"
}

# The fx command and the python of the same environment (found when this file is sourced).
patchsvdd_fx() { echo "$PATCHSVDD_FX"; }
patchsvdd_python() { echo "$PATCHSVDD_PY"; }

# Stop with one clear line when a YAML config is missing or malformed (ROLE: director or envoy).
patchsvdd_check_config() {
  "$(patchsvdd_python)" -m patchsvdd.system.configs "$1" "$2" || exit 2
}

# Working folder: $PATCHSVDD_WORKDIR if set, else the given default; created, absolute.
patchsvdd_workdir() {
  local dir="${PATCHSVDD_WORKDIR:-$1}"
  mkdir -p "$dir"
  realpath "$dir"
}

# OpenFL reads configs only from inside its working folder: copy CONFIG there when it is elsewhere.
patchsvdd_config_inside() {
  local config="$1" workdir="$2"
  case "$config" in
    "$workdir"/*) echo "$config" ;;
    *) cp "$config" "$workdir/$(basename "$config")"; echo "$workdir/$(basename "$config")" ;;
  esac
}

# Move into the working folder ($PATCHSVDD_WORKDIR, else DEFAULT_DIR); PATCHSVDD_CONFIG is then CONFIG's path there.
patchsvdd_enter_workdir() {
  local workdir
  workdir="$(patchsvdd_workdir "$1")"
  PATCHSVDD_CONFIG="$(patchsvdd_config_inside "$2" "$workdir")"
  cd "$workdir"
}

# Stop with one line when CERT_DIR lacks root_ca.crt, NODE.crt or NODE.key.
patchsvdd_check_certs() {
  local dir="$1" node="$2" f
  for f in root_ca.crt "$node.crt" "$node.key"; do
    if [ ! -f "$dir/$f" ]; then
      echo "TLS: $dir/$f not found (create certificates with: patchsvdd certs --out $dir ...)" >&2
      exit 2
    fi
  done
}

# Run `fx envoy start ARGS...` (with the site guard: patchsvdd.federated.openfl.fx and site_guard) for envoy NAME of the director at HOST:PORT, supervised so that it
# registers again after a director restart (waiting at most $PATCHSVDD_DIRECTOR_TIMEOUT s, default 600);
# when the director refuses the shard, say why in one line.
patchsvdd_run_envoy() {
  local name="$1" host="$2" port="$3"; shift 3
  local status
  PATCHSVDD_ENVOY_OUTPUT="$(mktemp)"
  trap 'rm -f "$PATCHSVDD_ENVOY_OUTPUT"' EXIT
  local out="$PATCHSVDD_ENVOY_OUTPUT"
  set +e
  "$(patchsvdd_python)" -m patchsvdd.system.supervise --director "$host:$port" \
    --director-timeout "${PATCHSVDD_DIRECTOR_TIMEOUT:-600}" -- \
    "$(patchsvdd_python)" -m patchsvdd.federated.openfl.fx envoy start -n "$name" -dh "$host" -dp "$port" "$@" 2>&1 | tee "$out"
  status=${PIPESTATUS[0]}
  set -e
  if [ "$status" -ne 0 ] && grep -q "was not accepted" "$out"; then
    echo "envoy $name: the director refused this shard: the shapes read from the data differ from the director's sample_shape/target_shape (or another envoy already uses the name $name)" >&2
  elif [ "$status" -ne 0 ] && grep -q "Failed to report shard info" "$out"; then
    echo "envoy $name: could not register with the director (see above); check host, port and TLS settings" >&2
  fi
  return "$status"
}

[ -n "${PATCHSVDD_WITHOUT_FX:-}" ] || patchsvdd_require_fx
