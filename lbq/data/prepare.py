"""CLI: prepare an image folder as a TFDS dataset.

    python -m lbq.data.prepare --root=ROOT --data_dir=DIR --name=NAME

ROOT holds ROOT/<split>/<class>/*.jpg|jpeg|png. Afterwards set data_config.name=NAME and
data_config.data_dir=DIR to train on it.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

from lbq.data.errors import DataError
from lbq.data.folder import prepare_folder


def main(argv: list[str] | None = None) -> int:
    """Runs the CLI.

    Args:
      argv: arguments (default: sys.argv[1:]).

    Returns:
      Exit status: 0 on success, 2 on a data error.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1].strip())
    parser.add_argument("--root", required=True, help="image folder ROOT/<split>/<class>/*")
    parser.add_argument("--data_dir", required=True, help="TFDS data dir to write into")
    parser.add_argument("--name", required=True, help="dataset name (lowercase, digits, _)")
    parser.add_argument(
        "--splits", default=None, help="comma-separated split folders (default: all sub-folders)"
    )
    parser.add_argument("--num_workers", type=int, default=None, help="decode threads")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset")
    args = parser.parse_args(argv)

    def progress(line: str) -> None:
        print(line, flush=True)

    t0 = time.time()
    try:
        info = prepare_folder(
            args.root,
            args.data_dir,
            args.name,
            splits=args.splits.split(",") if args.splits else None,
            num_workers=args.num_workers,
            overwrite=args.overwrite,
            progress=progress,
        )
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"done in {time.time() - t0:.1f}s")
    for field in dataclasses.fields(info):
        print(f"  {field.name}: {getattr(info, field.name)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
