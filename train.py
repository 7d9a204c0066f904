"""Train MM-Interleaved.

    python train.py configs/demo.py [--key=value ...]                       # one process, CPU or one GPU
    torchrun --nproc_per_node=8 train.py configs/pretrain_13b.py [...]      # FSDP over 8 GPUs

A config file is plain Python that assigns names of `TrainConfig` fields; `--key=value` overrides come last,
`--model.<dotted MMIConfig key>=value` changes the model (e.g. --model.llm.num_hidden_layers=2). Both are
type-checked and unknown keys are an error.

The file reads top to bottom: the config, the paper's parameter groups and schedule, the FLOP count behind MFU,
the data streams, the blocks (checkpointing, compiling, FSDP), checkpoints and the export, evaluation, the demo's
VAE-only task, the two tasks' differences, the command line (`main`), and then `run`: its set-up in small
functions, then one flat loop of micro-batches, backward, the NaN guard, clipping, the optimizer step, logging,
evaluation and checkpoints, in which the host reads a step's logged numbers back only once the next step's work
is queued (LateRead), so that the GPU is not left idle between steps.
"""

import contextlib
import dataclasses
import difflib
import gc
import inspect
import json
import math
import os
import queue
import random
import shutil
import sys
import tempfile
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
                                                 # | "finetune" (finetune_dataset)
    batch_size: int = 2                          # rows per micro-batch, per process (pretrain / finetune: set
                                                 # per source / in finetune_args)
    grad_accum: int = 1                          # micro-batches per optimizer step
    seq_len: int = 256                           # tokens per row for demo / synthetic data
    images_per_row: int = 2                      # synthetic data
    num_workers: int = 0                         # DataLoader workers (all but synthetic), at most the CPU cores less
                                                 # one
    demo_num_stories: int = 0                    # stories per demo epoch; 0 = the whole split
    demo_pairs: float = 0.0                      # share of demo training batches made of the stories' openings as
                                                 # image-text pairs (description, then image), 0 <= share < 1
    demo_keep_by_shape: float = 1.0              # share of the demo training stories kept whose edits all name their
                                                 # object by its shape alone; the rest (an edit only the colour
                                                 # resolves: "the purple circle" beside a green one) are all kept
    tokenizer_path: str = ""                     # demo / pretrain / finetune; "" = the demo tokenizer in assets/
    pretrain_sources: tuple = ()                 # data="pretrain", one tuple per source: (name, "mmc4" | "pair",
                                                 # shard pattern, annt_root, data_root, probability, rows per batch)
    finetune_dataset: str = ""                   # data="finetune": the set in data.finetune_dataset ("llava",
                                                 # "vist", "pororo", "flintstones", "ade20k", "demo_qa")
    finetune_args: dict = field(default_factory=dict)    # its keyword arguments: paths, rows per batch, options
                                                 # (e.g. data.llava_dataset: annt, data_root, val_annt, batch_size)
    # optimizer and schedule
    param_groups: tuple = PAPER_PARAM_GROUPS     # AdamW groups (substring of the parameter name, lr, weight decay),
                                                 # the first match wins; the default is the paper's table
    betas: tuple = (0.9, 0.995)                  # AdamW
    eps: float = 1e-6                            # AdamW
    grad_clip: float = 1.0                       # max global grad norm; 0 = no clipping (the norm is still logged)
    lora_rank: int = 0                           # > 0: LoRA of this rank on the LLM's attention and MLP matmuls
                                                 # (mmi.add_lora), everything else frozen; merged on export
    lora_alpha: float = 16.0                     # LoRA's update is scaled by lora_alpha / lora_rank
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
    eval_interval: int = 1000                    # steps between evaluations, and one after the last; 0 = never
    eval_batches: int = 4                        # validation micro-batches per evaluation
    eval_demo_stories: int = 16                  # data="demo": test stories of eval.py's demo scoreboard per evaluation
                                                 # (0: no scoreboard)
    ckpt_interval: int = 1000                    # steps between checkpoints; 0 = only at the end; -1 = never
    keep_last: int = 5                           # checkpoints kept in out_dir
    save_frozen: bool = True                     # False: frozen weights are not written (they come from init_from)
    resume: bool = False                         # continue from the newest checkpoint in out_dir (without it, an
                                                 # out_dir holding an earlier run's checkpoints or metrics is an error)
    export: bool = True                          # at the end: out_dir/model (save_pretrained) or vae.safetensors
    export_dtype: str = ""                       # "" keeps each weight's dtype; "bfloat16" halves it (VAE: float32)
    nan_patience: int = 5                        # stop after this many non-finite steps in a row
    peak_flops: float = 989e12                   # per device, for MFU (H100 SXM dense bf16)
    progress: bool = True                        # tqdm bar on rank 0


# the string fields that take one of a few values
CHOICES = {"task": ("mmi", "vae"), "data": ("demo", "synthetic", "pretrain", "finetune"),
           "dtype": ("bfloat16", "float32"), "frozen_dtype": ("bfloat16", "float32"),
           "export_dtype": ("", "bfloat16", "float32"), "init_device": ("cpu", "cuda")}

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
        raise mmi.InputError(f"{path}:{getattr(e, 'lineno', None) or '?'}: not valid Python: {getattr(e, 'msg', e)}") \
            from None
    values = {"__file__": os.path.abspath(path)}            # so a config can read files beside it
    try:
        exec(code, values)                                   # one namespace, so helpers see the file's names
    except Exception as e:                                   # the file is the user's code: its error is theirs
        line = next((f.lineno for f in reversed(traceback.extract_tb(e.__traceback__)) if f.filename == path), "?")
        raise mmi.InputError(f"{path}:{line}: {type(e).__name__}: {e}") from None
    return {k: v for k, v in values.items()
            if not (k.startswith("_") or callable(v) or isinstance(v, types.ModuleType))}


def _is_number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def load_config(argv):
    """argv = [config.py] [--key=value ...] -> TrainConfig. Config files set fields by plain assignment; their
    values and the command line's strings are checked (and strings parsed) by mmi.parse_value."""
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
                tc = dataclasses.replace(tc, **{key: mmi.parse_value(value, old, key)})
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
                       ("num_workers", 0), ("max_steps", 0), ("lora_rank", 0), ("log_interval", 1),
                       ("warmup_steps", 0), ("eval_interval", 0), ("ckpt_interval", -1), ("images_per_row", 0),
                       ("eval_batches", 0), ("eval_demo_stories", 0), ("demo_num_stories", 0),
                       ("eps", 0.0), ("kl_weight", 0.0), ("grad_clip", 0.0)):
        value = getattr(tc, key)
        if not (value >= least and value != math.inf):          # a NaN compares false: refused too
            raise mmi.InputError(f"{key} {value}, expected {least} or more")
    if not 0 <= tc.seed < 2 ** 32:        # the seeds derived from it (seed * 1_000_003 + ...) stay below torch's 2**64
        raise mmi.InputError(f"seed {tc.seed}, expected an integer in [0, 2**32)")
    if not (math.isfinite(tc.peak_flops) and tc.peak_flops > 0):
        raise mmi.InputError(f"peak_flops {tc.peak_flops}, expected the device's peak FLOP/s (more than 0), for MFU")
    if len(tc.betas) != 2 or not all(_is_number(b) and 0 <= b < 1 for b in tc.betas):
        raise mmi.InputError(f"betas {tc.betas!r}, expected two numbers 0 <= beta < 1, e.g. (0.9, 0.995)")
    for row in tc.param_groups:
        if not (isinstance(row, tuple) and len(row) == 3 and isinstance(row[0], str)
                and all(_is_number(x) and math.isfinite(x) and x >= 0 for x in row[1:])):
            raise mmi.InputError(f"param_groups: row {row!r}, expected rows (substring of the parameter name, lr, "
                                 f"weight decay) with lr and weight decay 0 or more, e.g. ((\"\", 1e-4, 0.05),)")
    if tc.frozen_dtype == "bfloat16" and tc.dtype != "bfloat16":
        raise mmi.InputError("frozen_dtype 'bfloat16' needs dtype 'bfloat16': without autocast a float32 input meets "
                             "the bf16 frozen weights; use frozen_dtype=float32")
    if tc.lora_rank and tc.task != "mmi":
        raise mmi.InputError(f"lora_rank {tc.lora_rank}: LoRA adapts the LLM of task 'mmi', not task {tc.task!r}")
    preset = mmi.MMIConfig.from_preset(tc.preset)
    model_keys = _model_keys(preset)
    for key, value in model_overrides.items():
        if key not in model_keys and key in typed:
            raise _unknown(f"model.{key}", [f"model.{k}" for k in model_keys], "command line", "--")
        if key not in model_keys:
            raise _unknown(key, model_keys, f"{path}: model_overrides")
        if key not in typed:                                  # a config file's value: its type, naming the file
            try:
                mmi.apply_overrides(preset, {key: value})
            except mmi.InputError as e:
                raise mmi.InputError(f"{path}: model_overrides: {e}") from None
    cfg = model_config(tc)                                    # bad model values fail here, before anything starts
    if tc.data == "synthetic" and tc.seq_len < 2 + tc.images_per_row * (cfg.num_img_token + 2):   # synthetic_row
        raise mmi.InputError(f"seq_len {tc.seq_len} cannot hold images_per_row={tc.images_per_row} images of "
                             f"{cfg.num_img_token + 1} tokens each plus text")
    memory = host_memory()
    if tc.data in ("synthetic", "demo") and memory and micro_batch_bytes(tc, cfg) > memory:
        raise mmi.InputError(f"batch_size {tc.batch_size} x seq_len {tc.seq_len}: a micro-batch's inputs alone take "
                             f"{micro_batch_bytes(tc, cfg) / 2 ** 30:,.1f} GiB, more than this process's share of "
                             f"the machine's memory, {memory / 2 ** 30:.1f} GiB; expected fewer rows or tokens")
    return tc


def micro_batch_bytes(tc, cfg):
    """A lower bound on the bytes of one micro-batch's inputs where batch_size and seq_len size the rows (synthetic,
    demo data): token ids and attention mask in int64, and a synthetic row's images at both sizes in float32."""
    images = tc.images_per_row if tc.data == "synthetic" else 0
    S, S_dec = cfg.vision.image_size, cfg.image_decoder.image_size
    return tc.batch_size * (2 * 8 * tc.seq_len + images * 3 * (S * S + S_dec * S_dec) * 4)


def host_memory():
    """Bytes of physical memory this process may count on: the machine's, shared by the processes torchrun starts
    on it; None where the system does not say."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None
    return total // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


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
        row = next((i for i, (sub, _, _) in enumerate(table) if sub in name), None)
        if row is None:
            raise mmi.InputError(f"param_groups: no row matches the trainable weight {name!r}; a last row for \"\" "
                                 f"matches every weight")
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
# Counted, from the model's own layers at the positions where they run: every matrix multiply and convolution of
# the forward pass (2 FLOPs per multiply-add) and the attention products QK^T and AV (over the full square, causal
# or not: the PaLM / Megatron convention); then the backward pass, as much again for the input's gradient (every
# layer but those reading the data: the patch embedding, the adapter stem's first convolution, the UNet's conv_in
# and time embedding; a frozen VAE runs forward only) and as much again for the weight's gradient where the weight
# trains. Not counted: norms, activations, softmax, RoPE, the deformable bilinear sampling (gather-bound), the
# one-hot picks of MMFS's table rows (speed_up's form), and the recomputation that activation checkpointing adds
# (so this is MFU, not HFU). A count assumes every output of a part gets a gradient (true with the image decoder on).


def mm(rows, *layers, grad_in=True):
    """Training FLOPs of nn.Linear / nn.Conv2d layers run at `rows` positions each (a convolution's output positions,
    a transposed one's input positions): the forward, the input's gradient unless grad_in=False, the weight's
    gradient where it trains. None layers count 0."""
    return sum(2 * rows * m.weight.numel() * (1 + grad_in + m.weight.requires_grad) for m in layers if m is not None)


def attention_products(n, q_rows, k_rows, width, grad=True):
    """QK^T and AV of n sequences: forward, and with grad the backward's four products."""
    return 4 * n * q_rows * k_rows * width * (3 if grad else 1)


def mmfs_flops(mmfs, B, Lq, n):
    """MMFS for B rows of Lq queries over n images each, in speed_up's form: the query's layers once per query, the
    table of query_relpos through the two heads once, value_proj once per image token."""
    value_rows = B * n * sum(s * s for s in mmfs.spatial_shapes)
    heads = (mmfs.sampling_offsets, mmfs.attention_weights)
    return (mm(B * Lq, mmfs.dynamic_offset_mask, *heads, mmfs.output_proj) + mm(value_rows, mmfs.value_proj)
            + mm(mmfs.max_num_image_per_seq, *heads, grad_in=mmfs.query_relpos.weight.requires_grad))


def llm_flops(model, B, L, N):
    """The LLM with its MMFS layers and the text head, on B rows of L tokens with N image slots per row."""
    total = mm(B * L, model.text_decoder.head, model.text_decoder.head_new)
    for layer in model.mm_decoder.layers:
        a, m = layer.self_attn, layer.mlp
        total += mm(B * L, a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj)
        total += attention_products(B, L, L, a.q_proj.out_features)
        if layer.llama_cross_attn is not None and N:          # a batch without images skips MMFS
            total += mmfs_flops(layer.llama_cross_attn.attn, B, L, N)
    return total


def qformer_flops(resampler, n, kv_rows):
    """A PerceiverResampler's Q-Former: n sets of its queries, each set reading kv_rows encoder tokens."""
    Q, total = resampler.queries.shape[1], 0
    for layer in resampler.blip2qformer.encoder["layer"]:
        s, x = layer.attention, layer.crossattention
        total += mm(n * Q, s.attention.query, s.attention.key, s.attention.value, s.output.dense,
                    layer.intermediate_query.dense, layer.output_query.dense)
        total += attention_products(n, Q, Q, s.attention.query.out_features)
        if x is not None:
            total += mm(n * Q, x.attention.query, x.output.dense) + mm(n * kv_rows, x.attention.key, x.attention.value)
            total += attention_products(n, Q, kv_rows, x.attention.query.out_features)
    return total


def vision_flops(tokenizer, n):
    """The visual tokenizer on n images: CLIP's ViT (1 + G*G tokens), the adapter (its stem on the image resized
    to 16G per side, its pyramid of sides 2G, G, G/2), the Q-Former resampler and the projections."""
    vm = tokenizer.encoder["vision_model"]
    G = vm.cfg.grid_size
    T, P = 1 + G * G, sum(s * s for s in (2 * G, G, G // 2))
    total = mm(G * G, vm.embeddings.patch_embedding, grad_in=False)
    for layer in vm.encoder["layers"]:
        a = layer.self_attn
        total += mm(T, a.q_proj, a.k_proj, a.v_proj, a.out_proj, layer.mlp.fc1, layer.mlp.fc2)
        total += attention_products(1, T, T, a.q_proj.out_features)
    spm = vm.adapter_spm
    total += mm((8 * G) ** 2, spm.stem[0], grad_in=False) + mm((8 * G) ** 2, spm.stem[3], spm.stem[6])
    total += mm((4 * G) ** 2, spm.fc1) + mm((2 * G) ** 2, spm.conv2[0], spm.fc2)
    total += mm(G * G, spm.conv3[0], spm.fc3) + mm((G // 2) ** 2, spm.conv4[0], spm.fc4)
    for block in vm.adapter_interactions:
        a = block.injector.attn                               # the patches read the pyramid
        total += mm(G * G, a.sampling_offsets, a.attention_weights, a.output_proj) + mm(P, a.value_proj)
        for e in [block.extractor, *(block.extra_extractors or ())]:     # the pyramid reads the patches
            a, f = e.attn, e.ffn
            total += mm(P, a.sampling_offsets, a.attention_weights, a.output_proj, f.fc1, f.dwconv["dwconv"], f.fc2)
            total += mm(G * G, a.value_proj)
    total += mm((2 * G) ** 2, vm.adapter_up)
    Q = tokenizer.perceiver_resampler.queries.shape[1]
    total += mm(T, tokenizer.pos_proj) + qformer_flops(tokenizer.perceiver_resampler, 1, T) + mm(Q, tokenizer.proj)
    return n * total


def blocks_flops(blocks, side, context=0, grad=True):
    """UNet or VAE blocks run one after another from `side` per side: each resnet, then its attention if the block
    has them, then the block's down- or upsampler. context: the condition tokens a UNet's cross-attention reads.
    -> (FLOPs, the side of the output)"""
    total = 0
    for block in blocks:
        attentions = list(getattr(block, "attentions", ()))
        for i, r in enumerate(block.resnets):
            total += mm(side ** 2, r.conv1, r.conv2, getattr(r, "conv_shortcut", None), grad_in=grad)
            total += mm(1, getattr(r, "time_emb_proj", None))                       # once per image
            t, HW = attentions[i] if i < len(attentions) else None, side ** 2
            if isinstance(t, mmi.VAEAttention):
                total += mm(HW, t.to_q, t.to_k, t.to_v, t.to_out[0], grad_in=grad)
                total += attention_products(1, HW, HW, t.to_q.out_features, grad)
            elif t is not None:                                                       # a Transformer2DModel
                total += mm(HW, t.proj_in, t.proj_out)
                for b in t.transformer_blocks:
                    a1, a2, width = b.attn1, b.attn2, b.attn1.to_q.out_features
                    total += mm(HW, a1.to_q, a1.to_k, a1.to_v, a1.to_out[0], a2.to_q, a2.to_out[0], b.ff.net[0].proj,
                                b.ff.net[2]) + mm(context, a2.to_k, a2.to_v)
                    total += attention_products(1, HW, HW + context, width)          # self- and cross-attention
        for d in getattr(block, "downsamplers", ()):
            side //= 2
            total += mm(side ** 2, d.conv, grad_in=grad)
        for u in getattr(block, "upsamplers", ()):
            side *= 2
            total += mm(side ** 2, u.conv)
    return total, side


def unet_flops(unet, context):
    """The UNet on one latent, its cross-attention reading `context` condition tokens."""
    side, t = unet.cfg.sample_size, unet.time_embedding
    flops, _ = blocks_flops([*unet.down_blocks, unet.mid_block, *unet.up_blocks], side, context)
    return (flops + mm(side ** 2, unet.conv_in, grad_in=False) + mm(side ** 2, unet.conv_out)
            + mm(1, t.linear_1, grad_in=False) + mm(1, t.linear_2))


def vae_flops(vae, size, decoder=False):
    """The VAE's encoder (and quant_conv) on one image of `size` per side, with decoder=True its decoder too. A
    frozen VAE runs forward only; one that trains gets gradients everywhere but at the pixels."""
    enc, grad = vae.encoder, any(p.requires_grad for p in vae.parameters())
    flops, side = blocks_flops([*enc.down_blocks, enc.mid_block], size, grad=grad)
    total = flops + mm(size ** 2, enc.conv_in, grad_in=False) + mm(side ** 2, enc.conv_out, vae.quant_conv,
                                                                    grad_in=grad)
    if decoder:
        flops, size = blocks_flops([vae.decoder.mid_block, *vae.decoder.up_blocks], side)
        total += flops + mm(side ** 2, vae.post_quant_conv, vae.decoder.conv_in) + mm(size ** 2, vae.decoder.conv_out)
    return total


def image_decoder_flops(model, n, context_rows):
    """The image path for n images whose contexts are padded to context_rows tokens: context_feat_proj, the
    decoder's resampler, the UNet (reading the resampler's queries), its MMFS blocks (one per skip and one on the
    mid output, each image's queries reading the previous image's maps), and the frozen VAE's encoder."""
    dec, sd = model.image_decoder, model.image_decoder.decoder
    total = mm(n * context_rows, model.context_feat_proj) + qformer_flops(dec.perceiver_resampler, n, context_rows)
    ucfg = sd.unet.cfg
    sides = [s for _, s in mmi.unet_skip_layout(ucfg)] + [ucfg.sample_size >> (len(ucfg.block_out_channels) - 1)]
    for b, s in zip([*sd.mmfs_module.mmfs_down_blocks, sd.mmfs_module.mmfs_mid_block], sides):
        total += mmfs_flops(b.mmfs, n, s * s, 1) + mm(n * s * s, b.conv)
    per_image = unet_flops(sd.unet, dec.perceiver_resampler.queries.shape[1]) + vae_flops(sd.vae, dec.cfg.image_size)
    return total + n * per_image


def train_flops(model, batch):
    """Training FLOPs of one micro-batch (its host copy) of an MMInterleaved."""
    ids, num = batch["text_ids"], batch["num_image_per_seq"]
    (B, L), n = ids.shape, int(num.sum())
    total = llm_flops(model, B, L, int(num.max()) if B else 0)
    w_img = batch.get("loss_img_weight")
    if n and (model.cfg.loss_img_weight if w_img is None else w_img) != 0:   # else the image decoder is skipped
        start = batch.get("nearest_bos_idxs")
        soi = (ids == model.cfg.soi_token_id).nonzero()[:, 1]                 # each image's context ends at its soi
        context = int((soi - (0 if start is None else torch.as_tensor(start)) + 1).max())
        total += image_decoder_flops(model, n, context)
    return float(total + (vision_flops(model.visual_tokenizer, n) if n else 0))


# ----------------------------------------------------------------------------------------------------------------
# Data: endless micro-batches, each carrying the state to resume right after it
# ----------------------------------------------------------------------------------------------------------------


def synthetic_row(cfg, index, seed, length, n_images):
    """Row `index` of a random corpus: bos, then text and images in a fixed layout; the same on every machine."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + index)
    image_len = 1 + cfg.num_img_token
    text_len = length - 1 - n_images * image_len          # at least a word before each image and after the last
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
    if tc.data == "finetune":
        return data.finetune_dataset(tc.finetune_dataset, tok, cfg, split, rank, world, tc.seed, **tc.finetune_args)
    if tc.data == "demo":
        return data.demo_dataset(tok, split, tc.seq_len, cfg.num_img_token, tc.batch_size,
                                 num_stories=tc.demo_num_stories or None, seed=tc.seed,
                                 image_size=cfg.vision.image_size, rank=rank, world_size=world,
                                 pairs=tc.demo_pairs if split == "train" else 0.0,
                                 keep_by_shape=tc.demo_keep_by_shape if split == "train" else 1.0)
    sources, probs, packs = [], [], []
    transform = data.DualTransform(cfg.vision.image_size, cfg.image_decoder.image_size)
    for name, kind, shards, annt_root, data_root, prob, rows in tc.pretrain_sources:
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
    generator (seed, rank, epoch), never from the global RNG that the training loop's noise comes from. A whole
    epoch that gives no batch is an InputError: the data cannot fill one."""
    epoch, positions = (state["epoch"], dict(state["positions"])) if state else (0, {})
    turn, workers = (state.get("turn", 0), state.get("workers", tc.num_workers)) if state else (0, tc.num_workers)
    while True:
        whole, batches = not positions, 0            # whole: the epoch is read from its start
        dataset.set_epoch(epoch)
        dataset.load_state_dict(positions)
        dataset.first_worker = turn
        seed = torch.Generator().manual_seed(tc.seed * 1_000_003 + epoch * 1009 + rank)
        stream = iter(torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers,
                                                  persistent_workers=False, generator=seed))
        try:
            for batch in stream:
                batches += 1
                dataset.record_position(positions, batch)
                turn = (batch["meta"]["position"]["reader"] + 1) % max(workers, 1)   # readers rank * n + w
                batch["meta"]["resume"] = {"epoch": epoch, "positions": dict(positions), "turn": turn,
                                           "workers": workers}
                yield batch
        finally:
            if workers:
                stream._shutdown_workers()           # now, also when the stream is closed mid-epoch
        if whole and not batches:
            if workers:                              # their counts stayed in their processes: count again here
                read_quietly(dataset)
            raise no_batch_error(dataset, tc, rank)
        epoch, positions, turn = epoch + 1, {}, 0


def read_quietly(dataset):
    """A pass over `dataset` in this process, without its [data] lines, for the counts it keeps (`last_stats`)."""
    verbose, dataset.verbose = dataset.verbose, False
    try:
        for _ in dataset:
            pass
    finally:
        dataset.verbose = verbose


def no_batch_error(dataset, tc, rank):
    """The error for an epoch of `dataset` that gave no batch: its sources, each with what it read, used and skipped
    by reason, as this process counted them (read_quietly, where DataLoader workers read the epoch)."""
    where = {"pretrain": "pretrain_sources", "finetune": f"finetune_dataset {tc.finetune_dataset!r}"}.get(
        tc.data, f"data {tc.data!r}")
    counts = []
    for name, stats in getattr(dataset, "last_stats", {}).items():
        if isinstance(stats, dict):
            skipped = ", ".join(f"{k}={v}" for k, v in sorted(stats.items()) if ":" in k) or "nothing"
            counts.append(f"{name}: {stats.get('lines', 0)} lines, {stats.get('docs_used', 0)} documents used, "
                          f"{stats.get('rows', 0)} rows, skipped {skipped}")
    names = [s.name for s in getattr(dataset, "sources", ())] or [getattr(dataset, "name", tc.data)]
    return mmi.InputError(f"{where}: a whole pass over {', '.join(names)}"
                          + (f" on rank {rank}" if dist.is_initialized() else "") + " made no batch of rows ("
                          + ("; ".join(counts) or "nothing read")
                          + "); expected enough usable documents to fill one")


def train_batches(cfg, tc, rank, world, state=None):
    if tc.data == "synthetic":
        return synthetic_batches(cfg, tc, rank, world, state)
    return dataset_batches(mixed_dataset(cfg, tc, "train", rank, world), tc, rank, state)


def val_batches(cfg, tc, rank, world):
    """The same `eval_batches` validation micro-batches at every evaluation; None where there is no split."""
    if tc.data == "synthetic":
        stream = synthetic_batches(cfg, dataclasses.replace(tc, seed=tc.seed + 1), rank, world, None)
    elif tc.data in ("demo", "finetune"):
        tc = dataclasses.replace(tc, num_workers=0)
        dataset = mixed_dataset(cfg, tc, "val", rank, world)
        if dataset is None:
            return None
        stream = dataset_batches(dataset, tc, rank, None)
    else:
        return None
    return [next(stream) for _ in range(tc.eval_batches)]


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
# Blocks: activation checkpointing, torch.compile, FSDP
# ----------------------------------------------------------------------------------------------------------------


def repeated_blocks(model):
    """The blocks an MMInterleaved runs one after another and checkpoints with gradient_checkpointing: CLIP and
    LLaMA layers, UNet and UNet-MMFS blocks."""
    sd = model.image_decoder.decoder
    return [*model.visual_tokenizer.encoder["vision_model"].encoder["layers"], *model.mm_decoder.layers,
            *sd.unet.down_blocks, sd.unet.mid_block, *sd.unet.up_blocks, *sd.mmfs_module.mmfs_down_blocks,
            sd.mmfs_module.mmfs_mid_block]


def compile_units(model):
    """What --compile puts through torch.compile (compile_blocks): the repeated blocks, but each UNet block as its
    resnets and transformers. Blocks of one structure share a graph; the UNet's blocks all differ, their parts
    repeat (at 13B: 9 blocks of 9 structures, 38 parts of 15), so the parts compile less. Down- and upsamplers (a
    convolution each, 5 structures at 13B) have nothing to fuse: they stay eager, their inputs kept for the backward
    pass (at 13B the same peak memory)."""
    unet = model.image_decoder.decoder.unet
    split = {id(b) for b in (*unet.down_blocks, unet.mid_block, *unet.up_blocks)}
    parts = lambda block: [m for p in block.children() for m in (p if isinstance(p, torch.nn.ModuleList) else [p])
                           if not isinstance(m, (mmi.Downsample2D, mmi.Upsample2D))]
    return [u for block in repeated_blocks(model) for u in (parts(block) if id(block) in split else [block])]


def fsdp_blocks(model):
    """The modules of an MMInterleaved that FSDP shards as units: every block whose forward the model calls (a
    unit's weights are gathered by its forward hook, so containers that are only iterated cannot be units): the
    repeated blocks, then the rest."""
    blocks = repeated_blocks(model)
    for inter in model.visual_tokenizer.encoder["vision_model"].adapter_interactions:
        blocks += [inter.injector, inter.extractor, *(inter.extra_extractors or ())]
    return blocks + [model.visual_tokenizer.perceiver_resampler, model.mm_decoder.embed_tokens, model.text_decoder,
                     model.image_decoder.perceiver_resampler]


def frozen_vae(model):
    """The parameters of a frozen VAE in the model (the image decoder's): it runs forward only, in float32, so they
    are never cast to frozen_dtype and FSDP keeps them whole on every rank."""
    return {p for m in model.modules() if isinstance(m, mmi.AutoencoderKL) for p in m.parameters()
            if not p.requires_grad}


def _block_forward(block, *args, **kwargs):
    return type(block).forward(block, *args, **kwargs)


def _checkpointed_block_forward(block, *args, **kwargs):
    return torch.utils.checkpoint.checkpoint(type(block).forward, block, *args, use_reentrant=False, **kwargs)


def compile_blocks(blocks, checkpoint, backend="inductor"):
    """Each block's forward through torch.compile while gradients are on (training), with its activation
    checkpointing inside the compiled function: compile around checkpoint, so that the backward pass's
    recomputation is compiled too (checkpoint around a compiled block recompiles or breaks). The forward is
    replaced, not the module: state_dict keys stay, and FSDP's hooks, which run around forward, stay outside.
    The block is an argument of the compiled function, so blocks of one structure (block_structure) share one
    compiled graph (CompiledStructure). Each structure gets a function of its own: dynamo keeps shapes per
    function, so one function for all would compile a UNet resnet's channels and resolution as dynamic sizes, which
    take longer to compile; per structure, only the sizes that do vary become dynamic."""
    body = _checkpointed_block_forward if checkpoint else _block_forward
    if checkpoint and _only_plain_rng_replay_cacheable():
        # the recomputation replays the RNG of attention ops (tagged random even without dropout); where Inductor
        # cannot cache the CUDA-graph-safe form of that replay (torch 2.11), every warm run would recompile those
        # blocks. A training step is never captured as a CUDA graph, so the plain replay serves, and it caches.
        torch._functorch.config.graphsafe_rng_functionalization = False
    structures = {}
    for block in blocks:
        structure = block_structure(block)
        if structure not in structures:
            # a copy of body under its own name: dynamo keeps compiled code and shape history per code and name
            code = body.__code__.replace(co_name=f"{body.__name__}_{len(structures)}")
            structures[structure] = CompiledStructure(types.FunctionType(code, body.__globals__), backend)
        block.forward = types.MethodType(structures[structure], block)


def block_structure(block):
    """What one compiled graph can serve: the block's class, its weight shapes and the plain settings (numbers,
    strings, tuples) of it and its modules, which the compiled code holds as constants (an MMFS block's offset
    scales, set by the resolution it runs at)."""
    settings = tuple((name, k, v) for name, m in block.named_modules() for k, v in vars(m).items()
                     if isinstance(v, (int, float, str, tuple)))
    return type(block), tuple((n, p.shape) for n, p in block.named_parameters()), settings


def _only_plain_rng_replay_cacheable():
    from torch._prims import rng_prims
    return rng_prims.run_and_save_rng_state.cacheable() and not rng_prims.graphsafe_run_with_rng_state.cacheable()


class CompiledStructure:
    """The forward of the blocks of one structure, compiled once. The first round (each block's first call with
    gradients on) runs eager and notes its tensor arguments' sizes; the rounds after run compiled, with the sizes
    that differed within the first round dynamic from the start (a UNet resnet at two resolutions).
    Compiled from the first call, such a structure would compile twice: static at its first size, then again with
    that size symbolic once a second one comes. Without gradients (evaluation, sampling) blocks run eager."""

    def __init__(self, body, backend):
        self.body, self.compiled = body, mmi.compiled(body, backend=backend)
        self.first_round = {}                    # id(block) -> {argument: size} of its first call
        self.varying = None                      # then {argument: [dims]} whose size differed between those calls

    def __call__(self, block, *args, **kwargs):
        if not torch.is_grad_enabled():
            return _block_forward(block, *args, **kwargs)
        sizes = {k: v.shape for k, v in (*enumerate(args), *kwargs.items()) if torch.is_tensor(v)}
        if self.varying is None:
            if id(block) not in self.first_round:
                self.first_round[id(block)] = sizes
                return self.body(block, *args, **kwargs)
            first, *rest = self.first_round.values()
            self.varying = {k: [d for d in range(len(size)) if any(r[k][d] != size[d] for r in rest)]
                            for k, size in first.items() if all(len(r.get(k, ())) == len(size) for r in rest)}
        args, kwargs = list(args), dict(kwargs)
        for k, dims in self.varying.items():
            if dims and k in sizes:
                # the mark goes on an alias: it stays with its tensor, which blocks of another structure may read
                where = args if isinstance(k, int) else kwargs
                where[k] = where[k].view_as(where[k])
                torch._dynamo.maybe_mark_dynamic(where[k], dims)
        return self.compiled(block, *args, **kwargs)


def shard_model(model, units, tc, device):
    """FSDP2 (`fully_shard`) per unit, then the root, over all processes. bf16: trainable parameters gathered in
    bf16 from float32 shards (the master weights), gradients reduced in float32. Frozen weights are FSDP's ignored
    parameters by default: whole on every rank and never gathered (13B: 27 GB in bf16 on each GPU, where sharded
    ones are all 13.4 billion gathered twice a step, for the forward pass and for the backward pass's
    recomputation); a unit with nothing trainable is no unit at all. shard_frozen=True shards them like the rest:
    less memory, more traffic. A frozen VAE is always whole (it runs forward-only in float32, as the original)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    # the mesh on the run's device: FSDP's default mesh is CUDA's whenever a GPU is visible, even for a CPU run
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    # inputs are not cast by FSDP: a block that activation checkpointing recomputes in the backward pass would
    # get them uncast the second time (FSDP skips its pre-forward work then); autocast sets the compute dtype
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if tc.dtype == "bfloat16" else None,
                              reduce_dtype=torch.float32, cast_forward_inputs=False)
    ignored = frozen_vae(model)
    if not tc.shard_frozen:
        ignored |= {p for p in model.parameters() if not p.requires_grad}
    for t in [*ignored, *model.buffers()]:         # FSDP moves only what it manages to the device
        t.data = t.data.to(device)
    for unit in units:
        own = set(unit.parameters())
        if own - ignored:
            fully_shard(unit, mesh=mesh, mp_policy=mp, ignored_params=(own & ignored) or None)
    fully_shard(model, mesh=mesh, mp_policy=mp, ignored_params=ignored or None)
    return model


def all_reduce(t, op=None):
    if dist.is_initialized():
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


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
    try:
        _barrier()
        opts = StateDictOptions(ignore_frozen_params=not tc.save_frozen)
        model_sd, optim_sd = get_state_dict(model, optimizer, options=opts)
        with warnings.catch_warnings():  # DCP warns that it runs in one process when there is no process group
            warnings.filterwarnings("ignore", message=".*assuming the intent is to")
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp)
        torch.save({"step": step, **rank_state, "rng": rng_state(device)}, os.path.join(tmp, f"rank{rank}.pt"))
        if rank == 0:
            with open(os.path.join(tmp, "config.json"), "w") as f:
                json.dump({"train": dataclasses.asdict(tc), "model": cfg.to_dict()}, f, indent=1)
    except BaseException as e:           # a save that stops (Ctrl-C, a full disk) leaves no part of itself
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        if any(isinstance(exc, KeyboardInterrupt) for exc, _ in getattr(e, "failures", {}).values()):
            raise KeyboardInterrupt from None        # Ctrl-C inside dcp.save, which wraps it in a CheckpointException
        raise
    _barrier()
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in checkpoints(tc.out_dir)[:-tc.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def damaged_checkpoint(path, name, problem):
    """The error for checkpoint file `name` that is missing, cut short or unreadable (`problem`: those words, or the
    exception reading it raised)."""
    if isinstance(problem, Exception):
        problem = "missing" if isinstance(problem, FileNotFoundError) else f"unreadable ({type(problem).__name__})"
    return mmi.InputError(f"{os.path.join(path, name)}: {problem}; the checkpoint is damaged or incomplete: remove "
                          f"{path} to resume from the one before it, or train into another --out_dir")


def check_checkpoint(path, tc):
    """The checkpoint that resume=True reads, checked before the model is built: this rank's state file, the
    config, the index and every file it names (none shorter than the index says) are there and readable, and the
    checkpoint was saved for this run's model (architecture, task and lora_rank alike)."""
    import pickle
    import torch.distributed.checkpoint as dcp
    rank_file = f"rank{os.environ.get('RANK', '0')}.pt"
    if not os.path.exists(os.path.join(path, rank_file)):
        raise mmi.InputError(f"{path}: no {rank_file}; was it written by a run with fewer processes?")
    unreadable = (OSError, EOFError, ValueError, RuntimeError, pickle.UnpicklingError)
    try:
        with open(os.path.join(path, "config.json")) as f:
            saved = json.load(f)
        saved_train, saved_model = dict(saved["train"]), dict(saved["model"])
    except (*unreadable, KeyError, TypeError) as e:
        raise damaged_checkpoint(path, "config.json", e) from None
    try:
        storage = dcp.FileSystemReader(path).read_metadata().storage_data.values()
    except unreadable as e:
        raise damaged_checkpoint(path, ".metadata", e) from None
    for info in storage:
        file = os.path.join(path, info.relative_path)
        if not os.path.isfile(file):
            raise damaged_checkpoint(path, info.relative_path, "missing")
        if os.path.getsize(file) < info.offset + info.length:
            raise damaged_checkpoint(path, info.relative_path, "cut short")
    try:
        torch.load(os.path.join(path, rank_file), weights_only=True)
    except unreadable as e:
        raise damaged_checkpoint(path, rank_file, e) from None
    ours = json.loads(json.dumps({"task": tc.task, "lora_rank": tc.lora_rank, "model": model_config(tc).to_dict()}))
    theirs = {"task": saved_train.get("task"), "lora_rank": saved_train.get("lora_rank"), "model": saved_model}
    differs = mmi.first_difference(architecture(theirs), architecture(ours))
    if differs:
        raise mmi.InputError(f"{path}: saved for another model: {differs[0]} is {differs[1]!r} there, {differs[2]!r} "
                             f"in this run; resume with the settings in its config.json, or train into another "
                             f"--out_dir")


def load_checkpoint(path, model, optimizer, tc, rank, device):
    """Model, optimizer and this rank's state (step, data position, RNG) from a checkpoint directory (checked by
    check_checkpoint)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
    rank_file = os.path.join(path, f"rank{rank}.pt")
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


def export_model(model, tc, cfg, val, rank, world, device):
    """out_dir/model: the trained model in mmi's own format (`MMInterleaved.save_pretrained`), for sample.py and
    eval.py, with its tokenizer inside (tokenizer.model / tokenizer.json) so the folder is self-contained; written
    atomically. Under FSDP the full weights are gathered to rank 0 (on the CPU) and written from an unsharded copy.
    LoRA layers are merged into their weights first: the folder holds the plain model."""
    import data
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    path = os.path.join(tc.out_dir, "model")
    tokenizer = (tc.tokenizer_path or data.DEMO_TOKENIZER_PATH) if tc.data in ("demo", "pretrain", "finetune") \
        else None
    extra = {"tokenizer.json" if tokenizer.endswith(".json") else "tokenizer.model": tokenizer} if tokenizer else None
    dtype = getattr(torch, tc.export_dtype) if tc.export_dtype else None
    if world == 1:
        mmi.merge_lora(model).save_pretrained(path, dtype=dtype, extra_files=extra)
    else:
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:
            with torch.device("meta"):
                plain = mmi.MMInterleaved(cfg)
                if tc.lora_rank:
                    mmi.add_lora(plain, tc.lora_rank, tc.lora_alpha)
            plain.load_state_dict(full, assign=True)
            mmi.merge_lora(plain).save_pretrained(path, dtype=dtype, extra_files=extra)
        _barrier()
    if rank == 0:
        print(f"wrote {path} (the trained model: python sample.py --init_from={path})")


def _barrier():
    if dist.is_initialized():
        dist.barrier()


# ----------------------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------------------


def scores_demo(tc):
    """Whether an evaluation also runs eval.py's demo scoreboard: an MM-Interleaved on the demo data, with stories."""
    return tc.data == "demo" and tc.task == "mmi" and tc.eval_demo_stories > 0


@torch.no_grad()
def evaluate(model, task, tc, batches, device, autocast):
    """Validation loss over fixed batches (averaged over ranks); on the demo, for a model that writes stories,
    also eval.py's demo metrics."""
    model.eval()
    sums = {}
    for batch in batches or ():
        with autocast:
            out = task.loss(model, batch, device)
        for k, v in out.items():
            if k.startswith("loss"):
                sums[k] = sums.get(k, 0.0) + v.detach().float()
    metrics = {}
    if sums:
        names = sorted(sums)
        means = all_reduce(torch.stack([sums[k] for k in names])) / (len(batches) * (dist.get_world_size()
                                                                                   if dist.is_initialized() else 1))
        metrics = {f"val_{k}": v for k, v in zip(names, means.tolist())}
    if scores_demo(tc):
        import eval as evaluator                   # eval.py, beside this file
        # generation reads root weights directly: gather them for the duration (a no-op without FSDP)
        if hasattr(model, "unshard"):
            model.unshard()
        # no autocast weight cache: a decoding step captured as a CUDA graph then makes its own bf16 casts instead
        # of reading copies that autocast cached outside the graph
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=tc.dtype == "bfloat16", cache_enabled=False):
            metrics.update(evaluator.demo_metrics(model, tc.eval_demo_stories))
        if hasattr(model, "reshard"):
            model.reshard()
    model.train()
    return metrics


# ----------------------------------------------------------------------------------------------------------------
# The VAE on its own (task="vae"): the demo has no pretrained SD VAE, so configs/demo_vae.py trains one first
# ----------------------------------------------------------------------------------------------------------------


class VAETraining(nn.Module):
    """The image decoder's VAE as a model to train on its images alone: MSE reconstruction of the decoder's image
    targets (in [-1, 1]) plus `kl_weight` x the KL divergence to N(0, 1), per latent element (SD's autoencoder loss
    without its perceptual and adversarial terms, which flat-coloured shapes do not need)."""

    def __init__(self, cfg: mmi.VAEConfig, kl_weight):
        super().__init__()
        self.vae = mmi.AutoencoderKL(cfg)
        self.kl_weight = kl_weight

    def forward(self, images):
        """images [B_I, 3, S, S] in [0, 1] -> {"loss", "loss_rec", "loss_kl"}"""
        x = images * 2 - 1
        mean, logvar = self.vae.encode(x)                                       # (B_I, 4, S/8, S/8) each
        rec = self.vae.decode(self.vae.sample(mean, logvar))
        loss_rec = F.mse_loss(rec.float(), x.float())
        loss_kl = 0.5 * (mean.float() ** 2 + logvar.float().exp() - 1 - logvar.float()).mean()
        return {"loss": loss_rec + self.kl_weight * loss_kl, "loss_rec": loss_rec.detach(), "loss_kl": loss_kl.detach()}


def build_vae(tc, cfg, init_device):
    with init_device:
        return VAETraining(cfg.vae, tc.kl_weight)


def vae_loss(model, batch, device):
    return model(mmi.MMInterleaved.decoder_images(batch).to(device, non_blocking=True))


def vae_train_flops(model, batch):
    images = mmi.MMInterleaved.decoder_images(batch)
    return float(images.shape[0] * vae_flops(model.vae, images.shape[-1], decoder=True))


def vae_blocks(model):
    return [*model.vae.encoder.down_blocks, *model.vae.decoder.up_blocks]


def export_vae(model, tc, cfg, val, rank, world, device):
    """out_dir/vae.safetensors, with the scaling factor that gives the validation latents unit variance (SD's recipe
    for its 0.18215) in the metadata; written atomically by rank 0, which also says what fraction of validation
    images reconstruct as the same scene (data.read_scene: the VAE's ceiling for the demo)."""
    import data
    val = val or val_batches(cfg, dataclasses.replace(tc, eval_batches=max(tc.eval_batches, 1)), rank, world)
    if rank != 0:
        return
    vae, path = model.vae, os.path.join(tc.out_dir, "vae.safetensors")
    latents, same, total = [], 0, 0
    with torch.no_grad():
        for b in val:
            x = mmi.MMInterleaved.decoder_images(b).to(device).float()
            z = vae.sample(*vae.encode(x * 2 - 1))
            latents.append(z)
            rec = (vae.decode(z).float().clamp(-1, 1) + 1) / 2
            for a, r in zip(x.cpu().numpy(), rec.cpu().numpy()):
                same += data.read_scene(a) == data.read_scene(r)
                total += 1
    scale = 1.0 / torch.cat(latents).float().std().item()
    mmi.save_safetensors({k: v.detach().cpu().contiguous() for k, v in vae.state_dict().items()}, path + ".tmp",
                         metadata={"scaling_factor": repr(scale)})
    os.replace(path + ".tmp", path)
    print(f"wrote {path} (latent scaling factor {scale:.5f}; {100 * same / max(total, 1):.1f}% of validation "
          f"reconstructions read back as their scene); train the demo model with --vae_from={path}")


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
# The two tasks: what the run does differently for the model and for the demo's VAE alone, chosen once
# ----------------------------------------------------------------------------------------------------------------


def build_mmi(tc, cfg, init_device):
    """An MMInterleaved: random weights drawn on init_device, or init_from's (whose architecture must be this
    run's; what trains is the run's: its trainable flags); then vae_from's VAE; then with lora_rank > 0 LoRA on
    the LLM, all else frozen."""
    if tc.init_from:
        model = mmi.MMInterleaved.from_pretrained(tc.init_from)
        differs = mmi.first_difference(architecture(model.cfg.to_dict()), architecture(cfg.to_dict()))
        if differs:
            raise mmi.InputError(f"init_from {tc.init_from}: saved for another model: {differs[0]} is {differs[1]!r} "
                                 f"there, {differs[2]!r} in this run (preset {tc.preset!r}, model_overrides)")
        model.cfg = cfg
        model.set_trainable()
        # what trains (all, with frozen_dtype float32) in float32 as a new model, whatever the save's dtype (the
        # demo's is bf16): AdamW's updates are mostly below bf16's resolution
        for p in model.parameters():
            if p.is_floating_point() and (p.requires_grad or tc.frozen_dtype == "float32"):
                p.data = p.data.float()
    else:
        with init_device:
            model = mmi.MMInterleaved(cfg)
    if tc.vae_from:
        load_vae(model, tc.vae_from)
    if tc.lora_rank:
        mmi.add_lora(model, tc.lora_rank, tc.lora_alpha)
    if tc.compile:
        # the frozen VAE's encoder (float32, no gradients, full decoder resolution): its GroupNorm + SiLU chains
        # fused and its convolutions kept channels-last instead of converted for cuDNN at every call
        model.image_decoder.decoder.vae.encoder.compile()
    return model


# model config keys that say how a run trains, not what the model is, read from the model's top config (build_mmi
# sets it): a run from a saved model may change them
TRAINING_KNOBS = ("trainable", "loss_txt_weight", "loss_img_weight", "dataset_to_ignore_noimage_cond_loss",
                  "gradient_checkpointing")


def architecture(cfg_dict):
    """A model config (as a dict) less its TRAINING_KNOBS."""
    return {k: architecture(v) if isinstance(v, dict) else v for k, v in cfg_dict.items()
            if not any(knob in k for knob in TRAINING_KNOBS)}


def mmi_loss(model, batch, device):
    """The losses of a micro-batch made on the host: its tensors go to the device (from pinned memory, without
    waiting), and host copies of the integer inputs that the forward reads on the host (mmi.HOST_KEYS) beside them,
    so that it reads nothing back from the GPU, which would wait for all queued work. They go as numpy arrays
    because FSDP moves every tensor among a forward's inputs to the GPU."""
    host = {k: batch[k].numpy() for k in mmi.HOST_KEYS if torch.is_tensor(batch.get(k))}
    return model({k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}, host=host)


@dataclass(frozen=True)
class Task:
    build: object          # (tc, cfg, init_device) -> the model, its weights drawn or loaded
    loss: object           # (model, host batch, device) -> {"loss", other "loss_*"}
    flops: object          # (model, host batch) -> the micro-batch's training FLOPs
    blocks: object         # model -> what torch.compile compiles, with activation checkpointing inside
    units: object          # model -> FSDP's units
    export: object         # (model, tc, cfg, val batches, rank, world, device): writes the result, says where
    result: str            # what export writes, for the start of the run


TASKS = {"mmi": Task(build_mmi, mmi_loss, train_flops, compile_units, fsdp_blocks, export_model,
                     "the model in model/"),
         "vae": Task(build_vae, vae_loss, vae_train_flops, vae_blocks, vae_blocks, export_vae, "vae.safetensors")}


# ----------------------------------------------------------------------------------------------------------------
# The command line
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
    """Before any work starts, one line for what the run cannot go on with: a file or folder it reads that is not
    there, the data's settings it lacks, an out_dir it cannot write or that holds another run (check_out_dir)."""
    if tc.init_from and not os.path.isdir(tc.init_from):
        raise mmi.InputError(f"init_from {tc.init_from}: no such folder; expected a model folder written by "
                             f"save_pretrained (a training run's out_dir/model)")
    if tc.tokenizer_path and tc.data != "synthetic" and not os.path.isfile(tc.tokenizer_path):
        raise mmi.InputError(f"tokenizer_path {tc.tokenizer_path}: no such file")
    if tc.data == "pretrain" and not tc.pretrain_sources:
        raise mmi.InputError("data='pretrain' needs pretrain_sources (see configs/pretrain_13b.py)")
    if not 0.0 <= tc.demo_pairs < 1.0:
        raise mmi.InputError(f"demo_pairs {tc.demo_pairs}: expected a share of the batches, 0 <= demo_pairs < 1")
    if not 0.0 <= tc.demo_keep_by_shape <= 1.0:
        raise mmi.InputError(f"demo_keep_by_shape {tc.demo_keep_by_shape}: expected a share of the stories, "
                             f"0 <= demo_keep_by_shape <= 1")
    if tc.data == "finetune" and not tc.finetune_dataset:
        raise mmi.InputError("data='finetune' needs finetune_dataset and finetune_args (see configs/sft_vqa_13b.py)")
    for source in tc.pretrain_sources if tc.data == "pretrain" else ():
        if len(source) != 7 or source[1] not in ("mmc4", "pair"):
            raise mmi.InputError(f"pretrain_sources: {source!r}, expected (name, 'mmc4' | 'pair', shard pattern, "
                                 f"annt_root, data_root, probability, rows per batch)")
        for what, folder in (("annt_root", source[3]), ("data_root", source[4])):
            if not os.path.isdir(folder):
                raise mmi.InputError(f"pretrain_sources: {source[0]}'s {what} {folder}: no such folder")
    check_out_dir(tc)


def check_out_dir(tc):
    """out_dir is a folder this process can write in, or make; it holds no earlier run's checkpoints or metrics
    unless resume=True, and then its newest checkpoint is whole and of this run's model."""
    if not tc.out_dir:
        raise mmi.InputError("out_dir is empty, expected a folder for the run's metrics and checkpoints")
    parent = os.path.abspath(tc.out_dir)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise mmi.InputError(f"out_dir {tc.out_dir}: {parent} is a file, expected a folder")
    try:                           # the test is making a folder: os.access says yes to root even in /proc
        tempfile.TemporaryDirectory(dir=parent).cleanup()
    except OSError as e:
        raise mmi.InputError(f"out_dir {tc.out_dir}: cannot write in {parent} ({e.strerror})") from None
    found = checkpoints(tc.out_dir)
    metrics = os.path.join(tc.out_dir, "metrics.jsonl")
    if tc.resume and found:
        check_checkpoint(found[-1], tc)
    elif found and not tc.resume:
        raise mmi.InputError(f"out_dir {tc.out_dir} holds an earlier run's checkpoints; pass --resume to continue it, "
                             f"or another --out_dir (or remove it)")
    elif os.path.isfile(metrics) and os.path.getsize(metrics):   # resume=True with no checkpoint would start over
        raise mmi.InputError(f"out_dir {tc.out_dir} holds an earlier run's metrics.jsonl and no checkpoint to resume "
                             f"from; use another --out_dir (or remove it)")


def hold_out_dir(tc, cleanup):
    """out_dir, made and locked for this run until it ends (or its process dies): a second run into the same
    out_dir stops with one line instead of writing checkpoints and metrics over this one's. Checked again under
    the lock, for a run that finished between check_out_dir and here. A run that stops before writing anything
    leaves no out_dir that it made."""
    if os.name != "posix":                       # flock is POSIX
        return
    import fcntl
    if not os.path.isdir(tc.out_dir):
        os.makedirs(tc.out_dir)
        cleanup.callback(lambda: os.listdir(tc.out_dir) or os.rmdir(tc.out_dir))
    fd = os.open(tc.out_dir, os.O_RDONLY)
    cleanup.callback(os.close, fd)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise mmi.InputError(f"out_dir {tc.out_dir} is in use by another training run; wait for it to end, or use "
                             f"another --out_dir") from None
    except OSError as e:                         # a file system without locks (some NFS mounts): run unguarded
        print(f"train.py: out_dir {tc.out_dir} cannot be locked ({e.strerror}); make sure no other run writes there",
              file=sys.stderr)
    check_out_dir(tc)


def worker_limit():
    """DataLoader workers this process may start: its CPU cores (shared by the processes torchrun starts on this
    machine) less one, which the training loop keeps."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1")) - 1, 0)


# ----------------------------------------------------------------------------------------------------------------
# The run: its set-up, one flat loop of steps, the end
# ----------------------------------------------------------------------------------------------------------------


def start_processes(tc):
    """torchrun sets RANK/WORLD_SIZE: the processes join one group, one device each; else one process.
    -> (rank, world size, device)"""
    device, world = mmi.resolve_device(tc.device), int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        if not tc.fsdp:
            raise mmi.InputError("several processes need fsdp=True (there is no DDP path)")
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    if tc.tf32 and device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    rank = dist.get_rank() if world > 1 else 0
    if tc.dtype == "bfloat16" and device.type == "cpu" and rank == 0:
        print("note: bfloat16 autocast on CPU is slow; use --dtype=float32 for CPU runs")
    return rank, world, device


def build_model(task, tc, cfg, device, distributed):
    """The model as it trains: the same weights on every rank (drawn from `seed`), frozen weights (requires_grad
    False) in frozen_dtype, training's speed forms (mmi.speed_up: MMFS with its images' queries folded), compiled
    blocks, sharded over the processes or moved to the device; in train mode."""
    if tc.init_device == "cuda" and device.type != "cuda":
        raise mmi.InputError(f"init_device 'cuda' needs device 'cuda', got {device.type!r}")
    init_device = device if tc.init_device == "cuda" else torch.device("cpu")
    torch.manual_seed(tc.seed)
    model = task.build(tc, cfg, init_device)
    if tc.frozen_dtype == "bfloat16":
        # frozen weights get no update, so a float32 master copy buys nothing: halve their memory (13B: 54 -> 27 GB)
        keep = frozen_vae(model)
        for p in model.parameters():
            if not p.requires_grad and p not in keep:
                p.data = p.data.to(torch.bfloat16)
        if init_device.type == "cuda":
            torch.cuda.empty_cache()                 # the float32 copies' blocks, freed one weight at a time
    mmi.speed_up(model)
    if tc.compile:
        # MMFS blocks only where kernels.cu runs: the reference reads the level shapes back, splitting their graph
        kernel = mmi.kernels_used(device)
        blocks = [b for b in task.blocks(model) if kernel or not any(isinstance(m, mmi.MMFS) for m in b.modules())]
        compile_blocks(blocks, tc.activation_checkpointing)
    if distributed:
        shard_model(model, task.units(model), tc, device)     # moves the shards to the device
    else:
        model.to(device)
    return model.train()


def make_optimizer(model, tc):
    """AdamW over the trainable parameters in param_groups' groups -> (optimizer, each group's base learning rate).
    Fused: one kernel updates a group, and it can skip itself on the device (found_inf, see the NaN guard); the
    multi-tensor (foreach) form runs ~10 ops over each group, and on FSDP's sharded parameters (DTensors) every op
    unwraps every tensor in Python."""
    groups = param_groups(model, tc.param_groups)
    optimizer = torch.optim.AdamW([{k: v for k, v in g.items() if k != "names"} for g in groups],
                                  betas=tc.betas, eps=tc.eps, fused=True)
    return optimizer, [g["lr"] for g in groups]


def resume(tc, model, optimizer, rank, device):
    """With resume=True, model, optimizer and RNG from the newest complete checkpoint in out_dir.
    -> (step, the data stream's position, the NaN streak) to go on from"""
    if tc.resume and rank == 0:
        remove_unfinished_saves(tc.out_dir)
    found = checkpoints(tc.out_dir) if tc.resume else []
    if not found:
        if tc.resume and rank == 0:
            print(f"resume: no checkpoint in {tc.out_dir}, starting from step 0")
        return 0, None, 0
    state = load_checkpoint(found[-1], model, optimizer, tc, rank, device)
    if rank == 0:
        done = f"; max_steps is {tc.max_steps}: no step to run" if state["step"] >= tc.max_steps else ""
        print(f"resumed from {found[-1]} at step {state['step']}{done}")
        dropped = drop_metrics_after(tc.out_dir, state["step"])
        if dropped:
            print(f"metrics.jsonl: dropped {dropped} line(s), of the steps after {state['step']} (they run "
                  "again) or cut short")
    return state["step"], state["data"], state["nan_streak"]


def remove_unfinished_saves(out_dir):
    """The ckpt_<step>.tmp folders of saves that a killed run (SIGTERM, SIGKILL, the OOM killer) never finished:
    no run reads them, and at 13B each holds gigabytes. The out_dir lock keeps a live run's save out of reach."""
    for name in os.listdir(out_dir) if os.path.isdir(out_dir) else ():
        if name.startswith("ckpt_") and name.endswith(".tmp"):
            shutil.rmtree(os.path.join(out_dir, name), ignore_errors=True)


def drop_metrics_after(out_dir, step):
    """metrics.jsonl keeps only the lines of steps up to `step`, where a resumed run goes on from: the steps after
    it run again, and a line cut short by a killed run is no record. Rewritten atomically. -> lines dropped"""
    def step_of(line):
        try:
            return json.loads(line)["step"] if line.endswith("\n") else None
        except (ValueError, KeyError, TypeError):
            return None
    path = os.path.join(out_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return 0
    with open(path) as f:
        lines = f.readlines()
    kept = [line for line in lines if isinstance(step_of(line), int) and step_of(line) <= step]
    if len(kept) < len(lines):
        with open(path + ".tmp", "w") as f:
            f.writelines(kept)
        os.replace(path + ".tmp", path)
    return len(lines) - len(kept)


def open_data(cfg, tc, rank, world, data_state, device, cleanup):
    """-> (tc with the DataLoader workers the run uses, the training micro-batches from data_state on, pinned in a
    background thread that `cleanup` stops, and the validation batches or None)."""
    if tc.data != "synthetic":
        # a resumed stream keeps the checkpoint's DataLoader workers: its data position is one per worker
        saved = data_state.get("workers") if data_state else None
        workers = min(tc.num_workers, worker_limit()) if saved is None else saved
        if workers != tc.num_workers and rank == 0:
            print(f"note: num_workers={tc.num_workers} -> {workers}: " + (
                f"this process may use {worker_limit() + 1} CPU cores, one kept for training" if saved is None else
                "the checkpoint's, whose data position is one per worker"))
        tc = dataclasses.replace(tc, num_workers=workers)
    pin = (lambda b: {k: v.pin_memory() if torch.is_tensor(v) else v for k, v in b.items()}) \
        if device.type == "cuda" else (lambda b: b)
    # closed however the run ends: the thread stops and closes the stream, whose DataLoader workers then exit
    batches = cleanup.enter_context(contextlib.closing(Prefetcher(train_batches(cfg, tc, rank, world, data_state),
                                                                  pin)))
    return tc, batches, val_batches(cfg, tc, rank, world) if tc.eval_interval else None


def rows_per_batch(tc):
    """The rows of a micro-batch per process, where the data sets them: each pretraining source its own, a
    fine-tuning set in finetune_args (or its reader's default), batch_size otherwise. -> sorted list"""
    if tc.data == "pretrain":
        return sorted({source[-1] for source in tc.pretrain_sources})
    if tc.data == "finetune":
        import data
        default = inspect.signature(data.finetune_builder(tc.finetune_dataset)).parameters["batch_size"].default
        return [tc.finetune_args.get("batch_size", default)]
    return [tc.batch_size]


def describe_run(model, optimizer, task, tc, world, device):
    n_train = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
    rows = " or ".join(map(str, rows_per_batch(tc)))         # a pretraining mix draws a source per micro-batch
    print(f"model {tc.preset}: {sum(p.numel() for p in model.parameters()):,} parameters, {n_train:,} trainable in "
          f"{len(optimizer.param_groups)} groups; {world} process(es) on {device.type}, {tc.dtype}, fsdp={world > 1}, "
          f"{rows} rows a micro-batch, {tc.grad_accum * world} micro-batches a step")
    outputs = ["metrics.jsonl"] + (["checkpoints ckpt_<step>/"] if tc.ckpt_interval >= 0 else [])
    print(f"writing to {tc.out_dir}/: {', '.join(outputs + (['at the end ' + task.result] if tc.export else []))}")


def step_numbers(bad, grad_norm, losses, work, device):
    """What a step logs, in one float64 device tensor: the NaN flag, the grad norm, then summed over ranks the
    losses (each summed over micro-batches), rows, tokens and FLOPs."""
    work = torch.tensor(work, dtype=torch.float64)
    work = work.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else work
    sums = all_reduce(torch.cat([torch.stack(losses).double(), work]))
    return torch.cat([bad.double().reshape(1), grad_norm.double().reshape(1), sums])


class LateRead:
    """A step's numbers are copied to pinned host memory as the step is queued, and read one step late, so that the
    host never waits for the GPU mid-step: `send` queues the copy of this step's numbers and a mark after it, and
    hands back the previous step's, whose read waits for that step's mark only, with the next step's work already
    queued behind it (the host keeps a step ahead; its own work, FSDP's hooks and the update on sharded tensors,
    overlaps the GPU's). `read_now` reads the step just sent at once. A read is (info, numbers, the step's seconds
    on the device's clock from the previous read step's mark or `restart` to its own, when it was done on the
    host's clock)."""

    def __init__(self, device):
        self.cuda, self.pending = device.type == "cuda", None
        self.restart()

    def mark(self):
        """A point in the device's queue: a timed CUDA event; on a CPU, which works as it queues, the time now."""
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def restart(self):
        """Step times start again here (what was queued before, evaluation or saving, is no step's)."""
        self.last = self.mark()

    def send(self, numbers, info):
        host = numbers
        if self.cuda:
            host = torch.empty(numbers.shape, dtype=numbers.dtype, pin_memory=True)
            host.copy_(numbers, non_blocking=True)
        previous, self.pending = self.pending, (info, host, self.mark())
        return previous and self._read(*previous)

    def read_now(self):
        pending, self.pending = self.pending, None
        return self._read(*pending)

    def _read(self, info, host, mark):
        if self.cuda:
            mark.synchronize()
        seconds = self.last.elapsed_time(mark) / 1e3 if self.cuda else mark - self.last
        self.last = mark
        return info, host.tolist(), seconds, time.perf_counter() if self.cuda else mark


class StepLog:
    """Where a step's numbers go once read: metrics.jsonl (every log_interval steps, every skipped step and the
    last), the progress bar, and the NaN guard's count of non-finite steps in a row, which stops the run at
    nan_patience. Rank 0 writes; every rank counts."""

    def __init__(self, tc, world, rank, device, step, nan_streak, cleanup):
        self.tc, self.world, self.master, self.device = tc, world, rank == 0, device
        self.first, self.nan_streak, self.losses = step + 1, nan_streak, {}
        self.cleanup, self.file = cleanup, None
        self.bar = tqdm(total=tc.max_steps, initial=step, disable=not (self.master and tc.progress), dynamic_ncols=True)
        cleanup.callback(self.bar.close)

    def write(self, record):
        if self.master:
            if self.file is None:      # opened at its first line: a run stopped before one leaves no metrics.jsonl
                os.makedirs(self.tc.out_dir, exist_ok=True)
                self.file = self.cleanup.enter_context(open(os.path.join(self.tc.out_dir, "metrics.jsonl"), "a"))
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def record(self, info, numbers, seconds, done):
        """A LateRead read -> the step's record; RuntimeError at nan_patience non-finite steps in a row."""
        (step, lr, names), tc, n = info, self.tc, self.tc.grad_accum * self.world
        bad, grad_norm, *sums = numbers
        self.nan_streak = self.nan_streak + 1 if bad else 0
        rec = {"step": step, **{k: v / n for k, v in zip(names, sums)}, "lr": lr, "grad_norm": grad_norm,
               "samples_per_s": sums[-3] / seconds, "tokens_per_s": sums[-2] / seconds,
               "mfu": sums[-1] / seconds / (tc.peak_flops * self.world), "time_s": seconds,
               "wall_time": time.time() - (time.perf_counter() - done)}
        self.losses[step] = rec["loss"]
        if bad:
            rec["skipped"] = f"non-finite loss or gradient ({self.nan_streak} in a row)"
        if self.master:
            if step == tc.max_steps:
                self.bar.n = step                # close() draws the final state: drawn here too, logs show it twice
            else:
                self.bar.update(1)
            self.bar.set_postfix(**{k: f"{rec[k]:.3f}" for k in names if k != "loss"}, lr=f"{lr:.2e}",
                                 samples_s=f"{rec['samples_per_s']:.1f}", tok_s=f"{rec['tokens_per_s']:.0f}",
                                 mfu=f"{100 * rec['mfu']:.1f}%", refresh=False)
            if bad or step % tc.log_interval == 0 or step == tc.max_steps:
                self.write(rec)
            if bad:
                tqdm.write(f"step {step}: {rec['skipped']}; update skipped")
            left = tc.max_steps - step
            if step == self.first and self.device.type == "cpu" and seconds * left > 3600:
                tqdm.write(f"note: step {step} took {seconds:.1f} s on the CPU; the {left:,} steps left take about "
                           f"{seconds * left / 3600:.1f} hours at this pace")
        if self.nan_streak >= tc.nan_patience:
            raise RuntimeError(f"step {step}: {self.nan_streak} non-finite steps in a row (nan_patience="
                               f"{tc.nan_patience}); stopping. Resume from the last checkpoint in {tc.out_dir} with a "
                               f"lower lr.")
        return rec


def freeze_long_lived():
    """Everything made so far (model, optimizer, data pipeline, compiled code: millions of objects) out of the
    garbage collector's sight: a full collection, which stops the process, then walks only what later steps make."""
    gc.collect()
    gc.freeze()


def run(tc):
    """Train with config `tc`; returns {"losses": {step: loss}, "model": the (possibly sharded) model, "config":
    TrainConfig, "last_checkpoint": its step}. However it ends (done, an error, Ctrl-C), the data thread and the
    DataLoader workers it started are stopped and its files closed."""
    with contextlib.ExitStack() as cleanup:
        return _run(tc, cleanup)


def _run(tc, cleanup):
    check_inputs(tc)
    if os.environ.get("RANK", "0") == "0":
        hold_out_dir(tc, cleanup)
    cfg, task = model_config(tc), TASKS[tc.task]
    rank, world, device = start_processes(tc)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=tc.dtype == "bfloat16")
    model = build_model(task, tc, cfg, device, world > 1)
    torch.manual_seed(tc.seed + rank)           # from here on each rank draws its own noise (CFG dropout, timesteps)
    random.seed(tc.seed + rank)
    optimizer, base_lrs = make_optimizer(model, tc)
    trainable = [p for g in optimizer.param_groups for p in g["params"]]
    step, data_state, nan_streak = resume(tc, model, optimizer, rank, device)
    tc, batches, val = open_data(cfg, tc, rank, world, data_state, device, cleanup)
    if rank == 0:
        describe_run(model, optimizer, task, tc, world, device)
    log, late = StepLog(tc, world, rank, device, step, nan_streak, cleanup), LateRead(device)
    cleanup.callback(gc.unfreeze)                # back in the collector's sight: a caller may drop what it froze
    # no full collection in the warm-up steps (with --compile, millions of objects made): each would walk all made
    # so far, and one comes each time that has grown by a quarter; freeze_long_lived runs one at their end
    thresholds = gc.get_threshold()
    cleanup.callback(gc.set_threshold, *thresholds)
    gc.set_threshold(*thresholds[:2], 2 ** 30)
    first_step, last_ckpt, last_ckpt_path = step, step, None
    warm_up = 2 if tc.compile else 1             # with --compile the first step runs eager, the second compiles
    started = time.perf_counter()
    while step < tc.max_steps:
        lr_mult = lr_multiplier(step, tc.warmup_steps, tc.max_steps)
        for g, base in zip(optimizer.param_groups, base_lrs):
            g["lr"] = base * lr_mult

        # forward/backward over grad_accum micro-batches; FSDP reduces gradients only after the last one
        loss_sums, work = {}, [0.0, 0.0, 0.0]       # every loss* the model returns (no host sync); rows, tokens, FLOPs
        for micro in range(tc.grad_accum):
            batch = next(batches)                   # on the host; task.loss sends it to the device
            data_state = batch["meta"]["resume"]
            if world > 1:
                model.set_requires_gradient_sync(micro == tc.grad_accum - 1)
            with autocast:
                out = task.loss(model, batch, device)
            (out["loss"] / tc.grad_accum).backward()
            # counted from the host copy while the GPU works through what was just queued
            work = [a + b for a, b in zip(work, (len(batch["text_ids"]), float(batch["attention_mask"].sum()),
                                                 task.flops(model, batch)))]
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
        step += 1
        names = sorted(loss_sums)
        previous = late.send(step_numbers(bad, grad_norm, [loss_sums[k] for k in names], work, device),
                             (step, max(base_lrs) * lr_mult, names))
        if previous:
            log.record(*previous)

        evaluate_now = tc.eval_interval and (step % tc.eval_interval == 0 or step == tc.max_steps)
        save_now = tc.ckpt_interval >= 0 and ((tc.ckpt_interval and step % tc.ckpt_interval == 0)
                                              or step == tc.max_steps)
        warmed = step == first_step + warm_up    # warm-up ends with this step
        if warmed or evaluate_now or save_now or step == tc.max_steps:
            log.record(*late.read_now())         # at once: a checkpoint keeps the NaN streak up to its step
        if evaluate_now:
            if rank == 0 and scores_demo(tc):
                tqdm.write(f"step {step}: validation, then the demo scoreboard on {tc.eval_demo_stories} test stories "
                           f"(text and images, MMFS on and off)")
            ev = evaluate(model, task, tc, val, device, autocast)
            if ev:
                log.write({"step": step, **ev})
                if rank == 0:
                    tqdm.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in ev.items()))
        if save_now:
            last_ckpt, last_ckpt_path = step, save_checkpoint(model, optimizer, tc, cfg, step, {
                "data": data_state, "nan_streak": log.nan_streak}, rank, device)
        if warmed:
            gc.set_threshold(*thresholds)
            freeze_long_lived()                  # what exists after warm-up lives for the whole run
        if warmed or evaluate_now or save_now:
            late.restart()                       # step times count training only, not evaluation or saving
    log.bar.close()
    if rank == 0 and step > first_step:   # the wall time of this run's steps, with evaluations and checkpoints
        print(f"steps {first_step + 1}-{step} took {(time.perf_counter() - started) / 60:.1f} min")
    finish(model, task, tc, cfg, val, batches, rank, world, device, last_ckpt_path)
    return {"losses": log.losses, "model": model, "config": tc, "last_checkpoint": last_ckpt}


def finish(model, task, tc, cfg, val, batches, rank, world, device, last_ckpt_path):
    """The end of a run: the data workers stop, then the export."""
    batches.close()                              # the DataLoader workers exit before the export
    if rank == 0:
        print(f"metrics in {tc.out_dir}/metrics.jsonl" + (f", the last checkpoint in {last_ckpt_path}"
                                                            if last_ckpt_path else ""))
    if tc.export:
        task.export(model, tc, cfg, val, rank, world, device)
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(mmi.run_script(main))
