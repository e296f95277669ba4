"""Task metrics for comparing runtimes and precisions of the same model on the fixed SynthDrive test set.

Each task prepares its inputs once (rendered scenes, preprocessed pixels, query or answer embeddings) and then
scores any image-side function on them, so fp32 PyTorch, ONNX Runtime and int8 files are measured on exactly the
same data:

* :class:`RetrievalTask` (shusheng-mini-clip): mean precision@10 of the 50 plain and 50 paraphrase text queries
  (``shusheng.data.synthdrive_queries``) over the test images, as ``bench/retrieval_quality.py`` measures it;
* :class:`VQATask` (shusheng-mini-uniperceiver): VQA accuracy by answer matching on the test questions, as
  ``bench/uniperceiver_quality.py`` measures it (template wordings).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

__all__ = ["RetrievalTask", "VQATask"]

ImageFn = Callable[[torch.Tensor], "torch.Tensor | np.ndarray"]


def _scenes(n: int):
    from shusheng.data import TEST_IMAGE_SIZE, TEST_SEED, TEST_SIZE, sample

    if not 1 <= n <= TEST_SIZE:
        raise ValueError(f"n must be in 1..{TEST_SIZE}, got {n}")
    return [sample(TEST_SEED, i, TEST_IMAGE_SIZE) for i in range(n)]


def _batched(fn: ImageFn, pixels: torch.Tensor, batch: int) -> torch.Tensor:
    outs = []
    for s in range(0, len(pixels), batch):
        with torch.inference_mode():
            outs.append(torch.as_tensor(fn(pixels[s:s + batch])).float().cpu())
    return torch.cat(outs)


class RetrievalTask:
    """Text-to-image retrieval P@10 of a mini-clip model's image embeddings.

    Args:
        model: the :class:`~shusheng.miniclip.MiniClip` (its text tower embeds the queries, its preprocessing
            makes the pixels).
        n: test images (the fixed set has 1000).
        k: precision cut-off.
    """

    def __init__(self, model, n: int = 1000, k: int = 10):
        from shusheng.data.synthdrive_queries import PARAPHRASE_QUERIES, PLAIN_QUERIES

        scenes = _scenes(n)
        self.k = k
        self.attributes = [ann.attributes for _, ann in scenes]
        self.pixels = torch.stack([model.preprocess(img) for img, _ in scenes])
        self.sets = {"plain": PLAIN_QUERIES, "paraphrase": PARAPHRASE_QUERIES}
        self.query_emb = {name: model.embed_texts([q.text for q in qs]) for name, qs in self.sets.items()}

    def score(self, embed: ImageFn, batch: int = 64) -> dict[str, float]:
        """``{"plain": P@k, "paraphrase": P@k}`` of ``embed(pixels) -> (B, dim)`` unit-norm embeddings."""
        from shusheng.miniclip.evaluation import evaluate_queries

        emb = _batched(embed, self.pixels, batch).numpy()
        return {name: float(evaluate_queries(emb, self.query_emb[name], qs, self.attributes, k=self.k)["p_at_k"])
                for name, qs in self.sets.items()}


class VQATask:
    """VQA accuracy (answer matching) of a unified decoder given image tokens from any runtime.

    Args:
        model: the :class:`~shusheng.uniperceiver.UniPerceiver` (its decoder answers in PyTorch).
        n: test images (each has several questions).
    """

    def __init__(self, model, n: int = 1000):
        from shusheng.modeling import resolve_transform

        scenes = _scenes(n)
        self.model = model.eval()
        tf = resolve_transform(model)
        self.pixels = torch.stack([tf(img) for img, _ in scenes])
        self.items = [(i, qa["question"], qa["answer"]) for i, (_, ann) in enumerate(scenes) for qa in ann.qa]
        self.answers = list(model.config.answers)
        with torch.inference_mode():
            self.answer_feats = model.text_features(self.answers)

    def score(self, image_tokens: ImageFn, batch: int = 50) -> float:
        """Accuracy given ``image_tokens(pixels) -> (B, N, D)``."""
        tokens = _batched(image_tokens, self.pixels, batch)
        hits = []
        with torch.inference_mode():
            for s in range(0, len(self.items), 4 * batch):
                chunk = self.items[s:s + 4 * batch]
                idx = torch.tensor([i for i, _, _ in chunk])
                p = self.model.vqa_match(None, [q for _, q, _ in chunk], image_tokens=tokens[idx],
                                         answer_features=self.answer_feats)
                hits += [self.answers[j] == a for (_, _, a), j in zip(chunk, p.argmax(-1).tolist())]
        return float(np.mean(hits))
