"""Train MM-Interleaved.

    python train.py configs/demo.py [--key=value ...]                       # one process, CPU or one GPU
    torchrun --nproc_per_node=8 train.py configs/pretrain_13b.py [...]      # FSDP over 8 GPUs

A config file is plain Python that assigns names of `TrainConfig` fields; `--key=value` overrides come last,
`--model.<dotted MMIConfig key>=value` changes the model (e.g. --model.llm.num_hidden_layers=2). Both are
type-checked and unknown keys are an error.

The file reads top to bottom: the config, the paper's parameter groups and schedule, the FLOP count behind MFU,
the data streams, FSDP, checkpoints, evaluation, the demo's VAE-only task, the command line (`main`), and then
`run`: one flat loop of micro-batches, backward, the NaN guard, clipping, the optimizer step, logging, evaluation
and checkpoints, in which the host reads a step's logged numbers back only once the next step's work is queued, so
that the GPU is not left idle between steps.
"""

import contextlib
import dataclasses
import difflib
import gc
import json
import math
import os
import queue
import random
import shutil
import sys
import textwrap
import threading
import time
import traceback
import types
import warnings
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import mmi

# ----------------------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------------------

# The original's `random_params_list`: (substring of the parameter name, learning rate, weight decay).
# The first row whose substring occurs in the name wins; "" matches everything. Only trainable parameters are
# grouped, and inside every row biases and nn.LayerNorm parameters get weight decay 0 (see `decays`).
PAPER_PARAM_GROUPS = (
    ("llama_cross_attn.gate", 1e-4, 0.0),
    ("sampling_offsets", 1e-5, 0.0),            # every MMFS and every adapter deformable attention
    ("llama_cross_attn", 1e-4, 0.05),
    ("image_decoder.decoder.unet", 1e-5, 0.05),
    ("", 1e-4, 0.05),
)


@dataclass
class TrainConfig:
    # model
    task: str = "mmi"                            # "mmi" | "vae" (the image decoder's VAE alone, for the demo)
    preset: str = "tiny"                         # an mmi.MMIConfig preset: "tiny" | "mmi-13b"
    model_overrides: dict = field(default_factory=dict)   # dotted MMIConfig keys -> values, applied to the preset
    init_from: str = ""                          # "" = random init from `seed`; else a save_pretrained directory
    vae_from: str = ""                           # a vae.safetensors written by a task="vae" run, for the frozen VAE
    kl_weight: float = 1e-6                      # task="vae": weight of the KL term
    # data
    data: str = "synthetic"                      # "demo" (shape stories) | "synthetic" (random rows) | "pretrain"
    batch_size: int = 2                          # rows per micro-batch, per process
    grad_accum: int = 1                          # micro-batches per optimizer step
    seq_len: int = 256                           # tokens per row for demo / synthetic data
    images_per_row: int = 2                      # synthetic data
    num_workers: int = 0                         # DataLoader workers (demo / pretrain), at most the CPU cores less one
    demo_num_stories: int = 0                    # stories per demo epoch; 0 = the whole split
    tokenizer_path: str = ""                     # demo / pretrain; "" = the demo tokenizer in assets/
    pretrain_sources: tuple = ()                 # data="pretrain", one tuple per source: (name, "mmc4" | "pair",
                                                 # shard pattern, annt_root, data_root, probability, rows per batch)
    # optimizer and schedule
    param_groups: tuple = PAPER_PARAM_GROUPS     # AdamW groups (substring of the parameter name, lr, weight decay),
                                                 # the first match wins; the default is the paper's table
    betas: tuple = (0.9, 0.995)                  # AdamW
    eps: float = 1e-6                            # AdamW
    grad_clip: float = 1.0                       # max global grad norm; 0 = no clipping (the norm is still logged)
    warmup_steps: int = 1000                     # linear from 0, then cosine to 0 at max_steps
    max_steps: int = 15000                       # optimizer steps
    # system
    device: str = "auto"                         # auto | cpu | cuda | cuda:N
    init_device: str = "cpu"                     # where a new model's random weights are drawn: "cpu" gives the same
                                                 # weights on every machine; "cuda" is minutes faster at 13B
    dtype: str = "bfloat16"                      # bfloat16 (autocast, float32 master weights) | float32
    frozen_dtype: str = "float32"                # "bfloat16" stores frozen weights (never updated) in bf16
    fsdp: bool = True                            # shard with torch FSDP when torchrun starts several processes
    shard_frozen: bool = False                   # FSDP: shard frozen weights too (default: whole on every rank)
    activation_checkpointing: bool = False       # recompute every LLM / CLIP / UNet block in the backward pass
    compile: bool = False                        # torch.compile those blocks (their checkpointing compiled too)
                                                 # and the frozen VAE encoder
    seed: int = 32                               # initial weights, data order and noise
    tf32: bool = True                            # TF32 matmuls and convolutions on CUDA
    # logging, evaluation, checkpoints
    out_dir: str = "out"                         # metrics.jsonl, checkpoints ckpt_<step>/, the exported model
    log_interval: int = 10                       # steps between metrics.jsonl lines
    eval_interval: int = 1000                    # steps between evaluations; 0 = never
    eval_batches: int = 4                        # validation micro-batches per evaluation
    eval_demo_stories: int = 16                  # data="demo": test stories of eval.py's demo scoreboard per evaluation
    ckpt_interval: int = 1000                    # steps between checkpoints; 0 = only at the end; -1 = never
    keep_last: int = 5                           # checkpoints kept in out_dir
    save_frozen: bool = True                     # False: frozen weights are not written (they come from init_from)
    resume: bool = False                         # continue from the newest checkpoint in out_dir
    export: bool = True                          # at the end: out_dir/model (save_pretrained) or vae.safetensors
    export_dtype: str = ""                       # "" keeps each weight's dtype; "bfloat16" halves it (VAE: float32)
    nan_patience: int = 5                        # stop after this many non-finite steps in a row
    peak_flops: float = 989e12                   # per device, for MFU (H100 SXM dense bf16)
    progress: bool = True                        # tqdm bar on rank 0


# the string fields that take one of a few values
CHOICES = {"task": ("mmi", "vae"), "data": ("demo", "synthetic", "pretrain"), "dtype": ("bfloat16", "float32"),
           "frozen_dtype": ("bfloat16", "float32"), "export_dtype": ("", "bfloat16", "float32"),
           "init_device": ("cpu", "cuda")}

USAGE = """\
usage: python train.py CONFIG.py [--key=value ...] [--model.<key>=value ...]
       torchrun --nproc_per_node=N train.py CONFIG.py [...]

  python train.py configs/demo_vae.py   # the demo, stage 1: its tiny VAE (out/demo_vae/vae.safetensors)
  python train.py configs/demo.py       # stage 2: the demo model from scratch on shape stories (out/demo/model)
  python train.py --help                # every config key with its default and meaning
"""


def config_help():
    """--help: the usage, how values are given, then every TrainConfig field with its default and meaning, read
    from the class's source: a field's meaning is the comment after it and the comment lines under it indented
    further; a comment line at the fields' own indentation heads a section."""
    import inspect
    import re
    cfg = mmi.MMIConfig()
    sections = [f.name for f in dataclasses.fields(cfg) if dataclasses.is_dataclass(getattr(cfg, f.name))]
    lines = [*USAGE.splitlines(), "",
             "A config file is plain Python that assigns TrainConfig keys (see configs/); --key=value after it",
             "wins. A value is read as its key's type: numbers, true/false (a bare --key is true), Python literals",
             "for tuples (--betas=\"(0.9, 0.99)\"), plain text for strings. --model.<key>=value changes the model's",
             "config (mmi.MMIConfig of `preset`, documented in mmi.py) by dotted key into its sections",
             f"({', '.join(sections)}), e.g. --model.llm.num_hidden_layers=2.", "", "config keys (default, meaning):"]
    for line in inspect.getsource(TrainConfig).splitlines()[1:]:
        key = re.match(r"    (\w+): \w+ = (.*?)\s*(?:#\s*(.*))?$", line)
        comment = re.match(r"(\s*)#\s*(.*)$", line)
        if key:
            name, default, meaning = key.groups()
            if default.startswith("field("):
                default = repr(getattr(TrainConfig(), name))
            lines.append(f"  {name} = {default}".ljust(38) + f" {meaning or ''}".rstrip())
        elif comment and len(comment.group(1)) == 4:
            lines.append(comment.group(2) + ":")
        elif comment:
            lines[-1] += " " + comment.group(2)
    return "\n".join(textwrap.fill(line, 116, subsequent_indent=" " * 39) if len(line) > 116 else line
                     for line in lines)


def _unknown(key, names, where, prefix=""):
    """The error for a key that is not in `names`, with the closest one as a hint (as the user would write it)."""
    close = difflib.get_close_matches(key, names, n=1)
    hint = f"; did you mean {prefix}{close[0]}?" if close else "; python train.py --help lists the keys"
    return mmi.InputError(f"{where}: unknown key {key!r}{hint}")


def _model_keys(cfg, prefix=""):
    """Every dotted key of an MMIConfig, sections included."""
    keys = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        keys.append(prefix + f.name)
        if dataclasses.is_dataclass(value):
            keys += _model_keys(value, prefix + f.name + ".")
    return keys


def read_config_file(path):
    """A config file's assignments {name: value}, helpers and imports left out. Any mistake in it (missing, not
    Python, raising) is an InputError naming the file and line."""
    try:
        with open(path) as f:
            code = compile(f.read(), path, "exec")
    except OSError as e:
        raise mmi.InputError(f"{path}: cannot read the config file ({e.strerror})") from None
    except (SyntaxError, ValueError) as e:                  # ValueError: null bytes
        raise mmi.InputError(f"{path}:{getattr(e, 'lineno', '?')}: not valid Python: {getattr(e, 'msg', e)}") from None
    values = {}
    try:
        exec(code, values)                                   # one namespace, so helpers see the file's names
    except Exception as e:                                   # the file is the user's code: its error is theirs
        line = next((f.lineno for f in reversed(traceback.extract_tb(e.__traceback__)) if f.filename == path), "?")
        raise mmi.InputError(f"{path}:{line}: {type(e).__name__}: {e}") from None
    return {k: v for k, v in values.items()
            if not (k.startswith("_") or callable(v) or isinstance(v, types.ModuleType))}


def load_config(argv):
    """argv = [config.py] [--key=value ...] -> TrainConfig. Config files set fields by plain assignment; their
    values and the command line's strings are checked (and strings parsed) by mmi's one override parser."""
    tc, path = TrainConfig(), None
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    if argv and not argv[0].startswith("-"):
        path, argv = argv[0], argv[1:]
        for key, value in read_config_file(path).items():
            if key not in names:
                raise _unknown(key, names, path)
            old = getattr(tc, key)
            if isinstance(value, str) and not isinstance(old, str):     # Python values in a file: no parsing
                raise mmi.InputError(f"{path}: {key} = {value!r} is a str, expected {type(old).__name__}")
            try:
                tc = dataclasses.replace(tc, **{key: mmi._parse_like(old, mmi._to_tuple(value), key)})
            except mmi.InputError as e:
                raise mmi.InputError(f"{path}: {e}") from None
    model_overrides = dict(tc.model_overrides)
    typed = []                                               # model keys given on the command line
    for item in argv:
        if not item.startswith("--"):
            raise mmi.InputError(f"{item!r}: expected --key=value (a config file comes first)")
        key, value = item[2:].split("=", 1) if "=" in item else (item[2:], None)
        if key.startswith("model.") and value is not None:
            model_overrides[key[len("model."):]] = value
            typed.append(key[len("model."):])
        elif key not in names:
            raise _unknown(key, names, "command line", "--")
        elif value is None:                                  # a bare --flag sets a true/false key
            if not isinstance(getattr(tc, key), bool):
                raise mmi.InputError(f"{item}: expected {item}=<{type(getattr(tc, key)).__name__}>")
            tc = dataclasses.replace(tc, **{key: True})
        else:
            tc = mmi.apply_overrides(tc, {key: value})       # strings parsed to the field's type
    tc = dataclasses.replace(tc, model_overrides=model_overrides)
    for key, allowed in CHOICES.items():
        if getattr(tc, key) not in allowed:
            raise mmi.InputError(f"{key} {getattr(tc, key)!r}, expected one of {', '.join(map(repr, allowed))}")
    for key, least in (("batch_size", 1), ("grad_accum", 1), ("keep_last", 1), ("nan_patience", 1),
                       ("num_workers", 0), ("max_steps", 0)):
        if getattr(tc, key) < least:
            raise mmi.InputError(f"{key} {getattr(tc, key)}, expected {least} or more")
    model_keys = _model_keys(mmi.MMIConfig.from_preset(tc.preset))
    for key in model_overrides:
        if key not in model_keys and key in typed:
            raise _unknown(f"model.{key}", [f"model.{k}" for k in model_keys], "command line", "--")
        if key not in model_keys:
            raise _unknown(key, model_keys, f"{path}: model_overrides")
    cfg = model_config(tc)                                    # bad model values fail here, before anything starts
    if tc.data == "synthetic" and tc.task == "mmi" and tc.seq_len < 2 + tc.images_per_row * (cfg.num_img_token + 2):
        raise mmi.InputError(f"seq_len {tc.seq_len} cannot hold images_per_row={tc.images_per_row} images of "
                             f"{cfg.num_img_token + 1} tokens each plus text")
    return tc


def model_config(tc):
    cfg = mmi.apply_overrides(mmi.MMIConfig.from_preset(tc.preset), tc.model_overrides)
    if tc.vae_from:   # the latent scale belongs to the VAE: take the one measured when it was trained
        cfg = mmi.apply_overrides(cfg, {"vae.scaling_factor": read_vae_scaling_factor(tc.vae_from)})
    # with compile, compile_blocks does the checkpointing (inside the compiled function), not the model's loops
    return dataclasses.replace(cfg, gradient_checkpointing=tc.activation_checkpointing and not tc.compile)


# ----------------------------------------------------------------------------------------------------------------
# Parameter groups and the learning-rate schedule
# ----------------------------------------------------------------------------------------------------------------


def decays(model):
    """{name: bool} for every parameter: weight decay applies unless the parameter belongs to an nn.LayerNorm or
    its name contains "bias" (the original's HF Trainer rule). RMSNorm and the adapter's channels-first
    LayerNorm2d are not nn.LayerNorm, so they ARE decayed, as in the original."""
    layer_norm = {f"{m_name}.{p_name}" if m_name else p_name
                  for m_name, m in model.named_modules() if isinstance(m, nn.LayerNorm)
                  for p_name, _ in m.named_parameters(recurse=False)}
    return {name: name not in layer_norm and "bias" not in name for name, _ in model.named_parameters()}


def param_groups(model, table):
    """Trainable parameters -> AdamW groups [{"params", "names", "lr", "weight_decay"}], one per table row and
    decay flag (empty groups dropped). Frozen parameters never reach the optimizer."""
    decay = decays(model)
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        row = next(i for i, (sub, _, _) in enumerate(table) if sub in name)
        key = (row, decay[name])
        if key not in groups:
            _, lr, wd = table[row]
            groups[key] = {"params": [], "names": [], "lr": lr, "weight_decay": wd if decay[name] else 0.0}
        groups[key]["params"].append(p)
        groups[key]["names"].append(name)
    return [groups[k] for k in sorted(groups)]


def lr_multiplier(step, warmup_steps, max_steps):
    """HF's cosine-with-warmup (the original's scheduler) at optimizer step `step` (0-based): step/warmup during
    the warm-up (so step 0 has lr 0, as there), then half a cosine from 1 down to 0 at max_steps."""
    if step < warmup_steps:
        return step / warmup_steps
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


# ----------------------------------------------------------------------------------------------------------------
# Model FLOPs for MFU
# ----------------------------------------------------------------------------------------------------------------
# What is counted: multiply-adds of every matrix multiply and convolution (2 FLOPs each) plus the attention
# score and value products, forward and backward; a weight that trains costs 3x its forward (forward, input
# gradient, weight gradient), a frozen weight that gradients pass through 2x, a forward-only part (the VAE
# encoder) 1x; attention products 3x. Attention is counted over the full square, causal or not (the PaLM /
# Megatron convention). Not counted: norms, activations, softmax, RoPE, the deformable bilinear sampling
# (gather-bound), MMFS's one-hot row picks, and the recomputation that activation checkpointing adds (so this is
# MFU, not HFU).


def _params(module):
    return sum(p.numel() for p in module.parameters()) if module is not None else 0


def llm_flops(cfg, B, L, N):
    """LLM with MMFS on B rows of L tokens with N image slots per row: the 6N rule per token for trained weights
    (4N for the frozen body and head, through which gradients still flow) plus the attention term."""
    c, x = cfg.llm, cfg.mmfs
    d, T = c.hidden_size, B * L
    body = T * c.num_hidden_layers * (4 * d * d + 3 * d * c.intermediate_size)   # q,k,v,o + gate,up,down
    head, head_new = T * d * c.vocab_size, T * d * 2                              # head_new always trains
    attn = B * c.num_hidden_layers * 2 * L * L * d                                # QK^T and AV
    n_cross = len(range(0, c.num_hidden_layers, x.cross_attention_frequency)) if N else 0   # no images: skipped
    dv, lv, H, P = cfg.vision.hidden_size, len(x.spatial_shapes), x.n_heads, x.n_points
    out = H * P * 2 + H * lv * (P + 1)                                            # sampling_offsets, attention_weights
    mmfs = n_cross * (T * (d * d + dv * d)                                       # dynamic_offset_mask, output_proj
                      + T * d * out                                               # offsets, weights: once per query
                      + B * N * sum(s * s for s in x.spatial_shapes) * dv * dv)   # value_proj per image token
    tables = n_cross * x.max_num_image_per_seq * d * out                          # query_relpos through both layers
    w = 3 if c.trainable else 2
    return 2 * (w * (body + head) + 3 * head_new + 3 * attn + (3 if x.trainable else 2) * mmfs
                + (3 if x.trainable else 1) * tables)


def vision_flops(model, cfg, n_images):
    """Visual tokenizer: CLIP ViT exactly by shape; the adapter estimated as every adapter weight applied once
    per pyramid token (4 + 1 + 1/4 tokens per patch); Q-Former by shape; all per image."""
    v, r = cfg.vision, cfg.resampler
    G, d = v.grid_size, v.hidden_size
    n = 1 + G * G
    clip = v.num_hidden_layers * (n * (4 * d * d + 2 * d * v.intermediate_size) + 2 * n * n * d) \
        + G * G * 3 * v.patch_size ** 2 * d
    vm = model.visual_tokenizer.encoder["vision_model"]
    adapter = sum(_params(m) for name, m in vm.named_children() if name.startswith("adapter")) * 5.25 * G * G
    h, Q = r.hidden_size, r.num_queries
    n_xattn = len(range(0, r.num_hidden_layers, r.cross_attention_frequency))
    qformer = r.num_hidden_layers * Q * (4 * h * h + 2 * h * r.intermediate_size + 2 * Q * h) \
        + n_xattn * (Q * 2 * h * h + n * 2 * h * r.encoder_hidden_size + 2 * Q * n * h) \
        + n * 2 * d * d + Q * h * cfg.llm.hidden_size                             # pos_proj, post-LN input; proj
    return 2 * n_images * ((3 if v.trainable else 2) * clip + (3 if v.adapter_trainable else 2) * adapter
                           + (3 if r.trainable else 2) * qformer)


def image_decoder_flops(model, n_images, context_tokens):
    """UNet + UNet-MMFS estimated as each block's weights applied at every position of its resolution, plus the
    transformer blocks' attention products; the image Q-Former by shape; the VAE encoder forward only."""
    dec = model.image_decoder
    if dec is None or n_images == 0:
        return 0
    sd = dec.decoder
    ucfg, side = sd.unet.cfg, sd.unet.cfg.sample_size
    levels = len(ucfg.block_out_channels)
    unet = (_params(sd.unet.conv_in) + _params(sd.unet.conv_out)) * side ** 2
    attn = 0
    for i, (down, up) in enumerate(zip(sd.unet.down_blocks, sd.unet.up_blocks)):
        s_down, s_up = side >> i, side >> (levels - 1 - i)
        unet += _params(down) * s_down ** 2 + _params(up) * s_up ** 2
        for block, s in ((down, s_down), (up, s_up)):
            for t in getattr(block, "attentions", None) or ():
                c = t.proj_in.out_features if isinstance(t.proj_in, nn.Linear) else t.proj_in.out_channels
                attn += 2 * (s * s) ** 2 * c + 2 * s * s * dec.cfg.resampler.num_queries * c
    unet += _params(sd.unet.mid_block) * (side >> (levels - 1)) ** 2
    # UNet-MMFS: query-side weights at the block's own resolution, value_proj once per previous-image map token
    blocks = list(zip(sd.mmfs_module.mmfs_down_blocks, [s for _, s in mmi.unet_skip_layout(ucfg)]))
    blocks.append((sd.mmfs_module.mmfs_mid_block, side >> (levels - 1)))
    value_tokens = sum(s * s for s in dec.cfg.mmfs_value_sizes)
    mmfs = 0
    for b, s in blocks:
        value_proj = _params(b.mmfs.value_proj)
        mmfs += (_params(b) - b.pos_embed.numel() - value_proj) * s * s + value_proj * value_tokens
    r = dec.cfg.resampler
    qformer = r.num_queries * _params(dec.perceiver_resampler) + context_tokens * 2 * r.hidden_size ** 2 / n_images
    vae = sum(_params(b) * (dec.cfg.image_size >> i) ** 2 for i, b in enumerate(sd.vae.encoder.down_blocks))
    return 2 * n_images * (3 * (unet + attn + mmfs + qformer) + vae)


def vae_flops(model, n_images, image_size):
    """task="vae": encoder and decoder blocks' weights at every position of their resolution, trained (3x)."""
    vae = model.vae
    enc = sum(_params(b) * (image_size >> i) ** 2 for i, b in enumerate(vae.encoder.down_blocks))
    dec = sum(_params(b) * (image_size >> (len(vae.decoder.up_blocks) - 1 - i)) ** 2
              for i, b in enumerate(vae.decoder.up_blocks))
    mid = (_params(vae.encoder.mid_block) + _params(vae.decoder.mid_block)) * (image_size >> 3) ** 2
    return 2 * 3 * n_images * (enc + dec + mid)


def train_flops(model, cfg, batch):
    """Training FLOPs of one micro-batch (see the note above for what is counted)."""
    if isinstance(model, VAETraining):
        return float(vae_flops(model, batch["image_tensors_dec"].shape[0], cfg.image_decoder.image_size))
    B, L = batch["text_ids"].shape
    num = batch["num_image_per_seq"]
    n_images, N = int(num.sum()), int(num.max()) if B else 0
    total = llm_flops(cfg, B, L, N) + vision_flops(model, cfg, n_images)
    if model.image_decoder is not None and n_images:
        # each image's context runs from the last bos before its soi to the soi
        ids = batch["text_ids"]
        soi = ids == cfg.soi_token_id
        pos = torch.arange(L, device=ids.device).expand_as(ids)
        context = int((pos - mmi.nearest_bos(ids, cfg.bos_token_id).clamp(min=0) + 1)[soi].sum())
        total += image_decoder_flops(model, n_images, context)
    # B*L*d*d for context_feat_proj is part of the image path; small next to the rest and left out
    return float(total)


# ----------------------------------------------------------------------------------------------------------------
# Data: endless micro-batches, each carrying the state to resume right after it
# ----------------------------------------------------------------------------------------------------------------


def synthetic_row(cfg, index, seed, length, n_images):
    """Row `index` of a random corpus: bos, then text and images in a fixed layout; the same on every machine."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + index)
    image_len = 1 + cfg.num_img_token
    text_len = length - 1 - n_images * image_len
    if text_len < n_images + 1:
        raise mmi.InputError(f"seq_len {length} cannot hold {n_images} images of {image_len} tokens plus text")
    words = torch.randint(3, cfg.pad_token_id, (text_len,), generator=g).tolist()
    cut = text_len // (n_images + 1)
    ids = [cfg.bos_token_id]
    for k in range(n_images):
        ids += words[k * cut:(k + 1) * cut] + [cfg.soi_token_id] + [cfg.image_token_id] * cfg.num_img_token
    ids += words[n_images * cut:]
    S, S_dec = cfg.vision.image_size, cfg.image_decoder.image_size
    enc = torch.rand(n_images, 3, S, S, generator=g)
    # the same picture for the decoder, at its own resolution (224 -> 512 at paper size)
    dec = enc if S_dec == S else F.interpolate(enc, size=(S_dec, S_dec), mode="bilinear", align_corners=False)
    return ids, enc, dec


def synthetic_batches(cfg, tc, rank, world, state):
    """Micro-batch m of this rank holds global rows (m*world + rank)*B ... +B-1: one process with B rows and two
    processes with B/2 rows, or 2 micro-batches of B/2, see the same rows in the same step."""
    m = state["micro_batch"] if state else 0
    while True:
        first = (m * world + rank) * tc.batch_size
        rows = [synthetic_row(cfg, first + i, tc.seed, tc.seq_len, tc.images_per_row) for i in range(tc.batch_size)]
        m += 1
        yield {"text_ids": torch.tensor([r[0] for r in rows]),
               "attention_mask": torch.ones(tc.batch_size, tc.seq_len, dtype=torch.long),
               "image_tensors": torch.cat([r[1] for r in rows]),
               "image_tensors_dec": torch.cat([r[2] for r in rows]),
               "num_image_per_seq": torch.full((tc.batch_size,), tc.images_per_row),
               "meta": {"dataset_name": "synthetic", "resume": {"micro_batch": m}}}


def mixed_dataset(cfg, tc, split, rank, world):
    import data
    tok = data.Tokenizer(tc.tokenizer_path or data.DEMO_TOKENIZER_PATH)
    ids = (tok.vocab_size, tok.pad_id, tok.soi_id, tok.image_id, tok.bos_id, tok.eos_id)
    want = (cfg.llm.vocab_size, cfg.pad_token_id, cfg.soi_token_id, cfg.image_token_id, cfg.bos_token_id,
            cfg.eos_token_id)
    if ids != want:
        raise mmi.InputError(f"tokenizer {tok.path}: (vocab, pad, soi, image, bos, eos) = {ids}, the model expects "
                             f"{want}")
    if tc.data == "demo":
        return data.demo_dataset(tok, split, tc.seq_len, cfg.num_img_token, tc.batch_size,
                                 num_stories=tc.demo_num_stories or None, seed=tc.seed,
                                 image_size=cfg.vision.image_size, rank=rank, world_size=world)
    sources, probs, packs = [], [], []
    transform = data.DualTransform(cfg.vision.image_size, cfg.image_decoder.image_size)
    for name, kind, shards, annt_root, data_root, prob, rows in tc.pretrain_sources:
        if kind not in ("mmc4", "pair"):
            raise mmi.InputError(f"pretrain_sources: {name} has kind {kind!r}, expected 'mmc4' or 'pair'")
        make = data.mmc4_source if kind == "mmc4" else data.pair_source
        sources.append(make(shards, annt_root, data_root, tok, transform, name=name, seed=tc.seed,
                            num_img_token=cfg.num_img_token))
        probs.append(prob)
        packs.append(data.PackConfig(num_total_token=cfg.seq_len, num_img_token=cfg.num_img_token,
                                     max_num_images=15 if kind == "mmc4" else 30,
                                     truncation_level="image" if kind == "mmc4" else "sample", batch_size=rows))
    return data.MixedDataset(sources, probs, packs, tok, seed=tc.seed, rank=rank, world_size=world)


def dataset_batches(dataset, tc, rank, state):
    """Endless micro-batches of a MixedDataset, epoch after epoch, resumable from {"epoch", "positions", "turn",
    "workers"}. A DataLoader's workers hand out batches in turns (worker w at turns w, w + n, ...; one that has run
    out drops out), so a loader resumed mid-epoch starts with the worker whose turn was next (the dataset's
    `first_worker`): the batches come in the uninterrupted run's order. Each loader seeds its workers from its own
    generator (seed, rank, epoch), never from the global RNG that the training loop's noise comes from."""
    epoch, positions = (state["epoch"], dict(state["positions"])) if state else (0, {})
    turn, workers = (state.get("turn", 0), state.get("workers", tc.num_workers)) if state else (0, tc.num_workers)
    while True:
        dataset.set_epoch(epoch)
        dataset.load_state_dict(positions)
        dataset.first_worker = turn
        seed = torch.Generator().manual_seed(tc.seed * 1_000_003 + epoch * 1009 + rank)
        stream = iter(torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers,
                                                  persistent_workers=False, generator=seed))
        try:
            for batch in stream:
                dataset.record_position(positions, batch)
                turn = (batch["meta"]["position"]["reader"] + 1) % max(workers, 1)   # readers rank * n + w
                batch["meta"]["resume"] = {"epoch": epoch, "positions": dict(positions), "turn": turn,
                                           "workers": workers}
                yield batch
        finally:
            if workers:
                stream._shutdown_workers()           # now, also when the stream is closed mid-epoch
        epoch, positions, turn = epoch + 1, {}, 0


def train_batches(cfg, tc, rank, world, state=None):
    if tc.data == "synthetic":
        return synthetic_batches(cfg, tc, rank, world, state)
    return dataset_batches(mixed_dataset(cfg, tc, "train", rank, world), tc, rank, state)


def val_batches(cfg, tc, rank, world):
    """The same `eval_batches` validation micro-batches at every evaluation; None where there is no split."""
    if tc.data == "synthetic":
        stream = synthetic_batches(cfg, dataclasses.replace(tc, seed=tc.seed + 1), rank, world, None)
    elif tc.data == "demo":
        stream = dataset_batches(mixed_dataset(cfg, dataclasses.replace(tc, num_workers=0), "val", rank, world),
                                 dataclasses.replace(tc, num_workers=0), rank, None)
    else:
        return None
    return [next(stream) for _ in range(tc.eval_batches)]


def to_device(batch, device):
    """The batch's tensors on the device (from pinned memory without waiting), and in meta["host"] host copies of
    the integer inputs that the forward reads on the host (token ids, image counts, context starts): with them, it
    reads nothing back from the GPU, which would wait for all queued work. They go as numpy arrays because FSDP
    moves every tensor among a forward's inputs to the GPU."""
    out = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
    if device.type != "cpu":
        out["meta"] = {**(batch.get("meta") or {}),
                       "host": {k: batch[k].numpy() for k in mmi.HOST_KEYS if torch.is_tensor(batch.get(k))}}
    return out


class Prefetcher:
    """Iterates fn(batch) over `batches` in a background thread, `depth` micro-batches ahead, so that the next batch
    is made (and pinned, for an asynchronous copy to the GPU) while the GPU works on this one. The data streams draw
    from their own seeded generators, never the global RNG, so the thread changes no numbers. The thread ends when
    the Prefetcher is closed or dropped, and closes the stream (a generator's cleanup: its DataLoader workers)."""

    def __init__(self, batches, fn, depth=2):
        self.queue, self.stop = queue.Queue(depth), threading.Event()
        self.thread = threading.Thread(target=Prefetcher._work, args=(batches, fn, self.queue, self.stop), daemon=True,
                                       name="prefetch")
        self.thread.start()

    @staticmethod
    def _work(batches, fn, out, stop):                # no reference to the Prefetcher: dropping it stops the thread
        def put(item):                                # False once stopped
            while not stop.is_set():
                try:
                    out.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    pass
            return False

        try:
            for batch in batches:
                if not put((fn(batch), None)):
                    return
            put((None, StopIteration()))
        except BaseException as e:                    # handed to the training loop, which raises it
            put((None, e))
        finally:
            if hasattr(batches, "close"):             # a generator's cleanup (DataLoader workers) runs here, now
                batches.close()

    def __next__(self):
        item, error = self.queue.get()
        if error is not None:
            raise error
        return item

    def close(self):
        """Stops the thread and waits for it (one still inside a torch call when the interpreter exits aborts it)."""
        self.stop.set()
        self.thread.join()

    def __del__(self):
        self.stop.set()


# ----------------------------------------------------------------------------------------------------------------
# Distributed: FSDP
# ----------------------------------------------------------------------------------------------------------------


def repeated_blocks(model):
    """The blocks the model runs one after another and checkpoints with gradient_checkpointing: CLIP and LLaMA
    layers, UNet and UNet-MMFS blocks (the VAE's for VAE training)."""
    if isinstance(model, VAETraining):
        return list(model.vae.encoder.down_blocks) + list(model.vae.decoder.up_blocks)
    blocks = list(model.visual_tokenizer.encoder["vision_model"].encoder["layers"]) + list(model.mm_decoder.layers)
    if model.image_decoder is not None:
        sd = model.image_decoder.decoder
        blocks += [*sd.unet.down_blocks, sd.unet.mid_block, *sd.unet.up_blocks]
        blocks += [*sd.mmfs_module.mmfs_down_blocks, sd.mmfs_module.mmfs_mid_block]
    return blocks


def fsdp_blocks(model):
    """The modules FSDP shards as units: every block whose forward the model calls (a unit's weights are gathered by
    its forward hook, so containers that are only iterated cannot be units): the repeated blocks, then the rest."""
    blocks = repeated_blocks(model)
    if isinstance(model, VAETraining):
        return blocks
    for inter in model.visual_tokenizer.encoder["vision_model"].adapter_interactions:
        blocks += [inter.injector, inter.extractor, *(inter.extra_extractors or ())]
    blocks += [model.visual_tokenizer.perceiver_resampler, model.mm_decoder.embed_tokens, model.text_decoder]
    if model.image_decoder is not None:
        blocks.append(model.image_decoder.perceiver_resampler)
    return blocks


def _block_forward(block, *args, **kwargs):
    return type(block).forward(block, *args, **kwargs)


def _checkpointed_block_forward(block, *args, **kwargs):
    return torch.utils.checkpoint.checkpoint(type(block).forward, block, *args, use_reentrant=False, **kwargs)


def compile_blocks(model, checkpoint, backend="inductor"):
    """Each repeated block's forward through torch.compile while gradients are on (training), with its activation
    checkpointing inside the compiled function: compile around checkpoint, so that the backward pass's
    recomputation is compiled too (checkpoint around a compiled block recompiles or breaks). The forward is
    replaced, not the module: state_dict keys stay, and FSDP's hooks, which run around forward, stay outside.
    The block is an argument of the compiled function, so blocks of one structure share one compiled graph."""
    blocks = repeated_blocks(model)
    run = torch.compile(_checkpointed_block_forward if checkpoint else _block_forward, backend=backend)
    # every block goes through this one function: each distinct structure (a CLIP layer, a LLaMA layer with and
    # without MMFS, each UNet block's shapes) is one entry of its cache, more than dynamo's default limit of 8
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, len(blocks))

    def forward(block, *args, **kwargs):
        return (run if torch.is_grad_enabled() else _block_forward)(block, *args, **kwargs)

    for block in blocks:
        block.forward = types.MethodType(forward, block)
    if not isinstance(model, VAETraining) and model.image_decoder is not None:
        # the frozen VAE's encoder (float32, no gradients, full decoder resolution): its GroupNorm + SiLU chains
        # fused and its convolutions kept channels-last instead of converted for cuDNN at every call
        model.image_decoder.decoder.vae.encoder.compile(backend=backend)


def shard_model(model, tc, device):
    """FSDP2 (`fully_shard`) per block, then the root, over all processes. bf16: trainable parameters gathered in
    bf16 from float32 shards (the master weights), gradients reduced in float32. Frozen weights are FSDP's ignored
    parameters by default: whole on every rank and never gathered (13B: 27 GB in bf16 on each GPU, where sharded
    ones are all 13.4 billion gathered twice a step, for the forward pass and for the backward pass's
    recomputation); a block with nothing trainable is no unit at all. shard_frozen=True shards them like the rest:
    less memory, more traffic. The frozen VAE is always whole (it runs forward-only in float32, as the original)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    # the mesh on the run's device: FSDP's default mesh is CUDA's whenever a GPU is visible, even for a CPU run
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    # inputs are not cast by FSDP: a block that activation checkpointing recomputes in the backward pass would
    # get them uncast the second time (FSDP skips its pre-forward work then); autocast sets the compute dtype
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if tc.dtype == "bfloat16" else None,
                              reduce_dtype=torch.float32, cast_forward_inputs=False)
    ignored = set(model.image_decoder.decoder.vae.parameters()) if model.image_decoder is not None else set()
    if not tc.shard_frozen:
        ignored |= {p for p in model.parameters() if not p.requires_grad}
    for t in [*ignored, *model.buffers()]:         # FSDP moves only what it manages to the device
        t.data = t.data.to(device)
    for block in fsdp_blocks(model):
        own = set(block.parameters())
        if own - ignored:
            fully_shard(block, mesh=mesh, mp_policy=mp, ignored_params=(own & ignored) or None)
    fully_shard(model, mesh=mesh, mp_policy=mp, ignored_params=ignored or None)
    return model


def all_reduce(t, op=None):
    if dist.is_initialized():
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


def queue_mark(device):
    """A point in the device's queue of work: a timed CUDA event, whose time is when the GPU gets there; on a CPU,
    which works as it queues, the time now."""
    if device.type != "cuda":
        return time.perf_counter()
    mark = torch.cuda.Event(enable_timing=True)
    mark.record()
    return mark


def seconds_between(a, b):
    """Seconds from mark a to mark b, once the device has passed b."""
    return a.elapsed_time(b) / 1e3 if isinstance(a, torch.cuda.Event) else b - a


def send_to_host(t):
    """Queue a copy of a small device tensor into pinned host memory, and a mark after it: (host tensor, mark), for
    `read_back`. The read then waits for the work queued up to now only; a `.tolist()` made later would also wait
    for everything queued in between (in the loop: the whole next step)."""
    if t.device.type != "cuda":
        return t, queue_mark(t.device)
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    return host, queue_mark(t.device)


def read_back(host, mark):
    """The numbers of a `send_to_host` copy, as a list, once the device has passed its mark."""
    if isinstance(mark, torch.cuda.Event):
        mark.synchronize()
    return host.tolist()


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints: out_dir/ckpt_<step>/ = DCP shards of model + optimizer, one small state file per rank, the configs
# ----------------------------------------------------------------------------------------------------------------


def checkpoints(out_dir):
    """Complete checkpoints in out_dir, oldest first (a crashed save leaves only a .tmp directory)."""
    if not os.path.isdir(out_dir):
        return []
    names = [n for n in os.listdir(out_dir) if n.startswith("ckpt_") and n[5:].isdigit()]
    return [os.path.join(out_dir, n) for n in sorted(names, key=lambda n: int(n[5:]))]


def rng_state(device):
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state, device):
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def save_checkpoint(model, optimizer, tc, cfg, step, rank_state, rank, device):
    """Written to ckpt_<step>.tmp by all ranks, then renamed by rank 0: a reader never sees a partial one. The
    learning-rate schedule is a function of the step alone, so the step is all the scheduler state there is."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    final = os.path.join(tc.out_dir, f"ckpt_{step:08d}")
    tmp = final + ".tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    _barrier()
    opts = StateDictOptions(ignore_frozen_params=not tc.save_frozen)
    model_sd, optim_sd = get_state_dict(model, optimizer, options=opts)
    with warnings.catch_warnings():      # DCP warns that it runs in one process when there is no process group
        warnings.filterwarnings("ignore", message=".*assuming the intent is to")
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp)
    torch.save({"step": step, **rank_state, "rng": rng_state(device)}, os.path.join(tmp, f"rank{rank}.pt"))
    if rank == 0:
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump({"train": dataclasses.asdict(tc), "model": cfg.to_dict()}, f, indent=1)
    _barrier()
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in checkpoints(tc.out_dir)[:-tc.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def load_checkpoint(path, model, optimizer, tc, rank, device):
    """Model, optimizer and this rank's state (step, data position, RNG) from a checkpoint directory."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
    rank_file = os.path.join(path, f"rank{rank}.pt")
    if not os.path.exists(rank_file):
        raise mmi.InputError(f"{path}: no {os.path.basename(rank_file)}; was it written by a run with fewer processes?")
    opts = StateDictOptions(ignore_frozen_params=not tc.save_frozen, strict=tc.save_frozen)
    model_sd, optim_sd = get_state_dict(model, optimizer, options=opts)
    stored = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    missing = [k for k in model_sd if f"model.{k}" not in stored]
    if missing:
        raise mmi.InputError(f"{path}: the checkpoint lacks {len(missing)} model weights, e.g. {missing[:3]}")
    # Adam has no state for weights that never got a gradient (unused branches); they start from zero state here,
    # which the update skips just as before (no gradient, no update), so a partial optimizer load is exact
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to")
        dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=path,
                 planner=dcp.DefaultLoadPlanner(allow_partial_load=True))
    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd, options=opts)
    state = torch.load(rank_file, weights_only=True)
    set_rng_state(state.pop("rng"), device)
    return state


def export(model, cfg, path, rank, distributed, tokenizer_path=None, dtype=None):
    """The trained model in mmi's own format (`MMInterleaved.save_pretrained`), for sample.py and eval.py, with
    its tokenizer inside (tokenizer.model / tokenizer.json) so the folder is self-contained; written atomically.
    Under FSDP the full weights are gathered to rank 0 (on the CPU) and written from an unsharded copy."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    extra = None
    if tokenizer_path:
        extra = {"tokenizer.json" if tokenizer_path.endswith(".json") else "tokenizer.model": tokenizer_path}
    if not distributed:
        model.save_pretrained(path, dtype=dtype, extra_files=extra)
    else:
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:
            with torch.device("meta"):
                plain = mmi.MMInterleaved(cfg)
            plain.load_state_dict(full, assign=True)
            plain.save_pretrained(path, dtype=dtype, extra_files=extra)
        _barrier()
    return path


def _barrier():
    if dist.is_initialized():
        dist.barrier()


# ----------------------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model, raw_model, cfg, tc, batches, device, autocast):
    """Validation loss over fixed batches (averaged over ranks); on the demo also eval.py's demo metrics."""
    model.eval()
    sums = {}
    for batch in batches or ():
        with autocast:
            out = model(to_device(batch, device))
        for k, v in out.items():
            if k.startswith("loss"):
                sums[k] = sums.get(k, 0.0) + v.detach().float()
    metrics = {}
    if sums:
        names = sorted(sums)
        means = all_reduce(torch.stack([sums[k] for k in names])) / (len(batches) * (dist.get_world_size()
                                                                                   if dist.is_initialized() else 1))
        metrics = {f"val_{k}": v for k, v in zip(names, means.tolist())}
    if tc.data == "demo" and tc.task == "mmi":
        import eval as evaluator                   # eval.py, beside this file
        # generation reads root weights directly: gather them for the duration (a no-op without FSDP)
        if hasattr(model, "unshard"):
            model.unshard()
        # no autocast weight cache: a decoding step captured as a CUDA graph then makes its own bf16 casts instead
        # of reading copies that autocast cached outside the graph
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=tc.dtype == "bfloat16", cache_enabled=False):
            metrics.update(evaluator.demo_metrics(raw_model, tc.eval_demo_stories))
        if hasattr(model, "reshard"):
            model.reshard()
    model.train()
    return metrics


# ----------------------------------------------------------------------------------------------------------------
# The VAE on its own (task="vae"): the demo has no pretrained SD VAE, so configs/demo_vae.py trains one first
# ----------------------------------------------------------------------------------------------------------------


class VAETraining(nn.Module):
    """The image decoder's VAE as a training model: MSE reconstruction of the decoder's image targets (in
    [-1, 1]) plus `kl_weight` x the KL divergence to N(0, 1), per latent element (SD's autoencoder loss without
    its perceptual and adversarial terms, which flat-coloured shapes do not need)."""

    def __init__(self, cfg, kl_weight):
        super().__init__()
        self.vae = mmi.AutoencoderKL(cfg.vae)
        self.kl_weight = kl_weight
        self.image_decoder = None                # what the loop asks of an MMInterleaved

    def forward(self, batch):
        images = batch.get("image_tensors_dec")
        x = (batch["image_tensors"] if images is None else images) * 2 - 1
        mean, logvar = self.vae.encode(x)                                       # (B_I, 4, S/8, S/8) each
        rec = self.vae.decode(self.vae.sample(mean, logvar))
        loss_rec = F.mse_loss(rec.float(), x.float())
        loss_kl = 0.5 * (mean.float() ** 2 + logvar.float().exp() - 1 - logvar.float()).mean()
        return {"loss": loss_rec + self.kl_weight * loss_kl, "loss_rec": loss_rec.detach(), "loss_kl": loss_kl.detach()}


def export_vae(vae, batches, path, device):
    """vae.safetensors with the scaling factor that gives the validation latents unit variance (SD's recipe for
    its 0.18215) in the metadata; written atomically. Returns (scale, the fraction of validation images whose
    reconstruction data.read_scene reads as the same scene as the original: the VAE's ceiling for the demo)."""
    from safetensors.torch import save_file
    import data
    latents, same, total = [], 0, 0
    with torch.no_grad():
        for b in batches:
            x = to_device(b, device)["image_tensors_dec"].float()
            z = vae.sample(*vae.encode(x * 2 - 1))
            latents.append(z)
            rec = (vae.decode(z).float().clamp(-1, 1) + 1) / 2
            for a, r in zip(x.cpu().numpy(), rec.cpu().numpy()):
                same += data.read_scene(a) == data.read_scene(r)
                total += 1
    scale = 1.0 / torch.cat(latents).float().std().item()
    tmp = path + ".tmp"
    save_file({k: v.detach().cpu().contiguous() for k, v in vae.state_dict().items()}, tmp,
              metadata={"scaling_factor": repr(scale)})
    os.replace(tmp, path)
    return scale, same / max(total, 1)


def read_vae_scaling_factor(path):
    from safetensors import SafetensorError, safe_open
    if not os.path.isfile(path):
        raise mmi.InputError(f"vae_from {path}: no such file; train the VAE first (python train.py "
                             f"configs/demo_vae.py) or pass --vae_from=<its vae.safetensors>")
    try:
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
    except SafetensorError as e:
        raise mmi.InputError(f"vae_from {path}: not a readable safetensors file ({e})") from None
    if "scaling_factor" not in meta:
        raise mmi.InputError(f"{path}: no scaling_factor in its metadata; expected a file written by a task='vae' run")
    return float(meta["scaling_factor"])


def load_vae(model, path):
    """Put a trained VAE into the model's (frozen) image decoder; every key and shape must match."""
    from safetensors.torch import load_file
    vae = model.image_decoder.decoder.vae
    state = load_file(path)
    ours = vae.state_dict()
    if set(state) != set(ours) or any(state[k].shape != ours[k].shape for k in ours):
        bad = sorted(set(state) ^ set(ours)) or [k for k in ours if state[k].shape != ours[k].shape]
        raise mmi.InputError(f"{path}: does not fit the model's VAE (config vae = {model.cfg.vae}); first "
                             f"mismatches {bad[:3]}")
    vae.load_state_dict(state)


# ----------------------------------------------------------------------------------------------------------------
# The training loop
# ----------------------------------------------------------------------------------------------------------------


def main(argv=None):
    """The command line: no arguments print the usage (exit 2), --help the config keys (exit 0); else train."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:
        print(USAGE + "\ntrain.py: error: no config file given", file=sys.stderr)
        return 2
    if "-h" in argv or "--help" in argv:
        print(config_help())
        return 0
    tc = load_config(argv)
    try:
        run(tc)
    except KeyboardInterrupt:
        found = checkpoints(tc.out_dir)
        print("train.py: interrupted; " + (f"--resume=true goes on from {found[-1]}" if found else
                                           "no checkpoint written yet"), file=sys.stderr)
        return 130
    return 0


def check_inputs(tc):
    """The files and folders the run reads exist: a missing one is one line naming it, before any work starts."""
    if tc.init_from and not os.path.isdir(tc.init_from):
        raise mmi.InputError(f"init_from {tc.init_from}: no such folder; expected a model folder written by "
                             f"save_pretrained (a training run's out_dir/model)")
    if tc.tokenizer_path and tc.data in ("demo", "pretrain") and not os.path.isfile(tc.tokenizer_path):
        raise mmi.InputError(f"tokenizer_path {tc.tokenizer_path}: no such file")
    if tc.data == "pretrain" and not tc.pretrain_sources:
        raise mmi.InputError("data='pretrain' needs pretrain_sources (see configs/pretrain_13b.py)")
    for source in tc.pretrain_sources if tc.data == "pretrain" else ():
        if len(source) != 7 or source[1] not in ("mmc4", "pair"):
            raise mmi.InputError(f"pretrain_sources: {source!r}, expected (name, 'mmc4' | 'pair', shard pattern, "
                                 f"annt_root, data_root, probability, rows per batch)")
        for what, folder in (("annt_root", source[3]), ("data_root", source[4])):
            if not os.path.isdir(folder):
                raise mmi.InputError(f"pretrain_sources: {source[0]}'s {what} {folder}: no such folder")


def worker_limit():
    """DataLoader workers this process may start: its CPU cores (shared by the processes torchrun starts on this
    machine) less one, which the training loop keeps."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1")) - 1, 0)


def run(tc):
    """Train with config `tc`; returns {"losses": {step: loss}, "model": the (possibly sharded) model, "config":
    TrainConfig, "last_checkpoint": its step}. However it ends (done, an error, Ctrl-C), the data thread and the
    DataLoader workers it started are stopped and its files closed."""
    with contextlib.ExitStack() as cleanup:
        return _run(tc, cleanup)


def _run(tc, cleanup):
    check_inputs(tc)
    cfg = model_config(tc)

    # processes: torchrun sets RANK/WORLD_SIZE; otherwise one process
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    device = mmi.resolve_device(tc.device)
    if distributed:
        if not tc.fsdp:
            raise mmi.InputError("several processes need fsdp=True (there is no DDP path)")
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = 0, 1
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    master = rank == 0
    if tc.dtype == "bfloat16" and device.type == "cpu" and master:
        print("note: bfloat16 autocast on CPU is slow; use --dtype=float32 for CPU runs")
    if tc.tf32 and device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=tc.dtype == "bfloat16")

    # model: the same weights on every rank (same seed), then sharded; frozen parameters keep requires_grad=False
    torch.manual_seed(tc.seed)
    if tc.init_device == "cuda" and device.type != "cuda":
        raise mmi.InputError(f"init_device 'cuda' needs device 'cuda', got {device.type!r}")
    init_device = device if tc.init_device == "cuda" else torch.device("cpu")
    if tc.task == "vae":
        with init_device:
            model = VAETraining(cfg, tc.kl_weight)
    elif tc.init_from:
        model = mmi.MMInterleaved.from_pretrained(tc.init_from)
        saved = dataclasses.replace(model.cfg, gradient_checkpointing=cfg.gradient_checkpointing)
        if saved != cfg:
            raise mmi.InputError(f"init_from {tc.init_from}: its model config differs from preset {tc.preset!r} "
                                 f"with model_overrides {tc.model_overrides}")
        model.cfg = cfg
    else:
        with init_device:
            model = mmi.MMInterleaved(cfg)
    if tc.vae_from:
        load_vae(model, tc.vae_from)
    if tc.frozen_dtype == "bfloat16":
        # frozen weights get no update, so a float32 master copy buys nothing: halve their memory (13B: 54 -> 27
        # GB). The VAE stays float32: the image decoder runs it in float32 whatever the model's dtype.
        keep = set(model.image_decoder.decoder.vae.parameters()) if model.image_decoder is not None else set()
        for p in model.parameters():
            if not p.requires_grad and p not in keep:
                p.data = p.data.to(torch.bfloat16)
        if init_device.type == "cuda":
            torch.cuda.empty_cache()                 # the float32 copies' blocks, freed one weight at a time
    mmi.speed_up(model)                         # training's fast forms: MMFS with its images' queries folded
    if tc.compile:
        compile_blocks(model, tc.activation_checkpointing)
    raw_model = model
    if distributed:
        model = shard_model(model, tc, device)     # moves the shards to the device
    else:
        model.to(device)
    model.train()
    torch.manual_seed(tc.seed + rank)           # from here on each rank draws its own noise (CFG dropout, timesteps)
    random.seed(tc.seed + rank)

    groups = param_groups(model, tc.param_groups)
    base_lrs = [g["lr"] for g in groups]
    trainable = [p for g in groups for p in g["params"]]
    # fused: one kernel updates a group, and it can skip itself on the device (found_inf, see the NaN guard). The
    # multi-tensor (foreach) AdamW runs ~10 ops over each group, and on FSDP's sharded parameters (DTensors) every op
    # unwraps every tensor in Python (two CPU processes, tiny preset, 733 tensors: 0.48 s of a 1.47 s step; fused,
    # 0.06 s)
    optimizer = torch.optim.AdamW([{k: v for k, v in g.items() if k != "names"} for g in groups],
                                  betas=tc.betas, eps=tc.eps, fused=True)

    # resume: newest complete checkpoint in out_dir
    step, data_state, nan_streak = 0, None, 0
    found = checkpoints(tc.out_dir) if tc.resume else []
    if found:
        state = load_checkpoint(found[-1], model, optimizer, tc, rank, device)
        step, data_state, nan_streak = state["step"], state["data"], state["nan_streak"]
        if master:
            print(f"resumed from {found[-1]} at step {step}")
    elif tc.resume and master:
        print(f"resume: no checkpoint in {tc.out_dir}, starting from step 0")
    if tc.data != "synthetic":
        # a resumed stream keeps the checkpoint's DataLoader workers: its data position is one per worker
        saved = data_state.get("workers") if data_state else None
        workers = min(tc.num_workers, worker_limit()) if saved is None else saved
        if workers != tc.num_workers and master:
            print(f"note: num_workers={tc.num_workers} -> {workers}: " + (
                f"this process may use {worker_limit() + 1} CPU cores, one kept for training" if saved is None else
                "the checkpoint's, whose data position is one per worker"))
        tc = dataclasses.replace(tc, num_workers=workers)
    pin = (lambda b: {k: v.pin_memory() if torch.is_tensor(v) else v for k, v in b.items()}) \
        if device.type == "cuda" else (lambda b: b)
    # closed however the run ends: the thread stops and closes the stream, whose DataLoader workers then exit
    batches = cleanup.enter_context(contextlib.closing(Prefetcher(train_batches(cfg, tc, rank, world, data_state),
                                                                  pin)))
    val = val_batches(cfg, tc, rank, world) if tc.eval_interval else None

    if master:
        os.makedirs(tc.out_dir, exist_ok=True)
        n_total = sum(p.numel() for p in model.parameters())
        n_train = sum(p.numel() for p in trainable)
        print(f"model {tc.preset}: {n_total:,} parameters, {n_train:,} trainable in {len(groups)} groups; "
              f"{world} process(es) on {device.type}, {tc.dtype}, fsdp={distributed}, "
              f"{tc.batch_size * tc.grad_accum * world} rows per step")
        outputs = ["metrics.jsonl"] + (["checkpoints ckpt_<step>/"] if tc.ckpt_interval >= 0 else [])
        if tc.export:
            outputs.append("at the end " + ("vae.safetensors" if tc.task == "vae" else "the model in model/"))
        print(f"writing to {tc.out_dir}/: {', '.join(outputs)}")
    metrics_file = cleanup.enter_context(open(os.path.join(tc.out_dir, "metrics.jsonl"), "a")) if master else None
    bar = tqdm(total=tc.max_steps, initial=step, disable=not (master and tc.progress), dynamic_ncols=True)
    cleanup.callback(bar.close)
    cleanup.callback(gc.unfreeze)                # back in the collector's sight: a caller may drop what it froze
    losses, last_ckpt, last_ckpt_path, first_step = {}, step, None, step
    pending = None                      # (step, lr, names, send_to_host copy): a step not read back yet
    t_done = queue_mark(device)         # where the last step's work ended in the device's queue

    def finish(pending):
        """Read a queued step's numbers back (this waits for its work only), log it, count it for the NaN guard.
        Its time runs from the previous step's end mark to its own, as the device saw them."""
        nonlocal nan_streak, t_done
        step, lr, names, (host, mark) = pending
        bad, grad_norm, *sums = read_back(host, mark)
        dt, t_done = seconds_between(t_done, mark), mark
        # when it was done, on the host's clock: on a CPU, its mark; on a GPU, by the time the read returned
        done = time.perf_counter() if isinstance(mark, torch.cuda.Event) else mark
        nan_streak = nan_streak + 1 if bad else 0
        rec = {"step": step, **{k: v / (tc.grad_accum * world) for k, v in zip(names, sums)},
               "lr": lr, "grad_norm": grad_norm, "samples_per_s": sums[-3] / dt,
               "tokens_per_s": sums[-2] / dt, "mfu": sums[-1] / dt / (tc.peak_flops * world), "time_s": dt,
               "wall_time": time.time() - (time.perf_counter() - done)}
        losses[step] = rec["loss"]
        if bad:
            rec["skipped"] = f"non-finite loss or gradient ({nan_streak} in a row)"
        if master:
            if step == tc.max_steps:
                bar.n = step                     # close() draws the final state: drawn here too, logs show it twice
            else:
                bar.update(1)
            bar.set_postfix(**{k: f"{rec[k]:.3f}" for k in names if k != "loss"}, lr=f"{rec['lr']:.2e}",
                            samples_s=f"{rec['samples_per_s']:.1f}", tok_s=f"{rec['tokens_per_s']:.0f}",
                            mfu=f"{100 * rec['mfu']:.1f}%", refresh=False)
            if bad or step % tc.log_interval == 0 or step == tc.max_steps:
                metrics_file.write(json.dumps(rec) + "\n")
                metrics_file.flush()
            if bad:
                tqdm.write(f"step {step}: {rec['skipped']}; update skipped")
        if nan_streak >= tc.nan_patience:
            raise RuntimeError(f"step {step}: {nan_streak} non-finite steps in a row (nan_patience={tc.nan_patience}); "
                               f"stopping. Resume from the last checkpoint in {tc.out_dir} with a lower lr.")
        return rec

    while step < tc.max_steps:
        lr_mult = lr_multiplier(step, tc.warmup_steps, tc.max_steps)
        for g, base in zip(optimizer.param_groups, base_lrs):
            g["lr"] = base * lr_mult

        # forward/backward over grad_accum micro-batches; FSDP reduces gradients only after the last one
        loss_sums = {}                                   # every loss* the model returns (no host sync here)
        work = [0.0, 0.0, 0.0]                           # rows, tokens, FLOPs
        for micro in range(tc.grad_accum):
            host_batch = next(batches)
            data_state = host_batch["meta"]["resume"]
            batch = to_device(host_batch, device)
            if distributed:
                model.set_requires_gradient_sync(micro == tc.grad_accum - 1)
            with autocast:
                out = model(batch)
            (out["loss"] / tc.grad_accum).backward()
            # counted from the host copy while the GPU works through what was just queued
            work = [a + b for a, b in zip(work, (host_batch["text_ids"].shape[0],
                                                 float(host_batch["attention_mask"].sum()),
                                                 train_flops(raw_model, cfg, host_batch)))]
            for k, v in out.items():
                if k.startswith("loss"):
                    loss_sums[k] = loss_sums.get(k, 0.0) + v.detach().float()

        # NaN/inf guard: a non-finite loss or gradient on any rank skips the update everywhere, decided on the device.
        # The fused AdamW reads `found_inf` (the attribute torch's GradScaler sets) and where it is 1 leaves weights,
        # moments and step counts as they were; so the update is queued before the host hears of the flag.
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, tc.grad_clip if tc.grad_clip > 0 else float("inf"))
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        bad = all_reduce((~torch.isfinite(loss_sums["loss"]) | ~torch.isfinite(grad_norm)).float(), dist.ReduceOp.MAX)
        optimizer.found_inf = bad                                                         # 0-d, 0. or 1.
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        # what the step logs, in one tensor: the flag, the norm, losses averaged over micro-batches and ranks; rows,
        # tokens and FLOPs summed over ranks. Its copy to the host is queued now and read one step late, after the
        # next step's work is queued: the read waits for this step's GPU work while the GPU already has the next
        # step's (the host keeps a step ahead, and its own work, FSDP's hooks and the update's on sharded tensors,
        # overlaps the GPU's)
        names = sorted(loss_sums)
        sums = torch.cat([torch.stack([loss_sums[k].double() for k in names]),
                          mmi._to_device(torch.tensor(work, dtype=torch.float64), device)])
        numbers = torch.cat([bad.double().reshape(1), grad_norm.double().reshape(1), all_reduce(sums)])
        step += 1
        copy = send_to_host(numbers)
        if pending is not None:
            finish(pending)
        pending = (step, max(base_lrs) * lr_mult, names, copy)

        evaluate_now = tc.eval_interval and (step % tc.eval_interval == 0 or step == tc.max_steps)
        save_now = tc.ckpt_interval >= 0 and ((tc.ckpt_interval and step % tc.ckpt_interval == 0)
                                              or step == tc.max_steps)
        first = step == first_step + 1           # (with --compile, the step that compiles)
        if first or evaluate_now or save_now or step == tc.max_steps:
            rec = finish(pending)                # read at once: a checkpoint keeps the NaN streak up to its step
            pending = None
            if first and device.type == "cpu" and master and rec["time_s"] * (tc.max_steps - step) > 3600:
                tqdm.write(f"note: step {step} took {rec['time_s']:.1f} s on the CPU; the {tc.max_steps - step:,} "
                           f"steps left take about {rec['time_s'] * (tc.max_steps - step) / 3600:.1f} hours at "
                           f"this pace")
        if evaluate_now:
            ev = evaluate(model, raw_model, cfg, tc, val, device, autocast)
            if master and ev:
                metrics_file.write(json.dumps({"step": step, **ev}) + "\n")
                metrics_file.flush()
                tqdm.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in ev.items()))
        if save_now:
            last_ckpt_path = save_checkpoint(model, optimizer, tc, cfg, step,
                                             {"data": data_state, "nan_streak": nan_streak}, rank, device)
            last_ckpt = step
        if first:
            # what exists now (model, optimizer, data pipeline and, with --compile, the compiled code: millions of
            # objects) lives for the whole run: out of the garbage collector's sight, a full collection, which stops
            # the process, walks only what later steps make (13B, two GPUs, eager: 0.3 s every few steps without this)
            gc.collect()
            gc.freeze()
        if first or evaluate_now or save_now:
            t_done = queue_mark(device)          # step times count training only, not evaluation, saving, collecting
    bar.close()
    batches.close()                              # the DataLoader workers exit before the export
    if master:
        print(f"metrics in {tc.out_dir}/metrics.jsonl" + (f", the last checkpoint in {last_ckpt_path}"
                                                            if last_ckpt_path else ""))
    if tc.export and tc.task == "vae":
        val = val or val_batches(cfg, dataclasses.replace(tc, eval_batches=max(tc.eval_batches, 1)), rank, world)
        if master:
            scale, exact = export_vae(raw_model.vae, val, os.path.join(tc.out_dir, "vae.safetensors"), device)
            print(f"wrote {tc.out_dir}/vae.safetensors (latent scaling factor {scale:.5f}; {100 * exact:.1f}% of "
                  f"validation reconstructions read back as their scene); train the demo model with "
                  f"--vae_from={tc.out_dir}/vae.safetensors")
    elif tc.export:
        import data
        tokenizer = (tc.tokenizer_path or data.DEMO_TOKENIZER_PATH) if tc.data in ("demo", "pretrain") else None
        path = export(model, cfg, os.path.join(tc.out_dir, "model"), rank, distributed, tokenizer,
                      getattr(torch, tc.export_dtype) if tc.export_dtype else None)
        if master:
            print(f"wrote {path} (the trained model: python sample.py --init_from={path})")
    if distributed:
        dist.destroy_process_group()
    return {"losses": losses, "model": model, "config": tc, "last_checkpoint": last_ckpt}


if __name__ == "__main__":
    sys.exit(mmi.run_script(main))
