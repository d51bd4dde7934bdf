"""Export a training run's draft head in the layout SGLang and vLLM serve (EAGLE-3 or EAGLE-1/2).

    python launch/export.py --run runs/llama3_eagle3 [--checkpoint step_00001000] [--out DIR] [--format F]

--checkpoint is `last` (the default: the newest complete checkpoint), `best` (the best by τ that training
recorded in checkpoints/best.json, when measured on at least --min-prompts prompts; else the last, saying
so) or a checkpoint's name. --out defaults to RUN/export; an earlier export there is replaced only once
the new one is complete. --format (default: the recipe's export.format) is eagle3 (the layout SGLang and
vLLM's EAGLE loaders read), speculators (vLLM's speculators format, which names the target: `vllm serve
DIR` alone; EAGLE-3 only) or both (the second in DIR_speculators).
"""
import argparse
import sys

from eagle_online.checkpoint import choose_checkpoint
from eagle_online.errors import UserError
from eagle_online.export import export_run, run_format, speculators_dir
from eagle_online.layout import FORMATS


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="the run directory (the recipe's run.output_dir)")
    parser.add_argument("--checkpoint", default="last",
                        help="last (default), best, or a checkpoint name under RUN/checkpoints")
    parser.add_argument("--min-prompts", type=int, default=8,
                        help="--checkpoint best: the fewest prompts τ must have been measured on (default 8)")
    parser.add_argument("--out", help="export directory (default: RUN/export)")
    parser.add_argument("--format", choices=FORMATS, help="eagle3, speculators or both (default: the run's "
                        "recipe's export.format)")
    args = parser.parse_args(argv)
    try:
        name, why = choose_checkpoint(args.run, args.checkpoint, args.min_prompts)
        out = export_run(args.run, checkpoint=name, out=args.out, why=why, fmt=args.format)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    also = (f" and, in the speculators format, to {speculators_dir(out)}"
            if run_format(args.run, args.format) == "both" else "")
    print(f"exported {name} ({why}) to {out}{also}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
