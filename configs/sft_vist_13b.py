# Visual storytelling on VIST: MM-Interleaved-13B fine-tuned to draw each image of a story from the story so far.
#   torchrun --nproc_per_node=8 train.py configs/sft_vist_13b.py [--lora_rank=64 --out_dir=out/sft_vist_13b_lora]
# Paths are placeholders; the layout is data.read_vist's. Evaluate with eval.py --task=vist.
preset = "mmi-13b"
init_from = "/path/to/mm-interleaved-13b"        # a save_pretrained folder of the pretrained model
tokenizer_path = "/path/to/mm-interleaved-13b/tokenizer.model"
data = "finetune"
finetune_dataset = "vist"
finetune_args = dict(annt_root="/path/to/vist", data_root="/path/to/vist", batch_size=4,
                     context_type="multi_modal", round_range="last",
                     loss_txt_weight=0.0)         # every image is a target (drawn from all before it); no text loss
num_workers = 8
# The images are what is learned: the LLM's MMFS cross-attention, the resamplers and the UNet train; the frozen
# set (CLIP ViT, LLaMA body, text head, VAE) follows from the model's trainable flags. With --lora_rank=64,
# mmi.add_lora freezes all of that too and trains only LoRA's A and B on the LLM's attention and MLP matmuls (the
# "lora_" row below); the image loss reaches them through the frozen image decoder.
# Every rate is the pretraining table's divided by 10 (the original released no fine-tuning rates): the model
# starts trained, and the UNet keeps its 10x lower rate relative to the rest; LoRA's row is used only with
# lora_rank > 0.
param_groups = (
    ("lora_", 2e-4, 0.0),
    ("llama_cross_attn.gate", 1e-5, 0.0),
    ("sampling_offsets", 1e-6, 0.0),
    ("llama_cross_attn", 1e-5, 0.05),
    ("image_decoder.decoder.unet", 1e-6, 0.05),
    ("", 1e-5, 0.05),
)
lora_rank = 0                                    # 0 = off; --lora_rank=64 (with lora_alpha 16: updates scaled by 1/4)
lora_alpha = 16.0
warmup_steps = 200
max_steps = 4000
frozen_dtype = "bfloat16"
activation_checkpointing = True
eval_interval = 0                                # score with eval.py --task=vist on the exported model
save_frozen = False
out_dir = "out/sft_vist_13b"
