"""Transforms, the MDETR-format dataset, collate and validate_annotations, on tiny fixtures in tmp_path."""

from __future__ import annotations

import copy
import json
import os
import random
from dataclasses import asdict

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from mdetr.data.collate import Batch, collate, pad_images  # noqa: E402
from mdetr.data.errors import DataError, Problem  # noqa: E402
from mdetr.data.modulated import ModulatedDetection  # noqa: E402
from mdetr.data.transforms import (  # noqa: E402
    IMAGENET_MEAN,
    IMAGENET_STD,
    PRESETS,
    Compose,
    Normalize,
    RandomResize,
    RandomSelect,
    RandomSizeCrop,
    ToTensor,
    crop,
    make_transforms,
    resized_size,
)
from mdetr.data.validate import validate_annotations  # noqa: E402


def marked_tokens(tokenizer, caption: str, row: torch.Tensor) -> list[str]:
    tokens = tokenizer(caption).tokens()
    return [tokens[i] for i in torch.nonzero(row).flatten().tolist()]


# ---------------------------------------------------------------------------------------------------------
# Transforms


def box_target(boxes, **extra):
    boxes = torch.tensor(boxes, dtype=torch.float32)
    n = len(boxes)
    target = {
        "boxes": boxes,
        "labels": torch.arange(n),
        "area": (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]),
        "iscrowd": torch.zeros(n, dtype=torch.int64),
        "positive_map": torch.eye(n, 256, dtype=torch.bool),
        "tokens_positive": [[(i, i + 1)] for i in range(n)],
    }
    target.update(extra)
    return target


def test_resized_size_arithmetic():
    assert resized_size(640, 480, 800) == (1066, 800)  # int(800 * 640 / 480) truncates
    assert resized_size(480, 640, 800) == (800, 1066)
    assert resized_size(640, 480, 800, 1333) == (1066, 800)  # under the cap
    # 1500x1000 at 800 would be 1200 long > 1000: short side round(1000 * 1000 / 1500) = 667
    assert resized_size(1500, 1000, 800, 1000) == (1000, 667)
    # 1000x200 capped at 1333: short = round(266.6) = 267, long = int(267 * 5) = 1335 (the official rounding)
    assert resized_size(1000, 200, 800, 1333) == (1335, 267)
    assert resized_size(640, 480, 480) == (640, 480)


def test_resize_scales_boxes_area_and_masks():
    image = Image.new("RGB", (640, 480))
    masks = torch.zeros(1, 480, 640, dtype=torch.bool)
    masks[0, 120:240, 160:320] = True
    target = box_target([[160, 120, 320, 240]], masks=masks)
    out_image, out = RandomResize([800], max_size=1333)(image, target)
    assert out_image.size == (1066, 800)
    rw, rh = 1066 / 640, 800 / 480
    assert torch.allclose(out["boxes"], torch.tensor([[160 * rw, 120 * rh, 320 * rw, 240 * rh]]))
    assert torch.allclose(out["area"], torch.tensor([160 * 120 * rw * rh]))
    assert out["masks"].shape == (1, 800, 1066) and out["masks"].dtype == torch.bool
    assert out["masks"][0, 300, 400] and not out["masks"][0, 100, 100]
    assert out["size"].tolist() == [800, 1066]
    assert target["boxes"][0, 0] == 160  # the input target is not modified


def test_crop_clips_and_filters_in_sync():
    image = Image.new("RGB", (100, 80))
    target = box_target([[10, 10, 30, 30], [50, 20, 90, 70], [0, 0, 5, 5]])
    out_image, out = crop(image, target, top=15, left=20, height=40, width=50)
    assert out_image.size == (50, 40)
    # box 0 clipped to x in [20, 30], y in [15, 30]; box 1 to x in [50, 70], y in [20, 55]; box 2 vanishes
    assert out["boxes"].tolist() == [[0, 0, 10, 15], [30, 5, 50, 40]]
    assert out["area"].tolist() == [150, 700]
    assert out["labels"].tolist() == [0, 1]
    assert out["tokens_positive"] == [[(0, 1)], [(1, 2)]]
    assert torch.equal(out["positive_map"], torch.eye(3, 256, dtype=torch.bool)[:2])


def test_random_size_crop_never_drops_a_box():
    random.seed(0)
    image = Image.new("RGB", (600, 500))
    boxes = [[250, 200, 290, 260], [320, 240, 360, 300], [200, 150, 230, 170], [400, 300, 420, 330]]
    target = box_target(boxes)
    transform = RandomSizeCrop(384, 1333, respect_boxes=True)
    sizes = set()
    for _ in range(300):
        out_image, out = transform(image, target)
        sizes.add(out_image.size)
        assert len(out["boxes"]) == 4
        assert out["labels"].tolist() == [0, 1, 2, 3]
        assert out["tokens_positive"] == target["tokens_positive"]
        width, height = out_image.size
        assert (out["boxes"][:, 2:] <= torch.tensor([width, height])).all() and (out["boxes"] >= 0).all()
        assert (out["boxes"][:, 2:] > out["boxes"][:, :2]).all()
    assert len(sizes) > 50  # it did crop, at many sizes


def test_random_size_crop_keeps_image_when_no_crop_keeps_every_box():
    random.seed(0)
    image = Image.new("RGB", (1000, 1000))
    target = box_target(
        [[0, 0, 5, 5], [995, 995, 1000, 1000]]
    )  # opposite corners: no 384..999 crop holds both
    out_image, out = RandomSizeCrop(384, 999, respect_boxes=True)(image, target)
    assert out_image.size == (1000, 1000) and torch.equal(out["boxes"], target["boxes"])
    # without respect_boxes boxes do get dropped, and tokens_positive follows the remaining labels
    dropped = 0
    for _ in range(50):
        _, out = RandomSizeCrop(384, 999, respect_boxes=False)(image, target)
        dropped += len(out["boxes"]) < 2
        assert out["tokens_positive"] == [target["tokens_positive"][i] for i in out["labels"].tolist()]
    assert dropped > 0


def test_random_select():
    def tag(name):
        return lambda image, target: (image, {**target, "path": name})

    assert RandomSelect(tag("a"), tag("b"), p=1.0)(None, {})[1]["path"] == "a"
    assert RandomSelect(tag("a"), tag("b"), p=0.0)(None, {})[1]["path"] == "b"


def test_to_tensor_and_normalize():
    array = np.random.default_rng(0).integers(0, 256, size=(50, 100, 3), dtype=np.uint8)
    target = box_target([[10, 5, 30, 45], [0, 0, 100, 50]])
    image, out = Compose([ToTensor(), Normalize()])(Image.fromarray(array), target)
    expected = (
        torch.from_numpy(array).permute(2, 0, 1).float() / 255 - torch.tensor(IMAGENET_MEAN)[:, None, None]
    )
    expected = expected / torch.tensor(IMAGENET_STD)[:, None, None]
    assert torch.allclose(image, expected, atol=1e-6)
    assert torch.allclose(out["boxes"], torch.tensor([[0.2, 0.5, 0.2, 0.8], [0.5, 0.5, 1.0, 1.0]]))
    assert ((out["boxes"] >= 0) & (out["boxes"] <= 1)).all()


def test_make_transforms_presets():
    image = Image.new("RGB", (640, 480), (200, 100, 50))
    target = box_target([[100, 100, 300, 200]])
    val = make_transforms("val", **asdict(PRESETS["official"]))
    out_image, out = val(image, target)
    assert out_image.shape == (3, 800, 1066)
    expected = torch.tensor([200 / 640, 150 / 480, 200 / 640, 100 / 480])
    assert torch.allclose(out["boxes"][0], expected, atol=1e-6)  # normalised boxes do not change with resize

    clevr_val = make_transforms("val", **asdict(PRESETS["clevr"]))
    assert clevr_val(Image.new("RGB", (480, 320)), box_target([[1, 1, 9, 9]]))[0].shape == (3, 320, 480)

    random.seed(1)
    train = make_transforms("train", **asdict(PRESETS["clevr"]))
    for _ in range(10):
        out_image, out = train(Image.new("RGB", (480, 320)), box_target([[200, 100, 300, 200]]))
        assert min(out_image.shape[1:]) in PRESETS["clevr"].scales or max(out_image.shape[1:]) <= 512
        assert len(out["boxes"]) == 1 and ((out["boxes"] >= 0) & (out["boxes"] <= 1)).all()
    assert PRESETS["official"].scales == (480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800)
    with pytest.raises(ValueError, match="split"):
        make_transforms("training", **asdict(PRESETS["official"]))


# ---------------------------------------------------------------------------------------------------------
# Fixtures in the MDETR annotation format

FLICKR_CAPTION = "a man in a red shirt holds a giraffe."


def write_png(path, size, color=(120, 60, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def write_json(path, data):
    path.write_text(json.dumps(data))
    return path


def flickr_data():
    return {
        "info": {},
        "licenses": [],
        "categories": [{"supercategory": "object", "id": 1, "name": "object"}],
        "images": [
            {
                "file_name": "img1.png", "height": 48, "width": 64, "id": 1, "caption": FLICKR_CAPTION,
                "dataset_name": "flickr", "tokens_negative": [[0, 37]], "sentence_id": 2,
                "original_img_id": 1000092795,
            },
            {"file_name": "img2.png", "height": 30, "width": 40, "id": 2, "caption": "a giraffe",
             "dataset_name": "flickr", "sentence_id": 0, "original_img_id": 7},
        ],
        "annotations": [
            {"area": 600.0, "iscrowd": 0, "image_id": 1, "category_id": 1, "id": 10, "bbox": [4, 6, 20, 30],
             "tokens_positive": [[0, 5]]},
            # reaches past the right border (30 + 40 > 64): clamped, with a warning
            {"area": 800.0, "iscrowd": 0, "image_id": 1, "category_id": 1, "id": 11, "bbox": [30, 10, 40, 20],
             "tokens_positive": [[11, 20]]},
            {"area": 10.0, "iscrowd": 1, "image_id": 1, "category_id": 1, "id": 12, "bbox": [0, 0, 5, 2],
             "tokens_positive": [[29, 36]]},
            # two mentions: "a man" ... "a giraffe"
            {"area": 100.0, "iscrowd": 0, "image_id": 1, "category_id": 1, "id": 13, "bbox": [40, 30, 10, 10],
             "tokens_positive": [[0, 5], [27, 36]]},
            {"area": 200.0, "iscrowd": 0, "image_id": 2, "category_id": 1, "id": 20, "bbox": [10, 5, 20, 10],
             "tokens_positive": [[2, 9]]},
        ],
    }  # fmt: skip


@pytest.fixture
def flickr(tmp_path):
    write_png(tmp_path / "images" / "img1.png", (64, 48))
    write_png(tmp_path / "images" / "img2.png", (40, 30))
    return write_json(tmp_path / "final_flickr_separateGT_val.json", flickr_data()), tmp_path / "images"


def test_flickr_item_contents(flickr, tokenizer):
    ann_file, root = flickr
    dataset = ModulatedDetection(ann_file, root, tokenizer=tokenizer)
    assert len(dataset) == 2 and dataset.ids == [1, 2]
    assert dataset.ground_truth == flickr_data()
    assert [p.severity for p in dataset.problems] == ["warning"]  # the box past the border
    assert "annotation id 11" in str(dataset.problems[0])

    image, target = dataset[0]
    assert image.shape == (3, 48, 64) and image.dtype == torch.float32
    expected_pixel = (torch.tensor([120, 60, 30]) / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(
        IMAGENET_STD
    )
    assert torch.allclose(image[:, 0, 0], expected_pixel, atol=1e-6)
    # crowd box 12 dropped; box 11 clamped to x1 = 64
    expected = torch.tensor(
        [
            [14 / 64, 21 / 48, 20 / 64, 30 / 48],
            [47 / 64, 20 / 48, 34 / 64, 20 / 48],
            [45 / 64, 35 / 48, 10 / 64, 10 / 48],
        ]
    )
    assert torch.allclose(target["boxes"], expected, atol=1e-6)
    assert target["positive_map"].shape == (3, 256) and target["positive_map"].dtype == torch.bool
    rows = [marked_tokens(tokenizer, FLICKR_CAPTION, row) for row in target["positive_map"]]
    assert rows == [["a", "man"], ["red", "shirt"], ["a", "man", "a", "gi", "##raf", "##fe"]]
    assert target["tokens_positive"] == [[(0, 5)], [(11, 20)], [(0, 5), (27, 36)]]
    assert target["labels"].tolist() == [1, 1, 1] and target["labels"].dtype == torch.int64
    assert target["area"].tolist() == [600.0, 800.0, 100.0]
    assert target["iscrowd"].tolist() == [0, 0, 0]
    assert target["caption"] == FLICKR_CAPTION and target["image_id"] == 1
    assert target["orig_size"].tolist() == [48, 64] and target["size"].tolist() == [48, 64]
    assert target["dataset_name"] == "flickr"
    assert target["sentence_id"] == 2 and target["original_img_id"] == 1000092795
    assert "isfinal" not in target and "answer" not in target


def test_flickr_with_resize_transform(flickr, tokenizer):
    ann_file, root = flickr
    transforms = make_transforms("val", **{**asdict(PRESETS["official"]), "val_size": 96})
    image, target = ModulatedDetection(ann_file, root, tokenizer=tokenizer, transforms=transforms)[0]
    assert image.shape == (3, 96, 128)
    assert target["size"].tolist() == [96, 128] and target["orig_size"].tolist() == [48, 64]
    assert torch.allclose(target["boxes"][0], torch.tensor([14 / 64, 21 / 48, 20 / 64, 30 / 48]), atol=1e-6)
    assert torch.allclose(target["area"], torch.tensor([600.0, 800.0, 100.0]) * 4)


def test_clevr_tokens_and_isfinal(tmp_path, tokenizer):
    caption = "Are there more red cubes than metal spheres?"
    data = {
        "images": [{"file_name": "CLEVR_val_000000.png", "height": 32, "width": 48, "id": 0,
                    "caption": caption, "answer": "no", "question_type": "compare_integer"}],
        "annotations": [
            {"area": 40, "iscrowd": 0, "image_id": 0, "category_id": 1, "id": 0, "bbox": [2, 2, 8, 5],
             "tokens": [[15, 24]], "isfinal": 1},
            {"area": 30, "iscrowd": 0, "image_id": 0, "category_id": 1, "id": 1, "bbox": [20, 10, 6, 5],
             "tokens": [[30, 43]], "isfinal": 0},
        ],
        "categories": [],
    }  # fmt: skip
    write_png(tmp_path / "val" / "CLEVR_val_000000.png", (48, 32))
    ann_file = write_json(tmp_path / "val.json", data)
    image, target = ModulatedDetection(ann_file, tmp_path / "val", tokenizer=tokenizer)[0]
    rows = [marked_tokens(tokenizer, caption, row) for row in target["positive_map"]]
    assert rows == [["red", "cube", "##s"], ["metal", "spheres"]]
    assert target["isfinal"].tolist() == [1.0, 0.0] and target["isfinal"].dtype == torch.float32
    assert target["answer"] == "no" and target["question_type"] == "compare_integer"
    assert target["dataset_name"] == "val"  # no dataset_name in the entry: the file's stem
    assert torch.allclose(target["boxes"][1], torch.tensor([23 / 48, 12.5 / 32, 6 / 48, 5 / 32]))


def test_mixed_data_source_roots(tmp_path, tokenizer):
    data = {
        "images": [
            {"file_name": "COCO_train2014_000000000009.png", "height": 20, "width": 30, "id": 0,
             "caption": "a bowl.", "dataset_name": "mixed", "data_source": "coco", "original_id": -1},
            {"file_name": "2345.png", "height": 40, "width": 50, "id": 1, "caption": "a tree.",
             "dataset_name": "mixed", "data_source": "vg", "original_id": -1},
        ],
        "annotations": [
            {"area": 20, "iscrowd": 0, "image_id": 0, "category_id": 1, "id": 0, "bbox": [1, 1, 5, 4],
             "tokens_positive": [[2, 6]]},
            {"area": 20, "iscrowd": 0, "image_id": 1, "category_id": 1, "id": 1, "bbox": [1, 1, 5, 4],
             "tokens_positive": [[2, 6]]},
        ],
        "categories": [],
    }  # fmt: skip
    write_png(tmp_path / "coco" / "train2014" / "COCO_train2014_000000000009.png", (30, 20), (255, 0, 0))
    write_png(tmp_path / "gqa" / "images" / "2345.png", (50, 40), (0, 0, 255))
    ann_file = write_json(tmp_path / "final_mixed_train.json", data)
    roots = {"coco": tmp_path / "coco" / "train2014", "vg": tmp_path / "gqa" / "images"}
    dataset = ModulatedDetection(ann_file, roots, tokenizer=tokenizer)
    (coco_image, coco_target), (vg_image, vg_target) = dataset[0], dataset[1]
    assert coco_image.shape == (3, 20, 30) and vg_image.shape == (3, 40, 50)
    assert coco_image[0, 0, 0] > coco_image[2, 0, 0] and vg_image[2, 0, 0] > vg_image[0, 0, 0]
    assert coco_target["original_id"] == -1 and vg_target["dataset_name"] == "mixed"
    assert marked_tokens(tokenizer, "a bowl.", coco_target["positive_map"][0]) == ["bowl"]

    with pytest.raises(DataError) as raised:
        ModulatedDetection(ann_file, {"coco": roots["coco"]}, tokenizer=tokenizer)
    assert "final_mixed_train.json" in str(raised.value) and "image id 1" in str(raised.value)
    assert "'vg'" in str(raised.value)


# ---------------------------------------------------------------------------------------------------------
# Bad inputs


def _set(path, value):
    def mutate(data):
        target = data
        for key in path[:-1]:
            target = target[key]
        if value is _DELETE:
            del target[path[-1]]
        else:
            target[path[-1]] = value

    return mutate


_DELETE = object()

BAD_CASES = {
    "missing caption": (_set(["images", 1, "caption"], _DELETE), "image id 2", "no 'caption'"),
    "span past the caption": (
        _set(["annotations", 4, "tokens_positive"], [[2, 40]]),
        "annotation id 20",
        "outside the caption",
    ),
    "empty span": (_set(["annotations", 0, "tokens_positive"], [[3, 3]]), "annotation id 10", "outside"),
    "span on spaces only": (
        _set(["annotations", 0, "tokens_positive"], [[5, 6]]),
        "annotation id 10",
        "cover no token",
    ),
    "caption too long": (
        _set(["images", 1, "caption"], "a giraffe" + " and a giraffe" * 100),
        "image id 2",
        "tokens",
    ),
    "zero-width box": (
        _set(["annotations", 1, "bbox"], [30, 10, 0, 20]),
        "annotation id 11",
        "zero or negative",
    ),
    "negative box": (
        _set(["annotations", 1, "bbox"], [30, 10, 5, -2]),
        "annotation id 11",
        "zero or negative",
    ),
    "box outside the image": (
        _set(["annotations", 3, "bbox"], [70, 10, 5, 5]),
        "annotation id 13",
        "outside the 64x48 image",
    ),
    "box not four numbers": (_set(["annotations", 3, "bbox"], [1, 2, 3]), "annotation id 13", "four finite"),
    "no spans at all": (_set(["annotations", 3, "tokens_positive"], _DELETE), "annotation id 13", "neither"),
    "unknown image id": (_set(["annotations", 4, "image_id"], 99), "annotation id 20", "image id 99"),
    "duplicate annotation id": (_set(["annotations", 3, "id"], 10), "annotation id 10", "earlier annotation"),
    "duplicate image id": (_set(["images", 1, "id"], 1), "image id 1", "earlier image entry"),
    "missing height": (_set(["images", 0, "height"], _DELETE), "image id 1", "'height'"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_file_fails_at_construction(case, flickr, tokenizer):
    ann_file, root = flickr
    mutate, entry, phrase = BAD_CASES[case]
    data = flickr_data()
    mutate(data)
    write_json(ann_file, data)
    with pytest.raises(DataError) as raised:
        ModulatedDetection(ann_file, root, tokenizer=tokenizer)
    error = raised.value
    assert error.file == str(ann_file) and error.entry.startswith(entry)
    assert str(ann_file) in str(error) and entry in str(error) and phrase in str(error)
    # validate_annotations finds the same problem
    problems = validate_annotations(ann_file, root, tokenizer=tokenizer)
    assert any(p.entry == error.entry and p.message == error.message for p in problems)


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"images": []}'])
def test_unusable_json(tmp_path, tokenizer, content):
    ann_file = tmp_path / "broken.json"
    ann_file.write_text(content)
    with pytest.raises(DataError, match="broken.json") as raised:
        ModulatedDetection(ann_file, tmp_path, tokenizer=tokenizer, on_error="skip")
    assert raised.value.entry is None
    with pytest.raises(DataError, match="cannot read"):
        ModulatedDetection(tmp_path / "absent.json", tmp_path, tokenizer=tokenizer)


def test_missing_and_corrupt_images(flickr, tokenizer):
    ann_file, root = flickr
    (root / "img2.png").unlink()
    dataset = ModulatedDetection(ann_file, root, tokenizer=tokenizer)  # images are only opened on access
    with pytest.raises(DataError) as raised:
        dataset[1]
    assert raised.value.file == str(root / "img2.png") and raised.value.entry == "image id 2"
    assert "does not exist" in str(raised.value) and "img2.png" in str(raised.value)

    (root / "img1.png").write_bytes(b"not a png at all")
    with pytest.raises(DataError, match="image id 1.*cannot be read"):
        dataset[0]

    write_png(root / "img1.png", (60, 48))
    with pytest.raises(DataError, match="60x48 but the annotation file says 64x48"):
        dataset[0]


def test_skip_policy_records_and_keeps_going(flickr, tokenizer):
    ann_file, root = flickr
    data = flickr_data()
    data["annotations"][1]["bbox"] = [30, 10, 0, 20]  # box 11 degenerate: dropped, image 1 kept
    data["annotations"][4]["tokens_positive"] = [[2, 99]]  # image 2 loses its only box: dropped
    data["images"].append({"file_name": "img3.png", "height": 30, "width": 40, "id": 3})  # no caption
    data["images"].append({"file_name": "gone.png", "height": 30, "width": 40, "id": 4, "caption": "a dog"})
    data["annotations"].append({"area": 4, "iscrowd": 0, "image_id": 4, "category_id": 1, "id": 40,
                                "bbox": [1, 1, 2, 2], "tokens_positive": [[2, 5]]})  # fmt: skip
    write_json(ann_file, data)
    with pytest.raises(DataError):
        ModulatedDetection(ann_file, root, tokenizer=tokenizer)

    dataset = ModulatedDetection(ann_file, root, tokenizer=tokenizer, on_error="skip")
    assert dataset.ids == [1, 4]
    errors = [p for p in dataset.problems if p.severity == "error"]
    assert [p.entry for p in errors] == [
        "annotation id 11 (image id 1)", "annotation id 20 (image id 2)", "image id 2", "image id 3",
    ]  # fmt: skip
    assert all(p.file == str(ann_file) for p in dataset.problems)
    image, target = dataset[0]
    assert target["tokens_positive"] == [[(0, 5)], [(0, 5), (27, 36)]] and len(target["boxes"]) == 2

    with pytest.warns(UserWarning, match="gone.png"):
        assert dataset[1] is None
    assert dataset.problems[-1].entry == "image id 4" and "gone.png" in dataset.problems[-1].file
    batch = collate([dataset[0], None])
    assert len(batch) == 1 and batch.targets[0]["image_id"] == 1


# ---------------------------------------------------------------------------------------------------------
# Collate


def test_pad_images_and_collate():
    a = torch.randn(3, 4, 6)
    b = torch.randn(3, 5, 3)
    images, masks = pad_images([a, b])
    expected = torch.zeros(2, 3, 5, 6)
    expected[0, :, :4, :6] = a
    expected[1, :, :5, :3] = b
    expected_masks = torch.ones(2, 5, 6, dtype=torch.bool)
    expected_masks[0, :4, :6] = False
    expected_masks[1, :5, :3] = False
    assert torch.equal(images, expected) and torch.equal(masks, expected_masks)

    images, masks = pad_images([a, b], size_divisibility=4)
    assert images.shape == (2, 3, 8, 8) and torch.equal(images[:, :, :5, :6], expected)
    assert masks[:, 5:, :].all() and masks[:, :, 6:].all() and torch.equal(masks[:, :5, :6], expected_masks)

    targets = [
        {"caption": "a cat", "boxes": torch.rand(1, 4), "image_id": 3},
        {"caption": "a dog", "boxes": torch.rand(2, 4)},
    ]
    batch = collate([(a, targets[0]), None, (b, targets[1])])
    assert isinstance(batch, Batch) and len(batch) == 2
    assert batch.captions == ["a cat", "a dog"] and batch.targets == targets
    assert torch.equal(batch.images, expected) and torch.equal(batch.masks, expected_masks)

    moved = batch.to("meta")
    assert moved.images.device.type == "meta" and moved.masks.device.type == "meta"
    assert moved.targets[1]["boxes"].device.type == "meta" and moved.targets[0]["image_id"] == 3
    assert batch.images.device.type == "cpu"

    empty = collate([None, None])
    assert len(empty) == 0 and empty.images.shape == (0, 3, 0, 0)


def test_dataset_through_dataloader(flickr, tokenizer):
    ann_file, root = flickr
    dataset = ModulatedDetection(ann_file, root, tokenizer=tokenizer)
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, collate_fn=collate)
    batch = next(iter(loader))
    assert batch.images.shape == (2, 3, 48, 64)
    assert not batch.masks[0].any() and batch.masks[1, 30:, :].all() and batch.masks[1, :, 40:].all()
    assert batch.captions == [FLICKR_CAPTION, "a giraffe"]


# ---------------------------------------------------------------------------------------------------------
# validate_annotations


def test_validate_lists_every_problem(flickr, tokenizer):
    ann_file, root = flickr
    data = flickr_data()
    data["images"].append(copy.deepcopy(data["images"][1]))  # duplicate image id 2
    data["images"].append({"file_name": "img5.png", "height": 30, "width": 40, "id": 5})  # no caption
    data["images"].append({"file_name": "img6.png", "height": 30, "width": 40, "id": 6,
                           "caption": "a cat" * 200})  # fmt: skip
    data["images"].append(
        {"file_name": "missing.png", "height": 30, "width": 40, "id": 7, "caption": "a cat"}
    )
    data["images"].append({"file_name": "img2.png", "height": 31, "width": 40, "id": 8, "caption": "a cat"})
    data["annotations"][0]["tokens_positive"] = [[30, 60]]  # past the caption
    data["annotations"][1]["bbox"] = [30, 10, -4, 20]  # negative width
    data["annotations"][3]["bbox"] = [100, 100, 5, 5]  # outside the image
    data["annotations"][4]["tokens_positive"] = [[1, 2]]  # a space only
    data["annotations"].append(dict(data["annotations"][4]))  # duplicate annotation id 20
    data["annotations"].append({**data["annotations"][4], "id": 50, "image_id": 42})  # unknown image
    data["annotations"].append({**data["annotations"][4], "id": 51, "image_id": 8,
                                "bbox": [35, 25, 10, 10], "tokens_positive": [[2, 5]]})  # fmt: skip
    del data["categories"]
    write_json(ann_file, data)
    (root / "img5.png").write_bytes(b"\x89PNG broken")
    write_png(root / "img6.png", (40, 30))

    problems = validate_annotations(ann_file, root, tokenizer=tokenizer)
    assert all(isinstance(p, Problem) and p.file in (str(ann_file), str(root / os.path.basename(p.file)))
               for p in problems)  # fmt: skip
    annotation = "annotation id {} (image id {})".format
    expected = [
        ("warning", None, "the top-level key 'categories' is missing"),
        ("error", "image id 2", "the image id is used by an earlier image entry too"),
        ("error", annotation(20, 2), "the annotation id is used by an earlier annotation too"),
        ("error", annotation(50, 42), "points to image id 42, which has no image entry"),
        ("error", annotation(10, 1), "span [30, 60) lies outside the caption (37 characters)"),
        ("error", annotation(11, 1), "the box [x, y, w, h] = [30, 10, -4, 20] has zero or negative size"),
        ("error", annotation(13, 1), "the box [x, y, w, h] = [100, 100, 5, 5] lies outside the 64x48 image"),
        ("error", annotation(20, 2), "the span(s) ' ' cover no token of the caption"),
        ("error", "image id 5", "the image entry has no 'caption'"),
        ("error", "image id 5", "the image cannot be read"),
        ("error", "image id 6", "the caption has 402 tokens"),
        ("error", "image id 7", "the image file does not exist"),
        ("error", "image id 8", "the image is 40x30 but the annotation file says 40x31"),
        ("warning", annotation(51, 8), "[35, 25, 10, 10] reaches past the 40x31 image; it is clamped"),
    ]
    assert sorted((p.severity, str(p.entry)) for p in problems) == sorted((s, str(e)) for s, e, _ in expected)
    for severity, entry, phrase in expected:
        assert any(p.severity == severity and p.entry == entry and phrase in p.message for p in problems), (
            phrase
        )
    # the image checks can be switched off
    without_images = validate_annotations(ann_file, root, tokenizer=tokenizer, check_images=False)
    assert len(without_images) == len(problems) - 3


def test_validate_clean_file_and_unreadable_file(flickr, tmp_path, tokenizer):
    ann_file, root = flickr
    problems = validate_annotations(ann_file, root, tokenizer=tokenizer)
    assert [(p.severity, p.entry) for p in problems] == [("warning", "annotation id 11 (image id 1)")]
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    (problem,) = validate_annotations(broken, tokenizer=tokenizer)
    assert problem.entry is None and "not valid JSON" in str(problem) and str(broken) in str(problem)
    assert isinstance(problem.to_error(), DataError)
