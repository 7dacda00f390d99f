#!/usr/bin/env python
"""The paper's pictures from a DAB-DETR checkpoint (PNG files, matplotlib).

    python tools/visualize.py anchors   --config-file CFG --output anchors.png   train.init_checkpoint=M
    python tools/visualize.py layers    IMAGE --config-file CFG --output layers.png train.init_checkpoint=M
    python tools/visualize.py attention IMAGE --config-file CFG --output attention.png [--layer L]
                                        [--queries 3 7] [--temperature T] train.init_checkpoint=M
    python tools/visualize.py curves    output/run/metrics.json --output curves.png

- anchors (Figure 10): the learned anchors on the unit square: every centre as a point and a
  sample of the boxes. Pattern models share one set of anchors among their patterns (the
  original code repeats them per pattern), so there is one panel.
- layers (Figure 11): for the top detections of the image, the learned anchor (dashed) and the
  box after each decoder layer.
- attention (Figures 4, 6, 7): for chosen queries (default: the top detections), the positional
  attention map of a decoder layer's cross-attention (softmax of the positional term over the
  image, mean over heads or ``--head``), with the width/height modulation on and off side by
  side; ``--temperature`` sets the image position embedding's temperature for the pass. The maps
  come from forward hooks on the model's own modules (``dab_detr.decoder_inspection``).
- curves (Figure 9): total loss, last-layer loss (class + L1 + GIoU, weighted) and AP over
  iterations, from a run's ``metrics.json`` (Detectron2's JSON writer).
"""
import argparse
import json
import os
import re
import sys

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.patches as patches  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from dab_detr.decoder_inspection import decoder_layer_boxes, learned_anchors, positional_attention  # noqa: E402
from dab_detr.drawing import dataset_metadata  # noqa: E402
from dab_detr.predictor import Predictor, read_image_file  # noqa: E402
from dab_detr.user_errors import InputFileError, exit_on_user_errors, file_problem, output_problem  # noqa: E402

LAST_LAYER_LOSSES = ("loss_class", "loss_bbox", "loss_giou")
_OVERRIDE = re.compile(r"[A-Za-z_][\w.\[\]]*=.*")


def _class_name(metadata, index):
    names = metadata.get("thing_classes", None)
    return names[index] if names and 0 <= index < len(names) else f"class {index}"


def _save(fig, path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    print(f"wrote {path}")
    return path


def plot_anchors(predictor, output, num_boxes=40, seed=0):
    """Figure 10: anchor centres (all) and a random sample of ``num_boxes`` anchor boxes."""
    info = learned_anchors(predictor.model)
    anchors = info["anchors"].numpy()
    fig, ax = plt.subplots(figsize=(4.2, 4.2))
    ax.scatter(anchors[:, 0], anchors[:, 1], s=8, c="tab:blue", label=f"{len(anchors)} centres")
    sample = np.random.RandomState(seed).permutation(len(anchors))[:num_boxes]
    colors = plt.cm.tab20(np.linspace(0, 1, len(sample)))
    for color, (cx, cy, w, h) in zip(colors, anchors[sample]):
        ax.add_patch(patches.Rectangle((cx - w / 2, cy - h / 2), w, h, fill=False, lw=1.0, ec=color))
    ax.set_xlim(0, 1)
    ax.set_ylim(1, 0)  # image coordinates: y down
    ax.set_aspect("equal")
    title = f"learned anchors ({len(sample)} boxes shown)"
    if info["num_patterns"]:
        title += f"\nshared by the {info['num_patterns']} patterns"
    ax.set_title(title, fontsize=9)
    ax.legend(loc="upper right", fontsize=7)
    return _save(fig, output)


def plot_layers(predictor, image_path, output, top_k=3):
    """Figure 11: per detection, the anchor (dashed) and the box after each decoder layer."""
    image = read_image_file(image_path, "RGB")  # RGB, for drawing; the model reads the file itself (its own format)
    result = decoder_layer_boxes(predictor, image_path, top_k=top_k, queries=None)
    metadata = dataset_metadata(predictor.cfg)
    num_layers, count = result["boxes"].shape[:2]
    fig, axes = plt.subplots(1, count, figsize=(3.2 * count, 3.4), squeeze=False)
    colors = plt.cm.viridis(np.linspace(0, 0.95, num_layers))
    for k, ax in enumerate(axes[0]):
        ax.imshow(image)
        x0, y0, x1, y1 = result["anchors"][k].tolist()
        ax.add_patch(patches.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ls="--", lw=1.2, ec="white",
                                       label="anchor"))
        for layer in range(num_layers):
            x0, y0, x1, y1 = result["boxes"][layer, k].tolist()
            ax.add_patch(patches.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, lw=1.5, ec=colors[layer],
                                           label=f"layer {layer + 1}"))
        ax.set_title(f"query {int(result['queries'][k])}: {_class_name(metadata, int(result['classes'][k]))} "
                     f"{float(result['scores'][k]):.2f}", fontsize=8)
        ax.axis("off")
    axes[0][-1].legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=7)
    return _save(fig, output)


def plot_attention(predictor, image_path, output, layer=-1, queries=None, top_k=3, temperature=None, head=None):
    """Figures 4, 6, 7: positional attention maps with the modulation on (left) and off (right)."""
    image = read_image_file(image_path, "RGB")  # RGB, for drawing; the model reads the file itself (its own format)
    on = positional_attention(predictor, image_path, layer=layer, queries=queries, top_k=top_k,
                              modulation=True, temperature=temperature)
    off = positional_attention(predictor, image_path, layer=layer, queries=on["queries"].tolist(),
                               modulation=False, temperature=temperature)
    count = len(on["queries"])
    fig, axes = plt.subplots(count, 2, figsize=(6.4, 3.0 * count), squeeze=False)
    height, width = on["input_size"]
    layer_name = layer if layer >= 0 else len(predictor.model.transformer.decoder.layers) + layer
    for k in range(count):
        for column, (result, label) in enumerate(((on, "modulation on"), (off, "modulation off"))):
            ax = axes[k][column]
            maps = result["maps"][k]
            attention = maps.mean(0) if head is None else maps[head]
            ax.imshow(image.mean(axis=2), cmap="gray")  # grey image under the coloured map
            extent_w, extent_h = result["extent"]
            ax.imshow(attention.numpy(), cmap="jet", alpha=0.55, extent=(0, extent_w, extent_h, 0),
                      interpolation="bilinear")
            x0, y0, x1, y1 = result["boxes"][k].tolist()
            ax.add_patch(patches.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, lw=1.5, ec="white"))
            ax.set_xlim(0, width)
            ax.set_ylim(height, 0)
            heads = "mean of heads" if head is None else f"head {head}"
            ax.set_title(f"query {int(result['queries'][k])}, layer {layer_name + 1}, {label}\n({heads}"
                         + (f", T={temperature:g}" if temperature is not None else "") + ")", fontsize=8)
            ax.axis("off")
    return _save(fig, output)


def read_metrics(path):
    """Detectron2's metrics.json (one JSON object per line) -> list of dicts, by iteration."""
    problem = file_problem(path)
    if problem:
        raise InputFileError(f"metrics file {path} {problem}")
    rows = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise SystemExit(f"{path}, line {number}: not JSON ({e})")
    return rows


def plot_curves(metrics_path, output):
    """Figure 9: total loss, last-layer loss and AP against the iteration."""
    rows = read_metrics(metrics_path)
    losses = [r for r in rows if "total_loss" in r]
    if not losses:
        raise SystemExit(f"{metrics_path}: no training losses (no 'total_loss' entries): is it a metrics.json "
                         "of a training run?")
    ap = [r for r in rows if "bbox/AP" in r]
    iterations = [r["iteration"] for r in losses]
    fig, axes = plt.subplots(1, 3, figsize=(10.5, 3.0))
    axes[0].plot(iterations, [r["total_loss"] for r in losses], lw=1)
    axes[0].set_title("total loss (all layers)", fontsize=9)
    last = [r for r in losses if all(k in r for k in LAST_LAYER_LOSSES)]
    axes[1].plot([r["iteration"] for r in last], [sum(r[k] for k in LAST_LAYER_LOSSES) for r in last], lw=1,
                 color="tab:orange")
    axes[1].set_title("last-layer loss (class + L1 + GIoU)", fontsize=9)
    if ap:
        axes[2].plot([r["iteration"] for r in ap], [r["bbox/AP"] for r in ap], marker="o", color="tab:green")
    else:
        axes[2].text(0.5, 0.5, "no evaluation in this run", ha="center", va="center", transform=axes[2].transAxes)
    axes[2].set_title("box AP", fontsize=9)
    for ax in axes:
        ax.set_xlabel("iteration", fontsize=8)
        ax.tick_params(labelsize=7)
    return _save(fig, output)


def parse_args(argv=None):
    """Config overrides ``key=value`` (``train.init_checkpoint=...`` for the weights) may stand
    anywhere after the sub-command; they are taken out before argparse sees the rest."""
    argv = list(sys.argv[1:] if argv is None else argv)
    opts = [a for a in argv if _OVERRIDE.fullmatch(a) and not os.path.exists(a)]
    argv = [a for a in argv if a not in opts]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    def model_command(name, help, image):
        sub = commands.add_parser(name, help=help)
        if image:
            sub.add_argument("image", help="an image file")
        sub.add_argument("--config-file", required=True, metavar="FILE", help="a DAB-DETR LazyConfig")
        sub.add_argument("--output", default=f"output/visualize/{name}.png", help="PNG file to write")
        sub.add_argument("--device", default=None, help="cuda or cpu (default: CUDA when available)")
        return sub

    sub = model_command("anchors", "learned anchors on the unit square (Figure 10)", image=False)
    sub.add_argument("--num-boxes", type=int, default=40, help="anchor boxes to draw (all centres are drawn)")
    sub = model_command("layers", "the box after each decoder layer (Figure 11)", image=True)
    sub.add_argument("--top-k", type=int, default=3, help="top detections to show")
    sub = model_command("attention", "positional attention, modulation on / off (Figures 4, 6, 7)", image=True)
    sub.add_argument("--layer", type=int, default=-1, help="decoder layer, 0-based; negative from the end")
    sub.add_argument("--queries", type=int, nargs="+", help="query indices (default: the top detections)")
    sub.add_argument("--top-k", type=int, default=3, help="top detections to show without --queries")
    sub.add_argument("--temperature", type=float, help="image position embedding temperature (Figure 7)")
    sub.add_argument("--head", type=int, help="one attention head instead of the mean of all heads")
    sub = commands.add_parser("curves", help="training curves of a run's metrics.json (Figure 9)")
    sub.add_argument("metrics", help="metrics.json of a training run")
    sub.add_argument("--output", default="output/visualize/curves.png", help="PNG file to write")
    args = parser.parse_args(argv)
    args.opts = opts
    if args.command == "curves" and opts:
        parser.error(f"curves takes no config overrides, got {opts}")
    return args


def main(argv=None):
    args = parse_args(argv)
    with exit_on_user_errors():  # a missing or unreadable file: one line naming it, exit status 1
        return run(args)


def run(args):
    problem = output_problem(args.output)
    if problem:
        raise InputFileError(f"--output {args.output} {problem}")
    if args.command == "curves":
        return plot_curves(args.metrics, args.output)
    if args.command in ("layers", "attention"):
        read_image_file(args.image)  # a missing or unreadable image stops the tool before the model is built
    predictor = Predictor(args.config_file, overrides=args.opts, device=args.device)
    if args.command == "anchors":
        return plot_anchors(predictor, args.output, num_boxes=args.num_boxes)
    if args.command == "layers":
        return plot_layers(predictor, args.image, args.output, top_k=args.top_k)
    num_heads = predictor.model.transformer.decoder.layers[0].cross_attn.num_heads
    if args.head is not None and not 0 <= args.head < num_heads:
        raise SystemExit(f"--head {args.head}: the model has {num_heads} heads (0..{num_heads - 1})")
    return plot_attention(predictor, args.image, args.output, layer=args.layer, queries=args.queries,
                          top_k=args.top_k, temperature=args.temperature, head=args.head)


if __name__ == "__main__":
    main()
    sys.exit(0)
