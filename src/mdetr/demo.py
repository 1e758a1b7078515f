"""The main job behind ``make demo``: synthetic shapes -> a few minutes of training -> grounded pictures."""

from __future__ import annotations

import json
from pathlib import Path

from mdetr.config import load_config

PRESET = Path(__file__).resolve().parents[2] / "configs" / "mdetr_lite_shapes.yaml"


def run_demo(output_dir: Path, *, minutes: float = 4.0, num_examples: int = 6, seed: int = 0) -> list[dict]:
    """Generate a small shapes set, train ``mdetr_lite`` for ``minutes``, ground held-out expressions.

    Writes ``output_dir/shapes`` (data), ``output_dir/train`` (checkpoints, log) and
    ``output_dir/predictions`` (PNGs and ``predictions.json``); returns the prediction records.
    """
    from mdetr.data.shapes import generate_shapes
    from mdetr.engine.train import train
    from mdetr.inference.predictor import Predictor, open_image
    from mdetr.inference.visualize import draw_groundings

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
    checkpoint = result.output_dir / ("best" if (result.output_dir / "best").exists() else "last")
    predictor = Predictor.from_checkpoint(checkpoint)

    gt = json.loads((data_dir / "val_unseen.json").read_text())
    entries = [e for e in gt["images"] if e["dataset_name"] == "shapes_refexp"][:num_examples]
    out = output_dir / "predictions"
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for entry in entries:
        image_path = data_dir / "images" / entry["file_name"]
        grounding = predictor.predict(image_path, entry["caption"], threshold=0.0, top_k=1)
        picture = out / f"{entry['id']:06d}.png"
        draw_groundings(open_image(image_path), grounding, caption=entry["caption"]).save(picture)
        records.append({"image": str(image_path), "text": entry["caption"], "picture": str(picture),
                        "detections": grounding.to_json()})
    (out / "predictions.json").write_text(json.dumps(records, indent=2))
    print(f"\nbest validation {('P@1' if config.data.refexp_datasets else 'AP50')}: {result.best_metric:.3f}")
    print(f"checkpoint: {checkpoint}")
    print(f"pictures and predictions.json (held-out attribute-shape pairs): {out}")
    return records
