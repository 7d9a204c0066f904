"""Tests for mmi. CPU, tiny sizes, exact about what each checks. Run: python -m pytest -q test_mmi.py

Oracles: hand-written expected tensors, float64 loops written here, and (test-only) transformers / diffusers
modules at tiny random configs. Tests that need CUDA skip without it.
"""

import ast
import contextlib
import copy
import dataclasses
import errno
import functools
import gc
import html
import io
import json
import math
import os
import pickle
import random
import re
import shutil
import signal
import sys
import subprocess
import time
import traceback
import warnings
import weakref
import zipfile
from collections import Counter, defaultdict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file

import data
import eval as ev
import mmi
import sample
import train

HERE = os.path.dirname(os.path.abspath(__file__))
REFERENCE = os.path.join(HERE, "assets", "reference")
torch.set_num_threads(1)   # the models here are tiny: one thread is fastest, and robust on a shared machine


def tiny_model(seed=0, perturb=True, **overrides):
    """A tiny model whose zero-initialised branches (MMFS gates, adapter gammas) are set non-zero, so tests see them.
    overrides: of the preset's config (MMIConfig.from_preset)."""
    torch.manual_seed(seed)
    model = mmi.MMInterleaved(mmi.MMIConfig.from_preset("tiny", **overrides))
    if perturb:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("llama_cross_attn.gate") or name.endswith("injector.gamma"):
                    p.uniform_(0.5, 1.0)
    return model.eval()


def interleaved_row(cfg, pieces, length=None):
    """Token ids from pieces: ints are text ids, "img" is an image placeholder (soi + num_img_token image tokens)."""
    ids = []
    for p in pieces:
        ids += [cfg.soi_token_id] + [cfg.image_token_id] * cfg.num_img_token if p == "img" else [p]
    if length is not None:
        ids += [cfg.pad_token_id] * (length - len(ids))
    return ids


def make_batch(cfg, rows, length, seed=0, left_pad=False):
    g = torch.Generator().manual_seed(seed)
    ids = []
    for r in rows:
        row = interleaved_row(cfg, r)
        pad = [cfg.pad_token_id] * (length - len(row))
        ids.append(pad + row if left_pad else row + pad)
    text_ids = torch.tensor(ids)
    mask = torch.tensor([[0] * (length - len(interleaved_row(cfg, r))) + [1] * len(interleaved_row(cfg, r)) if left_pad
                         else [1] * len(interleaved_row(cfg, r)) + [0] * (length - len(interleaved_row(cfg, r)))
                         for r in rows])
    n = torch.tensor([sum(p == "img" for p in r) for r in rows])
    S = cfg.vision.image_size
    return dict(text_ids=text_ids, attention_mask=mask, image_tensors=torch.rand(int(n.sum()), 3, S, S, generator=g),
                num_image_per_seq=n, meta={"dataset_name": "test"})


cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def global_rng_seeded_per_test():
    """Each test starts with the global RNGs (torch's on every device, Python's) seeded 0 and leaves them as it found
    them: draws from them are the same whatever ran before, and the seeds that tests and train.run set reach no
    other test."""
    python_state = random.getstate()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        random.seed(0)
        yield
    random.setstate(python_state)


# the tiny preset's special token ids
BOS, EOS, PAD, SOI, IMG = 1, 2, 383, 384, 385


DECODE_ROWS = [[BOS, 10, "img", 11, 12, "img", 13], [BOS, 14, "img", 15], [BOS, 16, 17, 18]]   # left-padded, with images


def oracle_transformers():
    """transformers<5, as .ci/run installs: it writes CLIP files with the released checkpoints' `vision_model.` /
    `text_model.` prefixes (5.x drops them) and has the 4.x tokenizer and output APIs these tests call."""
    transformers = pytest.importorskip("transformers")
    if int(transformers.__version__.split(".")[0]) >= 5:
        pytest.skip(f"the oracle is transformers<5 (found {transformers.__version__})")
    return transformers


def _load_safetensors_dir(path):
    from safetensors.torch import load_file
    files = [f for f in os.listdir(path) if f.endswith(".safetensors")]
    sd = {}
    for f in files:
        sd.update(load_file(os.path.join(path, f)))
    return sd


# The tokenizer's oracle: transformers' slow LlamaTokenizer on the LLaMA-layout model shipped by mistral-common
# (test-only).
def mistral_model_path():
    mc = pytest.importorskip("mistral_common")
    path = os.path.join(os.path.dirname(mc.__file__), "data", "tokenizer.model.v1")
    if not os.path.exists(path):
        pytest.skip("mistral-common does not ship data/tokenizer.model.v1")
    return path


def rel_err(x, ref):
    return ((x.double() - ref).norm() / ref.norm()).item()


DECODER_PRESETS = {name: (c.unet, c.vae, c.image_decoder)
                   for name, c in ((n, mmi.MMIConfig.from_preset(n)) for n in ("mmi-13b", "tiny"))}


def _tiny_decoder(seed=0, **overrides):
    import dataclasses
    u, v, c = DECODER_PRESETS["tiny"]
    torch.manual_seed(seed)
    return mmi.ImageDecoder(u, v, dataclasses.replace(c, **overrides))


def _tiny_inputs(dec, B=3, L=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    c = dec.cfg
    ctx = torch.randn(B, L, c.resampler.encoder_hidden_size, generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[0, 2:] = 0  # image 0: only <s><soi>, no loss
    images = torch.rand(B, 3, c.image_size, c.image_size, generator=g)
    feats = [torch.randn(B, 1, c.mmfs_feat_dim, s, s, generator=g) for s in c.mmfs_value_sizes]
    fmask = torch.tensor([[0]] + [[1]] * (B - 1))
    return ctx, mask, images, feats, fmask


def _perturb_mmfs_convs(dec, scale=0.1):
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for name, p in dec.decoder.mmfs_module.named_parameters():
            if ".conv." in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


@contextlib.contextmanager
def gpu_reads(files, note=lambda: None):
    """Inside the block, CUDA's sync debug mode: every host read of the GPU is recorded as (note(), the innermost
    frame on the stack from one of `files`, else the warning's (filename, lineno))."""
    reads = []

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchronizing" in str(message):        # sync debug mode's warning (any other is not a read)
            ours = [f for f in traceback.extract_stack() if f.filename in files]
            reads.append((note(), ours[-1] if ours else (filename, lineno)))
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = record
            yield reads
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.fixture(scope="module")
def saved_tiny_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("sample") / "model"
    tiny_model(seed=11).save_pretrained(str(path))
    return str(path)


# ----------------------------------------------------------------------------------------------------------------
# Config and presets: overrides, the paper-size architecture on meta
# ----------------------------------------------------------------------------------------------------------------


def test_overrides_are_type_checked_and_unknown_keys_rejected():
    cfg = mmi.MMIConfig.from_preset("tiny")
    cfg2 = mmi.apply_overrides(cfg, ["--llm.hidden_size=96", "mmfs.spatial_shapes=(16, 8)", "vision.trainable=false"])
    assert cfg2.llm.hidden_size == 96 and cfg2.mmfs.spatial_shapes == (16, 8) and cfg2.vision.trainable is False
    assert cfg.llm.hidden_size == 64                                   # the original is untouched
    with pytest.raises(ValueError, match="llm.hidden_sise"):
        mmi.apply_overrides(cfg, ["llm.hidden_sise=3"])
    with pytest.raises(ValueError, match="cannot read 'abc' as int"):
        mmi.apply_overrides(cfg, ["llm.hidden_size=abc"])
    with pytest.raises(ValueError, match="'llm.hidden_size': expected int, got 3.5"):
        mmi.apply_overrides(cfg, {"llm.hidden_size": 3.5})
    with pytest.raises(ValueError, match="'vision.trainable': expected bool, got 1"):
        mmi.apply_overrides(cfg, {"vision.trainable": 1})
    assert mmi.apply_overrides(cfg, {"loss_img_weight": 2}).loss_img_weight == 2.0
    assert mmi.MMIConfig.from_dict(cfg2.to_dict()) == cfg2


def test_mmi_13b_matches_the_original_state_dict_and_counts():
    with torch.device("meta"):
        model = mmi.MMInterleaved(mmi.MMIConfig.from_preset("mmi-13b"))
    with open(os.path.join(REFERENCE, "mm_interleaved_13b.json")) as f:
        ref = json.load(f)
    with open(os.path.join(REFERENCE, "mm_interleaved_13b_summary.json")) as f:
        summary = json.load(f)
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert ours == ref
    for name, module in model.named_children():
        total = sum(p.numel() for p in module.parameters())
        trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
        assert {"total": total, "trainable": trainable} == summary["top_level"][name], name
    for name, counts in summary["sub_modules"].items():
        if name.startswith("visual_tokenizer") and "post_layernorm" not in name:
            params = dict(model.named_parameters())
            total = params[name].numel() if name in params else sum(p.numel() for p in model.get_submodule(name).parameters())
            assert total == counts["total"], name
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert trainable == set(summary["trainable_parameter_names"])
    assert frozen == set(summary["frozen_parameter_names"])
    assert sum(p.numel() for p in model.parameters()) == summary["total_params"] == 14_912_865_561
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == summary["trainable_params"]


def test_tiny_preset_builds_on_meta_and_cpu():
    with torch.device("meta"):
        mmi.MMInterleaved(mmi.MMIConfig.from_preset("tiny"))
    model = tiny_model(perturb=False)
    assert sum(p.numel() for p in model.parameters()) < 5_000_000


# ----------------------------------------------------------------------------------------------------------------
# Building blocks: norms, RoPE, sin-cos tables
# ----------------------------------------------------------------------------------------------------------------


def test_sincos_tables_follow_the_original_layout():
    t = mmi.get_2d_sincos_pos_embed(8, 3)                  # 2 frequencies per quarter
    token = 1 * 3 + 2                                       # row 1, column 2
    w = [1.0, 1.0 / 100.0]                                  # 10000^(-d/2) for d = 0, 1
    expected = [math.sin(1 * w[0]), math.sin(1 * w[1]), math.cos(1 * w[0]), math.cos(1 * w[1]),
                math.sin(2 * w[0]), math.sin(2 * w[1]), math.cos(2 * w[0]), math.cos(2 * w[1])]
    torch.testing.assert_close(t[token], torch.tensor(expected))
    torch.testing.assert_close(mmi.resize_pos_embed(t, (3, 3)), t)


# ----------------------------------------------------------------------------------------------------------------
# Multi-scale deformable attention and MMFS: the reference against float64 loops written here
# ----------------------------------------------------------------------------------------------------------------


def bilinear_loop(img, x, y):
    """img [H, W, D] float64; x, y in pixel units with centres at integers. Corners outside contribute 0."""
    H, W, D = img.shape
    out = torch.zeros(D, dtype=torch.float64)
    if not (-1 < y < H and -1 < x < W):
        return out
    y0, x0 = math.floor(y), math.floor(x)
    ly, lx = y - y0, x - x0
    for yy, xx, w in ((y0, x0, (1 - ly) * (1 - lx)), (y0, x0 + 1, (1 - ly) * lx),
                      (y0 + 1, x0, ly * (1 - lx)), (y0 + 1, x0 + 1, ly * lx)):
        if 0 <= yy < H and 0 <= xx < W:
            out += w * img[yy, xx]
    return out


def msda_loop(value, shapes, loc, weights):
    B, S, M, D = value.shape
    _, Q, _, L, P, _ = loc.shape
    starts = [0]
    for h, w in shapes[:-1]:
        starts.append(starts[-1] + h * w)
    out = torch.zeros(B, Q, M, D, dtype=torch.float64)
    for b in range(B):
        for l, (h, w) in enumerate(shapes):
            for m in range(M):
                img = value[b, starts[l]:starts[l] + h * w, m].reshape(h, w, D)
                for q in range(Q):
                    for p in range(P):
                        x = loc[b, q, m, l, p, 0].item() * w - 0.5
                        y = loc[b, q, m, l, p, 1].item() * h - 0.5
                        out[b, q, m] += weights[b, q, m, l, p].item() * bilinear_loop(img, x, y)
    return out.reshape(B, Q, M * D)


def test_ms_deform_attn_reference_equals_float64_loop():
    g = torch.Generator().manual_seed(0)
    shapes = [(5, 7), (3, 2), (5, 7), (1, 1), (3, 2)]          # repeated sizes, as MMFS folds images into levels
    B, M, D, Q, P = 2, 2, 3, 4, 3
    S = sum(h * w for h, w in shapes)
    value = torch.randn(B, S, M, D, generator=g, dtype=torch.float64)
    loc = torch.rand(B, Q, M, len(shapes), P, 2, generator=g, dtype=torch.float64) * 1.6 - 0.3   # some outside
    weights = torch.rand(B, Q, M, len(shapes), P, generator=g, dtype=torch.float64)
    spatial = torch.tensor(shapes)
    out = mmi.ms_deform_attn_reference(value, spatial, mmi.level_start_index(spatial), loc, weights)
    torch.testing.assert_close(out, msda_loop(value, shapes, loc, weights), rtol=1e-12, atol=1e-12)
    # and the dispatch point gives the same on this device
    out2 = mmi.ms_deform_attn(value, spatial, mmi.level_start_index(spatial), loc, weights)
    torch.testing.assert_close(out2, out, rtol=0, atol=0)


def test_adapter_deformable_attention_equals_float64_loop():
    """The ViT-Adapter's MSDeformAttn, step by step in float64: per head ONE softmax over all its levels and points
    together; a point samples at the reference plus its offset in pixels of its level (x over the width, y over the
    height); value_proj before, output_proj after. Non-square levels, so that x and y cannot be confused."""
    torch.manual_seed(0)
    H, L, P = 2, 2, 3
    mod = mmi.MSDeformAttn(d_model=8, n_levels=L, n_heads=H, n_points=P, ratio=0.5).double()
    with torch.no_grad():
        for p in mod.parameters():
            p.add_(torch.randn_like(p) * 0.3)          # offsets and weights start at 0: make every one matter
    shapes = [(3, 4), (2, 5)]
    B, Lq = 2, 3
    query = torch.randn(B, Lq, 8, dtype=torch.float64)
    feat = torch.randn(B, 3 * 4 + 2 * 5, 8, dtype=torch.float64)
    ref = torch.rand(B, Lq, 2, dtype=torch.float64)
    lin = lambda layer, x: x @ layer.weight.T + layer.bias
    with torch.no_grad():
        out = mod(query, ref, feat, torch.tensor(shapes))
        v = lin(mod.value_proj, feat)                                           # (B, S, H * Dh)
        Dh = v.shape[-1] // H
        expected = torch.zeros(B, Lq, H * Dh, dtype=torch.float64)
        for b in range(B):
            for q in range(Lq):
                off = lin(mod.sampling_offsets, query[b, q]).view(H, L, P, 2)
                aw = lin(mod.attention_weights, query[b, q]).view(H, L * P).softmax(-1).view(H, L, P)
                start = 0
                for l, (h, w) in enumerate(shapes):
                    img = v[b, start:start + h * w].view(h, w, H, Dh)
                    start += h * w
                    for m in range(H):
                        for p in range(P):
                            x = (ref[b, q, 0] + off[m, l, p, 0] / w).item() * w - 0.5
                            y = (ref[b, q, 1] + off[m, l, p, 1] / h).item() * h - 0.5
                            expected[b, q, m * Dh:(m + 1) * Dh] += aw[m, l, p] * bilinear_loop(img[:, :, m], x, y)
        expected = lin(mod.output_proj, expected)
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-9)


def mmfs_loop(mod, query, ref, value, mask):
    """MMFS as the original states it, step by step in float64, with explicit loops over images, levels, heads and points."""
    B, Lq, _ = query.shape
    n = value.shape[1]
    H, P, Lv = mod.n_heads, mod.n_points, mod.n_levels
    sides = mod.spatial_shapes
    lin = lambda layer, x: x @ layer.weight.double().T + layer.bias.double()
    v = lin(mod.value_proj, value.double())                                     # (B, n, S, d_attn)
    Dh = v.shape[-1] // H
    out = torch.zeros(B, Lq, H * Dh, dtype=torch.float64)
    for b in range(B):
        for q in range(Lq):
            mrow = (mask[b, q] if mask.dim() == 3 else mask[b]).double()
            total = mrow.sum()
            logits, samples = [], []
            for i in range(n):
                rel = int((total + 1 - mrow[:i + 1].sum()) * mrow[i])
                qn = lin(mod.dynamic_offset_mask, query[b, q].double()) + mod.query_relpos.weight[rel].double()
                off = lin(mod.sampling_offsets, qn).view(H, P, 2)
                aw = lin(mod.attention_weights, qn).view(H, Lv, P + 1)
                start = 0
                for l, s in enumerate(sides):
                    img = v[b, i, start:start + s * s].view(s, s, H, Dh)
                    start += s * s
                    for h in range(H):
                        for p in range(P):
                            # offsets in base-grid units: off * (s / base) / s
                            x = (ref[0, q, 0] + off[h, p, 0] * mod.scale_ratios[l] / s).item() * s - 0.5
                            y = (ref[0, q, 1] + off[h, p, 1] * mod.scale_ratios[l] / s).item() * s - 0.5
                            logits.append((h, aw[h, l, p] - 10000.0 * (1 - mrow[i])))
                            samples.append((h, bilinear_loop(img[:, :, h], x, y)))
                        logits.append((h, torch.tensor(-math.log(n * Lv), dtype=torch.float64)))
                        samples.append((h, mod.ignore_token.double().view(H, Dh)[h]))
            for h in range(H):
                lh = torch.stack([lg for hh, lg in logits if hh == h])
                sh = torch.stack([sm for hh, sm in samples if hh == h])
                out[b, q, h * Dh:(h + 1) * Dh] = (lh.softmax(0)[:, None] * sh).sum(0)
    return lin(mod.output_proj, out)


@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize("mask_kind", ["2d", "3d", "3d-last-row"])
def test_mmfs_equals_float64_loop(mask_kind, fast):
    torch.manual_seed(0)
    mod = mmi.MMFS(d_query=6, d_value=5, d_out=7, d_attn=4, n_heads=2, n_points=2, spatial_shapes=[4, 2],
                   base_spatial_shape=2, max_num_image_per_seq=5, offset_init_magnitude=1.0).double()
    if fast:
        mmi.speed_up(mod)
        assert type(mod) is mmi.FastMMFS
    with torch.no_grad():
        for p in mod.parameters():
            p.add_(torch.randn_like(p) * 0.3)          # leave init: every weight, ignore token included, matters
    B, Lq, n = 2, 3, 3
    query = torch.randn(B, Lq, 6, dtype=torch.float64)
    value = torch.randn(B, n, 16 + 4, 5, dtype=torch.float64)
    ref = torch.rand(1, Lq, 2, dtype=torch.float64)
    if mask_kind == "2d":
        mask = torch.tensor([[1, 0, 1], [0, 0, 0]])                            # row 1: no image at all
        expected = mmfs_loop(mod, query, ref, value, mask)
    else:
        mask = torch.tensor([[[1, 0, 0], [1, 1, 0], [1, 1, 1]], [[0, 0, 0], [0, 1, 0], [1, 0, 1]]])
        if mask_kind == "3d":
            expected = mmfs_loop(mod, query, ref, value, mask)
        else:   # a single decoding query reads the mask's last row
            query = query[:, :1]
            ref = ref[:, :1]
            expected = mmfs_loop(mod, query, ref, value, mask[:, -1:])
    out = mod(query, ref, value, mask)
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-9)


def test_llm_mmfs_branch_is_tanh_gate_times_mmfs_of_the_normed_inputs_at_the_centre():
    """The LLM's `llama_cross_attn`: tanh(gate) * MMFS(RMSNorm_1(h), reference (0.5, 0.5) for every token,
    RMSNorm_2(vision), mask), against the float64 MMFS loop above on norms written here."""
    torch.manual_seed(0)
    cfg = mmi.MMIConfig.from_preset("tiny")
    mod = mmi.LlamaMMFSAttention(cfg).double()
    with torch.no_grad():
        for p in mod.parameters():
            p.add_(torch.randn_like(p) * 0.3)          # gate, norms, ignore token: every weight matters
    B, Lq, n = 1, 2, 2
    S = sum(s * s for s in cfg.mmfs.spatial_shapes)
    h = torch.randn(B, Lq, cfg.llm.hidden_size, dtype=torch.float64)
    vision = torch.randn(B, n, S, cfg.vision.hidden_size, dtype=torch.float64)
    mask = torch.tensor([[[1, 0], [1, 1]]])
    eps = cfg.llm.rms_norm_eps
    rms = lambda x, w: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w.double()
    with torch.no_grad():
        out = mod(h, vision, mask)
        centre = torch.full((1, Lq, 2), 0.5, dtype=torch.float64)
        expected = torch.tanh(mod.gate.double()) * mmfs_loop(mod.attn, rms(h, mod.norm1.weight), centre,
                                                             rms(vision, mod.norm2.weight), mask)
    # RMSNorm takes its variance in float32 whatever the input dtype (as LLaMA does)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    # under autocast the float32 gate scales in the branch's dtype: a bf16 residual stream stays bf16
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert mod.float()(h.bfloat16(), vision.bfloat16(), mask).dtype == torch.bfloat16


def test_mmfs_too_many_images_is_an_error():
    mod = mmi.MMFS(d_query=4, d_value=4, d_out=4, d_attn=4, n_heads=1, n_points=1, spatial_shapes=[1],
                   base_spatial_shape=1, max_num_image_per_seq=3, offset_init_magnitude=1.0)
    with pytest.raises(ValueError, match="3 images visible to one query, max_num_image_per_seq is 3"):
        mod(torch.zeros(1, 1, 4), torch.full((1, 1, 2), 0.5), torch.zeros(1, 3, 1, 4), torch.ones(1, 3))


def test_msda_reference_single_levels_equal_the_stacked_path():
    """A level of its own size (no stack) gives what two equal-size levels (stacked) give for each level alone."""
    g = torch.Generator().manual_seed(2)
    B, M, D, Q, P = 2, 2, 3, 5, 4
    value = torch.randn(B, 2 * 16, M, D, generator=g, dtype=torch.float64)
    loc = torch.rand(B, Q, M, 2, P, 2, generator=g, dtype=torch.float64) * 1.2 - 0.1
    w = torch.rand(B, Q, M, 2, P, generator=g, dtype=torch.float64)
    shapes = torch.tensor([[4, 4], [4, 4]])
    both = mmi.ms_deform_attn_reference(value, shapes, mmi.level_start_index(shapes), loc, w)
    one = torch.tensor([[4, 4]])
    parts = [mmi.ms_deform_attn_reference(value[:, 16 * l:16 * (l + 1)], one, torch.tensor([0]), loc[:, :, :, l:l + 1],
                                          w[:, :, :, l:l + 1]) for l in range(2)]
    torch.testing.assert_close(both, parts[0] + parts[1], rtol=0, atol=1e-12)


def test_reference_matches_hand_computed_bilinear():
    """One level, one point: the reference equals bilinear interpolation computed by hand."""
    H, W, D = 3, 4, 2
    value = torch.arange(H * W * D, dtype=torch.float64).reshape(1, H * W, 1, D)
    x, y = 0.55, 0.3  # pixel coords x*W-0.5 = 1.7, y*H-0.5 = 0.4
    loc = torch.tensor([x, y], dtype=torch.float64).view(1, 1, 1, 1, 1, 2)
    attn = torch.full((1, 1, 1, 1, 1), 0.5, dtype=torch.float64)
    out = mmi.ms_deform_attn_reference(value, torch.tensor([[H, W]]), torch.tensor([0]), loc, attn)
    grid = value.view(H, W, D)
    px, py = 1.7, 0.4
    expect = ((1 - 0.4) * (1 - 0.7) * grid[0, 1] + (1 - 0.4) * 0.7 * grid[0, 2]
              + 0.4 * (1 - 0.7) * grid[1, 1] + 0.4 * 0.7 * grid[1, 2]) * 0.5
    assert math.isclose(px, x * W - 0.5) and math.isclose(py, y * H - 0.5)
    torch.testing.assert_close(out.view(D), expect, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------------------------------------------
# kernels.cu: our CUDA deformable attention against a float64 reference (skips without CUDA), the dispatch
# point, the loader's fallback with its one warning line, the decoding GEMV
# ----------------------------------------------------------------------------------------------------------------


# 1x1, 1x5 and 2x1 levels next to a large one; the kernel must treat each level's own H and W.
LEVELS_MIXED = [(33, 40), (9, 7), (1, 1), (1, 5), (2, 1)]
# MMFS folds images into levels: 10 images x 4 levels.
LEVELS_MMFS = [(8, 8), (4, 4), (2, 2), (1, 1)] * 10
# One large level next to a tiny one (value offsets beyond 2**16 elements per head).
LEVELS_HUGE = [(76, 80), (3, 3)]


def _away_from_pixel_edges(loc, shapes):
    """Nudges x*W-0.5 and y*H-0.5 off integers, where bilinear sampling has kinks and fp32/fp64 may disagree."""
    loc = loc.clone()
    for level, (h, w) in enumerate(shapes):
        for axis, size in ((0, w), (1, h)):
            coord = loc[:, :, :, level, :, axis] * size - 0.5
            frac = coord - coord.floor()
            near = (frac < 1e-3) | (frac > 1 - 1e-3)
            loc[:, :, :, level, :, axis] += near.to(loc.dtype) * (3e-3 / size)
    return loc


def make_inputs(B, Q, M, D, shapes, P, dtype, device, masked_levels=(), seed=0):
    """Random MSDA inputs: locations partly outside [0, 1]; weights of `masked_levels` zero in batch 0."""
    gen = torch.Generator().manual_seed(seed)
    L = len(shapes)
    S = sum(h * w for h, w in shapes)
    value = torch.randn(B, S, M, D, generator=gen, dtype=torch.float64)
    loc = torch.rand(B, Q, M, L, P, 2, generator=gen, dtype=torch.float64) * 1.3 - 0.15
    loc = _away_from_pixel_edges(loc, shapes)
    attn = torch.rand(B, Q, M, L, P, generator=gen, dtype=torch.float64) + 1e-5
    attn = attn / attn.sum((-1, -2), keepdim=True)
    for level in masked_levels:  # a masked-out image: its softmax weights underflow to exactly 0
        attn[0, :, :, level] = 0
    spatial_shapes = torch.tensor(shapes, dtype=torch.int64)
    sizes = spatial_shapes.prod(1)
    level_start_index = torch.cumsum(sizes, 0) - sizes
    to = dict(device=device, dtype=dtype)
    return (value.to(**to), spatial_shapes.to(device), level_start_index.to(device), loc.to(**to), attn.to(**to))


def reference_float64(inputs, grad_out):
    """Output and (value, location, weight) gradients of the float reference, in float64."""
    value, shapes, starts, loc, attn = [t.double() if t.is_floating_point() else t for t in inputs]
    value, loc, attn = (t.detach().requires_grad_() for t in (value, loc, attn))
    out = mmi.ms_deform_attn_reference(value, shapes, starts, loc, attn)
    grads = torch.autograd.grad(out, (value, loc, attn), grad_out.double())
    return [out.detach(), *grads]


@cuda_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("D,shapes,P", [(64, LEVELS_MIXED, 8), (32, LEVELS_MIXED, 4), (24, LEVELS_MIXED, 3),
                                        (64, LEVELS_MMFS, 8), (128, LEVELS_MIXED, 5), (32, LEVELS_HUGE, 2)])
def test_kernel_matches_float64_reference(dtype, D, shapes, P):
    """Output and all three gradients within 1e-5 (fp32) / 1e-2 (16-bit) of float64, every element written."""
    kernel = mmi.load_kernels()
    assert kernel is not None
    masked = range(len(shapes) - 4, len(shapes)) if len(shapes) > 8 else (1,)
    inputs = make_inputs(2, 37, 3, D, shapes, P, dtype, "cuda", masked_levels=masked, seed=D + P)
    grad_out = torch.randn(2, 37, 3 * D, device="cuda").to(dtype)
    expected = reference_float64(inputs, grad_out)
    # poison=True fills the outputs with NaN before the launch, so an unwritten element fails the check.
    out = kernel.forward(*inputs, poison=True)
    grads = kernel.backward(*inputs, grad_out, poison=True)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for name, got, ref in zip(["out", "grad_value", "grad_loc", "grad_attn"], [out, *grads], expected):
        assert got.dtype == dtype and got.shape == ref.shape, name
        assert torch.isfinite(got).all(), f"{name}: unwritten (NaN) elements"
        assert rel_err(got, ref) < tol, f"{name}: relative error {rel_err(got, ref):.2e}"


@cuda_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,Q,M,D,shapes,P", [(1, 1, 16, 64, LEVELS_MMFS[:12], 8),   # one decoding token
                                              (2, 1500, 3, 64, LEVELS_MIXED, 8),     # more groups than SMs
                                              (3, 2, 4, 32, LEVELS_MMFS, 3)])
def test_kernel_forward_few_and_many_queries(dtype, B, Q, M, D, shapes, P):
    """The forward takes a split-points kernel when the (b, q, head) groups are too few to fill the GPU (decoding)
    and the plain one otherwise: both within 1e-5 (fp32) / 1e-2 (bf16) of float64, every element written."""
    kernel = mmi.load_kernels()
    assert kernel is not None
    inputs = make_inputs(B, Q, M, D, shapes, P, dtype, "cuda", masked_levels=(1,), seed=Q)
    expected = reference_float64(inputs, torch.zeros(B, Q, M * D, device="cuda"))[0]
    out = kernel.forward(*inputs, poison=True)
    assert torch.isfinite(out).all()
    assert rel_err(out, expected) < (1e-5 if dtype == torch.float32 else 1e-2)


@cuda_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("Q,P", [(300, 8), (70, 40)])
def test_kernel_backward_over_query_tiles_and_many_points(dtype, Q, P):
    """The backward bins a block's value gradient per level for up to 128 queries of one head: 300 queries span
    several such blocks, the last one part-filled; 40 points leave too few bin slots at bf16 (the direct-atomics
    kernel) but not at fp32 (one query per group). Masked image, a level too large to bin (76x80) beside small ones."""
    kernel = mmi.load_kernels()
    assert kernel is not None
    shapes = [(76, 80), (8, 8), (16, 16), (1, 3)]
    inputs = make_inputs(2, Q, 2, 64, shapes, P, dtype, "cuda", masked_levels=(2,), seed=Q + P)
    grad_out = torch.randn(2, Q, 2 * 64, device="cuda").to(dtype)
    expected = reference_float64(inputs, grad_out)
    grads = kernel.backward(*inputs, grad_out, poison=True)
    for name, got, ref in zip(["grad_value", "grad_loc", "grad_attn"], grads, expected[1:]):
        assert torch.isfinite(got).all(), f"{name}: unwritten (NaN) elements"
        assert rel_err(got, ref) < (1e-5 if dtype == torch.float32 else 1e-2), f"{name}: {rel_err(got, ref):.2e}"


@cuda_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("R,N,K,n_layers,bias,glu,norm,residual", [
    (1, 5120, 5120, 3, False, False, False, False), (4, 37, 136, 1, True, False, False, False),
    (3, 300, 8, 2, True, False, False, False), (2, 1000, 2056, 2, False, True, False, False),
    (1, 13, 64, 2, True, True, False, False), (1, 5120, 5120, 3, False, False, True, False),
    (4, 1000, 2056, 2, True, True, True, True), (3, 37, 136, 1, True, False, True, True),
    (2, 300, 64, 1, False, False, False, True)])
def test_gemv_matches_float64(dtype, R, N, K, n_layers, bias, glu, norm, residual):
    """kernels.cu's decoding matmul against float64 on the same 16-bit inputs: within the dtype's unit roundoff
    (the kernel sums in float32 and rounds once), for row tails (N % 8), short K, biases, 1-3 layers, the glu,
    and an RMSNorm of x before and a residual added after (the pre-norm block the LLM's layers fold in)."""
    kernel = mmi.load_kernels()
    assert kernel is not None
    g = torch.Generator(device="cuda").manual_seed(N + K)
    x = (torch.randn(R, K, device="cuda", generator=g) * torch.tensor([[0.3], [2.0], [1.0], [7.0]], device="cuda")[:R]
         ).to(dtype)                                                     # rows of different scale: one rms each
    ws = [torch.randn(N, K, device="cuda", generator=g).to(dtype) / K ** 0.5 for _ in range(n_layers)]
    bs = [torch.randn(N, device="cuda", generator=g).to(dtype) if bias else None for _ in range(n_layers)]
    gain = (1 + torch.randn(K, device="cuda", generator=g) / 4).to(dtype) if norm else None
    res = torch.randn(R, N, device="cuda", generator=g).to(dtype) if residual else None
    x64 = x.double()
    if norm:
        x64 = gain.double() * x64 / (x64.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt()
    outs = [F.linear(x64, w.double(), None if b is None else b.double()) for w, b in zip(ws, bs)]
    expected = F.silu(outs[0]) * outs[1] if glu else torch.cat(outs, dim=-1)
    if residual:
        expected = expected + res.double()
    got = kernel.gemv(x, ws, bs, glu, gain, 1e-5, res)
    unit_roundoff = 2.0 ** -8 if dtype == torch.bfloat16 else 2.0 ** -11
    assert got.shape == expected.shape and got.dtype == dtype
    assert rel_err(got, expected) < unit_roundoff


@cuda_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits,group_size", [(8, None), (4, 128), (4, 32)])
@pytest.mark.parametrize("R,N,K,n_layers,bias,glu,norm,residual", [
    (1, 5120, 5120, 3, False, False, False, False), (4, 37, 256, 1, True, False, False, False),
    (2, 1000, 2048, 2, False, True, False, False), (1, 13, 128, 2, True, True, True, False),
    (4, 1000, 2048, 2, True, True, True, True), (3, 300, 384, 1, True, False, True, True)])
def test_quantized_gemv_matches_float64(dtype, bits, group_size, R, N, K, n_layers, bias, glu, norm, residual):
    """The gemv on int8 (one scale per row) and int4 (one scale per group) weights against float64 of x times
    q * scale, the stored scales taken exactly: within the dtype's unit roundoff, as on 16-bit weights."""
    kernel = mmi.load_kernels()
    assert kernel is not None
    g = torch.Generator(device="cuda").manual_seed(N + K + bits)
    x = (torch.randn(R, K, device="cuda", generator=g) * torch.tensor([[0.3], [2.0], [1.0], [7.0]], device="cuda")[:R]
         ).to(dtype)
    torch.manual_seed(N + K)
    layers = [mmi.QuantizedLinear.from_linear(torch.nn.Linear(K, N, bias=bias).to("cuda", dtype), bits,
                                              group_size or 128) for _ in range(n_layers)]
    bs = [layer.bias.detach() if bias else None for layer in layers]
    gain = (1 + torch.randn(K, device="cuda", generator=g) / 4).to(dtype) if norm else None
    res = torch.randn(R, N, device="cuda", generator=g).to(dtype) if residual else None
    x64 = x.double()
    if norm:
        x64 = gain.double() * x64 / (x64.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt()
    exact = [mmi.dequantize_weight(l.qweight, l.scales.double(), l.group_size) for l in layers]   # q * s in float64
    outs = [F.linear(x64, w, None if b is None else b.double()) for w, b in zip(exact, bs)]
    expected = F.silu(outs[0]) * outs[1] if glu else torch.cat(outs, dim=-1)
    if residual:
        expected = expected + res.double()
    got = kernel.gemv(x, [l.qweight for l in layers], bs, glu, gain, 1e-5, res, [l.scales for l in layers],
                      layers[0].group_size)
    unit_roundoff = 2.0 ** -8 if dtype == torch.bfloat16 else 2.0 ** -11
    assert got.shape == expected.shape and got.dtype == dtype
    assert rel_err(got, expected) < unit_roundoff


@cuda_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,H,D,T,slot", [(1, 40, 128, 300, 217), (3, 4, 64, 70, 69), (2, 2, 32, 9, 0),
                                          (2, 3, 128, 2100, 1500)])
def test_decode_attention_matches_float64(dtype, B, H, D, T, slot):
    """kernels.cu's decode_attention against float64 on the same 16-bit inputs: the new token's k (rotated) and v
    land in slot `slot` and nothing else in the cache changes; its output is softmax(q k^T / sqrt(D) + mask) v over
    slots 0..slot with q and k rotated (the RoPE tables' rows at each row's own position) and rounded to the dtype,
    within the dtype's unit roundoff. q, k, v are views into one [B, 3 H D] output (strided rows, as the fused q/k/v
    matmul gives them); row 1 is left-padded (its first 3 slots masked); the slots after `slot` hold values that
    must not be read."""
    kernel = mmi.load_kernels()
    assert kernel is not None
    g = torch.Generator(device="cuda").manual_seed(T + slot)
    qkv = torch.randn(B, 3 * H * D, device="cuda", generator=g).to(dtype)
    q, k, v = qkv.chunk(3, dim=-1)                                            # (B, H D) each, row stride 3 H D
    kv = torch.randn(2, B, H, T, D, device="cuda", generator=g).to(dtype)
    pos = torch.randint(0, 4000, (B,), device="cuda", generator=g)            # each row's position
    cos_table, sin_table = mmi.rope_cos_sin(torch.arange(4000, device="cuda"), D, 10000.0, dtype)   # (4000, D)
    cos, sin = cos_table[pos][:, None], sin_table[pos][:, None]               # (B, 1, D): the rows it must read
    allowed = torch.arange(T, device="cuda").expand(B, T) <= slot
    if B > 1 and slot > 3:
        allowed[1, :3] = False
    mask = mmi.additive_mask(allowed, dtype)                                  # (B, T): 0 or the dtype's minimum
    got_kv = kv.clone()
    got = kernel.decode_attention(q, k, v, cos_table, sin_table, pos, got_kv, torch.tensor([slot], device="cuda"),
                                  mask)

    def rope(x):                                    # (B, H, D) in float64, rounded to the dtype as the cache holds it
        x = x.double().view(B, H, D)
        half = torch.cat([-x[..., D // 2:], x[..., :D // 2]], dim=-1)
        return (x * cos.double() + half * sin.double()).to(dtype)

    q_rot, k_rot = rope(q), rope(k)
    want_kv = kv.clone()
    want_kv[0, :, :, slot], want_kv[1, :, :, slot] = k_rot, v.view(B, H, D)
    scores = torch.einsum("bhd,bhtd->bht", q_rot.double(), want_kv[0, :, :, :slot + 1].double()) / D ** 0.5
    scores = scores.masked_fill(~allowed[:, None, :slot + 1], float("-inf"))
    want = torch.einsum("bht,bhtd->bhd", scores.softmax(-1), want_kv[1, :, :, :slot + 1].double()).reshape(B, H * D)
    unit_roundoff = 2.0 ** -8 if dtype == torch.bfloat16 else 2.0 ** -11
    keep = torch.ones(T, dtype=torch.bool, device="cuda")
    keep[slot] = False
    assert torch.equal(got_kv[:, :, :, keep], kv[:, :, :, keep]) and torch.equal(got_kv[1], want_kv[1])
    assert rel_err(got_kv[0, :, :, slot], want_kv[0, :, :, slot].double()) < unit_roundoff   # rounding ties aside
    assert got.shape == (B, H * D) and got.dtype == dtype and rel_err(got, want) < unit_roundoff


def test_gemv_reads_quantized_layers_whose_groups_fit_its_loads():
    """The gemv reads nn.Linear weights of x's dtype, or QuantizedLinear layers of one format with scales of x's
    dtype, no padded inputs, and groups holding whole 16-byte loads (16 int8 or 32 int4 inputs)."""
    x = torch.zeros(1, 128, dtype=torch.bfloat16)
    linear = lambda k=128: torch.nn.Linear(k, 64).to(torch.bfloat16)
    q = lambda bits, g=128, k=128: mmi.QuantizedLinear.from_linear(linear(k), bits, g)
    int4 = q(4)
    weights, scales, group = mmi._gemv_weights([int4, q(4)], x)
    assert weights[0] is int4.qweight and scales[0] is int4.scales and group == 128
    assert mmi._gemv_weights([q(8)], x)[2] == 128                             # int8: the whole row is one group
    assert mmi._gemv_weights([linear()], x)[1:] == ([], 0)
    assert mmi._gemv_weights([q(4, 32)], x)[2] == 32
    for layers, xx in [([q(4, 16)], x),                                       # a 32-input load spans two groups
                       ([q(4, 128, 96)], x[:, :96]),                          # 96 inputs padded to 128
                       ([q(4), q(8)], x),                                     # two formats
                       ([q(4), linear()], x),
                       ([q(4)], x.float()),                                   # scales of another dtype
                       ([linear()], x.half())]:
        assert mmi._gemv_weights(layers, xx) is None


def _off_16_bytes(t):
    """t's values in a view that starts one element past a 16-byte boundary (as a view into a larger buffer)."""
    view = torch.empty(t.numel() + 1, dtype=t.dtype)[1:].view(t.shape).copy_(t)
    assert view.data_ptr() % 16
    return view


@pytest.mark.parametrize("bits", [None, 8, 4])
def test_gemv_on_weights_off_its_alignment_equals_float64(bits):
    """The gemv operator on weights off a 16-byte boundary (FSDP's views may be) computes, without the kernel,
    what the kernel computes: x through an RMSNorm of its own eps, then 1-3 layers with their biases (outputs
    side by side, or silu(gate) * up), plus a residual; quantized weights read with each layer's own scales.
    Against float64 of the same float32 inputs; the operator's fake gives the same shape and dtype."""
    g = torch.Generator().manual_seed(0)
    R, N, K, eps = 3, 24, 64, 0.01
    x = torch.randn(R, K, generator=g) * 0.05                   # mean square 0.0025: the eps matters
    gain = 1 + torch.randn(K, generator=g) / 4
    for n_layers, glu, norm, residual in [(3, False, False, False), (2, True, True, True), (1, False, True, True),
                                          (2, False, False, False)]:
        torch.manual_seed(n_layers)
        linears = [torch.nn.Linear(K, N) for _ in range(n_layers)]
        if bits is None:
            weights, scales, group_size = [_off_16_bytes(l.weight.detach()) for l in linears], [], 0
            exact = [l.weight.double() for l in linears]
        else:
            layers = [mmi.QuantizedLinear.from_linear(l, bits, 32) for l in linears]
            weights, scales = [_off_16_bytes(l.qweight) for l in layers], [l.scales for l in layers]
            group_size, exact = layers[0].group_size, [_dequantize_by_hand(l) for l in layers]
        biases = [l.bias.detach() for l in linears]
        res = torch.randn(R, N, generator=g) if residual else None
        x64 = gain.double() * x.double() / (x.double().pow(2).mean(-1, keepdim=True) + eps).sqrt() if norm \
            else x.double()
        outs = [F.linear(x64, w, b.double()) for w, b in zip(exact, biases)]
        expected = F.silu(outs[0]) * outs[1] if glu else torch.cat(outs, dim=-1)
        if residual:
            expected = expected + res.double()
        args = (x, weights, biases, glu, gain if norm else None, eps, res, scales, group_size)
        got = mmi.gemv(*args)
        assert got.shape == expected.shape and got.dtype == torch.float32
        assert rel_err(got, expected) < 1e-6, (n_layers, glu, norm, residual)
        torch.library.opcheck(mmi.gemv, args, test_utils="test_faketensor")


def test_linear_on_cpu_calls_the_layers():
    """Off the GEMV path mmi.linear is the layers themselves (hooks run), and glu is silu(gate(x)) * up(x)."""
    torch.manual_seed(0)
    gate, up, third = (torch.nn.Linear(8, 6) for _ in range(3))
    x = torch.randn(1, 1, 8, dtype=torch.float32)
    called = []
    gate.register_forward_hook(lambda mod, inp, out: called.append("gate"))
    outs = mmi.linear(x, gate, up, third)
    assert len(outs) == 3 and all(torch.equal(o, m(x)) for o, m in zip(outs, (gate, up, third)))
    assert torch.equal(mmi.linear(x, gate, up, glu=True), F.silu(gate(x)) * up(x))
    assert torch.equal(mmi.linear(x, third), third(x)) and called.count("gate") == 4
    norm, h = mmi.RMSNorm(8), torch.randn(1, 1, 6)
    torch.nn.init.normal_(norm.weight)
    assert torch.equal(mmi.linear(x, gate, up, glu=True, norm=norm, residual=h),
                       h + F.silu(gate(norm(x))) * up(norm(x)))
    assert torch.equal(mmi.linear(x, third, residual=h), h + third(x))
    with pytest.raises(ValueError, match="a residual needs one output, got 2 layers"):
        mmi.linear(x, gate, up, residual=h)


@cuda_only
def test_linear_uses_gemv_for_decoding_rows_only(monkeypatch):
    """mmi.linear sends a few 16-bit rows outside autograd to the gemv operator, and gives what F.linear gives
    (bf16 rounding apart); many rows, float32 or inputs that need gradients go to the layers, and weights off a
    16-byte boundary to F.linear inside the operator."""
    assert mmi.load_kernels() is not None
    calls = []
    real = mmi.gemv
    monkeypatch.setattr(mmi, "gemv", lambda *a: calls.append(a[0].shape) or real(*a))
    torch.manual_seed(0)
    layers = [torch.nn.Linear(256, 512).cuda().to(torch.bfloat16) for _ in range(3)]
    x = torch.randn(1, 2, 256, device="cuda", dtype=torch.bfloat16)
    ref = [F.linear(x.float(), layer.weight.float(), layer.bias.float()) for layer in layers]
    with torch.no_grad():
        q, k, v = mmi.linear(x, *layers)
        h = mmi.linear(x, layers[0], layers[1], glu=True)
        norm = mmi.RMSNorm(256, eps=1e-5).cuda().to(torch.bfloat16)
        torch.nn.init.normal_(norm.weight)
        r = torch.randn(1, 2, 512, device="cuda", dtype=torch.bfloat16)
        fused = mmi.linear(x, layers[2], norm=norm, residual=r)                 # (1, 2, 512): rows keep their shape
        assert calls == [(2, 256)] * 3
        xn = norm.weight.float() * x.float() * (x.float().pow(2).mean(-1, keepdim=True) + 1e-5).rsqrt()
        assert rel_err(fused, r.float() + F.linear(xn, layers[2].weight.float(), layers[2].bias.float())) < 2.0 ** -8
        for got, expected in zip((q, k, v), ref):
            assert rel_err(got, expected) < 2.0 ** -8
        assert rel_err(h, F.silu(ref[0]) * ref[1]) < 2.0 ** -8
        mmi.linear(torch.randn(5, 256, device="cuda", dtype=torch.bfloat16), layers[0])      # 5 rows
        mmi.linear(x.float(), *[torch.nn.Linear(256, 512).cuda() for _ in range(2)])        # float32
    mmi.linear(x, layers[0])                                                                # weights need grads
    odd = torch.nn.Linear(256, 512, bias=False)                     # a weight that is a view off a 16-byte boundary
    odd.weight = torch.nn.Parameter(torch.randn(512 * 256 + 1, device="cuda", dtype=torch.bfloat16)[1:].view(512, 256),
                                    requires_grad=False)
    with torch.no_grad():
        assert torch.equal(mmi.linear(x, odd), odd(x))                  # the operator took F.linear for this weight
        shifted = torch.empty(2 * 256 + 1, device="cuda", dtype=torch.bfloat16)[1:].view(1, 2, 256).copy_(x)
        assert torch.equal(mmi.linear(shifted, *layers)[0], q)          # an input off the boundary is copied first
    assert len(calls) == 5


@cuda_only
def test_kernel_matches_reference_on_map_edges():
    """Points exactly on pixel centres and on the map's edges (x*W-0.5 in {-1, 0, W-1, W}) agree with float64."""
    kernel = mmi.load_kernels()
    assert kernel is not None
    shapes = [(8, 8), (4, 16)]
    value, sh, st, loc, attn = make_inputs(1, 16, 2, 32, shapes, 4, torch.float32, "cuda", seed=5)
    edges = torch.tensor([-1.0, 0.0, 3.0, 7.0, 8.0, 2.5], device="cuda")  # pixel coordinates
    gen = torch.Generator(device="cuda").manual_seed(1)
    for level, (h, w) in enumerate(shapes):
        pick = torch.randint(0, len(edges), loc[..., level, :, 0].shape, device="cuda", generator=gen)
        loc[..., level, :, 0] = (edges[pick].clamp(max=w) + 0.5) / w
        pick = torch.randint(0, len(edges), loc[..., level, :, 1].shape, device="cuda", generator=gen)
        loc[..., level, :, 1] = (edges[pick].clamp(max=h) + 0.5) / h
    inputs = (value, sh, st, loc, attn)
    grad_out = torch.randn(1, 16, 64, device="cuda", generator=gen)
    expected = reference_float64(inputs, grad_out)
    got = [kernel.forward(*inputs, poison=True), *kernel.backward(*inputs, grad_out, poison=True)]
    for name, x, ref in zip(["out", "grad_value", "grad_loc", "grad_attn"], got, expected):
        assert rel_err(x, ref) < 1e-5, f"{name}: relative error {rel_err(x, ref):.2e}"


@cuda_only
@pytest.mark.parametrize("D", [5, 8])  # odd and even head dims
def test_kernel_gradcheck_float64(D):
    """Analytic gradients of the autograd wrapper agree with finite differences (float64)."""
    assert mmi.load_kernels() is not None
    value, shapes, starts, loc, attn = make_inputs(1, 3, 2, D, [(3, 4), (2, 2)], 3, torch.float64, "cuda", seed=7)
    args = (value.requires_grad_(), shapes, starts, loc.requires_grad_(), attn.requires_grad_())
    assert torch.autograd.gradcheck(mmi._msda_op, args, eps=1e-6, atol=1e-5, rtol=1e-4)


@cuda_only
def test_kernel_ops_fakes_give_the_kernels_shapes_and_strides():
    """torch.library.opcheck of both operators with non-contiguous inputs: what their fakes promise a compiled
    graph (shapes, strides, dtypes) is what the kernel returns (its outputs are contiguous whatever the inputs)."""
    assert mmi.load_kernels() is not None
    value, shapes, starts, loc, attn = make_inputs(2, 6, 2, 8, [(3, 4), (2, 2)], 3, torch.float32, "cuda", seed=2)
    loc, attn = loc.transpose(0, 1).contiguous().transpose(0, 1), attn.transpose(0, 1).contiguous().transpose(0, 1)
    assert not loc.is_contiguous() and not attn.is_contiguous()
    grad_out = torch.randn(2, 6, 16, device="cuda")
    torch.library.opcheck(mmi._msda_op, (value, shapes, starts, loc, attn), test_utils="test_faketensor")
    torch.library.opcheck(mmi._msda_backward_op, (value, shapes, starts, loc, attn, grad_out),
                          test_utils="test_faketensor")


@cuda_only
def test_dispatch_routes_cuda_to_kernel_and_env_forces_reference(monkeypatch):
    """CUDA tensors go through the kernel's operator (mmi::msda_forward); MMI_KERNELS=reference sends them to
    grid_sample."""
    inputs = make_inputs(1, 5, 2, 32, LEVELS_MIXED, 4, torch.float32, "cuda", seed=3)
    out = mmi.ms_deform_attn(*inputs)
    assert out.grad_fn is None or "msda_forward" in type(out.grad_fn).__name__
    value = inputs[0].clone().requires_grad_()
    out = mmi.ms_deform_attn(value, *inputs[1:])
    assert "msda_forward" in type(out.grad_fn).__name__
    monkeypatch.setenv("MMI_KERNELS", "reference")
    ref = mmi.ms_deform_attn(value, *inputs[1:])
    assert "msda_forward" not in type(ref.grad_fn).__name__
    assert rel_err(out.detach(), ref.detach().double()) < 1e-5


def test_dispatch_cpu_uses_reference_without_warning():
    """CPU tensors take the reference path: same numbers as the reference, no fallback warning."""
    inputs = make_inputs(1, 4, 2, 8, LEVELS_MIXED, 2, torch.float32, "cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = mmi.ms_deform_attn(*inputs)
    assert torch.equal(out, mmi.ms_deform_attn_reference(*inputs))


def test_kernels_used_traces_as_a_constant_under_torch_compile():
    """Compiled blocks ask kernels_used which MMFS path to take; the answer (which builds or loads kernels.cu, file
    work dynamo cannot trace) must not break their graph when they are compiled through mmi.compiled."""
    f = mmi.compiled(lambda x: x + mmi.kernels_used("cuda"), backend="eager", fullgraph=True)
    assert torch.equal(f(torch.zeros(2)), torch.full((2,), float(mmi.kernels_used("cuda"))))


def test_importing_the_scripts_does_not_import_the_compiler():
    """torch._dynamo takes about as long to import as torch: importing mmi and the scripts leaves it out, so that
    `python sample.py --help` and a bad argument answer without waiting for it (building a model on the meta device
    imports it, inside torch)."""
    code = "import sys, mmi, data, sample, train, eval, bench; print('torch._dynamo' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=HERE, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "False", proc.stderr[-2000:]


def test_dispatch_rejects_bad_inputs():
    """Mismatched dtypes or shapes that do not cover value's S raise ValueError naming the problem."""
    value, shapes, starts, loc, attn = make_inputs(1, 4, 2, 8, LEVELS_MIXED, 2, torch.float32, "cpu")
    with pytest.raises(ValueError, match="dtype"):
        mmi.ms_deform_attn(value, shapes, starts, loc.double(), attn)
    with pytest.raises(ValueError, match="S="):
        mmi.ms_deform_attn(value[:, 1:], shapes, starts, loc, attn)
    with pytest.raises(ValueError, match="attention_weights"):
        mmi.ms_deform_attn(value, shapes, starts, loc, attn[..., :1])


@pytest.fixture
def fresh_kernel_loader():
    """mmi.load_kernels with its kept answer forgotten before the test, and after it (the test's fakes made it)."""
    mmi.load_kernels.cache_clear()
    yield mmi.load_kernels
    mmi.load_kernels.cache_clear()


def test_loader_without_nvcc_warns_once_and_falls_back(monkeypatch, fresh_kernel_loader):
    """No nvcc: one warning line that says so, no build attempt, later calls silent."""
    from torch.utils import cpp_extension

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert fresh_kernel_loader() is None
        assert fresh_kernel_loader() is None
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "\n" not in message and "nvcc not found" in message and "reference" in message


def test_loader_build_failure_warns_with_reason(monkeypatch, tmp_path, fresh_kernel_loader):
    """A failing build falls back with one warning that carries the compiler's first error line."""
    from torch.utils import cpp_extension

    def failing_load(**kwargs):
        raise RuntimeError("Error building extension 'mmi_kernels'\nninja: build stopped")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", "/usr/local/cuda")
    monkeypatch.setattr(cpp_extension, "load", failing_load)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    with pytest.warns(UserWarning, match=r"build of kernels.cu failed \(RuntimeError: Error building extension"):
        assert fresh_kernel_loader() is None


def test_kernel_build_announced_once_then_reused(tmp_path, capsys):
    """build_kernels prints one stderr line before a build, none once the folder holds an up-to-date module; the
    units it hands the compiler each include kernels.cu under a different MMI_PART."""
    calls = []

    def fake_load(name, sources, build_directory, **kwargs):  # what cpp_extension.load leaves: the linked module
        calls.append(sources)
        (tmp_path / f"{name}.so").write_bytes(b"")
        return "module"

    assert mmi.build_kernels(tmp_path, load=fake_load) == "module"
    first = capsys.readouterr()
    assert re.fullmatch(r"mmi: compiling kernels\.cu \(first use, about \d+ s\)\n", first.err) and first.out == ""
    assert mmi.build_kernels(tmp_path, load=fake_load) == "module"
    assert capsys.readouterr().err == ""
    assert calls[0] == calls[1] and len(calls[0]) > 1
    kernels = os.path.realpath(os.path.join(os.path.dirname(mmi.__file__), "kernels.cu"))
    units = [open(source).read() for source in calls[0]]
    assert all(f'#include "{kernels}"' in unit for unit in units)
    parts = [re.search(r"#define MMI_PART (\d+)", unit).group(1) for unit in units]
    assert len(set(parts)) == len(parts)


# ----------------------------------------------------------------------------------------------------------------
# Vision: CLIP ViT-L/14 and the Q-Former resampler against transformers
# ----------------------------------------------------------------------------------------------------------------


def test_clip_vision_matches_transformers(tmp_path):
    transformers = oracle_transformers()
    torch.manual_seed(0)
    cfg = mmi.MMIConfig.from_preset("tiny")
    v = cfg.vision
    hf_cfg = transformers.CLIPVisionConfig(hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                                           num_hidden_layers=v.num_hidden_layers,
                                           num_attention_heads=v.num_attention_heads, image_size=v.image_size,
                                           patch_size=v.patch_size, hidden_act="quick_gelu",
                                           layer_norm_eps=v.layer_norm_eps)
    hf = transformers.CLIPVisionModel(hf_cfg).eval()
    hf.save_pretrained(tmp_path)
    sd = _load_safetensors_dir(tmp_path)
    model = mmi.MMInterleaved(cfg).eval()
    vision = model.visual_tokenizer.encoder["vision_model"]
    used = {k[len("vision_model."):]: t for k, t in sd.items() if not k.startswith("vision_model.post_layernorm")}
    missing, unexpected = vision.load_state_dict(used, strict=False)
    assert unexpected == [] and all(k.startswith("adapter") or k == "embeddings.position_ids" for k in missing)
    pixels = torch.randn(2, 3, v.image_size, v.image_size)
    ours, maps = vision(pixels)                      # adapter gammas are zero: the ViT path is CLIP's own
    theirs = hf(pixel_values=pixels).last_hidden_state
    assert (ours - theirs).abs().max() < 1e-4
    assert [tuple(m.shape) for m in maps] == [(2, 64, 32, 32), (2, 64, 16, 16), (2, 64, 8, 8), (2, 64, 4, 4)]


def test_adapter_injector_and_extractor_follow_the_vit_adapter_formulas():
    """In float64: injector x + gamma * attn(LN_q(x), ref, LN_f(c)); extractor c' = c + attn(LN_q(c), ref, LN_f(x)),
    then c' + fc2(GELU(dwconv(fc1(LN_ffn(c'))))), the 3x3 depth-wise conv (zero padding) run on each of the pyramid's
    grids (2G, G, G/2 per side, in that order) separately. MSDeformAttn itself: the float64 loop above."""
    torch.manual_seed(0)
    cfg = mmi.MMIConfig.from_preset("tiny").vision
    inj, ext = mmi.Injector(cfg).double(), mmi.Extractor(cfg).double()
    with torch.no_grad():
        for p in [*inj.parameters(), *ext.parameters()]:
            p.add_(torch.randn_like(p) * 0.3)          # gamma, norms, offsets: every weight matters
    G, B, d = 4, 2, cfg.hidden_size
    sides = (2 * G, G, G // 2)
    x = torch.randn(B, G * G, d, dtype=torch.float64)
    c = torch.randn(B, sum(s * s for s in sides), d, dtype=torch.float64)
    pyramid, patches = torch.tensor([(s, s) for s in sides]), torch.tensor([(G, G)])
    ref_x = mmi.grid_centres(G, G)[None].double()
    ref_c = torch.cat([mmi.grid_centres(s, s) for s in sides])[None].double()
    ln = lambda norm, t: F.layer_norm(t, (d,), norm.weight, norm.bias, norm.eps)
    lin = lambda layer, t: t @ layer.weight.T + layer.bias
    with torch.no_grad():
        want = x + inj.gamma * inj.attn(ln(inj.query_norm, x), ref_x, ln(inj.feat_norm, c), pyramid)
        torch.testing.assert_close(inj(x, ref_x, c, pyramid), want, rtol=1e-9, atol=1e-9)
        c1 = c + ext.attn(ln(ext.query_norm, c), ref_c, ln(ext.feat_norm, x), patches)
        h = lin(ext.ffn.fc1, ln(ext.ffn_norm, c1))
        conv, parts, start = ext.ffn.dwconv["dwconv"], [], 0
        for s in sides:
            grid = F.pad(h[:, start:start + s * s].reshape(B, s, s, -1), (0, 0, 1, 1, 1, 1))   # (B, s+2, s+2, C)
            start += s * s
            taps = (conv.weight[:, 0, i, j] * grid[:, i:i + s, j:j + s] for i in range(3) for j in range(3))
            out = conv.bias + sum(taps)
            parts.append(out.reshape(B, s * s, -1))
        want = c1 + lin(ext.ffn.fc2, F.gelu(torch.cat(parts, 1)))
        torch.testing.assert_close(ext(c, ref_c, x, patches, G), want, rtol=1e-9, atol=1e-9)


def test_adapter_queries_and_fuses_the_pyramid_as_the_vit_adapter():
    """The adapter's wiring: injectors query the G x G patch tokens at their pixel centres over the pyramid of sides
    2G, G, G/2; extractors query the pyramid's tokens (2G, then G, then G/2, row-major) at their own pixel centres
    over the patches. Map k adds ViT group k's patch tokens to pyramid level k: group 1 up 4x (onto the stem's map
    plus the 2G level up-convolved), group 2 up 2x, group 3 as is, group 4 down 2x."""
    torch.manual_seed(0)
    cfg = mmi.MMIConfig.from_preset("tiny").vision
    vision = mmi.CLIPVisionAdapter(cfg).eval()
    G, B = cfg.grid_size, 2
    seen = defaultdict(list)
    record = lambda key, f: (lambda m, *args: seen[key].append(f(*args)))
    for block in vision.adapter_interactions:
        block.injector.register_forward_pre_hook(record("injector", lambda a: a))
        for e in [block.extractor, *(block.extra_extractors or ())]:
            e.register_forward_pre_hook(record("extractor", lambda a: a))
            e.register_forward_hook(record("c", lambda a, out: out))
    for _, last in cfg.interaction_indexes:
        vision.encoder["layers"][last].register_forward_hook(record("x", lambda a, out: out[:, 1:]))
    vision.adapter_spm.register_forward_hook(record("stem", lambda a, out: out[0]))
    with torch.no_grad():
        _, maps = vision(torch.randn(B, 3, cfg.image_size, cfg.image_size))
    sides = (2 * G, G, G // 2)
    for x, ref, c, shapes in seen["injector"]:
        assert x.shape[1] == G * G and torch.equal(ref[0], mmi.grid_centres(G, G))
        assert shapes.tolist() == [[s, s] for s in sides] and c.shape[1] == sum(s * s for s in sides)
    assert len(seen["extractor"]) == 4 + cfg.num_extra_extractors
    for c, ref, x, shapes, grid in seen["extractor"]:
        assert torch.equal(ref[0], torch.cat([mmi.grid_centres(s, s) for s in sides]))
        assert shapes.tolist() == [[G, G]] and grid == G
    as_map = lambda t, s: t.transpose(1, 2).reshape(B, -1, s, s)
    x1, x2, x3, x4 = (as_map(x, G) for x in seen["x"])
    c2, c3, c4 = (as_map(t, s) for t, s in zip(seen["c"][-1].split([s * s for s in sides], 1), sides))
    resize = lambda t, f: F.interpolate(t, scale_factor=f, mode="bilinear", align_corners=False)
    with torch.no_grad():
        want = [vision.adapter_up(c2) + seen["stem"][0] + resize(x1, 4), c2 + resize(x2, 2), c3 + x3,
                c4 + resize(x4, 0.5)]
    for got, w in zip(maps, want):
        torch.testing.assert_close(got, w, rtol=0, atol=1e-6)


@pytest.mark.parametrize("frequency", [1, 2])
def test_qformer_matches_transformers_blip2(frequency):
    transformers = oracle_transformers()
    torch.manual_seed(0)
    rc = mmi.ResamplerConfig(num_queries=5, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                             intermediate_size=48, encoder_hidden_size=24, cross_attention_frequency=frequency,
                             qk_normalization=False, dropout=0.0)
    hf_cfg = transformers.Blip2QFormerConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                             intermediate_size=48, encoder_hidden_size=24,
                                             cross_attention_frequency=frequency)
    hf = transformers.Blip2QFormerModel(hf_cfg).eval()
    ours = mmi.PerceiverResampler(rc).eval()
    sd = {k: v for k, v in hf.state_dict().items() if ".intermediate." not in k and ".output." not in k
          or "_query" in k or "attention.output" in k}
    missing, unexpected = ours.blip2qformer.load_state_dict(sd, strict=False)
    assert missing == [] and unexpected == []
    enc = torch.randn(3, 7, 24)
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 4:] = 0
    queries = ours.queries.expand(3, -1, -1)
    theirs = hf(query_embeds=queries, encoder_hidden_states=enc, encoder_attention_mask=mask).last_hidden_state
    assert (ours(enc, mask) - theirs).abs().max() < 1e-5


# ----------------------------------------------------------------------------------------------------------------
# LLM with MMFS: LLaMA against transformers
# ----------------------------------------------------------------------------------------------------------------


def test_llama_matches_transformers(tmp_path):
    transformers = oracle_transformers()
    torch.manual_seed(0)
    cfg = mmi.MMIConfig.from_preset("tiny")
    c = cfg.llm
    hf_cfg = transformers.LlamaConfig(vocab_size=c.vocab_size - 2, hidden_size=c.hidden_size,
                                      intermediate_size=c.intermediate_size, num_hidden_layers=c.num_hidden_layers,
                                      num_attention_heads=c.num_attention_heads, rms_norm_eps=c.rms_norm_eps,
                                      max_position_embeddings=c.max_position_embeddings, rope_theta=c.rope_theta,
                                      tie_word_embeddings=False)
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    hf.save_pretrained(tmp_path)
    sd = _load_safetensors_dir(tmp_path)
    model = mmi.MMInterleaved(cfg).eval()
    V = hf_cfg.vocab_size
    with torch.no_grad():
        for k, v in sd.items():
            if k == "lm_head.weight":
                model.text_decoder.head.weight[:V] = v
            elif k == "model.embed_tokens.weight":
                model.mm_decoder.embed_tokens.weight[:V] = v
            else:
                model.mm_decoder.get_parameter(k[len("model."):]).copy_(v)
        model.text_decoder.head.bias[:V] = 0
    ids = torch.randint(3, V, (2, 17))
    ids[:, 0] = 1
    ours = model.text_logits({"text_ids": ids})
    theirs = hf(input_ids=ids).logits
    assert (ours[..., :V] - theirs).abs().max() < 1e-4
    # left-padded prompts: positions and the padding mask as HF computes them for generation
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    ours = model.text_logits({"text_ids": ids, "attention_mask": mask}, attention_mask_aware=True)
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    theirs = hf(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    assert (ours[..., :V] - theirs)[mask.bool()].abs().max() < 1e-4


def _original_llama_float64(model, ids, mask, pos):
    """The original's LLaMA in eval mode, text only, re-derived in float64 from the weights: scores + causal mask +
    padding mask (each the float64 minimum where it hides a key, so both sum to -inf), clamped at that minimum,
    then softmax. -> the last hidden states (B, L, d)."""
    c, W = model.mm_decoder.cfg, {k: v.double() for k, v in model.mm_decoder.state_dict().items()}
    B, L = ids.shape
    nh, hd, lo = c.num_attention_heads, c.hidden_size // c.num_attention_heads, torch.finfo(torch.float64).min
    pad = torch.zeros(B, 1, 1, L, dtype=torch.float64).masked_fill(mask[:, None, None, :] == 0, lo)
    bias = torch.full((L, L), lo, dtype=torch.float64).triu(1) + pad                    # (B, 1, L, L)
    angles = pos.double()[..., None] * c.rope_theta ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    cos, sin = (torch.cat([f(angles)] * 2, -1)[:, None] for f in (torch.cos, torch.sin))     # (B, 1, L, hd)

    def rope(x):
        x1, x2 = x.chunk(2, -1)
        return x * cos + torch.cat([-x2, x1], -1) * sin

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + c.rms_norm_eps) * w

    h = W["embed_tokens.weight"][ids]
    for i in range(c.num_hidden_layers):
        w = {k[len(f"layers.{i}."):]: v for k, v in W.items() if k.startswith(f"layers.{i}.")}
        x = rms(h, w["input_layernorm.weight"])
        q, k, v = ((x @ w[f"self_attn.{n}_proj.weight"].T).view(B, L, nh, hd).transpose(1, 2) for n in "qkv")
        scores = (rope(q) @ rope(k).transpose(-1, -2) / hd ** 0.5 + bias).clamp(min=lo)
        h = h + (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, L, -1) @ w["self_attn.o_proj.weight"].T
        x = rms(h, w["post_attention_layernorm.weight"])
        gate, up = x @ w["mlp.gate_proj.weight"].T, x @ w["mlp.up_proj.weight"].T
        h = h + (F.silu(gate) * up) @ w["mlp.down_proj.weight"].T
    return rms(h, W["norm.weight"])


def test_padded_positions_attend_as_the_originals_eval_llama():
    """With an attention_mask, each query attends causally to the real tokens only; a left pad, which has none,
    attends uniformly to all L keys (its row is the dtype's minimum throughout). Pads included, the hidden states
    equal the original's masked softmax re-derived in float64, with positions 0..L-1 (the original's forward and
    scoring) and counted over real tokens (generation's prompt pass)."""
    model = tiny_model().double()
    ids = torch.randint(3, 300, (3, 11), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0                                       # left padding: pads 0..3 have no real key
    mask[1, 7:] = 0                                       # right padding: pads see the real tokens before them
    ids = ids.masked_fill(mask == 0, PAD)
    batch = {"text_ids": ids, "attention_mask": mask}
    real_pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    for aware, pos in ((False, torch.arange(11).expand_as(ids)), (True, real_pos)):
        with torch.no_grad():
            h, _ = model.hidden_states(batch, attention_mask_aware=aware)
        # (our rotary tables are float32: 1e-6)
        torch.testing.assert_close(h, _original_llama_float64(model, ids, mask, pos), rtol=0, atol=1e-6)


def test_eval_forward_hides_padding_keys_and_training_does_not():
    """The original's forward passes the attention_mask to its LLaMA: in eval mode real tokens of a left-padded row
    do not see the pads (the text loss is that of text_logits); in training its flash-attn path is causal over the
    whole row (the text loss is that of the logits without a mask)."""
    model = tiny_model()
    batch = make_batch(model.cfg, [[BOS, 10, "img", 11, 12, EOS], [BOS, 13, 14, "img", 15, 16, 17, 18, EOS]], 30,
                       left_pad=True)
    batch["loss_img_weight"] = 0.0
    labels = mmi.text_labels(batch["text_ids"], batch["attention_mask"], model.cfg)
    V = model.cfg.llm.vocab_size
    with torch.no_grad():
        unmasked = {k: v for k, v in batch.items() if k != "attention_mask"}
        for train_mode, logits in ((False, model.text_logits(batch)), (True, model.text_logits(unmasked))):
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, V), labels.reshape(-1), ignore_index=-100)
            torch.testing.assert_close(model.train(train_mode)(batch)["loss_txt"], loss, rtol=0, atol=1e-5)
    assert not torch.allclose(model.text_logits(batch)[0, -5:], logits[0, -5:], atol=1e-3)


# ----------------------------------------------------------------------------------------------------------------
# Image decoder: SD-2 UNet and VAE against diffusers, keys and shapes against the original manifest
# ----------------------------------------------------------------------------------------------------------------


def _manifest(name, prefix=""):
    """{key: shape} from a reference manifest; with `prefix`, only its keys under it, prefix stripped."""
    import json
    path = os.path.join(REFERENCE, name)
    if not os.path.exists(path):
        pytest.skip(f"reference manifest {path} not present")
    with open(path) as f:
        d = json.load(f)
    return {k[len(prefix):]: v for k, v in d.items() if k.startswith(prefix)}


SMALL_UNET = mmi.UNetConfig(sample_size=16, block_out_channels=(32, 64, 64), cross_attn_blocks=(True, True, False),
                          num_attention_heads=(2, 4, 4), layers_per_block=2, cross_attention_dim=24,
                          norm_num_groups=8)
SMALL_VAE = mmi.VAEConfig(block_out_channels=(16, 32, 32), layers_per_block=2, norm_num_groups=8)


def _diffusers_unet(cfg: mmi.UNetConfig):
    diffusers = pytest.importorskip("diffusers")
    down = tuple("CrossAttnDownBlock2D" if c else "DownBlock2D" for c in cfg.cross_attn_blocks)
    up = tuple("CrossAttnUpBlock2D" if c else "UpBlock2D" for c in cfg.cross_attn_blocks[::-1])
    return diffusers.UNet2DConditionModel(
        sample_size=cfg.sample_size, in_channels=cfg.in_channels, out_channels=cfg.out_channels,
        down_block_types=down, up_block_types=up, block_out_channels=cfg.block_out_channels,
        layers_per_block=cfg.layers_per_block, cross_attention_dim=cfg.cross_attention_dim,
        attention_head_dim=cfg.num_attention_heads, use_linear_projection=True, norm_num_groups=cfg.norm_num_groups,
        norm_eps=cfg.norm_eps, flip_sin_to_cos=cfg.flip_sin_to_cos, freq_shift=cfg.freq_shift)


def _diffusers_vae(cfg: mmi.VAEConfig):
    diffusers = pytest.importorskip("diffusers")
    n = len(cfg.block_out_channels)
    return diffusers.AutoencoderKL(
        in_channels=cfg.in_channels, out_channels=cfg.out_channels, latent_channels=cfg.latent_channels,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=cfg.block_out_channels, layers_per_block=cfg.layers_per_block,
        norm_num_groups=cfg.norm_num_groups, scaling_factor=cfg.scaling_factor)


def _randomise(module, seed):
    """Perturb every parameter so zero-initialised layers (diffusers zero-inits nothing here, but norms are 1/0)
    take part in the comparison."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def _save_and_load(oracle, ours, tmp_path):
    oracle.save_pretrained(tmp_path, safe_serialization=True)
    sd = load_file(os.path.join(tmp_path, "diffusion_pytorch_model.safetensors"))
    assert set(sd) == set(ours.state_dict()), (set(sd) ^ set(ours.state_dict()))
    ours.load_state_dict(sd, strict=True)


def test_unet_keys_and_shapes_match_sd2_base_manifest():
    # MM-Interleaved holds SD-2-base's UNet by identity under this prefix (the same 686 keys as unet/*.safetensors)
    manifest = _manifest("mm_interleaved_13b.json", "image_decoder.decoder.unet.")
    with torch.device("meta"):
        unet = mmi.UNet2DConditionModel(mmi.UNetConfig())
    ours = {k: list(v.shape) for k, v in unet.state_dict().items()}
    assert ours == manifest


def test_vae_keys_and_shapes_match_sd2_base_manifest():
    manifest = _manifest("mm_interleaved_13b.json", "image_decoder.decoder.vae.")
    with torch.device("meta"):
        vae = mmi.AutoencoderKL(mmi.VAEConfig())
    assert {k: list(v.shape) for k, v in vae.state_dict().items()} == manifest


def test_legacy_vae_attention_names_are_renamed_to_ours():
    # sd2_base_vae.json: the key names of SD-2's released vae/diffusion_pytorch_model.* files
    legacy, ours = _manifest("sd2_base_vae.json"), _manifest("mm_interleaved_13b.json", "image_decoder.decoder.vae.")
    assert {mmi.legacy_vae_key(k): v for k, v in legacy.items()} == ours


def test_configs_read_from_diffusers_config_dicts(tmp_path):
    oracle_u, oracle_v = _diffusers_unet(SMALL_UNET), _diffusers_vae(SMALL_VAE)
    assert mmi.unet_config_from_diffusers(dict(oracle_u.config)) == SMALL_UNET
    assert mmi.vae_config_from_diffusers(dict(oracle_v.config)) == SMALL_VAE


def test_unet_matches_diffusers_oracle(tmp_path):
    torch.manual_seed(0)
    oracle = _diffusers_unet(SMALL_UNET).eval()
    _randomise(oracle, 1)
    ours = mmi.UNet2DConditionModel(SMALL_UNET).eval()
    _save_and_load(oracle, ours, tmp_path)
    x = torch.randn(2, 4, 16, 16)
    cond = torch.randn(2, 7, 24)
    t = torch.tensor([3, 917])
    with torch.no_grad():
        ref = oracle(x, t, cond).sample
        out = ours(x, t, cond)
    assert (out - ref).abs().max() < 1e-4


def test_vae_matches_diffusers_oracle(tmp_path):
    torch.manual_seed(0)
    oracle = _diffusers_vae(SMALL_VAE).eval()
    _randomise(oracle, 2)
    ours = mmi.AutoencoderKL(SMALL_VAE).eval()
    _save_and_load(oracle, ours, tmp_path)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        dist = oracle.encode(x).latent_dist
        mean, logvar = ours.encode(x)
        assert (mean - dist.mean).abs().max() < 1e-4
        assert (logvar - dist.logvar).abs().max() < 1e-4
        # latent_dist.sample() draws N(0,1) of the latent shape from the generator: same draw, same latent
        z_ref = dist.sample(generator=torch.Generator().manual_seed(5))
        z = mmi.AutoencoderKL.sample(mean, logvar, generator=torch.Generator().manual_seed(5))
        assert (z - z_ref).abs().max() < 1e-4
        assert (ours.decode(z) - oracle.decode(z).sample).abs().max() < 1e-4


def test_decode_latents_is_the_sd_pipelines_decode(tmp_path):
    """A sampler's latents become pixels as SD's pipeline makes them: the VAE decodes latents / scaling_factor,
    then [-1, 1] maps to [0, 1], clamped."""
    dec = _tiny_decoder()
    oracle = _diffusers_vae(dec.decoder.vae.cfg).eval()
    _randomise(oracle, 3)
    _save_and_load(oracle, dec.decoder.vae, tmp_path)
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = (oracle.decode(z / oracle.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
        assert 0 < (expected == 0).sum() + (expected == 1).sum() < expected.numel()     # the clamp takes part
        assert (dec.decoder.decode_latents(z) - expected).abs().max() < 1e-5
    manifest = _manifest("mm_interleaved_13b.json", "image_decoder.")
    with torch.device("meta"):
        dec = mmi.ImageDecoder(*DECODER_PRESETS["mmi-13b"])
    assert {k: list(v.shape) for k, v in dec.state_dict().items()} == manifest
    # README of reference/: image_decoder 1,074,365,547 parameters, 946,133,892 trainable (VAE, pos tables frozen)
    assert sum(p.numel() for p in dec.parameters()) == 1_074_365_547
    assert sum(p.numel() for p in dec.parameters() if p.requires_grad) == 946_133_892
    assert dec.decoder.alphas_cumprod.device.type == "cpu"  # the schedule is real even when built on meta


# ----------------------------------------------------------------------------------------------------------------
# Image decoder: the noise schedule and samplers against diffusers' schedulers (SD-2 scheduler config)
# ----------------------------------------------------------------------------------------------------------------


SD_SCHED = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
            "beta_schedule": "scaled_linear", "prediction_type": "epsilon", "steps_offset": 1}


def test_scaled_linear_schedule_and_add_noise_match_diffusers():
    diffusers = pytest.importorskip("diffusers")
    s = diffusers.DDPMScheduler(**SD_SCHED, clip_sample=False)
    ac = mmi.alphas_cumprod_of(mmi.scaled_linear_betas())
    assert torch.equal(mmi.scaled_linear_betas(), s.betas)
    assert torch.equal(ac, s.alphas_cumprod)
    x0, eps, t = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2), torch.tensor([0, 500, 999])
    assert torch.allclose(mmi.add_noise(x0, eps, t, ac), s.add_noise(x0, eps, t), atol=1e-6)


def _fake_eps(x, t):
    """A deterministic stand-in for the UNet so whole trajectories can be compared."""
    return torch.tanh(x * 0.7 + t / 1000.0)


@pytest.mark.parametrize("steps", [30, 7])
def test_ddpm_sampler_matches_diffusers_ddpm_leading(steps):
    diffusers = pytest.importorskip("diffusers")
    s = diffusers.DDPMScheduler(**SD_SCHED, clip_sample=False, timestep_spacing="leading")
    s.set_timesteps(steps)
    ts = mmi.leading_timesteps(steps, 1000, 1)
    assert torch.equal(ts, s.timesteps)
    if steps == 30:
        assert ts[:3].tolist() == [958, 925, 892] and ts[-2:].tolist() == [34, 1]
    ac = mmi.alphas_cumprod_of(mmi.scaled_linear_betas())
    x_ref = x = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    g_ref, g = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    for i, t in enumerate(ts.tolist()):
        x_ref = s.step(_fake_eps(x_ref, t), t, x_ref, generator=g_ref).prev_sample
        prev_t = ts[i + 1].item() if i + 1 < steps else -1
        noise = torch.randn(x.shape, generator=g) if t > 0 else None
        x = mmi.ddpm_step(_fake_eps(x, t), t, prev_t, x, ac, noise)
    assert (x - x_ref).abs().max() < 1e-5


@pytest.mark.parametrize("eta", [0.0, 0.6])
def test_ddim_sampler_matches_diffusers_ddim(eta):
    diffusers = pytest.importorskip("diffusers")
    s = diffusers.DDIMScheduler(**SD_SCHED, clip_sample=False, set_alpha_to_one=False)
    steps = 10
    s.set_timesteps(steps)
    ts = mmi.leading_timesteps(steps, 1000, 1)
    assert torch.equal(ts, s.timesteps)
    ac = mmi.alphas_cumprod_of(mmi.scaled_linear_betas())
    x_ref = x = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(1))
    g_ref, g = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    for t in ts.tolist():
        x_ref = s.step(_fake_eps(x_ref, t), t, x_ref, eta=eta, generator=g_ref).prev_sample
        noise = torch.randn(x.shape, generator=g) if eta > 0 else None
        x = mmi.ddim_step(_fake_eps(x, t), t, t - 1000 // steps, x, ac, ac[0], eta, noise)
    assert (x - x_ref).abs().max() < 1e-5


def test_v_prediction_target_and_ddim_steps_match_diffusers():
    diffusers = pytest.importorskip("diffusers")
    s = diffusers.DDIMScheduler(**{**SD_SCHED, "prediction_type": "v_prediction"}, clip_sample=False,
                                set_alpha_to_one=False)
    ac = mmi.alphas_cumprod_of(mmi.scaled_linear_betas())
    x0, eps, t = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2), torch.tensor([0, 500, 999])
    assert torch.allclose(mmi.v_target(x0, eps, t, ac), s.get_velocity(x0, eps, t), atol=1e-6)
    steps = 10
    s.set_timesteps(steps)
    x_ref = x = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(1))
    for t in mmi.leading_timesteps(steps, 1000, 1).tolist():       # _fake_eps read as the model's v
        x_ref = s.step(_fake_eps(x_ref, t), t, x_ref, eta=0.0).prev_sample
        x = mmi.ddim_step(mmi.eps_from_v(_fake_eps(x, t), x, t, ac), t, t - 1000 // steps, x, ac, ac[0], 0.0, None)
    assert (x - x_ref).abs().max() < 1e-5


def test_min_snr_weights_by_hand():
    ac = mmi.alphas_cumprod_of(mmi.scaled_linear_betas()).double()
    t = torch.tensor([0, 300, 999])
    got_eps = mmi.min_snr_weights(t, ac, 5.0, "epsilon")
    got_v = mmi.min_snr_weights(t, ac, 5.0, "v_prediction")
    for i, step in enumerate(t.tolist()):
        snr = float(ac[step] / (1 - ac[step]))
        assert math.isclose(got_eps[i], min(snr, 5.0) / snr, rel_tol=1e-12)
        assert math.isclose(got_v[i], min(snr, 5.0) / (snr + 1), rel_tol=1e-12)
    assert got_eps[0] < 0.01 and got_eps[2] == 1.0          # nearly clean steps weigh little, noisy ones fully


def test_diffusion_loss_follows_prediction_type_and_snr_gamma():
    """Same draws (seeded global RNG), three configs: the eps loss; the v loss against v_target of the same latents,
    noise and timesteps; the eps loss times the min-SNR weights of those timesteps."""
    cfg = mmi.MMIConfig.from_preset("tiny")
    torch.manual_seed(0)
    sd = mmi.StableDiffusion(cfg.unet, cfg.vae, cfg.image_decoder).eval()
    images = torch.rand(3, 3, 64, 64)
    cond = torch.randn(3, cfg.image_decoder.resampler.num_queries, cfg.unet.cross_attention_dim)
    feats = [torch.randn(3, 1, 64, s, s) for s in (32, 16, 8, 4)]
    mask = torch.ones(3, 1, dtype=torch.long)

    def loss_and_draws(**changes):
        sd.cfg = dataclasses.replace(cfg.image_decoder, **changes)
        torch.manual_seed(1)
        loss = sd(images, cond, feats, mask)
        torch.manual_seed(1)                        # the same draws again, as forward makes them
        latents = sd.sample_posterior(sd.encode_posterior(images))
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (3,))
        return loss, latents, noise, t

    eps_loss, latents, noise, t = loss_and_draws()
    x_t = mmi.add_noise(latents, noise, t, sd.alphas_cumprod)
    pred = sd.unet(x_t, t, cond, sd.mmfs_module, feats, mask)
    assert torch.allclose(eps_loss, (pred - noise) ** 2, atol=1e-6)
    v_loss, *_ = loss_and_draws(prediction_type="v_prediction")
    assert torch.allclose(v_loss, (pred - mmi.v_target(latents, noise, t, sd.alphas_cumprod)) ** 2, atol=1e-6)
    weighted, *_ = loss_and_draws(snr_gamma=5.0)
    w = mmi.min_snr_weights(t, sd.alphas_cumprod, 5.0, "epsilon")
    assert torch.allclose(weighted, eps_loss * w[:, None, None, None], atol=1e-7)


@pytest.mark.parametrize("steps", [20, 5])
def test_dpm_solver_pp_2m_matches_diffusers(steps):
    diffusers = pytest.importorskip("diffusers")
    s = diffusers.DPMSolverMultistepScheduler(**SD_SCHED, algorithm_type="dpmsolver++", solver_order=2)
    s.set_timesteps(steps)
    ac = mmi.alphas_cumprod_of(mmi.scaled_linear_betas())
    ts = mmi.linspace_timesteps(steps, 1000)
    assert torch.equal(ts, s.timesteps)
    sigmas = mmi.dpm_solver_sigmas(ts, ac)
    assert torch.allclose(sigmas, s.sigmas, rtol=1e-6)
    x_ref = x = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(2)) * sigmas[0]
    x0_prev = None
    for i, t in enumerate(ts.tolist()):
        x_ref = s.step(_fake_eps(x_ref, t), t, x_ref).prev_sample
        x0 = mmi.dpm_solver_x0(x, _fake_eps(x, t), sigmas[i])
        x = mmi.dpm_solver_pp_2m_step(x, x0, x0_prev, sigmas[i - 1] if i else None, sigmas[i], sigmas[i + 1])
        x0_prev = x0
    assert (x - x_ref).abs().max() < 1e-5


def test_bad_step_counts_raise():
    with pytest.raises(ValueError, match="steps=0"):
        mmi.leading_timesteps(0)
    with pytest.raises(ValueError, match="steps=1001"):
        mmi.linspace_timesteps(1001)


@pytest.mark.parametrize("sampler,eta", [("ddpm", 0.0), ("ddim", 0.0), ("ddim", 1.0), ("dpm++2m", 0.0)])
def test_sampling_loop_steps_like_diffusers(sampler, eta):
    """sample_latents' own loop walks diffusers' scheduler step for step: its timesteps, each step's previous
    timestep, CFG on [uncond; cond], initial latents then one noise draw per step from the same generator (DDPM, and
    DDIM with eta > 0), DPM-Solver's x0 history. DDPM with leading timesteps is the loop the original ran through
    diffusers' pipeline; DDIM as SD configures it (set_alpha_to_one=False); DPM-Solver++ of order 2."""
    diffusers = pytest.importorskip("diffusers")
    dec = _tiny_decoder().eval()
    _perturb_mmfs_convs(dec)
    ctx, mask, _, feats, fmask = _tiny_inputs(dec, B=2)
    # deterministic loops in float64, so that only diffusers' float32 schedule constants differ, not the two loops'
    # float32 rounding; the noisy ones in float32, where both draw the same noise
    dtype = torch.float32 if sampler == "ddpm" or eta > 0 else torch.float64
    dec, ctx, feats = dec.to(dtype), ctx.to(dtype), [f.to(dtype) for f in feats]
    sd = dec.decoder
    with torch.no_grad():
        cond = dec.perceiver_resampler(ctx, mask)
        uncond = dec.neg_prompt_embeds.expand_as(cond)
        ours = sd.sample_latents(cond, uncond, feats, fmask, 6, 4.0, sampler, torch.Generator().manual_seed(11),
                                 eta=eta, progress=False, fast=False)
        g = torch.Generator().manual_seed(11)
        if sampler == "ddpm":
            s = diffusers.DDPMScheduler(**SD_SCHED, clip_sample=False, timestep_spacing="leading")
        elif sampler == "ddim":
            s = diffusers.DDIMScheduler(**SD_SCHED, clip_sample=False, set_alpha_to_one=False)
        else:
            s = diffusers.DPMSolverMultistepScheduler(**SD_SCHED, algorithm_type="dpmsolver++", solver_order=2)
        kw = {"ddpm": dict(generator=g), "ddim": dict(eta=eta, generator=g), "dpm++2m": {}}[sampler]
        s.set_timesteps(6)
        x = (torch.randn(2, 4, 8, 8, generator=g) * s.init_noise_sigma).to(dtype)
        for t in s.timesteps:
            eps_u, eps_c = sd.unet(torch.cat([x, x]), t, torch.cat([uncond, cond]), sd.mmfs_module,
                                   [torch.cat([f, f]) for f in feats], torch.cat([fmask, fmask])).chunk(2)
            x = s.step(eps_u + 4.0 * (eps_c - eps_u), t, x, **kw).prev_sample
    assert (ours - x).abs().max() < 1e-5


# ----------------------------------------------------------------------------------------------------------------
# Image decoder: UNet-MMFS, the context and previous-image rules, the diffusion loss
# ----------------------------------------------------------------------------------------------------------------


def test_mmfs_net_is_identity_until_its_convs_move():
    dec = _tiny_decoder().eval()
    _, _, _, feats, fmask = _tiny_inputs(dec)
    unet, mmfs = dec.decoder.unet, dec.decoder.mmfs_module
    x, cond, t = torch.randn(3, 4, 8, 8), torch.randn(3, 8, 32), torch.tensor([10, 500, 990])
    with torch.no_grad():
        plain = unet(x, t, cond)
        assert torch.equal(unet(x, t, cond, mmfs, feats, fmask), plain)  # zero convs: exactly nothing added
        _perturb_mmfs_convs(dec)
        live = unet(x, t, cond, mmfs, feats, fmask)
        assert (live - plain).abs().amax(dim=(1, 2, 3)).min() > 1e-3
        # the previous image matters only where it is present (mask 1): images 1 and 2, not image 0
        feats2 = [f + torch.randn_like(f) for f in feats]  # (feat_norm makes plain rescaling invisible)
        other = unet(x, t, cond, mmfs, feats2, fmask)
        diff = (other - live).abs().amax(dim=(1, 2, 3))
        assert diff[0] == 0 and diff[1] > 1e-4 and diff[2] > 1e-4


def test_mmfs_block_residual_shapes_follow_the_sd2_skip_layout():
    u, _, _ = DECODER_PRESETS["mmi-13b"]
    layout = mmi.unet_skip_layout(u)
    assert layout == [(320, 64)] * 3 + [(320, 32), (640, 32), (640, 32), (640, 16), (1280, 16), (1280, 16),
                                         (1280, 8), (1280, 8), (1280, 8)]


@pytest.mark.parametrize("image_size", [512, 256])
def test_mmfs_grids_and_offset_scales_equal_the_originals_rules(image_size):
    """At the 13B shapes (SD-2's skips, the 224-px tokenizer's maps 64/32/16/8), and with the decoder at 256 px,
    our rules give the original's: each UNet-MMFS block's base grid is sd_spatial_shapes[block // 3] (the mid block
    [-1]) with sd_spatial_shapes = [64, 32, 16, 8] // (512 // image_size), offsets scale by [64, 32, 16, 8] / base,
    the position table has side 64 // (512 // image_size); the LLM's MMFS scales by [32, 16, 8] / 16."""
    cfg = mmi.MMIConfig.from_preset("mmi-13b", **{"image_decoder.image_size": image_size,
                                                  "unet.sample_size": image_size // 8})
    with torch.device("meta"):
        net, llm_mmfs = mmi.MMFSNet(cfg.unet, cfg.image_decoder), mmi.LlamaMMFSAttention(cfg)
    factor = 512 // image_size
    sd_spatial_shapes = [s // factor for s in (64, 32, 16, 8)]
    blocks = list(net.mmfs_down_blocks) + [net.mmfs_mid_block]
    bases = [sd_spatial_shapes[i // 3] for i in range(len(net.mmfs_down_blocks))] + [sd_spatial_shapes[-1]]
    assert len(blocks) == 13
    assert [side for _, side in mmi.unet_skip_layout(cfg.unet)] == bases[:-1]       # our base: the skip's own side
    for block, base in zip(blocks, bases):
        assert block.mmfs.scale_ratios == tuple(s / base for s in (64, 32, 16, 8))
        assert block.mmfs.spatial_shapes == (64, 32, 16, 8)                     # the maps the offsets normalise by
        assert block.pos_embed.shape[0] == (64 // factor) ** 2
    assert llm_mmfs.attn.scale_ratios == tuple(s / 16 for s in (32, 16, 8))


def test_unet_mmfs_block_is_a_conv_of_mmfs_from_the_normed_latent_plus_its_table():
    """A UNet-MMFS block: conv(MMFS(LN_q(pixel) + 2-D sin-cos table, pixel centres, LN_f(the previous image's
    maps), mask)), against the float64 MMFS loop above (a mask of 0 leaves only the ignore slot)."""
    torch.manual_seed(0)
    cfg = dataclasses.replace(DECODER_PRESETS["tiny"][2], mmfs_feat_dim=6, mmfs_attn_dim=4, mmfs_value_sizes=(4, 2))
    C, side = 8, 4
    block = mmi.MMFSBlock(C, cfg, grid_size=side, base_spatial_shape=side).double()
    with torch.no_grad():
        for name, p in block.named_parameters():
            if name != "pos_embed":                    # the zero conv and the ignore token included
                p.add_(torch.randn_like(p) * 0.3)
    sample = torch.randn(2, C, side, side, dtype=torch.float64)
    feats = torch.randn(2, 1, 16 + 4, 6, dtype=torch.float64)
    mask = torch.tensor([[1], [0]])
    ln = lambda norm, t: F.layer_norm(t, t.shape[-1:], norm.weight, norm.bias, norm.eps)
    q = ln(block.query_norm, sample.flatten(2).transpose(1, 2)) + mmi.get_2d_sincos_pos_embed(C, side).double()
    with torch.no_grad():
        y = mmfs_loop(block.mmfs, q, mmi.grid_centres(side, side)[None].double(), ln(block.feat_norm, feats), mask)
        want = block.conv(y.transpose(1, 2).reshape(2, C, side, side))
        torch.testing.assert_close(block(sample, feats, mask), want, rtol=1e-9, atol=1e-9)


def test_unet_mmfs_reference_points_are_the_pixel_centres():
    """A UNet-MMFS query at latent pixel (i, j) of an h x w map starts from ((j + 0.5) / w, (i + 0.5) / h), as x, y,
    row-major: the centres in the sampler's convention, so zero offsets read each pixel's own value."""
    assert mmi.grid_centres(2, 4).tolist() == [[0.125, 0.25], [0.375, 0.25], [0.625, 0.25], [0.875, 0.25],
                                               [0.125, 0.75], [0.375, 0.75], [0.625, 0.75], [0.875, 0.75]]


def test_mmfs_level_tables_compile_to_one_graph_for_any_image_count():
    """The tables by hand (levels 8 and 4 on a base of 8), and under torch.compile: no tensor constant in the
    graph (torch 2.11's compile cache cannot store one) and no new graph per image count n."""
    from torch._functorch.aot_autograd import aot_module_simplified
    mmfs = mmi.MMFS(8, 8, 8, 8, 2, 2, (8, 4), 8, 4, 1.0)
    scale, shapes, starts = mmfs.level_tables(2, torch.float32, "cpu")
    assert scale.flatten().tolist() == [1.0, 0.5] and scale.shape == (1, 1, 1, 1, 2, 1, 1)
    assert shapes.tolist() == [[8, 8], [4, 4], [8, 8], [4, 4]] and starts.tolist() == [0, 64, 80, 144]
    graphs = []

    def backend(gm, example_inputs):
        def forward_graph(fx, inputs):
            graphs.append([n.target for n in fx.graph.nodes if n.op == "get_attr"])
            return fx
        return aot_module_simplified(gm, example_inputs, fw_compiler=forward_graph)

    def tables(v):
        scale, shapes, starts = mmfs.level_tables(v.shape[1], v.dtype, v.device)
        return v.sum() * scale.sum() + shapes.sum() + starts.sum()

    compiled = torch.compile(tables, backend=backend)
    for n in range(2, 7):
        v = torch.randn(1, n, 3)
        assert torch.equal(compiled(v), tables(v))
    assert len(graphs) == 2 and graphs == [[], []]          # n = 2 static, then one graph with n symbolic


def test_decoder_loss_masks_count_in_the_denominator():
    dec = _tiny_decoder(uncond_prob=0.0)
    ctx, mask, images, feats, fmask = _tiny_inputs(dec)
    torch.manual_seed(3)
    loss = dec(ctx, mask, images, feats, fmask, image_loss_mask=torch.tensor([1, 0, 1]))
    loss.backward()
    assert torch.isfinite(loss)
    assert dec.perceiver_resampler.queries.grad.abs().sum() > 0 and dec.decoder.unet.conv_in.weight.grad is not None
    assert all(p.grad is None for p in dec.decoder.vae.parameters())  # VAE frozen
    # same RNG draws by hand: per-element loss, image 0 (no context) and image 1 (masked) zeroed, mean over all
    torch.manual_seed(3)
    with torch.no_grad():
        per = dec.decoder(images, dec.perceiver_resampler(ctx, mask), feats, fmask)
    keep = torch.tensor([0.0, 0.0, 1.0])[:, None, None, None]
    assert torch.allclose(loss.detach(), (per * keep).sum() / per.numel(), rtol=1e-5)
    assert per.shape == (3, 4, 8, 8)


def test_cfg_dropout_replaces_the_whole_condition():
    dec = _tiny_decoder(uncond_prob=1.0)
    ctx, mask, images, feats, fmask = _tiny_inputs(dec)
    ctx2 = ctx + torch.randn_like(ctx)  # with every condition dropped the context cannot matter
    torch.manual_seed(4)
    a = dec(ctx, mask, images, feats, fmask)
    torch.manual_seed(4)
    b = dec(ctx2, mask, images, feats, fmask)
    assert torch.equal(a, b)


def test_tiny_decoder_overfits_one_batch():
    dec = _tiny_decoder(uncond_prob=0.0)
    ctx, mask, images, feats, fmask = _tiny_inputs(dec, B=2)
    mask[0] = 1
    opt = torch.optim.Adam([p for p in dec.parameters() if p.requires_grad], lr=2e-3)
    losses = []
    for _ in range(15):
        torch.manual_seed(0)  # one fixed batch: same latents, noise and timesteps every step
        loss = dec(ctx, mask, images, feats, fmask)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], losses[::10]


def test_context_and_previous_image_rule_by_hand():
    soi, L = 9, 12
    text_ids = torch.tensor([[1, 5, 9, 7, 7, 5, 9, 7, 1, 9, 7, 0],
                             [1, 9, 7, 5, 5, 5, 5, 5, 5, 5, 5, 5]])
    h = torch.arange(2 * L, dtype=torch.float32).reshape(2, L, 1) * torch.tensor([1.0, -1.0])  # value = 12 r + pos
    # images (row, soi): (0,2) (0,6) (0,9) (1,1); training context starts = last bos before each soi
    starts = torch.tensor([0, 0, 8, 0])
    ctx, cmask = mmi.prepare_context_features(h, text_ids, soi, starts)
    expected_src = [[2, 1, 0], [6, 5, 4, 3, 2, 1, 0], [9, 8], [13, 12]]  # flat 12 r + pos, soi first
    assert ctx.shape == (4, 7, 2) and cmask.tolist() == [[1] * len(s) + [0] * (7 - len(s)) for s in expected_src]
    for i, src in enumerate(expected_src):
        assert ctx[i, :len(src), 0].tolist() == src and ctx[i, :len(src), 1].tolist() == [-s for s in src]
        assert ctx[i, len(src):].abs().sum() == 0
    assert mmi.is_cond_image_of(cmask).tolist() == [True, True, False, False]

    ms = [torch.arange(4, dtype=torch.float32).view(4, 1, 1, 1).expand(4, 3, s, s) + 1 for s in (4, 2)]
    feats, fmask = mmi.prepare_mmfs_features_for_image_decoder(ms, text_ids, soi, starts)
    # image 1 sees image 0; image 2's context starts at its bos (8) after image 1's soi (6); image 3 is in row 1
    assert fmask.tolist() == [[0], [1], [0], [0]]
    assert [f.shape for f in feats] == [(4, 1, 3, 4, 4), (4, 1, 3, 2, 2)]
    assert [float(feats[0][i].unique()[0]) for i in range(4)] == [0.0, 1.0, 0.0, 0.0]
    # generation: context from the row start, so image 2 now sees image 1 (value 2)
    feats, fmask = mmi.prepare_mmfs_features_for_image_decoder(ms, text_ids, soi, None)
    assert fmask.tolist() == [[0], [1], [1], [0]]
    assert [float(feats[1][i].unique()[0]) for i in range(4)] == [0.0, 1.0, 2.0, 0.0]
    ctx_g, _ = mmi.prepare_context_features(h, text_ids, soi, None)
    assert ctx_g[2, :10, 0].tolist() == list(range(9, -1, -1))


def test_previous_image_whose_soi_is_the_context_start_is_seen():
    """An image sees the previous one when that image's soi lies at or after its context start, the start itself
    included: a row that opens with an image, or a training context start placed on that soi (the original compares
    nearest_bos <= soi)."""
    soi = 9
    text_ids = torch.tensor([[9, 7, 5, 9, 7, 5],
                             [1, 5, 9, 7, 9, 7]])
    ms = [torch.arange(4, dtype=torch.float32).view(4, 1, 1, 1).expand(4, 2, s, s) + 1 for s in (2, 1)]
    # images (row, soi): (0,0) (0,3) (1,2) (1,4)
    _, fmask = mmi.prepare_mmfs_features_for_image_decoder(ms, text_ids, soi, None)
    assert fmask.tolist() == [[0], [1], [0], [1]]                   # image 1: soi 0 >= row start 0
    feats, fmask = mmi.prepare_mmfs_features_for_image_decoder(ms, text_ids, soi, torch.tensor([0, 0, 0, 2]))
    assert fmask.tolist() == [[0], [1], [0], [1]]                   # image 3: soi 2 >= its start 2
    assert [float(feats[1][i].unique()[0]) for i in range(4)] == [0.0, 1.0, 0.0, 3.0]
    _, fmask = mmi.prepare_mmfs_features_for_image_decoder(ms, text_ids, soi, torch.tensor([0, 1, 0, 3]))
    assert fmask.tolist() == [[0], [0], [0], [0]]                   # starts one past those soi: unseen


def test_decoder_inputs_project_then_add_distance_positions():
    soi = 9
    text_ids = torch.tensor([[1, 5, 9, 7, 1, 9, 7]])
    h = torch.randn(1, 7, 8)
    proj = torch.nn.Linear(8, 8)
    ms = [torch.randn(2, 8, s, s) for s in (4, 2, 2, 1)]
    ctx, mask, _, fmask = mmi.image_decoder_inputs(h, text_ids, ms, soi, proj, torch.tensor([0, 4]))
    assert mask.tolist() == [[1, 1, 1], [1, 1, 0]] and fmask.tolist() == [[0], [0]]
    # PE row p: sin(p w_d) for d < 4, cos(p w_d) after, w_d = 10000^(-d/4): position = distance to the soi
    w = 10000.0 ** (-torch.arange(4, dtype=torch.float64) / 4)
    pe = torch.cat([torch.sin(torch.arange(3.0, dtype=torch.float64)[:, None] * w),
                    torch.cos(torch.arange(3.0, dtype=torch.float64)[:, None] * w)], dim=1).float()
    with torch.no_grad():
        assert torch.allclose(ctx[0], proj(h[0, [2, 1, 0]]) + pe, atol=1e-6)
        assert torch.allclose(ctx[1, :2], proj(h[0, [5, 4]]) + pe[:2], atol=1e-6)
        assert torch.allclose(ctx[1, 2], proj.bias + pe[2], atol=1e-6)  # padding: proj(0) + PE, masked later


def test_bad_inputs_raise_value_errors_with_the_numbers():
    dec = _tiny_decoder()
    ctx, mask, images, feats, fmask = _tiny_inputs(dec)
    with pytest.raises(ValueError, match=r"\(3, 3, 32, 32\), expected \(B_I, 3, 64, 64\)"):
        dec(ctx, mask, images[:, :, :32, :32], feats, fmask)
    with pytest.raises(ValueError, match=r"target_image_idxs \[3\] out of range: the batch has 3 images"):
        mmi.select_target_images([0, 3], ctx, mask, feats, fmask)
    sel = mmi.select_target_images([2], ctx, mask, feats, fmask)
    assert torch.equal(sel[0], ctx[2:3]) and torch.equal(sel[3], fmask[2:3])
    with pytest.raises(ValueError, match="sampler='euler'"):
        dec.eval().generate_images(ctx, mask, feats, fmask, steps=2, sampler="euler", progress=False)


def test_decoder_checkpointing_keeps_the_loss_and_gradients():
    dec = _tiny_decoder(uncond_prob=0.0)
    _perturb_mmfs_convs(dec)
    ctx, mask, images, feats, fmask = _tiny_inputs(dec)
    grads = []
    for ckpt in (False, True):
        dec.zero_grad()
        torch.manual_seed(0)
        loss = dec(ctx, mask, images, feats, fmask, checkpoint=ckpt)
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in dec.parameters() if p.grad is not None]))
    assert torch.equal(grads[0][0], grads[1][0]) and len(grads[0][1]) == len(grads[1][1])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads[0][1], grads[1][1]))


def test_pil_helpers_round_trip_to_within_one_level():
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    pils = mmi.images_to_pil(x)
    assert [p.size for p in pils] == [(16, 16)] * 2 and pils[0].mode == "RGB"
    assert (mmi.pil_to_images(pils, 16) - x).abs().max() <= 0.5 / 255 + 1e-6


# ----------------------------------------------------------------------------------------------------------------
# The model: masks and labels on a hand-built batch: 2 rows, 3 images, 2 documents in row 0
# ----------------------------------------------------------------------------------------------------------------


#           0    1   2    3    4    5   6    7    8    9   10   11   12  13
ROW0 = [BOS, 10, SOI, IMG, IMG, 11, SOI, IMG, IMG, 12, EOS, BOS, 13, 14]
ROW1 = [BOS, SOI, IMG, IMG, 15, 16, EOS, PAD, PAD, PAD, PAD, PAD, PAD, PAD]
HAND_IDS = torch.tensor([ROW0, ROW1])
HAND_MASK = torch.tensor([[1] * 14, [1] * 7 + [0] * 7])
HAND_NUM = torch.tensor([2, 1])


def test_cross_attention_mask_by_hand():
    xmask = mmi.cross_attention_mask(HAND_IDS, HAND_NUM, SOI, BOS)
    row0 = [[0, 0]] * 3 + [[1, 0]] * 4 + [[1, 1]] * 4 + [[0, 0]] * 3      # image 2 opens at 7; bos at 11 resets
    row1 = [[0, 0]] * 2 + [[1, 0]] * 12                                     # one image, starts at 2; slot 2 padding
    assert torch.equal(xmask, torch.tensor([row0, row1], dtype=torch.float))
    assert mmi.image_token_starts(HAND_IDS, HAND_NUM, SOI).tolist() == [[3, 7], [2, -1]]
    assert mmi.nearest_bos(HAND_IDS, BOS).tolist() == [[0] * 11 + [11] * 3, [0] * 14]


def test_pack_per_row_puts_each_image_in_its_rows_next_slot():
    # images come row-major: row 0 has image 1, row 1 none, row 2 images 2, 3, 4; empty slots are zeros
    per_image = torch.tensor([[1.0], [2.0], [3.0], [4.0]])
    out = mmi.pack_per_row(per_image, torch.tensor([1, 0, 3]))
    assert out.tolist() == [[[1.0], [0.0], [0.0]], [[0.0], [0.0], [0.0]], [[2.0], [3.0], [4.0]]]


def test_mmfs_relative_image_index_by_hand():
    # the relative index is the query_relpos row each image is read with: latest visible image 1, older 2, unseen 0
    # (test_mmfs_equals_float64_loop checks that MMFS reads those rows)
    xmask = mmi.cross_attention_mask(HAND_IDS, HAND_NUM, SOI, BOS)
    rel = mmi.relative_image_index(xmask.long())                            # (B, Lq, n)
    row0 = [[0, 0]] * 3 + [[1, 0]] * 4 + [[2, 1]] * 4 + [[0, 0]] * 3
    row1 = [[0, 0]] * 2 + [[1, 0]] * 12
    assert rel.tolist() == [row0, row1]


def test_text_labels_by_hand():
    cfg = mmi.MMIConfig.from_preset("tiny")
    X = -100
    labels = mmi.text_labels(HAND_IDS, HAND_MASK, cfg)
    # targets are ids[1:]; image tokens, pad/padding, bos and the soi right after a bos are not learned
    assert labels.tolist() == [[10, SOI, X, X, 11, SOI, X, X, 12, EOS, X, 13, 14],
                               [X, X, X, 15, 16, EOS, X, X, X, X, X, X, X]]
    # no-image-condition rule: text with no image before it in its document is not learned
    labels = mmi.text_labels(HAND_IDS, HAND_MASK, cfg, ignore_noimage_cond=True)
    assert labels.tolist() == [[X, SOI, X, X, 11, SOI, X, X, 12, EOS, X, X, X],
                               [X, X, X, 15, 16, EOS, X, X, X, X, X, X, X]]
    # a prompt offset per row hides that row's prompt
    labels = mmi.text_labels(HAND_IDS, HAND_MASK, cfg, ignore_prompt_token_offset=torch.tensor([3, 0]))
    assert labels.tolist() == [[X, X, X, X, 11, SOI, X, X, 12, EOS, X, 13, 14],
                               [X, X, X, 15, 16, EOS, X, X, X, X, X, X, X]]
    # the pad id is ignored even where the mask says real (the original's rule)
    ids = HAND_IDS.clone()
    ids[0, 12] = PAD
    assert mmi.text_labels(ids, HAND_MASK, cfg)[0, 11] == X
    # and padding positions are ignored whatever their ids: row 1's padding filled with eos instead of pad
    ids = HAND_IDS.clone()
    ids[1, 7:] = EOS
    assert mmi.text_labels(ids, HAND_MASK, cfg)[1].tolist() == [X, X, X, 15, 16, EOS, X, X, X, X, X, X, X]


def test_forward_uses_the_dataset_rule_and_loss_weights():
    model = tiny_model()
    cfg = model.cfg
    batch = make_batch(cfg, [[BOS, 10, 11, "img", 12, EOS], [BOS, "img", 13, 14, EOS]], 24)
    out = model(batch)
    logits = model.text_logits(batch)
    labels = mmi.text_labels(batch["text_ids"], batch["attention_mask"], cfg)
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1))
    torch.testing.assert_close(out["loss_txt"], expected)
    model.cfg = mmi.apply_overrides(cfg, {"dataset_to_ignore_noimage_cond_loss": ("test",)})
    out2 = model(dict(batch, loss_txt_weight=0.5, loss_img_weight=0.0))
    labels2 = mmi.text_labels(batch["text_ids"], batch["attention_mask"], cfg, ignore_noimage_cond=True)
    expected2 = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels2.reshape(-1))
    torch.testing.assert_close(out2["loss_txt"], expected2)
    torch.testing.assert_close(out2["loss"], 0.5 * expected2)


def test_gt_text_ids_give_the_target_of_each_position_from_the_one_before():
    """gt_text_ids[b, p] is what logits[b, p - 1] learns; -100 elsewhere: the loss is the mean over the two targets."""
    model = tiny_model()
    batch = make_batch(model.cfg, [[BOS, 10, 11, "img", 12, EOS], [BOS, "img", 13, 14, EOS]], 24)
    gt = torch.full_like(batch["text_ids"], -100)
    gt[0, 5], gt[1, 3] = 42, 7
    out = model(dict(batch, gt_text_ids=gt, loss_img_weight=0.0))
    logits = model.text_logits(batch)
    expected = (F.cross_entropy(logits[0, 4], torch.tensor(42)) + F.cross_entropy(logits[1, 2], torch.tensor(7))) / 2
    torch.testing.assert_close(out["loss_txt"], expected)


# ----------------------------------------------------------------------------------------------------------------
# The model: zero-initialised branches, both losses, the training signal, bad batches
# ----------------------------------------------------------------------------------------------------------------


def test_mm_embeds_put_each_images_tokens_in_place_and_soi_token_on_soi():
    """The LLM's input, as the original assembles it: the token embeddings; the k-th image (row-major) gives the
    num_img_token embeddings of the k-th run of <|image|> tokens; soi_token is added on every soi and nowhere else.
    An image's embeddings: the Q-Former reads post_ln(pos_ln(pos_proj(h)) + table) of the CLIP-normalised pixels'
    last hidden states h, the 2-D sin-cos table with a zero row for the class token; each map gets that table
    without its class row, bicubically resized to the map's side."""
    model = tiny_model(perturb=False)
    cfg, vt = model.cfg, model.visual_tokenizer
    with torch.no_grad():
        model.soi_token.normal_()                      # zero at init: give it a value to find
    batch = make_batch(cfg, [[BOS, 10, "img", 11, "img"], [BOS, "img", 12]], 24)
    ids, images = batch["text_ids"], batch["image_tensors"]
    with torch.no_grad():
        embeds, _, _, maps = model.prepare_mm_embeds(ids, images, batch["num_image_per_seq"])
        mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
        std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
        h, raw_maps = vt.encoder["vision_model"]((images - mean) / std)
        G, d = cfg.vision.grid_size, cfg.vision.hidden_size
        table = torch.cat([torch.zeros(1, d), mmi.get_2d_sincos_pos_embed(d, G)])
        vis = vt.proj(vt.perceiver_resampler(vt.post_ln(vt.pos_ln(vt.pos_proj(h)) + table)))  # (3, n_tok, d_llm)
        grid = table[1:].T.reshape(1, d, G, G)
        for got, m in zip(maps, raw_maps):
            s = m.shape[-1]
            pe = grid if s == G else F.interpolate(grid, size=(s, s), mode="bicubic", align_corners=False)
            torch.testing.assert_close(got, m + pe, rtol=1e-5, atol=1e-5)
        expected = model.mm_decoder.embed_tokens(ids).clone()
        k = 0
        for r, row in enumerate(ids.tolist()):
            for p, t in enumerate(row):
                if t == cfg.soi_token_id:
                    expected[r, p] += model.soi_token[0]
                    expected[r, p + 1:p + 1 + cfg.num_img_token] = vis[k]
                    k += 1
    assert k == 3
    torch.testing.assert_close(embeds, expected, rtol=1e-5, atol=1e-5)


def test_zero_initialised_branches_add_nothing_until_perturbed():
    model = tiny_model(perturb=False)
    cfg = model.cfg
    batch = make_batch(cfg, [[BOS, 10, "img", 11, "img", 12]], 24)
    layer = model.mm_decoder.layers[0].llama_cross_attn
    h = torch.randn(1, 24, cfg.llm.hidden_size)
    _, vision, xmask, _ = model.prepare_mm_embeds(batch["text_ids"], batch["image_tensors"], batch["num_image_per_seq"])
    assert torch.count_nonzero(layer(h, vision, xmask)) == 0                   # tanh(gate = 0) = 0
    with torch.no_grad():
        layer.gate.fill_(0.5)
    out = layer(h, vision, xmask)
    sees_images = xmask[0].sum(-1) > 0
    assert (out[0, sees_images].norm(dim=-1) > 0).all()
    # a token that sees no image still gets output_proj(ignore term): zero here only because both start at zero
    assert torch.count_nonzero(out[0, ~sees_images]) == 0
    out2 = layer(h, vision * 2, xmask)
    assert not torch.allclose(out, out2)                                       # it reads the images

    injector = model.visual_tokenizer.encoder["vision_model"].adapter_interactions[0].injector
    x, c = torch.randn(2, 64, 64), torch.randn(2, 256 + 64 + 16, 64)
    shapes = torch.tensor([(16, 16), (8, 8), (4, 4)])
    ref = mmi.grid_centres(8, 8)[None]
    assert torch.equal(injector(x, ref, c, shapes), x)                         # gamma = 0
    with torch.no_grad():
        injector.gamma.fill_(1.0)
    assert not torch.allclose(injector(x, ref, c, shapes), x)


def test_forward_backward_and_tiny_overfit():
    model = tiny_model(seed=5, perturb=False).train()
    cfg = model.cfg
    batch = make_batch(cfg, [[BOS, 20, 21, "img", 22, 23, 24, "img", 25, EOS], [BOS, "img", 26, 27, 28, 29, EOS]], 40)
    batch["loss_img_weight"] = 0.0                     # the text loss alone (the image decoder is not run)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    first = None
    for step in range(200):
        loss = model(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = loss.item() if first is None else first
        if loss.item() < 0.1 * first:
            break
    assert loss.item() < 0.1 * first, (first, loss.item(), step)
    # gradients reach the vision side through the MMFS and the image embeddings
    assert model.visual_tokenizer.proj.weight.grad.abs().sum() > 0


def test_forward_reads_the_host_copies_it_is_given():
    """forward(batch, host=...) (train.py's, for a batch on a GPU) hands the forward host copies of text_ids and
    the image counts: it reads those instead of the batch's tensors, so the same copies give the same loss, and a
    wrong count there is what the checks see."""
    model = tiny_model(perturb=False).train()
    batch = make_batch(model.cfg, [[BOS, 10, "img", 11, "img"], [BOS, "img", 12]], 24)
    host = {k: batch[k].numpy() for k in mmi.HOST_KEYS if k in batch}
    assert set(host) >= {"text_ids", "num_image_per_seq"}
    torch.manual_seed(0)
    plain = model(batch)["loss"]
    torch.manual_seed(0)
    assert torch.equal(model(batch, host=host)["loss"], plain)
    wrong = dict(host, num_image_per_seq=np.array([1, 1]))
    with pytest.raises(ValueError, match=r"row 0: num_image_per_seq says 1 images, text has 2"):
        model(batch, host=wrong)


def test_bad_batches_are_clear_errors():
    model = tiny_model(perturb=False)
    cfg = model.cfg
    good = make_batch(cfg, [[BOS, 10, "img", 11, "img"], [BOS, "img", 12]], 24)
    model(good)
    with pytest.raises(ValueError, match="image_tensors holds 2 images, num_image_per_seq sums to 3"):
        model(dict(good, image_tensors=good["image_tensors"][:2]))
    with pytest.raises(ValueError, match=r"row 1: num_image_per_seq says 2 images, text has 1"):
        model(dict(good, num_image_per_seq=torch.tensor([2, 2]), image_tensors=torch.rand(4, 3, 64, 64)))
    with pytest.raises(ValueError, match=r"expected \[B_I, 3, 64, 64\], got \(3, 3, 32, 32\)"):
        model(dict(good, image_tensors=torch.rand(3, 3, 32, 32)))
    bad_ids = good["text_ids"].clone()
    bad_ids[1, 5] = 400
    with pytest.raises(ValueError, match=r"token id 400 at \[row, pos\] \[1, 5\] is outside \[0, 386\)"):
        model(dict(good, text_ids=bad_ids))
    cut = good["text_ids"].clone()
    cut[0, 4] = 10                                   # one <|image|> of the first image lost
    with pytest.raises(ValueError, match="row 0: num_image_per_seq says 2 images, text has 2 <|beginofimage|> and 15"):
        model(dict(good, text_ids=cut))
    small = mmi.MMInterleaved(mmi.apply_overrides(cfg, {"mmfs.max_num_image_per_seq": 2}))
    many = make_batch(cfg, [[BOS, "img", "img"]], 30)     # relative positions 1, 2: the table has rows 0, 1
    with pytest.raises(ValueError, match=r"a row has 2 images; MMFS sees at most 1 \(max_num_image_per_seq 2"):
        small(many)
    small(make_batch(cfg, [[BOS, "img", 5]], 30))


def test_forward_gives_both_losses_image_grads_reach_the_llm():
    model = tiny_model(perturb=False).train()
    cfg = model.cfg
    batch = make_batch(cfg, [[BOS, 20, 21, "img", 22, 23, "img", 24, EOS], [BOS, "img", 25, 26, EOS]], 30)
    batch["nearest_bos_idxs"] = torch.cat([torch.from_numpy(data.nearest_bos_idxs(r.numpy(), BOS, SOI))
                                           for r in batch["text_ids"]])
    out = model(batch)
    assert torch.isfinite(out["loss_txt"]) and torch.isfinite(out["loss_img"]) and out["loss_img"] > 0
    torch.testing.assert_close(out["loss"], out["loss_txt"] + 10.0 * out["loss_img"])
    out["loss"].backward()
    # only the image loss reaches context_feat_proj and the image resampler
    assert model.context_feat_proj.weight.grad.abs().sum() > 0
    assert model.image_decoder.perceiver_resampler.queries.grad.abs().sum() > 0
    out = model(dict(batch, loss_img_weight=0.0, loss_txt_weight=2.0))
    torch.testing.assert_close(out["loss"], 2.0 * out["loss_txt"])
    out = model(dict(batch, loss_img_weight=2.5))          # the batch's weight, not the config's 10
    torch.testing.assert_close(out["loss"], out["loss_txt"] + 2.5 * out["loss_img"])


def test_vae_runs_before_the_llm_with_the_original_draws():
    """forward encodes the decoder images before the LLM (for memory) and draws from the VAE's posterior inside
    the image decoder, chunk by chunk, where the original draws: under one seed its image loss equals the one
    with the VAE run inside the image decoder, and the latents equal the original's per-chunk encode-and-sample."""
    model = tiny_model(perturb=False).train()
    sd = model.image_decoder.decoder
    sd.cfg.vae_encode_mini_bs = 2                      # the batch's 3 images: two chunks
    batch = make_batch(model.cfg, [[BOS, 20, 21, "img", 22, 23, "img", 24, EOS], [BOS, "img", 25, 26, EOS]], 30)
    torch.manual_seed(7)
    loss_img = model(batch)["loss_img"]
    torch.manual_seed(7)                               # the same steps, the VAE run in the image decoder's forward
    num = model.validate_batch(batch)
    embeds, vision, xmask, maps = model.prepare_mm_embeds(batch["text_ids"], batch["image_tensors"], num)
    pos = torch.arange(batch["text_ids"].shape[1]).expand_as(batch["text_ids"])
    h = model.mm_decoder(embeds, pos, vision, xmask)
    torch.testing.assert_close(loss_img, model.image_loss(batch, h, maps), rtol=0, atol=0)

    images = batch["image_tensors"]
    torch.manual_seed(3)
    latents = sd.sample_posterior(sd.encode_posterior(images))
    torch.manual_seed(3)
    chunks = [sd.vae.sample(*sd.vae.encode(c * 2 - 1)) for c in images.float().split(2)]
    torch.testing.assert_close(latents, torch.cat(chunks) * sd.vae.cfg.scaling_factor, rtol=0, atol=0)


def _story_batch(cfg, first_word=20):
    return make_batch(cfg, [[BOS, first_word, 21, "img", 22, 23, "img", 24, EOS], [BOS, "img", 25, 26, EOS]], 30)


def test_forward_draws_from_its_generator_not_the_global_rng():
    """Every random draw of the forward comes from the generator: the same seed gives the same losses whatever the
    global RNG holds, the global RNG does not move, and the draws are those the global RNG seeded alike makes (the
    original's order). A given uncond_mask replaces the condition drop: all dropped, the image loss cannot depend on
    the text; none dropped, it does."""
    model = tiny_model().train()
    batch = _story_batch(model.cfg)
    losses = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        state = torch.get_rng_state()
        losses.append(model(batch, generator=torch.Generator().manual_seed(5)))
        assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(5)
    losses.append(model(batch))
    assert all(torch.equal(losses[0][k], x[k]) for x in losses[1:] for k in ("loss", "loss_txt", "loss_img"))
    other = _story_batch(model.cfg, first_word=40)
    for dropped in (True, False):
        a, b = (model(dict(x, uncond_mask=torch.full((3,), dropped)), generator=torch.Generator().manual_seed(5))
                for x in (batch, other))
        assert torch.equal(a["loss_img"], b["loss_img"]) == dropped


def test_forward_image_loss_is_the_mse_for_given_draws():
    """Given the posterior's noise, the diffusion noise and the timesteps, the image loss is the mean squared v
    target (the UNet's output zeroed), v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0, x0 = (mean + std xi) * 0.18215,
    the scaled-linear schedule written out here; image 2 (only <s><soi> as context) counts as zeros in the mean."""
    torch.manual_seed(0)
    model = mmi.MMInterleaved(mmi.MMIConfig.from_preset("tiny", **{"image_decoder.prediction_type": "v_prediction"}))
    sd = model.image_decoder.decoder
    with torch.no_grad():
        sd.unet.conv_out.weight.zero_()
        sd.unet.conv_out.bias.zero_()
    batch = _story_batch(model.cfg)
    g = torch.Generator().manual_seed(1)
    xi, eps = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([0, 517, 999])
    with torch.no_grad():
        loss = model(dict(batch, posterior_noise=xi, noise=eps, timesteps=t))["loss_img"]
        mean, logvar = sd.encode_posterior(batch["image_tensors"])
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    abar = torch.cumprod(1 - betas, 0)[t][:, None, None, None]
    x0 = (mean.double() + (0.5 * logvar.double()).exp() * xi) * 0.18215
    v = abar.sqrt() * eps - (1 - abar).sqrt() * x0
    want = (v ** 2 * torch.tensor([1.0, 1.0, 0.0])[:, None, None, None]).mean()
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=0)
    with pytest.raises(ValueError, match=r"timesteps: expected shape \[3\] \(one per image\), got \[2\]"):
        model(dict(batch, timesteps=t[:2]))


@cuda_only
def test_a_training_step_reads_the_gpu_back_only_at_its_start():
    """A training forward and backward on a GPU waits for the device only where it copies text_ids and the image
    counts to the host at its start: no host read waits for the vision encoder's, the LLM's or the image decoder's
    queued work, nor for the backward pass's. Given host copies of them (as train.py gives), it reads nothing."""
    model = mmi.speed_up(tiny_model(perturb=False)).cuda().train()          # as train.py runs it
    host_batch = make_batch(model.cfg, [[BOS, 20, "img", 21, "img", EOS], [BOS, "img", 22, EOS]], 30)
    batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in host_batch.items()}
    model(batch)["loss"].backward()                  # warm-up: kernels loaded, level tables cached
    model.zero_grad()

    def host_reads(batch, host=None):
        with gpu_reads({mmi.__file__}) as reads:
            out = model(batch, host=host)
            out["loss"].backward()
        assert "loss_img" in out                     # the image decoder ran
        return [(f.name, f.line) if isinstance(f, traceback.FrameSummary) else f for _, f in reads]

    reads = host_reads(batch)
    assert reads                                     # the host copies at the start are seen
    allowed = [r for r in reads if r[0] in ("forward", "<dictcomp>") and ".cpu()" in r[1]]  # (<dictcomp>: < 3.12)
    assert allowed == reads, [r for r in reads if r not in allowed]
    assert host_reads(batch, {k: host_batch[k].numpy() for k in mmi.HOST_KEYS if k in host_batch}) == []


@cuda_only
def test_tiny_model_trains_under_cuda_autocast_bf16():
    """CUDA autocast runs softmax in float32: the deformable-attention calls must still hand the op one dtype."""
    model = tiny_model(perturb=False).cuda().train()
    batch = make_batch(model.cfg, [[BOS, 20, "img", 21, "img", EOS]], 30)
    batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(batch)
    out["loss"].backward()
    assert torch.isfinite(out["loss"])


# ----------------------------------------------------------------------------------------------------------------
# Loading: the released files in every hub layout (tiny random transformers / diffusers models written to disk)
# ----------------------------------------------------------------------------------------------------------------


MANIFESTS = os.path.join(HERE, "assets", "reference")
TINY = mmi.MMIConfig.from_preset("tiny")
LAYOUTS = ["safetensors", "safetensors-sharded", "bin", "bin-sharded"]


def _save(model, folder, layout):
    """save_pretrained in one of the hub's layouts (sharded = many small shards plus an index json)."""
    kw = {"safe_serialization": layout.startswith("safetensors")}
    if layout.endswith("sharded"):
        kw["max_shard_size"] = "100KB"
    model.save_pretrained(folder, **kw)


def _hf_llama(cfg=TINY, seed=0):
    transformers = oracle_transformers()
    torch.manual_seed(seed)
    c = cfg.llm
    hf = transformers.LlamaConfig(vocab_size=c.vocab_size - 2, hidden_size=c.hidden_size,
                                  intermediate_size=c.intermediate_size, num_hidden_layers=c.num_hidden_layers,
                                  num_attention_heads=c.num_attention_heads, rms_norm_eps=c.rms_norm_eps,
                                  max_position_embeddings=c.max_position_embeddings, rope_theta=c.rope_theta)
    model = transformers.LlamaForCausalLM(hf).eval()
    with torch.no_grad():                        # norms away from 1 so they are tested too
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def _hf_clip(cfg=TINY, seed=0):
    transformers = oracle_transformers()
    torch.manual_seed(seed)
    v = cfg.vision
    hf = transformers.CLIPConfig(
        vision_config=dict(image_size=v.image_size, patch_size=v.patch_size, hidden_size=v.hidden_size,
                           num_hidden_layers=v.num_hidden_layers, num_attention_heads=v.num_attention_heads,
                           intermediate_size=v.intermediate_size),
        text_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37,
                         vocab_size=99, max_position_embeddings=16), projection_dim=16)
    model = transformers.CLIPModel(hf).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.fixture(scope="module")
def originals(tmp_path_factory):
    """Tiny Vicuna-like and CLIP-like folders in every layout plus an SD folder, written once for the module."""
    root = tmp_path_factory.mktemp("originals")
    llama, clip = _hf_llama(), _hf_clip()
    for layout in LAYOUTS:
        _save(llama, root / f"llm-{layout}", layout)
        _save(clip, root / f"clip-{layout}", layout)
    sd = _write_sd_folder(root / "sd")
    return root, llama, clip, sd


@pytest.fixture(scope="module")
def loaded(originals):
    """The tiny model from the safetensors originals, loaded once for the tests that only look at it."""
    return _load(originals[0]).eval()


def _load(root, layout="safetensors", **kw):
    return mmi.MMInterleaved.from_original(llm=str(root / f"llm-{layout}"), clip=str(root / f"clip-{layout}"),
                                           sd=str(root / "sd"), cfg=TINY, **kw)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_loads_the_original_tensors(originals, layout):
    """Single/sharded safetensors and .bin: each Vicuna and CLIP-vision tensor lands, bit-exact, at its place."""
    root, llama, clip, _ = originals
    model = _load(root, layout)
    ours = model.state_dict()
    for k, v in llama.state_dict().items():
        if k.startswith("model."):
            mine = ours["mm_decoder." + k[len("model."):]]
            assert torch.equal(mine[:v.shape[0]], v), k
    assert torch.equal(ours["text_decoder.head.weight"][:-2], llama.lm_head.weight)
    n = 0
    for k, v in clip.state_dict().items():
        if k.startswith("vision_model.") and "post_layernorm" not in k:
            assert torch.equal(ours["visual_tokenizer.encoder." + k], v), k
            n += 1
    assert n == 5 + 16 * TINY.vision.num_hidden_layers         # embeddings 3, pre-LN 2, 16 per layer
    assert model.load_report["counts"]["clip"][0] == n


def test_loaded_model_matches_transformers(originals, loaded):
    """The loaded LLM's logits and CLIP's last hidden state equal transformers' (float32, < 1e-4)."""
    _, llama, clip, _ = originals
    model = loaded
    ids = torch.randint(0, 250, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = llama(ids).logits
        ours = model.text_logits({"text_ids": ids})
    V = ref.shape[-1]
    assert (ours[..., :V] - ref).abs().max() < 1e-4
    # the new tokens: head rows silenced (-100) + head_new bias 95 -> exactly -5 whatever the hidden state
    assert torch.allclose(ours[..., V:], torch.full_like(ours[..., V:], -5.0))

    pixels = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = clip.vision_model(pixel_values=pixels, output_hidden_states=True).hidden_states[-1]
        # injector gamma is 0 at init, so the adapter does not change the ViT tokens
        ours, _ = model.visual_tokenizer.encoder["vision_model"](pixels)
    assert (ours - ref).abs().max() < 1e-4


def test_vocab_resize_and_text_head_init(originals, loaded):
    """embed_tokens rows < V and head rows < V come from Vicuna; the two new rows follow the paper's init."""
    _, llama, _, _ = originals
    model = loaded
    V = llama.config.vocab_size
    emb, head = model.mm_decoder.embed_tokens.weight, model.text_decoder.head
    assert emb.shape[0] == V + 2 and torch.equal(emb[:V], llama.model.embed_tokens.weight)
    assert torch.isfinite(emb[V:]).all() and 0 < emb[V:].std() < 0.1          # N(0, 0.02) draws, not zeros
    assert torch.equal(head.weight[:V], llama.lm_head.weight) and torch.equal(head.weight[V:], torch.zeros(2, 64))
    assert torch.equal(head.bias, torch.cat([torch.zeros(V), torch.full((2,), -100.0)]))
    assert torch.equal(model.text_decoder.head_new.bias, torch.full((2,), 95.0))
    assert not model.text_decoder.head_new.weight.any()
    assert (model.cfg.pad_token_id, model.cfg.soi_token_id, model.cfg.image_token_id) == (V - 1, V, V + 1)


def test_tensors_no_file_holds_take_their_documented_values(loaded):
    """soi_token starts at zeros (the original's init) and CLIP's position_ids, which the CLIP files of
    transformers >= 4.31 no longer hold, are 0 .. n-1 over the class token and every patch."""
    model = loaded
    assert "soi_token" in model.load_report["new"]
    assert model.soi_token.shape == (1, 64) and not model.soi_token.any()
    n = (TINY.vision.image_size // TINY.vision.patch_size) ** 2 + 1
    position_ids = model.visual_tokenizer.encoder["vision_model"].embeddings.position_ids
    assert torch.equal(position_ids, torch.arange(n)[None])


def test_config_is_derived_from_the_files(originals):
    """The released parts' shapes come from their config.json files, MM-Interleaved's own values from the base."""
    root, _, _, _ = originals
    base = dataclasses.replace(
        TINY, llm=dataclasses.replace(TINY.llm, hidden_size=7, num_hidden_layers=1, vocab_size=9),
        vision=dataclasses.replace(TINY.vision, patch_size=3), unet=dataclasses.replace(TINY.unet, sample_size=5),
        vae=dataclasses.replace(TINY.vae, block_out_channels=(8,)),
        image_decoder=dataclasses.replace(TINY.image_decoder, beta_end=0.5, image_size=3, mmfs_feat_dim=1))
    assert mmi.config_from_original(str(root / "llm-bin"), str(root / "clip-bin"), str(root / "sd"), base) == TINY


def test_dtype_and_trainable_flags(originals):
    root, _, _, _ = originals
    model = _load(root, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.visual_tokenizer.encoder["vision_model"].embeddings.position_ids.dtype == torch.long
    with torch.device("meta"):
        fresh = mmi.MMInterleaved(model.cfg)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == \
        {n: p.requires_grad for n, p in fresh.named_parameters()}

def test_every_trainable_flag_freezes_its_own_component():
    """Each config flag saying whether a component trains freezes some weights when set false, and only weights
    no other flag governs: no flag is ignored, no weight answers to two flags."""
    flags = [key for key, _ in mmi._config_rows(TINY) if key.split(".")[-1].endswith("trainable")]
    assert len(flags) == 7
    all_on = mmi.apply_overrides(TINY, {f: True for f in flags})

    def trains(cfg):
        with torch.device("meta"):
            return {n for n, p in mmi.MMInterleaved(cfg).named_parameters() if p.requires_grad}

    on, seen = trains(all_on), set()
    for flag in flags:
        frozen = on - trains(mmi.apply_overrides(all_on, {flag: False}))
        assert frozen and not frozen & seen, flag
        seen |= frozen


def _tiny_mmi(seed=3):
    """A tiny MM-Interleaved with every tensor random (nothing left at a zero init), as a released one would be."""
    torch.manual_seed(seed)
    model = mmi.MMInterleaved(TINY).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.fixture(scope="module")
def tiny_mmi():
    return _tiny_mmi()


def _write_mmi_checkpoint(model, folder, n_shards=2, drop=(), extra=None):
    """Two pytorch_model-*.bin shards plus pytorch_model.bin.index.json, keys = our state-dict names."""
    os.makedirs(folder, exist_ok=True)
    sd = {k: v for k, v in model.state_dict().items() if k not in drop}
    sd.update(extra or {})
    keys = list(sd)
    weight_map = {}
    for i in range(n_shards):
        name = f"pytorch_model-{i + 1:05d}-of-{n_shards:05d}.bin"
        part = {k: sd[k] for k in keys[i::n_shards]}
        torch.save(part, os.path.join(folder, name))
        weight_map.update((k, name) for k in part)
    with open(os.path.join(folder, "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


def _batch():
    c = TINY
    g = torch.Generator().manual_seed(4)
    text = torch.randint(3, 250, (1, 24), generator=g)
    text[0, 0] = c.bos_token_id
    text[0, 3] = c.soi_token_id
    text[0, 4:4 + c.num_img_token] = c.image_token_id
    return {"text_ids": text, "image_tensors": torch.rand(1, 3, 64, 64, generator=g),
            "num_image_per_seq": torch.tensor([1])}


def test_mmi_checkpoint_overlays_everything(originals, tmp_path, tiny_mmi):
    """A checkpoint with our key names, in two .bin shards + index, wins over Vicuna/CLIP: the loaded model equals
    the one that wrote it, tensor for tensor and in its outputs (images through the adapter and MMFS)."""
    root, _, _, _ = originals
    src = tiny_mmi
    _write_mmi_checkpoint(src, tmp_path / "mmi")
    model = _load(root, mmi=str(tmp_path / "mmi")).eval()
    loaded = model.state_dict()
    for k, v in src.state_dict().items():
        assert torch.equal(loaded[k], v), k
    assert model.load_report["new"] == []


def test_mmi_checkpoint_alone_needs_no_vicuna_clip_or_sd_folder(tmp_path, tiny_mmi):
    """A checkpoint holding every weight loads on its own, shaped by cfg: tensor for tensor and in its outputs the
    model that wrote it. One that lacks the LLM's layers is an error naming them and the folder that would hold
    them."""
    src = tiny_mmi
    _write_mmi_checkpoint(src, tmp_path / "mmi")
    model = mmi.MMInterleaved.from_original(mmi=str(tmp_path / "mmi"), cfg=TINY).eval()
    loaded = model.state_dict()
    assert loaded.keys() == src.state_dict().keys()
    for k, v in src.state_dict().items():
        assert torch.equal(loaded[k], v), k
    assert model.load_report["new"] == [] and set(model.load_report["counts"]) == {"mmi"}
    with torch.no_grad():
        assert torch.equal(model.text_logits(_batch()), src.text_logits(_batch()))
    frozen = [k for k in src.state_dict() if k.startswith("mm_decoder.layers.1.")]
    _write_mmi_checkpoint(src, tmp_path / "part", drop=frozen)
    with pytest.raises(mmi.InputError, match=rf"^{len(frozen)} tensors of the model are neither in mmi=\S+part nor "
                                             rf"documented as new: \['mm_decoder\.layers\.1\..*; the mmi checkpoint "
                                             rf"must hold those of the folders not given: {len(frozen)} of llm "
                                             rf"\(Vicuna\)$"):
        mmi.MMInterleaved.from_original(mmi=str(tmp_path / "part"), cfg=TINY)


def test_partial_checkpoint_keeps_frozen_parts_from_originals(originals, tmp_path, tiny_mmi):
    """A checkpoint holding only the trained parts: the LLM body and CLIP come from Vicuna/CLIP."""
    root, llama, _, _ = originals
    src = tiny_mmi
    frozen = [k for k in src.state_dict() if k.startswith("mm_decoder.layers.1.")]
    _write_mmi_checkpoint(src, tmp_path / "mmi", drop=frozen)
    model = _load(root, mmi=str(tmp_path / "mmi"))
    assert torch.equal(model.mm_decoder.layers[1].mlp.up_proj.weight, llama.model.layers[1].mlp.up_proj.weight)
    assert torch.equal(model.mm_decoder.layers[0].llama_cross_attn.attn.value_proj.weight,
                       src.mm_decoder.layers[0].llama_cross_attn.attn.value_proj.weight)
    assert model.load_report["counts"]["llm"][0] == len([k for k in frozen])


@pytest.mark.parametrize("held", ["head_new", "head_new_and_head_bias"])
def test_partial_checkpoint_of_the_text_head_gets_the_papers_new_rows(originals, tmp_path, tiny_mmi, held):
    """A checkpoint holding head_new (trained while the head is frozen) and maybe the head's bias, not its
    weight: the head's weight is Vicuna's plus two new rows of 0, its bias the checkpoint's or 0 with -100 on
    the new rows, head_new the checkpoint's. Quantized on load, the head waits for those rows: the model equals
    the plain one quantized after loading."""
    root, llama, _, _ = originals
    drop = ["text_decoder.head.weight"] + (["text_decoder.head.bias"] if held == "head_new" else [])
    _write_mmi_checkpoint(tiny_mmi, tmp_path / "mmi", drop=drop)
    model = _load(root, mmi=str(tmp_path / "mmi"))
    V, head, src = llama.config.vocab_size, model.text_decoder.head, tiny_mmi.text_decoder
    assert torch.equal(head.weight, torch.cat([llama.lm_head.weight, torch.zeros(2, 64)]))
    bias = src.head.bias if held != "head_new" else torch.cat([torch.zeros(V), torch.full((2,), -100.0)])
    assert torch.equal(head.bias, bias)
    assert all(torch.equal(a, b) for a, b in zip(model.text_decoder.head_new.parameters(), src.head_new.parameters()))
    if held != "head_new":
        on_load = _load(root, mmi=str(tmp_path / "mmi"), quantize="int8").state_dict()
        after = mmi.quantize(model, 8).state_dict()
        assert on_load.keys() == after.keys() and all(torch.equal(on_load[k], t) for k, t in after.items())


# ----------------------------------------------------------------------------------------------------------------
# Loading: refusals
# ----------------------------------------------------------------------------------------------------------------


class _NotATensor:
    pass


def test_refuses_a_pickle_with_a_non_tensor_object(originals, tmp_path, tiny_mmi):
    root, _, _, _ = originals
    _write_mmi_checkpoint(tiny_mmi, tmp_path / "mmi", extra={"soi_token": _NotATensor()})
    with pytest.raises(ValueError, match=r"pytorch_model-0000\d-of-00002\.bin: refused by torch\.load"):
        _load(root, mmi=str(tmp_path / "mmi"))


def test_refuses_a_missing_shard(originals, tmp_path, tiny_mmi):
    root, _, _, _ = originals
    _write_mmi_checkpoint(tiny_mmi, tmp_path / "mmi")
    os.remove(tmp_path / "mmi" / "pytorch_model-00002-of-00002.bin")
    with pytest.raises(ValueError, match=r"names shard 'pytorch_model-00002-of-00002\.bin', which is missing"):
        _load(root, mmi=str(tmp_path / "mmi"))


def test_refuses_a_shape_mismatch(originals, tmp_path, tiny_mmi):
    root, _, _, _ = originals
    _write_mmi_checkpoint(tiny_mmi, tmp_path / "mmi", extra={"soi_token": torch.zeros(1, 65)})
    with pytest.raises(ValueError, match=r"pytorch_model-0000\d-of-00002\.bin: key 'soi_token' has shape \[1, 65\], "
                                         r"expected \[1, 64\]"):
        _load(root, mmi=str(tmp_path / "mmi"))


def test_refuses_an_unknown_key(originals, tmp_path, tiny_mmi):
    root, _, _, _ = originals
    _write_mmi_checkpoint(tiny_mmi, tmp_path / "mmi", extra={"mm_decoder.layers.0.extra.weight": torch.zeros(3)})
    with pytest.raises(ValueError, match=r"unknown key 'mm_decoder\.layers\.0\.extra\.weight' \(shape \[3\]\)"):
        _load(root, mmi=str(tmp_path / "mmi"))


def test_refuses_a_vicuna_with_the_wrong_shape(tmp_path, originals):
    """Vicuna's embed_tokens must have exactly the new vocabulary minus the two new tokens."""
    root, _, _, _ = originals
    llama = _hf_llama()
    llama.resize_token_embeddings(200)
    llama.config.vocab_size = 256                  # config says 256, files hold 200 rows
    _save(llama, tmp_path / "llm", "safetensors")
    with pytest.raises(ValueError, match=r"model\.safetensors: key '(model\.embed_tokens|lm_head)\.weight' has shape "
                                         r"\[200, 64\], expected \[258, 64\]"):
        mmi.MMInterleaved.from_original(llm=str(tmp_path / "llm"), clip=str(root / "clip-bin"), cfg=TINY)


def _vicuna_with_a_nan_row(root, folder):
    """The tiny Vicuna with one NaN in a row of embed_tokens that the model keeps (a row below its vocabulary)."""
    shutil.copytree(root / "llm-safetensors", folder)
    sd = load_file(folder / "model.safetensors")
    sd["model.embed_tokens.weight"][5, 3] = math.nan
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize("case, message", [
    ("float_where_integer", r"pytorch_model-0000\d-of-00002\.bin: key '([\w.]+position_ids)' holds torch\.float32, "
                            r"expected an integer tensor for '\1'$"),
    ("integer_where_float", r"pytorch_model-0000\d-of-00002\.bin: key 'soi_token' holds torch\.int32, expected a "
                            r"floating-point tensor for 'soi_token'$"),
    ("mmi_without_the_new_rows", r"pytorch_model-0000\d-of-00002\.bin: key 'mm_decoder\.embed_tokens\.weight' has "
                                 r"shape \[384, 64\], expected \[386, 64\] for 'mm_decoder\.embed_tokens\.weight'$"),
    ("nan_in_vicuna_rows", r"llm\S*model\.safetensors: key 'model\.embed_tokens\.weight' holds NaN or infinite "
                           r"values; expected finite weights"),
], ids=["float_where_integer", "integer_where_float", "mmi_without_the_new_rows", "nan_in_vicuna_rows"])
def test_from_original_refuses_a_tensor_of_the_wrong_kind_rows_or_values(originals, tmp_path, tiny_mmi, case, message):
    """Each file tensor is checked as it lands, in one line naming its file and key: an integer tensor for a
    floating one of ours or the reverse, an MM-Interleaved checkpoint's vocabulary rows without the two new tokens
    (only Vicuna's files lack them), and NaN in the rows of a Vicuna tensor the model extends by the new tokens."""
    root = originals[0]
    sd = tiny_mmi.state_dict()
    pos = "visual_tokenizer.encoder.vision_model.embeddings.position_ids"
    extra = {"float_where_integer": {pos: sd[pos].float()},
             "integer_where_float": {"soi_token": torch.zeros(1, 64, dtype=torch.int32)},
             "mmi_without_the_new_rows": {"mm_decoder.embed_tokens.weight": sd["mm_decoder.embed_tokens.weight"][:-2]}}
    if case == "nan_in_vicuna_rows":
        _vicuna_with_a_nan_row(root, tmp_path / "llm")
        kw = dict(llm=str(tmp_path / "llm"), clip=str(root / "clip-safetensors"), sd=str(root / "sd"))
    else:
        _write_mmi_checkpoint(tiny_mmi, tmp_path / "mmi", extra=extra[case])
        kw = dict(mmi=str(tmp_path / "mmi"))
    with pytest.raises(mmi.InputError, match=message):
        mmi.MMInterleaved.from_original(cfg=TINY, **kw)


def test_index_and_shard_must_agree(tmp_path, tiny_mmi):
    _write_mmi_checkpoint(tiny_mmi, tmp_path / "mmi")
    idx = tmp_path / "mmi" / "pytorch_model.bin.index.json"
    d = json.loads(idx.read_text())
    d["weight_map"]["ghost.weight"] = "pytorch_model-00001-of-00002.bin"
    idx.write_text(json.dumps(d))
    with pytest.raises(ValueError, match=r"key 'ghost\.weight' is named by the index but not in the file"):
        mmi.WeightFiles(str(tmp_path / "mmi")).shapes()
    del d["weight_map"]["ghost.weight"], d["weight_map"]["soi_token"]
    idx.write_text(json.dumps(d))
    with pytest.raises(ValueError, match=r"mmi: key 'soi_token' is in a shard but not in the index$"):
        mmi.WeightFiles(str(tmp_path / "mmi")).shapes()


def test_index_names_shards_in_its_own_folder_only(tmp_path, tiny_mmi):
    """A shard named by a path ('../x.bin', 'sub/x.bin') is refused even where that file exists: the index names
    files of its folder, nothing else is read."""
    _write_mmi_checkpoint(tiny_mmi, tmp_path / "mmi")
    idx = tmp_path / "mmi" / "pytorch_model.bin.index.json"
    d = json.loads(idx.read_text())
    shutil.move(tmp_path / "mmi" / "pytorch_model-00002-of-00002.bin", tmp_path / "outside.bin")
    os.makedirs(tmp_path / "mmi" / "sub")
    shutil.copy(tmp_path / "outside.bin", tmp_path / "mmi" / "sub" / "x.bin")
    moved = {k for k, f in d["weight_map"].items() if f == "pytorch_model-00002-of-00002.bin"}
    for name in ("../outside.bin", "sub/x.bin"):
        d["weight_map"].update((k, name) for k in moved)
        idx.write_text(json.dumps(d))
        with pytest.raises(mmi.InputError, match=rf"index\.json: shard name '{re.escape(name)}' is not a plain file "
                                                 rf"name in this folder$"):
            mmi.WeightFiles(str(tmp_path / "mmi"))


def test_refuses_a_legacy_pickle(tmp_path):
    os.makedirs(tmp_path / "old")
    torch.save({"w": torch.zeros(2)}, tmp_path / "old" / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    with pytest.raises(ValueError, match=r"pytorch_model\.bin: refused by torch\.load"):
        mmi.WeightFiles(str(tmp_path / "old"))


def _all_dtypes_state():
    g = torch.Generator().manual_seed(0)
    floats = {f"f.{d}": (torch.randn(3, 5, generator=g) * 100).to(d)
              for d in (torch.bfloat16, torch.float16, torch.float32, torch.float64)}
    ints = {f"i.{d}": torch.randint(-100, 100, (7,), generator=g).to(d)
            for d in (torch.int64, torch.int32, torch.int16, torch.int8)}
    return {**floats, **ints, "u8": torch.randint(0, 256, (2, 3, 4), generator=g).to(torch.uint8),
            "bool": torch.rand(9, generator=g) > 0.5, "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 4)}


def test_safetensors_reader_equals_load_file_bit_for_bit(tmp_path):
    os.makedirs(tmp_path / "w")
    save_file(_all_dtypes_state(), str(tmp_path / "w" / "model.safetensors"), metadata={"format": "pt"})
    want = load_file(str(tmp_path / "w" / "model.safetensors"))
    files = mmi.WeightFiles(str(tmp_path / "w"))
    assert files.shapes() == {k: tuple(t.shape) for k, t in want.items()}
    [(_, tensors)] = list((p, {k: t[k].clone() for k in t.keys()}) for p, t in files.shards())   # one buffer
    assert tensors.keys() == want.keys()
    for k, t in tensors.items():
        assert t.dtype == want[k].dtype and t.shape == want[k].shape, k
        assert torch.equal(t.reshape(-1).view(torch.uint8), want[k].reshape(-1).view(torch.uint8)), k


def _rewrite_safetensors_header(path, key, **changes):
    raw = open(path, "rb").read()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    header[key].update(changes)
    text = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text + raw[8 + n:])


@pytest.mark.parametrize("change, message", [
    ({"data_offsets": [0, 10 ** 6]}, r"key 'i\.torch\.int16': data_offsets \[0, 1000000\] outside the \d+ data bytes"),
    ({"shape": [8]}, r"key 'i\.torch\.int16': data_offsets \[\d+, \d+\] span 14 bytes, shape \[8\] of I16 needs 16"),
    ({"dtype": "F8_E4M3"}, r"key 'i\.torch\.int16': dtype 'F8_E4M3', expected one of BF16"),
], ids=["offset_out_of_range", "wrong_byte_count", "unknown_dtype"])
def test_safetensors_reader_refuses_a_corrupt_header(tmp_path, change, message):
    os.makedirs(tmp_path / "w")
    path = str(tmp_path / "w" / "model.safetensors")
    save_file(_all_dtypes_state(), path)
    _rewrite_safetensors_header(path, "i.torch.int16", **change)
    with pytest.raises(ValueError, match=r"model\.safetensors: " + message):
        mmi.WeightFiles(str(tmp_path / "w"))


def test_bin_tensors_stay_readable_after_pages_are_dropped(tmp_path):
    os.makedirs(tmp_path / "w")
    state = {k: t.reshape(-1).repeat(1000) for k, t in _all_dtypes_state().items()}   # several pages each
    torch.save(state, tmp_path / "w" / "pytorch_model.bin")
    [(_, tensors)] = list(mmi.WeightFiles(str(tmp_path / "w")).shards())
    seen = {k: tensors[k] for k in tensors.keys()}     # asking for the next one drops the previous one's pages
    for k, t in seen.items():                           # a dropped page is read from the file again
        assert torch.equal(t.reshape(-1).view(torch.uint8), state[k].reshape(-1).view(torch.uint8)), k


# ----------------------------------------------------------------------------------------------------------------
# Loading: full size, no weights: the manifests of the released files against the mmi-13b preset on meta
# ----------------------------------------------------------------------------------------------------------------


def _loader_manifest(name):
    with open(os.path.join(MANIFESTS, name)) as f:
        return {k: tuple(v) for k, v in json.load(f).items()}


@pytest.fixture(scope="module")
def shapes_13b():
    """{key: shape} of the mmi-13b preset, built on the meta device (no memory, no weights)."""
    return mmi._target_shapes(mmi._build_meta(mmi.MMIConfig.from_preset("mmi-13b")))


def test_released_files_cover_the_13b_model(shapes_13b):
    """Every key of Vicuna-13B, CLIP ViT-L/14 (and SD-2 base's UNet/VAE) maps to a tensor of the right shape or to
    the ignore list; with them, every tensor of ours is loaded or documented as new. The MM-Interleaved
    manifest maps one-to-one onto our state dict."""
    ours = shapes_13b
    comps = {"llm": "vicuna_13b_hf.json", "clip": "clip_vit_large_patch14_hf.json", "unet": "sd2_base_unet.json",
             "vae": "sd2_base_vae.json"}
    provider = {}
    for comp, fname in comps.items():
        shapes = _loader_manifest(fname)
        plan = mmi.plan_component(comp, shapes, ours, {k: fname for k in shapes})
        ignored = sorted(k for k, v in plan.items() if v is None)
        if comp == "llm":
            assert len(ignored) == 40 and all(k.endswith("rotary_emb.inv_freq") for k in ignored)
        if comp == "clip":
            assert not any(k.startswith("vision_model.") and "post_layernorm" not in k for k in ignored)
        if comp == "vae":   # legacy attention names renamed
            assert plan["decoder.mid_block.attentions.0.query.weight"] == \
                "image_decoder.decoder.vae.decoder.mid_block.attentions.0.to_q.weight"
        provider.update((v, comp) for v in plan.values() if v)
    new = mmi.check_accounting(list(ours), provider)
    assert all(n.startswith(("visual_tokenizer.", "mm_decoder.layers.", "text_decoder.", "context_feat_proj.",
                             "soi_token", "image_decoder.")) for n in new)
    assert not any(n.startswith("visual_tokenizer.encoder.vision_model.encoder.") for n in new)
    assert not any(n.startswith("mm_decoder.") and "llama_cross_attn" not in n for n in new)

    mmi_shapes = _loader_manifest("mm_interleaved_13b.json")
    plan = mmi.plan_component("mmi", mmi_shapes, ours, {k: "mm_interleaved_13b.json" for k in mmi_shapes})
    assert sorted(plan.values()) == sorted(ours)


def test_unknown_original_key_is_reported_with_its_file(shapes_13b):
    shapes = _loader_manifest("vicuna_13b_hf.json")
    shapes["model.layers.0.self_attn.qkv_proj.weight"] = (15360, 5120)
    with pytest.raises(ValueError, match=r"vicuna.json: unknown key 'model\.layers\.0\.self_attn\.qkv_proj\.weight' "
                                         r"\(shape \[15360, 5120\]\)"):
        mmi.plan_component("llm", shapes, shapes_13b, {k: "vicuna.json" for k in shapes})


# ----------------------------------------------------------------------------------------------------------------
# Loading: our own format
# ----------------------------------------------------------------------------------------------------------------


def test_save_pretrained_round_trip_is_exact(tmp_path, tiny_mmi):
    src = tiny_mmi
    out = tmp_path / "ckpt"
    os.makedirs(out)
    (out / "stale.txt").write_text("replaced atomically")
    src.save_pretrained(str(out), max_shard_bytes=200_000)
    files = sorted(os.listdir(out))
    assert "model.safetensors.index.json" in files and "config.json" in files and "stale.txt" not in files
    assert sum(f.endswith(".safetensors") for f in files) > 1
    assert not [f for f in os.listdir(tmp_path) if f != "ckpt"]          # no temp folder left behind
    # every file as readable as any this process writes (safetensors alone would leave its files 0600)
    assert {os.stat(out / f).st_mode & 0o777 for f in files} == {os.stat(out / "config.json").st_mode & 0o777}
    back = mmi.MMInterleaved.from_pretrained(str(out)).eval()
    assert back.cfg == src.cfg
    sd_src, sd_back = src.state_dict(), back.state_dict()
    assert sd_src.keys() == sd_back.keys()
    for k in sd_src:
        assert sd_src[k].dtype == sd_back[k].dtype and torch.equal(sd_src[k], sd_back[k]), k
    assert [p.requires_grad for p in src.parameters()] == [p.requires_grad for p in back.parameters()]
    text_only = {"text_ids": _batch()["text_ids"].masked_fill(_batch()["text_ids"] >= 384, 5)}
    with torch.no_grad():     # equal tensors, so equal outputs; this checks nothing outside the state dict differs
        assert torch.equal(back.text_logits(text_only), src.text_logits(text_only))


def test_save_pretrained_in_bfloat16_keeps_the_vae_in_float32(tmp_path, tiny_mmi):
    """save_pretrained(dtype=bf16) (the demo export): every floating tensor is stored as the bf16 cast of the
    model's, except the VAE's (it always runs in float32), and from_pretrained keeps the stored dtypes."""
    tiny_mmi.save_pretrained(str(tmp_path / "ckpt"), dtype=torch.bfloat16)
    back = mmi.MMInterleaved.from_pretrained(str(tmp_path / "ckpt")).state_dict()
    for k, t in tiny_mmi.state_dict().items():
        if not t.is_floating_point():
            assert torch.equal(back[k], t), k
        elif k.startswith("image_decoder.decoder.vae."):
            assert back[k].dtype == torch.float32 and torch.equal(back[k], t), k
        else:
            assert back[k].dtype == torch.bfloat16 and torch.equal(back[k], t.to(torch.bfloat16)), k


class _Parts(torch.nn.Module):
    """float32 tensors of the given element counts, in this order, and the tiny config save_pretrained writes."""

    def __init__(self, counts):
        super().__init__()
        self.cfg = TINY
        for name, n in counts.items():
            self.register_parameter(name, torch.nn.Parameter(torch.arange(n, dtype=torch.float32)))


def test_save_pretrained_fills_each_shard_up_to_the_limit_in_order(tmp_path):
    """Tensors go into shards in state-dict order, a new shard starting only where the next tensor would take the
    shard past max_shard_bytes (one larger than that sits alone): bytes 1200 | 400 200 100 (700, the limit
    exactly) | 40 40. The shards are named model-0000i-of-0000n as transformers names them; the index maps
    each key to its shard and gives the total size in bytes; the folder holds nothing else."""
    parts = _Parts({"d": 300, "a": 100, "b": 50, "c": 25, "e": 10, "f": 10})
    mmi.write_pretrained(parts, str(tmp_path / "out"), max_shard_bytes=700)
    names = [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert sorted(os.listdir(tmp_path / "out")) == sorted(names + ["config.json", "model.safetensors.index.json"])
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert index["metadata"] == {"total_size": 4 * (300 + 100 + 50 + 25 + 10 + 10)}
    assert index["weight_map"] == {"d": names[0], "a": names[1], "b": names[1], "c": names[1], "e": names[2],
                                   "f": names[2]}
    for name in names:
        tensors = load_file(tmp_path / "out" / name)
        assert sorted(tensors) == sorted(k for k, f in index["weight_map"].items() if f == name)
        assert all(torch.equal(t, getattr(parts, k)) for k, t in tensors.items())


def test_save_pretrained_copies_extra_files_under_their_given_names(tmp_path, tiny_mmi):
    """extra_files {name: source}: each source's bytes saved as `name` in the model folder (the tokenizer files
    train.py exports beside the weights), whatever the source is called."""
    (tmp_path / "spm.bin").write_bytes(b"\x00tokenizer\xff")
    tiny_mmi.save_pretrained(str(tmp_path / "out"), extra_files={"tokenizer.model": str(tmp_path / "spm.bin")})
    assert (tmp_path / "out" / "tokenizer.model").read_bytes() == b"\x00tokenizer\xff"
    assert not (tmp_path / "out" / "spm.bin").exists()


def test_a_save_that_fails_leaves_the_previous_model_and_nothing_else(tmp_path, tiny_mmi, monkeypatch):
    """A save that stops while writing (a full disk, Ctrl-C) passes its error on and leaves the folder as it was:
    the previous model, no half-written folder beside it."""
    path = tmp_path / "model"
    tiny_mmi.save_pretrained(str(path))
    before = {f: (path / f).read_bytes() for f in os.listdir(path)}
    for error in (OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()):
        def fail(tensors, file, metadata=None):
            with open(file, "wb") as f:
                f.write(b"\0" * 100)                            # half written
            raise error
        with monkeypatch.context() as m:
            m.setattr(mmi, "save_file", fail)
            with pytest.raises(type(error)):
                tiny_mmi.save_pretrained(str(path))
        assert os.listdir(tmp_path) == ["model"], error
        assert {f: (path / f).read_bytes() for f in os.listdir(path)} == before


def test_a_save_after_one_killed_between_its_renames_keeps_a_whole_model(tmp_path, monkeypatch):
    """A save killed between its two renames leaves path.mmi-old (the previous model) and a complete
    path.mmi-new. The next save first puts the previous model back at path: killed before each of those first
    steps in turn (renaming it back, removing mmi-new), it leaves the previous model at path; not killed, its
    own model and nothing else."""
    torch.manual_seed(0)
    model = mmi.MMInterleaved(TINY)
    state = tmp_path / "state"
    assert _save_killed_at(model, str(state / "model"), 1, 10 ** 6, monkeypatch)
    assert not _save_killed_at(model, str(state / "model"), 2, 2, monkeypatch)   # a shard, one rename, killed
    assert sorted(os.listdir(state)) == ["model.mmi-new", "model.mmi-old"]
    for k in (0, 1, 2, 10 ** 6):
        path = tmp_path / f"killed_at_{k}" / "model"
        shutil.copytree(state, path.parent)
        finished = _save_killed_at(model, str(path), 3, k, monkeypatch)
        assert finished == (k == 10 ** 6) and _saved_version(str(path)) == (3 if finished else 1), k
    assert os.listdir(path.parent) == ["model"]


def test_from_pretrained_refuses_missing_tensors(tmp_path, tiny_mmi):
    src = tiny_mmi
    src.save_pretrained(str(tmp_path / "ckpt"))
    from safetensors.torch import load_file, save_file
    path = tmp_path / "ckpt" / "model.safetensors"
    sd = load_file(path)
    del sd["soi_token"]
    save_file(sd, path)
    with pytest.raises(ValueError, match=r"1 tensors of the model are missing: \['soi_token'\]"):
        mmi.MMInterleaved.from_pretrained(str(tmp_path / "ckpt"))


# ----------------------------------------------------------------------------------------------------------------
# Loading: a Stable Diffusion folder: UNet, VAE (legacy names), scheduler, text encoder + tokenizer for
# neg_prompt_embeds
# ----------------------------------------------------------------------------------------------------------------


def _perturb(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return module.eval()


def _write_sd_folder(root):
    """A tiny stable-diffusion-2-base-like folder: sharded safetensors UNet, a .bin VAE with the legacy attention
    names of SD-2's release, scheduler config, a gelu CLIPTextModel and a CLIP tokenizer."""
    diffusers = pytest.importorskip("diffusers")
    transformers = oracle_transformers()
    unet_cfg, vae_cfg, dec_cfg = TINY.unet, TINY.vae, TINY.image_decoder
    torch.manual_seed(5)
    down = tuple("CrossAttnDownBlock2D" if c else "DownBlock2D" for c in unet_cfg.cross_attn_blocks)
    up = tuple("CrossAttnUpBlock2D" if c else "UpBlock2D" for c in unet_cfg.cross_attn_blocks[::-1])
    unet = _perturb(diffusers.UNet2DConditionModel(
        sample_size=unet_cfg.sample_size, down_block_types=down, up_block_types=up,
        block_out_channels=unet_cfg.block_out_channels, layers_per_block=unet_cfg.layers_per_block,
        cross_attention_dim=unet_cfg.cross_attention_dim, attention_head_dim=unet_cfg.num_attention_heads,
        use_linear_projection=True, norm_num_groups=unet_cfg.norm_num_groups), 6)
    unet.save_pretrained(root / "unet", max_shard_size="60KB")
    n = len(vae_cfg.block_out_channels)
    vae = _perturb(diffusers.AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=vae_cfg.block_out_channels, layers_per_block=vae_cfg.layers_per_block,
        norm_num_groups=vae_cfg.norm_num_groups), 7)
    vae.save_config(root / "vae")
    legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    sd = {}
    for k, v in vae.state_dict().items():
        for new, old in legacy.items():
            k = k.replace(f"attentions.0.{new}.", f"attentions.0.{old}.")
        sd[k] = v
    assert "decoder.mid_block.attentions.0.query.weight" in sd
    torch.save(sd, root / "vae" / "diffusion_pytorch_model.bin")
    diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                            steps_offset=1).save_pretrained(root / "scheduler")
    # SD-2's text encoder is a gelu CLIPTextModel; its width = the UNet's cross-attention width, and the
    # tokenizer pads to the image-side resampler's query count (77 in SD-2, 8 here)
    torch.manual_seed(8)
    text = _perturb(transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=20, hidden_size=dec_cfg.resampler.hidden_size, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=dec_cfg.resampler.num_queries, hidden_act="gelu",
        bos_token_id=18, eos_token_id=19, pad_token_id=0)), 9)
    text.save_pretrained(root / "text_encoder")
    os.makedirs(root / "tok_src")
    vocab = {c: i for i, c in enumerate("!abcdefghijklmnopq")}
    vocab.update({"<|startoftext|>": 18, "<|endoftext|>": 19})
    (root / "tok_src" / "vocab.json").write_text(json.dumps(vocab))
    (root / "tok_src" / "merges.txt").write_text("#version: 0.2\n")
    tok = transformers.CLIPTokenizer(str(root / "tok_src" / "vocab.json"), str(root / "tok_src" / "merges.txt"),
                                     pad_token="!", model_max_length=dec_cfg.resampler.num_queries)
    tok.save_pretrained(root / "tokenizer")
    return root, unet, vae, text, tok


def test_empty_prompt_token_ids_match_clip_tokenizer(originals):
    root, _, _, _, tok = originals[3]
    ref = tok([""], padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids
    assert torch.equal(mmi.clip_text_token_ids(str(root / "tokenizer")), ref)
    assert ref[0, :3].tolist() == [18, 19, 0]            # bos, eos, then pad ("!")


def test_clip_text_encoder_forward_matches_transformers(originals):
    _, _, _, text, _ = originals[3]
    ids = torch.randint(0, 20, (2, 8), generator=torch.Generator().manual_seed(10))
    weights = {k[len("text_model."):]: v for k, v in text.state_dict().items() if not k.endswith("position_ids")}
    encoder = mmi.clip_text_transformer_from_config(text.config.to_dict())
    encoder.load_state_dict(weights)
    with torch.no_grad():
        ref = text(ids).last_hidden_state
        ours = encoder(ids)
    assert (ours - ref).abs().max() < 1e-5


def test_sd_folder_loads_and_matches_diffusers(originals, loaded):
    """UNet (sharded safetensors) and VAE (.bin, legacy attention names) equal diffusers' outputs; neg_prompt_embeds
    equals the text encoder's output for the empty prompt; the noise schedule comes from the scheduler config."""
    _, _, _, (sd, unet, vae, text, tok) = originals
    model = loaded
    counts = model.load_report["counts"]
    assert counts["unet"] == (len(unet.state_dict()), 0, 0)      # (read, ignored, superseded by mmi)
    assert counts["vae"] == (len(vae.state_dict()), 0, 0)
    dec = model.image_decoder.eval()
    g = torch.Generator().manual_seed(11)
    x, cond = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 8, 32, generator=g)
    t = torch.tensor([3, 917])
    with torch.no_grad():
        assert (dec.decoder.unet(x, t, cond) - unet(x, t, cond).sample).abs().max() < 1e-4
        assert (dec.decoder.vae.decode(x) - vae.decode(x).sample).abs().max() < 1e-4
        ids = tok([""], padding="max_length", max_length=8, return_tensors="pt").input_ids
        assert (dec.neg_prompt_embeds - text(ids).last_hidden_state).abs().max() < 1e-5
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.DDPMScheduler.from_pretrained(str(sd / "scheduler")).alphas_cumprod
    assert torch.equal(dec.decoder.alphas_cumprod, ref)
    mmfs = dec.decoder.mmfs_module.mmfs_down_blocks[0]
    assert not mmfs.conv.weight.any() and mmfs.pos_embed.abs().sum() > 0      # new: zero conv, sin-cos table


@pytest.mark.parametrize("change", ["missing_tensor", "other_width"])
def test_sd_text_encoder_that_does_not_fit_is_one_line(originals, tmp_path, change):
    """neg_prompt_embeds is SD's text encoder output for "": an encoder lacking a tensor (it would run with its
    init), or one whose width is not the UNet's cross-attention width (its output would not fit
    neg_prompt_embeds), is refused in one line naming the folder, before the other folders' weights are read."""
    root, _, _, (sd, _, _, text, _) = originals
    shutil.copytree(sd, tmp_path / "sd")
    folder = tmp_path / "sd" / "text_encoder"
    if change == "missing_tensor":
        weights = load_file(folder / "model.safetensors")
        del weights["text_model.final_layer_norm.weight"]
        save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
        message = rf"^{re.escape(str(folder))}: not a CLIP text encoder: missing \['final_layer_norm\.weight'\]"
    else:
        config = copy.deepcopy(text.config)
        config.hidden_size = 16
        torch.manual_seed(0)
        oracle_transformers().CLIPTextModel(config).save_pretrained(folder)
        message = rf"^{re.escape(str(folder))}: output for the empty prompt has shape \[1, 8, 16\], expected " \
                  rf"\[1, 8, 32\] \(neg_prompt_embeds\)$"
    with pytest.raises(mmi.InputError, match=message):
        mmi.MMInterleaved.from_original(llm=str(root / "llm-safetensors"), clip=str(root / "clip-safetensors"),
                                        sd=str(tmp_path / "sd"), cfg=TINY)


def test_mmi_checkpoint_overlays_the_image_decoder_too(originals, tmp_path):
    """With the decoder, a full checkpoint (neg_prompt_embeds included) wins everywhere and the text encoder is
    not needed; the round trip through our format keeps the decoder."""
    root, _, _, _ = originals
    src = _perturb(_load(root), 12)
    _write_mmi_checkpoint(src, tmp_path / "mmi")
    model = _load(root, mmi=str(tmp_path / "mmi"))
    loaded = model.state_dict()
    for k, v in src.state_dict().items():
        assert torch.equal(loaded[k], v), k
    model.save_pretrained(str(tmp_path / "ours"))
    back = mmi.MMInterleaved.from_pretrained(str(tmp_path / "ours"))
    assert back.image_decoder.decoder.alphas_cumprod.device.type == "cpu"
    back_sd = back.state_dict()
    for k, v in src.state_dict().items():
        assert torch.equal(back_sd[k], v), k


@cuda_only
def test_our_files_and_a_checkpoint_load_straight_onto_cuda(tmp_path, tiny_mmi):
    """from_pretrained and from_original (a checkpoint alone) with device='cuda' and bf16: every parameter and
    buffer on the GPU, each equal to the saved one cast to bf16 (integers keep their dtype)."""
    tiny_mmi.save_pretrained(str(tmp_path / "ours"))
    _write_mmi_checkpoint(tiny_mmi, tmp_path / "mmi")
    for model in (mmi.MMInterleaved.from_pretrained(str(tmp_path / "ours"), torch.bfloat16, "cuda"),
                  mmi.MMInterleaved.from_original(mmi=str(tmp_path / "mmi"), dtype=torch.bfloat16, device="cuda",
                                                  cfg=TINY)):
        assert {t.device.type for t in list(model.parameters()) + list(model.buffers())} == {"cuda"}
        state = model.state_dict()
        for k, t in tiny_mmi.state_dict().items():
            assert torch.equal(state[k].cpu(), t.to(torch.bfloat16) if t.is_floating_point() else t), k


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_loads_straight_onto_cuda_in_bfloat16(originals, loaded):
    """Tensors go from the mapped files to the GPU in the target dtype; nothing is left on the CPU or on meta
    (the schedule table stays on the CPU by design)."""
    model = _load(originals[0], dtype=torch.bfloat16, device="cuda")
    assert {t.device.type for t in list(model.parameters()) + list(model.buffers())} == {"cuda"}
    ref = loaded.state_dict()
    for k, v in model.state_dict().items():
        if "llama_cross_attn" in k or k.startswith(("visual_tokenizer.perceiver", "image_decoder.perceiver",
                                                     "image_decoder.decoder.mmfs_module", "context_feat_proj",
                                                     "visual_tokenizer.encoder.vision_model.adapter",
                                                     "visual_tokenizer.pos_proj", "visual_tokenizer.proj")):
            continue                                  # new parts: random init, different draws
        if k == "mm_decoder.embed_tokens.weight":
            v, ref[k] = v[:-2], ref[k][:-2]
        assert torch.equal(v.cpu(), ref[k].to(v.dtype)), k


def test_scheduler_config_is_checked(tmp_path):
    path = tmp_path / "scheduler_config.json"
    path.write_text(json.dumps({"beta_start": 0.00085, "beta_end": 0.012}))     # diffusers' default: "linear"
    with pytest.raises(ValueError, match=r"beta_schedule is 'linear', the decoder supports only 'scaled_linear'"):
        mmi.schedule_config_from_diffusers(str(path))
    path.write_text(json.dumps({"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
                                "steps_offset": 1}))
    assert mmi.schedule_config_from_diffusers(str(path)) == dict(num_train_timesteps=1000, beta_start=0.00085,
                                                               beta_end=0.012, steps_offset=1,
                                                               prediction_type="epsilon")
    path.write_text(json.dumps({"beta_schedule": "scaled_linear", "prediction_type": "v_prediction"}))
    assert mmi.schedule_config_from_diffusers(str(path))["prediction_type"] == "v_prediction"
    path.write_text(json.dumps({"beta_schedule": "scaled_linear", "prediction_type": "sample"}))
    with pytest.raises(ValueError, match=r"prediction_type is 'sample', expected one of 'epsilon', 'v_prediction'$"):
        mmi.schedule_config_from_diffusers(str(path))


# ----------------------------------------------------------------------------------------------------------------
# Loading: bad input: a broken model folder, a config that does not fit, an interrupted save; mmi.py's
# command line
# ----------------------------------------------------------------------------------------------------------------


class _Killed(BaseException):
    """A simulated kill: raised instead of a file operation, and of every one after it (the process is gone)."""


def _save_killed_at(model, path, version, kill_at, monkeypatch):
    """write_pretrained of `model` with soi_token = version, killed before its file operation number `kill_at`
    (writing a shard, a rename, a removal; a killed removal or write leaves its work half done).
    -> True if it finished."""
    with torch.no_grad():
        model.soi_token.fill_(version)
    ops = []

    def killable(real):
        def op(*args, **kw):
            ops.append(real.__name__)
            if len(ops) <= kill_at:
                return real(*args, **kw)
            if len(ops) == kill_at + 1 and real is shutil.rmtree and os.listdir(args[0]):
                os.remove(os.path.join(args[0], sorted(os.listdir(args[0]))[0]))      # half removed
            if len(ops) == kill_at + 1 and real is mmi.save_file:
                with open(args[1], "wb") as f:                                       # half written
                    f.write(b"\0" * 100)
            raise _Killed
        return op

    with monkeypatch.context() as m:
        for module, name in [(os, "replace"), (shutil, "rmtree"), (mmi, "save_file")]:
            m.setattr(module, name, killable(getattr(module, name)))
        try:
            mmi.write_pretrained(model, path)
            return True
        except _Killed:
            return False


def _saved_version(path):
    return mmi.MMInterleaved.from_pretrained(path).soi_token.flatten()[0].item()


def test_save_pretrained_killed_at_any_step_leaves_a_whole_model(tmp_path, monkeypatch, capsys):
    """save_pretrained over a model, killed before each of its file operations in turn: the path then loads as
    the previous model or the new one, and the next save, killed or not, starts from what was left."""
    torch.manual_seed(0)
    model = mmi.MMInterleaved(TINY)
    path = str(tmp_path / "model")
    assert _save_killed_at(model, path, 1, 10 ** 6, monkeypatch)
    # from a clean start: killed at step k, then a save that finishes and leaves nothing else behind
    k = 0
    while not _save_killed_at(model, path, 2, k, monkeypatch):
        assert _saved_version(path) in (1, 2), k
        assert _save_killed_at(model, path, 1, 10 ** 6, monkeypatch) and os.listdir(tmp_path) == ["model"]
        k += 1
    assert k == 4                                # a shard, two renames, a removal
    # each save starts from the previous one's remains and is killed one step later, until one finishes
    last, version = 2, 10
    for k in range(20):
        version += 1
        finished = _save_killed_at(model, path, version, k, monkeypatch)
        got = _saved_version(path)
        assert got in (last, version), (k, got)
        last = got
        if finished:
            break
    assert finished and last == version and os.listdir(tmp_path) == ["model"]
    assert "reading the previous model" in capsys.readouterr().err      # the state between the two renames was seen


@pytest.fixture(scope="module")
def pretrained_tiny(tmp_path_factory):
    """A tiny model saved with save_pretrained, once; tests corrupt copies of it."""
    path = tmp_path_factory.mktemp("pretrained") / "model"
    torch.manual_seed(0)
    mmi.MMInterleaved(TINY).save_pretrained(str(path))
    return path


def _safetensors_parts(path):
    raw = open(path, "rb").read()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _write_safetensors_parts(path, header, data):
    text = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text + data)


def _truncate(path, size):
    with open(path, "r+b") as f:
        f.truncate(size if size >= 0 else os.path.getsize(path) + size)


def _set_header_length(path, n):
    """The 8-byte little-endian header length of a safetensors file set to n, the rest kept."""
    raw = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(n.to_bytes(8, "little") + raw[8:])


def _rename_key(path, old, new):
    header, data = _safetensors_parts(path)
    header[new] = header.pop(old)
    _write_safetensors_parts(path, header, data)


def _edit_config(folder, edit):
    d = json.loads((folder / "config.json").read_text())
    edit(d)
    (folder / "config.json").write_text(json.dumps(d))


def _bin_with_an_object(folder):
    os.remove(folder / "model.safetensors")
    torch.save({"soi_token": torch.zeros(1, 64), "evil": _NotATensor()}, folder / "pytorch_model.bin")


def _index_naming_a_missing_shard(folder):
    header, _ = _safetensors_parts(folder / "model.safetensors")
    weight_map = {k: "model.safetensors" for k in header if k != "__metadata__"}
    weight_map["soi_token"] = "model-00002-of-00002.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


ST = "model.safetensors"


@pytest.mark.parametrize("file, corrupt, message", [
    (ST, lambda f: _truncate(f / ST, -1000), r"key '[\w.]+': data_offsets \[\d+, \d+\] outside the \d+ data bytes"),
    (ST, lambda f: _truncate(f / ST, 5), r"not a safetensors file \(header length -1, file size 5 bytes"),
    (ST, lambda f: _set_header_length(f / ST, os.path.getsize(f / ST) - 7),     # 1 byte past the end of the file
     r"not a safetensors file \(header length \d+, file size \d+ bytes"),
    (ST, lambda f: (f / ST).write_bytes((2 ** 40).to_bytes(8, "little") + (f / ST).read_bytes()[8:]),
     r"not a safetensors file \(header length 1099511627776"),
    (ST, lambda f: (f / ST).write_bytes((f / ST).read_bytes()[:8] + b"\xff" * 9 + (f / ST).read_bytes()[17:]),
     r"safetensors header is not valid JSON"),
    (ST, lambda f: _rewrite_safetensors_header(f / ST, "soi_token", data_offsets=[0, 10 ** 9]),
     r"key 'soi_token': data_offsets \[0, 1000000000\] outside the \d+ data bytes"),
    (ST, lambda f: _rewrite_safetensors_header(f / ST, "soi_token", shape=[1, 65]),
     r"key 'soi_token': data_offsets \[\d+, \d+\] span 256 bytes, shape \[1, 65\] of F32 needs 260"),
    (ST, lambda f: _rewrite_safetensors_header(f / ST, "soi_token", shape=[64, 1]),
     r"key 'soi_token' has shape \[64, 1\], expected \[1, 64\]"),
    (ST, lambda f: _rewrite_safetensors_header(f / ST, "soi_token", dtype="I32"),
     r"key 'soi_token' holds torch.int32, expected a floating-point tensor"),
    (ST, lambda f: _rename_key(f / ST, "soi_token", "soi_tokem"), r"unknown key 'soi_tokem' \(shape \[1, 64\]\)"),
    ("config.json", lambda f: _edit_config(f, lambda d: d["llm"].update(rms_norm_eps="tiny")),
     r"key 'llm.rms_norm_eps': expected float, got 'tiny'"),
    ("config.json", lambda f: _edit_config(f, lambda d: d.pop("llm")), r"missing key 'llm'"),
    ("config.json", lambda f: _edit_config(f, lambda d: d["llm"].update(extra=1)), r"unknown config key 'llm.extra'"),
    ("config.json", lambda f: _edit_config(f, lambda d: d.update(image_decoder=[])),
     r"image_decoder is a list, expected an object of the ImageDecoderConfig keys"),
    ("config.json", lambda f: _edit_config(f, lambda d: d["llm"].update(vocab_size=100)),
     r"soi/image ids 384/385 must be the last two of vocab_size 100"),
    ("config.json", lambda f: _edit_config(f, lambda d: d["vision"].update(patch_size=0)),
     r"config key 'vision.patch_size': 0, every integer must be >= 1"),
    ("config.json", lambda f: (f / "config.json").write_text('{"vision": '), r"not valid JSON"),
    ("config.json", lambda f: os.remove(f / "config.json"), r"file not found"),
    ("pytorch_model.bin", _bin_with_an_object,
     r"refused by torch.load\(weights_only=True, mmap=True\): Unsupported global: GLOBAL test_mmi._NotATensor"),
    ("model.safetensors.index.json", _index_naming_a_missing_shard,
     r"names shard 'model-00002-of-00002.safetensors', which is missing"),
    ("", lambda f: os.remove(f / ST), r"no weights found \(looked for model.safetensors.index.json"),
    (ST, lambda f: (os.remove(f / ST), os.mkdir(f / ST)), r"model.safetensors: not a file, expected the weights$"),
    (ST, lambda f: save_file({**load_file(f / ST), "soi_token": torch.full((1, 64), math.nan)}, f / ST),
     r"key 'soi_token' holds NaN or infinite values; expected finite weights"),
], ids=["truncated", "truncated_into_the_length", "header_length_past_the_end", "absurd_header_length",
        "header_not_json", "offsets_beyond_file",
        "shape_not_offsets", "shape_not_the_models", "integer_dtype", "unknown_key", "mistyped_value",
        "missing_section", "unknown_config_key", "section_not_an_object", "inconsistent_config", "zero_size",
        "config_not_json", "no_config", "pickled_object", "missing_shard", "no_weights",
        "weights_a_folder", "nan_weight"])
def test_broken_model_folder_is_one_line_naming_the_file(pretrained_tiny, tmp_path, file, corrupt, message):
    folder = tmp_path / "model"
    shutil.copytree(pretrained_tiny, folder)
    corrupt(folder)
    with pytest.raises(mmi.InputError) as e:
        mmi.MMInterleaved.from_pretrained(str(folder))
    text = str(e.value)
    assert text.startswith(str(folder / file)) and len(text.splitlines()) == 1, text
    assert re.search(message, text), text


def test_from_pretrained_names_a_missing_or_non_folder_path(tmp_path):
    with pytest.raises(mmi.InputError, match=re.escape(f"{tmp_path / 'none'}: no such folder")):
        mmi.MMInterleaved.from_pretrained(str(tmp_path / "none"))
    (tmp_path / "file").write_text("")
    with pytest.raises(mmi.InputError, match=re.escape(f"{tmp_path / 'file'}: not a folder")):
        mmi.MMInterleaved.from_pretrained(str(tmp_path / "file"))
    (tmp_path / "ckpt_00000002").mkdir()                           # what train.py's checkpoints hold
    (tmp_path / "ckpt_00000002" / "config.json").write_text(json.dumps({"train": {}, "model": {}}))
    (tmp_path / "ckpt_00000002" / "rank0.pt").write_bytes(b"")
    for load in (mmi.MMInterleaved.from_pretrained, lambda p: ev.find_tokenizer(None, p)):   # eval.py looks first
        with pytest.raises(mmi.InputError, match=re.escape(f"{tmp_path / 'ckpt_00000002'}: a training checkpoint of "
                                                           f"train.py, not a model folder: continue training from")):
            load(str(tmp_path / "ckpt_00000002"))


def test_sample_on_a_broken_model_ends_with_one_line_and_exit_2(pretrained_tiny, tmp_path, capsys):
    folder = tmp_path / "model"
    shutil.copytree(pretrained_tiny, folder)
    _truncate(folder / ST, -1000)
    code = mmi.run_script(sample.main, [f"--init_from={folder}", f"--out={tmp_path / 'out'}", "--device=cpu"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert f"error: {folder / ST}: key " in err and "outside the" in err
    assert not os.path.exists(tmp_path / "out")


def test_original_config_files_are_type_checked_naming_the_file(tmp_path):
    """from_original reads the released parts' config.json files before any weights: a wrong type or a missing
    key is refused naming the file and the key."""
    for name, config in [("llm", {"hidden_size": 64, "num_attention_heads": 4}), ("clip", {"vision_config": {}}),
                         ("sd/unet", {"sample_size": 8}), ("sd/vae", {})]:
        os.makedirs(tmp_path / name)
        (tmp_path / name / "config.json").write_text(json.dumps(config))
    kw = dict(llm=str(tmp_path / "llm"), clip=str(tmp_path / "clip"), sd=str(tmp_path / "sd"), cfg=TINY)
    with pytest.raises(mmi.InputError, match=re.escape(f"{tmp_path / 'sd' / 'unet' / 'config.json'}: no "
                                                       f"'block_out_channels'")):
        mmi.MMInterleaved.from_original(**kw)
    (tmp_path / "llm" / "config.json").write_text(json.dumps({"hidden_size": "64"}))
    with pytest.raises(mmi.InputError, match=re.escape(f"{tmp_path / 'llm' / 'config.json'}: 'hidden_size': "
                                                       f"expected int, got '64'")):
        mmi.MMInterleaved.from_original(**kw)
    (tmp_path / "llm" / "config.json").write_text("[]")
    with pytest.raises(mmi.InputError, match=re.escape(f"{tmp_path / 'llm' / 'config.json'}: holds a JSON list, "
                                                       f"expected an object")):
        mmi.MMInterleaved.from_original(**kw)


def test_from_original_names_a_missing_folder(tmp_path):
    os.makedirs(tmp_path / "llm")
    with pytest.raises(mmi.InputError, match=re.escape(f"{tmp_path / 'clip'}: no such folder (given as the clip")):
        mmi.MMInterleaved.from_original(llm=str(tmp_path / "llm"), clip=str(tmp_path / "clip"), cfg=TINY)


def test_from_original_without_a_checkpoint_needs_both_vicuna_and_clip(tmp_path):
    """Without mmi=, llm= and clip= are both needed: one alone is one line saying what to give, before any file
    of it is read."""
    os.makedirs(tmp_path / "folder")
    for given in ("llm", "clip"):
        with pytest.raises(mmi.InputError, match=r"^from_original: give mmi= \(an MM-Interleaved checkpoint folder\), "
                                                 r"or llm= and clip= \(the Vicuna and CLIP folders\)$"):
            mmi.MMInterleaved.from_original(cfg=TINY, **{given: str(tmp_path / "folder")})


def test_config_from_dict_checks_types_sections_and_keys():
    d = TINY.to_dict()
    assert mmi.MMIConfig.from_dict(d, "c.json") == TINY
    d["llm"]["rope_theta"] = 10000                                   # an int may stand for a float
    assert mmi.MMIConfig.from_dict(d, "c.json").llm.rope_theta == 10000.0
    d["unet"]["cross_attn_blocks"] = [True, False]                     # a list for a tuple
    assert mmi.MMIConfig.from_dict(d, "c.json").unet.cross_attn_blocks == (True, False)
    d["vision"]["trainable"] = 1
    with pytest.raises(mmi.InputError, match=r"^c.json: key 'vision.trainable': expected bool, got 1$"):
        mmi.MMIConfig.from_dict(d, "c.json")
    del d["vision"]["trainable"], d["seq_len"]
    with pytest.raises(mmi.InputError, match=r"^c.json: missing key 'seq_len' \(a folder written by"):
        mmi.MMIConfig.from_dict(d, "c.json")


def test_mmi_py_help_lists_presets_and_every_config_key(capsys):
    assert mmi.run_script(mmi.main, ["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python mmi.py [preset] [--key=value ...]") and "--key=value" in out
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()[out.splitlines().index(
        "config keys, with their type and their value in each preset:") + 2:]}
    assert list(rows) == [k for k, _ in mmi._config_rows(TINY)]
    assert rows["llm.hidden_size"] == ["int", "5120", "64"] and rows["llm.rms_norm_eps"] == ["float", "1e-06", "1e-06"]


@pytest.mark.parametrize("argv, message", [
    (["nope"], r"unknown preset 'nope'; expected one of \['mmi-13b', 'tiny'\]"),
    (["tiny", "--llm.hidden_sise=3"], r"unknown config key 'llm.hidden_sise'"),
    (["tiny", "--llm.hidden_size=abc"], r"config key 'llm.hidden_size': cannot read 'abc' as int"),
    (["tiny", "llm.hidden_size"], r"override 'llm.hidden_size': expected key=value"),
    (["tiny", "--vision.patch_size=0"], r"config key 'vision.patch_size': 0, every integer must be >= 1"),
    (["tiny", "--vision.cffn_ratio=inf"], r"config key 'vision.cffn_ratio': inf, expected a finite number"),
    (["tiny", "--vision.deform_ratio=nan"], r"config key 'vision.deform_ratio': nan, expected a finite number"),
    (["tiny", "--llm.rms_norm_eps=nan"], r"config key 'llm.rms_norm_eps': nan, expected a finite number"),
    (["tiny", "--llm.num_attention_heads=5"], r"llm.hidden_size is 64, not a multiple of llm.num_attention_heads 5"),
    (["tiny", "--image_decoder.prediction_type=x0"],
     r"'image_decoder.prediction_type': 'x0', expected one of 'epsilon', 'v_prediction'"),
    (["tiny", "--image_decoder.snr_gamma=-1"], r"'image_decoder.snr_gamma': -1.0, expected >= 0 \(0 = off\)"),
    (["tiny", "--vision.interaction_indexes=((0, 0), (1, 1))"],
     r"vision: interaction_indexes has 2 blocks \(\(0, 0\), \(1, 1\)\), expected 4 \(first, last ViT layer\) pairs"),
    (["tiny", "--image_decoder.beta_start=2.0"], r"'image_decoder.beta_start': 2.0, expected 0 < beta < 1"),
    (["tiny", "--image_decoder.beta_end=0"], r"'image_decoder.beta_end': 0.0, expected 0 < beta < 1"),
    # widths that do not split into their heads or groups (each a shape error or NaN deep inside a step before)
    (["tiny", "--vision.num_attention_heads=5"],
     r"vision.hidden_size is 64, not a multiple of vision.num_attention_heads 5$"),
    (["tiny", "--vision.deform_ratio=0.3"],
     r"vision.hidden_size x vision.deform_ratio 0.3 is 19, not a multiple of vision.adapter_num_heads 4"),
    (["tiny", "--vision.cffn_ratio=0.001"],
     r"vision.hidden_size 64 x vision.cffn_ratio 0.001 is the ConvFFN's width, expected at least 1"),
    (["tiny", "--resampler.num_attention_heads=5"],
     r"resampler.hidden_size is 48, not a multiple of resampler.num_attention_heads 5"),
    (["tiny", "--image_decoder.resampler.num_attention_heads=5"],
     r"image_decoder.resampler.hidden_size is 32, not a multiple of image_decoder.resampler.num_attention_heads 5"),
    (["tiny", "--unet.norm_num_groups=7"], r"unet.block_out_channels\[0\] is 32, not a multiple of unet.norm_num_groups 7"),
    (["tiny", "--vae.norm_num_groups=7"], r"vae.block_out_channels\[0\] is 16, not a multiple of vae.norm_num_groups 7"),
    (["tiny", "--vae.latent_channels=3"],
     r"unet.in_channels 4 and unet.out_channels 4 must equal vae.latent_channels 3"),
])
def test_mmi_py_bad_preset_or_override_is_one_line_and_exit_2(argv, message, capsys):
    assert mmi.run_script(mmi.main, argv) == 2
    out, err = capsys.readouterr()
    assert not out and len(err.strip().splitlines()) == 1 and re.search(message, err), err


class _RefusingDataset(torch.utils.data.IterableDataset):
    def __iter__(self):
        raise mmi.InputError("annt.json[3]: field 'image' is missing")


def test_a_mistake_found_in_a_data_loader_worker_is_one_line(capsys):
    """An InputError raised in a DataLoader worker reaches the main process wrapped with the worker's traceback;
    run_script still prints the worker's one line."""
    def main(argv):
        batches = iter(torch.utils.data.DataLoader(_RefusingDataset(), batch_size=None, num_workers=1))
        try:
            for _ in batches:
                pass
        finally:            # the error's traceback keeps the loader: its worker stops here, not in a later GC
            batches._shutdown_workers()
    assert mmi.run_script(main, []) == 2
    err = capsys.readouterr().err
    assert err.endswith(": error: annt.json[3]: field 'image' is missing\n") and err.count("\n") == 1, err


def test_running_out_of_memory_is_one_line_naming_the_size(capsys):
    """Settings too big for the machine (e.g. --num_beams=100000) fail at an allocation: one line with what was asked
    for, exit 2; any other RuntimeError is a bug and keeps its traceback."""
    assert mmi.run_script(lambda argv: torch.empty(2**61, dtype=torch.uint8), []) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and ": error: out of memory (tried to allocate 2147483648.0 GiB on the CPU);" in err, err

    def cuda_oom(argv):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of "
                                     "23.5 GiB of which 1.1 GiB is free. Including non-PyTorch memory, this process\n"
                                     "has 22.4 GiB memory in use.")
    assert mmi.run_script(cuda_oom, []) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and ("out of memory (CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total "
                                     "capacity of 23.5 GiB of which 1.1 GiB is free.);") in err, err
    with pytest.raises(RuntimeError, match="must match the size of tensor b"):
        mmi.run_script(lambda argv: torch.zeros(2) + torch.zeros(3), [])


def test_ctrl_c_and_sigterm_are_one_line_exit_130_after_the_scripts_cleanup(capsys):
    """Ctrl-C and SIGTERM both end a script with "interrupted" and exit code 130, after its `finally` blocks ran (where
    eval.py keeps its predictions so far); run_script puts the SIGTERM handler it found back."""
    cleaned, before = [], signal.getsignal(signal.SIGTERM)

    def main(sig):
        try:
            if sig is None:
                raise KeyboardInterrupt
            os.kill(os.getpid(), sig)
            time.sleep(10)                      # the handler interrupts this
        finally:
            cleaned.append(sig)
    for sig in (None, signal.SIGTERM):
        assert mmi.run_script(main, sig) == 130
        assert capsys.readouterr().err.endswith(": interrupted\n")
    assert cleaned == [None, signal.SIGTERM] and signal.getsignal(signal.SIGTERM) is before


def test_mmi_py_bad_override_as_a_process_is_one_line_and_exit_2():
    """The script as run: a bad override is one line on stderr, exit 2, no traceback."""
    run = subprocess.run([sys.executable, os.path.join(HERE, "mmi.py"), "tiny", "--llm.hidden_size=abc"],
                         capture_output=True, text=True, cwd=HERE)
    assert run.returncode == 2 and not run.stdout, run.stderr
    assert run.stderr == "mmi.py: error: config key 'llm.hidden_size': cannot read 'abc' as int\n"


# ----------------------------------------------------------------------------------------------------------------
# Generation: text decoding (greedy, nucleus sampling, beam search) over a KV cache
# ----------------------------------------------------------------------------------------------------------------


def test_kv_cache_decoding_equals_full_recomputation():
    model = tiny_model()
    cfg = model.cfg
    prompt = make_batch(cfg, [[BOS, 10, "img", 11, 12, "img", 13], [BOS, 14, "img", 15]], 26, left_pad=True)
    forced = torch.tensor([[20, 21, 22, 23], [30, 31, 32, 33]])
    embeds, vision, xmask, _ = model.prepare_mm_embeds(prompt["text_ids"], prompt["image_tensors"],
                                                       prompt["num_image_per_seq"])
    cached = mmi._Decoder(model, embeds, prompt["attention_mask"], vision, xmask, 4, use_cache=True)
    full = mmi._Decoder(model, embeds, prompt["attention_mask"], vision, xmask, 4, use_cache=False)
    with torch.no_grad():
        steps_cached = [cached.prefill()] + [cached.step(forced[:, i]) for i in range(3)]
        steps_full = [full.prefill()] + [full.step(forced[:, i]) for i in range(3)]
        # independently: one forward over prompt + forced tokens, with the normal masks (the forced tokens are
        # ordinary text, so they see the same images as the prompt's last token)
        ids = torch.cat([prompt["text_ids"], forced[:, :3]], dim=1)
        mask = torch.cat([prompt["attention_mask"], torch.ones(2, 3, dtype=torch.long)], dim=1)
        logits = model.text_logits(dict(prompt, text_ids=ids, attention_mask=mask), attention_mask_aware=True)
    for i in range(4):
        torch.testing.assert_close(steps_cached[i], steps_full[i], rtol=0, atol=1e-5)
        torch.testing.assert_close(steps_cached[i], logits[:, 25 + i], rtol=0, atol=1e-5)


def test_greedy_cached_and_batched_equals_one_by_one():
    model = tiny_model(seed=1)
    cfg = model.cfg
    rows = [[BOS, 10, "img", 11, 12, "img", 13], [BOS, 14, "img", 15], [BOS, 16, 17, 18]]
    batch = make_batch(cfg, rows, 24, left_pad=True)
    kw = dict(max_new_tokens=6, min_new_tokens=0, num_beams=1)
    out = model.generate_texts(batch, **kw)
    out_nocache = model.generate_texts(batch, use_cache=False, **kw)
    assert torch.equal(out["text_ids"], out_nocache["text_ids"])
    start = 0
    for i, r in enumerate(rows):
        n = sum(p == "img" for p in r)
        one = make_batch(cfg, [r], len(interleaved_row(cfg, r)))
        one["image_tensors"] = batch["image_tensors"][start:start + n]
        start += n
        single = model.generate_texts(one, **kw)["text_ids"][0]
        assert single.tolist() == out["text_ids"][i, :len(single)].tolist()


def test_generation_stops_at_eos_or_soi_after_min_new_tokens():
    model = tiny_model(seed=2)
    cfg = model.cfg
    with torch.no_grad():                      # make soi the most likely next token everywhere
        model.text_decoder.head_new.bias.fill_(200.0)
    batch = make_batch(cfg, [[BOS, 10, "img", 11]], 14)
    out = model.generate_texts(batch, max_new_tokens=5, min_new_tokens=0, num_beams=1)
    assert out["text_ids"][0].tolist() == [cfg.image_token_id] or out["text_ids"][0].tolist() == [cfg.soi_token_id]
    assert out["text_ids"][0, -1].item() == cfg.soi_token_id or out["text_ids"][0, -1].item() == cfg.image_token_id
    out = model.generate_texts(batch, max_new_tokens=5, min_new_tokens=3, num_beams=1)
    ids = out["text_ids"][0].tolist()
    assert cfg.soi_token_id not in ids[:3] and cfg.eos_token_id not in ids[:3]


def test_beam_search_keeps_the_best_continuations():
    """Fixed-length beam search (no stop token allowed) equals an exhaustive top-K expansion computed here."""
    model = tiny_model(seed=3)
    cfg = model.cfg
    batch = make_batch(cfg, [[BOS, 10, "img", 11]], 14)
    K = 3
    out = model.generate_texts(batch, max_new_tokens=2, min_new_tokens=2, num_beams=K, num_return_sequences=K,
                               length_penalty=0.0)
    with torch.no_grad():
        lp0 = model.text_logits(batch)[0, -1].log_softmax(-1)
        lp0[[cfg.eos_token_id, cfg.soi_token_id]] = -float("inf")
        first = lp0.topk(K)
        cands = []
        for s0, t0 in zip(first.values.tolist(), first.indices.tolist()):
            ids = torch.cat([batch["text_ids"], torch.tensor([[t0]])], dim=1)
            mask = torch.ones_like(ids)
            lp1 = model.text_logits(dict(batch, text_ids=ids, attention_mask=mask))[0, -1].log_softmax(-1)
            lp1[[cfg.eos_token_id, cfg.soi_token_id]] = -float("inf")
            cands += [(s0 + s1, [t0, t1]) for s1, t1 in zip(*lp1.topk(K))]
    best = [seq for _, seq in sorted(cands, key=lambda c: -c[0])[:K]]
    assert [[int(t) for t in s] for s in out["text_ids"].tolist()] == [[int(t) for t in s] for s in best]


def test_nucleus_sampling_is_seeded_and_top_p_keeps_the_nucleus():
    model = tiny_model(seed=4)
    batch = make_batch(model.cfg, [[BOS, 10, "img", 11]], 14)
    kw = dict(max_new_tokens=6, min_new_tokens=0, num_beams=1, do_sample=True, top_p=0.9, repetition_penalty=1.3)
    a = model.generate_texts(batch, seed=7, **kw)["text_ids"]
    b = model.generate_texts(batch, seed=7, **kw)["text_ids"]
    c = model.generate_texts(batch, seed=8, **kw)["text_ids"]
    assert torch.equal(a, b) and not torch.equal(a, c)
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = torch.isfinite(mmi._top_p_filter(logits, 0.8))
    assert kept.tolist() == [[True, True, False, False]]                   # 0.5 + 0.3 reaches 0.8
    kept = torch.isfinite(mmi._top_p_filter(logits, 0.81))
    assert kept.tolist() == [[True, True, True, False]]
    # at the boundary itself (float32 0.5 + 0.3 rounds above 0.8, so above it cannot tell): powers of two, where the
    # mass before the third token is exactly 0.75 = top_p; reaching top_p ends the nucleus (HF: cumsum <= 1 - top_p)
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.125, 0.125]]))
    kept = torch.isfinite(mmi._top_p_filter(logits, 0.75))
    assert kept.tolist() == [[True, True, False, False]]


def test_repetition_penalty_matches_the_hf_rule():
    logits = torch.tensor([[2.0, -1.0, 3.0, 0.5]])
    out = mmi._process_logits(logits, [[2]], step=5, min_new_tokens=0, repetition_penalty=2.0, stop_ids=(3,), bos_id=1)
    assert out.tolist() == [[2.0, -2.0, 1.5, 0.5]]                          # bos (1) and generated (2) penalised
    out = mmi._process_logits(logits, [[2]], step=5, min_new_tokens=0, repetition_penalty=0.5, stop_ids=(3,), bos_id=1)
    assert out.tolist() == [[2.0, -0.5, 6.0, 0.5]]                          # below 1 the same rule favours them


class TableLM:
    """A language model given as a table, in the decoder protocol greedy_or_sample and beam_search drive:
    table[prefix of new tokens] = {token: probability} (tokens not named: probability 0); a prefix not in the
    table: uniform over the vocabulary. Logits are the log-probabilities."""

    def __init__(self, table, vocab, prompts=1):
        self.table, self.vocab, self.rows = table, vocab, [()] * prompts

    def logits(self):
        def row(prefix):
            probs = self.table.get(prefix)
            if probs is None:
                return [-math.log(self.vocab)] * self.vocab
            return [math.log(probs[t]) if probs.get(t, 0) > 0 else -math.inf for t in range(self.vocab)]
        return torch.tensor([row(r) for r in self.rows])

    def prefill(self):
        return self.logits()

    def select(self, index):
        self.rows = [self.rows[i] for i in index.tolist()]

    def step(self, tokens):
        self.rows = [r + (t,) for r, t in zip(self.rows, tokens.tolist())]
        return self.logits()


# token ids of the hand-built tables: PAD, BOS, EOS, SOI as in the checkpoints' order, then ordinary words
T_PAD, T_BOS, T_EOS, T_SOI, T_A, T_B, T_C, T_D = range(8)
TABLE_OPTS = dict(min_new_tokens=0, repetition_penalty=1.0, stop_ids=(T_EOS, T_SOI), bos_id=T_BOS, pad_id=T_PAD)


def test_sampling_warpers_are_temperature_then_top_k_then_top_p():
    """HF generate's order against a float64 re-derivation, on a row where top-k alone keeps 4 tokens, top-p alone
    6, top-p then top-k 4, and top-k then top-p (over the renormalised 4) 3; then 4,000 draws through
    greedy_or_sample land exactly on those 3, at their probabilities (binomial bounds at 4.5 sigma)."""
    probs = [0.30, 0.20, 0.15, 0.10, 0.08, 0.07, 0.05, 0.03, 0.01, 0.01]
    temperature, top_k, top_p = 1.5, 4, 0.8
    z = [math.log(p) / temperature for p in probs]
    kth = sorted(z, reverse=True)[top_k - 1]
    w = [math.exp(v) if v >= kth else 0.0 for v in z]
    q = [x / sum(w) for x in w]
    kept, mass = set(), 0.0
    for i in sorted(range(len(q)), key=lambda i: -q[i]):
        if mass < top_p:
            kept.add(i)
        mass += q[i]
    want = [q[i] / sum(q[j] for j in kept) if i in kept else 0.0 for i in range(len(q))]
    assert kept == {0, 1, 2}

    logits = torch.log(torch.tensor([probs]))
    support = lambda **warp: set(torch.isfinite(mmi.warp_logits(logits, **warp))[0].nonzero()[:, 0].tolist())
    assert support(temperature=temperature, top_k=top_k) == {0, 1, 2, 3}
    assert support(temperature=temperature, top_p=top_p) == {0, 1, 2, 3, 4, 5}
    got = mmi.warp_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p).double().softmax(-1)[0]
    assert set(got.nonzero()[:, 0].tolist()) == kept
    assert torch.allclose(got, torch.tensor(want, dtype=torch.float64), rtol=0, atol=1e-6)

    n = 4000
    lm = TableLM({(): dict(enumerate(probs))}, vocab=len(probs))
    seqs = mmi.greedy_or_sample(lm, n, dict(temperature=temperature, top_k=top_k, top_p=top_p),
                                torch.Generator().manual_seed(0), max_new_tokens=1,
                                **dict(TABLE_OPTS, stop_ids=(8, 9)))
    counts = Counter(s[0] for s in seqs)
    assert set(counts) == kept
    for i in kept:
        assert abs(counts[i] / n - want[i]) < 4.5 * math.sqrt(want[i] * (1 - want[i]) / n), (i, counts)


def test_sampling_with_top_k_1_is_greedy_top_k_defaults_to_50():
    model = tiny_model(seed=4)
    batch = make_batch(model.cfg, [[BOS, 10, "img", 11], [BOS, 12, 13]], 14, left_pad=True)
    kw = dict(max_new_tokens=6, min_new_tokens=0, num_beams=1)
    greedy = model.generate_texts(batch, **kw)["text_ids"]
    for seed in range(3):
        top1 = model.generate_texts(batch, do_sample=True, top_k=1, top_p=1.0, temperature=2.0, seed=seed, **kw)
        assert torch.equal(top1["text_ids"], greedy)
    import inspect
    assert inspect.signature(model.generate_texts).parameters["top_k"].default == 50   # HF's, as the original ran


def test_sampling_temperature_divides_the_logits():
    """generate_texts(temperature=T) samples as the same model at temperature 1 with its text head scaled by 1/T
    (T a power of two, so the scaling is exact), for T below and above 1."""
    model = tiny_model(seed=4)
    batch = make_batch(model.cfg, [[BOS, 10, "img", 11], [BOS, 12, 13]], 14, left_pad=True)
    kw = dict(max_new_tokens=8, min_new_tokens=0, num_beams=1, do_sample=True, top_k=0, top_p=1.0, seed=3)
    plain = model.generate_texts(batch, **kw)["text_ids"]
    for T in (0.5, 2.0):
        scaled = copy.deepcopy(model)
        with torch.no_grad():
            for p in scaled.text_decoder.parameters():
                p.mul_(1 / T)
        want = scaled.generate_texts(batch, **kw)["text_ids"]
        assert not torch.equal(want, plain)                     # the temperature changes these draws
        assert torch.equal(model.generate_texts(batch, temperature=T, **kw)["text_ids"], want)


def test_sampling_warpers_at_the_ends_of_their_ranges():
    """top_k=0 and top_p=1 are off: every token of nonzero probability stays, one of 1e-10 too (float32's cumulative
    sum reaches 1 before it); top_k beyond the vocabulary keeps all (as HF, which clamps it); top_p=0 keeps the most
    likely token alone (at least one is kept, as HF's min_tokens_to_keep)."""
    logits = torch.log(torch.tensor([[1e-10, 0.5, 0.5]]))
    p = logits.softmax(-1)[0]
    assert p[0] > 0 and p[1] + p[2] == 1.0                      # the mass before the smallest is 1 in float32
    assert torch.isfinite(mmi.warp_logits(logits, top_k=0, top_p=1.0)).all()
    assert torch.isfinite(mmi.warp_logits(logits, top_k=10)).all()
    logits = torch.log(torch.tensor([[0.2, 0.7, 0.1]]))
    assert torch.isfinite(mmi.warp_logits(logits, top_p=0.0)).tolist() == [[False, True, False]]


def test_returned_sequences_are_prompt_major():
    """num_return_sequences=n: rows i*n .. i*n+n-1 continue prompt i (greedy: each its prompt's greedy text), the
    order beam search returns them in."""
    model = tiny_model(seed=1)
    batch = make_batch(model.cfg, [[BOS, 10, "img", 11], [BOS, 14, 15, 16]], 14, left_pad=True)
    kw = dict(max_new_tokens=4, min_new_tokens=4, num_beams=1)
    one = model.generate_texts(batch, **kw)["text_ids"]
    assert not torch.equal(one[0], one[1])
    two = model.generate_texts(batch, num_return_sequences=2, **kw)["text_ids"]
    assert torch.equal(two, one.repeat_interleave(2, dim=0))


def test_sampled_rows_stop_each_at_its_own_stop_token():
    """Rows sampled together stop independently: a row that drew a stop token ends with it while the others run on,
    with a repetition penalty too (its rows are then of different lengths). Hand-built: eos or A (1/2 each), then
    A B C for certain."""
    table = {(): {T_EOS: .5, T_A: .5}, (T_A,): {T_B: 1.0}, (T_A, T_B): {T_C: 1.0}}
    for penalty in (1.0, 1.3):
        seqs = mmi.greedy_or_sample(TableLM(table, 8), 64, {}, torch.Generator().manual_seed(0), max_new_tokens=3,
                                    **dict(TABLE_OPTS, repetition_penalty=penalty))
        assert {tuple(s) for s in seqs} == {(T_EOS,), (T_A, T_B, T_C)}


def test_sampling_draws_a_new_uniform_at_every_step():
    """Each step samples with its own uniform: where every next token is uniform over 8, two consecutive tokens are
    equal 1/8 of the time (binomial bounds at 4.5 sigma over 2,000 rows), not always."""
    n = 2000
    seqs = mmi.greedy_or_sample(TableLM({}, 8), n, {}, torch.Generator().manual_seed(0), max_new_tokens=2,
                                **dict(TABLE_OPTS, stop_ids=(8, 9)))
    same = sum(s[0] == s[1] for s in seqs) / n
    assert abs(same - 1 / 8) < 4.5 * math.sqrt(1 / 8 * 7 / 8 / n), same


@pytest.mark.parametrize("u, token", [(0.0, T_A), (1 - 2 ** -24, T_B)])
def test_sampling_never_draws_a_token_of_probability_zero(u, token, monkeypatch):
    """A uniform u of torch.rand's range [0, 1) takes the first token whose cumulative probability passes u: at
    either end of the range, one of nonzero probability (here A or B, 1/2 each), never token 0 (pad) or one after
    B, which the model gave probability 0."""
    monkeypatch.setattr(torch, "rand", lambda *shape, generator=None: torch.full(shape, u))
    seqs = mmi.greedy_or_sample(TableLM({(): {T_A: .5, T_B: .5}}, 8), 1, {}, None, max_new_tokens=1, **TABLE_OPTS)
    assert seqs == [[token]]


def test_generated_rows_end_at_their_stop_token_then_pad():
    """generate_texts' rows: lengths[i] tokens, the last a stop token (eos or soi) unless the row ran to
    max_new_tokens, none before it; then pad_token_id up to the longest row."""
    model = tiny_model(seed=2)
    cfg = model.cfg
    with torch.no_grad():                                     # soi likely enough that rows stop at different steps
        model.text_decoder.head_new.bias[cfg.soi_token_id - (cfg.llm.vocab_size - 2)] = 104.0
    batch = make_batch(cfg, [[BOS, 10, "img", 11]], 14)
    out = model.generate_texts(batch, max_new_tokens=6, min_new_tokens=0, num_beams=1, do_sample=True, top_k=0,
                               top_p=1.0, seed=0, num_return_sequences=8)
    ids, lengths = out["text_ids"].tolist(), out["lengths"].tolist()
    stops = {cfg.eos_token_id, cfg.soi_token_id}
    assert len(ids) == 8 and all(len(row) == max(lengths) for row in ids) and min(lengths) < max(lengths)
    for row, n in zip(ids, lengths):
        assert not stops & set(row[:n - 1]) and (row[n - 1] in stops or n == 6)
        assert row[n:] == [cfg.pad_token_id] * (len(row) - n)


def test_beam_search_done_rule_normalises_by_step_plus_two():
    """transformers 4.31 (the original's) marks a prompt done when the step's best candidate score, divided by
    (tokens so far + 1 for its dummy bos + 1 for this step) ** length_penalty, cannot beat the worst of num_beams
    finished hypotheses. Hand-built: eos and soi finish 2 hypotheses at step 0; at step 1 the best candidate
    (A C) is cut by step + 1 but not by step + 2, and at step 2 it finishes best of all."""
    A, B, C, D = T_A, T_B, T_C, T_D
    table = {(): {T_EOS: .35, T_SOI: .30, A: .20, B: .10, C: .03, D: .02},
             (A,): {C: .40, D: .35, B: .21, T_EOS: .02, T_SOI: .02},
             (A, C): {T_EOS: .95, C: .05},
             (A, D): {B: .40, C: .35, D: .25}}
    worst = math.log(.30) / 1                                 # the soi hypothesis: dummy bos, no token before soi
    best_step1 = math.log(.20) + math.log(.40)
    assert best_step1 / (1 + 1) <= worst < best_step1 / (1 + 2)
    finished = (best_step1 + math.log(.95)) / 3               # A C, then eos: dummy bos + 2 tokens
    open_ab = (math.log(.20) + math.log(.35) + math.log(.40)) / 4
    assert finished > open_ab > math.log(.35) > worst
    seqs = mmi.beam_search(TableLM(table, 8), 2, 2, 1.0, max_new_tokens=3, **TABLE_OPTS)
    assert seqs == [[A, C, T_EOS], [A, D, B]]
    # with length_penalty 0 the rule is worst >= best candidate score, whatever the length
    seqs = mmi.beam_search(TableLM(table, 8), 2, 2, 0.0, max_new_tokens=3, **TABLE_OPTS)
    assert seqs == [[T_EOS], [T_EOS]]


def test_beam_search_ends_finished_hypotheses_with_eos():
    """As transformers 4.31: a hypothesis is stored without its stop token and ends with eos, so a beam ending on
    soi comes back ending with eos (keep_stop_token=True keeps the soi); an open beam cut at max_new_tokens
    ends without one. Hand-built: soi finishes at step 0, B D stays open and ends best."""
    A, B, C, D = T_A, T_B, T_C, T_D
    table = {(): {T_SOI: .5, A: .3, B: .2}, (A,): {T_EOS: .6, C: .4}, (B,): {D: 1.0}}
    assert math.log(.2) / 3 > math.log(.5) > (math.log(.3) + math.log(.4)) / 3 > (math.log(.3) + math.log(.6)) / 2
    seqs = mmi.beam_search(TableLM(table, 8), 2, 2, 1.0, max_new_tokens=2, **TABLE_OPTS)
    assert seqs == [[B, D], [T_EOS]]
    seqs = mmi.beam_search(TableLM(table, 8), 2, 2, 1.0, max_new_tokens=2, keep_stop_token=True, **TABLE_OPTS)
    assert seqs == [[B, D], [T_SOI]]
    model = tiny_model(seed=2)                                # generate_texts passes keep_stop_token through
    cfg = model.cfg
    with torch.no_grad():                                     # soi far ahead of every other token
        model.text_decoder.head_new.bias[cfg.soi_token_id - (cfg.llm.vocab_size - 2)] = 400.0
    batch = make_batch(cfg, [[BOS, 10, "img", 11]], 14)
    kw = dict(max_new_tokens=2, min_new_tokens=0, num_beams=2)
    assert model.generate_texts(batch, **kw)["text_ids"].tolist() == [[cfg.eos_token_id]]
    assert model.generate_texts(batch, keep_stop_token=True, **kw)["text_ids"].tolist() == [[cfg.soi_token_id]]


def test_beam_search_finishes_only_stop_tokens_ranked_within_num_beams():
    """As transformers 4.31: a stop token finishes a hypothesis only when it ranks among the step's first num_beams
    candidates. Hand-built, 2 beams: at step 0 eos ranks second and finishes, soi ranks third and is dropped, though
    its score (no length penalty) beats the beam A C that takes the second place at max_new_tokens."""
    A, B, C, D = T_A, T_B, T_C, T_D
    table = {(): {A: .30, T_EOS: .29, T_SOI: .28, B: .12, C: .01}, (A,): {C: .6, D: .4}, (B,): {C: .7, D: .3}}
    assert math.log(.29) > math.log(.28) > math.log(.30) + math.log(.6) > math.log(.30) + math.log(.4)
    seqs = mmi.beam_search(TableLM(table, 8), 2, 2, 0.0, max_new_tokens=2, keep_stop_token=True, **TABLE_OPTS)
    assert seqs == [[T_EOS], [A, C]]


def test_cached_decoding_in_bf16_autocast_equals_recomputation():
    """Training's periodic evaluation decodes under bf16 autocast: the step's bf16 keys/values go into the float32
    cache (index_copy_ does not cast by itself; this crashed at the first evaluation) and the tokens are those of
    full recomputation under the same autocast."""
    model = tiny_model(seed=9)
    batch = make_batch(model.cfg, DECODE_ROWS, 24, left_pad=True)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        cached = model.generate_texts(batch, max_new_tokens=4, min_new_tokens=4, num_beams=1)
        full = model.generate_texts(batch, max_new_tokens=4, min_new_tokens=4, num_beams=1, use_cache=False)
    assert torch.equal(cached["text_ids"], full["text_ids"])


# ----------------------------------------------------------------------------------------------------------------
# Generation: images (seeds, copies, the MMFS ablation, prompts batched together)
# ----------------------------------------------------------------------------------------------------------------


def test_generate_images_is_seeded_sized_and_copy_major():
    dec = _tiny_decoder().eval()
    _perturb_mmfs_convs(dec)
    ctx, mask, _, feats, fmask = _tiny_inputs(dec, B=2)
    kw = {"steps": 3, "guidance_scale": 3.0, "sampler": "ddpm", "progress": False}
    a = dec.generate_images(ctx, mask, feats, fmask, seed=5, num_images_per_context=2, **kw)
    assert a.shape == (4, 3, 64, 64) and a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, dec.generate_images(ctx, mask, feats, fmask, seed=5, num_images_per_context=2, **kw))
    c = dec.generate_images(ctx, mask, feats, fmask, seed=6, **kw)
    assert torch.equal(c, a[2:])  # copy k uses seed + k; contexts keep their order inside each copy
    assert (c - a[:2]).abs().max() > 1e-3


@pytest.mark.parametrize("sampler", ["ddim", "dpm++2m"])
def test_fast_samplers_are_seeded(sampler):
    dec = _tiny_decoder().eval()
    ctx, mask, _, feats, fmask = _tiny_inputs(dec, B=1)
    kw = {"steps": 3, "guidance_scale": 3.0, "sampler": sampler, "eta": 0.5, "progress": False}
    a = dec.generate_images(ctx, mask, feats, fmask, seed=1, **kw)
    assert a.shape == (1, 3, 64, 64)
    assert torch.equal(a, dec.generate_images(ctx, mask, feats, fmask, seed=1, **kw))
    assert (a - dec.generate_images(ctx, mask, feats, fmask, seed=2, **kw)).abs().max() > 1e-3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_seed_draws_the_same_picture_on_the_cpu_and_a_gpu():
    """The noise is drawn on the CPU and moved, so a seed gives a CPU run and a CUDA run (fast path) the same
    pictures up to float rounding; another seed gives other pictures."""
    dec = _tiny_decoder().eval()
    _perturb_mmfs_convs(dec)
    ctx, mask, _, feats, fmask = _tiny_inputs(dec, B=2)
    kw = {"steps": 3, "guidance_scale": 3.0, "sampler": "ddpm", "progress": False}
    cpu = dec.generate_images(ctx, mask, feats, fmask, seed=5, **kw)
    gpu_dec, to = copy.deepcopy(dec).cuda(), lambda t: t.cuda()
    gpu = lambda seed: gpu_dec.generate_images(to(ctx), to(mask), [to(f) for f in feats], to(fmask), seed=seed,
                                               **kw).cpu()
    assert (gpu(5) - cpu).abs().max() < 1e-2
    assert (gpu(6) - cpu).abs().max() > 0.1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_seed_samples_the_same_text_on_the_cpu_and_a_gpu():
    """Sampling draws its uniforms on the CPU, so a seed gives a CPU run and a CUDA run (float32, plain path) the
    same tokens; another seed gives other tokens."""
    model = tiny_model(seed=4)
    batch = make_batch(model.cfg, [[BOS, 10, "img", 11], [BOS, 12, 13]], 14, left_pad=True)
    kw = dict(max_new_tokens=8, min_new_tokens=8, num_beams=1, do_sample=True, top_p=0.95, fast=False)
    cpu = model.generate_texts(batch, seed=3, **kw)["text_ids"]
    gpu_model = copy.deepcopy(model).cuda()
    gpu = lambda seed: gpu_model.generate_texts({k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()},
                                                seed=seed, **kw)["text_ids"].cpu()
    assert torch.equal(gpu(3), cpu) and not torch.equal(gpu(4), cpu)


def test_model_generate_images_is_seeded_and_checks_the_slot():
    model = tiny_model()
    cfg = model.cfg
    batch = make_batch(cfg, [[BOS, 20, "img", 21, 22, "img"], [BOS, 23, "img"]], 24)
    kw = dict(steps=3, progress=False)
    a = model.generate_images(batch, target_image_idxs=torch.tensor([1, 2]), seed=5, **kw)["image"]
    b = model.generate_images(batch, target_image_idxs=torch.tensor([1, 2]), seed=5, **kw)["image"]
    c = model.generate_images(batch, target_image_idxs=torch.tensor([1, 2]), seed=6, **kw)["image"]
    assert a.shape == (2, 3, 64, 64) and a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)
    # the target slot's own placeholder image does not influence its generation; the previous image does
    other = dict(batch, image_tensors=batch["image_tensors"].clone())
    other["image_tensors"][1] = torch.rand(3, 64, 64)
    one = model.generate_images(batch, target_image_idxs=[1], seed=5, **kw)["image"]
    assert torch.equal(model.generate_images(other, target_image_idxs=[1], seed=5, **kw)["image"], one)
    with torch.no_grad():
        for p in model.image_decoder.decoder.mmfs_module.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    other["image_tensors"][0] = torch.rand(3, 64, 64)
    base = model.generate_images(batch, target_image_idxs=[1], seed=5, **kw)["image"]
    assert not torch.equal(model.generate_images(other, target_image_idxs=[1], seed=5, **kw)["image"], base)
    with pytest.raises(ValueError, match=r"target_image_idxs \[3\] out of range: the batch has 3 images"):
        model.generate_images(batch, target_image_idxs=[3], **kw)


def test_model_generate_images_passes_copies_and_eta_through():
    """MMInterleaved.generate_images(num_images_per_context=2) draws 2 copies, copy k as a call with seed + k; eta
    reaches the DDIM sampler (eta > 0 adds fresh noise at every step, so it changes the picture)."""
    model = tiny_model()
    batch = make_batch(model.cfg, [[BOS, 20, "img", 21, 22, "img"]], 24)
    kw = dict(target_image_idxs=[1], steps=2, progress=False)
    two = model.generate_images(batch, seed=5, num_images_per_context=2, **kw)["image"]
    assert two.shape == (2, 3, 64, 64)
    for k in range(2):
        torch.testing.assert_close(two[k:k + 1], model.generate_images(batch, seed=5 + k, **kw)["image"], rtol=0,
                                   atol=1e-5)
    ddim = dict(kw, sampler="ddim", seed=5)
    eta0, eta1 = (model.generate_images(batch, eta=eta, **ddim)["image"] for eta in (0.0, 1.0))
    assert (eta1 - eta0).abs().max() > 1e-3


def test_one_generator_runs_on_across_generate_mini_bs():
    """An int seed draws from one generator that runs on from one mini-batch of generate_mini_bs contexts to the
    next (the original's draw order): one context a mini-batch, DDIM with eta 0 (one draw an image), the second
    image starts from the draw after the first image's."""
    dec = _tiny_decoder(generate_mini_bs=1).eval()
    _perturb_mmfs_convs(dec)
    ctx, mask, _, feats, fmask = _tiny_inputs(dec, B=2)
    with torch.no_grad():
        got = dec.generate_images(ctx, mask, feats, fmask, steps=3, guidance_scale=3.0, sampler="ddim", seed=5,
                                  progress=False)
        cond = dec.perceiver_resampler(ctx, mask)
        uncond = dec.neg_prompt_embeds.expand_as(cond)
        g, want = torch.Generator().manual_seed(5), []
        for i in range(2):
            latents = dec.decoder.sample_latents(cond[i:i + 1], uncond[i:i + 1], [f[i:i + 1] for f in feats],
                                                 fmask[i:i + 1], 3, 3.0, "ddim", g, progress=False)
            want.append(dec.decoder.decode_latents(latents))
    torch.testing.assert_close(got, torch.cat(want), rtol=0, atol=1e-5)


def test_sampling_variants_draw_the_noise_of_separate_runs():
    """Two variants (rows with and without MMFS) in one ddpm sampling == each sampled alone from the same seed:
    the initial latents and every step's noise are shared, the batched UNet only changes float rounding. Run in float64:
    float32's rounding depends on the CPU's kernels (the H100 host's CPU missed atol=1e-5 on latents of size ~16)."""
    dec = _tiny_decoder().eval().double()
    _perturb_mmfs_convs(dec)
    ctx, mask, _, feats, fmask = _tiny_inputs(dec, B=2)
    ctx, feats = ctx.double(), [f.double() for f in feats]
    sd = dec.decoder
    zeros = [torch.zeros_like(f) for f in feats]
    with torch.no_grad():
        cond = dec.perceiver_resampler(ctx, mask)
        uncond = dec.neg_prompt_embeds.expand_as(cond)
        run = lambda c, u, f, m, v: sd.sample_latents(c, u, f, m, 4, 3.0, "ddpm", torch.Generator().manual_seed(5),
                                                      progress=False, variants=v)
        alone = [run(cond, uncond, feats, fmask, 1), run(cond, uncond, zeros, torch.zeros_like(fmask), 1)]
        both = run(cond.repeat(2, 1, 1), uncond.repeat(2, 1, 1), [torch.cat([f, z]) for f, z in zip(feats, zeros)],
                   torch.cat([fmask, torch.zeros_like(fmask)]), 2)
    assert not torch.allclose(alone[0], alone[1])     # MMFS changes the image, so a mix-up would show
    torch.testing.assert_close(both, torch.cat(alone), rtol=0, atol=1e-10)


def test_generate_images_mmfs_ablation_equals_two_calls():
    """ImageDecoder.generate_images(mmfs_ablation=True) == the with-MMFS call, then the call with zeroed MMFS inputs
    (what MMInterleaved.generate_images(use_mmfs=False) passes), across a mini-batch split."""
    dec = _tiny_decoder(generate_mini_bs=2).eval()
    _perturb_mmfs_convs(dec)
    ctx, mask, _, feats, fmask = _tiny_inputs(dec, B=3)
    kw = dict(steps=3, guidance_scale=3.0, sampler="ddim", seed=8, progress=False)
    with torch.no_grad():
        on = dec.generate_images(ctx, mask, feats, fmask, **kw)
        off = dec.generate_images(ctx, mask, [torch.zeros_like(f) for f in feats], torch.zeros_like(fmask), **kw)
        both = dec.generate_images(ctx, mask, feats, fmask, mmfs_ablation=True, **kw)
    assert both.shape == (6,) + on.shape[1:]
    torch.testing.assert_close(both, torch.cat([on, off]), rtol=0, atol=1e-5)


def test_use_mmfs_both_in_one_call_equals_two_calls():
    """generate_images(use_mmfs="both") (eval.py's demo pair: one LLM pass, one batched sampling) ==
    generate_images(use_mmfs=True), then (use_mmfs=False)."""
    model = tiny_model()
    _perturb_mmfs_convs(model.image_decoder)
    batch = make_batch(model.cfg, [[1, 5, "img", 6, 7, "img"]], 2 * model.cfg.num_img_token + 10, seed=3)
    kw = dict(ev.DEMO_IMAGES, steps=3)       # the demo's sampler settings, fewer steps to stay fast
    with torch.no_grad():
        pair = model.generate_images(batch, target_image_idxs=[1], seed=4, progress=False, use_mmfs="both",
                                     **kw)["image"]
        calls = [model.generate_images(batch, target_image_idxs=[1], seed=4, progress=False, use_mmfs=u,
                                       **kw)["image"][0] for u in (True, False)]
    assert not torch.allclose(calls[0], calls[1])     # the previous image matters, so a swap would show
    for got, want in zip(pair, calls):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_per_image_seeds_equal_one_generate_call_each():
    """seed=[...] (one per context) in one batched call, across a mini-batch split, with copies, per-step noise
    (ddpm) and the MMFS ablation == each context alone with its int seed; a wrong count is refused."""
    dec = _tiny_decoder(generate_mini_bs=2).eval()
    _perturb_mmfs_convs(dec)
    ctx, mask, _, feats, fmask = _tiny_inputs(dec, B=3)
    seeds = [7, 3, 7]                   # a repeated seed on another context must still give that context's image
    kw = dict(steps=3, guidance_scale=3.0, sampler="ddpm", num_images_per_context=2, mmfs_ablation=True,
              progress=False)
    with torch.no_grad():
        batched = dec.generate_images(ctx, mask, feats, fmask, seed=seeds, **kw)
        alone = [dec.generate_images(ctx[i:i + 1], mask[i:i + 1], [f[i:i + 1] for f in feats], fmask[i:i + 1],
                                     seed=seeds[i], **kw) for i in range(3)]
    batched = batched.reshape(2, 2, 3, *batched.shape[1:])   # (with/without MMFS, copy, context, 3, S, S)
    for i in range(3):
        torch.testing.assert_close(batched[:, :, i], alone[i].reshape(2, 2, *batched.shape[3:]), rtol=0, atol=1e-5)
    assert (batched[:, :, 0] - batched[:, :, 2]).abs().max() > 1e-3       # same seed, other context, other image
    with pytest.raises(ValueError, match="2 seeds for 3 contexts"):
        dec.generate_images(ctx, mask, feats, fmask, seed=[1, 2], **kw)


def test_right_padded_prompts_draw_what_each_draws_alone():
    """Prompts of different lengths right-padded into one batch (as eval.py's demo) draw, with one seed per
    target, what each prompt alone draws: an image reads only its own row up to its soi."""
    model = tiny_model()
    _perturb_mmfs_convs(model.image_decoder)
    rows = [[BOS, 5, "img", 6, 7, 8, 9, "img"], [BOS, 10, "img", 11, "img", 12, "img"]]
    n = model.cfg.num_img_token
    batch = make_batch(model.cfg, rows, 3 * n + 10, seed=3)
    kw = dict(ev.DEMO_IMAGES, steps=3, progress=False, use_mmfs="both")
    with torch.no_grad():
        both = model.generate_images(batch, target_image_idxs=[1, 4], seed=[4, 9], **kw)["image"]
        for r, (target, seed, first) in enumerate([(1, 4, 0), (2, 9, 2)]):
            count = int(batch["num_image_per_seq"][r])
            alone = make_batch(model.cfg, [rows[r]], len(interleaved_row(model.cfg, rows[r])))
            alone["image_tensors"] = batch["image_tensors"][first:first + count]
            pair = model.generate_images(alone, target_image_idxs=[target], seed=seed, **kw)["image"]
            torch.testing.assert_close(both[r::2], pair, rtol=0, atol=1e-5)   # (with, without) MMFS of row r


# ----------------------------------------------------------------------------------------------------------------
# Speed: the fast forms equal the plain ones; FastMMFS, and the digest that keeps them in line
# ----------------------------------------------------------------------------------------------------------------


def test_fast_mmfs_gradients_equal_the_plain_form():
    """Training runs FastMMFS (speed_up): every parameter's and input's gradient is the plain form's."""
    torch.manual_seed(1)
    plain = mmi.MMFS(d_query=6, d_value=5, d_out=7, d_attn=4, n_heads=2, n_points=2, spatial_shapes=[4, 2],
                     base_spatial_shape=2, max_num_image_per_seq=5, offset_init_magnitude=1.0).double()
    with torch.no_grad():
        for p in plain.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    plain.ignore_token.requires_grad_(True)
    fast = mmi.speed_up(copy.deepcopy(plain))
    mask = torch.tensor([[[1, 0, 0], [1, 1, 0], [1, 1, 1]], [[0, 0, 0], [0, 1, 0], [1, 0, 1]]])
    inputs = [torch.randn(2, 3, 6, dtype=torch.float64), torch.rand(1, 3, 2, dtype=torch.float64),
              torch.randn(2, 3, 20, 5, dtype=torch.float64)]
    grads = []
    for mod in (plain, fast):
        x = [t.clone().requires_grad_() for t in inputs]
        mod(x[0], x[1], x[2], mask).pow(2).sum().backward()
        grads.append([t.grad for t in x] + [p.grad for p in mod.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_fast_forms_are_refused_once_a_plain_form_is_edited(monkeypatch):
    """The fast forms cover the plain forms' source as written (PLAIN_FORMS_DIGEST): an edit falls back to the
    plain path (fast=None, speed_up) or is refused (fast=True), never computing something else."""
    assert mmi.fast_forms_current() and mmi._plain_forms_digest() == mmi.PLAIN_FORMS_DIGEST
    monkeypatch.setattr(mmi, "PLAIN_FORMS_DIGEST", "0" * 16)
    mmi.fast_forms_current.cache_clear()
    try:
        with pytest.warns(UserWarning, match="plain forms were edited"):
            assert not mmi.fast_forms_current()
        model = mmi.speed_up(tiny_model())
        assert not any(isinstance(m, mmi.FastMMFS) for m in model.modules())
        with pytest.raises(RuntimeError, match="fast=True, but the plain forms were edited"):
            mmi.use_fast(True, "cpu")
    finally:
        mmi.fast_forms_current.cache_clear()


# ----------------------------------------------------------------------------------------------------------------
# Speed: the fixed-shape decoding step, its CUDA graph and compiled form, the GEMV in bf16
# ----------------------------------------------------------------------------------------------------------------


def _decoders(model, batch, max_new_tokens, **kw):
    """The fast decoder (fixed-shape step) and the plain full-recompute decoder over the same prompts."""
    embeds, vision, xmask, _ = model.prepare_mm_embeds(batch["text_ids"], batch["image_tensors"],
                                                       batch["num_image_per_seq"])
    mask = batch["attention_mask"]
    return (mmi.FastDecoder(model, embeds, mask, vision, xmask, max_new_tokens, **kw),
            mmi._Decoder(model, embeds, mask, vision, xmask, max_new_tokens, use_cache=False))


def _addresses(decoder):
    return [(c.k.data_ptr(), c.v.data_ptr(), tuple(c.k.shape)) for c in decoder.caches] + \
        [(t.data_ptr(), tuple(t.shape)) for t in decoder.buffers.values()]


def test_fixed_shape_step_equals_recomputation_in_place():
    model = tiny_model(seed=6)
    batch = make_batch(model.cfg, DECODE_ROWS, 24, left_pad=True)
    forced = torch.tensor([[20, 21, 22, 23], [30, 31, 32, 33], [40, 41, 42, 43]])
    cached, full = _decoders(model, batch, 5)
    with torch.no_grad():
        steps_full = [full.prefill()] + [full.step(forced[:, i]) for i in range(4)]
        steps_cached = [cached.prefill()]
        before = _addresses(cached)
        for i in range(4):
            steps_cached.append(cached.step(forced[:, i]))
            assert _addresses(cached) == before                  # same memory, same shapes, every step
    for a, b in zip(steps_cached, steps_full):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    k = cached.caches[0].k
    assert k.shape[2] == 24 + 5
    assert k[:, :, 24:28].abs().sum(-1).gt(0).all()             # the 4 steps' slots were written ...
    assert torch.count_nonzero(k[:, :, 28:]) == 0                 # ... and the last slot never was
    # the next position: real prompt tokens (left padding not counted) + the 4 steps
    assert cached.buffers["pos"][:, 0].tolist() == [len(interleaved_row(model.cfg, r)) + 4 for r in DECODE_ROWS]


def test_compiled_step_is_one_graph_reading_level_tables_made_at_prefill(monkeypatch):
    """Under torch.compile the decoding step is one graph (the deformable attention an opaque operator, as kernels.cu's
    is on CUDA; here a stand-in running the reference) that reads each MMFS layer's level tables, made once at
    prefill, instead of making them in every step (their prefix sum of level areas would be in the graph). Its
    logits are the eager step's."""
    class Kernels:
        forward = staticmethod(mmi.ms_deform_attn_reference)

    monkeypatch.setattr(mmi, "load_kernels", lambda: Kernels)
    monkeypatch.setattr(mmi, "kernels_used", lambda device: True)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append([str(n.target) for n in gm.graph.nodes if n.op in ("call_function", "call_method")])
        return gm

    model = tiny_model(seed=9)
    batch = make_batch(model.cfg, DECODE_ROWS, 24, left_pad=True)
    (eager, _), (compiled, _) = _decoders(model, batch, 4), _decoders(model, batch, 4)
    compiled.step_fn = torch.compile(mmi.FastDecoder._step, backend=backend)
    tokens = torch.tensor([20, 30, 40])
    with torch.no_grad():
        eager.prefill(), compiled.prefill()
        torch.testing.assert_close(compiled.step(tokens), eager.step(tokens), rtol=0, atol=0)
    assert len(graphs) == 1 and not any("cumsum" in target for target in graphs[0])


@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize("mode", ["greedy", "sampling", "beam"])
def test_cached_generation_equals_full_recomputation(mode, fast):
    model = tiny_model(seed=7)
    batch = make_batch(model.cfg, DECODE_ROWS, 24, left_pad=True)
    kw = {"greedy": dict(num_beams=1, repetition_penalty=1.3),
          "sampling": dict(num_beams=1, do_sample=True, top_p=0.8, seed=3, num_return_sequences=2),
          "beam": dict(num_beams=3, num_return_sequences=2, length_penalty=0.7)}[mode]
    out = model.generate_texts(batch, max_new_tokens=6, min_new_tokens=2, fast=fast, **kw)
    ref = model.generate_texts(batch, max_new_tokens=6, min_new_tokens=2, use_cache=False, **kw)
    assert out["text_ids"].shape[0] == 3 * kw.get("num_return_sequences", 1)
    assert torch.equal(out["text_ids"], ref["text_ids"]) and torch.equal(out["lengths"], ref["lengths"])


class _Recording(mmi.FastDecoder):
    """Notes the buffers' addresses at every step and the beam sources of every reorder."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.addresses, self.sources = [], []

    def select(self, index):
        self.sources.append(index.tolist())
        super().select(index)

    def step(self, tokens):
        self.addresses.append(_addresses(self))
        return super().step(tokens)


def test_beam_search_reorders_the_static_buffers_in_place():
    model = tiny_model(seed=8)
    batch = make_batch(model.cfg, DECODE_ROWS[:2], 24, left_pad=True)
    embeds, vision, xmask, _ = model.prepare_mm_embeds(batch["text_ids"], batch["image_tensors"],
                                                       batch["num_image_per_seq"])
    c = model.cfg
    opts = dict(max_new_tokens=6, min_new_tokens=6, repetition_penalty=1.0, stop_ids=(c.eos_token_id, c.soi_token_id),
                bos_id=c.bos_token_id, pad_id=c.pad_token_id)
    with torch.no_grad():
        cached = _Recording(model, embeds, batch["attention_mask"], vision, xmask, 6)
        seqs = mmi.beam_search(cached, 3, 3, 1.0, **opts)
        full = mmi._Decoder(model, embeds, batch["attention_mask"], vision, xmask, 6, use_cache=False)
        ref = mmi.beam_search(full, 3, 3, 1.0, **opts)
    assert seqs == ref
    assert cached.sources[0] == [0, 0, 0, 1, 1, 1]                 # the expansion to beams: new buffers
    reorders = cached.sources[1:]
    assert any(s != sorted(s) or len(set(s)) < len(s) for s in reorders)   # beams did move between rows
    assert all(a == cached.addresses[0] for a in cached.addresses)  # yet the buffers stayed where they were


def test_cuda_graph_and_compile_need_the_fast_path_on_cuda():
    model = tiny_model()
    batch = make_batch(model.cfg, DECODE_ROWS[2:], 5)
    with pytest.raises(ValueError, match="cuda_graph=True needs CUDA tensors"):
        _decoders(model, batch, 2, cuda_graph=True)
    with pytest.raises(ValueError, match="compile=True compiles the fast path's cached step"):
        model.generate_texts(batch, max_new_tokens=2, num_beams=1, compile=True, fast=False)


@cuda_only
def test_capture_holds_off_the_garbage_collector():
    """CUDA forbids destroying a graph while another is being captured (the capture fails), and the cyclic garbage
    collector frees dead decoders' graphs at any allocation: capture_cuda_graph keeps the collector off during the
    capture only, then turns it back on."""
    x, seen = torch.ones(4, device="cuda"), []

    def fn():
        seen.append((torch.cuda.is_current_stream_capturing(), gc.isenabled()))
        return x + 1

    graph, out = mmi.capture_cuda_graph(fn)
    graph.replay()
    assert torch.equal(out, x + 1) and seen == [(False, True), (True, False)] and gc.isenabled()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("with_images", [False, True])
def test_cuda_graph_decoding_equals_eager_token_for_token(with_images):
    if with_images and not mmi.kernels_used("cuda"):
        pytest.skip("the deformable-attention kernel is not available, so MMFS cannot be captured")
    model = tiny_model(seed=9).cuda()
    rows = DECODE_ROWS if with_images else [[BOS, 16, 17, 18], [BOS, 19, 20, 21, 22, 23]]
    batch = make_batch(model.cfg, rows, 24, left_pad=True)
    batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}
    # the eager fixed-shape step reads nothing back to the host (a graph could not hold it otherwise)
    cached, _ = _decoders(model, batch, 4, cuda_graph=False)
    graphed, _ = _decoders(model, batch, 4, cuda_graph=True)
    forced = torch.tensor([[20, 21, 22], [30, 31, 32], [40, 41, 42]][:len(rows)], device="cuda")
    with torch.no_grad():
        eager_steps = [cached.prefill(), cached.step(forced[:, 0])]
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            eager_steps += [cached.step(forced[:, i]) for i in (1, 2)]
        finally:
            torch.cuda.set_sync_debug_mode("default")
        graph_steps = [graphed.prefill()] + [graphed.step(forced[:, i]) for i in range(3)]
    assert graphed.graph is not None
    for a, b in zip(graph_steps, eager_steps):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    for kw in (dict(num_beams=1), dict(num_beams=3, num_return_sequences=2),
               dict(num_beams=1, do_sample=True, seed=5, num_return_sequences=2)):
        a = model.generate_texts(batch, max_new_tokens=8, min_new_tokens=2, fast=True, **kw)
        b = model.generate_texts(batch, max_new_tokens=8, min_new_tokens=2, fast=False, **kw)
        assert torch.equal(a["text_ids"], b["text_ids"]), kw


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda_only)])
def test_text_generation_frees_its_decoder_when_it_returns(device, monkeypatch):
    """generate_texts lets go of its decoder (KV caches, buffers, on a GPU the step's CUDA graph) as it returns,
    with the garbage collector off: in an interleaved loop the image drawn next may use that memory. (A reference
    cycle through the decoder would keep it until the collector ran.)"""
    model = tiny_model(seed=3).to(device)
    batch = {k: v.to(device) if torch.is_tensor(v) else v
             for k, v in make_batch(model.cfg, DECODE_ROWS, 24, left_pad=True).items()}
    made, init = [], mmi.FastDecoder.__init__

    def recorded(self, *args, **kwargs):
        init(self, *args, **kwargs)
        made.append(weakref.ref(self))

    monkeypatch.setattr(mmi.FastDecoder, "__init__", recorded)
    gc.disable()
    try:
        with torch.no_grad():
            model.generate_texts(batch, max_new_tokens=4, min_new_tokens=4, fast=True)
        freed = made[0]() is None                               # before the collector may run again
    finally:
        gc.enable()
    assert len(made) == 1 and freed


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_decoding_step_equals_the_eager_step():
    """compile=True (torch.compile inside the CUDA graph) gives the eager step's logits and tokens, images
    included (MMFS reaches the kernel as a custom operator, so the compiled step holds it too)."""
    if not mmi.kernels_used("cuda"):
        pytest.skip("the deformable-attention kernel is not available")
    model = tiny_model(seed=9).cuda()
    batch = make_batch(model.cfg, DECODE_ROWS, 24, left_pad=True)
    batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}
    eager, _ = _decoders(model, batch, 4, cuda_graph=False)
    compiled, _ = _decoders(model, batch, 4, cuda_graph=True, compile=True)
    forced = torch.tensor([[20, 21, 22], [30, 31, 32], [40, 41, 42]], device="cuda")
    with torch.no_grad():
        want = [eager.prefill()] + [eager.step(forced[:, i]) for i in range(3)]
        got = [compiled.prefill()] + [compiled.step(forced[:, i]) for i in range(3)]
    for a, b in zip(got, want):   # fused kernels may round float32 sums in another order
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    a = model.generate_texts(batch, max_new_tokens=8, min_new_tokens=2, num_beams=1, compile=True)
    b = model.generate_texts(batch, max_new_tokens=8, min_new_tokens=2, num_beams=1, fast=False)
    assert torch.equal(a["text_ids"], b["text_ids"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("bits", [None, 8, 4])
def test_bf16_gemv_decoding_is_as_accurate_as_the_layers(bits, monkeypatch):
    """In bf16 on CUDA a decoding step's matmuls go through kernels.cu's gemv, with the LLaMA blocks' and MMFS's
    RMSNorms and the residual adds folded in, on 16-bit or quantized weights (int4 in groups of 32, the tiny width
    being 64), and its attention through decode_attention (2 heads of 32). Against a float32 recomputation of the
    whole sequence, its logits are no further off than a bf16 recomputation through the layers themselves (many
    rows: no norm folded into a gemv)."""
    if not mmi.kernels_used("cuda"):
        pytest.skip("kernels.cu is not available")
    normed, attended = [], []
    real, real_attention = mmi.gemv, mmi._decode_attention_op
    monkeypatch.setattr(mmi, "gemv", lambda *a: normed.append(a[4] is not None) or real(*a))
    monkeypatch.setattr(mmi, "_decode_attention_op", lambda *a: attended.append(1) or real_attention(*a))
    model = tiny_model(seed=9, **{"llm.num_attention_heads": 2})
    model = (model if bits is None else mmi.quantize(model, bits, group_size=32)).cuda().eval()
    batch = make_batch(model.cfg, DECODE_ROWS, 24, left_pad=True)
    batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}
    forced = torch.tensor([[20, 21, 22], [30, 31, 32], [40, 41, 42]], device="cuda")

    def logits(cached):
        decoder = _decoders(model, batch, 4, cuda_graph=False)[0 if cached else 1]
        with torch.no_grad():
            decoder.prefill()
            return [decoder.step(forced[:, i]) for i in range(3)]

    reference = logits(cached=False)                                        # float32, the layers
    model.to(torch.bfloat16)
    batch["image_tensors"] = batch["image_tensors"].to(torch.bfloat16)
    layers = logits(cached=False)
    assert not any(normed)                                              # the head's gemv at most: no norm folded
    steps = logits(cached=True)
    assert normed.count(True) >= 3 * 2 * model.cfg.llm.num_hidden_layers  # qkv and gate/up of every layer, each step
    assert len(attended) == 3 * model.cfg.llm.num_hidden_layers
    for got, base, ref in zip(steps, layers, reference):
        assert rel_err(got, ref) <= 1.5 * rel_err(base, ref)


# ----------------------------------------------------------------------------------------------------------------
# Speed: image sampling with the images' MMFS values made once and each guided UNet pass graphed
# ----------------------------------------------------------------------------------------------------------------


def test_keyed_mmfs_net_equals_the_plain_mmfs_net():
    """KeyedMMFSNet (values and position tables made once per sampling) == MMFSNet over the raw levels."""
    dec = _tiny_decoder().eval()
    _perturb_mmfs_convs(dec)
    _, _, _, feats, fmask = _tiny_inputs(dec, B=2)
    net, unet = dec.decoder.mmfs_module, dec.decoder.unet
    g = torch.Generator().manual_seed(4)
    skips = [torch.randn(2, c, s, s, generator=g) for c, s in mmi.unet_skip_layout(unet.cfg)]
    mid_side = unet.cfg.sample_size >> (len(unet.cfg.block_out_channels) - 1)
    sample = torch.randn(2, unet.cfg.block_out_channels[-1], mid_side, mid_side, generator=g)   # the mid output
    with torch.no_grad():
        want_h, want_skips = net(sample, skips, feats, fmask)
        keyed = mmi.KeyedMMFSNet(net, feats, fmask, torch.float32)
        got_h, got_skips = keyed(sample, skips, None, fmask)
    assert len(keyed.values) == len(skips) + 1
    assert not torch.equal(want_h, sample)     # the residuals are live, so the comparison means something
    torch.testing.assert_close(got_h, want_h, rtol=0, atol=1e-6)
    for a, b in zip(got_skips, want_skips):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_keyed_mmfs_net_refuses_more_images_than_its_table():
    """KeyedMMFSNet checks the image count once for the sampler's steps, as MMFS does per call: a row with as many
    images as the UNet-MMFS's max_num_image_per_seq is an error."""
    dec = _tiny_decoder().eval()
    _, _, _, feats, fmask = _tiny_inputs(dec, B=1)
    net = dec.decoder.mmfs_module
    limit = net.mmfs_mid_block.mmfs.max_num_image_per_seq
    feats = [f.expand(1, limit, *f.shape[2:]) for f in feats]                 # (1, limit images, C, s, s) a level
    with torch.no_grad(), pytest.raises(ValueError, match=f"{limit} images visible to one query"):
        mmi.KeyedMMFSNet(net, feats, torch.ones(1, limit, dtype=fmask.dtype), torch.float32)


@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_fast_sampling_equals_the_plain_sampling(guidance_scale):
    dec = _tiny_decoder().eval()
    _perturb_mmfs_convs(dec)
    ctx, mask, _, feats, fmask = _tiny_inputs(dec, B=2)
    kw = dict(steps=3, guidance_scale=guidance_scale, sampler="ddpm", seed=[3, 4], progress=False)
    with torch.no_grad():
        fast = dec.generate_images(ctx, mask, feats, fmask, fast=True, **kw)
        plain = dec.generate_images(ctx, mask, feats, fmask, fast=False, **kw)
    torch.testing.assert_close(fast, plain, rtol=0, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("sampler", ["ddpm", "dpm++2m"])
def test_graphed_unet_steps_equal_eager_sampling(sampler, monkeypatch):
    """The fast path (each step's guided UNet pass replayed from one CUDA graph) == the plain path, with MMFS
    live. In float32 without TF32, whose coarser rounding of convolutions, made in another order by each path,
    would grow over the steps."""
    if not mmi.kernels_used("cuda"):
        pytest.skip("the deformable-attention kernel is not available")
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    dec = _tiny_decoder().eval()
    _perturb_mmfs_convs(dec)
    dec = dec.cuda()
    ctx, mask, _, feats, fmask = _tiny_inputs(dec, B=2)
    ctx, mask, fmask, feats = ctx.cuda(), mask.cuda(), fmask.cuda(), [f.cuda() for f in feats]
    kw = dict(steps=5, guidance_scale=3.0, sampler=sampler, seed=[3, 4], progress=False)
    with torch.no_grad():
        eager = dec.generate_images(ctx, mask, feats, fmask, fast=False, **kw)
        graphed = dec.generate_images(ctx, mask, feats, fmask, fast=True, **kw)
        off = dec.generate_images(ctx, mask, [torch.zeros_like(f) for f in feats], torch.zeros_like(fmask),
                                  fast=True, **kw)
    assert not torch.allclose(graphed, off, atol=1e-3)     # MMFS is live inside the graph
    torch.testing.assert_close(graphed, eager, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# Speed: weight-only quantization (int8, int4) by hand, against the plain model, and on load
# ----------------------------------------------------------------------------------------------------------------


def _linear_of(weight, bias=None):
    layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


def test_quantization_int8_and_int4_by_hand():
    """scale = max|w| / qmax per (row, group), q = round(w / scale) with ties to even, a zero group scale 0 and
    q 0: literal integers and scales, checked against float64 arithmetic (scales are powers of two, so every
    step is exact), and the int4 bytes of the documented packing."""
    w8 = torch.tensor([[127, -32, 1.5, 2.5, -3, 0.5], [0] * 6, [-127, 64.25, -0.5, 100.5, 101.5, 64.75]]) \
        / torch.tensor([[64.0], [1.0], [128.0]])
    q8 = [[127, -32, 2, 2, -3, 0], [0] * 6, [-127, 64, 0, 100, 102, 65]]
    s8 = [[1 / 64], [0.0], [1 / 128]]
    w4 = torch.tensor([[7, -3.5, 2.5, 0.25, 3.5, -1.5, 0.75, -0.25], [0, 0, 0, 0, -3.5, 3.25, 2.75, 0.5]]) / 4
    q4 = [[7, -4, 2, 0, 7, -3, 2, 0], [0, 0, 0, 0, -7, 6, 6, 1]]
    s4 = [[1 / 4, 1 / 8], [0.0, 1 / 8]]
    for w, bits, g, q, s in ((w8, 8, None, q8, s8), (w4, 4, 4, q4, s4)):
        qmax, w64 = 2 ** (bits - 1) - 1, w.double().numpy()
        groups = w64.reshape(w64.shape[0], -1, g or w64.shape[1])
        s64 = np.abs(groups).max(-1) / qmax                                   # float64, by hand
        assert s64.tolist() == s
        q64 = np.round(groups / np.where(s64 > 0, s64, 1)[..., None]).reshape(w64.shape)   # numpy: ties to even
        assert q64.tolist() == q
        layer = mmi.QuantizedLinear.from_linear(_linear_of(w), bits, group_size=g or 128)
        assert layer.scales.dtype == torch.float32 and layer.scales[:, :len(s[0])].tolist() == s
        assert layer.scales[:, len(s[0]):].eq(0).all()                  # int4: groups of padding only
        unpacked = mmi.unpack_int4(_int4_rows(layer.qweight, 2))[:, :8] if bits == 4 else layer.qweight
        assert unpacked.tolist() == q
        dq = (q64.reshape(groups.shape) * s64[..., None]).reshape(w64.shape)
        assert torch.equal(layer.dequantize(), torch.from_numpy(dq).float())
        assert (np.abs(w64 - dq) <= np.repeat(s64, groups.shape[-1], axis=1) / 2).all()
    # int4 bytes: input 2j in the low nibble, 2j + 1 in the high one, each as q + 8; 8 inputs padded to a 32-input
    # piece and 2 rows to a slab of 16, all padding q = 0 (byte 0x88)
    packed = mmi.QuantizedLinear.from_linear(_linear_of(w4), 4, group_size=4).qweight
    assert packed.dtype == torch.uint8 and packed.shape == (16, 16)
    nibbles = [[(7, -4), (2, 0), (7, -3), (2, 0)], [(0, 0), (0, 0), (-7, 6), (6, 1)]]      # q4's pairs
    rows = _int4_rows(packed, 16)
    assert rows[:2, :4].tolist() == [[(lo + 8) | (hi + 8) << 4 for lo, hi in row] for row in nibbles]
    assert rows[:2, 4:].eq(0x88).all() and rows[2:].eq(0x88).all()


def test_quantized_values_are_rounded_against_the_stored_scales():
    """In 16-bit weights q = clamp(round(w / s), -qmax, qmax), ties to even, with s the scale as stored (rounded
    to the weight's dtype), the one a matmul multiplies q by: float64 arithmetic on bf16 and fp16 weights. Where
    the stored scale rounds below max|w| / qmax (an fp16 subnormal), q is still clamped to [-qmax, qmax]."""
    g = torch.Generator().manual_seed(3)
    for dtype in (torch.bfloat16, torch.float16):
        w = (torch.randn(16, 256, generator=g) * 0.02).to(dtype)
        for bits, group_size in ((8, None), (4, 32)):
            q, s = mmi.quantize_weight(w, bits, group_size)
            qmax, groups = 2 ** (bits - 1) - 1, w.double().numpy().reshape(16, -1, group_size or 256)
            assert s.dtype == dtype and s.shape == groups.shape[:2]
            expected = np.clip(np.round(groups / s.double().numpy()[..., None]), -qmax, qmax)
            assert q.tolist() == expected.reshape(16, 256).astype(int).tolist(), (dtype, bits)
    u = 2.0 ** -24                                              # fp16's smallest subnormal
    for bits, w, q_expected in ((4, [-8, 3, 8, 0], [-7, 3, 7, 0]), (8, [-128, 5, 128, 0], [-127, 5, 127, 0])):
        q, s = mmi.quantize_weight(torch.tensor([w], dtype=torch.float16) * u, bits)
        assert s.tolist() == [[u]] and q.tolist() == [q_expected]          # 8u / 7 and 128u / 127 round to u


def _int4_rows(qweight, n):
    """Rows 0..n-1 of int4 bytes, read from the slabs QuantizedLinear documents by index: row r's bytes 16p..16p+15
    at slab r // 16 (16 rows of all bytes), piece p (16 rows of 16 bytes), row r % 16."""
    B = qweight.shape[1]
    r, b = torch.arange(n)[:, None], torch.arange(B)[None, :]
    return qweight.reshape(-1)[(r // 16) * 16 * B + (b // 16) * 256 + (r % 16) * 16 + b % 16]


def test_int4_packing_is_exact_for_every_nibble_and_byte():
    order = torch.randperm(32, generator=torch.Generator().manual_seed(0))
    q = torch.arange(-8, 8, dtype=torch.int8).repeat(3, 2)[:, order]
    packed = mmi.pack_int4(q)
    assert packed.shape == (3, 16)
    assert packed.tolist() == [[(int(a) + 8) | (int(b) + 8) << 4 for a, b in zip(row[0::2], row[1::2])] for row in q]
    assert torch.equal(mmi.unpack_int4(packed), q)
    every = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(2, 128)
    assert torch.equal(mmi.pack_int4(mmi.unpack_int4(every)), every)
    # slabs: 37 rows of 96 inputs (48 bytes) -> 48 rows (3 slabs), each row where the index says, padding q = 0
    packed = torch.randint(0, 256, (37, 48), generator=torch.Generator().manual_seed(1)).to(torch.uint8)
    slabs = mmi.to_slabs(packed)
    assert slabs.shape == (48, 48) and torch.equal(_int4_rows(slabs, 37), packed)
    assert _int4_rows(slabs, 48)[37:].eq(0x88).all() and torch.equal(mmi.from_slabs(slabs, 37), packed)


def test_int4_pads_inputs_up_to_whole_groups():
    """in_features not a multiple of group_size: the row is padded with zero weights (q 0, nibble 8) up to whole
    groups and whole 32-input pieces; the last real group's scale comes from its real inputs, an all-padding group's
    is 0, and dequantize drops the padding. int8 (one group per row) never pads. An odd group_size or other bits
    are refused."""
    w = torch.randn(3, 10, generator=torch.Generator().manual_seed(1))
    layer = mmi.QuantizedLinear.from_linear(_linear_of(w), 4, group_size=4)
    assert layer.qweight.shape == (16, 16) and layer.scales.shape == (3, 8)      # 32 inputs: whole 32-input pieces
    assert _int4_rows(layer.qweight, 3)[:, 5:].eq(0x88).all()                   # inputs 10.. are q 0 (nibble 8)
    assert torch.equal(layer.scales[:, 2], w[:, 8:].abs().amax(-1) / 7) and layer.scales[:, 3:].eq(0).all()
    assert layer.dequantize().shape == (3, 10)
    assert (layer.dequantize() - w).abs().le(layer.scales.repeat_interleave(4, 1)[:, :10] / 2 + 1e-7).all()
    layer8 = mmi.QuantizedLinear.from_linear(_linear_of(w), 8)
    assert layer8.qweight.shape == (3, 10) and layer8.scales.shape == (3, 1) and layer8.group_size == 10
    with pytest.raises(ValueError, match="group_size=5"):
        mmi.QuantizedLinear.from_linear(_linear_of(w), 4, group_size=5)
    with pytest.raises(ValueError, match="bits=3"):
        mmi.QuantizedLinear.from_linear(_linear_of(w), 3)


def _dequantize_by_hand(layer):
    """The weight the buffers stand for, read by the layout QuantizedLinear documents, in float64."""
    b = (_int4_rows(layer.qweight, layer.out_features) if layer.bits == 4 else layer.qweight).to(torch.int64)
    q = torch.stack([b & 15, b >> 4], -1).flatten(1) - 8 if layer.bits == 4 else b
    group = torch.arange(q.shape[1]) // layer.group_size
    return (q.double() * layer.scales.double()[:, group])[:, :layer.in_features]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_linear_is_f_linear_of_its_dequantized_weight(bits, dtype):
    """forward = F.linear(x, weight read from the documented layout, bias) exactly, in the layer's dtype; in
    float32 each weight is within scale / 2 of the original, so each output within 0.5 * sum_i |x_i| scale_i."""
    g = torch.Generator().manual_seed(2)
    linear = _linear_of(torch.randn(20, 300, generator=g).to(dtype), torch.randn(20, generator=g).to(dtype))
    layer = mmi.QuantizedLinear.from_linear(linear, bits)                    # int4: 300 inputs -> 3 groups of 128
    assert layer.scales.dtype == dtype and layer.bias is linear.bias
    assert layer.qweight.shape == ((20, 300) if bits == 8 else (32, 192))              # int4: 2 slabs of 16 rows
    x = torch.randn(5, 300, generator=g).to(dtype)
    weight = _dequantize_by_hand(layer).to(dtype)                             # q * scale rounded once to dtype
    assert torch.equal(layer.dequantize(), weight)
    assert torch.equal(layer(x), F.linear(x, weight, linear.bias))
    if dtype == torch.float32:
        w, dq = linear.weight.double(), weight.double()
        scale = layer.scales.double().repeat_interleave(layer.group_size, 1)[:, :300]
        assert ((w - dq).abs() <= scale / 2 * (1 + 2 ** -20)).all()
        bound = 0.5 * x.double().abs() @ scale.T * (1 + 2 ** -20)
        assert ((F.linear(x.double(), w) - F.linear(x.double(), dq)).abs() <= bound).all()


def _quantized_names(model):
    return {n for n, m in model.named_modules() if isinstance(m, mmi.QuantizedLinear)}


def test_quantize_replaces_exactly_the_listed_layers(tmp_path):
    """The LLM's q/k/v/o and gate/up/down, its MMFS layers' query and output matmuls, the text head and every
    Linear of the two Q-Formers become QuantizedLinear; every other module keeps its type and every other tensor its
    value. A quantized model is not saved (from_pretrained could not read it)."""
    model = tiny_model()
    plain = copy.deepcopy(model)
    q = mmi.quantize(model, bits=4)
    L = model.cfg.llm.num_hidden_layers
    listed = {f"mm_decoder.layers.{i}.self_attn.{p}_proj" for i in range(L) for p in "qkvo"}
    listed |= {f"mm_decoder.layers.{i}.mlp.{p}_proj" for i in range(L) for p in ("gate", "up", "down")}
    mmfs = [i for i in range(L) if model.mm_decoder.layers[i].llama_cross_attn is not None]
    listed |= {f"mm_decoder.layers.{i}.llama_cross_attn.attn.{p}" for i in mmfs
               for p in ("dynamic_offset_mask", "output_proj")}
    listed |= {"text_decoder.head"} | {n for n, m in plain.named_modules() if isinstance(m, torch.nn.Linear) and
                                       n.startswith(("visual_tokenizer.perceiver_resampler.",
                                                     "image_decoder.perceiver_resampler."))}
    assert mmfs and q is model and _quantized_names(q) == listed and len(listed) == 7 * L + 2 * len(mmfs) + 1 + 26
    assert [(n, type(m)) for n, m in q.named_modules() if n not in listed] == \
        [(n, type(m)) for n, m in plain.named_modules() if n not in listed]
    kept = q.state_dict()
    assert all(torch.equal(kept[k], t) for k, t in plain.state_dict().items() if k.rpartition(".")[0] not in listed
               or k.endswith(".bias"))
    assert mmi.quantize_targets(q) == [] and _quantized_names(mmi.quantize(q, bits=8)) == listed   # nothing left
    with pytest.raises(ValueError, match="quantized layers"):
        q.save_pretrained(str(tmp_path / "q"))


def _forced_logits(model, batch, tokens):
    """Each step's next-token logits (B, T, V) with `tokens` (B, T) fed, recomputed over the whole sequence."""
    full = _decoders(model, batch, tokens.shape[1])[1]
    with torch.no_grad():
        return torch.stack([full.prefill()] + [full.step(tokens[:, i]) for i in range(tokens.shape[1] - 1)], 1)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_greedy_text_differs_only_where_margins_allow(bits):
    """Greedy decoding, quantized vs plain. The logits' relative error is within the sum of the layers' relative
    weight errors (first order: each layer's error passes on once). A greedy token cannot change where the
    plain model's top-two margin exceeds twice the largest logit change, so the texts are equal up to each row's
    first step without that margin; with int8 those steps are most of them."""
    model = tiny_model(seed=7)
    q = mmi.quantize(copy.deepcopy(model), bits)
    batch = make_batch(model.cfg, DECODE_ROWS, 24, left_pad=True)
    T = 16
    kw = dict(max_new_tokens=T, min_new_tokens=T, num_beams=1)                # no stop token: T steps each
    ref, out = model.generate_texts(batch, **kw)["text_ids"], q.generate_texts(batch, **kw)["text_ids"]
    plain, quant = _forced_logits(model, batch, ref), _forced_logits(q, batch, ref)
    layer_errs = [rel_err(q.get_submodule(n).dequantize(), model.get_submodule(n).weight.detach())
                  for n in _quantized_names(q)]
    assert rel_err(quant, plain) <= sum(layer_errs)
    allowed = plain.clone()
    allowed[..., [model.cfg.eos_token_id, model.cfg.soi_token_id]] = -float("inf")   # min_new_tokens masks them
    top2 = allowed.topk(2, dim=-1).values
    decided = (top2[..., 0] - top2[..., 1] > 2 * (quant - plain).abs().amax(-1)).long().cumprod(1).sum(1)
    for row, n in enumerate(decided.tolist()):
        assert torch.equal(out[row, :n], ref[row, :n]), (row, n)
    if bits == 8:
        assert decided.sum() >= 0.5 * ref.numel(), decided


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_quantized_fast_decoding_equals_the_plain_path(device):
    """The fast path's step (linear() with norms and residuals folded, a CUDA graph on CUDA) runs a
    QuantizedLinear through its own forward: the tokens of the plain full recomputation, and images still come."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model = mmi.quantize(tiny_model(seed=8), bits=4).to(device)
    batch = {k: v.to(device) if torch.is_tensor(v) else v
             for k, v in make_batch(model.cfg, DECODE_ROWS, 24, left_pad=True).items()}
    for kw in (dict(num_beams=1), dict(num_beams=3, num_return_sequences=2)):
        a = model.generate_texts(batch, max_new_tokens=6, min_new_tokens=2, fast=True, **kw)
        b = model.generate_texts(batch, max_new_tokens=6, min_new_tokens=2, use_cache=False, **kw)
        assert torch.equal(a["text_ids"], b["text_ids"]), kw
    images = model.generate_images(batch, steps=2, progress=False)["image"]
    assert images.shape == (3, 3, 64, 64) and images.isfinite().all() and 0 <= images.min() <= images.max() <= 1


def _load_tiny(source, tmp_path, originals, **kw):
    if source == "pretrained":
        path = tmp_path / "tiny"
        if not path.exists():
            tiny_model(seed=3).save_pretrained(str(path))
        return mmi.MMInterleaved.from_pretrained(str(path), **kw)
    torch.manual_seed(0)                                   # the new parts' init draws
    return _load(originals[0], **kw)


@pytest.fixture
def originals_if_needed(request):
    return request.getfixturevalue("originals") if request.node.callspec.params["source"] == "original" else None


@pytest.mark.parametrize("source", ["pretrained", "original"])
def test_quantize_on_load_equals_quantize_after_load(source, tmp_path, originals_if_needed):
    for quantize, bits in (("int8", 8), ("int4", 4)):
        on_load = _load_tiny(source, tmp_path, originals_if_needed, quantize=quantize).state_dict()
        after = mmi.quantize(_load_tiny(source, tmp_path, originals_if_needed), bits).state_dict()
        assert list(on_load) == list(after)
        assert all(a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(on_load.values(), after.values()))
    with pytest.raises(mmi.InputError, match="quantize='int3': expected None, 'int8' or 'int4'"):
        _load_tiny(source, tmp_path, originals_if_needed, quantize="int3")


def _float_target_bytes(model):
    """Bytes of the full-precision weights and biases of quantize_targets' layers that hold values (not meta)."""
    return sum(t.numel() * t.element_size() for n in mmi.quantize_targets(model)
               for t in model.get_submodule(n).parameters() if not t.is_meta)


@pytest.mark.parametrize("source", ["pretrained", "original"])
def test_quantize_on_load_holds_one_float_layer_at_a_time(source, tmp_path, originals_if_needed):
    """The memory measure: the bytes of full-precision target weights that hold values, counted just before each
    layer is swapped for its QuantizedLinear (seen by torch's public module-registration hook); between swaps
    that count only grows, so these are its peaks. From our own files it never exceeds the largest layer; from
    the released files the text head (whose new rows are set after all files are read) waits beside it."""
    plain = _load_tiny(source, tmp_path, originals_if_needed)
    sizes = {n: sum(t.numel() * t.element_size() for t in plain.get_submodule(n).parameters())
             for n in mmi.quantize_targets(plain)}
    head = sizes["text_decoder.head"] if source == "original" else 0
    roots, peaks = [], []

    def on_register(module, name, child):
        if not roots and isinstance(module, mmi.MMInterleaved):       # the model the loader builds on meta
            roots.append(module)
        if isinstance(child, mmi.QuantizedLinear):
            peaks.append(_float_target_bytes(roots[0]))

    handle = torch.nn.modules.module.register_module_module_registration_hook(on_register)
    try:
        model = _load_tiny(source, tmp_path, originals_if_needed, quantize="int4")
    finally:
        handle.remove()
    assert roots[0] is model and len(peaks) == len(sizes) and _float_target_bytes(model) == 0
    assert max(peaks) <= head + max(sizes.values()) < sum(sizes.values()) / 3


def test_bench_quant_error_is_zero_on_the_grid_and_int4_worse():
    """bench.py quant's measures. Weights on the quantization grid (integers times a power of two, each row (int8)
    or group of 128 (int4) reaching qmax) are kept exactly: error 0; int8's 255 levels are not int4's 15. At the
    tiny preset's shapes, one row per (part, N x K) covering every target, random weights lose more to int4 than
    to int8. Tokens agree up to each list's first difference."""
    import bench
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 256, generator=g)
    w8 = torch.randint(-127, 128, (6, 256), generator=g).float()
    w8[:, 5] = 127
    w4 = torch.randint(-7, 8, (6, 256), generator=g).float()
    w4[:, [3, 200]] = -7
    assert bench.quant_matmul_error(w8 / 64, x, 8) == 0 and bench.quant_matmul_error(w4 / 8, x, 4) == 0
    assert bench.quant_matmul_error(w8 / 64, x, 4) > 0
    assert bench.quant_matmul_error(w4 / 8, x, 4, rows_per_chunk=4) == 0          # chunks of rows: the same sums
    cfg = mmi.MMIConfig.from_preset("tiny")
    rows = bench.quant_layer_errors(cfg, "cpu", torch.float32)
    with torch.device("meta"):
        targets = mmi.quantize_targets(mmi.MMInterleaved(cfg))
    assert sum(r[4] for r in rows) == len(targets) and len({r[:4] for r in rows}) == len(rows)
    mmfs = sum(".llama_cross_attn." in n for n in targets)                    # their query and output: 64 x 64
    assert mmfs and ("LLM", "q, k, v, o, MMFS query, MMFS out", 64, 64, 4 * cfg.llm.num_hidden_layers + mmfs) in \
        [r[:5] for r in rows]
    assert all(0 < err8 < err4 < 1 for *_, err8, err4 in rows)
    assert bench.token_agreement([[1, 2, 3], [4, 5], [6]], [[1, 2, 9], [4, 5], [6, 7]]) == (5 / 6, 1 / 3)


def test_sample_quantize_runs_on_the_demo_and_bad_is_one_line(tmp_path, capsys):
    """sample.py --quantize=int8 loads the demo quantized and writes a run; --quantize=bad is one line, exit 2,
    before any model work (eval.py's too)."""
    argv = ["--init_from=demo", f"--out={tmp_path / 'out'}", "--steps=2", "--max_new_tokens=4", "--min_new_tokens=0",
            "--num_iter=2", "--device=cpu"]
    model, _ = sample.load_model(sample.parse_args(argv + ["--quantize=int8"]))
    assert _quantized_names(model) == set(mmi.quantize_targets(mmi.MMInterleaved.from_pretrained(ev.DEMO_MODEL)))
    assert {m.bits for m in model.modules() if isinstance(m, mmi.QuantizedLinear)} == {8}
    del model
    assert sample.main(argv + ["--quantize=int8"]) == 0
    result = _check_sample_run(tmp_path / "out", capsys)       # what made the run is kept with it
    assert {k: result[k] for k in ("init_from", "device", "dtype", "quantize", "sampler", "steps", "guidance_scale")} \
        == {"init_from": "demo", "device": "cpu", "dtype": "float32", "quantize": "int8", "sampler": "ddim",
            "steps": 2, "guidance_scale": sample.DEMO_SETTINGS["guidance_scale"]}
    for main, message in ((sample.main, "--quantize=bad: expected none, int8 or int4"),
                          (ev.main, "argument --quantize: invalid choice: 'bad'")):
        assert mmi.run_script(main, [f"--out={tmp_path / 'bad'}", "--quantize=bad"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
    assert not os.path.exists(tmp_path / "bad")


# ----------------------------------------------------------------------------------------------------------------
# data.py: the tokenizer
# ----------------------------------------------------------------------------------------------------------------


DEMO_TOK = os.path.join(HERE, "assets", "demo_tokenizer.model")


SENTENCES = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "  two  leading spaces and trailing  ",
    "a dog" + data.image_placeholder(3) + "The cat sat on the mat.</s>",
    "x <|image|> y <|beginofimage|>  z",
    "ends with a space </s>",
    "<|beginofimage|><|image|>hello</s>",
    "Ünïcödé 中文, emoji 🙂, tabs\tand\nnewlines, digits 12345.",
    "caption first" + data.image_placeholder(2) + "</s><s>next document</s>",
]


def test_tokenizer_ids_equal_transformers_slow_llama_tokenizer():
    """Our ids == transformers' slow LlamaTokenizer (legacy) with the two image tokens added as special tokens
    that strip surrounding whitespace (transformers 4.31's treatment of string special tokens); LLaMA layout."""
    path = mistral_model_path()
    transformers = oracle_transformers()
    from tokenizers import AddedToken
    ref = transformers.LlamaTokenizer(path, legacy=True)
    ref.add_special_tokens({"additional_special_tokens": [
        AddedToken(data.SOI_TOKEN, lstrip=True, rstrip=True), AddedToken(data.IMAGE_TOKEN, lstrip=True, rstrip=True)]})
    tok = data.Tokenizer(path)
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id, tok.soi_id, tok.image_id, tok.vocab_size) == \
        (0, 1, 2, 31999, 32000, 32001, 32002)
    assert ref.convert_tokens_to_ids([data.SOI_TOKEN, data.IMAGE_TOKEN]) == [32000, 32001]
    for s in SENTENCES:
        assert tok.encode(s) == ref(s)["input_ids"], s
        assert tok.encode(s, add_bos=False) == ref(s, add_special_tokens=False)["input_ids"], s
    ids = tok.encode(data.image_placeholder(64))
    assert ids == [1, 32000] + [32001] * 64
    for s in SENTENCES[:2] + SENTENCES[7:8]:
        assert tok.decode(tok.encode(s)) == ref.decode(ref(s)["input_ids"], skip_special_tokens=True) == s
    # sentencepiece's decode keeps leading spaces that HF's legacy decode trims by one: ours round-trips exactly
    assert tok.decode(tok.encode(SENTENCES[2])) == SENTENCES[2]


def test_tokenizer_ids_equal_transformers_4_31_when_available(tmp_path):
    """Parity with the original's pinned transformers 4.31 (init_tokenizer: slow AutoTokenizer, special tokens
    added as strings, pad 31999). Needs MMI_TF431_PYTHON = a python with transformers==4.31.0 installed."""
    python = os.environ.get("MMI_TF431_PYTHON")
    if not python:
        pytest.skip("set MMI_TF431_PYTHON to a python with transformers 4.31 to run this oracle")
    import shutil
    import subprocess
    shutil.copy(mistral_model_path(), tmp_path / "tokenizer.model")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer",
                                                                "bos_token": "<s>", "eos_token": "</s>"}))
    (tmp_path / "sents.json").write_text(json.dumps(SENTENCES))
    script = ("import json, sys; from transformers import AutoTokenizer\n"
              "t = AutoTokenizer.from_pretrained(sys.argv[1], use_fast=False)\n"
              "t.add_special_tokens({'additional_special_tokens': t.all_special_tokens + "
              "['<|beginofimage|>', '<|image|>']}); t.pad_token_id = 31999\n"
              "s = json.load(open(sys.argv[1] + '/sents.json'))\n"
              "print(json.dumps([[t(x)['input_ids'] for x in s], [t.decode(t(x)['input_ids'], "
              "skip_special_tokens=True) for x in s]]))\n")
    out = subprocess.run([python, "-c", script, str(tmp_path)], capture_output=True, text=True, check=True).stdout
    ref_ids, ref_text = json.loads(out.strip().splitlines()[-1])
    tok = data.Tokenizer(str(tmp_path / "tokenizer.model"))
    assert [tok.encode(s) for s in SENTENCES] == ref_ids
    assert [tok.decode(tok.encode(s)) for s in SENTENCES] == ref_text


def test_tokenizer_json_gives_the_sentencepiece_model_ids(tmp_path):
    """A LLaMA tokenizer.json (transformers' own slow->fast conversion) through `tokenizers` encodes and
    decodes exactly like the .model through sentencepiece, with the same special-id layout."""
    path = mistral_model_path()
    pytest.importorskip("google.protobuf")  # the converter reads the .model proto
    transformers = oracle_transformers()
    fast = transformers.LlamaTokenizerFast(vocab_file=path, legacy=True, from_slow=True, add_prefix_space=True)
    json_path = str(tmp_path / "tokenizer.json")
    fast.backend_tokenizer.save(json_path)
    a, b = data.Tokenizer(path), data.Tokenizer(json_path)
    assert (b.bos_id, b.eos_id, b.pad_id, b.soi_id, b.image_id, b.vocab_size) == (1, 2, 31999, 32000, 32001, 32002)
    for s in SENTENCES:
        assert a.encode(s) == b.encode(s), s
        assert a.decode(a.encode(s)) == b.decode(b.encode(s)), s
        assert a.decode(a.encode(s), skip_special=False) == b.decode(b.encode(s), skip_special=False), s


@pytest.mark.parametrize("name, content, message", [
    ("tokenizer.model", b"garbage", "cannot be read as a SentencePiece tokenizer.model (INTERNAL: could not parse"),
    ("tokenizer.model", b"", "cannot be read as a SentencePiece tokenizer.model"),
    ("tokenizer.json", b'{"model": {"type": "Nope"}}', "cannot be read as a tokenizers tokenizer.json (data did not"),
    ("tokenizer.json", b"[", "cannot be read as a tokenizers tokenizer.json"),
    ("tokenizer.model", None, "is a folder, expected a SentencePiece tokenizer.model"),
    ("nowhere.model", False, "no such file, expected a SentencePiece tokenizer.model"),
], ids=["garbage", "empty", "json_no_variant", "json_cut", "folder", "missing"])
def test_a_broken_tokenizer_file_is_an_input_error_naming_it(tmp_path, name, content, message):
    path = tmp_path / name
    if content is None:
        path.mkdir()
    elif content is not False:
        path.write_bytes(content)
    with pytest.raises(mmi.InputError) as e:
        data.Tokenizer(str(path))
    assert str(e.value).startswith(f"{path}: {message}") and "\n" not in str(e.value), str(e.value)


def test_clean_image_spaces_removes_one_space_each_side():
    t = "a " + data.SOI_TOKEN + " " + data.IMAGE_TOKEN + " " + data.IMAGE_TOKEN + " b  c"
    assert data.clean_image_spaces(t) == "a" + data.SOI_TOKEN + data.IMAGE_TOKEN * 2 + "b  c"


def test_demo_tokenizer_has_llama_layout_and_is_reproducible(tmp_path):
    """assets/demo_tokenizer.model: unk/bos/eos = 0/1/2, pad = N-1 (a control piece, never produced),
    soi = N, image = N+1; retraining from the corpus reproduces the file byte for byte."""
    import sentencepiece
    tok = data.Tokenizer(DEMO_TOK)
    sp = sentencepiece.SentencePieceProcessor(model_file=DEMO_TOK)
    n = sp.get_piece_size()
    assert [sp.id_to_piece(i) for i in (0, 1, 2, n - 1)] == ["<unk>", "<s>", "</s>", "<pad>"]
    layout = (tok.bos_id, tok.eos_id, tok.pad_id, tok.soi_id, tok.image_id, tok.vocab_size)
    assert layout == (1, 2, n - 1, n, n + 1, n + 2)
    text = data.make_story(7).texts[0]
    ids = tok.encode(text)
    assert tok.pad_id not in ids and tok.unk_id not in ids and tok.decode(ids) == text
    assert len(ids) <= len(text.split()) + 3  # grammar words are single pieces
    retrained = data.train_demo_tokenizer(str(tmp_path / "t.model"))
    assert open(retrained, "rb").read() == open(DEMO_TOK, "rb").read()


# ----------------------------------------------------------------------------------------------------------------
# data.py: images
# ----------------------------------------------------------------------------------------------------------------


def test_center_crop_is_box_halving_bicubic_then_crop():
    """300x200 -> 64: BOX halving once (200 >= 128) to 150x100, bicubic to 96x64, crop columns 16..80; 256x128:
    halved once (128 >= 128), then cropped."""
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (200, 300, 3), dtype=np.uint8))
    want = np.asarray(img.resize((150, 100), Image.BOX).resize((96, 64), Image.BICUBIC))[:, 16:80]
    got = data.center_crop_arr(img, 64)
    assert got.shape == (64, 64, 3) and np.array_equal(got, want)
    enc, dec = data.DualTransform(64, 128)(img)
    assert enc.shape == (3, 64, 64) and dec.shape == (3, 128, 128) and enc.dtype == np.uint8
    assert np.array_equal(enc, want.transpose(2, 0, 1))
    f = data.to_float01(enc)
    assert f.dtype == torch.float32
    assert torch.equal(f, torch.from_numpy(want.astype(np.float32) / 255.0).permute(2, 0, 1))
    # a short side of exactly twice the target is halved too (the original's >=): 256x128 -> BOX 128x64, then only
    # the crop (columns 32..96)
    img = Image.fromarray(rng.integers(0, 256, (128, 256, 3), dtype=np.uint8))
    want = np.asarray(img.resize((128, 64), Image.BOX))[:, 32:96]
    assert np.array_equal(data.center_crop_arr(img, 64), want)
    # 201x100 -> 64: no halving, bicubic to 129x64 (201 * 0.64 = 128.64 rounds up), then an odd margin of 65
    # leaves 32 columns on the left, 33 on the right (columns 32..96)
    img = Image.fromarray(rng.integers(0, 256, (100, 201, 3), dtype=np.uint8))
    want = np.asarray(img.resize((129, 64), Image.BICUBIC))[:, 32:96]
    assert np.array_equal(data.center_crop_arr(img, 64), want)


# ----------------------------------------------------------------------------------------------------------------
# data.py: fixtures
# ----------------------------------------------------------------------------------------------------------------


# Fixtures write small real datasets to tmp_path: JPEGs with Pillow, jsonl / jsonl.zip MMC4 shards, LAION-style
# annotation files.
PALETTE = {"red": (230, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 230), "yellow": (240, 230, 20),
           "black": (10, 10, 10), "white": (245, 245, 245), "cyan": (20, 220, 220), "magenta": (220, 20, 220)}


def write_jpeg(path, colour, size=(40, 30)):
    Image.new("RGB", size, PALETTE[colour]).save(path, "JPEG", quality=95)


def colour_of(chw):
    """Nearest palette colour of an image tensor/array (3, S, S)."""
    mean = np.asarray(chw, dtype=np.float64).reshape(3, -1).mean(1)
    mean = mean * 255 if mean.max() <= 1.0 else mean
    return min(PALETTE, key=lambda c: ((np.array(PALETTE[c]) - mean) ** 2).sum())


def mmc4_doc(names_colours, sims=None, n_text=None):
    """A document whose k-th sentence names the colour of the k-th image, which is matched to it."""
    texts = [f"this is {c} number {k}." for k, (_, c) in enumerate(names_colours)]
    texts += [f"filler {k}." for k in range(len(texts), n_text or len(texts))]
    sims = sims or [0.3] * len(names_colours)
    return {"text_list": texts, "similarity_matrix": [[0.0] * len(texts) for _ in names_colours],
            "image_info": [{"image_name": n, "matched_text_index": k, "matched_sim": s}
                           for k, ((n, _), s) in enumerate(zip(names_colours, sims))]}


def write_zip_shard(path, docs, extra_lines=()):
    lines = [json.dumps(d) for d in docs] + list(extra_lines)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr(os.path.basename(path)[:-4], "\n".join(lines) + "\n")


def make_images(root, n, prefix="img"):
    colours = list(PALETTE)
    out = []
    for i in range(n):
        name, colour = f"{prefix}{i}.jpg", colours[i % len(colours)]
        write_jpeg(os.path.join(root, name), colour)
        out.append((name, colour))
    return out


def demo_tok():
    return data.Tokenizer(DEMO_TOK)


def check_row_alignment(tok, batch, n_img_tok):
    """Every image of the batch sits at the soi that introduces the sentence naming its colour (the tests
    place images first), and its pixels have that colour; counts agree everywhere."""
    k = 0
    for b in range(batch["text_ids"].shape[0]):
        ids = batch["text_ids"][b][batch["attention_mask"][b].bool()].tolist()
        soi = [i for i, t in enumerate(ids) if t == tok.soi_id]
        assert len(soi) == int(batch["num_image_per_seq"][b])
        assert sum(t == tok.image_id for t in ids) == len(soi) * n_img_tok
        for s in soi:
            assert ids[s + 1:s + 1 + n_img_tok] == [tok.image_id] * n_img_tok
            rest = ids[s + 1 + n_img_tok:]
            stop = next((j for j, t in enumerate(rest) if t in (tok.soi_id, tok.eos_id)), len(rest))
            sentence = tok.decode(rest[:stop])
            colour = colour_of(batch["image_tensors"][k])
            expected = f"this is {colour} number"
            if len(sentence) < len(expected):  # the row ends inside the sentence
                assert expected.startswith(sentence) and stop == len(rest), (sentence, colour)
            else:
                assert sentence.startswith(expected), (sentence, colour)
            assert colour_of(batch["image_tensors_dec"][k]) == colour
            k += 1
    assert k == batch["image_tensors"].shape[0] == int(batch["num_image_per_seq"].sum())
    assert batch["nearest_bos_idxs"].shape == (k,)


# ----------------------------------------------------------------------------------------------------------------
# data.py: readers
# ----------------------------------------------------------------------------------------------------------------


def test_expand_braces():
    assert data.expand_braces("docs_shard_{0..2}_v2.jsonl") == [f"docs_shard_{i}_v2.jsonl" for i in range(3)]
    assert data.expand_braces("{0000008..0000011}.txt") == ["0000008.txt", "0000009.txt", "0000010.txt", "0000011.txt"]
    assert data.expand_braces("a{x,y}b{1..2}") == ["axb1", "axb2", "ayb1", "ayb2"]
    assert len(data.expand_braces("docs_shard_{0..23099}_v2.jsonl")) == 23100


def test_mmc4_zip_shard_rules_threshold_max_images_order_and_eos(tmp_path):
    """From a zipped jsonl shard and a JPEG folder: images below matched_sim 0.24 never appear; at most 6 of
    10 are kept, in sentence order; each placeholder sits before (img_first_prob=1) its sentence; "</s>" ends
    the text; bos starts it."""
    imgs = make_images(tmp_path, 10)
    doc_many = mmc4_doc(imgs)  # 10 usable images
    doc_low = mmc4_doc(imgs[:3], sims=[0.1, 0.3, 0.23])  # only image 1 passes
    write_zip_shard(str(tmp_path / "docs_shard_0_v2.jsonl.zip"), [doc_many, doc_low] * 3)
    tok = demo_tok()
    src = data.mmc4_source("docs_shard_{0..0}_v2.jsonl", str(tmp_path), str(tmp_path), tok,  # read via ".zip"
                           data.DualTransform(16, 24), num_img_token=4, img_first_prob=1.0)
    reader = data.Reader()
    samples = list(src.samples(reader, 0, 0))
    many = [s for s in samples if len(s.image_info) > 1]
    assert all(len(s.image_info) == 6 for s in many) and len(many) == 3
    for s in many:
        order = [int(n[3:-4]) for n in s.image_info]
        assert order == sorted(order)
        text = tok.decode(s.text_ids, skip_special=False)
        assert s.text_ids[0] == tok.bos_id and s.text_ids[-1] == tok.eos_id and text.endswith("</s>")
        for n, img in zip(s.image_info, s.images):
            assert colour_of(img) == dict(imgs)[n]
    assert len({tuple(s.image_info) for s in many}) > 1  # the choice of 6 is random per document
    for s in samples:
        if len(s.image_info) == 1:
            assert s.image_info == ["img1.jpg"]
    assert reader.stats["lines"] == 6 and reader.stats["docs_used"] + reader.stats["doc:single_image_dropped"] == 6


def test_mmc4_placement_and_single_image_drop_probabilities(tmp_path):
    """img_first_prob 0.5 puts the placeholder before its sentence about half the time; one-image documents
    are dropped with probability 0.5 (binomial bounds at ~4.5 sigma)."""
    write_jpeg(str(tmp_path / "a.jpg"), "red")
    (tmp_path / "s.jsonl").write_text("\n".join(json.dumps(mmc4_doc([("a.jpg", "red")], n_text=2))
                                                for _ in range(400)) + "\n")
    tok = demo_tok()
    src = data.mmc4_source("s.jsonl", str(tmp_path), str(tmp_path), tok, data.DualTransform(8, None), num_img_token=2)
    reader = data.Reader()
    kept = list(src.samples(reader, 0, 0))
    assert 155 <= len(kept) <= 245 and reader.stats["doc:single_image_dropped"] == 400 - len(kept)
    first = sum(int(s.text_ids[1] == tok.soi_id) for s in kept)
    assert 0.3 * len(kept) <= first <= 0.7 * len(kept)
    again = list(src.samples(data.Reader(), 0, 0))  # per-document generators: the same choices again
    assert [s.text_ids.tolist() for s in again] == [s.text_ids.tolist() for s in kept]
    # the generators are named by epoch too: epoch 1 drops and places afresh (400 copies of one document, so only
    # the choices, not the read order, can tell the epochs apart)
    epoch1 = list(src.samples(data.Reader(), 1, 0))
    assert 155 <= len(epoch1) <= 245
    assert sorted(s.text_ids.tolist() for s in epoch1) != sorted(s.text_ids.tolist() for s in kept)


def test_text_whose_placeholders_do_not_match_its_images_is_skipped():
    """tokenize_with_images keeps images and placeholders aligned: a text must hold exactly one soi and
    num_img_token image tokens per image, else the sample is skipped as placeholder_mismatch."""
    tok, ph = demo_tok(), data.image_placeholder(4)
    ids = data.tokenize_with_images(f"a red{ph} and a blue{ph}.", tok, 2, 4, "doc 0")
    assert (int((ids == tok.soi_id).sum()), int((ids == tok.image_id).sum())) == (2, 8)
    short, long = data.SOI_TOKEN + data.IMAGE_TOKEN * 3, ph + data.IMAGE_TOKEN
    for text in (f"a red{ph} and a blue.", f"a red{short} and a blue{ph}.", f"a red{long} and a blue{ph}."):
        with pytest.raises(data.SkipSample, match="doc 0: ") as e:
            data.tokenize_with_images(text, tok, 2, 4, "doc 0")
        assert e.value.reason == "placeholder_mismatch", text


def test_mmc4_checks_matched_text_index_of_chosen_images_only(tmp_path):
    """The original places only the images it keeps: an index outside the sentences on an image below the
    threshold, or on one that fails to load, leaves the document whole; on a chosen image it drops it."""
    imgs = make_images(tmp_path, 2)
    tok = demo_tok()
    load = data.ImageFolder(str(tmp_path), data.DualTransform(8, None))

    def build(doc):
        stats = Counter()
        s = data.build_mmc4_sample(doc, load, tok, random.Random(0), stats, num_img_token=2, img_first_prob=1.0,
                                   single_image_keep_prob=1.0)
        return s.image_info, stats

    doc = mmc4_doc(imgs, sims=[0.3, 0.1])
    doc["image_info"][1]["matched_text_index"] = 99                        # below the threshold
    assert build(doc) == (["img0.jpg"], Counter())
    doc = mmc4_doc(imgs + [("missing.jpg", "red")])
    doc["image_info"][2]["matched_text_index"] = -1                        # cannot load
    assert build(doc) == (["img0.jpg", "img1.jpg"], Counter({"image:image_missing": 1}))
    doc = mmc4_doc(imgs)
    doc["image_info"][1]["matched_text_index"] = 2                         # chosen
    with pytest.raises(data.SkipSample, match="matched_text_index 2 of img1.jpg is not one of the 2 sentences"):
        build(doc)
    del doc["image_info"][1]["matched_text_index"]                         # every image needs one, as the original
    with pytest.raises(data.SkipSample, match="KeyError"):
        build(doc)


def test_pair_lines_parse_lowercase_and_cut_overlong_text(tmp_path):
    write_jpeg(str(tmp_path / "p.jpg"), "blue")
    tok = demo_tok()
    info = data.parse_pair_line(b'{"image": "p.jpg", "caption": "A Blue Square"}')
    assert info == {"image": "p.jpg", "caption": "A Blue Square"}
    assert data.parse_pair_line("{'image': 'p.jpg', 'caption': ['Two', 'Parts']}\n")["caption"] == "Two Parts"
    with pytest.raises(data.SkipSample):
        data.parse_pair_line("not a dict at all")
    load = data.ImageFolder(str(tmp_path), data.DualTransform(8, None))
    firsts = set()
    for seed in range(20):
        s = data.build_pair_sample(info, load, tok, random.Random(seed), num_img_token=3)
        text = tok.decode(s.text_ids, skip_special=False)
        firsts.add(text.startswith("<s>" + data.SOI_TOKEN))
        assert "a blue square" in text and text.endswith("</s>") and s.images.shape == (1, 3, 8, 8)
    assert firsts == {True, False}
    long_info = {"image": "p.jpg", "caption": "word " * 100}
    for seed in range(10):  # image last: keep the trailing soi + 3 image tokens + eos
        s = data.build_pair_sample(long_info, load, tok, random.Random(seed), num_img_token=3, num_total_token=40)
        full = tok.encode(("word " * 100) + data.image_placeholder(3) + "</s>")
        assert len(s.text_ids) == 40
        if s.text_ids[1] != tok.soi_id:
            assert s.text_ids.tolist() == full[:35] + full[-5:]


def test_special_strings_in_a_caption_are_removed_not_read_as_an_image(tmp_path):
    """A caption that spells out the soi or image token gets neither: the pair keeps its one image's tokens."""
    write_jpeg(str(tmp_path / "p.jpg"), "blue")
    tok = demo_tok()
    info = {"image": "p.jpg", "caption": f"a {data.SOI_TOKEN}blue{data.IMAGE_TOKEN} square"}
    s = data.build_pair_sample(info, data.ImageFolder(str(tmp_path), data.DualTransform(8, None)), tok,
                               random.Random(0), num_img_token=3)
    assert (s.text_ids == tok.soi_id).sum() == 1 and (s.text_ids == tok.image_id).sum() == 3
    assert "a blue square" in tok.decode(s.text_ids)


def test_place_images_orders_tensors_by_the_original_text():
    """Images 0,1 before sentence 0 and image 2 after it: the original prepends one by one, giving
    [1][0] s [2]; the tensors must follow that order."""
    text, order = data.place_images(["s0", "s1"], [0, 0, 0, 1], [True, True, False, True], "<P>")
    assert text == "<P><P>s0<P> <P>s1" and order == [1, 0, 2, 3]


def test_annt_json_inference_format(tmp_path):
    write_jpeg(str(tmp_path / "a.jpg"), "red", size=(300, 260))
    write_jpeg(str(tmp_path / "b.jpg"), "green")
    annt = [{"sentences": ["a red thing.", "then a green one."], "images": ["a.jpg", "b.jpg"], "sentence_ixs": [0, 1],
             "image_first": [True, False], "generate_mode": "generate_texts", "num_iter": 1},
            {"sentences": ["one sentence."], "images": ["a.jpg", "b.jpg"], "sentence_ixs": [0, 0],
             "image_first": [True, True]},  # both before it: b's placeholder ends up first
            {"sentences": ["x"], "images": ["missing.jpg"], "sentence_ixs": [0], "image_first": [True]},
            {"sentences": ["x"], "images": [], "sentence_ixs": [], "image_first": []}]
    (tmp_path / "annt.json").write_text(json.dumps(annt))
    tok, stats = demo_tok(), Counter()
    out = data.load_inference_annotations(str(tmp_path / "annt.json"), tok, num_img_token=4, stats=stats)
    assert len(out) == 2 and stats == Counter({"image_missing": 1, "malformed_sample": 1})
    assert [colour_of(x) for x in out[1]["image_tensors"]] == ["green", "red"]
    b = out[0]
    want = tok.encode(data.image_placeholder(4) + "a red thing. then a green one." + data.image_placeholder(4))
    assert b["text_ids"].tolist() == [want] and b["attention_mask"].sum() == len(want)
    assert b["image_tensors"].shape == (2, 3, 224, 224) and b["num_image_per_seq"].tolist() == [2]
    assert [colour_of(x) for x in b["image_tensors"]] == ["red", "green"]
    assert b["target_image_idxs"].tolist() == [1] and b["nearest_bos_idxs"].tolist() == [0, 0]


def test_annt_json_sample_with_a_non_string_sentence_or_path_is_skipped(tmp_path):
    """A sentence or image path that is not a string is a malformed sample, skipped and counted like the others."""
    write_jpeg(str(tmp_path / "a.jpg"), "red")
    good = {"sentences": ["a red thing."], "images": ["a.jpg"], "sentence_ixs": [0], "image_first": [True]}
    annt = [good, dict(good, images=[5]), dict(good, sentences=[7]), dict(good, images=[None])]
    (tmp_path / "annt.json").write_text(json.dumps(annt))
    stats = Counter()
    out = data.load_inference_annotations(str(tmp_path / "annt.json"), demo_tok(), num_img_token=4, stats=stats)
    assert len(out) == 1 and stats == Counter({"malformed_sample": 3})


# LLaVA-style records: a two-round question about one image, a question about two images at their marks
LLAVA_RECORDS = [
    {"id": "0", "image": "red.jpg", "conversations": [
        {"from": "human", "value": "<image>\nWhat colour is it?"}, {"from": "gpt", "value": "red"},
        {"from": "human", "value": "And the shape?"}, {"from": "gpt", "value": "a square"}]},
    {"id": "1", "image": ["red.jpg", "blue.jpg"], "conversations": [
        {"from": "human", "value": "First <image> then <image>: which is blue?"},
        {"from": "gpt", "value": "the second"}]},
]
LLAVA_PROMPT_START = "<s> Based on the image, please answer the question."
LLAVA_PROMPT_END = " Please provide an accurate answer within one word. The answer is:"


def write_llava(root, records=LLAVA_RECORDS):
    write_jpeg(os.path.join(root, "red.jpg"), "red")
    write_jpeg(os.path.join(root, "blue.jpg"), "blue")
    path = os.path.join(root, "llava.json")
    with open(path, "w") as f:
        json.dump(records, f)
    return path


def llava_epoch(annt, **args):
    """One pass of the llava reader on the tiny preset, one example a batch: (batches, the pass's counts)."""
    ds = data.finetune_dataset("llava", demo_tok(), mmi.MMIConfig.from_preset("tiny"), "train", 0, 1, 0, annt=annt,
                               batch_size=1, **args)
    ds.verbose = False
    return list(ds), ds.last_stats


def test_llava_text_loss_is_on_the_answer_and_eos_only(tmp_path):
    """Each round is an example: the original's prompt with the image at {image}, the question without its
    <image> mark, then " " + the answer + "</s>"; gt_text_ids is -100 on every token of the prompt and padding
    and the token itself on the answer's ("red", "</s>"); the image decoder is off (loss_img_weight 0)."""
    tok = demo_tok()
    batches, stats = llava_epoch(write_llava(tmp_path))
    assert len(batches) == 3 and stats == Counter({"lines": 3, "docs_used": 3, "rows": 3})
    texts = {tok.decode(b["text_ids"][0], skip_special=False): b for b in batches}
    image = data.SOI_TOKEN + data.IMAGE_TOKEN * 8
    b = texts[f"{LLAVA_PROMPT_START}{image} What colour is it?{LLAVA_PROMPT_END} red</s>"]
    ids, labels = b["text_ids"][0].tolist(), b["gt_text_ids"][0].tolist()
    pieces = [tok.decode([i], skip_special=False) for i in ids]
    assert pieces[-3:] == [":", "red", "</s>"]
    assert labels == [-100] * (len(ids) - 2) + ids[-2:]                     # token by token: only "red" and "</s>"
    assert b["loss_img_weight"] == 0.0 and b["num_image_per_seq"].tolist() == [1]
    assert colour_of(b["image_tensors"][0]) == "red" and b["image_tensors"].shape == (1, 3, 64, 64)
    # the second round gets the record's image too (the original prepends the mark to every round)
    assert f"{LLAVA_PROMPT_START}{image} And the shape?{LLAVA_PROMPT_END} a square</s>" in texts
    # two images at their two marks, in order; {image} stays empty (text after an image is encoded on its own, with
    # SentencePiece's "▁" in front, as the original's tokenizer does: the decoded " :")
    b = texts[f"{LLAVA_PROMPT_START} First{image} then{image} : which is blue?{LLAVA_PROMPT_END} the second</s>"]
    assert [colour_of(x) for x in b["image_tensors"]] == ["red", "blue"] and b["num_image_per_seq"].tolist() == [2]
    learned = [t for t, l in zip(b["text_ids"][0].tolist(), b["gt_text_ids"][0].tolist()) if l != -100]
    assert tok.decode(learned, skip_special=False) == "the second</s>"


def test_llava_skips_bad_records_and_counts_each_reason(tmp_path):
    good = LLAVA_RECORDS[0]["conversations"][:2]
    records = [
        {"image": "red.jpg", "conversations": good},
        {"image": "gone.jpg", "conversations": good},                                           # image_missing
        {"image": "red.jpg", "conversations": good[:1]},                                        # no_gpt_turn
        {"image": "red.jpg", "conversations": [good[1], good[0]]},                              # malformed_record
        {"image": "red.jpg", "conversations": "what?"},                                         # malformed_record
        {"image": 7, "conversations": good},                                                    # malformed_record
        {"conversations": good},                                                                # no_image
        {"image": ["red.jpg", "blue.jpg"], "conversations": [{"from": "human", "value": "<image> x <image> y <image>"},
                                                             good[1]]},                        # image_marks_mismatch
        {"image": "red.jpg", "conversations": good + good[:1]},                  # one example, then no_gpt_turn
    ]
    batches, stats = llava_epoch(write_llava(tmp_path, records))
    assert len(batches) == 2
    assert stats == Counter({"lines": 10, "docs_used": 2, "rows": 2, "doc:image_missing": 1, "doc:no_gpt_turn": 2,
                             "doc:malformed_record": 3, "doc:no_image": 1, "doc:image_marks_mismatch": 1})


def test_llava_skips_a_record_with_fewer_image_marks_than_images(tmp_path):
    good = LLAVA_RECORDS[0]["conversations"][:2]
    records = [{"image": "red.jpg", "conversations": good},
               {"image": ["red.jpg", "blue.jpg"], "conversations": [{"from": "human", "value": "<image> x y"}, good[1]]}]
    batches, stats = llava_epoch(write_llava(tmp_path, records))
    assert len(batches) == 1 and stats["doc:image_marks_mismatch"] == 1 and stats["docs_used"] == 1


def test_llava_rows_cut_at_max_len_prompts_too_long_skipped(tmp_path):
    """A row longer than max_len loses the answer's end (its "</s>" first); a prompt that leaves no answer token
    within max_len is skipped as too_long."""
    tok = demo_tok()
    annt = write_llava(tmp_path, [{"image": "red.jpg", "conversations": LLAVA_RECORDS[0]["conversations"][:2]}])
    full, _ = llava_epoch(annt)
    n = len(full[0]["text_ids"][0])
    cut, _ = llava_epoch(annt, max_len=n - 1)
    assert cut[0]["text_ids"][0].tolist() == full[0]["text_ids"][0].tolist()[:-1]
    assert tok.decode(cut[0]["text_ids"][0], skip_special=False).endswith("The answer is: red")
    assert cut[0]["gt_text_ids"][0].tolist()[-1] == full[0]["text_ids"][0].tolist()[-2]
    with pytest.raises(mmi.InputError, match=r"no usable record") as e:
        llava_epoch(annt, max_len=n - 2)
    assert "doc:too_long=1" in str(e.value)


def test_llava_jsonl_skips_and_counts_broken_lines(tmp_path):
    """A .jsonl line that is not JSON (cut, not UTF-8, nested too deeply) is skipped and counted as malformed_line;
    a file of nothing else has no usable record."""
    write_llava(tmp_path)
    good = json.dumps({"image": "red.jpg", "conversations": LLAVA_RECORDS[0]["conversations"][:2]})
    broken = ['{"image": "red.jpg", "conver', b"\xff\xfe{}".decode("latin-1"), "[" * 100_000]
    path = tmp_path / "llava.jsonl"
    path.write_text("\n".join([good, "", *broken, good]) + "\n", encoding="latin-1")
    batches, stats = llava_epoch(str(path))
    assert len(batches) == 2 and stats["doc:malformed_line"] == 3 and stats["docs_used"] == 2
    path.write_text(broken[0] + "\n")
    with pytest.raises(mmi.InputError, match=r"doc:malformed_line=1.*; no usable record"):
        llava_epoch(str(path))
    assert str(data.read_records(str(path))[0]).startswith(f"malformed_line: {path}:1: not valid JSON")


@pytest.mark.parametrize("text, message", [
    ('[{"image": "red.jpg", "conversations": [', r"llava.json: not valid JSON \(Expecting value: line 1 column 41"),
    ('{"data": []}', "llava.json: top level is dict, expected a list of records with 'image' and 'conversations'"),
])
def test_llava_malformed_file_is_one_line_naming_it(tmp_path, text, message):
    (tmp_path / "llava.json").write_text(text)
    with pytest.raises(mmi.InputError, match=message):
        llava_epoch(str(tmp_path / "llava.json"))
    with pytest.raises(mmi.InputError, match=r"finetune_args .*'bogus'"):
        llava_epoch(str(tmp_path / "llava.json"), bogus=1)
    with pytest.raises(mmi.InputError, match="finetune_dataset 'nope', expected one of 'llava'"):
        data.finetune_dataset("nope", demo_tok(), mmi.MMIConfig.from_preset("tiny"), "train", 0, 1, 0)


# Fine-tuning sets, tiny, in the original layouts: frame k of a story has a caption naming its colour.
STORY_COLOURS = ["red", "green", "blue", "yellow", "cyan", "magenta", "black", "white"]


def write_png(path, colour, size=(40, 30)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, PALETTE[colour]).save(path)


def write_strip(path, colours):
    """A PororoSV / FlintstonesSV file: one 128x128 frame per colour, stacked vertically."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    arr = np.concatenate([np.full((128, 128, 3), PALETTE[c], np.uint8) for c in colours])
    Image.fromarray(arr).save(path)


def write_vist(root, split, n_frames=3):
    """Stories "s1" (frames given out of order) and "s0"; "bad" lacks an image_id."""
    stories = {}
    for sid in ["s1", "s0"]:                  # written in this order, read sorted
        s, turns = int(sid[1]), []
        for k in range(n_frames):
            colour = STORY_COLOURS[(s + k) % len(STORY_COLOURS)]
            turns.append({"sequence_index": k, "image_id": f"{sid}{k}", "caption": f"this is {colour} number {k}."})
            write_png(os.path.join(root, "images", f"{split}_images", f"{sid}{k}.png"), colour)
        stories[sid] = turns[::-1]
    stories["bad"] = [{"sequence_index": 0, "caption": "x"}]
    path = os.path.join(root, "annotations", f"{split}_formatted_filtered.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"annotations": stories}, f)


def write_pororo(root):
    """Stories 0 and 1 of five strips each (frame 0 of a strip in one colour, frame 1 in the next); split ids:
    train [1, 0, 9] (9 out of range), val [0], test [1, 0]. Captions mention "pororo" in lower case."""
    names = [[f"ep{s}/{k}.png" for k in range(5)] for s in range(2)]
    descriptions = {}
    for s in range(2):
        for k, name in enumerate(names[s]):
            c0, c1 = STORY_COLOURS[(s + k) % 8], STORY_COLOURS[(s + k + 1) % 8]
            write_strip(os.path.join(root, name), [c0, c1])
            descriptions[name[:-4]] = [f"PORORO sees {c0}\tor {c1} {k}.\n", "second caption"]
    np.save(os.path.join(root, "descriptions.npy"), np.array(descriptions, dtype=object), allow_pickle=True)
    np.save(os.path.join(root, "img_cache4.npy"), np.array([n[0].encode() for n in names]))
    np.save(os.path.join(root, "following_cache4.npy"), np.array([[x.encode() for x in n[1:]] for n in names]))
    ids = np.empty(3, dtype=object)
    ids[:] = [np.array([1, 0, 9]), np.array([0]), np.array([1, 0])]
    np.save(os.path.join(root, "train_seen_unseen_ids.npy"), ids, allow_pickle=True)


def write_flintstones(root):
    """Stories "a0" and "b0" of five strips; "c0" has three followings, "d0" a frame without a description."""
    followings = {g: [f"{g[0]}{k}" for k in range(1, 5)] for g in ("a0", "b0", "d0")}
    followings["c0"] = ["c1", "c2", "c3"]
    anns = []
    for s, g in enumerate("ab"):
        for k in range(5):
            c0, c1 = STORY_COLOURS[(s + k) % 8], STORY_COLOURS[(s + k + 1) % 8]
            write_strip(os.path.join(root, "video_frames_sampled_png", f"{g}{k}.png"), [c0, c1])
            anns.append({"globalID": f"{g}{k}", "description": f"fred sees {c0} or {c1} {k}."})
    with open(os.path.join(root, "following_cache4.pkl"), "wb") as f:
        pickle.dump(followings, f)
    split = {"train": ["a0", "b0", "c0", "d0"], "val": ["a0"], "test": ["b0", "a0"]}
    with open(os.path.join(root, "train-val-test_split.json"), "w") as f:
        json.dump(split, f)
    with open(os.path.join(root, "flintstones_annotations_v1-0.json"), "w") as f:
        json.dump(anns, f)


def decoded(tok, sample):
    return tok.decode(sample.text_ids, skip_special=False).replace(data.IMAGE_TOKEN * 4, "")


def test_story_text_per_context_type():
    caps, img = ["a b.", "c.", "d e."], "<I>"
    assert data.story_text(caps, "multi_modal", img) == ("a b.<I> c.<I> d e.<I>", [0, 1, 2])
    assert data.story_text(caps, "multi_modal", img, [True, False, True]) == ("<I>a b. c.<I> d e.<I>", [0, 1, 2])
    assert data.story_text(caps, "image_only", img) == ("<I><I><I>", [0, 1, 2])
    assert data.story_text(caps, "text_only", img) == ("a b. c. d e.<I>", [2])
    assert data.story_text(caps, "current", img) == ("d e.<I>", [2])
    with pytest.raises(ValueError, match="context_type='both'"):
        data.story_text(caps, "both", img)


def test_vist_samples_targets_and_token_layout(tmp_path):
    write_vist(str(tmp_path), "val")
    tok, stats = demo_tok(), Counter()
    stories = data.read_vist(str(tmp_path), str(tmp_path), "val", stats)
    assert [s["id"] for s in stories] == ["s0", "s1"] and stats == Counter({"malformed_record": 1})
    s1 = stories[1]
    assert [f["caption"] for f in s1["frames"]] == [f"this is {STORY_COLOURS[1 + k]} number {k}." for k in range(3)]
    tf, rng = data.DualTransform(16, 24), random.Random(0)
    img = data.image_placeholder(4)
    caps = [f["caption"] for f in s1["frames"]]
    for context_type, text, colours, targets in [
            ("multi_modal", f"{caps[0]}{img} {caps[1]}{img} {caps[2]}{img}", ["green", "blue", "yellow"],
             [False, False, True]),
            ("image_only", img * 3, ["green", "blue", "yellow"], [False, False, True]),
            ("text_only", f"{caps[0]} {caps[1]} {caps[2]}{img}", ["yellow"], [True]),
            ("current", f"{caps[2]}{img}", ["yellow"], [True])]:
        s = data.build_story_sample(s1, tok, tf, rng, context_type, num_img_token=4)
        assert s.text_ids.tolist() == tok.encode(text), context_type      # bos, no eos
        assert [colour_of(x) for x in s.images] == colours and [colour_of(x) for x in s.images_dec] == colours
        assert s.images.shape[-1] == 16 and s.images_dec.shape[-1] == 24
        assert s.image_targets.tolist() == targets
    s = data.build_story_sample(s1, tok, tf, rng, "multi_modal", target_image_idxs=(0, -2), num_img_token=4)
    assert s.image_targets.tolist() == [True, True, False]
    with pytest.raises(ValueError, match=r"target_image_idxs \[0\]"):
        data.build_story_sample(s1, tok, tf, rng, "text_only", target_image_idxs=(0,), num_img_token=4)
    rounds = data.story_rounds(stories, "all")
    assert [(r["id"], len(r["frames"])) for r in rounds] == [("s0_1", 1), ("s0_2", 2), ("s1_1", 1), ("s1_2", 2)]


def test_finetune_dataset_masks_image_loss_to_the_targets(tmp_path):
    write_vist(str(tmp_path), "train")
    write_vist(str(tmp_path), "val")
    os.remove(tmp_path / "images/train_images/s01.png")
    tok, cfg = demo_tok(), mmi.MMIConfig.from_preset("tiny")
    args = dict(annt_root=str(tmp_path), data_root=str(tmp_path), batch_size=2)
    ds = data.finetune_dataset("vist", tok, cfg, "train", 0, 1, 0, **args)
    (batch,) = list(ds)                                   # s0 lost an image: one batch of one story
    assert batch["meta"]["stats"] == {"lines": 2, "docs_used": 1, "doc:image_missing": 1, "rows": 1}
    assert batch["num_image_per_seq"].tolist() == [3] and batch["image_loss_mask"].tolist() == [1.0] * 3
    assert batch["loss_txt_weight"] == 0.0 and "loss_img_weight" not in batch
    assert batch["image_tensors_dec"].shape[-1] == cfg.image_decoder.image_size
    val = list(data.finetune_dataset("vist", tok, cfg, "val", 0, 1, 0, **args))[0]
    assert val["image_loss_mask"].tolist() == [0, 0, 1, 0, 0, 1] and val["target_image_idxs"].tolist() == [2, 5]
    assert val["attention_mask"].sum(1).tolist() == [len(val["text_ids"][0])] * 2
    assert (val["text_ids"][:, 0] == tok.bos_id).all() and val["nearest_bos_idxs"].tolist() == [0] * 6
    cur = list(data.finetune_dataset("vist", tok, cfg, "val", 0, 1, 0, context_type="current", **args))[0]
    assert cur["num_image_per_seq"].tolist() == [1, 1] and cur["image_loss_mask"].tolist() == [1, 1]


def test_record_dataset_deals_every_record_once_in_a_new_order_each_epoch():
    ds = data.RecordDataset("r", list(range(20)), lambda r, rng, where: r, lambda rows: {"rows": rows, "meta": {}},
                            batch_size=20, seed=3, rank=0, world_size=1, verbose=False)
    orders = []
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        [batch] = list(ds)
        orders.append(batch["rows"])
    assert sorted(orders[0]) == sorted(orders[1]) == list(range(20)) and orders[0] != orders[1]


def test_finetune_dataset_resumes_after_the_recorded_batch(tmp_path):
    write_vist(str(tmp_path), "train")
    tok, cfg = demo_tok(), mmi.MMIConfig.from_preset("tiny")
    args = dict(annt_root=str(tmp_path), data_root=str(tmp_path), batch_size=1)
    first = list(data.finetune_dataset("vist", tok, cfg, "train", 0, 1, 5, **args))
    positions = data.MixedDataset.record_position({}, first[0])
    ds = data.finetune_dataset("vist", tok, cfg, "train", 0, 1, 5, **args)
    ds.load_state_dict(positions)
    rest = list(ds)
    assert len(first) == 2 and len(rest) == 1 and torch.equal(rest[0]["text_ids"], first[1]["text_ids"])
    two = [list(data.finetune_dataset("vist", tok, cfg, "train", r, 2, 5, **args)) for r in range(2)]
    assert sorted(len(b) for b in two) == [1, 1]          # one story per rank


def test_pororo_and_flintstones_cut_the_drawn_strip_frame(tmp_path):
    tok, tf = demo_tok(), data.DualTransform(16, None)
    write_pororo(str(tmp_path / "p"))
    write_flintstones(str(tmp_path / "f"))
    stats_p, stats_f = Counter(), Counter()
    pororo = data.read_pororo(str(tmp_path / "p"), str(tmp_path / "p"), "train", stats_p)
    flint = data.read_flintstones(str(tmp_path / "f"), str(tmp_path / "f"), "train", stats_f)
    assert [s["id"] for s in pororo] == ["0", "1"] and stats_p == Counter({"story_index_out_of_range": 1})
    assert [s["id"] for s in flint] == ["a0", "b0"]
    assert stats_f == Counter({"not_four_followings": 1, "no_description": 1})
    assert pororo[0]["frames"][1]["caption"] == "Pororo sees greenor blue 1."     # the original's clean-up
    assert flint[1]["frames"][0]["caption"] == "Fred sees green or blue 0."
    for story, s in ((pororo[1], 1), (flint[1], 1)):
        drawn = data.build_story_sample(story, tok, tf, random.Random(3), "multi_modal", target_image_idxs=(2, 4),
                                        num_img_token=4)
        assert drawn.image_targets.tolist() == [False, False, True, False, True]
        for k, (x, info) in enumerate(zip(drawn.images, drawn.image_info)):
            assert info["strip_frame"] in (0, 1) and info["frame"] == k
            assert colour_of(x) == STORY_COLOURS[(s + k + info["strip_frame"]) % 8]
        assert {i["strip_frame"] for i in drawn.image_info} == {0, 1}   # both frames occur with this seed


def test_finetune_readers_name_the_malformed_file_and_field(tmp_path):
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations/test_formatted_filtered.json").write_text(json.dumps({"stories": {}}))
    with pytest.raises(ValueError, match=r"test_formatted_filtered.json: field 'annotations' missing"):
        data.read_vist(str(tmp_path), str(tmp_path), "test", Counter())
    write_flintstones(str(tmp_path))
    (tmp_path / "flintstones_annotations_v1-0.json").write_text(json.dumps([{"globalID": "a0"}]))
    with pytest.raises(ValueError, match=r"flintstones_annotations_v1-0.json\[0\]: field 'description' missing"):
        data.read_flintstones(str(tmp_path), str(tmp_path), "test", Counter())
    write_flintstones(str(tmp_path))
    (tmp_path / "train-val-test_split.json").write_text(json.dumps({"test": ["b0", ["a0"]]}))
    with pytest.raises(ValueError, match=r"train-val-test_split.json: test\[1\] is \['a0'\], expected a global id"):
        data.read_flintstones(str(tmp_path), str(tmp_path), "test", Counter())
    write_pororo(str(tmp_path))
    np.save(tmp_path / "descriptions.npy", np.array(Counter(a=1), dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match=r"descriptions.npy: Pororo descriptions is not readable \(collections"):
        data.read_pororo(str(tmp_path), str(tmp_path), "test", Counter())
    with pytest.raises(ValueError, match="finetune_dataset 'coco', expected one of 'llava', 'flintstones'"):
        data.finetune_dataset("coco", None, None, "train", 0, 1, 0)


def test_ade20k_colours_and_segmentation_to_image_sample(tmp_path):
    colours = data.ade20k_colours()
    assert colours.shape == (151, 3) and len({tuple(c) for c in colours}) == 151
    assert [tuple(colours[i]) for i in (0, 1, 2, 7, 37, 150)] == [(0, 0, 0), (255, 255, 255), (255, 255, 213),
                                                                 (255, 213, 255), (213, 255, 255), (87, 255, 45)]
    labels = np.zeros((30, 40), np.uint8)
    labels[:, 20:] = 2                                    # right half class 2, left half "other"
    photo = np.zeros((30, 40, 3), np.uint8)
    photo[:, :20], photo[:, 20:] = PALETTE["red"], PALETTE["blue"]
    os.makedirs(tmp_path / "images/training")
    os.makedirs(tmp_path / "annotations/training")
    Image.fromarray(photo).save(tmp_path / "images/training/ADE_1.jpg", quality=95)
    Image.fromarray(labels).save(tmp_path / "annotations/training/ADE_1.png")
    (tmp_path / "training.json").write_text(json.dumps([{"image_id": "ADE_1", "caption": "a wall"}, {"caption": 3}]))
    stats = Counter()
    (rec,) = data.read_ade20k(str(tmp_path), str(tmp_path), "training", stats)
    assert stats == Counter({"malformed_record": 1})
    tok, tf = demo_tok(), data.DualTransform(16, 24)
    for flip in (0.0, 1.0):
        s = data.build_ade20k_sample(rec, tok, tf, random.Random(0), num_img_token=4, flip_prob=flip)
        assert s.text_ids.tolist() == tok.encode(f"{data.image_placeholder(4)}a wall.{data.image_placeholder(4)}")
        assert s.image_targets.tolist() == [False, True] and np.array_equal(s.images_dec[0], s.images_dec[1])
        seg, enc, dec = s.images[0], s.images[1], s.images_dec[1]
        left, right = ("black", "white") if flip == 0 else ("white", "black")   # label 2 -> (255, 255, 213)
        assert colour_of(seg[:, :, :6]) == left and colour_of(seg[:, :, -6:]) == right
        want = ("red", "blue") if flip == 0 else ("blue", "red")
        for x in (enc, dec):
            assert (colour_of(x[:, :, :4]), colour_of(x[:, :, -4:])) == want
    s = data.build_ade20k_sample(rec, tok, tf, random.Random(0), num_img_token=4, text_first=True)
    assert s.text_ids.tolist() == tok.encode(f"a wall.{data.image_placeholder(4)}{data.image_placeholder(4)}")


def test_demo_questions_are_answered_by_their_scene():
    """Questions of the first training seeds, checked by hand against their scenes; then, over many seeds, each
    answer worked out again from the scene, and the render reading back as that scene."""
    by_hand = {0: ("a purple square at the centre and a green triangle at the middle right.",
                   "how many shapes are there?", "two"),
               1: ("a purple triangle at the middle left.", "where is the purple triangle?", "middle left"),
               4: ("a green square at the centre and an orange circle at the bottom right.",
                   "what colour is the square?", "green"),
               7: ("a blue triangle at the top right and an orange triangle at the bottom middle.",
                   "what colour is the triangle at the bottom middle?", "orange")}
    for seed, (scene, question, answer) in by_hand.items():
        q = data.make_question(seed)
        assert (data.describe_scene(q.scene), q.question, q.answer) == (scene, question, answer)
    tok, kinds = demo_tok(), Counter()
    for q in data.demo_questions("train", 300):
        kinds[q.kind] += 1
        assert data.read_scene(data.render_scene(q.scene)) == q.scene
        words = q.question[:-1].split()
        if q.kind == "count":
            assert q.answer == ["one", "two", "three"][len(q.scene) - 1]
        elif q.kind == "where":
            (o,) = [o for o in q.scene if (o.colour, o.shape) == (words[3], words[4])]
            assert q.answer == data.CELL_NAMES[o.row][o.col]
        else:                                   # "what colour is the <shape>[ at the <cell>]?"
            named = [o for o in q.scene if o.shape == words[4]
                     and (len(words) == 5 or data.CELL_NAMES[o.row][o.col] == " ".join(words[7:]))]
            assert len(named) == 1 and q.answer == named[0].colour
        text = q.question + " " + q.answer + "."
        assert tok.decode(tok.encode(text)) == text and tok.unk_id not in tok.encode(text)
    assert set(kinds) == set(data.QA_KINDS) and min(kinds.values()) > 60
    test_seeds = {q.seed for q in data.demo_questions("test", 50)}
    assert not test_seeds & {q.seed for q in data.demo_questions("train", 300)}
    assert not test_seeds & {data.SPLIT_SEED_BASE["val"] + i for i in range(50)}


def test_demo_qa_loss_is_on_the_answer_tokens_only():
    """Row by hand: bos, soi, image tokens, the question's tokens, then the answer, its full stop and eos; the
    labels the model takes (mmi.text_labels with the batch's offsets) are exactly the last three parts."""
    tok = demo_tok()
    ds = data.demo_qa_dataset(tok, "train", num_img_token=4, batch_size=3, num_questions=6, seed=0)
    ds.verbose = False
    batch = next(iter(ds))
    assert batch["loss_img_weight"] == 0.0 and "image_tensors_dec" not in batch
    cfg = mmi.apply_overrides(mmi.MMIConfig.from_preset("tiny"), {
        "llm.vocab_size": 386, "pad_token_id": 383, "soi_token_id": 384, "image_token_id": 385, "num_img_token": 4})
    labels = mmi.text_labels(batch["text_ids"], batch["attention_mask"], cfg, batch["ignore_prompt_token_offset"])
    for b, seed in enumerate(data.SPLIT_SEED_BASE["train"] + i for i in range(3)):
        q = data.make_question(seed)
        question = tok.encode(q.question, add_bos=False)
        answer = tok.encode(q.answer + ".", add_bos=False) + [tok.eos_id]
        row = [tok.bos_id, tok.soi_id] + [tok.image_id] * 4 + question + answer
        n = len(row)
        assert batch["text_ids"][b, :n].tolist() == row and batch["attention_mask"][b].sum() == n
        assert batch["ignore_prompt_token_offset"][b] == n - len(answer)
        taken = labels[b][labels[b] != -100].tolist()
        assert taken == answer and tok.decode(taken, skip_special=False) == q.answer + ".</s>"
        assert (labels[b, :n - 1 - len(answer)] == -100).all()              # nothing before the answer
        assert data.read_scene(batch["image_tensors"][b].numpy()) == q.scene


def test_demo_qa_stream_resumes_exactly_with_workers():
    """From any batch's saved position, the stream (also with two DataLoader workers, whose turns it keeps) goes
    on with exactly the batches that followed it."""
    tok = demo_tok()

    def make():
        ds = data.demo_qa_dataset(tok, "train", num_img_token=4, batch_size=2, num_questions=12, seed=3)
        ds.verbose = False
        return ds
    full = list(make())
    assert len(full) == 6 and sorted(s for b in full for s in b["meta"]["doc_keys"]) == \
        sorted([(0, 0, 0, i)] for i in range(12))
    for k in range(len(full)):
        ds = make()
        ds.load_state_dict({0: full[k]["meta"]["position"]["state"]})
        rest = list(ds)
        assert [b["text_ids"].tolist() for b in rest] == [b["text_ids"].tolist() for b in full[k + 1:]]
        assert all(torch.equal(a["ignore_prompt_token_offset"], b["ignore_prompt_token_offset"])
                   for a, b in zip(rest, full[k + 1:]))
    tc = train.TrainConfig(num_workers=2, seed=3)
    stream = train.dataset_batches(make(), tc, 0, None)
    seen = [next(stream) for _ in range(4)]
    stream.close()
    resumed = train.dataset_batches(make(), tc, 0, seen[1]["meta"]["resume"])
    again = [next(resumed) for _ in range(2)]
    resumed.close()
    assert [b["text_ids"].tolist() for b in again] == [b["text_ids"].tolist() for b in seen[2:]]


# ----------------------------------------------------------------------------------------------------------------
# data.py: packing
# ----------------------------------------------------------------------------------------------------------------


class Ids:
    bos_id, soi_id, image_id = 1, 90, 91


B, S, I, E = 1, 90, 91, 2  # bos, soi, image, eos for hand-written rows


def hand_sample(ids, key):
    ids = np.asarray(ids, dtype=np.int64)
    n = int((ids == S).sum())
    imgs = np.arange(n, dtype=np.uint8)[:, None, None, None] * np.ones((1, 3, 2, 2), np.uint8) + key * 10
    return data.Sample(ids, imgs, None, [f"{key}:{k}" for k in range(n)], key=(0, 0, 0, key))


def test_packing_image_level_cuts_before_a_truncated_image():
    """L=20, 4 image tokens. Buffer [bos t t soi I I I I t eos | bos t t t t t soi I I I I eos]: the soi at 16
    would lose tokens, so the row ends at 16 and the image waits for the next row."""
    cfg = data.PackConfig(num_total_token=20, num_img_token=4, max_num_images=15, truncation_level="image")
    p = data.Packer(cfg, Ids)
    p.add(hand_sample([B, 5, 5, S, I, I, I, I, 5, E], 1))
    p.add(hand_sample([B, 6, 6, 6, 6, 6, S, I, I, I, I, E], 2))
    row = p.next_row()
    assert row.text_ids.tolist() == [B, 5, 5, S, I, I, I, I, 5, E, B, 6, 6, 6, 6, 6]
    assert row.image_info == ["1:0"] and row.nearest_bos_idxs.tolist() == [0]
    assert p.ids.tolist() == [S, I, I, I, I, E] and p.image_info == ["2:0"] and p.position() == ((0, 0, 0, 2), 6)
    last = p.flush()  # a row starting mid-document: no bos, nearest bos 0
    assert last.text_ids.tolist() == [S, I, I, I, I, E] and last.nearest_bos_idxs.tolist() == [0]


def test_packing_flush_keeps_a_leftover_shorter_than_one_image():
    """The last row is the leftover whatever its length, even one no longer than an image's soi + tokens: a whole
    image in it makes a row, none makes no row."""
    p = data.Packer(data.PackConfig(num_total_token=20, num_img_token=4), Ids)
    p.add(hand_sample([S, I, I, I, I], 1))
    last = p.flush()
    assert last.text_ids.tolist() == [S, I, I, I, I] and last.image_info == ["1:0"]
    p.add(hand_sample([B, 5, E], 2))
    assert p.flush() is None


def test_packing_sample_level_cuts_at_the_last_bos():
    cfg = data.PackConfig(num_total_token=20, num_img_token=4, truncation_level="sample")
    p = data.Packer(cfg, Ids)
    p.add(hand_sample([B, 5, 5, S, I, I, I, I, 5, E], 1))
    p.add(hand_sample([B, 6, 6, 6, 6, 6, S, I, I, I, I, E], 2))
    row = p.next_row()
    assert row.text_ids.tolist() == [B, 5, 5, S, I, I, I, I, 5, E] and p.ids[0] == B and len(p) == 12


def test_packing_sample_level_with_no_bos_but_the_first_cuts_before_the_image():
    """L=10, 4 image tokens, one document [bos t t t t t t soi I I I I eos]: the image would lose tokens and the
    only bos is at 0 (cutting there would make no progress, and the original loops forever), so the row ends before
    the soi; it holds no image and is dropped, and the image waits in the buffer."""
    cfg = data.PackConfig(num_total_token=10, num_img_token=4, truncation_level="sample")
    p = data.Packer(cfg, Ids)
    p.add(hand_sample([B, 5, 5, 5, 5, 5, 5, S, I, I, I, I, E], 1))
    assert p.next_row() is None and p.ids.tolist() == [S, I, I, I, I, E] and p.image_info == ["1:0"]


def test_packing_max_images_per_row_image_and_sample_level():
    """Three 1-image samples of 7 tokens [bos S I I I I eos] (+ text), max 2 images per row, L=24."""
    def samples():
        return [hand_sample([B, S, I, I, I, I, E], 1), hand_sample([B, 7, S, I, I, I, I, E], 2),
                hand_sample([B, S, I, I, I, I, 8, E], 3), hand_sample([B, 9, 9, 9, 9], 4)]
    cfg = data.PackConfig(num_total_token=24, num_img_token=4, max_num_images=2, truncation_level="image")
    p = data.Packer(cfg, Ids)
    for s in samples():
        p.add(s)
    row = p.next_row()  # image level: right after the 2nd image's tokens (soi at 9 -> cut 9 + 4 + 1 = 14)
    assert row.text_ids.tolist() == [B, S, I, I, I, I, E, B, 7, S, I, I, I, I]
    assert row.nearest_bos_idxs.tolist() == [0, 7]
    cfg = data.PackConfig(num_total_token=24, num_img_token=4, max_num_images=2, truncation_level="sample")
    p = data.Packer(cfg, Ids)
    for s in samples():
        p.add(s)
    row = p.next_row()  # sample level: the bos before the surplus soi (at 15) lies after soi 9 -> cut at 15
    assert row.text_ids.tolist() == [B, S, I, I, I, I, E, B, 7, S, I, I, I, I, E]
    assert p.ids.tolist()[:2] == [B, S] and p.image_info[0] == "3:0"
    p = data.Packer(cfg, Ids)  # no bos between the allowed and the surplus image -> cut right before the soi
    p.add(hand_sample([B, S, I, I, I, I, S, I, I, I, I, 5, S, I, I, I, I, 5, 5, 5, 5, 5, 5, 5, E], 1))
    assert p.next_row().text_ids.tolist() == [B, S, I, I, I, I, S, I, I, I, I, 5]


def test_packing_a_row_with_exactly_max_images_is_cut_at_L():
    """max_num_images caps a row's images; a row holding exactly that many is cut at L like any other (only a
    surplus image moves the cut), at either truncation level."""
    for level in ("image", "sample"):
        p = data.Packer(data.PackConfig(num_total_token=16, num_img_token=4, max_num_images=2,
                                        truncation_level=level), Ids)
        p.add(hand_sample([B, S, I, I, I, I, S, I, I, I, I, 5, 5, 5, 5, 5, 5, E], 1))
        p.add(hand_sample([B, S, I, I, I, I, E], 2))
        row = p.next_row()
        assert row.text_ids.tolist() == [B, S, I, I, I, I, S, I, I, I, I, 5, 5, 5, 5, 5], level
        assert row.image_info == ["1:0", "1:1"] and p.ids.tolist()[:3] == [5, E, B]


def test_packer_position_counts_the_tokens_of_every_row_cut_from_a_long_document():
    """A document spanning three rows of L=10: after two rows its position is 20 tokens consumed, and re-adding it
    with those 20 skipped rebuilds the same buffer (the resume rule)."""
    doc = hand_sample([B, 5, S, I, I, I, I, 5, 5, 5, 5, S, I, I, I, I, 5, 5, 5, 5, S, I, I, I, I, E], 1)
    cfg = data.PackConfig(num_total_token=10, num_img_token=4)
    p = data.Packer(cfg, Ids)
    p.add(doc)
    assert [p.next_row().image_info for _ in range(2)] == [["1:0"], ["1:1"]]
    assert p.position() == ((0, 0, 0, 1), 20)
    q = data.Packer(cfg, Ids)
    q.add(doc, skip_tokens=20)
    assert q.ids.tolist() == p.ids.tolist() == [S, I, I, I, I, E] and q.image_info == p.image_info == ["1:2"]


def test_packing_drops_rows_without_images_and_keeps_counts():
    cfg = data.PackConfig(num_total_token=10, num_img_token=4)
    p = data.Packer(cfg, Ids)
    p.add(hand_sample([B] + [5] * 14 + [S, I, I, I, I, E], 1))
    assert p.next_row() is None  # the first 10 tokens hold no image: dropped
    row = p.next_row()  # the remaining 11: soi at 5 < 10 - 4, so its image fits and the row is cut at 10
    assert row.text_ids.tolist() == [5] * 5 + [S, I, I, I, I] and row.nearest_bos_idxs.tolist() == [0]
    assert p.ids.tolist() == [E] and p.image_info == []
    assert data.nearest_bos_idxs(np.array([5, B, S, I, B, 5, S, I]), B, S).tolist() == [1, 4]
    assert data.nearest_bos_idxs(np.array([S, I, 5, S, I]), B, S).tolist() == [0, 0]


def test_collate_examples_pads_labels_with_minus_100_so_padding_takes_no_loss():
    examples = [data.Example(np.array([B, 5, 6]), np.array([-100, 5, 6]), np.zeros((1, 3, 2, 2), np.uint8)),
                data.Example(np.array([B, 7]), np.array([-100, 7]), np.zeros((0, 3, 2, 2), np.uint8))]
    batch = data.collate_examples(examples, pad_id=77, dataset_name="llava")
    assert batch["text_ids"].tolist() == [[B, 5, 6], [B, 7, 77]]
    assert batch["gt_text_ids"].tolist() == [[-100, 5, 6], [-100, 7, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["num_image_per_seq"].tolist() == [1, 0] and batch["nearest_bos_idxs"].tolist() == [0]


def test_collate_batch_dict_right_padding_and_keys():
    rows = [data.Row(np.array([B, 5, S, I], np.int64), np.full((1, 3, 4, 4), 255, np.uint8), None, ["a"],
                     np.array([0]), []),
            data.Row(np.array([B, S, I, B, S, I, 6], np.int64), np.zeros((2, 3, 4, 4), np.uint8), None, ["b", "c"],
                     np.array([0, 3]), [])]
    batch = data.collate_rows(rows, pad_id=77, dataset_name="mmc4", loss_img_weight=0.0)
    assert batch["text_ids"].tolist() == [[B, 5, S, I, 77, 77, 77], [B, S, I, B, S, I, 6]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0, 0], [1] * 7]
    assert batch["text_ids"].dtype == batch["attention_mask"].dtype == torch.long
    assert batch["image_tensors"].shape == (3, 3, 4, 4) and batch["image_tensors"].dtype == torch.float32
    assert batch["image_tensors"][0].min() == 1.0 and batch["image_tensors"][1:].max() == 0.0
    assert batch["num_image_per_seq"].tolist() == [1, 2] and batch["nearest_bos_idxs"].tolist() == [0, 0, 3]
    assert "image_tensors_dec" not in batch and batch["ignore_prompt_token_offset"] == 0
    assert batch["meta"]["dataset_name"] == "mmc4" and batch["loss_img_weight"] == 0.0
    assert batch["meta"]["image_info"] == ["a", "b", "c"]


# ----------------------------------------------------------------------------------------------------------------
# data.py: streams: mixing, sharding across ranks and workers, exact resume
# ----------------------------------------------------------------------------------------------------------------


def build_corpus(root, n_shards=4, docs_per_shard=5, imgs_per_doc=2):
    """MMC4 zip shards and LAION-style txt files over one JPEG folder; every image used exactly once."""
    os.makedirs(root, exist_ok=True)
    colours = list(PALETTE)
    all_images, k = [], 0
    for s in range(n_shards):
        docs = []
        for _ in range(docs_per_shard):
            pairs = []
            for _ in range(imgs_per_doc):
                name = f"m{k}.jpg"
                write_jpeg(os.path.join(root, name), colours[k % len(colours)], size=(20, 20))
                pairs.append((name, colours[k % len(colours)]))
                k += 1
            docs.append(mmc4_doc(pairs))
            all_images += [n for n, _ in pairs]
        write_zip_shard(os.path.join(root, f"docs_shard_{s}_v2.jsonl.zip"), docs)
    pair_images = []
    for s in range(2):
        lines = []
        for j in range(6):
            name = f"p{s}_{j}.jpg"
            colour = colours[(s * 6 + j) % len(colours)]
            write_jpeg(os.path.join(root, name), colour, size=(20, 20))
            line = {"image": name, "caption": f"this is {colour} number {j}"}
            lines.append(json.dumps(line) if j % 2 else repr(line))  # both JSON and Python-literal lines
            pair_images.append(name)
        (open(os.path.join(root, f"{s:07d}.txt"), "w")).write("\n".join(lines) + "\n")
    return all_images, pair_images


def make_mix(root, tok, rank=0, world=1, flush=True, img_first=1.0):
    t = data.DualTransform(8, 12)
    mmc4 = data.mmc4_source("docs_shard_{0..3}_v2.jsonl", root, root, tok, t, num_img_token=4,
                            img_first_prob=img_first)
    laion = data.pair_source("{0000000..0000001}.txt", root, root, tok, t, name="laion_en", num_img_token=4,
                             img_first_prob=img_first)
    cfgs = [data.PackConfig(48, 4, 15, "image", 2), data.PackConfig(48, 4, 30, "sample", 2)]
    return data.MixedDataset([mmc4, laion], [2, 1], cfgs, tok, seed=3, rank=rank, world_size=world,
                             flush_last=flush, verbose=False)


def images_of(batches):
    return [n for b in batches for n in b["meta"]["image_info"]]


def test_mix_longest_rule_keeps_rows_aligned_each_image_once(tmp_path):
    """One epoch of the mix: both sources are exhausted at least once ("longest": the smaller one restarts),
    every MMC4 image appears, each pass exactly once; every row is aligned (image <-> its sentence)."""
    root = str(tmp_path)
    mmc4_images, pair_images = build_corpus(root)
    tok = demo_tok()
    batches = list(make_mix(root, tok))
    names = Counter(b["meta"]["dataset_name"] for b in batches)
    assert set(names) == {"mmc4", "laion_en"}
    for b in batches:
        check_row_alignment(tok, b, 4)
        assert b["text_ids"].shape[1] <= 48
    seen = Counter(images_of(batches))
    # documents with one image can be dropped (p 0.5); ours have two, so every image comes through
    passes = {n: c for n, c in seen.items() if n.startswith("m")}
    assert set(passes) == set(mmc4_images) and len(set(passes.values())) == 1
    for n in pair_images:
        assert seen[n] >= 1


def test_pretrain_mix_matches_the_papers_recipe(tmp_path):
    """blip2/laion_en/laion_coco/mmc4 drawn 1:1:1:2; batches of 2 pair rows / 4 MMC4 rows; 30 / 15 images per
    row; sample- / image-level cuts; rows of 2048 tokens, 64 image tokens, 224 / 512 images."""
    root = str(tmp_path)
    tok = demo_tok()
    pairs = {n: (root, root, "{0000000..0020000}.txt") for n in ("blip2", "laion_en", "laion_coco")}
    ds = data.pretrain_mix(tok, pairs, (root, root, "docs_shard_{0..23099}_v2.jsonl"))
    assert [s.name for s in ds.sources] == ["blip2", "laion_en", "laion_coco", "mmc4"] and ds.probs == [1, 1, 1, 2]
    assert [(c.batch_size, c.max_num_images, c.truncation_level) for c in ds.pack_configs] == \
        [(2, 30, "sample")] * 3 + [(4, 15, "image")]
    assert all((c.num_total_token, c.num_img_token) == (2048, 64) for c in ds.pack_configs)
    assert len(ds.sources[3].shards) == 23100 and len(ds.sources[0].shards) == 20001
    assert (ds.sources[3].build.load.transform.enc_size, ds.sources[3].build.load.transform.dec_size) == (224, 512)


def test_ranks_and_workers_read_each_document_once(tmp_path):
    """2 ranks x 2 DataLoader workers over 4 shards: the union of images seen is every image, none twice."""
    root = str(tmp_path)
    mmc4_images, _ = build_corpus(root)
    tok = demo_tok()
    seen = Counter()
    for rank in range(2):
        ds = make_mix(root, tok, rank=rank, world=2)
        ds.sources, ds.probs = ds.sources[:1], [1]  # the MMC4 source only
        ds.pack_configs, ds.loss_weights = ds.pack_configs[:1], ds.loss_weights[:1]
        if rank == 1:  # what a "spawn" worker receives: a pickled copy (tokenizer, sources, builders)
            ds = pickle.loads(pickle.dumps(ds))
        loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2, multiprocessing_context="fork")
        readers = set()
        for b in loader:
            seen.update(b["meta"]["image_info"])
            readers.add(b["meta"]["position"]["reader"])
        assert readers == {2 * rank, 2 * rank + 1}
    assert sorted(seen) == sorted(mmc4_images) and set(seen.values()) == {1}


def test_shard_order_is_dealt_afresh_each_epoch_and_pass():
    """worker_shard_slots: in every (epoch, pass) the 2 ranks x 2 workers together hold each of 12 shards exactly
    once, and the order is reshuffled per epoch and per pass (a fixed order would give every epoch the same
    shard-to-reader assignment and the same document sequence)."""
    orders = {}
    for epoch, pass_idx in ((0, 0), (0, 1), (1, 0), (2, 0)):
        dealt = [data.worker_shard_slots(12, 42, epoch, pass_idx, rank, 2, worker, 2)
                 for rank in range(2) for worker in range(2)]
        assert sorted(s for slots in dealt for s in slots) == list(range(12))
        assert [len(slots) for slots in dealt] == [3, 3, 3, 3]
        orders[epoch, pass_idx] = tuple(tuple(slots) for slots in dealt)
    assert len(set(orders.values())) == 4


def test_mix_draws_sources_by_weight_from_each_readers_own_generator():
    """Each batch's source is drawn with probability proportional to its weight, by the generator seeded with
    seed + reader index (rank * num_workers + worker): reader r's k-th batch comes from stories iff the k-th
    uniform of torch.Generator().manual_seed(seed + r) is below 0.75 (weights 3 : 1)."""
    tok = demo_tok()
    for rank in range(2):
        ds = data.demo_dataset(tok, num_total_token=64, num_img_token=4, batch_size=1, seed=5, rank=rank,
                               world_size=2, pairs=0.25)
        ds.probs = [3.0, 1.0]  # unnormalised: the mix divides by their sum
        ds.verbose = False
        got = [b["meta"]["dataset_name"] for _, b in zip(range(40), ds)]
        g = torch.Generator().manual_seed(5 + rank)
        want = ["shape_stories_train" if torch.rand(1, generator=g).item() <= 0.75 else "shape_pairs_train"
                for _ in range(40)]
        assert got == want


def test_resume_from_any_batch_continues_exactly(tmp_path):
    """Restarting from the position stored in batch k's meta yields exactly batches k+1.. of the
    uninterrupted run (same ids, same images), including across a source's restart."""
    root = str(tmp_path)
    build_corpus(root)
    tok = demo_tok()
    full = list(make_mix(root, tok, flush=False, img_first=0.5))
    assert len(full) >= 6
    for k in (0, 2, len(full) // 2, len(full) - 2):
        pos = full[k]["meta"]["position"]
        ds = make_mix(root, tok, flush=False, img_first=0.5)
        ds.load_state_dict(json.loads(json.dumps({pos["reader"]: pos["state"]})))  # as saved in a checkpoint
        rest = list(ds)
        assert len(rest) == len(full) - k - 1
        for a, b in zip(rest, full[k + 1:]):
            assert torch.equal(a["text_ids"], b["text_ids"]) and torch.equal(a["image_tensors"], b["image_tensors"])
            assert a["meta"]["image_info"] == b["meta"]["image_info"]
    ds.set_epoch(1)  # a saved position belongs to its epoch; the next epoch starts afresh with new shuffles
    nxt = list(ds)
    assert nxt[0]["meta"]["position"]["state"]["epoch"] == 1 and nxt[0]["meta"]["position"]["state"]["draws"] == 1
    assert images_of(nxt) != images_of(full)  # epoch 1 reads the shards in another order


def test_resume_with_dataloader_workers_sees_every_image_once(tmp_path):
    """Two DataLoader workers: stop after 3 batches, save the positions, resume in a fresh DataLoader: the images
    of the first 3 batches plus the resumed run are exactly those of one uninterrupted epoch."""
    root = str(tmp_path)
    build_corpus(root)
    tok = demo_tok()

    def loader(ds):
        return torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2, multiprocessing_context="fork")
    full = Counter(images_of(loader(make_mix(root, tok, flush=False, img_first=0.5))))
    positions, head = {}, []
    for k, b in enumerate(loader(make_mix(root, tok, flush=False, img_first=0.5))):
        head.append(b)
        data.MixedDataset.record_position(positions, b)
        if k == 2:
            break
    ds = make_mix(root, tok, flush=False, img_first=0.5)
    ds.load_state_dict(json.loads(json.dumps(positions)))
    assert Counter(images_of(head)) + Counter(images_of(loader(ds))) == full


def test_laion_annotation_file_of_10000_lines(tmp_path):
    """A 10,000-line annotation file (JSON and Python-literal lines, some malformed) streams through the
    pair builder: every good line gives one sample, bad ones are counted."""
    for c in ("red", "green"):
        write_jpeg(str(tmp_path / f"{c}.jpg"), c, size=(16, 16))
    lines = []
    for j in range(10_000):
        c = ("red", "green")[j % 2]
        info = {"image": f"{c}.jpg", "caption": f"this is {c} number {j}"}
        lines.append("{broken" if j % 1000 == 999 else (json.dumps(info) if j % 3 else repr(info)))
    (tmp_path / "0000000.txt").write_text("\n".join(lines) + "\n")
    path = str(tmp_path / "0000000.txt")
    parsed, bad = 0, 0
    for k, line in enumerate(data.iter_shard_lines(path)):  # every line through the parser
        try:
            info = data.parse_pair_line(line, f"{path}:{k}")
            assert info["caption"] == f"this is {('red', 'green')[k % 2]} number {k}"
            parsed += 1
        except data.SkipSample as e:
            assert e.reason == "malformed_line"
            bad += 1
    assert (parsed, bad) == (9990, 10)
    tok = demo_tok()  # the full builder on the file's last 100 lines, in file order (also proves starting mid-file)
    src = data.pair_source("{0000000..0000000}.txt", str(tmp_path), str(tmp_path), tok, data.DualTransform(8, None),
                           num_img_token=4, shuffle_buffer=0)
    reader = data.Reader()
    got = []
    for s in src.samples(reader, 0, 0, start_slot=0, start_line=9900):
        j = int(tok.decode(s.text_ids).split()[-1])
        assert colour_of(s.images[0]) == ("red", "green")[j % 2] and s.key == (0, 0, 0, j)
        got.append(j)
    assert got == [j for j in range(9900, 10_000) if j != 9999]
    assert reader.stats["doc:malformed_line"] == 1 and reader.stats["lines"] == 100


def test_buffer_shuffle_follows_webdatasets_rule_by_hand():
    """Size 3, first draw once 2 are in: reads two a step while the buffer is not full, draws rng.randint over
    it, the last item takes the drawn one's place; then drains. The draws are scripted; the ranges are checked."""
    class Scripted:
        picks, ranges = [1, 0, 2, 0, 1, 0], []

        def randint(self, a, b):
            self.ranges.append((a, b))
            return self.picks[len(self.ranges) - 1]

    rng = Scripted()
    # buf [0 1] -> 1 | [0 2 3] -> 0 | [3 2 4] -> 4 | [3 2 5] -> 3 | drain [5 2] -> 2, [5] -> 5
    assert list(data.buffer_shuffle(range(6), 3, 2, rng)) == [1, 0, 4, 3, 2, 5]
    assert rng.ranges == [(0, 1), (0, 2), (0, 2), (0, 2), (0, 1), (0, 0)]
    assert list(data.buffer_shuffle(range(6), 0, 2, rng)) == list(range(6))


def test_shard_shuffle_uses_the_originals_buffer_sizes():
    """5,000 documents with 1,000 read before the first is given out: the first comes after 1,000 reads, and
    later each comes with 5,000 more read than given out; every document comes out once."""
    read = [0]

    def lines():
        for i in range(20_000):
            read[0] += 1
            yield i
    (size, initial), = {(s.shuffle_buffer, s.shuffle_initial) for s in (data.mmc4_source("s", "", "", None),
                                                                         data.pair_source("s", "", "", None))}
    out = [(x, read[0]) for x in data.buffer_shuffle(lines(), size, initial, random.Random(0))]
    assert out[0][1] == 1000 and out[10_000][1] == 15_000
    assert sorted(x for x, _ in out) == list(range(20_000)) and [x for x, _ in out] != list(range(20_000))


def pair_shard_source(root, captions, shuffle_buffer=0, shuffle_initial=0, **options):
    """A one-shard pair source over `captions` (None: a malformed line), one blue image for all; in file order
    unless given a shuffle buffer."""
    write_jpeg(os.path.join(root, "p.jpg"), "blue", size=(16, 16))
    lines = ["{not json" if c is None else json.dumps({"image": "p.jpg", "caption": c}) for c in captions]
    with open(os.path.join(root, "0.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    build = data.PairBuilder(data.ImageFolder(root, data.DualTransform(8, None)), demo_tok(), num_img_token=2,
                             **options)
    return data.ShardSource("pairs", ["0.txt"], root, build, seed=5, shuffle_buffer=shuffle_buffer,
                            shuffle_initial=shuffle_initial)


def test_shard_shuffle_buffer_resumes_at_any_document(tmp_path):
    """A 40-line shard through a buffer of 8 (first draw at 3): every line once, not in file order, none more than
    8 ahead of its place; starting at any document n of the read order gives exactly documents n.. again; the next
    epoch draws another order."""
    src = pair_shard_source(str(tmp_path), [f"number {j}" for j in range(40)], shuffle_buffer=8, shuffle_initial=3)
    tok = demo_tok()
    number = lambda s: int(tok.decode(s.text_ids).split()[-1])
    full = list(src.samples(data.Reader(), 0, 0))
    order = [number(s) for s in full]
    assert sorted(order) == list(range(40)) and order != list(range(40))
    assert all(j < n + 8 for n, j in enumerate(order))
    assert [s.key for s in full] == [(0, 0, 0, n) for n in range(40)]
    for n in (1, 2, 3, 9, 20, 39, 40):
        rest = list(src.samples(data.Reader(), 0, 0, start_slot=0, start_line=n))
        assert [s.key for s in rest] == [s.key for s in full[n:]]
        assert [s.text_ids.tolist() for s in rest] == [s.text_ids.tolist() for s in full[n:]]
    assert [number(s) for s in src.samples(data.Reader(), 1, 0)] != order


def test_a_resumed_shard_counts_only_the_documents_it_reads_again(tmp_path):
    """Resuming at document 4 of 10 (line 7 malformed), the counts cover documents 4-9: 6 lines, 5 used, 1 skipped."""
    src = pair_shard_source(str(tmp_path), [f"number {j}" if j != 7 else None for j in range(10)])
    reader = data.Reader()
    assert len(list(src.samples(reader, 0, 0, start_slot=0, start_line=4))) == 5
    assert reader.stats == Counter({"lines": 6, "docs_used": 5, "doc:malformed_line": 1})


def test_the_rows_count_leaves_out_rows_dropped_without_an_image(tmp_path):
    """Three long captions, each with its image last, packed into rows of 10 tokens: most rows hold text only and
    are dropped; the count is of the 3 rows handed out, one per image."""
    src = pair_shard_source(str(tmp_path), ["word " * 12] * 3, img_first_prob=0.0)
    cfg = data.PackConfig(num_total_token=10, num_img_token=2, batch_size=1)
    reader = data.Reader()
    batches = list(data.source_batches(src, cfg, demo_tok(), reader, {"epoch": 0, "pass": 0}))
    assert len(batches) == 3 and reader.stats["rows"] == 3


def test_bad_data_is_skipped_counted_and_never_misaligns(tmp_path, capsys):
    """Unreadable / truncated / missing images, malformed lines, documents without a usable image, a missing
    and a corrupt shard: each is skipped and counted under its reason, the summary line reports them, and
    every emitted row is intact and aligned."""
    root = str(tmp_path)
    good = make_images(root, 8)
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(buf, "JPEG")
    (tmp_path / "truncated.jpg").write_bytes(buf.getvalue()[:len(buf.getvalue()) // 2])
    (tmp_path / "notimage.jpg").write_bytes(b"this is not an image")
    docs = [
        mmc4_doc(good[0:2]),  # fine
        mmc4_doc([good[2], ("truncated.jpg", "red"), ("missing.jpg", "red"), good[3]]),  # 2 bad images, doc kept
        mmc4_doc([("notimage.jpg", "red"), ("missing2.jpg", "red")]),  # no usable image
        mmc4_doc(good[4:6], sims=[0.1, 0.2]),  # below threshold: no usable image
        mmc4_doc(good[6:8]),
    ]
    bad_lines = ['{"text_list": ["a"], "image_info": [{"image_name": "x.jpg"}]}',  # missing keys
                 "{not json", '[1, 2, 3]',
                 json.dumps(mmc4_doc([good[0]]) | {"image_info": [{"image_name": "img0.jpg", "matched_text_index": 9,
                                                                  "matched_sim": 0.9}]})]  # index out of range
    write_zip_shard(str(tmp_path / "docs_shard_0_v2.jsonl.zip"), docs[:3], bad_lines)
    write_zip_shard(str(tmp_path / "docs_shard_1_v2.jsonl.zip"), docs[3:])
    write_zip_shard(str(tmp_path / "docs_shard_2_v2.jsonl.zip"), [mmc4_doc(good[:2])] * 50)
    data_ = (tmp_path / "docs_shard_2_v2.jsonl.zip").read_bytes()
    (tmp_path / "docs_shard_2_v2.jsonl.zip").write_bytes(data_[:len(data_) // 2])  # truncated archive
    tok = demo_tok()
    src = data.mmc4_source("docs_shard_{0..3}_v2.jsonl", root, root, tok, data.DualTransform(8, 12), num_img_token=4,
                           img_first_prob=1.0)
    ds = data.MixedDataset([src], [1], [data.PackConfig(40, 4, 15, "image", 1)], tok, seed=0, flush_last=True)
    batches = list(ds)
    for b in batches:
        check_row_alignment(tok, b, 4)
    stats = ds.last_stats["mmc4"]
    assert stats["image:image_unreadable"] == 2  # truncated.jpg, notimage.jpg
    assert stats["image:image_missing"] == 2
    assert stats["doc:no_usable_image"] == 2 and stats["doc:malformed_line"] == 4
    assert stats["shard:shard_missing"] == 1 and stats["shard:shard_unreadable"] == 1
    assert stats["docs_used"] == 3 and stats["lines"] == 9
    assert sorted(images_of(batches)) == sorted(n for n, _ in good[0:4] + good[6:8])
    out = capsys.readouterr().out
    assert "[data] mmc4 epoch 0 pass 0" in out and "doc:malformed_line=4" in out and "shard:shard_missing=1" in out


# ----------------------------------------------------------------------------------------------------------------
# data.py: the demo corpus
# ----------------------------------------------------------------------------------------------------------------


def test_scene_text_round_trip_and_edits():
    """parse_scene(describe_scene(s)) == s and parse_edit(describe_edit(e), prev) reproduces each step of
    2,000 stories; the splits never share a story seed; stories depend on the seed alone."""
    for seed in range(2000):
        st = data.make_story(seed)
        assert 2 <= len(st.scenes) <= 4 and all(data.is_valid_scene(s) for s in st.scenes)
        assert data.parse_scene(st.texts[0]) == st.scenes[0]
        for prev, text, nxt in zip(st.scenes, st.texts[1:], st.scenes[1:]):
            edit = data.parse_edit(text, prev)
            assert edit is not None and data.apply_edit(prev, edit) == nxt, text
    assert data.parse_scene("nothing here") is None
    assert data.parse_scene("a red circle at the top left and a red circle at the centre.") is None
    s = data.parse_scene("The picture: An orange square at the bottom right, a blue circle at the centre.")
    assert s == (data.Obj(1, 1, "circle", "blue"), data.Obj(2, 2, "square", "orange"))
    assert data.make_story(5).texts == data.make_story(5).texts
    ranges = [(data.SPLIT_SEED_BASE[k], data.SPLIT_SEED_BASE[k] + data.SPLIT_SIZE[k]) for k in ("train", "val", "test")]
    assert all(a[1] <= b[0] for a, b in zip(ranges, ranges[1:]))


def test_scenes_hold_at_most_three_objects_when_read_back():
    """A demo scene has 1-3 objects: a description of four does not parse, nor does an object appearing in a
    scene of three (each would be a valid scene or edit under a looser rule)."""
    three = data.parse_scene("a red circle at the top left, a blue square at the centre and a green triangle at "
                             "the bottom right.")
    assert len(three) == 3
    assert data.parse_scene("a red circle at the top left, a blue square at the centre, a green triangle at the "
                            "bottom right and a red square at the top right.") is None
    assert data.parse_edit("a red square appears at the top right.", three) is None
    two = three[:2]
    assert data.parse_edit("a red square appears at the top right.", two) == {
        "kind": "appear", "obj": data.Obj(0, 2, "square", "red")}


def test_render_and_read_scene_round_trip():
    rng = random.Random(0)
    for _ in range(300):
        scene = data.random_scene(rng, rng.randint(1, 3))
        img = data.render_scene(scene)
        assert img.shape == (64, 64, 3) and img.dtype == np.uint8
        assert data.read_scene(img) == scene
        assert data.read_scene(torch.from_numpy(img).permute(2, 0, 1).float().numpy() / 255) == scene
    assert data.read_scene(data.render_scene(scene, 32)) == scene


def test_demo_batches_carry_scenes_that_match_images_and_text():
    """Demo batches: each image reads back as its meta scene, and the edit sentence before each image turns
    the story's previous scene into that scene; val and train never share a story."""
    tok = demo_tok()
    ds = data.demo_dataset(tok, "train", num_total_token=160, num_img_token=4, batch_size=4, num_stories=40, seed=1)
    ds.verbose, ds.flush_last = False, True
    batches = list(ds)
    assert batches and all(b["image_tensors"].shape[1:] == (3, 64, 64) for b in batches)
    stories = Counter()
    for b in batches:
        assert len(b["meta"]["scenes"]) == b["image_tensors"].shape[0]
        for img, info in zip(b["image_tensors"], b["meta"]["image_info"]):
            scene = data.canonical(data.Obj(*o["cell"], o["shape"], o["colour"]) for o in info["scene"])
            assert data.read_scene(img.numpy()) == scene
            story = data.make_story(info["story"])
            assert story.scenes[info["step"]] == scene
            stories[info["story"]] += 1
        assert torch.equal(b["image_tensors"], b["image_tensors_dec"])
    assert stories == Counter({i: len(data.make_story(i).scenes) for i in range(40)})  # every image exactly once
    val = data.StorySource(tok, "val", num_stories=5)
    val_seeds = {i["story"] for s in val.samples(data.Reader(), 0, 0) for i in s.image_info}
    assert val_seeds == set(range(data.SPLIT_SEED_BASE["val"], data.SPLIT_SEED_BASE["val"] + 5))


def test_demo_pairs_are_story_openings_told_before_their_image():
    """demo_dataset(pairs=p): a share p of the batches hold image-text pairs, each a story's opening sentence then
    its image (one image a pair, read back as the story's first scene); the other batches hold whole stories."""
    tok = demo_tok()
    ds = data.demo_dataset(tok, "train", num_total_token=160, num_img_token=4, batch_size=2, num_stories=40, seed=1,
                           pairs=0.5)
    ds.verbose, ds.flush_last = False, True
    kinds = Counter()
    for b in ds:
        name = b["meta"]["dataset_name"]
        kinds[name] += 1
        if name != "shape_pairs_train":
            continue
        for row in b["text_ids"].tolist():   # (a row may start or end inside a pair: rows are packed like MMC4)
            for j in (j for j, t in enumerate(row) if t == tok.soi_id):
                # the sentence right before the image, which ends its pair
                assert j > 0 and row[j - 1] not in (tok.bos_id, tok.eos_id, tok.image_id, tok.pad_id)
                assert row[j + 1:j + 6] == [tok.image_id] * 4 + [tok.eos_id]
        for img, info in zip(b["image_tensors"], b["meta"]["image_info"]):
            assert info["step"] == 0
            assert data.read_scene(img.numpy()) == data.make_story(info["story"]).scenes[0]
    assert set(kinds) == {"shape_stories_train", "shape_pairs_train"}
    with pytest.raises(ValueError, match="0 <= pairs < 1"):
        data.demo_dataset(tok, pairs=1.0)


def test_train_demo_pairs_mix_the_training_stream_only():
    demo = os.path.join(HERE, "configs", "demo.py")
    tc = train.load_config([demo, "--vae_from=", "--demo_pairs=0.25"])
    cfg = train.model_config(tc)
    train_set, val_set = (train.mixed_dataset(cfg, tc, split, 0, 1) for split in ("train", "val"))
    assert [s.name for s in train_set.sources] == ["shape_stories_train", "shape_pairs_train"]
    assert train_set.probs == [0.75, 0.25]
    assert [s.name for s in val_set.sources] == ["shape_stories_val"]
    with pytest.raises(mmi.InputError, match="demo_pairs 1.0: expected a share"):
        train.check_inputs(train.load_config([demo, "--vae_from=", "--demo_pairs=1.0"]))


def test_names_by_colour_hand_cases():
    red_circle, green_circle, green_square = data.Obj(0, 0, "circle", "red"), data.Obj(0, 1, "circle", "green"), \
        data.Obj(0, 1, "square", "green")
    story = lambda scene, edit: data.Story(0, [], [scene, data.apply_edit(scene, edit)], [edit])
    assert data.names_by_colour(story((red_circle, green_circle), {"kind": "disappear", "obj": green_circle}))
    assert data.names_by_colour(story((red_circle, green_circle), {"kind": "move", "obj": red_circle, "cell": (2, 2)}))
    assert not data.names_by_colour(story((red_circle, green_square), {"kind": "disappear", "obj": green_square}))
    blue_circle = data.Obj(2, 2, "circle", "blue")            # an appearing object is named in full, not found
    assert not data.names_by_colour(story((red_circle,), {"kind": "appear", "obj": blue_circle}))


def test_demo_keep_by_shape_thins_only_stories_named_by_shape():
    """StorySource(keep_by_shape=q) uses every story with an edit that only the colour resolves, and about a share q
    of the others, the same ones every pass, counting those it skips. The check reads the sentences themselves:
    "the <colour> <shape> ..." where the scene before holds another <shape>."""
    def colour_needed(story):
        return any(text.split()[0] == "the" and sum(o.shape == text.split()[2] for o in scene) > 1
                   for text, scene in zip(story.texts[1:], story.scenes))

    tok, n = demo_tok(), 200
    src = data.StorySource(tok, "train", num_stories=n, num_img_token=4, keep_by_shape=0.25)
    reader = data.Reader()
    used = [[s.image_info[0]["story"] for s in src.samples(reader, 0, p)] for p in (0, 1)]
    assert used[0] == used[1]
    needed = {i for i in range(n) if colour_needed(data.make_story(i))}
    assert needed <= set(used[0])
    kept_share = (len(used[0]) - len(needed)) / (n - len(needed))
    assert 40 <= len(needed) <= 120 and 0.15 <= kept_share <= 0.35, (len(needed), kept_share)
    assert reader.stats["story:by_shape_alone"] == 2 * (n - len(used[0]))
    everything = data.StorySource(tok, "train", num_stories=n, num_img_token=4)
    assert [s.image_info[0]["story"] for s in everything.samples(data.Reader(), 0, 0)] == list(range(n))

    demo = os.path.join(HERE, "configs", "demo.py")
    tc = train.load_config([demo, "--vae_from=", "--demo_keep_by_shape=0.25"])
    train_set, val_set = (train.mixed_dataset(train.model_config(tc), tc, split, 0, 1) for split in ("train", "val"))
    assert [s.keep_by_shape for s in train_set.sources + val_set.sources] == [0.25, 1.0]
    with pytest.raises(mmi.InputError, match="demo_keep_by_shape 1.5: expected a share"):
        train.check_inputs(train.load_config([demo, "--vae_from=", "--demo_keep_by_shape=1.5"]))


def test_show_cli_writes_sheet_and_text(tmp_path):
    assert data.main(["--demo", "--show", "3", "--out", str(tmp_path)]) == 0
    sheet = Image.open(tmp_path / "demo_sheet.png")
    assert sheet.size[1] > 3 * 64
    lines = (tmp_path / "demo_samples.txt").read_text().splitlines()
    assert len(lines) == 3 and all("story" in l and "</s>" in l for l in lines)
    assert "16 image tokens per image" in lines[0] and "<|image|>x16" in lines[0]   # as the demo model reads them
    assert int(re.search(r"\((\d+) tokens", lines[0]).group(1)) == \
        len(data.story_sample(data.make_story(data.SPLIT_SEED_BASE["train"]), demo_tok(), random.Random(0),
                              num_img_token=16).text_ids)


def test_annotations_nested_too_deeply_are_an_input_error(tmp_path):
    path = tmp_path / "annt.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(mmi.InputError, match="nested too deeply"):
        data.load_inference_annotations(str(path), demo_tok())


def test_data_cli_with_nothing_to_do_is_usage_and_exit_2(capsys):
    assert mmi.run_script(data.main, []) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("usage: ") and err[-1].endswith("give --demo --show N or --train-tokenizer")


@pytest.mark.parametrize("argv, message", [
    (["--demo", "--show=0"], "--show=0: expected 1 to 1000 stories"),
    (["--show=8"], "--demo --show N writes N samples of the demo corpus: give both"),
    (["--demo"], "--demo --show N writes N samples of the demo corpus: give both"),
])
def test_data_cli_show_without_its_other_half_is_one_line(argv, message, tmp_path, capsys):
    assert mmi.run_script(data.main, argv + [f"--out={tmp_path / 'show'}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.endswith(f": error: {message}\n"), err
    assert not (tmp_path / "show").exists()


def test_a_story_source_resumed_at_the_key_after_a_story_reads_the_next_story_on():
    tok = demo_tok()
    src = data.StorySource(tok, "val", num_stories=6, num_img_token=4)
    full = list(src.samples(data.Reader(), 0, 0))
    after = src.next_key(full[2].key)
    rest = list(src.samples(data.Reader(), 0, 0, start_slot=after[2], start_line=after[3]))
    assert [s.key for s in rest] == [s.key for s in full[3:]] and len(rest) == 3


def test_demo_stream_resumes_exactly():
    """The demo stream resumes from a saved position like the real sources (same code path)."""
    tok = demo_tok()

    def make():
        ds = data.demo_dataset(tok, num_total_token=96, num_img_token=4, batch_size=2, num_stories=30, seed=5)
        ds.verbose = False
        return ds
    full = list(make())
    k = len(full) // 2
    ds = make()
    ds.load_state_dict({0: full[k]["meta"]["position"]["state"]})
    rest = list(ds)
    assert len(rest) == len(full) - k - 1
    assert all(torch.equal(a["text_ids"], b["text_ids"]) and a["meta"]["scenes"] == b["meta"]["scenes"]
               for a, b in zip(rest, full[k + 1:]))


# ----------------------------------------------------------------------------------------------------------------
# data.py: bad images and prompts
# ----------------------------------------------------------------------------------------------------------------


def bands(size, colours):
    """An image cut into equal bands along its long side, one per colour."""
    w, h = size
    arr = np.zeros((h, w, 3), np.uint8)
    for k, c in enumerate(colours):
        if w >= h:
            arr[:, k * w // len(colours):(k + 1) * w // len(colours)] = PALETTE[c]
        else:
            arr[k * h // len(colours):(k + 1) * h // len(colours)] = PALETTE[c]
    return Image.fromarray(arr)


def test_extreme_aspect_ratio_is_cropped_before_resizing(tmp_path, monkeypatch):
    """A 1x400000 PNG (a few KB) would be resized to 64 x 25.6M pixels: the long side is cut to MAX_ASPECT times
    the short one around its centre first, so no image made on the way exceeds 64 x (MAX_ASPECT * 128) pixels."""
    made = []
    resize = Image.Image.resize

    def bounded_resize(self, size, *args, **kwargs):
        made.append(size)
        assert size[0] * size[1] <= 128 * 128 * data.MAX_ASPECT, f"resize to {size}"
        return resize(self, size, *args, **kwargs)
    monkeypatch.setattr(Image.Image, "resize", bounded_resize)
    for size in ((1, 400_000), (400_000, 1), (3, 90_000)):
        bands(size, ["red", "green", "blue"]).save(tmp_path / "long.png")
        assert (tmp_path / "long.png").stat().st_size < 10_000
        enc, dec = data.DualTransform(64, 128)(data.load_image(tmp_path / "long.png"))
        assert enc.shape == (3, 64, 64) and dec.shape == (3, 128, 128)
        assert colour_of(enc) == colour_of(dec) == "green"       # the centre of the long side
    assert made
    # up to MAX_ASPECT nothing is cut: a 32x512 image gives exactly the plain resize's middle
    img = bands((32, 16 * 32), ["red", "green", "blue", "yellow"])
    want = np.asarray(resize(img, (64, 1024), Image.BICUBIC))[480:544]
    assert np.array_equal(data.center_crop_arr(img, 64), want)


def test_undecodable_or_oversized_images_are_skipped_by_reason(tmp_path, monkeypatch):
    """A truncated JPEG or a header-only PNG is image_unreadable; more pixels than Image.MAX_IMAGE_PIXELS (where
    Pillow only warns) or twice that (where Pillow refuses) is image_too_large, before any decoding."""
    buf = io.BytesIO()
    bands((64, 64), ["red", "blue"]).save(buf, "JPEG")
    (tmp_path / "cut.jpg").write_bytes(buf.getvalue()[:len(buf.getvalue()) // 2])
    buf = io.BytesIO()
    bands((64, 64), ["red", "blue"]).save(buf, "PNG")
    (tmp_path / "header.png").write_bytes(buf.getvalue()[:33])    # signature + IHDR, no pixel data
    for name in ("cut.jpg", "header.png"):
        with pytest.raises(data.SkipSample) as e:
            data.load_image(tmp_path / name)
        assert e.value.reason == "image_unreadable" and name in e.value.detail
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    for size, ok in (((30, 30), True), ((40, 30), False), ((50, 50), False)):
        Image.new("RGB", size, (1, 2, 3)).save(tmp_path / "x.png")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            if ok:
                assert data.load_image(tmp_path / "x.png").size == size
                continue
            with pytest.raises(data.SkipSample) as e:
                data.load_image(tmp_path / "x.png")
        assert e.value.reason == "image_too_large" and "x.png" in e.value.detail


def test_a_16_bit_grey_png_reads_as_its_high_byte(tmp_path):
    """A 16-bit greyscale PNG (values 0..65535) reads as value >> 8 in each of R, G, B, as Pillow reads a 16-bit
    colour PNG, rather than clipped at 255 (which read every value above 255 as white)."""
    values = np.array([[0x0000, 0x00ff, 0x1234], [0x8000, 0xabcd, 0xffff]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "grey16.png")
    assert Image.open(tmp_path / "grey16.png").mode == "I;16"          # what the file holds
    got = np.asarray(data.load_image(tmp_path / "grey16.png"))
    want = np.array([[0x00, 0x00, 0x12], [0x80, 0xab, 0xff]], dtype=np.uint8)
    assert got.shape == (2, 3, 3) and all(np.array_equal(got[..., c], want) for c in range(3))


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "scores.json"
    path.write_text("old")
    with pytest.raises(RuntimeError):
        with data.replaced_on_success(str(path)) as tmp, open(tmp, "w") as f:
            f.write("half of the new")
            raise RuntimeError("disk full")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["scores.json"]
    with data.replaced_on_success(str(path)) as tmp, open(tmp, "w") as f:
        f.write("new")
    assert path.read_text() == "new" and os.listdir(tmp_path) == ["scores.json"]


def test_data_atomic_write_whose_rename_fails_leaves_no_temporary(tmp_path):
    (tmp_path / "folder").mkdir()
    with pytest.raises(IsADirectoryError):
        ev.write_json_atomic(str(tmp_path / "folder"), {"a": 1})
    assert os.listdir(tmp_path) == ["folder"] and os.listdir(tmp_path / "folder") == []


def test_inference_sample_keeps_only_whole_image_placeholders(tmp_path):
    """Truncation at num_total_token keeps an image only if its whole placeholder fits; a prompt whose first
    image does not fit is a SkipSample naming the numbers, not a crash."""
    write_jpeg(str(tmp_path / "a.jpg"), "red")
    write_jpeg(str(tmp_path / "b.jpg"), "green")
    tok = demo_tok()
    info = {"sentences": ["a red thing.", "then a green one."], "images": ["a.jpg", "b.jpg"],
            "sentence_ixs": [0, 1], "image_first": [False, False]}
    full = tok.encode("a red thing." + data.image_placeholder(4) + " then a green one." + data.image_placeholder(4))
    second = [i for i, t in enumerate(full) if t == tok.soi_id][1]
    transform = data.DualTransform(16, None)
    for budget in (second + 1, second + 4):                          # the second placeholder cut inside
        b = data.inference_sample(info, tok, transform, 4, budget, str(tmp_path), "here")
        assert b["text_ids"].tolist() == [full[:second]] and b["num_image_per_seq"].tolist() == [1]
        assert b["image_tensors"].shape[0] == 1 and colour_of(b["image_tensors"][0]) == "red"
    b = data.inference_sample(info, tok, transform, 4, second + 5, str(tmp_path), "here")
    assert b["text_ids"].tolist() == [full] and b["num_image_per_seq"].tolist() == [2]
    with pytest.raises(data.SkipSample) as e:
        data.inference_sample(info, tok, transform, 4, 5, str(tmp_path), "here")
    assert e.value.reason == "image_beyond_budget"
    assert e.value.detail.startswith(f"here: {len(full)} tokens;") and "num_total_token=5" in e.value.detail


# ----------------------------------------------------------------------------------------------------------------
# train.py: the loop from a config file, the 13B recipe's parameter groups, exact resume, gradient accumulation,
# the NaN guard, FLOP counting, FSDP on two CPU processes, the demo VAE stage
# ----------------------------------------------------------------------------------------------------------------


# the smallest honest run: tiny preset, random rows of 32 tokens with one 64x64 image each
TINY_CONFIG = """
preset = "tiny"
data = "synthetic"
seq_len = 32
images_per_row = 1
batch_size = 2
warmup_steps = 2
max_steps = 3
dtype = "float32"
device = "cpu"
eval_interval = 0
export = False
progress = False
"""


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "tiny_train.py"
    path.write_text(TINY_CONFIG)
    return str(path)


def run_train(config_file, out_dir, *args):
    return train.run(train.load_config([config_file, f"--out_dir={out_dir}", *args]))


def read_metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


# ----------------------------------------------------------------------------------------------------------------
# train.py: config files and overrides
# ----------------------------------------------------------------------------------------------------------------


def test_train_config_files_and_overrides_are_type_checked(tmp_path, config_file):
    tc = train.load_config([config_file, "--max_steps=7", "--betas=(0.8, 0.9)", "--model.llm.num_hidden_layers=2"])
    assert (tc.max_steps, tc.betas, tc.seq_len) == (7, (0.8, 0.9), 32)
    assert tc.model_overrides == {"llm.num_hidden_layers": "2"}
    assert train.model_config(tc).llm.num_hidden_layers == 2
    bad = tmp_path / "bad.py"
    bad.write_text("max_stpes = 3\n")
    with pytest.raises(ValueError, match=r"bad\.py: unknown key 'max_stpes'"):
        train.load_config([str(bad)])
    bad.write_text("max_steps = '3'\n")
    with pytest.raises(ValueError, match=r"bad\.py: max_steps = '3' is a str, expected int"):
        train.load_config([str(bad)])
    with pytest.raises(ValueError, match="unknown key 'lr_max'"):
        train.load_config([config_file, "--lr_max=3"])
    with pytest.raises(ValueError, match="cannot read 'many' as int"):
        train.load_config([config_file, "--max_steps=many"])
    with pytest.raises(ValueError, match="llm.hiden_size"):
        train.load_config([config_file, "--model.llm.hiden_size=8"])
    ok = tmp_path / "ok.py"
    ok.write_text("import math\n_base = 2\nwarmup_steps = _base * 3\neps = 1\nbetas = [0.5, 0.6]\n")
    tc = train.load_config([str(ok)])                  # helpers and imports are skipped, int -> float, list -> tuple
    assert (tc.warmup_steps, tc.eps, tc.betas) == (6, 1.0, (0.5, 0.6)) and isinstance(tc.eps, float)


def test_a_command_line_value_keeps_the_equals_signs_after_the_first(config_file):
    assert train.load_config([config_file, "--out_dir=runs/lr=1e-4"]).out_dir == "runs/lr=1e-4"


def test_train_micro_batch_beyond_the_machines_memory_is_refused_before_it_is_made(config_file, monkeypatch):
    """A micro-batch whose token ids and mask alone (int64, batch_size x seq_len each) exceed the memory the process
    may count on is an InputError from the config check, before any row is made; one that fits passes."""
    monkeypatch.setattr(train, "host_memory", lambda: 2 ** 30, raising=False)
    rows = 2 ** 30 // (2 * 8 * 32) + 1                            # seq_len 32: 512 bytes a row, 1 GiB = 2**21 rows
    for flag in (f"--batch_size={rows}", f"--seq_len={2 ** 30 // (2 * 8 * 2) + 1}"):
        with pytest.raises(mmi.InputError, match=r"a micro-batch's inputs alone take 1\.0 GiB, more than .* 1\.0 GiB"):
            train.load_config([config_file, flag, "--images_per_row=0"])
    assert train.load_config([config_file, f"--batch_size={rows - 1}", "--images_per_row=0"]).batch_size == rows - 1


def test_train_first_step_runs_no_full_garbage_collection(config_file, tmp_path, monkeypatch):
    """The first step (with --compile the first two: millions of Python objects made) runs no full garbage
    collection, which would stop the process to walk them all; here its loss keeps a million lists, which under the
    default thresholds sets some off. The one full collection after it (freeze_long_lived) runs, and the run leaves
    the thresholds as they were."""
    phase, seen, kept = ["before"], [], []
    task, freeze = train.TASKS["mmi"], train.freeze_long_lived

    def loss_keeping_objects(*args):
        if not kept:
            phase.append("first step")
            kept.extend([] for _ in range(10 ** 6))
        return task.loss(*args)

    def note(stage, info):
        if stage == "start" and info["generation"] == 2:
            seen.append(phase[-1])
    monkeypatch.setitem(train.TASKS, "mmi", dataclasses.replace(task, loss=loss_keeping_objects))
    monkeypatch.setattr(train, "freeze_long_lived", lambda: (phase.append("after"), freeze()))
    thresholds = gc.get_threshold()
    gc.callbacks.append(note)
    try:
        run_train(config_file, tmp_path / "run", "--max_steps=1")
    finally:
        gc.callbacks.remove(note)
    assert "first step" not in seen and "after" in seen
    assert gc.get_threshold() == thresholds


def test_configs_that_freeze_pretrained_parts_name_their_weights():
    """A config that freezes CLIP or the LLM body starts from init_from: until its placeholder is set, the run stops
    with one line naming init_from, never trains on random frozen weights."""
    folder = os.path.join(HERE, "configs")
    frozen = []
    for name in sorted(os.listdir(folder)):
        tc = train.load_config([os.path.join(folder, name), "--vae_from="])
        cfg = train.model_config(tc)
        if tc.task == "mmi" and not (cfg.llm.trainable and cfg.vision.trainable):
            frozen.append(name)
            with pytest.raises(mmi.InputError, match=rf"^init_from {re.escape(tc.init_from)}: no such folder"):
                train.check_inputs(tc)
    assert "pretrain_13b.py" in frozen and "sft_vqa_13b.py" in frozen and "demo.py" not in frozen


def test_pretrain_13b_config_is_the_papers_recipe():
    tc = train.load_config([os.path.join(HERE, "configs", "pretrain_13b.py")])
    assert tc.preset == "mmi-13b" and tc.param_groups == train.PAPER_PARAM_GROUPS
    assert (tc.betas, tc.eps, tc.grad_clip, tc.warmup_steps, tc.max_steps) == ((0.9, 0.995), 1e-6, 1.0, 1000, 15000)
    cfg = train.model_config(tc)
    assert (cfg.loss_txt_weight, cfg.loss_img_weight) == (1.0, 10.0)
    assert [s[5] for s in tc.pretrain_sources] == [1.0, 1.0, 1.0, 2.0]         # blip2, laion_en, laion_coco, mmc4
    # HF's cosine with 1,000 warm-up steps, by hand: 0 at step 0, linear to 1 at 1,000, half-way down at 8,000
    assert train.lr_multiplier(0, 1000, 15000) == 0.0
    assert train.lr_multiplier(250, 1000, 15000) == 0.25
    assert train.lr_multiplier(1000, 1000, 15000) == 1.0
    assert train.lr_multiplier(8000, 1000, 15000) == pytest.approx(0.5, abs=1e-12)
    assert train.lr_multiplier(4500, 1000, 15000) == pytest.approx((1 + math.cos(math.pi / 4)) / 2, abs=1e-12)
    assert train.lr_multiplier(15000, 1000, 15000) == pytest.approx(0.0, abs=1e-12)


# ----------------------------------------------------------------------------------------------------------------
# train.py: parameter groups on the paper-size model
# ----------------------------------------------------------------------------------------------------------------


def test_param_groups_and_weight_decay_match_spec_on_meta_13b():
    with torch.device("meta"):
        model = mmi.MMInterleaved(mmi.MMIConfig.from_preset("mmi-13b"))
    table = {}
    for g in train.param_groups(model, train.PAPER_PARAM_GROUPS):
        for name in g["names"]:
            table[name] = (g["lr"], g["weight_decay"])
    x = "mm_decoder.layers.4.llama_cross_attn."
    a = "visual_tokenizer.encoder.vision_model.adapter_interactions.1."
    expected = {
        x + "gate": (1e-4, 0.0),
        x + "attn.sampling_offsets.weight": (1e-5, 0.0),
        x + "attn.sampling_offsets.bias": (1e-5, 0.0),
        x + "attn.value_proj.weight": (1e-4, 0.05),
        x + "attn.value_proj.bias": (1e-4, 0.0),                 # bias: no decay
        x + "attn.query_relpos.weight": (1e-4, 0.05),
        x + "attn.ignore_token": (1e-4, 0.05),                   # trainable in the LLM's MMFS, as the original
        x + "norm1.weight": (1e-4, 0.05),                        # RMSNorm is NOT exempt
        a + "injector.attn.sampling_offsets.weight": (1e-5, 0.0),
        a + "injector.gamma": (1e-4, 0.05),
        a + "injector.query_norm.weight": (1e-4, 0.0),           # nn.LayerNorm: no decay
        "visual_tokenizer.encoder.vision_model.adapter_spm.stem.1.weight": (1e-4, 0.05),  # LayerNorm2d is NOT exempt
        "visual_tokenizer.perceiver_resampler.blip2qformer.encoder.layer.0.attention.attention.q_norm.weight":
            (1e-4, 0.0),
        "visual_tokenizer.perceiver_resampler.queries": (1e-4, 0.05),
        "visual_tokenizer.pos_ln.bias": (1e-4, 0.0),
        "text_decoder.head_new.weight": (1e-4, 0.05),
        "context_feat_proj.weight": (1e-4, 0.05),
        "soi_token": (1e-4, 0.05),
        "image_decoder.decoder.unet.down_blocks.0.resnets.0.conv1.weight": (1e-5, 0.05),
        "image_decoder.decoder.unet.down_blocks.0.resnets.0.conv1.bias": (1e-5, 0.0),
        "image_decoder.decoder.unet.down_blocks.0.resnets.0.norm1.weight": (1e-5, 0.05),   # GroupNorm is decayed
        "image_decoder.decoder.unet.down_blocks.0.attentions.0.transformer_blocks.0.norm1.weight": (1e-5, 0.0),
        "image_decoder.decoder.mmfs_module.mmfs_down_blocks.0.mmfs.sampling_offsets.weight": (1e-5, 0.0),
        "image_decoder.decoder.mmfs_module.mmfs_down_blocks.0.conv.weight": (1e-4, 0.05),   # not under .unet
        "image_decoder.neg_prompt_embeds": (1e-4, 0.05),
    }
    assert {k: table.get(k) for k in expected} == expected
    # the frozen set never reaches the optimizer; the trainable set is exactly the original's
    with open(os.path.join(HERE, "assets", "reference", "mm_interleaved_13b_summary.json")) as f:
        ref = json.load(f)
    assert set(table) == set(ref["trainable_parameter_names"])
    for frozen in ("mm_decoder.layers.4.self_attn.q_proj.weight", "visual_tokenizer.pos_embed",
                   "image_decoder.decoder.vae.encoder.conv_in.weight",
                   "image_decoder.decoder.mmfs_module.mmfs_down_blocks.0.mmfs.ignore_token"):
        assert frozen not in table
    assert sum(1 for n in table if n.endswith("llama_cross_attn.gate")) == 10


# ----------------------------------------------------------------------------------------------------------------
# train.py: the loop
# ----------------------------------------------------------------------------------------------------------------


def test_loop_runs_three_steps_from_a_config_file(tmp_path, config_file, monkeypatch, capsys):
    """3 steps from a config file: the weights that train move, the metrics of every step, the last checkpoint;
    the progress bar draws its final state once (not again when it closes)."""
    monkeypatch.setenv("TQDM_MININTERVAL", "0")                               # tqdm draws at every update
    monkeypatch.setenv("TQDM_MINITERS", "1")
    out = str(tmp_path / "run")
    result = run_train(config_file, out, "--log_interval=1", "--progress=true")
    printed = capsys.readouterr()
    assert re.search(r"^steps 1-3 took \d+\.\d min$", printed.out, re.M)
    assert len(re.findall(r"\b3/3\b", printed.err)) == 1
    model = result["model"]
    torch.manual_seed(32)                                 # the loop's seed: the same initial weights
    init = mmi.MMInterleaved(train.model_config(result["config"]))
    assert sorted(result["losses"]) == [1, 2, 3] and all(math.isfinite(v) for v in result["losses"].values())
    after = dict(model.named_parameters())
    for name, p in init.named_parameters():
        changed = not torch.equal(p, after[name])
        # steps 2 and 3 update every trainable weight that gets a gradient; frozen ones never move
        if not p.requires_grad:
            assert not changed, name
    assert not torch.equal(init.mm_decoder.layers[0].mlp.up_proj.weight, model.mm_decoder.layers[0].mlp.up_proj.weight)
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert {"loss", "loss_txt", "lr", "samples_per_s", "tokens_per_s", "mfu", "grad_norm"} <= set(r)
        assert r["tokens_per_s"] == pytest.approx(2 * 32 / r["time_s"])          # 2 rows of 32 tokens per step
        assert r["samples_per_s"] == pytest.approx(2 / r["time_s"])
    assert [r["lr"] for r in rows] == [0.0, 0.5e-4, 1e-4]              # warm-up 2: 0, 1/2, then cosine from 1
    assert os.listdir(out + "/ckpt_00000003") and not os.path.exists(out + "/ckpt_00000003.tmp")


@pytest.mark.parametrize("graphsafe_cacheable", [False, True])
def test_compiled_checkpointing_replays_rng_in_a_form_inductor_caches(monkeypatch, graphsafe_cacheable):
    """Where Inductor caches only the plain RNG replay of a checkpoint's recomputation (torch 2.11), compile_blocks
    takes it, or a warm run would recompile every block with attention; elsewhere the default stays."""
    from torch._prims import rng_prims
    monkeypatch.setattr(torch._functorch.config, "graphsafe_rng_functionalization", True)
    monkeypatch.setattr(rng_prims.graphsafe_run_with_rng_state, "cacheable", lambda: graphsafe_cacheable)
    train.compile_blocks([torch.nn.Linear(2, 2)], checkpoint=False)
    assert torch._functorch.config.graphsafe_rng_functionalization
    train.compile_blocks([torch.nn.Linear(2, 2)], checkpoint=True)
    assert torch._functorch.config.graphsafe_rng_functionalization == graphsafe_cacheable


def _compiled_blocks_match_eager(device, backend):
    """compile_blocks on a tiny model against the model's own checkpointing: the first step (eager) gives the
    very loss, the second (compiled) the loss and every gradient (to float32 re-association; key biases' gradients,
    0 in exact arithmetic, are noise); state_dict keys unchanged, one graph per block structure, shared, its sizes
    symbolic only where its blocks run at several; nothing compiled without gradients."""
    torch._dynamo.reset()
    cfg = dataclasses.replace(mmi.MMIConfig.from_preset("tiny"), gradient_checkpointing=True)
    batch = make_batch(cfg, [[BOS, 20, 21, "img", 22, 23, 24, "img", 25, EOS], [BOS, "img", 26, 27, 28, EOS]], 40)
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}

    def loss_and_grads(model):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)                                            # the same diffusion noise and timesteps
        loss = model(batch)["loss"]
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    torch.manual_seed(0)
    eager = mmi.MMInterleaved(cfg).to(device).train()
    torch.manual_seed(0)
    compiled = mmi.MMInterleaved(dataclasses.replace(cfg, gradient_checkpointing=False)).to(device).train()
    keys = list(compiled.state_dict())
    graphs = []                                   # per graph compiled: whether any of its sizes is symbolic

    def noting_symbolic_sizes(gm, example_inputs):
        graphs.append(any(isinstance(x, torch.SymInt) for t in example_inputs
                          for x in (t.shape if torch.is_tensor(t) else [t])))
        return torch._dynamo.lookup_backend(backend)(gm, example_inputs)

    train.compile_blocks(train.compile_units(compiled), checkpoint=True, backend=noting_symbolic_sizes)
    input_sizes = defaultdict(set)                # block structure -> the input sizes its blocks run at
    layouts = set()                               # whether each block input is contiguous (another layout: a graph)
    for block in train.compile_units(eager):
        structure = train.block_structure(block)
        if not mmi.kernels_used(device) and any(isinstance(m, mmi.MMFS) for m in block.modules()):
            continue   # the reference deformable attention reads the level shapes back: such blocks run uncompiled
        block.register_forward_hook(lambda m, args, out, s=structure: input_sizes[s].add(args[0].shape))
        block.register_forward_hook(lambda m, args, out: layouts.add(args[0].is_contiguous()))
    assert list(compiled.state_dict()) == keys
    want, want_grads = loss_and_grads(eager)
    assert layouts == {True}
    assert torch.equal(loss_and_grads(compiled)[0], want) and graphs == []     # the first round runs eager
    got, got_grads = loss_and_grads(compiled)
    # aot_eager runs the very same ops (the loss is exact); Inductor fuses them and sums in another order
    assert (torch.equal(got, want) if backend == "aot_eager" else abs(got - want) <= 1e-6 * abs(want))
    assert got_grads.keys() == want_grads.keys()
    scale = max(g.norm() for g in want_grads.values())
    for name, g in want_grads.items():
        assert (got_grads[name] - g).norm() <= 1e-5 * g.norm() + 1e-7 * scale, name
    # a graph per structure (fewer than blocks), with symbolic sizes where its blocks run at several (a UNet part
    # at two resolutions); a UNet block's channels stay static
    several = sum(len(sizes) > 1 for sizes in input_sizes.values())
    assert len(graphs) == len(input_sizes) and graphs.count(True) == several
    with torch.no_grad():
        compiled.eval()(batch)
    assert len(graphs) == len(input_sizes)                              # nothing compiled without gradients


def test_a_structure_at_two_sizes_compiles_once_with_those_sizes_symbolic():
    """Two blocks of one structure run at two resolutions, two more blocks at one: the first round runs eager and
    notes the sizes, the second compiles each structure once, the resolution symbolic where it varied (compiled at
    its first call, dynamo would compile that structure twice: static, then again symbolic) and static elsewhere;
    a third resolution compiles nothing. A setting the code holds as a constant (a stride) makes a structure of its
    own even where the weight shapes match. Outputs are the eager ones."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    a, b, c = torch.nn.Conv2d(2, 2, 3, padding=1), torch.nn.Conv2d(2, 2, 3, padding=1), torch.nn.Conv2d(2, 3, 1)
    d = torch.nn.Conv2d(2, 2, 3, padding=1, stride=2)
    graphs = []                                        # per graph compiled: whether any of its sizes is symbolic

    def noting_symbolic_sizes(gm, example_inputs):
        graphs.append(any(isinstance(x, torch.SymInt) for t in example_inputs
                          for x in (t.shape if torch.is_tensor(t) else [t])))
        return gm.forward

    x8, x4, x16 = torch.randn(1, 2, 8, 8), torch.randn(1, 2, 4, 4), torch.randn(1, 2, 16, 16)
    want = [F.conv2d(x, m.weight, m.bias, m.stride, m.padding) for m, x in [(a, x8), (b, x4), (c, x8), (d, x8),
                                                                              (a, x16)]]
    train.compile_blocks([a, b, c, d], checkpoint=False, backend=noting_symbolic_sizes)
    first = [a(x8), b(x4), c(x8), d(x8)]
    assert graphs == []                                # the first round: eager
    got = [a(x8), b(x4), c(x8), d(x8), a(x16)]
    assert sorted(graphs) == [False, False, True]      # c, d static; a and b one graph, its height and width symbolic
    for g, w in zip(first + got, want[:4] + want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_compile_leaves_mmfs_blocks_eager_where_the_kernel_does_not_run(config_file):
    """--compile on a CPU: the MMFS blocks stay eager (the reference deformable attention reads the level shapes
    back to the host, splitting their graph, which Inductor then fails to compile); every other block compiles."""
    tc = train.load_config([config_file, "--compile", "--device=cpu"])
    model = train.build_model(train.TASKS[tc.task], tc, train.model_config(tc), torch.device("cpu"), False)
    # (has an MMFS, forward replaced by the compiled one) over all blocks
    seen = {(any(isinstance(m, mmi.MMFS) for m in b.modules()), "forward" in vars(b))
            for b in train.compile_units(model)}
    assert seen == {(True, False), (False, True)}


def test_compile_units_are_the_blocks_with_the_unet_blocks_in_parts():
    """At 13B the UNet's 9 blocks are 9 structures; as parts (22 resnets and 16 transformers: SD-2's layout) they
    are 38 units of 15 structures. Every other repeated block stays whole, and the units cover each weight once,
    but the 3 down- and 3 upsamplers'."""
    with torch.device("meta"):
        model = mmi.MMInterleaved(mmi.MMIConfig.from_preset("mmi-13b"))
    unet = model.image_decoder.decoder.unet
    blocks = [*unet.down_blocks, unet.mid_block, *unet.up_blocks]
    units = train.compile_units(model)
    structure = lambda m: (type(m), tuple(p.shape for p in m.parameters()))
    parts = [u for u in units if any(u is m for b in blocks for m in b.modules())]
    kinds = Counter(type(u).__name__ for u in parts)
    assert kinds == {"ResnetBlock2D": 22, "Transformer2DModel": 16}
    assert len({structure(b) for b in blocks}) == 9 and len({structure(u) for u in parts}) == 15
    assert [u for u in units if u not in parts] == [b for b in train.repeated_blocks(model) if b not in blocks]
    samplers = [m for b in blocks for m in b.modules() if isinstance(m, (mmi.Downsample2D, mmi.Upsample2D))]
    assert len(samplers) == 6
    ids = [id(p) for u in [*units, *samplers] for p in u.parameters()]
    assert len(ids) == len(set(ids)) == len([p for b in train.repeated_blocks(model) for p in b.parameters()])


def test_compiled_blocks_give_the_eager_losses_and_gradients():
    """compile=True: the repeated blocks run through torch.compile with their activation checkpointing inside.
    Here with the aot_eager backend: dynamo's tracing, the checkpoint region and AOTAutograd's recomputation,
    without Inductor's code generation (minutes on a CPU; the CUDA test below has it)."""
    _compiled_blocks_match_eager("cpu", "aot_eager")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_blocks_on_cuda_give_eager_loss_and_grads():
    """The same with Inductor on CUDA, the deformable-attention kernel's op and its backward inside the compiled,
    checkpointed blocks (float32, TF32 off, so only the order of float32 sums differs)."""
    if not mmi.kernels_used("cuda"):
        pytest.skip("kernels.cu is not available")
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False   # cuDNN's default is on
    try:
        _compiled_blocks_match_eager("cuda", "inductor")
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


def test_a_second_run_into_an_out_dir_in_use_is_one_line(tmp_path, config_file, capsys):
    """While another run holds out_dir (its lock taken, as a training in another process holds it), a run into the
    same out_dir stops with one line and exit 2 and writes nothing there; once it is free, the run goes."""
    import fcntl
    out = tmp_path / "run"
    os.makedirs(out)
    other = os.open(out, os.O_RDONLY)
    fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        assert mmi.run_script(train.main, [config_file, f"--out_dir={out}", "--max_steps=1", "--ckpt_interval=-1"]) == 2
    finally:
        os.close(other)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"error: out_dir {out} is in use by another training run" in err
    assert os.listdir(out) == []
    assert mmi.run_script(train.main, [config_file, f"--out_dir={out}", "--max_steps=1", "--ckpt_interval=-1"]) == 0


def test_a_file_system_without_locks_runs_with_a_warning(tmp_path, config_file, monkeypatch, capsys):
    import fcntl

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))    # as some NFS mounts answer
    monkeypatch.setattr(fcntl, "flock", no_locks)
    out = tmp_path / "run"
    assert mmi.run_script(train.main, [config_file, f"--out_dir={out}", "--max_steps=1", "--ckpt_interval=-1"]) == 0
    assert f"out_dir {out} cannot be locked (No locks available); make sure no other run writes there" in \
        capsys.readouterr().err
    assert [r["step"] for r in read_metrics(out)] == [1]


def test_a_run_stopped_in_its_first_step_leaves_out_dir_as_it_found_it(tmp_path, config_file, monkeypatch, capsys):
    """Ctrl-C (or SIGTERM) during step 1, before any metrics line: the out_dir the run made is gone, one the user
    made is left empty (no empty metrics.jsonl), and the same command runs again."""
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt
    with monkeypatch.context() as m:
        m.setattr(torch.nn.utils, "clip_grad_norm_", interrupt)
        for out in (tmp_path / "made_by_the_run", tmp_path / "made_by_the_user"):
            if out.name == "made_by_the_user":
                out.mkdir()
            assert train.main([config_file, f"--out_dir={out}", "--max_steps=1"]) == 130
            assert "interrupted; no checkpoint written yet" in capsys.readouterr().err
        assert not (tmp_path / "made_by_the_run").exists() and os.listdir(tmp_path / "made_by_the_user") == []
    assert mmi.run_script(train.main, [config_file, f"--out_dir={tmp_path / 'made_by_the_run'}", "--max_steps=1"]) == 0
    assert [r["step"] for r in read_metrics(tmp_path / "made_by_the_run")] == [1]


FOUR_STEPS = ["--max_steps=4", "--ckpt_interval=2", "--batch_size=1", "--warmup_steps=1", "--log_interval=1"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A finished run of TINY_CONFIG (c.py) with FOUR_STEPS: its out_dir run/ holds ckpt_00000002, ckpt_00000004
    and metrics.jsonl (every step). -> (root, its losses, its final weights); tests copy run/, never change it."""
    root = tmp_path_factory.mktemp("tiny_run")
    (root / "c.py").write_text(TINY_CONFIG)
    result = run_train(str(root / "c.py"), str(root / "run"), *FOUR_STEPS)
    return root, result["losses"], {k: p.detach().clone() for k, p in result["model"].named_parameters()}


def test_resume_of_a_finished_run_says_there_is_no_step_to_run(tiny_run, tmp_path, capsys):
    root, _, _ = tiny_run
    out = tmp_path / "run"
    shutil.copytree(root / "run", out)
    run_train(str(root / "c.py"), str(out), *FOUR_STEPS, "--resume=true")
    assert "at step 4; max_steps is 4: no step to run" in capsys.readouterr().out


def test_resume_continues_exactly_and_keeps_the_last_checkpoints(tiny_run, tmp_path):
    """A run interrupted after step 2 and resumed gives bit-identical losses at steps 3 and 4 and the same final
    weights (data position, RNG, optimizer moments and step all restored); only the newest `keep_last` complete
    checkpoints stay."""
    root, losses, weights = tiny_run
    assert sorted(os.listdir(root / "run")) == ["ckpt_00000002", "ckpt_00000004", "metrics.jsonl"]
    interrupted = tmp_path / "interrupted"
    os.makedirs(interrupted)
    shutil.copytree(root / "run" / "ckpt_00000002", interrupted / "ckpt_00000002")
    resumed = run_train(str(root / "c.py"), str(interrupted), *FOUR_STEPS, "--resume=true", "--keep_last=1")
    assert sorted(resumed["losses"]) == [3, 4]
    assert [resumed["losses"][s] for s in (3, 4)] == [losses[s] for s in (3, 4)]
    b = dict(resumed["model"].named_parameters())
    assert all(torch.equal(weights[k], b[k]) for k in weights)
    assert sorted(n for n in os.listdir(interrupted) if n.startswith("ckpt")) == ["ckpt_00000004"]
    files = set(os.listdir(interrupted / "ckpt_00000004"))
    assert {".metadata", "config.json", "rank0.pt"} <= files and any(f.endswith(".distcp") for f in files)


def test_a_checkpoint_with_grad_accum_resumes_after_the_steps_last_micro_batch(tmp_path, config_file):
    """With 2 micro-batches a step, the data position saved after step 1 is after micro-batch 2 (not 1: a resumed
    run would read micro-batch 2 again)."""
    run_train(config_file, str(tmp_path / "run"), "--max_steps=1", "--batch_size=1", "--grad_accum=2")
    assert torch.load(tmp_path / "run" / "ckpt_00000001" / "rank0.pt")["data"] == {"micro_batch": 2}


def test_resume_drops_the_metrics_of_the_steps_it_runs_again(tiny_run, tmp_path, capsys):
    """A run killed after step 4 (its last checkpoint at step 2, the step-4 save and a metrics line cut short) and
    resumed leaves metrics.jsonl with each step once, steps 3 and 4 from the resumed run, and no unfinished save."""
    root, _, _ = tiny_run
    out = tmp_path / "run"
    shutil.copytree(root / "run", out)
    os.rename(out / "ckpt_00000004", out / "ckpt_00000004.tmp")   # killed before the step-4 save was complete
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "lo')                            # and while writing a line
    os.makedirs(out / "ckpt_00000001")                         # an older checkpoint no load could read: not read
    capsys.readouterr()
    # checkpoints at the end only: the resumed run writes no ckpt_00000004 (.tmp) of its own
    run_train(str(root / "c.py"), str(out), *FOUR_STEPS, "--max_steps=5", "--ckpt_interval=0", "--resume")
    printed = capsys.readouterr().out
    assert f"resumed from {out / 'ckpt_00000002'} at step 2" in printed
    assert "metrics.jsonl: dropped 3 line(s), of the steps after 2 (they run again) or cut short" in printed
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4, 5]
    assert sorted(os.listdir(out)) == ["ckpt_00000001", "ckpt_00000002", "ckpt_00000005", "metrics.jsonl"]   # no .tmp


def test_export_writes_a_model_that_from_pretrained_reads_back(tmp_path, config_file):
    out = tmp_path / "e"
    result = run_train(config_file, str(out), "--max_steps=1", "--ckpt_interval=-1", "--export=true")
    loaded = mmi.MMInterleaved.from_pretrained(str(out / "model"))
    ours = result["model"].state_dict()
    theirs = loaded.state_dict()
    assert set(ours) == set(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_metrics_hold_every_log_interval_th_step_and_the_last(tmp_path, config_file):
    run_train(config_file, str(tmp_path / "r"), "--max_steps=5", "--log_interval=2", "--ckpt_interval=-1")
    assert [r["step"] for r in read_metrics(tmp_path / "r")] == [2, 4, 5]


def test_export_dtype_bfloat16_stores_the_trained_weights_cast_to_bf16(tmp_path, config_file):
    out = tmp_path / "e"
    result = run_train(config_file, str(out), "--max_steps=1", "--ckpt_interval=-1", "--export=true",
                       "--export_dtype=bfloat16")
    theirs = mmi.MMInterleaved.from_pretrained(str(out / "model")).state_dict()
    for k, t in result["model"].state_dict().items():
        if t.is_floating_point() and not k.startswith("image_decoder.decoder.vae."):   # the VAE stays float32
            assert theirs[k].dtype == torch.bfloat16 and torch.equal(theirs[k], t.to(torch.bfloat16)), k


def test_accumulating_k_micro_batches_equals_one_of_k_rows(tmp_path, config_file):
    # synthetic rows of equal length and layout, so the mean over each micro-batch's targets averages exactly.
    # The diffusion loss draws its noise and timesteps per micro-batch, so it agrees only in distribution: its
    # weight is 0 here (the image decoder still runs and gets zero gradients in both runs). The gradient norms
    # must agree too: AdamW's update barely changes when the gradients are scaled, so the losses alone would not
    # show micro-batch losses summed instead of averaged
    no_img = "--model.loss_img_weight=0"
    args = ("--max_steps=3", "--log_interval=1", "--ckpt_interval=-1", no_img)
    one = run_train(config_file, str(tmp_path / "one"), "--batch_size=2", "--grad_accum=1", *args)
    acc = run_train(config_file, str(tmp_path / "acc"), "--batch_size=1", "--grad_accum=2", *args)
    for step in (1, 2, 3):
        assert acc["losses"][step] == pytest.approx(one["losses"][step], rel=1e-6, abs=1e-6)
    norms = [[r["grad_norm"] for r in read_metrics(tmp_path / run)] for run in ("one", "acc")]
    assert len(norms[0]) == 3 and norms[1] == pytest.approx(norms[0], rel=1e-6)
    a, b = dict(one["model"].named_parameters()), dict(acc["model"].named_parameters())
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)


def test_gradients_reach_the_update_clipped_to_grad_clip(tmp_path, config_file, monkeypatch):
    """Before the optimizer step the trainable gradients' global norm, recomputed here in float64, is
    min(norm, grad_clip) (to clip_grad_norm_'s 1e-6 guard); grad_clip=0 leaves it as it was. The losses alone
    barely show clipping: AdamW's first steps are nearly invariant to the gradients' scale."""
    real = torch.nn.utils.clip_grad_norm_
    seen = []

    def clip(params, max_norm, *args, **kwargs):
        params = list(params)
        norm = real(params, max_norm, *args, **kwargs)
        after = math.sqrt(sum(float(p.grad.double().square().sum()) for p in params if p.grad is not None))
        seen.append((float(norm), after))
        return norm
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    for grad_clip in (1e-3, 0):
        seen.clear()
        run_train(config_file, str(tmp_path / f"clip{grad_clip}"), "--max_steps=1", "--ckpt_interval=-1",
                  f"--grad_clip={grad_clip}")
        [(norm, after)] = seen
        assert norm > 1e-2 and after == pytest.approx(grad_clip or norm, rel=1e-6)


def test_every_param_group_follows_the_schedule_with_the_runs_betas(tmp_path, config_file, monkeypatch):
    """The optimizer is AdamW with the run's betas and eps, and the warm-up scales every group's lr (the tiny model
    has several): with warmup_steps=2 the multiplier is 0/2 at step 0 and 1/2 at step 1, so after one step every
    group's lr is 0 and no trainable weight has moved, after two every group's lr is half its base lr."""
    made = []

    def make_optimizer(model, tc):
        optimizer, base_lrs = real(model, tc)
        made.append((optimizer, base_lrs, [p.detach().clone() for g in optimizer.param_groups for p in g["params"]]))
        return optimizer, base_lrs
    real = train.make_optimizer
    monkeypatch.setattr(train, "make_optimizer", make_optimizer)
    for steps, multiplier in ((1, 0.0), (2, 0.5)):
        run_train(config_file, str(tmp_path / f"s{steps}"), f"--max_steps={steps}", "--ckpt_interval=-1",
                  "--warmup_steps=2", "--betas=[0.8, 0.9]", "--eps=1e-7")
        optimizer, base_lrs, before = made[-1]
        groups = optimizer.param_groups
        assert len(groups) >= 2 and all((g["betas"], g["eps"]) == ((0.8, 0.9), 1e-7) for g in groups)
        assert [g["lr"] for g in groups] == [multiplier * lr for lr in base_lrs]
        after = [p for g in groups for p in g["params"]]
        assert all(torch.equal(a, b) for a, b in zip(after, before)) == (steps == 1)


def test_prefetcher_keeps_order_raises_errors_and_stops():
    def stream():
        yield from range(5)
        raise ValueError("shard 7: bad row")
    p = train.Prefetcher(stream(), lambda x: 10 * x)
    assert [next(p) for _ in range(5)] == [0, 10, 20, 30, 40]
    with pytest.raises(ValueError, match="shard 7: bad row"):
        next(p)
    p.close()
    made = []
    endless = (made.append(i) or i for i in range(10 ** 9))
    p = train.Prefetcher(endless, lambda x: x, depth=2)
    assert next(p) == 0
    p.close()                                             # a thread blocked on a full queue stops too
    assert not p.thread.is_alive()
    assert len(made) <= 5                                 # it ran at most depth + 2 ahead, not through the stream
    assert endless.gi_frame is None                       # and closed it (a generator's cleanup has run)


def test_late_read_on_a_cpu_hands_back_the_previous_step():
    late = train.LateRead(torch.device("cpu"))
    assert late.send(torch.tensor([1.0, 2.0]), "step 1") is None
    info, numbers, seconds, _ = late.send(torch.tensor([3.0]), "step 2")
    assert (info, numbers) == ("step 1", [1.0, 2.0]) and seconds >= 0
    assert late.read_now()[:2] == ("step 2", [3.0])


@cuda_only
def test_late_read_hands_back_a_step_while_the_next_runs():
    """LateRead's rule on a GPU: sending step k+1's numbers hands back step k's, read by waiting for step k's work
    only, while step k+1's work (queued before the send) still runs; read_now waits for the step just sent."""
    late = train.LateRead(torch.device("cuda"))

    def step(k):
        torch.cuda._sleep(200_000_000)               # the step's GPU work
        return late.send(torch.full((2,), float(k), device="cuda"), k)

    assert step(1) is None
    info, numbers, _, _ = step(2)
    assert (info, numbers) == (1, [1.0, 1.0]) and not torch.cuda.current_stream().query()   # step 2 still runs
    info, numbers, _, _ = late.read_now()
    assert (info, numbers) == (2, [2.0, 2.0]) and torch.cuda.current_stream().query()


def poison_calls(monkeypatch, bad_calls):
    """From now on the model's forward calls numbered in `bad_calls` (1-based) give a NaN loss (and NaN gradients).
    -> the list that gets, at each call, a copy of one LLM weight as that call found it."""
    forward, seen = mmi.MMInterleaved.forward, []

    def poisoned(self, batch, host=None):
        seen.append(self.mm_decoder.layers[0].mlp.up_proj.weight.detach().clone())
        out = forward(self, batch, host)
        if len(seen) in bad_calls:
            out["loss"] = out["loss"] * float("nan")
        return out
    monkeypatch.setattr(mmi.MMInterleaved, "forward", poisoned)
    return seen


def test_nan_guard_skips_logs_and_stops_after_nan_patience(tmp_path, config_file, monkeypatch):
    seen = poison_calls(monkeypatch, range(2, 100))        # from the 2nd call on
    out = str(tmp_path / "nan")
    with pytest.raises(RuntimeError, match="3 non-finite steps in a row"):
        run_train(config_file, out, "--max_steps=10", "--nan_patience=3", "--warmup_steps=0")
    # step 1 fine, steps 2-4 skipped; the host reads step 4's flag once step 5 is queued (skipped too), then stops
    assert len(seen) == 5
    assert not torch.equal(seen[0], seen[1])               # step 1 updated the weights ...
    assert all(torch.equal(seen[1], w) for w in seen[2:])  # ... the NaN steps did not
    assert torch.isfinite(seen[4]).all()
    skipped = [r for r in read_metrics(out) if "skipped" in r]
    assert [r["step"] for r in skipped] == [2, 3, 4] and "3 in a row" in skipped[-1]["skipped"]


def test_a_skipped_step_leaves_no_trace_in_the_optimizer(tmp_path, config_file, monkeypatch):
    """The update is queued before the host reads the NaN flag (the fused AdamW skips itself on the device): one
    NaN step in the middle changes neither weights nor Adam's moments, so the steps after it train on finite
    numbers, exactly as a run in which that step's update never happened."""
    seen = poison_calls(monkeypatch, {2})
    result = run_train(config_file, str(tmp_path / "nan"), "--max_steps=4", "--warmup_steps=0", "--ckpt_interval=-1")
    assert torch.equal(seen[1], seen[2]) and not torch.equal(seen[2], seen[3])   # step 2 skipped, step 3 updated
    assert all(math.isfinite(result["losses"][s]) for s in (1, 3, 4))
    # the moments: had step 2's NaN gradients reached them, every later update would be NaN
    assert all(torch.isfinite(p).all() for p in result["model"].parameters())
    skipped = [r["step"] for r in read_metrics(str(tmp_path / "nan")) if "skipped" in r]
    assert skipped == [2]


def test_nan_patience_counts_non_finite_steps_in_a_row_only(tmp_path, config_file, monkeypatch):
    """Steps 2, 4 and 6 non-finite, each after a finite one: the streak starts again at each, so nan_patience=2
    never stops the run (three non-finite steps in all)."""
    poison_calls(monkeypatch, {2, 4, 6})
    out = str(tmp_path / "nan")
    result = run_train(config_file, out, "--max_steps=7", "--nan_patience=2", "--warmup_steps=0", "--ckpt_interval=-1")
    assert sorted(result["losses"]) == [1, 2, 3, 4, 5, 6, 7]
    skipped = [(r["step"], r["skipped"]) for r in read_metrics(out) if "skipped" in r]
    assert [s for s, _ in skipped] == [2, 4, 6] and all("(1 in a row)" in why for _, why in skipped)


def test_a_resumed_run_keeps_the_checkpoints_nan_streak(tmp_path, config_file, monkeypatch):
    """A checkpoint saved right after a non-finite step keeps the streak: resumed, one more non-finite step makes
    two in a row, and nan_patience=2 stops the run there."""
    out = str(tmp_path / "run")
    poison_calls(monkeypatch, {2, 3})                      # steps 2 and 3: call 3 is the resumed run's first step
    run_train(config_file, out, "--max_steps=2", "--nan_patience=2", "--warmup_steps=0")
    with pytest.raises(RuntimeError, match="step 3: 2 non-finite steps in a row"):
        run_train(config_file, out, "--max_steps=4", "--nan_patience=2", "--warmup_steps=0", "--resume")


def test_frozen_weights_in_bf16_trainable_ones_in_float32(tmp_path, config_file):
    result = run_train(config_file, str(tmp_path / "bf16"), "--dtype=bfloat16", "--frozen_dtype=bfloat16", "--max_steps=1",
                 "--model.llm.trainable=false")
    model = result["model"]
    vae = {id(p) for p in model.image_decoder.decoder.vae.parameters()}
    for name, p in model.named_parameters():
        want = torch.float32 if p.requires_grad or id(p) in vae else torch.bfloat16
        assert p.dtype == want, name
    assert model.mm_decoder.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    assert math.isfinite(result["losses"][1])


@cuda_only
def test_loop_reads_a_step_back_without_waiting_for_next(tmp_path, config_file, monkeypatch):
    """After its first step, train.py's loop makes no synchronizing read of the GPU (forward, backward, clipping, the
    NaN guard, the update): a step's numbers go through LateRead, copied to pinned memory as the step is queued and
    read, once the next step is queued, by waiting on an event after the copy (see the LateRead test)."""
    forward, steps = mmi.MMInterleaved.forward, [0]

    def counted(self, batch, host=None):             # one call a step (grad_accum 1): the step being queued
        steps[0] += 1
        return forward(self, batch, host)

    monkeypatch.setattr(mmi.MMInterleaved, "forward", counted)
    with gpu_reads({train.__file__, mmi.__file__}, note=lambda: steps[0]) as all_reads:
        run_train(config_file, str(tmp_path / "run"), "--device=cuda", "--dtype=bfloat16", "--max_steps=5",
                  "--ckpt_interval=-1", "--log_interval=1")
    assert [(step, f) for step, f in all_reads if step >= 2] == []
    assert [r["step"] for r in read_metrics(str(tmp_path / "run"))] == [1, 2, 3, 4, 5]


def lora_model(seed=0):
    torch.manual_seed(seed)
    return mmi.MMInterleaved(mmi.MMIConfig.from_preset("tiny")).double().eval()


LORA_ROWS = [[BOS, 20, 21, "img", 22, 23, 24, "img", 25, EOS], [BOS, "img", 26, 27, 28, EOS]]


def test_lora_starts_as_the_base_model_exactly():
    """B starts at zero: the wrapped model's logits are the plain model's, bit for bit; only A and B train, on
    the LLM's seven matmuls per layer, and nothing outside the LLM is wrapped (CLIP's q_proj stays)."""
    model = lora_model()
    batch = make_batch(model.cfg, LORA_ROWS, 28)
    with torch.no_grad():
        want = model.text_logits(batch)
        mmi.add_lora(model, rank=4, alpha=8)
        got = model.text_logits(batch)
    assert torch.equal(got, want)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    layers = model.cfg.llm.num_hidden_layers
    assert len(trainable) == 2 * 7 * layers and all(n.endswith((".lora_A", ".lora_B")) for n in trainable)
    q = model.mm_decoder.layers[0].self_attn.q_proj
    assert isinstance(q, mmi.LoRALinear) and q.lora_A.shape == (4, q.in_features) and q.scale == 2.0
    assert not any(isinstance(m, mmi.LoRALinear) for m in model.visual_tokenizer.modules())


def test_lora_merged_model_gives_the_unmerged_outputs():
    """In float64, with A and B random: the LoRA model's logits, then merge_lora's plain nn.Linear layers with
    W + B A * alpha / rank give the same logits to 1e-12, and the state_dict has the plain keys again."""
    model = lora_model()
    keys = set(model.state_dict())
    batch = make_batch(model.cfg, LORA_ROWS, 28)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        base = model.text_logits(batch)
        mmi.add_lora(model, rank=4, alpha=8)
        for m in model.modules():
            if isinstance(m, mmi.LoRALinear):
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g, dtype=torch.float64) * 0.1)
        want = model.text_logits(batch)
        q = model.mm_decoder.layers[0].self_attn.q_proj
        expected_q = q.weight + q.lora_B @ q.lora_A * 2.0
        mmi.merge_lora(model)
        got = model.text_logits(batch)
    assert (want - base).abs().max() > 1e-3                        # the update changes the outputs ...
    assert (got - want).abs().max() <= 1e-12 * want.abs().max()    # ... and the merged weights carry it
    assert set(model.state_dict()) == keys and not any(isinstance(m, mmi.LoRALinear) for m in model.modules())
    assert type(model.mm_decoder.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert torch.equal(model.mm_decoder.layers[0].self_attn.q_proj.weight, expected_q)


def test_lora_run_trains_only_lora_and_exports_plain_model(tmp_path, config_file):
    """--lora_rank=4: every weight but LoRA's is where it started after 3 steps; the export is a plain model
    (no LoRA keys) that from_pretrained loads and that computes the trained model's logits."""
    out = tmp_path / "lora"
    result = run_train(config_file, str(out), "--lora_rank=4", "--lora_alpha=8", "--export=true")
    model = result["model"]                                         # merged by the export
    torch.manual_seed(32)
    init = mmi.MMInterleaved(train.model_config(result["config"]))
    ckpt = dcp_model_state(out / "ckpt_00000003")
    lora = {k for k in ckpt if ".lora_" in k}
    assert lora and all(k.startswith("mm_decoder.layers.") for k in lora)
    for name, p in init.state_dict().items():
        assert torch.equal(ckpt[name], p), name                     # the base weights never moved
    assert any(not torch.equal(ckpt[k], torch.zeros_like(ckpt[k])) for k in lora if k.endswith("lora_B"))
    loaded = mmi.MMInterleaved.from_pretrained(str(out / "model"))
    assert not any("lora" in k for k in loaded.state_dict())
    batch = make_batch(model.cfg, LORA_ROWS, 28)
    with torch.no_grad():
        assert torch.equal(loaded.eval().text_logits(batch), model.eval().text_logits(batch))
    assert not torch.equal(loaded.mm_decoder.layers[0].mlp.up_proj.weight, init.mm_decoder.layers[0].mlp.up_proj.weight)


def dcp_model_state(path):
    """The model's tensors of a train.py checkpoint, read with DCP into plain tensors."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    dcp_to_torch_save(str(path), str(path) + ".pt")
    return torch.load(str(path) + ".pt", weights_only=True)["model"]


@pytest.mark.parametrize("lora", [0, 4])
def test_finetune_resume_gives_the_uninterrupted_losses_exactly(tmp_path, config_file, lora):
    """data=finetune on the llava reader (5 examples, 2 a batch: 3 batches an epoch, the last of 1): a run resumed
    after step 2, mid-epoch, gives steps 3 and 4 of the uninterrupted run bit for bit, into the next epoch, with
    and without LoRA."""
    annt = write_llava(str(tmp_path), LLAVA_RECORDS + [dict(LLAVA_RECORDS[0], id="2", image="blue.jpg")])
    args = ["--data=finetune", "--finetune_dataset=llava", f"--finetune_args={{'annt': {annt!r}, 'batch_size': 2}}",
            "--max_steps=4", "--ckpt_interval=2", "--warmup_steps=1", f"--lora_rank={lora}"]
    full = run_train(config_file, str(tmp_path / "full"), *args)
    interrupted = tmp_path / "interrupted"
    shutil.copytree(tmp_path / "full" / "ckpt_00000002", interrupted / "ckpt_00000002")
    resumed = run_train(config_file, str(interrupted), *args, "--resume", "--ckpt_interval=-1")
    assert sorted(resumed["losses"]) == [3, 4]
    assert [resumed["losses"][s] for s in (3, 4)] == [full["losses"][s] for s in (3, 4)]


def test_init_from_takes_the_runs_trainable_flags_and_loss_weights(tmp_path, config_file):
    """A run from a saved model chooses what trains (--model.unet.trainable=false freezes the UNet it was saved
    with) and its loss weights; a different architecture is still refused."""
    torch.manual_seed(0)
    mmi.MMInterleaved(mmi.MMIConfig.from_preset("tiny")).save_pretrained(str(tmp_path / "m"))
    tc = train.load_config([config_file, f"--init_from={tmp_path / 'm'}", "--model.unet.trainable=false",
                            "--model.loss_img_weight=40"])
    model = train.build_mmi(tc, train.model_config(tc), torch.device("cpu"))
    unet = [p.requires_grad for n, p in model.named_parameters() if n.startswith("image_decoder.decoder.unet.")]
    assert unet and not any(unet) and model.mm_decoder.layers[0].llama_cross_attn.gate.requires_grad
    assert model.cfg.loss_img_weight == 40.0
    tc = train.load_config([config_file, f"--init_from={tmp_path / 'm'}", "--model.llm.num_hidden_layers=3"])
    with pytest.raises(mmi.InputError, match="saved for another model: llm.num_hidden_layers is 4 there, 3 in this run"):
        train.build_mmi(tc, train.model_config(tc), torch.device("cpu"))


def test_init_from_a_bf16_save_trains_float32_weights(tmp_path, config_file):
    """A model saved in bf16 (as the demo's export) trains from float32 weights, as a new one does: AdamW's updates
    are mostly below bf16's resolution. With frozen_dtype bfloat16 the frozen weights stay as saved."""
    torch.manual_seed(0)
    saved = mmi.MMInterleaved(mmi.MMIConfig.from_preset("tiny"))
    saved.save_pretrained(str(tmp_path / "m"), dtype=torch.bfloat16)
    tc = train.load_config([config_file, f"--init_from={tmp_path / 'm'}"])
    model = train.build_mmi(tc, train.model_config(tc), torch.device("cpu"))
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    for name, p in saved.named_parameters():     # the save's values: bf16-rounded, but the VAE's, kept in float32
        kept = p if name.startswith("image_decoder.decoder.vae.") else p.bfloat16().float()
        assert torch.equal(model.get_parameter(name), kept), name
    tc = train.load_config([config_file, f"--init_from={tmp_path / 'm'}", "--frozen_dtype=bfloat16", "--dtype=bfloat16",
                            "--model.unet.trainable=false"])
    model = train.build_mmi(tc, train.model_config(tc), torch.device("cpu"))
    dtypes = {(p.requires_grad, p.dtype) for n, p in model.named_parameters()
              if not n.startswith("image_decoder.decoder.vae.")}
    assert dtypes == {(True, torch.float32), (False, torch.bfloat16)}
    assert model.image_decoder.decoder.unet.conv_in.weight.dtype == torch.bfloat16


def test_sft_vqa_13b_config_groups_what_it_says_trains():
    """configs/sft_vqa_13b.py on the paper-size model (meta): llava fine-tuning data, the UNet frozen, the MMFS
    layers and the visual tokenizer's trainable parts in the table's rows; with LoRA only the "lora_" row."""
    tc = train.load_config([os.path.join(HERE, "configs", "sft_vqa_13b.py")])
    assert (tc.data, tc.finetune_dataset, tc.lora_rank) == ("finetune", "llava", 0)
    assert {"annt", "data_root", "batch_size"} <= set(tc.finetune_args)
    with torch.device("meta"):
        model = mmi.MMInterleaved(train.model_config(tc))
    lr = {n: g["lr"] for g in train.param_groups(model, tc.param_groups) for n in g["names"]}
    assert not any(n.startswith("image_decoder.decoder.unet.") for n in lr) and 2e-4 not in lr.values()
    assert lr["mm_decoder.layers.0.llama_cross_attn.gate"] == 1e-5
    assert lr["mm_decoder.layers.0.llama_cross_attn.attn.sampling_offsets.weight"] == 1e-6
    assert not any(n.startswith("mm_decoder.layers.0.self_attn.") for n in lr)           # the LLM body: frozen
    mmi.add_lora(model, 64, tc.lora_alpha)
    groups = train.param_groups(model, tc.param_groups)
    assert [(g["lr"], g["weight_decay"]) for g in groups] == [(2e-4, 0.0)]
    assert len(groups[0]["names"]) == 2 * 7 * model.cfg.llm.num_hidden_layers


def test_loop_fine_tunes_on_a_storytelling_set(tmp_path, config_file):
    """data="finetune" from a config file: VIST's training stories, every image a target, no text loss; the
    loss is the image loss alone (loss_txt_weight 0 in the batch)."""
    write_vist(str(tmp_path / "vist"), "train")
    cfg = tmp_path / "sft.py"
    cfg.write_text(TINY_CONFIG.replace('data = "synthetic"', 'data = "finetune"') +
                   f'finetune_dataset = "vist"\nfinetune_args = dict(annt_root="{tmp_path / "vist"}", '
                   f'data_root="{tmp_path / "vist"}", batch_size=1)\n')
    out = str(tmp_path / "run")
    result = run_train(str(cfg), out, "--log_interval=1", "--ckpt_interval=-1")
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert r["loss"] == pytest.approx(10.0 * r["loss_img"], rel=1e-5) and math.isfinite(r["loss_txt"])
    assert all(math.isfinite(v) for v in result["losses"].values())


def test_demo_sft_config_fine_tunes_the_demo_model_on_cpu(tmp_path):
    """configs/demo_sft.py, two steps on the CPU: it starts from assets/demo, learns from the answers alone (the
    image decoder gets no gradient, so it is untouched), and exports a model eval.py can load with its tokenizer."""
    out = str(tmp_path / "sft")
    tc = train.load_config([os.path.join(HERE, "configs", "demo_sft.py"), "--max_steps=2",
                            "--finetune_args={'batch_size': 2}", "--device=cpu", "--dtype=float32",
                            "--num_workers=0", "--eval_interval=0", "--ckpt_interval=-1", "--progress=false",
                            f"--out_dir={out}"])
    assert (tc.data, tc.finetune_dataset, train.rows_per_batch(tc)) == ("finetune", "demo_qa", [2])
    result = train.run(tc)
    assert sorted(result["losses"]) == [1, 2] and all(math.isfinite(v) for v in result["losses"].values())
    shipped = mmi.MMInterleaved.from_pretrained(os.path.join(HERE, "assets", "demo"))
    model = result["model"]
    assert torch.equal(shipped.image_decoder.decoder.unet.conv_in.weight, model.image_decoder.decoder.unet.conv_in.weight)
    assert not torch.equal(shipped.text_decoder.head.weight, model.text_decoder.head.weight)
    assert os.path.isfile(os.path.join(out, "model", "tokenizer.model"))
    assert ev.find_tokenizer(None, os.path.join(out, "model")) == os.path.join(out, "model", "tokenizer.model")


# ----------------------------------------------------------------------------------------------------------------
# train.py: MFU: the FLOP count
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("llm_trainable", [True, False])
def test_llm_flops_equal_counted_matmuls_plus_the_attention_term(llm_trainable):
    """The LLM count (6N for trained weights, 4N for frozen ones, MMFS terms) against torch's FlopCounterMode on
    a real forward+backward; SDPA is invisible to the counter on CPU, so the attention term is added by hand."""
    from torch.utils.flop_counter import FlopCounterMode
    from test_mmi import make_batch
    torch.manual_seed(0)
    cfg = mmi.apply_overrides(mmi.MMIConfig.from_preset("tiny"), {"llm.trainable": llm_trainable})
    model = mmi.speed_up(mmi.MMInterleaved(cfg)).train()                 # as train.py runs it
    batch = make_batch(cfg, [[1, 5, 6, "img", 7, 8, "img", 9], [1, "img", 9, 3]], 40)
    B, L = batch["text_ids"].shape
    embeds, vision, xmask, _ = model.prepare_mm_embeds(batch["text_ids"], batch["image_tensors"],
                                                       batch["num_image_per_seq"])
    embeds, vision = embeds.detach().requires_grad_(), vision.detach().requires_grad_()
    with FlopCounterMode(display=False) as counter:
        h = model.mm_decoder(embeds, torch.arange(L).expand(B, L), vision, xmask)
        model.text_decoder(h).sum().backward()
    attention = 12 * cfg.llm.num_hidden_layers * cfg.llm.hidden_size * L * (B * L)     # PaLM: 12 n_layer d L per token
    # MMFS picks query_relpos's rows with one-hot matmuls (forward, and the table's gradient): row selection, not
    # model work, so llm_flops leaves them out
    x = cfg.mmfs
    out = x.n_heads * x.n_points * 2 + x.n_heads * len(x.spatial_shapes) * (x.n_points + 1)
    n_cross = len(range(0, cfg.llm.num_hidden_layers, x.cross_attention_frequency))
    pick = n_cross * 2 * (2 * B * 2 * L * x.max_num_image_per_seq * out)
    assert train.llm_flops(model, B, L, 2) == counter.get_total_flops() + attention - pick


def test_train_flops_follow_the_config_to_the_flop_counter():
    """train_flops of a micro-batch against torch's FlopCounterMode on the whole forward+backward of a tiny model
    whose LLM (depth, width, frozen), MMFS (layers, heads, points, maps read, table rows), image tokens and CLIP
    (frozen) are not the preset's, after mmi.speed_up as train.py runs it, with two documents in a row. Counted by
    both: every matmul and convolution, forward and backward, and the attention products (the counter sees SDPA on
    a CPU only in its math form, chosen here). train_flops leaves out MMFS's one-hot picks of its table's rows
    (speed_up's form; the LLM's mask is per query, the UNet's per image): they are taken off the counter's total.
    The counter counts a grouped convolution's weight gradient as a dense one's, so the adapter's depth-wise
    convolutions are frozen here. What is left agrees exactly: tolerance 0."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    torch.manual_seed(0)
    cfg = mmi.apply_overrides(mmi.MMIConfig.from_preset("tiny"), {
        "llm.num_hidden_layers": 5, "llm.intermediate_size": 96, "llm.trainable": False, "vision.trainable": False,
        "mmfs.cross_attention_frequency": 3, "mmfs.n_heads": 2, "mmfs.n_points": 3, "mmfs.spatial_shapes": (32, 8),
        "mmfs.max_num_image_per_seq": 7, "num_img_token": 6, "resampler.num_queries": 6})
    model = mmi.speed_up(mmi.MMInterleaved(cfg)).train()
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d) and m.groups > 1:
            m.requires_grad_(False)
    batch = make_batch(cfg, [[BOS, 5, 6, "img", 7, EOS, BOS, 8, "img", 9], [BOS, "img", 9, 3]], 48)
    batch["nearest_bos_idxs"] = torch.from_numpy(np.concatenate([data.nearest_bos_idxs(r.numpy(), BOS, SOI)
                                                                 for r in batch["text_ids"]]))
    batch["image_tensors_dec"] = torch.rand(3, 3, 64, 64)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(batch)["loss"].backward()
    (B, L), N = batch["text_ids"].shape, 2

    def picks(mmfs, rows):                           # one-hot rows x the table: the forward and the table's gradient
        return 2 * 2 * rows * mmfs.max_num_image_per_seq * (mmfs.sampling_offsets.out_features
                                                            + mmfs.attention_weights.out_features)
    llm = [layer.llama_cross_attn.attn for layer in model.mm_decoder.layers if layer.llama_cross_attn is not None]
    unet = model.image_decoder.decoder.mmfs_module
    assert len(llm) == 2 and llm[0].n_levels == 2
    left_out = sum(picks(m, B * N * L) for m in llm) + sum(picks(b.mmfs, 3) for b in [*unet.mmfs_down_blocks,
                                                                                       unet.mmfs_mid_block])
    assert train.train_flops(model, batch) == counter.get_total_flops() - left_out


# ----------------------------------------------------------------------------------------------------------------
# train.py: FSDP: two CPU processes (gloo) against one
# ----------------------------------------------------------------------------------------------------------------


def test_fsdp_keeps_frozen_weights_whole_unless_shard_frozen(config_file):
    """shard_model on a one-process gloo group: trainable weights become FSDP shards (DTensors) and frozen ones stay
    plain tensors, so a block with nothing trainable is no FSDP unit; shard_frozen=True shards frozen weights too,
    except the VAE's. The mesh is the run's device's, whatever GPU is visible."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor
    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    try:
        for shard_frozen in (False, True):
            tc = train.load_config([config_file, "--model.llm.trainable=false", "--model.vision.trainable=false",
                                    f"--shard_frozen={shard_frozen}"])
            model = mmi.MMInterleaved(train.model_config(tc))
            model = train.shard_model(model, train.fsdp_blocks(model), tc, torch.device("cpu"))
            vae = {id(p) for p in model.image_decoder.decoder.vae.parameters()}
            for name, p in model.named_parameters():
                sharded = p.requires_grad or (shard_frozen and id(p) not in vae)
                assert isinstance(p, DTensor) == sharded, name
                if sharded:
                    assert p.device_mesh.device_type == "cpu", name
            clip_layer = model.visual_tokenizer.encoder["vision_model"].encoder.layers[0]
            assert not any(p.requires_grad for p in clip_layer.parameters())
            assert isinstance(clip_layer, FSDPModule) == shard_frozen
            assert isinstance(model.visual_tokenizer.perceiver_resampler, FSDPModule)
    finally:
        torch.distributed.destroy_process_group()
        # DTensor's per-thread cache would keep the destroyed group alive in this thread's state: a DataLoader worker
        # forked later from another thread frees it, and the group's destructor hangs there
        from torch.distributed.tensor.debug import _clear_sharding_prop_cache
        _clear_sharding_prop_cache()


def test_fsdp_on_two_cpu_processes_matches_one_process(tmp_path, config_file):
    """torchrun, 2 ranks x 1 row with FSDP2 (fully_shard per block, frozen LLM body, activation checkpointing)
    gives the losses of one process with 2 rows; its sharded checkpoints (a state file per rank) resume exactly."""
    # each rank draws its own diffusion noise, so the comparison is on the text loss (image loss weight 0). Steps 1
    # and 2 are inside the warm-up (2 steps), whose learning rates do not depend on max_steps
    common = ["--device=cpu", "--model.llm.trainable=false", "--model.loss_img_weight=0"]
    single = run_train(config_file, str(tmp_path / "single"), "--batch_size=2", "--max_steps=2", "--ckpt_interval=-1",
                       *common)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=HERE)

    def torchrun(out, *args):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               os.path.join(HERE, "train.py"), config_file, f"--out_dir={out}", "--batch_size=1", "--max_steps=4",
               "--ckpt_interval=2", "--activation_checkpointing=true", "--log_interval=1", *common, *args]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return {r["step"]: r["loss"] for r in read_metrics(out)}

    out = tmp_path / "fsdp"
    losses = torchrun(out)
    assert losses[1] == pytest.approx(single["losses"][1], rel=1e-5)
    assert losses[2] == pytest.approx(single["losses"][2], rel=1e-5)
    files = set(os.listdir(out / "ckpt_00000002"))
    assert {"rank0.pt", "rank1.pt", ".metadata", "config.json"} <= files
    assert sum(f.endswith(".distcp") for f in files) == 2
    # interrupted after step 2: the sharded trainable weights, AdamW's moments, the frozen weights (whole on each
    # rank), the data position and both ranks' RNG states come back; steps 3 and 4 are the uninterrupted run's, bit
    # for bit (step 4's loss is the first that step 3's update from the restored moments reaches)
    resumed = tmp_path / "resumed"
    shutil.copytree(out / "ckpt_00000002", resumed / "ckpt_00000002")
    assert torchrun(resumed, "--resume=true") == {3: losses[3], 4: losses[4]}


def test_fsdp_lora_export_equals_the_one_process_export(tmp_path, config_file):
    """LoRA under FSDP on two CPU processes, 1 row each, exports (LoRA gathered and merged on rank 0) the model that
    one process with 2 rows exports: same text losses, same merged weights, no LoRA keys."""
    common = ["--device=cpu", "--model.loss_img_weight=0", "--lora_rank=4", "--max_steps=2", "--export=true",
              "--ckpt_interval=-1"]
    run_train(config_file, str(tmp_path / "single"), "--batch_size=2", *common)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=HERE)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(HERE, "train.py"), config_file, f"--out_dir={tmp_path / 'fsdp'}", "--batch_size=1", *common]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    one, two = (mmi.MMInterleaved.from_pretrained(str(tmp_path / run / "model")).state_dict()
                for run in ("single", "fsdp"))
    assert set(one) == set(two) and not any("lora" in k for k in one)
    tc = train.load_config([config_file])
    torch.manual_seed(tc.seed)                                   # the runs' initial weights
    base = mmi.MMInterleaved(train.model_config(tc)).state_dict()
    changed = {k for k in one if not torch.equal(one[k], base[k])}
    assert "mm_decoder.layers.0.self_attn.q_proj.weight" in changed      # the merged LoRA update
    assert all(k.startswith("mm_decoder.layers.") and k.endswith("_proj.weight") for k in changed), changed
    for k in one:
        assert torch.allclose(one[k], two[k], rtol=1e-4, atol=1e-6), k


# ----------------------------------------------------------------------------------------------------------------
# train.py: the demo's VAE (task="vae") and handing it to the demo model
# ----------------------------------------------------------------------------------------------------------------


def test_vae_task_exports_a_vae_the_demo_loads_frozen(tmp_path, config_file):
    vae_dir = tmp_path / "vae"
    common = ["--data=demo", "--seq_len=40", "--batch_size=1", "--eval_batches=1"]
    result = run_train(config_file, str(vae_dir), "--task=vae", "--max_steps=6", "--warmup_steps=0",
                 "--param_groups=(('', 3e-3, 0.0),)", "--export=true", "--log_interval=1", *common)
    rows = read_metrics(str(vae_dir))
    assert {"loss", "loss_rec", "loss_kl"} <= set(rows[0])
    assert rows[-1]["loss_rec"] < rows[0]["loss_rec"]                 # it learns to reconstruct
    path = str(vae_dir / "vae.safetensors")
    scale = train.read_vae_scaling_factor(path)
    assert 0 < scale < float("inf")
    # the demo model: same VAE weights, frozen, and the latent scale measured on this VAE
    tc = train.load_config([config_file, f"--vae_from={path}"])
    assert train.model_config(tc).vae.scaling_factor == scale
    model = run_train(config_file, str(tmp_path / "mmi"), f"--vae_from={path}", "--max_steps=1", "--export=true",
                      "--ckpt_interval=-1", *common)["model"]
    # the exported demo model folder is self-contained: sample.py / eval.py find its tokenizer there
    exported = tmp_path / "mmi" / "model"
    assert (exported / "tokenizer.model").read_bytes() == open(data.DEMO_TOKENIZER_PATH, "rb").read()
    vae = model.image_decoder.decoder.vae
    trained = result["model"].vae.state_dict()
    assert all(torch.equal(v, trained[k]) for k, v in vae.state_dict().items())
    assert not any(p.requires_grad for p in vae.parameters())
    with pytest.raises(ValueError, match="does not fit the model's VAE"):
        train.main([config_file, f"--vae_from={path}", "--model.vae.block_out_channels=(16, 16, 32, 64)",
                    f"--out_dir={tmp_path / 'bad'}"])


def test_demo_configs_parse():
    demo = train.load_config([os.path.join(HERE, "configs", "demo.py"), "--vae_from="])
    cfg = train.model_config(demo)
    assert (demo.data, cfg.num_img_token, cfg.resampler.num_queries, cfg.llm.vocab_size) == ("demo", 16, 16, 386)
    vae = train.load_config([os.path.join(HERE, "configs", "demo_vae.py")])
    assert (vae.task, vae.data) == ("vae", "demo")


def test_rows_per_step_are_the_ones_the_data_makes():
    """train.py's header counts the rows a micro-batch really has: a fine-tuning set's finetune_args batch_size
    (else its reader's default), each pretraining source's own, batch_size for the demo and synthetic rows."""
    config = lambda name, *flags: train.load_config([os.path.join(HERE, "configs", name), *flags])
    assert train.rows_per_batch(config("demo_sft.py")) == [16]                  # batch_size 2 is not used there
    assert train.rows_per_batch(dataclasses.replace(config("demo_sft.py"), finetune_dataset="llava",
                                                    finetune_args={})) == [4]  # data.llava_dataset's default
    assert train.rows_per_batch(config("pretrain_13b.py")) == [2, 4]           # the pair sources' 2, mmc4's 4
    assert train.rows_per_batch(config("demo.py", "--vae_from=", "--batch_size=5")) == [5]

# ----------------------------------------------------------------------------------------------------------------
# train.py: the command line: usage, --help, user mistakes as one line, where outputs go; CPU runs, workers
# that end with the run, exact resume on the demo data
# ----------------------------------------------------------------------------------------------------------------


# demo rows the tiny preset takes: 7 stories in rows of 64 tokens, one row per micro-batch
DEMO_ROWS = ["--data=demo", "--seq_len=64", "--batch_size=1", "--demo_num_stories=7"]


def test_train_help_gives_every_key_its_default_and_meaning(capsys):
    assert mmi.run_script(train.main, ["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python train.py CONFIG.py") and "python train.py configs/demo.py" in out
    assert "--model.<key>=value" in out and "--model.llm.num_hidden_layers=2" in out
    for f in dataclasses.fields(train.TrainConfig):
        assert re.search(rf"^  {f.name} = ", out, re.M), f.name
    flat = " ".join(out.split())
    assert "max_steps = 15000 optimizer steps" in flat and "model_overrides = {} dotted MMIConfig keys" in flat
    # a meaning that runs over two comment lines in the class
    assert ('init_device = "cpu" where a new model\'s random weights are drawn: "cpu" gives the same weights on '
            'every machine; "cuda" is minutes faster at 13B') in flat
    assert mmi.run_script(train.main, ["-h"]) == 0 and capsys.readouterr().out == out


def test_train_without_arguments_prints_the_usage_and_exits_2(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert mmi.run_script(train.main, []) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("usage: python train.py CONFIG.py") and "configs/demo.py" in captured.err
    assert captured.out == "" and os.listdir(tmp_path) == []                   # nothing started, nothing written


@pytest.mark.parametrize("text, args, message", [
    (None, ["nope.py"], "nope.py: cannot read the config file (No such file or directory)"),
    ("max_steps = 3 +\n", [], "c.py:1: not valid Python"),
    ("import math\nmax_steps = math.nope\n", [], "c.py:2: AttributeError: module 'math' has no attribute 'nope'"),
    (TINY_CONFIG + "max_stpes = 3\n", [], "c.py: unknown key 'max_stpes'; did you mean max_steps?"),
    (TINY_CONFIG, ["--max_step=3"], "unknown key 'max_step'; did you mean --max_steps?"),
    (TINY_CONFIG, ["--model.llm.hiden_size=8"], "did you mean --model.llm.hidden_size?"),
    (TINY_CONFIG, ["--max_steps=many"], "config key 'max_steps': cannot read 'many' as int"),
    (TINY_CONFIG, ["--max_steps"], "--max_steps: expected --max_steps=<int>"),
    (TINY_CONFIG, ["--data=imagenet"], "data 'imagenet', expected one of 'demo', 'synthetic', 'pretrain'"),
    (TINY_CONFIG, ["--frozen_dtype=bfloat16"], "frozen_dtype 'bfloat16' needs dtype 'bfloat16'"),
    (TINY_CONFIG, ["--max_steps=3", "more.py"], "'more.py': expected --key=value (a config file comes first)"),
    (TINY_CONFIG, ["--init_from=nowhere"], "init_from nowhere: no such folder"),
    (TINY_CONFIG, ["--vae_from=none.safetensors"], "vae_from none.safetensors: no such file"),
    (TINY_CONFIG, ["--data=demo", "--tokenizer_path=no.model"], "tokenizer_path no.model: no such file"),
    (TINY_CONFIG, ["--data=demo", "--tokenizer_path=c.py"], "c.py: cannot be read as a SentencePiece tokenizer.model"),
    (None, [os.path.join(HERE, "configs", "pretrain_13b.py"), f"--tokenizer_path={data.DEMO_TOKENIZER_PATH}",
            "--init_from="], "pretrain_sources: blip2's annt_root /path/to/blip2/annotations: no such folder"),
    (TINY_CONFIG, ["--device=cuda:99"], "--device=cuda:99: "),
    (TINY_CONFIG, ["--log_interval=0"], "log_interval 0, expected 1 or more"),
    (TINY_CONFIG, ["--keep_last=0"], "keep_last 0, expected 1 or more"),
    (TINY_CONFIG, ["--warmup_steps=-10"], "warmup_steps -10, expected 0 or more"),
    (TINY_CONFIG, ["--eval_interval=-1"], "eval_interval -1, expected 0 or more"),
    (TINY_CONFIG, ["--ckpt_interval=-5"], "ckpt_interval -5, expected -1 or more"),
    (TINY_CONFIG, ["--images_per_row=-1"], "images_per_row -1, expected 0 or more"),
    (TINY_CONFIG, ["--grad_clip=-1"], "grad_clip -1.0, expected 0.0 or more"),
    (TINY_CONFIG, ["--seed=-1"], "seed -1, expected an integer in [0, 2**32)"),
    (TINY_CONFIG, [f"--seed={2 ** 70}"], "seed 1180591620717411303424, expected an integer in [0, 2**32)"),
    (TINY_CONFIG, ["--kl_weight=nan"], "kl_weight nan, expected 0.0 or more"),
    (TINY_CONFIG, ["--eps=nan"], "eps nan, expected 0.0 or more"),
    (TINY_CONFIG, ["--eps=inf"], "eps inf, expected 0.0 or more"),
    (TINY_CONFIG, ["--seq_len=8"], "seq_len 8 cannot hold images_per_row=1 images of"),
    (TINY_CONFIG, ["--peak_flops=0"], "peak_flops 0.0, expected the device's peak FLOP/s (more than 0)"),
    (TINY_CONFIG, ["--betas=(0.9, 2.0)"], "betas (0.9, 2.0), expected two numbers 0 <= beta < 1"),
    (TINY_CONFIG + "betas = (0.9,)\n", [], "betas (0.9,), expected two numbers 0 <= beta < 1"),
    (TINY_CONFIG + "param_groups = (('', 'fast', 0.0),)\n", [], "param_groups: row ('', 'fast', 0.0), expected rows"),
    (TINY_CONFIG + "param_groups = (('', float('nan'), 0.0),)\n", [], "param_groups: row ('', nan, 0.0), expected"),
    (TINY_CONFIG, ["--param_groups=('', 1e-3, 0.0)"], "param_groups: row '', expected rows (substring of the"),
    (TINY_CONFIG, ["--param_groups=(('llm', 1e-3, 0.0),)"], "param_groups: no row matches the trainable weight"),
    (TINY_CONFIG + "\0", [], "c.py:?: not valid Python: source code string cannot contain null bytes"),
    (TINY_CONFIG + "model_overrides = {'llm.hidden_size': 'big'}\n", [],
     "c.py: model_overrides: config key 'llm.hidden_size': cannot read 'big' as int"),
], ids=["missing-file", "syntax-error", "file-raises", "file-key", "flag-key", "model-key", "value", "bare-flag",
        "choice", "frozen-bf16", "second-file", "init_from", "vae_from", "tokenizer", "tokenizer-corrupt", "data-root",
        "device", "log_interval", "keep_last", "warmup_steps", "eval_interval", "ckpt_interval", "images_per_row", "grad_clip",
        "seed-negative", "seed-huge", "kl_weight", "eps", "eps-inf", "seq_len", "peak_flops", "betas-range", "betas-length", "param_groups-lr", "param_groups-nan",
        "param_groups-flat", "param_groups-unmatched", "null-byte", "model-override-type"])
def test_train_user_mistake_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys, text, args, message):
    monkeypatch.chdir(tmp_path)
    if text is not None:
        (tmp_path / "c.py").write_text(text)
    argv = (["c.py"] if text is not None else []) + args + ["--out_dir=run"]
    assert mmi.run_script(train.main, argv) == 2
    err = capsys.readouterr().err
    assert message in err and ": error: " in err and err.count("\n") == 1 and "Traceback" not in err
    assert not os.path.exists(tmp_path / "run")                                # it stopped before any work


def test_train_out_dir_is_writable_and_holds_no_earlier_run_unless_resumed(tiny_run, tmp_path, config_file, capsys):
    """An out_dir that is empty, a file, lies under one or cannot be made, or that holds an earlier run's checkpoints
    or metrics while --resume is not given, is one line before any work; with --resume the earlier run goes on."""
    (tmp_path / "file").write_text("")
    for out, message in [("", "out_dir is empty, expected a folder"),
                         (tmp_path / "file", f"out_dir {tmp_path / 'file'}: {tmp_path / 'file'} is a file"),
                         (tmp_path / "file" / "run", "is a file, expected a folder"),
                         ("/proc/mmi_run", "out_dir /proc/mmi_run: cannot write in /proc")]:
        assert mmi.run_script(train.main, [config_file, f"--out_dir={out}"]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1
    out = tmp_path / "run"
    shutil.copytree(tiny_run[0] / "run", out)                                  # a finished run of 4 steps
    argv = [config_file, f"--out_dir={out}", *FOUR_STEPS, "--max_steps=5"]
    assert mmi.run_script(train.main, argv) == 2
    err = capsys.readouterr().err
    assert f"out_dir {out} holds an earlier run's checkpoints; pass --resume to continue it" in err
    assert mmi.run_script(train.main, [*argv, "--ckpt_interval=-1", "--resume"]) == 0
    assert [r["step"] for r in read_metrics(out) if "loss" in r] == [1, 2, 3, 4, 5]
    shutil.rmtree(out / "ckpt_00000002")
    shutil.rmtree(out / "ckpt_00000004")
    for resume in ([], ["--resume"]):        # metrics and no checkpoint: a resume would start over and append
        assert mmi.run_script(train.main, [*argv, *resume]) == 2
        err = capsys.readouterr().err
        assert f"out_dir {out} holds an earlier run's metrics.jsonl and no checkpoint to resume from" in err
        assert err.count("\n") == 1


@pytest.mark.parametrize("args, damage, message", [
    (["--model.llm.num_hidden_layers=1"], None, "saved for another model: model.llm.num_hidden_layers is 4 there, "
                                                "1 in this run; resume with the settings in its config.json"),
    (["--model.llm.intermediate_size=64"], None, "model.llm.intermediate_size is 172 there, 64 in this run"),
    (["--lora_rank=2"], None, "saved for another model: lora_rank is 0 there, 2 in this run"),
    ([], ("rank0.pt", 100), "rank0.pt: unreadable (RuntimeError); the checkpoint is damaged or incomplete: remove"),
    ([], ("__0_0.distcp", None), "__0_0.distcp: missing; the checkpoint is damaged or incomplete"),
    ([], ("__0_0.distcp", 1000), "__0_0.distcp: cut short; the checkpoint is damaged or incomplete"),
    ([], (".metadata", None), ".metadata: missing; the checkpoint is damaged or incomplete"),
    ([], ("config.json", 5), "config.json: unreadable (JSONDecodeError); the checkpoint is damaged"),
], ids=["layers", "shape", "lora", "rank-file-cut", "shard-missing", "shard-cut", "index-missing", "config-cut"])
def test_resume_from_another_models_or_a_damaged_checkpoint_is_one_line(tiny_run, tmp_path, capsys, args, damage,
                                                                        message):
    root, _, _ = tiny_run
    out = tmp_path / "run"
    shutil.copytree(root / "run", out)
    if damage:                                                  # the newest checkpoint, the one a resume reads
        file, size = out / "ckpt_00000004" / damage[0], damage[1]
        if size is None:
            file.unlink()
        else:
            os.truncate(file, size)
    argv = [str(root / "c.py"), f"--out_dir={out}", "--max_steps=5", "--resume", *args]
    assert mmi.run_script(train.main, argv) == 2
    err = capsys.readouterr().err
    assert f"error: {out / 'ckpt_00000004'}" in err and message in err and err.count("\n") == 1


@pytest.mark.parametrize("workers", [0, 1])
def test_train_on_data_that_fills_no_batch_stops_with_one_line(tmp_path, monkeypatch, capsys, workers):
    """data=pretrain whose one pair shard is missing and whose MMC4 shard is a broken zip: the first whole pass
    makes no batch, and the run stops with one line counting what each source skipped, also where a DataLoader
    worker read the pass (its counts are not this process's)."""
    (tmp_path / "docs_0.jsonl.zip").write_bytes(b"not a zip")
    sources = (("laion", "pair", "part_0.txt", str(tmp_path), str(tmp_path), 1.0, 2),
               ("mmc4", "mmc4", "docs_0.jsonl", str(tmp_path), str(tmp_path), 2.0, 2))
    (tmp_path / "c.py").write_text(TINY_CONFIG + f"data = 'pretrain'\npretrain_sources = {sources!r}\n")
    set_epoch = data.MixedDataset.set_epoch

    def bounded(self, epoch):                    # a stream that never fills a batch would read epochs forever
        assert epoch < 3, "no batch in 3 epochs, and still reading"
        set_epoch(self, epoch)

    monkeypatch.setattr(data.MixedDataset, "set_epoch", bounded)
    monkeypatch.setattr(train, "worker_limit", lambda: 1)            # a worker even on a machine of one core
    argv = [str(tmp_path / "c.py"), f"--out_dir={tmp_path / 'run'}", f"--num_workers={workers}"]
    assert mmi.run_script(train.main, argv) == 2
    err = capsys.readouterr().err
    assert "error: pretrain_sources: a whole pass over laion, mmc4 made no batch of rows (" in err
    assert "laion: 0 lines, 0 documents used, 0 rows, skipped shard:shard_missing=1" in err
    assert "mmc4: 0 lines, 0 documents used, 0 rows, skipped shard:shard_unreadable=1" in err
    assert err.count("\n") == 1


def test_train_prints_where_it_wrote_model_ckpt_and_metrics(tmp_path, config_file, capsys):
    out = tmp_path / "run"
    assert mmi.run_script(train.main, [config_file, f"--out_dir={out}", "--max_steps=1", "--export=true"]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}/model (the trained model: python sample.py --init_from={out}/model)" in printed
    assert f"the last checkpoint in {out}/ckpt_00000001" in printed and f"{out}/metrics.jsonl" in printed
    assert os.path.isdir(out / "model") and os.path.isdir(out / "ckpt_00000001")
    assert train.load_config([config_file]).out_dir == "out"                   # under out/ unless told otherwise


def test_demo_recipe_on_a_machine_without_cuda_takes_cpu_sizes(monkeypatch):
    demo = os.path.join(HERE, "configs", "demo.py")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cpu = train.load_config([demo, "--vae_from="])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    gpu = train.load_config([demo, "--vae_from="])
    assert (cpu.batch_size, cpu.dtype, cpu.compile) == (2, "float32", False)
    assert (gpu.batch_size, gpu.dtype, gpu.compile) == (32, "bfloat16", True)
    assert train.load_config([demo, "--vae_from=", "--batch_size=4"]).batch_size == 4   # the command line wins


def test_data_loader_workers_are_capped_by_the_cpu_cores(tmp_path, config_file, monkeypatch, capsys):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert train.worker_limit() == 1                                           # one core stays with the loop
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert train.worker_limit() == 0
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    result = run_train(config_file, str(tmp_path / "run"), *DEMO_ROWS, "--num_workers=6", "--max_steps=1",
                       "--ckpt_interval=-1")
    assert result["config"].num_workers == 1
    assert "num_workers=6 -> 1: this process may use 2 CPU cores" in capsys.readouterr().out


@pytest.mark.parametrize("stop", ["error", "ctrl-c"])
def test_a_run_stopped_midway_leaves_no_data_loader_workers(tmp_path, config_file, monkeypatch, capsys, stop):
    """An exception in step 2 (a bug: its traceback stays) or Ctrl-C (exit 130, one line) ends the prefetch
    thread and both DataLoader workers before main returns."""
    import multiprocessing
    import threading
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)   # two workers anywhere
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    forward, calls = mmi.MMInterleaved.forward, []

    def stopping(self, batch, host=None):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("a bug in step 2") if stop == "error" else KeyboardInterrupt()
        return forward(self, batch, host)

    monkeypatch.setattr(mmi.MMInterleaved, "forward", stopping)
    before = set(multiprocessing.active_children())
    argv = [config_file, f"--out_dir={tmp_path / 'run'}", *DEMO_ROWS, "--num_workers=2", "--max_steps=5"]
    if stop == "error":
        with pytest.raises(RuntimeError, match="a bug in step 2"):
            train.main(argv)
    else:
        assert mmi.run_script(train.main, argv) == 130
        assert "interrupted; " in capsys.readouterr().err
    assert set(multiprocessing.active_children()) <= before
    assert not any(t.name == "prefetch" for t in threading.enumerate())


@pytest.mark.parametrize("where", ["state dict", "dcp.save", "rank file"])
def test_ctrl_c_during_a_checkpoint_save_is_one_line_and_leaves_no_part_of_it(tmp_path, config_file, monkeypatch,
                                                                              capsys, where):
    """Ctrl-C while checkpoint 2 is written (before, inside dcp.save, which wraps it in its own exception, or after):
    exit 130 with the one interrupted line naming checkpoint 1, and out_dir holds no ckpt_00000002.tmp."""
    import torch.distributed.checkpoint as dcp
    write_data, save = dcp.FileSystemWriter.write_data, torch.save

    def interrupt_checkpoint_2(path):
        if "ckpt_00000002.tmp" in str(path):
            raise KeyboardInterrupt
    if where == "state dict":                 # the first thing done after the .tmp folder is made
        import torch.distributed.checkpoint.state_dict as dcp_state_dict
        get_state_dict, calls = dcp_state_dict.get_state_dict, []

        def interrupted_second_call(*args, **kwargs):
            calls.append(1)
            interrupt_checkpoint_2("ckpt_00000002.tmp" if len(calls) == 2 else "")
            return get_state_dict(*args, **kwargs)
        monkeypatch.setattr(dcp_state_dict, "get_state_dict", interrupted_second_call)
    elif where == "dcp.save":
        monkeypatch.setattr(dcp.FileSystemWriter, "write_data", lambda self, plan, planner: (
            interrupt_checkpoint_2(self.path) or write_data(self, plan, planner)))
    else:
        monkeypatch.setattr(torch, "save", lambda obj, f, *args, **kwargs: (
            interrupt_checkpoint_2(f) or save(obj, f, *args, **kwargs)))
    out = tmp_path / "run"
    assert mmi.run_script(train.main, [config_file, f"--out_dir={out}", "--max_steps=3", "--ckpt_interval=1"]) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"interrupted; --resume=true goes on from {out / 'ckpt_00000001'}" in err
    assert os.listdir(out) == ["ckpt_00000001"]          # (no metrics line yet: log_interval is 10)


def test_resumed_demo_stream_keeps_the_order_with_workers(config_file):
    """Two DataLoader workers hand out 7 stories' batches as readers 0, 1, 0, 1, 0, 0 (reader 1 runs out first). A
    stream resumed after the 3rd batch goes on with reader 1's, as the uninterrupted one does, through the end of
    the epoch and into the next; no loader draws from the global RNG (the training loop's noise)."""
    tc = train.load_config([config_file, *DEMO_ROWS, "--num_workers=2"])
    cfg = train.model_config(tc)

    def take(state, n):
        stream = train.train_batches(cfg, tc, 0, 1, state)
        try:
            return [next(stream) for _ in range(n)]
        finally:
            stream.close()

    rng = torch.get_rng_state()
    full = take(None, 9)
    resumed = take(full[2]["meta"]["resume"], 6)
    assert torch.equal(torch.get_rng_state(), rng)
    assert [b["meta"]["position"]["reader"] for b in full[:7]] == [0, 1, 0, 1, 0, 0, 0]
    batch = lambda b: (b["meta"]["position"]["reader"], b["text_ids"].tolist())
    assert [batch(b) for b in resumed] == [batch(b) for b in full[3:]]


def test_demo_resume_gives_the_uninterrupted_losses_exactly(tmp_path, config_file):
    """data=demo, 4 stories (3 batches an epoch): a run resumed after step 2 gives steps 3 and 4 of the
    uninterrupted run bit for bit, into the next epoch (its loader, made after the RNG state was restored, draws
    nothing from it)."""
    args = [*DEMO_ROWS, "--demo_num_stories=4", "--max_steps=4", "--ckpt_interval=2", "--warmup_steps=1"]
    full = run_train(config_file, str(tmp_path / "full"), *args)
    interrupted = tmp_path / "interrupted"
    shutil.copytree(tmp_path / "full" / "ckpt_00000002", interrupted / "ckpt_00000002")
    resumed = run_train(config_file, str(interrupted), *args, "--resume", "--ckpt_interval=-1")
    assert [resumed["losses"][s] for s in (3, 4)] == [full["losses"][s] for s in (3, 4)]


# ----------------------------------------------------------------------------------------------------------------
# sample.py: the interleaved loop on a tiny random model (both initial modes), the page, bad input, atomic output
# ----------------------------------------------------------------------------------------------------------------


def sample_argv(model_dir, out, *extra):
    return [f"--init_from={model_dir}", f"--out={out}", "--steps=2", "--max_new_tokens=4", "--min_new_tokens=0",
            "--device=cpu", *extra]


def _check_sample_run(out, capsys):
    """One finished run in `out`: its page shows result.json's texts and images (64x64 PNGs) in order, each story's
    generated part after its prompt, and the program printed where the page is. -> result.json"""
    runs = os.listdir(out)
    assert len(runs) == 1 and not runs[0].endswith(".tmp")
    run = out / runs[0]
    result = json.loads((run / "result.json").read_text())
    page = (run / "index.html").read_text()
    positions = []
    for story in result["stories"]:
        start = page.index("<div class='generated'>", positions[-1] if positions else 0)
        for item in story["generated"]:
            if item["type"] == "image":
                with Image.open(run / item["file"]) as im:
                    assert im.size == (64, 64)
                positions.append(page.index(f"src='{item['file']}'", start))
            else:
                positions.append(page.index(f"<p>{html.escape(item['text'])}</p>", start))
    assert positions == sorted(positions)                       # the page shows them in the order they were made
    printed = re.findall(r"^wrote (.+)$", capsys.readouterr().out, re.M)
    assert printed and os.path.abspath(printed[-1]) == str(run / "index.html")
    return result


def test_sample_writes_page_images_results_in_both_modes(tmp_path, saved_tiny_model, capsys):
    annt = os.path.join(HERE, "assets", "examples", "annt.json")
    assert sample.main(sample_argv(saved_tiny_model, tmp_path / "out", f"--annt={annt}",
                                   "--force_gen_image_next")) == 0
    result = _check_sample_run(tmp_path / "out", capsys)
    kinds = [[item["type"] for item in s["generated"]] for s in result["stories"]]
    # generate_texts first: text, image, text, image; generate_images first: image, text, image
    assert kinds == [["text", "image", "text", "image"], ["image", "text", "image"]]
    with open(annt) as f:                                       # each story records its prompt as annt.json gave it
        given = [{k: s[k] for k in ("sentences", "images", "sentence_ixs", "image_first", "generate_mode")}
                 for s in json.load(f)]
    assert [{k: v for k, v in s["prompt"].items() if k != "image_files"} for s in result["stories"]] == given


def test_sample_with_no_arguments_runs_the_embedded_demo_model(tmp_path, monkeypatch, capsys):
    """`python sample.py` as shipped: the demo model in assets/demo, the built-in prompts, the demo's settings."""
    monkeypatch.chdir(tmp_path)                                 # the default --out=out lands here
    assert sample.main([]) == 0
    result = _check_sample_run(tmp_path / "out", capsys)
    assert result["init_from"] == "demo" and result["sampler"] == "ddim" and result["steps"] == 25
    images = [item for s in result["stories"] for item in s["generated"] if item["type"] == "image"]
    assert images and all(item["file"].endswith(".png") for item in images)


class ScriptedStoryModel(torch.nn.Module):
    """Stands in for MMInterleaved in sample.run_story: generate_texts returns the scripted token lists in turn,
    generate_images grey images, the k-th of a call at level (k + 1) / 10; both record what they were given."""

    def __init__(self, texts):
        super().__init__()
        self.cfg = mmi.MMIConfig.from_preset("tiny")
        self.texts, self.calls = list(texts), []
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def generate_texts(self, batch, **kw):
        self.calls.append(("text", batch["text_ids"][0].tolist(), kw))
        ids = self.texts.pop(0)
        return {"text_ids": torch.tensor([ids]), "lengths": torch.tensor([len(ids)])}

    def generate_images(self, batch, target_image_idxs, num_images_per_context=1, **kw):
        kw = dict(kw, target_image_idxs=target_image_idxs, num_images_per_context=num_images_per_context)
        self.calls.append(("image", batch["text_ids"][0].tolist(), kw))
        S = self.cfg.vision.image_size
        return {"image": torch.stack([torch.full((3, S, S), (k + 1) / 10) for k in range(num_images_per_context)])}


def scripted_story(tmp_path, model, change, *flags):
    """run_story of one prompt (GOOD with `change`) on `model`, with sample.py's flags -> (results, batch, prompt
    ids, tokenizer)."""
    tok = data.Tokenizer(DEMO_TOK)
    (s,) = sample.load_annt(_write_annt(tmp_path, [dict(GOOD, **change)]))
    args = sample.parse_args(["--device=cpu", *flags])
    batch = sample.prompt_batch(s, tok, model.cfg, args.num_total_token, args.device)
    prompt = batch["text_ids"][0].tolist()
    results = sample.run_story(model, tok, s, batch, 0, args, str(tmp_path))
    return results, batch, prompt, tok


def test_sample_text_options_default_as_the_original_and_apply(tmp_path):
    """The defaults are the original's inference config (nucleus sampling, HF's top-k 50, top-p 0.9, max_length
    90 new tokens, min_length 8 counting a dummy bos, 1 beam), but a minimum of one token and no repetition penalty
    for the demo model, whose sentences can be shorter; its names max_length / min_length are accepted; each option
    (--repetition_penalty and --compile too) reaches generate_texts."""
    tok = data.Tokenizer(DEMO_TOK)
    text = tok.encode("a red circle.", add_bos=False)
    model = ScriptedStoryModel([text])
    scripted_story(tmp_path, model, {"num_iter": 1})
    kw = model.calls[0][2]
    assert {k: kw[k] for k in ("do_sample", "num_beams", "top_k", "top_p", "temperature", "max_new_tokens",
                               "min_new_tokens", "keep_stop_token", "repetition_penalty", "compile")} == \
        dict(do_sample=True, num_beams=1, top_k=50, top_p=0.9, temperature=1.0, max_new_tokens=90, min_new_tokens=1,
             keep_stop_token=False, repetition_penalty=1.0, compile=False)
    assert len(tok.encode("the blue circle disappears.", add_bos=False)) < 7         # a demo sentence under 7
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "tokenizer.json").write_text("{}")      # a model of another vocabulary: the original's 7
    assert sample.parse_args(["--device=cpu", f"--init_from={tmp_path / 'm'}"]).min_new_tokens == 7
    model = ScriptedStoryModel([text])
    scripted_story(tmp_path, model, {"num_iter": 1}, "--no-use_nucleus_sampling", "--num_beams=3", "--top_k=7",
                   "--top_p=0.5", "--temperature=0.7", "--max_length=12", "--min_length=4", "--keep_stop_token",
                   "--repetition_penalty=1.3", "--compile")
    kw = model.calls[0][2]
    assert {k: kw[k] for k in ("do_sample", "num_beams", "top_k", "top_p", "temperature", "max_new_tokens",
                               "min_new_tokens", "keep_stop_token", "repetition_penalty", "compile")} == \
        dict(do_sample=False, num_beams=3, top_k=7, top_p=0.5, temperature=0.7, max_new_tokens=12, min_new_tokens=3,
             keep_stop_token=True, repetition_penalty=1.3, compile=True)
    for flags, message in ((["--num_beams=3"], "--num_beams=3 searches without sampling: add --no-use_nucleus"),
                           (["--min_length=8", "--min_new_tokens=7"], "--min_length and --min_new_tokens"),
                           (["--top_k=-1"], "--top_k=-1: expected >= 0"),
                           (["--min_length=-1"], "--min_length=-1: expected >= 0"),
                           (["--num_validation_images=0"], "--num_validation_images=0: expected >= 1")):
        with pytest.raises(mmi.InputError, match=re.escape(message)):
            sample.parse_args(["--device=cpu", *flags])


def test_sample_flags_and_prompts_accept_the_ends_of_their_ranges(tmp_path):
    """Each range's end is a valid value: --top_p=1 (off), --top_k=0 (off), --num_iter=0, --min_length=0 (min_new_tokens
    0, not -1), --max_new_tokens=0, --steps=1; --num_iter and a prompt's num_iter equal to --num_total_token; --seed 0
    and 2**63 - 1; --steps and --num_beams equal to the model's timesteps and vocabulary size."""
    args = sample.parse_args(["--device=cpu", "--top_p=1", "--top_k=0", "--num_iter=0", "--min_length=0",
                              "--max_new_tokens=0", "--steps=1", "--num_total_token=1"])
    assert (args.top_p, args.top_k, args.num_iter, args.min_new_tokens, args.max_new_tokens, args.steps) == \
        (1.0, 0, 0, 0, 0, 1)
    assert sample.parse_args(["--device=cpu", "--num_iter=5", "--num_total_token=5"]).num_iter == 5
    assert [sample.parse_args(["--device=cpu", f"--seed={seed}"]).seed for seed in (0, 2 ** 63 - 1)] == [0, 2 ** 63 - 1]
    (s,) = sample.load_annt(_write_annt(tmp_path, [dict(GOOD, num_iter=5)]), max_iter=5)
    assert s["num_iter"] == 5
    cfg = mmi.MMIConfig.from_preset("tiny")
    args = sample.parse_args(["--device=cpu", f"--steps={cfg.image_decoder.num_train_timesteps}",
                              f"--num_beams={cfg.llm.vocab_size}", "--no-use_nucleus_sampling"])
    sample.check_model_bounds(args, cfg)                          # raises on a flag beyond its bound


def test_sample_force_replace_gen_text_uses_multiround_context(tmp_path):
    """--force_replace_gen_text: round i's generated text is shown but multiround_context[i] (when not empty) goes
    into the story instead, tokenized without bos; one ending in <|beginofimage|> asks for an image. Without the
    flag the generated texts go in."""
    tok = data.Tokenizer(DEMO_TOK)
    said = [tok.encode(t, add_bos=False) for t in ("a red circle.", "it moves.", "it stays.")]
    given = ["the blue square.<|beginofimage|>", "", ""]
    change = {"num_iter": 3, "multiround_context": given}
    model = ScriptedStoryModel(said)
    results, batch, prompt, _ = scripted_story(tmp_path, model, change, "--force_replace_gen_text")
    image = [tok.image_id] * model.cfg.num_img_token
    replaced = tok.encode(given[0])[1:]
    assert replaced[-1] == tok.soi_id
    assert [r["type"] for r in results] == ["text", "image", "text"]
    assert [r["text"] for r in results if r["type"] == "text"] == [tok.decode(said[0]), tok.decode(said[1])]
    assert model.calls[1][1] == prompt + replaced + image                  # what the image was drawn from
    assert batch["text_ids"][0].tolist() == prompt + replaced + image + said[1]
    model = ScriptedStoryModel(said)
    results, batch, prompt, _ = scripted_story(tmp_path, model, change)
    assert [r["type"] for r in results] == ["text"] * 3
    assert batch["text_ids"][0].tolist() == prompt + said[0] + said[1] + said[2]


def test_sample_auto_end_stops_at_eos_and_ignores_num_iter(tmp_path):
    """--auto_end: the rounds are --num_iter's (the prompt's num_iter is not read) and a text ending in eos ends
    the story, its eos left out of the context; without it the prompt's num_iter rules."""
    tok = data.Tokenizer(DEMO_TOK)
    said = [tok.encode("a red circle.", add_bos=False), tok.encode("the end.", add_bos=False) + [tok.eos_id],
            tok.encode("more.", add_bos=False)]
    model = ScriptedStoryModel(said)
    results, batch, prompt, _ = scripted_story(tmp_path, model, {"num_iter": 1}, "--auto_end", "--num_iter=3")
    assert len(results) == 2 and batch["text_ids"][0].tolist() == prompt + said[0] + said[1][:-1]
    model = ScriptedStoryModel(said)
    results, batch, prompt, _ = scripted_story(tmp_path, model, {"num_iter": 1}, "--num_iter=3")
    assert len(results) == 1 and batch["text_ids"][0].tolist() == prompt + said[0]


def test_sample_draws_num_validation_images_and_keeps_the_first(tmp_path):
    """--num_validation_images=3: one call draws 3 images of the slot, all are saved and listed in order, and the
    first is the one the story continues from."""
    tok = data.Tokenizer(DEMO_TOK)
    model = ScriptedStoryModel([tok.encode("it moves.", add_bos=False)])
    change = {"generate_mode": "generate_images", "num_iter": 2}
    results, batch, _, _ = scripted_story(tmp_path, model, change, "--num_validation_images=3")
    assert [c[0] for c in model.calls] == ["image", "text"] and model.calls[0][2]["num_images_per_context"] == 3
    assert [r.get("file") for r in results[:3]] == ["0_0_0.png", "0_0_1.png", "0_0_2.png"]
    levels = [np.unique(np.asarray(Image.open(tmp_path / f"0_0_{k}.png"))) for k in range(3)]
    assert all(len(v) == 1 for v in levels) and levels[0] < levels[1] < levels[2]       # the 3 in drawing order
    first = data.encoder_image(Image.open(tmp_path / "0_0_0.png"), model.cfg.vision.image_size)
    assert torch.equal(batch["image_tensors"][-1], first)


def test_sample_generate_images_mode_draws_the_prompts_last_image(tmp_path):
    """generate_mode generate_images: the first round draws the image the prompt ends on (its last slot) and puts it
    in that slot; the prompt's earlier images stay as given."""
    tok = data.Tokenizer(DEMO_TOK)
    model = ScriptedStoryModel([tok.encode("it moves.", add_bos=False)])
    change = {"sentences": ["a red circle.", "it moves."], "images": ["a.png", "a.png"], "sentence_ixs": [0, 1],
              "image_first": [False, False], "generate_mode": "generate_images", "num_iter": 2}
    (s,) = sample.load_annt(_write_annt(tmp_path, [dict(GOOD, **change)]))
    given = sample.prompt_batch(s, tok, model.cfg, 2048, "cpu")["image_tensors"].clone()
    results, batch, _, _ = scripted_story(tmp_path, model, change)
    assert [c[0] for c in model.calls] == ["image", "text"] and model.calls[0][2]["target_image_idxs"] == [1]
    drawn = data.encoder_image(Image.open(tmp_path / results[0]["file"]), model.cfg.vision.image_size)
    assert torch.equal(batch["image_tensors"][0], given[0]) and torch.equal(batch["image_tensors"][1], drawn)
    assert not torch.equal(given[1], drawn)


def test_sample_rounds_are_the_prompts_num_iter_else_the_flags(tmp_path):
    """A prompt without num_iter runs --num_iter rounds; one with num_iter runs its own number."""
    tok = data.Tokenizer(DEMO_TOK)
    said = [tok.encode(t, add_bos=False) for t in ("a red circle.", "it moves.", "it stays.")]
    model = ScriptedStoryModel(said)
    results, _, _, _ = scripted_story(tmp_path, model, {}, "--num_iter=3")
    assert [c[0] for c in model.calls] == ["text"] * 3 and len(results) == 3
    model = ScriptedStoryModel(said)
    results, _, _, _ = scripted_story(tmp_path, model, {"num_iter": 2}, "--num_iter=3")
    assert [c[0] for c in model.calls] == ["text"] * 2 and len(results) == 2


def test_sample_text_rounds_sample_with_distinct_seeds_set_by_seed(tmp_path):
    """Each text round of a story samples from its own seed, all set by --seed: a round never reuses another's
    uniforms (the same draws every round would start every text at the same quantile), and --seed changes them."""
    tok = data.Tokenizer(DEMO_TOK)
    said = [tok.encode(t, add_bos=False) for t in ("a red circle.", "it moves.", "it stays.")]
    seeds = {}
    for seed in (5, 5, 6):
        model = ScriptedStoryModel(said)
        scripted_story(tmp_path, model, {"num_iter": 3}, f"--seed={seed}")
        got = [kw["seed"] for kind, _, kw in model.calls]
        assert len(set(got)) == 3 and seeds.setdefault(seed, got) == got
    assert seeds[5] != seeds[6]


def test_sample_force_replace_gen_text_past_the_given_context(tmp_path):
    """--force_replace_gen_text with a multiround_context shorter than the story: the rounds it does not cover put
    their generated text into the story."""
    tok = data.Tokenizer(DEMO_TOK)
    said = [tok.encode(t, add_bos=False) for t in ("a red circle.", "it moves.", "it stays.")]
    given = ["the blue square."]
    model = ScriptedStoryModel(said)
    results, batch, prompt, _ = scripted_story(tmp_path, model, {"num_iter": 3, "multiround_context": given},
                                               "--force_replace_gen_text")
    assert [r["type"] for r in results] == ["text"] * 3
    assert batch["text_ids"][0].tolist() == prompt + tok.encode(given[0])[1:] + said[1] + said[2]


def test_sample_without_auto_end_a_text_ending_in_eos_goes_on_without_it(tmp_path):
    """Without --auto_end a text ending in eos does not end the story: the next round continues from the text
    without its eos (as with --auto_end, eos never goes into the context)."""
    tok = data.Tokenizer(DEMO_TOK)
    said = [tok.encode("the end.", add_bos=False) + [tok.eos_id], tok.encode("more.", add_bos=False)]
    model = ScriptedStoryModel(said)
    results, batch, prompt, _ = scripted_story(tmp_path, model, {"num_iter": 2})
    assert [r["type"] for r in results] == ["text", "text"]
    assert model.calls[1][1] == prompt + said[0][:-1]
    assert batch["text_ids"][0].tolist() == prompt + said[0][:-1] + said[1]


def test_sample_force_gen_image_next_draws_one_image_after_every_text(tmp_path):
    """--force_gen_image_next: a text the model ended with <|beginofimage|> gets its image (one soi, not two); a text
    that asked for none, an empty one (eos alone) included, gets one too."""
    tok = data.Tokenizer(DEMO_TOK)
    asked = tok.encode("a red circle.", add_bos=False) + [tok.soi_id]
    model = ScriptedStoryModel([asked, [tok.eos_id]])
    results, batch, prompt, _ = scripted_story(tmp_path, model, {"num_iter": 4}, "--force_gen_image_next")
    image = [tok.image_id] * model.cfg.num_img_token
    assert [c[0] for c in model.calls] == ["text", "image", "text", "image"]
    assert [r["type"] for r in results] == ["text", "image", "text", "image"]
    assert batch["text_ids"][0].tolist() == prompt + asked + image + [tok.soi_id] + image
    assert batch["num_image_per_seq"].tolist() == [3] and batch["image_tensors"].shape[0] == 3


def test_sample_auto_end_still_draws_the_images_a_text_asks_for(tmp_path):
    """--auto_end ends a story at a text ending in eos, not at one ending in <|beginofimage|>: that one gets its
    image, and the story goes on."""
    tok = data.Tokenizer(DEMO_TOK)
    said = [tok.encode("a red circle.", add_bos=False) + [tok.soi_id],
            tok.encode("the end.", add_bos=False) + [tok.eos_id], tok.encode("more.", add_bos=False)]
    model = ScriptedStoryModel(said)
    results, _, _, _ = scripted_story(tmp_path, model, {}, "--auto_end", "--num_iter=5")
    assert [c[0] for c in model.calls] == ["text", "image", "text"]
    assert [r["type"] for r in results] == ["text", "image", "text"]


def test_sample_image_options_reach_generate_images(tmp_path):
    """--steps, --guidance_scale, --sampler and --seed are what an image round draws with; without them a model of
    the demo's vocabulary draws with the settings eval.py scores it with."""
    change = {"generate_mode": "generate_images", "num_iter": 1}
    model = ScriptedStoryModel([])
    scripted_story(tmp_path, model, change, "--steps=7", "--guidance_scale=2.5", "--sampler=dpm++2m", "--seed=9")
    kw = model.calls[0][2]
    assert {k: kw[k] for k in ("steps", "guidance_scale", "sampler", "seed")} == \
        dict(steps=7, guidance_scale=2.5, sampler="dpm++2m", seed=9)
    model = ScriptedStoryModel([])
    scripted_story(tmp_path, model, change)
    kw = model.calls[0][2]
    assert {k: kw[k] for k in ("steps", "guidance_scale", "sampler")} == \
        {k: ev.DEMO_IMAGES[k] for k in ("steps", "guidance_scale", "sampler")}


def _write_annt(tmp_path, samples):
    Image.fromarray(data.render_scene(data.make_story(5).scenes[0])).save(tmp_path / "a.png")
    (tmp_path / "not_an_image.png").write_text("hello")
    path = tmp_path / "annt.json"
    path.write_text(json.dumps(samples))
    return str(path)


GOOD = {"sentences": ["a red circle at the centre."], "images": ["a.png"], "sentence_ixs": [0],
        "image_first": [False]}


@pytest.mark.parametrize("change, message", [
    ({"images": ["missing.png"]}, r"sample 1: field 'images'\[0\]: 'missing.png' does not exist"),
    ({"images": ["not_an_image.png"]}, r"sample 1: field 'images'\[0\]: 'not_an_image.png' is not an image"),
    ({"sentence_ixs": [0, 0]}, "sample 1: field 'sentence_ixs' has 2 entries, 'images' has 1"),
    ({"image_first": []}, "sample 1: field 'image_first' has 0 entries, 'images' has 1"),
    ({"sentence_ixs": [3]}, r"sample 1: field 'sentence_ixs'\[0\] = 3 is not a sentence index \(0..0\)"),
    ({"sentence_ixs": [1]}, r"sample 1: field 'sentence_ixs'\[0\] = 1 is not a sentence index \(0..0\)"),
    ({"multiround_context": "it moves."}, "sample 1: field 'multiround_context' must be a list of strings"),
    ({"multiround_context": ["it moves.", 3]}, "sample 1: field 'multiround_context' must be a list of strings"),
    ({"generate_mode": "generate_video"}, "sample 1: field 'generate_mode' is 'generate_video'"),
    ({"images": [], "sentence_ixs": [], "image_first": []}, "sample 1: field 'images' is empty"),
    ({"sentences": None}, "sample 1: field 'sentences' must be list"),
    ({"num_iter": 10 ** 30}, f"sample 1: field 'num_iter' is {10 ** 30}, expected at most 2048 \\(no more rounds"),
    ({"images": [5]}, r"sample 1: field 'images'\[0\] is 5, expected an image file's path \(a string\)"),
])
def test_sample_rejects_bad_prompts_before_any_model_work(tmp_path, change, message, capsys):
    annt = _write_annt(tmp_path, [GOOD, dict(GOOD, **change)])
    code = mmi.run_script(sample.main, [f"--annt={annt}", "--init_from=/nonexistent", f"--out={tmp_path / 'out'}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and re.search(message, err), err
    assert not os.path.exists(tmp_path / "out")


def test_sample_rejects_missing_or_malformed_files_and_models(tmp_path, capsys):
    assert mmi.run_script(sample.main, [f"--annt={tmp_path / 'none.json'}"]) == 2
    assert "none.json: no such file" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("[{")
    assert mmi.run_script(sample.main, [f"--annt={tmp_path / 'bad.json'}"]) == 2
    assert "bad.json: not valid JSON" in capsys.readouterr().err
    annt = _write_annt(tmp_path, [GOOD])
    assert mmi.run_script(sample.main, [f"--annt={annt}", f"--init_from={tmp_path}"]) == 2
    assert "is not a model folder (no config.json)" in capsys.readouterr().err


def test_sample_finds_images_beside_the_annt_file_or_in_the_cwd(tmp_path, monkeypatch, capsys):
    """A relative image path is looked for beside annt.json, then in the working directory (the original's
    ./assets/... paths); a missing one names both places in its one-line error."""
    (tmp_path / "prompts").mkdir()
    annt = _write_annt(tmp_path / "prompts", [GOOD])                     # a.png beside the file
    Image.open(tmp_path / "prompts" / "a.png").save(tmp_path / "b.png")  # b.png only in the working directory
    monkeypatch.chdir(tmp_path)
    samples = [dict(GOOD, images=["a.png"]), dict(GOOD, images=["./b.png"])]
    (tmp_path / "prompts" / "annt.json").write_text(json.dumps(samples))
    assert [s["paths"] for s in sample.load_annt(annt)] == [[str(tmp_path / "prompts" / "a.png")],
                                                           [str(tmp_path / "b.png")]]
    (tmp_path / "prompts" / "annt.json").write_text(json.dumps(samples + [dict(GOOD, images=["c.png"])]))
    code = mmi.run_script(sample.main, [f"--annt={annt}", "--init_from=/nonexistent", f"--out={tmp_path / 'out'}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert (f"sample 2: field 'images'[0]: 'c.png' does not exist (tried {tmp_path / 'prompts' / 'c.png'} and "
            f"{tmp_path / 'c.png'})") in err, err


def test_an_interrupted_sample_run_keeps_only_its_finished_stories(tmp_path, saved_tiny_model, monkeypatch, capsys):
    """Ctrl-C in the first story leaves nothing; in the second, the first keeps its page in <run>-incomplete."""
    story = dict(GOOD, generate_mode="generate_images", num_iter=1)
    annt = _write_annt(tmp_path, [story, dict(story, sentences=["a blue square at the top left."])])
    draw = mmi.MMInterleaved.generate_images
    for calls_before_the_interrupt, kept in ((0, 0), (1, 1)):
        calls = []

        def interrupted(*args, **kwargs):
            calls.append(1)
            if len(calls) > calls_before_the_interrupt:
                raise KeyboardInterrupt
            return draw(*args, **kwargs)

        monkeypatch.setattr(mmi.MMInterleaved, "generate_images", interrupted)
        out = tmp_path / f"out{kept}"
        code = mmi.run_script(sample.main, sample_argv(saved_tiny_model, out, f"--annt={annt}"))
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert code == 130
        if not kept:
            assert os.listdir(out) == [] and err.endswith(": interrupted"), err
            continue
        [run] = os.listdir(out)
        assert run.endswith("-incomplete") and sorted(os.listdir(out / run)) == ["0_0.png", "index.html", "inputs",
                                                                                    "result.json"]
        assert err.endswith(f": interrupted after 1 of 2 stories; their page is {out / run / 'index.html'}"), err
        assert os.listdir(out / run / "inputs") == ["0_0.png"]           # nothing of the unfinished story
        result = json.loads((out / run / "result.json").read_text())
        assert [s["prompt"]["sentences"] for s in result["stories"]] == [story["sentences"]]
        assert "src='0_0.png'" in (out / run / "index.html").read_text()


def test_an_unexpected_error_in_a_sample_run_leaves_no_temporary_folder(tmp_path, saved_tiny_model, monkeypatch):
    """An error that is not the user's (here the sampler raising) propagates, and the run's temporary folder goes
    with it: --out is left as it was."""
    def broken(*args, **kwargs):
        raise RuntimeError("sampler failed")
    monkeypatch.setattr(mmi.MMInterleaved, "generate_images", broken)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="sampler failed"):
        sample.main(sample_argv(saved_tiny_model, out, f"--annt={_one_image_annt(tmp_path)}"))
    assert os.listdir(out) == []


def test_remove_story_files_in_a_folder_named_like_a_glob_pattern(tmp_path):
    """An interrupted story's images go, also in an --out whose name glob would read as a pattern; other stories'
    images stay (story 10's too)."""
    folder = tmp_path / "out[1]" / "run.tmp"
    (folder / "inputs").mkdir(parents=True)
    for name in ("1_0.png", "1_2_0.png", "10_0.png", "0_1.png", "inputs/1_0.png", "inputs/0_0.png"):
        (folder / name).write_bytes(b"png")
    sample.remove_story_files(str(folder), 1)
    assert sorted(os.listdir(folder)) == ["0_1.png", "10_0.png", "inputs"]
    assert os.listdir(folder / "inputs") == ["0_0.png"]


def test_sample_prints_generated_control_characters_as_escapes(tmp_path, saved_tiny_model, monkeypatch, capsys):
    """An escape sequence a model writes is shown, not obeyed by the terminal (a newline stays one); result.json keeps
    the text as made."""
    annt = _write_annt(tmp_path, [dict(GOOD, num_iter=1)])
    made = "red\x1b[2J\x07 circle\u202e."
    monkeypatch.setattr(data.Tokenizer, "decode", lambda self, ids, skip_special=True: made)
    assert mmi.run_script(sample.main, sample_argv(saved_tiny_model, tmp_path / "out", f"--annt={annt}")) == 0
    out = capsys.readouterr().out
    assert "[0] red\\x1b[2J\\x07 circle\\u202e.\n" in out and "\x1b" not in out
    assert sample.terminal_safe("one\ntwo\r\t.") == "one\ntwo\\r\\t."          # newlines stay, other controls do not
    [run] = os.listdir(tmp_path / "out")
    assert json.loads((tmp_path / "out" / run / "result.json").read_text())["stories"][0]["generated"] == [
        {"type": "text", "text": made}]


def test_sample_help_explains_every_option(capsys):
    with pytest.raises(SystemExit) as e:
        sample.main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and out.startswith("usage: ")
    lines = out.splitlines() + [""]
    options = {}
    for i, line in enumerate(lines):
        m = re.match(r"  (--\w+)( [A-Z_]+| \{[^}]*\})?", line)
        if m:                                       # its meaning on the same line, or indented on the next
            options[m[1]] = line[m.end():].strip() or (lines[i + 1].strip() if lines[i + 1].startswith(" " * 8)
                                                        else "")
    assert {"--annt", "--init_from", "--llm", "--clip", "--sd", "--mmi", "--device", "--out"} <= set(options)
    assert all(options.values()), [k for k, v in options.items() if not v]


def test_sample_bad_model_folder_device_or_flag_is_one_line(tmp_path, capsys):
    annt = _write_annt(tmp_path, [GOOD])
    (tmp_path / "empty").mkdir()
    (tmp_path / "run" / "model").mkdir(parents=True)                   # a training run's out_dir
    (tmp_path / "run" / "model" / "config.json").write_text("{}")
    (tmp_path / "unknown_key").mkdir()
    (tmp_path / "unknown_key" / "config.json").write_text(json.dumps({"bogus": 1}))
    (tmp_path / "garbage.model").write_bytes(b"garbage")
    (tmp_path / "tokenizer_folder" / "tokenizer.model").mkdir(parents=True)   # read before the model: no weights
    (tmp_path / "tokenizer_folder" / "config.json").write_text("{}")
    for extra, message in (
            ([f"--init_from={tmp_path / 'empty'}"], "is not a model folder (no config.json)"),
            ([f"--init_from={tmp_path / 'nowhere'}"], f"--init_from={tmp_path / 'nowhere'}: no such folder"),
            ([f"--init_from={tmp_path / 'run'}"],
             f"(no config.json); the model the run exported is {tmp_path / 'run' / 'model'}"),
            ([f"--init_from={tmp_path / 'unknown_key'}"], "unknown config key 'bogus'"),
            ([f"--tokenizer={tmp_path / 'garbage.model'}"],
             f"{tmp_path / 'garbage.model'}: cannot be read as a SentencePiece tokenizer.model"),
            ([f"--init_from={tmp_path / 'tokenizer_folder'}"],
             f"{tmp_path / 'tokenizer_folder' / 'tokenizer.model'}: is a folder, expected a SentencePiece"),
            (["--annt="], "--annt is empty, expected an annt.json file of prompts"),
            (["--device=tpu"], "--device=tpu: expected auto, cpu, cuda or cuda:N"),
            (["--device=cuda:99"], "--device=cuda:99: "),
            (["--steps=0"], "--steps=0: expected >= 1"),
            (["--top_p=1.5"], "--top_p=1.5: expected in (0, 1]"),
            (["--top_p=nan"], "argument --top_p: expected a finite number, got 'nan'"),
            (["--temperature=nan"], "argument --temperature: expected a finite number, got 'nan'"),
            (["--guidance_scale=nan"], "argument --guidance_scale: expected a finite number, got 'nan'"),
            (["--guidance_scale=inf"], "argument --guidance_scale: expected a finite number, got 'inf'"),
            (["--seed=99999999999999999999999"], "argument --seed: expected an integer in [0, 2**63), got '9999"),
            (["--seed=-1"], "argument --seed: expected an integer in [0, 2**63), got '-1'"),
            ([f"--seed={2 ** 63}"], f"argument --seed: expected an integer in [0, 2**63), got '{2 ** 63}'"),
            (["--num_iter=100000"], "--num_iter=100000: expected 0..2048, no more rounds than --num_total_token"),
            (["--sampler=foo"], "argument --sampler: invalid choice: 'foo' (choose from 'ddpm', 'ddim', 'dpm++2m')")):
        code = mmi.run_script(sample.main, [f"--annt={annt}", f"--out={tmp_path / 'out'}", *extra])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and message in err and "Traceback" not in err, err
    assert not os.path.exists(tmp_path / "out")


def test_sample_steps_and_beams_beyond_the_models_bounds_are_one_line(saved_tiny_model, tmp_path, capsys):
    """More diffusion steps than the model's schedule has timesteps, or more beams than its vocabulary has tokens,
    is one line naming the flag and the bound, exit 2, before any generation (no run folder)."""
    cfg = mmi.MMInterleaved.from_pretrained(saved_tiny_model).cfg
    steps, vocab = cfg.image_decoder.num_train_timesteps, cfg.llm.vocab_size
    for extra, message in ((["--steps=1001"], f"--steps=1001: expected at most {steps}, the model's diffusion"),
                           ([f"--num_beams={vocab + 1}", "--no-use_nucleus_sampling"],
                            f"--num_beams={vocab + 1}: expected at most {vocab}, the model's vocabulary size")):
        argv = sample_argv(saved_tiny_model, tmp_path / "out", f"--annt={_write_annt(tmp_path, [GOOD])}", *extra)
        code = mmi.run_script(sample.main, argv)
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and message in err and "Traceback" not in err, err
    assert not os.path.exists(tmp_path / "out")


def test_sample_unwritable_out_is_one_line_before_the_model_loads(tmp_path, monkeypatch, capsys):
    """--out that is a file, or lies under one, is refused before the model loads (a 13B load takes minutes)."""
    loads = []
    monkeypatch.setattr(sample, "load_model", lambda args: loads.append(args))
    annt = _write_annt(tmp_path, [GOOD])
    (tmp_path / "file").write_text("mine")
    for out, message in ((tmp_path / "file", f"--out={tmp_path / 'file'}: is a file, expected a folder"),
                         (tmp_path / "file" / "x", f"--out={tmp_path / 'file' / 'x'}: {tmp_path / 'file'} is a file")):
        code = mmi.run_script(sample.main, [f"--annt={annt}", f"--out={out}"])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and message in err and "Traceback" not in err, err
    assert loads == [] and (tmp_path / "file").read_text() == "mine"


def test_sample_reads_the_model_folders_tokenizer_json(saved_tiny_model, tmp_path, capsys):
    """A model folder's own tokenizer.json (as train.py may export one) is the tokenizer sample.py reads, not the
    demo's: a broken one is reported, not passed over."""
    folder = tmp_path / "model"
    shutil.copytree(saved_tiny_model, folder)
    (folder / "tokenizer.json").write_text("[")
    annt = _write_annt(tmp_path, [GOOD])
    assert mmi.run_script(sample.main, [f"--annt={annt}", f"--init_from={folder}", "--device=cpu"]) == 2
    assert f"{folder / 'tokenizer.json'}: cannot be read as a tokenizers tokenizer.json" in capsys.readouterr().err


def test_sample_original_needs_only_mmi_and_names_what_it_lacks(tmp_path, capsys):
    """--init_from=original takes --mmi alone (the tokenizer from --tokenizer, --llm or the --mmi folder); a
    checkpoint that lacks the LLM's, CLIP's and SD's weights is one line naming them and the folders (mmi-13b
    shapes, built on the meta device: nothing is read)."""
    annt = _write_annt(tmp_path, [GOOD])
    ckpt = tmp_path / "mmi"
    ckpt.mkdir()
    save_file({"soi_token": torch.zeros(1, 5120)}, str(ckpt / "model.safetensors"))
    base = [f"--annt={annt}", f"--out={tmp_path / 'out'}", "--init_from=original", "--device=cpu"]
    for extra, message in (
            ([], "--init_from=original needs --mmi (the MM-Interleaved checkpoint, which holds every weight), or "
                 "--llm and --clip"),
            ([f"--mmi={ckpt}"], "--init_from=original: no tokenizer.model in the --llm or --mmi folder; pass "
                                "--tokenizer"),
            ([f"--mmi={ckpt}", f"--llm={tmp_path / 'vicuna'}"], f"--llm={tmp_path / 'vicuna'}: no such folder"),
            ([f"--mmi={ckpt}", f"--tokenizer={tmp_path / 'tok.model'}"],
             f"--tokenizer={tmp_path / 'tok.model'}: no such file"),
            ([f"--mmi={ckpt}", f"--tokenizer={data.DEMO_TOKENIZER_PATH}"],
             "; the mmi checkpoint must hold those of the folders not given: ")):
        code = mmi.run_script(sample.main, base + extra)
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and message in err and "Traceback" not in err, err
    assert f"neither in mmi={ckpt} nor" in err
    assert re.search(r"given: \d+ of clip \(CLIP ViT-L/14\), \d+ of llm \(Vicuna\), \d+ of sd \(Stable Diffusion", err)


def test_sample_script_error_is_one_line_and_exit_code_2(tmp_path):
    annt = _write_annt(tmp_path, [GOOD])
    run = subprocess.run([sys.executable, os.path.join(HERE, "sample.py"), f"--annt={annt}",
                          f"--init_from={tmp_path}"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and run.stderr.startswith("sample.py: error: --init_from="), run.stderr
    assert len(run.stderr.strip().splitlines()) == 1 and "no config.json" in run.stderr


def _write_broken_images(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(data.render_scene(data.make_story(5).scenes[0])).save(buf, "JPEG")
    (tmp_path / "cut.jpg").write_bytes(buf.getvalue()[:len(buf.getvalue()) // 2])
    buf = io.BytesIO()
    Image.fromarray(data.render_scene(data.make_story(5).scenes[0])).save(buf, "PNG")
    (tmp_path / "header.png").write_bytes(buf.getvalue()[:33])         # signature + IHDR, no pixel data


@pytest.mark.parametrize("change, message", [
    ({"images": ["cut.jpg"]},
     r"sample 1: field 'images'\[0\]: 'cut.jpg' is not an image Pillow can decode \(.*runcated"),
    ({"images": ["header.png"]}, r"sample 1: field 'images'\[0\]: 'header.png' is not an image Pillow can decode"),
    ({"images": ["big.png"]}, r"sample 1: field 'images'\[0\]: 'big.png' is too large \(80x80 pixels, more than"),
    ({"image_first": [1]}, r"sample 1: field 'image_first'\[0\] = 1 must be true or false"),
    ({"image_first": ["yes"]}, r"sample 1: field 'image_first'\[0\] = 'yes' must be true or false"),
    ({"image_first": [None]}, r"sample 1: field 'image_first'\[0\] = None must be true or false"),
])
def test_sample_refuses_undecodable_images_and_bad_types(tmp_path, change, message, capsys, monkeypatch):
    """Images are decoded in the up-front check (a truncated JPEG or a header-only PNG, which Image.verify()
    accepts, is refused); more pixels than Pillow's limit is refused too."""
    _write_broken_images(tmp_path)
    Image.new("RGB", (80, 80)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5000)
    annt = _write_annt(tmp_path, [GOOD, dict(GOOD, **change)])
    code = mmi.run_script(sample.main, [f"--annt={annt}", "--init_from=/nonexistent", f"--out={tmp_path / 'out'}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and re.search(message, err) and "annt.json" in err, err
    assert not os.path.exists(tmp_path / "out")


def test_sample_refuses_a_deeply_nested_prompt_file(tmp_path, capsys):
    (tmp_path / "annt.json").write_text("[" * 100_000 + "]" * 100_000)
    code = mmi.run_script(sample.main, [f"--annt={tmp_path / 'annt.json'}", f"--out={tmp_path / 'out'}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "annt.json: nested too deeply" in err, err


@pytest.mark.skipif(not os.path.isfile("/proc/self/mem"), reason="needs Linux's /proc/self/mem")
def test_data_and_eval_json_readers_name_a_file_that_fails_to_read():
    """A file that exists but whose read fails (here /proc/self/mem: EIO) is an InputError naming it."""
    for read in (lambda p: ev._annotation_json(p, "annotations"), data.read_records, data.read_annt, mmi.read_json):
        with pytest.raises(mmi.InputError, match=r"^/proc/self/mem: .*(cannot|could not) .*Input/output error"):
            read("/proc/self/mem")


def test_data_and_eval_json_readers_refuse_a_file_nested_too_deeply(tmp_path):
    """json's RecursionError is an InputError naming the file (or line); a shard's line is skipped as malformed."""
    deep = "[" * 200_000
    path = tmp_path / "deep.json"
    path.write_text(deep)
    for read in (lambda p: ev._annotation_json(p, "annotations"), data.read_records, data.read_annt, mmi.read_json):
        with pytest.raises(mmi.InputError, match=re.escape(str(path)) + ": .*nested too deeply"):
            read(str(path))
    (tmp_path / "lncoco").mkdir()
    (tmp_path / "lncoco" / "coco_val_captions.jsonl").write_text(deep + "\n")
    with pytest.raises(mmi.InputError, match="coco_val_captions.jsonl:1: nested too deeply"):
        ev.read_lncoco(str(tmp_path))
    for parse in (lambda line: data.Mmc4Builder(None, None)(line, None, "shard:1", Counter()),
                  lambda line: data.parse_pair_line(line, "shard:1")):
        with pytest.raises(data.SkipSample) as e:
            parse(deep)
        assert e.value.reason == "malformed_line"


def test_sample_refuses_images_beyond_the_token_budget(tmp_path, saved_tiny_model, capsys):
    """A sentence longer than --num_total_token before an image would cut the image off: one line naming the
    sample and the field, before any story is written."""
    long = " ".join(["a red circle at the centre."] * 8)
    for first, message in (
            (dict(GOOD, sentences=[long]), "only 0 of the prompt's 1 images fit"),
            (dict(GOOD, sentences=["a red circle.", long], images=["a.png", "a.png"], sentence_ixs=[0, 1],
                  image_first=[False, False]), "only 1 of the prompt's 2 images fit")):
        annt = _write_annt(tmp_path, [GOOD, first])
        code = mmi.run_script(sample.main, sample_argv(saved_tiny_model, tmp_path / "out", f"--annt={annt}",
                                                       "--num_total_token=40"))
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1, err
        assert "annt.json: sample 1: field 'sentences': too long for --num_total_token=40: " + message in err, err
        assert not os.path.exists(tmp_path / "out")


def _one_image_annt(tmp_path):
    return _write_annt(tmp_path, [dict(GOOD, generate_mode="generate_images", num_iter=1)])


def test_sample_runs_of_the_same_second_both_keep_their_pages(tmp_path, saved_tiny_model, monkeypatch, capsys):
    """Two runs named for the same second: the second gets <run>-2, neither is lost. A temporary folder that a
    killed run left (its process gone) is removed."""
    annt = _one_image_annt(tmp_path)
    out = tmp_path / "out"
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    dead = out / f"20250101-000000.{sample.HOST}.{child.pid}.abc.tmp"
    dead.mkdir(parents=True)
    monkeypatch.setattr(sample, "run_name", lambda: "20250101-000000")
    for _ in range(2):
        assert mmi.run_script(sample.main, sample_argv(saved_tiny_model, out, f"--annt={annt}")) == 0
    assert sorted(os.listdir(out)) == ["20250101-000000", "20250101-000000-2"]
    for run in os.listdir(out):
        assert {"index.html", "result.json", "0_0.png"} <= set(os.listdir(out / run))
    printed = re.findall(r"^wrote (.+)$", capsys.readouterr().out, re.M)
    assert [os.path.dirname(p) for p in printed] == [str(out / "20250101-000000"), str(out / "20250101-000000-2")]


def test_sweep_removes_only_temp_folders_of_dead_runs_here(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    names = {"dead": f"20250101-000000.{sample.HOST}.{child.pid}.a1.tmp",
             "live": f"20250101-000000.{sample.HOST}.{os.getpid()}.a2.tmp",
             "elsewhere": f"20250101-000000.not-{sample.HOST}.{child.pid}.a3.tmp",
             "run": "20250101-000000", "old": "20250101-000000.tmp", "other": "notes.tmp"}
    for name in names.values():
        (tmp_path / name).mkdir()
        (tmp_path / name / "0_0.png").write_bytes(b"png")
    sample.sweep_dead_runs(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == sorted(v for k, v in names.items() if k != "dead")


def test_a_full_disk_keeps_the_generated_work_and_says_where(tmp_path, saved_tiny_model, monkeypatch, capsys):
    annt = _one_image_annt(tmp_path)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")                 # ENOSPC
    monkeypatch.setattr(sample, "write_page", disk_full)
    code = mmi.run_script(sample.main, sample_argv(saved_tiny_model, tmp_path / "out", f"--annt={annt}"))
    err = capsys.readouterr().err.strip()
    last = err.splitlines()[-1]                                      # after the sampler's progress bar
    assert code == 1 and "No space left on device" in last and "Traceback" not in err, err
    kept = last.rsplit(" is in ", 1)[1]
    assert os.listdir(tmp_path / "out") == [os.path.basename(kept)] and kept.endswith("-incomplete")
    assert sorted(os.listdir(kept)) == ["0_0.png", "inputs", "result.json"]
    with Image.open(os.path.join(kept, "0_0.png")) as im:
        assert im.size == (64, 64)


def test_sample_result_json_records_the_settings_of_the_run(tmp_path):
    """result.json holds every setting the stories were made with, as given on the command line."""
    args = sample.parse_args(["--device=cpu", "--no-use_nucleus_sampling", "--num_beams=3", "--top_k=7", "--top_p=0.5",
                              "--temperature=0.7", "--repetition_penalty=1.2", "--max_new_tokens=12",
                              "--min_new_tokens=2", "--seed=9", "--sampler=dpm++2m", "--steps=4",
                              "--guidance_scale=2.5"])
    (tmp_path / "run.tmp").mkdir()
    final = sample.write_run(str(tmp_path / "run.tmp"), str(tmp_path / "run"), [], args)
    with open(os.path.join(final, "result.json")) as f:
        result = json.load(f)
    assert result == {"init_from": "demo", "device": "cpu", "dtype": "float32", "quantize": "none", "seed": 9,
                      "sampler": "dpm++2m", "steps": 4, "guidance_scale": 2.5, "stories": [],
                      "text": dict(use_nucleus_sampling=False, num_beams=3, top_k=7, top_p=0.5, temperature=0.7,
                                   repetition_penalty=1.2, max_new_tokens=12, min_new_tokens=2)}


def test_sample_page_is_self_contained_and_records_given_paths(tmp_path, saved_tiny_model, capsys):
    """The prompt's own images are saved into the run folder and shown; result.json keeps annt.json's relative
    paths, never this machine's absolute ones; 64 px images are shown 256 px wide with visible pixels."""
    annt = _one_image_annt(tmp_path)
    assert mmi.run_script(sample.main, sample_argv(saved_tiny_model, tmp_path / "out", f"--annt={annt}")) == 0
    result = _check_sample_run(tmp_path / "out", capsys)
    run = tmp_path / "out" / os.listdir(tmp_path / "out")[0]
    prompt = result["stories"][0]["prompt"]
    assert prompt["images"] == ["a.png"] and prompt["image_files"] == ["inputs/0_0.png"]
    assert str(tmp_path) not in (run / "result.json").read_text()
    with Image.open(run / "inputs" / "0_0.png") as shown:
        assert np.array_equal(np.asarray(shown), np.asarray(data.load_image(str(tmp_path / "a.png"))))
    page = (run / "index.html").read_text()
    for name in ("inputs/0_0.png", "0_0.png"):
        assert f"<img src='{name}' alt='{name}' width='256' height='256' class='px'>" in page
    assert page.index("inputs/0_0.png") < page.index("<div class='generated'>") < page.index("src='0_0.png'")
    assert ".px{image-rendering:pixelated}" in page


def test_sample_gives_every_model_of_the_demo_vocabulary_the_demo_settings(tmp_path):
    """The demo's settings go with its vocabulary: the demo by name or path, and a folder holding the demo tokenizer
    (train.py exports it for the demo configs) get them; a folder with another tokenizer gets the original's."""
    trained, other = tmp_path / "trained", tmp_path / "other"
    trained.mkdir()
    shutil.copyfile(data.DEMO_TOKENIZER_PATH, trained / "tokenizer.model")
    other.mkdir()
    (other / "tokenizer.json").write_text("{}")          # another vocabulary's file (read only when the model loads)
    for init_from, settings in (("demo", sample.DEMO_SETTINGS), (ev.DEMO_MODEL, sample.DEMO_SETTINGS),
                                (trained, sample.DEMO_SETTINGS), (other, sample.ORIGINAL_SETTINGS)):
        args = sample.parse_args([f"--init_from={init_from}", "--device=cpu"])
        assert {k: getattr(args, k) for k in settings} == settings, init_from
    assert sample.DEMO_SETTINGS != sample.ORIGINAL_SETTINGS


def test_sample_page_shows_prompt_images_as_the_model_reads_them(tmp_path):
    """A phone JPEG whose EXIF says "rotate 90" is read unrotated, as the original reads it; the page's copy is that
    reading, a PNG without EXIF, not the file that a browser would show turned."""
    im = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 64, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6                                       # Orientation: rotate 90 to display
    im.save(tmp_path / "phone.jpg", exif=exif)
    names = sample.copy_inputs({"paths": [str(tmp_path / "phone.jpg")]}, 3, str(tmp_path))
    assert names == ["inputs/3_0.png"]
    with Image.open(tmp_path / names[0]) as shown:
        assert shown.format == "PNG" and shown.size == (64, 32) and not shown.getexif()
        assert np.array_equal(np.asarray(shown), np.asarray(data.load_image(str(tmp_path / "phone.jpg"))))
    Image.new("RGB", (3000, 1500)).save(tmp_path / "photo.jpg")           # a photo: at most 4 x 256 px on the page
    sample.copy_inputs({"paths": [str(tmp_path / "photo.jpg")]}, 4, str(tmp_path))
    with Image.open(tmp_path / "inputs" / "4_0.png") as shown:
        assert shown.size == (1024, 512)


def test_sample_page_shows_generated_text_as_text():
    """Text on the page is escaped: a model's (or a prompt's) <, > and & are shown, never read as markup."""
    assert sample.item_html({"type": "text", "text": "<b>red</b> & 'blue'"}, "unused") == \
        "<p>&lt;b&gt;red&lt;/b&gt; &amp; &#x27;blue&#x27;</p>"


def test_sample_page_shows_prompt_images_before_or_after_their_sentences():
    """The page's prompt is in the order the model reads it: an image_first image before its sentence, the others
    after it, and of two images before one sentence the later given first (the original inserts each in front of
    the sentence in turn)."""
    prompt = {"sentences": ["s0", "s1"], "sentence_ixs": [0, 0, 1, 0], "image_first": [True, False, True, True],
              "image_files": ["f0", "f1", "f2", "f3"]}
    items = sample.prompt_items(prompt)
    assert [item.get("file", item.get("text")) for item in items] == ["f3", "f0", "s0", "f1", "f2", "s1"]


def find_exactly(shot, tmpl):
    """Top-left corners where the array `tmpl` appears pixel for pixel in `shot`."""
    H, W = tmpl.shape[:2]
    ys, xs = np.nonzero((shot[:shot.shape[0] - H + 1, :shot.shape[1] - W + 1] == tmpl[0, 0]).all(-1))
    rng = np.random.default_rng(0)
    for py, px in zip(rng.integers(0, H, 64), rng.integers(0, W, 64)):   # cheap probes first
        keep = (shot[ys + py, xs + px] == tmpl[py, px]).all(-1)
        ys, xs = ys[keep], xs[keep]
    return [(int(y), int(x)) for y, x in zip(ys, xs) if np.array_equal(shot[y:y + H, x:x + W], tmpl)]


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs chromium")
def test_sample_page_shows_its_images_enlarged_in_a_browser(tmp_path, saved_tiny_model, capsys):
    """A real browser draws the prompt's image and the generated one, each 4x with nearest-neighbour pixels."""
    annt = _one_image_annt(tmp_path)
    assert mmi.run_script(sample.main, sample_argv(saved_tiny_model, tmp_path / "out", f"--annt={annt}")) == 0
    run = tmp_path / "out" / os.listdir(tmp_path / "out")[0]
    shot = tmp_path / "page.png"
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={tmp_path / 'browser'}", "--hide-scrollbars", "--force-device-scale-factor=1",
                    f"--screenshot={shot}", "--window-size=1000,1400", (run / "index.html").as_uri()],
                   capture_output=True, timeout=120, check=True)
    with Image.open(shot) as im:
        page = np.asarray(im.convert("RGB"))
    where = []
    for name in ("inputs/0_0.png", "0_0.png"):
        with Image.open(run / name) as im:
            pixels = np.asarray(im.convert("RGB"))
        assert pixels.std() > 0                                       # neither image is blank
        found = find_exactly(page, pixels.repeat(4, 0).repeat(4, 1))
        assert len(found) == 1, (name, found)
        where += found
    assert where[0][0] < where[1][0]                                  # the prompt's image above the generated one


def test_13b_example_prompts_build_paper_size_batches():
    tok = data.Tokenizer(mistral_model_path())
    cfg = mmi.MMIConfig.from_preset("mmi-13b")
    samples = sample.load_annt(os.path.join(HERE, "assets", "examples", "annt_13b.json"))
    for s in samples:
        batch = sample.prompt_batch(s, tok, cfg, 2048, "cpu")
        n = len(s["images"])
        assert batch["image_tensors"].shape == (n, 3, 224, 224)
        assert (batch["text_ids"] == tok.soi_id).sum() == n and (batch["text_ids"] == tok.image_id).sum() == 64 * n
        assert batch["text_ids"][0, 0] == tok.bos_id


# ----------------------------------------------------------------------------------------------------------------
# eval.py: caption metrics against pycocoevalcap, VQA/VizWiz accuracy, NDCG, Fréchet distance, Inception and CLIP
# ----------------------------------------------------------------------------------------------------------------


# Pre-tokenised, lower-case captions (what pycocoevalcap's scorers receive after its tokenizer).
REFS = {
    1: ["a man riding a wave on top of a surfboard", "a surfer riding a large wave in the ocean",
        "a person on a surf board riding a wave", "a man surfing a wave on his board",
        "a surfer is riding a wave in the water"],
    2: ["two dogs playing with a frisbee in a park", "a couple of dogs running in the grass",
        "dogs chase a red frisbee across the field"],
    3: ["a plate of food with broccoli and rice", "a white plate topped with rice and vegetables",
        "a dinner plate with meat broccoli and rice", "food on a plate with a fork"],
    4: ["a cat", "a cat sitting on a couch", "the cat is sleeping on the sofa"],
    5: ["a dog on a dog bed", "the dog sleeps on a bed"],
    6: ["a red bus", "the red bus is parked"],
}
# 5 repeats n-grams more often than any one reference: BLEU clips at the per-reference maximum (not the sum), and
# CIDEr-D clips the candidate's tf-idf weights at the reference's; 6 is as close to a 3-word reference as to a
# 5-word one, and BLEU's "closest" length takes the shorter
CANDS = {1: "a man riding a wave on a surfboard", 2: "two dogs running in a park with a frisbee",
         3: "a plate of rice and broccoli", 4: "cat", 5: "a dog a dog a dog on a bed",
         6: "a big red bus"}


def test_bleu_equals_pycocoevalcap_corpus_and_per_sample():
    pytest.importorskip("pycocoevalcap")
    from pycocoevalcap.bleu.bleu import Bleu
    want, want_per = Bleu(4).compute_score(REFS, {k: [v] for k, v in CANDS.items()}, verbose=0)
    got, got_per = ev.bleu(REFS, CANDS)
    assert got == pytest.approx(want, rel=1e-12, abs=1e-15)
    for k in range(4):
        assert got_per[k] == pytest.approx(want_per[k], rel=1e-12, abs=1e-15)


def test_cider_d_equals_pycocoevalcap_cider():
    pytest.importorskip("pycocoevalcap")
    from pycocoevalcap.cider.cider import Cider
    want, want_per = Cider().compute_score(REFS, {k: [v] for k, v in CANDS.items()})
    got, got_per = ev.cider_d(REFS, CANDS)
    assert got == pytest.approx(want, rel=1e-12)
    assert got_per == pytest.approx(list(want_per), rel=1e-12)


RAW_CAPTIONS = [
    "A man riding a wave on top of a surfboard.", "Two dogs' toys are on the floor!",
    "The cat's bowl isn't empty, it's full.", "A black-and-white photo of a train (old).",
    "Mr. Smith cannot go to St. Louis.", 'He said "hello" to me...', "There are 3.5 apples and 1,000 oranges.",
    "I'm gonna eat; you're not.", "A red/blue sign at the U.S. border.", "It costs $5 or 50%.",
    "A   man \n with a hat?", "we'll see -- maybe", "don't can't won't shouldn't", "a.m. and p.m. times",
    "A dog's nose: wet.", "`quoted' text", "Tom & Jerry", "the end.", "Rock 'n' roll in the '80s", "hello!! what?!",
    "a #1 fan with a #hashtag", "It's 5 o'clock in the 1990s.", "A man, a woman, and a child.", "no. 5 e.g. x",
    "the boys' room", "a 10-year-old boy", "3:30 pm", "A.B.C. news", "A bunch of bananas...", "cars/trucks",
]


@pytest.mark.skipif(shutil.which("java") is None, reason="pycocoevalcap's PTBTokenizer needs java")
def test_ptb_tokenize_equals_stanford_ptbtokenizer():
    pytest.importorskip("pycocoevalcap")
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    want = PTBTokenizer().tokenize({i: [{"caption": c}] for i, c in enumerate(RAW_CAPTIONS)})
    assert [ev.ptb_tokenize(c) for c in RAW_CAPTIONS] == [want[i][0] for i in range(len(RAW_CAPTIONS))]


def test_caption_metrics_score_both_sides_after_ptb_tokenisation():
    """The scores pycocoevalcap gives the hand-tokenised captions: references and candidates alike are
    lower-cased and their punctuation split off and dropped before BLEU and CIDEr-D (brackets stay, as
    "-lrb-"/"-rrb-": pycocoevalcap drops only their upper-case forms)."""
    pytest.importorskip("pycocoevalcap")
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    refs = {1: ["A man, riding a wave.", "The surfer's board!"], 2: ["Two dogs (playing).", "Dogs play."]}
    cands = {1: "A man riding a wave.", 2: "Two dogs, playing!"}
    refs_t = {1: ["a man riding a wave", "the surfer 's board"], 2: ["two dogs -lrb- playing -rrb-", "dogs play"]}
    cands_t = {1: ["a man riding a wave"], 2: ["two dogs playing"]}
    bleu, _ = Bleu(4).compute_score(refs_t, cands_t, verbose=0)
    cider, cider_per = Cider().compute_score(refs_t, cands_t)
    got, got_per = ev.caption_metrics(refs, cands)
    assert [got[f"Bleu_{k}"] for k in (1, 2, 3, 4)] == pytest.approx(bleu, rel=1e-12)
    assert got["CIDEr"] == pytest.approx(cider, rel=1e-12)
    assert [got_per[1], got_per[2]] == pytest.approx(list(cider_per), rel=1e-12)


@pytest.mark.parametrize("k, want", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_accuracy_is_leave_one_out_min_matches_over_3(k, want):
    # k of 10 humans gave the answer: each left-out subset of 9 holds k-1 or k of them
    gts = ["red"] * k + [f"other{i}" for i in range(10 - k)]
    assert ev.vqa_accuracy("red", gts) == pytest.approx(want, abs=1e-12)


@pytest.mark.parametrize("pred, gts, want", [
    ("a dog.", ["the dog", "dog"] + ["cat"] * 8, 0.6),                 # articles and the final period go
    ("t-shirt", ["t shirt"] * 3 + ["shirt"] * 7, 0.9),                 # glued punctuation becomes a space
    ("1,000", ["1000"] * 2 + ["many"] * 8, 0.6),                       # a digit comma drops every punctuation
    ("Two", ["2"] * 3 + ["3"] * 7, 0.9),                               # number words -> digits, lower case
    ("none", ["0"] * 1 + ["1"] * 9, 0.3),
    ("dont", ["don't"] * 3 + ["no"] * 7, 0.9),                         # contractions restored
    ("1.5", ["1.5"] * 2 + ["2"] * 8, 0.6),                             # a period before a digit stays
    ("Yes", ["yes"] * 10, 0.0),                                        # humans agree: nothing is normalised
    ("yes ", ["yes"] * 10, 1.0),                                       # ... but both sides are stripped
    ("yes", ["yes\t"] * 10, 1.0),
    ("3.", ["3"] * 3 + ["2"] * 7, 0.9),                                # the no-op lookbehind: "3." loses its period
    ("yes!", ["yes"] * 3 + ["no"] * 7, 0.9),                           # "!" is official punctuation
    ("t-shirt -", ["tshirt"] * 3 + ["shirt"] * 7, 0.9),                # one "-" next to a space: every "-" vanishes
    ("eleven", ["11"] * 3 + ["eleven"] + ["12"] * 6, 0.3),             # number words stop at ten
])
def test_vqa_accuracy_official_normalisation(pred, gts, want):
    assert ev.vqa_accuracy(pred, gts) == pytest.approx(want, abs=1e-12)


def test_vqa_accuracy_averages_over_every_human_left_out_not_over_10():
    # 3 humans: leaving out either "red" leaves 1 red (1/3), leaving out "blue" leaves 2 (2/3); mean 4/9
    assert ev.vqa_accuracy("red", ["red", "red", "blue"]) == pytest.approx(4 / 9, abs=1e-12)


def test_vqa_tasks_report_the_mean_accuracy_in_percent():
    for task in ("vqav2", "okvqa", "textvqa", "vizwiz_vqa"):
        assert ev.TASKS[task].score(None, [{"accuracy": 1.0}, {"accuracy": 0.3}], None) == {"overall_accuracy": 65.0}


def test_vizwiz_accuracy_normalises_the_prediction_only():
    assert ev.vizwiz_accuracy("Unanswerable.", ["unanswerable"] * 5 + ["blue"] * 5) == 1.0
    assert ev.vizwiz_accuracy("an apple", ["apple"] * 2 + ["pear"] * 8) == pytest.approx(0.6)
    assert ev.vizwiz_accuracy("blue", ["Blue"] * 10) == 0.0                 # human answers are taken as given
    assert ev.vizwiz_accuracy("dont", ["don't"] * 10) == 0.0                # VizWiz's table writes "don’t"
    assert ev.vizwiz_accuracy("cant", ["can't"] * 10) == 1.0                # ... but keeps "can't" straight


@pytest.mark.parametrize("text, want", [
    ("The answer is yes.", "yes"),
    ("a red car and a bus", "red car"),
    ("this is a dog", ""),                  # "is " matches inside "this ": the original keeps what lies between
    ('"Blue", I think', "blue"),
    ("top of the table\nmore", "table"),    # "the " is looked for before " of"
    ("kind of blue\nmore", "kind"),
    ("cats or dogs", "cats"),
    ("Yes! it is", "yes"),                  # cut at the first "!"
    ("they are red", "red"),                # "are " is a lead too
    ("the top office", "top"),              # " of" is cut even inside a word
])
def test_extract_answer_follows_the_original_post_processing(text, want):
    assert ev.extract_answer(text) == want


def test_ndcg_on_a_hand_computed_example():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.2]])
    relevance = torch.tensor([[1.0, 0.0, 0.5, 0.0]])
    ranks = ev.scores_to_ranks(scores)
    assert ranks.tolist() == [[4, 1, 2, 3]]
    # k = 2 relevant options; the top-2 predicted are options 1 and 2 (relevance 0, 0.5); the ideal is 1, 0.5
    want = (0 / math.log2(2) + 0.5 / math.log2(3)) / (1 / math.log2(2) + 0.5 / math.log2(3))
    assert ev.ndcg(ranks, relevance) == pytest.approx(want, rel=1e-6)
    assert ev.ndcg(ev.scores_to_ranks(relevance), relevance) == pytest.approx(1.0)


def test_frechet_distance_equals_scipy_and_zero_on_itself():
    linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(0)
    a = rng.normal(size=(300, 12)) @ rng.normal(size=(12, 12))
    b = rng.normal(size=(200, 12)) @ rng.normal(size=(12, 12)) + 0.5
    (m1, s1), (m2, s2) = ev.feature_statistics(a), ev.feature_statistics(b)
    covmean = linalg.sqrtm(s1 @ s2).real
    want = float((m1 - m2) @ (m1 - m2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))
    assert ev.frechet_distance(m1, s1, m2, s2) == pytest.approx(want, rel=1e-9)
    assert abs(ev.frechet_distance(m1, s1, m1, s1)) < 1e-9
    with pytest.raises(ValueError, match="covariances"):
        ev.frechet_distance(m1, s1, m2[:5], s2[:5, :5])


def test_feature_statistics_are_the_mean_and_unbiased_covariance():
    # deviations from the mean (1, 1): (-1, -1), (1, -1), (0, 2); their outer products sum to [[2, 0], [0, 6]], / (3 - 1)
    mean, cov = ev.feature_statistics([[0, 0], [2, 0], [1, 3]])
    assert mean.tolist() == [1.0, 1.0] and cov.tolist() == [[1.0, 0.0], [0.0, 3.0]]


def test_fid_image_tensor_sizes_and_crops_as_torchvision():
    # 64 x 67: the short side is already 64 (no resize); the crop drops (67 - 64) / 2 = 1.5 -> round() = 2 rows on top
    # (torchvision's CenterCrop; CLIP's processor floors it to 1)
    arr = np.random.default_rng(0).integers(0, 256, (67, 64, 3), dtype=np.uint8)
    want = torch.from_numpy(arr[2:66].transpose(2, 0, 1).astype(np.float32) / 255)
    assert torch.equal(ev.fid_image_tensor(Image.fromarray(arr)), want)
    assert torch.equal(ev.clip_image_tensor(Image.fromarray(arr), 64),
                       torch.from_numpy(arr[1:65].transpose(2, 0, 1).astype(np.float32) / 255))
    # 80 x 101: the short side goes to 64 and the long one to int(64 * 101 / 80) = int(80.8) = 80, as torchvision
    # truncates; then rows (80 - 64) / 2 = 8.. are kept
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (101, 80, 3), dtype=np.uint8))
    resized = np.asarray(img.resize((64, 80), resample=Image.BICUBIC))
    want = torch.from_numpy(resized[8:72].transpose(2, 0, 1).astype(np.float32) / 255)
    assert torch.equal(ev.fid_image_tensor(img), want)


def test_fid_inception_loads_by_key_and_gives_2048_features(tmp_path):
    with pytest.raises(ValueError, match=ev.FID_WEIGHTS_NAME):
        ev.load_inception(str(tmp_path / ev.FID_WEIGHTS_NAME))
    torch.manual_seed(0)
    state = {k: v for k, v in ev.FIDInceptionV3().state_dict().items() if not k.endswith("num_batches_tracked")}
    assert len(state) == 472 and state["fc.weight"].shape == (1008, 2048)
    path = tmp_path / ev.FID_WEIGHTS_NAME
    torch.save(state, path)
    net = ev.load_inception(str(path))
    assert torch.equal(net.Mixed_7c.branch_pool.conv.weight, state["Mixed_7c.branch_pool.conv.weight"])
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (80, 100, 3), dtype=np.uint8))
    x = ev.fid_image_tensor(img)
    assert x.shape == (3, 64, 64) and 0 <= float(x.min()) and float(x.max()) <= 1
    feats = ev.inception_features(net, [img])
    assert feats.shape == (1, 2048) and feats.dtype == np.float64 and np.isfinite(feats).all()
    torch.save({"fc.weight": state["fc.weight"]}, path)
    with pytest.raises(ValueError, match="missing keys"):
        ev.load_inception(str(path))


def test_fid_inception_scales_to_minus_1_1_max_pools_twice_and_averages_the_grid():
    """The network's glue with every convolution block an identity: [0, 1] -> [-1, 1], two 3x3 stride-2 max
    pools, then the mean over the grid (pool3), counted by hand on a half-black, half-white 299 x 299 image."""
    net = ev.FIDInceptionV3().eval()
    for name, _ in list(net.named_children()):
        if name != "fc":
            setattr(net, name, torch.nn.Identity())
    images = torch.zeros(1, 3, 299, 299)
    images[..., 150:] = 1.0                       # columns 150..298 white: +1 after scaling, 0..149 -1
    # pool 1 (299 -> 149): output column j sees 2j..2j+2, white from j = 74 on (75 of 149); pool 2 (149 -> 74):
    # white from j = 36 on (38 of 74); the mean is (38 - 36) / 74
    with torch.no_grad():
        got = net(images)
    torch.testing.assert_close(got, torch.full((1, 3), 2 / 74), rtol=0, atol=1e-6)


def test_fid_inception_pool_branches_average_valid_pixels_then_max_pool_in_the_last_block():
    """TensorFlow's FID graph: the pool branch averages over the pixels inside the image (a 2 x 2 map gives its
    mean, 2.5, everywhere), except in the last block (Mixed_7c), which max-pools (4 everywhere)."""
    net = ev.FIDInceptionV3().eval()
    bn_scale = 1 / math.sqrt(1 + 1e-3)            # a fresh BatchNorm in eval mode: x / sqrt(1 + eps)
    for block, pooled in ((net.Mixed_7b, 2.5), (net.Mixed_7c, 4.0)):
        conv = block.branch_pool.conv
        cin = conv.in_channels
        with torch.no_grad():
            conv.weight.fill_(1 / cin)              # the 1x1 conv averages the (identical) channels
            x = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).expand(1, cin, 2, 2)
            got = block(x)[:, -192:]
        torch.testing.assert_close(got, torch.full_like(got, pooled * bn_scale), rtol=1e-6, atol=1e-6)


# a CLIP small enough to build in a test, in place of ViT-L/14 (whose weights are not here)
TINY_CLIP = dict(image_size=28, patch=14, vision_dim=48, vision_layers=1, vision_heads=4, vision_hidden=40, text_dim=32,
                 text_layers=1, text_heads=4, text_hidden=37, projection_dim=24)


def _save_unk_tokenizer(path):
    """A tokenizers tokenizer.json of one token, at path."""
    tokenizers = pytest.importorskip("tokenizers")
    tokenizers.Tokenizer(tokenizers.models.WordLevel({"[UNK]": 0}, "[UNK]")).save(str(path))


def test_damaged_inception_or_clip_files_are_one_input_error(tmp_path):
    """An empty or wrongly shaped Inception weights file, and a CLIP folder whose tokenizer.json or
    model.safetensors is garbage, are each an InputError naming the file and what is wrong, not a traceback."""
    path = tmp_path / ev.FID_WEIGHTS_NAME
    path.write_bytes(b"")
    with pytest.raises(mmi.InputError, match=re.escape(f"{path}: not a readable PyTorch weights file (")):
        ev.load_inception(str(path))
    state = ev.FIDInceptionV3().state_dict()
    state["fc.weight"] = state["fc.weight"][:10]
    torch.save(state, path)
    with pytest.raises(mmi.InputError, match=re.escape("keys of another shape or type ['fc.weight']")):
        ev.load_inception(str(path))
    (tmp_path / "model.safetensors").write_bytes(b"garbage!" * 4)
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(mmi.InputError, match=re.escape(f"{tmp_path / 'tokenizer.json'}: not a tokenizers tokenizer")):
        ev.load_clip(str(tmp_path))
    _save_unk_tokenizer(tmp_path / "tokenizer.json")
    with pytest.raises(mmi.InputError, match=re.escape(f"{tmp_path / 'model.safetensors'}: not a safetensors file")):
        ev.load_clip(str(tmp_path))


def test_a_clip_folder_is_checked_by_its_header_then_loaded(tmp_path, monkeypatch):
    """A --clip folder in openai's layout (a tiny CLIP standing in for ViT-L/14): its safetensors header passes the
    check key by key, the file's logit scale and position ids are not read, and every scorer weight is the file's;
    one tensor of another shape is found from the header alone."""
    tiny = functools.partial(ev.CLIPScorer, vocab=10, **TINY_CLIP)
    monkeypatch.setattr(ev, "CLIPScorer", tiny)
    torch.manual_seed(0)
    state = {k: v for k, v in tiny().state_dict().items() if not k.endswith("position_ids")}
    extra = {"logit_scale": torch.ones(()), "text_model.embeddings.position_ids": torch.arange(77)[None]}
    save_file({**state, **extra}, tmp_path / "model.safetensors")
    _save_unk_tokenizer(tmp_path / "tokenizer.json")
    net, tok = ev.load_clip(str(tmp_path))
    assert tok.get_vocab() == {"[UNK]": 0}
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items() if not k.endswith("position_ids"))
    save_file({**state, "visual_projection.weight": torch.zeros(24, 47)}, tmp_path / "model.safetensors")
    with pytest.raises(mmi.InputError, match=re.escape("keys of another shape or type ['visual_projection.weight']")):
        ev.check_clip_files(str(tmp_path))


def test_clip_scorer_equals_transformers_clip_at_a_tiny_config(tmp_path):
    transformers = oracle_transformers()
    import safetensors.torch
    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, eos_token_id=98),
        vision_config=dict(image_size=28, patch_size=14, hidden_size=48, intermediate_size=40, num_hidden_layers=2,
                           num_attention_heads=4),
        projection_dim=24)
    torch.manual_seed(0)
    ref = transformers.CLIPModel(cfg).eval()
    ours = ev.CLIPScorer(image_size=28, patch=14, vision_dim=48, vision_layers=2, vision_heads=4, vision_hidden=40,
                        vocab=99, text_dim=32, text_layers=2, text_heads=4, text_hidden=37, projection_dim=24)
    state = {k: v for k, v in ref.state_dict().items() if not k.endswith("position_ids") and k != "logit_scale"}
    missing, unexpected = ours.load_state_dict(state, strict=False)
    assert unexpected == [] and missing == ["vision_model.embeddings.position_ids"]   # every other name matches
    texts = [[97, 5, 6, 7, 98], [97, 9, 98]]              # bos ... eos; eos is the largest id, as in CLIP's vocab
    ids = torch.full((2, 77), 98)                        # the original pads to 77 with eos and passes no mask
    for i, t in enumerate(texts):
        ids[i, :len(t)] = torch.tensor(t)
    images = torch.rand(6, 3, 28, 28)
    mean, std = torch.tensor(ev.CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(ev.CLIP_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        want_t = F_normalize(ref.get_text_features(input_ids=ids))
        want_i = F_normalize(ref.get_image_features(pixel_values=(images - mean) / std))
        got_t = ours.text_features(torch.tensor([[97, 5, 6, 7, 98], [97, 9, 98, 0, 0]]), torch.tensor([4, 2]))
        got_i = ours.image_features(images)
    torch.testing.assert_close(got_t, want_t, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_i, want_i, rtol=1e-5, atol=1e-5)
    # copy-major candidates: image c * B + b is caption b's candidate c
    want_best = (want_i.view(3, 2, -1) * want_t[None]).sum(-1).argmax(0)
    assert ev.clip_best_of(ours, texts, images, 3).tolist() == want_best.tolist()
    safetensors.torch.save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="model.safetensors"):
        ev.load_clip(str(tmp_path))


def F_normalize(x):
    return x / x.norm(dim=-1, keepdim=True)


def test_clip_image_tensor_equals_clip_image_processor():
    transformers = oracle_transformers()
    proc = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (45, 61, 3), dtype=np.uint8))
    want = proc(images=img, return_tensors="pt").pixel_values[0]
    mean, std = torch.tensor(ev.CLIP_MEAN).view(3, 1, 1), torch.tensor(ev.CLIP_STD).view(3, 1, 1)
    got = (ev.clip_image_tensor(img, 32) - mean) / std
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# eval.py: readers end to end on tiny fake datasets in the original layout, with a tiny random model
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_model_and_tokenizer():
    """The embedded demo model (assets/demo) in float32 and its tokenizer."""
    model = mmi.MMInterleaved.from_pretrained(ev.DEMO_MODEL, dtype=torch.float32).eval()
    return model, ev.load_tokenizer(None, ev.DEMO_MODEL, model.cfg)


@pytest.fixture
def short_generation(monkeypatch):
    # the readers and scoring are under test here, not generation length: 3 new tokens, 2 beams
    for table in (ev.CAPTION_GENERATION, ev.PARAGRAPH_GENERATION, ev.VQA_GENERATION):
        monkeypatch.setitem(table, "max_new_tokens", 3)
        monkeypatch.setitem(table, "min_new_tokens", min(table["min_new_tokens"], 1))
        monkeypatch.setitem(table, "num_beams", 2)


def _image(path, seed):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (70, 90, 3), dtype=np.uint8)).save(path)


def _json(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f)


def _args(task, root, limit=None):
    # the command line's own defaults, so tests see what a user gets
    args = ev.parse_args([f"--task={task}", f"--data_root={root}", "--init_from=unused", "--inception=none"] +
                        ([f"--limit={limit}"] if limit is not None else []))
    args.device, args.steps, args.out = "cpu", 2, os.path.join(root, "results.json")
    return args


def _coco_captions(root, folder, ann_file, image_dir, names):
    images = [{"id": 10 + i, "file_name": n} for i, n in enumerate(names)]
    anns = [{"image_id": 10 + i, "id": j, "caption": f"A photo number {i} of a thing {j}."}
            for i in range(len(names)) for j in range(2)]
    _json(os.path.join(root, folder, ann_file), {"images": images, "annotations": anns})
    for i, n in enumerate(names):
        _image(os.path.join(root, folder, image_dir, n), i)


@pytest.mark.parametrize("task", ["coco_karpathy", "flickr30k", "nocaps", "image2paragraph"])
def test_caption_readers_end_to_end(task, tmp_path, demo_model_and_tokenizer, short_generation):
    model, tok = demo_model_and_tokenizer
    root = tmp_path
    if task == "coco_karpathy":
        names = ["val2014/COCO_val2014_000000000042.jpg", "val2014/COCO_val2014_000000000007.jpg"]
        _json(root / "coco/annotations/coco_karpathy_test.json",
              [{"image": n, "caption": ["x", "y"]} for n in names] + [{"image": names[0], "caption": ["z"]}])
        _json(root / "coco/annotations/coco_karpathy_test_gt.json",
              {"images": [{"id": 42}, {"id": 7}], "annotations": [
                  {"image_id": 42, "id": 1, "caption": "A red circle."}, {"image_id": 7, "id": 2, "caption": "Two"},
                  {"image_id": 7, "id": 3, "caption": "two squares"}]})
        for i, n in enumerate(names):
            _image(str(root / "coco" / n), i)
        want_ids = [42, 7]
    elif task == "flickr30k":
        _coco_captions(root, "flickr30k", "test1k.token.coco_format", "flickr30k-images", ["a.jpg", "b.jpg"])
        want_ids = [10, 11]
    elif task == "nocaps":
        _coco_captions(root, "nocaps", "nocaps_val_4500_captions.json", "images", ["a.jpg", "b.jpg", "c.jpg"])
        want_ids = [10, 11, 12]
    else:
        anns = [{"image_id": 5, "url": "https://x/VG_100K/5.jpg", "caption": "A scene. It has shapes."},
                {"image_id": 6, "url": "https://x/VG_100K_2/6.jpg", "caption": "Another scene."},
                {"image_id": 8, "url": "https://x/VG_100K/8.jpg", "caption": "Not in the test split."}]
        _json(root / "image2paragraph/annotations/paragraphs_coco.json", {"images": [], "annotations": anns})
        _json(root / "image2paragraph/annotations/test_split.json", [6, 5])
        _image(str(root / "image2paragraph/images/VG_100K/5.jpg"), 0)
        _image(str(root / "image2paragraph/images/VG_100K_2/6.jpg"), 1)
        want_ids = [5, 6]
    samples = ev.TASKS[task].read(str(root))
    assert [s["id"] for s in samples] == want_ids and all(os.path.isfile(s["image"]) for s in samples)
    res = ev.evaluate(model, tok, _args(task, root))
    assert [o["id"] for o in res["samples"]] == want_ids
    refs = ev.caption_references(task, str(root))
    if task == "coco_karpathy":                   # every reference of an image, in file order
        assert refs == {42: ["A red circle."], 7: ["Two", "two squares"]}
    cands = {o["id"]: o["caption"] for o in res["samples"]}
    want, _ = ev.caption_metrics({k: refs[k] for k in cands}, cands)
    assert res["metrics"] == want and set(want) == {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "CIDEr"}
    if task == "coco_karpathy":
        assert all("." not in o["caption"] for o in res["samples"])


def test_karpathy_captions_are_scored_up_to_the_first_full_stop_only(tmp_path, monkeypatch,
                                                                    demo_model_and_tokenizer):
    """coco_karpathy keeps a generated caption's first sentence (the original's rule); the other caption sets keep
    the whole text."""
    model, tok = demo_model_and_tokenizer
    _image(str(tmp_path / "a.jpg"), 0)
    monkeypatch.setattr(ev, "_generate_texts", lambda model, tok, prompts, *a: ["A dog. On grass"] * len(prompts))
    for task, want in (("coco_karpathy", "A dog"), ("flickr30k", "A dog. On grass")):
        (o,) = ev.TASKS[task].predict(model, tok, [{"id": 1, "image": str(tmp_path / "a.jpg")}], _args(task, tmp_path))
        assert o == {"id": 1, "caption": want}


def test_caption_prompts_are_the_original_strings(demo_model_and_tokenizer):
    _, tok = demo_model_and_tokenizer
    soi_img = [tok.soi_id] + [tok.image_id] * 8
    assert tok.encode(ev.caption_prompt(8)) == [tok.bos_id] + soi_img + tok.encode("a photo of", add_bos=False)
    assert ev.paragraph_prompt(2) == ("<|beginofimage|><|image|><|image|>Please describe the image in detail. "
                                     "The image depicts")
    assert ev.vqa_prompt("Why?", 1) == ("Based on the image, please answer the question. <|beginofimage|><|image|>Why? "
                                       "Please provide an accurate answer within one word. The answer is:")
    assert ev.vizwiz_prompt("Why?", 1).endswith("respond with 'Unanswerable'. Please provide an accurate answer "
                                                "within one word. The answer is:")
    batch = ev.text_batch([ev.caption_prompt(8), ev.vqa_prompt("Why?", 8)], [torch.zeros(3, 64, 64)] * 2, tok)
    assert batch["attention_mask"][0, 0] == 0 and batch["attention_mask"][:, -1].tolist() == [1, 1]  # left-padded
    assert batch["num_image_per_seq"].tolist() == [1, 1]


def _vqa_answers(words):
    return [{"answer": w, "answer_confidence": "yes", "answer_id": i + 1} for i, w in enumerate(words)]


@pytest.mark.parametrize("task", ["vqav2", "okvqa", "textvqa", "vizwiz_vqa"])
def test_vqa_readers_end_to_end(task, tmp_path, demo_model_and_tokenizer, short_generation):
    model, tok = demo_model_and_tokenizer
    root = tmp_path
    answers = ["red"] * 6 + ["blue"] * 4
    if task in ("vqav2", "okvqa"):
        folder, a_name, q_name = {"vqav2": ("VQAv2", "v2_mscoco_val2014_annotations.json",
                                            "v2_OpenEnded_mscoco_val2014_questions.json"),
                                  "okvqa": ("OK-VQA", "mscoco_val2014_annotations.json",
                                            "OpenEnded_mscoco_val2014_questions.json")}[task]
        _json(root / folder / a_name, {"annotations": [
            {"question_id": 301, "image_id": 3, "answers": _vqa_answers(answers), "multiple_choice_answer": "red"},
            {"question_id": 401, "image_id": 4, "answers": _vqa_answers(["2"] * 10), "multiple_choice_answer": "2"}]})
        _json(root / folder / q_name, {"questions": [{"question_id": 301, "image_id": 3, "question": "Colour?"},
                                                     {"question_id": 401, "image_id": 4, "question": "How many?"}]})
        for i in (3, 4):
            _image(str(root / f"coco/val2014/COCO_val2014_{i:012d}.jpg"), i)
        want_ids = [301, 401]
    elif task == "textvqa":
        _json(root / "textvqa/textvqa_val_annotations.json", {"annotations": [
            {"question_id": 9, "image_id": "abc", "answers": answers}]})
        _json(root / "textvqa/textvqa_val_questions.json", {"questions": [
            {"question_id": 9, "image_id": "abc", "question": "What does it say?", "image": "abc.jpg"}]})
        _image(str(root / "textvqa/train_images/abc.jpg"), 0)
        want_ids = [9]
    else:
        _json(root / "VizWiz/val.json", [
            {"image": "VizWiz_val_00000000.jpg", "question": "What is this?", "answer_type": "other",
             "answerable": 1, "answers": [{"answer": a, "answer_confidence": "yes"} for a in answers]}])
        _image(str(root / "VizWiz/val/VizWiz_val_00000000.jpg"), 0)
        want_ids = ["VizWiz_val_00000000.jpg"]
    res = ev.evaluate(model, tok, _args(task, root))
    assert [o["id"] for o in res["samples"]] == want_ids
    accuracy = ev.vizwiz_accuracy if task == "vizwiz_vqa" else ev.vqa_accuracy
    per = []
    for o, s in zip(res["samples"], ev.TASKS[task].read(str(root))):
        assert o["answer"] == ev.extract_answer(o["generated"])
        assert o["accuracy"] == accuracy(o["answer"], s["answers"])
        per.append(o["accuracy"])
    assert res["metrics"]["overall_accuracy"] == pytest.approx(100 * np.mean(per))


def _visdial_layout(root):
    questions, answers = ["is it red", "how many", "is it big"], ["yes", "two", "no"]
    dialog = [{"question": q, "answer": q, "answer_options": [0, 1, 2]} for q in range(3)]
    _json(root / "visdial/visdial_1.0_val.json", {"data": {"questions": questions, "answers": answers, "dialogs": [
        {"image_id": 77, "caption": "a red circle", "dialog": dialog}]}})
    _json(root / "visdial/visdial_1.0_val_dense_annotations.json",
          [{"image_id": 77, "round_id": 3, "gt_relevance": [0.0, 1.0, 0.5]}])
    _image(str(root / "visdial/VisualDialog_val2018/VisualDialog_val2018_000000000077.jpg"), 0)


def test_visdial_reader_context_and_likelihood_ranking(tmp_path, demo_model_and_tokenizer):
    model, tok = demo_model_and_tokenizer
    _visdial_layout(tmp_path)
    (s,) = ev.read_visdial(str(tmp_path))
    # round 3 is asked; as in the original, round 2 (the one just before it) is left out of the history
    assert ev.visdial_context(s, 8) == (data.image_placeholder(8) + " caption: a red circle. question: is it red? "
                                       "answer: yes. question: is it big? answer:")
    res = ev.evaluate(model, tok, _args("visdial", tmp_path))
    (o,) = res["samples"]
    # the ranking follows the summed option log-likelihoods, computed here one unpadded row per option
    image = ev.load_eval_image(s["image"], 64)
    ctx = tok.encode(ev.visdial_context(s, model.cfg.num_img_token))
    want = []
    with torch.no_grad():
        for opt in s["options"]:
            ids = ctx + tok.encode(opt, add_bos=False)
            batch = dict(text_ids=torch.tensor([ids]), image_tensors=image[None], num_image_per_seq=torch.tensor([1]))
            logp = model.text_logits(batch)[0].log_softmax(-1)
            want.append(sum(float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(ids[len(ctx):])))
    assert o["ranks"] == ev.scores_to_ranks(torch.tensor([want]))[0].tolist()
    assert res["metrics"]["ndcg"] == pytest.approx(ev.ndcg(torch.tensor([o["ranks"]]), torch.tensor([s["relevance"]])))


def test_text_to_image_readers(tmp_path):
    root = tmp_path
    _json(root / "coco/annotations/captions_val2014.json", {"annotations": [
        {"image_id": 5, "id": 1, "caption": "A Red circle"}, {"image_id": 5, "id": 2, "caption": "second"},
        {"image_id": 9, "id": 3, "caption": "Two squares"}]})
    got = ev.read_coco_t2i(str(root))
    assert [(s["id"], s["caption"]) for s in got] == [(0, "a red circle"), (1, "two squares")]
    assert got[1]["image"] == str(root / "coco/val2014/COCO_val2014_000000000009.jpg")
    os.makedirs(root / "lncoco")
    with open(root / "lncoco/coco_val_captions.jsonl", "w") as f:
        for image_id, cap in ((1, "a"), (1, "b"), (1, "c"), (2, "d")):
            f.write(json.dumps({"image_id": image_id, "caption": cap}) + "\n")
    assert [s["caption"] for s in ev.read_lncoco(str(root), total_length=2)] == ["a", "b"]     # the first ones
    got = ev.read_lncoco(str(root), total_length=4000)
    assert [s["caption"] for s in got[:4]] == ["a", "b", "c", "d"] and len(got) == 4000
    assert got[3]["image"] == str(root / "coco/val2017/000000000002.jpg")
    # oversampling is inverse to caption count per image: image 2's one caption is drawn about as often as
    # image 1's three together (half of the extra draws each)
    extra = [s["caption"] for s in got[4:]]
    assert abs(extra.count("d") / len(extra) - 0.5) < 0.05


def test_readers_name_the_missing_file(tmp_path):
    with pytest.raises(ValueError, match="coco_karpathy_test.json"):
        ev.read_coco_karpathy(str(tmp_path))
    _json(tmp_path / "VizWiz/val.json", [{"image": "x.jpg", "question": "q"}])
    with pytest.raises(ValueError, match=r"val.json\[0\]: missing field 'answers'"):
        ev.read_vizwiz(str(tmp_path))


def _rank_worker(rank, world, root, port, result_path, score_fails=False):
    # a cheap task in place of a model: each rank reports which samples it was given
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)

    def score(root, outputs, args):
        if score_fails:
            raise RuntimeError("the score failed")
        return {"n": len(outputs)}

    ev.TASKS["rank_probe"] = ev.Task(ev.read_vizwiz, lambda m, t, samples, a: [{"id": s["id"], "rank": rank}
                                                                           for s in samples], score)
    args = _args("rank_probe", root, limit=5)
    args.out = result_path
    try:
        res = ev.evaluate(None, None, args, rank, world)
    except RuntimeError:
        assert score_fails and rank == 0
        return
    if rank == 0:
        ev.write_json_atomic(result_path, res)
    else:
        assert res is None
    torch.distributed.destroy_process_group()


def test_torchrun_split_is_rank_strided_and_gathered_on_rank_0(tmp_path):
    _json(tmp_path / "VizWiz/val.json", [{"image": f"{i}.jpg", "question": "q", "answers": ["a"]} for i in range(7)])
    _image(str(tmp_path / "VizWiz/val/0.jpg"), 0)        # a set without any of its images is refused up front
    port = 29500 + os.getpid() % 1000
    # fork: the children need no fresh import of torch (they do no tensor maths, so forked thread pools are safe)
    torch.multiprocessing.start_processes(_rank_worker, args=(2, str(tmp_path), port, str(tmp_path / "r.json")),
                                          nprocs=2, start_method="fork")
    res = json.load(open(tmp_path / "r.json"))
    assert res["metrics"] == {"n": 5} and res["config"]["world_size"] == 2
    # rank 0 took samples 0, 2, 4 and rank 1 took 1, 3 (the limit applies before the split)
    assert [(o["id"], o["rank"]) for o in res["samples"]] == [("0.jpg", 0), ("2.jpg", 0), ("4.jpg", 0),
                                                              ("1.jpg", 1), ("3.jpg", 1)]


def test_a_failing_score_under_torchrun_keeps_each_ranks_predictions_in_its_partial_file(tmp_path):
    """Rank 0 gathers every rank's predictions, then its score fails: each rank's partial file holds that rank's
    predictions (the ones --resume on that rank matches to its samples), none removed."""
    _json(tmp_path / "VizWiz/val.json", [{"image": f"{i}.jpg", "question": "q", "answers": ["a"]} for i in range(7)])
    _image(str(tmp_path / "VizWiz/val/0.jpg"), 0)
    port = 29500 + (os.getpid() + 500) % 1000
    torch.multiprocessing.start_processes(_rank_worker, args=(2, str(tmp_path), port, str(tmp_path / "r.json"), True),
                                          nprocs=2, start_method="fork")
    for rank, ids in ((0, ["0.jpg", "2.jpg", "4.jpg"]), (1, ["1.jpg", "3.jpg"])):
        kept = json.loads((tmp_path / f"r.partial.rank{rank}.json").read_text())
        assert [o["id"] for o in kept["samples"]] == ids
    assert not (tmp_path / "r.json").exists()


def test_command_line_writes_config_metrics_and_samples(tmp_path, monkeypatch, demo_model_and_tokenizer,
                                                        short_generation):
    model, _ = demo_model_and_tokenizer
    # from_pretrained has its own tests; main() picks CUDA where there is one
    monkeypatch.setattr(ev, "load_model", lambda init_from, dtype, device, *_: copy.deepcopy(model).to(device))
    _json(tmp_path / "VizWiz/val.json", [{"image": "a.jpg", "question": "What is it?", "answers": ["red"] * 10},
                                         {"image": "b.jpg", "question": "Colour?", "answers": ["blue"] * 10}])
    _image(str(tmp_path / "VizWiz/val/a.jpg"), 0)
    out = tmp_path / "res.json"
    ev.main(["--task=vizwiz_vqa", f"--data_root={tmp_path}", f"--init_from={tmp_path}", "--limit=1",
            f"--tokenizer={data.DEMO_TOKENIZER_PATH}", f"--out={out}"])
    res = json.load(open(out))
    assert res["task"] == "vizwiz_vqa" and res["num_samples"] == 1 and res["config"]["limit"] == 1
    assert res["config"]["generation"]["num_beams"] == ev.VQA_GENERATION["num_beams"]
    assert set(res["samples"][0]) == {"id", "question", "generated", "answer", "accuracy"}
    assert res["metrics"]["overall_accuracy"] == 100 * res["samples"][0]["accuracy"]


def _t2i_layout(root, captions):
    """COCO val2014 and LN-COCO layouts over the same 64x64 PNG images; returns {caption: image tensor}."""
    _json(root / "coco/annotations/captions_val2014.json", {"annotations": [
        {"image_id": k, "id": k, "caption": c} for k, c in captions.items()]})
    os.makedirs(root / "lncoco")
    with open(root / "lncoco/coco_val_captions.jsonl", "w") as f:
        for k, c in captions.items():
            f.write(json.dumps({"image_id": k, "caption": c}) + "\n")
    truth = {}
    for k, c in captions.items():
        arr = np.random.default_rng(k).integers(0, 256, (64, 64, 3), dtype=np.uint8)
        for path in (root / f"coco/val2014/COCO_val2014_{k:012d}.jpg", root / f"coco/val2017/{k:012d}.jpg"):
            os.makedirs(path.parent, exist_ok=True)
            Image.fromarray(arr).save(path, format="PNG")      # lossless, whatever the extension says
        truth[c] = torch.from_numpy(arr).permute(2, 0, 1).float() / 255
    return truth


def test_text_to_image_task_prompts_saves_and_scores_fid(tmp_path, monkeypatch, demo_model_and_tokenizer):
    """LN-COCO plumbing with a stand-in decoder that returns each caption's own ground-truth image: prompts are
    "{caption} <soi><image>..." right-padded, images are written as PNG, and FID of a set against itself is 0.
    (Inception itself is tested above; here 2x2-pooled pixels stand in for its features, to stay fast.)"""
    model, tok = copy.deepcopy(demo_model_and_tokenizer[0]), demo_model_and_tokenizer[1]   # patched below
    captions = {3: "a red circle", 8: "two blue squares on the left"}
    truth = _t2i_layout(tmp_path, captions)
    seen = []

    def generate_images(batch, steps, guidance_scale, sampler, seed, num_images_per_context):
        assert num_images_per_context == 1
        seen.append(batch)
        texts = [tok.decode(row[m.bool()].tolist()) for row, m in zip(batch["text_ids"], batch["attention_mask"])]
        return {"image": torch.stack([truth[t] for t in texts])}

    monkeypatch.setattr(model, "generate_images", generate_images)
    args = _args("lncoco", tmp_path, limit=2)
    args.out = str(tmp_path / "r.json")
    monkeypatch.setattr(ev, "load_inception", lambda path: None)    # main checks it before the model loads
    monkeypatch.setattr(ev, "inception_features",
                        lambda net, images, device="cpu": torch.nn.functional.adaptive_avg_pool2d(
                            images, 2).flatten(1).double().numpy())
    res = ev.evaluate(model, tok, args)
    (batch,) = seen
    want = [tok.encode(c + " " + data.image_placeholder(model.cfg.num_img_token)) for c in captions.values()]
    for row, m, w in zip(batch["text_ids"].tolist(), batch["attention_mask"].tolist(), want):
        assert row[:len(w)] == w and m == [1] * len(w) + [0] * (len(row) - len(w))       # right-padded
    assert [os.path.basename(o["generated"]) for o in res["samples"]] == ["00000.png", "00001.png"]
    assert res["metrics"]["FID"] == pytest.approx(0.0, abs=1e-9)


def test_text_to_image_prompt_drops_the_captions_leading_spaces(tmp_path, monkeypatch, demo_model_and_tokenizer):
    """The original strips its text-to-image prompt before tokenizing, so "  a red circle" is read as "a red
    circle": bos, the caption's words, soi, the image tokens (no "▁" pieces for the spaces)."""
    model, tok = copy.deepcopy(demo_model_and_tokenizer[0]), demo_model_and_tokenizer[1]   # patched below
    _t2i_layout(tmp_path, {3: "  a red circle", 8: "two blue squares"})
    seen = []

    def generate_images(batch, steps, guidance_scale, sampler, seed, num_images_per_context):
        seen.extend(row[m.bool()].tolist() for row, m in zip(batch["text_ids"], batch["attention_mask"]))
        return {"image": torch.rand(len(batch["text_ids"]), 3, 64, 64, generator=torch.Generator().manual_seed(0))}

    monkeypatch.setattr(model, "generate_images", generate_images)
    monkeypatch.setattr(ev, "load_inception", lambda path: None)
    monkeypatch.setattr(ev, "inception_features", lambda net, images, device="cpu": images.flatten(1)[:, :4].numpy())
    args = _args("lncoco", tmp_path, limit=2)
    args.out = str(tmp_path / "r.json")
    ev.evaluate(model, tok, args)
    n = model.cfg.num_img_token
    want = [tok.bos_id] + tok.encode("a red circle", add_bos=False) + [tok.soi_id] + [tok.image_id] * n
    assert seen[0] == want
    assert len(tok.encode("  a red circle " + data.image_placeholder(n))) > len(want)    # the spaces would add pieces


def test_coco_text_to_image_keeps_the_clip_best_of_8(tmp_path, monkeypatch, demo_model_and_tokenizer):
    import tokenizers
    model, tok = copy.deepcopy(demo_model_and_tokenizer[0]), demo_model_and_tokenizer[1]   # patched below
    captions = {3: "a red circle", 8: "two blue squares"}
    _t2i_layout(tmp_path, captions)
    words = ["<|startoftext|>", "<|endoftext|>", "[UNK]"] + sorted({w for c in captions.values() for w in c.split()})
    clip_tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, "[UNK]"))
    clip_tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    torch.manual_seed(0)
    scorer = ev.CLIPScorer(vocab=len(words), **TINY_CLIP).eval()
    monkeypatch.setattr(ev, "load_clip", lambda path: (scorer, clip_tok))
    monkeypatch.setattr(ev, "load_inception", lambda path: None)
    monkeypatch.setattr(ev, "inception_features",
                        lambda net, images, device="cpu": images.flatten(1)[:, :8].double().numpy())
    drawn = []

    def generate_images(batch, steps, guidance_scale, sampler, seed, num_images_per_context):
        assert len(seed) == batch["text_ids"].shape[0]                   # one seed per caption
        drawn.extend(torch.stack([torch.rand(3, 40, 40, generator=torch.Generator().manual_seed(s + k))
                                  for s in seed]) for k in range(num_images_per_context))
        return {"image": torch.cat(drawn[-num_images_per_context:])}                 # copy-major

    monkeypatch.setattr(model, "generate_images", generate_images)
    args = _args("coco_t2i", tmp_path)
    args.out = str(tmp_path / "r.json")
    res = ev.evaluate(model, tok, args)
    assert len(drawn) == 8 and res["config"]["generation"]["samples_per_caption"] == 8
    for b, (o, caption) in enumerate(zip(res["samples"], captions.values())):
        # score every candidate of this caption on its own, as CLIP would
        ids = ev.clip_text_ids(clip_tok, caption)
        assert ids[0] == 0 and ids[-1] == 1
        cands = [(d[b] * 255 + 0.5).to(torch.uint8) for d in drawn]
        with torch.no_grad():
            text = scorer.text_features(torch.tensor([ids]), torch.tensor([len(ids) - 1]))
            pix = torch.stack([ev.clip_image_tensor(Image.fromarray(c.permute(1, 2, 0).numpy()), 28) for c in cands])
            best = int((scorer.image_features(pix) @ text[0]).argmax())
        assert o["candidate"] == best
        assert np.array_equal(np.asarray(Image.open(o["generated"])), cands[best].permute(1, 2, 0).numpy())


def test_text_to_image_end_to_end_with_the_tiny_model(tmp_path, monkeypatch, demo_model_and_tokenizer):
    """LN-COCO through the tiny model's own image decoder (2 steps; the best-of-8 path is covered above)."""
    model, tok = demo_model_and_tokenizer
    _t2i_layout(tmp_path, {3: "a red circle", 8: "two blue squares"})
    monkeypatch.setattr(ev, "load_inception", lambda path: None)
    monkeypatch.setattr(ev, "inception_features",
                        lambda net, images, device="cpu": torch.nn.functional.adaptive_avg_pool2d(
                            images, 2).flatten(1).double().numpy())
    args = _args("lncoco", tmp_path, limit=2)
    args.out = str(tmp_path / "lncoco.json")
    res = ev.evaluate(model, tok, args)                                   # both captions in one batch of 2
    for o in res["samples"]:
        with Image.open(o["generated"]) as im:
            assert im.mode == "RGB" and im.size == (model.cfg.vision.image_size,) * 2
        assert o["candidate"] == 0
    assert math.isfinite(res["metrics"]["FID"]) and res["metrics"]["FID"] > 0
    with pytest.raises(ValueError, match="at least 2"):
        ev.feature_statistics(np.zeros((1, 4)))


def test_text_to_image_draws_depend_on_the_caption_not_its_batch(tmp_path, monkeypatch, demo_model_and_tokenizer):
    """Each caption draws from its own seed (--seed and its id), so its image is the same drawn beside another
    caption or alone."""
    model, tok = demo_model_and_tokenizer
    _t2i_layout(tmp_path, {3: "a red circle", 8: "two blue squares"})
    monkeypatch.setattr(ev, "load_inception", lambda path: None)
    args, drawn = _args("lncoco", tmp_path, limit=2), {}
    samples = ev.load_samples(args)
    for start in (0, 1):
        args.image_dir = str(tmp_path / f"from{start}")
        for s in ev.TASKS["lncoco"].predict(model, tok, samples[start:], args):
            drawn.setdefault(s["id"], []).append(np.asarray(Image.open(s["generated"])))
    first, alone = (x.astype(int) for x in drawn[1])
    # the same noise; a batch of two rounds its float32 sums otherwise, which can move a pixel one 8-bit level
    # (hence --resume redoes a batch whole)
    assert np.abs(first - alone).max() <= 1
    assert np.abs(drawn[0][0].astype(int) - first).max() > 16     # two captions, two seeds: not one image twice


def _tiny_clip(monkeypatch):
    """A tiny random CLIP in place of ViT-L/14 (its weights are not here; its module is tested above)."""
    torch.manual_seed(0)
    scorer = ev.CLIPScorer(vocab=10, **TINY_CLIP).eval()
    monkeypatch.setattr(ev, "load_clip", lambda path: (scorer, None))
    monkeypatch.setattr(ev, "load_inception", lambda path: None)
    monkeypatch.setattr(ev, "inception_features",
                        lambda net, images, device="cpu": torch.nn.functional.adaptive_avg_pool2d(
                            images, 2).flatten(1).double().numpy())
    return scorer


@pytest.mark.parametrize("task", ["vist", "pororo", "flintstones"])
def test_storytelling_tasks_end_to_end(task, tmp_path, monkeypatch, demo_model_and_tokenizer):
    """The test split's stories through the tiny model: one target frame per story (two rounds each with
    round_range=all), drawn with and without MMFS, written as PNG with the ground-truth frame, then FID and CLIP
    image similarity (tiny stand-ins for Inception and CLIP)."""
    model, tok = demo_model_and_tokenizer
    scorer = _tiny_clip(monkeypatch)
    base = str(tmp_path / task)
    {"vist": lambda: write_vist(base, "test"), "pororo": lambda: write_pororo(base),
     "flintstones": lambda: write_flintstones(base)}[task]()
    n_frames = 3 if task == "vist" else 5
    for round_range, per_story in (("last", 1), ("all", n_frames - 1)):
        args = _args(task, tmp_path)
        args.round_range, args.out = round_range, str(tmp_path / f"{task}_{round_range}.json")
        res = ev.evaluate(model, tok, args)
        assert res["num_samples"] == 2 and all(len(o["targets"]) == per_story for o in res["samples"])
        for o in res["samples"]:
            for t in o["targets"]:
                assert t["frame"] == (n_frames - 1 if round_range == "last" else int(t["round"].rsplit("_", 1)[1]) - 1)
                for key in ("generated", "generated_without_mmfs"):
                    with Image.open(t[key]) as im:
                        assert im.size == (model.cfg.image_decoder.image_size,) * 2
                with Image.open(t["image"]) as im:
                    if task == "vist":
                        assert t["strip_frame"] is None and im.size == (40, 30)
                    else:                                     # the strip's drawn frame, cut out
                        assert im.size == (128, 128) and t["strip_frame"] in (0, 1)
        m = res["metrics"]
        assert set(m) == {"FID", "FID_without_mmfs", "clip_image_similarity", "clip_image_similarity_without_mmfs"}
        assert all(math.isfinite(v) for v in m.values())
        t = res["samples"][0]["targets"][0]
        with torch.no_grad():
            a, b = (scorer.image_features(ev.clip_image_tensor(Image.open(p).convert("RGB"), 28)[None])
                    for p in (t["image"], t["generated"]))
        assert t["clip_similarity"] == pytest.approx(float((a * b).sum()), abs=1e-5)
    args = _args(task, tmp_path)
    args.context_type = "current"
    samples = ev.load_samples(args)
    rows = ev._story_rows(samples[0], tok, model.cfg, args)
    assert len(rows) == 1 and rows[0].image_targets.tolist() == [True]


def test_score_story_scores_the_frames_drawn_with_and_without_mmfs_each_against_the_truth(tmp_path, monkeypatch):
    """With MMFS every drawn frame here is its ground truth (FID 0, CLIP similarity 1); without, another image: its
    FID is positive and its similarity the mean of the pairs' cosine similarities (tiny stand-in networks)."""
    scorer = _tiny_clip(monkeypatch)
    real, other = [], []
    for i in range(3):
        _image(str(tmp_path / f"real{i}.png"), i)
        _image(str(tmp_path / f"other{i}.png"), 10 + i)
        real.append(str(tmp_path / f"real{i}.png"))
        other.append(str(tmp_path / f"other{i}.png"))
    outputs = [{"id": 0, "targets": [{"image": r, "generated": r, "generated_without_mmfs": o}
                                     for r, o in zip(real, other)]}]
    m = ev.score_story(None, outputs, _args("vist", tmp_path))
    feature = lambda p: scorer.image_features(ev.clip_image_tensor(Image.open(p).convert("RGB"), 28)[None])
    with torch.no_grad():
        sims = [float((feature(r) * feature(o)).sum()) for r, o in zip(real, other)]
    assert abs(m["FID"]) < 1e-6 and m["clip_image_similarity"] == pytest.approx(1.0, abs=1e-5)
    assert m["FID_without_mmfs"] > 1e-3
    assert m["clip_image_similarity_without_mmfs"] == pytest.approx(sum(sims) / 3, abs=1e-5)
    assert [t["clip_similarity_without_mmfs"] for t in outputs[0]["targets"]] == pytest.approx(sims, abs=1e-5)


def test_storytelling_draws_with_and_without_mmfs_in_one_call(tmp_path, monkeypatch, demo_model_and_tokenizer):
    model, tok = copy.deepcopy(demo_model_and_tokenizer[0]), demo_model_and_tokenizer[1]   # patched below
    _tiny_clip(monkeypatch)
    write_vist(str(tmp_path / "vist"), "test")
    calls = []

    def generate_images(batch, steps, guidance_scale, sampler, seed, progress, use_mmfs):
        calls.append((batch["target_image_idxs"].tolist(), use_mmfs, len(seed)))
        n = len(batch["target_image_idxs"])
        return {"image": torch.stack([torch.full((3, 8, 8), v) for v in [0.2] * n + [0.8] * n])}

    monkeypatch.setattr(model, "generate_images", generate_images)
    res = ev.evaluate(model, tok, _args("vist", tmp_path))
    assert calls == [([2, 5], "both", 2)]                  # both stories' last frames, one call
    for o in res["samples"]:
        (t,) = o["targets"]
        assert np.asarray(Image.open(t["generated"])).max() == 51
        assert np.asarray(Image.open(t["generated_without_mmfs"])).max() == 204


class _ConstantSegmenter(torch.nn.Module):
    def forward(self, x):                                 # every pixel: class index 0 (label 1)
        scores = torch.zeros(x.shape[0], 150, 4, 4)
        scores[:, 0] = 1.0
        return scores + 0 * x.mean()


def test_ade20k_task_needs_a_segmenter_then_scores_miou(tmp_path, monkeypatch, demo_model_and_tokenizer):
    model, tok = demo_model_and_tokenizer
    base = tmp_path / "ADEChallengeData2016"
    os.makedirs(base / "images/validation")
    os.makedirs(base / "annotations/validation")
    labels = np.zeros((30, 40), np.uint8)
    labels[:, :10], labels[:, 10:30] = 1, 2               # 300 pixels of class 1, 600 of class 2, 300 "other"
    for name in ("a", "b"):
        Image.fromarray(labels).save(base / f"annotations/validation/{name}.png")
    _json(base / "validation.json", [{"image_id": "a", "caption": "a wall"}, {"image_id": "b", "caption": "a door"}])
    monkeypatch.setattr(ev, "load_model", lambda *a: pytest.fail("the model loads after the check"))
    with pytest.raises(ValueError, match=r"ade20k's mIoU needs a segmentation network .* --segmenter="):
        ev.main(["--task=ade20k", f"--data_root={tmp_path}", f"--init_from={tmp_path}",
                 f"--tokenizer={data.DEMO_TOKENIZER_PATH}"])
    path = str(tmp_path / "seg.pt2")
    h, w = torch.export.Dim("h", min=8, max=4096), torch.export.Dim("w", min=8, max=4096)
    torch.export.save(torch.export.export(_ConstantSegmenter(), (torch.zeros(1, 3, 30, 40),),
                                          dynamic_shapes={"x": {2: h, 3: w}}), path)
    args = _args("ade20k", tmp_path)
    args.segmenter = path
    res = ev.evaluate(model, tok, args)
    assert [o["id"] for o in res["samples"]] == [0, 1]
    for o in res["samples"]:
        with Image.open(o["generated"]) as im:
            assert im.size == (model.cfg.image_decoder.image_size,) * 2
    # label 1 everywhere the truth is labelled: class 1 IoU 300 / 900, every other class 0, mean over 150
    assert res["metrics"]["mIoU"] == pytest.approx((300 / 900) / 150)


def test_demo_qa_scoring_parses_answers_up_to_the_full_stop():
    assert [ev.parse_demo_answer(t) for t in ("red.", " Top  Left. the", "two", "a red circle at the centre.",
                                               "", "bottom right.</s>")] == \
        ["red", "top left", "two", "a red circle at the centre", "", "bottom right"]
    outputs = [{"kind": "colour", "answer": "red", "predicted": ev.parse_demo_answer("red. blue.")},
               {"kind": "colour", "answer": "red", "predicted": ev.parse_demo_answer("a red circle.")},
               {"kind": "where", "answer": "top left", "predicted": ev.parse_demo_answer("top left")},
               {"kind": "count", "answer": "three", "predicted": ev.parse_demo_answer("two.")}]
    assert ev.score_demo_qa(None, outputs, None) == {"accuracy": 0.5, "accuracy_colour": 0.5, "accuracy_where": 1.0,
                                                     "accuracy_count": 0.0}


def test_demo_qa_task_asks_the_test_questions(tmp_path, saved_tiny_model):
    out = tmp_path / "demo_qa.json"
    ev.main(["--task=demo_qa", f"--init_from={saved_tiny_model}", f"--tokenizer={data.DEMO_TOKENIZER_PATH}",
             "--limit=3", "--batch_size=2", f"--out={out}"])
    res = json.loads(out.read_text())
    assert res["num_samples"] == 3 and 0.0 <= res["metrics"]["accuracy"] <= 1.0
    for i, o in enumerate(res["samples"]):
        q = data.make_question(data.SPLIT_SEED_BASE["test"] + i)
        assert (o["seed"], o["question"], o["answer"]) == (q.seed, q.question, q.answer)
        assert o["predicted"] == ev.parse_demo_answer(o["output"])


# ----------------------------------------------------------------------------------------------------------------
# eval.py: the command line: one line and exit 2 for a user mistake, before the model loads; skipped samples
# counted; the predictions made before a crash kept
# ----------------------------------------------------------------------------------------------------------------


def _vizwiz_layout(root, names, missing=(), corrupt=(), answers=None):
    """VizWiz val, one question per image; images in `missing` are not written, those in `corrupt` are no image."""
    _json(root / "VizWiz/val.json", [{"image": n, "question": f"What is {n}?",
                                      "answers": ["red"] * 10 if answers is None else answers} for n in names])
    os.makedirs(root / "VizWiz/val", exist_ok=True)
    for i, n in enumerate(names):
        if n in corrupt:
            (root / "VizWiz/val" / n).write_bytes(b"not an image")
        elif n not in missing:
            _image(str(root / "VizWiz/val" / n), i)


def test_eval_help_gives_every_option_a_meaning(capsys):
    with pytest.raises(SystemExit) as e:
        mmi.run_script(ev.main, ["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    entries = re.split(r"\n  (?=-)", out.split("options:")[1].split("Layout under --data_root")[0])[1:]
    assert [x.split()[0].rstrip(",") for x in entries] == [
        "-h", "--task", "--data_root", "--init_from", "--tokenizer", "--limit", "--offset", "--out", "--resume",
        "--batch_size", "--device",
        "--dtype", "--quantize", "--inception", "--clip", "--image_dir", "--steps", "--guidance_scale", "--seed",
        "--context_type", "--round_range", "--segmenter", "--readme"]
    for x in entries:                            # the flag, its value's name or choices, then words that explain it
        assert len(re.sub(r"\{[^}]*\}|\b[A-Z_]{2,}\b", "", x).split()) >= 4, x
    assert "default: out/eval/<task>.json" in " ".join(out.split())
    assert "VizWiz/val.json" in out                          # the layout under --data_root


@pytest.mark.parametrize("case", ["task", "limit", "device", "no_data_root", "no_init_from", "no_annotations",
                                  "no_references", "no_images", "no_inception", "damaged_inception", "not_clip",
                                  "string_answers", "readme_slice",
                                  "offset_past_split", "bad_tokenizer", "tokenizer_folder", "out_in_a_file",
                                  "out_a_folder", "out_in_proc", "image_dir_in_proc", "nested_json", "seed",
                                  "guidance_nan"])
def test_eval_user_mistake_is_one_line_before_the_model_loads(case, tmp_path, monkeypatch, capsys):
    loads = []
    monkeypatch.setattr(ev, "load_model", lambda *a: loads.append(a))
    root = str(tmp_path)
    given = [f"--data_root={root}", f"--init_from={root}", f"--tokenizer={data.DEMO_TOKENIZER_PATH}"]
    _vizwiz_layout(tmp_path, ["a.jpg"])
    if case == "task":
        argv, want = ["--task=vqa"], "argument --task: invalid choice: 'vqa' (choose from 'ade20k', 'coco_karpathy'"
    elif case == "limit":
        argv = ["--task=vizwiz_vqa", "--limit=ten"] + given
        want = "argument --limit: expected a positive integer, got 'ten'"
    elif case == "device":
        argv, want = ["--task=vizwiz_vqa", "--device=gpu"] + given, "--device=gpu: expected auto, cpu, cuda or cuda:N"
    elif case == "no_data_root":
        argv, want = ["--task=vizwiz_vqa", f"--init_from={root}"], "--task=vizwiz_vqa needs --data_root"
    elif case == "no_init_from":
        argv, want = ["--task=vizwiz_vqa", f"--data_root={root}"], "--task=vizwiz_vqa needs --init_from"
    elif case == "no_annotations":
        argv = ["--task=vqav2"] + given
        want = f"{root}/VQAv2/v2_mscoco_val2014_annotations.json: VQAv2 val annotations not found"
    elif case == "no_references":                   # read by the score, at the end: checked before the model loads
        name = "val2014/COCO_val2014_000000000042.jpg"
        _json(tmp_path / "coco/annotations/coco_karpathy_test.json", [{"image": name}])
        _image(str(tmp_path / "coco" / name), 0)
        argv = ["--task=coco_karpathy"] + given
        want = f"{root}/coco/annotations/coco_karpathy_test_gt.json: caption references not found"
    elif case == "no_images":
        os.remove(tmp_path / "VizWiz/val/a.jpg")
        argv = ["--task=vizwiz_vqa"] + given
        want = f"--task=vizwiz_vqa: none of the 1 images is there, e.g. {root}/VizWiz/val/a.jpg"
    elif case == "no_inception":
        _t2i_layout(tmp_path, {3: "a red circle", 8: "two blue squares"})
        argv, want = ["--task=lncoco", "--inception=nowhere.pth"] + given, "not found at 'nowhere.pth'"
    elif case == "damaged_inception":                # read at the end, by the score: checked whole before
        _t2i_layout(tmp_path, {3: "a red circle", 8: "two blue squares"})
        (tmp_path / "i.pth").write_bytes(b"")
        argv, want = ["--task=lncoco", f"--inception={tmp_path / 'i.pth'}"] + given, \
            f"{tmp_path / 'i.pth'}: not a readable PyTorch weights file"
    elif case == "not_clip":
        _t2i_layout(tmp_path, {3: "a red circle", 8: "two blue squares"})
        torch.save(ev.FIDInceptionV3().state_dict(), tmp_path / "i.pth")
        _save_unk_tokenizer(tmp_path / "tokenizer.json")
        save_file({"text_projection.weight": torch.zeros(2, 2)}, tmp_path / "model.safetensors")
        argv = ["--task=coco_t2i", f"--inception={tmp_path / 'i.pth'}", f"--clip={tmp_path}"] + given
        want = f"{tmp_path / 'model.safetensors'}: not CLIP ViT-L/14; missing keys ['"
    elif case == "offset_past_split":               # the demo's test split holds 10,000 stories
        argv, want = ["--offset=9999", "--limit=2"], "stories 9999..10000 of the demo's test split, which holds 10,000"
    elif case == "readme_slice":                     # README's scoreboard is the one of `python eval.py` alone
        argv, want = ["--readme", "--limit=4", "--seed=0", "--offset=3"], "(given: --limit=4 --offset=3)"
    elif case == "bad_tokenizer":
        (tmp_path / "tokenizer.model").write_bytes(b"garbage")
        argv = ["--task=vizwiz_vqa", f"--data_root={root}", f"--init_from={root}"]
        want = f"{root}/tokenizer.model: cannot be read as a SentencePiece tokenizer.model"
    elif case == "tokenizer_folder":                 # not passed over for another tokenizer
        (tmp_path / "tokenizer.model").mkdir()
        argv = ["--task=vizwiz_vqa", f"--data_root={root}", f"--init_from={root}"]
        want = f"{root}/tokenizer.model: is a folder, expected a SentencePiece tokenizer.model"
    elif case == "out_in_a_file":
        argv, want = ["--task=vizwiz_vqa", f"--out={root}/VizWiz/val.json/x.json"] + given, \
            f"--out={root}/VizWiz/val.json/x.json: {root}/VizWiz/val.json is a file, expected a folder"
    elif case == "out_a_folder":
        argv, want = ["--task=vizwiz_vqa", f"--out={root}"] + given, \
            f"--out={root}: is a folder, expected the path of a file to write"
    elif case == "out_in_proc":
        argv, want = ["--task=vizwiz_vqa", "--out=/proc/x.json"] + given, \
            "--out=/proc/x.json: cannot create a file in /proc"
    elif case == "image_dir_in_proc":
        _t2i_layout(tmp_path, {3: "a red circle", 8: "two blue squares"})
        argv, want = ["--task=lncoco", "--image_dir=/proc/images"] + given, \
            "--image_dir=/proc/images: cannot create a file in /proc"
    elif case == "seed":
        argv, want = ["--seed=99999999999999999999999"], "argument --seed: expected an integer in [0, 2**63)"
    elif case == "guidance_nan":
        argv, want = ["--guidance_scale=nan"], "argument --guidance_scale: expected a finite number, got 'nan'"
    elif case == "nested_json":
        (tmp_path / "coco/annotations").mkdir(parents=True)
        (tmp_path / "coco/annotations/coco_karpathy_test.json").write_text("[" * 200_000)
        argv = ["--task=coco_karpathy"] + given
        want = f"{root}/coco/annotations/coco_karpathy_test.json: Karpathy test split is nested too deeply"
    else:
        _vizwiz_layout(tmp_path, ["a.jpg"], answers="red")
        argv = ["--task=vizwiz_vqa"] + given
        want = f"{root}/VizWiz/val.json[0]: field 'answers' is 'red', expected a list"
    assert mmi.run_script(ev.main, argv) == 2
    captured = capsys.readouterr()
    assert ": error: " in captured.err and want in captured.err, captured.err
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err
    assert loads == []


def test_eval_steps_beyond_the_models_timesteps_is_one_line(tmp_path, capsys):
    """A drawing task asked for more sampling steps than the model's schedule has timesteps stops with one line
    naming --steps and the bound, exit 2, before any image or result is written."""
    _t2i_layout(tmp_path, {3: "a red circle", 8: "two blue squares"})
    torch.save(ev.FIDInceptionV3().state_dict(), tmp_path / ev.FID_WEIGHTS_NAME)    # random weights: read, not used
    argv = ["--task=lncoco", f"--data_root={tmp_path}", f"--inception={tmp_path / ev.FID_WEIGHTS_NAME}",
            f"--init_from={ev.DEMO_MODEL}", f"--out={tmp_path / 'r.json'}", "--steps=1001", "--device=cpu"]
    assert mmi.run_script(ev.main, argv) == 2
    err = capsys.readouterr().err
    assert "error: --steps=1001: expected at most 1000, the model's diffusion timesteps" in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not os.path.exists(tmp_path / "r.json") and not os.path.exists(tmp_path / "r_images")


def test_eval_runs_started_together_keep_both_results(tmp_path, monkeypatch, capsys):
    """Two runs that chose the same results file (both started before either finished) both keep their results:
    the one that finishes second writes <out>-2.json and says so, never over the other's."""
    out = tmp_path / "r.json"

    def evaluate(model, tokenizer, args, rank, world, samples, kept):
        out.write_text("the other run's results")          # written while this run predicted
        return {"num_samples": 1, "metrics": {"accuracy": 1.0}, "skipped": {}, "skipped_samples": []}

    monkeypatch.setattr(ev, "evaluate", evaluate)
    assert ev.main(["--task=demo_qa", "--limit=1", f"--out={out}", "--device=cpu"]) == 0
    assert out.read_text() == "the other run's results"
    assert json.loads((tmp_path / "r-2.json").read_text())["metrics"] == {"accuracy": 1.0}
    assert sorted(os.listdir(tmp_path)) == ["r-2.json", "r.json"]              # no temporary left
    assert capsys.readouterr().out.endswith(f"wrote {tmp_path / 'r-2.json'}\n")


def test_eval_script_reports_a_malformed_file_in_one_line_exit_2(tmp_path):
    _vizwiz_layout(tmp_path, ["a.jpg"], answers=[])
    argv = ["--task=vizwiz_vqa", f"--data_root={tmp_path}", f"--init_from={tmp_path}",
            f"--tokenizer={data.DEMO_TOKENIZER_PATH}"]
    proc = subprocess.run([sys.executable, os.path.join(HERE, "eval.py"), *argv], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == (f"eval.py: error: {tmp_path}/VizWiz/val.json[0]: field 'answers' is empty (VQA accuracy "
                           f"needs the human answers)\n")


def _vqav2_layout(root, second):
    """VQAv2 val with two questions; `second` updates the second annotation record."""
    anns = [{"question_id": 301, "image_id": 3, "answers": _vqa_answers(["red"] * 10)},
            {"question_id": 401, "image_id": 4, "answers": _vqa_answers(["2"] * 10)}]
    anns[1].update(second)
    _json(root / "VQAv2/v2_mscoco_val2014_annotations.json", {"annotations": anns})
    _json(root / "VQAv2/v2_OpenEnded_mscoco_val2014_questions.json", {"questions": [
        {"question_id": 301, "image_id": 3, "question": "Colour?"}, {"question_id": 401, "image_id": 4,
                                                                    "question": "How many?"}]})
    return str(root / "VQAv2/v2_mscoco_val2014_annotations.json")


@pytest.mark.parametrize("second, want", [
    ({"answers": "two"}, "field 'answers' is 'two', expected a list"),         # not 3 one-letter answers
    ({"answers": []}, "field 'answers' is empty"),                             # not a division by zero
    ({"answers": [{"answer": 2}]}, r"answers\[0\] is \{'answer': 2\}, expected a string"),
    ({"image_id": "4"}, "field 'image_id' is '4', expected an integer"),
    ({"question_id": None}, "field 'question_id' is None, expected an integer or a string")],
    ids=["answers_a_string", "answers_empty", "answer_a_number", "image_id_a_string", "question_id_null"])
def test_malformed_vqa_record_names_file_record_and_field(second, want, tmp_path):
    path = _vqav2_layout(tmp_path, second)
    with pytest.raises(mmi.InputError, match=re.escape(path) + r": annotations\[1\]: " + want):
        ev.read_vqav2(str(tmp_path))


def test_malformed_other_records_name_file_record_and_field(tmp_path):
    _json(tmp_path / "coco/annotations/coco_karpathy_test.json", [{"image": "val2014/COCO_val2014_000000000042.jpg"},
                                                                 {"image": "val2014/street.jpg"}])
    with pytest.raises(mmi.InputError, match=r"coco_karpathy_test.json\[1\]: field 'image' is 'val2014/street.jpg', "
                                             r"expected a COCO file name ending in its image id"):
        ev.read_coco_karpathy(str(tmp_path))
    _json(tmp_path / "coco/annotations/captions_val2014.json", {"annotations": [{"image_id": "5", "caption": "x"}]})
    with pytest.raises(mmi.InputError, match=r"captions_val2014.json: annotations\[0\]: field 'image_id' is '5', "
                                             r"expected an integer"):
        ev.read_coco_t2i(str(tmp_path))
    _visdial_layout(tmp_path)
    _json(tmp_path / "visdial/visdial_1.0_val_dense_annotations.json",
          [{"image_id": 77, "round_id": 3, "gt_relevance": [0.0, 0.0, 0.0]}])
    with pytest.raises(mmi.InputError, match=r"dense_annotations.json\[0\]: gt_relevance must be numbers, not all "
                                             r"zero \(NDCG is undefined"):
        ev.read_visdial(str(tmp_path))
    _json(tmp_path / "visdial/visdial_1.0_val_dense_annotations.json",
          [{"image_id": 77, "round_id": 9, "gt_relevance": [0.0, 1.0, 0.5]}])
    with pytest.raises(mmi.InputError, match=r"dense_annotations.json\[0\]: round_id 9 is not one of dialogs\[0\]'s "
                                             r"3 rounds"):
        ev.read_visdial(str(tmp_path))


def test_coco_and_lncoco_image_ids_that_int_refuses_are_one_line(tmp_path):
    """An image id of characters str.isdigit accepts but int() refuses ("²") is an InputError naming the record."""
    _json(tmp_path / "coco/annotations/coco_karpathy_test.json", [{"image": "val2014/COCO_val2014_\u00b2.jpg"}])
    with pytest.raises(mmi.InputError, match=r"coco_karpathy_test.json\[0\]: field 'image' is .*expected a COCO"):
        ev.read_coco_karpathy(str(tmp_path))
    (tmp_path / "lncoco").mkdir()
    (tmp_path / "lncoco" / "coco_val_captions.jsonl").write_text('{"image_id": "\u00b2", "caption": "x"}\n')
    with pytest.raises(mmi.InputError, match=r"coco_val_captions.jsonl:1: field 'image_id' is .*expected a COCO"):
        ev.read_lncoco(str(tmp_path))


@pytest.mark.parametrize("first", [math.nan, math.inf, -1.0])
def test_visdial_relevance_that_would_make_ndcg_nan_is_one_line(tmp_path, first):
    """NaN, an infinity or a negative relevance would make NDCG NaN, and the results file invalid JSON."""
    _visdial_layout(tmp_path)
    _json(tmp_path / "visdial/visdial_1.0_val_dense_annotations.json",
          [{"image_id": 77, "round_id": 3, "gt_relevance": [first, 1.0, 0.5]}])
    with pytest.raises(mmi.InputError, match=r"dense_annotations.json\[0\]: gt_relevance must be finite numbers >= 0; "
                                             rf"got \[{first}, 1.0, 0.5\]"):
        ev.read_visdial(str(tmp_path))


def test_missing_or_broken_images_are_counted_skips(tmp_path, monkeypatch, capsys,
                                                                    demo_model_and_tokenizer, short_generation):
    model = demo_model_and_tokenizer[0]
    monkeypatch.setattr(ev, "load_model", lambda init_from, dtype, device, *_: copy.deepcopy(model).to(device))
    _vizwiz_layout(tmp_path, ["a.jpg", "b.jpg", "c.jpg", "d.jpg"], missing={"b.jpg"}, corrupt={"c.jpg"})
    monkeypatch.chdir(tmp_path)                                       # the results go under ./out by default
    assert mmi.run_script(ev.main, ["--task=vizwiz_vqa", f"--data_root={tmp_path}", f"--init_from={tmp_path}",
                                    f"--tokenizer={data.DEMO_TOKENIZER_PATH}", "--device=cpu"]) == 0
    out = capsys.readouterr().out
    res = json.loads((tmp_path / "out/eval/vizwiz_vqa.json").read_text())
    assert [o["id"] for o in res["samples"]] == ["a.jpg", "d.jpg"] and res["num_samples"] == 2
    assert res["skipped"] == {"image_missing": 1, "image_unreadable": 1}
    assert [(o["id"], o["skipped"]) for o in res["skipped_samples"]] == [("b.jpg", "image_missing"),
                                                                         ("c.jpg", "image_unreadable")]
    assert res["metrics"]["overall_accuracy"] == pytest.approx(100 * np.mean([o["accuracy"] for o in res["samples"]]))
    assert "skipped 2 of 4 samples" in out and f"wrote {os.path.join('out', 'eval', 'vizwiz_vqa.json')}\n" in out
    assert sorted(os.listdir(tmp_path / "out/eval")) == ["vizwiz_vqa.json"]


def test_eval_skips_and_counts_a_prompt_beyond_the_models_positions(tmp_path, demo_model_and_tokenizer,
                                                                     short_generation):
    """A question (or a VisDial caption) whose prompt has more tokens than max_position_embeddings is skipped as
    prompt_too_long, not run (its attention mask grows as the length squared)."""
    model, tok = demo_model_and_tokenizer
    long_text = "red " * model.cfg.llm.max_position_embeddings
    _vizwiz_layout(tmp_path, ["a.jpg", "b.jpg"])
    records = json.loads((tmp_path / "VizWiz/val.json").read_text())
    records[1]["question"] = long_text
    _json(tmp_path / "VizWiz/val.json", records)
    res = ev.evaluate(model, tok, _args("vizwiz_vqa", tmp_path))
    assert [o["id"] for o in res["samples"]] == ["a.jpg"] and res["skipped"] == {"prompt_too_long": 1}
    assert "new, more than max_position_embeddings 1024" in res["skipped_samples"][0]["detail"]
    _visdial_layout(tmp_path)
    meta = json.loads((tmp_path / "visdial/visdial_1.0_val.json").read_text())
    meta["data"]["dialogs"][0]["caption"] = long_text
    _json(tmp_path / "visdial/visdial_1.0_val.json", meta)
    with pytest.raises(mmi.InputError, match=r"skipped \{'prompt_too_long': 1\}"):
        ev.evaluate(model, tok, _args("visdial", tmp_path))


def test_no_usable_sample_is_an_input_error_not_a_zero_division(tmp_path, demo_model_and_tokenizer):
    model, tok = demo_model_and_tokenizer                 # never called: no image can be read
    _vizwiz_layout(tmp_path, ["a.jpg", "b.jpg"], corrupt={"a.jpg", "b.jpg"})
    with pytest.raises(mmi.InputError, match=r"0 of 2 samples could be used, the metric needs at least 1; skipped "
                                             r"\{'image_unreadable': 2\}"):
        ev.evaluate(model, tok, _args("vizwiz_vqa", tmp_path))


@pytest.mark.parametrize("every", [0, 10 ** 9])
def test_a_crash_mid_run_keeps_the_predictions_made_so_far(every, tmp_path, monkeypatch, capsys,
                                                          demo_model_and_tokenizer, short_generation):
    """every=0: the partial file is rewritten as each prediction comes; every=10**9: only on the way out."""
    model = copy.deepcopy(demo_model_and_tokenizer[0])                  # patched below
    generate, seen = model.generate_texts, []
    out, partial = tmp_path / "r.json", tmp_path / "r.partial.json"

    def generate_texts(batch, **kw):
        if seen:                                 # the second batch: note what is on disk, then fail
            seen.append(json.loads(partial.read_text()) if partial.exists() else None)
            raise RuntimeError("CUDA error: out of memory")
        seen.append("first")
        return generate(batch, **kw)

    monkeypatch.setattr(model, "generate_texts", generate_texts)
    monkeypatch.setattr(ev, "load_model", lambda init_from, dtype, device, *_: model)
    monkeypatch.setattr(ev, "PARTIAL_EVERY_S", every)
    _vizwiz_layout(tmp_path, ["a.jpg", "b.jpg", "c.jpg"])
    argv = ["--task=vizwiz_vqa", f"--data_root={tmp_path}", f"--init_from={tmp_path}", "--device=cpu",
            f"--tokenizer={data.DEMO_TOKENIZER_PATH}", "--batch_size=2", f"--out={out}"]
    with pytest.raises(RuntimeError, match="out of memory"):                # a bug or a crash is not an InputError
        mmi.run_script(ev.main, argv)
    if every == 0:
        assert [o["id"] for o in seen[1]["samples"]] == ["a.jpg", "b.jpg"]
    else:
        assert seen[1] is None
    kept = json.loads(partial.read_text())
    assert kept["partial"] and kept["num_predictions"] == 2 and not out.exists()
    assert f"kept the 2 predictions made so far in {partial}" in capsys.readouterr().err
    # a rerun does not start over them; with --resume it predicts the third sample only, writes the results and
    # removes the partial file
    monkeypatch.setattr(model, "generate_texts", generate)
    assert mmi.run_script(ev.main, argv) == 2 and partial.exists()
    assert capsys.readouterr().err.endswith(f": error: {partial} holds 2 predictions of an earlier run: --resume "
                                            f"goes on from them (or remove the file to start over)\n")
    assert mmi.run_script(ev.main, argv + ["--resume"]) == 0
    res = json.loads(out.read_text())
    assert res["num_samples"] == 3 and res["samples"][:2] == kept["samples"] and not partial.exists()
    assert f"reusing 2 of the 2 predictions kept in {partial}" in capsys.readouterr().out


def test_eval_writes_no_results_over_an_earlier_file(tmp_path, monkeypatch, capsys):
    """Results go to out/eval/<task>.json, else the first free <task>-N.json, so a "before" score survives the
    "after" run; an --out that exists (README.md was written over) is refused in one line before any work."""
    monkeypatch.chdir(tmp_path)
    assert ev.results_path(None, "demo_qa") == os.path.join("out", "eval", "demo_qa.json")
    os.makedirs(os.path.join("out", "eval"))
    for name in ("demo_qa.json", "demo_qa-2.json"):
        (tmp_path / "out" / "eval" / name).write_text("{}")
    assert ev.results_path(None, "demo_qa") == os.path.join("out", "eval", "demo_qa-3.json")
    (tmp_path / "README.md").write_text("mine")
    assert mmi.run_script(ev.main, ["--task=demo_qa", "--out=README.md", "--limit=4"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--out=README.md: the file exists;" in err, err
    assert (tmp_path / "README.md").read_text() == "mine"


def _vizwiz_partial(tmp_path, argv, outputs, **config):
    """A partial file as a run of `argv` keeps it (its config, `config` changed), holding `outputs`."""
    kept = dict(ev.run_config(ev.parse_args(argv), 1), **config)
    partial = tmp_path / "r.partial.json"
    ev.write_partial(str(partial), "vizwiz_vqa", kept, outputs)
    return partial


def test_resume_reuses_a_batch_only_whole(tmp_path, monkeypatch, capsys, demo_model_and_tokenizer,
                                          short_generation):
    """--resume reuses kept predictions by sample id (their text is not made again), but a batch's only when the
    file holds all of it: a batch predicted again holds the samples it held in the run never interrupted, so their
    float rounding is the same."""
    model = copy.deepcopy(demo_model_and_tokenizer[0])                  # patched below
    generate, asked = model.generate_texts, []

    def generate_texts(batch, **kw):
        asked.append(batch["text_ids"].shape[0])
        return generate(batch, **kw)

    monkeypatch.setattr(model, "generate_texts", generate_texts)
    monkeypatch.setattr(ev, "load_model", lambda init_from, dtype, device, *_: model)
    _vizwiz_layout(tmp_path, ["a.jpg", "b.jpg", "c.jpg"])
    out = tmp_path / "r.json"
    argv = ["--task=vizwiz_vqa", f"--data_root={tmp_path}", f"--init_from={tmp_path}", "--device=cpu",
            f"--tokenizer={data.DEMO_TOKENIZER_PATH}", "--batch_size=2", f"--out={out}", "--resume"]
    made = lambda n: {"id": n, "question": f"What is {n}?", "generated": "kept", "answer": "kept", "accuracy": 0.0}
    partial = _vizwiz_partial(tmp_path, argv, [made("a.jpg")])           # half of the batch a, b
    assert mmi.run_script(ev.main, argv) == 0
    res = json.loads(out.read_text())
    assert [o["id"] for o in res["samples"]] == ["a.jpg", "b.jpg", "c.jpg"] and asked == [2, 1]
    assert res["samples"][0]["generated"] != "kept" and not partial.exists()
    assert "reusing 0 of the 1 predictions kept" in capsys.readouterr().out
    asked.clear()
    out.unlink()                                          # eval.py writes no results over earlier ones
    _vizwiz_partial(tmp_path, argv, [made("b.jpg"), made("a.jpg")])      # the batch a, b whole, in the order kept
    assert mmi.run_script(ev.main, argv) == 0
    res = json.loads(out.read_text())
    assert res["samples"][:2] == [made("b.jpg"), made("a.jpg")] and res["samples"][2]["id"] == "c.jpg"
    assert asked == [1] and "reusing 2 of the 2 predictions kept" in capsys.readouterr().out
    assert "resume" not in res["config"]                 # the results are those of a run never interrupted


@pytest.mark.parametrize("case", ["not_json", "not_an_object", "no_id", "other_seed", "other_generation", "unknown_id",
                                  "repeated_id", "without_resume", "a_folder", "twice_in_the_data",
                                  "other_ranks", "field_dropped", "field_added", "value_changed"])
def test_resume_refuses_a_partial_file_not_of_this_run_in_one_line(case, tmp_path, monkeypatch, capsys):
    """A partial file that is no JSON, not eval.py's shape, made with other settings or on another number of ranks,
    holding ids that are not the run's samples (or twice), or predictions edited since eval.py wrote them, or there
    without --resume, or a folder: one line naming it, before the model loads. Another --out or --inception is no other setting (every file here has them changed)."""
    loads = []
    monkeypatch.setattr(ev, "load_model", lambda *a: loads.append(a))
    _vizwiz_layout(tmp_path, ["a.jpg", "a.jpg" if case == "twice_in_the_data" else "b.jpg"])
    out, partial = tmp_path / "r.json", tmp_path / "r.partial.json"
    argv = ["--task=vizwiz_vqa", f"--data_root={tmp_path}", f"--init_from={tmp_path}", "--device=cpu",
            f"--tokenizer={data.DEMO_TOKENIZER_PATH}", f"--out={out}", "--resume"]
    made = lambda n: {"id": n, "question": "?", "generated": "x", "answer": "x", "accuracy": 0.0}
    same = dict(out="elsewhere.json", inception="other.pth")
    _vizwiz_partial(tmp_path, argv, [made("a.jpg")], **same)
    if case == "not_json":
        partial.write_text('{"task": "vizwiz_vqa", ')
        want = f"{partial}: eval.py's partial file is not valid JSON"
    elif case == "not_an_object":
        partial.write_text("[1, 2]")
        want = f"{partial}: expected an object with fields ['task', 'config', 'samples'], got [1, 2]"
    elif case == "no_id":
        _vizwiz_partial(tmp_path, argv, [{"generated": "x"}])
        want = f"{partial}: samples[0]: missing field 'id'"
    elif case == "other_seed":
        _vizwiz_partial(tmp_path, argv, [made("a.jpg")], seed=7, **same)
        want = f"{partial}: kept by a run with seed=7, this run has seed=0; resume with that run's settings"
    elif case == "other_generation":
        _vizwiz_partial(tmp_path, argv, [made("a.jpg")], generation=dict(ev.VQA_GENERATION, num_beams=1), **same)
        want = "kept by a run with generation.num_beams=1, this run has generation.num_beams=3"
    elif case == "unknown_id":
        _vizwiz_partial(tmp_path, argv, [made("a.jpg"), made("z.jpg")], **same)
        want = f"{partial}: samples[1] has id 'z.jpg', which is none of this run's samples"
    elif case == "repeated_id":
        _vizwiz_partial(tmp_path, argv, [made("a.jpg"), made("a.jpg")], **same)
        want = f"{partial}: samples[1] repeats id 'a.jpg', expected one prediction per sample"
    elif case == "without_resume":
        argv.remove("--resume")
        want = f"{partial} holds 1 predictions of an earlier run: --resume goes on from them"
    elif case == "a_folder":
        partial.unlink()
        partial.mkdir()
        want = f"--out's partial file={partial}: is a folder, expected the path of a file to write"
    elif case == "other_ranks":
        partial.rename(tmp_path / "r.partial.rank1.json")
        want = f"{tmp_path}/r.partial.rank1.json: kept by a run on another number of ranks than this run's 1"
        partial = tmp_path / "r.partial.rank1.json"
    elif case in ("field_dropped", "field_added", "value_changed"):
        edited = json.loads(partial.read_text())
        edit = {"field_dropped": lambda o: o.pop("answer"), "field_added": lambda o: o.update(note="mine"),
                "value_changed": lambda o: o.update(accuracy="high")}[case]
        edit(edited["samples"][0])
        partial.write_text(json.dumps(edited))
        want = f"{partial}: its samples are not those eval.py wrote (their crc32 differs: edited?)"
    else:
        want = f"--resume: sample id 'a.jpg' comes twice in --task=vizwiz_vqa's samples"
    assert mmi.run_script(ev.main, argv) == 2
    captured = capsys.readouterr()
    assert ": error: " in captured.err and want in captured.err, captured.err
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err
    assert loads == [] and (partial.is_dir() if case == "a_folder" else partial.is_file())     # nothing removed


def test_resume_under_torchrun_keeps_only_the_ranks_own_samples(tmp_path):
    """Rank 1 of 2 resumes from its own partial file: a prediction there of a sample that is rank 0's share (the
    rank-strided split gives rank 1 only b.jpg of a, b, c) is refused, as it would be scored twice."""
    argv = ["--task=vizwiz_vqa", f"--data_root={tmp_path}", f"--init_from={tmp_path}", "--device=cpu",
            f"--out={tmp_path / 'r.json'}", "--resume"]
    args = ev.parse_args(argv)
    samples = [{"id": n} for n in ("a.jpg", "b.jpg", "c.jpg")]
    made = lambda n: {"id": n, "question": "?", "generated": "x", "answer": "x", "accuracy": 0.0}
    partial = ev.partial_path(args.out, 1, 2)
    ev.write_partial(partial, "vizwiz_vqa", ev.run_config(args, 2), [made("b.jpg")])
    assert ev.read_partial(args, 1, 2, samples) == [made("b.jpg")]
    ev.write_partial(partial, "vizwiz_vqa", ev.run_config(args, 2), [made("a.jpg")])
    with pytest.raises(mmi.InputError, match=re.escape(f"{partial}: samples[0] has id 'a.jpg', which is none of "
                                                       f"this run's samples")):
        ev.read_partial(args, 1, 2, samples)


def test_resume_refers_to_the_images_kept_and_draws_only_the_missing(tmp_path, monkeypatch, demo_model_and_tokenizer):
    """LN-COCO stopped by Ctrl-C after its first caption's image, then resumed: the kept prediction names the PNG
    the first run wrote, which is not drawn (nor written) again; once that PNG is gone, it is drawn again."""
    model, tok = copy.deepcopy(demo_model_and_tokenizer[0]), demo_model_and_tokenizer[1]   # patched below
    _t2i_layout(tmp_path, {3: "a red circle", 8: "two blue squares", 9: "a green triangle"})
    drawn, stop = [], [True]

    def generate_images(batch, steps, guidance_scale, sampler, seed, num_images_per_context):
        if stop[0] and drawn:
            raise KeyboardInterrupt
        drawn.extend(seed)
        return {"image": torch.stack([torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(s)) for s in seed])}

    monkeypatch.setattr(model, "generate_images", generate_images)
    monkeypatch.setattr(ev, "load_inception", lambda path: None)
    monkeypatch.setattr(ev, "inception_features", lambda net, images, device="cpu": images.flatten(1)[:, :4].numpy())
    args = _args("lncoco", tmp_path, limit=3)
    args.batch_size, args.out = 1, str(tmp_path / "r.json")
    samples = ev.load_samples(args)
    with pytest.raises(KeyboardInterrupt):
        ev.evaluate(model, tok, args, samples=samples)
    png = os.path.join(ev.images_folder(args), "00000.png")
    written = os.stat(png).st_mtime_ns
    stop[0], args.resume, drawn[:] = False, True, []
    kept = ev.read_partial(args, 0, 1, samples)
    res = ev.evaluate(model, tok, args, samples=samples, kept=kept)
    assert [o["generated"] for o in kept] == [png] and res["samples"][0] == kept[0]
    assert drawn == [1, 2] and os.stat(png).st_mtime_ns == written            # the seeds of ids 1 and 2 only
    os.remove(png)
    drawn[:] = []
    assert ev.read_partial(args, 0, 1, samples) == []
    ev.evaluate(model, tok, args, samples=samples)
    assert drawn == [0, 1, 2] and os.path.isfile(png)


def test_resume_after_an_interrupt_writes_the_uninterrupted_results(tmp_path, saved_tiny_model, monkeypatch,
                                                                     capsys):
    """The demo task stopped by Ctrl-C after 1 of 3 stories, then run again with --resume: it predicts the other 2
    only and writes a results file byte for byte the uninterrupted run's (same samples, order and metrics)."""
    monkeypatch.setattr(ev, "DEMO_IMAGES", dict(steps=2, guidance_scale=3.0, sampler="ddim"))
    monkeypatch.setattr(ev, "DEMO_GENERATION", dict(max_new_tokens=6, min_new_tokens=0, num_beams=1))
    monkeypatch.setattr(ev, "DEMO_TEXT", dict(ev.DEMO_TEXT, max_new_tokens=6))
    out = tmp_path / "demo.json"
    argv = ["--task=demo", f"--init_from={saved_tiny_model}", f"--tokenizer={data.DEMO_TOKENIZER_PATH}",
            "--limit=3", "--seed=3", f"--out={out}"]
    assert mmi.run_script(ev.main, argv) == 0
    uninterrupted = out.read_bytes()
    out.unlink()
    predict, asked = ev.TASKS["demo"].predict, []

    def stopped_after(k):
        def run(model, tokenizer, samples, args):
            asked.append([s["id"] for s in samples])
            for n, o in enumerate(predict(model, tokenizer, samples, args)):
                if n == k:
                    raise KeyboardInterrupt
                yield o
        return run

    monkeypatch.setattr(ev.TASKS["demo"], "predict", stopped_after(1))
    assert mmi.run_script(ev.main, argv) == 130 and not out.exists()
    monkeypatch.setattr(ev.TASKS["demo"], "predict", stopped_after(None))
    assert mmi.run_script(ev.main, argv + ["--resume"]) == 0
    assert asked == [[0, 1, 2], [1, 2]]
    assert out.read_bytes() == uninterrupted
    assert "reusing 1 of the 1 predictions kept" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------------------------
# eval.py: the demo scoreboard
# ----------------------------------------------------------------------------------------------------------------


def _obj(r, c, shape, colour):
    return data.Obj(r, c, shape, colour).as_dict()


def test_demo_scores_by_hand():
    red_c, blue_s, green_t = _obj(0, 0, "circle", "red"), _obj(1, 1, "square", "blue"), _obj(2, 2, "triangle", "green")
    moved_c = _obj(0, 2, "circle", "red")
    out = [{"scene": [red_c, blue_s], "caption": "a red circle at the top left and a blue square at the centre.",
            "next_sentence": "the blue square turns red.", "steps": [
                # edit: the red circle moves; the blue square is untouched. Drawn: square right, circle wrong cell
                {"previous": [red_c, blue_s], "target": [moved_c, blue_s], "read": [red_c, blue_s],
                 "read_without_mmfs": [green_t]},
                # edit: a green triangle appears; both old objects untouched. Drawn exactly
                {"previous": [moved_c, blue_s], "target": [moved_c, blue_s, green_t],
                 "read": [moved_c, blue_s, green_t], "read_without_mmfs": [moved_c]}]},
           {"scene": [green_t], "caption": "a green circle at the bottom right.", "steps": [],
            "next_sentence": "the green triangle turns red. right."}]           # a stray word after the full stop
    # first images from their sentence alone: 1 of 2 objects (the square's colour wrong), then 1 of 1
    out[0]["first"] = {"target": [red_c, blue_s], "read": [red_c, _obj(1, 1, "square", "red")]}
    out[1]["first"] = {"target": [green_t], "read": [green_t]}
    s = ev.demo_scores(out)
    assert s["first_image_object_accuracy"] == 2 / 3 and s["first_image_scene_accuracy"] == 1 / 2
    assert s["caption_accuracy"] == 0.5                       # the second caption names the wrong shape
    assert s["next_sentence_validity"] == 0.5 and s["next_sentence_ends_at_full_stop"] == 0.5
    for bad in ("the red circle turns blue.",                # no red circle in that scene
                "the green triangle moves to the bottom right.",  # already there: no change
                "the green triangle turns green.", "the green triangle"):
        assert ev.demo_scores([dict(out[1], next_sentence=bad)])["next_sentence_validity"] == 0.0
    assert ev.demo_scores([dict(out[1], next_sentence="the red circle turns blue.")])[
        "next_sentence_ends_at_full_stop"] == 1.0                            # not an edit of it, but ends cleanly
    assert ev.demo_scores([dict(out[1], next_sentence=" The green triangle turns red. ")])[
        "next_sentence_validity"] == 1.0
    assert s["image_object_accuracy"] == 4 / 5                # 1 of 2, then 3 of 3 target objects drawn
    assert s["image_scene_accuracy"] == 1 / 2
    assert s["story_consistency"] == 3 / 3                    # untouched: square; then circle and square -> all kept
    s = ev.demo_scores(out, "read_without_mmfs")
    assert (s["image_object_accuracy"], s["image_scene_accuracy"], s["story_consistency"]) == (1 / 5, 0.0, 1 / 3)
    # a caption is scored up to its first full stop: an object named after it is not part of the scene read
    more = dict(out[0], caption=out[0]["caption"] + " a green triangle at the bottom right.")
    assert ev.demo_scores([more])["caption_accuracy"] == 1.0
    # a drawn image with an extra object has every target object, but is not the target scene
    step = dict(out[0]["steps"][1], read=[moved_c, blue_s, green_t, _obj(0, 0, "square", "yellow")])
    s = ev.demo_scores([dict(out[0], steps=[step])])
    assert (s["image_object_accuracy"], s["image_scene_accuracy"]) == (1.0, 0.0)


def test_score_demo_and_its_table_give_mmfs_off_its_own_column():
    """score_demo's *_without_mmfs scores come from the images drawn without MMFS, and demo_table prints them in
    the MMFS off column: here a blue square appears; with MMFS both objects are drawn, without it only the square."""
    red_c, blue_s = _obj(0, 0, "circle", "red"), _obj(1, 1, "square", "blue")
    out = [{"scene": [red_c], "caption": "a red circle at the top left.", "next_sentence": "the red circle turns blue.",
            "first": {"target": [red_c], "read": [red_c]},
            "steps": [{"previous": [red_c], "target": [red_c, blue_s], "read": [red_c, blue_s],
                       "read_without_mmfs": [blue_s]}]}]
    m = ev.score_demo(None, out, None)
    assert (m["image_object_accuracy"], m["image_scene_accuracy"], m["story_consistency"]) == (1.0, 1.0, 1.0)
    assert (m["image_object_accuracy_without_mmfs"], m["image_scene_accuracy_without_mmfs"],
            m["story_consistency_without_mmfs"]) == (0.5, 0.0, 0.0)
    table = ev.demo_table(m, 1)
    assert "| image accuracy, per object | 100.0% | 50.0% | >= 90% |" in table
    assert "| image accuracy, whole scene | 100.0% | 0.0% | >= 80% |" in table
    assert "| story consistency | 100.0% | 0.0% | >= 80%, and 20 points above MMFS off |" in table
    assert "| caption accuracy (exact scene) | 100.0% |  | >= 95% |" in table


def test_offset_scores_another_slice_of_the_test_split(tmp_path):
    """--offset skips samples: the demo tasks make the test split's stories (questions) from there on, a dataset
    task drops the first ones it read; a negative offset is refused by the command line."""
    args = ev.parse_args(["--task=demo", "--offset=40", "--limit=3"])
    got = ev.load_samples(args)
    assert [s["id"] for s in got] == [40, 41, 42]
    assert [s["seed"] for s in got] == [s.seed for s in data.demo_stories("test", 43)[40:]]
    assert not {s["seed"] for s in got} & {s["seed"] for s in ev.read_demo(None)}       # none of the 40 scored
    got = ev.load_samples(ev.parse_args(["--task=demo_qa", "--offset=300", "--limit=2"]))
    assert [s["seed"] for s in got] == [q.seed for q in data.demo_questions("test", 302)[300:]]
    _coco_captions(str(tmp_path), "nocaps", "nocaps_val_4500_captions.json", "images", ["a.jpg", "b.jpg", "c.jpg"])
    full = ev.load_samples(_args("nocaps", str(tmp_path)))
    args = _args("nocaps", str(tmp_path))
    args.offset = 1
    assert len(full) == 3 and ev.load_samples(args) == full[1:]
    with pytest.raises(mmi.InputError, match="--offset: expected an integer >= 0, got '-1'"):
        ev.parse_args(["--task=demo", "--offset=-1"])


def test_demo_image_analysis_is_exact_on_clean_renders():
    for story in data.demo_stories("test", 30):
        for scene in story.scenes:
            img = ev.demo_image(scene, 64)
            assert data.read_scene(img.numpy()) == scene


def test_demo_draws_pairs_each_step_with_its_mmfs_on_then_off_image():
    """generate_images(use_mmfs="both") returns every image drawn with MMFS, then every one without: demo_draws
    pairs step i with images i and N + i, in that order (a stand-in model draws known scenes)."""
    stories = [data.make_story(s) for s in (1, 2)]
    steps = [(st, [ev.demo_image(sc, 64) for sc in st.scenes], 1, 0) for st in stories]
    on = [st.scenes[1] for st in stories]
    off = [st.scenes[0] for st in stories]

    class Drawer:
        cfg = type("cfg", (), {"num_img_token": 2})

        def generate_images(self, batch, use_mmfs, **kw):
            assert use_mmfs == "both"
            return {"image": torch.stack([ev.demo_image(sc, 64) for sc in on + off])}

    tok = data.Tokenizer(data.DEMO_TOKENIZER_PATH)
    assert ev.demo_draws(Drawer(), tok, steps, "cpu") == list(zip(on, off))


def test_demo_task_end_to_end_and_its_readme_table(tmp_path, saved_tiny_model, monkeypatch, capsys):
    monkeypatch.setattr(ev, "DEMO_IMAGES", dict(steps=2, guidance_scale=3.0, sampler="ddim"))
    monkeypatch.setattr(ev, "DEMO_GENERATION", dict(max_new_tokens=6, min_new_tokens=0, num_beams=1))
    out = tmp_path / "demo.json"
    ev.main(["--task=demo", f"--init_from={saved_tiny_model}", f"--tokenizer={data.DEMO_TOKENIZER_PATH}",
             "--limit=2", f"--out={out}"])
    res = json.loads(out.read_text())
    assert res["num_samples"] == 2 and len(res["samples"][0]["steps"]) == len(data.make_story(res["samples"][0]["seed"]).scenes) - 1
    for k in ("caption_accuracy", "image_object_accuracy", "image_scene_accuracy", "story_consistency",
              "story_consistency_without_mmfs"):
        assert 0.0 <= res["metrics"][k] <= 1.0 or math.isnan(res["metrics"][k])
    printed = capsys.readouterr().out
    assert "| story consistency |" in printed     # the command shown is the one that scored it
    assert (f"Demo scoreboard on 2 held-out shape stories (`python eval.py --init_from={saved_tiny_model} "
            f"--tokenizer={data.DEMO_TOKENIZER_PATH} --limit=2`):") in printed
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{ev.README_BEGIN}\nold\n{ev.README_END}\noutro\n")
    ev.write_readme_table(str(readme), ev.demo_table(res["metrics"], 2))
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("outro\n") and "old" not in text and "| metric |" in text


def test_the_embedded_demo_draws_the_colour_its_sentence_names(demo_model_and_tokenizer):
    """Test story 6 ends "the yellow circle turns red." beside a red triangle: told each other colour instead, the
    shipped model draws the circle in that colour and keeps the triangle (read back from the drawn pixels)."""
    model, tokenizer = demo_model_and_tokenizer
    story = data.demo_stories("test", 7)[6]
    assert story.texts[1] == "the yellow circle turns red."
    images = [ev.demo_image(scene, model.cfg.vision.image_size) for scene in story.scenes[:2]]
    circle, triangle = sorted(story.scenes[1], key=lambda o: o.shape)
    colours = [c for c in data.COLOURS if c != "yellow"]
    prompts = [ev.demo_story_prompt([story.texts[0], f"the yellow circle turns {c}."], model.cfg.num_img_token, 1)
               for c in colours]
    batch = ev.text_batch(prompts, [images[0], torch.full_like(images[1], 0.5)] * len(colours), tokenizer,
                          pad_left=False)
    with torch.no_grad():
        drawn = model.generate_images(batch, target_image_idxs=[2 * i + 1 for i in range(len(colours))], seed=0,
                                      progress=False, **ev.DEMO_IMAGES)["image"]
    for colour, img in zip(colours, drawn):
        assert set(data.read_scene(img.numpy())) == {dataclasses.replace(circle, colour=colour), triangle}, colour


def test_the_embedded_demo_edits_the_circle_its_colour_names(demo_model_and_tokenizer):
    """Test story 20 opens on three circles (blue, purple, yellow): told that each one in turn disappears or moves
    to the top left, the shipped model edits that circle and keeps the other two where they were."""
    model, tokenizer = demo_model_and_tokenizer
    story = data.demo_stories("test", 21)[20]
    scene = story.scenes[0]
    assert sorted(o.colour for o in scene) == ["blue", "purple", "yellow"] and {o.shape for o in scene} == {"circle"}
    edits = [f"the {o.colour} circle {verb}." for o in scene for verb in ("disappears", "moves to the top left")]
    image = ev.demo_image(scene, model.cfg.vision.image_size)
    prompts = [ev.demo_story_prompt([story.texts[0], e], model.cfg.num_img_token, 1) for e in edits]
    batch = ev.text_batch(prompts, [image, torch.full_like(image, 0.5)] * len(edits), tokenizer, pad_left=False)
    with torch.no_grad():
        drawn = model.generate_images(batch, target_image_idxs=[2 * i + 1 for i in range(len(edits))], seed=0,
                                      progress=False, **ev.DEMO_IMAGES)["image"]
    for edit, img in zip(edits, drawn):
        assert data.read_scene(img.numpy()) == data.apply_edit(scene, data.parse_edit(edit, scene)), edit


def _demo_story_at_a_time(model, tokenizer, samples, args):
    """eval.predict_demo as it was before batching: one caption call and one image call per story and step.
    -> the outputs and, per story step, its (with, without) MMFS images."""
    S, outputs, pairs = model.cfg.vision.image_size, [], []
    for s in samples:
        story = data.make_story(s["seed"])
        images = [ev.demo_image(scene, S) for scene in story.scenes]
        out = model.generate_texts(ev.text_batch([data.image_placeholder(model.cfg.num_img_token)], [images[0]],
                                                 tokenizer), **ev.DEMO_GENERATION)
        steps = []
        for k in range(len(story.scenes)):
            prompt = ev.demo_story_prompt(story.texts, model.cfg.num_img_token, k)
            batch = ev.text_batch([prompt], images[:k] + [torch.full_like(images[k], 0.5)], tokenizer, pad_left=False)
            pair = model.generate_images(batch, target_image_idxs=[k], seed=args.seed + s["seed"] % 100000,
                                         progress=False, use_mmfs="both", **ev.DEMO_IMAGES)["image"]
            pairs.append(pair)
            read = [[o.as_dict() for o in data.read_scene(img.numpy())] for img in pair]
            if k == 0:                              # the first image, from its sentence alone
                first = {"target": [o.as_dict() for o in story.scenes[0]], "read": read[0]}
                continue
            steps.append({"target": [o.as_dict() for o in story.scenes[k]],
                          "previous": [o.as_dict() for o in story.scenes[k - 1]],
                          "read": read[0], "read_without_mmfs": read[1]})
        prompt = ev.demo_story_prompt(story.texts, model.cfg.num_img_token, 0)
        nxt = model.generate_texts(ev.text_batch([prompt], [images[0]], tokenizer),
                                   **dict(ev.DEMO_TEXT, seed=args.seed + s["seed"] % 100000))
        decode = lambda o: tokenizer.decode(o["text_ids"][0, :int(o["lengths"][0])].tolist()).strip()
        outputs.append({"id": s["id"], "seed": s["seed"], "scene": [o.as_dict() for o in story.scenes[0]],
                        "caption": decode(out), "next_sentence": decode(nxt), "first": first, "steps": steps})
    return outputs, pairs


def test_demo_stories_in_groups_equal_one_story_at_a_time(monkeypatch):
    """Batching stories (captions in one call, every step's images in one call with a seed each) changes no
    caption, no sampled sentence, no drawn image and no read scene: 3 stories in groups of 2 against the
    story-at-a-time loop."""
    monkeypatch.setattr(ev, "DEMO_IMAGES", dict(steps=2, guidance_scale=3.0, sampler="ddim"))
    monkeypatch.setattr(ev, "DEMO_GENERATION", dict(max_new_tokens=6, min_new_tokens=0, num_beams=1))
    monkeypatch.setattr(ev, "DEMO_TEXT", dict(ev.DEMO_TEXT, max_new_tokens=6))
    tok = data.Tokenizer(data.DEMO_TOKENIZER_PATH)
    cfg = mmi.MMIConfig.from_preset("tiny", **{"llm.vocab_size": tok.vocab_size, "pad_token_id": tok.pad_id,
                                               "soi_token_id": tok.soi_id, "image_token_id": tok.image_id})
    torch.manual_seed(5)
    model = mmi.MMInterleaved(cfg).eval()
    _perturb_mmfs_convs(model.image_decoder)
    samples = ev.read_demo(None, num_stories=3)
    import argparse
    args = argparse.Namespace(device="cpu", seed=2)
    with torch.no_grad():
        want, pairs = _demo_story_at_a_time(model, tok, samples, args)
        drawn, read_scene = [], data.read_scene
        monkeypatch.setattr(data, "read_scene", lambda img: drawn.append(img) or read_scene(img))
        got = list(ev.predict_demo(model, tok, samples, args, stories_per_call=2))
    assert got == want
    # each call reads all its images with MMFS, then all without; stories 0-1 share a call, story 2 has its own
    first_call = sum(len(data.make_story(s["seed"]).scenes) for s in samples[:2])
    expected = [p[0] for p in pairs[:first_call]] + [p[1] for p in pairs[:first_call]] + \
               [p[0] for p in pairs[first_call:]] + [p[1] for p in pairs[first_call:]]
    assert len(drawn) == len(expected) == 2 * len(pairs)
    for a, b in zip(drawn, expected):
        np.testing.assert_allclose(a, b.numpy(), rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# bench.py: its wording on a machine without CUDA
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="what a machine without CUDA answers")
@pytest.mark.parametrize("script, argv, message", [
    ("bench", ["decode"], r"decode: the mmi-13b preset runs on a GPU \(in float32 on a CPU it needs about 60 GB of "
                          r"memory\); --preset=tiny checks the plumbing on a CPU"),
    ("bench", ["sample", "--quantize=int8"], r"sample: the mmi-13b preset runs on a GPU"),
    ("bench", ["kernel"], r"kernel: needs a CUDA device"),
    ("bench", ["gemv", "--steps=x"], r"argument --steps: invalid int value: 'x'"),
    ("bench", ["train", "--preset=tiny", "--steps=0"], r"--steps=0: expected an integer >= 1"),
    ("bench", ["sample", "--preset=tiny", "--new_tokens=-5"], r"--new_tokens=-5: expected an integer >= 1"),
    ("bench", ["train", "--preset=tiny", "--frozen_dtype=float8"], r"--frozen_dtype: invalid choice: 'float8'"),
    ("bench", ["data", "--stories=-1"], r"--stories=-1: expected an integer >= 1"),
    ("bench", ["train", "--preset=mmi-14b"], r"argument --preset: invalid choice: 'mmi-14b'"),
    ("data", ["--nope"], r"unrecognized arguments: --nope"),
    ("data", ["--demo", "--show=-3"], r"--show=-3: expected 1 to 1000 stories"),
    ("data", ["--demo", "--show=100000000"], r"--show=100000000: expected 1 to 1000 stories"),
    ("data", ["--demo", "--show=2", f"--out={__file__}"], r"test_mmi.py: is a file, expected a folder to write into"),
    ("data", ["--demo", "--show=2", "--out=/proc/xx"], r"--out=/proc/xx: cannot create a file in /proc"),
])
def test_bench_and_data_mistakes_are_one_line_and_exit_2(script, argv, message, capsys):
    """What cannot run here (the paper-size model or a kernel on a CPU) or a mistyped flag: one line, exit 2,
    before any model is built."""
    import bench
    assert mmi.run_script({"bench": bench, "data": data}[script].main, argv) == 2
    out, err = capsys.readouterr()
    assert not out and len(err.strip().splitlines()) == 1 and re.search(message, err), err


@pytest.mark.skipif(torch.cuda.is_available(), reason="the wording on a machine without CUDA")
def test_bench_train_on_cpu_speaks_of_processes_not_gpus(capsys):
    import argparse
    import bench
    bench.bench_train(argparse.Namespace(preset="tiny", recipe="pretrain", lora_rank=0, rows=1, steps=2,
                                         frozen_dtype="bfloat16", compile=False))
    out = capsys.readouterr().out
    assert "1 rows x 128 tokens per process" in out and "MFU n/a on a CPU" in out
    assert "GPU" not in out and "nan" not in out and "GiB" not in out


def test_bench_train_interrupted_reports_no_figures_and_exits_130(monkeypatch, capsys):
    """Ctrl-C during bench.py train ends it with train.py's exit code 130, not a summary of part of a run (exit 0)."""
    import bench
    monkeypatch.setattr(train, "main", lambda argv: 130)
    with pytest.raises(SystemExit) as stop:
        bench.main(["train", "--preset=tiny", "--steps=2"])
    assert stop.value.code == 130 and "step times" not in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="the wording on a machine without CUDA")
def test_bench_decode_on_cpu_lists_the_ops_of_one_step(capsys):
    """bench.py decode at the tiny preset: a header, then the top ops of a decoding step, each with a whole number
    of calls a step, their shares of the step's op time adding up to at most 100%, the matmuls among them."""
    import argparse
    import bench
    bench.bench_decode(argparse.Namespace(preset="tiny", quantize="none", steps=3, top=40, compile=False))
    out = capsys.readouterr().out
    assert re.search(r"decode, tiny, cpu, torch.float32, quantize none, eager: one step [\d.]+ ms wall", out), out
    rows = re.findall(r"^\| (\S+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+)% \|$", out, re.M)
    assert 10 <= len(rows) <= 40 and all(float(calls).is_integer() for _, calls, _, _ in rows)
    assert 50 < sum(float(share) for *_, share in rows) <= 100.5
    assert any(op in ("aten::mm", "aten::addmm") for op, *_ in rows)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the wording on a machine without CUDA")
@pytest.mark.parametrize("lora_rank", [0, 4])
def test_bench_train_storytelling_reports_rows_and_trainable(capsys, lora_rank):
    """The storytelling recipe on synthetic VIST-shaped rows: 5 frames of a 20-token caption, soi and 8 image tokens
    (tiny) after bos; the image loss only; what trains counted before the run as the run's optimizer holds it (with
    LoRA: rank x (in + out) of 7 matmuls in 4 layers of width 64, MLP 172)."""
    import argparse
    import bench
    rows = bench.bench_train(argparse.Namespace(preset="tiny", recipe="storytelling", lora_rank=lora_rank, rows=1,
                                                steps=2, frozen_dtype="bfloat16", compile=False))
    out = capsys.readouterr().out
    head = re.search(r"train storytelling, (.+?), tiny, cpu: 1 rows x (\d+) tokens per process, (\d+) images/row, "
                     r"([\d,]+) trainable parameters", out)
    assert head, out
    assert head.group(1) == (f"LoRA rank {lora_rank}" if lora_rank else "no LoRA")
    assert (int(head.group(2)), int(head.group(3))) == (1 + 5 * (20 + 1 + 8), 5)
    trainable = int(head.group(4).replace(",", ""))
    assert f"{trainable:,} trainable in" in out                       # train.py's optimizer count
    if lora_rank:
        assert trainable == 4 * lora_rank * (4 * (64 + 64) + 3 * (64 + 172))
    assert re.search(r"step [\d.]+ s, [\d.]+ samples/s in all, MFU n/a on a CPU, peak memory n/a on a CPU", out), out
    assert len(rows) == 2
    for row in rows:
        assert "loss_img" in row and row["loss"] == pytest.approx(10.0 * row["loss_img"], rel=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# The project: README's commands are what CI runs
# ----------------------------------------------------------------------------------------------------------------


def test_ci_installs_and_tests_exactly_as_the_readme_says():
    readme = open(os.path.join(HERE, "README.md"), encoding="utf-8").read()
    ci = open(os.path.join(HERE, ".ci", "run"), encoding="utf-8").read()
    said = [line.split("#")[0].split() for line in readme.splitlines() if line.startswith("pip install")]
    pytest_line = next(s for s in said if "pytest" in s)
    done = [line.split("#")[0].split() for line in ci.splitlines() if line.startswith("pip ")]
    # README: `pip install A && python -m pytest ...`; CI: `pip A` through its quiet wrapper, then the same pytest
    assert [s[2:] for s in said if s is not pytest_line] == [s[1:] for s in done if "pytest" not in s]
    assert pytest_line[2:pytest_line.index("&&")] == next(s for s in done if "pytest" in s)[1:]
    assert " ".join(pytest_line[pytest_line.index("&&") + 1:]).replace("python ", "python3 ") in ci


def test_readme_python_example_runs_as_written(tmp_path, monkeypatch):
    """README's mmi.py example, every statement but the one that loads the released files (not here), runs on the
    tiny preset and gives a loss, texts and pictures."""
    readme = open(os.path.join(HERE, "README.md"), encoding="utf-8").read()
    code = readme.split("```python\n", 1)[1].split("```", 1)[0]
    tree = ast.parse(code)
    tree.body = [s for s in tree.body if "from_original" not in ast.unparse(s)]
    monkeypatch.chdir(tmp_path)                           # save_pretrained("ckpt") writes here
    scope = {}
    exec(compile(tree, "README.md", "exec"), scope)
    assert torch.isfinite(scope["out"]["loss"]) and scope["texts"]["text_ids"].shape[0] == 2
    assert scope["imgs"]["image"].shape[1:] == (3, 64, 64) and (tmp_path / "ckpt" / "config.json").is_file()
