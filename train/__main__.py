"""`python -m train`: see train/cli.py (or `python -m train --help`)."""

from train.cli import main

main()
