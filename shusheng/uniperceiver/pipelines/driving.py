"""The driving checklist: a fixed set of questions asked of every frame, each answer with its evidence boxes.

    >>> from shusheng.uniperceiver.pipelines.driving import DrivingChecklist
    >>> check = DrivingChecklist.from_pretrained()              # bundled decoder + the default question set
    >>> out = check(["frame0.png", "frame1.png"], times=[0.0, 0.125])
    >>> out.results[1]["stop"]                                  # {"answer", "score", "evidence": [...]}

A question set is JSON (:func:`load_checklist`; the default is ``driving_questions.json`` next to this module,
also shipped as ``demos/questions/driving.json``). Each question has an ``id``, the ``question`` text, its closed
``answers`` (the decoder picks among them, so every answer has the form the question asks for), the dense labels
that count as ``evidence`` and, optionally, a ``truth`` (how :mod:`shusheng.data.synthdrive_qa` derives the right
answer from SynthDrive attributes; used by scoring, never by answering).

**Frame questions** are answered by the decoder by matching (:class:`VQAPipeline`). Their evidence is the
objects the image tower's dense head finds (the same head the decoder's image tokens summarise) whose label is
in the question's ``evidence`` list; when some of them agree with the answer (``light red`` for ``red``), only
those are given. ``"evidence_rule": "nearest"`` keeps the vehicle box nearest the camera (the lowest bottom edge;
overlapping boxes count as one object and near-ties go to the larger box), and ``"answer_from": "evidence"`` makes
that box's label the answer (``none`` without one, scored by the decoder): the dense head reads the nearest
vehicle's colour and type better than the decoder's 4 x 4 pooled tokens (0.72 against 0.53 on
``bench/drive_qa.py``).

**With a detector** (``DrivingChecklist(..., detector=InternImageDetector)``, e.g. the bundled
``shusheng-mini-det``), questions with ``"answer_from": "count"`` (``vehicle_count``) are answered by the number of
the detector's car / truck / bus boxes (capped at the largest answer), which are also their evidence; without a
detector the decoder answers them (the dense head's cells merge neighbouring vehicles). Each detected vehicle is
labelled "<colour> <type>": with the detector's colour head (``color_head=``, :mod:`shusheng.detection.colors`,
read from the vehicle's mask; ``from_pretrained`` loads the one stored with the detector) the colour most probable
under both it and the dense head's cells inside the box (their product), else the dense head's. With a colour head,
``"answer_from": "evidence"`` questions (``nearest_vehicle``) also take the detector's boxes: one box per object
(overlapping detections of different types merged), the lowest bottom edge, near-ties going to the larger box.
Without one they keep the dense head's boxes, which named the nearest vehicle better than the detector's boxes
with dense-head colours.

**Temporal questions** (``"temporal": {"rule", "of", "window_s"}``) are answered from the answers to another
question over the frames of the last ``window_s`` seconds, which must come with ``times``:

* ``changed``: ``yes`` when the answer to ``of`` at this frame differs from its answer at some frame of the window
  (answers listed in ``ignore``, e.g. "none" for no light in view, take part in no comparison);
* ``entered``: ``yes`` when ``of`` is answered ``yes`` now and, at some frame of the window, ``no`` or ``yes`` with
  fewer evidence boxes (someone joined those already there), or, with ``"from": [labels]``, when one of its
  evidence boxes now overlaps (IoU >= :data:`TRACK_IOU`) a box labelled in ``from`` at some frame of the window
  (the person was just there before: ``"person on sidewalk"`` for the default set). The second test sees one person
  step on while others are already there, which the count misses; val drives, balanced accuracy 0.667 -> 0.752.
  Its evidence is the ``of`` answer's boxes and the frame's ``from`` boxes: everything the rule compares, so a
  resumed run rebuilds the same window from the output.

Their score is the lowest score among the answers the rule compared.

**Tracks** (``"track_s": seconds`` on an ``"answer_from": "evidence"`` question, videos only): the answer's box
is followed back through the frames of the last ``track_s`` seconds, each step to the box of the frame before
that overlaps it (IoU >= :data:`TRACK_IOU`), and the answer becomes the label with the largest summed box score on
that track. A colour misread in a frame or two is outvoted; the evidence stays the frame's own box. The default
set tracks the nearest vehicle over 1 s (val drives: 0.830 -> 0.858).
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shusheng.pipelines import PipelineOutput, as_image_list
from shusheng.uniperceiver.pipelines import VQAPipeline

__all__ = ["DEFAULT_CHECKLIST", "RECORD_FIELDS", "ChecklistOutput", "ChecklistQuestion", "DrivingChecklist",
           "TemporalWindow", "load_checklist", "load_color_head", "load_detector", "validate_record"]

DEFAULT_CHECKLIST = Path(__file__).with_name("driving_questions.json")
_RULES = ("changed", "entered")


def _answer_set(name: str) -> list[str]:
    """Named answer sets a question file may use instead of a list."""
    from shusheng.data.synthdrive_qa import VEHICLE_DESCRIPTIONS

    if name == "nearest_vehicle":
        return [*VEHICLE_DESCRIPTIONS, "none"]
    raise ValueError(f"unknown answer set {name!r}; give a list of answers or 'nearest_vehicle'")


@dataclass(frozen=True)
class ChecklistQuestion:
    """One question of a checklist (see the module docstring for the fields)."""

    id: str
    question: str
    answers: tuple[str, ...]
    evidence: tuple[str, ...] = ()
    evidence_rule: str = "all"
    temporal: dict[str, Any] | None = None
    truth: dict[str, Any] | None = None
    numeric: bool = False
    answer_from: str = "decoder"
    track_s: float = 0.0

    @property
    def is_temporal(self) -> bool:
        return self.temporal is not None


def load_checklist(path: str | Path | None = None) -> list[ChecklistQuestion]:
    """Read and check a question set (default :data:`DEFAULT_CHECKLIST`).

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not valid JSON or a question is malformed (with the question's id).
    """
    path = Path(path) if path is not None else DEFAULT_CHECKLIST
    if not path.is_file():
        raise FileNotFoundError(f"question set {path} not found")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    items = raw.get("questions") if isinstance(raw, dict) else raw
    if not isinstance(items, list) or not items:
        raise ValueError(f"{path}: expected a list of questions (or {{'questions': [...]}})")
    out: list[ChecklistQuestion] = []
    for k, q in enumerate(items):
        where = f"{path}: question {q.get('id', k) if isinstance(q, dict) else k}"
        if not isinstance(q, dict) or not isinstance(q.get("id"), str) or not isinstance(q.get("question"), str):
            raise ValueError(f"{where}: needs string 'id' and 'question'")
        if not q["question"].strip():
            raise ValueError(f"{where}: the question is empty")
        answers = q.get("answers")
        answers = _answer_set(answers) if isinstance(answers, str) else answers
        if not isinstance(answers, list) or not answers or not all(isinstance(a, str) and a for a in answers):
            raise ValueError(f"{where}: 'answers' must be a non-empty list of strings")
        temporal = q.get("temporal")
        if temporal is not None:
            if temporal.get("rule") not in _RULES:
                raise ValueError(f"{where}: temporal rule must be one of {_RULES}, got {temporal.get('rule')!r}")
            if float(temporal.get("window_s", 0)) <= 0:
                raise ValueError(f"{where}: temporal window_s must be > 0")
            came_from = temporal.get("from", [])
            if not isinstance(came_from, list) or not all(isinstance(x, str) and x for x in came_from):
                raise ValueError(f"{where}: temporal 'from' must be a list of box labels")
            if came_from and temporal["rule"] != "entered":
                raise ValueError(f"{where}: temporal 'from' belongs to the 'entered' rule")
        rule = q.get("evidence_rule", "all")
        if rule not in ("all", "nearest"):
            raise ValueError(f"{where}: evidence_rule must be 'all' or 'nearest', got {rule!r}")
        source = q.get("answer_from", "decoder")
        if source not in ("decoder", "evidence", "count"):
            raise ValueError(f"{where}: answer_from must be 'decoder', 'evidence' or 'count', got {source!r}")
        if source == "evidence" and (rule != "nearest" or "none" not in answers):
            raise ValueError(f"{where}: answer_from 'evidence' needs evidence_rule 'nearest' and a 'none' answer")
        if source == "count" and (rule != "all" or not all(a.isdigit() for a in answers) or "0" not in answers):
            raise ValueError(f"{where}: answer_from 'count' needs evidence_rule 'all' and the answers '0', '1', ...")
        track = q.get("track_s", 0.0)
        if not isinstance(track, (int, float)) or isinstance(track, bool) or track < 0:
            raise ValueError(f"{where}: track_s must be a number of seconds >= 0, got {track!r}")
        if track and source != "evidence":
            raise ValueError(f"{where}: track_s follows the one box of an answer_from 'evidence' question")
        out.append(ChecklistQuestion(q["id"], q["question"], tuple(answers), tuple(q.get("evidence", ())), rule,
                                     temporal, q.get("truth"), bool(q.get("numeric", False)), source, float(track)))
    ids = [q.id for q in out]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{path}: question ids must be unique, got {ids}")
    frame_ids = {q.id for q in out if not q.is_temporal}
    for q in out:
        if q.is_temporal and q.temporal.get("of") not in frame_ids:
            raise ValueError(f"{path}: question {q.id}: temporal 'of' must name a frame question of the set "
                             f"({sorted(frame_ids)}), got {q.temporal.get('of')!r}")
        if q.temporal and q.temporal["rule"] == "entered":
            of = next(x for x in out if x.id == q.temporal["of"])
            if not {"yes", "no"} <= set(of.answers):
                raise ValueError(f"{path}: question {q.id}: rule 'entered' needs a yes/no question, {of.id} is not")
    return out


class TemporalWindow:
    """Answers of the frame questions over the last seconds of one video; answers temporal questions.

    Feed frames in time order with :meth:`push`; a source's window never mixes with another's (use one window per
    video). ``load`` restores a window from earlier results (resuming a run).
    """

    def __init__(self, questions: Sequence[ChecklistQuestion]):
        self.temporal = [q for q in questions if q.is_temporal]
        self.tracked = [q for q in questions if q.track_s > 0]
        self.span = max([float(q.temporal["window_s"]) for q in self.temporal] + [q.track_s for q in self.tracked],
                        default=0.0)
        # box labels the 'entered' rules look for in earlier frames ("from")
        self.from_labels = {lab for q in self.temporal for lab in q.temporal.get("from", ())}
        # per frame: {id: (answer, score, how many are there (entered), first evidence box (tracks))} and the
        # frame's boxes labelled in from_labels
        self.history: deque[tuple[float, dict[str, tuple[str, float, int, dict[str, Any] | None]],
                                  list[dict[str, Any]]]] = deque()

    def push_output(self, output: ChecklistOutput, times: Sequence[float]) -> None:
        """:meth:`push` every answered frame of ``output`` (consecutive frames of this window's video, at
        ``times``), adding the temporal answers to ``output.results`` in place. The frame questions may have been
        answered anywhere (another process, an earlier run): only their answers and boxes are read."""
        if len(times) != len(output.results):
            raise ValueError(f"got {len(times)} times for {len(output.results)} frames")
        for i, res in enumerate(output.results):
            if res is not None:
                res.update(self.push(float(times[i]), res, boxes=output.detections[i] or ()))

    def push(self, time_s: float, answers: dict[str, dict[str, Any]],
             boxes: Sequence[dict[str, Any]] = ()) -> dict[str, dict[str, Any]]:
        """Record a frame's answers (``{id: {"answer", "score", "evidence"}}``) and answer the temporal questions
        at this frame: ``{id: {"answer", "score", "evidence", "frames"}}`` (``frames``: window frames compared).
        ``boxes``: the frame's labelled boxes (``{"box", "label", ...}``); those an ``entered`` rule names in
        ``from`` are kept (a resumed run passes the evidence of the frame's temporal answers, which holds them).
        The answers of ``track_s`` questions are revised in place first (:meth:`_vote`)."""
        if self.history and time_s < self.history[-1][0]:
            raise ValueError(f"frames must come in time order: {time_s} after {self.history[-1][0]}")
        for q in self.tracked:
            if q.id in answers:
                answers[q.id].update(self._vote(q, time_s, answers[q.id]))
        from_boxes = [b for b in boxes if b.get("label") in self.from_labels and "box" in b]
        out = {}
        for q in self.temporal:
            of, window = q.temporal["of"], float(q.temporal["window_s"])
            if of not in answers:
                continue
            now, now_score = answers[of]["answer"], answers[of]["score"]
            recent = [h for h in self.history if time_s - h[0] <= window + 1e-6]
            past = [(t, a[of]) for t, a, _ in recent if of in a]
            came_from = set(q.temporal.get("from", ()))
            kept = [b for b in from_boxes if b["label"] in came_from]
            ignore = set(q.temporal.get("ignore", ()))
            if q.temporal["rule"] == "changed":
                compared = [(a, s) for _, (a, s, *_) in past if a not in ignore] if now not in ignore else []
                hit = any(a != now for a, _ in compared)
            else:  # entered: answered yes now, and no or with fewer evidence boxes at some frame of the window,
                # or a box of it now was a 'from' box at some frame of the window
                ev = answers[of].get("evidence", ())
                n_now = _present(now, ev)
                compared = [(a, s) for _, (a, s, *_) in past] if now == "yes" else []
                on_now = [b["box"] for b in ev if isinstance(b, dict) and "box" in b] if now == "yes" else []
                hit = now == "yes" and (any(n < n_now for _, (_, _, n, _) in past) or any(
                    _iou(c, b["box"]) >= TRACK_IOU for _, _, before in recent for b in before
                    if b["label"] in came_from for c in on_now))
            scores = [now_score] + [s for _, s in compared]
            evidence = list(answers[of].get("evidence", []))
            if q.temporal["rule"] == "entered":
                evidence += [{"box": list(b["box"]), "label": b["label"], "score": round(float(b.get("score", 1.0)), 4)}
                             for b in kept]
            out[q.id] = {"answer": "yes" if hit else "no", "score": float(min(scores)),
                         "evidence": evidence, "frames": len(compared)}
        self.history.append((time_s, {k: (v["answer"], float(v["score"]), _present(v["answer"], v.get("evidence", ())),
                                          _first_box(v)) for k, v in answers.items()},
                             from_boxes))
        while self.history and time_s - self.history[0][0] > self.span + 1e-6:
            self.history.popleft()
        return out

    def _vote(self, q: ChecklistQuestion, time_s: float, now: dict[str, Any]) -> dict[str, Any]:
        """``track_s``: follow the answer's box back through the frames of the last ``track_s`` seconds (each
        step to a box overlapping the previous one by IoU >= :data:`TRACK_IOU`) and answer the label with the
        largest summed box score on that track (the score: its share of the track's). The labels voting are the
        boxes' own (``evidence[0]["label"]``), so a resumed window rebuilds the same votes from the output."""
        first = _first_box(now)
        if now["answer"] == "none" or first is None:
            return {}  # nothing to follow (the scorer's true answers carry labels only)
        votes: dict[str, float] = {first["label"]: float(first["score"])}
        box = first["box"]
        for t, past, _ in reversed(self.history):
            b = past[q.id][3] if q.id in past else None
            if time_s - t > q.track_s + 1e-6 or b is None or _iou(box, b["box"]) < TRACK_IOU:
                break
            votes[b["label"]] = votes.get(b["label"], 0.0) + float(b["score"])
            box = b["box"]
        best = max(sorted(votes), key=lambda k: votes[k])
        if best not in q.answers:
            return {}
        return {"answer": best, "score": round(votes[best] / sum(votes.values()), 4)}


def _first_box(answer: dict[str, Any]) -> dict[str, Any] | None:
    """The first evidence box of an answer (None without one, or when evidence carries labels only)."""
    ev = answer.get("evidence") or []
    return ev[0] if ev and isinstance(ev[0], dict) and "box" in ev[0] else None


def _present(answer: str, evidence: Sequence[Any]) -> int:
    """How many are there, for the ``entered`` rule: 0 for a "no", else the evidence boxes (at least 1)."""
    return max(1, len(evidence)) if answer == "yes" else 0


@dataclass(kw_only=True)
class ChecklistOutput(PipelineOutput):
    """Per input frame: ``results[i]`` is ``{question id: {"answer", "score", "evidence"}}`` (None for a frame
    that failed); ``detections[i]`` all dense-head boxes of the frame."""

    results: list[dict[str, dict[str, Any]] | None] = field(default_factory=list)
    detections: list[list[dict[str, Any]] | None] = field(default_factory=list)


class DrivingChecklist:
    """Asks a question set of frames with a :class:`VQAPipeline` and finds evidence with the tower's dense head.

    Args:
        vqa: the answering pipeline; its model's image backbone must have a dense object head (the bundled
            decoder's does).
        questions: a question set (default: :func:`load_checklist`'s).
        threshold: dense-head cell threshold for evidence boxes.
        detector: an :class:`~shusheng.detection.model.InternImageDetector` whose labels include car, truck and
            bus: vehicle evidence then comes from its boxes (see the module docstring). None: the dense head's.
        detector_threshold: lowest detection score kept as evidence (the detector stops there too, so it
            computes no masks for what would be dropped).
        detector_proposals: Mask R-CNN's RPN proposals per frame (None: the detector's own setting;
            :meth:`from_pretrained` uses :data:`CHECKLIST_PROPOSALS`). A driving frame holds a few objects; the RoI
            heads' cost grows with the proposals. The detector given is set up in place (it is shared, not copied).
        color_head: a :class:`~shusheng.detection.colors.ColorHead` for the detector (a Mask R-CNN): the detected
            vehicles' colours are then read from their masks, and ``"answer_from": "evidence"`` questions
            (``nearest_vehicle``) take the detector's boxes (see the module docstring).
    """

    def __init__(self, vqa: VQAPipeline, questions: Sequence[ChecklistQuestion] | None = None,
                 threshold: float = 0.5, detector: Any = None, detector_threshold: float = 0.5,
                 color_head: Any = None, detector_proposals: int | None = None):
        if not hasattr(vqa.model.image.backbone, "features_and_dense"):
            raise ValueError("the model's image backbone has no dense object head: evidence boxes need one "
                             "(e.g. the bundled shusheng-mini-uniperceiver)")
        from shusheng.data.synthdrive import DENSE_LABELS

        self.vqa, self.labels = vqa, DENSE_LABELS
        self.questions = list(questions) if questions is not None else load_checklist()
        self.frame_questions = [q for q in self.questions if not q.is_temporal]
        self.threshold = float(threshold)
        self.detector, self.detector_threshold = detector, float(detector_threshold)
        if color_head is not None and detector is None:
            raise ValueError("a colour head names the colours of a detector's vehicles: give the detector too")
        self.color_head = color_head
        if detector is not None:
            from shusheng.data.synthdrive_render import VEHICLE_TYPES

            missing = [t for t in VEHICLE_TYPES if t not in detector.labels]
            if missing:
                raise ValueError(f"the detector does not find {missing}: vehicle evidence needs car, truck and bus")
            detector.eval()
            # the checklist's settings are written into the detector it is given (it shares the object); a
            # detector without inference settings is used as it is
            if hasattr(detector, "set_inference"):
                detector.set_inference(score_threshold=self.detector_threshold,
                                       proposals=None if detector.config.head == "fcos" else detector_proposals)
            pre = vqa.model.preprocess_config() if hasattr(vqa.model, "preprocess_config") else None
            mean, std = (pre.mean, pre.std) if pre is not None else ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
            self._mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
            self._std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        with torch.inference_mode():
            self._answer_feats = {q.id: vqa.model.text_features(list(q.answers)) for q in self.frame_questions}

    @classmethod
    def from_pretrained(cls, path: str | Path | None = None, questions: str | Path | None = None,
                        detector: str | Path | None = None, **kwargs: Any) -> DrivingChecklist:
        """The checklist over a saved decoder (default: the bundled one) and a question file (default set).
        ``detector``: a saved detector folder, ``"auto"`` (the bundled ``shusheng-mini-det`` when it is
        installed, else none) or None (dense-head evidence)."""
        det = load_detector(detector)
        kwargs.setdefault("color_head", load_color_head(detector) if det is not None else None)
        kwargs.setdefault("detector_proposals", CHECKLIST_PROPOSALS)
        return cls(VQAPipeline.from_pretrained(path), load_checklist(questions), detector=det, **kwargs)

    def window(self) -> TemporalWindow:
        """A new :class:`TemporalWindow` for one video."""
        return TemporalWindow(self.questions)

    def _evidence(self, q: ChecklistQuestion, answer: str, boxes: list[dict[str, Any]]) -> list[dict[str, Any]]:
        wanted = [b for b in boxes if any(b["label"] == e or (e == "vehicle" and b["group"] == "vehicle")
                                          for e in q.evidence)]
        if q.evidence_rule == "nearest":
            wanted = _nearest(wanted)
        words = set(answer.replace("_", " ").split())
        agree = [b for b in wanted if words & set(b["label"].replace("_", " ").split()) - {"sign", "light"}]
        chosen = agree or wanted
        if answer in ("no", "none", "0") and q.evidence_rule != "nearest" and not agree:
            chosen = wanted  # what was looked at: possibly nothing
        return [{"box": b["box"], "label": b["label"], "score": round(b["score"], 4)} for b in chosen]

    def _detect(self, pixels: torch.Tensor) -> list[dict[str, Any]]:
        """The detector on the decoder's (normalised, square) input: detections in its pixels (with the colour
        head's ``colors`` of every detection, None for those it does not name)."""
        unit = (pixels.float().cpu() * self._std + self._mean).clamp_(0, 1)
        found = [{k: v.cpu().numpy() for k, v in r.items()} for r in self.detector(list(unit))]
        if self.color_head is not None:
            for img, r in zip(unit, found):
                if "masks" in r:
                    r["color_probs"] = self.color_head.detection_probabilities(
                        img, [self.detector.label_name(int(lab)) for lab in r["labels"]], r["masks"])
        return found

    def _vehicle_boxes(self, found: dict[str, Any], prob: Any, shape: Sequence[int],
                       scale: tuple[float, float]) -> list[dict[str, Any]]:
        """Detected vehicles as evidence boxes in image pixels, labelled "<colour> <type>": the type is the
        detector's; the colour is the one most probable under both the colour head (from the mask) and the dense
        head (its most probable cell inside the box for "<colour> <type>"), the product of the two; without a
        colour head, the dense head's alone. The two read different things (the mask's pixel statistics, the
        tower's features) and err on different vehicles: on 2478 detected vehicles of 1000 val scenes the colour
        head alone named 0.887 right, the dense head 0.838, their product 0.913. (People stay the dense head's:
        on the val drives, detected people labelled by the dense head told who stepped onto a crosswalk worse,
        balanced accuracy 0.658 against 0.740.)"""
        from shusheng.data.synthdrive_render import VEHICLE_TYPES

        gh, gw = prob.shape[1:]
        h, w = shape
        out = []
        head_probs = found.get("color_probs") or [None] * len(found["labels"])
        for box, label, score, hp in zip(found["boxes"], found["labels"], found["scores"], head_probs):
            vtype = self.detector.label_name(int(label))
            if vtype not in VEHICLE_TYPES or float(score) < self.detector_threshold:
                continue
            x0, y0, x1, y1 = (float(v) for v in box)
            cx0, cy0 = int(x0 * gw / w), int(y0 * gh / h)
            cx1, cy1 = max(cx0 + 1, int(np.ceil(x1 * gw / w))), max(cy0 + 1, int(np.ceil(y1 * gh / h)))
            cells = prob[:, cy0:cy1, cx0:cx1].reshape(prob.shape[0], -1).max(1)
            names = [k for k, n in enumerate(self.labels) if n.endswith(f" {vtype}")]
            if hp is not None:
                colors = self.color_head.names
                dense = np.array([cells[self.labels.index(f"{c} {vtype}")] if f"{c} {vtype}" in self.labels else 0.0
                                  for c in colors])
                joint = np.log(np.asarray(hp, np.float64) + 1e-6) + np.log(dense + 1e-6)
                best = f"{colors[int(joint.argmax())]} {vtype}"
            else:
                best = self.labels[max(names, key=lambda k: cells[k])] if names else vtype
            bx = [int(round(x0 * scale[0])), int(round(y0 * scale[1])), int(round((x1 - x0) * scale[0])),
                  int(round((y1 - y0) * scale[1]))]
            out.append({"box": [max(0, v) for v in bx], "label": best, "score": float(score), "group": "vehicle"})
        return out

    @torch.inference_mode()
    def __call__(self, images: Any, times: Sequence[float] | None = None, batch_size: int = 32,
                 on_error: str = "item", window: TemporalWindow | None = None) -> ChecklistOutput:
        """Answer the question set for each frame.

        Args:
            images: frames (paths, PIL images, ... see :func:`shusheng.pipelines.as_image_list`).
            times: seconds of each frame in one video, increasing; with them the temporal questions are answered
                (over ``window``, or a new one); without them only the frame questions.
            batch_size: frames per forward pass.
            on_error: ``"item"`` or ``"raise"`` for frames that cannot be loaded.
            window: a :class:`TemporalWindow` to continue (consecutive calls over one video).
        """
        from shusheng.backbone.dense_tower import DENSE_OBJECT_GROUPS, dense_boxes

        images = as_image_list(images)
        n = len(images)
        if times is not None and len(times) != n:
            raise ValueError(f"got {len(times)} times for {n} frames")
        model = self.vqa.model
        out = {"results": [None] * n, "detections": [None] * n, **self.vqa._empty(n)}
        group_of = {self.labels[k]: g for g, (a, b) in DENSE_OBJECT_GROUPS.items() for k in range(a, b)}
        for batch in self.vqa.batches(images, batch_size, on_error):
            if batch.pixels is None:
                self.vqa._fill(out, batch, [], [])
                continue
            tokens, prob = self.vqa._encode_with_dense(batch.pixels, out, batch)  # one backbone pass
            prob = prob.float().cpu().numpy()
            per_q, per_q_none, per_q_count = {}, {}, {}
            for q in self.frame_questions:
                p = model.vqa_match(None, [q.question] * len(batch.index), image_tokens=tokens,
                                    answer_features=self._answer_feats[q.id])
                best = p.max(-1)
                per_q[q.id] = [(q.answers[j], float(v)) for v, j in zip(best.values.tolist(), best.indices.tolist())]
                if q.answer_from == "evidence":
                    per_q_none[q.id] = p[:, q.answers.index("none")].tolist()
                if q.answer_from == "count":
                    per_q_count[q.id] = p.tolist()
            found = self._detect(batch.pixels) if self.detector is not None else None
            for j, i in enumerate(batch.index):
                boxes = dense_boxes(prob[j], batch.sizes[j], self.labels, self.threshold)
                for b in boxes:
                    b["group"] = group_of[b["label"]]
                counted = boxes
                if found is not None:
                    scale = (batch.sizes[j][0] / batch.pixels.shape[-1], batch.sizes[j][1] / batch.pixels.shape[-2])
                    counted = [b for b in boxes if b["group"] != "vehicle"] + self._vehicle_boxes(
                        found[j], prob[j], batch.pixels.shape[-2:], scale)
                # the nearest vehicle: from the detector's boxes when a colour head names their colours
                nearest_pool = counted if self.color_head is not None else boxes
                res = {}
                for q in self.frame_questions:
                    a, s = per_q[q.id][j]
                    if q.answer_from == "evidence":  # the label of the one box the rule picks, if any
                        picked = self._evidence(q, "", nearest_pool)
                        if picked and picked[0]["label"] in q.answers:
                            a, s = picked[0]["label"], picked[0]["score"]
                        elif not picked:
                            a, s = "none", float(per_q_none[q.id][j])
                    elif q.answer_from == "count" and found is not None:  # detected boxes, capped at the top answer
                        n_found = len(self._evidence(q, "", counted))
                        a = str(min(n_found, max(int(x) for x in q.answers)))
                        s = float(per_q_count[q.id][j][q.answers.index(a)])
                    # with a detector its boxes are the evidence, except for the nearest vehicle without a colour
                    # head (the dense head named it better than detector boxes with dense-head colours)
                    used = nearest_pool if q.answer_from == "evidence" else counted
                    res[q.id] = {"answer": a, "score": s, "evidence": self._evidence(q, a, used)}
                out["results"][i] = res
                out["detections"][i] = [{k: v for k, v in b.items() if k != "group"} for b in boxes]
        result = ChecklistOutput(**out)
        if times is not None:
            (window if window is not None else self.window()).push_output(result, times)
        return result



def load_detector(source: str | Path | None) -> Any:
    """A detector for :class:`DrivingChecklist`: a saved folder, ``"auto"`` (the bundled ``shusheng-mini-det``
    when installed, else None) or None."""
    folder = _detector_folder(source)
    if folder is None:
        return None
    from shusheng.detection.model import InternImageDetector

    return InternImageDetector.from_pretrained(folder).eval()


def _detector_folder(source: str | Path | None) -> str | Path | None:
    """``source`` itself, the bundled ``shusheng-mini-det``'s folder for ``"auto"`` (None when it is not
    installed), or None."""
    if source is None or str(source) != "auto":
        return source
    from shusheng.weights import BundledWeightsNotFound, bundled_path

    try:
        return bundled_path("shusheng-mini-det")
    except BundledWeightsNotFound:
        return None


#: RPN proposals per frame for a checklist's Mask R-CNN (:meth:`DrivingChecklist.from_pretrained`); the bundled
#: detector's own inference setting is 250. Chosen on the val drives (``bench/drive_qa.py --split val``).
CHECKLIST_PROPOSALS = 100

#: ``track_s``: a box continues a track when it overlaps the track's next box by at least this (IoU)
TRACK_IOU = 0.3

#: for "nearest", detected vehicles overlapping more than this (IoU) are one vehicle found under two types
#: (torchvision suppresses per class); counting keeps them (occluded vehicles overlap too). Chosen on the val drives
#: (``bench/drive_qa.py --split val``): 0.6 named the nearest vehicle right in 0.811 of frames, no merging 0.781.
SAME_VEHICLE_IOU = 0.6
#: boxes whose bottom edges are this close (share of the lowest box's height) tie for "nearest"; val drives:
#: 0.781 with 0.15, 0.764 without
NEAREST_TIE = 0.15


def _iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two ``[x, y, w, h]`` boxes."""
    w = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    h = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    inter = max(0.0, w) * max(0.0, h)
    union = a[2] * a[3] + b[2] * b[3] - inter
    return inter / union if union > 0 else 0.0


def _one_per_object(boxes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Class-agnostic NMS: of boxes overlapping more than :data:`SAME_VEHICLE_IOU`, the best-scoring one."""
    kept: list[dict[str, Any]] = []
    for b in sorted(boxes, key=lambda b: -b["score"]):
        if all(_iou(b["box"], k["box"]) <= SAME_VEHICLE_IOU for k in kept):
            kept.append(b)
    return kept


def _nearest(boxes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The box nearest to the camera, as a list of at most one: one box per object (:func:`_one_per_object`),
    then the lowest bottom edge, and among boxes whose bottom edges lie within :data:`NEAREST_TIE` of that box's
    height of it, the largest (SynthDrive's own rule breaks exact ties by size; a box edge found a pixel off must
    not decide)."""
    boxes = _one_per_object(boxes)
    if not boxes:
        return []
    low = max(boxes, key=lambda b: b["box"][1] + b["box"][3])
    bottom, tol = low["box"][1] + low["box"][3], NEAREST_TIE * max(1, low["box"][3])
    tied = [b for b in boxes if b["box"][1] + b["box"][3] >= bottom - tol]
    return [max(tied, key=lambda b: (b["box"][2] * b["box"][3], b["box"][1] + b["box"][3]))]


def load_color_head(source: str | Path | None) -> Any:
    """The colour head stored with a detector (:func:`load_detector`'s ``source``), or None when it has none."""
    folder = _detector_folder(source)
    if folder is None:
        return None
    from shusheng.detection.colors import ColorHead

    return ColorHead.load(folder)


#: keys of one output line of ``demos/drive_qa.py`` and their types (``None`` allowed where listed)
RECORD_FIELDS: dict[str, tuple[type, ...]] = {
    "source": (str,), "frame": (dict,), "question_id": (str,), "question": (str,), "answer": (str, type(None)),
    "score": (float, int, type(None)), "evidence": (list,), "in_domain": (bool, type(None)),
}


def validate_record(rec: Any, questions: Sequence[ChecklistQuestion] | None = None) -> list[str]:
    """Problems of one result line (empty when valid): missing or mistyped fields, a frame without an integer
    ``index`` and a ``time_s`` (number or null), malformed evidence boxes, a score outside [0, 1], and, given the
    question set, an unknown question id or an answer outside the question's answers. A line with an ``error``
    (the frame could not be read) must have a null answer."""
    if not isinstance(rec, dict):
        return ["not a JSON object"]
    problems = [f"missing {k}" for k in RECORD_FIELDS if k not in rec]
    problems += [f"{k} has type {type(rec[k]).__name__}" for k, types in RECORD_FIELDS.items()
                 if k in rec and not isinstance(rec[k], types)]
    if problems:
        return problems
    f = rec["frame"]
    if not isinstance(f.get("index"), int) or isinstance(f.get("index"), bool) or f["index"] < 0:
        problems.append("frame.index must be an integer >= 0")
    if "time_s" not in f or not (f["time_s"] is None or isinstance(f["time_s"], (int, float))):
        problems.append("frame.time_s must be a number or null")
    for b in rec["evidence"]:
        if not (isinstance(b, dict) and isinstance(b.get("label"), str) and isinstance(b.get("box"), list)
                and len(b["box"]) == 4 and all(isinstance(v, int) and v >= 0 for v in b["box"])):
            problems.append(f"bad evidence box {b!r}")
            break
    if rec["score"] is not None and not 0.0 <= float(rec["score"]) <= 1.0 + 1e-6:
        problems.append(f"score {rec['score']} outside [0, 1]")
    if rec.get("error") is not None:
        if rec["answer"] is not None:
            problems.append("a line with an error must have a null answer")
        return problems
    if rec["answer"] is None:
        problems.append("null answer without an error")
    if questions is not None:
        by_id = {q.id: q for q in questions}
        q = by_id.get(rec["question_id"])
        if q is None:
            problems.append(f"unknown question id {rec['question_id']!r}")
        elif rec["answer"] is not None and rec["answer"] not in q.answers:
            problems.append(f"answer {rec['answer']!r} is not one of {list(q.answers)}")
    return problems
