# Segmentation-to-image on ADE20K: MM-Interleaved-13B fine-tuned to draw a photo from its colour-coded
# segmentation map and caption ("<map>caption.<photo>").
#   torchrun --nproc_per_node=8 train.py configs/sft_ade20k_13b.py
# Paths are placeholders; the layout is data.read_ade20k's. Evaluate with eval.py --task=ade20k.
preset = "mmi-13b"
init_from = "/path/to/mm-interleaved-13b"        # a save_pretrained folder of the pretrained model
tokenizer_path = "/path/to/mm-interleaved-13b/tokenizer.model"
data = "finetune"
finetune_dataset = "ade20k"
finetune_args = dict(annt_root="/path/to/ADEChallengeData2016", data_root="/path/to/ADEChallengeData2016",
                     batch_size=4, text_first=False,
                     loss_txt_weight=0.0)         # the photo is the only target (half the pairs mirrored)
num_workers = 8
# The map reaches the UNet through the LLM's context and, spatially, through MMFS on the map's features: the
# MMFS layers, resamplers and UNet train; CLIP ViT, LLaMA body, text head and VAE stay frozen (trainable flags).
# Every rate is the pretraining table's divided by 10 (the original released no fine-tuning rates): the model
# starts trained, and the UNet keeps its 10x lower rate relative to the rest.
param_groups = (
    ("llama_cross_attn.gate", 1e-5, 0.0),
    ("sampling_offsets", 1e-6, 0.0),
    ("llama_cross_attn", 1e-5, 0.05),
    ("image_decoder.decoder.unet", 1e-6, 0.05),
    ("", 1e-5, 0.05),
)
warmup_steps = 200
max_steps = 4000
dtype = "bfloat16"
frozen_dtype = "bfloat16"
activation_checkpointing = True
eval_interval = 0                                # score with eval.py --task=ade20k on the exported model
save_frozen = False
out_dir = "out/sft_ade20k_13b"
