"""Pre-training combination: conflict graph, greedy colouring, merged captions, decontamination, CLI."""

from __future__ import annotations

import json

import pytest

from mdetr.data.combine import (
    Datapoint,
    caption_piece,
    colour_captions,
    combine,
    combine_datapoints,
    conflict_graph,
    merge_datapoints,
)
from mdetr.data.errors import DataError

# Image COCO_train2014_000000000001.jpg (100 x 100). Caption A's box conflicts with B's and with D's; C's box
# is elsewhere; B and D overlap too little to conflict.
BOX_A = [10.0, 10.0, 40.0, 40.0]  # xywh
BOX_B = [10.0, 0.0, 40.0, 40.0]  # IoU(A, B) = 1200 / 2000 = 0.6
BOX_C = [60.0, 60.0, 30.0, 30.0]
BOX_D = [10.0, 20.0, 40.0, 40.0]  # IoU(A, D) = 0.6; IoU(B, D) = 800 / 2400 = 0.33


def _file(path, captions, *, name="COCO_train2014_000000000001.jpg", size=(100, 100), source=None):
    """An MDETR-format file: one entry per (caption, boxes with spans)."""
    images, annotations = [], []
    for i, (caption, boxes) in enumerate(captions):
        entry = {
            "id": 10 + i,
            "file_name": name,
            "height": size[1],
            "width": size[0],
            "caption": caption,
            "dataset_name": "refcoco",
            "tokens_negative": [[0, 3]],
        }
        if source:
            entry["data_source"] = source
        images.append(entry)
        for box, span in boxes:
            annotations.append(
                {
                    "id": 100 + len(annotations),
                    "image_id": 10 + i,
                    "bbox": box,
                    "category_id": 1,
                    "area": box[2] * box[3],
                    "iscrowd": 0,
                    "tokens_positive": [span],
                }
            )
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": []}))
    return path


CAPTIONS = [
    ("the man", [(BOX_A, [4, 7])]),
    ("a tall man?", [(BOX_B, [7, 10])]),
    ("red ball", [(BOX_C, [4, 8])]),
    ("a person.", [(BOX_D, [2, 8])]),
]


def _datapoints(captions=CAPTIONS):
    return [
        Datapoint(
            {"id": i, "caption": c, "file_name": "x.jpg", "height": 100, "width": 100},
            [{"bbox": box, "tokens_positive": [span]} for box, span in boxes],
            "f.json",
            "",
        )
        for i, (c, boxes) in enumerate(captions)
    ]


def test_conflict_graph_links_overlapping_captions():
    assert conflict_graph(_datapoints()) == [{1, 3}, {0}, set(), {0}]
    # IoU exactly 0.5 is not a conflict
    half = [("left", [([0.0, 0.0, 10.0, 10.0], [0, 4])]), ("wide", [([0.0, 0.0, 20.0, 10.0], [0, 4])])]
    assert conflict_graph(_datapoints(half)) == [set(), set()]


def test_greedy_colouring_by_degree_is_proper():
    adjacency = [{1, 3}, {0}, set(), {0}]  # A-B, A-D
    lengths = [len(caption_piece(c)) for c, _ in CAPTIONS]
    # Order A (degree 2), B, D (degree 1, input order), C: A->0, B->1, D->1 (B and D do not conflict), C->0.
    assert colour_captions(adjacency, lengths) == [0, 1, 0, 1]
    # A length budget forces new colours: sentences must stay under max_chars.
    assert colour_captions([set()] * 3, [10, 10, 10], max_chars=22) == [0, 0, 1]
    assert colour_captions([set()] * 3, [10, 10, 10], max_chars=21) == [0, 1, 2]


def test_merged_caption_and_shifted_spans():
    points = _datapoints()
    entry, annotations = merge_datapoints([points[0], points[2]])
    assert entry["caption"] == "the man. red ball."
    assert entry["tokens_negative"] == []
    assert [a["tokens_positive"] for a in annotations] == [[[4, 7]], [[13, 17]]]
    for annotation in annotations:
        ((beg, end),) = annotation["tokens_positive"]
        assert entry["caption"][beg:end] in ("man", "ball")
    entry, annotations = merge_datapoints([points[1], points[3]])
    assert entry["caption"] == "a tall man? a person."  # captions ending with ? or . keep their end
    assert [a["tokens_positive"] for a in annotations] == [[[7, 10]], [[14, 20]]]


def test_combine_merges_per_image_and_excludes_evaluation_images(tmp_path):
    train = _file(tmp_path / "train.json", CAPTIONS)
    other = _file(
        tmp_path / "other.json",
        [("a cat", [([5.0, 5.0, 20.0, 20.0], [2, 5])])],
        name="COCO_train2014_000000000002.jpg",
    )
    flickr = _file(
        tmp_path / "flickr.json",
        [("a dog", [([1.0, 1.0, 9.0, 9.0], [2, 5])]), ("the dog", [([1.0, 1.0, 9.0, 9.0], [4, 7])])],
        name="77.jpg",
    )
    val = _file(
        tmp_path / "val.json",
        [("held out", [([5.0, 5.0, 20.0, 20.0], [0, 4])])],
        name="COCO_train2014_000000000002.jpg",
    )
    out = tmp_path / "mixed.json"
    report = combine(
        [(train, "coco"), (other, "coco")], out, keep=[(flickr, "flickr")], exclude=[val], prefix_sources=True
    )
    data = json.loads(out.read_text())
    captions = [e["caption"] for e in data["images"]]
    assert captions == ["the man. red ball.", "a tall man? a person.", "a dog", "the dog"]
    assert [e["id"] for e in data["images"]] == [0, 1, 2, 3]
    assert data["images"][0]["file_name"] == "coco/COCO_train2014_000000000001.jpg"
    assert data["images"][2]["file_name"] == "flickr/77.jpg" and data["images"][2]["data_source"] == "flickr"
    assert data["images"][0]["dataset_name"] == "mixed" and data["categories"] == []
    assert [a["image_id"] for a in data["annotations"]] == [0, 0, 1, 1, 2, 3]
    assert len({a["id"] for a in data["annotations"]}) == 6
    assert (report.input_datapoints, report.excluded_datapoints, report.output_datapoints) == (7, 1, 4)
    assert report.excluded_names == {"COCO_train2014_000000000002.jpg"}


def test_exclusion_can_be_limited_to_a_source(tmp_path):
    train = _file(tmp_path / "vg.json", [("a tree", [([5.0, 5.0, 20.0, 20.0], [2, 6])])], name="77.jpg")
    flickr_val = _file(
        tmp_path / "flickr_val.json", [("a dog", [([1.0, 1.0, 9.0, 9.0], [2, 5])])], name="77.jpg"
    )
    out = tmp_path / "mixed.json"
    assert combine([(train, "vg")], out, exclude=[(flickr_val, "flickr")]).output_datapoints == 1
    assert combine([(train, "vg")], out, exclude=[flickr_val]).output_datapoints == 0


def test_bad_inputs_name_file_and_entry(tmp_path):
    a = _file(tmp_path / "a.json", [("the man", [(BOX_A, [4, 7])])])
    b = _file(tmp_path / "b.json", [("a man", [(BOX_A, [2, 5])])], size=(100, 90))
    with pytest.raises(
        DataError,
        match=r"b\.json, image id 10: the image COCO_train2014_000000000001\.jpg is "
        r"100x90 here but 100x100 in .*a\.json, image id 10",
    ):
        combine([a, b], tmp_path / "out.json")
    empty = _file(tmp_path / "empty.json", [("  ", [])])
    with pytest.raises(DataError, match=r"empty\.json, image id 10: the caption is empty"):
        combine([empty], tmp_path / "out.json")
    with pytest.raises(DataError, match="cannot read the file"):
        combine([a], tmp_path / "out.json", exclude=[tmp_path / "missing.json"])


def test_cli_combine(tmp_path, capsys):
    from mdetr.cli import main

    train = _file(tmp_path / "train.json", CAPTIONS)
    val = _file(tmp_path / "val.json", [("x", [])], name="COCO_train2014_000000000009.jpg")
    out = tmp_path / "mixed.json"
    assert main(["data", "combine", str(out), "--input", f"{train}=coco", "--exclude", str(val)]) == 0
    assert "4 captions on 1 images" in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert [e["data_source"] for e in data["images"]] == ["coco", "coco"]
    assert all(len(e["caption"]) < 250 for e in data["images"])


def test_long_captions_split_under_the_limit():
    captions = [
        (f"caption number {i} " + "word " * 20, [([float(10 * i), 0.0, 5.0, 5.0], [0, 7])]) for i in range(8)
    ]
    combined, _ = combine_datapoints(_datapoints(captions))
    lengths = [len(e["caption"]) for e in combined["images"]]
    assert all(n < 250 for n in lengths) and len(lengths) == 4  # 8 pieces of 120 chars: two per sentence
    spans = [
        (e["caption"], a["tokens_positive"][0])
        for e in combined["images"]
        for a in combined["annotations"]
        if a["image_id"] == e["id"]
    ]
    assert all(caption[b:e] == "caption" for caption, (b, e) in spans)
