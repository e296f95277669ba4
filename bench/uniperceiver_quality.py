"""Quality of a unified-decoder model on the fixed SynthDrive test set (seed 2023, 1000 images, 128 px).

    python bench/uniperceiver_quality.py [--model DIR] [--data-dir DIR] [--n 1000] [--out bench/results]

Measures, with the model's own pipelines and encoders:

* VQA accuracy by answer matching, overall and per question type, on the test questions (wordings from the
  SynthDrive template pool) and on **held-out wordings** written here, none of which is in that pool (checked
  below by enumerating the pool);
* VQA accuracy by open generation (exact match of the generated answer), overall;
* captioning (beam search): CIDEr-D and BLEU-4 against the 5 reference captions of each image;
* zero-shot attribute classification (time, weather, traffic light, sign) by matching class-name texts;
* image-text retrieval with the same encoder: image->text R@1/R@5 (any of the image's 5 captions) and
  text->image R@1/R@5 (5000 caption queries);
* the **question grid** (:mod:`shusheng.data.synthdrive_qa`): every fact asked in every form that fits it, scored
  per ``fact x form`` cell on three splits: seen cells with training wordings, seen cells with held-out wordings,
  and held-out cells (never trained); **form consistency** (the share of answers whose form fits the question:
  yes/no, one of the named options, a number, a value of the fact); and the **blind baseline** (the most frequent
  training answer of the same question, image unseen) per form. Matching uses every answer of the model; open
  generation is scored on the first ``--grid-gen-images`` images. Written to ``uniperceiver_vqa_grid.json`` /
  ``.md`` as well.

Prints a markdown table and writes ``uniperceiver_quality.json`` / ``.md``. Default model: the bundled
``shusheng-mini-uniperceiver``.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine_info, reexec_with_bench_env, write_results  # noqa: E402

# Hand-written wordings, absent from the SynthDrive template pool; {vtype} is a plural vehicle noun, {color} a
# colour. Each question of the test set is re-asked with one of these (chosen by image and question index).
HELD_OUT: dict[str, list[str]] = {
    "light": ["Which colour does the signal at the junction display?", "What is the traffic light lit as?",
              "Tell me the signal's current colour, please.", "Is the stop light showing red, amber or green now?"],
    "sign": ["What does the roadside signboard show?", "Which traffic sign is posted here?",
             "Can you read the road sign for me?", "What kind of signage stands next to the street?"],
    "vehicle_count": ["How many vehicles are on the road in total?", "What's the total number of vehicles you notice?",
                      "Tell me how many vehicles there are."],
    "vehicle_count_typed": ["How many {vtype} can be seen?", "What's the number of {vtype} here?",
                            "Count how many {vtype} are visible."],
    "vehicle_colors": ["Which paint colours can you see on the vehicles?", "What colours are the vehicles painted?",
                       "Name every colour of vehicle present."],
    "has_color": ["Do any of the vehicles have {color} paint?", "Is a {color} vehicle anywhere to be seen?",
                  "Any {color} vehicles around?"],
    "pedestrians": ["Are any people walking here?", "Is there a person on foot anywhere?",
                    "Do you notice anyone walking?"],
    "pedestrian_location": ["Are the walkers on the zebra crossing or on the pavement?",
                            "In what part of the street are people walking?",
                            "Where exactly are the pedestrians located?"],
    "weather": ["What are the weather conditions like today?", "Is the weather rainy, foggy or sunny?",
                "How would you describe the weather?"],
    "time": ["Is this scene during daytime, dusk or at night?", "What time is it, roughly?",
             "Was this picture taken in the day or at night?"],
    "stop": ["Do I need to brake and stop here?", "Does our vehicle have to halt now?",
             "Is it necessary to stop the car?"],
}
_PLURAL = {"car": "cars", "truck": "trucks", "bus": "buses"}


def _norm(s: str) -> str:
    return " ".join(re.findall(r"[a-z0-9']+", s.lower()))


def template_pool_cores() -> set[str]:
    """Every core wording of the SynthDrive question pool (templates x slot fillers), normalised."""
    import itertools

    from shusheng.data import synthdrive_text as st
    from shusheng.data.synthdrive_render import COLORS

    cores = set()
    slots = dict(st._SLOTS)
    slots["vehicles"] = tuple(slots["vehicles"]) + tuple(w for ws in st._TYPE_PLURAL.values() for w in ws)
    slots["color"] = tuple(COLORS)
    for templates in st._TEMPLATES.values():
        for t in templates:
            names = [n for n in slots if "{" + n + "}" in t]
            for combo in itertools.product(*(slots[n] for n in names)):
                cores.add(_norm(t.format(**dict(zip(names, combo)))))
    return cores


def held_out_question(qa: dict, image_index: int, k: int) -> str:
    t, params = qa["type"], qa.get("params") or {}
    key = "vehicle_count_typed" if t == "vehicle_count" and params.get("vehicle_type") else t
    options = HELD_OUT[key]
    q = options[(image_index + k) % len(options)]
    return q.format(vtype=_PLURAL.get(params.get("vehicle_type", ""), "vehicles"), color=params.get("color", ""))


GRID_COLUMNS = [("cell", "fact / form"), ("seen", "seen cells"), ("heldout_wording", "held-out wordings"),
                ("heldout_cell", "held-out cell"), ("blind", "blind baseline"), ("form", "form consistency"),
                ("n", "questions")]
GRID_SUMMARY_COLUMNS = [("metric", "metric"), ("seen", "seen cells"), ("heldout_wording", "held-out wordings"),
                        ("heldout_cell", "held-out cells"), ("blind", "blind baseline")]


def grid_section(model, tokens, recs, answers, ans_feats, vocab, args) -> tuple[list[dict], list[dict]]:
    """Answer every grid question of the test images; per-cell rows and summary rows (overall, per form)."""
    import numpy as np
    import torch

    from shusheng.data import synthdrive as sd
    from shusheng.data import synthdrive_qa as g
    from shusheng.uniperceiver.decoding import generate

    train_attrs = [sd.sample(sd.TRAIN_SEED, i, sd.TEST_IMAGE_SIZE)[1].attributes for i in range(args.prior_train)]
    prior = g.QuestionPrior(train_attrs)
    items = [(i, q) for i, r in enumerate(recs) for q in g.grid_eval_questions(r["attributes"], i)]
    preds: list[str] = []
    bs = 4 * args.batch_size
    for s in range(0, len(items), bs):
        chunk = items[s:s + bs]
        idx = torch.tensor([i for i, _ in chunk])
        p = model.vqa_match(None, [q["question"] for _, q in chunk], answers, image_tokens=tokens[idx],
                            answer_features=ans_feats, match_form=not args.no_match_form)
        preds += [answers[j] for j in p.argmax(-1).tolist()]
    gen_hits: dict[str, list[bool]] = defaultdict(list)
    gen_form: list[bool] = []
    gen_items = [(i, q) for i, q in items if i < args.grid_gen_images]
    cfg = model.config
    for s in range(0, len(gen_items), bs):
        chunk = gen_items[s:s + bs]
        idx = torch.tensor([i for i, _ in chunk])
        pre = model.prefix(tokens[idx], model.tokenizer.encode([q["question"] for _, q in chunk],
                                                               cfg.max_text_len // 2), spe_after_text=True)
        out = generate(model, pre, 12, 1, "vqa", vocab_feats=vocab)
        for t, (_, q) in zip(out.tokens, chunk):
            a = model.tokenizer.decode(t)
            gen_hits[q["split"]].append(a == q["answer"])
            gen_form.append(g.answer_matches_form(q["type"], q["form"], q["params"], a))

    acc: dict[tuple, list[bool]] = defaultdict(list)  # (cell, split) -> hits
    blind: dict[tuple, list[bool]] = defaultdict(list)
    form_ok: dict[str, list[bool]] = defaultdict(list)  # cell -> form consistency (every split)
    for (_, q), a in zip(items, preds):
        cell = f'{q["type"]} / {q["form"]}'
        acc[(cell, q["split"])].append(a == q["answer"])
        blind[(cell, q["split"])].append(prior(q) == q["answer"])
        form_ok[cell].append(g.answer_matches_form(q["type"], q["form"], q["params"], a))
    rows = []
    for c in g.CELLS:
        cell = f"{c.fact} / {c.form}"
        row = {"cell": cell + (" (held out)" if c in g.HELDOUT_CELLS else "")}
        for split in g.EVAL_SPLITS:
            if acc.get((cell, split)):
                row[split] = float(np.mean(acc[(cell, split)]))
        splits = ("heldout_cell",) if c in g.HELDOUT_CELLS else ("seen", "heldout_wording")
        row["blind"] = float(np.mean([b for sp in splits for b in blind[(cell, sp)]]))
        row["form"] = float(np.mean(form_ok[cell]))
        row["n"] = sum(len(acc[(cell, sp)]) for sp in g.EVAL_SPLITS)
        rows.append(row)

    def mean(split, form=None, table=acc):
        v = [h for (cell, sp), hs in table.items() if sp == split and (form is None or cell.endswith(f"/ {form}"))
             for h in hs]
        return float(np.mean(v)) if v else ""

    summary = [{"metric": "grid VQA accuracy (answer matching)", **{sp: mean(sp) for sp in g.EVAL_SPLITS},
                "blind": mean("seen", table=blind)}]
    for form in g.FORMS:
        summary.append({"metric": f"grid VQA accuracy: {form} questions", **{sp: mean(sp, form) for sp in g.EVAL_SPLITS},
                        "blind": mean("seen", form, table=blind)})
    held_blind = mean("heldout_cell", table=blind)
    summary.append({"metric": "grid blind baseline on held-out cells", "heldout_cell": held_blind})
    summary.append({"metric": "grid form consistency (answer matching, all splits)",
                    "seen": float(np.mean([x for v in form_ok.values() for x in v]))})
    summary.append({"metric": f"grid VQA accuracy (open generation, {args.grid_gen_images} images)",
                    **{sp: float(np.mean(gen_hits[sp])) for sp in g.EVAL_SPLITS if gen_hits[sp]}})
    summary.append({"metric": "grid form consistency (open generation)", "seen": float(np.mean(gen_form))})
    return rows, summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model folder (default: bundled shusheng-mini-uniperceiver)")
    parser.add_argument("--data-dir", default=None, help="a written copy of the test split (default: render it)")
    parser.add_argument("--n", type=int, default=1000, help="test images (the fixed set has 1000)")
    parser.add_argument("--gen-images", type=int, default=300, help="images for the open-generation VQA score")
    parser.add_argument("--beams", type=int, default=1, help="caption beam width (1 = greedy)")
    parser.add_argument("--max-tokens", type=int, default=64, help="longest generated caption in tokens")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--prior-train", type=int, default=3000,
                        help="SynthDrive train scenes (seed 0) the blind baseline counts answers on")
    parser.add_argument("--grid-gen-images", type=int, default=100,
                        help="images whose grid questions are also answered by open generation")
    parser.add_argument("--no-grid", action="store_true", help="skip the question grid")
    parser.add_argument("--no-match-form", action="store_true",
                        help="grid matching over every answer even when the model has an answer-type head")
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args(argv)
    reexec_with_bench_env()

    import json

    import numpy as np
    import torch

    from shusheng.data import load_image
    from shusheng.data import synthdrive as sd
    from shusheng.data.synthdrive_queries import ATTRIBUTE_CLASSES
    from shusheng.modeling import resolve_transform
    from shusheng.uniperceiver.decoding import generate
    from shusheng.uniperceiver.metrics import bleu4, cider_d
    from shusheng.uniperceiver.pipelines import CaptionPipeline

    torch.set_num_threads(2)
    t0 = time.time()
    pool = template_pool_cores()
    leaked = [q for qs in HELD_OUT.values() for q in qs if _norm(q.format(vtype="cars", color="red")) in pool]
    if leaked:
        raise SystemExit(f"held-out wordings found in the template pool: {leaked}")

    pipe = CaptionPipeline.from_pretrained(args.model)
    model = pipe.model
    cfg = model.config

    # 1. the fixed test set
    if args.data_dir:
        recs = [json.loads(x) for x in Path(args.data_dir, "annotations.jsonl").read_text().splitlines()][:args.n]
        pils = [load_image(Path(args.data_dir) / r["file"]) for r in recs]
    else:
        ds = sd.synthdrive_split("test", n=args.n)
        recs, pils = [], []
        for i in range(len(ds)):
            img, ann = sd.sample(ds.split_seed, i, sd.TEST_IMAGE_SIZE)
            pils.append(img)
            recs.append({"attributes": ann.attributes, "captions": ann.captions, "qa": ann.qa})
    n = len(recs)
    transform = resolve_transform(model)  # the preprocessing stored with the weights
    x = torch.stack([transform(p) for p in pils])
    bs = args.batch_size
    rows, meta = [], {**machine_info(), "n_images": n, "model": str(args.model or "bundled")}

    with torch.inference_mode():
        tokens = torch.cat([model.image_tokens(x[i:i + bs]) for i in range(0, n, bs)])  # (n, N, D)
        answers = list(cfg.answers)
        ans_feats = model.text_features(answers)
        vocab = model.vocab_features()

        # 2. VQA by matching: template wordings and held-out wordings
        def vqa_acc(question_of) -> tuple[float, dict[str, float]]:
            hits: dict[str, list[bool]] = defaultdict(list)
            items = [(i, k, qa) for i, r in enumerate(recs) for k, qa in enumerate(r["qa"])]
            for s in range(0, len(items), 4 * bs):
                chunk = items[s:s + 4 * bs]
                idx = torch.tensor([i for i, _, _ in chunk])
                p = model.vqa_match(None, [question_of(qa, i, k) for i, k, qa in chunk], answers,
                                    image_tokens=tokens[idx], answer_features=ans_feats,
                                    match_form=not args.no_match_form)
                for (_, _, qa), j in zip(chunk, p.argmax(-1).tolist()):
                    hits[qa["type"]].append(answers[j] == qa["answer"])
            per = {t: float(np.mean(h)) for t, h in sorted(hits.items())}
            return float(np.mean([v for h in hits.values() for v in h])), per

        acc, per = vqa_acc(lambda qa, i, k: qa["question"])
        acc_h, per_h = vqa_acc(held_out_question)
        for t in per:
            rows.append({"metric": f"VQA accuracy: {t}", "template wordings": per[t], "held-out wordings": per_h[t]})
        rows.append({"metric": "VQA accuracy (overall, answer matching)", "template wordings": acc,
                     "held-out wordings": acc_h})

        # 3. VQA by open generation (exact match), on the first --gen-images images
        m = min(n, args.gen_images)
        items = [(i, k, qa) for i, r in enumerate(recs[:m]) for k, qa in enumerate(r["qa"])]
        gen_hits, gen_hits_h = [], []
        for s in range(0, len(items), 4 * bs):
            chunk = items[s:s + 4 * bs]
            idx = torch.tensor([i for i, _, _ in chunk])
            for which, hits in (("template", gen_hits), ("held-out", gen_hits_h)):
                qs = [qa["question"] if which == "template" else held_out_question(qa, i, k) for i, k, qa in chunk]
                pre = model.prefix(tokens[idx], model.tokenizer.encode(qs, cfg.max_text_len // 2), spe_after_text=True)
                g = generate(model, pre, 12, 1, "vqa", vocab_feats=vocab)
                hits += [model.tokenizer.decode(t) == qa["answer"] for t, (_, _, qa) in zip(g.tokens, chunk)]
        rows.append({"metric": f"VQA accuracy (overall, open generation, {m} images)",
                     "template wordings": float(np.mean(gen_hits)), "held-out wordings": float(np.mean(gen_hits_h))})

        # 4. captioning
        caps = []
        for i in range(0, n, bs):
            g = generate(model, model.prefix(tokens[i:i + bs]), min(args.max_tokens, cfg.max_text_len), args.beams,
                         "caption", vocab_feats=vocab)
            caps += [model.tokenizer.decode(t) for t in g.tokens]
        refs = [r["captions"] for r in recs]
        rows.append({"metric": f"caption CIDEr-D (beam {args.beams})", "template wordings": cider_d(caps, refs)})
        rows.append({"metric": f"caption BLEU-4 (beam {args.beams})", "template wordings": bleu4(caps, refs)})

        # 5. zero-shot attribute classification from class-name text
        z_img = torch.cat([model.readout(model.prefix(tokens[i:i + bs])) for i in range(0, n, bs)])  # (n, D)
        cls_acc = []
        for group, mapping in ATTRIBUTE_CLASSES.items():
            t = model.text_features([cfg.class_template.format(c) for c in mapping.values()])
            pred = (z_img @ t.T).argmax(-1).tolist()
            truth = [list(mapping).index(r["attributes"][group]) for r in recs]
            a = float(np.mean([p == y for p, y in zip(pred, truth)]))
            cls_acc.append(a)
            rows.append({"metric": f"attribute classification: {group}", "template wordings": a})
        rows.append({"metric": "attribute classification (mean of 4)", "template wordings": float(np.mean(cls_acc))})

        # 6. retrieval with the same encoder
        texts = [c for r in recs for c in r["captions"]]
        owner = torch.tensor([i for i, r in enumerate(recs) for _ in r["captions"]])
        z_txt = torch.cat([model.embed_text(texts[i:i + 4 * bs]) for i in range(0, len(texts), 4 * bs)])
        sim = z_img @ z_txt.T  # (n, T)
        top_t = sim.topk(5, dim=1).indices  # image -> text
        i2t = [(owner[top_t[i]] == i).cumsum(0).clamp(max=1) for i in range(n)]
        top_i = sim.T.topk(5, dim=1).indices  # text -> image
        t2i = (top_i == owner[:, None]).cumsum(1).clamp(max=1).float()
        rows.append({"metric": "retrieval image->text R@1 / R@5",
                     "template wordings": f"{np.mean([float(v[0]) for v in i2t]):.3f} / "
                                          f"{np.mean([float(v[4]) for v in i2t]):.3f}"})
        rows.append({"metric": "retrieval text->image R@1 / R@5",
                     "template wordings": f"{t2i[:, 0].mean():.3f} / {t2i[:, 4].mean():.3f}"})

        # 7. the question grid
        if not args.no_grid:
            grid_rows, summary = grid_section(model, tokens, recs, answers, ans_feats, vocab, args)
            write_results("uniperceiver_vqa_grid", grid_rows, GRID_COLUMNS, args.out, meta)
            print(write_results("uniperceiver_vqa_grid_summary", summary, GRID_SUMMARY_COLUMNS, args.out, meta))
            print()

    meta["seconds"] = round(time.time() - t0, 1)
    meta["example_captions"] = list(zip([r["captions"][0] for r in recs[:5]], caps[:5]))
    md = write_results("uniperceiver_quality", rows, [("metric", "metric"), ("template wordings", "test set"),
                                                      ("held-out wordings", "held-out wordings")], args.out, meta)
    print(md)
    print(f"\n{n} test images, {meta['seconds']} s")
    for ref, hyp in meta["example_captions"]:
        print(f"  ref: {ref}\n  hyp: {hyp}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
