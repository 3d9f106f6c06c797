S=$(date +%s); el() { echo "[t+$(( $(date +%s) - S ))s] $*"; }
tar -xzf .gpu_deps/dev.tgz -C / --skip-old-files; L=/usr/lib/x86_64-linux-gnu; [ -e $L/libcrypto.so ] || ln -sf libcrypto.so.3 $L/libcrypto.so
export PYTHONUNBUFFERED=1
PY=/opt/torch/.venv/bin/python; [ -x $PY ] || PY=python3
mkdir -p $OUT/r
{ g++ --version | head -1; for f in libstdc++.so libstdc++.a; do echo "$f -> $(g++ -print-file-name=$f)"; done; ls -la /usr/lib/gcc/x86_64-linux-gnu/*/ | grep -i stdc; } > $OUT/r/toolchain.txt 2>&1
(PYTHONPATH=python timeout 150 $PY benchmarks/results/nvidia-h100-80gb-hbm3/ip_runtime_probe_after_fix.py /tmp/probe compile > $OUT/r/compile.log 2>&1) &
CP=$!
$PY -m pip install --no-index --no-build-isolation --no-deps -v -e . > $OUT/r/install.log 2>&1; el install rc $?
for f in build/*/libimagepiece_runtime.so build/*/_core*.so; do echo "== $f"; readelf -d $f | grep -E "NEEDED"; echo "defined std:: functions: $(nm -D --defined-only $f | grep -c ' [TW] _ZNSt')"; done > $OUT/r/elf.txt 2>&1
wait $CP; el compile done; tail -1 $OUT/r/compile.log
timeout 75 $PY benchmarks/results/nvidia-h100-80gb-hbm3/ip_runtime_probe_after_fix.py /tmp/probe probe > $OUT/r/probe.log 2>&1; el probe done
cat $OUT/r/toolchain.txt $OUT/r/elf.txt; grep -v "^   *$" $OUT/r/probe.log | cut -c1-200 | head -60
tar czf $OUT/r.tgz -C $OUT r && rm -rf $OUT/r
