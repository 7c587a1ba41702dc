r"""Fisher-geometric sharpness: Riemannian vs Euclidean sharpness over an η × B grid, before
and after function-preserving rescalings.

  python -m experiments.fisher_sharpness --workdir=runs/fisher \
      --config=experiments/configs/fisher_sharpness.py:quick
"""

from experiments import cli, launch
from experiments.studies import fisher_sharpness as study

_CONFIG, _WORKDIR = launch.define_flags(study.NAME)

if __name__ == "__main__":
    cli.run(lambda argv: launch.main(argv, study, _CONFIG, _WORKDIR))
