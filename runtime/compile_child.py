"""The child runtime/precompile.py starts: `python -m runtime.compile_child BUNDLE` builds the
bundle's model over zero-stride weights (no bytes read) and runs its compiled decode step once, so
that MLX compiles its kernels into the caches the parent pointed it at; exit 0 when done."""

from __future__ import annotations

import sys
import warnings


def main(argv: list[str]) -> int:
    from runtime.generate import warm_up
    from runtime.loader import load_model
    from runtime.precompile import zero_weights

    if len(argv) != 1:
        print("usage: python -m runtime.compile_child BUNDLE (started by the runtime itself)", file=sys.stderr)
        return 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the parent said what there is to say about the bundle
        model = load_model(argv[0], lazy=True)
    zero_weights(model)
    warm_up(model)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
