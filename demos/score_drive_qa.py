"""Score drive-QA results against SynthDrive ground truth: exact match per question type and per source.

    python demos/score_drive_qa.py results.jsonl --truth /tmp/drives [--every 2] [--json s.json] [--md s.md]

``--truth`` is what SynthDrive wrote: a folder of drives (``shusheng data synthdrive --sequence``: ``<name>.mp4``
with ``<name>.jsonl``) and/or of images (``annotations.jsonl``). Every truth frame (every ``--every``-th frame of
a drive, as ``drive_qa.py --every`` reads them) times every question of the set is expected once:

* **accuracy** counts a missing or invalid answer as wrong; numeric questions (counts, speed limits) accept an
  answer within ``--tolerance`` of the truth (default 0: exact);
* **missing**: expected (frame, question) pairs without a line; **invalid**: lines that fail the schema
  (:func:`validate_record`) or answer outside the question's answers; both are counted, never a crash;
* **question-only baseline**: the best constant answer per question (the most frequent true answer of the set
  itself, so no blind answerer can beat it);
* **upper bound**: the answers the same rules give from the true per-frame facts and objects (1 for frame questions; for
  temporal ones, the loss of answering from sampled frames without tracking who is who);
* **balanced accuracy**: the mean over true answers of the share answered right (recall per class). Rare events
  ("did the light change?", yes in about one frame in five) make plain accuracy mostly a count of the common
  answer: a constant answer has balanced accuracy 1 / (number of true answers), whatever their frequencies.

The same inputs always give the same scores (everything is sorted; no randomness). Output: a markdown table on
stdout and optionally JSON (``--json``) and markdown (``--md``) files.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter, defaultdict
from pathlib import Path


def load_truth(root: Path, every: int) -> dict[tuple[str, int], dict]:
    """``{(source key, frame index): {"attributes", "facts", "time_s"}}``: drives by file stem, images by path
    relative to their split folder."""
    truth = {}
    for ann in sorted(root.rglob("annotations.jsonl")):
        for line in ann.read_text(encoding="utf-8").splitlines():
            if line.strip():
                r = json.loads(line)
                truth[(r["file"], 0)] = {"attributes": r["attributes"], "facts": {}, "time_s": None}
    for index in sorted(root.rglob("drives.json")):
        for jl in sorted(index.parent.glob("*.jsonl")):
            if jl.name == "annotations.jsonl":
                continue
            for line in jl.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    r = json.loads(line)
                    if r["frame"] % every == 0:
                        truth[(jl.stem, r["frame"])] = {"attributes": r["attributes"], "facts": r["facts"],
                                                        "time_s": r["time_s"]}
    if not truth:
        raise SystemExit(f"error: no SynthDrive ground truth (annotations.jsonl or drives.json) under {root}")
    return truth


def source_key(source: str, truth_keys: set[str]) -> str | None:
    """The truth key of a result's source: a drive's stem, or the image path relative to its split folder."""
    p = Path(source)
    if p.stem in truth_keys:
        return p.stem
    parts = p.parts
    for k in range(len(parts)):
        key = "/".join(parts[k:])
        if key in truth_keys:
            return key
    return None


def true_answer(q, rec: dict) -> str:
    from shusheng.data.synthdrive_qa import grid_answer

    spec = q.truth or {}
    fact = spec.get("fact")
    if q.is_temporal:
        return rec["facts"][fact]
    params = dict(spec.get("params") or {})
    return grid_answer(fact, spec["form"], rec["attributes"], **params)


def true_evidence(q, rec: dict) -> list:
    """The scene's objects that are evidence for question ``q``: labels (the ``entered`` rule counts them), and
    ``{"box", "label"}`` for people (it also follows where each one was)."""
    from shusheng.data.synthdrive import object_labels
    from shusheng.data.synthdrive_render import VEHICLE_TYPES

    def is_vehicle(label: str) -> bool:
        return label.split(" ")[-1] in VEHICLE_TYPES

    people = true_boxes(rec)
    labels = [lab for lab in object_labels(rec["attributes"]) if not lab.startswith("person ")]
    return [x for x in labels + people if any((x["label"] if isinstance(x, dict) else x) == e
                                                or (e == "vehicle" and isinstance(x, str) and is_vehicle(x))
                                                for e in q.evidence)]


def true_boxes(rec: dict) -> list[dict]:
    """The scene's people as labelled boxes (``{"box", "label"}``), for rules that look at where someone was."""
    return [{"box": p["box"], "label": "person on crosswalk" if p["on_crosswalk"] else "person on sidewalk"}
            for p in rec["attributes"]["pedestrians"]]


def correct(q, answer: str | None, truth: str, tolerance: float) -> bool:
    if answer is None:
        return False
    if q.numeric and tolerance > 0 and answer != "none" and truth != "none":
        try:
            return abs(float(answer) - float(truth)) <= tolerance
        except ValueError:
            return False
    return answer == truth


def score(results: Path, truth_dir: Path, questions_file: str | None = None, every: int = 1,
          tolerance: float = 0.0) -> dict:
    from shusheng.uniperceiver.pipelines.driving import TemporalWindow, load_checklist, validate_record

    questions = load_checklist(questions_file)
    truth = load_truth(truth_dir, every)
    keys = {k for k, _ in truth}
    answers: dict[tuple[str, int, str], str | None] = {}
    invalid, unmatched, duplicate, lines = 0, 0, 0, 0
    if not results.is_file():
        raise SystemExit(f"error: {results} not found")
    for line in results.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        lines += 1
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            invalid += 1
            continue
        if validate_record(rec, questions):
            invalid += 1
            continue
        key = source_key(rec["source"], keys)
        if key is None or (key, rec["frame"]["index"]) not in truth:
            unmatched += 1
            continue
        k = (key, rec["frame"]["index"], rec["question_id"])
        if k in answers:
            duplicate += 1
            continue
        answers[k] = rec["answer"]

    # temporal questions of the upper bound: the same window rules over the true per-frame answers and objects
    upper: dict[tuple[str, int, str], str] = {}
    frame_qs = [q for q in questions if not q.is_temporal]
    by_source = defaultdict(list)
    for key, idx in truth:
        by_source[key].append(idx)
    for key, frames in sorted(by_source.items()):
        if truth[(key, frames[0])]["time_s"] is None:
            continue
        win = TemporalWindow(questions)
        for idx in sorted(frames):
            rec = truth[(key, idx)]
            got = win.push(rec["time_s"], {q.id: {"answer": true_answer(q, rec), "score": 1.0,
                                                  "evidence": true_evidence(q, rec)} for q in frame_qs},
                           boxes=true_boxes(rec))
            for qid, v in got.items():
                upper[(key, idx, qid)] = v["answer"]

    per_q = defaultdict(lambda: Counter())
    per_class = defaultdict(lambda: defaultdict(Counter))  # question -> true answer -> {n, correct, baseline}
    per_source = defaultdict(lambda: Counter())
    truths = defaultdict(list)
    items = []
    for (key, idx), rec in sorted(truth.items()):
        for q in questions:
            if q.is_temporal and rec["time_s"] is None:
                continue  # temporal questions are asked of videos only
            t = true_answer(q, rec)
            truths[q.id].append(t)
            items.append((key, idx, q, t))
    baseline = {qid: Counter(ts).most_common(1)[0][0] for qid, ts in truths.items()}
    for key, idx, q, t in items:
        a = answers.get((key, idx, q.id))
        c = per_q[q.id]
        c["n"] += 1
        c["missing"] += (key, idx, q.id) not in answers
        c["correct"] += correct(q, a, t, tolerance)
        c["baseline"] += correct(q, baseline[q.id], t, tolerance)
        c["upper"] += correct(q, upper.get((key, idx, q.id), t) if q.is_temporal else t, t, tolerance)
        k = per_class[q.id][t]
        k["n"] += 1
        k["correct"] += correct(q, a, t, tolerance)
        k["baseline"] += correct(q, baseline[q.id], t, tolerance)
        per_source[key]["n"] += 1
        per_source[key]["correct"] += correct(q, a, t, tolerance)
    rows = []
    for q in questions:
        c = per_q.get(q.id)
        if not c:
            continue
        classes = per_class[q.id].values()
        rows.append({"question": q.id, "accuracy": c["correct"] / c["n"], "question_only": c["baseline"] / c["n"],
                     "upper_bound": c["upper"] / c["n"], "n": c["n"], "missing": c["missing"],
                     "baseline_answer": baseline[q.id],
                     "balanced_accuracy": sum(k["correct"] / k["n"] for k in classes) / len(classes),
                     "balanced_question_only": sum(k["baseline"] / k["n"] for k in classes) / len(classes),
                     "true_answers": len(classes)})
    n_all = sum(c["n"] for c in per_q.values())
    return {"rows": rows,
            "overall": {"accuracy": sum(c["correct"] for c in per_q.values()) / max(1, n_all),
                        "question_only": sum(c["baseline"] for c in per_q.values()) / max(1, n_all),
                        "upper_bound": sum(c["upper"] for c in per_q.values()) / max(1, n_all), "n": n_all,
                        "missing": sum(c["missing"] for c in per_q.values())},
            "per_source": {k: {"accuracy": c["correct"] / c["n"], "n": c["n"]} for k, c in sorted(per_source.items())},
            "lines": lines, "invalid_lines": invalid, "unmatched_lines": unmatched, "duplicate_lines": duplicate,
            "valid_share": (lines - invalid) / lines if lines else 0.0,
            "settings": {"every": every, "tolerance": tolerance, "truth": str(truth_dir)}}


def markdown(s: dict) -> str:
    out = ["| question | accuracy | question-only | upper bound | balanced accuracy | balanced question-only | n "
           "| missing |", "|---|---|---|---|---|---|---|---|"]
    for r in s["rows"] + [{"question": "**overall**", **s["overall"]}]:
        bal = (f"{r['balanced_accuracy']:.3f} | {r['balanced_question_only']:.3f}" if "balanced_accuracy" in r
               else " | ")
        out.append(f"| {r['question']} | {r['accuracy']:.3f} | {r['question_only']:.3f} | {r['upper_bound']:.3f} "
                   f"| {bal} | {r['n']} | {r['missing']} |")
    out.append("")
    out.append(f"{s['lines']} lines: {s['invalid_lines']} invalid, {s['unmatched_lines']} without ground truth, "
               f"{s['duplicate_lines']} duplicates; valid share {s['valid_share']:.3f}")
    out.append("")
    out.append("| source | accuracy | n |")
    out.append("|---|---|---|")
    for k, v in s["per_source"].items():
        out.append(f"| {k} | {v['accuracy']:.3f} | {v['n']} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", help="drive_qa.py output (JSON lines)")
    ap.add_argument("--truth", required=True, help="SynthDrive folder(s) the sources were rendered into")
    ap.add_argument("--questions", default=None, help="question set (default: the driving checklist)")
    ap.add_argument("--every", type=int, default=1, help="the --every of drive_qa.py (frames expected)")
    ap.add_argument("--tolerance", type=float, default=0.0, help="numeric answers within this count as right")
    ap.add_argument("--json", default=None, help="write the scores as JSON")
    ap.add_argument("--md", default=None, help="write the tables as markdown")
    args = ap.parse_args(argv)
    if args.every < 1:
        ap.error("--every must be >= 1")
    truth_dir = Path(args.truth)
    if not truth_dir.is_dir():
        ap.error(f"--truth {truth_dir} is not a folder")
    s = score(Path(args.results), truth_dir, args.questions, args.every, args.tolerance)
    md = markdown(s)
    print(md)
    if args.json:
        Path(args.json).write_text(json.dumps(s, indent=2, sort_keys=True) + "\n")
    if args.md:
        Path(args.md).write_text(md + "\n")
    return 0 if s["lines"] else 1


if __name__ == "__main__":
    sys.exit(main())
