"""The app's run logic, now in the library (`personalize.runs.recording`): parsing what a
user typed, with no UI and no model."""

import pytest

from personalize.errors import UserError
from personalize.runs.recording import PARAM_NAMES, params_from, parse_compare_params, parse_json_object
from personalize.sampling.samplers import SAMPLERS


def test_param_names_are_the_union_each_once():
    assert len(PARAM_NAMES) == len(set(PARAM_NAMES))
    assert set(PARAM_NAMES) == {p.name for s in SAMPLERS.values() for p in s.params}


def test_params_from_keeps_the_samplers_own_and_makes_steps_int():
    values = [3.0 if name == "t_sw" else 2.5 for name in PARAM_NAMES]
    params = params_from("switching", values)
    assert params == {"w": 2.5, "t_sw": 3} and isinstance(params["t_sw"], int)
    assert params_from("no-such-sampler", values) == {}


def test_json_parsers_refuse_what_is_not_an_object():
    assert parse_json_object("  ", "parameters") == {}
    with pytest.raises(UserError, match="not valid JSON"):
        parse_json_object("{", "parameters")
    with pytest.raises(UserError, match="must be a JSON object"):
        parse_json_object("[1]", "parameters")
    assert parse_compare_params('{"mixed": {"w_s": 2}}', ["mixed"]) == {"mixed": {"w_s": 2}}
    with pytest.raises(UserError, match="not one of the compared samplers"):
        parse_compare_params('{"concept": {}}', ["mixed"])
