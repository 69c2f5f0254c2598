"""The dropout mask of every fused kernel (attention, LayerNorm), from a seed and each element's position.

A backward kernel that calls :func:`keep_mask` with the same seed regenerates exactly the forward's
mask. The mask depends only on (seed, stream, row, column), never on block sizes or the number of programs.
"""
import triton
import triton.language as tl

# Bits of randomness per element: a keep decision compares a 16-bit uniform with ceil(p * 2**16),
# so the drop probability is p rounded up to a multiple of 2**-16.
# constexpr values, so @jit code may read them (an annotated plain int is rejected by the compiler).
RANDOM_BITS = tl.constexpr(16)
_RANDOM_LEVELS = tl.constexpr(2 ** RANDOM_BITS.value)


@triton.jit
def _split_halves(word):
    """A uint32 block as two 16-bit uniforms, joined along a new last axis."""
    return tl.join(word & 0xFFFF, word >> 16)


@triton.jit
def keep_mask(seed, stream, rows, col_start, dropout_p, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(BLOCK_M, BLOCK_N) bool: True where element (rows[i], col_start + j) of random stream ``stream``
    survives dropout with rate ``dropout_p``. The one dropout RNG of every fused kernel.

    seed: int32 scalar (see kernels/_launch.py); stream: int scalar separating independent masks that
    share row and column numbers (attention: batch * heads + head; 0 elsewhere); rows: (BLOCK_M,)
    row ids; col_start: a multiple of 8; BLOCK_N >= 8. One Philox4x32-10 call per (stream, row, group
    of 8 columns) gives 128 random bits, split into eight 16-bit uniforms: an eighth of a Philox call
    per element, drawn once per tile. The counter holds (column group, row, stream) in separate 32-bit
    words, so the mask depends only on (seed, stream, row, column): never on block sizes, program
    counts or layout, and a backward that calls this with the same arguments regenerates the forward's mask.
    """
    groups = col_start // 8 + tl.arange(0, BLOCK_N // 8)
    counter_col = (rows[:, None] * 0 + groups[None, :]).to(tl.uint32)
    counter_row = (rows[:, None] + groups[None, :] * 0).to(tl.uint32)
    counter_stream = (rows[:, None] * 0 + groups[None, :] * 0 + stream).to(tl.uint32)
    zero = counter_col * 0
    r0, r1, r2, r3 = tl.philox(seed, counter_col, counter_row, counter_stream, zero)
    # Each join adds a trailing axis of 2: the reshape gives every group's eight 16-bit values to its eight
    # columns in one fixed order.
    bits = tl.join(tl.join(_split_halves(r0), _split_halves(r1)), tl.join(_split_halves(r2), _split_halves(r3)))
    bits = tl.reshape(bits, [BLOCK_M, BLOCK_N])
    threshold = tl.math.ceil(dropout_p * _RANDOM_LEVELS).to(tl.uint32)
    return bits >= threshold
