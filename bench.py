"""Benchmarks for mmi, one section a command, in this order in the file:

    kernel   kernels.cu's deformable attention against the grid_sample reference and the original's op (CUDA)
    gemv     the decoding matmuls, kernels.cu's GEMV (bf16, int8, int4) against cuBLAS (CUDA)
    train    train.py's loop at paper size with random weights: step time, samples/s, MFU, memory
    sample   generation at paper size with random weights: tokens/s, one image's time, memory
    decode   where a decoding step's time goes (torch.profiler)
    quant    the rounding error of weight-only quantization, and the demo model's captions quantized
    data     the demo corpus stream on one CPU core

train, sample, decode and quant take --preset=tiny to check the plumbing on a CPU. Each section is a function
`bench_<name>(args)`, listed in SECTIONS.
"""
import argparse
import dataclasses
import datetime
import gc
import inspect
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

import mmi
from mmi import ms_deform_attn, ms_deform_attn_reference

# (name, B, Q, heads M, head dim D, levels [(H, W)], points P,
#  original op on an H100 in ms: forward, forward+backward, then grid_sample's: forward, forward+backward)
KERNEL_SHAPES = [
    ("LLM-MMFS 8 img", 2, 2048, 16, 64, [(32, 32), (16, 16), (8, 8)] * 8, 8, 2.27, 11.2, 13.7, 57.0),
    ("LLM-MMFS 2 img", 4, 2048, 16, 64, [(32, 32), (16, 16), (8, 8)] * 2, 8, 1.16, 5.49, 7.9, 27.8),
    ("UNet-MMFS blk1", 8, 4096, 16, 64, [(64, 64), (32, 32), (16, 16), (8, 8)], 8, 3.06, 14.8, 21.6, 74.3),
    ("speed test", 32, 128, 8, 128, [(16, 16), (8, 8)], 64, 1.48, 6.45, 6.3, 28.8),
    ("adapter inject", 16, 256, 16, 32, [(32, 32), (16, 16), (8, 8)], 4, 0.113, 0.477, 0.79, 2.0),
    ("adapter extract", 16, 1344, 16, 32, [(16, 16)], 4, 0.211, 0.708, 0.94, 3.5),
]
# forward+backward must beat the original by this factor; 1 means 'faster than it'.
KERNEL_TARGET_SPEEDUP = {"LLM-MMFS 8 img": 3.0, "LLM-MMFS 2 img": 3.0, "UNet-MMFS blk1": 3.0}


def cuda_time_ms(fn, warmup=5, reps=30):
    """Median of CUDA-event timings of fn() after warm-up."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth_gbs():
    """Device-to-device copy rate (bytes read + written), the card's practical memory ceiling."""
    src = torch.empty(2 ** 28, dtype=torch.float32, device="cuda").uniform_()
    dst = torch.empty_like(src)
    ms = cuda_time_ms(lambda: dst.copy_(src), warmup=3, reps=20)
    return 2 * src.numel() * 4 / ms / 1e6


def msda_inputs(B, Q, M, D, shapes, P, dtype, seed):
    """Random inputs as the original speed test draws them: locations U(0,1), weights softmaxed per head."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    L, S = len(shapes), sum(h * w for h, w in shapes)
    value = torch.randn(B, S, M, D, device="cuda", generator=gen).to(dtype)
    loc = torch.rand(B, Q, M, L, P, 2, device="cuda", generator=gen).to(dtype)
    attn = torch.randn(B, Q, M, L * P, device="cuda", generator=gen).softmax(-1).view(B, Q, M, L, P).to(dtype)
    spatial_shapes = torch.tensor(shapes, dtype=torch.int64, device="cuda")
    sizes = spatial_shapes.prod(1)
    return value, spatial_shapes, torch.cumsum(sizes, 0) - sizes, loc, attn


def msda_min_bytes(B, Q, M, D, S, L, P, itemsize):
    """Fewest bytes each pass must move: inputs read once, outputs written once."""
    samples = B * Q * M * L * P
    fwd = (B * S * M * D + samples * 3 + B * Q * M * D) * itemsize
    bwd = fwd + (B * Q * M * D + B * S * M * D + samples * 3) * itemsize  # + grad_out read, grads written
    return fwd, bwd


def time_msda(fn, B, Q, M, D, shapes, P, dtype, backward, n_sets=3):
    """Median ms of fn over `n_sets` rotating input sets (so L2 does not hold the last call's data)."""
    sets = [msda_inputs(B, Q, M, D, shapes, P, dtype, seed) for seed in range(n_sets)]
    grads = [torch.randn(B, Q, M * D, device="cuda", dtype=dtype) for _ in range(n_sets)]
    if backward:
        for value, _, _, loc, attn in sets:
            for t in (value, loc, attn):
                t.requires_grad_()
    step = [0]

    def run():
        value, shapes_t, starts, loc, attn = sets[step[0] % n_sets]
        out = fn(value, shapes_t, starts, loc, attn)
        if backward:
            torch.autograd.grad(out, (value, loc, attn), grads[step[0] % n_sets])
        step[0] += 1

    slow = fn is ms_deform_attn_reference
    return cuda_time_ms(run, warmup=2 if slow else 10, reps=10 if slow else 50)


def accuracy_rows():
    """Relative errors of the kernel vs float64 at an MMFS-like case (outside points, a masked image)."""
    shapes = [(32, 32), (16, 16), (8, 8), (1, 1)] * 3
    rows = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        value, sh, st, loc, attn = msda_inputs(2, 300, 16, 64, shapes, 8, torch.float64, seed=11)
        loc = loc * 1.3 - 0.15
        attn[0, :, :, 8:] = 0  # batch 0: third image masked out
        gen = torch.Generator(device="cuda").manual_seed(5)
        grad = torch.randn(2, 300, 16 * 64, device="cuda", dtype=torch.float64, generator=gen)
        ref_in = [t.clone().requires_grad_() for t in (value.to(dtype).double(), loc.to(dtype).double(),
                                                         attn.to(dtype).double())]
        ref_out = ms_deform_attn_reference(ref_in[0], sh, st, ref_in[1], ref_in[2])
        ref = [ref_out, *torch.autograd.grad(ref_out, ref_in, grad)]
        kernel = mmi.load_kernels()
        args = (value.to(dtype), sh, st, loc.to(dtype), attn.to(dtype))
        got = [kernel.forward(*args, poison=True), *kernel.backward(*args, grad.to(dtype), poison=True)]
        errs = [((g.double() - r).norm() / r.norm()).item() for g, r in zip(got, ref)]
        rows.append((str(dtype).replace("torch.", ""), errs))
    return rows


def require_kernels(section):
    """kernels.cu built and a GPU to run it on, or one line naming the section."""
    if not torch.cuda.is_available():
        raise mmi.InputError(f"{section}: needs a CUDA device")
    if mmi.load_kernels() is None:
        raise mmi.InputError(f"{section}: kernels.cu unavailable (the warning above says why)")


def bench_kernel(args):
    require_kernels("kernel")
    card = torch.cuda.get_device_name()
    copy_gbs = copy_bandwidth_gbs()
    print(f"card: {card}; device-to-device copy {copy_gbs:.0f} GB/s (read+write)")

    print("\naccuracy vs float64 reference, ||x-ref||/||ref|| (2x300 queries, 16 heads, D 64, 12 levels, P 8)")
    print(f"{'dtype':>9} {'out':>9} {'d value':>9} {'d loc':>9} {'d weight':>9}")
    for name, errs in accuracy_rows():
        print(f"{name:>9} " + " ".join(f"{e:9.2e}" for e in errs))

    print(f"\ntimes in ms (median of CUDA events); speed-up and bandwidth are for bf16 fwd+bwd; card: {card}")
    head = (f"{'shape':<16}{'bf16 fwd':>9}{'bf16 f+b':>9}{'fp32 fwd':>9}{'fp32 f+b':>9}{'gs fwd':>8}{'gs f+b':>8}"
            f"{'orig fwd':>9}{'orig f+b':>9}{'x orig':>7}{'target':>7}{'GB/s':>7}{'ok':>4}")
    print(head)
    all_ok = True
    for name, B, Q, M, D, shapes, P, o_f, o_fb, g_f, g_fb in KERNEL_SHAPES:
        if args.only and args.only not in name:
            continue
        dims = (B, Q, M, D, shapes, P)
        t = {}
        for dtype in (torch.bfloat16, torch.float32):
            for backward in (False, True):
                t[dtype, backward] = time_msda(ms_deform_attn, *dims, dtype, backward)
        gs = {bw: (time_msda(ms_deform_attn_reference, *dims, torch.float32, bw) if not args.skip_reference
                   else float("nan")) for bw in (False, True)}
        S = sum(h * w for h, w in shapes)
        _, bytes_fb = msda_min_bytes(B, Q, M, D, S, len(shapes), P, 2)
        speedup = o_fb / t[torch.bfloat16, True]
        target = KERNEL_TARGET_SPEEDUP.get(name, 1.0)
        ok = speedup >= target
        all_ok &= ok
        print(f"{name:<16}{t[torch.bfloat16, False]:9.3f}{t[torch.bfloat16, True]:9.3f}{t[torch.float32, False]:9.3f}"
              f"{t[torch.float32, True]:9.3f}{gs[False]:8.2f}{gs[True]:8.2f}{o_f:9.3f}{o_fb:9.3f}"
              f"{speedup:7.2f}{target:7.1f}{bytes_fb / t[torch.bfloat16, True] / 1e6:7.0f}{'yes' if ok else 'NO':>4}")
    print(f"\nGB/s = fewest bytes of fwd+bwd (inputs read once, outputs written once) / time; the card's copy rate "
          f"is {copy_gbs:.0f} GB/s (H100 SXM datasheet 3350). 'orig' = Deformable-DETR's op on an H100, fp32, "
          f"measured once (KERNEL_SHAPES); 'gs' = the grid_sample reference, fp32, measured here.")
    print("all targets met" if all_ok else "SOME TARGETS MISSED")


@torch.no_grad()
def bench_gemv(args):
    """A decoding step's matmuls at the preset's sizes: kernels.cu's gemv on bf16, int8 and int4 weights (groups
    of 128), through mmi.linear as the model calls it (q, k, v and gate, up with their block's RMSNorm folded in),
    against the RMSNorm and F.linear (cuBLAS) on bf16, one bf16 row. Each is timed inside a CUDA graph of 24 calls,
    as decoding replays them, cycling over 8 copies of the weights so that L2 never holds them; TB/s = bytes of the
    weights (and scales) read / time."""
    require_kernels("gemv")
    llm = mmi.MMIConfig.from_preset(args.preset).llm
    d, f, V, dtype = llm.hidden_size, llm.intermediate_size, llm.vocab_size, torch.bfloat16
    # (name, N, K, layers sharing the input, bias, glu, pre-norm, calls per token)
    cases = [("q, k, v + norm", d, d, 3, False, False, True, llm.num_hidden_layers),
             ("o_proj", d, d, 1, False, False, False, llm.num_hidden_layers),
             ("gate, up + norm", f, d, 2, False, True, True, llm.num_hidden_layers),
             ("down_proj", d, f, 1, False, False, False, llm.num_hidden_layers),
             ("text head", V, d, 1, True, False, False, 1)]

    def ours(x, layers, glu, norm):
        return mmi.linear(x, *layers, glu=glu, norm=norm)

    def cublas(x, layers, glu, norm):
        x = x if norm is None else norm(x)
        outs = [F.linear(x, layer.weight, layer.bias) for layer in layers]
        return F.silu(outs[0]) * outs[1] if glu else outs

    def weight_bytes(layers):
        """What one call reads of its weights: a QuantizedLinear's int8/int4 weight and scales, else bf16."""
        return (sum(b.numel() * b.element_size() for layer in layers for b in layer.buffers() if b.dim() == 2)
                or sum(layer.weight.numel() * 2 for layer in layers))

    def graphed_ms(fn, x, copies, glu, norm, calls=24):
        graph, _ = mmi.capture_cuda_graph(lambda: [fn(x, copies[i % len(copies)], glu, norm) for i in range(calls)])
        return cuda_time_ms(graph.replay, warmup=3, reps=20) / calls

    card = torch.cuda.get_device_name()
    print(f"decoding matmuls, {args.preset}, {card}, 1 bf16 row, us per call (TB/s of weights)")
    columns = ("gemv bf16", "gemv int8", "gemv int4", "F.linear")
    print(f"{'matmul':<16}{'N x K':>14}" + "".join(f"{k:>18}" for k in columns))
    token = dict.fromkeys(columns, 0.0)
    for name, N, K, n, bias, glu, prenorm, per_token in cases:
        copies = [[torch.nn.Linear(K, N, bias=bias, device="cuda", dtype=dtype) for _ in range(n)] for _ in range(8)]
        x = torch.randn(1, K, device="cuda", dtype=dtype)
        norm = mmi.RMSNorm(K).to("cuda", dtype) if prenorm else None
        t, gb = {}, {}
        for k, bits in zip(columns, (None, 8, 4, None)):
            layers = copies if bits is None else [[mmi.QuantizedLinear.from_linear(layer, bits) for layer in group]
                                                   for group in copies]
            t[k] = graphed_ms(cublas if k == "F.linear" else ours, x, layers, glu, norm)
            gb[k] = weight_bytes(layers[0]) / 1e9
            token[k] += per_token * t[k]
            del layers
        print(f"{name:<16}{f'{n} x {N} x {K}':>14}" + "".join(f"{1000 * t[k]:10.1f} ({gb[k] / t[k]:4.2f})"
                                                              for k in columns))
        del copies
    print(f"the LLM's matmuls for one token ({llm.num_hidden_layers} layers + head), ms: "
          + ", ".join(f"{k} {token[k]:.2f}" for k in columns))


def matmul_peak_tflops(n=8192, dtype=torch.bfloat16):
    """The card's practical bf16 peak: a large square matmul, timed here (the MFU denominator)."""
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    ms = cuda_time_ms(lambda: a @ b, warmup=10, reps=50)
    return 2 * n ** 3 / ms / 1e9


# Fine-tuning recipes, benched on synthetic rows of their shape: name -> (config file, images per row, text tokens
# before each image). "storytelling" is configs/sft_vist_13b.py's run on VIST (data.story_dataset): a row is one
# story, bos then 5 frames of "caption<soi><image>..." (multi_modal context), every image a target of the image loss,
# no eos; the loss weights come from the config's finetune_args (or story_dataset's defaults: no text loss). The
# caption length is an assumption: 20 tokens, one sentence per frame.
RECIPES = {"storytelling": ("configs/sft_vist_13b.py", 5, 20)}


def bench_train(args):
    """Training throughput at paper size with random weights: by default the pretraining recipe, the
    paper's frozen set, rows of 2048 tokens, 4 rows per GPU with 6 images each (224 for the encoder, 512 for the
    decoder), activation checkpointing, bf16. `--recipe=storytelling` runs its config file (trainable set, loss
    weights, rows per GPU from finetune_args) on synthetic rows shaped as RECIPES says; `--lora_rank=N` adds LoRA
    to the LLM with all else frozen (mmi.add_lora). Runs train.py's own loop on synthetic rows; MFU against the
    matmul peak measured in the same run. Under `torchrun --nproc_per_node=N bench.py train` it is FSDP over N GPUs
    (rows per GPU as given); rank 0 reports. `--preset=tiny` checks the plumbing on a CPU. -> the run's metrics rows
    (rank 0; the run's folder is removed)."""
    import data
    import train
    cuda = torch.cuda.is_available()
    out = tempfile.mkdtemp(prefix="bench_train_")
    frozen_dtype = args.frozen_dtype if cuda else "float32"      # a CPU computes in float32, frozen weights too
    if args.recipe == "pretrain":
        config = os.path.join(out, "bench.py")
        open(config, "w").close()                                  # an empty config file: all settings are flags
        per_gpu, (seq_len, images) = args.rows or 4, (2048, 6) if args.preset == "mmi-13b" else (128, 2)
        recipe_argv = []
    else:
        path, images, caption = RECIPES[args.recipe]
        config = os.path.join(os.path.dirname(os.path.abspath(__file__)), path)
        finetune_args = train.load_config([config]).finetune_args
        defaults = {k: p.default for k, p in inspect.signature(data.story_dataset).parameters.items()}
        weights = {k: finetune_args.get(k, defaults[k]) for k in ("loss_txt_weight", "loss_img_weight")}
        per_gpu = args.rows or finetune_args.get("batch_size", defaults["batch_size"])
        seq_len = 1 + images * (caption + 1 + mmi.MMIConfig.from_preset(args.preset).num_img_token)
        # random weights (no init_from); the loss weights that the dataset's batches would carry, as model defaults
        recipe_argv = ["--init_from=", *(f"--model.{k}={v}" for k, v in weights.items() if v is not None)]
    argv = [f"--preset={args.preset}", "--data=synthetic", f"--seq_len={seq_len}", f"--images_per_row={images}",
            f"--batch_size={per_gpu}", f"--max_steps={args.steps}", "--warmup_steps=1", "--log_interval=1",
            "--eval_interval=0", "--ckpt_interval=-1", "--export=false", "--progress=false", f"--out_dir={out}",
            "--activation_checkpointing=true", f"--frozen_dtype={frozen_dtype}", f"--compile={args.compile}",
            f"--lora_rank={args.lora_rank}", f"--device={'cuda' if cuda else 'cpu'}",
            f"--init_device={'cuda' if cuda else 'cpu'}", f"--dtype={'bfloat16' if cuda else 'float32'}", *recipe_argv]
    tc = train.load_config([config, *argv])
    with torch.device("meta"):                                     # what trains, counted without drawing weights
        model = train.build_mmi(dataclasses.replace(tc, compile=False), train.model_config(tc), torch.device("meta"))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    del model
    peak = matmul_peak_tflops() if cuda else float("nan")
    argv.append(f"--peak_flops={peak * 1e12 if cuda else 1.0}")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    gc_passes = []                       # (end, seconds) of each full garbage collection: the whole process stops

    def time_gc(phase, info):
        if info["generation"] == 2:
            if phase == "start":
                time_gc.start = time.time()
            else:
                gc_passes.append((time.time(), time.time() - time_gc.start))
    gc.callbacks.append(time_gc)
    t = time.perf_counter()
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    try:
        code = train.main([config, *argv])
        if code:                            # interrupted: train.py said so; no figures from part of a run
            sys.exit(code)
        total = time.perf_counter() - t
        rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))] if rank == 0 else None
    finally:
        gc.callbacks.remove(time_gc)
        shutil.rmtree(out, ignore_errors=True)
    if rank != 0:                                                  # rank 0 wrote the metrics and reports
        return
    steady = rows[2 if args.compile else 1:] or rows               # the first steps include warm-up (compilation)
    seconds = sum(r["time_s"] for r in steady)     # rates are work / time over all these steps together: a mean of
    step_s = seconds / len(steady)                 # per-step rates would make light of one slow step
    samples = sum(r["samples_per_s"] * r["time_s"] for r in steady) / seconds
    mfu = sum(r["mfu"] * r["time_s"] for r in steady) / seconds
    card = torch.cuda.get_device_name() if cuda else "cpu"
    gpus = f"{world} x {card} (FSDP)" if world > 1 else card
    lora = f"LoRA rank {args.lora_rank}" if args.lora_rank else "no LoRA"
    print(f"train {args.recipe}, {lora}, {args.preset}, {gpus}: {per_gpu} rows x {seq_len} tokens per "
          f"{'GPU' if cuda else 'process'}, {images} images/row, {trainable:,} trainable parameters, activation "
          f"checkpointing, frozen weights in {frozen_dtype}" + (", blocks compiled" if args.compile else ""))
    mfu_text = f"MFU {100 * mfu:.1f}% of the measured matmul peak {peak:.0f} TFLOP/s" if cuda else "MFU n/a on a CPU"
    mfu_text += " (LoRA's matmuls not counted)" if args.lora_rank and cuda else ""
    mem_text = (f"peak memory {torch.cuda.max_memory_allocated() / 2 ** 30:.1f} GiB on rank 0" if cuda else
                "peak memory n/a on a CPU")
    print(f"  step {step_s:.3f} s, {samples:.2f} samples/s in all, {mfu_text}, {mem_text}, whole run {total:.0f} s")
    print("  step times (s): " + " ".join(f"{r['time_s']:.3f}" for r in rows)
          + f" (the mean is over the last {len(steady)})")
    # the two causes of a step much slower than the rest, shown beside the step times: the full garbage collections
    # inside it (they stop the whole process) and, on CUDA, the caching allocator's retries (it frees its cache and
    # tries again when a cudaMalloc fails: fragmentation)
    in_gc = [sum(s for end, s in gc_passes if r["wall_time"] - r["time_s"] < end <= r["wall_time"]) for r in rows]
    print("  of which full garbage collections (s): " + " ".join(f"{s:.3f}" for s in in_gc) +
          (f"; CUDA allocator retries: {torch.cuda.memory_stats().get('num_alloc_retries', 0)}, most reserved "
           f"{torch.cuda.max_memory_reserved() / 2 ** 30:.1f} GiB on rank 0" if cuda else ""))
    return rows


def device_and_dtype():
    """-> (cuda, device, dtype): bf16 on a GPU, float32 on a CPU."""
    cuda = torch.cuda.is_available()
    return cuda, "cuda" if cuda else "cpu", torch.bfloat16 if cuda else torch.float32


def random_model_and_prompts(args):
    """The --preset model with random weights (--quantize applied) as device_and_dtype() says, and two prompts: text
    and an image (for images), then the same with ten more text tokens after the image (for text)."""
    cuda, device, dtype = device_and_dtype()
    cfg = mmi.MMIConfig.from_preset(args.preset)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)                 # build straight into the target dtype on the device
    try:
        with torch.device(device):
            model = mmi.MMInterleaved(cfg).eval()
    finally:
        torch.set_default_dtype(default)
    model.to(dtype)
    if args.quantize != "none":
        mmi.quantize(model, bits=int(args.quantize[3:]))
    if cuda:   # as sample.py: the UNet's convolutions in NHWC, cuDNN's layout for half precision
        model.image_decoder.decoder.unet.to(memory_format=torch.channels_last)
    S = cfg.vision.image_size
    ids = [cfg.bos_token_id] + list(range(3, 33)) + [cfg.soi_token_id] + [cfg.image_token_id] * cfg.num_img_token
    prompt = {"text_ids": torch.tensor([ids], device=device), "image_tensors": torch.rand(1, 3, S, S, device=device),
              "num_image_per_seq": torch.tensor([1], device=device)}
    return model, prompt, dict(prompt, text_ids=torch.tensor([ids + list(range(40, 50))], device=device))


@torch.no_grad()
def bench_sample(args):
    """Generation at paper size with random weights: greedy text decoding through the static KV cache
    (tokens/s, prefill and graph capture excluded; the step compiled inside its CUDA graph, the CUDA graph alone and,
    to compare, eager), one 512x512 image with 30 DDPM steps and CFG including the LLM context pass and the
    UNet-MMFS (each step's UNet pass replayed from a CUDA graph, and eager), and peak memory: of the fast path's
    text and image together (the loop sample.py runs on a GPU), and of the plain path's apart.
    `--preset=tiny` checks the plumbing on a CPU (eager only); `--quantize=int8|int4` quantizes the weights of
    mmi.quantize_targets after the model is built (mmi.quantize)."""
    cuda, _, dtype = device_and_dtype()
    model, prompt, text_prompt = random_model_and_prompts(args)
    cfg = model.cfg

    def timed(fn):
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    n = args.new_tokens

    def stamp():
        if not cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(a, b):
        return b - a if not cuda else a.elapsed_time(b) / 1000

    def tokens_per_s(fast, compile=False):
        """Steady-state decoding: n steps timed from the end of the first step (its capture excluded) to the end
        of the last, by stamps queued after each step (CUDA events: time the GPU spends waiting for the host
        counts); the best of 3 runs. Also the time of prefill + first step."""
        decode = lambda k: model.generate_texts(text_prompt, max_new_tokens=k, min_new_tokens=k, num_beams=1,
                                                fast=fast, compile=compile)
        decode(3)                                                              # warm-up (and compilation)
        t_first = min(timed(lambda: decode(2)) for _ in range(3))             # prefill + capture + one step
        decoder = mmi.FastDecoder if fast else mmi._Decoder
        stamps, step = [], decoder.step

        def stamped_step(decoder, tokens):
            logits = step(decoder, tokens)
            stamps.append(stamp())
            return logits

        decoder.step = stamped_step
        try:
            runs = []
            for _ in range(3):
                stamps.clear()
                timed(lambda: decode(n + 2))                                   # n + 1 steps
                runs.append(seconds(stamps[0], stamps[-1]))
        finally:
            decoder.step = step
        return n / min(runs), t_first

    if cuda:
        t = time.perf_counter()
        compiled_s, _ = tokens_per_s(fast=True, compile=True)
        compile_s = time.perf_counter() - t
    tok_s, t_first = tokens_per_s(fast=cuda)

    def image_s(fast):
        image = lambda: model.generate_images(prompt, steps=30, guidance_scale=7.5, sampler="ddpm", seed=0,
                                              progress=False, fast=fast)
        image()                                                                # warm-up
        return min(timed(image) for _ in range(2))

    t_image = image_s(fast=None)
    # the interleaved loop as sample.py runs it on a GPU (text, then an image, both fast) sets one peak; the plain
    # path, a reference that is not run for speed, the other
    if cuda:
        mem = torch.cuda.max_memory_allocated() / 2 ** 30
        torch.cuda.reset_peak_memory_stats()
        plain_tok_s, t_first_plain = tokens_per_s(fast=False)
        t_image_plain = image_s(fast=False)
        mem_plain = torch.cuda.max_memory_allocated() / 2 ** 30
    card = torch.cuda.get_device_name() if cuda else "cpu"
    text = (f"{compiled_s:.1f} tokens/s fast path compiled (compilation and warm-up {compile_s:.0f} s), "
            f"{tok_s:.1f} fast path (CUDA graph), {plain_tok_s:.1f} plain path (prefill + first step, excluded: "
            f"{1000 * t_first:.0f} ms fast, {1000 * t_first_plain:.0f} ms plain)" if cuda else
            f"{tok_s:.1f} tokens/s plain path (prefill + first step {1000 * t_first:.0f} ms excluded)")
    image = (f"{t_image:.2f} s fast path (each step's UNet pass a CUDA graph), {t_image_plain:.2f} s plain path"
             if cuda else f"{t_image:.2f} s")
    print(f"sample, {args.preset}, {card}, {dtype}, quantize {args.quantize}: text {text}, greedy, static KV "
          f"cache, batch 1; one {cfg.image_decoder.image_size}px image, 30 DDPM steps with CFG, LLM pass and VAE "
          f"included: {image}; " + (f"peak memory {mem:.1f} GiB fast path, {mem_plain:.1f} GiB plain path" if cuda else
                                   "peak memory n/a on a CPU"))


@torch.no_grad()
def bench_decode(args):
    """Where a decoding step's time goes: bench.py sample's text prompt, then --steps steps of the fast path's
    cached step (compiled with --compile) without its CUDA graph, so that torch.profiler sees each kernel (inside
    the graph they are the same kernels, launched at once). -> the kernels by device time per step, on a CPU the ops
    by CPU time; with the sum per step beside the step's wall time."""
    cuda, _, dtype = device_and_dtype()
    model, _, prompt = random_model_and_prompts(args)
    num = model.validate_batch(prompt)
    embeds, vision, xmask, _ = model.prepare_mm_embeds(prompt["text_ids"], prompt["image_tensors"], num)
    n = args.steps
    decoder = mmi.FastDecoder(model, embeds, torch.ones_like(prompt["text_ids"]), vision, xmask, n + 4,
                              cuda_graph=False, compile=args.compile)
    token = prompt["text_ids"][:, -1]
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    activities = [torch.profiler.ProfilerActivity.CUDA if cuda else torch.profiler.ProfilerActivity.CPU]
    decoder.prefill()
    for _ in range(3):                                                         # warm-up (and compilation)
        decoder.step(token)
    sync()
    with torch.profiler.profile(activities=activities) as prof:
        t = time.perf_counter()
        for _ in range(n):
            decoder.step(token)
        sync()
        wall = (time.perf_counter() - t) / n
    kind = torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU
    events = [e for e in prof.key_averages() if e.device_type == kind]
    own = (lambda e: e.self_device_time_total) if cuda else (lambda e: e.self_cpu_time_total)
    events = sorted((e for e in events if own(e) > 0), key=own, reverse=True)
    total = sum(own(e) for e in events) / n                                   # microseconds per step
    card = torch.cuda.get_device_name() if cuda else "cpu"
    print(f"decode, {args.preset}, {card}, {dtype}, quantize {args.quantize}, "
          f"{'compiled' if args.compile else 'eager'}: one step {1000 * wall:.2f} ms wall "
          f"without its CUDA graph (profiled), {total / 1000:.2f} ms in {'kernels' if cuda else 'ops'}")
    print(f"| {'kernel' if cuda else 'op'} | per step | us per step | share |\n|---|---:|---:|---:|")
    for e in events[:args.top]:
        print(f"| {e.key[:90]} | {e.count / n:g} | {own(e) / n:.1f} | {100 * own(e) / n / total:.1f}% |")


def quant_matmul_error(weight, x, bits, group_size=128, rows_per_chunk=4096):
    """||x Wq^T - x W^T|| / ||x W^T|| in float64 for one weight W (N, K) and activation rows x (B, K), Wq the
    weight of mmi.QuantizedLinear at `bits` (int8 per output row, int4 in groups of group_size) as it computes
    with it, dequantize(); W's rows taken rows_per_chunk at a time in float64 (a 13B text head is 1.3 GB so)."""
    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    linear.weight = torch.nn.Parameter(weight, requires_grad=False)
    wq = mmi.QuantizedLinear.from_linear(linear, bits, group_size).dequantize()
    x = x.to(weight.device, torch.float64)
    diff = ref = 0.0
    for i in range(0, weight.shape[0], rows_per_chunk):
        y = x @ weight[i:i + rows_per_chunk].double().T
        diff += (x @ wq[i:i + rows_per_chunk].double().T - y).square().sum().item()
        ref += y.square().sum().item()
    return (diff / ref) ** 0.5


# Short names of quantize_targets' layers in `bench.py quant`'s table: a layer's name after its block's index
QUANT_LAYER_NAMES = {
    "self_attn.q_proj": "q", "self_attn.k_proj": "k", "self_attn.v_proj": "v", "self_attn.o_proj": "o",
    "mlp.gate_proj": "gate", "mlp.up_proj": "up", "mlp.down_proj": "down", "text_decoder.head": "text head",
    "attention.attention.query": "q", "attention.attention.key": "k", "attention.attention.value": "v",
    "attention.output.dense": "o", "crossattention.attention.query": "cross q", "crossattention.attention.key":
    "cross k", "crossattention.attention.value": "cross v", "crossattention.output.dense": "cross o",
    "intermediate_query.dense": "mlp in", "output_query.dense": "mlp out",
    "llama_cross_attn.attn.dynamic_offset_mask": "MMFS query", "llama_cross_attn.attn.output_proj": "MMFS out"}


def quant_shapes(cfg):
    """The layers of mmi.quantize_targets at cfg, one row per distinct (part of the model, N x K): (part, the
    layers' short names, N, K, how many layers)."""
    parts = {"mm_decoder": "LLM", "text_decoder": "LLM", "visual_tokenizer": "visual tokenizer Q-Former",
             "image_decoder": "image decoder Q-Former"}
    with torch.device("meta"):
        model = mmi.MMInterleaved(cfg)
    rows = {}
    for name in mmi.quantize_targets(model):
        layer = model.get_submodule(name)
        key = (parts[name.split(".")[0]], layer.out_features, layer.in_features)
        short = re.split(r"\.\d+\.", name)[-1]
        short = QUANT_LAYER_NAMES.get(short, short)
        names, count = rows.get(key, ([], 0))
        rows[key] = (names + [short] * (short not in names), count + 1)
    return [(part, ", ".join(names), N, K, count) for (part, N, K), (names, count) in rows.items()]


def quant_layer_errors(cfg, device, dtype, rows=4, seed=0):
    """quant_matmul_error at int8 and int4 for each of quant_shapes(cfg): weights N(0, 0.02) in `dtype` (the
    dtype the model runs in: its scales are rounded to it too) and `rows` activation rows N(0, 1), drawn on the
    CPU from fixed seeds (the same on any device), one layer at a time. -> [(*quant_shapes row, err8, err4)]"""
    out = []
    for part, leaves, N, K, count in quant_shapes(cfg):
        gen = torch.Generator().manual_seed(seed)
        weight = (0.02 * torch.randn(N, K, generator=gen)).to(device, dtype)
        x = torch.randn(rows, K, generator=gen)
        out.append((part, leaves, N, K, count, *(quant_matmul_error(weight, x, bits) for bits in (8, 4))))
        del weight
    return out


def token_agreement(ref, got):
    """Token id lists, position by position against the reference -> (the fraction of the reference's tokens
    before each list's first difference, the fraction of lists equal to theirs)."""
    same = 0
    for a, b in zip(ref, got):
        same += next((i for i, (u, v) in enumerate(zip(a, b)) if u != v), min(len(a), len(b)))
    return same / sum(len(a) for a in ref), sum(a == b for a, b in zip(ref, got)) / len(ref)


@torch.no_grad()
def bench_quant(args):
    """Accuracy of weight-only quantization (mmi.quantize): each quantized matmul's relative error at the preset's
    shapes with random weights, and the embedded demo model's greedy captions (eval.py's demo task: the first
    image of its 40 test stories) quantized against unquantized. On a GPU in bf16, on a CPU in float32."""
    import data
    import eval as ev
    cuda, device, dtype = device_and_dtype()
    machine = torch.cuda.get_device_name() if cuda else f"cpu, {torch.get_num_threads()} threads"
    dtype_name = str(dtype).replace("torch.", "")
    print(f"quant, {args.preset}, {machine}, {dtype_name}, {datetime.date.today().isoformat()}")
    print(f"\nrelative error of each quantized matmul, ||x Wq^T - x W^T|| / ||x W^T|| in float64; W ~ N(0, 0.02) in "
          f"{dtype_name}, 4 rows x ~ N(0, 1)\n")
    print("| layers | count | N x K | int8 (per row) | int4 (groups of 128) |\n|---|---:|---:|---:|---:|")
    for part, leaves, N, K, count, err8, err4 in quant_layer_errors(mmi.MMIConfig.from_preset(args.preset), device,
                                                                     dtype):
        print(f"| {part} {leaves} | {count} | {N} x {K} | {100 * err8:.2f}% | {100 * err4:.2f}% |")

    tokenizer = data.Tokenizer(data.DEMO_TOKENIZER_PATH)
    stories = [data.make_story(s["seed"]) for s in ev.read_demo(None)]
    captions = {}
    for quantize in ("none", "int8", "int4"):
        model = ev.load_model(ev.DEMO_MODEL, dtype, device, None if quantize == "none" else quantize).eval()
        S = model.cfg.vision.image_size
        captions[quantize] = [ids for i in range(0, len(stories), ev.DEMO_STORIES_PER_CALL)
                              for ids in ev.demo_caption_ids(model, tokenizer, [ev.demo_image(s.scenes[0], S) for s in
                                                             stories[i:i + ev.DEMO_STORIES_PER_CALL]], device)]
    ref = captions["none"]
    print(f"\nthe demo model's greedy captions of the first image of {len(stories)} test stories (eval.py's demo "
          f"task), against the unquantized model's {sum(map(len, ref))} tokens\n")
    print("| quantize | tokens equal up to the first difference | captions equal | first sentences equal (what "
          "the scoreboard parses) |\n|---|---:|---:|---:|")
    first = lambda ids: tokenizer.decode(ids).split(".")[0]
    for quantize in ("int8", "int4"):
        tokens, exact = token_agreement(ref, captions[quantize])
        same_first = sum(first(a) == first(b) for a, b in zip(ref, captions[quantize])) / len(ref)
        print(f"| {quantize} | {100 * tokens:.1f}% | {100 * exact:.1f}% | {100 * same_first:.1f}% |")


def bench_data(args):
    """The demo corpus stream (generate, render, tokenise, pack, collate) on one CPU core, in stories/s, as
    train.py consumes it: rows of 512 tokens, 16 image tokens per image, 64x64 images."""
    import data
    torch.set_num_threads(1)
    tok = data.Tokenizer(data.DEMO_TOKENIZER_PATH)
    n = args.stories
    ds = data.demo_dataset(tok, num_total_token=512, num_img_token=16, batch_size=8, num_stories=n)
    ds.verbose = False
    t0, c0 = time.perf_counter(), time.process_time()
    batches = images = tokens = 0
    for b in ds:
        batches += 1
        images += int(b["num_image_per_seq"].sum())
        tokens += int(b["attention_mask"].sum())
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    print(f"demo stream, one core: {n} stories -> {batches} batches, {images} images, {tokens} tokens")
    print(f"  {n / cpu:,.0f} stories/s, {images / cpu:,.0f} images/s, {tokens / cpu:,.0f} tokens/s of CPU time "
          f"({n / wall:,.0f} stories/s wall)")


SECTIONS = {"kernel": bench_kernel, "gemv": bench_gemv, "train": bench_train, "sample": bench_sample,
            "decode": bench_decode, "quant": bench_quant, "data": bench_data}


def main(argv=None):
    parser = mmi.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("section", choices=sorted(SECTIONS))
    parser.add_argument("--only", default="", help="kernel: run only shapes whose name contains this")
    parser.add_argument("--skip-reference", action="store_true", help="kernel: do not time grid_sample")
    parser.add_argument("--stories", type=int, default=2000, help="data: stories to stream (1 or more)")
    parser.add_argument("--preset", default="mmi-13b", choices=sorted(mmi.PRESETS),
                        help="train / sample / decode / gemv / quant: the model preset (tiny for a CPU check)")
    parser.add_argument("--recipe", default="pretrain", choices=["pretrain", *RECIPES],
                        help="train: the recipe whose rows and trainable set are benched")
    parser.add_argument("--lora_rank", type=int, default=0, help="train: LoRA of this rank on the LLM, all else frozen")
    parser.add_argument("--rows", type=int, default=0,
                        help="train: rows per GPU (per process on a CPU); 0 = the recipe's (pretrain: 4)")
    parser.add_argument("--steps", type=int, default=6, help="train: optimizer steps; decode: steps profiled")
    parser.add_argument("--top", type=int, default=25, help="decode: kernels listed")
    parser.add_argument("--frozen_dtype", default="bfloat16", choices=["bfloat16", "float32"],
                        help="train: storage dtype of the frozen weights (on a CPU always float32)")
    parser.add_argument("--new_tokens", type=int, default=128, help="sample: tokens to decode")
    parser.add_argument("--quantize", default="none", choices=["none", "int8", "int4"],
                        help="sample, decode: weight-only quantization of the LLM's matmuls, text head and Q-Formers")
    parser.add_argument("--compile", action="store_true",
                        help="train: torch.compile the repeated blocks; decode: the step")
    args = parser.parse_args(argv)
    for name, low in (("stories", 1), ("lora_rank", 0), ("rows", 0), ("steps", 1), ("top", 1), ("new_tokens", 1)):
        if getattr(args, name) < low:
            raise mmi.InputError(f"--{name}={getattr(args, name)}: expected an integer >= {low}")
    if args.section in ("train", "sample", "decode") and args.preset == "mmi-13b" and not torch.cuda.is_available():
        raise mmi.InputError(f"{args.section}: the mmi-13b preset runs on a GPU (in float32 on a CPU it needs about "
                             f"60 GB of memory); --preset=tiny checks the plumbing on a CPU")
    SECTIONS[args.section](args)


if __name__ == "__main__":
    sys.exit(mmi.run_script(main))
