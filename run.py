"""Model Zoo entry point: python run.py {CPU,GPU,CSX} --params configs/....yaml [flags]."""

from modelzoo.cli import main
from modelzoo.distributed import exit_process

if __name__ == "__main__":
    exit_process(main())
