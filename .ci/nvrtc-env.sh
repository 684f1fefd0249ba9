# Sourced by .ci/run: makes NVRTC 13.0 (and the CUDA headers) available without a GPU, so that
# `cargo test --features cuda` compiles every kernel variant (tests/kernels_compile.rs).
# Idempotent: pip only runs when the pinned wheels are missing. Pinned to the 13.0 line so that
# the PTX/CUBIN matches the 13.0 driver on the GPU machines (see ../shared/GPU.md).

_fa_py="$(command -v python3 || command -v python || true)"
if [ -n "$_fa_py" ]; then
    _fa_cu13="$("$_fa_py" - <<'PY' 2>/dev/null
import os
try:
    import nvidia
    for p in nvidia.__path__:
        d = os.path.join(p, "cu13")
        if os.path.isfile(os.path.join(d, "lib", "libnvrtc.so.13")) and \
           os.path.isfile(os.path.join(d, "include", "cuda_fp16.h")):
            print(d)
            break
except Exception:
    pass
PY
)" || true
    _fa_ver="$("$_fa_py" -m pip show nvidia-cuda-nvrtc 2>/dev/null | sed -n 's/^Version: //p' || true)"
    if [ -z "$_fa_cu13" ] || [ "$_fa_ver" != "13.0.88" ]; then
        "$_fa_py" -m pip install -q --disable-pip-version-check \
            "nvidia-cuda-nvrtc==13.0.88" "nvidia-cuda-nvcc==13.0.88" "nvidia-nvvm==13.0.88" \
            "nvidia-cuda-crt==13.0.*" "nvidia-cuda-runtime==13.0.*" >&2 || \
            echo "nvrtc-env: pip install of the NVRTC 13.0 wheels failed" >&2
        _fa_cu13="$("$_fa_py" -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13"))' 2>/dev/null || true)"
    fi
    # nvdisasm (its own wheel, into the same bin/): the SASS-order test of the Hopper forward
    # (tests/gpu_fa3.rs, fa3_softmax_overlaps_pv_in_sass) reads the kernels' instructions.
    if [ -n "$_fa_cu13" ] && [ ! -x "$_fa_cu13/bin/nvdisasm" ]; then
        "$_fa_py" -m pip install -q --disable-pip-version-check "nvidia-cuda-nvdisasm>=13.0,<14" >&2 || \
            echo "nvrtc-env: pip install of nvdisasm failed (the SASS-order test will skip)" >&2
    fi
    if [ -n "$_fa_cu13" ] && [ -d "$_fa_cu13/lib" ]; then
        export FLASHATTN_NVRTC_DIR="$_fa_cu13/lib"
        export FLASHATTN_CUDA_INCLUDE="$_fa_cu13/include"
        # nvdisasm for the SASS-order test; ptxas/nvcc for anyone inspecting kernels by hand
        # (flashattn itself needs none of them).
        case ":$PATH:" in *":$_fa_cu13/bin:"*) ;; *) export PATH="$PATH:$_fa_cu13/bin" ;; esac
    fi
else
    echo "nvrtc-env: no python3; the NVRTC wheels cannot be installed" >&2
fi
export FLASHATTN_REQUIRE_NVRTC=1
unset _fa_py _fa_cu13 _fa_ver
