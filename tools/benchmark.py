#!/usr/bin/env python
"""Time inference and training steps of a DAB-DETR config on random images.

Prints numbers, asserts nothing: performance targets live here, not in the tests.

    # ours against transformers' DabDetrForObjectDetection, interleaved, same input (CPU, fp32)
    python tools/benchmark.py --config-file configs/dab_detr_r50.py --compare transformers --threads 2
    # time per operator group (backbone, encoder, decoder, rest), fast and plain backbone
    python tools/benchmark.py --config-file configs/dab_detr_r50.py --groups --skip-train
    # the backbone through torch.compile (inference; falls back to eager if compilation fails)
    python tools/benchmark.py --config-file configs/dab_detr_r50.py --compare transformers --compile --skip-train
    # fp32 and bf16 inference, interleaved (says whether the CPU has native bf16)
    python tools/benchmark.py --config-file configs/dab_detr_r50.py --precision fp32,bf16 --skip-train
    # GPU: images/s and peak memory, mixed precision (fp16 on CUDA)
    python tools/benchmark.py --config-file configs/dab_detr_r50.py --device cuda --precision fp16 --batch-size 2
    # onnxruntime beside PyTorch on the same image (exports a verified ONNX file first)
    python tools/benchmark.py --config-file configs/dab_detr_r50.py --onnxruntime --skip-train

Every measurement runs ``--warmup`` untimed then ``--iters`` timed repetitions; with
``--compare`` (and with several ``--precision`` names) the runs alternate (ours, theirs, ours, ...) on the same input so that
machine noise hits both alike, and the medians are printed. GFLOP/s use fvcore's count of our
inference forward (``dab_detr.analysis``; one multiply-add = one FLOP); a training step is
counted as 3x the forward (the usual convention: the backward costs about twice the forward).
A training step is forward, loss, backward and one step of torch's fused AdamW (the optimizer of
``configs/common/optim.py``) for both models.
Peak memory: ``torch.cuda.max_memory_allocated`` on CUDA; on CPU the largest growth of the
process's resident memory during the call (sampled every 2 ms after returning freed memory to the
OS), an approximation.
CPU allocator (``--cpu-allocator``, ``dab_detr/cpu_allocator.py``): ``keep`` (the default, as the
training and prediction tools run) keeps freed memory in the process for reuse, for both models;
``system`` leaves glibc's defaults, which page-fault every large tensor in afresh; ``both`` times
every model under each setting, alternating (each timed call after an untimed one in the same
setting).
"""
import argparse
import ctypes
import inspect
import statistics
import sys
import threading
import time

import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from dab_detr.analysis import analyze_model
from dab_detr.checkpoint import load_command_line_weights
from dab_detr.cpu_allocator import configure_cpu_allocator
from dab_detr.precision import PRECISIONS, PrecisionError, cpu_has_native_bf16, cuda_has_native_bf16, resolve_precision
from dab_detr.predictor import load_lazy_config
from dab_detr.user_errors import exit_on_user_errors

GROUPS = ("backbone", "transformer.encoder", "transformer.decoder")


def random_inputs(batch_size, height, width, num_classes, generator):
    """Detectron2 inputs: uint8 images [3, H, W] and 8 random boxes per image."""
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


class PeakMemory:
    """Peak memory of one call: CUDA allocator peak, or sampled resident-memory growth on CPU."""

    def __init__(self, device):
        self.device = device
        try:
            self._trim = ctypes.CDLL("libc.so.6").malloc_trim
        except OSError:  # not glibc: the growth is then measured from a possibly higher baseline
            self._trim = None

    @staticmethod
    def _rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    def measure(self, fn) -> float:
        """Run ``fn()`` once; return its peak memory in bytes."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            base = torch.cuda.memory_allocated(self.device)
            fn()
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - base
        if self._trim is not None:
            self._trim(0)
        try:
            base = self._rss()
        except OSError:
            return float("nan")
        peak, done = [base], threading.Event()

        def sample():
            while not done.is_set():
                peak[0] = max(peak[0], self._rss())
                time.sleep(0.002)

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        try:
            fn()
        finally:
            done.set()
            thread.join()
        return max(peak[0], self._rss()) - base


def timed_interleaved(fns, iters, warmup, device, before=None):
    """{name: [seconds per call]} for each of ``fns`` ({name: fn}), run alternately;
    ``before(name)``, when given, runs untimed before each timed call."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(iters):
        for name, fn in fns.items():
            if before is not None:
                before(name)
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    return times


def group_times(model, fn, iters, device):
    """Median seconds per call spent in the backbone, encoder, decoder and the rest of ``fn``
    (pre-processing, input projection, position embedding, heads, post-processing)."""
    modules = {name: model.get_submodule(name) for name in GROUPS if _has_submodule(model, name)}
    spent = {name: 0.0 for name in modules}
    starts = {}

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    handles = []
    for name, module in modules.items():
        def pre(_m, _i, name=name):
            sync()
            starts[name] = time.perf_counter()

        def post(_m, _i, _o, name=name):
            sync()
            spent[name] += time.perf_counter() - starts[name]

        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    rows = []
    try:
        fn()  # warmup
        for _ in range(iters):
            for name in spent:
                spent[name] = 0.0
            sync()
            start = time.perf_counter()
            fn()
            sync()
            total = time.perf_counter() - start
            row = dict(spent)
            row["rest"] = total - sum(spent.values())
            row["total"] = total
            rows.append(row)
    finally:
        for h in handles:
            h.remove()
    return {k: statistics.median(r[k] for r in rows) for k in rows[0]}


def _has_submodule(model, name):
    try:
        model.get_submodule(name)
        return True
    except AttributeError:
        return False


def compiled_inference(model, infer):
    """``infer`` with ``model.backbone`` compiled by ``torch.compile`` (inductor with frozen
    weights: constants folded, conv + pointwise fused) for inference only; training keeps the
    eager backbone. If compilation fails (no C++ compiler, an unsupported operator) the error is
    printed and the eager backbone is used."""
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True
    eager = model.backbone
    compiled = torch.compile(eager)

    def run():
        model.backbone = compiled
        try:
            infer()
        finally:
            model.backbone = eager

    start = time.perf_counter()
    try:
        run()
    except Exception as e:  # noqa: BLE001 - any compiler failure: report it and measure eager
        print(f"benchmark: torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
              "using the eager backbone")
        return infer
    print(f"torch.compile of the backbone: first call (compilation) {time.perf_counter() - start:.1f} s")
    return run


# ------------------------------------------------------------------ the transformers port
def transformers_port(model, device):
    """transformers' ``DabDetrForObjectDetection`` with our model's architecture (the original's
    settings: PReLU, no dropout, 6 + 6 layers, auxiliary loss), random weights, and a function
    that turns our Detectron2 inputs into its ``pixel_values``, ``pixel_mask`` and ``labels``."""
    try:
        from transformers import DabDetrConfig, DabDetrForObjectDetection
    except ImportError:
        sys.exit("benchmark: --compare transformers needs the transformers package (pip install transformers timm)")
    from dab_detr.modeling import DABDETR

    if not isinstance(model, DABDETR):
        sys.exit(f"benchmark: --compare transformers supports DAB-DETR configs; this config builds {type(model).__name__}")
    from detectron2.modeling.backbone import BottleneckBlock, ResNet

    blocks = sum(isinstance(m, BottleneckBlock) for m in model.backbone.modules())
    if not isinstance(model.backbone, ResNet) or blocks != 16:
        sys.exit("benchmark: the transformers port has a ResNet-50 backbone; use an R50 config for --compare")
    t = model.transformer
    dilation = any(getattr(m, "dilation", (1, 1)) != (1, 1) for m in model.backbone.res5.modules())
    config = DabDetrConfig(
        num_labels=model.num_classes, num_queries=model.refpoint_embed().shape[0],
        num_patterns=t.num_patterns, dilation=dilation, hidden_size=t.d_model,
        encoder_layers=len(t.encoder.layers), decoder_layers=len(t.decoder.layers),
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, activation_function="prelu",
        auxiliary_loss=model.aux_loss, keep_query_pos=False, random_refpoints_xy=False, normalize_before=False,
    )
    port = DabDetrForObjectDetection(config).to(device)

    def port_inputs(inputs):
        images = torch.stack([(x["image"].to(device) - model.pixel_mean) / model.pixel_std for x in inputs])
        mask = torch.ones(images.shape[0], *images.shape[2:], dtype=torch.long, device=device)
        labels = []
        for x in inputs:
            h, w = x["image"].shape[1:]
            boxes = x["instances"].gt_boxes.tensor.to(device) / torch.tensor([w, h, w, h], device=device)
            cxcywh = torch.cat([(boxes[:, :2] + boxes[:, 2:]) / 2, boxes[:, 2:] - boxes[:, :2]], 1)
            labels.append({"class_labels": x["instances"].gt_classes.to(device), "boxes": cxcywh})
        return images, mask, labels

    return port, port_inputs


def benchmark_precisions(args, device):
    """The resolved ``--precision`` list (``--amp`` / ``--amp-dtype``: the older spelling of one)."""
    names = [n for n in args.precision.split(",") if n.strip()]
    if args.amp:
        dtype = args.amp_dtype or ("float16" if device.type == "cuda" else "bfloat16")
        names = ["fp16" if dtype == "float16" else "bf16"]
    try:
        precisions = [resolve_precision(n, device, "--precision") for n in names]
    except PrecisionError as e:
        sys.exit(f"benchmark: {e}")
    if not precisions:
        sys.exit("benchmark: --precision names no precision")
    return precisions


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", default="configs/common/models/dab_detr_r50.py")
    # 800 x 1216 is divisible by the backbone stride (32): no padding, the same input for both models
    parser.add_argument("--height", type=int, default=800)
    parser.add_argument("--width", type=int, default=1216)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="fp32",
                        help=f"comma-separated precisions to time, interleaved: {', '.join(PRECISIONS)} "
                             "(dab_detr/precision.py; fp16 is CUDA only), e.g. fp32,bf16 (default fp32)")
    parser.add_argument("--amp", action="store_true",
                        help="older spelling of --precision fp16 on CUDA, bf16 on CPU")
    parser.add_argument("--amp-dtype", choices=("float16", "bfloat16"), default=None,
                        help="with --amp: older spelling of --precision fp16 / bf16")
    parser.add_argument("--compare", choices=("transformers",), default=None,
                        help="also time transformers' DabDetrForObjectDetection, interleaved with ours")
    parser.add_argument("--groups", action="store_true",
                        help="inference time by group (backbone, encoder, decoder, rest), fast and plain backbone")
    parser.add_argument("--plain", action="store_true", help="build our model with fast_backbone=False")
    parser.add_argument("--compile", action="store_true",
                        help="inference through torch.compile(model.backbone) (inductor, frozen weights); "
                             "falls back to eager with a message if compilation fails")
    parser.add_argument("--cpu-allocator", choices=("keep", "system", "both"), default="keep",
                        help="keep freed CPU memory for reuse (default, as the other tools), glibc's "
                             "defaults, or both alternately (dab_detr/cpu_allocator.py)")
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--onnxruntime", action="store_true",
                        help="also export to ONNX (verified) and time onnxruntime on the first image (CPU, and CUDA where present)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides key=value")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    allocator_modes = ("keep", "system") if args.cpu_allocator == "both" else (args.cpu_allocator,)
    configure_cpu_allocator(allocator_modes[0])
    cfg = load_lazy_config(args.config_file)
    if "model" not in cfg:
        sys.exit(f"benchmark: {args.config_file} defines no `model`")
    cfg = LazyConfig.apply_overrides(cfg, args.opts)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("benchmark: --device cuda but no CUDA device is available")
    if args.plain:
        cfg.model.fast_backbone = False
    torch.manual_seed(0)
    model = instantiate(cfg.model).to(device)
    load_command_line_weights(model, args.opts)  # random weights unless train.init_checkpoint=PATH is given
    g = torch.Generator().manual_seed(0)
    inputs = random_inputs(args.batch_size, args.height, args.width, model.num_classes, g)
    precisions = benchmark_precisions(args, device)
    memory = PeakMemory(device)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"config {args.config_file}  device {name}  input {args.batch_size}x3x{args.height}x{args.width}  "
          f"precision {', '.join(str(p) for p in precisions)}  torch {torch.__version__}")
    native = cuda_has_native_bf16(device) if device.type == "cuda" else cpu_has_native_bf16()
    print(f"native bf16 on this {'GPU' if device.type == 'cuda' else 'CPU'}: {'yes' if native else 'no'}"
          + ("" if native or device.type == "cuda" else " (no avx512_bf16 / amx_bf16: bf16 runs emulated, "
             "slower than fp32)"))
    stats = analyze_model(model, args.height, args.width)
    gmacs = stats.flops * args.batch_size / 1e9
    print(f"fvcore count: {gmacs:.1f} GFLOPs per batch (inference forward; 1 multiply-add = 1 FLOP)")

    def label(base, precision):  # one precision: the plain name, as before
        return base if len(precisions) == 1 else f"{base} {precision.name}"

    def make_infer_ours(precision):
        def infer_ours():
            with torch.no_grad(), precision.autocast():
                model(inputs)
        return compiled_inference(model, infer_ours) if args.compile else infer_ours

    # torch's fused AdamW, as configs/common/optim.py trains (the same optimizer for the port)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=True)

    def make_train_ours(precision):
        scaler = torch.amp.GradScaler(device.type, enabled=precision.name == "fp16")

        def train_ours():
            with EventStorage(), precision.autocast():
                losses = model(inputs)
            optimizer.zero_grad()
            scaler.scale(sum(losses.values())).backward()
            scaler.step(optimizer)
            scaler.update()
        return train_ours

    infer = {label("ours", p): make_infer_ours(p) for p in precisions}
    train = {label("ours", p): make_train_ours(p) for p in precisions}
    infer_ours = next(iter(infer.values()))  # the first precision, for --groups
    autocast = precisions[0].autocast
    port = None
    if args.compare == "transformers":
        torch.manual_seed(0)
        port, port_inputs = transformers_port(model, device)
        pixel_values, pixel_mask, labels = port_inputs(inputs)
        port_optimizer = torch.optim.AdamW([p for p in port.parameters() if p.requires_grad], lr=1e-5, fused=True)

        def make_port(precision):
            port_scaler = torch.amp.GradScaler(device.type, enabled=precision.name == "fp16")

            def infer_port():
                with torch.no_grad(), precision.autocast():
                    port(pixel_values=pixel_values, pixel_mask=pixel_mask)

            def train_port():
                with precision.autocast():
                    loss = port(pixel_values=pixel_values, pixel_mask=pixel_mask, labels=labels).loss
                port_optimizer.zero_grad()
                port_scaler.scale(loss).backward()
                port_scaler.step(port_optimizer)
                port_scaler.update()
            return infer_port, train_port

        for p in precisions:
            infer[label("transformers", p)], train[label("transformers", p)] = make_port(p)

    def report(kind, fns, flops_factor, set_mode):
        set_mode()
        # {(allocator mode, model name): fn}; with --cpu-allocator both, every call is preceded by
        # an untimed one of the same function in the same mode
        runs = {(mode, n): fn for mode in allocator_modes for n, fn in fns.items()}

        def switch_and_warm(key):
            configure_cpu_allocator(key[0])
            runs[key]()

        times = timed_interleaved(runs, args.iters, args.warmup, device,
                                  switch_and_warm if len(allocator_modes) > 1 else None)
        peaks = {}
        for key, fn in runs.items():
            configure_cpu_allocator(key[0])
            peaks[key] = memory.measure(fn)
        configure_cpu_allocator(allocator_modes[0])
        medians = {key: statistics.median(t) for key, t in times.items()}
        for (mode, n), t in medians.items():
            print(f"{kind:>13} {n:>12} ({mode}): {t * 1000:8.1f} ms/batch (median of {len(times[mode, n])}; all "
                  f"{', '.join(f'{x * 1000:.0f}' for x in times[mode, n])}), {args.batch_size / t:6.2f} images/s, "
                  f"{flops_factor * gmacs / t:6.1f} GFLOP/s, peak memory {peaks[mode, n] / 2**30:.2f} GiB")
        for mode in allocator_modes:
            for p in precisions:
                ours, theirs = label("ours", p), label("transformers", p)
                if (mode, theirs) in medians:
                    print(f"{kind:>13}  speed-up {ours} vs {theirs} ({mode} allocator): "
                          f"{medians[mode, theirs] / medians[mode, ours]:.2f}x")
            for base in ("ours", "transformers"):
                for p in precisions[1:]:
                    if (mode, label(base, p)) in medians:
                        reference = label(base, precisions[0])
                        print(f"{kind:>13}  speed-up {base} {p.name} vs {precisions[0].name} ({mode} allocator): "
                              f"{medians[mode, reference] / medians[mode, label(base, p)]:.2f}x")

    def eval_mode():
        model.eval()
        if port is not None:
            port.eval()

    def train_mode():
        model.train()
        if port is not None:
            port.train()

    report("inference", infer, 1, eval_mode)
    if args.onnxruntime:
        from dab_detr.export.runtime_benchmark import time_onnxruntime  # optional packages: imported on demand

        for provider, t_ort in time_onnxruntime(model, inputs[0]["image"][None].float(), args.iters, args.warmup).items():
            print(f"  onnxruntime {provider}: {t_ort * 1000:.1f} ms/image (same image; PyTorch fp32 above)")
        model.to(device)
    if not args.skip_train:
        report("training step", train, 3, train_mode)

    if args.groups:
        eval_mode()
        runs = [("default" if not args.plain else "fast_backbone=False", model, infer_ours)]
        if not args.plain and "fast_backbone" in inspect.signature(type(model).__init__).parameters:
            plain_cfg = cfg.model.copy()
            plain_cfg.fast_backbone = False
            torch.manual_seed(0)
            plain = instantiate(plain_cfg).to(device).eval()
            plain.load_state_dict(model.state_dict())

            def infer_plain():
                with torch.no_grad(), autocast():  # the first --precision
                    plain(inputs)

            runs.append(("fast_backbone=False", plain, infer_plain))
        print("inference by group, median seconds (rest: pre-processing, input projection, position "
              "embedding, heads, post-processing)")
        for label, m, fn in runs:
            row = group_times(m, fn, args.iters, device)
            print(f"  {label:>20}: " + ", ".join(f"{k.split('.')[-1]} {v:.3f}" for k, v in row.items()))
    if device.type == "cuda":
        print(f"peak GPU memory (whole run): {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB")


if __name__ == "__main__":
    with exit_on_user_errors():  # a missing or unreadable config or checkpoint: one line naming it
        main()
