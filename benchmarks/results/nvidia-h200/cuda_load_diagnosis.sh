set -x
tar -xzf .gpu_deps/dev.tgz -C / --skip-old-files; L=/usr/lib/x86_64-linux-gnu; [ -e $L/libcrypto.so ] || ln -sf libcrypto.so.3 $L/libcrypto.so
export PYTHONUNBUFFERED=1
(python3 -m pip install -q --no-index --no-build-isolation --no-deps -e . > $OUT/install.log 2>&1; echo install rc $? >> $OUT/install.log) &
timeout 170 python3 .gpu_deps/diag.py /tmp/diag compile 2>&1 | grep -v Warning | tail -5
wait
tail -2 $OUT/install.log
timeout 200 python3 .gpu_deps/diag.py /tmp/diag load 2>&1 | tee $OUT/diag.log
objdump -h /tmp/diag/raw.so > $OUT/raw_sections.txt; objdump -h /tmp/diag/sealed.so > $OUT/sealed_sections.txt; readelf -lW /tmp/diag/sealed.so > $OUT/sealed_segments.txt; readelf -lW /tmp/diag/raw.so > $OUT/raw_segments.txt
