"""Draw a training run's curves from its metrics.jsonl: loss, acc_0, τ̂, τ by evaluation (with the
floors the run measured, dashed), learning rate and tokens/s against the optimizer step.

    python launch/plot.py runs/tiny_eagle3                  # writes runs/tiny_eagle3/curves.svg
    python launch/plot.py runs/tiny_eagle3 --out curves.html

The picture is an SVG written directly (no plotting library needed); `.html` wraps it in a page, and
`.png` needs matplotlib installed. A run writes RUN/curves.svg itself when it ends; this redraws it
at any time, also while the run is going.
"""
import argparse
import html
import sys
from pathlib import Path

from eagle_online.errors import UserError
from eagle_online.metrics import METRICS_FILE, read_metrics
from eagle_online.report import CURVES_NAME, PANELS, curves_svg


class PlotError(UserError):
    """A run directory or output that cannot be plotted; the message names it."""


def _png(rows: list[dict], out: Path, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotError(f"--out {out}: a PNG needs matplotlib (`pip install matplotlib`); write .svg or .html "
                        "instead") from None
    panels = [(k, t) for k, t in PANELS if any(k in r and r.get("step") for r in rows)]
    fig, axes = plt.subplots((len(panels) + 1) // 2, 2, figsize=(10, 2.6 * ((len(panels) + 1) // 2)), squeeze=False)
    for ax, (key, label) in zip(axes.flat, panels):
        pts = [(r["step"], r[key]) for r in rows if key in r and r.get("step")]
        ax.plot(*zip(*pts), marker="o" if len(pts) < 30 else None)
        ax.set_title(label)
        if key == "eval_tau":
            for r in rows:
                for floor in ("untrained", "bigram"):
                    if f"eval_tau_{floor}" in r:
                        ax.axhline(r[f"eval_tau_{floor}"], linestyle="--", label=floor)
            ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="the run directory (the recipe's run.output_dir)")
    parser.add_argument("--out", type=Path, help=f"where to write: .svg (default RUN/{CURVES_NAME}), .html or .png")
    args = parser.parse_args(argv)
    try:
        if not (args.run / METRICS_FILE).is_file():
            raise PlotError(f"{args.run}: no {METRICS_FILE} (give a run directory, the recipe's run.output_dir)")
        rows = read_metrics(args.run)
        if not any(r.get("step") for r in rows):
            raise PlotError(f"{args.run / METRICS_FILE}: no step logged yet")
        out = args.out or args.run / CURVES_NAME
        title = str(args.run)
        if out.suffix == ".png":
            _png(rows, out, title)
        elif out.suffix in (".svg", ".html"):
            svg = curves_svg(rows, title)
            text = svg if out.suffix == ".svg" else (f"<!doctype html>\n<html><head><meta charset='utf-8'><title>"
                                                      f"{html.escape(title)}</title></head><body>\n{svg}</body></html>\n")
            try:
                out.write_text(text)
            except OSError as e:
                raise PlotError(f"--out {out}: cannot be written ({e})") from None
        else:
            raise PlotError(f"--out {out}: give a .svg, .html or .png file")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
