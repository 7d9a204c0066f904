# The paper's pretraining recipe: MM-Interleaved-13B from Vicuna-13B v1.3, CLIP ViT-L/14 and SD-2.1-base.
#   torchrun --nproc_per_node=8 train.py configs/pretrain_13b.py
# Paths are placeholders: point init_from and the data at your copies.
preset = "mmi-13b"
model_overrides = {"loss_txt_weight": 1.0, "loss_img_weight": 10.0}
init_from = "/path/to/mmi_13b_init"   # the pretrained LLM, CLIP and SD: MMInterleaved.from_original(llm=...,
                                     # clip=..., sd=...).save_pretrained(...); the new parts keep their init

# per step one batch from one source, drawn with probabilities 1:1:1:2 (rows of 2048 tokens: 2 per LAION-style
# batch, 4 per MMC4 batch); the original has no gradient accumulation
data = "pretrain"
tokenizer_path = "/path/to/vicuna-13b-v1.3/tokenizer.model"
pretrain_sources = (
    # (name, kind, shard pattern, annotation root, image root, probability, rows per batch)
    ("blip2", "pair", "{0000000..0020000}.txt", "/path/to/blip2/annotations", "/path/to/blip2/images", 1.0, 2),
    ("laion_en", "pair", "{0000000..0020000}.txt", "/path/to/laion_en/annotations", "/path/to/laion_en/images", 1.0, 2),
    ("laion_coco", "pair", "{0000000..0020000}.txt", "/path/to/laion_coco/annotations", "/path/to/laion_coco/images",
     1.0, 2),
    ("mmc4", "mmc4", "docs_shard_{0..23099}_v2.jsonl", "/path/to/mmc4/annotations", "/path/to/mmc4/images", 2.0, 4),
)
grad_accum = 1
num_workers = 8

# AdamW groups: (substring, lr, weight decay), first match wins; biases and nn.LayerNorm weights get no decay.
# The frozen set (CLIP ViT, LLaMA body and embeddings, text head, VAE, position tables, the UNet-MMFS
# ignore_token) follows from the model's trainable flags and never reaches the optimizer.
param_groups = (
    ("llama_cross_attn.gate", 1e-4, 0.0),
    ("sampling_offsets", 1e-5, 0.0),
    ("llama_cross_attn", 1e-4, 0.05),
    ("image_decoder.decoder.unet", 1e-5, 0.05),
    ("", 1e-4, 0.05),
)
betas = (0.9, 0.995)
eps = 1e-6
grad_clip = 1.0
warmup_steps = 1000
max_steps = 15000

dtype = "bfloat16"               # the original used fp16 with loss scaling; bf16 needs none
frozen_dtype = "bfloat16"        # frozen weights in bf16 (matmuls run in bf16 anyway): 27 GB, whole on every GPU
fsdp = True                      # trainable weights and their AdamW states sharded; shard_frozen=True shards the
                                 # frozen ones too, for GPUs of less than 80 GB
activation_checkpointing = True
seed = 32
out_dir = "out/pretrain_13b"
log_interval = 10
eval_interval = 1000
ckpt_interval = 1000
keep_last = 5
save_frozen = False              # frozen weights come back from init_from on resume
