#!/usr/bin/env bash
# schemathesis against a live `ceccm server`, driven by the project's own OpenAPI document
# (api/openapi.yaml), as the administrator. Bounded and reproducible: a fixed number of
# examples per operation and a fixed seed.
#
#   scripts/schemathesis.sh        env: CECCM_ST_EXAMPLES (default 20), CECCM_ST_SEED (1)
#
# Pass 1: every operation, every check (no 5xx, responses as the spec says, schema-valid
# requests accepted, schema-invalid ones refused, auth enforced).
# Pass 2: the generic object routes once per kind (scripts/schemathesis-kinds.toml says why).
# Installs schemathesis with pip when missing. Exits non-zero on any failure or error.
set -euo pipefail
cd "$(dirname "$0")/.."

version=4.32.5
examples=${CECCM_ST_EXAMPLES:-20}
seed=${CECCM_ST_SEED:-1}

if ! python3 -c "import schemathesis, sys; sys.exit(schemathesis.__version__ != '$version')" 2>/dev/null; then
  echo "==> installing schemathesis $version"
  python3 -m pip install -q "schemathesis==$version" 2>/dev/null ||
    python3 -m pip install -q --break-system-packages "schemathesis==$version"
fi
st=$(command -v schemathesis || echo "$(python3 -m site --user-base)/bin/schemathesis")

cargo build -q --bin ceccm
ceccm=${CARGO_TARGET_DIR:-target}/debug/ceccm

work=$(mktemp -d)
server_pid=
cleanup() {
  if [ -n "$server_pid" ]; then kill "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT
"$ceccm" server --listen 127.0.0.1:0 --data-dir "$work/data" >"$work/server.out" 2>"$work/server.err" &
server_pid=$!
deadline=$((SECONDS + 60))
url=
until [ -n "$url" ]; do
  url=$(sed -n 's/^ceccm listening on //p' "$work/server.out" 2>/dev/null || true)
  if [ "$SECONDS" -ge "$deadline" ] || ! kill -0 "$server_pid" 2>/dev/null; then
    echo "ceccm server did not start:" >&2
    cat "$work/server.err" >&2
    exit 1
  fi
  sleep 0.2
done
token=$(cat "$work/data/admin.token")

status=0
run() {
  local name=$1
  shift
  local log="$work/$name.log"
  # From the scratch directory: schemathesis keeps state in ./.schemathesis.
  if (cd "$work" && "$st" "$@" --url "$url" -H "Authorization: Bearer $token" --max-examples "$examples" \
    --seed "$seed" --generation-database none --request-timeout 10 --workers 1 --no-color) >"$log" 2>&1; then
    outcome=ok
  else
    outcome=FAILED
    status=1
    cat "$log"
  fi
  echo "schemathesis $name: $(grep -E '[0-9]+ generated' "$log" | tail -n 1 | sed 's/^ *//'): $outcome"
}

root=$PWD
run "all operations" --config-file "$root/scripts/schemathesis-all.toml" run "$root/api/openapi.yaml" --checks all \
  --phases examples,coverage,fuzzing
for kind in regions applications datasets tasks events; do
  CECCM_ST_PLURAL=$kind run "objects ($kind)" --config-file "$root/scripts/schemathesis-kinds.toml" \
    run "$root/api/openapi.yaml" --include-path-regex '^/api/v1/\{plural\}'
done
exit $status
