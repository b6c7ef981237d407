"""The one streaming pass of an analysis over the run's eval split: :class:`StreamStats` (per-latent
statistics in memory O(L·(k + V)), never O(rows·L)), the metadata codes of ``tokens.arrow``
(:func:`meta_table`) and the loop that feeds batches to them (:func:`stream_eval`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from einops import rearrange

from train.analysis_config import AnalysisConfig
from train.analysis_run import DiffSpec, RunData, RunError, check_cache, run_slots
from train.metrics import explained_variance

__all__ = ["StreamStats", "meta_table", "stream_eval"]


# ---- the streaming pass ----------------------------------------------------------------------------


class StreamStats:
    """Accumulates per-latent statistics over batches of the eval split, in memory O(L·(k + V)).

    Per batch only the nonzero activations are touched (``nonzero`` of [B, L], then index_add /
    scatter), the decoder runs as a sparse matmul when activations are sparse, and the running top-k
    merges only the entries that beat a latent's current k-th value."""

    def __init__(self, n_latents: int, top_k: int, meta: dict[str, tuple[list[Any], np.ndarray]],
                 n_out: int, d_model: int, scaling: tuple[torch.Tensor, torch.Tensor, DiffSpec] | None,
                 device: torch.device) -> None:
        L, f64 = n_latents, dict(dtype=torch.float64, device=device)
        self.L, self.k, self.rows, self.nnz = L, top_k, 0, 0
        self.fires_L = torch.zeros(L, **f64)
        self.mass_L = torch.zeros(L, **f64)
        self.max_L = torch.zeros(L, dtype=torch.float32, device=device)
        # running top-k per latent (value 0 / seq -1: empty slot), rows sorted by value, descending
        self.top_val_KL = torch.zeros(top_k, L, device=device)
        self.top_seq_KL = torch.full((top_k, L), -1, dtype=torch.int64, device=device)
        self.top_pos_KL = torch.full((top_k, L), -1, dtype=torch.int64, device=device)
        # meta column -> (values, value code per seq); activation mass / firings per (latent, value); rows per value
        self.meta = meta
        self.meta_codes = {c: torch.from_numpy(codes).to(device) for c, (_, codes) in meta.items()}
        self.meta_mass = {c: torch.zeros(L, len(v), **f64) for c, (v, _) in meta.items()}
        self.meta_fires = {c: torch.zeros(L, len(v), **f64) for c, (v, _) in meta.items()}
        self.meta_rows = {c: torch.zeros(len(v), **f64) for c, (v, _) in meta.items()}
        self.err_X = torch.zeros(n_out, **f64)
        self.sum_XD = torch.zeros(n_out, d_model, **f64)
        self.sq_X = torch.zeros(n_out, **f64)
        self.scaling = scaling  # (latent ids [J], their decoder [J, Xo, D], roles)
        if scaling is not None:
            ids, dec_JXoD, spec = scaling
            self.d_JK = dec_JXoD[:, spec.ft_slots].flatten(1).float()  # the fine-tune decoder vectors d
            self.sc = {k: torch.zeros(ids.shape[0], **f64) for k in
                       ("ff", "fy_err_base", "fy_err_ft", "fy_rec_base", "fy_rec_ft", "fy_act_base", "fy_act_ft")}
            self.sc["dd"] = self.sc["dd_ft"] = self.d_JK.double().pow(2).sum(1)
            self.sc["dd_base"] = (self.d_JK.double() * dec_JXoD[:, spec.base_slots].flatten(1).double()).sum(1)
        self._dec_LK: torch.Tensor | None = None

    def explained_variance(self) -> tuple[float | None, list[float | None]]:
        """1 - FVU over the rows seen: overall, and per output slot (Xo order); None where it means
        nothing (see :func:`train.metrics.explained_variance`)."""
        return explained_variance(self.err_X, self.sum_XD, self.sq_X, self.rows)

    @torch.no_grad()
    def update(self, model: Any, x_in_BXiD: torch.Tensor, x_out_BXoD: torch.Tensor, seq_B: torch.Tensor,
               pos_B: torch.Tensor) -> None:
        """Encode a batch (inference mode), decode it, and fold it into every statistic."""
        f_BL = model.encode(x_in_BXiD, inference=True).float()
        rows_N, lat_N = f_BL.nonzero(as_tuple=True)
        val_N = f_BL[rows_N, lat_N]
        B, (Xo, D) = f_BL.shape[0], (model.cfg.n_out, model.cfg.d_model)
        if model.cfg.skip:
            recon_BXoD = model.decode(f_BL, x_in_BXiD).float()
        else:  # = model.decode: latents @ decoder + b_dec, sparse when the latents are
            if self._dec_LK is None:
                self._dec_LK = model.decoder_weight().detach().float().flatten(1)
            if len(val_N) < f_BL.numel() // 16:
                f_sp = torch.sparse_coo_tensor(torch.stack([rows_N, lat_N]), val_N, f_BL.shape, is_coalesced=True,
                                               check_invariants=False)
                recon_BK = torch.sparse.mm(f_sp, self._dec_LK)
            else:
                recon_BK = f_BL @ self._dec_LK
            recon_BXoD = recon_BK.view(B, Xo, D) + model.b_dec_XoD.float()
        x = x_out_BXoD.float()
        self.err_X += (x - recon_BXoD).pow(2).sum(dim=(0, 2)).double()
        self.sum_XD += x.sum(0).double()
        self.sq_X += x.pow(2).sum(dim=(0, 2)).double()
        self.add_latents(rows_N, lat_N, val_N, seq_B, pos_B)
        if self.scaling is not None:
            self._update_scaling(f_BL, x, recon_BXoD)

    def add_latents(self, rows_N: torch.Tensor, lat_N: torch.Tensor, val_N: torch.Tensor, seq_B: torch.Tensor,
                    pos_B: torch.Tensor) -> None:
        """Fold one batch's nonzero activations (row, latent, value) into counts, mass, max, metadata, top-k."""
        self.rows += seq_B.shape[0]
        self.nnz += lat_N.shape[0]
        self.fires_L += torch.bincount(lat_N, minlength=self.L).double()
        self.mass_L.index_add_(0, lat_N, val_N.double())
        self.max_L.scatter_reduce_(0, lat_N, val_N, "amax")
        for c, codes in self.meta_codes.items():
            v_B = codes[seq_B]
            V = len(self.meta[c][0])
            flat_N = lat_N * V + v_B[rows_N]
            self.meta_mass[c].view(-1).index_add_(0, flat_N, val_N.double())
            self.meta_fires[c].view(-1).index_add_(0, flat_N, torch.ones_like(val_N, dtype=torch.float64))
            self.meta_rows[c] += torch.bincount(v_B, minlength=V).double()
        # top-k: only entries above their latent's current k-th value can enter; the affected latents'
        # old slots and the new entries are sorted once by (latent, value desc) and cut at k per latent
        keep = val_N > self.top_val_KL[-1, lat_N]
        if not keep.any():
            return
        lat, val = lat_N[keep], val_N[keep]
        seq, pos = seq_B[rows_N[keep]], pos_B[rows_N[keep]]
        K = self.k
        A = torch.nonzero(torch.bincount(lat, minlength=self.L)).flatten()  # affected latents, ascending
        all_l = torch.cat([A.repeat_interleave(K), lat])
        all_v = torch.cat([self.top_val_KL[:, A].T.reshape(-1), val])
        all_s = torch.cat([self.top_seq_KL[:, A].T.reshape(-1), seq])
        all_p = torch.cat([self.top_pos_KL[:, A].T.reshape(-1), pos])
        # one float64 key: the latent in the integer part, the value (descending) in the fraction
        vmax = float(all_v.max()) + 1.0
        order = torch.argsort(all_l.double() + 0.5 * (1.0 - all_v.double() / vmax))
        l_sorted = all_l[order]
        counts_L = torch.bincount(l_sorted, minlength=self.L)
        rank = torch.arange(len(order), device=lat.device) - (torch.cumsum(counts_L, 0) - counts_L)[l_sorted]
        top = rank < K  # every affected latent holds >= K entries (its old slots), so each gets exactly K
        r, col, o = rank[top], torch.searchsorted(A, l_sorted[top]), order[top]
        for dst, src in ((self.top_val_KL, all_v), (self.top_seq_KL, all_s), (self.top_pos_KL, all_p)):
            new = torch.empty(K, A.shape[0], dtype=dst.dtype, device=dst.device)
            new[r, col] = src[o]
            dst[:, A] = new

    def _update_scaling(self, f_BL: torch.Tensor, x_BXoD: torch.Tensor, rec_BXoD: torch.Tensor) -> None:
        ids, _, spec = self.scaling  # type: ignore[misc]
        f_BJ = f_BL[:, ids]
        self.sc["ff"] += f_BJ.pow(2).sum(0).double()
        B = f_BL.shape[0]
        # one matmul: <d_j, y> for y in (x_base, x_ft, x̂_base, x̂_ft), rows stacked
        y_4BK = torch.cat([t[:, s].flatten(1) for t in (x_BXoD, rec_BXoD) for s in (spec.base_slots, spec.ft_slots)])
        proj_4BJ = (y_4BK @ self.d_JK.T).view(4, B, -1) * f_BJ
        fx_base, fx_ft, fr_base, fr_ft = proj_4BJ.sum(1).double()
        for m, fx, fr in (("base", fx_base, fr_base), ("ft", fx_ft, fr_ft)):
            self.sc[f"fy_act_{m}"] += fx
            self.sc[f"fy_rec_{m}"] += fr
            self.sc[f"fy_err_{m}"] += fx - fr


def meta_table(token_table: Any, columns: list[str] | None
               ) -> tuple[dict[str, tuple[list[Any], np.ndarray]], list[str]]:
    """Per metadata column: (sorted values, value code of every seq). Returns also notes on skipped columns."""
    names = [c for c in token_table.column_names if c not in ("seq", "input_ids")]
    notes: list[str] = []
    if columns is not None:
        missing = [c for c in columns if c not in names]
        if missing:
            notes.append(f"metadata column(s) {missing} not in tokens.arrow (it has {names})")
        names = [c for c in columns if c in names]
    seq = np.asarray(token_table.column("seq").to_numpy(), dtype=np.int64)
    out: dict[str, tuple[list[Any], np.ndarray]] = {}
    for c in names:
        col = token_table.column(c).to_pylist()
        values = sorted({v for v in col}, key=lambda v: (v is None, str(v)))
        if len(values) > 64:
            notes.append(f"metadata column {c!r} has {len(values)} values (> 64): not broken down")
            continue
        index = {v: i for i, v in enumerate(values)}
        codes = np.zeros(int(seq.max()) + 1 if len(seq) else 0, dtype=np.int64)
        codes[seq] = [index[v] for v in col]
        out[c] = (values, codes)
    return out, notes


def default_batch_rows(n_latents: int, n_slots: int, d_model: int) -> int:
    """Rows per analysis batch when --batch-size is not given: 2^24 floats over a row's latents plus twice
    its in+out slot activations, clamped to [256, 4096]. A batch holds a few latent-sized copies and about
    six slot-sized ones (inputs, outputs, reconstruction, error, its square), so a wide crosscoder (many
    slots, a large d_model) with few latents needs fewer rows: 16 toy slots at 1024 latents took 4096
    rows and ~270 MB above baseline, where 1820 rows take ~120 MB."""
    return int(min(4096, max(256, 2**24 // (n_latents + 2 * n_slots * d_model))))


def stream_eval(run: RunData, cache: Any, cfg: AnalysisConfig, meta: dict[str, tuple[list[Any], np.ndarray]],
                scaling: tuple[torch.Tensor, torch.Tensor, DiffSpec] | None, device: torch.device,
                tokens: Any = None) -> tuple[StreamStats, str, list[str]]:
    """One pass over the run's eval split (the train split, with a note, when the cache has none or it
    holds no rows). ``tokens``: the cache's ``tokens.arrow`` table (read here if None); every row's
    ``(seq, pos)`` must name one of its tokens, else :class:`RunError`."""
    from shared.token_table import position_problem, sequence_lengths
    from train.loader import ActivationLoader, default_eval_shards

    tc = run.info["config"]
    notes: list[str] = []
    # The dictionary's in/out slots index the layout it trained on: the run's own models (as this cache
    # names them) and hooks in the run's order, not all of this cache's in its order (it may hold more,
    # or the same in another order). And the mean/std of a mean_std cache, which need its folder.
    check_cache(run, cache)
    spec = run_slots(run, cache.manifest, str(cache.dir))
    model = run.model.to(device)
    L = model.cfg.n_latents
    batch = cfg.batch_size or default_batch_rows(L, len(model.cfg.in_slots) + model.cfg.n_out, model.cfg.d_model)
    kw = dict(models=spec.models, hooks=spec.hooks, seed=int(tc.get("seed", 0)), with_index=True,
              eval_shards=tc.get("eval_shards"), device=device)
    n = cache.n_shards
    k = default_eval_shards(n) if tc.get("eval_shards") is None else int(tc["eval_shards"])
    # Held-out shards of 0 rows are no held-out split either (training refuses them now; older runs have them).
    split = "eval" if 0 < k < n and sum(cache.manifest.shards[i].n_rows for i in range(n - k, n)) else "train"
    if split == "train":
        kw["eval_shards"] = 0
        held = "" if not 0 < k < n else ", and they hold 0 rows"
        notes.append(f"the cache has no held-out split (eval_shards = {k} of {n} shards{held}); statistics come from "
                     "the train split, which the dictionary was trained on")
    shards = range(n - k, n) if split == "eval" else range(n)
    rows = sum(cache.manifest.shards[i].n_rows for i in shards)
    loader = ActivationLoader(cache, min(batch, rows), split=split, **kw)  # type: ignore[arg-type]
    total = loader.split_rows if cfg.eval_tokens is None else min(cfg.eval_tokens, loader.split_rows)
    stats = StreamStats(L, cfg.top_k, meta, model.cfg.n_out, model.cfg.d_model, scaling, device)
    lengths_S = sequence_lengths(cache.token_table() if tokens is None else tokens)
    in_idx = torch.tensor(model.cfg.in_slots, device=device)
    out_idx = torch.tensor(model.cfg.out_slots, device=device)
    from shared.progress import tqdm

    bar = tqdm(total=total, unit="tok", unit_scale=True, desc=f"analyze ({split} split)", disable=not cfg.progress,
               dynamic_ncols=True)
    it = iter(loader)
    skipped = 0
    try:
        for acts_BMPD, index_B2 in it:
            take = min(acts_BMPD.shape[0], total - stats.rows)
            # Checked before use: an index past tokens.arrow fails deep in the report, a negative pos wraps.
            problem = position_problem(index_B2[:take, 0].numpy(), index_B2[:take, 1].numpy(), lengths_S)
            if problem is not None:
                raise RunError(f"cache {cache.dir}: the {split} split's rows hold {problem}, so their tokens cannot "
                               f"be shown; run `python run_harvest.py verify {cache.dir}` to find the shards at fault "
                               "and re-harvest or repair them")
            x_BXD = rearrange(acts_BMPD[:take], "b m p d -> b (m p) d")
            idx = index_B2[:take].to(device)
            # Rows the harvest wrote as inf/NaN are left out and counted, as training's eval does: an infinite
            # latent value broke the top-k bookkeeping (an IndexError) and made every figure NaN.
            finite_B = torch.isfinite(x_BXD).flatten(1).all(dim=1)
            if not bool(finite_B.all()):
                skipped += int((~finite_B).sum())
                x_BXD, idx = x_BXD[finite_B], idx[finite_B]
            stats.update(model, x_BXD.index_select(1, in_idx), x_BXD.index_select(1, out_idx), idx[:, 0], idx[:, 1])
            bar.update(take)
            if stats.rows >= total:
                break
    finally:
        bar.close()
        it.close()
    if skipped:
        notes.append(f"{skipped:,} {split}-split row(s) of {cache.dir} hold non-finite (inf or NaN) activations and were "
                     f"left out of every statistic; `python run_harvest.py verify {cache.dir}` names their shards")
    if stats.explained_variance()[0] is None:
        notes.append(f"explained variance is n/a: it needs at least 2 eval rows (--eval-tokens), got {stats.rows}"
                     if stats.rows < 2 else "explained variance is n/a: the eval rows hold no variance to explain")
    return stats, split, notes
