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
 "P1_construct": "import ip_runtime; r=ip_runtime.Runtime(P); print('constructed', r.info['device_type'], flush=True)",
 "P2_run_cuda": "import ip_runtime; r=ip_runtime.Runtime(P); print(r.run(x.cuda()).shape)",
 "P3_run_host_numpy": "import ip_runtime; r=ip_runtime.Runtime(P); a=r.run(x.cuda()).cpu(); print(r.run(x).device, (r.run(x.numpy())-a.numpy()).__abs__().max())",
 "P4_graphs_vs_plain": "import ip_runtime; g=ip_runtime.Runtime(P, cuda_graphs=True); r=ip_runtime.Runtime(P)\nfor n in (1,2,5,8):\n  y=torch.randn(n,3,224,224,device='cuda'); print(n, (g.run(y)-r.run(y)).abs().max().item(), flush=True)",
 "P5_batcher_numpy": "import ip_runtime; r=ip_runtime.Runtime(P)\nwith ip_runtime.Batcher(r, max_delay_ms=0) as b: print(b.submit(x[0].numpy()).result(60).shape)",
 "P6_vs_export_load": "import ip_runtime; from imagepiece.export import load; m=load(P); r=ip_runtime.Runtime(P, instances=4); y=torch.randn(8,3,224,224,device='cuda'); print((m(y)-r.run(y)).abs().max().item())",
}
failed = []
for name, body in CASES.items():
    script = W / f"{name}.py"; script.write_text(PRE % str(W / "ti.so") + body)
    env = dict(os.environ)
    try:
        r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=45, env=env)
        rc, out = r.returncode, r.stdout + r.stderr
    except subprocess.TimeoutExpired as e:
        rc, out = "timeout", str(e.stdout or "") + str(e.stderr or "")
    out = "\n".join(l for l in out.splitlines() if "Warning" not in l and "warn(" not in l)
    print(f"== {name}: rc {rc}\n" + textwrap.indent(out[-1200:], "   "), flush=True)
    if rc != 0: failed.append(name)
gdb = shutil.which("gdb") or shutil.which("cuda-gdb")
print("gdb:", gdb, flush=True)
for name in [f for f in failed ][:1]:
    if not gdb: break
    try:
        r = subprocess.run([gdb, "-batch", "-ex", "run", "-ex", "bt 40", "-ex", "info sharedlibrary", "--args", sys.executable, str(W / f"{name}.py")],
                           capture_output=True, text=True, timeout=90)
        out = r.stdout + r.stderr
    except subprocess.TimeoutExpired as e:
        out = str(e.stdout or "")
    keep = [l[:600] for l in out.splitlines() if l.startswith("#") or "SIG" in l or "stdc++" in l or "imagepiece" in l or "ip_runtime" in l or "ti.so" in l or "memfd" in l]
    print(f"== gdb {name}:\n" + "\n".join(keep[:90]), flush=True)
