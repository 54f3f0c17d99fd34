"""The adaptive-margin modules (fastmargin.adaptive) against their formulas.

Each module runs 3 steps with its state kept (the EMA buffers too) beside the original
paper's and code's formula, written out below in plain torch: the (B, C) logits
materialised and F.cross_entropy. float64, on every backend usable here (under Triton's
interpreter only some cases by default: marker `thin`, tests/conftest.py). Loss, gradients
of the embeddings and of the class weights, and the buffers agree to 1e-10 relative.

Inputs reach the branches: a row whose target cosine is above AdaFace's clamp 1 - 1e-3,
a row almost opposite its class (theta + m past pi: the fallbacks, AdaFace's theta clip,
ElasticFace's unguarded cos(theta + m)), targets with cos <= 0 (MagFace's easy margin),
norms below and above MagFace's [l_a, u_a], hard negatives (CurricularFace), an ignored row.
"""

import math

import pytest
import torch
import torch.nn.functional as F

import fastmargin
from fastmargin import adaptive
from helpers import assert_rel, backend_params, device_of

B, C, D = 12, 23, 16
TOL = 1e-10
IGNORE = -100
every_backend = pytest.mark.parametrize("backend", backend_params(fused_only=False))


# ---------------------------------------------------------------- the formulas, in plain torch


def unit_columns(kernel):
    """(D, C) -> each class column divided by its norm: every original's l2_norm(kernel, axis=0)."""
    return kernel / kernel.norm(dim=0, keepdim=True)


def target_mask(y, num_classes):
    valid = y != IGNORE
    return (torch.arange(num_classes, device=y.device) == torch.where(valid, y, 0)[:, None]) & valid[:, None]


def target_column(cos, y):
    """(B,) cos_iy (row 0's column at ignored rows: never used)."""
    return cos.gather(1, torch.where(y != IGNORE, y, 0)[:, None]).squeeze(1)


def cross_entropy(logits, y):
    return F.cross_entropy(logits, y, ignore_index=IGNORE)


class AdaFaceFormula:
    """Kim et al. 2022, head.py: cos clamped to [-1 + eps, 1 - eps]; g from the clipped,
    detached norms and the EMA updated first; target cos(clip(theta - m g, eps, pi - eps)) - (m + m g)."""

    def __init__(self, m=0.4, h=0.333, s=64.0, t_alpha=1.0, eps=1e-3):
        self.m, self.h, self.s, self.t_alpha, self.eps = m, h, s, t_alpha, eps
        f64 = torch.float64
        self.state = {"t": torch.zeros(1, dtype=f64), "batch_mean": torch.full((1,), 20.0, dtype=f64),
                      "batch_std": torch.full((1,), 100.0, dtype=f64)}

    def __call__(self, kernel, e, norms, y):
        m, eps = self.m, self.eps
        cos = (e @ unit_columns(kernel)).clamp(-1 + eps, 1 - eps)
        n = norms.reshape(-1).clamp(0.001, 100).detach()
        st = self.state
        st["batch_mean"] = self.t_alpha * n.mean() + (1 - self.t_alpha) * st["batch_mean"].to(n.device)
        st["batch_std"] = self.t_alpha * n.std() + (1 - self.t_alpha) * st["batch_std"].to(n.device)
        g = (self.h * (n - st["batch_mean"]) / (st["batch_std"] + eps)).clamp(-1, 1)
        theta = torch.acos(cos)
        target = torch.cos((theta - (m * g)[:, None]).clamp(eps, math.pi - eps)) - (m + m * g)[:, None]
        return cross_entropy(self.s * torch.where(target_mask(y, cos.shape[1]), target, cos), y)


class ElasticFormula:
    """Boutros et al. 2022, losses.py: margins drawn N(m, std) a row (float32, as the
    original), plus=True: sorted, row i gets sorted[perm[i]], perm = argsort(cos_y, descending)."""

    def __init__(self, arc, m, std, plus, seed, s=64.0):
        self.arc, self.m, self.std, self.plus, self.s = arc, m, std, plus, s
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, kernel, x, y):
        cos = (F.normalize(x) @ unit_columns(kernel)).clamp(-1, 1)
        draws = torch.normal(self.m, self.std, (len(y),), generator=self.generator).to(cos)
        if self.plus:
            key = torch.where(y != IGNORE, target_column(cos, y).detach(), -math.inf)
            perm = torch.sort(key, descending=True).indices
            draws = torch.sort(draws).values[perm]
        if self.arc:
            target = torch.cos(torch.acos(cos) + draws[:, None])
        else:
            target = cos - draws[:, None]
        return cross_entropy(self.s * torch.where(target_mask(y, cos.shape[1]), target, cos), y)


class MagFaceFormula:
    """Meng et al. 2021, magface.py + trainer.py: a = clamp(||x||, l_a, u_a) with its gradient,
    m(a) linear; easy margin: cos(theta + m) where cos > 0; else the fallback cos - m sin m past
    pi - m; loss = CE + lambda_g mean(a / u_a^2 + 1 / a)."""

    def __init__(self, easy_margin=True, lambda_g=35.0, s=64.0, l_a=10.0, u_a=110.0, l_m=0.45, u_m=0.8):
        self.easy, self.lambda_g, self.s, self.l_a, self.u_a, self.l_m, self.u_m = (
            easy_margin, lambda_g, s, l_a, u_a, l_m, u_m)
        self.state = {}

    def __call__(self, weight, x, y):
        a = x.norm(dim=1).clamp(self.l_a, self.u_a)
        m = (self.u_m - self.l_m) / (self.u_a - self.l_a) * (a - self.l_a) + self.l_m
        cos = (F.normalize(x) @ unit_columns(weight)).clamp(-1, 1)
        c = target_column(cos, y)
        shifted = torch.cos(torch.acos(c) + m)
        if self.easy:
            target = torch.where(c > 0, shifted, c)
        else:
            target = torch.where(c > torch.cos(math.pi - m), shifted, c - torch.sin(math.pi - m) * m)
        logits = self.s * torch.where(target_mask(y, cos.shape[1]), target[:, None], cos)
        return cross_entropy(logits, y) + self.lambda_g * torch.mean(a / self.u_a ** 2 + 1 / a)


class CurricularFormula:
    """Huang et al. 2020, metrics.py: t = 0.01 mean(cos_y) + 0.99 t first; target ArcFace with
    the fallback cos - m sin m past pi - m; a non-target above cos(theta_y + m) becomes cos (t + cos)."""

    def __init__(self, m=0.5, s=64.0):
        self.m, self.s = m, s
        self.state = {"t": torch.zeros(1, dtype=torch.float64)}

    def __call__(self, kernel, x, y):
        cos = (F.normalize(x) @ unit_columns(kernel)).clamp(-1, 1)
        c = target_column(cos, y)
        shifted = torch.cos(torch.acos(c) + self.m)
        with torch.no_grad():
            t = 0.01 * c[y != IGNORE].mean() + 0.99 * self.state["t"].to(c.device)
        self.state["t"] = t
        target = torch.where(c > math.cos(math.pi - self.m), shifted, c - math.sin(math.pi - self.m) * self.m)
        others = torch.where(cos > shifted.detach()[:, None], cos * (t + cos), cos)
        return cross_entropy(self.s * torch.where(target_mask(y, cos.shape[1]), target[:, None], others), y)


# ---------------------------------------------------------------- inputs and the 3-step check


def step_inputs(step, kernel, norm_range, device):
    """x (B, D) float64 with norms in norm_range (row 1 at its bottom, row 2 at its top) and
    y (B,): row 0 at cos ~0.9996 to its class, row 1 at ~-0.995, the rest random; at step 2
    row 3 is ignored."""
    g = torch.Generator().manual_seed(step)
    y = torch.randint(0, C, (B,), generator=g)
    x = F.normalize(torch.randn(B, D, generator=g, dtype=torch.float64))
    w_hat = unit_columns(kernel.detach().cpu()).t()[y]
    across = F.normalize(x - (x * w_hat).sum(1, keepdim=True) * w_hat)  # orthogonal to the class
    x[0] = w_hat[0] + 0.03 * across[0]
    x[1] = -w_hat[1] + 0.1 * across[1]
    lo, hi = norm_range
    norms = torch.empty(B, dtype=torch.float64).uniform_(lo, hi, generator=g)
    norms[1], norms[2] = lo, hi
    x = F.normalize(x) * norms[:, None]
    if step == 2:
        y[3] = IGNORE
    return x.to(device), y.to(device)


def fixed_kernel():
    """The class weights of every case, (D, C) float64 (the modules' own init is random)."""
    return torch.randn(D, C, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def check_steps(module, formula, call_module, call_formula, param="kernel", norm_range=(5.0, 40.0),
                buffers=(), backend="reference"):
    """3 steps of module and formula on the same inputs, their state kept: loss, dL/dx,
    dL/dW and the buffers within TOL."""
    device = device_of(backend)
    module = module.double().to(device)
    weight = getattr(module, param)
    with torch.no_grad():
        weight.copy_(fixed_kernel())
    kernel = weight.detach().clone().requires_grad_()
    for step in range(3):
        x, y = step_inputs(step, kernel, norm_range, device)
        x_got, x_want = x.clone().requires_grad_(), x.clone().requires_grad_()
        got = call_module(module, x_got, y)
        want = call_formula(formula, kernel, x_want, y)
        got.backward()
        want.backward()
        what = f"{type(module).__name__} [{backend}] step {step}"
        assert_rel(got, want, TOL, f"{what}: loss")
        assert_rel(x_got.grad, x_want.grad, TOL, f"{what}: d loss / d embeddings")
        assert_rel(weight.grad, kernel.grad, TOL, f"{what}: d loss / d {param}")
        for name in buffers:
            assert_rel(getattr(module, name), formula.state[name].reshape(1), TOL, f"{what}: buffer {name}")
        weight.grad = kernel.grad = None


def unit_and_norms(x):
    norms = x.norm(dim=1, keepdim=True)  # (B, 1), as the AdaFace backbone hands it over
    return x / norms, norms


def test_inputs_reach_the_branches():
    """What the 3-step cases rely on, on each step's inputs: AdaFace's cos clamp (row 0) and
    theta clip (row 1, at the batch statistics); targets past pi - m (the fallbacks, ElasticFace's
    unguarded branch) and with cos <= 0 (MagFace's easy margin); norms outside MagFace's
    [10, 110]; CurricularFace's hard negatives; an ignored row at step 2."""
    kernel = fixed_kernel()
    for step in range(3):
        for norm_range in ((5.0, 40.0), (5.0, 130.0)):
            x, y = step_inputs(step, kernel, norm_range, torch.device("cpu"))
            cos = F.normalize(x) @ unit_columns(kernel)
            c = target_column(cos, y)
            assert c[0] > 1 - 1e-3 and c[1] < math.cos(math.pi - 0.8)
            assert ((c > 0) & (c < 0.99)).sum() >= 2 and (c[2:] <= 0).sum() >= 2
            assert (y == IGNORE).any() == (step == 2)
            hard = (cos > torch.cos(torch.acos(c) + 0.5)[:, None]) & ~target_mask(y, C)
            assert hard[2:].any(dim=1).all()
        n = x.norm(dim=1)
        assert (n < 10).any() and (n > 110).any() and ((n > 10) & (n < 110)).sum() >= 4
        n = step_inputs(step, kernel, (5.0, 40.0), torch.device("cpu"))[0].norm(dim=1)
        g = (0.333 * (n - n.mean()) / (n.std() + 1e-3)).clamp(-1, 1)  # t_alpha = 1
        assert torch.acos(c[1]) - 0.4 * g[1] > math.pi - 1e-3


# ---------------------------------------------------------------- each module, 3 steps


ADAFACE_CASES = {  # (t_alpha, norms given)
    "batch-stats": (1.0, False),
    "batch-stats-norms": (1.0, True),
    "ema-norms": (0.01, True),
}


@pytest.mark.thin(keep=lambda backend, case: case == "ema-norms")
@pytest.mark.parametrize("case", list(ADAFACE_CASES))
@every_backend
def test_adaface(backend, case):
    """Without norms the module takes the raw features and normalises them; with norms it
    takes the unit output and the norms, as the original. Either way the leaf is the raw
    feature x and the formula is fed (x / ||x||, ||x||): the gradient reaching x is the
    original's (for the gradient w.r.t. the unit embeddings see test_adaface_radial_gradient)."""
    t_alpha, with_norms = ADAFACE_CASES[case]
    module = fastmargin.AdaFaceLoss(D, C, t_alpha=t_alpha, backend=backend)
    formula = AdaFaceFormula(t_alpha=t_alpha)

    def call_module(m, x, y):
        if not with_norms:
            return m(x, y)
        e, norms = unit_and_norms(x)
        return m(e, y, norms)

    check_steps(module, formula, call_module, lambda f, k, x, y: f(k, *unit_and_norms(x), y),
                buffers=("t", "batch_mean", "batch_std"), backend=backend)


ELASTIC_CASES = {"arc": (True, False), "arc-plus": (True, True), "cos": (False, False), "cos-plus": (False, True)}


@pytest.mark.thin(keep=lambda backend, case: case in ("arc-plus", "cos"))
@pytest.mark.parametrize("case", list(ELASTIC_CASES))
@every_backend
def test_elasticface(backend, case):
    """The draws come from seeded generators, the module's and the formula's in lockstep;
    std 0.05 as the released plus=False configs; plus=True hands them out as the released code."""
    arc, plus = ELASTIC_CASES[case]
    m = 0.5 if arc else 0.35
    cls = fastmargin.ElasticArcFaceLoss if arc else fastmargin.ElasticCosFaceLoss
    module = cls(D, C, m=m, std=0.05, plus=plus, generator=torch.Generator().manual_seed(7), backend=backend)
    formula = ElasticFormula(arc, m, 0.05, plus, seed=7)
    check_steps(module, formula, lambda mod, x, y: mod(x, y), lambda f, k, x, y: f(k, x, y), backend=backend)


@pytest.mark.thin(keep=lambda backend, easy_margin: easy_margin)
@pytest.mark.parametrize("easy_margin", [True, False], ids=["easy", "fallback"])
@every_backend
def test_magface(backend, easy_margin):
    """Norms from 5 to 130 (some clamped at l_a = 10 and u_a = 110); the margin's gradient
    and the regulariser's reach x (test_magface_margin_gradient isolates the margin's)."""
    module = fastmargin.MagFaceLoss(D, C, easy_margin=easy_margin, backend=backend)
    formula = MagFaceFormula(easy_margin)
    check_steps(module, formula, lambda mod, x, y: mod(x, y), lambda f, k, x, y: f(k, x, y), param="weight",
                norm_range=(5.0, 130.0), backend=backend)


@every_backend
def test_curricularface(backend):
    """t from 0 over 3 steps (the buffer against the formula's after every step), hard
    negatives on most rows, the fallback on row 1."""
    module = fastmargin.CurricularFaceLoss(D, C, backend=backend)
    formula = CurricularFormula()
    check_steps(module, formula, lambda mod, x, y: mod(x, y), lambda f, k, x, y: f(k, x, y),
                buffers=("t",), backend=backend)
    assert module.t.item() != 0


# ---------------------------------------------------------------- gradients the steps only sum


def test_adaface_radial_gradient():
    """With norms given, the gradient w.r.t. the unit embeddings e is the original's but for
    a component along e (fastmargin differentiates <e, w> / ||e||): equal after the projection
    I - e e^T that the backbone's x / ||x|| applies, different before it."""
    module = fastmargin.AdaFaceLoss(D, C, backend="reference").double()
    module.kernel.data = fixed_kernel()
    formula = AdaFaceFormula()
    x, y = step_inputs(0, module.kernel, (5.0, 40.0), torch.device("cpu"))
    e, norms = unit_and_norms(x)
    e_got, e_want = e.clone().requires_grad_(), e.clone().requires_grad_()
    module(e_got, y, norms).backward()
    formula(module.kernel.detach(), e_want, norms, y).backward()

    def tangential(g):
        return g - (g * e).sum(1, keepdim=True) * e

    assert_rel(tangential(e_got.grad), tangential(e_want.grad), TOL, "tangential d loss / d e")
    radial_gap = ((e_got.grad - e_want.grad) * e).sum(1).abs().max().item()
    assert radial_gap > 1e-3 * e_want.grad.abs().max().item(), "the radial components should differ"


def test_magface_margin_gradient():
    """lambda_g = 0 leaves the margin as the only path from the loss to ||x||: the radial
    component of dL/dx (cos does not change along x) is the margin's gradient. It matches the
    formula's, is non-zero where ||x|| is inside (l_a, u_a) and the easy margin applies
    (cos_y > 0), zero where ||x|| is clamped or cos_y <= 0."""
    module = fastmargin.MagFaceLoss(D, C, lambda_g=0.0, backend="reference").double()
    module.weight.data = fixed_kernel()
    formula = MagFaceFormula(lambda_g=0.0)
    x, y = step_inputs(0, module.weight, (5.0, 130.0), torch.device("cpu"))
    x_got, x_want = x.clone().requires_grad_(), x.clone().requires_grad_()
    module(x_got, y).backward()
    formula(module.weight.detach(), x_want, y).backward()
    x_hat = F.normalize(x)
    radial_got, radial_want = (x_got.grad * x_hat).sum(1), (x_want.grad * x_hat).sum(1)
    assert_rel(radial_got, radial_want, TOL, "radial d loss / d x (the margin's gradient)")
    norms, c = x.norm(dim=1), target_column(F.normalize(x) @ unit_columns(module.weight.detach()), y)
    inside = (norms > 10) & (norms < 110)
    margined = inside & (c > 0) & (c < 0.99)  # the easy margin applies, p_target not saturated
    zero = ~inside | (c <= 0)
    assert margined.sum() >= 2 and (~inside).sum() >= 2 and (inside & (c <= 0)).any()
    scale = radial_want.abs().max().item()
    assert (radial_got[margined].abs() > 1e-6 * scale).all(), radial_got
    assert (radial_got[zero].abs() < 1e-12 * scale).all(), radial_got


# ---------------------------------------------------------------- the schedules


def test_schedule_interface():
    """step's Margin: per-row (B,) tensors on the embeddings' device, float64 for float64
    embeddings and float32 otherwise; the flags PartialFC reads; MagFace's extra term."""
    labels = torch.arange(4)
    for dtype, want in ((torch.float64, torch.float64), (torch.float32, torch.float32),
                        (torch.bfloat16, torch.float32)):
        x = (torch.randn(4, D) * 20).to(dtype).requires_grad_()
        cos = torch.rand(4, dtype=want)
        for schedule, fields in ((adaptive.AdaFace(), ("m2", "m3")), (adaptive.ElasticArc(), ("m2",)),
                                 (adaptive.ElasticCos(plus=True), ("m3",)), (adaptive.MagFace(), ("m2",)),
                                 (adaptive.Curricular(), ())):
            margin, extra = schedule.step(x, labels, cos)
            assert set(margin.row_margins) == set(fields), type(schedule).__name__
            for value in margin.row_margins.values():
                assert value.shape == (4,) and value.dtype == want and value.device == x.device
            assert schedule.scale == 64.0
            assert (extra is not None) == isinstance(schedule, adaptive.MagFace)
    magface = adaptive.MagFace()
    margin, extra = magface.step(x, labels)
    assert margin.requires_grad and extra.requires_grad and extra.dim() == 0
    assert [s.draws for s in (adaptive.AdaFace(), adaptive.ElasticArc(), adaptive.ElasticCos(), adaptive.MagFace(),
                              adaptive.Curricular())] == [False, True, True, False, False]
    assert [s.needs_target_cos for s in (adaptive.ElasticArc(), adaptive.ElasticArc(plus=True), adaptive.Curricular(),
                                         adaptive.AdaFace(), adaptive.MagFace())] == [False, True, True, False, False]
    assert adaptive.Curricular().step(x, labels, cos)[0].curricular_t.dim() == 0


def test_elastic_plus_assignment():
    """As released: row i gets sorted_draws[perm[i]], perm = argsort(target cos, descending);
    not the rank mapping (row with the k-th largest cos gets the k-th smallest margin), from
    which it differs whenever perm is not an involution. Without a generator: the default one."""
    cos = torch.tensor([0.1, 0.4, 0.3, 0.2], dtype=torch.float64)  # perm = [1, 2, 3, 0], not an involution
    x, labels = torch.randn(4, D, dtype=torch.float64), torch.arange(4)
    schedule = adaptive.ElasticArc(plus=True, std=0.1, generator=torch.Generator().manual_seed(3))
    margin, _ = schedule.step(x, labels, cos)
    ms = torch.sort(torch.normal(0.5, 0.1, (4,), generator=torch.Generator().manual_seed(3))).values.double()
    perm = torch.tensor([1, 2, 3, 0])
    assert torch.equal(margin.m2, ms[perm])
    by_rank = torch.empty_like(ms)
    by_rank[perm] = ms
    assert not torch.equal(margin.m2, by_rank)
    # an ignored row (negative label) ranks last
    margin, _ = adaptive.ElasticCos(plus=True, generator=torch.Generator().manual_seed(3)).step(
        x, torch.tensor([0, -100, 2, 3]), cos)
    ms = torch.sort(torch.normal(0.35, 0.0125, (4,), generator=torch.Generator().manual_seed(3))).values.double()
    assert torch.equal(margin.m3, ms[torch.tensor([2, 3, 0, 1])])
    torch.manual_seed(11)
    drawn, _ = adaptive.ElasticArc().step(x, labels)
    torch.manual_seed(11)
    assert torch.equal(drawn.m2, torch.normal(0.5, 0.0125, (4,)).double())


def test_curricular_t_leaves_out_ignored_rows():
    schedule = adaptive.Curricular().double()
    x, cos = torch.randn(3, D, dtype=torch.float64), torch.tensor([0.5, 0.9, -2.0], dtype=torch.float64)
    schedule.step(x, torch.tensor([0, 1, -100]), cos)
    assert_rel(schedule.t, torch.tensor([0.01 * 0.7], dtype=torch.float64), 1e-15, "t")
    schedule.step(x, torch.full((3,), -100), cos)  # no row with a target: t stays
    assert_rel(schedule.t, torch.tensor([0.01 * 0.7], dtype=torch.float64), 1e-15, "t")


# ---------------------------------------------------------------- checkpoints of the originals


ORIGINAL_KEYS = {  # the original heads' state_dict: name -> shape, float32
    "AdaFaceLoss": {"kernel": (D, C), "t": (1,), "batch_mean": (1,), "batch_std": (1,)},
    "ElasticArcFaceLoss": {"kernel": (D, C)},
    "ElasticCosFaceLoss": {"kernel": (D, C)},
    "MagFaceLoss": {"weight": (D, C)},  # MagLinear's
    "CurricularFaceLoss": {"kernel": (D, C), "t": (1,)},
}


@pytest.mark.parametrize("name", list(ORIGINAL_KEYS))
def test_state_dict_is_the_originals(name):
    """The keys, shapes and dtypes of the original head's state_dict; a hand-written one
    loads (strict) and is used; the init: unit columns (AdaFace, MagFace) or N(0, 0.01)."""
    module = getattr(fastmargin, name)(D, C)
    state = module.state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == ORIGINAL_KEYS[name]
    assert all(v.dtype == torch.float32 for v in state.values())
    weight = state.get("kernel", state.get("weight"))
    if name in ("AdaFaceLoss", "MagFaceLoss"):
        assert_rel(weight.norm(dim=0), torch.ones(C), 1e-6, "column norms at init")
    else:
        assert 0.005 < weight.std().item() < 0.02
    loaded = {k: torch.full(shape, 0.5) for k, shape in ORIGINAL_KEYS[name].items()}
    loaded["kernel" if "kernel" in loaded else "weight"] = torch.randn(D, C)
    module.load_state_dict(loaded, strict=True)
    for key, value in loaded.items():
        assert torch.equal(module.state_dict()[key], value), key


def test_loaded_buffers_drive_the_margin():
    """A loaded batch_mean / batch_std (t_alpha < 1) and t are what the next step starts from."""
    ada = fastmargin.AdaFaceLoss(D, C, t_alpha=0.01).double()
    ada.load_state_dict({"kernel": ada.kernel.detach(), "t": torch.zeros(1), "batch_mean": torch.full((1,), 3.0),
                         "batch_std": torch.full((1,), 7.0)})
    x = torch.randn(5, D, dtype=torch.float64) * 10
    ada(x, torch.arange(5))
    n = x.norm(dim=1)
    assert_rel(ada.batch_mean, 0.01 * n.mean() + 0.99 * torch.tensor([3.0], dtype=torch.float64), 1e-15, "batch_mean")
    cur = fastmargin.CurricularFaceLoss(D, C).double()
    cur.load_state_dict({"kernel": cur.kernel.detach(), "t": torch.full((1,), 0.25)})
    cos = F.normalize(x) @ unit_columns(cur.kernel.detach())
    cur(x, torch.arange(5))
    assert_rel(cur.t, 0.01 * cos.diagonal().mean() + 0.99 * 0.25, 1e-14, "t")


# ---------------------------------------------------------------- bad input


def test_adaface_needs_two_rows():
    """The original puts NaN into batch_std with one row; here a clear error, buffers untouched."""
    module = fastmargin.AdaFaceLoss(D, C)
    before = {k: v.clone() for k, v in module.named_buffers()}
    with pytest.raises(ValueError, match="AdaFace needs at least 2 rows to estimate the norm deviation"):
        module(torch.randn(1, D), torch.tensor([0]))
    with pytest.raises(ValueError, match="at least 2 rows"):
        adaptive.AdaFace().step(torch.randn(1, D), torch.tensor([0]))
    for key, value in module.named_buffers():
        assert torch.equal(value, before[key]), key


def test_bad_input_leaves_the_buffers():
    for module in (fastmargin.AdaFaceLoss(D, C), fastmargin.CurricularFaceLoss(D, C)):
        before = {k: v.clone() for k, v in module.named_buffers()}
        with pytest.raises(ValueError, match=r"labels\[1\] = 23 is outside \[0, 23\)"):
            module(torch.randn(3, D), torch.tensor([0, C, 1]))
        with pytest.raises(ValueError, match="embedding_size"):
            module(torch.randn(3, D + 1), torch.tensor([0, 1, 2]))
        for key, value in module.named_buffers():
            assert torch.equal(value, before[key]), (type(module).__name__, key)


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"norms must be \(B,\) or \(B, 1\)"):
        fastmargin.AdaFaceLoss(D, C)(torch.randn(3, D), torch.arange(3), torch.ones(4))
    with pytest.raises(ValueError, match="MagFace takes the norms from the embeddings"):
        adaptive.MagFace().step(torch.randn(3, D), torch.arange(3), norms=torch.ones(3))
    with pytest.raises(ValueError, match="reduction must be 'mean'"):
        fastmargin.MagFaceLoss(D, C, reduction="sum")
    with pytest.raises(ValueError, match="needs each row's target cosine"):
        adaptive.Curricular().step(torch.randn(3, D), torch.arange(3))
    with pytest.raises(ValueError, match="needs each row's target cosine"):
        adaptive.ElasticArc(plus=True).step(torch.randn(3, D), torch.arange(3))
    with pytest.raises(TypeError, match="ElasticArcFaceLoss\\(\\) got an unexpected keyword argument 'margin'"):
        fastmargin.ElasticArcFaceLoss(D, C, margin=0.5)
    with pytest.raises(TypeError, match="changes every step"):
        fastmargin.CurricularFaceLoss(D, C).current_margin()
    with pytest.raises(ValueError, match="std"):
        adaptive.ElasticCos(std=-1.0)
