# The demo, part 1: the tiny VAE of the image decoder, trained alone on the shape-story images (there is no
# pretrained SD VAE at this size). Writes out/demo_vae/vae.safetensors, which configs/demo.py loads (frozen).
#   python train.py configs/demo_vae.py
import torch

task = "vae"
preset = "tiny"
data = "demo"
seq_len = 512                    # rows of shape stories, as the demo model sees them; only the images are used
batch_size = 4                   # ~12 images per row -> ~50 images of 64x64 per step
num_workers = 8
kl_weight = 1e-6

param_groups = (("", 1e-3, 0.0),)
betas = (0.9, 0.99)
eps = 1e-8
grad_clip = 1.0
warmup_steps = 100
max_steps = 2000

dtype = "bfloat16"
if not torch.cuda.is_available():
    dtype = "float32"            # bf16 autocast is slow on CPUs
seed = 0
out_dir = "out/demo_vae"
log_interval = 50
eval_interval = 500
keep_last = 1
