"""Duplicate files of an index: exact (same content hash) and near (whole-image cosine >= a threshold)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from shusheng.retrieval_index import vectors as _vectors

if TYPE_CHECKING:
    from shusheng.retrieval_index.store import MetaStore
    from shusheng.retrieval_index.vectors import VectorIndex

__all__ = ["DuplicateGroup", "find_duplicates"]


@dataclass(frozen=True)
class DuplicateGroup:
    """Files that are the same picture: ``kind="exact"`` (identical bytes) or ``"near"`` (cosine >= threshold).

    ``score`` is the lowest similarity linking the group (1.0 for exact duplicates).
    """

    kind: str
    paths: list[str]
    score: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def find_duplicates(store: MetaStore, vectors: VectorIndex, near: float | None = None,
                    neighbours: int = 10) -> list[DuplicateGroup]:
    """Groups of duplicate files (see :meth:`shusheng.retrieval_index.Index.duplicates`).

    Near duplicates are linked transitively among each image's ``neighbours`` nearest neighbours: exactly
    (a flat index over one whole-image vector per distinct content) below ``FLAT_MAX_ENTRIES`` contents, through
    the index's own (approximate) FAISS index above.

    Returns:
        Exact groups first, then near groups; paths sorted within each group.
    """
    groups = []
    by_hash = store.paths_by_hash()
    for paths in by_hash.values():
        if len(paths) > 1:
            groups.append(DuplicateGroup("exact", paths, 1.0))
    if near is None:
        return sorted(groups, key=lambda g: g.paths)
    rows = store.image_entry_per_hash()  # one whole-image entry per distinct hash
    rep_ids = np.asarray([r[0] for r in rows], np.int64)
    hash_of = {int(r[0]): r[1] for r in rows}
    if len(rep_ids) < 2:
        return sorted(groups, key=lambda g: g.paths)
    vec_of = store.vectors_of(rep_ids)
    vecs = np.stack([vec_of[int(i)] for i in rep_ids])
    kk = min(len(rep_ids), neighbours + 1)
    if len(rep_ids) < _vectors.FLAT_MAX_ENTRIES:
        flat = _vectors.faiss_module().IndexFlatIP(store.dim)
        flat.add(vecs)
        sims, nbrs = flat.search(vecs, kk)
        nbrs = rep_ids[np.maximum(nbrs, 0)]
    else:  # the main (approximate) index; region entries and duplicates of a hash are filtered below
        sims, nbrs = vectors.searchable().search(vecs, kk * 2)
    parent = {int(i): int(i) for i in rep_ids}

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    min_link: dict[tuple[int, int], float] = {}
    for i, eid in enumerate(rep_ids):
        for s, j in zip(sims[i], nbrs[i]):
            j = int(j)
            if j == eid or j not in parent or s < near:
                continue
            a, b = find(int(eid)), find(j)
            if a != b:
                parent[b] = a
            min_link[(int(eid), j)] = float(s)
    members: dict[int, list[int]] = {}
    for eid in rep_ids:
        members.setdefault(find(int(eid)), []).append(int(eid))
    for eids in members.values():
        if len(eids) < 2:
            continue
        eset = set(eids)
        score = min((s for (a, b), s in min_link.items() if a in eset and b in eset), default=near)
        paths = sorted(p for e in eids for p in by_hash[hash_of[e]])
        groups.append(DuplicateGroup("near", paths, score))
    return sorted([g for g in groups if g.kind == "exact"], key=lambda g: g.paths) + sorted(
        [g for g in groups if g.kind == "near"], key=lambda g: g.paths)
