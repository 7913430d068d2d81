"""The seed's evaluation command, a thin wrapper over ``dltemplate eval``.

python eval_vanilla.py --model_path ./Results/Vanilla/<timestamp>/Vanilla_best_ckpt.pth
"""

from __future__ import annotations

import sys

from dltemplate.seed_args import seed_eval_main

if __name__ == "__main__":
    sys.exit(seed_eval_main(sys.argv[1:], exiting=True))
