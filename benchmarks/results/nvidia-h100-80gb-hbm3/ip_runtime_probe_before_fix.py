"""Why does ip_runtime crash on a CUDA artifact when imagepiece.export.load works? Compile once, probe in subprocesses."""
import os, shutil, subprocess, sys, time, textwrap
from pathlib import Path
W = Path(sys.argv[1]); W.mkdir(parents=True, exist_ok=True)
mode = sys.argv[2]
if mode == "compile":
    import torch, imagepiece, imagepiece.export as ex
    t = time.time()
    ex.compile_artifact(imagepiece.create_model("deit_tiny_patch16_224", "imagepiece"), W / "ti.so", device="cuda", max_batch=8)
    print(f"compiled in {time.time()-t:.1f}s", flush=True); sys.exit(0)
PRE = "import faulthandler, sys; faulthandler.enable(); import torch; P=%r; x=torch.randn(2,3,224,224); print('start', flush=True); "
CASES = {
 "P0_export_load": "from imagepiece.export import load; m=load(P); print(m(x.cuda()).shape)",
 "P1_construct": "import ip_runtime; r=ip_runtime.Runtime(P); print('constructed', flush=True); print(r.info['device_type'])",
 "P2_run_cuda": "import ip_runtime; r=ip_runtime.Runtime(P); print('constructed', flush=True); print(r.run(x.cuda()).shape)",
 "P3_run_host": "import ip_runtime; r=ip_runtime.Runtime(P); print('constructed', flush=True); print(r.run(x).shape)",
 "P4_graphs": "import ip_runtime; r=ip_runtime.Runtime(P, cuda_graphs=True); print('constructed', flush=True); print(r.run(x.cuda()).shape)",
 "P5_cuda_init_first": "torch.cuda.init(); torch.zeros(1).cuda(); import ip_runtime; r=ip_runtime.Runtime(P, device='cuda:0'); print('constructed', flush=True); print(r.run(x.cuda()).shape)",
 "P6_preload": "import ip_runtime; r=ip_runtime.Runtime(P); print('constructed', flush=True); print(r.run(x.cuda()).shape)",
 "P7_export_then_ip": "from imagepiece.export import load; m=load(P); print(m(x.cuda()).shape, flush=True); import ip_runtime; r=ip_runtime.Runtime(P); print('constructed', flush=True); print(r.run(x.cuda()).shape)",
}
failed = []
for name, body in CASES.items():
    script = W / f"{name}.py"; script.write_text(PRE % str(W / "ti.so") + body)
    env = dict(os.environ)
    if name == "P6_preload": env["LD_PRELOAD"] = "/usr/lib/x86_64-linux-gnu/libstdc++.so.6"
    try:
        r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60, env=env)
        rc, out = r.returncode, r.stdout + r.stderr
    except subprocess.TimeoutExpired as e:
        rc, out = "timeout", str(e.stdout or "") + str(e.stderr or "")
    out = "\n".join(l for l in out.splitlines() if "Warning" not in l and "warn(" not in l)
    print(f"== {name}: rc {rc}\n" + textwrap.indent(out[-1200:], "   "), flush=True)
    if rc != 0: failed.append(name)
gdb = shutil.which("gdb") or shutil.which("cuda-gdb")
print("gdb:", gdb, flush=True)
for name in [f for f in failed if f != "P6_preload"][:2]:
    if not gdb: break
    try:
        r = subprocess.run([gdb, "-batch", "-ex", "run", "-ex", "bt 40", "-ex", "info sharedlibrary", "--args", sys.executable, str(W / f"{name}.py")],
                           capture_output=True, text=True, timeout=90)
        out = r.stdout + r.stderr
    except subprocess.TimeoutExpired as e:
        out = str(e.stdout or "")
    keep = [l[:600] for l in out.splitlines() if l.startswith("#") or "SIG" in l or "stdc++" in l or "imagepiece" in l or "ip_runtime" in l or "ti.so" in l or "memfd" in l]
    print(f"== gdb {name}:\n" + "\n".join(keep[:90]), flush=True)
