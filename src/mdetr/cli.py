"""The ``mdetr`` command: train, evaluate, predict, data, demo. Every subcommand is a ``main(argv)``."""

from __future__ import annotations

import argparse
import glob
import json
import sys
from pathlib import Path

from mdetr.config import ConfigError


def _user_errors() -> tuple[type[BaseException], ...]:
    from mdetr.data.errors import DataError
    from mdetr.engine.checkpoint import CheckpointError

    return (ConfigError, DataError, CheckpointError, FileNotFoundError, FileExistsError)


def train_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mdetr train", description="Train an MDETR model from a YAML preset.")
    parser.add_argument("--config", required=True, help="YAML preset (see configs/)")
    parser.add_argument("--output-dir", help="shorthand for train.output_dir=...")
    parser.add_argument("--resume", help="continue from a checkpoint folder (e.g. runs/x/last)")
    parser.add_argument("--device", help="shorthand for train.device=...")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="override preset values")
    args = parser.parse_args(argv)
    from mdetr.config import load_config
    from mdetr.engine.train import train

    overrides = list(args.overrides)
    if args.output_dir:
        overrides.append(f"train.output_dir={args.output_dir}")
    if args.device:
        overrides.append(f"train.device={args.device}")
    config = load_config(args.config, overrides)
    result = train(config, resume=args.resume, progress=not args.no_progress)
    print(f"done: {result.epochs_done} epochs, {result.steps} steps; best {result.best_metric:.4f}; "
          f"checkpoints in {result.output_dir}")
    return 0


def evaluate_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mdetr evaluate", description="Evaluate a checkpoint on an annotation file.")
    parser.add_argument("checkpoint", help="checkpoint folder written by mdetr train")
    parser.add_argument("--ann", required=True, help="MDETR-format annotation JSON")
    parser.add_argument("--images", required=True, help="image folder")
    parser.add_argument("--refexp-datasets", default="", help="comma-separated dataset_name values for precision@k")
    parser.add_argument("--overlap", choices=["giou", "iou"], default="giou",
                        help="precision@k criterion: GIoU >= 0.5 (official MDETR) or IoU >= 0.5")
    parser.add_argument("--weights", choices=["model", "ema"], default="model")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output", help="write the metrics as JSON here")
    args = parser.parse_args(argv)
    from torch.utils.data import DataLoader

    from mdetr.builder import load
    from mdetr.data.collate import collate
    from mdetr.data.build import build_dataset
    from mdetr.engine.evaluate import evaluate
    from mdetr.eval import CocoBoxEvaluator, RefExpEvaluator

    model = load(args.checkpoint, weights=args.weights, device=args.device)
    dataset = build_dataset(model.train_config.data, "val", model.tokenizer, ann_file=args.ann, image_root=args.images)
    evaluators: dict[str, object] = {"box_ap": CocoBoxEvaluator(dataset.ground_truth)}
    names = [n for n in args.refexp_datasets.split(",") if n]
    if names:
        evaluators["refexp"] = RefExpEvaluator(dataset.ground_truth, dataset_names=names, overlap=args.overlap)
    loader = DataLoader(dataset, batch_size=args.batch_size, collate_fn=collate)
    metrics = evaluate(model, loader, evaluators, device=args.device, progress=True)
    print(format_metrics(metrics))
    if args.output:
        Path(args.output).write_text(json.dumps(metrics, indent=2))
    return 0


def format_metrics(metrics: dict) -> str:
    lines = []
    if "refexp" in metrics:
        r = metrics["refexp"]
        lines.append(f"Referring expressions ({r['criterion']}), {r['num_evaluated']} expressions")
        for name, values in r.items():
            if isinstance(values, dict):
                lines.append(f"  {name:<20} " + "  ".join(f"{k} {v * 100:6.2f}" for k, v in values.items()))
    if "box_ap" in metrics:
        b = metrics["box_ap"]
        lines.append("Class-agnostic box AP: " + "  ".join(f"{k} {b[k] * 100:.2f}" for k in ("AP", "AP50", "AP75")))
    return "\n".join(lines)


def _expand_images(spec: list[str]) -> list[Path]:
    paths: list[Path] = []
    for item in spec:
        p = Path(item)
        if p.is_dir():
            paths += sorted(q for q in p.iterdir() if q.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp", ".webp"))
        elif any(ch in item for ch in "*?["):
            paths += sorted(Path(q) for q in glob.glob(item))
        else:
            paths.append(p)
    if not paths:
        raise FileNotFoundError(f"no images found in {' '.join(spec)}")
    return paths


def predict_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mdetr predict", description="Ground a sentence, or detect named classes, in images. Writes "
        "predictions.json, results_coco.json (COCO results format) with results_coco_images.json (image file "
        "names and category names with their ids) and one annotated PNG per image.")
    parser.add_argument("checkpoint", help="checkpoint folder")
    parser.add_argument("--image", nargs="+", required=True, help="image files, folders or globs")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--text", help="the sentence to ground")
    what.add_argument("--classes", help='comma-separated class names to detect, e.g. "cat,dog"')
    parser.add_argument("--threshold", type=float, default=0.7, help="keep boxes with 1 - p(no object) above this")
    parser.add_argument("--top-k", type=int, help="keep at most this many boxes per image")
    parser.add_argument("--batch-size", type=int, default=4, help="images per forward pass")
    parser.add_argument("--output-dir", default="runs/predict")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="bfloat16 runs the model under bf16 autocast")
    parser.add_argument("--token-map", action="store_true",
                        help="also draw each box's probability over the caption's tokens (token_maps/*.png)")
    args = parser.parse_args(argv)
    class_names = None
    if args.classes is not None:
        class_names = [n.strip() for n in args.classes.split(",") if n.strip()]
    if class_names == []:
        parser.error("--classes needs at least one class name")
    if args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    from mdetr.inference.predictor import Predictor

    paths = _expand_images(args.image)
    predictor = Predictor.from_checkpoint(args.checkpoint, device=args.device, dtype=args.dtype)
    writer = _PredictionWriter(Path(args.output_dir), predictor, text=args.text, class_names=class_names,
                               token_map=args.token_map)
    try:
        for start in range(0, len(paths), args.batch_size):
            batch = paths[start: start + args.batch_size]
            if class_names is not None:
                groundings = predictor.detect_batch(batch, class_names, threshold=args.threshold,
                                                    top_k=args.top_k)
            else:
                groundings = predictor.predict_batch(batch, [args.text] * len(batch),
                                                     threshold=args.threshold, top_k=args.top_k)
            for path, grounding in zip(batch, groundings, strict=True):
                writer.add(path, grounding)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    writer.close()
    return 0


class _PredictionWriter:
    """Writes ``mdetr predict`` outputs: pictures, token maps and the JSON files (on :meth:`close`)."""

    def __init__(self, out: Path, predictor: object, *, text: str | None, class_names: list[str] | None,
                 token_map: bool) -> None:
        self.out, self.predictor, self.token_map = out, predictor, token_map
        self.text, self.class_names = text, class_names
        out.mkdir(parents=True, exist_ok=True)
        if token_map:
            (out / "token_maps").mkdir(exist_ok=True)
        self.records: list[dict] = []
        self.coco: list[dict] = []
        self.images: list[dict] = []

    def add(self, path: Path, grounding: object) -> None:
        from mdetr.inference.predictor import open_image
        from mdetr.inference.visualize import draw_groundings

        image_id = len(self.images) + 1
        self.images.append({"id": image_id, "file_name": str(path)})
        picture = self.out / f"{path.stem}.png"
        caption = self.text if self.text is not None else ", ".join(self.class_names)
        draw_groundings(open_image(path), grounding, caption=caption).save(picture)
        detections = grounding.to_json()
        for k, detection in enumerate(detections):
            x0, y0, x1, y1 = detection["box_xyxy"]
            bbox = [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)]  # COCO: x, y, w, h
            result = {"image_id": image_id, "bbox": bbox, "score": detection["score"],
                      "phrase": detection["phrase"]}
            if "label" in detection:
                result["category_id"] = detection["label"] + 1  # COCO category ids start at 1
            self.coco.append(result)
            if self.token_map:
                detection["token_map"] = str(self._draw_token_map(path, grounding, k))
        self.records.append({"image": str(path), "image_id": image_id, "text": caption,
                             "picture": str(picture), "detections": detections})
        best = "; ".join(f"{d['phrase']!r} {d['score']:.2f}" for d in detections[:3])
        print(f"{path}: {len(detections)} boxes {best}")

    def _draw_token_map(self, path: Path, grounding: object, k: int) -> Path:
        from mdetr.inference.visualize import draw_token_map

        caption = grounding.prompts[k] if grounding.prompts is not None else self.text
        tokenizer = self.predictor.processor.tokenizer
        tokens = tokenizer.convert_ids_to_tokens(tokenizer(caption)["input_ids"])
        score = float(grounding.scores[k])
        chart = draw_token_map(grounding.token_probs[k, : len(tokens)].tolist(), tokens, no_object=1 - score,
                               title=f"{grounding.phrases[k]} {score:.2f}")
        target = self.out / "token_maps" / f"{path.stem}_box{k}.png"
        chart.save(target)
        return target

    def close(self) -> None:
        (self.out / "predictions.json").write_text(json.dumps(self.records, indent=2))
        (self.out / "results_coco.json").write_text(json.dumps(self.coco))
        index: dict[str, list] = {"images": self.images}
        if self.class_names is not None:
            index["categories"] = [{"id": i + 1, "name": n} for i, n in enumerate(self.class_names)]
        (self.out / "results_coco_images.json").write_text(json.dumps(index, indent=2))
        print(f"wrote {self.out / 'predictions.json'}, {self.out / 'results_coco.json'} and "
              f"{len(self.records)} pictures in {self.out}")


def data_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mdetr data", description="Dataset tools.")
    sub = parser.add_subparsers(dest="command", required=True)
    shapes = sub.add_parser("shapes", help="generate the synthetic shapes grounding set")
    shapes.add_argument("output_dir")
    shapes.add_argument("--seed", type=int, default=0)
    shapes.add_argument("--num-train", type=int, default=4000)
    shapes.add_argument("--num-val", type=int, default=300)
    shapes.add_argument("--num-val-unseen", type=int, default=300)
    shapes.add_argument("--image-size", type=int, default=256)
    validate = sub.add_parser("validate", help="list every problem in an MDETR-format annotation file")
    validate.add_argument("ann_file")
    validate.add_argument("--images", help="image folder (checks that every image opens and has its size)")
    validate.add_argument("--text-encoder", default="minilm", help="tokenizer used to check spans and lengths")
    args = parser.parse_args(argv)
    if args.command == "shapes":
        from mdetr.data.shapes import generate_shapes

        files = generate_shapes(args.output_dir, seed=args.seed, num_train=args.num_train, num_val=args.num_val,
                                num_val_unseen=args.num_val_unseen, image_size=args.image_size, progress=True)
        for split, path in files.items():
            print(f"{split}: {path}")
        return 0
    from transformers import AutoTokenizer

    from mdetr.data.validate import validate_annotations
    from mdetr.models.text import resolve_text_encoder

    tokenizer = AutoTokenizer.from_pretrained(resolve_text_encoder(args.text_encoder))
    problems = validate_annotations(args.ann_file, args.images, tokenizer=tokenizer)
    for problem in problems:
        print(f"{problem.file}: {problem.entry}: {problem.message}")
    print(f"{len(problems)} problem(s) in {args.ann_file}")
    return 1 if problems else 0


def demo_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mdetr demo", description="Generate shapes, train mdetr_lite briefly, "
                                     "and ground held-out expressions.")
    parser.add_argument("--output-dir", default="runs/demo")
    parser.add_argument("--minutes", type=float, default=4.0, help="training time budget")
    parser.add_argument("--num-examples", type=int, default=6)
    args = parser.parse_args(argv)
    from mdetr.demo import run_demo

    run_demo(Path(args.output_dir), minutes=args.minutes, num_examples=args.num_examples)
    return 0


def convert_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mdetr convert",
        description="Convert an official MDETR checkpoint (.pth from the torch.hub release) into a "
                    "checkpoint folder (safetensors + config + tokenizer files + conversion_report.json).")
    parser.add_argument("checkpoint", help="the official .pth file, e.g. pretrained_resnet101_checkpoint.pth")
    parser.add_argument("output_dir", help="checkpoint folder to write")
    parser.add_argument("--arch", required=True, help="its torch.hub name, e.g. mdetr_resnet101_refcoco")
    parser.add_argument("--text-encoder", help="local folder with the text encoder's config and tokenizer "
                        "files (roberta-base / distilroberta-base) when the Hugging Face cache lacks them")
    parser.add_argument("--ema", action="store_true", help="convert the moving-average weights (model_ema)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    args = parser.parse_args(argv)
    from mdetr.checkpoints.official import REPORT_FILE, convert_official

    out = Path(args.output_dir)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass --overwrite to replace it")
    convert_official(args.checkpoint, out, arch=args.arch, ema=args.ema, text_encoder=args.text_encoder)
    report = json.loads((out / REPORT_FILE).read_text())
    dropped = ", ".join(report["dropped"]) or "nothing"
    print(f"converted {report['num_tensors']} tensors ({report['num_values']:,} values) of {args.arch} "
          f"({report['weights']}) from {args.checkpoint}; dropped {dropped}")
    print(f"wrote {out} (report: {out / REPORT_FILE}); load it with mdetr.load({str(out)!r})")
    return 0


COMMANDS = {"train": train_main, "evaluate": evaluate_main, "predict": predict_main, "data": data_main,
            "demo": demo_main, "convert": convert_main}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: mdetr {" + ",".join(COMMANDS) + "} ...\n\n"
              "  train     train a model from a YAML preset\n"
              "  evaluate  precision@k and box AP of a checkpoint on an annotation file\n"
              "  predict   ground a sentence or detect named classes in images (JSON + PNGs)\n"
              "  data      generate the shapes set, validate annotation files\n"
              "  demo      the whole loop on synthetic shapes in a few minutes\n"
              "  convert   turn an official MDETR .pth checkpoint into a checkpoint folder", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    try:
        return COMMANDS[argv[0]](argv[1:])
    except _user_errors() as err:
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return 2


def _one_line(err: BaseException) -> str:
    """The error's own sentence, without the worker traceback a DataLoader adds when it re-raises."""
    text = str(err).strip()
    if "Original Traceback" in text:
        text = text.splitlines()[-1].split(": ", 1)[-1]
    return text


if __name__ == "__main__":
    sys.exit(main())
