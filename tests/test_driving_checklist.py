"""The driving checklist: question files, temporal rules, the output schema, and answers on real frames."""

from __future__ import annotations

import json

import numpy as np
import pytest

from shusheng.uniperceiver.pipelines.driving import (
    DEFAULT_CHECKLIST,
    TemporalWindow,
    load_checklist,
    validate_record,
)


def test_default_question_set_covers_the_driving_checklist():
    qs = load_checklist()
    ids = [q.id for q in qs]
    assert ids == ["light", "stop", "crosswalk_pedestrians", "speed_limit", "vehicle_count", "nearest_vehicle",
                   "light_changed", "pedestrian_entering"]
    by = {q.id: q for q in qs}
    assert set(by["light"].answers) == {"red", "yellow", "green", "none"}
    assert len(by["nearest_vehicle"].answers) == 8 * 3 + 1 and "red bus" in by["nearest_vehicle"].answers
    assert by["speed_limit"].numeric and by["vehicle_count"].numeric and not by["light"].numeric
    assert [q.id for q in qs if q.is_temporal] == ["light_changed", "pedestrian_entering"]
    assert [q.id for q in qs if q.answer_from == "evidence"] == ["nearest_vehicle"]
    assert [q.id for q in qs if q.answer_from == "count"] == ["vehicle_count"]
    # demos/ ships the same file
    from pathlib import Path

    demo = Path(__file__).resolve().parents[1] / "demos" / "questions" / "driving.json"
    assert json.loads(demo.read_text()) == json.loads(DEFAULT_CHECKLIST.read_text())


@pytest.mark.parametrize("questions, message", [
    ([{"id": "a", "question": "Q?", "answers": []}], "non-empty list"),
    ([{"id": "a", "question": " ", "answers": ["yes"]}], "empty"),
    ([{"id": "a", "question": "Q?", "answers": ["yes"]}, {"id": "a", "question": "R?", "answers": ["no"]}],
     "unique"),
    ([{"id": "t", "question": "Q?", "answers": ["yes", "no"],
       "temporal": {"rule": "changed", "of": "x", "window_s": 1}}], "must name a frame question"),
    ([{"id": "a", "question": "Q?", "answers": ["red", "green"]},
      {"id": "t", "question": "Q?", "answers": ["yes", "no"], "temporal": {"rule": "entered", "of": "a",
                                                                           "window_s": 1}}], "yes/no question"),
    ([{"id": "a", "question": "Q?", "answers": ["yes", "no"]},
      {"id": "t", "question": "Q?", "answers": ["yes", "no"], "temporal": {"rule": "entered", "of": "a",
                                                                           "window_s": 1, "from": "sidewalk"}}],
     "'from' must be a list"),
    ([{"id": "a", "question": "Q?", "answers": ["yes", "no"]},
      {"id": "t", "question": "Q?", "answers": ["yes", "no"], "temporal": {"rule": "changed", "of": "a",
                                                                           "window_s": 1, "from": ["x"]}}],
     "'from' belongs to the 'entered' rule"),
    ([{"id": "a", "question": "Q?", "answers": ["yes"], "evidence_rule": "largest"}], "evidence_rule"),
    ([{"id": "a", "question": "Q?", "answers": "everything"}], "unknown answer set"),
    ([{"id": "a", "question": "Q?", "answers": ["red car", "none"], "answer_from": "evidence"}], "needs evidence_rule"),
    ([{"id": "a", "question": "Q?", "answers": ["none"], "answer_from": "detector"}], "answer_from must be"),
    ([{"id": "a", "question": "Q?", "answers": ["few", "many"], "answer_from": "count"}], "answer_from 'count'"),
    ([{"id": "a", "question": "Q?", "answers": ["red car", "none"], "track_s": 1.0}], "track_s follows"),
    ([{"id": "a", "question": "Q?", "answers": ["red car", "none"], "evidence_rule": "nearest",
       "answer_from": "evidence", "track_s": -1}], "track_s must be"),
])
def test_malformed_question_files_are_refused_with_the_reason(tmp_path, questions, message):
    f = tmp_path / "q.json"
    f.write_text(json.dumps({"questions": questions}))
    with pytest.raises(ValueError, match=message):
        load_checklist(f)
    f.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_checklist(f)
    with pytest.raises(FileNotFoundError):
        load_checklist(tmp_path / "missing.json")


def _a(answer, score=0.9):
    return {"answer": answer, "score": score, "evidence": []}


def test_light_changed_compares_within_the_window_and_ignores_frames_without_a_light():
    win = TemporalWindow(load_checklist())
    seq = [(0.0, "green"), (0.5, "none"), (1.0, "green"), (1.25, "yellow"), (1.5, "yellow"), (2.0, "yellow"),
           (2.3, "yellow"), (2.4, "none")]
    got = [win.push(t, {"light": _a(s), "crosswalk_pedestrians": _a("no")})["light_changed"]["answer"]
           for t, s in seq]
    #        green  none   green   yellow (green 0.25 s ago)  yellow  yellow (green at 1.0, 1 s ago)
    assert got == ["no", "no", "no", "yes", "yes", "yes", "no", "no"]


def test_pedestrian_entering_needs_no_then_yes_within_the_window():
    win = TemporalWindow(load_checklist())
    seq = [(0.0, "no"), (0.5, "yes"), (1.0, "yes"), (2.0, "yes"), (2.1, "no"), (4.0, "yes")]
    got = [win.push(t, {"light": _a("none"), "crosswalk_pedestrians": _a(s, 0.8 if s == "yes" else 0.6)})
           for t, s in seq]
    assert [g["pedestrian_entering"]["answer"] for g in got] == ["no", "yes", "yes", "no", "no", "no"]
    # the score is the least sure of the answers compared
    assert got[1]["pedestrian_entering"]["score"] == pytest.approx(0.6)
    with pytest.raises(ValueError, match="time order"):
        win.push(1.0, {"light": _a("none"), "crosswalk_pedestrians": _a("no")})


def test_pedestrian_entering_counts_who_is_there():
    """Someone joining a person already on the crosswalk is an entry: the answer stays yes, the evidence grows."""
    win = TemporalWindow(load_checklist())
    person = {"box": [1, 2, 3, 4], "label": "person on crosswalk", "score": 0.9}
    seq = [(0.0, 1), (0.25, 1), (0.5, 2), (0.75, 2), (2.0, 2), (2.25, 1), (2.5, 2)]
    got = [win.push(t, {"light": _a("none"), "crosswalk_pedestrians": {"answer": "yes", "score": 0.9,
                                                                       "evidence": [person] * n}})
           for t, n in seq]
    assert [g["pedestrian_entering"]["answer"] for g in got] == ["no", "no", "yes", "yes", "no", "no", "yes"]
    # a "no" counts nobody, whatever boxes it shows; a "yes" without boxes counts one
    win = TemporalWindow(load_checklist())
    win.push(0.0, {"crosswalk_pedestrians": {"answer": "no", "score": 0.9, "evidence": [person] * 3}})
    assert win.push(0.5, {"crosswalk_pedestrians": _a("yes")})["pedestrian_entering"]["answer"] == "yes"


def test_pedestrian_entering_sees_someone_step_from_the_sidewalk_while_others_are_there():
    """``from``: a crosswalk box now that overlaps a sidewalk box of the last second is an entry even when the count
    does not grow (one steps on as another steps off); a sidewalk box elsewhere or too long ago is not. The
    evidence carries the frame's sidewalk boxes, so a window rebuilt from the output answers the same."""
    qs = load_checklist()
    entering = next(q for q in qs if q.id == "pedestrian_entering")
    assert entering.temporal["from"] == ["person on sidewalk"]

    def box(label, xywh):
        return {"box": xywh, "label": label, "score": 0.9}

    other = box("person on crosswalk", [60, 60, 8, 16])
    walker_off, walker_on = box("person on sidewalk", [10, 60, 8, 16]), box("person on crosswalk", [12, 60, 8, 16])
    far_off = box("person on sidewalk", [100, 60, 8, 16])
    seq = [(0.0, [other], [walker_off, far_off]),     # one on the crosswalk, two on the sidewalk
           (0.5, [walker_on], [far_off]),             # the walker stepped on as the other left: the count stays 1
           (0.75, [walker_on], [far_off]),            # the walker's sidewalk box is still within the second
           (1.75, [walker_on], [far_off]),            # 1.75 s after: no longer
           (2.0, [box("person on crosswalk", [100, 90, 8, 16])], [])]  # appears below the far one: no overlap
    outputs = []
    for with_boxes in (True, False):
        win = TemporalWindow(qs)
        got = [win.push(t, {"crosswalk_pedestrians": {"answer": "yes", "score": 0.9, "evidence": on}},
                        boxes=(on + off) if with_boxes else ()) for t, on, off in seq]
        outputs.append([g["pedestrian_entering"]["answer"] for g in got])
    assert outputs[0] == ["no", "yes", "yes", "no", "no"]
    assert outputs[1] == ["no", "no", "no", "no", "no"]  # without the sidewalk boxes only the count rule is left
    # the evidence: the crosswalk boxes and the frame's sidewalk boxes; pushed back, they rebuild the window
    win = TemporalWindow(qs)
    lines = [win.push(t, {"crosswalk_pedestrians": {"answer": "yes", "score": 0.9, "evidence": on}}, boxes=on + off)
             for t, on, off in seq]
    assert lines[0]["pedestrian_entering"]["evidence"] == [other, walker_off, far_off]
    rebuilt = TemporalWindow(qs)
    again = [rebuilt.push(t, {"crosswalk_pedestrians": {"answer": "yes", "score": 0.9, "evidence": on}},
                          boxes=line["pedestrian_entering"]["evidence"])
             for (t, on, _), line in zip(seq, lines)]
    assert [g["pedestrian_entering"]["answer"] for g in again] == outputs[0]


def _near(label, box, score=0.9):
    return {"answer": label, "score": score, "evidence": [{"box": box, "label": label, "score": score}]}


def test_tracked_nearest_vehicle_is_the_vote_along_its_box_track():
    """track_s: the label with the largest summed score along the chain of overlapping boxes of the last second;
    a box that jumps elsewhere or an older frame ends the track; the evidence stays the frame's own box."""
    qs = load_checklist()
    assert next(q for q in qs if q.id == "nearest_vehicle").track_s == 1.0
    win = TemporalWindow(qs)
    seq = [(0.0, _near("red car", [10, 10, 20, 10])), (0.25, _near("red car", [11, 11, 20, 10])),
           (0.5, _near("black car", [12, 12, 20, 10], 0.8)),         # outvoted: red 1.8 against black 0.8
           (0.75, _near("black car", [80, 60, 20, 10], 0.8)),        # elsewhere: a new track
           (2.0, _near("black car", [80, 60, 20, 10], 0.8)),         # 1.25 s later: alone again
           (2.1, {"answer": "none", "score": 0.7, "evidence": []})]
    got = []
    for t, a in seq:
        win.push(t, {"nearest_vehicle": a})
        got.append((a["answer"], a["score"], a["evidence"][0]["label"] if a["evidence"] else None))
    assert [g[0] for g in got] == ["red car", "red car", "red car", "black car", "black car", "none"]
    assert got[2][1] == pytest.approx(1.8 / 2.6, abs=1e-4) and got[2][2] == "black car"
    assert got[3][1] == pytest.approx(1.0) and got[5][1] == 0.7


def _line(**kw):
    rec = {"source": "a.mp4", "frame": {"index": 3, "time_s": 0.375}, "question_id": "light",
           "question": "What color is the traffic light?", "answer": "red", "score": 0.9,
           "evidence": [{"box": [1, 2, 3, 4], "label": "light red", "score": 0.99}], "in_domain": True}
    rec.update(kw)
    return rec


def test_result_lines_are_checked_against_the_schema():
    qs = load_checklist()
    assert validate_record(_line(), qs) == []
    assert validate_record(_line(answer=None, score=None, evidence=[], error="cannot read"), qs) == []
    assert validate_record(_line(answer="purple"), qs) == ["answer 'purple' is not one of ['red', 'yellow', "
                                                           "'green', 'none']"]
    assert "missing source" in validate_record({k: v for k, v in _line().items() if k != "source"})
    assert validate_record(_line(frame={"index": -1, "time_s": None}))
    assert validate_record(_line(frame={"index": 0}))
    assert validate_record(_line(score=1.5))
    assert validate_record(_line(evidence=[{"box": [1, 2, 3], "label": "x"}]))
    assert validate_record(_line(answer=None))
    assert validate_record(_line(error="x"))
    assert validate_record(_line(question_id="weather"), qs)
    assert validate_record([1, 2]) == ["not a JSON object"]


def test_one_backbone_pass_gives_the_same_tokens_and_boxes_as_two():
    import torch

    from shusheng.backbone.dense_tower import dense_boxes
    from shusheng.data import VAL_SEED, sample
    from shusheng.data.synthdrive import DENSE_LABELS
    from shusheng.uniperceiver.pipelines import VQAPipeline
    from shusheng.weights import BundledWeightsNotFound

    try:
        vqa = VQAPipeline.from_pretrained()
    except BundledWeightsNotFound:
        pytest.skip("bundled shusheng-mini-uniperceiver not present")
    images = [sample(VAL_SEED, i, 128)[0] for i in range(3)]
    (batch,) = list(vqa.batches(images, 3))
    out_a, out_b = vqa._empty(3), vqa._empty(3)
    with torch.inference_mode():
        tokens, prob = vqa._encode_with_dense(batch.pixels, out_a, batch)
        torch.testing.assert_close(tokens, vqa._encode(batch.pixels, out_b, batch))
        dense = vqa.model.image.backbone.tower.fused_and_dense(batch.pixels)[1]
    assert out_a["in_domain"] == out_b["in_domain"] and out_a["domain_score"] == out_b["domain_score"]
    torch.testing.assert_close(prob, torch.sigmoid(dense))
    assert dense_boxes(prob[0].numpy(), (128, 128), DENSE_LABELS)  # the scene has objects


def test_nearest_vehicle_is_answered_by_the_lowest_vehicle_box():
    from shusheng.data import VAL_SEED, sample
    from shusheng.uniperceiver.pipelines.driving import DrivingChecklist
    from shusheng.weights import BundledWeightsNotFound

    try:
        check = DrivingChecklist.from_pretrained()
    except BundledWeightsNotFound:
        pytest.skip("bundled shusheng-mini-uniperceiver not present")
    images = [sample(VAL_SEED, i, 128)[0] for i in range(8)]
    out = check(images)
    seen_vehicle = False
    for res, boxes in zip(out.results, out.detections):
        r = res["nearest_vehicle"]
        vehicles = [b for b in boxes if b["label"] in check.questions[5].answers and b["label"] != "none"]
        if not vehicles:
            assert r["answer"] == "none" and r["evidence"] == []
            continue
        lowest = max(vehicles, key=lambda b: b["box"][1] + b["box"][3])
        assert r["answer"] == lowest["label"] and r["evidence"][0]["box"] == lowest["box"]
        seen_vehicle = True
    assert seen_vehicle


class _FixedDetector:
    """A stand-in detector: the same three detections on every image (xyxy in its input's pixels)."""

    labels = ["car", "truck", "bus", "person"]

    def __init__(self, masks: bool = False):
        self.calls, self.masks = [], masks

    def label_name(self, k):
        return self.labels[k - 1]

    def eval(self):
        return self

    def __call__(self, images):
        import torch

        self.calls.append([tuple(x.shape) for x in images])
        assert all(0.0 <= float(x.min()) and float(x.max()) <= 1.0 for x in images)  # unnormalised input
        one = {"boxes": torch.tensor([[10.0, 60.0, 40.0, 90.0], [70.0, 50.0, 100.0, 70.0], [0.0, 0.0, 6.0, 6.0],
                                      [50.0, 50.0, 60.0, 80.0]]),
               "labels": torch.tensor([1, 3, 2, 4]), "scores": torch.tensor([0.9, 0.8, 0.3, 0.95])}
        if self.masks:  # each detection's mask fills its box
            h, w = images[0].shape[-2:]
            one["masks"] = torch.zeros(4, 1, h, w)
            for k, (x0, y0, x1, y1) in enumerate(one["boxes"].int().tolist()):
                one["masks"][k, 0, y0:y1, x0:x1] = 1.0
        return [one for _ in images]


class _BlueHead:
    """A stand-in colour head: every vehicle mask is surely blue; records the mask areas it was given."""

    applies_to = ("car", "truck", "bus")
    names = ["red", "blue", "green", "yellow", "white", "black", "silver", "orange"]

    def __init__(self):
        self.areas = []

    def detection_probabilities(self, pixels, labels, masks):  # the real head's selection, with these probabilities
        from shusheng.detection.colors import ColorHead

        return ColorHead.detection_probabilities(self, pixels, labels, masks)

    def probabilities(self, image, masks):
        assert image.dtype.name == "uint8" and image.shape[2] == 3
        self.areas.append(sorted(int(m.sum()) for m in masks))
        return np.array([[float(n == "blue") for n in self.names] for _ in masks])


def test_vehicle_colour_is_the_product_of_the_colour_head_and_the_dense_head():
    """The colour most probable under both heads: a hesitant colour head is overruled by a sure dense head, a sure
    one is not; without the colour head's probabilities the dense head decides alone."""
    from types import SimpleNamespace

    from shusheng.data.synthdrive import DENSE_LABELS
    from shusheng.uniperceiver.pipelines.driving import DrivingChecklist

    names = _BlueHead.names
    prob = np.zeros((len(DENSE_LABELS), 4, 4), np.float32)
    prob[DENSE_LABELS.index("blue car"), 0:2, 0:2] = 0.6   # the dense head leans blue inside the box ...
    prob[DENSE_LABELS.index("red car"), 1, 1] = 0.3
    prob[DENSE_LABELS.index("green car"), 3, 3] = 0.99   # ... and is sure of green outside it (ignored)
    det = SimpleNamespace(label_name=lambda k: ["car", "person"][k - 1])
    me = SimpleNamespace(detector=det, detector_threshold=0.5, labels=DENSE_LABELS,
                         color_head=SimpleNamespace(names=names))

    def colour(head_probs):
        found = {"boxes": np.array([[0.0, 0.0, 16.0, 16.0]]), "labels": np.array([1]), "scores": np.array([0.9]),
                 "color_probs": [None if head_probs is None else np.array([head_probs.get(n, 0.0) for n in names])]}
        (box,) = DrivingChecklist._vehicle_boxes(me, found, prob, (32, 32), (1.0, 1.0))
        assert box["box"] == [0, 0, 16, 16] and box["group"] == "vehicle"
        return box["label"]

    assert colour({"red": 0.55, "blue": 0.4, "green": 0.05}) == "blue car"   # 0.22 * 0.3 < 0.4 * 0.6
    assert colour({"red": 0.9, "blue": 0.1}) == "red car"                    # 0.9 * 0.3 > 0.1 * 0.6
    assert colour({"green": 1.0}) == "green car"                             # the dense head saw no green here
    assert colour(None) == "blue car"


def test_a_detector_gives_the_vehicle_evidence_and_the_count():
    from shusheng.data import VAL_SEED, sample
    from shusheng.uniperceiver.pipelines import VQAPipeline
    from shusheng.uniperceiver.pipelines.driving import DrivingChecklist
    from shusheng.weights import BundledWeightsNotFound

    try:
        vqa = VQAPipeline.from_pretrained()
    except BundledWeightsNotFound:
        pytest.skip("bundled shusheng-mini-uniperceiver not present")
    det = _FixedDetector()
    check = DrivingChecklist(vqa, detector=det, detector_threshold=0.5)
    big = sample(VAL_SEED, 0, 128)[0].resize((256, 256))  # boxes come back in the image's own pixels
    out = check([sample(VAL_SEED, 1, 128)[0], big])
    assert det.calls == [[(3, 128, 128), (3, 128, 128)]]  # one call per batch, on the decoder's input
    for res, scale in zip(out.results, (1, 2)):
        # the car and the bus pass the threshold, the truck (0.3) does not, the person is no vehicle
        assert res["vehicle_count"]["answer"] == "2" and 0.0 <= res["vehicle_count"]["score"] <= 1.0
        ev = res["vehicle_count"]["evidence"]
        assert sorted(b["label"].split()[-1] for b in ev) == ["bus", "car"]
        # each counted box is the detector's, in the image's pixels, coloured by the dense head
        car = next(b for b in ev if b["label"].endswith(" car"))
        assert car["box"] == [10 * scale, 60 * scale, 30 * scale, 30 * scale] and car["label"] in check.questions[5].answers
        # the other questions keep the dense head's evidence: no box of the stand-in detector is among them
        det_boxes = {(10 * scale, 60 * scale), (70 * scale, 50 * scale)}
        assert all(tuple(b["box"][:2]) not in det_boxes for b in res["nearest_vehicle"]["evidence"])
    with pytest.raises(ValueError, match="bus"):
        bad = _FixedDetector()
        bad.labels = ["car", "truck", "person"]
        DrivingChecklist(vqa, detector=bad)


def test_a_colour_head_names_the_detected_vehicles_and_picks_the_nearest():
    from shusheng.data import VAL_SEED, sample
    from shusheng.uniperceiver.pipelines import VQAPipeline
    from shusheng.uniperceiver.pipelines.driving import DrivingChecklist
    from shusheng.weights import BundledWeightsNotFound

    try:
        vqa = VQAPipeline.from_pretrained()
    except BundledWeightsNotFound:
        pytest.skip("bundled shusheng-mini-uniperceiver not present")
    head = _BlueHead()
    check = DrivingChecklist(vqa, detector=_FixedDetector(masks=True), color_head=head)
    res = check([sample(VAL_SEED, 1, 128)[0]]).results[0]
    # the car (30 x 30), the bus (30 x 20) and the low-scoring truck (6 x 6) are vehicles; the person is not
    assert head.areas == [[36, 600, 900]]
    assert sorted(b["label"] for b in res["vehicle_count"]["evidence"]) == ["blue bus", "blue car"]
    # nearest: the detected vehicle lowest in the frame (the car, bottom edge 90), named by the head
    assert res["nearest_vehicle"]["answer"] == "blue car"
    assert res["nearest_vehicle"]["evidence"][0]["box"] == [10, 60, 30, 30]
    with pytest.raises(ValueError, match="detector"):
        DrivingChecklist(vqa, color_head=head)


def test_nearest_merges_one_object_and_breaks_near_ties_by_size():
    from shusheng.uniperceiver.pipelines.driving import NEAREST_TIE, _nearest

    car = {"box": [80, 110, 30, 18], "label": "red car", "score": 0.9}      # bottom 128
    same_as_bus = {"box": [81, 109, 30, 19], "label": "red bus", "score": 0.6}  # the same vehicle, another type
    assert _nearest([same_as_bus, car]) == [car]                               # one object: the better score
    small_low = {"box": [10, 100, 10, 20], "label": "green car", "score": 0.8}  # bottom 120
    big_a_bit_higher = {"box": [40, 90, 40, 29], "label": "blue bus", "score": 0.8}  # bottom 119, 1 px higher
    assert NEAREST_TIE * 20 >= 1
    assert _nearest([small_low, big_a_bit_higher]) == [big_a_bit_higher]        # a near-tie: the larger box
    far = {"box": [40, 60, 40, 29], "label": "blue bus", "score": 0.8}          # bottom 89: clearly farther
    assert _nearest([small_low, far]) == [small_low]
    assert _nearest([]) == []


def test_load_color_head_follows_the_detector_source(tmp_path):
    from shusheng.detection.colors import ColorHead
    from shusheng.uniperceiver.pipelines.driving import load_color_head
    from shusheng.weights import BundledWeightsNotFound, bundled_path

    assert load_color_head(None) is None
    assert load_color_head(tmp_path) is None  # a folder without colors.safetensors
    ColorHead(["red", "blue"]).save(tmp_path)
    assert load_color_head(tmp_path).names == ["red", "blue"]
    try:
        bundled_path("shusheng-mini-det")
    except BundledWeightsNotFound:
        assert load_color_head("auto") is None
    else:
        assert load_color_head("auto").applies_to == ("car", "truck", "bus")  # the bundled detector has one
