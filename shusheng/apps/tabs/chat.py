"""The **Chat** tab: chat about one image with a trained LLM bridge, answers streamed as they are generated.

    >>> import gradio as gr
    >>> from shusheng.llm import ChatPipeline
    >>> pipe = ChatPipeline.from_pretrained("runs/bridge/final")
    >>> with gr.Blocks() as demo:
    ...     chat_tab(pipe)

Upload an image or click a SynthDrive sample, then type messages: the conversation (every turn so far, about
that image) goes to :meth:`shusheng.llm.ChatPipeline.stream` and the answer appears in the chat as it is
generated. **Stop** ends the answer in progress after its current token (the part said so far stays, marked
*stopped*); **New chat**, a new upload or a new sample start a new conversation. When the answer is done, what
it names that the bundled dense detector (:class:`shusheng.detection.DenseObjectDetector` over
``shusheng-mini-clip``) does not see in the image is listed under it in bold
(:func:`shusheng.llm.grounding.unsupported_mentions`; weather, time of day and exact counts are not judged), and
when the bridge's domain check says the image does not look like its training scenes, the Caption tab's notice
appears under the chat.

In the app (:data:`TAB`) the tab runs the bundled ``shusheng-mini-bridge``, or the bridge folder given with
``shusheng demo --bridge DIR``. No trained bridge is bundled yet: the tab then says so and names
``shusheng train bridge`` (a random projector would make the LM answer without looking at the image), and adds
no event to the app's API.

Uploads reach the tab as file paths and are decoded within the app's limits
(:func:`shusheng.apps.tabs.upload_error`); one that cannot be used gets its reason as the answer and never reaches
the model. Answers are generated one at a time (one model; a lock), in a worker thread of their own, and given up
after the app's request time limit. Stop only ends answers of the same browser session. Event API names:
``/chat`` (send a message; streams the history) and ``/stop_chat``; ``/clear_chat`` and ``/pick_chat_sample`` are
undocumented. Gradio and torch are imported when the tab is built.
"""

import logging
import queue
import threading
import time
from types import SimpleNamespace
from typing import Any  # no postponed annotations here: Gradio reads the gr.Request annotation of the events

from shusheng.apps.tabs import (
    AppContext,
    SessionStops,
    TabUnavailable,
    image_input,
    import_gradio,
    session_key,
    shown_to_user,
    trained_model_reason,
    upload_error,
)
from shusheng.apps.tabs.caption_vqa import domain_notice, sample_images

logger = logging.getLogger(__name__)

__all__ = ["BUNDLED_MODEL", "TAB", "ChatTab", "chat_tab", "grounding_detector", "unsupported_line"]

#: The bundled bridge the tab runs by default (= ``shusheng.llm.pipelines.BUNDLED_MODEL``; not imported here:
#: that module imports torch).
BUNDLED_MODEL = "shusheng-mini-bridge"
TRAIN_COMMAND = "shusheng train bridge --output runs/bridge"
_IMAGE_PLACEHOLDER = "<image>"  # = shusheng.llm.IMAGE_PLACEHOLDER: where images go in a message; not typed by users
_DONE = object()


class _Detections(list):
    """What the detector saw in the image (put on the queue after the answer)."""


def unsupported_line(mentions: Any) -> str:
    """The line put under an answer for what it names that the detector does not see (``""`` for nothing)."""
    names = list(dict.fromkeys(str(m) for m in mentions or ()))
    if not names:
        return ""
    return "⚠️ Not seen in the image by the detector: " + ", ".join(f"**{n}**" for n in names)


def grounding_detector():
    """The bundled dense detector for the grounding check, or None (with the reason logged) without it."""
    try:
        from shusheng.detection import DenseObjectDetector
        from shusheng.miniclip import load_bundled

        return DenseObjectDetector(load_bundled())
    except (ImportError, FileNotFoundError, ValueError) as e:
        logger.warning("the Chat tab checks no answers against a detector: %s", e)
        return None


def _produce(pipe, image, conversation, stop_event, out: queue.Queue, lock, detector, max_new_tokens) -> None:
    """The worker thread of one answer: stream it under the model lock, then what the detector sees."""
    try:
        with lock:
            if stop_event.is_set():  # stopped or given up while waiting for the model
                return
            for d in pipe.stream([[image]], [conversation], max_new_tokens=max_new_tokens, stop_event=stop_event):
                out.put(d)
            if detector is not None:
                try:
                    out.put(_Detections(detector.detect(image)))
                except Exception:  # the answer stands without the check
                    logger.exception("the grounding detector failed")
    except Exception as e:  # shown by the event (expected errors as a message, others as one line)
        out.put(e)
    finally:
        out.put(_DONE)


def chat_tab(pipe, samples: list[Any] | None = None, ctx: AppContext | None = None, detector=None,
             max_new_tokens: int = 128):
    """Build the tab's components inside the current ``gr.Blocks`` and wire them to the pipeline.

    Args:
        pipe: a :class:`~shusheng.llm.ChatPipeline` (anything with its ``stream(images, questions, *,
            max_new_tokens, stop_event)``).
        samples: images offered as examples (default: 6 SynthDrive test scenes).
        ctx: the app context (its upload and time limits; default :class:`AppContext`'s).
        detector: something with ``detect(image) -> [{"label": ...}]`` that answers are checked against (the
            bundled dense detector in the app); None = no check.
        max_new_tokens: longest answer in tokens.

    Returns:
        The ``gr.Tab``.
    """
    gr = import_gradio()
    samples = sample_images() if samples is None else samples
    ctx = ctx or AppContext()
    model_lock = threading.Lock()  # one model, one tokenizer: one answer at a time
    running = SessionStops()

    with gr.Tab(ChatTab.title) as tab:
        with gr.Row():
            with gr.Column(scale=2):
                image = image_input(gr, ctx.limits, label="Image", height=320, elem_id="chat-image")
                gallery = gr.Gallery(value=samples, label="Samples (click one)", columns=6, height=120,
                                     allow_preview=False, elem_id="chat-samples")
            with gr.Column(scale=3):
                chatbot = gr.Chatbot(label="Conversation", height=420, elem_id="chat-history",
                                     placeholder="Upload or pick an image, then ask about it.")
                notice = gr.Markdown("", elem_id="chat-notice")
                message = gr.Textbox(label="Message", placeholder="What colour is the traffic light?",
                                     elem_id="chat-message")
                with gr.Row():
                    send_btn = gr.Button("Send", variant="primary", elem_id="chat-send")
                    stop_btn = gr.Button("Stop", variant="stop", elem_id="chat-stop")
                    clear_btn = gr.Button("New chat", elem_id="chat-clear")
        conversation = gr.State([])  # the plain {"role", "content"} messages the model reads

        def pick(evt: gr.SelectData):
            return samples[evt.index]

        def respond(im, text, history, conv, request: gr.Request = None):
            history, conv = list(history or []), list(conv or [])
            text = (text or "").strip()
            if not text:
                yield list(history), conv, "Type a message first.", ""
                return
            im, error = upload_error(im, ctx.limits)
            if error is None and im is None:
                error = "Upload or pick an image first."
            if error:  # never reaches the model; the message stays in the box to send again
                yield history + [{"role": "user", "content": text}, {"role": "assistant", "content": error}], \
                    conv, "", text
                return
            asked = conv + [{"role": "user", "content": text.replace(_IMAGE_PLACEHOLDER, "image")}]
            history = history + [{"role": "user", "content": text}, {"role": "assistant", "content": ""}]
            yield list(history), conv, "", ""

            key = session_key(request)
            stop_event = running.start(key)
            pieces: queue.Queue = queue.Queue()
            threading.Thread(target=_produce, args=(pipe, im, asked, stop_event, pieces, model_lock, detector,
                                                    max_new_tokens), daemon=True, name="shusheng-chat").start()
            parts: list[str] = []
            last = failure = detections = None
            timed_out = False
            deadline = time.monotonic() + ctx.limits.request_timeout
            try:
                while True:
                    try:
                        item = pieces.get(timeout=max(0.0, deadline - time.monotonic()))
                    except queue.Empty:
                        timed_out = True
                        break
                    if item is _DONE:
                        break
                    if isinstance(item, Exception):
                        failure = item
                    elif isinstance(item, _Detections):
                        detections = item
                    else:
                        if item.finish_reason is not None:
                            last = item
                        if item.text:
                            parts.append(item.text)
                            history[-1] = {"role": "assistant", "content": "".join(parts)}
                            yield list(history), conv, "", ""
            finally:  # done, given up, or the client went away: the worker ends after its current token
                stop_event.set()
                running.end(key, stop_event)

            if failure is not None:
                if isinstance(failure, ValueError):  # e.g. a conversation longer than the LM's positions
                    history[-1] = {"role": "assistant",
                                   "content": f"⚠️ {failure}. Press **New chat** to start again."}
                    yield list(history), conv, "", ""
                    return
                with shown_to_user(gr, "Chat"):
                    raise failure
            if last is not None and last.finish_reason == "error":
                history[-1] = {"role": "assistant", "content": f"This image cannot be used: {last.error}"}
                yield list(history), conv, "", ""
                return
            answer = "".join(parts)
            shown = answer.rstrip()
            if timed_out:
                shown += (f" *(given up after {ctx.limits.request_timeout:g} s: the server is busy or the answer "
                          "too long; try again)*")
            elif last is None or last.finish_reason == "interrupted":
                shown += " *(stopped)*"
            if detections is not None and answer.strip():
                from shusheng.llm.grounding import unsupported_mentions

                line = unsupported_line(unsupported_mentions(answer, list(detections)))
                if line:
                    shown += "\n\n" + line
            history[-1] = {"role": "assistant", "content": shown.strip() or "*(no answer)*"}
            if answer.strip():  # an empty answer leaves no turn behind (the model cannot read empty messages)
                conv = asked + [{"role": "assistant", "content": answer}]
            note = "" if last is None else domain_notice(
                SimpleNamespace(in_domain=[last.in_domain], domain_score=[last.domain_score]), 0, "answer")
            yield list(history), conv, note, ""

        def stop_chat(request: gr.Request = None):
            running.stop(session_key(request))

        def clear_chat(request: gr.Request = None):
            running.stop(session_key(request))
            return [], [], ""

        gallery.select(pick, None, image, api_name="pick_chat_sample", api_visibility="undocumented")
        image.change(clear_chat, None, [chatbot, conversation, notice], api_name="new_image_chat",
                     api_visibility="private")
        gr.on([send_btn.click, message.submit], respond, [image, message, chatbot, conversation],
              [chatbot, conversation, notice, message], api_name="chat", concurrency_id="requests")
        # not queued behind the answers it stops
        stop_btn.click(stop_chat, None, None, api_name="stop_chat", concurrency_limit=None,
                       concurrency_id="stop_chat")
        clear_btn.click(clear_chat, None, [chatbot, conversation, notice], api_name="clear_chat",
                        api_visibility="undocumented", concurrency_limit=None, concurrency_id="stop_chat")
    return tab


class ChatTab:
    """The Chat tab over the bundled ``shusheng-mini-bridge`` or a bridge folder.

    Args:
        bridge: a bridge folder (``shusheng train bridge`` writes ``<output>/final``); None = the bundled one.
        lm: where the bridge's LM is on this machine, if not where its ``config.json`` says.
    """

    title = "Chat"

    def __init__(self, bridge: str | None = None, lm: str | None = None):
        self.bridge, self.lm = bridge, lm

    def available(self) -> str | None:
        """``None`` when a trained bridge folder is there and transformers is installed, else why not."""
        return trained_model_reason(
            self.bridge, index_file="config.json", bundled=BUNDLED_MODEL, modules=("transformers",),
            needs="The chat model needs transformers: `pip install 'shusheng[llm]'`.",
            folder_kind="an LLM bridge folder", train_command=TRAIN_COMMAND, flag="--bridge runs/bridge/final",
            missing=self.missing())

    @staticmethod
    def missing() -> str:
        return (f"No trained LLM bridge is bundled (`{BUNDLED_MODEL}`). Its projector, which maps the image into "
                "the language model, must be trained first: with a random one the model would answer without "
                f"seeing the image.\n\nTrain one with `{TRAIN_COMMAND}`, then start the app with "
                "`shusheng demo --bridge runs/bridge/final` (or copy that folder to "
                f"`shusheng/weights/{BUNDLED_MODEL}`).")

    def build(self, ctx: AppContext) -> None:
        try:
            from shusheng.llm import ChatPipeline

            pipe = ChatPipeline.from_pretrained(self.bridge, device=ctx.device or "cpu", lm=self.lm)
        except ImportError as e:
            raise TabUnavailable(f"The chat model cannot be loaded: {e}") from e
        except FileNotFoundError as e:  # no trained bridge, an LM that is not where the bridge says
            raise TabUnavailable(f"The LLM bridge cannot be loaded: {e}") from e
        except ValueError as e:  # an LM of another width, a tokenizer without a chat template
            raise TabUnavailable(f"The LLM bridge cannot be loaded: {e}") from e
        chat_tab(pipe, ctx=ctx, detector=grounding_detector())


TAB = ChatTab()
