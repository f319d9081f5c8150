"""``python -m bsr_kernels.finetune``: the ``bsr-finetune`` command."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
