"""Fill a config's teacher target caches, and nothing else: `python -m mtd.cache CONFIG [key=value ...]`.

The first step of a run at scale. Under Accelerate (`accelerate launch -m mtd.cache CONFIG`, any
number of processes and nodes) the processes share the work. Every teacher encodes the config's
corpus (and the image captions, when an image stage learns teacher targets) into `cache_dir`; a
later `train.py` run of the same config finds the caches complete and starts at once, checking
only their manifests. An interrupted fill resumes where it stopped. `--verify` also checks every
row of complete caches against the checksums recorded when they were filled, and encodes again
the chunks that fail.
"""

from __future__ import annotations

import argparse
import logging
import sys

from mtd.config import parse_config_args
from mtd.errors import cli_main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mtd.cache", description=__doc__,
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--verify", action="store_true",
                        help="check every chunk of complete caches against its checksum (reads every row)")
    cfg, args = parse_config_args(parser, argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from mtd.training.pipeline import fill_target_caches  # after parsing: --help stays instant

    return cli_main("mtd.cache", lambda: fill_target_caches(cfg, verify=args.verify))


if __name__ == "__main__":
    sys.exit(main())
