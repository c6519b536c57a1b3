"""Model Zoo entry point: python run.py {CPU,GPU,CSX} --params configs/....yaml [flags]."""

import sys

from modelzoo.cli import main

if __name__ == "__main__":
    sys.exit(main())
