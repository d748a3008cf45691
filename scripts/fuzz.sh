#!/usr/bin/env bash
# Runs every cargo-fuzz target of fuzz/ for a bounded time on one core (libFuzzer's default:
# one process, one thread; -jobs would fork workers logging to files), starting from the
# committed corpus (fuzz/corpus/TARGET, read only: new inputs go to a scratch directory).
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]     default: 60 s, every target
#
# Needs cargo-fuzz (`cargo install cargo-fuzz --locked`; installed here when missing) and a
# nightly compiler; on stable, RUSTC_BOOTSTRAP=1 unlocks the sanitizer flags. A crash leaves
# its input in fuzz/artifacts/TARGET/ and fails the script. Prints one line per target:
# runs, seconds, and the outcome.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${1:-60}
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  targets=(manifest selector fits_cube tarsis)
fi

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "==> installing cargo-fuzz"
  cargo install cargo-fuzz --locked
fi
export RUSTC_BOOTSTRAP=1
# Its own target directory: sanitizer builds share nothing with the workspace's.
export CARGO_TARGET_DIR=${CECCM_FUZZ_TARGET_DIR:-$PWD/fuzz/target}

# Release build with debug assertions (-a): overflow checks stay on.
echo "==> building the fuzz targets"
cargo fuzz build -a

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
status=0
for t in "${targets[@]}"; do
  mkdir -p "$scratch/$t"
  log="$scratch/$t.log"
  start=$SECONDS
  # -max_len fits each target's inputs (FITS files are whole 2880-byte records); -timeout
  # flags slow inputs (superlinear parsing) as failures; -rss_limit_mb flags unbounded
  # allocations.
  case $t in
    fits_cube) max_len=65536 ;;
    tarsis) max_len=16384 ;;
    manifest) max_len=8192 ;;
    *) max_len=1024 ;;
  esac
  if cargo fuzz run -a "$t" "$scratch/$t" "fuzz/corpus/$t" -- \
    -max_total_time="$seconds" -max_len="$max_len" -timeout=10 \
    -rss_limit_mb=2048 -print_final_stats=1 >"$log" 2>&1; then
    outcome=ok
  else
    outcome="FAILED (the input is in fuzz/artifacts/$t/)"
    status=1
    # What failed and where, without libFuzzer's byte dump of the input.
    grep -E 'panicked at|ERROR: |SUMMARY: |^ +#[0-9]+ .* in (astro_fit|ceccm)|^ +[0-9]+: (astro_fit|ceccm)' "$log" |
      head -n 30 || true
  fi
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
  echo "fuzz $t: ${runs:-?} runs in $((SECONDS - start)) s: $outcome"
done
exit $status
