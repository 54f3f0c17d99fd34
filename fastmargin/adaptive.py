"""Margins that change every step: AdaFace, ElasticFace, MagFace, CurricularFace.

A schedule (MarginSchedule) turns one step's global batch into that step's Margin, with
per-row tensors (docs/design.md §1, "per-row margins"), and updates its own state (EMA
buffers) on the way, as the original code does, in eval mode too. PartialFC calls a
schedule with the all-gathered batch (fastmargin.distributed); the loss modules below are
the schedules with the class weights the original heads own, under the original
constructor arguments, defaults, parameter and buffer names, weight layout (D, C) and
initialisation, so that the originals' checkpoints load (state_dict keys equal).

    schedule   module               original (see each class for what differs)
    AdaFace    AdaFaceLoss          mk-minchul/AdaFace head.py AdaFace
    ElasticArc ElasticArcFaceLoss   fdbtrs/ElasticFace utils/losses.py ElasticArcFace
    ElasticCos ElasticCosFaceLoss   fdbtrs/ElasticFace utils/losses.py ElasticCosFace
    MagFace    MagFaceLoss          IrvingMeng/MagFace models/magface.py MagLinear + MagLoss
    Curricular CurricularFaceLoss   HuangYG123/CurricularFace head/metrics.py CurricularFace

Each module's forward returns the mean loss that F.cross_entropy gives over the original
head's logits, with the original's gradients, up to fastmargin's clamp of cos to
1 - 1e-7 (the originals' acos and sqrt(1 - cos^2) have infinite derivatives at |cos| = 1).
Labels: a row labelled ignore_index contributes nothing (the originals have no ignored
rows); statistics of the target cosines (CurricularFace's t, ElasticFace+'s ranking) leave
such rows out, statistics of the norms (AdaFace's, MagFace's regulariser) keep every row.
"""

from __future__ import annotations

import math

import torch

from . import checks
from .margins import Margin
from .modules import _OPTIONS, _MarginLoss
from .reference import target_cosines


def _compute_dtype(embeddings: torch.Tensor) -> torch.dtype:
    """The dtype of the row margins: float64 for float64 embeddings, else float32 (docs/design.md §1)."""
    return torch.float64 if embeddings.dtype == torch.float64 else torch.float32


def _has_target(labels: torch.Tensor) -> torch.Tensor:
    return labels >= 0


class MarginSchedule(torch.nn.Module):
    """One step's global batch -> (the step's Margin, an extra loss term or None).

    scale: the logit scale s of the step's loss.
    needs_target_cos: step needs each row's target cosine (target_cos).
    draws: the margins are random draws (PartialFC broadcasts rank 0's to every rank).
    """

    scale: float
    needs_target_cos: bool = False
    draws: bool = False

    def step(self, embeddings: torch.Tensor, labels: torch.Tensor, target_cos: torch.Tensor | None = None,
             norms: torch.Tensor | None = None) -> tuple[Margin, torch.Tensor | None]:
        """The step's Margin and a term to add to the mean loss (None: nothing to add).

        embeddings (B, D): the step's rows (all ranks'), as the loss reads them.
        labels (B,): class indices; a negative label (ignore_index) marks a row without target.
        target_cos (B,): each row's cosine to its class (fastmargin.reference.target_cosines),
            where needs_target_cos; 0 or anything at rows without target.
        norms (B,) or (B, 1): the backbone's feature norms, where the embeddings are its unit
            output (AdaFace's convention); None: the embeddings' own norms.
        The Margin's per-row tensors are (B,) on the embeddings' device, float64 for float64
        embeddings, else float32. Buffers are updated before they are used, as the originals do.
        """
        raise NotImplementedError

    def _target_cos(self, target_cos: torch.Tensor | None, batch: int) -> torch.Tensor:
        if target_cos is None:
            raise ValueError(f"{type(self).__name__} needs each row's target cosine: pass target_cos "
                             "(fastmargin.reference.target_cosines)")
        if target_cos.shape != (batch,):
            raise ValueError(f"target_cos must be ({batch},), one a row, got {tuple(target_cos.shape)}")
        return target_cos.detach()


# ---------------------------------------------------------------- AdaFace


class AdaFace(MarginSchedule):
    """AdaFace's norm-adaptive margin (Kim et al., CVPR 2022; mk-minchul/AdaFace head.py).

    With n_i the row's feature norm clipped to [0.001, 100] and detached, and the EMA
    buffers updated first with this batch (unbiased std, as the original):

        batch_mean = t_alpha mean(n) + (1 - t_alpha) batch_mean
        batch_std  = t_alpha std(n)  + (1 - t_alpha) batch_std
        g_i = clip(h (n_i - batch_mean) / (batch_std + eps), -1, 1)
        psi = cos(clip(theta - m g_i, eps, pi - eps)) - (m + m g_i)

    that is Margin(m2=-m g, m3=m + m g, theta_policy='adaface'), which also clamps every
    cosine to [-1 + eps, 1 - eps] without gradient outside, as the original.

    Defaults are the original class's (t_alpha=1.0: only the current batch's statistics).
    The released training scripts pass m=0.4, h=0.333, s=64 and t_alpha=0.01 (an EMA);
    the repository's argparse defaults are m=0.5, h=0.0 (no adaptivity). Buffers t (unused,
    kept for the state_dict), batch_mean (20) and batch_std (100) as the original's; they
    keep their dtype (float32 unless the module is cast), as the original's assignment does.
    Needs at least 2 rows (the original puts NaN into batch_std with one).
    """

    def __init__(self, m: float = 0.4, h: float = 0.333, s: float = 64.0, t_alpha: float = 1.0,
                 eps: float = 1e-3) -> None:
        super().__init__()
        self._setup(m, h, s, t_alpha, eps)

    def _setup(self, m: float, h: float, s: float, t_alpha: float, eps: float) -> None:
        self.m, self.h, self.s, self.t_alpha = float(m), float(h), checks.check_scale(s), float(t_alpha)
        self.scale = self.s
        if eps != 1e-3:
            # Margin(theta_policy='adaface') clamps with the original's 1e-3 (margins.ADAFACE_EPS).
            raise ValueError(f"eps={eps!r}: fastmargin's theta_policy='adaface' uses AdaFace's eps = 1e-3")
        self.eps = eps
        if not 0.0 <= self.t_alpha <= 1.0:
            raise ValueError(f"t_alpha={t_alpha!r}: the EMA weight of the current batch must be in [0, 1]")
        self.register_buffer("t", torch.zeros(1))
        self.register_buffer("batch_mean", torch.ones(1) * 20)
        self.register_buffer("batch_std", torch.ones(1) * 100)

    def step(self, embeddings, labels, target_cos=None, norms=None):
        batch = embeddings.shape[0]
        if batch < 2:
            raise ValueError(f"AdaFace needs at least 2 rows to estimate the norm deviation (an unbiased std "
                             f"over the batch), got {batch}")
        dtype = _compute_dtype(embeddings)
        if norms is None:
            norms = embeddings.detach().to(dtype).norm(dim=1)
        elif norms.numel() != batch or norms.dim() > 2:
            raise ValueError(f"norms must be (B,) or (B, 1) with B = {batch}, got {tuple(norms.shape)}")
        safe_norms = torch.clip(norms.detach().reshape(batch).to(dtype), min=0.001, max=100)
        with torch.no_grad():
            mean, std = safe_norms.mean(), safe_norms.std()
            self.batch_mean.copy_(mean * self.t_alpha + (1 - self.t_alpha) * self.batch_mean)
            self.batch_std.copy_(std * self.t_alpha + (1 - self.t_alpha) * self.batch_std)
        scaler = (safe_norms - self.batch_mean) / (self.batch_std + self.eps)
        scaler = torch.clip(scaler * self.h, -1, 1).to(dtype)
        margin = Margin(m2=self.m * scaler * -1, m3=self.m + self.m * scaler, theta_policy="adaface")
        return margin, None


# ---------------------------------------------------------------- ElasticFace


class _Elastic(MarginSchedule):
    """ElasticFace's random margins (Boutros et al., CVPRW 2022; fdbtrs/ElasticFace losses.py).

    Each step draws one margin a row, torch.normal(m, std, (B,)), not clamped (negative
    margins are possible, as in the original), from `generator` (an attribute; None: the
    default generator of the embeddings' device, as the original) in the default dtype
    (float32, as the original draws), then cast to the compute dtype. Rows without a target
    get a draw too (the original draws only for labelled rows).

    plus=True (ElasticFace+) sorts the draws and hands them out by the target cosines
    exactly as the released code does: with perm = argsort(target_cos, descending) and ms
    the draws sorted ascending, row i gets ms[perm[i]]. The two sort directions aim at the
    pairing ElasticFace+ is described by (a harder row, smaller cosine, gets a larger
    margin): the row with the k-th largest cosine gets the k-th smallest margin, which is
    ms[rank_i] with rank = perm^-1. The code applies perm where perm^-1 is needed, so the
    two agree only when perm is an involution (B <= 2, or rows already in descending-cosine
    order); otherwise a row's margin is unrelated to its own rank (as released, ElasticFace+
    is ElasticFace with the sorted draws permuted by the batch order). Reproduced as
    released, so that results match the published training. Rows without a target rank last.
    """

    draws = True
    def __init__(self, s: float, m: float, std: float, plus: bool, generator: torch.Generator | None) -> None:
        super().__init__()
        self._setup(s, m, std, plus, generator)

    def _setup(self, s: float, m: float, std: float, plus: bool, generator: torch.Generator | None) -> None:
        self.s = checks.check_scale(s)
        self.scale = self.s
        self.m, self.std, self.plus = float(m), float(std), bool(plus)
        if not (math.isfinite(self.std) and self.std >= 0):
            raise ValueError(f"std={std!r}: the margins' standard deviation must be finite and >= 0")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        self.generator = generator

    @property
    def needs_target_cos(self) -> bool:
        return self.plus

    def step(self, embeddings, labels, target_cos=None, norms=None):
        batch = embeddings.shape[0]
        device = self.generator.device if self.generator is not None else embeddings.device
        margin = torch.normal(mean=self.m, std=self.std, size=(batch,), generator=self.generator, device=device)
        if self.plus:
            with torch.no_grad():
                key = torch.where(_has_target(labels), self._target_cos(target_cos, batch).to(margin.device),
                                  -math.inf)
                _, perm = torch.sort(key, dim=0, descending=True)
                margin, _ = torch.sort(margin, dim=0)
                margin = margin[perm]
        margin = margin.to(embeddings.device, _compute_dtype(embeddings))
        return self._margin_of(margin), None

    def _margin_of(self, margin: torch.Tensor) -> Margin:
        raise NotImplementedError


class ElasticArc(_Elastic):
    """ElasticFace-Arc: psi = cos(theta + m_i), unguarded past pi as the original
    (Margin(m2=draws, theta_policy='none'))."""

    def __init__(self, s: float = 64.0, m: float = 0.5, std: float = 0.0125, plus: bool = False, *,
                 generator: torch.Generator | None = None) -> None:
        super().__init__(s, m, std, plus, generator)

    def _margin_of(self, margin):
        return Margin(m2=margin, theta_policy="none")


class ElasticCos(_Elastic):
    """ElasticFace-Cos: psi = cos - m_i (Margin(m3=draws))."""

    def __init__(self, s: float = 64.0, m: float = 0.35, std: float = 0.0125, plus: bool = False, *,
                 generator: torch.Generator | None = None) -> None:
        super().__init__(s, m, std, plus, generator)

    def _margin_of(self, margin):
        return Margin(m3=margin)


# ---------------------------------------------------------------- MagFace


class MagFace(MarginSchedule):
    """MagFace's magnitude-aware margin (Meng et al., CVPR 2021; IrvingMeng/MagFace).

    a_i = clamp(||x_i||, l_a, u_a), with its gradient (zero outside [l_a, u_a], as the
    original); m_i = (u_margin - l_margin) / (u_a - l_a) (a_i - l_a) + l_margin, a margin
    that requires grad: the loss's gradient reaches x through it, as in the original.
    psi = cos(theta + m_i) where cos > 0 and cos elsewhere (easy_margin=True, MagLinear's
    default: theta_policy='easy'); easy_margin=False is MagLinear's insightface fallback
    cos - m_i sin m_i past theta = pi - m_i, which is theta_policy='fallback' for m_i <= 2.33.
    The extra term is lambda_g * mean_i(a_i / u_a^2 + 1 / a_i) over every row.

    Defaults: run/run.sh's (lambda_g=35; trainer.py's argparse default of 20 is below the
    bound it prints itself, 22.6 for these values). The norms are the embeddings' own (the
    regulariser needs their gradient): pass the backbone's raw output and no norms.
    """

    def __init__(self, scale: float = 64.0, l_a: float = 10, u_a: float = 110, l_margin: float = 0.45,
                 u_margin: float = 0.8, lambda_g: float = 35, easy_margin: bool = True) -> None:
        super().__init__()
        self._setup(scale, l_a, u_a, l_margin, u_margin, lambda_g, easy_margin)

    def _setup(self, scale, l_a, u_a, l_margin, u_margin, lambda_g, easy_margin) -> None:
        self.scale = checks.check_scale(scale)
        self.l_a, self.u_a = float(l_a), float(u_a)
        self.l_margin, self.u_margin, self.lambda_g = float(l_margin), float(u_margin), float(lambda_g)
        self.easy_margin = bool(easy_margin)
        if not 0 < self.l_a < self.u_a:
            raise ValueError(f"l_a={l_a!r}, u_a={u_a!r}: the norm bounds must satisfy 0 < l_a < u_a")

    def step(self, embeddings, labels, target_cos=None, norms=None):
        if norms is not None:
            raise ValueError("MagFace takes the norms from the embeddings (its margin and regulariser need their "
                             "gradient): pass the backbone's raw embeddings and no norms")
        x_norm = embeddings.to(_compute_dtype(embeddings)).norm(dim=1).clamp(self.l_a, self.u_a)
        margin = (self.u_margin - self.l_margin) / (self.u_a - self.l_a) * (x_norm - self.l_a) + self.l_margin
        loss_g = torch.mean(1 / (self.u_a ** 2) * x_norm + 1 / x_norm)
        policy = "easy" if self.easy_margin else "fallback"
        return Margin(m2=margin, theta_policy=policy), self.lambda_g * loss_g


# ---------------------------------------------------------------- CurricularFace


class Curricular(MarginSchedule):
    """CurricularFace (Huang et al., CVPR 2020; HuangYG123/CurricularFace head/metrics.py).

    Buffer t (0 at first) is updated before use, without gradient, from the batch's target
    cosines (clamped to [-1, 1], over the rows with a target): t = 0.01 mean(cos_y) + 0.99 t.
    Then Margin(m2=m, curricular_t=t): the target is ArcFace's cos(theta + m) with
    insightface's fallback cos - m sin m past pi - m, and a non-target cos above the row's
    cos(theta_y + m) becomes cos (t + cos), gradient t + 2 cos (t detached), as the original.
    t keeps its dtype (float32 unless the module is cast), as the original's assignment does.
    """

    needs_target_cos = True

    def __init__(self, m: float = 0.5, s: float = 64.0) -> None:
        super().__init__()
        self._setup(m, s)

    def _setup(self, m: float, s: float) -> None:
        self.m, self.s = float(m), checks.check_scale(s)
        self.scale = self.s
        Margin(m2=self.m)  # the range check, at construction
        self.register_buffer("t", torch.zeros(1))

    def step(self, embeddings, labels, target_cos=None, norms=None):
        cos = self._target_cos(target_cos, embeddings.shape[0]).clamp(-1, 1)
        with torch.no_grad():
            valid = _has_target(labels)
            count = valid.sum()
            mean = torch.where(valid, cos, 0).sum() / count.clamp(min=1)
            self.t.copy_(torch.where(count > 0, mean * 0.01 + (1 - 0.01) * self.t, self.t))
        return Margin(m2=self.m, curricular_t=self.t.detach().reshape(()).clone()), None


# ---------------------------------------------------------------- the modules


class _AdaptiveLoss(_MarginLoss):
    """A schedule with its class weights: fastmargin's options (_MarginLoss) and one step.

    A subclass is (its schedule, _AdaptiveLoss): _AdaptiveLoss.__init__ makes the Module and
    reads the options, then the schedule's _setup adds its attributes and buffers to the
    module itself, so that the state_dict keys are the original head's."""

    def __init__(self, scale: float, **options: object) -> None:
        unknown = sorted(set(options) - set(_OPTIONS))  # before they meet _MarginLoss's own arguments
        if unknown:
            raise TypeError(self._unknown_keyword(unknown[0]))
        # _MarginLoss's margin is the one fixed for every step; here each step makes its own.
        super().__init__(Margin(), scale, **options)
        del self._margin

    def current_margin(self) -> Margin:
        raise TypeError(f"{type(self).__name__}'s margin changes every step: its step(embeddings, labels, "
                        "target_cos, norms) returns it (and updates the buffers)")

    def _adaptive_loss(self, embeddings: torch.Tensor, kernel: torch.Tensor, labels: torch.Tensor,
                       norms: torch.Tensor | None = None) -> torch.Tensor:
        """embeddings (B, D), kernel (D, C) as the original holds it, labels (B,) -> the loss."""
        checks.check_types(embeddings, labels)
        checks.check_embedding_size(type(self).__name__, kernel.shape[0], embeddings)
        weight = kernel.t()  # (C, D), no copy
        # Before the step: a bad input must not move the buffers.
        checks.check_inputs(embeddings, weight, labels, 1, self.ignore_index)
        rows = torch.where(labels != self.ignore_index, labels.long(), -1)
        target_cos = target_cosines(embeddings, weight, rows) if self.needs_target_cos else None
        margin, extra = self.step(embeddings, rows, target_cos, norms)
        return self._loss(embeddings, weight, labels, margin=margin, target_cos=target_cos, extra=extra)


def _uniform_unit_columns(rows: int, cols: int) -> torch.Tensor:
    """AdaFace's and MagFace's init: uniform(-1, 1), then every column renormed to norm 1."""
    return torch.empty(rows, cols).uniform_(-1, 1).renorm_(2, 1, 1e-5).mul_(1e5)


def _normal_kernel(rows: int, cols: int) -> torch.Tensor:
    """ElasticFace's and CurricularFace's init: N(0, 0.01)."""
    kernel = torch.empty(rows, cols)
    torch.nn.init.normal_(kernel, std=0.01)
    return kernel


class AdaFaceLoss(AdaFace, _AdaptiveLoss):
    """AdaFace with its class weights: mk-minchul/AdaFace's head AdaFace(embedding_size,
    classnum, m, h, s, t_alpha) and its defaults (see AdaFace for the released settings),
    parameter `kernel` (embedding_size, classnum) with unit columns at init, buffers t,
    batch_mean, batch_std: its state_dict loads here. fastmargin's options (backend,
    label_smoothing, ignore_index, reduction, chunk_size) are keywords.

    forward(embeddings, labels, norms=None); the original's is (embbedings, norms, label).
    - norms None: embeddings are the backbone's raw output; the loss normalises them, and
      their norms drive the margin. The loss and its gradient are the original's composed
      with the backbone's x / ||x||.
    - norms given ((B,) or (B, 1), the backbone's ||x||): embeddings are its unit output
      x / ||x||, as the original takes them (they are normalised again: a no-op for unit
      rows; the original would read a non-unit row's <e, w> as its cosine). The loss is the
      original's; the gradient with respect to those unit embeddings differs from the
      original's by a radial component (fastmargin differentiates cos = <e, w> / ||e||, the
      original <e, w>), which the backbone's own x / ||x|| removes: the gradient reaching the
      backbone is the same.
    """

    def __init__(self, embedding_size: int = 512, classnum: int = 70722, m: float = 0.4, h: float = 0.333,
                 s: float = 64.0, t_alpha: float = 1.0, **options: object) -> None:
        _AdaptiveLoss.__init__(self, s, **options)
        self._setup(m, h, s, t_alpha, 1e-3)
        self.classnum = checks.check_positive_int("classnum", classnum)
        checks.check_positive_int("embedding_size", embedding_size)
        self.kernel = torch.nn.Parameter(_uniform_unit_columns(embedding_size, classnum))

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor, norms: torch.Tensor | None = None
                ) -> torch.Tensor:
        """embeddings (B, embedding_size), labels (B,), norms (B,) or (B, 1) or None -> the loss."""
        return self._adaptive_loss(embeddings, self.kernel, labels, norms)


class _ElasticLoss(_AdaptiveLoss):
    def _init_elastic(self, in_features, out_features, s, m, std, plus, generator, options) -> None:
        _AdaptiveLoss.__init__(self, s, **options)
        self._setup(s, m, std, plus, generator)
        self.in_features = checks.check_positive_int("in_features", in_features)
        self.out_features = checks.check_positive_int("out_features", out_features)
        self.kernel = torch.nn.Parameter(_normal_kernel(in_features, out_features))

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """embeddings (B, in_features), labels (B,) -> the loss (a fresh draw of margins)."""
        return self._adaptive_loss(embeddings, self.kernel, labels)


class ElasticArcFaceLoss(ElasticArc, _ElasticLoss):
    """ElasticFace-Arc with its class weights: fdbtrs/ElasticFace's ElasticArcFace(in_features,
    out_features, s, m, std, plus), parameter `kernel` (in_features, out_features), N(0, 0.01).
    The released configs use std=0.05 (plus=False) and std=0.0175 (plus=True) over the
    class default 0.0125. See ElasticArc and _Elastic for the draws and plus=True;
    `generator` (keyword, or the attribute) seeds them."""

    def __init__(self, in_features: int, out_features: int, s: float = 64.0, m: float = 0.50,
                 std: float = 0.0125, plus: bool = False, *, generator: torch.Generator | None = None,
                 **options: object) -> None:
        self._init_elastic(in_features, out_features, s, m, std, plus, generator, options)


class ElasticCosFaceLoss(ElasticCos, _ElasticLoss):
    """ElasticFace-Cos with its class weights: fdbtrs/ElasticFace's ElasticCosFace(in_features,
    out_features, s, m, std, plus), parameter `kernel` (in_features, out_features), N(0, 0.01).
    The released configs use std=0.05 (plus=False) and std=0.02 (plus=True)."""

    def __init__(self, in_features: int, out_features: int, s: float = 64.0, m: float = 0.35,
                 std: float = 0.0125, plus: bool = False, *, generator: torch.Generator | None = None,
                 **options: object) -> None:
        self._init_elastic(in_features, out_features, s, m, std, plus, generator, options)


class MagFaceLoss(MagFace, _AdaptiveLoss):
    """MagFace with its class weights: MagLinear(in_features, out_features, scale, easy_margin)
    and MagLoss(l_a, u_a, l_margin, u_margin) with trainer.py's lambda_g, as one module whose
    loss is MagLoss's loss_id + lambda_g * loss_g (run/trainer.py). Parameter `weight`
    (in_features, out_features) with unit columns at init: MagLinear's state_dict loads here
    (from a SoftmaxBuilder's, the entries under `fc.`). Defaults: see MagFace.
    reduction must be 'mean' (the regulariser is a batch mean)."""

    def __init__(self, in_features: int, out_features: int, scale: float = 64.0, easy_margin: bool = True,
                 l_a: float = 10, u_a: float = 110, l_margin: float = 0.45, u_margin: float = 0.8,
                 lambda_g: float = 35, **options: object) -> None:
        _AdaptiveLoss.__init__(self, scale, **options)
        self._setup(scale, l_a, u_a, l_margin, u_margin, lambda_g, easy_margin)
        if self.reduction != "mean":
            raise ValueError(f"MagFaceLoss: reduction={self.reduction!r}; MagFace adds a batch-mean regulariser "
                             "to the mean loss: reduction must be 'mean'")
        self.in_features = checks.check_positive_int("in_features", in_features)
        self.out_features = checks.check_positive_int("out_features", out_features)
        self.weight = torch.nn.Parameter(_uniform_unit_columns(in_features, out_features))

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """embeddings (B, in_features), the backbone's raw output; labels (B,) -> the loss."""
        return self._adaptive_loss(embeddings, self.weight, labels)


class CurricularFaceLoss(Curricular, _AdaptiveLoss):
    """CurricularFace with its class weights: HuangYG123/CurricularFace's CurricularFace(
    in_features, out_features, m, s), parameter `kernel` (in_features, out_features),
    N(0, 0.01), buffer `t`: its state_dict loads here. See Curricular."""

    def __init__(self, in_features: int, out_features: int, m: float = 0.5, s: float = 64.0,
                 **options: object) -> None:
        _AdaptiveLoss.__init__(self, s, **options)
        self._setup(m, s)
        self.in_features = checks.check_positive_int("in_features", in_features)
        self.out_features = checks.check_positive_int("out_features", out_features)
        self.kernel = torch.nn.Parameter(_normal_kernel(in_features, out_features))

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """embeddings (B, in_features), labels (B,) -> the loss."""
        return self._adaptive_loss(embeddings, self.kernel, labels)
