"""RefCOCO, RefCOCO+, RefCOCOg: the refer release (refs pickle, instances.json), MDETR files, precision@k."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from PIL import Image

from mdetr.data.errors import DataError
from mdetr.data.modulated import ModulatedDetection
from mdetr.data.refcoco import EVAL_SPLITS, read_refs, refer_to_mdetr, refexp_ann_file
from mdetr.eval.refexp import RefExpEvaluator

IMAGE_1 = "COCO_train2014_000000000001.jpg"
IMAGE_2 = "COCO_train2014_000000000002.jpg"


def _sentence(sent_id, text):
    return {"tokens": text.split(), "raw": text.capitalize() + ".", "sent_id": sent_id, "sent": text}


def _refs():
    """The refer toolkit's structure: one ref per (object, split) with its sentences."""
    return [
        {
            "sent_ids": [0, 1],
            "file_name": "COCO_train2014_000000000001_11.jpg",
            "ann_id": 11,
            "ref_id": 0,
            "image_id": 1,
            "split": "val",
            "category_id": 1,
            "sentences": [_sentence(0, "man on the left"), _sentence(1, "left guy")],
        },
        {
            "sent_ids": [2],
            "file_name": "COCO_train2014_000000000001_12.jpg",
            "ann_id": 12,
            "ref_id": 1,
            "image_id": 1,
            "split": "testA",
            "category_id": 1,
            "sentences": [_sentence(2, "right person")],
        },
        {
            "sent_ids": [3],
            "file_name": "COCO_train2014_000000000002_21.jpg",
            "ann_id": 21,
            "ref_id": 2,
            "image_id": 2,
            "split": "val",
            "category_id": 18,
            "sentences": [_sentence(3, "brown dog")],
        },
        {
            "sent_ids": [4],
            "file_name": "COCO_train2014_000000000002_21.jpg",
            "ann_id": 21,
            "ref_id": 3,
            "image_id": 2,
            "split": "train",
            "category_id": 18,
            "sentences": [_sentence(4, "the dog")],
        },
    ]


def _instances():
    return {
        "info": {},
        "licenses": [],
        "images": [
            {"id": 1, "file_name": IMAGE_1, "height": 60, "width": 80},
            {"id": 2, "file_name": IMAGE_2, "height": 48, "width": 64},
        ],
        "annotations": [
            {
                "id": 11,
                "image_id": 1,
                "category_id": 1,
                "bbox": [4.0, 6.0, 30.0, 40.0],
                "area": 1200.0,
                "iscrowd": 0,
                "segmentation": [[4, 6, 34, 6, 34, 46]],
            },
            {
                "id": 12,
                "image_id": 1,
                "category_id": 1,
                "bbox": [44.0, 8.0, 30.0, 44.0],
                "area": 1320.0,
                "iscrowd": 0,
                "segmentation": [[44, 8, 74, 8, 74, 52]],
            },
            {
                "id": 21,
                "image_id": 2,
                "category_id": 18,
                "bbox": [10.0, 10.0, 40.0, 30.0],
                "area": 1200.0,
                "iscrowd": 0,
                "segmentation": [[10, 10, 50, 10, 50, 40]],
            },
        ],
        "categories": [
            {"supercategory": "person", "id": 1, "name": "person"},
            {"supercategory": "animal", "id": 18, "name": "dog"},
        ],
    }


def write_refer(root, dataset="refcoco", refs=None, instances=None, images=None):
    """``{root}/{dataset}/refs(unc).p`` (``refs(umd).p`` for RefCOCOg) and ``instances.json``."""
    folder = root / dataset
    folder.mkdir(parents=True, exist_ok=True)
    name = "refs(umd).p" if dataset == "refcocog" else "refs(unc).p"
    with open(folder / name, "wb") as handle:
        pickle.dump(_refs() if refs is None else refs, handle, protocol=2)
    (folder / "instances.json").write_text(json.dumps(_instances() if instances is None else instances))
    if images is not None:
        images.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (80, 60), (90, 60, 30)).save(images / IMAGE_1)
        Image.new("RGB", (64, 48), (20, 120, 200)).save(images / IMAGE_2)
    return root


def test_refer_split_to_mdetr_entries(tmp_path):
    data = refer_to_mdetr(write_refer(tmp_path), "refcoco", "val")
    assert [e["caption"] for e in data["images"]] == ["man on the left", "left guy", "brown dog"]
    assert [e["file_name"] for e in data["images"]] == [IMAGE_1, IMAGE_1, IMAGE_2]
    assert [(e["height"], e["width"], e["original_id"], e["dataset_name"]) for e in data["images"]] == [
        (60, 80, 1, "refcoco"),
        (60, 80, 1, "refcoco"),
        (48, 64, 2, "refcoco"),
    ]
    assert [(a["image_id"], a["bbox"], a["original_id"], a["category_id"]) for a in data["annotations"]] == [
        (0, [4.0, 6.0, 30.0, 40.0], 11, 1),
        (1, [4.0, 6.0, 30.0, 40.0], 11, 1),
        (2, [10.0, 10.0, 40.0, 30.0], 21, 18),
    ]
    assert [a["tokens_positive"] for a in data["annotations"]] == [[[0, 15]], [[0, 8]], [[0, 9]]]
    assert {c["name"] for c in data["categories"]} == {"person", "dog"}
    raw = refer_to_mdetr(tmp_path, "refcoco", "testA", text="raw")
    assert [e["caption"] for e in raw["images"]] == ["Right person."]


def test_refcocog_uses_the_umd_partition(tmp_path):
    refs = [dict(r, split="test") if r["split"] == "testA" else r for r in _refs()]
    root = write_refer(tmp_path, "refcocog", refs=refs)
    assert [e["caption"] for e in refer_to_mdetr(root, "refcocog", "test")["images"]] == ["right person"]
    with pytest.raises(ValueError, match="refcocog has the splits train, val, test, not 'testA'"):
        refer_to_mdetr(root, "refcocog", "testA")
    assert EVAL_SPLITS["refcocog"] == ("val", "test") and EVAL_SPLITS["refcoco+"] == ("val", "testA", "testB")
    assert refexp_ann_file("ann", "refcoco+", "testB").name == "finetune_refcoco+_testB.json"


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda refs, inst: refs[0].update(ann_id=99),
            r"refs\(unc\)\.p, ref_id 0: ann_id 99 is not in the instances",
        ),
        (
            lambda refs, inst: refs[2].update(image_id=1),
            r"ref_id 2: ann_id 21 belongs to image 2, but the ref names image 1",
        ),
        (
            lambda refs, inst: refs[0]["sentences"][1].update(sent=""),
            r"ref_id 0, sentence 1: the sentence's 'sent' is empty",
        ),
        (lambda refs, inst: inst["images"].pop(1), r"ref_id 2: image_id 2 is not in the instances file"),
        (lambda refs, inst: refs[1].pop("ann_id"), r"ref #1: the ref has no 'ann_id'"),
    ],
)
def test_bad_refs_name_the_file_and_ref(tmp_path, change, message):
    refs, instances = _refs(), _instances()
    change(refs, instances)
    root = write_refer(tmp_path, refs=refs, instances=instances)
    with pytest.raises(DataError, match=message):
        refer_to_mdetr(root, "refcoco", "val")


def test_refs_pickle_with_classes_is_refused(tmp_path):
    path = tmp_path / "refs(unc).p"
    path.write_bytes(pickle.dumps([{"ref_id": 0, "obj": pickle.PickleError()}]))
    with pytest.raises(DataError, match="refusing to load"):
        read_refs(path)


def test_mdetr_finetune_file_reads_as_modulated_detection(tmp_path, tokenizer):
    images = tmp_path / "train2014"
    data = refer_to_mdetr(write_refer(tmp_path, images=images), "refcoco", "val")
    ann = refexp_ann_file(tmp_path, "refcoco", "val")
    ann.write_text(json.dumps(data))
    dataset = ModulatedDetection(ann, images, tokenizer=tokenizer)
    _, target = dataset[2]
    assert target["caption"] == "brown dog" and target["dataset_name"] == "refcoco"
    assert target["positive_map"].shape[0] == 1 and target["positive_map"][0, 1:3].all()  # "brown", "dog"


# --------------------------------------------------------------------------------------------------------
# Precision@k: GIoU (official) or IoU


def _one_entry_gt():
    return {
        "images": [{"id": 1, "height": 100, "width": 100, "caption": "x", "dataset_name": "refcoco"}],
        "annotations": [{"id": 1, "image_id": 1, "bbox": [0.0, 0.0, 10.0, 10.0], "category_id": 1}],
        "categories": [],
    }


def _score(box, overlap):
    evaluator = RefExpEvaluator(_one_entry_gt(), overlap=overlap)
    evaluator.update({1: {"scores": torch.tensor([0.9]), "boxes": torch.tensor([box])}})
    return evaluator.summarize()


def test_giou_and_iou_criteria_differ_and_are_named():
    # Shifted diagonally by 1.8 px: IoU = 67.24 / 132.76 = 0.506 (a hit),
    # GIoU = 0.506 - 6.48 / 139.24 = 0.460 (a miss).
    shifted = [1.8, 1.8, 11.8, 11.8]
    giou, iou = _score(shifted, "giou"), _score(shifted, "iou")
    assert giou["refcoco"]["P@1"] == 0.0 and giou["criterion"] == "GIoU >= 0.5"
    assert iou["refcoco"]["P@1"] == 1.0 and iou["criterion"] == "IoU >= 0.5"
    assert _score([0.0, 0.0, 10.0, 10.0], "giou")["overall"] == {"P@1": 1.0, "P@5": 1.0, "P@10": 1.0}


def test_ties_are_broken_by_query_order():
    evaluator = RefExpEvaluator(_one_entry_gt())
    wrong, right = [50.0, 50.0, 60.0, 60.0], [0.0, 0.0, 10.0, 10.0]
    evaluator.update({1: {"scores": torch.tensor([0.5, 0.5]), "boxes": torch.tensor([wrong, right])}})
    assert evaluator.summarize()["overall"]["P@1"] == 0.0


# --------------------------------------------------------------------------------------------------------
# Command line


def test_cli_converts_trains_and_prints_table(tmp_path, tiny_overrides, capsys):
    from mdetr.cli import main

    images = tmp_path / "train2014"
    root = write_refer(tmp_path / "refer", images=images)
    files = {split: tmp_path / f"finetune_refcoco_{split}.json" for split in ("val", "testA")}
    for split, file in files.items():
        assert main(["data", "refexp", str(root), str(file), "--dataset", "refcoco", "--split", split]) == 0
    bad_split = ["data", "refexp", str(root), str(tmp_path / "x.json"), "--dataset", "refcoco", "--split"]
    assert main([*bad_split, "test"]) == 2
    assert "refcoco has the splits" in capsys.readouterr().err
    config = tmp_path / "c.yaml"
    config.write_text("model:\n  arch: mdetr_lite\n")
    overrides = tiny_overrides(tmp_path, tmp_path / "run", "train.epochs=1", f"data.train_ann={files['val']}",
                               f"data.train_images={images}", "data.val_ann=", "data.batch_size=3")
    assert main(["train", "--config", str(config), "--no-progress", *overrides]) == 0
    capsys.readouterr()
    out = tmp_path / "metrics.json"
    args = ["evaluate", str(tmp_path / "run" / "last"), "--task", "refexp", "--ann", str(files["val"]),
            str(files["testA"]), "--images", str(images), "--overlap", "iou", "--output", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "precision@k (IoU >= 0.5)" in printed
    header = [line for line in printed.splitlines() if "dataset" in line][0]
    assert header.split()[-2:] == ["val", "testA"]
    metrics = json.loads(out.read_text())
    assert [s["split"] for s in metrics["splits"]] == ["val", "testA"]
    assert [s["precision"]["num_evaluated"] for s in metrics["splits"]] == [3, 1]
