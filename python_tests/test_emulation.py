"""The host emulation of the SIMT execution model (csrc/common/host_emulation.h), tested with its own
kernels (csrc/common/emulation_selftest_kernel.cuh): correct kernels must compute the right thing, and
deliberately broken ones (a missing barrier, a shuffle reading an inactive lane, an out-of-range
write, ...) must be caught by a wrong result or an error."""
import os

import pytest
import torch

from raekern._utils.library import emulation_library

emu = emulation_library()
if emu is None:
    if os.environ.get("RAEKERN_EMULATION", "1") == "0":
        pytest.skip("host emulation disabled (RAEKERN_EMULATION=0)", allow_module_level=True)
    raise ImportError("raekern._emu (the host emulation of the CUDA kernels) was not built or not found next "
                      "to raekern._C; rebuild with RAEKERN_EMULATION=1, or set RAEKERN_EMULATION=0 to skip")

SCHEDULES = ["forward", "reverse", "random"]


@pytest.fixture(autouse=True)
def _default_schedule():
    yield
    if emu is not None:
        emu.set_schedule("random", 0)


# ---------------------------------------------------------------------------------------------
# Correct kernels.

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "rows,cols,block,vec",
    [(1, 1, 32, 1), (3, 257, 64, 8), (2, 268, 256, 8), (4, 1000, 128, 1), (1, 77, 1024, 8)],
)
def test_block_reductions(dtype, rows, cols, block, vec):
    x = torch.randn(rows, cols).to(dtype)
    out = emu.selftest_row_stats(x, block, vec)
    xd = x.double()
    tol = dict(rtol=1e-5, atol=1e-5 * cols)
    torch.testing.assert_close(out[:, 0].double(), xd.sum(1), **tol)
    torch.testing.assert_close(out[:, 1].double(), xd.sum(1), **tol)
    torch.testing.assert_close(out[:, 2].double(), (xd * xd).sum(1), **tol)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_block_reductions_strided_grid_stride_and_schedules(schedule):
    emu.set_schedule(schedule, 7)
    base = torch.randn(5, 300, dtype=torch.bfloat16)
    x = base[:, 3:270]  # row stride 300, misaligned start: the scalar path
    out = emu.selftest_row_stats(x, 96, 8, max_blocks=2)  # 2 blocks loop over 5 rows
    torch.testing.assert_close(out[:, 0].double(), x.double().sum(1), rtol=1e-5, atol=1e-3)
    aligned = base[:, 8:272]  # 16-byte aligned rows: the vector path
    out = emu.selftest_row_stats(aligned, 64, 8)
    torch.testing.assert_close(out[:, 2].double(), (aligned.double() ** 2).sum(1), rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("variant", ["dynamic", "static"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_shared_memory(variant, dtype, schedule):
    emu.set_schedule(schedule, 3)
    x = torch.randn(1000).to(dtype)
    y = emu.selftest_reverse(x, 128, variant)
    ref = torch.cat([c.flip(0) for c in x.split(128)])
    assert torch.equal(y, ref)


def _warp_model(x: torch.Tensor, width: int, delta: int) -> torch.Tensor:
    n = x.numel()
    out = torch.empty(11, n, dtype=torch.int64)
    xs = x.tolist()
    for w0 in range(0, n, 32):
        v = xs[w0:w0 + 32]
        for lane in range(32):
            base = lane & ~(width - 1)
            up = lane - delta if lane - delta >= base else lane
            down = lane + delta if lane + delta < base + width else lane
            xr = lane ^ delta if (lane ^ delta) < base + width else lane
            i = w0 + lane
            out[0, i] = v[base + (((lane * 7 + 3) % 32) & (width - 1))]
            out[1, i] = v[up]
            out[2, i] = v[down]
            out[3, i] = v[xr]
            out[4, i] = sum(1 << k for k in range(32) if v[k] & 1)
            out[5, i] = int(any(a > 90 for a in v))
            out[6, i] = int(all(a >= 0 for a in v))
            out[7, i] = sum(v)
            out[8, i] = max(v)
            out[9, i] = (v[lane + 1] if lane + 1 < 16 else v[lane]) if lane < 16 else -1
            out[10, i] = sum(1 << k for k in range(32) if v[k] % 3 == v[lane] % 3)
    return out


@pytest.mark.parametrize("width,delta", [(32, 1), (32, 5), (16, 3), (8, 4), (4, 1)])
def test_warp_collectives(width, delta):
    x = torch.randint(0, 100, (128,), dtype=torch.int32)
    out = emu.selftest_warp_ops(x, 64, width, delta).to(torch.int64)
    ref = _warp_model(x, width, delta)
    ref[4] = ref[4].to(torch.int32).to(torch.int64)  # ballot's bit 31 comes back as a signed int32
    ref[10] = ref[10].to(torch.int32).to(torch.int64)
    for k in range(11):
        assert torch.equal(out[k], ref[k]), f"warp op {k}"


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_atomics(schedule):
    emu.set_schedule(schedule, 11)
    n, bins, grid, block = 3001, 17, 3, 128
    idx = torch.randint(0, bins, (n,), dtype=torch.int32)
    val = torch.rand(n)
    hist, stats, block_pos = emu.selftest_atomics(idx, val, bins, grid, block)
    torch.testing.assert_close(hist, torch.zeros(bins).index_add_(0, idx.long(), val), rtol=1e-5, atol=1e-4)
    assert stats[0] == n and stats[1] == idx.max()
    assert stats[2:3].view(torch.float32).item() == val.max().item()
    # __syncthreads_count: threads of each block that saw at least one value above 0.5.
    thread = torch.arange(n) % (grid * block)
    saw = torch.zeros(grid * block, dtype=torch.bool).index_fill_(0, thread[val > 0.5], True)
    assert block_pos.tolist() == saw.view(grid, block).sum(1).tolist()


@pytest.mark.parametrize("grid,block", [((1, 1, 1), (1, 1, 1)), ((3, 2, 1), (32, 2, 1)), ((2, 2, 3), (4, 3, 5))])
def test_indices(grid, block):
    out = emu.selftest_coords(list(grid), list(block))
    i = 0
    for bz in range(grid[2]):
        for by in range(grid[1]):
            for bx in range(grid[0]):
                for tz in range(block[2]):
                    for ty in range(block[1]):
                        for tx in range(block[0]):
                            assert out[i].tolist() == [tx, ty, tz, bx, by, bz, *block, *grid]
                            i += 1


def test_math_intrinsics():
    x = torch.rand(300) * 4 + 0.05
    out = emu.selftest_math(x)
    refs = [x.rsqrt(), (-x).exp(), 1 / x, x.log(), x.tanh(), x.clamp(min=1), (x - 1).clamp(0, 1), torch.erf(x)]
    for k, ref in enumerate(refs):
        torch.testing.assert_close(out[k], ref, rtol=2e-6, atol=1e-6, msg=f"intrinsic {k}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_conversions_round_like_torch(dtype):
    special = torch.tensor([0.0, -0.0, 1.0, 65504.0, 70000.0, 1e-8, 6e-8, 1e-40, float("inf"), float("-inf")])
    ties = torch.tensor([1.0 + 2.0**-11, 1.0 + 3 * 2.0**-11, 1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8])
    x = torch.cat([special, ties, torch.randn(200) * 100])
    y, back = emu.selftest_convert(x, dtype)
    assert torch.equal(y.view(torch.int16), x.to(dtype).view(torch.int16))
    assert torch.equal(back, x.to(dtype).float())
    y, _ = emu.selftest_convert(torch.tensor([float("nan")] * 64), dtype)
    assert y.isnan().all()


# ---------------------------------------------------------------------------------------------
# Broken kernels: the harness must catch each.

def test_missing_syncthreads_gives_wrong_result_in_every_schedule():
    x = torch.randn(1000)
    ref = torch.cat([c.flip(0) for c in x.split(128)])
    for schedule in SCHEDULES:
        emu.set_schedule(schedule, 5)
        assert not torch.equal(emu.selftest_reverse(x, 128, "missing_sync"), ref), schedule


def test_block_sum_missing_barrier_is_exposed():
    # Only warp 0's result is stored: it is right if warp 0 happens to run last (reverse order) and
    # wrong otherwise, so the forward and random schedules expose the race.
    x = torch.randn(16, 1000)
    wrong = []
    for schedule in SCHEDULES:
        emu.set_schedule(schedule, 5)
        out = emu.selftest_row_stats(x, 256, 1, broken=True)
        wrong.append(not torch.allclose(out[:, 0].double(), x.double().sum(1), rtol=1e-4, atol=1e-3))
    assert wrong[0] and wrong[2]


@pytest.mark.parametrize(
    "name,match",
    [
        ("shfl_inactive_lane", r"__shfl_down_sync with mask 0x0000ffff reads lane 16, which is not in the mask"),
        ("shfl_exited_lane", r"__shfl_xor_sync with mask 0xffffffff includes lane 16, which has exited"),
        ("shfl_mask_excludes_self", r"does not include the calling lane"),
        ("partial_warp", r"names lanes that do not exist"),
        ("divergent_barrier", r"divergent barrier"),
        ("block_too_large", r"invalid launch configuration"),
        ("misaligned_vec", r"misaligned 16-byte vector access"),
        ("oob_write_end", r"out-of-range write to buffer 'y' \(400 bytes\) at byte offset 400, past its end"),
        ("oob_write_before", r"out-of-range write to buffer 'y' \(400 bytes\) at byte offset -4, before its start"),
        ("oob_write_far", r"(invalid memory access|out-of-range access).*buffer 'y'"),
    ],
)
def test_broken_kernel_is_caught(name, match):
    with pytest.raises(RuntimeError, match=match):
        emu.selftest_broken(name, 100)
    # The emulation recovers: the next launch on this thread works.
    x = torch.randn(2, 40)
    torch.testing.assert_close(emu.selftest_row_stats(x, 64, 1)[:, 0], x.sum(1), rtol=1e-5, atol=1e-5)


def test_out_of_range_read_reads_poison():
    out = emu.selftest_broken("oob_read", 100)
    assert out[:99].eq(2).all() and out[99].isnan()


def test_dynamic_shared_memory_overflow_is_caught():
    with pytest.raises(RuntimeError, match="past the 512 bytes the launch requested"):
        emu.selftest_reverse(torch.randn(300), 128, "smem_overflow")


def test_schedule_argument_is_checked():
    emu.set_schedule("reverse", 1)
    assert emu.schedule() == "reverse"
    with pytest.raises(ValueError, match="'policy'"):
        emu.set_schedule("sideways", 0)


def test_launches_from_several_threads():
    from concurrent.futures import ThreadPoolExecutor

    xs = [torch.randn(3, 300) for _ in range(4)]
    with ThreadPoolExecutor(2) as pool:
        outs = list(pool.map(lambda x: emu.selftest_row_stats(x, 128, 4), xs))
    for x, out in zip(xs, outs):
        torch.testing.assert_close(out[:, 0], x.sum(1), rtol=1e-5, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Tensor-core instructions (common/tensor_core.cuh): mma.sync and ldmatrix as warp collectives,
# cp.async as per-thread queues that land at the retiring wait_group.

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_mma_with_ldmatrix_trans_is_a_matmul(dtype, schedule):
    emu.set_schedule(schedule, 3)
    g = torch.Generator().manual_seed(0)
    a = torch.randn(16, 16, generator=g).to(dtype)
    b = torch.randn(16, 8, generator=g).to(dtype)
    c = torch.randn(16, 8, generator=g)
    ref = a.double() @ b.double() + c.double()  # 16-bit products are exact; one fp32 rounding
    for variant in (0, 3):  # B by ldmatrix.trans from [k][n]; A by ldmatrix.x4 and B from [n][k]
        d = emu.selftest_mma(a, b, c, variant)
        torch.testing.assert_close(d.double(), ref, rtol=1e-6, atol=1e-6)
    # Distinct entries in every position: a transposed or shuffled fragment cannot pass.
    idx = torch.arange(16 * 16, dtype=torch.float32).reshape(16, 16)
    e = emu.selftest_mma(torch.eye(16).to(dtype), (idx[:, :8] / 64).to(dtype), torch.zeros(16, 8))
    torch.testing.assert_close(e, (idx[:, :8] / 64).to(dtype).float())


def test_ldmatrix_misaligned_row_and_divergent_collective_are_caught():
    a, b, c = torch.zeros(16, 16, dtype=torch.bfloat16), torch.zeros(16, 8, dtype=torch.bfloat16), torch.zeros(16, 8)
    with pytest.raises(RuntimeError, match="ldmatrix.*row address is not 16-byte aligned"):
        emu.selftest_mma(a, b, c, 1)
    with pytest.raises(RuntimeError, match="divergent warp collective.*mma.sync.*ldmatrix|divergent warp collective.*ldmatrix.*mma.sync"):
        emu.selftest_mma(a, b, c, 2)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_cp_async_lands_at_wait_and_zero_fills(schedule):
    emu.set_schedule(schedule, 5)
    x = torch.randn(64, 4)
    y = emu.selftest_cp_async(x, 50)
    torch.testing.assert_close(y[:50], x[:50])
    assert y[50:].eq(0).all()
    # wait_group 1 retires only the older group: the chunks of the even threads.
    y = emu.selftest_cp_async(x, 64, 3)
    torch.testing.assert_close(y[0::2], x[0::2])
    assert y[1::2].eq(-1).all()


def test_cp_async_misuse_is_caught():
    x = torch.randn(64, 4)
    with pytest.raises(RuntimeError, match="exited with 1 cp.async copies that no cp.async.wait_group retired"):
        emu.selftest_cp_async(x, 64, 1)
    for schedule in ("forward", "reverse"):  # no barrier after the wait: another thread's chunk is missing
        emu.set_schedule(schedule, 0)
        assert emu.selftest_cp_async(x, 64, 2).isnan().any()
