#!/usr/bin/env bash
# The checks to run when a GPU is lent (about 15 minutes of device time, rarely): under 12 minutes on one H100.
#
#   bash benchmarks/gpu_suite.sh [OUT_DIR]          # on the GPU machine, from the repository root
#   bash benchmarks/gpu_suite.sh --tiny [OUT_DIR]   # the same steps on CPU with tiny settings (seconds; tested)
#
# 1. metanetwork training-step throughput (every case of benchmarks/metanet_throughput.py);
# 2. capture cost against a plain step and torch.func (benchmarks/capture.py);
# 3. the learned optimizers' step cost against Adam (benchmarks/lopt_step.py);
# 4. the most informative claim cell that fits: curvature, GradMetaNet++ at b = 128 on 2000 networks (the
#    paper preset's zoo), stopped on validation (patience 10), cut at 6 minutes (its finished cells are kept);
# 5. how both GradMetaNets' cost grows with the set size, the base width and depth (benchmarks/metanet_scaling.py),
#    cut at 2.5 minutes.
# Everything lands in OUT_DIR (default results/gpu-suite) as JSON with provenance, plus a log. Needs torch with
# CUDA, tqdm, safetensors, matplotlib and scikit-learn (the device image has them); runs from the source tree.
# Through this project's device tool (files come back from $OUT, eight at most), one call:
#   bash benchmarks/gpu_suite.sh /tmp/gpu-suite; tar czf $OUT/gpu-suite.tgz -C /tmp gpu-suite
# then unpack it into results/ here and commit it.
set -uo pipefail
TINY=0
if [ "${1:-}" = "--tiny" ]; then TINY=1; shift; fi
OUT_DIR=${1:-results/gpu-suite}
PYTHON=${PYTHON:-python3}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$OUT_DIR"
if [ "$TINY" = 1 ]; then
    DEVICE=cpu
    THROUGHPUT=(--cases gradmetanet-b128 dws-inr --repeats 1)
    CAPTURE=(--widths 32 --batch 16 --repeats 2)
    LOPT=(--repeats 3 --hidden 8)
    CURVATURE=(--preset tiny --set "models=['gradmetanet++']")
    CELL_LIMIT=120
    SCALING=(--set-sizes 4 8 --widths 4 8 --depths 1 2 --at-width 8 --at-set-size 8 --side-width 8 --repeats 1)
else
    DEVICE=cuda
    THROUGHPUT=(--repeats 10)
    CAPTURE=()
    LOPT=()
    CURVATURE=(--preset paper --set "models=['gradmetanet++']" --set "train_sizes=[2000]" --set seeds=1
               --set patience=10)
    CELL_LIMIT=360
    SCALING=(--repeats 3)
fi
status=0
step() {   # step NAME COMMAND...: run, log, remember a failure, go on
    local name=$1; shift
    echo "== $name: $*" | tee -a "$OUT_DIR/suite.log"
    local start=$SECONDS
    "$@" 2>&1 | tee -a "$OUT_DIR/suite.log"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc after $((SECONDS - start)) s" | tee -a "$OUT_DIR/suite.log"
    [ "$rc" = 0 ] || status=1
}
step throughput "$PYTHON" benchmarks/metanet_throughput.py --device $DEVICE "${THROUGHPUT[@]}" \
    --label "gpu suite ($DEVICE)" --out "$OUT_DIR/metanet_throughput_$DEVICE.json"
step capture "$PYTHON" benchmarks/capture.py --device $DEVICE "${CAPTURE[@]}" --out "$OUT_DIR/capture_$DEVICE.json"
step lopt-step "$PYTHON" benchmarks/lopt_step.py --device $DEVICE "${LOPT[@]}" --out "$OUT_DIR/lopt_step_$DEVICE.json"
step curvature-gmnpp-b128 timeout $CELL_LIMIT "$PYTHON" -m gradmetanet.cli run curvature "${CURVATURE[@]}" \
    --device $DEVICE --overwrite --out "$OUT_DIR/curvature-gmnpp"
step scaling timeout 150 "$PYTHON" benchmarks/metanet_scaling.py --device $DEVICE "${SCALING[@]}" \
    --out "$OUT_DIR/metanet_scaling_$DEVICE.json"
exit $status
