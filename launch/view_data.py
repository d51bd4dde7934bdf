"""Look at a recipe's training data as the trainer sees it: trained tokens highlighted, the rest dimmed.

    python launch/view_data.py --recipe tiny_eagle3                    # sequence 0 in the terminal + HTML
    python launch/view_data.py --recipe llama3_eagle3 --index 12 --count 3 --boundaries --max-rows 500

Prints the per-source statistics (rows, tokens, trained fraction, skipped rows by reason) and the
chosen sequences, and writes the same as a self-contained HTML page (default
<run.output_dir>/data_view.html; tick "token boundaries" there, or open it with #boundaries).
"""
import argparse
import sys

from eagle_online.data import format_stats
from eagle_online.data.view import collect_view, render_ansi, render_html, write_html
from eagle_online.errors import UserError
from eagle_online.recipe import load_recipe


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", required=True, help="recipe name (recipes/NAME.yaml) or path")
    parser.add_argument("--index", type=int, default=0, help="first sequence to show (reading order)")
    parser.add_argument("--count", type=int, default=1, help="how many sequences to show")
    parser.add_argument("--boundaries", action="store_true", help="show where each token starts and ends")
    parser.add_argument("--max-rows", type=int, default=None, help="read at most this many rows per source")
    parser.add_argument("--html", default=None, help="page to write (default <run.output_dir>/data_view.html)")
    parser.add_argument("--color", choices=["auto", "always", "never"], default="auto")
    parser.add_argument("overrides", nargs="*", help="key=value recipe overrides")
    args = parser.parse_args(argv)
    try:
        recipe = load_recipe(args.recipe, args.overrides)
        if args.max_rows is not None:
            for source in recipe.data.sources:
                source.max_rows = min(source.max_rows or args.max_rows, args.max_rows)
        from eagle_online.target import load_tokenizer

        view = collect_view(recipe.data, load_tokenizer(recipe.target), args.index, args.count)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
    print(format_stats(view.stats))
    if not view.sequences:
        print(f"no sequence {args.index}: the data has {view.stats['total']['sequences']}", file=sys.stderr)
    print(render_ansi(view, boundaries=args.boundaries, color=color))
    page = render_html(view, title=f"{recipe.run.name}: training data", boundaries=args.boundaries)
    path = write_html(args.html or f"{recipe.run.output_dir}/data_view.html", page)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
