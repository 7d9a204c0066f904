"""Write interleaved stories, text and images, with an MM-Interleaved model.

    python sample.py                                        # the embedded demo model on a built-in prompt
    python sample.py --annt=prompts.json                    # prompts in the original's annt.json format
    python sample.py --init_from=runs/demo/model            # one of our checkpoints (save_pretrained folder)
    python sample.py --init_from=original --llm=vicuna-13b-v1.3 --clip=clip-vit-large-patch14 \\
        --sd=stable-diffusion-2-1-base --mmi=mm_interleaved_pretrain --annt=assets/examples/annt_13b.json

Each prompt is continued the original's way (SPEC §9): generate text until eos or a <|beginofimage|> (the model
asking for an image), then generate that image, put it back into the context and continue; for `num_iter` rounds.
Output: out/<run>/index.html (the stories as pages of text and pictures), the PNGs and result.json, written into a
temporary folder that is renamed into place at the end, so an interrupted run leaves no half-written page.
"""

import argparse
import datetime
import html
import json
import os
import shutil
import sys

import torch
from PIL import Image

import data
import eval as evaluator
import mmi

HERE = os.path.dirname(os.path.abspath(__file__))
DEMO_MODEL = os.path.join(HERE, "assets", "demo")
DEMO_TOKENIZER = os.path.join(HERE, "assets", "demo_tokenizer.model")
DEMO_ANNT = os.path.join(HERE, "assets", "examples", "annt.json")
MODES = ("generate_texts", "generate_images")
ORIGINAL_SETTINGS = dict(sampler="ddpm", steps=30, guidance_scale=7.5, repetition_penalty=1.3)
# The demo model gets the image settings eval.py scores it with, and no repetition penalty: its stories repeat
# colour and shape words on purpose ("a red circle ... the red circle turns blue"), which a penalty would garble.
DEMO_SETTINGS = dict(evaluator.DEMO_IMAGES, repetition_penalty=1.0)


class AnntError(ValueError):
    """A prompt file the run cannot use; the message names the file, the sample and the field."""


# -- the prompt file: checked completely before any model work -------------------------------------------------


def load_annt(path):
    """Read and check an annt.json: a list of samples with `sentences`, `images`, `sentence_ixs`,
    `image_first`, and optional `generate_mode`, `num_iter`, `multiround_context`. Image paths are relative to
    the file's folder. Raises AnntError naming the sample index and field at fault."""
    if not os.path.isfile(path):
        raise AnntError(f"{path}: no such file")
    try:
        with open(path, encoding="utf-8") as f:
            samples = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise AnntError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(samples, list) or not samples:
        raise AnntError(f"{path}: expected a non-empty list of samples, got {type(samples).__name__}")
    base = os.path.dirname(os.path.abspath(path))
    return [_check_sample(s, f"{path}: sample {i}", base) for i, s in enumerate(samples)]


def _check_sample(s, where, base):
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
    for name, values in (("sentence_ixs", ixs), ("image_first", first)):
        if len(values) != len(images):
            raise AnntError(f"{where}: field '{name}' has {len(values)} entries, 'images' has {len(images)}")
    for k, ix in enumerate(ixs):
        if not isinstance(ix, int) or isinstance(ix, bool) or not 0 <= ix < len(sentences):
            raise AnntError(f"{where}: field 'sentence_ixs'[{k}] = {ix!r} is not a sentence index "
                            f"(0..{len(sentences) - 1})")
    if mode not in MODES:
        raise AnntError(f"{where}: field 'generate_mode' is {mode!r}, expected one of {list(MODES)}")
    if num_iter < 0:
        raise AnntError(f"{where}: field 'num_iter' is {num_iter}, expected >= 0")
    paths = []
    for k, p in enumerate(images):
        full = p if isinstance(p, str) and os.path.isabs(p) else os.path.join(base, str(p))
        if not isinstance(p, str) or not os.path.isfile(full):
            raise AnntError(f"{where}: field 'images'[{k}]: {p!r} does not exist")
        try:
            with Image.open(full) as im:
                im.verify()
        except Exception as e:
            raise AnntError(f"{where}: field 'images'[{k}]: {p!r} is not an image ({type(e).__name__})") from None
        paths.append(full)
    context = s.get("multiround_context")
    if context is not None and not (isinstance(context, list) and all(isinstance(t, str) for t in context)):
        raise AnntError(f"{where}: field 'multiround_context' must be a list of strings")
    return dict(s, images=paths, generate_mode=mode, num_iter=num_iter)


# -- the model ------------------------------------------------------------------------------------------------


def load_model(args):
    """-> (model, tokenizer). `demo` (assets/demo), a save_pretrained folder, or `original` (the released files)."""
    if args.init_from == "original":
        if not (args.llm and args.clip):
            raise AnntError("--init_from=original needs --llm and --clip (and --sd, --mmi for the full model)")
        model = mmi.MMInterleaved.from_original(llm=args.llm, clip=args.clip, sd=args.sd, mmi=args.mmi,
                                                dtype=args.dtype, device=args.device)
        tok_path = args.tokenizer or os.path.join(args.llm, "tokenizer.model")
    else:
        path = DEMO_MODEL if args.init_from == "demo" else args.init_from
        if not os.path.isfile(os.path.join(path, "config.json")):
            what = "the demo model (assets/demo) is not in this checkout" if args.init_from == "demo" else \
                f"{path} is not a model folder (no config.json)"
            raise AnntError(f"--init_from={args.init_from}: {what}")
        model = mmi.MMInterleaved.from_pretrained(path, dtype=args.dtype, device=args.device)
        tok_path = args.tokenizer or next((p for p in (os.path.join(path, "tokenizer.model"), DEMO_TOKENIZER)
                                           if os.path.isfile(p)), None)
    if not tok_path or not os.path.isfile(tok_path):
        raise AnntError(f"tokenizer {tok_path!r} not found; pass --tokenizer")
    tokenizer = data.Tokenizer(tok_path)
    c = model.cfg
    ids = (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id, tokenizer.soi_id, tokenizer.image_id)
    if ids != (c.bos_token_id, c.eos_token_id, c.pad_token_id, c.soi_token_id, c.image_token_id):
        raise AnntError(f"tokenizer {tok_path}: bos/eos/pad/soi/image ids {ids} do not match the model's "
                        f"{(c.bos_token_id, c.eos_token_id, c.pad_token_id, c.soi_token_id, c.image_token_id)}")
    if model.image_decoder is not None and torch.device(args.device).type == "cuda":
        # cuDNN runs half-precision convolutions in NHWC: NCHW weights cost a transpose in every UNet call
        model.image_decoder.decoder.unet.to(memory_format=torch.channels_last)
    return model.eval(), tokenizer


# -- one story --------------------------------------------------------------------------------------------------


def prompt_batch(sample, tokenizer, cfg, num_total_token, device):
    """The prompt as the model's batch (data.py's annt.json assembly: placeholders before/after their sentences,
    sentences joined by spaces, bos, no eos; images at the encoder size)."""
    transform = data.DualTransform(cfg.vision.image_size, None)
    batch = data.inference_sample(sample, tokenizer, transform, cfg.num_img_token, num_total_token, "", "prompt")
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def encoder_image(pil, cfg):
    """PIL -> [3, S, S] in [0, 1] at the visual tokenizer's size (centre crop, as the original's transform)."""
    return data.to_float01(data.DualTransform(cfg.vision.image_size, None)(pil)[0])


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


def run_story(model, tokenizer, sample, index, args, out_dir, seed):
    """The original's interleaved loop for one prompt. -> list of {"type": "text"|"image", ...} in order."""
    cfg = model.cfg
    batch = prompt_batch(sample, tokenizer, cfg, args.num_total_token, args.device)
    dtype = next(model.parameters()).dtype
    batch["image_tensors"] = batch["image_tensors"].to(dtype)
    target = int(batch["num_image_per_seq"][0]) - 1        # an initial generate_images draws the last image
    mode = sample["generate_mode"]
    num_iter = args.num_iter if args.auto_end or not sample["num_iter"] else sample["num_iter"]
    results = []
    for it in range(num_iter):
        if mode == "generate_texts":
            out = model.generate_texts(batch, max_new_tokens=args.max_new_tokens, min_new_tokens=args.min_new_tokens,
                                       num_beams=1, do_sample=True, top_p=args.top_p, temperature=args.temperature,
                                       repetition_penalty=args.repetition_penalty, seed=seed + it,
                                       compile=args.compile)
            ids = out["text_ids"][0, :int(out["lengths"][0])].tolist()
            text = tokenizer.decode(ids)
            print(f"[{index}] {text}", flush=True)
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
        else:
            image = model.generate_images(batch, target_image_idxs=[target], steps=args.steps,
                                          guidance_scale=args.guidance_scale, sampler=args.sampler, seed=seed)["image"][0]
            name = f"{index}_{it}.png"
            pil = mmi.images_to_pil(image[None])[0]
            pil.save(os.path.join(out_dir, name))
            results.append({"type": "image", "file": name})
            print(f"[{index}] <image {name}>", flush=True)
            batch["image_tensors"][target] = encoder_image(pil, cfg).to(batch["image_tensors"])
            mode = "generate_texts"
    return results


# -- the page -------------------------------------------------------------------------------------------------


def write_page(path, stories):
    """index.html: each story's prompt, then its text and images in the order they were made."""
    parts = ["<!doctype html><meta charset='utf-8'><title>mmi stories</title>",
             "<style>body{font:16px/1.5 sans-serif;max-width:46em;margin:2em auto}img{max-width:256px;"
             "image-rendering:pixelated;display:block;margin:.5em 0}.prompt{color:#666}</style>"]
    for i, story in enumerate(stories):
        parts.append(f"<h2>Story {i}</h2><p class='prompt'>{html.escape(' '.join(story['prompt']['sentences']))}</p>")
        for item in story["generated"]:
            if item["type"] == "text":
                parts.append(f"<p>{html.escape(item['text'])}</p>")
            else:
                parts.append(f"<img src='{html.escape(item['file'])}' alt='{html.escape(item['file'])}'>")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(parts) + "\n")


# -- command line ---------------------------------------------------------------------------------------------


def parse_args(argv):
    p = argparse.ArgumentParser(description="Write interleaved stories with an MM-Interleaved model.")
    p.add_argument("--annt", default=DEMO_ANNT, help="prompts in the original's annt.json format")
    p.add_argument("--init_from", default="demo", help="demo | a save_pretrained folder | original")
    p.add_argument("--llm"), p.add_argument("--clip"), p.add_argument("--sd"), p.add_argument("--mmi")
    p.add_argument("--tokenizer", help="tokenizer.model (default: the model folder's, or the demo's)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default bfloat16 on a GPU, float32 on the CPU")
    # None = the original's setting (ddpm, 30, 7.5, 1.3), or for the demo model the one eval.py scores it with
    p.add_argument("--sampler", default=None, choices=list(mmi.SAMPLERS))
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--guidance_scale", type=float, default=None)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--top_p", type=float, default=0.9)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--repetition_penalty", type=float, default=None)
    p.add_argument("--max_new_tokens", type=int, default=90)
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the text decoding step (GPU, 13B: 1.3-1.4x the tokens/s; compiling "
                        "takes 2-3 minutes)")
    p.add_argument("--min_new_tokens", type=int, default=7, help="the original's min_length 8 counts a dummy bos")
    p.add_argument("--num_iter", type=int, default=4, help="rounds per prompt when the prompt gives none")
    p.add_argument("--num_total_token", type=int, default=2048)
    p.add_argument("--auto_end", action="store_true", help="stop a story at a text ending in eos")
    p.add_argument("--force_gen_image_next", action="store_true")
    p.add_argument("--force_replace_gen_text", action="store_true")
    p.add_argument("--out", default="out")
    args = p.parse_args(argv)
    args.dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
    defaults = DEMO_SETTINGS if args.init_from == "demo" else ORIGINAL_SETTINGS
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        samples = load_annt(args.annt)
        model, tokenizer = load_model(args)
    except AnntError as e:
        print(f"sample.py: {e}", file=sys.stderr)
        return 2
    run = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    final = os.path.join(args.out, run)
    tmp = final + ".tmp"
    os.makedirs(tmp)
    try:
        stories = []
        for i, s in enumerate(samples):
            generated = run_story(model, tokenizer, s, i, args, tmp, args.seed)
            prompt = {k: s[k] for k in ("sentences", "images", "sentence_ixs", "image_first", "generate_mode")}
            stories.append({"prompt": prompt, "generated": generated})
        with open(os.path.join(tmp, "result.json"), "w", encoding="utf-8") as f:
            json.dump({"init_from": args.init_from, "seed": args.seed, "sampler": args.sampler, "steps": args.steps,
                       "stories": stories}, f, indent=1)
        write_page(os.path.join(tmp, "index.html"), stories)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"wrote {os.path.abspath(os.path.join(final, 'index.html'))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
