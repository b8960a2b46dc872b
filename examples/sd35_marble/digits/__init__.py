"""Digits test bed: a class-conditional rectified flow on scikit-learn's 8×8 digits, a judge, reward suites."""
