"""Dense InternImage towers: an InternImage with a fused stride-8 map and a dense object head.

:class:`DenseTower` is the image tower of ``shusheng-mini-clip`` (:mod:`shusheng.miniclip`);
:class:`DenseTowerBackbone` exposes it as a ``forward_features`` backbone for other model families (registered
as ``"shusheng-mini-clip-tower"`` in :func:`shusheng.backbone.create_backbone`), and
:class:`shusheng.detection.DenseObjectDetector` reads its dense head as a region detector. ``count_components``
counts 4-connected objects in the dense maps, batched.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from shusheng.backbone.internimage import InternImage
from shusheng.modeling import Preprocess, PretrainedMixin

__all__ = ["DenseTower", "DenseTowerBackbone", "components", "count_components"]


class DenseTower(nn.Module):
    """InternImage levels → image features → (optional) linear projection to an embedding space.

    With ``num_dense_labels > 0`` the tower also has a dense object head: the levels at strides 8, 16 and 32 are
    fused (1x1 lateral convolutions, nearest upsampling to stride 8, sum) and a small convolutional head predicts,
    per stride-8 cell, which described objects it shows (``shusheng.data.synthdrive.DENSE_LABELS``: vehicle
    colour x type, pedestrians, traffic-light state, sign kind, crosswalk). Training supervises it densely, which
    is what makes few-pixel objects (a traffic-light head at 128 px) learnable; at inference its per-image
    maxima ("is there a red car anywhere?") and the max-pooled fused features join the pooled last level in the
    image features that are projected.
    """

    def __init__(self, channels: int = 32, depths: Sequence[int] = (1, 1, 3, 1), groups: Sequence[int] = (2, 4, 8, 16),
                 mlp_ratio: float = 4.0, drop_path_rate: float = 0.0, num_dense_labels: int = 0,
                 dense_dim: int = 128, embed_dim: int | None = 384, dcn_backend: str | None = None):
        super().__init__()
        self.backbone = InternImage(channels=channels, depths=tuple(depths), groups=tuple(groups),
                                    mlp_ratio=mlp_ratio, drop_path_rate=drop_path_rate, num_classes=0,
                                    backend=dcn_backend)
        # the classification conv head is not used: keep only the levels (state dict without conv_head.*)
        self.backbone.prune_intermediate_layers(len(depths), prune_head=True)
        chans = self.backbone.level_channels
        width = chans[-1]
        self.norm = nn.LayerNorm(width)
        self.num_dense_labels = num_dense_labels
        if num_dense_labels > 0:
            if len(chans) < 3:
                raise ValueError("the dense object head needs an image tower with at least 3 levels")
            d = dense_dim
            self.lateral = nn.ModuleList(nn.Conv2d(c, d, 1) for c in chans[-3:])  # strides 8, 16, 32
            self.dense_head = nn.Sequential(nn.Conv2d(d, d, 3, padding=1), nn.GELU(),
                                            nn.Conv2d(d, num_dense_labels, 1))
            nn.init.constant_(self.dense_head[-1].bias, -4.0)  # objects are rare per cell
            self.feature_dim = 2 * width + d + num_dense_labels
        else:
            self.feature_dim = 2 * width
        if embed_dim is not None:
            self.proj = nn.Linear(self.feature_dim, embed_dim)
            nn.init.trunc_normal_(self.proj.weight, std=0.02)
            nn.init.zeros_(self.proj.bias)

    def features_and_dense(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Pixels ``(B, 3, S, S)`` → image features ``(B, feature_dim)`` and dense object logits
        ``(B, num_dense_labels, S/8, S/8)`` (None without the dense head)."""
        if self.num_dense_labels == 0:
            x = self.backbone.forward_features(pixels)  # (B, 8C, H/32, W/32)
            x = self.norm(x.flatten(2).transpose(1, 2))  # (B, HW/1024, 8C)
            return torch.cat([x.mean(1), x.amax(1)], dim=-1), None
        levels, fused, dense = self._fused_and_dense(pixels)
        x = self.norm(levels[-1].flatten(2).transpose(1, 2))  # (B, HW/1024, 8C)
        feats = torch.cat([x.mean(1), x.amax(1), fused.amax((2, 3)), torch.sigmoid(dense.amax((2, 3)))], dim=-1)
        return feats, dense

    def _fused_and_dense(self, pixels: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        levels = self.backbone.forward_intermediates(pixels, intermediates_only=True)[-3:]
        fused = self.lateral[0](levels[0])
        for i in (1, 2):
            fused = fused + _upsample_to(self.lateral[i](levels[i]), fused.shape[-2:])
        return levels, fused, self.dense_head(fused)  # dense: (B, L, S/8, S/8)

    def fused_and_dense(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The fused stride-8 map ``(B, dense_dim, S/8, S/8)`` and the dense logits ``(B, L, S/8, S/8)``."""
        if self.num_dense_labels == 0:
            raise ValueError("this tower has no dense object head")
        return self._fused_and_dense(pixels)[1:]

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.features_and_dense(pixels)[0]

    def project(self, features: torch.Tensor) -> torch.Tensor:
        return self.proj(features)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.proj(self.features(pixels))  # (B, embed_dim)


def _upsample_to(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Nearest upsampling of ``x`` to ``size``. Exported (ONNX), an exact integer factor is written as a constant
    scale rather than as sizes computed from the input's shape, so that ONNX shape inference keeps the spatial
    size that later ops (adaptive pooling) need."""
    h, w = int(x.shape[-2]), int(x.shape[-1])
    if (torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()) and size[0] % h == 0 and size[1] % w == 0:
        return F.interpolate(x, scale_factor=(float(size[0] // h), float(size[1] // w)), mode="nearest")
    return F.interpolate(x, size=size, mode="nearest")


def components(mask: np.ndarray) -> list[list[tuple[int, int]]]:
    """4-connected components of a small boolean grid, as lists of ``(row, col)`` cells."""
    seen = np.zeros_like(mask, dtype=bool)
    out = []
    for r0, c0 in zip(*np.nonzero(mask)):
        if seen[r0, c0]:
            continue
        stack, comp = [(int(r0), int(c0))], []
        seen[r0, c0] = True
        while stack:
            r, c = stack.pop()
            comp.append((r, c))
            for rr, cc in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)):
                if 0 <= rr < mask.shape[0] and 0 <= cc < mask.shape[1] and mask[rr, cc] and not seen[rr, cc]:
                    seen[rr, cc] = True
                    stack.append((rr, cc))
        out.append(comp)
    return out


#: object groups of the SynthDrive dense labels, as ``[start, stop)`` label ranges (crosswalk stripes are a
#: surface, not an object box)
DENSE_OBJECT_GROUPS: dict[str, tuple[int, int]] = {"vehicle": (0, 24), "person": (24, 26), "traffic light": (26, 29),
                                                    "sign": (29, 34)}


def dense_boxes(prob: np.ndarray, size: tuple[int, int], labels: Sequence[str], threshold: float = 0.5,
                min_cells: int = 1, groups: dict[str, tuple[int, int]] | None = None) -> list[dict]:
    """Labelled object boxes from one image's dense-head probabilities.

    Per object group, cells whose best label probability is at least ``threshold`` are joined into 4-connected
    components; each component becomes one box (its cells' extent mapped to image pixels) labelled with the
    group's label of highest summed probability over the component.

    Args:
        prob: ``(L, gh, gw)`` label probabilities (sigmoid of the dense head).
        size: ``(width, height)`` of the image the boxes are reported in.
        labels: the ``L`` label names.
        threshold, min_cells: cell threshold and smallest component kept.
        groups: ``{group: (start, stop)}`` label ranges (default :data:`DENSE_OBJECT_GROUPS`).

    Returns:
        ``[{"box": [x, y, w, h], "label", "score"}]``, best score first.
    """
    w, h = size
    gh, gw = prob.shape[1:]
    sx, sy = w / gw, h / gh  # image pixels per cell
    found = []
    for a, b in (groups or DENSE_OBJECT_GROUPS).values():
        group = prob[a:b]
        best = group.max(0)
        for cells in components(best >= threshold):
            if len(cells) < min_cells:
                continue
            ys, xs = zip(*cells)
            label = a + int(np.sum([group[:, y, x] for y, x in cells], axis=0).argmax())
            x0, y0 = int(np.floor(min(xs) * sx)), int(np.floor(min(ys) * sy))
            x1, y1 = int(np.ceil((max(xs) + 1) * sx)), int(np.ceil((max(ys) + 1) * sy))
            found.append({"box": [x0, y0, min(x1, w) - x0, min(y1, h) - y0], "label": labels[label],
                          "score": float(max(best[y, x] for y, x in cells))})
    return sorted(found, key=lambda d: -d["score"])


def count_components(mask: torch.Tensor) -> torch.Tensor:
    """Number of 4-connected components of each boolean map: ``(..., H, W)`` -> ``(...)`` int64.

    Batched label propagation: every cell starts with its own id and repeatedly takes the largest id among itself
    and its four neighbours inside the mask; a component keeps exactly one cell whose final id is its own.
    """
    *lead, h, w = mask.shape
    m = mask.reshape(-1, 1, h, w)
    own = torch.arange(1, h * w + 1, device=mask.device, dtype=torch.float32).view(1, 1, h, w)
    ids = own * m
    if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
        # a traced loop would keep only the iterations of the example input: export a real loop instead
        ids = _scripted_propagation()(ids, m.to(ids.dtype), h * w)
        return ((ids == own) & m).flatten(1).sum(1).reshape(lead)
    for _ in range(h * w):
        p = F.pad(ids, (1, 1, 1, 1))
        nxt = torch.maximum(torch.maximum(torch.maximum(p[..., :-2, 1:-1], p[..., 2:, 1:-1]),
                                          torch.maximum(p[..., 1:-1, :-2], p[..., 1:-1, 2:])), ids) * m
        if torch.equal(nxt, ids):
            break
        ids = nxt
    return ((ids == own) & m).flatten(1).sum(1).reshape(lead)


@functools.cache
def _scripted_propagation():
    """The propagation of :func:`count_components` as a TorchScript function: exported (ONNX, TorchScript) it
    is a ``Loop`` that stops when no id changes, exact for any input (scripted on first use, not at import)."""

    def propagate(ids: torch.Tensor, m: torch.Tensor, max_steps: int) -> torch.Tensor:
        changed = True
        step = 0
        while changed and step < max_steps:
            p = F.pad(ids, [1, 1, 1, 1])
            nxt = torch.maximum(torch.maximum(torch.maximum(p[:, :, :-2, 1:-1], p[:, :, 2:, 1:-1]),
                                              torch.maximum(p[:, :, 1:-1, :-2], p[:, :, 1:-1, 2:])), ids) * m
            changed = bool((nxt != ids).any())
            ids = nxt
            step += 1
        return ids

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated; ONNX Loop export still needs it
        return torch.jit.script(propagate)


class DenseTowerBackbone(PretrainedMixin, nn.Module):
    """A dense tower (e.g. the mini-clip image tower) as a ``forward_features`` backbone for other models (the
    unified decoder's image tokenizer): ``(B, 3, S, S)`` → ``(B, dense_dim + L, grid, grid)`` (``dense_dim + 3 L``
    with ``summary``), the fused stride-8 map average-pooled and the dense-head probabilities max-pooled to a
    ``grid x grid`` map ("is there a red light in this block?"). What these tokens let a linear probe read is
    measured in the ``shusheng-mini-clip`` model card.

    With ``summary=True`` every block also carries two image-level statistics per dense label, the same for all
    blocks: the label's highest probability anywhere in the image, and the number of objects of that label (the
    4-connected components of its stride-8 cells at probability >= 0.5, as :class:`shusheng.detection.DenseObjectDetector` finds
    them). "What colour is the light?" then reads from any one token instead of a search over all of them, and
    "how many buses?" from a count instead of block areas.

    Args:
        grid: output side.
        summary: append the image-level maxima and object counts (``2 * L`` more channels).
        channels, depths, groups, mlp_ratio, drop_path_rate, num_dense_labels, dense_dim: the tower (see
            :class:`DenseTower`; ``num_dense_labels`` must be > 0).
        image_size: the input side the tower was trained at.
    """

    def __init__(self, grid: int = 4, summary: bool = False, channels: int = 32,
                 depths: Sequence[int] = (1, 1, 3, 1), groups: Sequence[int] = (2, 4, 8, 16),
                 mlp_ratio: float = 4.0, drop_path_rate: float = 0.0, num_dense_labels: int = 35,
                 dense_dim: int = 128, image_size: int = 128, num_classes: int = 0,
                 dcn_backend: str | None = None):
        super().__init__()
        if num_classes:
            raise ValueError("DenseTowerBackbone is headless: num_classes must be 0")
        self._args = dict(grid=grid, summary=summary, channels=channels, depths=list(depths), groups=list(groups),
                          mlp_ratio=mlp_ratio, drop_path_rate=drop_path_rate, num_dense_labels=num_dense_labels,
                          dense_dim=dense_dim, image_size=image_size)
        if num_dense_labels <= 0:
            raise ValueError("DenseTowerBackbone needs a tower with a dense head (num_dense_labels > 0)")
        # the embedding projection is not part of this backbone (embed_dim=None)
        self.tower = DenseTower(channels, depths, groups, mlp_ratio, drop_path_rate, num_dense_labels, dense_dim,
                                embed_dim=None, dcn_backend=dcn_backend)
        self.grid = grid
        self.summary = summary
        self.image_size = image_size  # the input side the tower was trained at (recorded, not enforced)
        self.num_features = dense_dim + num_dense_labels * (3 if summary else 1)

    def forward_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.features_and_dense(pixels)[0]

    def features_and_dense(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`forward_features` and the dense-head probabilities ``(B, L, h, w)`` it was made from, in one
        pass (callers that also want object boxes need not run the tower twice)."""
        fused, dense = self.tower.fused_and_dense(pixels)
        prob = torch.sigmoid(dense)  # (B, L, h, w)
        parts = [F.adaptive_avg_pool2d(fused, self.grid), F.adaptive_max_pool2d(prob, self.grid)]
        if self.summary:
            stats = torch.cat([prob.amax((2, 3)), count_components(prob >= 0.5).to(prob.dtype)], 1)  # (B, 2L)
            parts.append(stats[:, :, None, None].expand(-1, -1, self.grid, self.grid))
        return torch.cat(parts, dim=1), prob

    # -- persistence (shusheng.modeling.PretrainedMixin) ---------------------------------------------------

    model_type = "dense-tower-backbone"

    def preprocess_config(self) -> Preprocess:
        return Preprocess(size=self.image_size, resize="squash", interpolation="bicubic")

    def _config_dict(self) -> dict[str, Any]:
        return dict(self._args)

    @classmethod
    def _build(cls, config: dict[str, Any], **overrides: Any) -> DenseTowerBackbone:
        return cls(**{**config, **overrides})
