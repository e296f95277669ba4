"""Evaluation of mini-clip on SynthDrive: retrieval precision@k of text queries with attribute ground truth, and
the presence accuracy of the image tower's dense object head.

    >>> from shusheng.data import PLAIN_QUERIES, sample
    >>> from shusheng.miniclip import load_bundled
    >>> from shusheng.miniclip.evaluation import evaluate_queries
    >>> model = load_bundled()
    >>> scenes = [sample(2023, i, 128) for i in range(1000)]    # (image, annotation) of the fixed test set
    >>> res = evaluate_queries(model.embed_images([img for img, _ in scenes]),
    ...                        model.embed_texts([q.text for q in PLAIN_QUERIES]), PLAIN_QUERIES,
    ...                        [ann.attributes for _, ann in scenes])   # {"p_at_k": ..., "per_query": [...]}

Also here: :func:`dense_targets` (the dense head's per-cell targets, shared with training) and
:func:`load_tower_init` (the image-tower weights of a mini-clip folder or of a stage-1 ``tower.safetensors``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from shusheng.data.synthdrive import DENSE_LABELS
from shusheng.data.synthdrive_cache import SplitCache
from shusheng.data.synthdrive_queries import Query, relevance_matrix
from shusheng.data.synthdrive_render import VEHICLE_TYPES

__all__ = ["DENSE_GROUPS", "dense_targets", "embed_uint8", "evaluate_dense", "evaluate_queries", "evaluate_split",
           "load_tower_init", "precision_at_k"]

# --------------------------------------------------------------------------------------------------------
# Retrieval
# --------------------------------------------------------------------------------------------------------


def precision_at_k(scores: np.ndarray, relevant: np.ndarray, k: int = 10) -> np.ndarray:
    """Per query, the fraction of the top-``k`` items (by score, ties broken by index) that are relevant.

    Args:
        scores: ``(n_queries, n_items)`` similarities.
        relevant: ``(n_queries, n_items)`` booleans.
        k: cut-off.
    """
    k = min(k, scores.shape[1])
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]  # (Q, k)
    return np.take_along_axis(relevant, top, axis=1).mean(axis=1)


def evaluate_queries(image_emb: np.ndarray, query_emb: np.ndarray, queries: Sequence[Query],
                     attributes: Sequence[dict], k: int = 10) -> dict[str, Any]:
    """Exact-search precision@k of ``queries`` over images with the given embeddings and ``attributes``.

    Returns:
        ``{"p_at_k": mean, "k": k, "per_query": [{"query", "p_at_k", "n_relevant"}, ...]}``.
    """
    rel = relevance_matrix(queries, attributes)
    p = precision_at_k(query_emb @ image_emb.T, rel, k)
    per = [{"query": q.text, "p_at_k": float(v), "n_relevant": int(r.sum())} for q, v, r in zip(queries, p, rel)]
    return {"p_at_k": float(p.mean()), "k": k, "per_query": per}


@torch.inference_mode()
def embed_uint8(model, images: torch.Tensor, batch_size: int = 128) -> np.ndarray:
    """Image embeddings of a ``(N, 3, S, S)`` uint8 tensor (at the model's input size)."""
    was_training = model.training
    model.eval()
    out = []
    for s in range(0, len(images), batch_size):
        pixels = model.normalize_uint8(images[s:s + batch_size].to(model.device))
        out.append(model.encode_image(pixels).float().cpu())
    model.train(was_training)
    return torch.cat(out).numpy()


@torch.inference_mode()
def evaluate_split(model, split: SplitCache, query_sets: dict[str, tuple[Sequence[Query], torch.Tensor]],
                   k: int = 10) -> dict[str, Any]:
    """P@k of each query set (queries + their cached frozen-encoder embeddings) over a rendered split."""
    img = embed_uint8(model, split.images)
    res = {}
    for name, (queries, sent_emb) in query_sets.items():
        q = model.encode_text_features(sent_emb.to(model.device)).float().cpu().numpy()
        res[name] = evaluate_queries(img, q, queries, split.attributes, k)
    return res


# --------------------------------------------------------------------------------------------------------
# Dense object head
# --------------------------------------------------------------------------------------------------------


def dense_targets(labels: torch.Tensor, num_labels: int, cell: int = 8) -> torch.Tensor:
    """``(B, S, S)`` uint8 label maps (:func:`shusheng.data.synthdrive.dense_labels`) → ``(B, num_labels, S/cell,
    S/cell)`` float: 1 where the cell shows at least one pixel of that label."""
    onehot = F.one_hot(labels.long(), num_labels + 1)[..., 1:].permute(0, 3, 1, 2).float()
    return F.max_pool2d(onehot, cell)


def _span(names: Sequence[str], keep) -> tuple[int, int]:
    idx = [i for i, n in enumerate(names) if keep(n)]
    if not idx or idx != list(range(idx[0], idx[-1] + 1)):
        raise ValueError(f"a dense label group must be contiguous and non-empty in DENSE_LABELS, got {idx}")
    return idx[0], idx[-1] + 1


#: label groups of the dense head reported by :func:`evaluate_dense`: name -> index range in ``DENSE_LABELS``
DENSE_GROUPS: dict[str, tuple[int, int]] = {
    "vehicles": _span(DENSE_LABELS, lambda n: n.split()[-1] in VEHICLE_TYPES),
    "pedestrians": _span(DENSE_LABELS, lambda n: n.startswith("person ")),
    "traffic light": _span(DENSE_LABELS, lambda n: n.startswith("light ")),
    "sign": _span(DENSE_LABELS, lambda n: n.startswith("sign ")),
    "crosswalk": _span(DENSE_LABELS, lambda n: n == "crosswalk"),
}


@torch.inference_mode()
def evaluate_dense(model, split: SplitCache, batch_size: int = 250) -> dict[str, float]:
    """Per-image presence accuracy of ``model``'s dense head on a split: for each label group, the fraction of
    images whose every label of the group is predicted present/absent correctly (max cell logit > 0)."""
    tower = model.visual
    was_training = tower.training
    tower.eval()
    pred = []
    for s in range(0, len(split.images), batch_size):
        pixels = model.normalize_uint8(split.images[s:s + batch_size].to(model.device))
        pred.append(tower.features_and_dense(pixels)[1].amax((2, 3)).cpu() > 0)
    tower.train(was_training)
    pred = torch.cat(pred)
    true = dense_targets(split.labels, len(DENSE_LABELS)).amax((2, 3)) > 0.5
    ok = pred == true
    return {name: float(ok[:, a:b].all(1).float().mean()) for name, (a, b) in DENSE_GROUPS.items()}


def load_tower_init(path: str | Path) -> dict[str, torch.Tensor]:
    """The image-tower state dict (float32) of a mini-clip folder (``save_pretrained``: its ``visual.*``
    tensors) or of a stage-1 ``tower.safetensors``."""
    from safetensors.torch import load_file

    p = Path(path)
    if p.is_dir():
        p = p / "model.safetensors"
        if not p.is_file():
            raise FileNotFoundError(f"tower_init: {p} not found (expected a mini-clip folder or tower.safetensors)")
        sd = {k[len("visual."):]: v for k, v in load_file(str(p)).items() if k.startswith("visual.")}
        if not sd:
            raise ValueError(f"tower_init: {p} holds no image-tower (visual.*) tensors")
    elif p.is_file():
        sd = load_file(str(p))
    else:
        raise FileNotFoundError(f"tower_init: {p} does not exist")
    return {k: v.float() for k, v in sd.items()}
