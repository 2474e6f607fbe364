"""A small compiled CPU kernel for mixed-adapter decode batches (punica's BGMV idea, in C).

Why: on the CPU every decode token of a mixed batch (one adapter per request, or per-token top-1)
took the whole-stack path, two dense GEMMs over *every* loaded adapter's rank columns with a
per-column mask: 8x the arithmetic top-1 routing needs with 8 adapters, and three ATen calls per
LoRA'd linear. Grouping tokens by adapter with ATen ops costs more in dispatch than it saves
(benchmarks/lora_kernels.py). This kernel does exactly the routed work in one call per linear:
for token t and each of its choices (stack entry e, rank r, weight w),

    h = w * A[e, :r] x_t                   (the adapter's r contiguous rows of the layer's stack
                                            A [S+1, r_max, in], streamed once, vectorised over in)
    y_t += B_all[s:s+r, :]^T h             (its rows of the whole-stack B_all [C, out], an axpy
                                            per rank row, vectorised over out)

so it reads only the routed adapters' factors and needs no extra buffers. The choices are
grouped by adapter and run in tiles of up to four tokens (punica's SGMV idea), so an adapter's
rows stream in once per tile rather than once per token, and multiply-adds are fused (FMA). In
a decode step the kernel is bound by reading the factors, not by arithmetic: 16 tokens over 8
rank-8 adapters on SmolLM2 read 78 MB of factors a step, 9-11 ms on one core here
(`python benchmarks/cpu_kernel_ab.py`; the same calls on operands hot in cache take ~3 ms,
`benchmarks/lora_kernels.py --rank 8 --tokens 16`). (A first
version read A's columns out of the whole-stack A_all [in, C]: a 256-byte stride per input
element, faster than the masked GEMMs on operands hot in cache and 2-3% slower than them in a
real decode step.) Float32, CPU, single thread (decode batches are small; the base linear
around it keeps its own threads).

It is plain C compiled with the system's C compiler on first use (well under a second), cached
under the user's cache directory by a hash of the source, the compiler and the CPU's flags (the
code is built for this CPU: `-march=native`), and called through ctypes with raw pointers. No
compiler, a failed build or `LORASWITCH_CPU_KERNEL=0`: `available()` is False and callers keep
the ATen path. Nothing here is downloaded; the source is this module's own string.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

log = logging.getLogger("loraswitch.kernels")

_SOURCE = r"""
#include <stdint.h>
#include <string.h>

/* 8-wide float vectors (GCC / clang vector extensions: AVX on x86, pairs of NEON registers on
   ARM, scalar code elsewhere); loads and stores go through memcpy, so no alignment is assumed */
typedef float v8 __attribute__((vector_size(32)));
static inline v8 ld8(const float *p) { v8 v; memcpy(&v, p, sizeof v); return v; }
static inline void st8(float *p, v8 v) { memcpy(p, &v, sizeof v); }
static inline float hsum8(v8 v) { return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7])); }

#define MAXP 4      /* tokens sharing one adapter computed together: its rows are read once for them */
#define MAXR 512    /* the largest rank taken (scratch space) */

/* h[p][j] = w[p] * (A[j, :] . x_p) for the P tokens of one tile, two rank rows at a time:
   each row chunk is loaded once for every token, each token's chunk once for two rows */
static inline __attribute__((always_inline)) void shrink(const float *const *xs, const float *A, int64_t in,
    int64_t r, const float *w, float h[MAXP][MAXR], const int P) {
  int64_t j = 0;
  for (; j + 2 <= r; j += 2) {
    const float *a0 = A + j * in, *a1 = a0 + in;
    v8 s0[MAXP] = {0}, s1[MAXP] = {0};
    int64_t i = 0;
    for (; i + 8 <= in; i += 8) {
      v8 u0 = ld8(a0 + i), u1 = ld8(a1 + i);
      for (int p = 0; p < P; p++) { v8 xv = ld8(xs[p] + i); s0[p] += u0 * xv; s1[p] += u1 * xv; }
    }
    for (int p = 0; p < P; p++) {
      float t0 = hsum8(s0[p]), t1 = hsum8(s1[p]);
      for (int64_t k = i; k < in; k++) { t0 += a0[k] * xs[p][k]; t1 += a1[k] * xs[p][k]; }
      h[p][j] = w[p] * t0; h[p][j + 1] = w[p] * t1;
    }
  }
  for (; j < r; j++) {
    const float *a0 = A + j * in;
    for (int p = 0; p < P; p++) {
      v8 s = {0};
      int64_t i = 0;
      for (; i + 8 <= in; i += 8) s += ld8(a0 + i) * ld8(xs[p] + i);
      float t = hsum8(s);
      for (; i < in; i++) t += a0[i] * xs[p][i];
      h[p][j] = w[p] * t;
    }
  }
}

/* y_p[o] += sum_j h[p][j] * B[j, o] for the P tokens of one tile: each B chunk loaded once */
static inline __attribute__((always_inline)) void expand(float *const *ys, const float *B, int64_t out,
    int64_t r, float h[MAXP][MAXR], const int P) {
  int64_t o = 0;
  for (; o + 8 <= out; o += 8) {
    v8 acc[MAXP];
    for (int p = 0; p < P; p++) acc[p] = ld8(ys[p] + o);
    for (int64_t j = 0; j < r; j++) {
      v8 b = ld8(B + j * out + o);
      for (int p = 0; p < P; p++) acc[p] += h[p][j] * b;
    }
    for (int p = 0; p < P; p++) st8(ys[p] + o, acc[p]);
  }
  for (; o < out; o++)
    for (int p = 0; p < P; p++) {
      float t = ys[p][o];
      for (int64_t j = 0; j < r; j++) t += h[p][j] * B[j * out + o];
      ys[p][o] = t;
    }
}

/* one tile; P is a constant in each case, so the loops over tokens unroll into registers */
static void tile(const float *const *xs, float *const *ys, const float *w, const float *A, const float *B,
                 int64_t in, int64_t out, int64_t r, int P) {
  float h[MAXP][MAXR];
  switch (P) {
    case 1: shrink(xs, A, in, r, w, h, 1); expand(ys, B, out, r, h, 1); break;
    case 2: shrink(xs, A, in, r, w, h, 2); expand(ys, B, out, r, h, 2); break;
    case 3: shrink(xs, A, in, r, w, h, 3); expand(ys, B, out, r, h, 3); break;
    default: shrink(xs, A, in, r, w, h, 4); expand(ys, B, out, r, h, 4); break;
  }
}

/* y[t, :] += sum_k w[t,k] * B_all[s:s+r, :]^T (A[e, :r, :] x[t, :]), e = entry[t,k] (stack
   index), s = start[t,k] (its first row in B_all), r = rank[t,k]; choices with r <= 0 or w == 0
   are skipped. The choices are grouped by adapter (punica's SGMV idea) and run in tiles of up
   to MAXP tokens, so an adapter's factors stream in once per tile, not once per token. Returns
   0, or -1 (nothing written) when a rank exceeds the scratch space or the stack's padded rank,
   or there are more choices than it sorts: the caller takes another path. */
int lora_bgmv_f32(float *y, const float *x, const float *A, const float *B,
                  const int64_t *entry, const int64_t *start, const int64_t *rank, const float *w,
                  int64_t T, int64_t K, int64_t in, int64_t out, int64_t r_max) {
  int64_t order[1024], n = 0;
  if (T * K > 1024) return -1;
  for (int64_t c = 0; c < T * K; c++) {  /* checked before anything is written */
    if (rank[c] > MAXR || rank[c] > r_max) return -1;
    if (rank[c] > 0 && w[c] != 0.0f) order[n++] = c;
  }
  for (int64_t a = 1; a < n; a++) {  /* stable insertion sort by stack entry (n is small) */
    int64_t c = order[a], b = a - 1;
    while (b >= 0 && entry[order[b]] > entry[c]) { order[b + 1] = order[b]; b--; }
    order[b + 1] = c;
  }
  for (int64_t a = 0; a < n;) {
    int64_t e = entry[order[a]], s = start[order[a]], r = rank[order[a]];
    const float *xs[MAXP]; float *ys[MAXP]; float ws[MAXP]; int P = 0;
    while (a < n && entry[order[a]] == e && P < MAXP) {
      int64_t c = order[a];
      float *yt = y + (c / K) * out;
      int dup = 0;  /* a token choosing one adapter twice: its second choice goes in the next tile */
      for (int p = 0; p < P; p++) dup |= ys[p] == yt;
      if (dup) break;
      xs[P] = x + (c / K) * in; ys[P] = yt; ws[P] = w[c]; P++; a++;
    }
    tile(xs, ys, ws, A + e * r_max * in, B + s * out, in, out, r, P);
  }
  return 0;
}
"""

# fp-contract: multiply-adds fuse into FMA instructions (ISO C mode keeps them apart otherwise)
_FLAGS = ["-O3", "-march=native", "-ffp-contract=fast", "-fPIC", "-shared", "-std=c99"]
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_failed: str | None = None


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cache_dir() -> Path:
    root = os.environ.get("LORASWITCH_KERNEL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "loraswitch", "kernels")
    return Path(root)


def _build() -> ctypes.CDLL:
    """Compile (or reuse) the shared library for this source, compiler and CPU."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("no C compiler (cc / gcc) on PATH")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256("\0".join([_SOURCE, " ".join(_FLAGS), version, _cpu_flags()]).encode()).hexdigest()[:16]
    target = _cache_dir() / f"bgmv-{key}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:  # built aside, then renamed: atomic
            src, so = Path(tmp) / "bgmv.c", Path(tmp) / "bgmv.so"
            src.write_text(_SOURCE)
            done = subprocess.run([cc, *_FLAGS, str(src), "-o", str(so)], capture_output=True, text=True, timeout=120)
            if done.returncode != 0:
                raise RuntimeError(f"{cc} failed: {done.stderr.strip()[:500]}")
            os.replace(so, target)
    lib = ctypes.CDLL(str(target))
    fn = lib.lora_bgmv_f32
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p] * 8 + [ctypes.c_int64] * 5
    return lib


def available() -> bool:
    """Whether the kernel can run here (built on the first call; False, with the reason logged
    once, when there is no compiler, the build fails or LORASWITCH_CPU_KERNEL=0)."""
    global _lib, _failed
    if _lib is not None:
        return True
    if _failed is not None:
        return False
    if os.environ.get("LORASWITCH_CPU_KERNEL", "1") == "0":
        _failed = "disabled by LORASWITCH_CPU_KERNEL=0"
        return False
    with _lock:
        if _lib is None and _failed is None:
            try:
                _lib = _build()
            except Exception as exc:  # no compiler, a sandbox without exec, a read-only cache...
                _failed = str(exc)
                log.warning("the compiled CPU LoRA kernel is unavailable (%s); using the ATen path", exc)
    return _lib is not None


def failure() -> str | None:
    """Why `available()` is False, if it is."""
    return _failed


def supports(y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B_all: torch.Tensor) -> bool:
    """The operand layouts the kernel reads: float32 on the CPU, contiguous."""
    return (x.device.type == "cpu" and x.dtype == y.dtype == A.dtype == B_all.dtype == torch.float32
            and x.is_contiguous() and y.is_contiguous() and A.is_contiguous() and B_all.is_contiguous())


def bgmv_(y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B_all: torch.Tensor, entry: torch.Tensor,
          start: torch.Tensor, rank: torch.Tensor, weight: torch.Tensor) -> bool:
    """In place: y[t] += sum_k weight[t,k] * B_all[s:s+r]^T A[e, :r] x[t] with e = entry[t,k] (the
    stack index: A is the layer's [S+1, r_max, in] stack), s = start[t,k] (that entry's first
    column of the whole-stack B_all [C, out]) and r = rank[t,k] ([T, k] int64 / float32,
    contiguous). False (y untouched) when the kernel cannot take it; the caller then takes the
    ATen path."""
    if _lib is None and not available():
        return False
    T, K = start.shape
    code = _lib.lora_bgmv_f32(y.data_ptr(), x.data_ptr(), A.data_ptr(), B_all.data_ptr(), entry.data_ptr(),
                              start.data_ptr(), rank.data_ptr(), weight.data_ptr(), T, K, x.shape[1], y.shape[1],
                              A.shape[1])
    return code == 0
