"""Train an EAGLE draft head online against a frozen target.

    accelerate launch launch/train.py --recipe llama3_eagle3 [key=value ...]
    python launch/train.py --recipe tiny_eagle3 training.max_steps=50
    python launch/train.py --plan --recipe llama3_70b_eagle3     # memory and traffic on paper, no training

Any launcher works (accelerate launch, torchrun, deepspeed, srun via launch/slurm_train.sh): see README.

The run prints a banner first (device, processes, target and sharding, precision, steps, tokens per
step, output folder, trackers), then a progress bar on a terminal or a plain line every
training.log_every steps elsewhere, a line after each τ evaluation, and a summary at the end (time,
tokens, final loss and accuracy per TTT step, τ beside its floors, the export and the vLLM and SGLang
commands that serve it).

`--recipe` takes a name in recipes/ or a path; `key=value` overrides any recipe field
(`training.lr=1e-4`, `data.sources.0.max_rows=100`). Interrupt with Ctrl-C or SIGTERM: the
current step finishes, a checkpoint is written, and running the same command again resumes.
"""
import argparse
import sys

from eagle_online.checkpoint import choose_checkpoint
from eagle_online.distributed import exit_process
from eagle_online.errors import UserError
from eagle_online.export import export_run, serve_commands, serving_target
from eagle_online.plan import format_plan, target_shapes
from eagle_online.recipe import RecipeError, load_recipe
from eagle_online.trainer import Trainer


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", required=True, help="recipe name (recipes/NAME.yaml) or path")
    parser.add_argument("--plan", action="store_true",
                        help="print per-GPU memory and all-gather traffic for the recipe, then exit (no training)")
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # the deepspeed launcher's
    parser.add_argument("overrides", nargs="*", help="key=value recipe overrides")
    args = parser.parse_args(argv)
    try:
        recipe = load_recipe(args.recipe, args.overrides)
        if args.plan:
            try:
                print(format_plan(recipe, *target_shapes(recipe.target.model, recipe.target.gguf_file)))
            except ValueError as e:  # no shapes for this target without a download
                raise RecipeError(str(e)) from None
            return 0
        trainer = Trainer(recipe)
        trainer.setup()
        trainer.train()
        if trainer.accelerator.is_main_process:
            export = None
            if recipe.training.export_at_end:
                name, why = choose_checkpoint(recipe.run.output_dir, recipe.training.export_checkpoint,
                                              recipe.eval.min_prompts_for_best)
                out = export_run(recipe.run.output_dir, checkpoint=name, why=why)
                print(f"exported {name} ({why}) to {out}")
                export = {"path": out, "checkpoint": name, "why": why,
                          "serve": serve_commands(serving_target(recipe.target.model), out, recipe.draft.architecture,
                                                  recipe.export.format, recipe.draft.n_predict)}
            print(trainer.summary(export), flush=True)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    exit_process(main())
