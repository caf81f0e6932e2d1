"""kvos lab predict: every concept's answer, worked out by hand from the question's numbers, is what
kvos measures running the scenario (through syscalls, on the simulated GPU), for several seeds."""
import json

import pytest

from userspace.lab.predict import CONCEPTS, ask
from userspace.shell.main import main


@pytest.mark.parametrize("concept", CONCEPTS)
def test_the_answer_is_what_kvos_measures(concept):
    texts = set()
    for seed in range(3):
        q = ask(concept, seed)
        assert q.concept == concept and q.text and q.explain
        texts.add(q.text)
        measured = q.measure()
        assert measured == q.answer, (seed, q.text, measured)
    assert len(texts) >= 2                                   # seeds give other numbers


def test_the_command(capsys):
    assert main(["lab", "predict"]) == 0
    listing = capsys.readouterr().out
    assert all(c in listing for c in CONCEPTS)
    assert main(["lab", "predict", "convoy", "-s", "4"]) == 0
    out = capsys.readouterr().out
    assert "static" in out and "Answer" not in out and "-c" in out
    assert main(["lab", "predict", "convoy", "-s", "4", "-c", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["agrees"] and result["answer"] == result["measured"] and result["seed"] == 4
    assert main(["lab", "predict", "nothing"]) == 2                      # ENOENT
