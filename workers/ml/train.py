"""Command line: train FashionNet from a TrainConfig JSON file (fields and defaults: workers.ml.training).

    python -m workers.ml.train --config cfg.json                  # prints the path of the final checkpoint
    python -m workers.ml.train --config cfg.json --out-dir var/runs/x

Interrupted runs resume from <out_dir>/last.pt when started again with the same config.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from workers.ml.training import TrainConfig, train


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, type=Path, help="TrainConfig as JSON")
    parser.add_argument("--out-dir", help="override config.out_dir")
    args = parser.parse_args(argv)
    data = json.loads(args.config.read_text())
    if args.out_dir:
        data["out_dir"] = args.out_dir
    path = train(TrainConfig.from_dict(data))
    sys.stdout.write(f"{path}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
