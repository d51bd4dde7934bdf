"""Rebuild the tiny chat target shipped in eagle_online/assets/tiny_chat (deterministic, CPU).

    python launch/build_tiny_target.py [--steps N] [--out DIR]
"""
import argparse
from pathlib import Path

from eagle_online.tiny_target import TINY_CHAT_DIR, TinyTargetConfig, train_tiny_target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=TINY_CHAT_DIR)
    parser.add_argument("--steps", type=int, default=TinyTargetConfig.steps)
    args = parser.parse_args()
    train_tiny_target(args.out, TinyTargetConfig(steps=args.steps))


if __name__ == "__main__":
    main()
