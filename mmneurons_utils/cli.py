"""The ``mmneurons`` console script.

    mmneurons describe --model tiny-llava --scenes 500 --seed 0 --json
    mmneurons describe --model /path/to/llava-1.5-7b-hf --images photos/ --device cuda

Bad input exits with code 2 and one line naming the bad value and what is accepted.
With ``--json`` the last line of standard output is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys

from .images import read_image_folder
from .nouns import NounTaggerMissing, caption_scores
from .scenes import make_scenes


class CliError(ValueError):
    """A bad command-line value."""


def _int_at_least(minimum: int, what: str):
    """An argparse type: an integer ≥ ``minimum``, else a one-line error naming the value."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value
    return parse


_positive_int = _int_at_least(1, "a positive integer")
_seed = _int_at_least(0, "a non-negative integer seed")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="tiny-llava",
                   help="tiny-llava, tiny-instructblip, a local checkpoint folder or a hub id")
    p.add_argument("--device", default=None, help="cpu (default), cuda, cuda:N, mps")
    p.add_argument("--dtype", default=None, help="float32 (default), bfloat16, float16")


def _add_image_args(p: argparse.ArgumentParser) -> None:
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--scenes", type=_positive_int, metavar="N", help="N generated scenes")
    source.add_argument("--images", metavar="DIR", help="a folder of images")
    p.add_argument("--seed", type=_seed, default=0,
                   help="scene seed (0–9999 are held out from training; default 0)")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmneurons", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("describe", help="caption images with the paper's prompt")
    _add_model_args(d)
    _add_image_args(d)
    d.add_argument("--max-new-tokens", type=_positive_int, default=20)
    d.add_argument("--batch-size", type=_positive_int, default=32)
    d.add_argument("--nouns", help="comma-separated nouns to look for (real models without spaCy)")
    d.set_defaults(func=cmd_describe)

    f = sub.add_parser("find", help="identify the multi-modal neurons of every caption noun")
    _add_model_args(f)
    _add_image_args(f)
    f.add_argument("--top-k", type=_positive_int, default=50)
    f.add_argument("--method", default="contribution", help="contribution (default), gradient, random")
    f.add_argument("--out", required=True, help="results .parquet (resumed if it exists)")
    f.add_argument("--batch-size", type=_positive_int, default=16)
    f.set_defaults(func=cmd_find)

    b = sub.add_parser("bench", help="measure identification overhead, gradient speed-up, memory")
    _add_model_args(b)
    b.add_argument("--n-images", type=_positive_int, default=16)
    b.add_argument("--seed", type=_seed, default=0)
    b.add_argument("--repeats", type=_positive_int, default=3)
    b.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    b.set_defaults(func=cmd_bench)
    return parser


def _images(args):
    """``(names, images, scenes or None)`` from ``--scenes``/``--seed`` or ``--images``."""
    if args.images:
        named = read_image_folder(args.images)
        return [n for n, _ in named], [im for _, im in named], None
    scenes = make_scenes(args.scenes, seed=args.seed)
    return [f"scene-{args.seed}-{s.index}" for s in scenes], [s.image for s in scenes], scenes


def cmd_describe(args) -> dict:
    from .vlm import load_vlm

    names, images, scenes = _images(args)
    vlm = load_vlm(args.model, device=args.device, dtype=args.dtype)
    nouns = [n.strip() for n in args.nouns.split(",") if n.strip()] if args.nouns else None
    captions = vlm.describe(images, max_new_tokens=args.max_new_tokens,
                            batch_size=args.batch_size, nouns=nouns, progress=True)
    rows = []
    for i, (name, cap) in enumerate(zip(names, captions)):
        row = dict(image=name, caption=cap.text, nouns=cap.nouns)
        if scenes is not None:
            row["truth"] = scenes[i].caption
        rows.append(row)
        if not args.json:
            truth = f"   [truth: {row['truth']}]" if "truth" in row else ""
            print(f"{name}: {cap.text}{truth}")
    result = dict(model=args.model, n_images=len(images), captions=rows)
    if scenes is not None:
        result.update(caption_scores([c.text for c in captions], scenes))
        if not args.json:
            print(f"noun recall {result['noun_recall']:.4f}  noun precision "
                  f"{result['noun_precision']:.4f}  exact match {result['exact_match']:.4f}  "
                  f"({len(scenes)} scenes, seed {args.seed})")
    return result


def cmd_find(args) -> dict:
    from tqdm.auto import tqdm

    from .identify import check_top_k, find_neurons
    from .results import ResultFile
    from .vlm import load_vlm

    results = ResultFile(args.out)  # checks --out before any work
    names, images, _ = _images(args)
    vlm = load_vlm(args.model, device=args.device, dtype=args.dtype)
    check_top_k(vlm, args.top_k)
    todo = [i for i, name in enumerate(names) if name not in set(results.done)]
    bar = tqdm(total=len(todo), desc=f"find ({args.method})")
    for start in range(0, len(todo), args.batch_size):
        batch = todo[start:start + args.batch_size]
        table = find_neurons(vlm, [images[i] for i in batch], method=args.method, top_k=args.top_k,
                             seed=args.seed, image_indices=batch)
        caption_of = dict(zip(batch, table.attrs["captions"]))
        table.insert(0, "image_id", [names[i] for i in table["image"]])
        table.insert(1, "caption", [caption_of[i] for i in table["image"]])
        results.append(table.drop(columns="image"), [names[i] for i in batch])
        bar.update(len(batch))
    bar.close()
    summary = dict(out=str(args.out), model=args.model, method=args.method, top_k=args.top_k,
                   n_images=len(names), n_new=len(todo), n_skipped=len(names) - len(todo),
                   n_rows=len(results.table))
    if not args.json:
        print(f"{summary['n_new']} images identified, {summary['n_skipped']} already done; "
              f"{summary['n_rows']} rows in {args.out}")
    return summary


def cmd_bench(args) -> dict:
    from .bench import run_bench
    from .vlm import load_vlm

    vlm = load_vlm(args.model, device=args.device, dtype=args.dtype)
    result = run_bench(vlm, n_images=args.n_images, seed=args.seed, repeats=args.repeats)
    if not args.json:
        for key, value in result.items():
            print(f"{key}: {value}")
    return result


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # argparse itself exits 2 with a one-line error
    try:
        result = args.func(args)
    except (ValueError, NounTaggerMissing) as exc:  # bad input; anything else is a bug: let it show
        print(f"mmneurons {args.command}: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
