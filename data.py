"""Data for mmi: tokenizer, image transforms, MMC4 / LAION-style readers, packing into rows, mixing, and the
synthetic "shape stories" corpus the demo model learns from.

Sections follow the data: text -> tokenizer; image file -> transform; one document or pair -> a Sample;
shard files -> a stream of Samples per rank/worker; Samples -> packed rows -> the batch dict of the model's
forward; several sources -> one mixed, resumable stream; fine-tuning records -> rows whose loss is on the
answers (instructions: the text loss) or on the target images (VIST, PororoSV, FlintstonesSV, ADE20K: the image
loss), through streams resumable in the same way (`finetune_dataset`); an annt.json of prompts -> one batch each
(sample.py). The demo corpus plugs into the same packing code. Last, the atomic file writes the scripts share.

Use:
    tok = Tokenizer("assets/demo_tokenizer.model")             # or LLaMA's tokenizer.model / tokenizer.json
    ds = demo_dataset(tok, num_total_token=512, num_img_token=16)  # or pretrain_mix(tok, pairs, mmc4)
    ds = finetune_dataset("demo_qa", tok, cfg, "train", 0, 1, 0)   # fine-tuning: one question a row, answer loss
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
    for batch in loader:                                        # keys = the original forward's arguments
        MixedDataset.record_position(positions, batch)          # save `positions` with the checkpoint
    ds.load_state_dict(positions)                               # ...and resume exactly there
    python data.py --demo --show 8                              # look at the demo corpus

Runtime dependencies: numpy, torch, pillow, sentencepiece, tokenizers.
"""

import argparse
import ast
import contextlib
import functools
import inspect
import io
import itertools
import json
import math
import os
import pickle
import random
import re
import sys
import tempfile
import zipfile
import zlib
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

import mmi

Image.MAX_IMAGE_PIXELS = 1_000_000_000  # MMC4/LAION hold large photos; the original lifts the same limit

# ---------------------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------------------

SOI_TOKEN = "<|beginofimage|>"
IMAGE_TOKEN = "<|image|>"
# HF's slow tokenizer splits text on every special token; the image tokens also swallow whitespace on both sides
# (transformers 4.31 strips around special tokens added as plain strings), "<s>"/"</s>"/"<unk>" do not.
_SPECIAL_SPLIT = re.compile(r"(<\|beginofimage\|>|(?:<\|image\|>)+|</s>|<s>|<unk>)")  # image runs as one part
_STRIPPING = re.compile(r"<\|beginofimage\|>|(?:<\|image\|>)+")


def image_placeholder(num_img_token=64):
    """The text standing for one image: soi followed by `num_img_token` image tokens."""
    return SOI_TOKEN + IMAGE_TOKEN * num_img_token


def clean_image_spaces(text):
    """The original's whitespace clean-up around image tokens (one space on either side is dropped)."""
    return (text.replace(IMAGE_TOKEN + " ", IMAGE_TOKEN).replace(" " + IMAGE_TOKEN, IMAGE_TOKEN)
            .replace(" " + SOI_TOKEN, SOI_TOKEN).replace(SOI_TOKEN + " ", SOI_TOKEN))


class Tokenizer:
    """LLaMA-layout tokenizer: a SentencePiece `.model` or a `tokenizer.json` of N base pieces, plus
    soi = N and image = N+1; unk/bos/eos are the pieces "<unk>"/"<s>"/"</s>", pad is forced to N-1."""

    def __init__(self, path):
        self.path = str(path)
        is_json = self.path.endswith(".json")
        expected = "a tokenizers tokenizer.json" if is_json else "a SentencePiece tokenizer.model"
        if not os.path.isfile(self.path):
            found = "is a folder" if os.path.isdir(self.path) else "no such file"
            raise mmi.InputError(f"{self.path}: {found}, expected {expected}")
        try:
            if is_json:
                import tokenizers
                self._tok, self._sp = tokenizers.Tokenizer.from_file(self.path), None
            else:
                import sentencepiece
                self._sp = sentencepiece.SentencePieceProcessor(model_file=self.path)
        except Exception as e:  # tokenizers raises a bare Exception; sentencepiece RuntimeError or OSError
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise mmi.InputError(f"{self.path}: cannot be read as {expected} ({reason})") from None
        if is_json:
            num_base = self._tok.get_vocab_size(with_added_tokens=False)
            piece_id = self._tok.token_to_id
        else:
            num_base = self._sp.get_piece_size()
            piece_id = self._sp_piece_id
        ids = {piece: piece_id(piece) for piece in ("<unk>", "<s>", "</s>")}
        for piece, i in ids.items():
            if i is None:
                raise mmi.InputError(f"{self.path}: piece {piece!r} not in vocabulary, expected a LLaMA-layout "
                                     f"tokenizer")
        self.unk_id, self.bos_id, self.eos_id = ids["<unk>"], ids["<s>"], ids["</s>"]
        self.pad_id = num_base - 1
        self.soi_id, self.image_id = num_base, num_base + 1
        self.vocab_size = num_base + 2
        if self._sp is None:  # a tokenizer.json may already carry the image tokens; they must sit where we expect
            for piece, want in ((SOI_TOKEN, self.soi_id), (IMAGE_TOKEN, self.image_id)):
                have = self._tok.token_to_id(piece)
                if have is not None and have != want:
                    raise mmi.InputError(f"{self.path}: {piece} has id {have}, expected {want}")
        self._special_ids = {SOI_TOKEN: self.soi_id, IMAGE_TOKEN: self.image_id, "</s>": self.eos_id,
                             "<s>": self.bos_id, "<unk>": self.unk_id}
        self._skip_ids = {self.unk_id, self.bos_id, self.eos_id, self.pad_id, self.soi_id, self.image_id}
        self._make_cache()

    def _make_cache(self):
        # the demo corpus repeats its sentences endlessly; a cache makes its tokenisation nearly free
        self._encode_chunk = functools.lru_cache(maxsize=1 << 16)(self._encode_chunk_uncached)

    def __getstate__(self):  # DataLoader workers started with "spawn" get a pickled copy; the cache stays behind
        state = dict(self.__dict__)
        del state["_encode_chunk"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._make_cache()

    def _sp_piece_id(self, piece):
        i = self._sp.piece_to_id(piece)  # unknown pieces map to unk: check the round trip
        return i if self._sp.id_to_piece(i) == piece else None

    def _encode_chunk_uncached(self, text):
        if self._sp is not None:
            return tuple(self._sp.encode(text))
        return tuple(self._tok.encode(text, add_special_tokens=False).ids)

    def encode(self, text, add_bos=True):
        """Text -> ids. Chunks between special tokens are encoded as separate SentencePiece sequences, each
        with its own "▁" prefix, as transformers' slow LlamaTokenizer (legacy) does."""
        parts = _SPECIAL_SPLIT.split(text)
        ids = [self.bos_id] if add_bos else []
        for i, part in enumerate(parts):
            if i % 2 == 1:  # odd entries are the captured special tokens
                if part.startswith(IMAGE_TOKEN):
                    ids.extend([self.image_id] * (len(part) // len(IMAGE_TOKEN)))
                else:
                    ids.append(self._special_ids[part])
                continue
            if i > 0 and _STRIPPING.fullmatch(parts[i - 1]):
                part = part.lstrip()
            if i + 1 < len(parts) and _STRIPPING.fullmatch(parts[i + 1]):
                part = part.rstrip()
            if part:
                ids.extend(self._encode_chunk(part))
        return ids

    def decode(self, ids, skip_special=True):
        """Ids -> text. With skip_special, special ids are dropped and the rest decodes as one sequence;
        otherwise they are written out between separately decoded runs of ordinary ids."""
        ids = [int(i) for i in ids]
        if skip_special:
            return self._decode_run([i for i in ids if i not in self._skip_ids])
        names = {self.soi_id: SOI_TOKEN, self.image_id: IMAGE_TOKEN, self.bos_id: "<s>", self.eos_id: "</s>",
                 self.unk_id: "<unk>"}
        out, run = [], []
        for i in ids + [None]:
            if i is None or i in names:
                if run:
                    text = self._decode_run(run)
                    # a run after a special token keeps the space its first "▁" stands for
                    out.append(" " + text if out and self._piece(run[0]).startswith("▁") else text)
                    run = []
                if i is not None:
                    out.append(names[i])
            else:
                run.append(i)
        return "".join(out)

    def _piece(self, i):
        return self._sp.id_to_piece(i) if self._sp is not None else (self._tok.id_to_token(i) or "")

    def _decode_run(self, ids):
        if not ids:
            return ""
        if self._sp is not None:
            return self._sp.decode(ids)
        return self._tok.decode(ids, skip_special_tokens=False)


# ---------------------------------------------------------------------------------------------------------------
# Images: loading and the centre-crop transforms
# ---------------------------------------------------------------------------------------------------------------

class SkipSample(Exception):
    """Raised for bad data: the reader counts `reason` and moves on."""

    def __init__(self, reason, detail=""):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def load_image(path):
    """Open and fully decode an image as RGB; a missing, broken or oversized file becomes a SkipSample. More than
    Image.MAX_IMAGE_PIXELS pixels (where Pillow warns of a decompression bomb) is refused before decoding."""
    try:
        with Image.open(path) as im:
            if Image.MAX_IMAGE_PIXELS and im.width * im.height > Image.MAX_IMAGE_PIXELS:
                raise SkipSample("image_too_large", f"{path}: {im.width}x{im.height} pixels, more than "
                                                    f"{Image.MAX_IMAGE_PIXELS}")
            im.load()  # decode now: a truncated file fails here, not later inside the transform
            if im.mode.startswith("I;16"):  # 16-bit grey: its high byte, as Pillow reads 16-bit colour (convert clips)
                return Image.fromarray((np.asarray(im) >> 8).astype(np.uint8)).convert("RGB")
            return im.convert("RGB")
    except FileNotFoundError:
        raise SkipSample("image_missing", str(path)) from None
    except Image.DecompressionBombError as e:
        raise SkipSample("image_too_large", f"{path}: {e}") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise SkipSample("image_unreadable", f"{path}: {e}") from None


# An image whose long side exceeds this many times its short side loses the ends of its long side before
# resizing: the centre crop keeps only its middle anyway, and resizing all of it scales memory with the long side.
MAX_ASPECT = 16


def center_crop_arr(pil_image, image_size):
    """Halve with BOX while the short side is >= 2x the target, bicubic-resize the short side to the
    target, centre-crop. Returns (image_size, image_size, 3) uint8. Beyond MAX_ASPECT, the long side is first
    cut to MAX_ASPECT times the short one around its centre (images within it are untouched)."""
    w, h = pil_image.size
    keep = MAX_ASPECT * min(w, h)
    if max(w, h) > keep:
        cw, ch = min(w, keep), min(h, keep)
        left, top = (w - cw) // 2, (h - ch) // 2
        pil_image = pil_image.crop((left, top, left + cw, top + ch))
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.asarray(pil_image)
    top, left = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
    return arr[top:top + image_size, left:left + image_size]


class DualTransform:
    """The same PIL image at two sizes: `enc_size` for the visual tokenizer, `dec_size` for the diffusion
    target (None: encoder only, as in evaluation). Outputs (3, S, S) uint8; the collator maps them to
    float32 in [0, 1] exactly as the original's `arr / 255.0`."""

    def __init__(self, enc_size=224, dec_size=512):
        self.enc_size, self.dec_size = enc_size, dec_size

    def one(self, pil_image, size):
        arr = np.asarray(pil_image) if pil_image.size == (size, size) else center_crop_arr(pil_image, size)
        return np.ascontiguousarray(arr.transpose(2, 0, 1))  # (S, S, 3) -> (3, S, S)

    def __call__(self, pil_image):
        dec = None if self.dec_size is None else self.one(pil_image, self.dec_size)
        return self.one(pil_image, self.enc_size), dec


def to_float01(arr_u8):
    """uint8 (…, 3, S, S) -> float32 tensor in [0, 1]."""
    return torch.from_numpy(np.asarray(arr_u8)).to(torch.float32).div_(255.0)


def encoder_image(pil_image, size):
    """A PIL image as the visual tokenizer takes it (centre crop at `size`): float32 [3, size, size] in [0, 1]."""
    return to_float01(DualTransform(size, None).one(pil_image, size))


# ---------------------------------------------------------------------------------------------------------------
# One document or pair -> a Sample
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class Sample:
    """One tokenised document with its images, before packing."""
    text_ids: np.ndarray  # (T,) int64, starts with bos
    images: np.ndarray  # (n, 3, S_enc, S_enc) uint8
    images_dec: np.ndarray | None  # (n, 3, S_dec, S_dec) uint8
    image_info: list  # per image: its path, or its scene for the demo corpus
    key: tuple = ()  # where it came from, for resuming: (epoch, pass, shard slot, document in read order)
    num_prompt_tokens: int = 0  # fine-tuning: the tokens before the answer, which take no loss


def _stack(arrs):
    return None if arrs[0] is None else np.stack(arrs)


def tokenize_with_images(text, tokenizer, num_images, num_img_token, where):
    """Tokenise and check that the text holds exactly `num_images` whole image placeholders, so images and
    placeholders can never drift apart."""
    ids = np.asarray(tokenizer.encode(text), dtype=np.int64)
    n_soi = int((ids == tokenizer.soi_id).sum())
    n_img = int((ids == tokenizer.image_id).sum())
    if n_soi != num_images or n_img != num_images * num_img_token:
        raise SkipSample("placeholder_mismatch", f"{where}: {n_soi} soi / {n_img} image tokens for {num_images} images")
    return ids


def images_around(num_sentences, sentence_ixs, image_first):
    """Per sentence, (the images before it, the images after it) in text order: each image is inserted before or
    after its sentence in the given image order, as the original does, so a later "before" image lands in front
    of an earlier one."""
    before, after = [[] for _ in range(num_sentences)], [[] for _ in range(num_sentences)]
    for k, (ix, first) in enumerate(zip(sentence_ixs, image_first)):
        (before if first else after)[ix].append(k)
    return [(b[::-1], a) for b, a in zip(before, after)]


def place_images(sentences, sentence_ixs, image_first, placeholder):
    """One placeholder per image around its sentence (see images_around), sentences joined with spaces.
    Returns the text and `order`: the image index of each placeholder in text order. The original keeps its
    tensors in the given order, which misaligns images sharing a sentence; tensors must follow `order`."""
    parts, order = [], []
    for sentence, (before, after) in zip(sentences, images_around(len(sentences), sentence_ixs, image_first)):
        order += before + after
        parts.append(placeholder * len(before) + sentence + placeholder * len(after))
    return " ".join(parts), order


def _strip_special_strings(sentence):
    # web text that happens to contain our special strings would add image tokens without images
    return sentence.replace(SOI_TOKEN, "").replace(IMAGE_TOKEN, "")


def build_mmc4_sample(doc, load, tokenizer, rng, stats, num_img_token=64, sim_threshold=0.24, max_num_images=6,
                      img_first_prob=0.5, single_image_keep_prob=0.5, where=""):
    """An MMC4 document (parsed JSON) -> Sample, as the original's `preprocess_mmc4_data`: images with
    `matched_sim` >= threshold that load, at most `max_num_images` chosen at random and kept in sentence order,
    each placeholder before (p=img_first_prob) or after its sentence, sentences joined by spaces, "</s>" added.
    `load(image_name)` returns (enc, dec) arrays or raises SkipSample; failed images are counted in `stats`.
    Every image needs a `matched_text_index`, but only a chosen image's must name a sentence (the original
    places only those)."""
    try:
        sentences = [_strip_special_strings(s) for s in doc["text_list"]]
        infos = doc["image_info"]
        if "similarity_matrix" in doc:  # the original zips image_info with the matrix rows
            infos = infos[:len(doc["similarity_matrix"])]
        candidates = []
        for info in infos:
            ix, sim = info["matched_text_index"], float(info["matched_sim"])
            if sim >= sim_threshold:
                candidates.append((ix, str(info["image_name"])))
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise SkipSample("malformed_line", f"{where}: {e!r}") from None

    # The original loads every candidate, shuffles and keeps the first `max_num_images`; loading in shuffled
    # order until enough succeed picks the same distribution without decoding images that would be dropped.
    rng.shuffle(candidates)
    chosen = []
    for ix, name in candidates:
        if len(chosen) == max_num_images:
            break
        try:
            images = load(name)
        except SkipSample as e:
            stats[f"image:{e.reason}"] += 1
            continue
        if not (isinstance(ix, int) and not isinstance(ix, bool) and 0 <= ix < len(sentences)):
            raise SkipSample("malformed_line", f"{where}: matched_text_index {ix!r} of {name} is not one of the "
                                               f"{len(sentences)} sentences")
        chosen.append((ix, name, *images))
    if not chosen:
        raise SkipSample("no_usable_image", where)
    chosen.sort(key=lambda c: c[0])  # stable: images of one sentence keep their drawn order, as dual_sort does

    first = [rng.random() < img_first_prob for _ in chosen]
    text, order = place_images(sentences, [c[0] for c in chosen], first, image_placeholder(num_img_token))
    ids = tokenize_with_images(clean_image_spaces(text) + "</s>", tokenizer, len(chosen), num_img_token, where)
    if len(chosen) == 1 and rng.random() >= single_image_keep_prob:
        raise SkipSample("single_image_dropped", where)
    chosen = [chosen[k] for k in order]
    return Sample(ids, np.stack([c[2] for c in chosen]), _stack([c[3] for c in chosen]), [c[1] for c in chosen])


def parse_pair_line(line, where=""):
    """One LAION-style annotation line -> dict with `image` and `caption`; JSON or a Python literal (the
    original's own example file uses single quotes)."""
    text = line.decode("utf-8", errors="replace") if isinstance(line, bytes) else line
    try:
        info = json.loads(text)
    except (ValueError, RecursionError):
        try:
            info = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            raise SkipSample("malformed_line", f"{where}: neither JSON nor a Python literal") from None
    if not isinstance(info, dict) or "image" not in info or "caption" not in info:
        raise SkipSample("malformed_line", f"{where}: expected a dict with 'image' and 'caption'")
    caption = info["caption"]
    if not isinstance(caption, str):
        if not isinstance(caption, (list, tuple)) or not all(isinstance(c, str) for c in caption):
            raise SkipSample("malformed_line", f"{where}: caption must be a string or a list of strings")
        caption = " ".join(caption)
    return {"image": str(info["image"]), "caption": caption}


def build_pair_sample(info, load, tokenizer, rng, num_img_token=64, img_first_prob=0.5, num_total_token=2048,
                      where=""):
    """An image-caption pair -> Sample, as the original's `preprocess_laion_data`: caption lower-cased, image
    placeholder before (p=img_first_prob) or after it, "</s>"; an over-long sample keeps its image."""
    enc, dec = load(info["image"])  # SkipSample propagates: a pair without its image is useless
    caption = _strip_special_strings(info["caption"]).lower()
    img_first = rng.random() < img_first_prob
    placeholder = image_placeholder(num_img_token)
    text = (placeholder + caption if img_first else caption + placeholder) + "</s>"
    ids = tokenize_with_images(text, tokenizer, 1, num_img_token, where)
    if len(ids) > num_total_token:
        tail = num_img_token + 2  # soi + image tokens + eos
        ids = ids[:num_total_token] if img_first else np.concatenate([ids[:num_total_token - tail], ids[-tail:]])
    return Sample(ids, enc[None], None if dec is None else dec[None], [info["image"]])


class ImageFolder:
    """`load(name)` for a local folder of images: (enc, dec) arrays, or SkipSample. A class rather than a
    closure so that DataLoader workers started with "spawn" can receive it."""

    def __init__(self, data_root, transform):
        self.data_root, self.transform = data_root, transform

    def __call__(self, name):
        return self.transform(load_image(os.path.join(self.data_root, name)))


# ---------------------------------------------------------------------------------------------------------------
# Shard files -> a stream of Samples for one rank/worker
# ---------------------------------------------------------------------------------------------------------------

def expand_braces(pattern):
    """'docs_shard_{0..2}_v2.jsonl' -> [..._0_..., ..._1_..., ..._2_...]; also {a,b} lists and zero padding
    ('{0000..0002}.txt'). Several groups expand as a cartesian product, left to right."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if m is None:
        return [pattern]
    body, head, tail = m.group(1), pattern[:m.start()], pattern[m.end():]
    r = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if r:
        a, b = r.group(1), r.group(2)
        width = len(a) if a.startswith("0") and len(a) > 1 else 0
        step = 1 if int(b) >= int(a) else -1
        items = [str(i).zfill(width) for i in range(int(a), int(b) + step, step)]
    else:
        items = body.split(",")
    return [head + item + rest for item in items for rest in expand_braces(tail)]


def resolve_shard(annt_root, shard):
    """`<shard>` if it exists, else `<shard>.zip` (the original stores MMC4 shards as `<name>.jsonl.zip`)."""
    path = os.path.join(annt_root, shard)
    if os.path.exists(path) or not os.path.exists(path + ".zip"):
        return path
    return path + ".zip"


def iter_shard_lines(path):
    """Yield the lines of a text shard, or of the jsonl inside a zip, streamed from the archive (nothing is
    unpacked to disk). Raises SkipSample if the shard is missing or unreadable (even midway)."""
    try:
        if path.endswith(".zip"):
            with zipfile.ZipFile(path) as zf:
                names = [n for n in zf.namelist() if not n.endswith("/")]
                inner = os.path.basename(path)[:-4]
                member = inner if inner in names else (names[0] if len(names) == 1 else None)
                if member is None:
                    raise SkipSample("shard_unreadable", f"{path}: no member {inner!r} among {names[:5]}")
                with zf.open(member) as f:
                    yield from f
        else:
            with open(path, "rb") as f:
                yield from f
    except FileNotFoundError:
        raise SkipSample("shard_missing", path) from None
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as e:
        raise SkipSample("shard_unreadable", f"{path}: {e}") from None


def worker_shard_slots(num_shards, seed, epoch, pass_idx, rank, world_size, worker, num_workers):
    """Shard indices this (rank, worker) reads in one pass: one shuffled order, the same on every rank,
    dealt round-robin to the world_size * num_workers readers, so each shard is read exactly once."""
    order = list(range(num_shards))
    random.Random(f"shards/{seed}/{epoch}/{pass_idx}").shuffle(order)
    reader, num_readers = rank * num_workers + worker, world_size * num_workers
    return order[reader::num_readers]


# The original shuffles documents through webdataset's buffer: 5,000 documents, the first given out once 1,000
# are in.
DOC_SHUFFLE_BUFFER, DOC_SHUFFLE_INITIAL = 5000, 1000


def buffer_shuffle(items, size, initial, rng):
    """Shuffle a stream through a buffer of `size` items, as webdataset's shuffle stage does: each step reads
    one item, and a second while the buffer is not full; once it holds `initial` (at most `size`) items each step
    gives out one drawn uniformly (rng.randint), the last item taking its place; at the end the rest is drawn
    out the same way. size <= 1 keeps the order."""
    if size <= 1:
        yield from items
        return
    items, buf, initial = iter(items), [], min(initial, size)

    def draw():
        k = rng.randint(0, len(buf) - 1)
        item, buf[k] = buf[k], buf[-1]
        buf.pop()
        return item

    for item in items:
        buf.append(item)
        if len(buf) < size:
            buf.extend(itertools.islice(items, 1))
        if len(buf) >= initial:
            yield draw()
    while buf:
        yield draw()


def sample_rng(seed, ident):
    # every document draws from its own generator, named by (epoch, pass, shard, line): a resumed run rebuilds
    # it identically, and each epoch places its images afresh
    return random.Random(f"doc/{seed}/" + "/".join(map(str, ident)))


@dataclass
class Reader:
    """Where a stream runs: which rank/worker of how many, and the counters of skipped data."""
    rank: int = 0
    world_size: int = 1
    worker: int = 0
    num_workers: int = 1
    stats: Counter = field(default_factory=Counter)


def current_reader(rank=None, world_size=None, first_worker=0):
    """The Reader of this process (rank and world_size None: RANK and WORLD_SIZE) and DataLoader worker: worker w
    plays reader (w + first_worker) mod num_workers, so that a resumed loader starts with the one whose turn is
    next."""
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    info = torch.utils.data.get_worker_info()
    worker, num_workers = (0, 1) if info is None else ((info.id + first_worker) % info.num_workers, info.num_workers)
    return Reader(rank, world, worker, num_workers)


class ShardSource:
    """A dataset stored as shard files of one record per line (MMC4 jsonl / jsonl.zip, LAION-style txt).
    `build(line, rng, where, stats)` turns a line into a Sample or raises SkipSample (per-image failures of
    a document that survives are counted in `stats`).

    A shard's non-empty lines are read through buffer_shuffle (the original's sizes by default; shuffle_buffer
    0 = file order), seeded by (seed, epoch, pass, shard): resuming at the shard's n-th document reads the
    shard again and draws the same order, building only from the n-th on. The original's buffer runs on over
    a worker's next shards; here each shard drains its own, so a resume reads one shard again, not the pass."""

    def __init__(self, name, shards, annt_root, build, seed=42, shuffle_buffer=DOC_SHUFFLE_BUFFER,
                 shuffle_initial=DOC_SHUFFLE_INITIAL):
        self.name, self.annt_root, self.build, self.seed = name, annt_root, build, seed
        self.shards = expand_braces(shards) if isinstance(shards, str) else list(shards)
        self.shuffle_buffer, self.shuffle_initial = shuffle_buffer, shuffle_initial

    def samples(self, reader, epoch, pass_idx, start_slot=0, start_line=0):
        """Yield Samples of one pass for this reader, starting at its shard list's slot `start_slot`, from that
        shard's document `start_line` in read order (a Sample's key: (epoch, pass, slot, that number))."""
        slots = worker_shard_slots(len(self.shards), self.seed, epoch, pass_idx, reader.rank, reader.world_size,
                                   reader.worker, reader.num_workers)
        for slot in range(start_slot, len(slots)):
            shard = self.shards[slots[slot]]
            path = resolve_shard(self.annt_root, shard)
            lines = ((i, line) for i, line in enumerate(iter_shard_lines(path)) if line.strip())
            order = random.Random(f"shuffle/{self.seed}/{epoch}/{pass_idx}/{shard}")
            lines = buffer_shuffle(lines, self.shuffle_buffer, self.shuffle_initial, order)
            first = start_line if slot == start_slot else 0
            try:
                for n, (line_idx, line) in enumerate(lines):
                    if n < first:
                        continue
                    key = (epoch, pass_idx, slot, n)
                    reader.stats["lines"] += 1
                    try:
                        rng = sample_rng(self.seed, (epoch, pass_idx, shard, line_idx))
                        sample = self.build(line, rng, f"{shard}:{line_idx}", reader.stats)
                    except SkipSample as e:
                        reader.stats[f"doc:{e.reason}"] += 1
                        continue
                    sample.key = key
                    reader.stats["docs_used"] += 1
                    yield sample
            except SkipSample as e:  # the shard itself failed (missing, corrupt zip, truncated stream)
                reader.stats[f"shard:{e.reason}"] += 1

    def next_key(self, key):
        return (*key[:3], key[3] + 1)


class Mmc4Builder:
    """A jsonl line of an MMC4 shard -> Sample (see build_mmc4_sample)."""

    def __init__(self, load, tokenizer, **options):
        self.load, self.tokenizer, self.options = load, tokenizer, options

    def __call__(self, line, rng, where, stats):
        try:
            doc = json.loads(line)
        except (ValueError, RecursionError):
            raise SkipSample("malformed_line", f"{where}: not JSON") from None
        if not isinstance(doc, dict):
            raise SkipSample("malformed_line", f"{where}: expected a JSON object")
        return build_mmc4_sample(doc, self.load, self.tokenizer, rng, stats, where=where, **self.options)


class PairBuilder:
    """A line of a LAION-style annotation file -> Sample (see build_pair_sample)."""

    def __init__(self, load, tokenizer, **options):
        self.load, self.tokenizer, self.options = load, tokenizer, options

    def __call__(self, line, rng, where, stats):
        info = parse_pair_line(line, where)
        return build_pair_sample(info, self.load, self.tokenizer, rng, where=where, **self.options)


def mmc4_source(shards, annt_root, data_root, tokenizer, transform=None, name="mmc4", seed=42, num_img_token=64,
                sim_threshold=0.24, max_num_images=6, img_first_prob=0.5, shuffle_buffer=DOC_SHUFFLE_BUFFER):
    """MMC4: shards `<annt_root>/<shard>` or `<shard>.zip`, images under `data_root`."""
    build = Mmc4Builder(ImageFolder(data_root, transform or DualTransform()), tokenizer, num_img_token=num_img_token,
                        sim_threshold=sim_threshold, max_num_images=max_num_images, img_first_prob=img_first_prob)
    return ShardSource(name, shards, annt_root, build, seed, shuffle_buffer)


def pair_source(shards, annt_root, data_root, tokenizer, transform=None, name="laion", seed=42, num_img_token=64,
                img_first_prob=0.5, num_total_token=2048, shuffle_buffer=DOC_SHUFFLE_BUFFER):
    """LAION-style pairs: annotation files of one dict per line (`image`, `caption`), images under data_root."""
    build = PairBuilder(ImageFolder(data_root, transform or DualTransform()), tokenizer, num_img_token=num_img_token,
                        img_first_prob=img_first_prob, num_total_token=num_total_token)
    return ShardSource(name, shards, annt_root, build, seed, shuffle_buffer)


# ---------------------------------------------------------------------------------------------------------------
# Samples -> packed rows -> the batch dict
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class PackConfig:
    num_total_token: int = 2048  # row length L
    num_img_token: int = 64
    max_num_images: int = 15  # per row; 15 for MMC4, 30 for LAION-style; <= 0: no limit
    truncation_level: str = "image"  # "image" (MMC4) or "sample" (LAION-style)
    batch_size: int = 4  # rows per batch (4 MMC4, 2 LAION-style in the paper)

    def __post_init__(self):
        if self.truncation_level not in ("image", "sample"):
            raise ValueError(f"truncation_level {self.truncation_level!r}, expected 'image' or 'sample'")
        if self.num_total_token <= self.num_img_token + 1:
            raise ValueError(f"num_total_token {self.num_total_token} cannot hold one image of "
                             f"{self.num_img_token} tokens plus its soi")


def nearest_bos_idxs(text_ids, bos_id, soi_id):
    """Per soi in the row: position of the last bos before it, 0 if none."""
    soi = np.flatnonzero(text_ids == soi_id)
    bos = np.flatnonzero(text_ids == bos_id)
    k = np.searchsorted(bos, soi, side="left")  # number of bos strictly before each soi
    padded = np.concatenate([[0], bos])  # "0 if none" is entry 0
    return padded[k].astype(np.int64)


def row_cut(ids, L, cfg, bos_id, soi_id, image_id):
    """Length of the next row of at most L tokens cut from the front of `ids` (len(ids) >= L), following the
    original's `extract_seq` + `check_image_truncate`, computed as one cut instead of cut-then-give-back."""
    n_tok = cfg.num_img_token
    cut = L
    num_images = int((ids[:L] == image_id).sum()) // n_tok
    if 0 < cfg.max_num_images < num_images:
        soi = np.flatnonzero(ids == soi_id)
        last_ok, surplus = soi[cfg.max_num_images - 1], soi[cfg.max_num_images]
        if cfg.truncation_level == "sample":
            bos = np.flatnonzero(ids[:surplus] == bos_id)
            cut = int(bos[-1]) if len(bos) and bos[-1] > last_ok else int(surplus)
        else:
            cut = int(last_ok) + n_tok + 1  # right after the last allowed image's tokens
        return cut
    soi = np.flatnonzero(ids[:cut] == soi_id)
    if len(soi) and soi[-1] >= cut - n_tok:  # the last image would lose some of its tokens
        cut_before_image = int(soi[-1])
        if cfg.truncation_level == "sample":
            bos = np.flatnonzero(ids[:cut] == bos_id)
            # the original would loop forever on a row whose only bos is at 0; cut before the image instead
            cut = int(bos[-1]) if len(bos) and bos[-1] > 0 else cut_before_image
        else:
            cut = cut_before_image
    return cut


@dataclass
class Row:
    text_ids: np.ndarray  # (l,) int64
    images: np.ndarray  # (n, 3, S, S) uint8
    images_dec: np.ndarray | None
    image_info: list
    nearest_bos_idxs: np.ndarray  # (n,)
    keys: list  # source keys of the documents that contribute tokens


class Packer:
    """A running buffer of token ids and images; rows are cut from its front once it holds L tokens."""

    def __init__(self, cfg, tokenizer):
        self.cfg = cfg
        self.bos_id, self.soi_id, self.image_id = tokenizer.bos_id, tokenizer.soi_id, tokenizer.image_id
        self.ids = np.zeros(0, dtype=np.int64)
        self.images, self.images_dec, self.image_info = [], [], []
        self.segments = []  # [key, tokens of that document still in the buffer, tokens already consumed]

    def add(self, sample, skip_tokens=0):
        """Append a sample; `skip_tokens` drops its first tokens (and their images) when resuming."""
        ids = sample.text_ids[skip_tokens:]
        n_skipped_images = int((sample.text_ids[:skip_tokens] == self.soi_id).sum())
        self.ids = np.concatenate([self.ids, ids])
        self.images.extend(sample.images[n_skipped_images:])
        self.images_dec.extend([None] * (len(sample.images) - n_skipped_images) if sample.images_dec is None
                               else sample.images_dec[n_skipped_images:])
        self.image_info.extend(sample.image_info[n_skipped_images:])
        self.segments.append([sample.key, len(ids), skip_tokens])

    def __len__(self):
        return len(self.ids)

    def position(self):
        """(key, tokens consumed) of the oldest document still in the buffer; None when empty."""
        return (self.segments[0][0], self.segments[0][2]) if self.segments else None

    def _consume(self, n):
        keys = []
        while n > 0:
            seg = self.segments[0]
            take = min(n, seg[1])
            keys.append(seg[0])
            seg[1] -= take
            seg[2] += take
            n -= take
            if seg[1] == 0:
                self.segments.pop(0)
        return keys

    def next_row(self, length=None):
        """Cut one row of at most `length` tokens (default L; needs len(self) >= length). Returns a Row, or None
        if the row held no image (dropped)."""
        cut = row_cut(self.ids, length or self.cfg.num_total_token, self.cfg, self.bos_id, self.soi_id, self.image_id)
        row_ids, self.ids = self.ids[:cut], self.ids[cut:]
        n = int((row_ids == self.soi_id).sum())
        if int((row_ids == self.image_id).sum()) != n * self.cfg.num_img_token:
            raise AssertionError(f"row cut through an image: {n} soi, {(row_ids == self.image_id).sum()} image tokens")
        keys = self._consume(cut)
        images, self.images = self.images[:n], self.images[n:]
        images_dec, self.images_dec = self.images_dec[:n], self.images_dec[n:]
        info, self.image_info = self.image_info[:n], self.image_info[n:]
        if n == 0:
            return None
        return Row(row_ids, np.stack(images), None if images_dec[0] is None else np.stack(images_dec), info,
                   nearest_bos_idxs(row_ids, self.bos_id, self.soi_id), keys)

    def flush(self):
        """The leftover (< L tokens) as a last row, or None (the original drops it; tests use it)."""
        return self.next_row(len(self.ids)) if len(self.ids) else None


def pad_rows(seqs, value, left=False):
    """Id sequences -> a (B, L) long tensor, L the longest, each padded with `value` on its right (left: its left).
    The attention mask of the same rows is pad_rows([[1] * len(x) for x in seqs], 0, left)."""
    L = max(len(x) for x in seqs)
    out = torch.full((len(seqs), L), value, dtype=torch.long)
    for b, x in enumerate(seqs):
        start = L - len(x) if left else 0
        out[b, start:start + len(x)] = torch.as_tensor(x, dtype=torch.long)
    return out


def collate_rows(rows, pad_id, dataset_name, loss_img_weight=None, loss_txt_weight=None):
    """Rows -> the model's batch dict (keys = the original forward's argument names); right padding."""
    batch = {
        "text_ids": pad_rows([r.text_ids for r in rows], pad_id),  # (B, L)
        "attention_mask": pad_rows([[1] * len(r.text_ids) for r in rows], 0),  # (B, L)
        "image_tensors": to_float01(np.concatenate([r.images for r in rows])),  # (B_I, 3, S_enc, S_enc)
        "num_image_per_seq": torch.tensor([len(r.images) for r in rows], dtype=torch.long),  # (B,)
        "nearest_bos_idxs": torch.from_numpy(np.concatenate([r.nearest_bos_idxs for r in rows])),  # (B_I,)
        "ignore_prompt_token_offset": 0,
        "meta": {"dataset_name": dataset_name,
                 "seq_lens": torch.tensor([len(r.text_ids) for r in rows]),
                 "image_info": [info for r in rows for info in r.image_info],
                 "doc_keys": [r.keys for r in rows]},
    }
    if all(isinstance(i, dict) and "scene" in i for i in batch["meta"]["image_info"]):  # the demo corpus
        batch["meta"]["scenes"] = [i["scene"] for i in batch["meta"]["image_info"]]
    if rows[0].images_dec is not None:
        batch["image_tensors_dec"] = to_float01(np.concatenate([r.images_dec for r in rows]))
    if loss_img_weight is not None:
        batch["loss_img_weight"] = loss_img_weight
    if loss_txt_weight is not None:
        batch["loss_txt_weight"] = loss_txt_weight
    return batch


# ---------------------------------------------------------------------------------------------------------------
# Sources -> batches -> one mixed, resumable stream
# ---------------------------------------------------------------------------------------------------------------

def source_batches(source, cfg, tokenizer, reader, state, flush_last=False, loss_weights=(None, None)):
    """Whole batches of one pass of `source`, each with the source state to resume right after it.
    state = {"epoch", "pass", "key": key of the first document to read (None = start), "skip": tokens}."""
    epoch, pass_idx = state["epoch"], state["pass"]
    key, skip = state.get("key"), state.get("skip", 0)
    start = {} if key is None else {"start_slot": key[2], "start_line": key[3]}
    packer, rows, last_key = Packer(cfg, tokenizer), [], None

    def resume_state():
        pos = packer.position()
        if pos is not None:
            return {"epoch": epoch, "pass": pass_idx, "key": pos[0], "skip": pos[1]}
        if last_key is None:  # nothing read since (re)starting: resume where we started
            return {"epoch": epoch, "pass": pass_idx, "key": key, "skip": skip}
        return {"epoch": epoch, "pass": pass_idx, "key": source.next_key(last_key), "skip": 0}

    def make_batch():
        batch = collate_rows(rows, tokenizer.pad_id, source.name, *loss_weights)
        batch["meta"]["position"] = resume_state()
        return batch

    for sample in source.samples(reader, epoch, pass_idx, **start):
        packer.add(sample, skip_tokens=skip if key is not None and sample.key == tuple(key) else 0)
        last_key = sample.key
        while len(packer) >= cfg.num_total_token:
            row = packer.next_row()
            if row is None:
                continue
            reader.stats["rows"] += 1
            rows.append(row)
            if len(rows) == cfg.batch_size:
                yield make_batch()
                rows = []
    if flush_last:
        row = packer.flush()
        if row is not None:
            rows.append(row)
        if rows:
            yield make_batch()


def format_stats(name, stats, where):
    """One summary line: documents used and what was skipped, by reason."""
    skipped = {k: v for k, v in sorted(stats.items()) if ":" in k}
    parts = ", ".join(f"{k}={v}" for k, v in skipped.items()) or "none"
    return (f"[data] {name} {where}: lines {stats['lines']}, docs used {stats['docs_used']}, "
            f"rows {stats['rows']}; skipped: {parts}")


class MixedDataset(torch.utils.data.IterableDataset):
    """Batches from several sources drawn with probabilities ∝ `probs` ("longest": an exhausted source starts
    its next pass and is marked done; the epoch ends when every source has been exhausted once).

    Each (rank, DataLoader worker) reads its own shards and draws with a generator seeded by
    seed + rank * num_workers + worker, as the original. Every batch carries meta["position"] =
    {"reader": global reader index, "state": ...}; keep the latest per reader and pass that dict to
    `load_state_dict` to resume exactly after those batches."""

    def __init__(self, sources, probs=None, pack_configs=None, tokenizer=None, seed=0, rank=None, world_size=None,
                 loss_weights=None, flush_last=False, verbose=True):
        self.sources = list(sources)
        self.probs = [1.0] * len(self.sources) if probs is None else list(probs)
        if len(self.probs) != len(self.sources):
            raise ValueError(f"probs has {len(self.probs)} entries, expected one per source ({len(self.sources)})")
        self.pack_configs = pack_configs or [PackConfig() for _ in self.sources]
        self.tokenizer, self.seed = tokenizer, seed
        self.rank, self.world_size = rank, world_size
        self.loss_weights = loss_weights or [(None, None)] * len(self.sources)
        self.flush_last, self.verbose = flush_last, verbose
        self.epoch = 0
        self.resume = {}
        self.first_worker = 0  # the reader DataLoader worker 0 plays (worker w: the next one on, cyclically)
        self.last_stats = {}  # per source: counters of its last finished pass (in this process)

    def set_epoch(self, epoch):
        self.epoch = epoch

    @staticmethod
    def record_position(positions, batch):
        """Keep the latest position per reader: call on every consumed batch, save `positions` with the
        checkpoint, hand it to `load_state_dict` when resuming."""
        pos = batch["meta"]["position"]
        positions[pos["reader"]] = pos["state"]
        return positions

    def load_state_dict(self, positions):
        """positions: {reader index: state} as collected from meta["position"] of the batches consumed."""
        self.resume = {int(k): v for k, v in positions.items()}

    def _readers(self):
        """One Reader per source (its own skip counters) for this rank and DataLoader worker."""
        return [current_reader(self.rank, self.world_size, self.first_worker) for _ in self.sources]

    def __iter__(self):
        readers = self._readers()
        reader = readers[0]
        index = reader.rank * reader.num_workers + reader.worker
        start = self.resume.get(index)
        if start is None or start["epoch"] != self.epoch:  # a saved position only applies to its own epoch
            start = {"epoch": self.epoch, "draws": 0, "done": [0] * len(self.sources),
                     "sources": [{"epoch": self.epoch, "pass": 0, "key": None, "skip": 0} for _ in self.sources]}
        generator = torch.Generator().manual_seed(self.seed + index)
        cum = np.cumsum(np.asarray(self.probs, dtype=np.float64) / sum(self.probs))
        draws, done = start["draws"], list(start["done"])
        states = [dict(s) for s in start["sources"]]
        for _ in range(draws):  # replay the draws made before the checkpoint
            torch.rand(1, generator=generator)
        streams = [self._stream(i, readers[i], states[i]) for i in range(len(self.sources))]
        while sum(done) < len(self.sources):
            i = min(int(np.searchsorted(cum, torch.rand(1, generator=generator).item())), len(cum) - 1)
            draws += 1
            batch = next(streams[i], None)
            if batch is None:  # source exhausted: start its next pass, mark it done
                if self.verbose and (readers[i].stats or not done[i]):  # the summary line of this pass
                    print(format_stats(self.sources[i].name, readers[i].stats,
                                       f"epoch {states[i]['epoch']} pass {states[i]['pass']} rank {reader.rank} "
                                       f"worker {reader.worker}"), flush=True)
                self.last_stats[self.sources[i].name] = dict(readers[i].stats)
                readers[i].stats.clear()
                states[i] = {"epoch": states[i]["epoch"], "pass": states[i]["pass"] + 1, "key": None, "skip": 0}
                streams[i] = self._stream(i, readers[i], states[i])
                done[i] = 1
                continue
            states[i] = batch["meta"].pop("position")
            batch["meta"]["position"] = {"reader": index, "state": {
                "epoch": self.epoch, "draws": draws, "done": list(done), "sources": [dict(s) for s in states]}}
            batch["meta"]["stats"] = dict(readers[i].stats)  # this source, this pass so far
            yield batch

    def _stream(self, i, reader, state):
        return source_batches(self.sources[i], self.pack_configs[i], self.tokenizer, reader, state,
                              self.flush_last, self.loss_weights[i])


def pretrain_mix(tokenizer, pairs, mmc4, enc_size=224, dec_size=512, num_total_token=2048, num_img_token=64,
                 seed=42, rank=None, world_size=None):
    """The paper's pretraining stream: three LAION-style pair sources and MMC4 drawn 1:1:1:2, 2 rows
    per pair batch (sample-level cuts, <= 30 images a row) and 4 per MMC4 batch (image-level, <= 15).
    pairs: {name: (annt_root, data_root, shard pattern)} in order, e.g. blip2, laion_en, laion_coco;
    mmc4: (annt_root, data_root, shard pattern)."""
    transform = DualTransform(enc_size, dec_size)
    sources, probs, cfgs = [], [], []
    for name, (annt_root, data_root, shards) in pairs.items():
        sources.append(pair_source(shards, annt_root, data_root, tokenizer, transform, name=name, seed=seed,
                                   num_img_token=num_img_token, num_total_token=num_total_token))
        probs.append(1.0)
        cfgs.append(PackConfig(num_total_token, num_img_token, 30, "sample", 2))
    annt_root, data_root, shards = mmc4
    sources.append(mmc4_source(shards, annt_root, data_root, tokenizer, transform, name="mmc4", seed=seed,
                               num_img_token=num_img_token))
    probs.append(2.0)
    cfgs.append(PackConfig(num_total_token, num_img_token, 15, "image", 4))
    return MixedDataset(sources, probs, cfgs, tokenizer, seed=seed, rank=rank, world_size=world_size)


# ---------------------------------------------------------------------------------------------------------------
# Fine-tuning data: one prompt and its answer per row, the loss on the answer only
# ---------------------------------------------------------------------------------------------------------------

def answer_batches(source, batch_size, tokenizer, reader, state, loss_weights=(None, None)):
    """Whole batches of one pass of `source`, one Sample per row (not packed), each row's
    ignore_prompt_token_offset at its num_prompt_tokens; each batch carries the source state to resume right after
    it (as source_batches's). An incomplete last batch is dropped."""
    epoch, pass_idx, key = state["epoch"], state["pass"], state.get("key")
    start = {} if key is None else {"start_slot": key[2], "start_line": key[3]}
    samples = []
    for sample in source.samples(reader, epoch, pass_idx, **start):
        samples.append(sample)
        if len(samples) < batch_size:
            continue
        rows = [Row(s.text_ids, s.images, s.images_dec, s.image_info,
                    nearest_bos_idxs(s.text_ids, tokenizer.bos_id, tokenizer.soi_id), [s.key]) for s in samples]
        reader.stats["rows"] += len(rows)
        batch = collate_rows(rows, tokenizer.pad_id, source.name, *loss_weights)
        batch["ignore_prompt_token_offset"] = torch.tensor([s.num_prompt_tokens for s in samples])  # (B,)
        batch["meta"]["position"] = {"epoch": epoch, "pass": pass_idx, "key": source.next_key(sample.key), "skip": 0}
        yield batch
        samples = []


class AnswerDataset(MixedDataset):
    """A MixedDataset whose sources' Samples are rows of their own (answer_batches), `batch_size` of its pack
    configs to a batch: resumable, mixed and dealt to ranks and workers as the packed streams are."""

    def _stream(self, i, reader, state):
        return answer_batches(self.sources[i], self.pack_configs[i].batch_size, self.tokenizer, reader, state,
                              self.loss_weights[i])


def demo_qa_finetune(tokenizer, cfg, split, rank, world, seed, batch_size=16, num_questions=None):
    """finetune_dataset "demo_qa": demo_qa_dataset for a model of config `cfg`."""
    return demo_qa_dataset(tokenizer, split, cfg.num_img_token, batch_size, num_questions, seed=seed,
                           image_size=cfg.vision.image_size, rank=rank, world_size=world)


# ---------------------------------------------------------------------------------------------------------------
# Fine-tuning data: instruction records -> rows whose text loss is on the answers only
# ---------------------------------------------------------------------------------------------------------------

def finetune_builder(name):
    """The function that builds fine-tuning dataset `name` (train.py's finetune_dataset)."""
    if name == "llava":
        return llava_dataset
    if name in STORY_READERS:                            # vist, pororo, flintstones
        return functools.partial(story_dataset, name)
    if name == "ade20k":
        return ade20k_dataset
    if name == "demo_qa":
        return demo_qa_finetune
    names = ", ".join(map(repr, ["llava", *sorted(STORY_READERS), "ade20k", "demo_qa"]))
    raise mmi.InputError(f"finetune_dataset {name!r}, expected one of {names}")


def finetune_dataset(name, tokenizer, cfg, split, rank, world, seed, **args):
    """train.py's data="finetune": the dataset `name` (finetune_dataset) with its keyword arguments (finetune_args)
    for split "train" or "val" -> an IterableDataset of collated batches, resumable as MixedDataset, or None where
    it has no such split. cfg: the model's MMIConfig (image size, image tokens, row length)."""
    build = finetune_builder(name)
    try:
        inspect.signature(build).bind(tokenizer, cfg, split, rank, world, seed, **args)
    except TypeError as e:
        raise mmi.InputError(f"finetune_args {args}: {e} (see data.{getattr(build, 'func', build).__name__})") from None
    return build(tokenizer, cfg, split, rank, world, seed, **args)


@dataclass
class Example:
    """One fine-tuning example, before batching."""
    text_ids: np.ndarray  # (T,) int64, starts with bos
    labels: np.ndarray  # (T,) int64: the token where it is learned, -100 where it is not
    images: np.ndarray  # (n, 3, S, S) uint8, in the order of their placeholders


def collate_examples(examples, pad_id, dataset_name, loss_img_weight=0.0):
    """Examples -> the model's batch dict, right-padded: gt_text_ids carries the labels (-100 on padding), each
    example is one document from position 0 (nearest_bos_idxs 0), and loss_img_weight 0 leaves the image decoder
    out (a text-only loss, as the original's instruction tuning)."""
    num = torch.tensor([len(e.images) for e in examples], dtype=torch.long)
    return {"text_ids": pad_rows([e.text_ids for e in examples], pad_id),  # (B, L)
            "attention_mask": pad_rows([[1] * len(e.text_ids) for e in examples], 0),  # (B, L)
            "gt_text_ids": pad_rows([e.labels for e in examples], -100),  # (B, L)
            "image_tensors": to_float01(np.concatenate([e.images for e in examples])),  # (B_I, 3, S, S)
            "num_image_per_seq": num,  # (B,)
            "nearest_bos_idxs": torch.zeros(int(num.sum()), dtype=torch.long),  # (B_I,)
            "loss_img_weight": loss_img_weight,
            "meta": {"dataset_name": dataset_name}}


# The original's instruction format for its VQA-style fine-tuning (an empty system prompt, the user prompt, the
# assistant prompt, joined by spaces): the answer follows after one space, then "</s>".
LLAVA_PROMPT = ("Based on the image, please answer the question. {image}{question} Please provide an accurate answer "
                "within one word. The answer is:")


def llava_dataset(tokenizer, cfg, split, rank, world, seed, annt="", data_root="", val_annt="", val_data_root="",
                  batch_size=4, max_len=0, prompt=LLAVA_PROMPT):
    """LLaVA-style instruction data (the original's LLaVADataset read through its VQACollator in training mode).

    annt: a .json file holding a list of records, or a .jsonl file of one record a line (or a list of such files);
    data_root: the folder image paths are relative to (one per annt file; "" = the annotation file's folder).
    val_annt / val_data_root: the same for split "val" ("" = no validation split). max_len: tokens per row
    (0 = the model's seq_len). prompt: the template, with {image} and {question}. The original layout:

        llava_instruct_150k.json            [{"id": "000000033471",
                                              "image": "coco/train2017/000000033471.jpg",   (or a list of paths)
                                              "conversations": [
                                                {"from": "human", "value": "<image>\\nWhat are the colors ...?"},
                                                {"from": "gpt",   "value": "The bus in the image is white ..."},
                                                {"from": "human", "value": "What feature can be seen ...?"},
                                                {"from": "gpt",   "value": "..."}]},
                                             ...]
        <data_root>/coco/train2017/000000033471.jpg

    Rules, as the original: a conversation is cut into rounds (human, gpt), each its own example with all of the
    record's images; a round's text is `prompt` with the images at {image} and the question (its <image> marks
    removed) at {question}, then " " + the answer + "</s>"; the text loss is on the answer and "</s>" only (the
    tokens after those of the prompt alone), -100 everywhere else; the image decoder does not run. Beyond the
    original, which reads one image a record: with several images and as many <image> marks in a question, each
    image goes at its own mark, in order, and {image} stays empty (a question without marks gets them all at
    {image}). A row longer than max_len is cut at max_len, the answer's end first. Skipped, counted by reason: a
    .jsonl line that is not JSON (malformed_line), a record or round of the wrong shape (malformed_record), a human
    turn with no gpt turn after it (no_gpt_turn), no image (no_image), a missing or unreadable image (image_missing,
    image_unreadable), marks that do not number the images (image_marks_mismatch), a prompt that leaves no answer
    token within max_len (too_long)."""
    if split not in ("train", "val"):
        raise mmi.InputError(f"llava: split {split!r}, expected 'train' or 'val'")
    files, roots = (annt, data_root) if split == "train" else (val_annt, val_data_root)
    if not files:
        if split == "train":
            raise mmi.InputError("finetune_args: llava needs annt, the path of its annotation file(s)")
        return None
    files = [files] if isinstance(files, str) else list(files)
    roots = [roots] * len(files) if isinstance(roots, str) else list(roots)
    if len(roots) != len(files):
        raise mmi.InputError(f"finetune_args: {len(roots)} data_root for {len(files)} annt files, expected one each")
    items = [item for path, root in zip(files, roots)
             for item in llava_rounds(read_records(path), root or os.path.dirname(os.path.abspath(path)), path)]
    build = LlavaBuilder(tokenizer, DualTransform(cfg.vision.image_size, None), cfg.num_img_token,
                         max_len or cfg.seq_len, prompt)
    collate = functools.partial(collate_examples, pad_id=tokenizer.pad_id, dataset_name="llava")
    return RecordDataset(f"llava_{split}", items, build, collate, batch_size, seed, rank, world)


def read_records(path):
    """The records of a .json list or a .jsonl file; a file that is missing or not of that form is an InputError
    naming the file and where. A .jsonl line that is not JSON becomes a SkipSample("malformed_line") in its place,
    which llava_rounds passes on to be counted."""
    if not path.endswith(".jsonl"):
        return read_json_list(path, "a list of records with 'image' and 'conversations'")
    if not os.path.isfile(path):
        raise mmi.InputError(f"{path}: no such file")
    try:
        with open(path, "rb") as f:
            return [_jsonl_record(line, f"{path}:{n}") for n, line in enumerate(f, 1) if line.strip()]
    except OSError as e:
        raise mmi.InputError(f"{path}: cannot read it ({e.strerror})") from None


def read_json_list(path, expected):
    """The list a JSON file holds; a file that is missing, unreadable or not a JSON list is an InputError naming
    the file and what was `expected`."""
    if not os.path.isfile(path):
        raise mmi.InputError(f"{path}: no such file")
    try:
        with open(path, encoding="utf-8") as f:
            items = json.load(f)
    except ValueError as e:  # UnicodeDecodeError included
        raise mmi.InputError(f"{path}: not valid JSON ({e}); expected {expected}") from None
    except RecursionError:
        raise mmi.InputError(f"{path}: nested too deeply to read; expected {expected}") from None
    except OSError as e:
        raise mmi.InputError(f"{path}: cannot read it ({e.strerror})") from None
    if not isinstance(items, list):
        raise mmi.InputError(f"{path}: top level is {type(items).__name__}, expected {expected}")
    return items


def _jsonl_record(line, where):
    try:
        return json.loads(line)                  # bytes: UTF-8 checked per line
    except ValueError as e:                      # UnicodeDecodeError included
        return SkipSample("malformed_line", f"{where}: not valid JSON ({e})")
    except RecursionError:
        return SkipSample("malformed_line", f"{where}: nested too deeply to read")


def llava_rounds(records, data_root, path):
    """Records -> one item per round: {"images": paths, "question", "answer", "where"}, or {"skip": SkipSample}
    for a record or round that cannot give an example (the reader counts it when its turn comes)."""
    items = []
    for n, record in enumerate(records):
        where = f"{path}[{n}]"
        if isinstance(record, SkipSample):
            items.append({"skip": record})
            continue
        try:
            turns = record["conversations"]
            if not isinstance(turns, list) or not turns:
                raise ValueError("'conversations' must be a non-empty list")
            roles = [t["from"] for t in turns]
            values = [t["value"] for t in turns]
            if not all(isinstance(v, str) for v in values) or not set(roles) <= {"human", "gpt"}:
                raise ValueError("each turn needs 'from' 'human' or 'gpt' and a string 'value'")
            image = record.get("image")
            paths = [image] if isinstance(image, str) else list(image or [])
            if not all(isinstance(p, str) for p in paths):
                raise ValueError("'image' must be a path or a list of paths")
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            items.append({"skip": SkipSample("malformed_record", f"{where}: {e}")})
            continue
        if not paths:
            items.append({"skip": SkipSample("no_image", where)})
            continue
        for r in range(0, len(turns), 2):
            at = f"{where} round {r // 2}"
            if roles[r:r + 2] == ["human"]:
                items.append({"skip": SkipSample("no_gpt_turn", at)})
            elif roles[r:r + 2] != ["human", "gpt"]:
                items.append({"skip": SkipSample("malformed_record", f"{at}: turns {roles[r:r + 2]}, expected "
                                                                     f"['human', 'gpt']")})
            else:
                items.append({"images": [os.path.join(data_root, p) for p in paths], "question": values[r],
                              "answer": values[r + 1], "where": at})
    return items


class LlavaBuilder:
    """A round (see llava_rounds) -> Example; a class so that DataLoader workers started with "spawn" get it."""

    def __init__(self, tokenizer, transform, num_img_token, max_len, prompt):
        if "{image}" not in prompt or "{question}" not in prompt:
            raise mmi.InputError(f"finetune_args: prompt {prompt!r} needs {{image}} and {{question}}")
        self.tokenizer, self.transform, self.num_img_token = tokenizer, transform, num_img_token
        self.max_len, self.prompt = max_len, prompt

    def __call__(self, item, rng, where=None):
        if "skip" in item:
            raise item["skip"]
        images, where, placeholder = item["images"], item["where"], image_placeholder(self.num_img_token)
        parts = [_strip_special_strings(p) for p in item["question"].split("<image>")]
        marks = len(parts) - 1
        if len(images) > 1 and marks:
            if marks != len(images):
                raise SkipSample("image_marks_mismatch", f"{where}: {marks} <image> marks for {len(images)} images")
            question, slot = placeholder.join(parts), ""
        else:
            question, slot = "".join(parts), placeholder * len(images)
        question = question.strip()
        text = clean_image_spaces(self.prompt.format(image=slot, question=question))
        answer = _strip_special_strings(item["answer"]).strip()
        n_prompt = len(self.tokenizer.encode(text))
        ids = np.asarray(self.tokenizer.encode(f"{text} {answer}</s>"), dtype=np.int64)[:self.max_len]
        if n_prompt >= len(ids):
            raise SkipSample("too_long", f"{where}: the prompt alone has {n_prompt} tokens, max_len {self.max_len}")
        arrays = np.stack([self.transform(load_image(p))[0] for p in images])
        labels = ids.copy()
        labels[:n_prompt] = -100
        return Example(ids, labels, arrays)


# ---------------------------------------------------------------------------------------------------------------
# Fine-tuning data: visual storytelling and segmentation-to-image
# ---------------------------------------------------------------------------------------------------------------
# A story is a record {"id", "frames": [{"caption", "image", "strip"}]}: each frame a caption and an image file
# ("strip": the file is a vertical strip of 128x128 video frames, one of which is drawn per sample). A sample
# of a story is its text with the image placeholders the context type asks for, and its targets: the image slots
# that take the image loss (image_loss_mask) and that evaluation draws (target_image_idxs).

CONTEXT_TYPES = ("multi_modal", "image_only", "text_only", "current")
STRIP_FRAME = 128  # PororoSV / FlintstonesSV frame height in their strip files


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only: the annotation .npy / .pkl files of PororoSV and
    FlintstonesSV are pickles, and an arbitrary pickle can run code."""
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"), ("numpy", "ndarray"),
               ("numpy", "dtype"), ("copy_reg", "_reconstructor"), ("copyreg", "_reconstructor"),
               ("__builtin__", "object"), ("builtins", "object")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not a numpy array or plain container")
        return super().find_class(module, name)


def load_annotation_pickle(path, what):
    """A .npy (object arrays included) or .pkl annotation file, read without running code -> its object."""
    if not os.path.isfile(path):
        raise mmi.InputError(f"{path}: {what} not found")
    try:
        with open(path, "rb") as f:
            if not path.endswith(".npy"):
                return _NumpyOnlyUnpickler(f, encoding="latin1").load()
            version = np.lib.format.read_magic(f)
            shape, fortran, dtype = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                                     else np.lib.format.read_array_header_2_0)(f)
            if dtype.hasobject:
                return _NumpyOnlyUnpickler(f, encoding="latin1").load()
        return np.load(path, allow_pickle=False)
    except (pickle.UnpicklingError, ValueError, EOFError, OSError, AttributeError, ImportError) as e:
        raise mmi.InputError(f"{path}: {what} is not readable ({e})") from None


def annotation_json(path, what, hint=""):
    """The JSON in annotation file `path`, which holds `what`; anything wrong is one InputError naming the file
    (hint: added where the file is missing)."""
    if not os.path.isfile(path):
        raise mmi.InputError(f"{path}: {what} not found{hint}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except ValueError as e:
        raise mmi.InputError(f"{path}: {what} is not valid JSON ({e})") from None
    except RecursionError:
        raise mmi.InputError(f"{path}: {what} is nested too deeply to read") from None
    except OSError as e:
        raise mmi.InputError(f"{path}: {what} cannot be read ({e.strerror})") from None


def _field(obj, key, kind, path):
    """obj[key] of type `kind`, or an InputError naming the file and the field."""
    value = obj.get(key) if isinstance(obj, dict) else None
    if not isinstance(value, kind):
        raise mmi.InputError(f"{path}: field {key!r} missing or not {getattr(kind, '__name__', kind)}")
    return value


def story_caption(text, characters=()):
    """The captions as the original cleans them: lower-cased, each main character's name capitalised again,
    tabs and newlines dropped, stripped."""
    text = text.lower()
    for name in characters:
        text = text.replace(name.lower(), name)
    return text.replace("\n", "").replace("\t", "").strip()


def read_vist(annt_root, data_root, split, stats):
    """VIST (Visual Storytelling, SIS) as the original lays it out:

        <annt_root>/annotations/{train,val,test}_formatted_filtered.json
            {"annotations": {story_id: [{"sequence_index", "image_id", "caption"}, ...]}}
        <data_root>/images/{train,val,test}_images/<image_id>.png

    -> stories sorted by story_id, frames by sequence_index. A story with a malformed frame is skipped and
    counted in `stats`."""
    path = os.path.join(annt_root, "annotations", f"{split}_formatted_filtered.json")
    stories = _field(annotation_json(path, "VIST annotations"), "annotations", dict, path)
    out = []
    for story_id in sorted(stories):
        turns = stories[story_id]
        try:
            turns = sorted(turns, key=lambda t: t["sequence_index"])
            frames = [{"caption": _strip_special_strings(str(t["caption"])), "strip": False,
                       "image": os.path.join(data_root, "images", f"{split}_images", f"{t['image_id']}.png")}
                      for t in turns]
        except (KeyError, TypeError):
            stats["malformed_record"] += 1
            continue
        if not frames:
            stats["empty_story"] += 1
            continue
        out.append({"id": str(story_id), "frames": frames})
    return out


PORORO_CHARACTERS = ("Pororo", "Loopy", "Eddy", "Harry", "Poby", "Tongtong", "Crong", "Rody", "Petty")
FLINTSTONES_CHARACTERS = ("Fred", "Barney", "Wilma", "Betty", "Pebbles", "Dino", "Slate")


def _as_str(x):
    """A frame id of StoryGAN's pickles (bytes or str) as a str."""
    return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def read_pororo(annt_root, data_root, split, stats):
    """PororoSV (StoryGAN's files) as the original lays it out:

        <annt_root>/descriptions.npy            {global id without ".png": [caption, ...]} (the first is used)
        <annt_root>/img_cache4.npy              [N] the first frame of story N, e.g. "Pororo_ENGLISH1_1/ep1/12.png"
        <annt_root>/following_cache4.npy        [N, 4] its four following frames
        <annt_root>/train_seen_unseen_ids.npy   [train ids, val ids, test ids] (story indexes)
        <data_root>/<global id>                 a PNG strip of 128x128 frames stacked vertically

    -> five-frame stories in id order. A story whose index or description is missing is skipped and counted."""
    descriptions = load_annotation_pickle(os.path.join(annt_root, "descriptions.npy"), "Pororo descriptions")
    descriptions = descriptions.item() if isinstance(descriptions, np.ndarray) else descriptions
    firsts = load_annotation_pickle(os.path.join(annt_root, "img_cache4.npy"), "Pororo img_cache4")
    followings = load_annotation_pickle(os.path.join(annt_root, "following_cache4.npy"), "Pororo following_cache4")
    ids_path = os.path.join(annt_root, "train_seen_unseen_ids.npy")
    ids = load_annotation_pickle(ids_path, "Pororo split ids")
    if not isinstance(descriptions, dict):
        raise mmi.InputError(f"{os.path.join(annt_root, 'descriptions.npy')}: expected a dict of captions")
    if len(ids) != 3:
        raise mmi.InputError(f"{ids_path}: expected [train, val, test] id lists, got {len(ids)} entries")
    out = []
    for item in np.sort(np.asarray(ids[("train", "val", "test").index(split)]).astype(np.int64)):
        if not 0 <= item < min(len(firsts), len(followings)):
            stats["story_index_out_of_range"] += 1
            continue
        global_ids = [_as_str(firsts[item])] + [_as_str(x) for x in followings[item][:4]]
        keys = [g.replace(".png", "") for g in global_ids]
        if not all(k in descriptions and len(descriptions[k]) for k in keys):
            stats["no_description"] += 1
            continue
        out.append({"id": str(int(item)), "frames": [
            {"caption": _strip_special_strings(story_caption(str(descriptions[k][0]), PORORO_CHARACTERS)),
             "image": os.path.join(data_root, g), "strip": True} for g, k in zip(global_ids, keys)]})
    return out


def read_flintstones(annt_root, data_root, split, stats):
    """FlintstonesSV as the original lays it out:

        <annt_root>/following_cache4.pkl                 {global id: [its four following global ids]}
        <annt_root>/train-val-test_split.json            {"train": [global id, ...], "val": [...], "test": [...]}
        <annt_root>/flintstones_annotations_v1-0.json    [{"globalID", "description", ...}, ...]
        <data_root>/video_frames_sampled_png/<global id>.png   a strip of 128x128 frames stacked vertically

    -> five-frame stories in split order. A story without four followings or a description is skipped and
    counted."""
    followings = load_annotation_pickle(os.path.join(annt_root, "following_cache4.pkl"), "Flintstones followings")
    split_path = os.path.join(annt_root, "train-val-test_split.json")
    ids = _field(annotation_json(split_path, "Flintstones split"), split, list, split_path)
    for n, gid in enumerate(ids):
        if not isinstance(gid, str):
            raise mmi.InputError(f"{split_path}: {split}[{n}] is {gid!r}, expected a global id (a string)")
    ann_path = os.path.join(annt_root, "flintstones_annotations_v1-0.json")
    anns = annotation_json(ann_path, "Flintstones annotations")
    if not isinstance(followings, dict):
        raise mmi.InputError(f"{os.path.join(annt_root, 'following_cache4.pkl')}: expected a dict of followings")
    if not isinstance(anns, list):
        raise mmi.InputError(f"{ann_path}: expected a list of annotations")
    descriptions = {}
    for n, a in enumerate(anns):
        descriptions[_field(a, "globalID", str, f"{ann_path}[{n}]")] = _field(a, "description", str, f"{ann_path}[{n}]")
    out = []
    for gid in ids:
        nxt = followings.get(gid)
        if not isinstance(nxt, (list, tuple)) or len(nxt) != 4:
            stats["not_four_followings"] += 1
            continue
        global_ids = [gid] + list(nxt)
        if not all(g in descriptions for g in global_ids):
            stats["no_description"] += 1
            continue
        out.append({"id": str(gid), "frames": [
            {"caption": _strip_special_strings(story_caption(descriptions[g], FLINTSTONES_CHARACTERS)),
             "image": os.path.join(data_root, "video_frames_sampled_png", f"{g}.png"), "strip": True}
            for g in global_ids]})
    return out


def story_rounds(stories, round_range):
    """round_range "last": each story as it is (its last frame the target); "all": one story per prefix
    frames[:k], k = 1 .. n-1, as the original's evaluation builds them (id "<story>_<k>")."""
    if round_range not in ("last", "all"):
        raise mmi.InputError(f"round_range={round_range!r}, expected 'last' or 'all'")
    if round_range == "last":
        return list(stories)
    return [{"id": f"{s['id']}_{k}", "frames": s["frames"][:k]} for s in stories for k in range(1, len(s["frames"]))]


def story_text(captions, context_type, placeholder, image_first=None):
    """The text of a story whose last frame is the target, as the original writes it (then stripped):
    the history per context type ("multi_modal": "caption<image> " per frame, or "<image>caption " where
    image_first; "image_only": "<image>" per frame; "text_only": "caption " per frame; "current": nothing), then the
    target: its caption (not for "image_only") and its image. -> (text, the frame index of each image slot)."""
    if context_type not in CONTEXT_TYPES:
        raise mmi.InputError(f"context_type={context_type!r}, expected one of {CONTEXT_TYPES}")
    image_first = image_first or [False] * len(captions)
    text, slots = "", []
    for k, caption in enumerate(captions[:-1]):
        if context_type == "multi_modal":
            text += (placeholder + caption if image_first[k] else caption + placeholder) + " "
            slots.append(k)
        elif context_type == "image_only":
            text += placeholder
            slots.append(k)
        elif context_type == "text_only":
            text += caption + " "
    text += ("" if context_type == "image_only" else captions[-1]) + placeholder
    return text.strip(), slots + [len(captions) - 1]


def target_frames(num_frames, target_image_idxs, slots, where):
    """The frames that are targets: the given indexes (negative from the end), each of which must have an image
    slot in the text. None = the last frame."""
    if target_image_idxs is None:
        return [num_frames - 1]
    frames = sorted({int(t) % num_frames for t in target_image_idxs})
    if not all(-num_frames <= int(t) < num_frames for t in target_image_idxs) or not set(frames) <= set(slots):
        raise mmi.InputError(f"{where}: target_image_idxs {list(target_image_idxs)} are not image slots of a "
                             f"{num_frames}-frame sample (slots {slots})")
    return frames


def story_frame(frame, rng, frame_idx=None):
    """A frame's PIL image; a strip gives its `frame_idx`-th 128-row frame (drawn with `rng` if None).
    -> (image, frame index or None)."""
    image = load_image(frame["image"])
    if not frame["strip"]:
        return image, None
    count = image.height // STRIP_FRAME
    if count < 1:
        raise SkipSample("image_not_a_frame_strip", f"{frame['image']}: {image.width}x{image.height}, expected "
                                                    f"frames of {STRIP_FRAME} rows stacked vertically")
    frame_idx = rng.randint(0, count - 1) if frame_idx is None else frame_idx
    return image.crop((0, frame_idx * STRIP_FRAME, image.width, (frame_idx + 1) * STRIP_FRAME)), frame_idx


@dataclass
class TargetSample(Sample):
    """A fine-tuning sample: one row of its own, with the image slots that take the image loss."""
    image_targets: np.ndarray = None  # (n,) bool


def build_story_sample(story, tokenizer, transform, rng, context_type="multi_modal", target_image_idxs=None,
                       num_img_token=64, img_first_prob=0.0, all_targets=False, where=""):
    """A story -> TargetSample: story_text's text (no eos, as the original) and the images of its slots;
    targets are `target_image_idxs` (frames), or every slot with all_targets (the original's training: each image
    drawn from all before it), else the last frame. Strip frames are drawn with `rng`, recorded in image_info."""
    captions = [f["caption"] for f in story["frames"]]
    first = [rng.random() < img_first_prob for _ in captions]
    text, slots = story_text(captions, context_type, image_placeholder(num_img_token), first)
    targets = slots if all_targets else target_frames(len(captions), target_image_idxs, slots, where)
    ids = tokenize_with_images(text, tokenizer, len(slots), num_img_token, where)
    enc, dec, info = [], [], []
    for k in slots:
        image, frame_idx = story_frame(story["frames"][k], rng)
        e, d = transform(image)
        enc.append(e)
        dec.append(d)
        info.append({"story": story["id"], "frame": k, "image": story["frames"][k]["image"], "strip_frame": frame_idx})
    return TargetSample(ids, np.stack(enc), _stack(dec), info, image_targets=np.array([k in targets for k in slots]))


# ADE20K's 150 classes, coloured as the original prepares its maps: class c (1..150) gets the (c-1)-th point of
# a 6x6x6 grid of channel values 255, 213, ..., 45 (R slowest); "other" (0) stays black.
ADE20K_NUM_CLASSES = 150


def ade20k_colours():
    """(151, 3) uint8: the colour of every label 0..150 in the prepared segmentation maps."""
    steps = int(ADE20K_NUM_CLASSES ** (1 / 3)) + 1
    gap = 256 // steps
    loc = np.arange(ADE20K_NUM_CLASSES)
    rgb = np.stack([255 - (loc // steps ** 2) * gap, 255 - (loc % steps ** 2 // steps) * gap,
                    255 - (loc % steps) * gap], 1)
    return np.concatenate([np.zeros((1, 3), np.int64), rgb]).astype(np.uint8)


def colour_segmentation(labels):
    """(H, W) class labels (0 = other, 1..150; larger values count as other) -> (H, W, 3) uint8 colour map."""
    labels = np.asarray(labels).astype(np.int64)
    return ade20k_colours()[np.where((labels >= 0) & (labels <= ADE20K_NUM_CLASSES), labels, 0)]


def read_ade20k(annt_root, data_root, split, stats):
    """ADE20K (SceneParsing, ADEChallengeData2016) with the original's captions:

        <annt_root>/{training,validation}.json                     [{"image_id", "caption"}, ...]
        <data_root>/images/{training,validation}/<image_id>.jpg     the photos
        <data_root>/annotations/{training,validation}/<image_id>.png  class labels 0..150
        <data_root>/annotations_with_color/{training,validation}/<image_id>.png  the colour maps (optional here:
                                                                      made from the labels when missing)

    -> records {"id", "caption", "image", "map", "labels"}. A record without image_id or caption is skipped and
    counted."""
    path = os.path.join(annt_root, f"{split}.json")
    items = annotation_json(path, "ADE20K captions")
    if not isinstance(items, list):
        raise mmi.InputError(f"{path}: expected a list of {{'image_id', 'caption'}} records")
    out = []
    for n, it in enumerate(items):
        if not isinstance(it, dict) or not isinstance(it.get("caption"), str) or "image_id" not in it:
            stats["malformed_record"] += 1
            continue
        name = str(it["image_id"])
        out.append({"id": n, "caption": _strip_special_strings(it["caption"]),
                    "image": os.path.join(data_root, "images", split, f"{name}.jpg"),
                    "map": os.path.join(data_root, "annotations_with_color", split, f"{name}.png"),
                    "labels": os.path.join(data_root, "annotations", split, f"{name}.png")})
    return out


def load_segmentation_map(record):
    """The colour map of an ADE20K record: the prepared file, else coloured from the label file."""
    if os.path.exists(record["map"]):
        return load_image(record["map"])
    try:
        with Image.open(record["labels"]) as im:
            return Image.fromarray(colour_segmentation(np.asarray(im)))
    except FileNotFoundError:
        raise SkipSample("image_missing", f"{record['map']} (nor {record['labels']})") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise SkipSample("image_unreadable", f"{record['labels']}: {e}") from None


def ade20k_text(caption, placeholder, text_first=False):
    """The original's segmentation-to-image text: "<map>caption.<photo>", or "caption.<map><photo>"."""
    return f"{caption}.{placeholder}{placeholder}" if text_first else f"{placeholder}{caption}.{placeholder}"


def build_ade20k_sample(record, tokenizer, transform, rng, num_img_token=64, text_first=False, flip_prob=0.0,
                        where=""):
    """An ADE20K record -> TargetSample: slot 0 the colour map, slot 1 the photo, the target. Both slots' decoder
    images are the photo (as the original pairs them); the map's slot takes no image loss. With flip_prob the map
    and the photo are mirrored left-right together (every copy, so the map stays aligned with the target)."""
    seg, photo = load_segmentation_map(record), load_image(record["image"])
    if rng.random() < flip_prob:
        seg, photo = seg.transpose(Image.FLIP_LEFT_RIGHT), photo.transpose(Image.FLIP_LEFT_RIGHT)
    seg_enc, _ = transform(seg)
    photo_enc, photo_dec = transform(photo)
    text = ade20k_text(record["caption"], image_placeholder(num_img_token), text_first)
    ids = tokenize_with_images(text, tokenizer, 2, num_img_token, where)
    info = [{"record": record["id"], "image": record["map"]}, {"record": record["id"], "image": record["image"]}]
    return TargetSample(ids, np.stack([seg_enc, photo_enc]), _stack([photo_dec, photo_dec]), info,
                        image_targets=np.array([False, True]))


def collate_targets(samples, pad_id, dataset_name, loss_txt_weight=None, loss_img_weight=None):
    """TargetSamples -> the model's batch dict, one sample per row (right padding): image_loss_mask on the
    targets only, target_image_idxs their flat indexes (what generation draws)."""
    rows = [Row(s.text_ids, s.images, s.images_dec, s.image_info, np.zeros(len(s.images), np.int64), [s.key])
            for s in samples]
    batch = collate_rows(rows, pad_id, dataset_name, loss_img_weight, loss_txt_weight)
    targets = np.concatenate([s.image_targets for s in samples])
    batch["image_loss_mask"] = torch.from_numpy(targets.astype(np.float32))  # (B_I,)
    batch["target_image_idxs"] = torch.from_numpy(np.flatnonzero(targets))
    return batch


class RecordDataset(torch.utils.data.IterableDataset):
    """A fine-tuning set held in memory as a list of records (read up front) -> batches of `batch_size` samples.
    Each epoch deals the records, shuffled by (seed, epoch) unless shuffle=False, round-robin to the rank x worker
    readers; a reader builds its records in turn (`build(record, rng=, where=)` -> a sample, or SkipSample: counted by
    reason and passed over) and collates `batch_size` of them (`collate(samples)` -> the batch dict); an epoch's last
    batch may be smaller. Resumable as MixedDataset: every batch carries meta["position"] = {"reader", "state":
    {"epoch", "next": the reader's next record}}. After a pass, `last_stats` holds its counts; a pass from the start
    that uses no record is an InputError naming the reasons."""

    def __init__(self, name, records, build, collate, batch_size=4, seed=0, rank=None, world_size=None, shuffle=True,
                 read_stats=None, verbose=True):
        if batch_size < 1:
            raise mmi.InputError(f"{name}: batch_size {batch_size}, expected 1 or more")
        self.name, self.records, self.build, self.collate = name, records, build, collate
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.shuffle, self.verbose = shuffle, verbose
        self.read_stats = Counter({f"record:{k}": v for k, v in (read_stats or {}).items()})  # skipped when read
        self.epoch, self.resume, self.first_worker, self.last_stats = 0, {}, 0, Counter()

    set_epoch = MixedDataset.set_epoch
    load_state_dict = MixedDataset.load_state_dict
    record_position = staticmethod(MixedDataset.record_position)

    def __iter__(self):
        reader = current_reader(self.rank, self.world_size, self.first_worker)
        index, num_readers = reader.rank * reader.num_workers + reader.worker, reader.world_size * reader.num_workers
        order = list(range(len(self.records)))
        if self.shuffle:
            random.Random(f"records/{self.seed}/{self.epoch}").shuffle(order)
        mine = order[index::num_readers]
        start = self.resume.get(index)
        first = start["next"] if start is not None and start["epoch"] == self.epoch else 0
        samples = []

        def batch(next_record):
            out = self.collate(samples)
            reader.stats["rows"] += len(samples)
            out["meta"]["position"] = {"reader": index, "state": {"epoch": self.epoch, "next": next_record}}
            out["meta"]["stats"] = dict(reader.stats)
            return out

        for n in range(first, len(mine)):
            reader.stats["lines"] += 1
            try:
                sample = self.build(self.records[mine[n]], rng=sample_rng(self.seed, (self.epoch, mine[n])),
                                    where=f"{self.name}[{mine[n]}]")
            except SkipSample as e:
                reader.stats[f"doc:{e.reason}"] += 1
                continue
            reader.stats["docs_used"] += 1
            samples.append(sample)
            if len(samples) == self.batch_size:
                yield batch(n + 1)
                samples = []
        if samples:
            yield batch(len(mine))
        self.last_stats = Counter(reader.stats)
        line = format_stats(self.name, reader.stats + self.read_stats,
                            f"epoch {self.epoch} rank {reader.rank} worker {reader.worker}")
        if first == 0 and not reader.stats["docs_used"] and (mine or reader.num_workers == 1):
            raise mmi.InputError(line + "; no usable record")
        if self.verbose:
            print(line, flush=True)


STORY_READERS = {"vist": read_vist, "pororo": read_pororo, "flintstones": read_flintstones}


def story_dataset(name, tokenizer, cfg, split, rank, world, seed, annt_root, data_root, batch_size=4,
                  context_type="multi_modal", round_range="last", target_image_idxs=None, img_first_prob=0.0,
                  loss_txt_weight=0.0, loss_img_weight=None):
    """A storytelling set (vist / pororo / flintstones) as a RecordDataset. In training with the default
    multi_modal / last and no target_image_idxs, every image is a target, as the original trains; otherwise the
    targets are target_image_idxs (default: the last frame). The text takes no loss unless loss_txt_weight says."""
    stats = Counter()
    stories = story_rounds(STORY_READERS[name](annt_root, data_root, split, stats), round_range)
    all_targets = split == "train" and context_type == "multi_modal" and target_image_idxs is None
    build = functools.partial(build_story_sample, tokenizer=tokenizer,
                              transform=DualTransform(cfg.vision.image_size, cfg.image_decoder.image_size),
                              context_type=context_type, target_image_idxs=target_image_idxs,
                              num_img_token=cfg.num_img_token, img_first_prob=img_first_prob, all_targets=all_targets)
    collate = functools.partial(collate_targets, pad_id=tokenizer.pad_id, dataset_name=name,
                                loss_txt_weight=loss_txt_weight, loss_img_weight=loss_img_weight)
    return RecordDataset(name, stories, build, collate, batch_size, seed, rank, world, split == "train", stats)


def ade20k_dataset(tokenizer, cfg, split, rank, world, seed, annt_root, data_root, batch_size=4, text_first=False,
                   flip_prob=None, loss_txt_weight=0.0, loss_img_weight=None):
    """ADE20K segmentation-to-image as a RecordDataset (split train -> "training", else "validation"); training
    mirrors half the pairs (flip_prob 0.5) unless told otherwise."""
    stats = Counter()
    phase = "training" if split == "train" else "validation"
    records = read_ade20k(annt_root, data_root, phase, stats)
    build = functools.partial(build_ade20k_sample, tokenizer=tokenizer,
                              transform=DualTransform(cfg.vision.image_size, cfg.image_decoder.image_size),
                              num_img_token=cfg.num_img_token, text_first=text_first,
                              flip_prob=(0.5 if split == "train" else 0.0) if flip_prob is None else flip_prob)
    collate = functools.partial(collate_targets, pad_id=tokenizer.pad_id, dataset_name="ade20k",
                                loss_txt_weight=loss_txt_weight, loss_img_weight=loss_img_weight)
    return RecordDataset("ade20k", records, build, collate, batch_size, seed, rank, world, split == "train", stats)


# ---------------------------------------------------------------------------------------------------------------
# Inference input: annt.json
# ---------------------------------------------------------------------------------------------------------------

def load_inference_annotations(path, tokenizer, transform=None, num_img_token=64, num_total_token=2048, stats=None):
    """annt.json (a list of samples with sentences / images / sentence_ixs / image_first / generate_mode...)
    -> one batch dict per usable sample (B = 1), as the original's `load_annt_data`: placeholders placed per
    image, sentences joined by spaces, no eos, truncated at num_total_token, images at the encoder size.
    Broken samples are skipped and counted in `stats`; a summary line is printed."""
    transform = transform or DualTransform(224, None)
    stats = Counter() if stats is None else stats
    infos = read_annt(path)
    base = os.path.dirname(os.path.abspath(path))
    out = []
    for n, info in enumerate(infos):
        where = f"{path}[{n}]"
        try:
            out.append(inference_sample(info, tokenizer, transform, num_img_token, num_total_token, base, where))
        except SkipSample as e:
            stats[e.reason] += 1
    print(f"[data] {path}: {len(out)} of {len(infos)} samples usable; skipped: "
          + (", ".join(f"{k}={v}" for k, v in sorted(stats.items())) or "none"), flush=True)
    return out


def read_annt(path):
    """The list of samples in an annt.json; a file that is missing, unreadable or not a JSON list is an InputError."""
    return read_json_list(path, "a list of samples")


def inference_sample(info, tokenizer, transform, num_img_token, num_total_token, base, where):
    """One annt.json sample -> its batch dict (B = 1); a sample it cannot use raises SkipSample."""
    try:
        sentences, paths = list(info["sentences"]), list(info["images"])
        sentence_ixs, image_first = list(info["sentence_ixs"]), list(info["image_first"])
        if not all(isinstance(x, str) for x in sentences + paths):
            raise ValueError("sentences and images must be strings")
        sentences = [_strip_special_strings(x) for x in sentences]
        if not paths or len(paths) != len(sentence_ixs) or len(paths) != len(image_first):
            raise ValueError("images, sentence_ixs and image_first must be non-empty and of equal length")
        if not all(0 <= int(ix) < len(sentences) for ix in sentence_ixs):
            raise ValueError(f"sentence_ixs {sentence_ixs} outside {len(sentences)} sentences")
    except (KeyError, TypeError, ValueError) as e:
        raise SkipSample("malformed_sample", f"{where}: {e}") from None
    images = []
    for p in paths:
        img = load_image(p if os.path.isabs(p) or os.path.exists(p) else os.path.join(base, p))
        images.append(transform(img)[0])
    text, order = place_images(sentences, [int(i) for i in sentence_ixs], [bool(f) for f in image_first],
                               image_placeholder(num_img_token))
    images = [images[k] for k in order]
    ids = np.asarray(tokenizer.encode(clean_image_spaces(text)), dtype=np.int64)
    # truncation at num_total_token drops the images whose placeholder does not fit whole
    soi = np.flatnonzero(ids == tokenizer.soi_id)
    n = int((soi + num_img_token < num_total_token).sum())
    if n == 0:
        end = int(soi[0]) + num_img_token + 1
        raise SkipSample("image_beyond_budget", f"{where}: {len(ids)} tokens; the first image's placeholder ends "
                                                f"at token {end}, beyond num_total_token={num_total_token}")
    ids = ids[:num_total_token if n == len(soi) else min(num_total_token, int(soi[n]))]
    return {
        "text_ids": torch.from_numpy(ids)[None],  # (1, l)
        "attention_mask": torch.ones((1, len(ids)), dtype=torch.long),
        "image_tensors": to_float01(np.stack(images[:n])),  # (n, 3, 224, 224)
        "num_image_per_seq": torch.tensor([n]),
        "nearest_bos_idxs": torch.from_numpy(nearest_bos_idxs(ids, tokenizer.bos_id, tokenizer.soi_id)),
        "ignore_prompt_token_offset": 0,
        "target_image_idxs": torch.tensor([n - 1]),
        "meta": {"dataset_name": "inference", **info},
    }


# ---------------------------------------------------------------------------------------------------------------
# Demo corpus: "shape stories"
# ---------------------------------------------------------------------------------------------------------------
# A scene is 1-3 objects on a 3x3 grid, at most one per cell and no two with the same (colour, shape), so a
# sentence can name an object by colour and shape alone. A story is an opening description plus 1-3 edits,
# each followed by the image of the scene it produces.

SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 220),
           "yellow": (235, 200, 30), "purple": (140, 60, 180), "orange": (245, 130, 20)}
CELL_NAMES = (("top left", "top middle", "top right"), ("middle left", "centre", "middle right"),
              ("bottom left", "bottom middle", "bottom right"))
BACKGROUND = (255, 255, 255)
DEMO_IMAGE_SIZE = 64
SPLIT_SEED_BASE = {"train": 0, "val": 1_000_000_000, "test": 2_000_000_000}  # disjoint story-seed ranges
SPLIT_SIZE = {"train": 1_000_000_000, "val": 10_000, "test": 10_000}

_NAME_TO_CELL = {name: (r, c) for r, names in enumerate(CELL_NAMES) for c, name in enumerate(names)}
_C, _S, _P = "|".join(COLOURS), "|".join(SHAPES), "|".join(sorted(_NAME_TO_CELL, key=len, reverse=True))
_OBJECT_RE = re.compile(rf"\ban? ({_C}) ({_S}) at the ({_P})\b")
_EDIT_RES = {
    "recolour": re.compile(rf"^the ({_C}) ({_S}) turns ({_C})\.$"),
    "move": re.compile(rf"^the ({_C}) ({_S}) moves to the ({_P})\.$"),
    "appear": re.compile(rf"^an? ({_C}) ({_S}) appears at the ({_P})\.$"),
    "disappear": re.compile(rf"^the ({_C}) ({_S}) disappears\.$"),
}


@dataclass(frozen=True, order=True)
class Obj:
    row: int
    col: int
    shape: str
    colour: str

    def as_dict(self):
        return {"shape": self.shape, "colour": self.colour, "cell": [self.row, self.col]}


def canonical(scene):
    """Scenes are tuples of objects sorted by cell (row-major): one text per scene, easy comparisons."""
    return tuple(sorted(scene))


def _article(word):
    return "an" if word[0] in "aeiou" else "a"


def describe_scene(scene):
    """'a red circle at the top left, a blue square at the centre and a green triangle at the bottom right.'"""
    phrases = [f"{_article(o.colour)} {o.colour} {o.shape} at the {CELL_NAMES[o.row][o.col]}" for o in canonical(scene)]
    text = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    return text + "."


def parse_scene(text):
    """Inverse of describe_scene, tolerant of surrounding text: every 'a <colour> <shape> at the <cell>' phrase
    becomes an object. Returns a canonical scene, or None if the phrases do not form a valid scene."""
    objs = [Obj(*_NAME_TO_CELL[cell], shape, colour) for colour, shape, cell in _OBJECT_RE.findall(text.lower())]
    scene = canonical(objs)
    return scene if scene and is_valid_scene(scene) else None


def is_valid_scene(scene):
    cells = [(o.row, o.col) for o in scene]
    kinds = [(o.colour, o.shape) for o in scene]
    return 1 <= len(scene) <= 3 and len(set(cells)) == len(cells) and len(set(kinds)) == len(kinds)


def describe_edit(edit):
    kind, o = edit["kind"], edit["obj"]
    if kind == "recolour":
        return f"the {o.colour} {o.shape} turns {edit['colour']}."
    if kind == "move":
        return f"the {o.colour} {o.shape} moves to the {CELL_NAMES[edit['cell'][0]][edit['cell'][1]]}."
    if kind == "appear":
        return f"{_article(o.colour)} {o.colour} {o.shape} appears at the {CELL_NAMES[o.row][o.col]}."
    return f"the {o.colour} {o.shape} disappears."


def parse_edit(text, scene):
    """An edit sentence read against the scene it applies to -> edit dict, or None if it does not parse
    or does not apply (unknown object, occupied cell, duplicate...)."""
    text = text.strip().lower()
    for kind, pattern in _EDIT_RES.items():
        m = pattern.match(text)
        if m is None:
            continue
        colour, shape = m.group(1), m.group(2)
        if kind == "appear":
            edit = {"kind": kind, "obj": Obj(*_NAME_TO_CELL[m.group(3)], shape, colour)}
        else:
            found = [o for o in scene if (o.colour, o.shape) == (colour, shape)]
            if not found:
                return None
            edit = {"kind": kind, "obj": found[0]}
            if kind == "recolour":
                edit["colour"] = m.group(3)
            elif kind == "move":
                edit["cell"] = _NAME_TO_CELL[m.group(3)]
        new = apply_edit(scene, edit)
        return edit if is_valid_scene(new) and new != canonical(scene) else None
    return None


def apply_edit(scene, edit):
    o, rest = edit["obj"], [x for x in scene if x != edit["obj"]]
    if edit["kind"] == "recolour":
        rest.append(Obj(o.row, o.col, o.shape, edit["colour"]))
    elif edit["kind"] == "move":
        rest.append(Obj(*edit["cell"], o.shape, o.colour))
    elif edit["kind"] == "appear":
        rest = list(scene) + [o]
    return canonical(rest)


def random_scene(rng, num_objects):
    cells = rng.sample(range(9), num_objects)
    kinds = rng.sample([(c, s) for c in COLOURS for s in SHAPES], num_objects)
    return canonical(Obj(cell // 3, cell % 3, s, c) for cell, (c, s) in zip(cells, kinds))


def random_edit(rng, scene):
    """One edit that keeps the scene valid: recolour, move, appear (if < 3 objects), disappear (if > 1)."""
    kinds = ["recolour", "move"] + (["appear"] if len(scene) < 3 else []) + (["disappear"] if len(scene) > 1 else [])
    kind = rng.choice(kinds)
    free = [(r, c) for r in range(3) for c in range(3) if all((o.row, o.col) != (r, c) for o in scene)]
    used = {(o.colour, o.shape) for o in scene}
    if kind == "appear":
        colour, shape = rng.choice([(c, s) for c in COLOURS for s in SHAPES if (c, s) not in used])
        return {"kind": kind, "obj": Obj(*rng.choice(free), shape, colour)}
    obj = rng.choice(scene)
    if kind == "recolour":
        return {"kind": kind, "obj": obj,
                "colour": rng.choice([c for c in COLOURS if c != obj.colour and (c, obj.shape) not in used])}
    if kind == "move":
        return {"kind": kind, "obj": obj, "cell": rng.choice(free)}
    return {"kind": kind, "obj": obj}


@dataclass
class Story:
    seed: int
    texts: list  # per step: the opening description, then one edit sentence per step
    scenes: list  # per step: the scene after that step (canonical tuples of Obj)
    edits: list  # per step after the first: the edit dict


def make_story(seed, num_steps=None):
    """A story from its seed alone: 2-4 steps, the first describing a random scene of 1-3 objects."""
    rng = random.Random(f"story/{seed}")
    num_steps = num_steps or rng.randint(2, 4)
    scene = random_scene(rng, rng.randint(1, 3))
    story = Story(seed, [describe_scene(scene)], [scene], [])
    for _ in range(num_steps - 1):
        edit = random_edit(rng, scene)
        scene = apply_edit(scene, edit)
        story.texts.append(describe_edit(edit))
        story.scenes.append(scene)
        story.edits.append(edit)
    return story


def names_by_colour(story):
    """Whether an edit of the story names an object whose shape another object of the scene shares, so that only
    its colour tells which one is meant ("the purple circle disappears" beside a green circle)."""
    return any(e["kind"] != "appear" and any(o.shape == e["obj"].shape and o != e["obj"] for o in scene)
               for e, scene in zip(story.edits, story.scenes))


@functools.lru_cache(maxsize=None)
def _cell_bounds(size):
    edges = [round(i * size / 3) for i in range(4)]
    return tuple((edges[i], edges[i + 1]) for i in range(3))


_COLOUR_ARRAYS = {name: np.array(rgb, dtype=np.uint8) for name, rgb in COLOURS.items()}


@functools.lru_cache(maxsize=None)
def _shape_mask(shape, h, w):
    """Boolean (h, w) mask of a shape centred in an h x w cell, 70% of the cell wide."""
    y, x = np.mgrid[0:h, 0:w] + 0.5  # pixel centres
    cy, cx, r = h / 2, w / 2, 0.35 * min(h, w)
    if shape == "circle":
        return (y - cy) ** 2 + (x - cx) ** 2 <= r * r
    if shape == "square":
        return (np.abs(y - cy) <= r) & (np.abs(x - cx) <= r)
    # triangle, apex up: half-width grows linearly from 0 at the top to r at the base
    return (y >= cy - r) & (y <= cy + r) & (np.abs(x - cx) <= (y - (cy - r)) / 2)


def render_scene(scene, size=DEMO_IMAGE_SIZE):
    """Scene -> (size, size, 3) uint8, white background, exact (no anti-aliasing) so images can be read back."""
    img = np.full((size, size, 3), BACKGROUND, dtype=np.uint8)
    bounds = _cell_bounds(size)
    for o in scene:
        (y0, y1), (x0, x1) = bounds[o.row], bounds[o.col]
        mask = _shape_mask(o.shape, y1 - y0, x1 - x0)
        np.copyto(img[y0:y1, x0:x1], _COLOUR_ARRAYS[o.colour], where=mask[..., None])
    return img


def read_scene(image):
    """Read a scene back from a rendered (or generated) image (H, W, 3) uint8 or (3, H, W) float in [0, 1]:
    per cell, non-background pixels vote for the nearest palette colour; the filled fraction of their bounding
    box tells the shape (square ~1, circle ~0.79, triangle ~0.5). Returns a canonical scene (maybe invalid)."""
    img = np.asarray(image)
    if img.dtype != np.uint8:
        img = np.clip(np.asarray(img, dtype=np.float32) * 255.0 + 0.5, 0, 255).astype(np.uint8).transpose(1, 2, 0)
    size = img.shape[0]
    palette = np.array(list(COLOURS.values()), dtype=np.float32)
    names = list(COLOURS)
    objs = []
    for r, (y0, y1) in enumerate(_cell_bounds(size)):
        for c, (x0, x1) in enumerate(_cell_bounds(size)):
            cell = img[y0:y1, x0:x1].astype(np.float32)
            fg = np.abs(cell - np.array(BACKGROUND, dtype=np.float32)).sum(-1) > 96
            if fg.sum() < 0.05 * fg.size:
                continue
            dist = ((cell[fg][:, None, :] - palette[None]) ** 2).sum(-1)  # (n_fg, n_colours)
            colour = names[int(np.bincount(dist.argmin(1), minlength=len(names)).argmax())]
            ys, xs = np.nonzero(fg)
            fill = fg.sum() / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
            shape = "square" if fill > 0.9 else ("circle" if fill > 0.65 else "triangle")
            objs.append(Obj(r, c, shape, colour))
    return canonical(objs)


def story_sample(story, tokenizer, rng, num_img_token=64, transform=None, image_size=DEMO_IMAGE_SIZE,
                 img_first_prob=0.5):
    """A story as one interleaved document: the opening description with its image before (p=img_first_prob,
    the captioning direction) or after it, then each edit sentence followed by its image; "</s>" at the end.
    Without a transform the 64x64 renders serve both encoder and decoder (one array, no resampling)."""
    placeholder = image_placeholder(num_img_token)
    first = placeholder + story.texts[0] if rng.random() < img_first_prob else story.texts[0] + placeholder
    text = clean_image_spaces(" ".join([first] + [t + placeholder for t in story.texts[1:]])) + "</s>"
    ids = tokenize_with_images(text, tokenizer, len(story.scenes), num_img_token, f"story {story.seed}")
    arrays = [render_scene(s, image_size) for s in story.scenes]
    if transform is None:
        enc = np.stack([a.transpose(2, 0, 1) for a in arrays])  # (n, 64, 64, 3) -> (n, 3, 64, 64)
        dec = enc
    else:
        pairs = [transform(Image.fromarray(a)) for a in arrays]
        enc, dec = np.stack([p[0] for p in pairs]), _stack([p[1] for p in pairs])
    info = [{"story": story.seed, "step": i, "scene": [o.as_dict() for o in s]} for i, s in enumerate(story.scenes)]
    return Sample(ids, enc, dec, info)


class StorySource:
    """Shape stories of one split as a source: story i of the split goes to reader i mod num_readers.
    A pass covers `num_stories` stories (default: the whole split). pairs: each story's opening alone, its
    description then its image: an image-text pair for drawing from text (like the paper's LAION pairs beside
    MMC4; in a story only an opening told before its image is one). keep_by_shape < 1: of the stories whose edits
    all name their object by its shape alone (not names_by_colour), only that share is used, the same ones every
    pass; the others are counted as skipped, reason "story:by_shape_alone"."""

    def __init__(self, tokenizer, split="train", num_stories=None, num_img_token=64, transform=None,
                 image_size=DEMO_IMAGE_SIZE, seed=0, name=None, pairs=False, keep_by_shape=1.0):
        if split not in SPLIT_SEED_BASE:
            raise ValueError(f"split {split!r}, expected one of {list(SPLIT_SEED_BASE)}")
        if not 0.0 <= keep_by_shape <= 1.0:
            raise ValueError(f"keep_by_shape={keep_by_shape}: expected a share, 0 <= keep_by_shape <= 1")
        self.tokenizer, self.split, self.seed, self.pairs = tokenizer, split, seed, pairs
        self.keep_by_shape = keep_by_shape
        self.num_stories = min(num_stories or SPLIT_SIZE[split], SPLIT_SIZE[split])
        self.num_img_token, self.transform, self.image_size = num_img_token, transform, image_size
        self.name = name or f"shape_{'pairs' if pairs else 'stories'}_{split}"

    def samples(self, reader, epoch, pass_idx, start_slot=0, start_line=0):
        num_readers = reader.world_size * reader.num_workers
        g = reader.rank * reader.num_workers + reader.worker
        for i in range(max(start_line, 0), math.ceil(self.num_stories / num_readers)):
            index = i * num_readers + g
            if index >= self.num_stories:
                break
            key = (epoch, pass_idx, 0, i)
            reader.stats["lines"] += 1
            seed = SPLIT_SEED_BASE[self.split] + index
            if not self.kept(seed):
                reader.stats["story:by_shape_alone"] += 1
                continue
            sample = self.make(seed, sample_rng(self.seed, (epoch, pass_idx, seed)))
            sample.key = key
            reader.stats["docs_used"] += 1
            yield sample

    def kept(self, seed):
        """Whether story `seed` is used: with probability keep_by_shape, decided by the seed alone, and always where
        an edit needs the colour (the draw comes first: it is cheaper than making the story)."""
        return (self.keep_by_shape == 1.0 or random.Random(f"keep/{seed}").random() < self.keep_by_shape
                or names_by_colour(make_story(seed)))

    def make(self, seed, rng):
        """The Sample of the split's item `seed`."""
        story = make_story(seed)
        if self.pairs:
            story = Story(story.seed, story.texts[:1], story.scenes[:1], [])
        return story_sample(story, self.tokenizer, rng, self.num_img_token, self.transform, self.image_size,
                            img_first_prob=0.0 if self.pairs else 0.5)

    def next_key(self, key):
        return (key[0], key[1], 0, key[3] + 1)


def demo_dataset(tokenizer, split="train", num_total_token=512, num_img_token=16, batch_size=8, max_num_images=15,
                 num_stories=None, seed=0, image_size=DEMO_IMAGE_SIZE, transform=None, rank=None, world_size=None,
                 pairs=0.0, keep_by_shape=1.0):
    """The demo training stream: shape stories packed into rows like MMC4, as a MixedDataset (one epoch = one pass
    over `num_stories`); pairs > 0: that share of the batches are rows of the stories' openings as image-text pairs
    (StorySource(pairs=True)); keep_by_shape: see StorySource. Use with DataLoader(batch_size=None, num_workers=...)."""
    if not 0.0 <= pairs < 1.0:
        raise ValueError(f"pairs={pairs}: expected a share of the batches, 0 <= pairs < 1")
    kinds, probs = ([False, True], [1.0 - pairs, pairs]) if pairs > 0 else ([False], [1.0])
    sources = [StorySource(tokenizer, split, num_stories, num_img_token, transform, image_size, seed, pairs=p,
                           keep_by_shape=1.0 if p else keep_by_shape) for p in kinds]
    cfg = PackConfig(num_total_token, num_img_token, max_num_images, "sample", batch_size)
    return MixedDataset(sources, probs, [cfg] * len(sources), tokenizer, seed=seed, rank=rank, world_size=world_size)


def _check_in_split(split, start, count, what):
    if start + count > SPLIT_SIZE[split]:
        raise mmi.InputError(f"{what} {start}..{start + count - 1} of the demo's {split} split, which holds "
                             f"{SPLIT_SIZE[split]:,}: expected start + count <= {SPLIT_SIZE[split]:,}")


def demo_stories(split, num_stories, start=0):
    """Stories start .. start + num_stories - 1 of an evaluation split, in order: the same ones on every call and
    machine."""
    _check_in_split(split, start, num_stories, "stories")
    return [make_story(SPLIT_SEED_BASE[split] + i) for i in range(start, start + num_stories)]


def demo_corpus_text(num_stories=5000):
    """Sentences of the first `num_stories` training stories: the text the demo vocabulary is trained on."""
    return [text for i in range(num_stories) for text in make_story(SPLIT_SEED_BASE["train"] + i).texts]


def train_demo_tokenizer(path, vocab_size=384, num_stories=5000):
    """Train the demo SentencePiece model with the LLaMA layout (unk/bos/eos = 0/1/2, byte fallback, pad =
    vocab_size - 1), deterministically from the corpus text, and write it atomically to `path`."""
    import sentencepiece
    buf = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(demo_corpus_text(num_stories)), model_writer=buf, vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity",
        add_dummy_prefix=True, remove_extra_whitespaces=False, split_digits=True, unk_id=0, bos_id=1, eos_id=2,
        pad_id=vocab_size - 1, pad_piece="<pad>", num_threads=1, minloglevel=2)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with replaced_on_success(path) as tmp, open(tmp, "wb") as f:
        f.write(buf.getvalue())
    return path


DEMO_TOKENIZER_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "demo_tokenizer.model")


# Questions about a scene, for the fine-tuning demo: "<image>what colour is the circle? red.</s>". They are made
# of the story corpus's words (colours, shapes, cell names) and a few fixed question words, which the demo
# tokenizer spells in small pieces; every answer is read off the scene, so it can be checked exactly.

QA_KINDS = ("colour", "where", "count")
COUNT_WORDS = ("one", "two", "three")


@dataclass
class Question:
    seed: int
    scene: tuple  # canonical tuple of Obj
    kind: str  # one of QA_KINDS
    question: str  # ends with "?"
    answer: str  # without its full stop


def make_question(seed):
    """A question about a random scene of 1-3 objects, from its seed alone, and its answer from the scene:
    colour: "what colour is the circle?" (with "at the <cell>" when the scene has two circles) -> a colour;
    where: "where is the blue square?" -> its cell's name; count: "how many shapes are there?" -> one/two/three."""
    rng = random.Random(f"qa/{seed}")
    scene = random_scene(rng, rng.randint(1, 3))
    kind, o = rng.choice(QA_KINDS), rng.choice(scene)
    cell = CELL_NAMES[o.row][o.col]
    if kind == "colour":
        where = "" if sum(x.shape == o.shape for x in scene) == 1 else f" at the {cell}"
        return Question(seed, scene, kind, f"what colour is the {o.shape}{where}?", o.colour)
    if kind == "where":
        return Question(seed, scene, kind, f"where is the {o.colour} {o.shape}?", cell)
    return Question(seed, scene, kind, "how many shapes are there?", COUNT_WORDS[len(scene) - 1])


def qa_prompt(question, num_img_token):
    """What the model reads before it answers: the image, then the question."""
    return image_placeholder(num_img_token) + question


def question_sample(q, tokenizer, num_img_token=64, image_size=DEMO_IMAGE_SIZE):
    """A question as one row: prompt, then the answer with its full stop and "</s>", the only tokens with a loss
    (num_prompt_tokens before them). The answer is tokenised on its own, as it continues the prompt after a space."""
    prompt = tokenize_with_images(qa_prompt(q.question, num_img_token), tokenizer, 1, num_img_token,
                                  f"question {q.seed}")
    answer = tokenizer.encode(q.answer + ".", add_bos=False) + [tokenizer.eos_id]
    image = render_scene(q.scene, image_size).transpose(2, 0, 1)[None]  # (1, 3, S, S)
    info = [{"question": q.seed, "scene": [o.as_dict() for o in q.scene]}]
    return Sample(np.concatenate([prompt, answer]), image, None, info, num_prompt_tokens=len(prompt))


class QuestionSource(StorySource):
    """Questions about scenes of one split (make_question), dealt to the readers as StorySource deals stories."""

    def __init__(self, tokenizer, split="train", num_questions=None, num_img_token=64, image_size=DEMO_IMAGE_SIZE,
                 seed=0):
        super().__init__(tokenizer, split, num_questions, num_img_token, None, image_size, seed, f"demo_qa_{split}")

    def make(self, seed, rng):
        return question_sample(make_question(seed), self.tokenizer, self.num_img_token, self.image_size)


def demo_qa_dataset(tokenizer, split="train", num_img_token=16, batch_size=16, num_questions=None, seed=0,
                    image_size=DEMO_IMAGE_SIZE, rank=None, world_size=None):
    """The fine-tuning demo's stream: one question per row (AnswerDataset), text loss on the answer only, no image
    loss (the image decoder is skipped)."""
    source = QuestionSource(tokenizer, split, num_questions, num_img_token, image_size, seed)
    return AnswerDataset([source], [1.0], [PackConfig(batch_size=batch_size, num_img_token=num_img_token)],
                         tokenizer, seed=seed, rank=rank, world_size=world_size, loss_weights=[(0.0, None)])


def demo_questions(split, num_questions, start=0):
    """Questions start .. start + num_questions - 1 of an evaluation split, in order: the same ones on every call
    and machine."""
    _check_in_split(split, start, num_questions, "questions")
    return [make_question(SPLIT_SEED_BASE[split] + i) for i in range(start, start + num_questions)]


# ---------------------------------------------------------------------------------------------------------------
# Writing files: checked before the work, replaced whole
# ---------------------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def replaced_on_success(path):
    """A temporary path beside `path` (same extension) to write, renamed onto `path` when the block ends without
    an error: a crash leaves the old file or the new one, never half of one (and no temporary file)."""
    tmp = f"{path}.tmp{os.getpid()}{os.path.splitext(path)[1]}"
    try:
        yield tmp
        os.replace(tmp, path)       # inside the try: a rename that fails (onto a folder) removes the temporary too
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def check_writable(path, flag, folder=False):
    """Before the work: an InputError naming `flag` unless a file (folder=True: files in a folder) can be written at
    `path`, the folders missing on the way made. Nothing is left behind."""
    if not path:
        raise mmi.InputError(f"{flag} is empty, expected a path")
    if os.path.isdir(path) and not folder:
        raise mmi.InputError(f"{flag}={path}: is a folder, expected the path of a file to write")
    if os.path.exists(path) and not os.path.isdir(path) and folder:
        raise mmi.InputError(f"{flag}={path}: is a file, expected a folder to write into")
    base = os.path.abspath(path) if folder else os.path.dirname(os.path.abspath(path))
    while not os.path.exists(base):
        base = os.path.dirname(base)
    if not os.path.isdir(base):
        raise mmi.InputError(f"{flag}={path}: {base} is a file, expected a folder")
    try:
        with tempfile.TemporaryFile(dir=base):
            pass
    except OSError as e:
        raise mmi.InputError(f"{flag}={path}: cannot create a file in {base} ({e.strerror})") from None


# ---------------------------------------------------------------------------------------------------------------
# Command line: look at the data
# ---------------------------------------------------------------------------------------------------------------

def show_demo(n, out_dir, split="train", tokenizer_path=DEMO_TOKENIZER_PATH, scale=2, num_img_token=16):
    """Write a PNG sheet (one story per line) and the text of `n` stories, so a reader can look at the data; token
    counts with the demo model's num_img_token image tokens an image."""
    tok = Tokenizer(tokenizer_path)
    os.makedirs(out_dir, exist_ok=True)
    size, pad = DEMO_IMAGE_SIZE * scale, 4
    sheet = np.full((n * (size + pad) + pad, 4 * (size + pad) + pad, 3), 200, dtype=np.uint8)
    lines = []
    for k in range(n):
        story = make_story(SPLIT_SEED_BASE[split] + k)
        sample = story_sample(story, tok, random.Random(k), num_img_token=num_img_token)
        for j, scene in enumerate(story.scenes):
            img = np.kron(render_scene(scene), np.ones((scale, scale, 1), dtype=np.uint8))
            y, x = pad + k * (size + pad), pad + j * (size + pad)
            sheet[y:y + size, x:x + size] = img
        text = tok.decode(sample.text_ids, skip_special=False)
        lines.append(f"story {story.seed} ({len(sample.text_ids)} tokens with {num_img_token} image tokens per "
                     f"image): " + text.replace(IMAGE_TOKEN * num_img_token, f"{IMAGE_TOKEN}x{num_img_token}"))
    png, txt = os.path.join(out_dir, "demo_sheet.png"), os.path.join(out_dir, "demo_samples.txt")
    with replaced_on_success(png) as tmp:
        Image.fromarray(sheet).save(tmp)
    with replaced_on_success(txt) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {png} and {txt}")
    return png, txt


MAX_SHOW = 1000   # stories on one sheet, a row of pictures each: 1000 make it 132,004 pixels tall (200 MB to draw)


def main(argv=None):
    p = mmi.ArgumentParser(description="mmi data: look at the demo corpus, build its tokenizer")
    p.add_argument("--demo", action="store_true", help="use the synthetic shape-stories corpus")
    p.add_argument("--show", type=int, default=None,
                   help=f"write a PNG sheet and the text of N samples (1 to {MAX_SHOW})")
    p.add_argument("--split", default="train", choices=list(SPLIT_SEED_BASE))
    p.add_argument("--out", default=os.path.join("out", "demo_show"), help="folder for the sheet and the text")
    p.add_argument("--train-tokenizer", action="store_true", help=f"(re)build {DEMO_TOKENIZER_PATH}")
    args = p.parse_args(argv)
    if args.show is not None and not 1 <= args.show <= MAX_SHOW:
        raise mmi.InputError(f"--show={args.show}: expected 1 to {MAX_SHOW} stories")
    if args.demo != (args.show is not None):
        raise mmi.InputError("--demo --show N writes N samples of the demo corpus: give both")
    if not args.demo and not args.train_tokenizer:
        p.print_usage(sys.stderr)
        raise mmi.InputError("nothing to do: give --demo --show N or --train-tokenizer")
    if args.demo:
        check_writable(args.out, "--out", folder=True)
    if args.train_tokenizer:
        print("wrote", train_demo_tokenizer(DEMO_TOKENIZER_PATH))
    if args.demo:
        show_demo(args.show, args.out, args.split)
    return 0


if __name__ == "__main__":
    sys.exit(mmi.run_script(main))
