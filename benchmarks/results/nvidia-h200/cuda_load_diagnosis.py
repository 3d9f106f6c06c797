"""Why does loading a CUDA artifact segfault? Compile once, then load in isolated subprocesses."""
import os, shutil, subprocess, sys, time, textwrap
from pathlib import Path
sys.path.insert(0, "python")
W = Path(sys.argv[1]); W.mkdir(parents=True, exist_ok=True)
mode = sys.argv[2] if len(sys.argv) > 2 else "compile"

if mode == "compile":
    import torch, imagepiece, imagepiece.export as ex
    real_write = ex.write_metadata
    def spy(staged, metadata):
        shutil.copy(staged, W / "raw.so")
        return real_write(staged, metadata)
    ex.write_metadata = spy
    model = imagepiece.create_model("deit_tiny_patch16_224", "imagepiece")
    t = time.time()
    report = ex.compile_artifact(model, W / "sealed.so", device="cuda", dtype="fp32", batch=2)
    print(f"compiled in {time.time()-t:.1f}s", report.size_bytes if hasattr(report, "size_bytes") else "", flush=True)
    sys.exit(0)

CASES = {
 "A_raw_path_init": "torch.cuda.init(); r=R(str(W/'raw.so'),1,'cuda:0'); print(r.run([x])[0].shape)",
 "B_raw_path_noinit": "r=R(str(W/'raw.so'),1,'cuda:0'); print(r.run([x.cuda()])[0].shape)",
 "C_sealed_path_init": "torch.cuda.init(); r=R(str(W/'sealed.so'),1,'cuda:0'); print(r.run([x])[0].shape)",
 "D_raw_memfd_init": "torch.cuda.init(); fd=os.memfd_create('m'); os.write(fd, (W/'raw.so').read_bytes()); r=R(f'/proc/self/fd/{fd}',1,'cuda:0'); print(r.run([x])[0].shape)",
 "E_export_load_init": "torch.cuda.init(); from imagepiece.export import load; m=load(W/'sealed.so'); print(m(x).shape)",
 "F_export_load_noinit": "from imagepiece.export import load; m=load(W/'sealed.so'); print(m(x.cuda()).shape)",
 "G_ip_runtime": "torch.cuda.init(); import ip_runtime; r=ip_runtime.Runtime(str(W/'sealed.so')); print(r.run(x).shape)",
}
PRE = "import os, sys; sys.path.insert(0,'python'); from pathlib import Path; import torch; W=Path(%r); R=torch._C._aoti.AOTIModelContainerRunnerCuda; x=(torch.randn(2,3,224,224).cuda() if 'noinit' not in %r else torch.randn(2,3,224,224)); "
failed = []
for name, body in CASES.items():
    code = PRE % (str(W), name) + body
    (W / f"{name}.py").write_text(code)
    try:
        r = subprocess.run([sys.executable, "-X", "faulthandler", str(W / f"{name}.py")], capture_output=True, text=True, timeout=90)
        rc, out = r.returncode, (r.stdout + r.stderr)
    except subprocess.TimeoutExpired:
        rc, out = "timeout", ""
    print(f"== {name}: rc {rc}\n" + textwrap.indent(out[-1500:], "   "), flush=True)
    if rc != 0:
        failed.append(name)
gdb = shutil.which("cuda-gdb")
for name in failed[:1]:
    if gdb:
        r = subprocess.run([gdb, "-batch", "-ex", "run", "-ex", "bt 25", "-ex", "info sharedlibrary", "--args", sys.executable, str(W / f"{name}.py")],
                           capture_output=True, text=True, timeout=100)
        out = r.stdout + r.stderr
        keep = [l for l in out.splitlines() if l.startswith("#") or "SIG" in l or "memfd" in l or "raw.so" in l or "sealed" in l]
        print(f"== cuda-gdb {name}:\n" + "\n".join(keep[:60]), flush=True)
