"""The CLEVR family (MDETR Section 4.4, Table 1): CLEVR question answering, CLEVR-Humans, CoGenT A/B and
CLEVR-Ref+ with the is-final head. Question families from the programs, accuracy per family and the
CLEVR-Ref+ precision on hand-computed cases, the is-final BCE against a direct computation, and tiny
train -> evaluate -> predict runs through the CLI on files in the official formats: MDETR's converted
``clevr_annotations`` (``tokens`` spans, ``isfinal``) and the original question files."""

import json

import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from mdetr.data.clevr import FAMILIES, clevr_question_family, write_clevr_predictions
from mdetr.engine.clevr_ref import score_clevr_ref
from mdetr.engine.qa import score_answers
from mdetr.losses.criterion import SetCriterion, weight_dict
from mdetr.models.heads import CLEVR_ATTRIBUTES
from mdetr.models.mdetr import MDETROutput


def _program(*functions):
    return [
        {"function": f, "inputs": [i - 1] if i else [], "value_inputs": []} for i, f in enumerate(functions)
    ]


def test_question_family_comes_from_the_last_function_of_the_program():
    cases = {
        "count": _program("scene", "filter_color", "count"),
        "exist": _program("scene", "filter_shape", "exist"),
        "compare_number": _program("scene", "count", "scene", "count", "less_than"),
        "query_attribute": _program("scene", "filter_size", "unique", "query_material"),
        "compare_attribute": _program("scene", "unique", "query_color", "scene", "unique", "equal_shape"),
    }
    for family, program in cases.items():
        assert clevr_question_family(program) == family
    assert clevr_question_family(_program("scene", "equal_integer")) == "compare_number"
    assert (
        clevr_question_family([{"type": "greater_than", "inputs": []}]) == "compare_number"
    )  # generator key
    assert clevr_question_family(None) == clevr_question_family([]) == "unknown"  # CLEVR-Humans: no program
    assert list(FAMILIES) == list(cases)  # the order of the paper's table


def test_accuracy_per_family_on_hand_computed_cases():
    # a converted questions file: the family from the program (or question_type), no boxes
    ground_truth = {
        "images": [
            {"id": 1, "answer": "3", "program": _program("scene", "count")},
            {"id": 2, "answer": "yes", "program": _program("scene", "exist")},
            {
                "id": 3,
                "answer": "no",
                "program": _program("scene", "count", "scene", "count", "greater_than"),
            },
            {"id": 4, "answer": "metal", "question_type": "query_attribute"},
            {"id": 5, "answer": "yes", "program": _program("scene", "unique", "equal_size")},
            {"id": 6, "answer": "2", "program": _program("scene", "count")},
            {"id": 7, "program": _program("scene", "count")},  # a test question: no answer, not scored
        ],
        "annotations": [],
    }
    predicted = {1: "3", 2: "no", 3: "no", 4: "metal", 5: "yes", 6: "3", 7: "4"}
    summary = score_answers(
        ground_truth, {i: {"answer": a} for i, a in predicted.items()}, attributes=CLEVR_ATTRIBUTES
    )
    assert "box_ap" not in summary  # nothing to score boxes against
    qa = summary["qa"]
    assert qa["accuracy"] == pytest.approx(4 / 6) and qa["num_questions"] == 6
    assert qa["per_family"] == {
        "count": 0.5,
        "exist": 0.0,
        "compare_number": 1.0,
        "query_attribute": 1.0,
        "compare_attribute": 1.0,
    }
    assert list(qa["per_family"]) == list(FAMILIES)
    assert qa["family_counts"] == {
        "count": 2,
        "exist": 1,
        "compare_number": 1,
        "query_attribute": 1,
        "compare_attribute": 1,
    }
    assert qa["per_answer_type"] == {"binary": 2 / 3, "attribute": 1.0, "count": 0.5}


def test_prediction_file_has_one_answer_per_line_in_question_order(tmp_path):
    ground_truth = {
        "images": [
            {"id": 1, "questionId": 10},
            {"id": 2, "questionId": 9},
            {"id": 3, "questionId": 2},
            {"id": 4, "questionId": 11},
        ]
    }
    path = tmp_path / "test_predictions.txt"
    assert write_clevr_predictions(path, ground_truth, {1: "yes", 2: "cube", 3: "0", 4: "no"}) == 4
    assert path.read_text() == "0\ncube\nyes\nno\n"  # questionId 2, 9, 10, 11 (numeric order)


def test_isfinal_loss_is_the_bce_of_the_matched_queries():
    torch.manual_seed(0)
    isfinal = torch.tensor([[[0.7], [-1.2], [2.0]]])  # (B, Q, 1)
    outputs = MDETROutput(
        pred_logits=torch.randn(1, 3, 8),
        pred_boxes=torch.rand(1, 3, 4) * 0.5 + 0.25,
        proj_queries=None,
        proj_tokens=None,
        text_padding_mask=torch.zeros(1, 5, dtype=torch.bool),
        pred_isfinal=isfinal,
    )
    positive = torch.zeros(3, 8, dtype=torch.bool)
    positive[:, 1] = True
    targets = [
        {
            "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.3, 0.3, 0.1, 0.1], [0.6, 0.4, 0.2, 0.3]]),
            "positive_map": positive,
            "isfinal": torch.tensor([1.0, 0.0, 0.0]),
        }
    ]

    def matcher(*_):  # query 2 <-> box 0 (final), query 0 <-> box 1, query 1 <-> box 2
        return [(torch.tensor([2, 0, 1]), torch.tensor([0, 1, 2]))]

    from mdetr.config import LossConfig

    losses = SetCriterion(matcher=matcher, config=LossConfig(), num_token_slots=8)(outputs, targets)
    logits, wanted = torch.tensor([2.0, 0.7, -1.2]), torch.tensor([1.0, 0.0, 0.0])
    expected = F.binary_cross_entropy_with_logits(logits, wanted, reduction="sum") / 3  # / num_boxes
    assert losses["loss_isfinal"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert losses["accuracy_isfinal"].item() == pytest.approx(2 / 3)  # query 0 (0.7 > 0) is wrong
    weights = weight_dict(LossConfig(isfinal_coef=1.0), num_aux=2, isfinal=True)
    assert weights["loss_isfinal"] == weights["loss_isfinal_0"] == weights["loss_isfinal_1"] == 1.0
    assert "loss_isfinal" not in weight_dict(LossConfig(), num_aux=0)


def test_clevr_ref_precision_ranks_by_the_referring_score():
    ground_truth = {
        "images": [
            {"id": 0, "caption": "the cube left of the sphere"},
            {"id": 1, "caption": "the cube"},
            {"id": 2, "caption": "the cubes"},
        ],
        "annotations": [
            {"id": 0, "image_id": 0, "bbox": [10, 10, 20, 20], "isfinal": 1},
            {"id": 1, "image_id": 0, "bbox": [50, 10, 20, 20], "isfinal": 0},
            {"id": 2, "image_id": 1, "bbox": [5, 5, 10, 10], "isfinal": 1},
            {"id": 3, "image_id": 2, "bbox": [5, 5, 10, 10], "isfinal": 1},  # two final boxes:
            {"id": 4, "image_id": 2, "bbox": [40, 5, 10, 10], "isfinal": 1},
        ],
    }  # not scored
    far, cube, sphere = [90.0, 90.0, 99.0, 99.0], [10.0, 10.0, 30.0, 30.0], [50.0, 10.0, 70.0, 30.0]
    predictions = {
        # by 1 - p(no object) the sphere ranks first; by x p(final) the cube does: P@1 hit
        0: {
            "boxes": torch.tensor([far, cube, sphere]),
            "scores": torch.tensor([0.9, 0.5, 0.95]),
            "scores_refexp": torch.tensor([0.2, 0.45, 0.1]),
        },
        # the final box second: P@1 miss, P@5 hit
        1: {
            "boxes": torch.tensor([far, [5.0, 5.0, 15.0, 15.0]]),
            "scores": torch.tensor([0.9, 0.8]),
            "scores_refexp": torch.tensor([0.5, 0.4]),
        },
        2: {
            "boxes": torch.tensor([far]),
            "scores": torch.tensor([0.9]),
            "scores_refexp": torch.tensor([0.9]),
        },
    }
    summary = score_clevr_ref(ground_truth, predictions)
    refexp = summary["refexp"]
    assert refexp["overall"] == {"P@1": 0.5, "P@5": 1.0, "P@10": 1.0}
    assert refexp["clevrref"] == refexp["overall"]  # the official evaluator's name
    assert (refexp["num_evaluated"], refexp["num_skipped"]) == (2, 1)
    assert 0.0 <= summary["box_ap"]["AP50"] <= 1.0
    # data.refexp_datasets limits precision@k to the entries of the named datasets
    ground_truth["images"][0]["dataset_name"] = "relations"
    only = score_clevr_ref(ground_truth, predictions, dataset_names=["relations"])["refexp"]
    assert only["overall"] == {"P@1": 1.0, "P@5": 1.0, "P@10": 1.0} and only["num_evaluated"] == 1


# ------------------------------------------------------------------------------------------ real formats

SCENES = [[((6, 10, 16, 16), "red"), ((40, 20, 18, 18), "blue")], [((10, 8, 20, 20), "green")]]
QUESTIONS = [  # scene, question, answer, program, [(object, words)]
    (0, "is there a red cube?", "yes", _program("scene", "filter_color", "exist"), [(0, "red cube")]),
    (
        0,
        "how many blue things are there?",
        "1",
        _program("scene", "filter_color", "count"),
        [(1, "blue things")],
    ),
    (
        0,
        "what color is the cube?",
        "red",
        _program("scene", "filter_shape", "unique", "query_color"),
        [(0, "cube")],
    ),
    (
        1,
        "are there more cubes than spheres?",
        "yes",
        _program("scene", "filter_shape", "count", "scene", "filter_shape", "count", "greater_than"),
        [(0, "cubes")],
    ),
    (
        1,
        "is the cube the same size as the ball?",
        "no",
        _program("scene", "filter_shape", "unique", "scene", "filter_shape", "unique", "equal_size"),
        [(0, "cube")],
    ),
    (1, "what shape is it?", "cube", _program("scene", "unique", "query_shape"), [(0, "it")]),
]
REFEXPS = [  # scene, expression, [(object, words, isfinal)]
    (0, "the red cube left of the blue ball", [(0, "red cube", 1), (1, "blue ball", 0)]),
    (0, "the blue ball", [(1, "blue ball", 1)]),
    (1, "the green cube", [(0, "green cube", 1)]),
    (0, "the cubes and balls", [(0, "cubes", 1), (1, "balls", 1)]),  # two final boxes: not scored
]


def _span(text, words):
    start = text.index(words)
    return [start, start + len(words)]


def _write_images(folder):
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for index, boxes in enumerate(SCENES):
        image = Image.new("RGB", (72, 48), (128, 128, 128))
        draw = ImageDraw.Draw(image)
        for (x, y, w, h), colour in boxes:
            draw.rectangle([x, y, x + w, y + h], fill=colour)
        names.append(f"CLEVR_{folder.name}_{index:06d}.png")
        image.save(folder / names[-1])
    return names


def _mdetr_file(path, names, records, *, qa):
    """A file as ``scripts/clevr/clevr_to_coco.py`` / ``refclevr_to_coco.py`` write it: ids from 0, 480x320
    sizes replaced by the images' own, ``tokens`` spans, ``isfinal`` for CLEVR-Ref+."""
    images, annotations = [], []
    for i, record in enumerate(records):
        scene, text = record[0], record[1]
        entry = {"file_name": names[scene], "height": 48, "width": 72, "id": i, "caption": text}
        if qa:
            entry["answer"] = record[2]
        images.append(entry)
        for obj, words, *final in record[-1]:
            (x, y, w, h), _ = SCENES[scene][obj]
            ann = {
                "area": w * h,
                "iscrowd": 0,
                "image_id": i,
                "category_id": 1,
                "id": len(annotations),
                "bbox": [x, y, w, h],
                "tokens": [_span(text, words)],
            }
            if final:
                ann["isfinal"] = final[0]
            annotations.append(ann)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps(
            {
                "info": [],
                "licenses": [],
                "images": images,
                "annotations": annotations,
                "categories": [{"supercategory": "object", "id": 1, "name": "object"}],
            }
        )
    )
    return path


def _questions_file(path, names, split, *, programs=True, answers=True):
    """A question file of the original release (CLEVR v1.0, CoGenT, or CLEVR-Humans without programs)."""
    questions = []
    for i, (scene, text, answer, program, _) in enumerate(QUESTIONS):
        question = {
            "image_index": scene,
            "image_filename": names[scene],
            "split": split,
            "question": text,
            "question_index": 100 + i,
        }
        if answers:
            question["answer"] = answer
            if programs:
                question.update(program=program, question_family_index=i)
        questions.append(question)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"info": {"split": split, "version": "1.0"}, "questions": questions}))
    return path


@pytest.fixture(scope="module")
def clevr_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("clevr")
    names = {
        split: _write_images(root / "images" / split)
        for split in ("train", "val", "test", "trainA", "valA", "valB", "testB")
    }
    files = {"root": root, "images": root / "images"}
    for split in ("train", "val"):
        files[f"medium_{split}"] = _mdetr_file(
            root / "medium" / f"{split}.json", names[split], QUESTIONS[:3], qa=True
        )
        files[f"full_{split}"] = _mdetr_file(
            root / "full" / f"{split}.json", names[split], QUESTIONS, qa=True
        )
        files[f"ref_{split}"] = _mdetr_file(
            root / "clevrref" / f"{split}.json", names[split], REFEXPS, qa=False
        )
        files[f"humans_{split}"] = _questions_file(
            root / "CLEVR-Humans" / f"CLEVR-Humans-{split}.json", names[split], split, programs=False
        )
        files[f"questions_{split}"] = _questions_file(
            root / "questions" / f"CLEVR_{split}_questions.json", names[split], split
        )
    files["questions_test"] = _questions_file(
        root / "questions" / "CLEVR_test_questions.json", names["test"], "test", answers=False
    )
    # CoGenT: MDETR's converted condition-A files read their images from {split}A
    files["cogent_train"] = _mdetr_file(
        root / "cogent_full" / "train.json", names["trainA"], QUESTIONS, qa=True
    )
    for split in ("valA", "valB"):
        files[f"cogent_{split}"] = _questions_file(
            root / "CoGenT" / f"CLEVR_{split}_questions.json", names[split], split
        )
    files["cogent_testB"] = _questions_file(
        root / "CoGenT" / "CLEVR_testB_questions.json", names["testB"], "testB", answers=False
    )
    return files


def _train(config_text, tmp_path, name, text_encoder, *extra):
    from conftest import tiny_model_overrides

    from mdetr.cli import main

    config = tmp_path / f"{name}.yaml"
    config.write_text(config_text)
    run = tmp_path / name
    assert (
        main(
            [
                "train",
                "--config",
                str(config),
                "--no-progress",
                *tiny_model_overrides(text_encoder, run, "data.batch_size=2", *extra),
            ]
        )
        == 0
    )
    return run, [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def _evaluate(checkpoint, ann, images, tmp_path, *extra):
    from mdetr.cli import main

    output = tmp_path / f"metrics_{ann.stem}.json"
    assert (
        main(
            [
                "evaluate",
                str(checkpoint),
                "--ann",
                str(ann),
                "--images",
                str(images),
                "--output",
                str(output),
                *extra,
            ]
        )
        == 0
    )
    return json.loads(output.read_text())


def _qa_predict(checkpoint, image, question, out_dir, capsys):
    from mdetr.cli import main
    from mdetr.losses.qa import encode_clevr_answer

    capsys.readouterr()
    assert (
        main(
            [
                "predict",
                str(checkpoint),
                "--image",
                str(image),
                "--question",
                question,
                "--threshold",
                "0",
                "--top-k",
                "2",
                "--output-dir",
                str(out_dir),
            ]
        )
        == 0
    )
    assert "supporting boxes: 2" in capsys.readouterr().out
    record = json.loads((out_dir / "predictions.json").read_text())[0]
    assert record["question"] == question and len(record["detections"]) == 2
    assert (
        record["answer_type"]
        == ("binary", "attribute", "count")[encode_clevr_answer(record["answer"]).answer_type]
    )
    return record


def test_clevr_curriculum_evaluate_and_predict_through_the_cli(
    clevr_files, roberta_like, one_thread, tmp_path, capsys
):
    images = clevr_files["images"]
    # step 1: CLEVR-Medium, detection only
    step1, log = _train(
        "model:\n  num_queries: 4\n",
        tmp_path,
        "step1",
        roberta_like,
        f"data.train_ann={clevr_files['medium_train']}",
        f"data.train_images={images / 'train'}",
        f"data.val_ann={clevr_files['medium_val']}",
        f"data.val_images={images / 'val'}",
    )
    assert not any(k.startswith("loss_answer") for r in log if r["type"] == "train" for k in r)
    # step 2: full CLEVR with the answer heads (new on top of step 1), scored per family on the question file
    step2, log = _train(
        "model:\n  qa_dataset: clevr\n",
        tmp_path,
        "step2",
        roberta_like,
        f"data.train_ann={clevr_files['full_train']}",
        f"data.train_images={images / 'train'}",
        f"data.val_ann={clevr_files['questions_val']}",
        f"data.val_images={images / 'val'}",
        f"train.init_weights={step1 / 'best'}",
        "train.init_allow_new_heads=true",
    )
    steps = [r for r in log if r["type"] == "train"]
    assert len(steps) == 3 and {"loss_ce", "loss_answer_type", "loss_answer_binary"} <= set(steps[0])
    qa = next(r for r in log if r["type"] == "eval")["metrics"]["qa"]
    assert qa["family_counts"] == {
        "count": 1,
        "exist": 1,
        "compare_number": 1,
        "query_attribute": 2,
        "compare_attribute": 1,
    }

    # evaluate: on the MDETR file (answers and box AP), on the question file (per family) and its predictions
    metrics = _evaluate(step2 / "best", clevr_files["full_val"], images / "val", tmp_path)
    assert metrics["qa"]["num_questions"] == 6 and 0.0 <= metrics["box_ap"]["AP50"] <= 1.0
    predictions = tmp_path / "val_predictions.txt"
    metrics = _evaluate(
        step2 / "best",
        clevr_files["questions_val"],
        images / "val",
        tmp_path,
        "--predictions",
        str(predictions),
    )
    qa = metrics["qa"]
    assert list(qa["per_family"]) == list(FAMILIES) and all(
        0.0 <= v <= 1.0 for v in qa["per_family"].values()
    )
    lines = predictions.read_text().splitlines()
    truth = [q[2] for q in QUESTIONS]
    assert qa["accuracy"] == pytest.approx(sum(p == t for p, t in zip(lines, truth, strict=True)) / 6)
    # the test split has no answers: every question is still answered, in question order
    test_predictions = tmp_path / "test_predictions.txt"
    metrics = _evaluate(
        step2 / "best",
        clevr_files["questions_test"],
        images / "test",
        tmp_path,
        "--predictions",
        str(test_predictions),
    )
    assert metrics["qa"]["num_questions"] == 0 and len(test_predictions.read_text().splitlines()) == 6

    # predict: the answer decoded by the official rule, with the boxes that support it
    record = _qa_predict(
        step2 / "best", images / "val" / "CLEVR_val_000000.png", QUESTIONS[0][1], tmp_path / "pred", capsys
    )
    assert record["answer"] == lines[0]  # the same model, image and question as the first prediction line


def test_clevr_humans_trains_on_answers_alone(clevr_files, roberta_like, one_thread, tmp_path, capsys):
    images = clevr_files["images"]
    run, log = _train(
        "model:\n  qa_dataset: clevr\nloss:\n  detection_losses: false\n",
        tmp_path,
        "humans",
        roberta_like,
        f"data.train_ann={clevr_files['humans_train']}",
        f"data.train_images={images / 'train'}",
        f"data.val_ann={clevr_files['humans_val']}",
        f"data.val_images={images / 'val'}",
    )
    step = next(r for r in log if r["type"] == "train")
    assert "loss_answer_type" in step and "loss_ce" not in step and "loss_bbox" not in step
    metrics = _evaluate(run / "best", clevr_files["humans_val"], images / "val", tmp_path)
    assert metrics["qa"]["num_questions"] == 6 and metrics["qa"]["family_counts"] == {"unknown": 6}
    assert "box_ap" not in metrics
    _qa_predict(
        run / "best", images / "val" / "CLEVR_val_000001.png", "what shape is it?", tmp_path / "pred", capsys
    )


def test_cogent_trains_on_condition_a_and_evaluates_on_a_and_b(
    clevr_files, roberta_like, one_thread, tmp_path, capsys
):
    images = clevr_files["images"]
    run, _ = _train(
        "model:\n  qa_dataset: clevr\n",
        tmp_path,
        "cogent",
        roberta_like,
        f"data.train_ann={clevr_files['cogent_train']}",
        f"data.train_images={images / 'trainA'}",
        f"data.val_ann={clevr_files['cogent_valA']}",
        f"data.val_images={images / 'valA'}",
    )
    for split in ("valA", "valB"):
        qa = _evaluate(run / "best", clevr_files[f"cogent_{split}"], images / split, tmp_path)["qa"]
        assert qa["num_questions"] == 6 and set(qa["per_family"]) == set(FAMILIES)
    predictions = tmp_path / "testB_predictions.txt"
    _evaluate(
        run / "best",
        clevr_files["cogent_testB"],
        images / "testB",
        tmp_path,
        "--predictions",
        str(predictions),
    )
    assert len(predictions.read_text().splitlines()) == 6
    _qa_predict(
        run / "best",
        images / "valB" / "CLEVR_valB_000000.png",
        "is there a red cube?",
        tmp_path / "pred",
        capsys,
    )


def test_clevr_ref_trains_the_isfinal_head_and_ranks_by_it(clevr_files, roberta_like, one_thread, tmp_path):
    from mdetr.cli import main
    from mdetr.inference.predictor import Predictor

    images = clevr_files["images"]
    run, log = _train(
        "model:\n  predict_final: true\n",
        tmp_path,
        "ref",
        roberta_like,
        f"data.train_ann={clevr_files['ref_train']}",
        f"data.train_images={images / 'train'}",
        f"data.val_ann={clevr_files['ref_val']}",
        f"data.val_images={images / 'val'}",
    )
    step = next(r for r in log if r["type"] == "train")
    assert {"loss_isfinal", "accuracy_isfinal", "loss_ce", "loss_bbox"} <= set(step)
    evaluation = next(r for r in log if r["type"] == "eval")
    assert "P@1" in evaluation and evaluation["metrics"]["refexp"]["num_skipped"] == 1

    metrics = _evaluate(run / "best", clevr_files["ref_val"], images / "val", tmp_path)
    refexp = metrics["refexp"]
    assert (refexp["num_evaluated"], refexp["num_skipped"]) == (3, 1)
    assert all(0.0 <= refexp["overall"][k] <= 1.0 for k in ("P@1", "P@5", "P@10"))
    assert refexp["overall"]["P@1"] <= refexp["overall"]["P@5"] <= refexp["overall"]["P@10"]

    # predict: the boxes ranked by the referring score, (1 - p(no object)) x sigmoid(is-final)
    image, text = images / "val" / "CLEVR_val_000000.png", REFEXPS[1][1]
    assert (
        main(
            [
                "predict",
                str(run / "best"),
                "--image",
                str(image),
                "--text",
                text,
                "--threshold",
                "0",
                "--output-dir",
                str(tmp_path / "pred"),
            ]
        )
        == 0
    )
    detections = json.loads((tmp_path / "pred" / "predictions.json").read_text())[0]["detections"]
    predictor = Predictor.from_checkpoint(run / "best")  # resizes as the CLI does
    model = predictor.model.eval()
    inputs = predictor.processor([Image.open(image).convert("RGB")], [text])
    with torch.no_grad():
        outputs = model(inputs["pixel_values"], inputs["pixel_mask"], inputs["captions"])
    referring = (1 - outputs.pred_logits.softmax(-1)[0, :, -1]) * outputs.pred_isfinal[0, :, 0].sigmoid()
    assert [d["score"] for d in detections] == pytest.approx(
        sorted(referring.tolist(), reverse=True), abs=1e-3
    )


def test_shapes_questions_export_in_the_clevr_layout(tmp_path, tokenizer):
    from mdetr.config import DataConfig
    from mdetr.data.build import build_dataset
    from mdetr.data.clevr import ClevrQuestions
    from mdetr.data.shapes import generate_shapes
    from mdetr.data.shapes_qa import export_clevr_format, generate_shapes_qa

    generate_shapes(tmp_path, seed=0, num_train=2, num_val=1, num_val_unseen=1, image_size=64)
    generate_shapes_qa(tmp_path, seed=0, questions_per_scene=5, splits=("val",))
    path = export_clevr_format(tmp_path, splits=("val",))["val"]
    dataset = build_dataset(
        DataConfig(val_size=0), "val", tokenizer, ann_file=path, image_root=tmp_path / "images" / "val"
    )
    assert isinstance(dataset, ClevrQuestions)
    shapes = json.loads((tmp_path / "val_qa.json").read_text())["images"]
    read = dataset.ground_truth["images"]
    assert [(e["caption"], e["answer"], e["question_type"]) for e in read] == [
        (e["caption"], e["answer"], e["question_type"]) for e in shapes
    ]  # families recovered from programs
    assert all((e["width"], e["height"]) == (64, 64) for e in read)  # from the image headers
    image, target = dataset[0]
    assert target["answer"] == shapes[0]["answer"] and len(target["boxes"]) == 0
