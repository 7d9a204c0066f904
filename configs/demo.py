# The demo: the tiny MM-Interleaved trained from scratch on the synthetic "shape stories" corpus (data.py).
#   python train.py configs/demo.py                  (one GPU; --device=cpu --dtype=float32 for a CPU try)
# The model preset is "tiny" with the demo tokenizer's vocabulary (384 pieces + soi + image) and 16 image tokens.
preset = "tiny"
model_overrides = {
    "llm.vocab_size": 386, "pad_token_id": 383, "soi_token_id": 384, "image_token_id": 385,
    "num_img_token": 16, "resampler.num_queries": 16,
    "llm.trainable": True, "vision.trainable": True,      # from scratch: nothing is pretrained, so nothing frozen
}
vae_from = "out/demo_vae/vae.safetensors"                 # written by configs/demo_vae.py (run it first); frozen
data = "demo"
seq_len = 512
batch_size = 16
grad_accum = 1
num_workers = 4

# every part is new, so one learning rate for all (the paper's table is for fine-tuning pretrained parts)
param_groups = (("llama_cross_attn.gate", 1e-3, 0.0), ("", 1e-3, 0.05))
betas = (0.9, 0.995)
eps = 1e-6
grad_clip = 1.0
warmup_steps = 200
max_steps = 4000

dtype = "bfloat16"
seed = 0
out_dir = "out/demo"
log_interval = 20
eval_interval = 500
eval_batches = 4
ckpt_interval = 1000
keep_last = 2
