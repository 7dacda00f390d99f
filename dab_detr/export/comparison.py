"""Comparison of two detection lists (an exported program's against PyTorch's)."""
from dataclasses import dataclass

import numpy as np

__all__ = ["DetectionDifference", "compare_detections"]


@dataclass
class DetectionDifference:
    """How far ``candidate`` detections are from ``reference`` ones.

    Attributes:
        max_score_diff: largest |score difference|, rank by rank (both lists sorted descending).
        max_box_diff: largest |coordinate difference| in pixels over matched detections.
        unmatched: candidate detections with no reference detection of the same label, a score
            within ``score_tol`` and a box within ``box_tol`` (see :func:`compare_detections`).
        boundary_swaps: candidates without a counterpart whose score is within ``score_tol`` of
            the K-th reference score (rounding swapped them with a detection just below the top K).
        num_detections: K.
    """

    max_score_diff: float
    max_box_diff: float
    unmatched: int
    boundary_swaps: int
    num_detections: int
    score_tol: float
    box_tol: float

    @property
    def ok(self) -> bool:
        return self.unmatched == 0 and self.max_score_diff <= self.score_tol and self.max_box_diff <= self.box_tol

    def __str__(self) -> str:
        return (f"max |score diff| {self.max_score_diff:.2e} (tolerance {self.score_tol:g}), max |box diff| "
                f"{self.max_box_diff:.2e} px (tolerance {self.box_tol:g}), {self.unmatched} of "
                f"{self.num_detections} detections without a counterpart, {self.boundary_swaps} swapped at the top-K boundary")


def compare_detections(reference, candidate, score_tol: float = 1e-4, box_tol: float = 1e-2) -> DetectionDifference:
    """Compare (boxes [K, 4], scores [K], labels [K]) tuples of numpy arrays or tensors.

    Detections are compared rank by rank. Only where two detections have scores closer than
    ``score_tol`` (so that rounding may legitimately swap their ranks) may a candidate match a
    reference detection of another rank: each candidate is matched to an unused reference
    detection with the same label, a score within ``score_tol`` and the closest box, and counts
    as unmatched when none has its box within ``box_tol``, unless its score is within
    ``score_tol`` of the K-th reference score (then it may have swapped places with a detection
    just outside the top K, counted as ``boundary_swaps``).
    """
    ref_boxes, ref_scores, ref_labels = (np.asarray(_numpy(a), dtype=np.float64) for a in reference)
    boxes, scores, labels = (np.asarray(_numpy(a), dtype=np.float64) for a in candidate)
    if boxes.shape != ref_boxes.shape or scores.shape != ref_scores.shape or labels.shape != ref_labels.shape:
        raise ValueError(f"detection shapes differ: reference boxes {ref_boxes.shape}, scores {ref_scores.shape}, "
                         f"labels {ref_labels.shape}; candidate {boxes.shape}, {scores.shape}, {labels.shape}")
    k = len(scores)
    max_score = float(np.abs(scores - ref_scores).max()) if k else 0.0
    used = np.zeros(k, dtype=bool)
    max_box, unmatched, boundary = 0.0, 0, 0
    for i in range(k):
        close = np.flatnonzero((np.abs(ref_scores - scores[i]) <= score_tol) & (ref_labels == labels[i]) & ~used)
        box_diff = np.abs(ref_boxes[close] - boxes[i]).max(1) if close.size else np.zeros(0)
        if close.size and box_diff.min() <= box_tol:
            best = int(np.argmin(box_diff))
            used[close[best]] = True
            max_box = max(max_box, float(box_diff[best]))
        elif abs(scores[i] - ref_scores[-1]) <= score_tol:
            boundary += 1  # swapped with a detection just below the top K
        else:
            unmatched += 1
            if close.size:
                max_box = max(max_box, float(box_diff.min()))
    return DetectionDifference(max_score, max_box, unmatched, boundary, k, score_tol, box_tol)


def _numpy(x):
    return x.detach().cpu().numpy() if hasattr(x, "detach") else x
