"""LVIS v1: the federated format, grounding entries, balanced subsets, class-name inference, AP fixed."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from PIL import Image

from mdetr.data.errors import DataError
from mdetr.data.lvis import (
    balanced_subset,
    clean_name,
    lvis_subset_to_modulated,
    lvis_to_modulated,
    read_lvis,
)
from mdetr.eval.lvis import LvisEvaluator, detect_classes, encode_class_names

CATEGORIES = [
    {
        "id": 1,
        "name": "bow_(weapon)",
        "frequency": "r",
        "image_count": 2,
        "synset": "bow.n.04",
        "synonyms": ["bow"],
    },
    {
        "id": 2,
        "name": "ice_cream",
        "frequency": "c",
        "image_count": 15,
        "synset": "ice_cream.n.01",
        "synonyms": ["ice_cream"],
    },
    {"id": 3, "name": "dog", "frequency": "f", "image_count": 300, "synset": "dog.n.01", "synonyms": ["dog"]},
]


def _image(image_id, neg=(), not_exhaustive=(), size=(64, 48)):
    return {
        "id": image_id,
        "height": size[1],
        "width": size[0],
        "license": 1,
        "flickr_url": "",
        "coco_url": f"http://images.cocodataset.org/val2017/{image_id:012d}.jpg",
        "date_captured": "",
        "neg_category_ids": list(neg),
        "not_exhaustive_category_ids": list(not_exhaustive),
    }


def _ann(ann_id, image_id, category_id, bbox):
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category_id,
        "bbox": bbox,
        "area": bbox[2] * bbox[3],
        "segmentation": [[bbox[0], bbox[1], bbox[0] + bbox[2], bbox[1]]],
    }


def lvis_fixture():
    """Image 1: two dogs, ice cream verified absent. Image 2: one bow, one dog, dog not exhaustively boxed.
    Image 3: one ice cream, dog and bow verified absent."""
    return {
        "info": {},
        "licenses": [],
        "images": [_image(1, neg=[2]), _image(2, not_exhaustive=[3]), _image(3, neg=[1, 3])],
        "annotations": [
            _ann(1, 1, 3, [2.0, 2.0, 20.0, 20.0]),
            _ann(2, 1, 3, [30.0, 10.0, 20.0, 30.0]),
            _ann(3, 2, 1, [5.0, 5.0, 30.0, 10.0]),
            _ann(4, 2, 3, [40.0, 20.0, 20.0, 20.0]),
            _ann(5, 3, 2, [10.0, 10.0, 30.0, 30.0]),
        ],
        "categories": copy.deepcopy(CATEGORIES),
    }


def _xyxy(bbox):
    return [bbox[0], bbox[1], bbox[0] + bbox[2], bbox[1] + bbox[3]]


def _perfect():
    """Every ground-truth box predicted with its category, score 0.9."""
    gt = lvis_fixture()
    results = {}
    for image in gt["images"]:
        anns = [a for a in gt["annotations"] if a["image_id"] == image["id"]]
        results[image["id"]] = {
            "boxes": torch.tensor([_xyxy(a["bbox"]) for a in anns]),
            "scores": torch.full((len(anns),), 0.9),
            "labels": torch.tensor([a["category_id"] for a in anns]),
        }
    return results


def _evaluate(results, **kwargs):
    evaluator = LvisEvaluator(lvis_fixture(), **kwargs)
    evaluator.update(results)
    return evaluator.summarize()


def _add(results, image_id, box, score, label):
    r = results[image_id]
    results[image_id] = {
        "boxes": torch.cat([r["boxes"], torch.tensor([box])]),
        "scores": torch.cat([r["scores"], torch.tensor([score])]),
        "labels": torch.cat([r["labels"], torch.tensor([label])]),
    }


# --------------------------------------------------------------------------------------------------------
# Format and training entries


def test_clean_names():
    assert clean_name("bow_(weapon)") == "bow"
    assert clean_name("ice_cream") == "ice cream"
    assert clean_name("flip-flop_(sandal)") == "flip-flop"


def test_positive_and_negative_entries(tmp_path):
    data = lvis_to_modulated(lvis_fixture())
    entries = [(e["original_id"], e["caption"], e["category_id"]) for e in data["images"]]
    assert entries == [
        (1, "dog", 3),
        (1, "ice cream", 2),
        (2, "bow", 1),
        (2, "dog", 3),
        (3, "ice cream", 2),
        (3, "bow", 1),
        (3, "dog", 3),
    ]
    boxes = {}
    for annotation in data["annotations"]:
        boxes.setdefault(annotation["image_id"], []).append(annotation["bbox"])
    assert boxes == {
        0: [[2.0, 2.0, 20.0, 20.0], [30.0, 10.0, 20.0, 30.0]],
        2: [[5.0, 5.0, 30.0, 10.0]],
        3: [[40.0, 20.0, 20.0, 20.0]],
        4: [[10.0, 10.0, 30.0, 30.0]],
    }  # negatives have no box
    assert all(
        a["tokens_positive"] == [[0, len(data["images"][a["image_id"]]["caption"])]]
        for a in data["annotations"]
    )
    assert data["images"][0]["file_name"] == "val2017/000000000001.jpg"


def test_bad_lvis_files_name_file_and_entry(tmp_path):
    path = tmp_path / "lvis.json"
    for change, message in [
        (
            lambda d: d["images"][0].pop("neg_category_ids"),
            r"image id 1: the image has no 'neg_category_ids'",
        ),
        (lambda d: d["annotations"][0].update(image_id=9), r"annotation id 1: image_id 9 is not an image"),
        (
            lambda d: d["images"][2]["not_exhaustive_category_ids"].append(7),
            r"image id 3: not_exhaustive_category",
        ),
        (lambda d: d["images"][0]["neg_category_ids"].append(3), r"image id 1: category 3 is listed in neg_"),
        (lambda d: d["categories"][0].update(frequency="x"), r"category id 1: frequency must be"),
    ]:
        data = lvis_fixture()
        change(data)
        path.write_text(json.dumps(data))
        with pytest.raises(DataError, match=message):
            read_lvis(path)


def _subset_fixture():
    """20 images: 12 with only dogs, 6 with only ice cream, 2 with a bow (bow absent from images 1-4)."""
    images, annotations = [], []
    for i in range(1, 21):
        category = 3 if i <= 12 else 2 if i <= 18 else 1
        images.append(_image(i, neg=[1] if i <= 4 else []))
        annotations.append(_ann(i, i, category, [1.0, 1.0, 10.0, 10.0]))
    return {"images": images, "annotations": annotations, "categories": copy.deepcopy(CATEGORIES)}


def test_balanced_subset_covers_rare_categories():
    data = _subset_fixture()
    chosen = balanced_subset(data, 0.25, seed=42)  # 5 images
    assert len(chosen) == 5
    by_category = {
        c: {a["image_id"] for a in data["annotations"] if a["category_id"] == c} for c in (1, 2, 3)
    }
    for category in (1, 2, 3):
        assert chosen & by_category[category], f"category {category} has no positive image"
    assert chosen & {1, 2, 3, 4}, "the first pick must take a negative image of the bow"
    assert balanced_subset(data, 0.25, seed=42) == chosen  # deterministic
    assert balanced_subset(data, 1.0) == set(range(1, 21))
    # A random 5-image sample would usually miss the bow (2 of 20 images); the balanced one never does.


def test_subset_conversion_from_file(tmp_path):
    path = tmp_path / "lvis_v1_train.json"
    path.write_text(json.dumps(_subset_fixture()))
    data = lvis_subset_to_modulated(path, 10)  # 2 images: one negative pick, then the bow
    assert len({e["original_id"] for e in data["images"]}) == 2
    assert "bow" in [
        e["caption"] for e in data["images"] if any(a["image_id"] == e["id"] for a in data["annotations"])
    ]
    with pytest.raises(ValueError, match="subset must be one of 1, 10, 100"):
        lvis_subset_to_modulated(path, 5)


# --------------------------------------------------------------------------------------------------------
# AP fixed


def test_perfect_detections_score_100():
    summary = _evaluate(_perfect())
    for key in ("AP", "AP50", "AP75", "APr", "APc", "APf"):
        assert summary[key] == pytest.approx(1.0), key
    assert "top 10000 detections per category" in summary["criterion"] and summary["num_images"] == 3


def test_false_positive_on_a_negative_image_counts_hand_computed():
    # Dog: 3 boxes. A false positive on image 3 (dog verified absent) ranks between true positives:
    # precision 1 up to recall 2/3, then 3/4. 101-point interpolation: (67 * 1 + 34 * 0.75) / 101.
    results = _perfect()
    results[1]["scores"] = torch.tensor([0.9, 0.9])
    results[2]["scores"] = torch.tensor([0.9, 0.5])  # bow 0.9, dog 0.5
    _add(results, 3, [0.0, 0.0, 5.0, 5.0], 0.7, 3)
    summary = _evaluate(results)
    dog_ap = (67 * 1.0 + 34 * 0.75) / 101
    assert summary["APf"] == pytest.approx(dog_ap, abs=1e-6)
    assert summary["AP"] == pytest.approx((1.0 + 1.0 + dog_ap) / 3, abs=1e-6)


def test_federated_rules_ignore_unverified_detections():
    results = _perfect()
    _add(results, 2, [0.0, 0.0, 5.0, 5.0], 0.99, 3)  # dog is not exhaustive on image 2: ignored
    _add(results, 1, [0.0, 0.0, 5.0, 5.0], 0.99, 1)  # bow neither annotated nor negative on image 1: ignored
    assert _evaluate(results)["AP"] == pytest.approx(1.0)
    _add(results, 1, [0.0, 0.0, 5.0, 5.0], 0.99, 2)  # ice cream is verified absent from image 1: counts
    assert _evaluate(results)["APc"] < 1.0


def test_per_category_cap_keeps_the_best_detections():
    results = _perfect()
    for k in range(5):  # low-scored dog false positives on image 3 (dog verified absent)
        _add(results, 3, [0.0, 0.0, 5.0, 5.0], 0.1 + 0.01 * k, 3)
    assert _evaluate(results)["APf"] == pytest.approx(1.0)  # all below the true positives: no effect on AP
    capped = _evaluate(results, topk=2)  # only the two best dog detections remain: recall 2/3
    assert capped["APf"] == pytest.approx(67 / 101, abs=1e-6)
    with pytest.raises(ValueError, match="category ids \\[42\\]"):
        LvisEvaluator(lvis_fixture()).update(
            {1: {"boxes": torch.zeros(1, 4), "scores": torch.ones(1), "labels": torch.tensor([42])}}
        )
    evaluator = LvisEvaluator(lvis_fixture())
    evaluator.update({1: _perfect()[1]})
    with pytest.raises(ValueError, match="image id 1 already received predictions"):
        evaluator.update({1: _perfect()[1]})


# --------------------------------------------------------------------------------------------------------
# Class-name inference and the command line


@pytest.fixture(scope="module")
def lvis_run(tmp_path_factory):
    """LVIS-format files and images, converted and trained on for one step through the command line."""
    from conftest import _tiny_overrides

    from mdetr.cli import main

    tmp = tmp_path_factory.mktemp("lvis-run")
    images = tmp / "coco2017"
    (images / "val2017").mkdir(parents=True)
    for image in lvis_fixture()["images"]:
        picture = Image.new("RGB", (64, 48), (40 * image["id"], 90, 30))
        picture.save(images / "val2017" / f"{image['id']:012d}.jpg")
    lvis = tmp / "lvis_v1_minival.json"
    lvis.write_text(json.dumps(lvis_fixture()))
    ann = tmp / "finetune_lvis_val.json"
    assert main(["data", "lvis", str(lvis), str(ann)]) == 0
    config = tmp / "c.yaml"
    config.write_text("model:\n  arch: mdetr_lite\n")
    overrides = _tiny_overrides(tmp, tmp / "run", "train.epochs=1", f"data.train_ann={ann}",
                                f"data.train_images={images}", "data.val_ann=", "data.refexp_datasets=",
                                "data.batch_size=4")  # 7 entries: one step
    assert main(["train", "--config", str(config), "--no-progress", *overrides]) == 0
    return {"checkpoint": tmp / "run" / "last", "lvis": lvis, "images": images}


def test_cached_class_name_encodings_match_plain_captions(lvis_run):
    from mdetr.builder import load
    from mdetr.inference.postprocess import post_process

    model = load(lvis_run["checkpoint"])
    q = model.config.num_queries
    names = ["bow", "ice cream", "dog"]
    torch.manual_seed(0)
    images = torch.randn(2, 3, 64, 64)
    masks = torch.zeros(2, 64, 64, dtype=torch.bool)
    sizes = torch.tensor([[48, 64], [64, 64]])
    encodings = encode_class_names(model, names, chunk_size=2)
    assert [e.features.shape[0] for e in encodings] == [2, 1]
    found = detect_classes(model, images, masks, sizes, encodings, [1, 2, 3])
    assert found[0]["scores"].shape == (3 * q,) and found[0]["labels"].tolist() == [1] * q + [2] * q + [3] * q
    with torch.no_grad():
        direct = post_process(model(images[1:], masks[1:], ["ice cream"]), sizes[1:])[0]
        bow = post_process(model(images[:1], masks[:1], ["bow"]), sizes[:1])[0]
    assert torch.allclose(found[1]["scores"][q:2 * q], direct["scores"], atol=1e-5)
    assert torch.allclose(found[1]["boxes"][q:2 * q], direct["boxes"], atol=1e-4)
    # "bow" was padded to the length of "ice cream" in its chunk; the padding must not change its boxes.
    assert torch.allclose(found[0]["scores"][:q], bow["scores"], atol=1e-4)


def test_cli_evaluates_ap_fixed_and_names_missing_images(lvis_run, tmp_path, capsys):
    from mdetr.cli import main

    out = tmp_path / "metrics.json"
    args = ["evaluate", str(lvis_run["checkpoint"]), "--task", "lvis", "--ann", str(lvis_run["lvis"]),
            "--images", str(lvis_run["images"])]
    assert main([*args, "--chunk-size", "2", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "AP50" in printed and "APr" in printed and "3 images, 3 class names" in printed
    metrics = json.loads(out.read_text())["lvis"]
    assert all(-1 <= metrics[k] <= 1 for k in ("AP", "AP50", "APr", "APc", "APf"))
    (lvis_run["images"] / "val2017" / "000000000003.jpg").unlink()
    assert main(args) == 2
    assert "000000000003.jpg, image id 3: the image file does not exist" in capsys.readouterr().err
