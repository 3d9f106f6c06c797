# Eager DeiT-S (plain and ImagePiece; random weights: timm init, seed 0, as tests/artifacts.py "plain") cast to bf16/fp16 against fp32 eager, on the
# 256 scene images of tests/test_cuda.py (seed 2). Run from the repository root: .venv/bin/python <this file>.
import sys, torch, torch.nn.functional as F
sys.path.insert(0, "tests")
import imagepiece
from artifacts import random_state_dict
from inputs import scene_images
torch.set_num_threads(2)
images = scene_images(256, seed=2)
for method in ("plain", "imagepiece"):
    model = imagepiece.create_model("deit_small_patch16_224", method)
    model.load_state_dict(random_state_dict("deit_small_patch16_224", "plain"), strict=False)
    model.eval()
    with torch.inference_mode():
        ref = torch.cat([model(c) for c in images.split(64)])
        for dt in (torch.bfloat16, torch.float16):
            half = __import__("copy").deepcopy(model).to(dt)
            out = torch.cat([half(c.to(dt)) for c in images.split(64)]).float()
            agree = (out.argmax(1) == ref.argmax(1)).float().mean().item()
            cos = F.cosine_similarity(out, ref).mean().item()
            top2 = ref.topk(2, 1).values; margin = (top2[:, 0] - top2[:, 1]); spread = ref.std(1)
            print(f"{method} eager {dt}: top-1 agreement {agree:.4f}, mean cosine {cos:.6f}, median top-1 margin / logit std {(margin/spread).median():.4f}", flush=True)
