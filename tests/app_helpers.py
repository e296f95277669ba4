"""Helpers the app-tab tests share (``from app_helpers import fn, component, session, hostile``): find an event's
function or a component of a built ``gr.Blocks``, fake a browser session, write upload files that must be refused."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image


def fn(demo, api_name: str):
    """The Python function behind the event with ``api_name``."""
    for block_fn in demo.fns.values():
        if block_fn.api_name == api_name:
            return block_fn.fn
    raise AssertionError(f"no event with api_name {api_name!r}")


def public_api(demo) -> set[str]:
    """The API names of the app's public events."""
    return {f.api_name for f in demo.fns.values() if f.api_visibility == "public"}


def component(demo, elem_id: str):
    """The component with ``elem_id``."""
    return next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == elem_id)


def session(name: str):
    """A stand-in for the ``gr.Request`` of browser session ``name``."""
    return type("Request", (), {"session_hash": name})()


def hostile(folder: Path) -> dict[str, Path]:
    """Uploads a tab must refuse with a message: a truncated JPEG, a text file named .png and a 400 x 300 image
    (120 000 px: above a limit of 50 000)."""
    folder.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 256, (96, 96, 3), dtype=np.uint8)
    Image.fromarray(noise).save(buf, "JPEG", quality=90)
    files = {"truncated": folder / "truncated.jpg", "text": folder / "notes.png", "pixels": folder / "big.png"}
    files["truncated"].write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    files["text"].write_text("not a picture\n")
    Image.new("RGB", (400, 300), (200, 30, 30)).save(files["pixels"])  # 120 000 px: above the limit below
    return files
