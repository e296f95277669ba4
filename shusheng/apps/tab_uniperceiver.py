"""The Caption & VQA tab of the Gradio app: upload or pick a sample image, get a caption, ask questions.

    >>> import gradio as gr
    >>> from shusheng.uniperceiver import CaptionPipeline, VQAPipeline
    >>> cap = CaptionPipeline.from_pretrained(); vqa = VQAPipeline(cap.model)
    >>> with gr.Blocks() as demo:
    ...     caption_and_vqa_tab(cap, vqa)

Only Gradio components and calls into the pipelines live here (no model logic). Sample images are SynthDrive
test scenes rendered on demand.
"""

from typing import Any  # no postponed annotations here: Gradio reads the event-data annotation of `pick`

from shusheng._deps import require

__all__ = ["answer_question", "caption_and_vqa_tab", "caption_image", "sample_images"]


def sample_images(n: int = 6, size: int = 128) -> list[Any]:
    """The first ``n`` images of the fixed SynthDrive test split (PIL images)."""
    from shusheng.data import synthdrive as sd

    return [sd.sample(sd.TEST_SEED, i, size)[0] for i in range(n)]


def caption_image(pipeline_caption, image, num_beams: int = 1) -> str:
    """Caption text with its score, or a message when there is no image."""
    if image is None:
        return "Upload or pick an image first."
    out = pipeline_caption([image], num_beams=int(num_beams))
    return f"{out.captions[0]}  (score {out.scores[0]:.2f})"


def answer_question(pipeline_vqa, image, question: str, mode: str = "match") -> tuple[str, list[list[Any]]]:
    """``(answer line, table of alternatives)`` for one image and question; messages for missing inputs."""
    if image is None:
        return "Upload or pick an image first.", []
    if not question or not question.strip():
        return "Type a question about the image.", []
    out = pipeline_vqa([image], question, mode=mode, top_k=5)
    table = [[a, round(p, 3)] for a, p in out.top_k[0]]
    return f"{out.answers[0]}  (score {out.scores[0]:.2f})", table


def caption_and_vqa_tab(pipeline_caption, pipeline_vqa, samples: list[Any] | None = None):
    """Build the tab's components inside the current ``gr.Blocks`` and wire them to the pipelines.

    Args:
        pipeline_caption: a :class:`~shusheng.uniperceiver.pipelines.CaptionPipeline`.
        pipeline_vqa: a :class:`~shusheng.uniperceiver.pipelines.VQAPipeline`.
        samples: images offered as examples (default: 6 SynthDrive test scenes).

    Returns:
        The ``gr.Tab``.
    """
    gr = require("gradio", extra="apps")
    samples = sample_images() if samples is None else samples
    with gr.Tab("Caption & VQA") as tab:
        with gr.Row():
            with gr.Column():
                image = gr.Image(type="pil", label="Image", height=320)
                gallery = gr.Gallery(value=samples, label="Samples (click one)", columns=6, height=120,
                                     allow_preview=False)
            with gr.Column():
                beams = gr.Slider(1, 5, value=1, step=1, label="Beam width (1 = greedy)")
                caption_btn = gr.Button("Caption", variant="primary")
                caption = gr.Textbox(label="Caption", interactive=False)
                question = gr.Textbox(label="Question", placeholder="Is the traffic light red?")
                mode = gr.Radio(["match", "generate"], value="match", label="Answer by",
                                info="match: pick from the answer list; generate: free text")
                ask_btn = gr.Button("Ask")
                answer = gr.Textbox(label="Answer", interactive=False)
                alternatives = gr.Dataframe(headers=["answer", "probability"], label="Top answers",
                                            interactive=False)

        def pick(evt: gr.SelectData):
            return samples[evt.index]

        gallery.select(pick, None, image)
        caption_btn.click(lambda im, b: caption_image(pipeline_caption, im, b), [image, beams], caption)
        def ask(im, q, m):
            return answer_question(pipeline_vqa, im, q, m)

        ask_btn.click(ask, [image, question, mode], [answer, alternatives])
        question.submit(ask, [image, question, mode], [answer, alternatives])
    return tab
