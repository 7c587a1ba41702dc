r"""Quotient geometry of shallow nets: ambient against symmetry-reduced curvature along rescaling
orbits, horizontal/vertical split of SGD steps, conserved quantities of GD.

  python -m experiments.quotient_geometry --workdir=runs/quotient_geometry \
      --config=experiments/configs/quotient_geometry.py:quick
"""

from experiments import cli, launch
from experiments.studies import quotient_geometry as study

_CONFIG, _WORKDIR = launch.define_flags(study.NAME)

if __name__ == "__main__":
    cli.run(lambda argv: launch.main(argv, study, _CONFIG, _WORKDIR))
