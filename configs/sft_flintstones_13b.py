# Story visualisation on FlintstonesSV: configs/sft_vist_13b.py's recipe (model, what trains, rates, schedule) on
# FlintstonesSV's stories.
#   torchrun --nproc_per_node=8 train.py configs/sft_flintstones_13b.py
# Paths are placeholders; the layout is data.read_flintstones's. Evaluate with eval.py --task=flintstones.
import os
import runpy

_vist = runpy.run_path(os.path.join(os.path.dirname(__file__), "sft_vist_13b.py"))
globals().update({k: v for k, v in _vist.items() if not k.startswith("_")})
finetune_dataset = "flintstones"
finetune_args = dict(finetune_args, annt_root="/path/to/flintstones", data_root="/path/to/flintstones")
out_dir = "out/sft_flintstones_13b"
