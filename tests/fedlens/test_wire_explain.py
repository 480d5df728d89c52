"""ExplainInput messages round-trip through fedlens.wire unchanged."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from fedlens import wire
from fedlens.types import FeatureAttribution, FeatureChange, InputExplanation

text = st.text(max_size=12)
finite = st.floats(allow_nan=False, allow_infinity=False, width=64)

explanations = st.builds(
    InputExplanation,
    model_id=text,
    predicted_label=text,
    probability=finite,
    attributions=st.lists(
        st.builds(FeatureAttribution, feature=text, value=text, attribution=finite), max_size=4
    ).map(tuple),
    changes=st.lists(
        st.builds(FeatureChange, feature=text, original=text, proposed=text), max_size=3
    ).map(tuple),
    counterfactual_label=text,
    counterfactual_probability=finite,
    counterfactual_note=text,
    card=text,
    baseline=text,
    method=text,
)


@given(explanations)
def test_input_explanation_round_trips(explanation: InputExplanation) -> None:
    msg = wire.input_explanation_to_proto(explanation)
    decoded = type(msg).FromString(msg.SerializeToString())
    assert wire.input_explanation_from_proto(decoded) == explanation


@given(st.dictionaries(text, text, max_size=5), text, st.integers(0, 2**32 - 1))
def test_explain_input_request_round_trips(record: dict[str, str], model_id: str, top: int) -> None:
    msg = wire.explain_input_request_to_proto(record, model_id=model_id, top=top)
    decoded = type(msg).FromString(msg.SerializeToString())
    assert wire.explain_input_request_from_proto(decoded) == (record, model_id, top)
