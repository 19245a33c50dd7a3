"""`python -m nomoat …` is the `nomoat` command."""

from nomoat.edge.cli import main

if __name__ == "__main__":
    main()
