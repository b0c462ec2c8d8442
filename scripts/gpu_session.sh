#!/usr/bin/env bash
# One GPU session in one command, for a GPU machine without network access (the `device` tool's
# machines, 10 minutes a command): installs the wheels carried in .wheels/ (`make wheelhouse`
# fetches them where there is network) into the machine's own CUDA torch environment, builds
# fastssl there (csrc/cuda/ too), then runs, each stage under its own time limit so that one hang
# cannot eat the window:
#
#   1. `fastssl selftest` (every op on every GPU backend against the reference)  SELFTEST_S (150 s)
#   2. `pytest -m gpu`, each test under pytest-timeout's TEST_TIMEOUT_S (60 s)    TESTS_S (150 s)
#   3. the GPU benchmarks, the time left shared out between the ops               BENCH_S (120 s)
#
#   bash scripts/gpu_session.sh                   # all three (the build takes up to BUILD_S, 100 s)
#   bash scripts/gpu_session.sh selftest|tests|bench [args]   # one stage (pytest args, bench ops)
#
# Everything lands in $OUT (default gpu-out/), at most 8 files (what the device returns): info.txt,
# build.log, selftest.txt (the table), test-gpu.log, bench.log, results.tar (benchmarks/results/*.csv)
# and summary.txt (each stage's exit status and time). A device call:
#   run(command="bash scripts/gpu_session.sh", carry=[".wheels"], timeout_s=600)
# Back here, untar the CSVs over benchmarks/results/ and redraw a plot with
#   python -m benchmarks.harness benchmarks/results/ntxent.csv DEVICE
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT=${OUT:-gpu-out}
BUILD_S=${BUILD_S:-100}
SELFTEST_S=${SELFTEST_S:-150}
TESTS_S=${TESTS_S:-150}
TEST_TIMEOUT_S=${TEST_TIMEOUT_S:-60}
BENCH_S=${BENCH_S:-120}
mkdir -p "$OUT"
unset TRITON_INTERPRET # the GPU stages run the compiled kernels
summary="$OUT/summary.txt"
: >"$summary"

# stage NAME LIMIT_S LOG CMD...: runs CMD under `timeout`, tees its output to LOG, records the status
stage() {
	local name=$1 limit=$2 log=$3 start rc
	shift 3
	start=$(date +%s)
	echo "=== $name (limit ${limit} s)" | tee -a "$log"
	timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$log"
	rc=${PIPESTATUS[0]}
	[ "$rc" = 124 ] && echo "=== $name: stopped at its ${limit} s limit" | tee -a "$log"
	echo "$name rc=$rc $(($(date +%s) - start)) s" | tee -a "$summary"
	return "$rc"
}

if [ -d .wheels ]; then
	"$PY" -m pip install --quiet --no-index --find-links .wheels --no-deps \
		faiss-cpu pytorch-metric-learning inf-cl torchattacks pytest-timeout || exit 1
fi
export MAX_JOBS=${MAX_JOBS:-16}
if [ "${BUILD:-1}" != 0 ]; then # BUILD=0: fastssl is already built in this environment
	stage build "$BUILD_S" "$OUT/build.log" "$PY" -m pip install --no-build-isolation --no-deps -e . >/dev/null \
		|| { tail -40 "$OUT/build.log"; exit 1; }
fi
"$PY" -m fastssl info | tee "$OUT/info.txt"

run_selftest() {
	stage selftest "$SELFTEST_S" "$OUT/selftest.log" "$PY" -m fastssl selftest --out "$OUT/selftest.txt" "$@"
}

run_tests() {
	local per_test=()
	"$PY" -c "import pytest_timeout" 2>/dev/null && per_test=(--timeout "$TEST_TIMEOUT_S")
	stage tests "$TESTS_S" "$OUT/test-gpu.log" "$PY" -m pytest -m gpu -q -p no:cacheprovider "${per_test[@]}" "$@"
}

run_bench() {
	local ops=("$@") deadline rc=0 i left
	[ ${#ops[@]} -eq 0 ] && mapfile -t ops < <("$PY" -c "from benchmarks.suite import available; print(*available(), sep='\n')")
	deadline=$(($(date +%s) + BENCH_S))
	for i in "${!ops[@]}"; do # each op gets an equal share of the time left
		left=$(((deadline - $(date +%s)) / (${#ops[@]} - i)))
		[ "$left" -lt 5 ] && { echo "bench ${ops[$i]}: no time left" | tee -a "$summary"; rc=1; continue; }
		stage "bench ${ops[$i]}" "$left" "$OUT/bench.log" "$PY" -m fastssl bench "${ops[$i]}" || rc=1
	done
	tar -cf "$OUT/results.tar" benchmarks/results/*.csv
	return "$rc"
}

what=${1:-all}
shift || true
case "$what" in
all)
	rc=0
	run_selftest || rc=1
	run_tests || rc=1
	run_bench || rc=1
	;;
selftest) run_selftest "$@"; rc=$? ;;
tests) run_tests "$@"; rc=$? ;;
bench) run_bench "$@"; rc=$? ;;
*)
	echo "usage: $0 [all|selftest|tests|bench] [args]" >&2
	exit 2
	;;
esac
cat "$summary"
exit "$rc"
