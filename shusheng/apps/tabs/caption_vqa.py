"""The **Caption & VQA** tab: upload or pick a sample image, get a caption, ask questions.

    >>> import gradio as gr
    >>> from shusheng.uniperceiver import CaptionPipeline, VQAPipeline
    >>> cap = CaptionPipeline.from_pretrained(); vqa = VQAPipeline(cap.model)
    >>> with gr.Blocks() as demo:
    ...     caption_and_vqa_tab(cap, vqa)

In the app (:data:`TAB`) it runs the bundled ``shusheng-mini-uniperceiver``; without its weights the tab says so
and names the command that makes them. The bundled model knows only driving scenes: when a pipeline output says
an image is not in its domain (``in_domain`` False), a notice next to the caption or answer says that it is
unreliable, with the domain score. Only Gradio components and calls into the pipelines live here (no model
logic); Gradio and torch are imported when the tab is built. Sample images are SynthDrive test scenes rendered
on demand.

Uploads reach the tab as file paths and are decoded by the app's image loader within the app's limits
(:func:`shusheng.apps.tabs.upload_error`): a decompression bomb, a truncated file or a file that is not an image
gets a message in the Caption or Answer box. Event API names: ``/caption``, ``/ask``, ``/checklist`` (and
``/pick_sample``, the sample gallery's click, undocumented).

The **Driving checklist** button asks the image the default driving question set
(:class:`~shusheng.uniperceiver.pipelines.driving.DrivingChecklist`: traffic light, whether to stop, people on the
crosswalk, speed limit, vehicle count, nearest vehicle) and shows each answer with its score and the evidence
boxes drawn on the image.
"""

import logging
import math
import threading
from typing import Any  # no postponed annotations here: Gradio reads the event-data annotation of `pick`

from shusheng.apps.tabs import AppContext, TabUnavailable, image_input, import_gradio, upload_error

logger = logging.getLogger(__name__)

__all__ = ["TAB", "CaptionVQATab", "answer_question", "answer_with_notice", "caption_and_vqa_tab", "caption_image",
           "caption_with_notice", "checklist_with_notice", "domain_notice", "sample_images"]

#: The bundled model the app's tab runs (= ``shusheng.uniperceiver.pipelines.BUNDLED_MODEL``; not imported here:
#: that module imports torch).
BUNDLED_MODEL = "shusheng-mini-uniperceiver"


def sample_images(n: int = 6, size: int = 128) -> list[Any]:
    """The first ``n`` images of the fixed SynthDrive test split (PIL images)."""
    from shusheng.data import synthdrive as sd

    return [sd.sample(sd.TEST_SEED, i, size)[0] for i in range(n)]


def domain_notice(out: Any, index: int = 0, what: str = "answer") -> str:
    """The warning shown next to item ``index`` of a caption or VQA output whose image does not look like the
    bundled model's driving scenes (``out.in_domain[index]`` is False), with ``out.domain_score[index]`` (the
    in-domain p-value; left out when NaN); ``""`` when the item is in the domain or the output has no domain
    check."""
    in_domain = getattr(out, "in_domain", None)
    if in_domain is None or index >= len(in_domain) or in_domain[index] is None or bool(in_domain[index]):
        return ""
    scores = getattr(out, "domain_score", None)
    score = scores[index] if scores is not None and index < len(scores) else None
    score_text = f" (domain score {float(score):.2g})" if score is not None and not math.isnan(score) else ""
    return (f"⚠️ This image does not look like the driving scenes the bundled model was trained on{score_text}; "
            f"the {what} is unreliable.")


def _item_error(out: Any) -> str | None:
    """The message for an image the pipeline could not use (``out.errors[0]``), else None."""
    errors = getattr(out, "errors", None)
    return f"This image cannot be used: {errors[0]}" if errors and errors[0] else None


def caption_with_notice(pipeline_caption, image, num_beams: int = 1) -> tuple[str, str]:
    """``(caption with its score, domain notice)``, or a message (and no notice) when there is no image."""
    if image is None:
        return "Upload or pick an image first.", ""
    out = pipeline_caption([image], num_beams=int(num_beams))
    error = _item_error(out)
    if error:
        return error, ""
    return f"{out.captions[0]}  (score {out.scores[0]:.2f})", domain_notice(out, 0, "caption")


def caption_image(pipeline_caption, image, num_beams: int = 1) -> str:
    """Caption text with its score, or a message when there is no image."""
    return caption_with_notice(pipeline_caption, image, num_beams)[0]


def answer_with_notice(pipeline_vqa, image, question: str,
                       mode: str = "match") -> tuple[str, list[list[Any]], str]:
    """``(answer line, table of alternatives, domain notice)`` for one image and question; messages (and no
    notice) for missing inputs."""
    if image is None:
        return "Upload or pick an image first.", [], ""
    if not question or not question.strip():
        return "Type a question about the image.", [], ""
    out = pipeline_vqa([image], question, mode=mode, top_k=5)
    error = _item_error(out)
    if error:
        return error, [], ""
    table = [[a, round(p, 3)] for a, p in out.top_k[0]]
    return f"{out.answers[0]}  (score {out.scores[0]:.2f})", table, domain_notice(out, 0, "answer")


def answer_question(pipeline_vqa, image, question: str, mode: str = "match") -> tuple[str, list[list[Any]]]:
    """``(answer line, table of alternatives)`` for one image and question; messages for missing inputs."""
    line, table, _ = answer_with_notice(pipeline_vqa, image, question, mode)
    return line, table


def checklist_with_notice(checklist, image) -> tuple[list[list[Any]], Any, str]:
    """``(table rows [question, answer, score, evidence], (image, [(box, label)]) for gr.AnnotatedImage, notice)``
    for the driving checklist on one image; a message row (and no boxes) when there is no image or it fails."""
    if image is None:
        return [["Upload or pick an image first.", "", "", ""]], None, ""
    out = checklist([image])
    error = _item_error(out)
    if error:
        return [[error, "", "", ""]], None, ""
    rows, boxes = [], []
    for q in checklist.frame_questions:
        r = out.results[0][q.id]
        labels = ", ".join(b["label"] for b in r["evidence"]) or "-"
        rows.append([q.question, r["answer"], round(r["score"], 3), labels])
        for b in r["evidence"]:
            x, y, w, h = b["box"]
            boxes.append(((x, y, x + w, y + h), f"{q.id}: {b['label']}"))
    return rows, (image, boxes), domain_notice(out, 0, "checklist")


def caption_and_vqa_tab(pipeline_caption, pipeline_vqa, samples: list[Any] | None = None,
                        ctx: AppContext | None = None, checklist=None):
    """Build the tab's components inside the current ``gr.Blocks`` and wire them to the pipelines.

    Args:
        pipeline_caption: a :class:`~shusheng.uniperceiver.pipelines.CaptionPipeline`.
        pipeline_vqa: a :class:`~shusheng.uniperceiver.pipelines.VQAPipeline`.
        samples: images offered as examples (default: 6 SynthDrive test scenes).
        ctx: the app context (its upload and time limits; default :class:`AppContext`'s).
        checklist: a :class:`~shusheng.uniperceiver.pipelines.driving.DrivingChecklist` for the "Driving
            checklist" button (no button without one).

    Returns:
        The ``gr.Tab``.
    """
    gr = import_gradio()
    samples = sample_images() if samples is None else samples
    ctx = ctx or AppContext()
    with gr.Tab(CaptionVQATab.title) as tab:
        with gr.Row():
            with gr.Column():
                image = image_input(gr, ctx.limits, label="Image", height=320, elem_id="cv-image")
                gallery = gr.Gallery(value=samples, label="Samples (click one)", columns=6, height=120,
                                     allow_preview=False, elem_id="cv-samples")
            with gr.Column():
                beams = gr.Slider(1, 5, value=1, step=1, label="Beam width (1 = greedy)")
                caption_btn = gr.Button("Caption", variant="primary", elem_id="caption-button")
                caption = gr.Textbox(label="Caption", interactive=False, elem_id="caption")
                caption_notice = gr.Markdown("", elem_id="caption-notice")
                question = gr.Textbox(label="Question", placeholder="Is the traffic light red?")
                mode = gr.Radio(["match", "generate"], value="match", label="Answer by",
                                info="match: pick from the answer list; generate: free text")
                ask_btn = gr.Button("Ask", elem_id="ask-button")
                answer = gr.Textbox(label="Answer", interactive=False, elem_id="answer")
                answer_notice = gr.Markdown("", elem_id="answer-notice")
                alternatives = gr.Dataframe(headers=["answer", "probability"], label="Top answers",
                                            interactive=False)
        if checklist is not None:
            with gr.Row():
                with gr.Column():
                    check_btn = gr.Button("Driving checklist", elem_id="checklist-button")
                    check_table = gr.Dataframe(headers=["question", "answer", "score", "evidence"],
                                               label="Checklist", interactive=False, elem_id="checklist")
                    check_notice = gr.Markdown("", elem_id="checklist-notice")
                with gr.Column():
                    check_boxes = gr.AnnotatedImage(label="Evidence", height=320, elem_id="checklist-evidence")

        def pick(evt: gr.SelectData):
            return samples[evt.index]

        model_lock = threading.Lock()  # one model, one tokenizer: one call at a time (uploads decode in parallel)

        def caption_upload(im, b):
            im, error = upload_error(im, ctx.limits)
            if error:
                return error, ""
            with model_lock:
                return caption_with_notice(pipeline_caption, im, b)

        def answer_upload(im, q, m):
            im, error = upload_error(im, ctx.limits)
            if error:
                return error, [], ""
            with model_lock:
                return answer_with_notice(pipeline_vqa, im, q, m)

        def checklist_upload(im):
            im, error = upload_error(im, ctx.limits)
            if error:
                return [[error, "", "", ""]], None, ""
            with model_lock:
                return checklist_with_notice(checklist, im)

        def do_checklist(im):
            return ctx.run(gr, "Driving checklist", checklist_upload, im)

        def do_caption(im, b):
            return ctx.run(gr, "Caption", caption_upload, im, b)

        def ask(im, q, m):
            return ctx.run(gr, "Ask", answer_upload, im, q, m)

        gallery.select(pick, None, image, api_name="pick_sample", api_visibility="undocumented")
        caption_btn.click(do_caption, [image, beams], [caption, caption_notice], api_name="caption",
                          concurrency_id="requests")
        gr.on([ask_btn.click, question.submit], ask, [image, question, mode], [answer, alternatives, answer_notice],
              api_name="ask", concurrency_id="requests")
        if checklist is not None:
            check_btn.click(do_checklist, [image], [check_table, check_boxes, check_notice], api_name="checklist",
                            concurrency_id="requests")
    return tab


def _train_hint(detail: str) -> str:
    """How to make the bundled weights, unless ``detail`` (a ``BundledWeightsNotFound`` message) says it."""
    from shusheng.weights import TRAIN_COMMANDS

    command = TRAIN_COMMANDS.get(BUNDLED_MODEL)
    if command is not None and command in detail:
        return ""
    if command is not None:
        return f"\n\nMake its weights with: `{command}`"
    return (f"\n\nMake its weights with `shusheng train uniperceiver` (the recipe of the bundled model is in "
            f"`shusheng/weights/{BUNDLED_MODEL}/MODEL_CARD.md` and docs/uniperceiver.md) and save the model into "
            f"`shusheng/weights/{BUNDLED_MODEL}/`.")


class CaptionVQATab:
    """The Caption & VQA tab over the bundled ``shusheng-mini-uniperceiver``."""

    title = "Caption & VQA"

    def available(self) -> str | None:
        """``None`` when the bundled model's folder is there and its pipelines import, else why not."""
        try:
            from shusheng.uniperceiver.pipelines import bundled_model_path
        except ImportError as e:  # torch / transformers missing: the message names the pip install
            return f"The captioning model cannot be loaded: {e}"
        try:
            path = bundled_model_path()
        except FileNotFoundError as e:  # BundledWeightsNotFound (the message may name the training command)
            return self._missing(str(e))
        if not (path / "config.json").is_file():
            return self._missing(f"{path} has no config.json")
        return None

    def build(self, ctx: AppContext) -> None:
        from shusheng.uniperceiver import CaptionPipeline, VQAPipeline

        try:
            captioner = CaptionPipeline.from_pretrained(device=ctx.device or "cpu")
        except ImportError as e:
            raise TabUnavailable(f"The captioning model cannot be loaded: {e}") from e
        except FileNotFoundError as e:  # weights missing or incomplete
            raise TabUnavailable(self._missing(str(e))) from e
        from shusheng.uniperceiver.pipelines.driving import DrivingChecklist

        vqa = VQAPipeline(captioner.model, getattr(captioner, "domain_check", None))
        try:  # the checklist's evidence boxes need the tower's dense head; without one, no button
            checklist = DrivingChecklist(vqa)
        except (ValueError, AttributeError) as e:
            logger.info("no driving checklist in the Caption & VQA tab: %s", e)
            checklist = None
        caption_and_vqa_tab(captioner, vqa, ctx=ctx, checklist=checklist)

    @staticmethod
    def _missing(detail: str) -> str:
        return f"The bundled captioning model `{BUNDLED_MODEL}` is missing: {detail}{_train_hint(detail)}"


TAB = CaptionVQATab()
