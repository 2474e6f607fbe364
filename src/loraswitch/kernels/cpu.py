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

so it reads only the routed adapters' factors and needs no extra buffers. (A first version read
A's columns out of the whole-stack A_all [in, C]: a 256-byte stride per input element, faster
than the masked GEMMs on operands hot in cache and 2-3% slower than them in a real decode step,
where the factors come from memory.) Float32, CPU, single thread (decode batches are small; the base linear
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

/* h[j] = sum_i A[j*in + i] * x[i] for j < r: each rank row of one adapter is contiguous in the
   layer's stack (A [S+1, r_max, in]), so a token streams its adapter's r rows once, vectorised
   over i with four 8-wide partial sums per row. */
static void dot_rows(const float *x, const float *A, int64_t in, int64_t r, float *h) {
  for (int64_t j = 0; j < r; j++) {
    const float *a = A + j * in;
    float p0[8] = {0}, p1[8] = {0}, p2[8] = {0}, p3[8] = {0};
    int64_t i = 0;
    for (; i + 32 <= in; i += 32)
      for (int l = 0; l < 8; l++) {
        p0[l] += a[i + l] * x[i + l];
        p1[l] += a[i + 8 + l] * x[i + 8 + l];
        p2[l] += a[i + 16 + l] * x[i + 16 + l];
        p3[l] += a[i + 24 + l] * x[i + 24 + l];
      }
    float acc = 0.0f;
    for (; i < in; i++) acc += a[i] * x[i];
    for (int l = 0; l < 8; l++) acc += (p0[l] + p1[l]) + (p2[l] + p3[l]);
    h[j] = acc;
  }
}

/* y[o] += sum_j h[j] * B[j*out + o] (B: the adapter's rows of the whole-stack B_all [C, out]),
   vectorised over o; the ranks the demo and most adapters use get a fixed inner loop. */
#define AXPY_ROWS(R)                                                                   \
  static void axpy_rows_##R(const float *h, const float *B, int64_t out, float *y) {   \
    for (int64_t o = 0; o < out; o++) {                                                \
      float acc = y[o];                                                                \
      for (int j = 0; j < R; j++) acc += h[j] * B[j * out + o];                        \
      y[o] = acc;                                                                      \
    }                                                                                  \
  }
AXPY_ROWS(4)
AXPY_ROWS(8)
AXPY_ROWS(16)
AXPY_ROWS(32)

static void axpy_rows_any(const float *h, const float *B, int64_t out, int64_t r, float *y) {
  for (int64_t j = 0; j < r; j++) {
    const float *row = B + j * out; float hj = h[j];
    for (int64_t o = 0; o < out; o++) y[o] += hj * row[o];
  }
}

/* y[t, :] += sum_k w[t,k] * B_all[s:s+r, :]^T (A[e, :r, :] x[t, :]), e = entry[t,k] (stack
   index), s = start[t,k] (its first column in B_all), r = rank[t,k]; choices with r <= 0 or
   w == 0 are skipped. Returns 0, or -1 (nothing written) when a rank exceeds the scratch space
   or the stack's padded rank: the caller takes another path. */
int lora_bgmv_f32(float *y, const float *x, const float *A, const float *B,
                  const int64_t *entry, const int64_t *start, const int64_t *rank, const float *w,
                  int64_t T, int64_t K, int64_t in, int64_t out, int64_t r_max) {
  float h[512];
  for (int64_t c = 0; c < T * K; c++)  /* checked before anything is written */
    if (rank[c] > 512 || rank[c] > r_max) return -1;
  for (int64_t t = 0; t < T; t++) {
    const float *xt = x + t * in;
    float *yt = y + t * out;
    for (int64_t k = 0; k < K; k++) {
      int64_t r = rank[t * K + k];
      float wt = w[t * K + k];
      if (r <= 0 || wt == 0.0f) continue;
      dot_rows(xt, A + entry[t * K + k] * r_max * in, in, r, h);
      for (int64_t j = 0; j < r; j++) h[j] *= wt;
      const float *Bs = B + start[t * K + k] * out;
      switch (r) {
        case 4: axpy_rows_4(h, Bs, out, yt); break;
        case 8: axpy_rows_8(h, Bs, out, yt); break;
        case 16: axpy_rows_16(h, Bs, out, yt); break;
        case 32: axpy_rows_32(h, Bs, out, yt); break;
        default: axpy_rows_any(h, Bs, out, r, yt);
      }
    }
  }
  return 0;
}
"""

_FLAGS = ["-O3", "-march=native", "-fPIC", "-shared", "-std=c99"]
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
