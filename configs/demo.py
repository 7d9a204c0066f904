# The demo: the tiny MM-Interleaved trained from scratch on the synthetic "shape stories" corpus (data.py).
#   python train.py configs/demo.py                  (one GPU; on a machine without one, the CPU sizes below)
import torch

# The model starts from the "tiny" preset (64x64 images) with the demo tokenizer's vocabulary (384 pieces + soi +
# image), 16 image tokens, and the widths below.
preset = "tiny"
model_overrides = {
    "llm.vocab_size": 386, "pad_token_id": 383, "soi_token_id": 384, "image_token_id": 385,
    "llm.trainable": True, "vision.trainable": True,      # from scratch: nothing is pretrained, so nothing frozen
    # wider and deeper than the tiny test preset (1.8M parameters) where it pays: the LLM that has to work out
    # the edited scene, the UNet that draws it; ~11.5M parameters, ~23 MB in bf16
    "vision.hidden_size": 128, "vision.intermediate_size": 512, "vision.conv_inplane": 16,
    "vision.adapter_n_points": 4,
    "num_img_token": 16, "resampler.num_queries": 16, "resampler.hidden_size": 128, "resampler.intermediate_size": 256,
    "resampler.encoder_hidden_size": 128,
    "llm.hidden_size": 256, "llm.intermediate_size": 512, "llm.num_hidden_layers": 6, "llm.num_attention_heads": 8,
    "mmfs.n_heads": 8, "mmfs.n_points": 4,
    "unet.block_out_channels": (64, 128), "unet.cross_attn_blocks": (True, True), "unet.num_attention_heads": (4, 8),
    "unet.cross_attention_dim": 128, "unet.norm_num_groups": 16,
    "image_decoder.resampler.num_queries": 16, "image_decoder.resampler.hidden_size": 128,
    "image_decoder.resampler.num_attention_heads": 4, "image_decoder.resampler.intermediate_size": 256,
    "image_decoder.resampler.encoder_hidden_size": 256,
    "image_decoder.mmfs_feat_dim": 128, "image_decoder.mmfs_attn_dim": 128, "image_decoder.mmfs_heads": 4,
    "image_decoder.mmfs_points": 4,
    # a shape's colour changes the VAE latent ~10x less than its place, and only the image loss needs the colour
    # word kept in the LLM's last layer (the next token never asks for it again): the image loss weighs 40 (the
    # paper's 10 leaves recolours drawn in one colour whatever the word), min-SNR-5 weighting of the timesteps
    "loss_img_weight": 40.0, "image_decoder.snr_gamma": 5.0,
}
vae_from = "out/demo_vae/vae.safetensors"                 # written by configs/demo_vae.py (run it first); frozen
data = "demo"
# an edit that names the colour because another object shares the shape ("the purple circle disappears" beside a
# green circle) is a quarter of the natural stories and is what a model drawn from them gets wrong: keep every
# training story with one and a fifth of the rest (about half the edits seen then need the colour)
demo_keep_by_shape = 0.2
seq_len = 512
batch_size = 32                  # rows of up to 512 tokens: ~5 stories, at most 15 images (the packer's cap)
num_workers = 6
dtype = "bfloat16"
compile = True                   # the blocks through torch.compile, as the shipped model was trained
if not torch.cuda.is_available():
    # a CPU try: a row takes ~1 GB in the step (32 rows would not fit), and bf16 autocast is slow on CPUs (with
    # --device=cpu on a machine with a GPU, give these on the command line)
    batch_size, dtype, compile = 2, "float32", False

# every part is new, so one learning rate for all (the paper's table is for fine-tuning pretrained parts). Drawing
# what the text says needs a quiet gradient through the condition path (LLM -> resampler -> UNet cross-attention):
# at 2e-3 the images ignore the sentence's colours and places; the words are learnt at either rate.
param_groups = (("llama_cross_attn.gate", 1e-3, 0.0), ("", 1e-3, 0.05))
betas = (0.9, 0.995)
eps = 1e-6
grad_clip = 1.0
warmup_steps = 200
max_steps = 3000

seed = 0
out_dir = "out/demo"
log_interval = 20
eval_interval = 1000             # validation loss and eval.py's demo scoreboard on 16 test stories
keep_last = 1
export_dtype = "bfloat16"        # assets/demo/model.safetensors stays small (the VAE is kept in float32)
