#!/usr/bin/env bash
# One GPU session, in order of value, within about eight minutes on a 16-core machine with one GPU
# (the tests took 55 s there on 2026-12-04, before the training tests were added):
# build the extension with its CUDA kernels (sm_90) for that machine's python3, run the tests
# marked `gpu` (every op family and both models, cuda and triton backends, against float64
# references) while other processes compile the Triton kernels and compiled references that the
# timings use, then time the ops and models eagerly (bench/gpu_ops.py), then the compiled
# references until the deadline. Everything lands in $OUT (default /tmp/gpu-session), eight
# files: setup.log (machine, build), gpu_tests.log, warm.log (the compilations), run.log (the
# timings), eager.json, compiled.json, gpu_ops.md (the tables), and the built extension gzipped
# under its own name (_C.<tag>.so.gz) for a second call that changes no C++ or CUDA source
# (REUSE_SO=that file).
#
#     OUT=/tmp/gpu bash bench/gpu_session.sh          # DEADLINE=seconds (default 420)
#     COMPILED=0 ...                                   # no compiled references (phase 3)
set -u
OUT=${OUT:-/tmp/gpu-session}
PY=${PY:-python3}
DEADLINE=${DEADLINE:-420}
COMPILED=${COMPILED:-1}
# the ops' compiled references; for the models also the compiled fused backends
COMPILED_IMPLS="reference-compiled cuda-compiled triton-compiled"
mkdir -p "$OUT"
T0=$(date +%s)
elapsed() { echo $(( $(date +%s) - T0 )); }
export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1 TORCHINDUCTOR_COMPILE_THREADS=4

{ nvidia-smi; nproc; free -g; $PY -c "import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__, torch.cuda.get_device_name(0))"; } > "$OUT/setup.log" 2>&1
tail -3 "$OUT/setup.log"
# Packages the machine may lack (nibabel; a setuptools ≥ 77, which reads the SPDX license field),
# as wheels in .whl/ when it cannot reach a package index; made where one is reachable with
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform any \
#     -d .whl "setuptools>=77,<82" nibabel
if [ -d .whl ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} || exit 1
fi

# fastseg.kernels lives in kernels/: an editable install maps it (as `make setup` does)
FASTSEG_BUILD_EXT=0 $PY -m pip install -q --no-index --no-deps --no-build-isolation -e . >> "$OUT/setup.log" 2>&1 \
  || { tail -20 "$OUT/setup.log"; exit 1; }
if [ -n "${REUSE_SO:-}" ]; then  # the _C.<tag>.so.gz of an earlier call
  gunzip -c "$REUSE_SO" > "fastseg/$(basename "$REUSE_SO" .gz)" || exit 1
else
  FASTSEG_CUDA=1 FASTSEG_CUDA_ARCHS=90 MAX_JOBS=16 $PY setup.py -q build_ext --inplace >> "$OUT/setup.log" 2>&1 \
    || { tail -40 "$OUT/setup.log"; exit 1; }
  so=$(ls fastseg/_C*.so); strip --strip-debug -o /tmp/_C.so "$so" && gzip -1 -c /tmp/_C.so > "$OUT/$(basename "$so").gz"
fi
echo "built: $(elapsed) s"

# Phase 1: the gpu tests, and in parallel the compilation of what phases 2 and 3 time: the
# Triton kernels first (needed by phase 2), the compiled references at a lower priority, stopped
# when the tests and the Triton compilation are done (phase 3 compiles what they did not reach).
timeout 300 $PY -m pytest tests -m gpu -n 8 -q -ra --continue-on-collection-errors > "$OUT/gpu_tests.log" 2>&1 &
tests=$!
warm=()
for i in 0 1 2 3; do
  timeout 200 $PY bench/gpu_ops.py --warm-only --shard $i/4 > "$OUT/warm$i.log" 2>&1 &
  warm+=($!)
done
for i in 0 1 2 3; do
  [ "$COMPILED" = 1 ] || break
  nice -n 10 timeout 200 $PY bench/gpu_ops.py --impls $COMPILED_IMPLS --warm-only --shard $i/4 \
    > "$OUT/warm-compiled$i.log" 2>&1 &
done
wait $tests; echo "gpu tests: exit $? at $(elapsed) s"; tail -25 "$OUT/gpu_tests.log"
wait "${warm[@]}"
pkill -f "gpu_ops.py --impls $COMPILED_IMPLS --warm-only"; wait; pkill -f compile_worker
for f in "$OUT"/warm*[0-9].log; do echo "== $f"; cat "$f"; done > "$OUT/warm.log"; rm -f "$OUT"/warm*[0-9].log
echo "warm: $(elapsed) s; failures: $(grep -c failed "$OUT/warm.log")"

# Phase 2: eager timings (and the GPU time of their kernels); phase 3: the compiled references,
# until the deadline.
$PY bench/gpu_ops.py --kernel-time --json "$OUT/eager.json" \
  --deadline $(( DEADLINE - 60 * COMPILED - $(elapsed) )) > "$OUT/run.log" 2>&1
echo "eager: $(elapsed) s"
if [ "$COMPILED" = 1 ]; then
  $PY bench/gpu_ops.py --impls $COMPILED_IMPLS --json "$OUT/compiled.json" \
    --deadline $(( DEADLINE - $(elapsed) )) >> "$OUT/run.log" 2>&1
  echo "compiled: $(elapsed) s"
fi
$PY bench/gpu_ops.py --render "$OUT/eager.json" "$OUT/compiled.json" --out "$OUT/gpu_ops.md"
grep -h "failed\|Error" "$OUT/run.log" | head -20
cat "$OUT/gpu_ops.md"
