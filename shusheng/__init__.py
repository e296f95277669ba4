"""Shusheng: a multimodal vision suite around InternImage and DCNv3.

Importing the package is cheap: it pulls in no torch extension, Gradio, diffusers or FAISS. Import the
subpackage you need (``shusheng.ops``, ``shusheng.backbone``, ...).
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
