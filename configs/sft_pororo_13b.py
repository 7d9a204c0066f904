# Story visualisation on PororoSV: configs/sft_vist_13b.py's recipe (model, what trains, rates, schedule) on
# PororoSV's stories.
#   torchrun --nproc_per_node=8 train.py configs/sft_pororo_13b.py
# Paths are placeholders; the layout is data.read_pororo's. Evaluate with eval.py --task=pororo.
import os
import runpy

_vist = runpy.run_path(os.path.join(os.path.dirname(__file__), "sft_vist_13b.py"))
globals().update({k: v for k, v in _vist.items() if not k.startswith("_")})
finetune_dataset = "pororo"
finetune_args = dict(finetune_args, annt_root="/path/to/pororo", data_root="/path/to/pororo")
out_dir = "out/sft_pororo_13b"
