"""The **Detect** tab: objects, their instance masks and (with a segmenter) the scene's classes in one image.

    >>> import gradio as gr
    >>> from shusheng.detection.pipelines import DetectionPipeline, SegmentationPipeline
    >>> with gr.Blocks() as demo:
    ...     detect_tab(DetectionPipeline.from_pretrained("runs/det/maskrcnn/final"),
    ...                segmenter=SegmentationPipeline.from_pretrained())

Upload an image or pick a SynthDrive test scene, choose the score threshold and press **Detect**: the image comes
back with each detection's box, label, score and instance mask drawn in its class colour
(:func:`~shusheng.detection.visualize.draw_detections`), a table counts the detections per class, and, when a
segmenter is there, a second image shows the semantic segmentation blended over the picture with the largest
classes listed under it. Without a segmenter the tab says it is missing and how to make it. When the detector's
in-domain check says the image is unlike its training scenes, a notice says that the result is unreliable.

In the app (:data:`TAB`) the tab runs the bundled ``shusheng-mini-det`` (or the folder of ``shusheng demo
--detector DIR``) and the bundled ``shusheng-mini-seg`` (or ``--segmenter DIR``). Without a detector the tab is
not available: it says why and adds no event to the app's API.

Uploads reach the tab as file paths and are decoded by the app's image loader within the app's limits
(:func:`shusheng.apps.tabs.upload_error`); a file that is not an image, a decompression bomb or a threshold
outside [0, 1] gets a message, never a traceback. One model call at a time (a lock); requests run in the app's
pool within its time limit. Event API names: ``/detect`` (and ``/pick_detect_sample``, the sample gallery's
click, undocumented). Only Gradio components and calls into the detection pipelines live here; Gradio and torch
are imported when the tab is built.
"""

import logging
import math
import threading
from typing import Any  # no postponed annotations here: Gradio reads the event-data annotation of `pick`

from shusheng.apps.tabs import (
    AppContext,
    TabUnavailable,
    UserInputError,
    image_input,
    import_gradio,
    trained_model_reason,
    upload_error,
)
from shusheng.apps.tabs.caption_vqa import domain_notice, sample_images

logger = logging.getLogger(__name__)

__all__ = ["BUNDLED_DETECTOR", "BUNDLED_SEGMENTER", "SAMPLE_SIZE", "TAB", "DetectResult", "DetectTab", "detect_image",
           "detect_tab", "parse_threshold"]

#: The bundled models the app's tab runs (= ``shusheng.detection.pipelines``' ``bundled_model`` names; not imported
#: here: that module imports torch).
BUNDLED_DETECTOR = "shusheng-mini-det"
BUNDLED_SEGMENTER = "shusheng-mini-seg"
DETECT_COMMAND = "shusheng train detect --output runs/det/maskrcnn"
SEGMENT_COMMAND = "shusheng train segment --output runs/seg"
SAMPLE_SIZE = 256  # px: the resolution the bundled detector is trained at
TOP_CLASSES = 6  # semantic classes listed under the segmentation


def parse_threshold(value: Any) -> float:
    """The score threshold as a float in [0, 1], else UserInputError."""
    try:
        t = math.nan if isinstance(value, bool) else float(value)
    except (TypeError, ValueError):
        t = math.nan
    if not 0.0 <= t <= 1.0:  # also NaN
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
        raise UserInputError(f"The threshold must be a number from 0 to 1, not {shown}.")
    return t


class DetectResult:
    """What one request shows: the drawn image, the notice, the count rows and the segmentation."""

    def __init__(self, drawn: Any = None, notice: str = "", counts: list[list[Any]] | None = None,
                 segmentation: Any = None, classes: str = ""):
        self.drawn, self.notice, self.counts = drawn, notice, counts or []
        self.segmentation, self.classes = segmentation, classes

    def outputs(self, with_segmenter: bool) -> tuple:
        base = (self.drawn, self.notice, self.counts)
        return (*base, self.segmentation, self.classes) if with_segmenter else base


def _classes_markdown(shares: dict[str, float]) -> str:
    top = [(k, v) for k, v in sorted(shares.items(), key=lambda kv: -kv[1]) if v > 0][:TOP_CLASSES]
    return "Largest classes: " + ", ".join(f"{k} {v:.0%}" for k, v in top) if top else ""


def detect_image(detector, image, threshold: Any = 0.5, segmenter=None) -> DetectResult:
    """Detect (and segment) one decoded image; a message in ``notice`` when there is nothing to show.

    Args:
        detector: a :class:`~shusheng.detection.pipelines.DetectionPipeline`.
        image: a PIL image (or None: a message).
        threshold: lowest score shown, in [0, 1].
        segmenter: a :class:`~shusheng.detection.pipelines.SegmentationPipeline`, or None.
    """
    import numpy as np
    from PIL import Image

    from shusheng.data import load_image
    from shusheng.detection.segment import overlay
    from shusheng.detection.visualize import draw_detections, label_counts

    if image is None:
        return DetectResult(notice="Upload or pick an image first.")
    try:
        threshold = parse_threshold(threshold)
    except UserInputError as e:
        return DetectResult(notice=f"⚠️ {e}")
    img = load_image(image)
    out = detector([img], threshold=threshold, batch_size=1)
    if out.errors[0]:
        return DetectResult(notice=f"This image cannot be used: {out.errors[0]}")
    dets = out.detections[0]
    counts = [[label, n, round(best, 3)] for label, n, best in label_counts(dets)]
    notes = [] if dets else [f"No object scores {threshold:.2f} or more."]
    if out.resized(0):
        w, h = out.input_sizes[0]
        notes.append(f"The detector saw this {img.size[0]}×{img.size[1]} image at {w}×{h}.")
    notice = domain_notice(out, 0, "detection")
    result = DetectResult(draw_detections(img, dets), "\n\n".join([notice, *notes] if notice else notes), counts)
    if segmenter is not None:
        seg = segmenter([img], batch_size=1)
        ids = seg.class_ids[0]
        if ids is not None:
            mixed = overlay(np.asarray(img, dtype=np.uint8), ids, 0.5, len(seg.labels))
            result.segmentation = Image.fromarray(mixed)
            result.classes = _classes_markdown(seg.shares[0])
    return result


def detect_tab(detector, ctx: AppContext | None = None, segmenter=None, *, segmenter_reason: str | None = None,
               samples: list[Any] | None = None):
    """Build the tab's components inside the current ``gr.Blocks`` and wire them to the pipelines.

    Args:
        detector: a :class:`~shusheng.detection.pipelines.DetectionPipeline`.
        ctx: the app context (its upload and time limits; default :class:`AppContext`'s).
        segmenter: a :class:`~shusheng.detection.pipelines.SegmentationPipeline` for the overlay, or None
            (``segmenter_reason`` says why there is none, in its place).
        samples: images offered as examples (default: 6 SynthDrive test scenes at :data:`SAMPLE_SIZE` px).

    Returns:
        The ``gr.Tab``.
    """
    gr = import_gradio()
    samples = sample_images(6, SAMPLE_SIZE) if samples is None else samples
    ctx = ctx or AppContext()
    with_seg = segmenter is not None
    with gr.Tab(DetectTab.title) as tab:
        with gr.Row():
            with gr.Column():
                image = image_input(gr, ctx.limits, label="Image", height=320, elem_id="detect-image")
                gallery = gr.Gallery(value=samples, label="Samples (click one)", columns=6, height=120,
                                     allow_preview=False, elem_id="detect-samples")
                threshold = gr.Slider(0.0, 1.0, value=0.5, step=0.05, label="Score threshold",
                                      info="detections scoring lower are not shown", elem_id="detect-threshold")
                detect_btn = gr.Button("Detect", variant="primary", elem_id="detect-button")
                counts = gr.Dataframe(headers=["class", "count", "best score"], label="Detections per class",
                                      interactive=False, elem_id="detect-counts")
            with gr.Column():
                drawn = gr.Image(label="Detections (boxes and instance masks)", type="pil", interactive=False,
                                 format="png", height=320, elem_id="detect-result")
                notice = gr.Markdown("", elem_id="detect-notice")
                if with_seg:
                    segmentation = gr.Image(label="Segmentation", type="pil", interactive=False, format="png",
                                            height=320, elem_id="detect-segmentation")
                    classes = gr.Markdown("", elem_id="detect-classes")
                else:
                    gr.Markdown(f"*No segmentation here: {segmenter_reason or 'no segmenter was given.'}*",
                                elem_id="detect-no-segmenter")

        def pick(evt: gr.SelectData):
            return samples[evt.index]

        model_lock = threading.Lock()  # one detector, one segmenter: one call at a time (uploads decode in parallel)

        def detect_upload(im, t):
            im, error = upload_error(im, ctx.limits)
            if error:
                return DetectResult(notice=error).outputs(with_seg)
            with model_lock:
                return detect_image(detector, im, t, segmenter).outputs(with_seg)

        def detect(im, t):
            return ctx.run(gr, "Detect", detect_upload, im, t)

        outputs = [drawn, notice, counts] + ([segmentation, classes] if with_seg else [])
        gallery.select(pick, None, image, api_name="pick_detect_sample", api_visibility="undocumented")
        detect_btn.click(detect, [image, threshold], outputs, api_name="detect", concurrency_id="requests")
    return tab


class DetectTab:
    """The Detect tab over the bundled ``shusheng-mini-det`` (or a detector folder) and, for the overlay, the
    bundled ``shusheng-mini-seg`` (or a segmenter folder).

    Args:
        detector: a detector folder (``shusheng train detect`` writes ``<output>/final``); None = the bundled one.
        segmenter: a segmenter folder (``shusheng train segment``); None = the bundled one, if any.
    """

    title = "Detect"

    def __init__(self, detector: str | None = None, segmenter: str | None = None):
        self.detector, self.segmenter = detector, segmenter

    def available(self) -> str | None:
        """``None`` when a detector folder is there and pycocotools is installed, else why not (cheap)."""
        return trained_model_reason(
            self.detector, index_file="config.json", bundled=BUNDLED_DETECTOR,
            modules=("torchvision", "pycocotools"),
            needs="Detection needs torchvision and pycocotools: `pip install torchvision 'shusheng[data]'`.",
            folder_kind="a detector folder", train_command=DETECT_COMMAND,
            flag="--detector runs/det/maskrcnn/final", missing=self.missing())

    @staticmethod
    def missing() -> str:
        return (f"No trained detector is bundled (`{BUNDLED_DETECTOR}`).\n\n"
                f"Train one with `{DETECT_COMMAND}`, then start the app with `shusheng demo --detector "
                f"runs/det/maskrcnn/final` (or copy that folder to `shusheng/weights/{BUNDLED_DETECTOR}`).")

    def _segmenter(self, device: str) -> tuple[Any, str | None]:
        """``(segmentation pipeline, None)`` or ``(None, why not)``."""
        from shusheng.detection.pipelines import SegmentationPipeline
        from shusheng.weights import BundledWeightsNotFound

        try:
            return SegmentationPipeline.from_pretrained(self.segmenter, device=device), None
        except BundledWeightsNotFound:
            return None, (f"no segmenter is bundled (`{BUNDLED_SEGMENTER}`); train one with `{SEGMENT_COMMAND}` "
                          "and start the app with `shusheng demo --segmenter runs/seg/final`.")
        except (FileNotFoundError, ValueError, ImportError) as e:
            logger.warning("the Detect tab shows no segmentation: %s", e)
            return None, f"the segmenter cannot be loaded: {e}"

    def build(self, ctx: AppContext) -> None:
        device = ctx.device or "cpu"
        try:
            from shusheng.detection.pipelines import DetectionPipeline

            detector = DetectionPipeline.from_pretrained(self.detector, device=device)
        except ImportError as e:
            raise TabUnavailable(f"The detector cannot be loaded: {e}") from e
        except (FileNotFoundError, ValueError) as e:  # missing, incomplete, another kind of model
            raise TabUnavailable(f"The detector cannot be loaded: {e}") from e
        segmenter, reason = self._segmenter(device)
        detect_tab(detector, ctx, segmenter, segmenter_reason=reason)


TAB = DetectTab()
