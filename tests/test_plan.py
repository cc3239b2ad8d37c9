"""The CUDA kernel's work plan (csrc/plan.h), checked on the CPU.

plan.h is plain integer arithmetic compiled for host and device; the test-only op
torch.ops.torchhealth._work_plan runs it on the host and returns what the main
pass would read and what the finishing pass would merge. These tests check it
against an independent model written here in Python: every element of every
tensor read exactly once, blocks balanced to within one 16-byte unit, partial
slots written once and merged once in block order.
"""
import pytest
import torch

import torchhealth  # noqa: F401  (loads the extension, which registers the op)

UNIT = 16  # plan.h kUnitBytes
MIN_UNITS = 256  # plan.h kMinUnitsPerBlock
MAX_UNITS = 1 << 27  # plan.h kMaxUnitsPerBlock
TENSORS_PER_BLOCK = 8  # plan.h kTensorsPerBlock
HEAD, TAIL, WHOLE = 0, 1, 2
BLOCK, TENSOR, BEGIN, END, KIND, SLOT = range(6)


def plan(numels, itemsizes, max_blocks):
    return torch.ops.torchhealth._work_plan(list(numels), list(itemsizes), max_blocks)


def expected_blocks(total_units, num_tensors, max_blocks):
    if total_units == 0:
        return 0
    g = max(-(-total_units // MIN_UNITS), -(-num_tensors // TENSORS_PER_BLOCK))
    g = max(min(g, max_blocks), -(-total_units // MAX_UNITS))
    return max(min(g, total_units), 1)


def check(numels, itemsizes, max_blocks):
    """Checks every property of the plan for one input; returns (segments, merges, blocks)."""
    segs, merges = plan(numels, itemsizes, max_blocks)
    assert segs.dtype == torch.int64 and merges.dtype == torch.int64
    assert segs.dim() == 2 and segs.shape[1] == 6 and merges.dim() == 2 and merges.shape[1] == 3
    numel = torch.tensor(numels, dtype=torch.int64)
    per_unit = UNIT // torch.tensor(itemsizes, dtype=torch.int64)
    units = (numel + per_unit - 1) // per_unit
    total = int(units.sum())
    blocks = expected_blocks(total, len(numels), max_blocks)
    T = len(numels)

    if total == 0:
        assert segs.shape[0] == 0 and merges.shape[0] == 0
        return segs, merges, 0
    b, t, beg, end, kind, slot = segs.unbind(1)

    # Segment order: block order, then tensor order within a block.
    order = b * (T + 1) + t
    assert bool((order[1:] > order[:-1]).all()), "segments out of (block, tensor) order"
    assert int(b.min()) == 0 and int(b.max()) == blocks - 1
    assert bool((beg < end).all()), "an empty segment"
    assert bool((numel[t] > 0).all()), "an empty tensor got a segment"

    # Every element of every tensor exactly once: per tensor, the segments (in
    # block order) tile [0, numel) with no gap and no overlap.
    by_tensor = torch.argsort(t * (blocks + 1) + b)
    ts, bs, es = t[by_tensor], beg[by_tensor], end[by_tensor]
    first = torch.ones_like(ts, dtype=torch.bool)
    first[1:] = ts[1:] != ts[:-1]
    last = torch.ones_like(ts, dtype=torch.bool)
    last[:-1] = ts[1:] != ts[:-1]
    assert bool((bs[first] == 0).all()), "a tensor's first segment does not start at 0"
    assert bool((es[last] == numel[ts[last]]).all()), "a tensor's last segment stops short"
    assert bool((bs[~first] == es[:-1][~first[1:]]).all()), "gap or overlap between segments"
    covered = torch.zeros(T, dtype=torch.int64).index_add_(0, t, end - beg)
    assert torch.equal(covered, numel), "element count read per tensor"

    # Segments start on unit boundaries (what lets the kernel use 16-byte loads).
    assert bool((beg % per_unit[t] == 0).all())

    # Balance: the blocks' unit counts differ by at most one.
    seg_units = (end - beg + per_unit[t] - 1) // per_unit[t]
    block_units = torch.zeros(blocks, dtype=torch.int64).index_add_(0, b, seg_units)
    assert int(block_units.sum()) == total
    assert int(block_units.max()) - int(block_units.min()) <= 1, "blocks unbalanced"
    assert int(block_units.min()) >= 1, "an empty block"
    assert int(block_units.max()) <= MAX_UNITS

    # Kinds: a tensor read by one block is kWhole there (that block writes its
    # row); a tensor read by several is kTail in its first block and kHead in
    # every later one, and each such segment owns slot 2 * block + kind.
    nblk = torch.zeros(T, dtype=torch.int64).index_add_(0, t, torch.ones_like(t))
    single = nblk[t] == 1
    assert bool((kind[single] == WHOLE).all()) and bool((slot[single] == -1).all())
    multi_first = (~single) & first[torch.argsort(by_tensor)]
    multi_later = (~single) & ~first[torch.argsort(by_tensor)]
    assert bool((kind[multi_first] == TAIL).all())
    assert bool((kind[multi_later] == HEAD).all())
    assert bool((slot[~single] == 2 * b[~single] + kind[~single]).all())
    written = slot[~single]
    assert written.unique().numel() == written.numel(), "two segments write one slot"

    # Merges: for every tensor read by several blocks, exactly its slots, in
    # block order (i = 0, 1, ...), and nothing else.
    if merges.shape[0]:
        mt, mi, ms = merges.unbind(1)
        morder = mt * (blocks + 1) + mi
        assert bool((morder[1:] > morder[:-1]).all()), "merges out of (tensor, i) order"
    else:
        mt = mi = ms = torch.empty(0, dtype=torch.int64)
    want = segs[~single]
    want = want[torch.argsort(want[:, TENSOR] * (blocks + 1) + want[:, BLOCK])]
    assert torch.equal(mt, want[:, TENSOR]), "merged tensors"
    assert torch.equal(ms, want[:, SLOT]), "merged slots (or their order)"
    starts = torch.ones_like(mt, dtype=torch.bool)
    starts[1:] = mt[1:] != mt[:-1]
    idx = torch.arange(mt.numel())
    run_start = torch.cummax(torch.where(starts, idx, 0), 0).values
    assert torch.equal(mi, idx - run_start), "merge positions i are not 0, 1, ..."
    return segs, merges, blocks


def test_simple_mixed_dtypes():
    segs, merges, blocks = check([3, 0, 100_000, 1, 17], [4, 2, 8, 2, 4], 8)
    assert blocks == 8
    # 100,000 float64 values = 50,000 units, shared by every block.
    assert segs[:, TENSOR].tolist().count(2) == 8


@pytest.mark.parametrize("numels", [[], [0], [0, 0, 0]])
def test_nothing_to_read(numels):
    segs, merges, blocks = check(numels, [4] * len(numels), 100)
    assert blocks == 0


def test_empty_tensors_between_others_are_skipped():
    segs, _, _ = check([0, 5, 0, 0, 7, 0], [2, 4, 8, 2, 8, 4], 4)
    assert segs[:, TENSOR].tolist() == [1, 4]


@pytest.mark.parametrize("itemsize", [2, 4, 8])
def test_one_element(itemsize):
    segs, merges, blocks = check([1], [itemsize], 1000)
    assert blocks == 1 and segs.tolist() == [[0, 0, 0, 1, WHOLE, -1]]
    assert merges.shape[0] == 0


@pytest.mark.parametrize("n", [1, 7, 8, 9, 255 * 8, 256 * 8, 256 * 8 + 1, 1000 * 8 + 3])
@pytest.mark.parametrize("max_blocks", [1, 2, 3, 1000])
def test_sizes_around_units_and_blocks(n, max_blocks):
    check([n], [2], max_blocks)
    check([n, n // 2, 1], [2, 4, 8], max_blocks)


def test_more_tensors_than_blocks():
    numels = [(i * 37) % 301 for i in range(2000)]
    itemsizes = [[2, 4, 8][i % 3] for i in range(2000)]
    _, _, blocks = check(numels, itemsizes, 7)
    assert blocks == 7


def test_many_tiny_tensors_use_many_blocks():
    # 10,000 one-element tensors are 10,000 units, 40 blocks' worth of bytes;
    # each costs a block a reduction, so the grid spreads them over 1,000.
    _, _, blocks = check([1] * 10_000, [4] * 10_000, 1000)
    assert blocks == 1000
    _, _, blocks = check([1] * 100, [4] * 100, 1000)
    assert blocks == 13


def test_more_blocks_than_units():
    # The grid never exceeds the work: at least kMinUnitsPerBlock units a block
    # when there is enough, never an empty block.
    _, _, blocks = check([5, 3, 1], [4, 8, 2], 1_000_000)
    assert blocks == 1
    _, _, blocks = check([8 * 256 * 5 + 1], [2], 1_000_000)
    assert blocks == 6


def test_one_huge_tensor_is_split_evenly():
    n = (1 << 33) + 12345  # > 2^31 elements: planned only, never allocated
    segs, merges, blocks = check([n], [2], 264)
    assert blocks == 264
    assert segs[:, END].max().item() == n
    assert merges[:, 2].tolist() == [1] + [2 * b for b in range(1, 264)]


def test_huge_input_on_a_small_grid_grows_the_grid():
    # At most 2^27 units (2^30 elements) per block, so the kernel's int
    # shared-memory histogram counters cannot overflow.
    n = 3 * (1 << 30) + 5  # float32: 3 * 2^28 + 2 units
    segs, _, blocks = check([n], [4], 1)
    assert blocks == 7
    per_block = (segs[:, END] - segs[:, BEGIN]).max().item()
    assert per_block <= 1 << 30


def test_100000_tiny_tensors():
    T = 100_000
    numels = [(i * 7919) % 13 for i in range(T)]  # 0..12, empty ones included
    itemsizes = [[2, 4, 8, 4][i % 4] for i in range(T)]
    segs, merges, blocks = check(numels, itemsizes, 1056)
    assert blocks == 1056
    assert segs[:, TENSOR].unique().numel() == sum(1 for n in numels if n)


def test_tensors_straddling_many_blocks_mixed_with_tiny_ones():
    numels = [1, 10_000_000, 3, 0, 2, 123_457, 9, 65_536]
    check(numels, [8, 2, 4, 4, 2, 8, 2, 4], 97)
    check(numels, [2] * 8, 1)


def test_plan_is_deterministic():
    args = ([5, 100_000, 3, 77_777], [4, 2, 8, 4], 50)
    a = plan(*args)
    for _ in range(3):
        b = plan(*args)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_bad_arguments_are_named():
    with pytest.raises(RuntimeError, match="itemsizes"):
        plan([1, 2], [4], 4)
    with pytest.raises(RuntimeError, match="max_blocks"):
        plan([1], [4], 0)
    with pytest.raises(RuntimeError, match=r"numels\[1\] is negative"):
        plan([1, -1], [4, 4], 4)
    with pytest.raises(RuntimeError, match=r"itemsizes\[0\] must be 2, 4 or 8"):
        plan([1], [3], 4)
