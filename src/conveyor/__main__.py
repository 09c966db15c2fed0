"""`python -m conveyor` runs the command line."""

from conveyor.cli.main import main

main()
