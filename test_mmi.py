"""Tests for mmi. CPU, tiny sizes, exact about what each checks. Run: python -m pytest -q test_mmi.py

Oracles: hand-written expected tensors, float64 loops written here, and (test-only) transformers / diffusers
modules at tiny random configs. Tests that need CUDA skip without it.
"""

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

import mmi

HERE = os.path.dirname(os.path.abspath(__file__))
REFERENCE = os.path.join(HERE, "assets", "reference")
torch.set_num_threads(min(2, torch.get_num_threads()))


def tiny_model(seed=0, perturb=True):
    """A tiny model whose zero-initialised branches (MMFS gates, adapter gammas) are set non-zero, so tests see them."""
    torch.manual_seed(seed)
    model = mmi.MMInterleaved(mmi.MMIConfig.from_preset("tiny"))
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


# ---------------------------------------------------------------------------------------------------------------
# Config and the paper-size architecture
# ---------------------------------------------------------------------------------------------------------------


def test_overrides_are_type_checked_and_unknown_keys_rejected():
    cfg = mmi.MMIConfig.from_preset("tiny")
    cfg2 = mmi.apply_overrides(cfg, ["--llm.hidden_size=96", "mmfs.spatial_shapes=(16, 8)", "vision.trainable=false"])
    assert cfg2.llm.hidden_size == 96 and cfg2.mmfs.spatial_shapes == (16, 8) and cfg2.vision.trainable is False
    assert cfg.llm.hidden_size == 64                                   # the original is untouched
    with pytest.raises(ValueError, match="llm.hidden_sise"):
        mmi.apply_overrides(cfg, ["llm.hidden_sise=3"])
    with pytest.raises(ValueError, match="cannot read 'abc' as int"):
        mmi.apply_overrides(cfg, ["llm.hidden_size=abc"])
    assert mmi.MMIConfig.from_dict(cfg2.to_dict()) == cfg2


def test_mmi_13b_on_meta_matches_the_original_state_dict_and_parameter_counts():
    with torch.device("meta"):
        model = mmi.MMInterleaved(mmi.MMIConfig.from_preset("mmi-13b"))
    with open(os.path.join(REFERENCE, "mm_interleaved_13b.json")) as f:
        ref = {k: v for k, v in json.load(f).items() if not k.startswith("image_decoder.")}
    with open(os.path.join(REFERENCE, "mm_interleaved_13b_summary.json")) as f:
        summary = json.load(f)
    ours = {k: list(v.shape) for k, v in model.state_dict().items() if not k.startswith("image_decoder.")}
    assert ours == ref
    for name, module in model.named_children():
        if name == "image_decoder" or module is None:
            continue
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
    assert trainable == {n for n in summary["trainable_parameter_names"] if not n.startswith("image_decoder.")}
    assert frozen == {n for n in summary["frozen_parameter_names"] if not n.startswith("image_decoder.")}


def test_tiny_preset_builds_on_meta_and_cpu():
    with torch.device("meta"):
        mmi.MMInterleaved(mmi.MMIConfig.from_preset("tiny"))
    model = tiny_model(perturb=False)
    assert sum(p.numel() for p in model.parameters()) < 5_000_000


# ---------------------------------------------------------------------------------------------------------------
# Masks and labels on a hand-built batch: 2 rows, 3 images, 2 documents in row 0
# ---------------------------------------------------------------------------------------------------------------

BOS, EOS, PAD, SOI, IMG = 1, 2, 255, 256, 257
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


def test_mmfs_relative_image_index_by_hand():
    # the relative index is the query_relpos row each image is read with: latest visible image 1, older 2, unseen 0
    mmfs = mmi.MMFS(d_query=4, d_value=4, d_out=4, d_attn=4, n_heads=1, n_points=1, spatial_shapes=[1],
                    base_spatial_shape=1, max_num_image_per_seq=3, offset_init_magnitude=0.0)
    with torch.no_grad():
        mmfs.query_relpos.weight.copy_(torch.tensor([[0.0] * 4, [1.0] * 4, [2.0] * 4]))
        mmfs.dynamic_offset_mask.weight.zero_()
    seen = {}
    mmfs.sampling_offsets.register_forward_hook(lambda mod, inp, out: seen.update(q=inp[0]))
    xmask = mmi.cross_attention_mask(HAND_IDS, HAND_NUM, SOI, BOS)
    mmfs(torch.zeros(2, 14, 4), torch.full((1, 14, 2), 0.5), torch.zeros(2, 2, 1, 4), xmask)
    rel = seen["q"][..., 0].permute(0, 2, 1)                               # (B, Lq, n)
    row0 = [[0, 0]] * 3 + [[1, 0]] * 4 + [[2, 1]] * 4 + [[0, 0]] * 3
    row1 = [[0, 0]] * 2 + [[1, 0]] * 12
    assert torch.equal(rel, torch.tensor([row0, row1], dtype=torch.float))


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
    out2 = model(dict(batch, loss_txt_weight=0.5))
    labels2 = mmi.text_labels(batch["text_ids"], batch["attention_mask"], cfg, ignore_noimage_cond=True)
    expected2 = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels2.reshape(-1))
    torch.testing.assert_close(out2["loss_txt"], expected2)
    torch.testing.assert_close(out2["loss"], 0.5 * expected2)


# ---------------------------------------------------------------------------------------------------------------
# Multi-scale deformable attention and MMFS against float64 loops written here
# ---------------------------------------------------------------------------------------------------------------


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


def mmfs_loop(mod, query, ref, value, mask):
    """SPEC §4.2 step by step in float64, with explicit loops over images, levels, heads and points."""
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


@pytest.mark.parametrize("mask_kind", ["2d", "3d", "3d-last-row"])
def test_mmfs_equals_float64_loop(mask_kind):
    torch.manual_seed(0)
    mod = mmi.MMFS(d_query=6, d_value=5, d_out=7, d_attn=4, n_heads=2, n_points=2, spatial_shapes=[4, 2],
                   base_spatial_shape=2, max_num_image_per_seq=5, offset_init_magnitude=1.0).double()
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


def test_mmfs_too_many_images_is_an_error():
    mod = mmi.MMFS(d_query=4, d_value=4, d_out=4, d_attn=4, n_heads=1, n_points=1, spatial_shapes=[1],
                   base_spatial_shape=1, max_num_image_per_seq=3, offset_init_magnitude=1.0)
    with pytest.raises(ValueError, match="3 images visible to one query, max_num_image_per_seq is 3"):
        mod(torch.zeros(1, 1, 4), torch.full((1, 1, 2), 0.5), torch.zeros(1, 3, 1, 4), torch.ones(1, 3))


def test_sincos_tables_follow_the_original_layout():
    t = mmi.get_2d_sincos_pos_embed(8, 3)                  # 2 frequencies per quarter
    token = 1 * 3 + 2                                       # row 1, column 2
    w = [1.0, 1.0 / 100.0]                                  # 10000^(-d/2) for d = 0, 1
    expected = [math.sin(1 * w[0]), math.sin(1 * w[1]), math.cos(1 * w[0]), math.cos(1 * w[1]),
                math.sin(2 * w[0]), math.sin(2 * w[1]), math.cos(2 * w[0]), math.cos(2 * w[1])]
    torch.testing.assert_close(t[token], torch.tensor(expected))
    torch.testing.assert_close(mmi.resize_pos_embed(t, (3, 3)), t)


# ---------------------------------------------------------------------------------------------------------------
# Zero-initialised branches
# ---------------------------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------------------------


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


def test_greedy_with_and_without_cache_and_batched_equals_one_by_one():
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


def test_generation_stops_at_eos_or_soi_and_respects_min_new_tokens():
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


def test_repetition_penalty_matches_the_hf_rule():
    logits = torch.tensor([[2.0, -1.0, 3.0, 0.5]])
    out = mmi._process_logits(logits, [[2]], step=5, min_new_tokens=0, repetition_penalty=2.0, stop_ids=(3,), bos_id=1)
    assert out.tolist() == [[2.0, -2.0, 1.5, 0.5]]                          # bos (1) and generated (2) penalised


# ---------------------------------------------------------------------------------------------------------------
# Training signal
# ---------------------------------------------------------------------------------------------------------------


def test_forward_backward_and_tiny_overfit():
    model = tiny_model(seed=5, perturb=False).train()
    cfg = model.cfg
    batch = make_batch(cfg, [[BOS, 20, 21, "img", 22, 23, 24, "img", 25, EOS], [BOS, "img", 26, 27, 28, 29, EOS]], 40)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    first = None
    for step in range(200):
        loss = model(batch)["loss_txt"] if False else model(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = loss.item() if first is None else first
        if loss.item() < 0.1 * first:
            break
    assert loss.item() < 0.1 * first, (first, loss.item(), step)
    # gradients reach the vision side through the MMFS and the image embeddings
    assert model.visual_tokenizer.proj.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------------


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
    bad_ids[1, 5] = 300
    with pytest.raises(ValueError, match=r"token id 300 at \[row, pos\] \[1, 5\] is outside \[0, 258\)"):
        model(dict(good, text_ids=bad_ids))
    cut = good["text_ids"].clone()
    cut[0, 4] = 10                                   # one <|image|> of the first image lost
    with pytest.raises(ValueError, match="row 0: num_image_per_seq says 2 images, text has 2 <|beginofimage|> and 15"):
        model(dict(good, text_ids=cut))
    small = mmi.MMInterleaved(mmi.apply_overrides(cfg, {"mmfs.max_num_image_per_seq": 2}))
    many = make_batch(cfg, [[BOS, "img", "img", "img"]], 30)
    with pytest.raises(ValueError, match="a row has 3 images, more than max_num_image_per_seq 2"):
        small(many)


# ---------------------------------------------------------------------------------------------------------------
# Oracle parity: tiny random transformers models, saved and loaded by key
# ---------------------------------------------------------------------------------------------------------------


def _load_safetensors_dir(path):
    from safetensors.torch import load_file
    files = [f for f in os.listdir(path) if f.endswith(".safetensors")]
    sd = {}
    for f in files:
        sd.update(load_file(os.path.join(path, f)))
    return sd


def test_llama_matches_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
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


def test_clip_vision_matches_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
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


@pytest.mark.parametrize("frequency", [1, 2])
def test_qformer_matches_transformers_blip2(frequency):
    transformers = pytest.importorskip("transformers")
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
