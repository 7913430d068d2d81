"""The seed's segmentation evaluation command, a thin wrapper over ``dltemplate eval``.

    python eval_seg_on_carvana.py --model_path <run>/UNet_best_ckpt.pth \
        --save_path <run>/test_viz/ --data_dir ./Dataset/Carvana --model_type UNet \
        --data_type Carvana --viz True

Prints dice and IoU on the run's test cars; with ``--viz True`` writes the triplets
(image, mask, prediction as PNG) of every 50th sample (``--viz_freq``) into ``--save_path``.
"""

from __future__ import annotations

import sys

from dltemplate.seed_args import seed_eval_main

if __name__ == "__main__":
    sys.exit(seed_eval_main(sys.argv[1:], exiting=True))
