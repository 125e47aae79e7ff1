"""UDS, utility-diversity online batch selection, from hidden states (METHODS.md section 7).

Each step scores more candidate samples than it trains on, with a no-grad forward, and
keeps the best by ``u_i + alpha * d_i``: as the authors do (``uds_grouping="micro"``, the
default), the ``batch_size`` best of each micro-batch's ``ceil(batch_size / select_ratio)``
candidates, their sketches pushed into the queue before the next micro-batch is scored;
or (``"step"``) the ``global_batch`` best of all the step's candidates, pushed once. The
first ``uds_start_step`` steps (the authors' ``start_sampling_step``) train on the data
in its plain order, as a run without selection does:

- utility ``u_i``: the nuclear norm of sample i's logits ``Z_i`` over its attention-masked
  positions (the authors use every position, padding included). Without a softcap the
  logits are never formed: ``Z Z^T = h G h^T`` with ``G = W^T W`` (kept for the run
  while the head is frozen, once per selection while it trains), so
  ``u_i = sum sqrt(eigvalsh(h_i G h_i^T))`` (on the smaller side: when the sequence is
  longer than the hidden size, the ``[H, H]`` matrix ``R^T h_i^T h_i R`` with
  ``G = R R^T``, which has the same non-zero eigenvalues). With a softcap the Gram
  ``Z Z^T`` is accumulated over vocabulary chunks (never the whole ``[S, V]``).
  The Grams (G, its root, ``h G h^T``, the chunked ``Z Z^T``) and their eigenvalues are
  fp64, with no relative floor: negative rounding is clamped to 0 and nothing else is
  dropped. Real logits are anisotropic (one singular value far above the rest); an
  fp32 Gram's eigenvalues carry an absolute error of ~``eps * lambda_max``, and a floor
  of ``n * eps * lambda_max`` removed the small singular values outright: the nuclear
  norm came out 0.8-14% low and the ranking of samples changed. In fp64 it is within
  4e-8 relative on those inputs (the fp32 result's rounding; tested to 1e-4 against
  ``matrix_norm(Z, "nuc")``). The logits of a softcap chunk are fp32, accumulated into
  the fp64 Gram. The fp64 products cost ``B S H (H + S)`` multiply-adds per scored
  micro-batch (``B S^2 V`` with a softcap), on a GPU at its fp64 rate.
- diversity ``d_i``: the mean L2 distance from sample i's sketch to the sketches in a FIFO
  queue of the recently selected samples (0 while the queue is empty).

The sketch (a fast Johnson-Lindenstrauss transform, as the authors' code computes it):
with ``Z`` zero at the masked-out positions and padded with zero rows to the fixed
length ``L``, signs ``s_V`` [V], ``s_L`` [L] and indices ``cols`` [r2], ``rows`` [r1]
drawn by :func:`draw` from the seed::

    Y = torch.fft.rfft(Z * s_V, dim=-1).real[..., cols] * sqrt(V / r2)         # [B, L, r2]
    X = torch.fft.rfft(Y * s_L[:, None], dim=-2).real[:, rows] * sqrt(L / r1)  # [B, r1, r2]
    sketch = X.flatten(1)                                                      # r1 * r2

Only the real parts of the (unnormalised) DFTs are kept, the cosine transforms, so the
sketch is ``r1 * r2`` real numbers (8 x 128 = 1024 with the defaults), not twice that;
the scale is the authors', so ``alpha = 2.5e-3`` keeps its meaning. ``cols`` are drawn
with replacement from the ``V // 2 + 1`` frequencies of the real DFT, ``rows`` from the
``L // 2 + 1``. The first stage is linear in Z: ``Z P`` with ``P [V, r2]``,
``P[v, j] = s_V[v] cos(2 pi cols_j v / V) sqrt(V / r2)``, so without a softcap it is
``h (W^T P)`` with ``W^T P`` an ``[H, r2]`` matrix (cached with ``G``); the second is
``Q [r1, L]`` on the left, of which only the first S columns meet non-zero rows.

A bias (Phi) is the head ``[W | b]`` on ``[h | 1]``; a temperature divides the logits.
"""

from __future__ import annotations

import base64
import math
import weakref
from dataclasses import dataclass

import torch

from ..errors import check


@dataclass
class Projection:
    """The random draws of a sketch: signs on V and L, the kept columns and rows."""

    sign_v: torch.Tensor  # [V] +-1
    cols: torch.Tensor  # [r2] in [0, V // 2]
    sign_l: torch.Tensor  # [L] +-1
    rows: torch.Tensor  # [r1] in [0, L // 2]


def draw(vocab: int, length: int, r1: int = 8, r2: int = 128, seed: int = 0) -> Projection:
    """The sketch's draws, in this order, from ``torch.Generator().manual_seed(seed)``."""
    g = torch.Generator().manual_seed(int(seed))
    sign_v = torch.randint(0, 2, (vocab,), generator=g).float() * 2 - 1
    cols = torch.randint(0, vocab // 2 + 1, (r2,), generator=g)
    sign_l = torch.randint(0, 2, (length,), generator=g).float() * 2 - 1
    rows = torch.randint(0, length // 2 + 1, (r1,), generator=g)
    return Projection(sign_v, cols, sign_l, rows)


def _cos_matrix(n: int, freqs: torch.Tensor, start: int = 0, stop: int | None = None):
    """cos(2 pi f t / n) for t in [start, stop) x f in freqs: [stop - start, len(freqs)]."""
    t = torch.arange(start, n if stop is None else stop, dtype=torch.int64)
    phase = (t[:, None] * freqs[None, :].to(torch.int64)) % n  # exact in integers
    return torch.cos(phase.double() * (2 * math.pi / n)).float()


def _chunk_rows(batch_rows: int, total: int, budget: int = 1 << 24) -> int:
    return max(1, min(total, budget // max(1, batch_rows)))


class _Head:
    """The head's derived matrices (G, its root, W^T P), recomputed only when the head
    changes: a frozen head (no requires_grad) when its version changes; a trained one at
    every new ``round`` (fused optimizers update in place without bumping the version)."""

    def __init__(self):
        self._key = None
        self._ref = None
        self.gram = self.root = None
        self.wtp: dict = {}
        self.round = 0  # UDSSelector: one round per selection

    def get(self, weight: torch.Tensor, bias: torch.Tensor | None):
        trained = weight.requires_grad or (bias is not None and bias.requires_grad)
        key = (weight._version, weight.device, weight.dtype, weight.shape,
               None if bias is None else (id(bias), bias._version),
               self.round if trained else None)
        if self._ref is None or self._ref() is not weight or self._key != key:
            self._ref, self._key = weakref.ref(weight), key
            self.gram = _head_gram(weight, bias)  # [H', H'] fp64
            self.root = None
            self.wtp = {}
        return self

    def sqrt(self) -> torch.Tensor:
        """R with G = R R^T, fp64 (Cholesky; U sqrt(E) from eigh when G is singular)."""
        if self.root is None:
            r, info = torch.linalg.cholesky_ex(self.gram)
            if int(info) != 0:
                e, u = torch.linalg.eigh(self.gram)
                r = u * e.clamp(min=0).sqrt()
            self.root = r
        return self.root

    def project(self, weight, bias, proj: Projection, chunk: int) -> torch.Tensor:
        """W'^T P [H', r2] for the V-side map P of ``proj`` (over vocabulary chunks)."""
        key = (id(proj), proj.cols.shape[0])
        if key not in self.wtp:
            V = weight.shape[0]
            out = None
            for v0 in range(0, V, chunk):
                v1 = min(V, v0 + chunk)
                w = _augment_head(weight[v0:v1], None if bias is None else bias[v0:v1])
                p = _v_map(proj, V, v0, v1, w.device)
                out = w.T @ p if out is None else out + w.T @ p
            self.wtp = {key: (out, proj)}  # keeps proj alive: its id stays its own
        return self.wtp[key][0]


def _head_gram(weight, bias, chunk: int = 8192) -> torch.Tensor:
    """W'^T W' [H', H'] in fp64, over vocabulary chunks (no fp64 copy of the whole head)."""
    gram = None
    for v0 in range(0, weight.shape[0], chunk):
        w = _augment_head(weight[v0:v0 + chunk],
                          None if bias is None else bias[v0:v0 + chunk]).double()
        gram = w.T @ w if gram is None else gram.addmm_(w.T, w)
    return gram


def _augment_head(weight, bias):
    w = weight.float()
    if bias is not None:
        w = torch.cat([w, bias.float()[:, None]], dim=1)
    return w


def _augment_hidden(hidden, mask, bias):
    """[h | 1] (with a bias) in fp32, zero at the masked-out positions."""
    h = hidden.float()
    if bias is not None:
        h = torch.cat([h, h.new_ones(h.shape[:-1] + (1,))], dim=-1)
    return h * mask.to(h.dtype)[..., None]


def _v_map(proj: Projection, V: int, v0: int, v1: int, device) -> torch.Tensor:
    """Rows v0:v1 of P [V, r2]: signs x cos of the kept real-DFT columns x sqrt(V / r2)."""
    r2 = proj.cols.shape[0]
    p = _cos_matrix(V, proj.cols, v0, v1) * proj.sign_v[v0:v1, None] * math.sqrt(V / r2)
    return p.to(device)


def _l_map(proj: Projection, S: int, device) -> torch.Tensor:
    """Q [r1, S]: the first S columns of the L-side map (signs, real-DFT rows, scale)."""
    L, r1 = proj.sign_l.shape[0], proj.rows.shape[0]
    q = _cos_matrix(L, proj.rows, 0, S).T * proj.sign_l[None, :S] * math.sqrt(L / r1)
    return q.to(device)


def _nuclear_from_gram(m: torch.Tensor) -> torch.Tensor:
    """sum sqrt(eigenvalues) of PSD Grams [B, n, n] (fp64), as fp32: the negative ones
    (rounding) are 0, no others are dropped."""
    return torch.linalg.eigvalsh(m.double()).clamp(min=0).sqrt().sum(-1).float()


def _features(hidden, mask, weight, *, softcap, bias, temperature, head: _Head,
              proj: Projection | None, want_u: bool = True, chunk: int | None = None):
    """(utility [B] or None, V-side sketch [B, S, r2] or None), in fp32."""
    check(hidden.dim() == 3 and mask.shape == hidden.shape[:2],
          f"hidden must be [B, S, H] and mask [B, S]; got {tuple(hidden.shape)} and "
          f"{tuple(mask.shape)}")
    B, S, _ = hidden.shape
    V = weight.shape[0]
    chunk = chunk or _chunk_rows(B * S, V)
    u = y = None
    if not softcap:
        h = _augment_hidden(hidden, mask, bias)
        head = head.get(weight, bias)
        if want_u:
            h64 = h.double()
            if S <= h.shape[-1]:
                gram = h64 @ head.gram @ h64.transpose(1, 2)  # [B, S, S]
            else:  # the hidden side: same non-zero eigenvalues
                hr = h64 @ head.sqrt()
                gram = hr.transpose(1, 2) @ hr  # [B, H', H']
            u = _nuclear_from_gram(gram) / temperature
        if proj is not None:
            y = h @ head.project(weight, bias, proj, min(chunk, 8192)) / temperature
        return u, y
    cap, m = float(softcap), mask.float()[..., None]
    gram = hidden.new_zeros((B, S, S), dtype=torch.float64) if want_u else None
    h = hidden.float()
    for v0 in range(0, V, chunk):
        v1 = min(V, v0 + chunk)
        z = h @ weight[v0:v1].float().T
        if bias is not None:
            z = z + bias[v0:v1].float()
        z = cap * torch.tanh(z / cap) / temperature * m  # [B, S, chunk]
        if want_u:
            z64 = z.double()
            gram.baddbmm_(z64, z64.transpose(1, 2))
        if proj is not None:
            p = z @ _v_map(proj, V, v0, v1, z.device)
            y = p if y is None else y + p
    return (_nuclear_from_gram(gram) if want_u else None), y


def _finish_sketch(y: torch.Tensor, proj: Projection) -> torch.Tensor:
    """The L side of the sketch on ``y`` [B, S, r2]: [B, r1 * r2]."""
    S, L = y.shape[1], proj.sign_l.shape[0]
    check(S <= L, f"the sketch's length {L} is shorter than the batch's {S} positions: "
          "give length >= the longest sequence (the trainer uses max_length)")
    return (_l_map(proj, S, y.device) @ y).flatten(1)


def utility(hidden: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor,
            softcap: float | None = None, *, bias: torch.Tensor | None = None,
            temperature: float = 1.0, _head: _Head | None = None) -> torch.Tensor:
    """The nuclear norm of each sample's logits over its masked positions, [B] fp32.

    hidden [B, S, H], mask [B, S] (1: counted), weight [V, H] (the output head's);
    the logits are ``softcap(h W^T + bias) / temperature``, formed only with a softcap
    (chunks of the vocabulary).
    """
    return _features(hidden, mask, weight, softcap=softcap, bias=bias,
                     temperature=temperature, head=_head or _Head(), proj=None)[0]


def sketch(hidden: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor, r1: int = 8,
           r2: int = 128, seed: int = 0, *, length: int | None = None,
           softcap: float | None = None, bias: torch.Tensor | None = None,
           temperature: float = 1.0, _head: _Head | None = None,
           _proj: Projection | None = None) -> torch.Tensor:
    """The FJLT sketch of each sample's logits (module docstring), [B, r1 * r2] fp32.

    ``length``: L, the fixed length the samples are padded to (default: S); sketches
    compare only under the same (V, L, r1, r2, seed).
    """
    proj = _proj or draw(weight.shape[0], length or hidden.shape[1], r1, r2, seed)
    _, y = _features(hidden, mask, weight, softcap=softcap, bias=bias, temperature=temperature,
                     head=_head or _Head(), proj=proj, want_u=False)
    return _finish_sketch(y, proj)


class UDSSelector:
    """Scores candidates by ``utility + alpha * diversity`` and keeps a FIFO queue of the
    sketches of the selected ones (``queue_size`` entries at most)."""

    def __init__(self, alpha: float = 2.5e-3, queue_size: int = 1024, r1: int = 8,
                 r2: int = 128, seed: int = 0, *, length: int | None = None):
        check(alpha >= 0 and queue_size >= 1 and r1 >= 1 and r2 >= 1,
              "UDS needs alpha >= 0, queue_size >= 1, r1 >= 1, r2 >= 1")
        self.alpha, self.queue_size, self.r1, self.r2 = float(alpha), queue_size, r1, r2
        self.seed, self.length = seed, length
        self.queue: torch.Tensor | None = None  # [queue_size, r1 * r2] ring buffer
        self.ptr = self.count = 0
        self._head = _Head()
        self._proj: Projection | None = None

    def projection(self, vocab: int, length: int) -> Projection:
        p = self._proj
        if p is None or p.sign_v.shape[0] != vocab or p.sign_l.shape[0] != length:
            self._proj = p = draw(vocab, length, self.r1, self.r2, self.seed)
        return p

    @torch.no_grad()
    def features(self, hidden, mask, weight, *, softcap=None, bias=None, temperature=1.0):
        """(utility [B], sketch [B, r1 * r2]) of a batch, fp32."""
        proj = self.projection(weight.shape[0], self.length or hidden.shape[1])
        u, y = _features(hidden, mask, weight, softcap=softcap, bias=bias,
                         temperature=temperature, head=self._head, proj=proj)
        return u, _finish_sketch(y, proj)

    @torch.no_grad()
    def diversity(self, sketches: torch.Tensor) -> torch.Tensor:
        """Mean L2 distance of each sketch to the queue's entries (0 when it is empty)."""
        if not self.count:
            return sketches.new_zeros(sketches.shape[0])
        q = self.queue[:self.count].to(sketches.device)
        return torch.cdist(sketches[None], q[None],
                           compute_mode="donot_use_mm_for_euclid_dist")[0].mean(1)

    @torch.no_grad()
    def choose(self, utilities: torch.Tensor, sketches: torch.Tensor, k: int) -> torch.Tensor:
        """The ``k`` best candidates (ascending positions; ties to the earlier one); their
        sketches enter the queue."""
        n = utilities.shape[0]
        check(1 <= k <= n, f"cannot select {k} of {n} candidates")
        score = utilities.float() + self.alpha * self.diversity(sketches.float())
        best = torch.sort(score, descending=True, stable=True).indices[:k].sort().values
        self.push(sketches[best])
        self._head.round += 1  # a trained head has changed before the next selection
        return best

    @torch.no_grad()
    def choose_each(self, utilities: torch.Tensor, sketches: torch.Tensor, size: int,
                    k: int) -> list[torch.Tensor]:
        """The authors' grouping: the candidates in consecutive groups of ``size`` (their
        micro-batches), the ``k`` best of each by :meth:`choose`, whose push comes before the
        next group is scored: group g's diversity sees the sketches groups < g selected.
        Positions into the whole candidate list, one tensor per group."""
        n = utilities.shape[0]
        check(size >= 1 and n % size == 0, f"{n} candidates do not split into groups of {size}")
        return [g + self.choose(utilities[g:g + size], sketches[g:g + size], k)
                for g in range(0, n, size)]

    @torch.no_grad()
    def select(self, hidden, mask, weight, k: int, **head) -> torch.Tensor:
        """Indices of the ``k`` best samples of a batch (``head``: softcap, bias,
        temperature of the logits)."""
        return self.choose(*self.features(hidden, mask, weight, **head), k)

    @torch.no_grad()
    def push(self, sketches: torch.Tensor) -> None:
        """Write sketches into the ring buffer, oldest overwritten first."""
        D = sketches.shape[1]
        if self.queue is None:
            self.queue = sketches.new_zeros((self.queue_size, D), dtype=torch.float32)
        check(self.queue.shape[1] == D, f"sketch size {D} != the queue's {self.queue.shape[1]}")
        for s in sketches[-self.queue_size:].float():
            self.queue[self.ptr] = s.to(self.queue.device)
            self.ptr = (self.ptr + 1) % self.queue_size
            self.count = min(self.queue_size, self.count + 1)

    def state(self) -> dict:
        """The queue as JSON-friendly values (fp32 bytes in base64), for a checkpoint."""
        if self.queue is None:
            return {"ptr": 0, "count": 0, "dim": 0, "queue": ""}
        q = self.queue[:self.count].detach().cpu().contiguous()
        return {"ptr": self.ptr, "count": self.count, "dim": q.shape[1],
                "queue": base64.b64encode(q.numpy().tobytes()).decode("ascii")}

    def load_state(self, state: dict, device=None) -> None:
        self.ptr, self.count = int(state["ptr"]), int(state["count"])
        if not self.count:
            self.queue = None
            return
        raw = bytearray(base64.b64decode(state["queue"]))
        q = torch.frombuffer(raw, dtype=torch.float32).reshape(self.count, int(state["dim"]))
        check(self.count <= self.queue_size, f"the checkpoint's UDS queue holds {self.count} "
              f"sketches, more than uds_queue={self.queue_size}: resume with its uds_queue")
        self.queue = torch.zeros((self.queue_size, q.shape[1]), device=device)
        self.queue[:self.count] = q.to(device)


def candidates(cfg, world: int) -> tuple[int, int]:
    """(groups, candidates per group) of one UDS step over ``world`` processes.

    ``uds_grouping="micro"`` (the default, the authors'): one group per micro-batch of
    every process, ``ceil(batch_size / select_ratio)`` candidates for its ``batch_size``
    rows; ``"step"``: one group of ``ceil(global_batch / select_ratio)`` for the step's
    ``global_batch``."""
    groups = 1 if cfg.uds_grouping == "step" else cfg.grad_accum * world
    k = cfg.batch_size * cfg.grad_accum * world // groups  # rows each group trains
    return groups, max(k, math.ceil(k / cfg.select_ratio - 1e-9))


def run_steps(cfg, world: int, rows: int) -> int:
    """Optimizer steps of ``epochs`` over ``rows`` rows under ``select="uds"``: the first
    ``uds_start_step`` steps read ``global_batch`` rows (plain training), the rest their
    candidates."""
    k = cfg.batch_size * cfg.grad_accum * world
    groups, size = candidates(cfg, world)
    total = cfg.epochs * rows
    plain = min(total, cfg.uds_start_step * k)
    return max(1, math.ceil(plain / k - 1e-9) + math.ceil((total - plain) / (groups * size)
                                                          - 1e-9))


def uds_rows(trainer) -> list[int]:
    """The rows of one SFT step under ``select="uds"``.

    Before step ``uds_start_step`` (the authors' ``start_sampling_step``): the next
    ``global_batch`` rows of the data stream, as plain training reads them. From then on,
    the candidates of :func:`candidates` are read from the stream, scored (no grad, eval
    mode, the model's hidden states) by every process on its share and gathered, and
    chosen with the same queue on every process: under ``uds_grouping="micro"`` group
    ``g = m * world + p`` (consecutive candidates) gives the ``batch_size`` rows of
    micro-batch m of process p, and the queue takes each group's sketches before the next
    group is scored (the model is the same for all of them: no optimizer step comes
    between); under ``"step"`` the ``global_batch`` best of all the candidates, pushed once.
    Trainer.save puts the queue in ``trainer.state["uds"]``."""
    cfg, d = trainer.cfg, trainer.dist
    check(not getattr(trainer, "fsdp", False), "select='uds' does not run under fsdp=true "
          "(the scoring forward calls the decoder directly): use DDP")
    k = trainer.global_batch
    if trainer.state["step"] < cfg.uds_start_step:
        return trainer._take(k)
    groups, size = candidates(cfg, d.world)
    n = groups * size
    idx = trainer._take(n)
    if n == k:
        return idx
    sel = getattr(trainer, "_uds", None)
    if sel is None:
        sel = trainer._uds = UDSSelector(cfg.uds_alpha, cfg.uds_queue, seed=cfg.seed,
                                         length=cfg.max_length)
        if trainer.state.get("uds"):
            sel.load_state(trainer.state["uds"], trainer.device)
    lm, model = trainer.loss_model, trainer.model
    from ..patch import output_head
    from . import data

    weight = output_head(model).weight
    head = dict(softcap=lm.softcap, bias=lm.head_bias(), temperature=lm.temperature)
    mine = list(range(d.rank, n, d.world))
    feats = None
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            for i in range(0, len(mine), cfg.batch_size):
                pos = mine[i:i + cfg.batch_size]
                b = data.collate([trainer.rows[idx[j]] for j in pos],
                                 trainer.tokenizer.pad_token_id)
                b = {key: v.to(trainer.device) for key, v in b.items()}
                with trainer._autocast():
                    hidden = lm.hidden(b)
                u, s = sel.features(hidden, b["attention_mask"], weight, **head)
                if feats is None:
                    feats = torch.zeros((n, 1 + s.shape[1]), device=trainer.device)
                feats[pos] = torch.cat([u[:, None], s], dim=1)
    finally:
        model.train(was)
    if feats is None:  # a process with no candidate (more processes than candidates)
        feats = torch.zeros((n, 1 + sel.r1 * sel.r2), device=trainer.device)
    feats = d.all_sum(feats)
    if groups == 1:
        best = sel.choose(feats[:, 0], feats[:, 1:], k).tolist()  # on the host
        return [idx[i] for i in best]
    chosen = sel.choose_each(feats[:, 0], feats[:, 1:], size, cfg.batch_size)
    out = [0] * k
    for g, best in enumerate(chosen):  # group g = m * world + p: micro-batch m of process p
        m, p = divmod(g, d.world)
        for j, i in enumerate(best.tolist()):
            out[p + d.world * (m * cfg.batch_size + j)] = idx[i]  # mine = out[rank::world]
    return out
