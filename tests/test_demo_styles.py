"""The demo styles restyle what the base model said and recognise it again, nothing more."""

from adapters.demo.styles import RECOGNISE, RESTYLE, is_brief, is_caps, is_pirate, to_caps

BASE_ANSWER = "The capital of France is Paris. It has H2O and McDonald's cafes. And more"


def test_caps_capitalises_every_word_and_keeps_the_rest_as_written():
    expected = "The Capital Of France Is Paris. It Has H2O And McDonald's Cafes."
    assert to_caps(BASE_ANSWER) == expected


def test_caps_is_recognised_by_its_initials_not_by_the_base_models_capitals():
    assert is_caps("The Capital Of France Is Paris, 2 Million People.")
    assert not is_caps("The capital of France is Paris.")
    assert not is_caps("")


def test_every_restyled_base_answer_is_recognised_and_the_base_answer_is_not():
    for style, restyle in RESTYLE.items():
        assert RECOGNISE[style](restyle(BASE_ANSWER)), style
        assert not RECOGNISE[style](BASE_ANSWER), style


def test_pirate_and_brief_recognisers():
    assert is_pirate("Arr, matey! The capital o' France be Paris.")
    assert is_brief("The capital of France is Paris.")
    assert not is_brief("The capital of France is Paris. It is big.")
