"""ESD: erasing a concept from a diffusion model's UNet (Gandikota et al., ICCV 2023).

A frozen copy θ* of the UNet teaches a trainable θ to predict, for the concept c, noise that
points *away* from c:

    ε_θ(x_t, c, t)  →  ε_θ*(x_t, t) − η · (ε_θ*(x_t, c, t) − ε_θ*(x_t, t))      (paper, eq. 3)

``erase_from`` generalises the prompt the model is trained on (c_from, default c):

    ε_θ(x_t, c_from, t)  →  ε_f − (1 + η) · (ε_c − ε₀),   ε_f = ε_θ*(x_t, c_from, t)

which is the paper's target when c_from = c (ε_c − (1+η)(ε_c − ε₀) = ε₀ − η(ε_c − ε₀)).
x_t comes from the frozen model's own guided DDIM trajectory for c_from, stopped at a random
step, as in the paper. The frozen model does not train, so a block of iterations' x_t and
teacher predictions is computed ahead in batched calls (``ESDConfig.block``): the same
distribution of samples as one at a time, at a fraction of the calls.

Each training prompt is a triple (anchor, c, c_from), generalising ε₀ = ε_θ*(x_t, anchor, t).
The paper's form is ("", c, c). "Varied" training uses the concept in context: c = c_from =
"a blue triangle on a white background" with the anchor "a blue on a white background"
(the prompt without the concept), so the target ε(anchor) − η(ε(c) − ε(anchor)) removes the
triangle and keeps the blue: with the empty anchor it would push "blue" away too.

A training prompt may also carry a ``preserve`` prompt (the same prompt with a neighbouring
concept in the erased one's place: "a orange circle" beside "a red circle"). Its term holds
θ to θ* on that prompt at the same x_t,

    + λ · ‖ε_θ(x_t, preserve, t) − ε_θ*(x_t, preserve, t)‖²,

because the erase term alone also moves concepts whose text embedding lies close to the
erased one's (erasing red took orange from 100% to 91% on ``shapes-sd``). It rides in the
same batched calls, so it costs one more row in each, not another trajectory.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import DDIMScheduler, UNet2DConditionModel
from torch import nn

from app import jobspecs
from app.errors import InvalidParams

METHODS = ("esd-x", "esd-u", "esd-all", "esd-x-strict")
PARAMETERIZATIONS = ("full", "lora")
# A LoRA-trained edit's delta holds each matrix's factors under these suffixes (diffusers'
# PEFT names); ``full_delta`` turns them into the matrices W₀ + B·A.
LORA_A, LORA_B = ".lora_A.weight", ".lora_B.weight"


def esd_target(eps_0: torch.Tensor, eps_c: torch.Tensor, eps_f: torch.Tensor,
               eta: float) -> torch.Tensor:
    """ε_f − (1 + η)(ε_c − ε₀); with ε_f = ε_c this is the paper's ε₀ − η(ε_c − ε₀)."""
    return eps_f - (1 + eta) * (eps_c - eps_0)


def student_unet(unet: nn.Module, method: str, copied: bool = True
                 ) -> tuple[Any, dict[str, nn.Parameter]]:
    """A training copy of ``unet`` for ``method`` and the parameters it trains, by name.

    Only the trained set is new memory (``copied``: float32 copies, since Adam's small
    steps vanish in half precision); every other parameter and every buffer is ``unet``'s
    own tensor, frozen, as an edited variant shares its base's. With ``copied`` false
    nothing is copied (a LoRA beside the chosen matrices trains instead). ``unet`` itself
    is untouched: its parameters are wrapped, not re-flagged.
    """
    chosen = set(select_parameters(unet, method)) if copied else set()
    memo: dict[int, Any] = {id(b): b for b in unet.buffers()}
    for name, p in unet.named_parameters():
        memo[id(p)] = (nn.Parameter(p.detach().float().clone()) if name in chosen
                       else nn.Parameter(p.detach(), requires_grad=False))
    student = copy.deepcopy(unet, memo).train()
    return student, select_parameters(student, method)


def _in_cross_attention(name: str) -> bool:
    return ".attn2." in f".{name}"


def select_parameters(unet: nn.Module, method: str) -> dict[str, nn.Parameter]:
    """The UNet parameters a method trains, by name.

    esd-x: every parameter of the cross-attention (``attn2``) modules; esd-x-strict: only
    their key and value projections; esd-u: every Linear/Conv parameter outside ``attn2``
    (the paper's "non-cross-attention"); esd-all: everything.
    """
    if method not in METHODS:
        raise InvalidParams(f"`method` must be one of {list(METHODS)}, got {method!r}")
    chosen: dict[str, nn.Parameter] = {}
    for module_name, module in unet.named_modules():
        for pname, param in module.named_parameters(recurse=False):
            name = f"{module_name}.{pname}" if module_name else pname
            cross = _in_cross_attention(name)
            if method == "esd-all":
                keep = True
            elif method == "esd-x":
                keep = cross
            elif method == "esd-x-strict":
                keep = cross and (".to_k." in name or ".to_v." in name)
            else:  # esd-u
                keep = not cross and isinstance(module, (nn.Linear, nn.Conv2d))
            if keep:
                chosen[name] = param
    if not chosen:
        raise InvalidParams(
            f"`method` {method!r} selects no parameter of this UNet (it has no "
            f"{'cross-attention' if 'x' in method else 'matching'} layers)"
        )
    return chosen


@dataclass(frozen=True)
class ESDPrompt:
    """One training prompt: erase ``concept`` (c) as seen by ``prompt`` (c_from), measured
    against ``anchor`` (ε₀'s prompt)."""

    concept: str
    prompt: str
    anchor: str = ""
    preserve: str | None = None  # a prompt whose prediction must stay θ*'s


@dataclass(frozen=True)
class ESDConfig:
    concepts: tuple[str, ...]
    method: str = "esd-x"
    iterations: int = jobspecs.ERASE_ITERATIONS
    learning_rate: float = jobspecs.ERASE_LEARNING_RATE
    negative_guidance: float = jobspecs.ERASE_NEGATIVE_GUIDANCE  # η
    # λ of the preservation term (prompts that carry one)
    preserve_weight: float = jobspecs.PRESERVE_WEIGHT
    # Hold a preserved prompt at x_t from its own trajectory, not from the erased concept's.
    # Off: on shapes-sd (erasing triangle) it left the neighbours' same-seed drift worse,
    # PSNR 10.6 against 13.7 dB with esd-x and 17.6 against 21.3 with esd-x-strict
    # (python -m worker.domains.shapes.erase_study --preserve-trajectory on off).
    preserve_trajectory: bool = False
    erase_from: str | None = None
    ddim_steps: int = jobspecs.ERASE_DDIM_STEPS
    # guidance of the frozen model's trajectory to x_t
    start_guidance: float = jobspecs.ERASE_START_GUIDANCE
    seed: int = 0
    # Training prompts taken in turn (a repeated one weighs more). Empty: each concept as
    # its own prompt with the empty anchor (the paper's form).
    prompts: tuple[ESDPrompt, ...] = ()
    height: int = 32
    width: int = 32
    # Iterations whose trajectories and teacher predictions are computed together, and the
    # most rows one teacher call takes (bounds memory for large latents; None: as many as
    # make 65,536 latent pixels, at most 64: 16 rows at SD 1.5's 64×64 latents).
    block: int = 8
    max_rows: int | None = None
    # "full": the method's parameters themselves train; "lora": a rank-``lora_rank`` B·A
    # beside each of its matrices does (biases stay), through diffusers' own PEFT adapters.
    parameterization: str = "full"
    lora_rank: int = 4
    # Iterations drawn from one teacher trajectory, each at its own random stop: 1 is the
    # paper (a fresh trajectory per iteration). Each sample keeps the paper's distribution
    # (a uniform stop on a guided trajectory from fresh noise); ``per`` of them share the
    # trajectory's noise and prompt, and the trajectory costs the furthest stop of them,
    # not the sum.
    stops_per_trajectory: int = 1
    # Robust training, in the spirit of AdvUnlearn (Zhang et al. 2024): every
    # ``robust_every`` iterations, per trained prompt an offset δ on the text encoder's
    # output is searched that brings the concept back in the *current* student (its
    # prediction at c_from + δ pulled to the teacher's at c_from), ‖δ‖ ≤ ``robust_budget`` ×
    # the prompt encoding's norm, ``robust_steps`` normalised gradient steps of
    # ``robust_lr`` × that bound each; the student then also learns the ESD target under
    # c_from + δ.
    robust: bool = False
    robust_budget: float = 1.0
    robust_steps: int = 4
    robust_lr: float = 0.25
    # Iterations between searches (a divisor of ``block``): each search learns from the
    # samples of the iterations it precedes.
    robust_every: int = 8
    # One offset for every trained prompt (as the conditioning attack learns one), searched
    # on all of a block's rows, instead of one per prompt from its own rows.
    robust_shared: bool = False
    # Recompute θ's activations in the backward pass instead of keeping them: less memory
    # on large UNets for about one more forward pass; the same numbers.
    gradient_checkpointing: bool = False


# How an erase job samples: 32 iterations' trajectories side by side, 4 iterations from
# each (``stops_per_trajectory``). bench/RESULTS.md measures it against the paper's loop and
# against one trajectory an iteration: the same erasure, neighbours and drift, faster.
JOB_SAMPLING: dict[str, int] = {"block": 32, "stops_per_trajectory": 4}


# One iteration's sample: x_t, t, the target, θ*'s prediction for the preserved prompt and
# the x_t it was made at (None: the same x_t), and θ*'s prediction for c_from (what a robust
# erase's adversary pulls the student back to).
Sample = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None,
               torch.Tensor | None, torch.Tensor]


@dataclass
class ESDState:
    iteration: int
    losses: list[float]


def encode_prompts(pipe: Any, prompts: list[str]) -> torch.Tensor:
    """Stable Diffusion 1.x/2.x: the text encoder's last hidden states, one row a prompt."""
    tok = pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt")
    with torch.no_grad():
        return pipe.text_encoder(tok.input_ids.to(pipe.text_encoder.device))[0]


def encode_conditioning(pipe: Any, prompts: list[str]
                        ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per prompt, what the UNet is conditioned on: the hidden states, and with SDXL's two
    encoders also the pooled embedding (its ``added_cond_kwargs``), encoded as the pipeline
    itself encodes them."""
    if getattr(pipe, "text_encoder_2", None) is None:
        return encode_prompts(pipe, prompts), None
    with torch.no_grad():
        hidden, _, pooled, _ = pipe.encode_prompt(
            prompts, device=pipe.unet.device, num_images_per_prompt=1,
            do_classifier_free_guidance=False)
    if pipe.config.get("force_zeros_for_empty_prompt", False):
        # SDXL draws its unconditional branch from zeros, not from "": so does ESD's.
        empty = torch.tensor([p == "" for p in prompts], device=hidden.device)
        hidden = torch.where(empty[:, None, None], torch.zeros_like(hidden), hidden)
        pooled = torch.where(empty[:, None], torch.zeros_like(pooled), pooled)
    return hidden, pooled


class ESDTrainer:
    """Train a copy of ``pipe.unet`` to forget ``cfg.concepts``; ``pipe`` itself is unchanged."""

    def __init__(self, pipe: Any, cfg: ESDConfig, reference: Any = None):
        self.pipe, self.cfg = pipe, cfg
        # The model retrained without the concept (``worker.reference``): given, θ learns its
        # prediction for c_from instead of ESD's target (the edit erases to what a model
        # that never saw the concept draws; its text encoder encodes its own prompts).
        self.reference = reference
        self._ref_emb: dict[str, torch.Tensor] = {}
        self.frozen: UNet2DConditionModel = pipe.unet  # θ*: never written to
        if cfg.parameterization not in PARAMETERIZATIONS:
            raise InvalidParams(f"`parameterization` must be one of {list(PARAMETERIZATIONS)}, "
                                f"got {cfg.parameterization!r}")
        lora = cfg.parameterization == "lora"
        # θ holds only what it trains (no second whole UNet): see ``student_unet``.
        self.unet, self.params = student_unet(pipe.unet, cfg.method, copied=not lora)
        if lora:
            self.params = _add_lora(self.unet, self.params, cfg)
        if cfg.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        for p in self.params.values():
            p.requires_grad_(True)
        self.optimizer = torch.optim.Adam(self.params.values(), lr=cfg.learning_rate)
        self.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        self.scheduler.set_timesteps(cfg.ddim_steps)
        self.device = self.frozen.device
        self.dtype = self.frozen.dtype
        # θ's shared tensors are in θ*'s precision, its trained ones in float32: a half-
        # precision θ* runs θ under autocast (matrix products in half precision, gradients
        # and Adam's state in float32 for the trained set).
        self._autocast = (torch.autocast(self.device.type, dtype=self.dtype)
                          if self.dtype in (torch.float16, torch.bfloat16)
                          else contextlib.nullcontext())
        self.prompts = list(cfg.prompts or [ESDPrompt(c, c) for c in cfg.concepts])
        # The empty prompt is always needed: the trajectory's unconditional branch.
        texts = ["", *(t for p in self.prompts for t in (p.concept, p.prompt, p.anchor))]
        texts += [p.preserve for p in self.prompts if p.preserve is not None]
        texts += [cfg.erase_from] if cfg.erase_from else []
        self.emb: dict[str, torch.Tensor] = {}
        # SDXL: the pooled embeddings and the size/crop time ids (original size, crop
        # corner, target size: the training size, uncropped) its UNet also takes.
        self.pooled: dict[str, torch.Tensor] | None = None
        self._encode(texts)
        self.time_ids = torch.tensor([[cfg.height, cfg.width, 0, 0, cfg.height, cfg.width]],
                                     device=self.device, dtype=self.dtype)
        if cfg.block < 1:
            raise InvalidParams(f"`block` must be at least 1, got {cfg.block}")
        per = cfg.stops_per_trajectory
        if per < 1 or cfg.block % per:
            raise InvalidParams(f"`stops_per_trajectory` must divide `block` ({cfg.block}), "
                                f"got {per}")
        if per > 1 and cfg.preserve_trajectory:
            raise InvalidParams("`preserve_trajectory` draws a trajectory per iteration: "
                                f"`stops_per_trajectory` must be 1, got {per}")
        self.state = ESDState(0, [])
        self._block: tuple[int, list[Sample]] | None = None
        # Robust training's offsets (per c_from text, or one shared), and the round of
        # ``robust_every`` iterations they were searched for.
        self.offsets: dict[str, torch.Tensor] = {}
        self._offset_round: int | None = None
        if cfg.robust and (cfg.robust_every < 1 or cfg.block % cfg.robust_every):
            raise InvalidParams(f"`robust_every` must divide `block` ({cfg.block}), got "
                                f"{cfg.robust_every}")
        pixels = math.prod(self._latent_shape(1)[2:])
        self.max_rows = cfg.max_rows or max(1, min(64, 65_536 // pixels))

    def _latent_shape(self, n: int) -> tuple[int, ...]:
        f = self.pipe.vae_scale_factor
        return (n, self.frozen.config.in_channels, self.cfg.height // f, self.cfg.width // f)

    def _encode(self, texts: list[str]) -> None:
        new = [t for t in dict.fromkeys(texts) if t not in self.emb]
        if not new:
            return
        hidden, pooled = encode_conditioning(self.pipe, new)
        self.emb.update(zip(new, hidden, strict=True))
        if pooled is not None:
            self.pooled = (self.pooled or {}) | dict(zip(new, pooled, strict=True))

    def _cond(self, texts: list[str], dtype: torch.dtype) -> dict[str, Any]:
        """The UNet's conditioning arguments for one row per text."""
        self._encode(texts)
        cond: dict[str, Any] = {"encoder_hidden_states": torch.stack(
            [self.emb[t] for t in texts]).to(dtype)}
        if self.pooled is not None:
            cond["added_cond_kwargs"] = {
                "text_embeds": torch.stack([self.pooled[t] for t in texts]).to(dtype),
                "time_ids": self.time_ids.to(dtype).expand(len(texts), -1)}
        return cond

    @torch.no_grad()
    def _teacher(self, x: torch.Tensor, t: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """θ*'s predictions for rows of (x, t, prompt), at most ``max_rows`` per call."""
        step = self.max_rows
        return torch.cat([self.frozen(x[i:i + step], t[i:i + step],
                                      **self._cond(texts[i:i + step], self.dtype)).sample
                          for i in range(0, len(x), step)])

    @torch.no_grad()
    def _draw_block(self, block: int) -> list[Sample]:
        """x_t, t and the teacher's targets for the iterations of ``block``, drawn together.

        Each iteration still gets its own fresh trajectory and stopping step, as in the
        paper; the trajectories run side by side (one UNet call per DDIM step for all of
        them, each dropping out at its stop) and every teacher prediction of the block is
        one batched call. Each iteration's noise and stop come from a generator seeded by
        its index, so a resumed job, or another block size, draws the same samples.
        """
        cfg, per = self.cfg, self.cfg.stops_per_trajectory
        # Always a whole block, past the last iteration too: the same batches every time,
        # so a resumed job's numbers are bit-identical to an uninterrupted one's.
        iters = range(block * cfg.block, (block + 1) * cfg.block)
        # The ``per`` iterations of a trajectory share its prompt (and its noise: the
        # first's); each has its own stop.
        prompts = [self._prompt_of(i) for i in iters]
        stops, noise = [], []
        for i in iters:
            g = torch.Generator("cpu").manual_seed(cfg.seed * 1_000_003 + i)
            stops.append(int(torch.randint(0, cfg.ddim_steps, (1,), generator=g)))
            z = torch.randn(self._latent_shape(1), generator=g)
            if i % per == 0:
                noise.append(z)
        n = len(iters)
        # With ``preserve_trajectory``, a preserved prompt's x_t comes from its own guided
        # trajectory (from the same noise, stopped at the same step): rows n.. of x.
        own = [j for j, p in enumerate(prompts)
               if p.preserve is not None and cfg.preserve_trajectory]
        stops_t = torch.tensor(stops + [stops[j] for j in own])
        # Trajectory rows: one per ``per`` iterations, then the preserved prompts' own; each
        # sample (row, stop) is taken when its row has run ``stop`` steps.
        taken = [(j // per, stops[j]) for j in range(n)] + [
            (n // per + k, stops[j]) for k, j in enumerate(own)]
        ends = torch.tensor([max(stops[r * per:(r + 1) * per]) for r in range(n // per)]
                            + [stops[j] for j in own])
        traj = torch.cat(noise + [noise[j] for j in own]).to(self.device, self.dtype) \
            * self.scheduler.init_noise_sigma
        froms = [self._from(prompts[r * per]) for r in range(n // per)] + [
            prompts[j].preserve for j in own]
        x = torch.empty((len(taken), *traj.shape[1:]), device=self.device, dtype=self.dtype)
        for k in range(int(ends.max()) + 1):
            for j, (row, stop) in enumerate(taken):
                if stop == k:
                    x[j] = traj[row]
            if k == int(ends.max()):
                break
            t = self.scheduler.timesteps[k]
            run = (ends > k).nonzero().flatten().to(self.device)  # still on their way
            xr = traj[run]
            texts = [""] * len(run) + [froms[i] for i in run.tolist()]
            rows_t = t.to(self.device).expand(2 * len(run))
            eps_u, eps_c = self._teacher(torch.cat([xr, xr]), rows_t, texts).chunk(2)
            guided = eps_u + cfg.start_guidance * (eps_c - eps_u)
            traj[run] = self.scheduler.step(guided, t, xr).prev_sample
        ts = self.scheduler.timesteps[stops_t].to(self.device)
        # Teacher rows per iteration: anchor, concept, c_from, and the preserved prompt.
        rows = [[p.anchor, p.concept, self._from(p)]
                + ([p.preserve] if p.preserve is not None else []) for p in prompts]
        own_x = {j: n + k for k, j in enumerate(own)}  # a preserved row's own x_t
        owner = [own_x.get(j, j) if r_i == 3 else j
                 for j, r in enumerate(rows) for r_i in range(len(r))]
        eps = self._teacher(x[owner], ts[owner], [e for r in rows for e in r]).split(
            [len(r) for r in rows])
        taught = self._reference_targets(x[:n], ts[:n], [self._from(p) for p in prompts])
        out: list[Sample] = []
        for j, e in enumerate(eps):
            target = (esd_target(e[0:1], e[1:2], e[2:3], cfg.negative_guidance)
                      if taught is None else taught[j:j + 1])
            keep_x = x[own_x[j]:own_x[j] + 1] if j in own_x else None
            out.append((x[j:j + 1], ts[j:j + 1], target, e[3:4] if len(e) > 3 else None,
                        keep_x, e[2:3]))
        return out

    @torch.no_grad()
    def _reference_targets(self, x: torch.Tensor, t: torch.Tensor, texts: list[str]
                           ) -> torch.Tensor | None:
        """The reference's predictions for rows of (x, t, prompt), its own encoder's
        encodings; None without a reference."""
        ref = self.reference
        if ref is None:
            return None
        new = [t_ for t_ in dict.fromkeys(texts) if t_ not in self._ref_emb]
        if new:
            self._ref_emb.update(zip(new, encode_prompts(ref, new), strict=True))
        step = self.max_rows
        return torch.cat([ref.unet(x[i:i + step].to(ref.unet.dtype), t[i:i + step],
                                   encoder_hidden_states=torch.stack(
                                       [self._ref_emb[s] for s in texts[i:i + step]])).sample
                          for i in range(0, len(x), step)]).to(self.dtype)

    def _search_offsets(self, samples: list[Sample], first: int) -> None:
        """Robust training's adversary: for each c_from text of the block, the offset on its
        encoding that best brings the concept back in the current student (see
        ``ESDConfig.robust``), started from the last block's."""
        cfg = self.cfg
        by_key: dict[str, list[int]] = {}
        for j in range(len(samples)):
            by_key.setdefault(self._offset_key(first + j), []).append(j)
        for key, rows in by_key.items():
            texts = [self._from(self._prompt_of(first + j)) for j in rows]
            base = self._cond(texts, torch.float32)
            radius = cfg.robust_budget * float(
                base["encoder_hidden_states"].flatten(1).norm(dim=1).mean())
            delta = self.offsets.get(key, torch.zeros_like(base["encoder_hidden_states"][0]))
            x = torch.cat([samples[j][0] for j in rows]).float()
            t = torch.cat([samples[j][1] for j in rows])
            goal = torch.cat([samples[j][5] for j in rows]).float()
            for _ in range(cfg.robust_steps):
                delta = delta.detach().requires_grad_(True)
                cond = base | {"encoder_hidden_states": base["encoder_hidden_states"] + delta}
                loss = nn.functional.mse_loss(self._student(x, t, cond).float(), goal)
                (grad,) = torch.autograd.grad(loss, [delta])
                with torch.no_grad():
                    delta = delta - cfg.robust_lr * radius * grad / (grad.norm() + 1e-12)
                    norm = float(delta.norm())
                    if norm > radius:
                        delta = delta * (radius / norm)
            self.offsets[key] = delta.detach()
        self._offset_round = first // cfg.robust_every

    def _offset_key(self, i: int) -> str:
        """Whose adversarial offset iteration ``i`` trains under: its c_from text's, or with
        ``robust_shared`` the one offset of every prompt."""
        return "*" if self.cfg.robust_shared else self._from(self._prompt_of(i))

    def _student(self, x: torch.Tensor, t: torch.Tensor, cond: dict[str, Any]) -> torch.Tensor:
        """θ's prediction, with gradients to its trained set."""
        with self._autocast:
            return self.unet(x, t, **cond).sample

    def _prompt_of(self, i: int) -> ESDPrompt:
        """Iteration ``i``'s training prompt: taken in turn, one per trajectory."""
        return self.prompts[(i // self.cfg.stops_per_trajectory) % len(self.prompts)]

    def _from(self, p: ESDPrompt) -> str:
        """The text θ is trained on for ``p`` (c_from)."""
        return self.cfg.erase_from or p.prompt

    def step(self) -> float:
        cfg = self.cfg
        i = self.state.iteration
        block = i // cfg.block
        if self._block is None or self._block[0] != block:
            self._block = (block, self._draw_block(block))
        if cfg.robust and self._offset_round != i // cfg.robust_every:
            first = i // cfg.robust_every * cfg.robust_every
            at = first - block * cfg.block
            self._search_offsets(self._block[1][at:at + cfg.robust_every], first)
        x_t, t, target, keep_eps, keep_x, _ = self._block[1][i - block * cfg.block]
        p = self._prompt_of(i)
        held = [p.preserve] if keep_eps is not None and p.preserve is not None else []
        student = [self._from(p), *held]
        x_in = x_t.expand(len(student), -1, -1, -1) if keep_x is None else torch.cat([x_t, keep_x])
        if cfg.robust:  # one more row: c_from under the adversary's offset, the same target
            x_in, student = torch.cat([x_in, x_t]), [*student, self._from(p)]
        cond = self._cond(student, torch.float32)
        if cfg.robust:
            cond["encoder_hidden_states"][-1] += self.offsets[self._offset_key(i)]
        pred = self._student(x_in.float(), t.expand(len(student)), cond)
        loss = nn.functional.mse_loss(pred[:1].float(), target.float())
        if cfg.robust:
            loss = loss + nn.functional.mse_loss(pred[-1:].float(), target.float())
            pred = pred[:-1]
        if keep_eps is not None:
            loss = loss + cfg.preserve_weight * nn.functional.mse_loss(pred[1:].float(),
                                                                       keep_eps.float())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.state.iteration += 1
        self.state.losses.append(loss.item())
        return loss.item()

    def train(self, on_step: Callable[[int, float], None] | None = None) -> ESDState:
        """Run to ``cfg.iterations``; ``on_step(iteration, loss)`` may raise to stop."""
        while self.state.iteration < self.cfg.iterations:
            loss = self.step()
            if on_step:
                on_step(self.state.iteration, loss)
        return self.state

    def delta(self) -> dict[str, torch.Tensor]:
        """The trained parameters only: what an edited model stores (a LoRA's factors, for
        ``parameterization="lora"``)."""
        return {name: p.detach().to(torch.float16 if self.dtype == torch.float16 else p.dtype)
                .cpu().contiguous() for name, p in self.params.items()}

    # Checkpoints: the trained parameters and Adam's state, to resume a killed job.
    def checkpoint(self) -> dict[str, Any]:
        return {"iteration": self.state.iteration, "losses": self.state.losses,
                "params": {k: v.detach().cpu().clone() for k, v in self.params.items()},
                "optimizer": self.optimizer.state_dict(),
                "offsets": {k: v.cpu().clone() for k, v in self.offsets.items()},
                "offset_round": self._offset_round,
                "time": time.time()}

    def restore(self, ckpt: dict[str, Any]) -> None:
        with torch.no_grad():
            for k, v in ckpt["params"].items():
                self.params[k].copy_(v)
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.state = ESDState(ckpt["iteration"], list(ckpt["losses"]))
        # A robust job resumed mid-round keeps the offsets that round was trained under.
        self.offsets = {k: v.to(self.device) for k, v in (ckpt.get("offsets") or {}).items()}
        self._offset_round = ckpt.get("offset_round")


def _add_lora(unet: Any, chosen: dict[str, nn.Parameter], cfg: ESDConfig
              ) -> dict[str, nn.Parameter]:
    """Put a LoRA adapter on each Linear whose weight the method trains; return the adapter
    factors by their delta names (``<module>.lora_A.weight``)."""
    from peft import LoraConfig

    if cfg.method not in ("esd-x", "esd-x-strict"):
        raise InvalidParams(f"`parameterization` 'lora' trains the cross-attention "
                            f"projections: `method` esd-x or esd-x-strict, got {cfg.method!r}")
    if not 1 <= cfg.lora_rank <= 256:
        raise InvalidParams(f"`lora_rank` must be from 1 to 256, got {cfg.lora_rank}")
    modules = dict(unet.named_modules())
    targets = sorted(n.removesuffix(".weight") for n in chosen if n.endswith(".weight")
                     and isinstance(modules.get(n.removesuffix(".weight")), nn.Linear))
    # lora_alpha = r: the factors' product is the weight change itself (scale 1).
    unet.add_adapter(LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_rank,
                                target_modules=targets, init_lora_weights=True))
    factors = {}
    for name, param in unet.named_parameters():
        if ".lora_A." in name or ".lora_B." in name:
            param.data = param.data.float()  # trained in float32 beside a half-precision W₀
            factors[name.replace(".default.", ".")] = param  # PEFT names the adapter
    return factors


def full_delta(unet: nn.Module, delta: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An edit's new parameter values: a LoRA-trained (or imported) edit's factor pairs
    become the weights W₀ + B·A on ``unet``'s own W₀; anything else is already a value."""
    if not any(k.endswith(LORA_A) for k in delta):
        return delta
    params = dict(unet.named_parameters())
    out = {k: v for k, v in delta.items() if not k.endswith((LORA_A, LORA_B))}
    for key in (k for k in delta if k.endswith(LORA_A)):
        module = key.removesuffix(LORA_A)
        weight = params.get(module + ".weight")
        if weight is None or module + LORA_B not in delta:
            raise InvalidParams(f"the delta's LoRA factors for {module!r} fit no matrix of "
                                "this UNet")
        a, b = delta[key].float().flatten(1), delta[module + LORA_B].float().flatten(1)
        if b.shape[0] * a.shape[1] != weight.numel():
            raise InvalidParams(f"the delta's LoRA factors for {module!r} make a "
                                f"{b.shape[0]}x{a.shape[1]} change; its weight is "
                                f"{list(weight.shape)}")
        # A kernel's factors multiply out to its flattened shape (out, in·kh·kw).
        change = (b @ a).reshape(weight.shape)
        out[module + ".weight"] = (weight.detach().float() + change).to(weight.dtype)
    return out


def delta_targets(unet: nn.Module, delta: dict[str, torch.Tensor]) -> dict[str, nn.Parameter]:
    """The parameters of ``unet`` that ``delta`` replaces, by name; an error if it names
    one the UNet lacks (an edit of another architecture)."""
    params = dict(unet.named_parameters())
    missing = sorted(set(delta) - set(params))
    if missing:
        raise InvalidParams(f"the delta names parameters this UNet lacks: {missing[:3]}")
    return {name: params[name] for name in delta}


def apply_delta(unet: nn.Module, delta: dict[str, torch.Tensor]) -> None:
    """Load an edit's tensors into ``unet`` in place (names as ``select_parameters`` gives,
    or a LoRA-trained edit's factors)."""
    delta = full_delta(unet, delta)
    params = delta_targets(unet, delta)
    with torch.no_grad():
        for name, value in delta.items():
            params[name].copy_(value.to(params[name].dtype))
