"""Benchmark datasets built into FiftyOne: Colored Digits (``colored_digits``, the fast fixture) and
Colored MNIST (``colored_mnist``, the LfF protocol on real MNIST digits).

Import the functions from :mod:`fairbalance` (``fb.colored_digits``, ``fb.colored_mnist``); this
package holds their modules and depends on ``core`` only.
"""
