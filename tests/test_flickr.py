"""Flickr30k Entities: the original XML / Sentences format, MDETR's files, Recall@k under both protocols."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from mdetr.data.errors import DataError
from mdetr.data.flickr import (
    FlickrDataset,
    flickr_ann_file,
    flickr_to_mdetr,
    parse_sentence,
    read_annotation_xml,
    read_sentences,
)
from mdetr.eval.flickr import FlickrEvaluator, FlickrGroundTruth, rank_boxes_for_phrases

# Image 1000 (100 x 80): entity 1 ("two men") has two boxes, entity 2 ("green shirts") two boxes, entity 3
# shares its box with entity 2's first one (one <object> naming both), entity 4 has no box, entity 5 is
# the scene. Image 2000 (64 x 48): entity 7 has one box.
MAN_LEFT, MAN_RIGHT = (10.0, 10.0, 40.0, 60.0), (50.0, 10.0, 80.0, 60.0)
MEN_MERGED = (10.0, 10.0, 80.0, 60.0)
SHIRT_LEFT, SHIRT_RIGHT = (12.0, 20.0, 38.0, 40.0), (52.0, 20.0, 78.0, 40.0)
DOG = (4.0, 8.0, 44.0, 40.0)

XML_1000 = """<annotation>
\t<filename>1000.jpg</filename>
\t<size>
\t\t<width>100</width>
\t\t<height>80</height>
\t\t<depth>3</depth>
\t</size>
\t<object>
\t\t<name>1</name>
\t\t<bndbox>
\t\t\t<xmin>10</xmin>
\t\t\t<ymin>10</ymin>
\t\t\t<xmax>40</xmax>
\t\t\t<ymax>60</ymax>
\t\t</bndbox>
\t</object>
\t<object>
\t\t<name>1</name>
\t\t<bndbox>
\t\t\t<xmin>50</xmin>
\t\t\t<ymin>10</ymin>
\t\t\t<xmax>80</xmax>
\t\t\t<ymax>60</ymax>
\t\t</bndbox>
\t</object>
\t<object>
\t\t<name>2</name>
\t\t<name>3</name>
\t\t<bndbox>
\t\t\t<xmin>12</xmin>
\t\t\t<ymin>20</ymin>
\t\t\t<xmax>38</xmax>
\t\t\t<ymax>40</ymax>
\t\t</bndbox>
\t</object>
\t<object>
\t\t<name>2</name>
\t\t<bndbox>
\t\t\t<xmin>52</xmin>
\t\t\t<ymin>20</ymin>
\t\t\t<xmax>78</xmax>
\t\t\t<ymax>40</ymax>
\t\t</bndbox>
\t</object>
\t<object>
\t\t<name>4</name>
\t\t<scene>0</scene>
\t\t<nobndbox>1</nobndbox>
\t</object>
\t<object>
\t\t<name>5</name>
\t\t<scene>1</scene>
\t\t<nobndbox>1</nobndbox>
\t</object>
</annotation>
"""

SENTENCES_1000 = (
    "[/EN#1/people Two men] in [/EN#2/clothing green shirts] stand in [/EN#5/scene the yard] .\n"
    "[/EN#1/people Two friends] enjoy [/EN#4/other time] with [/EN#3/clothing/other a shirt] .\n"
    "[/EN#0/notvisual Someone] waits .\n"
)

XML_2000 = """<annotation>
\t<filename>2000.jpg</filename>
\t<size>
\t\t<width>64</width>
\t\t<height>48</height>
\t\t<depth>3</depth>
\t</size>
\t<object>
\t\t<name>7</name>
\t\t<bndbox>
\t\t\t<xmin>4</xmin>
\t\t\t<ymin>8</ymin>
\t\t\t<xmax>44</xmax>
\t\t\t<ymax>40</ymax>
\t\t</bndbox>
\t</object>
</annotation>
"""

SENTENCES_2000 = "[/EN#7/animals A brown dog] runs .\n"


def write_entities(root, *, split="val", images=None):
    """The Flickr30k Entities layout: {split}.txt, Annotations/{id}.xml, Sentences/{id}.txt (+ images)."""
    (root / "Annotations").mkdir(parents=True)
    (root / "Sentences").mkdir()
    (root / f"{split}.txt").write_text("1000\n2000\n")
    (root / "Annotations" / "1000.xml").write_text(XML_1000)
    (root / "Annotations" / "2000.xml").write_text(XML_2000)
    (root / "Sentences" / "1000.txt").write_text(SENTENCES_1000)
    (root / "Sentences" / "2000.txt").write_text(SENTENCES_2000)
    if images is not None:
        images.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (100, 80), (120, 90, 60)).save(images / "1000.jpg")
        Image.new("RGB", (64, 48), (30, 140, 70)).save(images / "2000.jpg")
    return root


# --------------------------------------------------------------------------------------------------------
# The original format


def test_parse_sentence_strips_markup_and_keeps_spans():
    sentence = parse_sentence(SENTENCES_1000.splitlines()[1])
    assert sentence.text == "Two friends enjoy time with a shirt ."
    assert [(p.text, p.entity_id, p.types) for p in sentence.phrases] == [
        ("Two friends", "1", ("people",)),
        ("time", "4", ("other",)),
        ("a shirt", "3", ("clothing", "other")),
    ]
    for phrase in sentence.phrases:
        assert sentence.text[phrase.span[0] : phrase.span[1]] == phrase.text
    assert [p.first_word_index for p in sentence.phrases] == [0, 3, 5]


@pytest.mark.parametrize(
    "line, message",
    [
        ("A dog chases [/EN#3/animals ] .", "has no words"),
        ("[/EN#3/animals a cat runs .", "never closed"),
        ("[/XX3/animals a cat] runs .", "malformed phrase tag"),
    ],
)
def test_bad_sentence_markup_names_file_and_sentence(line, message):
    with pytest.raises(DataError, match=message) as info:
        parse_sentence(line, file="Sentences/42.txt", entry="sentence 3")
    assert "Sentences/42.txt, sentence 3" in str(info.value)


def test_annotation_xml_boxes_per_entity_nobox_and_scene(tmp_path):
    root = write_entities(tmp_path / "f30k")
    xml = read_annotation_xml(root / "Annotations" / "1000.xml")
    assert (xml.width, xml.height) == (100, 80)
    assert xml.boxes == {"1": [MAN_LEFT, MAN_RIGHT], "2": [SHIRT_LEFT, SHIRT_RIGHT], "3": [SHIRT_LEFT]}
    assert xml.nobox == ["4", "5"] and xml.scene == ["5"]


def test_missing_files_name_the_path(tmp_path):
    root = write_entities(tmp_path / "f30k")
    (root / "Sentences" / "2000.txt").unlink()
    with pytest.raises(DataError, match=r"2000\.txt.*does not exist"):
        flickr_to_mdetr(root, "val")
    with pytest.raises(DataError, match="test.txt is missing"):
        flickr_to_mdetr(root, "test")


def test_conversion_matches_mdetr_layout(tmp_path):
    root = write_entities(tmp_path / "f30k")
    data = flickr_to_mdetr(root, "val")
    assert [(e["original_img_id"], e["sentence_id"]) for e in data["images"]] == [
        (1000, 0),
        (1000, 1),
        (1000, 2),
        (2000, 0),
    ]
    first = data["images"][0]
    assert first["caption"] == "Two men in green shirts stand in the yard ."
    assert first["file_name"] == "1000.jpg" and first["dataset_name"] == "flickr"
    # "the yard" (scene, no box) is not evaluated; the two others are, in sentence order.
    assert first["tokens_positive_eval"] == [[[0, 7]], [[11, 23]]]
    boxes = sorted(tuple(a["bbox"]) for a in data["annotations"] if a["image_id"] == first["id"])
    assert boxes == sorted(
        [
            (10.0, 10.0, 30.0, 50.0),
            (50.0, 10.0, 30.0, 50.0),
            (12.0, 20.0, 26.0, 20.0),
            (52.0, 20.0, 26.0, 20.0),
        ]
    )
    # Sentence 1: "a shirt" (entity 3) shares SHIRT_LEFT with no other phrase of that sentence.
    second = [a for a in data["annotations"] if a["image_id"] == 1]
    assert sorted(a["tokens_positive"] for a in second) == [[[0, 11]], [[0, 11]], [[28, 35]]]
    assert data["images"][2]["tokens_positive_eval"] == []  # only a notvisual phrase
    merged = flickr_to_mdetr(root, "val", merge_boxes=True)
    assert [a["bbox"] for a in merged["annotations"] if a["image_id"] == 0][0] == [10.0, 10.0, 70.0, 50.0]


def test_boxes_of_one_object_shared_by_two_entities_form_one_annotation(tmp_path):
    root = write_entities(tmp_path / "f30k")
    (root / "Sentences" / "1000.txt").write_text("[/EN#2/clothing Shirts] and [/EN#3/clothing a shirt] .\n")
    data = flickr_to_mdetr(root, "val", image_ids=["1000"])
    # SHIRT_LEFT belongs to both entities (IoU 1 >= 0.95): one annotation aligned to both phrases.
    spans = sorted(a["tokens_positive"] for a in data["annotations"])
    assert spans == [[[0, 6]], [[0, 6], [11, 18]]]


# --------------------------------------------------------------------------------------------------------
# Recall@k


def _gt(tmp_path, protocol="any"):
    return FlickrGroundTruth.from_entities(write_entities(tmp_path / "f30k"), "val", protocol=protocol)


def _perfect(gt):
    return {key: [phrase.boxes[:1] for phrase in phrases] for key, phrases in gt.queries.items()}


def test_ground_truth_queries_skip_phrases_without_boxes(tmp_path):
    gt = _gt(tmp_path)
    assert sorted(gt.queries) == [("1000", 0), ("1000", 1), ("2000", 0)]  # sentence 2: notvisual only
    assert [p.text for p in gt.queries[("1000", 1)]] == ["Two friends", "a shirt"]
    assert gt.num_phrases == 5


def test_perfect_prediction_scores_100_in_every_type(tmp_path):
    gt = _gt(tmp_path)
    evaluator = FlickrEvaluator(gt)
    evaluator.update(_perfect(gt))
    summary = evaluator.summarize()
    for name in ("all", "people", "clothing", "animals", "other"):
        assert summary[name] == {"R@1": 1.0, "R@5": 1.0, "R@10": 1.0, "upper_bound": 1.0}
    assert summary["protocol"] == "ANY-BOX" and summary["criterion"] == "IoU >= 0.5"
    assert summary["num_phrases"] == 5 and "scene" not in summary


def test_shifted_box_fails_exactly_past_the_threshold(tmp_path):
    gt = _gt(tmp_path)
    for dx, hit in ((10.0, True), (11.0, False)):  # IoU (30 - dx) / (30 + dx): 0.5, then 0.463
        predictions = _perfect(gt)
        predictions[("1000", 0)][0] = torch.tensor([[10.0 + dx, 10.0, 40.0 + dx, 60.0]])
        evaluator = FlickrEvaluator(gt)
        evaluator.update(predictions)
        assert evaluator.summarize()["people"]["R@1"] == (1.0 if hit else 0.5)


def test_recall_at_k_and_upper_bound_follow_rank(tmp_path):
    gt = _gt(tmp_path)
    far = [90.0, 70.0, 99.0, 79.0]
    predictions = _perfect(gt)
    # "Two men": the right box is ranked 3rd (hit at 5 and 10); "A brown dog": ranked 12th (upper bound only).
    predictions[("1000", 0)][0] = torch.tensor([far, far, list(MAN_RIGHT)] + [far] * 7)
    predictions[("2000", 0)][0] = torch.tensor([far] * 11 + [list(DOG)])
    evaluator = FlickrEvaluator(gt)
    evaluator.update(predictions)
    summary = evaluator.summarize()
    assert summary["all"] == pytest.approx({"R@1": 3 / 5, "R@5": 4 / 5, "R@10": 4 / 5, "upper_bound": 1.0})
    assert summary["animals"] == {"R@1": 0.0, "R@5": 0.0, "R@10": 0.0, "upper_bound": 1.0}


def test_any_box_and_merged_boxes_protocols_differ(tmp_path):
    # One box of "Two men" is right under ANY-BOX (IoU 1 with MAN_LEFT) but wrong under MERGED-BOXES
    # (IoU 1500 / 3500 = 0.43 with the enclosing box); the enclosing box is the reverse.
    gts = {protocol: _gt(tmp_path / protocol, protocol) for protocol in ("any", "merged")}
    for box, any_hit, merged_hit in ((MAN_LEFT, True, False), (MEN_MERGED, False, True)):
        results = {}
        for protocol, gt in gts.items():
            predictions = _perfect(gt)
            predictions[("1000", 0)][0] = torch.tensor([box])
            evaluator = FlickrEvaluator(gt)
            evaluator.update(predictions)
            results[protocol] = evaluator.summarize()
        assert results["any"]["people"]["R@1"] == (1.0 if any_hit else 0.5)
        assert results["merged"]["people"]["R@1"] == (1.0 if merged_hit else 0.5)
    assert results["merged"]["protocol"] == "MERGED-BOXES"


def test_missing_and_mismatched_predictions_are_errors(tmp_path):
    gt = _gt(tmp_path)
    evaluator = FlickrEvaluator(gt)
    predictions = _perfect(gt)
    del predictions[("2000", 0)]
    evaluator.update(predictions)
    with pytest.raises(
        ValueError, match="missing predictions for 1 of 3 sentences.*sentence 0 of image 2000"
    ):
        evaluator.summarize()
    with pytest.raises(ValueError, match="got ranked boxes for 1 phrases, the ground truth has 2"):
        evaluator.update({("1000", 0): [torch.tensor([MAN_LEFT])]})


def test_phrase_ranking_uses_max_token_probability_and_keeps_ties_in_query_order():
    boxes = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    token_probs = torch.tensor(
        [
            [0.1, 0.3, 0.0, 0.0],  # query 0: max over tokens {1, 2} = 0.3
            [0.0, 0.2, 0.2, 0.6],  # query 1: 0.2 (token 3 is not in the phrase)
            [0.0, 0.0, 0.3, 0.0],
        ]
    )  # query 2: 0.3, tied with query 0
    phrase = torch.tensor([[False, True, True, False]])
    (ranked,) = rank_boxes_for_phrases(token_probs, boxes, phrase)
    assert torch.equal(ranked, boxes[[0, 2, 1]])


def test_ground_truth_from_mdetr_file_agrees_with_original(tmp_path):
    root = write_entities(tmp_path / "f30k")
    from_json = FlickrGroundTruth.from_mdetr(flickr_to_mdetr(root, "val"))
    original = FlickrGroundTruth.from_entities(root, "val")
    assert sorted(from_json.queries) == sorted(original.queries)
    for key, phrases in original.queries.items():
        for ours, theirs in zip(from_json.queries[key], phrases, strict=True):
            assert sorted(ours.boxes.tolist()) == sorted(theirs.boxes.tolist())


# --------------------------------------------------------------------------------------------------------
# Dataset and the command line


def test_dataset_checks_evaluation_phrases(tmp_path, tokenizer):
    images = tmp_path / "images"
    root = write_entities(tmp_path / "f30k", images=images)
    data = flickr_to_mdetr(root, "val")
    ann = flickr_ann_file(tmp_path, "val")
    assert ann.name == "final_flickr_separateGT_val.json"
    ann.write_text(json.dumps(data))
    dataset = FlickrDataset(ann, images, tokenizer=tokenizer)
    _, target = dataset[0]
    assert target["tokens_positive_eval"] == [[(0, 7)], [(11, 23)]] and target["sentence_id"] == 0
    with pytest.raises(DataError, match=r"no-images/1000\.jpg, image id 0: the image file does not exist"):
        FlickrDataset(ann, tmp_path / "no-images", tokenizer=tokenizer)[0]
    data["images"][1]["tokens_positive_eval"][0] = []
    ann.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"image id 1: phrase 0 of 'tokens_positive_eval' is empty"):
        FlickrDataset(ann, images, tokenizer=tokenizer)


def test_read_sentences_numbers_lines(tmp_path):
    path = tmp_path / "9.txt"
    path.write_text("[/EN#1/people A man] sits .\n\n[/EN#2/people a woman runs .\n")
    with pytest.raises(DataError, match=r"9\.txt, sentence 1: the phrase of entity 2 is never closed"):
        read_sentences(path)


def test_cli_converts_trains_and_evaluates(tmp_path, tiny_overrides, capsys):
    from mdetr.cli import main

    images = tmp_path / "images"
    root = write_entities(tmp_path / "f30k", images=images)
    ann = tmp_path / "final_flickr_separateGT_val.json"
    assert main(["data", "flickr", str(root), str(ann), "--split", "val"]) == 0
    config = tmp_path / "c.yaml"
    config.write_text("model:\n  arch: mdetr_lite\n")
    overrides = tiny_overrides(tmp_path, tmp_path / "run", "train.epochs=1", f"data.train_ann={ann}",
                               f"data.train_images={images}", "data.val_ann=", "data.refexp_datasets=",
                               "data.batch_size=4")  # one step, no validation pass: the CLI evaluates below
    assert main(["train", "--config", str(config), "--no-progress", *overrides]) == 0
    capsys.readouterr()
    out = tmp_path / "metrics.json"
    args = ["evaluate", str(tmp_path / "run" / "last"), "--task", "flickr", "--ann", str(ann), "--images",
            str(images), "--flickr-root", str(root), "--output", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "Flickr30k Entities val, ANY-BOX protocol (IoU >= 0.5): 5 phrases in 3 sentences" in printed
    assert "Upper bound" in printed and "AP50" in printed
    metrics = json.loads(out.read_text())["flickr"]
    recalls = metrics["all"]
    assert 0 <= recalls["R@1"] <= recalls["R@5"] <= recalls["R@10"] <= recalls["upper_bound"] <= 1
    assert metrics["protocol"] == "ANY-BOX" and metrics["num_phrases"] == 5
