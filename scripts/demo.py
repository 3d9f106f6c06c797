#!/usr/bin/env python
"""The main job on its embedded default: DeiT-S ImagePiece (random weights) classifies a batch.

Prints the token schedule, the top-5 classes of each image, and eager speed next to plain DeiT-S.
"""
from __future__ import annotations

import argparse
import sys

import timm
import torch

import imagepiece
from imagepiece.environment import machine_info
from imagepiece.timing import summarize, time_interleaved


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="deit_small_patch16_224", choices=sorted(imagepiece.ARCHS))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    info = machine_info()
    print(f"machine: {info['cpu']} ({info['cpu_cores']} cores), torch {info['torch']}, timm {info['timm']}")
    torch.manual_seed(0)
    plain = timm.create_model(args.arch).eval()
    model = imagepiece.create_model(args.arch, "imagepiece")
    model.load_state_dict(plain.state_dict())
    print(f"\n{args.arch} + ImagePiece (random weights; pass a checkpoint to create_model for real ones)")
    print(imagepiece.format_schedule(model.token_schedule()))

    images = torch.randn(args.batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        probabilities = model(images).softmax(-1)
        top5 = probabilities.topk(5)
        print(f"\ntop-5 classes for {args.batch} random images:")
        for index, (p, c) in enumerate(zip(top5.values, top5.indices)):
            print(f"  image {index}: " + "  ".join(f"{int(k):>4} ({float(v):.3f})" for k, v in zip(c, p)))
        samples = time_interleaved({"plain": lambda: plain(images), "imagepiece": lambda: model(images)}, args.repeats)
    plain_ms, ip_ms = summarize(samples["plain"])["p50_ms"], summarize(samples["imagepiece"])["p50_ms"]
    print(f"\neager CPU fp32, batch {args.batch}, median of {args.repeats}:")
    print(f"  plain DeiT           {plain_ms:8.1f} ms  {args.batch / plain_ms * 1e3:7.1f} img/s")
    print(f"  ImagePiece DeiT      {ip_ms:8.1f} ms  {args.batch / ip_ms * 1e3:7.1f} img/s  ({plain_ms / ip_ms:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
