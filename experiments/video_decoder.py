"""
Does the toy's video decoder read the caption's direction, and what decides it?

The toy's video UNet is inflated from its image UNet (as Zeroscope's ancestor ModelScope T2V starts from Stable
Diffusion), and its own text encoder puts a code per direction on the tokens after the caption
(toy.motion_text_encoder). The second edition of the toy world taught the image UNet two-object captions too, and the
video decoder inflated from it stopped reading the direction. This experiment retrains only the video lane on one
world, from two image UNets that differ only in the scenes they have learned:

    one object     the image UNet trained on the one-object scenes only (what the recipe does first)
    every scene    the image UNet trained as long on every scene, two-object ones included

Everything else is the recipe's, and the same in both: the world's image VAE, the video lane (toy.video_lane: the
motion text encoder, the inflated UNet) with the same steps and seed. Each video decoder is measured two ways:
- toy.probe_video: its denoising loss on fresh clips with the true caption and with the opposite direction; a
  decoder that reads the direction pays more with the opposite one (the ratio at t = 800 and 950, where the clip's
  layout is decided);
- alone, from its own text encoder's embedding of each of the 48 video captions (one noise each, the toy's sampling:
  20 DDIM steps, guidance 1.5): the share of clips right in color, shape and direction, and in direction alone.

Default size: 1,250 image UNet steps and 1,000 video UNet steps per variant (half and two thirds of the recipe's
unet_single_steps and video_steps, so that both variants fit the hour), one seed. At one thread on a quiet core an
image UNet step takes about 0.2 s and a video UNet step about 0.6 s (toy.py's picture lane), so a variant trains in
about 15 minutes and the experiment takes about 35 with the measurements. --small: a few steps on the CI world.
"""

import os
import time
from dataclasses import replace

import lab
import torch

import decoders
import media
import nextgpt
import toy

VARIANTS = {"one object": True, "every scene": False}  # name: the image UNet learns the one-object scenes only
COLUMNS = ["opposite / true at t=800", "opposite / true at t=950", "clips right", "direction right", "train seconds"]


def train_video_lane(cfg, one_object, image_steps):
    """The recipe's video lane (toy.video_lane) from a new image UNet of image_steps steps on the world's one-object
    scenes or on all of them -> a backbones folder: the world's, with this video decoder."""
    files = lab.world_files(cfg.world)
    vae = decoders.VAE.from_pretrained(os.path.join(cfg.world, "backbones", "image", "vae"))
    img = torch.stack([torch.from_numpy(toy.read_media("image", p)) for p, _ in files["image"]])
    captions = [c for _, c in files["image"]]
    keep = [i for i, c in enumerate(captions) if not one_object or "left" not in toy.parse_caption(c)]
    log = {}
    unet, enc = toy.train_unet(cfg, "image", *toy.new_unet(cfg, "image"), toy.latents(vae, toy.pixels(img))[keep],
                               [captions[i] for i in keep], image_steps, log)
    clips = torch.stack([torch.from_numpy(toy.read_media("video", p)) for p, _ in files["video"]])
    video, video_enc = toy.video_lane(cfg, vae, unet, enc, clips, [c for _, c in files["video"]], log)
    ckpt = lab.link_world(cfg.world, cfg.out, skip=("video",))
    toy.save_decoder(os.path.join(ckpt, "backbones", "video"), "video", video, vae, video_enc)
    return os.path.join(ckpt, "backbones")


def alone_on_the_captions(cfg, ckpt, n=48):
    """The decoder from its own embedding of each of the first n video captions (one noise each; the 48 are in
    color, shape, direction order, so n = 16 is every shape and direction of one color) -> (all right, direction
    right)."""
    d = nextgpt.NextGPT.from_pretrained(ckpt, dtype=torch.float32, device="cpu", decoders=("video",)).decoder("video")
    rows = [(c, s, m) for c in toy.COLORS for s in toy.SHAPES for m in toy.MOTIONS][:n]
    cond = d.embed_text([toy.video_caption(*r) for r in rows])
    uncond = d.embed_text([""] * len(rows))
    right = direction = 0
    for i in range(0, len(rows), 16):
        clips = d.generate(cond[i:i + 16], uncond[i:i + 16], steps=cfg.sample_steps, guidance=cfg.video_guidance,
                           frames=toy.FRAMES, height=toy.SIZE, width=toy.SIZE, progress=False,
                           generator=torch.Generator().manual_seed(cfg.seed + i))
        for clip, r in zip(clips, rows[i:i + 16]):
            got = toy.measure_video(media.to_uint8(clip))
            right += got == r
            direction += got[2] == r[2]
    return right / len(rows), direction / len(rows)


def main():
    p = lab.parser(__doc__)
    p.add_argument("--image-steps", type=lab.positive, default=1250, help="the image UNet's steps (--small: the CI "
                                                                          "size's)")
    p.add_argument("--video-steps", type=lab.positive, default=1000, help="the video UNet's (--small: the CI size's)")
    args = lab.parse(p)
    base = lab.setup(args, "video_decoder", seeds=[0])
    if not args.small:
        base = replace(base, video_steps=args.video_steps, unet_single_steps=args.image_steps)
    n = 16 if args.small else 48
    rows = {}
    for name, one_object in VARIANTS.items():
        for seed in args.seeds:
            cfg = lab.variant(base, args, name, seed)
            t0 = time.time()
            ckpt = train_video_lane(cfg, one_object, base.unet_single_steps)
            row = {"train seconds": time.time() - t0}
            probe = toy.probe_video(cfg, ckpt, per_class=1)
            for t in (800, 950):
                row[f"opposite / true at t={t}"] = probe[t]["opposite"] / probe[t]["true"]
            row["clips right"], row["direction right"] = alone_on_the_captions(cfg, ckpt, n)
            lab.add(rows, name, row)
    lab.report(args, "video_decoder", rows, COLUMNS, notes=(
        f"image UNet {base.unet_single_steps} steps, video UNet {base.video_steps}, seeds {args.seeds}; clips: the "
        f"first {n} video captions, one noise each, {base.sample_steps} DDIM steps, guidance {base.video_guidance} "
        "(chance: 1/48 right, 1/4 direction); the ratios: toy.probe_video's losses (1.0: the direction does not "
        "matter)"))


if __name__ == "__main__":
    main()
