"""Run the command line from a checkout: ``python cli.py resnet50 --attn cbam``."""

import sys

from retrofit.cli import main

if __name__ == "__main__":
    sys.exit(main())
