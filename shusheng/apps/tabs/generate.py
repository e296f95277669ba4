"""The **Generate** tab: text to image with a trained text-to-image pipeline, step by step, with a Stop button,
the faithfulness checks under each image and PNG downloads that keep their generation parameters.

    >>> import gradio as gr
    >>> from shusheng.generation import Text2ImagePipeline
    >>> from shusheng.generation.pipelines.faithfulness import FaithfulnessChecker
    >>> pipe = Text2ImagePipeline.from_pretrained("runs/t2i/final")
    >>> with gr.Blocks() as demo:
    ...     generate_tab(pipe, checker=FaithfulnessChecker.from_pretrained())

Type a prompt (and optionally a negative prompt), choose the seed (a number, or ``random`` / ``-1``: the images
get seeds ``S, S+1, ...``, shown under them), the denoising steps, the guidance scale and how many images, and
press **Generate**. The status line counts the steps as they run and a preview shows the images as they take
shape (the scheduler's estimate of the final images, decoded every few steps). **Stop** ends the generation
after its current step and returns the images as far as they got (their parameters say ``Stopped at: K``); it
stops only generations of the same browser session. Under each image, the faithfulness check
(:class:`~shusheng.generation.pipelines.faithfulness.FaithfulnessChecker`, the bundled decoder) says which scene facts
of the prompt hold and which do not. Each image is offered for download as the PNG that
:func:`~shusheng.generation.png.save_png` wrote, with its AUTOMATIC1111 ``parameters`` chunk, so
``shusheng generate --from-png FILE`` makes it again.

In the app (:data:`TAB`) the tab runs the bundled ``shusheng-mini-t2i``, or the pipeline folder given with
``shusheng demo --t2i DIR``. No trained model is bundled yet: the tab then says so and names
``shusheng train t2i`` (a random UNet would turn every prompt into noise), and adds no event to the app's API.

A web app is an attack surface, so everything a visitor asks for is bounded: at most :data:`MAX_IMAGES` images
and :data:`MAX_STEPS` steps per request, the guidance scale in ``[0, MAX_GUIDANCE]``, prompts of at most
:data:`MAX_PROMPT_CHARS` characters (and the text encoder's token limit), images only at the model's own size;
a request past the app's time limit is stopped like Stop and returns what it has. Visitors never name a path: the
PNGs go to a folder per browser session under a temporary folder of the app (named by a hash of the session,
removed at exit; runs older than an hour are deleted), and Gradio serves copies from its own cache. Generations
run one at a time (one model; a lock) in a worker thread. Bad input gets a message in the status line, never a
traceback. Event API names: ``/generate`` (streams the status, preview, gallery, checks and files) and
``/stop_generate``. Gradio and torch are imported when the tab is built.
"""

import dataclasses
import hashlib
import logging
import math
import queue
import secrets
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any  # no postponed annotations here: Gradio reads the gr.Request annotation of the events

from shusheng.apps.tabs import (
    AppContext,
    SessionStops,
    TabUnavailable,
    UserInputError,
    import_gradio,
    session_key,
    shown_to_user,
    trained_model_reason,
)
from shusheng.generation.config import BUNDLED_MODEL, TRAIN_COMMAND

logger = logging.getLogger(__name__)

__all__ = ["MAX_GUIDANCE", "MAX_IMAGES", "MAX_PROMPT_CHARS", "MAX_STEPS", "TAB", "GenerateRequest", "GenerateTab",
           "check_caption", "check_markdown", "check_tokens", "faithfulness_checker", "generate_tab", "parse_request",
           "preview_strip"]

MAX_IMAGES = 8  # images per request
MAX_STEPS = 100  # denoising steps per request
MAX_GUIDANCE = 20.0
MAX_PROMPT_CHARS = 1000  # characters of a prompt or negative prompt (tokens are limited by the text encoder too)
SEED_LIMIT = 2**32  # seeds typed in are in [0, SEED_LIMIT)
RUN_MAX_AGE = 3600.0  # seconds the PNG folder of a run is kept
_RANDOM_SEEDS = ("", "random", "-1")
_DONE = object()


@dataclasses.dataclass(frozen=True)
class GenerateRequest:
    """One validated request of the tab (see :func:`parse_request`)."""

    prompt: str
    negative: str
    seed: int | None  # None = random seeds
    steps: int
    guidance: float
    n: int


def _shown(value: Any) -> str:
    """``repr(value)``, cut to 40 characters (a message never echoes a visitor's megabytes back)."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _whole(value: Any, name: str, lo: int, hi: int) -> int:
    """``value`` (an int, an integral float or a digit string) as an int in ``[lo, hi]``, else UserInputError."""
    bad = UserInputError(f"{name} must be a whole number from {lo} to {hi}, not {_shown(value)}.")
    if isinstance(value, bool) or value is None:
        raise bad
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise bad from None
    if isinstance(value, float):
        if not value.is_integer():
            raise bad
        value = int(value)
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise bad from None
    if number != value or not lo <= number <= hi:
        raise bad
    return number


def _text(value: Any, name: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise UserInputError(f"The {name} must be text.")
    if len(value) > MAX_PROMPT_CHARS:
        raise UserInputError(f"The {name} is {len(value)} characters long; at most {MAX_PROMPT_CHARS} are allowed.")
    return value.strip()


def parse_request(prompt: Any, negative: Any, seed: Any, steps: Any, guidance: Any, n: Any,
                  max_images: int = MAX_IMAGES, max_steps: int = MAX_STEPS) -> GenerateRequest:
    """Validate what a visitor asked for.

    Args:
        prompt, negative: the prompt (required) and the negative prompt (optional), at most
            :data:`MAX_PROMPT_CHARS` characters each.
        seed: a whole number in ``[0, 2**32)``; ``None``, ``""``, ``"random"`` or ``-1`` = random seeds.
        steps: denoising steps, ``1 .. max_steps``.
        guidance: the guidance scale, ``0 .. MAX_GUIDANCE``.
        n: images, ``1 .. max_images``.

    Raises:
        UserInputError: the first bad input, in words a visitor understands.
    """
    prompt = _text(prompt, "prompt")
    if not prompt:
        raise UserInputError("Type a prompt first: describe the picture to generate.")
    negative = _text(negative, "negative prompt")
    if seed is None or (isinstance(seed, str) and seed.strip().lower() in _RANDOM_SEEDS) or \
            (not isinstance(seed, (bool, str)) and seed == -1):
        seed_value = None
    else:
        try:
            seed_value = _whole(seed, "The seed", 0, SEED_LIMIT - 1)
        except UserInputError:
            raise UserInputError(f"The seed must be a whole number from 0 to {SEED_LIMIT - 1}, or 'random' "
                                 f"(or -1), not {_shown(seed)}.") from None
    steps = _whole(steps, "Steps", 1, max_steps)
    n = _whole(n, "The number of images", 1, max_images)
    try:
        scale = math.nan if isinstance(guidance, bool) else float(guidance)
    except (TypeError, ValueError):
        scale = math.nan
    if not 0.0 <= scale <= MAX_GUIDANCE:  # also NaN
        raise UserInputError(f"Guidance must be a number from 0 to {MAX_GUIDANCE:g}, not {_shown(guidance)}.")
    return GenerateRequest(prompt, negative, seed_value, steps, scale, n)


def check_tokens(pipe, req: GenerateRequest) -> None:
    """UserInputError when the prompt or the negative prompt has more tokens than the pipeline's text encoder
    reads (:attr:`~shusheng.generation.Text2ImagePipeline.max_prompt_tokens`; never truncated silently)."""
    limit = pipe.max_prompt_tokens
    for name, text in (("prompt", req.prompt), ("negative prompt", req.negative)):
        n = len(pipe.tokenizer(text, truncation=False)["input_ids"])
        if n > limit:
            raise UserInputError(f"The {name} has {n} tokens; the model's text encoder reads at most {limit}. "
                                 "Shorten it.")


def preview_strip(images: Any) -> Any:
    """Images ``(N, 3, H, W)`` in ``[0, 1]`` (what ``decode_latents`` returns) → one PIL image, side by side."""
    import numpy as np
    from PIL import Image

    arr = (images.permute(0, 2, 3, 1).float().numpy() * 255).round().clip(0, 255).astype(np.uint8)  # (N, H, W, 3)
    return Image.fromarray(np.concatenate(list(arr), axis=1))  # (H, N*W, 3)


def check_caption(result: Any) -> str:
    """The short line under an image: its facts that hold (✓) and do not (✗)."""
    if result is None:
        return ""
    if not result.checks:
        return "no scene facts to check"
    return " · ".join(f"{'✓' if c.holds else '✗'} {c.kind}: {c.expected}" for c in result.checks)


def check_markdown(results: Any, seeds: list[int | None], reason: str | None = None) -> str:
    """The checks of every image in Markdown (``reason``: why there are none)."""
    if results is None:
        return f"*No faithfulness check here: {reason}*" if reason else ""
    parts = []
    for k, (r, seed) in enumerate(zip(results, seeds), 1):
        head = f"**Image {k}** (seed {seed})"
        if not r.checks:
            parts.append(f"{head}: the prompt states no scene fact the judge knows (time of day, weather, "
                         "vehicles, counts, traffic lights, signs, pedestrians, crosswalks).")
            continue
        holds = [c for c in r.checks if c.holds]
        lines = [f"{head}: {len(holds)} of {len(r.checks)} facts hold"]
        lines += [f"- {'✓ holds' if c.holds else '✗ does not hold'}: {c.kind}: {c.expected} "
                  f"(the decoder says *{c.observed}*, {c.score:.2f})" for c in r.checks]
        if r.in_domain is not None and not r.in_domain:
            lines.append(f"- ⚠️ the image does not look like the driving scenes the judge was trained on (domain "
                         f"score {r.domain_score:.2g}): its verdicts mean little")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def faithfulness_checker(device: str | None = None) -> tuple[Any, str | None]:
    """``(checker, None)`` over the bundled decoder, or ``(None, reason)`` (logged) without it."""
    try:
        from shusheng.generation.pipelines.faithfulness import FaithfulnessChecker

        return FaithfulnessChecker.from_pretrained(device=device or "cpu"), None
    except Exception as e:  # the checks are an extra: the tab generates without them, and says why
        logger.warning("the Generate tab checks no images: %s", e)
        return None, f"the bundled decoder (shusheng-mini-uniperceiver) cannot be loaded: {e}"


class _Outputs:
    """Where the tab writes its PNGs: ``<temporary folder>/<hash of the session>/<run>/``, removed at exit; runs
    older than ``max_age`` seconds are deleted when a new one starts. No part of a path comes from the visitor."""

    def __init__(self, max_age: float = RUN_MAX_AGE):
        self._tmp = tempfile.TemporaryDirectory(prefix="shusheng-generate-")
        self.root = Path(self._tmp.name)
        self.max_age = max_age
        self._lock = threading.Lock()

    def new_run(self, session: Any) -> Path:
        key = hashlib.sha256(repr(session).encode()).hexdigest()[:16]
        with self._lock:
            self._prune()
            folder = self.root / key
            folder.mkdir(exist_ok=True)
            return Path(tempfile.mkdtemp(dir=folder, prefix="run-"))

    def _prune(self) -> None:
        cutoff = time.time() - self.max_age
        for session in self.root.iterdir():
            for run in session.iterdir():
                if run.stat().st_mtime < cutoff:
                    shutil.rmtree(run, ignore_errors=True)
            if not any(session.iterdir()):
                session.rmdir()


@dataclasses.dataclass
class _Step:
    k: int
    n: int
    preview: Any = None


@dataclasses.dataclass
class _Finished:
    out: Any
    files: list[Path]
    results: Any


def _produce(pipe, req: GenerateRequest, stop_event: threading.Event, out: queue.Queue, lock: threading.Lock,
             checker, checker_lock: threading.Lock, run_dir: Path, preview_every: int) -> None:
    """The worker thread of one request: generate under the model lock (progress and previews on the queue),
    write the PNGs, check them."""
    from shusheng.generation.png import (
        prompt_slug,  # the file names of shusheng generate
        save_png,
    )

    try:
        with lock:
            if stop_event.is_set():  # stopped or given up while waiting for the model
                return
            out.put(_Step(0, req.steps))

            def on_step(p, i, t, tensors):
                k = i + 1
                preview = None
                if k < req.steps and k % preview_every == 0:
                    preview = preview_strip(p.decode_latents(tensors["denoised"]))
                out.put(_Step(k, req.steps, preview))
                if stop_event.is_set():
                    p.interrupt = True  # this request's pipeline call only: the lock makes it the only one
                return {}

            result = pipe(req.prompt, negative_prompt=req.negative, num_images_per_prompt=req.n,
                          num_inference_steps=req.steps, guidance_scale=req.guidance, seed=req.seed,
                          output_type="pil", callback_on_step_end=on_step,
                          callback_on_step_end_tensor_inputs=["denoised"], progress=False)
        slug = prompt_slug(req.prompt)
        files = [save_png(im, run_dir, f"{slug}-{seed}", params)
                 for im, seed, params in zip(result.images, result.seeds, result.parameters)]
        checks = None
        if checker is not None:
            with checker_lock:
                checks = checker(result.images, result.prompts)
        out.put(_Finished(result, files, checks))
    except Exception as e:  # shown by the event (expected errors as a message, others as one line)
        out.put(e)
    finally:
        out.put(_DONE)


def generate_tab(pipe, ctx: AppContext | None = None, checker=None, *, checker_reason: str | None = None,
                 max_images: int = MAX_IMAGES, max_steps: int = MAX_STEPS, preview_every: int | None = None):
    """Build the tab's components inside the current ``gr.Blocks`` and wire them to the pipeline.

    Args:
        pipe: a :class:`~shusheng.generation.Text2ImagePipeline`.
        ctx: the app context (its time limit; default :class:`AppContext`'s).
        checker: a :class:`~shusheng.generation.pipelines.faithfulness.FaithfulnessChecker` whose verdicts go under the
            images; None = no check (``checker_reason`` says why, under the images).
        max_images, max_steps: the most images and steps a request may ask for (at most :data:`MAX_IMAGES` and
            :data:`MAX_STEPS`).
        preview_every: decode a preview every this many steps (default: about five previews per request).

    Returns:
        The ``gr.Tab``; its ``output_root`` is the temporary folder the PNGs go to.
    """
    gr = import_gradio()
    if not 1 <= max_images <= MAX_IMAGES or not 1 <= max_steps <= MAX_STEPS or (preview_every or 1) < 1:
        raise ValueError(f"max_images must be in [1, {MAX_IMAGES}], max_steps in [1, {MAX_STEPS}] and "
                         "preview_every >= 1")
    ctx = ctx or AppContext()
    model_lock, checker_lock = threading.Lock(), threading.Lock()
    running = SessionStops()
    outputs = _Outputs()
    size = pipe.default_size

    with gr.Tab(GenerateTab.title) as tab:
        with gr.Row():
            with gr.Column(scale=2):
                prompt = gr.Textbox(label="Prompt", lines=2, max_length=MAX_PROMPT_CHARS, elem_id="generate-prompt",
                                    placeholder="a red car on a wet street at night, two pedestrians on the "
                                                "crosswalk")
                negative = gr.Textbox(label="Negative prompt (optional)", max_length=MAX_PROMPT_CHARS,
                                      placeholder="fog", elem_id="generate-negative")
                with gr.Row():
                    seed = gr.Textbox(value="random", label="Seed (a number, or random)", elem_id="generate-seed")
                    n_images = gr.Slider(1, max_images, value=1, step=1, label="Images", elem_id="generate-n")
                with gr.Row():
                    steps = gr.Slider(1, max_steps, value=min(20, max_steps), step=1, label="Steps",
                                      elem_id="generate-steps")
                    guidance = gr.Slider(0.0, MAX_GUIDANCE, step=0.5, label="Guidance",
                                         value=min(MAX_GUIDANCE, float(pipe.config.get("default_guidance", 5.0))),
                                         elem_id="generate-guidance")
                with gr.Row():
                    go_btn = gr.Button("Generate", variant="primary", elem_id="generate-go")
                    stop_btn = gr.Button("Stop", variant="stop", elem_id="generate-stop")
                gr.Markdown(f"Images are {size}×{size} pixels, the size the model was trained at.")
            with gr.Column(scale=3):
                status = gr.Markdown("", elem_id="generate-status")
                preview = gr.Image(label="Preview", type="pil", interactive=False, height=160, format="png",
                                   elem_id="generate-preview")
                gallery = gr.Gallery(label="Images", columns=4, height=320, interactive=False, format="png",
                                     buttons=["download", "fullscreen"], elem_id="generate-gallery")
                checks = gr.Markdown("", elem_id="generate-checks")
                files = gr.File(label="PNG files (with their generation parameters)", file_count="multiple",
                                interactive=False, elem_id="generate-files")

        skip = gr.skip()

        def generate(prompt_text, negative_text, seed_value, n_steps, guidance_value, n, request: gr.Request = None):
            try:
                req = parse_request(prompt_text, negative_text, seed_value, n_steps, guidance_value, n,
                                    max_images, max_steps)
                check_tokens(pipe, req)
            except UserInputError as e:
                yield f"⚠️ {e}", skip, skip, skip, skip
                return
            if req.seed is None:  # random, but short enough to type in again (image k gets seed + k)
                req = dataclasses.replace(req, seed=secrets.randbelow(SEED_LIMIT - MAX_IMAGES))
            every = preview_every or max(1, req.steps // 5)
            key = session_key(request)
            stop_event = running.start(key)
            events: queue.Queue = queue.Queue()
            threading.Thread(target=_produce, args=(pipe, req, stop_event, events, model_lock, checker, checker_lock,
                                                    outputs.new_run(key), every),
                             daemon=True, name="shusheng-generate").start()
            yield "Waiting for the model…", None, [], "", None
            finished = failure = None
            last_step, timed_out = 0, False
            deadline = time.monotonic() + ctx.limits.request_timeout
            grace = deadline + min(30.0, ctx.limits.request_timeout)  # after Stop: the current step, PNGs, checks
            try:
                while True:
                    try:
                        item = events.get(timeout=max(0.0, (grace if timed_out else deadline) - time.monotonic()))
                    except queue.Empty:
                        if timed_out:
                            break
                        timed_out = True  # stop like Stop, and wait a little for what it has
                        stop_event.set()
                        continue
                    if item is _DONE:
                        break
                    if isinstance(item, Exception):
                        failure = item
                    elif isinstance(item, _Finished):
                        finished = item
                    else:
                        last_step = item.k
                        text = f"Step {item.k} of {item.n}" + ("" if item.k else ": encoding the prompt")
                        yield text, (skip if item.preview is None else item.preview), skip, skip, skip
            finally:  # done, given up, or the client went away: the worker stops after its current step
                stop_event.set()
                running.end(key, stop_event)

            if failure is not None:
                if isinstance(failure, ValueError):  # e.g. a prompt longer than the text encoder's limit
                    yield f"⚠️ {failure}", skip, skip, skip, skip
                    return
                with shown_to_user(gr, "Generate"):
                    raise failure
            if finished is None:
                yield (f"⚠️ Given up after {ctx.limits.request_timeout:g} s at step {last_step} of {req.steps}: the "
                       "server is busy. Try again, or ask for fewer steps or images."), skip, skip, skip, skip
                return
            res = finished.out
            plural = "s" if len(res.images) != 1 else ""
            images = f"{len(res.images)} image{plural} (seed{plural} {', '.join(str(s) for s in res.seeds)})"
            if res.steps_done == req.steps:
                text = f"Done: {images}, {req.steps} steps."
            elif timed_out:
                text = (f"Stopped at the time limit ({ctx.limits.request_timeout:g} s) after {res.steps_done} of "
                        f"{req.steps} steps: {images} as far as they got.")
            else:
                text = f"Stopped after {res.steps_done} of {req.steps} steps: {images} as far as they got."
            results = finished.results
            items = [(str(f), f"seed {s}" + (f" · {check_caption(results[k])}" if results is not None else ""))
                     for k, (f, s) in enumerate(zip(finished.files, res.seeds))]
            yield (text, skip, items, check_markdown(results, res.seeds, checker_reason),
                   [str(f) for f in finished.files])

        def stop_generate(request: gr.Request = None):
            running.stop(session_key(request))

        gr.on([go_btn.click, prompt.submit], generate, [prompt, negative, seed, steps, guidance, n_images],
              [status, preview, gallery, checks, files], api_name="generate", concurrency_id="requests")
        # not queued behind the generations it stops
        stop_btn.click(stop_generate, None, None, api_name="stop_generate", concurrency_limit=None,
                       concurrency_id="stop_generate")
    tab.output_root = outputs.root  # (the events hold `outputs`: the folder lives as long as the app)
    return tab


class GenerateTab:
    """The Generate tab over the bundled ``shusheng-mini-t2i`` or a pipeline folder.

    Args:
        model: a pipeline folder (``shusheng train t2i`` writes ``<output>/final``); None = the bundled one.
    """

    title = "Generate"

    def __init__(self, model: str | None = None):
        self.model = model

    def available(self) -> str | None:
        """``None`` when a trained pipeline folder is there and diffusers is installed, else why not."""
        return trained_model_reason(
            self.model, index_file="model_index.json", bundled=BUNDLED_MODEL, modules=("diffusers", "transformers"),
            needs="Text to image needs diffusers and transformers: `pip install 'shusheng[t2i]'`.",
            folder_kind="a text-to-image pipeline folder", train_command=TRAIN_COMMAND, flag="--t2i runs/t2i/final",
            missing=self.missing())

    @staticmethod
    def missing() -> str:
        return (f"No trained text-to-image model is bundled (`{BUNDLED_MODEL}`). Its UNet must be trained first: "
                "a random one would turn every prompt into noise.\n\n"
                f"Train one with `{TRAIN_COMMAND}`, then start the app with `shusheng demo --t2i runs/t2i/final` "
                f"(or copy that folder to `shusheng/weights/{BUNDLED_MODEL}`).")

    def build(self, ctx: AppContext) -> None:
        try:
            from shusheng.generation.pipeline import Text2ImagePipeline

            pipe = Text2ImagePipeline.from_pretrained(self.model)
        except ImportError as e:
            raise TabUnavailable(f"The text-to-image model cannot be loaded: {e}") from e
        except (FileNotFoundError, ValueError) as e:  # untrained, incomplete, another pipeline class
            raise TabUnavailable(f"The text-to-image model cannot be loaded: {e}") from e
        if ctx.device:
            pipe.to(ctx.device)
        pipe.set_progress_bar_config(disable=True)
        checker, reason = faithfulness_checker(ctx.device)
        generate_tab(pipe, ctx=ctx, checker=checker, checker_reason=reason)


TAB = GenerateTab()
