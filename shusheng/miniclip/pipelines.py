"""``EmbeddingPipeline``: images → unit-norm embeddings of a :class:`~shusheng.miniclip.MiniClip`, streamed,
with per-item errors and the in-domain check of :mod:`shusheng.pipelines`.

    >>> from shusheng.miniclip.pipelines import EmbeddingPipeline
    >>> pipe = EmbeddingPipeline.from_pretrained()             # the bundled shusheng-mini-clip
    >>> out = pipe(["street.png", "portrait.jpg"])
    >>> out.embeddings.shape, out.in_domain                    # (2, 384), [True, False]

Search (``shusheng.retrieval_index``) embeds through the model's own ``embed_images``, or through this pipeline
when it is given a ``runtime``; its results do not depend on the in-domain check.

``runtime="onnxruntime"`` / ``"tensorrt"`` / ``"auto"`` runs the image tower (:class:`ImageTower`: pixels →
embedding and the features the domain check reads) outside eager PyTorch (:mod:`shusheng.runtimes`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from shusheng.miniclip.model import MODEL_NAME, MiniClip
from shusheng.pipelines import Pipeline, PipelineOutput, as_image_list

__all__ = ["EmbeddingOutput", "EmbeddingPipeline", "ImageTower"]


class ImageTower(torch.nn.Module):
    """The image side of a :class:`MiniClip`: normalised pixels ``(B, 3, S, S)`` → ``(embedding, features)``,
    the L2-normalised ``(B, dim)`` embedding and the pooled ``(B, feature_dim)`` tower features before the
    projection. What ``shusheng export shusheng-mini-clip`` writes; shares the model's weights."""

    def __init__(self, model: MiniClip):
        super().__init__()
        self.visual = model.visual

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.visual.features(pixels)  # (B, feature_dim)
        return torch.nn.functional.normalize(self.visual.project(feats), dim=-1), feats


@dataclass
class EmbeddingOutput(PipelineOutput):
    """Attributes:
        embeddings: ``(n, dim)`` float32, rows L2-normalised; a failed item's row is NaN (see ``errors``).
        in_domain, domain_score, errors: see :class:`shusheng.pipelines.PipelineOutput`.
    """

    embeddings: np.ndarray


class EmbeddingPipeline(Pipeline):
    """Image embeddings of a mini-clip model."""

    model_class = MiniClip
    bundled_model = MODEL_NAME

    def domain_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """The pooled tower features before the projection ``(B, feature_dim)``."""
        return self.model.visual.features(pixels)

    def image_module(self) -> ImageTower:
        return ImageTower(self.model)

    def __call__(self, images: Any, batch_size: int = 32, on_error: str = "item") -> EmbeddingOutput:
        """Embed images.

        Args:
            images: one image or a list (paths, bytes, file objects, PIL images).
            batch_size: images decoded and embedded at a time.
            on_error: ``"item"`` (a NaN row and the reason in ``errors``) or ``"raise"``.
        """
        images = as_image_list(images)
        n = len(images)
        out = self._empty(n)
        emb = np.full((n, self.model.dim), np.nan, dtype=np.float32)
        with torch.inference_mode():
            for batch in self.batches(images, batch_size, on_error):
                if batch.pixels is None:
                    self._fill(out, batch, [], [])
                    continue
                vec, feats = self.image_outputs(batch.pixels)
                emb[batch.index] = vec.float().cpu().numpy()
                self._fill(out, batch, *self.score_features(feats, len(batch.index)))
        return EmbeddingOutput(embeddings=emb, **out)
