"""Known-answer tests of the stage-2 math core: dictionary forward, activations, losses, export.

Tiny CPU tensors with hand-computed expectations, not "loss went down".
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from einops import rearrange

from shared.normalization import Normalization
from train.activations import batchtopk_mask, jumprelu, step, topk_mask
from train.dictionary import Dictionary, DictionaryConfig, DictOutput
from train.export import SlotNorm, fold_normalization, load_dictionary, load_metadata, save_dictionary
from train.losses import loss_terms, sparsity_weights

ARCHS = ["crosscoder", "directional", "clt"]
ACTS = ["relu", "jumprelu", "topk", "batchtopk"]
NAMES4 = ["base/h0", "base/h1", "ft/h0", "ft/h1"]  # M=2, P=2: slot = m*2 + p
CLT_NAMES = [f"m/blocks.{i}.ln2.hook_normalized" for i in range(3)] + [f"m/blocks.{i}.hook_mlp_out" for i in range(3)]
SLOTS = {  # arch -> (slot_names, in_slots, out_slots, (M, P))
    "crosscoder": (NAMES4, [0, 1, 2, 3], [0, 1, 2, 3], (2, 2)),
    "directional": (NAMES4, [0, 2], [1, 3], (2, 2)),
    "clt": (CLT_NAMES, [0, 1, 2], [3, 4, 5], (1, 6)),
}


def make_cfg(arch: str, act: str, *, d: int = 8, n_latents: int = 12, **kw) -> DictionaryConfig:
    names, ins, outs, _ = SLOTS[arch]
    if act in ("topk", "batchtopk"):
        kw.setdefault("k", 3)
    return DictionaryConfig(arch=arch, activation=act, d_model=d, n_latents=n_latents, in_slots=ins,
                            out_slots=outs, slot_names=names, **kw)


def make(cfg: DictionaryConfig, seed: int = 0) -> Dictionary:
    torch.manual_seed(seed)
    return Dictionary(cfg)


def split(cfg: DictionaryConfig, x_BXD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x_BXD[:, cfg.in_slots], x_BXD[:, cfg.out_slots]


# ---- forward -----------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("act", ACTS)
def test_forward_shapes_and_recon_formula(arch: str, act: str) -> None:
    cfg = make_cfg(arch, act, skip=arch != "crosscoder")
    model = make(cfg)
    with torch.no_grad():  # non-zero biases and skip so every path of the formula counts
        for p in (model.b_enc_L, model.b_dec_XoD, *[p for n, p in model.named_parameters() if "skip" in n]):
            p.copy_(torch.randn_like(p) * 0.1)
    x_in, _ = split(cfg, torch.randn(5, len(cfg.slot_names), cfg.d_model))
    out = model(x_in)
    assert out.latents_BL.shape == out.pre_BL.shape == (5, cfg.n_latents)
    assert out.recon_BXoD.shape == (5, cfg.n_out, cfg.d_model)
    # Hand-written reference with explicit loops over slots.
    W_dec = model.decoder_weight().detach()
    ref = torch.einsum("bl,lxd->bxd", out.latents_BL.detach(), W_dec) + model.b_dec_XoD.detach()
    if arch == "directional":
        ref = ref + torch.einsum("bid,idoe->boe", x_in, model.W_skip_XiDXoD.detach())
    if arch == "clt":
        for i in range(cfg.n_in):
            ref[:, i] += x_in[:, i] @ model.W_skip_XiDD[i].detach()
    torch.testing.assert_close(out.recon_BXoD.detach(), ref)
    if act in ("topk",):
        assert ((out.latents_BL != 0).sum(-1) <= cfg.k).all()


def test_crosscoder_hand_computed_case() -> None:
    """M=2, P=1, D=2, L=2, relu: every number below is worked out by hand."""
    cfg = DictionaryConfig(arch="crosscoder", activation="relu", d_model=2, n_latents=2, in_slots=[0, 1],
                           out_slots=[0, 1], slot_names=["base/h", "ft/h"])
    model = Dictionary(cfg)
    with torch.no_grad():
        model.W_enc_XiDL.copy_(torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.5, 0.0], [0.0, -1.0]]]))
        model.b_enc_L.copy_(torch.tensor([-0.5, -4.0]))
        model.W_dec_LXoD.copy_(torch.tensor([[[1.0, 0.0], [0.0, 2.0]], [[5.0, 5.0], [5.0, 5.0]]]))
        model.b_dec_XoD.copy_(torch.tensor([[0.1, 0.2], [0.3, 0.4]]))
    x = torch.tensor([[[1.0, 2.0], [3.0, -1.0]]])
    out = model(x)
    # pre_0 = (1*1 + 2*0) + (3*0.5 - 1*0) - 0.5 = 2;  pre_1 = (0 + 2) + (0 + 1) - 4 = -1
    torch.testing.assert_close(out.pre_BL, torch.tensor([[2.0, -1.0]]))
    torch.testing.assert_close(out.latents_BL, torch.tensor([[2.0, 0.0]]))
    torch.testing.assert_close(out.recon_BXoD, torch.tensor([[[2.1, 0.2], [0.3, 4.4]]]))
    terms = loss_terms(model, x, x, out, sparsity_coeff=0.1)
    # recon: (1.1^2 + 1.8^2) + (2.7^2 + 5.4^2) = 4.45 + 36.45;  L1: 0.1 * 2 * (|[1,0]| + |[0,2]|) = 0.6
    torch.testing.assert_close(terms["recon"], torch.tensor(40.9))
    torch.testing.assert_close(terms["sparsity"], torch.tensor(0.6))
    torch.testing.assert_close(terms["total"], torch.tensor(41.5))
    assert terms["aux_k"] == 0 and terms["pre_act"] == 0


def test_init_norms_transpose_and_determinism() -> None:
    relu = make(make_cfg("crosscoder", "relu"), seed=3)
    torch.testing.assert_close(relu.decoder_norms(), torch.full((12, 4), 0.1))
    torch.testing.assert_close(relu.W_enc_XiDL, rearrange(relu.W_dec_LXoD, "l x d -> x d l"))
    topk = make(make_cfg("crosscoder", "batchtopk"))
    torch.testing.assert_close(topk.decoder_norms(), torch.ones(12, 4))
    again = make(make_cfg("crosscoder", "relu"), seed=3)
    assert all(torch.equal(a, b) for a, b in zip(relu.state_dict().values(), again.state_dict().values()))
    assert relu.b_enc_L.abs().sum() == 0 and relu.b_dec_XoD.abs().sum() == 0
    skip = make(make_cfg("directional", "relu", skip=True))
    assert skip.W_skip_XiDXoD.abs().sum() == 0


# ---- JumpReLU ----------------------------------------------------------------------------------
def test_jumprelu_threshold_gradient_is_rectangle_ste_times_theta() -> None:
    theta, eps = 0.5, 2.0  # window: |pre - theta| < eps/2 = 1, i.e. pre in (-0.5, 1.5)
    log_theta = torch.tensor([math.log(theta)], requires_grad=True)
    pre = torch.tensor([[0.0], [1.2], [2.0], [-1.0]], requires_grad=True)  # in, in, out, out
    y = jumprelu(pre, log_theta, eps)
    torch.testing.assert_close(y.detach(), torch.tensor([[0.0], [1.2], [2.0], [0.0]]))
    y.sum().backward()
    # d/dtheta = sum over the two in-window rows of -(theta/eps) = -0.5; d/dlog(theta) = theta * that.
    torch.testing.assert_close(log_theta.grad, torch.tensor([theta * -0.5]))
    assert log_theta.grad.item() != pytest.approx(-0.5)  # the trap: theta-gradient applied to log theta
    torch.testing.assert_close(pre.grad, torch.tensor([[0.0], [1.0], [1.0], [0.0]]))

    # Per-latent thresholds, weighted upstream gradient.
    theta_L = torch.tensor([0.2, 3.0])
    log_L = theta_L.log().requires_grad_(True)
    pre2 = torch.tensor([[0.5, 2.5], [1.5, 4.2], [0.0, 3.9]])
    g = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    (jumprelu(pre2, log_L, eps) * g).sum().backward()
    # latent 0 (window (-0.8, 1.2)): rows 0, 2 -> -(0.2/2)*(1+5);  latent 1 (window (2, 4)): rows 0, 2 -> -(3/2)*(2+6)
    expected = theta_L * torch.tensor([-(0.2 / 2) * 6, -(3.0 / 2) * 8])
    torch.testing.assert_close(log_L.grad, expected)

    # Heaviside step: d/dtheta = -(1/eps) per in-window row, times theta for log theta; none to pre.
    log_theta2 = torch.tensor([math.log(theta)], requires_grad=True)
    pre3 = pre.detach().clone().requires_grad_(True)
    h = step(pre3, log_theta2, eps)
    torch.testing.assert_close(h.detach(), torch.tensor([[0.0], [1.0], [1.0], [0.0]]))
    h.sum().backward()
    torch.testing.assert_close(log_theta2.grad, torch.tensor([theta * -(1 / eps) * 2]))
    assert pre3.grad.abs().sum() == 0


def test_jumprelu_dictionary_losses_hand_computed() -> None:
    cfg = make_cfg("directional", "jumprelu", n_latents=2)  # 2 out slots, dec norm 0.1 each: w_i = 0.2
    model = make(cfg)
    with torch.no_grad():
        model.W_enc_XiDL.zero_()
        model.b_enc_L.copy_(torch.tensor([2.0, 0.5]))  # pre = b_enc for every token
    x_in = torch.zeros(3, 2, cfg.d_model)
    out = model(x_in)
    x_out = out.recon_BXoD.detach()  # perfect reconstruction: only sparsity terms have gradients
    theta = math.exp(0.1)  # log theta_0 = 0.1 (crosscode's reading of the Jan 2025 update)
    torch.testing.assert_close(out.latents_BL, torch.tensor([[2.0, 0.0]] * 3))
    terms = loss_terms(model, x_in, x_out, out, sparsity_coeff=5.0)
    assert terms["recon"] == 0
    torch.testing.assert_close(terms["sparsity"], torch.tensor(5.0 * math.tanh(4 * 2.0 * 0.2)))
    torch.testing.assert_close(terms["pre_act"], torch.tensor(3e-6 * (theta - 0.5) * 0.2))
    terms["total"].backward()
    # Both pre values (2.0, 0.5) lie in the window |pre - theta| < eps/2 = 1. Per token the tanh
    # term sends df_i = lambda*c*w*(1 - tanh^2(c f_i w)) / B; the STE turns it into
    # theta * -(theta/eps) * df_i on log theta. pre_act adds lambda_p * w * theta where theta > pre.
    df = 5.0 * 4 * 0.2 * torch.tensor([1 - math.tanh(4 * 2.0 * 0.2) ** 2, 1.0])
    expected = theta * -(theta / 2.0) * df + torch.tensor([0.0, 3e-6 * 0.2 * theta])
    torch.testing.assert_close(model.log_threshold_L.grad, expected)


def test_calibrate_encoder_bias_sets_firing_rate() -> None:
    model = make(make_cfg("crosscoder", "jumprelu", n_latents=32))
    x = torch.randn(4000, 4, 8)
    model.calibrate_encoder_bias(x, firing_rate=0.25)
    rate = (model.encode(x) != 0).float().mean(0)
    assert (rate - 0.25).abs().max() < 0.01


# ---- TopK, BatchTopK, aux-K --------------------------------------------------------------------
def test_topk_and_batchtopk_masks() -> None:
    s = torch.tensor([[5.0, 1.0, 3.0, 0.0], [0.5, 0.2, 9.0, 8.0]])
    assert topk_mask(s, 2).tolist() == [[True, False, True, False], [False, False, True, True]]
    # top 2*2 = 4 over the batch: 9, 8, 5, 3 (row 1 gets 2, row 0 gets 2; 1.0 and 0.5 lose)
    assert batchtopk_mask(s, 2).tolist() == [[True, False, True, False], [False, False, True, True]]
    assert batchtopk_mask(s, 1).tolist() == [[False, False, False, False], [False, False, True, True]]


def test_batchtopk_threshold_ema_and_inference_l0() -> None:
    cfg = make_cfg("crosscoder", "batchtopk", n_latents=64, d=16, k=4)
    model = make(cfg)
    with pytest.raises(ValueError, match="update_inference_state"):
        model.encode(torch.randn(2, 4, 16), inference=True)
    # EMA: the first update sets theta; update n+1 mixes with beta_n = min(0.999, (1+n)/(10+n)).
    def kept(score: float) -> DictOutput:
        return DictOutput(torch.zeros(1, 64), torch.zeros(1, 64), torch.zeros(1, 4, 16), torch.tensor(score))

    model.update_inference_state(kept(2.0))
    assert model.threshold.item() == pytest.approx(2.0)
    model.update_inference_state(kept(4.0))  # n = 1: beta = 2/11
    assert model.threshold.item() == pytest.approx(2 / 11 * 2.0 + 9 / 11 * 4.0)
    model.update_inference_state(kept(math.inf))  # no positive kept score: ignored
    assert model.threshold.item() == pytest.approx(2 / 11 * 2.0 + 9 / 11 * 4.0)
    model.threshold_updates.fill_(1e6)  # long run: beta = 0.999
    model.threshold.fill_(2.0)
    model.update_inference_state(kept(4.0))
    assert model.threshold.item() == pytest.approx(0.999 * 2.0 + 0.001 * 4.0)

    model = make(cfg)
    gen = torch.Generator().manual_seed(1)
    mix_D = torch.randn(16, 16, generator=gen)  # a fixed, correlated distribution
    sample = lambda n: torch.randn(n, 4, 16, generator=gen) @ mix_D  # noqa: E731
    for _ in range(30):
        out = model(sample(256))
        assert int((out.latents_BL != 0).sum()) <= 4 * 256  # exactly k*B kept (some may be relu-zero)
        model.update_inference_state(out)
    l0 = (model.encode(sample(4096), inference=True) != 0).float().sum(-1).mean().item()
    assert abs(l0 - cfg.k) <= 0.2 * cfg.k, l0


@pytest.mark.parametrize("act", ["topk", "batchtopk"])
def test_aux_k_reaches_dead_latents_and_is_zero_without_dead(act: str) -> None:
    cfg = make_cfg("crosscoder", act, n_latents=4, d=4, k=1)
    model = make(cfg)
    with torch.no_grad():
        model.b_enc_L.copy_(torch.tensor([100.0, 0.0, 0.0, 5.0]))  # latent 0 always wins; latent 3 > 0
    x = torch.randn(6, 4, 4) * 0.1
    dead = torch.tensor([False, False, False, True])

    def grads(dead_mask: torch.Tensor | None) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        model.zero_grad()
        out = model(x)
        terms = loss_terms(model, x, x, out, sparsity_coeff=1.0, dead_mask_L=dead_mask)
        terms["total"].backward()
        return terms, {n: p.grad.clone() for n, p in model.named_parameters()}

    terms, g = grads(dead)
    out = model(x)
    assert (out.latents_BL[:, 1:] == 0).all()  # latent 3 is never selected by the main path
    # aux-K by hand: k_aux = min(d_model // 2, 1 dead) = 1 -> latent 3 with value relu(pre_3)
    residual = (x - out.recon_BXoD).detach()
    aux_recon = out.pre_BL[:, 3, None, None].relu() * model.W_dec_LXoD[3]
    expected = (residual - aux_recon).pow(2).sum((1, 2)).mean() / 32
    torch.testing.assert_close(terms["aux_k"], expected)
    assert g["W_enc_XiDL"][..., 3].abs().sum() > 0
    assert g["b_enc_L"][3] != 0
    assert g["W_dec_LXoD"][3].abs().sum() > 0

    _, g_none = grads(None)
    assert g_none["W_enc_XiDL"][..., 3].abs().sum() == 0 and g_none["W_dec_LXoD"][3].abs().sum() == 0
    terms_nd, g_nd = grads(torch.zeros(4, dtype=torch.bool))
    assert terms_nd["aux_k"] == 0
    for n in g_none:
        torch.testing.assert_close(g_nd[n], g_none[n], rtol=0, atol=0)


# ---- CLT ---------------------------------------------------------------------------------------
def test_clt_causality_and_masked_gradients() -> None:
    cfg = make_cfg("clt", "relu", n_latents=12, skip=True)  # 3 layers x 4 latents
    model = make(cfg)
    with torch.no_grad():
        model.W_skip_XiDD.copy_(torch.randn_like(model.W_skip_XiDD))
    x_in, x_out = split(cfg, torch.randn(5, 6, 8))
    base = model(x_in)
    latents = torch.rand(5, 12)
    for layer in range(3):
        bumped = latents.clone()
        bumped[:, layer * 4:(layer + 1) * 4] += 10.0
        a, b = model.decode(latents, x_in), model.decode(bumped, x_in)
        assert torch.equal(a[:, :layer], b[:, :layer])  # layers below never change
        assert (a[:, layer:] - b[:, layer:]).abs().amax((0, 2)).min() > 0  # layer and above do
        x2 = x_in.clone()
        x2[:, layer] += 3.0
        assert torch.equal(model(x2).recon_BXoD[:, :layer], base.recon_BXoD[:, :layer])
    mask = torch.ones(3, 3).triu().bool()  # [src, out]: out >= src
    assert (model.W_dec_XiLXoD.detach().permute(0, 2, 1, 3)[~mask] == 0).all()
    loss_terms(model, x_in, x_out, base, sparsity_coeff=1.0)["total"].backward()
    g = model.W_dec_XiLXoD.grad.permute(0, 2, 1, 3)  # [src, out, L, D]
    assert (g[~mask] == 0).all() and (g[mask].abs().sum((1, 2)) > 0).all()
    assert model.decoder_norms().shape == (12, 3)


# ---- shared latents ----------------------------------------------------------------------------
def test_shared_latents_tied_and_lower_sparsity() -> None:
    cfg = make_cfg("crosscoder", "relu", shared_latents=2)  # slots: base/h0, base/h1, ft/h0, ft/h1
    model = make(cfg)
    names = dict(model.named_parameters())
    assert names["W_dec_shared_LPD"].shape == (2, 2, 8) and names["W_dec_LXoD"].shape == (10, 4, 8)
    W = model.decoder_weight()
    W.retain_grad()
    for h in range(2):  # base/h and ft/h rows of a shared latent are one parameter
        assert torch.equal(W[:2, h], W[:2, 2 + h])
    assert not torch.equal(W[2:, 0], W[2:, 2])
    x = torch.randn(7, 4, 8)
    out = model(x)
    # make the decode use W: recompute through decoder_weight's graph
    recon = torch.einsum("bl,lxd->bxd", out.latents_BL, W) + model.b_dec_XoD
    (recon - x).pow(2).sum().backward()
    shared_grad = model.W_dec_shared_LPD.grad
    torch.testing.assert_close(shared_grad, W.grad[:2, :2] + W.grad[:2, 2:])  # tied: gradients add
    torch.testing.assert_close(sparsity_weights(model, 2.0), torch.tensor([0.3, 0.3] + [2.0] * 10))
    assert cfg.shared_sparsity_ratio < 1
    # Hand case: latents = relu(b_enc) = [1, 0, 1, 0...]; w_i = 4 slots * 0.1 = 0.4
    with torch.no_grad():
        model.W_enc_XiDL.zero_()
        model.b_enc_L.copy_(torch.tensor([1.0, 0.0, 1.0] + [0.0] * 9))
    out = model(x)
    terms = loss_terms(model, x, x, out, sparsity_coeff=1.0)
    torch.testing.assert_close(terms["sparsity"], torch.tensor(0.15 * 0.4 + 1.0 * 0.4))
    with pytest.raises(ValueError, match="shared_latents"):
        DictionaryConfig(arch="crosscoder", activation="relu", d_model=4, n_latents=8, in_slots=[0, 1],
                         out_slots=[0, 1], slot_names=["base/h0", "base/h1"], shared_latents=2)


# ---- export ------------------------------------------------------------------------------------
def _normalization(method: str, m: int, p: int, d: int) -> Normalization:
    gen = torch.Generator().manual_seed(7)
    if method == "norm_scale":
        return Normalization("norm_scale", 0.5 + 1.5 * torch.rand(m, p, generator=gen))
    mean = torch.randn(m, p, d, generator=gen) * 2
    std = 0.5 + 1.5 * torch.rand(m, p, d, generator=gen)
    return Normalization("mean_std", torch.ones(m, p), mean, std)


EXPORT_CASES = [(a, act, skip, shared) for a in ARCHS for act in ACTS for skip in (False, True)
                for shared in (0, 3) if not (a == "crosscoder" and skip) and not (shared and a == "clt")]


@pytest.mark.parametrize("method", ["norm_scale", "mean_std"])
@pytest.mark.parametrize(("arch", "act", "skip", "shared"), EXPORT_CASES)
def test_fold_normalization_matches_and_round_trips(tmp_path, method, arch, act, skip, shared) -> None:
    cfg = make_cfg(arch, act, skip=skip, shared_latents=shared)
    model = make(cfg)
    _, _, _, (m, p) = SLOTS[arch]
    norm = _normalization(method, m, p, cfg.d_model)
    gen = torch.Generator().manual_seed(3)
    raw_BMPD = torch.randn(64, m, p, cfg.d_model, generator=gen) * 3 + 1
    x_norm = rearrange(norm.apply(raw_BMPD), "b m p d -> b (m p) d")
    x_raw = rearrange(raw_BMPD, "b m p d -> b (m p) d")
    with torch.no_grad():
        for name, prm in model.named_parameters():
            if name.startswith("b_") or "skip" in name:
                prm.copy_(torch.randn_like(prm) * 0.2)
    # Calibrate on other rows: on these rows, the calibrated quantile sits exactly at theta.
    if act == "jumprelu":
        model.calibrate_encoder_bias(split(cfg, x_norm.roll(1, dims=-1))[0], firing_rate=0.3)
    if act == "batchtopk":
        model.update_inference_state(model(split(cfg, x_norm.roll(1, dims=-1))[0]))
    folded = fold_normalization(model, norm, norm)
    if shared:
        assert not folded.cfg.tie_shared_decoder and folded.cfg.shared_latents == shared
    n_out = len(cfg.out_slots)
    for inference in (False, True):
        want = model(split(cfg, x_norm)[0], inference=inference)
        got = folded(split(cfg, x_raw)[0], inference=inference)
        torch.testing.assert_close(got.latents_BL, want.latents_BL, atol=1e-5, rtol=1e-5)
        assert int((got.latents_BL != 0).sum()) > 0
        full = torch.zeros(64, m * p, cfg.d_model)  # undo() wants every slot; fill the output ones
        full[:, cfg.out_slots] = want.recon_BXoD
        raw_recon = rearrange(norm.undo(rearrange(full, "b (m p) d -> b m p d", m=m)), "b m p d -> b (m p) d")
        torch.testing.assert_close(got.recon_BXoD, raw_recon[:, cfg.out_slots], atol=1e-5, rtol=1e-5)
        assert got.recon_BXoD.shape[1] == n_out

    save_dictionary(tmp_path / "export", folded, {"normalization": method, "folded": True})
    loaded = load_dictionary(tmp_path / "export")
    assert loaded.cfg == folded.cfg and load_metadata(tmp_path / "export") == {"normalization": method, "folded": True}
    for k, v in folded.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    for inference in (False, True):
        a, b = folded(split(cfg, x_raw)[0], inference=inference), loaded(split(cfg, x_raw)[0], inference=inference)
        assert torch.equal(a.latents_BL, b.latents_BL) and torch.equal(a.recon_BXoD, b.recon_BXoD)


def test_save_load_tied_model_and_corruption(tmp_path) -> None:
    model = make(make_cfg("crosscoder", "batchtopk", shared_latents=2))
    model.update_inference_state(model(torch.randn(32, 4, 8)))
    save_dictionary(tmp_path / "d", model, {"step": 10})
    blob = (tmp_path / "d" / "model.safetensors").read_bytes()
    header_len = int.from_bytes(blob[:8], "little")
    assert json.loads(blob[8:8 + header_len])["__metadata__"]["format"] == "crosscache.dictionary/1"
    loaded = load_dictionary(tmp_path / "d")
    x = torch.randn(16, 4, 8)
    assert torch.equal(loaded(x, inference=True).recon_BXoD, model(x, inference=True).recon_BXoD)
    assert torch.equal(loaded.threshold, model.threshold)
    (tmp_path / "d" / "model.safetensors").write_bytes(blob[:-4] + b"\0\0\0\0")
    with pytest.raises(ValueError, match="checksum"):
        load_dictionary(tmp_path / "d")
    with pytest.raises(FileNotFoundError):
        load_dictionary(tmp_path / "missing")


def test_loaded_dictionary_is_in_eval_mode_and_encodes_each_row_by_the_threshold(tmp_path) -> None:
    """A BatchTopK export used to load in train mode with ``inference=False`` by default, so
    ``encode(one_row)`` applied the batch rule (exactly k latents) instead of the learned threshold."""
    cfg = make_cfg("crosscoder", "batchtopk", n_latents=64, d=16, k=4)
    model = make(cfg)
    gen = torch.Generator().manual_seed(1)
    for _ in range(20):
        model.update_inference_state(model(torch.randn(256, 4, 16, generator=gen)))
    save_dictionary(tmp_path / "d", model, {})
    loaded = load_dictionary(tmp_path / "d")
    assert not loaded.training
    rows = torch.randn(32, 1, 4, 16, generator=gen)
    by_threshold = [loaded.encode(r, inference=True) for r in rows]
    assert all(torch.equal(loaded.encode(r), want) for r, want in zip(rows, by_threshold))
    assert all(torch.equal(loaded(r).latents_BL, want) for r, want in zip(rows, by_threshold))
    # The batch rule differs on some rows (else this test would prove nothing) and is train mode's default,
    # which the trainer's step relies on (it also reports the smallest kept score then).
    assert any(int((w != 0).sum()) != cfg.k for w in by_threshold)
    loaded.train()
    assert all(torch.equal(loaded.encode(r), loaded.encode(r, inference=False)) for r in rows)
    assert loaded(rows[0]).min_kept_score is not None and loaded.eval()(rows[0]).min_kept_score is None
    assert not fold_normalization(loaded, SlotNorm.identity(4, 16), SlotNorm.identity(4, 16)).training


def test_slot_norm_identity_is_a_no_op_and_rng_untouched() -> None:
    cfg = make_cfg("directional", "relu", skip=True)
    model = make(cfg)
    state = torch.random.get_rng_state()
    folded = fold_normalization(model, SlotNorm.identity(2, 8), SlotNorm.identity(2, 8))
    assert torch.equal(torch.random.get_rng_state(), state)  # exporting mid-run keeps resumes exact
    x = torch.randn(4, 2, 8)
    torch.testing.assert_close(folded(x).recon_BXoD, model(x).recon_BXoD)


# ---- config validation -------------------------------------------------------------------------
@pytest.mark.parametrize(("overrides", "field"), [
    (dict(activation="topk", k=12), "k"),
    (dict(activation="topk", k=None), "k"),
    (dict(activation="batchtopk"), "k"),
    (dict(activation="relu", k=3), "k"),
    (dict(shared_sparsity_ratio=-0.1), "shared_sparsity_ratio"),
    (dict(pre_act_coeff=-1.0), "pre_act_coeff"),
    (dict(aux_k_coeff=-1.0), "aux_k_coeff"),
    (dict(dec_init_norm=0.0), "dec_init_norm"),
    (dict(jumprelu_bandwidth=-2.0), "jumprelu_bandwidth"),
    (dict(arch="clt", in_slots=[0, 1], out_slots=[2]), "out_slots"),
    (dict(arch="clt", in_slots=[0, 1, 2], out_slots=[1, 2, 3], n_latents=10), "n_latents"),
    (dict(out_slots=[0, 1]), "out_slots"),
    (dict(skip=True), "skip"),
    (dict(in_slots=[0, 9]), "in_slots"),
    (dict(n_latents=0), "n_latents"),
    (dict(arch="mlp"), "arch"),
    (dict(batchtopk_threshold_beta=1.0), "batchtopk_threshold_beta"),
])
def test_config_validation_names_the_field(overrides: dict, field: str) -> None:
    kwargs = dict(arch="crosscoder", activation="relu", d_model=8, n_latents=12, in_slots=[0, 1, 2, 3],
                  out_slots=[0, 1, 2, 3], slot_names=NAMES4)
    kwargs.update(overrides)
    with pytest.raises(ValueError, match=rf"DictionaryConfig\.{field}\b"):
        DictionaryConfig(**kwargs)


def _real_fields() -> list[str]:
    import dataclasses
    import typing

    hints = typing.get_type_hints(DictionaryConfig)
    return [f.name for f in dataclasses.fields(DictionaryConfig) if "float" in str(hints[f.name])]


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
@pytest.mark.parametrize("field", _real_fields())
def test_config_refuses_non_finite_numbers_naming_the_field(field: str, value: float) -> None:
    """``x > 0`` holds for inf: dec_init_norm, tanh_c and jumprelu_bandwidth passed and broke the loss at step 0."""
    kwargs = dict(arch="crosscoder", activation="jumprelu", d_model=8, n_latents=12, in_slots=[0, 1, 2, 3],
                  out_slots=[0, 1, 2, 3], slot_names=NAMES4, **{field: value})
    with pytest.raises(ValueError, match=rf"DictionaryConfig\.{field}: must be a finite number, got"):
        DictionaryConfig(**kwargs)


def test_input_shape_and_skip_errors() -> None:
    model = make(make_cfg("directional", "relu", skip=True))
    with pytest.raises(ValueError, match="x_in_BXiD"):
        model(torch.randn(3, 4, 8))
    with pytest.raises(ValueError, match="skip"):
        model.decode(torch.zeros(3, 12))
    with pytest.raises(ValueError, match="dead_mask_L"):
        m2 = make(make_cfg("crosscoder", "topk"))
        x = torch.randn(2, 4, 8)
        loss_terms(m2, x, x, m2(x), sparsity_coeff=0.0, dead_mask_L=torch.ones(5, dtype=torch.bool))
