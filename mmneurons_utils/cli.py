"""The ``mmneurons`` console script.

    mmneurons describe --model tiny-llava --scenes 500 --seed 0 --json
    mmneurons describe --model /path/to/llava-1.5-7b-hf --images photos/ --device cuda
    mmneurons find --images coco_subset/ --annotations coco_subset/annotations.json --out r.parquet
    mmneurons perturb --model tiny-llava --scenes 20 --seed 0 --k 50 --zero --json
    mmneurons edit --model tiny-llava --source dog --target cat --scenes 200 --seed 0 --save edited/
    mmneurons atlas --model tiny-llava --scenes 256 --seed 0 --top-k 10 --examples 8 --out atlas/ --json
    mmneurons export-scenes --scenes 24 --seed 0 --out scenes_folder/
    mmneurons report --model smol-llava --scenes 80 --seed 0 --json
    mmneurons compare-editors --model tiny-llava --scenes 120 --pairs 20 --out table.csv
    accelerate launch --num_processes 8 -m mmneurons_utils.cli find --device cuda --images photos/ --out big.parquet

Bad input exits with code 2 and one line naming the bad value and what is accepted.
With ``--json`` the last line of standard output is one JSON object. A fault of the machine
(a full disk, an I/O error) is one line naming the file, exit code 1; Ctrl-C is one line,
exit code 130 (``find`` keeps every finished batch: rerun to resume). ``--scenes`` is at most
:data:`MAX_SCENES` (every scene is built in memory before the model sees it; a larger set
belongs in a folder: ``export-scenes`` it in parts and pass ``--images``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

from tqdm import tqdm

from .batch.parallel import launched_processes
from .commands.atlas import cmd_atlas
from .commands.common import CliError
from .commands.find import cmd_bench, cmd_describe, cmd_export_scenes, cmd_find
from .commands.interventions import cmd_edit, cmd_perturb
from .commands.report import cmd_compare_editors, cmd_report
from .batch.editor_comparison import DEFAULT_CONFIGS
from .model.loading import parse_device, parse_dtype
from .model.nouns import NounTaggerMissing
from .store.files import os_error_exit_code, os_error_line

__all__ = ["CliError", "build_parser", "main"]


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
_non_negative_int = _int_at_least(0, "a non-negative integer")

MAX_SCENES = 100_000   # --scenes: ~20 KB of images each, all in memory (about 2 GB at the bound)


def _scene_count(text: str) -> int:
    """``--scenes``: 1 … :data:`MAX_SCENES`."""
    value = _positive_int(text)
    if value > MAX_SCENES:
        raise argparse.ArgumentTypeError(
            f"expected at most {MAX_SCENES} scenes (each is built in memory first), got {text!r}; "
            "for more, export-scenes them into folders and pass --images")
    return value


def _pool_scene_count(text: str) -> int:
    """``--scenes`` of ``report`` / ``compare-editors``: 1 … :data:`MAX_SCENES` (no folder option)."""
    value = _positive_int(text)
    if value > MAX_SCENES:
        raise argparse.ArgumentTypeError(
            f"expected at most {MAX_SCENES} scenes (each is built in memory first), got {text!r}")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (no usage block): ``mmneurons find: error: …``."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _minutes(text: str) -> float:
    """A positive, finite number of minutes."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"expected a positive number of minutes, got {text!r}")
    return value


def _check_model_options(args) -> None:
    """``--device`` and ``--dtype`` checked before anything is read or loaded."""
    parse_dtype(getattr(args, "dtype", None))
    if args.device is not None:
        parse_device(args.device)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="tiny-llava",
                   help="tiny-llava, tiny-instructblip, smol-llava, a local checkpoint folder or a hub id")
    p.add_argument("--device", default=None,
                   help="cpu (default), cuda, cuda:N, mps; under accelerate launch the default is "
                        "each process's own device and cuda means cuda:<local rank>")
    p.add_argument("--dtype", default=None, help="float32 (default), bfloat16, float16")


def _add_image_args(p: argparse.ArgumentParser) -> None:
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--scenes", type=_scene_count, metavar="N",
                        help=f"N generated scenes (at most {MAX_SCENES})")
    source.add_argument("--images", metavar="DIR", help="a folder of images")
    p.add_argument("--annotations", metavar="FILE",
                   help="with --images: a COCO instances JSON (images, annotations with bbox, "
                        "categories) giving each image's objects; its categories are the candidate "
                        "nouns of a real model when spaCy is not installed")
    p.add_argument("--seed", type=_seed, default=0,
                   help="scene seed (0–9999 are held out from training; default 0)")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mmneurons", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("describe", help="caption images with the paper's prompt")
    _add_model_args(d)
    _add_image_args(d)
    d.add_argument("--max-new-tokens", type=_positive_int, default=20, metavar="N",
                   help="most caption tokens generated per image (default 20)")
    d.add_argument("--batch-size", type=_positive_int, default=32, metavar="N",
                   help="images per forward pass (default 32)")
    d.add_argument("--nouns", help="comma-separated nouns to look for (real models without spaCy)")
    d.set_defaults(func=cmd_describe)

    f = sub.add_parser("find", help="identify the multi-modal neurons of every caption noun")
    _add_model_args(f)
    _add_image_args(f)
    f.add_argument("--top-k", type=_positive_int, default=50, metavar="K",
                   help="units kept per (image, noun) (default 50)")
    f.add_argument("--method", default="contribution",
                   help="contribution (default, the paper), gradient (gradient × activation at the "
                        "noun step), gradient_image (attribution at the image positions), random, "
                        "noun_contrast (contribution minus the mean over the other candidate nouns), "
                        "selection_null (contribution on activations shuffled within each layer; 5 draws)")
    f.add_argument("--out", required=True, help="results .parquet (resumed if it exists)")
    f.add_argument("--batch-size", type=_positive_int, default=16, metavar="N",
                   help="images per forward pass, and per resumable batch written to --out (default 16)")
    f.set_defaults(func=cmd_find)

    b = sub.add_parser("bench", help="measure identification overhead, gradient speed-up, memory")
    _add_model_args(b)
    b.add_argument("--n-images", type=_positive_int, default=16, metavar="N",
                   help="embedded scenes timed (default 16)")
    b.add_argument("--seed", type=_seed, default=0, help="scene seed (default 0)")
    b.add_argument("--repeats", type=_positive_int, default=3, metavar="N",
                   help="interleaved repeats of each timing; the least time counts (default 3)")
    b.add_argument("--offload", action="store_true",
                   help="also time find with every decoder layer offloaded to disk (offload_slowdown)")
    b.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    b.set_defaults(func=cmd_bench)
    _add_causal_commands(sub)
    _add_atlas_command(sub)
    _add_report_commands(sub)

    x = sub.add_parser("export-scenes", help="write embedded scenes as a folder of PNGs with a COCO "
                                             "annotations.json (to try the --images path offline)")
    x.add_argument("--scenes", type=_scene_count, required=True, metavar="N",
                   help=f"N scenes (at most {MAX_SCENES})")
    x.add_argument("--seed", type=_seed, default=0, help="scene seed (default 0)")
    x.add_argument("--out", required=True, metavar="DIR", help="a new or empty folder")
    x.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    x.set_defaults(func=cmd_export_scenes)
    return parser


def _add_atlas_command(sub) -> None:
    """``atlas``: every noun's recurring units with their dataset examples, as parquet + HTML."""
    a = sub.add_parser("atlas", help="neuron atlas: each noun's recurring units with dataset examples "
                                     "(atlas.parquet and a static index.html)")
    _add_model_args(a)
    _add_image_args(a)
    a.add_argument("--top-k", type=_positive_int, default=10, help="units per (image, noun) (default 10)")
    a.add_argument("--examples", type=_positive_int, default=8,
                   help="top dataset images kept per unit (default 8)")
    a.add_argument("--out", required=True, metavar="DIR",
                   help="output folder (created; a finished run with the same settings and weights is "
                        "reused, one made with other weights of the model recomputed)")
    a.add_argument("--batch-size", type=_positive_int, default=16, metavar="N",
                   help="images per forward pass (default 16)")
    a.set_defaults(func=cmd_atlas)


def _add_report_commands(sub) -> None:
    """``report`` (the model report) and ``compare-editors`` (ours vs ft / lora / rome)."""
    r = sub.add_parser("report", help="the paper's headline numbers for one model, vs random units and "
                                      "the selection-matched null (one JSON object)")
    _add_model_args(r)
    r.add_argument("--scenes", type=_pool_scene_count, default=48, metavar="N",
                   help="held-out scenes identified (about 2.2 noun instances each; default 48)")
    r.add_argument("--seed", type=_seed, default=0, help="scene seed (0–9999 are held out; default 0)")
    r.add_argument("--k", type=_positive_int, default=10, help="units per (image, noun) that are scored (default 10)")
    r.add_argument("--region", type=_positive_int, default=12, metavar="N",
                   help="of those, the first N scenes for region invariance (default 12)")
    r.add_argument("--ablate", type=_positive_int, default=8, metavar="N",
                   help="of those, the first N scenes for the ablation (default 8)")
    r.add_argument("--no-occlusion", action="store_true",
                   help="skip the occlusion-difference maps (one forward pass per (image, noun))")
    r.add_argument("--json", action="store_true",
                   help="print one JSON object as the last line, no progress bars (default: indented JSON)")
    r.set_defaults(func=cmd_report)

    c = sub.add_parser("compare-editors", help="every editor (ours, gradient, random, ft, lora, rome) on "
                                               "the same source → target pairs; a resumable CSV and its summary")
    c.add_argument("--model", default="tiny-llava",
                   help="tiny-llava, tiny-instructblip, smol-llava, a local checkpoint folder or a hub id")
    c.add_argument("--device", default=None, help="cpu (default), cuda, cuda:N, mps")
    c.add_argument("--scenes", type=_pool_scene_count, default=120, metavar="N",
                   help=f"scenes in the image pool (at most {MAX_SCENES}; default 120)")
    c.add_argument("--seed", type=_seed, default=0, help="scene and pair seed (default 0)")
    c.add_argument("--pairs", type=_positive_int, default=20, metavar="N",
                   help="source → target pairs, the first of a seeded order whose target is one token (default 20)")
    c.add_argument("--out", required=True, metavar="FILE.csv",
                   help="the comparison CSV: resumed when its settings record (FILE.csv.settings.json) "
                        "matches; one writer at a time (a second run on it waits)")
    c.add_argument("--max-minutes", type=_minutes, metavar="M",
                   help="start no new pair after M minutes (every editor runs on the same pairs)")
    c.add_argument("--configs", default=",".join(f"{m}:{k}" for m, k in DEFAULT_CONFIGS), metavar="METHOD:K,...",
                   help="the editors and their unit counts (default: all of them, "
                        f"{','.join(f'{m}:{k}' for m, k in DEFAULT_CONFIGS)})")
    c.add_argument("--min-images", type=_positive_int, default=4, metavar="N",
                   help="a noun is a source only if at least this many pool captions say it (default 4)")
    c.add_argument("--steps", type=_positive_int, default=150, metavar="N", help="most optimiser steps of every editor (default 150)")
    c.add_argument("--shard", default="0/1", metavar="K/N",
                   help="run pairs K, K+N, K+2N, … (N processes side by side, each with its own --out; "
                        "concatenate the CSVs after; default 0/1)")
    for name, default, kind, what in (
            ("n-edit", 2, _positive_int, "images of the source the edit is learnt on"),
            ("n-unrelated", 4, _non_negative_int, "unrelated images kept unchanged while learning"),
            ("n-locality", 6, _non_negative_int, "unrelated images that measure locality"),
            ("n-heldout", 4, _non_negative_int, "held-out images of the source that measure generality"),
            ("n-covariance", 64, _positive_int, "pool images for ROME's key covariance")):
        c.add_argument(f"--{name}", type=kind, default=default, metavar="N", help=f"{what} (default {default})")
    c.add_argument("--json", action="store_true", help="print one JSON object as the last line (the summary)")
    c.set_defaults(func=cmd_compare_editors)


def _add_causal_commands(sub) -> None:
    """``perturb`` (causal effect of the top units) and ``edit`` (targeted editing)."""
    p = sub.add_parser("perturb", help="perturb the top-k units of each caption noun vs k random units")
    _add_model_args(p)
    _add_image_args(p)
    p.add_argument("--k", type=_positive_int, default=50, help="units per noun (default 50)")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--sigma", type=float, help="Gaussian noise of this σ (× the column's RMS)")
    how.add_argument("--zero", action="store_true", help="zero the write vectors (the default)")
    p.add_argument("--absolute", action="store_true", help="σ is absolute, not relative to the column")
    p.add_argument("--n-random", type=_positive_int, default=3, help="random draws per noun (default 3)")
    p.add_argument("--gradient", action="store_true", help="also the gradient × activation ranking")
    p.set_defaults(func=cmd_perturb)

    e = sub.add_parser("edit", help="edit the source noun's neurons so that the model says the target")
    _add_model_args(e)
    e.add_argument("--source", required=True, help="a noun the captions say")
    e.add_argument("--target", required=True, help="the noun to say instead")
    e.add_argument("--scenes", type=_scene_count, required=True, metavar="N",
                   help="N scenes: half of those saying the source are edited, the rest held out")
    e.add_argument("--seed", type=_seed, default=0, help="scene seed (default 0)")
    e.add_argument("--k", dest="k", type=_positive_int, default=5, help="how many units to edit (default 5)")
    e.add_argument("--method", dest="method", default="contribution",
                   help="the editor: contribution (default; our neurons), gradient, gradient_image, random "
                        "(k units chosen by that score), ft (the whole down_proj of the layer holding "
                        "most of the top-k contribution units), lora (rank-4 adapter on it), rome "
                        "(ROME's rank-one update of it)")
    # hidden aliases of --k and --method
    e.add_argument("--n-neurons", dest="k", type=_positive_int, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    e.add_argument("--units", dest="method", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    e.add_argument("--steps", type=_positive_int, default=150, help="most Adam steps (default 150)")
    e.add_argument("--save", metavar="DIR", help="save the edited model to this new folder")
    e.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    e.set_defaults(func=cmd_edit)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # argparse itself exits 2 with a one-line error
    try:
        if hasattr(args, "device"):
            _check_model_options(args)
        result = args.func(args)
    except (ValueError, NounTaggerMissing) as exc:  # bad input; anything else is a bug: let it show
        _close_progress_bars()
        message = " ".join(str(exc).split())      # one line, whatever the message held
        print(f"mmneurons {args.command}: error: {message}{_which_process()}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        _close_progress_bars()
        print(f"mmneurons {args.command}: interrupted; {_AFTER_INTERRUPT.get(args.command, 'nothing was written')}"
              f"{_which_process()}", file=sys.stderr)
        return 130
    except OSError as exc:                        # a full disk, a path the system refuses
        _close_progress_bars()
        print(f"mmneurons {args.command}: error: {os_error_line(exc)}{_which_process()}", file=sys.stderr)
        return os_error_exit_code(exc)
    if args.json and result is not None:   # None: a process of accelerate launch other than the main
        print(json.dumps(result))
    return 0


# what a Ctrl-C leaves behind, per command (the others write nothing, or nothing half-way)
_AFTER_INTERRUPT = {
    "find": "every finished batch is in --out: rerun to resume",
    "atlas": "nothing half-written was left in --out: rerun to build it",
    "export-scenes": "nothing half-written was left in --out: rerun to write it",
    "edit": "nothing was saved: rerun to edit again",
    "compare-editors": "every finished row is in --out: rerun to resume",
}


def _close_progress_bars() -> None:
    """Close the progress bars a failed command left open, so that its error line starts
    on a line of its own (not glued to a bar's)."""
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()
    sys.stderr.flush()


def _which_process() -> str:
    """`` (process r of P)`` under a launcher with several processes, else empty."""
    try:
        n = launched_processes()
    except ValueError:
        return ""
    return f" (process {os.environ.get('RANK', '?')} of {n})" if n > 1 else ""


if __name__ == "__main__":
    sys.exit(main())
