"""`python -m vaebuild ...`: the `vaebuild` command without installing the console script."""

from vaebuild.cli import main

main()
