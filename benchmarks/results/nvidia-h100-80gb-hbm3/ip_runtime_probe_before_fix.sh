set -x
S=$(date +%s); el() { echo "[t+$(( $(date +%s) - S ))s] $*"; }
tar -xzf .gpu_deps/dev.tgz -C / --skip-old-files; L=/usr/lib/x86_64-linux-gnu; [ -e $L/libcrypto.so ] || ln -sf libcrypto.so.3 $L/libcrypto.so
export PYTHONUNBUFFERED=1 IMAGEPIECE_TEST_ARTIFACT_CACHE=/tmp/ipcache
PY=/opt/torch/.venv/bin/python; [ -x $PY ] || PY=python3
mkdir -p $OUT/r
(PYTHONPATH=python $PY benchmarks/results/nvidia-h100-80gb-hbm3/ip_runtime_probe_before_fix.py /tmp/probe compile > $OUT/r/compile.log 2>&1) &
CP=$!
$PY -m pip install --no-index --no-build-isolation --no-deps -v -e . > $OUT/r/install.log 2>&1; el install rc $?
timeout 430 $PY scripts/benchmark.py suite --device cuda --arch deit_small_patch16_224 --repeats 30 --min-seconds 1 --dtype bf16 --batch 1 8 64 256 --variants plain imagepiece --paths eager aoti --out $OUT/r/bench > $OUT/r/bench.log 2>&1 &
BP=$!
timeout 240 $PY -m pytest -q tests/test_cuda.py -k "half" -rA -p no:cacheprovider > $OUT/r/half_tests.log 2>&1 &
HP=$!
wait $CP; el compile done; tail -2 $OUT/r/compile.log
timeout 200 $PY benchmarks/results/nvidia-h100-80gb-hbm3/ip_runtime_probe_before_fix.py /tmp/probe probe > $OUT/r/probe.log 2>&1; el probe done
B=$(ls build/*/libimagepiece_runtime.so | head -1); C=$(ls build/*/_core*.so python/ip_runtime/_core*.so 2>/dev/null | head -1)
for f in $B $C /tmp/probe/ti.so; do echo "== $f"; readelf -d $f | grep -E "NEEDED|RPATH|RUNPATH"; echo "defined std:: text symbols: $(nm -D --defined-only $f 2>/dev/null | grep -c ' [TW] _ZNSt')"; done > $OUT/r/elf.txt 2>&1
wait $HP; el half tests done
wait $BP; el bench rc $?
nvidia-smi > $OUT/r/nvidia-smi.txt 2>&1
tar czf $OUT/r.tgz -C $OUT r && rm -rf $OUT/r
el end
