#!/usr/bin/env bash
# For a GPU machine without network access (the `device` tool's machines): installs the wheels
# carried in .wheels/ (`make wheelhouse` fetches them where there is network) into the machine's own
# CUDA torch environment, builds fastssl there (csrc/cuda/ too), then
#
#   bash scripts/gpu_session.sh tests [pytest args]   # the GPU tests (pytest -m gpu)
#   bash scripts/gpu_session.sh bench [OP ...]        # the GPU benchmarks of those ops (default: all)
#
# and copies the logs and the benchmarks' CSVs (one tar: the device returns at most 8 files) to
# $OUT (default gpu-out/). A device call:
#   run(command="bash scripts/gpu_session.sh bench ntxent info_nce", carry=[".wheels"])
# Back here, untar the CSVs over benchmarks/results/ and redraw a plot with
#   python -m benchmarks.harness benchmarks/results/ntxent.csv DEVICE
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
if [ -d .wheels ]; then
	"$PY" -m pip install --quiet --no-index --find-links .wheels --no-deps \
		faiss-cpu pytorch-metric-learning inf-cl torchattacks || exit 1
fi
MAX_JOBS=${MAX_JOBS:-16} "$PY" -m pip install --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1 \
	|| { tail -40 "$OUT/build.log"; exit 1; }
"$PY" -m fastssl info | tee "$OUT/info.txt"
what=${1:-tests}
shift || true
case "$what" in
tests)
	"$PY" -m pytest -m gpu -q -p no:cacheprovider "$@" 2>&1 | tee "$OUT/test-gpu.log"
	rc=${PIPESTATUS[0]}
	;;
bench)
	"$PY" -m fastssl bench "$@" 2>&1 | tee "$OUT/bench.log"
	rc=${PIPESTATUS[0]}
	tar -cf "$OUT/results.tar" benchmarks/results/*.csv
	;;
*)
	echo "usage: $0 tests|bench [args]" >&2
	exit 2
	;;
esac
exit "$rc"
