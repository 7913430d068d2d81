"""The seed's training command, kept working as a thin wrapper over ``dltemplate train``.

    python trainer_vanilla.py --proj_name Vanilla --model_type Vanilla --data_type FashionMNIST \
        --output_dir ./Results/Vanilla/ --gpu_devices 1 --data_dir ./Dataset

Extra ``section.key=value`` arguments are passed through as config overrides.
"""

from __future__ import annotations

import sys
from pathlib import Path

from dltemplate.seed_args import seed_train_main

if __name__ == "__main__":
    config = Path(__file__).resolve().parent / "configs" / "fashion_mnist_mlp.yaml"
    sys.exit(seed_train_main(sys.argv[1:], config, exiting=True))
