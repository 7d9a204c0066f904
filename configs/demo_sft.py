# Fine-tuning the demo model (assets/demo) to answer questions about a scene shown as an image, which it cannot
# before: data.py's "demo_qa", e.g. "<image>what colour is the circle? red.", one question per row, the text loss
# on the answer only (and no image loss). Then score it: python eval.py --task=demo_qa --init_from=out/demo_sft/model
#   python train.py configs/demo_sft.py             (one GPU, ~a few minutes; on a machine without one, the CPU sizes)
import json
import os
import runpy

import torch

_here = os.path.dirname(__file__)
init_from = os.path.join(_here, "..", "assets", "demo")
# the model's config must be the one it was trained with: configs/demo.py's, with its VAE's latent scale
preset = "tiny"
with open(os.path.join(init_from, "config.json")) as _f:
    _vae_scale = json.load(_f)["vae"]["scaling_factor"]
model_overrides = {**runpy.run_path(os.path.join(_here, "demo.py"))["model_overrides"], "vae.scaling_factor": _vae_scale}
data = "finetune"
finetune_dataset = "demo_qa"
finetune_args = dict(batch_size=64)   # questions per step, one a row (~30 tokens and one image each)
num_workers = 2
dtype = "bfloat16"
max_steps = 400
if not torch.cuda.is_available():
    # a CPU try: fewer rows a step, float32 (bf16 autocast is slow on CPUs)
    finetune_args, dtype, max_steps = dict(batch_size=16), "float32", 300

# every weight that configs/demo.py trained keeps training (all but the VAE and the fixed position tables), at
# half the learning rate it was trained with
param_groups = (("llama_cross_attn.gate", 5e-4, 0.0), ("", 5e-4, 0.05))
warmup_steps = 20
grad_clip = 1.0

seed = 0
out_dir = "out/demo_sft"
eval_interval = 100              # validation loss on held-out questions
ckpt_interval = 0                # a checkpoint at the end only
keep_last = 1
export_dtype = "bfloat16"
