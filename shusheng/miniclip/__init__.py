"""shusheng-mini-clip: an image-text dual encoder (dense InternImage tower + frozen MiniLM text tower).

    >>> from shusheng.miniclip import load_bundled
    >>> model = load_bundled()
    >>> model.embed_images(["street.png"]) @ model.embed_texts(["a red car at night"]).T

Evaluation on SynthDrive lives in :mod:`shusheng.miniclip.evaluation`; training in ``shusheng train clip``.
"""

from __future__ import annotations

from shusheng.miniclip.model import MODEL_NAME, MiniClip, MiniClipConfig, load_bundled, tower_backbone

__all__ = ["MODEL_NAME", "MiniClip", "MiniClipConfig", "load_bundled", "tower_backbone"]
