"""Score mmi the way the MM-Interleaved paper does, on the evaluation sets laid out as the original README shows.

    python eval.py                # the demo scoreboard: the embedded model (assets/demo) on held-out shape stories
    python eval.py --task=coco_karpathy --data_root=assets/datasets --init_from=out/mmi-13b --limit=100
    torchrun --nproc_per_node=8 eval.py --task=vqav2 --data_root=... --init_from=...
    python eval.py --task=coco_t2i ... --inception=pt_inception-2015-12-05-6726825d.pth --clip=clip-vit-large-patch14/

Tasks (the original mm_eval.yaml's sets; its "coco" text-to-image set is `coco_t2i` here): coco_karpathy,
flickr30k, nocaps, image2paragraph (BLEU-4, CIDEr); vqav2, okvqa, textvqa, vizwiz_vqa (VQA accuracy); visdial (NDCG);
coco_t2i, lncoco (FID); after fine-tuning (train.py configs/sft_*_13b.py): vist, pororo, flintstones (FID and CLIP
image similarity of the drawn frames, MMFS on and off), ade20k (mIoU); demo; demo_qa (answers about shape scenes).
Results JSON, out/eval/<task>.json by default (<task>-2.json, ... where it exists; --out), never written over an
earlier file: the config, the metrics, every sample's output, and the samples skipped for a missing or unreadable
image, counted by reason. While a run goes, its predictions so far are kept in out/eval/<task>.partial.json; after a
crash the same command with --resume predicts only the other samples and writes the results an uninterrupted run
would. Text-to-image tasks write their images to out/eval/<task>_images/.

Layout under --data_root (the original README's tree; the files each task reads):
    coco/annotations/coco_karpathy_test.json, coco_karpathy_test_gt.json, captions_val2014.json; coco/val2014/
    flickr30k/test1k.token.coco_format, flickr30k/flickr30k-images/
    nocaps/nocaps_val_4500_captions.json, nocaps/images/
    image2paragraph/annotations/paragraphs_coco.json, test_split.json; image2paragraph/images/
    lncoco/coco_val_captions.jsonl (images in coco/val2017/)
    VQAv2/v2_mscoco_val2014_annotations.json, v2_OpenEnded_mscoco_val2014_questions.json (images in coco/val2014/)
    OK-VQA/mscoco_val2014_annotations.json, OpenEnded_mscoco_val2014_questions.json (images in coco/val2014/)
    textvqa/textvqa_val_annotations.json, textvqa_val_questions.json, textvqa/train_images/
    VizWiz/val.json, VizWiz/val/
    visdial/visdial_1.0_val.json, visdial_1.0_val_dense_annotations.json, visdial/VisualDialog_val2018/
    vist/annotations/test_formatted_filtered.json, vist/images/test_images/
    pororo/descriptions.npy, img_cache4.npy, following_cache4.npy, train_seen_unseen_ids.npy, pororo/<frame strips>
    flintstones/following_cache4.pkl, train-val-test_split.json, flintstones_annotations_v1-0.json,
        flintstones/video_frames_sampled_png/
    ADEChallengeData2016/validation.json, images/validation/, annotations/validation/ (+ annotations_with_color/)

Sections follow the work: one reader per evaluation set -> prompts, batches and generation -> the metrics (caption
metrics: PTB-style tokenisation, BLEU, CIDEr-D; VQA accuracy; VisDial NDCG; FID: Inception-v3 with the FID weights,
Frechet distance; CLIP ViT-L/14 for best-of-8 re-ranking) -> the demo scoreboard -> the task runners, pre-trained
then fine-tuned -> distribution over ranks -> model loading, the run and the command line.
Every metric is implemented here with numpy/torch; the tests check them against pycocoevalcap, scipy,
transformers' CLIP and hand-computed cases.
"""

import argparse
import glob
import itertools
import json
import math
import os
import pickle
import re
import sys
import time
import zipfile
import zlib
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

import data
import mmi
from mmi import InputError

# ---------------------------------------------------------------------------------------------------------------
# Readers: one per evaluation set, each reading the original layout under --data_root
# ---------------------------------------------------------------------------------------------------------------
# Every reader returns a list of plain dicts (JSON-serialisable): "id" (the key the original scores by),
# "image" (a path) and the task's fields. References for scoring are read separately (`*_references`).
# A malformed annotation file is an InputError naming the file, the record and the field; a missing image is not
# (the run skips and counts it).

def _annotation_json(path, what):
    return data.annotation_json(path, what, " (expected the original evaluation layout, see eval.py --help)")


def _short(value):
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


_TYPE_NAMES = {int: "an integer", str: "a string", list: "a list", dict: "an object"}


def _require(record, fields, where):
    """`record` must be an object with `fields`: names, or {name: expected type or tuple of types}. -> record"""
    if not isinstance(record, dict):
        raise InputError(f"{where}: expected an object with fields {list(fields)}, got {_short(record)}")
    for k in fields:
        if k not in record:
            raise InputError(f"{where}: missing field {k!r} (expected fields {list(fields)})")
        want = fields[k] if isinstance(fields, dict) else object
        if want is not object and (not isinstance(record[k], want) or isinstance(record[k], bool)):
            names = " or ".join(_TYPE_NAMES[t] for t in (want if isinstance(want, tuple) else (want,)))
            raise InputError(f"{where}: field {k!r} is {_short(record[k])}, expected {names}")
    return record


def _require_list(value, where):
    if not isinstance(value, list):
        raise InputError(f"{where}: expected a list of records, got {_short(value)}")
    return value


def _coco_id_from_name(name, where):
    # "val2014/COCO_val2014_000000391895.jpg" -> 391895
    digits = os.path.splitext(name)[0].split("_")[-1]
    if not digits.isdecimal():               # "²" is a digit that int() refuses
        raise InputError(f"{where}: field 'image' is {name!r}, expected a COCO file name ending in its image id "
                         f"(e.g. val2014/COCO_val2014_000000391895.jpg)")
    return int(digits)


def _first_per_image(samples):
    """Keep the first sample of every image id (the original evaluates each image once)."""
    first = {}
    for s in samples:
        first.setdefault(s["id"], s)
    return list(first.values())


def read_coco_karpathy(root):
    path = os.path.join(root, "coco", "annotations", "coco_karpathy_test.json")
    items = _require_list(_annotation_json(path, "Karpathy test split"), path)
    samples = []
    for i, it in enumerate(items):
        _require(it, {"image": str}, f"{path}[{i}]")
        samples.append({"id": _coco_id_from_name(it["image"], f"{path}[{i}]"),
                        "image": os.path.join(root, "coco", it["image"])})
    return _first_per_image(samples)


def _coco_format_captions(path, image_dir, what):
    meta = _require(_annotation_json(path, what), {"images": list, "annotations": list}, path)
    names = {}
    for i, im in enumerate(meta["images"]):
        _require(im, {"id": (int, str), "file_name": str}, f"{path}: images[{i}]")
        names[im["id"]] = im["file_name"]
    samples = []
    for i, ann in enumerate(meta["annotations"]):
        _require(ann, {"image_id": (int, str), "caption": str}, f"{path}: annotations[{i}]")
        if ann["image_id"] not in names:
            raise InputError(f"{path}: annotations[{i}] has image_id {ann['image_id']!r} not listed in 'images'")
        samples.append({"id": ann["image_id"], "image": os.path.join(image_dir, names[ann["image_id"]])})
    return _first_per_image(samples)


def read_flickr30k(root):
    return _coco_format_captions(os.path.join(root, "flickr30k", "test1k.token.coco_format"),
                                 os.path.join(root, "flickr30k", "flickr30k-images"), "Flickr30k test-1k captions")


def read_nocaps(root):
    return _coco_format_captions(os.path.join(root, "nocaps", "nocaps_val_4500_captions.json"),
                                 os.path.join(root, "nocaps", "images"), "NoCaps validation captions")


def read_image2paragraph(root):
    base = os.path.join(root, "image2paragraph")
    path = os.path.join(base, "annotations", "paragraphs_coco.json")
    anns = _require(_annotation_json(path, "Stanford paragraphs (COCO format)"), {"annotations": list}, path)
    split_path = os.path.join(base, "annotations", "test_split.json")
    split = _require_list(_annotation_json(split_path, "paragraph test split"), split_path)
    for i, x in enumerate(split):
        if not isinstance(x, (int, str)) or isinstance(x, bool):
            raise InputError(f"{split_path}[{i}]: {_short(x)} is not an image id")
    split = set(split)
    by_image = {}
    for i, a in enumerate(anns["annotations"]):
        _require(a, {"image_id": (int, str), "url": str}, f"{path}: annotations[{i}]")
        by_image[a["image_id"]] = a                       # the original keeps the last record per image
    # image path = the last two parts of the url (e.g. ".../VG_100K_2/123.jpg")
    return [{"id": k, "image": os.path.join(base, "images", *a["url"].split("/")[-2:])}
            for k, a in by_image.items() if k in split]


_CAPTION_REFERENCES = {"coco_karpathy": ("coco", "annotations", "coco_karpathy_test_gt.json"),
                       "flickr30k": ("flickr30k", "test1k.token.coco_format"),
                       "nocaps": ("nocaps", "nocaps_val_4500_captions.json"),
                       "image2paragraph": ("image2paragraph", "annotations", "paragraphs_coco.json")}


def caption_references(task, root):
    """{image id: [reference captions]} from the file the original scores against."""
    path = os.path.join(root, *_CAPTION_REFERENCES[task])
    meta = _require(_annotation_json(path, "caption references"), {"annotations": list}, path)
    refs = {}
    for i, a in enumerate(meta["annotations"]):
        _require(a, {"image_id": (int, str), "caption": str}, f"{path}: annotations[{i}]")
        refs.setdefault(a["image_id"], []).append(a["caption"])
    return refs


def _answers(record, where):
    """The human answers of a checked VQA record: VQA-format {"answer": ...} dicts, or plain strings."""
    if not record["answers"]:
        raise InputError(f"{where}: field 'answers' is empty (VQA accuracy needs the human answers)")
    out = []
    for j, x in enumerate(record["answers"]):
        answer = x.get("answer") if isinstance(x, dict) else x
        if not isinstance(answer, str):
            raise InputError(f"{where}: answers[{j}] is {_short(x)}, expected a string or {{'answer': string}}")
        out.append(answer)
    return out


def _read_vqa(root, folder, ann_name, q_name, what, image_path, image_id=(int, str), question_fields=None):
    """VQA-format annotation and question files under root/folder, both checked -> samples in annotation order;
    image_path(question) is the image file."""
    ann_path, q_path = os.path.join(root, folder, ann_name), os.path.join(root, folder, q_name)
    anns = _require(_annotation_json(ann_path, f"{what} annotations"), {"annotations": list}, ann_path)
    qs = _require(_annotation_json(q_path, f"{what} questions"), {"questions": list}, q_path)
    by_id = {}
    for i, a in enumerate(anns["annotations"]):
        where = f"{ann_path}: annotations[{i}]"
        _require(a, {"question_id": (int, str), "image_id": image_id, "answers": list}, where)
        by_id[a["question_id"]] = dict(a, answers=_answers(a, where))
    fields = {"question_id": (int, str), "image_id": image_id, "question": str, **(question_fields or {})}
    for i, q in enumerate(qs["questions"]):
        _require(q, fields, f"{q_path}: questions[{i}]")
        a = by_id.get(q["question_id"])
        if a is None:
            raise InputError(f"{q_path}: questions[{i}] has question_id {q['question_id']} without an annotation "
                             f"in {ann_path}")
        if a["image_id"] != q["image_id"]:
            raise InputError(f"{q_path}: questions[{i}] image_id {q['image_id']} != annotation's {a['image_id']}")
    questions = {q["question_id"]: q for q in qs["questions"]}
    return [{"id": qid, "image": image_path(questions[qid]), "question": questions[qid]["question"],
             "answers": a["answers"]} for qid, a in by_id.items() if qid in questions]


def _coco_val2014(root, image_id):
    return os.path.join(root, "coco", "val2014", f"COCO_val2014_{image_id:012d}.jpg")


def read_vqav2(root):
    return _read_vqa(root, "VQAv2", "v2_mscoco_val2014_annotations.json", "v2_OpenEnded_mscoco_val2014_questions.json",
                     "VQAv2 val", lambda q: _coco_val2014(root, q["image_id"]), image_id=int)


def read_okvqa(root):
    return _read_vqa(root, "OK-VQA", "mscoco_val2014_annotations.json", "OpenEnded_mscoco_val2014_questions.json",
                     "OK-VQA val", lambda q: _coco_val2014(root, q["image_id"]), image_id=int)


def read_textvqa(root):
    return _read_vqa(root, "textvqa", "textvqa_val_annotations.json", "textvqa_val_questions.json", "TextVQA val",
                     lambda q: os.path.join(root, "textvqa", "train_images", q["image"]),
                     question_fields={"image": str})


def read_vizwiz(root):
    path = os.path.join(root, "VizWiz", "val.json")
    items = _require_list(_annotation_json(path, "VizWiz val"), path)
    out = []
    for i, it in enumerate(items):
        _require(it, {"image": str, "question": str, "answers": list}, f"{path}[{i}]")
        out.append({"id": it["image"], "image": os.path.join(root, "VizWiz", "val", it["image"]),
                    "question": it["question"], "answers": _answers(it, f"{path}[{i}]")})
    return out


def _pick(table, index, where, what):
    """table[index], where `index` must be an index into the `what` list of VisDial's data."""
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(table):
        raise InputError(f"{where} is {_short(index)}, expected an index into data's {len(table)} {what}")
    return table[index]


def read_visdial(root):
    """VisDial v1.0 val with dense annotations: one sample per dialog, asking the densely annotated round.

    "context" is the text the original puts after the image (see `visdial_context`): "caption: ...", the history,
    where (as in the original) the round just before the asked one is left out, then "question: ...? answer:"."""
    base = os.path.join(root, "visdial")
    path = os.path.join(base, "visdial_1.0_val.json")
    meta = _require(_annotation_json(path, "VisDial v1.0 val"), {"data": dict}, path)
    d = _require(meta["data"], {"dialogs": list, "questions": list, "answers": list}, f"{path}: data")
    dense_path = os.path.join(base, "visdial_1.0_val_dense_annotations.json")
    dense = {}
    for j, x in enumerate(_require_list(_annotation_json(dense_path, "VisDial dense annotations"), dense_path)):
        _require(x, {"image_id": int, "round_id": int, "gt_relevance": list}, f"{dense_path}[{j}]")
        dense[x["image_id"]] = (j, x)
    out = []
    for i, dlg in enumerate(d["dialogs"]):
        where = f"{path}: dialogs[{i}]"
        _require(dlg, {"image_id": int, "caption": str, "dialog": list}, where)
        if dlg["image_id"] not in dense:
            raise InputError(f"{dense_path}: no dense annotation for image_id {dlg['image_id']} (dialogs[{i}])")
        j, rel = dense[dlg["image_id"]]
        rounds, asked = dlg["dialog"], rel["round_id"] - 1
        if not 0 <= asked < len(rounds):
            raise InputError(f"{dense_path}[{j}]: round_id {rel['round_id']} is not one of dialogs[{i}]'s "
                             f"{len(rounds)} rounds")
        text = f" caption: {dlg['caption']}. "
        for k, r in enumerate(rounds[:max(asked - 1, 0)]):
            _require(r, ("question", "answer"), f"{where}.dialog[{k}]")
            text += (f"question: {_pick(d['questions'], r['question'], f'{where}.dialog[{k}].question', 'questions')}"
                     f"? answer: {_pick(d['answers'], r['answer'], f'{where}.dialog[{k}].answer', 'answers')}. ")
        r = _require(rounds[asked], {"question": object, "answer_options": list}, f"{where}.dialog[{asked}]")
        text += f"question: {_pick(d['questions'], r['question'], f'{where}.dialog[{asked}].question', 'questions')}"
        text += "? answer:"
        options = [_pick(d["answers"], o, f"{where}.dialog[{asked}].answer_options[{n}]", "answers")
                   for n, o in enumerate(r["answer_options"])]
        relevance = rel["gt_relevance"]
        if len(options) != len(relevance):
            raise InputError(f"{dense_path}: image_id {dlg['image_id']} has {len(relevance)} relevances "
                             f"for {len(options)} answer options")
        if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in relevance) or not any(relevance):
            raise InputError(f"{dense_path}[{j}]: gt_relevance must be numbers, not all zero (NDCG is undefined "
                             f"without a relevant option); got {_short(relevance)}")
        if not all(math.isfinite(x) and x >= 0 for x in relevance):      # NaN would make NDCG, and the JSON, NaN
            raise InputError(f"{dense_path}[{j}]: gt_relevance must be finite numbers >= 0; got {_short(relevance)}")
        out.append({"id": dlg["image_id"], "context": text, "options": options, "relevance": relevance,
                    "image": os.path.join(base, "VisualDialog_val2018",
                                          f"VisualDialog_val2018_{dlg['image_id']:012d}.jpg")})
    return out


def read_coco_t2i(root, total_length=30_000):
    """MS-COCO val2014 text-to-image: the first caption of each image, the first `total_length` images."""
    path = os.path.join(root, "coco", "annotations", "captions_val2014.json")
    meta = _require(_annotation_json(path, "COCO val2014 captions"), {"annotations": list}, path)
    out, seen = [], set()
    for i, a in enumerate(meta["annotations"]):
        _require(a, {"image_id": int, "caption": str}, f"{path}: annotations[{i}]")
        if a["image_id"] in seen:
            continue
        seen.add(a["image_id"])
        out.append({"id": len(out), "caption": a["caption"].lower(), "image": _coco_val2014(root, a["image_id"])})
    return out[:total_length]


def read_lncoco(root, total_length=30_000, seed=0):
    """LN-COCO: every caption of coco_val_captions.jsonl; when there are fewer than `total_length`, extra
    captions are drawn with probability inversely proportional to their image's caption count (the original
    draws unseeded; here the draw is seeded)."""
    path = os.path.join(root, "lncoco", "coco_val_captions.jsonl")
    if not os.path.isfile(path):
        raise InputError(f"{path}: LN-COCO captions not found (expected the original evaluation layout, see "
                         f"eval.py --help)")
    items = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f):
            if line.strip():
                try:
                    it = json.loads(line)
                except json.JSONDecodeError as e:
                    raise InputError(f"{path}:{n + 1}: not a JSON line ({e})") from None
                except RecursionError:
                    raise InputError(f"{path}:{n + 1}: nested too deeply to read") from None
                _require(it, {"image_id": (int, str), "caption": str}, f"{path}:{n + 1}")
                if isinstance(it["image_id"], str) and not it["image_id"].isdecimal():
                    raise InputError(f"{path}:{n + 1}: field 'image_id' is {_short(it['image_id'])}, expected a "
                                     f"COCO image id")
                items.append(it)
    if len(items) >= total_length:
        items = items[:total_length]
    elif items:
        per_image = Counter(it["image_id"] for it in items)
        w = np.array([1.0 / per_image[it["image_id"]] for it in items])
        extra = np.random.default_rng(seed).choice(len(items), total_length - len(items), p=w / w.sum())
        items = items + [items[j] for j in extra]
    return [{"id": i, "caption": it["caption"],
             "image": os.path.join(root, "coco", "val2017", f"{int(it['image_id']):012d}.jpg")}
            for i, it in enumerate(items)]


# ---------------------------------------------------------------------------------------------------------------
# Prompts (the original collators' strings) and batches
# ---------------------------------------------------------------------------------------------------------------

def caption_prompt(num_img_token):
    return data.image_placeholder(num_img_token) + " a photo of"


def t2i_prompt(caption, num_img_token):
    # the original's collator strips the whole prompt, so a caption's leading spaces go
    return (caption.lstrip() + " " + data.image_placeholder(num_img_token)).lstrip()


def paragraph_prompt(num_img_token):
    return data.image_placeholder(num_img_token) + "Please describe the image in detail. The image depicts"


def vqa_prompt(question, num_img_token):
    return (f"Based on the image, please answer the question. {data.image_placeholder(num_img_token)}{question} "
            f"Please provide an accurate answer within one word. The answer is:")


def vizwiz_prompt(question, num_img_token):
    return (f"Based on the image, please answer the question. {data.image_placeholder(num_img_token)}{question} "
            f"When the provided information is insufficient, respond with 'Unanswerable'. Please provide an "
            f"accurate answer within one word. The answer is:")


# The original generation settings per prompt kind. Its min_length counted a dummy bos, hence
# min_new_tokens = min_length - 1; its max_length was the number of new tokens.
CAPTION_GENERATION = dict(max_new_tokens=20, min_new_tokens=7, num_beams=5, length_penalty=1.0)
PARAGRAPH_GENERATION = dict(max_new_tokens=90, min_new_tokens=89, num_beams=5, length_penalty=1.0,
                            repetition_penalty=1.2)
VQA_GENERATION = dict(max_new_tokens=10, min_new_tokens=0, num_beams=3, length_penalty=0.0)


def load_eval_image(path, size):
    """An evaluation image through the 224-style centre crop (at the model's image size) -> float [3, S, S].
    A missing or unreadable file raises data.SkipSample."""
    return data.encoder_image(data.load_image(path), size)


def skipped(sample, e):
    """The output of a sample the run could not use (a data.SkipSample): counted by reason, left out of the score."""
    return {"id": sample["id"], "skipped": e.reason, "detail": e.detail}


def check_prompt_length(num_tokens, new_tokens, cfg):
    """A prompt whose tokens and the `new_tokens` after them exceed the model's positions is skipped (SkipSample
    "prompt_too_long"): the model never saw such positions, and the attention mask grows as the length squared."""
    limit = cfg.llm.max_position_embeddings
    if num_tokens + new_tokens > limit:
        raise data.SkipSample("prompt_too_long", f"{num_tokens} prompt tokens + {new_tokens} new, more than "
                                                 f"max_position_embeddings {limit}")


def _load_images(chunk, load):
    """-> ({index in chunk: load(sample)} for the samples whose images load, {index: skip record} for the others)."""
    images, skips = {}, {}
    for i, s in enumerate(chunk):
        try:
            images[i] = load(s)
        except data.SkipSample as e:
            skips[i] = skipped(s, e)
    return images, skips


def text_batch(prompts, images, tokenizer, pad_left=True):
    """Prompts and their [3, S, S] images (one per image placeholder, in order) -> the model's batch dict, padded
    with pad ids on the left (generation) or right (drawing), mask 0 on padding."""
    ids = [tokenizer.encode(p) for p in prompts]
    return dict(text_ids=data.pad_rows(ids, tokenizer.pad_id, pad_left),
                attention_mask=data.pad_rows([[1] * len(x) for x in ids], 0, pad_left),
                image_tensors=torch.stack(images),
                num_image_per_seq=torch.tensor([p.count(data.SOI_TOKEN) for p in prompts]))


def _to_device(batch, device):
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def _batches(samples, batch_size, desc):
    for i in tqdm(range(0, len(samples), batch_size), desc=desc, disable=False):
        yield samples[i:i + batch_size]


def generate_ids(model, tokenizer, prompts, images, generation, device):
    """One generate call over left-padded prompts -> each one's new token ids (its stop token last, if any)."""
    out = model.generate_texts(_to_device(text_batch(prompts, images, tokenizer), device), **generation)
    return [ids[:n] for ids, n in zip(out["text_ids"].tolist(), out["lengths"].tolist())]


def _generate_texts(model, tokenizer, prompts, images, generation, device):
    """One generate call over left-padded prompts -> their texts (special tokens skipped, stripped)."""
    ids = generate_ids(model, tokenizer, prompts, images, generation, device)
    return [tokenizer.decode(x).strip() for x in ids]


@torch.no_grad()
def generate_answers(model, tokenizer, samples, make_prompt, generation, batch_size, device, desc, make_output):
    """Generate a text for every sample; yields make_output(sample, text) per sample, in order, as each batch
    finishes, or a skip record for a sample whose image cannot be read or whose prompt is too long for the model
    (check_prompt_length)."""
    def load(s):
        image = load_eval_image(s["image"], model.cfg.vision.image_size)
        check_prompt_length(len(tokenizer.encode(make_prompt(s))), generation["max_new_tokens"], model.cfg)
        return image

    for chunk in _batches(samples, batch_size, desc):
        images, skips = _load_images(chunk, load)
        texts = {}
        if images:
            texts = dict(zip(images, _generate_texts(model, tokenizer, [make_prompt(chunk[i]) for i in images],
                                                     list(images.values()), generation, device)))
        for i, s in enumerate(chunk):
            yield skips[i] if i in skips else make_output(s, texts[i])


@torch.no_grad()
def option_log_likelihoods(model, tokenizer, context_ids, image, options, rows_per_pass=8):
    """Summed log-probability of each option's tokens after the context (VisDial ranking).

    Rows are context + option, right-padded: with causal attention the padding after an option cannot change
    its tokens' logits, so no mask is needed. Options are tokenised without bos."""
    scores = []
    c = len(context_ids)
    for i in range(0, len(options), rows_per_pass):
        opts = [tokenizer.encode(o, add_bos=False) for o in options[i:i + rows_per_pass]]
        text_ids = data.pad_rows([context_ids + o for o in opts], tokenizer.pad_id)
        batch = dict(text_ids=text_ids.to(image.device), image_tensors=image[None].expand(len(opts), -1, -1, -1),
                     num_image_per_seq=torch.ones(len(opts), dtype=torch.long, device=image.device))
        logp = model.text_logits(batch)[:, c - 1:-1].log_softmax(-1)                    # (n, L - c, V)
        for r, o in enumerate(opts):
            picked = logp[r, torch.arange(len(o)), torch.tensor(o, device=logp.device)]
            scores.append(float(picked.sum()))
    return scores


# ---------------------------------------------------------------------------------------------------------------
# Caption metrics: PTB-style tokenisation, BLEU-1..4, CIDEr-D (as pycocoevalcap computes them)
# ---------------------------------------------------------------------------------------------------------------

# Tokens the COCO caption toolkit drops after Stanford's PTBTokenizer has run. Its bracket names are upper-case
# while -lowerCase makes the tokenizer emit "-lrb-": brackets survive into the scored captions, and so they do here.
PTB_PUNCTUATION = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--",
                   "...", ";"}
_PTB_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "{": "-lcb-", "}": "-rcb-", "[": "-lsb-", "]": "-rsb-", '"': "''"}
_PTB_SPLIT_WORDS = {"cannot": ("can", "not"), "gonna": ("gon", "na"), "gotta": ("got", "ta"),
                    "wanna": ("wan", "na"), "lemme": ("lem", "me"), "gimme": ("gim", "me")}
_PTB_CLITIC = re.compile(r"^(.+?)(n't|'s|'re|'ve|'ll|'d|'m)$")
_PTB_ABBREV = re.compile(r"^([a-z]\.)+[a-z]?\.?$|^(mr|mrs|ms|dr|st|jr|sr|vs|etc|inc|co|corp|ltd|no)\.$")
_PTB_EDGE = "([{\"'`;:,!?)]}"


def ptb_tokenize(text):
    """Lower-cased tokens as pycocoevalcap's PTBTokenizer (Stanford CoreNLP 3.4.1, -lowerCase) yields them, with
    its punctuation tokens removed; returned joined by single spaces.

    A pure-Python approximation of the Java tokeniser: it splits off edge punctuation, clitics ("n't", "'s",
    "'re", ...), "cannot"/"gonna"-style words, "$", "#" and "%", and a final period unless the word is an
    abbreviation. Known differences: CoreNLP's full abbreviation list, emoticons (":)"), HTML entities
    ("&amp;"), "y'all"/"'tis" splits and unicode quotes are not reproduced (rare in generated captions).
    """
    out = []
    for chunk in text.replace("\n", " ").lower().split():
        out.extend(_PTB_BRACKETS.get(t, t) for t in _ptb_chunk(chunk))
    return " ".join(t for t in out if t not in PTB_PUNCTUATION)


def _ptb_chunk(chunk):
    if chunk == "'n'" or re.fullmatch(r"'\d0s", chunk):        # "rock 'n' roll", "the '80s" stay whole
        return [chunk]
    head, tail = [], []
    while chunk and (chunk[0] in _PTB_EDGE or chunk[0] == "$" or chunk[:1] == "#" and chunk[1:2].isdigit()):
        n = 2 if chunk[:2] in ("``", "''") else 1
        head.append(chunk[:n])
        chunk = chunk[n:]
    while chunk:
        run = re.search(r"[!?]+$", chunk)
        if chunk.endswith("...") and len(chunk) > 3:
            tail.insert(0, "...")
            chunk = chunk[:-3]
        elif run and run.end() - run.start() > 1:              # "!!", "?!" are one token, and not dropped
            tail.insert(0, run.group())
            chunk = chunk[:run.start()]
        elif chunk[-1] in _PTB_EDGE or chunk[-1] == "%":
            tail.insert(0, chunk[-1])
            chunk = chunk[:-1]
        elif chunk[-1] == "." and len(chunk) > 1 and not _PTB_ABBREV.match(chunk):
            tail.insert(0, ".")
            chunk = chunk[:-1]
        else:
            break
    middle = []
    if chunk:
        if chunk in _PTB_SPLIT_WORDS:
            middle = list(_PTB_SPLIT_WORDS[chunk])
        else:
            m = _PTB_CLITIC.match(chunk)
            middle = [m.group(1), m.group(2)] if m else [chunk]
    return head + middle + tail


def _ngrams(words, n):
    """Counts of every 1..n-gram of a token list."""
    return Counter(tuple(words[i:i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


def bleu(refs, cands, n=4):
    """Corpus BLEU-1..n over tokenised captions, as pycocoevalcap's Bleu(4) ("closest" reference length).

    refs: {id: [str, ...]}, cands: {id: str}. Returns ([BLEU-1..n] for the corpus, per-sample [[BLEU-k per id]]).
    The corpus brevity penalty uses the summed lengths of each candidate's closest reference (ties: shorter).
    """
    tiny, small = 1e-15, 1e-9          # pycocoevalcap's guards: a zero match count gives ~0, never a division by 0
    total_guess, total_correct = [0] * n, [0] * n
    total_test = total_ref = 0
    per_sample = [[] for _ in range(n)]
    for key in refs:
        words = cands[key].split()
        ref_words = [r.split() for r in refs[key]]
        clip = Counter()
        for r in ref_words:
            clip |= _ngrams(r, n)                                   # n-gram counts clipped at the per-ref maximum
        correct = [0] * n
        for gram, count in _ngrams(words, n).items():
            correct[len(gram) - 1] += min(count, clip[gram])
        guess = [max(0, len(words) - k) for k in range(n)]
        ref_len = min((abs(len(r) - len(words)), len(r)) for r in ref_words)[1]
        total_test += len(words)
        total_ref += ref_len
        total_guess = [a + b for a, b in zip(total_guess, guess)]
        total_correct = [a + b for a, b in zip(total_correct, correct)]
        for k, score in enumerate(_bleu_from_counts(correct, guess, len(words), ref_len, tiny, small)):
            per_sample[k].append(score)
    corpus = _bleu_from_counts(total_correct, total_guess, total_test, total_ref, tiny, small)
    return corpus, per_sample


def _bleu_from_counts(correct, guess, test_len, ref_len, tiny, small):
    scores, prod = [], 1.0
    for k in range(len(correct)):
        prod *= (float(correct[k]) + tiny) / (float(guess[k]) + small)
        scores.append(prod ** (1.0 / (k + 1)))
    ratio = (test_len + tiny) / (ref_len + small)
    if ratio < 1:
        scores = [s * math.exp(1 - 1 / ratio) for s in scores]
    return scores


def cider_d(refs, cands, n=4, sigma=6.0):
    """CIDEr-D as pycocoevalcap's `Cider` computes it. refs: {id: [str, ...]}, cands: {id: str}, tokenised.

    Per n: tf-idf vectors with document frequencies counted over the references of the evaluated set, the
    candidate's weights clipped at the reference's, cosine similarity times a Gaussian length penalty
    (sigma 6), averaged over n and references, times 10. Returns (mean, per-sample list).
    Like pycocoevalcap, the "length" in the penalty is the number of bigrams (words - 1), not of words.
    """
    keys = list(refs)
    ref_counts = {k: [_ngrams(r.split(), n) for r in refs[k]] for k in keys}
    doc_freq = Counter()
    for k in keys:
        doc_freq.update(set(g for c in ref_counts[k] for g in c))
    log_num_docs = np.log(float(len(keys)))

    def tfidf(counts):
        vec = [dict() for _ in range(n)]
        norm = [0.0] * n
        n_bigrams = 0
        for gram, tf in counts.items():
            k = len(gram) - 1
            vec[k][gram] = float(tf) * (log_num_docs - np.log(max(1.0, doc_freq[gram])))
            norm[k] += vec[k][gram] ** 2
            if k == 1:
                n_bigrams += tf
        return vec, [np.sqrt(x) for x in norm], n_bigrams

    scores = []
    for k in keys:
        vec, norm, length = tfidf(_ngrams(cands[k].split(), n))
        total = np.zeros(n)
        for counts in ref_counts[k]:
            vec_r, norm_r, length_r = tfidf(counts)
            penalty = np.e ** (-(float(length - length_r) ** 2) / (2 * sigma ** 2))
            for j in range(n):
                val = sum(min(w, vec_r[j].get(g, 0.0)) * vec_r[j].get(g, 0.0) for g, w in vec[j].items())
                if norm[j] != 0 and norm_r[j] != 0:
                    val /= norm[j] * norm_r[j]
                total[j] += val * penalty
        scores.append(float(np.mean(total) / len(ref_counts[k]) * 10.0))
    return float(np.mean(scores)), scores


def caption_metrics(refs, cands):
    """Raw captions -> ({"Bleu_1".."Bleu_4", "CIDEr"}, {id: CIDEr}) after PTB-style tokenisation of both sides."""
    refs_t = {k: [ptb_tokenize(r) for r in v] for k, v in refs.items()}
    cands_t = {k: ptb_tokenize(cands[k]) for k in refs}
    corpus, _ = bleu(refs_t, cands_t)
    cider, per = cider_d(refs_t, cands_t)
    out = {f"Bleu_{k + 1}": s for k, s in enumerate(corpus)}
    out["CIDEr"] = cider
    return out, dict(zip(refs, per))


# ---------------------------------------------------------------------------------------------------------------
# VQA accuracy (the official VQA / VizWiz evaluation) and the original's answer post-processing
# ---------------------------------------------------------------------------------------------------------------

_VQA_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?",
              "!"]
# The official pattern: its "(?!<=\d)" is a (no-op) lookahead, not a lookbehind, so a period is dropped unless a
# digit follows it ("1.5" keeps its period, "3." loses it). Reproduced as the official scores depend on it.
_VQA_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_VQA_COMMA_NUMBER = re.compile(r"(\d)(,)(\d)")
_VQA_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                     "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_VQA_ARTICLES = {"a", "an", "the"}
# The official contraction table maps each apostrophe-less spelling to the written form; every key is its target
# with exactly one apostrophe removed, so the table is generated from the targets. Two official oddities are kept:
# "somebody'd" maps to "somebodyd", and the "I..." keys are capitalised (they never match lower-cased words).
_VQA_CONTRACTION_TARGETS = (
    "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't he'd "
    "he'd've he's how'd how'll how's I'd've I'm I've isn't it'd it'd've it'll ma'am mightn't mightn't've might've "
    "mustn't must've needn't not've o'clock oughtn't 'ow's'at shan't she'd've should've shouldn't shouldn't've "
    "somebody'd've somebody'll somebody's someone'd someone'd've someone'll someone's something'd something'd've "
    "something'll that's there'd there'd've there're there's they'd they'd've they'll they're they've 'twas wasn't "
    "we'd've we've weren't what'll what're what's what've when's where'd where's where've who'd who'd've who'll "
    "who's who've why'll why're why's won't would've wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've "
    "you'll you're you've").split()


def _contraction_table(curly=False):
    table = {}
    for target in _VQA_CONTRACTION_TARGETS:
        cuts = [i for i, ch in enumerate(target) if ch == "'"]
        for i in cuts:
            table[target[:i] + target[i + 1:]] = target
    table["somebody'd"] = "somebodyd"
    if curly:
        # VizWiz's copy of the table has typographic apostrophes in most (not all) entries, so its expansions
        # rarely equal the plain-apostrophe human answers; kept as the official VizWiz scores include this.
        straight = {"aint", "arent", "cant", "couldve", "couldnt", "weve", "wheres", "whove"}
        keep_key = {"couldn'tve", "hadn'tve"}
        table = {(k if k in straight or k in keep_key else k.replace("'", "\u2019")):
                 (v if k in straight else v.replace("'", "\u2019")) for k, v in table.items()}
    return table


_VQA_CONTRACTIONS = _contraction_table()
_VIZWIZ_CONTRACTIONS = _contraction_table(curly=True)


def vqa_normalize(answer, contractions=_VQA_CONTRACTIONS):
    """The official answer normalisation: punctuation, then number words -> digits, articles dropped,
    contractions restored."""
    answer = answer.replace("\n", " ").replace("\t", " ").strip()
    out = answer
    for p in _VQA_PUNCT:
        # glued punctuation ("a-b") becomes a space, punctuation next to a space (or any "1,000") vanishes
        if (p + " " in answer or " " + p in answer) or _VQA_COMMA_NUMBER.search(answer) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    out = _VQA_PERIOD.sub("", out)
    words = [_VQA_NUMBER_WORDS.get(w, w) for w in out.lower().split()]
    words = [contractions.get(w, w) for w in words if w not in _VQA_ARTICLES]
    return " ".join(words)


def vqa_accuracy(pred, gt_answers):
    """Official VQA accuracy of one answer against the (10) human answers: the mean, over each human left out in
    turn, of min(#other humans who gave the answer / 3, 1). As in the official code, both sides are normalised
    only when the humans disagree; otherwise they are only stripped."""
    gts = [a.replace("\n", " ").replace("\t", " ").strip() for a in gt_answers]
    pred = pred.replace("\n", " ").replace("\t", " ").strip()
    if len(set(gts)) > 1:
        gts = [vqa_normalize(a) for a in gts]
        pred = vqa_normalize(pred)
    return _leave_one_out_accuracy(pred, gts)


def vizwiz_accuracy(pred, gt_answers):
    """VizWiz accuracy: the prediction is always normalised (with VizWiz's contraction table), the human
    answers never are; then the same leave-one-out formula as VQA."""
    return _leave_one_out_accuracy(vqa_normalize(pred, _VIZWIZ_CONTRACTIONS), list(gt_answers))


def _leave_one_out_accuracy(pred, gts):
    accs = [min(1.0, sum(g == pred for j, g in enumerate(gts) if j != i) / 3.0) for i in range(len(gts))]
    return sum(accs) / len(accs)


def extract_answer(response):
    """The original's post-processing of a generated VQA answer (applied before the official evaluation):
    first line / sentence / clause, lower case, text after the first "is ", "are ", "a ", "an ", "the "
    (substring matches, in that order, so "this dog" keeps only "dog"), cut before " of", " or ", " and "."""
    response = response.replace('"', "")
    response = response.strip().split("\n")[0].split(".")[0].split(",")[0].split("!")[0].lower()
    for lead in ("is ", "are ", "a ", "an ", "the "):
        if lead in response:
            response = response.split(lead)[1]
    for cut in (" of", " or ", " and "):
        if cut in response:
            response = response.split(cut)[0]
    return response.strip()


# ---------------------------------------------------------------------------------------------------------------
# VisDial: ranks from option scores, NDCG on the dense relevance annotations
# ---------------------------------------------------------------------------------------------------------------

def scores_to_ranks(scores):
    """[N, K] option scores -> [N, K] ranks 1..K (1 = highest score; ties keep the sort's order)."""
    order = torch.as_tensor(scores).sort(dim=-1, descending=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(1, order.shape[1] + 1).expand_as(order).contiguous())
    return ranks


def ndcg(ranks, relevance):
    """VisDial NDCG: per dialog, DCG of the top-k predicted options against the DCG of the k most relevant,
    k = number of options with non-zero relevance; averaged over dialogs. ranks, relevance: [N, K]."""
    ranks = torch.as_tensor(ranks)
    relevance = torch.as_tensor(relevance, dtype=torch.float32)
    predicted = ranks.sort(dim=-1).indices                       # option indices, best first
    ideal = relevance.sort(dim=-1, descending=True).indices
    total = 0.0
    for i in range(ranks.shape[0]):
        k = int((relevance[i] != 0).sum())
        discounts = torch.log2(torch.arange(k, dtype=torch.float32) + 2)
        dcg = (relevance[i][predicted[i][:k]] / discounts).sum()
        best = (relevance[i][ideal[i][:k]] / discounts).sum()
        total += float(dcg / best)
    return total / ranks.shape[0]


# ---------------------------------------------------------------------------------------------------------------
# FID: the Inception-v3 of TensorFlow's FID (pytorch-fid weights) and the Frechet distance
# ---------------------------------------------------------------------------------------------------------------

FID_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) in float64.

    Tr((S1 S2)^(1/2)) is computed as Tr((A S2 A)^(1/2)) with A = S1^(1/2): the two products are similar, and
    A S2 A is symmetric positive semi-definite, so two symmetric eigendecompositions give the trace without
    a general (complex) matrix square root. Round-off eigenvalues below zero count as zero."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.shape[0],) * 2:
        raise ValueError(f"frechet_distance: means {mu1.shape}/{mu2.shape} and covariances {s1.shape}/{s2.shape} "
                         f"must be [D] and [D, D]")
    w, v = np.linalg.eigh((s1 + s1.T) / 2)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = root1 @ s2 @ root1
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def feature_statistics(features):
    """[N, D] features -> (mean [D], unbiased covariance [D, D]) in float64, as the FID reference computes them."""
    features = np.asarray(features, np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"FID statistics need at least 2 feature vectors [N, D], got shape {features.shape}")
    return features.mean(0), np.cov(features, rowvar=False)


class BasicConv2d(nn.Module):
    def __init__(self, cin, cout, **conv):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **conv)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_3x3(x):
    # the FID network averages over valid pixels only at the borders (TensorFlow's SAME average pooling)
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    def __init__(self, cin, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(cin, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, kernel_size=1)

    def forward(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_avg_pool_3x3(x))], 1)


class InceptionB(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionC(nn.Module):
    def __init__(self, cin, c7):
        super().__init__()
        row, col = dict(kernel_size=(1, 7), padding=(0, 3)), dict(kernel_size=(7, 1), padding=(3, 0))
        self.branch1x1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, **row)
        self.branch7x7_3 = BasicConv2d(c7, 192, **col)
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, **col)
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, **row)
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, **col)
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, **row)
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = x
        for conv in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                     self.branch7x7dbl_5):
            bd = conv(bd)
        return torch.cat([self.branch1x1(x), b7, bd, self.branch_pool(_avg_pool_3x3(x))], 1)


class InceptionD(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionE(nn.Module):
    def __init__(self, cin, max_pool):
        super().__init__()
        self.max_pool = max_pool               # the last block of the FID network max-pools its pool branch
        self.branch1x1 = BasicConv2d(cin, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(cin, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else _avg_pool_3x3(x)
        return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(pooled)], 1)


class FIDInceptionV3(nn.Module):
    """Inception-v3 as used for FID (TensorFlow's 2015-12-05 graph, ported by pytorch-fid): parameter names
    follow torchvision's Inception3, so `pt_inception-2015-12-05-6726825d.pth` loads by key. Returns the
    2048-d pool3 features of images in [0, 1] (any size; resized bilinearly to 299 first)."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, c7=128)
        self.Mixed_6c = InceptionC(768, c7=160)
        self.Mixed_6d = InceptionC(768, c7=160)
        self.Mixed_6e = InceptionC(768, c7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool=False)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)        # the 1008-class head: in the weights file, unused for features

    def forward(self, images):
        x = F.interpolate(images, size=(299, 299), mode="bilinear", align_corners=False)
        x = 2 * x - 1                                                     # [0, 1] -> [-1, 1]
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        return x.mean(dim=(2, 3))                                          # (N, 2048, 8, 8) -> (N, 2048)


def check_inception_path(path):
    if path is None or not os.path.isfile(path):
        raise InputError(f"FID needs the Inception weights file {FID_WEIGHTS_NAME} (pytorch-fid's FID weights); "
                         f"not found at {path!r}. Download it once and pass --inception=/path/to/{FID_WEIGHTS_NAME}")


def load_inception(path):
    """The FID Inception from a user-supplied pytorch-fid weights file (never downloaded here)."""
    check_inception_path(path)
    net = FIDInceptionV3()
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as e:
        raise InputError(f"{path}: not a readable PyTorch weights file ({mmi.torch_load_reason(e)})") from None
    if not isinstance(state, dict):
        raise InputError(f"{path}: not the FID Inception weights (holds a {type(state).__name__}, not a state dict)")
    shapes = {k: v.shape if torch.is_tensor(v) else None for k, v in state.items()}
    check_by_key(net, shapes, path, "the FID Inception weights", derived="num_batches_tracked")
    net.load_state_dict(state, strict=False)
    return net.eval()


def first_line(e):
    """An exception's message in one line: its first, or its type's name where it has none."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def check_by_key(net, shapes, path, what, derived):
    """InputError saying the file at `path` is not `what` where `shapes` ({key: shape, or None for what is not a
    tensor}) lacks a key of `net` (but those ending in `derived`), has one more, or one of another shape."""
    own = {k: v.shape for k, v in net.state_dict().items()}
    wrong = [k for k, shape in shapes.items() if k in own and shape != own[k]]
    missing = [k for k in own if k not in shapes and not k.endswith(derived)]
    unexpected = [k for k in shapes if k not in own]
    if missing or unexpected or wrong:
        raise InputError(f"{path}: not {what}; missing keys {missing[:5]}, unexpected keys {unexpected[:5]}, keys "
                         f"of another shape or type {wrong[:5]}")


def fid_image_tensor(pil_image, size=64, round_offset=round):
    """The original's FID preprocessing of one image (both sets): bicubic resize of the short side to `size` (the
    long side truncated to int(size * long / short), as torchvision does), centre crop with its offsets rounded
    by `round_offset`, [0, 1] float (3, size, size); the network then resizes to 299 itself."""
    w, h = pil_image.size
    new = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    arr = np.asarray(pil_image.convert("RGB").resize(new, resample=Image.BICUBIC))
    top, left = (int(round_offset((n - size) / 2)) for n in arr.shape[:2])
    arr = arr[top:top + size, left:left + size]
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))).float() / 255.0


@torch.no_grad()
def inception_features(net, images, batch_size=50, device="cpu"):
    """[N, 3, H, W] images in [0, 1] (or a list of PIL images) -> [N, 2048] float64 pool3 features."""
    if isinstance(images, (list, tuple)):
        images = torch.stack([fid_image_tensor(im) if isinstance(im, Image.Image) else im for im in images])
    net = net.to(device)
    out = [net(images[i:i + batch_size].to(device).float()).double().cpu()
           for i in tqdm(range(0, len(images), batch_size), desc="inception", disable=len(images) <= batch_size)]
    return torch.cat(out).numpy()


# ---------------------------------------------------------------------------------------------------------------
# CLIP ViT-L/14 (text and image towers) for the best-of-8 re-ranking of COCO text-to-image samples
# ---------------------------------------------------------------------------------------------------------------
# Module names follow transformers' CLIPModel, so openai/clip-vit-large-patch14's model.safetensors loads by key.

CLIP_MEAN, CLIP_STD = mmi.CLIP_MEAN, mmi.CLIP_STD


class ClipVisionTower(nn.Module):
    """CLIP's plain vision transformer (no adapter) with its post-LayerNorm, from mmi's embeddings and layers
    -> the class token's features [B, dim]."""

    def __init__(self, image_size, patch, dim, layers, heads, hidden, eps):
        super().__init__()
        cfg = mmi.VisionConfig(image_size=image_size, patch_size=patch, hidden_size=dim, num_hidden_layers=layers,
                               num_attention_heads=heads, intermediate_size=hidden, layer_norm_eps=eps)
        self.embeddings = mmi.CLIPVisionEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(dim, eps=eps)
        self.encoder = nn.ModuleDict({"layers": nn.ModuleList(
            mmi.CLIPEncoderLayer(dim, heads, hidden, eps) for _ in range(layers))})
        self.post_layernorm = nn.LayerNorm(dim, eps=eps)

    def forward(self, pixels):
        x = self.pre_layrnorm(self.embeddings(pixels))
        for layer in self.encoder["layers"]:
            x = layer(x)
        return self.post_layernorm(x[:, 0])                                             # (B, dim) class token


class CLIPScorer(nn.Module):
    """CLIP's two towers and projections: cosine similarity of captions and images. Defaults: ViT-L/14."""

    def __init__(self, image_size=224, patch=14, vision_dim=1024, vision_layers=24, vision_heads=16,
                 vision_hidden=4096, vocab=49408, text_dim=768, text_layers=12, text_heads=12, text_hidden=3072,
                 max_positions=77, projection_dim=768, eps=1e-5):
        super().__init__()
        self.image_size = image_size
        self.text_model = mmi.CLIPTextTransformer(vocab, text_dim, text_layers, text_heads, text_hidden,
                                                  max_positions, eps)
        self.vision_model = ClipVisionTower(image_size, patch, vision_dim, vision_layers, vision_heads,
                                            vision_hidden, eps)
        self.text_projection = nn.Linear(text_dim, projection_dim, bias=False)
        self.visual_projection = nn.Linear(vision_dim, projection_dim, bias=False)

    def text_features(self, ids, eos_positions):
        h = self.text_model(ids)[torch.arange(ids.shape[0], device=ids.device), eos_positions]   # (B, dim) at eos
        return F.normalize(self.text_projection(h), dim=-1)

    def image_features(self, pixels):
        mean = torch.tensor(CLIP_MEAN, device=pixels.device).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD, device=pixels.device).view(1, 3, 1, 1)
        return F.normalize(self.visual_projection(self.vision_model((pixels - mean) / std)), dim=-1)


def clip_image_tensor(pil_image, size=224):
    """CLIPProcessor's image path: fid_image_tensor's resize and crop with the offsets rounded down; normalisation
    happens in `CLIPScorer.image_features`."""
    return fid_image_tensor(pil_image, size, math.floor)


def check_clip_path(path):
    """-> the paths of the CLIP weights and tokenizer files in the --clip folder."""
    weights, tok_file = os.path.join(path or "", "model.safetensors"), os.path.join(path or "", "tokenizer.json")
    for f in (weights, tok_file):
        if path is None or not os.path.isfile(f):
            raise InputError(f"CLIP re-ranking needs openai/clip-vit-large-patch14's model.safetensors and "
                             f"tokenizer.json in --clip; not found: {f}")
    return weights, tok_file


def check_clip_files(path):
    """The --clip folder checked without reading its weights: its tokenizer.json loads and its model.safetensors
    holds CLIP ViT-L/14's tensors by key and shape. -> (the weights' path, tokenizers.Tokenizer)"""
    weights, tok_file = check_clip_path(path)
    import tokenizers
    try:
        tokenizer = tokenizers.Tokenizer.from_file(tok_file)
    except Exception as e:                        # tokenizers raises a bare Exception
        raise InputError(f"{tok_file}: not a tokenizers tokenizer.json ({first_line(e)})") from None
    shapes = {k: torch.Size(v[1]) for k, v in mmi.read_safetensors_header(weights).items() if clip_key(k)}
    with torch.device("meta"):
        check_by_key(CLIPScorer(), shapes, weights, "CLIP ViT-L/14", derived="position_ids")  # not in every file
    return weights, tokenizer


def clip_key(k):
    """Whether the scorer reads this key of a CLIP file (not the derived position ids, nor the logit scale)."""
    return not k.endswith("position_ids") and k != "logit_scale"


def load_clip(path):
    """(CLIPScorer, tokenizers.Tokenizer) from a folder holding openai/clip-vit-large-patch14's model.safetensors
    and tokenizer.json (never downloaded here)."""
    weights, tokenizer = check_clip_files(path)
    import safetensors.torch
    net = CLIPScorer()
    net.load_state_dict({k: v for k, v in safetensors.torch.load_file(weights).items() if clip_key(k)}, strict=False)
    return net.eval(), tokenizer


@torch.no_grad()
def clip_best_of(scorer, text_ids, images, num_candidates):
    """Index of the best candidate per caption. text_ids: one id list per caption (bos ... eos, as CLIP's
    tokenizer gives them); images: [num_candidates * B, 3, S, S] in [0, 1], copy-major (all captions' first
    candidate, then the second, ...), as the original's generator returns them. -> [B] candidate indices."""
    B, device = len(text_ids), images.device
    ids = data.pad_rows(text_ids, 0).to(device)                     # after eos: masked by causality, never read
    text = scorer.text_features(ids, torch.tensor([len(t) - 1 for t in text_ids], device=device))
    image = scorer.image_features(images)
    scores = (image.view(num_candidates, B, -1) * text[None]).sum(-1)                 # (num_candidates, B)
    return scores.argmax(0)


# ---------------------------------------------------------------------------------------------------------------
# The demo scoreboard: the embedded model on held-out shape stories, checked exactly against their scenes
# ---------------------------------------------------------------------------------------------------------------
# Captions are parsed back into scenes (data.parse_scene) and generated images read back into scenes
# (data.read_scene, exact on clean renders), so every number below is an exact comparison with the story's truth.

DEMO_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "demo")
DEMO_GENERATION = dict(max_new_tokens=40, min_new_tokens=0, num_beams=1)      # greedy captions
# A story's next sentence, sampled as sample.py writes the demo's stories: the original's nucleus sampling, but at
# least one new token where the original asks for 7: the demo's sentences are 5-9 tokens, and a minimum of 7 forces
# words past a short one's full stop ("the blue circle turns yellow. right."), while one keeps a text from ending
# before its first word.
DEMO_TEXT = dict(max_new_tokens=40, min_new_tokens=1, num_beams=1, do_sample=True, top_k=50, top_p=0.9)
DEMO_IMAGES = dict(steps=25, guidance_scale=3.0, sampler="ddim")
DEMO_STORIES_PER_CALL = 8   # stories whose captions, then whose images, share one generate call (speed only)


def read_demo(data_root, num_stories=40, start=0, limit=None):
    """The test split's stories from `start` on (never seen in training: the splits use disjoint seeds), the
    first `limit` of them."""
    num_stories = num_stories if limit is None else min(num_stories, limit)
    return [{"id": start + i, "seed": s.seed} for i, s in enumerate(data.demo_stories("test", num_stories, start))]


def demo_image(scene, size):
    """A clean render of a scene as the encoder sees it: [3, size, size] in [0, 1]."""
    return data.encoder_image(Image.fromarray(data.render_scene(scene)), size)


def demo_story_prompt(texts, n_img_tok, upto):
    """The story told as in training (image after each sentence), up to and including sentence `upto`'s image."""
    placeholder = data.image_placeholder(n_img_tok)
    return data.clean_image_spaces(" ".join(t + placeholder for t in texts[:upto + 1]))


def demo_draws(model, tokenizer, steps, device):
    """steps: (story, its images, k, seed) -> per step the scenes read from image k drawn with and without the
    UNet's MMFS. One generate call for all: every image keeps its own seed, so each is what a call of its own
    would draw. Right padding is harmless: an image's context ends at its soi and attention is causal."""
    if not steps:
        return []
    prompts, images, targets = [], [], []
    for story, imgs, k, _ in steps:
        prompts.append(demo_story_prompt(story.texts, model.cfg.num_img_token, k))
        targets.append(len(images) + k)                                   # flat index of the slot to draw
        images += imgs[:k] + [torch.full_like(imgs[k], 0.5)]             # a grey placeholder in that slot
    batch = _to_device(text_batch(prompts, images, tokenizer, pad_left=False), device)
    drawn = model.generate_images(batch, target_image_idxs=targets, seed=[seed for *_, seed in steps],
                                  progress=False, use_mmfs="both", **DEMO_IMAGES)["image"]
    scenes = [data.read_scene(img.float().cpu().numpy()) for img in drawn]
    return list(zip(scenes[:len(steps)], scenes[len(steps):]))           # all with MMFS first, then all without


@torch.no_grad()
def demo_caption_ids(model, tokenizer, first_images, device):
    """The greedy captions (DEMO_GENERATION) of stories' first images [3, S, S], in one generate call (batched
    greedy = one at a time) -> each caption's token ids."""
    prompts = [data.image_placeholder(model.cfg.num_img_token)] * len(first_images)
    return generate_ids(model, tokenizer, prompts, first_images, DEMO_GENERATION, device)


@torch.no_grad()
def predict_demo(model, tokenizer, samples, args, stories_per_call=DEMO_STORIES_PER_CALL):
    """Per story: a greedy caption of its first image (the image-first direction of training), the next sentence
    sampled after its opening sentence and image (DEMO_TEXT, one story a call: each keeps its own seed), the first
    image drawn from the opening sentence alone, then every later image drawn from the story so far, with and
    without the UNet's MMFS (the previous image's features).
    `stories_per_call` stories share each generate call; the results do not depend on it. Yields one output per
    story as each group finishes."""
    S = model.cfg.vision.image_size
    for group in _batches(samples, stories_per_call, "demo stories"):
        stories = [data.make_story(s["seed"]) for s in group]
        images = [[demo_image(scene, S) for scene in story.scenes] for story in stories]
        captions = [tokenizer.decode(ids).strip()
                    for ids in demo_caption_ids(model, tokenizer, [imgs[0] for imgs in images], args.device)]
        seeds = [args.seed + s["seed"] % 100000 for s in group]
        nexts = [_generate_texts(model, tokenizer, [demo_story_prompt(story.texts, model.cfg.num_img_token, 0)],
                                 [imgs[0]], dict(DEMO_TEXT, seed=seed), args.device)[0]
                 for story, imgs, seed in zip(stories, images, seeds)]
        steps = [(story, imgs, k, seed)
                 for seed, story, imgs in zip(seeds, stories, images) for k in range(len(story.scenes))]
        drawn = iter(demo_draws(model, tokenizer, steps, args.device))
        for s, story, caption, next_text in zip(group, stories, captions, nexts):
            first, _ = next(drawn)          # no image before it: drawn alike with and without MMFS
            story_steps = []
            for k in range(1, len(story.scenes)):
                with_mmfs, without_mmfs = next(drawn)
                story_steps.append({"target": [o.as_dict() for o in story.scenes[k]],
                                    "previous": [o.as_dict() for o in story.scenes[k - 1]],
                                    "read": [o.as_dict() for o in with_mmfs],
                                    "read_without_mmfs": [o.as_dict() for o in without_mmfs]})
            yield {"id": s["id"], "seed": s["seed"], "scene": [o.as_dict() for o in story.scenes[0]],
                   "caption": caption, "next_sentence": next_text,
                   "first": {"target": [o.as_dict() for o in story.scenes[0]], "read": [o.as_dict() for o in first]},
                   "steps": story_steps}


def demo_scores(outputs, read_key="read"):
    """caption accuracy; the sampled next sentences that end at their full stop, and that are one valid edit of
    the opening scene and nothing more; per-object and whole-scene image accuracy of the edited images; story
    consistency (the objects an edit does not touch keep their shape, colour and cell in the drawn image); the
    same two accuracies for the first images, drawn from their sentence alone."""
    as_set = lambda objs: {(o["shape"], o["colour"], tuple(o["cell"])) for o in objs}
    captions = [data.parse_scene(o["caption"].split(".")[0] + ".") for o in outputs]
    caption_ok = [c is not None and as_set(o.as_dict() for o in c) == as_set(out["scene"])
                  for c, out in zip(captions, outputs)]
    scene = lambda objs: [data.Obj(*o["cell"], o["shape"], o["colour"]) for o in objs]
    edits_ok = [data.parse_edit(o["next_sentence"], scene(o["scene"])) is not None for o in outputs]
    ended = [o["next_sentence"].strip().count(".") == 1 and o["next_sentence"].strip().endswith(".")
             for o in outputs]
    objects = found = scenes = exact = kept = untouched = 0
    firsts = [(as_set(o["first"]["target"]), as_set(o["first"]["read"])) for o in outputs if "first" in o]
    for out in outputs:
        for st in out["steps"]:
            target, read, prev = as_set(st["target"]), as_set(st[read_key]), as_set(st["previous"])
            objects += len(target)
            found += len(target & read)
            scenes += 1
            exact += target == read
            same = target & prev                                                  # objects the edit leaves alone
            untouched += len(same)
            kept += len(same & read)
    ratio = lambda a, b: a / b if b else float("nan")
    return {"caption_accuracy": ratio(sum(caption_ok), len(caption_ok)),
            "next_sentence_ends_at_full_stop": ratio(sum(ended), len(ended)),
            "next_sentence_validity": ratio(sum(edits_ok), len(edits_ok)),
            "image_object_accuracy": ratio(found, objects), "image_scene_accuracy": ratio(exact, scenes),
            "story_consistency": ratio(kept, untouched),
            "first_image_object_accuracy": ratio(sum(len(t & r) for t, r in firsts), sum(len(t) for t, _ in firsts)),
            "first_image_scene_accuracy": ratio(sum(t == r for t, r in firsts), len(firsts))}


def score_demo(data_root, outputs, args):
    metrics = demo_scores(outputs, "read")
    without = demo_scores(outputs, "read_without_mmfs")
    metrics.update({f"{k}_without_mmfs": v for k, v in without.items() if k.startswith(("image", "story"))})
    return metrics


def demo_metrics(model, num_stories=16, seed=0, tokenizer_path=data.DEMO_TOKENIZER_PATH):
    """The demo scoreboard on the first `num_stories` test stories: train.py's periodic evaluation."""
    args = argparse.Namespace(device=next(model.parameters()).device, seed=seed)
    tokenizer = load_tokenizer(tokenizer_path, None, model.cfg)
    was_training = model.training
    model.eval()
    outputs = list(predict_demo(model, tokenizer, read_demo(None, num_stories), args))
    model.train(was_training)
    return score_demo(None, outputs, args)


DEMO_QA_QUESTIONS = 300                      # test questions demo_qa scores (--limit takes fewer)
DEMO_QA_GENERATION = dict(max_new_tokens=8, min_new_tokens=0, num_beams=1)      # greedy; answers are 1-2 words


def read_demo_qa(data_root, num_questions=DEMO_QA_QUESTIONS, start=0, limit=None):
    """The test split's questions about scenes from `start` on (data.make_question; never seen in fine-tuning), the
    first `limit` of them."""
    num_questions = num_questions if limit is None else min(num_questions, limit)
    return [{"id": start + i, "seed": q.seed}
            for i, q in enumerate(data.demo_questions("test", num_questions, start))]


def parse_demo_answer(text):
    """A generated answer: the text up to its first full stop, lower case, spaces trimmed and single."""
    return " ".join(text.split(".")[0].lower().split())


@torch.no_grad()
def predict_demo_qa(model, tokenizer, samples, args):
    """Per question: the greedy continuation of its image and question (data.qa_prompt), and its parsed answer."""
    S, n_img = model.cfg.vision.image_size, model.cfg.num_img_token
    for chunk in _batches(samples, args.batch_size, "demo questions"):
        questions = [data.make_question(s["seed"]) for s in chunk]
        texts = _generate_texts(model, tokenizer, [data.qa_prompt(q.question, n_img) for q in questions],
                                [demo_image(q.scene, S) for q in questions], DEMO_QA_GENERATION, args.device)
        for s, q, text in zip(chunk, questions, texts):
            yield {"id": s["id"], "seed": s["seed"], "kind": q.kind, "question": q.question, "answer": q.answer,
                   "output": text, "predicted": parse_demo_answer(text)}


def score_demo_qa(data_root, outputs, args):
    """Exact-match accuracy of the parsed answers, over all questions and per kind of question."""
    metrics = {"accuracy": sum(o["predicted"] == o["answer"] for o in outputs) / len(outputs)}
    for kind in data.QA_KINDS:
        mine = [o for o in outputs if o["kind"] == kind]
        if mine:
            metrics[f"accuracy_{kind}"] = sum(o["predicted"] == o["answer"] for o in mine) / len(mine)
    return metrics


DEMO_SCORED_WITH = ("init_from", "tokenizer", "limit", "offset", "seed", "dtype", "quantize")


def demo_table(metrics, num_stories, flags=()):
    """The scoreboard as a Markdown table (printed, and written into README.md with --readme); flags: what
    `python eval.py` was given that changes it."""
    rows = [("caption accuracy (exact scene)", metrics["caption_accuracy"], None, ">= 95%"),
            ("next sentence: ends at its full stop", metrics["next_sentence_ends_at_full_stop"], None, "100%"),
            ("next sentence: one valid edit of the scene", metrics["next_sentence_validity"], None, ""),
            ("image accuracy, per object", metrics["image_object_accuracy"],
             metrics["image_object_accuracy_without_mmfs"], ">= 90%"),
            ("image accuracy, whole scene", metrics["image_scene_accuracy"],
             metrics["image_scene_accuracy_without_mmfs"], ">= 80%"),
            ("story consistency", metrics["story_consistency"], metrics["story_consistency_without_mmfs"],
             ">= 80%, and 20 points above MMFS off"),
            ("first image from its sentence alone, per object", metrics["first_image_object_accuracy"], None, ""),
            ("first image from its sentence alone, whole scene", metrics["first_image_scene_accuracy"], None, "")]
    pct = lambda v: "" if v is None else f"{100 * v:.1f}%"
    command = " ".join(["python eval.py", *flags])
    lines = [f"Demo scoreboard on {num_stories} held-out shape stories (`{command}`):", "",
             "| metric | MMFS on | MMFS off | target |", "|---|---:|---:|---|"]
    lines += [f"| {name} | {pct(on)} | {pct(off)} | {target} |" for name, on, off, target in rows]
    return "\n".join(lines)


README_BEGIN, README_END = "<!-- demo-scoreboard: written by `python eval.py --readme` -->", "<!-- /demo-scoreboard -->"


def write_readme_table(path, table):
    """Replace the block between the scoreboard markers of README.md (atomically)."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if README_BEGIN not in text or README_END not in text:
        raise InputError(f"{path}: the scoreboard markers {README_BEGIN!r} ... {README_END!r} are missing")
    head, rest = text.split(README_BEGIN, 1)
    tail = rest.split(README_END, 1)[1]
    with data.replaced_on_success(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(f"{head}{README_BEGIN}\n{table}\n{README_END}{tail}")


# ---------------------------------------------------------------------------------------------------------------
# Tasks: read -> predict (per rank) -> score (rank 0, over the gathered outputs)
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class Task:
    read: object                 # (data_root) -> list of sample dicts; (data_root, start=, limit=) for a task
                                 # that makes its own samples
    predict: object              # (model, tokenizer, samples, args) -> iterable of per-sample output dicts, or
                                 # skip records (`skipped`); a generator yields them as each batch finishes
    score: object                # (data_root, outputs, args) -> {metric: value}; outputs without skip records
    generation: dict = field(default_factory=dict)
    needs_data_root: bool = True  # False for a task that makes its own data (e.g. a synthetic demo set)
    check: object = None         # (data_root, samples) -> None: the rest of the data the score needs, checked
                                 # before the model loads (raises InputError)
    preflight: object = None     # (args) -> None: the files named by flags, checked before the model loads
    min_samples: int = 1         # fewer scored samples than this leave the metric undefined
    draws_images: bool = False   # writes the images it draws into images_folder(args)
    batch: object = None         # (args) -> how many consecutive samples of a rank share one model call, whose
                                 # float rounding can depend on which samples it holds; --resume reuses a batch's
                                 # kept predictions only whole (None: --batch_size)


def _caption_task(name, read, make_prompt, generation, first_sentence):
    def check(root, samples):
        refs = caption_references(name, root)
        for s in samples:
            if s["id"] not in refs:
                raise InputError(f"{os.path.join(root, *_CAPTION_REFERENCES[name])}: no reference caption for "
                                 f"image id {s['id']!r}")

    def predict(model, tokenizer, samples, args):
        n = model.cfg.num_img_token
        # the Karpathy split is scored on the first sentence only, as in the original
        return generate_answers(model, tokenizer, samples, lambda s: make_prompt(n), generation, args.batch_size,
                                args.device, name,
                                lambda s, t: {"id": s["id"], "caption": t.split(".")[0] if first_sentence else t})

    def score(root, outputs, args):
        refs = caption_references(name, root)
        cands = {}
        for o in outputs:
            cands.setdefault(o["id"], o["caption"])
        metrics, per_id = caption_metrics({k: refs[k] for k in cands}, cands)
        for o in outputs:
            o["CIDEr"] = per_id[o["id"]]
        return metrics

    return Task(read, predict, score, generation, check=check)


def _vqa_task(name, read, make_prompt, accuracy):
    def output(s, t):
        answer = extract_answer(t)
        return {"id": s["id"], "question": s["question"], "generated": t, "answer": answer,
                "accuracy": accuracy(answer, s["answers"])}

    def predict(model, tokenizer, samples, args):
        n = model.cfg.num_img_token
        return generate_answers(model, tokenizer, samples, lambda s: make_prompt(s["question"], n), VQA_GENERATION,
                                args.batch_size, args.device, name, output)

    def score(root, outputs, args):
        return {"overall_accuracy": 100.0 * float(np.mean([o["accuracy"] for o in outputs]))}

    return Task(read, predict, score, VQA_GENERATION)


def visdial_context(sample, num_img_token):
    return data.image_placeholder(num_img_token) + sample["context"]


def predict_visdial(model, tokenizer, samples, args):
    for s in tqdm(samples, desc="visdial", disable=False):
        try:
            image = load_eval_image(s["image"], model.cfg.vision.image_size).to(args.device)
        except data.SkipSample as e:
            yield skipped(s, e)
            continue
        context = tokenizer.encode(visdial_context(s, model.cfg.num_img_token))
        try:
            longest = max((len(tokenizer.encode(o, add_bos=False)) for o in s["options"]), default=0)
            check_prompt_length(len(context) + longest, 0, model.cfg)
        except data.SkipSample as e:
            yield skipped(s, e)
            continue
        scores = option_log_likelihoods(model, tokenizer, context, image, s["options"])
        ranks = scores_to_ranks(torch.tensor([scores]))
        yield {"id": s["id"], "ranks": ranks[0].tolist(),
               "ndcg": ndcg(ranks, torch.tensor([s["relevance"]], dtype=torch.float32))}


def score_visdial(root, outputs, args):
    return {"ndcg": float(np.mean([o["ndcg"] for o in outputs]))}


def clip_text_ids(clip_tokenizer, caption):
    """CLIP token ids of a caption with its start and end tokens (added if the tokenizer file does not)."""
    bos, eos = clip_tokenizer.token_to_id("<|startoftext|>"), clip_tokenizer.token_to_id("<|endoftext|>")
    ids = clip_tokenizer.encode(caption).ids
    ids = ([bos] if not ids or ids[0] != bos else []) + ids + ([eos] if not ids or ids[-1] != eos else [])
    if len(ids) > 77:
        raise InputError(f"caption {caption[:60]!r}... is {len(ids)} CLIP tokens, more than CLIP's 77")
    return ids


def check_image_decoder(model, task):
    if getattr(model, "image_decoder", None) is None:
        raise InputError(f"{task}: the model has no image decoder, so it cannot draw images")


def images_folder(args):
    """Where a task that draws images writes them: --image_dir, else next to the results file."""
    return args.image_dir or os.path.splitext(args.out)[0] + "_images"


def _to_pil(image):
    """A [3, H, W] tensor in [0, 1] -> the 8-bit PIL image it rounds to."""
    return Image.fromarray((image.float().clamp(0, 1) * 255 + 0.5).to(torch.uint8).permute(1, 2, 0).cpu().numpy())


def _save_png(path, image):
    """A [3, H, W] tensor in [0, 1] or a PIL image -> PNG at `path` (atomically)."""
    if torch.is_tensor(image):
        image = _to_pil(image)
    with data.replaced_on_success(path) as tmp:
        image.save(tmp)
    return path


def _text_to_image_task(samples_per_caption):
    def predict(model, tokenizer, samples, args):
        """Draw `samples_per_caption` images per caption (prompt "{caption} <soi><image>...", right-padded);
        with several, keep the one CLIP ViT-L/14 rates closest to the caption, as the original does for COCO.
        Each kept image is written as PNG. A caption whose real image cannot be read is skipped (FID compares
        the two sets)."""
        check_image_decoder(model, args.task)
        if samples_per_caption > 1:
            scorer, clip_tokenizer = load_clip(args.clip)
            scorer = scorer.to(args.device)
        cfg = model.cfg
        folder = images_folder(args)
        os.makedirs(folder, exist_ok=True)
        grey = torch.full((3, cfg.vision.image_size, cfg.vision.image_size), 0.5)   # the slot of the image to draw
        def check(s):                           # the real image must load: FID compares the two sets
            data.load_image(s["image"])
            check_prompt_length(len(tokenizer.encode(t2i_prompt(s["caption"], cfg.num_img_token))), 0, cfg)

        for chunk in _batches(samples, args.batch_size, "text-to-image"):
            _, skips = _load_images(chunk, check)
            yield from skips.values()
            chunk = [s for i, s in enumerate(chunk) if i not in skips]
            if not chunk:
                continue
            prompts = [t2i_prompt(s["caption"], cfg.num_img_token) for s in chunk]
            batch = _to_device(text_batch(prompts, [grey] * len(chunk), tokenizer, pad_left=False), args.device)
            # a seed per caption, so its images do not depend on the captions beside it (--resume relies on
            # it); copy k draws from seed + k, so the captions' seeds are samples_per_caption apart
            seeds = [args.seed + samples_per_caption * s["id"] for s in chunk]
            candidates = model.generate_images(batch, steps=args.steps, guidance_scale=args.guidance_scale,
                                               sampler="ddpm", seed=seeds,
                                               num_images_per_context=samples_per_caption)["image"]
            candidates = candidates.float().clamp(0, 1)                  # (copies * B, 3, H, W), copy-major
            best = torch.zeros(len(chunk), dtype=torch.long)
            if samples_per_caption > 1:
                # the original scores the 8-bit images the generator's output rounds to
                pixels = torch.stack([clip_image_tensor(_to_pil(x), scorer.image_size)
                                      for x in candidates]).to(args.device)
                text_ids = [clip_text_ids(clip_tokenizer, s["caption"]) for s in chunk]
                best = clip_best_of(scorer, text_ids, pixels, samples_per_caption).cpu()
            for b, s in enumerate(chunk):
                path = _save_png(os.path.join(folder, f"{s['id']:05d}.png"), candidates[int(best[b]) * len(chunk) + b])
                yield {"id": s["id"], "caption": s["caption"], "image": s["image"], "generated": path,
                       "candidate": int(best[b])}

    return predict


def _scored_image(path, what):
    try:
        return data.load_image(path)
    except data.SkipSample as e:
        raise InputError(f"{path}: cannot read the image for {what} ({e.reason})") from None


def fid_of_paths(net, real_paths, fake_paths, device):
    """FID between two lists of image files (the original's preprocessing of both)."""
    def stats(paths):
        tensors = torch.stack([fid_image_tensor(_scored_image(p, "FID")) for p in paths])
        return feature_statistics(inception_features(net, tensors, device=device))
    return frechet_distance(*stats(real_paths), *stats(fake_paths))


def score_fid(root, outputs, args):
    net = load_inception(args.inception)
    return {"FID": fid_of_paths(net, [o["image"] for o in outputs], [o["generated"] for o in outputs], args.device)}


# ---------------------------------------------------------------------------------------------------------------
# Fine-tuned tasks: visual storytelling (VIST, PororoSV, FlintstonesSV) and segmentation-to-image (ADE20K)
# ---------------------------------------------------------------------------------------------------------------

def _story_reader(name):
    def read(root):
        """The test split's stories (data.py's reader of the original layout under root/<name>)."""
        stats = Counter()
        base = os.path.join(root, name)
        stories = data.STORY_READERS[name](base, base, "test", stats)
        if stats:
            print(f"[eval] {name}: skipped stories {dict(stats)}", flush=True)
        return [dict(s, image=s["frames"][-1]["image"]) for s in stories]
    return read


def _file_stem(text):
    return re.sub(r"[^\w.-]", "_", str(text))


def _story_rows(sample, tokenizer, cfg, args):
    """One row per round of a story (round_range), as data.build_story_sample builds it at the encoder size:
    ground-truth images in every slot (a target's own image cannot reach its generation), targets per frame."""
    rng = data.sample_rng(args.seed, ("eval", sample["id"]))
    transform = data.DualTransform(cfg.vision.image_size, None)
    return [data.build_story_sample(r, tokenizer, transform, rng, args.context_type, None, cfg.num_img_token,
                                    where=r["id"]) for r in data.story_rounds([sample], args.round_range)]


def _story_task(name):
    def predict(model, tokenizer, samples, args):
        """Draw each story's target frame (every round's, with round_range=all) from its context, with and without
        the UNet's MMFS from the same noise; the drawn frames and the ground-truth frames (a strip's chosen frame
        cut out) are written as PNG. The context frames are the ground truth."""
        check_image_decoder(model, args.task)
        folder = images_folder(args)
        os.makedirs(folder, exist_ok=True)
        for chunk in _batches(samples, args.batch_size, name):
            rows = []
            for s in chunk:
                try:
                    rows.append((s, _story_rows(s, tokenizer, model.cfg, args)))
                except data.SkipSample as e:
                    yield skipped(s, e)
            if not rows:
                continue
            built = [b for _, bs in rows for b in bs]
            batch = data.collate_targets(built, tokenizer.pad_id, name)
            targets = [info for b in built for info, t in zip(b.image_info, b.image_targets) if t]
            seeds = [args.seed + zlib.crc32(f"{t['story']}/{t['frame']}".encode()) % 1_000_000 for t in targets]
            drawn = model.generate_images(_to_device(batch, args.device), steps=args.steps,
                                          guidance_scale=args.guidance_scale, sampler="ddpm", seed=seeds,
                                          progress=False, use_mmfs="both")["image"]
            k = 0
            for s, bs in rows:
                out = []
                for b in bs:
                    for info in [i for i, t in zip(b.image_info, b.image_targets) if t]:
                        stem = os.path.join(folder, _file_stem(f"{info['story']}_{info['frame']}"))
                        gt = info["image"]
                        if info["strip_frame"] is not None:          # the strip's drawn frame, as the model saw it
                            frame = s["frames"][info["frame"]]
                            gt = _save_png(stem + "_gt.png", data.story_frame(frame, None, info["strip_frame"])[0])
                        out.append({"round": info["story"], "frame": info["frame"], "image": gt,
                                    "strip_frame": info["strip_frame"],
                                    "generated": _save_png(stem + ".png", drawn[k]),
                                    "generated_without_mmfs": _save_png(stem + "_without_mmfs.png",
                                                                        drawn[len(targets) + k])})
                        k += 1
                yield {"id": s["id"], "targets": out}

    return predict


@torch.no_grad()
def clip_image_similarity(scorer, real_paths, fake_paths, device):
    """Cosine similarity of CLIP image features, per pair of image files."""
    def features(paths):
        pixels = torch.stack([clip_image_tensor(_scored_image(p, "CLIP"), scorer.image_size) for p in paths])
        return scorer.image_features(pixels.to(device))
    return (features(real_paths) * features(fake_paths)).sum(-1).cpu().tolist()


def score_story(root, outputs, args):
    """FID of the drawn target frames against the ground truth, and their mean CLIP image-image similarity to
    it, with and without MMFS."""
    net, (scorer, _) = load_inception(args.inception), load_clip(args.clip)
    scorer = scorer.to(args.device)
    targets = [t for o in outputs for t in o["targets"]]
    real = [t["image"] for t in targets]
    metrics = {}
    for key, suffix in (("generated", ""), ("generated_without_mmfs", "_without_mmfs")):
        fake = [t[key] for t in targets]
        sims = clip_image_similarity(scorer, real, fake, args.device)
        for t, sim in zip(targets, sims):
            t["clip_similarity" + suffix] = sim
        metrics["FID" + suffix] = fid_of_paths(net, real, fake, args.device)
        metrics["clip_image_similarity" + suffix] = float(np.mean(sims))
    return metrics


def read_ade20k(root):
    """ADE20K's validation captions (data.read_ade20k under root/ADEChallengeData2016); "image" is the class-label
    map mIoU compares with."""
    stats = Counter()
    base = os.path.join(root, "ADEChallengeData2016")
    records = data.read_ade20k(base, base, "validation", stats)
    if stats:
        print(f"[eval] ade20k: skipped records {dict(stats)}", flush=True)
    return [dict(r, image=r["labels"]) for r in records]


def check_segmenter_path(path):
    if path is None or not os.path.isfile(path):
        raise InputError(f"ade20k's mIoU needs a segmentation network for ADE20K's 150 classes (the original used "
                         f"OneFormer ADE20K DiNAT-L); not found at {path!r}. Pass --segmenter=<file.pt2> "
                         f"(torch.export.save of a network mapping [1, 3, H, W] images in [0, 1], H and W dynamic, "
                         f"to [1, 150, h, w] class scores)")


def load_segmenter(path):
    """A user-supplied segmentation network saved with torch.export.save (a graph and its weights, no Python
    code to run)."""
    check_segmenter_path(path)
    try:
        return torch.export.load(path).module()
    except (RuntimeError, ValueError, OSError, KeyError, zipfile.BadZipFile) as e:
        raise InputError(f"{path}: not a torch.export file ({first_line(e)})") from None


def predict_ade20k(model, tokenizer, samples, args):
    """Draw a photo from each colour map and caption ("<map>caption.<photo>", the original's prompt; the photo's
    slot holds grey), written as PNG."""
    check_image_decoder(model, args.task)
    cfg, folder = model.cfg, images_folder(args)
    os.makedirs(folder, exist_ok=True)
    grey = torch.full((3, cfg.vision.image_size, cfg.vision.image_size), 0.5)
    for chunk in _batches(samples, args.batch_size, "ade20k"):
        maps, skips = _load_images(chunk, lambda s: data.encoder_image(data.load_segmentation_map(s),
                                                                       cfg.vision.image_size))
        yield from skips.values()
        chunk = [(s, maps[i]) for i, s in enumerate(chunk) if i not in skips]
        if not chunk:
            continue
        prompts = [data.ade20k_text(s["caption"], data.image_placeholder(cfg.num_img_token)) for s, _ in chunk]
        batch = text_batch(prompts, [x for _, m in chunk for x in (m, grey)], tokenizer, pad_left=False)
        drawn = model.generate_images(_to_device(batch, args.device), target_image_idxs=[2 * b + 1 for b in
                                                                                        range(len(chunk))],
                                      steps=args.steps, guidance_scale=args.guidance_scale, sampler="ddpm",
                                      seed=[args.seed + s["id"] for s, _ in chunk], progress=False)["image"]
        for (s, _), img in zip(chunk, drawn):
            yield {"id": s["id"], "caption": s["caption"], "labels": s["labels"],
                   "generated": _save_png(os.path.join(folder, f"{s['id']:06d}.png"), img)}


def segmentation_iou(pred, labels, num_classes=data.ADE20K_NUM_CLASSES):
    """Per class 1..num_classes: (intersection, union) pixel counts of a predicted and a true label map; pixels
    labelled 0 ("other") in the truth are left out."""
    pred = np.where(labels > 0, pred, 0)
    bins = lambda x: np.bincount(x[(x >= 1) & (x <= num_classes)].ravel(), minlength=num_classes + 1)[1:]
    inter = bins(np.where(pred == labels, pred, 0))
    return inter, bins(pred) + bins(labels) - inter


@torch.no_grad()
def score_ade20k(root, outputs, args):
    """mIoU as the original: each drawn photo resized (bicubic) to its label map's size and segmented, class
    intersections and unions summed over the set, IoU = intersection / union per class, averaged over all 150
    (a class absent from every map counts as 0)."""
    net = load_segmenter(args.segmenter).to(args.device)
    inter = union = 0
    for o in outputs:
        with Image.open(o["labels"]) as im:
            labels = np.asarray(im).astype(np.int64)
        photo = _scored_image(o["generated"], "mIoU").resize(labels.shape[::-1], resample=Image.BICUBIC)
        x = torch.from_numpy(np.asarray(photo).transpose(2, 0, 1).copy()).float().div(255)[None].to(args.device)
        scores = F.interpolate(net(x).float(), size=labels.shape, mode="bilinear", align_corners=False)
        pred = scores.argmax(1)[0].cpu().numpy() + 1                                 # class k -> label k + 1
        i, u = segmentation_iou(pred, labels)
        inter, union = inter + i, union + u
    return {"mIoU": float(np.mean(inter / (union + 1e-10)))}


def _build_tasks():
    tasks = {}
    for name, read, first in (("coco_karpathy", read_coco_karpathy, True), ("flickr30k", read_flickr30k, False),
                              ("nocaps", read_nocaps, False)):
        tasks[name] = _caption_task(name, read, caption_prompt, CAPTION_GENERATION, first)
    tasks["image2paragraph"] = _caption_task("image2paragraph", read_image2paragraph, paragraph_prompt,
                                             PARAGRAPH_GENERATION, False)
    for name, read in (("vqav2", read_vqav2), ("okvqa", read_okvqa), ("textvqa", read_textvqa)):
        tasks[name] = _vqa_task(name, read, vqa_prompt, vqa_accuracy)
    tasks["vizwiz_vqa"] = _vqa_task("vizwiz_vqa", read_vizwiz, vizwiz_prompt, vizwiz_accuracy)
    tasks["visdial"] = Task(read_visdial, predict_visdial, score_visdial, batch=lambda args: 1)   # its own calls
    # the original config names the COCO text-to-image set "coco"; 8 CLIP-ranked samples there, 1 for LN-COCO
    t2i = dict(steps=250, guidance_scale=3.5, sampler="ddpm")
    # the files the score reads, checked whole before the model loads, not after hours of sampling
    inception_and_clip = lambda args: (load_inception(args.inception), check_clip_files(args.clip))
    tasks["coco_t2i"] = Task(read_coco_t2i, _text_to_image_task(8), score_fid, dict(t2i, samples_per_caption=8),
                             preflight=inception_and_clip, min_samples=2, draws_images=True)
    tasks["lncoco"] = Task(read_lncoco, _text_to_image_task(1), score_fid, dict(t2i, samples_per_caption=1),
                           preflight=lambda args: load_inception(args.inception), min_samples=2,
                           draws_images=True)
    for name in data.STORY_READERS:
        tasks[name] = Task(_story_reader(name), _story_task(name), score_story, dict(t2i, use_mmfs="both"),
                           preflight=inception_and_clip, min_samples=2, draws_images=True)
    tasks["ade20k"] = Task(read_ade20k, predict_ade20k, score_ade20k, dict(t2i),
                           preflight=lambda args: check_segmenter_path(args.segmenter), draws_images=True)
    # a demo story's outputs are tokens and scenes read from its images: the stories sharing its calls change none
    # of them (test_demo_stories_in_groups_equal_one_story_at_a_time), so --resume reuses stories one by one
    tasks["demo"] = Task(read_demo, predict_demo, score_demo, dict(DEMO_GENERATION, **DEMO_IMAGES),
                         needs_data_root=False, batch=lambda args: 1)
    tasks["demo_qa"] = Task(read_demo_qa, predict_demo_qa, score_demo_qa, DEMO_QA_GENERATION, needs_data_root=False)
    return tasks


# Task name -> Task. A new evaluation (e.g. the demo scoreboard) is one more entry.
TASKS = _build_tasks()


# ---------------------------------------------------------------------------------------------------------------
# Distribution over ranks (torchrun): rank-strided split, outputs gathered on rank 0
# ---------------------------------------------------------------------------------------------------------------

def init_distributed(device):
    """(rank, world_size, device name) from torchrun's environment and the torch.device asked for; a single
    process when WORLD_SIZE is unset or 1. On CUDA each rank takes the GPU of its LOCAL_RANK."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, str(device)
    cuda = device.type == "cuda"
    torch.distributed.init_process_group(backend="nccl" if cuda else "gloo")
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    return torch.distributed.get_rank(), world, str(device)


def gather_outputs(outputs, rank, world):
    """Every rank's list -> the concatenation on rank 0 (in rank order), None elsewhere."""
    if world == 1:
        return outputs
    parts = [None] * world if rank == 0 else None
    torch.distributed.gather_object(outputs, parts, dst=0)
    return [o for part in parts for o in part] if rank == 0 else None


def write_json_atomic(path, obj):
    """A crash while writing leaves the old file or the new one, never half of one."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with data.replaced_on_success(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=1)


def write_json_new(path, obj):
    """Write a new file at `path`, or at <path>-2.json, -3, ... where another run wrote one there since this run
    chose it (two runs started together choose the same): never over a file, never half of one. -> the path."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    stem, ext = os.path.splitext(path)
    tmp = f"{path}.tmp{os.getpid()}{ext}"
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)
        for k in itertools.count(1):
            dst = path if k == 1 else f"{stem}-{k}{ext}"
            try:
                os.link(tmp, dst)                # fails where dst exists, unlike a rename
                return dst
            except FileExistsError:
                continue
            except OSError:                      # a file system without hard links
                if not os.path.lexists(dst):
                    os.replace(tmp, dst)
                    return dst
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# A long run keeps what it has predicted: every PARTIAL_EVERY_S seconds, and when it stops on an error, each rank
# rewrites its predictions so far into partial_path(--out); the finished results file replaces it. --resume reads
# it back (read_partial) and predicts only the rest (resume_plan).
PARTIAL_EVERY_S = 60

# The settings a kept prediction does not depend on, left out when --resume compares a partial file's config with
# the run's: where the results go (out), the demo's README table (readme, scored_with), and the networks only the
# score uses (inception, segmenter), which runs over all predictions at the end. Every other setting counts, even
# one the task does not read: a resumed run is the interrupted command again. The device counts by its kind only
# (cuda:0 and cuda:1 compute alike, a CPU rounds otherwise).
RESUME_IGNORES = ("out", "readme", "scored_with", "inception", "segmenter")


def partial_path(out, rank=0, world=1):
    """out/eval/vqav2.json -> out/eval/vqav2.partial.json (.partial.rank<N>.json under torchrun)."""
    stem, ext = os.path.splitext(out)
    return f"{stem}.partial{'' if world == 1 else f'.rank{rank}'}{ext or '.json'}"


def remove_partial_files(out, world):
    """Every rank's partial file of --out, once the results are written (by rank 0; ranks on other hosts that do
    not share its file system keep theirs, which the next run refuses)."""
    for r in range(world):
        if os.path.exists(partial_path(out, r, world)):
            os.remove(partial_path(out, r, world))


def run_config(args, world):
    """The config a results (and partial) file stores: the settings (--resume left out: a resumed run's results are
    the uninterrupted run's), the task's generation settings and the number of ranks."""
    settings = {k: v for k, v in vars(args).items() if k != "resume"}
    return dict(settings, generation=TASKS[args.task].generation, world_size=world)


def prediction_settings(config):
    """A run's config less RESUME_IGNORES, the device by its kind (cpu, cuda)."""
    settings = {k: v for k, v in config.items() if k not in RESUME_IGNORES}
    if isinstance(settings.get("device"), str):
        settings["device"] = settings["device"].split(":")[0]
    return settings


def _written_files(output, folder):
    """The paths under `folder` (the images the run wrote) that an output refers to, at any depth."""
    if isinstance(output, dict):
        return [p for v in output.values() for p in _written_files(v, folder)]
    if isinstance(output, list):
        return [p for v in output for p in _written_files(v, folder)]
    return [output] if isinstance(output, str) and output.startswith(os.path.join(folder, "")) else []


def _other_partial_files(out, world):
    """Partial files of --out that a run on `world` ranks does not write (an earlier run's on another number)."""
    stem, ext = os.path.splitext(out)
    found = {p for pattern in (".partial", ".partial.rank[0-9]*")
             for p in glob.glob(glob.escape(stem) + pattern + (ext or ".json"))}
    return sorted(found - {partial_path(out, r, world) for r in range(world)})


def predictions_crc(outputs):
    """The CRC-32 of predictions as their JSON text: a partial file stores its own, so --resume reuses only
    predictions as eval.py wrote them (the score reads fields a hand edit may have dropped or changed)."""
    return zlib.crc32(json.dumps(outputs).encode())


def write_partial(path, task, config, outputs):
    write_json_atomic(path, {"task": task, "config": config, "partial": True, "num_predictions": len(outputs),
                             "crc32": predictions_crc(outputs), "samples": outputs})


def load_partial(path):
    """A partial file -> its dict, checked to be of evaluate's shape (task, config, and samples each with an id)
    and to hold the samples write_partial wrote."""
    kept = _require(data.annotation_json(path, "eval.py's partial file"),
                    {"task": str, "config": dict, "samples": list}, path)
    for i, o in enumerate(kept["samples"]):
        _require(o, {"id": (int, str)}, f"{path}: samples[{i}]")
    if kept.get("crc32") != predictions_crc(kept["samples"]):
        raise InputError(f"{path}: its samples are not those eval.py wrote (their crc32 differs: edited?); remove "
                         f"the file to start over")
    return kept


def check_partial_ids(path, outputs, samples, task):
    """The kept outputs match this rank's samples one to one: the samples' ids are unique, and every output's id is
    one of them, once."""
    ids = set()
    for s in samples:
        if s["id"] in ids:
            raise InputError(f"--resume: sample id {s['id']!r} comes twice in --task={task}'s samples, so the "
                             f"predictions kept in {path} cannot be matched to them; remove the file to start over")
        ids.add(s["id"])
    seen = set()
    for i, o in enumerate(outputs):
        if o["id"] not in ids:
            raise InputError(f"{path}: samples[{i}] has id {o['id']!r}, which is none of this run's samples (were "
                             f"the data under --data_root changed?); remove the file to start over")
        if o["id"] in seen:
            raise InputError(f"{path}: samples[{i}] repeats id {o['id']!r}, expected one prediction per sample")
        seen.add(o["id"])


def read_partial(args, rank, world, samples):
    """This rank's partial file, read before the model loads -> the predictions it keeps ([] when there is none).
    A partial file is an earlier run's work: without --resume it is refused, as is one of a run on another number
    of ranks. With --resume it must be this run's: made with the settings its predictions depend on
    (prediction_settings), its ids this rank's samples' (check_partial_ids). A prediction whose images (under
    images_folder) are gone is dropped, to be drawn again."""
    path = partial_path(args.out, rank, world)
    data.check_writable(path, "--out's partial file")
    others = _other_partial_files(args.out, world)
    if others:
        raise InputError(f"{others[0]}: kept by a run on another number of ranks than this run's {world}; resume "
                         f"with that number (or remove the file to start over)")
    if not os.path.exists(path):
        if args.resume:
            print(f"eval.py: --resume: no {path}, starting from the first sample", flush=True)
        return []
    kept = load_partial(path)
    if not args.resume:
        raise InputError(f"{path} holds {len(kept['samples'])} predictions of an earlier run: --resume goes on from "
                         f"them (or remove the file to start over)")
    ours = json.loads(json.dumps(run_config(args, world)))
    differs = mmi.first_difference(prediction_settings(kept["config"]), prediction_settings(ours))
    if differs:
        key, theirs, mine = differs
        raise InputError(f"{path}: kept by a run with {key}={theirs!r}, this run has {key}={mine!r}; resume with "
                         f"that run's settings (or remove the file to start over)")
    check_partial_ids(path, kept["samples"], samples[rank::world], args.task)
    folder = images_folder(args)
    return [o for o in kept["samples"] if all(os.path.isfile(p) for p in _written_files(o, folder))]


def resume_plan(samples, kept, batch):
    """[(a batch of `batch` consecutive samples, its kept outputs in their order, or None to predict it)]: the kept
    outputs (by sample id) of a batch are reused only when they cover it whole, so every predicted sample shares
    its model call with the samples it shares it with in an uninterrupted run."""
    batches = [samples[i:i + batch] for i in range(0, len(samples), batch)]
    where = {s["id"]: n for n, b in enumerate(batches) for s in b}
    reused = [[] for _ in batches]
    for o in kept:
        reused[where[o["id"]]].append(o)
    return [(b, r if len(r) == len(b) else None) for b, r in zip(batches, reused)]


def resume_outputs(predict, plan):
    """The outputs of the plan's samples in the order an uninterrupted run yields them: the reused batches' kept
    outputs, and predict(the other batches' samples), which yields one output per sample, batch by batch."""
    new = iter(predict([s for b, reused in plan if reused is None for s in b]))
    for b, reused in plan:
        if reused is None:
            for _ in b:
                yield next(new)
        else:
            yield from reused


# ---------------------------------------------------------------------------------------------------------------
# Model loading, the run, and the command line
# ---------------------------------------------------------------------------------------------------------------

def load_model(init_from, dtype, device, quantize=None):
    """A directory written by MMInterleaved.save_pretrained, loaded straight to `device` in `dtype`, quantized
    as it loads with quantize="int8" or "int4"."""
    return mmi.MMInterleaved.from_pretrained(init_from, dtype=dtype, device=device, quantize=quantize)


def find_tokenizer(path, init_from):
    """The tokenizer file: `path` (--tokenizer), else tokenizer.model / tokenizer.json in `init_from`, else the
    demo tokenizer for the demo model."""
    if path is not None:
        if not os.path.isfile(path):
            raise InputError(f"--tokenizer={path}: no such file")
        return path
    for name in ("tokenizer.model", "tokenizer.json"):  # one that is there but no file: data.Tokenizer refuses it
        if init_from and os.path.exists(os.path.join(init_from, name)):
            return os.path.join(init_from, name)
    if os.path.abspath(init_from or "") == DEMO_MODEL:
        return data.DEMO_TOKENIZER_PATH
    if init_from and os.path.isfile(os.path.join(init_from, "rank0.pt")):     # train.py's checkpoint folder
        raise mmi.training_checkpoint_error(init_from)
    raise InputError(f"no tokenizer: pass --tokenizer, or put tokenizer.model / tokenizer.json in {init_from}")


def load_tokenizer(path, init_from, cfg):
    path = find_tokenizer(path, init_from)
    return check_tokenizer(data.Tokenizer(path), path, cfg)


def check_tokenizer(tok, path, cfg):
    """-> tok, whose special ids must be the model's."""
    have = (tok.bos_id, tok.eos_id, tok.pad_id, tok.soi_id, tok.image_id)
    want = (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id, cfg.soi_token_id, cfg.image_token_id)
    if have != want:
        raise InputError(f"{path}: bos/eos/pad/soi/image ids {have} do not match the model's {want}")
    return tok


def load_samples(args):
    """The task's samples (the first --limit after the first --offset), with every annotation file the run and its
    score read checked, and at least one image in place: main runs this before the model loads, so a wrong path
    costs seconds."""
    task = TASKS[args.task]
    if task.needs_data_root:
        samples = task.read(args.data_root)[args.offset:]
    else:                                    # a task that makes its samples makes the ones after the offset
        samples = task.read(args.data_root, start=args.offset, limit=args.limit)
    if args.limit is not None:
        samples = samples[:args.limit]
    if len(samples) < task.min_samples:
        raise InputError(f"--task={args.task}: {len(samples)} sample(s) under {args.data_root}, the metric needs at "
                         f"least {task.min_samples}")
    images = [s["image"] for s in samples if "image" in s]
    if images and not any(os.path.isfile(p) for p in images):
        raise InputError(f"--task={args.task}: none of the {len(images)} images is there, e.g. {images[0]} "
                         f"(expected the original evaluation layout, see eval.py --help)")
    if task.check is not None:
        task.check(args.data_root, samples)
    return samples


def evaluate(model, tokenizer, args, rank=0, world=1, samples=None, kept=()):
    """Run one task on this rank's share of the (limited) set; rank 0 returns the results dict. `samples`: what
    load_samples returns (read here when None); `kept`: what read_partial returns, the predictions reused (see
    resume_plan). Samples whose image cannot be read are skipped and counted; the predictions made so far are kept
    in partial_path(args.out) (see PARTIAL_EVERY_S)."""
    task = TASKS[args.task]
    if samples is None:
        samples = load_samples(args)
    config = run_config(args, world)
    partial, outputs, kept_at = partial_path(args.out, rank, world), [], time.monotonic()
    mine = samples[rank::world]
    plan = resume_plan(mine, kept, args.batch_size if task.batch is None else task.batch(args))
    if kept:
        reused = sum(len(r) for _, r in plan if r is not None)
        print(f"eval.py: --resume: reusing {reused} of the {len(kept)} predictions kept in {partial} (a batch's only "
              f"whole); predicting the other {len(mine) - reused} samples", flush=True)

    def keep():
        write_partial(partial, args.task, config, outputs)

    try:
        for o in resume_outputs(lambda rest: task.predict(model, tokenizer, rest, args), plan):
            outputs.append(o)
            if time.monotonic() - kept_at >= PARTIAL_EVERY_S:
                keep()
                kept_at = time.monotonic()
        # every rank's partial file holds its own predictions, from before the gather until rank 0 has written the
        # results (remove_partial_files): a failing score loses none, and --resume finds each rank's where it looks
        if world > 1:
            keep()
        gathered = gather_outputs(outputs, rank, world)
        if rank != 0:
            return None
        scored = [o for o in gathered if "skipped" not in o]
        skips = [o for o in gathered if "skipped" in o]
        reasons = dict(Counter(o["skipped"] for o in skips))
        if len(scored) < task.min_samples:
            raise InputError(f"--task={args.task}: {len(scored)} of {len(gathered)} samples could be used, the metric "
                             f"needs at least {task.min_samples}; skipped {reasons}, e.g. {skips[0]['detail']}")
        metrics = task.score(args.data_root, scored, args)
    except BaseException:
        if outputs:
            keep()
            print(f"eval.py: kept the {len(outputs)} predictions made so far in {partial}", file=sys.stderr)
        raise
    return {"task": args.task, "config": config, "metrics": metrics, "num_samples": len(scored),
            "skipped": reasons, "samples": scored, "skipped_samples": skips}


def _int_at_least(low, what):
    """An argparse type: an integer >= low, else one line saying that `what` was expected."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if value < low:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value
    return parse


_positive_int = _int_at_least(1, "a positive integer")
_non_negative_int = _int_at_least(0, "an integer >= 0")

# Seeds are in [0, SEED_LIMIT): torch.Generator takes less than 2**64, and the runs add offsets to the seed given.
SEED_LIMIT = 2 ** 63


def seed_int(text):
    """An argparse type: a seed, an integer in [0, SEED_LIMIT)."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value < SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, 2**63), got {text!r}")
    return value


def finite_float(text):
    """An argparse type: a float that is neither nan nor infinite."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def parse_args(argv=None):
    usage, _, rest = __doc__.partition("\nLayout under --data_root")
    layout = "Layout under --data_root" + rest.split("\n\n")[0]
    p = mmi.ArgumentParser(description=usage, epilog=layout, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="demo", choices=sorted(TASKS),
                   help="what to score (default: demo, the embedded model's scoreboard on held-out shape stories)")
    p.add_argument("--data_root", default=None,
                   help="folder holding the evaluation sets in the original layout (below); every task but demo "
                        "and demo_qa")
    p.add_argument("--init_from", default=None,
                   help="model folder written by MMInterleaved.save_pretrained (demo, demo_qa: assets/demo by default)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer.model or tokenizer.json (default: the one in --init_from)")
    p.add_argument("--limit", type=_positive_int, default=None, help="score only the first N samples")
    p.add_argument("--offset", type=_non_negative_int, default=0,
                   help="skip the first N samples (the demo tasks: score another slice of the test split)")
    p.add_argument("--out", default=None,
                   help="results JSON, a file that does not exist yet (default: out/eval/<task>.json, or "
                        "<task>-2.json, ... where that exists); while the run goes, the predictions made so far are "
                        "kept in <out>.partial.json (see --resume)")
    p.add_argument("--resume", action="store_true",
                   help="go on from the predictions an interrupted run (the same command) kept in "
                        "<out>.partial.json: only the other samples are predicted, and the results are those of a "
                        "run never interrupted. Without it, a run refuses to start over such a file")
    p.add_argument("--batch_size", type=_positive_int, default=2,
                   help="prompts per generate call (the original used 2)")
    p.add_argument("--device", default="auto",
                   help="auto (CUDA where there is one), cpu, cuda or cuda:N; under torchrun each rank on CUDA "
                        "takes cuda:LOCAL_RANK")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype the model is loaded in")
    p.add_argument("--quantize", default="none", choices=["none", "int8", "int4"],
                   help="weight-only quantization as the model loads: int8 (per output channel) or int4 (groups "
                        "of 128 inputs) of the LLM's attention and MLP layers, its text head and the two Q-Former "
                        "resamplers; the UNet, VAE, vision tower and the LLM's MMFS layers stay in --dtype "
                        "(default: none)")
    p.add_argument("--inception", default=FID_WEIGHTS_NAME,
                   help=f"path to pytorch-fid's {FID_WEIGHTS_NAME} (FID tasks: coco_t2i, lncoco)")
    p.add_argument("--clip", default=None, help="folder with openai/clip-vit-large-patch14's model.safetensors and "
                                                "tokenizer.json (coco_t2i: best-of-8 re-ranking)")
    p.add_argument("--image_dir", default=None,
                   help="where generated images go (FID tasks; default: <out without .json>_images)")
    p.add_argument("--steps", type=_positive_int, default=250,
                   help="diffusion sampling steps (FID tasks; the original used 250)")
    p.add_argument("--guidance_scale", type=finite_float, default=3.5,
                   help="classifier-free guidance scale (FID tasks; the original used 3.5)")
    p.add_argument("--seed", type=seed_int, default=0,
                   help="seed of the image sampling (FID tasks and demo), in [0, 2**63)")
    p.add_argument("--context_type", default="multi_modal", choices=data.CONTEXT_TYPES,
                   help="storytelling tasks: what of the earlier frames the context holds (default: multi_modal)")
    p.add_argument("--round_range", default="last", choices=["last", "all"],
                   help="storytelling tasks: draw each story's last frame, or every frame from its own prefix (all)")
    p.add_argument("--segmenter", default=None,
                   help="ade20k: segmentation network for ADE20K's 150 classes, for mIoU: a torch.export.save file "
                        "mapping [1, 3, H, W] in [0, 1] (H, W dynamic) to [1, 150, h, w] scores")
    p.add_argument("--readme", action="store_true",
                   help="demo: also write the scoreboard into README.md's scoreboard block")
    args = p.parse_args(argv)
    args.out = results_path(args.out, args.task)
    # the flags given that change what the demo scoreboard scores, as its command line shows them
    args.scored_with = [f"--{k}={getattr(args, k)}" for k in DEMO_SCORED_WITH if getattr(args, k) != p.get_default(k)]
    return args


def results_path(out, task):
    """Where the results go, never over an earlier file: --out, which must not exist, or the first of
    out/eval/<task>.json, <task>-2.json, ... that does not (a resumed run finds its own again: it wrote none)."""
    if out is None:
        names = (f"{task}.json" if n == 1 else f"{task}-{n}.json" for n in itertools.count(1))
        return next(p for p in (os.path.join("out", "eval", name) for name in names) if not os.path.exists(p))
    if os.path.isfile(out):
        raise InputError(f"--out={out}: the file exists; eval.py writes new results, never over a file (remove it, "
                         f"or choose another --out)")
    return out


def main(argv=None):
    args = parse_args(argv)
    task = TASKS[args.task]
    # every flag and file is checked before the model loads (a 13B load takes minutes)
    if args.readme and args.task != "demo":
        raise InputError(f"--readme writes the demo scoreboard; it needs --task=demo, not --task={args.task}")
    if args.readme and args.scored_with:
        raise InputError(f"--readme writes README's scoreboard of `python eval.py` as it stands; it takes none of "
                         f"--{', --'.join(DEMO_SCORED_WITH)} (given: {' '.join(args.scored_with)})")
    data.check_writable(args.out, "--out")
    if task.draws_images:
        data.check_writable(images_folder(args), "--image_dir", folder=True)
    if task.needs_data_root:
        if args.data_root is None:
            raise InputError(f"--task={args.task} needs --data_root (the folder holding the evaluation sets; its "
                             f"layout is in eval.py --help)")
        if not os.path.isdir(args.data_root):
            raise InputError(f"--data_root={args.data_root}: no such folder")
    if args.init_from is None and args.task in ("demo", "demo_qa"):
        args.init_from = DEMO_MODEL
        if not os.path.isfile(os.path.join(DEMO_MODEL, "config.json")):
            raise InputError(f"the embedded demo model ({DEMO_MODEL}) is not in this checkout: train it with "
                             f"train.py configs/demo_vae.py and configs/demo.py, or pass --init_from")
    if args.init_from is None:
        raise InputError(f"--task={args.task} needs --init_from (a folder written by save_pretrained)")
    if not os.path.isdir(args.init_from):
        raise InputError(f"--init_from={args.init_from}: no such folder (expected one written by save_pretrained)")
    tokenizer_path = find_tokenizer(args.tokenizer, args.init_from)
    tokenizer = data.Tokenizer(tokenizer_path)       # its ids are checked against the model's once it has loaded
    device = mmi.resolve_device(args.device)
    if task.preflight is not None:
        task.preflight(args)
    samples = load_samples(args)
    rank, world, args.device = init_distributed(device)
    kept = read_partial(args, rank, world, samples)
    model = load_model(args.init_from, getattr(torch, args.dtype), args.device,
                       None if args.quantize == "none" else args.quantize).eval()
    tokenizer = check_tokenizer(tokenizer, tokenizer_path, model.cfg)
    if task.draws_images and args.steps > model.cfg.image_decoder.num_train_timesteps:
        raise InputError(f"--steps={args.steps}: expected at most {model.cfg.image_decoder.num_train_timesteps}, "
                         f"the model's diffusion timesteps")
    results = evaluate(model, tokenizer, args, rank, world, samples, kept)
    if rank == 0:
        out = write_json_new(args.out, results)
        remove_partial_files(args.out, world)
        print(json.dumps({"task": args.task, "num_samples": results["num_samples"], **results["metrics"]}))
        if results["skipped"]:
            print(f"skipped {len(results['skipped_samples'])} of {len(samples)} samples {results['skipped']}; "
                  f"each is listed under skipped_samples in {out}")
        if args.task == "demo":
            table = demo_table(results["metrics"], results["num_samples"], args.scored_with)
            print(table)
            if args.readme:
                readme = os.path.join(os.path.dirname(os.path.abspath(__file__)), "README.md")
                write_readme_table(readme, table)
                print(f"wrote the scoreboard into {readme}")
        if task.draws_images:
            print(f"wrote {results['num_samples']} generated images to {images_folder(args)}")
        print(f"wrote {out}")
    if world > 1:
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(mmi.run_script(main))
