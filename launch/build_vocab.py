"""Choose a recipe's draft vocabulary ahead of training, streaming over its data.

    python launch/build_vocab.py --recipe llama3_eagle3
    python launch/build_vocab.py --recipe tiny_eagle3 draft.draft_vocab_size=1024

Counts the tokens at trained positions (source weights applied) in one pass, in bounded memory,
keeps the draft.draft_vocab_size most frequent, and writes <run.output_dir>/draft_vocab.safetensors,
the file the trainer reuses instead of counting again. Reports the coverage: the fraction of trained
tokens that the draft vocabulary holds.
"""
import argparse
import sys

from eagle_online.data import format_stats
from eagle_online.data.vocab import build_recipe_vocab
from eagle_online.errors import UserError
from eagle_online.recipe import load_recipe


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", required=True, help="recipe name (recipes/NAME.yaml) or path")
    parser.add_argument("--out", default=None, help="file to write (default <run.output_dir>/draft_vocab.safetensors)")
    parser.add_argument("overrides", nargs="*", help="key=value recipe overrides")
    args = parser.parse_args(argv)
    try:
        report = build_recipe_vocab(load_recipe(args.recipe, args.overrides), path=args.out)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_stats(report.stats))
    print(f"{report.trained_tokens:,} trained tokens, {report.distinct_tokens:,} distinct of {report.vocab_size:,}; "
          f"the {report.draft_vocab_size:,}-token draft vocabulary covers {report.coverage:.2%}")
    print(f"wrote {report.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
