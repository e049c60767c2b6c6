"""memory.saved_activation_bytes: what autograd saves, counted once per storage, and nothing kept
alive after the count (the benchmark measures peak memory right after it)."""
import gc
import weakref

import torch

from transpeft_kernels.memory import saved_activation_bytes


def test_counts_each_saved_storage_once_and_skips_excluded_ones():
    w = torch.randn(64, 32, requires_grad=True)
    x = torch.randn(16, 64, requires_grad=True)

    def fn():
        h = x @ w            # saves x and w (w excluded)
        e = h.exp()          # saves its own output e
        return (e * e.t().t()).sum()  # saves e twice through a view: one storage

    assert saved_activation_bytes(fn, exclude=[w]) == x.numel() * 4 + 16 * 32 * 4


def test_nothing_of_the_counted_forward_stays_alive():
    """A node that saves its own output (exp) held that output, whose grad_fn is the node: a cycle
    through C++ that gc cannot break, so the whole forward leaked (found in the first GPU run's
    train-step peaks, which grew with every implementation measured)."""
    x = torch.randn(256, 256, requires_grad=True)
    refs = []

    def fn():
        h = (x * 2).exp()
        refs.append(weakref.ref(h))
        return h.sum()

    assert saved_activation_bytes(fn) > 0
    gc.collect()
    assert refs[0]() is None
