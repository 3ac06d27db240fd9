"""
Parity of decoders.py with diffusers / transformers: tiny random models saved with save_pretrained, loaded with our
from_pretrained, outputs compared in float32. No downloads.
"""
import json
import os

import pytest
import torch

import bpe
import decoders as D
import samplers

torch.set_num_threads(min(2, torch.get_num_threads()))
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")


def randomize(model, seed=0, scale=0.05):
    """Perturb every parameter so that zero-initialised layers (temporal conv4, proj_out) take part too."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model.eval()


def maxdiff(a, b):
    return (a.float() - b.float()).abs().max().item()


SD_UNET = dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(16, 24, 32), layers_per_block=2,
               down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
               up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
               attention_head_dim=(2, 4, 4), cross_attention_dim=12, norm_num_groups=4)
AUDIO_UNET = dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(16, 24, 32), layers_per_block=1,
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                  attention_head_dim=2, cross_attention_dim=(16, 24, 32), norm_num_groups=4,
                  class_embed_type="simple_projection", projection_class_embeddings_input_dim=10,
                  class_embeddings_concat=True)
VIDEO_UNET = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
                  down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
                  up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
                  attention_head_dim=8, cross_attention_dim=12, norm_num_groups=4)
SD_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 16), layers_per_block=1,
              norm_num_groups=4, down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3)
AUDIO_VAE = dict(in_channels=1, out_channels=1, latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
                 norm_num_groups=4, down_block_types=("DownEncoderBlock2D",) * 2,
                 up_block_types=("UpDecoderBlock2D",) * 2,
                 scaling_factor=0.9)


def saved(model, path, safe=True):
    model.save_pretrained(str(path), safe_serialization=safe)
    return str(path)


@pytest.fixture(scope="module")
def sd_unet(tmp_path_factory):
    ref = randomize(diffusers.UNet2DConditionModel(**SD_UNET), 1)
    return ref, saved(ref, tmp_path_factory.mktemp("sd_unet"))


@pytest.fixture(scope="module")
def audio_unet(tmp_path_factory):
    ref = randomize(diffusers.UNet2DConditionModel(**AUDIO_UNET), 2)
    return ref, saved(ref, tmp_path_factory.mktemp("audio_unet"))


@pytest.fixture(scope="module")
def video_unet(tmp_path_factory):
    ref = randomize(diffusers.UNet3DConditionModel(**VIDEO_UNET), 3)
    folder = saved(ref, tmp_path_factory.mktemp("video_unet"), safe=False)  # the .bin form
    assert os.path.isfile(os.path.join(folder, "diffusion_pytorch_model.bin"))
    return ref, folder


@pytest.mark.parametrize("hw", [(12, 12), (10, 14)])
def test_unet2d_sd_shape(sd_unet, hw):
    ref, folder = sd_unet
    ours = D.UNet2D.from_pretrained(folder)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, *hw, generator=g)
    ctx = torch.randn(2, 7, 12, generator=g)
    t = torch.tensor(537)
    with torch.no_grad():
        want = ref(x, t, encoder_hidden_states=ctx).sample
        got = ours(x, t, ctx)
    assert maxdiff(got, want) <= 1e-4


def test_unet2d_audioldm_shape(audio_unet):
    ref, folder = audio_unet
    ours = D.UNet2D.from_pretrained(folder)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 25, 8, generator=g)  # odd rows, as AudioLDM's 125
    labels = torch.randn(2, 10, generator=g)
    with torch.no_grad():
        want = ref(x, 91, encoder_hidden_states=None, class_labels=labels).sample
        got = ours(x, 91, None, class_labels=labels)
    assert maxdiff(got, want) <= 1e-4


def test_unet3d(video_unet):
    ref, folder = video_unet
    ours = D.UNet3D.from_pretrained(folder)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 3, 8, 8, generator=g)  # (B, C, F, H, W)
    ctx = torch.randn(2, 5, 12, generator=g)
    with torch.no_grad():
        want = ref(x, torch.tensor([400, 20]), encoder_hidden_states=ctx).sample
        got = ours(x, torch.tensor([400, 20]), ctx)
    assert maxdiff(got, want) <= 1e-4


def test_temporal_positions():
    """UNetConfig.temporal_positions: the temporal attention with diffusers' sinusoidal positional embeddings."""
    from diffusers.models.transformers.transformer_temporal import TransformerTemporalModel
    torch.manual_seed(0)
    ref = TransformerTemporalModel(2, 8, in_channels=16, norm_num_groups=4, positional_embeddings="sinusoidal",
                                   num_positional_embeddings=6).eval()
    with torch.no_grad():
        for p in ref.parameters():  # LayerNorms start at 1 and 0: nudge every tensor so that each one counts
            p.add_(torch.randn_like(p) * 0.1)
    ours = D.TemporalTransformer(16, 2, 8, 4, positions=6)
    sd = {k: v for k, v in ref.state_dict().items() if not k.endswith("pos_embed.pe")}  # ours is not saved
    ours.load_state_dict(sd, strict=True)
    x = torch.randn(2 * 5, 16, 3, 3)  # (B * F, C, H, W), 5 frames of the 6 it has positions for
    with torch.no_grad():
        want = ref(x, num_frames=5).sample
        got = ours(x, 5)
        assert maxdiff(got, want) <= 1e-5
        plain = D.TemporalTransformer(16, 2, 8, 4)  # the same weights without positions: Zeroscope's layer
        plain.load_state_dict(sd)
        assert maxdiff(plain(x, 5), got) > 1e-3  # the positions matter
    with pytest.raises(ValueError, match="positions for 6"):
        ours(torch.randn(7, 16, 3, 3), 7)


def test_unet3d_temporal_positions_load(tmp_path):
    """A UNet3D with temporal_positions saves and loads through from_pretrained (meta-device build, strict)."""
    from dataclasses import asdict, replace

    from safetensors.torch import save_file
    cfg = replace(D.UNET_PRESETS["tiny"], video=True, attention_head_dim=8, use_linear_projection=True,
                  temporal_positions=4, down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
                  up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"))
    torch.manual_seed(0)
    model = D.UNet3D(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():  # the zero-initialised output layers too
            p.add_(torch.randn_like(p) * 0.05)
    (tmp_path / "config.json").write_text(json.dumps(
        {"_class_name": "UNet3DConditionModel", **{k: v for k, v in asdict(cfg).items() if k != "video"}}))
    save_file(model.state_dict(), str(tmp_path / "diffusion_pytorch_model.safetensors"))
    loaded = D.UNet3D.from_pretrained(str(tmp_path))
    assert loaded.cfg.temporal_positions == 4
    x, ctx = torch.randn(1, 4, 3, 8, 8), torch.randn(1, 5, 32)
    with torch.no_grad():
        assert maxdiff(loaded(x, 10, ctx), model(x, 10, ctx)) <= 1e-5


def _old_attention_names(folder):
    """Rewrite a saved VAE with the pre-0.14 attention names (query/key/value/proj_attn), as older files have."""
    from safetensors.torch import load_file, save_file
    path = os.path.join(folder, "diffusion_pytorch_model.safetensors")
    sd = load_file(path)
    names = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}
    out = {}
    for k, v in sd.items():
        for a, b in names.items():
            k = k.replace(a, b)
        out[k] = v
    assert any(".proj_attn." in k for k in out)
    save_file(out, path)


@pytest.mark.parametrize("config,old_names", [(SD_VAE, False), (SD_VAE, True), (AUDIO_VAE, False)])
def test_vae(tmp_path, config, old_names):
    ref = randomize(diffusers.AutoencoderKL(**config), 4)
    folder = saved(ref, tmp_path)
    if old_names:
        _old_attention_names(folder)
    ours = D.VAE.from_pretrained(folder)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, config["in_channels"], 16, 24, generator=g)
    z = torch.randn(2, config["latent_channels"], 4, 6, generator=g)
    with torch.no_grad():
        dist = ref.encode(x).latent_dist
        mean, logvar = ours.encode(x)
        assert maxdiff(mean, dist.mean) <= 1e-4 and maxdiff(logvar, dist.logvar) <= 1e-4
        assert maxdiff(ours.decode(z), ref.decode(z).sample) <= 1e-4
    assert ours.cfg.scaling_factor == ref.config.scaling_factor


def test_float32_cpu_convolutions_load_channels_last(tmp_path):
    """float32 Conv2d weights loaded on the CPU are stored channels-last, the layout oneDNN's CPU kernels run faster
    (docs/speed.md; test_vae checks the outputs with it); other dtypes keep the file's layout."""
    folder = saved(randomize(diffusers.AutoencoderKL(**SD_VAE), 4), tmp_path)

    def kernels(model):  # the 3 x 3 ones: a 1 x 1 weight is contiguous in both layouts
        return [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1)]
    fp32, bf16 = kernels(D.VAE.from_pretrained(folder)), kernels(D.VAE.from_pretrained(folder, torch.bfloat16))
    assert fp32 and all(w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous() for w in fp32)
    assert all(w.is_contiguous() for w in bf16)


@pytest.mark.parametrize("normalize_before", [False, True])
def test_hifigan(tmp_path, normalize_before):
    cfg = transformers.SpeechT5HifiGanConfig(
        model_in_dim=12, upsample_initial_channel=24, upsample_rates=[3, 2], upsample_kernel_sizes=[7, 4],
        resblock_kernel_sizes=[3, 5], resblock_dilation_sizes=[[1, 2], [1, 3]], normalize_before=normalize_before)
    ref = transformers.SpeechT5HifiGan(cfg).eval()
    randomize(ref, 5, scale=0.1)
    with torch.no_grad():
        ref.mean.normal_()
        ref.scale.uniform_(0.5, 2.0)
    folder = saved(ref, tmp_path)
    ours = D.HiFiGAN.from_pretrained(folder)
    mel = torch.randn(2, 30, 12, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = ref(mel), ours(mel)
    assert got.shape == (2, 30 * 6) and maxdiff(got, want) <= 1e-4


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_clip_text(tmp_path, act):
    cfg = transformers.CLIPTextConfig(vocab_size=300, hidden_size=24, intermediate_size=40, num_hidden_layers=2,
                                      num_attention_heads=3, max_position_embeddings=77, hidden_act=act)
    ref = randomize(transformers.CLIPTextModel(cfg), 6)
    folder = saved(ref, tmp_path, safe=act == "gelu")  # .bin for one of the two
    ours = D.CLIPTextEncoder.from_pretrained(folder)
    ids = torch.randint(0, 300, (2, 77), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert maxdiff(ours(ids), ref(ids).last_hidden_state) <= 1e-4


def test_clap_text(tmp_path):
    cfg = transformers.ClapTextConfig(vocab_size=300, hidden_size=24, num_hidden_layers=2, num_attention_heads=3,
                                      intermediate_size=40, projection_dim=12, max_position_embeddings=40,
                                      layer_norm_eps=1e-5)
    ref = randomize(transformers.ClapTextModelWithProjection(cfg), 7)
    folder = saved(ref, tmp_path)
    ours = D.CLAPTextEncoder.from_pretrained(folder)
    ids = torch.randint(3, 300, (3, 20), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    for row, n in ((1, 9), (2, 2)):  # right padding, as the tokenizer pads
        ids[row, n:], mask[row, n:] = 1, 0
    ids[:, 0] = 0
    with torch.no_grad():
        want = ref(ids, attention_mask=mask).text_embeds
        assert maxdiff(ours(ids, mask), want) <= 1e-4


# The three checkpoints' scheduler_config.json (as published), plus variants that exercise the other options
SD_SCHED = {"_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
            "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
            "trained_betas": None, "clip_sample": False}
ZEROSCOPE_SCHED = {"_class_name": "DDIMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
                   "beta_start": 0.00085, "clip_sample": False, "num_train_timesteps": 1000,
                   "prediction_type": "epsilon", "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
                   "trained_betas": None}
AUDIOLDM_SCHED = {"_class_name": "DDIMScheduler", "beta_end": 0.0195, "beta_schedule": "scaled_linear",
                  "beta_start": 0.0015, "clip_sample": False, "num_train_timesteps": 1000, "set_alpha_to_one": False,
                  "steps_offset": 1, "trained_betas": None}
SAMPLER_CASES = [
    ("PNDMScheduler", samplers.PNDM, SD_SCHED),
    ("DDIMScheduler", samplers.DDIM, ZEROSCOPE_SCHED),
    ("DDIMScheduler", samplers.DDIM, AUDIOLDM_SCHED),
    ("DPMSolverMultistepScheduler", samplers.DPMSolver, SD_SCHED),
    ("DPMSolverMultistepScheduler", samplers.DPMSolver, {**AUDIOLDM_SCHED, "timestep_spacing": "leading"}),
    ("DPMSolverMultistepScheduler", samplers.DPMSolver, {**SD_SCHED, "timestep_spacing": "trailing",
                                                  "prediction_type": "v_prediction"}),
    # clip_sample on
    ("DDIMScheduler", samplers.DDIM, {"timestep_spacing": "trailing", "prediction_type": "v_prediction"}),
    ("DDIMScheduler", samplers.DDIM, {**ZEROSCOPE_SCHED, "timestep_spacing": "linspace"}),
    ("PNDMScheduler", samplers.PNDM, {**SD_SCHED, "timestep_spacing": "trailing", "beta_schedule": "linear"}),
    ("DDIMScheduler", samplers.DDIM, {**ZEROSCOPE_SCHED, "rescale_betas_zero_snr": True, "timestep_spacing": "trailing",
                               "steps_offset": 0, "prediction_type": "v_prediction"}),  # zero terminal SNR
]


def fake_eps(x, t):
    """A deterministic stand-in for the UNet: depends on x and t, not linear in either."""
    return 0.3 * torch.tanh(x) + 0.1 * x + 0.05 * torch.sin(torch.tensor(float(t)) / 97.0)


def write_sched(tmp_path, config):
    (tmp_path / "scheduler_config.json").write_text(json.dumps(config))
    return str(tmp_path)


@pytest.mark.parametrize("steps", [10, 25, 50])
@pytest.mark.parametrize("ref_name,ours_cls,config", SAMPLER_CASES)
def test_sampler_trajectory(tmp_path, ref_name, ours_cls, config, steps):
    folder = write_sched(tmp_path, config)
    ref = getattr(diffusers, ref_name).from_pretrained(folder)
    ours = ours_cls.from_pretrained(folder)
    ref.set_timesteps(steps)
    ours.set_timesteps(steps)
    assert torch.equal(ours.timesteps, ref.timesteps)
    x_ref = x_ours = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(steps)) * ref.init_noise_sigma
    for t in ref.timesteps:
        x_ref = ref.step(fake_eps(x_ref, t), t, x_ref).prev_sample
        x_ours = ours.step(fake_eps(x_ours, t), t, x_ours)
        assert maxdiff(x_ours, x_ref) <= 1e-4, f"t={int(t)}"


def test_load_sampler_picks_the_class(tmp_path):
    assert isinstance(samplers.load_sampler(write_sched(tmp_path, SD_SCHED)), samplers.PNDM)
    assert isinstance(samplers.load_sampler(str(tmp_path), kind="dpm"), samplers.DPMSolver)
    with pytest.raises(NotImplementedError, match="skip_prk_steps"):
        samplers.PNDM(skip_prk_steps=False)


@pytest.mark.parametrize("config", [SD_SCHED, AUDIOLDM_SCHED, {**SD_SCHED, "prediction_type": "v_prediction"}])
def test_add_noise(tmp_path, config):
    folder = write_sched(tmp_path, config)
    ref = diffusers.DDIMScheduler.from_pretrained(folder)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 6, 6, generator=g), torch.randn(3, 4, 6, 6, generator=g)
    t = torch.tensor([0, 500, 999])
    want = ref.add_noise(x0, noise, t)
    for cls in (samplers.DDIM, samplers.PNDM, samplers.DPMSolver):
        assert maxdiff(cls.from_pretrained(folder).add_noise(x0, noise, t), want) <= 1e-6
    ours = samplers.DDIM.from_pretrained(folder).add_noise(x0, noise, 500)
    assert maxdiff(ours, ref.add_noise(x0, noise, t[1:2])) <= 1e-6
    # the training target: the noise, or diffusers' get_velocity for a v-prediction config
    want = ref.get_velocity(x0, noise, t) if config.get("prediction_type") == "v_prediction" else noise
    assert maxdiff(samplers.DDIM.from_pretrained(folder).target(x0, noise, t), want) <= 1e-6


# ---- full pipelines against diffusers' own, same tiny components, same initial latents

def _both(tmp_path, ref_model, ours_cls, name):
    return ours_cls.from_pretrained(saved(ref_model, tmp_path / name))


@pytest.mark.parametrize("sched,use_seed", [(("PNDMScheduler", samplers.PNDM), False),
                                            (("DPMSolverMultistepScheduler", samplers.DPMSolver), True)])
def test_generate_image(tmp_path, sd_unet, sched, use_seed):
    ref_unet, unet_folder = sd_unet
    ref_vae = randomize(diffusers.AutoencoderKL(**SD_VAE), 8)
    folder = write_sched(tmp_path, SD_SCHED)
    pipe = diffusers.StableDiffusionPipeline(
        vae=ref_vae, text_encoder=None, tokenizer=None, unet=ref_unet,
        scheduler=getattr(diffusers, sched[0]).from_pretrained(folder), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    unet, vae, sampler = D.UNet2D.from_pretrained(unet_folder), _both(tmp_path, ref_vae, D.VAE, "vae"), \
        sched[1].from_pretrained(folder)
    g = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(2, 7, 12, generator=g), torch.randn(1, 7, 12, generator=g)
    kw = dict(generator=torch.Generator().manual_seed(42)) if use_seed else \
        dict(latents=torch.randn(2, 4, 8, 12, generator=g))
    want = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond.expand(2, -1, -1), num_inference_steps=10,
                guidance_scale=7.5, height=32, width=48, output_type="pt", **kw).images
    if use_seed:
        kw = dict(generator=42)  # an int seeds a CPU generator: the same noise as diffusers with that generator
    got = D.generate_image(unet, vae, sampler, cond, uncond, steps=10, guidance=7.5, height=32, width=48,
                           progress=False, **kw)
    assert got.shape == (2, 3, 32, 48) and maxdiff(got, want) <= 1e-3


@pytest.mark.parametrize("sched", [("DDIMScheduler", samplers.DDIM),
                                   ("DPMSolverMultistepScheduler", samplers.DPMSolver)])
def test_generate_video(tmp_path, video_unet, sched):
    """diffusers steps (B*F, C, h, w), we step (B, C, F, h, w): the same, as the samplers are elementwise."""
    ref_unet, unet_folder = video_unet
    ref_vae = randomize(diffusers.AutoencoderKL(**SD_VAE), 9)
    folder = write_sched(tmp_path, ZEROSCOPE_SCHED)
    pipe = diffusers.TextToVideoSDPipeline(vae=ref_vae, text_encoder=None, tokenizer=None, unet=ref_unet,
                                           scheduler=getattr(diffusers, sched[0]).from_pretrained(folder))
    pipe.set_progress_bar_config(disable=True)
    unet, vae, sampler = D.UNet3D.from_pretrained(unet_folder), _both(tmp_path, ref_vae, D.VAE, "vae"), \
        sched[1].from_pretrained(folder)
    g = torch.Generator().manual_seed(1)
    cond, uncond = torch.randn(1, 5, 12, generator=g), torch.randn(1, 5, 12, generator=g)
    latents = torch.randn(1, 4, 3, 8, 8, generator=g)
    want = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, num_inference_steps=8, guidance_scale=9.0,
                num_frames=3, height=32, width=32, latents=latents, output_type="pt").frames
    got = D.generate_video(unet, vae, sampler, cond, uncond, steps=8, guidance=9.0, frames=3, height=32, width=32,
                           latents=latents, progress=False, decode_batch=2)
    assert got.shape == (1, 3, 3, 32, 32) and maxdiff(got, want) <= 1e-3


def test_generate_audio(tmp_path, audio_unet):
    ref_unet, unet_folder = audio_unet
    ref_vae = randomize(diffusers.AutoencoderKL(**AUDIO_VAE), 10)
    clap = transformers.ClapTextModelWithProjection(transformers.ClapTextConfig(
        vocab_size=100, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
        projection_dim=10)).eval()
    vocoder = randomize(transformers.SpeechT5HifiGan(transformers.SpeechT5HifiGanConfig(
        model_in_dim=16, upsample_initial_channel=16, upsample_rates=[4, 2], upsample_kernel_sizes=[8, 4],
        resblock_kernel_sizes=[3], resblock_dilation_sizes=[[1, 3]])), 11)
    folder = write_sched(tmp_path, AUDIOLDM_SCHED)
    pipe = diffusers.AudioLDMPipeline(vae=ref_vae, text_encoder=clap, tokenizer=None, unet=ref_unet,
                                      scheduler=diffusers.DDIMScheduler.from_pretrained(folder), vocoder=vocoder)
    pipe.set_progress_bar_config(disable=True)
    unet, vae, sampler = D.UNet2D.from_pretrained(unet_folder), _both(tmp_path, ref_vae, D.VAE, "vae"), \
        samplers.DDIM.from_pretrained(folder)
    voc = _both(tmp_path, vocoder, D.HiFiGAN, "vocoder")
    g = torch.Generator().manual_seed(2)
    cond, uncond = torch.randn(2, 10, generator=g), torch.randn(1, 10, generator=g)
    seconds = 0.0115  # 23 mel frames -> 24 (a multiple of the VAE scale) -> 12 latent rows; cut to 184 samples
    latents = torch.randn(2, 4, 12, 8, generator=g)
    want = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond.expand(2, -1), num_inference_steps=10,
                guidance_scale=2.5, audio_length_in_s=seconds, latents=latents, output_type="pt").audios
    got = D.generate_audio(unet, vae, voc, sampler, cond, uncond, seconds=seconds, steps=10, guidance=2.5,
                           latents=latents, progress=False)
    assert got.shape == (2, int(seconds * 16000)) and maxdiff(got, want) <= 1e-3


# ---- key coverage at full size: our modules have exactly the official key names and shapes (meta device, no memory)

AUDIOLDM_UNET_FULL = dict(sample_size=128, in_channels=8, out_channels=8, block_out_channels=(256, 512, 768, 1280),
                          layers_per_block=2, attention_head_dim=8, cross_attention_dim=(256, 512, 768, 1280),
                          down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 3,
                          up_block_types=("CrossAttnUpBlock2D",) * 3 + ("UpBlock2D",),
                          class_embed_type="simple_projection", projection_class_embeddings_input_dim=512,
                          class_embeddings_concat=True)
AUDIOLDM_VAE_FULL = dict(in_channels=1, out_channels=1, latent_channels=8, block_out_channels=(128, 256, 512),
                         layers_per_block=2,
                         down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                         scaling_factor=0.9654927849769592, sample_size=512)
SD_VAE_FULL = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                   down_block_types=("DownEncoderBlock2D",) * 4,
                   up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.18215, sample_size=512)


def shapes(model, rename=None):
    sd = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    return rename(sd) if rename else sd


@pytest.mark.parametrize("name,ref_fn,ours_cls,cfg_cls,n_params", [
    ("sd-v1-5", lambda: diffusers.UNet2DConditionModel(sample_size=64, cross_attention_dim=768), D.UNet2D,
     D.UNetConfig, 859_520_964),
    ("zeroscope-v2-576w", lambda: diffusers.UNet3DConditionModel(sample_size=64), D.UNet3D, D.UNetConfig, None),
    ("audioldm-l-full", lambda: diffusers.UNet2DConditionModel(**AUDIOLDM_UNET_FULL), D.UNet2D, D.UNetConfig, None),
    ("sd-v1-5", lambda: diffusers.AutoencoderKL(**SD_VAE_FULL), D.VAE, D.VAEConfig, 83_653_863),
    ("audioldm-l-full", lambda: diffusers.AutoencoderKL(**AUDIOLDM_VAE_FULL), D.VAE, D.VAEConfig, None),
])
def test_full_size_key_coverage(tmp_path, name, ref_fn, ours_cls, cfg_cls, n_params):
    with torch.device("meta"):
        ref = ref_fn()
        ours = ours_cls(cfg_cls.preset(name))
    assert shapes(ours) == shapes(ref)
    # the preset is what our reader makes of the official config.json
    ref.save_config(str(tmp_path))
    assert cfg_cls.from_json(str(tmp_path / "config.json")) == ours.cfg
    if n_params:
        assert sum(p.numel() for p in ours.parameters()) == n_params


def test_full_size_vocoder_and_text_encoders():
    with torch.device("meta"):
        ref_voc = transformers.SpeechT5HifiGan(transformers.SpeechT5HifiGanConfig(
            model_in_dim=64, upsample_initial_channel=1024, upsample_rates=[5, 4, 2, 2, 2],
            upsample_kernel_sizes=[16, 16, 8, 4, 4], resblock_kernel_sizes=[3, 7, 11],
            resblock_dilation_sizes=[[1, 3, 5]] * 3, normalize_before=False))
        ref_clip = transformers.CLIPTextModel(transformers.CLIPTextConfig(
            hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12))
        ref_oclip = transformers.CLIPTextModel(transformers.CLIPTextConfig(
            hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
            hidden_act="gelu"))
        ref_clap = transformers.ClapTextModelWithProjection(transformers.ClapTextConfig())
        ours = {n: cls(cfg.preset(p)) for n, cls, cfg, p in [
            ("voc", D.HiFiGAN, D.HiFiGANConfig, "audioldm-l-full"),
            ("clip", D.CLIPTextEncoder, D.CLIPTextConfig, "sd-v1-5"),
            ("oclip", D.CLIPTextEncoder, D.CLIPTextConfig, "zeroscope-v2-576w"),
            ("clap", D.CLAPTextEncoder, D.CLAPTextConfig, "audioldm-l-full")]}
    assert shapes(ours["voc"]) == shapes(ref_voc)
    assert shapes(ours["clip"]) == D._clip_rename(shapes(ref_clip))
    assert shapes(ours["oclip"]) == D._clip_rename(shapes(ref_oclip))
    assert shapes(ours["clap"]) == D._clap_rename(shapes(ref_clap))


# ---- bad input: every error names what is wrong

def test_missing_folder_and_files(tmp_path, sd_unet):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        D.UNet2D.from_pretrained(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        D.VAE.from_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text(open(os.path.join(sd_unet[1], "config.json")).read())
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model.safetensors"):
        D.UNet2D.from_pretrained(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="scheduler_config.json"):
        samplers.DDIM.from_pretrained(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        D.load_image_decoder(str(tmp_path / "nowhere"))
    with pytest.raises(D.CheckpointError, match="2-D UNet: use UNet2D"):
        D.UNet3D.from_pretrained(sd_unet[1])


def test_missing_and_misshaped_tensors(tmp_path, sd_unet):
    import shutil

    from safetensors.torch import load_file, save_file
    src = sd_unet[1]
    for case in ("missing", "shape", "extra"):
        folder = tmp_path / case
        shutil.copytree(src, folder)
        path = folder / "diffusion_pytorch_model.safetensors"
        sd = load_file(str(path))
        key = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"
        if case == "missing":
            del sd[key]
        elif case == "shape":
            sd[key] = torch.zeros(3, 3)
        else:
            key = "down_blocks.9.surprise.weight"
            sd[key] = torch.zeros(1)
        save_file(sd, str(path))
        with pytest.raises(D.CheckpointError, match=key.replace(".", r"\.")):
            D.UNet2D.from_pretrained(str(folder))


def test_unsupported_config_is_refused(tmp_path, sd_unet):
    cfg = json.load(open(os.path.join(sd_unet[1], "config.json")))
    cfg["resnet_time_scale_shift"] = "scale_shift"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(NotImplementedError, match="resnet_time_scale_shift"):
        D.UNetConfig.from_json(str(tmp_path / "config.json"))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_load(sd_unet, dtype):
    ref, folder = sd_unet
    ours = D.UNet2D.from_pretrained(folder, dtype=dtype)
    assert all(p.dtype == dtype for p in ours.parameters())
    if dtype == torch.bfloat16:  # CPU kernels for bf16 exist everywhere; close to fp32
        x, ctx = torch.randn(1, 4, 8, 8), torch.randn(1, 7, 12)
        with torch.no_grad():
            got = ours(x.to(dtype), 300, ctx.to(dtype))
            want = ref(x, 300, encoder_hidden_states=ctx).sample
        assert got.dtype == dtype and maxdiff(got, want) < 0.1


# ---- tokenizers against transformers' on the same vocab.json + merges.txt

ROBERTA_MERGES = ["Ġ t", "h e", "Ġt he", "a t", "Ġ c", "Ġc at", "Ġ s", "Ġs at", "i n", "Ġ d", "o g", "Ġd og",
                  "l l", "e ll", "h ell", "hell o", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld", "Ġ b", "a r", "Ġb ar",
                  "Ã ©", "1 2", "Ġ 1"]


def roberta_files(folder):
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for ch in bpe.bytes_to_unicode().values():
        vocab[ch] = len(vocab)
    for m in ROBERTA_MERGES:
        vocab.setdefault(m.replace(" ", ""), len(vocab))
    vocab["<mask>"] = len(vocab)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(ROBERTA_MERGES) + "\n")
    return folder


TEXTS = ["the cat sat", "Hello  world!! 123", "", "a dog barks, loudly.\nthe bar", "café ☕ 12  ", "don't   stop"]


@pytest.mark.parametrize("max_length", [24, 8])
def test_roberta_tokenizer(tmp_path, max_length):
    folder = roberta_files(str(tmp_path))
    ref = transformers.RobertaTokenizer.from_pretrained(folder)
    want = ref(TEXTS, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    ids, mask = bpe.RobertaTokenizer.from_folder(folder)(TEXTS, max_length=max_length)
    assert torch.equal(ids, want["input_ids"]) and torch.equal(mask, want["attention_mask"])


def test_clip_tokenizer_on_a_decoder_folder(tmp_path):
    """bpe.CLIPTokenizer as the image / video decoders use it: on an SD-style tokenizer/ folder."""
    gz = os.path.join(os.path.dirname(pytest.importorskip("open_clip").__file__), "bpe_simple_vocab_16e6.txt.gz")
    import gzip
    lines = gzip.open(gz, "rt", encoding="utf-8").read().split("\n")[1:49152 - 256 - 2 + 1]
    merges = [tuple(ln.split()) for ln in lines]
    byte_chars = list(bpe.bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (tmp_path / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n",
                                         encoding="utf-8")
    # as in stable-diffusion-v1-5/tokenizer: it pads with <|endoftext|>
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
               "unk_token": "<|endoftext|>"}
    (tmp_path / "special_tokens_map.json").write_text(json.dumps(special))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**special, "model_max_length": 77}))
    ref = transformers.CLIPTokenizer.from_pretrained(str(tmp_path), pad_token="<|endoftext|>")
    ours = bpe.CLIPTokenizer.from_folder(str(tmp_path))
    texts = ["a photo of a cat", "", "Hello, World! it's 2024"]
    want = ref(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")["input_ids"]
    assert torch.equal(ours(texts, context_length=77), want)


# ---- one decoder at a time from a diffusers pipeline folder

def test_load_audio_decoder(tmp_path, audio_unet):
    root = tmp_path / "audioldm"
    saved(audio_unet[0], root / "unet")
    saved(randomize(diffusers.AutoencoderKL(**AUDIO_VAE), 12), root / "vae")
    saved(randomize(transformers.SpeechT5HifiGan(transformers.SpeechT5HifiGanConfig(
        model_in_dim=16, upsample_initial_channel=16, upsample_rates=[4, 2], upsample_kernel_sizes=[8, 4],
        resblock_kernel_sizes=[3], resblock_dilation_sizes=[[1, 3]])), 13), root / "vocoder")
    clap = randomize(transformers.ClapTextModelWithProjection(transformers.ClapTextConfig(
        vocab_size=len(json.load(open(os.path.join(roberta_files(str(root / "tokenizer")), "vocab.json")))),
        hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16, projection_dim=10,
        max_position_embeddings=40)), 14)
    saved(clap, root / "text_encoder", safe=False)
    (root / "scheduler").mkdir()
    write_sched(root / "scheduler", AUDIOLDM_SCHED)
    dec = D.load_audio_decoder(str(root))
    assert dec.kind == "audio" and isinstance(dec.sampler, samplers.DDIM) and dec._text_encoder is None  # lazy
    texts = ["", "the cat sat"]
    tok = transformers.RobertaTokenizer.from_pretrained(str(root / "tokenizer"))
    inputs = tok(texts, padding="max_length", max_length=30, truncation=True, return_tensors="pt")
    dec.tokenizer.max_length = 30  # the real one pads to 512 (CLAP's 514 positions); tiny CLAP has 40
    with torch.no_grad():
        want = torch.nn.functional.normalize(clap(**inputs).text_embeds, dim=-1)
    assert maxdiff(dec.embed_text(texts), want) <= 1e-5
    wave = dec.generate(torch.randn(1, 10), dec.embed_text([""]), seconds=0.01, steps=3, generator=0, progress=False)
    assert wave.shape == (1, 160) and torch.isfinite(wave).all()


def test_load_image_decoder_text_embedding(tmp_path, sd_unet):
    root = tmp_path / "sd"
    saved(sd_unet[0], root / "unet")
    saved(randomize(diffusers.AutoencoderKL(**SD_VAE), 15), root / "vae")
    (root / "scheduler").mkdir()
    write_sched(root / "scheduler", SD_SCHED)
    # a tiny BPE: every byte, with and without </w>, and a few merges
    byte_chars = list(bpe.bytes_to_unicode().values())
    merges = [("c", "a"), ("ca", "t</w>"), ("a", "</w>")]
    vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    tok_dir = root / "tokenizer"
    tok_dir.mkdir()
    (tok_dir / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (tok_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    (tok_dir / "special_tokens_map.json").write_text(json.dumps({"pad_token": "<|endoftext|>"}))
    clip = randomize(transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=12, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=77, bos_token_id=len(vocab) - 2, eos_token_id=len(vocab) - 1)), 16)
    saved(clip, root / "text_encoder")
    dec = D.load_image_decoder(str(root), sampler="ddim")
    assert isinstance(dec.sampler, samplers.DDIM) and isinstance(dec.unet, D.UNet2D)
    # the tokenizer itself is compared with transformers' in test_clip_tokenizer_from_encoder
    ids = bpe.CLIPTokenizer.from_folder(str(tok_dir))(["", "a cat"], context_length=77)
    assert ids[0, :3].tolist() == [len(vocab) - 2, len(vocab) - 1, len(vocab) - 1]  # SOT, EOT, padded with EOT
    with torch.no_grad():
        want = clip(ids).last_hidden_state
    got = dec.embed_text(["", "a cat"])
    assert got.shape == (2, 77, 12) and maxdiff(got, want) <= 1e-4
    img = dec.generate(got[1:], got[:1], steps=2, height=16, width=16, generator=0, progress=False)
    assert img.shape == (1, 3, 16, 16) and 0 <= img.min() and img.max() <= 1


def test_tiny_presets_run():
    """The `tiny` presets (tests, toy world) build with random weights and produce the documented shapes."""
    torch.manual_seed(0)
    unet, vae = D.UNet2D(D.UNetConfig.preset("tiny")).eval(), D.VAE(D.VAEConfig.preset("tiny")).eval()
    voc = D.HiFiGAN(D.HiFiGANConfig.preset("tiny")).eval()
    clip, clap = D.CLIPTextEncoder(D.CLIPTextConfig.preset("tiny")), D.CLAPTextEncoder(D.CLAPTextConfig.preset("tiny"))
    with torch.no_grad():
        assert unet(torch.randn(2, 4, 8, 8), 10, torch.randn(2, 5, 32)).shape == (2, 4, 8, 8)
        mean, logvar = vae.encode(torch.randn(1, 3, 16, 16))
        assert mean.shape == logvar.shape == (1, 4, 8, 8) and vae.decode(mean).shape == (1, 3, 16, 16)
        assert voc(torch.randn(1, 7, 16)).shape == (1, 7 * 8)
        assert clip(torch.randint(0, 1000, (2, 77))).shape == (2, 77, 32)
        assert clap(torch.randint(0, 1000, (2, 9)), torch.ones(2, 9, dtype=torch.long)).shape == (2, 16)
        img = D.generate_image(unet, vae, samplers.DDIM(), torch.randn(1, 5, 32), torch.zeros(1, 5, 32), steps=2,
                               height=16, width=16, generator=0, progress=False)
    assert img.shape == (1, 3, 16, 16) and 0 <= img.min() and img.max() <= 1
