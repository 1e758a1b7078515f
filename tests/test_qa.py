"""CLEVR-style question answering: the official QA loss, answer encoding, accuracy, the shapes question
generator (answers re-derived by brute force) and a tiny train -> evaluate -> predict run via the CLI."""

import json
import math

import numpy as np
import pytest
import torch

from mdetr.builder import build
from mdetr.config import Config, ConfigError, LossConfig, ModelConfig
from mdetr.data.shapes import COLORS, MATERIALS, SHAPES, SIZES, ShapeObject
from mdetr.data.shapes_qa import (
    ATTRIBUTES,
    COMPARISONS,
    FAMILIES,
    SHAPES_QA_ATTRIBUTES,
    YES_NO_FAMILIES,
    generate_shapes_qa,
    make_question,
    scene_questions,
)
from mdetr.engine.qa import qa_accuracy
from mdetr.losses.criterion import total_loss
from mdetr.losses.qa import (
    ClevrQACriterion,
    GQAQACriterion,
    answer_targets,
    decode_clevr_answers,
    encode_clevr_answer,
    qa_weight_dict,
)
from mdetr.models.heads import CLEVR_ATTRIBUTES, answer_head_specs


def _log_softmax(row):
    m = max(row)
    lse = m + math.log(sum(math.exp(v - m) for v in row))
    return [v - lse for v in row]


def _bce(logit, target):
    p = 1 / (1 + math.exp(-logit))
    return -(target * math.log(p) + (1 - target) * math.log(1 - p))


def test_clevr_qa_loss_matches_a_hand_computation():
    torch.manual_seed(0)
    answers = ["yes", "no", "cylinder", "3", "7", "red"]
    qa = {"answer_type": torch.randn(6, 3), "answer_binary": torch.randn(6),
          "answer_attr": torch.randn(6, 15), "answer_reg": torch.randn(6, 20)}
    losses = ClevrQACriterion()(qa, answer_targets(answers))

    types = [0, 0, 1, 2, 2, 1]
    rows = {k: v.tolist() for k, v in qa.items()}
    type_ce = sum(-_log_softmax(rows["answer_type"][i])[t] for i, t in enumerate(types)) / 6
    binary = (_bce(rows["answer_binary"][0], 1.0) + _bce(rows["answer_binary"][1], 0.0)) / 2
    attr = (-_log_softmax(rows["answer_attr"][2])[CLEVR_ATTRIBUTES.index("cylinder")]
            - _log_softmax(rows["answer_attr"][5])[CLEVR_ATTRIBUTES.index("red")]) / 2
    reg = (-_log_softmax(rows["answer_reg"][3])[3] - _log_softmax(rows["answer_reg"][4])[7]) / 2
    assert losses["loss_answer_type"].item() == pytest.approx(type_ce, rel=1e-5)
    assert losses["loss_answer_binary"].item() == pytest.approx(binary, rel=1e-5)
    assert losses["loss_answer_attr"].item() == pytest.approx(attr, rel=1e-5)
    assert losses["loss_answer_reg"].item() == pytest.approx(reg, rel=1e-5)

    # accuracy_answer_total: type right AND the type's head right
    predicted = decode_clevr_answers(qa)
    assert losses["accuracy_answer_total"].item() == pytest.approx(
        sum(p == a for p, a in zip(predicted, answers, strict=True)) / 6)
    # the official weights: type loss qa_loss_coef, the per-type losses 1
    assert qa_weight_dict(25.0) == {"loss_answer_type": 25.0, "loss_answer_binary": 1.0,
                                    "loss_answer_attr": 1.0, "loss_answer_reg": 1.0}


def test_type_without_questions_contributes_zero_and_accuracy_one():
    qa = {"answer_type": torch.randn(2, 3), "answer_binary": torch.randn(2),
          "answer_attr": torch.randn(2, 15), "answer_reg": torch.randn(2, 20)}
    losses = ClevrQACriterion()(qa, answer_targets(["2", "0"]))
    assert losses["loss_answer_binary"].item() == 0.0 and losses["loss_answer_attr"].item() == 0.0
    assert losses["accuracy_answer_binary"].item() == 1.0 and losses["accuracy_answer_attr"].item() == 1.0


def test_answer_encoding_and_decoding_follow_the_official_rule():
    assert encode_clevr_answer("yes").answer_type == 0 and encode_clevr_answer("yes").binary == 1.0
    assert encode_clevr_answer("no").binary == 0.0
    assert encode_clevr_answer("metal").attribute == 14
    assert encode_clevr_answer("10").count == 10 and encode_clevr_answer("10").attribute == -100
    assert encode_clevr_answer("star", SHAPES_QA_ATTRIBUTES).attribute == SHAPES_QA_ATTRIBUTES.index("star")
    with pytest.raises(ValueError, match="'star' is not yes / no"):
        encode_clevr_answer("star")
    with pytest.raises(ValueError):
        encode_clevr_answer("20")
    qa = {"answer_type": torch.tensor([[5.0, 0, 0], [5.0, 0, 0], [0, 5.0, 0], [0, 0, 5.0]]),
          "answer_binary": torch.tensor([0.3, -0.3, 9.0, 9.0]),
          "answer_attr": torch.nn.functional.one_hot(torch.tensor([0, 0, 3, 0]), 15).float(),
          "answer_reg": torch.nn.functional.one_hot(torch.tensor([0, 0, 0, 4]), 20).float()}
    assert decode_clevr_answers(qa) == ["yes", "no", "red", "4"]


def test_attribute_vocabulary_sets_the_head_size():
    specs = {s.name: s.num_outputs
             for s in answer_head_specs("clevr", qa_attributes=list(SHAPES_QA_ATTRIBUTES))}
    assert specs == {"answer_type": 3, "answer_binary": 1, "answer_reg": 20, "answer_attr": 18}
    assert {s.name: s.num_outputs for s in answer_head_specs("clevr")}["answer_attr"] == 15
    with pytest.raises(ConfigError, match="qa_attributes"):
        ModelConfig(qa_dataset="clevr", qa_attributes=["red", "red"]).validate()


def test_accuracy_on_hand_computed_cases():
    predicted = ["yes", "3", "red", "no", "2", "yes"]
    truth = ["yes", "2", "red", "yes", "2", "yes"]
    families = ["exist", "count", "query_attribute", "compare_number", "count", "compare_attribute"]
    summary = qa_accuracy(predicted, truth, families, attributes=CLEVR_ATTRIBUTES)
    assert summary["accuracy"] == pytest.approx(4 / 6)
    assert summary["num_questions"] == 6
    assert summary["per_family"] == {"count": 0.5, "exist": 1.0, "compare_number": 0.0,
                                     "query_attribute": 1.0, "compare_attribute": 1.0}
    assert list(summary["per_family"]) == list(FAMILIES)
    assert summary["family_counts"]["count"] == 2
    assert summary["per_answer_type"] == {"binary": 2 / 3, "attribute": 1.0, "count": 0.5}
    with pytest.raises(ValueError):
        qa_accuracy(["yes"], ["yes", "no"])


def test_gqa_training_needs_answer_vocabularies_and_says_where_they_come_from():
    from mdetr.engine.gqa import resolve_answer_vocab

    # building the criterion without vocabularies names the setting and how mdetr train fills it
    with pytest.raises(ConfigError, match=r"model\.qa_answers.*data\.train_ann"):
        build(Config(model=ModelConfig(qa_dataset="gqa", backbone_pretrained=False)))
    # the training task, without a training file to build them from, says what to set
    with pytest.raises(ConfigError, match=r"set data\.train_ann .* or model\.qa_answers"):
        resolve_answer_vocab(Config(model=ModelConfig(qa_dataset="gqa")))
    # a malformed vocabulary is refused with the keys it needs
    with pytest.raises(ConfigError, match="must map attr, cat, global, obj, rel"):
        ModelConfig(qa_dataset="gqa", qa_answers={"obj": ["yes"]}).validate()
    # the segmentation model has no answer heads
    with pytest.raises(ConfigError, match="model.masks=true"):
        ModelConfig(qa_dataset="gqa", masks=True, contrastive_align=False).validate()


def test_gqa_training_builds_heads_and_weighted_losses_from_the_vocabularies(roberta_like):
    answers = {"obj": ["yes", "no", "unknown"], "attr": ["red", "unknown"], "rel": ["table", "unknown"],
               "global": ["indoors", "unknown"], "cat": ["fruit", "animal", "unknown"]}
    model_config = ModelConfig(qa_dataset="gqa", qa_answers=answers, backbone="resnet18",
                               backbone_pretrained=False, text_encoder=roberta_like, hidden_dim=32, nheads=4,
                               enc_layers=1, dec_layers=2, dim_feedforward=64, num_queries=4, aux_loss=False)
    model, criterion, weights = build(Config(model=model_config, loss=LossConfig(qa_loss_coef=25.0)))
    sizes = {s.name: s.num_outputs for s in model.answer_specs}
    assert sizes == {"answer_type": 5, "answer_obj": 3, "answer_rel": 2, "answer_attr": 2, "answer_cat": 3,
                     "answer_global": 2}
    assert {k: weights[k] for k in weights if k.startswith("loss_answer")} == {
        f"loss_answer_{k}": 25.0 for k in ("type", "obj", "attr", "rel", "global", "cat")}
    assert weights["loss_ce"] == 1.0  # the detection losses stay (phase 1)
    images = torch.randn(2, 3, 64, 64)
    outputs = model(images, torch.zeros(2, 64, 64, dtype=torch.bool), ["what color is it?", "is it a cube?"])
    positive = torch.zeros(1, 256, dtype=torch.bool)
    positive[0, 1:3] = True
    targets = [{"boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]]), "positive_map": positive, "answer": "red",
                "question_type": "attr"},
               {"boxes": torch.zeros(0, 4), "positive_map": torch.zeros(0, 256, dtype=torch.bool),
                "answer": "maybe", "question_type": "obj"}]  # not in the vocabulary: "unknown"
    losses = criterion(outputs, targets)
    assert {"loss_ce", "loss_bbox", "loss_answer_type", "loss_answer_obj"} <= set(losses)
    expected = torch.nn.functional.cross_entropy(outputs.qa["answer_obj"][1:], torch.tensor([2]))
    assert losses["loss_answer_obj"].item() == pytest.approx(expected.item(), rel=1e-5)
    total_loss(losses, weights).backward()
    assert model.answer_obj_head.weight.grad is not None
    # phase 2: the answer losses alone
    _, qa_only, qa_weights = build(Config(model=model_config, loss=LossConfig(detection_losses=False)))
    assert set(qa_only(outputs, targets)) == set(losses) - {k for k in losses if not k.startswith(
        ("loss_answer", "accuracy_answer"))}
    assert all(k.startswith("loss_answer") for k in qa_weights)


# ------------------------------------------------------------------------------------------ generator

def _brute_force(objects, program):
    """The answer from the scene records alone: an independent re-implementation of each family."""
    def members(filt):
        return [i for i, o in enumerate(objects) if all(o[k] == v for k, v in filt.items())]

    family, filters = program["family"], program["filters"]
    if family == "exist":
        return "yes" if members(filters[0]) else "no"
    if family == "count":
        return str(len(members(filters[0])))
    if family == "compare_number":
        a, b = len(members(filters[0])), len(members(filters[1]))
        return "yes" if {"more": a > b, "fewer": a < b, "equal": a == b}[program["comparison"]] else "no"
    found = [members(f) for f in filters]
    assert all(len(m) == 1 for m in found), "a query / compare description must name one object"
    values = [objects[m[0]][program["attribute"]] for m in found]
    if family == "query_attribute":
        return values[0]
    return "yes" if values[0] == values[1] else "no"


@pytest.fixture(scope="module")
def qa_dir(tmp_path_factory):
    from mdetr.cli import main

    out = tmp_path_factory.mktemp("shapes-qa")
    assert main(["data", "shapes", str(out), "--num-train", "6", "--num-val", "3", "--num-val-unseen", "2",
                 "--image-size", "128", "--qa", "--questions-per-scene", "3"]) == 0
    return out


def test_generator_answers_agree_with_brute_force(qa_dir, tmp_path):
    families, answers = set(), set()
    for split in ("train", "val", "val_unseen"):
        data = json.loads((qa_dir / f"{split}_qa.json").read_text())
        scenes = {s["index"]: s for s in json.loads((qa_dir / f"{split}_scenes.json").read_text())}
        boxes_of = {}
        for ann in data["annotations"]:
            boxes_of.setdefault(ann["image_id"], []).append(ann)
        for entry in data["images"]:
            scene = scenes[entry["original_id"]]
            objects = scene["objects"]
            program = entry["program"]
            assert entry["file_name"] == scene["file_name"]
            assert entry["question_type"] == program["family"]
            assert entry["answer"] == _brute_force(objects, program), entry
            encode_clevr_answer(entry["answer"], SHAPES_QA_ATTRIBUTES)  # in the answer vocabulary
            # the boxes are exactly the objects the question's filters select, each with its own phrase
            expected = set()
            for filt in program["filters"]:
                expected |= {i for i, o in enumerate(objects) if all(o[k] == v for k, v in filt.items())}
            anns = boxes_of.get(entry["id"], [])
            assert {a["object_index"] for a in anns} == expected
            for ann in anns:
                assert ann["bbox"] == objects[ann["object_index"]]["bbox"]
                for beg, end in ann["tokens_positive"]:
                    phrase = entry["caption"][beg:end]
                    obj = objects[ann["object_index"]]
                    named = [w for w in phrase.split()
                             if w.rstrip("s") in (*COLORS, *SHAPES, "small", "large")]
                    assert phrase and all(w.rstrip("s") in (obj["color"], obj["shape"], obj["size"])
                                          for w in named), (phrase, obj)
            families.add(program["family"])
            answers.add(entry["answer"])
    assert families == set(FAMILIES)
    assert {"yes", "no"} <= answers
    # deterministic
    first = (qa_dir / "train_qa.json").read_bytes()
    generate_shapes_qa(qa_dir, seed=0, questions_per_scene=3, splits=("train",))
    assert (qa_dir / "train_qa.json").read_bytes() == first


def test_more_questions_for_the_scenes_already_written(qa_dir, tmp_path, capsys):
    """``mdetr data shapes-qa`` rewrites the chosen splits' questions from the scene files, leaving the
    scenes, images and the other splits' questions as they were."""
    import shutil

    from mdetr.cli import main

    data = tmp_path / "shapes"
    shutil.copytree(qa_dir, data)
    kept = {name: (data / name).read_bytes() for name in ("val_qa.json", "val_unseen_qa.json", "train.json",
                                                          "train_scenes.json")}
    assert main(["data", "shapes-qa", str(data), "--splits", "train", "--questions-per-scene", "5"]) == 0
    assert "train qa:" in capsys.readouterr().out
    assert {name: (data / name).read_bytes() for name in kept} == kept
    questions = json.loads((data / "train_qa.json").read_text())["images"]
    per_scene: dict[int, int] = {}
    for entry in questions:
        per_scene[entry["original_id"]] = per_scene.get(entry["original_id"], 0) + 1
    assert len(per_scene) == 6 and max(per_scene.values()) == 5
    assert len(questions) > 6 * 3  # more than the fixture's three per scene
    written = (data / "train_qa.json").read_bytes()
    generate_shapes_qa(data, seed=0, questions_per_scene=5, splits=("train",))
    assert (data / "train_qa.json").read_bytes() == written  # the library call, byte for byte

    (data / "val_scenes.json").unlink()
    assert main(["data", "shapes-qa", str(data), "--splits", "train", "val"]) != 0
    assert "val_scenes.json not found" in capsys.readouterr().err
    assert (data / "train_qa.json").read_bytes() == written  # nothing rewritten before the error
    with pytest.raises(SystemExit):
        main(["data", "shapes-qa", str(data), "--questions-per-scene", "0"])
    assert "at least 1, got '0'" in capsys.readouterr().err


def _random_scene(rng, n):
    pick = lambda values: values[int(rng.integers(len(values)))]  # noqa: E731
    return [ShapeObject(pick(SHAPES), pick(tuple(COLORS)), pick(SIZES), pick(MATERIALS), 0.1 * i, 0.5, 0.05)
            for i in range(n)]


def _records(objects):
    return [{a: o.attribute(a) for a in ATTRIBUTES} for o in objects]


def test_a_requested_answer_is_given_or_the_scene_cannot_give_it():
    rng = np.random.default_rng(3)
    given = {}
    for _ in range(40):
        objects = _random_scene(rng, int(rng.integers(3, 9)))
        records = _records(objects)
        for family in YES_NO_FAMILIES:
            templates = {"compare_number": COMPARISONS, "compare_attribute": ATTRIBUTES}.get(family, (None,))
            for template in templates:
                for answer in ("yes", "no"):
                    made = make_question(objects, family, rng, answer=answer, template=template)
                    if made is None:
                        continue
                    assert _brute_force(records, made[1]) == answer, made
                    assert template in (None, made[1].get("comparison"), made[1].get("attribute"))
                    given[family, template, answer] = given.get((family, template, answer), 0) + 1
                if family == "compare_attribute":
                    values = [r[template] for r in records]
                    if len(set(values)) == len(values):  # no two objects share it: "the same ...?" is "no"
                        assert make_question(objects, family, rng, answer="yes", template=template) is None
    assert len(given) == 2 * (1 + len(COMPARISONS) + len(ATTRIBUTES))  # every template gave both answers
    with pytest.raises(ValueError, match="answer must be"):
        make_question(_random_scene(rng, 4), "exist", rng, answer="maybe")


def test_every_yes_no_template_is_answer_balanced_over_a_split():
    """Without balancing, "the same colour?" is mostly "no" and "the same size?" mostly "yes" (two of eight
    colours match far less often than two of two sizes): the words alone would give the answer."""
    rng = np.random.default_rng(0)
    answers, tally = {}, {}
    for _ in range(400):
        objects = _random_scene(rng, int(rng.integers(3, 11)))
        for _, answer, program, _ in scene_questions(objects, rng, count=2, answers=answers):
            assert answer == _brute_force(_records(objects), program)
            if program["family"] in YES_NO_FAMILIES:
                key = (program["family"], program.get("comparison") or program.get("attribute") or "")
                tally.setdefault(key, {"yes": 0, "no": 0})[answer] += 1
    assert tally == answers
    assert set(tally) == {("exist", "")} | {("compare_number", c) for c in COMPARISONS} | {
        ("compare_attribute", a) for a in ATTRIBUTES}
    for key, counts in tally.items():
        assert abs(counts["yes"] - counts["no"]) <= 1, (key, counts)
        assert counts["yes"] >= 5, (key, counts)


# ------------------------------------------------------------------------------------------ end to end

def test_train_evaluate_predict_through_the_cli(qa_dir, tmp_path, capsys):
    from conftest import _tiny_overrides

    from mdetr.cli import main

    config = tmp_path / "qa.yaml"
    config.write_text("model:\n  arch: mdetr_lite\n  qa_dataset: clevr\n  qa_attributes: ["
                      + ", ".join(SHAPES_QA_ATTRIBUTES) + "]\n")
    run = tmp_path / "run"
    overrides = _tiny_overrides(qa_dir, run, "train.epochs=1", "data.refexp_datasets=[]",
                                "data.num_workers=0",
                                f"data.train_ann={qa_dir / 'train_qa.json'}",
                                f"data.val_ann={qa_dir / 'val_qa.json'}")
    assert main(["train", "--config", str(config), "--no-progress", *overrides]) == 0
    evals = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    evals = [r for r in evals if r["type"] == "eval"]
    assert evals and "accuracy" in evals[-1]
    qa = evals[-1]["metrics"]["qa"]
    assert set(qa["per_family"]) <= set(FAMILIES) and qa["num_questions"] > 0
    assert (run / "best").is_dir()
    train_record = next(json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()
                        if '"train"' in line)
    qa_losses = {"loss_answer_type", "loss_answer_binary", "loss_answer_attr", "loss_answer_reg"}
    assert qa_losses <= set(train_record)

    capsys.readouterr()
    metrics_file = tmp_path / "metrics.json"
    assert main(["evaluate", str(run / "best"), "--ann", str(qa_dir / "val_qa.json"), "--images",
                 str(qa_dir / "images"), "--output", str(metrics_file)]) == 0
    assert "Answer accuracy" in capsys.readouterr().out
    assert json.loads(metrics_file.read_text())["qa"]["num_questions"] == qa["num_questions"]

    image = qa_dir / "images" / "val" / "000000.png"
    assert main(["predict", str(run / "best"), "--image", str(image), "--question",
                 "how many red things are there?", "--threshold", "0", "--top-k", "2",
                 "--output-dir", str(tmp_path / "pred")]) == 0
    out = capsys.readouterr().out
    assert "answer: " in out and "supporting boxes: 2" in out
    record = json.loads((tmp_path / "pred" / "predictions.json").read_text())[0]
    assert record["question"] == "how many red things are there?"
    encode_clevr_answer(record["answer"], SHAPES_QA_ATTRIBUTES)
    assert len(record["detections"]) == 2


def _split_sums(criterion, qa, encoded, targets, cut):
    """The criterion's losses on rows [:cut] and [cut:], each divided by the counts of all rows, summed."""
    parts = [criterion({k: v[rows] for k, v in qa.items()}, {k: v[rows] for k, v in encoded.items()},
                       group=encoded) for rows in (slice(None, cut), slice(cut, None))]
    return {k: parts[0][k] + parts[1][k] for k in parts[0]}


@pytest.mark.parametrize("head", ["clevr", "gqa_split", "gqa_unified"])
def test_micro_batch_answer_losses_add_up_to_the_whole_batch(head):
    """With the step's question counts (group), the losses and accuracies of two micro-batches sum to those
    of the whole batch, also when a micro-batch has no question of some type; dividing by each micro-batch's
    own counts (the plain call) does not."""
    torch.manual_seed(0)
    if head == "clevr":
        criterion = ClevrQACriterion()
        targets = [{"answer": a} for a in ["yes", "3", "no", "cylinder", "7", "red", "no"]]
        qa = {"answer_type": torch.randn(7, 3), "answer_binary": torch.randn(7),
              "answer_attr": torch.randn(7, 15), "answer_reg": torch.randn(7, 20)}
    else:
        vocab = {"obj": ["yes", "no", "unknown"], "attr": ["red", "unknown"], "rel": ["table", "unknown"],
                 "global": ["indoors", "unknown"], "cat": ["fruit", "animal", "unknown"]}
        if head == "gqa_unified":
            vocab = {"all": ["yes", "no", "red", "table", "fruit"]}  # no "unknown": "maybe" is ignored
        criterion = GQAQACriterion(vocab)
        targets = [{"answer": a, "question_type": t} for a, t in [
            ("yes", "obj"), ("red", "attr"), ("maybe", "obj"), ("table", "rel"), ("fruit", "cat"),
            ("no", "obj"), ("red", "attr")]]
        qa = {"answer_type": torch.randn(7, 5)} if head == "gqa_split" else {"answer": torch.randn(7, 5)}
        for name, answers in vocab.items():
            if name != "all":
                qa[f"answer_{name}"] = torch.randn(7, len(answers))
    encoded = criterion.encode_targets(targets, "cpu")
    whole = criterion(qa, encoded)
    summed = _split_sums(criterion, qa, encoded, targets, cut=2)  # the first part has no count / rel / cat
    assert summed.keys() == whole.keys()
    for key in whole:
        assert summed[key].item() == pytest.approx(whole[key].item(), rel=1e-5, abs=1e-6), key
    plain = [criterion({k: v[r] for k, v in qa.items()}, {k: v[r] for k, v in encoded.items()})
             for r in (slice(None, 2), slice(2, None))]
    losses = [k for k in whole if k.startswith("loss_")]
    assert any(abs((plain[0][k] + plain[1][k]).item() - whole[k].item()) > 1e-3 for k in losses)


def test_accumulated_qa_step_equals_one_batch(qa_dir, tmp_path):
    """accumulate_gradients on a CLEVR-head model: 2 micro-batches give the gradient of one batch of both."""
    from conftest import _tiny_overrides

    from mdetr.config import load_config
    from mdetr.data.build import build_dataset
    from mdetr.data.collate import collate
    from mdetr.engine.distributed import DistributedContext
    from mdetr.engine.train import GroundingTask, accumulate_gradients, seed_everything

    overrides = _tiny_overrides(qa_dir, tmp_path, "data.refexp_datasets=[]", "model.qa_dataset=clevr",
                                f"model.qa_attributes=[{','.join(SHAPES_QA_ATTRIBUTES)}]",
                                f"data.train_ann={qa_dir / 'train_qa.json'}")
    config = load_config(None, overrides)
    seed_everything(0)
    model, criterion, weights = build(config)
    model.eval()  # no dropout: the passes compute the same function
    dataset = build_dataset(config.data, "val", model.tokenizer, ann_file=config.data.train_ann,
                            image_root=config.data.train_images)
    samples = [dataset[i] for i in range(5)]

    def gradients(groups):
        model.zero_grad(set_to_none=True)
        accumulate_gradients(GroundingTask(), model, criterion, weights, [collate(g) for g in groups],
                             ctx=DistributedContext())
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    whole, accumulated = gradients([samples]), gradients([samples[:2], samples[2:]])
    assert whole.keys() == accumulated.keys()
    scale = max(g.abs().max().item() for g in whole.values())
    worst = max((accumulated[n] - whole[n]).abs().max().item() for n in whole)
    assert scale > 0 and worst <= 1e-4 * scale, (worst, scale)
    head = "answer_type_head.weight"
    assert whole[head].abs().max() > 0
