"""Deployment: ``shusheng export`` (checked ONNX / int8 ONNX / TensorRT files), runtimes for the pipelines'
image side (torch, onnxruntime, tensorrt, auto) and ``--runtime`` on index / caption / ask.

Default run: internimage_test, the two bundled models and tiny modules (ONNX Runtime on CPU). ``slow``:
InternImage T/S/B parity at 224 px. ``gpu``: TensorRT engines (need CUDA and the ``tensorrt`` package).
"""

from __future__ import annotations

import importlib.util
import json
import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

import shusheng.runtimes as runtimes  # noqa: E402
from shusheng.cli import main  # noqa: E402

HAS_TRT = importlib.util.find_spec("tensorrt") is not None


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    """Exports and runtime measurements go to a temporary cache (not ~/.cache/shusheng)."""
    d = tmp_path_factory.getbasetemp() / "runtime-cache"
    monkeypatch.setattr(runtimes, "cache_dir", lambda: d)
    return d


def _bundled(name: str):
    from shusheng.weights import BundledWeightsNotFound, bundled_path

    try:
        return bundled_path(name)
    except BundledWeightsNotFound:
        pytest.skip(f"{name} is not bundled here")


def _onnx_session(path):
    from shusheng.runtimes.onnx import OnnxRunner

    return OnnxRunner(path)


# ------------------------------------------------------------------------------------------------ export

def test_export_cli_registered_backbone_dynamic_batch(tmp_path, capsys):
    out = tmp_path / "ii.onnx"
    assert main(["export", "internimage_test", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "max abs error" in text and "SynthDrive" in text
    err = float(text.split("max abs error ")[1].split()[0])
    assert 0 <= err <= 1e-4
    runner = _onnx_session(out)
    meta = runner.metadata
    assert meta["shusheng.model"] == "internimage_test" and json.loads(meta["shusheng.preprocess"])["size"] == 64
    x = torch.randn(5, 3, 64, 64)  # a batch size the check did not use
    assert runner(x)[0].shape == (5, 10)


def test_export_fixed_batch_and_size(tmp_path):
    from shusheng.deploy import export_model, resolve_target

    target = resolve_target("internimage_test", size=(96, 64))
    res = export_model(target, tmp_path / "fixed.onnx", batch=2)
    assert res.max_abs_error <= 1e-4 and res.details["batch"] == 2
    sess = _onnx_session(res.path).session
    assert sess.get_inputs()[0].shape == [2, 3, 96, 64]
    with torch.inference_mode():
        ref = target.module(torch.ones(2, 3, 96, 64))
    out = sess.run(None, {"pixels": np.ones((2, 3, 96, 64), np.float32)})[0]
    assert np.abs(out - ref.numpy()).max() <= 1e-4


def test_a_failed_check_leaves_no_file(tmp_path, capsys):
    out = tmp_path / "sub" / "ii.onnx"
    assert main(["export", "internimage_test", "--out", str(out), "--atol", "1e-12"]) == 1
    err = capsys.readouterr().err
    assert "does not match PyTorch" in err and "nothing was written" in err
    assert not out.exists() and list(out.parent.iterdir()) == []  # no temporary file either


def test_export_errors_are_clear(tmp_path, capsys):
    assert main(["export", "no_such_model", "--out", str(tmp_path / "x.onnx")]) == 2
    assert "unknown model 'no_such_model'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["export", "internimage_test", "--out", str(tmp_path / "x.onnx"), "--batch", "zero"])
    if not HAS_TRT:
        assert main(["export", "internimage_test", "--format", "tensorrt", "--out", str(tmp_path / "x.engine")]) == 2
        msg = capsys.readouterr().err
        assert "'tensorrt' is required" in msg and "pip install" in msg
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("name, outputs", [("shusheng-mini-clip", ["embedding", "features"]),
                                           ("shusheng-mini-uniperceiver", ["image_tokens", "pooled"])])
def test_bundled_models_export_within_1e4(name, outputs, tmp_path):
    from shusheng.deploy import export_model, resolve_target

    _bundled(name)
    target = resolve_target(name)
    res = export_model(target, tmp_path / f"{name}.onnx")
    assert res.max_abs_error <= 1e-4 and target.output_names == outputs
    assert [o.name for o in _onnx_session(res.path).session.get_outputs()] == outputs


def test_saved_folder_is_read_by_model_type(tmp_path):
    from shusheng.backbone import create_model
    from shusheng.deploy import resolve_target

    model = create_model("internimage_test")
    model.save_pretrained(tmp_path / "m")
    target = resolve_target(tmp_path / "m")
    assert target.kind == "internimage" and target.input_shape == (3, 64, 64)
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        assert torch.allclose(target.module(x), model.eval()(x))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"model_type": "llama", "config": {},
                                                                "preprocess": {}}))
    with pytest.raises(ValueError, match="does not know"):
        resolve_target(tmp_path / "other")


def test_counting_loop_exports_as_a_loop_exact_for_every_input(tmp_path):
    """The dense towers count objects with a data-dependent loop; traced, it would keep the iterations of the
    example. Traced on a full mask (few iterations), the file must still count a snake (many) correctly."""
    import onnx

    from shusheng.backbone.dense_tower import count_components
    from shusheng.runtimes.onnx import export_onnx

    class Count(torch.nn.Module):
        def forward(self, x):
            return count_components(x > 0).float()

    full = torch.ones(1, 2, 16, 16)
    path = export_onnx(Count(), full, tmp_path / "count.onnx")
    assert "Loop" in {n.op_type for n in onnx.load(str(path)).graph.node}
    snake = -torch.ones(1, 2, 16, 16)
    snake[:, :, ::2, :] = 1
    snake[:, 0, 1::4, -1] = 1
    snake[:, 0, 3::4, 0] = 1  # channel 0: one winding path; channel 1: 8 separate rows
    blobs = (torch.rand(3, 2, 16, 16, generator=torch.Generator().manual_seed(0)) - 0.6)
    sess = _onnx_session(path)
    for x in (snake, blobs, full):
        got = torch.as_tensor(sess(x)[0])
        assert torch.equal(got, Count()(x)), (got, Count()(x))
    assert Count()(snake).tolist() == [[1.0, 8.0]]


def test_int8_static_and_dynamic(tmp_path):
    import onnx

    from shusheng.deploy import export_model, resolve_target

    target = resolve_target("internimage_test")
    ops = {}
    for mode in ("static", "dynamic"):
        res = export_model(target, tmp_path / f"{mode}.onnx", "onnx-int8", quantization=mode, calibration_images=16)
        assert 0 < res.rel_error <= res.tolerance and res.details["quantization"] == mode
        ops[mode] = {n.op_type for n in onnx.load(str(res.path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops["static"]
    assert "DynamicQuantizeLinear" in ops["dynamic"] or "MatMulInteger" in ops["dynamic"]


def test_quantized_file_is_judged_by_its_own_tolerance(tmp_path):
    from shusheng.deploy import ExportCheckError, export_model, resolve_target

    with pytest.raises(ExportCheckError, match="relative L2 error"):
        export_model(resolve_target("internimage_test"), tmp_path / "q.onnx", "onnx-int8", int8_tol=1e-6,
                     calibration_images=8)
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------------------------------------ segmenter / detector

SEG_TINY = dict(backbone="internimage_test", backbone_args={"channels": 8}, channels=16, image_size=64)
DET_TINY = dict(backbone="internimage_test", backbone_args={"channels": 8}, fpn_channels=64, min_size=64,
                max_size=128)


def _saved(tmp_path, model, name):
    torch.manual_seed(0)
    model.save_pretrained(tmp_path / name)
    return tmp_path / name


def test_segmenter_folder_exports_logits_within_1e4(tmp_path, capsys):
    from shusheng.detection.segment import InternImageSegmenter

    torch.manual_seed(0)
    model = InternImageSegmenter(**SEG_TINY).eval()
    folder = _saved(tmp_path, model, "seg")
    out = tmp_path / "seg.onnx"
    assert main(["export", str(folder), "--out", str(out)]) == 0
    err = float(capsys.readouterr().out.split("max abs error ")[1].split()[0])
    assert 0 <= err <= 1e-4
    runner = _onnx_session(out)
    assert runner.output_names == ["logits"] and runner.metadata["shusheng.kind"] == "segmenter"
    x = torch.randn(3, 3, 64, 64)  # a batch size the check did not use
    with torch.inference_mode():
        ref = model(x)
    got = runner(x)[0]
    assert got.shape == (3, model.num_classes, 64, 64) and np.abs(got - ref.numpy()).max() <= 1e-4


@pytest.mark.parametrize("head", ["fcos", "maskrcnn"])
def test_detector_dense_part_exports_and_pytorch_finishes_the_detections(head, tmp_path):
    from shusheng.deploy import export_model, resolve_target
    from shusheng.detection.model import InternImageDetector

    torch.manual_seed(0)
    model = InternImageDetector(**DET_TINY, head=head).eval()
    target = resolve_target(_saved(tmp_path, model, head))
    assert target.kind == "detector" and target.input_shape == (3, 64, 64)
    res = export_model(target, tmp_path / f"{head}.onnx")
    assert res.max_abs_error <= 1e-4
    runner = _onnx_session(res.path)
    names = runner.output_names
    assert names[:4] == ["level_0", "level_1", "level_2", "level_3"]
    assert names[4:] == (["cls_logits", "bbox_regression", "bbox_ctrness"] if head == "fcos"
                         else ["fpn_0", "fpn_1", "fpn_2", "fpn_3", "fpn_pool"])
    assert "detections_from_dense" in runner.metadata["shusheng.pytorch_side"]
    model = target.module.model  # the detector as loaded from the folder
    g = torch.Generator().manual_seed(1)
    images = [torch.rand(3, 64, 64, generator=g) for _ in range(2)]
    with torch.inference_mode():
        batch, _ = model.detector.transform(images)
        ours = model.detections_from_dense([torch.from_numpy(o) for o in runner(batch.tensors)],
                                           batch.tensors.shape, batch.image_sizes)
        eager = model.detections_from_dense(model.dense_module()(batch.tensors), batch.tensors.shape,
                                            batch.image_sizes)
    for a, b in zip(ours, eager):
        assert len(a["boxes"]) == len(b["boxes"]) > 0
        assert torch.allclose(a["scores"], b["scores"], atol=1e-4)
        # near-tied scores (a random model) may swap places: every box has its twin in the other list
        assert torch.cdist(a["boxes"], b["boxes"], p=float("inf")).min(1).values.max() <= 1e-2


def test_new_kinds_failed_check_leaves_no_file_and_bad_canvas_is_refused(tmp_path, capsys):
    from shusheng.detection.model import InternImageDetector
    from shusheng.detection.segment import InternImageSegmenter

    seg = _saved(tmp_path, InternImageSegmenter(**SEG_TINY), "seg")
    det = _saved(tmp_path, InternImageDetector(**DET_TINY, head="fcos"), "det")
    for folder in (seg, det):
        out = tmp_path / "out" / f"{folder.name}.onnx"
        assert main(["export", str(folder), "--out", str(out), "--atol", "1e-12"]) == 1
        err = capsys.readouterr().err
        assert "does not match PyTorch" in err and "nothing was written" in err
        assert not out.exists() and list(out.parent.iterdir()) == []
    assert main(["export", str(det), "--out", str(tmp_path / "d.onnx"), "--size", "64", "80"]) == 2
    assert "multiples of 32" in capsys.readouterr().err and not (tmp_path / "d.onnx").exists()


def test_segmentation_pipeline_on_onnxruntime_matches_torch(tmp_path):
    from shusheng.detection.model import InternImageDetector
    from shusheng.detection.pipelines import DetectionPipeline, SegmentationPipeline
    from shusheng.detection.segment import InternImageSegmenter

    torch.manual_seed(0)
    folder = _saved(tmp_path, InternImageSegmenter(**SEG_TINY), "seg")
    images = _scenes(3)
    eager = SegmentationPipeline.from_pretrained(folder)(images)
    pipe = SegmentationPipeline.from_pretrained(folder, runtime="onnxruntime")
    ort = pipe(images)
    assert pipe.image_runner.name == "onnxruntime"
    for a, b in zip(eager.class_ids, ort.class_ids):
        assert a.shape == b.shape == (128, 128) and (a == b).mean() >= 0.999
    with pytest.raises(ValueError, match="runtime='torch' only"):
        DetectionPipeline(InternImageDetector(**DET_TINY), runtime="onnxruntime")  # not yet: see docs/deploy.md


# ------------------------------------------------------------------------------------------------ runtimes

def test_runtime_names_are_checked():
    from shusheng.backbone import create_model
    from shusheng.pipelines import Pipeline

    with pytest.raises(ValueError, match="unknown runtime 'fast'"):
        Pipeline(create_model("internimage_test"), runtime="fast")
    if not HAS_TRT:
        with pytest.raises(ImportError, match=r"'tensorrt' is required.*pip install"):
            Pipeline(create_model("internimage_test"), runtime="tensorrt")
    pipe = Pipeline(create_model("internimage_test"), runtime="onnxruntime")
    with pytest.raises(ValueError, match="no image side"):
        pipe.image_outputs(torch.zeros(1, 3, 64, 64))


def test_onnxruntime_runner_matches_and_caches(_cache):
    from shusheng.backbone import create_model

    model = create_model("internimage_test").eval()
    run = runtimes.create_runner(model, (3, 64, 64), "onnxruntime")
    assert run.name == "onnxruntime" and run.max_abs_error <= 1e-4
    x = torch.randn(3, 3, 64, 64)
    with torch.inference_mode():
        assert (run(x)[0] - model(x)).abs().max() <= 1e-4
    files = list((_cache / "onnx").glob("*.onnx"))
    assert run.path in files
    again = runtimes.create_runner(model, (3, 64, 64), "onnxruntime")
    assert again.path == run.path and list((_cache / "onnx").glob("*.onnx")) == files  # no second export
    with pytest.raises(ValueError, match="takes \\(B, 3, 64, 64\\)"):
        run(torch.randn(1, 3, 32, 32))
    model.head.weight.data.mul_(2)  # other weights: another fingerprint
    assert runtimes.fingerprint(model, (3, 64, 64)) not in run.path.name


def test_auto_never_picks_a_runtime_slower_than_eager():
    times = {"torch": {"1": 10.0, "8": 50.0}, "onnxruntime": {"1": 8.0, "8": 52.0}}
    assert runtimes.choose_runtime(times) == "torch"  # slower at batch 8
    times["onnxruntime"]["8"] = 40.0
    assert runtimes.choose_runtime(times) == "onnxruntime"
    times["onnxruntime"] = {"1": 9.8, "8": 49.0}  # within the 5 % margin: not worth it
    assert runtimes.choose_runtime(times) == "torch"
    times["tensorrt"] = {"1": 2.0, "8": 5.0}
    assert runtimes.choose_runtime(times) == "tensorrt"


def test_auto_measures_once_per_model_and_machine(_cache):
    from shusheng.backbone import create_model

    model = create_model("internimage_test").eval()
    first = runtimes.select_runtime(model, (3, 64, 64), batches=(1, 2))
    assert not first.cached and set(first.times_ms) == {"torch", "onnxruntime"}
    assert first.runtime == runtimes.choose_runtime(first.times_ms)
    stored = json.loads((_cache / "runtimes.json").read_text())[first.key]
    assert stored["runtime"] == first.runtime and stored["machine"]["threads"] == torch.get_num_threads()
    second = runtimes.select_runtime(model, (3, 64, 64), batches=(1, 2))
    assert second.cached and second.runtime == first.runtime and second.key == first.key
    run = runtimes.create_runner(model, (3, 64, 64), "auto")
    assert run.name == first.runtime


def test_auto_skips_a_runtime_that_cannot_run_the_module():
    class Untraceable(torch.nn.Module):  # a Python number: traced as a constant, wrong for any other input
        def forward(self, x):
            return x * float(x.mean())

    choice = runtimes.select_runtime(Untraceable(), (3, 8, 8), batches=(1,), refresh=True)
    assert choice.runtime == "torch" and "RuntimeCheckError" in choice.invalid["onnxruntime"]
    assert "onnxruntime" not in choice.times_ms


def _scenes(n: int):
    from shusheng.data import TEST_SEED, sample

    return [sample(TEST_SEED, i, 128)[0] for i in range(n)]


def test_decoder_answers_and_captions_unchanged_with_onnxruntime():
    from shusheng.uniperceiver.pipelines import CaptionPipeline, VQAPipeline

    path = _bundled("shusheng-mini-uniperceiver")
    images = _scenes(4)
    eager = CaptionPipeline.from_pretrained(path)
    ort = CaptionPipeline.from_pretrained(path, runtime="onnxruntime")
    a, b = eager(images, max_new_tokens=40), ort(images, max_new_tokens=40)
    assert b.captions == a.captions and ort.image_runner.name == "onnxruntime"
    assert np.allclose(a.scores, b.scores, atol=1e-4) and np.allclose(a.domain_score, b.domain_score, atol=1e-3)
    vqa_e, vqa_o = VQAPipeline(eager.model, eager.domain_check), VQAPipeline(ort.model, runtime="onnxruntime")
    for q in ("What colour is the traffic light?", "How many vehicles are there?", "Is it raining?"):
        assert vqa_o(images, q).answers == vqa_e(images, q).answers


def test_embeddings_match_with_onnxruntime():
    from shusheng.miniclip.pipelines import EmbeddingPipeline
    from shusheng.retrieval_index.embedders import RuntimeEmbedder, create_embedder

    path = _bundled("shusheng-mini-clip")
    images = _scenes(3)
    a = EmbeddingPipeline.from_pretrained(path)(images)
    b = EmbeddingPipeline.from_pretrained(path, runtime="onnxruntime")(images)
    assert np.abs(a.embeddings - b.embeddings).max() <= 1e-5
    assert a.in_domain == b.in_domain
    emb = create_embedder(runtime="onnxruntime")
    assert isinstance(emb, RuntimeEmbedder) and emb.name == "shusheng-mini-clip"
    torch_emb = create_embedder()
    assert np.abs(emb.embed_images(images) - torch_emb.embed_images(images)).max() <= 1e-5
    assert emb.embed_images([]).shape == (0, emb.dim)
    auto = EmbeddingPipeline.from_pretrained(path, runtime="auto")
    assert np.abs(auto(images).embeddings - a.embeddings).max() <= 1e-5
    assert auto.image_runner.name in ("torch", "onnxruntime")
    auto.to("cpu")  # a new device or dtype: the runner is made again (auto's answer is read from the cache)
    assert auto._image_runner is None and auto(images[:1]).embeddings.shape == (1, 384)


def test_runtime_flags_on_index_caption_and_ask(tmp_path, capsys):
    from shusheng.retrieval_index.index import Index

    _bundled("shusheng-mini-clip")
    _bundled("shusheng-mini-uniperceiver")
    folder = tmp_path / "pics"
    folder.mkdir()
    for i, im in enumerate(_scenes(3)):
        im.save(folder / f"s{i}.png")
    assert main(["index", str(folder), "--runtime", "onnxruntime", "--quiet", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["embedded"] == 3
    with Index.open(folder / ".shusheng-index") as index:  # queried with the eager embedder
        hit = index.search(image=str(folder / "s1.png"), k=1)[0]
    assert hit.path.endswith("s1.png") and hit.score > 0.9999
    files = [str(folder / "s0.png"), str(folder / "s2.png")]
    results = {}
    for rt in ("torch", "onnxruntime"):
        assert main(["caption", *files, "--json", "--runtime", rt, "--max-tokens", "30"]) == 0
        caps = [r["caption"] for r in json.loads(capsys.readouterr().out)]
        assert main(["ask", *files, "-q", "What colour is the traffic light?", "--json", "--runtime", rt]) == 0
        results[rt] = (caps, [r["answer"] for r in json.loads(capsys.readouterr().out)])
    assert results["onnxruntime"] == results["torch"]


# ------------------------------------------------------------------------------------------------ slow / gpu

@pytest.mark.slow
@pytest.mark.parametrize("name", ["internimage_t", "internimage_s", "internimage_b"])
def test_internimage_tsb_export_within_1e4(name, tmp_path):
    from shusheng.deploy import export_model, resolve_target

    torch.manual_seed(0)
    res = export_model(resolve_target(name), tmp_path / f"{name}.onnx", check_images=2)
    assert res.max_abs_error <= 1e-4, res


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_TRT, reason="needs the tensorrt package")
@pytest.mark.parametrize("fp16", [False, True])
def test_tensorrt_engine_matches_pytorch(tmp_path, fp16):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from shusheng.deploy import export_model, resolve_target

    res = export_model(resolve_target("internimage_test"), tmp_path / "ii.engine", "tensorrt", fp16=fp16)
    assert res.rel_error <= (0.05 if fp16 else 1e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_TRT, reason="needs the tensorrt package")
def test_tensorrt_runtime_in_a_pipeline():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from shusheng.uniperceiver.pipelines import CaptionPipeline

    path = _bundled("shusheng-mini-uniperceiver")
    images = _scenes(4)
    eager = CaptionPipeline.from_pretrained(path, device="cuda")
    trt = CaptionPipeline.from_pretrained(path, device="cuda", runtime="tensorrt")
    assert trt(images).captions == eager(images).captions
