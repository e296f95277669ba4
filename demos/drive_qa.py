"""Driving-scene QA over images, folders and dash-cam videos: one JSON line per (frame, question).

    shusheng data synthdrive --sequence --n 2 --frames 48 --fps 8 --split val --out /tmp/drives
    python demos/drive_qa.py /tmp/drives --out /tmp/results.jsonl --every 2
    python demos/drive_qa.py /tmp/drives --out /tmp/results.jsonl --every 2 --resume   # skips what is done
    python demos/score_drive_qa.py /tmp/results.jsonl --truth /tmp/drives

SOURCE is an image, a video (.mp4, .mov, ...) or a folder of them (searched recursively, in sorted order). Every
frame (every ``--every``-th of a video) is asked the question set (default: the driving checklist, see
``demos/questions/driving.json``); temporal questions ("did the light change in the last second?") are answered
from the frames of a video only. Each line:

    {"source", "frame": {"index", "time_s"}, "question_id", "question", "answer", "score",
     "evidence": [{"box": [x, y, w, h], "label", "score"}], "in_domain", "domain_score"}

A frame that cannot be read gets one line per question with ``"answer": null`` and its ``"error"``. Lines are
flushed one by one, so a crash loses at most the line being written; ``--resume`` reads the file back (dropping a
torn last line), restores each video's window of recent answers and goes on where it stopped. ``--workers 2``
answers chunks of frames in two processes side by side (each with half the threads and its own models): on a
2-core machine more frames per second than one process, with the same lines.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

from shusheng.data import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS


def expand_sources(sources: list[str]) -> list[Path]:
    """Images and videos named or found under the given folders, in a stable order."""
    out = []
    for s in sources:
        p = Path(s)
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in (*IMAGE_EXTENSIONS,
                                                                                             *VIDEO_EXTENSIONS))
        elif p.is_file():
            out.append(p)
        else:
            raise SystemExit(f"error: {s} does not exist")
    if not out:
        raise SystemExit(f"error: no images or videos found in {', '.join(sources)}")
    return out


def read_done(path: Path) -> list[dict]:
    """The complete lines of an earlier run; a torn last line is cut off the file."""
    if not path.is_file():
        return []
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with open(path, "r+b") as f:
            f.truncate(end)
    return [json.loads(line) for line in data[:end].decode("utf-8").splitlines() if line.strip()]


def _none_if_nan(x):
    return None if isinstance(x, float) and math.isnan(x) else x


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sources", nargs="+", metavar="SOURCE", help="images, videos or folders")
    ap.add_argument("--out", required=True, help="JSON-lines output file")
    ap.add_argument("--questions", default=None, help="question set (JSON); default: the driving checklist")
    ap.add_argument("--answerer", default="uniperceiver", choices=["uniperceiver"],
                    help="who answers (the LLM bridge joins when it lands)")
    ap.add_argument("--model", default=None, help="decoder folder (default: the bundled shusheng-mini-uniperceiver)")
    ap.add_argument("--detector", default="none",
                    help="detector folder that counts vehicles (vehicle_count); 'auto': the bundled "
                         "shusheng-mini-det; 'none' (default): the decoder answers (faster: 68 against 17-20 "
                         "frames/s on 2 threads with --workers 2; counts 0.46 against 0.76 on bench/drive_qa.py)")
    ap.add_argument("--detector-proposals", type=int, default=None,
                    help="a Mask R-CNN detector's RPN proposals per frame (default: the checklist's, "
                         "CHECKLIST_PROPOSALS)")
    ap.add_argument("--every", type=int, default=1, help="use every K-th frame of a video")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--resume", action="store_true", help="continue an earlier run writing to --out")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads in all (default: torch's)")
    ap.add_argument("--workers", type=int, default=1,
                    help="processes answering chunks of frames side by side, each with threads // workers threads "
                         "and its own copy of the models (2 on a 2-core machine: more frames per second)")
    args = ap.parse_args(argv)
    if args.every < 1:
        ap.error("--every must be >= 1")
    if args.workers < 1:
        ap.error("--workers must be >= 1")
    if args.detector_proposals is not None and args.detector_proposals < 1:
        ap.error("--detector-proposals must be >= 1")
    out_path = Path(args.out)
    if out_path.exists() and out_path.stat().st_size and not args.resume:
        ap.error(f"{out_path} exists: pass --resume to continue it, or choose another --out")
    sources = expand_sources(args.sources)

    import torch
    from tqdm.auto import tqdm

    from shusheng.data import iter_video_frames
    from shusheng.uniperceiver.pipelines.driving import TemporalWindow, load_checklist

    threads = args.threads or torch.get_num_threads()
    questions = load_checklist(args.questions)
    settings = dict(model=args.model, questions=args.questions,
                    detector=None if args.detector == "none" else args.detector,
                    detector_proposals=args.detector_proposals)
    runner = ChecklistRunner(settings, args.workers, threads)
    chunk = -(-args.batch_size // args.workers)  # frames per call: one batch split between the workers
    done_lines = read_done(out_path) if args.resume else []
    done = {(r["source"], r["frame"]["index"], r["question_id"]) for r in done_lines}
    n_questions = len(questions)
    frame_ids = {q.id for q in questions if not q.is_temporal}

    out_path.parent.mkdir(parents=True, exist_ok=True)
    bar = tqdm(desc="frames", unit="frame")
    written = 0
    with open(out_path, "a", encoding="utf-8") as out:

        def emit(source: str, frame: dict, result: dict | None, in_domain, score, error: str | None) -> None:
            nonlocal written
            for q in questions:
                if (source, frame["index"], q.id) in done:
                    continue
                r = (result or {}).get(q.id)
                if result is not None and r is None:
                    continue  # a temporal question without a video: not asked
                rec = {"source": source, "frame": frame, "question_id": q.id, "question": q.question,
                       "answer": r["answer"] if r else None, "score": round(r["score"], 4) if r else None,
                       "evidence": r["evidence"] if r else [], "in_domain": in_domain,
                       "domain_score": _none_if_nan(score)}
                if error is not None:
                    rec["error"] = error
                out.write(json.dumps(rec) + "\n")
                out.flush()
                written += 1

        def finish(job, res) -> None:
            """Write a finished chunk: a video's frames go through its window first, in order."""
            name, window, frames = job
            if window is not None:
                window.push_output(res, [t for _, t in frames])
            for j, (idx, t) in enumerate(frames):
                emit(name, {"index": idx, "time_s": None if t is None else round(t, 4)}, res.results[j],
                     res.in_domain[j], res.domain_score[j], res.errors[j])
            bar.update(len(frames))

        def submit(job, images: list) -> None:
            """Queue a chunk; write whatever has finished, in order."""
            for done_job, res in runner.submit(job, images):
                finish(done_job, res)

        t_start = time.perf_counter()
        for src in sources:
            name = str(src)
            if src.suffix.lower() in VIDEO_EXTENSIONS:
                window = TemporalWindow(questions)
                # restore the window from the lines already written for this video
                prev = {}
                for r in done_lines:
                    if r["source"] == name and r.get("answer") is not None:
                        prev.setdefault((r["frame"]["index"], r["frame"]["time_s"]), {})[r["question_id"]] = {
                            "answer": r["answer"], "score": r["score"] or 0.0, "evidence": r["evidence"]}
                last_done = -1
                for (idx, t), answers in sorted(prev.items()):
                    if all((name, idx, q.id) in done for q in questions):  # only the last frame can be partial
                        # the temporal answers' evidence holds the boxes their rules look back at
                        boxes = [b for k, v in answers.items() if k not in frame_ids for b in v["evidence"]]
                        window.push(t, {k: v for k, v in answers.items() if k in frame_ids}, boxes=boxes)
                        last_done = idx
                try:
                    batch = []
                    for idx, t, img in iter_video_frames(src, every=args.every):
                        if idx <= last_done:
                            continue
                        batch.append((idx, t, img))
                        if len(batch) == chunk:
                            submit((name, window, [(i, t) for i, t, _ in batch]), [img for _, _, img in batch])
                            batch = []
                    if batch:
                        submit((name, window, [(i, t) for i, t, _ in batch]), [img for _, _, img in batch])
                except (ValueError, OSError) as e:  # an unreadable video: one error line set, then go on
                    for job, res in runner.drain():  # what was read of it before
                        finish(job, res)
                    emit(name, {"index": 0, "time_s": None}, None, None, float("nan"), str(e))
            else:
                if all((name, 0, q.id) in done for q in questions if not q.is_temporal):
                    continue
                submit((name, None, [(0, None)]), [src])
        for job, res in runner.drain():
            finish(job, res)
        seconds = time.perf_counter() - t_start
        os.fsync(out.fileno())
    runner.close()
    bar.close()
    print(f"{written} lines written to {out_path} ({len(sources)} sources, {n_questions} questions; "
          f"{bar.n} frames answered in {seconds:.1f} s after loading the models: "
          f"{bar.n / max(seconds, 1e-9):.1f} frames/s)", file=sys.stderr)
    return 0


class ChecklistRunner:
    """Runs the checklist's frame questions on chunks of frames, in this process (``workers=1``) or in worker
    processes that each load the models once and use ``threads // workers`` torch threads; finished chunks come
    back in the order they were submitted (the temporal questions are answered afterwards, in order, by the
    caller's window). On a 2-core machine two 1-thread workers answer more frames per second than one 2-thread
    process: much of a frame's work (RoIAlign, NMS, small layers) does not use the second thread well.
    The models are loaded before :meth:`submit` returns its first result, so timing that excludes loading can
    start once the runner exists."""

    def __init__(self, settings: dict, workers: int = 1, threads: int = 1):
        self.workers, self.pending = max(1, workers), []
        per_worker = max(1, threads // self.workers)
        if self.workers == 1:
            import torch

            torch.set_num_threads(per_worker)
            self.checklist, self.pool = _make_checklist(settings), None
            return
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        self.pool = ProcessPoolExecutor(self.workers, mp_context=mp.get_context("spawn"),
                                        initializer=_worker_init, initargs=(settings, per_worker))
        # every worker loads its models now, not inside a timed run: ask until each one has answered
        seen: set[int] = set()
        while len(seen) < self.workers:
            seen.update(f.result() for f in [self.pool.submit(_worker_ready) for _ in range(self.workers)])

    def submit(self, job, images: list):
        """Queue ``images`` (with ``job``, handed back with the result); yields the ``(job, output)`` pairs that
        are finished and next in order (none while at most ``2 * workers`` chunks are queued)."""
        if self.pool is None:
            yield job, self.checklist(images)
            return
        self.pending.append((job, self.pool.submit(_worker_run, images)))
        while len(self.pending) > 2 * self.workers:  # a queue that keeps every worker busy
            j, f = self.pending.pop(0)
            yield j, f.result()

    def drain(self):
        """Every queued chunk, in order."""
        while self.pending:
            j, f = self.pending.pop(0)
            yield j, f.result()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()


def _make_checklist(settings: dict):
    from shusheng.uniperceiver.pipelines.driving import DrivingChecklist

    kwargs = {} if settings["detector_proposals"] is None else {"detector_proposals": settings["detector_proposals"]}
    return DrivingChecklist.from_pretrained(settings["model"], settings["questions"], detector=settings["detector"],
                                            **kwargs)


_WORKER_CHECKLIST = None


def _worker_init(settings: dict, threads: int) -> None:
    global _WORKER_CHECKLIST
    import torch

    torch.set_num_threads(threads)
    _WORKER_CHECKLIST = _make_checklist(settings)


def _worker_ready() -> int:
    time.sleep(0.2)  # long enough that one worker cannot take every readiness call
    return os.getpid()


def _worker_run(images: list):
    return _WORKER_CHECKLIST(images)


if __name__ == "__main__":
    raise SystemExit(main())
