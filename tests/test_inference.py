"""Processor, grounded-detection post-processing, class-name detection and the predict command."""

import json

import pytest
import torch
from PIL import Image

from mdetr.cli import main
from mdetr.inference.predictor import Predictor, merge_detections
from mdetr.inference.processor import (
    ClassPrompt,
    GroundingProcessor,
    build_class_prompts,
    post_process_grounded_detection,
    text_encoder_max_tokens,
)
from mdetr.models.mdetr import MDETROutput

CAPTION = "a red circle and a blue square"


@pytest.fixture(scope="module")
def trained(shapes_dir, tmp_path_factory):
    """A tiny model trained for one epoch through ``mdetr train`` (module-scoped: reused below)."""
    from conftest import _tiny_overrides

    out = tmp_path_factory.mktemp("inference-run")
    config = out / "tiny.yaml"
    config.write_text("model:\n  arch: mdetr_lite\n")
    overrides = _tiny_overrides(shapes_dir, out / "run", "train.epochs=1")
    assert main(["train", "--config", str(config), "--no-progress", *overrides]) == 0
    return out / "run" / "last"


@pytest.fixture(scope="module")
def predictor(trained):
    return Predictor.from_checkpoint(trained)


@pytest.fixture(scope="module")
def val_images(shapes_dir):
    return sorted((shapes_dir / "images" / "val").glob("*.png"))


def _outputs(tokenized, token_logits, boxes):
    """Raw predictions with the given (B, Q, L+1) logits (last slot: no object) and (B, Q, 4) cxcywh boxes."""
    return MDETROutput(pred_logits=token_logits, pred_boxes=boxes, proj_queries=None, proj_tokens=None,
                       text_padding_mask=tokenized["attention_mask"].ne(1), tokenized=tokenized)


def _peaked_logits(length, peaks):
    """(Q, length + 1) logits: query q puts equal, large logits on the token positions peaks[q]."""
    logits = torch.full((len(peaks), length + 1), -10.0)
    for q, positions in enumerate(peaks):
        logits[q, positions] = 10.0
    return logits


def test_post_process_matches_direct_computation(tokenizer):
    tokenized = tokenizer([CAPTION], padding="longest", return_tensors="pt")
    tokens = tokenized.tokens(0)
    assert tokens[2:4] == ["red", "circle"] and tokens[6:8] == ["blue", "square"]
    length = len(tokens)
    no_object = length  # last slot
    logits = _peaked_logits(length, [[2, 3], [6, 7], [no_object], [7, no_object]])[None]
    logits[0, 0, no_object] = 8.0  # a little no-object mass so scores are not all 1
    torch.manual_seed(0)
    boxes = torch.rand(1, 4, 4) * 0.5 + 0.25
    height, width = 60, 100
    outputs = _outputs(tokenized, logits, boxes)
    results = post_process_grounded_detection(outputs, target_sizes=[[height, width]], threshold=0.4,
                                              captions=[CAPTION])
    assert len(results) == 1
    result = results[0]
    prob = logits.softmax(-1)[0]
    expected_scores = 1 - prob[:, -1]
    keep = [q for q in expected_scores.argsort(descending=True).tolist() if expected_scores[q] > 0.4]
    assert sorted(keep) == [0, 1, 3]
    assert torch.allclose(result["scores"], expected_scores[keep])
    cx, cy, w, h = boxes[0, keep].unbind(-1)
    expected_boxes = torch.stack([(cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width,
                                  (cy + h / 2) * height], -1)
    assert torch.allclose(result["boxes"], expected_boxes, atol=1e-4)
    phrases = dict(zip(keep, result["phrases"], strict=True))
    spans = dict(zip(keep, result["spans"], strict=True))
    assert phrases[0] == "red circle" and spans[0] == [(2, 12)]
    assert phrases[1] == "blue square" and spans[1] == [(19, 30)]
    assert phrases[3] == "square"  # half its mass on "square", half on no object
    assert result["labels"].tolist() == [-1, -1, -1]
    assert torch.allclose(result["token_probs"], prob[keep, :-1])
    top = post_process_grounded_detection(outputs, target_sizes=torch.tensor([[60, 100]]), threshold=0.0,
                                          top_k=2, captions=CAPTION)[0]
    assert len(top["scores"]) == 2 and (top["scores"][:-1] >= top["scores"][1:]).all()


def test_post_process_batch_with_shared_caption_encoding(tokenizer):
    tokenized = tokenizer([CAPTION], padding="longest", return_tensors="pt")
    length = len(tokenized.tokens(0))
    logits = torch.stack([_peaked_logits(length, [[2, 3]]), _peaked_logits(length, [[6, 7]])])
    boxes = torch.full((2, 1, 4), 0.5)
    outputs = _outputs(tokenized, logits, boxes)
    results = post_process_grounded_detection(outputs, target_sizes=[[10, 10], [20, 40]], threshold=0.5,
                                              captions=CAPTION)
    assert [r["phrases"] for r in results] == [["red circle"], ["blue square"]]
    assert results[1]["boxes"].tolist() == [[10.0, 5.0, 30.0, 15.0]]
    with pytest.raises(ValueError, match="captions"):
        post_process_grounded_detection(outputs, target_sizes=[[1, 1], [1, 1]])


def test_class_prompt_spans_and_labels(tokenizer):
    prompt = ClassPrompt.from_names(["cat", "traffic light", "dog"], label_offset=10)
    assert prompt.caption == "cat. traffic light. dog."
    assert [prompt.caption[s:e] for s, e in prompt.spans] == list(prompt.names)
    tokenized = tokenizer([prompt.caption], return_tensors="pt")
    tokens = tokenized.tokens(0)
    assert tokens[3:5] == ["traffic", "light"]
    positive = prompt.positive_map(tokenized)
    assert positive.shape == (3, len(tokens))
    assert positive[1].nonzero().flatten().tolist() == [3, 4]
    assert positive[0].nonzero().flatten().tolist() == [1]
    # Query 0: most mass on "traffic" + "light" (2 x 0.3) although "dog" is its single most probable token.
    logits = torch.full((1, 2, len(tokens) + 1), -20.0)
    logits[0, 0, [3, 4, 6]] = torch.tensor([0.3, 0.3, 0.4]).log()
    logits[0, 1, 1] = 5.0
    outputs = _outputs(tokenized, logits, torch.full((1, 2, 4), 0.5))
    result = post_process_grounded_detection(outputs, target_sizes=[[8, 8]], threshold=0.5,
                                             class_prompts=prompt)[0]
    by_label = dict(zip(result["labels"].tolist(), zip(result["phrases"], result["spans"], strict=True),
                        strict=True))
    assert by_label == {11: ("traffic light", [(5, 18)]), 10: ("cat", [(0, 3)])}


def test_build_class_prompts_splits_between_whole_names(tokenizer):
    names = ["cat", "dog", "traffic light", "fire hydrant", "teddy bear", "hair drier", "toothbrush",
             "person", "wine glass", "baseball glove", "potted plant", "bus"]
    whole = build_class_prompts(names, tokenizer)
    assert len(whole) == 1 and whole[0].names == tuple(names)
    prompts = build_class_prompts(names, tokenizer, max_tokens=12)
    assert len(prompts) >= 3
    assert [n for p in prompts for n in p.names] == names  # every name once, in order
    offset = 0
    for prompt in prompts:
        assert prompt.label_offset == offset
        offset += len(prompt.names)
        assert len(tokenizer(prompt.caption)["input_ids"]) <= 12
        assert [prompt.caption[s:e] for s, e in prompt.spans] == list(prompt.names)
        assert prompt.caption == ". ".join(prompt.names) + "."
    with pytest.raises(ValueError, match="alone is longer"):
        build_class_prompts(["a very long class name with many words in it"], tokenizer, max_tokens=6)
    with pytest.raises(ValueError, match="empty"):
        build_class_prompts(["cat", " "], tokenizer)
    with pytest.raises(ValueError, match="empty"):
        build_class_prompts([], tokenizer)


def test_text_encoder_max_tokens():
    from transformers import BertConfig, RobertaConfig

    assert text_encoder_max_tokens(BertConfig(max_position_embeddings=512)) == 512
    assert text_encoder_max_tokens(RobertaConfig(max_position_embeddings=514, pad_token_id=1)) == 512


def test_merge_detections_concatenates_sorted():
    def chunk(scores, labels, width):
        k = len(scores)
        return ({"scores": torch.tensor(scores), "boxes": torch.arange(4 * k, dtype=torch.float32).view(k, 4),
                 "labels": torch.tensor(labels), "token_probs": torch.ones(k, width),
                 "phrases": [f"name{n}" for n in labels], "spans": [[(n, n + 1)] for n in labels]},
                f"caption{width}")

    merged = merge_detections([chunk([0.9, 0.5], [0, 1], 5), chunk([0.7], [2], 3)], top_k=None)
    assert merged.scores.tolist() == pytest.approx([0.9, 0.7, 0.5])
    assert merged.labels.tolist() == [0, 2, 1] and merged.phrases == ["name0", "name2", "name1"]
    assert merged.prompts == ["caption5", "caption3", "caption5"]
    assert merged.token_probs.shape == (3, 5) and merged.token_probs[1].tolist() == [1, 1, 1, 0, 0]
    top = merge_detections([chunk([0.9, 0.5], [0, 1], 5), chunk([0.7], [2], 3)], top_k=2)
    assert top.labels.tolist() == [0, 2]


def test_processor_inputs(predictor, val_images):
    processor = predictor.processor
    assert isinstance(processor, GroundingProcessor) and processor.max_tokens == 255
    images = [Image.open(val_images[0]).convert("RGB"), Image.new("RGB", (96, 64))]
    inputs = processor(images, ["the red circle", "a green star left of it"])
    assert inputs["pixel_values"].shape[:2] == (2, 3) and inputs["pixel_mask"].shape[0] == 2
    assert inputs["target_sizes"].tolist() == [[128, 128], [64, 96]]
    assert inputs["pixel_mask"][1, :64, :96].logical_not().all() and inputs["pixel_mask"][1, 64:].all()
    assert inputs["tokenized"]["input_ids"].shape[0] == 2
    with pytest.raises(ValueError, match="at most"):
        processor(images[:1], ["circle " * 300])
    with pytest.raises(ValueError, match="empty"):
        processor(images[:1], ["  "])


def test_predict_batch_returns_post_processed_groundings(predictor, val_images):
    caption = "the small red circle left of the blue square"
    image = val_images[0]
    grounding = predictor.predict(image, caption, threshold=0.0)
    assert grounding.labels is None and grounding.prompts is None
    inputs = predictor.processor([Image.open(image).convert("RGB")], [caption])
    with torch.no_grad():
        outputs = predictor.model(inputs["pixel_values"], inputs["pixel_mask"], inputs["captions"])
    direct = post_process_grounded_detection(outputs, target_sizes=inputs["target_sizes"], threshold=0.0,
                                             captions=[caption])[0]
    assert torch.allclose(grounding.boxes, direct["boxes"], atol=1e-4)
    assert grounding.phrases == direct["phrases"]


def test_detect_chunks_and_maps_labels_back(predictor, val_images):
    names = ["red circle", "blue square", "green triangle", "yellow star", "circle", "square"]
    prompts = predictor.class_prompts(names, max_tokens=9)
    assert len(prompts) >= 2 and [n for p in prompts for n in p.names] == names
    queries = predictor.model.config.num_queries
    found = predictor.detect(val_images[0], names, threshold=0.0, max_tokens=9)
    assert len(found.scores) == queries * len(prompts)  # every chunk's boxes, merged
    assert (found.scores[:-1] >= found.scores[1:]).all()
    captions = {p.caption: set(p.names) for p in prompts}
    for label, phrase, prompt, spans in zip(found.labels.tolist(), found.phrases, found.prompts, found.spans,
                                            strict=True):
        assert phrase == names[label] and phrase in captions[prompt]
        assert [prompt[s:e] for s, e in spans] == [phrase]
    top = predictor.detect(val_images[0], names, threshold=0.0, top_k=3, max_tokens=9)
    assert torch.allclose(top.scores, found.scores[:3])
    batch = predictor.detect_batch(val_images[:2], names, threshold=0.0, top_k=3, max_tokens=9)
    assert torch.allclose(batch[0].boxes, top.boxes, atol=1e-3)
    assert batch[0].labels.tolist() == top.labels.tolist()
    single = predictor.detect(val_images[0], names, threshold=0.0)
    assert single.prompts == [". ".join(names) + "."] * queries


def test_bfloat16_predictions_close_to_float32(trained, predictor, val_images):
    bf16 = Predictor.from_checkpoint(trained, dtype="bfloat16")
    images = [Image.open(p).convert("RGB") for p in val_images[:2]]
    inputs = predictor.processor(images, ["the red circle"] * 2)
    with torch.no_grad():
        full = predictor._forward(inputs["pixel_values"], inputs["pixel_mask"], inputs["captions"])
        half = bf16._forward(inputs["pixel_values"], inputs["pixel_mask"], inputs["captions"])
    assert half.pred_boxes.dtype == torch.float32 and half.pred_logits.dtype == torch.float32
    assert (half.pred_boxes - full.pred_boxes).abs().max() * 128 < 3  # pixels of a 128 px image
    grounding = bf16.predict(val_images[0], "the red circle", threshold=0.0)
    assert grounding.boxes.dtype == torch.float32 and grounding.scores.dtype == torch.float32
    with pytest.raises(ValueError, match="dtype"):
        Predictor(predictor.model, dtype="float16")


def test_cli_predict_classes_batches_coco_and_token_maps(trained, val_images, tmp_path):
    code = main(["predict", str(trained), "--image", *map(str, val_images[:3]), "--classes",
                 "circle, square,red star", "--threshold", "0", "--top-k", "2", "--batch-size", "2",
                 "--dtype", "bfloat16", "--token-map", "--output-dir", str(tmp_path)])
    assert code == 0
    records = json.loads((tmp_path / "predictions.json").read_text())
    assert [r["image"] for r in records] == [str(p) for p in val_images[:3]]
    index = json.loads((tmp_path / "results_coco_images.json").read_text())
    assert [i["file_name"] for i in index["images"]] == [str(p) for p in val_images[:3]]
    assert index["categories"] == [{"id": 1, "name": "circle"}, {"id": 2, "name": "square"},
                                   {"id": 3, "name": "red star"}]
    results = json.loads((tmp_path / "results_coco.json").read_text())
    assert len(results) == 6 and {r["image_id"] for r in results} == {1, 2, 3}
    names = {c["id"]: c["name"] for c in index["categories"]}
    for result in results:
        assert names[result["category_id"]] == result["phrase"]
        assert len(result["bbox"]) == 4 and min(result["bbox"][2:]) >= 0
    first = records[0]["detections"][0]
    x0, y0, x1, y1 = first["box_xyxy"]
    assert results[0]["bbox"] == pytest.approx([x0, y0, x1 - x0, y1 - y0], abs=0.02)
    for record in records:
        for detection in record["detections"]:
            with Image.open(detection["token_map"]) as chart:
                assert chart.width > 100 and chart.height > 100


def test_cli_predict_compiled_bf16_matches_eager_bf16(trained, val_images, tmp_path, cxx_compiler,
                                                       compiled_parts):
    """``--compile`` with bf16 compiles the backbone, text encoder, encoder and decoder (fused and packed
    for oneDNN); its predictions stay within bf16 rounding of the eager bf16 copy's."""
    records = {}
    for flag in ([], ["--compile"]):
        out = tmp_path / (flag[0][2:] if flag else "eager")
        assert main(["predict", str(trained), "--image", *map(str, val_images[:2]), "--text",
                     "the red circle", "--threshold", "0", "--top-k", "3", "--dtype", "bfloat16",
                     "--output-dir", str(out), *flag]) == 0
        records[out.name] = json.loads((out / "predictions.json").read_text())
    assert compiled_parts == ["backbone", "transformer.text_encoder", "transformer.encoder",
                              "transformer.decoder"]
    for eager, compiled in zip(records["eager"], records["compile"], strict=True):
        assert eager["image"] == compiled["image"]
        # near-equal scores may swap places: scores compared sorted, each box with its nearest
        boxes = [torch.tensor([d["box_xyxy"] for d in r["detections"]]) for r in (eager, compiled)]
        scores = [sorted(d["score"] for d in r["detections"]) for r in (eager, compiled)]
        assert scores[1] == pytest.approx(scores[0], abs=0.01)
        nearest = (boxes[1][:, None] - boxes[0][None]).abs().amax(-1).amin(-1)
        assert nearest.max() < 1.5  # pixels of a 128 px image


def test_cli_predict_text_batches_and_needs_text_or_classes(trained, val_images, tmp_path, capsys):
    code = main(["predict", str(trained), "--image", str(val_images[0].parent), "--text", "the red circle",
                 "--threshold", "0", "--top-k", "1", "--batch-size", "2", "--output-dir", str(tmp_path)])
    assert code == 0
    results = json.loads((tmp_path / "results_coco.json").read_text())
    assert len(results) == len(val_images) and all("category_id" not in r and r["phrase"] for r in results)
    assert "categories" not in json.loads((tmp_path / "results_coco_images.json").read_text())
    with pytest.raises(SystemExit):
        main(["predict", str(trained), "--image", str(val_images[0])])
    with pytest.raises(SystemExit):
        main(["predict", str(trained), "--image", str(val_images[0]), "--text", "a", "--classes", "b"])
    assert main(["predict", str(trained), "--image", str(val_images[0]), "--text", "circle " * 300,
                 "--output-dir", str(tmp_path)]) == 2
    assert "at most" in capsys.readouterr().err
