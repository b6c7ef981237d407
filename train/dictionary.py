"""The dictionary family: one generic sparse coder specialised by config (STYLE "Adopt" 11).

Slots: the trainer flattens the loader's ``acts_BMPD`` into ``x_BXD`` (slot = m·P + p) and
passes ``x_in_BXiD = x_BXD[:, cfg.in_slots]``; the dictionary reconstructs
``x_out_BXoD = x_BXD[:, cfg.out_slots]``. ``arch`` picks which parameters exist:

- ``crosscoder`` (acausal; in = out): ``pre_BL = Σ_{x,d} x·W_enc_XiDL + b_enc_L``,
  ``recon_BXoD = act(pre)·W_dec_LXoD + b_dec_XoD`` (crosscoder paper). M=2,P=1 diffs two
  models; M=1,P=1 is an SAE.
- ``directional`` (in ≠ out: a transcoder, or earlier layers → later ones), with an optional
  ``skip``: a linear map from the flattened input slots to the flattened output slots, zero-init.
- ``clt`` (cross-layer transcoder, "Circuit Tracing" 2025): slot i of in/out is layer i; layer i
  encodes only its own input into its own ``L/n`` latents, which decode into every layer ≥ i.
  Causality is structural: the decoder ``W_dec_XiLXoD`` [n, L/n, n, D] is multiplied by a fixed
  upper-triangular mask, so masked entries stay zero and get zero gradient. Latent index
  ``i·(L/n) + j`` is latent j of layer i (``n_latents`` counts all layers). The optional skip is
  per layer (layer i's input → layer i's output), as in skip transcoders.

Shared latents (Feb 2025 diffing update): with ``shared_latents = S`` the first S latents have one
decoder per output hook shared by all models (parameter ``W_dec_shared_LPD`` [S, P_out, D],
expanded by index, so the models' copies are one tensor) and sparsity weight
``shared_sparsity_ratio · λ``. ``fold_normalization`` unties it (raw-space scales differ per model).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, fields
from typing import Literal

import torch
from einops import einsum, rearrange
from torch import nn

from shared.config import field_help
from train.activations import batchtopk_mask, jumprelu, topk_mask

__all__ = ["DictionaryConfig", "Dictionary", "DictOutput", "ARCHS", "ACTIVATIONS"]

Arch = Literal["crosscoder", "directional", "clt"]
Activation = Literal["relu", "jumprelu", "topk", "batchtopk"]
ARCHS: tuple[str, ...] = ("crosscoder", "directional", "clt")
ACTIVATIONS: tuple[str, ...] = ("relu", "jumprelu", "topk", "batchtopk")


def resolve_dec_init_norm(dec_init_norm: float | None, activation: str) -> float:
    """The decoder columns' initial norm: as given, else 1.0 for topk/batchtopk and 0.1 otherwise."""
    if dec_init_norm is not None:
        return dec_init_norm
    return 1.0 if activation in ("topk", "batchtopk") else 0.1


def resolve_k_aux(k_aux: int | None, d_model: int) -> int:
    """Dead latents aux-K uses: as given, else d_model // 2 (Gao et al. B.1)."""
    return k_aux if k_aux is not None else max(1, d_model // 2)


@dataclass(frozen=True)
class DictionaryConfig:
    """Shape, activation and loss hyper-parameters of one dictionary. Validated on construction."""

    arch: Arch = field_help("crosscoder (in = out slots), directional (in -> out, e.g. a transcoder) or clt.")
    activation: Activation = field_help("relu (L1), jumprelu (tanh + pre-act losses), topk or batchtopk.")
    d_model: int = field_help("Width of every slot (the cache's d_model).")
    n_latents: int = field_help("Latents in total (for clt: all layers together, a multiple of the layer count).")
    in_slots: list[int] = field_help("Input slot indices into x_BXD (slot = model * n_hooks + hook).")
    out_slots: list[int] = field_help("Output slot indices into x_BXD (clt: one per layer, same order as in_slots).")
    slot_names: list[str] = field_help("'model/hook' label of every slot of x_BXD, for export and analysis.")
    k: int | None = field_help("Active latents per token (topk, batchtopk only).", default=None)
    skip: bool = field_help("Learned linear skip from input to output slots, zero-init (directional, clt).",
                            default=False)
    shared_latents: int = field_help(
        "Feb 2025 diffing update: the first S latents share one decoder across models (needs >= 2 models "
        "in the output slots); ~1/8 of the latents in crosscode.", default=0)
    shared_sparsity_ratio: float = field_help(
        "Sparsity weight of shared latents relative to lambda (0.1-0.2 in the Feb 2025 update).", default=0.15)
    tie_shared_decoder: bool = field_help(
        "Store the shared latents' decoder once per hook (training). fold_normalization sets False.", default=True)
    dec_init_norm: float | None = field_help(
        "Per-slot norm of each initial decoder row. Default 0.1 for relu/jumprelu (crosscoder "
        "replications, crosscode), 1.0 for topk/batchtopk (dictionary_learning crosscoder fork).", default=None)
    enc_init_scale: float = field_help(
        "Encoder init = this x the decoder's transpose (1.0: the crosscoder replications and the "
        "dictionary_learning fork).", default=1.0)
    jumprelu_bandwidth: float = field_help("JumpReLU STE rectangle bandwidth epsilon (crosscode: 2.0).", default=2.0)
    jumprelu_log_threshold_init: float = field_help(
        "Initial log theta (crosscode reads the Jan 2025 update as log theta = 0.1, theta ~ 1.105). "
        "Pair with Dictionary.calibrate_encoder_bias.", default=0.1)
    tanh_c: float = field_help("c in the tanh sparsity loss sum_i tanh(c f_i w_i) (Jan 2025 update: 4).", default=4.0)
    pre_act_coeff: float = field_help("lambda_p of the JumpReLU pre-activation loss (Jan 2025 update: 3e-6).",
                                      default=3e-6)
    topk_score: Literal["pre_x_dec_norm", "pre"] = field_help(
        "What topk/batchtopk rank: relu(pre) x summed decoder norm (dictionary_learning crosscoder fork; "
        "invariant to trading scale between encoder and decoder) or relu(pre) (Gao et al.).",
        default="pre_x_dec_norm")
    aux_k_coeff: float = field_help("alpha of the aux-K loss (Gao et al. 2024: 1/32).", default=1 / 32)
    k_aux: int | None = field_help("Dead latents used by aux-K (default d_model // 2, Gao et al. B.1), "
                                   "capped by the number of dead latents.", default=None)
    batchtopk_threshold_beta: float = field_help(
        "EMA decay of the BatchTopK inference threshold (dictionary_learning fork: 0.999), reached "
        "after a warm-up (see Dictionary.update_inference_state).", default=0.999)

    def __post_init__(self) -> None:
        def bad(name: str, msg: str) -> ValueError:
            return ValueError(f"DictionaryConfig.{name}: {msg}")

        if self.arch not in ARCHS:
            raise bad("arch", f"must be one of {ARCHS}, got {self.arch!r}")
        if self.activation not in ACTIVATIONS:
            raise bad("activation", f"must be one of {ACTIVATIONS}, got {self.activation!r}")
        for name in ("d_model", "n_latents"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise bad(name, f"must be a positive int, got {getattr(self, name)!r}")
        n_slots = len(self.slot_names)
        if n_slots == 0 or len(set(self.slot_names)) != n_slots:
            raise bad("slot_names", f"must be non-empty and unique, got {self.slot_names!r}")
        for name in ("in_slots", "out_slots"):
            slots = list(getattr(self, name))
            if not slots or len(set(slots)) != len(slots) or any(not 0 <= s < n_slots for s in slots):
                raise bad(name, f"must be distinct slot indices in [0, {n_slots}), got {slots!r}")
        if self.arch == "crosscoder" and list(self.in_slots) != list(self.out_slots):
            raise bad("out_slots", f"a crosscoder reconstructs its input: must equal in_slots {self.in_slots!r}, "
                                   f"got {self.out_slots!r} (use arch='directional' to map slots onto others)")
        if self.arch == "clt":
            if len(self.in_slots) != len(self.out_slots):
                raise bad("out_slots", f"clt needs one output slot per layer: {len(self.in_slots)} in_slots "
                                       f"but {len(self.out_slots)} out_slots")
            if self.n_latents % len(self.in_slots):
                raise bad("n_latents", f"clt splits latents evenly over {len(self.in_slots)} layers; "
                                       f"{self.n_latents} is not a multiple")
        if self.skip and self.arch == "crosscoder":
            raise bad("skip", "a crosscoder's skip would learn the identity (in = out); use arch='directional'")
        if self.activation in ("topk", "batchtopk"):
            if self.k is None:
                raise bad("k", f"activation={self.activation!r} needs k (active latents per token)")
            if not isinstance(self.k, int) or not 0 < self.k < self.n_latents:
                raise bad("k", f"must be an int in [1, n_latents={self.n_latents}), got {self.k!r}")
        elif self.k is not None:
            raise bad("k", f"is only used by topk/batchtopk, not activation={self.activation!r}; leave it None")
        # Every real-valued field is finite: `x > 0` and `x >= 0` hold for inf (and NaN slips past
        # `x < 0`), and a non-finite hyperparameter only shows up as a non-finite loss at step 0.
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, numbers.Real) and not isinstance(value, bool) and not math.isfinite(value):
                raise bad(f.name, f"must be a finite number, got {value!r}")
        for name in ("shared_sparsity_ratio", "pre_act_coeff", "aux_k_coeff"):
            if getattr(self, name) < 0:
                raise bad(name, f"must be >= 0, got {getattr(self, name)!r}")
        for name in ("enc_init_scale", "jumprelu_bandwidth", "tanh_c"):
            if not getattr(self, name) > 0:
                raise bad(name, f"must be > 0, got {getattr(self, name)!r}")
        if self.dec_init_norm is not None and not self.dec_init_norm > 0:
            raise bad("dec_init_norm", f"must be > 0, got {self.dec_init_norm!r}")
        if self.k_aux is not None and (not isinstance(self.k_aux, int) or self.k_aux <= 0):
            raise bad("k_aux", f"must be a positive int, got {self.k_aux!r}")
        if not 0 <= self.batchtopk_threshold_beta < 1:
            raise bad("batchtopk_threshold_beta", f"must be in [0, 1), got {self.batchtopk_threshold_beta!r}")
        if self.topk_score not in ("pre_x_dec_norm", "pre"):
            raise bad("topk_score", f"must be 'pre_x_dec_norm' or 'pre', got {self.topk_score!r}")
        if not isinstance(self.shared_latents, int) or not 0 <= self.shared_latents < self.n_latents:
            raise bad("shared_latents", f"must be an int in [0, n_latents={self.n_latents}), "
                                        f"got {self.shared_latents!r}")
        if self.shared_latents:
            if self.arch == "clt":
                raise bad("shared_latents", "shared latents are for model diffing, not arch='clt'")
            self.shared_hook_index()  # raises if the output slots are not models x hooks

    # ---- derived values -------------------------------------------------------------------
    @property
    def n_in(self) -> int:
        return len(self.in_slots)

    @property
    def n_out(self) -> int:
        return len(self.out_slots)

    @property
    def latents_per_layer(self) -> int:
        """clt: latents of one layer (n_latents / layers); other archs: n_latents."""
        return self.n_latents // self.n_in if self.arch == "clt" else self.n_latents

    @property
    def resolved_dec_init_norm(self) -> float:
        return resolve_dec_init_norm(self.dec_init_norm, self.activation)

    @property
    def resolved_k_aux(self) -> int:
        return resolve_k_aux(self.k_aux, self.d_model)

    def shared_hook_index(self) -> list[int]:
        """For each output slot, the index of its hook among the output hooks (shared latents).

        Slot names are 'model/hook' (split at the last '/', as HF ids contain one); the output
        slots must be every (model, hook) pair of >= 2 models.
        """
        names = [self.slot_names[s] for s in self.out_slots]
        if any("/" not in n for n in names):
            raise ValueError(f"DictionaryConfig.slot_names: shared latents need 'model/hook' names, got {names!r}")
        pairs = [tuple(n.rsplit("/", 1)) for n in names]
        models = list(dict.fromkeys(m for m, _ in pairs))
        hooks = list(dict.fromkeys(h for _, h in pairs))
        if len(models) < 2 or len(pairs) != len(models) * len(hooks):
            raise ValueError(
                f"DictionaryConfig.shared_latents: the output slots must hold every hook of >= 2 models "
                f"(got models {models}, hooks {hooks} from {names}); set shared_latents=0 otherwise")
        return [hooks.index(h) for _, h in pairs]


@dataclass
class DictOutput:
    """Result of :meth:`Dictionary.forward`."""

    latents_BL: torch.Tensor
    pre_BL: torch.Tensor  # pre-activations (encoder output before the activation function)
    recon_BXoD: torch.Tensor
    min_kept_score: torch.Tensor | None = None  # batchtopk training: smallest positive kept score (inf: none)


class Dictionary(nn.Module):
    """A sparse dictionary; see the module docstring for the parameters each ``arch`` holds."""

    def __init__(self, cfg: DictionaryConfig):
        super().__init__()
        self.cfg = cfg
        L, D, Xi, Xo = cfg.n_latents, cfg.d_model, cfg.n_in, cfg.n_out
        if cfg.arch == "clt":
            Lp = cfg.latents_per_layer
            self.W_enc_XiDL = nn.Parameter(torch.empty(Xi, D, Lp))  # L here: latents of one layer
            self.W_dec_XiLXoD = nn.Parameter(torch.empty(Xi, Lp, Xo, D))
            # dec_mask[src, out] = 1 iff out >= src: layer src's latents never write below src.
            self.register_buffer("dec_mask_XiXo", torch.ones(Xi, Xo).triu(), persistent=False)
        else:
            self.W_enc_XiDL = nn.Parameter(torch.empty(Xi, D, L))
            n_tied = self.n_tied
            self.W_dec_LXoD = nn.Parameter(torch.empty(L - n_tied, Xo, D))  # the untied latents S.. L
            if n_tied:
                hook_Xo = torch.tensor(cfg.shared_hook_index())
                self.W_dec_shared_LPD = nn.Parameter(torch.empty(n_tied, int(hook_Xo.max()) + 1, D))
                self.register_buffer("shared_hook_Xo", hook_Xo, persistent=False)
        self.b_enc_L = nn.Parameter(torch.zeros(L))
        self.b_dec_XoD = nn.Parameter(torch.zeros(Xo, D))
        if cfg.skip:
            shape = (Xi, D, D) if cfg.arch == "clt" else (Xi, D, Xo, D)
            name = "W_skip_XiDD" if cfg.arch == "clt" else "W_skip_XiDXoD"
            setattr(self, name, nn.Parameter(torch.zeros(shape)))
        if cfg.activation == "jumprelu":
            self.log_threshold_L = nn.Parameter(torch.empty(L))
        if cfg.activation in ("topk", "batchtopk"):
            # Per-latent factor on the ranking score; 1 in training, set by fold_normalization so a
            # raw-space export ranks exactly as the normalized-space model did.
            self.register_buffer("score_scale_L", torch.ones(L))
        if cfg.activation == "batchtopk":
            self.register_buffer("threshold", torch.tensor(-1.0))  # < 0: not learned yet
            self.register_buffer("threshold_updates", torch.tensor(0.0))
        self.reset_parameters()

    @property
    def n_tied(self) -> int:
        """Latents whose decoder is one tensor shared across models (0 unless tied shared latents)."""
        return self.cfg.shared_latents if self.cfg.tie_shared_decoder else 0

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Decoder rows: random directions of norm ``dec_init_norm`` per slot; encoder: the scaled
        transpose of the decoder where in/out slots pair up (else its own random directions);
        biases and skip zero. Deterministic given ``torch.manual_seed``."""
        cfg, norm = self.cfg, self.cfg.resolved_dec_init_norm

        def directions(*shape: int) -> torch.Tensor:
            t = torch.randn(*shape)
            return t / t.norm(dim=-1, keepdim=True) * norm

        if cfg.arch == "clt":
            self.W_dec_XiLXoD.copy_(directions(*self.W_dec_XiLXoD.shape) * self.dec_mask_XiXo[:, None, :, None])
            diag_XiLD = torch.stack([self.W_dec_XiLXoD[i, :, i] for i in range(cfg.n_in)])
            self.W_enc_XiDL.copy_(rearrange(diag_XiLD, "x l d -> x d l") * cfg.enc_init_scale)
        else:
            self.W_dec_LXoD.copy_(directions(*self.W_dec_LXoD.shape))
            if self.n_tied:
                self.W_dec_shared_LPD.copy_(directions(*self.W_dec_shared_LPD.shape))
            # In/out slots pair up (crosscoder; directional with as many in as out): transpose.
            paired = cfg.n_in == cfg.n_out
            src_LXD = self.decoder_weight() if paired else directions(cfg.n_latents, cfg.n_in, cfg.d_model)
            self.W_enc_XiDL.copy_(rearrange(src_LXD, "l x d -> x d l") * cfg.enc_init_scale)
        self.b_enc_L.zero_()
        self.b_dec_XoD.zero_()
        for name in ("W_skip_XiDD", "W_skip_XiDXoD"):
            if hasattr(self, name):
                getattr(self, name).zero_()
        if cfg.activation == "jumprelu":
            self.log_threshold_L.fill_(cfg.jumprelu_log_threshold_init)
        if cfg.activation in ("topk", "batchtopk"):
            self.score_scale_L.fill_(1.0)
        if cfg.activation == "batchtopk":
            self.threshold.fill_(-1.0)
            self.threshold_updates.zero_()

    # ---- weights as the generic core sees them ---------------------------------------------
    def decoder_weight(self) -> torch.Tensor:
        """The effective decoder [L, Xo, D]: shared rows expanded per model, clt mask applied."""
        if self.cfg.arch == "clt":
            masked = self.W_dec_XiLXoD * self.dec_mask_XiXo[:, None, :, None]
            return rearrange(masked, "xi l xo d -> (xi l) xo d")
        if not self.n_tied:
            return self.W_dec_LXoD
        # Both models' rows are gathered from one parameter, so they are equal by construction
        # and their gradients add up in it (the tie).
        shared_LXoD = self.W_dec_shared_LPD[:, self.shared_hook_Xo]
        return torch.cat([shared_LXoD, self.W_dec_LXoD], dim=0)

    def decoder_norms(self) -> torch.Tensor:
        """Per-slot decoder norms [L, Xo] (shared latents expanded; clt: 0 below the source layer)."""
        return self.decoder_weight().norm(dim=-1)

    # ---- forward pieces ----------------------------------------------------------------------
    def _check_input(self, x_in_BXiD: torch.Tensor) -> None:
        want = (self.cfg.n_in, self.cfg.d_model)
        if x_in_BXiD.ndim != 3 or tuple(x_in_BXiD.shape[1:]) != want:
            raise ValueError(f"x_in_BXiD must be [B, {want[0]}, {want[1]}] (the in_slots), "
                             f"got {tuple(x_in_BXiD.shape)}")

    def pre_activations(self, x_in_BXiD: torch.Tensor) -> torch.Tensor:
        """Encoder output before the activation function, [B, L]."""
        self._check_input(x_in_BXiD)
        if self.cfg.arch == "clt":  # each layer reads only its own input slot
            pre_BXL = einsum(x_in_BXiD, self.W_enc_XiDL, "b x d, x d l -> b x l")
            return rearrange(pre_BXL, "b x l -> b (x l)") + self.b_enc_L
        return einsum(x_in_BXiD, self.W_enc_XiDL, "b x d, x d l -> b l") + self.b_enc_L

    @torch.no_grad()
    def score_weight_L(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The per-latent factor the topk/batchtopk ranking score puts on a latent's activation:
        ``score_scale_L``, times the latent's decoder norms summed over slots for ``pre_x_dec_norm``
        (each factor cast to ``dtype`` first when given). Converters fold it into other formats."""
        w_L = self.score_scale_L if dtype is None else self.score_scale_L.to(dtype)
        if self.cfg.topk_score == "pre":
            return w_L
        norms_L = self.decoder_norms().sum(-1)
        return (norms_L if dtype is None else norms_L.to(dtype)) * w_L

    def _scores(self, acts_BL: torch.Tensor, part: slice = slice(None)) -> torch.Tensor:
        """Ranking score of topk/batchtopk (no gradient: selection is not differentiable); ``part``: the
        latents ``acts_BL`` holds, when not all."""
        return acts_BL.detach() * self.score_weight_L()[part]

    def _activate(self, pre_BL: torch.Tensor, inference: bool,
                  part: slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The activation of pre-activations ``pre_BL`` of the latents ``part`` (all by default; a part only
        where a latent's activation depends on its own pre-activation alone: see :meth:`encode_layer`)."""
        cfg = self.cfg
        match cfg.activation:
            case "relu":
                return torch.relu(pre_BL), None
            case "jumprelu":
                return jumprelu(pre_BL, self.log_threshold_L[part], cfg.jumprelu_bandwidth), None
            case "topk":
                assert part == slice(None), "topk ranks all latents together"
                acts_BL = torch.relu(pre_BL)
                return acts_BL * topk_mask(self._scores(acts_BL), cfg.k), None  # type: ignore[arg-type]
            case "batchtopk":
                acts_BL = torch.relu(pre_BL)
                score_BL = self._scores(acts_BL, part)
                if inference:  # per token: the exported model needs no batch (BatchTopK paper, sec. 3)
                    if float(self.threshold) < 0:
                        raise ValueError("batchtopk inference threshold was never learned: the trainer must call "
                                         "update_inference_state(out) after each training step")
                    return acts_BL * (score_BL > self.threshold), None
                assert part == slice(None), "batchtopk's training rule ranks all latents together"
                keep_BL = batchtopk_mask(score_BL, cfg.k)  # type: ignore[arg-type]
                # Smallest positive kept score (+inf if none), without a host sync.
                kept_BL = torch.where(keep_BL & (score_BL > 0), score_BL, torch.full_like(score_BL, math.inf))
                return acts_BL * keep_BL, kept_BL.min()
        raise AssertionError(cfg.activation)

    def _inference(self, inference: bool | None) -> bool:
        # The module's mode decides by default, so an exported model (load_dictionary returns it in
        # eval mode) encodes each row on its own, while the trainer's train-mode forward keeps the
        # batch rule BatchTopK is trained with.
        return not self.training if inference is None else inference

    def encode(self, x_in_BXiD: torch.Tensor, *, inference: bool | None = None) -> torch.Tensor:
        """Latents [B, L] of input slots [B, Xi, D].

        ``inference`` (only batchtopk depends on it): True keeps a latent where its score exceeds
        the learned threshold, per row (the exported model's rule); False keeps the top ``k·B``
        scores of the batch (the training rule: a single row gets exactly ``k``). None (default):
        ``not self.training``, i.e. the threshold rule after ``.eval()``, as :func:`load_dictionary` returns.
        """
        return self._activate(self.pre_activations(x_in_BXiD), self._inference(inference))[0]

    def encode_layer(self, x_BD: torch.Tensor, layer: int) -> torch.Tensor:
        """A clt's latents of one layer [B, latents_per_layer] from that layer's input slot [B, D]: the columns
        ``encode(x_in_BXiD, inference=True)`` gives for it, without encoding the other layers. Defined where a
        layer's latents depend on its own input alone: relu, jumprelu, and batchtopk's inference threshold (a
        topk CLT ranks all layers together: ValueError)."""
        cfg = self.cfg
        if cfg.arch != "clt" or cfg.activation == "topk":
            raise ValueError(f"encode_layer needs a clt whose layers encode independently (relu, jumprelu, "
                             f"batchtopk); this is arch {cfg.arch}, activation {cfg.activation}")
        if not 0 <= layer < cfg.n_in or x_BD.ndim != 2 or x_BD.shape[1] != cfg.d_model:
            raise ValueError(f"encode_layer needs a layer in [0, {cfg.n_in}) and x_BD [B, {cfg.d_model}], "
                             f"got layer {layer} and {tuple(x_BD.shape)}")
        Lp = cfg.latents_per_layer
        part = slice(layer * Lp, (layer + 1) * Lp)
        pre_BL = x_BD @ self.W_enc_XiDL[layer] + self.b_enc_L[part]
        return self._activate(pre_BL, True, part)[0]

    def decode(self, latents_BL: torch.Tensor, x_in_BXiD: torch.Tensor | None = None) -> torch.Tensor:
        """Reconstruction [B, Xo, D] of latents [B, L] (a skip also needs ``x_in_BXiD``)."""
        recon_BXoD = einsum(latents_BL, self.decoder_weight(), "b l, l x d -> b x d") + self.b_dec_XoD
        if self.cfg.skip:
            if x_in_BXiD is None:
                raise ValueError("this dictionary has a skip connection: decode(latents, x_in_BXiD) needs x_in_BXiD")
            self._check_input(x_in_BXiD)
            if self.cfg.arch == "clt":
                recon_BXoD = recon_BXoD + einsum(x_in_BXiD, self.W_skip_XiDD, "b x d, x d e -> b x e")
            else:
                recon_BXoD = recon_BXoD + einsum(x_in_BXiD, self.W_skip_XiDXoD, "b xi d, xi d xo e -> b xo e")
        return recon_BXoD

    def forward(self, x_in_BXiD: torch.Tensor, *, inference: bool | None = None) -> DictOutput:
        """Encode and decode input slots [B, Xi, D]. ``inference`` as in :meth:`encode` (default:
        ``not self.training``); the trainer's step runs in train mode, so batchtopk gets the batch
        rule and ``min_kept_score`` for :meth:`update_inference_state`."""
        pre_BL = self.pre_activations(x_in_BXiD)
        latents_BL, min_kept = self._activate(pre_BL, self._inference(inference))
        return DictOutput(latents_BL, pre_BL, self.decode(latents_BL, x_in_BXiD), min_kept)

    # ---- state the trainer drives --------------------------------------------------------------
    @torch.no_grad()
    def update_inference_state(self, out: DictOutput) -> None:
        """After each training step: batchtopk's threshold θ ← β_n·θ + (1−β_n)·(smallest kept score).

        β_n = min(β, (1 + n)/(10 + n)) after n updates (the warm-up of TensorFlow's
        ExponentialMovingAverage): early, while the dictionary still changes fast, θ tracks the
        recent batches; from n ≈ 9000 on it is the EMA(0.999) of the dictionary_learning
        crosscoder fork. The first update sets θ directly. No-op for other activations. Under
        DDP, buffers are broadcast from rank 0 by default, so rank 0's estimate is used.
        """
        if self.cfg.activation != "batchtopk" or out.min_kept_score is None:
            return
        m = out.min_kept_score.detach().to(self.threshold)
        n = self.threshold_updates
        beta = torch.clamp((1 + n) / (10 + n), max=self.cfg.batchtopk_threshold_beta)
        ema = beta * self.threshold + (1 - beta) * m
        # torch.where, not Python ifs: no device->host sync in the training loop.
        new = torch.where(self.threshold < 0, m, ema)
        ok = torch.isfinite(m)
        self.threshold.copy_(torch.where(ok, new, self.threshold))
        self.threshold_updates.add_(ok.to(n.dtype))

    @torch.no_grad()
    def calibrate_encoder_bias(self, x_in_BXiD: torch.Tensor, firing_rate: float) -> None:
        """Set ``b_enc`` so each latent fires on about ``firing_rate`` of these rows (the Jan 2025
        update's data-dependent init; crosscode ``DataDependentJumpReLUInitStrategy``): b = t − q,
        q the (1 − rate) quantile of the bias-free pre-activation, t = θ (jumprelu) or 0.
        The update suggests rate = 10_000 / n_latents; crosscode uses larger rates for small L."""
        if not 0 < firing_rate <= 1:
            raise ValueError(f"firing_rate must be in (0, 1], got {firing_rate!r}")
        nobias_NL = self.pre_activations(x_in_BXiD) - self.b_enc_L
        n = nobias_NL.shape[0]
        q_L = nobias_NL.kthvalue(min(n, max(1, math.ceil((1 - firing_rate) * n))), dim=0).values
        t_L = self.log_threshold_L.exp() if self.cfg.activation == "jumprelu" else torch.zeros_like(q_L)
        self.b_enc_L.copy_(t_L - q_L)
