"""The filtered sampler's per-row results: the column indices of its float32 [S, 8] and int32 [S, 16] tensors
(`rf` and `ri`), shared by the kernels of `worker.kernels.filtered_sampling` and `worker.kernels.top_logprobs`.

float32: the largest scaled logit m, the sum Z of exp(s - m), the raw log-sum-exp, the mass top-k / top-p
keep, and log of the mass every filter keeps. int32: the greedy token, the finite count, the smallest finite
key, the top-k / top-p threshold key T with the ties kept at it, the kept count, the id of the last tie kept
(CUTOFF), whether top-k was on, whether filters matter, the count every filter keeps, and the top-logprobs
threshold key with the count above it.
"""

import triton.language as tl

M, Z, LSE_RAW, KEPT_MASS, LOG_Z = map(tl.constexpr, range(5))
GREEDY, FINITE, LOW, T, TIES, KEPT, CUTOFF, ON_K, MATTER, COUNT, T_TOP, ABOVE_TOP = map(tl.constexpr, range(12))
