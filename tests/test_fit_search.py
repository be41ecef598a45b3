"""largest_batches (secant start + gallop) returns exactly what the plain doubling/bisection search returns."""
from actcomp.measure import largest_batch, largest_batches, step_memory


def test_largest_batches_equals_plain_search_and_respects_budgets():
    one = step_memory("test_resnet", 1, img_size=64, preset="pool2").peak_bytes
    budgets = [one - 1, one, 3 * one, 10 * one]
    fast = largest_batches("test_resnet", "pool2", budgets, img_size=64, max_batch=4096)
    slow = [largest_batch("test_resnet", "pool2", b, img_size=64, max_batch=4096) for b in budgets]
    assert fast == slow
    assert fast[0] == 0 and fast[1] >= 1
    for b, budget in zip(fast[1:], budgets[1:]):
        assert step_memory("test_resnet", b, img_size=64, preset="pool2").peak_bytes <= budget
        assert step_memory("test_resnet", b + 1, img_size=64, preset="pool2").peak_bytes > budget
