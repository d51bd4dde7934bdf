"""Measure a draft's acceptance length τ by real speculative decoding against the recipe's target.

    python launch/eval.py --recipe tiny_eagle3 --draft runs/tiny_eagle3/export --prompts builtin:sharegpt \
        --skip-prompts 5000 --num-prompts 16 --temperature 0 1 --out tau.json

--draft takes any draft this project reads: its own exports (EAGLE-3, EAGLE-1/2, MLP), the official
EAGLE-3 releases, SpecForge/SGLang or vLLM speculators checkpoints. --prompts is a JSONL file of
MT-bench `question.jsonl` records (`turns`, answered turn by turn), `prompt` or `messages` records,
or builtin:sharegpt. Greedy (T=0) output is token-identical to the target's own greedy decoding.
τ is measured with a chain of k drafted tokens per target forward (what vLLM's EAGLE-3 runs by default);
with --tree (or the recipe's eval.tree) also with EAGLE-2 draft trees, as SGLang runs them, side by side.
Progress (reading and counting the data for --bigram, each prompt decoded) goes to stderr, the table
to stdout.
"""
import argparse
import json
import sys
from pathlib import Path

from eagle_online.errors import UserError
from eagle_online.evaluate import TreeShape, evaluate_draft, format_table
from eagle_online.export import ExportError
from eagle_online.recipe import load_recipe
from eagle_online.trainer import check_target


def check_inputs(draft: str, prompts: str) -> None:
    """--draft and --prompts checked before the target loads (minutes for an 8B model)."""
    path = Path(draft)
    if not (path / "config.json").is_file():
        hint = ""
        if (path / "run_info.json").is_file() or (path / "checkpoints").is_dir():
            hint = f"; {path} is a training run: its draft is {path / 'export'} (launch/export.py writes it)"
        elif not path.is_dir():
            hint = "; no such directory"
        raise ExportError(f"--draft {draft}: no config.json{hint}")
    if not prompts.startswith("builtin:") and not Path(prompts).is_file():
        raise ExportError(f"--prompts {prompts}: no such file (a JSONL file of prompts, or builtin:sharegpt)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", required=True, help="recipe naming the target (recipes/NAME.yaml or a path)")
    parser.add_argument("--draft", required=True, help="draft directory (config.json + weights)")
    parser.add_argument("--prompts", required=True, help="JSONL prompts file or builtin:sharegpt")
    parser.add_argument("--num-prompts", type=int, default=None)
    parser.add_argument("--skip-prompts", type=int, default=0)
    parser.add_argument("--temperature", type=float, nargs="+", default=[0.0], help="0 = greedy")
    parser.add_argument("-k", "--num-draft-tokens", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tree", type=int, nargs=3, metavar=("TOPK", "STEPS", "NODES"),
                        help="also measure τ with EAGLE-2 draft trees: top-k children, levels, nodes verified (the "
                        "root counted), as SGLang's --speculative-eagle-topk/-num-steps/-num-draft-tokens "
                        "(default: the recipe's eval.tree; none: chain only)")
    parser.add_argument("--bigram", action="store_true", help="add the bigram baseline counted from the recipe's data")
    parser.add_argument("--out", type=Path, help="write the results (with the generated text) as JSON")
    parser.add_argument("overrides", nargs="*", help="key=value recipe overrides")
    args = parser.parse_args(argv)
    try:
        recipe = load_recipe(args.recipe, args.overrides)
        check_inputs(args.draft, args.prompts)
        check_target(recipe)
        report = evaluate_draft(recipe, args.draft, args.prompts, temperatures=args.temperature,
                                num_prompts=args.num_prompts, skip_prompts=args.skip_prompts,
                                num_draft_tokens=args.num_draft_tokens, max_new_tokens=args.max_new_tokens,
                                seed=args.seed, bigram=args.bigram, verbose=True,
                                tree=TreeShape(*shape) if (shape := args.tree or recipe.eval.tree) else None)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_table(report["results"]))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
