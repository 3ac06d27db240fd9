"""
The samplers of the three decoders, written from scratch with diffusers' names, defaults and arithmetic: DDIM
(Zeroscope, AudioLDM), PNDM's PLMS steps (Stable Diffusion 1.5) and DPM-Solver++ 2M, all deterministic (eta 0), plus
the forward process training needs (add_noise, and the target a UNet predicts: the noise, or v). Each is built from
keyword arguments or a diffusers `scheduler/scheduler_config.json`.

References
- Ho et al. 2020, Denoising Diffusion Probabilistic Models, https://arxiv.org/abs/2006.11239 (the forward process)
- Song et al. 2021, Denoising Diffusion Implicit Models (DDIM), https://arxiv.org/abs/2010.02502
- Liu et al. 2022, Pseudo Numerical Methods for Diffusion Models (PNDM), https://arxiv.org/abs/2202.09778
- Lu et al. 2022, DPM-Solver++, https://arxiv.org/abs/2211.01095
- Salimans & Ho 2022, Progressive Distillation (v-prediction), https://arxiv.org/abs/2202.00512; Lin et al. 2024,
  Common Diffusion Noise Schedules and Sample Steps are Flawed (zero terminal SNR), https://arxiv.org/abs/2305.08891
- diffusers: schedulers/scheduling_ddim.py, scheduling_pndm.py, scheduling_dpmsolver_multistep.py
"""

import math
import os

import numpy as np
import torch

from weights import read_json


class Sampler:
    """
    What the three samplers share: the training noise schedule and add_noise (the forward process, for training).
    Built from keyword arguments (diffusers' names and defaults) or a scheduler_config.json. All arithmetic on the
    schedule stays in fp32 0-dim tensors, as in diffusers, so trajectories match it to float rounding.
    """
    defaults = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                    trained_betas=None, prediction_type="epsilon", timestep_spacing="leading", steps_offset=0)
    fixed = {}  # options we accept only at these values (anything else is a different algorithm)
    init_noise_sigma = 1.0  # all three start from plain N(0, I)

    def __init__(self, **kw):
        unknown = set(kw) - set(self.defaults) - set(self.fixed)
        if unknown:
            raise TypeError(f"{type(self).__name__}: unknown options {sorted(unknown)}")
        for k, v in self.fixed.items():
            if k in kw and kw[k] != v:
                raise NotImplementedError(f"{type(self).__name__}: only {k}={v!r} is implemented (got {kw[k]!r})")
        self.config = {**self.defaults, **{k: v for k, v in kw.items() if k in self.defaults}}
        c = self.config
        self.num_train_timesteps = N = c["num_train_timesteps"]
        if c["trained_betas"] is not None:
            betas = torch.tensor(c["trained_betas"], dtype=torch.float32)
        elif c["beta_schedule"] == "linear":
            betas = torch.linspace(c["beta_start"], c["beta_end"], N, dtype=torch.float32)
        elif c["beta_schedule"] == "scaled_linear":  # LDM's schedule: linear in sqrt(beta)
            betas = torch.linspace(c["beta_start"] ** 0.5, c["beta_end"] ** 0.5, N, dtype=torch.float32) ** 2
        else:
            raise NotImplementedError(f"beta_schedule {c['beta_schedule']!r}")
        if c.get("rescale_betas_zero_snr"):
            betas = zero_terminal_snr(betas)
        if c["prediction_type"] not in ("epsilon", "v_prediction"):
            raise NotImplementedError(f"prediction_type {c['prediction_type']!r}")
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)  # abar_t, (N,)
        # DDIM / PNDM: the abar after the last step, 1 (a clean image) or, as SD-family configs say, abar_0
        self.final_alpha_cumprod = torch.tensor(1.0) if c.get("set_alpha_to_one", True) else self.alphas_cumprod[0]
        self.timesteps = None
        self.num_inference_steps = None

    @classmethod
    def from_pretrained(cls, folder: str, **overrides) -> "Sampler":
        """A diffusers `scheduler/` folder (scheduler_config.json). Options of other schedulers are ignored."""
        d = read_json(os.path.join(folder, "scheduler_config.json"))
        known = set(cls.defaults) | set(cls.fixed)
        return cls(**{**{k: v for k, v in d.items() if k in known}, **overrides})

    def _spaced(self, n, drop_zero=False):
        """
        Training timesteps for n inference steps, decreasing, as diffusers' timestep_spacing computes them (numpy,
        for its exact rounding). drop_zero (DPM-Solver): space n + 1 points and drop the last; it steps to sigma 0.
        """
        N, spacing, offset = self.num_train_timesteps, self.config["timestep_spacing"], self.config["steps_offset"]
        m = n + 1 if drop_zero else n
        if spacing == "linspace":
            ts = np.linspace(0, N - 1, m).round()[::-1]
        elif spacing == "leading":  # 50 steps: 980, 960, ..., 0, then + steps_offset
            ts = (np.arange(0, m) * (N // m)).round()[::-1] + offset
        elif spacing == "trailing":  # 50 steps: 999, 979, ..., 19
            return np.round(np.arange(N, 0, -N / n)).astype(np.int64) - 1
        else:
            raise ValueError(f"timestep_spacing {spacing!r}: use 'linspace', 'leading' or 'trailing'")
        return (ts[:-1] if drop_zero else ts).astype(np.int64)

    def _abar(self, t, x0):
        abar = self.alphas_cumprod.to(device=x0.device, dtype=x0.dtype)[torch.as_tensor(t, device=x0.device)]
        return abar.reshape(abar.shape + (1,) * (x0.ndim - abar.ndim))  # (B,) -> (B, 1, 1, 1)

    def add_noise(self, x0, noise, t):
        """q(x_t | x_0) = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise; t (B,) or an int."""
        abar = self._abar(t, x0)
        return abar ** 0.5 * x0 + (1 - abar) ** 0.5 * noise

    def target(self, x0, noise, t):
        """What the UNet learns to output at t: the noise, or v = sqrt(abar) noise - sqrt(1 - abar) x0."""
        if self.config["prediction_type"] == "epsilon":
            return noise
        abar = self._abar(t, x0)
        return abar ** 0.5 * noise - (1 - abar) ** 0.5 * x0

    def _x0_eps(self, out, x, abar):
        """The model output as (x0, eps) at noise level abar."""
        if self.config["prediction_type"] == "epsilon":
            return (x - (1 - abar) ** 0.5 * out) / abar ** 0.5, out
        return abar ** 0.5 * x - (1 - abar) ** 0.5 * out, abar ** 0.5 * out + (1 - abar) ** 0.5 * x  # v


def zero_terminal_snr(betas):
    """
    Lin et al. 2024 (diffusers rescale_zero_terminal_snr): shift and scale sqrt(abar) so that abar is 0 at the last
    timestep (pure noise, as sampling starts) and unchanged at the first. Without it abar_T > 0, and at high noise a
    model learns to read the image from what is left of it in x_T, which pure noise does not have.
    """
    s = torch.cumprod(1.0 - betas, dim=0).sqrt()
    s0, sT = s[0].clone(), s[-1].clone()
    abar = ((s - sT) * s0 / (s0 - sT)) ** 2
    return 1 - torch.cat([abar[:1], abar[1:] / abar[:-1]])


class DDIM(Sampler):
    """diffusers DDIMScheduler with eta = 0 (Zeroscope's and AudioLDM's default)."""
    defaults = {**Sampler.defaults, "clip_sample": True, "clip_sample_range": 1.0, "set_alpha_to_one": True,
                "rescale_betas_zero_snr": False}
    fixed = {"thresholding": False}

    def set_timesteps(self, n, device=None):
        self.num_inference_steps = n
        self.timesteps = torch.from_numpy(self._spaced(n).copy()).to(device)

    def step(self, out, t, x):
        t = int(t)
        prev = t - self.num_train_timesteps // self.num_inference_steps
        abar = self.alphas_cumprod[t]
        abar_prev = self.alphas_cumprod[prev] if prev >= 0 else self.final_alpha_cumprod
        x0, eps = self._x0_eps(out, x, abar)
        if self.config["clip_sample"]:
            r = self.config["clip_sample_range"]
            x0 = x0.clamp(-r, r)
        # deterministic DDIM: jump to abar_prev along the predicted (x0, eps)
        return abar_prev ** 0.5 * x0 + (1 - abar_prev) ** 0.5 * eps


class PNDM(Sampler):
    """
    diffusers PNDMScheduler with skip_prk_steps (Stable Diffusion 1.5's default): pseudo linear multistep (PLMS).
    The second timestep repeats; there the first step is redone with the mean of two eps (a Heun-like start).
    """
    defaults = {**Sampler.defaults, "set_alpha_to_one": False}
    fixed = {"skip_prk_steps": True}

    def set_timesteps(self, n, device=None):
        self.num_inference_steps = n
        ts = self._spaced(n)[::-1]  # increasing
        plms = np.concatenate([ts[:-1], ts[-2:-1], ts[-1:]])[::-1].copy()  # 50 steps: 981, 961, 961, 941, ..., 1
        self.timesteps = torch.from_numpy(plms.astype(np.int64)).to(device)
        self.ets, self.counter, self.cur_sample = [], 0, None

    def step(self, out, t, x):
        t = int(t)
        prev = t - self.num_train_timesteps // self.num_inference_steps
        if self.counter != 1:
            self.ets = self.ets[-3:] + [out]
        else:  # the repeated timestep: redo the first step from the stored sample
            prev, t = t, t + self.num_train_timesteps // self.num_inference_steps
        e = self.ets
        if len(e) == 1 and self.counter == 0:
            self.cur_sample = x
        elif len(e) == 1 and self.counter == 1:
            out, x, self.cur_sample = (out + e[-1]) / 2, self.cur_sample, None
        elif len(e) == 2:
            out = (3 * e[-1] - e[-2]) / 2
        elif len(e) == 3:
            out = (23 * e[-1] - 16 * e[-2] + 5 * e[-3]) / 12
        else:
            out = (1 / 24) * (55 * e[-1] - 59 * e[-2] + 37 * e[-3] - 9 * e[-4])
        self.counter += 1
        return self._prev_sample(x, t, prev, out)

    def _prev_sample(self, x, t, prev, out):
        """PNDM's transfer: x_prev = sqrt(ap/a) x - (ap - a) eps / (a sqrt(1-ap) + sqrt(a (1-a) ap)), eq. (11)."""
        a = self.alphas_cumprod[t]
        ap = self.alphas_cumprod[prev] if prev >= 0 else self.final_alpha_cumprod
        if self.config["prediction_type"] == "v_prediction":
            out = a ** 0.5 * out + (1 - a) ** 0.5 * x
        denom = a * (1 - ap) ** 0.5 + (a * (1 - a) * ap) ** 0.5
        return (ap / a) ** 0.5 * x - (ap - a) * out / denom


class DPMSolver(Sampler):
    """
    diffusers DPMSolverMultistepScheduler as DPM-Solver++ 2M (midpoint), final sigma 0: a second-order multistep
    solver in data (x0) prediction; the first and the last steps are first order.
    """
    defaults = {**Sampler.defaults, "timestep_spacing": "linspace", "lower_order_final": True}
    fixed = {"solver_order": 2, "algorithm_type": "dpmsolver++", "solver_type": "midpoint", "thresholding": False,
             "use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False,
             "use_lu_lambdas": False, "use_flow_sigmas": False, "final_sigmas_type": "zero", "euler_at_final": False,
             "lambda_min_clipped": -math.inf, "variance_type": None, "rescale_betas_zero_snr": False}

    def set_timesteps(self, n, device=None):
        ts = self._spaced(n, drop_zero=True)
        sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5  # (N,) fp32
        # diffusers np.interp's sigma at the (integer) timesteps: the table's own values; then the final sigma 0
        self.sigmas = torch.cat([sigmas[torch.from_numpy(ts.copy())], torch.zeros(1)])  # (n + 1,)
        self.timesteps = torch.from_numpy(ts.copy()).to(device)
        self.num_inference_steps = len(ts)
        self.x0s, self.lower_order_nums, self.step_index = [None, None], 0, 0

    @staticmethod
    def _alpha_sigma_lambda(sigma):
        alpha = 1 / (sigma ** 2 + 1) ** 0.5
        sigma = sigma * alpha
        return alpha, sigma, torch.log(alpha) - torch.log(sigma)  # lambda = log-SNR / 2 (inf at sigma 0)

    def step(self, out, t, x):
        i = self.step_index
        alpha_s0, sigma_s0, lambda_s0 = self._alpha_sigma_lambda(self.sigmas[i])
        if self.config["prediction_type"] == "epsilon":
            x0 = (x - sigma_s0 * out) / alpha_s0
        else:
            x0 = alpha_s0 * x - sigma_s0 * out
        self.x0s = [self.x0s[-1], x0]
        x = x.float()
        alpha_t, sigma_t, lambda_t = self._alpha_sigma_lambda(self.sigmas[i + 1])
        h = lambda_t - lambda_s0
        if self.lower_order_nums < 1 or i == len(self.timesteps) - 1:
            # DPM-Solver++ 1 (= DDIM in x0 form)
            x = (sigma_t / sigma_s0) * x - (alpha_t * (torch.exp(-h) - 1.0)) * x0
        else:
            _, _, lambda_s1 = self._alpha_sigma_lambda(self.sigmas[i - 1])
            r0 = (lambda_s0 - lambda_s1) / h
            d1 = (1.0 / r0) * (x0 - self.x0s[0])  # finite-difference slope of x0 in lambda
            x = ((sigma_t / sigma_s0) * x - (alpha_t * (torch.exp(-h) - 1.0)) * x0
                 - 0.5 * (alpha_t * (torch.exp(-h) - 1.0)) * d1)
        self.lower_order_nums = min(self.lower_order_nums + 1, 2)
        self.step_index += 1
        return x.to(x0.dtype)


SAMPLERS = {"DDIMScheduler": DDIM, "PNDMScheduler": PNDM, "DPMSolverMultistepScheduler": DPMSolver}


def load_sampler(folder: str, kind: str | None = None) -> Sampler:
    """The sampler a diffusers `scheduler/` folder names (or kind 'ddim', 'pndm', 'dpm'), with the folder's schedule."""
    if kind is None:
        name = read_json(os.path.join(folder, "scheduler_config.json")).get("_class_name")
        if name not in SAMPLERS:
            raise NotImplementedError(f"{folder}: scheduler {name!r}; pass kind='ddim', 'pndm' or 'dpm'")
        cls = SAMPLERS[name]
    else:
        cls = {"ddim": DDIM, "pndm": PNDM, "dpm": DPMSolver}[kind]
    return cls.from_pretrained(folder)
