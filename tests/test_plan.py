"""Span maths of the plan: every unit of work appears exactly once, in the documented order."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from prewarm.fleet.plan import ImagePlan, SpanLayer, plan_image


def _digest(i: int) -> str:
    return "sha256:" + f"{i:064x}"


layer_specs = st.lists(
    st.tuples(st.integers(0, 6), st.integers(1, 10**9), st.one_of(st.none(), st.integers(1, 40))),
    min_size=1, max_size=12,
)


def _build(specs, spans_per_task: int = 1):
    layers, diff_ids, span_layers = [], [], {}
    for ident, size, spans in specs:
        d = _digest(ident)
        layers.append((d, size + ident, "application/vnd.oci.image.layer.v1.tar+gzip"))
        diff_ids.append(_digest(1000 + ident))
        if spans is not None and d not in span_layers:
            span_layers[d] = SpanLayer(_digest(2000 + ident), spans, spans * 4 << 20, ident * 7919 % 5)
    return plan_image(reference="r/x@sha256:" + "a" * 64, manifest_digest=_digest(9), config_digest=_digest(8),
                      layers=layers, diff_ids=diff_ids, span_layers=span_layers,
                      spans_per_task=spans_per_task)


#: One span per task, a few, more than any layer has.
task_spans = st.sampled_from([1, 2, 3, 4, 7, 1000])


@given(layer_specs, task_spans)
def test_every_task_appears_exactly_once(specs, per: int) -> None:
    # Given any mix of indexed and whole layers, repeated digests included, and a task size
    plan = _build(specs, per)
    # When every task index is mapped to (layer, first span) and widened to its spans
    seen = [plan.task_at(k) for k in range(plan.task_count)]
    covered = [(i, s + j) for i, s in seen for j in range(plan.layers[i].task_spans(s))]
    # Then each span of each distinct layer is covered exactly once
    expected = {(i, s) for i, layer in enumerate(plan.layers) for s in range(layer.num_spans)}
    assert sorted(covered) == sorted(expected)
    assert len(covered) == len(expected)
    # And every task is full but a layer's last
    for i, s in seen:
        layer = plan.layers[i]
        if layer.mode == "spans":
            assert layer.spans_per_task == per
            assert layer.task_spans(s) == per or s + layer.task_spans(s) == layer.num_spans
    # And whole layers come first, largest first
    kinds = [plan.layers[i].mode for i, _ in seen]
    assert kinds == sorted(kinds, key=lambda m: m != "whole")
    whole_sizes = [plan.layers[i].size for i, _ in seen if plan.layers[i].mode == "whole"]
    assert whole_sizes == sorted(whole_sizes, reverse=True)
    # And span layers start fewest TOC entries first (quickest to prepare), image order among equals
    order = list(dict.fromkeys(i for i, _ in seen if plan.layers[i].mode == "spans"))
    assert order == sorted(order, key=lambda i: (plan.layers[i].num_files, i))
    # And the first span layer goes whole, then the others interleave: each task in order of
    # how far into its layer it is
    spans_seen = [(i, s) for i, s in seen if plan.layers[i].mode == "spans"]
    if order:
        first = plan.layers[order[0]].task_count
        assert {i for i, _ in spans_seen[:first]} == {order[0]}
        progress = [(s / plan.layers[i].spans_per_task / plan.layers[i].task_count, order.index(i))
                    for i, s in spans_seen[first:]]
        assert progress == sorted(progress)
    # And the layer to prepare ahead of each is the next one in that order
    assert [plan.next_span_layer(i) for i in order] == [plan.layers[i] for i in order[1:]] + [None] * bool(order)
    # And each span layer is walked in stream order
    for i, layer in enumerate(plan.layers):
        spans = [s for li, s in covered if li == i]
        assert spans == list(range(layer.num_spans))


@given(layer_specs, task_spans)
def test_plan_round_trips_through_json(specs, per: int) -> None:
    plan = _build(specs, per)
    again = ImagePlan.from_json(plan.to_json())
    assert again == plan
    assert [again.task_at(k) for k in range(again.task_count)] == [plan.task_at(k) for k in range(plan.task_count)]


def test_repeated_layers_are_planned_once_but_kept_in_order() -> None:
    plan = _build([(1, 100, None), (2, 200, 3), (1, 100, None)])
    assert len(plan.layers) == 2
    assert plan.layer_order == (0, 1, 0)
    assert plan.task_count == 1 + 3
    assert plan.total_bytes == 101 + 202


def test_outside_the_plan_is_an_error() -> None:
    plan = _build([(1, 100, 2)])
    with pytest.raises(IndexError):
        plan.task_at(2)
    with pytest.raises(IndexError):
        plan.task_at(-1)


def test_manifest_and_config_must_agree() -> None:
    with pytest.raises(ValueError, match="2 layers but the config has 1"):
        plan_image(reference="r", manifest_digest=_digest(1), config_digest=_digest(2),
                   layers=[(_digest(1), 1, "m"), (_digest(2), 1, "m")], diff_ids=[_digest(3)], span_layers={})
