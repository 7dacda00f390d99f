#!/usr/bin/env python
"""Detect objects in images, folders and videos with a trained detector of a LazyConfig.

    python tools/predict.py --config-file configs/dab_detr_demo.py \\
        --input photos/ more/*.jpg one.png --output out/ --json out/results.json \\
        train.init_checkpoint=output/dab_detr_demo/model_final.pth
    python tools/predict.py --config-file configs/dab_detr_demo.py --video-input clip.mp4 \\
        --output out/clip_detected.mp4 train.init_checkpoint=output/dab_detr_demo/model_final.pth

Images are prepared as the config's test loader prepares them (``dab_detr.Predictor``), the
detections scoring at least ``--confidence-threshold`` are drawn with Detectron2's Visualizer and
the test dataset's class names, and ``--json`` writes every detection (all of them, as
``--eval-only`` scores them) as COCO results with the dataset's own category ids. Files in a
folder or glob that are not readable images are skipped with a warning naming them. Config
overrides ``key=value`` come last (those written right after ``--input`` are recognised too).
"""
import argparse
import glob
import logging
import os
import re
import sys
import time

import numpy as np
from tqdm import tqdm

from detectron2.utils.logger import setup_logger

from dab_detr.coco_results import CocoResults, load_test_records
from dab_detr.cpu_allocator import configure_cpu_allocator
from dab_detr.drawing import dataset_metadata, draw_detections
from dab_detr.precision import PRECISIONS
from dab_detr.predictor import ImageReadError, Predictor, read_image_file

logger = logging.getLogger("dab_detr.predict")

_OVERRIDE = re.compile(r"[A-Za-z_][\w.\[\]]*=.*")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, metavar="FILE", help="a LazyConfig (.py)")
    parser.add_argument("--input", nargs="+", default=[], help="image files, folders or globs")
    parser.add_argument("--video-input", help="a video file")
    parser.add_argument("--output", help="folder for the drawn images (or the video); a file name for a "
                        "single image or the video")
    parser.add_argument("--confidence-threshold", type=float, default=0.5, help="draw detections scoring at least this")
    parser.add_argument("--scale", type=float, default=1.0, help="size of the drawings relative to the input")
    parser.add_argument("--json", metavar="FILE", help="write all detections as COCO results JSON")
    parser.add_argument("--batch-size", type=int, default=1, help="images per forward pass (one padded batch)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: CUDA when available)")
    parser.add_argument("--precision", default=None, choices=PRECISIONS,
                        help="fp32, bf16, fp16 (CUDA only) or auto (bf16 where the CPU/GPU has it natively, "
                             "else fp32); default: the config's train.precision (fp32)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides key=value")
    args = parser.parse_args(argv)
    # `--input a.jpg train.init_checkpoint=m.pth`: argparse gives the override to --input
    moved = [x for x in args.input if _OVERRIDE.fullmatch(x) and not os.path.exists(x)]
    args.input = [x for x in args.input if x not in moved]
    args.opts = moved + list(args.opts)
    if not args.input and not args.video_input:
        parser.error("nothing to do: give --input and/or --video-input")
    if args.batch_size < 1:
        parser.error("--batch-size must be >= 1")
    return args


def expand_inputs(items):
    """--input items -> [(path, explicit)]: a file named directly is explicit (an unreadable one is
    an error); files found in folders (sorted, not recursive) and by globs may be skipped."""
    found = []
    for item in items:
        if os.path.isdir(item):
            found += [(os.path.join(item, f), False) for f in sorted(os.listdir(item))
                      if os.path.isfile(os.path.join(item, f))]
        elif glob.has_magic(item):
            matches = sorted(p for p in glob.glob(item) if os.path.isfile(p))
            if not matches:
                logger.warning("--input %s matches no file", item)
            found += [(p, False) for p in matches]
        elif os.path.isfile(item):
            found.append((item, True))
        else:
            raise SystemExit(f"error: --input {item} does not exist (neither a file nor a folder)")
    return found


def read_images(entries):
    """Yield (path, RGB array) for each readable image; skip the others with a warning."""
    for path, explicit in entries:
        try:
            yield path, read_image_file(path, "RGB")
        except ImageReadError as e:
            if explicit:
                raise SystemExit(str(e))
            logger.warning("skipping %s: not a readable image (%s)", path, e)


def _batches(iterable, size):
    batch = []
    for item in iterable:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _output_path(output, source, extension):
    """Where the drawing of ``source`` goes: inside the --output folder, or --output itself."""
    if os.path.splitext(output)[1] and not os.path.isdir(output):
        return output
    os.makedirs(output, exist_ok=True)
    return os.path.join(output, os.path.splitext(os.path.basename(source))[0] + extension)


def predict_images(predictor, args, metadata, coco):
    entries = expand_inputs(args.input)
    if args.output and len(entries) > 1 and os.path.splitext(args.output)[1] and not os.path.isdir(args.output):
        raise SystemExit(f"--output {args.output} is a file name but there are {len(entries)} inputs: give a folder")
    count, start = 0, time.perf_counter()
    with tqdm(total=len(entries), unit="image", desc="images") as bar:
        for batch in _batches(read_images(entries), args.batch_size):
            outputs = predictor([image for _, image in batch], array_format="RGB")
            for (path, image), output in zip(batch, outputs):
                instances = output["instances"].to("cpu")
                if coco is not None:
                    coco.add(path, instances)
                if args.output:
                    draw_detections(image, instances, metadata, args.confidence_threshold, args.scale).save(
                        _output_path(args.output, path, ".png"))
            count += len(batch)
            bar.update(len(batch))
    return count, time.perf_counter() - start


def predict_video(predictor, args, metadata):
    import cv2

    capture = cv2.VideoCapture(args.video_input)
    if not os.path.isfile(args.video_input) or not capture.isOpened():
        raise SystemExit(f"--video-input {args.video_input}: OpenCV cannot open this video")
    fps = capture.get(cv2.CAP_PROP_FPS) or 25.0
    total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) or None
    out_path = _output_path(args.output, args.video_input, ".mp4") if args.output else None
    writer = None
    count, start = 0, time.perf_counter()

    def frames():
        while True:
            ok, frame = capture.read()
            if not ok:
                return
            yield frame

    try:
        with tqdm(total=total, unit="frame", desc="video") as bar:
            for batch in _batches(frames(), args.batch_size):
                outputs = predictor(batch)  # BGR frames, as OpenCV reads them
                for frame, output in zip(batch, outputs):
                    if out_path:
                        drawn = draw_detections(frame[:, :, ::-1], output["instances"], metadata,
                                                args.confidence_threshold, args.scale).get_image()
                        if writer is None:
                            fourcc = "MJPG" if out_path.lower().endswith(".avi") else "mp4v"
                            writer = cv2.VideoWriter(out_path, cv2.VideoWriter_fourcc(*fourcc), fps,
                                                     (drawn.shape[1], drawn.shape[0]))
                            if not writer.isOpened():
                                raise SystemExit(f"--output {out_path}: OpenCV cannot write a video there "
                                                 f"(codec {fourcc})")
                        writer.write(np.ascontiguousarray(drawn[:, :, ::-1]))
                count += len(batch)
                bar.update(len(batch))
    finally:
        capture.release()
        if writer is not None:
            writer.release()
    if out_path:
        logger.info("video with detections: %s (%d frames)", out_path, count)
    return count, time.perf_counter() - start


def main(argv=None):
    args = parse_args(argv)
    setup_logger(name="dab_detr")
    try:  # freed CPU memory kept for reuse (dab_detr/cpu_allocator.py)
        configure_cpu_allocator()
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    try:  # a missing config or checkpoint, or no checkpoint given: one line, not a traceback
        predictor = Predictor(args.config_file, overrides=args.opts, device=args.device, precision=args.precision)
    except (FileNotFoundError, ValueError) as e:  # PrecisionError (fp16 on a CPU) is a ValueError
        raise SystemExit(f"error: {e}")
    metadata = dataset_metadata(predictor.cfg)
    # loading the test dataset gives a custom dataset its class names, and the JSON its ids
    need_records = args.json or (args.input and not metadata.get("thing_classes", None))
    records = load_test_records(predictor.cfg) if need_records else []
    coco = CocoResults(predictor.cfg, records) if args.json else None
    if not args.output and not args.json:
        logger.warning("neither --output nor --json given: the detections are computed and counted only")
    if args.input:
        count, seconds = predict_images(predictor, args, metadata, coco)
        print(f"{count} images in {seconds:.1f} s ({count / max(seconds, 1e-9):.2f} images/s, "
              f"batch {args.batch_size}, {predictor.device}, precision {predictor.precision})")
    if args.video_input:
        count, seconds = predict_video(predictor, args, metadata)
        print(f"{count} frames in {seconds:.1f} s ({count / max(seconds, 1e-9):.2f} frames/s, {predictor.device}, "
              f"precision {predictor.precision})")
    if coco is not None:
        coco.write(args.json)
        print(f"{len(coco.results)} detections written to {args.json}")


if __name__ == "__main__":
    sys.exit(main())
