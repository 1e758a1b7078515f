"""Where a shapes QA model fails: answer accuracy per question template and true answer, against what the
question's words alone could score.

A template is a family with its parameter: the comparison of ``compare_number`` (more / fewer / equal), the
attribute of ``compare_attribute`` and ``query_attribute`` (size / color / material / shape). For each yes /
no template the report adds the accuracy of always giving that template's most common answer on the split
("words only"): a model that reads the template but compares nothing scores about that. On an answer-balanced
question set (``mdetr data shapes --qa`` writes one) it is 50 %.

    python bench/qa_templates.py runs/bench_shapes_qa_e8/train/best --data runs/bench_shapes_qa/shapes \
        --split val

Runs the checkpoint on every question of ``{data}/{split}_qa.json`` (the evaluation loader of its config, as
``mdetr evaluate``) and prints one row per template and answer; ``--output`` writes them as JSON too.
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

import torch
from budgeted_training import load_split  # bench/, beside this script
from torch.utils.data import DataLoader

from mdetr.bundled import bundled_model_path
from mdetr.data.collate import collate
from mdetr.engine.qa import predict_answers

YES_NO = ("yes", "no")


def template_of(program: dict) -> str:
    """``compare_attribute:size``, ``compare_number:more``, ``exist``, ..."""
    parameter = program.get("comparison") or program.get("attribute")
    return f"{program['family']}:{parameter}" if parameter else program["family"]


def template_table(entries: list[dict], predicted: dict[int, str]) -> list[dict]:
    """One row per (template, true answer) with the questions, the correct ones, the template's totals and,
    for a yes / no template, its words-only accuracy (its majority answer's share; None otherwise)."""
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    correct: dict[tuple[str, str], int] = collections.Counter()
    for entry in entries:
        key, truth = template_of(entry["program"]), str(entry["answer"])
        answer = truth if truth in YES_NO else "(other)"
        counts[key][answer] += 1
        correct[key, answer] += predicted[entry["id"]] == truth
    rows = []
    for key in sorted(counts):
        total = sum(counts[key].values())
        words_only = max(counts[key].values()) / total if set(counts[key]) <= set(YES_NO) else None
        for answer in sorted(counts[key]):
            rows.append({"template": key, "answer": answer, "questions": counts[key][answer],
                         "correct": correct[key, answer], "template_questions": total,
                         "template_correct": sum(correct[key, a] for a in counts[key]),
                         "words_only": words_only})
    return rows


def format_table(rows: list[dict]) -> str:
    lines = [f"{'template':28s} {'answer':8s} {'right':>11s} {'template':>9s} {'words only':>11s}"]
    for r in rows:
        words = "" if r["words_only"] is None else f"{100 * r['words_only']:.1f}"
        template = f"{100 * r['template_correct'] / r['template_questions']:.1f}"
        right = f"{r['correct']:4d}/{r['questions']:<4d} {100 * r['correct'] / r['questions']:5.1f}"
        lines.append(f"{r['template']:28s} {r['answer']:8s} {right} {template:>6s} {words:>11s}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a QA checkpoint folder or bundled model name")
    parser.add_argument("--data", required=True, help="the shapes folder with {split}_qa.json")
    parser.add_argument("--split", default="val")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", default=None, help="also write the rows as JSON here")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    checkpoint = bundled_model_path(args.checkpoint) or Path(args.checkpoint)
    model, dataset = load_split(checkpoint, Path(args.data), f"{args.split}_qa.json")
    predictions = predict_answers(model, DataLoader(dataset, batch_size=16, collate_fn=collate))
    entries = [e for e in dataset.ground_truth["images"] if e["id"] in predictions]
    rows = template_table(entries, {i: p["answer"] for i, p in predictions.items()})
    print(format_table(rows))
    if args.output:
        Path(args.output).write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
    return rows


if __name__ == "__main__":
    main()
