"""Triton flash attention (Dao et al. 2022): softmax(q k^T * scale) v (+ residual), online softmax over key
blocks with fp32 accumulators and tl.dot tiles. q, k, v, residual and out are (B, H, N, D) addressed through
their strides (last dim contiguous), so the U-Net's (B, HW, C) projections are read in place.
"""

import triton
import triton.language as tl


@triton.jit
def _attention_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    r_ptr,
    o_ptr,
    sqb,
    sqh,
    sqn,
    skb,
    skh,
    skn,
    svb,
    svh,
    svn,
    srb,
    srh,
    srn,
    sob,
    soh,
    son,
    H,
    N,
    M,
    D,
    DV,
    scale,
    HAS_RES: tl.constexpr,
    IEEE: tl.constexpr,  # fp32 inputs: exact fp32 products, not TF32
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)  # 64-bit offsets: b * sqb passes 2**31 in large batches
    h = (bh % H).to(tl.int64)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rd = tl.arange(0, BLOCK_D)
    rdv = tl.arange(0, BLOCK_DV)
    q = tl.load(
        q_ptr + b * sqb + h * sqh + rm[:, None] * sqn + rd[None, :],
        mask=(rm < N)[:, None] & (rd < D)[None, :],
        other=0.0,
    )
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    for n0 in range(0, M, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        kt = tl.load(
            k_ptr + b * skb + h * skh + rn[None, :] * skn + rd[:, None],
            mask=(rn < M)[None, :] & (rd < D)[:, None],
            other=0.0,
        )  # (BLOCK_D, BLOCK_N)
        if IEEE:
            s = tl.dot(q, kt, input_precision="ieee")
        else:
            s = tl.dot(q, kt)
        s = tl.where((rn < M)[None, :], s * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(
            v_ptr + b * svb + h * svh + rn[:, None] * svn + rdv[None, :],
            mask=(rn < M)[:, None] & (rdv < DV)[None, :],
            other=0.0,
        )
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    o = acc / l_i[:, None]
    omask = (rm < N)[:, None] & (rdv < DV)[None, :]
    if HAS_RES:
        o += tl.load(r_ptr + b * srb + h * srh + rm[:, None] * srn + rdv[None, :], mask=omask, other=0.0).to(tl.float32)
    tl.store(o_ptr + b * sob + h * soh + rm[:, None] * son + rdv[None, :], o.to(o_ptr.dtype.element_ty), mask=omask)


def tiles(D: int, DV: int, itemsize: int) -> dict:
    """Launch settings for head dims D, DV and inputs of ``itemsize`` bytes: query and key tiles, warps and pipeline
    stages chosen so each variant fits sm_80's 163 KiB of shared memory a block without register spills (the
    ahead-of-time compile check, tests/triton_aot.py, asserts both for every head dim up to 512)."""
    wide = max(triton.next_power_of_2(D), triton.next_power_of_2(DV), 16)
    half = itemsize <= 2
    if wide <= 64:
        return dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3)
    if wide <= 128:
        return dict(BLOCK_M=64, BLOCK_N=64 if half else 32, num_warps=4, num_stages=3 if half else 2)
    if wide <= 256:
        return (
            dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=3)
            if half
            else dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2)
        )
    return dict(BLOCK_M=64 if half else 32, BLOCK_N=32, num_warps=4, num_stages=1)


# CUDA's limit on a grid's second axis: launches over more (batch, head) pairs are split
_MAX_GRID_Y = 65_535


def attention(q, k, v, residual, out, scale):
    B, H, N, D = q.shape
    M, DV = k.shape[2], v.shape[3]
    BLOCK_D = max(16, triton.next_power_of_2(D))
    BLOCK_DV = max(16, triton.next_power_of_2(DV))
    cfg = tiles(D, DV, q.element_size())
    r = residual if residual is not None else out
    per_launch = max(1, _MAX_GRID_Y // H)
    for b0 in range(0, B, per_launch):
        b1 = min(B, b0 + per_launch)
        qs, ks, vs, rs, os_ = (t[b0:b1] for t in (q, k, v, r, out))
        grid = (triton.cdiv(N, cfg["BLOCK_M"]), (b1 - b0) * H)
        _attention_kernel[grid](
            qs,
            ks,
            vs,
            rs,
            os_,
            *qs.stride()[:3],
            *ks.stride()[:3],
            *vs.stride()[:3],
            *rs.stride()[:3],
            *os_.stride()[:3],
            H,
            N,
            M,
            D,
            DV,
            float(scale),
            HAS_RES=residual is not None,
            IEEE=q.dtype.itemsize == 4,
            BLOCK_D=BLOCK_D,
            BLOCK_DV=BLOCK_DV,
            **cfg,
        )
    return out
