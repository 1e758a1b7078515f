"""The main job behind ``make demo``.

By default the model bundled with the package (``mdetr_lite_shapes``) grounds sentences in the bundled
example scenes, which hold colour-shape pairs never seen in training, and the pictures are written out:
no data, no training, about a minute from a fresh install. ``train_minutes`` instead generates a shapes
set, trains ``mdetr_lite`` from the preset recipe for that long and grounds with the result.
"""

from __future__ import annotations

import json
from pathlib import Path

from mdetr.config import load_config

PRESET = Path(__file__).resolve().parents[2] / "configs" / "mdetr_lite_shapes.yaml"


def run_demo(output_dir: Path, *, model: str = "mdetr_lite_shapes", train_minutes: float | None = None,
             seed: int = 0) -> list[dict]:
    """Ground the bundled example sentences and write ``output_dir/predictions`` (PNGs, predictions.json).

    model: a bundled model name or a checkpoint folder (ignored when training).
    train_minutes: train a fresh ``mdetr_lite`` for this long first (data in ``output_dir/shapes``,
        checkpoints in ``output_dir/train``).
    """
    from mdetr.bundled import example_scenes
    from mdetr.inference.predictor import Predictor, open_image
    from mdetr.inference.visualize import draw_groundings

    if train_minutes is not None:
        model = str(_train(output_dir, minutes=train_minutes, seed=seed))
    print(f"loading {model} ...")
    predictor = Predictor.from_checkpoint(model)
    out = output_dir / "predictions"
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for scene in example_scenes():
        image = open_image(scene["image"])
        for k, text in enumerate(scene["texts"]):
            grounding = predictor.predict(image, text, threshold=0.0, top_k=1)
            picture = out / f"{scene['image'].stem}_{k}.png"
            draw_groundings(image, grounding, caption=text).save(picture)
            detections = grounding.to_json()
            records.append({"image": scene["image"].name, "text": text, "picture": str(picture),
                            "detections": detections})
            best = detections[0] if detections else None
            found = (
                f"box {[round(v) for v in best['box_xyxy']]} score {best['score']:.2f}" if best else "no box"
            )
            print(f"{scene['image'].name}: {text!r} -> {found}")
    (out / "predictions.json").write_text(json.dumps(records, indent=2))
    print(f"pictures and predictions.json: {out}")
    return records


def _train(output_dir: Path, *, minutes: float, seed: int) -> Path:
    from mdetr.data.shapes import generate_shapes
    from mdetr.engine.train import train

    data_dir = output_dir / "shapes"
    if not (data_dir / "val_unseen.json").exists():
        print(f"generating synthetic shapes in {data_dir} ...")
        generate_shapes(data_dir, seed=seed, num_train=600, num_val=40, num_val_unseen=40, progress=True)
    overrides = [
        f"data.train_ann={data_dir / 'train.json'}", f"data.train_images={data_dir / 'images'}",
        f"data.val_ann={data_dir / 'val.json'}", f"data.val_images={data_dir / 'images'}",
        f"train.output_dir={output_dir / 'train'}", f"train.max_minutes={minutes}", "train.epochs=100",
        "train.overwrite=true",
    ]
    config = load_config(PRESET if PRESET.exists() else None, overrides)
    print(f"training mdetr_lite for {minutes:g} minutes (progress below) ...")
    result = train(config)
    print(f"best validation {('P@1' if config.data.refexp_datasets else 'AP50')}: {result.best_metric:.3f}")
    return result.output_dir / ("best" if (result.output_dir / "best").exists() else "last")
