"""A synthetic cache whose rows are sparse combinations of known atoms (the planted dictionary).

Two "models" (A = base, B = fine-tune) at one hook. Atoms:
- shared: the same unit direction in both models (B's copy scaled by 0.5-1.5);
- A-only: a direction in A, nothing in B;  B-only: a direction in B, nothing in A.
Each row activates a few atoms with positive coefficients, plus small Gaussian noise. The
cache is written through the project's own writer (``shared.cache.CacheWriter``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from shared.cache import CacheWriter
from shared.cache_format import Manifest, shard_file_name
from shared.token_table import write_token_table


@dataclass
class Planted:
    atoms_KMD: torch.Tensor  # each atom's vector in each model (zeros where absent)
    kind: list[str]  # "shared" | "A" | "B" per atom


def make_planted_cache(path: Path, *, d: int = 32, n_shared: int = 16, n_a: int = 8, n_b: int = 8,
                       active: int = 3, n_rows: int = 40_960, rows_per_shard: int = 2048, noise: float = 0.05,
                       seed: int = 0) -> Planted:
    g = torch.Generator().manual_seed(seed)
    k = n_shared + n_a + n_b
    dirs_A = torch.nn.functional.normalize(torch.randn(k, d, generator=g), dim=-1)
    dirs_B = torch.nn.functional.normalize(torch.randn(k, d, generator=g), dim=-1)
    atoms = torch.zeros(k, 2, d)
    kinds = ["shared"] * n_shared + ["A"] * n_a + ["B"] * n_b
    for i, kind in enumerate(kinds):
        if kind == "shared":
            atoms[i, 0] = dirs_A[i]
            atoms[i, 1] = dirs_A[i] * (0.5 + torch.rand(1, generator=g).item())
        elif kind == "A":
            atoms[i, 0] = dirs_A[i]
        else:
            atoms[i, 1] = dirs_B[i]
    # Sparse codes: `active` atoms per row, coefficients in [2, 4) so that E|x| ~ sqrt(d) / 2.
    idx = torch.rand(n_rows, k, generator=g).argsort(dim=1)[:, :active]
    coef = torch.zeros(n_rows, k)
    coef.scatter_(1, idx, 2 + 2 * torch.rand(n_rows, active, generator=g))
    acts = torch.einsum("nk,kmd->nmd", coef, atoms) + noise * torch.randn(n_rows, 2, d, generator=g)
    acts_NMPD = acts[:, :, None, :]

    manifest = Manifest(
        models=[{"name": "A", "path": None}, {"name": "B", "path": None}], hooks=["blocks.0.hook_resid_post"],
        d_model=d, dtype="float32", context_size=9, n_rows=0, shards=[],
        normalization={"method": "none", "scale": [[1.0], [1.0]], "file": None, "calibration_rows": 0},
        excluded_tokens={"special": True, "token_ids": [0]}, dataset={"name": "planted"},
        tokenizer={"name": "none", "vocab_size": 1}, created_by={"tool": "tests/planted.py"}, complete=False,
        extra={"n_sequences": n_rows // 8},
    )
    writer = CacheWriter(path, manifest)
    for s, start in enumerate(range(0, n_rows, rows_per_shard)):
        rows = slice(start, start + rows_per_shard)
        n = acts_NMPD[rows].shape[0]
        r = torch.arange(start, start + n)
        writer.add_shard(shard_file_name(s), acts_NMPD[rows].contiguous(), r // 8, r % 8 + 1, torch.ones(n))
    write_token_table(path, [[0] * 9] * (n_rows // 8))
    writer.finish()
    return Planted(atoms, kinds)


def recovery(decoder_LMD: torch.Tensor, planted: Planted) -> tuple[torch.Tensor, torch.Tensor]:
    """For each atom: the best cosine of any latent's decoder (both models concatenated), and that latent."""
    dec = torch.nn.functional.normalize(decoder_LMD.flatten(1), dim=-1)
    atoms = torch.nn.functional.normalize(planted.atoms_KMD.flatten(1), dim=-1)
    cos_KL = atoms @ dec.T
    best, which = cos_KL.max(dim=1)
    return best, which
