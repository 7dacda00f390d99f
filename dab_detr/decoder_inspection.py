"""Looking inside a trained DAB-DETR decoder: its learned anchors, the box of each decoder layer,
and the positional attention of its cross-attention (the paper's Figures 4, 6, 7, 10 and 11).

Everything is read from the model's own modules: the per-layer boxes from ``DABDETR.predict``
(its ``aux_outputs``), the attention from forward hooks on the chosen decoder layer's
projections. Nothing of the model is re-implemented here except the final dot product and
softmax of the positional part, whose agreement with the module's own attention is tested
(``tests/test_visualize.py``: the captured queries and keys reproduce the module's output).
"""
import contextlib
from typing import Dict, Optional, Sequence

import torch
from torchvision.ops import box_convert

__all__ = ["learned_anchors", "decoder_layer_boxes", "positional_attention", "capture_cross_attention"]


def _dab_decoder(model):
    decoder = getattr(getattr(model, "transformer", None), "decoder", None)
    if decoder is None or not hasattr(decoder, "ref_point_head"):
        raise ValueError(f"{type(model).__name__} is not a DAB-DETR model (no transformer.decoder with "
                         "dynamic anchors); these pictures are made for DABDETR")
    return decoder


def learned_anchors(model) -> Dict:
    """The learned anchors: ``anchors`` [Q, 4] normalized (cx, cy, w, h) (sigmoid of the
    ``refpoint_embed`` weights) and ``num_patterns`` (0 or P: the P patterns share these anchors,
    the original code repeats them per pattern)."""
    _dab_decoder(model)
    with torch.no_grad():
        anchors = model.refpoint_embed().sigmoid().cpu()
    patterns = model.transformer.num_patterns
    return {"anchors": anchors, "num_patterns": patterns}


def _run(predictor, image):
    """One image through ``predict``: the raw outputs and the geometry to map them back."""
    model = predictor.model
    inputs = predictor.prepare([image])
    with torch.no_grad():
        batch = model.preprocess_image(inputs)
        outputs = model.predict(batch.tensor, model.padding_mask(batch))
    geometry = {"input_size": (inputs[0]["height"], inputs[0]["width"]),
                "resized_size": tuple(batch.image_sizes[0]), "padded_size": tuple(batch.tensor.shape[-2:])}
    return outputs, geometry


def _to_input_xyxy(boxes: torch.Tensor, input_size) -> torch.Tensor:
    """[..., 4] normalized (cx, cy, w, h) -> absolute (x0, y0, x1, y1) in the input image (H, W)."""
    height, width = input_size
    return box_convert(boxes, "cxcywh", "xyxy") * boxes.new_tensor([width, height, width, height])


def _top_queries(logits: torch.Tensor, k: int):
    """logits [Q, C] -> (query indices [k], scores [k], classes [k]) of the k best-scoring queries."""
    best, classes = logits.sigmoid().max(dim=1)
    scores, index = best.topk(min(k, best.numel()))
    return index, scores, classes[index]


def _check_queries(queries, total: int):
    bad = [q for q in queries if not 0 <= int(q) < total]
    if bad:
        raise ValueError(f"query indices {bad} do not exist: the model has {total} decoder queries (0..{total - 1})")


def decoder_layer_boxes(predictor, image, top_k: int = 5, queries: Optional[Sequence[int]] = None) -> Dict:
    """The box of each decoder layer for the top detections of one image (Figure 11).

    Args:
        predictor: a ``dab_detr.Predictor`` of a DAB-DETR model.
        image: anything the predictor takes.
        top_k: how many queries, by best class score of the last layer (when ``queries`` is None).

    Returns:
        ``queries`` [K] query indices, ``scores`` [K] and ``classes`` [K] of the last layer,
        ``anchors`` [K, 4] the learned anchors of those queries and ``boxes`` [L, K, 4] each
        layer's predicted box, both absolute (x0, y0, x1, y1) in the input image's pixels;
        ``input_size`` (H, W).
    """
    model = predictor.model
    _dab_decoder(model)
    outputs, geometry = _run(predictor, image)
    logits = outputs["pred_logits"][0]
    if queries is None:
        index, scores, classes = _top_queries(logits, top_k)
    else:
        _check_queries(queries, logits.shape[0])
        index = torch.as_tensor(list(queries), device=logits.device)
        scores, classes = logits[index].sigmoid().max(dim=1)
    layers = [a["pred_boxes"][0] for a in outputs["aux_outputs"]] + [outputs["pred_boxes"][0]]
    boxes = torch.stack([b[index] for b in layers])
    anchors = model.refpoint_embed().sigmoid().repeat(max(1, model.transformer.num_patterns), 1)[index]
    size = geometry["input_size"]
    return {"queries": index.cpu(), "scores": scores.cpu(), "classes": classes.cpu(),
            "anchors": _to_input_xyxy(anchors.detach(), size).cpu(), "boxes": _to_input_xyxy(boxes, size).cpu(),
            "input_size": size}


@contextlib.contextmanager
def capture_cross_attention(model, layer: int):
    """Record what the cross-attention of decoder layer ``layer`` computes, with forward hooks.

    Yields a dict filled during the forward pass: ``query``, ``key``, ``value`` [B, L, D] and
    ``key_padding_mask`` [B, HW] as passed to the attention module, ``output`` its result,
    ``query_pos`` [B, Q, d] (``ca_qpos_sine_proj``: the modulated positional query), ``key_pos``
    [B, HW, d] (``ca_kpos_proj``: the image positions), ``feature_size`` (H, W) of the map the
    keys come from (``input_proj``'s output), ``num_heads``.
    """
    decoder = _dab_decoder(model)
    if not 0 <= layer < len(decoder.layers):
        raise ValueError(f"decoder layer {layer} does not exist: the model has {len(decoder.layers)} "
                         f"(0..{len(decoder.layers) - 1})")
    target = decoder.layers[layer]
    record = {"num_heads": target.cross_attn.num_heads}

    def before_attention(module, args, kwargs):
        names = ("query", "key", "value", "key_padding_mask")
        record.update(zip(names, args))
        record.update({k: v for k, v in kwargs.items() if k in names})

    def keep(name):
        def hook(module, args, output):
            record[name] = output
        return hook

    handles = [
        target.cross_attn.register_forward_pre_hook(before_attention, with_kwargs=True),
        target.cross_attn.register_forward_hook(keep("output")),
        target.ca_qpos_sine_proj.register_forward_hook(keep("query_pos")),
        target.ca_kpos_proj.register_forward_hook(keep("key_pos")),
        model.input_proj.register_forward_hook(lambda m, a, out: record.update(feature_size=tuple(out.shape[-2:]))),
    ]
    try:
        yield record
    finally:
        for handle in handles:
            handle.remove()


def attention_logits(query: torch.Tensor, key: torch.Tensor, num_heads: int, scale: float,
                     key_padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Scaled dot products per head: query [B, Q, D], key [B, K, D] -> [B, heads, Q, K]; padded keys
    (mask True) get -inf."""
    batch = query.shape[0]
    q = query.view(batch, query.shape[1], num_heads, -1).transpose(1, 2)
    k = key.view(batch, key.shape[1], num_heads, -1).transpose(1, 2)
    logits = (q @ k.transpose(-1, -2)) * scale
    if key_padding_mask is not None:
        logits = logits.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
    return logits


@contextlib.contextmanager
def _model_settings(model, modulation: bool, temperature: Optional[float]):
    """Temporarily switch the width/height modulation off (the decoder's own unmodulated path:
    ``ref_anchor_head`` absent, as a model built with ``modulate_hw_attn=False``) and/or set the
    image position embedding's temperature."""
    decoder = _dab_decoder(model)
    head = decoder.ref_anchor_head
    pe = model.position_embedding
    old_temperature = (pe.temperature_h, pe.temperature_w)
    if not modulation:
        decoder.ref_anchor_head = None
    if temperature is not None:
        pe.temperature_h = pe.temperature_w = float(temperature)
    try:
        yield
    finally:
        decoder.ref_anchor_head = head
        pe.temperature_h, pe.temperature_w = old_temperature


def positional_attention(predictor, image, layer: int = -1, queries: Optional[Sequence[int]] = None,
                         top_k: int = 3, modulation: bool = True, temperature: Optional[float] = None) -> Dict:
    """The positional attention map of a decoder layer's cross-attention for chosen queries
    (Figures 4, 6 and 7).

    The cross-attention logits of DAB-DETR are (q_content . k_content + q_pos . k_pos) * scale
    per head; the positional map is softmax over the image of the positional term alone, with
    q_pos the layer's (modulated) positional query and k_pos its projected image positions,
    both captured from the model's own modules. Each map sums to 1 over the image.

    Args:
        layer: decoder layer (negative counts from the end; default the last).
        queries: query indices; default the ``top_k`` best-scoring queries of the full model.
        modulation: False runs the decoder without its width/height modulation (same weights).
        temperature: if given, the image position embedding's temperature for this pass
            (``position_embedding.temperature_h/w``; the anchor embedding keeps its 10000).

    Returns:
        ``maps`` [K, heads, Hf, Wf] (softmax per head over the Hf x Wf feature map),
        ``queries`` [K], ``boxes`` [K, 4] the last layer's boxes of those queries in input pixels
        (x0, y0, x1, y1), ``feature_size`` (Hf, Wf), ``extent``: the input-pixel (width, height)
        the feature map's cells cover (cells of ``stride`` resized pixels, mapped back to the input),
        ``input_size`` (H, W).
    """
    model = predictor.model
    decoder = _dab_decoder(model)
    if not modulation and decoder.ref_anchor_head is None:
        raise ValueError("the model has no width/height modulation (built with modulate_hw_attn=False)")
    if layer < 0:
        layer += len(decoder.layers)
    if queries is None:
        queries = decoder_layer_boxes(predictor, image, top_k=top_k)["queries"].tolist()
    with _model_settings(model, modulation, temperature), capture_cross_attention(model, layer) as record:
        outputs, geometry = _run(predictor, image)
    _check_queries(queries, record["query_pos"].shape[1])
    index = torch.as_tensor(list(queries), device=record["query_pos"].device)
    scale = (record["query"].shape[-1] / record["num_heads"]) ** -0.5  # the attention's own softmax scale
    logits = attention_logits(record["query_pos"][:, index], record["key_pos"], record["num_heads"], scale,
                              record.get("key_padding_mask"))
    maps = logits.softmax(dim=-1)[0].transpose(0, 1)  # [K, heads, HW]
    feature_size = record["feature_size"]
    height, width = geometry["input_size"]
    resized_h, resized_w = geometry["resized_size"]
    stride = model.backbone.output_shape()[model.in_feature].stride  # feature cell size in resized pixels
    return {
        "maps": maps.reshape(maps.shape[0], maps.shape[1], *feature_size).cpu(),
        "queries": index.cpu(),
        "boxes": _to_input_xyxy(outputs["pred_boxes"][0][index], (height, width)).cpu(),
        "feature_size": feature_size,
        "extent": (feature_size[1] * stride * width / resized_w, feature_size[0] * stride * height / resized_h),
        "input_size": (height, width),
    }
