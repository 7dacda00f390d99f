#!/usr/bin/env python
"""Time inference and training steps of a DAB-DETR config on random images.

Prints numbers, asserts nothing: performance targets live here, not in the tests.

    python tools/benchmark.py --config-file configs/dab_detr_r50.py --height 800 --width 1333
    python tools/benchmark.py --config-file configs/dab_detr_r50.py --device cuda --amp --batch-size 2
    python tools/benchmark.py --config-file configs/dab_detr_r50.py --onnxruntime --skip-train
"""
import argparse
import time

import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage


def random_inputs(batch_size, height, width, num_classes, generator):
    inputs = []
    for _ in range(batch_size):
        inst = Instances((height, width))
        xy = torch.rand(8, 2, generator=generator) * torch.tensor([width, height]) * 0.6
        wh = (torch.rand(8, 2, generator=generator) * 0.3 + 0.05) * torch.tensor([width, height])
        inst.gt_boxes = Boxes(torch.cat([xy, xy + wh], 1))
        inst.gt_classes = torch.randint(0, num_classes, (8,), generator=generator)
        image = torch.randint(0, 256, (3, height, width), generator=generator, dtype=torch.uint8)
        inputs.append({"image": image, "instances": inst, "height": height, "width": width})
    return inputs


def timed(fn, iters, warmup, device):
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", default="configs/common/models/dab_detr_r50.py")
    parser.add_argument("--height", type=int, default=800)
    parser.add_argument("--width", type=int, default=1333)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", action="store_true", help="autocast (fp16 on CUDA, bf16 on CPU)")
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--onnxruntime", action="store_true",
                        help="also export to ONNX (verified) and time onnxruntime on the first image (CPU, and CUDA where present)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides key=value")
    args = parser.parse_args()

    cfg = LazyConfig.apply_overrides(LazyConfig.load(args.config_file), args.opts)
    device = torch.device(args.device)
    model = instantiate(cfg.model).to(device)
    g = torch.Generator().manual_seed(0)
    inputs = random_inputs(args.batch_size, args.height, args.width, model.num_classes, g)
    amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16

    def infer():
        with torch.no_grad(), torch.autocast(device.type, dtype=amp_dtype, enabled=args.amp):
            model(inputs)

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp and device.type == "cuda")

    def train_step():
        with EventStorage(), torch.autocast(device.type, dtype=amp_dtype, enabled=args.amp):
            losses = model(inputs)
        optimizer.zero_grad()
        scaler.scale(sum(losses.values())).backward()
        scaler.step(optimizer)
        scaler.update()

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"config {args.config_file}  device {name}  input {args.batch_size}x3x{args.height}x{args.width}  amp {args.amp}")
    model.eval()
    t = timed(infer, args.iters, args.warmup, device)
    print(f"inference: {t * 1000:.1f} ms/batch, {args.batch_size / t:.2f} images/s")
    if args.onnxruntime:
        from dab_detr.export.runtime_benchmark import time_onnxruntime  # optional packages: imported on demand

        for provider, t_ort in time_onnxruntime(model, inputs[0]["image"][None].float(), args.iters, args.warmup).items():
            print(f"onnxruntime {provider}: {t_ort * 1000:.1f} ms/image (same image; PyTorch fp32 above)")
        model.to(device)
    if not args.skip_train:
        model.train()
        t = timed(train_step, args.iters, args.warmup, device)
        print(f"training step: {t * 1000:.1f} ms/iter, {args.batch_size / t:.2f} images/s")
    if device.type == "cuda":
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
