"""`python -m runtime`: the same CLI as the `runtime` console script."""

from runtime.cli import main

if __name__ == "__main__":
    main(prog_name="runtime")
