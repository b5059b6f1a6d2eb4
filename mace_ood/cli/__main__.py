"""``python -m mace_ood.cli``: the same command line as ``mace-ood``."""

from mace_ood.cli import main

main()
