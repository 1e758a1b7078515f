"""The ``mdetr`` command: train, evaluate, predict, data, demo. Every subcommand is a ``main(argv)``."""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from pathlib import Path

from mdetr.config import ConfigError
from mdetr.data.shapes import RELATION_FRACTION
from mdetr.data.shapes import SPLITS as SHAPES_SPLITS

COMPILE_HELP = ("torch.compile the inference copy (needs a C++ compiler): up to 25%% faster per forward "
                "pass, most with --dtype bfloat16, but each new batch shape (batch size and resized image "
                "size) first compiles for seconds, for up to eight shapes per process: for images of few "
                "aspect ratios")


def _user_errors() -> tuple[type[BaseException], ...]:
    from mdetr.data.errors import DataError
    from mdetr.engine.checkpoint import CheckpointError
    from mdetr.engine.distributed import DistributedSetupError
    from mdetr.engine.faults import NonFiniteLossError

    return (ConfigError, DataError, CheckpointError, NonFiniteLossError, DistributedSetupError,
            FileNotFoundError, FileExistsError)


def train_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mdetr train",
                                     description="Train an MDETR model from a YAML preset.")
    parser.add_argument("--config", required=True, help="YAML preset (see configs/)")
    parser.add_argument("--output-dir", help="shorthand for train.output_dir=...")
    parser.add_argument("--resume", help="continue from a checkpoint folder (e.g. runs/x/last)")
    parser.add_argument("--init", metavar="WEIGHTS",
                        help="fine-tune: start from these weights (checkpoint folder, bundled name or "
                             "official .pth); shorthand for train.init_weights=...")
    parser.add_argument("--device", help="shorthand for train.device=...")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--task", choices=["grounding", "detection"],
                        help="grounding (MDETR on captions, the default) or detection (the SMCA/DETR object "
                             "detector on COCO-format categories); replaces the preset's task")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="override preset values")
    args = parser.parse_args(argv)
    from mdetr.config import load_config
    from mdetr.engine.train import train

    overrides = list(args.overrides)
    if args.output_dir:
        overrides.append(f"train.output_dir={args.output_dir}")
    if args.device:
        overrides.append(f"train.device={args.device}")
    if args.init:
        overrides.append(f"train.init_weights={args.init}")
    config = load_config(args.config, overrides, task=args.task)
    result = train(config, resume=args.resume, progress=not args.no_progress)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one summary line (rank 0's)
        print(f"done: {result.epochs_done} epochs, {result.steps} steps; best {result.best_metric:.4f}; "
              f"checkpoints in {result.output_dir}")
    return 0


def evaluate_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mdetr evaluate",
                                     description="Evaluate a checkpoint on an annotation file.")
    parser.add_argument("checkpoint", help="checkpoint folder written by mdetr train")
    parser.add_argument("--ann", required=True, nargs="+",
                        help="MDETR-format annotation JSON (an LVIS v1 file for --task lvis; several "
                             "finetune_*_{split}.json files for --task refexp; "
                             "finetune_phrasecut_{split}.json or the original refer_{split}.json for "
                             "--task phrasecut)")
    parser.add_argument("--images", required=True, help="image folder")
    parser.add_argument("--refexp-datasets", default="",
                        help="comma-separated dataset_name values for precision@k")
    parser.add_argument("--overlap", choices=["giou", "iou"], default="giou",
                        help="precision@k criterion: GIoU >= 0.5 (official MDETR) or IoU >= 0.5")
    parser.add_argument("--weights", choices=["model", "ema"], default="model")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", choices=["none", "bf16"], default="none",
                        help="bf16 autocast for the forward passes (its accuracy cost: BENCHMARKS.md)")
    parser.add_argument("--optimize", action="store_true",
                        help="run the Predictor's inference copy (batch norms folded, channels-last "
                             "backbone, float32 linear layers on oneDNN): faster on CPU, the same outputs up "
                             "to float rounding; default: the model as loaded")
    parser.add_argument("--output", help="write the metrics as JSON here")
    parser.add_argument("--predictions", metavar="FILE",
                        help="QA checkpoints: also write every answer, for GQA as the submission JSON "
                             "[{questionId, prediction}], for CLEVR one answer per line in questionId order")
    parser.add_argument("--answers", metavar="FILE",
                        help="GQA: the answer vocabularies (gqa_answer2id_by_type.json) of a converted "
                             "official checkpoint; a checkpoint trained here carries its own")
    parser.add_argument("--task", choices=["grounding", "detection", "flickr", "refexp", "lvis", "phrasecut"],
                        help="detection: COCO AP with categories (--ann is a COCO detection file); flickr, "
                             "refexp, lvis, phrasecut: the paper's benchmark and table (docs/TASKS.md); "
                             "default: the checkpoint's task (phrasecut for a segmentation model)")
    _add_benchmark_arguments(parser)
    args = parser.parse_args(argv)
    if args.task is None and _checkpoint_has_masks(args.checkpoint):
        args.task = "phrasecut"
    if args.task in ("flickr", "refexp", "lvis", "phrasecut"):
        return _evaluate_benchmark(args)
    if len(args.ann) > 1:
        parser.error("several --ann files are only read by --task refexp")
    args.ann = args.ann[0]
    from mdetr.engine.detection import checkpoint_task

    task = checkpoint_task(args.checkpoint)
    if args.task is not None and args.task != task:
        raise ConfigError(f"{args.checkpoint} was trained for {task}, not {args.task}")
    if task == "detection":
        return _evaluate_detection(args)
    from torch.utils.data import DataLoader

    from mdetr.data.build import build_dataset
    from mdetr.data.collate import collate
    from mdetr.engine.evaluate import evaluate
    from mdetr.eval import CocoBoxEvaluator, RefExpEvaluator

    model = _load_for_evaluation(args)
    if model.config.qa_dataset == "gqa":
        return _evaluate_gqa(args, model)
    dataset = build_dataset(model.train_config.data, "val", model.tokenizer, ann_file=args.ann,
                            image_root=args.images)
    if model.config.qa_dataset == "clevr":
        return _evaluate_qa(args, model, dataset)
    if model.config.predict_final:
        return _evaluate_clevr_ref(args, model, dataset)
    evaluators: dict[str, object] = {"box_ap": CocoBoxEvaluator(dataset.ground_truth)}
    names = [n for n in args.refexp_datasets.split(",") if n]
    if names:
        evaluators["refexp"] = RefExpEvaluator(dataset.ground_truth, dataset_names=names,
                                               overlap=args.overlap)
    loader = DataLoader(dataset, batch_size=args.batch_size, collate_fn=collate)
    import torch

    with torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16, enabled=args.amp == "bf16"):
        metrics = evaluate(model, loader, evaluators, device=args.device, progress=True)
    print(format_metrics(metrics))
    if args.output:
        Path(args.output).write_text(json.dumps(metrics, indent=2))
    return 0


def _load_for_evaluation(args: argparse.Namespace) -> object:
    """The checkpoint's model, or with ``--optimize`` its float32 inference copy (which autocast, when
    ``--amp bf16`` turns it on, runs in bf16 as it does the model)."""
    from mdetr.builder import load
    from mdetr.inference.optimize import optimize_for_inference

    model = load(args.checkpoint, weights=args.weights, device=args.device)
    return optimize_for_inference(model) if args.optimize else model


def _evaluate_qa(args: argparse.Namespace, model: object, dataset: object) -> int:
    """Answer accuracy (overall, per question family, per answer type) and box AP of a CLEVR QA checkpoint."""
    from torch.utils.data import DataLoader

    from mdetr.data.collate import collate
    from mdetr.engine.qa import check_answers, evaluate_qa, format_qa_metrics
    from mdetr.models.heads import clevr_attributes

    check_answers(dataset, clevr_attributes(model.config.qa_attributes), require_answers=False)
    loader = DataLoader(dataset, batch_size=args.batch_size, collate_fn=collate)
    metrics = evaluate_qa(model, loader, dataset, device=args.device, progress=True,
                          predictions_file=args.predictions)
    print(format_qa_metrics(metrics))
    if args.output:
        Path(args.output).write_text(json.dumps(metrics, indent=2))
    return 0


def _evaluate_gqa(args: argparse.Namespace, model: object) -> int:
    """GQA accuracy (overall, per semantic and structural type) and, with --predictions, the submission."""
    from mdetr.engine.gqa import evaluate_gqa_file, format_gqa_metrics

    metrics = evaluate_gqa_file(model, args.ann, args.images, batch_size=args.batch_size, device=args.device,
                                answers_file=args.answers, predictions_file=args.predictions, progress=True)
    print(format_gqa_metrics(metrics))
    if args.predictions:
        print(f"wrote {metrics['qa']['num_predicted']} answers to {args.predictions}")
    if args.output:
        Path(args.output).write_text(json.dumps(metrics, indent=2))
    return 0


def _evaluate_clevr_ref(args: argparse.Namespace, model: object, dataset: object) -> int:
    """CLEVR-Ref+ precision@k of the boxes ranked by score x p(final), and box AP."""
    from torch.utils.data import DataLoader

    from mdetr.data.collate import collate
    from mdetr.engine.clevr_ref import score_clevr_ref
    from mdetr.engine.evaluate import predict_dataset

    loader = DataLoader(dataset, batch_size=args.batch_size, collate_fn=collate)
    predictions = predict_dataset(model, loader, device=args.device, progress=True)
    metrics = score_clevr_ref(dataset.ground_truth, predictions, overlap=args.overlap)
    print(format_metrics(metrics).replace("Referring expressions", "CLEVR-Ref+ referring expressions"))
    if args.output:
        Path(args.output).write_text(json.dumps(metrics, indent=2))
    return 0


def _checkpoint_has_masks(path: str) -> bool:
    """Whether a checkpoint folder holds a segmentation model (its config has model.masks)."""
    if not Path(path).is_dir():
        return False
    from mdetr.engine.checkpoint import read_checkpoint_doc

    return bool(read_checkpoint_doc(path)["config"].get("model", {}).get("masks", False))


def _add_benchmark_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("benchmarks (--task flickr / refexp / lvis / phrasecut)")
    group.add_argument("--flickr-root", help="original Flickr30k Entities folder ({split}.txt, Annotations/, "
                       "Sentences/): the official ground truth; without it, the --ann file's boxes are used")
    group.add_argument("--split", help="Flickr split (default: from the file name, e.g. final_flickr_"
                       "separateGT_val.json)")
    group.add_argument("--protocol", choices=["any", "merged"], default="any",
                       help="Flickr ground truth: ANY-BOX (every box of the entity) or MERGED-BOXES")
    group.add_argument("--chunk-size", type=int, default=32, help="LVIS class names encoded and run together")
    group.add_argument("--topk", type=int, default=10000, help="LVIS AP fixed: detections kept per category")
    group.add_argument("--max-images", type=int, default=0, help="LVIS: evaluate only the first N images")
    group.add_argument("--image-data", help="PhraseCut: image_data_split3000.json (the image sizes) for an "
                       "original refer_{split}.json file; default: the one beside it")


def _evaluate_benchmark(args: argparse.Namespace) -> int:
    from mdetr.engine.detection import checkpoint_task
    from mdetr.eval.tasks import BenchmarkOptions, format_table, run_benchmark

    if checkpoint_task(args.checkpoint) != "grounding":
        raise ConfigError(f"{args.checkpoint} is a detection checkpoint; --task {args.task} needs an MDETR "
                          "grounding model")
    model = _load_for_evaluation(args)
    options = BenchmarkOptions(
        batch_size=args.batch_size, device=args.device, progress=True, flickr_root=args.flickr_root,
        split=args.split, protocol=args.protocol, overlap=args.overlap,
        refexp_datasets=[n for n in args.refexp_datasets.split(",") if n], chunk_size=args.chunk_size,
        topk=args.topk, max_images=args.max_images, image_data=args.image_data)
    try:
        metrics = run_benchmark(args.task, model, args.ann, args.images, options)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_table(metrics))
    if args.output:
        Path(args.output).write_text(json.dumps(metrics, indent=2))
    return 0


def _evaluate_detection(args: argparse.Namespace) -> int:
    from mdetr.engine.detection import evaluate_checkpoint, format_detection_metrics

    metrics = evaluate_checkpoint(args.checkpoint, args.ann, args.images, weights=args.weights,
                                  batch_size=args.batch_size, device=args.device, progress=True,
                                  optimize=args.optimize)
    print(format_detection_metrics(metrics))
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
        lines.append("Class-agnostic box AP: "
                     + "  ".join(f"{k} {b[k] * 100:.2f}" for k in ("AP", "AP50", "AP75")))
    return "\n".join(lines)


def _expand_images(spec: list[str]) -> list[Path]:
    paths: list[Path] = []
    for item in spec:
        p = Path(item)
        if p.is_dir():
            paths += sorted(q for q in p.iterdir()
                            if q.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp", ".webp"))
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
    what = parser.add_mutually_exclusive_group()  # one is required, except for a detection checkpoint
    what.add_argument("--text", help="the sentence to ground (for a segmentation checkpoint: the phrase "
                      "whose region is segmented; predictions.json then holds the mask as RLE)")
    what.add_argument("--classes", help='comma-separated class names to detect, e.g. "cat,dog"')
    what.add_argument("--question", help="a question to answer (a QA checkpoint, model.qa_dataset=clevr or "
                      "gqa), e.g. \"how many red things are there?\": prints the answer and the boxes the "
                      "question's phrases refer to")
    parser.add_argument("--threshold", type=float,
                        help="keep boxes with 1 - p(no object) above this (default "
                        "0.7); for a detection checkpoint, category probability above this (default 0.3)")
    parser.add_argument("--top-k", type=int, help="keep at most this many boxes per image")
    parser.add_argument("--batch-size", type=int, default=4, help="images per forward pass")
    parser.add_argument("--output-dir", default="runs/predict")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="bfloat16 runs the model under bf16 autocast")
    parser.add_argument("--compile", action="store_true", help=COMPILE_HELP)
    parser.add_argument("--token-map", action="store_true",
                        help="also draw each box's probability over the caption's tokens (token_maps/*.png)")
    parser.add_argument("--answers", metavar="FILE",
                        help="GQA: the answer vocabularies (gqa_answer2id_by_type.json) of a converted "
                             "official checkpoint; a checkpoint trained here carries its own")
    args = parser.parse_args(argv)
    from mdetr.engine.detection import checkpoint_task

    if checkpoint_task(args.checkpoint) == "detection":
        if args.text is not None or args.classes is not None or args.question is not None:
            parser.error("a detection checkpoint predicts its own categories: drop --text / --classes / "
                         "--question")
        return _predict_detection(args)
    if args.text is None and args.classes is None and args.question is None:
        parser.error("one of the arguments --text --classes --question is required")
    if args.threshold is None:
        args.threshold = 0.7
    class_names = None
    if args.classes is not None:
        class_names = [n.strip() for n in args.classes.split(",") if n.strip()]
    if class_names == []:
        parser.error("--classes needs at least one class name")
    if args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    from mdetr.inference.predictor import Predictor

    paths = _expand_images(args.image)
    predictor = Predictor.from_checkpoint(args.checkpoint, device=args.device, dtype=args.dtype,
                                          compile=args.compile)
    if args.question is not None and predictor.model.config.qa_dataset == "gqa":
        from mdetr.engine.gqa import attach_answer_vocab

        if args.answers is not None:
            attach_answer_vocab(predictor.model, args.answers)
        if not predictor.model.config.qa_answers:
            parser.error(f"{args.checkpoint} is a GQA model without its answer vocabularies (a converted "
                         "official checkpoint): give them with --answers gqa_answer2id_by_type.json")
    segment = bool(getattr(predictor.model.config, "masks", False))
    if segment and args.text is None:
        parser.error("a segmentation checkpoint (model.masks) segments what a sentence refers to: "
                     "give --text")
    if segment and args.top_k is not None:
        parser.error("--top-k does not apply to a segmentation checkpoint: its region is the union of the "
                     "masks of every box scoring above --threshold (the PhraseCut protocol)")
    text = args.question if args.question is not None else args.text
    writer = _PredictionWriter(Path(args.output_dir), predictor, text=text, class_names=class_names,
                               token_map=args.token_map)
    try:
        for start in range(0, len(paths), args.batch_size):
            batch = paths[start: start + args.batch_size]
            if segment:  # the union of the masks of the boxes above the threshold, as PhraseCut
                regions = predictor.segment_batch(batch, [args.text] * len(batch), threshold=args.threshold)
                for path, region in zip(batch, regions, strict=True):
                    writer.add(path, region.grounding, segmentation=region)
                continue
            if args.question is not None:
                answers = predictor.answer_batch(batch, [args.question] * len(batch),
                                                 threshold=args.threshold, top_k=args.top_k)
                for path, answer in zip(batch, answers, strict=True):
                    writer.add(path, answer.grounding, answer=answer)
                continue
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


def _predict_detection(args: argparse.Namespace) -> int:
    from mdetr.engine.detection import predict_images

    out = Path(args.output_dir)
    records = predict_images(args.checkpoint, _expand_images(args.image), out,
                             threshold=0.3 if args.threshold is None else args.threshold, top_k=args.top_k,
                             batch_size=args.batch_size, device=args.device, dtype=args.dtype,
                             compile=args.compile)
    for record in records:
        best = "; ".join(f"{d['phrase']} {d['score']:.2f}" for d in record["detections"][:3])
        print(f"{record['image']}: {len(record['detections'])} boxes {best}")
    print(f"wrote {out / 'predictions.json'}, {out / 'results_coco.json'} and {len(records)} pictures "
          f"in {out}")
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

    def add(self, path: Path, grounding: object, *, answer: object | None = None,
            segmentation: object | None = None) -> None:
        """One image's outputs; ``answer`` (a :class:`~mdetr.inference.predictor.Answer`) for a question,
        ``segmentation`` (a :class:`~mdetr.inference.postprocess.Segmentation`) for a segmentation model:
        its mask is drawn under the boxes and written as RLE in the record."""
        from mdetr.inference.predictor import open_image
        from mdetr.inference.visualize import draw_groundings, draw_segmentation

        image_id = len(self.images) + 1
        self.images.append({"id": image_id, "file_name": str(path)})
        picture = self.out / f"{path.stem}.png"
        caption = self.text if self.text is not None else ", ".join(self.class_names)
        if segmentation is not None:
            picture_image = draw_segmentation(open_image(path), segmentation.mask.numpy(), grounding,
                                              caption=caption)
            picture_image.save(picture)
        else:
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
        record = {"image": str(path), "image_id": image_id, "text": caption, "picture": str(picture),
                  "detections": detections}
        if segmentation is not None:
            region = segmentation.to_json()
            record.update(mask_rle=region["mask_rle"], mask_area=region["mask_area"])
            print(f"{path}: mask of {region['mask_area']} pixels from {len(detections)} boxes")
        elif answer is not None:
            record.update({k: v for k, v in answer.to_json().items() if k != "boxes"})
            print(f"{path}: {caption}")
            print(f"  answer: {answer.answer} ({answer.answer_type}, confidence {answer.confidence:.2f})")
            print(f"  supporting boxes: {len(detections)}")
            for d in detections:
                box = ", ".join(f"{v:.1f}" for v in d["box_xyxy"])
                print(f"    {d['phrase']!r} {d['score']:.2f} [{box}]")
        else:
            best = "; ".join(f"{d['phrase']!r} {d['score']:.2f}" for d in detections[:3])
            print(f"{path}: {len(detections)} boxes {best}")
        self.records.append(record)

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
    shapes.add_argument("--relation-fraction", type=_fraction, default=RELATION_FRACTION,
                        help="how often an object that attributes alone identify is still referred to "
                             "through a spatial relation (default %(default)s; those that attributes cannot "
                             "identify always are)")
    shapes.add_argument("--relation-needed", action="store_true",
                        help="describe the target of a relation, where the scene allows, by words that other "
                             "objects match too, so that only the relation tells it apart")
    shapes.add_argument("--annotate-anchors", action="store_true",
                        help="also give the anchor of every relation a box (span: the anchor phrase) and "
                             "mark every box isfinal 1 (referred) or 0 (anchor), the CLEVR-Ref+ layout, for "
                             "model.predict_final=true")
    shapes.add_argument("--detection", choices=["shape", "shape_color"],
                        help="also write COCO detection files {split}_detection_{scheme}.json whose "
                             "categories are the shapes or the (colour, shape) pairs")
    shapes.add_argument("--qa", action="store_true",
                        help="also write CLEVR-style question-answer files {split}_qa.json (exist, count, "
                             "compare number, query attribute, compare attribute; yes / no answers "
                             "balanced per template; for configs/mdetr_lite_shapes_qa.yaml)")
    shapes.add_argument("--questions-per-scene", type=_positive_int, default=4,
                        help="questions per scene with --qa")
    shapes.add_argument("--qa-formats", action="store_true",
                        help="with --qa, also write the questions in the original GQA layout (gqa/: "
                             "questions, scene graphs, JPEG images) and the CLEVR v1.0 layout "
                             "(clevr/CLEVR_{split}_questions.json)")
    shapes_qa = sub.add_parser("shapes-qa", help="write (or rewrite) the question files {split}_qa.json of "
                               "shapes scenes already generated, e.g. more questions per training scene")
    shapes_qa.add_argument("output_dir", help="a folder written by 'mdetr data shapes'")
    shapes_qa.add_argument("--splits", nargs="+", choices=SHAPES_SPLITS, default=list(SHAPES_SPLITS),
                           help="the splits to write; the others' files are left as they are")
    shapes_qa.add_argument("--questions-per-scene", type=_positive_int, default=4)
    shapes_qa.add_argument("--seed", type=int, default=0)
    validate = sub.add_parser("validate", help="list every problem in an MDETR-format annotation file")
    validate.add_argument("ann_file")
    validate.add_argument("--images", help="image folder (checks that every image opens and has its size)")
    validate.add_argument("--text-encoder", default="minilm",
                          help="tokenizer used to check spans and lengths")
    _add_task_data_parsers(sub)
    args = parser.parse_args(argv)
    if args.command in ("combine", "flickr", "refexp", "lvis", "phrasecut", "gqa"):
        return _task_data(args)
    if args.command == "shapes-qa":
        from mdetr.data.shapes_qa import generate_shapes_qa

        for split, path in generate_shapes_qa(args.output_dir, seed=args.seed, splits=args.splits,
                                              questions_per_scene=args.questions_per_scene,
                                              progress=True).items():
            print(f"{split} qa: {path}")
        return 0
    if args.command == "shapes":
        from mdetr.data.shapes import generate_shapes

        files = generate_shapes(args.output_dir, seed=args.seed, num_train=args.num_train,
                                num_val=args.num_val, num_val_unseen=args.num_val_unseen,
                                image_size=args.image_size,
                                relation_fraction=args.relation_fraction,
                                relation_needed=args.relation_needed,
                                annotate_anchors=args.annotate_anchors, progress=True)
        if args.detection:
            from mdetr.data.shapes import export_detection

            files.update({f"{split} detection": path for split, path
                          in export_detection(args.output_dir, scheme=args.detection).items()})
        if args.qa:
            from mdetr.data.shapes_qa import generate_shapes_qa

            files.update({f"{split} qa": path for split, path in generate_shapes_qa(
                args.output_dir, seed=args.seed, questions_per_scene=args.questions_per_scene,
                progress=True).items()})
            if args.qa_formats:
                from mdetr.data.shapes_qa import export_clevr_format, export_gqa_format

                files.update({f"{split} gqa": path
                              for split, path in export_gqa_format(args.output_dir).items()})
                files.update({f"{split} clevr": path
                              for split, path in export_clevr_format(args.output_dir).items()})
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


def _add_task_data_parsers(sub: argparse._SubParsersAction) -> None:
    """``mdetr data combine / flickr / refexp / lvis / phrasecut``: build MDETR-format files from the
    published ones."""
    combine = sub.add_parser("combine", help="merge captions per image into pre-training sentences (graph "
                             "colouring), leaving out every image of the evaluation files")
    combine.add_argument("output", help="the combined MDETR-format JSON to write")
    combine.add_argument("--input", nargs="+", required=True, metavar="FILE[=SOURCE]",
                         help="MDETR files whose captions are merged; =SOURCE sets data_source (coco, vg...)")
    combine.add_argument("--keep", nargs="*", default=[], metavar="FILE[=SOURCE]",
                         help="MDETR files copied unmerged (Flickr30k in MDETR's pre-training)")
    combine.add_argument("--exclude", nargs="*", default=[], metavar="FILE[=SOURCE]",
                         help="val/test files (MDETR, COCO or LVIS JSON) whose images are left out")
    combine.add_argument("--max-chars", type=int, default=250, help="merged sentences stay shorter than this")
    combine.add_argument("--conflict-iou", type=float, default=0.5,
                         help="captions with boxes overlapping by more than this IoU conflict")
    combine.add_argument("--prefix-sources", action="store_true",
                         help="write file_name as SOURCE/file_name (one image root with a folder per source)")
    flickr = sub.add_parser("flickr", help="Flickr30k Entities (Annotations/*.xml, Sentences/*.txt) to the "
                            "MDETR format")
    flickr.add_argument("root", help="the Flickr30k Entities folder ({split}.txt, Annotations/, Sentences/)")
    flickr.add_argument("output")
    flickr.add_argument("--split", choices=["train", "val", "test"], required=True)
    flickr.add_argument("--merged", action="store_true", help="one enclosing box per entity (mergedGT)")
    refexp = sub.add_parser("refexp", help="RefCOCO/RefCOCO+/RefCOCOg (refs pickle, instances.json) to the "
                            "MDETR format")
    refexp.add_argument("root", help="the refer data folder ({dataset}/refs(*).p, {dataset}/instances.json)")
    refexp.add_argument("output")
    refexp.add_argument("--dataset", choices=["refcoco", "refcoco+", "refcocog"], required=True)
    refexp.add_argument("--split", required=True, help="train/val/testA/testB (RefCOCOg: train/val/test)")
    refexp.add_argument("--instances", help="COCO instances file instead of {dataset}/instances.json")
    refexp.add_argument("--refs-file", help="e.g. 'refs(google).p' instead of the UNC / UMD partition")
    lvis = sub.add_parser("lvis", help="LVIS v1 to MDETR format (positive and negative class-name queries)")
    lvis.add_argument("lvis_json", help="lvis_v1_train.json, lvis_v1_val.json or lvis_v1_minival.json")
    lvis.add_argument("output")
    lvis.add_argument("--subset", type=int, choices=[1, 10, 100], default=100, help="percent of the images "
                      "(balanced so every category keeps positive and negative examples)")
    lvis.add_argument("--seed", type=int, default=42)
    phrasecut = sub.add_parser("phrasecut", help="a PhraseCut refer_{split}.json (original release) to the "
                               "MDETR format of finetune_phrasecut_{split}.json (boxes, polygons)")
    phrasecut.add_argument("refer_json", help="refer_train.json, refer_val.json, refer_test.json or "
                           "refer_miniv.json")
    phrasecut.add_argument("output")
    phrasecut.add_argument("--image-data", help="image_data_split3000.json (default: the one beside the "
                           "refer file)")
    gqa = sub.add_parser("gqa", help="GQA questions ({split}_{all,balanced}_questions.json, with the scene "
                         "graphs' boxes) to the MDETR format of finetune_gqa_{split}_{type}.json")
    gqa.add_argument("questions_json")
    gqa.add_argument("output")
    gqa.add_argument("--scene-graphs", help="{split}_sceneGraphs.json (default: beside the questions file or "
                     "in ../sceneGraphs; none for test-dev and the test splits)")
    gqa.add_argument("--images", help="the GQA image folder, to read the image sizes when there are no scene "
                     "graphs")
    gqa.add_argument("--vocab", metavar="FILE", help="also write the answer vocabularies built from these "
                     "questions, in the layout of gqa_answer2id_by_type.json")


def _fraction(value: str) -> float:
    try:
        fraction = float(value)
    except ValueError:
        fraction = -1.0
    if not 0.0 <= fraction <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got {value!r}")
    return fraction


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {value!r}")
    return number


def _file_spec(value: str) -> str | tuple[str, str]:
    path, sep, source = value.rpartition("=")
    return (path, source) if sep and path and "/" not in source else value


def _task_data(args: argparse.Namespace) -> int:
    if args.command == "combine":
        from mdetr.data.combine import combine

        report = combine([_file_spec(v) for v in args.input], args.output,
                         keep=[_file_spec(v) for v in args.keep],
                         exclude=[_file_spec(v) for v in args.exclude], max_chars=args.max_chars,
                         conflict_iou=args.conflict_iou, prefix_sources=args.prefix_sources)
        print(f"{report}; wrote {args.output}")
        return 0
    if args.command == "flickr":
        from mdetr.data.flickr import flickr_to_mdetr

        data = flickr_to_mdetr(args.root, args.split, merge_boxes=args.merged)
    elif args.command == "refexp":
        from mdetr.data.refcoco import refer_to_mdetr

        try:
            data = refer_to_mdetr(args.root, args.dataset, args.split, instances=args.instances,
                                  refs_file=args.refs_file)
        except ValueError as err:
            if type(err) is not ValueError:
                raise
            print(f"error: {err}", file=sys.stderr)
            return 2
    elif args.command == "phrasecut":
        from mdetr.data.phrasecut import phrasecut_to_mdetr

        data = phrasecut_to_mdetr(args.refer_json, args.image_data)
    elif args.command == "gqa":
        from mdetr.data.gqa import build_answer_vocab, read_gqa_file, write_answer_vocab
        from mdetr.data.questions import header_image_sizes

        sizes = header_image_sizes(args.images) if args.images else None
        data = read_gqa_file(args.questions_json, scene_graphs=args.scene_graphs, image_size=sizes)
        if args.vocab:
            write_answer_vocab(build_answer_vocab(data["images"]), args.vocab)
            print(f"wrote the answer vocabularies to {args.vocab}")
    else:
        from mdetr.data.lvis import lvis_subset_to_modulated

        data = lvis_subset_to_modulated(args.lvis_json, args.subset, seed=args.seed)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(data))
    print(f"wrote {len(data['images'])} entries and {len(data['annotations'])} boxes to {args.output}")
    return 0


def demo_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mdetr demo", description="Ground sentences in the bundled example "
                                     "scenes with the bundled model (or with one trained first, --train).")
    parser.add_argument("--output-dir", default="runs/demo")
    parser.add_argument("--model", default="mdetr_lite_shapes",
                        help="bundled model name or checkpoint folder")
    parser.add_argument("--train", type=float, default=None, metavar="MINUTES",
                        help="first generate shapes and train mdetr_lite for this many minutes")
    args = parser.parse_args(argv)
    from mdetr.demo import run_demo

    run_demo(Path(args.output_dir), model=args.model, train_minutes=args.train)
    return 0


def pack_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mdetr pack", description="Write a small inference checkpoint: only the weights training "
        "changed (the pretrained backbone and text encoder are rebuilt from their packages on load).")
    parser.add_argument("checkpoint", help="checkpoint folder written by mdetr train")
    parser.add_argument("output", help="folder to write")
    parser.add_argument("--weights", choices=["model", "ema"], default="model")
    parser.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default="float16")
    parser.add_argument("--card", help="JSON file of facts for the model card (command, seed, scores)")
    args = parser.parse_args(argv)
    import dataclasses

    import torch

    from mdetr.builder import build_model, load
    from mdetr.engine.checkpoint import save_pack

    model = load(args.checkpoint, weights=args.weights)
    base = build_model(dataclasses.replace(model.config, backbone_pretrained=True,
                                           text_encoder_pretrained=True))
    card = json.loads(Path(args.card).read_text()) if args.card else None
    summary = save_pack(args.output, model=model, base=base, config=model.train_config.to_dict(),
                        dtype=getattr(torch, args.dtype), card=card)
    print(f"wrote {args.output}: {summary['kept']} tensors ({summary['bytes'] / 2**20:.1f} MiB, "
          f"{args.dtype}); {summary['omitted']} taken from the pretrained parts on load")
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


def serve_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mdetr serve", description="Serve a checkpoint over HTTP: POST /v1/ground (multipart image + "
        "text or classes, JSON detections out), GET /health, and a demo page at /. Needs the serve extra.")
    parser.add_argument("checkpoint", help="checkpoint folder")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--compile", action="store_true", help=COMPILE_HELP)
    parser.add_argument("--threshold", type=float, default=0.5, help="score cut when a request gives none")
    parser.add_argument("--max-upload-mb", type=float, default=10.0, help="largest request body, in MiB")
    parser.add_argument("--max-pixels", type=int, default=40_000_000, help="largest image, width x height")
    parser.add_argument("--max-text-chars", type=int, default=1000, help="longest text or class list")
    parser.add_argument("--worker-threads", "--workers-threads", dest="worker_threads", type=int, default=2,
                        help="threads that decode images and run the model (one forward pass at a time)")
    args = parser.parse_args(argv)
    try:
        from mdetr.serve import ServeLimits, create_app, run_server
    except ImportError as err:
        print(f'error: mdetr serve needs the serve extra (pip install "mdetr[serve]"): {err}',
              file=sys.stderr)
        return 2
    from mdetr.inference.predictor import Predictor

    try:
        limits = ServeLimits(max_upload_bytes=int(args.max_upload_mb * 2**20), max_pixels=args.max_pixels,
                             max_text_chars=args.max_text_chars, threshold=args.threshold)
        if args.worker_threads < 1:
            raise ValueError(f"--worker-threads must be at least 1, got {args.worker_threads}")
    except ValueError as err:
        parser.error(str(err))
    predictor = Predictor.from_checkpoint(args.checkpoint, device=args.device, dtype=args.dtype,
                                          compile=args.compile)
    run_server(create_app(predictor, limits, threads=args.worker_threads), host=args.host, port=args.port)
    return 0


def export_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mdetr export", description="Export a checkpoint to one ONNX file (text encoder included; "
        "dynamic batch, image size and text length), then check it against PyTorch with onnxruntime. Needs "
        "the onnx extra.")
    parser.add_argument("checkpoint",
                        help="checkpoint folder, bundled model name, or official .pth with --arch")
    parser.add_argument("--format", default="onnx", help="export format (onnx)")
    parser.add_argument("--output", required=True, help="file to write, e.g. model.onnx")
    parser.add_argument("--weights", choices=["model", "ema"], default="model")
    parser.add_argument("--arch", help="torch.hub name of an official .pth checkpoint")
    parser.add_argument("--opset", type=int, help="ONNX opset (default: the exporter's)")
    parser.add_argument("--atol", type=float, default=1e-4,
                        help="largest absolute difference from PyTorch the check accepts")
    parser.add_argument("--no-check", action="store_true", help="skip the comparison with PyTorch")
    args = parser.parse_args(argv)
    if args.format != "onnx":
        parser.error(f"--format {args.format!r} is not supported; the only export format is onnx")
    try:
        from mdetr.inference.export import (
            OnnxGroundingModel,
            compare_with_pytorch,
            example_inputs,
            export_onnx,
            require_onnx,
        )

        require_onnx()
    except ImportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from mdetr.builder import load

    model = load(args.checkpoint, weights=args.weights, arch=args.arch)
    names = export_onnx(model, args.output, opset=args.opset)
    size_mib = Path(args.output).stat().st_size / 2**20
    print(f"wrote {args.output} ({size_mib:.1f} MiB; outputs {', '.join(names)})")
    if args.no_check:
        return 0
    # Another image size, batch size and text length than the export traced, so dynamic axes are tested.
    inputs = example_inputs(model, image_size=(200, 136), captions=["a small green triangle"])
    check = compare_with_pytorch(model, OnnxGroundingModel(args.output), inputs)
    diffs = ", ".join(f"{name} {value:.1e}" for name, value in check.max_abs_diff.items())
    shapes = ", ".join(f"{name} {tuple(shape)}" for name, shape in check.input_shapes.items())
    print(f"onnxruntime vs PyTorch on {shapes}: largest absolute difference {diffs}")
    if check.worst() > args.atol:
        print(f"error: the exported model differs from PyTorch by more than {args.atol:g}", file=sys.stderr)
        return 1
    return 0


COMMANDS = {"train": train_main, "evaluate": evaluate_main, "predict": predict_main, "data": data_main,
            "demo": demo_main, "convert": convert_main, "serve": serve_main, "pack": pack_main,
            "export": export_main}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: mdetr {" + ",".join(COMMANDS) + "} ...\n\n"
              "  train     train a model from a YAML preset\n"
              "  evaluate  precision@k and box AP, or answer accuracy of a QA model; --task "
              "flickr|refexp|lvis|phrasecut prints the paper's tables\n"
              "  predict   ground a sentence or detect named classes in images (JSON + PNGs)\n"
              "  data      generate the shapes set, validate annotation files, convert Flickr30k / RefCOCO / "
              "LVIS / PhraseCut / GQA, combine pre-training captions\n"
              "  demo      the whole loop on synthetic shapes in a few minutes\n"
              "  convert   turn an official MDETR .pth checkpoint into a checkpoint folder\n"
              "  serve     an HTTP API and a demo page for a checkpoint\n"
              "  export    write a checkpoint as an ONNX model (dynamic image size and text length)",
              file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    if os.environ.get("MDETR_KEEP_FREED_MEMORY", "1") != "0":
        from mdetr.ops.allocator import keep_freed_memory

        keep_freed_memory()
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
