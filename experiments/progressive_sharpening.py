r"""Progressive sharpening and the input–output Jacobian: λ_max and ‖∂f/∂x‖ over training
under regularisers, against the generalisation gap.

  python -m experiments.progressive_sharpening --workdir=runs/progressive_sharpening \
      --config=experiments/configs/progressive_sharpening.py:quick
"""

from experiments import cli, launch
from experiments.studies import progressive_sharpening as study

_CONFIG, _WORKDIR = launch.define_flags(study.NAME)

if __name__ == "__main__":
    cli.run(lambda argv: launch.main(argv, study, _CONFIG, _WORKDIR))
