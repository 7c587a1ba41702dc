r"""SGD noise vs curvature: per-layer C, H and E_p[h_p²] after SGD with CE and squared error.

  python -m experiments.noise_curvature --workdir=runs/noise_curvature \
      --config=experiments/configs/noise_curvature.py:quick
"""

from experiments import cli, launch
from experiments.studies import noise_curvature as study

_CONFIG, _WORKDIR = launch.define_flags(study.NAME)

if __name__ == "__main__":
    cli.run(lambda argv: launch.main(argv, study, _CONFIG, _WORKDIR))
