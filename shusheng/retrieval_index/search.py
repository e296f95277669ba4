"""Search results: :class:`SearchHit`, the folder and date filters, and turning FAISS candidates into hits with
exact cosine scores (recomputed from the stored float32 vectors: FAISS may quantise).

A kept video frame counts as an image of its own: hits are grouped per image or per (video, frame), so several
moments of one video can be listed, each with its time."""

from __future__ import annotations

import datetime as dt
import fnmatch
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from shusheng.retrieval_index.store import Box

if TYPE_CHECKING:
    from shusheng.retrieval_index.store import EntryRow

__all__ = ["DateLike", "SearchHit", "glob_matches", "parse_date", "rank_entries"]

DateLike = str | dt.date | dt.datetime


@dataclass(frozen=True)
class SearchHit:
    """One search result.

    Attributes:
        path: absolute path of the image or video file.
        score: exact cosine similarity between the query and the entry (``-1..1``).
        box: ``(x, y, w, h)`` in pixels of the upright image (or video frame) for a region hit, ``None`` for the
            whole image or frame.
        entry_id: id of the matching entry (the FAISS id).
        width, height: size of the upright image or of the video's frames.
        date: ISO date-time of the picture (EXIF DateTimeOriginal, else the file's modification time).
        video: for a video frame, the video's path (``path`` too); ``None`` for an image.
        time: for a video frame, its time in seconds from the video's first frame.
        time_end: for a video frame, the time of the last sampled frame that was collapsed into it (``time`` when
            none was): the frame stands for ``time .. time_end``.
        frame: for a video frame, its index in the video stream.
    """

    path: str
    score: float
    box: Box | None
    entry_id: int
    width: int
    height: int
    date: str
    video: str | None = None
    time: float | None = None
    time_end: float | None = None
    frame: int | None = None

    @property
    def is_video(self) -> bool:
        return self.time is not None

    @property
    def when(self) -> str:
        """A video hit's time, ``"12.0 s"``, or its span, ``"12.0-15.0 s"``; ``""`` for an image."""
        if self.time is None:
            return ""
        end = self.time_end if self.time_end is not None else self.time
        return f"{self.time:.1f}-{end:.1f} s" if end - self.time >= 0.05 else f"{self.time:.1f} s"

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly: ``{path, score, box, entry_id, width, height, date, video, time, time_end, frame}``."""
        d = asdict(self)
        d["box"] = list(self.box) if self.box is not None else None
        return d


def parse_date(value: DateLike | None, end: bool) -> str | None:
    """ISO string bound for the date filter; a bare date covers the whole day (``end`` -> 23:59:59)."""
    if value is None:
        return None
    if isinstance(value, dt.datetime):
        return value.replace(tzinfo=None).isoformat(timespec="seconds")
    if isinstance(value, dt.date):
        return f"{value.isoformat()}T{'23:59:59' if end else '00:00:00'}"
    text = str(value).strip()
    try:
        if len(text) == 10:
            return parse_date(dt.date.fromisoformat(text), end)
        return parse_date(dt.datetime.fromisoformat(text), end)
    except ValueError as e:
        raise ValueError(f"invalid date {value!r}: use YYYY-MM-DD or YYYY-MM-DDTHH:MM[:SS]") from e


def glob_matches(path: str, pattern: str) -> bool:
    """``fnmatch`` on the whole path (``*`` also crosses ``/``); a relative pattern may match at any folder."""
    if fnmatch.fnmatchcase(path, pattern):
        return True
    return not os.path.isabs(pattern) and not pattern.startswith("*") and fnmatch.fnmatchcase(path, "*/" + pattern)


def rank_entries(q: np.ndarray, ids: Sequence[int], rows: dict[int, EntryRow], k: int, threshold: float | None,
                 folder_glob: str | None, lo: str | None, hi: str | None, regions: bool,
                 group_by_image: bool) -> list[SearchHit]:
    """The best ``k`` hits among the candidate entries ``ids`` (their ``rows``, from
    :meth:`~shusheng.retrieval_index.store.MetaStore.entry_rows`), by exact cosine with the query ``q``,
    after the threshold, region, folder and date (``lo``..``hi``, ISO strings) filters; one hit per image (per
    video frame) when ``group_by_image``, else one per (path, frame, box)."""
    scored = []
    for eid in ids:
        row = rows.get(int(eid))
        if row is None:  # removed since the vector index was loaded
            continue
        score = float(np.dot(np.frombuffer(row[5], np.float32), q))  # exact cosine (FAISS may quantise)
        scored.append((score, row))
    scored.sort(key=lambda t: -t[0])
    hits: list[SearchHit] = []
    seen: set = set()
    for score, (eid, x, y, w, h, _, path, width, height, date, frame, time, time_end) in scored:
        if threshold is not None and score < threshold:
            break
        box = None if x is None else (x, y, w, h)
        if box is not None and not regions:
            continue
        if folder_glob is not None and not glob_matches(path, folder_glob):
            continue
        if (lo is not None and date < lo) or (hi is not None and date > hi):
            continue
        key = (path, frame) if group_by_image else (path, frame, box)
        if key in seen:
            continue
        seen.add(key)
        video = path if time is not None else None
        hits.append(SearchHit(path, score, box, eid, width, height, date, video, time, time_end, frame))
        if len(hits) >= k:
            break
    return hits
