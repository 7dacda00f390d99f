"""dab_detr.Predictor: the eval path's preparation, input types and formats, batching, errors."""
import os

import numpy as np
import pytest
import torch
from detectron2.config import LazyCall as L
from detectron2.config import LazyConfig, instantiate
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.modeling import Backbone
from PIL import Image
from torchvision.ops import box_iou

from dab_detr import Predictor
from dab_detr.checkpoint import DABDETRCheckpointer
from dab_detr.predictor import ImageReadError

DEMO_CONFIG = "configs/dab_detr_demo.py"
# the demo config shrunk: d_model 64, 1 encoder + 3 decoder layers (the demo's small ResNet, 20 anchors)
SMALL = ["model.transformer.d_model=64", "model.position_embedding.num_pos_feats=32",
         "model.transformer.dim_feedforward=128", "model.transformer.num_encoder_layers=1",
         "model.transformer.num_decoder_layers=3"]
BGR = ["model.input_format=BGR", "dataloader.test.mapper.image_format=BGR",
       "model.pixel_mean=[103.53,116.28,123.675]", "model.pixel_std=[57.375,57.12,58.395]"]


class PatchBackbone(Backbone):
    """One 16 x 16 convolution with stride 16 (a patch embedding): its receptive fields do not
    overlap, so the zero padding of a batch never reaches the features of an image whose resized
    size is a multiple of 16."""

    def __init__(self, channels: int = 32):
        super().__init__()
        self.patch = torch.nn.Conv2d(3, channels, kernel_size=16, stride=16)
        self._out_feature_channels = {"res4": channels}
        self._out_feature_strides = {"res4": 16}
        self._out_features = ["res4"]

    def forward(self, x):
        return {"res4": self.patch(x).relu()}


def small_config(overrides=(), patch_backbone=False):
    cfg = LazyConfig.apply_overrides(LazyConfig.load(DEMO_CONFIG), SMALL + list(overrides))
    if patch_backbone:
        cfg.model.backbone = L(PatchBackbone)(channels=32)
    return cfg


def save_random_checkpoint(cfg, path):
    """A randomly initialized model of ``cfg`` with a random box head (at init its last layer is
    zero, so every box would be its anchor whatever the image) and random BN statistics."""
    torch.manual_seed(0)
    model = instantiate(cfg.model)
    with torch.no_grad():
        torch.nn.init.normal_(model.bbox_embed.layers[-1].weight, std=0.05)
        for module in model.backbone.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_var.uniform_(0.5, 2.0)
                module.running_mean.uniform_(-0.2, 0.2)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    DABDETRCheckpointer(model, save_dir=os.path.dirname(path)).save(os.path.splitext(os.path.basename(path))[0])
    return path


def random_image(height, width, seed):
    """A smooth random colour image (blobs, so that resizing keeps its content) as uint8 RGB."""
    rng = np.random.RandomState(seed)
    small = rng.randint(0, 256, (max(2, height // 8), max(2, width // 8), 3)).astype(np.uint8)
    return np.asarray(Image.fromarray(small).resize((width, height), Image.BILINEAR))


@pytest.fixture(scope="module", autouse=True)
def forget_demo_datasets():
    """Loading the demo config registers the demo datasets under the default root: forget them
    afterwards (metadata included), so that a later test can register them elsewhere."""
    yield
    for name in ("dab_demo_train", "dab_demo_val"):
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
        if name in MetadataCatalog.list():
            MetadataCatalog.remove(name)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("predictor")
    return {
        "RGB": save_random_checkpoint(small_config(), str(root / "rgb" / "model.pth")),
        "BGR": save_random_checkpoint(small_config(BGR), str(root / "bgr" / "model.pth")),
        "patch": save_random_checkpoint(small_config(patch_backbone=True), str(root / "patch" / "model.pth")),
    }


def make_predictor(checkpoint, fmt="RGB"):
    return Predictor(DEMO_CONFIG, checkpoint, overrides=SMALL + (BGR if fmt == "BGR" else []), device="cpu")


def assert_same(a, b, atol=1e-4):
    a, b = a["instances"].to("cpu"), b["instances"].to("cpu")
    assert a.image_size == b.image_size
    torch.testing.assert_close(a.scores, b.scores, atol=atol, rtol=0)
    torch.testing.assert_close(a.pred_boxes.tensor, b.pred_boxes.tensor, atol=atol * 100, rtol=0)
    assert torch.equal(a.pred_classes, b.pred_classes)


@pytest.mark.parametrize("fmt", ["RGB", "BGR"])
def test_matches_the_eval_path_in_input_coordinates(checkpoints, tmp_path, fmt):
    """Each input type gives exactly what the config's test mapper + model give (the --eval-only
    path), boxes in the input image's pixels, for two sizes and both model input formats."""
    predictor = make_predictor(checkpoints[fmt], fmt)
    mapper = instantiate(predictor.cfg.dataloader.test.mapper)
    assert mapper.image_format == fmt == predictor.model.input_format
    for seed, (height, width) in enumerate([(100, 140) if fmt == "RGB" else (150, 90)]):
        rgb = random_image(height, width, seed)
        path = str(tmp_path / f"image{seed}.png")
        Image.fromarray(rgb).save(path)
        with torch.no_grad():
            expected = predictor.model([mapper({"file_name": path, "height": height, "width": width, "image_id": 0})])[0]
        assert expected["instances"].image_size == (height, width)
        for image, array_format in [(rgb[:, :, ::-1].copy(), "BGR"), (rgb, "RGB"), (Image.fromarray(rgb), "BGR"),
                                    (path, "BGR")]:
            got = predictor(image, array_format=array_format)
            assert_same(got, expected, atol=1e-6)
        # the boxes scale with the input: the same picture at twice the size (same resized image
        # up to interpolation) gives boxes twice as large
        big = np.asarray(Image.fromarray(rgb).resize((2 * width, 2 * height), Image.BILINEAR))
        small_boxes = predictor(rgb, array_format="RGB")["instances"]
        big_boxes = predictor(big, array_format="RGB")["instances"]
        assert big_boxes.image_size == (2 * height, 2 * width)
        # each of the 5 best detections of the small image, doubled, is a detection of the big one
        # (same class, IoU > 0.9; the ranking may change with the interpolation)
        iou = box_iou(small_boxes.pred_boxes.tensor[:5] * 2, big_boxes.pred_boxes.tensor)
        iou[small_boxes.pred_classes[:5, None] != big_boxes.pred_classes[None, :]] = 0
        assert (iou.max(dim=1).values > 0.9).all(), iou.max(dim=1).values


def test_batch_equals_per_image(checkpoints):
    """One padded batch gives each image's own detections.

    Images of different sizes: with a CNN, zero padding changes the features next to the image
    border (the border effect the README describes), so this is tested with a backbone whose
    receptive fields do not overlap (a 16 x 16, stride-16 patch embedding) and sizes that resize
    to multiples of 16: then only the transformer sees the padding, and its padding masks must
    make the batch equal to each image alone. Images of equal size (no padding): the demo's CNN."""
    predictor = Predictor(small_config(patch_backbone=True), checkpoints["patch"], device="cpu")
    images = [random_image(h, w, seed) for seed, (h, w) in enumerate([(100, 140), (140, 100), (60, 78)])]
    sizes = [tuple(predictor.prepare([im], "RGB")[0]["image"].shape[1:]) for im in images]
    assert len(set(sizes)) == 3 and all(h % 16 == 0 and w % 16 == 0 for h, w in sizes)
    batched = predictor(images, array_format="RGB")
    assert len(batched) == 3
    for image, output in zip(images, batched):
        assert_same(output, predictor(image, array_format="RGB"))

    predictor = make_predictor(checkpoints["RGB"])
    images = [random_image(100, 140, seed) for seed in range(2)]
    for image, output in zip(images, predictor(images, array_format="RGB")):
        assert_same(output, predictor(image, array_format="RGB"))


def test_grayscale_and_rgba_inputs(checkpoints, tmp_path):
    predictor = make_predictor(checkpoints["RGB"])
    gray = random_image(90, 120, 3)[:, :, 0]
    as_rgb = predictor(np.repeat(gray[:, :, None], 3, axis=2))
    for image in [gray, gray[:, :, None], Image.fromarray(gray, mode="L")]:
        assert_same(predictor(image), as_rgb, atol=1e-6)
    Image.fromarray(gray, mode="L").save(tmp_path / "gray.png")
    assert_same(predictor(str(tmp_path / "gray.png")), as_rgb, atol=1e-6)

    rgb = random_image(90, 120, 4)
    alpha = np.random.RandomState(0).randint(0, 256, (90, 120, 1)).astype(np.uint8)
    expected = predictor(rgb, array_format="RGB")
    rgba = np.concatenate([rgb, alpha], axis=2)
    assert_same(predictor(Image.fromarray(rgba, mode="RGBA")), expected, atol=1e-6)
    assert_same(predictor(np.concatenate([rgb[:, :, ::-1], alpha], axis=2)), expected, atol=1e-6)  # BGRA (OpenCV)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    assert_same(predictor(str(tmp_path / "rgba.png")), expected, atol=1e-6)


def test_missing_checkpoint_and_bad_inputs(checkpoints, tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint /no/such/model.pth does not exist"):
        Predictor(DEMO_CONFIG, "/no/such/model.pth", overrides=SMALL)
    with pytest.raises(ValueError, match="train.init_checkpoint"):
        Predictor(DEMO_CONFIG, overrides=SMALL)  # the demo config has no init_checkpoint
    with pytest.raises(FileNotFoundError, match="config file nope.py does not exist"):
        Predictor("nope.py", checkpoints["RGB"])
    with pytest.raises(ValueError, match="image_format is 'BGR' but the model's input_format is 'RGB'"):
        Predictor(DEMO_CONFIG, checkpoints["RGB"], overrides=SMALL + ["dataloader.test.mapper.image_format=BGR"])

    default_device = Predictor(DEMO_CONFIG, checkpoints["RGB"], overrides=SMALL).device
    assert default_device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    predictor = make_predictor(checkpoints["RGB"])
    with pytest.raises(ValueError, match="expected a uint8 image"):
        predictor(np.zeros((20, 20, 3), dtype=np.float32))
    with pytest.raises(ValueError, match=r"got \(20, 20, 2\)"):
        predictor(np.zeros((20, 20, 2), dtype=np.uint8))
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(ImageReadError, match="notes.txt"):
        predictor(str(tmp_path / "notes.txt"))
    with pytest.raises(ImageReadError, match="missing.png does not exist"):
        predictor(str(tmp_path / "missing.png"))
    with pytest.raises(TypeError, match="got int"):
        predictor(3)


def test_sixteen_bit_png_is_read_as_the_data_mapper_reads_it(tmp_path):
    """Detectron2's read_image clips 16-bit grayscale at 255 (an almost white image); the predictor
    reads files with the mapper's reader, which scales them, so prediction and --eval-only see the
    same pixels."""
    from dab_detr.data.image_reading import read_image_8bit
    from dab_detr.predictor import read_image_file

    values = np.linspace(0, 65535, 24 * 32).reshape(24, 32).astype(np.uint16)
    path = str(tmp_path / "depth16.png")
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I")
    image = read_image_file(path, "RGB")
    np.testing.assert_array_equal(image, read_image_8bit(path, "RGB"))
    assert image.shape == (24, 32, 3) and image.dtype == np.uint8
    assert image.min() == 0 and image.max() == 255 and 100 < image.mean() < 155, image.mean()  # scaled, not clipped
