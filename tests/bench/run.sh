#!/usr/bin/env bash
# `make bench`: runs every benchmark against the release binaries and gathers the Markdown
# sections into target/bench/report.md (the figures BENCHMARKS.md quotes).
#   WEFT_BENCH_ONLY="xds lb"   run only these (xds, proxy, lb, balance)
#   WEFT_BENCH_QUICK=1         tiny sizes: checks the benchmarks work, numbers mean nothing
set -euo pipefail
cd "$(dirname "$0")/../.."

out=target/bench
mkdir -p "$out"
export WEFT_BIN_PROFILE=release
export WEFT_BENCH_OUT="$PWD/$out"
only="${WEFT_BENCH_ONLY:-xds proxy lb balance}"
quick=()
[[ "${WEFT_BENCH_QUICK:-}" == 1 ]] && quick=(--quick)

# wrk drives the saturation runs (Debian's package).
if ! command -v wrk >/dev/null 2>&1; then
  if [[ $(id -u) == 0 ]]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends wrk >/dev/null \
      || { apt-get update >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends wrk >/dev/null; }
  else
    echo "wrk is missing: sudo apt-get install wrk" >&2
    exit 1
  fi
fi

# 10,000 xDS clients need 10,000 sockets on each side (the control plane inherits this).
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
echo "open files limit: $(ulimit -n)"

{
  echo "## Machine"
  echo
  echo "- date: $(date -u +%Y-%m-%dT%H:%MZ)"
  echo "- commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (with local changes)')"
  echo "- cpu: $(nproc) x $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')"
  echo "- memory: $(free -g | awk '/Mem:/ {print $2}') GiB; kernel $(uname -r)"
  echo "- rustc: $(rustc --version)"
  echo "- envoy: $(.venv/bin/envoy --version 2>/dev/null | grep -o 'version: [^ ]*' | head -1)"
  echo "- wrk: $(wrk -v 2>&1 | head -1)"
  echo "- command: make bench${WEFT_BENCH_ONLY:+ (WEFT_BENCH_ONLY=$WEFT_BENCH_ONLY)}${WEFT_BENCH_QUICK:+ (quick)}"
  echo
} > "$out/machine.md"

sections=(machine)
for b in $only; do
  echo "== $b"
  start=$SECONDS
  case "$b" in
    xds | proxy | lb)
      "target/release/weft-bench-$b" "${quick[@]}"
      ;;
    balance)
      # Criterion (sidecar/balance/benches): table builds and picks. Its full report lands in
      # target/criterion; the bencher format gives one line per benchmark to tabulate.
      cargo bench -q -p weft-balance --bench hashing --bench picking -- --noplot --output-format bencher 2>/dev/null | tee "$out/balance.txt"
      {
        echo "## Load balancer micro-benchmarks (\`cargo bench -p weft-balance\`)"
        echo
        echo "| benchmark | time per iteration |"
        echo "|---|---|"
        awk '/^test .* bench:/ { ns = $5; gsub(",", "", ns); ns += 0;
               printf "| %s | %s |\n", $2, (ns >= 1e6 ? sprintf("%.2f ms", ns / 1e6) : (ns >= 1e3 ? sprintf("%.2f µs", ns / 1e3) : ns " ns")) }' "$out/balance.txt"
        echo
        cargo run -q --release -p weft-balance --example hash_stability
      } > "$out/balance.md"
      ;;
    *)
      echo "unknown benchmark $b (xds, proxy, lb, balance)" >&2
      exit 2
      ;;
  esac
  echo "== $b took $((SECONDS - start)) s"
  sections+=("$b")
done

for s in "${sections[@]}"; do
  [[ -f "$out/$s.md" ]] && { cat "$out/$s.md"; echo; }
done > "$out/report.md"
echo "report: $out/report.md"
