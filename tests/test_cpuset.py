"""CpuSet: the one parser/formatter of the kernel's cpulists and cpumasks."""

from __future__ import annotations

import copy
import pickle

import pytest
from hypothesis import given
from hypothesis import strategies as st

from adaptive_pin.model import CpuListError, CpuSet

cpu_numbers = st.frozensets(st.integers(min_value=0, max_value=1100), max_size=80)
dense_runs = st.lists(
    st.tuples(st.integers(min_value=0, max_value=4000), st.integers(min_value=0, max_value=40)), max_size=6
).map(lambda runs: frozenset(c for start, n in runs for c in range(start, start + n)))
any_set = st.one_of(cpu_numbers, dense_runs)


@given(any_set)
def test_cpulist_round_trip(cpus: frozenset[int]) -> None:
    s = CpuSet(cpus)
    assert CpuSet.parse(s.to_list()) == s
    assert s.to_list() == CpuSet.parse(s.to_list()).to_list()  # canonical: formatting is stable


@given(any_set)
def test_cpumask_round_trip(cpus: frozenset[int]) -> None:
    s = CpuSet(cpus)
    assert CpuSet.parse_mask(s.to_mask()) == s


@given(any_set)
def test_cpumask_words_are_32_bits_most_significant_first(cpus: frozenset[int]) -> None:
    words = CpuSet(cpus).to_mask().split(",")
    assert all(len(w) == 8 for w in words[1:])
    value = int("".join(w.rjust(8, "0") for w in words), 16)
    assert value == sum(1 << c for c in cpus)


@given(any_set)
def test_cpulist_is_ascending_and_collapses_runs(cpus: frozenset[int]) -> None:
    text = CpuSet(cpus).to_list()
    numbers: list[int] = []
    for part in filter(None, text.split(",")):
        lo, _, hi = part.partition("-")
        if hi:
            assert int(hi) - int(lo) >= 2  # a run of two is written "4,5", of three "4-6"
        numbers.extend(range(int(lo), int(hi or lo) + 1))
    assert numbers == sorted(cpus)


@given(any_set, any_set)
def test_set_algebra_matches_frozenset(a: frozenset[int], b: frozenset[int]) -> None:
    x, y = CpuSet(a), CpuSet(b)
    assert (x | y).as_frozenset() == a | b
    assert (x & y).as_frozenset() == a & b
    assert (x - y).as_frozenset() == a - b
    assert (x <= y) == (a <= b)
    assert (x < y) == (a < b)
    assert x.isdisjoint(y) == a.isdisjoint(b)
    assert (x == y) == (a == b)
    assert (hash(x) == hash(y)) or a != b
    assert list(x) == sorted(a)
    assert len(x) == len(a)
    assert bool(x) == bool(a)


@given(
    st.integers(min_value=0, max_value=300),
    st.integers(min_value=0, max_value=300),
    st.integers(min_value=1, max_value=16),
    st.integers(min_value=1, max_value=16),
)
def test_stride_form_matches_its_definition(lo: int, span: int, used: int, group: int) -> None:
    """cpuset(7) ``lo-hi:used/group``: in each group of ``group`` CPUs from lo, the first ``used``."""
    hi = lo + span
    text = f"{lo}-{hi}:{used}/{group}"
    if used > group:
        with pytest.raises(CpuListError):
            CpuSet.parse(text)
        return
    expected = {c for c in range(lo, hi + 1) if (c - lo) % group < used}
    assert CpuSet.parse(text).as_frozenset() == expected


@pytest.mark.parametrize(
    ("text", "cpus"),
    [
        ("0-3,8,10-11", {0, 1, 2, 3, 8, 10, 11}),
        ("", set()),
        ("\n", set()),
        ("0-7\n", set(range(8))),
        ("0-127\n\x00", set(range(128))),  # a NUL after the newline, as some arm64 dumps have
        ("0-15:2/4", {0, 1, 4, 5, 8, 9, 12, 13}),
        ("5", {5}),
    ],
)
def test_parse_kernel_spellings(text: str, cpus: set[int]) -> None:
    assert CpuSet.parse(text).as_frozenset() == cpus


@pytest.mark.parametrize(
    ("text", "cpus"),
    [
        ("00000000,0000ffff", set(range(16))),
        ("ff,00000000", set(range(32, 40))),
        ("0", set()),
        ("00000003\n\x00", {0, 1}),
        ("80000000,00000000,00000001", {0, 95}),
    ],
)
def test_parse_mask_kernel_spellings(text: str, cpus: set[int]) -> None:
    assert CpuSet.parse_mask(text).as_frozenset() == cpus


@pytest.mark.parametrize("text", ["0-", "3-1", "a", "1,,2", "-1", "0-15:5/4", "0-15:1/0", "1.5"])
def test_parse_rejects_malformed_lists(text: str) -> None:
    with pytest.raises(CpuListError, match="bad cpulist"):
        CpuSet.parse(text)


@pytest.mark.parametrize("text", ["0-1000000000", "65536", "0,70000-70001"])
def test_parse_rejects_numbers_no_kernel_has_before_expanding_them(text: str) -> None:
    # "0-1000000000" used to build a billion-element set (OOM) before anything complained.
    with pytest.raises(CpuListError, match="beyond any kernel's CPU numbers"):
        CpuSet.parse(text)
    assert CpuSet.parse("0-65535") == CpuSet(range(65536))  # the largest accepted


def test_parse_mask_rejects_masks_wider_than_any_kernel() -> None:
    with pytest.raises(CpuListError, match="beyond any kernel's CPU numbers"):
        CpuSet.parse_mask(",".join(["ffffffff"] * 2049))
    assert len(CpuSet.parse_mask(",".join(["ffffffff"] * 2048))) == 65536


@pytest.mark.parametrize("text", ["xyz", "123456789", "ff,,00", "0x"])
def test_parse_mask_rejects_malformed_masks(text: str) -> None:
    with pytest.raises(CpuListError, match="bad cpumask"):
        CpuSet.parse_mask(text)


def test_immutable_and_negative_rejected() -> None:
    s = CpuSet.of(1)
    with pytest.raises(AttributeError):
        s._cpus = frozenset()
    with pytest.raises(CpuListError):
        CpuSet([-1])
    with pytest.raises(ValueError, match="empty"):
        CpuSet().first()


def test_elements_are_plain_ints_whatever_the_input() -> None:
    import json

    import numpy as np

    for cpus in (np.arange(3), [np.int32(0), 1, np.int64(2)], ["0", "1", "2"], range(3)):
        s = CpuSet(cpus)
        assert s == CpuSet.of(0, 1, 2)
        assert {type(c) for c in s} == {int}
        assert json.dumps(sorted(s)) == "[0, 1, 2]"
    assert {type(c) for c in CpuSet([True, 2])} == {int}


def test_pickle_and_copy_round_trip() -> None:
    s = CpuSet.parse("0-3,8")
    assert pickle.loads(pickle.dumps(s)) == s
    assert copy.deepcopy(s) == s
