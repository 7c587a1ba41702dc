r"""Edge of stochastic stability: SGD over batch sizes, batch sharpness and λ_max against 2/η.

  python -m experiments.edge_of_stochastic_stability --workdir=runs/eoss \
      --config=experiments/configs/edge_of_stochastic_stability.py:quick
"""

from experiments import cli, launch
from experiments.studies import edge_of_stochastic_stability as study

_CONFIG, _WORKDIR = launch.define_flags(study.NAME)

if __name__ == "__main__":
    cli.run(lambda argv: launch.main(argv, study, _CONFIG, _WORKDIR))
