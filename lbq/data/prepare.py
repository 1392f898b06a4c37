"""CLI: prepare an image folder as a TFDS dataset.

    python -m lbq.data.prepare --root=ROOT --data_dir=DIR --name=NAME

ROOT holds ROOT/<split>/<class>/<image> (docs/data.md). Afterwards set data.name=NAME and
data.data_dir=DIR to train on it. The report goes to stdout; progress lines and errors go to
stderr. Mean and std are measured on the images as training receives them: resized to
``--image_size`` (the run's data.image_size) by training's resize (``--augment=imagenet``: shorter
side and centre crop).
"""

from __future__ import annotations

import argparse
import sys

from lbq.data.config import AUGMENTATIONS, DEFAULT_IMAGE_SIZE
from lbq.data.errors import DataError
from lbq.data.folder import prepare_folder


def main(argv: list[str] | None = None) -> int:
    """Runs the CLI.

    Args:
      argv: arguments (default: sys.argv[1:]).

    Returns:
      Exit status: 0 on success, 2 on a data error (one line on stderr, ``lbq: error: ...``).
    """
    parser = argparse.ArgumentParser(
        prog="python -m lbq.data.prepare", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--root", required=True, help="image folder ROOT/<split>/<class>/*")
    parser.add_argument("--data_dir", required=True, help="TFDS data dir to write into")
    parser.add_argument("--name", required=True, help="dataset name (lowercase, digits, _)")
    parser.add_argument(
        "--splits", default=None, help="comma-separated split folders (default: all sub-folders)"
    )
    parser.add_argument("--num_workers", type=int, default=None, help="decode threads")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset")
    parser.add_argument(
        "--skip_corrupt",
        action="store_true",
        help="skip images that cannot be decoded or converted to RGB, and list them (default: "
        "stop at the first, naming it)",
    )
    parser.add_argument(
        "--image_size",
        type=int,
        default=DEFAULT_IMAGE_SIZE,
        help="the data.image_size training will use: mean/std are measured on the images "
        f"resized to it (default {DEFAULT_IMAGE_SIZE})",
    )
    parser.add_argument(
        "--augment",
        choices=AUGMENTATIONS,
        default="none",
        help="the data.augment training will use ('imagenet': mean/std after the shorter-side "
        "resize and centre crop)",
    )
    args = parser.parse_args(argv)

    def progress(line: str) -> None:
        print(f"lbq: {line}", file=sys.stderr, flush=True)

    try:
        prepared = prepare_folder(
            args.root,
            args.data_dir,
            args.name,
            splits=args.splits.split(",") if args.splits else None,
            num_workers=args.num_workers,
            overwrite=args.overwrite,
            skip_corrupt=args.skip_corrupt,
            progress=progress,
            image_size=args.image_size,
            augment=args.augment,
        )
    except DataError as e:
        print(f"lbq: error: {e}", file=sys.stderr)
        return 2
    print("\n".join(prepared.report()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
