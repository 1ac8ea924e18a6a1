"""`python -m weaktr_cli` runs the same CLI as the `weaktr` console script."""

from weaktr_cli.commands.app import main

if __name__ == "__main__":
    main()
