"""`python -m runtime`: the same CLI as the `runtime` console script."""

from runtime.cli import run

if __name__ == "__main__":
    run(prog_name="runtime")
