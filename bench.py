"""
Speed and memory, ours against the reference libraries on the same work, side by side in one run.

    python bench.py                 # every entry
    python bench.py --only llama    # entries whose name contains "llama"

Same weights, same threads; ours and the reference alternate, each timing is the median of its repeats, and the ratio
printed is reference time / our time (above 1.0: we are faster). Memory is measured in a fresh subprocess.
The reference side is built in tests/reference.py with the libraries of requirements-dev.txt (transformers, diffusers,
open_clip), which the project itself never imports.
"""

import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

import cli

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "tests"))  # tests/reference.py


def side_by_side(name, ours, ref, repeats=5, warmup=1, unit="s"):
    """Run ours() and ref() alternately; report the median of each and the ratio ref / ours."""
    for _ in range(warmup):
        ours(), ref()
    t_ours, t_ref = [], []
    for _ in range(repeats):
        for fn, acc in ((ours, t_ours), (ref, t_ref)):
            t0 = time.perf_counter()
            fn()
            acc.append(time.perf_counter() - t0)
    o, r = statistics.median(t_ours), statistics.median(t_ref)
    return dict(name=name, ours=o, ref=r, ratio=r / o, unit=unit)


# ----------------------------------------------------------------------------------------------------------------------
# LLaMA (issue 2)

def _llama_pair(seed=0):
    """A ~100M-parameter LLaMA, random weights, as transformers and as ours (loaded from the same saved folder)."""
    import llm
    import reference
    torch.manual_seed(seed)
    ref = reference.llama(hidden_size=768, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=12,
                          num_key_value_heads=12, vocab_size=32000, max_position_embeddings=1024)
    with tempfile.TemporaryDirectory() as d:
        ref.save_pretrained(d)
        ours = llm.LLaMA.from_pretrained(d)
    return ref, ours


@torch.no_grad()
def bench_llama(repeats=5):
    ref, ours = _llama_pair()
    n_params = sum(p.numel() for p in ours.parameters()) / 1e6
    prompt = torch.randint(3, 32000, (1, 512))

    def ours_prefill():  # what generation does first: fill the cache, logits of the last position only
        ours(prompt, cache=ours.new_cache(1, 512), last_only=True)

    def ref_prefill():
        ref(prompt, use_cache=True, logits_to_keep=1)

    short = torch.randint(3, 32000, (1, 16))

    def ours_decode():
        out = ours.generate(short, max_new_tokens=128)
        assert len(out) == 128

    def ref_decode():
        ref.generate(short, max_new_tokens=128, min_new_tokens=128, do_sample=False, pad_token_id=0)

    rows = [side_by_side(f"llama {n_params:.0f}M fp32 cpu: prefill 512 tokens", ours_prefill, ref_prefill, repeats),
            side_by_side(f"llama {n_params:.0f}M fp32 cpu: decode 128 tokens (16-token prompt)", ours_decode,
                         ref_decode, max(2, repeats // 2))]
    rows[0]["extra"] = f"{512 / rows[0]['ours']:.0f} vs {512 / rows[0]['ref']:.0f} tokens/s"
    rows[1]["extra"] = f"{128 / rows[1]['ours']:.1f} vs {128 / rows[1]['ref']:.1f} tokens/s"
    return rows


def bench_llama_load_memory():
    """Peak resident memory of from_pretrained over the process's memory before loading, / the file's size."""
    import reference
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as d:
        reference.llama(hidden_size=1024, intermediate_size=2816, num_hidden_layers=16, num_attention_heads=16,
                        vocab_size=32000, max_position_embeddings=1024).save_pretrained(d)
        size = os.path.getsize(os.path.join(d, "model.safetensors"))
        tiny = os.path.join(d, "tiny")
        reference.llama(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                        vocab_size=64, max_position_embeddings=1024).save_pretrained(tiny)
        grown = {}
        for who in ("ours", "transformers"):  # each in a fresh process: tests/reference.py measure_load
            out = subprocess.run([sys.executable, os.path.join(HERE, "tests", "reference.py"), d, who, tiny],
                                 capture_output=True, text=True, cwd=HERE, env={**os.environ, "PYTHONPATH": HERE})
            if out.returncode:
                raise RuntimeError(out.stderr)
            grown[who] = int(out.stdout.strip().splitlines()[-1])
    return [dict(name=f"llama from_pretrained peak memory, {size / 2**30:.2f} GiB safetensors",
                 ours=grown["ours"] / size, ref=grown["transformers"] / size,
                 ratio=grown["transformers"] / grown["ours"],
                 unit="x file", extra=f"{grown['ours'] / 2**20:.0f} MiB vs {grown['transformers'] / 2**20:.0f} MiB")]


# ----------------------------------------------------------------------------------------------------------------------
# ImageBind (issue 3)

@torch.no_grad()
def bench_imagebind(repeats=5, width=512, layers=12, heads=8, batch=8):
    """
    The ImageBind vision trunk against open_clip's VisionTransformer with the same weights: ImageBind's vision trunk
    is an OpenCLIP ViT (ViT-H-14 at full size), so the weights map one to one (the 2-frame Conv3d stem on a still
    image = a Conv2d with the two frame kernels summed). Image -> pooled embedding before normalisation, fp32.
    """
    import encoder
    import reference
    torch.manual_seed(0)
    cfg = encoder.ImageBindConfig(vision_dim=width, vision_layers=layers, vision_heads=heads)
    ours = encoder.ImageBind(cfg, modalities=("vision",)).eval()
    ref = reference.vit(image_size=224, patch_size=14, width=width, layers=layers, heads=heads, mlp_ratio=4,
                        output_dim=cfg.out_dim)
    for p in ours.parameters():  # random LayerNorms and biases too, so the agreement check means something
        p.add_(torch.randn_like(p) * 0.02)
    pre, trunk, head = (getattr(ours, n).vision
                        for n in ("modality_preprocessors", "modality_trunks", "modality_heads"))
    w = pre.rgbt_stem.proj[1].weight  # (D, 3, 2, 14, 14)
    sd = {"conv1.weight": w[:, :, 0] + w[:, :, 1], "class_embedding": pre.cls_token[0, 0],
          "positional_embedding": pre.pos_embedding_helper.pos_embed[0],
          "ln_pre.weight": trunk.pre_transformer_layer[0].weight, "ln_pre.bias": trunk.pre_transformer_layer[0].bias,
          "ln_post.weight": head[0].weight, "ln_post.bias": head[0].bias, "proj": head[2].weight.t()}
    names = {"ln_1": "norm_1", "ln_2": "norm_2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
             "attn.out_proj": "attn.out_proj"}
    for i, blk in enumerate(trunk.blocks):
        r = f"transformer.resblocks.{i}."
        sd[r + "attn.in_proj_weight"], sd[r + "attn.in_proj_bias"] = blk.attn.in_proj_weight, blk.attn.in_proj_bias
        for a, b in names.items():
            sd[r + a + ".weight"] = blk.get_submodule(b).weight
            sd[r + a + ".bias"] = blk.get_submodule(b).bias
    ref.load_state_dict({k: v.clone() for k, v in sd.items()}, strict=True)
    x = torch.randn(batch, 3, 224, 224)
    run_ours = lambda: head(trunk(pre(x)))  # noqa: E731  (B, out_dim) before the postprocessor
    err = (run_ours() - ref(x)).abs().max().item()
    assert err < 1e-3, f"ours and open_clip disagree: max abs diff {err}"
    return [side_by_side(f"imagebind vision trunk w{width} L{layers} B{batch} 224px vs open_clip ViT", run_ours,
                         lambda: ref(x), repeats)]


# ----------------------------------------------------------------------------------------------------------------------
# Decoders (issue 4)

@torch.no_grad()
def bench_unet(repeats=5):
    """UNet2D forward in the SD 1.5 layout at reduced width: (64, 128, 256, 256), context 77 x 768, 32 x 32, batch 2."""
    import decoders
    import reference
    torch.manual_seed(0)
    ref = reference.unet(sample_size=32, block_out_channels=(64, 128, 256, 256), cross_attention_dim=768,
                         norm_num_groups=32)
    with tempfile.TemporaryDirectory() as d:
        ref.save_pretrained(d)
        ours = decoders.UNet2D.from_pretrained(d)
    x, ctx, t = torch.randn(2, 4, 32, 32), torch.randn(2, 77, 768), torch.tensor(500)
    return [side_by_side("unet2d SD-layout w64 32x32 B2 forward", lambda: ours(x, t, ctx),
                         lambda: ref(x, t, encoder_hidden_states=ctx), repeats)]


@torch.no_grad()
def bench_image_pipeline(repeats=5, steps=25):
    """A 25-step tiny image pipeline with guidance: generate_image vs StableDiffusionPipeline(prompt_embeds)."""
    import decoders
    import reference
    torch.manual_seed(0)
    unet = reference.unet(
        sample_size=32, block_out_channels=(32, 64, 64), layers_per_block=1, attention_head_dim=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=64,
        norm_num_groups=16)
    vae = reference.vae(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    sched = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", set_alpha_to_one=False,
                 skip_prk_steps=True, steps_offset=1)
    pipe = reference.sd_pipeline(unet, vae, sched)
    with tempfile.TemporaryDirectory() as d:
        unet.save_pretrained(d + "/unet")
        vae.save_pretrained(d + "/vae")
        o_unet, o_vae = decoders.UNet2D.from_pretrained(d + "/unet"), decoders.VAE.from_pretrained(d + "/vae")
    sampler = decoders.PNDM(**sched)
    cond, uncond, latents = torch.randn(1, 77, 64), torch.randn(1, 77, 64), torch.randn(1, 4, 32, 32)
    ours = lambda: decoders.generate_image(o_unet, o_vae, sampler, cond, uncond, steps=steps, height=64,  # noqa
                                           width=64, latents=latents, progress=False)
    ref = lambda: pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, num_inference_steps=steps,  # noqa
                       height=64, width=64, latents=latents, output_type="pt")
    return [side_by_side(f"image pipeline, tiny SD, {steps} PNDM steps with guidance", ours, ref, repeats)]


BENCHES = {"llama": bench_llama, "llama-load-memory": bench_llama_load_memory, "imagebind": bench_imagebind,
           "unet": bench_unet, "image-pipeline": bench_image_pipeline}


def main(argv=None):
    p = cli.parser("bench.py", __doc__)
    p.add_argument("--only", default="", metavar="TEXT", help=f"run the entries whose name contains this: "
                   f"{', '.join(BENCHES)} (default: all)")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats of each side; the median counts (default: 5)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(),
                   help=f"torch threads (default: {torch.get_num_threads()}, this machine's)")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.threads < 1:
        p.error(f"--repeats and --threads must be positive integers (got {args.repeats}, {args.threads})")
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, {os.cpu_count()} cores, "
          f"{'cuda ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}")
    print(f"{'entry':<70} {'ours':>10} {'reference':>10} {'ratio':>7}")
    for name, fn in BENCHES.items():
        if args.only not in name:
            continue
        kw = {"repeats": args.repeats} if "repeats" in fn.__code__.co_varnames else {}
        for row in fn(**kw):
            print(f"{row['name']:<70} {row['ours']:>9.3f}{row['unit'][0]} {row['ref']:>9.3f}{row['unit'][0]} "
                  f"{row['ratio']:>6.2f}x  {row.get('extra', '')}", flush=True)


if __name__ == "__main__":
    main()
