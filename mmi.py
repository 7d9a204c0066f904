"""mmi: MM-Interleaved (arXiv 2401.10208) in one readable file.

An end-to-end generative model for interleaved image-text data:

    images --CLIP ViT-L/14 + ViT-Adapter--> 4 multi-scale maps + tokens --Q-Former--> 64 embeddings per image
    text + image embeddings --LLaMA (Vicuna) with MMFS cross-attention every 4th layer--> hidden states
    hidden states --text head--> next token        hidden states --Q-Former--> SD-2 UNet (+ MMFS) --> next image

MMFS (multi-image multi-scale feature synchronizer) is a deformable cross-attention that lets every token look at
a few learned sampling points in the multi-scale feature maps of all images before it.

Sections, in the order data flows:
  config -> building blocks -> deformable attention -> vision -> LLM with MMFS -> image decoder ->
  the MMInterleaved model -> loading -> generation; then fine-tuning's LoRA, the speed forms beside the model,
  weight-only quantization, and `python mmi.py`'s parameter table
Module attribute names follow the released checkpoints so that `state_dict()` keys match them.
"""

import argparse
import ast
import ctypes
import dataclasses
import fnmatch
import functools
import gc
import hashlib
import inspect
import json
import math
import mmap
import os
import pickle
import re
import shutil
import signal
import sys
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from tqdm import tqdm

# ----------------------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------------------


class InputError(ValueError):
    """A mistake in what the user gave (a file, a flag, a config key, a record): every script prints its message as
    one line and exits with code 2. The message names the file, key or index at fault and what was expected.
    Anything else that goes wrong is a bug and keeps its traceback."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse for the scripts: a mistyped flag or value is an InputError (one line, exit 2), not the usage text."""

    def error(self, message):
        raise InputError(message)


def run_script(main, argv=None):
    """`sys.exit(mmi.run_script(main))` at the bottom of each script: an InputError, or settings that ask for more
    memory than the machine has, become one line and exit 2; Ctrl-C and SIGTERM become "interrupted" and exit 130
    (outside torchrun SIGTERM raises KeyboardInterrupt, so a script's cleanup for Ctrl-C runs for both)."""
    name = os.path.basename(sys.argv[0])
    # under torchrun SIGTERM keeps its default action: the launcher stops ranks with it, even ranks in a collective
    catch_sigterm = threading.current_thread() is threading.main_thread() and "LOCAL_RANK" not in os.environ
    if catch_sigterm:
        on_sigterm = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    try:
        return main(argv)
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return 130
    except InputError as e:
        message = str(e)
        if "\nOriginal Traceback" in message:   # raised in a DataLoader worker: the main process gets the traceback
            message = message.rstrip().splitlines()[-1].partition(": ")[2]     # "mmi.InputError: <the message>"
        print(f"{name}: error: {message}", file=sys.stderr)
        return 2
    except (torch.OutOfMemoryError, MemoryError, RuntimeError) as e:
        text = " ".join(str(e).split())
        cpu = re.search(r"can't allocate memory: you tried to allocate (\d+) bytes", text)
        if not (cpu or isinstance(e, (torch.OutOfMemoryError, MemoryError))):
            raise
        what = (f"tried to allocate {int(cpu[1]) / 2**30:.1f} GiB on the CPU" if cpu else
                text.split(" Including")[0] or "a Python allocation failed")
        print(f"{name}: error: out of memory ({what}); expected settings that fit this machine: fewer or smaller "
              "rows, images, beams or tokens, or a smaller model", file=sys.stderr)
        return 2
    finally:
        if catch_sigterm:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if on_sigterm is None else on_sigterm)


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt


def first_difference(a, b, prefix=""):
    """(dotted key, a's value, b's value) of the first key whose value differs between nested dicts, or None."""
    for key in [*a, *(k for k in b if k not in a)]:
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            found = first_difference(x, y, f"{prefix}{key}.")
            if found:
                return found
        elif x != y:
            return prefix + key, x, y
    return None


def resolve_device(name):
    """`--device` as given (auto, cpu, cuda, cuda:N) -> torch.device; InputError where this machine has none such."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise InputError(f"--device={name}: expected auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device={name}: no CUDA device here (torch {torch.__version__}); use --device=cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise InputError(f"--device={name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


@dataclass
class VisionConfig:
    """CLIP ViT-L/14 vision tower plus the ViT-Adapter that turns it into a multi-scale feature pyramid."""
    image_size: int = 224
    patch_size: int = 14
    hidden_size: int = 1024
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    intermediate_size: int = 4096
    layer_norm_eps: float = 1e-5
    trainable: bool = False                      # the paper freezes CLIP
    # ViT-Adapter (all trainable in the paper)
    adapter_trainable: bool = True
    conv_inplane: int = 64                       # width of the spatial prior module's stem
    interaction_indexes: tuple = ((0, 5), (6, 11), (12, 17), (18, 23))   # CLIP layers run inside each block
    adapter_num_heads: int = 16
    adapter_n_points: int = 4
    deform_ratio: float = 0.5                    # deformable-attention value width = ratio * hidden_size
    cffn_ratio: float = 0.25                     # ConvFFN hidden width = ratio * hidden_size
    num_extra_extractors: int = 2                # extra extractors after the last interaction block
    adapter_norm_eps: float = 1e-5
    spm_norm_eps: float = 1e-6

    @property
    def grid_size(self):                         # patches per side (16 for 224/14)
        return self.image_size // self.patch_size


@dataclass
class ResamplerConfig:
    """BLIP-2 Q-Former over learned queries (the paper's "perceiver resampler")."""
    num_queries: int = 64
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    encoder_hidden_size: int = 1024
    cross_attention_frequency: int = 2           # cross-attention in layers 0, f, 2f, ...
    qk_normalization: bool = True
    dropout: float = 0.1                         # hidden and attention-probability dropout
    layer_norm_eps: float = 1e-12
    trainable: bool = True


@dataclass
class LLMConfig:
    """LLaMA body (Vicuna-13B v1.3 in the paper), its vocabulary resized to hold soi and image tokens."""
    vocab_size: int = 32002
    hidden_size: int = 5120
    intermediate_size: int = 13824
    num_hidden_layers: int = 40
    num_attention_heads: int = 40
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    trainable: bool = False                      # the paper freezes the body, embeddings and text head


@dataclass
class MMFSConfig:
    """MMFS cross-attention inside the LLM (`llama_cross_attn`)."""
    cross_attention_frequency: int = 4           # a block in layers 0, 4, 8, ...
    n_heads: int = 16
    n_points: int = 8
    spatial_shapes: tuple = (32, 16, 8)          # which tokenizer maps the LLM reads (side lengths)
    base_spatial_shape: int = 16                 # offsets are in units of this grid on every level
    max_num_image_per_seq: int = 50
    offset_init_magnitude: float = 3.0
    trainable: bool = True


@dataclass
class UNetConfig:
    """SD-2 UNet2DConditionModel (diffusers layout)."""
    sample_size: int = 64  # latent side length = image_size / 8
    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple = (320, 640, 1280, 1280)
    # per resolution level: CrossAttnDownBlock2D (True) or DownBlock2D (False); the up path mirrors it
    cross_attn_blocks: tuple = (True, True, True, False)
    # heads per level; SD's unet/config.json calls this "attention_head_dim" (diffusers' legacy meaning)
    num_attention_heads: tuple = (5, 10, 20, 20)
    layers_per_block: int = 2
    cross_attention_dim: int = 1024
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    trainable: bool = True                       # the paper trains the whole UNet


@dataclass
class VAEConfig:
    """SD-2 AutoencoderKL; always frozen and run in float32."""
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215


@dataclass
class ImageDecoderConfig:
    """The image decoder around the UNet: context resampler, UNet-MMFS, diffusion schedule."""
    image_size: int = 512
    # image-side Q-Former resampler: 77 queries of the UNet's cross-attention width, one layer that
    # cross-attends to the LLM context (encoder_hidden_size = LLM width), no qk-norm, no dropout
    resampler: ResamplerConfig = field(default_factory=lambda: ResamplerConfig(
        num_queries=77, hidden_size=1024, num_hidden_layers=1, num_attention_heads=16, intermediate_size=3072,
        encoder_hidden_size=5120, cross_attention_frequency=1, qk_normalization=False, dropout=0.0))
    uncond_prob: float = 0.1
    # UNet-MMFS; the original hard-codes attn 1024 / 16 heads / 8 points / 10 images
    mmfs_feat_dim: int = 1024  # width of the visual tokenizer's multi-scale maps
    mmfs_attn_dim: int = 1024
    mmfs_heads: int = 16
    mmfs_points: int = 8
    mmfs_max_num_image_per_seq: int = 10
    mmfs_offset_init_magnitude: float = 1.0
    mmfs_value_sizes: tuple = (64, 32, 16, 8)  # side lengths of the four tokenizer maps of one image
    # diffusion (SD-2 scheduler config)
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    steps_offset: int = 1
    # what the UNet predicts: "epsilon", the noise (SD-2-base, the original), or "v_prediction", v = sqrt(abar) eps -
    # sqrt(1 - abar) x0 (SD-2 at 768 px); the samplers turn either into eps
    prediction_type: str = "epsilon"
    # > 0: min-SNR-gamma loss weights, min(SNR_t, gamma) / SNR_t for eps (/ (SNR_t + 1) for v), which take weight off
    # the nearly clean timesteps; 0: every timestep weighs the same, as the original trains
    snr_gamma: float = 0.0
    vae_encode_mini_bs: int = 32
    generate_mini_bs: int = 8


@dataclass
class MMIConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    resampler: ResamplerConfig = field(default_factory=ResamplerConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    mmfs: MMFSConfig = field(default_factory=MMFSConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    image_decoder: ImageDecoderConfig = field(default_factory=ImageDecoderConfig)
    seq_len: int = 2048
    num_img_token: int = 64                      # <|image|> tokens per image (= resampler queries)
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 31999
    soi_token_id: int = 32000                    # <|beginofimage|>
    image_token_id: int = 32001                  # <|image|>
    loss_txt_weight: float = 1.0
    loss_img_weight: float = 10.0
    dataset_to_ignore_noimage_cond_loss: tuple = ()
    gradient_checkpointing: bool = False

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "MMIConfig":
        if name not in PRESETS:
            raise InputError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
        cfg = PRESETS[name]()
        return apply_overrides(cfg, overrides) if overrides else cfg

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, where: str = "config") -> "MMIConfig":
        """The config of `to_dict` (a model folder's config.json): every section and key must be there, with the
        type of the field (the rules of `--key=value` overrides); `where` names the source in errors."""
        return _dataclass_from_dict(cls, d, where, "")


def _dataclass_from_dict(cls, d, where, prefix):
    if not isinstance(d, dict):
        raise InputError(f"{where}: {prefix.rstrip('.') or 'the config'} is a {type(d).__name__}, expected an object "
                         f"of the {cls.__name__} keys")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for k in d:
        if k not in fields:
            raise InputError(f"{where}: unknown config key {prefix + k!r}; {cls.__name__} has {sorted(fields)}")
    missing = [prefix + k for k in fields if k not in d]
    if missing:
        raise InputError(f"{where}: missing key{'s' * (len(missing) > 1)} {', '.join(map(repr, missing))} (a folder "
                         f"written by save_pretrained has every key)")
    kwargs = {}
    for k, f in fields.items():
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            kwargs[k] = _dataclass_from_dict(type(default), d[k], where, f"{prefix}{k}.")
        else:
            kwargs[k] = _check_like(default, d[k], f"{where}: key {prefix + k!r}")
    return cls(**kwargs)


def _to_tuple(v):
    return tuple(_to_tuple(x) for x in v) if isinstance(v, (list, tuple)) else v


def apply_overrides(cfg, overrides):
    """Return a copy of `cfg` with dotted keys replaced, e.g. {"llm.hidden_size": 64} or ["llm.hidden_size=64"].

    Values given as strings are parsed to the type of the field they replace; unknown keys are an error.
    """
    if isinstance(overrides, (list, tuple)):
        pairs = {}
        for item in overrides:
            item = item[2:] if item.startswith("--") else item
            if "=" not in item:
                raise InputError(f"override {item!r}: expected key=value")
            k, v = item.split("=", 1)
            pairs[k] = v
        overrides = pairs
    for key, value in overrides.items():
        cfg = _replace_path(cfg, key.split("."), value, key)
    return cfg


def _replace_path(obj, path, value, full_key):
    names = {f.name for f in dataclasses.fields(obj)}
    if path[0] not in names:
        raise InputError(f"unknown config key {full_key!r}: {type(obj).__name__} has no field {path[0]!r}")
    old = getattr(obj, path[0])
    if len(path) > 1:
        if not dataclasses.is_dataclass(old):
            raise InputError(f"config key {full_key!r}: {path[0]!r} is not a section")
        return dataclasses.replace(obj, **{path[0]: _replace_path(old, path[1:], value, full_key)})
    return dataclasses.replace(obj, **{path[0]: parse_value(value, old, full_key)})


def parse_value(value, like, key):
    """The one reader of `key=value` settings (MMIConfig overrides, train.py's config files and command line):
    `value`, a string from a command line or a Python value from a config file, as the type of `like` (the
    setting's current value). A string is parsed: numbers, true/false/1/0, Python literals for tuples; lists
    become tuples, an int may stand for a float. A value that does not fit is an InputError of one line naming
    the key and the type expected."""
    if isinstance(value, str) and not isinstance(like, str):
        value = _from_string(like, value, key)
    return _check_like(like, value, f"config key {key!r}")


def _check_like(old, value, where):
    """`value` if it has the type of `old`: an int may stand for a float (widened), a list for a tuple (at any
    depth); a field whose value is None takes any value. InputError naming `where` otherwise."""
    if isinstance(value, (list, tuple)):
        value = _to_tuple(value)
    same = old is None or isinstance(value, type(old)) and isinstance(value, bool) == isinstance(old, bool)
    widening = isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool)
    if not (same or widening):
        raise InputError(f"{where}: expected {type(old).__name__}, got {value!r}")
    return float(value) if widening else value


def _from_string(old, text, key):
    try:
        if isinstance(old, bool):
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return text.lower() in ("true", "1")
        if isinstance(old, (int, float)):
            return type(old)(text)
        return _to_tuple(ast.literal_eval(text))              # tuples, and fields whose default is None
    except (ValueError, SyntaxError):
        raise InputError(f"config key {key!r}: cannot read {text!r} as {type(old).__name__}") from None


def _config_rows(cfg, prefix=""):
    """(dotted key, value) of every config value, sections walked in order."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            yield from _config_rows(value, f"{prefix}{f.name}.")
        else:
            yield prefix + f.name, value


# int config values that may be 0; every other int (in a tuple too) is a size, a count or an id above 0
_MAY_BE_ZERO = {"vision.interaction_indexes", "vision.num_extra_extractors", "unet.freq_shift",
                "image_decoder.steps_offset", "bos_token_id", "eos_token_id", "pad_token_id"}


PREDICTION_TYPES = ("epsilon", "v_prediction")


def check_config_ranges(cfg):
    """InputError naming the first config key whose int is negative, or 0 where that makes no model, or whose float
    is NaN or infinite (an eps, a ratio of widths, a loss weight: none makes a model)."""
    def numbers(v, kind):
        return [x for item in v for x in numbers(item, kind)] if isinstance(v, tuple) else \
            [v] if type(v) is kind else []
    for key, value in _config_rows(cfg):
        low = 0 if key in _MAY_BE_ZERO else 1
        if any(x < low for x in numbers(value, int)):
            raise InputError(f"config key {key!r}: {value!r}, every integer must be >= {low}")
        if not all(math.isfinite(x) for x in numbers(value, float)):
            raise InputError(f"config key {key!r}: {value!r}, expected a finite number")
    dec = cfg.image_decoder
    if dec.prediction_type not in PREDICTION_TYPES:
        raise InputError(f"config key 'image_decoder.prediction_type': {dec.prediction_type!r}, expected one of "
                         f"{', '.join(map(repr, PREDICTION_TYPES))}")
    if dec.snr_gamma < 0:
        raise InputError(f"config key 'image_decoder.snr_gamma': {dec.snr_gamma!r}, expected >= 0 (0 = off)")
    for key in ("beta_start", "beta_end"):          # every beta of the schedule lies between these two
        if not 0 < getattr(dec, key) < 1:
            raise InputError(f"config key 'image_decoder.{key}': {getattr(dec, key)!r}, expected 0 < beta < 1")


def check_config_widths(cfg):
    """InputError naming the first config width that does not split into its attention heads or norm groups, or
    channels that do not meet (the VAE's latents are the UNet's input and output)."""
    v, r, dr, u, vae = cfg.vision, cfg.resampler, cfg.image_decoder.resampler, cfg.unet, cfg.vae
    if int(v.hidden_size * v.cffn_ratio) < 1:
        raise InputError(f"vision.hidden_size {v.hidden_size} x vision.cffn_ratio {v.cffn_ratio} is the ConvFFN's "
                         f"width, expected at least 1")
    splits = [("llm.hidden_size", cfg.llm.hidden_size, "llm.num_attention_heads", cfg.llm.num_attention_heads),
              ("vision.hidden_size", v.hidden_size, "vision.num_attention_heads", v.num_attention_heads),
              (f"vision.hidden_size x vision.deform_ratio {v.deform_ratio}", int(v.hidden_size * v.deform_ratio),
               "vision.adapter_num_heads", v.adapter_num_heads),
              ("resampler.hidden_size", r.hidden_size, "resampler.num_attention_heads", r.num_attention_heads),
              ("image_decoder.resampler.hidden_size", dr.hidden_size, "image_decoder.resampler.num_attention_heads",
               dr.num_attention_heads),
              *[(f"unet.block_out_channels[{i}]", c, "unet.norm_num_groups", u.norm_num_groups)
                for i, c in enumerate(u.block_out_channels)],
              *[(f"vae.block_out_channels[{i}]", c, "vae.norm_num_groups", vae.norm_num_groups)
                for i, c in enumerate(vae.block_out_channels)]]
    for width_key, width, parts_key, parts in splits:
        if width < 1 or width % parts:
            raise InputError(f"{width_key} is {width}, not a multiple of {parts_key} {parts}")
    if not u.in_channels == u.out_channels == vae.latent_channels:
        raise InputError(f"unet.in_channels {u.in_channels} and unet.out_channels {u.out_channels} must equal "
                         f"vae.latent_channels {vae.latent_channels}")



def _preset_mmi_13b():
    return MMIConfig(dataset_to_ignore_noimage_cond_loss=("laion_en", "laion_coco"))


def _preset_tiny():
    # Same architecture, every width and depth small: 64x64 images, patch 8 -> an 8x8 patch grid, so the
    # tokenizer's four maps are 32/16/8/4 and the LLM reads 16/8/4. Vocabulary: the demo tokenizer's 384 pieces
    # + soi + image, in the LLaMA layout (pad = last ordinary piece). Dropout off, so that tiny runs are
    # deterministic in train mode too.
    return MMIConfig(
        vision=VisionConfig(image_size=64, patch_size=8, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                            intermediate_size=128, conv_inplane=8, interaction_indexes=((0, 0), (1, 1), (2, 2), (3, 3)),
                            adapter_num_heads=4, adapter_n_points=2, trainable=True),
        resampler=ResamplerConfig(num_queries=8, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=96, encoder_hidden_size=64, dropout=0.0),
        llm=LLMConfig(vocab_size=386, hidden_size=64, intermediate_size=172, num_hidden_layers=4,
                      num_attention_heads=4, max_position_embeddings=1024, trainable=True),
        mmfs=MMFSConfig(cross_attention_frequency=2, n_heads=4, n_points=2, spatial_shapes=(16, 8, 4),
                        base_spatial_shape=8),
        # 64x64 images and 8x8 latents: the tiny VAE keeps SD's 8x downsampling with four levels
        unet=UNetConfig(sample_size=8, block_out_channels=(32, 64), cross_attn_blocks=(True, False),
                        num_attention_heads=(2, 4), layers_per_block=1, cross_attention_dim=32, norm_num_groups=8),
        vae=VAEConfig(block_out_channels=(16, 16, 32, 32), layers_per_block=1, norm_num_groups=8),
        image_decoder=ImageDecoderConfig(
            image_size=64, resampler=ResamplerConfig(num_queries=8, hidden_size=32, num_hidden_layers=1,
                                                     num_attention_heads=2, intermediate_size=64,
                                                     encoder_hidden_size=64, cross_attention_frequency=1,
                                                     qk_normalization=False, dropout=0.0),
            mmfs_feat_dim=64, mmfs_attn_dim=32, mmfs_heads=2, mmfs_points=2, mmfs_value_sizes=(32, 16, 8, 4)),
        seq_len=1024, num_img_token=8, pad_token_id=383, soi_token_id=384, image_token_id=385,
    )


PRESETS = {"mmi-13b": _preset_mmi_13b, "tiny": _preset_tiny}


# ----------------------------------------------------------------------------------------------------------------
# Building blocks: norms, RoPE, sin-cos tables
# ----------------------------------------------------------------------------------------------------------------

def run_block(block, *args, checkpoint=False):
    """block(*args); checkpoint: its activations are dropped and recomputed in the backward pass (training)."""
    return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False) if checkpoint else block(*args)


def rms_norm(x, weight, eps):
    # the variance is taken in float32 whatever the activation dtype, as LLaMA does
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of a [B, C, H, W] map, computed in float32 (the adapter's spatial prior)."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        x32 = x.float()
        mean = x32.mean(1, keepdim=True)
        var = (x32 - mean).pow(2).mean(1, keepdim=True)
        x32 = (x32 - mean) * torch.rsqrt(var + self.eps)
        return (self.weight.float()[:, None, None] * x32 + self.bias.float()[:, None, None]).to(x.dtype)


def rope_cos_sin(positions, head_dim, theta, dtype):
    """cos/sin tables for rotate-half RoPE at integer `positions` [..., L] -> [..., L, head_dim], built in fp32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    freqs = positions.float()[..., None] * inv_freq          # (..., L, head_dim/2)
    emb = torch.cat([freqs, freqs], dim=-1)                  # (..., L, head_dim)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x, cos, sin):
    # x (B, H, L, D); cos/sin (B, L, D)
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


def get_1d_sincos_pos_embed(dim, n_positions):
    """[n, dim] table: first half sin(p * w_d), second half cos(p * w_d), w_d = 10000^(-d / (dim/2))."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = torch.arange(n_positions, dtype=torch.float64)[:, None] * omega     # (n, dim/2)
    return torch.cat([angles.sin(), angles.cos()], dim=1).float()


def get_2d_sincos_pos_embed(dim, grid_size):
    """[grid_size**2, dim] table for a square grid, tokens row-major.

    The first dim/2 channels encode the ROW index and the last dim/2 the COLUMN index (the original's order,
    the opposite of MAE's), each half a 1-D sin-cos table.
    """
    one_d = get_1d_sincos_pos_embed(dim // 2, grid_size)                        # (G, dim/2)
    rows = one_d[:, None, :].expand(grid_size, grid_size, dim // 2)
    cols = one_d[None, :, :].expand(grid_size, grid_size, dim // 2)
    return torch.cat([rows, cols], dim=-1).reshape(grid_size * grid_size, dim)


def resize_pos_embed(table, dst_hw):
    """Bicubically resize a square [N, C] token table to [H*W, C] (identity when the size already matches)."""
    src = int(math.isqrt(table.shape[0]))
    h, w = dst_hw
    if (src, src) == (h, w):
        return table
    grid = table.float().reshape(1, src, src, -1).permute(0, 3, 1, 2)          # (1, C, src, src)
    grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(h * w, -1).to(table.dtype)


def _to_device(numbers, device):
    """Host numbers (an int, a list or a CPU tensor; numbers become a long tensor) on `device`; a tensor already on a
    device is moved as is. On CUDA the copy goes through pinned memory without waiting for the stream: a plain copy
    from the host first waits for all work queued before it (a vision encoder, an LLM, a decoding step)."""
    t = numbers if torch.is_tensor(numbers) else torch.tensor(numbers, dtype=torch.long)
    if t.is_cpu and torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def grid_centres(h, w, device=None):
    """Normalised (x, y) pixel centres of an h x w grid, row-major -> [h*w, 2]."""
    ys = (torch.arange(h, dtype=torch.float32, device=device) + 0.5) / h
    xs = (torch.arange(w, dtype=torch.float32, device=device) + 0.5) / w
    y, x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([x.reshape(-1), y.reshape(-1)], dim=-1)


def level_start_index(spatial_shapes):
    """Exclusive prefix sums of H*W over levels: where each level starts in the flattened value tensor."""
    areas = spatial_shapes[:, 0] * spatial_shapes[:, 1]
    return torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])


# ----------------------------------------------------------------------------------------------------------------
# Multi-scale deformable attention: the reference, and the one dispatch point for the CUDA kernel;
# kernels.cu's other kernel, the decoding matmul (linear)
# ----------------------------------------------------------------------------------------------------------------


def ms_deform_attn_reference(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """out[b,q,m] = sum_l sum_p A[b,q,m,l,p] * bilinear(V_l[b,:,m], loc[b,q,m,l,p]), zero outside the map.

    value [B, S, M, D]; spatial_shapes [L, 2] (H, W); level_start_index [L]; sampling_locations
    [B, Q, M, L, P, 2] as (x, y) in [0, 1] with pixel centres at (j + 0.5) / W; attention_weights [B, Q, M, L, P].
    Returns [B, Q, M*D]. This is grid_sample(bilinear, zeros, align_corners=False) per level; levels of equal size
    (MMFS folds images into levels, so sizes repeat) are sampled in one call.
    """
    B, S, M, D = value.shape
    _, Q, _, L, P, _ = sampling_locations.shape
    shapes = [tuple(s) for s in spatial_shapes.tolist()]
    starts = level_start_index.tolist()
    grids = 2 * sampling_locations - 1                                       # grid_sample wants [-1, 1]
    sampled = [None] * L                                                     # per level (B*M, D, Q, P)
    for hw in dict.fromkeys(shapes):
        levels = [l for l in range(L) if shapes[l] == hw]
        h, w = hw
        if len(levels) == 1:    # a level of its own size (the UNet's case) needs no stack: one copy, not two
            l = levels[0]
            v, g = value[None, :, starts[l]:starts[l] + h * w], grids[:, :, :, l:l + 1]
        else:
            v, g = torch.stack([value[:, starts[l]:starts[l] + h * w] for l in levels]), grids[:, :, :, levels]
        v = v.permute(0, 1, 3, 4, 2).reshape(len(levels) * B * M, D, h, w)             # (n, B, HW, M, D) ->
        g = g.permute(3, 0, 2, 1, 4, 5)                                                # (n, B, M, Q, P, 2)
        g = g.reshape(len(levels) * B * M, Q, P, 2)
        out = F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False)
        out = out.reshape(len(levels), B * M, D, Q, P)
        for i, l in enumerate(levels):
            sampled[l] = out[i]
    sampled = torch.stack(sampled, dim=3).flatten(3)                         # (B*M, D, Q, L*P)
    weights = attention_weights.permute(0, 2, 1, 3, 4).reshape(B * M, 1, Q, L * P)
    out = (sampled * weights).sum(-1)                                        # (B*M, D, Q)
    return out.reshape(B, M * D, Q).transpose(1, 2).contiguous()


_KERNELS_SOURCE = Path(__file__).with_name("kernels.cu")   # compiled on first CUDA use
# kernels.cu's compile units (MMI_PART there): file name in the build folder -> (MMI_PART, seconds one core spends
# compiling it with nvcc 13 for sm_90). The kernel parts include no torch header; ninja builds the units in parallel
# and links one module.
_KERNELS_UNITS = {"bindings.cpp": (0, 10), "forward.cu": (1, 5), "backward_float.cu": (2, 7),
                  "backward_half.cu": (3, 9), "backward_bfloat16.cu": (4, 9), "gemv.cu": (5, 6),
                  "gemv_quantized.cu": (6, 13)}


def _kernels_build_dir():
    """Persistent, per-toolchain build folder, so a second run reuses the compiled module."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(Path.home(), ".cache", "mmi", "torch_extensions")
    tag = f"py{sys.version_info.major}{sys.version_info.minor}_torch{torch.__version__}"  # version names CUDA too
    path = Path(root) / tag.replace("+", "_") / "mmi_kernels"
    path.mkdir(parents=True, exist_ok=True)
    return str(path)


def _kernels_unavailable_reason():
    """Why the kernel cannot be built here, or None if it can be tried."""
    from torch.utils import cpp_extension

    if not torch.cuda.is_available():
        return "no CUDA device"
    if cpp_extension.CUDA_HOME is None:
        return "nvcc not found (CUDA_HOME unset and no nvcc on PATH)"
    if not _KERNELS_SOURCE.is_file():
        return f"{_KERNELS_SOURCE} is missing"
    return None


def kernels_build_seconds(cores):
    """About how long building kernels.cu takes on `cores` cores: its longest unit, or all of them shared out."""
    seconds = [s for _, s in _KERNELS_UNITS.values()]
    return math.ceil(max(max(seconds), sum(seconds) / max(cores, 1))) + 3   # + linking


def build_kernels(build_directory, load=None):
    """kernels.cu compiled into build_directory, or the build there reused when it is up to date; the module.
    Before a build that is not cached, one line on stderr says it is coming. load: torch.utils.cpp_extension.load
    (the default) or a stand-in taking its keywords."""
    if load is None:
        from torch.utils import cpp_extension

        load = cpp_extension.load
    build = Path(build_directory)
    sources = []
    for file, (part, _) in _KERNELS_UNITS.items():   # one file a unit, rewritten only when it changes
        unit, text = build / file, f'#define MMI_PART {part}\n#include "{_KERNELS_SOURCE.resolve()}"\n'
        if not unit.is_file() or unit.read_text() != text:
            unit.write_text(text)
        sources.append(str(unit))
    module = build / "mmi_kernels.so"
    if not module.is_file() or module.stat().st_mtime < _KERNELS_SOURCE.stat().st_mtime:
        print(f"mmi: compiling kernels.cu (first use, about {kernels_build_seconds(os.cpu_count() or 1)} s)",
              file=sys.stderr, flush=True)
    return load(name="mmi_kernels", sources=sources, build_directory=str(build),
                extra_cflags=["-O2"], extra_cuda_cflags=["-O3", "-std=c++17"], verbose=False)


@functools.lru_cache(maxsize=None)
def load_kernels():
    """The compiled kernels.cu module, built on the first call; None where it cannot be had, with one warning that
    says why. The answer is kept for the process; load_kernels.cache_clear() makes the next call look again."""
    reason = _kernels_unavailable_reason()
    if reason is None:
        try:
            return build_kernels(_kernels_build_dir())
        except Exception as err:  # any build or load failure: fall back, and say why
            first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
            reason = f"build of {_KERNELS_SOURCE.name} failed ({type(err).__name__}: {first_line})"
    warnings.warn(f"mmi: kernels.cu unavailable, multi-scale deformable attention falls back to the PyTorch "
                  f"reference (and a decoding step's matmuls and attention to F.linear and SDPA): {reason}",
                  stacklevel=3)
    return None


# The kernel as two PyTorch operators with an autograd formula: torch.compile and CUDA graphs see opaque ops
# with known output shapes (the fakes) instead of a Python extension call they would have to stop at.
@torch.library.custom_op("mmi::msda_forward", mutates_args=())
def _msda_op(value: torch.Tensor, spatial_shapes: torch.Tensor, level_start_index: torch.Tensor,
             sampling_locations: torch.Tensor, attention_weights: torch.Tensor) -> torch.Tensor:
    return load_kernels().forward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)


@_msda_op.register_fake
def _(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    B, _, M, D = value.shape
    return value.new_empty(B, sampling_locations.shape[1], M * D)


@torch.library.custom_op("mmi::msda_backward", mutates_args=())
def _msda_backward_op(value: torch.Tensor, spatial_shapes: torch.Tensor, level_start_index: torch.Tensor,
                      sampling_locations: torch.Tensor, attention_weights: torch.Tensor,
                      grad_output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    grads = load_kernels().backward(value, spatial_shapes, level_start_index, sampling_locations,
                                    attention_weights, grad_output)
    return tuple(grads)


@_msda_backward_op.register_fake
def _(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, grad_output):
    # contiguous, as the kernel writes them whatever its inputs' strides (a compiled graph relies on these)
    return (value.new_empty(value.shape), sampling_locations.new_empty(sampling_locations.shape),
            attention_weights.new_empty(attention_weights.shape))


def _msda_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _msda_grad(ctx, grad_output):
    """Shapes and start indices get no gradient."""
    value, shapes, starts, locations, weights = ctx.saved_tensors
    grad_value, grad_locations, grad_weights = _msda_backward_op(value, shapes, starts, locations, weights,
                                                                 grad_output.contiguous())
    return grad_value, None, None, grad_locations, grad_weights


_msda_op.register_autograd(_msda_grad, setup_context=_msda_setup_context)


def _check_msda_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """ValueError naming the argument at fault; the kernel itself trusts these."""
    if value.dim() != 4:
        raise ValueError(f"ms_deform_attn: value has shape {tuple(value.shape)}, expected (B, S, M, D)")
    B, S, M, D = value.shape
    if sampling_locations.dim() != 6 or sampling_locations.shape[-1] != 2 or \
            sampling_locations.shape[0] != B or sampling_locations.shape[2] != M:
        raise ValueError(f"ms_deform_attn: sampling_locations has shape {tuple(sampling_locations.shape)}, "
                         f"expected ({B}, Q, {M}, L, P, 2)")
    L = sampling_locations.shape[3]
    if attention_weights.shape != sampling_locations.shape[:-1]:
        raise ValueError(f"ms_deform_attn: attention_weights has shape {tuple(attention_weights.shape)}, "
                         f"expected {tuple(sampling_locations.shape[:-1])}")
    if tuple(spatial_shapes.shape) != (L, 2) or tuple(level_start_index.shape) != (L,):
        raise ValueError(f"ms_deform_attn: spatial_shapes {tuple(spatial_shapes.shape)} and level_start_index "
                         f"{tuple(level_start_index.shape)} must be ({L}, 2) and ({L},)")
    if not (value.dtype == sampling_locations.dtype == attention_weights.dtype):
        raise ValueError(f"ms_deform_attn: value, sampling_locations, attention_weights have dtypes {value.dtype}, "
                         f"{sampling_locations.dtype}, {attention_weights.dtype}; expected one dtype")
    # checking device-side shapes would cost a sync on every call; a compiled graph may hold S symbolically
    if spatial_shapes.device.type == "cpu" and not torch.compiler.is_compiling():
        sizes = spatial_shapes.prod(1)
        if int(sizes.sum()) != S:
            raise ValueError(f"ms_deform_attn: spatial_shapes cover {int(sizes.sum())} pixels, value has S={S}")
        starts = torch.cumsum(sizes, 0) - sizes
        if not torch.equal(starts, level_start_index.to(starts.dtype).cpu()):
            raise ValueError(f"ms_deform_attn: level_start_index {level_start_index.tolist()} is not the "
                             f"exclusive prefix sum {starts.tolist()} of H*W")


def kernels_used(device):
    """Whether kernels.cu runs for tensors on `device` (ms_deform_attn's kernel, linear's GEMV, decode_attention).
    The deformable attention reference reads the level shapes back to the host (a GPU sync per call), so a CUDA graph
    can hold MMFS only where the kernel runs. MMI_KERNELS=reference turns them all off."""
    return torch.device(device).type == "cuda" and _kernels_on()


def _kernels_on():
    return os.environ.get("MMI_KERNELS", "").lower() != "reference" and load_kernels() is not None


def compiled(fn, **kwargs):
    """torch.compile(fn, **kwargs) for code that asks kernels_used: its answer becomes a constant to the compiler
    (tracing load_kernels, file work, would split the graph). Marked here rather than where _kernels_on is defined:
    marking imports torch._dynamo, which takes as long as importing torch, and `--help` or a bad argument should not
    wait for it."""
    torch.compiler.assume_constant_result(_kernels_on)
    return torch.compile(fn, **kwargs)


def ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """The one entry point every deformable attention in the model goes through: our CUDA kernel (kernels.cu) for
    CUDA tensors when it builds, else the reference above. MMI_KERNELS=reference forces the reference. -> [B, Q, M*D]
    For CUDA tensors nothing here reads a device value back to the host when the kernel runs (CUDA-graph safe)."""
    _check_msda_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    if kernels_used(value.device):
        return _msda_op(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    return ms_deform_attn_reference(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)


def sampling_locations(reference_points, offsets, spatial_shapes):
    """Where each point samples: reference_points (1 or B, Lq, 2) in [0, 1] (x, y) plus offsets (B, Lq, H, L, P, 2)
    in pixels of each level, spatial_shapes (L, 2) as (h, w). -> (B, Lq, H, L, P, 2) in [0, 1]"""
    normalizer = spatial_shapes.flip(-1).to(offsets.dtype)                      # (L, 2) as (w, h)
    return reference_points[:, :, None, None, None, :] + offsets / normalizer[None, None, None, :, None, :]


class MSDeformAttn(nn.Module):
    """Deformable-DETR attention as the ViT-Adapter uses it: one offset and weight per head, level and point."""

    def __init__(self, d_model, n_levels, n_heads, n_points, ratio=1.0):
        super().__init__()
        self.n_levels, self.n_heads, self.n_points = n_levels, n_heads, n_points
        d_value = int(d_model * ratio)
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_value)
        self.output_proj = nn.Linear(d_value, d_model)
        self.reset_parameters()

    def reset_parameters(self):
        # Deformable DETR starts the offsets on a ring, but in the original the HF CLIP init that runs afterwards
        # zeroes every Linear bias in the adapter, ring included: all points start at the reference point.
        nn.init.zeros_(self.sampling_offsets.weight)
        nn.init.zeros_(self.sampling_offsets.bias)
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(self, query, reference_points, feat, spatial_shapes):
        # query (B, Lq, C); reference_points (1 or B, Lq, 2); feat (B, S, C); spatial_shapes (L, 2)
        B, Lq, _ = query.shape
        H, L, P = self.n_heads, self.n_levels, self.n_points
        value = self.value_proj(feat).view(B, feat.shape[1], H, -1)                  # (B, S, H, D)
        offsets = self.sampling_offsets(query).view(B, Lq, H, L, P, 2)
        weights = self.attention_weights(query).view(B, Lq, H, L * P).softmax(-1).view(B, Lq, H, L, P)
        loc = sampling_locations(reference_points, offsets, spatial_shapes)
        # under autocast the softmax comes out in float32: the op takes one dtype, the value's
        out = ms_deform_attn(value, spatial_shapes, level_start_index(spatial_shapes), loc.to(value.dtype),
                             weights.to(value.dtype))
        return self.output_proj(out)


def relative_image_index(mask):
    """The query_relpos row each image is read with, from a 0/1 mask [..., n] of the images a query sees: the
    latest visible image 1, the one before 2, ..., invisible images 0."""
    return (mask.sum(-1, keepdim=True) + 1 - mask.cumsum(-1)) * mask


class MMFS(nn.Module):
    """Multi-image multi-scale feature synchronizer, shared by the LLM and the UNet.

    Each query samples `n_points` locations per head in every level of every image it may see; the images act as
    extra levels. One offset per (head, point, image) is shared across levels, scaled by level size; one "ignore"
    slot per (image, level) lets a query attend to nothing (an attention sink worth exactly one logit of 0).
    """

    def __init__(self, d_query, d_value, d_out, d_attn, n_heads, n_points, spatial_shapes, base_spatial_shape,
                 max_num_image_per_seq, offset_init_magnitude, linear_init_std=None):
        super().__init__()
        if d_attn % n_heads:
            raise InputError(f"MMFS: d_attn {d_attn} is not divisible by n_heads {n_heads}")
        self.n_heads, self.n_points = n_heads, n_points
        self.n_levels = len(spatial_shapes)
        self.spatial_shapes = tuple(int(s) for s in spatial_shapes)
        self.max_num_image_per_seq = max_num_image_per_seq
        self.offset_init_magnitude = offset_init_magnitude
        self.linear_init_std = linear_init_std
        self.sampling_offsets = nn.Linear(d_query, n_heads * n_points * 2)
        self.attention_weights = nn.Linear(d_query, n_heads * self.n_levels * (n_points + 1))
        self.dynamic_offset_mask = nn.Linear(d_query, d_query)
        self.value_proj = nn.Linear(d_value, d_attn)
        self.output_proj = nn.Linear(d_attn, d_out)
        self.query_relpos = nn.Embedding(max_num_image_per_seq, d_query)
        # frozen zeros in the original's constructor; the LLM's "llama_cross_attn" unfreeze makes it trainable there
        self.ignore_token = nn.Parameter(torch.zeros(1, 1, 1, d_attn), requires_grad=False)
        # offsets are predicted in units of the base grid: level l multiplies them by its size / base size
        self.scale_ratios = tuple(s / base_spatial_shape for s in self.spatial_shapes)
        self.reset_parameters()

    def reset_parameters(self):
        if self.linear_init_std is not None:   # the LLM's copies keep HF's N(0, 0.02) Linear init here
            nn.init.normal_(self.attention_weights.weight, std=self.linear_init_std)
            nn.init.normal_(self.dynamic_offset_mask.weight, std=self.linear_init_std)
        nn.init.zeros_(self.sampling_offsets.weight)
        with torch.no_grad():
            m = self.offset_init_magnitude
            self.sampling_offsets.bias.copy_(torch.empty(self.n_heads, 1, self.n_points, 2).uniform_(-m, m).view(-1))
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)
        nn.init.zeros_(self.dynamic_offset_mask.bias)
        nn.init.trunc_normal_(self.query_relpos.weight, std=0.02)

    def forward(self, query, reference_points, value, mask):
        """query [B, Lq, d_query]; reference_points [1 or B, Lq, 2] as (x, y) in [0, 1]; value [B, n, S, d_value]
        with S = sum of the levels' H*W (image-major, levels in `spatial_shapes` order, row-major tokens);
        mask [B, n] (every query sees the same images) or [B, Lq', n] (per query; when Lq' != Lq only the last row
        is used, which is how decoding steps see the images visible to the prompt's last token). -> [B, Lq, d_out]"""
        m = self.query_mask(mask, query.shape[1])                                # (B, n) or (B, Lq or 1, n)
        rel = relative_image_index(m)
        if m.shape[-1] >= self.max_num_image_per_seq:   # rel <= the image count: fewer cannot overflow, and skip
            self.check_image_count(rel)                 # its device read (a host sync, a compiled graph's break)
        rel = rel[:, :, None] if m.dim() == 2 else rel.transpose(1, 2)           # (B, n, Lq or 1)
        # each image's query: the query plus the embedding of that image's position relative to it
        q = self.dynamic_offset_mask(query)[:, None] + self.query_relpos(rel)   # (B, n, Lq, d_query)
        out = self.attend(self.sampling_offsets(q), self.attention_weights(q), m, reference_points,
                          self.value_proj(value), *self.level_tables(value.shape[1], q.dtype, q.device))
        return self.output_proj(out)

    @staticmethod
    def query_mask(mask, Lq):
        """mask as 0/1 longs; a per-query mask with another query count gives its last row."""
        m = mask.long()
        return m[:, -1:] if m.dim() == 3 and m.shape[1] != Lq else m

    def check_image_count(self, rel):
        """ValueError if a query sees more images than query_relpos has rows."""
        if int(rel.max()) >= self.max_num_image_per_seq:
            raise ValueError(f"MMFS: {int(rel.max())} images visible to one query, "
                             f"max_num_image_per_seq is {self.max_num_image_per_seq}")

    def level_tables(self, n, dtype, device):
        """Offset scales (1, 1, 1, 1, Lv, 1, 1), the (H, W) of the n*Lv image-levels (images act as extra levels)
        and their start indexes. Filled in by ops, not torch.tensor(list): a compiled graph then holds no tensor
        constant and keeps the image count n symbolic (one graph serves every n)."""
        sizes = torch.stack([torch.full((n,), s, dtype=torch.long, device=device) for s in self.spatial_shapes], 1)
        shapes = torch.stack([sizes, sizes], -1).reshape(-1, 2)                     # (n, Lv) -> (n*Lv, 2) as (H, W)
        scale = torch.stack([torch.full((), r, dtype=dtype, device=device) for r in self.scale_ratios])
        return scale.view(1, 1, 1, 1, -1, 1, 1), shapes, level_start_index(shapes)

    def attend(self, offsets, logits, m, reference_points, v, scale, shapes, starts):
        """Every image's offsets (B, n, Lq, H*P*2) and logits (B, n, Lq, H*Lv*(P+1)), the mask m (B, n) or
        (B, Lq or 1, n), the values v (B, n, S, d_attn) -> what output_proj reads (B, Lq, d_attn)."""
        B, n, Lq = offsets.shape[:3]
        H, P, Lv = self.n_heads, self.n_points, self.n_levels
        v = v.reshape(B, -1, H, v.shape[-1] // H)                                # (B, n*S, H, D)
        offsets = offsets.view(B, n, Lq, H, 1, P, 2) * scale                    # (B, n, Lq, H, Lv, P, 2)
        offsets = offsets.permute(0, 2, 3, 1, 4, 5, 6).reshape(B, Lq, H, n * Lv, P, 2)
        logits = logits.view(B, n, Lq, H, Lv, P + 1)
        logits = logits.permute(0, 2, 3, 1, 4, 5)                                 # (B, Lq, H, n, Lv, P+1)
        bias = (1.0 - m.to(logits.dtype)) * -10000.0                             # fp16-safe "minus infinity"
        bias = bias[:, None, None, :, None, None] if m.dim() == 2 else bias[:, :, None, :, None, None]
        logits = logits + bias
        # the ignore slot's predicted logit is discarded: n*Lv slots of -ln(n*Lv) act as one logit of 0
        ignore = logits.new_full(logits.shape[:-1] + (1,), -math.log(n * Lv))
        logits = torch.cat([logits[..., :P], ignore], dim=-1).reshape(B, Lq, H, n * Lv * (P + 1))
        weights = logits.softmax(-1).view(B, Lq, H, n * Lv, P + 1)
        w_points, w_ignore = weights[..., :P].contiguous(), weights[..., P].sum(-1)      # (B,Lq,H,nLv,P), (B,Lq,H)

        loc = sampling_locations(reference_points, offsets, shapes)
        out = ms_deform_attn(v, shapes, starts, loc.to(v.dtype), w_points.to(v.dtype))
        return out + (self.ignore_token.view(H, -1) * w_ignore[..., None]).reshape(B, Lq, -1).to(out.dtype)


# ----------------------------------------------------------------------------------------------------------------
# Vision: CLIP ViT-L/14, the ViT-Adapter, the Q-Former resampler, the visual tokenizer
# ----------------------------------------------------------------------------------------------------------------


class CLIPAttention(nn.Module):
    def __init__(self, dim, n_heads, causal=False):
        super().__init__()
        self.n_heads, self.causal = n_heads, causal
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, L, C = x.shape
        q, k, v = (p(x).view(B, L, self.n_heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)     # (B, heads, L, D)
        return self.out_proj(out.transpose(1, 2).reshape(B, L, C))


class CLIPMLP(nn.Module):
    def __init__(self, dim, hidden, act="quick_gelu"):
        super().__init__()
        if act not in ("quick_gelu", "gelu"):
            raise ValueError(f"CLIP MLP activation {act!r}: expected 'quick_gelu' or 'gelu'")
        self.act = act
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        x = self.fc1(x)
        return self.fc2(x * torch.sigmoid(1.702 * x) if self.act == "quick_gelu" else F.gelu(x))


class CLIPEncoderLayer(nn.Module):
    """Pre-LN transformer layer of CLIP's towers (the vision tower's here; causal for the text tower)."""

    def __init__(self, dim, n_heads, hidden, eps, act="quick_gelu", causal=False):
        super().__init__()
        self.self_attn = CLIPAttention(dim, n_heads, causal)
        self.layer_norm1 = nn.LayerNorm(dim, eps=eps)
        self.mlp = CLIPMLP(dim, hidden, act)
        self.layer_norm2 = nn.LayerNorm(dim, eps=eps)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPTextTransformer(nn.Module):
    """CLIP's text tower with transformers' `text_model.*` names: token + position embeddings, causal layers, a
    final LayerNorm -> [B, L, dim]. SD-2's text encoder is one (its output for "" starts `neg_prompt_embeds`);
    eval.py's CLIP re-ranker is another."""

    def __init__(self, vocab_size, dim, num_layers, n_heads, hidden, max_positions, eps, act="quick_gelu"):
        super().__init__()
        self.embeddings = nn.ModuleDict({"token_embedding": nn.Embedding(vocab_size, dim),
                                         "position_embedding": nn.Embedding(max_positions, dim)})
        self.encoder = nn.ModuleDict({"layers": nn.ModuleList(
            CLIPEncoderLayer(dim, n_heads, hidden, eps, act, causal=True) for _ in range(num_layers))})
        self.final_layer_norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, ids):
        e = self.embeddings
        x = e["token_embedding"](ids) + e["position_embedding"].weight[:ids.shape[1]]
        for layer in self.encoder["layers"]:
            x = layer(x)
        return self.final_layer_norm(x)


class CLIPVisionEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        n_pos = cfg.grid_size ** 2 + 1
        self.class_embedding = nn.Parameter(torch.randn(cfg.hidden_size) * 0.02)
        self.patch_embedding = nn.Conv2d(3, cfg.hidden_size, cfg.patch_size, cfg.patch_size, bias=False)
        self.position_embedding = nn.Embedding(n_pos, cfg.hidden_size)
        # persistent only because the original's state dict carries it
        self.register_buffer("position_ids", torch.arange(n_pos)[None], persistent=True)

    def forward(self, pixels):
        x = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype))   # (B, C, G, G)
        x = x.flatten(2).transpose(1, 2)                                         # (B, G*G, C)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1)                                           # (B, 1+G*G, C)
        return x + self.position_embedding.weight[None]


class SpatialPriorModule(nn.Module):
    """A small ResNet-like stem that gives the adapter its own 1/4 .. 1/32 feature maps of the image."""

    def __init__(self, inplanes, dim, eps):
        super().__init__()

        def conv_ln_relu(cin, cout, stride):
            return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), LayerNorm2d(cout, eps), nn.ReLU()]

        self.stem = nn.Sequential(*conv_ln_relu(3, inplanes, 2), *conv_ln_relu(inplanes, inplanes, 1),
                                  *conv_ln_relu(inplanes, inplanes, 1), nn.MaxPool2d(3, 2, 1))
        self.conv2 = nn.Sequential(*conv_ln_relu(inplanes, 2 * inplanes, 2))
        self.conv3 = nn.Sequential(*conv_ln_relu(2 * inplanes, 4 * inplanes, 2))
        self.conv4 = nn.Sequential(*conv_ln_relu(4 * inplanes, 4 * inplanes, 2))
        self.fc1 = nn.Conv2d(inplanes, dim, 1)
        self.fc2 = nn.Conv2d(2 * inplanes, dim, 1)
        self.fc3 = nn.Conv2d(4 * inplanes, dim, 1)
        self.fc4 = nn.Conv2d(4 * inplanes, dim, 1)

    def forward(self, x):
        c1 = self.stem(x)
        c2 = self.conv2(c1)
        c3 = self.conv3(c2)
        c4 = self.conv4(c3)
        # c1 stays a map; c2..c4 become token sequences (B, H*W, dim)
        return self.fc1(c1), *(fc(c).flatten(2).transpose(1, 2) for fc, c in ((self.fc2, c2), (self.fc3, c3),
                                                                              (self.fc4, c4)))


class ConvFFN(nn.Module):
    """fc1 -> depth-wise 3x3 conv on each of the three token grids (2G, G, G/2 per side) -> GELU -> fc2."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = nn.ModuleDict({"dwconv": nn.Conv2d(hidden, hidden, 3, 1, 1, groups=hidden)})  # checkpoint name
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x, grid):
        x = self.fc1(x)
        B, _, C = x.shape
        sides = (2 * grid, grid, grid // 2)
        parts = x.split([s * s for s in sides], dim=1)
        conv = self.dwconv["dwconv"]
        parts = [conv(p.transpose(1, 2).reshape(B, C, s, s)).flatten(2).transpose(1, 2) for p, s in zip(parts, sides)]
        return self.fc2(F.gelu(torch.cat(parts, dim=1)))


class Injector(nn.Module):
    """ViT tokens <- adapter pyramid: x + gamma * attn(x, c). gamma starts at zero."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        d = cfg.hidden_size
        self.query_norm = nn.LayerNorm(d, eps=cfg.adapter_norm_eps)
        self.feat_norm = nn.LayerNorm(d, eps=cfg.adapter_norm_eps)
        self.attn = MSDeformAttn(d, 3, cfg.adapter_num_heads, cfg.adapter_n_points, cfg.deform_ratio)
        self.gamma = nn.Parameter(torch.zeros(d))

    def forward(self, x, ref, c, shapes):
        return x + self.gamma * self.attn(self.query_norm(x), ref, self.feat_norm(c), shapes)


class Extractor(nn.Module):
    """Adapter pyramid <- ViT tokens: c + attn(c, x), then c + ConvFFN(c)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        d = cfg.hidden_size
        self.query_norm = nn.LayerNorm(d, eps=cfg.adapter_norm_eps)
        self.feat_norm = nn.LayerNorm(d, eps=cfg.adapter_norm_eps)
        self.attn = MSDeformAttn(d, 1, cfg.adapter_num_heads, cfg.adapter_n_points, cfg.deform_ratio)
        self.ffn = ConvFFN(d, int(d * cfg.cffn_ratio))
        self.ffn_norm = nn.LayerNorm(d, eps=cfg.adapter_norm_eps)

    def forward(self, c, ref, x, shapes, grid):
        c = c + self.attn(self.query_norm(c), ref, self.feat_norm(x), shapes)
        return c + self.ffn(self.ffn_norm(c), grid)


class InteractionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig, n_extra):
        super().__init__()
        self.injector = Injector(cfg)
        self.extractor = Extractor(cfg)
        if n_extra:
            self.extra_extractors = nn.ModuleList(Extractor(cfg) for _ in range(n_extra))
        else:
            self.extra_extractors = None


class CLIPVisionAdapter(nn.Module):
    """CLIP's vision transformer run in groups of layers, with adapter interactions between the groups.

    Outputs the class token + last patch tokens [B, 1+G*G, C] and four maps [B, C, s, s] with s = 4G, 2G, G, G/2
    (64/32/16/8 for ViT-L/14 at 224). The post-LayerNorm of CLIP is not used.
    """

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        if cfg.grid_size % 2:
            raise InputError(f"vision: image_size/patch_size = {cfg.grid_size} must be even for the adapter pyramid")
        if len(cfg.interaction_indexes) != 4:   # one per level of the pyramid the adapter adds the ViT's output to
            raise InputError(f"vision: interaction_indexes has {len(cfg.interaction_indexes)} blocks "
                             f"{cfg.interaction_indexes}, expected 4 (first, last ViT layer) pairs")
        last = max(i1 for _, i1 in cfg.interaction_indexes)
        if last >= cfg.num_hidden_layers:
            raise InputError(f"vision: interaction_indexes reach layer {last}, the ViT has {cfg.num_hidden_layers}")
        self.cfg = cfg
        d = cfg.hidden_size
        self.embeddings = CLIPVisionEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.encoder = nn.ModuleDict({"layers": nn.ModuleList(
            CLIPEncoderLayer(d, cfg.num_attention_heads, cfg.intermediate_size, cfg.layer_norm_eps)
            for _ in range(cfg.num_hidden_layers))})
        self.adapter_level_embed = nn.Parameter(torch.zeros(3, d))
        self.adapter_spm = SpatialPriorModule(cfg.conv_inplane, d, cfg.spm_norm_eps)
        n = len(cfg.interaction_indexes)
        self.adapter_interactions = nn.ModuleList(
            InteractionBlock(cfg, cfg.num_extra_extractors if i == n - 1 else 0) for i in range(n))
        self.adapter_up = nn.ConvTranspose2d(d, d, 2, 2)

    def forward(self, pixels, checkpoint=False):
        B = pixels.shape[0]
        G, d = self.cfg.grid_size, self.cfg.hidden_size
        x = self.pre_layrnorm(self.embeddings(pixels))                          # (B, 1+G*G, d)
        # the adapter sees the image resized so that its 1/16 map matches the patch grid
        resized = F.interpolate(pixels, size=(16 * G, 16 * G), mode="bilinear", align_corners=False)
        c1, c2, c3, c4 = self.adapter_spm(resized.to(x.dtype))
        c = torch.cat([c2 + self.adapter_level_embed[0], c3 + self.adapter_level_embed[1],
                       c4 + self.adapter_level_embed[2]], dim=1)               # (B, (4+1+1/4)*G*G, d)
        dev = pixels.device
        pyramid = _to_device([(2 * G, 2 * G), (G, G), (G // 2, G // 2)], dev)
        patch_grid = _to_device([(G, G)], dev)
        ref_patches = grid_centres(G, G, dev)[None]                               # injector queries: patches
        ref_pyramid = torch.cat([grid_centres(s, s, dev) for s in (2 * G, G, G // 2)])[None]   # extractor queries

        cls, x = x[:, :1], x[:, 1:]
        maps = []
        for block, (i0, i1) in zip(self.adapter_interactions, self.cfg.interaction_indexes):
            x = block.injector(x, ref_patches, c, pyramid)
            x = torch.cat([cls, x], dim=1)
            for layer in self.encoder["layers"][i0:i1 + 1]:
                x = run_block(layer, x, checkpoint=checkpoint)
            cls, x = x[:, :1], x[:, 1:]
            c = block.extractor(c, ref_pyramid, x, patch_grid, G)
            for extractor in block.extra_extractors or ():
                c = extractor(c, ref_pyramid, x, patch_grid, G)
            maps.append(x.transpose(1, 2).reshape(B, d, G, G))

        c2, c3, c4 = c.split([4 * G * G, G * G, G * G // 4], dim=1)
        c2 = c2.transpose(1, 2).reshape(B, d, 2 * G, 2 * G)
        c3 = c3.transpose(1, 2).reshape(B, d, G, G)
        c4 = c4.transpose(1, 2).reshape(B, d, G // 2, G // 2)
        c1 = self.adapter_up(c2) + c1
        x1, x2, x3, x4 = maps
        c1 = c1 + F.interpolate(x1, scale_factor=4, mode="bilinear", align_corners=False)
        c2 = c2 + F.interpolate(x2, scale_factor=2, mode="bilinear", align_corners=False)
        c3 = c3 + x3
        c4 = c4 + F.interpolate(x4, scale_factor=0.5, mode="bilinear", align_corners=False)
        last_hidden_state = torch.cat([cls, x], dim=1)                           # (B, 1+G*G, d)
        return last_hidden_state, [c1, c2, c3, c4]


class QFormerMultiHeadAttention(nn.Module):
    """BLIP-2 Q-Former attention; with qk-normalisation a LayerNorm over each head's query and key vectors."""

    def __init__(self, dim, kv_dim, n_heads, qk_norm, dropout, eps):
        super().__init__()
        self.n_heads = n_heads
        self.dropout = dropout
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(kv_dim, dim)
        self.value = nn.Linear(kv_dim, dim)
        if qk_norm:
            self.q_norm = nn.LayerNorm(dim // n_heads, eps=eps)
            self.k_norm = nn.LayerNorm(dim // n_heads, eps=eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x, kv, mask_bias=None):
        B, Lq, C = x.shape
        q = self.query(x).view(B, Lq, self.n_heads, -1).transpose(1, 2)
        k = self.key(kv).view(B, kv.shape[1], self.n_heads, -1).transpose(1, 2)
        v = self.value(kv).view(B, kv.shape[1], self.n_heads, -1).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        p = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_bias, dropout_p=p)
        return out.transpose(1, 2).reshape(B, Lq, C)


class QFormerOutput(nn.Module):
    """Post-LN residual: LayerNorm(dropout(dense(h)) + input)."""

    def __init__(self, din, dout, dropout, eps):
        super().__init__()
        self.dense = nn.Linear(din, dout)
        self.LayerNorm = nn.LayerNorm(dout, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, h, residual):
        return self.LayerNorm(self.dropout(self.dense(h)) + residual)


class QFormerAttention(nn.Module):
    def __init__(self, cfg: ResamplerConfig, kv_dim):
        super().__init__()
        d = cfg.hidden_size
        self.attention = QFormerMultiHeadAttention(d, kv_dim, cfg.num_attention_heads, cfg.qk_normalization,
                                                   cfg.dropout, cfg.layer_norm_eps)
        self.output = QFormerOutput(d, d, cfg.dropout, cfg.layer_norm_eps)

    def forward(self, x, kv, mask_bias=None):
        return self.output(self.attention(x, kv, mask_bias), x)


class QFormerIntermediate(nn.Module):
    def __init__(self, din, dout):
        super().__init__()
        self.dense = nn.Linear(din, dout)

    def forward(self, x):
        return F.gelu(self.dense(x))


class QFormerLayer(nn.Module):
    def __init__(self, cfg: ResamplerConfig, has_cross_attention):
        super().__init__()
        self.attention = QFormerAttention(cfg, cfg.hidden_size)
        self.crossattention = QFormerAttention(cfg, cfg.encoder_hidden_size) if has_cross_attention else None
        self.intermediate_query = QFormerIntermediate(cfg.hidden_size, cfg.intermediate_size)
        self.output_query = QFormerOutput(cfg.intermediate_size, cfg.hidden_size, cfg.dropout, cfg.layer_norm_eps)

    def forward(self, x, enc, enc_mask_bias):
        x = self.attention(x, x)
        if self.crossattention is not None:
            x = self.crossattention(x, enc, enc_mask_bias)
        return self.output_query(self.intermediate_query(x), x)


class QFormer(nn.Module):
    def __init__(self, cfg: ResamplerConfig):
        super().__init__()
        self.layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)
        f = cfg.cross_attention_frequency
        self.encoder = nn.ModuleDict({"layer": nn.ModuleList(
            QFormerLayer(cfg, i % f == 0) for i in range(cfg.num_hidden_layers))})

    def forward(self, queries, enc, enc_mask_bias=None):
        x = self.dropout(self.layernorm(queries))
        for layer in self.encoder["layer"]:
            x = layer(x, enc, enc_mask_bias)
        return x


class PerceiverResampler(nn.Module):
    """num_queries learned queries read a variable-length input through a Q-Former -> [B, num_queries, hidden]."""

    def __init__(self, cfg: ResamplerConfig):
        super().__init__()
        self.blip2qformer = QFormer(cfg)
        self.queries = nn.Parameter(torch.randn(1, cfg.num_queries, cfg.hidden_size) * 0.02)

    def forward(self, encoder_hidden_states, encoder_attention_mask=None):
        B = encoder_hidden_states.shape[0]
        bias = None
        if encoder_attention_mask is not None:                                   # (B, S) of 1 = keep
            bias = (1.0 - encoder_attention_mask[:, None, None, :].to(encoder_hidden_states.dtype))
            bias = bias * torch.finfo(encoder_hidden_states.dtype).min
        queries = self.queries.expand(B, -1, -1).to(encoder_hidden_states.dtype)
        return self.blip2qformer(queries, encoder_hidden_states, bias)


CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)      # CLIP's pixel normalisation
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class VisualTokenizer(nn.Module):
    """images [B_I, 3, S, S] in [0, 1] -> vis_embed [B_I, num_queries, llm width] and four multi-scale maps."""

    def __init__(self, cfg: MMIConfig):
        super().__init__()
        v = cfg.vision
        d = v.hidden_size
        self.encoder = nn.ModuleDict({"vision_model": CLIPVisionAdapter(v)})    # checkpoint name
        self.pos_proj = nn.Linear(d, d)
        self.pos_ln = nn.LayerNorm(d, eps=1e-6)
        # a frozen Parameter, not a buffer, because the checkpoint stores it as one: zero row for the class token
        table = torch.cat([torch.zeros(1, d), get_2d_sincos_pos_embed(d, v.grid_size)])
        self.pos_embed = nn.Parameter(table, requires_grad=False)
        self.perceiver_resampler = PerceiverResampler(cfg.resampler)
        self.post_ln = nn.LayerNorm(d, eps=1e-6)
        self.proj = nn.Linear(cfg.resampler.hidden_size, cfg.llm.hidden_size)
        nn.init.normal_(self.proj.weight, std=1e-3)
        nn.init.zeros_(self.proj.bias)
        self.register_buffer("clip_mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1))
        self.register_buffer("clip_std", torch.tensor(CLIP_STD).view(1, 3, 1, 1))

    def forward(self, images, checkpoint=False):
        pixels = (images - self.clip_mean) / self.clip_std
        last_hidden_state, maps = self.encoder["vision_model"](pixels, checkpoint)
        pos = self.pos_embed.to(last_hidden_state.dtype)
        # every map gets the patch-grid table, bicubically resized to its own size
        maps = [m + resize_pos_embed(pos[1:], m.shape[-2:]).T.reshape(1, -1, *m.shape[-2:]) for m in maps]
        q_in = self.post_ln(self.pos_ln(self.pos_proj(last_hidden_state)) + pos)
        vis_embed = self.proj(self.perceiver_resampler(q_in))                  # (B_I, num_queries, llm width)
        return vis_embed, maps


# ----------------------------------------------------------------------------------------------------------------
# LLM with MMFS: LLaMA (Vicuna) whose every `cross_attention_frequency`-th layer also reads the images
# ----------------------------------------------------------------------------------------------------------------


class KVCache(nn.Module):
    """Keys and values of one attention layer for generation, kv [2, B, heads, max_len, head_dim], filled as
    decoding goes."""

    def __init__(self, batch, n_heads, max_len, head_dim, dtype, device):
        super().__init__()
        shape = (2, batch, n_heads, max_len, head_dim)
        self.register_buffer("kv", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    @property
    def k(self):
        return self.kv[0]                                                        # (B, heads, max_len, D)

    @property
    def v(self):
        return self.kv[1]

    def update(self, start, k, v):
        """Write k, v (B, heads, T, D) at positions start..start+T-1 -> the filled prefix (B, heads, start+T, D)."""
        end = start + k.shape[2]
        self.kv[0, :, :, start:end] = k
        self.kv[1, :, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]

    def reorder(self, index):
        """Beam search: row i of the cache becomes row index[i]."""
        self.kv = self.kv.index_select(1, index)


def additive_mask(attn_mask, dtype):
    """A bool mask (True = may attend) as the original's LLaMA applies it at inference: 0 where True, the dtype's
    minimum where False, added to the scores. A score plus that minimum rounds to the minimum, so a query that may
    attend to no key (a left pad) attends uniformly to all keys. None (causal) and float masks pass through."""
    if attn_mask is None or attn_mask.dtype != torch.bool:
        return attn_mask
    return torch.zeros(attn_mask.shape, dtype=dtype, device=attn_mask.device).masked_fill_(
        ~attn_mask, torch.finfo(dtype).min)


def attention(q, k, v, attn_mask=None):
    """Queries (B, heads, L, D) over keys and values (B, heads, T, D) -> (B, L, heads * D). attn_mask None is
    causal (training: over the whole packed row, as the original's flash-attn), else bool (B, 1, L, T), True = may
    attend, or that mask made additive already (additive_mask)."""
    attn_mask = additive_mask(attn_mask, q.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None)
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)


class LlamaAttention(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        d, self.n_heads = cfg.hidden_size, cfg.num_attention_heads
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)

    def forward(self, x, cos, sin, attn_mask=None, kv_cache=None, cache_start=0):
        B, L, C = x.shape
        q, k, v = (proj(x).view(B, L, self.n_heads, -1).transpose(1, 2)            # (B, heads, L, D)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(cache_start, k, v)                            # (B, heads, start+L, D)
        return self.o_proj(attention(q, k, v, attn_mask))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaMMFSAttention(nn.Module):
    """`llama_cross_attn`: tanh(gate) * MMFS(norm1(h), norm2(vision)); gate starts at 0, so it adds nothing at init."""

    def __init__(self, cfg: MMIConfig):
        super().__init__()
        d, dv, m = cfg.llm.hidden_size, cfg.vision.hidden_size, cfg.mmfs
        self.gate = nn.Parameter(torch.zeros(1))
        self.attn = MMFS(d_query=d, d_value=dv, d_out=d, d_attn=dv, n_heads=m.n_heads, n_points=m.n_points,
                         spatial_shapes=m.spatial_shapes, base_spatial_shape=m.base_spatial_shape,
                         max_num_image_per_seq=m.max_num_image_per_seq,
                         offset_init_magnitude=m.offset_init_magnitude, linear_init_std=0.02)
        self.norm1 = RMSNorm(d, cfg.llm.rms_norm_eps)
        self.norm2 = RMSNorm(dv, cfg.llm.rms_norm_eps)

    def forward(self, h, vision_hidden_states, cross_attention_mask):
        # every query uses the single reference point (0.5, 0.5): where to look is all in the offsets
        ref = h.new_full((1, h.shape[1], 2), 0.5)
        out = self.attn(self.norm1(h), ref, self.norm2(vision_hidden_states), cross_attention_mask)
        return out * self.gate.tanh().to(out.dtype)      # a float32 gate under autocast keeps the stream's dtype


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: MMIConfig, use_cross_attn):
        super().__init__()
        self.self_attn = LlamaAttention(cfg.llm)
        self.llama_cross_attn = LlamaMMFSAttention(cfg) if use_cross_attn else None
        self.mlp = LlamaMLP(cfg.llm)
        self.input_layernorm = RMSNorm(cfg.llm.hidden_size, cfg.llm.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.llm.hidden_size, cfg.llm.rms_norm_eps)

    def forward(self, h, cos, sin, vision_hidden_states=None, cross_attention_mask=None, attn_mask=None,
                kv_cache=None, cache_start=0):
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, attn_mask, kv_cache, cache_start)
        if self.llama_cross_attn is not None and vision_hidden_states is not None:
            h = h + self.llama_cross_attn(h, vision_hidden_states, cross_attention_mask)
        return h + self.mlp(self.post_attention_layernorm(h))


class LlamaModel(nn.Module):
    """The LLM body (`mm_decoder`): embeddings, layers, final norm; no head (the text decoder is separate)."""

    def __init__(self, cfg: MMIConfig):
        super().__init__()
        c = cfg.llm
        self.cfg = c
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        f = cfg.mmfs.cross_attention_frequency
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, i % f == 0) for i in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)

    def forward(self, inputs_embeds, position_ids, vision_hidden_states=None, cross_attention_mask=None,
                attn_mask=None, kv_caches=None, cache_start=0, checkpoint=False):
        """inputs_embeds [B, L, d]; position_ids [B, L]; vision_hidden_states [B, N, S, d_v]; cross_attention_mask
        [B, L', N]; attn_mask None (causal) or a bool [B, 1, L, cache_start + L] (True = may attend); kv_caches: one
        KVCache a layer, this call's keys and values written from position cache_start on. -> [B, L, d]"""
        cos, sin = rope_cos_sin(position_ids, self.cfg.hidden_size // self.cfg.num_attention_heads,
                                self.cfg.rope_theta, inputs_embeds.dtype)
        attn_mask = additive_mask(attn_mask, inputs_embeds.dtype)              # once, not in every layer
        h, checkpoint = inputs_embeds, checkpoint and self.training
        for i, layer in enumerate(self.layers):
            h = run_block(layer, h, cos, sin, vision_hidden_states, cross_attention_mask, attn_mask,
                          None if kv_caches is None else kv_caches[i], cache_start, checkpoint=checkpoint)
        return self.norm(h)


class TextDecoder(nn.Module):
    """logits = head(h), plus head_new(h) on the new tokens (soi, image): a trainable correction of a frozen head."""

    def __init__(self, cfg: MMIConfig, n_new=2):
        super().__init__()
        d, V = cfg.llm.hidden_size, cfg.llm.vocab_size
        self.n_new = n_new
        self.head = nn.Linear(d, V)
        self.head_new = nn.Linear(d, n_new)
        self.reset_new_rows()

    def reset_new_rows(self):
        """The paper's init: the new rows of `head` silenced (weight 0, bias -100) and `head_new` = 0 weight,
        bias 95, so at init both new tokens have logit -5 whatever the hidden state."""
        with torch.no_grad():
            self.head.weight[-self.n_new:] = 0.0
            self.head.bias[-self.n_new:] = -100.0
            self.head_new.weight.zero_()
            self.head_new.bias.fill_(95.0)

    def forward(self, h):
        logits = self.head(h)
        return torch.cat([logits[..., :-self.n_new], logits[..., -self.n_new:] + self.head_new(h)], dim=-1)


# ----------------------------------------------------------------------------------------------------------------
# Image decoder  (SD-2 UNet with MMFS, VAE, noise schedule and samplers: the generating half)
# ----------------------------------------------------------------------------------------------------------------

# ---- UNet / VAE building blocks (diffusers submodule names, so SD's files load by identity) ----

def timestep_embedding(t: torch.Tensor, dim: int, flip_sin_to_cos: bool, freq_shift: float,
                       max_period: float = 10000.0) -> torch.Tensor:
    """(B,) -> (B, dim): sin/cos of t * 10000^(-k / (dim/2 - freq_shift)); SD-2 puts cos first."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
                      / (half - freq_shift))
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([args.cos(), args.sin()] if flip_sin_to_cos else [args.sin(), args.cos()], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class TimestepEmbedding(nn.Module):
    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


class ResnetBlock2D(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, temb_ch: int | None, groups: int, eps: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch, eps=eps)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        if temb_ch is not None:
            self.time_emb_proj = nn.Linear(temb_ch, out_ch)
        self.norm2 = nn.GroupNorm(groups, out_ch, eps=eps)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        if in_ch != out_ch:
            self.conv_shortcut = nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x, temb=None):
        h = self.conv1(F.silu(self.norm1(x)))
        if temb is not None:
            h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return (self.conv_shortcut(x) if hasattr(self, "conv_shortcut") else x) + h


class Downsample2D(nn.Module):
    def __init__(self, ch: int, padding: int = 1):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=padding)

    def forward(self, x):
        if self.padding == 0:  # the VAE pads right/bottom only, so odd sizes floor the same way SD does
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample2D(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _heads_attention(q, k, v, heads: int):
    """(B, Lq, H*D), (B, Lk, H*D) x2 -> (B, Lq, H*D) with softmax(q k^T / sqrt(D)) v per head."""
    B, Lq, C = q.shape
    q, k, v = (x.view(B, -1, heads, C // heads).transpose(1, 2) for x in (q, k, v))  # (B, H, L, D)
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).reshape(B, Lq, C)


class Attention(nn.Module):
    """diffusers' Attention as used by SD's transformer blocks: bias-free q/k/v, biased to_out.0."""

    def __init__(self, query_dim: int, heads: int, head_dim: int, cross_attention_dim: int | None = None):
        super().__init__()
        inner, kv_dim = heads * head_dim, cross_attention_dim or query_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(kv_dim, inner, bias=False)
        self.to_v = nn.Linear(kv_dim, inner, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim)])

    def forward(self, x, context=None):
        context = x if context is None else context
        return self.to_out[0](_heads_attention(self.to_q(x), self.to_k(context), self.to_v(context), self.heads))


class GEGLU(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner)

    def forward(self, x):
        h, gate = self.proj(x).chunk(2, dim=-1)
        return h * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        # index 1 is diffusers' (parameter-free) dropout; kept so the Linear sits at net.2 as in SD's files
        self.net = nn.ModuleList([GEGLU(dim, dim * mult), nn.Identity(), nn.Linear(dim * mult, dim)])

    def forward(self, x):
        for layer in self.net:
            x = layer(x)
        return x


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int, cross_attention_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, head_dim)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, head_dim, cross_attention_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x, context):
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class Transformer2DModel(nn.Module):
    """SD-2's spatial transformer with linear projections in and out (use_linear_projection=True)."""

    def __init__(self, ch: int, heads: int, cross_attention_dim: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, ch, eps=1e-6)
        self.proj_in = nn.Linear(ch, ch)
        self.transformer_blocks = nn.ModuleList([BasicTransformerBlock(ch, heads, ch // heads, cross_attention_dim)])
        self.proj_out = nn.Linear(ch, ch)

    def forward(self, x, context):
        B, C, H, W = x.shape
        h = self.norm(x).permute(0, 2, 3, 1).reshape(B, H * W, C)  # (B, C, H, W) -> (B, HW, C)
        h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, context)
        h = self.proj_out(h).reshape(B, H, W, C).permute(0, 3, 1, 2)  # (B, HW, C) -> (B, C, H, W)
        return x + h                  # x first: the sum takes x's layout, so blocks meet one layout


class UNetDownBlock(nn.Module):
    """CrossAttnDownBlock2D when heads > 0, else DownBlock2D."""

    def __init__(self, in_ch, out_ch, temb_ch, num_layers, add_downsample, heads, cross_dim, groups, eps):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock2D(in_ch if i == 0 else out_ch, out_ch, temb_ch, groups, eps) for i in range(num_layers)])
        self.attentions = nn.ModuleList(
            [Transformer2DModel(out_ch, heads, cross_dim, groups) for _ in range(num_layers if heads else 0)])
        self.downsamplers = nn.ModuleList([Downsample2D(out_ch)] if add_downsample else [])

    def forward(self, h, temb, context):
        """-> h, and the skip tensors this block hands to the up path (one per resnet, one per downsampler)."""
        skips = []
        for i, resnet in enumerate(self.resnets):
            h = resnet(h, temb)
            if len(self.attentions):
                h = self.attentions[i](h, context)
            skips.append(h)
        for down in self.downsamplers:
            h = down(h)
            skips.append(h)
        return h, skips


class UNetUpBlock(nn.Module):
    """CrossAttnUpBlock2D when heads > 0, else UpBlock2D; resnet i eats the last unused skip tensor."""

    def __init__(self, in_ch, prev_out_ch, out_ch, temb_ch, num_layers, add_upsample, heads, cross_dim, groups,
                 eps):
        super().__init__()
        self.resnets = nn.ModuleList()
        for i in range(num_layers):
            skip_ch = in_ch if i == num_layers - 1 else out_ch
            self.resnets.append(ResnetBlock2D((prev_out_ch if i == 0 else out_ch) + skip_ch, out_ch, temb_ch,
                                              groups, eps))
        self.attentions = nn.ModuleList(
            [Transformer2DModel(out_ch, heads, cross_dim, groups) for _ in range(num_layers if heads else 0)])
        self.upsamplers = nn.ModuleList([Upsample2D(out_ch)] if add_upsample else [])

    def forward(self, h, skips, temb, context):
        for i, resnet in enumerate(self.resnets):
            h = resnet(torch.cat([h, skips[-1 - i]], dim=1), temb)
            if len(self.attentions):
                h = self.attentions[i](h, context)
        for up in self.upsamplers:
            h = up(h)
        return h


class UNetMidBlock2DCrossAttn(nn.Module):
    def __init__(self, ch, temb_ch, heads, cross_dim, groups, eps):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(ch, ch, temb_ch, groups, eps) for _ in range(2)])
        self.attentions = nn.ModuleList([Transformer2DModel(ch, heads, cross_dim, groups)])

    def forward(self, h, temb, context):
        h = self.resnets[0](h, temb)
        return self.resnets[1](self.attentions[0](h, context), temb)


def unet_skip_layout(cfg: UNetConfig) -> list:
    """(channels, side length) of every down-path skip tensor in order (conv_in first); SD-2 at 64: 12 entries."""
    ch, size = cfg.block_out_channels, cfg.sample_size
    layout = [(ch[0], size)]
    for i, c in enumerate(ch):
        layout += [(c, size >> i)] * cfg.layers_per_block
        if i < len(ch) - 1:
            layout.append((c, size >> (i + 1)))
    return layout


class UNet2DConditionModel(nn.Module):
    """SD-2-base UNet; optionally an MMFSNet rewrites the skips and the mid output before the up path."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        ch, heads, n_levels = cfg.block_out_channels, cfg.num_attention_heads, len(cfg.block_out_channels)
        if not (len(cfg.cross_attn_blocks) == len(heads) == n_levels):
            raise InputError(f"UNetConfig: block_out_channels {ch}, cross_attn_blocks {cfg.cross_attn_blocks} and "
                             f"num_attention_heads {heads} must have the same length")
        temb_ch, g, eps, xdim = ch[0] * 4, cfg.norm_num_groups, cfg.norm_eps, cfg.cross_attention_dim
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(ch[0], temb_ch)
        self.down_blocks = nn.ModuleList([
            UNetDownBlock(ch[max(i - 1, 0)], ch[i], temb_ch, cfg.layers_per_block, i < n_levels - 1,
                          heads[i] if cfg.cross_attn_blocks[i] else 0, xdim, g, eps) for i in range(n_levels)])
        self.mid_block = UNetMidBlock2DCrossAttn(ch[-1], temb_ch, heads[-1], xdim, g, eps)
        rch, rheads, rcross = ch[::-1], heads[::-1], cfg.cross_attn_blocks[::-1]
        self.up_blocks = nn.ModuleList([
            UNetUpBlock(rch[min(i + 1, n_levels - 1)], rch[max(i - 1, 0)], rch[i], temb_ch, cfg.layers_per_block + 1,
                        i < n_levels - 1, rheads[i] if rcross[i] else 0, xdim, g, eps) for i in range(n_levels)])
        self.conv_norm_out = nn.GroupNorm(g, ch[0], eps=eps)
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, 3, padding=1)

    def forward(self, sample, timestep, encoder_hidden_states, mmfs_module=None, mmfs_features=None,
                mmfs_mask=None, checkpoint=False):
        """sample (B, 4, h, w), timestep int or (B,) / (), encoder_hidden_states (B, 77, 1024) -> (B, 4, h, w): the
        noise eps, or v with the image decoder's prediction_type "v_prediction".
        checkpoint: recompute each down/mid/up block (and MMFS block) in the backward pass (training only)."""
        ckpt = checkpoint and self.training
        run = functools.partial(run_block, checkpoint=ckpt)
        B = sample.shape[0]
        t = torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(B)
        t_emb = timestep_embedding(t, self.cfg.block_out_channels[0], self.cfg.flip_sin_to_cos, self.cfg.freq_shift)
        temb = self.time_embedding(t_emb.to(sample.dtype))
        h = self.conv_in(sample)
        skips = [h]
        for block in self.down_blocks:
            h, block_skips = run(block, h, temb, encoder_hidden_states)
            skips += block_skips
        h = run(self.mid_block, h, temb, encoder_hidden_states)
        if mmfs_module is not None:
            h, skips = mmfs_module(h, skips, mmfs_features, mmfs_mask, ckpt)
        skips = list(skips)
        for block in self.up_blocks:
            n = len(block.resnets)
            block_skips, skips = skips[-n:], skips[:-n]
            h = run(block, h, block_skips, temb, encoder_hidden_states)
        return self.conv_out(F.silu(self.conv_norm_out(h)))


class VAEAttention(nn.Module):
    """Single-head spatial self-attention of the VAE mid blocks (diffusers 0.20+ names, residual included)."""

    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, ch, eps=1e-6)
        self.to_q = nn.Linear(ch, ch)
        self.to_k = nn.Linear(ch, ch)
        self.to_v = nn.Linear(ch, ch)
        self.to_out = nn.ModuleList([nn.Linear(ch, ch)])

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.group_norm(x).flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, HW, C)
        h = self.to_out[0](_heads_attention(self.to_q(h), self.to_k(h), self.to_v(h), 1))
        return x + h.transpose(1, 2).reshape(B, C, H, W)   # x first: the sum keeps x's layout


class VAEMidBlock(nn.Module):
    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(ch, ch, None, groups, 1e-6) for _ in range(2)])
        self.attentions = nn.ModuleList([VAEAttention(ch, groups)])

    def forward(self, h):
        return self.resnets[1](self.attentions[0](self.resnets[0](h)))


class VAEDownBlock(nn.Module):  # diffusers' DownEncoderBlock2D
    def __init__(self, in_ch, out_ch, num_layers, add_downsample, groups):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock2D(in_ch if i == 0 else out_ch, out_ch, None, groups, 1e-6) for i in range(num_layers)])
        self.downsamplers = nn.ModuleList([Downsample2D(out_ch, padding=0)] if add_downsample else [])

    def forward(self, h):
        for m in [*self.resnets, *self.downsamplers]:
            h = m(h)
        return h


class VAEUpBlock(nn.Module):  # diffusers' UpDecoderBlock2D
    def __init__(self, in_ch, out_ch, num_layers, add_upsample, groups):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock2D(in_ch if i == 0 else out_ch, out_ch, None, groups, 1e-6) for i in range(num_layers)])
        self.upsamplers = nn.ModuleList([Upsample2D(out_ch)] if add_upsample else [])

    def forward(self, h):
        for m in [*self.resnets, *self.upsamplers]:
            h = m(h)
        return h


class VAEEncoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, g, n = cfg.block_out_channels, cfg.norm_num_groups, len(cfg.block_out_channels)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList([VAEDownBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, i < n - 1, g)
                                          for i in range(n)])
        self.mid_block = VAEMidBlock(ch[-1], g)
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for block in self.down_blocks:
            h = block(h)
        return self.conv_out(F.silu(self.conv_norm_out(self.mid_block(h))))


class VAEDecoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        rch, g, n = cfg.block_out_channels[::-1], cfg.norm_num_groups, len(cfg.block_out_channels)
        self.conv_in = nn.Conv2d(cfg.latent_channels, rch[0], 3, padding=1)
        self.mid_block = VAEMidBlock(rch[0], g)
        self.up_blocks = nn.ModuleList([VAEUpBlock(rch[max(i - 1, 0)], rch[i], cfg.layers_per_block + 1, i < n - 1, g)
                                        for i in range(n)])
        self.conv_norm_out = nn.GroupNorm(g, rch[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(rch[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z):
        h = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            h = block(h)
        return self.conv_out(F.silu(self.conv_norm_out(h)))


class AutoencoderKL(nn.Module):
    """SD's KL autoencoder (frozen; the decoder runs it in float32). Images in [-1, 1]."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = VAEEncoder(cfg)
        self.decoder = VAEDecoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.latent_channels, 2 * cfg.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(cfg.latent_channels, cfg.latent_channels, 1)

    def encode(self, x):
        """(B, 3, H, W) -> mean, logvar, each (B, 4, H/8, W/8) (diffusers' latent_dist parameters)."""
        mean, logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    @staticmethod
    def sample(mean, logvar, generator=None, noise=None):
        """latent_dist.sample(): mean + std * noise, noise ~ N(0, 1) drawn from `generator` unless given."""
        if noise is None:
            noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return mean + torch.exp(0.5 * logvar) * noise.to(mean.dtype)

    def decode(self, z):
        return self.decoder(self.post_quant_conv(z))


_LEGACY_VAE_ATTN = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def legacy_vae_key(k):
    """SD-2's released VAE files name the mid-block attention query/key/value/proj_attn; ours (and diffusers
    >= 0.20 in memory) use to_q/to_k/to_v/to_out.0."""
    head, _, last = k.rpartition(".")                        # e.g. "...attentions.0.query", "weight"
    prefix, _, name = head.rpartition(".")
    return f"{prefix}.{_LEGACY_VAE_ATTN[name]}.{last}" if ".attentions." in k and name in _LEGACY_VAE_ATTN else k


def unet_config_from_diffusers(d: dict, where="unet config") -> UNetConfig:
    """UNetConfig from a diffusers unet/config.json dict (SD-2 layouts only: linear projection, GEGLU)."""
    d = _json_object(d, where)
    n = len(_need(d, "block_out_channels", (0,), where))
    heads = d.get("num_attention_heads") or d.get("attention_head_dim")  # SD-2's files use the legacy name
    heads = [heads] * n if type(heads) is int else heads
    if not (isinstance(heads, (list, tuple)) and len(heads) == n and all(type(h) is int for h in heads)):
        raise InputError(f"{where}: attention_head_dim is {heads!r}, expected an int or {n} ints")
    if d.get("use_linear_projection", False) is not True:
        raise InputError(f"{where}: use_linear_projection is {d.get('use_linear_projection')}, expected true "
                         f"(SD-2 layout)")
    kinds = _need(d, "down_block_types", ("",), where)
    if not all(isinstance(t, str) for t in kinds):
        raise InputError(f"{where}: down_block_types is {list(kinds)!r}, expected a list of block names")
    get = {k: _need(d, k, getattr(UNetConfig, k), where)
           for k in ("sample_size", "in_channels", "out_channels", "block_out_channels", "layers_per_block",
                     "cross_attention_dim", "norm_num_groups", "norm_eps", "flip_sin_to_cos", "freq_shift")}
    return UNetConfig(**get, cross_attn_blocks=tuple(t.startswith("CrossAttn") for t in kinds),
                      num_attention_heads=tuple(heads))


def vae_config_from_diffusers(d: dict, where="vae config") -> VAEConfig:
    d = _json_object(d, where)
    get = {k: _need(d, k, getattr(VAEConfig, k), where)
           for k in ("in_channels", "out_channels", "latent_channels", "block_out_channels", "layers_per_block",
                     "norm_num_groups")}
    return VAEConfig(**get, scaling_factor=_get(d, "scaling_factor", 0.18215, where))


# ---- Noise schedule and samplers (pure functions over tensors; a step takes the predicted noise ε) ----

def scaled_linear_betas(num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012):
    """SD's "scaled_linear" schedule: betas linear in sqrt-space, float32 like diffusers."""
    # explicit CPU: a model built under torch.device("meta") still needs real schedule numbers
    return torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps, dtype=torch.float32,
                          device="cpu") ** 2


def alphas_cumprod_of(betas: torch.Tensor) -> torch.Tensor:
    return torch.cumprod(1.0 - betas, dim=0)


def _abar_per_row(alphas_cumprod, t, x):
    """abar at each row's timestep t (B,), in x's dtype and device, shaped (B, 1, ...) to broadcast over x."""
    return _to_device(alphas_cumprod, x.device).to(x.dtype)[t].reshape(-1, *[1] * (x.dim() - 1))


def add_noise(x0, noise, t, alphas_cumprod):
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t (B,) long."""
    abar = _abar_per_row(alphas_cumprod, t, x0)
    return abar ** 0.5 * x0 + (1 - abar) ** 0.5 * noise


def v_target(x0, noise, t, alphas_cumprod):
    """v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0, what a v-prediction UNet learns, t (B,) long."""
    abar = _abar_per_row(alphas_cumprod, t, x0)
    return abar ** 0.5 * noise - (1 - abar) ** 0.5 * x0


def eps_from_v(v, x_t, t: int, alphas_cumprod):
    """The noise a v-prediction stands for at timestep t: eps = sqrt(abar_t) v + sqrt(1 - abar_t) x_t."""
    abar = float(alphas_cumprod[t])
    return abar ** 0.5 * v + (1 - abar) ** 0.5 * x_t


def min_snr_weights(t, alphas_cumprod, gamma, prediction_type):
    """Per-sample min-SNR-gamma loss weights (B,), SNR_t = abar_t / (1 - abar_t): min(SNR_t, gamma) / SNR_t on the
    eps loss, / (SNR_t + 1) on the v loss (both are the same weight on the x0 error)."""
    abar = _to_device(alphas_cumprod, t.device)[t]
    snr = abar / (1 - abar)
    return snr.clamp(max=gamma) / (snr + 1 if prediction_type == "v_prediction" else snr)


def _check_steps(num_inference_steps: int, num_train_timesteps: int):
    if not 1 <= num_inference_steps <= num_train_timesteps:
        raise ValueError(f"steps={num_inference_steps}: expected 1 <= steps <= {num_train_timesteps}")


def leading_timesteps(num_inference_steps: int, num_train_timesteps: int = 1000, steps_offset: int = 1):
    """diffusers' "leading" spacing: (n-1-i) * (T // n) + offset; 30 steps -> 958, 925, ..., 34, 1."""
    _check_steps(num_inference_steps, num_train_timesteps)
    ratio = num_train_timesteps // num_inference_steps
    return torch.arange(num_inference_steps - 1, -1, -1, dtype=torch.long) * ratio + steps_offset


def linspace_timesteps(num_inference_steps: int, num_train_timesteps: int = 1000):
    """diffusers' "linspace" spacing (DPM-Solver default): round(linspace(0, T-1, n+1))[::-1][:-1]."""
    _check_steps(num_inference_steps, num_train_timesteps)
    ts = np.linspace(0, num_train_timesteps - 1, num_inference_steps + 1).round()[::-1][:-1]
    return torch.from_numpy(ts.astype(np.int64))


def ddpm_step(eps, t: int, prev_t: int, x, alphas_cumprod, noise=None):
    """Ancestral DDPM step x_t -> x_prev_t ("fixed_small" variance, no clipping); noise needed when t > 0."""
    a_t = alphas_cumprod[t]
    a_prev = alphas_cumprod[prev_t] if prev_t >= 0 else alphas_cumprod.new_tensor(1.0)
    cur_a = a_t / a_prev  # the step's own alpha: differs from 1 - beta_t when steps skip timesteps
    cur_b = 1 - cur_a
    x0 = (x - (1 - a_t) ** 0.5 * eps) / a_t ** 0.5
    x_prev = (a_prev ** 0.5 * cur_b / (1 - a_t)) * x0 + (cur_a ** 0.5 * (1 - a_prev) / (1 - a_t)) * x
    if t > 0:
        if noise is None:
            raise ValueError(f"ddpm_step at t={t} needs noise (only t=0 is deterministic)")
        var = torch.clamp((1 - a_prev) / (1 - a_t) * cur_b, min=1e-20)
        x_prev = x_prev + var ** 0.5 * noise
    return x_prev


def ddim_step(eps, t: int, prev_t: int, x, alphas_cumprod, final_alpha_cumprod, eta: float = 0.0, noise=None):
    """DDIM step; eta 0 is deterministic, eta 1 matches DDPM's variance. abar below t=0 is final_alpha_cumprod
    (SD's set_alpha_to_one=False: abar[0])."""
    a_t = alphas_cumprod[t]
    a_prev = alphas_cumprod[prev_t] if prev_t >= 0 else final_alpha_cumprod
    x0 = (x - (1 - a_t) ** 0.5 * eps) / a_t ** 0.5
    std = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5
    x_prev = a_prev ** 0.5 * x0 + (1 - a_prev - std ** 2) ** 0.5 * eps
    if eta > 0:
        if noise is None:
            raise ValueError(f"ddim_step with eta={eta} needs noise")
        x_prev = x_prev + std * noise
    return x_prev


def dpm_solver_sigmas(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """sigma_t = sqrt((1 - abar_t) / abar_t) at each timestep, plus a final 0 (the last step lands on x0)."""
    sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
    return torch.cat([sigmas[timesteps], sigmas.new_zeros(1)])


def dpm_solver_x0(x, eps, sigma):
    """DPM-Solver++ works on the x0 prediction: x0 = (x - sigma_t eps) / alpha_t in VP terms."""
    alpha = 1 / (sigma ** 2 + 1) ** 0.5
    return (x - sigma * alpha * eps) / alpha


def dpm_solver_pp_2m_step(x, x0, x0_prev, sigma_prev, sigma, sigma_next):
    """DPM-Solver++(2M), midpoint form: 2nd order from the last two x0 predictions; 1st order on the first step
    (x0_prev None) and on the last (sigma_next 0, where it returns x0 exactly)."""
    def alpha_sigma_lambda(s):
        alpha = 1 / (s ** 2 + 1) ** 0.5
        return alpha, s * alpha, torch.log(alpha) - torch.log(s * alpha)

    alpha_t, sigma_t, lambda_t = alpha_sigma_lambda(sigma_next)
    _, sigma_s0, lambda_s0 = alpha_sigma_lambda(sigma)
    h = lambda_t - lambda_s0
    x_t = (sigma_t / sigma_s0) * x - (alpha_t * (torch.exp(-h) - 1.0)) * x0
    if x0_prev is None or sigma_next == 0:
        return x_t
    _, _, lambda_s1 = alpha_sigma_lambda(sigma_prev)
    r0 = (lambda_s0 - lambda_s1) / h
    return x_t - 0.5 * (alpha_t * (torch.exp(-h) - 1.0)) * (x0 - x0_prev) / r0


SAMPLERS = ("ddpm", "ddim", "dpm++2m")


# ---- UNet-MMFS: each skip and the mid output look at the previous image's multi-scale maps ----

class MMFSBlock(nn.Module):
    """sample (B, C, H, W) -> zero-initialised residual (B, C, H, W) from MMFS over the previous image's maps."""

    def __init__(self, query_dim: int, cfg: ImageDecoderConfig, grid_size: int, base_spatial_shape: int):
        super().__init__()
        self.query_norm = nn.LayerNorm(query_dim, eps=1e-6)
        self.feat_norm = nn.LayerNorm(cfg.mmfs_feat_dim, eps=1e-6)
        self.mmfs = MMFS(d_query=query_dim, d_value=cfg.mmfs_feat_dim, d_out=query_dim, d_attn=cfg.mmfs_attn_dim,
                         n_heads=cfg.mmfs_heads, n_points=cfg.mmfs_points, spatial_shapes=list(cfg.mmfs_value_sizes),
                         base_spatial_shape=base_spatial_shape,
                         max_num_image_per_seq=cfg.mmfs_max_num_image_per_seq,
                         offset_init_magnitude=cfg.mmfs_offset_init_magnitude)
        # frozen 2-D sin-cos table of the full latent grid, stored as a Parameter like the original's checkpoint
        self.pos_embed = nn.Parameter(get_2d_sincos_pos_embed(query_dim, grid_size).float(), requires_grad=False)
        self.conv = nn.Conv2d(query_dim, query_dim, 1)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)

    def forward(self, sample, feats, mask):
        """sample (B, C, H, W); feats (B, n, sum_l H_l W_l, C_v) flattened image/level/row-major; mask (B, n)."""
        B, C, H, W = sample.shape
        pos = resize_pos_embed(self.pos_embed, (H, W)).to(sample.dtype)
        q = self.query_norm(sample.flatten(2).transpose(1, 2)) + pos             # (B, C, H, W) -> (B, HW, C)
        ref = grid_centres(H, W, sample.device)[None]
        y = self.mmfs(q, ref, self.feat_norm(feats), mask)
        return self.conv(y.transpose(1, 2).reshape(B, C, H, W))


class MMFSNet(nn.Module):
    """One MMFSBlock per UNet skip (mmfs_down_blocks, 12 for SD-2) plus one on the mid output (mmfs_mid_block)."""

    def __init__(self, unet_cfg: UNetConfig, cfg: ImageDecoderConfig):
        super().__init__()
        # the original keys base_spatial_shape by block index // 3; for SD-2 that equals each query's grid side,
        # which is what we use so other layouts stay consistent
        self.mmfs_down_blocks = nn.ModuleList(
            [MMFSBlock(c, cfg, unet_cfg.sample_size, side) for c, side in unet_skip_layout(unet_cfg)])
        mid_side = unet_cfg.sample_size >> (len(unet_cfg.block_out_channels) - 1)
        self.mmfs_mid_block = MMFSBlock(unet_cfg.block_out_channels[-1], cfg, unet_cfg.sample_size, mid_side)

    @staticmethod
    def flatten_features(mmfs_features, dtype):
        """list of levels (B, n, C_v, H_l, W_l) -> (B, n, sum_l H_l W_l, C_v), image/level/row-major."""
        return torch.cat([f.flatten(3).transpose(2, 3) for f in mmfs_features], dim=2).to(dtype)

    def forward(self, sample, skips, mmfs_features, mmfs_mask, checkpoint=False):
        """mmfs_features: list of levels (B, n, C_v, H_l, W_l); mmfs_mask (B, n). -> (sample, skips) + residuals."""
        run = functools.partial(run_block, checkpoint=checkpoint)
        if len(skips) != len(self.mmfs_down_blocks):
            raise ValueError(f"MMFSNet: {len(skips)} UNet skips, expected {len(self.mmfs_down_blocks)}")
        # training normalises inside each (checkpointed) block, so only the one flattened copy is kept for backward
        feats = self.flatten_features(mmfs_features, sample.dtype)
        skips = [s + run(block, s, feats, mmfs_mask) for s, block in zip(skips, self.mmfs_down_blocks)]
        return sample + run(self.mmfs_mid_block, sample, feats, mmfs_mask), skips


# ---- StableDiffusion: VAE + UNet + MMFSNet, the diffusion loss and the sampling loop ----

def guidance_doubled(mmfs_features, mmfs_mask):
    """The UNet-MMFS inputs of a guided pass, whose rows are (uncond; cond): both halves see the same images."""
    return [torch.cat([f, f]) for f in mmfs_features], torch.cat([mmfs_mask, mmfs_mask])


class StableDiffusion(nn.Module):
    def __init__(self, unet_cfg: UNetConfig, vae_cfg: VAEConfig, cfg: ImageDecoderConfig):
        super().__init__()
        self.cfg = cfg
        self.vae = AutoencoderKL(vae_cfg).requires_grad_(False)
        self.unet = UNet2DConditionModel(unet_cfg)
        self.mmfs_module = MMFSNet(unet_cfg, cfg)
        # float32 on the CPU whatever the model's dtype (a buffer would follow model.to(bfloat16)); steps index it
        # with Python ints, so sampling needs no device round trips
        self.alphas_cumprod = alphas_cumprod_of(scaled_linear_betas(cfg.num_train_timesteps, cfg.beta_start,
                                                                    cfg.beta_end))
        vae_factor = 2 ** (len(vae_cfg.block_out_channels) - 1)
        if cfg.image_size != unet_cfg.sample_size * vae_factor:
            raise InputError(f"image_size {cfg.image_size} != UNet sample_size {unet_cfg.sample_size} x VAE factor "
                             f"{vae_factor}")

    def check_images(self, images):
        S = self.cfg.image_size
        if images.dim() != 4 or tuple(images.shape[1:]) != (3, S, S):
            raise ValueError(f"image_tensors_dec has shape {tuple(images.shape)}, expected (B_I, 3, {S}, {S})")

    def _vae_fp32(self):
        """The VAE always runs in float32 (as the original), even inside a half-precision model or autocast."""
        if self.vae.encoder.conv_in.weight.dtype != torch.float32:
            self.vae.float()
        return torch.autocast(self.vae.encoder.conv_in.weight.device.type, enabled=False)

    @torch.no_grad()
    def encode_posterior(self, images):
        """images (B, 3, S, S) in [0, 1] -> the VAE's (mean, logvar), each (B, 4, S/8, S/8) float32; the encoder
        runs in float32 on chunks of vae_encode_mini_bs images. No random draw here (see sample_posterior)."""
        self.check_images(images)
        with self._vae_fp32():
            x = images.float() * 2 - 1
            mean, logvar = zip(*[self.vae.encode(c) for c in x.split(self.cfg.vae_encode_mini_bs)])
        return torch.cat(mean), torch.cat(logvar)

    def sample_posterior(self, posterior, generator=None, noise=None):
        """(mean, logvar) -> scaled latent samples, drawn chunk by chunk as the original encodes them (noise: the
        draws (B, 4, h, w), given)."""
        if noise is not None:
            return self.vae.sample(*posterior, noise=noise) * self.vae.cfg.scaling_factor
        mb = self.cfg.vae_encode_mini_bs
        chunks = [self.vae.sample(m, lv, generator) for m, lv in zip(posterior[0].split(mb), posterior[1].split(mb))]
        return torch.cat(chunks) * self.vae.cfg.scaling_factor

    def forward(self, images, cond, mmfs_features, mmfs_mask, checkpoint=False, posterior=None, generator=None,
                posterior_noise=None, noise=None, timesteps=None):
        """Per-element float32 loss (B, 4, S/8, S/8): the squared error of the UNet's prediction of the noise (or of v,
        see prediction_type) at t ~ U{0..T-1}, min-SNR weighted with snr_gamma > 0. posterior: encode_posterior(images),
        where the caller ran the VAE earlier. Draws, from `generator` (None: the global RNG, as the original) unless
        given: the posterior's noise, then the diffusion noise, then the timesteps."""
        if posterior is None:
            posterior = self.encode_posterior(images)
        latents = self.sample_posterior(posterior, generator, posterior_noise).to(cond.dtype)
        if noise is None:   # randn_like's draw (in the latents' memory format, which orders the draws)
            noise = torch.empty_like(latents).normal_(generator=generator)
        noise = noise.to(latents.dtype)
        t = timesteps if timesteps is not None else torch.randint(
            0, self.cfg.num_train_timesteps, (latents.shape[0],), generator=generator, device=latents.device)
        x_t = add_noise(latents, noise, t, self.alphas_cumprod)
        pred = self.unet(x_t, t, cond, self.mmfs_module, mmfs_features, mmfs_mask, checkpoint)
        c = self.cfg
        target = noise if c.prediction_type == "epsilon" else v_target(latents, noise, t, self.alphas_cumprod)
        loss = F.mse_loss(pred.float(), target.float(), reduction="none")
        if c.snr_gamma > 0:
            loss = loss * min_snr_weights(t, self.alphas_cumprod, c.snr_gamma, c.prediction_type)[:, None, None, None]
        return loss

    def guided_prediction(self, x, t, cond, uncond, mmfs_net, mmfs_features, mmfs_mask, guidance_scale):
        """p_u + g (p_c - p_u) from one UNet pass over (x; x) with the conditions (uncond; cond), both halves
        seeing the previous image, p the UNet's prediction (eps or v); mmfs_net is the UNet-MMFS net
        (self.mmfs_module, or its KeyedMMFSNet)."""
        if guidance_scale <= 1.0:  # as the SD pipeline: no unconditional pass at all
            return self.unet(x, t, cond, mmfs_net, mmfs_features, mmfs_mask)
        feats, mask = guidance_doubled(mmfs_features, mmfs_mask)
        p_u, p_c = self.unet(torch.cat([x, x]), t, torch.cat([uncond, cond]), mmfs_net, feats, mask).chunk(2)
        return p_u + guidance_scale * (p_c - p_u)

    @torch.no_grad()
    def sample_latents(self, cond, uncond, mmfs_features, mmfs_mask, steps, guidance_scale, sampler, generator,
                       eta=0.0, progress=True, variants=1, fast=None):
        """Latents drawn from `generator` first, then (ddpm, or ddim with eta > 0) one noise draw per step, each in
        float32 on the generator's device and then moved to cond's device and dtype (so a CPU generator gives the
        same noise to a CPU float32 run and a GPU bf16 one).
        generator: one torch.Generator for all images, or a list with one per image (each image then draws only
        from its own, so it samples as it would alone, whatever else is in the batch).
        variants > 1: the rows are that many variant-major copies of the same B / variants images (e.g. with and
        without MMFS); every copy gets the same draws, so each samples as its rows alone would.
        fast: the images' MMFS values made once (KeyedMMFSNet) and, on CUDA, each guided UNet pass replayed as a
        CUDA graph; None = where kernels.cu runs (see use_fast), False = the plain UNet pass at every step."""
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler={sampler!r}, expected one of {SAMPLERS}")
        if cond.shape[0] % variants:
            raise ValueError(f"sample_latents: {cond.shape[0]} rows are not {variants} equal variants")
        T, ac = self.cfg.num_train_timesteps, self.alphas_cumprod
        side = self.unet.cfg.sample_size
        draw_shape = (cond.shape[0] // variants, self.unet.cfg.in_channels, side, side)
        per_image = isinstance(generator, (list, tuple))
        if per_image and len(generator) != draw_shape[0]:
            raise ValueError(f"sample_latents: {len(generator)} generators for {draw_shape[0]} images; expected one "
                             f"per image")

        def draw():
            if per_image:   # (1, C, h, w) per image from its own generator -> (B / variants, C, h, w)
                z = torch.cat([torch.randn((1,) + draw_shape[1:], generator=g, device=g.device) for g in generator])
            else:
                z = torch.randn(draw_shape, generator=generator, device=generator.device)
            z = z.to(cond.device, cond.dtype, non_blocking=True)   # no wait on the GPU's queued steps
            return z.repeat(variants, 1, 1, 1) if variants > 1 else z

        x = draw()
        if sampler == "dpm++2m":
            timesteps = linspace_timesteps(steps, T)
            sigmas = dpm_solver_sigmas(timesteps, ac)
        else:
            timesteps = leading_timesteps(steps, T, self.cfg.steps_offset)
        x0_prev = None
        net, fast = self.mmfs_module, use_fast(fast, x.device)
        if fast:
            seen = guidance_doubled(mmfs_features, mmfs_mask) if guidance_scale > 1.0 else (mmfs_features, mmfs_mask)
            net = KeyedMMFSNet(net, *seen, cond.dtype)
        predict = lambda x_t, t: self.guided_prediction(x_t, t, cond, uncond, net, mmfs_features, mmfs_mask,
                                                        guidance_scale)
        if fast and x.is_cuda and kernels_used(x.device):
            predict = _GraphedPrediction(predict, x)
        for i, t in enumerate(tqdm(timesteps.tolist(), desc=f"{sampler} steps", disable=not progress)):
            p = predict(x, t)                                 # guided eps or v; guidance is linear, so v -> eps after
            eps = eps_from_v(p, x, t, ac) if self.cfg.prediction_type == "v_prediction" else p
            if sampler == "ddpm":
                prev_t = timesteps[i + 1].item() if i + 1 < steps else -1
                noise = draw() if t > 0 else None
                x = ddpm_step(eps, t, prev_t, x, ac, noise)
            elif sampler == "ddim":
                noise = draw() if eta > 0 else None
                x = ddim_step(eps, t, t - T // steps, x, ac, ac[0], eta, noise)
            else:
                x0 = dpm_solver_x0(x, eps, sigmas[i])
                x = dpm_solver_pp_2m_step(x, x0, x0_prev, sigmas[i - 1] if i else None, sigmas[i], sigmas[i + 1])
                x0_prev = x0
        return x

    @torch.no_grad()
    def decode_latents(self, latents):
        """scaled latents -> images in [0, 1], VAE in float32."""
        with self._vae_fp32():
            x = self.vae.decode(latents.float() / self.vae.cfg.scaling_factor)
        return (x / 2 + 0.5).clamp(0, 1)


# ---- ImageDecoder: resampler over the reversed LLM context, CFG dropout, loss masks, generation ----

class ImageDecoder(nn.Module):
    def __init__(self, unet_cfg: UNetConfig, vae_cfg: VAEConfig, cfg: ImageDecoderConfig):
        super().__init__()
        r = cfg.resampler
        if r.hidden_size != unet_cfg.cross_attention_dim:
            raise InputError(f"resampler hidden_size {r.hidden_size} != UNet cross_attention_dim "
                             f"{unet_cfg.cross_attention_dim}")
        self.cfg = cfg
        self.perceiver_resampler = PerceiverResampler(r)
        self.decoder = StableDiffusion(unet_cfg, vae_cfg, cfg)
        # the original copies SD's text-encoder output for "" here; that comes in with the checkpoint
        self.neg_prompt_embeds = nn.Parameter(torch.randn(1, r.num_queries, r.hidden_size) * 0.02)

    def forward(self, context, context_mask, image_tensors_dec, mmfs_features, mmfs_mask, is_cond_image=None,
                image_loss_mask=None, checkpoint=False, posterior=None, generator=None, uncond_mask=None, **draws):
        """context (B_I, L, D) projected + positions, context_mask (B_I, L) -> scalar loss: mean over ALL elements,
        with images lacking context (is_cond_image False) or masked out contributing zeros to the mean.
        posterior: the VAE's (mean, logvar) of image_tensors_dec, if already encoded (StableDiffusion.forward).
        generator, uncond_mask [B_I] bool (the images whose condition is dropped) and draws (posterior_noise, noise,
        timesteps): see MMInterleaved.forward."""
        B_I = context.shape[0]
        if image_tensors_dec.shape[0] != B_I or context_mask.shape[:2] != context.shape[:2]:
            raise ValueError(f"image_tensors_dec {tuple(image_tensors_dec.shape)}, context {tuple(context.shape)}, "
                             f"context_mask {tuple(context_mask.shape)}: expected B_I={B_I} images and masks (B_I, L)")
        # checked on the host only: on a GPU it would wait for all queued work (the LLM's, in training), and
        # prepare_context_features builds masks that hold at least the soi (it checks start <= soi on the host)
        if context_mask.is_cpu and bool((context_mask.sum(dim=1) == 0).any()):
            raise ValueError(f"context_mask rows {torch.nonzero(context_mask.sum(1) == 0).flatten().tolist()} are "
                             f"empty; every image needs at least its soi token")
        self.decoder.check_images(image_tensors_dec)
        u = self.decoder.unet.cfg
        for k, v in dict(draws, uncond_mask=uncond_mask).items():
            want = (B_I,) if k in ("uncond_mask", "timesteps") else (B_I, u.in_channels, u.sample_size, u.sample_size)
            if v is not None and tuple(v.shape) != want:
                raise ValueError(f"{k}: expected shape {list(want)} (one per image), got {list(v.shape)}")
        cond = self.perceiver_resampler(context, context_mask)  # (B_I, 77, 1024)
        # classifier-free-guidance dropout of the whole condition, per image; like the original, also in eval mode
        if uncond_mask is None and self.cfg.uncond_prob > 0:
            draw = torch.rand(B_I, generator=generator, device=cond.device, dtype=cond.dtype)
            uncond_mask = draw < self.cfg.uncond_prob
        if uncond_mask is not None:
            cond = torch.where(uncond_mask.reshape(B_I, 1, 1), self.neg_prompt_embeds.to(cond.dtype), cond)
        loss = self.decoder(image_tensors_dec, cond, mmfs_features, mmfs_mask, checkpoint, posterior, generator,
                            **draws)                                                          # (B_I, 4, h, w)
        if is_cond_image is None:
            is_cond_image = is_cond_image_of(context_mask)
        loss = loss * is_cond_image.to(loss.dtype)[:, None, None, None]
        if image_loss_mask is not None:
            loss = loss * image_loss_mask.to(loss.dtype).reshape(B_I, 1, 1, 1)
        return loss.mean()

    @torch.no_grad()
    def generate_images(self, context, context_mask, mmfs_features, mmfs_mask, steps=30, guidance_scale=7.5,
                        sampler="ddpm", seed=42, num_images_per_context=1, eta=0.0, progress=True,
                        mmfs_ablation=False, fast=None):
        """-> images (num_images_per_context * B_I, 3, S, S) in [0, 1], copy-major; copy k uses seed + k on one
        generator shared across mini-batches of `generate_mini_bs` contexts (the original's draw order).
        seed may also be a list of B_I ints, one per context: copy k of image i then draws from its own generator
        seeded seed[i] + k, so it is the image a call with that context alone and seed[i] gives (batching many
        prompts changes nothing but float rounding).
        mmfs_ablation: also draw every image without the previous image's features (zero MMFS features and mask,
        as MMInterleaved.generate_images(use_mmfs=False)) in the same UNet batch from the same noise; -> twice
        the images, those with MMFS first, then those without. fast: see StableDiffusion.sample_latents."""
        B_I = context.shape[0]
        if mmfs_mask.shape[0] != B_I or any(f.shape[0] != B_I for f in mmfs_features):
            raise ValueError(f"generate_images: {B_I} contexts but mmfs_mask {tuple(mmfs_mask.shape)} and features "
                             f"{[tuple(f.shape) for f in mmfs_features]}; expected one row per context")
        per_image = isinstance(seed, (list, tuple))
        if per_image and len(seed) != B_I:
            raise ValueError(f"generate_images: {len(seed)} seeds for {B_I} contexts; expected an int or one per "
                             f"context")
        cond = self.perceiver_resampler(context, context_mask)
        uncond = self.neg_prompt_embeds.to(cond.dtype).expand_as(cond)
        mb, images = self.cfg.generate_mini_bs, []
        for k in range(num_images_per_context):
            if per_image:   # each context's own generator
                own = [torch.Generator().manual_seed(int(x) + k) for x in seed]
            else:           # one generator that runs on across the mini-batches
                shared = torch.Generator().manual_seed(seed + k)
            for s in range(0, cond.shape[0], mb):
                generator = own[s:s + mb] if per_image else shared
                c, u, m = cond[s:s + mb], uncond[s:s + mb], mmfs_mask[s:s + mb]
                feats = [f[s:s + mb] for f in mmfs_features]
                if mmfs_ablation:   # (with; without) MMFS as two variants of one batch
                    c, u, m = c.repeat(2, 1, 1), u.repeat(2, 1, 1), torch.cat([m, torch.zeros_like(m)])
                    feats = [torch.cat([f, torch.zeros_like(f)]) for f in feats]
                latents = self.decoder.sample_latents(c, u, feats, m, steps, guidance_scale, sampler, generator, eta,
                                                      progress, variants=2 if mmfs_ablation else 1,
                                                      fast=fast)
                images.append(self.decoder.decode_latents(latents))
        if mmfs_ablation:   # per mini-batch (with; without) -> all with, then all without
            return torch.cat([im.chunk(2)[k] for k in (0, 1) for im in images])
        return torch.cat(images)


def images_to_pil(images: torch.Tensor) -> list:
    """(n, 3, H, W) in [0, 1] -> list of RGB PIL images."""
    arr = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


def pil_to_images(pils: list, size: int) -> torch.Tensor:
    """list of PIL images -> (n, 3, size, size) in [0, 1] (bicubic resize)."""
    arrs = [np.asarray(p.convert("RGB").resize((size, size), Image.BICUBIC), dtype=np.float32) / 255 for p in pils]
    return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).contiguous()


# ---- Inputs of the image decoder from the LLM's output ----

def soi_positions(text_ids: torch.Tensor, soi_id: int):
    """-> rows (B_I,), positions (B_I,) of every soi, row-major = the flattened image order."""
    return torch.nonzero(text_ids == soi_id, as_tuple=True)


def prepare_context_features(h, text_ids, soi_id: int, context_start=None):
    """Image i's context is h[row_i, b_i : soi_i + 1] reversed (soi first), zero-padded to the longest.
    h (B, L, D), context_start (B_I,) per image (None -> 0). -> ctx (B_I, L_max, D), mask (B_I, L_max) long.
    The caller applies context_feat_proj and adds the 1-D sin-cos table PE[:L_max] (padded rows included).
    The positions are worked out where text_ids and context_start are: host copies spare a GPU sync."""
    rows, pos = soi_positions(text_ids, soi_id)
    if rows.numel() == 0:
        raise ValueError("prepare_context_features: text_ids contain no soi token; there is no image to decode")
    start = torch.zeros_like(pos) if context_start is None else torch.as_tensor(context_start, device=pos.device)
    if start.shape != pos.shape or bool((start > pos).any()) or bool((start < 0).any()):
        raise ValueError(f"context_start {start.tolist()} must give one start in [0, soi position] per image; "
                         f"soi positions {pos.tolist()}")
    lengths = pos - start + 1
    L_max = int(lengths.max())
    src = pos[:, None] - torch.arange(L_max, device=pos.device)[None]  # (B_I, L_max): soi, soi-1, ...
    mask = (src >= start[:, None]).long()
    rows, src, mask = (_to_device(t, h.device) for t in (rows, src.clamp(min=0), mask))
    ctx = h[rows[:, None], src] * mask[..., None].to(h.dtype)
    return ctx, mask


def is_cond_image_of(context_mask) -> torch.Tensor:
    """An image learns only with context beyond its own <s><soi>: (B_I,) bool."""
    return context_mask.sum(dim=1) > 2


def prepare_mmfs_features_for_image_decoder(multiscale_feats, text_ids, soi_id: int, context_start=None):
    """Image i sees only image i-1 (flattened order), and only if i-1's soi lies in i's row at or after i's
    context start. multiscale_feats: list of (B_I, C, H_l, W_l) -> list of (B_I, 1, C, H_l, W_l), mask (B_I, 1).
    The positions are worked out where text_ids and context_start are: host copies spare a GPU sync."""
    rows, pos = soi_positions(text_ids, soi_id)
    B_I, L = rows.numel(), text_ids.shape[1]
    if any(f.shape[0] != B_I for f in multiscale_feats):
        raise ValueError(f"multiscale features have {[f.shape[0] for f in multiscale_feats]} images, text_ids have "
                         f"{B_I} soi tokens")
    start = torch.zeros_like(pos) if context_start is None else torch.as_tensor(context_start, device=pos.device)
    flat_soi, flat_start = rows * L + pos, rows * L + start  # the original compares flattened positions
    prev = torch.arange(B_I, device=pos.device) - 1
    has_prev = (prev >= 0) & (flat_soi[prev.clamp(min=0)] >= flat_start)
    device = multiscale_feats[0].device
    prev, has_prev = _to_device(prev.clamp(min=0), device), _to_device(has_prev, device)
    keep = has_prev.to(multiscale_feats[0].dtype)[:, None, None, None]
    feats = [(f[prev] * keep)[:, None] for f in multiscale_feats]
    return feats, has_prev.long()[:, None]


def image_decoder_inputs(h, text_ids, multiscale_feats, soi_id: int, context_feat_proj, context_start=None):
    """Everything ImageDecoder takes from the LLM pass: (context, context_mask, mmfs_features, mmfs_mask).
    context = context_feat_proj(reversed context) + PE_1d[:L_max]; context_start None = row start (generation)."""
    ctx, mask = prepare_context_features(h, text_ids, soi_id, context_start)
    pe = _to_device(get_1d_sincos_pos_embed(ctx.shape[-1], ctx.shape[1]), ctx.device).to(ctx.dtype)
    ctx = context_feat_proj(ctx) + pe  # padded rows get it too; the resampler masks them
    feats, fmask = prepare_mmfs_features_for_image_decoder(multiscale_feats, text_ids, soi_id, context_start)
    return ctx, mask, feats, fmask


def select_target_images(target_image_idxs, context, context_mask, mmfs_features, mmfs_mask):
    """index_select of the images to generate, rejecting slots that do not exist."""
    idx = torch.as_tensor(target_image_idxs, dtype=torch.long, device=context.device).reshape(-1)
    B_I = context.shape[0]
    bad = [i for i in idx.tolist() if not 0 <= i < B_I]
    if bad:
        raise ValueError(f"target_image_idxs {bad} out of range: the batch has {B_I} images (valid 0..{B_I - 1})")
    return context[idx], context_mask[idx], [f[idx] for f in mmfs_features], mmfs_mask[idx]


# ----------------------------------------------------------------------------------------------------------------
# The model: embedding assembly, masks, losses
# ----------------------------------------------------------------------------------------------------------------


def nearest_bos(text_ids, bos_id):
    """[B, L]: position of the last bos at or before each position, -1 if none."""
    pos = torch.arange(text_ids.shape[1], device=text_ids.device).expand_as(text_ids)
    return torch.where(text_ids == bos_id, pos, -1).cummax(dim=1).values


def image_token_starts(text_ids, num_image_per_seq, soi_id):
    """[B, N]: 1 + position of each row's k-th soi (the image's first <|image|> token); -1 in padding slots."""
    B = text_ids.shape[0]
    N = int(num_image_per_seq.max()) if B else 0
    rows, cols = (text_ids == soi_id).nonzero(as_tuple=True)                   # row-major order
    slot = (text_ids == soi_id).long().cumsum(1)[rows, cols] - 1                 # k-th image of its row
    starts = torch.full((B, N), -1, dtype=torch.long, device=text_ids.device)
    starts[rows, slot] = cols + 1
    return starts


def cross_attention_mask(text_ids, num_image_per_seq, soi_id, bos_id):
    """[B, L, N] float: token t sees image k iff the image's tokens start at or before t, after the last bos <= t.

    So a token sees every earlier image of its own document; an image's own 64 tokens see it, its soi does not.
    """
    starts = image_token_starts(text_ids, num_image_per_seq, soi_id)[:, None, :]        # (B, 1, N)
    bos = nearest_bos(text_ids, bos_id)[:, :, None]                                      # (B, L, 1)
    t = torch.arange(text_ids.shape[1], device=text_ids.device)[None, :, None]           # (1, L, 1)
    return ((starts != -1) & (bos < starts) & (starts <= t)).float()


def text_labels(text_ids, attention_mask, cfg: MMIConfig, ignore_prompt_token_offset=0, ignore_noimage_cond=False):
    """Targets [B, L-1] for logits[:, :-1]: -100 where no loss is taken.

    Ignored: the prompt (positions < ignore_prompt_token_offset, an int or one per row); with
    `ignore_noimage_cond`, text with no image before it in its document; then, on the shifted targets, pad
    and <|image|> tokens, padding positions, bos, and a soi right after a bos (an image opening a document is
    not predictable from text). eos and every other soi are learned.
    """
    B, L = text_ids.shape
    labels = text_ids.clone()
    pos = torch.arange(L, device=text_ids.device)[None]
    offset = _to_device(ignore_prompt_token_offset, text_ids.device).reshape(-1)
    if offset.numel() not in (1, B):
        raise ValueError(f"ignore_prompt_token_offset has {offset.numel()} entries, expected 1 or {B} (one per row)")
    labels = labels.masked_fill(pos < offset[:, None], -100)
    if ignore_noimage_cond:
        bos = nearest_bos(text_ids, cfg.bos_token_id).clamp(min=0)
        soi = nearest_bos(text_ids, cfg.soi_token_id)          # same scan, for the last soi
        labels = labels.masked_fill((soi < bos) | (soi == -1), -100)
    labels, nxt = labels[:, 1:], text_ids[:, 1:]
    labels = labels.masked_fill(nxt == cfg.pad_token_id, -100)
    labels = labels.masked_fill(nxt == cfg.image_token_id, -100)
    labels = labels.masked_fill(attention_mask[:, 1:] == 0, -100)
    labels = labels.masked_fill((text_ids[:, :-1] == cfg.bos_token_id) & (nxt == cfg.soi_token_id), -100)
    labels = labels.masked_fill(nxt == cfg.bos_token_id, -100)
    return labels


def pack_per_row(per_image, num_image_per_seq):
    """[B_I, ...] images in row order -> [B, N, ...] with zeros in the padding slots. The slot indexes are worked
    out where num_image_per_seq lives (validate_batch's is on the host: no GPU sync for the shapes)."""
    counts = torch.as_tensor(num_image_per_seq)
    B, N = len(counts), int(counts.max())
    row = torch.repeat_interleave(torch.arange(B, device=counts.device), counts)
    slot = torch.arange(len(row), device=counts.device) - torch.repeat_interleave(counts.cumsum(0) - counts, counts)
    out = per_image.new_zeros((B, N) + per_image.shape[1:])
    out[_to_device(row, per_image.device), _to_device(slot, per_image.device)] = per_image
    return out


# the batch's integer inputs that the training forward reads on the host (checks, shapes, positions): a caller whose
# batch is on a GPU hands in host copies of them, forward(batch, host=...), so that the forward reads nothing back
HOST_KEYS = ("text_ids", "num_image_per_seq", "nearest_bos_idxs")
# the batch keys that give the image loss's random draws instead of drawing them (see MMInterleaved.forward)
DRAW_KEYS = ("uncond_mask", "posterior_noise", "noise", "timesteps")


class MMInterleaved(nn.Module):
    def __init__(self, cfg: MMIConfig):
        super().__init__()
        check_config_ranges(cfg)
        check_config_widths(cfg)
        grid = cfg.vision.grid_size
        map_sides = (4 * grid, 2 * grid, grid, grid // 2)
        if not set(cfg.mmfs.spatial_shapes) <= set(map_sides):
            raise InputError(f"mmfs.spatial_shapes {cfg.mmfs.spatial_shapes}: the visual tokenizer makes maps of "
                             f"sides {map_sides} at image_size {cfg.vision.image_size}")
        if cfg.resampler.num_queries != cfg.num_img_token:
            raise InputError(f"resampler.num_queries {cfg.resampler.num_queries} != num_img_token {cfg.num_img_token}")
        if cfg.resampler.encoder_hidden_size != cfg.vision.hidden_size:
            raise InputError(f"resampler.encoder_hidden_size {cfg.resampler.encoder_hidden_size} != vision.hidden_size "
                             f"{cfg.vision.hidden_size}")
        dec = cfg.image_decoder
        if dec.resampler.encoder_hidden_size != cfg.llm.hidden_size or dec.mmfs_feat_dim != cfg.vision.hidden_size:
            raise InputError(f"image_decoder: resampler.encoder_hidden_size {dec.resampler.encoder_hidden_size} and "
                             f"mmfs_feat_dim {dec.mmfs_feat_dim} must equal llm.hidden_size {cfg.llm.hidden_size} and "
                             f"vision.hidden_size {cfg.vision.hidden_size}")
        if tuple(dec.mmfs_value_sizes) != map_sides:
            raise InputError(f"image_decoder.mmfs_value_sizes {dec.mmfs_value_sizes}: the visual tokenizer makes maps "
                             f"of sides {map_sides}")
        if (cfg.soi_token_id, cfg.image_token_id) != (cfg.llm.vocab_size - 2, cfg.llm.vocab_size - 1):
            raise InputError(f"soi/image ids {cfg.soi_token_id}/{cfg.image_token_id} must be the last two of "
                             f"vocab_size {cfg.llm.vocab_size}")
        self.cfg = cfg
        d = cfg.llm.hidden_size
        self.visual_tokenizer = VisualTokenizer(cfg)
        self.mm_decoder = LlamaModel(cfg)
        self.text_decoder = TextDecoder(cfg)
        self.image_decoder = ImageDecoder(cfg.unet, cfg.vae, cfg.image_decoder)
        self.context_feat_proj = nn.Linear(d, d)
        self.soi_token = nn.Parameter(torch.zeros(1, d))
        self._init_llm_weights()
        self.set_trainable()

    def _init_llm_weights(self):
        # HF's LLaMA init (N(0, 0.02), zero biases) for a model trained from scratch; loading overwrites it
        for m in list(self.mm_decoder.modules()) + [self.text_decoder.head]:
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        for m in self.mm_decoder.modules():
            if isinstance(m, MMFS):
                m.reset_parameters()
        self.text_decoder.reset_new_rows()

    def set_trainable(self):
        """requires_grad from the config's per-component flags (the paper: CLIP and the LLM body frozen)."""
        c = self.cfg
        for name, p in self.named_parameters():
            if name.startswith("visual_tokenizer.encoder.vision_model."):
                adapter = name.split(".")[3].startswith("adapter")
                p.requires_grad_(c.vision.adapter_trainable if adapter else c.vision.trainable)
            elif name.startswith("visual_tokenizer."):
                p.requires_grad_(c.resampler.trainable and name != "visual_tokenizer.pos_embed")
            elif name.startswith("mm_decoder."):
                # every parameter under llama_cross_attn, the MMFS ignore token included, as in the original
                p.requires_grad_(c.mmfs.trainable if "llama_cross_attn" in name else c.llm.trainable)
            elif name.startswith("text_decoder.head."):
                p.requires_grad_(c.llm.trainable)
            elif name.startswith("image_decoder.perceiver_resampler."):
                p.requires_grad_(c.image_decoder.resampler.trainable)
            elif name.startswith("image_decoder.decoder.unet."):
                p.requires_grad_(c.unet.trainable)
            # the VAE, the UNet-MMFS position tables and ignore tokens stay frozen as constructed
        return self

    # -- loading and saving (the work is done in the loading section below) -------------------------------------

    @classmethod
    def from_original(cls, llm=None, clip=None, sd=None, mmi=None, dtype=torch.float32, device="cpu", cfg=None,
                      quantize=None):
        """Build from the released files: llm = the Vicuna folder, clip = openai/clip-vit-large-patch14, sd = a
        stable-diffusion-2(-1)-base folder, mmi = the MM-Interleaved checkpoint folder (overlaid last). A
        checkpoint holding every weight (the released one does) loads alone, mmi=..., shaped by cfg (default the
        `mmi-13b` preset). quantize: None, "int8" or "int4": the layers of quantize_targets quantized as they load."""
        return load_original(llm, clip, sd, mmi, dtype, device, cfg, quantize)

    @classmethod
    def from_pretrained(cls, path, dtype=None, device="cpu", quantize=None):
        """A model written by save_pretrained (safetensors + config.json); a broken folder is an InputError
        naming the file. quantize: as from_original's."""
        return load_pretrained(path, dtype, device, quantize)

    def save_pretrained(self, path, max_shard_bytes=5 * 2 ** 30, dtype=None, extra_files=None):
        """Safetensors shards + config.json, replacing what was at `path` so that a kill at any point leaves the
        previous model or the new one (see write_pretrained). dtype (e.g. torch.bfloat16) stores the
        floating-point weights in that dtype, except the VAE's, which always runs in float32. extra_files
        {name: source path} are copied in too (e.g. the tokenizer)."""
        write_pretrained(self, path, max_shard_bytes, dtype, extra_files)

    # -- inputs ---------------------------------------------------------------------------------------------------

    def validate_batch(self, batch):
        """Raise ValueError, with the numbers, for a batch the model cannot read correctly. The checks read a host
        copy of text_ids (on a GPU: one transfer, not a sync per check; none if the batch's is one already).
        -> num_image_per_seq [B], on the host."""
        c = self.cfg
        text_ids = batch["text_ids"]
        if text_ids.dim() != 2:
            raise ValueError(f"text_ids: expected [B, L], got shape {tuple(text_ids.shape)}")
        ids = text_ids.cpu()
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= c.llm.vocab_size:
            bad = lo if lo < 0 else hi
            where = (ids == bad).nonzero()[0].tolist()
            raise ValueError(f"text_ids: token id {bad} at [row, pos] {where} is outside [0, {c.llm.vocab_size})")
        B = ids.shape[0]
        n_soi = (ids == c.soi_token_id).sum(1)
        n_img_tok = (ids == c.image_token_id).sum(1)
        num = batch.get("num_image_per_seq")
        num = n_soi if num is None else torch.as_tensor(num).cpu()
        if num.shape != (B,):
            raise ValueError(f"num_image_per_seq: expected {B} entries (one per row), got shape {tuple(num.shape)}")
        for b in range(B):
            if int(n_soi[b]) != int(num[b]) or int(n_img_tok[b]) != int(num[b]) * c.num_img_token:
                raise ValueError(f"row {b}: num_image_per_seq says {int(num[b])} images, text has {int(n_soi[b])} "
                                 f"<|beginofimage|> and {int(n_img_tok[b])} <|image|> tokens "
                                 f"(expected {int(num[b]) * c.num_img_token} = {int(num[b])} x {c.num_img_token})")
        limit = c.mmfs.max_num_image_per_seq        # MMFS's relative positions: 0 = no image, then 1, 2, ...
        if B and int(num.max()) >= limit:
            raise ValueError(f"a row has {int(num.max())} images; MMFS sees at most {limit - 1} "
                             f"(max_num_image_per_seq {limit} counts its relative positions, 0 meaning no image)")
        images = batch.get("image_tensors")
        n_images = 0 if images is None else images.shape[0]
        if n_images != int(num.sum()):
            raise ValueError(f"image_tensors holds {n_images} images, num_image_per_seq sums to {int(num.sum())}")
        S = c.vision.image_size
        if images is not None and tuple(images.shape[1:]) != (3, S, S):
            raise ValueError(f"image_tensors: expected [B_I, 3, {S}, {S}], got {tuple(images.shape)}")
        return num

    def prepare_mm_embeds(self, text_ids, image_tensors, num_image_per_seq, host_text_ids=None):
        """Token embeddings with image embeddings put into the <|image|> positions and soi_token added to every
        soi, plus the MMFS inputs. host_text_ids: a host copy of text_ids to find those positions in (else they are
        found in text_ids: on a GPU, a read back). -> embeds [B, L, d], vision_hidden_states [B, N, S, d_v] or None,
        cross_attention_mask [B, L, N] or None, the tokenizer's four maps (list of [B_I, d_v, s, s]) or None."""
        c = self.cfg
        embeds = self.mm_decoder.embed_tokens(text_ids)                          # (B, L, d)
        if image_tensors is None or image_tensors.shape[0] == 0:
            return embeds, None, None, None
        # positions as integer indexes, worked out before the vision encoder is queued: a boolean mask would be
        # turned into indexes on the device, in the backward pass too, and each time the host waits for the GPU
        ids = text_ids if host_text_ids is None else host_text_ids
        xmask = _to_device(cross_attention_mask(ids, num_image_per_seq, c.soi_token_id, c.bos_token_id),
                           text_ids.device)
        rows, cols = (ids == c.image_token_id).nonzero(as_tuple=True)            # row-major: the images' order
        ckpt = c.gradient_checkpointing and self.training
        vis_embed, maps = self.visual_tokenizer(image_tensors.to(embeds.dtype), checkpoint=ckpt)
        embeds = embeds.index_put((_to_device(rows, text_ids.device), _to_device(cols, text_ids.device)),
                                  vis_embed.to(embeds.dtype).reshape(-1, embeds.shape[-1]))
        embeds = embeds + (text_ids == c.soi_token_id)[..., None].to(embeds.dtype) * self.soi_token.to(embeds.dtype)
        # the LLM reads the maps whose sides are in mmfs.spatial_shapes, each flattened row-major, concatenated
        chosen = [m for m in maps if m.shape[-1] in c.mmfs.spatial_shapes]
        tokens = torch.cat([m.flatten(2).transpose(1, 2) for m in chosen], dim=1)           # (B_I, S, d_v)
        vision = pack_per_row(tokens, num_image_per_seq)                                    # (B, N, S, d_v)
        return embeds, vision, xmask.to(embeds.dtype), maps

    # -- training -------------------------------------------------------------------------------------------------

    def forward(self, batch, host=None, generator=None):
        """The training losses of a batch of B rows of L tokens holding B_I images in all (row-major order) ->
        {"loss", "loss_txt", "loss_img" (when the image decoder ran)}. The batch's keys (all but text_ids optional):

            text_ids [B, L] long              tokens; an image is <|beginofimage|> then num_img_token <|image|>
            attention_mask [B, L]             1 = a real token (default: all)
            image_tensors [B_I, 3, S, S]      the images in [0, 1], S = vision.image_size
            image_tensors_dec [B_I, 3, S', S']  the image decoder's targets, S' = image_decoder.image_size
                                              (default: image_tensors)
            num_image_per_seq [B] long        images per row (default: counted in text_ids)
            nearest_bos_idxs [B_I] long       where each image's context starts (default: its row's start)
            gt_text_ids [B, L] long           text targets, -100 = no loss (default: text_labels of text_ids)
            image_loss_mask [B_I]             0 leaves an image out of the image loss
            loss_txt_weight, loss_img_weight  floats (default: the config's); loss_img_weight 0 skips the image
                                              decoder
            ignore_prompt_token_offset        int or [B]: positions before it take no text loss (default 0)
            meta["dataset_name"]              str: one in dataset_to_ignore_noimage_cond_loss takes no loss on text
                                              that no image precedes in its document
            uncond_mask [B_I] bool            the images whose condition the image decoder drops (classifier-free
                                              guidance training; default: drawn, each with uncond_prob)
            posterior_noise [B_I, C, h, w]    the N(0, 1) draws of the VAE posterior's sample, latents = mean + std *
                                              them (default: drawn); C, h, w: the UNet's in_channels, sample_size
            noise [B_I, C, h, w]              the diffusion noise added to the latents (default: drawn)
            timesteps [B_I] long              the diffusion timesteps in 0..num_train_timesteps-1 (default: drawn)

        host: {key: numpy array or CPU tensor}, host copies of the batch's HOST_KEYS for a batch on a GPU. The
        checks and the image and context positions are read from them; without them the forward makes its own
        once, before it queues any work (on a GPU a read of the device waits for all work queued before it).

        generator: a torch.Generator on the batch's device that makes the random draws, in place of the global RNG,
        in the original's order: the condition drop (B_I uniforms, < uncond_prob drops), the posterior's noise (in
        chunks of vae_encode_mini_bs images), the diffusion noise, the timesteps. A draw given as a batch key above
        is not made; the others keep their order. So the same generator seed gives the same loss whatever the
        global RNG holds (in training the visual Q-Former's dropout, resampler.dropout, still draws from that)."""
        c = self.cfg
        host = {k: torch.as_tensor((host or {}).get(k, batch[k])).cpu() for k in HOST_KEYS if batch.get(k) is not None}
        num = self.validate_batch({**batch, **host})
        text_ids = batch["text_ids"]
        embeds, vision, xmask, maps = self.prepare_mm_embeds(text_ids, batch.get("image_tensors"), num,
                                                             host["text_ids"])
        w_img = batch.get("loss_img_weight")
        w_img = c.loss_img_weight if w_img is None else w_img
        with_image_loss = maps is not None and w_img != 0   # text-only batches (captioning) skip the image decoder
        # The frozen VAE encodes the target images before the LLM runs, so that its float32 activations at full
        # resolution (3 GiB a tensor for 24 images at 512x512) never sit on top of the LLM's. Its random draw stays
        # where the original makes it, in the image decoder's forward.
        posterior = self.image_decoder.decoder.encode_posterior(self.decoder_images(batch)) if with_image_loss else None
        # positions run 0..L-1 over the packed row, as the original's forward; in training attention is causal over
        # all of it (the original's flash-attn path), at inference the padding keys are hidden (see hidden_states)
        pos = torch.arange(text_ids.shape[1], device=text_ids.device).expand_as(text_ids)
        mask = batch.get("attention_mask")
        attn = None if self.training or mask is None else padding_attention_mask(mask)
        h = self.mm_decoder(embeds, pos, vision, xmask, attn_mask=attn, checkpoint=c.gradient_checkpointing)

        loss_txt = self.text_loss(batch, h)
        w_txt = batch.get("loss_txt_weight")
        loss = (c.loss_txt_weight if w_txt is None else w_txt) * loss_txt
        out = {"loss_txt": loss_txt.detach()}
        if with_image_loss:
            loss_img = self.image_loss(batch, h, maps, posterior, host, generator)
            loss = loss + w_img * loss_img
            out["loss_img"] = loss_img.detach()
        out["loss"] = loss
        return out

    def text_loss(self, batch, h):
        """The mean next-token cross-entropy of the text head on h [B, L, d] over the text targets: gt_text_ids, or
        text_labels of text_ids. A batch with no target gives 0, not NaN."""
        c, text_ids, mask = self.cfg, batch["text_ids"], batch.get("attention_mask")
        logits = self.text_decoder(h).float()
        if batch.get("gt_text_ids") is not None:
            labels = batch["gt_text_ids"][:, 1:]
        else:
            meta = batch.get("meta") or {}
            labels = text_labels(text_ids, torch.ones_like(text_ids) if mask is None else mask, c,
                                 batch.get("ignore_prompt_token_offset", 0),
                                 meta.get("dataset_name") in c.dataset_to_ignore_noimage_cond_loss)
        loss_sum = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                   ignore_index=-100, reduction="sum")
        return loss_sum / (labels != -100).sum().clamp(min=1)

    def hidden_states(self, batch, attention_mask_aware=False):
        """The LLM's last hidden states [B, L, d] at inference, as the original's LLaMA computes them in eval mode:
        positions 0..L-1 and, with an attention_mask, every query attending causally to the real tokens only (a
        query with none, a left pad, attends uniformly to all L keys; see attention). attention_mask_aware: positions
        count the real tokens only (pads get 1), as generation's prompt pass. -> h, the tokenizer's maps or None."""
        num = self.validate_batch(batch)
        text_ids = batch["text_ids"]
        embeds, vision, xmask, maps = self.prepare_mm_embeds(text_ids, batch.get("image_tensors"), num)
        mask = batch.get("attention_mask")
        pos, attn = torch.arange(text_ids.shape[1], device=text_ids.device).expand_as(text_ids), None
        if mask is not None:
            real_pos, attn = _positions_and_mask(mask)
            pos = real_pos if attention_mask_aware else pos
        return self.mm_decoder(embeds, pos, vision, xmask, attn_mask=attn), maps

    def text_logits(self, batch, attention_mask_aware=False):
        """Full-sequence logits [B, L, V] in float32 (no cache) of hidden_states: for scoring and for tests."""
        return self.text_decoder(self.hidden_states(batch, attention_mask_aware)[0]).float()

    @staticmethod
    def decoder_images(batch):
        """The images the image decoder learns to draw: image_tensors_dec, else image_tensors."""
        images = batch.get("image_tensors_dec")
        return batch["image_tensors"] if images is None else images

    def image_loss(self, batch, h, maps, posterior=None, host_batch=None, generator=None):
        """The diffusion loss of every image given its context. h: the LLM's last hidden
        state [B, L, d]; maps: the tokenizer's four maps of every image; posterior: the VAE's encoding of the
        decoder images (StableDiffusion.encode_posterior), if made already; host_batch: host copies of text_ids and
        nearest_bos_idxs to work out the contexts' positions from (reading them on a GPU now would wait for the LLM);
        generator and the batch's draws: see forward."""
        c = self.cfg
        images = self.decoder_images(batch)
        where = host_batch or batch
        ctx, mask, feats, fmask = image_decoder_inputs(h, where["text_ids"], maps, c.soi_token_id,
                                                       self.context_feat_proj, where.get("nearest_bos_idxs"))
        draws = {k: batch[k] for k in DRAW_KEYS if batch.get(k) is not None}
        return self.image_decoder(ctx, mask, images, feats, fmask, image_loss_mask=batch.get("image_loss_mask"),
                                  checkpoint=c.gradient_checkpointing and self.training, posterior=posterior,
                                  generator=generator, **draws)

    # -- generation -----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate_images(self, batch, target_image_idxs=None, steps=30, guidance_scale=7.5, sampler="ddpm", seed=42,
                        num_images_per_context=1, eta=0.0, progress=True, use_mmfs=True, fast=None):
        """Draw the images of the batch's image slots (all, or `target_image_idxs`, flat indexes over the batch)
        from their contexts (row start .. soi) and the previous image's features. A target slot still
        holds a placeholder image; it cannot influence its own generation. use_mmfs=False drops the previous
        image's features from the UNet (the ablation of the paper's consistency claim); use_mmfs="both" draws each
        image with and without them from the same noise in one UNet batch (all with, then all without).
        seed: an int, or a list with one per target image (each then draws as it would in a call of its own).
        fast: the sampler's fast form (None = on a GPU with kernels.cu; see StableDiffusion.sample_latents).
        -> {"image": [n, 3, S, S] in [0, 1]}, copy-major when num_images_per_context > 1."""
        text_ids = batch["text_ids"]
        if target_image_idxs is None:
            target_image_idxs = batch.get("target_image_idxs")
        h, maps = self.hidden_states(batch)
        if maps is None:
            raise ValueError("generate_images: the batch has no image slot (no <|beginofimage|> in text_ids)")
        ctx, mask, feats, fmask = image_decoder_inputs(h, text_ids, maps, self.cfg.soi_token_id, self.context_feat_proj)
        if target_image_idxs is not None:
            ctx, mask, feats, fmask = select_target_images(target_image_idxs, ctx, mask, feats, fmask)
        if use_mmfs not in (True, False, "both"):
            raise ValueError(f"use_mmfs={use_mmfs!r}, expected True, False or 'both'")
        if use_mmfs is False:
            feats, fmask = [torch.zeros_like(f) for f in feats], torch.zeros_like(fmask)
        images = self.image_decoder.generate_images(ctx, mask, feats, fmask, steps=steps, guidance_scale=guidance_scale,
                                                    sampler=sampler, seed=seed,
                                                    num_images_per_context=num_images_per_context, eta=eta,
                                                    progress=progress, mmfs_ablation=use_mmfs == "both",
                                                    fast=fast)
        return {"image": images}

    @torch.no_grad()
    def generate_texts(self, batch, max_new_tokens=30, min_new_tokens=7, num_beams=5, do_sample=False, top_p=0.9,
                       top_k=50, temperature=1.0, repetition_penalty=1.0, length_penalty=1.0, num_return_sequences=1,
                       keep_stop_token=False, seed=None, use_cache=True, fast=None, compile=False):
        """Continue each (left-padded) prompt of the batch; stop at eos or soi (the model asking for an image).

        Defaults are the original's (its min_length 8 counted a dummy bos, hence min_new_tokens 7). Greedy with
        num_beams=1, do_sample=False; sampling with do_sample=True, through HF generate's warpers in its order:
        temperature, then top-k (the original sets none, so HF's default 50 applies; 0 or None = off), then top-p
        over what top-k kept; beam search with num_beams > 1. A greedy or sampled text ends with the stop token
        that ended it. Beam search, as the original: a finished hypothesis ends with eos whichever stop token
        ended it, so it never asks for an image; keep_stop_token=True ends it with its own stop token instead
        (a beam that ended on soi then asks for an image, as a sampled text does).
        use_cache=False recomputes the whole sequence per token (slow, for checks). fast (None = on a GPU with
        kernels.cu, see use_fast): FastDecoder, whose cached step is replayed as one CUDA graph on a GPU.
        compile=True also runs that step through torch.compile, which fuses its small element-wise kernels (norms,
        rotary, residuals); the first call pays the compilation (minutes at 13B; a second prompt length
        compiles once more), later calls reuse it.
        Returns {"text_ids": [B * num_return_sequences, T] new tokens (a finished text's last one its stop token
        as above), padded with pad_token_id, "lengths": [B * num_return_sequences]}.
        """
        num = self.validate_batch(batch)
        text_ids = batch["text_ids"]
        mask = batch.get("attention_mask")
        mask = torch.ones_like(text_ids) if mask is None else mask
        embeds, vision, xmask, _ = self.prepare_mm_embeds(text_ids, batch.get("image_tensors"), num)
        fast = use_cache and use_fast(fast, embeds.device)
        if compile and not fast:
            raise ValueError("compile=True compiles the fast path's cached step: it needs use_cache=True and the fast "
                             "path (a GPU with kernels.cu, or fast=True)")
        if fast:
            decoder = FastDecoder(self, embeds, mask, vision, xmask, max_new_tokens, compile=compile)
        else:
            decoder = _Decoder(self, embeds, mask, vision, xmask, max_new_tokens, use_cache)
        opts = dict(max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                    repetition_penalty=repetition_penalty, stop_ids=(self.cfg.eos_token_id, self.cfg.soi_token_id),
                    bos_id=self.cfg.bos_token_id, pad_id=self.cfg.pad_token_id)
        if num_beams > 1 and not do_sample:
            seqs = beam_search(decoder, num_beams, num_return_sequences, length_penalty,
                               keep_stop_token=keep_stop_token, **opts)
        else:
            gen = None if seed is None else torch.Generator().manual_seed(seed)
            warp = dict(temperature=temperature, top_k=top_k, top_p=top_p) if do_sample else None
            seqs = greedy_or_sample(decoder, num_return_sequences, warp, gen, **opts)
        T = max((len(s) for s in seqs), default=0)
        out = torch.full((len(seqs), T), self.cfg.pad_token_id, dtype=torch.long, device=text_ids.device)
        for i, s in enumerate(seqs):
            out[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        return {"text_ids": out, "lengths": torch.tensor([len(s) for s in seqs])}


def padding_attention_mask(mask):
    """mask [B, L] (1 = a real token) -> bool [B, 1, L, L]: query i may attend to key j iff j <= i and j is a real
    token, the original's causal mask plus padding mask at inference."""
    L = mask.shape[1]
    causal = torch.ones(L, L, dtype=torch.bool, device=mask.device).tril()
    return (causal[None] & mask.bool()[:, None, :])[:, None]


def _positions_and_mask(mask):
    """Left-padded prompts: positions count real tokens only (pads get 1, as HF does), and padding_attention_mask."""
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1), padding_attention_mask(mask)


# ----------------------------------------------------------------------------------------------------------------
# Loading: the released files (Vicuna, CLIP ViT-L/14, SD-2 base, MM-Interleaved) and our own format
# ----------------------------------------------------------------------------------------------------------------




# -- readers: one folder of weights, in any of the layouts the hub uses --------------------------------------------

# (index json, single file) per layout, in the order they are preferred (safetensors first, as transformers does)
_LAYOUTS = {
    "transformers": [("model.safetensors.index.json", "model.safetensors"),
                     ("pytorch_model.bin.index.json", "pytorch_model.bin")],
    "diffusers": [("diffusion_pytorch_model.safetensors.index.json", "diffusion_pytorch_model.safetensors"),
                  ("diffusion_pytorch_model.bin.index.json", "diffusion_pytorch_model.bin")],
}


def read_json(path):
    if not os.path.isfile(path):
        raise InputError(f"{path}: file not found")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not valid JSON ({e})") from None
    except RecursionError:
        raise InputError(f"{path}: nested too deeply to read") from None
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror})") from None


def _load_bin(path):
    """A torch.save'd state dict, memory-mapped; only tensors are accepted (nothing in the pickle is executed)."""
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:
        # UnpicklingError: a non-tensor object; RuntimeError: not a zip-format torch.save file (pre-zip, truncated)
        raise InputError(f"{path}: refused by torch.load(weights_only=True, mmap=True): {torch_load_reason(e)}. "
                         f"Only zip-format files holding a flat dict of tensors are read") from None
    if not isinstance(sd, dict):
        raise InputError(f"{path}: holds a {type(sd).__name__}, expected a dict of tensors")
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            raise InputError(f"{path}: key {k!r} holds a {type(v).__name__}, expected a tensor")
    return sd


def torch_load_reason(e):
    """What torch.load's error says is wrong, in one sentence (its text is several lines, with terminal escapes)."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(e).splitlines()]
    lines = [line for line in lines if line] or [type(e).__name__]
    if lines[0].startswith("mmap can only be used with files saved with"):
        return "not a zip-format torch.save file (a legacy-format or truncated one)"
    line = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("WeightsUnpickler error:")),
                lines[0])
    return line.split(". ")[0].rstrip(".")


def _drop_mapped_pages(t):
    """Give back the resident file pages under `t` (a view of a MAP_PRIVATE file mapping, never written to): they
    would otherwise count in RSS until the whole shard is unmapped. A later read faults them in from the file again.
    Only the page-aligned interior is dropped; Linux only, elsewhere nothing happens."""
    if _LIBC is None:
        return
    storage = t.untyped_storage()
    begin, end = storage.data_ptr(), storage.data_ptr() + storage.nbytes()
    begin, end = -(-begin // _PAGE) * _PAGE, end // _PAGE * _PAGE
    if end > begin:
        _LIBC.madvise(ctypes.c_void_p(begin), ctypes.c_size_t(end - begin), _MADV_DONTNEED)


def _libc_with_madvise():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        return libc
    except (OSError, AttributeError):
        return None


_LIBC, _PAGE, _MADV_DONTNEED = _libc_with_madvise(), mmap.PAGESIZE, 4        # MADV_DONTNEED is 4 on Linux


class _BinShard:
    """dict-like view of a memory-mapped .bin. The tensors handed out are the mapped ones; the previous one's file
    pages are dropped when the next is asked for, so only one tensor of the shard is resident at a time."""

    def __init__(self, sd):
        self.sd, self.last = sd, None

    def __getitem__(self, k):
        if self.last is not None:
            _drop_mapped_pages(self.last)
        self.last = self.sd[k]
        return self.last

    def keys(self):
        return self.sd.keys()


_SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


_SAFETENSORS_MAX_HEADER = 100_000_000                     # the safetensors library refuses longer headers


def read_safetensors_header(path):
    """{key: (dtype, shape, begin, end)} of a safetensors file, begin/end absolute byte offsets, every entry checked
    against the format and the file's size. Layout: 8-byte little-endian header length, JSON header, data."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little") if size >= 8 else -1
        if not 0 < n <= min(size - 8, _SAFETENSORS_MAX_HEADER):
            raise InputError(f"{path}: not a safetensors file (header length {n}, file size {size} bytes; the "
                             f"header is at most {_SAFETENSORS_MAX_HEADER} bytes)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InputError(f"{path}: safetensors header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise InputError(f"{path}: safetensors header is a {type(header).__name__}, expected a JSON object")
    return {k: _safetensors_entry(path, k, v, 8 + n, size) for k, v in header.items() if k != "__metadata__"}


def _safetensors_entry(path, k, v, data_start, size):
    where = f"{path}: key {k!r}"
    if not isinstance(v, dict) or v.get("dtype") not in _SAFETENSORS_DTYPES:
        got = v.get("dtype") if isinstance(v, dict) else v
        raise InputError(f"{where}: dtype {got!r}, expected one of {', '.join(_SAFETENSORS_DTYPES)}")
    shape, offsets = v.get("shape"), v.get("data_offsets")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise InputError(f"{where}: shape {shape!r}, expected a list of non-negative integers")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= size - data_start):
        raise InputError(f"{where}: data_offsets {offsets!r} outside the {size - data_start} data bytes of the file")
    dtype = _SAFETENSORS_DTYPES[v["dtype"]]
    nbytes = math.prod(shape) * dtype.itemsize
    if offsets[1] - offsets[0] != nbytes:
        raise InputError(f"{where}: data_offsets {offsets} span {offsets[1] - offsets[0]} bytes, shape {shape} of "
                         f"{v['dtype']} needs {nbytes}")
    return dtype, tuple(shape), data_start + offsets[0], data_start + offsets[1]


class WeightFiles:
    """The weights in one folder: which file holds which key, and each file's tensors one shard at a time.

    Layouts: a single `.safetensors`/`.bin`, or shards named by an index json (`weight_map`), for transformers
    (`model.*`, `pytorch_model.*`) and diffusers (`diffusion_pytorch_model.*`) names alike. `.bin` files are read
    with torch.load(weights_only=True, mmap=True) only, safetensors with plain reads at the header's offsets; either
    way no shard stays resident, so loading costs the model plus one tensor.
    """

    def __init__(self, folder, layout="transformers"):
        if not os.path.isdir(folder):
            raise InputError(f"{folder}: not a folder")
        self.folder = folder
        for index_name, single_name in _LAYOUTS[layout]:
            index, single = os.path.join(folder, index_name), os.path.join(folder, single_name)
            if os.path.isfile(index):
                self.key_file = self._read_index(index)
                break
            if os.path.isfile(single):
                self.key_file = {k: single for k in self._keys_of(single)}
                break
            for name in (index, single):
                if os.path.exists(name):
                    raise InputError(f"{name}: not a file, expected the weights")
        else:
            wanted = ", ".join(n for pair in _LAYOUTS[layout] for n in pair)
            raise InputError(f"{folder}: no weights found (looked for {wanted})")
        self.files = list(dict.fromkeys(self.key_file.values()))             # shard order as in the index

    @staticmethod
    def _read_index(index):
        weight_map = _json_object(read_json(index), index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise InputError(f"{index}: no 'weight_map' of key -> shard file")
        folder = os.path.dirname(index)
        for shard in dict.fromkeys(weight_map.values()):
            if not isinstance(shard, str) or os.path.basename(shard) != shard:
                raise InputError(f"{index}: shard name {shard!r} is not a plain file name in this folder")
            if not os.path.isfile(os.path.join(folder, shard)):
                raise InputError(f"{index}: names shard {shard!r}, which is missing from {folder}")
        return {k: os.path.join(folder, f) for k, f in weight_map.items()}

    @staticmethod
    def _keys_of(path):
        if path.endswith(".safetensors"):
            return list(read_safetensors_header(path))
        return list(_load_bin(path))

    def shapes(self):
        """{key: shape} from the files' headers (safetensors) or their memory-mapped tensors (.bin)."""
        out = {}
        for path in self.files:
            if path.endswith(".safetensors"):
                out.update((k, shape) for k, (_, shape, _, _) in read_safetensors_header(path).items())
            else:
                out.update((k, tuple(v.shape)) for k, v in _load_bin(path).items())
        self._check_against_index(out)
        return out

    def _check_against_index(self, found):
        for k, path in self.key_file.items():
            if k not in found:
                raise InputError(f"{path}: key {k!r} is named by the index but not in the file")
        for k in found:
            if k not in self.key_file:
                raise InputError(f"{self.folder}: key {k!r} is in a shard but not in the index")

    def shards(self):
        """Yields (path, {key: tensor}) one file at a time; a tensor is read only when asked for and is valid
        only until the next one is: the caller copies it (to its dtype and device) at once."""
        for path in self.files:
            if path.endswith(".safetensors"):
                with open(path, "rb") as f:
                    yield path, _SafetensorsShard(path, f)
            else:
                yield path, _BinShard(_load_bin(path))


class _SafetensorsShard:
    """dict-like view of an open safetensors file. Tensors are read with plain file I/O, not memory-mapped: mapped
    pages would stay resident (and count in RSS) until the whole shard is closed. Each is read into one buffer
    reused for the whole shard, so a tensor is valid only until the next one is asked for: copy it. (A fresh buffer
    per tensor, freed between the model's own allocations, would stay with the allocator as unusable gaps.)"""

    def __init__(self, path, f):
        self.path, self.f, self.header = path, f, read_safetensors_header(path)
        self.scratch = None

    def __getitem__(self, k):
        dtype, shape, begin, end = self.header[k]
        if self.scratch is None:
            self.scratch = torch.empty(max((e - b for _, _, b, e in self.header.values()), default=0),
                                       dtype=torch.uint8)
        buf = self.scratch[:end - begin]
        view = memoryview(buf.numpy())
        self.f.seek(begin)
        done = 0
        while done < end - begin:                                # one read(2) stops short of 2 GiB
            n = self.f.readinto(view[done:])
            if not n:
                raise InputError(f"{self.path}: key {k!r}: file ends after {done} of its {end - begin} bytes")
            done += n
        return buf.view(dtype).view(shape)                      # bytes -> (*shape) of the file's dtype

    def keys(self):
        return self.header.keys()


# -- config: ours, derived from the files' config.json ----------------------------------------------------------


def _get(d, key, default, where):
    """d[key], else the transformers class default (absent keys are the library's defaults); a value given must
    have the default's type (the rules of --key=value overrides: an int may stand for a float)."""
    if key in d and d[key] is not None:
        return _check_like(default, d[key], f"{where}: {key!r}")
    if default is None:
        raise InputError(f"{where}: no {key!r}")
    return default


def _need(d, key, like, where):
    """d[key], which must be there, of the type of `like`."""
    if key not in d or d[key] is None:
        raise InputError(f"{where}: no {key!r}")
    return _check_like(like, d[key], f"{where}: {key!r}")


def _json_object(d, where):
    if not isinstance(d, dict):
        raise InputError(f"{where}: holds a JSON {type(d).__name__}, expected an object")
    return d


def llm_config_from_hf(d, where="config.json"):
    """Our LLMConfig from a transformers LlamaConfig dict; the vocabulary grows by soi and image."""
    d = _json_object(d, where)
    heads = _get(d, "num_attention_heads", 32, where)
    hidden = _get(d, "hidden_size", 4096, where)
    if heads <= 0 or hidden % heads:
        raise InputError(f"{where}: hidden_size {hidden} is not a multiple of num_attention_heads {heads}")
    checks = {"hidden_act": ("silu", d.get("hidden_act", "silu")),
              "num_key_value_heads": (heads, d.get("num_key_value_heads") or heads),
              "rope_scaling": (None, d.get("rope_scaling")),
              "tie_word_embeddings": (False, d.get("tie_word_embeddings", False)),
              "attention_bias": (False, d.get("attention_bias", False)),
              "mlp_bias": (False, d.get("mlp_bias", False)),
              "head_dim": (hidden // heads, d.get("head_dim") or hidden // heads)}
    for key, (expected, found) in checks.items():
        if found != expected:
            raise InputError(f"{where}: {key} is {found!r}, this LLaMA supports only {expected!r}")
    return dict(vocab_size=_get(d, "vocab_size", 32000, where) + 2,
                hidden_size=hidden, intermediate_size=_get(d, "intermediate_size", 11008, where),
                num_hidden_layers=_get(d, "num_hidden_layers", 32, where), num_attention_heads=heads,
                rms_norm_eps=float(_get(d, "rms_norm_eps", 1e-6, where)),
                rope_theta=float(_get(d, "rope_theta", 10000.0, where)),
                max_position_embeddings=_get(d, "max_position_embeddings", 2048, where))


def vision_config_from_hf(d, where="config.json"):
    """Our VisionConfig fields from a transformers CLIPConfig (its vision_config) or CLIPVisionConfig dict."""
    d = _json_object(d, where)
    v = d.get("vision_config", d) if d.get("model_type", "clip") == "clip" else d
    where = f"{where} vision_config"
    v = _json_object(v, where)
    act = v.get("hidden_act", "quick_gelu")
    if act != "quick_gelu":
        raise InputError(f"{where}: hidden_act is {act!r}, CLIP ViT-L/14 uses 'quick_gelu'")
    return dict(image_size=_get(v, "image_size", 224, where), patch_size=_get(v, "patch_size", 32, where),
                hidden_size=_get(v, "hidden_size", 768, where),
                num_hidden_layers=_get(v, "num_hidden_layers", 12, where),
                num_attention_heads=_get(v, "num_attention_heads", 12, where),
                intermediate_size=_get(v, "intermediate_size", 3072, where),
                layer_norm_eps=float(_get(v, "layer_norm_eps", 1e-5, where)))


def config_from_original(llm, clip, sd=None, base: MMIConfig = None) -> MMIConfig:
    """Our config from the files' configs: LLM, CLIP, UNet, VAE and noise schedule shapes from their config.json;
    what MM-Interleaved adds (adapter, both Q-Formers, MMFS) from `base` (the paper's `mmi-13b` preset by default),
    with its input widths following the files. New ids: soi and image after the LLM's vocabulary, pad = its last
    ordinary piece (31999 for Vicuna, as the original forces). A folder not given (None) leaves its part's shapes,
    and for the LLM the token ids, as `base` has them."""
    base = base or MMIConfig.from_preset("mmi-13b")
    llm_cfg, vision, ids = base.llm, base.vision, {}
    if llm is not None:
        lpath = os.path.join(llm, "config.json")
        lc = read_json(lpath)
        llm_cfg = dataclasses.replace(base.llm, **llm_config_from_hf(lc, lpath))
        V = llm_cfg.vocab_size - 2
        ids = dict(bos_token_id=_get(lc, "bos_token_id", 1, lpath), eos_token_id=_get(lc, "eos_token_id", 2, lpath),
                   pad_token_id=V - 1, soi_token_id=V, image_token_id=V + 1)
    if clip is not None:
        cpath = os.path.join(clip, "config.json")
        vision = dataclasses.replace(base.vision, **vision_config_from_hf(read_json(cpath), cpath))
    unet, vae, dec = base.unet, base.vae, base.image_decoder
    if sd is not None:
        upath, vpath = os.path.join(sd, "unet", "config.json"), os.path.join(sd, "vae", "config.json")
        unet = dataclasses.replace(unet_config_from_diffusers(read_json(upath), upath), trainable=base.unet.trainable)
        vae = vae_config_from_diffusers(read_json(vpath), vpath)
        dec = dataclasses.replace(dec, **schedule_config_from_diffusers(
            os.path.join(sd, "scheduler", "scheduler_config.json")))
    G = vision.grid_size
    dec = dataclasses.replace(
        dec, image_size=unet.sample_size * 2 ** (len(vae.block_out_channels) - 1),
        resampler=dataclasses.replace(dec.resampler, encoder_hidden_size=llm_cfg.hidden_size,
                                      hidden_size=unet.cross_attention_dim),
        mmfs_feat_dim=vision.hidden_size, mmfs_value_sizes=(4 * G, 2 * G, G, G // 2))
    return dataclasses.replace(base, llm=llm_cfg, vision=vision, unet=unet, vae=vae, image_decoder=dec,
                               resampler=dataclasses.replace(base.resampler, encoder_hidden_size=vision.hidden_size),
                               **ids)


def schedule_config_from_diffusers(path):
    """The noise schedule fields of ImageDecoderConfig from SD's scheduler_config.json (diffusers' defaults when
    absent): SD-2's scaled-linear schedule, predicting eps (SD-2 base) or v (SD-2 at 768)."""
    sc = _json_object(read_json(path), path)
    if sc.get("beta_schedule", "linear") != "scaled_linear":
        raise InputError(f"{path}: beta_schedule is {sc.get('beta_schedule', 'linear')!r}, the decoder supports only "
                         f"'scaled_linear'")
    if sc.get("prediction_type", "epsilon") not in PREDICTION_TYPES:
        raise InputError(f"{path}: prediction_type is {sc['prediction_type']!r}, expected one of "
                         f"{', '.join(map(repr, PREDICTION_TYPES))}")
    return dict(num_train_timesteps=_get(sc, "num_train_timesteps", 1000, path),
                beta_start=_get(sc, "beta_start", 0.0001, path), beta_end=_get(sc, "beta_end", 0.02, path),
                steps_offset=_get(sc, "steps_offset", 0, path), prediction_type=sc.get("prediction_type", "epsilon"))


# -- key maps: file key -> our key, and what is deliberately left out --------------------------------------------

# File keys the model does not use, per component, and why. Anything else unmapped is an error.
IGNORED_FILE_KEYS = {
    "llm": {"model.layers.*.self_attn.rotary_emb.inv_freq": "RoPE tables are computed in code (rope_cos_sin)"},
    "clip": {"text_model.*": "CLIP's text tower: only the vision tower is used",
             "text_projection.*": "text tower", "visual_projection.*": "CLIP's joint-space projection, unused",
             "logit_scale": "contrastive temperature, unused",
             "vision_model.post_layernorm.*": "the original replaces CLIP's post-LayerNorm by Identity"},
    "text_encoder": {"text_model.embeddings.position_ids": "positions 0..76 are computed in code"},
    "unet": {}, "vae": {}, "mmi": {},
}

# Our tensors that no original file holds, and where their values come from. Anything else not loaded is an error.
NEW_TENSORS = {
    "visual_tokenizer.encoder.vision_model.adapter_*": "ViT-Adapter, new (model init)",
    "visual_tokenizer.encoder.vision_model.embeddings.position_ids": "arange, when the CLIP file lacks it",
    "visual_tokenizer.pos_embed": "fixed 2-D sin-cos table", "visual_tokenizer.clip_*": "CLIP mean/std constants",
    "visual_tokenizer.pos_proj.*": "new", "visual_tokenizer.pos_ln.*": "new", "visual_tokenizer.post_ln.*": "new",
    "visual_tokenizer.proj.*": "new", "visual_tokenizer.perceiver_resampler.*": "visual Q-Former, new",
    "mm_decoder.layers.*.llama_cross_attn.*": "MMFS blocks of the LLM, new (MMFS init)",
    "text_decoder.head.bias": "0, and -100 for the new tokens (the paper's init)",
    "text_decoder.head_new.*": "weight 0, bias 95 (the paper's init)",
    "context_feat_proj.*": "new (PyTorch Linear init)", "soi_token": "zeros",
    "image_decoder.perceiver_resampler.*": "image-side Q-Former, new",
    "image_decoder.decoder.mmfs_module.*": "UNet-MMFS, new (conv zero-init)",
    "image_decoder.neg_prompt_embeds": "SD's text encoder output for the empty prompt",
}

# Our tensors whose first rows come from a file with fewer rows; the rest are the new tokens (soi, image).
ROW_EXTENDED = {"mm_decoder.embed_tokens.weight", "text_decoder.head.weight"}


def _vicuna_key(k):
    if k.startswith("model."):
        return "mm_decoder." + k[len("model."):]
    return {"lm_head.weight": "text_decoder.head.weight"}.get(k, "")


def _clip_key(k):
    return "visual_tokenizer.encoder." + k if k.startswith("vision_model.") else ""


def _prefixed(prefix):
    return lambda k: prefix + k


# component -> file key -> our key ("" = no such key of ours: an error unless ignored)
KEY_MAPS = {
    "llm": _vicuna_key, "clip": _clip_key,
    "unet": _prefixed("image_decoder.decoder.unet."),
    "vae": lambda k: "image_decoder.decoder.vae." + legacy_vae_key(k),
    "mmi": lambda k: legacy_vae_key(k) if ".vae." in k else k,
}


def _ignored(component, key):
    return next((why for pat, why in IGNORED_FILE_KEYS[component].items() if fnmatch.fnmatchcase(key, pat)), None)


def plan_component(component, file_shapes, our_shapes, where):
    """{file key: our key or None (ignored)} for one component, checked against our shapes.

    file_shapes {key: shape}; our_shapes {our key: shape}; where {key: file} for messages. Row-extended targets
    accept a file tensor with exactly 2 fewer rows (the new tokens).
    """
    plan = {}
    for key, shape in file_shapes.items():
        if _ignored(component, key) is not None:
            plan[key] = None
            continue
        ours = KEY_MAPS[component](key)
        if ours not in our_shapes:
            raise InputError(f"{where[key]}: unknown key {key!r} (shape {list(shape)}): no parameter or buffer "
                             f"{ours or '(no mapping)'!r} in the model and not on the {component} ignore list")
        expected = tuple(our_shapes[ours])
        ok = tuple(shape) == expected or (ours in ROW_EXTENDED and component != "mmi"
                                          and tuple(shape) == (expected[0] - 2,) + expected[1:])
        if not ok:
            raise InputError(f"{where[key]}: key {key!r} has shape {list(shape)}, expected {list(expected)} "
                             f"for {ours!r}")
        plan[key] = ours
    return plan


# the folder that provides our tensors of a name prefix when the MM-Interleaved checkpoint does not
FOLDER_OF_PREFIX = {"mm_decoder.": "llm (Vicuna)", "text_decoder.": "llm (Vicuna)",
                    "visual_tokenizer.encoder.": "clip (CLIP ViT-L/14)",
                    "image_decoder.decoder.": "sd (Stable Diffusion 2(.1) base)"}


def check_accounting(our_names, loaded, sources="the files", absent=()):
    """Every tensor of ours is loaded or documented as new; returns the sorted list of new ones. `sources` names
    the folders read, `absent` the folders not given (llm, clip, sd), for the message."""
    new, missing = [], []
    for name in our_names:
        if name in loaded:
            continue
        (new if any(fnmatch.fnmatchcase(name, p) for p in NEW_TENSORS) else missing).append(name)
    if missing:
        counts = {}                                                  # folder not given -> its tensors missing
        for n in missing:
            f = next((f for p, f in FOLDER_OF_PREFIX.items() if n.startswith(p)), None)
            if f is not None and f.split()[0] in absent:
                counts[f] = counts.get(f, 0) + 1
        hint = "; the mmi checkpoint must hold those of the folders not given: " + \
            ", ".join(f"{k} of {f}" for f, k in counts.items()) if counts else ""
        raise InputError(f"{len(missing)} tensors of the model are neither in {sources} nor documented as new: "
                         f"{missing[:10]}{' ...' if len(missing) > 10 else ''}{hint}")
    return new


# -- moving tensors into a meta-built model ----------------------------------------------------------------------


def _all_tensor_names(model):
    """Parameters and buffers (persistent or not), by state-dict style name."""
    return [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]


def _target_shapes(model):
    return {n: tuple(t.shape) for n, t in model.state_dict(keep_vars=True).items()}


def _get_tensor(model, name):
    mod, _, leaf = name.rpartition(".")
    m = model.get_submodule(mod)
    return m._parameters[leaf] if leaf in m._parameters else m._buffers[leaf]


def _set_tensor(model, name, value):
    """Put `value` at `name`: a new Parameter (keeping requires_grad) or buffer; in place when already real."""
    mod, _, leaf = name.rpartition(".")
    m = model.get_submodule(mod)
    old = m._parameters.get(leaf, m._buffers.get(leaf))
    if old is not None and not old.is_meta and old.shape == value.shape:
        with torch.no_grad():
            old.copy_(value)
    elif leaf in m._parameters:
        m._parameters[leaf] = nn.Parameter(value, requires_grad=old.requires_grad)
    else:
        m._buffers[leaf] = value


def _check_kind(model, name, t, path, key):
    """A floating-point tensor of ours takes a floating-point file tensor (of any width), an integer one an
    integer one."""
    want = _get_tensor(model, name)
    if t.is_floating_point() != want.is_floating_point():
        expected = "a floating-point" if want.is_floating_point() else "an integer"
        raise InputError(f"{path}: key {key!r} holds {t.dtype}, expected {expected} tensor for {name!r}")


def _check_finite(model, name, t, path, key):
    """A weight (a parameter) as it lands, on its device: finite, or a NaN would spread to every output without
    a word."""
    if isinstance(_get_tensor(model, name), nn.Parameter) and t.is_floating_point() and not torch.isfinite(t).all():
        raise InputError(f"{path}: key {key!r} holds NaN or infinite values; expected finite weights (a damaged "
                         f"file?)")


def _cast(t, dtype, device):
    """File tensor -> its place in the model: floats to the model's dtype, integers kept; always a fresh copy, so
    nothing of ours stays backed by a mapped file or a reader's reused buffer."""
    return t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype, copy=True)


def _load_plan(model, files, plan, skip, dtype, device, desc, landed=None):
    """Copy every planned tensor, one shard at a time; `skip` = our keys a later source overrides. landed(our key)
    after each tensor that is whole (not a row-extended one's first rows)."""
    n = 0
    for path, tensors in files.shards():
        keys = [k for k in tensors.keys() if plan.get(k) and plan[k] not in skip]
        for k in tqdm(keys, desc=f"{desc} {os.path.basename(path)}", leave=False, disable=len(keys) < 100):
            ours = plan[k]
            t = tensors[k]
            _check_kind(model, ours, t, path, k)
            if ours in ROW_EXTENDED and _get_tensor(model, ours).shape[0] != t.shape[0]:
                full = _get_tensor(model, ours)
                if full.is_meta:
                    full = torch.empty(full.shape, dtype=dtype, device=device)
                    _set_tensor(model, ours, full)
                    full = _get_tensor(model, ours)
                with torch.no_grad():
                    full[:t.shape[0]].copy_(t)
                _check_finite(model, ours, full[:t.shape[0]], path, k)
            else:
                value = _cast(t, dtype, device)
                _check_finite(model, ours, value, path, k)
                _set_tensor(model, ours, value)
                if landed is not None:
                    landed(ours)
            n += 1
        del tensors                                              # unmap this shard before opening the next
    return n


def _new_units(model):
    """{module name: factory} for the parts no file provides: each is built for real with the model's own init,
    then its still-missing tensors are moved into the meta-built model."""
    cfg = model.cfg
    d = cfg.llm.hidden_size
    units = {"visual_tokenizer": lambda: VisualTokenizer(cfg), "context_feat_proj": lambda: nn.Linear(d, d),
             "text_decoder.head_new": lambda: nn.Linear(d, model.text_decoder.n_new)}
    for i, layer in enumerate(model.mm_decoder.layers):
        if layer.llama_cross_attn is not None:
            units[f"mm_decoder.layers.{i}.llama_cross_attn"] = lambda: LlamaMMFSAttention(cfg)
    units["image_decoder.perceiver_resampler"] = lambda: PerceiverResampler(cfg.image_decoder.resampler)
    units["image_decoder.decoder.mmfs_module"] = lambda: MMFSNet(cfg.unet, cfg.image_decoder)
    return units


def _materialise_new_units(model, loaded, dtype, device, landed=None):
    """Build every tensor no file provides from its module's own init. Runs before the files are read, so the
    float32 scratch copy of a unit never coexists with the loaded weights (peak memory). landed(name) after each."""
    names = set(_all_tensor_names(model)) - set(loaded) - {_POSITION_IDS}     # position_ids: _fill_derived
    for prefix, build in _new_units(model).items():
        wanted = sorted(n for n in names if n.startswith(prefix + "."))     # a layer's tensors one after another
        if not wanted:
            continue
        unit = build()
        own = dict(unit.named_parameters())
        own.update(unit.named_buffers())
        for n in wanted:
            _set_tensor(model, n, _cast(own[n[len(prefix) + 1:]], dtype, device))
            if landed is not None:
                landed(n)
        del unit, own


_POSITION_IDS = "visual_tokenizer.encoder.vision_model.embeddings.position_ids"


def _fill_derived(model, loaded, dtype, device):
    """The values that follow from the loaded ones or from the paper: new token rows, text head, constants."""
    with torch.no_grad():
        if "soi_token" not in loaded:
            _set_tensor(model, "soi_token", torch.zeros(model.soi_token.shape, dtype=dtype, device=device))
        if "text_decoder.head.bias" not in loaded:
            _set_tensor(model, "text_decoder.head.bias",
                        torch.zeros(model.text_decoder.head.bias.shape, dtype=dtype, device=device))
        _init_text_head_new_rows(model, loaded)
        emb = "mm_decoder.embed_tokens.weight"
        if loaded.get(emb) == "llm":
            # HF's resize_token_embeddings (transformers 4.31) draws the new rows from N(0, 0.02)
            model.mm_decoder.embed_tokens.weight[-2:].normal_(0.0, 0.02)
        if _POSITION_IDS not in loaded:           # the CLIP files of transformers >= 4.31 no longer hold it
            n = _get_tensor(model, _POSITION_IDS).shape[1]
            _set_tensor(model, _POSITION_IDS, torch.arange(n, device=device)[None])


def _init_text_head_new_rows(model, loaded):
    """The paper's init of the new tokens' head rows and head_new (TextDecoder.reset_new_rows), keeping whatever
    of them a checkpoint provided."""
    names = ["text_decoder.head.weight", "text_decoder.head.bias", "text_decoder.head_new.weight",
             "text_decoder.head_new.bias"]
    from_mmi = {n: _get_tensor(model, n).clone() for n in names if loaded.get(n) == "mmi"}
    if len(from_mmi) == len(names):
        return
    model.text_decoder.reset_new_rows()
    for n, t in from_mmi.items():
        _get_tensor(model, n).copy_(t)


def check_no_meta(model):
    """Raise if any parameter, buffer (persistent or not) or tensor attribute is still on the meta device."""
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    for mname, m in model.named_modules():
        left += [f"{mname}.{a}" for a, v in vars(m).items() if isinstance(v, torch.Tensor) and v.is_meta]
    if left:
        raise ValueError(f"{len(left)} tensors were never loaded or initialised (still on meta): {left[:10]}")


# -- the CLIP text encoder of SD, just enough for neg_prompt_embeds ----------------------------------------------


def clip_text_token_ids(tokenizer_dir, text_len=None):
    """Token ids of the empty prompt, padded as SD's pipeline does: [bos, eos, pad, ...] of model_max_length.

    The empty string has no BPE pieces, so only the special tokens' ids are needed (special_tokens_map.json,
    looked up in vocab.json or tokenizer_config.json's added tokens)."""
    sm_path, tc_path = (os.path.join(tokenizer_dir, n) for n in ("special_tokens_map.json", "tokenizer_config.json"))
    special = _json_object(read_json(sm_path), sm_path) if os.path.isfile(sm_path) else {}
    tc = _json_object(read_json(tc_path), tc_path) if os.path.isfile(tc_path) else {}
    vocab_path = os.path.join(tokenizer_dir, "vocab.json")
    vocab = _json_object(read_json(vocab_path), vocab_path)
    added = {v["content"]: int(k) for k, v in tc.get("added_tokens_decoder", {}).items()}

    def token_id(role):
        tok = special.get(role) or tc.get(role)
        tok = tok["content"] if isinstance(tok, dict) else tok
        if tok is None:
            raise InputError(f"{tokenizer_dir}: no {role} in special_tokens_map.json or tokenizer_config.json")
        if tok in vocab:
            return vocab[tok]
        if tok in added:
            return added[tok]
        raise InputError(f"{tokenizer_dir}: {role} {tok!r} is not in vocab.json")

    n = text_len or tc.get("model_max_length", 77)
    if type(n) is not int or n > 10 ** 6:                # above 10**6: transformers' "no limit" sentinel
        raise InputError(f"{tc_path}: no usable model_max_length ({n})")
    bos, eos, pad = token_id("bos_token"), token_id("eos_token"), token_id("pad_token")
    return torch.tensor([[bos, eos] + [pad] * (n - 2)])


def clip_text_transformer_from_config(cfg, where="text_encoder config"):
    """A CLIPTextTransformer shaped by a transformers CLIPTextConfig dict (SD's text_encoder/config.json)."""
    cfg = _json_object(cfg, where)
    sizes = [_need(cfg, k, 0, where) for k in ("vocab_size", "hidden_size", "num_hidden_layers",
                                                "num_attention_heads", "intermediate_size", "max_position_embeddings")]
    act = _get(cfg, "hidden_act", "quick_gelu", where)
    if act not in ("quick_gelu", "gelu"):
        raise InputError(f"{where}: hidden_act is {act!r}, expected 'quick_gelu' or 'gelu'")
    return CLIPTextTransformer(*sizes, _get(cfg, "layer_norm_eps", 1e-5, where), act)


def sd_negative_prompt_embeds(sd):
    """SD's text encoder output for "" padded to 77 tokens, in float32 -> [1, 77, d] (the original's init of
    `neg_prompt_embeds`). Returns it with the number of file tensors used and ignored."""
    folder = os.path.join(sd, "text_encoder")
    cfg_path = os.path.join(folder, "config.json")
    cfg = read_json(cfg_path)
    files = WeightFiles(folder)
    weights, used, ignored = {}, 0, 0
    for path, tensors in files.shards():
        for k in tensors.keys():
            if _ignored("text_encoder", k) is not None:
                ignored += 1
                continue
            if not k.startswith("text_model."):
                raise InputError(f"{path}: unknown key {k!r} in the text encoder")
            weights[k[len("text_model."):]] = tensors[k].float().clone()
            used += 1
    ids = clip_text_token_ids(os.path.join(sd, "tokenizer"))
    encoder = clip_text_transformer_from_config(cfg, cfg_path)
    missing, unexpected = encoder.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise InputError(f"{folder}: not a CLIP text encoder: missing {missing[:5]}, unexpected {unexpected[:5]}")
    with torch.no_grad():
        return encoder(ids), used, ignored


# -- the public entry points --------------------------------------------------------------------------------------


def _build_meta(cfg):
    with torch.device("meta"):
        return MMInterleaved(cfg)


def load_original(llm=None, clip=None, sd=None, mmi=None, dtype=torch.float32, device="cpu", cfg=None,
                  quantize=None):
    """Build the model from the files the original README downloads.

    llm: Vicuna folder (HF LLaMA); clip: openai/clip-vit-large-patch14 folder (HF CLIP); sd: a stable-diffusion-2
    (-1)-base folder (diffusers unet/, vae/, scheduler/, text_encoder/, tokenizer/); each needed unless `mmi` holds
    its part's weights (sd: the UNet, VAE and neg_prompt_embeds); mmi: the MM-Interleaved checkpoint folder,
    overlaid last (None = the new parts keep their init). cfg: base config for the MM-Interleaved-specific values
    and the shapes of the parts whose folder is not given (default the `mmi-13b` preset); a given folder's shapes
    always come from its config.json. Every file key is used or
    documented as ignored, every tensor of the model is loaded or documented as new; anything else raises InputError
    naming the key, its file and the shapes. quantize: None, "int8" or "int4", each layer of quantize_targets
    quantized as its tensors land (QuantizeOnLoad).
    """
    device = torch.device(device)
    quantize_bits(quantize)
    for name, folder in (("llm", llm), ("clip", clip), ("sd", sd), ("mmi", mmi)):
        if folder is not None and not os.path.isdir(folder):
            raise InputError(f"{folder}: no such folder (given as the {name} folder)")
    if mmi is None and (llm is None or clip is None):
        raise InputError("from_original: give mmi= (an MM-Interleaved checkpoint folder), or llm= and clip= (the "
                         "Vicuna and CLIP folders)")
    cfg = config_from_original(llm, clip, sd, cfg)
    model = _build_meta(cfg)
    ours = _target_shapes(model)
    quantizer = QuantizeOnLoad(model, quantize)

    sources = [(name, WeightFiles(folder)) for name, folder in (("llm", llm), ("clip", clip)) if folder is not None]
    if sd is not None:
        sources += [("unet", WeightFiles(os.path.join(sd, "unet"), "diffusers")),
                    ("vae", WeightFiles(os.path.join(sd, "vae"), "diffusers"))]
    if mmi is not None:
        sources.append(("mmi", WeightFiles(mmi)))
    # plan everything from the headers first: a bad key or shape fails before any tensor is read
    plans = {name: plan_component(name, files.shapes(), ours, files.key_file) for name, files in sources}
    provider = {}                                    # our key -> the last source that provides it (mmi wins)
    for name, _ in sources:
        for our_key in plans[name].values():
            if our_key:
                provider[our_key] = name
    absent = [name for name, folder in (("llm", llm), ("clip", clip), ("sd", sd)) if folder is None]
    new = check_accounting(list(ours), provider, ", ".join(f"{name}={files.folder}" for name, files in sources),
                           absent)
    # new parts and the text encoder's output first: their float32 scratch memory is gone before the big reads
    _materialise_new_units(model, provider, dtype, device, quantizer.landed)
    text_encoder_note = ""
    if "image_decoder.neg_prompt_embeds" not in provider:
        if sd is None:
            raise InputError("image_decoder.neg_prompt_embeds: not in the mmi checkpoint and no sd= folder to "
                             "compute it from (SD's text encoder output for the empty prompt)")
        neg, used, ignored = sd_negative_prompt_embeds(sd)
        expected = tuple(model.image_decoder.neg_prompt_embeds.shape)
        if tuple(neg.shape) != expected:
            raise InputError(f"{sd}/text_encoder: output for the empty prompt has shape {list(neg.shape)}, "
                             f"expected {list(expected)} (neg_prompt_embeds)")
        _set_tensor(model, "image_decoder.neg_prompt_embeds", _cast(neg, dtype, device))
        provider["image_decoder.neg_prompt_embeds"] = "text_encoder"
        text_encoder_note = f"; text_encoder {used} read/{ignored} ignored -> neg_prompt_embeds"
    counts = {}
    for name, files in sources:
        skip = {k for k, src in provider.items() if src != name}
        n = _load_plan(model, files, plans[name], skip, dtype, device, desc=name, landed=quantizer.landed)
        n_ignored = sum(v is None for v in plans[name].values())
        counts[name] = (n, n_ignored, len(plans[name]) - n - n_ignored)
    _fill_derived(model, provider, dtype, device)
    check_no_meta(model)
    quantizer.finish()
    model.set_trainable()
    summary = "; ".join(f"{name} {n} read/{ig} ignored/{sup} superseded by mmi"
                        for name, (n, ig, sup) in counts.items())
    n_new = sum(1 for n in new if n not in provider)
    print(f"from_original: {summary}{text_encoder_note}; {n_new} tensors new (documented); "
          f"{len(ours)} tensors in the model")
    model.load_report = {"counts": counts, "new": [n for n in new if n not in provider], "provider": provider}
    return model


# -- our own format: safetensors shards + config.json ------------------------------------------------------------

_CONFIG_NAME = "config.json"
_INDEX_NAME = "model.safetensors.index.json"


def save_safetensors(tensors, path, metadata=None):
    """safetensors' save_file, the file then readable as any other this process writes (save_file leaves it to
    its owner alone, mode 0600, whatever the umask)."""
    save_file(tensors, path, metadata=metadata)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def _shard_groups(state, max_shard_bytes):
    groups, size = [[]], 0
    for k, t in state.items():
        nbytes = t.numel() * t.element_size()
        if groups[-1] and size + nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(k)
        size += nbytes
    return groups


def write_pretrained(model, path, max_shard_bytes=5 * 2 ** 30, dtype=None, extra_files=None):
    """The whole model as safetensors (sharded above max_shard_bytes, with an index) plus config.json, in the
    folder `path`, replacing what was there.

    At every instant, even if the process is killed between any two steps, the model saved at `path` is whole,
    the previous one or the new one: it is `path`, or while `path` is missing, `path.mmi-old` (which
    load_pretrained then reads; a first save has no previous model):
      1. finish an interrupted save: rename `path.mmi-old` back to `path` where `path` is missing, then remove
         `path.mmi-old` and `path.mmi-new`;
      2. write the new model into `path.mmi-new`;
      3. rename `path` to `path.mmi-old`;
      4. rename `path.mmi-new` to `path`;
      5. remove `path.mmi-old`.
    Renames are atomic. `path.mmi-old` is only ever made by renaming a complete `path`, and only removed while
    `path` exists, so a `path.mmi-old` without `path` is complete. (Safe against a kill, not a power loss:
    nothing is fsync'd.)
    """
    if any(isinstance(m, QuantizedLinear) for m in model.modules()):
        raise ValueError("save_pretrained: the model has quantized layers, which from_pretrained does not read; save "
                         "it unquantized and pass quantize= when loading")
    path = os.path.abspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise InputError(f"{path}: exists and is not a folder; save_pretrained writes a folder")
    new, old = _swap_names(path)
    _finish_interrupted_save(path)
    os.makedirs(new)
    try:
        _write_folder(model, new, max_shard_bytes, dtype)
        for name, src in (extra_files or {}).items():
            shutil.copyfile(src, os.path.join(new, name))
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)
        raise
    if os.path.exists(path):
        os.replace(path, old)
    os.replace(new, path)
    if os.path.exists(old):
        shutil.rmtree(old)


def _swap_names(path):
    """The new model being written, and the previous one while it is swapped out (see write_pretrained)."""
    return f"{path}.mmi-new", f"{path}.mmi-old"


def _finish_interrupted_save(path):
    new, old = _swap_names(path)
    if os.path.isdir(old) and not os.path.exists(path):
        os.replace(old, path)                   # killed between the two renames: the previous model goes back
    for leftover in (old, new):
        if os.path.exists(leftover):
            shutil.rmtree(leftover)


def _model_folder(path):
    """The folder holding the model saved at `path`: `path`, or the previous model where a save was killed
    between its two renames (see write_pretrained)."""
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise InputError(f"{path}: not a folder (a model written by save_pretrained is a folder)")
    old = _swap_names(os.path.abspath(path))[1]
    if os.path.isdir(old):
        print(f"from_pretrained: {path} is missing; reading the previous model in {old}, left by an interrupted "
              f"save_pretrained", file=sys.stderr)
        return old
    raise InputError(f"{path}: no such folder (expected a model written by save_pretrained)")


_FLOAT32_PREFIXES = ("image_decoder.decoder.vae.",)        # run in float32 whatever the model's dtype


def _write_folder(model, tmp, max_shard_bytes, dtype=None):
    state = model.state_dict()
    if dtype is not None:
        state = {k: t.to(dtype) if t.is_floating_point() and not k.startswith(_FLOAT32_PREFIXES) else t
                 for k, t in state.items()}
    groups = _shard_groups(state, max_shard_bytes)
    names = ["model.safetensors"] if len(groups) == 1 else \
        [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    weight_map = {}
    for name, keys in zip(tqdm(names, desc="save_pretrained", disable=len(names) < 2), groups):
        save_safetensors({k: state[k].detach().contiguous().cpu() for k in keys}, os.path.join(tmp, name),
                         metadata={"format": "pt"})
        weight_map.update((k, name) for k in keys)
    if len(groups) > 1:
        with open(os.path.join(tmp, _INDEX_NAME), "w") as f:
            json.dump({"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
                       "weight_map": weight_map}, f, indent=1)
    with open(os.path.join(tmp, _CONFIG_NAME), "w") as f:
        json.dump(model.cfg.to_dict(), f, indent=1)


def training_checkpoint_error(path):
    """What to say of a folder holding one of train.py's checkpoints (config.json with 'train' and 'model') where a
    model folder is expected."""
    return InputError(f"{path}: a training checkpoint of train.py, not a model folder: continue training from it with "
                      f"--resume, or load what the run exported into its out_dir (model/; a VAE run: vae.safetensors)")


def load_pretrained(path, dtype=None, device="cpu", quantize=None):
    """A model written by save_pretrained: every tensor must be there with its shape, and nothing else.
    dtype None keeps the stored dtypes. quantize: as load_original's."""
    device = torch.device(device)
    quantize_bits(quantize)
    path = _model_folder(path)
    cfg_path = os.path.join(path, _CONFIG_NAME)
    raw = read_json(cfg_path)
    if isinstance(raw, dict) and {"train", "model"} <= raw.keys():
        raise training_checkpoint_error(path)
    cfg = MMIConfig.from_dict(raw, cfg_path)
    try:
        model = _build_meta(cfg)
    except InputError as e:                     # the model's own checks of the config's consistency
        raise InputError(f"{cfg_path}: {e}") from None
    ours = _target_shapes(model)
    files = WeightFiles(path)
    shapes = files.shapes()
    for k, shape in shapes.items():
        if k not in ours:
            raise InputError(f"{files.key_file[k]}: unknown key {k!r} (shape {list(shape)})")
        if tuple(shape) != ours[k]:
            raise InputError(f"{files.key_file[k]}: key {k!r} has shape {list(shape)}, expected {list(ours[k])}")
    missing = [k for k in ours if k not in shapes]
    if missing:
        raise InputError(f"{path}: {len(missing)} tensors of the model are missing: {missing[:10]}")
    quantizer = QuantizeOnLoad(model, quantize)
    for path_, tensors in tqdm(files.shards(), desc="from_pretrained", total=len(files.files),
                               disable=len(files.files) < 2):
        for k in tensors.keys():
            t = tensors[k]
            _check_kind(model, k, t, path_, k)
            value = _cast(t, dtype or t.dtype, device)
            _check_finite(model, k, value, path_, k)
            _set_tensor(model, k, value)
            quantizer.landed(k)
        del tensors
    check_no_meta(model)
    quantizer.finish()
    return model


# ----------------------------------------------------------------------------------------------------------------
# Generation: text decoding (greedy, nucleus sampling, beam search) over a static KV cache
# ----------------------------------------------------------------------------------------------------------------


class _Decoder:
    """Runs the LLM for generation: one prefill over the prompts, then one token per step through the KV caches,
    or, with use_cache=False, the whole sequence again at every step (the slow path the cache must equal).
    MMFS has no cache: each step the new token reads every image again, with the prompt's last mask row.

    greedy_or_sample and beam_search drive any object with this protocol: prefill() -> (B, V) logits of each
    prompt's next token; select(index) keeps/repeats/reorders rows; step(tokens (n,)) appends one token to each
    row -> (n, V) the next logits."""

    def __init__(self, model, embeds, mask, vision, xmask, max_new_tokens, use_cache):
        self.model, self.use_cache = model, use_cache
        self.embeds, self.mask, self.vision, self.xmask = embeds, mask.long(), vision, xmask
        self.new_tokens = mask.new_zeros((mask.shape[0], 0), dtype=torch.long)
        self.max_len = embeds.shape[1] + max_new_tokens
        self.caches = None

    def select(self, index):
        """Keep/repeat/reorder rows: expands prompts to beams or samples, follows beams to their sources."""
        self.mask, self.new_tokens = self.mask[index], self.new_tokens[index]
        if self.vision is not None:
            self.vision, self.xmask = self.vision[index], self.xmask[index]
        if self.caches is None:
            self.embeds = self.embeds[index]
        for cache in self.caches or ():
            cache.reorder(index)

    def prefill(self):
        llm = self.model.mm_decoder
        B, L, _ = self.embeds.shape
        pos, attn = _positions_and_mask(self.mask)
        if self.use_cache:
            c = llm.cfg
            hd = c.hidden_size // c.num_attention_heads
            self.caches = [KVCache(B, c.num_attention_heads, self.max_len, hd, self.embeds.dtype, self.embeds.device)
                           for _ in llm.layers]
        h = llm(self.embeds, pos, self.vision, self.xmask, attn_mask=attn, kv_caches=self.caches, cache_start=0)
        return self.model.text_decoder(h[:, -1]).float()                       # (B, V)

    def step(self, tokens):
        """tokens (B,) -> the next logits (B, V)."""
        llm = self.model.mm_decoder
        self.new_tokens = torch.cat([self.new_tokens, tokens[:, None]], dim=1)
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], dim=1)
        if self.use_cache:   # the new token alone, in the next cache slot: it sees every real token and itself
            pos, attn = self.mask.sum(-1, keepdim=True) - 1, self.mask.bool()[:, None, None, :]
            h = llm(llm.embed_tokens(tokens)[:, None], pos, self.vision, self.xmask, attn_mask=attn,
                    kv_caches=self.caches, cache_start=self.mask.shape[1] - 1)
        else:                # the prompt and every new token through the whole LLM again
            pos, attn = _positions_and_mask(self.mask)
            embeds = torch.cat([self.embeds, llm.embed_tokens(self.new_tokens)], dim=1)
            # new tokens see the images the prompt's last token sees
            xmask = None if self.xmask is None else \
                torch.cat([self.xmask, self.xmask[:, -1:].expand(-1, self.new_tokens.shape[1], -1)], dim=1)
            h = llm(embeds, pos, self.vision, xmask, attn_mask=attn)
        return self.model.text_decoder(h[:, -1]).float()


def _process_logits(logits, seqs, step, min_new_tokens, repetition_penalty, stop_ids, bos_id):
    """The original's logits processors: repetition penalty over bos + the generated tokens (the prompt is not
    seen, as in HF generate from embeddings), and no stop token before min_new_tokens."""
    if repetition_penalty != 1.0:
        seen = _to_device([[bos_id] + s for s in seqs], logits.device)                       # (n, 1 + step)
        score = logits.gather(1, seen)
        score = torch.where(score < 0, score * repetition_penalty, score / repetition_penalty)
        logits = logits.scatter(1, seen, score)
    if step < min_new_tokens:
        logits = logits.index_fill(1, _to_device(list(stop_ids), logits.device), -float("inf"))
    return logits


def _top_p_filter(logits, top_p):
    """Keep the most likely tokens until their mass reaches top_p (at least one); the rest get -inf."""
    probs, order = logits.softmax(-1).sort(dim=-1, descending=True)
    mass_before = probs.cumsum(-1) - probs
    drop_sorted = mass_before >= top_p
    drop_sorted[:, 0] = False
    drop = drop_sorted.scatter(1, order, drop_sorted)
    return logits.masked_fill(drop, -float("inf"))


def _top_k_filter(logits, top_k):
    """Keep the top_k largest logits of each row (and any tied with the k-th); the rest get -inf."""
    kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
    return logits.masked_fill(logits < kth, -float("inf"))


def warp_logits(logits, temperature=1.0, top_k=0, top_p=1.0):
    """HF generate's sampling warpers, in its order: temperature, then top-k (0 or None = off), then top-p over
    the distribution top-k left (1.0 = off). -> logits whose softmax is the distribution sampled from."""
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 0):
        raise ValueError(f"top_k={top_k!r}, expected an int >= 0 (0 or None = off)")
    if temperature != 1.0:
        logits = logits / temperature
    if top_k:
        logits = _top_k_filter(logits, top_k)
    if top_p < 1.0:
        logits = _top_p_filter(logits, top_p)
    return logits


def greedy_or_sample(decoder, n_return, warp, generator, max_new_tokens, min_new_tokens, repetition_penalty,
                     stop_ids, bos_id, pad_id):
    """Greedy (warp None) or sampling from warp_logits(logits, **warp); each row runs until a stop token (kept as
    its last token) or max_new_tokens. -> a list of token lists, n_return per prompt. Sampling draws one uniform a
    row and step from `generator`, a CPU generator (None: the global one), all before the first step, and takes
    the token where the cumulative probability passes it: so a seed samples the same text on any device, up to
    the logits' rounding."""
    logits = decoder.prefill()
    if n_return > 1:
        index = torch.arange(logits.shape[0], device=logits.device).repeat_interleave(n_return)
        decoder.select(index)
        logits = logits[index]
    n = logits.shape[0]
    seqs = [[] for _ in range(n)]
    done = [False] * n
    if warp is not None:                     # (max_new_tokens, n, 1), moved once
        uniforms = torch.rand(max_new_tokens, n, 1, generator=generator).to(logits.device, non_blocking=True)
    for step in range(max_new_tokens):
        padded = [s + [pad_id] * (step - len(s)) for s in seqs]
        logits = _process_logits(logits, padded, step, min_new_tokens, repetition_penalty, stop_ids, bos_id)
        if warp is not None:
            cdf = warp_logits(logits, **warp).softmax(-1).cumsum(-1)                           # (n, V)
            tokens = (cdf <= uniforms[step] * cdf[:, -1:]).sum(-1)     # the first token whose cdf exceeds u
        else:
            tokens = logits.argmax(-1)
        ahead = tokens.is_cuda and step < max_new_tokens - 1        # on a GPU, the next step queued first
        tokens_host, next_logits = step_ahead(decoder, tokens) if ahead else (tokens, None)
        for i, t in enumerate(tokens_host.tolist()):
            if not done[i]:
                seqs[i].append(t)
                done[i] = t in stop_ids
        if all(done) or step == max_new_tokens - 1:
            break
        logits = next_logits if ahead else decoder.step(tokens)   # finished rows run on; their tokens are not kept
    return seqs


def beam_search(decoder, num_beams, n_return, length_penalty, max_new_tokens, min_new_tokens, repetition_penalty,
                stop_ids, bos_id, pad_id, keep_stop_token=False):
    """Beam search as HF's (transformers 4.31, which the original runs), with the original's wider candidate list
    (max(2, 1 + #stop ids) * beams). -> a list of token lists, n_return per prompt, best first.

    A hypothesis ending in a stop token is scored sum(logprob) / length ** length_penalty, where length counts
    the original's dummy bos and the tokens before the stop, and ends with stop_ids[0] (eos) whichever stop
    token ended it, or with that token if keep_stop_token. A prompt is done once it holds num_beams finished
    hypotheses and the best candidate of the step, normalised by the current length (the dummy bos, the tokens
    so far and this step's one), could not beat the worst of them. A prompt still open at max_new_tokens also
    offers its open beams (length: the dummy bos and their tokens), which end without a stop token.
    """
    K = num_beams
    logits = decoder.prefill()
    B, V = logits.shape
    decoder.select(torch.arange(B, device=logits.device).repeat_interleave(K))
    logits = logits.repeat_interleave(K, dim=0)
    beam_scores = torch.zeros(B, K, device=logits.device)
    beam_scores[:, 1:] = -1e9                  # all beams start equal: keep only the first one's candidates
    beams = [[] for _ in range(B * K)]
    hyps = [[] for _ in range(B)]
    done = [False] * B
    width = max(2, 1 + len(stop_ids)) * K

    def add(b, score, seq):
        hyps[b].append((score, seq))
        hyps[b].sort(key=lambda x: -x[0])
        del hyps[b][K:]

    for step in range(max_new_tokens):
        logp = _process_logits(logits.log_softmax(-1), beams, step, min_new_tokens, repetition_penalty, stop_ids,
                               bos_id)
        scores = (logp + beam_scores.view(-1, 1)).view(B, K * V)
        top_s, top_i = scores.topk(width, dim=1)
        top_s, top_i = top_s.tolist(), top_i.tolist()
        src, tok, new_scores = [], [], []
        for b in range(B):
            if done[b]:
                src += [b * K] * K
                tok += [pad_id] * K
                new_scores += [0.0] * K
                continue
            chosen = 0
            for rank, (s, i) in enumerate(zip(top_s[b], top_i[b])):
                j, t = divmod(i, V)
                if t in stop_ids:
                    if rank < K:
                        end = t if keep_stop_token else stop_ids[0]
                        add(b, s / (step + 1) ** length_penalty, beams[b * K + j] + [end])
                    continue
                src.append(b * K + j)
                tok.append(t)
                new_scores.append(s)
                chosen += 1
                if chosen == K:
                    break
            if len(hyps[b]) == K and hyps[b][-1][0] >= top_s[b][0] / (step + 2) ** length_penalty:
                done[b] = True
        beams = [beams[j] + [t] for j, t in zip(src, tok)]
        beam_scores = torch.tensor(new_scores, device=logits.device).view(B, K)
        if all(done) or step == max_new_tokens - 1:
            break
        decoder.select(torch.tensor(src, device=logits.device))
        logits = decoder.step(torch.tensor(tok, device=logits.device))
    for b in range(B):
        if not done[b]:
            for k in range(K):
                add(b, beam_scores[b, k].item() / (len(beams[b * K + k]) + 1) ** length_penalty, beams[b * K + k])
    return [seq for b in range(B) for _, seq in hyps[b][:n_return]]


# ----------------------------------------------------------------------------------------------------------------
# Fine-tuning: LoRA, a trainable low-rank update beside the LLM's frozen matmuls (Hu et al., 2021)
# ----------------------------------------------------------------------------------------------------------------

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a low-rank update: y = x W^T + b + (x A^T) B^T * alpha / rank, A (rank, in) and
    B (out, rank) trained. W and b keep the names weight and bias, so the layer's state_dict keys stay and
    lora_A, lora_B join them. A starts small and random (nn.Linear's own init), B at zero: the layer starts as
    the plain one, exactly. Not an nn.Linear, so that no fast path reads W alone (the decoding GEMV calls it)."""

    def __init__(self, linear, rank, alpha):
        super().__init__()
        self.in_features, self.out_features, self.rank, self.scale = (linear.in_features, linear.out_features,
                                                                      rank, alpha / rank)
        self.weight, self.bias = linear.weight, linear.bias
        w = linear.weight
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x):
        return F.linear(x, self.weight, self.bias) + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scale

    def merged(self):
        """The plain nn.Linear with W + B A * alpha / rank (summed in at least float32, stored in W's dtype)."""
        w, dtype = self.weight, torch.promote_types(self.weight.dtype, torch.float32)
        with torch.no_grad():
            delta = (self.lora_B.to(dtype) @ self.lora_A.to(dtype)) * self.scale        # (out, in)
            weight = nn.Parameter((w.to(dtype) + delta).to(w.dtype), requires_grad=w.requires_grad)
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight, linear.bias = weight, self.bias
        return linear

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, scale={self.scale}"


def add_lora(model, rank=8, alpha=16, targets=LORA_TARGETS):
    """In place: every nn.Linear of the LLM (model.mm_decoder; the model itself if it has none) whose name ends in
    one of `targets` becomes a LoRALinear, and every other parameter of the model is frozen: only the A and B
    matrices train. -> model"""
    if rank < 1:
        raise InputError(f"lora rank {rank}, expected 1 or more")
    llm = getattr(model, "mm_decoder", model)
    for p in model.parameters():
        p.requires_grad_(False)
    for name, m in list(llm.named_modules()):
        parent, _, leaf = name.rpartition(".")
        if type(m) is nn.Linear and leaf in targets:
            setattr(llm.get_submodule(parent), leaf, LoRALinear(m, rank, alpha))
    return model


def merge_lora(model):
    """In place: every LoRALinear folded back into a plain nn.Linear (see LoRALinear.merged), so that the model is
    the plain architecture again and save_pretrained writes no LoRA keys. -> model"""
    for name, m in list(model.named_modules()):
        if isinstance(m, LoRALinear):
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, m.merged())
    return model


# ----------------------------------------------------------------------------------------------------------------
# Speed: faster forms of the blocks above, for training at scale and for generation on a GPU. Each computes what
# its plain form computes, up to rounding (test_mmi.py holds them equal). A reader of the model can skip this part.
# ----------------------------------------------------------------------------------------------------------------

# What the fast forms below were written for: a digest of the plain forms' source. An edited plain form changes
# it, and then the fast path is not taken (fast=None) or refused (fast=True) until its form is brought in line,
# checked by the tests, and this digest renewed, so that the fast path never computes something else.
PLAIN_FORMS_DIGEST = "73212f10896a352e"


def _plain_forms_digest():
    forms = (MMFS.forward, MMFS.query_mask, MMFS.attend, LlamaAttention.forward, LlamaMLP.forward,
             LlamaMMFSAttention.forward, LlamaDecoderLayer.forward, LlamaModel.forward, TextDecoder.forward,
             MMFSBlock.forward, MMFSNet.forward, _Decoder.step)
    return hashlib.sha256("".join(inspect.getsource(f) for f in forms).encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=None)
def fast_forms_current():
    """Whether the fast forms cover the plain forms as they are written now (see PLAIN_FORMS_DIGEST)."""
    try:
        digest = _plain_forms_digest()
    except (OSError, TypeError):    # no source to read: nothing can have been edited here
        return True
    if digest == PLAIN_FORMS_DIGEST:
        return True
    warnings.warn(f"mmi: the model's plain forms were edited (digest {digest}, the fast forms were written for "
                  f"{PLAIN_FORMS_DIGEST}); running the plain path. Bring the fast forms in line, run test_mmi.py, "
                  f"then set PLAIN_FORMS_DIGEST = {digest!r}.")
    return False


def use_fast(fast, device):
    """fast=None: the fast forms where they pay (CUDA tensors with kernels.cu) and cover the plain ones; True: the
    fast forms wherever they run (a CUDA graph only on CUDA), or an error; False: the plain path."""
    if fast is None:
        return kernels_used(device) and fast_forms_current()
    if fast and not fast_forms_current():
        raise RuntimeError("fast=True, but the plain forms were edited since the fast forms were written "
                           "(see mmi.PLAIN_FORMS_DIGEST)")
    return bool(fast)


# -- the matmuls of a decoding step: kernels.cu's GEMV, with a pre-norm block's RMSNorm and residual folded in ----

@torch.library.custom_op("mmi::gemv", mutates_args=())
def gemv(x: torch.Tensor, weights: list[torch.Tensor], biases: list[Optional[torch.Tensor]], glu: bool,
         norm: Optional[torch.Tensor], eps: float, residual: Optional[torch.Tensor],
         scales: list[torch.Tensor], group_size: int) -> torch.Tensor:
    """kernels.cu's gemv, which reads 16 bytes at a time: x is copied to a fresh buffer if it does not start on a
    16-byte boundary, and weights that do not (views into a larger buffer, as FSDP's gathered weights, may not) go
    through F.linear. Checked here, when the op runs: torch.compile cannot read an intermediate tensor's storage
    offset while it traces (it would split the compiled graph at every linear). With scales (else []), the weights
    are QuantizedLinear's qweight (int8, or int4 in slabs) and these its scales and group_size."""
    if all(w.data_ptr() % 16 == 0 for w in (*weights, *([] if norm is None else [norm]))):
        return load_kernels().gemv(x if x.data_ptr() % 16 == 0 else x.clone(), weights, biases, glu, norm, eps,
                                   residual, scales, group_size)
    if scales:
        weights = [dequantize_weight(q, s, group_size)[:, :x.shape[-1]] for q, s in zip(weights, scales)]
    if norm is not None:
        x = rms_norm(x, norm, eps)
    ys = [F.linear(x, w, b) for w, b in zip(weights, biases)]
    y = F.silu(ys[0]) * ys[1] if glu else torch.cat(ys, dim=-1)
    return y if residual is None else residual + y


@gemv.register_fake
def _(x, weights, biases, glu, norm, eps, residual, scales, group_size):
    N = (scales or weights)[0].shape[0]                                       # int4 weights have padding rows
    return x.new_empty(x.shape[0], N if glu else N * len(weights))


def _gemv_weights(layers, x):
    """(weights, scales, group_size) as the gemv operator reads them, or None where it cannot: nn.Linear layers
    with weights of x's dtype, or QuantizedLinear layers of one format with scales of x's dtype and no padded
    inputs, whose loads of 16 or 32 inputs each lie in one scale group."""
    if all(isinstance(l, nn.Linear) for l in layers):
        weights = [l.weight for l in layers]
        return (weights, [], 0) if all(w.dtype == x.dtype for w in weights) else None
    first, K = layers[0], x.shape[-1]
    if not all(isinstance(l, QuantizedLinear) and (l.bits, l.group_size) == (first.bits, first.group_size)
               for l in layers):
        return None
    if first.in_features != K or K % first.group_size or first.group_size % (128 // first.bits) \
            or any(l.scales.dtype != x.dtype or not l.scales.is_contiguous() for l in layers):
        return None
    return [l.qweight for l in layers], [l.scales for l in layers], first.group_size


def _gemv_fits(x, layers, norm):
    """Whether x goes through these layers by the gemv operator: a decoding step's few rows (<= 4) in 16-bit on
    CUDA, outside autograd, weights the operator reads (_gemv_weights) and a norm weight of x's dtype, one output
    size, at most three layers."""
    read = _gemv_weights(layers, x)
    if read is None:
        return False
    weights = read[0]
    return (x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and 0 < x.numel() <= 4 * x.shape[-1]
            and x.shape[-1] % 8 == 0 and len(layers) <= 3 and (norm is None or isinstance(norm, RMSNorm))
            and not (torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for l in layers
                                                                        for p in l.parameters())))
            and (norm is None or (norm.weight.dtype == x.dtype and norm.weight.is_contiguous()))
            and all(w.is_contiguous() and w.shape == weights[0].shape for w in weights)
            and kernels_used(x.device))


def linear(x, *layers, glu=False, norm=None, residual=None):
    """x through nn.Linear layers that read the same input: their outputs (one tensor for one layer), or with
    glu=True and layers (gate, up), silu(gate(x)) * up(x). norm (an RMSNorm) applies to x first; residual is added
    to the one output (one layer or glu): a pre-norm block's `residual + layer(norm(x))`.
    A decoding step reads each weight once for one token, so its matmuls are bound by memory bandwidth; there
    kernels.cu's gemv does the layers in one launch, with the norm, glu product and residual add fused (the layers'
    and norm's forward hooks do not run). The rest of the time the modules are called as usual."""
    if residual is not None and len(layers) > 1 and not glu:
        raise ValueError(f"linear: a residual needs one output, got {len(layers)} layers without glu")
    if _gemv_fits(x, layers, norm):
        weights, scales, group_size = _gemv_weights(layers, x)
        res = None if residual is None else residual.reshape(-1, residual.shape[-1]).contiguous()
        y = gemv(x.reshape(-1, x.shape[-1]).contiguous(), weights, [l.bias for l in layers], glu,
                 None if norm is None else norm.weight, 0.0 if norm is None else norm.eps, res, scales, group_size)
        y = y.view(*x.shape[:-1], -1)                                            # (..., n_layers * N) or (..., N)
        return y if glu or len(layers) == 1 else y.chunk(len(layers), dim=-1)
    if norm is not None:
        x = norm(x)
    outs = tuple(layer(x) for layer in layers)
    if glu:
        outs = (F.silu(outs[0]) * outs[1],)
    if residual is not None:
        outs = (residual + outs[0],)
    return outs[0] if len(outs) == 1 else outs



# -- MMFS with the images' queries folded: one matmul per layer whatever the image count ------------------------

def mmfs_fast(mmfs, query, reference_points, value, mask, check_mask=True, value_projected=False, query_norm=None,
              relpos=None, tables=None):
    """MMFS.forward, faster. Each image's query is q + query_relpos[rel], read by two linear layers; since
    W(q + r) + b = (Wq + b) + Wr, the layers run on q once and each image adds W r (mmfs_relpos_terms).
    value_projected: `value` is already value_proj(...) (made once where the images do not change: decoding steps,
    a sampler's steps); relpos: mmfs_relpos_terms(...) made once the same way; tables: _level_tables(...) made once
    (else kept per (n, dtype, device), but made at every call inside torch.compile); query_norm: an RMSNorm folded
    into the first matmul; check_mask=False skips the image-count check (a host sync)."""
    B, Lq, _ = query.shape
    m = mmfs.query_mask(mask, Lq)
    if check_mask and m.shape[-1] >= mmfs.max_num_image_per_seq:   # rel <= the image count: fewer cannot overflow
        mmfs.check_image_count(relative_image_index(m))
    q = linear(query, mmfs.dynamic_offset_mask, norm=query_norm)                 # (B, Lq, d_query)
    add_offsets, add_logits = mmfs_relpos_terms(mmfs, m, q.dtype) if relpos is None else relpos
    offsets = linear(q, mmfs.sampling_offsets)[:, None] + add_offsets            # (B, n, Lq, out)
    logits = linear(q, mmfs.attention_weights)[:, None] + add_logits
    v = value if value_projected else mmfs.value_proj(value)
    tables = _level_tables(mmfs, v.shape[1], q.dtype, q.device) if tables is None else tables
    return linear(mmfs.attend(offsets, logits, m, reference_points, v, *tables), mmfs.output_proj)


def mmfs_relpos_terms(mmfs, m, dtype):
    """What each image's relative position adds to the sampling offsets and attention logits of the queries, from
    their mask m (B, n) or (B, Lq, n): W r for the query_relpos row r the image is read with, a row of a (max images,
    out) table picked by a one-hot matmul (whose backward is a matmul too; an indexed read's backward piles atomic
    adds onto a few rows). -> (B, n, Lq or 1, out) for sampling_offsets and for attention_weights."""
    rel = relative_image_index(m)
    rel = rel[:, :, None] if m.dim() == 2 else rel.transpose(1, 2)               # (B, n, Lq or 1)
    pick = (rel[..., None] == torch.arange(mmfs.max_num_image_per_seq, device=rel.device)).to(dtype)
    table = lambda layer: F.linear(mmfs.query_relpos.weight, layer.weight)       # (max images, out)
    return pick @ table(mmfs.sampling_offsets), pick @ table(mmfs.attention_weights)


def _level_tables(mmfs, n, dtype, device):
    """MMFS.level_tables kept per (n, dtype, device): made from Python numbers on every call they would cost a
    host-to-device copy each time, which a CUDA graph cannot hold. Inside torch.compile they are made, not kept (a
    compiled region may not write module state; its graph holds them as constants)."""
    if torch.compiler.is_compiling():
        return mmfs.level_tables(n, dtype, device)
    kept = mmfs.__dict__.setdefault("_level_tables", {})
    key = (n, dtype, torch.device(device))
    if key not in kept:
        with torch.inference_mode(False):   # ordinary tensors, so a later training step may save them for backward
            kept[key] = mmfs.level_tables(n, dtype, device)
    return kept[key]


class FastMMFS(MMFS):
    """MMFS running mmfs_fast: what speed_up puts in a model for training."""

    def forward(self, query, reference_points, value, mask):
        return mmfs_fast(self, query, reference_points, value, mask)


def speed_up(model):
    """Training's fast forms, in place: every MMFS becomes a FastMMFS (same parameters, same state_dict). Left
    plain when the fast forms do not cover the plain ones (see PLAIN_FORMS_DIGEST). -> model"""
    if fast_forms_current():
        for m in model.modules():
            if type(m) is MMFS:
                m.__class__ = FastMMFS
    return model


# -- decoding: a fixed-shape step, replayed as one CUDA graph -------------------------------------------------------

def _select_rows(t, index, dim=0):
    """t[index] along dim; in place when the row count stays, so a CUDA graph that reads t keeps seeing it."""
    if index.shape[0] == t.shape[dim]:
        return t.copy_(t.index_select(dim, index))
    return t.index_select(dim, index)


def mmfs_step_inputs(llm, vision_hidden_states, xmask, dtype):
    """What each MMFS layer reads in every decoding step and no step changes, made once: the images' values
    (norm2, then value_proj) and, for the new tokens' mask xmask (B, 1, N), their relative positions' terms
    (mmfs_relpos_terms), and the level tables (_level_tables). -> per MMFS layer (values (B, N, S, d_attn), offsets'
    terms, logits' terms, tables)"""
    made = []
    for x in (layer.llama_cross_attn for layer in llm.layers):
        if x is not None:
            values = x.attn.value_proj(x.norm2(vision_hidden_states))
            made.append((values, *mmfs_relpos_terms(x.attn, x.attn.query_mask(xmask, 1), dtype),
                         _level_tables(x.attn, values.shape[1], dtype, values.device)))
    return made


@torch.library.custom_op("mmi::decode_attention", mutates_args=("kv",))
def _decode_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                         pos: torch.Tensor, kv: torch.Tensor, slot: torch.Tensor,
                         mask: Optional[torch.Tensor]) -> torch.Tensor:
    return load_kernels().decode_attention(q, k, v, cos, sin, pos, kv, slot, mask)


@_decode_attention_op.register_fake
def _(q, k, v, cos, sin, pos, kv, slot, mask):
    return q.new_empty(q.shape[0], kv.shape[2] * kv.shape[4])


def decode_attention(q, k, v, cos, sin, pos, kv, slot, attn_mask):
    """A decoding step's self-attention: RoPE on the new token's q and k (B, 1, d) at positions pos (B, 1), rows of
    the tables cos, sin (max_len, D) made once; its k and v written into the cache kv (2, B, heads, max_len, D) at
    slot `slot` (a device tensor), q over the cache with attn_mask (B, 1, 1, max_len, additive: it hides the empty
    slots) -> (B, 1, d). On CUDA, kernels.cu does it all in one launch that reads only the slots up to `slot`. (Tables
    made inside a compiled step would be made again before every layer: the compiler recomputes a cheap input of an
    opaque op at each use.)"""
    B, L, d = q.shape
    D = kv.shape[-1]
    if (L == 1 and kernels_used(q.device) and q.dtype in (torch.bfloat16, torch.float16) and D in (32, 64, 128)
            and kv.dtype == cos.dtype == q.dtype and (attn_mask is None or attn_mask.dtype == q.dtype)
            and not torch.is_grad_enabled()):
        mask = None if attn_mask is None else attn_mask.reshape(B, -1)
        return _decode_attention_op(q.view(B, d), k.view(B, d), v.view(B, d), cos, sin, pos.reshape(B), kv, slot,
                                    mask).view(B, 1, d)
    q, k, v = (t.view(B, L, kv.shape[2], D).transpose(1, 2) for t in (q, k, v))       # (B, heads, 1, D)
    cos, sin = cos[pos], sin[pos]                                                     # (B, 1, D)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    kv.index_copy_(3, slot, torch.stack([k, v]).to(kv.dtype))                     # no cast in index_copy_
    return attention(q, kv[0], kv[1], attn_mask)


def fast_layer_step(layer, h, rope, values, relpos, tables, xmask, attn_mask, kv_cache, slot):
    """LlamaDecoderLayer.forward for a decoding step: its matmuls through linear() with the norms and residuals
    folded in, its attention through decode_attention (rope: its cos, sin and pos; the new K/V written into cache
    slot `slot`, a device tensor), MMFS over values, relpos terms and level tables made once (mmfs_step_inputs).
    h (B, 1, d) -> (B, 1, d)."""
    a = layer.self_attn
    q, k, v = linear(h, a.q_proj, a.k_proj, a.v_proj, norm=layer.input_layernorm)   # (B, 1, d) each
    h = linear(decode_attention(q, k, v, *rope, kv_cache.kv, slot, attn_mask), a.o_proj, residual=h)
    x = layer.llama_cross_attn
    if x is not None and values is not None:
        ref = h.new_full((1, h.shape[1], 2), 0.5)
        y = mmfs_fast(x.attn, h, ref, values, xmask, False, True, query_norm=x.norm1, relpos=relpos, tables=tables)
        h = h + y * x.gate.tanh().to(y.dtype)
    m = layer.mlp
    return linear(linear(h, m.gate_proj, m.up_proj, glu=True, norm=layer.post_attention_layernorm), m.down_proj,
                  residual=h)


def step_ahead(decoder, tokens):
    """decoder.step(tokens) queued before the host reads the tokens, so the GPU never waits for the host's
    bookkeeping between steps (the step is wasted if every row stops here). -> (tokens on the host, next logits)"""
    tokens_host = tokens.to("cpu", non_blocking=True)
    copied = torch.cuda.Event()
    copied.record()
    next_logits = decoder.step(tokens)
    copied.synchronize()
    return tokens_host, next_logits


def capture_cuda_graph(fn, warmup=1):
    """fn() recorded as a CUDA graph -> (graph, fn's output, which every replay rewrites in place). Warm-up runs
    first on the stream that then captures, so one-time work (cuBLAS's handle and workspace for that stream, cuDNN
    set-up, loading the kernel, cached tables, compilation) stays out of the capture. fn must read nothing back to
    the host. Only this thread's calls can spoil the capture ("thread_local"): another thread pinning host memory
    meanwhile (a data loader's) is not part of the graph. Nor may this thread free a graph during the capture, so
    the garbage collector, which may free a graph kept in a reference cycle, is off then."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    stream.synchronize()
    graph = torch.cuda.CUDAGraph()
    collecting = gc.isenabled()
    gc.disable()
    try:
        with torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
            out = fn()
    finally:
        if collecting:
            gc.enable()
    return graph, out


class _GraphedPrediction:
    """A sampler's guided UNet pass recorded once as a CUDA graph and replayed at every step. Eagerly, one pass is
    thousands of small kernel launches and the GPU waits on the CPU issuing them; replayed, it is one launch.
    Each call copies x and t into the recorded inputs; the result is overwritten by the next call."""

    def __init__(self, predict, x):
        self.x = x.clone()                                                    # (B, 4, h, w), recorded input
        self.t = torch.zeros((), dtype=torch.long, device=x.device)          # the timestep, filled per step
        self.graph, self.out = capture_cuda_graph(lambda: predict(self.x, self.t))   # (B, 4, h, w)

    def __call__(self, x, t):
        self.x.copy_(x)
        self.t.fill_(t)              # fill_: a kernel argument, no host-to-device copy
        self.graph.replay()
        return self.out


MMFS_STEP_BUFFERS = ("mmfs_values", "mmfs_offsets", "mmfs_logits")      # FastDecoder's, from mmfs_step_inputs


class FastDecoder(_Decoder):
    """_Decoder with a cached step of the same shapes every time: the new token's K/V go into cache slot `slot` (a
    device tensor), attention is over all max_len slots with a mask that hides the empty ones (decode_attention's kernel
    reads only the filled ones), every input sits in a buffer rewritten in place, and what each MMFS layer reads of the
    images is made once at prefill (mmfs_step_inputs). So on CUDA one step is captured into a CUDA graph and replayed
    per token: one launch instead of hundreds. compile: the step goes through torch.compile (inside the graph, when
    there is one)."""

    def __init__(self, model, embeds, mask, vision, xmask, max_new_tokens, cuda_graph=None, compile=False):
        super().__init__(model, embeds, mask, vision, xmask, max_new_tokens, use_cache=True)
        # the class's function, called with self: a bound method kept on self would make the decoder a reference
        # cycle, alive (its caches, its CUDA graph's memory) after generation until the garbage collector runs
        self.step_fn = compiled(FastDecoder._step) if compile else FastDecoder._step
        # the graph holds MMFS only where our kernel runs (the reference reads level shapes back to the host)
        can_graph = embeds.is_cuda and (vision is None or kernels_used(embeds.device))
        if cuda_graph and not can_graph:
            raise ValueError(f"cuda_graph=True needs CUDA tensors and, with images, the deformable-attention kernel; "
                             f"got device {embeds.device}")
        self.cuda_graph = can_graph if cuda_graph is None else cuda_graph
        self.graph = None        # captured at the first step, again after the row count changes

    def prefill(self):
        logits = super().prefill()
        B, L = self.mask.shape
        # (B, 1, 1, max_len): the slots to read, in additive form (made once here, not in every step)
        attn = additive_mask(torch.zeros(B, 1, 1, self.max_len, dtype=torch.bool, device=self.mask.device),
                             self.embeds.dtype)
        attn[:, 0, 0, :L] = additive_mask(self.mask.bool(), self.embeds.dtype)
        self.buffers = {"token": self.mask.new_zeros(B),                         # (B,) the token fed
                        "pos": self.mask.sum(-1, keepdim=True),                  # (B, 1) its position
                        "attn": attn}
        if self.vision is not None:   # fresh tensors: beam search reorders the buffers in place
            xmask = self.xmask[:, -1:].clone()                                   # (B, 1, N) the prompt's last row
            made = mmfs_step_inputs(self.model.mm_decoder, self.vision, xmask, self.embeds.dtype)
            self.buffers["xmask"] = xmask
            *per_kind, self.mmfs_tables = zip(*made)
            for name, per_layer in zip(MMFS_STEP_BUFFERS, per_kind):
                self.buffers[name] = torch.stack(per_layer, dim=1)               # (B, MMFS layers, ...)
        c = self.model.mm_decoder.cfg                 # RoPE's tables (max_len, D): every position a step can have
        self.rope = rope_cos_sin(torch.arange(self.max_len, device=self.mask.device),
                                 c.hidden_size // c.num_attention_heads, c.rope_theta, self.embeds.dtype)
        self.length = L                               # slots filled so far (the same in every row: left padding)
        self.slot = self.mask.new_full((1,), L)       # (1,) the slot the next token's K/V go to, on the device
        return logits

    def select(self, index):
        if index.shape[0] != self.buffers["token"].shape[0]:
            self.graph = None             # new row count: new buffers, so the next step captures again
        for name, t in self.buffers.items():
            self.buffers[name] = _select_rows(t, index)
        for cache in self.caches:
            cache.kv = _select_rows(cache.kv, index, dim=1)

    def step(self, tokens):
        b = self.buffers
        b["token"].copy_(tokens)
        b["attn"][:, :, :, self.length].fill_(0)      # the new token sees itself (fill_: no host tensor copied in)
        self.slot.fill_(self.length)
        if not self.cuda_graph:
            logits = self.step_fn(self)
        else:
            if self.graph is None:   # each warm-up run rewrites the same cache slot with the same K/V
                self.graph, self.graph_logits = capture_cuda_graph(lambda: self.step_fn(self), warmup=2)
            self.graph.replay()
            logits = self.graph_logits.clone()        # the next replay overwrites graph_logits
        b["pos"] += 1
        self.length += 1
        return logits

    def _step(self):
        """One token per row from the buffers; fixed shapes, no host sync: the body of the CUDA graph."""
        llm, b = self.model.mm_decoder, self.buffers
        rope = (*self.rope, b["pos"])
        mmfs = None if "xmask" not in b else \
            zip(*(b[k].unbind(1) for k in MMFS_STEP_BUFFERS), self.mmfs_tables)     # per MMFS layer
        h = llm.embed_tokens(b["token"])[:, None]                                 # (B, 1, d)
        for layer, cache in zip(llm.layers, self.caches):
            v, *relpos, tables = next(mmfs) if mmfs is not None and layer.llama_cross_attn is not None else [None] * 4
            h = fast_layer_step(layer, h, rope, v, relpos, tables, b.get("xmask"), b["attn"], cache, self.slot)
        h, head = llm.norm(h[:, -1]), self.model.text_decoder                    # (B, d)
        logits = linear(h, head.head)
        return torch.cat([logits[..., :-head.n_new], logits[..., -head.n_new:] + head.head_new(h)], dim=-1).float()


# -- image sampling: the images' MMFS values made once, each guided UNet pass replayed as one CUDA graph ---------

class KeyedMMFSNet:
    """MMFSNet for a sampler's steps, called as the UNet calls MMFSNet: each block's values (features normalised
    and through value_proj) and each resized position table are made once, since they do not change between steps.
    The image count is checked here, once, so the steps read nothing back from the device."""

    def __init__(self, net, mmfs_features, mmfs_mask, dtype):
        net.mmfs_mid_block.mmfs.check_image_count(mmfs_mask.long().sum(-1))
        feats = net.flatten_features(mmfs_features, dtype)
        self.blocks = [*net.mmfs_down_blocks, net.mmfs_mid_block]
        self.values = [block.mmfs.value_proj(block.feat_norm(feats)) for block in self.blocks]
        self.pos = {}

    def __call__(self, sample, skips, mmfs_features, mmfs_mask, checkpoint=False):
        if len(skips) != len(self.blocks) - 1:
            raise ValueError(f"MMFSNet: {len(skips)} UNet skips, expected {len(self.blocks) - 1}")
        skips = [s + self.block(i, s, mmfs_mask) for i, s in enumerate(skips)]
        return sample + self.block(len(skips), sample, mmfs_mask), skips

    def block(self, i, sample, mask):
        """MMFSBlock.forward of block i over its values."""
        block, (B, C, H, W) = self.blocks[i], sample.shape
        if (i, H, W, sample.dtype) not in self.pos:
            self.pos[i, H, W, sample.dtype] = resize_pos_embed(block.pos_embed, (H, W)).to(sample.dtype)
        q = block.query_norm(sample.flatten(2).transpose(1, 2)) + self.pos[i, H, W, sample.dtype]
        ref = grid_centres(H, W, sample.device)[None]
        y = mmfs_fast(block.mmfs, q, ref, self.values[i], mask, check_mask=False, value_projected=True)
        return block.conv(y.transpose(1, 2).reshape(B, C, H, W))


# ----------------------------------------------------------------------------------------------------------------
# Weight-only quantization: int8 or int4 weights of the LLM and the Q-Formers, dequantized at each matmul. Unlike
# the speed forms, this changes what is computed: the layers run with rounded weights.
# ----------------------------------------------------------------------------------------------------------------

# Symmetric round-to-nearest (ties to even, as torch.round) over groups of `group_size` inputs of one output row:
# scale = max|w| / qmax over the group, q = clamp(round(w / scale), -qmax, qmax), w ~ q * scale, so that
# |w - q * scale| <= scale / 2 for every weight. qmax = 127 for int8 (one group per row: per output channel), 7 for
# int4 (the nibble value -8 is never made, so the range is symmetric). A group of zeros has scale 0 and q 0.

QUANTIZED_LAYERS = ("mm_decoder.layers.*.self_attn.*", "mm_decoder.layers.*.mlp.*",
                    "mm_decoder.layers.*.llama_cross_attn.attn.dynamic_offset_mask",
                    "mm_decoder.layers.*.llama_cross_attn.attn.output_proj", "text_decoder.head",
                    "visual_tokenizer.perceiver_resampler.*", "image_decoder.perceiver_resampler.*")


def quantize_targets(model):
    """Names of the nn.Linear layers `quantize` replaces: the LLM's attention (q/k/v/o) and MLP (gate/up/down)
    matmuls, the two large matmuls of its MMFS layers (the query's and the output's, 5120 x 5120 and 5120 x 1024 at
    13B: read at every decoding step), the text head, and every layer of the two Q-Former resamplers (the visual
    tokenizer's and the image decoder's). Kept as they are: the MMFS layers' small sampling_offsets and
    attention_weights (mmfs_fast reads their weights) and value_proj (run once per image), the text head's small
    head_new, the embeddings, the vision tower, the UNet and the VAE."""
    return [n for n, m in model.named_modules()
            if type(m) is nn.Linear and any(fnmatch.fnmatchcase(n, p) for p in QUANTIZED_LAYERS)]


def quantize_bits(quantize):
    """quantize= of the loaders: None, "int8" or "int4" -> None, 8 or 4."""
    bits = {None: None, "int8": 8, "int4": 4}.get(quantize, 0)
    if bits == 0:
        raise InputError(f"quantize={quantize!r}: expected None, 'int8' or 'int4'")
    return bits


def quantize_weight(w, bits, group_size=None):
    """w (N, K) -> q int8 (N, K') in [-qmax, qmax] and scales (N, K' / group_size) in w's dtype: groups of
    group_size inputs (None: the whole row), K' = K padded with zero weights up to whole groups."""
    qmax = 2 ** (bits - 1) - 1
    N, K = w.shape
    g = group_size or K
    wg = F.pad(w.detach().float(), (0, -K % g)).view(N, -1, g)                 # (N, groups, g)
    scales = (wg.abs().amax(-1) / qmax).to(w.dtype)                            # (N, groups)
    s = scales.float()[..., None]
    q = (wg / torch.where(s > 0, s, 1.0)).round_().clamp_(-qmax, qmax)
    return q.to(torch.int8).view(N, -1), scales


def pack_int4(q):
    """q int8 (N, K) in [-8, 7], K even -> (N, K / 2) uint8: byte j holds input 2j in its low nibble and input
    2j + 1 in its high nibble, each as the unsigned q + 8."""
    u = (q + 8).to(torch.uint8)
    return u[:, 0::2] | (u[:, 1::2] << 4)


def unpack_int4(packed):
    """pack_int4's inverse: (N, K / 2) uint8 -> (N, K) int8."""
    return torch.stack([packed & 15, packed >> 4], dim=-1).view(packed.shape[0], -1).to(torch.int8) - 8


def to_slabs(packed):
    """pack_int4's (N, K / 2) bytes, K a multiple of 32 -> the order a GEMV reads them in, (N', K / 2) with N' = N
    rounded up to 16 (the new rows all q = 0): rows in slabs of 16, each slab stored as its 32-input pieces one
    after another, a piece as its 16 rows' 16 bytes. A warp's 16-byte loads of 8 rows then fill whole 128-byte
    lines, where row-major rows would give it 8 scattered pieces."""
    N, B = packed.shape
    padded = torch.cat([packed, packed.new_full((-N % 16, B), 0x88)])         # (N', B)
    return padded.view(-1, 16, B // 16, 16).transpose(1, 2).reshape(-1, B)   # (slab, piece, row, 16 bytes)


def from_slabs(qweight, n):
    """to_slabs' inverse: the first n rows."""
    B = qweight.shape[1]
    return qweight.view(-1, B // 16, 16, 16).transpose(1, 2).reshape(-1, B)[:n]


def dequantize_weight(qweight, scales, group_size):
    """QuantizedLinear's qweight (int8, or uint8 of int4 in slabs) and scales -> the weight (out, in') in the
    scales' dtype, each q * scale rounded once."""
    q = unpack_int4(from_slabs(qweight, scales.shape[0])) if qweight.dtype == torch.uint8 else qweight   # (out, in')
    w = q.view(q.shape[0], -1, group_size).to(scales.dtype) * scales[..., None]
    return w.view(q.shape[0], -1)


class QuantizedLinear(nn.Module):
    """An nn.Linear whose weight is kept quantized and dequantized at each call: F.linear(x, dequantize(), bias),
    the reference a quantized matmul kernel must equal. Buffers (the layout such a kernel reads):
      qweight  bits 8: int8 (out, in), row-major, q in [-127, 127];
               bits 4: uint8 (out', in' / 2): two inputs per byte as pack_int4 (input 2j low nibble, 2j + 1 high
               nibble, each q + 8 with q in [-7, 7]), the rows in slabs of 16 as to_slabs orders them; in' = in
               rounded up to whole groups and whole 32-input pieces, out' = out rounded up to 16, the padding q = 0
      scales   (out, in' / group_size), the dtype of the weight quantized (the model's float dtype; model.to(dtype)
               casts them with the rest): weight[o, i] = q[o, i] * scales[o, i // group_size]
      bias     the Linear's (out,) Parameter, or None
    bits 8 has one group per row (group_size = in_features: per output channel)."""

    def __init__(self, in_features, out_features, bits, group_size, qweight, scales, bias):
        super().__init__()
        self.in_features, self.out_features, self.bits, self.group_size = in_features, out_features, bits, group_size
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.register_parameter("bias", bias)

    @classmethod
    def from_linear(cls, linear, bits, group_size=128):
        """linear quantized to int8 (per output channel; group_size unused) or int4 (groups of group_size
        inputs, an even number)."""
        if bits not in (4, 8):
            raise ValueError(f"quantize: bits={bits}, expected 8 or 4")
        if bits == 4 and (type(group_size) is not int or group_size <= 0 or group_size % 2):
            raise ValueError(f"quantize: group_size={group_size}, expected a positive even int (two inputs a byte)")
        g = group_size if bits == 4 else linear.in_features
        with torch.no_grad():
            w = linear.weight if bits == 8 else F.pad(linear.weight, (0, -linear.in_features % math.lcm(g, 32)))
            q, scales = quantize_weight(w, bits, g)
        return cls(linear.in_features, linear.out_features, bits, g, to_slabs(pack_int4(q)) if bits == 4 else q,
                   scales, linear.bias)

    def dequantize(self):
        """The weight (out, in): each q * scale rounded once to the scales' dtype."""
        return dequantize_weight(self.qweight, self.scales, self.group_size)[:, :self.in_features]

    def forward(self, x):
        return F.linear(x, self.dequantize(), self.bias)

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, bias={self.bias is not None}")


def quantize_layer(model, name, bits, group_size=128):
    """The nn.Linear at `name` replaced by its QuantizedLinear; its full-precision weight is freed with it."""
    parent, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent)
    setattr(parent, leaf, QuantizedLinear.from_linear(getattr(parent, leaf), bits, group_size))


def quantize(model, bits=8, group_size=128):
    """Weight-only quantization in place of the layers quantize_targets names, one layer at a time (never a
    full-precision copy of them all): bits 8 per output channel, bits 4 in groups of group_size inputs. The plain
    path runs the layers' forward (dequantize, then matmul); a decoding step's gemv reads the quantized weights.
    -> model"""
    for name in quantize_targets(model):
        quantize_layer(model, name, bits, group_size)
    return model


class QuantizeOnLoad:
    """Quantization while a loader fills a meta-built model one tensor at a time: landed(name) after each tensor
    is in place, and a target layer is quantized as soon as all its tensors have landed, so a load holds the
    quantized layers plus those still arriving, never all of them in full precision. finish() quantizes those no
    landing completed (a text head whose new rows the loader derives last). quantize: None (nothing), "int8" or
    "int4" (groups of 128)."""

    def __init__(self, model, quantize):
        self.model, self.bits = model, quantize_bits(quantize)
        names = [] if self.bits is None else quantize_targets(model)
        self.waiting = {n: {f"{n}.{k}" for k, _ in model.get_submodule(n).named_parameters(recurse=False)}
                        for n in names}                    # layer -> its tensors yet to land
        self.layer_of = {t: n for n, ts in self.waiting.items() for t in ts}

    def landed(self, name):
        layer = self.layer_of.pop(name, None)
        if layer is not None:
            self.waiting[layer].discard(name)
            if not self.waiting[layer]:
                quantize_layer(self.model, layer, self.bits)

    def finish(self):
        if self.bits is not None:
            quantize(self.model, self.bits)


# ----------------------------------------------------------------------------------------------------------------
# `python mmi.py [preset] [--key=value ...]`: the architecture's parameter table, built on the meta device
# ----------------------------------------------------------------------------------------------------------------


def parameter_table(model):
    rows = []
    for name, module in model.named_children():
        params = list(module.parameters())
        rows.append((name, sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)))
    for name, p in model.named_parameters(recurse=False):
        rows.append((name, p.numel(), p.numel() if p.requires_grad else 0))
    rows.append(("total", sum(r[1] for r in rows), sum(r[2] for r in rows)))
    return rows


def _usage():
    presets = {name: dict(_config_rows(make())) for name, make in PRESETS.items()}
    keys = list(presets["mmi-13b"])
    columns = [("key", keys), ("type", [type(presets["mmi-13b"][k]).__name__ for k in keys])]
    columns += [(name, [str(values[k]) for k in keys]) for name, values in presets.items()]
    widths = [max(len(cell) for cell in [head, *cells]) + 2 for head, cells in columns]
    table = [[head for head, _ in columns]] + [list(row) for row in zip(*(cells for _, cells in columns))]
    return "\n".join([
        "usage: python mmi.py [preset] [--key=value ...]",
        "",
        "Builds the MM-Interleaved architecture on the meta device (no memory, no weights) and prints each",
        "component's parameter count, all and trainable.",
        "",
        f"  preset       one of {', '.join(PRESETS)} (default mmi-13b, the paper's model; tiny: every width and depth",
        "               small, for tests and the demo)",
        "  --key=value  sets one config value; a dotted key reaches into a section (--llm.num_hidden_layers=8).",
        "               The value is read as the key's type: an int, a float, true or false, or a tuple as",
        "               Python writes it (32,16,8 or True,False). An unknown key or a value that does not read",
        "               is an error (exit 2)",
        "  -h, --help   this text",
        "",
        "config keys, with their type and their value in each preset:",
    ] + ["  " + "".join(f"{cell:<{w}}" for cell, w in zip(row, widths)).rstrip() for row in table])


def main(argv=None):
    """`python mmi.py [preset] [--key=value ...]`: the parameter table of a preset's architecture."""
    args = list(sys.argv[1:] if argv is None else argv)
    if "-h" in args or "--help" in args:
        print(_usage())
        return 0
    preset = args.pop(0) if args and not args[0].startswith("-") else "mmi-13b"
    cfg = apply_overrides(MMIConfig.from_preset(preset), args)
    with torch.device("meta"):
        model = MMInterleaved(cfg)
    print(f"{preset}: {'component':<20} {'parameters':>16} {'trainable':>16}")
    for name, total, trainable in parameter_table(model):
        print(f"{'':{len(preset) + 2}}{name:<20} {total:>16,} {trainable:>16,}")
    return 0


if __name__ == "__main__":
    sys.exit(run_script(main))
