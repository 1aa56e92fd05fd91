#!/usr/bin/env bash
# CI's fuzz step: every target replays its committed seeds (every crash ever found among them)
# and then mutates them for SECONDS (default 10), WITHOUT coverage instrumentation.
#   tests/fuzz/smoke.sh [SECONDS]
#
# Why not cargo-fuzz here: its instrumented build of this workspace (envoy-types, kube,
# k8s-openapi) takes 10-25 minutes from cold on two cores, more than CI's whole budget for it.
# Built like this, in the main workspace's target directory with the same dev profile, the
# targets reuse the dependencies `make test` already built (about 1.5 minutes). libFuzzer still
# drives the inputs; it just gets no coverage feedback, so this catches regressions of what the
# seeds reach, not new paths. Real fuzzing is `make fuzz` (tests/fuzz/run.sh); docs/fuzzing.md.
# The per-input timeout is 30 s, not run.sh's 10 s: this is an unoptimised build. A fixed seed
# keeps CI's verdict a function of the commit; the search for new inputs is make fuzz's job.
set -euo pipefail

seconds="${1:-10}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
cd "$root"
export CARGO_TARGET_DIR="$root/target"

mapfile -t targets < <(sed -n 's/^name = "\(.*\)"$/\1/p' "$here/Cargo.toml" | grep -v '^weft-fuzz$')
echo "== building ${#targets[@]} fuzz targets (uninstrumented, dev profile)"
cargo build --manifest-path "$here/Cargo.toml" --bins

work="$root/target/fuzz-smoke"
failed=()
for t in "${targets[@]}"; do
    rm -rf "${work:?}/$t"
    mkdir -p "$work/$t/corpus" "$work/$t/artifacts"
    cp -R "$here/corpus/$t/." "$work/$t/corpus/"
    seeds=$(find "$work/$t/corpus" -type f | wc -l)
    log="$work/$t.log"
    if ! "$root/target/debug/$t" "$work/$t/corpus" -max_total_time="$seconds" -timeout=30 -seed=1 \
        -rss_limit_mb=2048 -artifact_prefix="$work/$t/artifacts/" >"$log" 2>&1; then
        tail -n 40 "$log"
        echo "!! $t failed; input in $work/$t/artifacts/ (see docs/fuzzing.md to reproduce)"
        failed+=("$t")
    else
        echo "ok: $t: $seeds seeds replayed, $(grep -oE 'Done [0-9]+ runs' "$log" | tail -n 1 | cut -d' ' -f2) inputs in ${seconds}s"
    fi
done

if [ "${#failed[@]}" -gt 0 ]; then
    echo "fuzz smoke: failures in ${failed[*]}"
    exit 1
fi
echo "fuzz smoke: ${#targets[@]} targets passed"
