# Segmentation-to-image on ADE20K: MM-Interleaved-13B fine-tuned to draw a photo from its colour-coded segmentation
# map and caption ("<map>caption.<photo>"), with configs/sft_vist_13b.py's recipe (model, rates, schedule). The map
# reaches the UNet through the LLM's context and, spatially, through MMFS on the map's features: the MMFS layers,
# resamplers and UNet train; CLIP ViT, LLaMA body, text head and VAE stay frozen (trainable flags).
#   torchrun --nproc_per_node=8 train.py configs/sft_ade20k_13b.py
# Paths are placeholders; the layout is data.read_ade20k's. Evaluate with eval.py --task=ade20k.
import os
import runpy

_vist = runpy.run_path(os.path.join(os.path.dirname(__file__), "sft_vist_13b.py"))
globals().update({k: v for k, v in _vist.items() if not k.startswith("_")})
finetune_dataset = "ade20k"
finetune_args = dict(annt_root="/path/to/ADEChallengeData2016", data_root="/path/to/ADEChallengeData2016",
                     batch_size=4, text_first=False,
                     loss_txt_weight=0.0)         # the photo is the only target (half the pairs mirrored)
out_dir = "out/sft_ade20k_13b"
