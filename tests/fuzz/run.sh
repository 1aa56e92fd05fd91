#!/usr/bin/env bash
# Builds every fuzz target once and runs each for SECONDS (default 20) on a copy of its
# committed seed corpus, so the fuzzer's additions never land in tests/fuzz/corpus.
# Exits non-zero on the first crash, leak, timeout or OOM, printing the reproducing input.
#   tests/fuzz/run.sh [SECONDS] [TARGET...]
# See docs/fuzzing.md.
set -euo pipefail

seconds="${1:-20}"
shift || true
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
cd "$root"

# cargo-fuzz itself builds on stable; only its instrumentation needs no nightly with `-s none`
# (no sanitizer): coverage guidance works, memory errors cannot happen without `unsafe`.
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "== installing cargo-fuzz"
    cargo install --locked cargo-fuzz
fi

targets=("$@")
if [ "${#targets[@]}" -eq 0 ]; then
    mapfile -t targets < <(cargo fuzz list --fuzz-dir tests/fuzz)
fi

# One build for every target. `-s none` keeps stable rustc usable; cargo-fuzz's release build
# keeps debug assertions (overflow checks, debug_assert!) on; 16 codegen units build several
# times faster than its default of 1 on two cores, for slightly slower fuzzing.
fuzz=(--fuzz-dir tests/fuzz -s none --codegen-units 16)
echo "== building ${#targets[@]} fuzz targets"
cargo fuzz build "${fuzz[@]}"

work="$here/target/corpus-run"
failed=()
for t in "${targets[@]}"; do
    rm -rf "${work:?}/$t"
    mkdir -p "$work/$t"
    if [ -d "$here/corpus/$t" ]; then
        cp -R "$here/corpus/$t/." "$work/$t/"
    fi
    echo "== $t: ${seconds}s"
    log="$work/$t.log"
    # -rss_limit_mb and -timeout turn memory blow-ups and hangs into failures too.
    if ! cargo fuzz run "${fuzz[@]}" "$t" "$work/$t" -- \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 \
        -print_final_stats=1 >"$log" 2>&1; then
        tail -n 60 "$log"
        artifact="$(grep -oE 'Test unit written to [^ ]+' "$log" | tail -n 1 | cut -d' ' -f5- || true)"
        echo "!! $t failed; input: ${artifact:-see $log}"
        echo "   reproduce: cargo fuzz run --fuzz-dir tests/fuzz -s none --codegen-units 16 $t ${artifact:-<input>}"
        failed+=("$t")
    else
        grep -E 'stat::number_of_executed_units|Done [0-9]+ runs' "$log" | tail -n 1 || true
    fi
done

if [ "${#failed[@]}" -gt 0 ]; then
    echo "fuzzing found failures in: ${failed[*]}"
    exit 1
fi
echo "fuzzing: ${#targets[@]} targets ran ${seconds}s each without a failure"
