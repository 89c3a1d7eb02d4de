"""Subspace refresh and projection for GaLore.

A GaLore matrix W (m x n) keeps its optimizer moments in a rank-r subspace of its
gradient G. The subspace is a projector with orthonormal vectors:

    right side: Q is (r, n), rows = top-r right singular vectors.  R = G Q^T  (m, r)
                update back: dW = N Q                                  (m, n)
    left side:  P is (m, r), columns = top-r left singular vectors.  R = P^T G (r, n)
                update back: dW = P N                                  (m, n)

These are galore-torch's storage conventions, so a state converted from it is ours.
Everything here is a pure function of tensors (no projector objects): optimizer state
stays plain tensors and loads with torch.load(weights_only=True).

Refresh methods
---------------
- "svd": exact fp32 SVD (torch.linalg.svd), retried in float64 when LAPACK fails.
- "randomized": subspace iteration on the Gram operator G^T G (right side of the `to_right`
  view): a cold start of `first_power_iters` iterations from a seeded Gaussian block, then
  warm-started iterations from the previous projector. It only needs products with the Gram
  operator, so a sharded caller answers those products with collectives and gets the same
  basis on every rank (`randomized_program` + a driver).

Singular-vector signs
---------------------
LAPACK returns each singular vector with an arbitrary sign, and the sign can flip under a
1e-7 change of the input. Moments carried across a refresh are coordinates in the old
basis, so a flipped vector scrambles them, and a sharded run (whose gradient differs by
all-reduce rounding) drifts from a single-process run. signs="aligned" (default) fixes
each vector by rule: aligned with its predecessor where there is one, else its
largest-magnitude entry positive. signs="lapack" keeps LAPACK's signs (galore-torch).
"""
from __future__ import annotations

import hashlib
import math
from typing import Callable, Generator, Literal

import torch

Side = Literal["left", "right"]
PROJ_TYPES = ("std", "reverse_std", "left", "right")
REFRESH_METHODS = ("svd", "randomized")
SIGN_RULES = ("aligned", "lapack")

# A new vector is aligned with its predecessor only where they clearly overlap; below
# this |cosine| the predecessor says nothing about orientation and the canonical rule
# decides (a rule on a near-zero dot product would itself flip under rounding).
_ALIGN_MIN_OVERLAP = 0.1


def choose_side(global_shape: tuple[int, ...], proj_type: str) -> Side:
    """Projection side from the parameter's GLOBAL shape (never a shard's shape).

    std keeps the smaller projector: right when m >= n. reverse_std is the opposite.
    """
    if proj_type not in PROJ_TYPES:
        raise ValueError(f"proj_type={proj_type!r}: expected one of {PROJ_TYPES}")
    if proj_type in ("left", "right"):
        return proj_type  # type: ignore[return-value]
    m, n = global_shape[0], global_shape[1]
    wide_right = m >= n
    if proj_type == "std":
        return "right" if wide_right else "left"
    return "left" if wide_right else "right"


def project(grad: torch.Tensor, proj: torch.Tensor, side: Side,
            out: torch.Tensor | None = None) -> torch.Tensor:
    """Low-rank gradient: G Q^T (right) or P^T G (left), into `out` when given."""
    if side == "right":
        return torch.matmul(grad, proj.t(), out=out)
    return torch.matmul(proj.t(), grad, out=out)


def project_back(update: torch.Tensor, proj: torch.Tensor, side: Side) -> torch.Tensor:
    """Full-size N Q (right) or P N (left): galore-torch's unfused map back."""
    return update @ proj if side == "right" else proj @ update


def project_back_(
    param: torch.Tensor, update: torch.Tensor, proj: torch.Tensor, side: Side, alpha: float
) -> None:
    """param += alpha * (N Q) or alpha * (P N), fused: no full-size temporary.

    Low-precision params (bf16 weights without an fp32 master copy) take the product in
    their own dtype: one rounding into the weight, operands cast (they are small).
    """
    if param.dtype != update.dtype:
        update, proj = update.to(param.dtype), proj.to(param.dtype)
    if side == "right":
        param.addmm_(update, proj, alpha=alpha)
    else:
        param.addmm_(proj, update, alpha=alpha)


def storage_dtype(param_dtype: torch.dtype) -> torch.dtype:
    """Projectors are kept in a 16-bit weight's own dtype (bf16 training without an fp32 master
    copy): every projection casts them to that dtype anyway, so fp32 storage would only cost
    memory (1.75 GiB of a 7B run at rank 1024). Otherwise fp32."""
    return param_dtype if param_dtype in (torch.bfloat16, torch.float16) else torch.float32


def to_right(mat: torch.Tensor, side: Side) -> torch.Tensor:
    """View a matrix so that `side` becomes the right side (left side of G = right of G^T)."""
    return mat if side == "right" else mat.t()


def basis_to_proj(basis: torch.Tensor, side: Side) -> torch.Tensor:
    """Orthonormal basis as rows (r, dim) -> stored projector layout for `side`."""
    return basis if side == "right" else basis.t()


def stored_layout(proj: torch.Tensor) -> torch.Tensor:
    """The one memory layout projectors are kept in: column-major (`proj.t()` contiguous).

    A matmul's rounding depends on its operands' layout, so a projector must have the same
    layout after a checkpoint load (DCP and placeholders hand back row-major tensors) as
    before it, or a resumed run is not bit-identical. Column-major is LAPACK's own layout
    (U[:, :r] and Vh[:r] of torch.linalg.svd on CPU), the one galore-torch projects with."""
    return proj if proj.t().is_contiguous() else proj.t().contiguous().t()


def proj_to_basis(proj: torch.Tensor, side: Side) -> torch.Tensor:
    """Stored projector -> basis rows (r, dim)."""
    return proj if side == "right" else proj.t()


def fix_signs(basis: torch.Tensor, prev_basis: torch.Tensor | None) -> torch.Tensor:
    """Deterministic signs for basis rows (r, dim): aligned with prev where they overlap,
    else largest-magnitude entry positive. Returns a new tensor."""
    idx = basis.abs().argmax(dim=1, keepdim=True)
    sign = torch.sign(basis.gather(1, idx)).squeeze(1)
    if prev_basis is not None and prev_basis.shape == basis.shape:
        dots = (basis * prev_basis.to(basis.dtype)).sum(dim=1)
        overlap = dots.abs() >= _ALIGN_MIN_OVERLAP
        sign = torch.where(overlap, torch.sign(dots), sign)
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return basis * sign.unsqueeze(1)


def svd_basis(mat: torch.Tensor, rank: int, side: Side = "right") -> torch.Tensor:
    """Top-`rank` singular vectors of `mat` on `side`, as rows (rank, dim), exact SVD.

    Always the SVD of `mat` itself (U for left, Vh for right), never of its transpose: that
    is galore-torch's computation, so signs="lapack" reproduces its signs. fp32 first
    (galore-torch's precision); float64 when LAPACK does not converge. Raises RuntimeError
    when neither works.
    """
    def top(m: torch.Tensor) -> torch.Tensor:
        u, _, vh = torch.linalg.svd(m, full_matrices=False)
        return vh[:rank] if side == "right" else u[:, :rank].t()

    try:
        basis = top(mat.float())
        if torch.isfinite(basis).all():
            return basis
    except RuntimeError:
        pass
    basis = top(mat.double()).float()
    if not torch.isfinite(basis).all():
        raise RuntimeError("SVD produced non-finite singular vectors")
    return basis


def random_basis(dim: int, k: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """A seeded random orthonormal basis (k, dim)."""
    x = torch.randn(dim, k, generator=generator, device="cpu").to(device)
    q, _ = torch.linalg.qr(x)
    return q.t().contiguous()


def refresh_generator(seed: int, step: int, index: int) -> torch.Generator:
    """Seeded by (seed, step, parameter index): runs and resumes draw the same vectors."""
    g = torch.Generator(device="cpu")
    g.manual_seed((seed * 1_000_003 + step * 10_007 + index) % (2**63 - 1))
    return g


# --------------------------------------------------------------------- random projection
# APOLLO projects with a Gaussian matrix, N(0, 1/r), drawn anew at every refresh. It is a pure
# function of (seeds, parameter index, refresh index), and the refresh index a pure function of
# the matrix's step count (`refresh_index`): every rank, and a run resumed on any world size,
# draws the same matrix without anything random in its state. The process RNG is never used.
PROJ_SEEDS = ("hashed", "apollo")
_APOLLO_SEEDS: dict[int, list[int]] = {}   # apollo-torch's seed chains, by first seed (a memo)


def refresh_index(step: int, offset: int, gap: int) -> int:
    """How many refreshes came before the one whose projector is current at `step`, on
    groups.refresh_due's schedule (step 0, then every `gap` steps from `offset`)."""
    first = offset if offset >= 1 else gap
    return 0 if step < first else (step - first) // gap + 1


def apollo_next_seed(seed: int) -> int:
    """apollo-torch 1.0.3's next_seed: the last of 15 integers drawn by a CPU generator seeded
    with `seed` (its seed advances so at every refresh)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randint(0, torch.iinfo(torch.int64).max, (15,), generator=gen).tolist()[-1]


def projection_seed(seeds: str, seed: int, index: int, refresh: int) -> int:
    """The generator seed of a parameter's random projector at its `refresh`-th refresh.

    hashed: a hash of (seed, index, refresh). apollo: apollo-torch's sequence, the 1-based
    parameter index over the param groups advanced by `apollo_next_seed` once per refresh (a
    chain, memoized so a long run does not replay it at every refresh)."""
    if seeds == "apollo":
        chain = _APOLLO_SEEDS.setdefault(index + 1, [index + 1])
        while len(chain) <= refresh:
            chain.append(apollo_next_seed(chain[-1]))
        return chain[refresh]
    if seeds != "hashed":
        raise ValueError(f"proj_seeds={seeds!r}: expected one of {PROJ_SEEDS}")
    digest = hashlib.blake2b(f"{seed}:{index}:{refresh}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def gaussian_basis(dim: int, rank: int, side: Side, seed: int, device: torch.device | str,
                   on_device: bool = False) -> torch.Tensor:
    """APOLLO's random projector as basis rows (rank, dim): N(0, 1) / sqrt(rank), drawn in the
    stored layout as apollo-torch draws it (Q (rank, n) right, P (m, rank) left) by a generator
    seeded with `seed`: on the CPU (the same numbers on every device), or on `device` when
    `on_device` (apollo-torch's choice: its matrices differ between a CPU and a GPU run)."""
    where = torch.device(device) if on_device else torch.device("cpu")
    gen = torch.Generator(device=where).manual_seed(seed)
    shape = (rank, dim) if side == "right" else (dim, rank)
    proj = torch.randn(shape, generator=gen, device=where) / math.sqrt(rank)
    return proj_to_basis(proj.to(device), side)


# --------------------------------------------------------------------- randomized refresh
# A randomized refresh needs only products with the Gram operator A = G^T G (right side of
# the `to_right` view). It is written as a generator ("program") that yields X (dim, k) and
# receives A X back, so that the same arithmetic runs on one process (`run_program` with the
# local operator) and on sharded gradients, where a driver answers many programs' requests
# with one collective per round (galore_ds/optim/refresh.py).
Program = Generator[torch.Tensor, torch.Tensor, torch.Tensor]


def subspace_iteration(start: torch.Tensor, rank: int, iters: int) -> Program:
    """Top-`rank` eigenvectors of A, as rows (rank, dim), from `start` rows (k, dim), k >= rank.

    `iters` rounds of X <- qr(A X), then Rayleigh-Ritz on the k x k compression (one more
    product). eigh runs in float64: the eigenvalues are squared singular values and their
    ratio can be large.
    """
    x = start.t()
    for _ in range(iters):
        x, _ = torch.linalg.qr((yield x))
    x, _ = torch.linalg.qr(x)  # iters == 0 still needs an orthonormal start
    z = yield x
    h = (x.t() @ z).double()
    h = 0.5 * (h + h.t())
    evals, evecs = torch.linalg.eigh(h)
    order = torch.argsort(evals, descending=True)[:rank]
    return (x @ evecs[:, order].to(x.dtype)).t().contiguous()


def warm_iteration(prev_basis: torch.Tensor, iters: int) -> Program:
    """Subspace iteration from the previous basis, no oversampling: X <- qr(A X).

    No Rayleigh-Ritz step: GaLore needs the subspace, not the individual singular vectors,
    and skipping the rotation keeps the new vectors close to their predecessors, so the
    moments' coordinates stay meaningful.
    """
    x = prev_basis.t().float()
    for _ in range(max(iters, 1)):
        x, _ = torch.linalg.qr((yield x))
    return x.t()


def randomized_program(
    dim: int, rank: int, prev_basis: torch.Tensor | None, *, oversample: int, iters: int,
    first_iters: int, generator: torch.Generator, device: torch.device,
) -> Program:
    """The randomized refresh of one matrix whose `to_right` view has `dim` columns.

    Cold (no previous basis): `first_iters` iterations from a seeded Gaussian start with
    max(oversample, 8) extra vectors, then Rayleigh-Ritz (one iteration from a random start
    is not accurate enough: it drifted 1e-2). Warm: `iters` iterations from the previous
    basis, plus Rayleigh-Ritz over `oversample` extra random vectors when oversample > 0.
    """
    if prev_basis is None:
        k = min(rank + max(oversample, 8), dim)
        return subspace_iteration(random_basis(dim, k, generator, device), rank, first_iters)
    if oversample <= 0:
        return warm_iteration(prev_basis.to(device), iters)
    extra = min(rank + oversample, dim) - prev_basis.shape[0]
    fill = random_basis(dim, extra, generator, device) if extra > 0 else prev_basis[:0]
    start = torch.cat([prev_basis.to(device, torch.float32), fill])
    return subspace_iteration(start, rank, iters)


def run_program(program: Program, gram: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Drive a randomized-refresh program with the operator `gram` (X -> A X)."""
    try:
        request = next(program)
        while True:
            request = program.send(gram(request))
    except StopIteration as done:
        return done.value


def local_gram(grad: torch.Tensor, side: Side) -> Callable[[torch.Tensor], torch.Tensor]:
    """X -> G^T (G X) for the `to_right` view of a whole gradient, in fp32."""
    g = to_right(grad, side).float()
    return lambda x: g.t() @ (g @ x)


def finish_basis(basis: torch.Tensor, prev_basis: torch.Tensor | None, signs: str) -> torch.Tensor:
    """Apply the sign rule to a new basis (rows)."""
    if signs == "aligned":
        return fix_signs(basis, prev_basis).contiguous()
    if signs != "lapack":
        raise ValueError(f"signs={signs!r}: expected one of {SIGN_RULES}")
    return basis


def compute_basis(
    grad: torch.Tensor,
    side: Side,
    rank: int,
    method: str,
    prev_basis: torch.Tensor | None,
    *,
    signs: str = "aligned",
    oversample: int = 0,
    iters: int = 1,
    first_iters: int = 4,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """New basis rows (rank, dim) for one matrix from its whole gradient; dim = n (right) or
    m (left). Raises RuntimeError if an exact SVD fails in both precisions."""
    if method == "svd":
        basis = svd_basis(grad, rank, side)
    elif method == "randomized":
        gen = generator if generator is not None else refresh_generator(0, 0, 0)
        dim = grad.shape[1] if side == "right" else grad.shape[0]
        program = randomized_program(dim, rank, prev_basis, oversample=oversample, iters=iters,
                                     first_iters=first_iters, generator=gen, device=grad.device)
        basis = run_program(program, local_gram(grad, side))
    else:
        raise ValueError(f"refresh={method!r}: expected one of {REFRESH_METHODS}")
    return finish_basis(basis, prev_basis, signs)


def rotation(old_basis: torch.Tensor, new_basis: torch.Tensor) -> torch.Tensor:
    """C (r, r) mapping low-rank coordinates in the old basis to the new one: c_new = c_old C."""
    return old_basis @ new_basis.t()
