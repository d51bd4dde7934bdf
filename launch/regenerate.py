"""Self-distillation data: replace every assistant turn of a recipe's data with the target's own reply.

    python launch/regenerate.py --recipe tiny_eagle3 regenerate.max_new_tokens=64
    torchrun --nproc_per_node 8 launch/regenerate.py --recipe llama3_eagle3      # one shard per GPU
    python launch/regenerate.py --recipe llama3_eagle3 --shard 3 --num-shards 8  # or shard by hand

Writes JSONL in the input's schema under regenerate.output_dir (default <run.output_dir>/regenerated),
one folder per source, one file per shard. Run the same command again to resume: finished rows are
skipped. Train on the result with `data.sources='[{path: <that folder>}]'`. Uses vLLM when installed,
HF generate otherwise (settings: the recipe's `regenerate` section).
"""
import argparse
import sys

from eagle_online.data.regenerate import regenerate, shard_from_env
from eagle_online.errors import UserError
from eagle_online.recipe import load_recipe


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", required=True, help="recipe name (recipes/NAME.yaml) or path")
    parser.add_argument("--shard", type=int, default=None, help="this process's shard (default: $RANK or 0)")
    parser.add_argument("--num-shards", type=int, default=None, help="number of shards (default: $WORLD_SIZE or 1)")
    parser.add_argument("overrides", nargs="*", help="key=value recipe overrides")
    args = parser.parse_args(argv)
    env_shard, env_shards = shard_from_env()
    shard = env_shard if args.shard is None else args.shard
    num_shards = env_shards if args.num_shards is None else args.num_shards
    try:
        recipe = load_recipe(args.recipe, args.overrides)
        result = regenerate(recipe, shard, num_shards)
    except (UserError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished rows are kept; run the same command again to resume", file=sys.stderr)
        return 130
    print(f"shard {shard}/{num_shards}: {result.written} rows written, {result.already_done} done before, "
          f"{result.replies} replies ({result.truncated_replies} cut at max_new_tokens), skipped {result.skipped}")
    for path in result.files:
        print(f"  {path}" + ("" if path.exists() else " (no rows: not written)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
