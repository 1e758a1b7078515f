"""GQA question answering (MDETR Section 4.4, Table 5): the weighted QA loss and the answer decoding against
direct computations, vocabularies built from data, the accuracy and submission file on hand-computed cases,
the original release's questions and scene graphs converted, and a tiny two-phase train -> evaluate ->
predict run through the CLI on files in the format of MDETR's converted ``finetune_gqa_*.json``."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from mdetr.data.gqa import (
    build_answer_vocab,
    build_gqa_dataset,
    read_answer_vocab,
    read_gqa_file,
    write_answer_vocab,
)
from mdetr.eval.gqa import GQAEvaluator
from mdetr.losses.criterion import total_loss
from mdetr.losses.qa import GQAQACriterion, decode_gqa_answers, gqa_weight_dict

TYPES = ("obj", "attr", "rel", "global", "cat")
ANSWERS = {
    "obj": ["yes", "no", "unknown"],
    "attr": ["red", "blue", "unknown"],
    "rel": ["table", "unknown"],
    "global": ["indoors", "unknown"],
    "cat": ["fruit", "unknown"],
}


def _qa_logits(batch, answers=ANSWERS, seed=0):
    generator = torch.Generator().manual_seed(seed)
    qa = {"answer_type": torch.randn(batch, 5, generator=generator)}
    qa.update({f"answer_{k}": torch.randn(batch, len(v), generator=generator) for k, v in answers.items()})
    return qa


# ------------------------------------------------------------------------------------------ loss, decoding


def test_weighted_qa_loss_matches_cross_entropy_by_hand():
    # no "global" question in the batch; "green" is not in the attr vocabulary, so it is trained as "unknown"
    questions = [("yes", "obj"), ("blue", "attr"), ("green", "attr"), ("table", "rel"), ("fruit", "cat")]
    qa = _qa_logits(len(questions))
    criterion = GQAQACriterion(ANSWERS)
    targets = criterion.encode_targets([{"answer": a, "question_type": t} for a, t in questions], "cpu")
    losses = criterion(qa, targets)

    expected = {
        "loss_answer_type": F.cross_entropy(qa["answer_type"], torch.tensor([0, 1, 1, 2, 4])),
        "loss_answer_obj": F.cross_entropy(qa["answer_obj"][[0]], torch.tensor([0])),
        "loss_answer_attr": F.cross_entropy(qa["answer_attr"][[1, 2]], torch.tensor([1, 2])),
        "loss_answer_rel": F.cross_entropy(qa["answer_rel"][[3]], torch.tensor([0])),
        "loss_answer_cat": F.cross_entropy(qa["answer_cat"][[4]], torch.tensor([0])),
        "loss_answer_global": torch.tensor(0.0),  # masked sum over no question, divided by 1
    }
    for name, value in expected.items():
        assert losses[name].item() == pytest.approx(value.item(), rel=1e-5, abs=1e-7), name
    # every answer loss weighs qa_loss_coef (the recipe's 25) in the total
    weights = gqa_weight_dict(25.0)
    assert weights == {f"loss_answer_{k}": 25.0 for k in ("type", *TYPES)}
    assert total_loss(losses, weights).item() == pytest.approx(
        25 * sum(v.item() for v in expected.values()), rel=1e-5
    )

    # accuracy_answer_total: the type head and the chosen type's head both right
    heads = {t: qa[f"answer_{t}"].argmax(-1) for t in TYPES}
    wanted = {0: 0, 1: 1, 2: 2, 3: 0, 4: 0}
    correct = [
        qa["answer_type"][i].argmax().item() == TYPES.index(t) and heads[t][i].item() == wanted[i]
        for i, (_, t) in enumerate(questions)
    ]
    assert losses["accuracy_answer_total"].item() == pytest.approx(sum(correct) / len(correct))
    assert losses["accuracy_answer_global"].item() == 1.0  # a type without questions counts as right


def test_unified_head_loss_and_decoding():
    answers = {"all": ["yes", "red", "table", "unknown"]}
    logits = torch.tensor([[2.0, 0.1, 0.3, 0.0], [0.0, 0.2, 0.1, 1.5]])
    criterion = GQAQACriterion(answers)
    targets = criterion.encode_targets([{"answer": "yes"}, {"answer": "purple"}], "cpu")
    losses = criterion({"answer": logits}, targets)
    assert losses["loss_answer_total"].item() == pytest.approx(
        F.cross_entropy(logits, torch.tensor([0, 3])).item(), rel=1e-6
    )
    assert gqa_weight_dict(2.0, split_qa_heads=False) == {"loss_answer_total": 2.0}
    decoded = decode_gqa_answers({"answer": logits}, answers)
    assert [d.answer for d in decoded] == ["yes", "unknown"]
    assert decoded[0].confidence == pytest.approx(logits[0].softmax(-1)[0].item())


def test_decoding_takes_the_answer_from_the_head_the_type_head_picks():
    qa = _qa_logits(2)
    qa["answer_type"] = torch.tensor([[0.0, 3.0, 0, 0, 0], [0, 0, 0, 0, 2.0]])  # attr, then cat
    qa["answer_attr"][0] = torch.tensor([0.0, 4.0, 0.0])
    qa["answer_obj"][0] = torch.tensor([9.0, 0.0, 0.0])  # ignored: the type head did not pick obj
    decoded = decode_gqa_answers(qa, ANSWERS)
    assert (decoded[0].answer, decoded[0].answer_type) == ("blue", "attr")
    assert (decoded[1].answer_type, decoded[1].answer) == (
        "cat",
        ANSWERS["cat"][qa["answer_cat"][1].argmax()],
    )
    p_type = qa["answer_type"][0].softmax(-1)[1]
    p_answer = qa["answer_attr"][0].softmax(-1)[1]
    assert decoded[0].confidence == pytest.approx((p_type * p_answer).item())
    with pytest.raises(ValueError, match="model.qa_answers"):
        decode_gqa_answers(qa, {})


def test_answer_vocabularies_come_from_the_training_data(tmp_path):
    entries = [
        {"answer": "no", "question_type": "obj"},
        {"answer": "yes", "question_type": "obj"},
        {"answer": "yes", "question_type": "obj"},
        {"answer": "red", "question_type": "attr"},
        {"answer": "unknown", "question_type": "cat"},
        {"question_type": "rel"},
    ]  # no answer: skipped
    vocab = build_answer_vocab(entries)
    assert vocab == {
        "obj": ["yes", "no", "unknown"],
        "attr": ["red", "unknown"],
        "rel": ["unknown"],
        "global": ["unknown"],
        "cat": ["unknown"],
    }  # by frequency, then alphabetically
    assert build_answer_vocab(entries, split_qa_heads=False) == {"all": ["yes", "no", "red", "unknown"]}
    # the official layout (gqa_answer2id_by_type.json: {"answer_obj": {answer: id}}) round-trips
    path = tmp_path / "gqa_answer2id_by_type.json"
    write_answer_vocab(vocab, path)
    assert json.loads(path.read_text())["answer_obj"] == {"yes": 0, "no": 1, "unknown": 2}
    assert read_answer_vocab(path) == vocab
    unified = tmp_path / "gqa_answer2id.json"
    unified.write_text(json.dumps({"no": 1, "yes": 0, "unknown": 2}))
    assert read_answer_vocab(unified) == {"all": ["yes", "no", "unknown"]}


# ------------------------------------------------------------------------------------------------ metric


def test_accuracy_per_type_and_submission_on_hand_computed_cases():
    ground_truth = {
        "images": [
            {
                "id": 0,
                "questionId": "201",
                "answer": "yes",
                "question_type": "obj",
                "structural_type": "verify",
            },
            {
                "id": 1,
                "questionId": "202",
                "answer": "red",
                "question_type": "attr",
                "structural_type": "query",
            },
            {
                "id": 2,
                "questionId": "203",
                "answer": "blue",
                "question_type": "attr",
                "structural_type": "choose",
            },
            {"id": 3, "questionId": 204, "answer": "table", "answer_type": "rel", "structural_type": "query"},
            # a submission question as the official conversion writes it: answer and type null
            {"id": 4, "questionId": "205", "answer": None, "question_type": None},
        ],
        "annotations": [],
    }
    evaluator = GQAEvaluator(ground_truth)
    evaluator.update({3: "table", 0: "yes", 1: "blue"})
    evaluator.update({2: "blue", 4: "no"})
    summary = evaluator.summarize()
    assert summary["accuracy"] == pytest.approx(3 / 4)
    assert (summary["num_questions"], summary["num_predicted"]) == (4, 5)
    assert summary["per_type"] == {"obj": 1.0, "attr": 0.5, "rel": 1.0}
    assert summary["type_counts"] == {"obj": 1, "attr": 2, "rel": 1}
    assert summary["per_structural_type"] == {"verify": 1.0, "query": 0.5, "choose": 1.0}
    # the submission: every predicted question, in file order, question ids as strings
    assert evaluator.submission() == [
        {"questionId": "201", "prediction": "yes"},
        {"questionId": "202", "prediction": "blue"},
        {"questionId": "203", "prediction": "blue"},
        {"questionId": "204", "prediction": "table"},
        {"questionId": "205", "prediction": "no"},
    ]
    with pytest.raises(ValueError, match="not in the ground truth"):
        evaluator.update({9: "yes"})


# ------------------------------------------------------------------------------------------ real formats


def _image(path, boxes, size=(96, 64)):
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", size, (190, 190, 190))
    draw = ImageDraw.Draw(image)
    for (x, y, w, h), colour in boxes:
        draw.rectangle([x, y, x + w, y + h], fill=colour)
    image.save(path)


def _span(text, words):
    start = text.index(words)
    return [start, start + len(words)]


def test_original_release_converts_with_scene_graph_boxes(tmp_path, tokenizer):
    from mdetr.cli import main

    question = "What color is the small cup on the table?"
    questions = {
        "q1": {
            "imageId": "n10",
            "question": question,
            "answer": "white",
            "isBalanced": True,
            "types": {"structural": "query", "semantic": "attr", "detailed": "colorObj"},
            "annotations": {"question": {"4:6": "101", "8": "102"}, "answer": {}, "fullAnswer": {}},
            "semantic": [{"operation": "select", "dependencies": [], "argument": "table (102)"}],
        },
        # the program selects the table, which no word annotation names; the answer's cup is aligned to "What"
        "q2": {
            "imageId": "n10",
            "question": "What is on the table?",
            "answer": "cup",
            "types": {"structural": "query", "semantic": "rel", "detailed": "relS"},
            "annotations": {"question": {}, "answer": {"0": "101"}, "fullAnswer": {}},
            "semantic": [
                {"operation": "select", "dependencies": [], "argument": "table (102)"},
                {"operation": "relate", "dependencies": [0], "argument": "_,on,s (101)"},
            ],
        },
        "q3": {
            "imageId": "n11",
            "question": "Is it indoors or outdoors?",
            "answer": "indoors",
            "types": {"structural": "choose", "semantic": "global", "detailed": "place"},
            "annotations": {"question": {}, "answer": {}, "fullAnswer": {}},
            "semantic": [],
        },
    }
    graphs = {
        "n10": {
            "width": 96,
            "height": 64,
            "objects": {
                "101": {"name": "cup", "x": 10, "y": 12, "w": 20, "h": 16, "attributes": ["white"]},
                "102": {"name": "table", "x": 2, "y": 30, "w": 90, "h": 30, "attributes": []},
            },
        },
        "n11": {"width": 80, "height": 60, "objects": {}},
    }
    (tmp_path / "questions").mkdir()
    (tmp_path / "sceneGraphs").mkdir()
    questions_file = tmp_path / "questions" / "val_balanced_questions.json"
    questions_file.write_text(json.dumps(questions))
    (tmp_path / "sceneGraphs" / "val_sceneGraphs.json").write_text(json.dumps(graphs))  # found by its name
    _image(tmp_path / "images" / "n10.jpg", [((10, 12, 20, 16), "white"), ((2, 30, 90, 30), "brown")])
    _image(tmp_path / "images" / "n11.jpg", [], size=(80, 60))

    out, vocab_file = tmp_path / "finetune_gqa_val_balanced.json", tmp_path / "vocab.json"
    assert main(["data", "gqa", str(questions_file), str(out), "--vocab", str(vocab_file)]) == 0
    data = json.loads(out.read_text())
    entries = {e["questionId"]: e for e in data["images"]}
    assert entries["q1"] | {"id": 0} == {
        "id": 0,
        "file_name": "n10.jpg",
        "height": 64,
        "width": 96,
        "caption": question,
        "dataset_name": "gqa",
        "tokens_negative": [],
        "original_id": "n10",
        "questionId": "q1",
        "answer": "white",
        "question_type": "attr",
        "structural_type": "query",
        "detailed_type": "colorObj",
    }
    boxes = {}
    for ann in data["annotations"]:
        entry = next(e for e in data["images"] if e["id"] == ann["image_id"])
        boxes[entry["questionId"], ann["original_id"]] = (ann["bbox"], ann["tokens_positive"])
    assert boxes == {
        ("q1", "101"): ([10.0, 12.0, 20.0, 16.0], [_span(question, "small cup")]),
        ("q1", "102"): ([2.0, 30.0, 90.0, 30.0], [_span(question, "table")]),  # "table?" without the "?"
        ("q2", "102"): ([2.0, 30.0, 90.0, 30.0], [_span("What is on the table?", "table")]),
        ("q2", "101"): ([10.0, 12.0, 20.0, 16.0], [[0, 4]]),  # "What"
    }
    vocab = read_answer_vocab(vocab_file)
    assert vocab["attr"] == ["white", "unknown"] and vocab["global"] == ["indoors", "unknown"]

    # both formats read as the same dataset: the original file directly, the converted one as MDETR's
    from mdetr.config import DataConfig

    config = DataConfig(val_size=0)
    direct = build_gqa_dataset(
        config, "val", tokenizer, ann_file=questions_file, image_root=tmp_path / "images"
    )
    converted = build_gqa_dataset(config, "val", tokenizer, ann_file=out, image_root=tmp_path / "images")
    assert len(direct) == len(converted) == 3
    for (_, a), (_, b) in zip((direct[i] for i in range(3)), (converted[i] for i in range(3)), strict=True):
        assert a["caption"] == b["caption"] and a["answer"] == b["answer"]
        assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["positive_map"], b["positive_map"])


def test_shapes_questions_export_in_the_gqa_layout(tmp_path):
    from mdetr.data.shapes import generate_shapes
    from mdetr.data.shapes_qa import GQA_TYPES_OF_FAMILY, export_gqa_format, generate_shapes_qa

    generate_shapes(tmp_path, seed=0, num_train=2, num_val=1, num_val_unseen=1, image_size=64)
    generate_shapes_qa(tmp_path, seed=0, questions_per_scene=5, splits=("train",))
    paths = export_gqa_format(tmp_path, splits=("train",))
    shapes = json.loads((tmp_path / "train_qa.json").read_text())
    exported = read_gqa_file(paths["train"])  # finds gqa/sceneGraphs/train_sceneGraphs.json
    assert [e["answer"] for e in exported["images"]] == [e["answer"] for e in shapes["images"]]
    for original, entry in zip(shapes["images"], exported["images"], strict=True):
        semantic, structural = GQA_TYPES_OF_FAMILY[original["question_type"]]
        assert entry["question_type"] in (semantic, "cat") and entry["structural_type"] == structural
        assert (tmp_path / "gqa" / "images" / entry["file_name"]).is_file()
    # every phrase of a question keeps one of the objects it names, with its box (to the pixel the scene
    # graph rounds to): GQA maps a word range to one object, so a plural phrase keeps one of its objects,
    # and an object two phrases name ("more red things than circles": a red circle) may keep both spans
    for original, entry in zip(shapes["images"], exported["images"], strict=True):
        mine = [a for a in shapes["annotations"] if a["image_id"] == original["id"]]
        theirs = [a for a in exported["annotations"] if a["image_id"] == entry["id"]]
        named = {}
        for a in mine:
            for span in a["tokens_positive"]:
                named.setdefault(tuple(span), set()).add(str(a["object_index"]))
        kept = [tuple(span) for ann in theirs for span in ann["tokens_positive"]]
        assert sorted(kept) == sorted(named)  # each phrase once
        for ann in theirs:
            assert all(ann["original_id"] in named[tuple(span)] for span in ann["tokens_positive"])
            source = next(a for a in mine if str(a["object_index"]) == ann["original_id"])
            assert ann["bbox"] == pytest.approx(source["bbox"], abs=1.0)


# ------------------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def gqa_files(tmp_path_factory):
    """Tiny GQA files as MDETR's conversion writes them (ids from 0, ``info`` and ``categories`` lists,
    ``questionId`` strings; test-dev without boxes; submission with null answers and types, 800 x 400)."""
    root = tmp_path_factory.mktemp("gqa")
    scenes = {
        "n1": [((8, 8, 30, 20), "red"), ((50, 30, 30, 25), "blue")],
        "n2": [((10, 20, 20, 30), "green")],
    }
    for name, boxes in scenes.items():
        _image(root / "images" / f"{name}.jpg", boxes)
    questions = [  # image, question, answer, semantic type, [(object, words)]
        ("n1", "What color is the box?", "red", "attr", [(0, "box")]),
        ("n1", "Is there a ball?", "no", "obj", []),
        ("n1", "What is left of the blue box?", "box", "rel", [(0, "What"), (1, "blue box")]),
        ("n2", "Which room is it?", "kitchen", "global", []),
        ("n2", "What is this object?", "box", "cat", [(0, "What")]),
        ("n2", "What color is the box?", "green", "attr", [(0, "box")]),
    ]
    images, annotations = [], []
    for i, (name, text, answer, kind, objects) in enumerate(questions):
        images.append(
            {
                "file_name": f"{name}.jpg",
                "height": 64,
                "width": 96,
                "id": i,
                "original_id": name,
                "caption": text,
                "tokens_negative": [[0, len(text)]],
                "dataset_name": "gqa",
                "question_type": kind,
                "answer": answer,
                "questionId": str(201 + i),
            }
        )
        for k, words in objects:
            (x, y, w, h), _ = scenes[name][k]
            annotations.append(
                {
                    "area": w * h,
                    "iscrowd": 0,
                    "category_id": 1,
                    "bbox": [x, y, w, h],
                    "tokens_positive": [_span(text, words)],
                    "image_id": i,
                    "id": len(annotations),
                }
            )

    def write(name, entries, anns):
        path = root / name
        path.write_text(
            json.dumps({"info": [], "licenses": [], "images": entries, "annotations": anns, "categories": []})
        )
        return path

    testdev = [dict(e, answer="yellow" if e["id"] == 5 else e["answer"]) for e in images[2:]]  # one unseen
    return {
        "root": root,
        "images": root / "images",
        "train_all": write("finetune_gqa_train_all.json", images, annotations),
        "train_balanced": write(
            "finetune_gqa_train_balanced.json", images[:3], [a for a in annotations if a["image_id"] < 3]
        ),
        "testdev": write("finetune_gqa_testdev_balanced.json", testdev, []),
        "submission": write(
            "finetune_gqa_submission_all.json",
            [dict(e, answer=None, question_type=None, height=400, width=800) for e in images],
            [],
        ),
    }


def _log(run):
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def test_two_phase_training_evaluate_and_submission_through_the_cli(
    gqa_files, roberta_like, one_thread, tmp_path, capsys, monkeypatch
):
    from conftest import tiny_model_overrides

    import mdetr.data.gqa
    from mdetr.builder import load
    from mdetr.cli import main
    from mdetr.data.collate import collate

    reads = []  # which annotation files were parsed: the training file once, for vocabularies and data
    original_read = mdetr.data.gqa.read_annotation_file
    monkeypatch.setattr(mdetr.data.gqa, "read_annotation_file",
                        lambda path, *a, **k: reads.append(Path(path)) or original_read(path, *a, **k))

    config = tmp_path / "gqa.yaml"
    config.write_text("model:\n  qa_dataset: gqa\nloss:\n  qa_loss_coef: 25.0\n")
    images = gqa_files["images"]
    # phase 1: the "all" split, detection and answer losses, scored on test-dev each epoch
    def train(output_dir, train_ann, *overrides):
        args = tiny_model_overrides(roberta_like, output_dir, f"data.train_ann={train_ann}",
                                    f"data.train_images={images}", *overrides)
        assert main(["train", "--config", str(config), "--no-progress", *args]) == 0

    phase1 = tmp_path / "all"
    train(phase1, gqa_files["train_all"], f"data.val_ann={gqa_files['testdev']}", f"data.val_images={images}")
    assert reads.count(Path(gqa_files["train_all"])) == 1
    log = _log(phase1)
    steps = [r for r in log if r["type"] == "train"]
    assert len(steps) == 2  # 6 questions, batch 3
    assert {"loss_ce", "loss_bbox", "loss_answer_type", "loss_answer_attr", "accuracy_answer_total"} <= set(
        steps[0]
    )
    qa = next(r for r in log if r["type"] == "eval")["metrics"]["qa"]
    assert qa["num_questions"] == 4 and 0.0 <= qa["accuracy"] <= 1.0
    assert qa["type_counts"] == {"attr": 1, "rel": 1, "global": 1, "cat": 1}
    answers = json.loads((phase1 / "config.json").read_text())["model"]["qa_answers"]
    assert answers == {
        "obj": ["no", "unknown"],
        "attr": ["green", "red", "unknown"],
        "rel": ["box", "unknown"],
        "global": ["kitchen", "unknown"],
        "cat": ["box", "unknown"],
    }

    # phase 2: the balanced split, answer losses only, from phase 1 (its vocabularies come along)
    phase2 = tmp_path / "balanced"
    train(phase2, gqa_files["train_balanced"], "data.val_ann=", "loss.detection_losses=false",
          f"train.init_weights={phase1 / 'best'}")
    step = next(r for r in _log(phase2) if r["type"] == "train")
    assert "loss_answer_type" in step and not any(
        k.startswith(("loss_ce", "loss_bbox", "loss_giou")) for k in step
    )
    assert json.loads((phase2 / "config.json").read_text())["model"]["qa_answers"] == answers

    # evaluate on test-dev: accuracy overall and per type, as JSON
    capsys.readouterr()
    metrics_file = tmp_path / "metrics.json"
    assert (
        main(
            [
                "evaluate",
                str(phase2 / "last"),
                "--ann",
                str(gqa_files["testdev"]),
                "--images",
                str(images),
                "--output",
                str(metrics_file),
            ]
        )
        == 0
    )
    assert "GQA accuracy" in capsys.readouterr().out
    qa = json.loads(metrics_file.read_text())["qa"]
    assert qa["num_questions"] == 4 and set(qa["per_type"]) == {"attr", "rel", "global", "cat"}
    assert all(0.0 <= v <= 1.0 for v in qa["per_type"].values())

    # the submission file: [{"questionId", "prediction"}] for every question, as the model decodes them
    submission = tmp_path / "submission_predictions.json"
    assert (
        main(
            [
                "evaluate",
                str(phase2 / "last"),
                "--ann",
                str(gqa_files["submission"]),
                "--images",
                str(images),
                "--predictions",
                str(submission),
            ]
        )
        == 0
    )
    assert "none has a ground-truth answer" in capsys.readouterr().out
    records = json.loads(submission.read_text())
    assert [r["questionId"] for r in records] == [str(201 + i) for i in range(6)]
    model = load(phase2 / "last")
    dataset = build_gqa_dataset(
        model.train_config.data, "val", model.tokenizer, ann_file=gqa_files["submission"], image_root=images
    )
    with torch.no_grad():
        for record, sample in zip(records, (dataset[i] for i in range(len(dataset))), strict=True):
            batch = collate([sample])
            qa = model.eval()(batch.images, batch.masks, batch.captions).qa
            kind = TYPES[qa["answer_type"][0].argmax()]
            assert record["prediction"] == answers[kind][qa[f"answer_{kind}"][0].argmax()]

    # predict: the answer with the boxes that support it
    assert (
        main(
            [
                "predict",
                str(phase2 / "last"),
                "--image",
                str(images / "n1.jpg"),
                "--question",
                "What color is the box?",
                "--threshold",
                "0",
                "--top-k",
                "2",
                "--output-dir",
                str(tmp_path / "pred"),
            ]
        )
        == 0
    )
    assert "supporting boxes: 2" in capsys.readouterr().out
    record = json.loads((tmp_path / "pred" / "predictions.json").read_text())[0]
    assert record["answer_type"] in TYPES and record["answer"] in answers[record["answer_type"]]
    assert len(record["detections"]) == 2 and 0.0 < record["confidence"] <= 1.0


def test_a_checkpoint_without_vocabularies_takes_the_official_answer_file(
    gqa_files, roberta_like, one_thread, tmp_path
):
    from mdetr.builder import build_model, load
    from mdetr.config import Config, ConfigError, DataConfig, ModelConfig
    from mdetr.engine.checkpoint import save_checkpoint
    from mdetr.engine.gqa import evaluate_gqa_file

    # a converted official GQA checkpoint: the released head sizes, no model.qa_answers
    model_config = ModelConfig(
        qa_dataset="gqa",
        contrastive_align=False,
        backbone="resnet18",
        backbone_pretrained=False,
        text_encoder=roberta_like,
        hidden_dim=32,
        nheads=4,
        enc_layers=1,
        dec_layers=2,
        dim_feedforward=64,
        num_queries=4,
    )
    config = Config(model=model_config, data=DataConfig(val_size=0, max_size=96))
    save_checkpoint(tmp_path / "official", model=build_model(model_config), config=config.to_dict())
    sizes = {"obj": 3, "attr": 403, "rel": 1594, "global": 111, "cat": 678}
    vocab = {k: [f"{k}{i}" for i in range(n - 1)] + ["unknown"] for k, n in sizes.items()}
    vocab["attr"][0], vocab["global"][0] = "red", "kitchen"
    answers_file = tmp_path / "gqa_answer2id_by_type.json"
    answers_file.write_text(
        json.dumps({f"answer_{k}": {a: i for i, a in enumerate(v)} for k, v in vocab.items()})
    )
    model = load(tmp_path / "official")
    with pytest.raises(ValueError, match="model.qa_answers"):  # no vocabulary, no words
        decode_gqa_answers(_qa_logits(1, vocab), {})
    submission = tmp_path / "testdev_predictions.json"
    metrics = evaluate_gqa_file(
        model,
        gqa_files["testdev"],
        gqa_files["images"],
        answers_file=answers_file,
        predictions_file=submission,
    )
    assert metrics["qa"]["num_questions"] == 4
    assert all(
        r["prediction"] in {a for v in vocab.values() for a in v} for r in json.loads(submission.read_text())
    )
    vocab["obj"].append("maybe")  # one answer too many for the released obj head (3 classes)
    answers_file.write_text(
        json.dumps({f"answer_{k}": {a: i for i, a in enumerate(v)} for k, v in vocab.items()})
    )
    with pytest.raises(ConfigError, match="sizes"):
        evaluate_gqa_file(
            load(tmp_path / "official"), gqa_files["testdev"], gqa_files["images"], answers_file=answers_file
        )

    # mdetr predict --question on the same checkpoint: refused with what to give, then answered with --answers
    from mdetr.cli import main

    vocab["obj"].pop()
    answers_file.write_text(
        json.dumps({f"answer_{k}": {a: i for i, a in enumerate(v)} for k, v in vocab.items()})
    )
    image = sorted(p for p in Path(gqa_files["images"]).rglob("*") if p.is_file())[0]
    question = ["predict", str(tmp_path / "official"), "--image", str(image), "--question", "what is red?"]
    with pytest.raises(SystemExit):
        main([*question, "--output-dir", str(tmp_path / "p0")])
    assert main([*question, "--answers", str(answers_file), "--output-dir", str(tmp_path / "p1")]) == 0
    record = json.loads((tmp_path / "p1" / "predictions.json").read_text())[0]
    assert record["answer"] in {a for v in vocab.values() for a in v}
