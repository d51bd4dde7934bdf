"""Export a training run's draft head in the layout SGLang and vLLM serve (EAGLE-3 or EAGLE-1/2).

    python launch/export.py --run runs/llama3_eagle3 [--checkpoint step_00001000] [--out DIR]

Without --checkpoint the best one by τ is exported when training evaluated τ (checkpoints/best.json),
else the newest complete one; --out defaults to RUN/export and an earlier
export there is replaced only once the new one is complete.
"""
import argparse
import sys

from eagle_online.export import ExportError, export_run


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="the run directory (the recipe's run.output_dir)")
    parser.add_argument("--checkpoint",
                        help="checkpoint name under RUN/checkpoints (default: the best by τ, else the newest)")
    parser.add_argument("--out", help="export directory (default: RUN/export)")
    args = parser.parse_args(argv)
    try:
        out = export_run(args.run, checkpoint=args.checkpoint, out=args.out)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported the draft head to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
