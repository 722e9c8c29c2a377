"""python -m dsv4_train.convert import|export|verify: see dsv4_train/convert/cli.py."""

import sys

from dsv4_train.convert.cli import main

sys.exit(main())
