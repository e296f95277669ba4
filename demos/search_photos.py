"""Search a folder of images by text with the bundled shusheng-mini-clip.

    shusheng data synthdrive --split val --n 8 --out /tmp/scenes --no-masks --quiet   # 8 scenes to try it on
    python demos/search_photos.py /tmp/scenes "a street in thick fog at night" --k 3

The first run indexes FOLDER (recursively) into FOLDER/.shusheng-index, or into --index DIR; later runs embed
only new or changed files, so they start searching at once. It prints the index update, then one line per hit,
best first, with its cosine score (a region hit also shows its box [x, y, w, h]):

    index /tmp/scenes/.shusheng-index: 8 added, 0 updated, 0 unchanged, 0 removed (8 images + 0 regions ...)
    1. 0.1987  /tmp/scenes/images/000002.png
    2. 0.0605  /tmp/scenes/images/000000.png
    3. 0.0330  /tmp/scenes/images/000005.png

The same index works with `shusheng search "..." --index FOLDER`. The bundled model was trained on SynthDrive's
driving scenes only; on other photos its ranking is a rough guess.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from shusheng.data import IMAGE_EXTENSIONS


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="folder of images (searched recursively)")
    parser.add_argument("query", help='what to look for, e.g. "a red car at night"')
    parser.add_argument("--k", type=int, default=5, help="number of hits to print (5)")
    parser.add_argument("--index", type=Path, default=None, help="index folder (default FOLDER/.shusheng-index)")
    args = parser.parse_args()

    if not args.folder.is_dir():
        parser.error(f"folder {str(args.folder)!r} does not exist or is not a folder")
    if not any(p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
               and not any(part.startswith(".") for part in p.relative_to(args.folder).parts)
               for p in args.folder.rglob("*")):  # what the index looks at: hidden files and folders are skipped
        parser.error(f"no images found in {str(args.folder)!r} (looked for {', '.join(IMAGE_EXTENSIONS)})")
    if not args.query.strip():
        parser.error("the query is empty")
    if args.k < 1:
        parser.error(f"--k must be at least 1, got {args.k}")

    from shusheng.retrieval_index import Index, RetrievalIndexError, index_folder

    try:
        report = index_folder(args.folder, args.index, progress=False)  # incremental: reuses what is indexed
        print(f"index {report.index_path}: {report.summary()}")
        with Index.open(report.index_path) as index:
            hits = index.search(text=args.query, k=args.k)
    except (RetrievalIndexError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if not hits:
        print("no results")
    for rank, hit in enumerate(hits, 1):
        box = f"  box={list(hit.box)}" if hit.box is not None else ""
        print(f"{rank}. {hit.score:.4f}  {hit.path}{box}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
