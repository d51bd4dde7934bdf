"""Benchmarks, each writing JSON and printing a table.

    python launch/bench.py throughput --recipe tiny_eagle3 --out bench.json
    python launch/bench.py serve --url http://localhost:30000 --prompts question.jsonl
    python launch/bench.py quality --out quality.json

`python launch/bench.py SUBCOMMAND --help` lists a benchmark's options.
"""
import argparse
import importlib
import sys

# The benchmarks are the package launch/benchmarks/ beside this file: `benchmarks` when this file runs as
# a script (launch/ is sys.path[0]), `launch.benchmarks` when it is imported as `launch.bench`. Imported
# here, so that its modules are found through the package later whatever sys.path holds by then.
if __package__:
    benchmarks = importlib.import_module(f"{__package__}.benchmarks")
else:
    import benchmarks

SUBCOMMANDS = benchmarks.SUBCOMMANDS


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__)
        return 0
    if not argv or argv[0] not in SUBCOMMANDS:
        print(__doc__, file=sys.stderr)
        print(f"error: the first argument is one of {sorted(SUBCOMMANDS)}", file=sys.stderr)
        return 2
    name, rest = argv[0], argv[1:]
    module = importlib.import_module(f"{benchmarks.__name__}.{SUBCOMMANDS[name]}")
    parser = argparse.ArgumentParser(prog=f"bench.py {name}", description=module.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    from eagle_online.errors import UserError
    try:
        return module.main(args)
    except UserError as e:  # a bad recipe override, model or path: the message, not a traceback
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
