"""The seed's segmentation training command, a thin wrapper over ``dltemplate train``.

    python trainer_seg_on_carvana.py --proj_name SegOnCarvana --model_type UNet \
        --data_type Carvana --output_dir ./Results/SegOnCarvana/ --gpu_devices 0 \
        --data_dir ./Dataset/Carvana/

An ``--output_dir`` inside ``--data_dir`` (the seed's own command said ``Dataset/Carvana/``) is
moved to ``./Results/<proj_name>/``, with a note: runs never land among the data.

``--model_type UNet++`` (or ``NestedUNet``) trains UNet++. Extra ``section.key=value``
arguments are passed through as config overrides.
"""

from __future__ import annotations

import sys
from pathlib import Path

from dltemplate.seed_args import seed_train_main

if __name__ == "__main__":
    config = Path(__file__).resolve().parent / "configs" / "unet_carvana.yaml"
    sys.exit(seed_train_main(sys.argv[1:], config, exiting=True))
