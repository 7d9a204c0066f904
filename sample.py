"""Write interleaved stories, text and images, with an MM-Interleaved model.

    python sample.py                                        # the embedded demo model on a built-in prompt
    python sample.py --annt=prompts.json                    # prompts in the original's annt.json format
    python sample.py --init_from=runs/demo/model            # one of our checkpoints (save_pretrained folder)
    python sample.py --init_from=original --llm=vicuna-13b-v1.3 --clip=clip-vit-large-patch14 \\
        --sd=stable-diffusion-2-1-base --mmi=mm_interleaved_pretrain --annt=assets/examples/annt_13b.json

Each prompt is continued the original's way: generate text until eos or a <|beginofimage|> (the model
asking for an image), then generate that image, put it back into the context and continue; for `num_iter` rounds.
Output: out/<run>/index.html (the stories as pages of text and pictures), the PNGs, the prompts' own images
(inputs/) and result.json, written into a temporary folder that is renamed into place at the end, so an interrupted
run leaves no half-written page. A run that cannot finish writing (a full disk) keeps what it made in
out/<run>-incomplete.
"""

import argparse
import datetime
import errno
import filecmp
import glob
import html
import itertools
import json
import os
import re
import shutil
import socket
import sys
import warnings

import torch
from PIL import Image

import data
import eval as evaluator
import mmi

DEMO_ANNT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "examples", "annt.json")
MODES = ("generate_texts", "generate_images")
ORIGINAL_SETTINGS = dict(sampler="ddpm", steps=30, guidance_scale=7.5, repetition_penalty=1.3, min_new_tokens=7)
# The demo model, and any model of its vocabulary (speaks_the_demo), gets the image settings eval.py scores it with;
# no repetition penalty, since its stories repeat colour and shape words on purpose ("a red circle ... the red circle
# turns blue"), which a penalty would garble; and the minimum text length eval.py samples its stories' sentences with
# (see DEMO_TEXT there).
DEMO_SETTINGS = dict(evaluator.DEMO_IMAGES, repetition_penalty=1.0,
                     min_new_tokens=evaluator.DEMO_TEXT["min_new_tokens"])


class AnntError(mmi.InputError):
    """A prompt file the run cannot use; the message names the file, the sample and the field."""


# -- the prompt file: checked completely before any model work -------------------------------------------------


def load_annt(path, max_iter=None):
    """Read and check an annt.json: a list of samples with `sentences`, `images`, `sentence_ixs`,
    `image_first`, and optional `generate_mode`, `num_iter` (at most `max_iter`), `multiround_context`. A relative
    image path is looked for in the file's folder, then in the working directory (the original's `./assets/...`
    paths); every image is decoded. Raises AnntError naming the sample index and field at fault.
    -> the samples, each with `paths` (its image files) and `where` (the file and sample index) added."""
    samples = data.read_annt(path)
    if not samples:
        raise AnntError(f"{path}: expected a non-empty list of samples, got an empty list")
    base = os.path.dirname(os.path.abspath(path))
    return [_check_sample(s, f"{path}: sample {i}", base, max_iter) for i, s in enumerate(samples)]


# load_image's reasons as the prompt check words them
IMAGE_REFUSALS = {"image_missing": "does not exist", "image_unreadable": "is not an image Pillow can decode",
                  "image_too_large": "is too large"}


def _check_sample(s, where, base, max_iter=None):
    if not isinstance(s, dict):
        raise AnntError(f"{where}: expected an object, got {type(s).__name__}")

    def field(name, kind, default=None):
        if name not in s:
            if default is None:
                raise AnntError(f"{where}: field '{name}' is missing")
            return default
        if not isinstance(s[name], kind) or isinstance(s[name], bool) and kind is int:
            raise AnntError(f"{where}: field '{name}' must be {kind.__name__}, got {type(s[name]).__name__}")
        return s[name]

    sentences, images = field("sentences", list), field("images", list)
    ixs, first = field("sentence_ixs", list), field("image_first", list)
    mode, num_iter = field("generate_mode", str, "generate_texts"), field("num_iter", int, 0)
    if not images:
        raise AnntError(f"{where}: field 'images' is empty; at least one image is required")
    if not all(isinstance(t, str) for t in sentences):
        raise AnntError(f"{where}: field 'sentences' must be a list of strings")
    for k, p in enumerate(images):
        if not isinstance(p, str):
            raise AnntError(f"{where}: field 'images'[{k}] is {p!r}, expected an image file's path (a string)")
    for name, values in (("sentence_ixs", ixs), ("image_first", first)):
        if len(values) != len(images):
            raise AnntError(f"{where}: field '{name}' has {len(values)} entries, 'images' has {len(images)}")
    for k, ix in enumerate(ixs):
        if not isinstance(ix, int) or isinstance(ix, bool) or not 0 <= ix < len(sentences):
            raise AnntError(f"{where}: field 'sentence_ixs'[{k}] = {ix!r} is not a sentence index "
                            f"(0..{len(sentences) - 1})")
    for k, f in enumerate(first):
        if not isinstance(f, bool):
            raise AnntError(f"{where}: field 'image_first'[{k}] = {f!r} must be true or false")
    if mode not in MODES:
        raise AnntError(f"{where}: field 'generate_mode' is {mode!r}, expected one of {list(MODES)}")
    if num_iter < 0:
        raise AnntError(f"{where}: field 'num_iter' is {num_iter}, expected >= 0")
    if max_iter is not None and num_iter > max_iter:
        raise AnntError(f"{where}: field 'num_iter' is {num_iter}, expected at most {max_iter} (no more rounds than "
                        f"--num_total_token)")
    paths = []
    for k, p in enumerate(images):
        tried = list(dict.fromkeys([os.path.join(base, p), os.path.abspath(p)]))
        full = next((t for t in tried if os.path.isfile(t)), None)
        if full is None:
            where_tried = f" (tried {tried[0]} and {tried[1]})" if len(tried) == 2 else ""
            raise AnntError(f"{where}: field 'images'[{k}]: {p!r} does not exist{where_tried}")
        try:                                  # decoded in full: a truncated file fails here, not mid-run
            with warnings.catch_warnings():   # Pillow's decompression-bomb warning: load_image refuses those
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                data.load_image(full)
        except data.SkipSample as e:
            why = e.detail.removeprefix(f"{full}: ") if e.detail != full else ""
            raise AnntError(f"{where}: field 'images'[{k}]: {p!r} {IMAGE_REFUSALS.get(e.reason, e.reason)}"
                            + (f" ({why})" if why else "")) from None
        paths.append(full)
    context = s.get("multiround_context")
    if context is not None and not (isinstance(context, list) and all(isinstance(t, str) for t in context)):
        raise AnntError(f"{where}: field 'multiround_context' must be a list of strings")
    # `images` stays as given (result.json records it); `paths` are the files, `where` names the sample
    return dict(s, paths=paths, where=where, generate_mode=mode, num_iter=num_iter)


# -- the model ------------------------------------------------------------------------------------------------


def model_folder(args):
    return evaluator.DEMO_MODEL if args.init_from == "demo" else args.init_from


def tokenizer_path(args):
    """--tokenizer, else the model folder's own (train.py exports a tokenizer.model or tokenizer.json beside the
    model), else the demo's."""
    own = [os.path.join(model_folder(args), name) for name in ("tokenizer.model", "tokenizer.json")]
    return args.tokenizer or next((p for p in own if os.path.exists(p)), data.DEMO_TOKENIZER_PATH)


def speaks_the_demo(args):
    """A model that reads the demo's vocabulary (the demo model, one trained by its configs) gets DEMO_SETTINGS."""
    if args.init_from == "original":
        return False
    path = tokenizer_path(args)
    return os.path.isfile(path) and filecmp.cmp(path, data.DEMO_TOKENIZER_PATH, shallow=False)


def load_model(args):
    """-> (model, tokenizer). `demo` (assets/demo), a save_pretrained folder, or `original` (the released files)."""
    if args.tokenizer and not os.path.isfile(args.tokenizer):
        raise mmi.InputError(f"--tokenizer={args.tokenizer}: no such file")
    if args.init_from == "original":
        if not (args.mmi or args.llm and args.clip):
            raise mmi.InputError("--init_from=original needs --mmi (the MM-Interleaved checkpoint, which holds every "
                                 "weight), or --llm and --clip")
        for flag in ("llm", "clip", "sd", "mmi"):
            if getattr(args, flag) and not os.path.isdir(getattr(args, flag)):
                raise mmi.InputError(f"--{flag}={getattr(args, flag)}: no such folder")
        # before the minutes of loading: the tokenizer, from --tokenizer, else the Vicuna or checkpoint folder
        # a tokenizer.model that is there but is no file is refused by data.Tokenizer, not passed over
        found = [os.path.join(f, "tokenizer.model") for f in (args.llm, args.mmi) if f]
        tok_path = args.tokenizer or next((p for p in found if os.path.exists(p)), None)
        if tok_path is None:
            raise mmi.InputError("--init_from=original: no tokenizer.model in the --llm or --mmi folder; pass "
                                 "--tokenizer (Vicuna's tokenizer.model)")
        tokenizer = data.Tokenizer(tok_path)
        model = mmi.MMInterleaved.from_original(llm=args.llm, clip=args.clip, sd=args.sd, mmi=args.mmi,
                                                dtype=args.dtype, device=args.device, quantize=args.quantize)
    else:
        path = model_folder(args)
        if not os.path.isfile(os.path.join(path, "config.json")):
            what = "the demo model (assets/demo) is not in this checkout" if args.init_from == "demo" else \
                f"{path} is not a model folder (no config.json)" if os.path.isdir(path) else "no such folder"
            if os.path.isfile(os.path.join(path, "model", "config.json")):      # a training run's out_dir
                what += f"; the model the run exported is {os.path.join(path, 'model')}"
            raise mmi.InputError(f"--init_from={args.init_from}: {what}")
        tok_path = tokenizer_path(args)
        tokenizer = data.Tokenizer(tok_path)
        model = mmi.MMInterleaved.from_pretrained(path, dtype=args.dtype, device=args.device, quantize=args.quantize)
    tokenizer = evaluator.check_tokenizer(tokenizer, tok_path, model.cfg)
    if model.image_decoder is not None and args.device.type == "cuda":
        # cuDNN runs half-precision convolutions in NHWC: NCHW weights cost a transpose in every UNet call
        model.image_decoder.decoder.unet.to(memory_format=torch.channels_last)
    return model.eval(), tokenizer


# -- one story --------------------------------------------------------------------------------------------------


def prompt_batch(sample, tokenizer, cfg, num_total_token, device):
    """The prompt as the model's batch (data.py's annt.json assembly: placeholders before/after their sentences,
    sentences joined by spaces, bos, no eos; images at the encoder size). Every image must fit within
    `num_total_token`, else AnntError."""
    transform = data.DualTransform(cfg.vision.image_size, None)
    where = sample.get("where", "prompt")
    try:
        batch = data.inference_sample(dict(sample, images=sample.get("paths", sample["images"])), tokenizer,
                                      transform, cfg.num_img_token, num_total_token, "", where)
        n = int(batch["num_image_per_seq"][0])
    except data.SkipSample as e:
        if e.reason != "image_beyond_budget":
            raise AnntError(str(e)) from None
        n = 0
    if n < len(sample["images"]):
        raise AnntError(f"{where}: field 'sentences': too long for --num_total_token={num_total_token}: only {n} "
                        f"of the prompt's {len(sample['images'])} images fit within it")
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def append_tokens(batch, ids):
    new = torch.tensor([ids], dtype=torch.long, device=batch["text_ids"].device)
    batch["text_ids"] = torch.cat([batch["text_ids"], new], dim=1)
    batch["attention_mask"] = torch.cat([batch["attention_mask"], torch.ones_like(new)], dim=1)


def add_placeholder_image(batch, cfg):
    """A grey image in the new slot: the original's stand-in for the picture about to be generated."""
    S = cfg.vision.image_size
    grey = torch.full((1, 3, S, S), 0.5, dtype=batch["image_tensors"].dtype, device=batch["image_tensors"].device)
    batch["image_tensors"] = torch.cat([batch["image_tensors"], grey])
    batch["num_image_per_seq"] = batch["num_image_per_seq"] + 1


def terminal_safe(text):
    """Generated text as printed: control characters (an untrained model makes any token, escape sequences too)
    are shown as escapes such as \\x1b rather than obeyed by the terminal; newlines stay."""
    return "".join(c if c.isprintable() or c == "\n" else repr(c)[1:-1] for c in text)


def run_story(model, tokenizer, sample, batch, index, args, out_dir):
    """The original's interleaved loop for one prompt, from its prompt_batch (extended in place).
    -> list of {"type": "text"|"image", ...} in order."""
    cfg = model.cfg
    dtype = next(model.parameters()).dtype
    batch["image_tensors"] = batch["image_tensors"].to(dtype)
    target = int(batch["num_image_per_seq"][0]) - 1        # an initial generate_images draws the last image
    mode = sample["generate_mode"]
    num_iter = args.num_iter if args.auto_end or not sample["num_iter"] else sample["num_iter"]
    results = []
    for it in range(num_iter):
        if mode == "generate_texts":
            out = model.generate_texts(batch, max_new_tokens=args.max_new_tokens, min_new_tokens=args.min_new_tokens,
                                       num_beams=args.num_beams, do_sample=args.use_nucleus_sampling,
                                       top_k=args.top_k, top_p=args.top_p, temperature=args.temperature,
                                       repetition_penalty=args.repetition_penalty,
                                       keep_stop_token=args.keep_stop_token, seed=args.seed + it, compile=args.compile)
            ids = out["text_ids"][0, :int(out["lengths"][0])].tolist()
            text = tokenizer.decode(ids)
            print(f"[{index}] {terminal_safe(text)}", flush=True)
            results.append({"type": "text", "text": text})
            context = sample.get("multiround_context")
            if args.force_replace_gen_text and context and it < len(context) and context[it]:
                ids = tokenizer.encode(context[it])[1:]       # the given text replaces the generated one (no bos)
            stopped = bool(ids) and ids[-1] == tokenizer.eos_id
            ids = ids[:-1] if stopped else ids
            if args.force_gen_image_next and (not ids or ids[-1] != tokenizer.soi_id):
                ids.append(tokenizer.soi_id)
            if ids and ids[-1] == tokenizer.soi_id:          # the model asks for an image
                ids += [tokenizer.image_id] * cfg.num_img_token
                add_placeholder_image(batch, cfg)
                target = int(batch["num_image_per_seq"][0]) - 1
                mode = "generate_images"
            append_tokens(batch, ids)
            if args.auto_end and stopped:
                break
        else:   # num_validation_images drawn and saved; the first goes back into the story
            n = args.num_validation_images
            drawn = model.generate_images(batch, target_image_idxs=[target], steps=args.steps,
                                          guidance_scale=args.guidance_scale, sampler=args.sampler, seed=args.seed,
                                          num_images_per_context=n)["image"]
            pils = mmi.images_to_pil(drawn)
            for k, pil in enumerate(pils):
                name = f"{index}_{it}.png" if n == 1 else f"{index}_{it}_{k}.png"
                pil.save(os.path.join(out_dir, name))
                results.append({"type": "image", "file": name})
                print(f"[{index}] <image {name}>", flush=True)
            batch["image_tensors"][target] = data.encoder_image(pils[0], cfg.vision.image_size).to(
                batch["image_tensors"])
            mode = "generate_texts"
    return results


# -- the page -------------------------------------------------------------------------------------------------

PAGE_IMAGE_WIDTH = 256   # the page shows images this large; smaller ones grow by a whole factor, nearest neighbour


def copy_inputs(sample, index, folder):
    """The prompt's own images as the model reads them (first frame, RGB, EXIF orientation not applied), saved as
    PNGs in the run folder, so that the page shows what the model saw and needs no other file; a photo is scaled
    down to 4 times the width the page shows (a 3000 px JPEG would be a 26 MB PNG). -> their names relative to the
    folder."""
    os.makedirs(os.path.join(folder, "inputs"), exist_ok=True)
    names = [f"inputs/{index}_{k}.png" for k in range(len(sample["paths"]))]
    for path, name in zip(sample["paths"], names):
        image = data.load_image(path)
        image.thumbnail((4 * PAGE_IMAGE_WIDTH, 4 * PAGE_IMAGE_WIDTH))         # keeps the aspect; never enlarges
        image.save(os.path.join(folder, name))
    return names


def prompt_items(prompt):
    """The prompt in reading order, its images where the model reads their placeholders (data.images_around).
    -> items as in a story's `generated`."""
    image = lambda k: {"type": "image", "file": prompt["image_files"][k]}
    items = []
    for sentence, (before, after) in zip(prompt["sentences"], data.images_around(
            len(prompt["sentences"]), prompt["sentence_ixs"], prompt["image_first"])):
        items += [image(k) for k in before] + [{"type": "text", "text": sentence}] + [image(k) for k in after]
    return items


def item_html(item, folder):
    if item["type"] == "text":
        return f"<p>{html.escape(item['text'])}</p>"
    with Image.open(os.path.join(folder, item["file"])) as im:
        w, h = im.size
    big = max(w, h)
    scale = PAGE_IMAGE_WIDTH // big if big <= PAGE_IMAGE_WIDTH else PAGE_IMAGE_WIDTH / big
    pixelated = " class='px'" if big <= PAGE_IMAGE_WIDTH else ""
    name = html.escape(item["file"])
    return f"<img src='{name}' alt='{name}' width='{round(w * scale)}' height='{round(h * scale)}'{pixelated}>"


def write_page(path, stories):
    """index.html: each story's prompt (its text and images), then what the model made, in the order it was made.
    Images are the files beside the page; small ones are shown enlarged with visible pixels."""
    folder = os.path.dirname(path)
    parts = ["<!doctype html><meta charset='utf-8'><title>mmi stories</title>",
             "<style>body{font:16px/1.5 sans-serif;max-width:46em;margin:2em auto}"
             "img{display:block;margin:.5em 0;border:1px solid #ccc;image-orientation:none}"
             ".px{image-rendering:pixelated}.prompt{color:#666}h3{font-size:1em;margin:1em 0 0}</style>"]
    for i, story in enumerate(stories):
        parts.append(f"<h2>Story {i}</h2><h3>Prompt</h3><div class='prompt'>")
        parts += [item_html(item, folder) for item in prompt_items(story["prompt"])]
        parts.append("</div><h3>Generated</h3><div class='generated'>")
        parts += [item_html(item, folder) for item in story["generated"]]
        parts.append("</div>")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(parts) + "\n")


# -- the run folder -------------------------------------------------------------------------------------------

HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "host"
# <run>.<host>.<pid>.<random>.tmp: the temporary folder of a run names the machine and process that own it
TEMP_NAME = re.compile(r"\d{8}-\d{6}\.(?P<host>[A-Za-z0-9-]+)\.(?P<pid>\d+)\.[0-9a-z]+\.tmp")


def run_name():
    """The run's folder name: its start time (a second run in the same second gets a -2 at the end)."""
    return datetime.datetime.now().strftime("%Y%m%d-%H%M%S")


def make_temp_folder(out, run):
    """A new folder <run>.<host>.<pid>.<random>.tmp in `out` (made like any folder, so the finished run keeps the
    usual permissions)."""
    while True:
        path = os.path.join(out, f"{run}.{HOST}.{os.getpid()}.{os.urandom(3).hex()}.tmp")
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            pass


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:                   # another user's process
        return True
    return True


def sweep_dead_runs(out):
    """Remove the temporary folders that killed runs on this machine left in `out`: those whose process is gone.
    A live run's folder, another machine's and any other name are never touched."""
    if os.name != "posix":                    # os.kill(pid, 0) probes only on POSIX
        return
    for name in os.listdir(out):
        m = TEMP_NAME.fullmatch(name)
        if m and m["host"] == HOST and not pid_alive(int(m["pid"])):
            shutil.rmtree(os.path.join(out, name), ignore_errors=True)


def move_into_place(tmp, path):
    """Rename the folder `tmp` to `path`, or to path-2, path-3, ... where that is taken (runs finishing in the
    same second). -> the path used. A rename onto a folder with files fails, so no run replaces another."""
    for k in itertools.count(1):
        dst = path if k == 1 else f"{path}-{k}"
        if os.path.lexists(dst):
            continue
        try:
            os.rename(tmp, dst)
            return dst
        except OSError as e:
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR):
                raise


def remove_story_files(folder, index):
    """The images story `index` wrote into the run folder (its inputs, what it drew): a story interrupted before it
    finished has no place on the page, so it leaves nothing behind."""
    for pattern in (f"{index}_*.png", f"inputs/{index}_*.png"):
        for path in glob.glob(os.path.join(glob.escape(folder), pattern)):
            os.remove(path)


def write_run(tmp, path, stories, args):
    """result.json (the settings and every finished story) and index.html into tmp, then tmp moved to path.
    -> the folder's final name."""
    with open(os.path.join(tmp, "result.json"), "w", encoding="utf-8") as f:
        text = {k: getattr(args, k) for k in ("use_nucleus_sampling", "num_beams", "top_k", "top_p", "temperature",
                                              "repetition_penalty", "max_new_tokens", "min_new_tokens")}
        json.dump({"init_from": args.init_from, "device": str(args.device), "dtype": str(args.dtype)[6:],
                   "quantize": args.quantize or "none", "seed": args.seed, "sampler": args.sampler,
                   "steps": args.steps, "guidance_scale": args.guidance_scale, "text": text, "stories": stories},
                  f, indent=1)
    write_page(os.path.join(tmp, "index.html"), stories)
    return move_into_place(tmp, path)


def shown(path):
    """A path as printed: relative to the working directory when inside it."""
    rel = os.path.relpath(path)
    return os.path.abspath(path) if rel == os.pardir or rel.startswith(os.pardir + os.sep) else rel


# -- command line ---------------------------------------------------------------------------------------------


def parse_args(argv):
    p = mmi.ArgumentParser(
        description="Write interleaved stories, text and images, with an MM-Interleaved model. Each run writes "
                    "<out>/<date>-<time>/index.html (open it in a browser), the images and result.json.")
    p.add_argument("--annt", default=DEMO_ANNT,
                   help="prompts in the original's annt.json format (default: the demo's, assets/examples/annt.json)")
    p.add_argument("--init_from", default="demo",
                   help="the model: demo (assets/demo, the default), a folder written by save_pretrained or "
                        "train.py, or original (the released files: --mmi, or --llm and --clip)")
    p.add_argument("--llm", help="with --init_from=original: the Vicuna/LLaMA folder (has tokenizer.model); not "
                                 "needed when --mmi holds the LLM's weights and --tokenizer is given")
    p.add_argument("--clip", help="with --init_from=original: the CLIP ViT-L/14 folder; not needed when --mmi "
                                  "holds its weights")
    p.add_argument("--sd", help="with --init_from=original: the Stable Diffusion 2.1 base folder (for images); not "
                                "needed when --mmi holds the UNet, VAE and neg_prompt_embeds")
    p.add_argument("--mmi", help="with --init_from=original: the MM-Interleaved checkpoint folder")
    p.add_argument("--tokenizer", help="tokenizer.model or tokenizer.json (default: the model folder's, or the "
                                       "demo's)")
    p.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda or cuda:N")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="the weights' and computation's dtype (default: bfloat16 on a GPU, float32 on the CPU)")
    p.add_argument("--quantize", default="none",
                   help="weight-only quantization, layer by layer as the model loads: none (the default), int8 (per "
                        "output channel) or int4 (groups of 128 inputs) of the LLM's attention and MLP layers, its "
                        "text head and the two Q-Former resamplers; the UNet, VAE, vision tower and the LLM's MMFS "
                        "layers stay in --dtype")
    # None = the original's setting, or for a model of the demo's vocabulary the one eval.py scores it with
    o, d = ORIGINAL_SETTINGS, DEMO_SETTINGS
    p.add_argument("--sampler", default=None, choices=list(mmi.SAMPLERS),
                   help=f"the diffusion sampler (default: {o['sampler']}, the original's; the demo model: "
                        f"{d['sampler']})")
    p.add_argument("--steps", type=int, default=None,
                   help=f"diffusion steps per image (default: {o['steps']}; the demo model: {d['steps']})")
    p.add_argument("--guidance_scale", type=evaluator.finite_float, default=None,
                   help=f"classifier-free guidance of images (default: {o['guidance_scale']}; the demo model: "
                        f"{d['guidance_scale']})")
    p.add_argument("--seed", type=evaluator.seed_int, default=42,
                   help="seed of text sampling and image noise, in [0, 2**63) (default: 42)")
    p.add_argument("--use_nucleus_sampling", action=argparse.BooleanOptionalAction, default=True,
                   help="sample texts: temperature, then top-k, then top-p, as the original through HF generate "
                        "(default: on, as the original's inference config); off: greedy, or beam search with "
                        "--num_beams > 1")
    p.add_argument("--num_beams", type=int, default=1,
                   help="beams of the text search (default: 1; more needs --no-use_nucleus_sampling)")
    p.add_argument("--keep_stop_token", action="store_true",
                   help="with --num_beams > 1, a beam ending on <|beginofimage|> asks for an image (the original's "
                        "beam search ends every finished beam with eos, so it never does)")
    p.add_argument("--top_k", type=int, default=50,
                   help="sample among the k most likely tokens (default: 50, HF's, which the original ran with; "
                        "0 = off)")
    p.add_argument("--top_p", type=evaluator.finite_float, default=0.9,
                   help="then among the most likely of those until their mass reaches p (default: 0.9)")
    p.add_argument("--temperature", type=evaluator.finite_float, default=1.0,
                   help="text sampling temperature (default: 1.0)")
    p.add_argument("--repetition_penalty", type=evaluator.finite_float, default=None,
                   help=f"text repetition penalty (default: {o['repetition_penalty']}; the demo model: "
                        f"{d['repetition_penalty']})")
    p.add_argument("--max_new_tokens", "--max_length", type=int, default=90,
                   help="the most tokens of one text (default: 90; max_length is the original's name: its "
                        "generate_texts passes it as max_new_tokens)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the text decoding step (GPU, 13B: 1.3-1.4x the tokens/s; compiling "
                        "takes 2-3 minutes)")
    p.add_argument("--min_new_tokens", type=int, default=None,
                   help=f"the fewest tokens of one text (default: {o['min_new_tokens']}, the original's min_length "
                        f"8; the demo model: {d['min_new_tokens']})")
    p.add_argument("--min_length", type=int, default=None,
                   help="the original's name and count for the fewest tokens: it counts a dummy bos, so "
                        "--min_length=N is --min_new_tokens=N-1")
    p.add_argument("--num_validation_images", type=int, default=1,
                   help="images drawn per image round, each saved and shown; the first goes back into the story "
                        "(default: 1)")
    p.add_argument("--num_iter", type=int, default=4,
                   help="rounds (a text or an image each) per prompt when the prompt gives no num_iter, or with "
                        "--auto_end (default: 4)")
    p.add_argument("--num_total_token", type=int, default=2048,
                   help="the most tokens of a prompt; every prompt image must fit within it (default: 2048)")
    p.add_argument("--auto_end", action="store_true",
                   help="stop a story at a text ending in eos, after at most --num_iter rounds")
    p.add_argument("--force_gen_image_next", action="store_true",
                   help="after each text, draw an image even if the model did not ask for one")
    p.add_argument("--force_replace_gen_text", action="store_true",
                   help="put the prompt's multiround_context texts in place of the generated ones")
    p.add_argument("--out", default="out", help="folder of the runs (default: out)")
    args = p.parse_args(argv)
    if not args.annt:
        raise mmi.InputError("--annt is empty, expected an annt.json file of prompts")
    args.device = mmi.resolve_device(args.device)
    args.dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.type == "cuda" else "float32"))
    if args.quantize not in ("none", "int8", "int4"):
        raise mmi.InputError(f"--quantize={args.quantize}: expected none, int8 or int4")
    args.quantize = None if args.quantize == "none" else args.quantize
    if args.min_length is not None:
        if args.min_new_tokens is not None:
            raise mmi.InputError("--min_length and --min_new_tokens set the same thing: pass one")
        args.min_new_tokens = max(args.min_length - 1, 0)      # min_length counts the original's dummy bos
    defaults = DEMO_SETTINGS if speaks_the_demo(args) else ORIGINAL_SETTINGS
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.num_beams > 1 and args.use_nucleus_sampling:
        raise mmi.InputError(f"--num_beams={args.num_beams} searches without sampling: add "
                             f"--no-use_nucleus_sampling (sampling several beams is not implemented)")
    for name, ok, expected in (("steps", args.steps >= 1, ">= 1"),
                               ("num_total_token", args.num_total_token >= 1, ">= 1"),
                               ("max_new_tokens", args.max_new_tokens >= 0, ">= 0"),
                               ("min_new_tokens", args.min_new_tokens >= 0, ">= 0"),
                               ("min_length", args.min_length is None or args.min_length >= 0, ">= 0"),
                               ("num_iter", 0 <= args.num_iter <= args.num_total_token,
                                f"0..{args.num_total_token}, no more rounds than --num_total_token"),
                               ("num_beams", args.num_beams >= 1, ">= 1"),
                               ("num_validation_images", args.num_validation_images >= 1, ">= 1"),
                               ("top_k", args.top_k >= 0, ">= 0"),
                               ("top_p", 0 < args.top_p <= 1, "in (0, 1]"),
                               ("temperature", args.temperature > 0, "> 0"),
                               ("repetition_penalty", args.repetition_penalty > 0, "> 0")):
        if not ok:
            raise mmi.InputError(f"--{name}={getattr(args, name)}: expected {expected}")
    return args


def check_model_bounds(args, cfg):
    """The flags a model bounds, checked once it has loaded and before any generation: no more diffusion steps than
    its schedule's timesteps, no more beams than its vocabulary has tokens (each beam keeps a distinct
    continuation; more would only allocate)."""
    for name, most, what in (("steps", cfg.image_decoder.num_train_timesteps, "diffusion timesteps"),
                             ("num_beams", cfg.llm.vocab_size, "vocabulary size")):
        if getattr(args, name) > most:
            raise mmi.InputError(f"--{name}={getattr(args, name)}: expected at most {most}, the model's {what}")


def main(argv=None):
    args = parse_args(argv)
    data.check_writable(args.out, "--out", folder=True)       # before minutes of loading, as every input
    samples = load_annt(args.annt, args.num_total_token)
    model, tokenizer = load_model(args)
    check_model_bounds(args, model.cfg)
    batches = [prompt_batch(s, tokenizer, model.cfg, args.num_total_token, args.device) for s in samples]
    run = run_name()
    try:
        os.makedirs(args.out, exist_ok=True)
        sweep_dead_runs(args.out)
        tmp = make_temp_folder(args.out, run)
    except OSError as e:
        raise mmi.InputError(f"--out={args.out}: cannot write there ({e.strerror})") from None
    stories = []
    try:
        for i, (s, batch) in enumerate(zip(samples, batches)):
            prompt = {k: s[k] for k in ("sentences", "images", "sentence_ixs", "image_first", "generate_mode")}
            prompt["image_files"] = copy_inputs(s, i, tmp)
            generated = run_story(model, tokenizer, s, batch, i, args, tmp)
            stories.append({"prompt": prompt, "generated": generated})
        final = write_run(tmp, os.path.join(args.out, run), stories, args)
    except OSError as e:                      # a full disk: keep what was made, under a name no sweep removes
        try:
            kept = move_into_place(tmp, os.path.join(args.out, run + "-incomplete"))
        except OSError:
            kept = tmp
        print(f"{os.path.basename(sys.argv[0])}: error: {e}; what this run made so far is in {shown(kept)}",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:                 # Ctrl-C or SIGTERM: the stories already finished keep their page
        if not stories:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        remove_story_files(tmp, len(stories))
        kept = write_run(tmp, os.path.join(args.out, run + "-incomplete"), stories, args)
        print(f"{os.path.basename(sys.argv[0])}: interrupted after {len(stories)} of {len(samples)} stories; their "
              f"page is {shown(os.path.join(kept, 'index.html'))}", file=sys.stderr)
        return 130
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"wrote {shown(os.path.join(final, 'index.html'))}")
    return 0


if __name__ == "__main__":
    sys.exit(mmi.run_script(main))
