"""`ray job submit ... -- python jobs/score.py [spamray score options]`: the CLI verb as a Ray job.

Thin on purpose: the options are the CLI's (`spamray score --help`); the exit status is non-zero
when the job failed, so `ray job submit` and a scheduler see it.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the working dir's spamray

from spamray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["score", *sys.argv[1:]]))
