"""ckv.prune — chunk selection in Python (torch), for experiments and cross-checks.

The C loader (gpu/select.c, gpu/pipeline.c) owns the selection that serves requests.
This module mirrors its rules exactly (``select_topk`` = ckv_select_topk,
``linear_scores`` = ckv_digest_scores, ``max_key_scores`` = ckv_key_scores; tested
against the C library) and adds the variants the quality harness (tools/quality)
compares at equal bytes read:

  * mass scores: the attention mass a chunk would receive, summed over the suffix's
    queries and heads, each query's softmax normalised over the whole prefix and the
    suffix (causal) — from the exact keys (the oracle), from the mean-key digests
    (each chunk stands for its n_j keys: logit q.mu_j/sqrt(d) + log n_j), or exactly
    for rerank candidates;
  * top-p: per layer, the fewest chunks whose estimated mass reaches a share p of the
    prefix's mass (budgets adapt per layer and per request);
  * summary tokens: each chunk that is not loaded still takes part in attention as
    one token (key = its mean key, value = its mean value, logit bias log n_j), which
    needs a V digest beside the K digest.

Everything here is a *policy*: given the layer, the suffix's queries and keys, and
the prefix's tensors (a ``PrefixTensors``), it returns the chunk ids to load and the
bytes a store would read for that decision (``Choice``). ckv.hf's TensorProvider
turns a policy into attention over the chosen chunks.
"""

import math
from collections import namedtuple

import torch

__all__ = ["select_count", "select_topk", "select_top_p", "linear_scores", "max_key_scores",
           "mass_from_logits", "PrefixTensors", "Choice", "Full", "TopK", "Rerank", "TopP",
           "Recent", "make_policy", "POLICY_HELP"]


# ---- the C rules ---------------------------------------------------------------------

def select_count(m, budget):
    """ckv_select_count: ceil(budget * m) forgiving rounding, at least 2 (1 if m == 1),
    at most m."""
    x = budget * m
    k = math.ceil(x - 1e-9 * (x if x > 1 else 1))
    forced = 2 if m >= 2 else 1
    return min(max(k, forced), m)


def _topk_ids(scores, k):
    """Top k of scores [m] keeping chunks 0 and m-1; NaN ranks last, ties go to the lower
    id; ascending int64 ids on the scores' device."""
    m = scores.numel()
    s = scores.detach().double().clone()
    s[torch.isnan(s)] = -math.inf
    if m <= k:
        return torch.arange(m, device=scores.device)
    s[0] = math.inf
    s[m - 1] = math.inf
    # stable descending sort: equal scores keep ascending ids
    order = torch.sort(-s, stable=True).indices[:k]
    return torch.sort(order).values


def select_topk(scores, budget):
    """ckv_select_topk: ascending ids of the top ceil(budget * m) chunks, always 0 and m-1."""
    if not 0 < budget <= 1:
        raise ValueError("budget %r: expected a fraction in (0, 1]" % (budget,))
    return _topk_ids(scores, select_count(scores.numel(), budget))


def select_top_p(mass, p, kmin=2, kmax=None):
    """Fewest chunks, chunks 0 and m-1 first and then the highest mass, whose mass reaches
    p of the total; between kmin and kmax chunks. Ascending ids."""
    m = mass.numel()
    s = mass.detach().double().clone()
    s[torch.isnan(s)] = 0
    total = float(s.sum())
    rank = s.clone()
    rank[0] = math.inf
    rank[m - 1] = math.inf
    order = torch.sort(-rank, stable=True).indices
    cum = torch.cumsum(s[order], 0)
    k = int((cum < p * total).sum()) + 1 if total > 0 else kmin
    k = max(k, kmin, 2 if m >= 2 else 1)
    if kmax is not None:
        k = min(k, kmax)
    return _topk_ids(s, min(k, m))


def _group(q, kv_heads):
    """q [S][qh][D] -> [kv_heads][S * group][D] (query heads of a kv head together)."""
    S, qh, D = q.shape
    g = qh // kv_heads
    return q.reshape(S, kv_heads, g, D).permute(1, 0, 2, 3).reshape(kv_heads, S * g, D)


def linear_scores(dig, q):
    """ckv_digest_scores: score[j] = sum_t sum_h q[t][h] . dig[j][h/g] / sqrt(D).
    dig [m][kv_heads][D] fp32, q [S][qh][D]."""
    m, H, D = dig.shape
    qs = _group(q.float(), H).sum(1)                    # [H][D]
    return (dig.double() * qs.double()[None]).sum((1, 2)).float() / math.sqrt(D)


def max_key_scores(keys, q, chunks, c, n):
    """ckv_key_scores: for each chunk in `chunks`, sum over tokens t and heads h of the max
    over the chunk's valid slots s of q[t][h] . k_s / sqrt(D). keys [kv_heads][n][D]."""
    H, _, D = keys.shape
    m = (n + c - 1) // c
    qg = _group(q.float(), H)                           # [H][S*g][D]
    x = keys.float()
    if m * c > n:
        x = torch.cat([x, x.new_zeros(H, m * c - n, D)], 1)
    x = x.reshape(H, m, c, D)[:, chunks]                # [H][nc][c][D]
    lg = torch.einsum("hqd,hmcd->hqmc", qg, x)
    slot = torch.arange(c, device=keys.device)
    valid = slot[None, :] < (n - chunks * c).clamp(max=c)[:, None]   # [nc][c]
    lg = lg.masked_fill(~valid[None, None], -math.inf)
    return (lg.amax(-1).double().sum((0, 1)) / math.sqrt(D)).float()


def mass_from_logits(chunk_logits, suffix_logits=None):
    """Attention mass per chunk, summed over queries: chunk_logits [Q][m] (log of each
    chunk's summed exp-weight per query row, -inf for none), suffix_logits [Q][S] with
    -inf where causally masked (or None). Each row is normalised over chunks and suffix."""
    rows = chunk_logits if suffix_logits is None else torch.cat([chunk_logits, suffix_logits], 1)
    lse = torch.logsumexp(rows.float(), dim=1, keepdim=True)
    return torch.exp(chunk_logits.float() - lse).sum(0)


# ---- the prefix a policy sees --------------------------------------------------------

# Lloyd-Max quantisers of a unit Gaussian: (thresholds, levels)
_LLOYD = {
    1: ([0.0], [-0.7979, 0.7979]),
    2: ([-0.9816, 0.0, 0.9816], [-1.5104, -0.4528, 0.4528, 1.5104]),
    3: ([-1.748, -1.050, -0.5006, 0.0, 0.5006, 1.050, 1.748],
        [-2.152, -1.344, -0.7560, -0.2451, 0.2451, 0.7560, 1.344, 2.152]),
}

class PrefixTensors(object):
    """One prefix's K and V per layer ([kv_heads][n][head_dim], on the model's device)
    plus the store's geometry, with digests computed (and kept) on demand."""

    def __init__(self, ks, vs, n, chunk_tokens, chunk_bytes, half_bytes, digest_esize=4):
        self.ks, self.vs, self.n, self.c = ks, vs, n, chunk_tokens
        self.m = (n + chunk_tokens - 1) // chunk_tokens
        self.H, _, self.D = ks[0].shape
        self.chunk_bytes, self.half_bytes = chunk_bytes, half_bytes
        self.digest_esize = digest_esize      # digest.bin: fp32
        self._dig, self._vdig, self._var = {}, {}, {}
        c, m = self.c, self.m
        cnt = torch.full((m,), float(c), device=ks[0].device)
        cnt[-1] = n - (m - 1) * c
        self.counts = cnt                      # valid slots per chunk

    def _pad(self, x):
        pad = self.m * self.c - self.n
        x = x.float()
        if pad:
            x = torch.cat([x, x.new_zeros(x.shape[0], pad, x.shape[2])], 1)
        return x.reshape(x.shape[0], self.m, self.c, x.shape[2])   # [H][m][c][D]

    def digest(self, l):
        """Mean key per chunk and kv head: [m][H][D] fp32 (digest.bin)."""
        if l not in self._dig:
            s = self._pad(self.ks[l]).sum(2) / self.counts[None, :, None]
            self._dig[l] = s.permute(1, 0, 2).contiguous()
        return self._dig[l]

    def vdigest(self, l):
        """Mean value per chunk and kv head: [m][H][D] fp32."""
        if l not in self._vdig:
            s = self._pad(self.vs[l]).sum(2) / self.counts[None, :, None]
            self._vdig[l] = s.permute(1, 0, 2).contiguous()
        return self._vdig[l]

    def kvar(self, l):
        """Per-dimension variance of the keys per chunk and kv head: [m][H][D] fp32."""
        if l not in self._var:
            x = self._pad(self.ks[l])
            mu = self.digest(l).permute(1, 0, 2)[:, :, None]
            valid = (torch.arange(self.c, device=x.device)[None, :] <
                     self.counts[:, None]).float()[None, :, :, None]
            v = (((x - mu) ** 2) * valid).sum(2) / self.counts[None, :, None]
            self._var[l] = v.permute(1, 0, 2).contiguous()
        return self._var[l]

    # bytes of the store's side data, per layer
    @property
    def digest_bytes(self):
        return self.m * self.H * self.D * self.digest_esize

    def exact_chunk_logits(self, l, q, chunks=None):
        """log sum_{s in chunk} exp(q . k_s / sqrt(D)) for each query row (kv head, token,
        head of the group) and chunk: [H * S * g][len(chunks) or m]."""
        qg = _group(q.float(), self.H)                          # [H][Sg][D]
        x = self._pad(self.ks[l])                               # [H][m][c][D]
        if chunks is not None:
            x = x[:, chunks]
        lg = torch.einsum("hqd,hmcd->hqmc", qg, x) / math.sqrt(self.D)
        mc = x.shape[1]
        ids = torch.arange(self.m, device=x.device) if chunks is None else chunks
        valid = torch.arange(self.c, device=x.device)[None, :] < self.counts[ids][:, None]
        lg = lg.masked_fill(~valid[None, None], -math.inf)
        return torch.logsumexp(lg, -1).reshape(self.H * qg.shape[1], mc)

    def digest_chunk_logits(self, l, q, var=False, side_bf16=False):
        """The digest's estimate of exact_chunk_logits: q . mu_j / sqrt(D) + log n_j (+ the
        Gaussian correction 1/2 sum_d q_d^2 var_jd / D with var: the log of E[exp(q.k)]
        for keys with per-dimension variance var_jd around mu_j). side_bf16: the digests
        as a store would keep them in bf16."""
        qg = _group(q.float(), self.H)
        dig = self.digest(l)                                     # [m][H][D]
        if side_bf16:
            dig = dig.bfloat16().float()
        lg = torch.einsum("hqd,mhd->hqm", qg, dig) / math.sqrt(self.D)
        if var:
            v = self.kvar(l)
            if side_bf16:
                v = v.bfloat16().float()
            lg = lg + 0.5 * torch.einsum("hqd,mhd->hqm", qg * qg, v) / self.D
        lg = lg + torch.log(self.counts)[None, None]
        return lg.reshape(-1, self.m)

    def lowbit_keys(self, l, bits):
        """The keys as a b-bit copy would give them back: per (kv head, dimension) the
        layer's keys are centred and scaled by their mean and standard deviation over the
        prefix (2 x H x D bf16 values per layer), and each element is quantised with the
        Lloyd-Max quantiser of a unit Gaussian (1-3 bits; 4+ bits: uniform on +-3 sd).
        [H][n][D] fp32. The store's keyq.bin (docs/FORMAT.md) holds exactly this for a
        prefix stored as one segment: the same float64 sums, unbiased variance, +1e-6 and
        bf16 rounding, the same thresholds (ckv_keyq_scales / ckv_keyq_encode)."""
        key = (l, bits)
        if key not in self._var:
            k = self.ks[l].float()
            kd = k.double()
            n = k.shape[1]
            mu_d = kd.sum(1, keepdim=True) / n
            if n > 1:
                var = ((kd * kd).sum(1, keepdim=True) - n * mu_d * mu_d) / (n - 1)
                var = torch.where(var > 0, var, torch.zeros_like(var))
            else:
                var = torch.zeros_like(mu_d)
            mu = mu_d.float().bfloat16().float()
            sd = (var.sqrt() + 1e-6).float().bfloat16().float()
            z = (k - mu) / sd
            if bits in _LLOYD:
                th, lv = (torch.tensor(x, device=k.device) for x in _LLOYD[bits])
                zq = lv[torch.bucketize(z.contiguous(), th)]
            else:
                n = 2 ** bits
                step = 6.0 / n
                zq = (torch.clamp(torch.floor((z + 3.0) / step), 0, n - 1) + 0.5) * step - 3.0
            self._var[key] = mu + sd * zq
        return self._var[key]

    def lowbit_bytes(self, bits):
        """Bytes of a b-bit key copy of one layer (all m chunks' slots) plus its scales."""
        return (self.m * self.c * self.H * self.D * bits + 7) // 8 + 2 * self.H * self.D * 2

    def lowbit_chunk_logits(self, l, q, bits):
        """exact_chunk_logits over the b-bit copy of the keys."""
        saved = self.ks[l]
        self.ks[l] = self.lowbit_keys(l, bits)
        try:
            return self.exact_chunk_logits(l, q)
        finally:
            self.ks[l] = saved


def suffix_logits(q, k_suf, kv_heads):
    """Exact logits of the suffix's queries on the suffix's keys, causal (-inf above the
    diagonal): [H * S * g][S], rows as PrefixTensors.exact_chunk_logits."""
    S, qh, D = q.shape
    g = qh // kv_heads
    qg = _group(q.float(), kv_heads)                             # [H][S*g][D]
    lg = torch.einsum("hqd,hsd->hqs", qg, k_suf.float()) / math.sqrt(D)
    t = torch.arange(S, device=q.device)
    causal = t[None, :] <= t[:, None]                            # [S q][S k]
    causal = causal[:, None, :].expand(S, g, S).reshape(S * g, S)
    return lg.masked_fill(~causal[None], -math.inf).reshape(kv_heads * S * g, S)


# ---- policies --------------------------------------------------------------------------

Choice = namedtuple("Choice", "chunks bytes summary")
"""chunks: ascending ids to load whole; bytes: what a store reads for this layer (chunk
data, side data and any K halves read only to score); summary: True to let the dropped
chunks take part as one mean token each."""


class Full(object):
    name = "full"

    def choose(self, l, q, k_suf, pt):
        ids = torch.arange(pt.m, device=q.device)
        return Choice(ids, pt.m * pt.chunk_bytes, False)


def _budget(budget, l):
    return budget[l] if isinstance(budget, (list, tuple)) else budget


class TopK(object):
    """Top ceil(budget * m) by a score: "linear" (the C digest rule, fp32 digests),
    "mass" (digest mass estimate), "massvar" (with the variance term; mean and variance
    kept in bf16: the bytes of today's fp32 mean alone), "lowbitB" (exact mass over a
    B-bit copy of the keys), "oracle" (exact mass from all keys: reads every K half).
    budget may be a list (one fraction per layer). period > 1 identifies at layers
    l % period == 0 only and reuses the set (the C period mode, without its speculative
    reads)."""

    def __init__(self, budget, score="linear", period=1, summary=False, vdigest_esize=2):
        self.budget, self.score, self.period, self.summary = budget, score, period, summary
        self.vdigest_esize = vdigest_esize
        self.name = "topk-%s%s%s" % (score, "-p%d" % period if period > 1 else "",
                                     "+summary" if summary else "")
        self._cur = None

    def scores(self, l, q, k_suf, pt):
        if self.score == "linear":
            return linear_scores(pt.digest(l), q), pt.digest_bytes
        if self.score == "mass":
            cl = pt.digest_chunk_logits(l, q)
            extra = pt.digest_bytes
        elif self.score == "massvar":
            cl = pt.digest_chunk_logits(l, q, var=True, side_bf16=True)
            extra = pt.digest_bytes                      # 2 x bf16 = 1 x fp32
        elif self.score.startswith("lowbit"):
            b = int(self.score[6:])
            cl = pt.lowbit_chunk_logits(l, q, b)
            extra = pt.lowbit_bytes(b)
        elif self.score == "oracle":
            cl = pt.exact_chunk_logits(l, q)
            extra = pt.m * pt.half_bytes
        else:
            raise ValueError("score %r" % self.score)
        return mass_from_logits(cl, suffix_logits(q, k_suf, pt.H)), extra

    def choose(self, l, q, k_suf, pt):
        extra = 0
        if self._cur is None or l % self.period == 0:
            sc, extra = self.scores(l, q, k_suf, pt)
            self._cur = select_topk(sc, _budget(self.budget, l))
        ids = self._cur
        b = len(ids) * pt.chunk_bytes + extra
        if self.summary:
            b += pt.m * pt.H * pt.D * self.vdigest_esize
        return Choice(ids, b, self.summary)


class Rerank(object):
    """Digests pick ceil(r * budget * m) candidates (by "linear" or "mass"), their K
    halves are read and scored exactly ("max": the C rule; "mass": exact attention mass,
    candidates exact, the others by digest), the top ceil(budget * m) have their V halves
    read."""

    def __init__(self, budget, r=2, first="linear", exact="max", summary=False,
                 vdigest_esize=2):
        self.budget, self.r, self.first, self.exact = budget, r, first, exact
        self.summary, self.vdigest_esize = summary, vdigest_esize
        self.name = "rerank%g-%s-%s%s" % (r, first, exact, "+summary" if summary else "")

    def choose(self, l, q, k_suf, pt):
        b = _budget(self.budget, l)
        suf = None
        if self.first == "linear":
            s1 = linear_scores(pt.digest(l), q)
        else:
            dl = pt.digest_chunk_logits(l, q, var=self.first == "massvar",
                                        side_bf16=self.first == "massvar")
            suf = suffix_logits(q, k_suf, pt.H)
            s1 = mass_from_logits(dl, suf)
        cand = select_topk(s1, min(1.0, self.r * b))
        if self.exact == "max":
            s2 = max_key_scores(pt.ks[l], q, cand, pt.c, pt.n)
        else:
            dl = pt.digest_chunk_logits(l, q) if self.first == "linear" else dl
            dl = dl.clone()
            dl[:, cand] = pt.exact_chunk_logits(l, q, cand)
            suf = suffix_logits(q, k_suf, pt.H) if suf is None else suf
            s2 = mass_from_logits(dl, suf)[cand]
        full = torch.full((pt.m,), -math.inf, device=q.device)
        full[cand] = s2.float()
        ids = select_topk(full, b)
        nbytes = pt.digest_bytes + len(cand) * pt.half_bytes + len(ids) * pt.half_bytes
        if self.summary:
            nbytes += pt.m * pt.H * pt.D * self.vdigest_esize
        return Choice(ids, nbytes, self.summary)


class TopP(object):
    """Per layer, the fewest chunks whose digest-estimated mass reaches p of the prefix's
    estimated mass (min kmin_frac, max kmax_frac of the chunks)."""

    def __init__(self, p, score="mass", kmin_frac=0.0, kmax_frac=1.0, summary=False,
                 vdigest_esize=2):
        self.p, self.score, self.kmin_frac, self.kmax_frac = p, score, kmin_frac, kmax_frac
        self.summary, self.vdigest_esize = summary, vdigest_esize
        self.name = "topp%g-%s%s" % (p, score, "+summary" if summary else "")

    def choose(self, l, q, k_suf, pt):
        if self.score == "oracle":
            cl, extra = pt.exact_chunk_logits(l, q), pt.m * pt.half_bytes
        else:
            cl, extra = pt.digest_chunk_logits(l, q, var=self.score == "massvar"), pt.digest_bytes
        mass = mass_from_logits(cl, suffix_logits(q, k_suf, pt.H))
        ids = select_top_p(mass, self.p, kmin=max(2, select_count(pt.m, self.kmin_frac or 1e-9)),
                           kmax=select_count(pt.m, self.kmax_frac))
        b = len(ids) * pt.chunk_bytes + extra
        if self.summary:
            b += pt.m * pt.H * pt.D * self.vdigest_esize
        return Choice(ids, b, self.summary)


class Recent(object):
    """Chunk 0 and the most recent chunks (no identification): StreamingLLM-like."""

    def __init__(self, budget):
        self.budget = budget
        self.name = "recent"

    def choose(self, l, q, k_suf, pt):
        k = select_count(pt.m, _budget(self.budget, l))
        ids = torch.cat([torch.zeros(1, dtype=torch.long),
                         torch.arange(pt.m - k + 1, pt.m)]).to(q.device)
        return Choice(ids, k * pt.chunk_bytes, False)


class FloorRecent(object):
    """Per-layer budgets where the layers left at the floor fraction take chunk 0 and the
    most recent chunks without any identification (no digest or key-copy bytes), the
    others use `policy`."""

    def __init__(self, policy, budgets, floor):
        self.policy, self.budgets, self.floor = policy, budgets, floor
        self.recent = Recent(budgets)
        self.name = policy.name + "+floor-recent"

    def choose(self, l, q, k_suf, pt):
        if self.budgets[l] <= self.floor:
            return self.recent.choose(l, q, k_suf, pt)
        return self.policy.choose(l, q, k_suf, pt)


POLICY_HELP = """policy specs (tools/quality --policies):
  full                       every chunk
  recent                     chunk 0 + the latest chunks
  linear[/pP]                top-k by the C digest rule (layer mode; /pP: period P)
  mass, massvar, oracle      top-k by digest mass (+variance term) or exact mass
  lowbitB                    top-k by exact mass over a B-bit copy of the keys
  rerankR[/first/exact]      rerank with r=R; first linear|mass, exact max|mass
  toppP[/score]              top-p with p=P (budget column ignored: adaptive)
  any of them +summary       dropped chunks as one mean token each (needs a V digest)"""


def make_policy(spec, budget):
    """A policy from a short spec (see POLICY_HELP) at a budget."""
    summary = spec.endswith("+summary")
    s = spec[:-len("+summary")] if summary else spec
    parts = s.split("/")
    head = parts[0]
    if head == "full":
        return Full()
    if head == "recent":
        return Recent(budget)
    if head in ("linear", "mass", "massvar", "oracle") or head.startswith("lowbit"):
        period = 1
        for p in parts[1:]:
            if p.startswith("p"):
                period = int(p[1:])
        return TopK(budget, score=head, period=period, summary=summary)
    if head.startswith("rerank"):
        r = float(head[6:] or 2)
        first = parts[1] if len(parts) > 1 else "linear"
        exact = parts[2] if len(parts) > 2 else "max"
        return Rerank(budget, r=r, first=first, exact=exact, summary=summary)
    if head.startswith("topp"):
        score = parts[1] if len(parts) > 1 else "mass"
        return TopP(float(head[4:]), score=score, summary=summary)
    raise ValueError("policy %r: unknown (%s)" % (spec, POLICY_HELP))
