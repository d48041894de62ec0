"""cuBLASLt GEMMs with GELU epilogues, called through ctypes.

PyTorch exposes cuBLASLt's bias + GELU epilogue only without its auxiliary output
(``torch._addmm_activation``), which training cannot use: backward needs the GELU input. Two
epilogues close the gap between the MLP's GEMMs and its activation:

- ``GELU_AUX_BIAS`` (forward): ``z = x @ w.T + b`` and ``h = gelu(z)`` from the one GEMM, z
  written as the auxiliary output. No separate activation kernel reads z back.
- ``DGELU_BGRAD`` (backward): ``dz = (dy @ w) * gelu'(z)`` and the bias gradient
  ``dz.sum(0)``, also from one GEMM. No kernel reads dh back.

cuBLASLt's GELU is the tanh approximation (GPT-2's ``gelu_new``), so these serve
``model.mlp: gelu_tanh`` only. The library is the one PyTorch itself loaded (found in
``/proc/self/maps``), so no second copy or version enters the process. Everything here is
host-side bookkeeping: descriptors and the heuristic's choice of algorithm are cached per
shape, and a call sets two pointers and enqueues one GEMM on the current stream (capturable
into CUDA graphs: the workspace is allocated before, per device and stream).

Row-major ``D[M, N] = X[M, K] @ W[N, K].T`` is column-major ``D.T = op(W.T) @ X.T``: cuBLASLt
sees m = N (features), n = M (tokens), so its per-row bias is the per-feature bias and its
bias gradient reduces over tokens.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import threading

import torch

# cublasLt.h / library_types.h values
_CUDA_DTYPE = {torch.float32: 0, torch.float16: 2, torch.bfloat16: 14}
_COMPUTE_32F = 68
_OP_N, _OP_T = 0, 1
_DESC_TRANSA, _DESC_TRANSB, _DESC_EPILOGUE, _DESC_BIAS_POINTER = 3, 4, 7, 8
_DESC_AUX_POINTER, _DESC_AUX_LD, _DESC_BIAS_DATA_TYPE = 11, 12, 26
_PREF_MAX_WORKSPACE = 1
_PREF_MIN_ALIGN = {"a": 5, "b": 6, "c": 7, "d": 8}
EPILOGUE_GELU_AUX_BIAS = 164
EPILOGUE_DGELU_BGRAD = 208
_WORKSPACE_BYTES = 32 << 20  # what PyTorch gives cuBLASLt on Hopper


class CublasLtError(RuntimeError):
    pass


class _HeuristicResult(ctypes.Structure):
    _fields_ = [("algo", ctypes.c_uint64 * 8), ("workspace_size", ctypes.c_size_t),
                ("state", ctypes.c_int), ("waves", ctypes.c_float),
                ("reserved", ctypes.c_int * 4)]


def _find_library() -> str | None:
    """Path of the libcublasLt this process already mapped (PyTorch's CUDA build links it)."""
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.rsplit(None, 1)[-1]
                if "/libcublasLt.so" in path:
                    return path
    except OSError:
        pass
    return None


@functools.lru_cache(maxsize=1)
def _lib():
    """The loaded libcublasLt with argument types set, or None (CPU build, no CUDA)."""
    if not torch.cuda.is_available():
        return None
    torch.cuda.init()
    path = _find_library()
    names = [path] if path else ["libcublasLt.so.13", "libcublasLt.so.12"]
    lib = None
    for name in names:
        try:
            lib = ctypes.CDLL(name)
            break
        except OSError:
            continue
    if lib is None:
        return None
    p, vp, sz = ctypes.POINTER, ctypes.c_void_p, ctypes.c_size_t
    sigs = {
        "cublasLtCreate": [p(vp)],
        "cublasLtMatmulDescCreate": [p(vp), ctypes.c_int, ctypes.c_int],
        "cublasLtMatmulDescSetAttribute": [vp, ctypes.c_int, vp, sz],
        "cublasLtMatrixLayoutCreate": [p(vp), ctypes.c_int, ctypes.c_uint64, ctypes.c_uint64,
                                       ctypes.c_int64],
        "cublasLtMatmulPreferenceCreate": [p(vp)],
        "cublasLtMatmulPreferenceSetAttribute": [vp, ctypes.c_int, vp, sz],
        "cublasLtMatmulAlgoGetHeuristic": [vp, vp, vp, vp, vp, vp, vp, ctypes.c_int,
                                           p(_HeuristicResult), p(ctypes.c_int)],
        "cublasLtMatmul": [vp, vp, vp, vp, vp, vp, vp, vp, vp, vp, vp, vp, vp, vp, sz, vp],
    }
    for name, args in sigs.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, ctypes.c_int
    return lib


def available() -> bool:
    """True where cuBLASLt can be called (a CUDA build of PyTorch with a GPU)."""
    return _lib() is not None


def _check(status: int, what: str) -> None:
    if status != 0:
        raise CublasLtError(f"{what} failed with cublasStatus_t {status}")


_lock = threading.RLock()  # _Plan() takes the handle while _plan() holds it
_handle: ctypes.c_void_p | None = None
_workspaces: dict[tuple[int, int], torch.Tensor] = {}


def _get_handle() -> ctypes.c_void_p:
    global _handle
    with _lock:
        if _handle is None:
            h = ctypes.c_void_p()
            _check(_lib().cublasLtCreate(ctypes.byref(h)), "cublasLtCreate")
            _handle = h
    return _handle


def _workspace(device: torch.device, stream: int) -> torch.Tensor:
    key = (device.index, stream)
    ws = _workspaces.get(key)
    if ws is None:
        ws = _workspaces[key] = torch.empty(_WORKSPACE_BYTES, dtype=torch.uint8, device=device)
    return ws


def _alignment(ptr: int) -> int:
    """Largest power of two up to 256 that divides ptr (cuBLASLt's heuristic assumes 256
    unless told otherwise)."""
    a = 256
    while a > 2 and ptr % a:
        a //= 2
    return a


def _set(fn, obj, attr: int, value) -> None:
    _check(fn(obj, attr, ctypes.byref(value), ctypes.sizeof(value)), f"set attribute {attr}")


class _Plan:
    """One GEMM shape with one epilogue: descriptors and the heuristic's algorithm."""

    def __init__(self, epilogue: int, transa: int, transb: int, m: int, n: int, k: int,
                 lda: int, ldb: int, ldd: int, dtype: torch.dtype, bias_dtype: torch.dtype,
                 align: tuple[int, int, int]):
        lib = _lib()
        self.lib = lib
        dt = _CUDA_DTYPE[dtype]
        self.desc = ctypes.c_void_p()
        _check(lib.cublasLtMatmulDescCreate(ctypes.byref(self.desc), _COMPUTE_32F,
                                            _CUDA_DTYPE[torch.float32]), "MatmulDescCreate")
        setd = lib.cublasLtMatmulDescSetAttribute
        _set(setd, self.desc, _DESC_TRANSA, ctypes.c_int32(transa))
        _set(setd, self.desc, _DESC_TRANSB, ctypes.c_int32(transb))
        _set(setd, self.desc, _DESC_EPILOGUE, ctypes.c_uint32(epilogue))
        if bias_dtype != dtype:  # the default is D's type; the aux output keeps D's type
            _set(setd, self.desc, _DESC_BIAS_DATA_TYPE, ctypes.c_int32(_CUDA_DTYPE[bias_dtype]))
        _set(setd, self.desc, _DESC_AUX_LD, ctypes.c_int64(ldd))

        def layout(rows, cols, ld):
            lay = ctypes.c_void_p()
            _check(lib.cublasLtMatrixLayoutCreate(ctypes.byref(lay), dt, rows, cols, ld),
                   "MatrixLayoutCreate")
            return lay

        self.a = layout(k, m, lda) if transa == _OP_T else layout(m, k, lda)
        self.b = layout(k, n, ldb) if transb == _OP_N else layout(n, k, ldb)
        self.d = layout(m, n, ldd)
        pref = ctypes.c_void_p()
        _check(lib.cublasLtMatmulPreferenceCreate(ctypes.byref(pref)), "PreferenceCreate")
        sets = lib.cublasLtMatmulPreferenceSetAttribute
        _set(sets, pref, _PREF_MAX_WORKSPACE, ctypes.c_uint64(_WORKSPACE_BYTES))
        for key, a in zip("abd", align, strict=True):
            _set(sets, pref, _PREF_MIN_ALIGN[key], ctypes.c_uint32(a))
        _set(sets, pref, _PREF_MIN_ALIGN["c"], ctypes.c_uint32(align[2]))
        self.result = _HeuristicResult()
        count = ctypes.c_int(0)
        status = lib.cublasLtMatmulAlgoGetHeuristic(
            _get_handle(), self.desc, self.a, self.b, self.d, self.d, pref, 1,
            ctypes.byref(self.result), ctypes.byref(count))
        if status != 0 or count.value < 1 or self.result.state != 0:
            raise CublasLtError(
                f"cuBLASLt has no algorithm for epilogue {epilogue} at m={m} n={n} k={k} "
                f"({dtype}, bias {bias_dtype}; status {status}, {count.value} found)")
        self.alpha, self.beta = ctypes.c_float(1.0), ctypes.c_float(0.0)

    def run(self, a: torch.Tensor, b: torch.Tensor, d: torch.Tensor, bias: torch.Tensor,
            aux: torch.Tensor) -> None:
        lib, setd = self.lib, self.lib.cublasLtMatmulDescSetAttribute
        _set(setd, self.desc, _DESC_BIAS_POINTER, ctypes.c_void_p(bias.data_ptr()))
        _set(setd, self.desc, _DESC_AUX_POINTER, ctypes.c_void_p(aux.data_ptr()))
        stream = torch.cuda.current_stream().cuda_stream
        ws = _workspace(d.device, stream)
        _check(lib.cublasLtMatmul(
            _get_handle(), self.desc, ctypes.byref(self.alpha), a.data_ptr(), self.a,
            b.data_ptr(), self.b, ctypes.byref(self.beta), d.data_ptr(), self.d, d.data_ptr(),
            self.d, ctypes.byref(self.result.algo), ws.data_ptr(), _WORKSPACE_BYTES, stream),
            "cublasLtMatmul")


_plans: dict[tuple, _Plan] = {}


def _plan(*key) -> _Plan:
    plan = _plans.get(key)
    if plan is None:
        with _lock:
            plan = _plans.get(key) or _Plan(*key)
            _plans[key] = plan
    return plan


def _aligned(*ts: torch.Tensor) -> tuple[int, ...]:
    return tuple(_alignment(t.data_ptr()) for t in ts)


def _on(device: torch.device):
    """The device's context, entered only where it is not already current (host time: a
    training step makes these calls in every layer)."""
    if device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(device)


def _check_inputs(name: str, *ts: torch.Tensor) -> None:
    for t in ts:
        if not (t.is_cuda and t.is_contiguous() and t.dtype == ts[0].dtype):
            raise ValueError(f"{name}: CUDA tensors of one dtype, contiguous, expected; got "
                             + ", ".join(f"{tuple(u.shape)} {u.dtype} {u.device}" for u in ts))
        if t.data_ptr() % 16:
            raise ValueError(f"{name}: tensor of shape {tuple(t.shape)} is not 16-byte aligned")


def linear_gelu_aux(x: torch.Tensor, w: torch.Tensor,
                    b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``z = x @ w.T + b; h = gelu_tanh(z)`` in one GEMM: returns (h, z).

    x (M, K), w (N, K), b (N,), all CUDA, one dtype (bf16/fp16), contiguous."""
    _check_inputs("linear_gelu_aux", x, w, b)
    (M, K), N = x.shape, w.shape[0]
    h = torch.empty((M, N), dtype=x.dtype, device=x.device)
    z = torch.empty_like(h)
    with _on(x.device):
        _plan(EPILOGUE_GELU_AUX_BIAS, _OP_T, _OP_N, N, M, K, K, K, N, x.dtype, b.dtype,
              _aligned(w, x, h)).run(w, x, h, b, z)
    return h, z


def matmul_dgelu_bgrad(dy: torch.Tensor, w: torch.Tensor,
                       z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``dz = (dy @ w) * gelu_tanh'(z)`` and ``db = dz.sum(0)`` in one GEMM: returns (dz, db).

    dy (M, K), w (K, N) (the next layer's weight), z (M, N), one dtype, contiguous."""
    _check_inputs("matmul_dgelu_bgrad", dy, w, z)
    (M, K), N = dy.shape, w.shape[1]
    dz = torch.empty((M, N), dtype=dy.dtype, device=dy.device)
    db = torch.empty(N, dtype=dy.dtype, device=dy.device)
    with _on(dy.device):
        _plan(EPILOGUE_DGELU_BGRAD, _OP_N, _OP_N, N, M, K, N, K, N, dy.dtype, db.dtype,
              _aligned(w, dy, dz)).run(w, dy, dz, db, z)
    return dz, db
