# Supervised fine-tuning of MM-Interleaved-13B on LLaVA-style instruction data (questions about an image, answered
# in text), starting from a pretrained MM-Interleaved:
#   torchrun --nproc_per_node=8 train.py configs/sft_vqa_13b.py
#   torchrun --nproc_per_node=8 train.py configs/sft_vqa_13b.py --lora_rank=64 --out_dir=out/sft_vqa_13b_lora
# The paths are placeholders: set init_from, tokenizer_path and finetune_args' annt / data_root to your copies.
preset = "mmi-13b"
init_from = "/path/to/mmi_13b"  # a save_pretrained folder of the pretrained model, e.g. written once by
                                # MMInterleaved.from_original(..., mmi="mm_interleaved_pretrain").save_pretrained
tokenizer_path = "/path/to/vicuna-13b-v1.3/tokenizer.model"

# data.llava_dataset: each (human, gpt) round of a record is one example; the text loss is on the answer only and
# the image decoder does not run (every batch has loss_img_weight 0)
data = "finetune"
finetune_dataset = "llava"
finetune_args = {
    "annt": "/path/to/llava_v1_5_mix665k.json",  # a .json list or .jsonl of records; a list of files also works
    "data_root": "/path/to/llava_images",        # image paths in the records are relative to it
    "val_annt": "",                              # "" = no validation split, no validation loss
    "batch_size": 4,                             # rows per micro-batch, per GPU
    "max_len": 2048,                             # tokens per row; longer rows lose the answer's end
}
num_workers = 4

# What trains: the pretraining's set, less the UNet. The LLM body, its embeddings and text head and CLIP stay
# frozen (at 13B, AdamW states for the LLM would not fit beside it on 8 GPUs); the ViT-Adapter, the visual
# Q-Former resampler, the MMFS layers in the LLM (llama_cross_attn) and the text head's new rows learn to answer.
# The UNet is frozen because a text-only loss never reaches it (the image decoder's other small parts get no
# gradient either and so never move). With --lora_rank=64, mmi.add_lora freezes all of that too and trains only
# LoRA's A and B on the LLM's attention and MLP matmuls (the "lora_" row below); the export merges them.
model_overrides = {"unet.trainable": False}

# AdamW groups: (substring, lr, weight decay), first match wins; biases and nn.LayerNorm weights get no decay.
# The paper's pretraining table at a tenth of its rates (a fine-tuning choice made here: the original publishes
# no fine-tuning recipe), and a row for LoRA, used only with lora_rank > 0. AdamW's betas and eps and the gradient
# clipping are the pretraining's, train.py's defaults.
param_groups = (
    ("lora_", 2e-4, 0.0),
    ("llama_cross_attn.gate", 1e-5, 0.0),
    ("sampling_offsets", 1e-6, 0.0),
    ("llama_cross_attn", 1e-5, 0.05),
    ("", 1e-5, 0.05),
)
lora_rank = 0                    # 0 = off; --lora_rank=64 (with lora_alpha 16: updates scaled by 1/4)
lora_alpha = 16.0
warmup_steps = 200
max_steps = 5000

frozen_dtype = "bfloat16"        # frozen weights in bf16: 27 GB, whole on every GPU
activation_checkpointing = True
out_dir = "out/sft_vqa_13b"
eval_interval = 500
eval_batches = 8
ckpt_interval = 500
keep_last = 3
save_frozen = False              # frozen weights come back from init_from on resume
