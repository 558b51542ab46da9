"""`python -m mercli` behaves exactly like the `mercli` console script."""

from mercli.cli import main

if __name__ == "__main__":
    main()
